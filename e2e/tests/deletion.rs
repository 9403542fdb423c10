//! Deletion scenarios and crash safety: no instance is ever leaked or duplicated.

use std::time::Duration;

use anyhow::Result;
use kube::ResourceExt;
use kube::api::DeleteParams;
use machinist::api::ConditionType;
use machinist::run::RunConfig;
use machinist_e2e::{Env, ensure_eq, fake_machine};

#[tokio::test]
async fn delete_removes_the_instance() -> Result<()> {
    let env = Env::new("delete").await?;
    let m = env.create(&fake_machine("m", "{}", "")).await?;
    env.wait_ready("m").await?;
    ensure_eq(env.instances(&m).len(), 1, "instances before")?;
    env.delete_and_wait("m").await?;
    ensure_eq(env.instances(&m).len(), 0, "instances after Delete")?;
    env.cleanup().await
}

#[tokio::test]
async fn orphan_leaves_the_instance() -> Result<()> {
    let env = Env::new("orphan").await?;
    let m = env.create(&fake_machine("m", "{}", "  deletionPolicy: Orphan\n")).await?;
    env.wait_ready("m").await?;
    env.delete_and_wait("m").await?;
    let left = env.instances(&m);
    ensure_eq(left.len(), 1, "instances after Orphan")?;
    env.cleanup().await
}

#[tokio::test]
async fn delete_while_create_is_in_flight_leaks_nothing() -> Result<()> {
    let env = Env::new("inflight").await?;
    let m = env.create(&fake_machine("m", "{latencyMillis: {create: 2000}}", "")).await?;
    // Wait until the provider has the instance but Create has not answered yet.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while env.instances(&m).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "Create never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.delete_and_wait("m").await?;
    ensure_eq(env.instances(&m).len(), 0, "instances after deleting during Create")?;
    env.cleanup().await
}

#[tokio::test]
async fn controller_killed_during_create_leaves_one_instance() -> Result<()> {
    let mut env = Env::new("crash").await?;
    let m = env.create(&fake_machine("m", "{latencyMillis: {create: 1500}}", "")).await?;
    // Kill the controller at a random point while Create is in flight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while env.instances(&m).is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "Create never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 1400)).await;
    env.abort_controller();
    let status = env.get("m").await?.status;
    // The providerID may or may not have been written: either way a new controller
    // must find the instance rather than make another.
    env.start_controller();
    let ready = env.wait_ready("m").await?;
    let instances = env.instances(&m);
    ensure_eq(instances.len(), 1, &format!("instances after the crash (status then: {status:?})"))?;
    ensure_eq(ready.status.unwrap().provider_id, Some(instances[0].id.clone()), "providerID")?;
    env.cleanup().await
}

#[tokio::test]
async fn remove_failure_keeps_the_finalizer_until_it_succeeds() -> Result<()> {
    let env = Env::new("removefail").await?;
    let m = env.create(&fake_machine("m", "{failures: [{operation: Remove, count: 2}]}", "")).await?;
    env.wait_ready("m").await?;
    env.machines.delete("m", &DeleteParams::default()).await?;
    let failing = env
        .wait_for("m", "failing to remove", Duration::from_secs(30), |m| {
            m.status.as_ref().and_then(|s| s.failures.as_ref()).is_some_and(|f| f.count >= 1)
        })
        .await?;
    assert!(failing.finalizers().contains(&"machinist.dev/machine".to_string()), "finalizer kept");
    let deleting = machinist_e2e::condition(&failing, ConditionType::Deleting).unwrap();
    assert!(deleting.message.contains("Remove failed"), "{}", deleting.message);
    env.wait_event("m", "TransientError").await?;
    env.delete_and_wait("m").await?;
    ensure_eq(env.instances(&m).len(), 0, "instances after the retried Remove")?;
    env.cleanup().await
}

#[tokio::test]
async fn a_call_outlasting_the_shutdown_timeout_is_cut_and_recovered_by_the_next_start() -> Result<()> {
    let mut env = Env::idle("shutdowncut").await?;
    let config = RunConfig { shutdown_timeout: Duration::from_secs(1), ..env.run_config() };
    let controller = env.spawn_controller(config);
    // Create takes two minutes: far longer than the pod's grace period.
    let m = env.create(&fake_machine("m", "{latencyMillis: {create: 120000}}", "")).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while env.instances(&m).is_empty() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "Create never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Stops within its own bound (ControllerHandle::stop fails after 30 s), not after
    // the call.
    controller.stop().await?;

    // The next start finds the instance by the Machine's UID: no second one.
    env.start_controller();
    env.wait_event("m", "Adopted").await?;
    ensure_eq(env.instances(&m).len(), 1, "instances")?;
    env.cleanup().await
}
