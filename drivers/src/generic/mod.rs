//! The generic driver: an existing host reached over SSH, as Docker Machine's `generic`
//! driver. "Creating" the instance means making sure the host answers SSH with the
//! bootstrap credentials (`spec.credentialsSecretRef`) and installing the Machine's SSH
//! key in the user's `~/.ssh/authorized_keys`, tagged `machinist:<machine-uid>`;
//! removing it takes exactly that line out again and leaves the host alone.
//!
//! machinist has no power control over such a host: Start, Stop and Kill are not
//! supported; Restart runs the configured reboot command and waits for SSH to come back.
//!
//! Every bootstrap login checks the host key first: against
//! `spec.driver.generic.hostKeyFingerprint` when set, else against the Machine's pinned
//! key ([`MachineRef::trusted_host_keys`]). Before anything is pinned, the first contact
//! is trusted and every later connection of the same driver is held to that key, which
//! the controller then pins ([`Driver::first_contact_host_key`]).

pub mod authorized_keys;
mod config;

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

pub use config::{
    DEFAULT_PORT, DEFAULT_REBOOT_COMMAND, DEFAULT_RESTART_TIMEOUT_SECONDS, DEFAULT_USER, GenericConfig,
    MAX_RESTART_TIMEOUT_SECONDS, MIN_RESTART_TIMEOUT_SECONDS,
};

use crate::ssh::{self, CommandOutput, SecretString, SshAuth, SshError, SshPrivateKey, SshSession, SshTarget};
use crate::{
    Address, AddressType, CREDENTIALS_FIELD, CreateRequest, Credentials, Driver, DriverError, Instance, MachineRef,
    Operation, Removal, SshEndpoint, State,
};

/// The `credentialsSecretRef` key holding the bootstrap private key (as in a
/// `kubernetes.io/ssh-auth` Secret).
pub const PRIVATE_KEY_KEY: &str = "ssh-privatekey";
/// The `credentialsSecretRef` key holding the bootstrap password.
pub const PASSWORD_KEY: &str = "password";

/// Connecting (and again logging in) for Create, Remove, find and Restart.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Connecting, logging in and running `true` for Status, each: Status must stay fast.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// One of the key scripts.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
/// The reboot command itself (it normally returns at once, or the connection drops).
const REBOOT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Restart's polling for SSH: first delay and cap (doubling in between).
const POLL_FIRST: Duration = Duration::from_secs(1);
const POLL_MAX: Duration = Duration::from_secs(10);

/// The generic driver bound to one Machine.
pub struct GenericDriver {
    machine: MachineRef,
    config: GenericConfig,
    auth: SshAuth,
    target: SshTarget,
    tag: String,
    /// The host keys a login accepts; empty before anything is pinned.
    trusted: Vec<String>,
    /// The key seen at this driver's first contact, when nothing was trusted before.
    first_contact: Mutex<Option<String>>,
}

impl GenericDriver {
    /// Validates the config and the bootstrap credentials (`ssh-privatekey` and/or
    /// `password`), before any connection.
    pub fn new(machine: MachineRef, config: GenericConfig, credentials: &Credentials) -> Result<Self, DriverError> {
        config.validate()?;
        if !authorized_keys::valid_uid(&machine.uid) {
            return Err(DriverError::invalid_config(
                "metadata.uid",
                format!("{:?} is not a Kubernetes UID; the generic driver tags its key with it", machine.uid),
            ));
        }
        let auth = bootstrap_auth(credentials)?;
        let target = SshTarget::new(config.address.clone(), config.port(), config.user());
        let tag = authorized_keys::tag(&machine.uid);
        // The spec's fingerprint is the user's own word and wins over the pin.
        let trusted = match &config.host_key_fingerprint {
            Some(fingerprint) => vec![fingerprint.clone()],
            None => machine.trusted_host_keys.clone(),
        };
        Ok(GenericDriver { machine, config, auth, target, tag, trusted, first_contact: Mutex::new(None) })
    }

    /// `generic://user@address:port`: the same for the same host, whoever asks.
    pub fn instance_id(&self) -> String {
        format!("generic://{}", self.target)
    }

    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    /// The keys this connection must see: the trusted ones, else the one of this driver's
    /// first contact, else none (this is the first contact).
    fn trusted(&self) -> Vec<String> {
        if !self.trusted.is_empty() {
            return self.trusted.clone();
        }
        self.first_contact.lock().map(|seen| seen.iter().cloned().collect()).unwrap_or_default()
    }

    fn remember_first_contact(&self, fingerprint: &str) {
        if let Ok(mut seen) = self.first_contact.lock()
            && self.trusted.is_empty()
            && seen.is_none()
        {
            tracing::info!(ssh = %self.target, host_key = fingerprint, "generic: first contact, host key trusted");
            *seen = Some(fingerprint.to_string());
        }
    }

    fn driver_error(&self, error: &SshError) -> DriverError {
        error.to_driver_error(CREDENTIALS_FIELD)
    }

    async fn session(&self, timeout: Duration) -> Result<SshSession, SshError> {
        let session = ssh::connect(&self.target, &self.auth, &self.trusted(), timeout).await?;
        self.remember_first_contact(session.host_key_fingerprint());
        Ok(session)
    }

    /// Runs one of the `authorized_keys` scripts; a failure is Transient with its stderr.
    async fn script(&self, session: &SshSession, what: &str, script: &str) -> Result<CommandOutput, DriverError> {
        let output = session
            .run(authorized_keys::RUN_SCRIPT, Some(script.as_bytes()), SCRIPT_TIMEOUT)
            .await
            .map_err(|e| self.driver_error(&e))?;
        if output.success() {
            Ok(output)
        } else {
            Err(DriverError::transient(format!(
                "{what} in ~/.ssh/authorized_keys of {} failed ({})",
                self.target,
                output.describe_failure()
            )))
        }
    }

    /// Connects with the bootstrap credentials, runs `script`, closes.
    async fn with_script(&self, what: &str, script: &str) -> Result<CommandOutput, DriverError> {
        let session = self.session(CONNECT_TIMEOUT).await.map_err(|e| self.driver_error(&e))?;
        let result = self.script(&session, what, script).await;
        session.close().await;
        result
    }

    async fn boot_id(&self, session: &SshSession) -> Option<String> {
        let output =
            session.run(authorized_keys::RUN_SCRIPT, Some(authorized_keys::BOOT_ID_SCRIPT.as_bytes()), STATUS_TIMEOUT);
        match output.await {
            Ok(output) if output.success() => Some(output.stdout_text().trim().to_string()).filter(|s| !s.is_empty()),
            _ => None,
        }
    }

    fn not_supported(operation: Operation, verb: &str) -> DriverError {
        DriverError::NotSupported {
            operation,
            message: format!(
                "the generic driver manages an existing host and cannot power it {verb}; do that by other means \
                 (set powerState to match, or use restartRequest, which runs rebootCommand)"
            ),
        }
    }
}

/// The login from `credentialsSecretRef`: the key, the password, or both.
fn bootstrap_auth(credentials: &Credentials) -> Result<SshAuth, DriverError> {
    let key = match credentials.0.get(PRIVATE_KEY_KEY) {
        Some(pem) => Some(SshPrivateKey::from_bytes(pem).map_err(|e| {
            DriverError::invalid_config(CREDENTIALS_FIELD, format!("the Secret's `{PRIVATE_KEY_KEY}`: {e}"))
        })?),
        None => None,
    };
    let password = match credentials.0.get(PASSWORD_KEY) {
        Some(bytes) => {
            let text = std::str::from_utf8(bytes).map_err(|_| {
                DriverError::invalid_config(
                    CREDENTIALS_FIELD,
                    format!("the Secret's `{PASSWORD_KEY}` is not UTF-8 text"),
                )
            })?;
            // `kubectl create secret --from-file` keeps the file's final newline.
            let text = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(text);
            if text.is_empty() {
                return Err(DriverError::invalid_config(
                    CREDENTIALS_FIELD,
                    format!("the Secret's `{PASSWORD_KEY}` is empty"),
                ));
            }
            Some(SecretString::new(text))
        }
        None => None,
    };
    match (key, password) {
        (Some(key), Some(password)) => Ok(SshAuth::key_then_password(key, password)),
        (Some(key), None) => Ok(SshAuth::key(key)),
        (None, Some(password)) => Ok(SshAuth::password(password)),
        (None, None) => {
            let has = if credentials.0.is_empty() {
                "no credentials were given (is spec.credentialsSecretRef set?)".to_string()
            } else {
                format!("the Secret has only {}", credentials.0.keys().cloned().collect::<Vec<_>>().join(", "))
            };
            Err(DriverError::invalid_config(
                CREDENTIALS_FIELD,
                format!(
                    "the generic driver logs in to the host with the Secret's `{PRIVATE_KEY_KEY}` (a private key, \
                     as in a kubernetes.io/ssh-auth Secret) and/or `{PASSWORD_KEY}`; {has}"
                ),
            ))
        }
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

#[async_trait]
impl Driver for GenericDriver {
    fn name(&self) -> &'static str {
        "generic"
    }

    fn offers_ssh(&self) -> bool {
        true
    }

    async fn find(&self) -> Result<Option<Instance>, DriverError> {
        let output =
            self.with_script("looking for the Machine's key", &authorized_keys::count_script(&self.tag)).await?;
        let text = output.stdout_text();
        let count: u32 = text.trim().parse().map_err(|_| {
            DriverError::transient(format!(
                "looking for the Machine's key on {}: unexpected output {:?}",
                self.target,
                text.trim()
            ))
        })?;
        Ok((count > 0).then(|| Instance { id: self.instance_id(), state: State::Running }))
    }

    async fn create(&self, request: &CreateRequest) -> Result<String, DriverError> {
        let Some(public_key) = request.ssh_public_key.as_deref() else {
            return Err(DriverError::transient(
                "machinist passed no SSH public key to Create; the generic driver installs the Machine's key on the \
                 host and cannot go on without it (this is a bug in machinist)",
            ));
        };
        let mut key = ssh::parse_public_key(public_key).map_err(|e| {
            DriverError::invalid_config("spec.ssh.keySecretRef", format!("the Machine's SSH public key: {e}"))
        })?;
        key.set_comment(self.tag.as_str());
        let line = key.to_openssh().map_err(|e| DriverError::transient(format!("encoding the public key: {e}")))?;
        let output = self
            .with_script("installing the Machine's key", &authorized_keys::install_script(&self.tag, &line))
            .await?;
        tracing::info!(
            machine = %format!("{}/{}", self.machine.namespace, self.machine.name),
            ssh = %self.target,
            result = %output.stdout_text().trim(),
            "generic: the Machine's key is in authorized_keys"
        );
        Ok(self.instance_id())
    }

    async fn remove(&self, _id: &str) -> Result<Removal, DriverError> {
        let session = match self.session(CONNECT_TIMEOUT).await {
            Ok(session) => session,
            Err(error @ SshError::Unreachable { .. }) => {
                // The name no longer resolves or no route leads there: the host is gone,
                // and the key with it.
                tracing::warn!(ssh = %self.target, %error, "generic: host gone, nothing to remove");
                return Ok(Removal::Done);
            }
            Err(error) if error.is_retryable() => {
                return Err(DriverError::transient(format!(
                    "{error}. The Machine's key stays in authorized_keys until the host answers; if the host is \
                     gone for good, set deletionPolicy: Orphan"
                )));
            }
            Err(error) => return Err(self.driver_error(&error)),
        };
        let result =
            self.script(&session, "removing the Machine's key", &authorized_keys::remove_script(&self.tag)).await;
        session.close().await;
        let output = result?;
        tracing::info!(ssh = %self.target, result = %output.stdout_text().trim(), "generic: Machine's key removed");
        Ok(Removal::Done)
    }

    async fn start(&self, _id: &str) -> Result<(), DriverError> {
        Err(Self::not_supported(Operation::Start, "on"))
    }

    async fn stop(&self, _id: &str) -> Result<(), DriverError> {
        Err(Self::not_supported(Operation::Stop, "off"))
    }

    async fn kill(&self, _id: &str) -> Result<(), DriverError> {
        Err(Self::not_supported(Operation::Kill, "off"))
    }

    /// Runs `rebootCommand`, then waits until the host has gone down (the connection
    /// dropped, SSH stopped answering, or the Linux boot id changed) and answers SSH
    /// again, within `restartTimeoutSeconds`.
    async fn restart(&self, _id: &str) -> Result<(), DriverError> {
        let timeout = self.config.restart_timeout();
        let deadline = Instant::now() + timeout;
        let session = self.session(CONNECT_TIMEOUT.min(timeout)).await.map_err(|e| self.driver_error(&e))?;
        let boot_before = self.boot_id(&session).await;
        let command = self.config.reboot_command();
        let mut went_down = false;
        match session.run(command, None, REBOOT_COMMAND_TIMEOUT.min(remaining(deadline))).await {
            Ok(output) if output.success() => {}
            // The shell or the command was killed: the shutdown is under way.
            Ok(output) if output.exit_signal.is_some() || output.exit_status >= 128 => went_down = true,
            Ok(output) => {
                session.close().await;
                return Err(DriverError::invalid_config(
                    "spec.driver.generic.rebootCommand",
                    format!("`{command}` failed on {} ({})", self.target, output.describe_failure()),
                ));
            }
            Err(SshError::ConnectionLost { .. }) => went_down = true,
            Err(error) => {
                session.close().await;
                return Err(self.driver_error(&error));
            }
        }
        tracing::info!(ssh = %self.target, %command, "generic: reboot command sent, waiting for SSH");

        let mut delay = POLL_FIRST;
        loop {
            let left = remaining(deadline);
            if left.is_zero() {
                session.close().await;
                return Err(DriverError::transient(if went_down {
                    format!("{} did not answer SSH again within {}s of `{command}`", self.target, timeout.as_secs())
                } else {
                    format!(
                        "{} kept answering SSH (same boot) for {}s after `{command}`: it did not restart; check \
                         spec.driver.generic.rebootCommand",
                        self.target,
                        timeout.as_secs()
                    )
                }));
            }
            tokio::time::sleep(delay.min(left)).await;
            delay = (delay * 2).min(POLL_MAX);
            went_down |= session.is_closed();
            let attempt = STATUS_TIMEOUT.min(remaining(deadline)).max(Duration::from_millis(100));
            match self.session(attempt).await {
                Ok(probe) => {
                    let boot_now = self.boot_id(&probe).await;
                    probe.close().await;
                    let rebooted = matches!((&boot_before, &boot_now), (Some(a), Some(b)) if a != b);
                    if went_down || rebooted {
                        session.close().await;
                        tracing::info!(ssh = %self.target, "generic: host answers SSH again after restart");
                        return Ok(());
                    }
                }
                Err(error) if error.is_retryable() => {
                    tracing::debug!(ssh = %self.target, %error, "generic: waiting for the host to come back");
                    went_down = true;
                }
                Err(error) => {
                    session.close().await;
                    return Err(self.driver_error(&error));
                }
            }
        }
    }

    /// `Running` when the host answers SSH and accepts the bootstrap login, `Stopped`
    /// when SSH is refused, times out or drops, `Error` otherwise (the reason is logged).
    /// A host presenting an untrusted key is `HostKeyMismatch`, an error.
    async fn status(&self, _id: &str) -> Result<State, DriverError> {
        match ssh::check_ready_within(&self.target, &self.auth, &self.trusted(), STATUS_TIMEOUT).await {
            Ok(fingerprint) => {
                self.remember_first_contact(&fingerprint);
                Ok(State::Running)
            }
            // Whoever answers there is not the host: never Running, and said why.
            Err(error @ SshError::HostKeyMismatch { .. }) => Err(self.driver_error(&error)),
            Err(
                error @ (SshError::ConnectionRefused { .. }
                | SshError::Timeout { .. }
                | SshError::ConnectionLost { .. }),
            ) => {
                tracing::debug!(ssh = %self.target, %error, "generic: status Stopped");
                Ok(State::Stopped)
            }
            Err(error) => {
                tracing::warn!(ssh = %self.target, reason = error.reason(), %error, "generic: status Error");
                Ok(State::Error)
            }
        }
    }

    async fn addresses(&self, _id: &str) -> Result<Vec<Address>, DriverError> {
        let kind = if self.config.address_is_ip() { AddressType::ExternalIP } else { AddressType::Hostname };
        Ok(vec![Address { kind, address: self.config.address.clone() }])
    }

    async fn ssh_endpoint(&self, _id: &str) -> Result<Option<SshEndpoint>, DriverError> {
        Ok(Some(SshEndpoint { host: self.target.host.clone(), port: self.target.port, user: self.target.user.clone() }))
    }

    fn first_contact_host_key(&self) -> Option<String> {
        self.first_contact.lock().ok().and_then(|seen| seen.clone())
    }
}
