//! The amazonec2 driver: an EC2 instance per Machine, on the AWS SDK for Rust.
//!
//! Create imports the Machine's SSH key as a key pair named after the Machine's UID,
//! creates a security group that lets in only SSH (unless the user names groups), then
//! calls `RunInstances` with a client token derived from the UID, so a repeated call can
//! never launch a second instance. Everything it creates is tagged with the Machine's
//! UID, name and namespace in the call that creates it, which is how `find` adopts an
//! instance and how Remove finds what to delete. Create returns as soon as EC2 assigns
//! the instance id; the controller watches it reach `running` over later reconciles.
//!
//! No call waits on EC2 beyond one round of requests: Remove terminates the instance and
//! says what it waits for ([`Removal::Waiting`]) until EC2 reports it `terminated` and
//! its security group free, and the controller calls it again.
//!
//! EC2 is eventually consistent: a new instance, security group or key pair can be
//! unknown to EC2's other calls for seconds, sometimes minutes. For an instance id the
//! controller recorded less than [`EVENTUAL_CONSISTENCY_GRACE`] ago, NotFound means "not
//! visible yet" (Status answers Starting, Remove waits, Start and friends are Transient);
//! a NotFound for a group or key pair the driver has just made is Transient too. How
//! EC2's answers are classified lives in `errors.rs`.

mod client;
mod config;
mod console;
mod errors;

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    InstanceInterruptionBehavior, InstanceMarketOptionsRequest, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceNetworkInterfaceSpecification, InstanceStateName, InstanceType,
    IpPermission, IpRange, Ipv6Range, MarketType, ResourceType, SpotInstanceType, SpotMarketOptions, Tag,
    TagSpecification, VolumeType,
};
use base64::Engine;
use tokio::sync::OnceCell;
use tracing::{info, warn};

pub use client::{ACCESS_KEY_ID_KEY, CredentialSource, Ec2Connector, SECRET_ACCESS_KEY_KEY, SESSION_TOKEN_KEY};
pub use config::{
    Amazonec2Config, DEFAULT_INSTANCE_TYPE, DEFAULT_SSH_CIDR, DEFAULT_SSH_USER, RootVolumeType, SpotConfig,
};
pub use errors::{
    AwsError, CAPACITY_RETRY_AFTER, Circumstances, EVENTUAL_CONSISTENCY_GRACE, IAM_PROPAGATION_WAIT, QUOTA_RETRY_AFTER,
    THROTTLED_RETRY_AFTER,
};

use crate::{
    Address, AddressType, CreateRequest, Credentials, Driver, DriverError, HostKeys, Instance, MachineRef, Operation,
    Removal, SshEndpoint, State,
};

/// The tag every resource machinist creates carries: the owning Machine's UID.
pub const UID_TAG: &str = "machinist.dev/machine-uid";
pub const NAME_TAG: &str = "machinist.dev/machine-name";
pub const NAMESPACE_TAG: &str = "machinist.dev/machine-namespace";
pub const SSH_PORT: u16 = 22;

/// How long after launch an instance's console may still lack cloud-init's SSH host key
/// fingerprints: EC2 posts console output in batches, minutes after boot. Past it, the
/// image is taken to have no cloud-init and the first SSH contact is trusted.
pub const CONSOLE_HOST_KEYS_WAIT: Duration = Duration::from_secs(300);
/// The states of an instance that exists for good (not shutting down or terminated).
const LIVE_STATES: [&str; 4] = ["pending", "running", "stopping", "stopped"];

/// The amazonec2 driver bound to one Machine.
pub struct Ec2Driver {
    machine: MachineRef,
    config: Amazonec2Config,
    connector: Ec2Connector,
    source: CredentialSource,
    client: OnceCell<aws_sdk_ec2::Client>,
}

impl Ec2Driver {
    /// Validates the config and the credentials, before any AWS call.
    pub fn new(
        connector: Ec2Connector,
        machine: MachineRef,
        config: Amazonec2Config,
        credentials: &Credentials,
    ) -> Result<Self, DriverError> {
        config.validate()?;
        if machine.uid.is_empty() {
            return Err(DriverError::invalid_config("metadata.uid", "the Machine has no UID yet"));
        }
        let source = CredentialSource::from_credentials(credentials)?;
        Ok(Ec2Driver { machine, config, connector, source, client: OnceCell::new() })
    }

    /// The name of the key pair and the security group machinist creates.
    pub fn resource_name(&self) -> String {
        format!("machinist-{}", self.machine.uid)
    }

    /// The `RunInstances` client token: the same for every attempt for this Machine.
    pub fn client_token(&self) -> String {
        format!("machinist-{}", self.machine.uid)
    }

    async fn ec2(&self) -> &aws_sdk_ec2::Client {
        self.client
            .get_or_init(|| {
                self.connector.client(&self.config.region, self.config.endpoint_url.as_deref(), &self.source)
            })
            .await
    }

    /// What this driver knows about its calls, for classifying EC2's errors.
    pub fn circumstances(&self) -> Circumstances {
        Circumstances {
            credentials: self.source.describe(),
            own_security_group: self.config.creates_security_group(),
            own_key_pair: self.config.imports_key_pair(),
            instance_recorded: self.machine.instance_recorded,
            machine_created: self.machine.created,
            instance_profile: self.config.iam_instance_profile.clone(),
            client_token: self.client_token(),
            now: SystemTime::now(),
        }
    }

    fn error(&self, mut error: AwsError) -> DriverError {
        if error.code.is_none() {
            // No answer from EC2: say where it was asked.
            let at = match &self.config.endpoint_url {
                Some(url) => format!("at {url}"),
                None => format!("in {}", self.config.region),
            };
            error.message = format!("no answer from EC2 {at}: {}", error.message);
        }
        error.to_driver_error(&self.circumstances())
    }

    /// Whether EC2's not knowing the instance may only mean it does not show it yet: the
    /// controller recorded its id less than [`EVENTUAL_CONSISTENCY_GRACE`] ago.
    fn may_not_be_visible_yet(&self) -> bool {
        self.circumstances().instance_not_visible_yet().is_some()
    }

    /// The error for an instance EC2 does not show: not visible yet (Transient), or gone.
    fn missing(&self, id: &str) -> DriverError {
        if let Some(age) = self.circumstances().instance_not_visible_yet() {
            return DriverError::transient(format!(
                "EC2 does not show instance {id} yet, {}s after it was recorded (EC2 is eventually consistent): \
                 trying again",
                age.as_secs()
            ));
        }
        DriverError::NotFound { message: format!("instance {id} does not exist") }
    }

    /// The machinist tags, then the user's (`Name` defaults to `<namespace>/<name>`).
    fn tags(&self) -> Vec<Tag> {
        let m = &self.machine;
        let mut tags = vec![tag(UID_TAG, &m.uid), tag(NAME_TAG, &m.name), tag(NAMESPACE_TAG, &m.namespace)];
        if !self.config.tags.contains_key("Name") {
            tags.push(tag("Name", &format!("{}/{}", m.namespace, m.name)));
        }
        tags.extend(self.config.tags.iter().map(|(k, v)| tag(k, v)));
        tags
    }

    fn tagged(&self, resource: ResourceType) -> TagSpecification {
        TagSpecification::builder().resource_type(resource).set_tags(Some(self.tags())).build()
    }

    fn uid_filter(&self) -> Filter {
        Filter::builder().name(format!("tag:{UID_TAG}")).values(&self.machine.uid).build()
    }

    /// The instance, or `None` when EC2 does not know it (any more).
    async fn describe(&self, id: &str) -> Result<Option<aws_sdk_ec2::types::Instance>, DriverError> {
        match self.ec2().await.describe_instances().instance_ids(id).send().await {
            Ok(out) => {
                Ok(out.reservations().iter().flat_map(|r| r.instances()).find(|i| i.instance_id() == Some(id)).cloned())
            }
            Err(e) => {
                let error = AwsError::from_sdk("DescribeInstances", e);
                if error.is_not_found() { Ok(None) } else { Err(self.error(error)) }
            }
        }
    }

    /// The AMI's root device name, which a root volume setting must name. An AMI EC2 does
    /// not know is InvalidConfig before anything is created.
    async fn root_device_name(&self) -> Result<Option<String>, DriverError> {
        let ami = &self.config.ami;
        let out = self
            .ec2()
            .await
            .describe_images()
            .image_ids(ami)
            .send()
            .await
            .map_err(|e| self.error(AwsError::from_sdk("DescribeImages", e)))?;
        let Some(image) = out.images().iter().find(|i| i.image_id() == Some(ami)) else {
            return Err(DriverError::invalid_config(
                "spec.driver.amazonec2.ami",
                format!(
                    "EC2 DescribeImages: the AMI {ami} does not exist in {} or is not shared with this account",
                    self.config.region
                ),
            ));
        };
        Ok(image.root_device_name().map(str::to_string))
    }

    /// The VPC of the configured subnet (`None`: the default VPC).
    async fn subnet_vpc(&self) -> Result<Option<String>, DriverError> {
        let Some(subnet) = &self.config.subnet_id else { return Ok(None) };
        let out = self
            .ec2()
            .await
            .describe_subnets()
            .subnet_ids(subnet)
            .send()
            .await
            .map_err(|e| self.error(AwsError::from_sdk("DescribeSubnets", e)))?;
        match out.subnets().iter().find(|s| s.subnet_id() == Some(subnet)).and_then(|s| s.vpc_id()) {
            Some(vpc) => Ok(Some(vpc.to_string())),
            None => Err(DriverError::invalid_config(
                "spec.driver.amazonec2.subnetId",
                format!("EC2 DescribeSubnets: the subnet {subnet} does not exist in {}", self.config.region),
            )),
        }
    }

    /// Imports the Machine's public key as the key pair `machinist-<uid>`. A key pair of
    /// that name left by an interrupted Create is ours (tagged): it is replaced, since
    /// the Machine's key may have been regenerated since and no instance uses it yet.
    async fn import_key_pair(&self, public_key: &str) -> Result<String, DriverError> {
        let name = self.resource_name();
        for attempt in 0..2 {
            let result = self
                .ec2()
                .await
                .import_key_pair()
                .key_name(&name)
                .public_key_material(aws_sdk_ec2::primitives::Blob::new(public_key.as_bytes()))
                .tag_specifications(self.tagged(ResourceType::KeyPair))
                .send()
                .await;
            match result {
                Ok(_) => {
                    info!(key_pair = name, "ec2: imported the Machine's SSH key");
                    return Ok(name);
                }
                Err(e) => {
                    let error = AwsError::from_sdk("ImportKeyPair", e);
                    if !error.is("InvalidKeyPair.Duplicate") || attempt > 0 {
                        return Err(self.error(error));
                    }
                }
            }
            let ours = self.tagged_key_pairs().await?;
            let Some((_, existing)) = ours.iter().find(|(n, _)| n == &name) else {
                return Err(DriverError::transient(format!(
                    "an EC2 key pair named {name} exists without this Machine's {UID_TAG} tag; delete it"
                )));
            };
            // The same key: kept, not replaced (a new import would make EC2 forget it
            // again for a while, and the next RunInstances would not find it).
            let body = |key: &str| key.split_whitespace().nth(1).map(str::to_string);
            if existing.as_deref().and_then(body).is_some_and(|b| Some(b) == body(public_key)) {
                info!(key_pair = name, "ec2: the Machine's SSH key is already imported");
                return Ok(name);
            }
            self.delete_key_pairs().await?;
        }
        unreachable!("the loop returns")
    }

    /// Creates the security group `machinist-<uid>` with one ingress rule: TCP `port`
    /// from each of `sshCidrs`. Finds it instead when an interrupted Create made it.
    async fn security_group(&self, vpc: Option<&str>, port: u16) -> Result<String, DriverError> {
        let name = self.resource_name();
        let m = &self.machine;
        let created = self
            .ec2()
            .await
            .create_security_group()
            .group_name(&name)
            .description(format!("machinist: SSH to Machine {}/{}", m.namespace, m.name))
            .set_vpc_id(vpc.map(str::to_string))
            .tag_specifications(self.tagged(ResourceType::SecurityGroup))
            .send()
            .await;
        let group = match created {
            Ok(out) => {
                let id = out.group_id().unwrap_or_default().to_string();
                info!(security_group = id, "ec2: created the security group");
                id
            }
            Err(e) => {
                let error = AwsError::from_sdk("CreateSecurityGroup", e);
                if !error.is("InvalidGroup.Duplicate") {
                    return Err(self.error(error));
                }
                let found = self.tagged_security_groups().await?;
                match found.into_iter().find(|(_, n)| n == &name) {
                    Some((id, _)) => id,
                    None => {
                        return Err(DriverError::transient(format!(
                            "a security group named {name} exists without this Machine's {UID_TAG} tag; delete it"
                        )));
                    }
                }
            }
        };
        let (v6, v4): (Vec<String>, Vec<String>) = self.config.ssh_cidrs().into_iter().partition(|c| c.contains(':'));
        let description = "SSH for machinist";
        let permission = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(port.into())
            .to_port(port.into())
            .set_ip_ranges(Some(
                v4.iter().map(|c| IpRange::builder().cidr_ip(c).description(description).build()).collect(),
            ))
            .set_ipv6_ranges(Some(
                v6.iter().map(|c| Ipv6Range::builder().cidr_ipv6(c).description(description).build()).collect(),
            ))
            .build();
        let authorized = self
            .ec2()
            .await
            .authorize_security_group_ingress()
            .group_id(&group)
            .ip_permissions(permission)
            .send()
            .await;
        if let Err(e) = authorized {
            let error = AwsError::from_sdk("AuthorizeSecurityGroupIngress", e);
            if !error.is("InvalidPermission.Duplicate") {
                return Err(self.error(error));
            }
        }
        Ok(group)
    }

    /// `(id, name)` of the security groups tagged with this Machine's UID.
    async fn tagged_security_groups(&self) -> Result<Vec<(String, String)>, DriverError> {
        let out = self
            .ec2()
            .await
            .describe_security_groups()
            .filters(self.uid_filter())
            .send()
            .await
            .map_err(|e| self.error(AwsError::from_sdk("DescribeSecurityGroups", e)))?;
        Ok(out
            .security_groups()
            .iter()
            .filter_map(|g| Some((g.group_id()?.to_string(), g.group_name().unwrap_or_default().to_string())))
            .collect())
    }

    /// `(name, public key)` of the key pairs tagged with this Machine's UID.
    async fn tagged_key_pairs(&self) -> Result<Vec<(String, Option<String>)>, DriverError> {
        let out = self
            .ec2()
            .await
            .describe_key_pairs()
            .filters(self.uid_filter())
            .include_public_key(true)
            .send()
            .await
            .map_err(|e| self.error(AwsError::from_sdk("DescribeKeyPairs", e)))?;
        Ok(out
            .key_pairs()
            .iter()
            .filter_map(|k| Some((k.key_name()?.to_string(), k.public_key().map(str::to_string))))
            .collect())
    }

    async fn delete_key_pairs(&self) -> Result<(), DriverError> {
        // By name: unique in a region, and understood by every EC2-compatible API.
        for (name, _) in self.tagged_key_pairs().await? {
            match self.ec2().await.delete_key_pair().key_name(&name).send().await {
                Ok(_) => info!(key_pair = name, "ec2: deleted the key pair"),
                Err(e) => {
                    let error = AwsError::from_sdk("DeleteKeyPair", e);
                    if !error.is_not_found() {
                        return Err(self.error(error));
                    }
                }
            }
        }
        Ok(())
    }

    /// Deletes the tagged security groups. One that EC2 still sees in use
    /// (`DependencyViolation`: the network interface of the instance that just ended is
    /// released a while later) is left for the next call; says what each waits for.
    async fn delete_security_groups(&self) -> Result<Vec<String>, DriverError> {
        let mut held = Vec::new();
        for (id, name) in self.tagged_security_groups().await? {
            match self.ec2().await.delete_security_group().group_id(&id).send().await {
                Ok(_) => info!(security_group = id, name, "ec2: deleted the security group"),
                Err(e) => {
                    let error = AwsError::from_sdk("DeleteSecurityGroup", e);
                    if error.is_not_found() {
                        continue;
                    }
                    if !error.is("DependencyViolation") {
                        return Err(self.error(error));
                    }
                    info!(security_group = id, "ec2: the security group is still in use");
                    held.push(format!("waiting for security group {id} to be released by {}", self.holders(&id).await));
                }
            }
        }
        Ok(held)
    }

    /// What still holds a security group, as far as EC2 shows: its network interfaces.
    async fn holders(&self, group: &str) -> String {
        let by_group = Filter::builder().name("group-id").values(group).build();
        let found = self.ec2().await.describe_network_interfaces().filters(by_group).send().await;
        let interfaces: Vec<String> = found
            .map(|out| {
                out.network_interfaces()
                    .iter()
                    .filter_map(|n| {
                        let id = n.network_interface_id()?;
                        Some(match n.attachment().and_then(|a| a.instance_id()) {
                            Some(instance) => format!("network interface {id} of {instance}"),
                            None => format!("network interface {id}"),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        if interfaces.is_empty() {
            "what EC2 still counts as using it (DependencyViolation; usually the network interface of an instance \
             that just ended)"
                .to_string()
        } else {
            interfaces.join(", ")
        }
    }

    /// Root volumes go with their instance; any other volume launched with it that is
    /// left unattached is ours too.
    async fn delete_volumes(&self) -> Result<(), DriverError> {
        let available = Filter::builder().name("status").values("available").build();
        let out = self
            .ec2()
            .await
            .describe_volumes()
            .filters(self.uid_filter())
            .filters(available)
            .send()
            .await
            .map_err(|e| self.error(AwsError::from_sdk("DescribeVolumes", e)))?;
        for volume in out.volumes().iter().filter_map(|v| v.volume_id()) {
            match self.ec2().await.delete_volume().volume_id(volume).send().await {
                Ok(_) => info!(volume, "ec2: deleted a volume left by the instance"),
                Err(e) => {
                    let error = AwsError::from_sdk("DeleteVolume", e);
                    if !error.is_not_found() {
                        return Err(self.error(error));
                    }
                }
            }
        }
        Ok(())
    }

    fn not_for_spot(&self, operation: Operation) -> Result<(), DriverError> {
        if self.config.spot.is_some() {
            return Err(DriverError::NotSupported {
                operation,
                message: "a one-time Spot instance cannot be stopped, only terminated; keep powerState: Running \
                          (or delete the Machine)"
                    .into(),
            });
        }
        Ok(())
    }

    async fn launch(
        &self,
        key_name: Option<String>,
        security_groups: Vec<String>,
        root_device: Option<String>,
    ) -> Result<String, DriverError> {
        let c = &self.config;
        let mut run = self
            .ec2()
            .await
            .run_instances()
            .image_id(&c.ami)
            .instance_type(InstanceType::from(c.instance_type()))
            .min_count(1)
            .max_count(1)
            .client_token(self.client_token())
            .set_key_name(key_name)
            .metadata_options(
                // IMDSv2 only: no credentials for a forged request from the instance.
                InstanceMetadataOptionsRequest::builder()
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .http_tokens(HttpTokensState::Required)
                    .build(),
            )
            .tag_specifications(self.tagged(ResourceType::Instance))
            .tag_specifications(self.tagged(ResourceType::Volume))
            .tag_specifications(self.tagged(ResourceType::NetworkInterface));
        run = match c.associate_public_ip {
            // A public address choice lives on the network interface, with the subnet and groups.
            Some(public) => run.network_interfaces(
                InstanceNetworkInterfaceSpecification::builder()
                    .device_index(0)
                    .associate_public_ip_address(public)
                    .set_subnet_id(c.subnet_id.clone())
                    .set_groups(Some(security_groups))
                    .delete_on_termination(true)
                    .build(),
            ),
            None => run.set_subnet_id(c.subnet_id.clone()).set_security_group_ids(Some(security_groups)),
        };
        if c.root_volume_size.is_some() || c.root_volume_type.is_some() {
            let Some(device) = root_device else {
                return Err(DriverError::invalid_config(
                    "spec.driver.amazonec2.rootVolumeSize",
                    format!("the AMI {} names no root device, so its root volume cannot be set", c.ami),
                ));
            };
            let ebs = EbsBlockDevice::builder()
                .set_volume_size(c.root_volume_size.map(|s| s as i32))
                .set_volume_type(c.root_volume_type.map(|t| VolumeType::from(t.as_str())))
                .delete_on_termination(true)
                .build();
            run = run.block_device_mappings(BlockDeviceMapping::builder().device_name(device).ebs(ebs).build());
        }
        if let Some(profile) = &c.iam_instance_profile {
            let spec = IamInstanceProfileSpecification::builder();
            let spec = if profile.starts_with("arn:") { spec.arn(profile) } else { spec.name(profile) };
            run = run.iam_instance_profile(spec.build());
        }
        if let Some(data) = &c.user_data {
            run = run.user_data(base64::engine::general_purpose::STANDARD.encode(data));
        }
        if let Some(spot) = &c.spot {
            run = run
                .instance_market_options(
                    InstanceMarketOptionsRequest::builder()
                        .market_type(MarketType::Spot)
                        .spot_options(
                            SpotMarketOptions::builder()
                                .set_max_price(spot.max_price.clone())
                                .spot_instance_type(SpotInstanceType::OneTime)
                                .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                                .build(),
                        )
                        .build(),
                )
                .tag_specifications(self.tagged(ResourceType::SpotInstancesRequest));
        }
        let out = run.send().await.map_err(|e| self.error(AwsError::from_sdk("RunInstances", e)))?;
        match out.instances().first().and_then(|i| i.instance_id()) {
            Some(id) => {
                info!(instance = id, "ec2: launched the instance");
                Ok(id.to_string())
            }
            None => Err(DriverError::transient("EC2 RunInstances answered without an instance id")),
        }
    }
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

/// EC2's instance states onto the driver's.
pub fn state_of(name: Option<&InstanceStateName>) -> State {
    match name {
        Some(InstanceStateName::Pending) => State::Starting,
        Some(InstanceStateName::Running) => State::Running,
        Some(InstanceStateName::Stopping) => State::Stopping,
        Some(InstanceStateName::Stopped) => State::Stopped,
        // Terminating cannot be undone: the instance is as good as gone.
        Some(InstanceStateName::ShuttingDown | InstanceStateName::Terminated) => State::NotFound,
        _ => State::None,
    }
}

/// GetConsoleOutput's `output`: base64 of what the instance wrote, not necessarily UTF-8.
fn decode_console(encoded: &str) -> Result<String, DriverError> {
    let compact: String = encoded.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD.decode(compact).map_err(|e| {
        DriverError::transient(format!("EC2 GetConsoleOutput answered with console output that is not base64: {e}"))
    })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The time in EC2's `User initiated (2026-12-01 11:00:00 GMT)` state transition reason.
fn user_initiated_at(reason: &str) -> Option<jiff::Timestamp> {
    let inner = reason.strip_prefix("User initiated (")?.strip_suffix(')')?;
    let (datetime, zone) = inner.rsplit_once(' ')?;
    if zone != "GMT" && zone != "UTC" {
        return None;
    }
    let civil: jiff::civil::DateTime = datetime.parse().ok()?;
    civil.to_zoned(jiff::tz::TimeZone::UTC).ok().map(|z| z.timestamp())
}

fn instance_state(instance: &aws_sdk_ec2::types::Instance) -> State {
    state_of(instance.state().and_then(|s| s.name()))
}

#[async_trait]
impl Driver for Ec2Driver {
    fn name(&self) -> &'static str {
        "amazonec2"
    }

    fn offers_ssh(&self) -> bool {
        true
    }

    async fn find(&self) -> Result<Option<Instance>, DriverError> {
        let live = Filter::builder()
            .name("instance-state-name")
            .set_values(Some(LIVE_STATES.map(String::from).to_vec()))
            .build();
        let out = self
            .ec2()
            .await
            .describe_instances()
            .filters(self.uid_filter())
            .filters(live)
            .send()
            .await
            .map_err(|e| self.error(AwsError::from_sdk("DescribeInstances", e)))?;
        let mut found: Vec<_> = out.reservations().iter().flat_map(|r| r.instances()).collect();
        // Never expected (the client token prevents it), but if so: adopt the oldest.
        found.sort_by_key(|i| i.launch_time().map(|t| (t.secs(), t.subsec_nanos())));
        if found.len() > 1 {
            let ids: Vec<_> = found.iter().filter_map(|i| i.instance_id()).collect();
            warn!(?ids, "ec2: more than one instance carries this Machine's UID tag; adopting the oldest");
        }
        Ok(found.first().and_then(|i| Some(Instance { id: i.instance_id()?.to_string(), state: instance_state(i) })))
    }

    async fn create(&self, request: &CreateRequest) -> Result<String, DriverError> {
        // Check what can be checked before creating anything.
        let root_device = self.root_device_name().await?;
        let vpc = self.subnet_vpc().await?;
        let key_name = match (&self.config.key_name, &request.ssh_public_key) {
            (Some(name), _) => Some(name.clone()),
            (None, Some(public_key)) => Some(self.import_key_pair(public_key).await?),
            (None, None) => None,
        };
        let groups = if self.config.creates_security_group() {
            vec![self.security_group(vpc.as_deref(), request.ssh_port.unwrap_or(SSH_PORT)).await?]
        } else {
            self.config.security_group_ids.clone()
        };
        self.launch(key_name, groups, root_device).await
    }

    /// Terminates the instance (always: a NotFound from DescribeInstances proves
    /// nothing), and once EC2 reports it `terminated`, deletes what was made for it.
    async fn remove(&self, id: &str) -> Result<Removal, DriverError> {
        let state = match self.ec2().await.terminate_instances().instance_ids(id).send().await {
            Ok(out) => {
                let answered = out
                    .terminating_instances()
                    .iter()
                    .find(|c| c.instance_id() == Some(id))
                    .and_then(|c| c.current_state()?.name().cloned());
                info!(instance = id, state = ?answered, "ec2: terminating the instance");
                match answered {
                    Some(InstanceStateName::Terminated) => Some(InstanceStateName::Terminated),
                    // Its answer says what the call started; the instance says where it is.
                    _ => self.describe(id).await?.and_then(|i| i.state()?.name().cloned()),
                }
            }
            Err(e) => {
                let error = AwsError::from_sdk("TerminateInstances", e);
                if !error.is_not_found() {
                    return Err(self.error(error));
                }
                if !error.is_instance_not_found() {
                    // A malformed id was never EC2's: nothing to wait for.
                    return self.remove_leftovers().await;
                }
                None
            }
        };
        match state {
            Some(InstanceStateName::Terminated) => {}
            Some(state) => return Ok(Removal::Waiting(format!("waiting for {id} to terminate ({})", state.as_str()))),
            // Unknown to EC2: gone, unless it was recorded too recently for EC2 to show it.
            None if self.may_not_be_visible_yet() => {
                return Ok(Removal::Waiting(format!(
                    "waiting for {id} to become visible in EC2 (eventual consistency)"
                )));
            }
            None => info!(instance = id, "ec2: the instance is gone"),
        }
        self.remove_leftovers().await
    }

    async fn remove_leftovers(&self) -> Result<Removal, DriverError> {
        let held = self.delete_security_groups().await?;
        self.delete_key_pairs().await?;
        self.delete_volumes().await?;
        Ok(match held.into_iter().next() {
            Some(waiting) => Removal::Waiting(waiting),
            None => Removal::Done,
        })
    }

    async fn start(&self, id: &str) -> Result<(), DriverError> {
        self.ec2()
            .await
            .start_instances()
            .instance_ids(id)
            .send()
            .await
            .map(drop)
            .map_err(|e| self.error(AwsError::from_sdk("StartInstances", e)))
    }

    async fn stop(&self, id: &str) -> Result<(), DriverError> {
        self.not_for_spot(Operation::Stop)?;
        self.ec2()
            .await
            .stop_instances()
            .instance_ids(id)
            .send()
            .await
            .map(drop)
            .map_err(|e| self.error(AwsError::from_sdk("StopInstances", e)))
    }

    async fn kill(&self, id: &str) -> Result<(), DriverError> {
        self.not_for_spot(Operation::Kill)?;
        self.ec2()
            .await
            .stop_instances()
            .instance_ids(id)
            .force(true)
            .send()
            .await
            .map(drop)
            .map_err(|e| self.error(AwsError::from_sdk("StopInstances", e)))
    }

    async fn restart(&self, id: &str) -> Result<(), DriverError> {
        self.ec2()
            .await
            .reboot_instances()
            .instance_ids(id)
            .send()
            .await
            .map(drop)
            .map_err(|e| self.error(AwsError::from_sdk("RebootInstances", e)))
    }

    /// From the launch time (a start) and the time in a `User initiated (…)` state
    /// transition reason (a stop or kill). A reboot leaves neither, so EC2 can tell only
    /// that a change happened, never that none did: never `Some(false)`, and a clock skew
    /// can only make a restart at most once, never twice.
    async fn power_changed_since(&self, id: &str, since: jiff::Timestamp) -> Result<Option<bool>, DriverError> {
        let Some(instance) = self.describe(id).await? else { return Ok(None) };
        // EC2 gives whole seconds.
        let since = since.as_second();
        let launched = instance.launch_time().is_some_and(|t| t.secs() >= since);
        let transitioned =
            instance.state_transition_reason().and_then(user_initiated_at).is_some_and(|t| t.as_second() >= since);
        Ok((launched || transitioned).then_some(true))
    }

    /// An instance EC2 does not show (yet) is Starting while its id is younger than
    /// [`EVENTUAL_CONSISTENCY_GRACE`], so a fresh Machine never looks lost.
    async fn status(&self, id: &str) -> Result<State, DriverError> {
        Ok(match self.describe(id).await? {
            Some(instance) => instance_state(&instance),
            None if self.may_not_be_visible_yet() => State::Starting,
            None => State::NotFound,
        })
    }

    async fn addresses(&self, id: &str) -> Result<Vec<Address>, DriverError> {
        let Some(instance) = self.describe(id).await? else { return Ok(Vec::new()) };
        let mut addresses = Vec::new();
        let mut push = |kind, value: Option<&str>| {
            if let Some(address) = value.filter(|v| !v.is_empty()) {
                addresses.push(Address { kind, address: address.to_string() });
            }
        };
        if self.config.use_private_address == Some(true) {
            push(AddressType::InternalIP, instance.private_ip_address());
            push(AddressType::ExternalIP, instance.public_ip_address());
        } else {
            push(AddressType::ExternalIP, instance.public_ip_address());
            push(AddressType::InternalIP, instance.private_ip_address());
        }
        push(AddressType::Hostname, instance.public_dns_name());
        push(AddressType::Hostname, instance.private_dns_name());
        Ok(addresses)
    }

    /// From the fingerprints cloud-init prints to the console at boot: the console is
    /// written by the instance and read over the EC2 API, not over the network SSH uses.
    async fn host_keys(&self, id: &str) -> Result<HostKeys, DriverError> {
        let out = self
            .ec2()
            .await
            .get_console_output()
            .instance_id(id)
            .send()
            .await
            .map_err(|e| self.error(AwsError::from_sdk("GetConsoleOutput", e)))?;
        let console = match out.output() {
            Some(encoded) => decode_console(encoded)?,
            None => String::new(),
        };
        match console::host_key_fingerprints(&console) {
            Some(fingerprints) if !fingerprints.is_empty() => {
                Ok(HostKeys::Known { fingerprints, source: format!("the console output of {id}") })
            }
            // The same cloud-init prints the same way at every boot: waiting cannot help.
            Some(_) => Ok(HostKeys::Unavailable(format!(
                "the console output of {id} shows cloud-init's SSH host key fingerprints in MD5 only, which \
                 machinist does not check against; the first SSH contact is trusted"
            ))),
            None => {
                let Some(instance) = self.describe(id).await? else { return Err(self.missing(id)) };
                let minutes = CONSOLE_HOST_KEYS_WAIT.as_secs() / 60;
                // A launch time ahead of our clock (skew) is recent; none at all (EC2
                // always sends one) counts as long ago.
                let waited = instance
                    .launch_time()
                    .and_then(|t| SystemTime::try_from(*t).ok())
                    .is_none_or(|t| SystemTime::now().duration_since(t).is_ok_and(|age| age >= CONSOLE_HOST_KEYS_WAIT));
                Ok(if waited {
                    HostKeys::Unavailable(format!(
                        "the console output of {id} shows no SSH host key fingerprints from cloud-init {minutes} min \
                         after launch (an AMI without cloud-init?), so the first SSH contact is trusted"
                    ))
                } else {
                    HostKeys::Pending(format!(
                        "waiting for {id} to print its SSH host key fingerprints to its console (cloud-init), up \
                         to {minutes} min after launch"
                    ))
                })
            }
        }
    }

    async fn ssh_endpoint(&self, id: &str) -> Result<Option<SshEndpoint>, DriverError> {
        let Some(instance) = self.describe(id).await? else { return Ok(None) };
        let public = instance.public_ip_address().filter(|a| !a.is_empty());
        let private = instance.private_ip_address().filter(|a| !a.is_empty());
        let host = if self.config.use_private_address == Some(true) { private } else { public.or(private) };
        Ok(host.map(|host| SshEndpoint {
            host: host.to_string(),
            port: SSH_PORT,
            user: self.config.ssh_user().to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_initiated_transitions_give_their_time() {
        let at = user_initiated_at("User initiated (2026-12-01 11:00:05 GMT)").unwrap();
        assert_eq!(at, "2026-12-01T11:00:05Z".parse::<jiff::Timestamp>().unwrap());
        assert!(user_initiated_at("User initiated (2026-12-01 11:00:05 UTC)").is_some());
        for other in [
            "",
            "Server.InternalError",
            "User initiated",
            "User initiated (yesterday)",
            "User initiated (2026-12-01 11:00:05 PST)",
        ] {
            assert_eq!(user_initiated_at(other), None, "{other:?}");
        }
    }

    #[test]
    fn ec2_states_map_onto_driver_states() {
        let cases = [
            (InstanceStateName::Pending, State::Starting),
            (InstanceStateName::Running, State::Running),
            (InstanceStateName::Stopping, State::Stopping),
            (InstanceStateName::Stopped, State::Stopped),
            (InstanceStateName::ShuttingDown, State::NotFound),
            (InstanceStateName::Terminated, State::NotFound),
        ];
        for (ec2, state) in cases {
            assert_eq!(state_of(Some(&ec2)), state, "{ec2:?}");
        }
        assert_eq!(state_of(None), State::None);
    }
}
