use std::time::Duration;

use crate::Operation;

/// The field an error about the provider credentials names.
pub const CREDENTIALS_FIELD: &str = "spec.credentialsSecretRef";

/// A driver failure, typed so the controller knows how to retry it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// Worth retrying with backoff. `retry_after` asks for at least that long (for
    /// example when the provider is out of capacity).
    #[error("{message}")]
    Transient { message: String, retry_after: Option<Duration> },
    /// The provider throttled us; retry no sooner than `retry_after`.
    #[error("rate limited: {message}")]
    RateLimited { message: String, retry_after: Duration },
    /// The Machine's config is wrong; retrying cannot help until the spec changes.
    /// `field` is the path of the offending field, e.g. `spec.driver.fake.instanceType`.
    #[error("{field}: {message}")]
    InvalidConfig { field: String, message: String },
    /// This driver cannot do that operation at all (e.g. Stop on an existing host).
    #[error("{operation} is not supported by this driver: {message}")]
    NotSupported { operation: Operation, message: String },
    /// The instance (or something it needs) does not exist.
    #[error("not found: {message}")]
    NotFound { message: String },
    /// The host presented an SSH host key that is not the trusted one; the driver
    /// disconnected before authenticating. Not retried: someone must accept the key.
    #[error("the SSH host key of {target} changed: it presents {presented}, trusted is {}; machinist disconnected before logging in", .trusted.join(" or "))]
    HostKeyMismatch { target: String, trusted: Vec<String>, presented: String },
}

impl DriverError {
    pub fn transient(message: impl Into<String>) -> Self {
        DriverError::Transient { message: message.into(), retry_after: None }
    }

    pub fn invalid_config(field: impl Into<String>, message: impl Into<String>) -> Self {
        DriverError::InvalidConfig { field: field.into(), message: message.into() }
    }

    /// A stable PascalCase label: Event reason, condition reason and metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            DriverError::Transient { .. } => "TransientError",
            DriverError::RateLimited { .. } => "RateLimited",
            DriverError::InvalidConfig { .. } => "InvalidConfig",
            DriverError::NotSupported { .. } => "NotSupported",
            DriverError::NotFound { .. } => "NotFound",
            DriverError::HostKeyMismatch { .. } => "HostKeyMismatch",
        }
    }

    /// Whether retrying the same call later can succeed without a spec change.
    pub fn is_retryable(&self) -> bool {
        match self {
            DriverError::Transient { .. } | DriverError::RateLimited { .. } | DriverError::NotFound { .. } => true,
            // Credentials live in a Secret, outside the spec: fixing or rotating them
            // changes no generation, so they are tried again (with backoff).
            DriverError::InvalidConfig { field, .. } => field == CREDENTIALS_FIELD,
            DriverError::NotSupported { .. } | DriverError::HostKeyMismatch { .. } => false,
        }
    }

    /// The least time to wait before retrying, when the provider said so.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DriverError::Transient { retry_after, .. } => *retry_after,
            DriverError::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_a_retry_can_fix_are_retryable() {
        assert!(DriverError::transient("x").is_retryable());
        assert!(DriverError::NotFound { message: "x".into() }.is_retryable());
        assert!(!DriverError::invalid_config("spec.driver.fake.instanceType", "x").is_retryable());
        // Fixed in the Secret, not the spec: no spec change will come to retry it.
        assert!(DriverError::invalid_config(CREDENTIALS_FIELD, "rejected").is_retryable());
        assert!(!DriverError::NotSupported { operation: Operation::Stop, message: "x".into() }.is_retryable());
    }
}
