//! The Secrets a Machine uses end to end: guarded by machinist's finalizer from before
//! the first driver call until no Machine in the namespace uses them, a deletion held
//! and said, references changed and released, and a Secret that does not exist yet.

use std::time::Duration;

use anyhow::{Result, ensure};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, Patch, PostParams};
use kube::{Api, ResourceExt};
use machinist::api::{ConditionType, Machine, SECRET_FINALIZER, SECRET_GUARDED_LABEL};
use machinist::leader::{LeaderElectionConfig, LeaseTimings};
use machinist::reconcile::Settings;
use machinist::run::RunConfig;
use machinist_e2e::{Backend, Env, condition, ensure_eq, fake_machine, test_settings};
use serde_json::json;

async fn create_secret(env: &Env, name: &str) -> Result<Secret> {
    env.create_secret(name, None, [("token", b"s3cret".to_vec())]).await
}

fn secrets_api(env: &Env) -> Api<Secret> {
    Api::namespaced(env.client.clone(), &env.namespace)
}

/// machinist's finalizer and the label its Secret cache watches (both or neither).
fn guarded(secret: &Secret) -> bool {
    let finalizer = secret.finalizers().iter().any(|f| f == SECRET_FINALIZER);
    let label = secret.labels().get(SECRET_GUARDED_LABEL).is_some_and(|v| v == "true");
    assert_eq!(finalizer, label, "finalizer and label go together: {:?}", secret.metadata);
    finalizer
}

fn used(m: &Machine) -> Vec<(String, bool)> {
    m.status.iter().flat_map(|s| s.secrets.iter().map(|u| (u.name.clone(), u.deletion_held))).collect()
}

/// Waits until the Secret is in the given state (`None`: gone).
async fn wait_secret(env: &Env, name: &str, what: &str, check: impl Fn(Option<&Secret>) -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let secret = secrets_api(env).get_opt(name).await?;
        if check(secret.as_ref()) {
            return Ok(());
        }
        ensure!(tokio::time::Instant::now() < deadline, "Secret {name} is not {what}: {secret:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn with_credentials(name: &str, secret: &str) -> String {
    fake_machine(name, "{}", &format!("  credentialsSecretRef:\n    name: {secret}\n"))
}

#[tokio::test]
async fn a_secret_in_use_is_guarded_until_no_machine_uses_it() -> Result<()> {
    let env = Env::new("secretguard").await?;
    create_secret(&env, "creds").await?;
    env.create(&with_credentials("a", "creds")).await?;
    env.create(&with_credentials("b", "creds")).await?;
    let a = env.wait_ready("a").await?;
    env.wait_ready("b").await?;
    ensure_eq(used(&a), vec![("creds".to_string(), false)], "status.secrets")?;
    ensure!(guarded(&secrets_api(&env).get("creds").await?), "the Secret carries {SECRET_FINALIZER}");

    // Deleted while in use: it stays, and the Machines say so (once).
    secrets_api(&env).delete("creds", &DeleteParams::default()).await?;
    wait_secret(&env, "creds", "held with a deletionTimestamp", |s| {
        s.is_some_and(|s| s.metadata.deletion_timestamp.is_some() && guarded(s))
    })
    .await?;
    let held = env
        .wait_for("a", "saying the Secret's deletion is held", Duration::from_secs(30), |m| {
            used(m) == [("creds".to_string(), true)]
        })
        .await?;
    env.wait_event("a", "SecretInUse").await?;
    ensure_eq(condition(&held, ConditionType::Ready).unwrap().status.as_str(), "True", "Ready meanwhile")?;

    // One Machine lets go (a new Secret): the other still holds it.
    create_secret(&env, "creds-2").await?;
    env.patch("a", json!({ "spec": { "credentialsSecretRef": { "name": "creds-2" } } })).await?;
    env.wait_for("a", "using creds-2", Duration::from_secs(30), |m| used(m) == [("creds-2".to_string(), false)])
        .await?;
    ensure!(guarded(&secrets_api(&env).get("creds-2").await?), "the new Secret is guarded");
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(secrets_api(&env).get_opt("creds").await?.is_some(), "b still uses creds: it stays");

    // The last one goes: the Secret is released, and its deletion completes.
    env.delete_and_wait("b").await?;
    wait_secret(&env, "creds", "gone", |s| s.is_none()).await?;
    // Deleting a's Machine releases creds-2, which then is an ordinary Secret again.
    env.delete_and_wait("a").await?;
    wait_secret(&env, "creds-2", "released", |s| s.is_some_and(|s| !guarded(s))).await?;
    env.cleanup().await
}

#[tokio::test]
async fn a_machine_naming_a_missing_secret_waits_for_it_without_a_driver_call() -> Result<()> {
    let env = Env::new("secretmissing").await?;
    let m = env.create(&with_credentials("m", "later")).await?;
    let waiting = env.wait_condition("m", ConditionType::Ready, "False", Some("InvalidSpec")).await?;
    let message = condition(&waiting, ConditionType::Ready).unwrap().message.clone();
    ensure!(message.contains(&format!("{}/later", env.namespace)) && message.contains("does not exist"), "{message}");
    env.wait_event("m", "InvalidSpec").await?;
    ensure!(env.instances(&m).is_empty(), "no driver call without the Secret");
    // Quiet meanwhile: recorded once.
    env.unchanged_for("m", Duration::from_secs(3)).await?;

    // It appears: the Machine carries on at once (an invalid spec has no timer; only the
    // Secret watch can wake it).
    create_secret(&env, "later").await?;
    let ready = env.wait_ready("m").await?;
    ensure_eq(used(&ready), vec![("later".to_string(), false)], "status.secrets")?;
    env.cleanup().await
}

#[tokio::test]
async fn deleting_a_machine_whose_secret_never_existed_needs_no_driver_call() -> Result<()> {
    let env = Env::new("secretnever").await?;
    let m = env.create(&with_credentials("m", "never")).await?;
    env.wait_condition("m", ConditionType::Ready, "False", Some("InvalidSpec")).await?;
    env.delete_and_wait("m").await?;
    ensure!(env.instances(&m).is_empty());
    env.cleanup().await
}

/// The controller's count of reconciles, from its /metrics.
async fn reconciles(env: &Env) -> Result<u64> {
    let (_, metrics) = machinist_e2e::http_get(env.metrics_address, "/metrics").await?;
    let line = metrics.lines().find(|l| l.starts_with("machinist_reconciles_total ")).unwrap_or_default();
    Ok(line.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0))
}

/// The controller's count of driver Status calls (look-ups and addresses included).
async fn status_calls(env: &Env) -> Result<u64> {
    let (_, metrics) = machinist_e2e::http_get(env.metrics_address, "/metrics").await?;
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with("machinist_driver_call_duration_seconds_count{driver=\"fake\",operation=\"Status\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// Polls of a converged Machine read its Secret from the controller's cache, never from
/// the API. (Counted by the test server; a real cluster counts in its audit log.)
#[tokio::test]
async fn polls_of_a_converged_machine_read_no_secret_from_the_api() -> Result<()> {
    let env = Env::new("secretreads").await?;
    let Backend::TestServer(server) = env.backend else { return env.cleanup().await };
    create_secret(&env, "creds").await?;
    env.create(&with_credentials("a", "creds")).await?;
    env.wait_ready("a").await?;
    wait_secret(&env, "creds", "guarded", |s| s.is_some_and(guarded)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (gets, polls) = (server.read_counts().get("secrets", "GET"), reconciles(&env).await?);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let polled = reconciles(&env).await? - polls;
    ensure!(polled >= 3, "the Machine was polled ({polled} reconciles in 4 s at a 1 s poll interval)");
    ensure_eq(server.read_counts().get("secrets", "GET") - gets, 0, "Secret GETs during the polls")?;
    env.cleanup().await
}

/// A change to a Secret in use reaches the controller's cache and wakes the Machines
/// that use it at once (here the poll interval is a minute), for a reconcile that asks
/// the driver again.
#[tokio::test]
async fn a_changed_secret_wakes_the_machines_that_use_it_at_once() -> Result<()> {
    let mut env = Env::idle("secretwake").await?;
    let settings = Settings { poll_interval: Duration::from_secs(60), ..test_settings() };
    let controller =
        env.spawn_controller(RunConfig { metrics_address: Some(env.metrics_address), settings, ..env.run_config() });
    create_secret(&env, "creds").await?;
    env.create(&with_credentials("a", "creds")).await?;
    env.wait_ready("a").await?;
    wait_secret(&env, "creds", "guarded", |s| s.is_some_and(guarded)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (before, calls_before) = (reconciles(&env).await?, status_calls(&env).await?);
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure_eq(reconciles(&env).await?, before, "reconciles while nothing changes")?;

    secrets_api(&env)
        .patch("creds", &Default::default(), &Patch::Merge(json!({ "stringData": { "token": "rotated" } })))
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while status_calls(&env).await? == calls_before {
        ensure!(tokio::time::Instant::now() < deadline, "the changed Secret did not wake its Machine");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    controller.stop().await?;
    env.start_controller();
    env.cleanup().await
}

/// Twenty Machines sharing one Secret, deleted at once: the Secret is released once the
/// last is gone, after one fresh list of the namespace's Machines or so, not one list
/// per Machine let go (which costs N lists of N Machines).
#[tokio::test]
async fn machines_sharing_a_secret_deleted_at_once_release_it_with_one_list() -> Result<()> {
    let env = Env::new("secretburst").await?;
    create_secret(&env, "creds").await?;
    for i in 0..20 {
        env.create(&with_credentials(&format!("m{i}"), "creds")).await?;
    }
    for i in 0..20 {
        env.wait_ready(&format!("m{i}")).await?;
    }
    let lists = match env.backend {
        Backend::TestServer(server) => Some((server, server.read_counts().get("machines", "LIST"))),
        Backend::Cluster(_) => None,
    };
    for i in 0..20 {
        env.machines.delete(&format!("m{i}"), &DeleteParams::default()).await?;
    }
    wait_secret(&env, "creds", "released", |s| s.is_some_and(|s| !guarded(s))).await?;
    if let Some((server, before)) = lists {
        let made = server.read_counts().get("machines", "LIST") - before;
        ensure!(made <= 3, "{made} lists of the namespace's Machines to release one Secret");
    }
    env.cleanup().await
}

/// A guarded Secret that no Machine uses (left by a controller stopped between letting its
/// last Machine go and releasing the Secret) is released by the leader's sweep, and never
/// by a standby, which could race the leader guarding it for a new Machine.
#[tokio::test]
async fn an_unused_guarded_secret_is_released_by_the_leader_not_by_a_standby() -> Result<()> {
    let mut env = Env::idle("secretsweep").await?;
    create_secret(&env, "left").await?;
    let guard = json!({ "metadata": {
        "finalizers": [SECRET_FINALIZER], "labels": { SECRET_GUARDED_LABEL: "true" } } });
    secrets_api(&env).patch("left", &Default::default(), &Patch::Merge(guard)).await?;
    // Another replica holds the Lease for an hour: this one stands by.
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.namespace);
    let lease: Lease = serde_json::from_value(json!({
        "metadata": { "name": "machinist-sweep" },
        "spec": { "holderIdentity": "the-leader", "leaseDurationSeconds": 3600,
                  "renewTime": MicroTime(Timestamp::now()) }
    }))?;
    leases.create(&PostParams::default(), &lease).await?;
    let standby = env.spawn_controller(RunConfig {
        leader_election: Some(LeaderElectionConfig {
            namespace: env.namespace.clone(),
            lease_name: "machinist-sweep".into(),
            identity: "standby".into(),
            timings: LeaseTimings::for_lease_duration(Duration::from_secs(60)),
        }),
        ..env.run_config()
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(guarded(&secrets_api(&env).get("left").await?), "a standby released the Secret");
    standby.stop().await?;

    env.start_controller();
    wait_secret(&env, "left", "released by the leader", |s| s.is_some_and(|s| !guarded(s))).await?;
    env.cleanup().await
}
