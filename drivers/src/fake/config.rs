//! The `spec.driver.fake` block.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{DriverError, Operation};

/// Instance types the fake provider offers; anything else is rejected by the driver
/// (as a cloud rejects an unknown type), not by the schema.
pub const INSTANCE_TYPES: [&str; 3] = ["fake.small", "fake.medium", "fake.large"];

/// The fake driver: instances that live as files in the controller's fake state
/// directory. For tests, demos and benchmarks: latency and failures can be injected.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FakeConfig {
    /// One of `fake.small`, `fake.medium`, `fake.large` (default `fake.small`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// How long each operation takes, in milliseconds (0 when unset).
    // The optional blocks are boxed: every cached Machine holds its spec, and an unset
    // block should cost a pointer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_millis: Option<Box<FakeLatency>>,
    /// Failures to inject, checked in order before each call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub failures: Vec<FailureRule>,
    /// Whether the guest honours a graceful stop (default `Honor`). With `Ignore`, Stop
    /// leaves the instance `Stopping` until it is killed; with `IgnoreRunning`, `Running`.
    #[serde(default)]
    pub graceful_stop: GracefulStop,
    /// Where the fake instance answers SSH (for example an sshd of your own): the fake
    /// driver then offers SSH, and machinist checks it and runs `spec.provisioning`
    /// there. The fake driver installs no key: authorize the Machine's public key (its
    /// Secret's `ssh-publickey`) on that endpoint yourself, as cloud-init would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_endpoint: Option<Box<FakeSshEndpoint>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FakeSshEndpoint {
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// Default 22.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// Default `root`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub user: Option<String>,
}

/// Per-operation latency in milliseconds; `default` applies to operations not listed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FakeLatency {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 3_600_000))]
    pub default: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 3_600_000))]
    pub create: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 3_600_000))]
    pub remove: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 3_600_000))]
    pub start: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 3_600_000))]
    pub stop: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 3_600_000))]
    pub kill: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 3_600_000))]
    pub restart: Option<u32>,
    /// Status, look-up and address calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 3_600_000))]
    pub status: Option<u32>,
}

impl FakeLatency {
    pub fn millis(&self, operation: Operation) -> u32 {
        let specific = match operation {
            Operation::Create => self.create,
            Operation::Remove => self.remove,
            Operation::Start => self.start,
            Operation::Stop => self.stop,
            Operation::Kill => self.kill,
            Operation::Restart => self.restart,
            Operation::Status => self.status,
        };
        specific.or(self.default).unwrap_or(0)
    }
}

/// Fail calls of one operation: the next `count` calls, or each call with `probability`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureRule {
    pub operation: Operation,
    /// Fail the next N calls of the operation (counted from when this rule first applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub count: Option<u32>,
    /// Fail each call with this probability, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub probability: Option<f64>,
    /// The kind of error to return (default `Transient`).
    #[serde(default)]
    pub error: FakeErrorKind,
    /// For `RateLimited`: the retry-after the fake provider asks for (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub retry_after_seconds: Option<u32>,
    /// The error message (a default names the injection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FakeErrorKind {
    #[default]
    Transient,
    RateLimited,
    InvalidConfig,
    NotSupported,
    NotFound,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum GracefulStop {
    #[default]
    Honor,
    /// The guest ignores it: the instance stays `Stopping` until killed.
    Ignore,
    /// The guest ignores it and the provider keeps reporting `Running`, as providers that
    /// power off by ACPI do until the guest obeys.
    IgnoreRunning,
}

impl FakeConfig {
    pub fn instance_type(&self) -> &str {
        self.instance_type.as_deref().unwrap_or(INSTANCE_TYPES[0])
    }

    pub fn latency(&self, operation: Operation) -> std::time::Duration {
        let millis = self.latency_millis.as_ref().map_or(0, |l| l.millis(operation));
        std::time::Duration::from_millis(millis.into())
    }

    /// What the schema cannot say. Errors name the field.
    pub fn validate(&self) -> Result<(), DriverError> {
        if !INSTANCE_TYPES.contains(&self.instance_type()) {
            return Err(DriverError::invalid_config(
                "spec.driver.fake.instanceType",
                format!(
                    "unknown instance type {:?}; the fake provider offers {}",
                    self.instance_type(),
                    INSTANCE_TYPES.join(", ")
                ),
            ));
        }
        for (i, rule) in self.failures.iter().enumerate() {
            let field = format!("spec.driver.fake.failures[{i}]");
            match (rule.count, rule.probability) {
                (Some(_), None) => {}
                (None, Some(p)) if (0.0..=1.0).contains(&p) => {}
                (None, Some(p)) => {
                    return Err(DriverError::invalid_config(
                        format!("{field}.probability"),
                        format!("{p} is not a probability (0 to 1)"),
                    ));
                }
                _ => {
                    return Err(DriverError::invalid_config(field, "set exactly one of count and probability"));
                }
            }
        }
        Ok(())
    }
}
