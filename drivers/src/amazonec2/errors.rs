//! EC2 errors as typed driver errors, with the AWS error code and request id kept in the
//! message so that a condition names exactly what AWS said.

use std::time::Duration;

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

    /// The typed driver error. `credentials` says where the credentials came from, for
    /// the message of an authorization failure.
    pub fn to_driver_error(&self, credentials: &str) -> DriverError {
        let code = self.code();
        let text = self.describe();
        let invalid = |field: &str, hint: &str| {
            let field =
                if field.starts_with("spec.") { field.to_string() } else { format!("spec.driver.amazonec2.{field}") };
            DriverError::invalid_config(field, format!("{text}{hint}"))
        };
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
                format!("{text}; the {credentials} are not allowed to do this: fix them or their IAM policy"),
            );
        }
        if self.is_not_found() && code.starts_with("InvalidInstanceID") {
            return DriverError::NotFound { message: text };
        }
        match code {
            c if c.starts_with("InvalidAMIID") => invalid("ami", ""),
            c if c.starts_with("InvalidSubnetID") || c == "InvalidSubnet" => invalid("subnetId", ""),
            c if c.starts_with("InvalidGroup") || c.starts_with("InvalidGroupId") => invalid("securityGroupIds", ""),
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

    fn error(action: &'static str, code: &str, message: &str) -> AwsError {
        AwsError { action, code: Some(code.into()), message: message.into(), request_id: Some("req-1".into()) }
    }

    fn mapped(action: &'static str, code: &str, message: &str) -> DriverError {
        error(action, code, message).to_driver_error("credentials of spec.credentialsSecretRef")
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
        assert_eq!(unreachable.to_driver_error("x"), DriverError::transient("EC2 DescribeInstances: dispatch failure"));
    }
}
