//! `machinist plugins` and `machinist conformance`, run as a user runs them: the binary,
//! against the Go test plugin (docker-machine-driver-fakecloud) and a real sshd.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use machinist_test_dmplugin::{FakeCloud, plugin_binary, plugin_dir_with, processes_with_home_under};
use machinist_test_sshd::TestSshd;

fn machinist(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_machinist")).args(args).output().expect("machinist runs")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[test]
fn plugins_lists_each_plugin_with_its_flags() {
    plugin_binary();
    let dir = plugin_dir_with(&[("fakecloud", &[])]);
    let out = machinist(&["plugins", "--driver-plugin-dir", &dir.path().to_string_lossy()]);
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.starts_with("fakecloud ("), "{listing}");
    let token = listing.lines().find(|l| l.trim_start().starts_with("fakecloud-token ")).expect("the token flag");
    assert!(token.contains("string") && token.contains("FAKECLOUD_TOKEN"), "{token}");
    let disk = listing.lines().find(|l| l.trim_start().starts_with("fakecloud-disk-size ")).unwrap();
    assert!(disk.contains("int") && disk.contains(" 10 "), "{disk}");

    let out = machinist(&["plugins", "--driver-plugin-dir", &dir.path().to_string_lossy(), "-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let flags = json[0]["flags"].as_array().unwrap();
    assert!(flags.iter().any(|f| f["name"] == "fakecloud-tags" && f["kind"] == "StringSlice"), "{json}");

    let out = machinist(&["plugins", "--driver-plugin-dir", &dir.path().to_string_lossy(), "hetzner"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("docker-machine-driver-hetzner") && text(&out).contains("fakecloud"), "{}", text(&out));
}

struct Setup {
    plugins: tempfile::TempDir,
    files: tempfile::TempDir,
    cloud: FakeCloud,
    sshd: TestSshd,
}

impl Setup {
    fn new() -> Setup {
        plugin_binary();
        Setup {
            plugins: plugin_dir_with(&[("fakecloud", &[])]),
            files: tempfile::tempdir().unwrap(),
            cloud: FakeCloud::new(),
            sshd: TestSshd::start(),
        }
    }

    /// `machinist conformance` against fakecloud with `extra` flags (YAML lines).
    fn command(&self, extra: &str) -> Command {
        let config = self.files.path().join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "flags:\n  fakecloud-provider-dir: {}\n  fakecloud-ssh-port: {}\n  fakecloud-ssh-user: {}\n  fakecloud-authorized-keys-file: {}\n{extra}",
                self.cloud.path().display(),
                self.sshd.port(),
                self.sshd.user,
                self.sshd.authorized_keys_path().display()
            ),
        )
        .unwrap();
        let credentials = self.files.path().join("credentials.yaml");
        std::fs::write(&credentials, "FAKECLOUD_TOKEN: t0ken\n").unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_machinist"));
        command.args(["conformance", "--driver", "dockerMachine:fakecloud", "--timeout", "20"]);
        command.arg("--config").arg(&config).arg("--credentials").arg(&credentials);
        command.arg("--driver-plugin-dir").arg(self.plugins.path());
        command
    }
}

fn row<'a>(table: &'a str, operation: &str) -> &'a str {
    table
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with(&format!("{operation} ")))
        .unwrap_or_else(|| panic!("no row {operation} in:\n{table}"))
}

#[test]
fn a_conforming_plugin_passes_every_operation_and_leaves_nothing() {
    let s = Setup::new();
    let out = s.command("").output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    for operation in [
        "Create",
        "Status",
        "SSH",
        "Stop",
        "Start",
        "SSH after Start",
        "Restart",
        "SSH after Restart",
        "Kill",
        "Remove",
    ] {
        assert!(row(&table, operation).contains("passed"), "{operation}:\n{table}");
    }
    assert!(row(&table, "SSH").contains(&s.sshd.host_key_fingerprint()), "{table}");
    assert!(table.contains("dockerMachine:fakecloud: conforms"), "{table}");
    assert!(s.cloud.instances().is_empty(), "what it created is removed");
    assert!(!text(&out).contains("t0ken"), "the credential is never printed");
}

#[test]
fn a_failing_operation_fails_the_run_and_the_instance_is_still_removed() {
    let s = Setup::new();
    let out = s.command("  fakecloud-fail: [\"Restart=the hypervisor is on fire\"]\n").output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(row(&table, "Restart").contains("FAILED") && row(&table, "Restart").contains("on fire"), "{table}");
    assert!(row(&table, "Remove").contains("passed"), "{table}");
    assert!(table.contains("does NOT conform"), "{table}");
    assert!(s.cloud.instances().is_empty());
}

#[test]
fn an_interrupted_run_removes_what_it_created() {
    let s = Setup::new();
    let child = s
        .command("  fakecloud-slow: [\"Stop=30000\"]\n")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.cloud.instances().is_empty() {
        assert!(Instant::now() < deadline, "never created");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2)); // into the slow Stop
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(table.contains("(interrupted)"), "{table}");
    assert!(row(&table, "Remove").contains("passed"), "{table}");
    assert!(s.cloud.instances().is_empty(), "removed after the interrupt: {:?}", s.cloud.instances());
}

#[test]
fn a_plugin_dies_with_a_killed_machinist_rather_than_at_its_heartbeat_timeout() {
    let s = Setup::new();
    let tmp = tempfile::tempdir().unwrap();
    let child = s
        .command("  fakecloud-slow: [\"Stop=30000\"]\n")
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.cloud.instances().is_empty() || processes_with_home_under(tmp.path()) == 0 {
        assert!(Instant::now() < deadline, "never created");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1)); // into the slow Stop
    assert!(Command::new("kill").args(["-KILL", &child.id().to_string()]).status().unwrap().success());
    let mut child = child;
    child.wait().unwrap();
    // Its heartbeat timeout is 10 s; dying with machinist takes a moment.
    let deadline = Instant::now() + Duration::from_secs(3);
    while processes_with_home_under(tmp.path()) > 0 {
        assert!(Instant::now() < deadline, "the plugin outlived machinist");
        std::thread::sleep(Duration::from_millis(50));
    }
}
