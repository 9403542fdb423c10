//! Bad input and failing providers: what the user sees.

use std::time::Duration;

use anyhow::Result;
use kube::ResourceExt;
use machinist::api::ConditionType;
use machinist_e2e::{Env, condition, ensure_eq, fake_machine};
use serde_json::json;

#[tokio::test]
async fn invalid_spec_is_reported_and_not_retried_until_fixed() -> Result<()> {
    let env = Env::new("invalid").await?;
    let m = env.create(&fake_machine("m", "{instanceType: fake.huge}", "")).await?;
    let invalid = env.wait_condition("m", ConditionType::Ready, "False", Some("InvalidSpec")).await?;
    let ready = condition(&invalid, ConditionType::Ready).unwrap();
    assert!(ready.message.contains("spec.driver.fake.instanceType"), "{}", ready.message);
    let event = env.wait_event("m", "InvalidSpec").await?;
    ensure_eq(event.type_.as_deref(), Some("Warning"), "event type")?;
    // No driver call, no retry: nothing changes while the spec does not.
    let before = env.get("m").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure_eq(env.get("m").await?.resource_version(), before.resource_version(), "resourceVersion")?;
    ensure_eq(env.instances(&m).len(), 0, "instances")?;
    ensure_eq(env.events("m").await?.len(), 1, "events")?;

    env.patch("m", json!({"spec": {"driver": {"fake": {"instanceType": "fake.large"}}}})).await?;
    env.wait_ready("m").await?;
    ensure_eq(env.instances(&m)[0].instance_type.as_str(), "fake.large", "instance type")?;
    env.cleanup().await
}

#[tokio::test]
async fn injected_failures_back_off_visibly_then_converge() -> Result<()> {
    let env = Env::new("backoff").await?;
    env.create(&fake_machine("m", "{failures: [{operation: Create, count: 3, message: out of capacity}]}", "")).await?;
    let failing = env
        .wait_for("m", "failing twice", Duration::from_secs(30), |m| {
            m.status.as_ref().and_then(|s| s.failures.as_ref()).is_some_and(|f| f.count >= 2)
        })
        .await?;
    let status = failing.status.clone().unwrap();
    let failures = status.failures.unwrap();
    ensure_eq(failures.reason.as_str(), "TransientError", "failure reason")?;
    assert!(failures.next_retry_time.is_some(), "the next retry time is shown");
    let ready = condition(&failing, ConditionType::Ready).unwrap();
    assert!(ready.message.contains("out of capacity") && ready.message.contains("retrying in"), "{}", ready.message);
    env.wait_event("m", "TransientError").await?;
    let ready = env.wait_ready("m").await?;
    ensure_eq(ready.status.unwrap().failures, None, "failures after success")?;
    env.cleanup().await
}

#[tokio::test]
async fn not_supported_is_reported_and_not_retried() -> Result<()> {
    let env = Env::new("notsupported").await?;
    let m = env
        .create(&fake_machine(
            "m",
            "{failures: [{operation: Stop, count: 1000, error: NotSupported, message: no stop here}]}",
            "",
        ))
        .await?;
    env.wait_ready("m").await?;
    env.patch("m", json!({"spec": {"powerState": "Stopped"}})).await?;
    let m2 = env.wait_condition("m", ConditionType::PowerStateSynced, "False", Some("NotSupported")).await?;
    assert!(condition(&m2, ConditionType::PowerStateSynced).unwrap().message.contains("no stop here"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let counts = env.fake_store().failure_counts(&m.uid().unwrap())?;
    ensure_eq(counts.values().sum::<u32>(), 1, "Stop attempts")?;
    env.cleanup().await
}
