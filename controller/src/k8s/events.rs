//! Publishing `events.k8s.io/v1` Events, repeats folded into a series as kube-runtime's
//! `Recorder` does, with a cache that stays small at thousands of Machines.
//!
//! kube-runtime 5.0's `Recorder` keeps every Event it published for six minutes and
//! sweeps its whole cache on every publish; at 10,000 Machines that is tens of
//! megabytes and quadratic work. Here only Warnings are folded into series (a failure
//! retried with backoff repeats; a transition such as `Created` or `Ready` rarely
//! does, and a repeat is its own Event, as core controllers publish them), each series
//! is remembered by a hash and its Event's timestamp, and the cache is swept once a
//! minute.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::mpsc;

use crate::api::FIELD_MANAGER;

/// How long a repeat joins the series of the Event before it (kube-runtime's TTL).
const SERIES_TTL: Duration = Duration::from_secs(6 * 60);
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// What to say about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventNote<'a> {
    pub warning: bool,
    pub reason: &'a str,
    pub action: &'a str,
    pub note: &'a str,
}

/// A series: its Event's name is `<object>.<stamp as hex>`, rebuilt rather than stored.
struct Series {
    stamp: u64,
    count: i32,
    last: Instant,
}

pub struct EventPublisher {
    client: Client,
    controller: String,
    instance: String,
    series: Mutex<(HashMap<u64, Series>, Instant)>,
    /// With [`EventPublisher::queued`]: the workers' queues. `None`: each publish waits
    /// for its request.
    queues: Option<Vec<mpsc::Sender<Request>>>,
}

/// One request for an Event: its first publication, or a repeat that bumps its series
/// (the whole Event kept, to create it should its first publication have failed).
struct Request {
    event: Event,
    repeat: bool,
}

/// The queued publisher's workers, to let them finish what is queued at shutdown.
pub struct EventWorkers {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl EventWorkers {
    /// Takes no more Events, and waits at most `timeout` for the queued ones to go out.
    pub async fn finish(self, timeout: Duration) {
        let _ = self.stop.send(true);
        let all = futures::future::join_all(self.tasks);
        if tokio::time::timeout(timeout, all).await.is_err() {
            tracing::warn!(timeout_secs = timeout.as_secs(), "Events still queued at shutdown were not published");
        }
    }
}

impl EventPublisher {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        EventPublisher {
            client,
            controller: controller.to_string(),
            instance: instance.unwrap_or_else(|| controller.to_string()),
            series: Mutex::new((HashMap::new(), Instant::now())),
            queues: None,
        }
    }

    /// A publisher whose Events go out from `workers` background tasks, as client-go's
    /// recorder sends them: a reconcile does not wait for its Events' requests, only for
    /// room in a queue of `capacity` per worker when they fall behind. The Events of one
    /// object go through one worker, in order (a series after its first Event).
    pub fn queued(self, workers: usize, capacity: usize) -> (Self, EventWorkers) {
        let mut queues = Vec::with_capacity(workers);
        let mut tasks = Vec::with_capacity(workers);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        for _ in 0..workers.max(1) {
            let (tx, mut rx) = mpsc::channel::<Request>(capacity.max(1));
            let client = self.client.clone();
            let mut stopped = stopped.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let next = tokio::select! {
                        next = rx.recv() => next,
                        // Stopping: what is queued still goes out, nothing more is taken.
                        () = stop_requested(&mut stopped) => {
                            rx.close();
                            rx.recv().await
                        }
                    };
                    let Some(request) = next else { break };
                    let reason = request.event.reason.clone().unwrap_or_default();
                    match send(&client, request).await {
                        Ok(()) => {}
                        Err(e) if namespace_terminating(&e) => {
                            tracing::debug!(reason, "not publishing an Event: the namespace is being terminated");
                        }
                        Err(e) => tracing::warn!(error = %e, reason, "publishing an Event failed"),
                    }
                }
            }));
            queues.push(tx);
        }
        (EventPublisher { queues: Some(queues), ..self }, EventWorkers { tasks, stop })
    }

    /// Creates the Event, or bumps the series of the same Event published within the TTL.
    /// Queued, it returns once the request is queued, and the worker reports failures.
    pub async fn publish(&self, regarding: &ObjectReference, event: &EventNote<'_>) -> Result<(), kube::Error> {
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        let key = {
            let mut h = DefaultHasher::new();
            // As kube-runtime's Recorder: the note is not part of the key, so retries whose
            // messages differ (attempt counts) still fold into one series.
            (&regarding.uid, &regarding.name, &namespace, event.warning, event.reason, event.action).hash(&mut h);
            h.finish()
        };
        let now = Instant::now();
        let stamp = Timestamp::now();
        let nanos = u64::try_from(stamp.as_nanosecond()).unwrap_or_default();
        // A repeat: its series' stamp and new count. A first Warning starts a series now,
        // so that a repeat queued behind it bumps it.
        let repeat = {
            let mut guard = self.series.lock().expect("not poisoned");
            let (series, swept) = &mut *guard;
            if now.duration_since(*swept) > SWEEP_EVERY {
                series.retain(|_, s| now.duration_since(s.last) < SERIES_TTL);
                *swept = now;
            }
            match series.get_mut(&key).filter(|s| now.duration_since(s.last) < SERIES_TTL) {
                Some(s) => {
                    s.count += 1;
                    s.last = now;
                    Some((s.stamp, s.count))
                }
                None => {
                    if event.warning {
                        series.insert(key, Series { stamp: nanos, count: 1, last: now });
                    }
                    None
                }
            }
        };
        let base = regarding.name.clone().unwrap_or_else(|| self.controller.clone());
        let (name_stamp, series) = match repeat {
            Some((stamp, count)) => {
                (stamp, Some(EventSeries { count, last_observed_time: MicroTime(Timestamp::now()) }))
            }
            None => (nanos, None),
        };
        let request = Request {
            repeat: series.is_some(),
            event: Event {
                metadata: ObjectMeta {
                    name: Some(format!("{base}.{name_stamp:x}")),
                    namespace: Some(namespace),
                    ..Default::default()
                },
                action: Some(event.action.to_string()),
                reason: Some(event.reason.to_string()),
                note: Some(event.note.to_string()),
                type_: Some(if event.warning { "Warning" } else { "Normal" }.to_string()),
                event_time: Some(MicroTime(stamp)),
                regarding: Some(regarding.clone()),
                reporting_controller: Some(self.controller.clone()),
                reporting_instance: Some(self.instance.clone()),
                series,
                ..Default::default()
            },
        };
        match &self.queues {
            None => {
                let result = send(&self.client, request).await;
                if result.is_err() && repeat.is_none() {
                    // Not published: a repeat starts afresh rather than bumping nothing.
                    self.series.lock().expect("not poisoned").0.remove(&key);
                }
                result
            }
            Some(queues) => {
                let shard = {
                    let mut h = DefaultHasher::new();
                    (&regarding.uid, &regarding.name).hash(&mut h);
                    usize::try_from(h.finish() % queues.len() as u64).unwrap_or_default()
                };
                // A worker gone means the controller is stopping: the Event is moot.
                let _ = queues[shard].send(request).await;
                Ok(())
            }
        }
    }
}

async fn stop_requested(stopped: &mut tokio::sync::watch::Receiver<bool>) {
    // The sender gone counts as a stop too.
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Makes one Event request. A repeat bumps the series of the Event already published;
/// if that Event is not there (its first publication failed), it is created, series and
/// all.
async fn send(client: &Client, request: Request) -> Result<(), kube::Error> {
    let namespace = request.event.metadata.namespace.clone().unwrap_or_default();
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    if request.repeat {
        let name = request.event.metadata.name.clone().unwrap_or_default();
        let patch = json!({ "series": request.event.series });
        let patched = events
            .patch(
                &name,
                &PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() },
                &Patch::Merge(&patch),
            )
            .await;
        match patched {
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            other => return other.map(|_| ()),
        }
    }
    events.create(&params, &request.event).await.map(|_| ())
}

/// Whether `error` is the API server refusing a create because the namespace is being
/// deleted (403 "... because it is being terminated"): an Event there is moot, and never
/// worth a retry or a warning.
pub fn namespace_terminating(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(e) if e.code == 403 && e.message.contains("being terminated"))
}
