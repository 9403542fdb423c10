//! Tests of the pure decision: [`plan`], [`record`], [`begin`], [`plan_cleanup`] and
//! [`record_cleanup`], table-driven, plus a simulation of a Machine against a tiny
//! in-memory model of its instance (proptest).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use machinist_drivers::{Address, AddressType, DriverError, Operation, State};

use super::*;
use crate::api::{
    ConditionType, Failures, LastOperation, Machine, MachineStatus, OperationResult, Phase, PowerState, RestartMode,
    StopMode, get_condition,
};
use crate::fixtures::{
    PROVIDER_ID, SETTINGS, at, input, input_at, instance, invalid_config, not_found, not_supported, now, rate_limited,
    transient,
};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// (status, reason) of a condition.
fn cond(status: &MachineStatus, kind: ConditionType) -> Option<(&str, &str)> {
    get_condition(&status.conditions, kind).map(|c| (c.status.as_str(), c.reason.as_str()))
}

fn message(status: &MachineStatus, kind: ConditionType) -> &str {
    get_condition(&status.conditions, kind).map_or("", |c| c.message.as_str())
}

fn reasons(notes: &[Note]) -> Vec<&'static str> {
    notes.iter().map(|n| n.reason).collect()
}

fn warnings(notes: &[Note]) -> Vec<&'static str> {
    notes.iter().filter(|n| n.warning).map(|n| n.reason).collect()
}

/// `machine` with the status a write of `status` leaves on it.
fn feed(machine: &Machine, status: &MachineStatus) -> Machine {
    machine.clone().with_full_status(Some(status.clone()))
}

/// The status as the API server hands it back: through JSON.
fn roundtrip(status: &MachineStatus) -> MachineStatus {
    let json = serde_json::to_value(status).expect("status serializes");
    serde_json::from_value(json).expect("status deserializes")
}

fn planned(step: Step, cause: Cause) -> Option<Planned> {
    Some(Planned { step, cause })
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn last_op(operation: Operation, result: OperationResult, time: jiff::Timestamp) -> Option<LastOperation> {
    Some(LastOperation { operation, result, message: format!("{operation} {result:?}"), time: Time(time) })
}

/// Plans at `now`, performs `planned` with `outcome`, and returns the Machine with the
/// recorded status (as the Kubernetes layer chains them), plus the recorded plan.
fn step_and_record(machine: &Machine, observed: Observed, when: jiff::Timestamp, outcome: Outcome) -> (Machine, Plan) {
    let input = input_at(machine, observed, when);
    let plan = plan(&input);
    let step = plan.step.clone().unwrap_or_else(|| panic!("expected a step, got {plan:#?}"));
    let recorded = record(&input, &plan, &step, outcome);
    (feed(machine, &recorded.status), recorded)
}

// ---------------------------------------------------------------------------------------
// The table: phase × desired power state × observed state × error kind
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Requeue {
    /// Only when the Machine changes.
    None,
    /// `progress_interval`.
    Progress,
    /// `poll_interval`, jittered (exactly the interval with the tests' jitter).
    Poll,
    /// A backoff of this many seconds, with `failures.nextRetryTime` = now + that.
    Backoff(u64),
    /// Exactly this long.
    Exactly(u64),
}

struct Row {
    name: &'static str,
    // given
    desired: PowerState,
    stop: StopMode,
    restart: Option<(&'static str, RestartMode)>,
    observed: Observed,
    prior: fn(Machine) -> Machine,
    // expected
    step: Option<Planned>,
    phase: Option<Phase>,
    synced: Option<(&'static str, &'static str)>,
    ready: (&'static str, &'static str),
    requeue: Requeue,
    notes: &'static [&'static str],
}

fn row() -> Row {
    Row {
        name: "",
        desired: PowerState::Running,
        stop: StopMode::Graceful,
        restart: None,
        observed: Observed::NoInstance,
        prior: |m| m,
        step: None,
        phase: None,
        synced: None,
        ready: ("False", ""),
        requeue: Requeue::None,
        notes: &[],
    }
}

fn known(m: Machine) -> Machine {
    m.with_provider_id(PROVIDER_ID)
}

fn was(state: State) -> impl Fn(Machine) -> Machine {
    move |m| known(m).with_state(state)
}

fn table() -> Vec<Row> {
    use PowerState::Stopped as DesiredStopped;
    let stop300 = Step::Stop;
    vec![
        Row {
            name: "no instance: create",
            observed: Observed::NoInstance,
            step: planned(Step::Create, Cause::Converge),
            phase: Some(Phase::Creating),
            synced: Some(("Unknown", "NoInstance")),
            ready: ("False", "Creating"),
            requeue: Requeue::None,
            ..row()
        },
        Row {
            name: "no instance, desired Stopped: create all the same",
            desired: DesiredStopped,
            observed: Observed::NoInstance,
            step: planned(Step::Create, Cause::Converge),
            phase: Some(Phase::Creating),
            synced: Some(("Unknown", "NoInstance")),
            ready: ("False", "Creating"),
            ..row()
        },
        Row {
            name: "found by UID, running: adopted, no create",
            observed: instance(State::Running),
            step: None,
            phase: Some(Phase::Running),
            synced: Some(("True", "Running")),
            ready: ("True", "Ready"),
            requeue: Requeue::Poll,
            notes: &["Adopted", "Ready"],
            ..row()
        },
        Row {
            name: "found by UID, stopped: adopted and started (no drift: never seen running)",
            observed: instance(State::Stopped),
            step: planned(Step::Start, Cause::Converge),
            phase: Some(Phase::Starting),
            synced: Some(("False", "Starting")),
            ready: ("False", "Starting"),
            requeue: Requeue::Progress,
            notes: &["Adopted"],
            ..row()
        },
        Row {
            name: "running as desired: converged",
            observed: instance(State::Running),
            prior: |m| was(State::Running)(m),
            step: None,
            phase: Some(Phase::Running),
            synced: Some(("True", "Running")),
            ready: ("True", "Ready"),
            requeue: Requeue::Poll,
            notes: &["Ready"],
            ..row()
        },
        Row {
            name: "desired Stopped, running, Graceful: stop with the default timeout",
            desired: DesiredStopped,
            observed: instance(State::Running),
            prior: |m| was(State::Running)(m),
            step: planned(stop300.clone(), Cause::Converge),
            phase: Some(Phase::Stopping),
            synced: Some(("False", "Stopping")),
            ready: ("False", "Stopping"),
            requeue: Requeue::Progress,
            ..row()
        },
        Row {
            name: "desired Stopped, running, Force: kill",
            desired: DesiredStopped,
            stop: StopMode::Force,
            observed: instance(State::Running),
            prior: |m| was(State::Running)(m),
            step: planned(Step::Kill, Cause::Converge),
            phase: Some(Phase::Stopping),
            synced: Some(("False", "Stopping")),
            ready: ("False", "Stopping"),
            requeue: Requeue::Progress,
            ..row()
        },
        Row {
            name: "desired Stopped, paused: stop",
            desired: DesiredStopped,
            observed: instance(State::Paused),
            prior: |m| was(State::Paused)(m),
            step: planned(stop300.clone(), Cause::Converge),
            phase: Some(Phase::Stopping),
            synced: Some(("False", "Stopping")),
            ready: ("False", "Stopping"),
            requeue: Requeue::Progress,
            ..row()
        },
        Row {
            name: "desired Stopped, saved, Force: kill",
            desired: DesiredStopped,
            stop: StopMode::Force,
            observed: instance(State::Saved),
            prior: known,
            step: planned(Step::Kill, Cause::Converge),
            phase: Some(Phase::Stopping),
            synced: Some(("False", "Stopping")),
            ready: ("False", "Stopping"),
            requeue: Requeue::Progress,
            ..row()
        },
        Row {
            name: "stopped as desired: synced, not ready",
            desired: DesiredStopped,
            observed: instance(State::Stopped),
            prior: |m| was(State::Stopped)(m),
            step: None,
            phase: Some(Phase::Stopped),
            synced: Some(("True", "Stopped")),
            ready: ("False", "Stopped"),
            requeue: Requeue::Poll,
            ..row()
        },
        Row {
            name: "drift: was running, found stopped, desired Running",
            observed: instance(State::Stopped),
            prior: |m| was(State::Running)(m),
            step: planned(Step::Start, Cause::Drift),
            phase: Some(Phase::Starting),
            synced: Some(("False", "Starting")),
            ready: ("False", "Starting"),
            requeue: Requeue::Progress,
            notes: &["StoppedOutOfBand"],
            ..row()
        },
        Row {
            name: "drift: was running, found saved",
            observed: instance(State::Saved),
            prior: |m| was(State::Running)(m),
            step: planned(Step::Start, Cause::Drift),
            phase: Some(Phase::Starting),
            synced: Some(("False", "Starting")),
            ready: ("False", "Starting"),
            requeue: Requeue::Progress,
            notes: &["StoppedOutOfBand"],
            ..row()
        },
        Row {
            name: "was stopped, desired Running now: start, no drift",
            observed: instance(State::Stopped),
            prior: |m| was(State::Stopped)(m),
            step: planned(Step::Start, Cause::Converge),
            phase: Some(Phase::Starting),
            synced: Some(("False", "Starting")),
            ready: ("False", "Starting"),
            requeue: Requeue::Progress,
            ..row()
        },
        Row {
            name: "paused instance, desired Running: start",
            observed: instance(State::Paused),
            prior: |m| was(State::Paused)(m),
            step: planned(Step::Start, Cause::Converge),
            phase: Some(Phase::Starting),
            synced: Some(("False", "Starting")),
            ready: ("False", "Starting"),
            requeue: Requeue::Progress,
            ..row()
        },
        Row {
            name: "restart request, Soft: restart",
            restart: Some(("r1", RestartMode::Soft)),
            observed: instance(State::Running),
            prior: |m| was(State::Running)(m),
            step: planned(Step::Restart, Cause::RestartRequest("r1".into())),
            phase: Some(Phase::Restarting),
            synced: Some(("False", "Restarting")),
            ready: ("False", "Restarting"),
            requeue: Requeue::Progress,
            ..row()
        },
        Row {
            name: "restart request, Hard: kill first (start once stopped)",
            restart: Some(("r1", RestartMode::Hard)),
            observed: instance(State::Running),
            prior: |m| was(State::Running)(m),
            step: planned(Step::Kill, Cause::RestartRequest("r1".into())),
            phase: Some(Phase::Restarting),
            synced: Some(("False", "Restarting")),
            ready: ("False", "Restarting"),
            requeue: Requeue::Progress,
            ..row()
        },
        Row {
            name: "restart request already handled: nothing",
            restart: Some(("r1", RestartMode::Soft)),
            observed: instance(State::Running),
            prior: |m| was(State::Running)(m).with_last_restart_request("r1"),
            step: None,
            phase: Some(Phase::Running),
            synced: Some(("True", "Running")),
            ready: ("True", "Ready"),
            requeue: Requeue::Poll,
            notes: &["Ready"],
            ..row()
        },
        Row {
            name: "restart request, desired Stopped, stopped: skipped",
            desired: DesiredStopped,
            restart: Some(("r1", RestartMode::Soft)),
            observed: instance(State::Stopped),
            prior: |m| was(State::Stopped)(m),
            step: None,
            phase: Some(Phase::Stopped),
            synced: Some(("True", "Stopped")),
            ready: ("False", "Stopped"),
            requeue: Requeue::Poll,
            notes: &["RestartSkipped"],
            ..row()
        },
        Row {
            name: "restart request, desired Stopped, running: skipped, stop",
            desired: DesiredStopped,
            restart: Some(("r1", RestartMode::Hard)),
            observed: instance(State::Running),
            prior: |m| was(State::Running)(m),
            step: planned(stop300.clone(), Cause::Converge),
            phase: Some(Phase::Stopping),
            synced: Some(("False", "Stopping")),
            ready: ("False", "Stopping"),
            requeue: Requeue::Progress,
            notes: &["RestartSkipped"],
            ..row()
        },
        Row {
            name: "restart request of a stopped machine that should run: start for the request",
            restart: Some(("r1", RestartMode::Soft)),
            observed: instance(State::Stopped),
            prior: |m| was(State::Stopped)(m),
            step: planned(Step::Start, Cause::RestartRequest("r1".into())),
            phase: Some(Phase::Starting),
            synced: Some(("False", "Starting")),
            ready: ("False", "Starting"),
            requeue: Requeue::Progress,
            ..row()
        },
        Row {
            name: "restart request while starting: wait",
            restart: Some(("r1", RestartMode::Soft)),
            observed: instance(State::Starting),
            prior: |m| was(State::Stopped)(m),
            step: None,
            phase: Some(Phase::Starting),
            synced: Some(("False", "Starting")),
            ready: ("False", "Starting"),
            requeue: Requeue::Progress,
            ..row()
        },
        Row {
            name: "starting, desired Running: wait",
            observed: instance(State::Starting),
            prior: |m| was(State::Stopped)(m),
            step: None,
            phase: Some(Phase::Starting),
            synced: Some(("False", "Starting")),
            ready: ("False", "Starting"),
            requeue: Requeue::Progress,
            ..row()
        },
        Row {
            name: "stopping, desired Running: wait",
            observed: instance(State::Stopping),
            prior: |m| was(State::Running)(m),
            step: None,
            phase: Some(Phase::Stopping),
            synced: Some(("False", "Stopping")),
            ready: ("False", "Stopping"),
            requeue: Requeue::Progress,
            ..row()
        },
        Row {
            name: "starting, desired Stopped: wait",
            desired: DesiredStopped,
            observed: instance(State::Starting),
            prior: |m| was(State::Stopped)(m),
            step: None,
            phase: Some(Phase::Starting),
            synced: Some(("False", "Starting")),
            ready: ("False", "Starting"),
            requeue: Requeue::Progress,
            ..row()
        },
        Row {
            name: "stopping (not machinist's stop), desired Stopped: wait",
            desired: DesiredStopped,
            observed: instance(State::Stopping),
            prior: |m| was(State::Running)(m),
            step: None,
            phase: Some(Phase::Stopping),
            synced: Some(("False", "Stopping")),
            ready: ("False", "Stopping"),
            requeue: Requeue::Progress,
            ..row()
        },
        Row {
            name: "error state, desired Running: failed, warned",
            observed: instance(State::Error),
            prior: |m| was(State::Running)(m),
            step: None,
            phase: Some(Phase::Failed),
            synced: Some(("False", "InstanceError")),
            ready: ("False", "InstanceError"),
            requeue: Requeue::Exactly(30),
            notes: &["InstanceError"],
            ..row()
        },
        Row {
            name: "error state, desired Stopped: failed, no stop",
            desired: DesiredStopped,
            observed: instance(State::Error),
            prior: known,
            step: None,
            phase: Some(Phase::Failed),
            synced: Some(("False", "InstanceError")),
            ready: ("False", "InstanceError"),
            requeue: Requeue::Exactly(30),
            notes: &["InstanceError"],
            ..row()
        },
        Row {
            name: "providerID known, instance gone: never create another",
            observed: instance(State::NotFound),
            prior: |m| was(State::Running)(m),
            step: None,
            phase: Some(Phase::Failed),
            synced: Some(("False", "InstanceNotFound")),
            ready: ("False", "InstanceNotFound"),
            requeue: Requeue::Poll,
            notes: &["InstanceNotFound"],
            ..row()
        },
        Row {
            name: "state None: unknown, phase Pending when there was none",
            observed: instance(State::None),
            prior: known,
            step: None,
            phase: Some(Phase::Pending),
            synced: Some(("Unknown", "StateUnknown")),
            ready: ("False", "StateUnknown"),
            requeue: Requeue::Progress,
            ..row()
        },
        Row {
            name: "state Timeout: unknown, phase kept",
            desired: DesiredStopped,
            observed: instance(State::Timeout),
            prior: |m| was(State::Running)(m).with_status(|s| s.phase = Some(Phase::Running)),
            step: None,
            phase: Some(Phase::Running),
            synced: Some(("Unknown", "StateUnknown")),
            ready: ("False", "StateUnknown"),
            requeue: Requeue::Progress,
            ..row()
        },
        Row {
            name: "invalid spec: no step, no requeue, warned",
            observed: Observed::InvalidSpec(invalid_config()),
            prior: |m| was(State::Running)(m),
            step: None,
            phase: Some(Phase::Failed),
            synced: None,
            ready: ("False", "InvalidSpec"),
            requeue: Requeue::None,
            notes: &["InvalidSpec"],
            ..row()
        },
        Row {
            name: "observation failed, transient: backoff",
            observed: Observed::Failed(transient()),
            prior: |m| was(State::Running)(m).with_status(|s| s.phase = Some(Phase::Running)),
            step: None,
            phase: Some(Phase::Running),
            synced: Some(("Unknown", "TransientError")),
            ready: ("False", "TransientError"),
            requeue: Requeue::Backoff(1),
            notes: &["TransientError"],
            ..row()
        },
        Row {
            name: "observation failed, rate limited: honour retry-after",
            desired: DesiredStopped,
            observed: Observed::Failed(rate_limited(30)),
            prior: known,
            step: None,
            phase: None,
            synced: Some(("Unknown", "RateLimited")),
            ready: ("False", "RateLimited"),
            requeue: Requeue::Backoff(30),
            notes: &["RateLimited"],
            ..row()
        },
        Row {
            name: "observation failed, credentials not found: backoff",
            observed: Observed::Failed(not_found()),
            step: None,
            phase: None,
            synced: Some(("Unknown", "NotFound")),
            ready: ("False", "NotFound"),
            requeue: Requeue::Backoff(1),
            notes: &["NotFound"],
            ..row()
        },
        Row {
            name: "observation not supported: no retry, polled",
            observed: Observed::Failed(not_supported(Operation::Status)),
            prior: known,
            step: None,
            phase: None,
            synced: Some(("Unknown", "NotSupported")),
            ready: ("False", "NotSupported"),
            requeue: Requeue::Poll,
            notes: &["NotSupported"],
            ..row()
        },
    ]
}

#[test]
fn table_of_decisions() {
    let mut failed = Vec::new();
    for row in table() {
        let mut machine = Machine::test().with_power_state(row.desired).with_stop_mode(row.stop);
        if let Some((request, mode)) = row.restart {
            machine = machine.with_restart(request, mode);
        }
        let machine = (row.prior)(machine);
        let input = input(&machine, row.observed.clone());
        let plan = plan(&input);
        let s = &plan.status;
        let requeue = match row.requeue {
            Requeue::None => None,
            Requeue::Progress => Some(SETTINGS.progress_interval),
            Requeue::Poll => Some(SETTINGS.poll_interval),
            Requeue::Backoff(n) | Requeue::Exactly(n) => Some(secs(n)),
        };
        let mut problems = Vec::new();
        if plan.step != row.step {
            problems.push(format!("step {:?}, expected {:?}", plan.step, row.step));
        }
        if s.phase != row.phase {
            problems.push(format!("phase {:?}, expected {:?}", s.phase, row.phase));
        }
        if cond(s, ConditionType::PowerStateSynced) != row.synced {
            problems.push(format!(
                "PowerStateSynced {:?}, expected {:?}",
                cond(s, ConditionType::PowerStateSynced),
                row.synced
            ));
        }
        if cond(s, ConditionType::Ready) != Some(row.ready) {
            problems.push(format!("Ready {:?}, expected {:?}", cond(s, ConditionType::Ready), row.ready));
        }
        if plan.requeue != requeue {
            problems.push(format!("requeue {:?}, expected {:?} ({:?})", plan.requeue, requeue, row.requeue));
        }
        if let Requeue::Backoff(n) = row.requeue {
            let next = s.failures.as_ref().and_then(|f| f.next_retry_time.clone());
            if next != Some(Time(at(n as i64))) {
                problems.push(format!("failures.nextRetryTime {next:?}, expected now + {n}s"));
            }
        }
        if reasons(&plan.notes) != row.notes {
            problems.push(format!("notes {:?}, expected {:?}", reasons(&plan.notes), row.notes));
        }
        // Every condition carries the generation it was decided at.
        if let Some(c) = s.conditions.iter().find(|c| c.observed_generation != Some(1)) {
            problems.push(format!("condition {} has observedGeneration {:?}", c.type_, c.observed_generation));
        }
        if s.driver.as_deref() != Some("fake") {
            problems.push(format!("status.driver {:?}", s.driver));
        }
        if !problems.is_empty() {
            failed.push(format!("{}:\n    {}", row.name, problems.join("\n    ")));
        }
    }
    assert!(failed.is_empty(), "{} rows failed:\n{}", failed.len(), failed.join("\n"));
}

// ---------------------------------------------------------------------------------------
// plan: the details behind the table
// ---------------------------------------------------------------------------------------

#[test]
fn no_instance_is_created_once_per_plan_and_nothing_else_is_set() {
    let machine = Machine::test();
    let plan = plan(&input(&machine, Observed::NoInstance));
    assert_eq!(plan.step, planned(Step::Create, Cause::Converge));
    assert_eq!(plan.status.provider_id, None);
    assert_eq!(cond(&plan.status, ConditionType::InstanceCreated), Some(("False", "Creating")));
    assert_eq!(cond(&plan.status, ConditionType::Paused), Some(("False", "NotPaused")));
    assert_eq!(cond(&plan.status, ConditionType::Deleting), Some(("False", "NotDeleting")));
    assert!(plan.notes.is_empty(), "{:?}", plan.notes);
}

#[test]
fn instance_found_by_uid_is_adopted_not_created() {
    let machine = Machine::test();
    let observed = Observed::Instance { id: "fake-adopt-me".into(), state: State::Running, addresses: None };
    let plan = plan(&input(&machine, observed));
    assert_eq!(plan.step, None);
    assert_eq!(plan.status.provider_id.as_deref(), Some("fake-adopt-me"));
    assert_eq!(cond(&plan.status, ConditionType::InstanceCreated), Some(("True", "Created")));
    let adopted = plan.notes.iter().find(|n| n.reason == "Adopted").expect("an Adopted note");
    assert!(!adopted.warning);
    assert!(adopted.message.contains("fake-adopt-me"), "{}", adopted.message);

    // Adopted once: the next plan knows the providerID.
    let again = super::plan(&input(&feed(&machine, &plan.status), instance(State::Running)));
    assert!(!reasons(&again.notes).contains(&"Adopted"));
}

#[test]
fn converged_running_clears_failures_and_sets_observed_generation() {
    let address = Address { kind: AddressType::InternalIP, address: "192.0.2.7".into() };
    let machine = was(State::Running)(Machine::test().with_generation(4)).with_status(|s| {
        s.failures = Some(Failures {
            count: 3,
            reason: "TransientError".into(),
            message: String::new(),
            next_retry_time: Some(Time(at(-10))),
        });
        s.observed_generation = Some(2);
    });
    let observed =
        Observed::Instance { id: PROVIDER_ID.into(), state: State::Running, addresses: Some(vec![address.clone()]) };
    let plan = plan(&input(&machine, observed));
    assert_eq!(plan.step, None);
    assert_eq!(plan.status.failures, None);
    assert_eq!(plan.status.observed_generation, Some(4));
    assert_eq!(plan.status.addresses, vec![address]);
    assert_eq!(cond(&plan.status, ConditionType::Ready), Some(("True", "Ready")));
    assert_eq!(reasons(&plan.notes), ["Ready"]);
}

#[test]
fn a_step_under_way_does_not_set_observed_generation() {
    let machine = was(State::Running)(Machine::test().with_generation(3).with_power_state(PowerState::Stopped))
        .with_status(|s| s.observed_generation = Some(2));
    let plan = plan(&input(&machine, instance(State::Running)));
    assert!(plan.step.is_some());
    assert_eq!(plan.status.observed_generation, Some(2));
}

#[test]
fn graceful_stop_escalates_after_stop_timeout_seconds() {
    let machine = was(State::Running)(Machine::test().with_power_state(PowerState::Stopped).with_stop_timeout(42));
    let plan = plan(&input(&machine, instance(State::Running)));
    assert_eq!(plan.step, planned(Step::Stop, Cause::Converge));
}

/// A Machine that asked for a graceful stop at `stopped_at` and now sees the instance Stopping.
fn stopping_since(stopped_at: jiff::Timestamp, timeout: Option<u32>) -> Machine {
    let mut machine = Machine::test().with_power_state(PowerState::Stopped);
    if let Some(t) = timeout {
        machine = machine.with_stop_timeout(t);
    }
    was(State::Running)(machine).with_status(|s| {
        s.phase = Some(Phase::Stopping);
        s.last_operation = last_op(Operation::Stop, OperationResult::Succeeded, stopped_at);
    })
}

#[test]
fn a_graceful_stop_the_guest_has_not_obeyed_is_not_sent_again_and_escalates_on_time() {
    // The provider still reports Running after machinist's Stop (an ACPI power-off the
    // guest has not acted on): no second Stop while it is pending.
    for elapsed in [0, 1, 150, 299] {
        let machine = stopping_since(at(-elapsed), None);
        let plan = plan(&input(&machine, instance(State::Running)));
        assert_eq!(plan.step, None, "after {elapsed}s");
        assert!(plan.notes.is_empty(), "after {elapsed}s: {:?}", plan.notes);
        assert_eq!(plan.status.phase, Some(Phase::Stopping));
        assert_eq!(plan.status.state, Some(State::Running), "the state shown is what the provider says");
        assert!(message(&plan.status, ConditionType::PowerStateSynced).contains("graceful stop"));
        let due = plan.requeue.expect("looked at again");
        assert!(due <= SETTINGS.progress_interval && due >= Duration::from_millis(200), "{due:?}");
    }
    // Counted from that Stop: killed at stopTimeoutSeconds, with the Warning.
    let machine = stopping_since(at(-300), None);
    let plan = plan(&input(&machine, instance(State::Running)));
    assert_eq!(plan.step, planned(Step::Kill, Cause::StopTimeout));
    assert_eq!(warnings(&plan.notes), ["StopTimedOut"]);
    // A failed Stop is no pending one: tried again (after its backoff).
    let failed = stopping_since(at(-10), None)
        .with_status(|s| s.last_operation = last_op(Operation::Stop, OperationResult::Failed, at(-10)));
    assert!(matches!(plan_step(&failed, State::Running), Some(Step::Stop)));
    // Stopped since, then started out of band: a new stop, once.
    let stopped_then_started = stopping_since(at(-10), None).with_status(|s| s.phase = Some(Phase::Stopped));
    assert!(matches!(plan_step(&stopped_then_started, State::Running), Some(Step::Stop)));
}

fn plan_step(machine: &Machine, state: State) -> Option<Step> {
    plan(&input(machine, instance(state))).step.map(|p| p.step)
}

#[test]
fn stopping_past_the_timeout_is_killed() {
    for (timeout, elapsed) in [(None, 300), (None, 1000), (Some(42), 42)] {
        let machine = stopping_since(at(-elapsed), timeout);
        let plan = plan(&input(&machine, instance(State::Stopping)));
        assert_eq!(plan.step, planned(Step::Kill, Cause::StopTimeout), "timeout {timeout:?}, elapsed {elapsed}");
        assert_eq!(plan.status.phase, Some(Phase::Stopping));
        assert_eq!(warnings(&plan.notes), ["StopTimedOut"]);
        assert_eq!(begin(&plan, plan.step.as_ref().unwrap(), now()).last_operation.unwrap().operation, Operation::Kill);
    }
}

#[test]
fn stopping_before_the_timeout_waits_no_longer_than_the_remaining_time() {
    for (timeout, elapsed) in [(None, 299), (None, 0), (Some(42), 41), (Some(42), 10)] {
        let machine = stopping_since(at(-elapsed), timeout);
        let plan = plan(&input(&machine, instance(State::Stopping)));
        assert_eq!(plan.step, None, "timeout {timeout:?}, elapsed {elapsed}");
        let remaining = secs(u64::from(timeout.unwrap_or(300)) - elapsed as u64);
        let requeue = plan.requeue.expect("a requeue while waiting for the stop");
        assert!(requeue <= remaining && requeue > Duration::ZERO, "requeue {requeue:?}, remaining {remaining:?}");
        assert!(requeue <= SETTINGS.progress_interval);
        assert_eq!(cond(&plan.status, ConditionType::PowerStateSynced), Some(("False", "Stopping")));
        assert!(plan.notes.is_empty());
    }
}

#[test]
fn a_stop_in_progress_counts_from_its_start() {
    // The controller wrote the InProgress Stop (begin) and died before recording.
    let machine = stopping_since(at(-301), None).with_status(|s| {
        s.last_operation = last_op(Operation::Stop, OperationResult::InProgress, at(-301));
    });
    let plan = plan(&input(&machine, instance(State::Stopping)));
    assert_eq!(plan.step, planned(Step::Kill, Cause::StopTimeout));
}

#[test]
fn error_state_warns_once() {
    let machine = was(State::Running)(Machine::test());
    let first = plan(&input(&machine, instance(State::Error)));
    assert_eq!(warnings(&first.notes), ["InstanceError"]);
    assert_eq!(first.status.phase, Some(Phase::Failed));
    let second = plan(&input_at(&feed(&machine, &first.status), instance(State::Error), at(30)));
    assert!(second.notes.is_empty(), "{:?}", second.notes);
    assert_eq!(second.status, first.status);
    assert_eq!(second.step, None);
}

#[test]
fn instance_gone_is_never_created_again() {
    let machine = was(State::Running)(Machine::test()).with_status(|s| {
        s.addresses = vec![Address { kind: AddressType::InternalIP, address: "192.0.2.9".into() }];
    });
    let first = plan(&input(&machine, instance(State::NotFound)));
    assert_eq!(first.step, None);
    assert_eq!(first.status.provider_id.as_deref(), Some(PROVIDER_ID), "a known providerID is never forgotten");
    assert_eq!(cond(&first.status, ConditionType::InstanceCreated), Some(("False", "InstanceNotFound")));
    assert!(message(&first.status, ConditionType::InstanceCreated).contains(PROVIDER_ID));
    assert!(first.status.addresses.is_empty());
    assert_eq!(warnings(&first.notes), ["InstanceNotFound"]);

    // Whatever happens next: a new generation, time passing, a restart request.
    let mut machine = feed(&machine, &first.status).with_generation(2).with_restart("r9", RestartMode::Hard);
    for t in [1, 60, 3600] {
        let next = plan(&input_at(&machine, instance(State::NotFound), at(t)));
        assert_eq!(next.step, None);
        assert!(next.notes.is_empty(), "warned once: {:?}", next.notes);
        machine = feed(&machine, &next.status);
    }
}

#[test]
fn paused_calls_nothing_and_says_so_once() {
    let machine = Machine::test().paused();
    // The Kubernetes layer observes nothing while paused; even a stale observation
    // must not lead to a step.
    for observed in [Observed::NoInstance, instance(State::Stopped), Observed::Failed(transient())] {
        let plan = plan(&input(&machine, observed));
        assert_eq!(plan.step, None);
        assert_eq!(plan.requeue, None);
        assert_eq!(cond(&plan.status, ConditionType::Paused), Some(("True", "Paused")));
        assert_eq!(reasons(&plan.notes), ["Paused"]);
        assert_eq!(plan.status.failures, None);
    }
    let first = plan(&input(&machine, Observed::NoInstance));
    let second = plan(&input_at(&feed(&machine, &first.status), Observed::NoInstance, at(10)));
    assert!(second.notes.is_empty(), "Paused only on the transition: {:?}", second.notes);
    assert_eq!(second.status, first.status);

    // Resumed: the condition flips, once.
    let resumed = feed(&machine, &second.status).unpaused();
    let third = plan(&input(&resumed, Observed::NoInstance));
    assert_eq!(cond(&third.status, ConditionType::Paused), Some(("False", "NotPaused")));
    assert_eq!(reasons(&third.notes), ["Resumed"]);
    assert_eq!(third.step, planned(Step::Create, Cause::Converge));
    let fourth = plan(&input(&feed(&resumed, &third.status), Observed::NoInstance));
    assert!(!reasons(&fourth.notes).contains(&"Resumed"));
}

#[test]
fn paused_running_machine_keeps_its_status_otherwise() {
    let converged = converged(Machine::test(), State::Running);
    let paused = converged.clone().paused();
    let plan = plan(&input(&paused, Observed::NoInstance));
    let mut expected = converged.status.clone().unwrap();
    crate::api::set_condition(
        &mut expected.conditions,
        ConditionType::Paused,
        true,
        "Paused",
        message(&plan.status, ConditionType::Paused),
        1,
        now(),
    );
    assert_eq!(plan.status, expected, "only the Paused condition changes");
}

#[test]
fn invalid_spec_names_the_field_and_warns_once() {
    let machine = was(State::Running)(Machine::test());
    let first = plan(&input(&machine, Observed::InvalidSpec(invalid_config())));
    assert_eq!(first.step, None);
    assert_eq!(first.requeue, None);
    assert_eq!(cond(&first.status, ConditionType::Ready), Some(("False", "InvalidSpec")));
    assert!(message(&first.status, ConditionType::Ready).contains("spec.driver.fake.instanceType"));
    assert_eq!(warnings(&first.notes), ["InvalidSpec"]);
    assert!(first.notes[0].message.contains("spec.driver.fake.instanceType"));
    assert_eq!(first.status.failures, None, "no attempt was made: nothing to count or hold back");

    let second = plan(&input_at(&feed(&machine, &first.status), Observed::InvalidSpec(invalid_config()), at(60)));
    assert!(second.notes.is_empty(), "warned once: {:?}", second.notes);
    assert_eq!(second.status, first.status);
    assert_eq!(second.requeue, None);

    // Fixed at a new generation: back to work at once.
    let fixed = feed(&machine, &second.status).with_generation(2).with_power_state(PowerState::Stopped);
    let third = plan(&input_at(&fixed, instance(State::Running), at(61)));
    assert_eq!(third.step, planned(Step::Stop, Cause::Converge));
    // Fixed outside the spec (a Secret it names appeared): at once too.
    let appeared =
        feed(&Machine::test(), &plan(&input(&Machine::test(), Observed::InvalidSpec(invalid_config()))).status);
    assert_eq!(plan(&input_at(&appeared, Observed::NoInstance, at(1))).step, planned(Step::Create, Cause::Converge));
}

#[test]
fn provisioning_without_ssh_is_an_invalid_spec() {
    let machine = Machine::test().with_provisioning("apt-get install -y nginx");
    for observed in [Observed::NoInstance, instance(State::Running)] {
        let plan = plan(&input(&machine, observed));
        assert_eq!(plan.step, None);
        assert_eq!(plan.requeue, None);
        assert_eq!(cond(&plan.status, ConditionType::Ready), Some(("False", "InvalidSpec")));
        let text = message(&plan.status, ConditionType::Ready);
        assert!(text.contains("spec.provisioning") && text.contains("fake"), "{text}");
        assert_eq!(warnings(&plan.notes), ["InvalidSpec"]);
    }
    // With a driver that offers SSH the spec is fine.
    let ssh = Input { offers_ssh: true, ..input(&machine, Observed::NoInstance) };
    assert_eq!(plan(&ssh).step, planned(Step::Create, Cause::Converge));
}

#[test]
fn observation_failures_back_off_exponentially() {
    let mut machine = was(State::Running)(Machine::test());
    let mut when = now();
    for (attempt, delay) in [(1, 1), (2, 2), (3, 4), (4, 8)] {
        let plan = plan(&input_at(&machine, Observed::Failed(transient()), when));
        assert_eq!(plan.step, None);
        assert_eq!(plan.requeue, Some(secs(delay)));
        let failures = plan.status.failures.clone().expect("failures");
        assert_eq!(failures.count, attempt);
        assert_eq!(failures.reason, "TransientError");
        let due = Time(when + jiff::SignedDuration::from_secs(delay as i64));
        assert_eq!(failures.next_retry_time, Some(due));
        assert_eq!(warnings(&plan.notes), ["TransientError"]);
        assert_eq!(plan.status.provider_id.as_deref(), Some(PROVIDER_ID));
        machine = feed(&machine, &plan.status);
        when += jiff::SignedDuration::from_secs(delay as i64);
    }
    // The next successful observation converges and forgets the failures.
    let plan = plan(&input_at(&machine, instance(State::Running), when));
    assert_eq!(plan.status.failures, None);
    assert_eq!(cond(&plan.status, ConditionType::Ready), Some(("True", "Ready")));
}

#[test]
fn drift_is_recorded_as_the_reason_of_the_start() {
    let machine = was(State::Running)(Machine::test());
    let plan = plan(&input(&machine, instance(State::Stopped)));
    let note = plan.notes.iter().find(|n| n.reason == "StoppedOutOfBand").expect("a drift note");
    assert!(note.warning);
    assert!(message(&plan.status, ConditionType::PowerStateSynced).contains("out of band"));
    let step = plan.step.clone().unwrap();
    assert_eq!(step, Planned { step: Step::Start, cause: Cause::Drift });
    let recorded = record(&input(&machine, instance(State::Stopped)), &plan, &step, Outcome::Succeeded);
    let op = recorded.status.last_operation.expect("lastOperation");
    assert_eq!((op.operation, op.result), (Operation::Start, OperationResult::Succeeded));
    assert!(op.message.contains("out of band"), "{}", op.message);
}

#[test]
fn a_stop_by_machinist_is_not_drift() {
    // Stopped by machinist (Force: Kill), then spec.powerState flipped back to Running
    // before the next observation: the start is convergence, not an out-of-band stop.
    for (mode, step) in [(StopMode::Force, Step::Kill), (StopMode::Graceful, Step::Stop)] {
        let machine = was(State::Running)(Machine::test().with_power_state(PowerState::Stopped).with_stop_mode(mode));
        let (machine, _) = step_and_record(&machine, instance(State::Running), now(), Outcome::Succeeded);
        assert_eq!(machine.status.as_ref().unwrap().last_operation.as_ref().unwrap().operation, step.operation());
        let flipped = machine.with_generation(2).with_power_state(PowerState::Running);
        let plan = plan(&input_at(&flipped, instance(State::Stopped), at(1)));
        assert_eq!(plan.step, planned(Step::Start, Cause::Converge), "{mode:?}");
        assert!(warnings(&plan.notes).is_empty(), "{mode:?}: {:?}", plan.notes);
    }
}

// ---------------------------------------------------------------------------------------
// record and begin
// ---------------------------------------------------------------------------------------

#[test]
fn created_sets_the_provider_id_first_thing() {
    let machine = Machine::test();
    let (machine, recorded) =
        step_and_record(&machine, Observed::NoInstance, now(), Outcome::Created("fake-new".into()));
    let s = machine.status.as_ref().unwrap();
    assert_eq!(s.provider_id.as_deref(), Some("fake-new"));
    assert_eq!(cond(s, ConditionType::InstanceCreated), Some(("True", "Created")));
    assert_eq!(s.failures, None);
    let op = s.last_operation.as_ref().unwrap();
    assert_eq!((op.operation, op.result), (Operation::Create, OperationResult::Succeeded));
    assert_eq!(reasons(&recorded.notes), ["Created"]);
    assert!(recorded.notes[0].message.contains("fake-new"));
    assert_eq!(recorded.step, None);
    assert_eq!(recorded.requeue, Some(SETTINGS.progress_interval));

    // And the next reconcile looks it up by providerID: no second Create, no adoption.
    let next = plan(&input_at(
        &machine,
        Observed::Instance { id: "fake-new".into(), state: State::Starting, addresses: None },
        at(2),
    ));
    assert_eq!(next.step, None);
    assert!(!reasons(&next.notes).contains(&"Adopted"));
}

#[test]
fn begin_shows_the_step_in_progress() {
    let machine = was(State::Running)(Machine::test().with_power_state(PowerState::Stopped));
    let plan = plan(&input(&machine, instance(State::Running)));
    let step = plan.step.clone().unwrap();
    let begun = begin(&plan, &step, now());
    let op = begun.last_operation.clone().unwrap();
    assert_eq!((op.operation, op.result, op.time), (Operation::Stop, OperationResult::InProgress, Time(now())));
    assert_eq!(begun.phase, Some(Phase::Stopping));
    assert_eq!(MachineStatus { last_operation: plan.status.last_operation.clone(), ..begun }, plan.status);
}

/// A Machine whose Start failed with `error` after `prior_failures` earlier failures.
fn start_failed(prior_failures: u32, error: DriverError) -> (Machine, Plan) {
    let machine = was(State::Stopped)(Machine::test()).with_status(|s| {
        if prior_failures > 0 {
            s.failures = Some(Failures {
                count: prior_failures,
                reason: "TransientError".into(),
                message: String::new(),
                next_retry_time: Some(Time(at(-1))),
            });
        }
    });
    step_and_record(&machine, instance(State::Stopped), now(), Outcome::Failed { operation: Operation::Start, error })
}

#[test]
fn transient_failure_counts_and_backs_off() {
    for (prior, delay) in [(0, 1), (1, 2), (3, 8), (12, 300)] {
        let (machine, recorded) = start_failed(prior, transient());
        let s = machine.status.as_ref().unwrap();
        let failures = s.failures.as_ref().unwrap();
        assert_eq!(failures.count, prior + 1);
        assert_eq!(failures.reason, "TransientError");
        assert_eq!(failures.next_retry_time, Some(Time(at(delay))), "after {prior} failures");
        assert_eq!(recorded.requeue, Some(secs(delay as u64)));
        assert_eq!(cond(s, ConditionType::PowerStateSynced), Some(("False", "TransientError")));
        assert_eq!(cond(s, ConditionType::Ready), Some(("False", "TransientError")));
        assert!(message(s, ConditionType::Ready).contains("the provider timed out"));
        let op = s.last_operation.as_ref().unwrap();
        assert_eq!((op.operation, op.result), (Operation::Start, OperationResult::Failed));
        assert_eq!(warnings(&recorded.notes), ["TransientError"]);
    }
}

#[test]
fn rate_limited_failure_honours_retry_after() {
    for retry_after in [5, 30, 900] {
        let (machine, recorded) = start_failed(0, rate_limited(retry_after));
        let failures = machine.status.as_ref().unwrap().failures.clone().unwrap();
        let due = failures.next_retry_time.expect("a retry").0;
        assert!(due >= at(retry_after as i64), "retry at {due}, retry-after {retry_after}s");
        assert!(recorded.requeue.unwrap() >= secs(retry_after));
        assert_eq!(failures.reason, "RateLimited");
    }
}

#[test]
fn not_found_failure_is_retried() {
    let (machine, recorded) = start_failed(0, not_found());
    let failures = machine.status.as_ref().unwrap().failures.clone().unwrap();
    assert_eq!(failures.next_retry_time, Some(Time(at(1))));
    assert_eq!(recorded.requeue, Some(secs(1)));
    assert_eq!(failures.reason, "NotFound");
}

#[test]
fn invalid_config_failure_waits_for_a_spec_change() {
    let (machine, recorded) = start_failed(0, invalid_config());
    let s = machine.status.as_ref().unwrap();
    assert_eq!(s.failures.as_ref().unwrap().next_retry_time, None);
    assert_eq!(recorded.requeue, None);
    assert_eq!(cond(s, ConditionType::Ready), Some(("False", "InvalidSpec")));
    assert!(message(s, ConditionType::Ready).contains("spec.driver.fake.instanceType"));
    assert_eq!(s.phase, Some(Phase::Failed));
    // Not retried at the same generation, however long we wait.
    let later = plan(&input_at(&machine, instance(State::Stopped), at(86_400)));
    assert_eq!(later.step, None);
    // Only the instance's state is still watched (a poll, not a retry).
    assert_eq!(later.requeue, Some(SETTINGS.poll_interval));
    assert_eq!(cond(&later.status, ConditionType::Ready), Some(("False", "InvalidSpec")));
    // Retried at once after a spec change.
    let fixed = plan(&input_at(&machine.clone().with_generation(2), instance(State::Stopped), at(1)));
    assert_eq!(fixed.step, planned(Step::Start, Cause::Converge));
}

#[test]
fn not_supported_failure_is_said_and_not_retried() {
    let machine = was(State::Running)(Machine::test().with_power_state(PowerState::Stopped));
    let error = not_supported(Operation::Stop);
    let (machine, recorded) = step_and_record(
        &machine,
        instance(State::Running),
        now(),
        Outcome::Failed { operation: Operation::Stop, error },
    );
    let s = machine.status.as_ref().unwrap();
    assert_eq!(s.failures.as_ref().unwrap().next_retry_time, None);
    assert_eq!(cond(s, ConditionType::PowerStateSynced), Some(("False", "NotSupported")));
    assert_eq!(cond(s, ConditionType::Ready), Some(("False", "NotSupported")));
    assert_eq!(recorded.requeue, Some(SETTINGS.poll_interval));
    assert_eq!(warnings(&recorded.notes), ["NotSupported"]);
    for t in [1, 600, 86_400] {
        let later = plan(&input_at(&machine, instance(State::Running), at(t)));
        assert_eq!(later.step, None, "retried after {t}s");
        assert_eq!(cond(&later.status, ConditionType::Ready), Some(("False", "NotSupported")));
        // The explanation stays where the power state is reported, and the state is still watched.
        assert_eq!(cond(&later.status, ConditionType::PowerStateSynced), Some(("False", "NotSupported")));
        assert_eq!(later.requeue, Some(SETTINGS.poll_interval));
    }
}

#[test]
fn a_known_provider_id_without_an_instance_is_never_created_again() {
    let machine = known(Machine::test()).with_state(State::Running);
    let plan = plan(&input(&machine, Observed::NoInstance));
    assert_eq!(plan.step, None);
    assert_eq!(cond(&plan.status, ConditionType::InstanceCreated), Some(("False", "InstanceNotFound")));
    assert_eq!(plan.status.provider_id, machine.status.as_ref().unwrap().provider_id);
}

#[test]
fn a_failed_observation_keeps_the_last_operation() {
    let stopped_at = at(-30);
    let machine = was(State::Running)(Machine::test().with_power_state(PowerState::Stopped))
        .with_status(|s| s.last_operation = last_op(Operation::Stop, OperationResult::Succeeded, stopped_at));
    let plan = plan(&input(&machine, Observed::Failed(transient())));
    let op = plan.status.last_operation.as_ref().unwrap();
    assert_eq!((op.operation, op.time.0), (Operation::Stop, stopped_at));
    let failures = plan.status.failures.as_ref().unwrap();
    assert!(failures.message.contains("reading the instance failed"), "{}", failures.message);
    assert_eq!(message(&plan.status, ConditionType::Ready), failures.message);
}

#[test]
fn a_success_clears_the_failure_from_ready() {
    let (machine, _) = start_failed(0, transient());
    let (_, recorded) = step_and_record(&machine, instance(State::Stopped), at(60), Outcome::Succeeded);
    assert_eq!(recorded.status.failures, None);
    assert_ne!(cond(&recorded.status, ConditionType::Ready).map(|c| c.1), Some("TransientError"));
}

#[test]
fn restart_not_supported_is_handled_once() {
    let machine = was(State::Running)(Machine::test().with_restart("r1", RestartMode::Soft));
    let (machine, recorded) = step_and_record(
        &machine,
        instance(State::Running),
        now(),
        Outcome::Failed { operation: Operation::Restart, error: not_supported(Operation::Restart) },
    );
    let s = machine.status.as_ref().unwrap();
    assert_eq!(s.last_restart_request.as_deref(), Some("r1"));
    assert_eq!(cond(s, ConditionType::PowerStateSynced), Some(("False", "NotSupported")));
    assert_eq!(warnings(&recorded.notes), ["NotSupported"]);
    let next = plan(&input_at(&machine, instance(State::Running), at(60)));
    assert_eq!(next.step, None, "the request was handled");
}

#[test]
fn transient_restart_failure_is_not_echoed_and_is_retried() {
    let machine = was(State::Running)(Machine::test().with_restart("r1", RestartMode::Soft));
    let (machine, _) = step_and_record(
        &machine,
        instance(State::Running),
        now(),
        Outcome::Failed { operation: Operation::Restart, error: transient() },
    );
    assert_eq!(machine.status.as_ref().unwrap().last_restart_request, None);
    let retry = plan(&input_at(&machine, instance(State::Running), at(1)));
    assert_eq!(retry.step, planned(Step::Restart, Cause::RestartRequest("r1".into())));
}

#[test]
fn a_failure_holds_the_step_back_until_its_retry_is_due() {
    // Fourth consecutive failure: retry in 8s.
    let (machine, _) = start_failed(3, transient());
    assert_eq!(machine.status.as_ref().unwrap().failures.as_ref().unwrap().next_retry_time, Some(Time(at(8))));

    let early = plan(&input_at(&machine, instance(State::Stopped), at(3)));
    assert_eq!(early.step, None);
    assert_eq!(early.requeue, Some(secs(5)));
    assert_eq!(cond(&early.status, ConditionType::Ready), Some(("False", "TransientError")));

    let due = plan(&input_at(&machine, instance(State::Stopped), at(8)));
    assert_eq!(due.step, planned(Step::Start, Cause::Converge));

    let changed = machine.clone().with_generation(2);
    let at_once = plan(&input_at(&changed, instance(State::Stopped), at(3)));
    assert_eq!(at_once.step, planned(Step::Start, Cause::Converge), "a spec change earns an immediate attempt");

    // A held-back Create too.
    let machine = Machine::test();
    let (machine, _) = step_and_record(
        &machine,
        Observed::NoInstance,
        now(),
        Outcome::Failed { operation: Operation::Create, error: transient() },
    );
    assert_eq!(
        cond(machine.status.as_ref().unwrap(), ConditionType::InstanceCreated),
        Some(("False", "TransientError"))
    );
    let early = plan(&input_at(&machine, Observed::NoInstance, now()));
    assert_eq!((early.step, early.requeue, early.status.phase), (None, Some(secs(1)), Some(Phase::Pending)));
    let due = plan(&input_at(&machine, Observed::NoInstance, at(1)));
    assert_eq!(due.step, planned(Step::Create, Cause::Converge));
}

#[test]
fn a_successful_restart_is_echoed_exactly_once() {
    let machine = was(State::Running)(Machine::test().with_restart("r1", RestartMode::Soft));
    let input = input(&machine, instance(State::Running));
    let plan = plan(&input);
    let planned = plan.step.clone().unwrap();
    assert_eq!(planned.step, Step::Restart);
    let recorded = record(&input, &plan, &planned, Outcome::Succeeded);
    assert_eq!(recorded.status.last_restart_request.as_deref(), Some("r1"));
    assert_eq!(reasons(&recorded.notes), ["Restarted"]);
    assert_eq!(recorded.status.phase, Some(Phase::Restarting));

    let machine = feed(&machine, &recorded.status);
    for state in [State::Starting, State::Running, State::Running] {
        let next = super::plan(&input_at(&machine, instance(state), at(2)));
        assert_eq!(next.step, None, "restarted again in {state}");
    }
    // A new request is a new restart.
    let again = machine.clone().with_generation(2).with_restart("r2", RestartMode::Soft);
    let next = super::plan(&input_at(&again, instance(State::Running), at(4)));
    assert_eq!(next.step, Some(Planned { step: Step::Restart, cause: Cause::RestartRequest("r2".into()) }));
}

/// A hard restart is two steps, each decided: Kill (which carries the request out), then,
/// once Stopped is observed, Start. Never Start while the instance is still stopping (EC2
/// refuses it), never a second Kill while the first is pending.
#[test]
fn a_hard_restart_kills_waits_for_stopped_then_starts_once() {
    let machine = was(State::Running)(Machine::test().with_restart("r1", RestartMode::Hard));
    let (machine, recorded) = step_and_record(&machine, instance(State::Running), now(), Outcome::Succeeded);
    assert_eq!(machine.status.as_ref().unwrap().last_restart_request.as_deref(), Some("r1"), "handled at the Kill");
    assert_eq!(machine.status.as_ref().unwrap().phase, Some(Phase::Restarting));
    assert_eq!(reasons(&recorded.notes), ["Killed"]);
    // Still Running (the Kill not taken effect yet), then Stopping: no step.
    for state in [State::Running, State::Stopping, State::Stopping] {
        let next = plan(&input_at(&machine, instance(state), at(2)));
        assert_eq!(next.step, None, "in {state}");
        assert_eq!(next.status.phase, Some(Phase::Restarting), "in {state}");
        assert!(warnings(&next.notes).is_empty(), "in {state}: {:?}", next.notes);
    }
    // Stopped: Start, which completes the restart.
    let input = input_at(&machine, instance(State::Stopped), at(3));
    let start = plan(&input);
    assert_eq!(start.step, planned(Step::Start, Cause::Converge));
    assert!(warnings(&start.notes).is_empty(), "no drift: {:?}", start.notes);
    let done = record(&input, &start, start.step.as_ref().unwrap(), Outcome::Succeeded);
    assert_eq!(reasons(&done.notes), ["Restarted"]);
    let machine = feed(&machine, &done.status);
    for state in [State::Starting, State::Running] {
        assert_eq!(plan(&input_at(&machine, instance(state), at(5))).step, None, "restarted again in {state}");
    }
}

#[test]
fn a_restart_interrupted_before_its_result_was_recorded_is_not_repeated() {
    for mode in [RestartMode::Soft, RestartMode::Hard] {
        let machine = was(State::Running)(Machine::test().with_restart("r1", mode));
        let input = input(&machine, instance(State::Running));
        let plan = plan(&input);
        let begun = begin(&plan, plan.step.as_ref().unwrap(), now());
        assert_eq!(begun.restart_request_in_progress.as_deref(), Some("r1"), "{mode:?}: the intent, before the call");
        // machinist stops here: the next reconcile finds only the intent.
        let after_crash = feed(&machine, &begun);
        let next = super::plan(&input_at(&after_crash, instance(State::Running), at(5)));
        assert_eq!(next.step, None, "{mode:?}: restarted again");
        assert_eq!(next.status.last_restart_request.as_deref(), Some("r1"), "{mode:?}: handled");
        assert_eq!(next.status.restart_request_in_progress, None);
        assert_eq!(warnings(&next.notes), ["RestartInterrupted"], "{mode:?}");
        assert!(next.notes[0].message.contains("new value"), "{}", next.notes[0].message);
        // A recorded restart leaves no intent behind.
        let done = record(&input, &plan, plan.step.as_ref().unwrap(), Outcome::Succeeded);
        assert_eq!(done.status.restart_request_in_progress, None, "{mode:?}");
    }
}

#[test]
fn an_interrupted_restart_is_exactly_once_where_the_driver_can_tell() {
    for mode in [RestartMode::Soft, RestartMode::Hard] {
        let machine = was(State::Running)(Machine::test().with_restart("r1", mode));
        let first = plan(&input(&machine, instance(State::Running)));
        let planned = first.step.clone().unwrap();
        let after_crash = feed(&machine, &begin(&first, &planned, now()));
        assert_eq!(restart_intent_since(&after_crash), Some(now()), "{mode:?}: asked about the time of the intent");
        let asked = |changed| Input {
            power_changed_since_intent: Some(changed),
            ..input_at(&after_crash, instance(State::Running), at(5))
        };

        // The power never changed: the call was never made. Made now, once.
        let resumed = plan(&asked(false));
        assert_eq!(resumed.step, Some(planned.clone()), "{mode:?}: the restart is made");
        assert!(warnings(&resumed.notes).is_empty(), "{mode:?}: {:?}", resumed.notes);

        // It changed: the restart happened. Recorded, not repeated, no warning.
        let happened = plan(&asked(true));
        assert_eq!(happened.step, None, "{mode:?}: restarted again");
        assert_eq!(happened.status.last_restart_request.as_deref(), Some("r1"));
        assert!(reasons(&happened.notes).contains(&"Restarted"), "{mode:?}: {:?}", happened.notes);
        assert!(warnings(&happened.notes).is_empty());
        let next = feed(&after_crash, &happened.status);
        assert_eq!(restart_intent_since(&next), None, "{mode:?}: nothing left to ask");
    }
}

#[test]
fn hard_restart_whose_kill_failed_is_not_echoed() {
    let machine = was(State::Running)(Machine::test().with_restart("r1", RestartMode::Hard));
    let (machine, _) = step_and_record(
        &machine,
        instance(State::Running),
        now(),
        Outcome::Failed { operation: Operation::Kill, error: transient() },
    );
    assert_eq!(machine.status.as_ref().unwrap().last_restart_request, None);
    let retry = plan(&input_at(&machine, instance(State::Running), at(1)));
    assert_eq!(retry.step, planned(Step::Kill, Cause::RestartRequest("r1".into())));
}

#[test]
fn hard_restart_whose_start_failed_starts_again_and_never_kills_again() {
    let machine = was(State::Running)(Machine::test().with_restart("r1", RestartMode::Hard));
    let (machine, _) = step_and_record(&machine, instance(State::Running), now(), Outcome::Succeeded);
    let (machine, _) = step_and_record(
        &machine,
        instance(State::Stopped),
        at(1),
        Outcome::Failed { operation: Operation::Start, error: transient() },
    );
    // Found stopped: started again after the backoff, not killed again.
    let early = plan(&input_at(&machine, instance(State::Stopped), at(1)));
    assert_eq!(early.step, None);
    let retry = plan(&input_at(&feed(&machine, &early.status), instance(State::Stopped), at(3)));
    assert_eq!(retry.step, planned(Step::Start, Cause::Converge));
    // Started by someone else meanwhile: nothing more to do.
    assert_eq!(plan(&input_at(&machine, instance(State::Running), at(400))).step, None);
}

#[test]
fn a_stop_call_that_does_not_answer_in_time_is_pending_and_escalates_from_when_it_was_made() {
    let machine = was(State::Running)(Machine::test().with_power_state(PowerState::Stopped).with_stop_timeout(5));
    let input = input(&machine, instance(State::Running));
    let first = plan(&input);
    assert_eq!(first.step, planned(Step::Stop, Cause::Converge));
    let begun = begin(&first, first.step.as_ref().unwrap(), now());
    let after = Input { now: at(5), ..input.clone() };
    let recorded = record(
        &after,
        &first,
        first.step.as_ref().unwrap(),
        Outcome::Unanswered { operation: Operation::Stop, called_at: now() },
    );
    let op = recorded.status.last_operation.clone().unwrap();
    assert_eq!((op.operation, op.result, op.time.0), (Operation::Stop, OperationResult::InProgress, now()));
    assert!(recorded.notes.is_empty(), "{:?}", recorded.notes);
    assert_eq!(recorded.status.phase, begun.phase);
    // The provider still says Running: no second Stop; the Kill, 5 s after the Stop.
    let machine = feed(&machine, &recorded.status);
    assert_eq!(plan(&input_at(&machine, instance(State::Running), at(4))).step, None, "a second Stop");
    let next = plan(&input_at(&machine, instance(State::Running), at(5)));
    assert_eq!(next.step, planned(Step::Kill, Cause::StopTimeout));
    assert_eq!(warnings(&next.notes), ["StopTimedOut"]);
}

// ---------------------------------------------------------------------------------------
// Cleanup
// ---------------------------------------------------------------------------------------

#[test]
fn orphan_finalizes_without_the_driver() {
    for observed in [Observed::NoInstance, instance(State::Running), Observed::Failed(transient())] {
        let machine = was(State::Running)(Machine::test()).orphan().deleting();
        let plan = plan_cleanup(&input(&machine, observed));
        assert_eq!(plan.next, CleanupNext::Finalize);
        assert_eq!(reasons(&plan.notes), ["Orphaned"]);
        assert!(plan.notes[0].message.contains(PROVIDER_ID));
        assert_eq!(cond(&plan.status, ConditionType::Deleting), Some(("True", "Orphaning")));
        assert_eq!(plan.status.phase, Some(Phase::Deleting));
        assert_eq!(cond(&plan.status, ConditionType::Ready), Some(("False", "Deleting")));
    }
}

#[test]
fn delete_removes_the_instance() {
    for state in [State::Running, State::Stopped, State::Stopping, State::Error] {
        let machine = was(State::Running)(Machine::test()).deleting();
        let plan = plan_cleanup(&input(&machine, instance(state)));
        assert_eq!(plan.next, CleanupNext::Remove(PROVIDER_ID.into()), "{state}");
        assert_eq!(cond(&plan.status, ConditionType::Deleting), Some(("True", "Removing")));
        assert!(plan.notes.is_empty());
    }
    // Found by UID (no providerID yet): removed all the same.
    let machine = Machine::test().deleting();
    let observed = Observed::Instance { id: "fake-found".into(), state: State::Running, addresses: None };
    assert_eq!(plan_cleanup(&input(&machine, observed)).next, CleanupNext::Remove("fake-found".into()));
    // Observation failed but the id is known: Remove needs nothing else.
    let machine = was(State::Running)(Machine::test()).deleting();
    assert_eq!(
        plan_cleanup(&input(&machine, Observed::Failed(transient()))).next,
        CleanupNext::Remove(PROVIDER_ID.into())
    );
}

#[test]
fn a_live_failure_does_not_hold_back_remove_once_deletion_bumped_the_generation() {
    // Stop was NotSupported at generation 1: no retry until the spec changes.
    let machine = was(State::Running)(Machine::test()).with_status(|s| {
        s.failures =
            Some(Failures { count: 1, reason: "NotSupported".into(), message: String::new(), next_retry_time: None });
        crate::api::set_condition(&mut s.conditions, ConditionType::Ready, false, "NotSupported", "", 1, at(-60));
    });
    // Setting deletionTimestamp bumps metadata.generation (the API server's markAsDeleting).
    let deleted = machine.clone().deleting().with_generation(2);
    assert_eq!(plan_cleanup(&input(&deleted, instance(State::Running))).next, CleanupNext::Remove(PROVIDER_ID.into()));
    // Without the bump the Remove would wait for a spec change.
    let unbumped = machine.deleting();
    assert_eq!(plan_cleanup(&input(&unbumped, instance(State::Running))).next, CleanupNext::Wait(None));
}

#[test]
fn without_an_instance_only_the_leftovers_are_removed_then_the_finalizer() {
    let machine = Machine::test().deleting();
    let plan = plan_cleanup(&input(&machine, Observed::NoInstance));
    assert_eq!(plan.next, CleanupNext::RemoveLeftovers);
    assert!(plan.notes.is_empty());
    // Done: the finalizer goes, with nothing more to tell.
    let recorded = record_cleanup(&input(&machine, Observed::NoInstance), &plan, Outcome::Succeeded);
    assert_eq!(recorded.next, CleanupNext::Finalize);
    assert!(recorded.notes.is_empty());
}

#[test]
fn a_known_instance_reported_gone_is_still_removed_by_id() {
    // An eventually consistent read (EC2's Describe) can miss a fresh instance: only
    // Remove's own answer proves it gone.
    let machine = was(State::Running)(Machine::test()).deleting();
    let plan = plan_cleanup(&input(&machine, instance(State::NotFound)));
    assert_eq!(plan.next, CleanupNext::Remove(PROVIDER_ID.into()));
    let recorded = record_cleanup(&input(&machine, instance(State::NotFound)), &plan, Outcome::Succeeded);
    assert_eq!(recorded.next, CleanupNext::Finalize);
    assert_eq!(reasons(&recorded.notes), ["Removed"]);
}

#[test]
fn a_removal_under_way_is_looked_at_again_without_a_failure() {
    let machine = was(State::Running)(Machine::test()).deleting();
    let input = input(&machine, instance(State::Stopping));
    let plan = plan_cleanup(&input);
    assert_eq!(plan.next, CleanupNext::Remove(PROVIDER_ID.into()));
    let waiting = Outcome::RemovalWaiting("waiting for i-0abc to terminate (shutting-down)".into());
    let recorded = record_cleanup(&input, &plan, waiting.clone());
    assert_eq!(recorded.next, CleanupNext::Wait(Some(SETTINGS.progress_interval * 5)));
    assert_eq!(recorded.status.failures, None);
    assert!(recorded.notes.is_empty(), "{:?}", recorded.notes);
    assert_eq!(cond(&recorded.status, ConditionType::Deleting), Some(("True", "Removing")));
    assert_eq!(message(&recorded.status, ConditionType::Deleting), "waiting for i-0abc to terminate (shutting-down)");
    // Looked at again: Remove again, and the same answer changes nothing.
    let machine = feed(&machine, &recorded.status);
    let input = input_at(&machine, instance(State::Stopping), at(10));
    let plan = plan_cleanup(&input);
    assert_eq!(plan.next, CleanupNext::Remove(PROVIDER_ID.into()));
    assert_eq!(Some(&plan.status), machine.status.as_ref(), "no write before the call either");
    let again = record_cleanup(&input, &plan, waiting);
    assert_eq!(Some(&again.status), machine.status.as_ref(), "no write while it waits the same way");
}

#[test]
fn failing_to_remove_the_leftovers_keeps_the_finalizer_and_says_what_stays() {
    let machine = Machine::test().deleting();
    let input = input(&machine, Observed::NoInstance);
    let plan = plan_cleanup(&input);
    let failed = Outcome::Failed { operation: Operation::Remove, error: transient() };
    let recorded = record_cleanup(&input, &plan, failed);
    assert_eq!(recorded.next, CleanupNext::Wait(Some(secs(1))));
    assert_eq!(warnings(&recorded.notes), ["TransientError"]);
    let why = message(&recorded.status, ConditionType::Deleting);
    assert!(why.contains("the finalizer stays until what was created for the Machine is removed"), "{why}");
    // Held back until the retry is due.
    let machine = feed(&machine, &recorded.status);
    assert_eq!(plan_cleanup(&input_at(&machine, Observed::NoInstance, now())).next, CleanupNext::Wait(Some(secs(1))));
    assert_eq!(plan_cleanup(&input_at(&machine, Observed::NoInstance, at(1))).next, CleanupNext::RemoveLeftovers);
}

#[test]
fn paused_deletion_waits_for_a_change() {
    let machine = was(State::Running)(Machine::test()).deleting().paused();
    let plan = plan_cleanup(&input(&machine, Observed::NoInstance));
    assert_eq!(plan.next, CleanupNext::Wait(None));
    assert_eq!(cond(&plan.status, ConditionType::Paused), Some(("True", "Paused")));
    assert_eq!(cond(&plan.status, ConditionType::Deleting), Some(("True", "Paused")));
}

#[test]
fn invalid_spec_deletion() {
    let machine = Machine::test().deleting();
    let plan = plan_cleanup(&input(&machine, Observed::InvalidSpec(invalid_config())));
    assert_eq!(plan.next, CleanupNext::Finalize, "nothing was ever created");

    let machine = was(State::Running)(Machine::test()).deleting();
    let first = plan_cleanup(&input(&machine, Observed::InvalidSpec(invalid_config())));
    assert_eq!(first.next, CleanupNext::Wait(None));
    assert_eq!(cond(&first.status, ConditionType::Deleting), Some(("True", "InvalidSpec")));
    let text = message(&first.status, ConditionType::Deleting);
    assert!(text.contains(PROVIDER_ID) && text.contains("spec.driver") && text.contains("Orphan"), "{text}");
    assert_eq!(warnings(&first.notes), ["InvalidSpec"]);
    let second = plan_cleanup(&input(&feed(&machine, &first.status), Observed::InvalidSpec(invalid_config())));
    assert!(second.notes.is_empty(), "warned once: {:?}", second.notes);
    assert_eq!(second.status, first.status);
}

#[test]
fn a_failed_observation_is_not_recorded_again_before_its_retry_is_due() {
    let machine = was(State::Running)(Machine::test());
    let first = plan(&input(&machine, Observed::Failed(transient())));
    assert_eq!(first.status.failures.as_ref().unwrap().count, 1);
    assert_eq!(first.requeue, Some(secs(1)));

    // The watch event of that status write wakes the Machine at once: same failure, not
    // due yet. Nothing changes (so nothing is written) and the retry time is kept.
    let machine = feed(&machine, &first.status);
    let early = plan(&input_at(&machine, Observed::Failed(transient()), now()));
    assert_eq!(Some(&early.status), machine.status.as_ref());
    assert_eq!((early.step.clone(), early.requeue), (None, Some(secs(1))));
    assert!(early.notes.is_empty());

    // Due: counted again. Another failure (here: credentials gone) is recorded at once.
    let due = plan(&input_at(&machine, Observed::Failed(transient()), at(1)));
    assert_eq!(due.status.failures.as_ref().unwrap().count, 2);
    let other = plan(&input_at(&machine, Observed::Failed(not_found()), now()));
    assert_eq!(other.status.failures.as_ref().unwrap().reason, "NotFound");
}

#[test]
fn failed_observation_without_an_id_backs_off() {
    let machine = Machine::test().deleting();
    let plan = plan_cleanup(&input(&machine, Observed::Failed(not_found())));
    assert_eq!(plan.next, CleanupNext::Wait(Some(secs(1))));
    assert_eq!(plan.status.failures.as_ref().unwrap().count, 1);
    assert_eq!(cond(&plan.status, ConditionType::Deleting), Some(("True", "NotFound")));
    assert!(message(&plan.status, ConditionType::Deleting).contains("deletionPolicy: Orphan"));

    // Woken again (by that very status write) before the retry is due: nothing changes,
    // so nothing is written and no hot loop follows.
    let machine = feed(&machine, &plan.status);
    let early = plan_cleanup(&input_at(&machine, Observed::Failed(not_found()), now()));
    assert_eq!(early.next, CleanupNext::Wait(Some(secs(1))));
    assert_eq!(Some(&early.status), machine.status.as_ref());
    assert!(early.notes.is_empty());
    let due = plan_cleanup(&input_at(&machine, Observed::Failed(not_found()), at(1)));
    assert_eq!(due.status.failures.as_ref().unwrap().count, 2);
}

#[test]
fn record_cleanup_failure_keeps_the_finalizer_and_backs_off() {
    let machine = was(State::Running)(Machine::test()).deleting();
    let input = input(&machine, instance(State::Running));
    let plan = plan_cleanup(&input);
    let failed = Outcome::Failed { operation: Operation::Remove, error: transient() };
    let recorded = record_cleanup(&input, &plan, failed);
    assert_eq!(recorded.next, CleanupNext::Wait(Some(secs(1))));
    let failures = recorded.status.failures.clone().unwrap();
    assert_eq!((failures.count, failures.next_retry_time), (1, Some(Time(at(1)))));
    assert_eq!(cond(&recorded.status, ConditionType::Deleting), Some(("True", "TransientError")));
    assert!(message(&recorded.status, ConditionType::Deleting).contains("finalizer"));
    assert_eq!(warnings(&recorded.notes), ["TransientError"]);

    // Held back until the retry is due, then removed again.
    let machine = feed(&machine, &recorded.status);
    assert_eq!(
        plan_cleanup(&input_at(&machine, instance(State::Running), now())).next,
        CleanupNext::Wait(Some(secs(1)))
    );
    assert_eq!(
        plan_cleanup(&input_at(&machine, instance(State::Running), at(1))).next,
        CleanupNext::Remove(PROVIDER_ID.into())
    );

    // Not retryable: still waits (for the backoff cap), never finalizes.
    let failed = Outcome::Failed { operation: Operation::Remove, error: not_supported(Operation::Remove) };
    let recorded = record_cleanup(&input, &plan, failed);
    assert_eq!(recorded.next, CleanupNext::Wait(Some(SETTINGS.backoff_cap)));
}

#[test]
fn record_cleanup_success_finalizes() {
    let machine = was(State::Running)(Machine::test()).deleting().with_status(|s| {
        s.failures = Some(Failures {
            count: 2,
            reason: "TransientError".into(),
            message: String::new(),
            next_retry_time: Some(Time(at(-1))),
        });
    });
    let input = input(&machine, instance(State::Running));
    let plan = plan_cleanup(&input);
    assert_eq!(plan.next, CleanupNext::Remove(PROVIDER_ID.into()));
    let recorded = record_cleanup(&input, &plan, Outcome::Succeeded);
    assert_eq!(recorded.next, CleanupNext::Finalize);
    assert_eq!(reasons(&recorded.notes), ["Removed"]);
    assert_eq!(recorded.status.failures, None);
    let op = recorded.status.last_operation.unwrap();
    assert_eq!((op.operation, op.result), (Operation::Remove, OperationResult::Succeeded));
}

// ---------------------------------------------------------------------------------------
// No writes when nothing changed
// ---------------------------------------------------------------------------------------

/// Drives `machine` from nothing through the observations (create, boot, stop as the
/// spec asks), recording every step as succeeded, 2s apart; returns it with the status
/// written last.
fn drive(mut machine: Machine, observations: &[Observed]) -> Machine {
    let mut when = at(-100);
    for observed in observations {
        let input = input_at(&machine, observed.clone(), when);
        let plan = plan(&input);
        let status = match &plan.step {
            None => plan.status.clone(),
            Some(step) => {
                let outcome = match step.step {
                    Step::Create => Outcome::Created(PROVIDER_ID.into()),
                    _ => Outcome::Succeeded,
                };
                record(&input, &plan, step, outcome).status
            }
        };
        machine = feed(&machine, &status);
        when += jiff::SignedDuration::from_secs(2);
    }
    machine
}

/// A Machine converged on `state` (Running or Stopped) as a previous plan wrote it.
fn converged(machine: Machine, state: State) -> Machine {
    let path: Vec<Observed> = match state {
        State::Running => vec![Observed::NoInstance, instance(State::Starting), instance(State::Running)],
        State::Stopped => vec![
            Observed::NoInstance,
            instance(State::Starting),
            instance(State::Running),
            instance(State::Stopping),
            instance(State::Stopped),
        ],
        other => panic!("no path to {other}"),
    };
    let desired = if state == State::Running { PowerState::Running } else { PowerState::Stopped };
    drive(machine.with_power_state(desired), &path)
}

#[test]
fn converged_machine_plans_no_change() {
    for (state, phase) in [(State::Running, Phase::Running), (State::Stopped, Phase::Stopped)] {
        let machine = converged(Machine::test(), state);
        let prior = machine.status.clone().unwrap();
        assert_eq!(prior.phase, Some(phase));
        assert_eq!(prior.state, Some(state));
        assert_eq!(cond(&prior, ConditionType::PowerStateSynced).unwrap().0, "True");
        for when in [now(), at(60), at(86_400)] {
            let plan = plan(&input_at(&machine, instance(state), when));
            assert_eq!(plan.step, None, "{state}");
            assert_eq!(plan.status, prior, "{state}: a converged Machine must not change its status");
            assert!(plan.notes.is_empty(), "{state}: {:?}", plan.notes);
            assert_eq!(plan.requeue, Some(SETTINGS.poll_interval));
        }
    }
}

#[test]
fn converged_machine_plans_no_change_after_a_json_roundtrip() {
    for state in [State::Running, State::Stopped] {
        let machine = converged(Machine::test(), state);
        let stored = roundtrip(machine.status.as_ref().unwrap());
        // Whole-second times survive the API server unchanged.
        assert_eq!(&stored, machine.status.as_ref().unwrap(), "{state}");
        let machine = machine.clone().with_full_status(Some(stored.clone()));
        let plan = plan(&input_at(&machine, instance(state), at(120)));
        assert_eq!(plan.step, None);
        assert_eq!(plan.status, stored, "{state}");
        assert!(plan.notes.is_empty(), "{state}: {:?}", plan.notes);
    }
}

#[test]
fn converged_running_with_addresses_plans_no_change() {
    let addresses = vec![
        Address { kind: AddressType::InternalIP, address: "192.0.2.7".into() },
        Address { kind: AddressType::Hostname, address: "fake.machinist.internal".into() },
    ];
    let observed = Observed::Instance { id: PROVIDER_ID.into(), state: State::Running, addresses: Some(addresses) };
    let machine = drive(Machine::test(), &[Observed::NoInstance, observed.clone(), observed.clone()]);
    let stored = roundtrip(machine.status.as_ref().unwrap());
    let plan = plan(&input_at(&machine.clone().with_full_status(Some(stored.clone())), observed, at(60)));
    assert_eq!(plan.status, stored);
    assert!(plan.notes.is_empty());
}

#[test]
fn restart_request_skipped_while_stopped_plans_no_change_afterwards() {
    let machine = converged(Machine::test(), State::Stopped).with_generation(2).with_restart("r1", RestartMode::Soft);
    let first = plan(&input(&machine, instance(State::Stopped)));
    assert_eq!(reasons(&first.notes), ["RestartSkipped"]);
    assert_eq!(first.status.last_restart_request.as_deref(), Some("r1"));
    let machine = feed(&machine, &first.status);
    let second = plan(&input_at(&machine, instance(State::Stopped), at(60)));
    assert_eq!(second.status, first.status);
    assert!(second.notes.is_empty());
    // Started later: the skipped request does not restart it.
    let running = drive(
        machine.with_generation(3).with_power_state(PowerState::Running),
        &[instance(State::Stopped), instance(State::Starting), instance(State::Running)],
    );
    let plan = plan(&input(&running, instance(State::Running)));
    assert_eq!(plan.step, None);
}

// ---------------------------------------------------------------------------------------
// A stop that does not finish
// ---------------------------------------------------------------------------------------

/// Follows the requeues of `machine` observed in `state` (each plan's status written,
/// steps recorded with `outcome`) from `from` until a step is planned; returns the step
/// and when, or `None` if none comes within `horizon` seconds.
fn first_step_within(
    mut machine: Machine,
    state: State,
    from: jiff::Timestamp,
    horizon: i64,
) -> Option<(Planned, jiff::Timestamp)> {
    let mut when = from;
    while when <= from + jiff::SignedDuration::from_secs(horizon) {
        let plan = plan(&input_at(&machine, instance(state), when));
        if let Some(step) = plan.step {
            return Some((step, when));
        }
        machine = feed(&machine, &plan.status);
        let wait = plan.requeue.unwrap_or(SETTINGS.poll_interval).as_secs().max(1);
        when += jiff::SignedDuration::from_secs(wait as i64);
    }
    None
}

#[test]
fn a_failed_kill_after_a_stop_timeout_is_retried() {
    // Graceful stop asked at -400; the guest ignores it; killed at 0, which fails.
    let machine = was(State::Running)(Machine::test().with_power_state(PowerState::Stopped));
    let (machine, _) = step_and_record(&machine, instance(State::Running), at(-400), Outcome::Succeeded);
    let (machine, _) = step_and_record(
        &machine,
        instance(State::Stopping),
        now(),
        Outcome::Failed { operation: Operation::Kill, error: transient() },
    );
    let (step, when) = first_step_within(machine, State::Stopping, now(), 600).expect("the Kill is retried");
    assert_eq!(step, Planned { step: Step::Kill, cause: Cause::StopTimeout });
    assert_eq!(when, at(1), "retried when the backoff is over");
}

#[test]
fn a_hung_graceful_stop_is_killed_even_when_running_is_desired_again() {
    // Graceful stop asked at -400; the guest ignores it; then spec.powerState: Running.
    let machine = was(State::Running)(Machine::test().with_power_state(PowerState::Stopped));
    let (machine, _) = step_and_record(&machine, instance(State::Running), at(-400), Outcome::Succeeded);
    let machine = machine.with_generation(2).with_power_state(PowerState::Running);
    let (step, _) = first_step_within(machine.clone(), State::Stopping, now(), 600).expect("not stuck in Stopping");
    assert_eq!(step, Planned { step: Step::Kill, cause: Cause::StopTimeout });
    // Killed: then started.
    let (machine, _) = step_and_record(&machine, instance(State::Stopping), now(), Outcome::Succeeded);
    let next = plan(&input_at(&machine, instance(State::Stopped), at(2)));
    assert_eq!(next.step, planned(Step::Start, Cause::Converge));
}

#[test]
fn an_observation_failure_does_not_lose_the_stop_timeout() {
    // Graceful stop asked at -100 (timeout 300s); an observation fails at -50.
    let machine = was(State::Running)(Machine::test().with_power_state(PowerState::Stopped));
    let (machine, _) = step_and_record(&machine, instance(State::Running), at(-100), Outcome::Succeeded);
    let failed = plan(&input_at(&machine, Observed::Failed(transient()), at(-50)));
    let machine = feed(&machine, &failed.status);
    let (step, when) = first_step_within(machine, State::Stopping, at(-49), 3600).expect("escalated after all");
    assert_eq!(step, Planned { step: Step::Kill, cause: Cause::StopTimeout });
    // At the latest one stop timeout after the first observation that worked again.
    assert!(when <= at(-49 + 300), "killed at {when}, more than the stop timeout after the failure");
}

#[test]
fn a_kill_that_does_not_finish_is_not_repeated_in_a_loop() {
    // Force stop: Kill succeeded at 0, the provider still reports Stopping for a while.
    let machine =
        was(State::Running)(Machine::test().with_power_state(PowerState::Stopped).with_stop_mode(StopMode::Force));
    let (machine, _) = step_and_record(&machine, instance(State::Running), now(), Outcome::Succeeded);
    let mut machine = machine;
    for t in [2, 4, 30, 120, 299] {
        let plan = plan(&input_at(&machine, instance(State::Stopping), at(t)));
        assert_eq!(plan.step, None, "killed again after {t}s");
        machine = feed(&machine, &plan.status);
    }
}

#[test]
fn the_stop_timeout_warning_is_not_repeated_while_the_kill_is_held_back() {
    let machine = was(State::Running)(Machine::test().with_power_state(PowerState::Stopped));
    let (machine, _) = step_and_record(&machine, instance(State::Running), at(-400), Outcome::Succeeded);
    let (mut machine, _) = step_and_record(
        &machine,
        instance(State::Stopping),
        now(),
        Outcome::Failed { operation: Operation::Kill, error: DriverError::transient("busy") },
    );
    // Fail a few more times: each retry is held back for a while.
    let mut when = now();
    for _ in 0..3 {
        let due = machine.status.as_ref().unwrap().failures.as_ref().unwrap().next_retry_time.clone().unwrap().0;
        while when < due {
            let plan = plan(&input_at(&machine, instance(State::Stopping), when));
            assert_eq!(plan.step, None);
            assert!(plan.notes.is_empty(), "while held back: {:?}", plan.notes);
            machine = feed(&machine, &plan.status);
            when += jiff::SignedDuration::from_secs(1);
        }
        let (next, _) = step_and_record(
            &machine,
            instance(State::Stopping),
            when,
            Outcome::Failed { operation: Operation::Kill, error: DriverError::transient("busy") },
        );
        machine = next;
    }
}

// ---------------------------------------------------------------------------------------
// Simulation: a Machine against a tiny in-memory model of its instance
// ---------------------------------------------------------------------------------------

mod simulation {
    use std::collections::{BTreeMap, BTreeSet, VecDeque};

    use jiff::{SignedDuration, Timestamp};
    use proptest::prelude::*;

    use super::*;

    /// How long the model's instance takes to finish Starting or Stopping.
    const SETTLE_SECS: i64 = 3;

    #[derive(Clone, Copy, Debug)]
    enum Failure {
        Transient,
        RateLimited(u64),
    }

    impl Failure {
        fn error(self) -> DriverError {
            match self {
                Failure::Transient => DriverError::transient("injected"),
                Failure::RateLimited(s) => rate_limited(s),
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Event {
        /// Someone changes the instance behind machinist's back.
        OutOfBand(State),
        /// The instance is deleted at the provider.
        Vanish,
        FlipDesired,
        /// A new `spec.restartRequest` value.
        RestartRequest,
        /// The next observation fails.
        FailObserve(Failure),
        /// The next call that changes the instance fails.
        FailCall(Failure),
        /// The controller dies right after its next driver call: nothing is recorded.
        Crash,
        /// The controller dies after writing its next step's intent, before the call.
        CrashBeforeCall,
        Advance(u64),
        Reconcile,
    }

    fn failure() -> impl Strategy<Value = Failure> {
        prop_oneof![3 => Just(Failure::Transient), 1 => (1u64..40).prop_map(Failure::RateLimited)]
    }

    fn event() -> impl Strategy<Value = Event> {
        let states =
            vec![State::Running, State::Stopped, State::Stopping, State::Starting, State::Paused, State::Saved];
        prop_oneof![
            24 => prop::sample::select(states).prop_map(Event::OutOfBand),
            1 => Just(Event::Vanish),
            18 => Just(Event::FlipDesired),
            15 => Just(Event::RestartRequest),
            12 => failure().prop_map(Event::FailObserve),
            18 => failure().prop_map(Event::FailCall),
            6 => Just(Event::Crash),
            4 => Just(Event::CrashBeforeCall),
            24 => (1u64..400).prop_map(Event::Advance),
            18 => Just(Event::Reconcile),
        ]
    }

    #[derive(Clone, Debug)]
    struct Setup {
        desired: PowerState,
        stop_mode: StopMode,
        restart_mode: RestartMode,
        stop_timeout: Option<u32>,
        /// The guest ignores graceful stops: Stopping until killed.
        ignores_graceful_stop: bool,
        /// The controller dies right after its first Create (adoption follows).
        crash_on_create: bool,
        /// The driver can tell whether the instance's power changed since a time.
        tells_power_changes: bool,
        jitter: f64,
    }

    fn setup() -> impl Strategy<Value = Setup> {
        (
            prop_oneof![Just(PowerState::Running), Just(PowerState::Stopped)],
            prop_oneof![Just(StopMode::Graceful), Just(StopMode::Force)],
            prop_oneof![Just(RestartMode::Soft), Just(RestartMode::Hard)],
            prop_oneof![Just(None), Just(Some(5)), Just(Some(30))],
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0.0..1.0f64,
        )
            .prop_map(
                |(
                    desired,
                    stop_mode,
                    restart_mode,
                    stop_timeout,
                    ignores_graceful_stop,
                    crash_on_create,
                    tells_power_changes,
                    jitter,
                )| {
                    Setup {
                        desired,
                        stop_mode,
                        restart_mode,
                        stop_timeout,
                        ignores_graceful_stop,
                        crash_on_create,
                        tells_power_changes,
                        jitter,
                    }
                },
            )
    }

    #[derive(Clone, Debug)]
    struct Instance {
        id: String,
        state: State,
        /// A transition under way: the state it reaches, and when.
        settles: Option<(Timestamp, State)>,
        /// When the provider last accepted a power change.
        power_changed: Option<Timestamp>,
    }

    struct Sim {
        machine: Machine,
        now: Timestamp,
        jitter: f64,
        ignores_graceful_stop: bool,
        tells_power_changes: bool,
        /// The provider: at most one instance, tagged with the Machine's UID.
        instance: Option<Instance>,
        created: u32,
        observe_failures: VecDeque<Failure>,
        call_failures: VecDeque<Failure>,
        crash_next: bool,
        crash_before_call: bool,
        requests: u32,
        /// How often each restart request was carried out at the provider.
        performed: BTreeMap<String, u32>,
        /// Requests whose step ran in a reconcile that crashed before recording.
        crashed: BTreeSet<String>,
        /// An out-of-band stop happened since the instance was last seen running.
        stopped_out_of_band: bool,
        /// machinist's Stop went through and Stopped has not been observed since (nor
        /// was Running asked for again): no second Stop.
        stop_pending: bool,
        /// machinist's Kill went through and Stopped has not been observed since: no Start.
        killed_not_seen_stopped: bool,
        log: Vec<String>,
    }

    /// What one reconcile did.
    struct Reconciled {
        plan: Plan,
        requeue: Option<Duration>,
    }

    impl Sim {
        fn new(setup: &Setup) -> Self {
            let mut machine = Machine::test().with_power_state(setup.desired).with_stop_mode(setup.stop_mode);
            machine.spec.restart_mode = setup.restart_mode;
            machine.spec.stop_timeout_seconds = setup.stop_timeout;
            Sim {
                machine,
                now: now(),
                jitter: setup.jitter,
                ignores_graceful_stop: setup.ignores_graceful_stop,
                tells_power_changes: setup.tells_power_changes,
                instance: None,
                created: 0,
                observe_failures: VecDeque::new(),
                call_failures: VecDeque::new(),
                crash_next: setup.crash_on_create,
                crash_before_call: false,
                requests: 0,
                performed: BTreeMap::new(),
                crashed: BTreeSet::new(),
                stopped_out_of_band: false,
                stop_pending: false,
                killed_not_seen_stopped: false,
                log: Vec::new(),
            }
        }

        fn advance(&mut self, d: Duration) {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            self.now += SignedDuration::from_secs(secs.max(1) as i64);
        }

        fn settle(&mut self) {
            let now = self.now;
            if let Some(i) = self.instance.as_mut()
                && let Some((when, to)) = i.settles
                && when <= now
            {
                i.state = to;
                i.settles = None;
            }
        }

        fn set_state(&mut self, state: State) {
            let now = self.now;
            let Some(i) = self.instance.as_mut() else { return };
            i.state = state;
            i.power_changed = Some(now);
            let after = now + SignedDuration::from_secs(SETTLE_SECS);
            i.settles = match state {
                State::Starting => Some((after, State::Running)),
                State::Stopping => Some((after, State::Stopped)),
                _ => None,
            };
        }

        fn apply(&mut self, event: &Event) {
            self.settle();
            match event {
                Event::OutOfBand(state) => {
                    // Someone else changed it: what follows a Kill is theirs to decide.
                    self.killed_not_seen_stopped = false;
                    if self.instance.is_some() {
                        if !matches!(state, State::Running | State::Starting) {
                            self.stopped_out_of_band = true;
                        }
                        self.set_state(*state);
                    }
                }
                Event::Vanish => {
                    self.instance = None;
                    self.stop_pending = false;
                    self.killed_not_seen_stopped = false;
                }
                Event::FlipDesired => {
                    self.stop_pending = false;
                    let spec = &mut self.machine.spec;
                    spec.power_state = match spec.power_state {
                        PowerState::Running => PowerState::Stopped,
                        PowerState::Stopped => PowerState::Running,
                    };
                    self.bump_generation();
                }
                Event::RestartRequest => {
                    self.requests += 1;
                    self.machine.spec.restart_request = Some(format!("r{}", self.requests));
                    self.bump_generation();
                }
                Event::FailObserve(f) => self.observe_failures.push_back(*f),
                Event::FailCall(f) => self.call_failures.push_back(*f),
                Event::Crash => self.crash_next = true,
                Event::CrashBeforeCall => self.crash_before_call = true,
                Event::Advance(s) => self.advance(Duration::from_secs(*s)),
                Event::Reconcile => {}
            }
        }

        fn bump_generation(&mut self) {
            self.machine.metadata.generation = Some(self.machine.generation() + 1);
        }

        /// As the Kubernetes layer observes: by providerID when known, else by UID.
        fn observe(&mut self) -> Observed {
            self.settle();
            if let Some(f) = self.observe_failures.pop_front() {
                return Observed::Failed(f.error());
            }
            let known = self.machine.status.as_ref().and_then(|s| s.provider_id.clone());
            let found = match known {
                Some(id) => Some(match self.instance.as_ref().filter(|i| i.id == id) {
                    Some(i) => (i.id.clone(), i.state),
                    None => (id, State::NotFound),
                }),
                None => self.instance.as_ref().map(|i| (i.id.clone(), i.state)),
            };
            match found {
                None => Observed::NoInstance,
                Some((id, state)) => {
                    let addresses = (state == State::Running)
                        .then(|| vec![Address { kind: AddressType::InternalIP, address: format!("192.0.2.1/{id}") }]);
                    Observed::Instance { id, state, addresses }
                }
            }
        }

        fn call(&mut self, operation: Operation) -> Result<(), Outcome> {
            match self.call_failures.pop_front() {
                Some(f) => Err(Outcome::Failed { operation, error: f.error() }),
                None => Ok(()),
            }
        }

        fn performed(&mut self, cause: &Cause) {
            if let Cause::RestartRequest(r) = cause {
                *self.performed.entry(r.clone()).or_default() += 1;
            }
        }

        /// The driver call(s) of `planned` against the model.
        fn perform(&mut self, planned: &Planned) -> Outcome {
            let result = (|| {
                match &planned.step {
                    Step::Create => {
                        self.call(Operation::Create)?;
                        assert!(self.instance.is_none(), "Create with an instance in place: {:?}", self.instance);
                        self.created += 1;
                        let id = format!("fake-{:04}", self.created);
                        self.instance = Some(Instance {
                            id: id.clone(),
                            state: State::Running,
                            settles: None,
                            power_changed: None,
                        });
                        self.set_state(State::Starting);
                        return Err(Outcome::Created(id));
                    }
                    Step::CheckSsh | Step::Provision { .. } => {
                        unreachable!("the model's driver offers no SSH")
                    }
                    Step::Start => {
                        self.call(Operation::Start)?;
                        self.performed(&planned.cause);
                        self.set_state(State::Starting);
                    }
                    Step::Stop => {
                        self.call(Operation::Stop)?;
                        self.stop_pending = true;
                        let state = self.instance.as_ref().map(|i| i.state);
                        if state != Some(State::Stopped) {
                            self.set_state(State::Stopping);
                            if self.ignores_graceful_stop
                                && let Some(i) = self.instance.as_mut()
                            {
                                i.settles = None;
                            }
                        }
                    }
                    Step::Kill => {
                        self.call(Operation::Kill)?;
                        // A hard restart is carried out at its Kill.
                        self.performed(&planned.cause);
                        self.killed_not_seen_stopped = true;
                        // Like EC2's force stop: Stopping for a while, then Stopped.
                        self.set_state(State::Stopping);
                    }
                    Step::Restart => {
                        self.call(Operation::Restart)?;
                        self.performed(&planned.cause);
                        self.set_state(State::Starting);
                    }
                    Step::Remove => panic!("Remove planned for a live Machine"),
                }
                Ok(())
            })();
            match result {
                Ok(()) => Outcome::Succeeded,
                Err(outcome) => outcome,
            }
        }

        /// One reconcile, as `k8s::machine::apply` chains it.
        fn reconcile(&mut self) -> Reconciled {
            let observed = self.observe();
            let machine = self.machine.clone();
            // As the Kubernetes layer asks, for a restart begun and never recorded.
            let power_changed_since_intent = match (restart_intent_since(&machine), &self.instance, &observed) {
                (Some(since), Some(i), Observed::Instance { .. }) if self.tells_power_changes => {
                    Some(i.power_changed.is_some_and(|at| at >= since))
                }
                _ => None,
            };
            let input = Input {
                machine: &machine,
                observed: observed.clone(),
                offers_ssh: false,
                ssh_key_secret: None,
                secrets: None,
                first_contact_host_key: None,
                power_changed_since_intent,
                now: self.now,
                jitter: self.jitter,
                settings: &SETTINGS,
            };
            let plan = plan(&input);
            self.log.push(format!(
                "{} gen {} desired {:?} observed {:?} -> {:?} (requeue {:?}, notes {:?})",
                self.now,
                machine.generation(),
                machine.spec.power_state,
                observed,
                plan.step,
                plan.requeue,
                reasons(&plan.notes)
            ));

            // (a) Create only when nothing is known and nothing was found.
            if plan.step.as_ref().is_some_and(|p| p.step == Step::Create) {
                let status = machine.status.as_ref();
                assert!(status.and_then(|s| s.provider_id.as_ref()).is_none(), "Create with a providerID");
                assert!(!matches!(observed, Observed::Instance { .. }), "Create with an instance found");
            }
            if let Observed::Instance { state: State::Running, .. } = observed {
                self.stopped_out_of_band = false;
            }
            if let Observed::Instance { state: State::Stopped | State::NotFound, .. } = observed {
                self.stop_pending = false;
                self.killed_not_seen_stopped = false;
            }
            // Seen starting: someone started it again since; that Stop is over.
            if let Observed::Instance { state: State::Starting, .. } = observed {
                self.stop_pending = false;
            }
            // (e) No second Stop while one is pending; (f) no Start after a Kill before
            // Stopped is observed.
            let planned_step = plan.step.as_ref().map(|p| &p.step);
            assert!(!(self.stop_pending && planned_step == Some(&Step::Stop)), "a second Stop\n{}", self.history());
            assert!(
                !(self.killed_not_seen_stopped && planned_step == Some(&Step::Start)),
                "Start before Stopped was observed after a Kill\n{}",
                self.history()
            );
            if self.tells_power_changes {
                assert!(!reasons(&plan.notes).contains(&"RestartInterrupted"), "{}", self.history());
            }
            if reasons(&plan.notes).contains(&"StoppedOutOfBand") {
                assert!(self.stopped_out_of_band, "a drift warning without an out-of-band stop");
            }

            let Some(planned) = plan.step.clone() else {
                self.write(&plan.status);
                let requeue = plan.requeue;
                return Reconciled { plan, requeue };
            };
            let begun = (planned.step != Step::Create).then(|| begin(&plan, &planned, self.now));
            if let Some(begun) = &begun {
                self.write(begun);
                if std::mem::take(&mut self.crash_before_call) {
                    self.log.push("    crashed before the call".into());
                    return Reconciled { plan, requeue: Some(Duration::from_secs(1)) };
                }
            }
            let outcome = self.perform(&planned);
            self.log.push(format!("    {:?} -> {:?}", planned.step, outcome));
            if std::mem::take(&mut self.crash_next) {
                if let Cause::RestartRequest(r) = &planned.cause {
                    self.crashed.insert(r.clone());
                }
                self.log.push("    crashed".into());
                // Restarted after a moment.
                return Reconciled { plan, requeue: Some(Duration::from_secs(1)) };
            }
            let recorded = record(&input, &plan, &planned, outcome);
            self.write(&recorded.status);
            let requeue = recorded.requeue;
            Reconciled { plan, requeue }
        }

        fn write(&mut self, status: &MachineStatus) {
            self.machine.status = Some(roundtrip(status));
        }

        fn history(&self) -> String {
            self.log.join("\n")
        }
    }

    fn check(setup: Setup, events: Vec<Event>) {
        let mut sim = Sim::new(&setup);
        sim.reconcile();
        for event in &events {
            sim.log.push(format!("event {event:?}"));
            sim.apply(event);
            sim.reconcile();
            assert!(sim.created <= 1 || sim.log.iter().any(|l| l.contains("Vanish")), "{}", sim.history());
        }

        // Events and failures stop: the loop converges within a bounded number of reconciles.
        sim.observe_failures.clear();
        sim.call_failures.clear();
        sim.crash_next = false;
        sim.crash_before_call = false;
        sim.log.push("-- converging".into());
        let mut last = None;
        for _ in 0..400 {
            let r = sim.reconcile();
            let status = sim.machine.status.clone().unwrap_or_default();
            let synced = cond(&status, ConditionType::PowerStateSynced).map(|c| c.0);
            let gone = status.provider_id.is_some() && sim.instance.is_none();
            if r.plan.step.is_none() && (synced == Some("True") || gone) {
                last = Some(r);
                break;
            }
            let wait =
                r.requeue.unwrap_or_else(|| panic!("stuck: nothing will wake the controller\n{}", sim.history()));
            sim.advance(wait);
        }
        assert!(last.is_some(), "no convergence within 400 reconciles\n{}", sim.history());
        let status = sim.machine.status.clone().unwrap();
        let spec = &sim.machine.spec;

        if status.provider_id.is_some() && sim.instance.is_none() {
            // Deleted at the provider: said so, never recreated.
            assert_eq!(cond(&status, ConditionType::InstanceCreated), Some(("False", "InstanceNotFound")));
            assert_eq!(cond(&status, ConditionType::Ready).map(|c| c.0), Some("False"));
        } else {
            let instance = sim.instance.clone().expect("an instance");
            let (state, phase, synced, ready) = match spec.power_state {
                PowerState::Running => (State::Running, Phase::Running, "Running", ("True", "Ready")),
                PowerState::Stopped => (State::Stopped, Phase::Stopped, "Stopped", ("False", "Stopped")),
            };
            let h = sim.history();
            assert_eq!(instance.state, state, "{h}");
            assert_eq!(status.provider_id.as_deref(), Some(instance.id.as_str()), "{h}");
            assert_eq!(status.state, Some(state), "{h}");
            assert_eq!(status.phase, Some(phase), "{h}");
            assert_eq!(cond(&status, ConditionType::PowerStateSynced), Some(("True", synced)), "{h}");
            assert_eq!(cond(&status, ConditionType::InstanceCreated), Some(("True", "Created")), "{h}");
            assert_eq!(cond(&status, ConditionType::Ready), Some(ready), "{h}");
            assert_eq!(status.failures, None, "{h}");
            assert_eq!(status.observed_generation, Some(sim.machine.generation()), "{h}");
            assert_eq!(status.last_restart_request, spec.restart_request, "every request handled\n{h}");
        }

        // Converged: a later plan changes nothing and takes no step.
        sim.advance(SETTINGS.poll_interval);
        let before = sim.machine.status.clone();
        let r = sim.reconcile();
        assert_eq!(r.plan.step, None, "{}", sim.history());
        assert!(r.plan.notes.is_empty(), "{:?}\n{}", r.plan.notes, sim.history());
        assert_eq!(sim.machine.status, before, "{}", sim.history());

        // (d) Each restart request carried out at most once, across crashes too (a call
        // whose outcome was never recorded is not repeated).
        for (request, times) in &sim.performed {
            assert!(*times <= 1, "restart request {request} performed {times} times\n{}", sim.history());
        }
    }

    proptest! {
        // No regression files: the failing case is printed, shrunk, with its history.
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn machine_converges_without_a_second_instance(
            setup in setup(),
            events in prop::collection::vec(event(), 0..40),
        ) {
            check(setup, events);
        }
    }
}

#[test]
fn ssh_failures_are_retried_with_backoff_then_given_up() {
    use crate::reconcile::{SshFailure, decide::MAX_SSH_ATTEMPTS};
    let mut machine = was(State::Running)(Machine::test());
    let mut when = now();
    let mut delays = Vec::new();
    for attempt in 1..=MAX_SSH_ATTEMPTS {
        let input = ssh_input_at(&machine, when);
        let planned = plan(&input);
        let step = planned.step.clone().unwrap_or_else(|| panic!("attempt {attempt}: no SSH check planned"));
        assert_eq!(step.step, Step::CheckSsh);
        let refused = SshFailure {
            reason: "ConnectionRefused",
            message: "ssh x: connection refused".into(),
            retryable: true,
            presented_host_key: None,
        };
        let recorded = record(&input, &planned, &step, Outcome::SshFailed(refused));
        assert_eq!(cond(&recorded.status, ConditionType::SSHReady), Some(("False", "ConnectionRefused")));
        assert_eq!(cond(&recorded.status, ConditionType::Ready).map(|c| c.1), Some("ConnectionRefused"));
        delays.push(recorded.requeue);
        machine = feed(&machine, &recorded.status);
        when += jiff::SignedDuration::from_secs(400);
    }
    // Backoff between attempts, growing; the last one gives up.
    assert!(delays[..delays.len() - 1].windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
    let failures = machine.status.as_ref().unwrap().failures.clone().unwrap();
    assert_eq!(failures.next_retry_time, None);
    assert!(failures.message.contains("gave up after 10 attempts"), "{}", failures.message);
    // No more attempts at this generation, however long; a spec change brings one.
    assert_eq!(plan(&ssh_input_at(&machine, when + jiff::SignedDuration::from_secs(86_400))).step, None);
    let changed = machine.clone().with_generation(2);
    assert_eq!(plan(&ssh_input_at(&changed, when)).step.map(|p| p.step), Some(Step::CheckSsh));
}

// ---------------------------------------------------------------------------------------
// SSH host-key trust
// ---------------------------------------------------------------------------------------

const PINNED: &str = "SHA256:pinned";
const PRESENTED: &str = "SHA256:presented";

fn mismatch(presented: &str) -> Outcome {
    Outcome::SshFailed(crate::reconcile::SshFailure {
        reason: "HostKeyMismatch",
        message: format!("ssh u@h:22: the host presents the host key {presented}, not the trusted {PINNED}"),
        retryable: false,
        presented_host_key: Some(presented.to_string()),
    })
}

fn ready_with(fingerprint: &str, trust: crate::reconcile::HostKeyTrust) -> Outcome {
    Outcome::SshReady { fingerprint: fingerprint.into(), trust, host: "h".into(), port: 22, user: "u".into() }
}

/// A running Machine whose pinned host key the host no longer presents: the SSH check
/// after a restart found `PRESENTED`.
fn refused_host_key() -> Machine {
    let machine = was(State::Running)(Machine::test()).with_pinned_host_key(PINNED);
    let planned = plan(&ssh_input(&machine));
    let step = planned.step.clone().unwrap();
    assert_eq!(step.step, Step::CheckSsh);
    let recorded = record(&ssh_input(&machine), &planned, &step, mismatch(PRESENTED));
    feed(&machine, &recorded.status)
}

#[test]
fn a_failed_ssh_check_waits_out_its_backoff_without_writes() {
    let machine = was(State::Running)(Machine::test());
    let planned = plan(&ssh_input(&machine));
    let step = planned.step.clone().unwrap();
    let refused = crate::reconcile::SshFailure {
        reason: "ConnectionRefused",
        message: "ssh x: connection refused".into(),
        retryable: true,
        presented_host_key: None,
    };
    let recorded = record(&ssh_input(&machine), &planned, &step, Outcome::SshFailed(refused));
    let retry = recorded.status.failures.as_ref().unwrap().next_retry_time.clone().unwrap();
    let machine = feed(&machine, &recorded.status);
    // Woken by its own status write, before the retry is due: nothing changes.
    let early = plan(&ssh_input(&machine));
    assert_eq!(early.step, None);
    assert_eq!(Some(&early.status), machine.status.as_ref(), "the failure and its retry time stay");
    assert!(early.requeue.is_some_and(|d| d > Duration::ZERO));
    // Due: the check again.
    let due = plan(&ssh_input_at(&machine, retry.0));
    assert_eq!(due.step.map(|p| p.step), Some(Step::CheckSsh));
}

#[test]
fn a_host_key_mismatch_is_recorded_once_and_not_retried() {
    let machine = was(State::Running)(Machine::test()).with_pinned_host_key(PINNED);
    let planned = plan(&ssh_input(&machine));
    let step = planned.step.clone().unwrap();
    let recorded = record(&ssh_input(&machine), &planned, &step, mismatch(PRESENTED));
    let failures = recorded.status.failures.as_ref().unwrap();
    assert_eq!(failures.next_retry_time, None);
    assert!(failures.message.contains("not retrying until the new key is accepted"), "{}", failures.message);
    assert_eq!(warnings(&recorded.notes), ["HostKeyMismatch"]);
    let ssh = recorded.status.ssh.as_ref().unwrap();
    assert_eq!(ssh.host_key_fingerprint.as_deref(), Some(PINNED), "the pin is kept");
    assert_eq!(ssh.presented_host_key_fingerprint.as_deref(), Some(PRESENTED));
    let text = message(&recorded.status, ConditionType::SSHReady);
    assert!(
        text.contains(&format!("kubectl annotate machine web-1 machinist.dev/accept-host-key={PRESENTED}")),
        "{text}"
    );
    assert_eq!(cond(&recorded.status, ConditionType::Ready), Some(("False", "HostKeyMismatch")));

    // However long it waits: no step, no Event, and the very same status (no write).
    let machine = feed(&machine, &recorded.status);
    for later in [0, 400, 86_400] {
        let again = plan(&ssh_input_at(&machine, at(later)));
        assert_eq!(again.step, None, "not retried after {later}s");
        assert_eq!(Some(&again.status), machine.status.as_ref(), "no status change after {later}s");
        assert!(again.notes.is_empty(), "{:?}", again.notes);
    }
}

#[test]
fn an_acceptance_of_another_key_changes_nothing() {
    let machine = refused_host_key().accepting_host_key("SHA256:someother");
    let again = plan(&ssh_input(&machine));
    assert_eq!(again.step, None, "the annotation does not name the key presented");
    assert_eq!(Some(&again.status), machine.status.as_ref());
    assert!(again.notes.is_empty());
}

#[test]
fn accepting_exactly_the_presented_key_pins_it_once_and_consumes_the_annotation() {
    use crate::reconcile::{HostKeyTrust, accept_annotation_consumed, trusted_host_keys};
    let machine = refused_host_key().accepting_host_key(PRESENTED);
    assert_eq!(trusted_host_keys(&machine), [PINNED, PRESENTED], "the old pin or the accepted key");
    let planned = plan(&ssh_input(&machine));
    let step = planned.step.clone().expect("the acceptance lifts the hold");
    assert_eq!(step.step, Step::CheckSsh);
    let recorded = record(&ssh_input(&machine), &planned, &step, ready_with(PRESENTED, HostKeyTrust::Pinned));
    let ssh = recorded.status.ssh.as_ref().unwrap();
    assert_eq!(ssh.host_key_fingerprint.as_deref(), Some(PRESENTED));
    assert_eq!(ssh.presented_host_key_fingerprint, None);
    assert_eq!(recorded.status.failures, None);
    let accepted: Vec<&Note> = recorded.notes.iter().filter(|n| n.reason == "HostKeyAccepted").collect();
    assert_eq!(accepted.len(), 1);
    assert!(!accepted[0].warning, "a Normal Event");
    assert!(accepted[0].message.contains(PRESENTED) && accepted[0].message.contains(PINNED), "{}", accepted[0].message);
    let before = machine.status.as_ref();
    assert!(accept_annotation_consumed(&machine, before, &recorded.status), "the controller removes the annotation");
    assert!(!accept_annotation_consumed(&machine, before, before.unwrap()), "not before it is pinned");
    // An annotation naming the key already pinned accepted nothing: it stays as written.
    let stale = feed(&machine, &recorded.status);
    assert!(!accept_annotation_consumed(&stale, stale.status.as_ref(), &recorded.status));
}

#[test]
fn a_second_key_change_after_an_acceptance_is_refused_without_a_loop() {
    // The accepted key is pinned, and the annotation not removed yet (or put back).
    let machine = was(State::Running)(Machine::test()).with_pinned_host_key(PRESENTED).accepting_host_key(PRESENTED);
    let planned = plan(&ssh_input(&machine));
    let step = planned.step.clone().unwrap();
    let recorded = record(&ssh_input(&machine), &planned, &step, mismatch("SHA256:third"));
    assert_eq!(warnings(&recorded.notes), ["HostKeyMismatch"]);
    let machine = feed(&machine, &recorded.status);
    for later in [0, 1, 400] {
        let again = plan(&ssh_input_at(&machine, at(later)));
        assert_eq!(again.step, None, "the annotation names the previous key, not the one presented");
        assert_eq!(Some(&again.status), machine.status.as_ref(), "no write at {later}s");
    }
}

#[test]
fn the_spec_fingerprint_is_the_only_trusted_key_of_a_generic_machine() {
    use crate::reconcile::trusted_host_keys;
    let generic = |fingerprint: Option<&str>| {
        let mut machine = Machine::test().with_pinned_host_key(PINNED).accepting_host_key(PRESENTED);
        machine.spec.driver = machinist_drivers::DriverSpec {
            generic: Some(Box::new(machinist_drivers::generic::GenericConfig {
                address: "192.0.2.10".into(),
                host_key_fingerprint: fingerprint.map(str::to_string),
                ..Default::default()
            })),
            ..Default::default()
        };
        machine
    };
    assert_eq!(trusted_host_keys(&generic(Some("SHA256:spec"))), ["SHA256:spec"]);
    // There, the annotation is not honoured, and so it lifts no hold: no retry loop.
    let refused = generic(Some("SHA256:spec")).with_status(|s| {
        s.provider_id = Some(PROVIDER_ID.into());
        s.state = Some(State::Running);
        s.ssh.get_or_insert_default().presented_host_key_fingerprint = Some(PRESENTED.into());
        s.failures = Some(Failures {
            count: 1,
            reason: "HostKeyMismatch".into(),
            message: String::new(),
            next_retry_time: None,
        });
        crate::api::set_condition(&mut s.conditions, ConditionType::Ready, false, "HostKeyMismatch", "", 1, now());
    });
    assert_eq!(plan(&ssh_input(&refused)).step, None, "held under a spec fingerprint");
    assert_eq!(trusted_host_keys(&generic(None)), [PINNED, PRESENTED]);
    assert!(trusted_host_keys(&Machine::test()).is_empty(), "first contact");
    // Accepted before anything was pinned (a console that did not list it): that key alone.
    assert_eq!(trusted_host_keys(&Machine::test().accepting_host_key(PRESENTED)), [PRESENTED]);
}

#[test]
fn a_driver_login_that_meets_another_host_key_shows_error_once() {
    let machine = was(State::Running)(Machine::test()).with_pinned_host_key(PINNED);
    let error = DriverError::HostKeyMismatch {
        target: "root@192.0.2.10:22".into(),
        trusted: vec![PINNED.into()],
        presented: PRESENTED.into(),
    };
    let input = ssh_observing(&machine, Observed::Failed(error.clone()));
    let planned = plan(&input);
    assert_eq!(planned.step, None);
    assert_eq!(planned.status.state, Some(State::Error), "never Running");
    assert_eq!(planned.status.phase, Some(Phase::Failed));
    assert_eq!(cond(&planned.status, ConditionType::Ready), Some(("False", "HostKeyMismatch")));
    assert_eq!(cond(&planned.status, ConditionType::SSHReady), Some(("False", "HostKeyMismatch")));
    assert_eq!(planned.status.ssh.as_ref().and_then(|s| s.presented_host_key_fingerprint.as_deref()), Some(PRESENTED));
    assert_eq!(warnings(&planned.notes), ["HostKeyMismatch"]);
    // The next poll meets the same host: nothing to write, nothing to publish.
    let machine = feed(&machine, &planned.status);
    let again = plan(&ssh_observing(&machine, Observed::Failed(error)));
    assert_eq!(Some(&again.status), machine.status.as_ref());
    assert!(again.notes.is_empty(), "{:?}", again.notes);
    assert_eq!(again.requeue, Some(SETTINGS.poll_interval));
}

#[test]
fn deleting_a_machine_whose_host_key_changed_waits_and_says_what_to_do() {
    let machine = was(State::Running)(Machine::test()).with_pinned_host_key(PINNED).deleting();
    let error = DriverError::HostKeyMismatch {
        target: "root@192.0.2.10:22".into(),
        trusted: vec![PINNED.into()],
        presented: PRESENTED.into(),
    };
    let input = input_at(&machine, instance(State::Running), now());
    let cleanup = plan_cleanup(&input);
    assert_eq!(cleanup.next, CleanupNext::Remove(PROVIDER_ID.into()));
    let recorded = record_cleanup(&input, &cleanup, Outcome::Failed { operation: Operation::Remove, error });
    assert!(matches!(recorded.next, CleanupNext::Wait(_)), "the finalizer stays");
    assert_eq!(cond(&recorded.status, ConditionType::Deleting), Some(("True", "HostKeyMismatch")));
    let text = message(&recorded.status, ConditionType::Deleting);
    assert!(text.contains("machinist.dev/accept-host-key=SHA256:presented"), "{text}");
    assert!(text.contains("deletionPolicy: Orphan"), "{text}");
    // Held until the key is accepted (or the policy changes); then Remove again.
    let machine = feed(&machine, &recorded.status);
    let held = plan_cleanup(&input_at(&machine, instance(State::Running), at(86_400)));
    assert_eq!(held.next, CleanupNext::Wait(None));
    let accepted = machine.clone().accepting_host_key(PRESENTED);
    let retried = plan_cleanup(&input_at(&accepted, instance(State::Running), now()));
    assert_eq!(retried.next, CleanupNext::Remove(PROVIDER_ID.into()));
}

#[test]
fn the_key_of_the_drivers_first_contact_is_pinned_at_create() {
    let machine = Machine::test();
    let input = Input { offers_ssh: true, ..input_at(&machine, Observed::NoInstance, now()) };
    let planned = plan(&input);
    let step = planned.step.clone().unwrap();
    assert_eq!(step.step, Step::Create);
    let after = Input { first_contact_host_key: Some("SHA256:first".into()), ..input.clone() };
    let recorded = record(&after, &planned, &step, Outcome::Created(PROVIDER_ID.into()));
    assert_eq!(recorded.status.ssh.as_ref().unwrap().host_key_fingerprint.as_deref(), Some("SHA256:first"));
    assert!(recorded.notes.iter().any(|n| n.reason == "HostKeyPinned" && !n.warning));
    // An existing pin is never replaced by a driver's first contact.
    let pinned = was(State::Running)(Machine::test()).with_pinned_host_key(PINNED);
    let observed = Input { first_contact_host_key: Some("SHA256:first".into()), ..ssh_input(&pinned) };
    assert_eq!(plan(&observed).status.ssh.unwrap().host_key_fingerprint.as_deref(), Some(PINNED));
}

#[test]
fn the_first_contact_says_how_its_host_key_was_trusted_and_waits_for_a_console() {
    use crate::reconcile::HostKeyTrust;
    let machine = was(State::Running)(Machine::test());
    let planned = plan(&ssh_input(&machine));
    let step = planned.step.clone().unwrap();
    let waiting = record(&ssh_input(&machine), &planned, &step, Outcome::SshPending("waiting for the console".into()));
    assert_eq!(cond(&waiting.status, ConditionType::SSHReady), Some(("Unknown", "WaitingForHostKeys")));
    assert_eq!(waiting.status.failures, None, "waiting is no failure");
    assert!(waiting.notes.is_empty());
    let verified = HostKeyTrust::Verified { source: "the console output of i-0abc".into() };
    let recorded = record(&ssh_input(&machine), &planned, &step, ready_with("SHA256:k", verified));
    let text = message(&recorded.status, ConditionType::SSHReady);
    assert!(text.contains("verified against the console output of i-0abc"), "{text}");
    let trusted = HostKeyTrust::FirstContact { why: Some("the console shows no host keys".into()) };
    let recorded = record(&ssh_input(&machine), &planned, &step, ready_with("SHA256:k", trusted));
    let text = message(&recorded.status, ConditionType::SSHReady);
    assert!(text.contains("trusted at first contact") && text.contains("no host keys"), "{text}");
}

#[test]
fn a_noisy_provisioning_script_keeps_a_bounded_tail() {
    use crate::reconcile::{OUTPUT_LINES, OUTPUT_MAX_BYTES, output_tail};
    let many: String = (1..=500).map(|i| format!("line {i}\n")).collect();
    let tail = output_tail(&many);
    assert_eq!(tail.lines().count(), OUTPUT_LINES);
    assert!(tail.ends_with("line 500") && tail.starts_with("line 481"), "{tail}");
    let long = format!("{}THE END", "é".repeat(1_000_000));
    let tail = output_tail(&long);
    assert!(tail.len() <= OUTPUT_MAX_BYTES && tail.ends_with("THE END") && tail.starts_with('…'), "{}", tail.len());

    let machine = was(State::Running)(Machine::test().with_provisioning("yes | head -c 5000000"))
        .with_pinned_host_key(PINNED)
        .with_status(|s| {
            crate::api::set_condition(&mut s.conditions, ConditionType::SSHReady, true, "Ready", "", 1, now())
        });
    let planned = plan(&ssh_input(&machine));
    let step = planned.step.clone().unwrap();
    assert!(matches!(step.step, Step::Provision { .. }), "{step:?}");
    let output = "y\n".repeat(2_500_000);
    let recorded = record(&ssh_input(&machine), &planned, &step, Outcome::Provisioned { exit_status: Some(1), output });
    let size = serde_json::to_string(&recorded.status).unwrap().len();
    assert!(size < 16 * 1024, "the status stays small: {size} bytes");
    let machine = feed(&machine, &recorded.status);
    assert_eq!(plan(&ssh_input(&machine)).step, None, "a failed script is not rerun");
}

#[test]
fn ssh_ready_pins_the_host_key_and_provisioning_runs_once_per_script() {
    let machine = was(State::Running)(Machine::test().with_provisioning("echo hi"));
    let planned = plan(&ssh_input(&machine));
    let step = planned.step.clone().unwrap();
    assert_eq!(step.step, Step::CheckSsh);
    let ready = ready_with("SHA256:abc", crate::reconcile::HostKeyTrust::FirstContact { why: None });
    let recorded = record(&ssh_input(&machine), &planned, &step, ready);
    assert_eq!(recorded.status.ssh.as_ref().unwrap().host_key_fingerprint.as_deref(), Some("SHA256:abc"));
    let machine = feed(&machine, &recorded.status);
    let planned = plan(&ssh_input(&machine));
    let step = planned.step.clone().unwrap();
    assert!(matches!(step.step, Step::Provision { .. }), "{step:?}");
    let recorded = record(
        &ssh_input(&machine),
        &planned,
        &step,
        Outcome::Provisioned { exit_status: Some(0), output: String::new() },
    );
    assert_eq!(cond(&recorded.status, ConditionType::Provisioned), Some(("True", "Succeeded")));
    let machine = feed(&machine, &recorded.status);
    let again = plan(&ssh_input(&machine));
    assert_eq!(again.step, None, "provisioning is not rerun for the same script");
    assert_eq!(cond(&again.status, ConditionType::Ready), Some(("True", "Ready")));
    let changed = machine.clone().with_provisioning("echo bye");
    assert!(matches!(plan(&ssh_input(&changed)).step.map(|p| p.step), Some(Step::Provision { .. })));
}

/// A running instance of a driver that offers SSH, at `when`.
fn ssh_input_at(machine: &Machine, when: jiff::Timestamp) -> Input<'_> {
    Input { offers_ssh: true, ..input_at(machine, instance(State::Running), when) }
}

fn ssh_input(machine: &Machine) -> Input<'_> {
    ssh_input_at(machine, now())
}

fn ssh_observing(machine: &Machine, observed: Observed) -> Input<'_> {
    Input { offers_ssh: true, ..input_at(machine, observed, now()) }
}

#[test]
fn addresses_are_looked_up_when_an_instance_comes_up_not_on_every_poll() {
    let fresh = Machine::test();
    assert!(addresses_stale(&fresh, State::Running), "never seen running");
    assert!(!addresses_stale(&fresh, State::Stopped), "only a running instance has addresses to look up");
    let running = was(State::Running)(Machine::test());
    let address = Address { kind: AddressType::InternalIP, address: "192.0.2.1".into() };
    let observed = Observed::Instance { id: PROVIDER_ID.into(), state: State::Running, addresses: Some(vec![address]) };
    let polled = feed(&running, &plan(&input(&running, observed)).status);
    assert!(!addresses_stale(&polled, State::Running), "a converged poll costs one driver call");
    let started = polled.clone().with_status(|s| {
        s.last_operation = Some(crate::api::LastOperation {
            operation: Operation::Start,
            result: OperationResult::Succeeded,
            message: String::new(),
            time: Time(now()),
        });
        s.conditions.retain(|c| c.type_ != "Ready");
        crate::api::set_condition_status(&mut s.conditions, ConditionType::Ready, "False", "Starting", "", 1, now());
    });
    assert!(addresses_stale(&started, State::Running), "just started: new addresses");
}

#[test]
fn a_failed_escalation_kill_is_retried_never_replaced_by_a_second_stop() {
    let machine = was(State::Running)(Machine::test().with_power_state(PowerState::Stopped).with_stop_timeout(5));
    // The Stop goes through; the provider keeps reporting Running (ACPI).
    let (machine, _) = step_and_record(&machine, instance(State::Running), now(), Outcome::Succeeded);
    let escalate = input_at(&machine, instance(State::Running), at(5));
    let kill = plan(&escalate);
    assert_eq!(kill.step, planned(Step::Kill, Cause::StopTimeout));
    let failed = record(
        &escalate,
        &kill,
        kill.step.as_ref().unwrap(),
        Outcome::Failed { operation: Operation::Kill, error: DriverError::transient("the provider is busy") },
    );
    let machine = feed(&machine, &begin(&kill, kill.step.as_ref().unwrap(), at(5)));
    let machine = feed(&machine, &failed.status);
    for t in [6, 30, 400] {
        let next = plan(&input_at(&machine, instance(State::Running), at(t)));
        assert_ne!(next.step.as_ref().map(|p| &p.step), Some(&Step::Stop), "a second Stop at {t}s");
    }
    let retried = plan(&input_at(&machine, instance(State::Running), at(400)));
    assert_eq!(retried.step.map(|p| p.step), Some(Step::Kill), "the Kill is retried after its backoff");
}

#[test]
fn a_stop_the_provider_answers_with_error_still_escalates_from_machinists_stop() {
    let machine = was(State::Running)(Machine::test().with_power_state(PowerState::Stopped).with_stop_timeout(5));
    let (machine, _) = step_and_record(&machine, instance(State::Running), now(), Outcome::Succeeded);
    let waiting = plan(&input_at(&machine, instance(State::Error), at(2)));
    assert_eq!((waiting.step, waiting.status.phase), (None, Some(Phase::Stopping)), "no second Stop");
    let kill = plan(&input_at(&machine, instance(State::Error), at(5)));
    assert_eq!(kill.step, planned(Step::Kill, Cause::StopTimeout));
}
