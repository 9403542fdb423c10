//! Driver state (a Docker Machine plugin's config and store directory) in a Secret owned
//! by the Machine: `<machine>-driver-state`, key `state`. Guarded like every Secret a
//! Machine uses, so a namespace deletion cannot take it before Remove has used it;
//! emptied and released after Remove (or when the Machine is let go), then
//! garbage-collected with the Machine. No delete permission is needed.

use std::collections::BTreeMap;

use async_trait::async_trait;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use machinist_drivers::{DriverError, StateStore};

use crate::api::{FIELD_MANAGER, Machine, SECRET_FINALIZER, SECRET_GUARDED_LABEL, machine_labels};

/// The Secret's type, so that `kubectl get secrets` says what it is.
pub const SECRET_TYPE: &str = "machinist.dev/driver-state";
const KEY: &str = "state";

pub struct SecretStateStore {
    secrets: Api<Secret>,
    name: String,
    template: Secret,
}

impl SecretStateStore {
    pub fn new(client: kube::Client, machine: &Machine) -> Self {
        let ns = machine.namespace().unwrap_or_default();
        let name = machine.driver_state_secret_name();
        let mut labels = machine_labels(&machine.name_any());
        labels.insert(SECRET_GUARDED_LABEL.to_string(), "true".to_string());
        let template = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(labels),
                owner_references: Some(vec![super::ssh::owner_reference(machine)]),
                finalizers: Some(vec![SECRET_FINALIZER.to_string()]),
                ..Default::default()
            },
            type_: Some(SECRET_TYPE.to_string()),
            ..Default::default()
        };
        SecretStateStore { secrets: Api::namespaced(client, &ns), name, template }
    }

    fn failed(&self, doing: &str, e: kube::Error) -> DriverError {
        DriverError::transient(format!("{doing} the driver state Secret {}: {e}", self.name))
    }
}

#[async_trait]
impl StateStore for SecretStateStore {
    /// Always from the API, never a cache: a stale state would restore an old config.
    async fn load(&self) -> Result<Option<Vec<u8>>, DriverError> {
        match self.secrets.get_opt(&self.name).await.map_err(|e| self.failed("reading", e))? {
            None => Ok(None),
            Some(secret) => Ok(secret.data.and_then(|mut d| d.remove(KEY)).map(|b| b.0)),
        }
    }

    async fn save(&self, state: &[u8]) -> Result<(), DriverError> {
        let mut secret = self.template.clone();
        secret.data = Some(BTreeMap::from([(KEY.to_string(), ByteString(state.to_vec()))]));
        let params = PostParams { field_manager: Some(FIELD_MANAGER.to_string()), ..Default::default() };
        match self.secrets.create(&params, &secret).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Guarded again too, should a clear have released it.
                let patch = serde_json::json!({
                    "metadata": { "finalizers": [SECRET_FINALIZER] },
                    "data": { KEY: ByteString(state.to_vec()) },
                });
                self.secrets
                    .patch(
                        &self.name,
                        &PatchParams { field_manager: Some(FIELD_MANAGER.to_string()), ..Default::default() },
                        &Patch::Merge(patch),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| self.failed("writing", e))
            }
            Err(e) => Err(self.failed("creating", e)),
        }
    }

    /// Empties the Secret and lets it go: its data (which can hold credentials) and its
    /// finalizer are removed, and garbage collection deletes it with the Machine.
    async fn clear(&self) -> Result<(), DriverError> {
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.to_string()), ..Default::default() };
        let empty = serde_json::json!({ "data": null, "metadata": { "finalizers": null } });
        match self.secrets.patch(&self.name, &params, &Patch::Merge(empty)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(self.failed("releasing", e)),
        }
    }
}
