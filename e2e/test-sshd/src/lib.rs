//! A real OpenSSH server for tests: `/usr/sbin/sshd -D -e -f <config>` on a free
//! loopback port, with its own host key, config, pid file and `authorized_keys`, in a
//! temporary directory. The system's sshd is never touched. The server is killed when the
//! `TestSshd` is dropped.
//!
//! Layout of the temporary directory:
//! - `host_key*`: host keys (`ssh-keygen -t ed25519`);
//! - `bootstrap_key`, `bootstrap_key.pub`: the login the tests use as bootstrap
//!   credentials, authorized through `bootstrap_authorized_keys`;
//! - `home/`: `$HOME` of every session (sshd_config `SetEnv HOME=...`), so
//!   `~/.ssh/authorized_keys` (the second `AuthorizedKeysFile`) is the test's own file.
//!   `home/.ssh` does not exist until something creates it.
//!
//! Needs root (sshd's privilege separation) and the Debian package `openssh-server`.

use std::fs;
use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub const SSHD: &str = "/usr/sbin/sshd";
pub const INSTALL: &str =
    "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openssh-server";

pub struct TestSshd {
    dir: TempDir,
    port: u16,
    host_key: PathBuf,
    child: Option<Child>,
    /// How many times a server was started (1 after `start`).
    pub starts: u32,
    /// The user the tests log in as (the one running the tests).
    pub user: String,
}

impl TestSshd {
    /// Starts a server on a free port. Panics, naming the install command, when sshd is
    /// missing: these tests must not pass by skipping.
    pub fn start() -> TestSshd {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: the SSH tests need a real OpenSSH server. Install it with: {INSTALL}"
        );
        let uid = output(Command::new("id").arg("-u"));
        assert_eq!(uid.trim(), "0", "the SSH tests start their own sshd, which needs root");
        let user = output(Command::new("id").arg("-un")).trim().to_string();
        // sshd's privilege-separation directory; the Debian package creates it only at boot.
        fs::create_dir_all("/run/sshd").expect("creating /run/sshd");

        let dir = tempfile::Builder::new().prefix("machinist-sshd-").tempdir().expect("temporary directory");
        fs::create_dir(dir.path().join("home")).expect("creating home");
        let host_key = keygen(dir.path(), "host_key");
        keygen(dir.path(), "bootstrap_key");
        fs::copy(dir.path().join("bootstrap_key.pub"), dir.path().join("bootstrap_authorized_keys"))
            .expect("authorizing the bootstrap key");

        let mut sshd = TestSshd { dir, port: 0, host_key, child: None, starts: 0, user };
        for _ in 0..5 {
            sshd.port = free_port();
            if sshd.spawn() {
                return sshd;
            }
        }
        panic!("sshd could not bind a free port after 5 attempts:\n{}", sshd.log());
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `$HOME` of the sessions.
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// `~/.ssh/authorized_keys` of the sessions (absent until created).
    pub fn authorized_keys_path(&self) -> PathBuf {
        self.home().join(".ssh/authorized_keys")
    }

    /// The bootstrap login's private key (OpenSSH PEM, written by ssh-keygen).
    pub fn bootstrap_private_key(&self) -> String {
        fs::read_to_string(self.dir.path().join("bootstrap_key")).expect("bootstrap key")
    }

    pub fn bootstrap_public_key(&self) -> String {
        fs::read_to_string(self.dir.path().join("bootstrap_key.pub")).expect("bootstrap public key").trim().to_string()
    }

    /// The host key's fingerprint as `ssh-keygen -lf` prints it.
    pub fn host_key_fingerprint(&self) -> String {
        let listing = output(Command::new("ssh-keygen").arg("-lf").arg(self.host_key.with_extension("pub")));
        listing.split_whitespace().nth(1).expect("ssh-keygen -lf prints the fingerprint second").to_string()
    }

    /// A fresh host key in the temporary directory (not in use until `set_host_key`).
    pub fn new_host_key(&self) -> PathBuf {
        let name = format!("host_key_{}", self.starts + 1);
        keygen(self.dir.path(), &name)
    }

    /// Serves `key` from now on: rewrites the config and restarts the server.
    pub fn set_host_key(&mut self, key: &Path) {
        self.host_key = key.to_path_buf();
        self.restart();
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (sessions already open stay, as with a real sshd).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server if it runs, and starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        // The port was just ours; a moment of retry covers a slow release.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.spawn() {
            assert!(Instant::now() < deadline, "sshd did not start again on port {}:\n{}", self.port, self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything the servers logged (stderr of `sshd -e`), across restarts.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// How many logins the servers accepted so far.
    pub fn accepted_logins(&self) -> usize {
        // VERBOSE also logs "Accepted key ... found at", before the login itself.
        self.log().lines().filter(|l| l.starts_with("Accepted ") && !l.starts_with("Accepted key ")).count()
    }

    /// How many authentication requests the servers logged (accepted, failed or
    /// postponed, any method): 0 for a client that disconnected right after the key
    /// exchange. Needs `LogLevel VERBOSE`, which the config sets.
    pub fn auth_attempts(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| {
                (l.starts_with("Accepted ") && !l.starts_with("Accepted key "))
                    || l.starts_with("Failed ")
                    || l.starts_with("Postponed ")
                    || l.starts_with("Invalid user ")
            })
            .count()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("sshd_config")
    }

    fn write_config(&self) {
        let dir = self.dir.path().display();
        let config = format!(
            "ListenAddress 127.0.0.1:{port}\n\
             HostKey {host_key}\n\
             PidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/bootstrap_authorized_keys {dir}/home/.ssh/authorized_keys\n\
             SetEnv HOME={dir}/home\n\
             PasswordAuthentication yes\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n\
             PrintMotd no\n\
             PrintLastLog no\n\
             LoginGraceTime 10\n\
             LogLevel VERBOSE\n",
            port = self.port,
            host_key = self.host_key.display(),
        );
        fs::write(self.config_path(), config).expect("writing sshd_config");
    }

    /// Starts sshd and waits until it listens. False when the port was taken.
    fn spawn(&mut self) -> bool {
        self.write_config();
        let log_path = self.dir.path().join("sshd.log");
        let before = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let log = fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("sshd log");
        let mut child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {SSHD}: {e} (install it with: {INSTALL})"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let new_log = self.log().get(before as usize..).unwrap_or_default().to_string();
            if new_log.contains("Server listening on") {
                self.child = Some(child);
                self.starts += 1;
                return true;
            }
            if let Ok(Some(status)) = child.try_wait() {
                if new_log.contains("Address already in use") {
                    return false;
                }
                panic!("sshd exited ({status}) before listening:\n{new_log}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("sshd did not listen within 10s:\n{new_log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestSshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("binding a free port").local_addr().expect("local address").port()
}

/// `ssh-keygen -t ed25519 -N '' -f <dir>/<name>`; returns the private key's path.
pub fn keygen(dir: &Path, name: &str) -> PathBuf {
    keygen_with(dir, name, &["-t", "ed25519", "-N", ""])
}

/// ssh-keygen with other options (`-t rsa`, a passphrase...).
pub fn keygen_with(dir: &Path, name: &str, options: &[&str]) -> PathBuf {
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => panic!("removing {}: {e}", path.display()),
    }
    output(Command::new("ssh-keygen").arg("-q").args(options).arg("-C").arg(name).arg("-f").arg(&path));
    path
}

/// Runs a command and returns its stdout; panics with its stderr when it fails.
pub fn output(command: &mut Command) -> String {
    let out = command.output().unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(out.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// A loopback port that accepts connections and never says a word: a host whose SSH
/// hangs. It listens until the process ends.
pub fn silent_listener() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let port = listener.local_addr().expect("a bound port").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for socket in listener.incoming().flatten() {
            held.push(socket);
        }
    });
    port
}
