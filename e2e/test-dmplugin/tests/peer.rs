//! The test peer itself works: the plugin builds and starts like a docker-machine
//! plugin, the Go-made gob fixtures exist and decode, the plugin directories' wrappers
//! pass their environment, and the Go side's own tests (a libmachine-style net/rpc
//! client driving the plugin, in process and as a child process) pass.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use machinist_test_dmplugin::{
    FakeCloud, GOB_DECODE_KINDS, GOB_FIXTURE_CASES, gob_decode_with_go, gob_fixture, gobfixture_binary, plugin_binary,
    plugin_dir_with, plugin_path, run_go, try_gob_decode_with_go,
};

/// A started plugin and its first stdout line; killed on drop.
struct Started {
    child: Child,
    first_line: String,
}

impl Started {
    fn new(program: &Path, envs: &[(&str, &str)]) -> Started {
        let mut child = Command::new(program)
            .env("MACHINE_PLUGIN_TOKEN", "42")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        let mut stdout = BufReader::new(child.stdout.take().expect("a piped stdout"));
        let mut first_line = String::new();
        stdout.read_line(&mut first_line).expect("reading the first line");
        // Keep draining stdout, as a client must.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        Started { child, first_line: first_line.trim_end().to_string() }
    }

    fn wait_exit(&mut self, within: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let mut stderr = String::new();
                self.child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("reading stderr");
                return (status, stderr);
            }
            assert!(Instant::now() < deadline, "the plugin still runs after {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_plugin_builds() {
    let plugin = plugin_binary();
    let meta = std::fs::metadata(plugin).expect("the plugin binary");
    assert!(meta.is_file() && meta.permissions().mode() & 0o111 != 0, "{} is not executable", plugin.display());
    assert!(plugin.starts_with(machinist_test_dmplugin::build_dir()));
    assert!(gobfixture_binary().is_file());
}

#[test]
fn it_prints_its_address_and_speaks_go_rpc_over_http() {
    let plugin = Started::new(plugin_binary(), &[]);
    let addr: SocketAddr = plugin.first_line.parse().unwrap_or_else(|_| panic!("first line {:?}", plugin.first_line));
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0);

    let mut conn = TcpStream::connect(addr).expect("connecting to the plugin");
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(b"CONNECT /_goRPC_ HTTP/1.0\n\n").unwrap();
    let want = b"HTTP/1.0 200 Connected to Go RPC\n\n";
    let mut got = vec![0; want.len()];
    conn.read_exact(&mut got).expect("reading the CONNECT answer");
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
}

#[test]
fn without_the_token_it_exits_1() {
    let output = Command::new(plugin_binary()).env_remove("MACHINE_PLUGIN_TOKEN").output().expect("running the plugin");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("This is a Docker Machine plugin binary."), "stderr: {stderr}");
    assert!(output.stdout.is_empty());
}

#[test]
fn it_exits_1_without_heartbeats() {
    let start = Instant::now();
    let mut plugin = Started::new(plugin_binary(), &[("FAKECLOUD_HEARTBEAT_TIMEOUT_MS", "500")]);
    assert!(plugin.first_line.parse::<SocketAddr>().is_ok(), "first line {:?}", plugin.first_line);
    let (status, stderr) = plugin.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert!(start.elapsed() >= Duration::from_millis(500));
    assert!(stderr.contains("no heartbeat for 500ms"), "stderr: {stderr}");
}

#[test]
fn gob_fixtures_come_from_go() {
    assert!(!gob_fixture("request").is_empty());
    let listed = Command::new(gobfixture_binary()).arg("list").output().expect("gobfixture list");
    let listed = String::from_utf8(listed.stdout).unwrap();
    assert_eq!(listed.lines().collect::<Vec<_>>(), GOB_FIXTURE_CASES, "GOB_FIXTURE_CASES is out of date");
    for case in GOB_FIXTURE_CASES {
        assert!(!gob_fixture(case).is_empty(), "{case}");
    }
    // Stable cases are stable.
    assert_eq!(gob_fixture("response-create-flags"), gob_fixture("response-create-flags"));
}

#[test]
fn go_decodes_its_own_fixtures() {
    assert_eq!(
        gob_decode_with_go("request-set-config-from-flags", &gob_fixture("set-config-from-flags")),
        "request RPCServerDriver.SetConfigFromFlags seq=9\n\
         argument *rpcdriver.RPCFlags\n\
         fakecloud-disk-size=20 (int)\n\
         fakecloud-private-network=true (bool)\n\
         fakecloud-tags=[]string{\"a\", \"b\"} ([]string)\n\
         fakecloud-token=\"s3cret\" (string)\n"
    );
    assert_eq!(
        gob_decode_with_go("request-set-config-raw", &gob_fixture("request-set-config-raw")),
        "request RPCServerDriver.SetConfigRaw seq=8\n\
         argument []byte \"{\\\"MachineName\\\":\\\"m1\\\",\\\"StorePath\\\":\\\"/tmp/store\\\"}\"\n"
    );
    assert_eq!(
        gob_decode_with_go("request-empty", &gob_fixture("request")),
        "request RPCServerDriver.GetCreateFlags seq=7\nargument struct{}\n"
    );
    let stream = gob_decode_with_go("requests", &gob_fixture("request-stream"));
    let heads: Vec<&str> = stream.lines().filter(|l| l.starts_with("request ")).collect();
    assert_eq!(
        heads,
        [
            "request RPCServerDriver.GetVersion seq=0",
            "request RPCServerDriver.SetConfigRaw seq=1",
            "request RPCServerDriver.GetCreateFlags seq=2",
            "request RPCServerDriver.SetConfigFromFlags seq=3",
            "request RPCServerDriver.Create seq=4",
        ]
    );
    assert!(stream.contains("fakecloud-token=\"s3cret\" (string)\n"), "{stream}");

    // Wrong bytes give Go's error, not a panic.
    let err = try_gob_decode_with_go("request-set-config-raw", &gob_fixture("request")).unwrap_err();
    assert!(err.contains("gob"), "{err}");
    assert!(try_gob_decode_with_go("request-empty", b"").is_err());
    assert!(try_gob_decode_with_go("no-such-kind", b"").is_err());
    assert_eq!(GOB_DECODE_KINDS.len(), 4);
}

#[test]
fn plugin_directories_pass_the_environment() {
    let dir = plugin_dir_with(&[
        ("fakecloud", &[]),
        ("banner", &[("FAKECLOUD_BANNER", "it's  not an address")]),
        ("dies", &[("FAKECLOUD_EXIT_AT_START", "3")]),
    ]);
    let plain = Started::new(&plugin_path(dir.path(), "fakecloud"), &[]);
    assert!(plain.first_line.parse::<SocketAddr>().is_ok(), "first line {:?}", plain.first_line);
    let banner = Started::new(&plugin_path(dir.path(), "banner"), &[]);
    assert_eq!(banner.first_line, "it's  not an address");
    let mut dies = Started::new(&plugin_path(dir.path(), "dies"), &[]);
    let (status, stderr) = dies.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(3));
    assert!(stderr.contains("FAKECLOUD_EXIT_AT_START"), "stderr: {stderr}");
    assert!(dies.first_line.is_empty());
    // The wrappers need nothing from the environment (no PATH either).
    let output = Command::new(plugin_path(dir.path(), "dies")).env_clear().output().expect("running a wrapper");
    assert_eq!(output.status.code(), Some(3), "{}", String::from_utf8_lossy(&output.stderr));
}

fn go_test(run: &str, envs: &[(&str, &str)]) {
    let output = run_go(["test", "-count=1", "-run", run, "./..."], envs);
    assert!(
        output.status.success(),
        "go test -run {run} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_go_side_vets_and_passes_its_own_tests() {
    let vet = run_go(["vet", "./..."], &[]);
    assert!(vet.status.success(), "go vet failed:\n{}", String::from_utf8_lossy(&vet.stderr));
    go_test(".", &[]);
}

#[test]
fn fake_cloud_reads_and_writes_what_the_driver_does() {
    let cloud = FakeCloud::new();
    let dir = cloud.path().to_str().unwrap();
    assert!(cloud.instances().is_empty());
    // The Go driver makes instance "kept" ...
    go_test("^TestProviderFromEnv$", &[("FAKECLOUD_TEST_PROVIDER_DIR", dir)]);
    let instances = cloud.instances();
    assert_eq!(instances.len(), 1, "{instances:?}");
    let kept = &instances[0];
    assert_eq!((kept.state.as_str(), kept.ip.as_str(), kept.machine_name.as_str()), ("Running", "127.0.0.1", "kept"));
    assert_eq!(kept.instance_type, "large");
    assert!(kept.id.starts_with("fc-"));
    assert_eq!(cloud.instance(&kept.id).as_ref(), Some(kept));
    // ... and sees what the test changes behind its back.
    cloud.set_state(&kept.id, "Stopped");
    cloud.set_ip(&kept.id, "10.0.0.9");
    go_test(
        "^TestProviderFromEnv$",
        &[
            ("FAKECLOUD_TEST_PROVIDER_DIR", dir),
            ("FAKECLOUD_TEST_WANT_STATE", "Stopped"),
            ("FAKECLOUD_TEST_WANT_IP", "10.0.0.9"),
        ],
    );
    assert_eq!(cloud.instance(&kept.id).unwrap().state_code(), 4);
    cloud.remove(&kept.id);
    assert!(cloud.instances().is_empty());
}
