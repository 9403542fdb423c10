//! The controller loop as `machinist run` (and the e2e suite) start it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kube::core::DeserializeGuard;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, controller, watcher};
use kube::{Api, Client};
use machinist_drivers::Drivers;
use tracing::{debug, info, warn};

use crate::api::Machine;
use crate::k8s::{self, Context, CrdError};
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
    pub settings: Settings,
    pub driver_call_timeout: Duration,
    /// How long to wait for the CRD to become Established.
    pub crd_wait: Duration,
    /// Where to serve `/healthz`, `/readyz` and `/metrics` (none when `None`).
    pub metrics_address: Option<SocketAddr>,
    /// This replica's name in Events (e.g. the pod name).
    pub instance: Option<String>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            namespace: None,
            concurrency: 64,
            fake_state_dir: PathBuf::from("/var/lib/machinist/fake"),
            settings: Settings::default(),
            driver_call_timeout: Duration::from_secs(600),
            crd_wait: Duration::from_secs(30),
            metrics_address: None,
            instance: None,
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
    #[error("cannot serve metrics and health on {address}: {error}; set --metrics-address")]
    MetricsAddress { address: SocketAddr, error: std::io::Error },
}

/// Runs the controller until `shutdown` completes; then in-flight reconciles finish and
/// it returns.
pub async fn run(
    client: Client,
    config: RunConfig,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), RunError> {
    k8s::wait_for_crd(client.clone(), config.crd_wait).await?;
    std::fs::create_dir_all(&config.fake_state_dir)
        .map_err(|error| RunError::FakeStateDir { dir: config.fake_state_dir.display().to_string(), error })?;

    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(address) = config.metrics_address {
        // Bind before going on, so a taken port fails the start rather than later.
        let probe =
            std::net::TcpListener::bind(address).map_err(|error| RunError::MetricsAddress { address, error })?;
        drop(probe);
        tokio::spawn(metrics::serve(address, metrics.clone(), ready.clone()));
    }

    let reporter = Reporter { controller: "machinist".into(), instance: config.instance.clone() };
    let ctx = Arc::new(Context {
        client: client.clone(),
        drivers: Drivers::new(&config.fake_state_dir),
        recorder: Recorder::new(client.clone(), reporter),
        settings: config.settings.clone(),
        driver_call_timeout: config.driver_call_timeout,
        metrics: metrics.clone(),
        written: Default::default(),
    });
    let machines: Api<DeserializeGuard<Machine>> = match &config.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let controller = Controller::new(machines, watcher::Config::default().any_semantic())
        .with_config(controller::Config::default().concurrency(config.concurrency))
        .graceful_shutdown_on(shutdown);
    let store = controller.store();
    tokio::spawn(async move {
        // Poll again every second: kube-runtime 5.0's Store readiness wakes only its
        // most recent waiter, and the controller's own runner waits on it too.
        loop {
            match tokio::time::timeout(Duration::from_secs(1), store.wait_until_ready()).await {
                Ok(Ok(())) => {
                    ready.store(true, Ordering::Relaxed);
                    info!("Machine cache synced; ready");
                    return;
                }
                Ok(Err(_)) => return,
                Err(_) => continue,
            }
        }
    });
    info!(
        namespace = config.namespace.as_deref().unwrap_or("(all)"),
        concurrency = config.concurrency,
        "machinist controller started"
    );
    controller
        .run(reconcile_counted, k8s::error_policy, ctx)
        .for_each(|result| {
            let metrics = metrics.clone();
            async move {
                match result {
                    Ok((object, _)) => debug!(machine = %object, "reconciled"),
                    Err(controller::Error::ObjectNotFound(object)) => {
                        debug!(machine = %object, "gone before its reconcile")
                    }
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
        })
        .await;
    info!("machinist controller stopped");
    Ok(())
}

async fn reconcile_counted(
    obj: Arc<DeserializeGuard<Machine>>,
    ctx: Arc<Context>,
) -> Result<kube::runtime::controller::Action, k8s::Error> {
    ctx.metrics.reconciles.inc();
    k8s::reconcile(obj, ctx).await
}
