//! Deciding, with no I/O: from a Machine and what its driver observed to the next step,
//! the new status, when to look again, and the Events to publish.
//!
//! [`plan`] decides before acting; [`record`] folds an action's outcome back into the
//! status. The Kubernetes layer (`crate::k8s`) observes, performs and writes.

mod backoff;
mod decide;
mod delete;
mod host_key;
mod power;
mod summary;
#[cfg(test)]
mod tests;

pub use backoff::{Settings, backoff_delay};
pub use decide::{OUTPUT_LINES, OUTPUT_MAX_BYTES, begin, output_tail, plan, record};
pub use delete::{plan_cleanup, record_cleanup};
pub use host_key::{HOST_KEY_MISMATCH, HostKeyTrust, accept_annotation_consumed, pinned, trusted_host_keys};
pub use power::{addresses_stale, restart_intent_since};
pub use summary::{instance_recorded, whole_seconds};

use std::time::Duration;

use jiff::Timestamp;
use machinist_drivers::{Address, DriverError, Operation, State};

use crate::api::{Machine, MachineStatus};

/// What the driver reported this reconcile.
#[derive(Clone, Debug, PartialEq)]
pub enum Observed {
    /// The driver config cannot work (or no driver could be built for it).
    InvalidSpec(DriverError),
    /// No `providerID` is known and the look-up by Machine UID found nothing.
    NoInstance,
    /// The instance, known by `providerID` or found by UID. `addresses` is `None` when
    /// they were not looked up this time.
    Instance { id: String, state: State, addresses: Option<Vec<Address>> },
    /// Observing failed.
    Failed(DriverError),
}

/// Everything [`plan`] decides from.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    pub machine: &'a Machine,
    pub observed: Observed,
    /// Whether the driver's instances are maintained over SSH.
    pub offers_ssh: bool,
    /// The Secret holding the Machine's SSH key, for drivers that offer SSH.
    pub ssh_key_secret: Option<String>,
    /// The Secrets the Machine uses, each guarded by machinist's finalizer, as read this
    /// reconcile; `None` when they were not all read (the status keeps what it had).
    pub secrets: Option<Vec<crate::api::SecretUse>>,
    /// The host key the driver's own SSH logins trusted at first contact, to pin
    /// ([`Driver::first_contact_host_key`](machinist_drivers::Driver::first_contact_host_key)).
    pub first_contact_host_key: Option<String>,
    /// For a restart begun but never recorded ([`restart_intent_since`]): whether the
    /// driver saw the instance's power change since its intent was written (`None`: it
    /// cannot tell, or nothing was asked).
    pub power_changed_since_intent: Option<bool>,
    pub now: Timestamp,
    /// A random number in [0, 1) for jitter; fixed in tests.
    pub jitter: f64,
    pub settings: &'a Settings,
}

/// A driver call to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Create,
    Start,
    /// Graceful stop: one call, bounded by stopTimeoutSeconds. The Kill that follows a
    /// stop not finished in time is a step of its own, counted from this Stop.
    Stop,
    Kill,
    /// Soft restart (driver Restart). A hard one is a Kill, then (once Stopped is
    /// observed) a Start, each its own step.
    Restart,
    Remove,
    /// Connect over SSH with the Machine's key and run a no-op, pinning the host key.
    CheckSsh,
    /// Run `spec.provisioning.script` over SSH; `sha256` identifies the script.
    Provision {
        sha256: String,
    },
}

impl Step {
    /// The operation `status.lastOperation` names for this step.
    pub fn operation(&self) -> Operation {
        match self {
            Step::Create => Operation::Create,
            Step::Start => Operation::Start,
            Step::Stop => Operation::Stop,
            Step::Kill => Operation::Kill,
            Step::Restart => Operation::Restart,
            Step::Remove => Operation::Remove,
            // Not driver operations: they report in SSHReady and Provisioned.
            Step::CheckSsh | Step::Provision { .. } => Operation::Status,
        }
    }
}

/// Why a step is taken; it shapes the recorded messages and Events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// Bringing the instance to the desired state.
    Converge,
    /// The instance was found stopped out of band while it should run.
    Drift,
    /// `spec.restartRequest` asked for it; the value to echo once handled.
    RestartRequest(String),
    /// A graceful stop did not finish in time.
    StopTimeout,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub step: Step,
    pub cause: Cause,
}

/// What a driver call came to.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Create answered with the instance id.
    Created(String),
    Succeeded,
    /// A graceful stop did not return in time and the Kill that followed succeeded.
    /// The call did not answer within its time and was left: it may still take effect
    /// at the provider (a graceful stop the guest is slow to acknowledge). `called_at`
    /// is when it was made, as `begin` showed it.
    Unanswered {
        operation: Operation,
        called_at: Timestamp,
    },
    /// `operation` failed (for a hard restart: Kill, or Start after a successful Kill).
    Failed {
        operation: Operation,
        error: DriverError,
    },
    /// SSH answered with the Machine's key; the host key seen, how it was trusted, and
    /// where.
    SshReady {
        fingerprint: String,
        trust: HostKeyTrust,
        host: String,
        port: u16,
        user: String,
    },
    /// Remove has begun and the provider is still at it; says what it waits for.
    RemovalWaiting(String),
    /// SSH was not tried yet: the first contact waits for the host keys to show (a
    /// booting instance's console); says what it waits for.
    SshPending(String),
    /// SSH did not answer as it should.
    SshFailed(SshFailure),
    /// The provisioning script ran to an exit status (0 is success); `output` holds the
    /// last lines it printed.
    Provisioned {
        exit_status: Option<u32>,
        output: String,
    },
}

/// Why an SSH check or a provisioning run failed, free of the SSH library's types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshFailure {
    /// PascalCase: ConnectionRefused, Timeout, AuthFailed, HostKeyMismatch, Unreachable, ...
    pub reason: &'static str,
    pub message: String,
    /// A slow boot (worth retrying) rather than a wrong setup.
    pub retryable: bool,
    /// For [`HOST_KEY_MISMATCH`]: the key the host presented.
    pub presented_host_key: Option<String>,
}

/// An Event to publish about the Machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    /// PascalCase, stable.
    pub reason: &'static str,
    /// What machinist was doing (the Event's `action`).
    pub action: &'static str,
    pub message: String,
}

impl Note {
    pub fn normal(reason: &'static str, action: &'static str, message: impl Into<String>) -> Self {
        Note { warning: false, reason, action, message: message.into() }
    }

    pub fn warning(reason: &'static str, action: &'static str, message: impl Into<String>) -> Self {
        Note { warning: true, reason, action, message: message.into() }
    }
}

/// The decision: the status to hold now, at most one step to take, when to look again
/// (`None`: only when the Machine changes), and the Events to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub status: MachineStatus,
    pub step: Option<Planned>,
    pub requeue: Option<Duration>,
    pub notes: Vec<Note>,
}

/// For deletion: remove the instance, drop the finalizer, or wait.
#[derive(Clone, Debug, PartialEq)]
pub struct CleanupPlan {
    pub status: MachineStatus,
    pub next: CleanupNext,
    pub notes: Vec<Note>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum CleanupNext {
    /// Call Remove on this instance id.
    Remove(String),
    /// No instance (any more): call the driver's `remove_leftovers` for what Create may
    /// have made before it failed or was interrupted (key pairs, firewall rules).
    RemoveLeftovers,
    /// Nothing left to do: remove the finalizer.
    Finalize,
    /// Keep the finalizer and look again after this long (`None`: when the Machine changes).
    Wait(Option<Duration>),
}
