//! moto's EC2 API emulator for tests: `moto_server` on a free loopback port, one per
//! test (its state is the test's alone), killed when the `Moto` is dropped.
//!
//! `moto_server` comes from the Python package `moto[server]`, which `scripts/test.sh`
//! installs into `.venv` (see `requirements.txt` beside this crate). It is looked up in
//! `$MACHINIST_MOTO_SERVER`, then `<workspace>/.venv/bin/moto_server`, then `$PATH`.
//!
//! moto answers like EC2 with a few differences the tests keep in mind: instances are
//! `running` at the first look and `stopped` or `terminated` at once; it does not honour
//! `RunInstances` client tokens (but stores them); it deletes a security group still in
//! use; and it cannot be reached over SSH.

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
/// ([`rewrite_launch_time`](Self::rewrite_launch_time)). Everything else goes through to
/// moto unchanged.
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
    let action = body.split('&').find_map(|pair| pair.strip_prefix("Action=")).unwrap_or_default().to_string();
    let fault = {
        let mut state = state.lock().unwrap();
        state.seen.push(action.clone());
        let fault = state.faults.iter_mut().find(|f| f.action == action && f.remaining != Some(0));
        fault.map(|f| {
            if let Some(n) = f.remaining.as_mut() {
                *n -= 1;
            }
            (f.status, f.code.clone(), f.message.clone())
        })
    };
    if let Some((status, code, message)) = fault {
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
             <Message>{message}</Message></Error></Errors><RequestID>{FAULT_REQUEST_ID}</RequestID></Response>"
        );
        let response = format!(
            "HTTP/1.1 {status} Fault\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
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
    let edits = {
        let state = state.lock().unwrap();
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
        edits
    };
    if !edits.is_empty() {
        response = edit(&response, &edits);
    }
    client.write_all(&response)
}

/// An HTTP response from moto with the text of each named XML element replaced, when it
/// is a success (errors pass unchanged), and its Content-Length set to match.
fn edit(response: &[u8], edits: &[(&str, String)]) -> Vec<u8> {
    let Some(head_end) = response.windows(4).position(|w| w == b"\r\n\r\n") else { return response.to_vec() };
    let head = String::from_utf8_lossy(&response[..head_end]);
    if !head.starts_with("HTTP/1.1 200") {
        return response.to_vec();
    }
    let mut body = String::from_utf8_lossy(&response[head_end + 4..]).into_owned();
    for (element, value) in edits {
        body = replace_text(&body, element, value);
    }
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
