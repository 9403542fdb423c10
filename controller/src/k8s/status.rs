use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::api::{FIELD_MANAGER, Machine, MachineStatus};

/// The statuses machinist wrote that the watch cache may not show yet.
///
/// Only machinist writes a Machine's status, so the last status it wrote is the truth.
/// A reconcile woken by one of its own writes can see an object from before a later
/// write; deciding from that would repeat a step (a second Stop, a second restart).
/// An entry goes as soon as the cache shows its write, or after [`REMEMBER`] (the cache
/// lags by milliseconds), so this stays small at any number of Machines.
#[derive(Default)]
pub struct WrittenStatuses(Mutex<Written>);

#[derive(Default)]
struct Written {
    by_uid: HashMap<String, (String, MachineStatus, Instant)>,
    swept: Option<Instant>,
}

/// Far longer than the watch cache lags behind a write, even under load; short enough
/// that the remembered statuses stay a few megabytes at hundreds of writes a second.
const REMEMBER: Duration = Duration::from_secs(5);

impl WrittenStatuses {
    /// The Machine with the last status machinist wrote for it.
    pub fn latest(&self, mut machine: Machine) -> Machine {
        let uid = machine.uid().unwrap_or_default();
        let mut written = self.0.lock().expect("not poisoned");
        if let Some((version, status, _)) = written.by_uid.get(&uid) {
            if machine.resource_version().as_deref() == Some(version.as_str())
                || machine.status.as_ref() == Some(status)
            {
                written.by_uid.remove(&uid);
            } else {
                machine.status = Some(status.clone());
            }
        }
        machine
    }

    fn record(&self, uid: String, version: String, status: MachineStatus) {
        let now = Instant::now();
        let mut written = self.0.lock().expect("not poisoned");
        if written.swept.is_none_or(|t| now.duration_since(t) > Duration::from_secs(1)) {
            written.by_uid.retain(|_, (_, _, at)| now.duration_since(*at) < REMEMBER);
            written.swept = Some(now);
        }
        written.by_uid.insert(uid, (version, status, now));
    }

    pub fn forget(&self, machine: &Machine) {
        self.0.lock().expect("not poisoned").by_uid.remove(&machine.uid().unwrap_or_default());
    }

    /// How many statuses are remembered now.
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
            written.record(
                machine.uid().unwrap_or_default(),
                updated.resource_version().unwrap_or_default(),
                new.clone(),
            );
            Ok(true)
        }
        // Deleted meanwhile: nothing to report on.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}
