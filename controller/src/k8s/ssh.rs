//! SSH for drivers that offer it: the Machine's key Secret, the readiness check with
//! host key pinning, and the provisioning run. What they conclude is folded into status
//! by the pure decision (`Outcome::SshReady`, `SshFailed`, `Provisioned`).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use machinist_drivers::ssh::{self, SshAuth, SshError, SshPrivateKey, SshTarget};
use machinist_drivers::{Driver, DriverError, HostKeys};

use super::machine::Context;
use crate::api::{FIELD_MANAGER, Machine, SECRET_FINALIZER, SECRET_GUARDED_LABEL, SecretUse, machine_labels};
use crate::reconcile::{self, HostKeyTrust, Outcome, SshFailure};

/// How long each SSH step (connect, login, command) of a readiness check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a provisioning script may run.
const PROVISION_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long a driver may take to tell an instance's host keys (a console read).
const HOST_KEYS_TIMEOUT: Duration = Duration::from_secs(60);

/// The Machine's SSH key and the Secret it lives in.
pub struct MachineKey {
    pub secret_name: String,
    pub key: SshPrivateKey,
}

/// The Secret machinist generates for a Machine without `spec.ssh.keySecretRef`.
pub fn generated_secret_name(machine: &Machine) -> String {
    machine.owned_secret_name("-ssh-key")
}

/// The Machine's key: from `spec.ssh.keySecretRef` (never changed or deleted by
/// machinist), or kept in a `kubernetes.io/ssh-auth` Secret owned by the Machine (so it
/// goes when the Machine goes): the key the driver made (`from_driver`, kept up to date),
/// or an ed25519 key pair generated once.
pub async fn machine_key(
    machine: &Machine,
    ctx: &Context,
    from_driver: Option<&[u8]>,
) -> Result<(MachineKey, SecretUse), DriverError> {
    let ns = machine.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(reference) = machine.spec.ssh.as_ref().and_then(|s| s.key_secret_ref.as_ref()) {
        let field = "spec.ssh.keySecretRef";
        let (secret, used) = super::secrets::read(ctx, machine, field, &reference.name).await?;
        let key = private_key_of(&secret).map_err(|message| {
            DriverError::invalid_config(field, format!("Secret {ns}/{}: {message}", reference.name))
        })?;
        return Ok((MachineKey { secret_name: reference.name.clone(), key }, used));
    }

    let name = generated_secret_name(machine);
    let uid = machine.uid().unwrap_or_default();
    let existing = super::secrets::fetch(ctx, &secrets, &ns, &name)
        .await
        .map_err(|e| DriverError::transient(format!("reading the SSH key Secret {ns}/{name}: {e}")))?;
    let from_driver = from_driver
        .map(|bytes| {
            let key = SshPrivateKey::from_bytes(bytes)
                .map_err(|e| DriverError::transient(format!("the SSH key the driver made: {e}")))?;
            Ok::<_, DriverError>(key_data(bytes, &key.public_key_openssh()))
        })
        .transpose()?;
    let secret = match existing {
        Some(secret) => secret,
        None => {
            let data = from_driver.clone().unwrap_or_else(|| {
                let pair = ssh::generate_ed25519(&format!("machinist:{ns}/{}", machine.name_any()));
                key_data(pair.private_openssh.expose().as_bytes(), &pair.public_openssh)
            });
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some({
                        let mut labels = machine_labels(&machine.name_any());
                        labels.insert(SECRET_GUARDED_LABEL.to_string(), "true".to_string());
                        labels
                    }),
                    owner_references: Some(vec![owner_reference(machine)]),
                    // Guarded from the start, like every Secret a Machine uses; released
                    // when the Machine is, and then garbage-collected with it.
                    finalizers: Some(vec![SECRET_FINALIZER.to_string()]),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/ssh-auth".into()),
                data: Some(data),
                ..Default::default()
            };
            match secrets
                .create(&PostParams { field_manager: Some(FIELD_MANAGER.to_string()), ..Default::default() }, &secret)
                .await
            {
                Ok(created) => created,
                // Made meanwhile (a reconcile from a stale cache): use that one.
                Err(kube::Error::Api(e)) if e.code == 409 => secrets
                    .get(&name)
                    .await
                    .map_err(|e| DriverError::transient(format!("reading the SSH key Secret {ns}/{name}: {e}")))?,
                Err(e) => {
                    return Err(DriverError::transient(format!("creating the SSH key Secret {ns}/{name}: {e}")));
                }
            }
        }
    };
    let owned = secret.owner_references().iter().any(|o| o.uid == uid);
    if !owned {
        return Err(DriverError::invalid_config(
            "spec.ssh.keySecretRef",
            format!(
                "the Secret {ns}/{name} exists and does not belong to this Machine; delete it, or name it in spec.ssh.keySecretRef to use its key"
            ),
        ));
    }
    // The driver's key changed (or the Secret predates it): the Secret follows.
    let secret = match from_driver {
        Some(data) if secret.data.as_ref().and_then(|d| d.get("ssh-privatekey")) != data.get("ssh-privatekey") => {
            let params = PatchParams { field_manager: Some(FIELD_MANAGER.to_string()), ..Default::default() };
            secrets
                .patch(&name, &params, &Patch::Merge(serde_json::json!({ "data": data })))
                .await
                .map_err(|e| DriverError::transient(format!("writing the SSH key Secret {ns}/{name}: {e}")))?
        }
        _ => secret,
    };
    // One generated before Secrets were guarded: guard it now.
    let secret = super::secrets::guard(&secrets, secret)
        .await
        .map_err(|e| DriverError::transient(format!("protecting the SSH key Secret {ns}/{name}: {e}")))?;
    let key = private_key_of(&secret)
        .map_err(|message| DriverError::transient(format!("the generated SSH key Secret {ns}/{name}: {message}")))?;
    let used = SecretUse {
        name: name.clone(),
        field: GENERATED_KEY_FIELD.to_string(),
        deletion_held: secret.metadata.deletion_timestamp.is_some(),
    };
    Ok((MachineKey { secret_name: name, key }, used))
}

/// A `kubernetes.io/ssh-auth` Secret's data.
fn key_data(private: &[u8], public: &str) -> BTreeMap<String, ByteString> {
    BTreeMap::from([
        ("ssh-privatekey".to_string(), ByteString(private.to_vec())),
        ("ssh-publickey".to_string(), ByteString(public.as_bytes().to_vec())),
    ])
}

/// How `status.secrets` names the key Secret machinist generated.
pub const GENERATED_KEY_FIELD: &str = "status.ssh.keySecretName";

fn private_key_of(secret: &Secret) -> Result<SshPrivateKey, String> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get("ssh-privatekey"))
        .map(|b| b.0.clone())
        .ok_or_else(|| "it has no ssh-privatekey".to_string())?;
    SshPrivateKey::from_bytes(&bytes).map_err(|e| e.to_string())
}

pub(super) fn owner_reference(machine: &Machine) -> OwnerReference {
    OwnerReference {
        api_version: Machine::api_version(&()).into_owned(),
        kind: Machine::kind(&()).into_owned(),
        name: machine.name_any(),
        uid: machine.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Where to reach the instance: the driver's endpoint, with `spec.ssh` overriding the
/// user and port.
async fn target(driver: &dyn Driver, id: &str, machine: &Machine) -> Result<SshTarget, SshFailure> {
    let endpoint = match driver.ssh_endpoint(id).await {
        Ok(Some(endpoint)) => endpoint,
        Ok(None) => {
            return Err(SshFailure {
                reason: "NoSSHEndpoint",
                message: "the driver reports no SSH endpoint for the instance yet".into(),
                retryable: true,
                presented_host_key: None,
            });
        }
        Err(e) => {
            return Err(SshFailure {
                reason: e.reason(),
                message: e.to_string(),
                retryable: e.is_retryable(),
                presented_host_key: None,
            });
        }
    };
    let spec = machine.spec.ssh.as_ref();
    let port = spec.and_then(|s| s.port).unwrap_or(endpoint.port);
    let user = spec.and_then(|s| s.user.clone()).unwrap_or(endpoint.user);
    Ok(SshTarget::new(endpoint.host, port, user))
}

fn failure(error: &SshError) -> SshFailure {
    let presented_host_key = match error {
        SshError::HostKeyMismatch { found, .. } => Some(found.clone()),
        _ => None,
    };
    // A refused login right after boot is often a key not installed yet: retried, with
    // its own reason, so a wrong setup still shows as AuthFailed. A host key mismatch
    // waits for the user.
    let retryable = presented_host_key.is_none();
    SshFailure { reason: error.reason(), message: error.to_string(), retryable, presented_host_key }
}

/// The host keys the first contact must see, from the driver's own source (a console),
/// and how that trust is described.
async fn first_contact_trust(driver: &dyn Driver, id: &str) -> Result<(Vec<String>, HostKeyTrust), Outcome> {
    let asked = tokio::time::timeout(HOST_KEYS_TIMEOUT, driver.host_keys(id)).await.unwrap_or_else(|_| {
        Err(DriverError::transient(format!(
            "the driver did not tell the instance's host keys within {}s",
            HOST_KEYS_TIMEOUT.as_secs()
        )))
    });
    match asked {
        Ok(HostKeys::Known { fingerprints, source }) => Ok((fingerprints, HostKeyTrust::Verified { source })),
        Ok(HostKeys::Pending(waiting)) => Err(Outcome::SshPending(waiting)),
        Ok(HostKeys::Unavailable(why)) => Ok((Vec::new(), HostKeyTrust::FirstContact { why: Some(why) })),
        Ok(HostKeys::NotOffered) => Ok((Vec::new(), HostKeyTrust::FirstContact { why: None })),
        Err(e) => Err(Outcome::SshFailed(SshFailure {
            reason: e.reason(),
            message: format!("reading the instance's SSH host keys: {e}"),
            retryable: e.is_retryable(),
            presented_host_key: None,
        })),
    }
}

/// Connects with the Machine's key and runs a no-op. Every connection is held to the
/// trusted host keys; at first contact the driver's own source of host keys verifies the
/// key, or it is trusted, and pinned.
pub async fn check(driver: &dyn Driver, id: &str, machine: &Machine, key: &MachineKey) -> Outcome {
    let target = match target(driver, id, machine).await {
        Ok(t) => t,
        Err(f) => return Outcome::SshFailed(f),
    };
    let auth = SshAuth::key(key.key.clone());
    let mut trusted = reconcile::trusted_host_keys(machine);
    let mut trust = HostKeyTrust::Pinned;
    if trusted.is_empty() {
        match first_contact_trust(driver, id).await {
            Ok((keys, how)) => (trusted, trust) = (keys, how),
            Err(outcome) => return outcome,
        }
    }
    match ssh::check_ready_within(&target, &auth, &trusted, CHECK_TIMEOUT).await {
        Ok(fingerprint) => Outcome::SshReady {
            fingerprint,
            trust,
            host: target.host.clone(),
            port: target.port,
            user: target.user.clone(),
        },
        Err(e) => Outcome::SshFailed(failure(&e)),
    }
}

/// Runs the provisioning script with `sh -s` (the script on standard input), on a host
/// that presents the pinned key.
pub async fn provision(driver: &dyn Driver, id: &str, machine: &Machine, key: &MachineKey) -> Outcome {
    let Some(script) = machine.spec.provisioning.as_ref().map(|p| p.script.clone()) else {
        return Outcome::Provisioned { exit_status: Some(0), output: String::new() };
    };
    let target = match target(driver, id, machine).await {
        Ok(t) => t,
        Err(f) => return Outcome::SshFailed(f),
    };
    let trusted = reconcile::trusted_host_keys(machine);
    if trusted.is_empty() {
        return Outcome::SshFailed(SshFailure {
            reason: "NoPinnedHostKey",
            message: "no host key is pinned yet; provisioning waits for the SSH check".into(),
            retryable: true,
            presented_host_key: None,
        });
    }
    let session = match ssh::connect(&target, &SshAuth::key(key.key.clone()), &trusted, CHECK_TIMEOUT).await {
        Ok(s) => s,
        Err(e) => return Outcome::SshFailed(failure(&e)),
    };
    let result = session.run("sh -s", Some(script.as_bytes()), PROVISION_TIMEOUT).await;
    session.close().await;
    match result {
        Ok(output) => {
            let mut text = output.stdout_text();
            text.push_str(&output.stderr_text());
            let exit_status = output.exit_signal.is_none().then_some(output.exit_status);
            Outcome::Provisioned { exit_status, output: text }
        }
        Err(e) => Outcome::SshFailed(failure(&e)),
    }
}
