use std::collections::HashMap;
use std::sync::Mutex;

use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::api::{FIELD_MANAGER, Machine, MachineStatus};

/// The statuses machinist wrote that the watch cache may not show yet.
///
/// Only machinist writes a Machine's status, so the last status it wrote is the truth.
/// A reconcile woken by one of its own writes can see an object from before a later
/// write; deciding from that would repeat a step (a second Stop, a second restart).
/// Entries go as soon as the cache catches up, so this stays small.
#[derive(Default)]
pub struct WrittenStatuses(Mutex<HashMap<String, (String, MachineStatus)>>);

impl WrittenStatuses {
    /// The Machine with the last status machinist wrote for it.
    pub fn latest(&self, mut machine: Machine) -> Machine {
        let uid = machine.uid().unwrap_or_default();
        let mut written = self.0.lock().expect("not poisoned");
        if let Some((version, status)) = written.get(&uid) {
            if machine.resource_version().as_deref() == Some(version.as_str())
                || machine.status.as_ref() == Some(status)
            {
                written.remove(&uid);
            } else {
                machine.status = Some(status.clone());
            }
        }
        machine
    }

    fn record(&self, uid: String, version: String, status: MachineStatus) {
        self.0.lock().expect("not poisoned").insert(uid, (version, status));
    }

    pub fn forget(&self, machine: &Machine) {
        self.0.lock().expect("not poisoned").remove(&machine.uid().unwrap_or_default());
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
