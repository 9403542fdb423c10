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
}

impl EventPublisher {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        EventPublisher {
            client,
            controller: controller.to_string(),
            instance: instance.unwrap_or_else(|| controller.to_string()),
            series: Mutex::new((HashMap::new(), Instant::now())),
        }
    }

    /// Creates the Event, or bumps the series of the same Event published within the TTL.
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
                None => None,
            }
        };
        let events: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let base = regarding.name.clone().unwrap_or_else(|| self.controller.clone());
        match repeat {
            Some((stamp, count)) => {
                let name = format!("{base}.{stamp:x}");
                let series = EventSeries { count, last_observed_time: MicroTime(Timestamp::now()) };
                let patch = json!({ "series": series });
                events
                    .patch(
                        &name,
                        &PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() },
                        &Patch::Merge(&patch),
                    )
                    .await?;
            }
            None => {
                let stamp = Timestamp::now();
                let nanos = u64::try_from(stamp.as_nanosecond()).unwrap_or_default();
                let name = format!("{base}.{nanos:x}");
                let created = Event {
                    metadata: ObjectMeta { name: Some(name), namespace: Some(namespace), ..Default::default() },
                    action: Some(event.action.to_string()),
                    reason: Some(event.reason.to_string()),
                    note: Some(event.note.to_string()),
                    type_: Some(if event.warning { "Warning" } else { "Normal" }.to_string()),
                    event_time: Some(MicroTime(stamp)),
                    regarding: Some(regarding.clone()),
                    reporting_controller: Some(self.controller.clone()),
                    reporting_instance: Some(self.instance.clone()),
                    ..Default::default()
                };
                events
                    .create(&PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }, &created)
                    .await?;
                if event.warning {
                    let mut guard = self.series.lock().expect("not poisoned");
                    guard.0.insert(key, Series { stamp: nanos, count: 1, last: now });
                }
            }
        }
        Ok(())
    }
}

/// Whether `error` is the API server refusing a create because the namespace is being
/// deleted (403 "... because it is being terminated"): an Event there is moot, and never
/// worth a retry or a warning.
pub fn namespace_terminating(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(e) if e.code == 403 && e.message.contains("being terminated"))
}
