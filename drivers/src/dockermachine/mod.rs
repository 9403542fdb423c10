//! The `dockerMachine` driver: any Docker Machine driver plugin
//! (`docker-machine-driver-<name>`), driven over the plugin protocol (Go's net/rpc with
//! gob) from Rust, with no Go and no docker-machine CLI at run time.
//!
//! One plugin process serves one driver value (one reconcile) and is closed with it.
//! Before it is asked anything, the Machine's saved state (the driver's config JSON and
//! its store directory, see [`state`]) is restored into a fresh directory; after every
//! call that may change it, the state is saved again. The state is saved before Create
//! too: a plugin cannot be asked to find an instance by tag, so after a crash during
//! Create machinist restores that state and asks GetState, adopting what exists.

pub mod config;
pub mod gob;
pub mod plugin;
mod rpc;
pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use zeroize::Zeroizing;

pub use config::{DockerMachineConfig, Flag, FlagKind, FlagValue};
use gob::{Type, Value};
use plugin::{Plugin, PluginError, Redactor, empty};
use state::{Phase, SavedState};

use crate::{
    Address, AddressType, CREDENTIALS_FIELD, CreateRequest, Credentials, Driver, DriverError, Instance, MachineRef,
    Operation, Removal, SshEndpoint, State, StateStore,
};

/// The prefix of every plugin binary's name.
pub const BINARY_PREFIX: &str = "docker-machine-driver-";

/// How long a call may take before the plugin is killed.
const CREATE_TIMEOUT: Duration = Duration::from_secs(20 * 60);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
const READ_TIMEOUT: Duration = Duration::from_secs(2 * 60);
/// How often the store directory is saved while Create runs.
const STORE_SAVE_INTERVAL: Duration = Duration::from_secs(2);

/// Where plugin binaries are found (`--driver-plugin-dir`) and where their store
/// directories are made while a plugin runs; shared by every Machine.
#[derive(Clone, Debug)]
pub struct Plugins {
    inner: Arc<PluginsInner>,
}

#[derive(Debug)]
struct PluginsInner {
    dir: Option<PathBuf>,
    work_dir: PathBuf,
    flags: Mutex<FlagsCache>,
}

/// GetCreateFlags by binary, while the binary is unchanged (modification time, size).
type FlagsCache = HashMap<PathBuf, (SystemTime, u64, Arc<Vec<Flag>>)>;

/// A plugin binary found in the plugin directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundPlugin {
    /// The driver name (`hetzner` for `docker-machine-driver-hetzner`).
    pub name: String,
    pub path: PathBuf,
}

impl Plugins {
    /// `dir`: the plugin directory, if any. `work_dir`: a writable directory for the
    /// plugins' store directories (each removed when its plugin ends).
    pub fn new(dir: Option<PathBuf>, work_dir: impl Into<PathBuf>) -> Self {
        Plugins { inner: Arc::new(PluginsInner { dir, work_dir: work_dir.into(), flags: Mutex::new(HashMap::new()) }) }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.inner.dir.as_deref()
    }

    /// Every executable `docker-machine-driver-*` in the plugin directory, by name.
    pub fn list(&self) -> Result<Vec<FoundPlugin>, String> {
        let Some(dir) = self.dir() else { return Ok(Vec::new()) };
        let entries =
            std::fs::read_dir(dir).map_err(|e| format!("reading the plugin directory {}: {e}", dir.display()))?;
        let mut found: Vec<FoundPlugin> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let file = entry.file_name().to_string_lossy().into_owned();
                let name = file.strip_prefix(BINARY_PREFIX)?.to_string();
                let path = entry.path();
                executable(&path).then_some(FoundPlugin { name, path })
            })
            .collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// The binary of plugin `name`; InvalidConfig naming `spec.driver.dockerMachine.name`
    /// when there is none.
    pub fn binary(&self, name: &str) -> Result<PathBuf, DriverError> {
        let field = format!("{}.name", config::FIELD);
        let Some(dir) = self.dir() else {
            return Err(DriverError::invalid_config(
                field,
                "this controller has no plugin directory; start it with --driver-plugin-dir (the chart's plugins values)",
            ));
        };
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(DriverError::invalid_config(field, format!("{name:?} is not a plugin name")));
        }
        let path = dir.join(format!("{BINARY_PREFIX}{name}"));
        if executable(&path) {
            return Ok(path);
        }
        let found = self.list().unwrap_or_default();
        let names = if found.is_empty() {
            "none".to_string()
        } else {
            found.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
        };
        Err(DriverError::invalid_config(
            field,
            format!(
                "no executable {BINARY_PREFIX}{name} in the plugin directory {}; plugins found: {names}",
                dir.display()
            ),
        ))
    }

    /// The plugin's create flags (GetCreateFlags), from a short-lived process; kept while
    /// the binary is unchanged.
    pub async fn flags(&self, name: &str) -> Result<Arc<Vec<Flag>>, DriverError> {
        let binary = self.binary(name)?;
        let stamp = std::fs::metadata(&binary).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
        if let (Some((modified, len)), Some((m, l, flags))) =
            (stamp, self.inner.flags.lock().unwrap().get(&binary).cloned())
            && m == modified
            && l == len
        {
            return Ok(flags);
        }
        let dir = SessionDir::new(&self.inner.work_dir, "flags")?;
        let plugin = Plugin::start(&binary, name, dir.path(), Redactor::default())
            .await
            .map_err(|e| plugin_error(Operation::Status, e))?;
        let reply = create_flags(&plugin, READ_TIMEOUT).await;
        plugin.close().await;
        let flags = Arc::new(reply?);
        if let Some((modified, len)) = stamp {
            self.inner.flags.lock().unwrap().insert(binary, (modified, len, flags.clone()));
        }
        Ok(flags)
    }
}

fn executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A directory that exists while a plugin runs, removed with everything in it (keys
/// included) when dropped.
#[derive(Debug)]
struct SessionDir(PathBuf);

impl SessionDir {
    fn new(root: &Path, label: &str) -> Result<SessionDir, DriverError> {
        let path = root.join(format!("{label}-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&path)
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| {
                DriverError::transient(format!("cannot make the plugin's store directory {}: {e}", path.display()))
            })?;
        Ok(SessionDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SessionDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running plugin with the Machine's state restored (or a fresh one, for Create).
struct Session {
    plugin: Plugin,
    dir: SessionDir,
    /// The state as last saved (or restored).
    saved: Option<SavedState>,
}

/// The `dockerMachine` driver for one Machine.
pub struct DockerMachineDriver {
    plugins: Plugins,
    binary: PathBuf,
    config: DockerMachineConfig,
    credentials: Credentials,
    state: Arc<dyn StateStore>,
    /// The name the plugin knows the machine by (and names its instance after).
    machine_name: String,
    session: tokio::sync::Mutex<Option<Session>>,
    redactor: Redactor,
}

impl Drop for DockerMachineDriver {
    fn drop(&mut self) {
        let Some(session) = self.session.get_mut().take() else { return };
        // Close politely when a runtime is there to do it; dropping kills it otherwise.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let Session { plugin, dir, .. } = session;
                plugin.close().await;
                drop(dir);
            });
        }
    }
}

/// The name a plugin knows a Machine by: its name (dots made dashes, cut to fit a DNS
/// label) and the start of its UID, unique across namespaces.
pub fn machine_name(machine: &MachineRef) -> String {
    let mut name: String = machine.name.replace('.', "-").chars().take(54).collect();
    while name.ends_with('-') {
        name.pop();
    }
    let uid: String = machine.uid.chars().filter(char::is_ascii_alphanumeric).take(8).collect();
    format!("{name}-{uid}").to_ascii_lowercase()
}

impl DockerMachineDriver {
    /// Finds the plugin binary: a missing one is InvalidConfig naming the field, before
    /// anything is started.
    pub fn new(
        plugins: Plugins,
        machine: MachineRef,
        config: DockerMachineConfig,
        credentials: Credentials,
        state: Arc<dyn StateStore>,
    ) -> Result<Self, DriverError> {
        let binary = plugins.binary(&config.name)?;
        let redactor = Redactor::new(
            credentials.0.values().map(|v| String::from_utf8_lossy(v).trim_end_matches(['\r', '\n']).to_string()),
        );
        Ok(DockerMachineDriver {
            plugins,
            binary,
            machine_name: machine_name(&machine),
            config,
            credentials,
            state,
            session: tokio::sync::Mutex::new(None),
            redactor,
        })
    }

    /// A call's bound: `callTimeoutSeconds`, else the default for its kind.
    fn timeout(&self, default: Duration) -> Duration {
        self.config.call_timeout_seconds.map_or(default, |s| Duration::from_secs(s.into()))
    }

    async fn load(&self) -> Result<Option<SavedState>, DriverError> {
        match self.state.load().await? {
            None => Ok(None),
            Some(bytes) => SavedState::from_bytes(&bytes).map(Some).map_err(DriverError::transient),
        }
    }

    async fn start_plugin(&self, dir: &Path, operation: Operation) -> Result<Plugin, DriverError> {
        Plugin::start(&self.binary, &self.config.name, dir, self.redactor.clone())
            .await
            .map_err(|e| plugin_error(operation, e))
    }

    /// The session with the saved state restored; `None` inside when nothing is saved.
    async fn restored(
        &self,
        operation: Operation,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<Session>>, DriverError> {
        let mut session = self.session.lock().await;
        if session.is_none()
            && let Some(saved) = self.load().await?
        {
            let dir = SessionDir::new(&self.plugins.inner.work_dir, &self.machine_name)?;
            saved.restore_files(dir.path()).map_err(DriverError::transient)?;
            let plugin = self.start_plugin(dir.path(), operation).await?;
            call(
                &plugin,
                operation,
                "SetConfigRaw",
                &Type::Bytes,
                &Value::Bytes(saved.config_for(dir.path())),
                self.timeout(READ_TIMEOUT),
            )
            .await?;
            *session = Some(Session { plugin, dir, saved: Some(saved) });
        }
        Ok(session)
    }

    /// Saves the driver's config and store directory, when they changed.
    async fn persist(&self, session: &mut Session, phase: Phase, operation: Operation) -> Result<(), DriverError> {
        let (ty, arg) = empty();
        let raw = call(&session.plugin, operation, "GetConfigRaw", &ty, &arg, self.timeout(READ_TIMEOUT)).await?;
        let Value::Bytes(raw) = raw else {
            return Err(DriverError::transient(format!("GetConfigRaw answered {raw:?}")));
        };
        let config: serde_json::Value = serde_json::from_slice(&raw)
            .map_err(|e| DriverError::transient(format!("GetConfigRaw answered JSON that does not parse: {e}")))?;
        let files = state::snapshot_files(session.dir.path())
            .map_err(|m| DriverError::invalid_config(format!("{}.name", config::FIELD), m))?;
        let saved = SavedState {
            plugin: self.config.name.clone(),
            machine_name: self.machine_name.clone(),
            phase,
            store_path: session.dir.path().to_string_lossy().into_owned(),
            config,
            files,
        };
        if session.saved.as_ref() != Some(&saved) {
            self.state.save(&saved.to_bytes()).await?;
            session.saved = Some(saved);
        }
        Ok(())
    }

    /// Saves what a running Create has got to, when it changed: the plugin's config (when
    /// `plugin` answers GetConfigRaw within a second; plugins serve calls concurrently,
    /// and one that does not is simply not asked again until the next tick) and the store
    /// directory's files. Best effort: a failure is logged, and the next tick tries again.
    async fn save_progress(&self, plugin: Option<&Plugin>, store: &Path, saved: &mut SavedState) {
        let mut changed = false;
        if let Some(plugin) = plugin {
            let (ty, arg) = empty();
            if let Some(Ok(Value::Bytes(raw))) =
                plugin.call_or_give_up("GetConfigRaw", &ty, &arg, Duration::from_secs(1)).await
                && let Ok(config) = serde_json::from_slice::<serde_json::Value>(&raw)
                && config != saved.config
            {
                saved.config = config;
                changed = true;
            }
        }
        match state::snapshot_files(store) {
            Ok(files) if files != saved.files => {
                saved.files = files;
                changed = true;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(machine = %self.machine_name, "reading the plugin's store directory: {e}"),
        }
        if changed && let Err(e) = self.state.save(&saved.to_bytes()).await {
            tracing::warn!(machine = %self.machine_name, "saving the plugin's progress: {e}");
        }
    }

    /// The values for SetConfigFromFlags, checked against the plugin's flags. `files`:
    /// where each `fileFlags` credential was (or would be) written.
    fn values(
        &self,
        flags: &[Flag],
        files: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, FlagValue>, DriverError> {
        config::flag_values(flags, &self.config, &self.credentials, files)
    }

    /// Writes each `fileFlags` credential into `dir`; the paths, by flag.
    fn write_files(&self, dir: &Path) -> Result<BTreeMap<String, String>, DriverError> {
        let mut paths = BTreeMap::new();
        if self.config.file_flags.is_empty() {
            return Ok(paths);
        }
        let files = dir.join("machinist-files");
        std::fs::create_dir_all(&files).map_err(|e| DriverError::transient(e.to_string()))?;
        for (flag, key) in &self.config.file_flags {
            let Some(data) = self.credentials.0.get(key) else { continue };
            let path = files.join(flag);
            std::fs::write(&path, data)
                .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)))
                .map_err(|e| DriverError::transient(format!("writing the file for {flag}: {e}")))?;
            paths.insert(flag.clone(), path.to_string_lossy().into_owned());
        }
        Ok(paths)
    }

    /// Where `fileFlags` would go, for checking flags without writing anything.
    fn planned_files(&self) -> BTreeMap<String, String> {
        self.config
            .file_flags
            .iter()
            .filter(|(_, key)| self.credentials.0.contains_key(*key))
            .map(|(flag, _)| (flag.clone(), format!("machinist-files/{flag}")))
            .collect()
    }

    /// Removes the instance the saved state describes; then forgets the state, unless a
    /// new Create is about to replace it.
    async fn remove_saved(&self, operation: Operation, forget: bool) -> Result<Removal, DriverError> {
        let mut guard = self.restored(operation).await?;
        let Some(session) = guard.as_mut() else { return Ok(Removal::Done) };
        let (ty, arg) = empty();
        match call(&session.plugin, operation, "Remove", &ty, &arg, self.timeout(CREATE_TIMEOUT)).await {
            Ok(_) | Err(DriverError::NotFound { .. }) => {}
            Err(error) => {
                // What Remove already did may have changed the state.
                let _ =
                    self.persist(session, session.saved.as_ref().map_or(Phase::Created, |s| s.phase), operation).await;
                return Err(error);
            }
        }
        if forget {
            self.state.clear().await?;
        }
        if let Some(session) = guard.take() {
            session.plugin.close().await;
        }
        Ok(Removal::Done)
    }

    async fn change(&self, operation: Operation, method: &str) -> Result<(), DriverError> {
        let mut guard = self.restored(operation).await?;
        let Some(session) = guard.as_mut() else { return Err(no_state(operation)) };
        let (ty, arg) = empty();
        let result = call(&session.plugin, operation, method, &ty, &arg, self.timeout(CHANGE_TIMEOUT)).await;
        if result.is_ok() {
            self.persist(session, Phase::Created, operation).await?;
        }
        result.map(|_| ())
    }

    async fn read(&self, method: &str) -> Result<Value, DriverError> {
        let guard = self.restored(Operation::Status).await?;
        let Some(session) = guard.as_ref() else { return Err(no_state(Operation::Status)) };
        let (ty, arg) = empty();
        call(&session.plugin, Operation::Status, method, &ty, &arg, self.timeout(READ_TIMEOUT)).await
    }

    async fn read_string(&self, method: &str) -> Result<String, DriverError> {
        match self.read(method).await? {
            Value::String(s) => Ok(s),
            other => Err(DriverError::transient(format!("{method} answered {other:?}, not a string"))),
        }
    }
}

/// GetCreateFlags (`GetFlags` in rancher/machine's plugins).
async fn create_flags(plugin: &Plugin, timeout: Duration) -> Result<Vec<Flag>, DriverError> {
    let (ty, arg) = empty();
    let reply = match plugin.call("GetCreateFlags", &ty, &arg, timeout).await {
        Err(PluginError::Remote(m)) if m.contains("can't find method") => {
            plugin.call("GetFlags", &ty, &arg, timeout).await
        }
        other => other,
    };
    let reply = reply.map_err(|e| plugin_error(Operation::Create, e))?;
    config::flags_from_gob(&reply).map_err(DriverError::transient)
}

fn no_state(operation: Operation) -> DriverError {
    DriverError::NotFound { message: format!("{operation}: machinist holds no driver state for this Machine") }
}

/// One call, its error typed.
async fn call(
    plugin: &Plugin,
    operation: Operation,
    method: &str,
    ty: &Type,
    arg: &Value,
    timeout: Duration,
) -> Result<Value, DriverError> {
    answer(plugin, operation, method, ty, arg, timeout).await?
}

/// One call: the outer error is the plugin's failure (it died, hung or spoke wrongly:
/// nothing can be concluded), the inner one the driver's own answer.
async fn answer(
    plugin: &Plugin,
    operation: Operation,
    method: &str,
    ty: &Type,
    arg: &Value,
    timeout: Duration,
) -> Result<Result<Value, DriverError>, DriverError> {
    match plugin.call(method, ty, arg, timeout).await {
        Ok(value) => Ok(Ok(value)),
        Err(PluginError::Remote(message)) => Ok(Err(classify(operation, &format!("{method}: {message}")))),
        Err(other) => Err(plugin_error(operation, other)),
    }
}

fn plugin_error(operation: Operation, error: PluginError) -> DriverError {
    match error {
        PluginError::Remote(message) => classify(operation, &message),
        // The binary is not one machinist can drive: a spec change (another plugin)
        // or a new binary is needed.
        PluginError::Protocol(message) => DriverError::invalid_config(format!("{}.name", config::FIELD), message),
        PluginError::Failed(message) => DriverError::transient(message),
    }
}

/// Types a driver's error string where it is recognisable; anything else is transient.
pub fn classify(operation: Operation, message: &str) -> DriverError {
    let lower = message.to_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| lower.contains(w));
    let message = message.to_string();
    // docker-machine's own phrasings included: "generic driver does not support stop",
    // "hosts without a driver cannot be stopped".
    let unsupported = [
        "not supported",
        "does not support",
        "not implemented",
        "unsupported",
        "cannot be stopped",
        "cannot be started",
        "cannot be restarted",
        "cannot be killed",
    ];
    // "command not found" is a failed command, not a missing instance.
    let missing = !lower.contains("command not found") && has(&["not found", "notfound", "does not exist", "no such"]);
    if has(&unsupported) {
        DriverError::NotSupported { operation, message }
    } else if has(&["rate limit", "ratelimit", "too many requests", "throttl", "requestlimitexceeded"]) {
        DriverError::RateLimited { message, retry_after: Duration::from_secs(30) }
    } else if has(&[
        "unauthorized",
        "unauthenticated",
        "authentication",
        "forbidden",
        "access denied",
        "invalid token",
        "invalid credentials",
        "permission denied",
    ]) {
        DriverError::invalid_config(CREDENTIALS_FIELD, message)
    } else if missing {
        DriverError::NotFound { message }
    } else if has(&["invalid", "is required", "must be"]) {
        DriverError::invalid_config(config::FIELD, message)
    } else {
        DriverError::transient(message)
    }
}

/// libmachine's `state.State` numbers.
fn state_of(n: i64) -> State {
    match n {
        1 => State::Running,
        2 => State::Paused,
        3 => State::Saved,
        4 => State::Stopped,
        5 => State::Stopping,
        6 => State::Starting,
        7 => State::Error,
        8 => State::Timeout,
        9 => State::NotFound,
        _ => State::None,
    }
}

/// States that say an instance exists.
fn exists(state: State) -> bool {
    matches!(state, State::Running | State::Paused | State::Saved | State::Stopped | State::Stopping | State::Starting)
}

#[async_trait]
impl Driver for DockerMachineDriver {
    fn name(&self) -> &'static str {
        "dockerMachine"
    }

    fn offers_ssh(&self) -> bool {
        self.config.offers_ssh()
    }

    /// No instance before anything was saved (the flags are checked then, so a bad spec
    /// is found before Create). With the state saved before an interrupted Create, the
    /// plugin's GetState decides: an instance it reports is adopted.
    async fn find(&self) -> Result<Option<Instance>, DriverError> {
        let mut guard = self.restored(Operation::Status).await?;
        let Some(session) = guard.as_mut() else {
            let flags = self.plugins.flags(&self.config.name).await?;
            self.values(&flags, &self.planned_files())?;
            return Ok(None);
        };
        let phase = session.saved.as_ref().map_or(Phase::Created, |s| s.phase);
        let (ty, arg) = empty();
        let answer =
            answer(&session.plugin, Operation::Status, "GetState", &ty, &arg, self.timeout(READ_TIMEOUT)).await?;
        let state = match (phase, answer) {
            (_, Ok(v)) => state_of(v.as_i64().unwrap_or(0)),
            // Created: it is ours, whatever the plugin says now.
            (Phase::Created, Err(error)) | (Phase::Creating, Err(error @ DriverError::RateLimited { .. })) => {
                return Err(error);
            }
            // The driver answered that it cannot find such an instance (or cannot look
            // one up from a config saved before Create): nothing to adopt.
            (Phase::Creating, Err(_)) => State::NotFound,
        };
        if phase == Phase::Creating && !exists(state) {
            return Ok(None);
        }
        if phase == Phase::Creating {
            // Adopted: what the plugin knows now is the instance's.
            self.persist(session, Phase::Created, Operation::Status).await?;
        }
        Ok(Some(Instance { id: self.machine_name.clone(), state }))
    }

    async fn create(&self, _request: &CreateRequest) -> Result<String, DriverError> {
        // What a failed Create left (its state was saved before it): removed first, so
        // that nothing is left behind and the new Create starts clean.
        let left = self.restored(Operation::Create).await?.is_some();
        if left {
            self.remove_saved(Operation::Create, false).await.map_err(|e| match e {
                DriverError::Transient { message, retry_after } => DriverError::Transient {
                    message: format!("removing what the previous Create left: {message}"),
                    retry_after,
                },
                other => other,
            })?;
        }
        let mut guard = self.session.lock().await;
        if let Some(old) = guard.take() {
            old.plugin.close().await;
        }
        let dir = SessionDir::new(&self.plugins.inner.work_dir, &self.machine_name)?;
        let store = dir.path().to_path_buf();
        // docker-machine makes the machine's directory before Create; drivers write
        // their key there.
        std::fs::create_dir_all(store.join("machines").join(&self.machine_name))
            .map_err(|e| DriverError::transient(format!("cannot make the machine directory: {e}")))?;
        let plugin = self.start_plugin(&store, Operation::Create).await?;
        let op = Operation::Create;
        let base = serde_json::json!({"MachineName": self.machine_name, "StorePath": store.to_string_lossy()});
        call(
            &plugin,
            op,
            "SetConfigRaw",
            &Type::Bytes,
            &Value::Bytes(base.to_string().into_bytes()),
            self.timeout(READ_TIMEOUT),
        )
        .await?;
        let (ty, arg) = empty();
        let flags = create_flags(&plugin, self.timeout(READ_TIMEOUT)).await?;
        let files = self.write_files(&store)?;
        let values = self.values(&flags, &files)?;
        let (flags_ty, flags_arg) = config::rpc_flags(&values);
        call(&plugin, op, "SetConfigFromFlags", &flags_ty, &flags_arg, self.timeout(READ_TIMEOUT)).await?;
        call(&plugin, op, "PreCreateCheck", &ty, &arg, self.timeout(CREATE_TIMEOUT)).await?;
        let session = guard.insert(Session { plugin, dir, saved: None });
        // Saved before Create: a crash during it leaves enough to find the instance.
        self.persist(session, Phase::Creating, op).await?;
        // While Create runs, what the plugin knows (its instance id, once launched) and
        // what it writes to the store directory (its SSH key) are saved as they appear:
        // a crash of the plugin or of machinist loses nothing that finding and adopting
        // the instance would need.
        let mut saved = session.saved.clone().expect("saved before Create");
        let result = {
            let create = answer(&session.plugin, op, "Create", &ty, &arg, self.timeout(CREATE_TIMEOUT));
            tokio::pin!(create);
            loop {
                tokio::select! {
                    result = &mut create => break result,
                    () = tokio::time::sleep(STORE_SAVE_INTERVAL) => {
                        self.save_progress(Some(&session.plugin), session.dir.path(), &mut saved).await;
                    }
                }
            }
        };
        session.saved = Some(saved);
        match result {
            Ok(Ok(_)) => {}
            // The driver answered: keep what it knows now (ids of half-made resources),
            // for the clean-up.
            Ok(Err(error)) => {
                let _ = self.persist(session, Phase::Creating, op).await;
                return Err(error);
            }
            // The plugin died or hung: its config is lost, its files are not.
            Err(error) => {
                let mut saved = session.saved.clone().expect("saved before Create");
                self.save_progress(None, session.dir.path(), &mut saved).await;
                return Err(error);
            }
        }
        self.persist(session, Phase::Created, op).await?;
        Ok(self.machine_name.clone())
    }

    async fn remove(&self, _id: &str) -> Result<Removal, DriverError> {
        self.remove_saved(Operation::Remove, true).await
    }

    async fn remove_leftovers(&self) -> Result<Removal, DriverError> {
        self.remove_saved(Operation::Remove, true).await
    }

    async fn start(&self, _id: &str) -> Result<(), DriverError> {
        self.change(Operation::Start, "Start").await
    }

    async fn stop(&self, _id: &str) -> Result<(), DriverError> {
        self.change(Operation::Stop, "Stop").await
    }

    async fn kill(&self, _id: &str) -> Result<(), DriverError> {
        self.change(Operation::Kill, "Kill").await
    }

    async fn restart(&self, _id: &str) -> Result<(), DriverError> {
        self.change(Operation::Restart, "Restart").await
    }

    async fn status(&self, _id: &str) -> Result<State, DriverError> {
        let guard = self.restored(Operation::Status).await?;
        // Nothing saved: never created, or removed.
        let Some(session) = guard.as_ref() else { return Ok(State::NotFound) };
        let (ty, arg) = empty();
        match call(&session.plugin, Operation::Status, "GetState", &ty, &arg, self.timeout(READ_TIMEOUT)).await {
            Ok(v) => Ok(state_of(v.as_i64().unwrap_or(0))),
            Err(DriverError::NotFound { .. }) => Ok(State::NotFound),
            Err(e) => Err(e),
        }
    }

    async fn addresses(&self, _id: &str) -> Result<Vec<Address>, DriverError> {
        let ip = self.read_string("GetIP").await?;
        if ip.is_empty() {
            return Ok(Vec::new());
        }
        let kind = if ip.parse::<std::net::IpAddr>().is_ok() { AddressType::ExternalIP } else { AddressType::Hostname };
        Ok(vec![Address { kind, address: ip }])
    }

    async fn ssh_endpoint(&self, _id: &str) -> Result<Option<SshEndpoint>, DriverError> {
        if !self.offers_ssh() {
            return Ok(None);
        }
        let host = self.read_string("GetSSHHostname").await?;
        if host.is_empty() {
            // Not up yet, or a plugin without SSH (docker-machine's `none` answers "").
            return Ok(None);
        }
        let port = self.read("GetSSHPort").await?.as_i64().unwrap_or(22);
        let user = self.read_string("GetSSHUsername").await?;
        let port = u16::try_from(port).map_err(|_| DriverError::transient(format!("GetSSHPort answered {port}")))?;
        Ok(Some(SshEndpoint { host, port, user }))
    }

    fn makes_own_ssh_key(&self) -> bool {
        self.offers_ssh()
    }

    /// The key GetSSHKeyPath names, inside the restored store directory.
    async fn own_ssh_key(&self, _id: &str) -> Result<Option<Zeroizing<Vec<u8>>>, DriverError> {
        if !self.offers_ssh() {
            return Ok(None);
        }
        let path = self.read_string("GetSSHKeyPath").await?;
        if path.is_empty() {
            return Ok(None);
        }
        let guard = self.session.lock().await;
        let Some(session) = guard.as_ref() else { return Ok(None) };
        let path = Path::new(&path);
        if !path.starts_with(session.dir.path()) {
            return Err(DriverError::transient(format!(
                "GetSSHKeyPath names {}, outside the driver's store directory",
                path.display()
            )));
        }
        match std::fs::read(path) {
            Ok(key) => Ok(Some(Zeroizing::new(key))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DriverError::transient(format!("reading the driver's SSH key: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_error_strings_are_typed_where_they_are_recognisable() {
        let op = Operation::Stop;
        for (message, reason) in [
            ("generic driver does not support stop", "NotSupported"),
            ("hosts without a driver cannot be stopped", "NotSupported"),
            ("Error: 429 Too Many Requests", "RateLimited"),
            ("RequestLimitExceeded: Request limit exceeded.", "RateLimited"),
            ("server 123 not found", "NotFound"),
            ("InvalidInstanceID.NotFound: The instance ID 'i-1' does not exist", "NotFound"),
            ("401 Unauthorized: the token was rejected", "InvalidConfig"),
            ("invalid server type cx9", "InvalidConfig"),
            ("bash: line 1: sudo: command not found", "TransientError"),
            ("connection reset by peer", "TransientError"),
        ] {
            assert_eq!(classify(op, message).reason(), reason, "{message}");
        }
        assert!(classify(op, "401 Unauthorized").is_retryable(), "credentials are fixed in their Secret");
        assert!(!classify(op, "invalid server type").is_retryable());
    }

    #[test]
    fn machine_names_are_unique_dns_labels() {
        let m = |name: &str, uid: &str| MachineRef { name: name.into(), uid: uid.into(), ..Default::default() };
        assert_eq!(machine_name(&m("web.1", "0f3c5a1e-7d2b")), "web-1-0f3c5a1e");
        let long = machine_name(&m(&"a".repeat(200), "0f3c5a1e-7d2b"));
        assert!(long.len() <= 63, "{long}");
        assert_ne!(machine_name(&m("web", "0f3c5a1e")), machine_name(&m("web", "1f3c5a1e")));
    }
}
