//! Mocked-API tests of the Kubernetes layer (`machinist::k8s::reconcile`), in the manner
//! of kube-rs's controller-rs `ApiServerVerifier`: a `kube::Client` over a
//! `tower_test::mock` service, a real fake driver over a temporary directory, and
//! assertions on the exact writes each reconcile makes, in order.
//!
//! The mock API server holds the one Machine as JSON, records every request and answers
//! it as a real server would (JSON patches applied, status applied, `resourceVersion`
//! bumped, Events echoed back, 404/422 where a server would say so). The tests assert
//! on the recorded requests after the reconcile returns, so an unexpected request shows
//! up as a failed assertion rather than a hang, and every reconcile is bounded by a
//! timeout.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::controller::Action;
use kube::{Client, Resource, ResourceExt};
use machinist::api::{FINALIZER, Machine, MachineSpec, MachineStatus};
use machinist::k8s::{Context, Error, EventNote, EventPublisher, error_policy, reconcile};
use machinist::metrics::Metrics;
use machinist::reconcile::Settings;
use machinist_drivers::fake::InstanceRecord;
use machinist_drivers::{CreateRequest, Credentials, Drivers, MachineRef, State};
use serde_json::{Value, json};
use tower_test::mock;

const NS: &str = "ns";
const NAME: &str = "name";
const UID: &str = "0b6c1f9e-5a43-4d2e-9c1a-7f3e2d1c0b9a";
const MACHINE_PATH: &str = "/apis/machinist.dev/v1alpha1/namespaces/ns/machines/name";
const STATUS_PATH: &str = "/apis/machinist.dev/v1alpha1/namespaces/ns/machines/name/status";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";

/// How long one reconcile may take before the test fails instead of hanging.
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(5);

/// Distinctive timings, so a requeue can be told apart from the others.
fn settings() -> Settings {
    Settings {
        poll_interval: Duration::from_secs(100),
        progress_interval: Duration::from_secs(3),
        backoff_base: Duration::from_secs(10),
        backoff_cap: Duration::from_secs(600),
    }
}

// ---------------------------------------------------------------------------------------
// Test objects
// ---------------------------------------------------------------------------------------

/// Builders for test Machines (controller-rs `fixtures.rs` style).
trait MachineFixture: Sized {
    fn test() -> Machine;
    fn finalized(self) -> Machine;
    fn with_fake(self, fake: Value) -> Machine;
    fn with_spec(self, field: &str, value: Value) -> Machine;
    fn with_status(self, status: MachineStatus) -> Machine;
    fn deleting(self) -> Machine;
}

impl MachineFixture for Machine {
    /// A new Machine with the default fake driver, as the API server returns it on create.
    fn test() -> Machine {
        let spec: MachineSpec = serde_json::from_value(json!({ "driver": { "fake": {} } })).expect("a valid spec");
        let mut machine = Machine::new(NAME, spec);
        let meta = machine.meta_mut();
        meta.namespace = Some(NS.into());
        meta.uid = Some(UID.into());
        meta.generation = Some(1);
        meta.resource_version = Some("1".into());
        machine
    }

    fn finalized(mut self) -> Machine {
        self.finalizers_mut().push(FINALIZER.to_string());
        self
    }

    fn with_fake(self, fake: Value) -> Machine {
        self.with_spec("driver", json!({ "fake": fake }))
    }

    /// Sets one spec field by its JSON name, as a user would in YAML.
    fn with_spec(self, field: &str, value: Value) -> Machine {
        let mut json = serde_json::to_value(&self).expect("a Machine serializes");
        json["spec"][field] = value;
        serde_json::from_value(json).expect("still a valid Machine")
    }

    fn with_status(mut self, status: MachineStatus) -> Machine {
        self.status = Some(status);
        self
    }

    fn deleting(mut self) -> Machine {
        self.meta_mut().deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()));
        self
    }
}

fn machine_ref() -> MachineRef {
    MachineRef { uid: UID.into(), name: NAME.into(), namespace: NS.into(), ..Default::default() }
}

// ---------------------------------------------------------------------------------------
// The mocked API server
// ---------------------------------------------------------------------------------------

/// One request as the mock API server received it.
#[derive(Clone, Debug)]
struct Call {
    method: Method,
    path: String,
    /// Query parameters, sorted, without empty ones.
    query: Vec<(String, String)>,
    content_type: Option<String>,
    body: Value,
}

impl Call {
    fn is_event(&self) -> bool {
        self.path.starts_with("/apis/events.k8s.io/")
    }

    fn summary(&self) -> String {
        let what = if self.is_event() {
            format!(" {}/{}", self.body["type"].as_str().unwrap_or("?"), self.body["reason"].as_str().unwrap_or("?"))
        } else {
            String::new()
        };
        format!("{} {}{what}", self.method, self.path)
    }
}

#[derive(Default)]
struct ServerState {
    /// The Machine as stored; `None` once deleted.
    machine: Option<Value>,
    resource_version: u64,
    calls: Vec<Call>,
    /// Status writes still to be refused with a 500, as an overloaded server would.
    failing_status_writes: u32,
}

/// Answers requests as an API server holding one Machine would, recording each.
struct ApiServer {
    state: Mutex<ServerState>,
}

type Handle = mock::Handle<Request<Body>, Response<Body>>;

impl ApiServer {
    fn new(machine: &Machine) -> Arc<Self> {
        let resource_version = machine.resource_version().and_then(|rv| rv.parse().ok()).unwrap_or(1);
        let machine = serde_json::to_value(machine).expect("a Machine serializes");
        let state = ServerState { machine: Some(machine), resource_version, ..Default::default() };
        Arc::new(ApiServer { state: Mutex::new(state) })
    }

    async fn serve(self: Arc<Self>, mut handle: Handle) {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.expect("the request body is readable");
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
            };
            let mut query: Vec<(String, String)> = parts
                .uri
                .query()
                .unwrap_or_default()
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (k.to_string(), v.to_string())
                })
                .collect();
            query.sort();
            let call = Call {
                method: parts.method.clone(),
                path: parts.uri.path().to_string(),
                query,
                content_type: parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                body,
            };
            let (status, response) = self.answer(&call);
            self.state.lock().unwrap().calls.push(call);
            let bytes = serde_json::to_vec(&response).expect("responses serialize");
            send.send_response(
                Response::builder()
                    .status(status)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Body::from(bytes))
                    .expect("a valid response"),
            );
        }
    }

    fn answer(&self, call: &Call) -> (StatusCode, Value) {
        let mut state = self.state.lock().unwrap();
        let state = &mut *state;
        let is_machine = call.path == MACHINE_PATH || call.path == STATUS_PATH;
        match (&call.method, call.path.as_str()) {
            (&Method::POST, EVENTS_PATH) => {
                state.resource_version += 1;
                let mut event = call.body.clone();
                event["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
                event["metadata"]["uid"] = json!(format!("event-{}", state.resource_version));
                (StatusCode::CREATED, event)
            }
            (&Method::PATCH, path) if path.starts_with(EVENTS_PATH) => {
                state.resource_version += 1;
                let mut event = call.body.clone();
                event["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
                (StatusCode::OK, event)
            }
            (_, _) if is_machine && state.machine.is_none() => not_found(),
            (&Method::GET, MACHINE_PATH) => (StatusCode::OK, state.machine.clone().unwrap()),
            (&Method::PATCH, MACHINE_PATH) if call.content_type.as_deref() == Some("application/json-patch+json") => {
                let mut machine = state.machine.clone().unwrap();
                // As the API server's JSON patch does, a `test` for null passes on a
                // missing member (how an absent `metadata.finalizers` is tested).
                let mut ops = call.body.as_array().cloned().unwrap_or_default();
                ops.retain(|op| {
                    let path = op["path"].as_str().unwrap_or_default();
                    !(op["op"] == "test" && op["value"].is_null() && machine.pointer(path).is_none())
                });
                let patch: json_patch::Patch = match serde_json::from_value(Value::Array(ops)) {
                    Ok(p) => p,
                    Err(e) => return status_error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
                };
                if let Err(e) = json_patch::patch(&mut machine, &patch) {
                    return status_error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &e.to_string());
                }
                state.resource_version += 1;
                machine["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
                let finalizers_left = machine["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
                let deleting = !machine["metadata"]["deletionTimestamp"].is_null();
                // The last finalizer gone from a deleting object: the server deletes it.
                state.machine = if deleting && !finalizers_left { None } else { Some(machine.clone()) };
                (StatusCode::OK, machine)
            }
            (&Method::PATCH, STATUS_PATH)
                if call.content_type.as_deref() == Some("application/apply-patch+yaml")
                    && call.query.iter().any(|(k, _)| k == "fieldManager") =>
            {
                if state.failing_status_writes > 0 {
                    state.failing_status_writes -= 1;
                    return status_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "InternalError",
                        "etcdserver: request timed out",
                    );
                }
                // One field manager owns all of status: the applied status is the result.
                let mut machine = state.machine.clone().unwrap();
                machine["status"] = call.body["status"].clone();
                state.resource_version += 1;
                machine["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
                state.machine = Some(machine.clone());
                (StatusCode::OK, machine)
            }
            _ => not_found(),
        }
    }
}

fn status_error(code: StatusCode, reason: &str, message: &str) -> (StatusCode, Value) {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    (code, body)
}

fn not_found() -> (StatusCode, Value) {
    status_error(StatusCode::NOT_FOUND, "NotFound", "machines.machinist.dev \"name\" not found")
}

// ---------------------------------------------------------------------------------------
// The harness: a Context over the mocked client and a fake store in a temporary dir
// ---------------------------------------------------------------------------------------

struct Harness {
    server: Arc<ApiServer>,
    ctx: Arc<Context>,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new(machine: &Machine) -> Harness {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let server = ApiServer::new(machine);
        tokio::spawn(server.clone().serve(handle));
        let ctx = Arc::new(Context {
            client: client.clone(),
            drivers: Drivers::new(dir.path()),
            events: EventPublisher::new(client, "machinist", Some("test".into())),
            settings: settings(),
            driver_call_timeout: Duration::from_secs(2),
            metrics: Arc::new(Metrics::default()),
            written: Default::default(),
            api_failures: Default::default(),
            fence: Default::default(),
            secret_cache: None,
            secret_locks: Default::default(),
            machine_cache: None,
            release_checks: Default::default(),
            secret_changes: Default::default(),
        });
        Harness { server, ctx, _dir: dir }
    }

    /// The Machine as the API server holds it now (what the next watch event delivers).
    fn machine(&self) -> Machine {
        let json = self.server.state.lock().unwrap().machine.clone().expect("the Machine still exists");
        serde_json::from_value(json).expect("the stored Machine parses")
    }

    fn deleted(&self) -> bool {
        self.server.state.lock().unwrap().machine.is_none()
    }

    /// One later reconcile of the stored Machine (a poll, or a change): the echo window
    /// of the last write has passed. Fails the test instead of hanging.
    async fn reconcile(&self) -> Result<Action, Error> {
        self.ctx.written.expire_settled();
        self.reconcile_echo().await
    }

    /// The reconcile that the watch event of machinist's own last write brings at once.
    async fn reconcile_echo(&self) -> Result<Action, Error> {
        self.reconcile_guard(DeserializeGuard(Ok(self.machine()))).await
    }

    async fn reconcile_guard(&self, guard: DeserializeGuard<Machine>) -> Result<Action, Error> {
        tokio::time::timeout(RECONCILE_TIMEOUT, reconcile(Arc::new(guard), self.ctx.clone()))
            .await
            .expect("the reconcile finished within the timeout")
    }

    fn error_policy(&self, error: &Error) -> Action {
        error_policy(Arc::new(DeserializeGuard(Ok(self.machine_or_test()))), error, self.ctx.clone())
    }

    fn machine_or_test(&self) -> Machine {
        let json = self.server.state.lock().unwrap().machine.clone();
        json.map_or_else(Machine::test, |j| serde_json::from_value(j).expect("the stored Machine parses"))
    }

    /// The requests received since the last call, in order.
    fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.server.state.lock().unwrap().calls)
    }

    /// Asserts that nothing reaches the API server, now or within a short window after.
    async fn assert_silent(&self) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let calls = self.take_calls();
        assert!(calls.is_empty(), "expected no requests, got {:?}", summaries(&calls));
    }

    /// The fake instances tagged with the test Machine's UID.
    fn instances(&self) -> Vec<InstanceRecord> {
        self.ctx.drivers.fake_store().instances_of(UID).expect("the fake store is readable")
    }

    fn store_is_empty(&self) -> bool {
        std::fs::read_dir(self.ctx.drivers.fake_store().dir()).expect("the store directory exists").next().is_none()
    }

    /// Creates an instance for the test Machine directly through the fake driver (as a
    /// controller that died right after Create would have left it).
    async fn create_instance(&self, fake: Value) -> String {
        let spec: MachineSpec = serde_json::from_value(json!({ "driver": { "fake": fake } })).unwrap();
        let driver =
            self.ctx.drivers.driver(&spec.driver, machine_ref(), Credentials::default()).expect("a fake driver");
        driver
            .create(&CreateRequest { ssh_public_key: None, ssh_port: None })
            .await
            .expect("the fake creates an instance")
    }
}

fn summaries(calls: &[Call]) -> Vec<String> {
    calls.iter().map(Call::summary).collect()
}

/// Asserts the requests are exactly these kinds, in order ("finalizer", "status",
/// "event:Type/Reason"), and returns them.
fn expect_calls(calls: Vec<Call>, expected: &[&str]) -> Vec<Call> {
    let kinds: Vec<String> = calls
        .iter()
        .map(|c| {
            if c.is_event() && c.method == Method::PATCH {
                // A repeat of an earlier Event: its series is bumped.
                format!("event-series:{}", c.body["series"]["count"])
            } else if c.is_event() {
                format!("event:{}/{}", c.body["type"].as_str().unwrap_or("?"), c.body["reason"].as_str().unwrap_or("?"))
            } else if c.path == STATUS_PATH {
                "status".to_string()
            } else if c.path == MACHINE_PATH {
                "finalizer".to_string()
            } else {
                c.summary()
            }
        })
        .collect();
    assert_eq!(kinds, expected, "requests: {:#?}", summaries(&calls));
    calls
}

// ---------------------------------------------------------------------------------------
// Assertions on single writes
// ---------------------------------------------------------------------------------------

fn assert_finalizer_added(call: &Call) {
    assert_eq!(call.method, Method::PATCH);
    assert_eq!(call.path, MACHINE_PATH);
    assert_eq!(call.query, [("fieldManager".to_string(), "machinist".to_string())], "machinist's own field manager");
    assert_eq!(call.content_type.as_deref(), Some("application/json-patch+json"));
    assert_eq!(
        call.body,
        json!([
            { "op": "test", "path": "/metadata/finalizers", "value": null },
            { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] },
        ])
    );
}

fn assert_finalizer_removed(call: &Call) {
    assert_eq!(call.method, Method::PATCH);
    assert_eq!(call.path, MACHINE_PATH);
    assert_eq!(call.query, [("fieldManager".to_string(), "machinist".to_string())], "machinist's own field manager");
    assert_eq!(call.content_type.as_deref(), Some("application/json-patch+json"));
    assert_eq!(
        call.body,
        json!([
            { "op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER },
            { "op": "remove", "path": "/metadata/finalizers/0" },
        ])
    );
}

/// Asserts a server-side apply of the status subresource under machinist's field
/// manager and returns the status it carries.
fn assert_status_apply(call: &Call) -> MachineStatus {
    assert_eq!(call.method, Method::PATCH);
    assert_eq!(call.path, STATUS_PATH);
    assert_eq!(
        call.query,
        vec![("fieldManager".to_string(), "machinist".to_string()), ("force".into(), "true".into())]
    );
    assert_eq!(call.content_type.as_deref(), Some("application/apply-patch+yaml"));
    assert_eq!(call.body["apiVersion"], "machinist.dev/v1alpha1");
    assert_eq!(call.body["kind"], "Machine");
    let keys: Vec<&String> = call.body.as_object().expect("an object").keys().collect();
    assert!(
        keys.iter().all(|k| ["apiVersion", "kind", "status", "metadata"].contains(&k.as_str())),
        "a status apply carries nothing but status: {keys:?}"
    );
    assert!(call.body.get("spec").is_none(), "a status apply must not carry spec");
    serde_json::from_value(call.body["status"].clone()).expect("the applied status parses")
}

/// Asserts an Event about the test Machine and returns its note.
fn assert_event(call: &Call, type_: &str, reason: &str) -> String {
    assert_eq!(call.method, Method::POST);
    assert_eq!(call.path, EVENTS_PATH);
    let event = &call.body;
    assert_eq!(event["type"], type_, "event: {event:#}");
    assert_eq!(event["reason"], reason, "event: {event:#}");
    assert_eq!(event["reportingController"], "machinist");
    assert_eq!(event["regarding"]["kind"], "Machine");
    assert_eq!(event["regarding"]["apiVersion"], "machinist.dev/v1alpha1");
    assert_eq!(event["regarding"]["name"], NAME);
    assert_eq!(event["regarding"]["namespace"], NS);
    assert_eq!(event["regarding"]["uid"], UID);
    assert!(event["action"].as_str().is_some_and(|a| !a.is_empty()), "an Event has an action: {event:#}");
    event["note"].as_str().unwrap_or_default().to_string()
}

fn condition<'a>(status: &'a MachineStatus, type_: &str) -> &'a machinist::api::Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("condition {type_} in {:#?}", status.conditions))
}

/// `Action` keeps its delay private; its Debug output is the only way to read it.
fn requeue_after(action: &Action) -> Option<Duration> {
    let debug = format!("{action:?}");
    let inner = debug.split("Some(").nth(1)?.split(')').next()?;
    let (number, unit) = inner.split_at(inner.find(|c: char| c.is_ascii_alphabetic() || c == 'µ')?);
    let number: f64 = number.parse().ok()?;
    let secs = match unit {
        "s" => number,
        "ms" => number / 1e3,
        "µs" => number / 1e6,
        "ns" => number / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

fn assert_poll(action: &Action) {
    let after = requeue_after(action).unwrap_or_else(|| panic!("a requeue, got {action:?}"));
    let poll = settings().poll_interval;
    assert!(after >= poll.mul_f64(0.9) && after <= poll.mul_f64(1.1), "a jittered poll around {poll:?}, got {after:?}");
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn finalizer_is_added_before_anything_else() {
    let h = Harness::new(&Machine::test());

    let action = h.reconcile().await.expect("the reconcile succeeds");

    assert_eq!(action, Action::await_change(), "the finalizer patch itself wakes the next reconcile");
    let calls = expect_calls(h.take_calls(), &["finalizer"]);
    assert_finalizer_added(&calls[0]);
    assert_eq!(h.machine().finalizers(), [FINALIZER]);
    assert!(h.store_is_empty(), "no driver call before the finalizer is on the object");
}

#[tokio::test]
async fn create_writes_provider_id_then_publishes_created() {
    let h = Harness::new(&Machine::test().finalized());

    let action = h.reconcile().await.expect("the reconcile succeeds");

    let calls = expect_calls(h.take_calls(), &["status", "event:Normal/Created"]);
    let status = assert_status_apply(&calls[0]);
    let instances = h.instances();
    assert_eq!(instances.len(), 1, "exactly one instance: {instances:#?}");
    let id = &instances[0].id;
    assert_eq!(status.provider_id.as_deref(), Some(id.as_str()));
    let created = condition(&status, "InstanceCreated");
    assert_eq!((created.status.as_str(), created.reason.as_str()), ("True", "Created"));
    assert_eq!(created.observed_generation, Some(1));
    let op = status.last_operation.as_ref().expect("lastOperation");
    assert_eq!(serde_json::to_value(op.operation).unwrap(), "Create");
    assert_eq!(serde_json::to_value(op.result).unwrap(), "Succeeded");
    assert_eq!(status.driver.as_deref(), Some("fake"));
    assert!(status.failures.is_none());
    let note = assert_event(&calls[1], "Normal", "Created");
    assert!(note.contains(id), "the Created event names the instance: {note}");
    assert_eq!(instances[0].calls("Create"), 1);
    assert_eq!(action, Action::requeue(settings().progress_interval));
    assert_eq!(h.machine().status, Some(status), "the server holds what was applied");
}

#[tokio::test]
async fn converged_machine_causes_no_writes() {
    let h = Harness::new(&Machine::test().finalized());
    // Create, then the reconcile the status write triggers, which sees it Running.
    h.reconcile().await.expect("create");
    expect_calls(h.take_calls(), &["status", "event:Normal/Created"]);
    let action = h.reconcile().await.expect("observe Running");
    let calls = expect_calls(h.take_calls(), &["status", "event:Normal/Ready"]);
    let status = assert_status_apply(&calls[0]);
    assert_eq!(serde_json::to_value(status.phase).unwrap(), "Running");
    assert_eq!(serde_json::to_value(status.state).unwrap(), "Running");
    assert_eq!(condition(&status, "Ready").status, "True");
    assert_eq!(condition(&status, "PowerStateSynced").status, "True");
    assert_eq!(status.observed_generation, Some(1));
    assert!(!status.addresses.is_empty(), "the addresses are recorded");
    assert_poll(&action);

    // Converged: the status is what that reconcile wrote and the instance is Running.
    let resource_version = h.machine().resource_version();
    for _ in 0..2 {
        let action = h.reconcile().await.expect("a converged reconcile succeeds");
        h.assert_silent().await;
        assert_poll(&action);
    }
    assert_eq!(h.machine().resource_version(), resource_version);
    let instances = h.instances();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].state, State::Running);
    assert_eq!(instances[0].calls("Create"), 1);
    assert_eq!(instances[0].calls("Start"), 0, "nothing but Create was ever called");
}

/// Converges a Machine (Create, then Ready), stops its instance out of band, and returns
/// the last reconcile's requeue: any later reconcile that asks the driver shows the stop.
async fn converge_then_stop_out_of_band(h: &Harness) -> Duration {
    h.reconcile().await.expect("create");
    let action = h.reconcile_echo().await.expect("the echo of the providerID write observes Running");
    expect_calls(h.take_calls(), &["status", "event:Normal/Created", "status", "event:Normal/Ready"]);
    assert_poll(&action);
    let id = h.instances()[0].id.clone();
    h.ctx.drivers.fake_store().set_state(UID, &id, State::Stopped).expect("stopped out of band");
    requeue_after(&action).expect("a poll")
}

#[tokio::test]
async fn the_echo_of_a_settled_write_asks_the_provider_nothing_and_keeps_the_poll() {
    let h = Harness::new(&Machine::test().finalized());
    let poll = converge_then_stop_out_of_band(&h).await;

    // The watch delivers the Ready write: nothing to decide that the writer did not.
    let action = h.reconcile_echo().await.expect("the echo reconcile succeeds");
    h.assert_silent().await;
    let after = requeue_after(&action).expect("the writer's poll is kept");
    assert!(after <= poll && after + Duration::from_secs(1) >= poll, "about {poll:?} still, got {after:?}");
    assert_eq!(h.instances()[0].state, State::Stopped, "no Start: the driver was not asked");

    // The poll then finds the stop.
    h.reconcile().await.expect("the poll succeeds");
    expect_calls(h.take_calls(), &["status", "event:Warning/StoppedOutOfBand", "status", "event:Normal/Started"]);
}

#[tokio::test]
async fn a_secret_change_since_the_settled_write_reconciles_its_echo_in_full() {
    let h = Harness::new(&Machine::test().finalized());
    converge_then_stop_out_of_band(&h).await;
    h.ctx.secret_changes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);

    h.reconcile_echo().await.expect("the reconcile succeeds");

    expect_calls(h.take_calls(), &["status", "event:Warning/StoppedOutOfBand", "status", "event:Normal/Started"]);
}

#[tokio::test]
async fn a_change_by_someone_else_after_the_settled_write_is_reconciled_in_full() {
    let h = Harness::new(&Machine::test().finalized());
    converge_then_stop_out_of_band(&h).await;
    {
        // A label added: a newer resourceVersion than machinist's write.
        let mut state = h.server.state.lock().unwrap();
        state.resource_version += 1;
        let version = state.resource_version.to_string();
        let machine = state.machine.as_mut().unwrap();
        machine["metadata"]["labels"] = json!({"team": "a"});
        machine["metadata"]["resourceVersion"] = json!(version);
    }

    h.reconcile_echo().await.expect("the reconcile succeeds");

    expect_calls(h.take_calls(), &["status", "event:Warning/StoppedOutOfBand", "status", "event:Normal/Started"]);
}

/// As the controller publishes them: from background workers. The Events of one object
/// keep their order (a series after its first Event), and a stop lets the queued ones out.
#[tokio::test]
async fn queued_events_keep_their_order_and_go_out_at_the_stop() {
    let h = Harness::new(&Machine::test());
    let (events, workers) = EventPublisher::new(h.ctx.client.clone(), "machinist", Some("test".into())).queued(4, 2);
    let reference = Machine::test().object_ref(&());
    for attempt in 1..=3 {
        let note = format!("attempt {attempt}");
        let event = EventNote { warning: true, reason: "CreateFailed", action: "Create", note: &note };
        events.publish(&reference, &event).await.expect("queued");
    }
    let created = EventNote { warning: false, reason: "Created", action: "Create", note: "created instance i-1" };
    events.publish(&reference, &created).await.expect("queued");

    workers.finish(Duration::from_secs(5)).await;

    let calls = expect_calls(
        h.take_calls(),
        &["event:Warning/CreateFailed", "event-series:2", "event-series:3", "event:Normal/Created"],
    );
    assert_eq!(calls[1].path, calls[2].path, "the repeats bump the first Event's series");
    assert!(calls[1].path.ends_with(calls[0].body["metadata"]["name"].as_str().unwrap()));
    // Nothing more is taken after the stop.
    events.publish(&reference, &created).await.expect("a stopped publisher drops Events quietly");
    h.assert_silent().await;
}

#[tokio::test]
async fn existing_instance_is_adopted_not_created_again() {
    let h = Harness::new(&Machine::test().finalized());
    let id = h.create_instance(json!({})).await;

    h.reconcile().await.expect("the reconcile succeeds");

    let calls = expect_calls(h.take_calls(), &["status", "event:Normal/Adopted", "event:Normal/Ready"]);
    let status = assert_status_apply(&calls[0]);
    assert_eq!(status.provider_id.as_deref(), Some(id.as_str()));
    assert_eq!(condition(&status, "InstanceCreated").status, "True");
    let note = assert_event(&calls[1], "Normal", "Adopted");
    assert!(note.contains(&id), "the Adopted event names the instance: {note}");
    let instances = h.instances();
    assert_eq!(instances.len(), 1, "still exactly one instance: {instances:#?}");
    assert_eq!(instances[0].id, id);
    assert_eq!(instances[0].calls("Create"), 1, "no second Create");

    // The adopted id is kept: the next reconcile writes nothing.
    h.reconcile().await.expect("the reconcile succeeds");
    h.assert_silent().await;
}

#[tokio::test]
async fn stop_shows_the_operation_in_progress_then_its_result() {
    let h = Harness::new(&Machine::test().finalized());
    h.reconcile().await.expect("create");
    h.reconcile().await.expect("observe Running");
    h.take_calls();
    // The user asks for Stopped (a spec change bumps the generation).
    {
        let mut state = h.server.state.lock().unwrap();
        let machine = state.machine.as_mut().unwrap();
        machine["spec"]["powerState"] = json!("Stopped");
        machine["metadata"]["generation"] = json!(2);
    }

    let action = h.reconcile().await.expect("the reconcile succeeds");

    let calls = expect_calls(h.take_calls(), &["status", "status", "event:Normal/Stopped"]);
    let begun = assert_status_apply(&calls[0]);
    let op = begun.last_operation.as_ref().expect("lastOperation while stopping");
    assert_eq!(serde_json::to_value(op.operation).unwrap(), "Stop");
    assert_eq!(serde_json::to_value(op.result).unwrap(), "InProgress");
    assert_eq!(serde_json::to_value(begun.phase).unwrap(), "Stopping");
    let done = assert_status_apply(&calls[1]);
    let op = done.last_operation.as_ref().expect("lastOperation after stopping");
    assert_eq!(serde_json::to_value(op.operation).unwrap(), "Stop");
    assert_eq!(serde_json::to_value(op.result).unwrap(), "Succeeded");
    assert_event(&calls[2], "Normal", "Stopped");
    let instances = h.instances();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].state, State::Stopped);
    assert_eq!(instances[0].calls("Stop"), 1);
    assert_eq!(action, Action::requeue(settings().progress_interval));

    // The next reconcile sees it Stopped as desired: one status write, no driver call.
    let action = h.reconcile().await.expect("the reconcile succeeds");
    let calls = expect_calls(h.take_calls(), &["status"]);
    let status = assert_status_apply(&calls[0]);
    assert_eq!(serde_json::to_value(status.phase).unwrap(), "Stopped");
    let ready = condition(&status, "Ready");
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "Stopped"));
    assert_eq!(condition(&status, "PowerStateSynced").status, "True");
    assert_eq!(status.observed_generation, Some(2));
    assert_poll(&action);
    h.reconcile().await.expect("the reconcile succeeds");
    h.assert_silent().await;
    assert_eq!(h.instances()[0].calls("Stop"), 1, "Stop is called once, not in a loop");
}

#[tokio::test]
async fn invalid_spec_is_reported_once_and_not_retried() {
    let h = Harness::new(&Machine::test().finalized().with_fake(json!({ "instanceType": "nope" })));

    let action = h.reconcile().await.expect("an invalid spec is not a reconcile error");

    assert_eq!(action, Action::await_change(), "no retry until the spec changes");
    let calls = expect_calls(h.take_calls(), &["status", "event:Warning/InvalidSpec"]);
    let status = assert_status_apply(&calls[0]);
    let ready = condition(&status, "Ready");
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "InvalidSpec"));
    assert!(ready.message.contains("spec.driver.fake.instanceType"), "the message names the field: {}", ready.message);
    assert!(status.provider_id.is_none());
    let note = assert_event(&calls[1], "Warning", "InvalidSpec");
    assert!(note.contains("spec.driver.fake.instanceType"), "the event names the field: {note}");
    assert!(h.store_is_empty(), "no instance created");

    // Nothing changed: no second write, no second Event.
    let action = h.reconcile().await.expect("the reconcile succeeds");
    assert_eq!(action, Action::await_change());
    h.assert_silent().await;
}

#[tokio::test]
async fn deletion_removes_the_instance_then_the_finalizer() {
    let h = Harness::new(&Machine::test().finalized());
    h.reconcile().await.expect("create");
    h.reconcile().await.expect("observe Running");
    h.take_calls();
    let id = h.instances()[0].id.clone();
    let deleting = h.machine().deleting();
    h.server.state.lock().unwrap().machine = Some(serde_json::to_value(&deleting).unwrap());

    let action = h.reconcile().await.expect("the reconcile succeeds");

    assert_eq!(action, Action::await_change());
    let calls = expect_calls(h.take_calls(), &["status", "event:Normal/Removed", "finalizer"]);
    let status = assert_status_apply(&calls[0]);
    let deleting = condition(&status, "Deleting");
    assert_eq!((deleting.status.as_str(), deleting.reason.as_str()), ("True", "Removing"));
    assert!(deleting.message.contains(&id), "names the instance: {}", deleting.message);
    assert_eq!(serde_json::to_value(status.phase).unwrap(), "Deleting");
    assert_eq!(condition(&status, "Ready").status, "False");
    assert_event(&calls[1], "Normal", "Removed");
    assert_finalizer_removed(&calls[2]);
    assert!(h.instances().is_empty(), "the instance is gone");
    assert!(h.store_is_empty(), "nothing left behind in the fake store");
    assert!(h.deleted(), "the server deleted the Machine once the finalizer was gone");
}

#[tokio::test]
async fn deletion_with_orphan_policy_keeps_the_instance() {
    let h = Harness::new(&Machine::test().finalized().with_spec("deletionPolicy", json!("Orphan")));
    h.reconcile().await.expect("create");
    h.take_calls();
    let id = h.instances()[0].id.clone();
    let deleting = h.machine().deleting();
    h.server.state.lock().unwrap().machine = Some(serde_json::to_value(&deleting).unwrap());

    let action = h.reconcile().await.expect("the reconcile succeeds");

    assert_eq!(action, Action::await_change());
    let calls = expect_calls(h.take_calls(), &["event:Normal/Orphaned", "finalizer"]);
    let note = assert_event(&calls[0], "Normal", "Orphaned");
    assert!(note.contains(&id), "the Orphaned event names the instance: {note}");
    assert_finalizer_removed(&calls[1]);
    let instances = h.instances();
    assert_eq!(instances.len(), 1, "the instance is left in place");
    assert_eq!(instances[0].id, id);
    assert_eq!(instances[0].calls("Remove"), 0);
    assert!(h.deleted());
}

#[tokio::test]
async fn failed_remove_keeps_the_finalizer_and_backs_off() {
    let fake = json!({ "failures": [{ "operation": "Remove", "count": 1 }] });
    let h = Harness::new(&Machine::test().finalized().with_fake(fake.clone()));
    let id = h.create_instance(fake).await;
    let status = MachineStatus { provider_id: Some(id.clone()), ..Default::default() };
    let machine = h.machine().with_status(status).deleting();
    h.server.state.lock().unwrap().machine = Some(serde_json::to_value(&machine).unwrap());

    let error = h.reconcile().await.expect_err("a failed Remove fails the reconcile");

    let calls = expect_calls(h.take_calls(), &["status", "status", "event:Warning/TransientError"]);
    let removing = assert_status_apply(&calls[0]);
    assert_eq!(condition(&removing, "Deleting").reason, "Removing");
    assert_event(&calls[2], "Warning", "TransientError");
    let failed = assert_status_apply(&calls[1]);
    let deleting = condition(&failed, "Deleting");
    assert_eq!((deleting.status.as_str(), deleting.reason.as_str()), ("True", "TransientError"));
    assert!(deleting.message.contains("finalizer"), "says the finalizer stays: {}", deleting.message);
    let failures = failed.failures.as_ref().expect("failures");
    assert_eq!((failures.count, failures.reason.as_str()), (1, "TransientError"));
    let op = failed.last_operation.as_ref().expect("lastOperation");
    assert_eq!(serde_json::to_value(op.operation).unwrap(), "Remove");
    assert_eq!(serde_json::to_value(op.result).unwrap(), "Failed");
    assert_eq!(h.machine().finalizers(), [FINALIZER], "the finalizer stays");
    assert_eq!(h.instances().len(), 1, "the instance is still there");

    // The error's requeue is the backoff the status shows.
    let next = failures.next_retry_time.as_ref().expect("nextRetryTime").0;
    let backoff = Duration::try_from(next.duration_since(op.time.0)).unwrap();
    // The first retry: the 10s base with up to 20% jitter, in whole seconds.
    assert!((8..=12).contains(&backoff.as_secs()), "backoff {backoff:?}");
    assert_eq!(error.metric_label(), "DeletionWaits");
    assert_eq!(h.error_policy(&error), Action::requeue(backoff));

    // Before the retry is due: no Remove, no writes.
    let error = h.reconcile().await.expect_err("still waiting");
    h.assert_silent().await;
    assert_eq!(h.instances().len(), 1);
    let waiting = requeue_after(&h.error_policy(&error)).expect("a requeue");
    assert!(waiting <= backoff && waiting > Duration::ZERO, "waits for the rest of the backoff: {waiting:?}");
}

#[tokio::test]
async fn malformed_object_is_reported_and_not_retried() {
    let h = Harness::new(&Machine::test());
    let mut metadata = Machine::test().metadata;
    metadata.name = Some(NAME.into());
    let invalid = InvalidObject { error: "spec.powerState: unknown variant `Sideways`".into(), metadata };

    let error = h.reconcile_guard(DeserializeGuard(Err(invalid))).await.expect_err("an unreadable object");

    let calls = expect_calls(h.take_calls(), &["event:Warning/InvalidObject"]);
    let note = assert_event(&calls[0], "Warning", "InvalidObject");
    assert!(note.contains("Sideways"), "the event says what is wrong: {note}");
    assert_eq!(error.metric_label(), "InvalidObject");
    assert_eq!(h.error_policy(&error), Action::await_change());
    assert!(h.store_is_empty());
}

#[tokio::test]
async fn status_write_for_a_deleted_machine_is_not_an_error() {
    let h = Harness::new(&Machine::test().finalized().with_fake(json!({ "instanceType": "nope" })));
    h.server.state.lock().unwrap().machine = None;

    // The Machine is gone (404): nothing to report on, not an error.
    let machine = Machine::test().finalized().with_fake(json!({ "instanceType": "nope" }));
    let action = h.reconcile_guard(DeserializeGuard(Ok(machine))).await.expect("a 404 on status is not an error");
    assert_eq!(action, Action::await_change());
    let calls = expect_calls(h.take_calls(), &["status", "event:Warning/InvalidSpec"]);
    assert_status_apply(&calls[0]);
}

#[tokio::test]
async fn deletion_with_unreadable_credentials_keeps_the_finalizer_and_says_why() {
    let machine = Machine::test().finalized().with_spec("credentialsSecretRef", json!({ "name": "creds" }));
    let h = Harness::new(&machine);
    let id = h.create_instance(json!({})).await;
    let status = MachineStatus { provider_id: Some(id.clone()), ..Default::default() };
    let machine = h.machine().with_status(status).deleting();
    h.server.state.lock().unwrap().machine = Some(serde_json::to_value(&machine).unwrap());

    let error = h.reconcile().await.expect_err("deletion waits for the credentials");

    let calls = h.take_calls();
    assert_eq!(calls[0].method, Method::GET);
    assert_eq!(calls[0].path, "/api/v1/namespaces/ns/secrets/creds");
    // No "Removing" write: Remove is never called without credentials.
    let calls = expect_calls(calls[1..].to_vec(), &["status", "event:Warning/InvalidSpec"]);
    let note = assert_event(&calls[1], "Warning", "InvalidSpec");
    assert!(note.contains("ns/creds") && note.contains("does not exist"), "the event names the missing Secret: {note}");
    let failed = assert_status_apply(&calls[0]);
    let deleting = condition(&failed, "Deleting");
    assert_eq!((deleting.status.as_str(), deleting.reason.as_str()), ("True", "InvalidSpec"));
    assert!(deleting.message.contains("ns/creds"), "names the missing Secret: {}", deleting.message);
    assert!(deleting.message.contains("deletionPolicy: Orphan"), "says the way out: {}", deleting.message);
    assert_eq!(h.machine().finalizers(), [FINALIZER], "the finalizer stays");
    assert_eq!(h.instances().len(), 1, "nothing removed without credentials");
    // Not retried on a timer: the Secret watch brings the Machine back when it appears.
    assert_eq!(requeue_after(&h.error_policy(&error)), None);
}

#[tokio::test]
async fn instance_stopped_out_of_band_is_started_and_the_reason_recorded() {
    let h = Harness::new(&Machine::test().finalized());
    h.reconcile().await.expect("create");
    h.reconcile().await.expect("observe Running");
    h.take_calls();
    let id = h.instances()[0].id.clone();
    h.ctx.drivers.fake_store().set_state(UID, &id, State::Stopped).expect("stopped out of band");

    let action = h.reconcile().await.expect("the reconcile succeeds");

    let calls =
        expect_calls(h.take_calls(), &["status", "event:Warning/StoppedOutOfBand", "status", "event:Normal/Started"]);
    let begun = assert_status_apply(&calls[0]);
    let synced = condition(&begun, "PowerStateSynced");
    assert_eq!((synced.status.as_str(), synced.reason.as_str()), ("False", "Starting"));
    assert!(synced.message.contains("out of band"), "the reason is recorded: {}", synced.message);
    let op = begun.last_operation.as_ref().expect("lastOperation");
    assert_eq!(serde_json::to_value(op.operation).unwrap(), "Start");
    assert_eq!(serde_json::to_value(op.result).unwrap(), "InProgress");
    let done = assert_status_apply(&calls[2]);
    let op = done.last_operation.as_ref().expect("lastOperation");
    assert_eq!(serde_json::to_value(op.operation).unwrap(), "Start");
    assert_eq!(serde_json::to_value(op.result).unwrap(), "Succeeded");
    assert!(op.message.contains("out of band"), "{}", op.message);
    assert_event(&calls[1], "Warning", "StoppedOutOfBand");
    assert_event(&calls[3], "Normal", "Started");
    assert_eq!(action, Action::requeue(settings().progress_interval));
    let instances = h.instances();
    assert_eq!(instances[0].state, State::Running);
    assert_eq!(instances[0].calls("Start"), 1);

    // Running again: one write back to Running/Ready, then silence; Start is not repeated.
    // A repeated transition (Ready again) is an Event of its own; only Warnings form series.
    h.reconcile().await.expect("the reconcile succeeds");
    let calls = expect_calls(h.take_calls(), &["status", "event:Normal/Ready"]);
    assert_eq!(condition(&assert_status_apply(&calls[0]), "Ready").status, "True");
    h.reconcile().await.expect("the reconcile succeeds");
    h.assert_silent().await;
    assert_eq!(h.instances()[0].calls("Start"), 1);
}

#[tokio::test]
async fn paused_machine_calls_no_driver() {
    let mut machine = Machine::test().finalized();
    machine.annotations_mut().insert(machinist::api::PAUSED_ANNOTATION.into(), String::new());
    let h = Harness::new(&machine);

    let action = h.reconcile().await.expect("the reconcile succeeds");

    assert_eq!(action, Action::await_change());
    let calls = expect_calls(h.take_calls(), &["status", "event:Normal/Paused"]);
    let status = assert_status_apply(&calls[0]);
    let paused = condition(&status, "Paused");
    assert_eq!((paused.status.as_str(), paused.reason.as_str()), ("True", "Paused"));
    assert!(status.provider_id.is_none());
    assert!(h.store_is_empty(), "nothing called on the driver while paused");
    h.reconcile().await.expect("the reconcile succeeds");
    h.assert_silent().await;
}

#[tokio::test]
async fn failed_status_write_after_create_leads_to_adoption_not_a_second_instance() {
    let h = Harness::new(&Machine::test().finalized());
    h.server.state.lock().unwrap().failing_status_writes = 1;

    let error = h.reconcile().await.expect_err("the providerID could not be written");

    assert_eq!(error.metric_label(), "KubeError");
    // Kubernetes API failures back off per Machine: growing, capped, until a success.
    let delays: Vec<Duration> = (0..12).map(|_| requeue_after(&h.error_policy(&error)).expect("a requeue")).collect();
    let first = settings().backoff_base.mul_f64(1.2);
    assert!(delays[0] <= first, "{delays:?}");
    assert!(delays[6] > delays[0] * 4, "{delays:?}");
    assert!(delays.iter().all(|d| *d <= settings().backoff_cap), "{delays:?}");
    // The refused write, and no Created event for a fact the API does not hold.
    let calls = expect_calls(h.take_calls(), &["status"]);
    assert!(assert_status_apply(&calls[0]).provider_id.is_some());
    assert!(h.machine().status.is_none(), "the server stored nothing");
    let id = h.instances()[0].id.clone();

    // The retry finds the tagged instance and adopts it; the backoff starts over.
    h.reconcile().await.expect("the retry succeeds");
    assert!(requeue_after(&h.error_policy(&error)).expect("a requeue") <= settings().backoff_base.mul_f64(1.2));
    let calls = expect_calls(h.take_calls(), &["status", "event:Normal/Adopted", "event:Normal/Ready"]);
    assert_eq!(assert_status_apply(&calls[0]).provider_id, Some(id));
    let instances = h.instances();
    assert_eq!(instances.len(), 1, "never two instances for one Machine: {instances:#?}");
    assert_eq!(instances[0].calls("Create"), 1);
}
