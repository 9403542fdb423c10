//! The Machine's finalizer `machinist.dev/machine`: on the object before the first driver
//! call, off once deletion is done. JSON patches with a `test` first, so a stale cached
//! copy never overwrites another controller's finalizer, and under machinist's field
//! manager like every other write.

use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::machine::Error;
use super::status::WrittenStatuses;
use crate::api::{FIELD_MANAGER, FINALIZER, Machine};

fn params() -> PatchParams {
    PatchParams { field_manager: Some(FIELD_MANAGER.to_string()), ..Default::default() }
}

fn patch(operations: serde_json::Value) -> Patch<()> {
    Patch::Json(serde_json::from_value(operations).expect("a valid JSON patch"))
}

/// Adds the finalizer, on the condition that the list is still what the cached copy shows.
/// A 404 (gone meanwhile) or 422 (the list changed: the `test` failed) is no error: the
/// watch event for that change brings a fresh reconcile.
/// The write is remembered, so a reconcile woken before the watch shows it (a Secret
/// change, say) waits for it rather than adding the finalizer again.
pub async fn add(api: &Api<Machine>, machine: &Machine, written: &WrittenStatuses) -> Result<(), Error> {
    let current = machine.finalizers();
    let operations = if current.is_empty() {
        json!([
            { "op": "test", "path": "/metadata/finalizers", "value": null },
            { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] },
        ])
    } else {
        json!([
            { "op": "test", "path": "/metadata/finalizers", "value": current },
            { "op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER },
        ])
    };
    match super::wire::answers_of(api, machine).patch(&machine.name_any(), &params(), &patch(operations)).await {
        Ok(patched) => {
            if let (Some(uid), Some(version)) = (patched.uid(), patched.resource_version()) {
                written.record(uid, version);
            }
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 422 => Ok(()),
        Err(e) => Err(Error::Finalizer(e)),
    }
}

/// Removes the finalizer at the index the cached copy shows it, testing that it is still
/// there (never someone else's), and says whether the Machine is let go. Gone already
/// (404) is; a changed list (422) is not yet, and brings a fresh reconcile through the
/// watch.
pub async fn remove(api: &Api<Machine>, machine: &Machine) -> Result<bool, Error> {
    let Some(index) = machine.finalizers().iter().position(|f| f == FINALIZER) else { return Ok(true) };
    let path = format!("/metadata/finalizers/{index}");
    let operations = json!([
        { "op": "test", "path": path, "value": FINALIZER },
        { "op": "remove", "path": path },
    ]);
    match super::wire::answers_of(api, machine).patch(&machine.name_any(), &params(), &patch(operations)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 422 => Ok(false),
        Err(e) => Err(Error::Finalizer(e)),
    }
}
