//! The decision for a Machine that is not being deleted.

use std::time::Duration;

use machinist_drivers::{DriverError, Operation, State};

use super::backoff::jittered;
use super::summary::{
    condition_is, condition_reason, conditions, duration_between, error_reason, held_back, last_operation,
    observation_retry_pending, record_failure, record_failure_parts, record_host_key_mismatch, record_secrets,
    script_sha256, ssh_conditions, ssh_ready, summarize_ready,
};
use super::{Cause, Input, Note, Observed, Outcome, Plan, Planned, Step, host_key};

use crate::api::{
    ACCEPT_HOST_KEY_ANNOTATION, ConditionType, MachineStatus, OperationResult, Phase, PowerState, ProvisioningStatus,
    RestartMode, StopMode, get_condition,
};

/// How many SSH checks in a row may fail before machinist stops retrying (with the
/// default backoff, about eight minutes), unlike docker-machine's fixed 60 × 3 s.
pub const MAX_SSH_ATTEMPTS: u32 = 10;

/// What status and Events keep of a provisioning script's output: its last lines, and at
/// most this many bytes of them, so a noisy script cannot push the status write past the
/// object size limit (and run again because its result was never recorded).
pub const OUTPUT_LINES: usize = 20;
pub const OUTPUT_MAX_BYTES: usize = 4096;

/// How often a first SSH contact asks again for host keys a driver has not shown yet.
pub const HOST_KEYS_POLL: Duration = Duration::from_secs(15);

/// Decides the next step for a live (not deleting) Machine.
pub fn plan(input: &Input<'_>) -> Plan {
    let machine = input.machine;
    let before = machine.status.clone().unwrap_or_default();
    let mut status = before.clone();
    let mut notes = Vec::new();
    let driver_name = machine.spec.driver.name().unwrap_or("unknown");
    status.driver = machine.spec.driver.name().map(str::to_string);
    record_secrets(&mut status, input, &mut notes);
    let mut c = conditions(&mut status, machine, input.now);

    if machine.is_paused() {
        if condition_reason(c.status, ConditionType::Paused) != Some("Paused") {
            notes.push(Note::normal("Paused", "Pause", "reconciliation paused by the machinist.dev/paused annotation"));
        }
        c.set(
            ConditionType::Paused,
            true,
            "Paused",
            "the machinist.dev/paused annotation is set: no driver calls until it is removed",
        );
        return Plan { status, step: None, requeue: None, notes };
    }
    if condition_reason(c.status, ConditionType::Paused) == Some("Paused") {
        notes.push(Note::normal("Resumed", "Pause", "the machinist.dev/paused annotation was removed"));
    }
    c.set(ConditionType::Paused, false, "NotPaused", "");
    c.set(ConditionType::Deleting, false, "NotDeleting", "");

    // What the schema cannot check: provisioning needs SSH.
    let observed = match (&input.observed, &machine.spec.provisioning) {
        (Observed::InvalidSpec(_), _) | (_, None) => input.observed.clone(),
        (_, Some(_)) if !input.offers_ssh => Observed::InvalidSpec(DriverError::invalid_config(
            "spec.provisioning",
            format!("the {driver_name} driver offers no SSH to run a provisioning script; remove spec.provisioning"),
        )),
        _ => input.observed.clone(),
    };

    match observed {
        Observed::InvalidSpec(error) => {
            let message = error.to_string();
            if !condition_is(c.status, ConditionType::Ready, "InvalidSpec", &message) {
                notes.push(Note::warning("InvalidSpec", "Validate", message.clone()));
            }
            c.set(ConditionType::Ready, false, "InvalidSpec", message);
            status.phase = Some(Phase::Failed);
            // Nothing is called while the spec is invalid, so there is no attempt to count
            // or hold back: once it is fixed (in the spec, or a Secret it names appears),
            // the next observation goes ahead at once.
            status.failures = None;
            Plan { status, step: None, requeue: None, notes }
        }
        Observed::Failed(error) => {
            if let Some(wait) = observation_retry_pending(&before, machine, input.now, &error) {
                let requeue = wait.unwrap_or_else(|| jittered(input.settings.poll_interval, input.jitter));
                return Plan { status: before.clone(), step: None, requeue: Some(requeue), notes };
            }
            let (delay, note) = record_failure(c.status, input, Operation::Status, &error);
            if let DriverError::HostKeyMismatch { .. } = error {
                // Whoever answers is not the host machinist knows: never shown as Running.
                status.state = Some(State::Error);
                status.phase = Some(Phase::Failed);
            }
            let mut c = conditions(&mut status, machine, input.now);
            c.unknown(
                ConditionType::PowerStateSynced,
                error_reason(&error),
                format!("cannot read the instance's state: {error}"),
            );
            ssh_conditions(&mut c, machine, driver_name, input.offers_ssh);
            summarize_ready(&mut c, machine);
            notes.push(note);
            Plan { status, step: None, requeue: delay.or(Some(input.settings.poll_interval)), notes }
        }
        // A known providerID is never forgotten: its instance is gone, never recreated.
        Observed::NoInstance if before.provider_id.is_some() => {
            let id = before.provider_id.clone().unwrap_or_default();
            plan_instance(input, before, status, notes, driver_name, id, State::NotFound, None)
        }
        Observed::NoInstance => {
            c.set(ConditionType::InstanceCreated, false, "Creating", "creating the instance");
            c.unknown(ConditionType::PowerStateSynced, "NoInstance", "the instance does not exist yet");
            ssh_conditions(&mut c, machine, driver_name, input.offers_ssh);
            summarize_ready(&mut c, machine);
            match held_back(&before, machine, input.now) {
                Some(wait) => {
                    status.phase = Some(Phase::Pending);
                    Plan { status, step: None, requeue: wait, notes }
                }
                None => {
                    status.phase = Some(Phase::Creating);
                    let step = Some(Planned { step: Step::Create, cause: Cause::Converge });
                    Plan { status, step, requeue: None, notes }
                }
            }
        }
        Observed::Instance { id, state, addresses } => {
            plan_instance(input, before, status, notes, driver_name, id, state, addresses)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn plan_instance(
    input: &Input<'_>,
    before: MachineStatus,
    mut status: MachineStatus,
    mut notes: Vec<Note>,
    driver_name: &str,
    id: String,
    state: State,
    addresses: Option<Vec<machinist_drivers::Address>>,
) -> Plan {
    let machine = input.machine;
    let spec = &machine.spec;
    let settings = input.settings;
    if status.provider_id.is_none() {
        notes.push(Note::normal(
            "Adopted",
            "Create",
            format!("found instance {id} tagged with this Machine's UID; adopting it instead of creating another"),
        ));
    }
    status.provider_id = Some(id.clone());
    let previous_state = before.state;
    status.state = Some(state);
    if let Some(secret) = &input.ssh_key_secret {
        status.ssh.get_or_insert_default().key_secret_name = Some(secret.clone());
    }
    if let Some(addresses) = addresses {
        status.addresses = addresses;
    }
    pin_first_contact(&mut status, &mut notes, input);
    let mut c = conditions(&mut status, machine, input.now);

    if state == State::NotFound {
        let message = format!(
            "instance {id} no longer exists at the provider; machinist never creates a second instance for a Machine: delete this Machine"
        );
        if !condition_is(c.status, ConditionType::InstanceCreated, "InstanceNotFound", &message) {
            notes.push(Note::warning("InstanceNotFound", "Observe", message.clone()));
        }
        c.set(ConditionType::InstanceCreated, false, "InstanceNotFound", message.clone());
        c.set(ConditionType::PowerStateSynced, false, "InstanceNotFound", message);
        ssh_conditions(&mut c, machine, driver_name, input.offers_ssh);
        summarize_ready(&mut c, machine);
        status.phase = Some(Phase::Failed);
        status.addresses.clear();
        return Plan { status, step: None, requeue: Some(jittered(settings.poll_interval, input.jitter)), notes };
    }
    c.set(ConditionType::InstanceCreated, true, "Created", format!("instance {id} exists"));
    ssh_conditions(&mut c, machine, driver_name, input.offers_ssh);

    let mut restart =
        spec.restart_request.as_ref().filter(|r| before.last_restart_request.as_ref() != Some(*r)).cloned();
    // A restart begun for this very request whose result never reached the status. Where
    // the driver can tell, it is done exactly once; else it may or may not have happened,
    // and is never repeated: handled, and said.
    let interrupted = restart_intent_since(machine).and(restart.clone());
    match (interrupted.clone(), input.power_changed_since_intent) {
        (Some(_), Some(false)) => {
            // Nothing happened since the intent: the call was never made. Made now.
        }
        (Some(request), Some(true)) => {
            notes.push(Note::normal(
                "Restarted",
                "Restart",
                format!(
                    "the restart for spec.restartRequest {request:?} was interrupted before its result was recorded; \
                     the provider shows the instance's power changed since, so it happened and is not repeated"
                ),
            ));
            c.status.last_restart_request = Some(request);
            restart = None;
        }
        (Some(request), None) => {
            notes.push(Note::warning(
                "RestartInterrupted",
                "Restart",
                format!(
                    "the restart for spec.restartRequest {request:?} was interrupted before its result was recorded \
                     (machinist stopped, or could not write the status); the {driver_name} driver cannot tell whether \
                     it happened, and it is not repeated. Set spec.restartRequest to a new value to restart again"
                ),
            ));
            c.status.last_restart_request = Some(request);
            restart = None;
        }
        (None, _) => {}
    }
    // Only `begin` records an intent, for the call it shows; any other is done with.
    c.status.restart_request_in_progress = None;
    let last_op = before.last_operation.as_ref();
    let restarting = before.phase == Some(Phase::Restarting);
    let progress = Some(settings.progress_interval);

    // (step, phase, PowerStateSynced reason and message when not in sync)
    let mut step: Option<Planned> = None;
    let mut requeue = progress;
    // The Event of a Kill for a stop timeout, published only when the Kill is made.
    let mut escalation: Option<Note> = None;
    let phase;
    // A stop of machinist's own that the guest has not obeyed yet, while the provider
    // still reports the instance up (providers that power off by ACPI report Running
    // until the guest does): it is stopping, whatever the provider says. No second Stop;
    // the Kill comes after stopTimeoutSeconds, counted from that Stop.
    // So is the Kill of a hard restart, until Stopped is observed; one seen up again past
    // stopTimeoutSeconds was killed and runs again (started by someone else): nothing
    // more to do, and never a second Kill.
    // (An operation begun whose call the driver shows was never made is not pending.)
    let never_made = interrupted.is_some() && input.power_changed_since_intent == Some(false);
    let own_stop = |phase: Phase, operations: &[Operation]| {
        before.phase == Some(phase)
            && !never_made
            && last_op.is_some_and(|op| operations.contains(&op.operation) && op.result != OperationResult::Failed)
    };
    let killed_long_ago = last_op.is_some_and(|op| duration_between(op.time.0, input.now) >= spec.stop_timeout());
    let own_stop_pending = matches!(state, State::Running | State::Paused | State::Saved)
        && match spec.power_state {
            PowerState::Stopped => own_stop(Phase::Stopping, &[Operation::Stop, Operation::Kill]),
            PowerState::Running => own_stop(Phase::Restarting, &[Operation::Kill]) && !killed_long_ago,
        };
    let state = if own_stop_pending { State::Stopping } else { state };
    match (spec.power_state, state) {
        (PowerState::Running, State::Running) => {
            if let Some(request) = restart {
                let s = match spec.restart_mode {
                    RestartMode::Soft => Step::Restart,
                    // Kill now; Start once the instance is observed stopped.
                    RestartMode::Hard => Step::Kill,
                };
                step = Some(Planned { step: s, cause: Cause::RestartRequest(request) });
                phase = Phase::Restarting;
                c.set(ConditionType::PowerStateSynced, false, "Restarting", "restarting as spec.restartRequest asks");
            } else {
                phase = Phase::Running;
                c.set(ConditionType::PowerStateSynced, true, "Running", "running as desired");
                let provisioning = spec.provisioning.as_ref().map(|p| script_sha256(&p.script));
                let provisioned =
                    |sha: &String| c.status.provisioning.as_ref().is_some_and(|p| &p.script_sha256 == sha);
                if input.offers_ssh && !ssh_ready(c.status) {
                    step = Some(Planned { step: Step::CheckSsh, cause: Cause::Converge });
                } else if let Some(sha256) = provisioning.filter(|sha| input.offers_ssh && !provisioned(sha)) {
                    step = Some(Planned { step: Step::Provision { sha256 }, cause: Cause::Converge });
                } else {
                    requeue = Some(jittered(settings.poll_interval, input.jitter));
                }
            }
        }
        (PowerState::Running, State::Stopped | State::Paused | State::Saved) => {
            // Not drift when machinist itself stopped it (and powerState flipped back since).
            let drift = previous_state == Some(State::Running)
                && !restarting
                && last_op.is_none_or(|op| {
                    op.result == OperationResult::Succeeded
                        && !matches!(op.operation, Operation::Stop | Operation::Kill)
                });
            let cause = match restart {
                // A restart of a stopped machine is a start.
                Some(request) => Cause::RestartRequest(request),
                None if drift => Cause::Drift,
                None => Cause::Converge,
            };
            let message = match cause {
                Cause::Drift => {
                    format!("the instance was found {state} out of band while spec.powerState is Running; starting it")
                }
                _ => format!("the instance is {state}; starting it"),
            };
            if cause == Cause::Drift {
                notes.push(Note::warning("StoppedOutOfBand", "Start", message.clone()));
            }
            c.set(ConditionType::PowerStateSynced, false, "Starting", message);
            step = Some(Planned { step: Step::Start, cause });
            phase = Phase::Starting;
        }
        (PowerState::Running, State::Starting) => {
            phase = if restarting { Phase::Restarting } else { Phase::Starting };
            c.set(ConditionType::PowerStateSynced, false, "Starting", "waiting for the instance to finish starting");
        }
        (PowerState::Stopped, State::Stopped) => {
            phase = Phase::Stopped;
            c.set(ConditionType::PowerStateSynced, true, "Stopped", "stopped as desired");
            requeue = Some(jittered(settings.poll_interval, input.jitter));
            if let Some(request) = restart {
                skip_restart(&mut status, &mut notes, request);
            }
        }
        (PowerState::Stopped, State::Running | State::Paused | State::Saved) => {
            if let Some(request) = restart {
                skip_restart(&mut status, &mut notes, request);
            }
            let mut c = super::summary::conditions(&mut status, machine, input.now);
            let s = match spec.stop_mode {
                StopMode::Graceful => Step::Stop { escalate_after: spec.stop_timeout() },
                StopMode::Force => Step::Kill,
            };
            c.set(ConditionType::PowerStateSynced, false, "Stopping", format!("the instance is {state}; stopping it"));
            step = Some(Planned { step: s, cause: Cause::Converge });
            phase = Phase::Stopping;
        }
        (desired, State::Stopping) => {
            phase = if restarting && desired == PowerState::Running { Phase::Restarting } else { Phase::Stopping };
            // A stop that does not finish is killed after the stop timeout, counted from
            // machinist's own Stop or Kill, else from when the power state went out of
            // sync: never an endless wait (a failed Kill, a failed observation, a hung
            // stop while Running is desired again).
            let graceful = last_op.filter(|op| op.operation == Operation::Stop && op.result != OperationResult::Failed);
            let own = last_op.filter(|op| {
                matches!(op.operation, Operation::Stop | Operation::Kill) && op.result != OperationResult::Failed
            });
            let out_of_sync = get_condition(&before.conditions, ConditionType::PowerStateSynced)
                .filter(|p| p.status != "True")
                .map(|p| p.last_transition_time.0);
            let since = own.map(|op| op.time.0).or(out_of_sync).unwrap_or(input.now);
            let waited = duration_between(since, input.now);
            let timeout = spec.stop_timeout();
            let what = if graceful.is_some() { "graceful stop" } else { "stop" };
            if waited >= timeout {
                escalation = Some(Note::warning(
                    "StopTimedOut",
                    "Kill",
                    format!("the {what} did not finish within {}s; killing the instance", timeout.as_secs()),
                ));
                c.set(
                    ConditionType::PowerStateSynced,
                    false,
                    "Stopping",
                    format!("the {what} timed out; killing the instance"),
                );
                step = Some(Planned { step: Step::Kill, cause: Cause::StopTimeout });
            } else {
                let message = match (graceful, desired) {
                    (Some(_), _) => format!("waiting for the graceful stop (killed after {}s)", timeout.as_secs()),
                    (None, PowerState::Stopped) => "waiting for the instance to finish stopping".to_string(),
                    (None, PowerState::Running) => {
                        "waiting for the instance to finish stopping before starting it again".to_string()
                    }
                };
                c.set(ConditionType::PowerStateSynced, false, "Stopping", message);
                requeue = Some((timeout - waited).min(settings.progress_interval).max(Duration::from_millis(200)));
            }
        }
        (PowerState::Stopped, State::Starting) => {
            phase = Phase::Starting;
            c.set(
                ConditionType::PowerStateSynced,
                false,
                "Starting",
                "waiting for the instance to finish starting before stopping it",
            );
        }
        (_, State::Error) => {
            phase = Phase::Failed;
            let message = "the provider reports the instance in state Error; look at it in the provider's console";
            if !condition_is(c.status, ConditionType::PowerStateSynced, "InstanceError", message) {
                notes.push(Note::warning("InstanceError", "Observe", message));
            }
            c.set(ConditionType::PowerStateSynced, false, "InstanceError", message);
            requeue = Some(jittered(settings.poll_interval, input.jitter).min(Duration::from_secs(30)));
        }
        (_, State::None | State::Timeout | State::NotFound) => {
            phase = before.phase.unwrap_or(Phase::Pending);
            c.unknown(ConditionType::PowerStateSynced, "StateUnknown", format!("the driver reports state {state}"));
        }
    }

    // A recent failure holds the step back until its retry is due.
    let mut held = false;
    if step.is_some()
        && let Some(wait) = held_back(&before, machine, input.now)
    {
        {
            step = None;
            held = true;
            requeue = match wait {
                Some(delay) => Some(delay),
                // Not retried until the spec changes (unsupported, invalid): keep the
                // failure's explanation, and keep watching the instance's state.
                None => {
                    let kept = get_condition(&before.conditions, ConditionType::PowerStateSynced).cloned();
                    if let Some(kept) = kept {
                        status.conditions.retain(|c| c.type_ != kept.type_);
                        status.conditions.push(kept);
                        let order = |c: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition| {
                            ConditionType::ALL.iter().position(|k| k.as_str() == c.type_).unwrap_or(usize::MAX)
                        };
                        status.conditions.sort_by_key(order);
                    }
                    Some(jittered(settings.poll_interval, input.jitter))
                }
            };
        }
    }
    if step.is_some() {
        notes.extend(escalation);
    }
    let mut c = conditions(&mut status, machine, input.now);
    // (A step held back by a failure is not converged: its failure and retry stay.)
    if step.is_none()
        && !held
        && get_condition(&c.status.conditions, ConditionType::PowerStateSynced).is_some_and(|p| p.status == "True")
    {
        // Converged: the last failure, if any, is history.
        c.status.failures = None;
        c.status.observed_generation = Some(machine.generation());
    }
    summarize_ready(&mut c, machine);
    if get_condition(&status.conditions, ConditionType::Ready).is_some_and(|r| r.status == "True")
        && get_condition(&before.conditions, ConditionType::Ready).is_none_or(|r| r.status != "True")
    {
        notes.push(Note::normal("Ready", "Reconcile", "the instance is running and ready"));
    }
    status.phase = Some(phase);
    Plan { status, step, requeue, notes }
}

/// The end of a script's output, bounded by [`OUTPUT_LINES`] and [`OUTPUT_MAX_BYTES`]
/// (on a character boundary); a cut is marked with `…`.
pub fn output_tail(text: &str) -> String {
    let text = text.trim_end();
    let lines: Vec<&str> = text.lines().collect();
    let last = lines[lines.len().saturating_sub(OUTPUT_LINES)..].join("\n");
    if last.len() <= OUTPUT_MAX_BYTES {
        return last;
    }
    let mut start = last.len() - (OUTPUT_MAX_BYTES - '…'.len_utf8());
    while !last.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &last[start..])
}

/// Pins the host key the driver's own login trusted at first contact, when nothing is
/// pinned yet (the generic driver's bootstrap login).
fn pin_first_contact(status: &mut MachineStatus, notes: &mut Vec<Note>, input: &Input<'_>) {
    let Some(fingerprint) = &input.first_contact_host_key else { return };
    let ssh = status.ssh.get_or_insert_default();
    if ssh.host_key_fingerprint.is_none() {
        ssh.host_key_fingerprint = Some(fingerprint.clone());
        notes.push(Note::normal(
            "HostKeyPinned",
            "Create",
            format!("pinned the host key {fingerprint} seen at the driver's first SSH contact"),
        ));
    }
}

/// When the intent of a restart that may have been called but was never recorded was
/// written: `status.restartRequestInProgress` names the current `spec.restartRequest`,
/// which is not handled yet. The Kubernetes layer then asks the driver whether the
/// instance's power changed since ([`Input::power_changed_since_intent`]).
pub fn restart_intent_since(machine: &crate::api::Machine) -> Option<jiff::Timestamp> {
    let status = machine.status.as_ref()?;
    let request = machine.spec.restart_request.as_ref()?;
    let intent = status.restart_request_in_progress.as_ref().filter(|r| *r == request)?;
    if status.last_restart_request.as_ref() == Some(intent) {
        return None;
    }
    // `begin` wrote the intent with the InProgress operation it shows, and its time.
    let op = status.last_operation.as_ref()?;
    Some(op.time.0)
}

fn skip_restart(status: &mut MachineStatus, notes: &mut Vec<Note>, request: String) {
    notes.push(Note::normal(
        "RestartSkipped",
        "Restart",
        format!("restart request {request:?} needs no restart: spec.powerState is Stopped"),
    ));
    status.last_restart_request = Some(request);
}

/// Folds the outcome of `planned` into the status decided by [`plan`].
pub fn record(input: &Input<'_>, plan: &Plan, planned: &Planned, outcome: Outcome) -> Plan {
    let machine = input.machine;
    let mut status = plan.status.clone();
    let mut notes = Vec::new();
    let now = input.now;
    let progress = Some(input.settings.progress_interval);
    match outcome {
        Outcome::Created(id) => {
            status.provider_id = Some(id.clone());
            status.failures = None;
            pin_first_contact(&mut status, &mut notes, input);
            status.phase = Some(Phase::Creating);
            last_operation(
                &mut status,
                planned.step.operation(),
                OperationResult::Succeeded,
                format!("created instance {id}"),
                now,
            );
            let mut c = conditions(&mut status, machine, now);
            c.set(ConditionType::InstanceCreated, true, "Created", format!("instance {id} exists"));
            c.unknown(
                ConditionType::PowerStateSynced,
                "Creating",
                "the instance was created; waiting for its first state",
            );
            summarize_ready(&mut c, machine);
            notes.push(Note::normal("Created", "Create", format!("created instance {id}")));
            // The status write wakes the next reconcile; this is the fallback.
            Plan { status, step: None, requeue: progress, notes }
        }
        Outcome::Succeeded | Outcome::StopEscalated => {
            status.failures = None;
            // The Start that completes a hard restart: it follows that restart's Kill.
            let before = machine.status.as_ref();
            let restarting_hard = before.is_some_and(|s| s.phase == Some(Phase::Restarting))
                && before
                    .and_then(|s| s.last_operation.as_ref())
                    .is_some_and(|op| op.operation == Operation::Kill && op.result == OperationResult::Succeeded);
            let (phase, reason, message) = match (&planned.step, &outcome) {
                (_, Outcome::StopEscalated) => (
                    Phase::Stopping,
                    "StopTimedOut",
                    format!(
                        "the graceful stop did not finish within {}s; killed the instance",
                        machine.spec.stop_timeout().as_secs()
                    ),
                ),
                (Step::Start, _) if planned.cause == Cause::Drift => {
                    (Phase::Starting, "Started", "started the instance after it was stopped out of band".to_string())
                }
                (Step::Start, _) if restarting_hard => (
                    Phase::Restarting,
                    "Restarted",
                    "restarted the instance: killed it, then started it once it was stopped (restartMode: Hard)"
                        .to_string(),
                ),
                (Step::Start, _) => (Phase::Starting, "Started", "started the instance".to_string()),
                (Step::Stop { .. }, _) => {
                    (Phase::Stopping, "Stopped", "asked the instance to stop gracefully".to_string())
                }
                (Step::Kill, _) if planned.cause == Cause::StopTimeout => (
                    Phase::Stopping,
                    "StopTimedOut",
                    format!(
                        "the graceful stop did not finish within {}s; killed the instance",
                        machine.spec.stop_timeout().as_secs()
                    ),
                ),
                (Step::Kill, _) if matches!(planned.cause, Cause::RestartRequest(_)) => (
                    Phase::Restarting,
                    "Killed",
                    "killed the instance for the restart; it is started once it is stopped (restartMode: Hard)"
                        .to_string(),
                ),
                (Step::Kill, _) => (Phase::Stopping, "Killed", "killed the instance (stopMode: Force)".to_string()),
                (Step::Restart, _) => {
                    (Phase::Restarting, "Restarted", "restarted the instance (restartMode: Soft)".to_string())
                }
                (Step::Create | Step::Remove | Step::CheckSsh | Step::Provision { .. }, _) => {
                    (Phase::Creating, "Succeeded", String::new())
                }
            };
            let operation = match outcome {
                Outcome::StopEscalated => Operation::Kill,
                _ => planned.step.operation(),
            };
            last_operation(&mut status, operation, OperationResult::Succeeded, message.clone(), now);
            // A hard restart is carried out by its Kill: bringing the instance back up is
            // ordinary convergence (Start once it is observed stopped).
            if let Cause::RestartRequest(request) = &planned.cause {
                status.last_restart_request = Some(request.clone());
            }
            if input.offers_ssh && matches!(planned.step, Step::Start | Step::Restart) {
                conditions(&mut status, machine, now).unknown(
                    ConditionType::SSHReady,
                    "WaitingForSSH",
                    "the instance (re)started; SSH is checked again",
                );
            }
            if input.offers_ssh && matches!(planned.step, Step::Stop { .. } | Step::Kill) {
                conditions(&mut status, machine, now).unknown(
                    ConditionType::SSHReady,
                    "InstanceStopped",
                    "the instance is stopped; SSH is checked when it runs again",
                );
            }
            status.phase = Some(phase);
            let warning = reason == "StopTimedOut";
            notes.push(Note { warning, reason, action: operation.as_str(), message });
            // The step went through: Ready no longer shows the last failure.
            summarize_ready(&mut conditions(&mut status, machine, now), machine);
            Plan { status, step: None, requeue: progress, notes }
        }
        Outcome::SshReady { fingerprint, trust, host, port, user } => {
            let ssh = status.ssh.get_or_insert_default();
            if let Some(old) = ssh.host_key_fingerprint.as_ref().filter(|old| **old != fingerprint) {
                let message = if host_key::accept_annotation(machine) == Some(fingerprint.as_str()) {
                    format!(
                        "accepted the new host key {fingerprint} (was {old}), as the {ACCEPT_HOST_KEY_ANNOTATION} \
                         annotation asks"
                    )
                } else {
                    format!(
                        "pinned the host key {fingerprint} (was {old}), as spec.driver.generic.hostKeyFingerprint says"
                    )
                };
                notes.push(Note::normal("HostKeyAccepted", "CheckSSH", message));
            }
            ssh.host_key_fingerprint = Some(fingerprint.clone());
            ssh.presented_host_key_fingerprint = None;
            ssh.host = Some(host.clone());
            ssh.port = Some(port);
            ssh.user = Some(user.clone());
            status.failures = None;
            let message = host_key::ready_message(&host, port, &user, &fingerprint, &trust);
            let mut c = conditions(&mut status, machine, now);
            c.set(ConditionType::SSHReady, true, "Ready", message.clone());
            summarize_ready(&mut c, machine);
            notes.push(Note::normal("SSHReady", "CheckSSH", message));
            Plan { status, step: None, requeue: progress, notes }
        }
        // Remove belongs to deletion (`record_cleanup`); nothing to fold in here.
        Outcome::RemovalWaiting(_) => Plan { status, step: None, requeue: progress, notes },
        Outcome::SshPending(message) => {
            let mut c = conditions(&mut status, machine, now);
            c.unknown(ConditionType::SSHReady, "WaitingForHostKeys", message);
            summarize_ready(&mut c, machine);
            Plan { status, step: None, requeue: Some(HOST_KEYS_POLL), notes }
        }
        Outcome::SshFailed(failure) => {
            let what = match planned.step {
                Step::Provision { .. } => "provisioning could not run: ",
                _ => "",
            };
            // Bounded: after MAX_SSH_ATTEMPTS in a row, no more retries until the Machine
            // changes (a spec edit, a restart request).
            let attempts = status.failures.as_ref().map_or(0, |f| f.count) + 1;
            let exhausted = attempts >= MAX_SSH_ATTEMPTS;
            let detail = match &failure.presented_host_key {
                Some(presented) => {
                    format!("{what}{}. {}", failure.message, host_key::mismatch_advice(machine, presented))
                }
                None if exhausted && failure.retryable => format!(
                    "{what}{}; gave up after {attempts} attempts: fix the cause, then change the Machine's spec (for example set spec.restartRequest) to try again",
                    failure.message
                ),
                None => format!("{what}{}", failure.message),
            };
            let retryable = failure.retryable && !exhausted;
            let (delay, note) =
                record_failure_parts(&mut status, input, None, failure.reason, &detail, retryable, None);
            notes.push(note);
            if let Some(presented) = &failure.presented_host_key {
                record_host_key_mismatch(&mut status, input, presented);
            }
            let message = status.failures.as_ref().map(|f| f.message.clone()).unwrap_or_default();
            let mut c = conditions(&mut status, machine, now);
            c.set(ConditionType::SSHReady, false, failure.reason, message);
            summarize_ready(&mut c, machine);
            Plan {
                status,
                step: None,
                requeue: delay.or(Some(jittered(input.settings.poll_interval, input.jitter))),
                notes,
            }
        }
        Outcome::Provisioned { exit_status, output } => {
            let Step::Provision { sha256 } = &planned.step else {
                unreachable!("a provisioning outcome comes from a Provision step")
            };
            let succeeded = exit_status == Some(0);
            status.provisioning = Some(ProvisioningStatus { script_sha256: sha256.clone(), succeeded });
            status.failures = None;
            let mut c = conditions(&mut status, machine, now);
            if succeeded {
                c.set(ConditionType::Provisioned, true, "Succeeded", "the provisioning script exited 0");
                notes.push(Note::normal("Provisioned", "Provision", "the provisioning script exited 0"));
            } else {
                let exit = exit_status.map_or_else(|| "without an exit status".to_string(), |e| format!("with {e}"));
                let message = format!(
                    "the provisioning script exited {exit}; it runs again only when spec.provisioning.script changes. Last output:\n{}",
                    output_tail(&output)
                );
                c.set(ConditionType::Provisioned, false, "Failed", message.clone());
                notes.push(Note::warning("ProvisioningFailed", "Provision", message));
            }
            summarize_ready(&mut c, machine);
            Plan { status, step: None, requeue: progress, notes }
        }
        Outcome::Failed { operation, error } => {
            let (delay, note) = record_failure(&mut status, input, operation, &error);
            notes.push(note);
            // A restart the driver cannot do is handled: said, and not retried.
            let handled = matches!(error, DriverError::NotSupported { .. });
            if let (true, Cause::RestartRequest(request)) = (handled, &planned.cause) {
                status.last_restart_request = Some(request.clone());
            }
            let reason = error_reason(&error);
            let message = status.failures.as_ref().map(|f| f.message.clone()).unwrap_or_default();
            let mut c = conditions(&mut status, machine, now);
            match operation {
                Operation::Create => c.set(ConditionType::InstanceCreated, false, reason, message.clone()),
                _ => c.set(ConditionType::PowerStateSynced, false, reason, message.clone()),
            }
            c.set(ConditionType::Ready, false, reason, message);
            if matches!(error, DriverError::InvalidConfig { .. }) {
                status.phase = Some(Phase::Failed);
            }
            let requeue = match (&error, delay) {
                // Not retried; still polled so the state shown stays true.
                (DriverError::NotSupported { .. }, _) => Some(jittered(input.settings.poll_interval, input.jitter)),
                (_, delay) => delay,
            };
            Plan { status, step: None, requeue, notes }
        }
    }
}

/// The status to show while `planned` runs: its phase and an InProgress `lastOperation`.
pub fn begin(plan: &Plan, planned: &Planned, now: jiff::Timestamp) -> MachineStatus {
    let mut status = plan.status.clone();
    if let Step::Provision { .. } | Step::CheckSsh = planned.step {
        if matches!(planned.step, Step::Provision { .. }) {
            let generation = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Provisioned")
                .and_then(|c| c.observed_generation)
                .unwrap_or_default();
            crate::api::set_condition_status(
                &mut status.conditions,
                ConditionType::Provisioned,
                "Unknown",
                "Running",
                "the provisioning script is running",
                generation,
                now,
            );
        }
        return status;
    }
    let message = match &planned.step {
        Step::Create => "creating the instance",
        Step::Start => "starting the instance",
        Step::Stop { .. } => "stopping the instance gracefully",
        Step::Kill if planned.cause == Cause::StopTimeout => "killing the instance: the graceful stop timed out",
        Step::Kill if matches!(planned.cause, Cause::RestartRequest(_)) => {
            "restarting the instance: killing it, then starting it once it is stopped (restartMode: Hard)"
        }
        Step::Kill => "killing the instance",
        Step::Restart => "restarting the instance",
        Step::Remove => "removing the instance",
        Step::CheckSsh | Step::Provision { .. } => unreachable!("handled above"),
    };
    last_operation(&mut status, planned.step.operation(), OperationResult::InProgress, message, now);
    // The intent, before the call: a restart is at most once per request.
    if let Cause::RestartRequest(request) = &planned.cause {
        status.restart_request_in_progress = Some(request.clone());
    }
    status
}
