//! The generic driver against a real OpenSSH server started by each test (see the
//! `machinist-test-sshd` crate): the "host" is the test's sshd, its `~/.ssh/authorized_keys` the
//! test's own file. Every test is bounded by [`bounded`].

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use machinist_drivers::generic::{GenericConfig, GenericDriver};
use machinist_drivers::ssh::{self, SshAuth, SshError, SshPrivateKey, SshTarget, generate_ed25519};
use machinist_drivers::{
    AddressType, CreateRequest, Credentials, Driver, DriverError, DriverSpec, Drivers, Instance, MachineRef, Operation,
    SshEndpoint, State,
};
use machinist_test_sshd::{TestSshd, free_port, silent_listener};

const UID: &str = "5f1c2b7e-8d3a-4e6f-9a0b-1c2d3e4f5a6b";

/// Runs `test` with a deadline: a hang fails the test instead of stalling the suite.
async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(25), test).await.expect("the test did not finish within 25s")
}

fn pinned_machine(uid: &str, trusted: &[String]) -> MachineRef {
    MachineRef { trusted_host_keys: trusted.to_vec(), ..machine(uid) }
}

fn pinned_driver(config: GenericConfig, trusted: &[String], credentials: Credentials) -> Arc<dyn Driver> {
    let spec = DriverSpec { generic: Some(Box::new(config)), ..DriverSpec::default() };
    match Drivers::new("/nonexistent-fake-state").driver(&spec, pinned_machine(UID, trusted), credentials) {
        Ok(driver) => driver,
        Err(e) => panic!("generic driver: {e}"),
    }
}

fn machine(uid: &str) -> MachineRef {
    MachineRef {
        uid: uid.to_string(),
        name: "host-1".to_string(),
        namespace: "default".to_string(),
        ..Default::default()
    }
}

fn config(sshd: &TestSshd) -> GenericConfig {
    GenericConfig {
        address: sshd.host().to_string(),
        port: Some(sshd.port()),
        user: Some(sshd.user.clone()),
        ..GenericConfig::default()
    }
}

fn key_credentials(private_key: &str) -> Credentials {
    Credentials([("ssh-privatekey".to_string(), private_key.as_bytes().to_vec())].into())
}

fn bootstrap(sshd: &TestSshd) -> Credentials {
    key_credentials(&sshd.bootstrap_private_key())
}

fn driver_with(config: GenericConfig, uid: &str, credentials: Credentials) -> Arc<dyn Driver> {
    let spec = DriverSpec { generic: Some(Box::new(config)), ..DriverSpec::default() };
    match Drivers::new("/nonexistent-fake-state").driver(&spec, machine(uid), credentials) {
        Ok(driver) => driver,
        Err(e) => panic!("generic driver: {e}"),
    }
}

fn driver(sshd: &TestSshd) -> Arc<dyn Driver> {
    driver_with(config(sshd), UID, bootstrap(sshd))
}

fn refused(config: GenericConfig, credentials: Credentials) -> DriverError {
    let spec = DriverSpec { generic: Some(Box::new(config)), ..DriverSpec::default() };
    match Drivers::new("/nonexistent-fake-state").driver(&spec, machine(UID), credentials) {
        Ok(_) => panic!("expected the driver to be refused"),
        Err(e) => e,
    }
}

fn request(public_key: &str) -> CreateRequest {
    CreateRequest { ssh_public_key: Some(public_key.to_string()), ssh_port: None }
}

fn authorized_lines(sshd: &TestSshd) -> Vec<String> {
    std::fs::read_to_string(sshd.authorized_keys_path()).unwrap_or_default().lines().map(str::to_string).collect()
}

fn tagged(sshd: &TestSshd, uid: &str) -> Vec<String> {
    let tag = format!("machinist:{uid}");
    authorized_lines(sshd).into_iter().filter(|l| l.split_whitespace().last() == Some(tag.as_str())).collect()
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Whether the Machine's own key logs in to the test sshd now.
async fn machine_key_logs_in(sshd: &TestSshd, private_openssh: &str) -> Result<String, SshError> {
    let auth = SshAuth::key(SshPrivateKey::from_openssh(private_openssh).unwrap());
    let target = SshTarget::new(sshd.host(), sshd.port(), sshd.user.clone());
    ssh::check_ready_within(&target, &auth, &[], Duration::from_secs(5)).await
}

#[tokio::test]
async fn create_installs_the_tagged_key_once_and_it_logs_in() {
    let sshd = TestSshd::start();
    let driver = driver(&sshd);
    assert_eq!(driver.name(), "generic");
    assert!(driver.offers_ssh());
    assert!(!sshd.home().join(".ssh").exists(), "the test starts without ~/.ssh");
    let key = generate_ed25519("machinist:default/host-1");

    bounded(async {
        let id = driver.create(&request(&key.public_openssh)).await.expect("create");
        assert_eq!(id, format!("generic://{}@127.0.0.1:{}", sshd.user, sshd.port()));

        let ours = tagged(&sshd, UID);
        assert_eq!(ours.len(), 1, "{:?}", authorized_lines(&sshd));
        let key_part: Vec<&str> = key.public_openssh.split_whitespace().take(2).collect();
        assert_eq!(ours[0], format!("{} {} machinist:{UID}", key_part[0], key_part[1]));
        assert_eq!(mode(&sshd.home().join(".ssh")), 0o700);
        assert_eq!(mode(&sshd.authorized_keys_path()), 0o600);

        // Idempotent: a second Create changes nothing and returns the same id.
        let before = std::fs::read(sshd.authorized_keys_path()).unwrap();
        assert_eq!(driver.create(&request(&key.public_openssh)).await.expect("create again"), id);
        assert_eq!(std::fs::read(sshd.authorized_keys_path()).unwrap(), before);

        // The Machine's key now logs in.
        machine_key_logs_in(&sshd, key.private_openssh.expose()).await.expect("the Machine's key logs in");

        // A new key for the same Machine replaces its line rather than adding one.
        let rotated = generate_ed25519("");
        driver.create(&request(&rotated.public_openssh)).await.expect("create with another key");
        assert_eq!(tagged(&sshd, UID).len(), 1, "{:?}", authorized_lines(&sshd));
        machine_key_logs_in(&sshd, rotated.private_openssh.expose()).await.expect("the new key logs in");
        let old = machine_key_logs_in(&sshd, key.private_openssh.expose()).await.expect_err("old key is gone");
        assert!(matches!(old, SshError::AuthFailed { .. }), "{old:?}");
    })
    .await;
}

#[tokio::test]
async fn create_keeps_existing_keys_and_adds_a_line_to_a_file_without_final_newline() {
    let sshd = TestSshd::start();
    let ssh_dir = sshd.home().join(".ssh");
    std::fs::create_dir(&ssh_dir).unwrap();
    std::fs::set_permissions(&ssh_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let other = generate_ed25519("alice@laptop").public_openssh;
    std::fs::write(sshd.authorized_keys_path(), format!("# keys\n{other}")).unwrap();
    std::fs::set_permissions(sshd.authorized_keys_path(), std::fs::Permissions::from_mode(0o644)).unwrap();

    bounded(driver(&sshd).create(&request(&generate_ed25519("").public_openssh))).await.expect("create");
    let lines = authorized_lines(&sshd);
    assert_eq!(lines[..2], ["# keys".to_string(), other]);
    assert_eq!(lines.len(), 3);
    assert!(lines[2].ends_with(&format!(" machinist:{UID}")));
    // Existing directory and file keep their modes.
    assert_eq!(mode(&ssh_dir), 0o755);
    assert_eq!(mode(&sshd.authorized_keys_path()), 0o644);
}

#[tokio::test]
async fn find_adopts_the_host_that_carries_the_machines_key() {
    let sshd = TestSshd::start();
    let driver = driver(&sshd);
    bounded(async {
        assert_eq!(driver.find().await.expect("find before create"), None);
        let id = driver.create(&request(&generate_ed25519("").public_openssh)).await.expect("create");
        assert_eq!(driver.find().await.expect("find"), Some(Instance { id, state: State::Running }));
        // Another Machine on the same host finds nothing of its own.
        let other = driver_with(config(&sshd), "0a1b2c3d-other", bootstrap(&sshd));
        assert_eq!(other.find().await.expect("find other"), None);
    })
    .await;
}

#[tokio::test]
async fn remove_takes_out_only_the_machines_line_and_is_idempotent() {
    let sshd = TestSshd::start();
    let driver = driver(&sshd);
    let key = generate_ed25519("");
    bounded(async {
        let id = driver.create(&request(&key.public_openssh)).await.expect("create");
        // Other keys, added afterwards, including one of another Machine and look-alikes.
        let others = [
            generate_ed25519("bob@desk").public_openssh,
            generate_ed25519("machinist:0a1b2c3d-other").public_openssh,
            generate_ed25519(&format!("machinist:{UID}-not-quite")).public_openssh,
            format!("# machinist:{UID} mentioned in a comment line"),
        ];
        let mut content = std::fs::read_to_string(sshd.authorized_keys_path()).unwrap();
        for line in &others {
            content.push_str(line);
            content.push('\n');
        }
        std::fs::write(sshd.authorized_keys_path(), content).unwrap();

        driver.remove(&id).await.expect("remove");
        assert_eq!(authorized_lines(&sshd), others.to_vec(), "only the Machine's line goes");
        assert_eq!(driver.find().await.expect("find"), None);
        let error = machine_key_logs_in(&sshd, key.private_openssh.expose()).await.expect_err("key removed");
        assert!(matches!(error, SshError::AuthFailed { .. }), "{error:?}");

        // Already removed: done. No file at all: done too.
        driver.remove(&id).await.expect("remove again");
        std::fs::remove_file(sshd.authorized_keys_path()).unwrap();
        driver.remove(&id).await.expect("remove without a file");
        // The bootstrap login still works: nothing else was touched.
        assert_eq!(driver.status(&id).await.unwrap(), State::Running);
    })
    .await;
}

#[tokio::test]
async fn remove_on_a_host_that_does_not_answer_is_a_transient_error() {
    let mut sshd = TestSshd::start();
    let driver = driver(&sshd);
    sshd.stop();
    let error = bounded(driver.remove("generic://x")).await.expect_err("nobody answers");
    let DriverError::Transient { message, .. } = &error else { panic!("{error:?}") };
    assert!(message.contains("refused") && message.contains("Orphan"), "{message}");
}

#[tokio::test]
async fn remove_on_a_host_whose_name_no_longer_resolves_is_done() {
    let config = GenericConfig { address: "gone.invalid".to_string(), ..GenericConfig::default() };
    let driver = driver_with(config, UID, key_credentials(generate_ed25519("").private_openssh.expose()));
    bounded(driver.remove("generic://root@gone.invalid:22")).await.expect("the host is gone: nothing to remove");
}

#[tokio::test]
async fn status_follows_ssh() {
    let mut sshd = TestSshd::start();
    let driver = driver(&sshd);
    let id = "generic://whatever";
    assert_eq!(bounded(driver.status(id)).await.unwrap(), State::Running);
    sshd.stop();
    assert_eq!(bounded(driver.status(id)).await.unwrap(), State::Stopped);
    sshd.restart();
    assert_eq!(bounded(driver.status(id)).await.unwrap(), State::Running);

    // A login the host refuses is an error, not a stopped host.
    let stranger = driver_with(config(&sshd), UID, key_credentials(generate_ed25519("").private_openssh.expose()));
    assert_eq!(bounded(stranger.status(id)).await.unwrap(), State::Error);
}

#[tokio::test]
async fn status_of_a_silent_host_is_stopped() {
    let port = silent_listener();
    let config = GenericConfig { address: "127.0.0.1".into(), port: Some(port), ..GenericConfig::default() };
    let driver = driver_with(config, UID, key_credentials(generate_ed25519("").private_openssh.expose()));
    // Status gives up after its own short connect timeout (5 s).
    assert_eq!(bounded(driver.status("id")).await.unwrap(), State::Stopped);
}

#[tokio::test]
async fn restart_runs_the_reboot_command_and_waits_until_ssh_is_back() {
    let sshd = Arc::new(Mutex::new(TestSshd::start()));
    let (config, credentials, marker) = {
        let sshd = sshd.lock().unwrap();
        let marker = sshd.dir().join("reboot-requested");
        let config = GenericConfig {
            reboot_command: Some(format!("touch {}", marker.display())),
            restart_timeout_seconds: Some(20),
            ..config(&sshd)
        };
        (config, bootstrap(&sshd), marker)
    };
    let driver = driver_with(config, UID, credentials);

    // The "host": once the reboot is requested, SSH goes away for a while, then returns.
    let stopped_at = Arc::new(Mutex::new(None::<Instant>));
    let host = {
        let (sshd, stopped_at, marker) = (Arc::clone(&sshd), Arc::clone(&stopped_at), marker.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(15);
            while !marker.exists() {
                assert!(Instant::now() < deadline, "the reboot command never ran");
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut sshd = sshd.lock().unwrap();
            sshd.stop();
            *stopped_at.lock().unwrap() = Some(Instant::now());
            std::thread::sleep(Duration::from_millis(1500));
            sshd.restart();
        })
    };

    bounded(driver.restart("generic://x")).await.expect("restart");
    let returned_at = Instant::now();
    host.join().expect("the host thread");
    assert!(marker.exists(), "the reboot command ran");
    let stopped_at = stopped_at.lock().unwrap().expect("sshd was stopped");
    assert!(returned_at > stopped_at, "Restart returned before SSH even went down");
    assert_eq!(sshd.lock().unwrap().starts, 2);
    assert_eq!(bounded(driver.status("generic://x")).await.unwrap(), State::Running);
}

#[tokio::test]
async fn restart_counts_a_dropped_connection_as_success() {
    let sshd = TestSshd::start();
    // The reboot command kills its own session's server process: the connection drops,
    // as it does when a host shuts down.
    let config = GenericConfig { reboot_command: Some("kill -9 $PPID; sleep 5".into()), ..config(&sshd) };
    bounded(driver_with(config, UID, bootstrap(&sshd)).restart("generic://x")).await.expect("restart");
}

#[tokio::test]
async fn restart_fails_clearly_when_the_reboot_command_fails_or_the_host_never_goes_down() {
    let sshd = TestSshd::start();
    let failing = GenericConfig {
        reboot_command: Some("echo 'sudo: a password is required' >&2; exit 1".into()),
        ..config(&sshd)
    };
    let error = bounded(driver_with(failing, UID, bootstrap(&sshd)).restart("x")).await.expect_err("the command fails");
    let DriverError::InvalidConfig { field, message } = &error else { panic!("{error:?}") };
    assert_eq!(field, "spec.driver.generic.rebootCommand");
    assert!(message.contains("exit status 1") && message.contains("password is required"), "{message}");

    let no_op =
        GenericConfig { reboot_command: Some("true".into()), restart_timeout_seconds: Some(5), ..config(&sshd) };
    let error = bounded(driver_with(no_op, UID, bootstrap(&sshd)).restart("x")).await.expect_err("never went down");
    let DriverError::Transient { message, .. } = &error else { panic!("{error:?}") };
    assert!(message.contains("did not restart") && message.contains("5s"), "{message}");
}

#[tokio::test]
async fn power_operations_are_not_supported() {
    let driver = driver_with(
        GenericConfig { address: "192.0.2.10".into(), ..GenericConfig::default() },
        UID,
        key_credentials(generate_ed25519("").private_openssh.expose()),
    );
    for (operation, result) in [
        (Operation::Start, driver.start("x").await),
        (Operation::Stop, driver.stop("x").await),
        (Operation::Kill, driver.kill("x").await),
    ] {
        let error = result.expect_err("no power control");
        let DriverError::NotSupported { operation: reported, message } = &error else { panic!("{error:?}") };
        assert_eq!(*reported, operation);
        assert!(message.contains("existing host"), "{message}");
        assert!(!error.is_retryable());
    }
}

#[tokio::test]
async fn addresses_and_ssh_endpoint_come_from_the_config() {
    let credentials = key_credentials(generate_ed25519("").private_openssh.expose());
    let ip = driver_with(
        GenericConfig { address: "192.0.2.10".into(), ..GenericConfig::default() },
        UID,
        credentials.clone(),
    );
    let addresses = ip.addresses("x").await.unwrap();
    assert_eq!(addresses.len(), 1);
    assert_eq!((addresses[0].kind, addresses[0].address.as_str()), (AddressType::ExternalIP, "192.0.2.10"));
    assert_eq!(
        ip.ssh_endpoint("x").await.unwrap(),
        Some(SshEndpoint { host: "192.0.2.10".into(), port: 22, user: "root".into() })
    );

    let named = driver_with(
        GenericConfig {
            address: "host-1.example.com".into(),
            port: Some(2222),
            user: Some("core".into()),
            ..GenericConfig::default()
        },
        UID,
        credentials,
    );
    assert_eq!(named.addresses("x").await.unwrap()[0].kind, AddressType::Hostname);
    assert_eq!(
        named.ssh_endpoint("x").await.unwrap(),
        Some(SshEndpoint { host: "host-1.example.com".into(), port: 2222, user: "core".into() })
    );
    let generic = GenericDriver::new(
        machine(UID),
        GenericConfig { address: "2001:db8::1".into(), ..GenericConfig::default() },
        &key_credentials(generate_ed25519("").private_openssh.expose()),
    )
    .unwrap();
    assert_eq!(generic.instance_id(), "generic://root@[2001:db8::1]:22");
}

#[tokio::test]
async fn credentials_are_checked_before_any_connection() {
    let config = GenericConfig { address: "192.0.2.10".into(), ..GenericConfig::default() };
    let field_and_message = |error: DriverError| match error {
        DriverError::InvalidConfig { field, message } => (field, message),
        other => panic!("expected InvalidConfig, got {other:?}"),
    };

    let (field, message) = field_and_message(refused(config.clone(), Credentials::default()));
    assert_eq!(field, "spec.credentialsSecretRef");
    assert!(message.contains("ssh-privatekey") && message.contains("password"), "{message}");

    let only_user = Credentials([("username".to_string(), b"root".to_vec())].into());
    let (field, message) = field_and_message(refused(config.clone(), only_user));
    assert_eq!(field, "spec.credentialsSecretRef");
    assert!(message.contains("only username"), "{message}");

    let (field, message) = field_and_message(refused(config.clone(), key_credentials("not a key")));
    assert_eq!(field, "spec.credentialsSecretRef");
    assert!(message.contains("ssh-privatekey"), "{message}");

    let empty_password = Credentials([("password".to_string(), b"\n".to_vec())].into());
    let (_, message) = field_and_message(refused(config.clone(), empty_password));
    assert!(message.contains("empty"), "{message}");

    // A password alone is enough to build the driver.
    let password = Credentials([("password".to_string(), b"secret\n".to_vec())].into());
    driver_with(config, UID, password);
}

#[tokio::test]
async fn a_password_login_that_fails_is_invalid_credentials() {
    let sshd = TestSshd::start();
    let password = Credentials([("password".to_string(), b"not-the-password".to_vec())].into());
    let error = bounded(driver_with(config(&sshd), UID, password).find()).await.expect_err("wrong password");
    let DriverError::InvalidConfig { field, message } = &error else { panic!("{error:?}") };
    assert_eq!(field, "spec.credentialsSecretRef");
    assert!(!message.contains("not-the-password"), "{message}");
}

#[test]
fn the_config_is_checked_and_names_the_field() {
    let credentials = key_credentials(generate_ed25519("").private_openssh.expose());
    let field_of = |config: GenericConfig| match refused(config, credentials.clone()) {
        DriverError::InvalidConfig { field, .. } => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    let base = GenericConfig { address: "host.example".into(), ..GenericConfig::default() };
    for address in ["", "[2001:db8::1]", "host.example:22", "bad host", "-bad.example", "a..b"] {
        assert_eq!(
            field_of(GenericConfig { address: address.into(), ..base.clone() }),
            "spec.driver.generic.address",
            "{address:?}"
        );
    }
    assert_eq!(field_of(GenericConfig { port: Some(0), ..base.clone() }), "spec.driver.generic.port");
    assert_eq!(field_of(GenericConfig { user: Some("a b".into()), ..base.clone() }), "spec.driver.generic.user");
    assert_eq!(
        field_of(GenericConfig { reboot_command: Some("  ".into()), ..base.clone() }),
        "spec.driver.generic.rebootCommand"
    );
    for seconds in [0, 4, 3601] {
        assert_eq!(
            field_of(GenericConfig { restart_timeout_seconds: Some(seconds), ..base.clone() }),
            "spec.driver.generic.restartTimeoutSeconds"
        );
    }
    assert_eq!(
        field_of(GenericConfig { host_key_fingerprint: Some("MD5:aa:bb".into()), ..base.clone() }),
        "spec.driver.generic.hostKeyFingerprint"
    );
    for address in ["192.0.2.10", "2001:db8::1", "host-1.example.com", "localhost", "host.example."] {
        driver_with(GenericConfig { address: address.into(), ..base.clone() }, UID, credentials.clone());
    }

    // The block as it appears in a Machine: camelCase, defaults.
    let parsed: DriverSpec = serde_json::from_value(serde_json::json!({
        "generic": {"address": "10.0.0.5", "user": "ubuntu", "rebootCommand": "sudo reboot", "restartTimeoutSeconds": 120}
    }))
    .unwrap();
    let generic = parsed.generic.as_ref().unwrap();
    assert_eq!((generic.port(), generic.user(), generic.reboot_command()), (22, "ubuntu", "sudo reboot"));
    assert_eq!(generic.restart_timeout(), Duration::from_secs(120));
    assert_eq!(parsed.name(), Some("generic"));
    assert!(DriverSpec::NAMES.contains(&"generic"));
    let defaults = GenericConfig { address: "h".into(), ..GenericConfig::default() };
    assert_eq!((defaults.user(), defaults.reboot_command()), ("root", "sudo shutdown -r now"));
    assert_eq!(defaults.restart_timeout(), Duration::from_secs(300));

    // Two driver blocks at once are refused.
    let both = DriverSpec { fake: Some(Default::default()), generic: Some(Box::new(base)), ..Default::default() };
    assert!(matches!(both.config(), Err(DriverError::InvalidConfig { .. })));
}

#[tokio::test]
async fn a_pinned_host_key_that_does_not_match_stops_everything_before_login() {
    let sshd = TestSshd::start();
    let wrong = GenericConfig {
        host_key_fingerprint: Some("SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into()),
        ..config(&sshd)
    };
    let error =
        bounded(driver_with(wrong, UID, bootstrap(&sshd)).create(&request(&generate_ed25519("").public_openssh)))
            .await
            .expect_err("host key mismatch");
    let DriverError::HostKeyMismatch { presented, .. } = &error else { panic!("{error:?}") };
    assert_eq!(presented, &sshd.host_key_fingerprint());
    assert_eq!(sshd.accepted_logins(), 0);
    assert_eq!(sshd.auth_attempts(), 0, "no credential offered: {}", sshd.log());
    assert!(!sshd.authorized_keys_path().exists());

    let right = GenericConfig { host_key_fingerprint: Some(sshd.host_key_fingerprint()), ..config(&sshd) };
    bounded(driver_with(right, UID, bootstrap(&sshd)).create(&request(&generate_ed25519("").public_openssh)))
        .await
        .expect("the right pin");
}

#[tokio::test]
async fn create_needs_the_machines_public_key_and_a_reachable_host() {
    let sshd = TestSshd::start();
    let error = bounded(driver(&sshd).create(&CreateRequest::default())).await.expect_err("no key");
    assert!(
        matches!(&error, DriverError::Transient { message, .. } if message.contains("no SSH public key")),
        "{error:?}"
    );

    let error = bounded(driver(&sshd).create(&request("ssh-ed25519 not-base64"))).await.expect_err("bad key");
    assert!(
        matches!(&error, DriverError::InvalidConfig { field, .. } if field == "spec.ssh.keySecretRef"),
        "{error:?}"
    );

    let closed = GenericConfig { address: "127.0.0.1".into(), port: Some(free_port()), ..GenericConfig::default() };
    let unreachable = driver_with(closed, UID, bootstrap(&sshd));
    let error = bounded(unreachable.create(&request(&generate_ed25519("").public_openssh))).await.expect_err("closed");
    assert!(matches!(&error, DriverError::Transient { message, .. } if message.contains("refused")), "{error:?}");
    let error = bounded(unreachable.find()).await.expect_err("closed");
    assert!(error.is_retryable(), "{error:?}");
}

#[tokio::test]
async fn the_pinned_host_key_guards_every_bootstrap_login() {
    let mut sshd = TestSshd::start();
    let marker = sshd.dir().join("rebooted");
    let rebooting = GenericConfig {
        reboot_command: Some(format!("touch {}", marker.display())),
        restart_timeout_seconds: Some(5),
        ..config(&sshd)
    };
    let pin = sshd.host_key_fingerprint();
    let key = generate_ed25519("machinist:default/host-1");
    let id = bounded(
        pinned_driver(rebooting.clone(), std::slice::from_ref(&pin), bootstrap(&sshd))
            .create(&request(&key.public_openssh)),
    )
    .await
    .expect("the pinned host");

    // The host's key changes: someone else answers on its address.
    let new_key = sshd.new_host_key();
    sshd.set_host_key(&new_key);
    let presented = sshd.host_key_fingerprint();
    let (logins, attempts) = (sshd.accepted_logins(), sshd.auth_attempts());
    let driver = pinned_driver(rebooting, std::slice::from_ref(&pin), bootstrap(&sshd));
    let mismatch = |error: DriverError| match error {
        DriverError::HostKeyMismatch { trusted, presented: seen, .. } => {
            assert_eq!((trusted, seen), (vec![pin.clone()], presented.clone()));
        }
        other => panic!("expected HostKeyMismatch, got {other:?}"),
    };
    bounded(async {
        mismatch(driver.status(&id).await.expect_err("never Running"));
        mismatch(driver.find().await.expect_err("find"));
        mismatch(driver.create(&request(&key.public_openssh)).await.expect_err("create"));
        mismatch(driver.restart(&id).await.expect_err("restart"));
        mismatch(driver.remove(&id).await.expect_err("remove"));
    })
    .await;
    assert!(!marker.exists(), "the reboot command ran on an unverified host");
    assert_eq!(sshd.accepted_logins(), logins, "{}", sshd.log());
    assert_eq!(sshd.auth_attempts(), attempts, "an authentication was attempted: {}", sshd.log());
    assert_eq!(tagged(&sshd, UID).len(), 1, "the key line stays until the host is verified");

    // The user accepts the new key: it is trusted besides the pin, and Remove goes through.
    let accepted = pinned_driver(
        GenericConfig { restart_timeout_seconds: Some(5), ..config(&sshd) },
        &[pin.clone(), presented.clone()],
        bootstrap(&sshd),
    );
    assert_eq!(bounded(accepted.status(&id)).await.unwrap(), State::Running);
    bounded(accepted.remove(&id)).await.expect("remove on the accepted key");
    assert!(tagged(&sshd, UID).is_empty());
    assert_eq!(accepted.first_contact_host_key(), None, "nothing to pin: a key was trusted");
}

#[tokio::test]
async fn the_first_contact_is_remembered_and_reported_for_pinning() {
    let sshd = TestSshd::start();
    let driver = driver(&sshd);
    assert_eq!(driver.first_contact_host_key(), None, "no contact yet");
    let key = generate_ed25519("machinist:default/host-1");
    bounded(async {
        assert_eq!(driver.find().await.expect("find"), None);
        driver.create(&request(&key.public_openssh)).await.expect("create");
    })
    .await;
    assert_eq!(driver.first_contact_host_key(), Some(sshd.host_key_fingerprint()));
}
