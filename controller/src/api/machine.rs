// kube-derive takes one `printcolumn(...)` per column; each repeats `type_`.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema, ResourceExt};
use machinist_drivers::{Address, DriverSpec, Operation, State};

use super::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Machine: the desired state of one instance (a cloud VM, an existing host, ...),
/// reconciled through the driver named by `spec.driver`.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "machinist.dev",
    version = "v1alpha1",
    kind = "Machine",
    plural = "machines",
    shortname = "mach",
    category = "machinist",
    namespaced,
    status = "MachineStatus",
    derive = "PartialEq",
    printcolumn(
        name = "Driver",
        type_ = "string",
        json_path = ".status.driver",
        description = "The driver of spec.driver"
    ),
    printcolumn(
        name = "Desired",
        type_ = "string",
        json_path = ".spec.powerState",
        description = "The desired power state"
    ),
    printcolumn(
        name = "State",
        type_ = "string",
        json_path = ".status.state",
        description = "The state the driver last reported"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Address", type_ = "string", json_path = ".status.addresses[0].address"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct MachineSpec {
    /// Exactly one driver block, named for its driver, holding that driver's config.
    /// The driver kind cannot change after creation.
    #[x_kube(
        validation = Rule::new(
            "(has(self.fake) ? 1 : 0) + (has(self.generic) ? 1 : 0) + (has(self.amazonec2) ? 1 : 0) \
             + (has(self.dockerMachine) ? 1 : 0) == 1"
        )
        .message("set exactly one driver block (one of: fake, generic, amazonec2, dockerMachine)"),
        validation = Rule::new(
            "has(self.fake) == has(oldSelf.fake) && has(self.generic) == has(oldSelf.generic) \
             && has(self.amazonec2) == has(oldSelf.amazonec2) && has(self.dockerMachine) == has(oldSelf.dockerMachine)"
        )
        .message("the driver kind cannot change after creation")
    )]
    pub driver: DriverSpec,

    /// The desired power state.
    #[serde(default)]
    pub power_state: PowerState,

    /// How to stop: `Graceful` (driver Stop) or `Force` (driver Kill).
    #[serde(default)]
    pub stop_mode: StopMode,

    /// A graceful stop that has not reached Stopped after this many seconds is
    /// escalated to Kill (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub stop_timeout_seconds: Option<u32>,

    /// Set a new value to ask for exactly one restart; the handled value is echoed in
    /// `status.lastRestartRequest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub restart_request: Option<String>,

    /// How to restart: `Soft` (driver Restart) or `Hard` (Kill, then Start once the instance is observed
    /// stopped).
    #[serde(default)]
    pub restart_mode: RestartMode,

    /// How to reach the machine over SSH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshSpec>,

    /// A script run once over SSH after the instance is first reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning: Option<Provisioning>,

    /// The Secret (in the Machine's namespace) holding the provider credentials; read on
    /// every driver call, so rotating it needs no restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,

    /// What deleting the Machine does to the instance: `Delete` (driver Remove) or
    /// `Orphan` (leave it).
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// The default graceful-stop timeout, when `stopTimeoutSeconds` is not set.
pub const DEFAULT_STOP_TIMEOUT_SECONDS: u32 = 300;

impl MachineSpec {
    pub fn stop_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.stop_timeout_seconds.unwrap_or(DEFAULT_STOP_TIMEOUT_SECONDS).into())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PowerState {
    #[default]
    Running,
    Stopped,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum StopMode {
    #[default]
    Graceful,
    Force,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RestartMode {
    #[default]
    Soft,
    Hard,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    #[default]
    Delete,
    Orphan,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SshSpec {
    /// The login user (the driver's default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The SSH port (the driver's default, usually 22, when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// Bring your own key: a `kubernetes.io/ssh-auth` Secret in the Machine's namespace.
    /// Without it, machinist generates an ed25519 key pair in a Secret the Machine owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret_ref: Option<SecretRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Provisioning {
    /// The script, run once with `sh -s` over SSH; rerun only when it changes.
    #[schemars(length(min = 1, max = 262144))]
    pub script: String,
}

/// A Secret in the Machine's namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// What machinist observed and did. Written only by the controller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MachineStatus {
    /// One word for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The driver of `spec.driver`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// The last state the driver reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<State>,
    /// The driver's instance id, written the moment it is known.
    #[serde(rename = "providerID", default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<Address>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The generation last reconciled successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The last `spec.restartRequest` handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart_request: Option<String>,
    /// The `spec.restartRequest` whose restart call is under way, written before the call.
    /// Found here by a later reconcile (machinist stopped, or its result could not be
    /// written), the restart is not repeated: at most once per request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_request_in_progress: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_operation: Option<LastOperation>,
    /// Consecutive failed attempts and when the next one is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<Failures>,
    /// The last `spec.provisioning` script run, and how it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning: Option<ProvisioningStatus>,
    /// The Secrets this Machine uses (credentials, SSH key). Each carries the finalizer
    /// `machinist.dev/secret-protection` until no Machine in the namespace uses it, so a
    /// deletion (of the Secret, or of the whole namespace) cannot take it away while the
    /// Machine's driver calls or its removal still need it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub secrets: Vec<SecretUse>,
}

/// A Secret a Machine uses, as `status.secrets` lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretUse {
    pub name: String,
    /// Where the Machine names it: `spec.credentialsSecretRef`, `spec.ssh.keySecretRef`,
    /// or `status.ssh.keySecretName` (the key Secret machinist generated).
    pub field: String,
    /// The Secret was deleted while in use: it stays until no Machine uses it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deletion_held: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningStatus {
    /// The SHA-256 (hex) of the script that ran: it runs again only when this changes.
    #[serde(rename = "scriptSHA256")]
    pub script_sha256: String,
    pub succeeded: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    Pending,
    Creating,
    Starting,
    Running,
    Stopping,
    Stopped,
    Restarting,
    Deleting,
    Failed,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SshStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret_name: Option<String>,
    /// Pinned at first contact (verified against the provider's console where the driver
    /// can read it) and verified on every later connection, before any login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key_fingerprint: Option<String>,
    /// The host key the host presented instead of the pinned one, while SSH is refused
    /// for it. Accept it with the annotation `machinist.dev/accept-host-key` set to
    /// exactly this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presented_host_key_fingerprint: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastOperation {
    pub operation: Operation,
    pub result: OperationResult,
    #[serde(default)]
    pub message: String,
    pub time: Time,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OperationResult {
    Succeeded,
    Failed,
    InProgress,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Failures {
    /// Consecutive failed attempts.
    pub count: u32,
    /// The reason of the last failure (e.g. `TransientError`, `RateLimited`).
    pub reason: String,
    /// What failed, as the provider said it.
    #[serde(default)]
    pub message: String,
    /// When the next attempt is due; absent when none will be made until the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_time: Option<Time>,
}

impl Machine {
    /// The Secrets the spec names, with the field naming each.
    pub fn secret_refs(&self) -> Vec<(&'static str, &str)> {
        let mut refs = Vec::new();
        if let Some(credentials) = &self.spec.credentials_secret_ref {
            refs.push(("spec.credentialsSecretRef", credentials.name.as_str()));
        }
        if let Some(key) = self.spec.ssh.as_ref().and_then(|s| s.key_secret_ref.as_ref()) {
            refs.push(("spec.ssh.keySecretRef", key.name.as_str()));
        }
        refs
    }

    /// Whether this Machine uses the Secret `name`: the spec names it, the status lists
    /// it (a generated key, or one the spec named until just now), or it holds the
    /// Machine's driver state.
    pub fn uses_secret(&self, name: &str) -> bool {
        self.secret_refs().iter().any(|(_, n)| *n == name)
            || self.status.as_ref().is_some_and(|s| s.secrets.iter().any(|u| u.name == name))
            || (self.keeps_driver_state() && self.driver_state_secret_name() == name)
    }

    /// Whether the driver keeps state of its own in a Secret (Docker Machine plugins).
    pub fn keeps_driver_state(&self) -> bool {
        self.spec.driver.docker_machine.is_some()
    }

    /// The Secret holding the driver's state (see [`Machine::keeps_driver_state`]).
    pub fn driver_state_secret_name(&self) -> String {
        self.owned_secret_name("-driver-state")
    }

    /// The name of a Secret machinist makes for this Machine: `<machine><suffix>`, or
    /// `machine-<uid><suffix>` when that would pass the 253 characters a name may have.
    pub fn owned_secret_name(&self, suffix: &str) -> String {
        let name = self.name_any();
        if name.len() + suffix.len() <= 253 {
            format!("{name}{suffix}")
        } else {
            format!("machine-{}{suffix}", self.uid().unwrap_or_default())
        }
    }

    pub fn is_paused(&self) -> bool {
        self.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(super::PAUSED_ANNOTATION))
    }

    pub fn generation(&self) -> i64 {
        self.metadata.generation.unwrap_or(0)
    }
}

/// Labels machinist sets on objects it creates for a Machine.
pub fn machine_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("machinist.dev/machine".to_string(), name.to_string())])
}
