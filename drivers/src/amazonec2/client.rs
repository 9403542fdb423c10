//! EC2 clients: one HTTPS connection pool for every Machine, the controller's own AWS
//! identity (the default credential chain) loaded once per region, and static
//! credentials from a Machine's Secret built afresh for each reconcile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::config::{Credentials as AwsCredentials, IdentityCache, Region, SharedHttpClient};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use tokio::sync::OnceCell;

use crate::{CREDENTIALS_FIELD, Credentials, DriverError};

/// The `credentialsSecretRef` keys, named as AWS's environment variables.
pub const ACCESS_KEY_ID_KEY: &str = "AWS_ACCESS_KEY_ID";
pub const SECRET_ACCESS_KEY_KEY: &str = "AWS_SECRET_ACCESS_KEY";
pub const SESSION_TOKEN_KEY: &str = "AWS_SESSION_TOKEN";

/// Attempts per EC2 call, counting the first: the SDK's standard retry mode backs off on
/// throttling and 5xx answers before the driver sees an error.
const MAX_ATTEMPTS: u32 = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
const OPERATION_TIMEOUT: Duration = Duration::from_secs(90);

/// What every amazonec2 driver shares. Cheap to clone.
#[derive(Clone)]
pub struct Ec2Connector {
    /// Built on first use: a controller without amazonec2 Machines never pays for it.
    http: Arc<std::sync::OnceLock<SharedHttpClient>>,
    /// The default credential chain per region, loaded on first use.
    default_configs: Arc<Mutex<HashMap<String, Arc<OnceCell<SdkConfig>>>>>,
}

impl std::fmt::Debug for Ec2Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2Connector").finish_non_exhaustive()
    }
}

impl Default for Ec2Connector {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a driver's credentials come from. `Debug` shows the access key id's prefix
/// (`AKIA`: long-term, `ASIA`: temporary) and never the secret key or session token.
#[derive(Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// Access keys from the Machine's `credentialsSecretRef`.
    Secret { access_key_id: String, secret_access_key: String, session_token: Option<String> },
    /// The controller's own identity: environment, web identity (IRSA), EKS Pod Identity,
    /// instance profile.
    DefaultChain,
}

impl std::fmt::Debug for CredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialSource::Secret { access_key_id, secret_access_key: _, session_token } => {
                let prefix: String = access_key_id.chars().take(4).collect();
                f.debug_struct("Secret")
                    .field("access_key_id", &format_args!("{prefix}..."))
                    .field("secret_access_key", &format_args!("<redacted>"))
                    .field("session_token", &session_token.as_ref().map(|_| format_args!("<redacted>")))
                    .finish()
            }
            CredentialSource::DefaultChain => f.write_str("DefaultChain"),
        }
    }
}

impl CredentialSource {
    /// Reads the access keys from the Secret's contents; no Secret (or an empty one)
    /// means the default chain. Values are never put in messages.
    pub fn from_credentials(credentials: &Credentials) -> Result<Self, DriverError> {
        let map = &credentials.0;
        if map.is_empty() {
            return Ok(CredentialSource::DefaultChain);
        }
        let text = |key: &str| -> Result<Option<String>, DriverError> {
            match map.get(key) {
                None => Ok(None),
                Some(bytes) => String::from_utf8(bytes.clone())
                    .map(|s| Some(s.trim().to_string()).filter(|s| !s.is_empty()))
                    .map_err(|_| DriverError::invalid_config(CREDENTIALS_FIELD, format!("{key} is not text"))),
            }
        };
        let (Some(access_key_id), Some(secret_access_key)) = (text(ACCESS_KEY_ID_KEY)?, text(SECRET_ACCESS_KEY_KEY)?)
        else {
            let keys: Vec<&str> = map.keys().map(String::as_str).collect();
            return Err(DriverError::invalid_config(
                CREDENTIALS_FIELD,
                format!(
                    "the Secret needs {ACCESS_KEY_ID_KEY} and {SECRET_ACCESS_KEY_KEY} (and optionally \
                     {SESSION_TOKEN_KEY}); it has: {}",
                    keys.join(", ")
                ),
            ));
        };
        Ok(CredentialSource::Secret { access_key_id, secret_access_key, session_token: text(SESSION_TOKEN_KEY)? })
    }

    /// For messages: whose permissions an authorization failure is about.
    pub fn describe(&self) -> &'static str {
        match self {
            CredentialSource::Secret { .. } => "credentials in spec.credentialsSecretRef",
            CredentialSource::DefaultChain => {
                "controller's own AWS credentials (no spec.credentialsSecretRef: the default chain)"
            }
        }
    }
}

impl Ec2Connector {
    pub fn new() -> Self {
        Ec2Connector { http: Arc::default(), default_configs: Arc::default() }
    }

    fn http(&self) -> SharedHttpClient {
        self.http
            .get_or_init(|| {
                // rustls on ring, as kube and russh use: one TLS stack in the binary.
                aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https()
            })
            .clone()
    }

    /// An EC2 client for one region, endpoint and credential source.
    pub async fn client(
        &self,
        region: &str,
        endpoint_url: Option<&str>,
        source: &CredentialSource,
    ) -> aws_sdk_ec2::Client {
        let mut builder = match source {
            CredentialSource::DefaultChain => aws_sdk_ec2::config::Builder::from(&self.default_config(region).await),
            CredentialSource::Secret { access_key_id, secret_access_key, session_token } => {
                aws_sdk_ec2::config::Builder::new()
                    .behavior_version(BehaviorVersion::latest())
                    .region(Region::new(region.to_string()))
                    .http_client(self.http())
                    .credentials_provider(AwsCredentials::new(
                        access_key_id,
                        secret_access_key,
                        session_token.clone(),
                        None,
                        "machinist-credentials-secret",
                    ))
                    // Static keys need no cache, and a cache per reconcile would only grow.
                    .identity_cache(IdentityCache::no_cache())
            }
        };
        builder = builder.retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS)).timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        );
        if let Some(url) = endpoint_url {
            builder = builder.endpoint_url(url);
        }
        aws_sdk_ec2::Client::from_conf(builder.build())
    }

    async fn default_config(&self, region: &str) -> SdkConfig {
        let cell = {
            let mut configs = self.default_configs.lock().unwrap_or_else(|e| e.into_inner());
            configs.entry(region.to_string()).or_default().clone()
        };
        cell.get_or_init(|| async {
            aws_config::defaults(BehaviorVersion::latest())
                .region(Region::new(region.to_string()))
                .http_client(self.http())
                .load()
                .await
        })
        .await
        .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(pairs: &[(&str, &str)]) -> Credentials {
        Credentials(pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect())
    }

    #[test]
    fn no_secret_means_the_default_chain() {
        assert_eq!(
            CredentialSource::from_credentials(&Credentials::default()).unwrap(),
            CredentialSource::DefaultChain
        );
    }

    #[test]
    fn access_keys_come_from_the_secret() {
        let source = CredentialSource::from_credentials(&secret(&[
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE\n"),
            ("AWS_SECRET_ACCESS_KEY", "s3cret"),
            ("AWS_SESSION_TOKEN", ""),
        ]))
        .unwrap();
        assert_eq!(
            source,
            CredentialSource::Secret {
                access_key_id: "AKIDEXAMPLE".into(),
                secret_access_key: "s3cret".into(),
                session_token: None
            }
        );
    }

    #[test]
    fn debug_never_shows_the_secret_key_or_session_token() {
        let source = CredentialSource::Secret {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: Some("FwoGZXIvYXdzEXAMPLETOKEN".into()),
        };
        for text in [format!("{source:?}"), format!("{source:#?}")] {
            assert!(text.contains("AKIA..."), "{text}");
            for secret in ["wJalrXUtnFEMI", "FwoGZXIvYXdzEXAMPLETOKEN", "IOSFODNN7EXAMPLE"] {
                assert!(!text.contains(secret), "{text}");
            }
        }
        assert_eq!(format!("{:?}", CredentialSource::DefaultChain), "DefaultChain");
    }

    #[test]
    fn a_secret_without_both_keys_names_what_it_has_but_no_values() {
        let error = CredentialSource::from_credentials(&secret(&[("aws_access_key_id", "AKIDEXAMPLE")])).unwrap_err();
        let DriverError::InvalidConfig { field, message } = error else { panic!("{error:?}") };
        assert_eq!(field, "spec.credentialsSecretRef");
        assert!(message.contains("it has: aws_access_key_id"), "{message}");
        assert!(!message.contains("AKIDEXAMPLE"), "{message}");
    }
}
