//! Prometheus metrics, and the HTTP endpoint for them and the health probes.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{info, warn};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriverCallLabels {
    pub driver: String,
    pub operation: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

/// Every phase, so each has a series even at zero; `Unknown` before the first status.
const PHASES: [&str; 10] = [
    "Pending",
    "Creating",
    "Starting",
    "Running",
    "Stopping",
    "Stopped",
    "Restarting",
    "Deleting",
    "Failed",
    "Unknown",
];

/// The controller's metrics.
pub struct Metrics {
    pub reconciles: Counter,
    pub reconcile_duration: Histogram,
    pub reconciles_in_flight: Gauge,
    pub reconcile_failures: Family<ReasonLabels, Counter>,
    pub driver_calls: Family<DriverCallLabels, Histogram>,
    pub machines: Family<PhaseLabels, Gauge>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("machinist");
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconciles of Machines", reconciles.clone());
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 4.0, 10));
        registry.register("reconcile_duration_seconds", "How long reconciles take", reconcile_duration.clone());
        let reconciles_in_flight = Gauge::default();
        registry.register("reconciles_in_flight", "Reconciles running now", reconciles_in_flight.clone());
        let machines = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "machines",
            "Machines in the cache by status.phase (Unknown: no phase yet)",
            machines.clone(),
        );
        let reconcile_failures = Family::<ReasonLabels, Counter>::default();
        registry.register("reconcile_failures", "Failed reconciles by reason", reconcile_failures.clone());
        let driver_calls = Family::<DriverCallLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 4.0, 10))
        });
        registry.register(
            "driver_call_duration_seconds",
            "Driver calls by driver, operation and result, with their duration",
            driver_calls.clone(),
        );
        Metrics {
            reconciles,
            reconcile_duration,
            reconciles_in_flight,
            reconcile_failures,
            driver_calls,
            machines,
            registry,
        }
    }
}

impl Metrics {
    pub fn observe_driver_call(&self, driver: &str, operation: &str, result: &str, took: Duration) {
        let labels = DriverCallLabels { driver: driver.into(), operation: operation.into(), result: result.into() };
        self.driver_calls.get_or_create(&labels).observe(took.as_secs_f64());
    }

    /// Sets the Machines-by-phase gauges from a count of every cached Machine.
    pub fn set_machines_by_phase(&self, counts: &std::collections::BTreeMap<String, i64>) {
        for phase in PHASES {
            let value = counts.get(phase).copied().unwrap_or(0);
            self.machines.get_or_create(&PhaseLabels { phase: phase.to_string() }).set(value);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// Serves `/healthz`, `/readyz` (200 once `ready` is set) and `/metrics` on `listener`.
pub async fn serve(listener: std::net::TcpListener, metrics: Arc<Metrics>, ready: Arc<AtomicBool>) {
    let listener = match listener.set_nonblocking(true).and_then(|()| TcpListener::from_std(listener)) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot serve metrics");
            return;
        }
    };
    if let Ok(address) = listener.local_addr() {
        info!(%address, "serving /healthz, /readyz and /metrics");
    }
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "accepting a connection failed");
                continue;
            }
        };
        let metrics = metrics.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = respond(request.uri().path(), &metrics, &ready);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn respond(path: &str, metrics: &Metrics, ready: &AtomicBool) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/healthz" => (StatusCode::OK, "ok\n".to_string()),
        "/readyz" if ready.load(Ordering::Relaxed) => (StatusCode::OK, "ok\n".to_string()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet\n".to_string()),
        "/metrics" => (StatusCode::OK, metrics.encode()),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let content_type = if path == "/metrics" {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}
