//! How the controller's API clients are made: a deadline on every Kubernetes API
//! request (a partitioned or overloaded API server must not hang a reconcile, the Lease
//! renewal or a shutdown for ever), and `Api`s for one namespace or all.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;

/// An `Api` for one namespace, or for all when `None`.
pub fn namespaced_or_all<K>(client: &Client, namespace: Option<&str>) -> kube::Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => kube::Api::namespaced(client.clone(), ns),
        None => kube::Api::all(client.clone()),
    }
}

/// `client`, with each request failing when its response has not begun within
/// `timeout`. Only the response's start is bounded: a watch's body streams on (the
/// watcher has its own idle timeout), and a long list is not cut off while it arrives.
pub fn with_request_timeout(client: Client, timeout: Duration) -> Client {
    let namespace = client.default_namespace().to_string();
    Client::new(TimedRequests { client, timeout }, namespace)
}

#[derive(Clone)]
struct TimedRequests {
    client: Client,
    timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("the Kubernetes API did not answer within {0:?}")]
struct NoAnswer(Duration);

impl tower_service::Service<Request<Body>> for TimedRequests {
    type Response = Response<Body>;
    type Error = kube::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, kube::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), kube::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let (client, timeout) = (self.client.clone(), self.timeout);
        Box::pin(async move {
            match tokio::time::timeout(timeout, client.send(request)).await {
                Ok(result) => result,
                Err(_) => Err(kube::Error::Service(Box::new(NoAnswer(timeout)))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::Api;
    use kube::api::ListParams;

    #[tokio::test]
    async fn a_request_with_no_answer_fails_at_its_deadline() {
        // A server that accepts the connection and then says nothing.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let config = kube::Config::new(format!("http://{address}").parse().unwrap());
        let client = with_request_timeout(Client::try_from(config).unwrap(), Duration::from_millis(200));
        let started = std::time::Instant::now();
        let error = Api::<ConfigMap>::namespaced(client, "default").list(&ListParams::default()).await.unwrap_err();
        assert!(error.to_string().contains("did not answer within 200ms"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
