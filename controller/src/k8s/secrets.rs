//! The Secrets a Machine uses, guarded as Kubernetes guards a PVC in use
//! (`kubernetes.io/pvc-protection`): each carries the finalizer
//! `machinist.dev/secret-protection` from before the first driver call that needs it until
//! no Machine in its namespace uses it. A Secret deleted meanwhile (by a user, or by the
//! namespace controller while the namespace terminates) stays, with its
//! `deletionTimestamp`, so Remove still has the credentials it needs.
//!
//! A guarded Secret also carries the label [`SECRET_GUARDED_LABEL`], and the controller
//! watches the Secrets with that label into a cache: after the first use, reconciles read
//! a Secret from there, never from the API, and a change to it brings the Machines that
//! use it back at once.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::{Api, ResourceExt};
use machinist_drivers::DriverError;
use serde_json::json;
use tracing::{debug, info, warn};

use super::machine::Context;
use crate::api::{FIELD_MANAGER, Machine, SECRET_FINALIZER, SECRET_GUARDED_LABEL, SecretUse};

/// The guarded Secrets, as the watch of [`SECRET_GUARDED_LABEL`] shows them.
pub type SecretCache = kube::runtime::reflector::Store<Secret>;

/// Per-Secret locks (keyed `namespace/name`), held while a Secret is read and guarded.
#[derive(Default)]
pub struct SecretLocks(std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>);

impl SecretLocks {
    async fn hold<T>(&self, key: String, work: impl Future<Output = T>) -> T {
        let lock = self.0.lock().expect("not poisoned").entry(key.clone()).or_default().clone();
        let result = {
            let _held = lock.lock().await;
            work.await
        };
        // The last one out removes the entry: the map holds only Secrets being read.
        let mut locks = self.0.lock().expect("not poisoned");
        if locks.get(&key).is_some_and(|l| std::sync::Arc::strong_count(l) <= 2) {
            locks.remove(&key);
        }
        result
    }
}

/// Guarded by machinist, as the finalizer and the label say.
fn is_guarded(secret: &Secret) -> bool {
    secret.finalizers().iter().any(|f| f == SECRET_FINALIZER)
        && secret.labels().get(SECRET_GUARDED_LABEL).is_some_and(|v| v == "true")
}

/// The Secret from the cache, when it is guarded there.
fn cached(ctx: &Context, ns: &str, name: &str) -> Option<Secret> {
    let cache = ctx.secret_cache.as_ref()?;
    let secret = cache.get(&kube::runtime::reflector::ObjectRef::new(name).within(ns))?;
    is_guarded(&secret).then(|| (*secret).clone())
}

/// The Secret from the cache when it is guarded there (no API read), else from the API.
pub(super) async fn fetch(
    ctx: &Context,
    secrets: &Api<Secret>,
    ns: &str,
    name: &str,
) -> Result<Option<Secret>, kube::Error> {
    match cached(ctx, ns, name) {
        Some(secret) => Ok(Some(secret)),
        None => secrets.get_opt(name).await,
    }
}

/// Reads a Secret the Machine names in `field`, and guards it first. A Secret that does
/// not exist is an invalid spec that says so (the Secret watch brings the Machine back the
/// moment it appears).
pub async fn read(
    ctx: &Context,
    machine: &Machine,
    field: &str,
    name: &str,
) -> Result<(Secret, SecretUse), DriverError> {
    let ns = machine.namespace().unwrap_or_default();
    match cached(ctx, &ns, name) {
        // The common case, a poll: no lock, no API read.
        Some(secret) => Ok(in_use(secret, field, name)),
        None => ctx.secret_locks.hold(format!("{ns}/{name}"), read_and_guard(ctx, &ns, field, name)).await,
    }
}

fn in_use(secret: Secret, field: &str, name: &str) -> (Secret, SecretUse) {
    let used = SecretUse {
        name: name.to_string(),
        field: field.to_string(),
        deletion_held: secret.metadata.deletion_timestamp.is_some(),
    };
    (secret, used)
}

async fn read_and_guard(ctx: &Context, ns: &str, field: &str, name: &str) -> Result<(Secret, SecretUse), DriverError> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret = fetch(ctx, &secrets, ns, name)
        .await
        .map_err(|e| DriverError::transient(format!("reading the Secret {ns}/{name} ({field}): {e}")))?
        .ok_or_else(|| {
            DriverError::invalid_config(
                field,
                format!("the Secret {ns}/{name} does not exist; create it, and the Machine carries on at once"),
            )
        })?;
    let secret = guard(&secrets, secret).await.map_err(|e| {
        DriverError::transient(format!("protecting the Secret {ns}/{name} ({field}) while the Machine uses it: {e}"))
    })?;
    Ok(in_use(secret, field, name))
}

/// Adds machinist's finalizer and label, unless the Secret has them, or is being deleted
/// already (Kubernetes refuses new finalizers then; it may still go).
pub(super) async fn guard(secrets: &Api<Secret>, mut secret: Secret) -> Result<Secret, kube::Error> {
    for attempt in 0..3 {
        if is_guarded(&secret) || secret.metadata.deletion_timestamp.is_some() {
            return Ok(secret);
        }
        let mut finalizers: Vec<String> =
            secret.finalizers().iter().filter(|f| *f != SECRET_FINALIZER).cloned().collect();
        finalizers.push(SECRET_FINALIZER.to_string());
        match patch_guard(secrets, &secret, finalizers, true).await {
            Ok(guarded) => {
                debug!(secret = %secret.name_any(), "protecting the Secret while a Machine uses it");
                return Ok(guarded);
            }
            // Changed since it was read (another Machine guarding the same Secret at the
            // same moment, most likely): read it again.
            Err(kube::Error::Api(e)) if attempt < 2 && (e.code == 409 || e.code == 422) => {
                secret = secrets.get(&secret.name_any()).await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(secret)
}

/// Replaces the finalizer list and sets or removes the guard label, on the condition that
/// the Secret did not change since it was read (a JSON patch `test` of its
/// resourceVersion): others' finalizers and labels are never lost.
async fn patch_guard(
    secrets: &Api<Secret>,
    secret: &Secret,
    finalizers: Vec<String>,
    guarded: bool,
) -> Result<Secret, kube::Error> {
    let mut ops = vec![
        json!({ "op": "test", "path": "/metadata/resourceVersion", "value": secret.resource_version() }),
        json!({ "op": "add", "path": "/metadata/finalizers", "value": finalizers }),
    ];
    let label_path = format!("/metadata/labels/{}", SECRET_GUARDED_LABEL.replace('~', "~0").replace('/', "~1"));
    let labelled = secret.labels().contains_key(SECRET_GUARDED_LABEL);
    match (guarded, secret.metadata.labels.is_some(), labelled) {
        (true, true, _) => ops.push(json!({ "op": "add", "path": label_path, "value": "true" })),
        (true, false, _) => {
            ops.push(json!({ "op": "add", "path": "/metadata/labels", "value": { SECRET_GUARDED_LABEL: "true" } }))
        }
        (false, _, true) => ops.push(json!({ "op": "remove", "path": label_path })),
        (false, _, false) => {}
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops)).expect("a valid JSON patch");
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.to_string()), ..Default::default() };
    secrets.patch(&secret.name_any(), &params, &Patch::<()>::Json(patch)).await
}

/// Where [`sweep`] finds the guarded Secrets no Machine seems to use.
pub enum SweepFrom<'a> {
    /// Lists every Secret's metadata (at start: Secrets guarded before the label existed).
    Api,
    /// From the caches, with no API read unless a candidate turns up.
    Caches { secrets: &'a SecretCache, machines: &'a kube::runtime::reflector::Store<DeserializeGuard<Machine>> },
}

/// Releases guarded Secrets that no Machine uses any more: what a controller stopped
/// between letting a Machine go and releasing its Secrets left behind. Run now and then.
/// A candidate is released only after a fresh list of its namespace's Machines agrees.
pub async fn sweep(client: &kube::Client, namespace: Option<&str>, from: SweepFrom<'_>) -> Result<(), kube::Error> {
    let mut guarded: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    match from {
        SweepFrom::Api => {
            let secrets: Api<Secret> = super::namespaced_or_all(client, namespace);
            for secret in secrets.list_metadata(&ListParams::default()).await?.items {
                if secret.finalizers().iter().any(|f| f == SECRET_FINALIZER) {
                    guarded.entry(secret.namespace().unwrap_or_default()).or_default().push(secret.name_any());
                }
            }
        }
        SweepFrom::Caches { secrets, machines } => {
            let machines = machines.state();
            for secret in secrets.state() {
                let (ns, name) = (secret.namespace(), secret.name_any());
                let used =
                    machines.iter().any(|m| m.0.as_ref().map_or(true, |m| m.namespace() == ns && m.uses_secret(&name)));
                if !used {
                    guarded.entry(ns.unwrap_or_default()).or_default().push(name);
                }
            }
        }
    }
    for (ns, names) in guarded {
        let machines: Api<DeserializeGuard<Machine>> = Api::namespaced(client.clone(), &ns);
        let users = machines.list(&ListParams::default()).await?.items;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        for name in names {
            let used = users.iter().any(|m| m.0.as_ref().map_or(true, |m| m.uses_secret(&name)));
            if !used {
                release(&secrets, &name).await?;
            }
        }
    }
    Ok(())
}

/// Releases each of `names` that no other Machine in `machine`'s namespace uses, once
/// `machine` no longer does (it was let go, or names other Secrets now).
///
/// Without the Machine cache, each Secret is checked against a fresh list at once. With
/// it: a Secret another Machine uses, not being deleted, stays (that one releases it when
/// it goes). Otherwise one check per Secret is scheduled a moment later, when the cache
/// has seen the Machines deleted meanwhile go: a burst of N deletions sharing a Secret
/// costs one list, not N lists of N Machines.
pub async fn release_unused(ctx: &Context, machine: &Machine, names: impl IntoIterator<Item = String>) {
    let names: Vec<String> = names.into_iter().collect();
    if names.is_empty() {
        return;
    }
    let ns = machine.namespace().unwrap_or_default();
    let Some(cache) = &ctx.machine_cache else {
        release_confirmed(&ctx.client, &ns, names).await;
        return;
    };
    let uid = machine.uid();
    for name in names {
        let live_user = cache.state().iter().any(|other| match &other.0 {
            Ok(m) => {
                m.uid() != uid
                    && m.namespace().as_deref() == Some(ns.as_str())
                    && m.uses_secret(&name)
                    && m.metadata.deletion_timestamp.is_none()
            }
            Err(_) => false,
        });
        if live_user {
            debug!(secret = %name, "another Machine uses the Secret: it stays protected");
            continue;
        }
        ctx.release_checks.schedule(
            ctx.client.clone(),
            ctx.fence.clone(),
            cache.clone(),
            ns.clone(),
            name,
            uid.clone(),
        );
    }
}

/// Secrets with a release check pending (keyed `namespace/name`), one at a time each,
/// with the UIDs of the Machines let go meanwhile (the cache may show them a while yet).
#[derive(Default)]
pub struct ReleaseChecks(
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, std::collections::HashSet<String>>>>,
);

/// How long a release check waits for the cache to see the Machines deleted meanwhile.
const RELEASE_CHECK_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

impl ReleaseChecks {
    fn schedule(
        &self,
        client: kube::Client,
        fence: crate::leader::Fence,
        machines: kube::runtime::reflector::Store<DeserializeGuard<Machine>>,
        ns: String,
        name: String,
        let_go: Option<String>,
    ) {
        let key = format!("{ns}/{name}");
        {
            let mut pending = self.0.lock().expect("not poisoned");
            let scheduled = pending.contains_key(&key);
            pending.entry(key.clone()).or_default().extend(let_go);
            if scheduled {
                return;
            }
        }
        let pending = self.0.clone();
        tokio::spawn(async move {
            tokio::time::sleep(RELEASE_CHECK_DELAY).await;
            let gone = pending.lock().expect("not poisoned").remove(&key).unwrap_or_default();
            // A Machine still using it (even one being deleted) releases it when it goes.
            let used = machines.state().iter().any(|m| match &m.0 {
                Ok(m) => {
                    m.namespace().as_deref() == Some(ns.as_str())
                        && m.uses_secret(&name)
                        && m.uid().is_none_or(|uid| !gone.contains(&uid))
                }
                Err(_) => true,
            });
            // Like every action, only while this replica leads: a deposed leader's check
            // could race the new leader guarding the Secret for a new Machine.
            if !used && fence.guard(release_confirmed(&client, &ns, vec![name.clone()])).await.is_none() {
                debug!(secret = %name, "not leading: the release check is left to the leader's sweep");
            }
        });
    }
}

/// Releases each of `names` that a fresh list of the namespace's Machines shows unused.
/// Asks the API, not the cache: of two Machines let go at once, the later one must see
/// the earlier gone, or the Secret would keep its finalizer with no Machine left to
/// remove it.
async fn release_confirmed(client: &kube::Client, ns: &str, names: Vec<String>) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let machines: Api<DeserializeGuard<Machine>> = Api::namespaced(client.clone(), ns);
    let users = match machines.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(error) => {
            warn!(%error, "could not list the Machines using Secrets; they stay protected for now");
            return;
        }
    };
    for name in names {
        // One that cannot be read may use it: keep it.
        let used = users.iter().any(|m| m.0.as_ref().map_or(true, |m| m.uses_secret(&name)));
        if used {
            debug!(secret = %name, "another Machine uses the Secret: it stays protected");
            continue;
        }
        if let Err(error) = release(&secrets, &name).await {
            warn!(secret = %name, %error, "could not release the Secret; it is released when a Machine next lets go of it");
        }
    }
}

/// Removes machinist's finalizer from the Secret, if it has it; tries twice, since the
/// Secret may change between the read and the patch.
async fn release(secrets: &Api<Secret>, name: &str) -> Result<(), kube::Error> {
    for attempt in 0..2 {
        let Some(secret) = secrets.get_opt(name).await? else { return Ok(()) };
        if !secret.finalizers().iter().any(|f| f == SECRET_FINALIZER)
            && !secret.labels().contains_key(SECRET_GUARDED_LABEL)
        {
            return Ok(());
        }
        let finalizers: Vec<String> = secret.finalizers().iter().filter(|f| *f != SECRET_FINALIZER).cloned().collect();
        match patch_guard(secrets, &secret, finalizers, false).await {
            Ok(_) => {
                info!(secret = name, "no Machine uses the Secret any more: released it");
                return Ok(());
            }
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            // The resourceVersion test failed: read it again.
            Err(kube::Error::Api(e)) if attempt == 0 && (e.code == 409 || e.code == 422) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
