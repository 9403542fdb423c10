use std::fmt;
use std::time::Duration;

use crate::DriverError;

/// What an SSH connection was doing when it ran out of time or lost the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SshStage {
    /// Opening the TCP connection, exchanging versions and keys.
    Connect,
    /// Logging in.
    Auth,
    /// Running a command.
    Command,
}

impl fmt::Display for SshStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SshStage::Connect => "connecting",
            SshStage::Auth => "logging in",
            SshStage::Command => "running a command",
        })
    }
}

/// An SSH failure, typed so a caller can tell a host that is still booting (refused,
/// timeout, unreachable: retry later) from a wrong setup (authentication failed, host key
/// changed: retrying cannot help). `target` is `user@host:port` everywhere.
///
/// No variant ever holds a private key or a password.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SshError {
    #[error(
        "ssh {target}: connection refused: nothing listens for SSH there yet (the host may still be booting, or sshd \
         is stopped), or the port is wrong"
    )]
    ConnectionRefused { target: String },
    #[error("{}", timeout_message(target, *stage, *after, command.as_deref()))]
    Timeout {
        target: String,
        stage: SshStage,
        after: Duration,
        /// The command that did not finish, for [`SshStage::Command`] (shortened).
        command: Option<String>,
    },
    #[error(
        "ssh {target}: the server rejected the login as {user:?} with the {method} offered (it accepts: {accepted}); \
         check the user and the credentials"
    )]
    AuthFailed { target: String, user: String, method: String, accepted: String },
    /// The host presented a key that is none of the trusted ones; the connection ended
    /// right after the key exchange, before any credential was offered.
    #[error(
        "ssh {target}: the host presents the host key {found}, not the trusted {}; machinist disconnected before \
         logging in (no credential was offered, no command ran)",
        .trusted.join(" or ")
    )]
    HostKeyMismatch { target: String, trusted: Vec<String>, found: String },
    #[error("ssh {target}: host unreachable: {message}")]
    Unreachable { target: String, message: String },
    #[error("ssh {target}: the connection was lost while {stage}{}", detail_suffix(message))]
    ConnectionLost { target: String, stage: SshStage, message: String },
    #[error("ssh: {0}")]
    Protocol(String),
}

fn timeout_message(target: &str, stage: SshStage, after: Duration, command: Option<&str>) -> String {
    let secs = after.as_secs_f64();
    match stage {
        SshStage::Connect => format!(
            "ssh {target}: no SSH answer within {secs}s: the host may still be booting or be powered off, or a \
             firewall drops the traffic"
        ),
        SshStage::Auth => format!("ssh {target}: the server did not finish the login within {secs}s"),
        SshStage::Command => {
            format!("ssh {target}: the command `{}` did not finish within {secs}s", command.unwrap_or("?"))
        }
    }
}

fn detail_suffix(message: &str) -> String {
    if message.is_empty() { String::new() } else { format!(": {message}") }
}

impl SshError {
    /// A stable PascalCase label, as [`DriverError::reason`]: condition reason, Event
    /// reason and metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            SshError::ConnectionRefused { .. } => "ConnectionRefused",
            SshError::Timeout { .. } => "Timeout",
            SshError::AuthFailed { .. } => "AuthFailed",
            SshError::HostKeyMismatch { .. } => "HostKeyMismatch",
            SshError::Unreachable { .. } => "Unreachable",
            SshError::ConnectionLost { .. } => "ConnectionLost",
            SshError::Protocol(_) => "Protocol",
        }
    }

    /// Whether the host may simply not be up yet (or be down): retrying later can help
    /// without any change. False for a wrong setup (credentials, host key).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, SshError::AuthFailed { .. } | SshError::HostKeyMismatch { .. })
    }

    /// The [`DriverError`] for this failure. `credentials_field` names where the login
    /// came from (e.g. `spec.credentialsSecretRef`, `spec.ssh.keySecretRef`).
    ///
    /// Refused, timeout, unreachable, lost connection and protocol errors are
    /// `Transient`; a failed login is `InvalidConfig` naming the credentials; a changed
    /// host key is `HostKeyMismatch`, not retried until someone accepts the new key.
    pub fn to_driver_error(&self, credentials_field: &str) -> DriverError {
        match self {
            SshError::AuthFailed { target, user, method, accepted } => DriverError::invalid_config(
                credentials_field,
                format!(
                    "the SSH server at {target} rejected the login as {user:?} with the {method} from these \
                     credentials (it accepts: {accepted}); fix the credentials or the user"
                ),
            ),
            SshError::HostKeyMismatch { target, trusted, found } => DriverError::HostKeyMismatch {
                target: target.clone(),
                trusted: trusted.clone(),
                presented: found.clone(),
            },
            other => DriverError::transient(other.to_string()),
        }
    }
}

/// Where a private key could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct KeyError {
    pub message: String,
}

impl KeyError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        KeyError { message: message.into() }
    }

    /// `InvalidConfig` naming `field` (e.g. `spec.ssh.keySecretRef`).
    pub fn to_driver_error(&self, field: &str) -> DriverError {
        DriverError::invalid_config(field, self.message.clone())
    }
}
