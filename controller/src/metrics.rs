//! Prometheus metrics, and the HTTP endpoint for them and the health probes.

use std::convert::Infallible;
use std::net::SocketAddr;
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

/// The controller's metrics.
pub struct Metrics {
    pub reconciles: Counter,
    pub reconcile_failures: Family<ReasonLabels, Counter>,
    pub driver_calls: Family<DriverCallLabels, Histogram>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("machinist");
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconciles of Machines", reconciles.clone());
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
        Metrics { reconciles, reconcile_failures, driver_calls, registry }
    }
}

impl Metrics {
    pub fn observe_driver_call(&self, driver: &str, operation: &str, result: &str, took: Duration) {
        let labels = DriverCallLabels { driver: driver.into(), operation: operation.into(), result: result.into() };
        self.driver_calls.get_or_create(&labels).observe(took.as_secs_f64());
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// Serves `/healthz`, `/readyz` (200 once `ready` is set) and `/metrics` until the
/// process ends.
pub async fn serve(address: SocketAddr, metrics: Arc<Metrics>, ready: Arc<AtomicBool>) -> std::io::Result<()> {
    let listener = TcpListener::bind(address).await?;
    info!(address = %listener.local_addr()?, "serving /healthz, /readyz and /metrics");
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
