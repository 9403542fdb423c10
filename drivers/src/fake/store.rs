//! Fake instances as files, so they survive a controller restart and tests can look at
//! and change them out of band.
//!
//! Layout: `<dir>/<machine-uid>/<instance-id>.json`, one directory per Machine UID (the
//! "tag"), so looking an instance up by UID reads one small directory; and
//! `<dir>/<machine-uid>/failures.json` for the failure-injection counters. Every write is
//! atomic (write a temporary file, then rename).
//!
//! With a call journal ([`FakeStore::with_call_journal`]), `<dir>/calls.jsonl` gets one
//! [`FakeCall`] line per driver call, for tests that assert on who called what and when.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::{DriverError, State};

const FAILURES_FILE: &str = "failures.json";
const CALLS_FILE: &str = "calls.jsonl";

/// One driver call as the call journal recorded it when the call ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FakeCall {
    /// Who made the call (see [`FakeStore::with_call_journal`]).
    pub caller: String,
    pub machine_uid: String,
    /// The `Driver` method: `find`, `create`, `remove`, `status`, `ssh_endpoint`, ...
    pub operation: String,
    pub started: Timestamp,
    pub ended: Timestamp,
    /// `false` when the call's future was dropped before it returned.
    pub completed: bool,
}

/// A fake instance as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceRecord {
    pub id: String,
    pub machine_uid: String,
    pub machine_name: String,
    pub namespace: String,
    pub instance_type: String,
    pub created_at: Timestamp,
    /// The state now, unless `transition` has completed.
    pub state: State,
    /// A state change under way: `to` is reached at `at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transition: Option<Transition>,
    pub address: String,
    #[serde(default)]
    pub authorized_keys: Vec<String>,
    /// When the provider last accepted a power change (start, stop, kill, restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_changed_at: Option<Timestamp>,
    /// How many times each operation changed this instance, for tests to assert on.
    #[serde(default)]
    pub calls: BTreeMap<String, u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub to: State,
    pub at: Timestamp,
}

impl InstanceRecord {
    /// The state as seen at `now`.
    pub fn state_at(&self, now: Timestamp) -> State {
        match self.transition {
            Some(t) if now >= t.at => t.to,
            _ => self.state,
        }
    }

    /// Begins a change to `to` that completes after `latency`; `via` is the state shown
    /// meanwhile.
    pub fn begin(&mut self, now: Timestamp, via: State, to: State, latency: std::time::Duration) {
        let at = now + SignedDuration::try_from(latency).unwrap_or(SignedDuration::ZERO);
        if latency.is_zero() {
            self.state = to;
            self.transition = None;
        } else {
            self.state = via;
            self.transition = Some(Transition { to, at });
        }
    }

    /// Settles a finished transition, and leaves the state exactly as `state_at(now)`.
    pub fn settle(&mut self, now: Timestamp) {
        self.state = self.state_at(now);
        if self.transition.is_some_and(|t| now >= t.at) {
            self.transition = None;
        }
    }

    pub fn count(&mut self, operation: &str) {
        *self.calls.entry(operation.to_string()).or_default() += 1;
    }

    pub fn calls(&self, operation: &str) -> u32 {
        self.calls.get(operation).copied().unwrap_or(0)
    }
}

/// The directory of fake instances. Cheap to clone.
#[derive(Clone, Debug)]
pub struct FakeStore {
    dir: PathBuf,
    /// The caller named in the call journal; `None` journals nothing.
    caller: Option<Arc<str>>,
}

impl FakeStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FakeStore { dir: dir.into(), caller: None }
    }

    /// Journals every driver call made through this store to `<dir>/calls.jsonl`, as
    /// made by `caller` (tests tell apart two controllers sharing one directory).
    pub fn with_call_journal(mut self, caller: impl Into<String>) -> Self {
        self.caller = Some(caller.into().into());
        self
    }

    /// Every call journaled in this directory, by any caller, in the order they ended.
    /// Panics on an unreadable or corrupt journal: this is for tests.
    pub fn call_journal(&self) -> Vec<FakeCall> {
        let path = self.dir.join(CALLS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("reading {}: {e}", path.display()),
        };
        // Only whole lines: a line being appended right now may be read in part.
        let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        whole
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: {e}: {line}", path.display())))
            .collect()
    }

    /// A guard that journals one call when dropped; inert (and free) without a caller.
    pub(crate) fn journal_call(&self, machine_uid: &str, operation: &'static str) -> JournaledCall<'_> {
        JournaledCall {
            open: self.caller.as_ref().map(|caller| OpenCall {
                store: self,
                caller,
                machine_uid: machine_uid.to_string(),
                operation,
                started: Timestamp::now(),
            }),
            completed: false,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn machine_dir(&self, machine_uid: &str) -> Result<PathBuf, DriverError> {
        // UIDs come from the API server; refuse anything that could leave the directory.
        if machine_uid.is_empty() || !machine_uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(DriverError::invalid_config(
                "metadata.uid",
                format!("{machine_uid:?} is not a valid UID for the fake store"),
            ));
        }
        Ok(self.dir.join(machine_uid))
    }

    fn instance_path(&self, machine_uid: &str, id: &str) -> Result<PathBuf, DriverError> {
        if !id.starts_with("fake-") || !id[5..].chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(DriverError::NotFound { message: format!("no fake instance {id:?}") });
        }
        Ok(self.machine_dir(machine_uid)?.join(format!("{id}.json")))
    }

    /// Every instance tagged with this Machine UID, oldest first.
    pub fn instances_of(&self, machine_uid: &str) -> Result<Vec<InstanceRecord>, DriverError> {
        let dir = self.machine_dir(machine_uid)?;
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error("reading", &dir, e)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| io_error("reading", &dir, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with("fake-")
                && name.ends_with(".json")
                && let Some(record) = read_json::<InstanceRecord>(&path)?
            {
                found.push(record);
            }
        }
        found.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(found)
    }

    pub fn get(&self, machine_uid: &str, id: &str) -> Result<Option<InstanceRecord>, DriverError> {
        read_json(&self.instance_path(machine_uid, id)?)
    }

    pub fn put(&self, record: &InstanceRecord) -> Result<(), DriverError> {
        let path = self.instance_path(&record.machine_uid, &record.id)?;
        write_json(&path, record)
    }

    /// Deletes an instance; `false` when it was not there.
    pub fn delete(&self, machine_uid: &str, id: &str) -> Result<bool, DriverError> {
        let path = self.instance_path(machine_uid, id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error("removing", &path, e)),
        }
    }

    /// Changes an instance's state out of band, as if someone used the provider's console.
    pub fn set_state(&self, machine_uid: &str, id: &str, state: State) -> Result<(), DriverError> {
        let mut record = self
            .get(machine_uid, id)?
            .ok_or_else(|| DriverError::NotFound { message: format!("no fake instance {id}") })?;
        record.state = state;
        record.transition = None;
        self.put(&record)
    }

    /// Failure-injection counters of one Machine: rule key → calls failed so far.
    pub fn failure_counts(&self, machine_uid: &str) -> Result<BTreeMap<String, u32>, DriverError> {
        let path = self.machine_dir(machine_uid)?.join(FAILURES_FILE);
        Ok(read_json(&path)?.unwrap_or_default())
    }

    pub fn put_failure_counts(&self, machine_uid: &str, counts: &BTreeMap<String, u32>) -> Result<(), DriverError> {
        let path = self.machine_dir(machine_uid)?.join(FAILURES_FILE);
        write_json(&path, counts)
    }

    /// Drops a Machine's directory once it holds no instance (its counters go with it).
    pub fn forget_machine_if_empty(&self, machine_uid: &str) -> Result<(), DriverError> {
        if self.instances_of(machine_uid)?.is_empty() {
            let dir = self.machine_dir(machine_uid)?;
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("removing", &dir, e)),
            }
        }
        Ok(())
    }
}

/// A driver call under way; its `Drop` writes the journal line, so a call whose future
/// is dropped mid-way is journaled too (`completed: false`).
pub(crate) struct JournaledCall<'a> {
    open: Option<OpenCall<'a>>,
    completed: bool,
}

struct OpenCall<'a> {
    store: &'a FakeStore,
    caller: &'a str,
    machine_uid: String,
    operation: &'static str,
    started: Timestamp,
}

impl JournaledCall<'_> {
    /// Marks the call as returned with `value`.
    pub(crate) fn complete<T>(mut self, value: T) -> T {
        self.completed = true;
        value
    }
}

impl Drop for JournaledCall<'_> {
    fn drop(&mut self) {
        let Some(call) = self.open.take() else { return };
        let record = FakeCall {
            caller: call.caller.to_string(),
            machine_uid: call.machine_uid,
            operation: call.operation.to_string(),
            started: call.started,
            ended: Timestamp::now(),
            completed: self.completed,
        };
        let Ok(mut line) = serde_json::to_vec(&record) else { return };
        line.push(b'\n');
        // O_APPEND and one write per line: lines of concurrent writers (tasks or
        // processes) never interleave. Errors are ignored: the journal is for tests.
        let path = call.store.dir.join(CALLS_FILE);
        let _ = std::fs::create_dir_all(&call.store.dir);
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = file.write_all(&line);
        }
    }
}

fn io_error(doing: &str, path: &Path, e: io::Error) -> DriverError {
    DriverError::transient(format!("fake store: {doing} {}: {e}", path.display()))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, DriverError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| DriverError::transient(format!("fake store: {} is corrupt: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("reading", path, e)),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), DriverError> {
    let dir = path.parent().expect("store paths have a parent");
    std::fs::create_dir_all(dir).map_err(|e| io_error("creating", dir, e))?;
    let tmp = path.with_extension(format!("tmp{}", rand::random::<u32>()));
    let bytes = serde_json::to_vec_pretty(value).expect("store records serialize");
    std::fs::write(&tmp, bytes).map_err(|e| io_error("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_error("renaming", &tmp, e))
}
