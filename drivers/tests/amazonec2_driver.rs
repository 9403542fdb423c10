//! The amazonec2 driver against moto's EC2 emulator (a real EC2 API on loopback), each
//! test with a server of its own. The tests look at what the driver left in "AWS"
//! through the same SDK, by the Machine's UID tag.

use std::time::{Duration, Instant, SystemTime};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{Filter, InstanceStateName, ResourceType, Tag, TagSpecification};
use machinist_drivers::amazonec2::{
    Amazonec2Config, CAPACITY_RETRY_AFTER, CONSOLE_HOST_KEYS_WAIT, CredentialSource, EVENTUAL_CONSISTENCY_GRACE,
    Ec2Connector, Ec2Driver, IAM_PROPAGATION_WAIT, SpotConfig, THROTTLED_RETRY_AFTER, UID_TAG,
};
use machinist_drivers::{
    AddressType, CreateRequest, Credentials, Driver, DriverError, HostKeys, MachineRef, Operation, Removal, State,
};
use machinist_test_moto::{
    AMI, Ec2Timing, FAULT_REQUEST_ID, FaultProxy, Moto, REGION, SECRET_ACCESS_KEY, credentials_secret_data,
};

const PUBLIC_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHQ3wV3kbLhmRA1tBq2+dQXz2w0t1k6b1a1hZlJpCw7e machinist";

fn machine(uid: &str) -> MachineRef {
    MachineRef { uid: uid.into(), name: "web-1".into(), namespace: "team-a".into(), ..Default::default() }
}

fn credentials() -> Credentials {
    Credentials(credentials_secret_data())
}

fn config(moto: &Moto) -> Amazonec2Config {
    Amazonec2Config {
        region: REGION.into(),
        ami: AMI.into(),
        endpoint_url: Some(moto.endpoint()),
        ..Default::default()
    }
}

fn driver(uid: &str, config: Amazonec2Config) -> Ec2Driver {
    driver_for(machine(uid), config)
}

fn driver_for(machine: MachineRef, config: Amazonec2Config) -> Ec2Driver {
    Ec2Driver::new(Ec2Connector::new(), machine, config, &credentials()).expect("a valid driver")
}

/// The Machine as the controller knows it once it recorded the instance id at `at`.
fn recorded_at(uid: &str, at: SystemTime) -> MachineRef {
    MachineRef { instance_recorded: Some(at), ..machine(uid) }
}

/// What kinds of things are tagged with the Machine's UID (`instance`, `key-pair`, ...).
async fn tagged_kinds(client: &Client, uid: &str) -> Vec<String> {
    tagged(client, uid).await.iter().map(|t| t.split(' ').next().unwrap().to_string()).collect()
}

async fn state_in_moto(client: &Client, id: &str) -> Option<InstanceStateName> {
    instance(client, id).await.state().and_then(|s| s.name()).cloned()
}

fn request() -> CreateRequest {
    CreateRequest { ssh_public_key: Some(PUBLIC_KEY.into()), ssh_port: None }
}

async fn ec2(moto: &Moto) -> Client {
    let source = CredentialSource::from_credentials(&credentials()).unwrap();
    Ec2Connector::new().client(REGION, Some(&moto.endpoint()), &source).await
}

fn uid_filter(uid: &str) -> Filter {
    Filter::builder().name(format!("tag:{UID_TAG}")).values(uid).build()
}

/// Everything in "AWS" tagged with the Machine's UID, as `kind id` lines; instances that
/// are terminated do not count.
async fn tagged(client: &Client, uid: &str) -> Vec<String> {
    let mut found = Vec::new();
    let instances = client.describe_instances().filters(uid_filter(uid)).send().await.unwrap();
    for i in instances.reservations().iter().flat_map(|r| r.instances()) {
        if i.state().and_then(|s| s.name()) != Some(&InstanceStateName::Terminated) {
            found.push(format!("instance {}", i.instance_id().unwrap()));
        }
    }
    let keys = client.describe_key_pairs().filters(uid_filter(uid)).send().await.unwrap();
    found.extend(keys.key_pairs().iter().map(|k| format!("key-pair {}", k.key_name().unwrap())));
    let groups = client.describe_security_groups().filters(uid_filter(uid)).send().await.unwrap();
    found.extend(groups.security_groups().iter().map(|g| format!("security-group {}", g.group_name().unwrap())));
    let volumes = client.describe_volumes().filters(uid_filter(uid)).send().await.unwrap();
    found.extend(volumes.volumes().iter().map(|v| format!("volume {}", v.volume_id().unwrap())));
    found.sort();
    found
}

fn tag_map(tags: &[Tag]) -> std::collections::BTreeMap<String, String> {
    tags.iter().map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string())).collect()
}

async fn instance(client: &Client, id: &str) -> aws_sdk_ec2::types::Instance {
    let out = client.describe_instances().instance_ids(id).send().await.unwrap();
    out.reservations()[0].instances()[0].clone()
}

fn field_of(error: &DriverError) -> &str {
    match error {
        DriverError::InvalidConfig { field, .. } => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[tokio::test]
async fn the_whole_lifecycle_leaves_nothing_behind() {
    let moto = Moto::start();
    let client = ec2(&moto).await;
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-000000000001";
    let d = driver(
        uid,
        Amazonec2Config { ssh_cidrs: vec!["203.0.113.0/24".into(), "2001:db8::/32".into()], ..config(&moto) },
    );

    assert_eq!(d.find().await.unwrap(), None, "nothing to adopt yet");
    let id = d.create(&request()).await.expect("Create launches an instance");
    assert!(id.starts_with("i-"), "{id}");

    // The instance: launched with the UID's client token, the imported key and the
    // group machinist made, and tagged at creation.
    let i = instance(&client, &id).await;
    assert_eq!(i.client_token(), Some(d.client_token().as_str()));
    assert_eq!(i.key_name(), Some(format!("machinist-{uid}").as_str()));
    let tags = tag_map(i.tags());
    assert_eq!(tags[UID_TAG], uid);
    assert_eq!(tags["machinist.dev/machine-name"], "web-1");
    assert_eq!(tags["machinist.dev/machine-namespace"], "team-a");
    assert_eq!(tags["Name"], "team-a/web-1");
    assert_eq!(i.security_groups().len(), 1);
    let group_id = i.security_groups()[0].group_id().unwrap();

    // The security group lets in only SSH, from the configured CIDRs.
    let groups = client.describe_security_groups().group_ids(group_id).send().await.unwrap();
    let group = &groups.security_groups()[0];
    assert_eq!(group.group_name(), Some(format!("machinist-{uid}").as_str()));
    assert_eq!(tag_map(group.tags())[UID_TAG], uid);
    let rules = group.ip_permissions();
    assert_eq!(rules.len(), 1, "{rules:#?}");
    assert_eq!((rules[0].ip_protocol(), rules[0].from_port(), rules[0].to_port()), (Some("tcp"), Some(22), Some(22)));
    let v4: Vec<_> = rules[0].ip_ranges().iter().filter_map(|r| r.cidr_ip()).collect();
    let v6: Vec<_> = rules[0].ipv6_ranges().iter().filter_map(|r| r.cidr_ipv6()).collect();
    assert_eq!((v4, v6), (vec!["203.0.113.0/24"], vec!["2001:db8::/32"]));

    assert_eq!(
        tagged(&client, uid).await.len(),
        4,
        "an instance, a key pair, a security group and a root volume: {:?}",
        tagged(&client, uid).await
    );

    // Status, addresses and where SSH answers.
    assert_eq!(d.status(&id).await.unwrap(), State::Running);
    let addresses = d.addresses(&id).await.unwrap();
    let kinds: Vec<_> = addresses.iter().map(|a| a.kind).collect();
    assert_eq!(kinds[..2], [AddressType::ExternalIP, AddressType::InternalIP]);
    assert!(kinds.contains(&AddressType::Hostname));
    let endpoint = d.ssh_endpoint(&id).await.unwrap().expect("a running instance has an SSH endpoint");
    assert_eq!(
        (endpoint.host.as_str(), endpoint.port, endpoint.user.as_str()),
        (addresses[0].address.as_str(), 22, "ubuntu")
    );

    // Power.
    d.stop(&id).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Stopped);
    d.start(&id).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Running);
    d.kill(&id).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Stopped);
    d.start(&id).await.unwrap();
    d.restart(&id).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Running);

    // Remove: terminated (moto's are at once), and nothing tagged with the Machine's UID remains.
    assert_eq!(d.remove(&id).await.expect("Remove"), Removal::Done);
    assert_eq!(instance(&client, &id).await.state().and_then(|s| s.name()), Some(&InstanceStateName::Terminated));
    assert_eq!(d.status(&id).await.unwrap(), State::NotFound);
    assert_eq!(tagged(&client, uid).await, Vec::<String>::new());
    assert_eq!(d.find().await.unwrap(), None, "a terminated instance is not adopted");
    assert_eq!(d.remove(&id).await.expect("Remove again"), Removal::Done, "done at once");
}

#[tokio::test]
async fn a_controller_restarted_after_run_instances_adopts_the_one_instance() {
    let moto = Moto::start();
    let client = ec2(&moto).await;
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-000000000002";

    // The first controller launched the instance and died before writing providerID.
    let id = driver(uid, config(&moto)).create(&request()).await.unwrap();

    // The next one (a new driver: nothing carried over) looks before it creates.
    let found = driver(uid, config(&moto)).find().await.unwrap().expect("the tagged instance is found");
    assert_eq!((found.id.as_str(), found.state), (id.as_str(), State::Running));
    let live: Vec<_> = tagged(&client, uid).await.into_iter().filter(|t| t.starts_with("instance ")).collect();
    assert_eq!(live, vec![format!("instance {id}")], "exactly one instance for the Machine");
}

#[tokio::test]
async fn an_interrupted_create_reuses_its_key_pair_and_security_group() {
    let moto = Moto::start();
    let client = ec2(&moto).await;
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-000000000003";
    // A Create that failed at RunInstances (no such instance profile) after making the
    // key pair and the security group.
    let broken = Amazonec2Config { iam_instance_profile: Some("no-such-profile".into()), ..config(&moto) };
    let error = driver(uid, broken).create(&request()).await.expect_err("RunInstances fails");
    assert_eq!(field_of(&error), "spec.driver.amazonec2.iamInstanceProfile");
    assert_eq!(tagged(&client, uid).await.len(), 2, "{:?}", tagged(&client, uid).await);

    // Fixed: the retry launches with the same key pair and group, and makes no others.
    let id = driver(uid, config(&moto)).create(&request()).await.unwrap();
    let found = tagged(&client, uid).await;
    let kinds: Vec<_> = found.iter().map(|t| t.split(' ').next().unwrap()).collect();
    assert_eq!(kinds, ["instance", "key-pair", "security-group", "volume"], "{found:?}");
    assert_eq!(driver(uid, config(&moto)).remove(&id).await.unwrap(), Removal::Done);
    assert_eq!(tagged(&client, uid).await, Vec::<String>::new());
}

#[tokio::test]
async fn leftovers_of_a_failed_create_are_removed_without_an_instance() {
    let moto = Moto::start();
    let client = ec2(&moto).await;
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-000000000004";
    let broken = Amazonec2Config { iam_instance_profile: Some("no-such-profile".into()), ..config(&moto) };
    let d = driver(uid, broken);
    d.create(&request()).await.expect_err("RunInstances fails");
    assert_eq!(d.find().await.unwrap(), None);

    assert_eq!(d.remove_leftovers().await.expect("the key pair and the group go"), Removal::Done);
    assert_eq!(tagged(&client, uid).await, Vec::<String>::new());
}

#[tokio::test]
async fn an_instance_created_out_of_band_with_the_tag_is_adopted() {
    let moto = Moto::start();
    let client = ec2(&moto).await;
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-000000000005";
    let tag = |value: &str| Tag::builder().key(UID_TAG).value(value).build();
    let launch = |value: &str| {
        client
            .run_instances()
            .image_id(AMI)
            .min_count(1)
            .max_count(1)
            .tag_specifications(
                TagSpecification::builder().resource_type(ResourceType::Instance).tags(tag(value)).build(),
            )
            .send()
    };
    let other = launch("someone-else").await.unwrap();
    let ours = launch(uid).await.unwrap();
    let ours = ours.instances()[0].instance_id().unwrap().to_string();
    let other = other.instances()[0].instance_id().unwrap().to_string();

    let d = driver(uid, config(&moto));
    let found = d.find().await.unwrap().expect("adopted");
    assert_eq!(found.id, ours);
    d.stop(&ours).await.unwrap();
    assert_eq!(d.find().await.unwrap().map(|i| i.state), Some(State::Stopped), "a stopped instance is adopted too");

    assert_eq!(d.remove(&ours).await.unwrap(), Removal::Done);
    assert_eq!(d.find().await.unwrap(), None);
    assert_eq!(driver("someone-else", config(&moto)).find().await.unwrap().map(|i| i.id), Some(other), "left alone");
}

#[tokio::test]
async fn user_supplied_security_groups_and_key_pairs_are_used_and_never_deleted() {
    let moto = Moto::start();
    let client = ec2(&moto).await;
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-000000000006";
    let group = client.create_security_group().group_name("ops-ssh").description("ops").send().await.unwrap();
    let group = group.group_id().unwrap().to_string();
    client.import_key_pair().key_name("ops").public_key_material(PUBLIC_KEY.as_bytes().into()).send().await.unwrap();

    let d = driver(
        uid,
        Amazonec2Config { security_group_ids: vec![group.clone()], key_name: Some("ops".into()), ..config(&moto) },
    );
    let id = d.create(&request()).await.unwrap();
    let i = instance(&client, &id).await;
    assert_eq!(i.key_name(), Some("ops"));
    assert_eq!(i.security_groups().iter().filter_map(|g| g.group_id()).collect::<Vec<_>>(), [group.as_str()]);
    let made: Vec<_> = tagged(&client, uid).await.into_iter().filter(|t| !t.starts_with("volume ")).collect();
    assert_eq!(made, [format!("instance {id}")], "no key pair or group of machinist's own");

    assert_eq!(d.remove(&id).await.unwrap(), Removal::Done);
    assert_eq!(client.describe_security_groups().group_ids(&group).send().await.unwrap().security_groups().len(), 1);
    assert_eq!(client.describe_key_pairs().key_names("ops").send().await.unwrap().key_pairs().len(), 1);
}

#[tokio::test]
async fn launch_settings_reach_run_instances() {
    let moto = Moto::start();
    let client = ec2(&moto).await;
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-000000000007";
    let subnets = client.describe_subnets().send().await.unwrap();
    let subnet = subnets.subnets()[0].subnet_id().unwrap().to_string();
    let d = driver(
        uid,
        Amazonec2Config {
            instance_type: Some("m5.large".into()),
            subnet_id: Some(subnet.clone()),
            root_volume_size: Some(40),
            root_volume_type: Some(machinist_drivers::amazonec2::RootVolumeType::Gp3),
            associate_public_ip: Some(true),
            use_private_address: Some(true),
            ssh_user: Some("ec2-user".into()),
            user_data: Some("#cloud-config\nruncmd: [touch /tmp/hello]\n".into()),
            tags: [("team".to_string(), "platform".to_string()), ("Name".to_string(), "web".to_string())].into(),
            ..config(&moto)
        },
    );
    let id = d.create(&CreateRequest { ssh_port: Some(2222), ..request() }).await.unwrap();
    let i = instance(&client, &id).await;
    assert_eq!(i.instance_type().map(|t| t.as_str()), Some("m5.large"));
    assert_eq!(i.subnet_id(), Some(subnet.as_str()));
    let tags = tag_map(i.tags());
    assert_eq!((tags["team"].as_str(), tags["Name"].as_str()), ("platform", "web"));

    let volumes = client.describe_volumes().filters(uid_filter(uid)).send().await.unwrap();
    let root = &volumes.volumes()[0];
    assert_eq!((root.size(), root.volume_type().map(|t| t.as_str())), (Some(40), Some("gp3")));
    assert_eq!(tag_map(root.tags())["team"], "platform");

    // associatePublicIp puts the subnet and the group on the network interface.
    let groups = client.describe_security_groups().filters(uid_filter(uid)).send().await.unwrap();
    let group = groups.security_groups()[0].group_id().unwrap();
    let nic_groups: Vec<_> = i.network_interfaces()[0].groups().iter().filter_map(|g| g.group_id()).collect();
    assert!(nic_groups.contains(&group), "{nic_groups:?} has {group}");
    assert!(i.network_interfaces()[0].association().is_some(), "a public address was asked for");
    let rule = &groups.security_groups()[0].ip_permissions()[0];
    assert_eq!((rule.from_port(), rule.to_port()), (Some(2222), Some(2222)), "the SSH port of spec.ssh.port");
    assert_eq!(groups.security_groups()[0].vpc_id(), subnets.subnets()[0].vpc_id(), "in the subnet's VPC");

    let user_data = client
        .describe_instance_attribute()
        .instance_id(&id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let encoded = user_data.user_data().and_then(|v| v.value()).unwrap();
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), "#cloud-config\nruncmd: [touch /tmp/hello]\n");

    // usePrivateAddress: SSH goes to the private address, as the user named.
    let endpoint = d.ssh_endpoint(&id).await.unwrap().unwrap();
    assert_eq!((endpoint.host.as_str(), endpoint.user.as_str()), (i.private_ip_address().unwrap(), "ec2-user"));
    assert_eq!(d.remove(&id).await.unwrap(), Removal::Done);
    assert_eq!(tagged(&client, uid).await, Vec::<String>::new());
}

#[tokio::test]
async fn a_spot_instance_launches_and_refuses_to_stop() {
    let moto = Moto::start();
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-000000000008";
    let d = driver(uid, Amazonec2Config { spot: Some(SpotConfig { max_price: Some("0.05".into()) }), ..config(&moto) });
    let id = d.create(&request()).await.unwrap();
    let i = instance(&ec2(&moto).await, &id).await;
    assert_eq!(i.instance_lifecycle().map(|l| l.as_str()), Some("spot"));
    for (operation, result) in [(Operation::Stop, d.stop(&id).await), (Operation::Kill, d.kill(&id).await)] {
        match result {
            Err(DriverError::NotSupported { operation: op, .. }) => assert_eq!(op, operation),
            other => panic!("{operation}: expected NotSupported, got {other:?}"),
        }
    }
    assert_eq!(d.remove(&id).await.unwrap(), Removal::Done);
}

#[tokio::test]
async fn bad_launch_settings_are_invalid_config_before_anything_is_created() {
    let moto = Moto::start();
    let client = ec2(&moto).await;
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-000000000009";
    let cases = [
        (Amazonec2Config { ami: "ami-0badc0de".into(), ..config(&moto) }, "spec.driver.amazonec2.ami"),
        (
            Amazonec2Config { subnet_id: Some("subnet-0badc0de".into()), ..config(&moto) },
            "spec.driver.amazonec2.subnetId",
        ),
    ];
    for (config, field) in cases {
        let error = driver(uid, config).create(&request()).await.expect_err("refused");
        assert_eq!(field_of(&error), field, "{error}");
        assert!(error.to_string().contains("does not exist"), "{error}");
    }
    assert_eq!(tagged(&client, uid).await, Vec::<String>::new(), "nothing was created");

    // A security group that does not exist, named by EC2's own error code.
    let missing = Amazonec2Config { security_group_ids: vec!["sg-0badc0de".into()], ..config(&moto) };
    let error = driver(uid, missing).create(&request()).await.expect_err("refused");
    assert_eq!(field_of(&error), "spec.driver.amazonec2.securityGroupIds", "{error}");
    assert!(error.to_string().contains("EC2 RunInstances: InvalidGroup.NotFound: "), "{error}");
    assert!(error.to_string().contains("(request id "), "{error}");
}

#[tokio::test]
async fn unknown_credentials_are_invalid_config_naming_the_secret() {
    let moto = Moto::start_with_auth();
    let d = driver("1f0c5c4e-7a6b-4b8e-9d51-00000000000a", config(&moto));
    let error = d.find().await.expect_err("moto knows no such access key");
    assert_eq!(field_of(&error), "spec.credentialsSecretRef");
    let message = error.to_string();
    assert!(message.contains("EC2 DescribeInstances: AuthFailure: "), "{message}");
    assert!(!message.contains(SECRET_ACCESS_KEY), "never the secret: {message}");
}

#[tokio::test]
async fn missing_instances_and_an_unreachable_endpoint_are_typed() {
    let moto = Moto::start();
    let d = driver("1f0c5c4e-7a6b-4b8e-9d51-00000000000b", config(&moto));
    let gone = "i-0123456789abcdef0";
    assert_eq!(d.status(gone).await.unwrap(), State::NotFound);
    assert!(d.ssh_endpoint(gone).await.unwrap().is_none());
    assert_eq!(d.start(gone).await.unwrap_err().reason(), "NotFound");
    assert_eq!(d.remove(gone).await.expect("removing what is not there"), Removal::Done);

    // Nothing listens on the endpoint: worth retrying, and says where it tried.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let nowhere = Amazonec2Config { endpoint_url: Some(format!("http://{closed}")), ..config(&moto) };
    let error = driver("1f0c5c4e-7a6b-4b8e-9d51-00000000000b", nowhere).status(gone).await.unwrap_err();
    assert_eq!(error.reason(), "TransientError", "{error}");
    assert!(error.to_string().starts_with("EC2 DescribeInstances: "), "{error}");
}

#[tokio::test]
async fn credentials_without_both_keys_are_refused_before_any_call() {
    let config = Amazonec2Config { region: REGION.into(), ami: AMI.into(), ..Default::default() };
    let only_id = Credentials([("AWS_ACCESS_KEY_ID".to_string(), b"AKID".to_vec())].into());
    let error = Ec2Driver::new(Ec2Connector::new(), machine("u"), config, &only_id).err().expect("refused");
    assert_eq!(field_of(&error), "spec.credentialsSecretRef");
}

// What moto never answers, put in front of it by a proxy that speaks EC2's error format.

fn through(proxy: &FaultProxy, moto: &Moto) -> Amazonec2Config {
    Amazonec2Config { endpoint_url: Some(proxy.endpoint()), ..config(moto) }
}

#[tokio::test]
async fn remove_says_it_waits_while_the_instance_shuts_down_then_removes_the_rest() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto);
    let shutting_down = Duration::from_secs(3);
    proxy.imitate_timing(Ec2Timing { shutting_down_for: shutting_down, ..Default::default() });
    let client = ec2(&moto).await;
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-00000000000c";
    let d = driver(uid, through(&proxy, &moto));
    let id = d.create(&request()).await.unwrap();

    let started = Instant::now();
    let waiting = Removal::Waiting(format!("waiting for {id} to terminate (shutting-down)"));
    assert_eq!(d.remove(&id).await.unwrap(), waiting);
    // The proxy saw TerminateInstances before this.
    let terminated = Instant::now();
    assert!(started.elapsed() < Duration::from_secs(2), "Remove does not wait: {:?}", started.elapsed());
    // The instance still holds its key pair and group: nothing else is deleted yet.
    let left = tagged_kinds(&client, uid).await;
    assert!(left.contains(&"key-pair".into()) && left.contains(&"security-group".into()), "{left:?}");
    // Called again: terminated again (a no-op for EC2), still waiting.
    assert_eq!(d.remove(&id).await.unwrap(), waiting);
    assert_eq!(proxy.count("TerminateInstances"), 2);
    assert_eq!(proxy.count("DeleteSecurityGroup"), 0);

    tokio::time::sleep(shutting_down.saturating_sub(terminated.elapsed()) + Duration::from_millis(100)).await;
    assert_eq!(d.remove(&id).await.unwrap(), Removal::Done);
    assert_eq!(state_in_moto(&client, &id).await, Some(InstanceStateName::Terminated));
    assert_eq!(tagged(&client, uid).await, Vec::<String>::new());
}

#[tokio::test]
async fn a_security_group_still_in_use_is_left_for_the_next_remove_without_sleeping() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto);
    let client = ec2(&moto).await;
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-000000000014";
    let d = driver(uid, through(&proxy, &moto));
    let id = d.create(&request()).await.unwrap();
    let group = instance(&client, &id).await.security_groups()[0].group_id().unwrap().to_string();
    // As EC2 answers while the terminated instance's network interface is released.
    proxy.fail("DeleteSecurityGroup", Some(1), 400, "DependencyViolation", "resource has a dependent object");

    let started = Instant::now();
    match d.remove(&id).await.unwrap() {
        Removal::Waiting(what) => {
            assert!(what.starts_with(&format!("waiting for security group {group} to be released by ")), "{what}")
        }
        Removal::Done => panic!("the group is still there"),
    }
    assert!(started.elapsed() < Duration::from_secs(2), "Remove does not wait: {:?}", started.elapsed());
    assert_eq!(proxy.count("DeleteSecurityGroup"), 1, "one try per call");
    // The rest went in the same call.
    assert_eq!(tagged_kinds(&client, uid).await, ["security-group"]);

    assert_eq!(d.remove(&id).await.unwrap(), Removal::Done);
    assert_eq!(proxy.count("DeleteSecurityGroup"), 2);
    assert_eq!(tagged(&client, uid).await, Vec::<String>::new());
}

#[tokio::test]
async fn leftovers_wait_for_a_held_security_group_too() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto);
    let client = ec2(&moto).await;
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-000000000015";
    let broken = Amazonec2Config { iam_instance_profile: Some("no-such-profile".into()), ..through(&proxy, &moto) };
    let d = driver(uid, broken);
    d.create(&request()).await.expect_err("RunInstances fails");
    proxy.fail("DeleteSecurityGroup", Some(1), 400, "DependencyViolation", "resource has a dependent object");

    let removal = d.remove_leftovers().await.unwrap();
    assert!(matches!(&removal, Removal::Waiting(w) if w.starts_with("waiting for security group ")), "{removal:?}");
    assert_eq!(tagged_kinds(&client, uid).await, ["security-group"]);
    assert_eq!(d.remove_leftovers().await.unwrap(), Removal::Done);
    assert_eq!(tagged(&client, uid).await, Vec::<String>::new());
}

// EC2's eventual consistency, as the proxy imitates it.

#[tokio::test]
async fn an_instance_ec2_does_not_show_yet_is_starting_until_the_grace_ends() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto);
    // Longer than the test: the instance stays invisible through the proxy throughout.
    proxy.imitate_timing(Ec2Timing { invisible_for: Duration::from_secs(600), ..Default::default() });
    let client = ec2(&moto).await;
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-000000000016";
    let id = driver(uid, through(&proxy, &moto)).create(&request()).await.unwrap();
    assert_eq!(state_in_moto(&client, &id).await, Some(InstanceStateName::Running), "it exists all along");

    // Recorded just now: not visible yet, so still starting; nothing says it is gone.
    let young = driver_for(recorded_at(uid, SystemTime::now()), through(&proxy, &moto));
    assert_eq!(young.status(&id).await.unwrap(), State::Starting);
    assert!(young.ssh_endpoint(&id).await.unwrap().is_none());
    assert!(young.addresses(&id).await.unwrap().is_empty());
    let calls = [
        ("Start", young.start(&id).await.map(|_| ())),
        ("Stop", young.stop(&id).await),
        ("Kill", young.kill(&id).await),
        ("Restart", young.restart(&id).await),
        ("host keys", young.host_keys(&id).await.map(|_| ())),
    ];
    for (what, result) in calls {
        let error = result.expect_err(what);
        assert_eq!(error.reason(), "TransientError", "{what}: {error}");
        let text = error.to_string();
        assert!(text.contains("InvalidInstanceID.NotFound") && text.contains("eventually consistent"), "{text}");
    }

    // Recorded longer ago than the grace: EC2's NotFound is believed.
    let old = SystemTime::now() - EVENTUAL_CONSISTENCY_GRACE - Duration::from_secs(1);
    let old = driver_for(recorded_at(uid, old), through(&proxy, &moto));
    assert_eq!(old.status(&id).await.unwrap(), State::NotFound);
    assert_eq!(old.start(&id).await.unwrap_err().reason(), "NotFound");
    // No recorded time (before the controller knew of grace): as before.
    assert_eq!(driver(uid, through(&proxy, &moto)).status(&id).await.unwrap(), State::NotFound);
}

#[tokio::test]
async fn remove_inside_the_visibility_window_waits_and_terminates_after_it() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto);
    let invisible = Duration::from_secs(3);
    proxy.imitate_timing(Ec2Timing { invisible_for: invisible, ..Default::default() });
    let client = ec2(&moto).await;
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-000000000017";
    let id = driver(uid, through(&proxy, &moto)).create(&request()).await.unwrap();
    // The proxy saw RunInstances answer before this.
    let launched = Instant::now();
    let d = driver_for(recorded_at(uid, SystemTime::now()), through(&proxy, &moto));

    let waiting = Removal::Waiting(format!("waiting for {id} to become visible in EC2 (eventual consistency)"));
    assert_eq!(d.remove(&id).await.unwrap(), waiting);
    assert_eq!(d.remove(&id).await.unwrap(), waiting, "and again");
    // Nothing was taken for gone: the instance runs, its key pair and group stay.
    assert_eq!(state_in_moto(&client, &id).await, Some(InstanceStateName::Running));
    assert_eq!(tagged_kinds(&client, uid).await, ["instance", "key-pair", "security-group", "volume"]);

    tokio::time::sleep(invisible.saturating_sub(launched.elapsed()) + Duration::from_millis(100)).await;
    assert_eq!(d.remove(&id).await.unwrap(), Removal::Done);
    assert_eq!(state_in_moto(&client, &id).await, Some(InstanceStateName::Terminated), "never leaked");
    assert_eq!(tagged(&client, uid).await, Vec::<String>::new());
}

#[tokio::test]
async fn a_new_group_or_key_pair_unknown_at_first_use_is_transient_and_the_retry_launches() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto);
    proxy.imitate_timing(Ec2Timing { first_use_not_found: true, ..Default::default() });
    let client = ec2(&moto).await;
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-000000000018";
    let d = driver(uid, through(&proxy, &moto));

    // The group machinist just made, unknown to AuthorizeSecurityGroupIngress.
    let error = d.create(&request()).await.unwrap_err();
    assert_eq!(error.reason(), "TransientError", "{error}");
    let text = error.to_string();
    assert!(text.starts_with("EC2 AuthorizeSecurityGroupIngress: InvalidGroup.NotFound: "), "{text}");
    assert!(text.contains("the security group machinist just created"), "{text}");
    // The key pair it just imported, unknown to RunInstances.
    let error = d.create(&request()).await.unwrap_err();
    assert_eq!(error.reason(), "TransientError", "{error}");
    let text = error.to_string();
    assert!(text.starts_with("EC2 RunInstances: InvalidKeyPair.NotFound: "), "{text}");
    assert!(text.contains("the key pair machinist just imported"), "{text}");

    let id = d.create(&request()).await.expect("the third try launches");
    assert_eq!(tagged_kinds(&client, uid).await, ["instance", "key-pair", "security-group", "volume"]);
    assert_eq!(proxy.count("DeleteKeyPair"), 0, "the same key is kept, not imported afresh");
    let groups = client.describe_security_groups().filters(uid_filter(uid)).send().await.unwrap();
    assert_eq!(groups.security_groups()[0].ip_permissions().len(), 1, "the SSH rule is there");
    assert_eq!(d.remove(&id).await.unwrap(), Removal::Done);

    // The user's own group or key pair that EC2 does not know is the user's mistake.
    // (moto checks group ids itself, but not key names: the proxy answers as EC2 does.)
    proxy.imitate_timing(Ec2Timing::default());
    proxy.fail("RunInstances", Some(1), 400, "InvalidKeyPair.NotFound", "The key pair 'ops' does not exist");
    let theirs = Amazonec2Config { key_name: Some("ops".into()), ..through(&proxy, &moto) };
    let error = driver("1f0c5c4e-7a6b-4b8e-9d51-00000000001b", theirs).create(&request()).await.unwrap_err();
    assert_eq!(field_of(&error), "spec.driver.amazonec2.keyName", "{error}");
    let theirs = Amazonec2Config { security_group_ids: vec!["sg-0badc0de".into()], ..through(&proxy, &moto) };
    let error = driver("1f0c5c4e-7a6b-4b8e-9d51-00000000001b", theirs).create(&request()).await.unwrap_err();
    assert_eq!(field_of(&error), "spec.driver.amazonec2.securityGroupIds", "{error}");
}

#[tokio::test]
async fn an_instance_profile_iam_has_not_propagated_is_waited_for_within_a_bound() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto);
    let message =
        "Value (web-role) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name";
    proxy.fail("RunInstances", None, 400, "InvalidParameterValue", message);
    let client = ec2(&moto).await;
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-000000000019";
    let config = Amazonec2Config { iam_instance_profile: Some("web-role".into()), ..through(&proxy, &moto) };

    // A Machine created just now (its profile may have been made with it).
    let fresh = MachineRef { created: Some(SystemTime::now()), ..machine(uid) };
    let error = driver_for(fresh, config.clone()).create(&request()).await.unwrap_err();
    assert_eq!(error.reason(), "TransientError", "{error}");
    let text = error.to_string();
    let minutes = IAM_PROPAGATION_WAIT.as_secs() / 60;
    assert!(
        text.starts_with(&format!(
            "waiting for the IAM instance profile web-role to propagate to EC2 (a new profile takes a while; up to \
             {minutes} min after the Machine was created): EC2 RunInstances: InvalidParameterValue: "
        )),
        "{text}"
    );
    assert!(text.contains(&format!("(request id {FAULT_REQUEST_ID})")), "{text}");

    // Past the bound, the profile is wrong.
    let old = SystemTime::now() - IAM_PROPAGATION_WAIT - Duration::from_secs(1);
    let error = driver_for(MachineRef { created: Some(old), ..machine(uid) }, config).create(&request()).await;
    let error = error.unwrap_err();
    assert_eq!(field_of(&error), "spec.driver.amazonec2.iamInstanceProfile", "{error}");
    assert!(error.to_string().contains("EC2 does not know the instance profile web-role"), "{error}");
    assert!(!tagged_kinds(&client, uid).await.contains(&"instance".to_string()));
}

#[tokio::test]
async fn changed_launch_settings_under_the_client_token_are_invalid_config_and_launch_nothing() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto);
    // What EC2 answers a RunInstances whose client token it saw with other settings.
    proxy.fail(
        "RunInstances",
        None,
        400,
        "IdempotentParameterMismatch",
        "The client token you have provided is associated with a resource that is already deleted or has \
         different parameters.",
    );
    let client = ec2(&moto).await;
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-00000000001a";
    let d = driver(uid, through(&proxy, &moto));
    let error = d.create(&request()).await.unwrap_err();
    assert_eq!(field_of(&error), "spec.driver.amazonec2", "{error}");
    assert!(!error.is_retryable(), "not retried until the spec changes");
    let text = error.to_string();
    assert!(text.contains("EC2 RunInstances: IdempotentParameterMismatch: "), "{text}");
    assert!(text.contains(&format!("client token {}", d.client_token())), "{text}");
    assert!(text.contains("revert the change, or delete and recreate the Machine"), "{text}");
    assert_eq!(proxy.count("RunInstances"), 1, "the SDK does not retry it either");
    assert!(!tagged_kinds(&client, uid).await.contains(&"instance".to_string()), "no instance");
}

#[tokio::test]
async fn throttling_is_rate_limited_after_the_sdk_retries() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto);
    proxy.fail("DescribeInstances", None, 503, "RequestLimitExceeded", "Request limit exceeded.");
    let d = driver("1f0c5c4e-7a6b-4b8e-9d51-00000000000d", through(&proxy, &moto));

    let error = d.status("i-0123456789abcdef0").await.unwrap_err();
    assert_eq!(
        error,
        DriverError::RateLimited {
            message: format!(
                "EC2 DescribeInstances: RequestLimitExceeded: Request limit exceeded (request id {FAULT_REQUEST_ID})"
            ),
            retry_after: THROTTLED_RETRY_AFTER,
        }
    );
    assert_eq!(proxy.count("DescribeInstances"), 3, "the SDK's standard retries came first");
}

#[tokio::test]
async fn insufficient_capacity_is_transient_with_a_longer_wait() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto);
    proxy.fail(
        "RunInstances",
        None,
        500,
        "InsufficientInstanceCapacity",
        "We currently do not have sufficient capacity",
    );
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-00000000000e";
    let d = driver(uid, through(&proxy, &moto));

    let error = d.create(&request()).await.unwrap_err();
    assert_eq!(error.reason(), "TransientError", "{error}");
    assert_eq!(error.retry_after(), Some(CAPACITY_RETRY_AFTER));
    assert!(
        error.to_string().contains(&format!(
            "InsufficientInstanceCapacity: We currently do not have sufficient capacity (request id {FAULT_REQUEST_ID})"
        )),
        "{error}"
    );
    assert_eq!(d.find().await.unwrap(), None, "no instance");
}

#[tokio::test]
async fn a_missing_permission_is_invalid_config_naming_the_credentials() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto);
    proxy.fail("RunInstances", None, 403, "UnauthorizedOperation", "You are not authorized to perform this operation.");
    let d = driver("1f0c5c4e-7a6b-4b8e-9d51-00000000000f", through(&proxy, &moto));

    let error = d.create(&request()).await.unwrap_err();
    assert_eq!(field_of(&error), "spec.credentialsSecretRef");
    assert!(error.to_string().contains("UnauthorizedOperation"), "{error}");
    assert!(error.is_retryable(), "fixed in the Secret or the IAM policy, not the spec: retried");
}

// SSH host keys from the console, and loopback addresses, through the same proxy.

/// What cloud-init prints on an Ubuntu AMI: each line behind `ec2: `, among boot noise.
fn cloud_init_console(fingerprints: &[&str]) -> String {
    let mut console = String::from(
        "[    0.000000] Linux version 6.8.0-1019-aws (buildd@lcy02-amd64-034)\n\
         [   12.345678] cloud-init[812]: Cloud-init v. 24.1.3 running 'modules:config'\n\
         ec2: \n\
         ec2: #############################################################\n\
         ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----\n",
    );
    for (fingerprint, kind) in fingerprints.iter().zip(["ECDSA", "ED25519", "RSA"]) {
        let bits = if kind == "RSA" { 3072 } else { 256 };
        console.push_str(&format!("ec2: {bits} {fingerprint} root@ip-172-31-5-9 ({kind})\n"));
    }
    console.push_str(
        "ec2: -----END SSH HOST KEY FINGERPRINTS-----\n\
         ec2: #############################################################\n\
         [   13.000001] cloud-init[812]: Cloud-init v. 24.1.3 finished\n",
    );
    console
}

const ECDSA: &str = "SHA256:Yx3bQm1fZ2w9kq2aB7cD8eF9gH0iJ1kL2mN3oP4qR5s";
const ED25519: &str = "SHA256:9kq2Yx3bQm1fZ2w9aB7cD8eF9gH0iJ1kL2mN3oP4qR5";
const RSA: &str = "SHA256:Qm1f+Z2w9kq2/aB7cD8eF9gH0iJ1kL2mN3oP4qR5sT6";

#[tokio::test]
async fn host_keys_are_the_fingerprints_cloud_init_printed_to_the_console() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto);
    let d = driver("1f0c5c4e-7a6b-4b8e-9d51-000000000010", through(&proxy, &moto));
    let id = d.create(&request()).await.unwrap();
    proxy.console_output(&cloud_init_console(&[ECDSA, ED25519, RSA]));

    assert_eq!(
        d.host_keys(&id).await.unwrap(),
        HostKeys::Known {
            fingerprints: vec![ECDSA.into(), ED25519.into(), RSA.into()],
            source: format!("the console output of {id}"),
        }
    );
    assert_eq!(proxy.count("DescribeInstances"), 0, "the launch time matters only without fingerprints");

    // Older cloud-init prints MD5 only: nothing to check against, and no use waiting.
    proxy.console_output(
        "ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----\n\
         ec2: 2048 3f:1a:0c:5e:9b:77:aa:12:cd:34:ef:56:78:90:ab:cd /etc/ssh/ssh_host_rsa_key.pub (RSA)\n\
         ec2: -----END SSH HOST KEY FINGERPRINTS-----\n",
    );
    match d.host_keys(&id).await.unwrap() {
        HostKeys::Unavailable(message) => assert!(message.contains("MD5"), "{message}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn a_console_without_fingerprints_is_pending_right_after_launch() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto);
    let d = driver("1f0c5c4e-7a6b-4b8e-9d51-000000000011", through(&proxy, &moto));
    let id = d.create(&request()).await.unwrap();

    // moto's console: a kernel log without cloud-init, as an instance still booting shows.
    match d.host_keys(&id).await.unwrap() {
        HostKeys::Pending(message) => {
            assert_eq!(
                message,
                format!(
                    "waiting for {id} to print its SSH host key fingerprints to its console (cloud-init), up to {} \
                     min after launch",
                    CONSOLE_HOST_KEYS_WAIT.as_secs() / 60
                )
            );
        }
        other => panic!("expected Pending, got {other:?}"),
    }
    // An empty console is no different.
    proxy.console_output("");
    assert!(matches!(d.host_keys(&id).await.unwrap(), HostKeys::Pending(_)));
}

#[tokio::test]
async fn a_console_without_fingerprints_long_after_launch_is_unavailable() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto);
    let d = driver("1f0c5c4e-7a6b-4b8e-9d51-000000000012", through(&proxy, &moto));
    let id = d.create(&request()).await.unwrap();
    // Launched long before CONSOLE_HOST_KEYS_WAIT, as far as the driver can tell.
    proxy.rewrite_launch_time("2020-01-01T00:00:00.000Z");

    match d.host_keys(&id).await.unwrap() {
        HostKeys::Unavailable(message) => {
            assert!(message.starts_with(&format!("the console output of {id} shows no SSH host key")), "{message}");
            assert!(message.contains("without cloud-init"), "{message}");
            assert!(message.ends_with("the first SSH contact is trusted"), "{message}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }

    let error = d.host_keys("i-0123456789abcdef0").await.unwrap_err();
    assert_eq!(error.reason(), "NotFound", "{error}");
    assert!(error.to_string().contains("EC2 GetConsoleOutput: InvalidInstanceID.NotFound: "), "{error}");
}

#[tokio::test]
async fn rewritten_addresses_keep_ssh_on_loopback() {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto);
    proxy.rewrite_addresses("127.0.0.1");
    let uid = "1f0c5c4e-7a6b-4b8e-9d51-000000000013";
    let id = driver(uid, through(&proxy, &moto)).create(&request()).await.unwrap();

    for private in [None, Some(true)] {
        let d = driver(uid, Amazonec2Config { use_private_address: private, ..through(&proxy, &moto) });
        let addresses = d.addresses(&id).await.unwrap();
        assert!(addresses.len() >= 2, "{addresses:?}");
        assert!(addresses.iter().all(|a| a.address == "127.0.0.1"), "{addresses:?}");
        let endpoint = d.ssh_endpoint(&id).await.unwrap().unwrap();
        assert_eq!((endpoint.host.as_str(), endpoint.port), ("127.0.0.1", 22));
    }
    // moto itself still has its own addresses: only what passes the proxy is rewritten.
    let i = instance(&ec2(&moto).await, &id).await;
    assert_ne!(i.private_ip_address(), Some("127.0.0.1"));
}
