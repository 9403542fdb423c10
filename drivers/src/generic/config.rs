//! The `spec.driver.generic` block.

use std::net::IpAddr;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::DriverError;

pub const DEFAULT_PORT: u16 = 22;
pub const DEFAULT_USER: &str = "root";
pub const DEFAULT_REBOOT_COMMAND: &str = "sudo shutdown -r now";
pub const DEFAULT_RESTART_TIMEOUT_SECONDS: u32 = 300;
pub const MIN_RESTART_TIMEOUT_SECONDS: u32 = 5;
pub const MAX_RESTART_TIMEOUT_SECONDS: u32 = 3600;

/// An existing host that machinist reaches over SSH (as Docker Machine's `generic`
/// driver). machinist logs in with the credentials of `spec.credentialsSecretRef`
/// (keys `ssh-privatekey` and/or `password`), installs the Machine's SSH key in the
/// user's `~/.ssh/authorized_keys` on Create and takes it out again on Remove. It cannot
/// power the host on or off: Start, Stop and Kill are not supported; Restart runs
/// `rebootCommand`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GenericConfig {
    /// The host's DNS name or IP address (IPv6 without brackets). Cannot change: a Machine
    /// for another host is a new Machine.
    #[schemars(length(min = 1, max = 253))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self == oldSelf",
        "message": "address cannot change; create a new Machine for another host"
    }]))]
    pub address: String,
    /// The SSH port (default 22).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// The user to log in as, whose `~/.ssh/authorized_keys` receives the Machine's key
    /// (default `root`). Cannot change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self == oldSelf",
        "message": "user cannot change; create a new Machine instead"
    }]))]
    pub user: Option<String>,
    /// The command that reboots the host, run over SSH by Restart (default
    /// `sudo shutdown -r now`). The connection dropping while it runs counts as success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub reboot_command: Option<String>,
    /// How long Restart waits for the host to go down and answer SSH again, in seconds
    /// (5 to 3600, default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 3600))]
    pub restart_timeout_seconds: Option<u32>,
    /// The SHA256 fingerprint the host's SSH key must have, as `ssh-keygen -lf` prints it
    /// (`SHA256:...`). When set, machinist refuses to log in (and send the credentials) to
    /// a host presenting another key. Unset: any key is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 8, max = 128), regex(pattern = r"^SHA256:[A-Za-z0-9+/]+=*$"))]
    pub host_key_fingerprint: Option<String>,
}

impl GenericConfig {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(DEFAULT_PORT)
    }

    pub fn user(&self) -> &str {
        self.user.as_deref().unwrap_or(DEFAULT_USER)
    }

    pub fn reboot_command(&self) -> &str {
        self.reboot_command.as_deref().unwrap_or(DEFAULT_REBOOT_COMMAND)
    }

    pub fn restart_timeout(&self) -> Duration {
        Duration::from_secs(self.restart_timeout_seconds.unwrap_or(DEFAULT_RESTART_TIMEOUT_SECONDS).into())
    }

    /// What the schema cannot say. Errors name the field.
    pub fn validate(&self) -> Result<(), DriverError> {
        validate_address(&self.address)?;
        if self.port == Some(0) {
            return Err(DriverError::invalid_config("spec.driver.generic.port", "0 is not a port (1 to 65535)"));
        }
        let user = self.user();
        if user.is_empty() || user.len() > 255 || user.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(DriverError::invalid_config(
                "spec.driver.generic.user",
                format!("{user:?} is not a user name (1 to 255 characters, no spaces)"),
            ));
        }
        if self.reboot_command().trim().is_empty() {
            return Err(DriverError::invalid_config(
                "spec.driver.generic.rebootCommand",
                "the reboot command is empty; leave it unset for `sudo shutdown -r now`",
            ));
        }
        if let Some(seconds) = self.restart_timeout_seconds
            && !(MIN_RESTART_TIMEOUT_SECONDS..=MAX_RESTART_TIMEOUT_SECONDS).contains(&seconds)
        {
            return Err(DriverError::invalid_config(
                "spec.driver.generic.restartTimeoutSeconds",
                format!("{seconds} is out of range ({MIN_RESTART_TIMEOUT_SECONDS} to {MAX_RESTART_TIMEOUT_SECONDS})"),
            ));
        }
        if let Some(fingerprint) = &self.host_key_fingerprint {
            let valid = fingerprint.strip_prefix("SHA256:").is_some_and(|b64| {
                !b64.is_empty() && b64.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='))
            });
            if !valid {
                return Err(DriverError::invalid_config(
                    "spec.driver.generic.hostKeyFingerprint",
                    format!(
                        "{fingerprint:?} is not a SHA256 fingerprint; `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` \
                         on the host prints it (SHA256:...)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether the address is an IP address rather than a DNS name.
    pub fn address_is_ip(&self) -> bool {
        self.address.parse::<IpAddr>().is_ok()
    }
}

fn validate_address(address: &str) -> Result<(), DriverError> {
    let field = "spec.driver.generic.address";
    if address.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if address.starts_with('[') {
        return Err(DriverError::invalid_config(field, format!("{address:?}: write an IPv6 address without brackets")));
    }
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    let name = address.strip_suffix('.').unwrap_or(address);
    if name.is_empty() || name.len() > 253 || !name.split('.').all(valid_label) {
        return Err(DriverError::invalid_config(
            field,
            format!("{address:?} is neither an IP address nor a DNS name (without a port: set `port` for that)"),
        ));
    }
    Ok(())
}
