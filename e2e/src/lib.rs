//! The end-to-end harness: the real controller loop (the code path of `machinist run`)
//! against a Kubernetes API — a real cluster when `MACHINIST_E2E_KUBECONFIG` names one,
//! else the in-process test server of `machinist-test-apiserver`.
//!
//! Each test gets its own namespace and its own controller watching only that
//! namespace, with its own fake-driver state directory, so tests run in parallel on
//! either backend.

pub mod tcp_proxy;

use std::fmt::Debug;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::watcher;
use kube::{Api, Client, Config, ResourceExt};
use machinist::api::{ConditionType, Machine, get_condition};
use machinist::reconcile::Settings;
use machinist::run::RunConfig;
use machinist_drivers::fake::{FakeStore, InstanceRecord};
use machinist_test_apiserver::TestApiServer;
use std::sync::{Mutex, OnceLock};

use tokio::sync::{OnceCell, oneshot};
use tokio::task::JoinHandle;

/// The environment variable naming a real cluster's kubeconfig.
pub const KUBECONFIG_ENV: &str = "MACHINIST_E2E_KUBECONFIG";

/// Where the suite runs.
pub enum Backend {
    /// The cluster of `MACHINIST_E2E_KUBECONFIG`.
    Cluster(Box<kube::config::Kubeconfig>),
    /// The in-process test server, on a runtime of its own that lives as long as the
    /// process (each `#[tokio::test]` has its own runtime, and tests share the server).
    TestServer(&'static TestApiServer),
}

static BACKEND: OnceLock<Backend> = OnceLock::new();
static CRD_INSTALLED: OnceCell<()> = OnceCell::const_new();

fn shared_backend() -> Result<&'static Backend> {
    if let Some(backend) = BACKEND.get() {
        return Ok(backend);
    }
    init_logging();
    let backend = match std::env::var_os(KUBECONFIG_ENV) {
        Some(path) => Backend::Cluster(Box::new(
            kube::config::Kubeconfig::read_from(&path)
                .with_context(|| format!("reading {KUBECONFIG_ENV}={}", path.to_string_lossy()))?,
        )),
        None => {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a runtime for the test server");
                runtime.block_on(async move {
                    let server: &'static TestApiServer = Box::leak(Box::new(TestApiServer::start().await));
                    tx.send(server).expect("the harness waits for the server");
                    std::future::pending::<()>().await
                })
            });
            Backend::TestServer(rx.recv().context("starting the test server")?)
        }
    };
    Ok(BACKEND.get_or_init(|| backend))
}

/// How to reach the backend's API server.
async fn backend_config(backend: &Backend) -> Result<Config> {
    Ok(match backend {
        Backend::Cluster(kubeconfig) => {
            Config::from_custom_kubeconfig(kubeconfig.as_ref().clone(), &Default::default()).await?
        }
        Backend::TestServer(server) => Config::new(server.url().parse()?),
    })
}

/// A client for this test (clients belong to the runtime that made them), with the
/// Machine CRD installed and Established.
pub async fn client() -> Result<(Client, &'static Backend)> {
    let backend = shared_backend()?;
    let client = Client::try_from(backend_config(backend).await?)?;
    CRD_INSTALLED.get_or_try_init(|| install_crd(&client)).await?;
    Ok((client, backend))
}

/// Everything the machinist crates logged in this process, at debug level, whatever
/// `MACHINIST_E2E_LOG` shows: tests grep it (e.g. for secrets that must never be logged).
static CAPTURED: Mutex<Vec<u8>> = Mutex::new(Vec::new());

pub fn captured_logs() -> String {
    String::from_utf8_lossy(&CAPTURED.lock().expect("not poisoned")).into_owned()
}

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURED.lock().expect("not poisoned").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer, fmt};
    let shown = EnvFilter::try_from_env("MACHINIST_E2E_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let captured = EnvFilter::new("machinist=debug,machinist_drivers=debug");
    let _ = tracing_subscriber::registry()
        .with(fmt::layer().with_test_writer().with_filter(shown))
        .with(fmt::layer().with_ansi(false).with_writer(|| Capture).with_filter(captured))
        .try_init();
}

/// Applies `crds/machine.yaml` (the committed, generated CRD) and waits for Established.
async fn install_crd(client: &Client) -> Result<()> {
    let yaml = include_str!("../../crds/machine.yaml");
    let crd: CustomResourceDefinition = serde_yaml::from_str(yaml)?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("machinist-e2e").force();
    crds.patch(&crd.name_any(), &params, &Patch::Apply(&crd)).await.context("installing the Machine CRD")?;
    let name = crd.name_any();
    let established = await_condition(crds, &name, conditions::is_crd_established());
    tokio::time::timeout(Duration::from_secs(30), established)
        .await
        .context("the Machine CRD did not become Established")??;
    Ok(())
}

/// Fast timings for tests: drift is noticed within a second or two.
pub fn test_settings() -> Settings {
    Settings {
        poll_interval: Duration::from_secs(1),
        progress_interval: Duration::from_millis(500),
        backoff_base: Duration::from_secs(1),
        backoff_cap: Duration::from_secs(4),
    }
}

/// One test's world: a namespace, a controller watching it, and the fake provider.
pub struct Env {
    pub client: Client,
    pub backend: &'static Backend,
    pub namespace: String,
    pub machines: Api<Machine>,
    /// Where this test's controller serves /healthz, /readyz and /metrics.
    pub metrics_address: std::net::SocketAddr,
    state_dir: tempfile::TempDir,
    controller: Option<ControllerHandle>,
}

/// A controller running in this process, as `machinist run` would.
pub struct ControllerHandle {
    stop: oneshot::Sender<()>,
    pub task: JoinHandle<Result<(), machinist::run::RunError>>,
}

impl ControllerHandle {
    /// Kills it at once, mid-whatever, as a crash would.
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Stops it gracefully (in-flight reconciles finish) and returns how it ended.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("graceful shutdown")??
            .context("the controller failed")
    }
}

impl Env {
    /// A fresh namespace with a running controller.
    pub async fn new(test: &str) -> Result<Env> {
        let (client, backend) = client().await?;
        let namespace = format!("e2e-{}-{:06x}", test.replace('_', "-"), rand::random::<u32>() & 0xff_ffff);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": namespace, "labels": { "machinist.dev/e2e": "true" } }
        }))?;
        namespaces.create(&PostParams::default(), &ns).await.context("creating the test namespace")?;
        let machines = Api::namespaced(client.clone(), &namespace);
        let metrics_address = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut env = Env {
            client,
            backend,
            namespace,
            machines,
            metrics_address,
            state_dir: tempfile::tempdir()?,
            controller: None,
        };
        env.start_controller();
        Ok(env)
    }

    /// A namespace with no controller running yet.
    pub async fn idle(test: &str) -> Result<Env> {
        let mut env = Env::new(test).await?;
        env.abort_controller();
        Ok(env)
    }

    /// This test's controller configuration: its namespace, its fake state, fast timings.
    pub fn run_config(&self) -> RunConfig {
        RunConfig {
            namespace: Some(self.namespace.clone()),
            concurrency: 16,
            fake_state_dir: self.state_dir.path().to_path_buf(),
            settings: test_settings(),
            driver_call_timeout: Duration::from_secs(30),
            instance: Some(format!("e2e-{}", self.namespace)),
            metrics_address: None,
            // Well inside `ControllerHandle::stop`'s 30 s, under load too.
            shutdown_timeout: Duration::from_secs(10),
            ..RunConfig::default()
        }
    }

    /// The API server's URL.
    pub async fn api_url(&self) -> Result<http::Uri> {
        Ok(backend_config(self.backend).await?.cluster_url)
    }

    /// A client whose traffic goes through `proxy`, which forwards to [`Env::api_url`].
    /// TLS still checks the API server's own name.
    pub async fn client_through(&self, proxy: &tcp_proxy::TcpProxy) -> Result<Client> {
        let mut config = backend_config(self.backend).await?;
        let host = config.cluster_url.host().unwrap_or_default().to_string();
        let mut parts = config.cluster_url.clone().into_parts();
        parts.authority = Some(proxy.address().to_string().parse()?);
        config.cluster_url = http::Uri::from_parts(parts)?;
        if config.tls_server_name.is_none() {
            config.tls_server_name = Some(host);
        }
        Ok(Client::try_from(config)?)
    }

    /// Runs a controller with `config` (the same `run` as `machinist run`).
    pub fn spawn_controller(&self, config: RunConfig) -> ControllerHandle {
        self.spawn_controller_with(self.client.clone(), config)
    }

    /// Runs a controller that reaches the API server through `client`.
    pub fn spawn_controller_with(&self, client: Client, config: RunConfig) -> ControllerHandle {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            machinist::run::run(client, config, shutdown).await
        });
        ControllerHandle { stop, task }
    }

    /// Starts this test's controller.
    pub fn start_controller(&mut self) {
        assert!(self.controller.is_none(), "the controller already runs");
        let config = RunConfig { metrics_address: Some(self.metrics_address), ..self.run_config() };
        self.controller = Some(self.spawn_controller(config));
    }

    /// Kills this test's controller at once, mid-whatever, as a crash would.
    pub fn abort_controller(&mut self) {
        if let Some(c) = self.controller.take() {
            c.abort();
        }
    }

    /// Stops this test's controller gracefully (in-flight reconciles finish).
    pub async fn stop_controller(&mut self) -> Result<()> {
        match self.controller.take() {
            Some(c) => c.stop().await,
            None => Ok(()),
        }
    }

    pub fn fake_store(&self) -> FakeStore {
        FakeStore::new(self.state_dir.path())
    }

    /// The fake instances of a Machine.
    pub fn instances(&self, machine: &Machine) -> Vec<InstanceRecord> {
        self.fake_store().instances_of(&machine.uid().unwrap()).unwrap()
    }

    /// Creates a Machine from YAML (its namespace is this test's).
    pub async fn create(&self, yaml: &str) -> Result<Machine> {
        let machine: Machine = serde_yaml::from_str(yaml)?;
        Ok(self.machines.create(&PostParams::default(), &machine).await?)
    }

    /// A merge patch of the Machine's spec or metadata, as `kubectl patch --type=merge`.
    pub async fn patch(&self, name: &str, patch: serde_json::Value) -> Result<Machine> {
        Ok(self.machines.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?)
    }

    pub async fn get(&self, name: &str) -> Result<Machine> {
        Ok(self.machines.get(name).await?)
    }

    /// Waits until `check` holds for the Machine; fails with the last status seen.
    pub async fn wait_for(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Machine) -> bool,
    ) -> Result<Machine> {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut stream = watcher::watcher(self.machines.clone(), config).boxed();
        let mut last: Option<Machine> = None;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, stream.next()).await;
            match next {
                Err(_) => bail!(
                    "timed out after {timeout:?} waiting for machine/{name} to be {what}; last seen status: {}",
                    last.as_ref().map(describe).unwrap_or_else(|| "none".into())
                ),
                Ok(None) => bail!("the watch ended"),
                Ok(Some(Err(e))) => tracing::debug!(error = %e, "watch error; the watcher retries"),
                Ok(Some(Ok(event))) => {
                    let seen = match event {
                        watcher::Event::Apply(m) | watcher::Event::InitApply(m) => Some(m),
                        _ => None,
                    };
                    if let Some(m) = seen {
                        if check(&m) {
                            return Ok(m);
                        }
                        last = Some(m);
                    }
                }
            }
        }
    }

    /// Waits for a condition to have this status (and reason, when given).
    pub async fn wait_condition(
        &self,
        name: &str,
        kind: ConditionType,
        status: &str,
        reason: Option<&str>,
    ) -> Result<Machine> {
        let what = format!("{}={status}{}", kind.as_str(), reason.map(|r| format!(" ({r})")).unwrap_or_default());
        self.wait_for(name, &what, Duration::from_secs(60), |m| {
            condition(m, kind).is_some_and(|c| c.status == status && reason.is_none_or(|r| c.reason == r))
        })
        .await
    }

    pub async fn wait_ready(&self, name: &str) -> Result<Machine> {
        self.wait_condition(name, ConditionType::Ready, "True", None).await
    }

    /// Deletes a Machine and waits until it is gone.
    pub async fn delete_and_wait(&self, name: &str) -> Result<()> {
        let Some(machine) = self.machines.get_opt(name).await? else { return Ok(()) };
        let uid = machine.uid().unwrap_or_default();
        match self.machines.delete(name, &DeleteParams::default()).await {
            // Gone meanwhile (its deletion, already under way, finished): what we wait for.
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            result => drop(result?),
        }
        let gone = await_condition(self.machines.clone(), name, conditions::is_deleted(&uid));
        if tokio::time::timeout(Duration::from_secs(60), gone).await.is_err() {
            let left = self.machines.get_opt(name).await?;
            bail!("machine/{name} was not deleted within 60s: {}", left.as_ref().map(describe).unwrap_or_default());
        }
        Ok(())
    }

    /// Creates a Secret in this test's namespace, of `type_` when given (for example
    /// `kubernetes.io/ssh-auth`).
    pub async fn create_secret<K: Into<String>>(
        &self,
        name: &str,
        type_: Option<&str>,
        data: impl IntoIterator<Item = (K, Vec<u8>)>,
    ) -> Result<Secret> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let secret = Secret {
            metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
            type_: type_.map(str::to_string),
            data: Some(data.into_iter().map(|(k, v)| (k.into(), ByteString(v))).collect()),
            ..Default::default()
        };
        Ok(secrets.create(&PostParams::default(), &secret).await?)
    }

    /// Fails unless the Machine's resourceVersion stays the same for `window`: nothing
    /// writes it (no status loop). Returns the Machine as it held.
    pub async fn unchanged_for(&self, name: &str, window: Duration) -> Result<Machine> {
        let before = self.get(name).await?;
        tokio::time::sleep(window).await;
        let after = self.get(name).await?;
        if before.resource_version() != after.resource_version() {
            bail!(
                "machine/{name} was written during a {window:?} window that should be idle: resourceVersion {:?} -> \
                 {:?}; now: {}",
                before.resource_version(),
                after.resource_version(),
                describe(&after)
            );
        }
        Ok(after)
    }

    /// The Events about a Machine, oldest first.
    pub async fn events(&self, name: &str) -> Result<Vec<Event>> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut list: Vec<Event> = events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect();
        list.sort_by_key(|e| e.metadata.creation_timestamp.clone().map(|t| t.0));
        Ok(list)
    }

    /// Waits until an Event with this reason exists for the Machine.
    pub async fn wait_event(&self, name: &str, reason: &str) -> Result<Event> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let events = self.events(name).await?;
            if let Some(e) = events.iter().find(|e| e.reason.as_deref() == Some(reason)) {
                return Ok(e.clone());
            }
            if tokio::time::Instant::now() > deadline {
                let seen: Vec<_> = events.iter().filter_map(|e| e.reason.clone()).collect();
                bail!("no {reason} Event for machine/{name}; seen: {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Removes every Machine (through the controller), then the namespace.
    pub async fn cleanup(mut self) -> Result<()> {
        let machines = self.machines.list(&ListParams::default()).await?.items;
        // A controller is needed only to release finalizers.
        if self.controller.is_none() && machines.iter().any(|m| !m.finalizers().is_empty()) {
            self.start_controller();
        }
        for machine in machines {
            self.delete_and_wait(&machine.name_any()).await?;
        }
        self.stop_controller().await?;
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        namespaces.delete(&self.namespace, &DeleteParams::default()).await?;
        Ok(())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.abort_controller();
    }
}

pub fn condition(machine: &Machine, kind: ConditionType) -> Option<&machinist::api::Condition> {
    machine.status.as_ref().and_then(|s| get_condition(&s.conditions, kind))
}

/// A one-line summary of a Machine's status for failure messages.
pub fn describe(machine: &Machine) -> String {
    let Some(status) = &machine.status else { return "no status".into() };
    let conditions: Vec<String> =
        status.conditions.iter().map(|c| format!("{}={}({}: {})", c.type_, c.status, c.reason, c.message)).collect();
    format!(
        "phase={:?} state={:?} providerID={:?} lastOperation={:?} failures={:?} conditions=[{}]",
        status.phase,
        status.state,
        status.provider_id,
        status.last_operation.as_ref().map(|o| (o.operation, o.result, o.message.clone())),
        status.failures,
        conditions.join(", ")
    )
}

/// Asserts with context, for `Result`-returning tests.
pub fn ensure_eq<T: PartialEq + Debug>(left: T, right: T, what: &str) -> Result<()> {
    if left != right {
        bail!("{what}: {left:?} != {right:?}");
    }
    Ok(())
}

/// A plain HTTP GET on loopback: (status code, body).
pub async fn http_get(address: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("an HTTP status line")?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

/// A Machine on the fake driver: `fake` is the driver block's YAML (flow style, e.g.
/// `{gracefulStop: Ignore}`), `extra` more spec lines, each indented by two spaces.
pub fn fake_machine(name: &str, fake: &str, extra: &str) -> String {
    format!(
        "apiVersion: machinist.dev/v1alpha1\nkind: Machine\nmetadata:\n  name: {name}\nspec:\n  driver:\n    fake: {fake}\n{extra}"
    )
}
