//! The amazonec2 driver end to end: the controller against moto's EC2 emulator (a real
//! EC2 API the test starts on loopback), with the Machine's credentials in a Secret.
//!
//! Every Machine here reaches moto through a `FaultProxy` that rewrites each instance's
//! addresses to 127.0.0.1: moto makes up 10.x and public addresses, and the controller's
//! SSH check must never connect anywhere but loopback. Where SSH is not the point, the
//! Machine's `spec.ssh.port` is a loopback port this test holds and never listens on, so
//! SSH is refused (`SSHReady=False`, `ConnectionRefused`, and so `Ready=False`). Where it
//! is the point, the port is a real sshd's (machinist-test-sshd) and the proxy serves the
//! console cloud-init would print: the first contact is held to the fingerprints it shows.
//! Where EC2's timing is the point, the proxy also imitates it (`Ec2Timing`): a new
//! instance unknown to EC2 for a while, a new group or key pair unknown at its first use,
//! and `pending`, `stopping` and `shutting-down` that take a while.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use machinist::api::{ConditionType, Machine, Phase};
use machinist_drivers::amazonec2::CONSOLE_HOST_KEYS_WAIT;
use machinist_drivers::{CreateRequest, Credentials, Drivers, MachineRef, State};
use machinist_e2e::{Env, condition, describe, ensure_eq};

mod common;
use common::ec2::*;
use machinist_test_moto::{Ec2Timing, Moto, SECRET_ACCESS_KEY};
use machinist_test_sshd::TestSshd;
use serde_json::json;

fn state_of(m: &Machine) -> Option<State> {
    m.status.as_ref().and_then(|s| s.state)
}

fn ssh_ready_message(m: &Machine) -> String {
    condition(m, ConditionType::SSHReady).map(|c| c.message.clone()).unwrap_or_default()
}

/// What cloud-init does on a real instance: authorizes the Machine's public key (from
/// its generated Secret, once it exists) for the sshd's user.
async fn authorize_machine_key(env: &Env, sshd: &TestSshd, name: &str) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let secret_name = format!("{name}-ssh-key");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let secret = loop {
        if let Some(secret) = secrets.get_opt(&secret_name).await? {
            break secret;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no Secret {secret_name} within 30s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let public = secret.data.as_ref().and_then(|d| d.get("ssh-publickey")).context("ssh-publickey")?.0.clone();
    let path = sshd.authorized_keys_path();
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(&path, format!("{}\n", String::from_utf8(public)?.trim()))?;
    Ok(())
}

/// Waits for the instance id in `status.providerID`.
async fn provider_id(env: &Env, name: &str) -> Result<String> {
    let m = env
        .wait_for(name, "with a providerID", Duration::from_secs(60), |m| {
            m.status.as_ref().is_some_and(|s| s.provider_id.is_some())
        })
        .await?;
    Ok(m.status.unwrap().provider_id.unwrap())
}

#[tokio::test]
async fn amazonec2_machine_end_to_end() -> Result<()> {
    let moto = Moto::start();
    let proxy = loopback_proxy(&moto);
    // The instance printed its host keys, as cloud-init does; nothing answers SSH.
    proxy.console_output(&cloud_init_console(OTHER_ECDSA, OTHER_ED25519, OTHER_RSA));
    let (_refusing, port) = refusing_port()?;
    let client = ec2(&moto).await;
    let env = Env::new("ec2").await?;
    aws_secret(&env).await?;
    let m = env.create(&ec2_machine("web", &proxy, port, None)).await?;
    let uid = m.uid().unwrap();

    // Launched, running, addressed; the key pair and the security group made for it.
    let running = env
        .wait_for("web", "running on EC2", Duration::from_secs(60), |m| {
            condition(m, ConditionType::PowerStateSynced).is_some_and(|c| c.status == "True")
        })
        .await?;
    let status = running.status.clone().unwrap();
    let id = status.provider_id.clone().unwrap();
    assert!(id.starts_with("i-"), "{id}");
    ensure_eq(status.driver.as_deref(), Some("amazonec2"), "status.driver")?;
    ensure_eq(state_of(&running), Some(State::Running), "state")?;
    assert!(!status.addresses.is_empty(), "addresses: {:?}", status.addresses);
    assert!(status.addresses.iter().all(|a| a.address == "127.0.0.1"), "loopback only: {:?}", status.addresses);
    ensure_eq(condition(&running, ConditionType::InstanceCreated).unwrap().status.as_str(), "True", "InstanceCreated")?;
    let (instances, keys, groups) = tagged(&client, &uid).await?;
    ensure_eq(instances, vec![(id.clone(), "running".to_string())], "instances tagged with the UID")?;
    ensure_eq(keys, vec![format!("machinist-{uid}")], "key pairs")?;
    ensure_eq(groups, vec![format!("machinist-{uid}")], "security groups")?;

    // The key pair holds the Machine's own public key (from its generated Secret).
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let key_secret = secrets.get("web-ssh-key").await?;
    let public = String::from_utf8(key_secret.data.unwrap()["ssh-publickey"].0.clone())?;
    let pairs =
        client.describe_key_pairs().key_names(format!("machinist-{uid}")).include_public_key(true).send().await?;
    let imported = pairs.key_pairs()[0].public_key().unwrap_or_default().to_string();
    let body = |k: &str| k.split_whitespace().nth(1).unwrap_or_default().to_string();
    ensure_eq(body(&imported), body(&public), "the imported public key")?;

    // Nothing listens on the instance's SSH port: SSHReady says so and Ready stays False.
    let unreachable = env.wait_condition("web", ConditionType::SSHReady, "False", Some("ConnectionRefused")).await?;
    let message = ssh_ready_message(&unreachable);
    assert!(message.contains(&format!("@127.0.0.1:{port}: connection refused")), "{message}");
    ensure_eq(condition(&unreachable, ConditionType::Ready).unwrap().status.as_str(), "False", "Ready")?;

    // Admission keeps the instance's region and the driver kind.
    let moved = env.patch("web", json!({ "spec": { "driver": { "amazonec2": { "region": "eu-west-1" } } } })).await;
    let refused = moved.expect_err("the region cannot change").to_string();
    assert!(refused.contains("region cannot change"), "{refused}");
    let both = env.patch("web", json!({ "spec": { "driver": { "fake": {} } } })).await;
    assert!(both.expect_err("one driver block").to_string().contains("exactly one driver block"));

    // Stop and start again, through EC2.
    env.patch("web", json!({ "spec": { "powerState": "Stopped" } })).await?;
    env.wait_condition("web", ConditionType::PowerStateSynced, "True", Some("Stopped")).await?;
    ensure_eq(tagged(&client, &uid).await?.0, vec![(id.clone(), "stopped".to_string())], "stopped in EC2")?;
    env.patch("web", json!({ "spec": { "powerState": "Running" } })).await?;
    env.wait_for("web", "running again", Duration::from_secs(60), |m| state_of(m) == Some(State::Running)).await?;

    // Deleted: the instance terminated, the key pair and the group gone.
    delete_leaving_nothing(&env, &client, "web", &uid).await?;

    // The secret access key appeared in no log line.
    let logs = machinist_e2e::captured_logs();
    assert!(!logs.contains(SECRET_ACCESS_KEY), "the secret access key is in the logs");
    env.cleanup().await
}

#[tokio::test]
async fn a_controller_killed_between_run_instances_and_the_status_write_leaves_one_instance() -> Result<()> {
    let moto = Moto::start();
    let proxy = loopback_proxy(&moto);
    let (_refusing, port) = refusing_port()?;
    let client = ec2(&moto).await;
    let mut env = Env::idle("ec2-abort").await?;
    aws_secret(&env).await?;
    let m = env.create(&ec2_machine("web", &proxy, port, None)).await?;
    let uid = m.uid().unwrap();

    // What the killed controller did: the driver's Create, exactly as it calls it, and
    // then nothing (no providerID reached the API).
    let driver = Drivers::new(tempfile::tempdir()?.path()).driver(
        &m.spec.driver,
        MachineRef { uid: uid.clone(), name: m.name_any(), namespace: env.namespace.clone(), ..Default::default() },
        Credentials(credentials()),
    )?;
    let launched = driver.create(&CreateRequest::default()).await?;
    assert!(env.get("web").await?.status.is_none(), "nothing was written");

    // The next controller finds the instance by its tag and adopts it.
    env.start_controller();
    ensure_eq(provider_id(&env, "web").await?, launched.clone(), "providerID")?;
    env.wait_event("web", "Adopted").await?;
    let (instances, _, _) = tagged(&client, &uid).await?;
    ensure_eq(instances.len(), 1, "instances for the Machine")?;

    // Just launched, its console (moto's) holds no host keys yet: SSH waits for them
    // rather than trusting whatever answers first.
    let waiting = env.wait_condition("web", ConditionType::SSHReady, "Unknown", Some("WaitingForHostKeys")).await?;
    let message = ssh_ready_message(&waiting);
    assert!(message.contains(&format!("waiting for {launched} to print its SSH host key fingerprints")), "{message}");

    delete_leaving_nothing(&env, &client, "web", &uid).await?;
    env.cleanup().await
}

/// A running amazonec2 Machine `web` on moto behind the loopback proxy, launched (as the
/// proxy says) long ago: only a stop's own trace can show a power change since.
struct RunningWeb {
    _moto: Moto,
    proxy: machinist_test_moto::FaultProxy,
    _refusing: tokio::net::TcpSocket,
    client: aws_sdk_ec2::Client,
    env: Env,
    uid: String,
    id: String,
}

async fn running_web(test: &str) -> Result<RunningWeb> {
    let moto = Moto::start();
    let proxy = loopback_proxy(&moto);
    proxy.rewrite_launch_time("2020-01-01T00:00:00.000Z");
    let (refusing, port) = refusing_port()?;
    let client = ec2(&moto).await;
    let env = Env::new(test).await?;
    aws_secret(&env).await?;
    let m = env.create(&ec2_machine("web", &proxy, port, None)).await?;
    let uid = m.uid().unwrap();
    let id = provider_id(&env, "web").await?;
    env.wait_for("web", "running", Duration::from_secs(60), |m| state_of(m) == Some(State::Running)).await?;
    Ok(RunningWeb { _moto: moto, proxy, _refusing: refusing, client, env, uid, id })
}

/// A hard restart whose Kill (StopInstances) took effect, but whose answer never reached
/// the controller: it was killed meanwhile. EC2's state transition reason shows the
/// user-initiated stop, so the next controller knows the restart happened: one Kill, one
/// Start once the (lasting) stop is over (a StartInstances while stopping would be
/// refused, and retried: a second one), no reboot, and no warning that it may not have
/// happened.
#[tokio::test]
async fn an_ec2_hard_restart_interrupted_after_its_kill_is_made_exactly_once() -> Result<()> {
    let RunningWeb { _moto, proxy, _refusing, client, mut env, uid, id } = running_web("ec2-restartcrash").await?;
    // EC2's pace: a stop lasts, a start too; StartInstances while stopping would be refused.
    let stopping_for = Duration::from_secs(3);
    proxy.imitate_timing(Ec2Timing { stopping_for, pending_for: Duration::from_secs(1), ..Default::default() });

    proxy.delay_answer("StopInstances", Duration::from_secs(60));
    env.patch("web", json!({ "spec": { "restartMode": "Hard", "restartRequest": "r1" } })).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while state_in_moto(&client, &id).await?.as_deref() != Some("stopped") {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the Kill never reached EC2");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.abort_controller();
    proxy.delay_answer("StopInstances", Duration::ZERO);
    env.start_controller();
    env.wait_for("web", "restarted (r1) and running", Duration::from_secs(60), |m| {
        m.status.as_ref().is_some_and(|s| s.last_restart_request.as_deref() == Some("r1"))
            && state_of(m) == Some(State::Running)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure_eq(proxy.count("StopInstances"), 1, "Kill calls")?;
    ensure_eq(proxy.count("StartInstances"), 1, "Start calls (none refused while stopping)")?;
    ensure_eq(proxy.count("RebootInstances"), 0, "Restart calls")?;
    let reasons: Vec<String> = env.events("web").await?.into_iter().filter_map(|e| e.reason).collect();
    anyhow::ensure!(!reasons.iter().any(|r| r == "RestartInterrupted"), "warned as if unknown: {reasons:?}");
    let note = env.wait_event("web", "Restarted").await?.note.unwrap_or_default();
    anyhow::ensure!(note.contains("happened and is not repeated"), "{note}");
    delete_leaving_nothing(&env, &client, "web", &uid).await?;
    env.cleanup().await
}

/// A soft restart (RebootInstances) that reached EC2, but whose answer never reached the
/// controller: EC2 keeps no trace of a reboot that machinist could check, so the restart
/// is at most once. It is not repeated, and a Warning says it may not have happened.
#[tokio::test]
async fn an_ec2_soft_restart_interrupted_after_its_call_is_not_repeated_and_said() -> Result<()> {
    let RunningWeb { _moto, proxy, _refusing, client, mut env, uid, .. } = running_web("ec2-rebootcrash").await?;

    proxy.delay_answer("RebootInstances", Duration::from_secs(60));
    env.patch("web", json!({ "spec": { "restartMode": "Soft", "restartRequest": "r1" } })).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while proxy.count("RebootInstances") == 0 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the reboot never reached EC2");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.abort_controller();
    proxy.delay_answer("RebootInstances", Duration::ZERO);
    env.start_controller();
    let note = env.wait_event("web", "RestartInterrupted").await?.note.unwrap_or_default();
    anyhow::ensure!(note.contains("cannot tell whether it happened"), "{note}");
    env.wait_for("web", "r1 handled", Duration::from_secs(60), |m| {
        m.status.as_ref().is_some_and(|s| s.last_restart_request.as_deref() == Some("r1"))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure_eq(proxy.count("RebootInstances"), 1, "Restart calls")?;
    delete_leaving_nothing(&env, &client, "web", &uid).await?;
    env.cleanup().await
}

// The console-pinned path: a real sshd on loopback, the proxy serving the console.

#[tokio::test]
async fn an_ec2_host_key_is_verified_against_the_console_output_and_pinned() -> Result<()> {
    let sshd = TestSshd::start();
    let moto = Moto::start();
    let proxy = loopback_proxy(&moto);
    // The sshd's key is ed25519; the other two are keys it does not have.
    proxy.console_output(&cloud_init_console(OTHER_ECDSA, &sshd.host_key_fingerprint(), OTHER_RSA));
    let client = ec2(&moto).await;
    let env = Env::new("ec2-console").await?;
    aws_secret(&env).await?;
    let m = env.create(&ec2_machine("web", &proxy, sshd.port(), Some(&sshd.user))).await?;
    let uid = m.uid().unwrap();
    authorize_machine_key(&env, &sshd, "web").await?;
    let id = provider_id(&env, "web").await?;

    let ready = env.wait_ready("web").await?;
    let message = ssh_ready_message(&ready);
    ensure_eq(condition(&ready, ConditionType::SSHReady).unwrap().reason.as_str(), "Ready", "SSHReady")?;
    let verified = format!("host key {} verified against the console output of {id}", sshd.host_key_fingerprint());
    assert!(message.contains(&verified), "{message}");
    assert!(message.contains(&format!("127.0.0.1:{} as {}", sshd.port(), sshd.user)), "{message}");
    let ssh = ready.status.clone().unwrap().ssh.unwrap();
    ensure_eq(ssh.host_key_fingerprint, Some(sshd.host_key_fingerprint()), "pinned host key")?;
    ensure_eq(ssh.host.as_deref(), Some("127.0.0.1"), "ssh host")?;
    assert!(sshd.accepted_logins() >= 1, "the check logged in:\n{}", sshd.log());

    delete_leaving_nothing(&env, &client, "web", &uid).await?;
    env.cleanup().await
}

#[tokio::test]
async fn an_ec2_host_presenting_a_key_its_console_does_not_show_gets_no_credential() -> Result<()> {
    let sshd = TestSshd::start();
    let moto = Moto::start();
    let proxy = loopback_proxy(&moto);
    // The console vouches for three keys, none of them the one the host presents.
    proxy.console_output(&cloud_init_console(OTHER_ECDSA, OTHER_ED25519, OTHER_RSA));
    let client = ec2(&moto).await;
    let env = Env::new("ec2-mismatch").await?;
    aws_secret(&env).await?;
    let m = env.create(&ec2_machine("web", &proxy, sshd.port(), Some(&sshd.user))).await?;
    let uid = m.uid().unwrap();
    // The key would be accepted: only the host key check can keep machinist out.
    authorize_machine_key(&env, &sshd, "web").await?;

    let refused = env.wait_condition("web", ConditionType::SSHReady, "False", Some("HostKeyMismatch")).await?;
    let presented = sshd.host_key_fingerprint();
    let message = ssh_ready_message(&refused);
    assert!(message.contains(&format!("presents the host key {presented}")), "{message}");
    assert!(message.contains(OTHER_ED25519) && message.contains("no credential was offered"), "{message}");
    ensure_eq(condition(&refused, ConditionType::Ready).unwrap().status.as_str(), "False", "Ready")?;
    let ssh = refused.status.clone().unwrap().ssh.unwrap();
    ensure_eq(ssh.presented_host_key_fingerprint, Some(presented.clone()), "presentedHostKeyFingerprint")?;
    ensure_eq(ssh.host_key_fingerprint, None, "nothing pinned")?;
    env.wait_event("web", "HostKeyMismatch").await?;

    // Recorded once and not retried; and no credential ever reached the host.
    env.unchanged_for("web", Duration::from_secs(4)).await?;
    assert!(sshd.log().contains("Connection from 127.0.0.1"), "the check reached the host:\n{}", sshd.log());
    ensure_eq(sshd.auth_attempts(), 0, "authentication requests the host saw")?;

    delete_leaving_nothing(&env, &client, "web", &uid).await?;
    ensure_eq(sshd.auth_attempts(), 0, "authentication requests after the deletion")?;
    env.cleanup().await
}

#[tokio::test]
async fn an_ec2_console_without_host_keys_long_after_launch_trusts_the_first_contact_and_says_why() -> Result<()> {
    let sshd = TestSshd::start();
    let moto = Moto::start();
    let proxy = loopback_proxy(&moto);
    // moto's console has no cloud-init block; the instance is long past the wait for it.
    proxy.rewrite_launch_time("2020-01-01T00:00:00.000Z");
    let client = ec2(&moto).await;
    let env = Env::new("ec2-first-contact").await?;
    aws_secret(&env).await?;
    let m = env.create(&ec2_machine("web", &proxy, sshd.port(), Some(&sshd.user))).await?;
    let uid = m.uid().unwrap();
    authorize_machine_key(&env, &sshd, "web").await?;
    let id = provider_id(&env, "web").await?;

    let ready = env.wait_ready("web").await?;
    let message = ssh_ready_message(&ready);
    let minutes = CONSOLE_HOST_KEYS_WAIT.as_secs() / 60;
    let why = format!(
        "host key {} trusted at first contact and pinned (the console output of {id} shows no SSH host key \
         fingerprints from cloud-init {minutes} min after launch",
        sshd.host_key_fingerprint()
    );
    assert!(message.contains(&why), "{message}");
    assert!(!message.contains("verified"), "{message}");
    let ssh = ready.status.clone().unwrap().ssh.unwrap();
    ensure_eq(ssh.host_key_fingerprint, Some(sshd.host_key_fingerprint()), "pinned host key")?;

    delete_leaving_nothing(&env, &client, "web", &uid).await?;
    env.cleanup().await
}

/// Accepting the key a console did not list, before anything was pinned: that key alone is
/// trusted, pinned, and the annotation consumed; no loop (once, a check per reconcile
/// wrote status about 24 times a second here).
#[tokio::test]
async fn accepting_the_key_of_a_first_contact_mismatch_pins_it_without_a_loop() -> Result<()> {
    let sshd = TestSshd::start();
    let moto = Moto::start();
    let proxy = loopback_proxy(&moto);
    proxy.console_output(&cloud_init_console(OTHER_ECDSA, OTHER_ED25519, OTHER_RSA));
    let env = Env::new("ec2-accept").await?;
    aws_secret(&env).await?;
    env.create(&ec2_machine("web", &proxy, sshd.port(), Some(&sshd.user))).await?;
    authorize_machine_key(&env, &sshd, "web").await?;
    env.wait_condition("web", ConditionType::SSHReady, "False", Some("HostKeyMismatch")).await?;
    let presented = sshd.host_key_fingerprint();
    // What the condition message tells the user to do.
    env.patch("web", json!({"metadata": {"annotations": {"machinist.dev/accept-host-key": presented}}})).await?;
    let ready = env.wait_ready("web").await?;
    ensure_eq(ready.status.clone().unwrap().ssh.unwrap().host_key_fingerprint, Some(presented), "pinned")?;
    env.wait_for("web", "converged, with the annotation consumed", Duration::from_secs(30), |m| {
        !m.annotations().contains_key("machinist.dev/accept-host-key")
            && m.status.as_ref().and_then(|s| s.observed_generation) == m.metadata.generation
    })
    .await?;
    env.unchanged_for("web", Duration::from_secs(4)).await?;
    env.cleanup().await
}

// EC2's timing, imitated by the proxy: eventual consistency and slow transitions.

/// Every version of a Machine the API server sends from now on, in order (a watch of
/// its own), so a test can look at what the status said at any time of the run.
struct History {
    seen: Arc<Mutex<Vec<Machine>>>,
    /// Whether the watch saw the Machine go.
    gone: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl History {
    fn record(env: &Env, name: &str) -> History {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut stream = watcher::watcher(env.machines.clone(), config).boxed();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (into, deleted) = (seen.clone(), gone.clone());
        let task = tokio::spawn(async move {
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Apply(m) | watcher::Event::InitApply(m)) => into.lock().unwrap().push(m),
                    Ok(watcher::Event::Delete(m)) => {
                        into.lock().unwrap().push(m);
                        deleted.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    _ => {}
                }
            }
        });
        History { seen, gone, task }
    }

    /// Waits until this watch, too, has seen the Machine go.
    async fn caught_up_with_deletion(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.gone.load(std::sync::atomic::Ordering::SeqCst) {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the history never saw the Machine go");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn all(&self) -> Vec<Machine> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until this watch, too, has seen `m` (another watch saw it first).
    async fn caught_up(&self, m: &Machine) -> Result<()> {
        let version = m.resource_version();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.all().iter().any(|seen| seen.resource_version() == version) {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "the history never saw {version:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Fails naming the first version that shows the instance lost: a condition with
    /// reason `InstanceNotFound`, a state `NotFound` before the deletion, or phase `Failed`.
    fn never_lost(&self) -> Result<()> {
        for m in self.all() {
            let status = m.status.as_ref();
            let lost = status.is_some_and(|s| s.conditions.iter().any(|c| c.reason == "InstanceNotFound"))
                || status.is_some_and(|s| s.phase == Some(Phase::Failed))
                || (m.metadata.deletion_timestamp.is_none() && state_of(&m) == Some(State::NotFound));
            anyhow::ensure!(!lost, "the Machine looked lost at some point: {}", describe(&m));
        }
        Ok(())
    }

    /// The `Deleting` condition messages seen, in order, without repeats.
    fn deleting_messages(&self) -> Vec<String> {
        let mut messages: Vec<String> = Vec::new();
        for m in self.all() {
            let Some(c) = condition(&m, ConditionType::Deleting).filter(|c| c.status == "True") else { continue };
            if messages.last() != Some(&c.message) {
                messages.push(c.message.clone());
            }
        }
        messages
    }

    fn states(&self) -> Vec<State> {
        let mut states: Vec<State> = Vec::new();
        for state in self.all().iter().filter_map(state_of) {
            if states.last() != Some(&state) {
                states.push(state);
            }
        }
        states
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The state of an instance in moto itself (not through the proxy).
async fn state_in_moto(client: &aws_sdk_ec2::Client, id: &str) -> Result<Option<String>> {
    let out = client.describe_instances().instance_ids(id).send().await?;
    let instance = out.reservations().iter().flat_map(|r| r.instances()).next();
    Ok(instance.and_then(|i| i.state()?.name()).map(|n| n.as_str().to_string()))
}

#[tokio::test]
async fn an_ec2_machine_on_slow_eventually_consistent_ec2_never_looks_lost() -> Result<()> {
    let moto = Moto::start();
    let proxy = loopback_proxy(&moto);
    proxy.imitate_timing(Ec2Timing {
        invisible_for: Duration::from_secs(4),
        first_use_not_found: true,
        pending_for: Duration::from_secs(6),
        stopping_for: Duration::from_secs(3),
        shutting_down_for: Duration::from_secs(3),
    });
    let (_refusing, port) = refusing_port()?;
    let client = ec2(&moto).await;
    let env = Env::new("ec2-slow").await?;
    aws_secret(&env).await?;
    let history = History::record(&env, "web");
    let m = env.create(&ec2_machine("web", &proxy, port, None)).await?;
    let uid = m.uid().unwrap();

    // Created after the new group's and key pair's first uses failed; unknown to EC2,
    // then pending, then running: Starting all along, never lost.
    let running = env
        .wait_for("web", "running on EC2", Duration::from_secs(90), |m| {
            condition(m, ConditionType::PowerStateSynced).is_some_and(|c| c.status == "True")
        })
        .await?;
    let id = running.status.clone().unwrap().provider_id.unwrap();
    history.caught_up(&running).await?;
    // The group's first use failed before RunInstances, the key pair's at the first one.
    ensure_eq(proxy.count("RunInstances"), 2, "RunInstances calls")?;
    ensure_eq(tagged(&client, &uid).await?.0.len(), 1, "instances tagged with the UID")?;
    let states = history.states();
    anyhow::ensure!(states.starts_with(&[State::Starting]), "states: {states:?}");
    history.never_lost()?;

    // A stop that takes a while: Stopping, then Stopped.
    env.patch("web", json!({ "spec": { "powerState": "Stopped" } })).await?;
    let stopped = env.wait_condition("web", ConditionType::PowerStateSynced, "True", Some("Stopped")).await?;
    history.caught_up(&stopped).await?;
    let states = history.states();
    anyhow::ensure!(states.ends_with(&[State::Running, State::Stopping, State::Stopped]), "states: {states:?}");
    env.patch("web", json!({ "spec": { "powerState": "Running" } })).await?;
    env.wait_for("web", "running again", Duration::from_secs(60), |m| {
        condition(m, ConditionType::PowerStateSynced).is_some_and(|c| c.status == "True" && c.reason == "Running")
    })
    .await?;

    // A hard restart: Kill, and Start once the instance is observed stopped: never while it
    // is still stopping (EC2 would refuse it), so no failure is recorded on the way.
    let (starts, stops) = (proxy.count("StartInstances"), proxy.count("StopInstances"));
    env.patch("web", json!({ "spec": { "restartMode": "Hard", "restartRequest": "r1" } })).await?;
    env.wait_for("web", "hard-restarted and running", Duration::from_secs(60), |m| {
        m.status.as_ref().is_some_and(|s| s.last_restart_request.as_deref() == Some("r1"))
            && condition(m, ConditionType::PowerStateSynced)
                .is_some_and(|c| c.status == "True" && c.reason == "Running")
    })
    .await?;
    ensure_eq(state_in_moto(&client, &id).await?, Some("running".to_string()), "running in moto")?;
    ensure_eq(proxy.count("StopInstances") - stops, 1, "Kill calls of the hard restart")?;
    ensure_eq(proxy.count("StartInstances") - starts, 1, "Start calls of the hard restart (none refused)")?;

    // Deleted: Remove says it waits while the instance shuts down, then everything goes.
    delete_leaving_nothing(&env, &client, "web", &uid).await?;
    history.caught_up_with_deletion().await?;
    ensure_eq(state_in_moto(&client, &id).await?, Some("terminated".to_string()), "terminated in moto")?;
    let deleting = history.deleting_messages();
    let waited = format!("waiting for {id} to terminate (shutting-down)");
    anyhow::ensure!(deleting.contains(&waited), "Deleting never said {waited:?}: {deleting:?}");
    history.never_lost()?;
    env.cleanup().await
}

#[tokio::test]
async fn an_ec2_machine_deleted_before_ec2_shows_its_instance_leaves_nothing() -> Result<()> {
    let moto = Moto::start();
    let proxy = loopback_proxy(&moto);
    proxy.imitate_timing(Ec2Timing {
        invisible_for: Duration::from_secs(6),
        pending_for: Duration::from_secs(6),
        shutting_down_for: Duration::from_secs(2),
        ..Default::default()
    });
    let (_refusing, port) = refusing_port()?;
    let client = ec2(&moto).await;
    let env = Env::new("ec2-early-delete").await?;
    aws_secret(&env).await?;
    let history = History::record(&env, "web");
    let m = env.create(&ec2_machine("web", &proxy, port, None)).await?;
    let uid = m.uid().unwrap();
    // Deleted as soon as the instance id is recorded: EC2 does not show it yet.
    let id = provider_id(&env, "web").await?;
    delete_leaving_nothing(&env, &client, "web", &uid).await?;
    history.caught_up_with_deletion().await?;

    // The instance was terminated, not taken for gone and left running.
    ensure_eq(state_in_moto(&client, &id).await?, Some("terminated".to_string()), "the instance in moto")?;
    let deleting = history.deleting_messages();
    for waited in [
        format!("waiting for {id} to become visible in EC2 (eventual consistency)"),
        format!("waiting for {id} to terminate (shutting-down)"),
    ] {
        anyhow::ensure!(deleting.contains(&waited), "Deleting never said {waited:?}: {deleting:?}");
    }
    history.never_lost()?;
    env.cleanup().await
}

/// amazonec2 Machines created and deleted on an EC2 that is slow and eventually
/// consistent, while the controller is killed at random moments: never two instances for
/// one Machine, and nothing left (instances, key pairs, groups) once they are deleted.
#[tokio::test]
async fn ec2_machines_under_random_controller_kills_never_duplicate_and_leave_nothing() -> Result<()> {
    let moto = Moto::start();
    let proxy = loopback_proxy(&moto);
    proxy.console_output(&cloud_init_console(OTHER_ECDSA, OTHER_ED25519, OTHER_RSA));
    proxy.imitate_timing(Ec2Timing {
        invisible_for: Duration::from_millis(1500),
        first_use_not_found: true,
        pending_for: Duration::from_secs(1),
        stopping_for: Duration::from_secs(1),
        shutting_down_for: Duration::from_secs(2),
    });
    let (_refusing, port) = refusing_port()?;
    let client = ec2(&moto).await;
    let mut env = Env::idle("ec2-chaos").await?;
    aws_secret(&env).await?;
    let mut uids = Vec::new();
    for i in 0..4 {
        uids.push(env.create(&ec2_machine(&format!("m{i}"), &proxy, port, None)).await?.uid().unwrap());
    }
    let at_most_one = |counts: Vec<usize>, when: &str| -> Result<()> {
        anyhow::ensure!(counts.iter().all(|c| *c <= 1), "two instances for one Machine {when}: {counts:?}");
        Ok(())
    };
    // Kill the controller at random moments: six times while creating (more, until
    // something was launched), then six times while deleting.
    let mut deleted_at = None;
    for round in 0..24 {
        if deleted_at.is_some_and(|at| round >= at + 6) {
            break;
        }
        if deleted_at.is_none() && round >= 6 {
            let mut launched = 0;
            for uid in &uids {
                launched += tagged(&client, uid).await?.0.len();
            }
            if launched > 0 {
                for i in 0..4 {
                    env.machines.delete(&format!("m{i}"), &Default::default()).await?;
                }
                deleted_at = Some(round);
            }
        }
        env.start_controller();
        tokio::time::sleep(Duration::from_millis(200 + rand::random::<u64>() % 1800)).await;
        env.abort_controller();
        let mut counts = Vec::new();
        for uid in &uids {
            counts.push(tagged(&client, uid).await?.0.len());
        }
        at_most_one(counts, &format!("after kill {round}"))?;
    }
    anyhow::ensure!(deleted_at.is_some(), "nothing was launched in 18 rounds: the test proves nothing");
    // A controller left alone finishes the deletions.
    env.start_controller();
    for i in 0..4 {
        env.delete_and_wait(&format!("m{i}")).await?;
    }
    for uid in &uids {
        let (instances, keys, groups) = tagged(&client, uid).await?;
        ensure_eq((instances.len(), keys.len(), groups.len()), (0, 0, 0), "left in EC2 for a Machine")?;
    }
    env.cleanup().await
}
