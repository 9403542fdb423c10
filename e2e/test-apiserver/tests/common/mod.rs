//! A minimal raw HTTP client for the tests (exact status codes and bodies,
//! watch streams as lists of events).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

/// The recorded traces were made with Python's urllib; a write without
/// `fieldManager` is managed by the User-Agent's first word, "Python-urllib".
pub const USER_AGENT: &str = "Python-urllib/3.12";

pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Value,
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    accept: Option<&str>,
    body: Option<Vec<u8>>,
) -> hyper::Response<hyper::body::Incoming> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header("Host", addr.to_string())
        .header("User-Agent", USER_AGENT);
    if let Some(ct) = content_type {
        b = b.header("Content-Type", ct);
    }
    if let Some(a) = accept {
        b = b.header("Accept", a);
    }
    let req = b.body(Full::new(Bytes::from(body.unwrap_or_default()))).expect("request");
    sender.send_request(req).await.expect("send")
}

/// One request/response, with a 10 s limit.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Option<Vec<u8>>,
) -> Resp {
    request_accept(addr, method, path, content_type, None, body).await
}

pub async fn request_accept(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    accept: Option<&str>,
    body: Option<Vec<u8>>,
) -> Resp {
    tokio::time::timeout(Duration::from_secs(10), async {
        let resp = send(addr, method, path, content_type, accept, body).await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Resp { status, headers, body }
    })
    .await
    .unwrap_or_else(|_| panic!("{method} {path} timed out"))
}

pub async fn json(addr: SocketAddr, method: &str, path: &str, body: &Value) -> Resp {
    request(addr, method, path, Some("application/json"), Some(serde_json::to_vec(body).unwrap())).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, None, None).await
}

pub async fn patch(addr: SocketAddr, path: &str, ct: &str, body: &Value) -> Resp {
    request(addr, "PATCH", path, Some(ct), Some(serde_json::to_vec(body).unwrap())).await
}

/// A watch: the HTTP status and every event line until the server closes
/// the stream or `limit` passes. `on_start` runs once the headers arrived.
pub async fn watch<F, Fut>(addr: SocketAddr, path: &str, limit: Duration, on_start: F) -> (u16, Vec<Value>)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    watch_accept(addr, path, None, limit, on_start).await
}

pub async fn watch_accept<F, Fut>(
    addr: SocketAddr,
    path: &str,
    accept: Option<&str>,
    limit: Duration,
    on_start: F,
) -> (u16, Vec<Value>)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let resp = tokio::time::timeout(Duration::from_secs(10), send(addr, "GET", path, None, accept, None))
        .await
        .expect("watch headers");
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        while let Ok(Some(Ok(f))) = tokio::time::timeout_at(deadline, body.frame()).await {
            if let Ok(d) = f.into_data() {
                buf.extend_from_slice(&d);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                        events.push(v);
                    }
                }
            }
        }
        events
    });
    on_start().await;
    (status, reader.await.expect("reader"))
}

/// A CRD like machinist's Machine: status subresource, printer columns,
/// defaults, an enum, a minimum, CEL rules incl. a transition rule.
pub fn gadget_crd() -> Value {
    serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "gadgets.test.machinist.dev"},
        "spec": {
            "group": "test.machinist.dev",
            "names": {"kind": "Gadget", "plural": "gadgets", "singular": "gadget",
                      "shortNames": ["gd"], "categories": ["machinist"]},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1alpha1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "State", "type": "string", "jsonPath": ".status.state"},
                    {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {
                            "type": "object", "required": ["driver"],
                            "properties": {
                                "driver": {
                                    "type": "object",
                                    "properties": {
                                        "fake": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                                        "generic": {"type": "object", "properties": {"address": {"type": "string", "minLength": 1}}}
                                    },
                                    "x-kubernetes-validations": [{"rule": "[has(self.fake), has(self.generic)].filter(x, x).size() == 1", "message": "exactly one driver must be set"}]
                                },
                                "powerState": {"type": "string", "enum": ["Running", "Stopped"], "default": "Running"},
                                "stopTimeoutSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
                                "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "pattern": "^[a-z]+$"}}
                            },
                            "x-kubernetes-validations": [{"rule": "!has(oldSelf.driver) || has(self.driver.fake) == has(oldSelf.driver.fake)", "message": "the driver kind cannot be changed"}]
                        },
                        "status": {
                            "type": "object",
                            "properties": {
                                "state": {"type": "string"},
                                "providerID": {"type": "string"},
                                "observedGeneration": {"type": "integer"},
                                "conditions": {
                                    "type": "array",
                                    "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"],
                                    "items": {"type": "object", "required": ["type", "status"], "properties": {
                                        "type": {"type": "string"}, "status": {"type": "string"},
                                        "reason": {"type": "string"}, "message": {"type": "string"},
                                        "lastTransitionTime": {"type": "string", "format": "date-time"},
                                        "observedGeneration": {"type": "integer"}}}
                                }
                            }
                        }
                    }
                }}
            }]
        }
    })
}

pub const GADGETS_V: &str = "/apis/test.machinist.dev/v1alpha1";

/// Install the Gadget CRD and create namespace `ns`.
pub async fn setup(addr: SocketAddr, ns: &str) {
    let r = json(addr, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", &gadget_crd()).await;
    assert_eq!(r.status, 201, "{}", r.body);
    if ns != "default" {
        let r = json(addr, "POST", "/api/v1/namespaces", &serde_json::json!({"metadata": {"name": ns}})).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
}

pub fn gadget(name: &str) -> Value {
    serde_json::json!({"apiVersion": "test.machinist.dev/v1alpha1", "kind": "Gadget",
        "metadata": {"name": name}, "spec": {"driver": {"fake": {}}}})
}
