//! `machinist conformance`: every operation of the Driver Specification against one
//! driver, on a scratch instance, for users to qualify a driver (a third-party Docker
//! Machine plugin, say) before trusting it with Machines. No Kubernetes involved.
//!
//! Create, Status, an SSH check where the driver offers SSH, Stop, Start, Restart, Kill
//! and Remove, each timed, with the state each should lead to waited for. Whatever
//! happens (a failure, Ctrl-C), what was created is removed before it returns.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use machinist_drivers::dockermachine::Plugins;
use machinist_drivers::ssh::{self, SshAuth, SshPrivateKey, SshTarget};
use machinist_drivers::{
    CreateRequest, Credentials, Driver, DriverError, DriverSpec, Drivers, HostKeys, MachineRef, MemoryStateStore,
    Removal, State,
};
use serde::Serialize;

/// What to qualify.
pub struct ConformanceConfig {
    /// `fake`, `generic`, `amazonec2` or `dockerMachine:<plugin>`.
    pub driver: String,
    /// The driver's block, as under `spec.driver.<driver>` (for `dockerMachine`, without
    /// `name`).
    pub config: serde_json::Value,
    pub credentials: Credentials,
    pub plugin_dir: Option<PathBuf>,
    /// Where the fake driver's instances and the plugins' store directories go.
    pub work_dir: PathBuf,
    /// How long each operation may take to reach its state.
    pub timeout: Duration,
    /// The SSH user, overriding the driver's.
    pub ssh_user: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Verdict {
    Passed,
    /// The driver says it cannot do this (the specification allows it, e.g. a host that
    /// cannot be powered off).
    NotSupported,
    Failed,
    /// Not run: an earlier step left nothing to run it on.
    Skipped,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Passed => "passed",
            Verdict::NotSupported => "not supported",
            Verdict::Failed => "FAILED",
            Verdict::Skipped => "skipped",
        }
    }
}

/// One operation's result.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub operation: String,
    pub verdict: Verdict,
    pub seconds: f64,
    pub detail: String,
}

/// Every row, and whether the run was interrupted.
#[derive(Debug, Serialize)]
pub struct Report {
    pub driver: String,
    pub rows: Vec<Row>,
    pub interrupted: bool,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self.interrupted && self.rows.iter().all(|r| r.verdict != Verdict::Failed)
    }
}

/// The spec's driver block for `driver`.
fn driver_spec(driver: &str, config: &serde_json::Value) -> Result<DriverSpec, String> {
    let mut block = if config.is_null() { serde_json::json!({}) } else { config.clone() };
    let key = match driver.split_once(':') {
        Some(("dockerMachine", plugin)) => {
            block["name"] = plugin.into();
            "dockerMachine"
        }
        None if ["fake", "generic", "amazonec2"].contains(&driver) => driver,
        _ => {
            return Err(format!("unknown driver {driver:?}: one of fake, generic, amazonec2, dockerMachine:<plugin>"));
        }
    };
    serde_json::from_value(serde_json::json!({ key: block })).map_err(|e| format!("the driver config: {e}"))
}

/// Runs the whole sequence; `interrupt` (Ctrl-C) cuts it short, and what was created is
/// removed all the same. `progress` is told each row as it completes.
pub async fn run(
    config: ConformanceConfig,
    interrupt: impl Future<Output = ()>,
    mut progress: impl FnMut(&Row),
) -> Result<Report, String> {
    let spec = driver_spec(&config.driver, &config.config)?;
    let drivers = Drivers::new(config.work_dir.join("fake"))
        .with_plugins(Plugins::new(config.plugin_dir.clone(), config.work_dir.join("plugins")));
    let suffix = format!("{:08x}", rand::random::<u32>());
    let machine = MachineRef {
        uid: format!("{:08x}-c0f0-4a11-8e55-{:012x}", rand::random::<u32>(), rand::random::<u64>() >> 16),
        name: format!("conformance-{suffix}"),
        namespace: "machinist-conformance".into(),
        ..Default::default()
    };
    let driver = drivers
        .driver_with_state(&spec, machine, config.credentials.clone(), Arc::new(MemoryStateStore::default()))
        .map_err(|e| e.to_string())?;
    let mut run =
        Run { driver: driver.as_ref(), config: &config, rows: Vec::new(), id: None, key: None, pinned: Vec::new() };

    let interrupted = {
        let steps = run.steps(&mut progress);
        tokio::pin!(steps);
        tokio::select! {
            () = &mut steps => false,
            () = interrupt => true,
        }
    };
    if interrupted {
        let row = Row {
            operation: "(interrupted)".into(),
            verdict: Verdict::Failed,
            seconds: 0.0,
            detail: "stopped by a signal; removing what was created".into(),
        };
        progress(&row);
        run.rows.push(row);
    }
    // Whatever happened (a failed Create included), nothing is left behind.
    run.remove(&mut progress).await;
    Ok(Report { driver: config.driver.clone(), rows: run.rows, interrupted })
}

struct Run<'a> {
    driver: &'a dyn Driver,
    config: &'a ConformanceConfig,
    rows: Vec<Row>,
    /// The instance, once created (and until removed).
    id: Option<String>,
    key: Option<SshPrivateKey>,
    /// The host key seen at the first SSH contact; later contacts must present it.
    pinned: Vec<String>,
}

impl Run<'_> {
    fn record(
        &mut self,
        progress: &mut impl FnMut(&Row),
        operation: &str,
        started: Instant,
        verdict: Verdict,
        detail: String,
    ) {
        // One line per row: driver messages often span several.
        let detail = detail.split_whitespace().collect::<Vec<_>>().join(" ");
        let row = Row { operation: operation.to_string(), verdict, seconds: started.elapsed().as_secs_f64(), detail };
        progress(&row);
        self.rows.push(row);
    }

    fn outcome<T>(result: &Result<T, DriverError>) -> (Verdict, String) {
        match result {
            Ok(_) => (Verdict::Passed, String::new()),
            Err(DriverError::NotSupported { message, .. }) => (Verdict::NotSupported, message.clone()),
            Err(e) => (Verdict::Failed, format!("{}: {e}", e.reason())),
        }
    }

    async fn steps(&mut self, progress: &mut impl FnMut(&Row)) {
        let started = Instant::now();
        // The key the instance is reached with: the driver's own, or one made here.
        let mut request = CreateRequest::default();
        if !self.driver.makes_own_ssh_key() && self.driver.offers_ssh() {
            let pair = ssh::generate_ed25519("machinist-conformance");
            request.ssh_public_key = Some(pair.public_openssh.clone());
            self.key = SshPrivateKey::from_openssh(pair.private_openssh.expose()).ok();
        }
        let created = self.driver.create(&request).await;
        let (verdict, detail) = Self::outcome(&created);
        match created {
            Ok(id) => {
                self.record(progress, "Create", started, verdict, format!("instance {id}"));
                self.id = Some(id);
            }
            Err(_) => {
                self.record(progress, "Create", started, verdict, detail);
                for operation in ["Status", "SSH", "Stop", "Start", "Restart", "Kill"] {
                    self.record(progress, operation, Instant::now(), Verdict::Skipped, "no instance".into());
                }
                return;
            }
        }
        let id = self.id.clone().expect("created");
        self.wait_for(progress, "Status", &id, State::Running).await;
        if self.driver.makes_own_ssh_key() {
            match self.driver.own_ssh_key(&id).await {
                Ok(Some(bytes)) => self.key = SshPrivateKey::from_bytes(&bytes).ok(),
                Ok(None) => {}
                Err(e) => self.record(progress, "SSH key", Instant::now(), Verdict::Failed, e.to_string()),
            }
        }
        self.ssh(progress, "SSH", &id).await;

        for (operation, after) in
            [("Stop", State::Stopped), ("Start", State::Running), ("Restart", State::Running), ("Kill", State::Stopped)]
        {
            let started = Instant::now();
            let result = match operation {
                "Stop" => self.driver.stop(&id).await,
                "Start" => self.driver.start(&id).await,
                "Restart" => self.driver.restart(&id).await,
                _ => self.driver.kill(&id).await,
            };
            let (verdict, detail) = Self::outcome(&result);
            if verdict != Verdict::Passed {
                self.record(progress, operation, started, verdict, detail);
                continue;
            }
            // The specification: each ensures its state (and Start and Restart, SSH).
            match self.reach(&id, after).await {
                Ok(()) => self.record(progress, operation, started, Verdict::Passed, format!("then {after}")),
                Err(detail) => self.record(progress, operation, started, Verdict::Failed, detail),
            }
            if after == State::Running && self.driver.offers_ssh() {
                self.ssh(progress, &format!("SSH after {operation}"), &id).await;
            }
        }
    }

    /// Polls Status until `want`, within the timeout.
    async fn reach(&self, id: &str, want: State) -> Result<(), String> {
        let deadline = Instant::now() + self.config.timeout;
        loop {
            let last = match self.driver.status(id).await {
                Ok(state) if state == want => return Ok(()),
                Ok(state) => state.to_string(),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(format!("not {want} within {}s (last: {last})", self.config.timeout.as_secs()));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    async fn wait_for(&mut self, progress: &mut impl FnMut(&Row), operation: &str, id: &str, want: State) {
        let started = Instant::now();
        match self.reach(id, want).await {
            Ok(()) => self.record(progress, operation, started, Verdict::Passed, want.to_string()),
            Err(detail) => self.record(progress, operation, started, Verdict::Failed, detail),
        }
    }

    /// Logs in and runs `true`, retrying until the timeout (a booting instance); the host
    /// key must be one the driver lists, when it lists them, and the same every time.
    async fn ssh(&mut self, progress: &mut impl FnMut(&Row), operation: &str, id: &str) {
        let started = Instant::now();
        if !self.driver.offers_ssh() {
            self.record(progress, operation, started, Verdict::Skipped, "the driver offers no SSH".into());
            return;
        }
        // A plugin such as docker-machine's `none` (configure it with `ssh: false`).
        if let Err(DriverError::NotSupported { message, .. }) = self.driver.ssh_endpoint(id).await {
            self.record(progress, operation, started, Verdict::NotSupported, message);
            return;
        }
        let Some(key) = self.key.clone() else {
            let detail = if self.driver.makes_own_ssh_key() {
                "the plugin names no SSH key (GetSSHKeyPath); a plugin without SSH needs `ssh: false` in its config"
            } else {
                "no SSH key for the instance"
            };
            self.record(progress, operation, started, Verdict::Failed, detail.into());
            return;
        };
        let deadline = Instant::now() + self.config.timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            let endpoint = match self.driver.ssh_endpoint(id).await {
                Ok(Some(endpoint)) => endpoint,
                Ok(None) => {
                    last = "no SSH endpoint yet".into();
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
                Err(e) => {
                    last = e.to_string();
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            };
            let mut trusted = self.pinned.clone();
            if trusted.is_empty()
                && let Ok(HostKeys::Known { fingerprints, .. }) = self.driver.host_keys(id).await
            {
                trusted = fingerprints;
            }
            let user = self.config.ssh_user.clone().unwrap_or(endpoint.user.clone());
            let target = SshTarget::new(endpoint.host.clone(), endpoint.port, user);
            match ssh::check_ready_within(&target, &SshAuth::key(key.clone()), &trusted, Duration::from_secs(10)).await
            {
                Ok(fingerprint) => {
                    self.pinned = vec![fingerprint.clone()];
                    let detail = format!("{}@{}:{} ({fingerprint})", target.user, target.host, target.port);
                    self.record(progress, operation, started, Verdict::Passed, detail);
                    return;
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        self.record(progress, operation, started, Verdict::Failed, last);
    }

    /// Remove until done, then Status must say the instance is gone.
    async fn remove(&mut self, progress: &mut impl FnMut(&Row)) {
        let started = Instant::now();
        let deadline = started + self.config.timeout;
        let Some(id) = self.id.clone() else {
            // Interrupted during Create: whatever it left.
            let result = self.driver.remove_leftovers().await;
            let (verdict, detail) = Self::outcome(&result);
            self.record(progress, "Remove", started, verdict, detail);
            return;
        };
        loop {
            match self.driver.remove(&id).await {
                Ok(Removal::Done) => break,
                Ok(Removal::Waiting(what)) if Instant::now() < deadline => {
                    tracing::info!("{what}");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                Ok(Removal::Waiting(what)) => {
                    self.record(
                        progress,
                        "Remove",
                        started,
                        Verdict::Failed,
                        format!("still {what}; check the provider"),
                    );
                    return;
                }
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tracing::warn!("Remove: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                Err(e) => {
                    self.record(
                        progress,
                        "Remove",
                        started,
                        Verdict::Failed,
                        format!("{e}; instance {id} may be left at the provider"),
                    );
                    return;
                }
            }
        }
        self.id = None;
        match self.driver.status(&id).await {
            Ok(State::NotFound) => self.record(progress, "Remove", started, Verdict::Passed, "then NotFound".into()),
            // Drivers that cannot tell "gone" from "broken" (docker-machine's answer Error).
            Ok(State::Error) => self.record(progress, "Remove", started, Verdict::Passed, "then Error (gone)".into()),
            Ok(state) => {
                self.record(progress, "Remove", started, Verdict::Failed, format!("Status still says {state}"))
            }
            Err(e) => self.record(progress, "Remove", started, Verdict::Passed, format!("then: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_fake_driver_conforms_and_an_interrupted_run_removes_its_instance() {
        let dir = tempfile::tempdir().unwrap();
        let config = |config: serde_json::Value| ConformanceConfig {
            driver: "fake".into(),
            config,
            credentials: Credentials::default(),
            plugin_dir: None,
            work_dir: dir.path().to_path_buf(),
            timeout: Duration::from_secs(10),
            ssh_user: None,
        };
        let report = run(config(serde_json::json!({})), std::future::pending(), |_| {}).await.unwrap();
        assert!(report.passed(), "{report:#?}");
        let operations: Vec<&str> = report.rows.iter().map(|r| r.operation.as_str()).collect();
        assert_eq!(operations, ["Create", "Status", "SSH", "Stop", "Start", "Restart", "Kill", "Remove"]);
        assert_eq!(report.rows[2].verdict, Verdict::Skipped, "the fake driver offers no SSH by default");
        let instances = || std::fs::read_dir(dir.path().join("fake")).map(|d| d.count()).unwrap_or(0);
        assert_eq!(instances(), 0);

        // Interrupted in the middle of a slow Stop: the instance is removed all the same.
        let slow = serde_json::json!({"latencyMillis": {"stop": 60_000}});
        let interrupt = tokio::time::sleep(Duration::from_millis(500));
        let report = run(config(slow), interrupt, |_| {}).await.unwrap();
        assert!(report.interrupted && !report.passed());
        assert_eq!(report.rows.last().unwrap().operation, "Remove");
        assert_eq!(report.rows.last().unwrap().verdict, Verdict::Passed, "{report:#?}");
        assert_eq!(instances(), 0);

        assert!(run(config(serde_json::json!({})).with_driver("vbox"), std::future::pending(), |_| {}).await.is_err());
    }

    impl ConformanceConfig {
        fn with_driver(mut self, driver: &str) -> Self {
            self.driver = driver.into();
            self
        }
    }
}
