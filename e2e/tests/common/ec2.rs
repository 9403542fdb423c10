//! What the amazonec2 e2e tests share: moto behind a proxy that keeps every address on
//! loopback, amazonec2 Machines, their credentials, and what moto holds for a Machine.
#![allow(dead_code)] // each test file uses its own part

use std::collections::BTreeMap;

use anyhow::Result;
use aws_sdk_ec2::types::{Filter, InstanceStateName};
use machinist_drivers::Credentials;
use machinist_drivers::amazonec2::{CredentialSource, Ec2Connector, UID_TAG};
use machinist_e2e::{Env, ensure_eq};
use machinist_test_moto::{AMI, FaultProxy, Moto, REGION, credentials_secret_data};

/// moto behind a proxy that gives every instance the address 127.0.0.1.
pub fn loopback_proxy(moto: &Moto) -> FaultProxy {
    let proxy = FaultProxy::start(moto);
    proxy.rewrite_addresses("127.0.0.1");
    proxy
}

/// A loopback port where nothing listens, for as long as the socket is held: bound (so
/// no server of a test running alongside can get it) but never listening, so every
/// connection to it is refused.
pub fn refusing_port() -> Result<(tokio::net::TcpSocket, u16)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let port = socket.local_addr()?.port();
    Ok((socket, port))
}

/// An amazonec2 Machine reaching EC2 through `proxy`, with SSH on 127.0.0.1:`ssh_port`
/// as `ssh_user` (the driver's default user when `None`).
pub fn ec2_machine(name: &str, proxy: &FaultProxy, ssh_port: u16, ssh_user: Option<&str>) -> String {
    let user = ssh_user.map(|u| format!("\n    user: {u}")).unwrap_or_default();
    format!(
        "apiVersion: machinist.dev/v1alpha1\nkind: Machine\nmetadata:\n  name: {name}\nspec:\n  driver:\n    amazonec2:\n      region: {REGION}\n      ami: {AMI}\n      endpointUrl: {}\n      sshCidrs: [203.0.113.0/24]\n      tags:\n        team: e2e\n  credentialsSecretRef:\n    name: aws\n  ssh:\n    port: {ssh_port}{user}\n",
        proxy.endpoint()
    )
}

/// Made-up fingerprints of key types the test sshd does not have.
pub const OTHER_ECDSA: &str = "SHA256:Yx3bQm1fZ2w9kq2aB7cD8eF9gH0iJ1kL2mN3oP4qR5s";
pub const OTHER_ED25519: &str = "SHA256:9kq2Yx3bQm1fZ2w9aB7cD8eF9gH0iJ1kL2mN3oP4qR5";
pub const OTHER_RSA: &str = "SHA256:Qm1f+Z2w9kq2/aB7cD8eF9gH0iJ1kL2mN3oP4qR5sT6";

/// What cloud-init prints to an Ubuntu instance's console at boot: the block of SSH host
/// key fingerprints (ECDSA, ED25519, RSA, in that order), each line behind `ec2: `,
/// among boot noise.
pub fn cloud_init_console(ecdsa: &str, ed25519: &str, rsa: &str) -> String {
    format!(
        "[    0.000000] Linux version 6.8.0-1019-aws (buildd@lcy02-amd64-034)\n\
         [   12.345678] cloud-init[812]: Cloud-init v. 24.1.3 running 'modules:config'\n\
         ec2: \n\
         ec2: #############################################################\n\
         ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----\n\
         ec2: 256 {ecdsa} root@ip-172-31-5-9 (ECDSA)\n\
         ec2: 256 {ed25519} root@ip-172-31-5-9 (ED25519)\n\
         ec2: 3072 {rsa} root@ip-172-31-5-9 (RSA)\n\
         ec2: -----END SSH HOST KEY FINGERPRINTS-----\n\
         ec2: #############################################################\n\
         [   13.000001] cloud-init[812]: Cloud-init v. 24.1.3 finished\n"
    )
}

pub fn credentials() -> BTreeMap<String, Vec<u8>> {
    credentials_secret_data()
}

pub async fn aws_secret(env: &Env) -> Result<()> {
    env.create_secret("aws", None, credentials()).await?;
    Ok(())
}

pub async fn ec2(moto: &Moto) -> aws_sdk_ec2::Client {
    let source = CredentialSource::from_credentials(&Credentials(credentials())).expect("valid test credentials");
    Ec2Connector::new().client(REGION, Some(&moto.endpoint()), &source).await
}

/// What in moto carries the Machine's UID tag: live instances (id, state), key pair
/// names, security group names.
pub async fn tagged(
    client: &aws_sdk_ec2::Client,
    uid: &str,
) -> Result<(Vec<(String, String)>, Vec<String>, Vec<String>)> {
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

/// Deletes the Machine and checks that nothing tagged with its UID is left in moto.
pub async fn delete_leaving_nothing(env: &Env, client: &aws_sdk_ec2::Client, name: &str, uid: &str) -> Result<()> {
    env.delete_and_wait(name).await?;
    let (instances, keys, groups) = tagged(client, uid).await?;
    ensure_eq((instances.len(), keys.len(), groups.len()), (0, 0, 0), "left tagged with the UID")
}
