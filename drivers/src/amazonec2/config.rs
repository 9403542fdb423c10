//! The `spec.driver.amazonec2` block.

use std::collections::BTreeMap;
use std::net::IpAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::DriverError;

pub const DEFAULT_INSTANCE_TYPE: &str = "t3.micro";
pub const DEFAULT_SSH_USER: &str = "ubuntu";
pub const DEFAULT_SSH_CIDR: &str = "0.0.0.0/0";
/// AWS allows 50 tags per resource; machinist sets four of its own.
pub const MAX_USER_TAGS: usize = 46;
/// EC2 takes at most 16 KiB of user data before base64.
pub const MAX_USER_DATA_BYTES: usize = 16 * 1024;
/// Security groups per network interface (the default EC2 quota).
pub const MAX_SECURITY_GROUPS: usize = 5;

const FIELD: &str = "spec.driver.amazonec2";

/// An EC2 instance, as Docker Machine's `amazonec2` driver makes it. Create imports the
/// Machine's SSH key as a key pair and, unless `securityGroupIds` is set, creates a
/// security group that lets in only SSH from `sshCidrs`; both are tagged with the
/// Machine's UID and deleted by Remove. Credentials come from `spec.credentialsSecretRef`
/// (keys `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optional `AWS_SESSION_TOKEN`) or,
/// without one, from the controller's own AWS identity (IRSA, EKS Pod Identity, an
/// instance profile or the environment). Changes to the launch settings apply to new
/// instances only: machinist never replaces a running instance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Amazonec2Config {
    /// The AWS region, e.g. `eu-west-1`. Cannot change: the instance lives there.
    #[schemars(length(min = 1, max = 32))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self == oldSelf",
        "message": "region cannot change; create a new Machine in the other region"
    }]))]
    pub region: String,
    /// The AMI to launch, in `region` (e.g. an Ubuntu image: `ami-...`).
    #[schemars(length(min = 1, max = 64))]
    pub ami: String,
    /// The instance type (default `t3.micro`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub instance_type: Option<String>,
    /// The subnet to launch in (`subnet-...`). Default: the default VPC's default subnet.
    /// The security group machinist creates goes into this subnet's VPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub subnet_id: Option<String>,
    /// Existing security groups (`sg-...`) for the instance, instead of the one machinist
    /// creates. They must let the controller in on the SSH port; machinist never changes
    /// or deletes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5))]
    pub security_group_ids: Vec<String>,
    /// Where SSH may come from, as CIDR blocks (IPv4 or IPv6), in the security group
    /// machinist creates (default `0.0.0.0/0`: the controller must reach the instance).
    /// Not allowed with `securityGroupIds`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub ssh_cidrs: Vec<String>,
    /// The size of the root volume in GiB (1 to 16384). Default: the AMI's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16384))]
    pub root_volume_size: Option<u32>,
    /// The type of the root volume. Default: the AMI's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume_type: Option<RootVolumeType>,
    /// The IAM instance profile for the instance: its name or ARN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub iam_instance_profile: Option<String>,
    /// Whether the instance gets a public IPv4 address. Default: the subnet's setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub associate_public_ip: Option<bool>,
    /// Reach the instance over SSH at its private address even when it has a public one
    /// (the controller runs in the same VPC or a peered one). Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_private_address: Option<bool>,
    /// An existing EC2 key pair to launch with instead of importing the Machine's key.
    /// Its private key must then be in `spec.ssh.keySecretRef`. machinist never deletes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub key_name: Option<String>,
    /// The AMI's login user (default `ubuntu`); `spec.ssh.user` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub ssh_user: Option<String>,
    /// User data for cloud-init, as plain text (machinist encodes it); at most 16 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub user_data: Option<String>,
    /// Extra tags for the instance, its volumes, its key pair and its security group.
    /// Keys starting with `aws:` or `machinist.dev/` are reserved. `Name` defaults to
    /// `<namespace>/<name>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 46))]
    pub tags: BTreeMap<String, String>,
    /// Launch a one-time Spot instance. Spot instances cannot be stopped: Stop and Kill
    /// are not supported (set `powerState: Running`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot: Option<SpotConfig>,
    /// The EC2 API endpoint, for EC2-compatible APIs and emulators (`http://` or
    /// `https://`). Default: the region's AWS endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub endpoint_url: Option<String>,
}

/// Root volume types that can boot an instance without further settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RootVolumeType {
    Gp2,
    Gp3,
    Standard,
}

impl RootVolumeType {
    pub fn as_str(self) -> &'static str {
        match self {
            RootVolumeType::Gp2 => "gp2",
            RootVolumeType::Gp3 => "gp3",
            RootVolumeType::Standard => "standard",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpotConfig {
    /// The most to pay per hour, in US dollars (e.g. `"0.05"`). Default: the On-Demand price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub max_price: Option<String>,
}

impl Amazonec2Config {
    pub fn instance_type(&self) -> &str {
        self.instance_type.as_deref().unwrap_or(DEFAULT_INSTANCE_TYPE)
    }

    pub fn ssh_user(&self) -> &str {
        self.ssh_user.as_deref().unwrap_or(DEFAULT_SSH_USER)
    }

    /// The CIDRs of the security group machinist creates.
    pub fn ssh_cidrs(&self) -> Vec<String> {
        if self.ssh_cidrs.is_empty() { vec![DEFAULT_SSH_CIDR.to_string()] } else { self.ssh_cidrs.clone() }
    }

    /// Whether machinist creates (and later deletes) the instance's security group.
    pub fn creates_security_group(&self) -> bool {
        self.security_group_ids.is_empty()
    }

    /// Whether machinist imports (and later deletes) the instance's key pair.
    pub fn imports_key_pair(&self) -> bool {
        self.key_name.is_none()
    }

    /// What the schema cannot say. Errors name the field.
    pub fn validate(&self) -> Result<(), DriverError> {
        check("region", is_region(&self.region), || {
            format!("{:?} is not an AWS region (like eu-west-1 or us-gov-west-1)", self.region)
        })?;
        check("ami", is_id(&self.ami, "ami"), || format!("{:?} is not an AMI id (ami-...)", self.ami))?;
        if let Some(instance_type) = &self.instance_type {
            let valid = instance_type.split_once('.').is_some_and(|(family, size)| {
                [family, size].iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            });
            check("instanceType", valid, || format!("{instance_type:?} is not an instance type (like t3.micro)"))?;
        }
        if let Some(subnet) = &self.subnet_id {
            check("subnetId", is_id(subnet, "subnet"), || format!("{subnet:?} is not a subnet id (subnet-...)"))?;
        }
        if self.security_group_ids.len() > MAX_SECURITY_GROUPS {
            return Err(invalid("securityGroupIds", format!("at most {MAX_SECURITY_GROUPS} security groups")));
        }
        for (i, group) in self.security_group_ids.iter().enumerate() {
            check(&format!("securityGroupIds[{i}]"), is_id(group, "sg"), || {
                format!("{group:?} is not a security group id (sg-...)")
            })?;
            if self.security_group_ids[..i].contains(group) {
                return Err(invalid(&format!("securityGroupIds[{i}]"), format!("{group} is listed twice")));
            }
        }
        if !self.ssh_cidrs.is_empty() && !self.security_group_ids.is_empty() {
            return Err(invalid(
                "sshCidrs",
                "applies only to the security group machinist creates; with securityGroupIds, allow SSH in those \
                 groups instead and leave sshCidrs unset",
            ));
        }
        for (i, cidr) in self.ssh_cidrs.iter().enumerate() {
            validate_cidr(cidr).map_err(|message| invalid(&format!("sshCidrs[{i}]"), message))?;
        }
        if let Some(size) = self.root_volume_size {
            check("rootVolumeSize", (1..=16384).contains(&size), || {
                format!("{size} GiB is out of range (1 to 16384)")
            })?;
        }
        if let Some(profile) = &self.iam_instance_profile {
            let valid = if profile.starts_with("arn:") {
                profile.contains(":instance-profile/")
            } else {
                profile.len() <= 128 && profile.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
            };
            check("iamInstanceProfile", valid, || {
                format!("{profile:?} is neither an instance profile name nor an instance profile ARN")
            })?;
        }
        if let Some(key) = &self.key_name {
            check("keyName", !key.trim().is_empty() && key.len() <= 255, || format!("{key:?} is not a key pair name"))?;
        }
        if let Some(user) = &self.ssh_user {
            let valid = !user.is_empty() && !user.chars().any(|c| c.is_whitespace() || c.is_control());
            check("sshUser", valid, || format!("{user:?} is not a user name"))?;
        }
        if let Some(data) = &self.user_data
            && data.len() > MAX_USER_DATA_BYTES
        {
            return Err(invalid("userData", format!("{} bytes; EC2 takes at most 16384", data.len())));
        }
        self.validate_tags()?;
        if let Some(price) = self.spot.as_ref().and_then(|s| s.max_price.as_ref()) {
            let valid = price.split_once('.').map_or(is_digits(price), |(a, b)| is_digits(a) && is_digits(b));
            check("spot.maxPrice", valid, || format!("{price:?} is not a price in US dollars (like \"0.05\")"))?;
        }
        if let Some(url) = &self.endpoint_url {
            let valid = ["http://", "https://"].iter().any(|s| {
                url.strip_prefix(s).is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace))
            });
            check("endpointUrl", valid, || format!("{url:?} is not an http:// or https:// URL"))?;
        }
        Ok(())
    }

    fn validate_tags(&self) -> Result<(), DriverError> {
        if self.tags.len() > MAX_USER_TAGS {
            return Err(invalid("tags", format!("{} tags; at most {MAX_USER_TAGS}", self.tags.len())));
        }
        for (key, value) in &self.tags {
            let field = format!("tags[{key}]");
            if key.is_empty() || key.chars().count() > 128 {
                return Err(invalid(&field, "a tag key has 1 to 128 characters"));
            }
            if key.to_ascii_lowercase().starts_with("aws:") || key.starts_with("machinist.dev/") {
                return Err(invalid(&field, "keys starting with aws: or machinist.dev/ are reserved"));
            }
            if value.chars().count() > 256 {
                return Err(invalid(&field, "a tag value has at most 256 characters"));
            }
        }
        Ok(())
    }
}

fn invalid(field: &str, message: impl Into<String>) -> DriverError {
    DriverError::invalid_config(format!("{FIELD}.{field}"), message)
}

fn check(field: &str, valid: bool, message: impl FnOnce() -> String) -> Result<(), DriverError> {
    if valid { Ok(()) } else { Err(invalid(field, message())) }
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_digit())
}

/// `eu-west-1`, `us-gov-west-1`, `ap-southeast-5`, `cn-north-1`.
fn is_region(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    parts.len() >= 3
        && parts[0].len() == 2
        && parts[..parts.len() - 1].iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase()))
        && is_digits(parts[parts.len() - 1])
}

/// `ami-0123abcd`, `subnet-0123456789abcdef0`: 8 or 17 hex digits after the prefix.
fn is_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')).is_some_and(|hex| {
        (8..=17).contains(&hex.len()) && hex.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

fn validate_cidr(cidr: &str) -> Result<(), String> {
    let Some((address, prefix)) = cidr.split_once('/') else {
        return Err(format!("{cidr:?} is not a CIDR block (like 203.0.113.0/24 or 2001:db8::/32)"));
    };
    let address: IpAddr = address.parse().map_err(|_| format!("{cidr:?}: {address:?} is not an IP address"))?;
    let bits = if address.is_ipv4() { 32 } else { 128 };
    let prefix: u32 =
        prefix.parse().ok().filter(|p| *p <= bits).ok_or_else(|| format!("{cidr:?}: the prefix is 0 to {bits}"))?;
    let value = match address {
        IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
        IpAddr::V6(a) => u128::from(a),
    };
    let host_bits = value.checked_shl(prefix).unwrap_or(0);
    if host_bits != 0 {
        let network = if prefix == 0 { 0 } else { value >> (128 - prefix) << (128 - prefix) };
        let network = match address {
            IpAddr::V4(_) => IpAddr::from(((network >> 96) as u32).to_be_bytes()),
            IpAddr::V6(_) => IpAddr::from(network.to_be_bytes()),
        };
        return Err(format!("{cidr:?} has host bits set; did you mean {network}/{prefix}?"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Amazonec2Config {
        Amazonec2Config { region: "eu-west-1".into(), ami: "ami-0123456789abcdef0".into(), ..Default::default() }
    }

    fn field_of(config: Amazonec2Config) -> String {
        match config.validate() {
            Err(DriverError::InvalidConfig { field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn a_minimal_config_is_valid_with_docker_machine_defaults() {
        let config = valid();
        config.validate().unwrap();
        assert_eq!(config.instance_type(), "t3.micro");
        assert_eq!(config.ssh_user(), "ubuntu");
        assert_eq!(config.ssh_cidrs(), ["0.0.0.0/0"]);
        assert!(config.creates_security_group() && config.imports_key_pair());
    }

    #[test]
    fn a_full_config_is_valid() {
        let config = Amazonec2Config {
            region: "us-gov-west-1".into(),
            instance_type: Some("u-6tb1.metal".into()),
            subnet_id: Some("subnet-0a1b2c3d".into()),
            ssh_cidrs: vec!["203.0.113.0/24".into(), "2001:db8::/32".into(), "198.51.100.7/32".into()],
            root_volume_size: Some(40),
            root_volume_type: Some(RootVolumeType::Gp3),
            iam_instance_profile: Some("arn:aws:iam::123456789012:instance-profile/web".into()),
            associate_public_ip: Some(true),
            key_name: Some("ops".into()),
            ssh_user: Some("ec2-user".into()),
            user_data: Some("#cloud-config\n".into()),
            tags: [("team".to_string(), "platform".to_string())].into(),
            spot: Some(SpotConfig { max_price: Some("0.05".into()) }),
            endpoint_url: Some("http://127.0.0.1:5000".into()),
            ..valid()
        };
        config.validate().unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(Amazonec2Config, &str)> = vec![
            (Amazonec2Config { region: "Europe".into(), ..valid() }, "region"),
            (Amazonec2Config { region: "eu-west".into(), ..valid() }, "region"),
            (Amazonec2Config { ami: "ubuntu".into(), ..valid() }, "ami"),
            (Amazonec2Config { instance_type: Some("large".into()), ..valid() }, "instanceType"),
            (Amazonec2Config { subnet_id: Some("subnet-xyz".into()), ..valid() }, "subnetId"),
            (
                Amazonec2Config { security_group_ids: vec!["sg-0a1b2c3d".into(), "default".into()], ..valid() },
                "securityGroupIds[1]",
            ),
            (Amazonec2Config { security_group_ids: vec!["sg-0a1b2c3d".into(); 2], ..valid() }, "securityGroupIds[1]"),
            (Amazonec2Config { ssh_cidrs: vec!["10.0.0.0/8".into(), "10.0.0.1".into()], ..valid() }, "sshCidrs[1]"),
            (Amazonec2Config { ssh_cidrs: vec!["10.0.0.0/33".into()], ..valid() }, "sshCidrs[0]"),
            (Amazonec2Config { root_volume_size: Some(0), ..valid() }, "rootVolumeSize"),
            (Amazonec2Config { iam_instance_profile: Some("my role".into()), ..valid() }, "iamInstanceProfile"),
            (Amazonec2Config { ssh_user: Some("a b".into()), ..valid() }, "sshUser"),
            (Amazonec2Config { user_data: Some("x".repeat(16 * 1024 + 1)), ..valid() }, "userData"),
            (Amazonec2Config { tags: [("aws:x".into(), "y".into())].into(), ..valid() }, "tags[aws:x]"),
            (
                Amazonec2Config { tags: [("machinist.dev/machine-uid".into(), "y".into())].into(), ..valid() },
                "tags[machinist.dev/machine-uid]",
            ),
            (Amazonec2Config { spot: Some(SpotConfig { max_price: Some("$1".into()) }), ..valid() }, "spot.maxPrice"),
            (Amazonec2Config { endpoint_url: Some("localhost:5000".into()), ..valid() }, "endpointUrl"),
        ];
        for (config, field) in cases {
            assert_eq!(field_of(config), format!("spec.driver.amazonec2.{field}"));
        }
    }

    #[test]
    fn ssh_cidrs_with_own_security_groups_is_an_invalid_combination() {
        let config = Amazonec2Config {
            security_group_ids: vec!["sg-0a1b2c3d".into()],
            ssh_cidrs: vec!["10.0.0.0/8".into()],
            ..valid()
        };
        assert_eq!(field_of(config), "spec.driver.amazonec2.sshCidrs");
    }

    #[test]
    fn a_cidr_with_host_bits_suggests_the_network() {
        assert_eq!(
            validate_cidr("10.1.2.3/8").unwrap_err(),
            "\"10.1.2.3/8\" has host bits set; did you mean 10.0.0.0/8?"
        );
        assert_eq!(
            validate_cidr("2001:db8::1/32").unwrap_err(),
            "\"2001:db8::1/32\" has host bits set; did you mean 2001:db8::/32?"
        );
        for ok in ["0.0.0.0/0", "::/0", "192.0.2.1/32", "2001:db8::1/128"] {
            validate_cidr(ok).unwrap();
        }
    }
}
