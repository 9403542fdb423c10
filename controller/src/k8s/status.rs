use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::api::{FIELD_MANAGER, Machine, MachineStatus};

/// Writes `new` to the status subresource with server-side apply under machinist's field
/// manager, but only when it differs from `old`: a converged Machine costs no writes.
/// Returns whether a write was made.
pub async fn patch_status(
    api: &Api<Machine>,
    name: &str,
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
    match api.patch_status(name, &params, &Patch::Apply(&patch)).await {
        Ok(_) => Ok(true),
        // Deleted meanwhile: nothing to report on.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}
