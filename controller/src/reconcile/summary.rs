//! Shared pieces of the decision: conditions, failures and the Ready summary.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use machinist_drivers::{DriverError, Operation};

use super::{Input, Note, backoff_delay, host_key};
use crate::api::{
    ConditionType, Failures, LastOperation, Machine, MachineStatus, OperationResult, PowerState, get_condition,
    set_condition, set_condition_status,
};

/// Shorthand for setting one condition at the Machine's generation.
pub(super) struct Conditions<'a> {
    pub status: &'a mut MachineStatus,
    pub generation: i64,
    pub now: Timestamp,
}

impl Conditions<'_> {
    pub fn set(&mut self, kind: ConditionType, ok: bool, reason: &str, message: impl Into<String>) {
        set_condition(&mut self.status.conditions, kind, ok, reason, message, self.generation, self.now);
    }

    pub fn unknown(&mut self, kind: ConditionType, reason: &str, message: impl Into<String>) {
        set_condition_status(&mut self.status.conditions, kind, "Unknown", reason, message, self.generation, self.now);
    }
}

pub(super) fn conditions<'a>(status: &'a mut MachineStatus, machine: &Machine, now: Timestamp) -> Conditions<'a> {
    Conditions { status, generation: machine.generation(), now }
}

/// Whether a condition currently says exactly this (used to publish an Event only on
/// a transition, not on every reconcile).
pub(super) fn condition_is(status: &MachineStatus, kind: ConditionType, reason: &str, message: &str) -> bool {
    get_condition(&status.conditions, kind).is_some_and(|c| c.reason == reason && c.message == message)
}

pub(super) fn condition_reason(status: &MachineStatus, kind: ConditionType) -> Option<&str> {
    get_condition(&status.conditions, kind).map(|c| c.reason.as_str())
}

/// Whether the last failure still holds back a new attempt, and for how long.
/// `Some(None)`: no attempt until the spec changes (or, for a host key mismatch, until the
/// presented key is accepted); `Some(Some(d))`: wait `d`.
pub(super) fn held_back(before: &MachineStatus, machine: &Machine, now: Timestamp) -> Option<Option<Duration>> {
    let failures = before.failures.as_ref()?;
    if host_key::acceptance_pending(before, machine) {
        return None;
    }
    // A spec change since the failure earns an immediate attempt.
    let same_generation = get_condition(&before.conditions, ConditionType::Ready)
        .and_then(|c| c.observed_generation)
        .is_some_and(|g| g == machine.generation());
    if !same_generation {
        return None;
    }
    match &failures.next_retry_time {
        None => Some(None),
        Some(at) if at.0 > now => Some(Some(duration_between(now, at.0))),
        Some(_) => None,
    }
}

/// Whether this same failed observation is already recorded and its retry not yet due
/// (as [`held_back`] says it: `Some(None)` for one that is not retried). Recording it again
/// would be a status write whose watch event wakes the Machine again at once: a loop; and
/// a failure that repeats itself costs one write.
pub(super) fn observation_retry_pending(
    before: &MachineStatus,
    machine: &Machine,
    now: Timestamp,
    error: &DriverError,
) -> Option<Option<Duration>> {
    let detail = failure_detail(machine, Operation::Status, error);
    let same =
        before.failures.as_ref().is_some_and(|f| f.reason == error_reason(error) && f.message.starts_with(&detail));
    if same { held_back(before, machine, now) } else { None }
}

pub(super) fn duration_between(from: Timestamp, to: Timestamp) -> Duration {
    Duration::try_from(to.duration_since(from)).unwrap_or(Duration::ZERO)
}

/// When the instance id was recorded: when `InstanceCreated` last became True (Create
/// answered, or the instance was adopted).
pub fn instance_recorded(machine: &Machine) -> Option<Timestamp> {
    let status = machine.status.as_ref()?;
    status.provider_id.as_ref()?;
    get_condition(&status.conditions, ConditionType::InstanceCreated)
        .filter(|c| c.status == "True")
        .map(|c| c.last_transition_time.0)
}

/// Status times have whole-second precision, as the API server stores them; anything
/// finer would make every comparison with the stored status differ.
pub fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

pub(super) fn last_operation(
    status: &mut MachineStatus,
    operation: Operation,
    result: OperationResult,
    message: impl Into<String>,
    now: Timestamp,
) {
    status.last_operation = Some(LastOperation { operation, result, message: message.into(), time: Time(now) });
}

/// How the message of a failed observation (driver Status) starts.
const OBSERVATION_FAILED: &str = "reading the instance failed";

/// What failed, for the failure's message (without the retry).
fn failure_detail(machine: &Machine, operation: Operation, error: &DriverError) -> String {
    let what = match operation {
        Operation::Status => format!("{OBSERVATION_FAILED}: {error}"),
        _ => format!("{operation} failed: {error}"),
    };
    match error {
        DriverError::HostKeyMismatch { presented, .. } => {
            format!("{what}. {}", host_key::mismatch_advice(machine, presented))
        }
        _ => what,
    }
}

/// How a failure that is not retried says so.
fn no_retry_phrase(reason: &str) -> &'static str {
    match reason {
        host_key::HOST_KEY_MISMATCH => "not retrying until the new key is accepted",
        "NotSupported" => "not retrying",
        _ => "not retrying until the spec changes",
    }
}

/// Records the key a host presented instead of the trusted one, and says so in SSHReady.
pub(super) fn record_host_key_mismatch(status: &mut MachineStatus, input: &Input<'_>, presented: &str) {
    status.ssh.get_or_insert_default().presented_host_key_fingerprint = Some(presented.to_string());
    let message = status.failures.as_ref().map(|f| f.message.clone()).unwrap_or_default();
    conditions(status, input.machine, input.now).set(
        ConditionType::SSHReady,
        false,
        host_key::HOST_KEY_MISMATCH,
        message,
    );
}

/// Records a failed driver call: counts it, schedules the retry (none for errors that
/// need a spec change), and words the Event. A failed observation (`Status`) leaves
/// `lastOperation` alone: it names the last operation that changed the instance.
/// Returns the delay until the retry.
pub(super) fn record_failure(
    status: &mut MachineStatus,
    input: &Input<'_>,
    operation: Operation,
    error: &DriverError,
) -> (Option<Duration>, Note) {
    let detail = failure_detail(input.machine, operation, error);
    let recorded = (operation != Operation::Status).then_some(operation);
    let result = record_failure_parts(
        status,
        input,
        recorded,
        error_reason(error),
        &detail,
        error.is_retryable(),
        error.retry_after(),
    );
    if let DriverError::HostKeyMismatch { presented, .. } = error {
        record_host_key_mismatch(status, input, presented);
    }
    result
}

/// Counts a failure, schedules its retry, and records it in `failures` (and in
/// `lastOperation` when a driver operation failed).
pub(super) fn record_failure_parts(
    status: &mut MachineStatus,
    input: &Input<'_>,
    operation: Option<Operation>,
    reason: &'static str,
    detail: &str,
    retryable: bool,
    retry_after: Option<Duration>,
) -> (Option<Duration>, Note) {
    let count = status.failures.as_ref().map_or(0, |f| f.count) + 1;
    let delay = retryable.then(|| backoff_delay(input.settings, count, retry_after, input.jitter));
    let next_retry_time = delay.map(|d| Time(input.now + SignedDuration::try_from(d).unwrap_or(SignedDuration::ZERO)));
    let what = match delay {
        Some(d) => format!("retrying in {}s (attempt {count})", d.as_secs()),
        None => no_retry_phrase(reason).to_string(),
    };
    let message = format!("{detail}; {what}");
    status.failures = Some(Failures { count, reason: reason.to_string(), message: message.clone(), next_retry_time });
    if let Some(operation) = operation {
        last_operation(status, operation, OperationResult::Failed, message.clone(), input.now);
    }
    let action = operation.map_or("CheckSSH", |o| o.as_str());
    (delay, Note::warning(reason, action, message))
}

/// The condition reason for a driver error: an invalid config is an invalid spec.
pub(super) fn error_reason(error: &DriverError) -> &'static str {
    match error {
        DriverError::InvalidConfig { .. } => "InvalidSpec",
        other => other.reason(),
    }
}

/// SSHReady and Provisioned before this reconcile's step: for drivers without SSH, SSH
/// is not applicable; with SSH, they keep what the last check and run recorded, and say
/// what is pending otherwise.
pub(super) fn ssh_conditions(c: &mut Conditions<'_>, machine: &Machine, driver_name: &str, offers_ssh: bool) {
    if !offers_ssh {
        c.set(
            ConditionType::SSHReady,
            true,
            "NotApplicable",
            format!("the {driver_name} driver's instances are not maintained over SSH"),
        );
    } else if get_condition(&c.status.conditions, ConditionType::SSHReady).is_none_or(|s| s.reason == "NotApplicable") {
        c.unknown(ConditionType::SSHReady, "WaitingForSSH", "SSH is checked once the instance runs");
    }
    match &machine.spec.provisioning {
        None => c.set(ConditionType::Provisioned, true, "NotRequested", "spec.provisioning is not set"),
        Some(provisioning) => {
            let ran = c.status.provisioning.as_ref().filter(|p| p.script_sha256 == script_sha256(&provisioning.script));
            let recorded = get_condition(&c.status.conditions, ConditionType::Provisioned)
                .is_some_and(|p| p.reason == "Succeeded" || p.reason == "Failed");
            if ran.is_none() || !recorded {
                c.unknown(ConditionType::Provisioned, "Pending", "the script runs once SSH is ready");
            }
        }
    }
}

/// Whether SSH answered since the instance last (re)started.
pub(super) fn ssh_ready(status: &MachineStatus) -> bool {
    get_condition(&status.conditions, ConditionType::SSHReady).is_some_and(|c| c.status == "True")
}

/// The provisioning script's identity: it runs again only when this changes.
pub fn script_sha256(script: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(script.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Derives `Ready`: a standing failure first (until an attempt succeeds), else from the
/// other conditions: running and usable, or the first reason it is not.
pub(super) fn summarize_ready(c: &mut Conditions<'_>, machine: &Machine) {
    if let Some(failures) = &c.status.failures {
        let (reason, message) = (failures.reason.clone(), failures.message.clone());
        c.set(ConditionType::Ready, false, &reason, message);
        return;
    }
    let blocking = [
        ConditionType::InstanceCreated,
        ConditionType::PowerStateSynced,
        ConditionType::SSHReady,
        ConditionType::Provisioned,
    ]
    .into_iter()
    .find_map(|kind| {
        let cond = get_condition(&c.status.conditions, kind)?;
        (cond.status != "True").then(|| (cond.reason.clone(), cond.message.clone()))
    });
    let missing = [ConditionType::InstanceCreated, ConditionType::PowerStateSynced]
        .into_iter()
        .any(|kind| get_condition(&c.status.conditions, kind).is_none());
    match blocking {
        Some((reason, message)) => c.set(ConditionType::Ready, false, &reason, message),
        None if missing => c.set(ConditionType::Ready, false, "Pending", "waiting for the instance"),
        None if machine.spec.power_state == PowerState::Stopped => {
            c.set(ConditionType::Ready, false, "Stopped", "stopped as desired (spec.powerState: Stopped)")
        }
        None => c.set(ConditionType::Ready, true, "Ready", "the instance is running and ready"),
    }
}

/// Records the Secrets the Machine uses; a Secret whose deletion is held for this Machine
/// is said once, in a Warning Event.
pub(super) fn record_secrets(status: &mut MachineStatus, input: &Input<'_>, notes: &mut Vec<Note>) {
    let Some(secrets) = &input.secrets else { return };
    let ns = input.machine.metadata.namespace.as_deref().unwrap_or_default();
    for used in secrets.iter().filter(|u| u.deletion_held) {
        let known = status.secrets.iter().any(|s| s.name == used.name && s.deletion_held);
        if !known {
            notes.push(Note::warning(
                "SecretInUse",
                "Protect",
                format!(
                    "the Secret {ns}/{} ({}) was deleted while this Machine uses it; it stays until no Machine in the \
                     namespace uses it (finalizer {})",
                    used.name,
                    used.field,
                    crate::api::SECRET_FINALIZER
                ),
            ));
        }
    }
    status.secrets = secrets.clone();
}
