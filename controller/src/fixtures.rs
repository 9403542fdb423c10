//! Test builders: Machines in any state and decision inputs with a fixed clock (as
//! kube-rs's controller-rs `fixtures.rs` does). Compiled for tests only.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::Condition;
use machinist_drivers::fake::FakeConfig;
use machinist_drivers::{DriverError, DriverSpec, Operation, State};

use crate::api::{
    ConditionType, DeletionPolicy, Machine, MachineSpec, MachineStatus, PAUSED_ANNOTATION, PowerState, Provisioning,
    RestartMode, StopMode, get_condition,
};
use crate::reconcile::{Input, Observed, Settings};

pub const NAME: &str = "web-1";
pub const NAMESPACE: &str = "default";
pub const UID: &str = "6f1c2a52-0d0e-4c1a-9d59-0c2f3b0e7a11";
/// The instance id the tests' driver hands out.
pub const PROVIDER_ID: &str = "fake-00000000c0de";

/// The timing knobs of every test: the defaults, spelled out so tests can rely on them.
pub static SETTINGS: Settings = Settings {
    poll_interval: Duration::from_secs(60),
    progress_interval: Duration::from_secs(2),
    backoff_base: Duration::from_secs(1),
    backoff_cap: Duration::from_secs(300),
};

/// The jitter of every test input: 0.5 leaves intervals as they are (`jittered(poll) ==
/// poll`, the first backoff is exactly `backoff_base`).
pub const JITTER: f64 = 0.5;

/// The fixed "now" of every test (whole seconds, as the controller's clock is).
pub fn now() -> Timestamp {
    Timestamp::from_second(1_750_000_000).expect("a valid timestamp")
}

/// `now() + secs` (negative: earlier).
pub fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(now().as_second() + secs).expect("a valid timestamp")
}

impl Machine {
    /// A live Machine of the fake driver: name, namespace, uid, generation 1, defaults
    /// everywhere else, and no status.
    pub fn test() -> Self {
        let spec = MachineSpec {
            driver: DriverSpec { fake: Some(FakeConfig::default()), ..DriverSpec::default() },
            power_state: PowerState::default(),
            stop_mode: StopMode::default(),
            stop_timeout_seconds: None,
            restart_request: None,
            restart_mode: RestartMode::default(),
            ssh: None,
            provisioning: None,
            credentials_secret_ref: None,
            deletion_policy: DeletionPolicy::default(),
        };
        let mut machine = Machine::new(NAME, spec);
        machine.metadata.namespace = Some(NAMESPACE.to_string());
        machine.metadata.uid = Some(UID.to_string());
        machine.metadata.generation = Some(1);
        machine
    }

    pub fn with_power_state(mut self, power_state: PowerState) -> Self {
        self.spec.power_state = power_state;
        self
    }

    pub fn with_stop_mode(mut self, stop_mode: StopMode) -> Self {
        self.spec.stop_mode = stop_mode;
        self
    }

    pub fn with_stop_timeout(mut self, seconds: u32) -> Self {
        self.spec.stop_timeout_seconds = Some(seconds);
        self
    }

    /// Sets `spec.restartRequest` and `spec.restartMode`.
    pub fn with_restart(mut self, request: &str, mode: RestartMode) -> Self {
        self.spec.restart_request = Some(request.to_string());
        self.spec.restart_mode = mode;
        self
    }

    pub fn with_provisioning(mut self, script: &str) -> Self {
        self.spec.provisioning = Some(Provisioning { script: script.to_string() });
        self
    }

    pub fn with_generation(mut self, generation: i64) -> Self {
        self.metadata.generation = Some(generation);
        self
    }

    /// Edits the status (created empty when there is none).
    pub fn with_status(mut self, edit: impl FnOnce(&mut MachineStatus)) -> Self {
        edit(self.status.get_or_insert_with(MachineStatus::default));
        self
    }

    /// Replaces the status outright (`None`: no status).
    pub fn with_full_status(mut self, status: Option<MachineStatus>) -> Self {
        self.status = status;
        self
    }

    pub fn with_provider_id(self, id: &str) -> Self {
        self.with_status(|s| s.provider_id = Some(id.to_string()))
    }

    /// The state the driver reported last time (`status.state`).
    pub fn with_state(self, state: State) -> Self {
        self.with_status(|s| s.state = Some(state))
    }

    pub fn with_last_restart_request(self, request: &str) -> Self {
        self.with_status(|s| s.last_restart_request = Some(request.to_string()))
    }

    /// Adds the `machinist.dev/paused` annotation.
    pub fn paused(mut self) -> Self {
        self.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(PAUSED_ANNOTATION.to_string(), String::new());
        self
    }

    /// Removes the `machinist.dev/paused` annotation.
    pub fn unpaused(mut self) -> Self {
        if let Some(annotations) = self.metadata.annotations.as_mut() {
            annotations.remove(PAUSED_ANNOTATION);
        }
        self
    }

    /// Sets the `machinist.dev/accept-host-key` annotation.
    pub fn accepting_host_key(mut self, fingerprint: &str) -> Self {
        self.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(crate::api::ACCEPT_HOST_KEY_ANNOTATION.to_string(), fingerprint.to_string());
        self
    }

    /// Pins `fingerprint` as the host key (`status.ssh.hostKeyFingerprint`).
    pub fn with_pinned_host_key(self, fingerprint: &str) -> Self {
        self.with_status(|s| s.ssh.get_or_insert_default().host_key_fingerprint = Some(fingerprint.to_string()))
    }

    /// Marks the Machine deleted (a deletion timestamp; the finalizer is machinist's).
    pub fn deleting(mut self) -> Self {
        self.metadata.deletion_timestamp = Some(Time(now()));
        self.metadata.finalizers = Some(vec![crate::api::FINALIZER.to_string()]);
        self
    }

    pub fn orphan(mut self) -> Self {
        self.spec.deletion_policy = DeletionPolicy::Orphan;
        self
    }

    /// A condition of the status, if set.
    pub fn condition(&self, kind: ConditionType) -> Option<&Condition> {
        get_condition(&self.status.as_ref()?.conditions, kind)
    }
}

/// The decision input for `machine` as observed, at [`now`], with the fixed jitter.
pub fn input(machine: &Machine, observed: Observed) -> Input<'_> {
    input_at(machine, observed, now())
}

/// As [`input`], at another time.
pub fn input_at(machine: &Machine, observed: Observed, now: Timestamp) -> Input<'_> {
    Input {
        machine,
        observed,
        offers_ssh: false,
        ssh_key_secret: None,
        secrets: None,
        first_contact_host_key: None,
        power_changed_since_intent: None,
        now,
        jitter: JITTER,
        settings: &SETTINGS,
    }
}

/// The instance [`PROVIDER_ID`] in `state`, addresses not looked up.
pub fn instance(state: State) -> Observed {
    Observed::Instance { id: PROVIDER_ID.to_string(), state, addresses: None }
}

/// One of each kind of driver error.
pub fn transient() -> DriverError {
    DriverError::transient("the provider timed out")
}

pub fn rate_limited(secs: u64) -> DriverError {
    DriverError::RateLimited { message: "slow down".to_string(), retry_after: Duration::from_secs(secs) }
}

pub fn invalid_config() -> DriverError {
    DriverError::invalid_config("spec.driver.fake.instanceType", "unknown instance type \"fake.huge\"")
}

pub fn not_supported(operation: Operation) -> DriverError {
    DriverError::NotSupported { operation, message: "this host has no power control".to_string() }
}

pub fn not_found() -> DriverError {
    DriverError::NotFound { message: "the credentials Secret default/creds does not exist".to_string() }
}
