//! The fake driver's own tests, through the crate's public API only.
//!
//! The fake driver keeps time with the wall clock (its records hold timestamps so that
//! they survive a controller restart), so the latency tests use real, short latencies
//! rather than tokio's paused clock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use machinist_drivers::fake::{
    FailureRule, FakeConfig, FakeDriver, FakeErrorKind, FakeLatency, FakeStore, GracefulStop, INSTANCE_TYPES,
};
use machinist_drivers::{
    AddressType, CreateRequest, Credentials, Driver, DriverError, DriverSpec, Drivers, MachineRef, Operation, State,
};
use tempfile::TempDir;

/// Latency for the tests that look at an operation while it is in flight: long enough
/// that a loaded machine still sees the intermediate state, short enough for the suite.
const IN_FLIGHT: u32 = 800;

fn machine(uid: &str) -> MachineRef {
    MachineRef {
        uid: uid.to_string(),
        name: format!("machine-{uid}"),
        namespace: "default".to_string(),
        ..Default::default()
    }
}

fn spec(config: FakeConfig) -> DriverSpec {
    DriverSpec { fake: Some(config), ..DriverSpec::default() }
}

fn driver(drivers: &Drivers, uid: &str, config: FakeConfig) -> Arc<dyn Driver> {
    match drivers.driver(&spec(config), machine(uid), Credentials::default()) {
        Ok(driver) => driver,
        Err(e) => panic!("driver for {uid}: {e}"),
    }
}

/// The error `Drivers::driver` returns (`Arc<dyn Driver>` is not `Debug`, so no `unwrap_err`).
fn driver_error(drivers: &Drivers, spec: &DriverSpec) -> DriverError {
    match drivers.driver(spec, machine("m-invalid"), Credentials::default()) {
        Ok(_) => panic!("expected the driver to be refused"),
        Err(e) => e,
    }
}

fn rule(operation: Operation) -> FailureRule {
    FailureRule {
        operation,
        count: None,
        probability: None,
        error: FakeErrorKind::default(),
        retry_after_seconds: None,
        message: None,
    }
}

fn count_rule(operation: Operation, count: u32) -> FailureRule {
    FailureRule { count: Some(count), ..rule(operation) }
}

fn probability_rule(operation: Operation, probability: f64) -> FailureRule {
    FailureRule { probability: Some(probability), ..rule(operation) }
}

fn failing(rules: Vec<FailureRule>) -> FakeConfig {
    FakeConfig { failures: rules, ..FakeConfig::default() }
}

fn with_latency(latency: FakeLatency) -> FakeConfig {
    FakeConfig { latency_millis: Some(Box::new(latency)), ..FakeConfig::default() }
}

fn request() -> CreateRequest {
    CreateRequest::default()
}

/// Waits (polling, bounded) until `check` holds; panics with `what` otherwise.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn assert_invalid_config(error: DriverError, expected_field: &str) {
    match error {
        DriverError::InvalidConfig { field, message } => {
            assert_eq!(field, expected_field, "message: {message}");
            assert!(!message.is_empty());
        }
        other => panic!("expected InvalidConfig for {expected_field}, got {other:?}"),
    }
}

fn assert_not_found<T: std::fmt::Debug>(result: Result<T, DriverError>) {
    match result {
        Err(DriverError::NotFound { .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// 1. Lifecycle
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn lifecycle_create_find_stop_start_restart_kill_remove() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let store = drivers.fake_store().clone();
    let uid = "3f6c1a2e-0b7d-4c1e-9a55-5d0f2a7c9e11";
    let d = driver(&drivers, uid, FakeConfig::default());
    assert_eq!(d.name(), "fake");
    assert!(!d.offers_ssh());

    assert_eq!(d.find().await.unwrap(), None, "nothing before create");

    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake test@machinist".to_string();
    let id = d.create(&CreateRequest { ssh_public_key: Some(key.clone()), ssh_port: None }).await.unwrap();
    assert!(id.starts_with("fake-"), "{id}");

    // Found again by the Machine's UID, and tagged with it.
    let found = d.find().await.unwrap().expect("find after create");
    assert_eq!(found.id, id);
    assert_eq!(found.state, State::Running);
    let record = store.get(uid, &id).unwrap().expect("record");
    assert_eq!(record.machine_uid, uid);
    assert_eq!(record.machine_name, format!("machine-{uid}"));
    assert_eq!(record.namespace, "default");
    assert_eq!(record.instance_type, "fake.small");
    assert_eq!(record.authorized_keys, vec![key]);
    assert_eq!(record.calls("Create"), 1);
    assert!(dir.path().join(uid).join(format!("{id}.json")).is_file());

    assert_eq!(d.status(&id).await.unwrap(), State::Running);
    let addresses = d.addresses(&id).await.unwrap();
    assert_eq!(addresses.len(), 2);
    assert_eq!(addresses[0].kind, AddressType::InternalIP);
    assert!(addresses[0].address.starts_with("192.0.2."), "{:?}", addresses[0]);
    assert_eq!(addresses[1].kind, AddressType::Hostname);
    assert!(addresses[1].address.contains(&id));
    assert_eq!(d.ssh_endpoint(&id).await.unwrap(), None);

    d.stop(&id).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Stopped);
    assert_eq!(d.find().await.unwrap().unwrap().state, State::Stopped);

    d.start(&id).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Running);

    d.restart(&id).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Running);

    let record = store.get(uid, &id).unwrap().unwrap();
    for operation in ["Create", "Stop", "Start", "Restart"] {
        assert_eq!(record.calls(operation), 1, "calls of {operation}: {:?}", record.calls);
    }
    assert_eq!(record.calls("Kill"), 0);

    d.kill(&id).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Stopped);
    assert_eq!(store.get(uid, &id).unwrap().unwrap().calls("Kill"), 1);

    d.remove(&id).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::NotFound);
    assert_eq!(d.find().await.unwrap(), None);
    assert_eq!(store.get(uid, &id).unwrap(), None);
    assert!(store.instances_of(uid).unwrap().is_empty());
    assert!(!dir.path().join(uid).exists(), "the Machine's directory is gone");
}

#[tokio::test]
async fn instances_are_tagged_per_machine() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let a = driver(&drivers, "uid-a", FakeConfig::default());
    let b = driver(&drivers, "uid-b", FakeConfig::default());
    let id_a = a.create(&request()).await.unwrap();
    let id_b = b.create(&request()).await.unwrap();
    assert_ne!(id_a, id_b);
    assert_eq!(a.find().await.unwrap().unwrap().id, id_a);
    assert_eq!(b.find().await.unwrap().unwrap().id, id_b);
    // One Machine's driver cannot see or touch another's instance.
    assert_eq!(b.status(&id_a).await.unwrap(), State::NotFound);
    assert_not_found(b.stop(&id_a).await);
    b.remove(&id_a).await.unwrap();
    assert_eq!(a.status(&id_a).await.unwrap(), State::Running);
    // Removing b's only instance drops b's directory, not a's.
    b.remove(&id_b).await.unwrap();
    assert!(!dir.path().join("uid-b").exists());
    assert!(dir.path().join("uid-a").exists());
}

#[tokio::test]
async fn instance_type_is_recorded() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let config = FakeConfig { instance_type: Some("fake.large".into()), ..FakeConfig::default() };
    let d = driver(&drivers, "uid-large", config);
    let id = d.create(&request()).await.unwrap();
    let record = drivers.fake_store().get("uid-large", &id).unwrap().unwrap();
    assert_eq!(record.instance_type, "fake.large");
    assert!(record.authorized_keys.is_empty());
}

// ---------------------------------------------------------------------------------------
// 2. Persistence
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn instances_survive_a_controller_restart() {
    let dir = TempDir::new().unwrap();
    let uid = "uid-persist";
    let id = {
        let drivers = Drivers::new(dir.path());
        let d = driver(&drivers, uid, FakeConfig::default());
        let id = d.create(&request()).await.unwrap();
        d.stop(&id).await.unwrap();
        id
    };

    // A new controller process: new Drivers, new FakeStore, same directory.
    let drivers = Drivers::new(dir.path());
    let d = driver(&drivers, uid, FakeConfig::default());
    let found = d.find().await.unwrap().expect("adopted after restart");
    assert_eq!(found.id, id);
    assert_eq!(found.state, State::Stopped);
    assert_eq!(d.status(&id).await.unwrap(), State::Stopped);
    let store = FakeStore::new(dir.path());
    assert_eq!(store.instances_of(uid).unwrap().len(), 1);
    assert_eq!(store.get(uid, &id).unwrap().unwrap().calls("Stop"), 1);

    // A second driver for the same Machine finds it too; one for another Machine does not.
    let again = driver(&drivers, uid, FakeConfig::default());
    assert_eq!(again.find().await.unwrap().map(|i| i.id), Some(id.clone()));
    let other = driver(&drivers, "uid-other", FakeConfig::default());
    assert_eq!(other.find().await.unwrap(), None);
    assert_eq!(other.status(&id).await.unwrap(), State::NotFound);

    // And the adopted instance can be driven on.
    d.start(&id).await.unwrap();
    assert_eq!(again.status(&id).await.unwrap(), State::Running);
}

// ---------------------------------------------------------------------------------------
// 3. Latency
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn create_is_visible_as_starting_while_in_flight() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let store = drivers.fake_store().clone();
    let uid = "uid-latency";
    let config = with_latency(FakeLatency { create: Some(IN_FLIGHT), ..FakeLatency::default() });
    let d = driver(&drivers, uid, config);

    let started = Instant::now();
    let create = tokio::spawn({
        let d = d.clone();
        async move { d.create(&request()).await }
    });
    eventually("the instance to appear", || !store.instances_of(uid).unwrap().is_empty()).await;

    let found = d.find().await.unwrap().expect("visible mid-create");
    assert!(!create.is_finished(), "create still in flight");
    assert_eq!(found.state, State::Starting);
    assert_eq!(d.status(&found.id).await.unwrap(), State::Starting);
    assert!(!create.is_finished(), "create still in flight");

    let id = create.await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(IN_FLIGHT.into()), "create took its latency");
    assert_eq!(id, found.id);
    assert_eq!(d.status(&id).await.unwrap(), State::Running);
    assert_eq!(d.find().await.unwrap().unwrap().state, State::Running);
    assert_eq!(store.instances_of(uid).unwrap().len(), 1);
}

#[tokio::test]
async fn an_abandoned_create_still_boots_one_instance() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let store = drivers.fake_store().clone();
    let uid = "uid-abandoned";
    let config = with_latency(FakeLatency { create: Some(IN_FLIGHT), ..FakeLatency::default() });
    let d = driver(&drivers, uid, config.clone());

    // The controller is killed mid-call: the create future is dropped before it returns.
    let dropped = tokio::time::timeout(Duration::from_millis(20), d.create(&request())).await;
    assert!(dropped.is_err(), "create was cut short");

    let records = store.instances_of(uid).unwrap();
    assert_eq!(records.len(), 1, "exactly one instance: {records:?}");
    let id = records[0].id.clone();
    // A new controller finds it booting, and it boots on its own.
    let after_restart = driver(&Drivers::new(dir.path()), uid, config);
    let found = after_restart.find().await.unwrap().expect("adoptable");
    assert_eq!(found.id, id);
    assert_eq!(found.state, State::Starting);
    eventually("the abandoned instance to be Running", || {
        store.get(uid, &id).unwrap().unwrap().state_at(jiff::Timestamp::now()) == State::Running
    })
    .await;
    assert_eq!(after_restart.status(&id).await.unwrap(), State::Running);
    assert_eq!(store.instances_of(uid).unwrap().len(), 1);
}

#[tokio::test]
async fn an_aborted_create_task_still_boots_one_instance() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let store = drivers.fake_store().clone();
    let uid = "uid-aborted";
    let config = with_latency(FakeLatency { create: Some(IN_FLIGHT), ..FakeLatency::default() });
    let d = driver(&drivers, uid, config);

    let create = tokio::spawn({
        let d = d.clone();
        async move { d.create(&request()).await }
    });
    eventually("the instance to appear", || !store.instances_of(uid).unwrap().is_empty()).await;
    create.abort();
    assert!(create.await.unwrap_err().is_cancelled());

    let records = store.instances_of(uid).unwrap();
    assert_eq!(records.len(), 1);
    let id = records[0].id.clone();
    assert_eq!(d.status(&id).await.unwrap(), State::Starting);
    let done_at = records[0].transition.expect("a boot under way").at;
    let wait = done_at.duration_since(jiff::Timestamp::now());
    tokio::time::sleep(Duration::try_from(wait).unwrap_or_default() + Duration::from_millis(20)).await;
    assert_eq!(d.status(&id).await.unwrap(), State::Running);
    assert_eq!(d.find().await.unwrap().unwrap().id, id);
    assert_eq!(store.instances_of(uid).unwrap().len(), 1);
}

#[tokio::test]
async fn transitions_show_the_intermediate_state_while_in_flight() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let store = drivers.fake_store().clone();
    let uid = "uid-transitions";
    let latency = 300;
    let config = with_latency(FakeLatency {
        default: Some(latency),
        create: Some(0),
        status: Some(0),
        ..FakeLatency::default()
    });
    let d = driver(&drivers, uid, config);
    let id = d.create(&request()).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Running);

    let steps = [
        (Operation::Stop, State::Stopping, State::Stopped),
        (Operation::Start, State::Starting, State::Running),
        (Operation::Restart, State::Starting, State::Running),
        (Operation::Kill, State::Stopping, State::Stopped),
    ];
    for (operation, via, to) in steps {
        let call = tokio::spawn({
            let (d, id) = (d.clone(), id.clone());
            async move {
                match operation {
                    Operation::Stop => d.stop(&id).await,
                    Operation::Start => d.start(&id).await,
                    Operation::Restart => d.restart(&id).await,
                    Operation::Kill => d.kill(&id).await,
                    _ => unreachable!(),
                }
            }
        });
        eventually(&format!("{operation} to be accepted"), || {
            store.get(uid, &id).unwrap().unwrap().calls(operation.as_str()) == 1
        })
        .await;
        assert_eq!(d.status(&id).await.unwrap(), via, "during {operation}");
        assert!(!call.is_finished(), "{operation} still in flight");
        call.await.unwrap().unwrap();
        assert_eq!(d.status(&id).await.unwrap(), to, "after {operation}");
    }
}

#[tokio::test]
async fn status_latency_applies_to_read_calls() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let latency = Duration::from_millis(150);
    let config = with_latency(FakeLatency { status: Some(150), ..FakeLatency::default() });
    let d = driver(&drivers, "uid-status-latency", config);
    let t = Instant::now();
    let id = d.create(&request()).await.unwrap();
    assert!(t.elapsed() < latency, "create has no latency");
    let t = Instant::now();
    assert_eq!(d.status(&id).await.unwrap(), State::Running);
    assert!(t.elapsed() >= latency, "status");
    let t = Instant::now();
    d.find().await.unwrap().unwrap();
    assert!(t.elapsed() >= latency, "find");
    let t = Instant::now();
    d.addresses(&id).await.unwrap();
    assert!(t.elapsed() >= latency, "addresses");
}

// ---------------------------------------------------------------------------------------
// 4. Failure injection
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn count_fails_the_next_calls_then_succeeds() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let store = drivers.fake_store().clone();
    let uid = "uid-count";
    let config =
        failing(vec![FailureRule { message: Some("out of capacity".into()), ..count_rule(Operation::Create, 2) }]);
    let d = driver(&drivers, uid, config);

    for attempt in 1..=2 {
        match d.create(&request()).await {
            Err(DriverError::Transient { message, retry_after }) => {
                assert_eq!(message, "out of capacity");
                assert_eq!(retry_after, None);
            }
            other => panic!("attempt {attempt}: expected the injected Transient, got {other:?}"),
        }
        assert!(store.instances_of(uid).unwrap().is_empty(), "a failed create leaves nothing");
    }
    let id = d.create(&request()).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Running);
    // Exhausted: further calls succeed too.
    let second = d.create(&request()).await.unwrap();
    assert_ne!(id, second);
    assert_eq!(store.instances_of(uid).unwrap().len(), 2);
    let counts = store.failure_counts(uid).unwrap();
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![2], "{counts:?}");
}

#[tokio::test]
async fn failed_transitions_change_nothing() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let store = drivers.fake_store().clone();
    let uid = "uid-failed-stop";
    let d = driver(&drivers, uid, failing(vec![count_rule(Operation::Stop, 1)]));
    let id = d.create(&request()).await.unwrap();
    assert!(matches!(d.stop(&id).await, Err(DriverError::Transient { .. })));
    assert_eq!(d.status(&id).await.unwrap(), State::Running);
    assert_eq!(store.get(uid, &id).unwrap().unwrap().calls("Stop"), 0);
    d.stop(&id).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Stopped);
    assert_eq!(store.get(uid, &id).unwrap().unwrap().calls("Stop"), 1);
}

#[tokio::test]
async fn failure_counters_persist_across_driver_objects() {
    let dir = TempDir::new().unwrap();
    let uid = "uid-counters";
    let config = failing(vec![count_rule(Operation::Start, 2)]);
    let setup = driver(&Drivers::new(dir.path()), uid, FakeConfig::default());
    let id = setup.create(&request()).await.unwrap();

    let first = driver(&Drivers::new(dir.path()), uid, config.clone());
    assert!(first.start(&id).await.is_err());
    drop(first);

    // A controller restart: the rule already failed once, so one failure is left.
    let second = driver(&Drivers::new(dir.path()), uid, config.clone());
    assert!(second.start(&id).await.is_err());
    second.start(&id).await.unwrap();
    let third = driver(&Drivers::new(dir.path()), uid, config);
    third.start(&id).await.unwrap();
}

#[tokio::test]
async fn a_changed_rule_starts_a_fresh_count() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let uid = "uid-changed";
    let id = driver(&drivers, uid, FakeConfig::default()).create(&request()).await.unwrap();

    let original = count_rule(Operation::Restart, 1);
    let d = driver(&drivers, uid, failing(vec![original.clone()]));
    assert!(d.restart(&id).await.is_err());
    d.restart(&id).await.unwrap();

    // Same rule, new message: counted afresh.
    let messaged = FailureRule { message: Some("try again".into()), ..original.clone() };
    let d = driver(&drivers, uid, failing(vec![messaged.clone()]));
    match d.restart(&id).await {
        Err(DriverError::Transient { message, .. }) => assert_eq!(message, "try again"),
        other => panic!("expected the changed rule to fail afresh, got {other:?}"),
    }
    d.restart(&id).await.unwrap();

    // A larger count: counted afresh, not from where the old rule stopped.
    let d = driver(&drivers, uid, failing(vec![FailureRule { count: Some(2), ..messaged }]));
    assert!(d.restart(&id).await.is_err());
    assert!(d.restart(&id).await.is_err());
    d.restart(&id).await.unwrap();

    // Going back to an exhausted rule does not fail again.
    let d = driver(&drivers, uid, failing(vec![original]));
    d.restart(&id).await.unwrap();
}

#[tokio::test]
async fn probability_one_always_fails_and_zero_never() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let uid = "uid-probability";
    let id = driver(&drivers, uid, FakeConfig::default()).create(&request()).await.unwrap();

    let always = driver(&drivers, uid, failing(vec![probability_rule(Operation::Status, 1.0)]));
    let never = driver(&drivers, uid, failing(vec![probability_rule(Operation::Status, 0.0)]));
    for _ in 0..50 {
        assert!(matches!(always.status(&id).await, Err(DriverError::Transient { .. })));
        assert_eq!(never.status(&id).await.unwrap(), State::Running);
    }
}

#[tokio::test]
async fn each_error_kind_maps_to_its_driver_error() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let uid = "uid-kinds";

    let kinds = [
        FakeErrorKind::Transient,
        FakeErrorKind::RateLimited,
        FakeErrorKind::InvalidConfig,
        FakeErrorKind::NotSupported,
        FakeErrorKind::NotFound,
    ];
    for kind in kinds {
        // Index 1, after a rule of another operation, so the default message and the
        // InvalidConfig field name the rule's own index.
        let config = failing(vec![
            count_rule(Operation::Kill, 1),
            FailureRule { error: kind, ..count_rule(Operation::Create, 1) },
        ]);
        let d = driver(&drivers, uid, config);
        let error = d.create(&request()).await.unwrap_err();
        let message = match &error {
            DriverError::Transient { message, retry_after } if kind == FakeErrorKind::Transient => {
                assert_eq!(*retry_after, None);
                message
            }
            DriverError::RateLimited { message, retry_after } if kind == FakeErrorKind::RateLimited => {
                assert_eq!(*retry_after, Duration::from_secs(5), "default retry-after");
                message
            }
            DriverError::InvalidConfig { field, message } if kind == FakeErrorKind::InvalidConfig => {
                assert_eq!(field, "spec.driver.fake.failures[1]");
                message
            }
            DriverError::NotSupported { operation, message } if kind == FakeErrorKind::NotSupported => {
                assert_eq!(*operation, Operation::Create);
                message
            }
            DriverError::NotFound { message } if kind == FakeErrorKind::NotFound => message,
            other => panic!("{kind:?} mapped to {other:?}"),
        };
        assert!(message.contains("failures[1]"), "default message names the rule: {message}");
        assert!(message.contains("Create"), "default message names the operation: {message}");
        // Count 1: the next create succeeds.
        d.create(&request()).await.unwrap();
    }
}

#[tokio::test]
async fn rate_limited_carries_the_configured_retry_after() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let config = failing(vec![FailureRule {
        error: FakeErrorKind::RateLimited,
        retry_after_seconds: Some(42),
        message: Some("slow down".into()),
        ..probability_rule(Operation::Create, 1.0)
    }]);
    let error = driver(&drivers, "uid-rate", config).create(&request()).await.unwrap_err();
    assert_eq!(error, DriverError::RateLimited { message: "slow down".into(), retry_after: Duration::from_secs(42) });
    assert_eq!(error.retry_after(), Some(Duration::from_secs(42)));
    assert_eq!(error.reason(), "RateLimited");
}

#[tokio::test]
async fn failures_apply_to_their_operation_only() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let uid = "uid-scope";

    // A Stop rule fails stop and nothing else.
    let d = driver(&drivers, uid, failing(vec![probability_rule(Operation::Stop, 1.0)]));
    let id = d.create(&request()).await.unwrap();
    assert!(d.stop(&id).await.is_err());
    assert_eq!(d.status(&id).await.unwrap(), State::Running);
    assert!(d.find().await.unwrap().is_some());
    d.addresses(&id).await.unwrap();
    d.kill(&id).await.unwrap();
    d.start(&id).await.unwrap();
    d.restart(&id).await.unwrap();
    assert!(d.stop(&id).await.is_err());

    // A Status rule fails status, find and addresses, and no change.
    let d = driver(&drivers, uid, failing(vec![probability_rule(Operation::Status, 1.0)]));
    assert!(d.status(&id).await.is_err());
    assert!(d.find().await.is_err());
    assert!(d.addresses(&id).await.is_err());
    d.stop(&id).await.unwrap();
    d.start(&id).await.unwrap();
    d.restart(&id).await.unwrap();
    d.kill(&id).await.unwrap();
    let other = d.create(&request()).await.unwrap();
    d.remove(&other).await.unwrap();
    assert_eq!(drivers.fake_store().get(uid, &id).unwrap().unwrap().state, State::Stopped);

    // A Remove rule fails remove (and leaves the instance), nothing else.
    let d = driver(&drivers, uid, failing(vec![count_rule(Operation::Remove, 1)]));
    assert!(d.remove(&id).await.is_err());
    assert_eq!(d.status(&id).await.unwrap(), State::Stopped);
    d.remove(&id).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::NotFound);
}

#[tokio::test]
async fn rules_are_checked_in_order() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let config = failing(vec![
        FailureRule { message: Some("first".into()), ..count_rule(Operation::Create, 1) },
        FailureRule {
            error: FakeErrorKind::NotSupported,
            message: Some("second".into()),
            ..count_rule(Operation::Create, 1)
        },
    ]);
    let d = driver(&drivers, "uid-order", config);
    assert_eq!(d.create(&request()).await.unwrap_err(), DriverError::transient("first"));
    assert_eq!(
        d.create(&request()).await.unwrap_err(),
        DriverError::NotSupported { operation: Operation::Create, message: "second".into() }
    );
    d.create(&request()).await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 5. Graceful stop ignored
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn ignored_graceful_stop_stays_stopping_until_killed() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let store = drivers.fake_store().clone();
    let uid = "uid-ignore";
    let config = FakeConfig { graceful_stop: GracefulStop::Ignore, ..FakeConfig::default() };
    let d = driver(&drivers, uid, config);
    let id = d.create(&request()).await.unwrap();

    d.stop(&id).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Stopping);
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(d.status(&id).await.unwrap(), State::Stopping, "still not stopped");
    d.stop(&id).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Stopping, "a second stop changes nothing");
    assert_eq!(d.find().await.unwrap().unwrap().state, State::Stopping);
    assert_eq!(store.get(uid, &id).unwrap().unwrap().calls("Stop"), 2);

    d.kill(&id).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Stopped);
    assert_not_found(d.stop("fake-000000000000").await);
}

// ---------------------------------------------------------------------------------------
// 6. Out-of-band changes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn out_of_band_state_changes_are_reported() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let store = drivers.fake_store().clone();
    let uid = "uid-oob";
    let d = driver(&drivers, uid, FakeConfig::default());
    let id = d.create(&request()).await.unwrap();

    store.set_state(uid, &id, State::Stopped).unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Stopped);
    assert_eq!(d.find().await.unwrap().unwrap().state, State::Stopped);
    store.set_state(uid, &id, State::Error).unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Error);
    d.start(&id).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Running);

    assert_not_found(store.set_state(uid, "fake-000000000000", State::Stopped));
}

#[tokio::test]
async fn out_of_band_change_overrides_a_transition_under_way() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let store = drivers.fake_store().clone();
    let uid = "uid-oob-transition";
    let config = with_latency(FakeLatency { create: Some(IN_FLIGHT), ..FakeLatency::default() });
    let d = driver(&drivers, uid, config);
    let _ = tokio::time::timeout(Duration::from_millis(20), d.create(&request())).await;
    let id = store.instances_of(uid).unwrap()[0].id.clone();
    assert_eq!(d.status(&id).await.unwrap(), State::Starting);

    // Stopped from the console while booting: it stays Stopped once the boot would be done.
    store.set_state(uid, &id, State::Stopped).unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Stopped);
    tokio::time::sleep(Duration::from_millis(u64::from(IN_FLIGHT) + 50)).await;
    assert_eq!(d.status(&id).await.unwrap(), State::Stopped);
}

// ---------------------------------------------------------------------------------------
// 7. Config validation
// ---------------------------------------------------------------------------------------

#[test]
fn unknown_instance_type_is_invalid_config() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let config = FakeConfig { instance_type: Some("m5.large".into()), ..FakeConfig::default() };

    let direct = FakeDriver::new(FakeStore::new(dir.path()), machine("uid"), config.clone());
    assert_invalid_config(direct.err().expect("refused"), "spec.driver.fake.instanceType");
    assert_invalid_config(driver_error(&drivers, &spec(config)), "spec.driver.fake.instanceType");

    for instance_type in INSTANCE_TYPES {
        let config = FakeConfig { instance_type: Some(instance_type.into()), ..FakeConfig::default() };
        assert!(drivers.driver(&spec(config), machine("uid"), Credentials::default()).is_ok());
    }
}

#[test]
fn a_failure_rule_needs_exactly_one_of_count_and_probability() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let both = FailureRule { count: Some(1), probability: Some(0.5), ..rule(Operation::Stop) };
    let neither = rule(Operation::Stop);
    for bad in [both, neither] {
        // The bad rule second, so the field must name its own index.
        let config = failing(vec![count_rule(Operation::Create, 1), bad]);
        let direct = FakeDriver::new(FakeStore::new(dir.path()), machine("uid"), config.clone());
        assert_invalid_config(direct.err().expect("refused"), "spec.driver.fake.failures[1]");
        assert_invalid_config(driver_error(&drivers, &spec(config)), "spec.driver.fake.failures[1]");
    }

    for p in [1.5, -0.1, f64::NAN] {
        let config = failing(vec![probability_rule(Operation::Create, p)]);
        assert_invalid_config(driver_error(&drivers, &spec(config)), "spec.driver.fake.failures[0].probability");
    }
    for p in [0.0, 0.5, 1.0] {
        let config = failing(vec![probability_rule(Operation::Create, p)]);
        assert!(drivers.driver(&spec(config), machine("uid"), Credentials::default()).is_ok());
    }
}

#[test]
fn a_spec_without_a_driver_block_is_invalid_config() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let empty = DriverSpec::default();
    assert_invalid_config(driver_error(&drivers, &empty), "spec.driver");
    assert_invalid_config(empty.config().unwrap_err(), "spec.driver");
    assert_eq!(empty.name(), None);
    assert_eq!(spec(FakeConfig::default()).name(), Some("fake"));
}

#[test]
fn config_reads_its_camel_case_fields() {
    let config: FakeConfig = serde_json::from_value(serde_json::json!({
        "instanceType": "fake.medium",
        "latencyMillis": { "default": 7, "create": 11 },
        "gracefulStop": "Ignore",
        "failures": [
            { "operation": "Start", "count": 3, "error": "RateLimited", "retryAfterSeconds": 9 }
        ]
    }))
    .unwrap();
    assert_eq!(config.instance_type(), "fake.medium");
    assert_eq!(config.latency(Operation::Create), Duration::from_millis(11));
    assert_eq!(config.latency(Operation::Stop), Duration::from_millis(7));
    assert_eq!(config.graceful_stop, GracefulStop::Ignore);
    assert_eq!(config.failures[0].count, Some(3));
    assert_eq!(config.failures[0].error, FakeErrorKind::RateLimited);
    assert_eq!(config.failures[0].retry_after_seconds, Some(9));
    config.validate().unwrap();

    let default = FakeConfig::default();
    assert_eq!(default.instance_type(), "fake.small");
    assert_eq!(default.latency(Operation::Create), Duration::ZERO);
    assert_eq!(default.graceful_stop, GracefulStop::Honor);
}

#[tokio::test]
async fn an_unusable_machine_uid_is_refused() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    for uid in ["../escape", "a/b", ""] {
        let d = driver(&drivers, uid, FakeConfig::default());
        assert_invalid_config(d.create(&request()).await.unwrap_err(), "metadata.uid");
        assert_invalid_config(d.find().await.unwrap_err(), "metadata.uid");
    }
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing written");
    assert!(!dir.path().parent().unwrap().join("escape").exists());
}

// ---------------------------------------------------------------------------------------
// 8. Missing and malformed instances
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn operations_on_a_missing_instance() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let d = driver(&drivers, "uid-missing", FakeConfig::default());
    let missing = "fake-0123456789ab";

    d.remove(missing).await.unwrap();
    d.remove(missing).await.unwrap();
    assert_eq!(d.status(missing).await.unwrap(), State::NotFound);
    assert_not_found(d.start(missing).await);
    assert_not_found(d.stop(missing).await);
    assert_not_found(d.kill(missing).await);
    assert_not_found(d.restart(missing).await);
    assert_not_found(d.addresses(missing).await);
    assert!(drivers.fake_store().instances_of("uid-missing").unwrap().is_empty());

    // Removing twice after a real create is fine too.
    let id = d.create(&request()).await.unwrap();
    d.remove(&id).await.unwrap();
    d.remove(&id).await.unwrap();
    assert_not_found(d.start(&id).await);
}

#[tokio::test]
async fn a_malformed_id_is_not_found_and_never_escapes() {
    let dir = TempDir::new().unwrap();
    let drivers = Drivers::new(dir.path());
    let store = drivers.fake_store().clone();
    let victim = driver(&drivers, "uid-victim", FakeConfig::default());
    let victim_id = victim.create(&request()).await.unwrap();
    let attacker = driver(&drivers, "uid-attacker", FakeConfig::default());
    let own = attacker.create(&request()).await.unwrap();
    // Make the traversal resolvable, were the id used as a path as is.
    std::fs::create_dir_all(dir.path().join("uid-attacker").join("fake-0")).unwrap();

    let escapes = [
        format!("fake-0/../../uid-victim/{victim_id}"),
        format!("../uid-victim/{victim_id}"),
        "../../etc/passwd".to_string(),
        "fake-../x".to_string(),
        "fake-a.b".to_string(),
        "fake-é".to_string(),
        String::new(),
        "fake-".to_string() + &"/".repeat(3),
    ];
    for id in &escapes {
        assert_eq!(attacker.status(id).await.unwrap(), State::NotFound, "status {id:?}");
        assert_not_found(attacker.stop(id).await);
        assert_not_found(attacker.start(id).await);
        assert_not_found(attacker.kill(id).await);
        assert_not_found(attacker.restart(id).await);
        assert_not_found(attacker.addresses(id).await);
        assert_not_found(store.get("uid-attacker", id));
        attacker.remove(id).await.unwrap();
    }
    assert_eq!(victim.status(&victim_id).await.unwrap(), State::Running);
    let record = store.get("uid-victim", &victim_id).unwrap().unwrap();
    assert!(record.calls.keys().all(|k| k == "Create"), "untouched: {:?}", record.calls);
    assert_eq!(attacker.status(&own).await.unwrap(), State::Running);
}

// ---------------------------------------------------------------------------------------
// 9. Credentials
// ---------------------------------------------------------------------------------------

#[test]
fn credentials_debug_shows_keys_never_values() {
    let credentials = Credentials(BTreeMap::from([
        ("accessKeyId".to_string(), b"AKIAEXAMPLE".to_vec()),
        ("secretAccessKey".to_string(), b"s3cr3t-value".to_vec()),
    ]));
    for shown in [format!("{credentials:?}"), format!("{credentials:#?}")] {
        assert!(shown.contains("accessKeyId"), "{shown}");
        assert!(shown.contains("secretAccessKey"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(!shown.contains("AKIAEXAMPLE"), "{shown}");
        // Nor the bytes as numbers.
        assert!(!shown.chars().any(|c| c.is_ascii_digit()), "{shown}");
    }
}
