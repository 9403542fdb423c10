//! SSH, as the Driver Specification asks ("Machine relies on SSH for system level
//! maintenance"): a client on russh (no `ssh` executable), used by drivers (the
//! `generic` driver logs in to install keys and reboot) and by the controller (readiness,
//! provisioning).
//!
//! - Keys: [`generate_ed25519`] makes a key pair in OpenSSH formats;
//!   [`SshPrivateKey::from_openssh`] reads one (bring your own key:
//!   a `kubernetes.io/ssh-auth` Secret's `ssh-privatekey`).
//! - [`connect`] logs in to an [`SshTarget`] with an [`SshAuth`], checking the host key
//!   against a pinned fingerprint (or reporting the one seen, to pin it);
//!   [`SshSession::run`] runs a command with a timeout; [`check_ready`] does both with `true`.
//! - Failures are [`SshError`]s, typed so a host still booting (refused, timeout) is told
//!   from a wrong setup (login rejected, host key changed); each has a stable
//!   [`reason`](SshError::reason) and maps to a [`DriverError`](crate::DriverError)
//!   ([`SshError::to_driver_error`]).
//!
//! Private keys and passwords are never logged nor printed by `Debug`.

mod error;
mod keys;
mod session;

pub use error::{KeyError, SshError, SshStage};
pub use keys::{KeyPair, SecretString, SshPrivateKey, fingerprint, generate_ed25519, parse_public_key};
pub use session::{
    CommandOutput, DEFAULT_CONNECT_TIMEOUT, MAX_OUTPUT_BYTES, SshAuth, SshSession, SshTarget, check_ready,
    check_ready_within, connect,
};

/// The OpenSSH public key type, as [`parse_public_key`] returns it.
pub use russh::keys::PublicKey;

/// `text` as one shell word: single-quoted, with embedded single quotes escaped. For
/// building commands that a POSIX shell runs.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}
