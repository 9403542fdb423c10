//! The controller loop as `machinist run` (and the e2e suite) start it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::reflector::{ObjectRef, Store, reflector};
use kube::runtime::{Controller, WatchStreamExt, controller, watcher};
use kube::{Api, Client, ResourceExt};
use machinist_drivers::Drivers;
use machinist_drivers::dockermachine::Plugins;
use tracing::{debug, info, warn};

use crate::api::{Machine, SECRET_GUARDED_LABEL};
use crate::k8s::{self, Context, CrdError};
use crate::leader::{Fence, LeaderElectionConfig, LeaderElector};
use crate::metrics::{self, Metrics, ReasonLabels};
use crate::reconcile::Settings;

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Watch one namespace, or all when `None`.
    pub namespace: Option<String>,
    /// Machines reconciled at once (0: no limit).
    pub concurrency: u16,
    /// Where the fake driver keeps its instances.
    pub fake_state_dir: PathBuf,
    /// Where `docker-machine-driver-<name>` plugin binaries are found (none: the
    /// `dockerMachine` driver is not available).
    pub driver_plugin_dir: Option<PathBuf>,
    /// A writable directory for the plugins' store directories while they run.
    pub driver_plugin_work_dir: PathBuf,
    pub settings: Settings,
    pub driver_call_timeout: Duration,
    /// How long to wait for the CRD to become Established.
    pub crd_wait: Duration,
    /// Where to serve `/healthz`, `/readyz` and `/metrics` (none when `None`).
    pub metrics_address: Option<SocketAddr>,
    /// This replica's name in Events (e.g. the pod name).
    pub instance: Option<String>,
    /// Compete for a Lease and reconcile only while holding it.
    pub leader_election: Option<LeaderElectionConfig>,
    /// How long in-flight reconciles may take to finish after the shutdown signal; then
    /// they are cut short (the next start finds out by observation what they did). Keep it
    /// below the pod's `terminationGracePeriodSeconds`, so the process exits on its own.
    pub shutdown_timeout: Duration,
    /// How long any single Kubernetes API request may wait for its response.
    pub api_timeout: Duration,
    /// Record each fake-driver call, with `instance` as its caller, in the fake state
    /// directory's `calls.jsonl` (tests: which replica acted when).
    pub fake_call_journal: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            namespace: None,
            concurrency: 64,
            fake_state_dir: PathBuf::from("/var/lib/machinist/fake"),
            driver_plugin_dir: None,
            driver_plugin_work_dir: std::env::temp_dir().join("machinist-plugins"),
            settings: Settings::default(),
            driver_call_timeout: Duration::from_secs(600),
            crd_wait: Duration::from_secs(30),
            metrics_address: None,
            instance: None,
            leader_election: None,
            shutdown_timeout: Duration::from_secs(25),
            api_timeout: Duration::from_secs(30),
            fake_call_journal: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Crd(#[from] CrdError),
    #[error(
        "cannot use the fake driver's state directory {dir}: {error}; set --fake-state-dir to a writable directory"
    )]
    FakeStateDir { dir: String, error: std::io::Error },
    #[error(
        "cannot use the plugin work directory {dir}: {error}; set --driver-plugin-work-dir to a writable directory"
    )]
    PluginWorkDir { dir: String, error: std::io::Error },
    #[error("cannot serve metrics and health on {address}: {error}; set --metrics-address")]
    MetricsAddress { address: SocketAddr, error: std::io::Error },
    #[error("lost leadership: {0}; stopped reconciling")]
    LostLeadership(String),
}

/// Runs the controller until `shutdown` completes; then in-flight reconciles finish and
/// it returns. With leader election, it reconciles only while it holds the Lease, and
/// when it loses the Lease it stops at once (in-flight reconciles are dropped) and
/// returns [`RunError::LostLeadership`].
pub async fn run(
    client: Client,
    config: RunConfig,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), RunError> {
    let shutdown = shutdown.shared();
    let client = k8s::with_request_timeout(client, config.api_timeout);
    // A stop asked for while the API server is slow to answer ends the wait at once.
    tokio::select! {
        waited = k8s::wait_for_crd(client.clone(), config.namespace.as_deref(), config.crd_wait) => waited?,
        () = shutdown.clone() => return Ok(()),
    }
    std::fs::create_dir_all(&config.fake_state_dir)
        .map_err(|error| RunError::FakeStateDir { dir: config.fake_state_dir.display().to_string(), error })?;
    if config.driver_plugin_dir.is_some() {
        std::fs::create_dir_all(&config.driver_plugin_work_dir).map_err(|error| RunError::PluginWorkDir {
            dir: config.driver_plugin_work_dir.display().to_string(),
            error,
        })?;
    }
    let plugins = Plugins::new(config.driver_plugin_dir.clone(), &config.driver_plugin_work_dir);

    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let mut background = Background::default();
    if let Some(address) = config.metrics_address {
        // Bound here, so a taken port fails the start rather than later.
        let listener =
            std::net::TcpListener::bind(address).map_err(|error| RunError::MetricsAddress { address, error })?;
        background.0.push(tokio::spawn(metrics::serve(listener, metrics.clone(), ready.clone())));
    }

    // Machines are read without their managedFields, and the cache keeps what reconcile
    // reads and no more (see `prune`).
    let machines: Api<k8s::WatchedMachine> = k8s::namespaced_or_all(&client, config.namespace.as_deref());
    let writer = kube::runtime::reflector::store::Writer::<DeserializeGuard<Machine>>::default();
    let store = writer.as_reader();
    let watch = watcher(machines, watcher::Config::default().any_semantic()).map_ok(k8s::into_guarded).modify(prune);
    let controller = Controller::for_stream(reflector(writer, watch).applied_objects(), store.clone());
    // A Secret that appears or changes brings the Machines that use it back at once: a
    // missing credentials Secret created, credentials rotated or fixed. The Secrets in use
    // (guarded, and labelled so) are cached whole, so no reconcile reads one from the API;
    // of the others only metadata is watched, to notice one that appears.
    let guarded_label = format!("{SECRET_GUARDED_LABEL}=true");
    let guarded: Api<Secret> = k8s::namespaced_or_all(&client, config.namespace.as_deref());
    let secret_writer = kube::runtime::reflector::store::Writer::<Secret>::default();
    let secret_cache = secret_writer.as_reader();
    let guarded = watcher(guarded, watcher::Config::default().labels(&guarded_label).any_semantic())
        .modify(|secret: &mut Secret| prune_metadata(&mut secret.metadata));
    let guarded = reflector(secret_writer, guarded).applied_objects();
    let others: Api<PartialObjectMeta<Secret>> = k8s::namespaced_or_all(&client, config.namespace.as_deref());
    let others_config = watcher::Config::default().labels(&format!("!{SECRET_GUARDED_LABEL}")).any_semantic();
    let (users, other_users) = (store.clone(), store.clone());
    let secret_changes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (changes, other_changes) = (secret_changes.clone(), secret_changes.clone());
    let controller = controller
        .watches_stream(guarded, move |secret: Secret| {
            changes.fetch_add(1, Ordering::SeqCst);
            machines_using(&users, secret.namespace(), &secret.name_any())
        })
        .watches(others, others_config, move |secret| {
            other_changes.fetch_add(1, Ordering::SeqCst);
            machines_using(&other_users, secret.namespace(), &secret.name_any())
        })
        .with_config(controller::Config::default().concurrency(config.concurrency))
        .graceful_shutdown_on(shutdown.clone());
    // With leader election, nothing acts on an instance until the Lease is held, nor
    // after the renew deadline of the last renewal.
    let fence = if config.leader_election.is_some() { Fence::closed() } else { Fence::unfenced() };
    // Reconciles do not wait for their Events' requests (see `EventPublisher::queued`).
    let (events, event_workers) = k8s::EventPublisher::new(client.clone(), "machinist", config.instance.clone())
        .queued(EVENT_WORKERS, EVENT_QUEUE);
    let ctx = Arc::new(Context {
        client: client.clone(),
        drivers: match (&config.instance, config.fake_call_journal) {
            (Some(instance), true) => Drivers::new(&config.fake_state_dir).with_fake_call_journal(instance),
            _ => Drivers::new(&config.fake_state_dir),
        }
        .with_plugins(plugins),
        events,
        settings: config.settings.clone(),
        driver_call_timeout: config.driver_call_timeout,
        metrics: metrics.clone(),
        written: Default::default(),
        api_failures: Default::default(),
        fence: fence.clone(),
        secret_cache: Some(secret_cache.clone()),
        secret_locks: Default::default(),
        machine_cache: Some(store.clone()),
        release_checks: Default::default(),
        secret_changes: secret_changes.clone(),
    });
    background.0.push(tokio::spawn(count_phases(store.clone(), metrics.clone())));
    background.0.push(tokio::spawn(sweep_secrets(
        client.clone(),
        fence.clone(),
        config.namespace.clone(),
        secret_cache,
        store.clone(),
    )));
    let cache_ready = ready.clone();
    background.0.push(tokio::spawn(async move {
        // Poll again every second: kube-runtime 5.0's Store readiness wakes only its
        // most recent waiter, and the controller's own runner waits on it too.
        loop {
            match tokio::time::timeout(Duration::from_secs(1), store.wait_until_ready()).await {
                Ok(Ok(())) => {
                    cache_ready.store(true, Ordering::Relaxed);
                    info!("Machine cache synced; ready");
                    return;
                }
                Ok(Err(_)) => return,
                Err(_) => continue,
            }
        }
    }));
    let draining = controller.run(reconcile_counted, k8s::error_policy, ctx).for_each(move |result| {
        let metrics = metrics.clone();
        async move { log_result(result, &metrics) }
    });
    let reconciling = drain_within(draining, shutdown.clone(), config.shutdown_timeout);

    let Some(election) = config.leader_election.clone() else {
        info!(
            namespace = config.namespace.as_deref().unwrap_or("(all)"),
            concurrency = config.concurrency,
            "machinist controller started"
        );
        reconciling.await;
        event_workers.finish(EVENT_FLUSH).await;
        info!("machinist controller stopped");
        return Ok(());
    };
    let elector = LeaderElector::new(client, election, fence);
    // A standby is healthy and ready to take over; a leader is ready once its cache is.
    let synced = ready.load(Ordering::Relaxed);
    ready.store(true, Ordering::Relaxed);
    tokio::select! {
        _ = elector.acquire() => {}
        _ = shutdown.clone() => return Ok(()),
    }
    ready.store(synced, Ordering::Relaxed);
    info!(
        namespace = config.namespace.as_deref().unwrap_or("(all)"),
        concurrency = config.concurrency,
        "machinist controller started"
    );
    tokio::select! {
        _ = reconciling => {
            // The Lease first, so a standby takes over without waiting for Events.
            elector.release().await;
            event_workers.finish(EVENT_FLUSH).await;
            info!("machinist controller stopped");
            Ok(())
        }
        reason = elector.hold() => {
            tracing::error!(%reason, "lost leadership: stopping at once");
            Err(RunError::LostLeadership(reason))
        }
    }
}

/// Event publishing: workers (so that one slow request does not hold up the others),
/// the Events each may have queued before a reconcile waits for room, and how long a
/// graceful stop waits for what is queued.
const EVENT_WORKERS: usize = 8;
const EVENT_QUEUE: usize = 16;
const EVENT_FLUSH: Duration = Duration::from_secs(3);

/// Runs the controller's stream to its end, but no longer than `timeout` after
/// `shutdown`: a driver call that would outlast the pod's grace period is cut short here
/// rather than by SIGKILL, and the process still exits cleanly.
async fn drain_within(draining: impl Future<Output = ()>, shutdown: impl Future<Output = ()>, timeout: Duration) {
    let deadline = async {
        shutdown.await;
        tokio::time::sleep(timeout).await;
    };
    tokio::select! {
        () = draining => {}
        () = deadline => warn!(
            timeout_secs = timeout.as_secs(),
            "in-flight reconciles did not finish in time after the shutdown signal: cut short; the next start \
             observes what they did"
        ),
    }
}

/// What is dropped of each Machine before the cache stores it (see [`prune_metadata`]).
fn prune(object: &mut DeserializeGuard<Machine>) {
    match &mut object.0 {
        Ok(machine) => prune_metadata(&mut machine.metadata),
        Err(invalid) => prune_metadata(&mut invalid.metadata),
    }
}

/// What is dropped of each cached object (Machines, guarded Secrets): its
/// `managedFields` (about half of a real Machine, with three managers) and `kubectl
/// apply`'s last-applied annotation (for a Secret, a second copy of its data). Reconcile
/// reads neither, and at 10,000 Machines they would be most of the controller's memory.
fn prune_metadata(meta: &mut kube::api::ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED_ANNOTATION);
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The Machines in the cache that use the Secret `name` of namespace `ns`.
fn machines_using(
    machines: &Store<DeserializeGuard<Machine>>,
    ns: Option<String>,
    name: &str,
) -> Vec<ObjectRef<DeserializeGuard<Machine>>> {
    machines
        .state()
        .iter()
        .filter_map(|object| match &object.0 {
            Ok(machine) if machine.namespace() == ns && machine.uses_secret(name) => {
                Some(ObjectRef::from_obj(&**object))
            }
            _ => None,
        })
        .collect()
}

/// One item of the controller's output stream.
type Reconciled<E> = Result<
    (kube::runtime::reflector::ObjectRef<DeserializeGuard<Machine>>, kube::runtime::controller::Action),
    controller::Error<k8s::Error, E>,
>;

fn log_result<E: std::fmt::Display>(result: Reconciled<E>, metrics: &Metrics) {
    match result {
        Ok((object, _)) => debug!(machine = %object, "reconciled"),
        Err(controller::Error::ObjectNotFound(object)) => debug!(machine = %object, "gone before its reconcile"),
        Err(controller::Error::ReconcilerFailed(error, object)) => {
            let reason = error.metric_label().to_string();
            metrics.reconcile_failures.get_or_create(&ReasonLabels { reason }).inc();
            if error.is_wait() {
                debug!(machine = %object, %error, "waiting");
            } else {
                warn!(machine = %object, %error, "reconcile failed");
            }
        }
        Err(error) => warn!(%error, "controller error"),
    }
}

async fn reconcile_counted(
    obj: Arc<DeserializeGuard<Machine>>,
    ctx: Arc<Context>,
) -> Result<kube::runtime::controller::Action, k8s::Error> {
    let metrics = ctx.metrics.clone();
    metrics.reconciles.inc();
    metrics.reconciles_in_flight.inc();
    let started = std::time::Instant::now();
    let result = k8s::reconcile(obj, ctx).await;
    metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    metrics.reconciles_in_flight.dec();
    result
}

/// Tasks that live as long as one `run`.
#[derive(Default)]
struct Background(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Releases, once leading and then every ten minutes, guarded Secrets that no Machine uses
/// (left by a controller stopped between letting a Machine go and releasing them). At
/// start from the API; then from the caches, which costs no API read when there is
/// nothing to release.
async fn sweep_secrets(
    client: Client,
    fence: Fence,
    namespace: Option<String>,
    secrets: k8s::SecretCache,
    machines: Store<DeserializeGuard<Machine>>,
) {
    let mut swept_api = false;
    loop {
        let from = if swept_api {
            k8s::SweepFrom::Caches { secrets: &secrets, machines: &machines }
        } else {
            k8s::SweepFrom::Api
        };
        // Only the leader lets go of Secrets: a standby's sweep could race the leader
        // guarding one for a new Machine.
        match fence.guard(k8s::sweep_secrets(&client, namespace.as_deref(), from)).await {
            None => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            Some(Ok(())) => swept_api = true,
            Some(Err(error)) => debug!(%error, "sweeping unused guarded Secrets failed; trying again later"),
        }
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
}

/// Keeps the Machines-by-phase gauges current from the controller's cache.
async fn count_phases(store: kube::runtime::reflector::Store<DeserializeGuard<Machine>>, metrics: Arc<Metrics>) {
    loop {
        let mut counts = std::collections::BTreeMap::<String, i64>::new();
        for object in store.state() {
            let phase = match &object.0 {
                Ok(m) => m.status.as_ref().and_then(|s| s.phase).map(|p| format!("{p:?}")),
                Err(_) => None,
            };
            *counts.entry(phase.unwrap_or_else(|| "Unknown".into())).or_default() += 1;
        }
        metrics.set_machines_by_phase(&counts);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    #[test]
    fn the_cache_keeps_no_managed_fields_nor_last_applied_annotation() {
        let mut machine = Machine::test();
        machine.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default(); 3]);
        machine.metadata.annotations = Some(
            [
                (LAST_APPLIED_ANNOTATION.to_string(), "{}".to_string()),
                (crate::api::PAUSED_ANNOTATION.to_string(), "true".to_string()),
            ]
            .into(),
        );
        let mut cached = DeserializeGuard(Ok(machine.clone()));
        prune(&mut cached);
        let kept = cached.0.unwrap();
        assert_eq!(kept.metadata.managed_fields, None);
        let annotations = kept.metadata.annotations.unwrap();
        assert_eq!(
            annotations.keys().collect::<Vec<_>>(),
            [crate::api::PAUSED_ANNOTATION],
            "what reconcile reads stays"
        );
        assert_eq!(kept.spec, machine.spec);
    }
}
