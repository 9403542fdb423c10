//! The `dockerMachine` driver against a real plugin process: the Go test peer
//! (`docker-machine-driver-fakecloud`, from e2e/test-dmplugin), over the real protocol.

use std::sync::Arc;
use std::time::Duration;

use machinist_drivers::dockermachine::{DockerMachineConfig, Plugins};
use machinist_drivers::ssh::SshPrivateKey;
use machinist_drivers::{
    CreateRequest, Credentials, Driver, DriverError, DriverSpec, Drivers, MachineRef, MemoryStateStore, Removal, State,
    StateStore,
};
use machinist_test_dmplugin::{FakeCloud, plugin_binary, plugin_dir_with, processes_with_home_under};

const TOKEN: &str = "tok-s3cret-42";

struct Setup {
    plugins: tempfile::TempDir,
    work: tempfile::TempDir,
    cloud: FakeCloud,
    state: Arc<MemoryStateStore>,
}

impl Setup {
    fn new(extra: &[(&str, &[(&str, &str)])]) -> Setup {
        plugin_binary();
        let mut wanted: Vec<(&str, &[(&str, &str)])> = vec![("fakecloud", &[])];
        wanted.extend_from_slice(extra);
        Setup {
            plugins: plugin_dir_with(&wanted),
            work: tempfile::tempdir().unwrap(),
            cloud: FakeCloud::new(),
            state: Arc::new(MemoryStateStore::default()),
        }
    }

    fn config(&self, name: &str, flags: serde_json::Value) -> DockerMachineConfig {
        let mut flags = flags;
        flags["fakecloud-provider-dir"] = self.cloud.path().to_string_lossy().into_owned().into();
        DockerMachineConfig {
            name: name.into(),
            flags: serde_json::from_value(flags).unwrap(),
            call_timeout_seconds: Some(5),
            ..Default::default()
        }
    }

    fn drivers(&self) -> Drivers {
        Drivers::new(self.work.path().join("fake"))
            .with_plugins(Plugins::new(Some(self.plugins.path().to_path_buf()), self.work.path().join("plugins")))
    }

    /// A new driver value (a new plugin process), as each reconcile makes.
    fn driver(&self, config: &DockerMachineConfig) -> Result<Arc<dyn Driver>, DriverError> {
        let spec = DriverSpec { docker_machine: Some(Box::new(config.clone())), ..Default::default() };
        let credentials = Credentials([("FAKECLOUD_TOKEN".to_string(), format!("{TOKEN}\n").into_bytes())].into());
        self.drivers().driver_with_state(&spec, machine(), credentials, self.state.clone())
    }

    /// Plugin processes of this test still running: their HOME is a store directory
    /// under this test's work directory.
    fn processes(&self) -> usize {
        processes_with_home_under(self.work.path())
    }

    async fn no_process_left(&self) {
        for _ in 0..100 {
            if self.processes() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} plugin processes are still running", self.processes());
    }
}

fn machine() -> MachineRef {
    MachineRef {
        uid: "0f3c5a1e-7d2b-4c8e-9a61-2b7d9e4f1c30".into(),
        name: "web.1".into(),
        namespace: "team".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_driven_machine_goes_through_its_whole_life() {
    let s = Setup::new(&[]);
    let config = s.config("fakecloud", serde_json::json!({"fakecloud-disk-size": 20, "fakecloud-tags": ["a"]}));

    let d = s.driver(&config).unwrap();
    assert_eq!(d.find().await.unwrap(), None, "nothing saved: nothing to adopt");
    let id = d.create(&CreateRequest::default()).await.unwrap();
    assert_eq!(id, "web-1-0f3c5a1e", "the machine name: the Machine's name and the start of its UID");
    let instances = s.cloud.instances();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].machine_name, id);
    assert_eq!(d.status(&id).await.unwrap(), State::Running);
    drop(d);
    s.no_process_left().await;

    // A later reconcile (a new plugin process) restores the state and sees the instance.
    let saved = String::from_utf8(s.state.load().await.unwrap().unwrap()).unwrap();
    assert!(saved.contains("id_rsa"), "the store directory is saved, keys included");
    let d = s.driver(&config).unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Running);
    assert_eq!(s.processes(), 1, "one plugin process per driver value, seen while it runs");
    let addresses = d.addresses(&id).await.unwrap();
    assert_eq!(addresses[0].address, "127.0.0.1");
    let endpoint = d.ssh_endpoint(&id).await.unwrap().unwrap();
    assert_eq!((endpoint.host.as_str(), endpoint.port, endpoint.user.as_str()), ("127.0.0.1", 22, "root"));
    assert!(d.makes_own_ssh_key());
    let key = d.own_ssh_key(&id).await.unwrap().expect("the plugin's key");
    let key = SshPrivateKey::from_bytes(&key).expect("the plugin's RSA key is usable");
    assert_eq!(key.algorithm(), "ssh-rsa");

    d.stop(&id).await.unwrap();
    assert_eq!(s.cloud.instances()[0].state, "Stopped");
    assert_eq!(d.status(&id).await.unwrap(), State::Stopped);
    d.start(&id).await.unwrap();
    d.restart(&id).await.unwrap();
    assert_eq!(s.cloud.instances()[0].state, "Running");
    d.kill(&id).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Stopped);
    assert_eq!(d.remove(&id).await.unwrap(), Removal::Done);
    assert!(s.cloud.instances().is_empty());
    assert_eq!(s.state.load().await.unwrap(), None, "nothing is left to remember");
    assert_eq!(d.status(&id).await.unwrap(), State::NotFound);
    assert_eq!(d.remove(&id).await.unwrap(), Removal::Done, "a second Remove is done");
    drop(d);
    s.no_process_left().await;
    // Closed in the background, then its store directory (keys included) removed.
    let left = || std::fs::read_dir(s.work.path().join("plugins")).unwrap().count();
    for _ in 0..100 {
        if left() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left(), 0, "store directories (and the keys in them) are removed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_spec_is_refused_naming_the_field_before_anything_is_created() {
    let s = Setup::new(&[]);
    let missing = s.driver(&s.config("hetzner", serde_json::json!({}))).err().unwrap();
    assert!(
        matches!(&missing, DriverError::InvalidConfig { field, message }
            if field == "spec.driver.dockerMachine.name" && message.contains("docker-machine-driver-hetzner") && message.contains("fakecloud")),
        "{missing}"
    );
    for (flags, field) in [
        (serde_json::json!({"fakecloud-disk-sise": 20}), "spec.driver.dockerMachine.flags.fakecloud-disk-sise"),
        (serde_json::json!({"fakecloud-disk-size": "big"}), "spec.driver.dockerMachine.flags.fakecloud-disk-size"),
        (serde_json::json!({"fakecloud-tags": "a"}), "spec.driver.dockerMachine.flags.fakecloud-tags"),
    ] {
        let d = s.driver(&s.config("fakecloud", flags)).unwrap();
        let error = d.find().await.unwrap_err();
        assert!(matches!(&error, DriverError::InvalidConfig { field: f, .. } if f == field), "{error}");
        assert!(!error.is_retryable());
    }
    assert!(s.cloud.instances().is_empty());
    assert_eq!(s.state.load().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn driver_errors_are_typed_and_never_show_the_credentials() {
    let s = Setup::new(&[]);
    let config = s.config(
        "fakecloud",
        serde_json::json!({"fakecloud-fail": [
            "Start=API rate limit exceeded",
            "Stop=fakecloud does not support stop",
            format!("Kill=token {TOKEN} was rejected"),
            "Restart=the server is having a bad day",
        ]}),
    );
    let d = s.driver(&config).unwrap();
    let id = d.create(&CreateRequest::default()).await.unwrap();
    assert!(matches!(d.start(&id).await, Err(DriverError::RateLimited { .. })));
    assert!(matches!(d.stop(&id).await, Err(DriverError::NotSupported { .. })));
    let kill = d.kill(&id).await.unwrap_err().to_string();
    assert!(!kill.contains(TOKEN) && kill.contains("<redacted>"), "{kill}");
    let restart = d.restart(&id).await.unwrap_err();
    assert!(matches!(&restart, DriverError::Transient { message, .. } if message.contains("bad day")), "{restart}");
    assert!(!format!("{:?}", s.state.load().await.unwrap()).is_empty());
    d.remove(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_that_hangs_dies_or_speaks_wrongly_is_an_error_with_its_stderr_and_leaves_no_process() {
    let s = Setup::new(&[
        ("banner", &[("FAKECLOUD_BANNER", "hello there")]),
        ("future", &[("FAKECLOUD_API_VERSION", "2")]),
        ("broken", &[("FAKECLOUD_EXIT_AT_START", "3")]),
        ("forgetful", &[("FAKECLOUD_HEARTBEAT_TIMEOUT_MS", "700")]),
    ]);
    // Hangs: killed at the call timeout.
    let hang = s.config("fakecloud", serde_json::json!({"fakecloud-hang": ["Create"]}));
    let started = std::time::Instant::now();
    let error = s.driver(&hang).unwrap().create(&CreateRequest::default()).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        matches!(&error, DriverError::Transient { message, .. } if message.contains("did not answer within 5s") && message.contains("stderr")),
        "{error}"
    );
    s.no_process_left().await;

    for (name, expected) in [("banner", "printed \"hello there\""), ("future", "API version 2"), ("broken", "exited")] {
        let d = s.driver(&s.config(name, serde_json::json!({}))).unwrap();
        let error = d.find().await.unwrap_err();
        assert!(error.to_string().contains(expected), "{name}: {error}");
        assert!(
            matches!(error, DriverError::InvalidConfig { .. }),
            "{name}: not a plugin machinist can drive: {error}"
        );
    }
    s.no_process_left().await;

    // A plugin that exits for want of heartbeats mid-call (it wants one within 0.7 s).
    let slow = s.config("forgetful", serde_json::json!({"fakecloud-slow": ["Create=3000"]}));
    let error = s.driver(&slow).unwrap().create(&CreateRequest::default()).await.unwrap_err();
    assert!(matches!(&error, DriverError::Transient { message, .. } if message.contains("exit status: 1")), "{error}");
    s.no_process_left().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_crash_during_create_the_instance_is_adopted_not_made_twice() {
    let s = Setup::new(&[]);
    let config = s.config("fakecloud", serde_json::json!({"fakecloud-crash-in-create": true}));
    let error = s.driver(&config).unwrap().create(&CreateRequest::default()).await.unwrap_err();
    assert!(matches!(&error, DriverError::Transient { message, .. } if message.contains("exit status: 2")), "{error}");
    assert_eq!(s.cloud.instances().len(), 1, "the crash came after the instance was made");

    // The next reconcile: the state saved before Create is restored and GetState asked.
    let found = s.driver(&config).unwrap().find().await.unwrap().expect("adopted");
    assert_eq!(found.state, State::Running);
    assert_eq!(s.cloud.instances().len(), 1);
    assert_eq!(s.driver(&config).unwrap().remove(&found.id).await.unwrap(), Removal::Done);
    assert!(s.cloud.instances().is_empty());
    s.no_process_left().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_during_create_once_the_instance_id_is_known_it_is_adopted_by_that_id() {
    let s = Setup::new(&[]);
    // As docker-machine's amazonec2: Create records the instance id, then waits for the
    // instance to boot. This plugin finds an instance by its id only.
    let config =
        s.config("fakecloud", serde_json::json!({"fakecloud-boot-millis": 8000, "fakecloud-find-by-name": "false"}));
    let d = s.driver(&config).unwrap();
    let cut = tokio::time::timeout(Duration::from_secs(5), d.create(&CreateRequest::default())).await;
    assert!(cut.is_err(), "cut short while the instance boots");
    drop(d); // the plugin goes with it, as with a crash of machinist (within its heartbeat timeout)
    s.no_process_left().await;
    let instances = s.cloud.instances();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].state, "Starting");

    let found = s.driver(&config).unwrap().find().await.unwrap().expect("adopted by the id saved while Create ran");
    assert_eq!(found.state, State::Starting);
    assert_eq!(s.cloud.instances().len(), 1, "never a second instance");
    assert_eq!(s.driver(&config).unwrap().remove(&found.id).await.unwrap(), Removal::Done);
    assert!(s.cloud.instances().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_that_serves_get_flags_instead_of_get_create_flags_works_too() {
    // rancher/machine's plugins answer GetFlags; GetCreateFlags is docker/machine's name.
    let s = Setup::new(&[("rancher", &[("FAKECLOUD_MISSING_METHODS", "GetCreateFlags")])]);
    let config = s.config("rancher", serde_json::json!({"fakecloud-disk-size": 30}));
    let d = s.driver(&config).unwrap();
    assert_eq!(d.find().await.unwrap(), None, "the flags were read");
    let id = d.create(&CreateRequest::default()).await.unwrap();
    assert_eq!(d.status(&id).await.unwrap(), State::Running);
    assert_eq!(d.remove(&id).await.unwrap(), Removal::Done);
    assert!(s.cloud.instances().is_empty());
}
