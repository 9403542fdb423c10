//! Lifecycle scenarios: create, power state, restarts, stop modes, drift, pause.

use std::time::Duration;

use anyhow::Result;
use kube::ResourceExt;
use machinist::api::{ConditionType, OperationResult, Phase};
use machinist_drivers::{Operation, State};
use machinist_e2e::{Env, condition, ensure_eq, fake_machine};
use serde_json::json;

#[tokio::test]
async fn create_becomes_ready_and_converged_machine_is_left_alone() -> Result<()> {
    let env = Env::new("create").await?;
    let created = env.create(&fake_machine("web", "{latencyMillis: {default: 200}}", "")).await?;
    let machine = env.wait_ready("web").await?;
    let status = machine.status.clone().unwrap();
    ensure_eq(status.phase, Some(Phase::Running), "phase")?;
    ensure_eq(status.state, Some(State::Running), "state")?;
    ensure_eq(status.driver.as_deref(), Some("fake"), "driver")?;
    assert!(!status.addresses.is_empty(), "addresses are reported");
    assert!(machine.finalizers().contains(&"machinist.dev/machine".to_string()));
    let instances = env.instances(&created);
    ensure_eq(instances.len(), 1, "instances")?;
    ensure_eq(status.provider_id.as_deref(), Some(instances[0].id.as_str()), "providerID")?;
    for kind in [ConditionType::InstanceCreated, ConditionType::PowerStateSynced] {
        let c = condition(&machine, kind).unwrap();
        ensure_eq(c.status.as_str(), "True", kind.as_str())?;
        ensure_eq(c.observed_generation, Some(1), "observedGeneration")?;
    }
    env.wait_event("web", "Created").await?;

    // Converged: several poll intervals pass with no write to the Machine and no Event.
    let before = env.get("web").await?;
    let events_before = env.events("web").await?.len();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = env.get("web").await?;
    ensure_eq(after.resource_version(), before.resource_version(), "resourceVersion of a converged Machine")?;
    ensure_eq(env.events("web").await?.len(), events_before, "Events about a converged Machine")?;
    env.cleanup().await
}

/// How often the Machine's one instance saw an operation.
fn calls(env: &Env, machine: &machinist::api::Machine, operation: Operation) -> u32 {
    let instances = env.instances(machine);
    assert_eq!(instances.len(), 1, "exactly one instance");
    instances[0].calls(operation.as_str())
}

#[tokio::test]
async fn power_state_stopped_and_back() -> Result<()> {
    let env = Env::new("power").await?;
    let machine = env.create(&fake_machine("m", "{}", "")).await?;
    env.wait_ready("m").await?;
    env.patch("m", json!({"spec": {"powerState": "Stopped"}})).await?;
    let stopped = env.wait_condition("m", ConditionType::Ready, "False", Some("Stopped")).await?;
    let status = stopped.status.clone().unwrap();
    ensure_eq(status.state, Some(State::Stopped), "state")?;
    ensure_eq(status.phase, Some(Phase::Stopped), "phase")?;
    ensure_eq(condition(&stopped, ConditionType::PowerStateSynced).unwrap().status.as_str(), "True", "synced")?;
    ensure_eq(status.observed_generation, Some(2), "observedGeneration")?;
    ensure_eq(calls(&env, &machine, Operation::Stop), 1, "Stop calls")?;
    ensure_eq(calls(&env, &machine, Operation::Kill), 0, "Kill calls")?;

    env.patch("m", json!({"spec": {"powerState": "Running"}})).await?;
    env.wait_for("m", "Ready again", Duration::from_secs(30), |m| {
        m.status.as_ref().is_some_and(|s| s.observed_generation == Some(3))
            && condition(m, ConditionType::Ready).is_some_and(|c| c.status == "True")
    })
    .await?;
    ensure_eq(calls(&env, &machine, Operation::Start), 1, "Start calls")?;
    env.cleanup().await
}

#[tokio::test]
async fn restart_requests_soft_and_hard_each_once() -> Result<()> {
    let env = Env::new("restart").await?;
    let machine = env.create(&fake_machine("m", "{}", "")).await?;
    env.wait_ready("m").await?;

    env.patch("m", json!({"spec": {"restartRequest": "r1"}})).await?;
    let m = env
        .wait_for("m", "restarted (r1)", Duration::from_secs(30), |m| {
            m.status.as_ref().is_some_and(|s| s.last_restart_request.as_deref() == Some("r1"))
        })
        .await?;
    let op = m.status.unwrap().last_operation.unwrap();
    ensure_eq((op.operation, op.result), (Operation::Restart, OperationResult::Succeeded), "lastOperation")?;
    env.wait_ready("m").await?;
    env.wait_event("m", "Restarted").await?;
    // A few more polls: still exactly one restart for r1.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure_eq(calls(&env, &machine, Operation::Restart), 1, "Restart calls for r1")?;

    env.patch("m", json!({"spec": {"restartMode": "Hard", "restartRequest": "r2"}})).await?;
    env.wait_for("m", "restarted (r2)", Duration::from_secs(30), |m| {
        m.status.as_ref().is_some_and(|s| s.last_restart_request.as_deref() == Some("r2"))
    })
    .await?;
    env.wait_ready("m").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure_eq(calls(&env, &machine, Operation::Restart), 1, "Restart calls after the hard restart")?;
    ensure_eq(calls(&env, &machine, Operation::Kill), 1, "Kill calls (hard restart)")?;
    ensure_eq(calls(&env, &machine, Operation::Start), 1, "Start calls (hard restart)")?;
    env.cleanup().await
}

#[tokio::test]
async fn force_stop_kills() -> Result<()> {
    let env = Env::new("force").await?;
    let machine = env.create(&fake_machine("m", "{}", "  stopMode: Force\n")).await?;
    env.wait_ready("m").await?;
    env.patch("m", json!({"spec": {"powerState": "Stopped"}})).await?;
    env.wait_condition("m", ConditionType::Ready, "False", Some("Stopped")).await?;
    ensure_eq(calls(&env, &machine, Operation::Kill), 1, "Kill calls")?;
    ensure_eq(calls(&env, &machine, Operation::Stop), 0, "Stop calls")?;
    env.wait_event("m", "Killed").await?;
    env.cleanup().await
}

/// A Stop call that does not even answer within stopTimeoutSeconds (the provider takes 5 s
/// to acknowledge): it is left pending, and the Kill is a step of its own, made once the
/// timeout has passed since the Stop; no failure is recorded.
#[tokio::test]
async fn a_stop_call_that_does_not_answer_in_time_is_followed_by_one_kill() -> Result<()> {
    let env = Env::new("stophang").await?;
    let fake = r#"{"latencyMillis": {"stop": 5000}}"#;
    let machine = env.create(&fake_machine("m", fake, "  stopTimeoutSeconds: 2\n")).await?;
    env.wait_ready("m").await?;
    env.patch("m", json!({"spec": {"powerState": "Stopped"}})).await?;
    let stopped = env.wait_condition("m", ConditionType::Ready, "False", Some("Stopped")).await?;
    ensure_eq(calls(&env, &machine, Operation::Stop), 1, "Stop calls")?;
    ensure_eq(calls(&env, &machine, Operation::Kill), 1, "Kill calls")?;
    let event = env.wait_event("m", "StopTimedOut").await?;
    ensure_eq(event.type_.as_deref(), Some("Warning"), "StopTimedOut event type")?;
    ensure_eq(stopped.status.and_then(|s| s.failures), None, "failures recorded")?;
    env.cleanup().await
}

#[tokio::test]
async fn graceful_stop_that_times_out_is_escalated_to_kill() -> Result<()> {
    let env = Env::new("escalate").await?;
    let machine = env.create(&fake_machine("m", "{gracefulStop: Ignore}", "  stopTimeoutSeconds: 2\n")).await?;
    env.wait_ready("m").await?;
    env.patch("m", json!({"spec": {"powerState": "Stopped"}})).await?;
    // The guest ignores the stop: Stopping, then Kill after the timeout.
    env.wait_for("m", "Stopping", Duration::from_secs(30), |m| {
        m.status.as_ref().is_some_and(|s| s.state == Some(State::Stopping))
    })
    .await?;
    env.wait_condition("m", ConditionType::Ready, "False", Some("Stopped")).await?;
    ensure_eq(calls(&env, &machine, Operation::Stop), 1, "Stop calls")?;
    ensure_eq(calls(&env, &machine, Operation::Kill), 1, "Kill calls")?;
    let event = env.wait_event("m", "StopTimedOut").await?;
    ensure_eq(event.type_.as_deref(), Some("Warning"), "StopTimedOut event type")?;
    env.cleanup().await
}

/// A guest that ignores the graceful stop while the provider keeps reporting it Running:
/// one Stop, never repeated, and the Kill after stopTimeoutSeconds.
#[tokio::test]
async fn a_graceful_stop_reported_running_is_sent_once_then_killed() -> Result<()> {
    let env = Env::new("stopignored").await?;
    let machine = env.create(&fake_machine("m", "{gracefulStop: IgnoreRunning}", "  stopTimeoutSeconds: 3\n")).await?;
    env.wait_ready("m").await?;
    env.patch("m", json!({"spec": {"powerState": "Stopped"}})).await?;
    env.wait_for("m", "stopping while Running is reported", Duration::from_secs(30), |m| {
        m.status.as_ref().is_some_and(|s| s.phase == Some(Phase::Stopping) && s.state == Some(State::Running))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure_eq(calls(&env, &machine, Operation::Stop), 1, "Stop calls while it is pending")?;
    env.wait_condition("m", ConditionType::Ready, "False", Some("Stopped")).await?;
    ensure_eq(calls(&env, &machine, Operation::Stop), 1, "Stop calls")?;
    ensure_eq(calls(&env, &machine, Operation::Kill), 1, "Kill calls")?;
    let stopped: Vec<_> =
        env.events("m").await?.into_iter().filter(|e| e.reason.as_deref() == Some("Stopped")).collect();
    ensure_eq(stopped.len(), 1, "Stopped Events")?;
    env.wait_event("m", "StopTimedOut").await?;
    env.cleanup().await
}

#[tokio::test]
async fn machine_stopped_out_of_band_is_started_again() -> Result<()> {
    let env = Env::new("drift").await?;
    let machine = env.create(&fake_machine("m", "{}", "")).await?;
    let ready = env.wait_ready("m").await?;
    let id = ready.status.unwrap().provider_id.unwrap();
    env.fake_store().set_state(&machine.uid().unwrap(), &id, State::Stopped)?;
    let event = env.wait_event("m", "StoppedOutOfBand").await?;
    assert!(event.note.unwrap_or_default().contains("out of band"));
    env.wait_ready("m").await?;
    ensure_eq(calls(&env, &machine, Operation::Start), 1, "Start calls")?;
    env.cleanup().await
}

#[tokio::test]
async fn paused_machine_is_left_alone_until_resumed() -> Result<()> {
    let env = Env::new("paused").await?;
    let machine = env.create(&fake_machine("m", "{}", "")).await?;
    env.wait_ready("m").await?;
    env.patch(
        "m",
        json!({"metadata": {"annotations": {"machinist.dev/paused": ""}}, "spec": {"powerState": "Stopped"}}),
    )
    .await?;
    env.wait_condition("m", ConditionType::Paused, "True", Some("Paused")).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure_eq(calls(&env, &machine, Operation::Stop), 0, "Stop calls while paused")?;
    ensure_eq(env.instances(&machine)[0].state_at(jiff::Timestamp::now()), State::Running, "state while paused")?;

    env.patch("m", json!({"metadata": {"annotations": {"machinist.dev/paused": null}}})).await?;
    env.wait_condition("m", ConditionType::Ready, "False", Some("Stopped")).await?;
    ensure_eq(condition(&env.get("m").await?, ConditionType::Paused).unwrap().status.as_str(), "False", "Paused")?;
    ensure_eq(calls(&env, &machine, Operation::Stop), 1, "Stop calls after resuming")?;
    env.cleanup().await
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served() -> Result<()> {
    let env = Env::new("metrics").await?;
    env.create(&fake_machine("m", "{}", "")).await?;
    env.wait_ready("m").await?;
    let (code, _) = machinist_e2e::http_get(env.metrics_address, "/healthz").await?;
    ensure_eq(code, 200, "/healthz")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _) = machinist_e2e::http_get(env.metrics_address, "/readyz").await?;
        if code == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "/readyz never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The phase gauges are refreshed every few seconds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let metrics = loop {
        let (code, metrics) = machinist_e2e::http_get(env.metrics_address, "/metrics").await?;
        ensure_eq(code, 200, "/metrics")?;
        if metrics.contains(r#"machinist_machines{phase="Running"} 1"#) {
            break metrics;
        }
        assert!(tokio::time::Instant::now() < deadline, "no Running Machine counted: {metrics}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for series in [
        "machinist_reconciles_total",
        "machinist_reconcile_duration_seconds_count",
        "machinist_reconciles_in_flight",
        r#"machinist_machines{phase="Stopped"} 0"#,
    ] {
        assert!(metrics.contains(series), "{series} missing: {metrics}");
    }
    assert!(
        metrics.contains(
            r#"machinist_driver_call_duration_seconds_count{driver="fake",operation="Create",result="Succeeded"} 1"#
        ),
        "{metrics}"
    );
    env.cleanup().await
}

/// The controller dies while the provider carries out a restart, before its result is
/// recorded. The fake provider tells when the instance's power last changed, so the next
/// controller knows the restart happened: it is recorded, not repeated, and not warned
/// about (exactly once).
#[tokio::test]
async fn a_restart_interrupted_by_a_crash_is_made_exactly_once() -> Result<()> {
    let mut env = Env::new("restartcrash").await?;
    for (name, mode, operation) in [("soft", "Soft", Operation::Restart), ("hard", "Hard", Operation::Kill)] {
        let fake = r#"{"latencyMillis": {"restart": 3000, "kill": 3000}}"#;
        let machine = env.create(&fake_machine(name, fake, &format!("  restartMode: {mode}\n"))).await?;
        env.wait_ready(name).await?;
        env.patch(name, json!({"spec": {"restartRequest": "r1"}})).await?;
        env.wait_for(name, "restarting (r1)", Duration::from_secs(30), |m| {
            m.status.as_ref().is_some_and(|s| s.restart_request_in_progress.as_deref() == Some("r1"))
        })
        .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while calls(&env, &machine, operation) == 0 {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "{mode}: the {operation} call never came");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Mid-call: the provider has accepted it; nothing is recorded yet.
        env.abort_controller();
        env.start_controller();
        env.wait_for(name, "r1 handled", Duration::from_secs(30), |m| {
            m.status.as_ref().is_some_and(|s| s.last_restart_request.as_deref() == Some("r1"))
        })
        .await?;
        env.wait_ready(name).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        ensure_eq(calls(&env, &machine, operation), 1, &format!("{mode}: {operation} calls for r1"))?;
        let reasons: Vec<String> = env.events(name).await?.into_iter().filter_map(|e| e.reason).collect();
        anyhow::ensure!(
            !reasons.iter().any(|r| r == "RestartInterrupted"),
            "{mode}: warned as if unknown: {reasons:?}"
        );
        let restarted = env.wait_event(name, "Restarted").await?;
        let note = restarted.note.unwrap_or_default();
        anyhow::ensure!(note.contains("happened and is not repeated"), "{mode}: {note}");
    }
    env.cleanup().await
}
