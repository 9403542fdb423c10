use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::api::{FIELD_MANAGER, Machine, MachineStatus};

/// The resourceVersions of machinist's own recent writes to a Machine (its status, its
/// finalizer).
///
/// Only machinist writes a Machine's status. A reconcile woken by one of its own writes
/// can start from a cached object older than a later write; deciding from that would
/// repeat a step (a second Stop, a second restart). So a reconcile whose cached Machine
/// is older than machinist's last write waits for the watch to deliver it. Entries go
/// once the cache shows the write, or after [`REMEMBER`]; each is a few dozen bytes.
///
/// A reconcile that ends settled (nothing to do before its requeue, later than the
/// progress interval) marks its last write so: the reconcile its own echo brings, which
/// would find exactly what it wrote, returns at once, with no driver call and no API
/// request, and keeps the writer's requeue.
#[derive(Default)]
pub struct WrittenStatuses(Mutex<Written>);

#[derive(Default)]
struct Written {
    by_uid: HashMap<String, Entry>,
    swept: Option<Instant>,
}

struct Entry {
    version: String,
    at: Instant,
    settled: Option<Settled>,
}

struct Settled {
    /// When the writer asked to be reconciled again.
    requeue_at: Instant,
    /// Until when a reconcile finding exactly this write is taken for its echo.
    until: Instant,
    /// The Secret changes seen when the writer started: one since, and the Machine
    /// reconciles in full (a rotation takes effect at once).
    secret_changes: u64,
}

/// What a reconcile starts from, against machinist's last write to the Machine.
#[derive(Debug, PartialEq)]
pub enum Freshness {
    /// The cache does not show the last write yet.
    Behind,
    /// Exactly the settled last write, seen at once: its echo. Nothing to do until the
    /// writer's requeue, this long from now.
    Echo(Duration),
    /// Decide from it.
    Current,
}

/// Far longer than the watch cache lags behind a write, even under heavy load (entries
/// usually go within milliseconds, when the watch delivers the write).
const REMEMBER: Duration = Duration::from_secs(30);

impl WrittenStatuses {
    /// What the cached Machine is against machinist's last write, `secret_changes` being
    /// the Secret changes seen so far.
    pub fn freshness(&self, machine: &Machine, secret_changes: u64) -> Freshness {
        let uid = machine.uid().unwrap_or_default();
        let mut written = self.0.lock().expect("not poisoned");
        let Some(entry) = written.by_uid.get(&uid) else { return Freshness::Current };
        let cached = machine.resource_version().unwrap_or_default();
        // resourceVersions are opaque, but etcd's are integers that only grow: compare
        // them as such when both parse, else only recognise our own write.
        let caught_up = match (cached.parse::<u64>(), entry.version.parse::<u64>()) {
            (Ok(c), Ok(v)) => c >= v,
            _ => cached == entry.version,
        };
        if !caught_up && entry.at.elapsed() <= REMEMBER {
            return Freshness::Behind;
        }
        let entry = written.by_uid.remove(&uid).expect("present");
        let now = Instant::now();
        match entry.settled {
            Some(s) if cached == entry.version && s.secret_changes == secret_changes && now < s.until => {
                Freshness::Echo(s.requeue_at.saturating_duration_since(now))
            }
            _ => Freshness::Current,
        }
    }

    pub(super) fn record(&self, uid: String, version: String) {
        let now = Instant::now();
        let mut written = self.0.lock().expect("not poisoned");
        if written.swept.is_none_or(|t| now.duration_since(t) > Duration::from_secs(1)) {
            written.by_uid.retain(|_, e| now.duration_since(e.at) < REMEMBER);
            written.swept = Some(now);
        }
        written.by_uid.insert(uid, Entry { version, at: now, settled: None });
    }

    /// Marks the Machine's last write, made by the reconcile now ending, as settled: it
    /// asked to come back after `requeue`, and a reconcile finding exactly that write
    /// within `echo_window` (shorter than `requeue`) is its echo.
    pub fn settle(&self, machine: &Machine, requeue: Duration, echo_window: Duration, secret_changes: u64) {
        let now = Instant::now();
        let mut written = self.0.lock().expect("not poisoned");
        if let Some(entry) = written.by_uid.get_mut(&machine.uid().unwrap_or_default()) {
            entry.settled =
                Some(Settled { requeue_at: now + requeue, until: now + echo_window.min(requeue), secret_changes });
        }
    }

    /// Forgets every settled mark, as if their echo windows had passed.
    pub fn expire_settled(&self) {
        for entry in self.0.lock().expect("not poisoned").by_uid.values_mut() {
            entry.settled = None;
        }
    }

    pub fn forget(&self, machine: &Machine) {
        self.0.lock().expect("not poisoned").by_uid.remove(&machine.uid().unwrap_or_default());
    }

    /// How many writes are remembered now.
    pub fn len(&self) -> usize {
        self.0.lock().expect("not poisoned").by_uid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes `new` to the status subresource with server-side apply under machinist's field
/// manager, but only when it differs from `old`: a converged Machine costs no writes.
/// Returns whether a write was made.
pub async fn patch_status(
    api: &Api<Machine>,
    written: &WrittenStatuses,
    machine: &Machine,
    old: Option<&MachineStatus>,
    new: &MachineStatus,
) -> Result<bool, kube::Error> {
    if old == Some(new) || (old.is_none() && *new == MachineStatus::default()) {
        return Ok(false);
    }
    let patch = json!({
        "apiVersion": "machinist.dev/v1alpha1",
        "kind": "Machine",
        "status": new,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match super::wire::answers_of(api, machine).patch_status(&machine.name_any(), &params, &Patch::Apply(&patch)).await
    {
        Ok(updated) => {
            written.record(machine.uid().unwrap_or_default(), updated.resource_version().unwrap_or_default());
            Ok(true)
        }
        // Deleted meanwhile: nothing to report on.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}
