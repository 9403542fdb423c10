//! The decision for a Machine being deleted.

use super::summary::{
    condition_is, conditions, error_reason, held_back, last_operation, observation_retry_pending, record_failure,
    record_secrets,
};
use super::{CleanupNext, CleanupPlan, Input, Note, Observed, Outcome};
use crate::api::{ConditionType, DeletionPolicy, OperationResult, Phase, get_condition};
use machinist_drivers::{Operation, State};

/// How often a removal under way at the provider is looked at again: terminating an
/// instance takes tens of seconds, so a fifth of the progress rate.
fn removal_poll(settings: &super::Settings) -> std::time::Duration {
    settings.progress_interval.saturating_mul(5)
}

pub fn plan_cleanup(input: &Input<'_>) -> CleanupPlan {
    let machine = input.machine;
    let before = machine.status.clone().unwrap_or_default();
    let mut status = before.clone();
    let mut notes = Vec::new();
    status.phase = Some(Phase::Deleting);
    record_secrets(&mut status, input, &mut notes);
    let mut c = conditions(&mut status, machine, input.now);
    c.set(ConditionType::Ready, false, "Deleting", "the Machine is being deleted");

    if machine.is_paused() {
        c.set(
            ConditionType::Paused,
            true,
            "Paused",
            "the machinist.dev/paused annotation is set: no driver calls until it is removed",
        );
        c.set(
            ConditionType::Deleting,
            true,
            "Paused",
            "deletion waits until the machinist.dev/paused annotation is removed",
        );
        return CleanupPlan { status, next: CleanupNext::Wait(None), notes };
    }
    c.set(ConditionType::Paused, false, "NotPaused", "");

    if machine.spec.deletion_policy == DeletionPolicy::Orphan {
        let what = match &before.provider_id {
            Some(id) => format!("left instance {id} in place (deletionPolicy: Orphan)"),
            None => "no instance to leave in place (deletionPolicy: Orphan)".to_string(),
        };
        c.set(ConditionType::Deleting, true, "Orphaning", what.clone());
        notes.push(Note::normal("Orphaned", "Remove", what));
        return CleanupPlan { status, next: CleanupNext::Finalize, notes };
    }

    let known = before.provider_id.clone();
    let next = match (&input.observed, known) {
        // Remove needs only the id: with a known one, try even if observing failed, and
        // even if the driver reports it gone (an eventually consistent read proves
        // nothing; Remove's own answer does).
        (Observed::Instance { state: State::NotFound, id, .. }, Some(known)) if *id == known => {
            CleanupNext::Remove(known)
        }
        (Observed::Instance { state: State::NotFound, id, .. }, _) => {
            notes.push(Note::normal("Removed", "Remove", format!("instance {id} is already gone")));
            CleanupNext::RemoveLeftovers
        }
        (Observed::Instance { id, .. }, _) => CleanupNext::Remove(id.clone()),
        (Observed::Failed(_), Some(id)) => CleanupNext::Remove(id),
        (Observed::NoInstance, _) => CleanupNext::RemoveLeftovers,
        (Observed::InvalidSpec(_), None) => CleanupNext::Finalize,
        (Observed::InvalidSpec(error), Some(id)) => {
            let message = format!(
                "cannot remove instance {id}: {error}. Fix that, or set deletionPolicy: Orphan to leave the instance"
            );
            if !condition_is(c.status, ConditionType::Deleting, "InvalidSpec", &message) {
                notes.push(Note::warning("InvalidSpec", "Remove", message.clone()));
            }
            c.set(ConditionType::Deleting, true, "InvalidSpec", message);
            return CleanupPlan { status, next: CleanupNext::Wait(None), notes };
        }
        (Observed::Failed(error), None) => {
            if let Some(wait) = observation_retry_pending(&before, machine, input.now, error) {
                return CleanupPlan { status: before.clone(), next: CleanupNext::Wait(wait), notes };
            }
            let (delay, note) = record_failure(&mut status, input, Operation::Status, error);
            notes.push(note);
            let message = status.failures.as_ref().map(|f| f.message.clone()).unwrap_or_default();
            // An instance may exist that only the driver can find: the finalizer stays.
            let message = format!(
                "{message}; the finalizer stays until the driver can tell whether an instance exists (fix the \
                 cause, or set deletionPolicy: Orphan to let the Machine go without looking)"
            );
            conditions(&mut status, machine, input.now).set(
                ConditionType::Deleting,
                true,
                error_reason(error),
                message,
            );
            return CleanupPlan { status, next: CleanupNext::Wait(delay), notes };
        }
    };
    let mut c = conditions(&mut status, machine, input.now);
    if matches!(next, CleanupNext::Remove(_) | CleanupNext::RemoveLeftovers)
        && let Some(wait) = held_back(&before, machine, input.now)
    {
        return CleanupPlan { status, next: CleanupNext::Wait(wait), notes };
    }
    match &next {
        CleanupNext::Remove(id) => {
            // Looking again at a removal under way keeps what it said it waits for: the
            // status changes only when the provider's answer does.
            let under_way = get_condition(&before.conditions, ConditionType::Deleting)
                .filter(|d| d.status == "True" && d.reason == "Removing")
                .map(|d| d.message.clone());
            c.set(
                ConditionType::Deleting,
                true,
                "Removing",
                under_way.unwrap_or_else(|| format!("removing instance {id}")),
            )
        }
        CleanupNext::RemoveLeftovers => c.set(
            ConditionType::Deleting,
            true,
            "Removing",
            "no instance: removing anything else created for the Machine",
        ),
        _ => c.set(ConditionType::Deleting, true, "Removed", "nothing left to remove"),
    }
    CleanupPlan { status, next, notes }
}

/// Folds the outcome of Remove (or of removing the leftovers, when `plan.next` is
/// [`CleanupNext::RemoveLeftovers`]) into the cleanup plan's status.
pub fn record_cleanup(input: &Input<'_>, plan: &CleanupPlan, outcome: Outcome) -> CleanupPlan {
    let machine = input.machine;
    let mut status = plan.status.clone();
    let mut notes = Vec::new();
    let id = match &plan.next {
        CleanupNext::Remove(id) => Some(id.as_str()),
        _ => None,
    };
    match outcome {
        Outcome::Failed { error, .. } => {
            let (delay, note) = record_failure(&mut status, input, Operation::Remove, &error);
            notes.push(note);
            let message = status.failures.as_ref().map(|f| f.message.clone()).unwrap_or_default();
            let message = match id {
                Some(id) => format!("{message}; the finalizer stays until instance {id} is removed"),
                None => format!("{message}; the finalizer stays until what was created for the Machine is removed"),
            };
            conditions(&mut status, machine, input.now).set(
                ConditionType::Deleting,
                true,
                error_reason(&error),
                message,
            );
            let wait = delay.or(Some(input.settings.backoff_cap));
            CleanupPlan { status, next: CleanupNext::Wait(wait), notes }
        }
        // Under way at the provider: looked at again soon, without holding a worker.
        Outcome::RemovalWaiting(what) => {
            status.failures = None;
            conditions(&mut status, machine, input.now).set(ConditionType::Deleting, true, "Removing", what);
            CleanupPlan { status, next: CleanupNext::Wait(Some(removal_poll(input.settings))), notes }
        }
        // Nothing to tell about leftovers that were removed (or never existed).
        _ if id.is_none() => CleanupPlan { status, next: CleanupNext::Finalize, notes },
        _ => {
            let id = id.unwrap_or_default();
            status.failures = None;
            last_operation(
                &mut status,
                Operation::Remove,
                OperationResult::Succeeded,
                format!("removed instance {id}"),
                input.now,
            );
            notes.push(Note::normal("Removed", "Remove", format!("removed instance {id}")));
            CleanupPlan { status, next: CleanupNext::Finalize, notes }
        }
    }
}
