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
#[derive(Default)]
pub struct WrittenStatuses(Mutex<Written>);

#[derive(Default)]
struct Written {
    by_uid: HashMap<String, (String, Instant)>,
    swept: Option<Instant>,
}

/// Far longer than the watch cache lags behind a write, even under heavy load (entries
/// usually go within milliseconds, when the watch delivers the write).
const REMEMBER: Duration = Duration::from_secs(30);

impl WrittenStatuses {
    /// Whether the cached Machine already shows machinist's last status write.
    pub fn is_current(&self, machine: &Machine) -> bool {
        let uid = machine.uid().unwrap_or_default();
        let mut written = self.0.lock().expect("not poisoned");
        let Some((version, at)) = written.by_uid.get(&uid) else { return true };
        let cached = machine.resource_version().unwrap_or_default();
        // resourceVersions are opaque, but etcd's are integers that only grow: compare
        // them as such when both parse, else only recognise our own write.
        let caught_up = match (cached.parse::<u64>(), version.parse::<u64>()) {
            (Ok(c), Ok(v)) => c >= v,
            _ => cached == *version,
        };
        if caught_up || at.elapsed() > REMEMBER {
            written.by_uid.remove(&uid);
            return true;
        }
        false
    }

    pub(super) fn record(&self, uid: String, version: String) {
        let now = Instant::now();
        let mut written = self.0.lock().expect("not poisoned");
        if written.swept.is_none_or(|t| now.duration_since(t) > Duration::from_secs(1)) {
            written.by_uid.retain(|_, (_, at)| now.duration_since(*at) < REMEMBER);
            written.swept = Some(now);
        }
        written.by_uid.insert(uid, (version, now));
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
    match api.patch_status(&machine.name_any(), &params, &Patch::Apply(&patch)).await {
        Ok(updated) => {
            written.record(machine.uid().unwrap_or_default(), updated.resource_version().unwrap_or_default());
            Ok(true)
        }
        // Deleted meanwhile: nothing to report on.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}
