//! An in-process Kubernetes API test server for machinist's end-to-end
//! suite: plain HTTP on `127.0.0.1`, in-memory storage, and the semantics of
//! the real kube-apiserver that a controller (kube-rs) and `kubectl` depend
//! on, checked against recorded real exchanges in `shared/apiserver-traces`
//! (see `tests/traces.rs`).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use machinist_test_apiserver::TestApiServer;
//! let server = TestApiServer::start().await;
//! server.write_kubeconfig("/tmp/kubeconfig")?;
//! // ... point kube::Client / kubectl at it ...
//! let writes = server.write_counts();
//! println!("{} status patches", writes.get("machines/status", "PATCH"));
//! server.reset_write_counts();
//! # Ok(()) }
//! ```
//!
//! # What it serves
//! - core/v1 `namespaces` (+`/status`, `/finalize`), `secrets`, `configmaps`,
//!   `events` (a view of the `events.k8s.io` ones); `events.k8s.io/v1`
//!   `events`; `coordination.k8s.io/v1` `leases`;
//!   `apiextensions.k8s.io/v1` `customresourcedefinitions`; and every
//!   resource a CRD created through the API defines (namespaced or cluster
//!   scoped, all served versions, `status` subresource when declared).
//! - get, list (label/field selectors, `limit`/`continue`,
//!   `resourceVersionMatch=Exact` from the history), watch (from a
//!   resourceVersion, from "now" with initial ADDED events,
//!   `sendInitialEvents`, bookmarks, `timeoutSeconds`, 410 `Expired`),
//!   create (incl. `generateName`), update, patch (JSON, merge, strategic,
//!   server-side apply with field ownership and conflicts), delete
//!   (finalizers, garbage collection of dependents, namespace termination),
//!   deletecollection, `dryRun=All`.
//! - `metadata.managedFields` on every object, kept as kube's fieldmanager
//!   keeps them (see `managed`): one entry per manager, operation and
//!   subresource, FieldsV1 as kube writes it; the manager is `fieldManager`
//!   or the User-Agent's first word. A server-side apply that changes
//!   another manager's field is a 409 `Conflict` naming it unless
//!   `force=true`; what an applier stops applying is removed unless another
//!   manager owns it; a `resourceVersion` in the configuration is a
//!   precondition.
//! - Namespace termination as kube's namespace controller does it, right
//!   after the write that asks for it or changes what it waits for: a
//!   deleted namespace turns `Terminating`, its content is deleted (what has
//!   finalizers stays, marked), creates in it are 403, its conditions say
//!   what remains, and it goes once its content and its finalizers (its
//!   `kubernetes` one is the controller's; others go through `/finalize`)
//!   are gone.
//! - Discovery, OpenAPI v3 (enough for `kubectl apply` validation via
//!   `fieldValidation`), Table output (`kubectl get`), PartialObjectMetadata
//!   (kube-rs metadata watchers).
//! - Any bearer token or none is accepted; there is no authorization.
//!
//! # Known gaps
//! Deliberate simplifications, each cheaper than what it would buy:
//! - **managedFields**: built-in kinds are typed only as far as ownership
//!   needs (object-valued fields, list types, atomic structs; the rest is
//!   "deduced" as for schemaless data); writes through core/v1 `events` are
//!   recorded in `events.k8s.io/v1` terms (their storage); not emulated: the
//!   cap of 10 `Update` entries, kube's upgrade of the
//!   `last-applied-configuration` annotation for the manager `kubectl`,
//!   server-side apply's rejection of fields a CRD schema does not declare
//!   (they are pruned with a warning instead, and not owned). Server-side
//!   apply merges lists with `x-kubernetes-list-type: map` by key, `set` by
//!   value, and replaces other lists and atomic maps.
//! - **Strategic merge patch** is a JSON merge patch that understands the
//!   `$patch`/`$retainKeys`/`$setElementOrder`/`$deleteFromPrimitiveList`
//!   directives and merges `metadata.finalizers` (set) and
//!   `metadata.ownerReferences` (by uid); other lists are replaced, where kube
//!   merges some built-in lists by key. Custom resources refuse it with 415,
//!   as kube does.
//! - **Validation** of custom resources: pruning, defaulting, `type`,
//!   `nullable`, `enum`, `required`, `minimum`/`maximum` (+exclusive),
//!   `multipleOf`, `minLength`/`maxLength`, `pattern`, `minItems`/`maxItems`,
//!   `minProperties`/`maxProperties`, `format` (date-time, date, uuid, byte),
//!   list-type map/set duplicates, `allOf`/`anyOf`/`oneOf`, and CEL rules via
//!   `kube-cel` (incl. transition rules with `oldSelf`, `messageExpression`,
//!   `reason`, `fieldPath`). Not emulated: validation ratcheting (unchanged
//!   invalid fields are re-checked), CEL cost limits, `x-kubernetes-validations`
//!   type checking beyond parsing plus the `size()`-of-a-structured-object
//!   check, `metadata` schemas of embedded resources, CRD structural-schema
//!   rules. Built-in types: only Secret types (ssh-auth, tls, dockerconfig),
//!   Secret immutability, and `events.k8s.io` Event fields are validated;
//!   unknown fields of built-in types are kept and never reported.
//! - **fieldValidation**: `Strict` answers 400 (like kube's strict decoding
//!   error), `Warn` (the default) sends `Warning` headers, for custom
//!   resources only.
//! - **Deletion**: graceful deletion periods are 0; `propagationPolicy`
//!   `Foreground` behaves like `Background` (dependents are deleted at once,
//!   no `foregroundDeletion` finalizer); `Orphan` removes the owner reference
//!   from dependents. Garbage collection runs synchronously inside the
//!   delete that triggers it and the namespace controller right after the
//!   write (kube's run moments later); a namespace's own `default`
//!   ServiceAccount and `kube-root-ca.crt` ConfigMap are not created. Objects
//!   created with only dangling ownerReferences are not collected. A CRD's deletion deletes its custom resources (respecting
//!   their finalizers) and the CRD goes with the last one.
//! - **Watch**: bookmarks are sent every second when asked for (kube: about
//!   once a minute); an object leaving a label/field selector is delivered as
//!   DELETED and one entering it as ADDED (as kube does); a watch with no
//!   `timeoutSeconds` lasts until the client goes. Field selectors accept any
//!   dotted path of the served object (kube allows a fixed list per type).
//! - **Lists** with `limit` are consistent snapshots rebuilt from the watch
//!   history; once the history (default 100,000 events) no longer reaches a
//!   continue token's resourceVersion the list answers 410.
//! - A list right after a CRD is established answers 429 (as kube may, while
//!   its storage initializes) only when `ServerOptions::crd_warmup_429s` asks.
//! - No RBAC, admission webhooks, conversion webhooks (multi-version CRDs are
//!   served with `strategy: None`, i.e. only `apiVersion` is rewritten),
//!   `scale` subresources, aggregated discovery (kubectl falls back to the
//!   legacy discovery documents), `/openapi/v2`, or HTTP/2. Protobuf: only
//!   the request bodies `kubectl create namespace|secret|configmap` send are
//!   decoded; answers are always JSON.
//! - A watch from a resourceVersion newer than the server's answers an ERROR
//!   504 "Too large resource version" after 3 s unless the server catches up.

mod discovery;
mod error;
mod events;
mod http;
mod managed;
mod namespaces;
mod patch;
mod protobuf;
mod resources;
mod selectors;
mod store;
mod table;
mod typed;
mod validation;
mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub use error::ApiError;

/// Options for [`TestApiServer::start_with`].
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Watch events kept for watches and Exact lists; older resourceVersions
    /// answer 410 Expired.
    pub history_limit: usize,
    /// How often watches that allow bookmarks get one.
    pub bookmark_interval: Duration,
    /// Emulate a real server's storage warm-up: the first N lists of each
    /// CRD-defined resource answer 429 "storage is (re)initializing" with
    /// `retryAfterSeconds: 1` (trace 01 shows one). 0 (the default) disables.
    pub crd_warmup_429s: u32,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions { port: 0, history_limit: 100_000, bookmark_interval: Duration::from_secs(1), crd_warmup_429s: 0 }
    }
}

/// Counts of the write requests served (POST/PUT/PATCH/DELETE), keyed by
/// `"<resource>[/<subresource>] <METHOD>"`, e.g. `"machines/status PATCH"`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteCounts(pub BTreeMap<String, u64>);

impl WriteCounts {
    /// Requests to `resource` (e.g. `"machines/status"`) with `method`.
    pub fn get(&self, resource: &str, method: &str) -> u64 {
        self.0.get(&format!("{resource} {method}")).copied().unwrap_or(0)
    }

    /// All write requests.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

impl std::fmt::Display for WriteCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (k, v) in &self.0 {
            writeln!(f, "{k}: {v}")?;
        }
        Ok(())
    }
}

/// A running test API server. Dropping it stops the server.
pub struct TestApiServer {
    addr: SocketAddr,
    app: Arc<http::App>,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestApiServer {
    /// Start on `127.0.0.1:<free port>` with default options.
    ///
    /// Panics if it cannot bind (test tooling: there is nothing to recover).
    pub async fn start() -> TestApiServer {
        Self::start_with(ServerOptions::default()).await.expect("bind test apiserver")
    }

    pub async fn start_with(opts: ServerOptions) -> std::io::Result<TestApiServer> {
        let listener = TcpListener::bind(("127.0.0.1", opts.port)).await?;
        let addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let app = Arc::new(http::App {
            store: store::Store::new(opts.history_limit),
            counters: Mutex::new(BTreeMap::new()),
            read_counters: Mutex::new(BTreeMap::new()),
            shutdown: shutdown_rx.clone(),
            bookmark_interval: opts.bookmark_interval,
            warmup_429s: opts.crd_warmup_429s,
            warmup: Mutex::new(std::collections::HashMap::new()),
        });
        let task = tokio::spawn(serve(listener, app.clone(), shutdown_rx));
        Ok(TestApiServer { addr, app, shutdown, task: Some(task) })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig for this server (context `test-apiserver`, namespace `default`).
    pub fn kubeconfig_yaml(&self) -> String {
        kubeconfig_yaml(&self.url())
    }

    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }

    /// A snapshot of the write-request counters.
    pub fn write_counts(&self) -> WriteCounts {
        WriteCounts(self.app.counters.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// A snapshot of the read-request counters, keyed `"<resource> GET|LIST|WATCH"`
    /// (e.g. `"secrets GET"`; a watch counts once, when it starts).
    pub fn read_counts(&self) -> WriteCounts {
        WriteCounts(self.app.read_counters.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    pub fn reset_write_counts(&self) {
        self.app.counters.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.app.store.lock().rv
    }

    /// Stop serving: closes the listener and every open watch.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The kubeconfig for a server at `url`.
pub fn kubeconfig_yaml(url: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: test-apiserver
  cluster:
    server: {url}
users:
- name: test-user
  user:
    token: test-token
contexts:
- name: test-apiserver
  context:
    cluster: test-apiserver
    user: test-user
    namespace: default
current-context: test-apiserver
preferences: {{}}
"
    )
}

async fn serve(listener: TcpListener, app: Arc<http::App>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    // Connection tasks live in the JoinSet so that aborting this task
    // (shutdown/drop) also drops every connection.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let app = app.clone();
                        async move { Ok::<_, std::convert::Infallible>(app.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
}
