//! Connections and commands.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect, MethodKind};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};

use super::{SecretString, SshError, SshPrivateKey, SshStage};

/// How long a connection may take to answer, log in and run `true` when the caller does
/// not say ([`check_ready`](super::check_ready)).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most output kept per stream of one command: its end, where a failing command says
/// why. What comes before is read and dropped.
pub const MAX_OUTPUT_BYTES: usize = 1024 * 1024;

/// Keepalives, so a connection to a host that vanished (no FIN, no RST) ends on its own.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_MAX: usize = 3;

/// Where to log in: `user@host:port`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
}

impl SshTarget {
    pub fn new(host: impl Into<String>, port: u16, user: impl Into<String>) -> Self {
        SshTarget { host: host.into(), port, user: user.into() }
    }
}

impl From<crate::SshEndpoint> for SshTarget {
    fn from(endpoint: crate::SshEndpoint) -> Self {
        SshTarget { host: endpoint.host, port: endpoint.port, user: endpoint.user }
    }
}

impl fmt::Display for SshTarget {
    /// `user@host:port`, with an IPv6 address in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}@[{}]:{}", self.user, self.host, self.port)
        } else {
            write!(f, "{}@{}:{}", self.user, self.host, self.port)
        }
    }
}

/// How to log in: a private key, a password, or both (the key is offered first, then the
/// password, in the same connection). `Debug` never shows the secrets.
#[derive(Clone)]
pub struct SshAuth {
    key: Option<SshPrivateKey>,
    password: Option<SecretString>,
}

impl SshAuth {
    pub fn key(key: SshPrivateKey) -> Self {
        SshAuth { key: Some(key), password: None }
    }

    pub fn password(password: impl Into<SecretString>) -> Self {
        SshAuth { key: None, password: Some(password.into()) }
    }

    /// Offers the key, then the password.
    pub fn key_then_password(key: SshPrivateKey, password: impl Into<SecretString>) -> Self {
        SshAuth { key: Some(key), password: Some(password.into()) }
    }

    /// What is offered, for messages: `private key SHA256:...`, `password`, or both.
    pub fn describe(&self) -> String {
        match (&self.key, &self.password) {
            (Some(key), None) => format!("private key {}", key.fingerprint()),
            (None, Some(_)) => "password".to_string(),
            (Some(key), Some(_)) => format!("private key {} and password", key.fingerprint()),
            (None, None) => "no credentials".to_string(),
        }
    }
}

impl fmt::Debug for SshAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshAuth").field("key", &self.key).field("password", &self.password).finish()
    }
}

/// What a command did. `exit_status` is the command's exit status; a command killed by a
/// signal has `exit_signal` set and `exit_status` 255 (as the `ssh` client reports it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandOutput {
    pub exit_status: u32,
    pub exit_signal: Option<String>,
    /// The last [`MAX_OUTPUT_BYTES`] at most.
    pub stdout: Vec<u8>,
    /// The last [`MAX_OUTPUT_BYTES`] at most.
    pub stderr: Vec<u8>,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.exit_status == 0 && self.exit_signal.is_none()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// `exit status N` or `killed by signal X`, then the end of stderr: for error messages.
    pub fn describe_failure(&self) -> String {
        let how = match &self.exit_signal {
            Some(signal) => format!("killed by signal {signal}"),
            None => format!("exit status {}", self.exit_status),
        };
        let stderr = self.stderr_text();
        let stderr = stderr.trim();
        if stderr.is_empty() { how } else { format!("{how}: {}", tail(stderr, 500)) }
    }
}

/// The last `max` characters of `text`, on a character boundary.
fn tail(text: &str, max: usize) -> &str {
    let count = text.chars().count();
    if count <= max {
        return text;
    }
    let (start, _) = text.char_indices().nth(count - max).unwrap_or((0, ' '));
    &text[start..]
}

/// An SSH session, logged in. Close it with [`close`](Self::close); dropping it ends the
/// connection too, without a goodbye to the server.
pub struct SshSession {
    handle: Handle<HostKeyCheck>,
    target: SshTarget,
    host_key_fingerprint: String,
}

impl fmt::Debug for SshSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshSession")
            .field("target", &self.target)
            .field("host_key_fingerprint", &self.host_key_fingerprint)
            .finish_non_exhaustive()
    }
}

/// Connects to `target`, checks its host key and logs in with `auth`.
///
/// `trusted` holds the host key fingerprints (`SHA256:...`) the host may present: a host
/// presenting any other key is disconnected right after the key exchange, before any
/// credential is offered ([`SshError::HostKeyMismatch`]). Empty: any key is accepted
/// (first contact) and [`SshSession::host_key_fingerprint`] tells which, so the caller
/// can pin it.
///
/// `connect_timeout` bounds the TCP connection and key exchange, and then again the
/// login.
pub async fn connect(
    target: &SshTarget,
    auth: &SshAuth,
    trusted: &[String],
    connect_timeout: Duration,
) -> Result<SshSession, SshError> {
    let name = target.to_string();
    let deadline = Instant::now() + connect_timeout;
    let connect_timed_out =
        || SshError::Timeout { target: name.clone(), stage: SshStage::Connect, after: connect_timeout, command: None };

    let stream =
        timeout_at(deadline, tcp_connect(target, &name, connect_timeout)).await.map_err(|_| connect_timed_out())??;
    let _ = stream.set_nodelay(true);

    let seen = Arc::new(Mutex::new(None));
    let check = HostKeyCheck {
        target: name.clone(),
        trusted: trusted.iter().map(|t| t.trim()).filter(|t| !t.is_empty()).map(str::to_string).collect(),
        seen: Arc::clone(&seen),
    };
    let config = Arc::new(client::Config {
        keepalive_interval: Some(KEEPALIVE_INTERVAL),
        keepalive_max: KEEPALIVE_MAX,
        nodelay: true,
        ..client::Config::default()
    });
    let mut handle = match timeout_at(deadline, client::connect_stream(config, stream, check)).await {
        Err(_) => return Err(connect_timed_out()),
        Ok(Err(HandlerError::HostKeyMismatch(error))) => return Err(error),
        Ok(Err(HandlerError::Ssh(error))) => return Err(map_russh(error, &name, SshStage::Connect)),
        Ok(Ok(handle)) => handle,
    };
    let host_key_fingerprint = seen
        .lock()
        .map_err(|_| SshError::Protocol(format!("{name}: host key check failed")))?
        .clone()
        .ok_or_else(|| SshError::Protocol(format!("{name}: the server never showed a host key")))?;

    match timeout(connect_timeout, authenticate(&mut handle, target, auth, &name)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            disconnect(&handle).await;
            return Err(error);
        }
        Err(_) => {
            disconnect(&handle).await;
            return Err(SshError::Timeout {
                target: name,
                stage: SshStage::Auth,
                after: connect_timeout,
                command: None,
            });
        }
    }
    tracing::debug!(ssh = %name, host_key = %host_key_fingerprint, "ssh session open");
    Ok(SshSession { handle, target: target.clone(), host_key_fingerprint })
}

/// Connects, logs in and runs `true` (a no-op), then closes the session: whether the
/// host answers SSH and accepts the login. Returns the host key fingerprint seen.
/// Bounded by [`DEFAULT_CONNECT_TIMEOUT`] for the connection, again for the login and
/// again for the command.
pub async fn check_ready(target: &SshTarget, auth: &SshAuth, trusted: &[String]) -> Result<String, SshError> {
    check_ready_within(target, auth, trusted, DEFAULT_CONNECT_TIMEOUT).await
}

/// [`check_ready`] with another timeout for each step.
pub async fn check_ready_within(
    target: &SshTarget,
    auth: &SshAuth,
    trusted: &[String],
    step_timeout: Duration,
) -> Result<String, SshError> {
    let session = connect(target, auth, trusted, step_timeout).await?;
    let result = session.run("true", None, step_timeout).await;
    let fingerprint = session.host_key_fingerprint().to_string();
    session.close().await;
    let output = result?;
    if output.success() {
        Ok(fingerprint)
    } else {
        Err(SshError::Protocol(format!(
            "{target}: logged in, but the no-op command `true` failed ({}); the account may have no usable shell \
             or a forced command",
            output.describe_failure()
        )))
    }
}

impl SshSession {
    /// The host key's fingerprint, `SHA256:...` as `ssh-keygen -lf` prints it.
    pub fn host_key_fingerprint(&self) -> &str {
        &self.host_key_fingerprint
    }

    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    /// Whether the connection has ended (closed by either side, or lost).
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Runs `command` through the login shell, feeding it `stdin` (then end of file), and
    /// collects its exit status and output. Fails with [`SshError::Timeout`] when it has
    /// not finished after `timeout`, and [`SshError::ConnectionLost`] when the connection
    /// ends first. A non-zero exit status is not an error: look at
    /// [`CommandOutput::exit_status`].
    pub async fn run(&self, command: &str, stdin: Option<&[u8]>, timeout: Duration) -> Result<CommandOutput, SshError> {
        match tokio::time::timeout(timeout, self.run_inner(command, stdin)).await {
            Ok(result) => result,
            Err(_) => Err(SshError::Timeout {
                target: self.target.to_string(),
                stage: SshStage::Command,
                after: timeout,
                command: Some(shorten(command)),
            }),
        }
    }

    async fn run_inner(&self, command: &str, stdin: Option<&[u8]>) -> Result<CommandOutput, SshError> {
        let name = self.target.to_string();
        let lost = |e: russh::Error| map_russh(e, &name, SshStage::Command);
        let channel = self.handle.channel_open_session().await.map_err(lost)?;
        channel.exec(true, command).await.map_err(lost)?;
        let (mut reader, writer) = channel.split();

        let send = async {
            if let Some(input) = stdin {
                writer.data(input).await?;
            }
            writer.eof().await
        };
        let receive = async {
            let mut output = CommandOutput::default();
            let mut exit: Option<(u32, Option<String>)> = None;
            while let Some(message) = reader.wait().await {
                match message {
                    ChannelMsg::Data { data } => append(&mut output.stdout, &data),
                    ChannelMsg::ExtendedData { data, ext: 1 } => append(&mut output.stderr, &data),
                    ChannelMsg::ExitStatus { exit_status } => exit = Some((exit_status, None)),
                    ChannelMsg::ExitSignal { signal_name, .. } => exit = Some((255, Some(format!("{signal_name:?}")))),
                    ChannelMsg::Failure => {
                        return Err(SshError::Protocol(format!(
                            "{name}: the server refused to run the command `{}`",
                            shorten(command)
                        )));
                    }
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            keep_tail(&mut output.stdout, MAX_OUTPUT_BYTES);
            keep_tail(&mut output.stderr, MAX_OUTPUT_BYTES);
            match exit {
                Some((status, signal)) => {
                    output.exit_status = status;
                    output.exit_signal = signal;
                    Ok(output)
                }
                None => Err(SshError::ConnectionLost {
                    target: name.clone(),
                    stage: SshStage::Command,
                    message: format!("`{}` ended without an exit status", shorten(command)),
                }),
            }
        };
        let (sent, received) = tokio::join!(send, receive);
        let output = received?;
        // The command may exit without reading its input; that is its business.
        if let Err(error) = sent {
            tracing::debug!(ssh = %name, %error, "ssh: the command did not take all of its input");
        }
        Ok(output)
    }

    /// Says goodbye to the server and ends the connection.
    pub async fn close(self) {
        disconnect(&self.handle).await;
    }
}

async fn disconnect(handle: &Handle<HostKeyCheck>) {
    if !handle.is_closed() {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            handle.disconnect(Disconnect::ByApplication, "machinist is done", "en"),
        )
        .await;
    }
}

/// Adds `data`, dropping the start of the buffer when it grows past twice the limit (in
/// batches, so a chatty command costs linear time).
fn append(buffer: &mut Vec<u8>, data: &[u8]) {
    buffer.extend_from_slice(data);
    if buffer.len() > 2 * MAX_OUTPUT_BYTES {
        keep_tail(buffer, MAX_OUTPUT_BYTES);
    }
}

fn keep_tail(buffer: &mut Vec<u8>, max: usize) {
    if buffer.len() > max {
        buffer.drain(..buffer.len() - max);
    }
}

/// A command for messages: its first line, at most 80 characters.
fn shorten(command: &str) -> String {
    let first = command.lines().next().unwrap_or_default();
    let mut short: String = first.chars().take(80).collect();
    if short.len() < command.len() {
        short.push('…');
    }
    short
}

async fn tcp_connect(target: &SshTarget, name: &str, connect_timeout: Duration) -> Result<TcpStream, SshError> {
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| SshError::Unreachable {
            target: name.to_string(),
            message: format!("cannot resolve {:?}: {e}; check the address", target.host),
        })?
        .collect();
    let mut last = None;
    for address in addresses {
        match TcpStream::connect(address).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(map_io(e, name, connect_timeout)),
        }
    }
    Err(last.unwrap_or_else(|| SshError::Unreachable {
        target: name.to_string(),
        message: format!("{:?} resolves to no address", target.host),
    }))
}

/// An I/O error while connecting; `after` is the time allowed.
fn map_io(error: io::Error, name: &str, after: Duration) -> SshError {
    let target = name.to_string();
    match error.kind() {
        io::ErrorKind::ConnectionRefused => SshError::ConnectionRefused { target },
        io::ErrorKind::TimedOut => SshError::Timeout { target, stage: SshStage::Connect, after, command: None },
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => {
            SshError::ConnectionLost { target, stage: SshStage::Connect, message: error.to_string() }
        }
        _ => SshError::Unreachable { target, message: error.to_string() },
    }
}

fn map_russh(error: russh::Error, name: &str, stage: SshStage) -> SshError {
    let target = name.to_string();
    match error {
        // Once the TCP connection is up, any I/O failure is a lost connection.
        russh::Error::IO(e) => SshError::ConnectionLost { target, stage, message: e.to_string() },
        russh::Error::Disconnect
        | russh::Error::HUP
        | russh::Error::SendError
        | russh::Error::RecvError
        | russh::Error::KeepaliveTimeout
        | russh::Error::InactivityTimeout
        | russh::Error::ConnectionTimeout => SshError::ConnectionLost { target, stage, message: error.to_string() },
        russh::Error::Version => {
            SshError::Protocol(format!("{name}: the server does not speak SSH (no SSH version line); check the port"))
        }
        russh::Error::NoCommonAlgo { kind, theirs, .. } => SshError::Protocol(format!(
            "{name}: no {kind:?} algorithm in common with the server (it offers: {})",
            theirs.join(", ")
        )),
        other => SshError::Protocol(format!("{name}: {other} while {stage}")),
    }
}

async fn authenticate(
    handle: &mut Handle<HostKeyCheck>,
    target: &SshTarget,
    auth: &SshAuth,
    name: &str,
) -> Result<(), SshError> {
    let lost = |e: russh::Error| map_russh(e, name, SshStage::Auth);
    let names = |methods: &russh::MethodSet| -> Vec<&'static str> { methods.iter().map(<&str>::from).collect() };
    let mut accepted: Vec<&'static str> = Vec::new();
    if let Some(key) = &auth.key {
        // RSA signs with SHA-2 where the server says it can (OpenSSH refuses SHA-1).
        let hash = if key.is_rsa() {
            handle.best_supported_rsa_hash().await.map_err(lost)?.flatten().or(Some(HashAlg::Sha256))
        } else {
            None
        };
        let key = PrivateKeyWithHashAlg::new(key.inner(), hash);
        match handle.authenticate_publickey(target.user.clone(), key).await.map_err(lost)? {
            client::AuthResult::Success => return Ok(()),
            client::AuthResult::Failure { remaining_methods, .. } => accepted = names(&remaining_methods),
        }
    }
    if let Some(password) = &auth.password {
        let offered = accepted.is_empty() || accepted.contains(&<&str>::from(&MethodKind::Password));
        if offered {
            match handle.authenticate_password(target.user.clone(), password.expose()).await.map_err(lost)? {
                client::AuthResult::Success => return Ok(()),
                client::AuthResult::Failure { remaining_methods, .. } => accepted = names(&remaining_methods),
            }
        }
    }
    // russh reports a connection that ended during the login as a failed login.
    if handle.is_closed() {
        return Err(SshError::ConnectionLost {
            target: name.to_string(),
            stage: SshStage::Auth,
            message: "the server closed the connection".to_string(),
        });
    }
    Err(SshError::AuthFailed {
        target: name.to_string(),
        user: target.user.clone(),
        method: auth.describe(),
        accepted: if accepted.is_empty() { "nothing more".to_string() } else { accepted.join(", ") },
    })
}

/// Checks the server's host key against the trusted fingerprints and records the one seen.
struct HostKeyCheck {
    target: String,
    /// Empty: first contact, any key.
    trusted: Vec<String>,
    seen: Arc<Mutex<Option<String>>>,
}

#[derive(Debug)]
enum HandlerError {
    Ssh(russh::Error),
    HostKeyMismatch(SshError),
}

impl From<russh::Error> for HandlerError {
    fn from(error: russh::Error) -> Self {
        HandlerError::Ssh(error)
    }
}

impl client::Handler for HostKeyCheck {
    type Error = HandlerError;

    async fn check_server_key(&mut self, server_key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let found = match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => super::fingerprint(key),
            PublicKeyOrCertificate::Certificate(certificate) => {
                certificate.public_key().fingerprint(HashAlg::Sha256).to_string()
            }
        };
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(found.clone());
        }
        if self.trusted.is_empty() || self.trusted.contains(&found) {
            return Ok(true);
        }
        let trusted = self.trusted.join(" or ");
        tracing::warn!(ssh = %self.target, %trusted, %found, "ssh: host key mismatch, disconnecting before login");
        // russh disconnects as soon as this check fails: before the first
        // authentication request.
        Err(HandlerError::HostKeyMismatch(SshError::HostKeyMismatch {
            target: self.target.clone(),
            trusted: self.trusted.clone(),
            found,
        }))
    }
}
