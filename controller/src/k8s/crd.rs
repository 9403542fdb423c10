use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::wait::{Condition, await_condition, conditions};
use kube::{Api, Client};

const CRD_NAME: &str = "machines.machinist.dev";

#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error(
        "the Machine CRD ({CRD_NAME}) is not installed in this cluster: install it with `machinist crd | kubectl apply -f -` (or `kubectl apply -f crds/`), then start machinist again"
    )]
    NotInstalled,
    #[error(
        "the Machine CRD ({CRD_NAME}) did not become Established within {0:?}: check `kubectl describe crd {CRD_NAME}`"
    )]
    NotEstablished(Duration),
    #[error("cannot read the Machine CRD ({CRD_NAME}): {0}")]
    Api(#[from] kube::Error),
}

/// Waits until the Machine CRD is installed and Established, so the controller never
/// starts watching a resource the server does not serve. Where reading CRDs is
/// forbidden (a namespace-scoped install has no cluster-wide permission), asking for the
/// Machines of the watched namespace tells whether the resource is served.
pub async fn wait_for_crd(client: Client, namespace: Option<&str>, timeout: Duration) -> Result<(), CrdError> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let found = match crds.get_opt(CRD_NAME).await {
        Err(kube::Error::Api(e)) if e.code == 403 => return probe_machines(client, namespace).await,
        other => other?,
    };
    match found {
        None => return Err(CrdError::NotInstalled),
        Some(crd) if conditions::is_crd_established().matches_object(Some(&crd)) => return Ok(()),
        Some(_) => {}
    }
    let established = await_condition(crds, CRD_NAME, conditions::is_crd_established());
    match tokio::time::timeout(timeout, established).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(CrdError::Api(kube::Error::Service(Box::new(e)))),
        Err(_) => Err(CrdError::NotEstablished(timeout)),
    }
}

async fn probe_machines(client: Client, namespace: Option<&str>) -> Result<(), CrdError> {
    let machines: Api<crate::api::Machine> = super::namespaced_or_all(&client, namespace);
    match machines.list(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Err(CrdError::NotInstalled),
        Err(e) => Err(CrdError::Api(e)),
    }
}
