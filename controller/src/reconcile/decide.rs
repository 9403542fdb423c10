//! The decision for a Machine that is not being deleted.

use std::time::Duration;

use machinist_drivers::{DriverError, Operation, State};

use super::backoff::jittered;
use super::summary::{
    condition_is, condition_reason, conditions, error_reason, held_back, last_operation, observation_retry_pending,
    record_failure, record_failure_parts, record_host_key_mismatch, record_secrets, ssh_conditions, summarize_ready,
};
use super::{Cause, Input, Note, Observed, Outcome, Plan, Planned, Step, host_key, power};

use crate::api::{
    ACCEPT_HOST_KEY_ANNOTATION, ConditionType, MachineStatus, OperationResult, Phase, ProvisioningStatus, get_condition,
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
    let settings = input.settings;
    if status.provider_id.is_none() {
        notes.push(Note::normal(
            "Adopted",
            "Create",
            format!("found instance {id} tagged with this Machine's UID; adopting it instead of creating another"),
        ));
    }
    status.provider_id = Some(id.clone());
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

    let (restart, never_made) = power::pending_restart(input, &before, &mut status, &mut notes, driver_name);
    let power::PowerPlan { step, phase, requeue, held } =
        power::plan_power(input, &before, &mut status, &mut notes, state, restart, never_made);
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
        Outcome::Unanswered { operation, called_at } => {
            // Pending as it was begun: the stop escalates stopTimeoutSeconds after it.
            let message = format!(
                "asked the instance to stop gracefully; the provider did not answer within {}s",
                machine.spec.stop_timeout().as_secs()
            );
            last_operation(&mut status, operation, OperationResult::InProgress, message, called_at);
            status.phase = Some(Phase::Stopping);
            Plan { status, step: None, requeue: progress, notes }
        }
        Outcome::Succeeded => {
            status.failures = None;
            // The Start that completes a hard restart: it follows that restart's Kill.
            let before = machine.status.as_ref();
            let restarting_hard = before.is_some_and(|s| s.phase == Some(Phase::Restarting))
                && before
                    .and_then(|s| s.last_operation.as_ref())
                    .is_some_and(|op| op.operation == Operation::Kill && op.result == OperationResult::Succeeded);
            let (phase, reason, message) = match (&planned.step, &outcome) {
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
                (Step::Stop, _) => (Phase::Stopping, "Stopped", "asked the instance to stop gracefully".to_string()),
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
            let operation = planned.step.operation();
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
            if input.offers_ssh && matches!(planned.step, Step::Stop | Step::Kill) {
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
        Step::Stop => "stopping the instance gracefully",
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
