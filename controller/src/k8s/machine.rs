//! One reconcile of one Machine: finalizer first, then observe → decide → act → record.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Api, Client, Resource, ResourceExt};
use machinist_drivers::{
    CREDENTIALS_FIELD, CreateRequest, Credentials, Driver, DriverError, Drivers, MachineRef, Operation, Removal,
};
use tracing::{debug, info, instrument, warn};

use super::events::EventNote;
use super::patch_status;
use super::status::Freshness;
use crate::api::{ACCEPT_HOST_KEY_ANNOTATION, FIELD_MANAGER, FINALIZER, Machine, MachineStatus, SecretUse};
use crate::reconcile::{self, CleanupNext, Input, Note, Observed, Outcome, Planned, Settings, Step, whole_seconds};

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub drivers: Drivers,
    pub events: super::events::EventPublisher,
    pub settings: Settings,
    /// The longest any single driver call may take before it counts as a transient failure.
    pub driver_call_timeout: Duration,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Statuses written but maybe not yet in the watch cache.
    pub written: super::status::WrittenStatuses,
    /// Consecutive Kubernetes API failures per Machine (by uid), for their backoff.
    pub api_failures: ApiFailures,
    /// Closed while this replica may not act (a leader past its renew deadline).
    pub fence: crate::leader::Fence,
    /// The guarded Secrets, watched; `None`: every read goes to the API.
    pub secret_cache: Option<super::secrets::SecretCache>,
    /// One reconcile at a time reads and guards a given Secret, so Machines that share
    /// one do not race to guard it (a conflict, and a wasted write, each).
    pub secret_locks: super::secrets::SecretLocks,
    /// The controller's Machine cache, for what uses a Secret; `None`: ask the API.
    pub machine_cache: Option<kube::runtime::reflector::Store<DeserializeGuard<Machine>>>,
    pub release_checks: super::secrets::ReleaseChecks,
    /// Secret changes seen by the watches that wake Machines (see `WrittenStatuses`).
    pub secret_changes: Arc<std::sync::atomic::AtomicU64>,
}

/// Consecutive reconciles of a Machine that failed on the Kubernetes API, so they back
/// off like driver errors (exponential, capped, with jitter) instead of hammering a
/// struggling API server every few seconds. An entry goes at the next success.
#[derive(Default)]
pub struct ApiFailures(std::sync::Mutex<std::collections::HashMap<String, u32>>);

impl ApiFailures {
    fn failed(&self, uid: &str) -> u32 {
        let mut counts = self.0.lock().expect("not poisoned");
        let count = counts.entry(uid.to_string()).or_default();
        *count = count.saturating_add(1);
        *count
    }

    fn succeeded(&self, uid: &str) {
        self.0.lock().expect("not poisoned").remove(uid);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Adding or removing the Machine's finalizer failed.
    #[error("the finalizer {FINALIZER}: {0}")]
    Finalizer(#[source] kube::Error),
    /// Deletion is waiting (for a retry of Remove, or for the Machine to change).
    #[error("deletion waits: {reason}")]
    DeletionWaits { reason: String, retry: Option<Duration> },
    #[error("the object cannot be read as a Machine: {0}")]
    InvalidObject(String),
}

impl Error {
    /// A stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeError",
            Error::Finalizer(_) => "FinalizerError",
            Error::DeletionWaits { .. } => "DeletionWaits",
            Error::InvalidObject(_) => "InvalidObject",
        }
    }

    fn retry(&self) -> Option<Option<Duration>> {
        match self {
            Error::DeletionWaits { retry, .. } => Some(*retry),
            Error::InvalidObject(_) => Some(None),
            Error::Kube(_) | Error::Finalizer(_) => None,
        }
    }

    /// Whether this is an expected wait rather than a fault worth a warning in the log.
    pub fn is_wait(&self) -> bool {
        self.metric_label() == "DeletionWaits"
    }
}

/// The controller's reconcile function.
#[instrument(skip_all, fields(machine = %obj_name(&obj), namespace = obj_namespace(&obj)))]
pub async fn reconcile(obj: Arc<DeserializeGuard<Machine>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let secret_changes = ctx.secret_changes.load(std::sync::atomic::Ordering::SeqCst);
    let machine = match &obj.0 {
        Ok(machine) => match ctx.written.freshness(machine, secret_changes) {
            // The watch has not delivered our last status write yet: it is on its way
            // and wakes this Machine again; deciding now would be from an older status.
            Freshness::Behind => return Ok(Action::requeue(Duration::from_millis(500))),
            // What the last reconcile settled on and nothing since: no need to ask the
            // provider again before the requeue it asked for.
            Freshness::Echo(requeue_in) => return Ok(Action::requeue(requeue_in)),
            Freshness::Current => Arc::new(machine.clone()),
        },
        Err(invalid) => return Err(report_invalid_object(invalid, &ctx).await),
    };
    let ns = machine.namespace().unwrap_or_default();
    let uid = machine.uid().unwrap_or_default();
    let api: Api<Machine> = Api::namespaced(ctx.client.clone(), &ns);
    let deleting = machine.metadata.deletion_timestamp.is_some();
    let ours = machine.finalizers().iter().any(|f| f == FINALIZER);
    let result = match (deleting, ours) {
        // The finalizer is on the object before the first driver call; its watch event
        // brings the reconcile that goes on.
        (false, false) => super::finalizer::add(&api, &machine, &ctx.written).await.map(|()| Action::await_change()),
        (false, true) => apply(&api, &machine, &ctx).await.map(|requeue_after| {
            // Settled: the echo of its last write needs no reconcile of its own.
            if let Some(after) = requeue_after.filter(|after| *after > ctx.settings.progress_interval) {
                ctx.written.settle(&machine, after, ctx.settings.progress_interval, secret_changes);
            }
            requeue(requeue_after)
        }),
        (true, true) => match cleanup(&api, &machine, &ctx).await {
            Ok(action) => match super::finalizer::remove(&api, &machine).await {
                // Only once the Machine is let go: its Secrets, unless another uses them.
                Ok(true) => {
                    release_all(&ctx, &machine).await;
                    Ok(action)
                }
                Ok(false) => Ok(Action::await_change()),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        (true, false) => Ok(Action::await_change()),
    };
    if result.is_ok() {
        ctx.api_failures.succeeded(&uid);
    }
    result
}

/// Requeue after an error: the delay the decision asked for, or, for a Kubernetes API
/// failure, a backoff over the Machine's consecutive API failures.
pub fn error_policy(obj: Arc<DeserializeGuard<Machine>>, error: &Error, ctx: Arc<Context>) -> Action {
    match error.retry() {
        Some(Some(delay)) => Action::requeue(delay),
        Some(None) => Action::await_change(),
        None => {
            let uid = match &obj.0 {
                Ok(m) => m.uid(),
                Err(invalid) => invalid.metadata.uid.clone(),
            };
            let failures = ctx.api_failures.failed(&uid.unwrap_or_default());
            Action::requeue(reconcile::backoff_delay(&ctx.settings, failures, None, rand::random()))
        }
    }
}

fn obj_name(obj: &DeserializeGuard<Machine>) -> String {
    match &obj.0 {
        Ok(m) => m.name_any(),
        Err(e) => e.metadata.name.clone().unwrap_or_default(),
    }
}

fn obj_namespace(obj: &DeserializeGuard<Machine>) -> String {
    match &obj.0 {
        Ok(m) => m.namespace().unwrap_or_default(),
        Err(e) => e.metadata.namespace.clone().unwrap_or_default(),
    }
}

/// A Machine that does not even parse cannot be reconciled; say so on the object and
/// carry on with the others.
async fn report_invalid_object(invalid: &kube::core::error_boundary::InvalidObject, ctx: &Context) -> Error {
    let meta = &invalid.metadata;
    warn!(error = %invalid.error, "skipping a Machine that cannot be parsed");
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("machinist.dev/v1alpha1".into()),
        kind: Some("Machine".into()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..Default::default()
    };
    let note = truncate(&format!("cannot read this Machine: {}", invalid.error), 1024);
    let event = EventNote { warning: true, reason: "InvalidObject", action: "Validate", note: &note };
    if let Err(e) = ctx.events.publish(&reference, &event).await {
        warn!(error = %e, "publishing an Event failed");
    }
    Error::InvalidObject(invalid.error.clone())
}

fn now() -> Timestamp {
    whole_seconds(Timestamp::now())
}

fn machine_ref(machine: &Machine) -> MachineRef {
    MachineRef {
        uid: machine.uid().unwrap_or_default(),
        name: machine.name_any(),
        namespace: machine.namespace().unwrap_or_default(),
        instance_recorded: reconcile::instance_recorded(machine).map(std::time::SystemTime::from),
        created: machine.metadata.creation_timestamp.as_ref().map(|t| std::time::SystemTime::from(t.0)),
        trusted_host_keys: reconcile::trusted_host_keys(machine),
    }
}

/// Removes the accept annotation once its key is pinned: it accepted exactly one key and
/// must not accept a later one.
async fn consume_accept_annotation(api: &Api<Machine>, machine: &Machine, status: &MachineStatus) -> Result<(), Error> {
    if !reconcile::accept_annotation_consumed(machine, machine.status.as_ref(), status) {
        return Ok(());
    }
    let patch = serde_json::json!({ "metadata": { "annotations": { ACCEPT_HOST_KEY_ANNOTATION: null } } });
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.to_string()), ..Default::default() };
    match api.patch(&machine.name_any(), &params, &Patch::Merge(&patch)).await {
        Ok(_) => {
            info!("the accepted host key is pinned; removed the {ACCEPT_HOST_KEY_ANNOTATION} annotation");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Reconciles a Machine that is not being deleted; returns when to come back (`None`:
/// on its next change).
async fn apply(api: &Api<Machine>, machine: &Machine, ctx: &Context) -> Result<Option<Duration>, Error> {
    let (driver, mut observed, mut secrets) =
        if machine.is_paused() { (None, Observed::NoInstance, None) } else { observe(machine, ctx).await? };
    // A restart whose result was never recorded: did it happen? (Exactly once where the
    // driver can tell.)
    let mut power_changed_since_intent = None;
    if let (Some(since), Some(d), Observed::Instance { id, .. }) =
        (reconcile::restart_intent_since(machine), driver.as_ref(), &observed)
    {
        match call(ctx, d.as_ref(), Operation::Status, d.power_changed_since(id, since)).await {
            Ok(answer) => power_changed_since_intent = answer,
            Err(error) => observed = Observed::Failed(error),
        }
    }
    let offers_ssh = driver.as_ref().is_some_and(|d| d.offers_ssh());
    // The Machine's SSH key exists before anything is created with it; a driver that
    // makes its own (Docker Machine plugins) gives it once the instance exists.
    let mut key = None;
    let from_driver = driver.as_ref().filter(|d| d.makes_own_ssh_key()).is_some()
        && machine.spec.ssh.as_ref().is_none_or(|s| s.key_secret_ref.is_none());
    let mut own_key = None;
    if let (true, Some(d), Observed::Instance { id, .. }) = (from_driver && offers_ssh, &driver, &observed) {
        match call(ctx, d.as_ref(), Operation::Status, d.own_ssh_key(id)).await {
            Ok(k) => own_key = k,
            Err(error) => observed = Observed::Failed(error),
        }
    }
    if offers_ssh && !matches!(observed, Observed::InvalidSpec(_)) && (!from_driver || own_key.is_some()) {
        match super::ssh::machine_key(machine, ctx, own_key.as_deref().map(Vec::as_slice)).await {
            Ok((k, used)) => {
                key = Some(k);
                if let Some(secrets) = secrets.as_mut() {
                    secrets.push(used);
                }
            }
            Err(error) => {
                secrets = None;
                observed = match error {
                    DriverError::InvalidConfig { .. } => Observed::InvalidSpec(error),
                    _ => Observed::Failed(error),
                };
            }
        }
    }
    let input = Input {
        machine,
        observed,
        offers_ssh,
        ssh_key_secret: key.as_ref().map(|k| k.secret_name.clone()),
        secrets: secrets.clone(),
        first_contact_host_key: driver.as_ref().and_then(|d| d.first_contact_host_key()),
        power_changed_since_intent,
        now: now(),
        jitter: rand::random(),
        settings: &ctx.settings,
    };
    let plan = reconcile::plan(&input);
    let written = machine.status.as_ref();
    // Status first, then the Events about it: a providerID (found by adoption or
    // created) reaches the API before anything else is done.
    let (Some(planned), Some(driver)) = (plan.step.clone(), driver) else {
        patch_status(api, &ctx.written, machine, written, &plan.status).await?;
        publish(ctx, machine, &plan.notes).await;
        consume_accept_annotation(api, machine, &plan.status).await?;
        release_dropped(ctx, machine, secrets.as_deref()).await;
        return Ok(plan.requeue);
    };

    // Show the step under way, except for Create (its first write is the providerID)
    // and a quick SSH check.
    let mut shown = written.cloned();
    if planned.step != Step::Create && planned.step != Step::CheckSsh {
        let begun = reconcile::begin(&plan, &planned, input.now);
        patch_status(api, &ctx.written, machine, written, &begun).await?;
        shown = Some(begun);
    }
    publish(ctx, machine, &plan.notes).await;
    let provider_id = plan.status.provider_id.clone().unwrap_or_default();
    info!(step = ?planned.step, cause = ?planned.cause, provider_id, "calling the driver");
    let outcome = perform(driver.as_ref(), &planned, input.now, &provider_id, ctx, machine, key.as_ref()).await;
    let after = Input { now: now(), first_contact_host_key: driver.first_contact_host_key(), ..input };
    let recorded = reconcile::record(&after, &plan, &planned, outcome);
    patch_status(api, &ctx.written, machine, shown.as_ref(), &recorded.status).await?;
    publish(ctx, machine, &recorded.notes).await;
    consume_accept_annotation(api, machine, &recorded.status).await?;
    release_dropped(ctx, machine, secrets.as_deref()).await;
    Ok(recorded.requeue)
}

/// Releases the Secrets the Machine used until now and no longer names (its status
/// listed them; `now` is what it uses this reconcile), unless another Machine uses them.
async fn release_dropped(ctx: &Context, machine: &Machine, now: Option<&[SecretUse]>) {
    let Some(now) = now else { return };
    let before = machine.status.as_ref().map(|s| s.secrets.as_slice()).unwrap_or_default();
    let dropped: Vec<String> =
        before.iter().filter(|b| !now.iter().any(|n| n.name == b.name)).map(|b| b.name.clone()).collect();
    if !dropped.is_empty() {
        super::secrets::release_unused(ctx, machine, dropped).await;
    }
}

/// Releases every Secret the Machine used, unless another Machine uses it: the Machine is
/// about to go.
async fn release_all(ctx: &Context, machine: &Machine) {
    let mut names: Vec<String> = machine.secret_refs().into_iter().map(|(_, name)| name.to_string()).collect();
    names.extend(machine.status.iter().flat_map(|s| s.secrets.iter().map(|u| u.name.clone())));
    if machine.keeps_driver_state() {
        names.push(machine.driver_state_secret_name());
    }
    names.sort();
    names.dedup();
    super::secrets::release_unused(ctx, machine, names).await;
}

async fn cleanup(api: &Api<Machine>, machine: &Machine, ctx: &Context) -> Result<Action, Error> {
    let needs_driver = !machine.is_paused() && machine.spec.deletion_policy == crate::api::DeletionPolicy::Delete;
    let (driver, observed, secrets) =
        if needs_driver { observe(machine, ctx).await? } else { (None, Observed::NoInstance, None) };
    let input = Input {
        machine,
        observed,
        offers_ssh: false,
        ssh_key_secret: None,
        secrets,
        first_contact_host_key: None,
        power_changed_since_intent: None,
        now: now(),
        jitter: rand::random(),
        settings: &ctx.settings,
    };
    let plan = reconcile::plan_cleanup(&input);
    let written = machine.status.as_ref();
    let (id, driver) = match (&plan.next, driver) {
        // No instance: only what a failed or interrupted Create may have left. A quick
        // call, so the status changes only if it fails.
        (CleanupNext::RemoveLeftovers, Some(driver)) => {
            let outcome = removal(call(ctx, driver.as_ref(), Operation::Remove, driver.remove_leftovers()).await);
            let after = Input { now: now(), ..input };
            let recorded = reconcile::record_cleanup(&after, &plan, outcome);
            publish(ctx, machine, &plan.notes).await;
            if let CleanupNext::Wait(retry) = recorded.next {
                patch_status(api, &ctx.written, machine, written, &recorded.status).await?;
                publish(ctx, machine, &recorded.notes).await;
                return Err(waits(&recorded.status, retry));
            }
            ctx.written.forget(machine);
            return Ok(Action::await_change());
        }
        (CleanupNext::Finalize | CleanupNext::RemoveLeftovers, _) => {
            publish(ctx, machine, &plan.notes).await;
            ctx.written.forget(machine);
            return Ok(Action::await_change());
        }
        (CleanupNext::Wait(retry), _) => {
            patch_status(api, &ctx.written, machine, written, &plan.status).await?;
            publish(ctx, machine, &plan.notes).await;
            return Err(waits(&plan.status, *retry));
        }
        (CleanupNext::Remove(id), driver) => (id.clone(), driver),
    };
    let mut shown = written;
    let outcome = match driver {
        Some(driver) => {
            patch_status(api, &ctx.written, machine, written, &plan.status).await?;
            publish(ctx, machine, &plan.notes).await;
            shown = Some(&plan.status);
            info!(provider_id = id, "removing the instance");
            removal(call(ctx, driver.as_ref(), Operation::Remove, driver.remove(&id)).await)
        }
        // Observing failed before a driver could be built (e.g. the credentials Secret
        // cannot be read): Remove cannot be called and fails for that reason.
        None => {
            let error = match &input.observed {
                Observed::Failed(error) | Observed::InvalidSpec(error) => error.clone(),
                _ => DriverError::transient("no driver could be built to remove the instance"),
            };
            Outcome::Failed { operation: Operation::Remove, error }
        }
    };
    let after = Input { now: now(), ..input };
    let recorded = reconcile::record_cleanup(&after, &plan, outcome);
    match recorded.next {
        CleanupNext::Wait(retry) => {
            patch_status(api, &ctx.written, machine, shown, &recorded.status).await?;
            publish(ctx, machine, &recorded.notes).await;
            Err(waits(&recorded.status, retry))
        }
        _ => {
            publish(ctx, machine, &recorded.notes).await;
            ctx.written.forget(machine);
            Ok(Action::await_change())
        }
    }
}

fn removal(result: Result<Removal, DriverError>) -> Outcome {
    match result {
        Ok(Removal::Done) => Outcome::Succeeded,
        Ok(Removal::Waiting(what)) => Outcome::RemovalWaiting(what),
        Err(error) => Outcome::Failed { operation: Operation::Remove, error },
    }
}

fn waits(status: &MachineStatus, retry: Option<Duration>) -> Error {
    let reason = crate::api::get_condition(&status.conditions, crate::api::ConditionType::Deleting)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    Error::DeletionWaits { reason, retry }
}

fn requeue(after: Option<Duration>) -> Action {
    match after {
        Some(d) => Action::requeue(d),
        None => Action::await_change(),
    }
}

/// Builds the driver and asks it about the instance: by `providerID` when known, else
/// by the Machine's UID (adoption). Also says which Secrets it read (guarded), when it
/// could read them all.
async fn observe(machine: &Machine, ctx: &Context) -> Result<Observation, Error> {
    let (credentials, mut secrets) = match read_credentials(machine, ctx).await {
        Ok((credentials, used)) => (credentials, Some(used.into_iter().collect::<Vec<_>>())),
        // A Secret that does not exist: nothing can be called; the Secret watch brings
        // the Machine back when it appears.
        Err(error @ DriverError::InvalidConfig { .. }) => return Ok((None, Observed::InvalidSpec(error), None)),
        Err(error) => return Ok((None, Observed::Failed(error), None)),
    };
    let state = Arc::new(super::driver_state::SecretStateStore::new(ctx.client.clone(), machine));
    let driver = match ctx.drivers.driver_with_state(&machine.spec.driver, machine_ref(machine), credentials, state) {
        Ok(d) => d,
        // Bad credentials are fixed in their Secret, not the spec: retried with backoff.
        Err(error) if error.is_retryable() => return Ok((None, Observed::Failed(error), secrets.take())),
        Err(error) => return Ok((None, Observed::InvalidSpec(error), secrets.take())),
    };
    let known = machine.status.as_ref().and_then(|s| s.provider_id.clone());
    let found = match known {
        Some(id) => {
            call(ctx, driver.as_ref(), Operation::Status, driver.status(&id)).await.map(|state| Some((id, state)))
        }
        None => call(ctx, driver.as_ref(), Operation::Status, driver.find())
            .await
            .map(|found| found.map(|i| (i.id, i.state))),
    };
    let observed = match found {
        Ok(None) => Observed::NoInstance,
        Ok(Some((id, state))) => {
            let addresses = if reconcile::addresses_stale(machine, state) {
                call(ctx, driver.as_ref(), Operation::Status, driver.addresses(&id)).await.ok()
            } else {
                None
            };
            Observed::Instance { id, state, addresses }
        }
        Err(error) if !error.is_retryable() && matches!(error, DriverError::InvalidConfig { .. }) => {
            Observed::InvalidSpec(error)
        }
        Err(error) => Observed::Failed(error),
    };
    debug!(?observed, "observed");
    Ok((Some(driver), observed, secrets))
}

/// The driver (when one could be built), what it observed, and the Secrets read.
type Observation = (Option<Arc<dyn Driver>>, Observed, Option<Vec<SecretUse>>);

/// Resolves `credentialsSecretRef` afresh for each reconcile, so rotation needs no
/// restart, and guards the Secret while the Machine uses it.
async fn read_credentials(machine: &Machine, ctx: &Context) -> Result<(Credentials, Option<SecretUse>), DriverError> {
    let Some(reference) = &machine.spec.credentials_secret_ref else {
        return Ok((Credentials::default(), None));
    };
    let (secret, used) = super::secrets::read(ctx, machine, CREDENTIALS_FIELD, &reference.name).await?;
    let data: BTreeMap<String, Vec<u8>> = secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
    Ok((Credentials(data), Some(used)))
}

/// A driver call bounded by the call timeout, measured.
async fn call<T>(
    ctx: &Context,
    driver: &dyn Driver,
    operation: Operation,
    fut: impl Future<Output = Result<T, DriverError>>,
) -> Result<T, DriverError> {
    let started = std::time::Instant::now();
    let result = match ctx.fence.guard(tokio::time::timeout(ctx.driver_call_timeout, fut)).await {
        Some(Ok(result)) => result,
        Some(Err(_)) => Err(DriverError::transient(format!(
            "the driver did not answer within {}s",
            ctx.driver_call_timeout.as_secs()
        ))),
        None => Err(not_leading()),
    };
    let label = match &result {
        Ok(_) => "Succeeded",
        Err(e) => e.reason(),
    };
    ctx.metrics.observe_driver_call(driver.name(), operation.as_str(), label, started.elapsed());
    result
}

/// What a call that the fence stopped says (the process is about to exit).
fn not_leading() -> DriverError {
    DriverError::transient("not called: this replica is no longer the leader")
}

#[allow(clippy::too_many_arguments)]
async fn perform(
    driver: &dyn Driver,
    planned: &Planned,
    begun_at: Timestamp,
    id: &str,
    ctx: &Context,
    machine: &Machine,
    key: Option<&super::ssh::MachineKey>,
) -> Outcome {
    let failed = |operation: Operation| move |error| Outcome::Failed { operation, error };
    let done = |r: Result<(), DriverError>, op: Operation| r.map_or_else(failed(op), |()| Outcome::Succeeded);
    match &planned.step {
        Step::Create => {
            let request = CreateRequest {
                ssh_public_key: key.map(|k| k.key.public_key_openssh()),
                ssh_port: machine.spec.ssh.as_ref().and_then(|s| s.port),
            };
            call(ctx, driver, Operation::Create, driver.create(&request))
                .await
                .map_or_else(failed(Operation::Create), Outcome::Created)
        }
        Step::Start => done(call(ctx, driver, Operation::Start, driver.start(id)).await, Operation::Start),
        // One call; one that does not answer within stopTimeoutSeconds is left pending,
        // and the next reconcile escalates it.
        Step::Stop => {
            let within = machine.spec.stop_timeout();
            match tokio::time::timeout(within, call(ctx, driver, Operation::Stop, driver.stop(id))).await {
                Ok(result) => done(result, Operation::Stop),
                Err(_) => Outcome::Unanswered { operation: Operation::Stop, called_at: begun_at },
            }
        }
        Step::Kill => done(call(ctx, driver, Operation::Kill, driver.kill(id)).await, Operation::Kill),
        Step::Restart => done(call(ctx, driver, Operation::Restart, driver.restart(id)).await, Operation::Restart),
        Step::Remove => removal(call(ctx, driver, Operation::Remove, driver.remove(id)).await),
        Step::CheckSsh | Step::Provision { .. } => {
            let Some(key) = key else {
                return Outcome::SshFailed(crate::reconcile::SshFailure {
                    reason: "NoSSHKey",
                    message: "the Machine's SSH key is not available".into(),
                    retryable: true,
                    presented_host_key: None,
                });
            };
            let work = async {
                match planned.step {
                    Step::CheckSsh => super::ssh::check(driver, id, machine, key).await,
                    _ => super::ssh::provision(driver, id, machine, key).await,
                }
            };
            ctx.fence
                .guard(work)
                .await
                .unwrap_or_else(|| Outcome::Failed { operation: Operation::Status, error: not_leading() })
        }
    }
}

async fn publish(ctx: &Context, machine: &Machine, notes: &[Note]) {
    if notes.is_empty() {
        return;
    }
    let reference = machine.object_ref(&());
    for note in notes {
        // Events cap the note at 1 KiB.
        let text = truncate(&note.message, 1024);
        let event = EventNote { warning: note.warning, reason: note.reason, action: note.action, note: &text };
        if note.warning {
            warn!(reason = note.reason, message = %note.message, "event");
        } else {
            info!(reason = note.reason, message = %note.message, "event");
        }
        match ctx.events.publish(&reference, &event).await {
            Ok(()) => {}
            Err(e) if super::events::namespace_terminating(&e) => {
                debug!(reason = note.reason, "not publishing an Event: the namespace is being terminated");
            }
            Err(e) => warn!(error = %e, reason = note.reason, "publishing an Event failed"),
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max - 3;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}
