//! The power-state rules: what a running instance needs next, from `spec.powerState`,
//! the observed state and machinist's own operation in flight; how a stop escalates to
//! a Kill; how a restart request is carried out once; and when a recent failure holds
//! the step back.

use std::time::Duration;

use machinist_drivers::{Operation, State};

use super::backoff::jittered;
use super::summary::{condition_is, conditions, duration_between, held_back, script_sha256, ssh_ready};
use super::{Cause, Input, Note, Planned, Step};
use crate::api::{
    ConditionType, MachineStatus, OperationResult, Phase, PowerState, RestartMode, StopMode, get_condition,
};

/// The step for an existing instance, the phase to show, and when to look again.
pub(super) struct PowerPlan {
    pub step: Option<Planned>,
    pub phase: Phase,
    pub requeue: Option<Duration>,
    /// A step was due but a recent failure holds it back: not converged.
    pub held: bool,
}

/// The `spec.restartRequest` to act on now, once one begun and never recorded is
/// settled; and whether the driver showed that begun call was never made.
pub(super) fn pending_restart(
    input: &Input<'_>,
    before: &MachineStatus,
    status: &mut MachineStatus,
    notes: &mut Vec<Note>,
    driver_name: &str,
) -> (Option<String>, bool) {
    let machine = input.machine;
    let spec = &machine.spec;
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
            status.last_restart_request = Some(request);
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
            status.last_restart_request = Some(request);
            restart = None;
        }
        (None, _) => {}
    }
    // Only `begin` records an intent, for the call it shows; any other is done with.
    status.restart_request_in_progress = None;
    let never_made = interrupted.is_some() && input.power_changed_since_intent == Some(false);
    (restart, never_made)
}

/// The `(spec.powerState, observed state)` rules, stop escalation and hold-back.
pub(super) fn plan_power(
    input: &Input<'_>,
    before: &MachineStatus,
    status: &mut MachineStatus,
    notes: &mut Vec<Note>,
    state: State,
    restart: Option<String>,
    never_made: bool,
) -> PowerPlan {
    let machine = input.machine;
    let spec = &machine.spec;
    let settings = input.settings;
    let previous_state = before.state;
    let mut c = conditions(status, machine, input.now);
    let last_op = before.last_operation.as_ref();
    let restarting = before.phase == Some(Phase::Restarting);
    let progress = Some(settings.progress_interval);

    // (step, phase, PowerStateSynced reason and message when not in sync)
    let mut step: Option<Planned> = None;
    let mut requeue = progress;
    // The Event of a Kill for a stop timeout, published only when the Kill is made.
    let mut escalation: Option<Note> = None;
    let phase;
    let state = state_with_own_stop(input, before, state, never_made);
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
                skip_restart(status, notes, request);
            }
        }
        (PowerState::Stopped, State::Running | State::Paused | State::Saved) => {
            if let Some(request) = restart {
                skip_restart(status, notes, request);
            }
            let mut c = conditions(status, machine, input.now);
            // A Kill of this stop that failed is retried (after its backoff): a stop
            // escalated once is never taken back to a graceful Stop.
            let kill_failed = before.phase == Some(Phase::Stopping)
                && last_op.is_some_and(|op| op.operation == Operation::Kill && op.result == OperationResult::Failed);
            let s = match spec.stop_mode {
                StopMode::Graceful if !kill_failed => Step::Stop,
                StopMode::Graceful | StopMode::Force => Step::Kill,
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

    let (step, requeue, held) = hold_back(input, before, status, step, requeue);
    if step.is_some() {
        notes.extend(escalation);
    }
    PowerPlan { step, phase, requeue, held }
}

/// The observed state, except while machinist's own stop is pending. A stop the guest
/// has not obeyed yet, while the provider still reports the instance up (providers that
/// power off by ACPI report Running until the guest does) or in Error: it is stopping,
/// whatever the provider says. No second Stop; the Kill comes after stopTimeoutSeconds, counted from
/// that Stop. So is the Kill of a hard restart, until Stopped is observed; one seen up
/// again past stopTimeoutSeconds was killed and runs again (started by someone else):
/// nothing more to do, and never a second Kill. An operation begun whose call the driver
/// shows was never made (`never_made`) is not pending.
fn state_with_own_stop(input: &Input<'_>, before: &MachineStatus, state: State, never_made: bool) -> State {
    let spec = &input.machine.spec;
    let last_op = before.last_operation.as_ref();
    let own_stop = |phase: Phase, operations: &[Operation]| {
        before.phase == Some(phase)
            && !never_made
            && last_op.is_some_and(|op| operations.contains(&op.operation) && op.result != OperationResult::Failed)
    };
    let killed_long_ago = last_op.is_some_and(|op| duration_between(op.time.0, input.now) >= spec.stop_timeout());
    let own_stop_pending = matches!(state, State::Running | State::Paused | State::Saved | State::Error)
        && match spec.power_state {
            PowerState::Stopped => own_stop(Phase::Stopping, &[Operation::Stop, Operation::Kill]),
            PowerState::Running => own_stop(Phase::Restarting, &[Operation::Kill]) && !killed_long_ago,
        };
    if own_stop_pending { State::Stopping } else { state }
}

/// A step a recent failure holds back until its retry is due: none, and when to look
/// again. One not retried until the spec changes keeps the failure's explanation.
fn hold_back(
    input: &Input<'_>,
    before: &MachineStatus,
    status: &mut MachineStatus,
    step: Option<Planned>,
    requeue: Option<Duration>,
) -> (Option<Planned>, Option<Duration>, bool) {
    let Some(wait) = step.as_ref().and_then(|_| held_back(before, input.machine, input.now)) else {
        return (step, requeue, false);
    };
    let requeue = match wait {
        Some(delay) => Some(delay),
        // Keep watching the instance's state meanwhile.
        None => {
            let kept = get_condition(&before.conditions, ConditionType::PowerStateSynced).cloned();
            if let Some(kept) = kept {
                status.conditions.retain(|c| c.type_ != kept.type_);
                status.conditions.push(kept);
                let order = |c: &crate::api::Condition| {
                    ConditionType::ALL.iter().position(|k| k.as_str() == c.type_).unwrap_or(usize::MAX)
                };
                status.conditions.sort_by_key(order);
            }
            Some(jittered(input.settings.poll_interval, input.jitter))
        }
    };
    (None, requeue, true)
}

/// Whether to look the addresses up this time. They change when an instance (re)starts,
/// not while it runs: looked up then (a running instance never seen running, or just
/// started and not Ready yet), so an idle poll costs one driver call.
pub fn addresses_stale(machine: &crate::api::Machine, state: State) -> bool {
    if state != State::Running {
        return false;
    }
    let Some(status) = machine.status.as_ref() else { return true };
    if status.addresses.is_empty() || status.state != Some(State::Running) {
        return true;
    }
    let just_started = status.last_operation.as_ref().is_some_and(|op| {
        op.result == OperationResult::Succeeded && matches!(op.operation, Operation::Start | Operation::Restart)
    });
    just_started && get_condition(&status.conditions, ConditionType::Ready).is_some_and(|c| c.status != "True")
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
