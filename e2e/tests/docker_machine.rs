//! A `dockerMachine` Machine end to end: the Go test plugin (docker-machine-driver-
//! fakecloud, over the real plugin protocol) behind the controller, SSH to a real sshd
//! with the key the plugin made, every power operation, deletion, and controller kills
//! during Create.

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use machinist::api::ConditionType;
use machinist::run::RunConfig;
use machinist_e2e::{Env, condition, ensure_eq};
use machinist_test_dmplugin::{FakeCloud, plugin_binary, plugin_dir_with};
use machinist_test_sshd::TestSshd;
use serde_json::json;

const TOKEN: &str = "fc-token-7b1d9e";

struct Plugin {
    dir: tempfile::TempDir,
    work: tempfile::TempDir,
    cloud: FakeCloud,
}

impl Plugin {
    fn new() -> Plugin {
        plugin_binary();
        Plugin {
            dir: plugin_dir_with(&[("fakecloud", &[])]),
            work: tempfile::tempdir().unwrap(),
            cloud: FakeCloud::new(),
        }
    }

    fn run_config(&self, env: &Env) -> RunConfig {
        RunConfig {
            driver_plugin_dir: Some(self.dir.path().to_path_buf()),
            driver_plugin_work_dir: self.work.path().to_path_buf(),
            ..env.run_config()
        }
    }

    /// A Machine on the fake cloud whose instance answers SSH at `sshd`.
    fn machine(&self, name: &str, sshd: &TestSshd, extra_flags: &str) -> String {
        format!(
            "apiVersion: machinist.dev/v1alpha1\nkind: Machine\nmetadata:\n  name: {name}\nspec:\n  driver:\n    dockerMachine:\n      name: fakecloud\n      callTimeoutSeconds: 20\n      flags:\n        fakecloud-provider-dir: {}\n        fakecloud-ssh-port: {}\n        fakecloud-ssh-user: {}\n        fakecloud-authorized-keys-file: {}\n        fakecloud-disk-size: 20\n{extra_flags}  credentialsSecretRef:\n    name: fakecloud\n  stopTimeoutSeconds: 10\n  provisioning:\n    script: echo provisioned\n",
            self.cloud.path().display(),
            sshd.port(),
            sshd.user,
            sshd.authorized_keys_path().display(),
        )
    }
}

async fn credentials(env: &Env) -> Result<()> {
    env.create_secret("fakecloud", None, [("FAKECLOUD_TOKEN", TOKEN.as_bytes().to_vec())]).await?;
    Ok(())
}

async fn wait_state(plugin: &Plugin, state: &str) -> Result<()> {
    for _ in 0..300 {
        if plugin.cloud.instances().first().is_some_and(|i| i.state == state) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the instance never became {state}: {:?}", plugin.cloud.instances())
}

#[tokio::test]
async fn a_plugin_machine_lives_its_whole_life_through_the_controller() -> Result<()> {
    let sshd = TestSshd::start();
    let plugin = Plugin::new();
    let env = Env::idle("dm").await?;
    let controller = env.spawn_controller(plugin.run_config(&env));
    credentials(&env).await?;
    let m = env.create(&plugin.machine("web", &sshd, "")).await?;
    let uid = m.uid().unwrap();

    let ready = env.wait_ready("web").await?;
    ensure_eq(condition(&ready, ConditionType::SSHReady).unwrap().reason.as_str(), "Ready", "SSHReady")?;
    ensure_eq(condition(&ready, ConditionType::Provisioned).unwrap().reason.as_str(), "Succeeded", "Provisioned")?;
    let status = ready.status.clone().unwrap();
    ensure_eq(status.provider_id.as_deref(), Some(format!("web-{}", &uid[..8]).as_str()), "providerID")?;
    let ssh = status.ssh.clone().unwrap();
    ensure_eq(ssh.host_key_fingerprint, Some(sshd.host_key_fingerprint()), "pinned host key")?;
    ensure_eq(plugin.cloud.instances().len(), 1, "instances")?;

    // The key the plugin made is the Machine's key; its state is in a Secret the Machine
    // owns, guarded like every Secret it uses.
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let key = secrets.get("web-ssh-key").await?;
    let public = String::from_utf8(key.data.as_ref().unwrap()["ssh-publickey"].0.clone())?;
    assert!(public.starts_with("ssh-rsa "), "{public}");
    let authorized = std::fs::read_to_string(sshd.authorized_keys_path())?;
    assert!(authorized.contains(public.split(' ').nth(1).unwrap()), "the plugin installed that key");
    let state = secrets.get("web-driver-state").await?;
    ensure_eq(state.type_.as_deref(), Some("machinist.dev/driver-state"), "state Secret type")?;
    assert!(state.owner_references().iter().any(|o| o.uid == uid), "the Machine owns its driver state");
    assert!(state.finalizers().iter().any(|f| f == "machinist.dev/secret-protection"), "guarded");

    // The token reaches the plugin only: never the Machine, its Events or the logs.
    let machine_json = serde_json::to_string(&env.get("web").await?)?;
    assert!(!machine_json.contains(TOKEN));
    for event in env.events("web").await? {
        assert!(!serde_json::to_string(&event)?.contains(TOKEN), "the token leaked into an Event");
    }
    assert!(!machinist_e2e::captured_logs().contains(TOKEN), "the token leaked into the logs");

    env.patch("web", json!({"spec": {"powerState": "Stopped"}})).await?;
    env.wait_condition("web", ConditionType::PowerStateSynced, "True", Some("Stopped")).await?;
    wait_state(&plugin, "Stopped").await?;
    env.patch("web", json!({"spec": {"powerState": "Running"}})).await?;
    env.wait_ready("web").await?;
    wait_state(&plugin, "Running").await?;
    env.patch("web", json!({"spec": {"restartRequest": "r1"}})).await?;
    env.wait_for("web", "restarted (r1)", Duration::from_secs(60), |m| {
        m.status.as_ref().is_some_and(|s| s.last_restart_request.as_deref() == Some("r1"))
    })
    .await?;
    env.patch("web", json!({"spec": {"stopMode": "Force", "powerState": "Stopped"}})).await?;
    env.wait_event("web", "Killed").await?;
    wait_state(&plugin, "Stopped").await?;

    env.delete_and_wait("web").await?;
    ensure_eq(plugin.cloud.instances().len(), 0, "instances after deletion")?;
    // Emptied after Remove, then garbage-collected with the Machine.
    for _ in 0..100 {
        if secrets.get_opt("web-driver-state").await?.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure_eq(secrets.get_opt("web-driver-state").await?.map(|s| s.name_any()), None, "state Secret after deletion")?;
    let _ = controller.stop().await;
    env.cleanup().await
}

#[tokio::test]
async fn controller_kills_during_create_never_make_a_second_instance() -> Result<()> {
    let sshd = TestSshd::start();
    let plugin = Plugin::new();
    let env = Env::idle("dm-crash").await?;
    credentials(&env).await?;

    // Killed while the plugin's Create is under way (it takes 3 s): nothing was made
    // yet; the next controller creates it, once.
    env.create(&plugin.machine("slow", &sshd, "        fakecloud-slow: [\"Create=3000\"]\n")).await?;
    let controller = env.spawn_controller(plugin.run_config(&env));
    env.wait_for("slow", "the finalizer", Duration::from_secs(30), |m| !m.finalizers().is_empty()).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    controller.abort();
    let controller = env.spawn_controller(plugin.run_config(&env));
    env.wait_ready("slow").await?;
    let slow: Vec<_> = plugin.cloud.instances().into_iter().filter(|i| i.machine_name.starts_with("slow-")).collect();
    ensure_eq(slow.len(), 1, "instances of the Machine killed mid-Create")?;

    // The plugin dies right after making the instance (before it answers): the next
    // reconcile restores the state saved before Create, asks GetState and adopts it.
    env.create(&plugin.machine("crash", &sshd, "        fakecloud-crash-in-create: true\n")).await?;
    let crashed = env.wait_ready("crash").await?;
    let mine: Vec<_> = plugin.cloud.instances().into_iter().filter(|i| i.machine_name.starts_with("crash-")).collect();
    ensure_eq(mine.len(), 1, "instances of the Machine whose plugin crashed in Create")?;
    ensure_eq(crashed.status.unwrap().provider_id, Some(mine[0].machine_name.clone()), "adopted")?;

    env.delete_and_wait("slow").await?;
    env.delete_and_wait("crash").await?;
    ensure_eq(plugin.cloud.instances().len(), 0, "instances after deletion")?;
    let _ = controller.stop().await;
    env.cleanup().await
}

#[tokio::test]
async fn a_missing_plugin_or_an_unknown_flag_is_an_invalid_spec_and_nothing_is_created() -> Result<()> {
    let sshd = TestSshd::start();
    let plugin = Plugin::new();
    let env = Env::idle("dm-invalid").await?;
    let controller = env.spawn_controller(plugin.run_config(&env));
    credentials(&env).await?;
    env.create(&plugin.machine("typo", &sshd, "        fakecloud-disk-sise: 30\n")).await?;
    let typo = env.wait_condition("typo", ConditionType::Ready, "False", Some("InvalidSpec")).await?;
    let message = condition(&typo, ConditionType::Ready).unwrap().message.clone();
    assert!(message.contains("spec.driver.dockerMachine.flags.fakecloud-disk-sise"), "{message}");
    let other = plugin
        .machine("other", &sshd, "")
        .replace("dockerMachine:\n      name: fakecloud", "dockerMachine:\n      name: hetzner");
    env.create(&other).await?;
    let missing = env.wait_condition("other", ConditionType::Ready, "False", Some("InvalidSpec")).await?;
    let message = condition(&missing, ConditionType::Ready).unwrap().message.clone();
    assert!(message.contains("docker-machine-driver-hetzner"), "{message}");
    ensure_eq(plugin.cloud.instances().len(), 0, "instances")?;
    env.delete_and_wait("typo").await?;
    env.delete_and_wait("other").await?;
    let _ = controller.stop().await;
    env.cleanup().await
}
