//! SSH end to end with the `generic` driver against a real OpenSSH server the test
//! starts (machinist-test-sshd): the Machine's key generated into a Secret it owns and
//! installed on the host, SSHReady with the host key pinned, provisioning run once, a
//! changed host key refused until accepted, and Remove taking out only its key.

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use machinist::api::ConditionType;
use machinist_e2e::{Env, condition, ensure_eq};
use machinist_test_sshd::TestSshd;
use serde_json::json;

fn generic_machine(name: &str, sshd: &TestSshd, script: &str) -> String {
    format!(
        "apiVersion: machinist.dev/v1alpha1\nkind: Machine\nmetadata:\n  name: {name}\nspec:\n  driver:\n    generic:\n      address: {}\n      port: {}\n      user: {}\n  credentialsSecretRef:\n    name: login\n  provisioning:\n    script: |\n      {script}\n",
        sshd.host(),
        sshd.port(),
        sshd.user
    )
}

async fn bootstrap_login(env: &Env, sshd: &TestSshd) -> Result<()> {
    let key = sshd.bootstrap_private_key().into_bytes();
    env.create_secret("login", Some("kubernetes.io/ssh-auth"), [("ssh-privatekey", key)]).await?;
    Ok(())
}

#[tokio::test]
async fn generic_machine_over_ssh_end_to_end() -> Result<()> {
    let mut sshd = TestSshd::start();
    let env = Env::new("ssh").await?;
    bootstrap_login(&env, &sshd).await?;
    let marker = sshd.home().join("provisioned");
    let script = format!("echo provisioned >> {}; echo provisioning ran", marker.display());
    let m = env.create(&generic_machine("host", &sshd, &script)).await?;
    let uid = m.uid().unwrap();

    let ready = env.wait_ready("host").await?;
    let status = ready.status.clone().unwrap();
    let ssh = status.ssh.clone().unwrap();
    ensure_eq(ssh.host_key_fingerprint.clone(), Some(sshd.host_key_fingerprint()), "pinned host key")?;
    ensure_eq(ssh.key_secret_name.as_deref(), Some("host-ssh-key"), "key Secret")?;
    ensure_eq(ssh.port, Some(sshd.port()), "ssh port")?;
    ensure_eq(condition(&ready, ConditionType::SSHReady).unwrap().reason.as_str(), "Ready", "SSHReady")?;
    ensure_eq(condition(&ready, ConditionType::Provisioned).unwrap().reason.as_str(), "Succeeded", "Provisioned")?;
    ensure_eq(std::fs::read_to_string(&marker)?.lines().count(), 1, "provisioning runs")?;

    // The generated key: in a Secret the Machine owns, installed on the host, tagged.
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let key = secrets.get("host-ssh-key").await?;
    ensure_eq(key.type_.as_deref(), Some("kubernetes.io/ssh-auth"), "Secret type")?;
    assert!(key.owner_references().iter().any(|o| o.uid == uid), "the Machine owns its key Secret");
    let public = String::from_utf8(key.data.as_ref().unwrap()["ssh-publickey"].0.clone())?;
    let authorized = std::fs::read_to_string(sshd.authorized_keys_path())?;
    let installed: Vec<&str> = authorized.lines().filter(|l| l.ends_with(&format!("machinist:{uid}"))).collect();
    ensure_eq(installed.len(), 1, "installed key lines")?;
    assert!(installed[0].starts_with(public.trim().split(' ').take(2).collect::<Vec<_>>().join(" ").as_str()));

    // The private key appears nowhere but its Secret.
    let private = String::from_utf8(key.data.as_ref().unwrap()["ssh-privatekey"].0.clone())?;
    let body: String = private.lines().nth(1).unwrap_or_default().to_string();
    assert!(body.len() > 20, "a key body to look for");
    let status_json = serde_json::to_string(&env.get("host").await?)?;
    assert!(
        !status_json.contains(&body) && !status_json.contains("PRIVATE KEY"),
        "the private key leaked into the Machine"
    );
    for event in env.events("host").await? {
        let text = serde_json::to_string(&event)?;
        assert!(!text.contains(&body) && !text.contains("PRIVATE KEY"), "the private key leaked into an Event");
    }
    let logs = machinist_e2e::captured_logs();
    assert!(logs.contains("SSHReady"), "the controller's logs are captured");
    assert!(!logs.contains(&body) && !logs.contains("PRIVATE KEY"), "the private key leaked into the logs");
    let bootstrap = sshd.bootstrap_private_key();
    let bootstrap_body = bootstrap.lines().nth(1).unwrap_or_default();
    assert!(!logs.contains(bootstrap_body), "the bootstrap credentials leaked into the logs");

    // A host key change is refused (never re-pinned), then accepted on request.
    let new_key = sshd.new_host_key();
    sshd.set_host_key(&new_key);
    let new_fingerprint = sshd.host_key_fingerprint();
    env.patch("host", json!({"spec": {"provisioning": {"script": format!("{script} again")}}})).await?;
    let refused = env.wait_condition("host", ConditionType::SSHReady, "False", Some("HostKeyMismatch")).await?;
    let message = condition(&refused, ConditionType::SSHReady).unwrap().message.clone();
    assert!(message.contains(&new_fingerprint) && message.contains("machinist.dev/accept-host-key"), "{message}");
    env.wait_event("host", "HostKeyMismatch").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = env.get("host").await?;
    ensure_eq(
        still.status.unwrap().ssh.unwrap().host_key_fingerprint,
        Some(ssh.host_key_fingerprint.clone().unwrap()),
        "pin after a mismatch",
    )?;
    ensure_eq(std::fs::read_to_string(&marker)?.lines().count(), 1, "no provisioning against an unknown host key")?;
    env.patch("host", json!({"metadata": {"annotations": {"machinist.dev/accept-host-key": new_fingerprint}}})).await?;
    let accepted = env
        .wait_for("host", "provisioned again with the new host key", Duration::from_secs(60), |m| {
            condition(m, ConditionType::Provisioned).is_some_and(|c| c.reason == "Succeeded")
                && m.status.as_ref().and_then(|s| s.ssh.as_ref()).and_then(|s| s.host_key_fingerprint.as_deref())
                    == Some(new_fingerprint.as_str())
        })
        .await?;
    ensure_eq(condition(&accepted, ConditionType::SSHReady).unwrap().status.as_str(), "True", "SSHReady")?;
    env.wait_event("host", "HostKeyAccepted").await?;
    env.wait_for("host", "without the consumed annotation", Duration::from_secs(30), |m| {
        !m.annotations().contains_key("machinist.dev/accept-host-key")
    })
    .await?;
    ensure_eq(std::fs::read_to_string(&marker)?.lines().count(), 2, "provisioning reruns when the script changes")?;

    // Remove takes out exactly the Machine's key and leaves the host.
    env.delete_and_wait("host").await?;
    let authorized = std::fs::read_to_string(sshd.authorized_keys_path())?;
    assert!(!authorized.contains(&format!("machinist:{uid}")), "the Machine's key is removed:\n{authorized}");
    env.cleanup().await
}

#[tokio::test]
async fn failing_provisioning_is_reported_with_its_output_and_not_rerun() -> Result<()> {
    let sshd = TestSshd::start();
    let env = Env::new("provfail").await?;
    bootstrap_login(&env, &sshd).await?;
    let counter = sshd.home().join("runs");
    let script = format!("echo run >> {}; echo something broke >&2; exit 3", counter.display());
    env.create(&generic_machine("host", &sshd, &script)).await?;
    let failed = env.wait_condition("host", ConditionType::Provisioned, "False", Some("Failed")).await?;
    let message = condition(&failed, ConditionType::Provisioned).unwrap().message.clone();
    assert!(message.contains("exited with 3") && message.contains("something broke"), "{message}");
    ensure_eq(condition(&failed, ConditionType::Ready).unwrap().status.as_str(), "False", "Ready")?;
    env.wait_event("host", "ProvisioningFailed").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure_eq(std::fs::read_to_string(&counter)?.lines().count(), 1, "a failed script is not rerun")?;
    env.cleanup().await
}

#[tokio::test]
async fn wrong_bootstrap_credentials_are_reported() -> Result<()> {
    let sshd = TestSshd::start();
    let env = Env::new("sshauth").await?;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let stranger = machinist_drivers::ssh::generate_ed25519("stranger");
    let key = stranger.private_openssh.expose().as_bytes().to_vec();
    env.create_secret("login", Some("kubernetes.io/ssh-auth"), [("ssh-privatekey", key)]).await?;
    env.create(&generic_machine("host", &sshd, "true")).await?;
    let m = env
        .wait_for("host", "failing to log in", Duration::from_secs(60), |m| {
            condition(m, ConditionType::Ready).is_some_and(|c| c.status == "False" && c.message.contains("login"))
        })
        .await?;
    let ready = condition(&m, ConditionType::Ready).unwrap();
    assert!(ready.message.contains("spec.credentialsSecretRef") || ready.reason == "AuthFailed", "{ready:?}");
    assert!(m.status.as_ref().unwrap().failures.as_ref().unwrap().next_retry_time.is_some(), "retried: {m:?}");

    // Fixed in the Secret alone (no spec change): the next retry logs in.
    let login = ByteString(sshd.bootstrap_private_key().into_bytes());
    secrets
        .patch(
            "login",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({ "data": { "ssh-privatekey": login } })),
        )
        .await?;
    env.wait_ready("host").await?;
    env.cleanup().await
}

#[tokio::test]
async fn fake_machine_with_an_ssh_endpoint_is_ready_once_its_key_is_authorized() -> Result<()> {
    let sshd = TestSshd::start();
    let env = Env::new("fakessh").await?;
    let endpoint = format!("{{sshEndpoint: {{host: {}, port: {}, user: {}}}}}", sshd.host(), sshd.port(), sshd.user);
    env.create(&machinist_e2e::fake_machine("m", &endpoint, "")).await?;
    // The fake installs no key: until someone (cloud-init, here the test) authorizes the
    // Machine's key, the login is refused and retried with backoff.
    let refused = env.wait_condition("m", ConditionType::SSHReady, "False", Some("AuthFailed")).await?;
    let failures = refused.status.clone().unwrap().failures.unwrap();
    assert!(failures.next_retry_time.is_some() && failures.message.contains("retrying in"), "{failures:?}");
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let public = String::from_utf8(secrets.get("m-ssh-key").await?.data.unwrap()["ssh-publickey"].0.clone())?;
    let path = sshd.authorized_keys_path();
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(&path, format!("{}\n", public.trim()))?;
    let ready = env.wait_ready("m").await?;
    ensure_eq(condition(&ready, ConditionType::SSHReady).unwrap().reason.as_str(), "Ready", "SSHReady")?;
    let ssh = ready.status.unwrap().ssh.unwrap();
    ensure_eq(ssh.host_key_fingerprint, Some(sshd.host_key_fingerprint()), "pinned host key")?;
    env.cleanup().await
}
