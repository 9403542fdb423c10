//! EC2 errors as typed driver errors, with the AWS error code and request id kept in the
//! message so that a condition names exactly what AWS said.

use std::time::{Duration, SystemTime};

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::RequestId;

use crate::{CREDENTIALS_FIELD, DriverError};

/// How long to wait after EC2 throttled us (after the SDK's own retries); EC2 sends no
/// Retry-After.
pub const THROTTLED_RETRY_AFTER: Duration = Duration::from_secs(20);
/// Capacity comes back in minutes, not seconds.
pub const CAPACITY_RETRY_AFTER: Duration = Duration::from_secs(120);
/// A quota needs a person (or other instances to go away).
pub const QUOTA_RETRY_AFTER: Duration = Duration::from_secs(300);
/// How long after the controller recorded an instance id EC2 may still not show it. EC2
/// is eventually consistent: a new instance can be unknown to DescribeInstances and to
/// the calls that act on it (`InvalidInstanceID.NotFound`) for seconds, sometimes
/// minutes. Within this, such a NotFound means "not visible yet", never "gone".
pub const EVENTUAL_CONSISTENCY_GRACE: Duration = Duration::from_secs(300);
/// How long after the Machine was created an instance profile EC2 does not know may still
/// be propagating from IAM (a profile made together with the Machine); RunInstances is
/// retried meanwhile. Past it, the profile is taken to be wrong.
pub const IAM_PROPAGATION_WAIT: Duration = Duration::from_secs(120);

const THROTTLING: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "SlowDown",
];
const CAPACITY: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientCapacity",
    "InsufficientReservedInstanceCapacity",
    "InsufficientCapacityOnHost",
    "InsufficientFreeAddressesInSubnet",
    "SpotMaxPriceTooLow",
];
const QUOTA: &[&str] = &[
    "InstanceLimitExceeded",
    "VcpuLimitExceeded",
    "MaxSpotInstanceCountExceeded",
    "ResourceLimitExceeded",
    "SecurityGroupLimitExceeded",
    "RulesPerSecurityGroupLimitExceeded",
    "AddressLimitExceeded",
];
/// The credentials are missing, wrong, expired or lack a permission.
const UNAUTHORIZED: &[&str] = &[
    "AuthFailure",
    "UnauthorizedOperation",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "InvalidAccessKeyId",
    "MissingAuthenticationToken",
    "UnrecognizedClientException",
    "AccessDenied",
    "AccessDeniedException",
    "ExpiredToken",
    "RequestExpired",
    "OptInRequired",
    "Blocked",
    "PendingVerification",
];

/// What the driver knows about its calls that EC2's answer alone does not say, for
/// telling a mistake in the spec from EC2's eventual consistency.
#[derive(Clone, Debug)]
pub struct Circumstances {
    /// Where the credentials came from, for the message of an authorization failure.
    pub credentials: &'static str,
    /// The security group of the calls is the driver's own `machinist-<uid>`, just
    /// created (or found by its tag), not one the user named in `securityGroupIds`.
    pub own_security_group: bool,
    /// The key pair of the calls is the driver's own `machinist-<uid>`, just imported,
    /// not the user's `keyName`.
    pub own_key_pair: bool,
    /// When the controller recorded the instance id the calls are about.
    pub instance_recorded: Option<SystemTime>,
    /// When the Machine was created.
    pub machine_created: Option<SystemTime>,
    /// `iamInstanceProfile`, for messages.
    pub instance_profile: Option<String>,
    /// The `RunInstances` client token, for messages.
    pub client_token: String,
    pub now: SystemTime,
}

impl Circumstances {
    /// How long ago the instance id was recorded, while that is within
    /// [`EVENTUAL_CONSISTENCY_GRACE`]: a NotFound for it then means it is not visible yet.
    /// `None` without a recorded time, or past the grace.
    pub fn instance_not_visible_yet(&self) -> Option<Duration> {
        within(self.instance_recorded, self.now, EVENTUAL_CONSISTENCY_GRACE)
    }

    /// How long ago the Machine was created, while that is within [`IAM_PROPAGATION_WAIT`].
    fn iam_may_propagate(&self) -> Option<Duration> {
        within(self.machine_created, self.now, IAM_PROPAGATION_WAIT)
    }
}

/// `now - since` when it is less than `limit` (a `since` ahead of `now`, clock skew,
/// counts as just now).
fn within(since: Option<SystemTime>, now: SystemTime, limit: Duration) -> Option<Duration> {
    let age = now.duration_since(since?).unwrap_or(Duration::ZERO);
    (age < limit).then_some(age)
}

/// One failed EC2 call, as far as the driver needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsError {
    /// The EC2 action, e.g. `RunInstances`.
    pub action: &'static str,
    /// The AWS error code, e.g. `InvalidAMIID.NotFound`; `None` when no answer came.
    pub code: Option<String>,
    pub message: String,
    pub request_id: Option<String>,
}

impl AwsError {
    pub fn from_sdk<E>(action: &'static str, error: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        // The SDK reads the id from the x-amzn-RequestId header; EC2's error body has it too.
        let request_id = error.request_id().map(str::to_string).or_else(|| {
            let body = error.raw_response()?.body().bytes()?;
            let body = std::str::from_utf8(body).ok()?;
            let (_, rest) = body.split_once("<RequestID>")?;
            rest.split_once("</RequestID>").map(|(id, _)| id.trim().to_string())
        });
        match &error {
            SdkError::ServiceError(service) => AwsError {
                action,
                code: service.err().code().map(str::to_string),
                message: service.err().message().unwrap_or("no message").to_string(),
                request_id,
            },
            SdkError::TimeoutError(_) => {
                AwsError { action, code: None, message: "no answer in time".into(), request_id }
            }
            _ => AwsError { action, code: None, message: error_chain(&error), request_id },
        }
    }

    pub fn code(&self) -> &str {
        self.code.as_deref().unwrap_or("")
    }

    pub fn is(&self, code: &str) -> bool {
        self.code() == code
    }

    /// Whether EC2 says the thing asked about does not exist.
    pub fn is_not_found(&self) -> bool {
        let code = self.code();
        code.ends_with(".NotFound") || (code.ends_with(".Malformed") && code.starts_with("InvalidInstanceID"))
    }

    /// Whether EC2 does not know the instance id (now): gone, or not visible yet.
    pub fn is_instance_not_found(&self) -> bool {
        self.is("InvalidInstanceID.NotFound")
    }

    /// Whether EC2 does not know the instance profile RunInstances names: an EC2 answer
    /// (`InvalidParameterValue`: "Value (web) for parameter iamInstanceProfile.name is
    /// invalid. Invalid IAM Instance Profile name", or "... Invalid IAM Instance Profile
    /// ARN"), or IAM's `NoSuchEntity`, as some EC2-compatible APIs answer.
    fn is_unknown_instance_profile(&self) -> bool {
        self.is("NoSuchEntity")
            || (self.is("InvalidParameterValue")
                && self.message.to_ascii_lowercase().contains("invalid iam instance profile"))
    }

    /// `EC2 RunInstances: InvalidAMIID.NotFound: The image id ... (request id 1a2b...)`.
    pub fn describe(&self) -> String {
        let mut text = format!("EC2 {}: ", self.action);
        if let Some(code) = &self.code {
            text.push_str(code);
            text.push_str(": ");
        }
        text.push_str(self.message.trim_end_matches('.'));
        if let Some(id) = &self.request_id {
            text.push_str(&format!(" (request id {id})"));
        }
        text
    }

    /// The typed driver error, in view of what the driver knows about the call.
    pub fn to_driver_error(&self, circumstances: &Circumstances) -> DriverError {
        let code = self.code();
        let text = self.describe();
        let invalid = |field: &str, hint: &str| {
            let field =
                if field.starts_with("spec.") { field.to_string() } else { format!("spec.driver.amazonec2.{field}") };
            DriverError::invalid_config(field, format!("{text}{hint}"))
        };
        // EC2's eventual consistency: what the driver has just made (or the controller
        // has just recorded) may be unknown to EC2 for a while. Worth retrying.
        let not_visible_yet =
            |what: &str| DriverError::transient(format!("{text}; {what} (EC2 is eventually consistent): trying again"));
        if self.code.is_none() {
            return DriverError::transient(text);
        }
        if THROTTLING.contains(&code) {
            return DriverError::RateLimited { message: text, retry_after: THROTTLED_RETRY_AFTER };
        }
        if CAPACITY.contains(&code) {
            let message = format!("{text}; retrying later (AWS capacity changes over minutes)");
            return DriverError::Transient { message, retry_after: Some(CAPACITY_RETRY_AFTER) };
        }
        if QUOTA.contains(&code) {
            let message = format!("{text}; an account quota is used up: raise it or free some resources");
            return DriverError::Transient { message, retry_after: Some(QUOTA_RETRY_AFTER) };
        }
        if UNAUTHORIZED.contains(&code) {
            return DriverError::invalid_config(
                CREDENTIALS_FIELD,
                format!(
                    "{text}; the {} are not allowed to do this: fix them or their IAM policy",
                    circumstances.credentials
                ),
            );
        }
        if self.is_instance_not_found() {
            return match circumstances.instance_not_visible_yet() {
                Some(age) => not_visible_yet(&format!(
                    "the instance id was recorded {}s ago and a new instance may not be visible in EC2 for a while",
                    age.as_secs()
                )),
                None => DriverError::NotFound { message: text },
            };
        }
        if self.is_not_found() && code.starts_with("InvalidInstanceID") {
            return DriverError::NotFound { message: text };
        }
        if code == "IdempotentParameterMismatch" {
            return invalid(
                "spec.driver.amazonec2",
                &format!(
                    "; the launch settings changed since EC2 first saw this Machine's RunInstances (client token \
                     {}), so EC2 refuses to launch with the new ones: revert the change, or delete and recreate the \
                     Machine to launch with them",
                    circumstances.client_token
                ),
            );
        }
        if self.action == "RunInstances" && self.is_unknown_instance_profile() {
            let profile = circumstances.instance_profile.as_deref().unwrap_or("named in iamInstanceProfile");
            let minutes = IAM_PROPAGATION_WAIT.as_secs() / 60;
            return match circumstances.iam_may_propagate() {
                Some(_) => DriverError::transient(format!(
                    "waiting for the IAM instance profile {profile} to propagate to EC2 (a new profile takes a \
                     while; up to {minutes} min after the Machine was created): {text}"
                )),
                None => invalid(
                    "iamInstanceProfile",
                    &format!(
                        "; EC2 does not know the instance profile {profile}, {minutes} min after the Machine was \
                         created: check its name or ARN"
                    ),
                ),
            };
        }
        match code {
            c if c.starts_with("InvalidAMIID") => invalid("ami", ""),
            c if c.starts_with("InvalidSubnetID") || c == "InvalidSubnet" => invalid("subnetId", ""),
            "InvalidGroup.NotFound" | "InvalidGroupId.NotFound" if circumstances.own_security_group => {
                not_visible_yet("the security group machinist just created is not visible everywhere in EC2 yet")
            }
            c if c.starts_with("InvalidGroup") || c.starts_with("InvalidGroupId") => invalid("securityGroupIds", ""),
            "InvalidKeyPair.NotFound" if circumstances.own_key_pair => {
                not_visible_yet("the key pair machinist just imported is not visible everywhere in EC2 yet")
            }
            c if c.starts_with("InvalidKeyPair") => invalid("keyName", ""),
            "InvalidInstanceType" | "Unsupported" | "UnsupportedOperation" if self.action == "RunInstances" => {
                invalid("instanceType", "")
            }
            "InvalidBlockDeviceMapping" => invalid("rootVolumeSize", ""),
            "InvalidUserData.Malformed" => invalid("userData", ""),
            "NoSuchEntity" => invalid("iamInstanceProfile", ""),
            "InvalidParameterValue"
            | "InvalidParameterCombination"
            | "InvalidParameter"
            | "MissingParameter"
            | "InvalidAddress.NotFound" => {
                let lower = self.message.to_ascii_lowercase();
                let field = [
                    ("iaminstanceprofile", "iamInstanceProfile"),
                    ("instance type", "instanceType"),
                    ("instancetype", "instanceType"),
                    ("userdata", "userData"),
                    ("user data", "userData"),
                    ("subnet", "subnetId"),
                    ("volume", "rootVolumeSize"),
                    ("spot", "spot"),
                    ("tag", "tags"),
                ]
                .iter()
                .find(|(needle, _)| lower.contains(needle))
                .map_or("spec.driver.amazonec2", |(_, field)| field);
                invalid(field, "")
            }
            _ if self.is_not_found() => DriverError::NotFound { message: text },
            _ => DriverError::transient(text),
        }
    }
}

/// `dispatch failure: io error: ...: Name or service not known`: each cause once, without
/// the debug dump the SDK's own context display appends.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(error: &DriverError) -> &str {
        match error {
            DriverError::InvalidConfig { field, .. } => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    fn error(action: &'static str, code: &str, message: &str) -> AwsError {
        AwsError { action, code: Some(code.into()), message: message.into(), request_id: Some("req-1".into()) }
    }

    const NOW: Duration = Duration::from_secs(1_800_000_000);

    /// A driver with a user-supplied group and key pair, no recorded instance and no
    /// Machine creation time: EC2's answer alone decides.
    fn plain() -> Circumstances {
        Circumstances {
            credentials: "credentials in spec.credentialsSecretRef",
            own_security_group: false,
            own_key_pair: false,
            instance_recorded: None,
            machine_created: None,
            instance_profile: None,
            client_token: "machinist-uid-1".into(),
            now: SystemTime::UNIX_EPOCH + NOW,
        }
    }

    fn ago(seconds: u64) -> Option<SystemTime> {
        Some(SystemTime::UNIX_EPOCH + NOW - Duration::from_secs(seconds))
    }

    fn mapped(action: &'static str, code: &str, message: &str) -> DriverError {
        mapped_in(&plain(), action, code, message)
    }

    fn mapped_in(circumstances: &Circumstances, action: &'static str, code: &str, message: &str) -> DriverError {
        error(action, code, message).to_driver_error(circumstances)
    }

    #[test]
    fn throttling_is_rate_limited_with_the_code_and_request_id() {
        let e = mapped("DescribeInstances", "RequestLimitExceeded", "Request limit exceeded.");
        assert_eq!(
            e,
            DriverError::RateLimited {
                message: "EC2 DescribeInstances: RequestLimitExceeded: Request limit exceeded (request id req-1)"
                    .into(),
                retry_after: THROTTLED_RETRY_AFTER,
            }
        );
    }

    #[test]
    fn insufficient_capacity_is_transient_with_a_longer_wait() {
        let e = mapped("RunInstances", "InsufficientInstanceCapacity", "We currently do not have sufficient capacity");
        assert_eq!(e.reason(), "TransientError");
        assert_eq!(e.retry_after(), Some(CAPACITY_RETRY_AFTER));
        assert!(e.to_string().contains("InsufficientInstanceCapacity"), "{e}");
        let quota = mapped("RunInstances", "VcpuLimitExceeded", "You have requested more vCPU capacity");
        assert_eq!(quota.retry_after(), Some(QUOTA_RETRY_AFTER));
    }

    #[test]
    fn bad_launch_settings_are_invalid_config_naming_the_field() {
        let cases = [
            ("InvalidAMIID.NotFound", "The image id '[ami-1]' does not exist", "spec.driver.amazonec2.ami"),
            ("InvalidAMIID.Malformed", "Invalid id", "spec.driver.amazonec2.ami"),
            ("InvalidSubnetID.NotFound", "The subnet ID 'subnet-1' does not exist", "spec.driver.amazonec2.subnetId"),
            (
                "InvalidGroup.NotFound",
                "The security group 'sg-1' does not exist",
                "spec.driver.amazonec2.securityGroupIds",
            ),
            ("InvalidKeyPair.NotFound", "The key pair 'ops' does not exist", "spec.driver.amazonec2.keyName"),
            (
                "Unsupported",
                "The requested configuration is currently not supported",
                "spec.driver.amazonec2.instanceType",
            ),
            ("NoSuchEntity", "Instance profile web not found", "spec.driver.amazonec2.iamInstanceProfile"),
            (
                "InvalidParameterValue",
                "Value (web) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name",
                "spec.driver.amazonec2.iamInstanceProfile",
            ),
            (
                "InvalidParameterValue",
                "Invalid value 'x.large' for InstanceType.",
                "spec.driver.amazonec2.instanceType",
            ),
            ("InvalidParameterCombination", "Something new", "spec.driver.amazonec2"),
            ("UnauthorizedOperation", "You are not authorized to perform this operation.", "spec.credentialsSecretRef"),
            (
                "AuthFailure",
                "AWS was not able to validate the provided access credentials",
                "spec.credentialsSecretRef",
            ),
        ];
        for (code, message, field) in cases {
            match mapped("RunInstances", code, message) {
                DriverError::InvalidConfig { field: f, message: m } => {
                    assert_eq!(f, field, "{code}");
                    assert!(m.starts_with(&format!("EC2 RunInstances: {code}: ")), "{m}");
                    assert!(m.contains("(request id req-1)"), "{m}");
                }
                other => panic!("{code}: expected InvalidConfig, got {other:?}"),
            }
        }
    }

    #[test]
    fn missing_things_are_not_found_and_unknown_codes_transient() {
        assert_eq!(mapped("StopInstances", "InvalidInstanceID.NotFound", "gone").reason(), "NotFound");
        assert_eq!(mapped("StopInstances", "InvalidInstanceID.Malformed", "bad id").reason(), "NotFound");
        assert_eq!(mapped("DeleteSecurityGroup", "InvalidGroup.NotFound", "gone").reason(), "InvalidConfig");
        assert!(error("DeleteSecurityGroup", "InvalidGroup.NotFound", "gone").is_not_found());
        assert_eq!(mapped("StopInstances", "IncorrectInstanceState", "pending").reason(), "TransientError");
        assert_eq!(mapped("DescribeInstances", "InternalError", "oops").reason(), "TransientError");
        let unreachable =
            AwsError { action: "DescribeInstances", code: None, message: "dispatch failure".into(), request_id: None };
        assert_eq!(
            unreachable.to_driver_error(&plain()),
            DriverError::transient("EC2 DescribeInstances: dispatch failure")
        );
    }

    #[test]
    fn a_recently_recorded_instance_that_ec2_does_not_know_is_not_visible_yet() {
        let message = "The instance ID 'i-0abc' does not exist";
        for action in ["DescribeInstances", "StartInstances", "StopInstances", "RebootInstances", "GetConsoleOutput"] {
            let young = Circumstances { instance_recorded: ago(30), ..plain() };
            let e = mapped_in(&young, action, "InvalidInstanceID.NotFound", message);
            assert_eq!(e.reason(), "TransientError", "{action}: {e}");
            let text = e.to_string();
            assert!(text.starts_with(&format!("EC2 {action}: InvalidInstanceID.NotFound: ")), "{text}");
            assert!(text.contains("recorded 30s ago") && text.contains("eventually consistent"), "{text}");
            // Past the grace (or with no recorded time), NotFound is what it says.
            let grace = EVENTUAL_CONSISTENCY_GRACE.as_secs();
            for circumstances in [Circumstances { instance_recorded: ago(grace), ..plain() }, plain()] {
                assert_eq!(
                    mapped_in(&circumstances, action, "InvalidInstanceID.NotFound", message).reason(),
                    "NotFound"
                );
            }
        }
        // A malformed id is never a matter of time.
        let young = Circumstances { instance_recorded: ago(1), ..plain() };
        assert_eq!(mapped_in(&young, "StopInstances", "InvalidInstanceID.Malformed", "bad").reason(), "NotFound");
        // A recorded time ahead of the clock (skew) counts as just now.
        let ahead = Circumstances { instance_recorded: Some(SystemTime::UNIX_EPOCH + NOW * 2), ..plain() };
        assert_eq!(
            mapped_in(&ahead, "StopInstances", "InvalidInstanceID.NotFound", message).reason(),
            "TransientError"
        );
    }

    #[test]
    fn the_drivers_own_group_or_key_pair_not_found_is_transient_the_users_is_invalid_config() {
        let own = Circumstances { own_security_group: true, own_key_pair: true, ..plain() };
        for (action, code) in [
            ("AuthorizeSecurityGroupIngress", "InvalidGroup.NotFound"),
            ("RunInstances", "InvalidGroup.NotFound"),
            ("RunInstances", "InvalidGroupId.NotFound"),
            ("RunInstances", "InvalidKeyPair.NotFound"),
        ] {
            let e = mapped_in(&own, action, code, "does not exist");
            assert_eq!(e.reason(), "TransientError", "{action} {code}: {e}");
            assert!(e.to_string().contains("machinist just"), "{e}");
            assert!(e.is_retryable());
        }
        let theirs = [
            ("InvalidGroup.NotFound", "spec.driver.amazonec2.securityGroupIds"),
            ("InvalidKeyPair.NotFound", "spec.driver.amazonec2.keyName"),
        ];
        for (code, field) in theirs {
            assert_eq!(field_of(&mapped("RunInstances", code, "does not exist")), field);
        }
        // Only the driver's own kind: its group is no excuse for the user's key pair.
        let own_group = Circumstances { own_security_group: true, ..plain() };
        let e = mapped_in(&own_group, "RunInstances", "InvalidKeyPair.NotFound", "The key pair 'ops' does not exist");
        assert_eq!(field_of(&e), "spec.driver.amazonec2.keyName");
    }

    #[test]
    fn an_unknown_instance_profile_waits_for_iam_propagation_then_is_invalid_config() {
        let messages = [
            (
                "InvalidParameterValue",
                "Value (web) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name",
            ),
            (
                "InvalidParameterValue",
                "Value (arn:aws:iam::123456789012:instance-profile/web) for parameter iamInstanceProfile.arn is \
                 invalid. Invalid IAM Instance Profile ARN",
            ),
            ("NoSuchEntity", "Instance profile web not found"),
        ];
        for (code, message) in messages {
            let fresh = Circumstances { machine_created: ago(30), instance_profile: Some("web".into()), ..plain() };
            let e = mapped_in(&fresh, "RunInstances", code, message);
            assert_eq!(e.reason(), "TransientError", "{e}");
            assert!(e.to_string().starts_with("waiting for the IAM instance profile web to propagate to EC2"), "{e}");
            assert!(e.to_string().contains(message.trim_end_matches('.')), "{e}");
            let old = Circumstances { machine_created: ago(IAM_PROPAGATION_WAIT.as_secs()), ..fresh.clone() };
            let e = mapped_in(&old, "RunInstances", code, message);
            assert_eq!(field_of(&e), "spec.driver.amazonec2.iamInstanceProfile", "{e}");
            assert!(e.to_string().contains("EC2 does not know the instance profile web, 2 min after"), "{e}");
        }
    }

    #[test]
    fn a_changed_launch_under_the_same_client_token_is_invalid_config_saying_what_to_do() {
        let e =
            mapped("RunInstances", "IdempotentParameterMismatch", "The client token machinist-uid-1 was used before");
        assert_eq!(field_of(&e), "spec.driver.amazonec2");
        let text = e.to_string();
        assert!(text.contains("EC2 RunInstances: IdempotentParameterMismatch: "), "{text}");
        assert!(text.contains("client token machinist-uid-1"), "{text}");
        assert!(text.contains("revert the change, or delete and recreate the Machine"), "{text}");
        assert!(!e.is_retryable());
    }
}
