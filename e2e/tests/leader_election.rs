//! Leader election: one replica reconciles; a standby takes over when the leader dies;
//! a leader that loses its Lease stops at once.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::PostParams;
use machinist::leader::{LeaderElectionConfig, LeaseTimings};
use machinist::run::{RunConfig, RunError};
use machinist_e2e::tcp_proxy::TcpProxy;
use machinist_e2e::{Env, ensure_eq, fake_machine};

const LEASE: &str = "machinist-e2e";

fn replica(env: &Env, identity: &str) -> RunConfig {
    RunConfig {
        instance: Some(identity.to_string()),
        leader_election: Some(LeaderElectionConfig {
            namespace: env.namespace.clone(),
            lease_name: LEASE.into(),
            identity: identity.into(),
            timings: LeaseTimings::for_lease_duration(Duration::from_secs(3)),
        }),
        ..env.run_config()
    }
}

async fn holder(env: &Env) -> Result<Option<String>> {
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.namespace);
    Ok(leases.get_opt(LEASE).await?.and_then(|l| l.spec).and_then(|s| s.holder_identity))
}

async fn wait_holder(env: &Env, identity: &str, within: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let now = holder(env).await?;
        if now.as_deref() == Some(identity) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{identity} did not take the Lease within {within:?}; holder: {now:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Which replica published the Machine's `Created` Event.
async fn creator(env: &Env, name: &str) -> Result<Option<String>> {
    let event = env.wait_event(name, "Created").await?;
    Ok(event.reporting_instance)
}

#[tokio::test]
async fn one_leader_reconciles_and_a_standby_takes_over_when_it_dies() -> Result<()> {
    let mut env = Env::idle("leader").await?;
    let a = env.spawn_controller(replica(&env, "replica-a"));
    wait_holder(&env, "replica-a", Duration::from_secs(10)).await?;
    let b = env.spawn_controller(replica(&env, "replica-b"));
    env.create(&fake_machine("first", "{}", "")).await?;
    env.wait_ready("first").await?;
    ensure_eq(creator(&env, "first").await?.as_deref(), Some("replica-a"), "who created the first instance")?;
    ensure_eq(holder(&env).await?.as_deref(), Some("replica-a"), "holder while a lives")?;

    // The leader dies without releasing the Lease: b takes over once it expires.
    a.abort();
    let died = tokio::time::Instant::now();
    wait_holder(&env, "replica-b", Duration::from_secs(10)).await?;
    let took = died.elapsed();
    assert!(took <= Duration::from_secs(3) + Duration::from_secs(2), "takeover took {took:?} for a 3 s lease");
    env.create(&fake_machine("second", "{}", "")).await?;
    env.wait_ready("second").await?;
    ensure_eq(creator(&env, "second").await?.as_deref(), Some("replica-b"), "who created the second instance")?;

    // A graceful stop releases the Lease at once.
    b.stop().await?;
    ensure_eq(holder(&env).await?, None, "holder after a graceful stop")?;
    env.start_controller();
    env.cleanup().await
}

#[tokio::test]
async fn a_leader_that_loses_its_lease_stops_reconciling_at_once() -> Result<()> {
    let env = Env::idle("leaselost").await?;
    let a = env.spawn_controller(replica(&env, "replica-a"));
    wait_holder(&env, "replica-a", Duration::from_secs(10)).await?;

    // Someone else takes the Lease (as a partitioned leader would find on its return).
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.namespace);
    let mut lease = leases.get(LEASE).await?;
    let spec = lease.spec.as_mut().unwrap();
    spec.holder_identity = Some("someone-else".into());
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    spec.lease_duration_seconds = Some(3600);
    leases.replace(LEASE, &PostParams::default(), &lease).await?;

    let ended = tokio::time::timeout(Duration::from_secs(5), a.task).await?;
    match ended? {
        Err(RunError::LostLeadership(reason)) => assert!(reason.contains("another replica"), "{reason}"),
        other => bail!("the controller should stop with LostLeadership, not {other:?}"),
    }
    // Nothing reconciles the Machines now: not even the finalizer is added.
    let m = env.create(&fake_machine("orphaned", "{}", "")).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure_eq(env.get("orphaned").await?.metadata.finalizers, None, "finalizers")?;
    ensure_eq(env.instances(&m).len(), 0, "instances")?;
    leases.delete(LEASE, &Default::default()).await?;
    let mut env = env;
    env.start_controller();
    env.cleanup().await
}

/// A leader cut off from the API server (its requests hang; nothing is refused) stops
/// every driver call by its renew deadline, and the standby makes its first only after
/// that: the fake driver's journal of who called when shows no overlap.
#[tokio::test]
async fn a_partitioned_leader_stops_acting_before_the_standby_starts() -> Result<()> {
    let env = Env::idle("partition").await?;
    let proxy = TcpProxy::start_for(env.api_url().await?).await?;
    let partitioned = env.client_through(&proxy).await?;
    let journaled = |identity: &str| RunConfig { fake_call_journal: true, ..replica(&env, identity) };
    let a = env.spawn_controller_with(partitioned, journaled("replica-a"));
    wait_holder(&env, "replica-a", Duration::from_secs(10)).await?;
    let b = env.spawn_controller(journaled("replica-b"));
    // Status calls that take a while, polled every second: the leader is mid-call at any
    // moment, as a busy controller is.
    for i in 0..6 {
        env.create(&fake_machine(&format!("m{i}"), r#"{"latencyMillis": {"status": 300}}"#, "")).await?;
    }
    for i in 0..6 {
        env.wait_ready(&format!("m{i}")).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let cut = Timestamp::now();
    proxy.blackhole();
    let ended =
        tokio::time::timeout(Duration::from_secs(15), a.task).await.context("the cut-off leader did not stop")?;
    match ended? {
        Err(RunError::LostLeadership(reason)) => assert!(reason.contains("renew deadline"), "{reason}"),
        other => bail!("the cut-off leader should stop with LostLeadership, not {other:?}"),
    }
    wait_holder(&env, "replica-b", Duration::from_secs(15)).await?;
    // The new leader acts: a new Machine becomes Ready, and the old ones are polled.
    env.create(&fake_machine("after", "{}", "")).await?;
    env.wait_ready("after").await?;

    let calls = env.fake_store().call_journal();
    let by = |who: &str| calls.iter().filter(|c| c.caller == who).collect::<Vec<_>>();
    let (old, new) = (by("replica-a"), by("replica-b"));
    assert!(!old.is_empty() && !new.is_empty(), "both replicas made calls: {} and {}", old.len(), new.len());
    let renew_deadline = replica(&env, "x").leader_election.unwrap().timings.renew_deadline;
    let fenced_by = cut + SignedDuration::try_from(renew_deadline)? + SignedDuration::from_millis(500);
    let last_old = old.iter().map(|c| c.ended).max().unwrap();
    assert!(
        last_old <= fenced_by,
        "the old leader's last call ended at {last_old}, after its renew deadline ({renew_deadline:?} from the cut at {cut})"
    );
    let first_new = new.iter().map(|c| c.started).min().unwrap();
    assert!(
        first_new > last_old,
        "the new leader called at {first_new}, before the old one's last call ended at {last_old}"
    );
    let cut_short = old.iter().filter(|c| !c.completed).count();
    tracing::info!(
        old = old.len(),
        cut_short,
        gap_ms = (first_new - last_old).total(jiff::Unit::Millisecond)?,
        "calls around the partition"
    );

    b.stop().await?;
    let mut env = env;
    env.start_controller();
    env.cleanup().await
}
