//! The SSH client (`machinist_drivers::ssh`) against a real OpenSSH server started by
//! each test (see the `machinist-test-sshd` crate). Every test is bounded by [`bounded`], so a hang is
//! a failure, not a stuck suite.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use machinist_drivers::ssh::{
    self, SecretString, SshAuth, SshError, SshPrivateKey, SshStage, SshTarget, generate_ed25519,
};
use machinist_drivers::{DriverError, SshEndpoint};
use machinist_test_sshd::{TestSshd, free_port, keygen, keygen_with, output, silent_listener};

const STEP: Duration = Duration::from_secs(5);

/// Runs `test` with a deadline: a hang fails the test instead of stalling the suite.
async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(25), test).await.expect("the test did not finish within 25s")
}

fn target(sshd: &TestSshd) -> SshTarget {
    SshTarget::new(sshd.host(), sshd.port(), sshd.user.clone())
}

fn bootstrap(sshd: &TestSshd) -> SshAuth {
    SshAuth::key(SshPrivateKey::from_openssh(&sshd.bootstrap_private_key()).expect("ssh-keygen's key parses"))
}

#[test]
fn generated_keys_are_openssh_keys_that_ssh_keygen_reads() {
    let pair = generate_ed25519("machinist:demo");
    let private = pair.private_openssh.expose();
    assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"), "{:?}", &private[..40]);
    assert!(private.trim_end().ends_with("-----END OPENSSH PRIVATE KEY-----"));
    assert!(pair.public_openssh.starts_with("ssh-ed25519 AAAA"), "{}", pair.public_openssh);
    assert!(pair.public_openssh.ends_with(" machinist:demo"), "{}", pair.public_openssh);
    assert!(pair.fingerprint.starts_with("SHA256:"), "{}", pair.fingerprint);

    // Round trip through our parser.
    let parsed = SshPrivateKey::from_openssh(private).expect("our own key parses");
    assert_eq!(parsed.public_key_openssh(), pair.public_openssh);
    assert_eq!(parsed.fingerprint(), pair.fingerprint);
    assert_eq!(parsed.algorithm(), "ssh-ed25519");

    // OpenSSH agrees: the private key derives the same public key and fingerprint.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("id_ed25519");
    std::fs::write(&path, private).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let derived = output(Command::new("ssh-keygen").arg("-y").arg("-f").arg(&path));
    let key_of = |line: &str| line.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    assert_eq!(key_of(&derived), key_of(&pair.public_openssh));
    let listed = output(Command::new("ssh-keygen").arg("-lf").arg(&path));
    assert_eq!(listed.split_whitespace().nth(1), Some(pair.fingerprint.as_str()));

    // Two keys are never the same.
    assert_ne!(generate_ed25519("").public_openssh, generate_ed25519("").public_openssh);
}

#[test]
fn secrets_never_show_in_debug_output() {
    let pair = generate_ed25519("c");
    let secret_body = pair.private_openssh.expose().lines().nth(1).unwrap().to_string();
    let shown = format!("{pair:?}");
    assert!(!shown.contains(&secret_body), "{shown}");
    assert!(shown.contains("redacted"), "{shown}");

    let key = SshPrivateKey::from_openssh(pair.private_openssh.expose()).unwrap();
    let auth = SshAuth::key_then_password(key.clone(), SecretString::new("hunter2-very-secret"));
    let shown = format!("{key:?} {auth:?}");
    assert!(!shown.contains(&secret_body) && !shown.contains("hunter2"), "{shown}");
    assert!(shown.contains(&pair.fingerprint), "{shown}");
    assert!(!auth.describe().contains("hunter2"));
}

#[test]
fn keys_that_cannot_be_used_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let message = |pem: &str| SshPrivateKey::from_openssh(pem).expect_err("should be refused").to_string();

    // Keys from ssh-keygen parse: ed25519 and ECDSA.
    let ed = keygen(dir.path(), "ed");
    SshPrivateKey::from_openssh(&std::fs::read_to_string(&ed).unwrap()).expect("ed25519 parses");
    let ec = keygen_with(dir.path(), "ec", &["-t", "ecdsa", "-b", "256", "-N", ""]);
    let ec = SshPrivateKey::from_openssh(&std::fs::read_to_string(&ec).unwrap()).expect("ECDSA parses");
    assert_eq!(ec.algorithm(), "ecdsa-sha2-nistp256");
    // CRLF line endings (a Secret written on Windows) are fine.
    let crlf = std::fs::read_to_string(&ed).unwrap().replace('\n', "\r\n");
    SshPrivateKey::from_openssh(&crlf).expect("CRLF parses");

    assert!(message("").contains("empty"));
    let public = std::fs::read_to_string(ed.with_extension("pub")).unwrap();
    assert!(message(&public).contains("public key"), "{}", message(&public));
    assert!(message("hello").contains("BEGIN OPENSSH PRIVATE KEY"));
    let broken = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAAnot-a-key\n-----END OPENSSH PRIVATE KEY-----\n";
    assert!(message(broken).contains("not a usable private key"), "{}", message(broken));

    let encrypted = keygen_with(dir.path(), "enc", &["-t", "ed25519", "-N", "passphrase"]);
    let text = message(&std::fs::read_to_string(encrypted).unwrap());
    assert!(text.contains("passphrase"), "{text}");

    // RSA, as Docker Machine plugins generate it (PKCS#1 PEM) and as ssh-keygen does.
    let rsa = keygen_with(dir.path(), "rsa", &["-t", "rsa", "-b", "2048", "-N", ""]);
    SshPrivateKey::from_openssh(&std::fs::read_to_string(&rsa).unwrap()).expect("an OpenSSH RSA key parses");
    let pem = keygen_with(dir.path(), "rsa-pem", &["-t", "rsa", "-b", "2048", "-N", "", "-m", "PEM"]);
    let text = std::fs::read_to_string(pem).unwrap();
    assert!(text.starts_with("-----BEGIN RSA PRIVATE KEY-----"), "{text}");
    SshPrivateKey::from_openssh(&text).expect("a PKCS#1 RSA key parses");

    // Bytes that are not text.
    assert!(SshPrivateKey::from_bytes(&[0xff, 0xfe]).unwrap_err().to_string().contains("not text"));
    // As a driver error, it names the field.
    let error = SshPrivateKey::from_openssh("").unwrap_err().to_driver_error("spec.ssh.keySecretRef");
    assert!(matches!(&error, DriverError::InvalidConfig { field, .. } if field == "spec.ssh.keySecretRef"));
}

#[tokio::test]
async fn check_ready_logs_in_and_reports_the_host_key() {
    let sshd = TestSshd::start();
    bounded(async {
        let fingerprint = ssh::check_ready(&target(&sshd), &bootstrap(&sshd), &[]).await.expect("ready");
        assert_eq!(fingerprint, sshd.host_key_fingerprint(), "the fingerprint is as ssh-keygen -lf prints it");
        // Pinned to the right key: fine.
        let again = ssh::check_ready(&target(&sshd), &bootstrap(&sshd), std::slice::from_ref(&fingerprint))
            .await
            .expect("pinned");
        assert_eq!(again, fingerprint);
        // An empty pin is no pin.
        ssh::check_ready(&target(&sshd), &bootstrap(&sshd), &[String::new()]).await.expect("empty pin");
        assert_eq!(sshd.accepted_logins(), 3);
    })
    .await;
}

#[tokio::test]
async fn a_closed_port_is_connection_refused() {
    bounded(async {
        let target = SshTarget::new("127.0.0.1", free_port(), "root");
        let auth = SshAuth::key(SshPrivateKey::from_openssh(generate_ed25519("").private_openssh.expose()).unwrap());
        let error = ssh::connect(&target, &auth, &[], STEP).await.expect_err("nothing listens");
        assert!(matches!(error, SshError::ConnectionRefused { .. }), "{error:?}");
        assert_eq!(error.reason(), "ConnectionRefused");
        assert!(error.is_retryable());
        assert!(error.to_string().contains("refused"), "{error}");
        let mapped = error.to_driver_error("spec.credentialsSecretRef");
        assert!(matches!(mapped, DriverError::Transient { .. }), "{mapped:?}");
    })
    .await;
}

#[tokio::test]
async fn a_server_that_never_speaks_is_a_timeout() {
    bounded(async {
        // Accepts connections and holds them without a word.
        let port = silent_listener();
        let target = SshTarget::new("127.0.0.1", port, "root");
        let auth = SshAuth::password("x");
        let error =
            ssh::connect(&target, &auth, &[], Duration::from_millis(700)).await.expect_err("the server is silent");
        assert!(
            matches!(error, SshError::Timeout { stage: SshStage::Connect, after, .. } if after == Duration::from_millis(700)),
            "{error:?}"
        );
        assert_eq!(error.reason(), "Timeout");
        assert!(error.to_string().contains("booting"), "{error}");
        assert!(matches!(error.to_driver_error("c"), DriverError::Transient { .. }));
    })
    .await;
}

#[tokio::test]
async fn a_name_that_does_not_resolve_is_unreachable() {
    bounded(async {
        let target = SshTarget::new("no-such-host.invalid", 22, "root");
        let error = ssh::connect(&target, &SshAuth::password("x"), &[], STEP).await.expect_err("no such host");
        assert!(matches!(error, SshError::Unreachable { .. }), "{error:?}");
        assert!(error.to_string().contains("resolve"), "{error}");
    })
    .await;
}

#[tokio::test]
async fn a_wrong_key_or_password_is_auth_failed() {
    let sshd = TestSshd::start();
    bounded(async {
        let stranger = SshPrivateKey::from_openssh(generate_ed25519("").private_openssh.expose()).unwrap();
        let error = ssh::connect(&target(&sshd), &SshAuth::key(stranger.clone()), &[], STEP)
            .await
            .expect_err("the key is not authorized");
        let SshError::AuthFailed { user, method, accepted, .. } = &error else { panic!("{error:?}") };
        assert_eq!(user, &sshd.user);
        assert!(method.contains(&stranger.fingerprint()), "{method}");
        assert!(accepted.contains("publickey"), "{accepted}");
        assert_eq!(error.reason(), "AuthFailed");
        assert!(!error.is_retryable());
        let mapped = error.to_driver_error("spec.credentialsSecretRef");
        let DriverError::InvalidConfig { field, message } = &mapped else { panic!("{mapped:?}") };
        assert_eq!(field, "spec.credentialsSecretRef");
        assert!(message.contains("rejected"), "{message}");

        let error = ssh::connect(&target(&sshd), &SshAuth::password("wrong-password-123"), &[], STEP)
            .await
            .expect_err("the password is wrong");
        assert!(matches!(error, SshError::AuthFailed { .. }), "{error:?}");
        assert!(!format!("{error} {error:?}").contains("wrong-password-123"));

        // Key, then password: both refused, one error.
        let both = SshAuth::key_then_password(stranger, "wrong-password-123");
        let error = ssh::connect(&target(&sshd), &both, &[], STEP).await.expect_err("both are wrong");
        assert!(matches!(&error, SshError::AuthFailed { method, .. } if method.contains("and password")), "{error:?}");
        assert_eq!(sshd.accepted_logins(), 0);
    })
    .await;
}

#[tokio::test]
async fn a_changed_host_key_is_refused_before_logging_in() {
    let mut sshd = TestSshd::start();
    let first = bounded(ssh::check_ready(&target(&sshd), &bootstrap(&sshd), &[])).await.expect("first contact");
    assert_eq!(first, sshd.host_key_fingerprint());

    let new_key = sshd.new_host_key();
    sshd.set_host_key(&new_key);
    let second = sshd.host_key_fingerprint();
    assert_ne!(first, second);
    let logins_before = sshd.accepted_logins();
    let attempts_before = sshd.auth_attempts();
    assert!(attempts_before > 0, "the first contact logged in: {}", sshd.log());

    bounded(async {
        for _ in 0..2 {
            // Pinned stays pinned: every attempt is refused, nothing is re-pinned.
            let error = ssh::connect(&target(&sshd), &bootstrap(&sshd), std::slice::from_ref(&first), STEP)
                .await
                .expect_err("the host key changed");
            let SshError::HostKeyMismatch { trusted, found, .. } = &error else { panic!("{error:?}") };
            assert_eq!(trusted, std::slice::from_ref(&first));
            assert_eq!(found, &second);
            assert_eq!(error.reason(), "HostKeyMismatch");
            assert!(!error.is_retryable());
            assert!(error.to_string().contains("disconnected before logging in"), "{error}");
        }
        // Disconnected before authenticating: the server saw no attempt, let alone a login.
        assert_eq!(sshd.accepted_logins(), logins_before, "{}", sshd.log());
        assert_eq!(sshd.auth_attempts(), attempts_before, "{}", sshd.log());

        let mapped = ssh::connect(&target(&sshd), &bootstrap(&sshd), std::slice::from_ref(&first), STEP)
            .await
            .unwrap_err()
            .to_driver_error("spec.credentialsSecretRef");
        let DriverError::HostKeyMismatch { trusted, presented, .. } = &mapped else { panic!("{mapped:?}") };
        assert_eq!((trusted, presented), (&vec![first.clone()], &second));
        assert_eq!(mapped.reason(), "HostKeyMismatch");
        assert!(!mapped.is_retryable());

        // Any of several trusted keys will do (a console lists one per key type).
        let session = ssh::connect(&target(&sshd), &bootstrap(&sshd), &[first.clone(), second.clone()], STEP)
            .await
            .expect("one of the trusted keys");
        session.close().await;

        // Accepting the new key is the caller's decision: pinning it works.
        let session = ssh::connect(&target(&sshd), &bootstrap(&sshd), std::slice::from_ref(&second), STEP)
            .await
            .expect("new pin");
        assert_eq!(session.host_key_fingerprint(), second);
        session.close().await;
    })
    .await;
}

#[tokio::test]
async fn run_reports_exit_status_output_and_takes_stdin() {
    let sshd = TestSshd::start();
    bounded(async {
        let session = ssh::connect(&target(&sshd), &bootstrap(&sshd), &[], STEP).await.expect("login");
        assert_eq!(session.target(), &target(&sshd));

        let output = session.run("echo out; echo err >&2; exit 3", None, STEP).await.unwrap();
        assert_eq!(output.exit_status, 3);
        assert_eq!(output.stdout, b"out\n");
        assert_eq!(output.stderr, b"err\n");
        assert!(!output.success());
        assert_eq!(output.describe_failure(), "exit status 3: err");

        let ok = session.run("true", None, STEP).await.unwrap();
        assert!(ok.success() && ok.stdout.is_empty() && ok.stderr.is_empty());

        // Standard input, larger than one SSH window, binary, and ended with EOF; of the
        // output, the end is kept.
        let input: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let echoed = session.run("cat", Some(&input), STEP).await.unwrap();
        assert!(echoed.success());
        assert_eq!(echoed.stdout.len(), ssh::MAX_OUTPUT_BYTES);
        assert!(echoed.stdout == input[input.len() - ssh::MAX_OUTPUT_BYTES..], "stdin came back altered");
        let counted = session.run("wc -c", Some(b"12345"), STEP).await.unwrap();
        assert_eq!(counted.stdout_text().trim(), "5");

        // The session's environment: $HOME is the test's.
        let home = session.run("echo $HOME", None, STEP).await.unwrap();
        assert_eq!(home.stdout_text().trim(), sshd.home().display().to_string());

        let killed = session.run("kill -9 $$", None, STEP).await.unwrap();
        assert_eq!(killed.exit_signal.as_deref(), Some("KILL"));
        assert_eq!(killed.exit_status, 255);
        assert!(!killed.success());

        let error = session.run("sleep 10", None, Duration::from_millis(300)).await.expect_err("too slow");
        assert!(
            matches!(&error, SshError::Timeout { stage: SshStage::Command, command: Some(c), .. } if c == "sleep 10"),
            "{error:?}"
        );
        // The session stays usable after a command timed out.
        assert!(session.run("true", None, STEP).await.unwrap().success());
        assert!(!session.is_closed());
        session.close().await;
    })
    .await;
}

#[tokio::test]
async fn a_connection_dropped_during_a_command_is_connection_lost() {
    let sshd = TestSshd::start();
    bounded(async {
        let session = ssh::connect(&target(&sshd), &bootstrap(&sshd), &[], STEP).await.expect("login");
        // Kill the server process of this very session: the connection drops.
        let error = session.run("kill -9 $PPID; sleep 5", None, STEP).await.expect_err("the connection drops");
        assert!(matches!(error, SshError::ConnectionLost { stage: SshStage::Command, .. }), "{error:?}");
        assert!(error.is_retryable());
    })
    .await;
}

#[test]
fn targets_and_endpoints() {
    let target = SshTarget::from(SshEndpoint { host: "2001:db8::1".into(), port: 2222, user: "core".into() });
    assert_eq!(target.to_string(), "core@[2001:db8::1]:2222");
    assert_eq!(SshTarget::new("h.example", 22, "root").to_string(), "root@h.example:22");
    assert_eq!(ssh::shell_quote("it's"), r"'it'\''s'");
}
