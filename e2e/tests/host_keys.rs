//! SSH host-key trust end to end, against a real OpenSSH server (machinist-test-sshd,
//! `LogLevel VERBOSE`, so its log shows every authentication attempt): once a host key
//! is pinned, a host presenting another one gets no login, no credential and no command
//! from machinist, whoever asks (the controller's check or the generic driver's bootstrap
//! login); an acceptance means exactly the key presented, is consumed, and cannot loop.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, ensure};
use kube::ResourceExt;
use machinist::api::{ACCEPT_HOST_KEY_ANNOTATION, ConditionType, Machine, Phase};
use machinist_drivers::State;
use machinist_e2e::{Env, condition, ensure_eq};
use machinist_test_sshd::TestSshd;
use serde_json::json;

/// A generic Machine whose reboot command leaves a mark and drops the connection, as a
/// reboot does.
fn generic_machine(name: &str, sshd: &TestSshd) -> String {
    let marker = sshd.home().join("rebooted");
    format!(
        "apiVersion: machinist.dev/v1alpha1\nkind: Machine\nmetadata:\n  name: {name}\nspec:\n  driver:\n    generic:\n      address: {}\n      port: {}\n      user: {}\n      rebootCommand: 'echo reboot >> {}; kill -9 $PPID'\n      restartTimeoutSeconds: 20\n  credentialsSecretRef:\n    name: login\n",
        sshd.host(),
        sshd.port(),
        sshd.user,
        marker.display()
    )
}

async fn bootstrap_login(env: &Env, sshd: &TestSshd) -> Result<()> {
    let key = sshd.bootstrap_private_key().into_bytes();
    env.create_secret("login", Some("kubernetes.io/ssh-auth"), [("ssh-privatekey", key)]).await?;
    Ok(())
}

fn pinned(m: &Machine) -> Option<String> {
    m.status.as_ref()?.ssh.as_ref()?.host_key_fingerprint.clone()
}

fn reboots(sshd: &TestSshd) -> usize {
    std::fs::read_to_string(sshd.home().join("rebooted")).unwrap_or_default().lines().count()
}

fn accept_annotation(m: &Machine) -> Option<String> {
    m.annotations().get(ACCEPT_HOST_KEY_ANNOTATION).cloned()
}

/// Replaces the host's key, as a reinstall (or an impostor on its address) does, and
/// returns the new fingerprint.
fn replace_host_key(sshd: &mut TestSshd) -> String {
    let key = sshd.new_host_key();
    sshd.set_host_key(&key);
    sshd.host_key_fingerprint()
}

const IDLE: Duration = Duration::from_secs(4);

#[tokio::test]
async fn a_changed_host_key_gets_no_login_until_exactly_that_key_is_accepted() -> Result<()> {
    let mut sshd = TestSshd::start();
    let env = Env::new("hostkey").await?;
    bootstrap_login(&env, &sshd).await?;
    env.create(&generic_machine("host", &sshd)).await?;
    let ready = env.wait_ready("host").await?;
    let first = sshd.host_key_fingerprint();
    ensure_eq(pinned(&ready), Some(first.clone()), "pinned at the bootstrap login of Create")?;
    env.wait_event("host", "HostKeyPinned").await?;

    // The host key changes, and a restart is asked for meanwhile.
    let second = replace_host_key(&mut sshd);
    env.patch("host", json!({ "spec": { "restartRequest": "after-the-change" } })).await?;
    // (At the spec's new generation: one recorded at the old one earns a retry.)
    let refused = env
        .wait_for("host", "refusing the new host key", Duration::from_secs(60), |m| {
            condition(m, ConditionType::Ready)
                .is_some_and(|c| c.reason == "HostKeyMismatch" && c.observed_generation == m.metadata.generation)
        })
        .await?;
    let status = refused.status.clone().unwrap();
    ensure_eq(status.state, Some(State::Error), "state of a host presenting another key")?;
    ensure_eq(status.phase, Some(Phase::Failed), "phase")?;
    let ssh = status.ssh.clone().unwrap();
    ensure_eq(ssh.host_key_fingerprint.as_deref(), Some(first.as_str()), "the pin is kept")?;
    ensure_eq(
        ssh.presented_host_key_fingerprint.as_deref(),
        Some(second.as_str()),
        &format!("presented key in {status:?}"),
    )?;
    let message = condition(&refused, ConditionType::Ready).unwrap().message.clone();
    ensure!(message.contains(&format!("{ACCEPT_HOST_KEY_ANNOTATION}={second}")), "{message}");
    env.wait_event("host", "HostKeyMismatch").await?;
    // Counted from here: a login the old server accepted just before it stopped may
    // still reach the shared log.
    let attempts = sshd.auth_attempts();

    // Recorded once: no writes while it polls, no login, no reboot.
    let held = env.unchanged_for("host", IDLE).await?;
    ensure_eq(held.status.as_ref().and_then(|s| s.last_restart_request.clone()), None, "restart not handled")?;
    ensure_eq(reboots(&sshd), 0, "reboot commands run on the unverified host")?;
    ensure_eq(sshd.auth_attempts(), attempts, "authentication attempts after the key changed")?;

    // A wrong acceptance changes nothing: one write (the annotation itself), then quiet.
    env.patch("host", json!({ "metadata": { "annotations": { ACCEPT_HOST_KEY_ANNOTATION: first.clone() } } })).await?;
    let still = env.unchanged_for("host", IDLE).await?;
    ensure_eq(pinned(&still), Some(first.clone()), "pin after a wrong acceptance")?;
    ensure_eq(sshd.auth_attempts(), attempts, "authentication attempts after a wrong acceptance")?;

    // The right one: pinned, recorded in a Normal Event, consumed; the restart goes ahead.
    env.patch("host", json!({ "metadata": { "annotations": { ACCEPT_HOST_KEY_ANNOTATION: second.clone() } } })).await?;
    let accepted = env
        .wait_for("host", "ready on the accepted key", Duration::from_secs(60), |m| {
            pinned(m).as_deref() == Some(second.as_str())
                && accept_annotation(m).is_none()
                && condition(m, ConditionType::Ready).is_some_and(|c| c.status == "True")
                && m.status.as_ref().and_then(|s| s.last_restart_request.as_deref()) == Some("after-the-change")
        })
        .await?;
    ensure_eq(accepted.status.unwrap().ssh.unwrap().presented_host_key_fingerprint, None, "presented key")?;
    let event = env.wait_event("host", "HostKeyAccepted").await?;
    ensure_eq(event.type_.as_deref(), Some("Normal"), "HostKeyAccepted Event type")?;
    let note = event.note.unwrap_or_default();
    ensure!(note.contains(&first) && note.contains(&second), "{note}");
    ensure_eq(reboots(&sshd), 1, "reboots after the acceptance")?;

    // A second change after an acceptance: refused again, and no write loop.
    let third = replace_host_key(&mut sshd);
    env.wait_for("host", "refusing the third key", Duration::from_secs(60), |m| {
        m.status.as_ref().and_then(|s| s.ssh.as_ref()).and_then(|s| s.presented_host_key_fingerprint.as_deref())
            == Some(third.as_str())
    })
    .await?;
    let attempts = sshd.auth_attempts();
    let held = env.unchanged_for("host", IDLE).await?;
    ensure_eq(pinned(&held), Some(second.clone()), "pin after the second change")?;
    ensure_eq(sshd.auth_attempts(), attempts, "authentication attempts after the second change")?;

    // Deleting it: the finalizer stays (the key line cannot be removed from an unverified
    // host), and Deleting says what to do.
    let uid = held.uid().unwrap();
    env.machines.delete("host", &Default::default()).await?;
    let waiting = env
        .wait_for("host", "waiting to delete", Duration::from_secs(60), |m| {
            condition(m, ConditionType::Deleting).is_some_and(|c| c.reason == "HostKeyMismatch")
        })
        .await?;
    let deleting = condition(&waiting, ConditionType::Deleting).unwrap().message.clone();
    ensure!(deleting.contains(&format!("{ACCEPT_HOST_KEY_ANNOTATION}={third}")), "{deleting}");
    ensure!(deleting.contains("deletionPolicy: Orphan"), "{deleting}");
    env.unchanged_for("host", IDLE).await?;
    ensure_eq(sshd.auth_attempts(), attempts, "authentication attempts while deleting")?;
    let authorized = std::fs::read_to_string(sshd.authorized_keys_path())?;
    ensure!(authorized.contains(&format!("machinist:{uid}")), "the key line stays meanwhile");

    // Accepted: Remove logs in and takes the Machine's key out.
    env.patch("host", json!({ "metadata": { "annotations": { ACCEPT_HOST_KEY_ANNOTATION: third } } })).await?;
    env.delete_and_wait("host").await?;
    let authorized = std::fs::read_to_string(sshd.authorized_keys_path())?;
    ensure!(!authorized.contains(&format!("machinist:{uid}")), "the Machine's key is removed:\n{authorized}");
    let logs = machinist_e2e::captured_logs();
    let bootstrap = sshd.bootstrap_private_key();
    ensure!(!logs.contains(bootstrap.lines().nth(1).unwrap_or("?")), "the bootstrap key leaked into the logs");
    env.cleanup().await
}

#[tokio::test]
async fn a_machine_whose_host_key_changed_can_be_let_go_with_orphan() -> Result<()> {
    let mut sshd = TestSshd::start();
    let env = Env::new("hostkeyorphan").await?;
    bootstrap_login(&env, &sshd).await?;
    let m = env.create(&generic_machine("host", &sshd)).await?;
    env.wait_ready("host").await?;
    replace_host_key(&mut sshd);
    env.machines.delete("host", &Default::default()).await?;
    env.wait_for("host", "waiting to delete", Duration::from_secs(60), |m| {
        condition(m, ConditionType::Deleting).is_some_and(|c| c.reason == "HostKeyMismatch")
    })
    .await?;
    let attempts = sshd.auth_attempts();
    env.patch("host", json!({ "spec": { "deletionPolicy": "Orphan" } })).await?;
    env.delete_and_wait("host").await?;
    ensure_eq(sshd.auth_attempts(), attempts, "authentication attempts on the changed host")?;
    let authorized = std::fs::read_to_string(sshd.authorized_keys_path())?;
    ensure!(authorized.contains(&format!("machinist:{}", m.uid().unwrap())), "Orphan leaves the host alone");
    env.cleanup().await
}

/// A controller killed between the generic driver's Create (the key installed) and the
/// status write: the next one finds the key by the Machine's UID tag, adopts the host,
/// pins its key at that first contact, and installs nothing twice.
#[tokio::test]
async fn a_controller_killed_after_a_generic_create_leaves_one_key_and_the_host_adopted() -> Result<()> {
    let sshd = TestSshd::start();
    let mut env = Env::idle("hostkeycrash").await?;
    bootstrap_login(&env, &sshd).await?;
    let m = env.create(&generic_machine("host", &sshd)).await?;
    let uid = m.uid().unwrap();
    let credentials = machinist_drivers::Credentials(BTreeMap::from([(
        "ssh-privatekey".to_string(),
        sshd.bootstrap_private_key().into_bytes(),
    )]));
    let machine = machinist_drivers::MachineRef {
        uid: uid.clone(),
        name: m.name_any(),
        namespace: env.namespace.clone(),
        ..Default::default()
    };
    let driver =
        machinist_drivers::Drivers::new(tempfile::tempdir()?.path()).driver(&m.spec.driver, machine, credentials)?;
    let key = machinist_drivers::ssh::generate_ed25519("machinist:crash");
    let request = machinist_drivers::CreateRequest { ssh_public_key: Some(key.public_openssh.clone()), ssh_port: None };
    let id = driver.create(&request).await?;
    ensure!(env.get("host").await?.status.is_none(), "nothing was written");

    env.start_controller();
    env.wait_event("host", "Adopted").await?;
    let adopted = env.wait_for("host", "adopted and pinned", Duration::from_secs(60), |m| pinned(m).is_some()).await?;
    ensure_eq(adopted.status.as_ref().and_then(|s| s.provider_id.clone()), Some(id), "providerID")?;
    ensure_eq(pinned(&adopted), Some(sshd.host_key_fingerprint()), "pinned at the adopting contact")?;
    let authorized = std::fs::read_to_string(sshd.authorized_keys_path())?;
    let lines = authorized.lines().filter(|l| l.ends_with(&format!("machinist:{uid}"))).count();
    ensure_eq(lines, 1, "key lines for the Machine")?;
    env.cleanup().await
}
