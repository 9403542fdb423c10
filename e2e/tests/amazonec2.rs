//! The amazonec2 driver end to end: the controller against moto's EC2 emulator (a real
//! EC2 API the test starts on loopback), with the Machine's credentials in a Secret.
//!
//! moto's instances have addresses but nothing behind them, so SSH can never answer:
//! these Machines reach `InstanceCreated` and `PowerStateSynced` but stay `SSHReady=False`
//! (and so `Ready=False`). That is asserted as such; SSHReady itself is covered by the
//! generic driver's test against a real sshd (`ssh.rs`).

use std::collections::BTreeMap;

use anyhow::Result;
use aws_sdk_ec2::types::{Filter, InstanceStateName};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use machinist::api::{ConditionType, Machine};
use machinist_drivers::amazonec2::{CredentialSource, Ec2Connector, UID_TAG};
use machinist_drivers::{CreateRequest, Credentials, Drivers, MachineRef, State};
use machinist_e2e::{Env, condition, ensure_eq};
use machinist_test_moto::{AMI, Moto, REGION, SECRET_ACCESS_KEY, credentials_secret_data};
use serde_json::json;

fn ec2_machine(name: &str, moto: &Moto) -> String {
    format!(
        "apiVersion: machinist.dev/v1alpha1\nkind: Machine\nmetadata:\n  name: {name}\nspec:\n  driver:\n    amazonec2:\n      region: {REGION}\n      ami: {AMI}\n      endpointUrl: {}\n      sshCidrs: [203.0.113.0/24]\n      tags:\n        team: e2e\n  credentialsSecretRef:\n    name: aws\n",
        moto.endpoint()
    )
}

fn credentials() -> BTreeMap<String, Vec<u8>> {
    credentials_secret_data()
}

async fn aws_secret(env: &Env) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let data = credentials().into_iter().map(|(k, v)| (k, ByteString(v))).collect();
    let secret = Secret {
        metadata: kube::api::ObjectMeta { name: Some("aws".into()), ..Default::default() },
        data: Some(data),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &secret).await?;
    Ok(())
}

async fn ec2(moto: &Moto) -> aws_sdk_ec2::Client {
    let source = CredentialSource::from_credentials(&Credentials(credentials())).expect("valid test credentials");
    Ec2Connector::new().client(REGION, Some(&moto.endpoint()), &source).await
}

/// What in moto carries the Machine's UID tag: live instances (id, state), key pair
/// names, security group names.
async fn tagged(client: &aws_sdk_ec2::Client, uid: &str) -> Result<(Vec<(String, String)>, Vec<String>, Vec<String>)> {
    let by_uid = || Filter::builder().name(format!("tag:{UID_TAG}")).values(uid).build();
    let out = client.describe_instances().filters(by_uid()).send().await?;
    let instances = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| i.state().and_then(|s| s.name()) != Some(&InstanceStateName::Terminated))
        .map(|i| {
            let state = i.state().and_then(|s| s.name()).map(|n| n.as_str().to_string()).unwrap_or_default();
            (i.instance_id().unwrap_or_default().to_string(), state)
        })
        .collect();
    let keys = client.describe_key_pairs().filters(by_uid()).send().await?;
    let keys = keys.key_pairs().iter().filter_map(|k| k.key_name()).map(str::to_string).collect();
    let groups = client.describe_security_groups().filters(by_uid()).send().await?;
    let groups = groups.security_groups().iter().filter_map(|g| g.group_name()).map(str::to_string).collect();
    Ok((instances, keys, groups))
}

fn state_of(m: &Machine) -> Option<State> {
    m.status.as_ref().and_then(|s| s.state)
}

#[tokio::test]
async fn amazonec2_machine_end_to_end() -> Result<()> {
    let moto = Moto::start();
    let client = ec2(&moto).await;
    let env = Env::new("ec2").await?;
    aws_secret(&env).await?;
    let m = env.create(&ec2_machine("web", &moto)).await?;
    let uid = m.uid().unwrap();

    // Launched, running, addressed; the key pair and the security group made for it.
    let running = env
        .wait_for("web", "running on EC2", std::time::Duration::from_secs(60), |m| {
            condition(m, ConditionType::PowerStateSynced).is_some_and(|c| c.status == "True")
        })
        .await?;
    let status = running.status.clone().unwrap();
    let id = status.provider_id.clone().unwrap();
    assert!(id.starts_with("i-"), "{id}");
    ensure_eq(status.driver.as_deref(), Some("amazonec2"), "status.driver")?;
    ensure_eq(state_of(&running), Some(State::Running), "state")?;
    assert!(!status.addresses.is_empty(), "addresses: {:?}", status.addresses);
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

    // moto cannot be reached over SSH: SSHReady says so and Ready stays False.
    let unreachable = env.wait_condition("web", ConditionType::SSHReady, "False", None).await?;
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
    env.wait_for("web", "running again", std::time::Duration::from_secs(60), |m| state_of(m) == Some(State::Running))
        .await?;

    // Deleted: the instance terminated, the key pair and the group gone.
    env.delete_and_wait("web").await?;
    let (instances, keys, groups) = tagged(&client, &uid).await?;
    ensure_eq((instances.len(), keys.len(), groups.len()), (0, 0, 0), "left tagged with the UID")?;

    // The secret access key appeared in no log line.
    let logs = machinist_e2e::captured_logs();
    assert!(!logs.contains(SECRET_ACCESS_KEY), "the secret access key is in the logs");
    env.cleanup().await
}

#[tokio::test]
async fn a_controller_killed_between_run_instances_and_the_status_write_leaves_one_instance() -> Result<()> {
    let moto = Moto::start();
    let client = ec2(&moto).await;
    let mut env = Env::idle("ec2-abort").await?;
    aws_secret(&env).await?;
    let m = env.create(&ec2_machine("web", &moto)).await?;
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
    let adopted = env
        .wait_for("web", "with a providerID", std::time::Duration::from_secs(60), |m| {
            m.status.as_ref().is_some_and(|s| s.provider_id.is_some())
        })
        .await?;
    ensure_eq(adopted.status.unwrap().provider_id, Some(launched.clone()), "providerID")?;
    env.wait_event("web", "Adopted").await?;
    let (instances, _, _) = tagged(&client, &uid).await?;
    ensure_eq(instances.len(), 1, "instances for the Machine")?;

    env.delete_and_wait("web").await?;
    let (instances, keys, groups) = tagged(&client, &uid).await?;
    ensure_eq((instances.len(), keys.len(), groups.len()), (0, 0, 0), "left tagged with the UID")?;
    env.cleanup().await
}
