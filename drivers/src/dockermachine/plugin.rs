//! One running Docker Machine plugin process: started with the token, reached at the
//! address it prints, kept alive by heartbeats, and always ended (Close, then a kill of
//! its whole process group), so no call hangs a worker and no process is left behind.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::gob::{Type, Value};
use super::rpc::{RpcClient, RpcError};

/// docker-machine's heartbeat interval; plugins exit after about 10 s without one.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// How long a plugin may take to print its address (docker-machine's own bound).
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How many of the plugin's last stderr lines an error quotes, and how long each may be.
const TAIL_LINES: usize = 15;
const TAIL_LINE_CHARS: usize = 300;

/// The plugin API version machinist speaks (libmachine's `version.APIVersion`).
pub const API_VERSION: i64 = 1;

/// What went wrong with a plugin, beyond the driver's own answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// The driver's error string, as the plugin returned it.
    #[error("{0}")]
    Remote(String),
    /// The binary is not a plugin machinist can speak to: it printed no address, answered
    /// CONNECT or gob wrongly, or speaks another plugin API version. Retrying the same
    /// binary cannot help.
    #[error("{0}")]
    Protocol(String),
    /// The plugin could not be started, died, or did not answer in time (it was killed).
    #[error("{0}")]
    Failed(String),
}

/// The empty struct most calls take and answer.
pub fn empty() -> (Type, Value) {
    (Type::structure("struct {}", &[]), Value::Struct(Vec::new()))
}

/// The last lines a plugin wrote to stderr, with secrets masked.
#[derive(Debug, Default)]
struct Tail {
    lines: VecDeque<String>,
}

/// Masks secret values (the credentials the plugin was given) in its output.
#[derive(Clone, Debug, Default)]
pub struct Redactor(Arc<Vec<String>>);

impl Redactor {
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        // Very short values would mask ordinary words, and are no secret worth the name.
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| s.len() >= 4).collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Redactor(Arc::new(secrets))
    }

    pub fn apply(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in self.0.iter() {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "<redacted>");
            }
        }
        out
    }
}

/// A started plugin. Dropping it kills the process group at once; [`Plugin::close`]
/// ends it politely first.
pub struct Plugin {
    label: String,
    child: Mutex<Child>,
    /// The process group the plugin leads (its pid): a kill reaches what it started too.
    pgid: Option<i32>,
    rpc: Arc<RpcClient>,
    service: &'static str,
    tail: Arc<Mutex<Tail>>,
    stderr_done: Mutex<Option<tokio::task::JoinHandle<()>>>,
    heartbeat: tokio::task::JoinHandle<()>,
    redactor: Redactor,
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.heartbeat.abort();
        self.kill();
    }
}

impl Plugin {
    /// Starts `binary` in `dir` (its working and home directory) with only `PATH`,
    /// `HOME`, `TMPDIR` (`dir`'s parent), the plugin token and the driver's name in its
    /// environment, and connects to it. The name lets the docker-machine binary itself
    /// (linked as `docker-machine-driver-<name>`) serve its built-in drivers.
    pub async fn start(binary: &Path, driver: &str, dir: &Path, redactor: Redactor) -> Result<Plugin, PluginError> {
        let label = binary.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut command = Command::new(binary);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()))
            .env("HOME", dir)
            // Beside the store directory, so temporary files are not saved with it (and
            // /tmp may be read-only in a pod).
            .env("TMPDIR", dir.parent().unwrap_or(dir))
            .env("MACHINE_PLUGIN_TOKEN", "42")
            .env("MACHINE_PLUGIN_DRIVER_NAME", driver)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        // SAFETY: only async-signal-safe calls between fork and exec. The plugin dies with
        // machinist, should machinist die without closing it (a crash, a SIGKILL),
        // instead of living on until its heartbeat timeout.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child =
            command.spawn().map_err(|e| PluginError::Failed(format!("cannot start {}: {e}", binary.display())))?;
        let pgid = child.id().and_then(|pid| i32::try_from(pid).ok());
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");

        let tail = Arc::new(Mutex::new(Tail::default()));
        let stderr_done = tokio::spawn(collect_stderr(stderr, tail.clone(), label.clone(), redactor.clone()));
        let mut plugin_stdout = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(START_TIMEOUT, plugin_stdout.next_line()).await;
        // Later stdout lines are the plugin's info log.
        let log_label = label.clone();
        let log_redactor = redactor.clone();

        let started = Started { label: &label, tail: &tail };
        let line = match first {
            Err(_) => {
                kill_group(pgid);
                return Err(PluginError::Failed(started.describe(
                    &format!("did not print its address within {}s; killed", START_TIMEOUT.as_secs()),
                    None,
                )));
            }
            Ok(Err(e)) => return Err(PluginError::Failed(started.describe(&format!("stdout: {e}"), None))),
            Ok(Ok(None)) => {
                let status = exit_status(&mut child).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), stderr_done).await;
                return Err(PluginError::Protocol(
                    started.describe("exited before printing its address (is it a Docker Machine plugin?)", status),
                ));
            }
            Ok(Ok(Some(line))) => line,
        };
        tokio::spawn(async move {
            while let Ok(Some(line)) = plugin_stdout.next_line().await {
                tracing::debug!(plugin = %log_label, "{}", log_redactor.apply(&line));
            }
        });
        let addr: SocketAddr = match line.trim().parse() {
            Ok(addr) => addr,
            Err(_) => {
                kill_group(pgid);
                return Err(PluginError::Protocol(started.describe(
                    &format!(
                        "printed {:?} where a Docker Machine plugin prints its address",
                        truncate(&redactor.apply(&line), 120)
                    ),
                    None,
                )));
            }
        };
        if !addr.ip().is_loopback() {
            kill_group(pgid);
            return Err(PluginError::Protocol(format!("{label} listens on {addr}, not on loopback; refused")));
        }
        let rpc = match RpcClient::connect(addr).await {
            Ok(rpc) => Arc::new(rpc),
            Err(e) => {
                kill_group(pgid);
                return Err(PluginError::Protocol(started.describe(&e.to_string(), None)));
            }
        };

        let heartbeat = tokio::spawn({
            let rpc = rpc.clone();
            async move {
                let (ty, arg) = empty();
                loop {
                    tokio::time::sleep(HEARTBEAT_INTERVAL).await;
                    // A plugin that misses one dies; the next call says so.
                    let _ = tokio::time::timeout(HEARTBEAT_INTERVAL, rpc.call("RPCServerDriver.Heartbeat", &ty, &arg))
                        .await;
                }
            }
        });
        let mut plugin = Plugin {
            label,
            child: Mutex::new(child),
            pgid,
            rpc,
            service: "RPCServerDriver",
            tail,
            stderr_done: Mutex::new(None),
            heartbeat,
            redactor,
        };
        plugin.negotiate().await?;
        Ok(plugin)
    }

    /// GetVersion, falling back to the service name of plugins before docker-machine 0.5.1.
    async fn negotiate(&mut self) -> Result<(), PluginError> {
        let (ty, arg) = empty();
        let version = match self.call("GetVersion", &ty, &arg, START_TIMEOUT).await {
            Err(PluginError::Remote(message)) if message.contains("can't find service") => {
                self.service = "RpcServerDriver";
                self.call("GetVersion", &ty, &arg, START_TIMEOUT).await?
            }
            other => other?,
        };
        match version.as_i64() {
            Some(API_VERSION) => Ok(()),
            other => Err(PluginError::Protocol(format!(
                "{} speaks plugin API version {}; machinist speaks version {API_VERSION}",
                self.label,
                other.map(|v| v.to_string()).unwrap_or_else(|| format!("{version:?}"))
            ))),
        }
    }

    /// Calls `RPCServerDriver.<method>`, bounded by `timeout`: a plugin that does not
    /// answer in time is killed.
    pub async fn call(&self, method: &str, ty: &Type, arg: &Value, timeout: Duration) -> Result<Value, PluginError> {
        let full = format!("{}.{method}", self.service);
        match tokio::time::timeout(timeout, self.rpc.call(&full, ty, arg)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(RpcError::Remote(message))) => Err(PluginError::Remote(self.redactor.apply(&message))),
            Ok(Err(RpcError::Connection(message))) => {
                let status = {
                    // Give a dying plugin a moment to be reaped, for its exit status.
                    let mut waited = None;
                    for _ in 0..20 {
                        if let Ok(Some(status)) = self.child.lock().unwrap().try_wait() {
                            waited = Some(status);
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    waited
                };
                self.kill();
                self.await_stderr().await;
                Err(PluginError::Failed(self.describe(&format!("{method}: {message}"), status)))
            }
            Err(_) => {
                self.kill();
                self.await_stderr().await;
                Err(PluginError::Failed(self.describe(
                    &format!("{method} did not answer within {}s; the plugin was killed", timeout.as_secs()),
                    None,
                )))
            }
        }
    }

    /// A call given up at `timeout` without killing the plugin (its late reply is
    /// dropped): for asking how another call is getting on. `None` when it gave up.
    pub async fn call_or_give_up(
        &self,
        method: &str,
        ty: &Type,
        arg: &Value,
        timeout: Duration,
    ) -> Option<Result<Value, PluginError>> {
        let full = format!("{}.{method}", self.service);
        match tokio::time::timeout(timeout, self.rpc.call(&full, ty, arg)).await {
            Err(_) => None,
            Ok(Ok(value)) => Some(Ok(value)),
            Ok(Err(RpcError::Remote(message))) => Some(Err(PluginError::Remote(self.redactor.apply(&message)))),
            Ok(Err(RpcError::Connection(message))) => Some(Err(PluginError::Failed(message))),
        }
    }

    /// Ends the plugin: Close (whose reply may race its exit), then a kill if it lingers.
    pub async fn close(self) {
        let (ty, arg) = empty();
        let method = format!("{}.Close", self.service);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.rpc.call(&method, &ty, &arg)).await;
        for _ in 0..40 {
            if !matches!(self.child.lock().unwrap().try_wait(), Ok(None)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Drop kills what is left.
    }

    fn kill(&self) {
        let mut child = self.child.lock().unwrap();
        if matches!(child.try_wait(), Ok(None)) {
            // Not yet reaped: the pid, and so the group id, is still this plugin's.
            kill_group(self.pgid);
            let _ = child.start_kill();
        }
    }

    async fn await_stderr(&self) {
        let handle = self.stderr_done.lock().unwrap().take();
        if let Some(handle) = handle {
            let _ = tokio::time::timeout(Duration::from_secs(1), handle).await;
        }
    }

    fn describe(&self, what: &str, status: Option<std::process::ExitStatus>) -> String {
        Started { label: &self.label, tail: &self.tail }.describe(what, status)
    }
}

struct Started<'a> {
    label: &'a str,
    tail: &'a Mutex<Tail>,
}

impl Started<'_> {
    /// "plugin X <what> (exit status): <its last stderr lines>".
    fn describe(&self, what: &str, status: Option<std::process::ExitStatus>) -> String {
        let mut out = format!("plugin {} {what}", self.label);
        if let Some(status) = status {
            out.push_str(&format!(" ({status})"));
        }
        let tail = self.tail.lock().unwrap();
        if tail.lines.is_empty() {
            out.push_str("; it wrote nothing to stderr");
        } else {
            out.push_str("; its last stderr lines:\n");
            out.push_str(&tail.lines.iter().cloned().collect::<Vec<_>>().join("\n"));
        }
        out
    }
}

async fn collect_stderr(
    stderr: tokio::process::ChildStderr,
    tail: Arc<Mutex<Tail>>,
    label: String,
    redactor: Redactor,
) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = redactor.apply(&line);
        tracing::debug!(plugin = %label, "{line}");
        let mut tail = tail.lock().unwrap();
        if tail.lines.len() == TAIL_LINES {
            tail.lines.pop_front();
        }
        tail.lines.push_back(truncate(&line, TAIL_LINE_CHARS));
    }
}

async fn exit_status(child: &mut Child) -> Option<std::process::ExitStatus> {
    tokio::time::timeout(Duration::from_secs(2), child.wait()).await.ok().and_then(Result::ok)
}

fn kill_group(pgid: Option<i32>) {
    if let Some(pgid) = pgid.filter(|p| *p > 0) {
        // SAFETY: killpg has no memory effects; the group is the plugin's own.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max).collect();
    out.push('…');
    out
}
