//! Watch streams. Each watcher is a task with its own cursor into the shared
//! bounded history; writers only bump a `tokio::sync::watch` of the latest
//! resourceVersion, so a slow watcher never slows writers or other watchers
//! (it catches up from the history, or gets 410 Expired if it fell too far).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::http::{OutputForm, render_view};
use crate::resources::ResourceType;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{EventType, HistEvent, Store};

pub struct WatchRequest {
    pub rt: Arc<ResourceType>,
    pub version: String,
    pub ns: Option<String>,
    pub label: LabelSelector,
    pub field: FieldSelector,
    /// `None`: start with ADDED for every existing object.
    pub rv: Option<u64>,
    pub send_initial_events: bool,
    pub bookmarks: bool,
    pub timeout: Option<Duration>,
    pub form: OutputForm,
    pub bookmark_interval: Duration,
}

fn line(etype: &str, obj: &Value) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(etype.as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    serde_json::to_writer(&mut out, obj).expect("serializable");
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

struct Watcher {
    req: WatchRequest,
    tx: mpsc::Sender<Bytes>,
    first_table: bool,
}

impl Watcher {
    fn matches(&self, view: &Value) -> bool {
        self.req.label.matches(view) && self.req.field.matches(view)
    }

    async fn send(&mut self, etype: &str, view: &Value) -> bool {
        let headers = std::mem::replace(&mut self.first_table, false);
        let obj = self.req.form.wrap_event(&self.req.rt, &self.req.version, view, headers);
        self.tx.send(line(etype, &obj)).await.is_ok()
    }

    async fn bookmark(&mut self, rv: u64, initial_end: bool) -> bool {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = json!({"kind": self.req.rt.kind, "apiVersion": self.req.rt.api_version(&self.req.version),
            "metadata": meta});
        self.tx.send(line("BOOKMARK", &obj)).await.is_ok()
    }

    async fn error(&mut self, err: ApiError) {
        let _ = self.tx.send(line("ERROR", &err.status_json())).await;
    }

    /// Deliver one history event, translating selector transitions
    /// (an object entering the selection is ADDED, leaving it DELETED).
    async fn deliver(&mut self, ev: &HistEvent) -> bool {
        if let Some(ns) = &self.req.ns
            && *ns != ev.ns
        {
            return true;
        }
        let view = render_view(&self.req.rt, &self.req.version, &ev.obj);
        let now = self.matches(&view);
        let etype = match ev.etype {
            EventType::Added if now => "ADDED",
            EventType::Deleted if now => "DELETED",
            EventType::Modified => {
                let before = ev
                    .prev
                    .as_ref()
                    .map(|p| self.matches(&render_view(&self.req.rt, &self.req.version, p)))
                    .unwrap_or(false);
                match (before, now) {
                    (true, true) => "MODIFIED",
                    (false, true) => "ADDED",
                    (true, false) => "DELETED",
                    (false, false) => return true,
                }
            }
            _ => return true,
        };
        self.send(etype, &view).await
    }
}

/// Start a watch; the returned receiver yields the newline-delimited events.
pub fn start(
    store: Arc<Store>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    req: WatchRequest,
) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(run(store, shutdown, req, tx));
    rx
}

async fn run(
    store: Arc<Store>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    req: WatchRequest,
    tx: mpsc::Sender<Bytes>,
) {
    let key = req.rt.storage_key();
    let mut latest = store.subscribe();
    let deadline = req.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut w = Watcher { first_table: true, req, tx };
    // A resourceVersion from the future (e.g. a client that outlived an
    // earlier server) gets what kube gives after waiting a little: 504.
    if let Some(rv) = w.req.rv {
        let wait = tokio::time::timeout(Duration::from_secs(3), async {
            while store.lock().rv < rv {
                if latest.changed().await.is_err() {
                    break;
                }
            }
        });
        if wait.await.is_err() {
            let current = store.lock().rv;
            let err = ApiError::new(504, "Timeout", format!("Too large resource version: {rv}, current: {current}"))
                .with_details(
                    json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                    "retryAfterSeconds": 1}),
                );
            w.error(err).await;
            return;
        }
    }
    // Where the stream starts.
    let start = {
        let g = store.lock();
        let initial = w.req.rv.is_none() || w.req.send_initial_events;
        if initial {
            let ns = w.req.ns.as_deref();
            let objs = g.snapshot(&key, ns, None).unwrap_or_default();
            Ok((objs, g.rv))
        } else {
            let rv = w.req.rv.unwrap_or_default();
            let min = g.start_rv.get(&key).copied().unwrap_or(0).max(g.compacted_rv);
            if rv < min {
                Err(ApiError::expired(format!("too old resource version: {rv} ({min})")))
            } else {
                Ok((vec![], rv))
            }
        }
    };
    let mut cursor = match start {
        Err(e) => {
            w.error(e).await;
            return;
        }
        Ok((objs, rv)) => {
            for o in objs {
                let view = render_view(&w.req.rt, &w.req.version, &o);
                if w.matches(&view) && !w.send("ADDED", &view).await {
                    return;
                }
            }
            if w.req.send_initial_events && w.req.bookmarks && !w.bookmark(rv, true).await {
                return;
            }
            rv
        }
    };
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + w.req.bookmark_interval, w.req.bookmark_interval);
    let sleep = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep);
    loop {
        // Catch up with the history past the cursor.
        let batch = {
            let g = store.lock();
            if g.rv <= cursor {
                Ok(vec![])
            } else if cursor < g.compacted_rv {
                Err(ApiError::expired(format!("too old resource version: {cursor} ({})", g.compacted_rv)))
            } else {
                let from = g.history.partition_point(|e| e.rv <= cursor);
                let evs: Vec<Arc<HistEvent>> = g.history.range(from..).filter(|e| e.key == key).cloned().collect();
                cursor = g.rv;
                Ok(evs)
            }
        };
        match batch {
            Err(e) => {
                w.error(e).await;
                return;
            }
            Ok(evs) => {
                for ev in evs {
                    if !w.deliver(&ev).await {
                        return;
                    }
                }
            }
        }
        tokio::select! {
            changed = latest.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tick.tick(), if w.req.bookmarks => {
                if !w.bookmark(cursor, false).await {
                    return;
                }
            }
            _ = &mut sleep => return,
            _ = w.tx.closed() => return,
            _ = shutdown.changed() => return,
        }
    }
}
