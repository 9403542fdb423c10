//! moto's EC2 API emulator for tests: `moto_server` on a free loopback port, one per
//! test (its state is the test's alone), killed when the `Moto` is dropped.
//!
//! `moto_server` comes from the Python package `moto[server]`, which `scripts/test.sh`
//! installs into `.venv` (see `requirements.txt` beside this crate). It is looked up in
//! `$MACHINIST_MOTO_SERVER`, then `<workspace>/.venv/bin/moto_server`, then `$PATH`.
//!
//! moto answers like EC2 with a few differences the tests keep in mind: everything it
//! makes is visible to every call at once, and instances are `running` at the first look
//! and `stopped` or `terminated` at once (a [`FaultProxy`] with [`Ec2Timing`] puts EC2's
//! delays back); it does not honour `RunInstances` client tokens (but stores them); it
//! deletes a security group still in use; and the addresses it gives instances lead
//! nowhere (the proxy's [`FaultProxy::rewrite_addresses`] points SSH at loopback instead).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Linux AMI in moto's default image set (Ubuntu 14.04, root device `/dev/sda1`).
pub const AMI: &str = "ami-1e749f67";
pub const REGION: &str = "us-east-1";
/// Any access keys do for moto, unless started with [`Moto::start_with_auth`].
pub const ACCESS_KEY_ID: &str = "AKIDMACHINISTTEST";
pub const SECRET_ACCESS_KEY: &str = "machinist-test-secret";

/// The contents of a credentials Secret with the test access keys, as the controller
/// reads it (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
pub fn credentials_secret_data() -> std::collections::BTreeMap<String, Vec<u8>> {
    std::collections::BTreeMap::from([
        ("AWS_ACCESS_KEY_ID".to_string(), ACCESS_KEY_ID.as_bytes().to_vec()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), SECRET_ACCESS_KEY.as_bytes().to_vec()),
    ])
}

const INSTALL: &str = "scripts/test.sh installs it into .venv; or: python3 -m venv .venv && \
                       .venv/bin/pip install -r e2e/test-moto/requirements.txt";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Moto {
    child: Child,
    address: SocketAddr,
    /// moto's log (a line per request), removed with the server.
    log: PathBuf,
}

impl Moto {
    /// Starts a server that accepts any credentials. Panics, naming the install
    /// command, when `moto_server` is missing: these tests must not pass by skipping.
    pub fn start() -> Moto {
        Self::spawn(false)
    }

    /// Starts a server that checks credentials against its own IAM: any access key it
    /// did not issue fails with `AuthFailure`.
    pub fn start_with_auth() -> Moto {
        Self::spawn(true)
    }

    /// `http://127.0.0.1:<port>`, for `spec.driver.amazonec2.endpointUrl`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    fn spawn(auth: bool) -> Moto {
        let program = moto_server();
        let mut last_error = String::new();
        // The free port is found by binding, then released for moto: another process may
        // take it in between, so try again a few times.
        for _ in 0..3 {
            let address = free_port();
            let log =
                std::env::temp_dir().join(format!("machinist-moto-{}-{}.log", std::process::id(), address.port()));
            let file = File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
            let mut command = Command::new(&program);
            command
                .args(["-H", "127.0.0.1", "-p", &address.port().to_string()])
                .stdin(Stdio::null())
                .stdout(file.try_clone().expect("a second handle on the log"))
                .stderr(file);
            if auth {
                command.env("INITIAL_NO_AUTH_ACTION_COUNT", "0");
            }
            let mut child = command.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                    return Moto { child, address, log };
                }
                if let Ok(Some(status)) = child.try_wait() {
                    let output = std::fs::read_to_string(&log).unwrap_or_default();
                    let _ = std::fs::remove_file(&log);
                    last_error = format!("moto_server exited with {status}: {}", output.trim());
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("moto_server did not listen on {address} within {}s", READY_TIMEOUT.as_secs());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("moto_server did not start: {last_error}");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    listener.local_addr().expect("the bound address")
}

fn moto_server() -> PathBuf {
    if let Some(path) = std::env::var_os("MACHINIST_MOTO_SERVER") {
        return PathBuf::from(path);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/moto_server");
    if venv.exists() {
        return venv;
    }
    let on_path = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("moto_server"))
        .find(|p| p.exists());
    on_path.unwrap_or_else(|| panic!("moto_server is missing: the amazonec2 tests need moto's EC2 emulator. {INSTALL}"))
}

/// A proxy in front of moto that answers chosen EC2 actions with an error of EC2's own
/// wire format, for what moto never says (throttling, no capacity, a security group
/// still in use), and on request edits moto's answers: a console output of the test's
/// own ([`console_output`](Self::console_output)), loopback addresses for every instance
/// ([`rewrite_addresses`](Self::rewrite_addresses)), a launch time long ago
/// ([`rewrite_launch_time`](Self::rewrite_launch_time)), and EC2's timing
/// ([`imitate_timing`](Self::imitate_timing)). Everything else goes through to moto
/// unchanged.
pub struct FaultProxy {
    address: SocketAddr,
    state: std::sync::Arc<std::sync::Mutex<FaultState>>,
}

#[derive(Default)]
struct FaultState {
    faults: Vec<Fault>,
    /// Every action that reached the proxy, in order.
    seen: Vec<String>,
    /// The console text GetConsoleOutput answers with, instead of moto's sample.
    console: Option<String>,
    /// The address every IPv4 address and DNS name in moto's answers is replaced with.
    address: Option<String>,
    /// The launch time every instance in moto's answers is given.
    launch_time: Option<String>,
    timing: Ec2Timing,
    /// How long moto's answer to an action is held back before it is passed on.
    delays: HashMap<String, Duration>,
    /// When RunInstances answered with each instance id.
    launched: HashMap<String, Instant>,
    /// The transitional state each instance entered (by a RunInstances, StartInstances,
    /// StopInstances or TerminateInstances the proxy saw), and when.
    transitions: HashMap<String, (Transition, Instant)>,
    /// Security group ids and key pair names created and not used since.
    fresh_groups: HashSet<String>,
    fresh_key_pairs: HashSet<String>,
}

/// EC2's delays, which moto does not have, put back by the proxy (all off by default,
/// [`FaultProxy::imitate_timing`]). What each imitates:
///
/// - EC2 is eventually consistent: a new instance is unknown for a while to the calls
///   about it, and a new security group or key pair to the calls that use it;
/// - an instance takes a while to start, stop and shut down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ec2Timing {
    /// For this long after RunInstances answered, every request naming the new instance
    /// id (an `InstanceId` or `InstanceId.N` parameter, an `instance-id` filter) is
    /// answered `InvalidInstanceID.NotFound` (HTTP 400) without reaching moto, as EC2
    /// answers for an id it does not show yet; a DescribeInstances with an `instance-id`
    /// filter gets an empty reservation set instead. Looks by tag still find it.
    pub invisible_for: Duration,
    /// The first request that uses a security group or key pair created through the
    /// proxy (it names the group id or key name, and is not a Describe*, Create*,
    /// Import* or Delete*) is answered `InvalidGroup.NotFound` or
    /// `InvalidKeyPair.NotFound` (HTTP 400), once per group or key pair.
    pub first_use_not_found: bool,
    /// How long an instance stays `pending` after RunInstances or StartInstances (moto's
    /// are `running` at the first look).
    pub pending_for: Duration,
    /// How long an instance stays `stopping` after StopInstances.
    pub stopping_for: Duration,
    /// How long an instance stays `shutting-down` after the first TerminateInstances.
    pub shutting_down_for: Duration,
}

/// A state an instance passes through, which the proxy shows for a while
/// ([`Ec2Timing`]): in DescribeInstances' `<instanceState>` and in the `<currentState>`
/// of the answers to StartInstances, StopInstances and TerminateInstances. While an
/// instance is in one, EC2 refuses some calls (`IncorrectInstanceState`): StartInstances
/// while it is stopping or shutting down, StopInstances while it is pending or shutting
/// down; so does the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transition {
    Pending,
    Stopping,
    ShuttingDown,
}

impl Transition {
    /// EC2's state name and code.
    fn state(self) -> (&'static str, u16) {
        match self {
            Transition::Pending => ("pending", 0),
            Transition::Stopping => ("stopping", 64),
            Transition::ShuttingDown => ("shutting-down", 32),
        }
    }

    fn lasts(self, timing: &Ec2Timing) -> Duration {
        match self {
            Transition::Pending => timing.pending_for,
            Transition::Stopping => timing.stopping_for,
            Transition::ShuttingDown => timing.shutting_down_for,
        }
    }

    /// Whether EC2 refuses `action` for an instance in this state.
    fn refuses(self, action: &str) -> bool {
        matches!(
            (action, self),
            ("StartInstances", Transition::Stopping | Transition::ShuttingDown)
                | ("StopInstances", Transition::Pending | Transition::ShuttingDown)
        )
    }
}

/// The elements of moto's answers that hold an instance's IPv4 addresses (instance,
/// network interface, association) or DNS names.
const ADDRESS_ELEMENTS: [&str; 8] = [
    "ipAddress",
    "privateIpAddress",
    "publicIp",
    "carrierIp",
    "customerOwnedIp",
    "dnsName",
    "privateDnsName",
    "publicDnsName",
];

struct Fault {
    action: String,
    status: u16,
    code: String,
    message: String,
    /// How many more requests it answers; `None`: all of them.
    remaining: Option<u32>,
}

/// The request id the proxy's errors carry.
pub const FAULT_REQUEST_ID: &str = "fault-proxy-request";

impl FaultProxy {
    /// A proxy for `moto`, on its own loopback port, until dropped with the test.
    pub fn start(moto: &Moto) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
        let address = listener.local_addr().expect("the bound address");
        let state = std::sync::Arc::new(std::sync::Mutex::new(FaultState::default()));
        let upstream = moto.address;
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, upstream, &state);
                });
            }
        });
        FaultProxy { address, state }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Answers the next `times` requests for `action` (all, when `None`) with HTTP
    /// `status` and the EC2 error `code`.
    pub fn fail(&self, action: &str, times: Option<u32>, status: u16, code: &str, message: &str) {
        self.state.lock().unwrap().faults.push(Fault {
            action: action.into(),
            status,
            code: code.into(),
            message: message.into(),
            remaining: times,
        });
    }

    /// How many requests for `action` reached the proxy.
    pub fn count(&self, action: &str) -> usize {
        self.state.lock().unwrap().seen.iter().filter(|a| *a == action).count()
    }

    /// From now on GetConsoleOutput shows `text` as every instance's console (moto's own
    /// is a fixed kernel log without cloud-init). moto still answers the call, so an
    /// unknown instance is still `InvalidInstanceID.NotFound`; the proxy puts `text`,
    /// base64-encoded as EC2 sends it, in the answer's `<output>`.
    pub fn console_output(&self, text: &str) {
        self.state.lock().unwrap().console = Some(text.to_string());
    }

    /// From now on every IPv4 address and DNS name of an instance in moto's answers
    /// (`ipAddress`, `privateIpAddress`, `publicIp`, `dnsName`, ..., also those of its
    /// network interfaces) reads `ip`, e.g. `"127.0.0.1"`: moto makes up 10.x and public
    /// addresses, and tests must connect to loopback only. Empty elements stay empty.
    pub fn rewrite_addresses(&self, ip: &str) {
        self.state.lock().unwrap().address = Some(ip.to_string());
    }

    /// From now on every instance in moto's answers was launched at `time`, in EC2's
    /// format (e.g. `"2020-01-01T00:00:00.000Z"`): moto's is when RunInstances ran, and a
    /// test cannot wait for an instance to get old.
    pub fn rewrite_launch_time(&self, time: &str) {
        self.state.lock().unwrap().launch_time = Some(time.to_string());
    }

    /// From now on moto's answers to `action` reach the client `by` late (zero: at once):
    /// the request has taken effect, and a controller killed meanwhile never learns it.
    pub fn delay_answer(&self, action: &str, by: Duration) {
        self.state.lock().unwrap().delays.insert(action.to_string(), by);
    }

    /// From now on the proxy imitates EC2's timing as `timing` says, for what is created,
    /// started, stopped or terminated through it from now on.
    pub fn imitate_timing(&self, timing: Ec2Timing) {
        self.state.lock().unwrap().timing = timing;
    }
}

/// The parameters of an EC2 query request body (`Action=...&InstanceId.1=i-...`).
fn parameters(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&text[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One request: read it, answer it with a fault or moto's answer, close.
fn serve(mut client: TcpStream, upstream: SocketAddr, state: &std::sync::Mutex<FaultState>) -> std::io::Result<()> {
    use std::io::{Read, Write};
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        let n = client.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
        if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&request[..head_end]).to_string();
    let length = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>()))
        .and_then(Result::ok)
        .unwrap_or(0);
    while request.len() < head_end + length {
        let n = client.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8_lossy(&request[head_end..]).to_string();
    let params = parameters(&body);
    let action = params.iter().find(|(k, _)| k == "Action").map(|(_, v)| v.clone()).unwrap_or_default();
    let answer = {
        let mut state = state.lock().unwrap();
        state.seen.push(action.clone());
        let fault = state.faults.iter_mut().find(|f| f.action == action && f.remaining != Some(0));
        let fault = fault.map(|f| {
            if let Some(n) = f.remaining.as_mut() {
                *n -= 1;
            }
            (f.status, error_xml(&f.code, &f.message))
        });
        fault.or_else(|| state.timing_answer(&action, &params))
    };
    if let Some((status, xml)) = answer {
        let response = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
            if status == 200 { "OK" } else { "Fault" },
            xml.len()
        );
        return client.write_all(response.as_bytes());
    }
    // To moto, with the connection closed after one answer (as moto's server does).
    let mut server = TcpStream::connect(upstream)?;
    let head = head.replacen("\r\n", "\r\nConnection: close\r\n", 1);
    let head: String = head
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection: keep"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    server.write_all(head.trim_end_matches("\r\n").as_bytes())?;
    server.write_all(b"\r\n\r\n")?;
    server.write_all(&request[head_end..])?;
    let mut response = Vec::new();
    server.read_to_end(&mut response)?;
    let (edits, states, delay) = {
        let mut state = state.lock().unwrap();
        if succeeded(&response) {
            state.record(&action, &params, &response);
        }
        let mut edits: Vec<(&str, String)> = Vec::new();
        if let Some(text) = state.console.as_ref().filter(|_| action == "GetConsoleOutput") {
            edits.push(("output", base64(text.as_bytes())));
        }
        if let Some(ip) = &state.address {
            edits.extend(ADDRESS_ELEMENTS.map(|element| (element, ip.clone())));
        }
        if let Some(time) = &state.launch_time {
            edits.push(("launchTime", time.clone()));
        }
        let shows_states =
            ["DescribeInstances", "StartInstances", "StopInstances", "TerminateInstances"].contains(&action.as_str());
        let delay = state.delays.get(&action).copied().unwrap_or_default();
        (edits, if shows_states { state.transitional_states() } else { HashMap::new() }, delay)
    };
    std::thread::sleep(delay);
    if !edits.is_empty() {
        response = edit(&response, &edits);
    }
    if !states.is_empty() {
        response = edit_body(&response, |body| rewrite_states(&body, &states));
    }
    client.write_all(&response)
}

/// An EC2 error answer's body.
fn error_xml(code: &str, message: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
         <Message>{message}</Message></Error></Errors><RequestID>{FAULT_REQUEST_ID}</RequestID></Response>"
    )
}

/// EC2's answer to a DescribeInstances that matches nothing.
fn no_reservations_xml() -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DescribeInstancesResponse \
         xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>{FAULT_REQUEST_ID}</requestId>\
         <reservationSet/></DescribeInstancesResponse>"
    )
}

/// The instance ids a request names: `InstanceId`, `InstanceId.N`, and the values of
/// `instance-id` filters. The second part says whether any came from a filter only.
fn instance_ids(params: &[(String, String)]) -> (Vec<String>, bool) {
    let mut ids: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "InstanceId" || k.strip_prefix("InstanceId.").is_some_and(is_number))
        .map(|(_, v)| v.clone())
        .collect();
    let named = !ids.is_empty();
    for (key, value) in params {
        let Some(filter) = key.strip_suffix(".Name").filter(|_| value == "instance-id") else { continue };
        let prefix = format!("{filter}.Value.");
        ids.extend(params.iter().filter(|(k, _)| k.starts_with(&prefix)).map(|(_, v)| v.clone()));
    }
    let filtered_only = !named && !ids.is_empty();
    (ids, filtered_only)
}

/// The security group ids a request names (`GroupId`, `GroupId.N`, `SecurityGroupId.N`,
/// `NetworkInterface.N.SecurityGroupId.M`).
fn group_ids(params: &[(String, String)]) -> impl Iterator<Item = &String> {
    params
        .iter()
        .filter(|(k, _)| {
            k == "GroupId"
                || k.starts_with("GroupId.")
                || k.starts_with("SecurityGroupId.")
                || (k.starts_with("NetworkInterface.") && k.contains(".SecurityGroupId."))
        })
        .map(|(_, v)| v)
}

fn is_number(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

fn succeeded(response: &[u8]) -> bool {
    response.starts_with(b"HTTP/1.1 200")
}

fn response_body(response: &[u8]) -> String {
    let start = response.windows(4).position(|w| w == b"\r\n\r\n").map_or(response.len(), |i| i + 4);
    String::from_utf8_lossy(&response[start..]).into_owned()
}

/// The text of every `<element>...</element>` in `xml`.
fn element_texts(xml: &str, element: &str) -> Vec<String> {
    let (open, close) = (format!("<{element}>"), format!("</{element}>"));
    let mut found = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let text = start + open.len();
        let Some(end) = rest[text..].find(&close) else { break };
        found.push(rest[text..text + end].to_string());
        rest = &rest[text + end..];
    }
    found
}

impl FaultState {
    /// What EC2's timing makes EC2 answer instead of moto, if anything: `(status, body)`.
    fn timing_answer(&mut self, action: &str, params: &[(String, String)]) -> Option<(u16, String)> {
        let now = Instant::now();
        let (ids, filtered_only) = instance_ids(params);
        if action != "RunInstances" {
            let hidden = ids.iter().find(|id| {
                self.launched.get(*id).is_some_and(|at| now.duration_since(*at) < self.timing.invisible_for)
            });
            if let Some(id) = hidden {
                if action == "DescribeInstances" && filtered_only {
                    return Some((200, no_reservations_xml()));
                }
                let message = format!("The instance ID '{id}' does not exist");
                return Some((400, error_xml("InvalidInstanceID.NotFound", &message)));
            }
        }
        let uses = !["Describe", "Create", "Import", "Delete"].iter().any(|p| action.starts_with(p));
        if self.timing.first_use_not_found && uses {
            if let Some(group) = group_ids(params).find(|g| self.fresh_groups.contains(*g)).cloned() {
                self.fresh_groups.remove(&group);
                let message = format!("The security group '{group}' does not exist");
                return Some((400, error_xml("InvalidGroup.NotFound", &message)));
            }
            let key = params.iter().find(|(k, v)| k == "KeyName" && self.fresh_key_pairs.contains(v));
            if let Some((_, key)) = key.cloned() {
                self.fresh_key_pairs.remove(&key);
                let message = format!("The key pair '{key}' does not exist");
                return Some((400, error_xml("InvalidKeyPair.NotFound", &message)));
            }
        }
        for id in &ids {
            let Some((transition, _)) = self.transition(id, now) else { continue };
            if transition.refuses(action) {
                let (state, _) = transition.state();
                let verb = if action == "StartInstances" { "started" } else { "stopped" };
                let message = format!("The instance '{id}' is not in a state from which it can be {verb} ({state}).");
                return Some((400, error_xml("IncorrectInstanceState", &message)));
            }
        }
        None
    }

    /// Notes what a successful moto answer created or changed, for the timing.
    fn record(&mut self, action: &str, params: &[(String, String)], response: &[u8]) {
        let now = Instant::now();
        let (ids, _) = instance_ids(params);
        match action {
            "RunInstances" => {
                let launched = element_texts(&response_body(response), "instanceId");
                for id in &launched {
                    self.launched.insert(id.clone(), now);
                }
                self.enter(launched, Transition::Pending, now);
            }
            "StartInstances" => self.enter(ids, Transition::Pending, now),
            "StopInstances" => self.enter(ids, Transition::Stopping, now),
            "TerminateInstances" => self.enter(ids, Transition::ShuttingDown, now),
            "CreateSecurityGroup" if self.timing.first_use_not_found => {
                self.fresh_groups.extend(element_texts(&response_body(response), "groupId"));
            }
            "ImportKeyPair" | "CreateKeyPair" if self.timing.first_use_not_found => {
                self.fresh_key_pairs.extend(params.iter().filter(|(k, _)| k == "KeyName").map(|(_, v)| v.clone()));
            }
            _ => {}
        }
    }

    fn enter(&mut self, ids: Vec<String>, transition: Transition, now: Instant) {
        for id in ids {
            let shutting_down = self.transitions.get(&id).is_some_and(|(t, _)| *t == Transition::ShuttingDown);
            // Shutting down starts with the first TerminateInstances, not a repeated one.
            if !(shutting_down && transition == Transition::ShuttingDown) {
                self.transitions.insert(id, (transition, now));
            }
        }
    }

    /// The transitional state `id` is in at `now`, if its while has not passed.
    fn transition(&self, id: &str, now: Instant) -> Option<(Transition, Instant)> {
        let (transition, since) = *self.transitions.get(id)?;
        (now.duration_since(since) < transition.lasts(&self.timing)).then_some((transition, since))
    }

    /// The state each instance in a transition shows now: `id -> (name, code)`.
    fn transitional_states(&self) -> HashMap<String, (&'static str, u16)> {
        let now = Instant::now();
        self.transitions.keys().filter_map(|id| Some((id.clone(), self.transition(id, now)?.0.state()))).collect()
    }
}

/// `xml` with the state of each instance in `states` replaced: the first
/// `<instanceState>` or `<currentState>` after its `<instanceId>` (and before the next
/// instance's), as moto orders DescribeInstances' items and the state changes of
/// StartInstances, StopInstances and TerminateInstances.
fn rewrite_states(xml: &str, states: &HashMap<String, (&'static str, u16)>) -> String {
    const ID: &str = "<instanceId>";
    let mut out = String::with_capacity(xml.len());
    let mut rest = xml;
    while let Some(start) = rest.find(ID) {
        let text = start + ID.len();
        let Some(length) = rest[text..].find("</instanceId>") else { break };
        let id = &rest[text..text + length];
        let from = text + length;
        let to = rest[from..].find(ID).map_or(rest.len(), |i| from + i);
        out.push_str(&rest[..from]);
        match states.get(id) {
            Some(&(name, code)) => out.push_str(&rewrite_state(&rest[from..to], name, code)),
            None => out.push_str(&rest[from..to]),
        }
        rest = &rest[to..];
    }
    out.push_str(rest);
    out
}

fn rewrite_state(part: &str, name: &str, code: u16) -> String {
    let first = ["instanceState", "currentState"]
        .into_iter()
        .filter_map(|element| part.find(&format!("<{element}>")).map(|at| (at, element)))
        .min();
    let Some((at, element)) = first else { return part.to_string() };
    let close = format!("</{element}>");
    let Some(end) = part[at..].find(&close) else { return part.to_string() };
    format!("{}<{element}><code>{code}</code><name>{name}</name>{}", &part[..at], &part[at + end..])
}

/// An HTTP response from moto with the text of each named XML element replaced, when it
/// is a success (errors pass unchanged), and its Content-Length set to match.
fn edit(response: &[u8], edits: &[(&str, String)]) -> Vec<u8> {
    edit_body(response, |mut body| {
        for (element, value) in edits {
            body = replace_text(&body, element, value);
        }
        body
    })
}

/// An HTTP response from moto with its body changed by `change`, when it is a success
/// (errors pass unchanged), and its Content-Length set to match.
fn edit_body(response: &[u8], change: impl FnOnce(String) -> String) -> Vec<u8> {
    let Some(head_end) = response.windows(4).position(|w| w == b"\r\n\r\n") else { return response.to_vec() };
    let head = String::from_utf8_lossy(&response[..head_end]);
    if !head.starts_with("HTTP/1.1 200") {
        return response.to_vec();
    }
    let body = change(String::from_utf8_lossy(&response[head_end + 4..]).into_owned());
    let mut out: String = head
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("content-length:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    out.into_bytes()
}

/// `xml` with the text of every `<element>...</element>` replaced by `value`.
fn replace_text(xml: &str, element: &str, value: &str) -> String {
    let (open, close) = (format!("<{element}>"), format!("</{element}>"));
    let mut out = String::with_capacity(xml.len());
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let text = start + open.len();
        let Some(end) = rest[text..].find(&close) else { break };
        out.push_str(&rest[..text]);
        out.push_str(value);
        rest = &rest[text + end..];
    }
    out.push_str(rest);
    out
}

/// Standard base64 with padding, as EC2 encodes console output (this crate has no
/// dependencies, and this is all it needs).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_pads_as_the_standard_says() {
        let cases =
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("ec2: \n", "ZWMyOiAK")];
        for (raw, encoded) in cases {
            assert_eq!(base64(raw.as_bytes()), encoded, "{raw:?}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
    }

    #[test]
    fn element_text_is_replaced_everywhere_and_empty_elements_stay() {
        let xml = "<a><ipAddress>54.1.2.3</ipAddress><privateIpAddress>10.0.0.1</privateIpAddress>\
                   <item><privateIpAddress>10.0.0.1</privateIpAddress></item><ipAddress/></a>";
        let edited = replace_text(&replace_text(xml, "ipAddress", "127.0.0.1"), "privateIpAddress", "127.0.0.1");
        assert_eq!(
            edited,
            "<a><ipAddress>127.0.0.1</ipAddress><privateIpAddress>127.0.0.1</privateIpAddress>\
             <item><privateIpAddress>127.0.0.1</privateIpAddress></item><ipAddress/></a>"
        );
    }

    #[test]
    fn query_parameters_are_decoded() {
        let params =
            parameters("Action=DescribeInstances&Filter.1.Name=tag%3Amachinist.dev%2Fmachine-uid&Filter.1.Value.1=a+b");
        assert_eq!(
            params,
            [
                ("Action".to_string(), "DescribeInstances".to_string()),
                ("Filter.1.Name".to_string(), "tag:machinist.dev/machine-uid".to_string()),
                ("Filter.1.Value.1".to_string(), "a b".to_string()),
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn instance_ids_come_from_parameters_and_instance_id_filters() {
        let named = parameters("Action=TerminateInstances&InstanceId.1=i-1&InstanceId.2=i-2");
        assert_eq!(instance_ids(&named), (vec!["i-1".to_string(), "i-2".to_string()], false));
        let console = parameters("Action=GetConsoleOutput&InstanceId=i-3");
        assert_eq!(instance_ids(&console), (vec!["i-3".to_string()], false));
        let filtered = parameters(
            "Action=DescribeInstances&Filter.1.Name=tag%3Ax&Filter.1.Value.1=i-9\
             &Filter.2.Name=instance-id&Filter.2.Value.1=i-4",
        );
        assert_eq!(instance_ids(&filtered), (vec!["i-4".to_string()], true));
    }

    #[test]
    fn a_new_instance_is_invisible_for_a_while_then_visible() {
        let mut state = FaultState {
            timing: Ec2Timing { invisible_for: Duration::from_secs(60), ..Default::default() },
            ..Default::default()
        };
        let launched = b"HTTP/1.1 200 OK\r\n\r\n<instancesSet><item><instanceId>i-1</instanceId></item></instancesSet>";
        state.record("RunInstances", &[], launched);
        let stop = parameters("Action=StopInstances&InstanceId.1=i-1");
        let (status, xml) = state.timing_answer("StopInstances", &stop).expect("hidden");
        assert_eq!(status, 400);
        assert!(xml.contains("<Code>InvalidInstanceID.NotFound</Code>"), "{xml}");
        let filtered = parameters("Action=DescribeInstances&Filter.1.Name=instance-id&Filter.1.Value.1=i-1");
        let (status, xml) = state.timing_answer("DescribeInstances", &filtered).expect("hidden");
        assert_eq!(status, 200);
        assert!(xml.contains("<reservationSet/>"), "{xml}");
        assert_eq!(state.timing_answer("StopInstances", &parameters("InstanceId.1=i-2")), None, "another id");
        state.launched.insert("i-1".into(), Instant::now() - Duration::from_secs(61));
        assert_eq!(state.timing_answer("StopInstances", &stop), None, "visible after the while");
    }

    #[test]
    fn a_fresh_group_or_key_pair_is_not_found_at_its_first_use_only() {
        let mut state =
            FaultState { timing: Ec2Timing { first_use_not_found: true, ..Default::default() }, ..Default::default() };
        state.record("CreateSecurityGroup", &[], b"HTTP/1.1 200 OK\r\n\r\n<groupId>sg-1</groupId>");
        state.record("ImportKeyPair", &parameters("KeyName=machinist-u"), b"HTTP/1.1 200 OK\r\n\r\n");
        let describe = parameters("GroupId.1=sg-1&KeyName=machinist-u");
        assert_eq!(state.timing_answer("DescribeSecurityGroups", &describe), None, "a Describe is no use");
        let run = parameters("SecurityGroupId.1=sg-1&KeyName=machinist-u");
        let (_, xml) = state.timing_answer("RunInstances", &run).unwrap();
        assert!(xml.contains("<Code>InvalidGroup.NotFound</Code>") && xml.contains("'sg-1'"), "{xml}");
        let (_, xml) = state.timing_answer("RunInstances", &run).unwrap();
        assert!(xml.contains("<Code>InvalidKeyPair.NotFound</Code>") && xml.contains("'machinist-u'"), "{xml}");
        assert_eq!(state.timing_answer("RunInstances", &run), None, "once each");
    }

    #[test]
    fn transitional_states_replace_moto_states_for_a_while() {
        let mut state = FaultState {
            timing: Ec2Timing { stopping_for: Duration::from_secs(60), ..Default::default() },
            ..Default::default()
        };
        state.record("StopInstances", &parameters("InstanceId.1=i-1"), b"HTTP/1.1 200 OK\r\n\r\n");
        let states = state.transitional_states();
        assert_eq!(states, HashMap::from([("i-1".to_string(), ("stopping", 64))]));
        // DescribeInstances: the state after the id; a state change: currentState, first.
        let describe = "<item><instanceId>i-0</instanceId><instanceState><code>16</code><name>running</name>\
                        </instanceState></item><item><groupSet><item><groupId>sg</groupId></item></groupSet>\
                        <instanceId>i-1</instanceId><imageId>ami</imageId><instanceState><code>80</code>\
                        <name>stopped</name></instanceState></item>";
        assert_eq!(
            rewrite_states(describe, &states),
            "<item><instanceId>i-0</instanceId><instanceState><code>16</code><name>running</name>\
             </instanceState></item><item><groupSet><item><groupId>sg</groupId></item></groupSet>\
             <instanceId>i-1</instanceId><imageId>ami</imageId><instanceState><code>64</code>\
             <name>stopping</name></instanceState></item>"
        );
        let change = "<item><instanceId>i-1</instanceId><currentState><code>80</code><name>stopped</name>\
                      </currentState><previousState><code>16</code><name>running</name></previousState></item>";
        assert!(rewrite_states(change, &states).contains(
            "<currentState><code>64</code><name>stopping</name></currentState><previousState><code>16</code>"
        ));
        // EC2 refuses to start an instance that is still stopping.
        let (_, xml) = state.timing_answer("StartInstances", &parameters("InstanceId.1=i-1")).unwrap();
        assert!(xml.contains("<Code>IncorrectInstanceState</Code>"), "{xml}");
        state.transitions.insert("i-1".into(), (Transition::Stopping, Instant::now() - Duration::from_secs(61)));
        assert!(state.transitional_states().is_empty());
        assert_eq!(state.timing_answer("StartInstances", &parameters("InstanceId.1=i-1")), None);
    }

    #[test]
    fn only_successful_answers_are_edited_and_their_length_follows() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: 35\r\n\r\n<x><publicIp>1.2.3.4</publicIp></x>";
        let edited = String::from_utf8(edit(ok, &[("publicIp", "127.0.0.1".into())])).unwrap();
        let body = "<x><publicIp>127.0.0.1</publicIp></x>";
        assert_eq!(
            edited,
            format!("HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        );
        let error = b"HTTP/1.1 400 BAD REQUEST\r\nContent-Length: 3\r\n\r\n<e>";
        assert_eq!(edit(error, &[("publicIp", "127.0.0.1".into())]), error.to_vec());
    }
}
