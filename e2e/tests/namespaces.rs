//! Deleting a namespace that holds Machines, as a user or a GitOps prune does: the
//! namespace controller deletes the Secrets at once and the Machines get their
//! deletionTimestamp; the Secrets the Machines use stay (machinist's finalizer) until the
//! Machines are removed like any other deletion, and then the namespace goes by itself.
//! Nothing is left at the provider: the fake one, a real sshd's authorized_keys (generic),
//! or moto (amazonec2).

use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::DeleteParams;
use kube::{Api, ResourceExt};
use machinist_e2e::{Env, ensure_eq, fake_machine};
use machinist_test_moto::Moto;
use machinist_test_sshd::TestSshd;

mod common;
use common::ec2::*;

#[tokio::test]
async fn a_namespace_holding_machines_is_deleted_by_itself_and_leaves_nothing() -> Result<()> {
    let sshd = TestSshd::start();
    let mut env = Env::new("nsdelete").await?;
    env.create_secret("login", None, [("ssh-privatekey", sshd.bootstrap_private_key().into_bytes())]).await?;
    env.create_secret("token", None, [("token", b"t0k3n".to_vec())]).await?;
    let generic = format!(
        "apiVersion: machinist.dev/v1alpha1\nkind: Machine\nmetadata:\n  name: host\nspec:\n  driver:\n    generic:\n      address: {}\n      port: {}\n      user: {}\n  credentialsSecretRef:\n    name: login\n",
        sshd.host(),
        sshd.port(),
        sshd.user
    );
    let host = env.create(&generic).await?;
    let moto = Moto::start();
    let proxy = loopback_proxy(&moto);
    proxy.console_output(&cloud_init_console(OTHER_ECDSA, OTHER_ED25519, OTHER_RSA));
    let (_refusing, port) = refusing_port()?;
    aws_secret(&env).await?;
    let web = env.create(&ec2_machine("web", &proxy, port, None)).await?;
    let fakes = [
        env.create(&fake_machine("a", "{}", "  credentialsSecretRef:\n    name: token\n")).await?,
        env.create(&fake_machine("b", "{latencyMillis: {remove: 1500}}", "  credentialsSecretRef:\n    name: token\n"))
            .await?,
    ];
    for name in ["host", "a", "b"] {
        env.wait_ready(name).await?;
    }
    // The EC2 instance runs; its SSH (on a port nothing listens on) is not the point.
    env.wait_for("web", "running on EC2", Duration::from_secs(60), |m| {
        m.status.as_ref().is_some_and(|s| s.state == Some(machinist_drivers::State::Running))
    })
    .await?;
    let client = ec2(&moto).await;
    let (instances, _, _) = tagged(&client, &web.uid().unwrap()).await?;
    ensure_eq(instances.len(), 1, "EC2 instances before")?;
    let uid = host.uid().unwrap();
    ensure!(std::fs::read_to_string(sshd.authorized_keys_path())?.contains(&format!("machinist:{uid}")));

    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    namespaces.delete(&env.namespace, &DeleteParams::default()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while namespaces.get_opt(&env.namespace).await?.is_some() {
        ensure!(tokio::time::Instant::now() < deadline, "namespace {} did not go within 120 s", env.namespace);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for machine in &fakes {
        ensure_eq(env.instances(machine).len(), 0, "fake instances left")?;
    }
    let authorized = std::fs::read_to_string(sshd.authorized_keys_path())?;
    ensure!(
        !authorized.contains(&format!("machinist:{uid}")),
        "the generic host keeps the Machine's key:\n{authorized}"
    );
    let (instances, keys, groups) = tagged(&client, &web.uid().unwrap()).await?;
    ensure_eq((instances.len(), keys.len(), groups.len()), (0, 0, 0), "left in EC2 for the Machine")?;
    env.stop_controller().await
}
