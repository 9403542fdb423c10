//! Events are stored once, as `events.k8s.io/v1`, and served also as
//! core/v1 `events` (what `kubectl describe` lists), converted field by field
//! the way kube's internal conversion does.

use serde_json::{Map, Value, json};

fn put(m: &mut Map<String, Value>, k: &str, v: Option<&Value>) {
    if let Some(v) = v.filter(|v| !v.is_null()) {
        m.insert(k.into(), v.clone());
    }
}

/// `events.k8s.io/v1` Event -> core/v1 Event.
pub fn to_core(ev: &Value) -> Value {
    let mut m = Map::new();
    m.insert("apiVersion".into(), "v1".into());
    m.insert("kind".into(), "Event".into());
    put(&mut m, "metadata", ev.get("metadata"));
    put(&mut m, "involvedObject", ev.get("regarding"));
    put(&mut m, "reason", ev.get("reason"));
    put(&mut m, "message", ev.get("note"));
    put(&mut m, "type", ev.get("type"));
    put(&mut m, "action", ev.get("action"));
    put(&mut m, "related", ev.get("related"));
    put(&mut m, "series", ev.get("series"));
    put(&mut m, "eventTime", ev.get("eventTime"));
    put(&mut m, "reportingComponent", ev.get("reportingController"));
    put(&mut m, "reportingInstance", ev.get("reportingInstance"));
    // Fill the legacy fields from the new ones when unset, so that
    // `kubectl describe` shows From / Age / (xN over ...) for new-style events.
    let mut source = ev
        .get("deprecatedSource")
        .filter(|s| s.as_object().is_some_and(|o| !o.is_empty()))
        .cloned()
        .unwrap_or_else(|| json!({}));
    if source.get("component").is_none()
        && let Some(c) = ev.get("reportingController").filter(|v| !v.is_null())
    {
        source["component"] = c.clone();
    }
    m.insert("source".into(), source);
    let first = ev.get("deprecatedFirstTimestamp").filter(|v| !v.is_null()).or_else(|| ev.get("eventTime"));
    put(&mut m, "firstTimestamp", first.map(trim_micro).as_ref());
    let last = ev
        .get("deprecatedLastTimestamp")
        .filter(|v| !v.is_null())
        .or_else(|| ev.pointer("/series/lastObservedTime"))
        .or_else(|| ev.get("eventTime"));
    put(&mut m, "lastTimestamp", last.map(trim_micro).as_ref());
    let count = ev
        .get("deprecatedCount")
        .filter(|v| !v.is_null())
        .or_else(|| ev.pointer("/series/count"))
        .cloned()
        .unwrap_or(json!(1));
    m.insert("count".into(), count);
    Value::Object(m)
}

/// `firstTimestamp`/`lastTimestamp` are second-precision `Time`s.
fn trim_micro(v: &Value) -> Value {
    match v.as_str().and_then(|s| s.parse::<jiff::Timestamp>().ok()) {
        Some(t) => Value::String(t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
        None => v.clone(),
    }
}

/// core/v1 Event -> `events.k8s.io/v1` Event (for writes through /api/v1).
pub fn from_core(ev: &Value) -> Value {
    let mut m = Map::new();
    m.insert("apiVersion".into(), "events.k8s.io/v1".into());
    m.insert("kind".into(), "Event".into());
    put(&mut m, "metadata", ev.get("metadata"));
    put(&mut m, "regarding", ev.get("involvedObject"));
    put(&mut m, "reason", ev.get("reason"));
    put(&mut m, "note", ev.get("message"));
    put(&mut m, "type", ev.get("type"));
    put(&mut m, "action", ev.get("action"));
    put(&mut m, "related", ev.get("related"));
    put(&mut m, "series", ev.get("series"));
    put(&mut m, "eventTime", ev.get("eventTime"));
    let controller = ev
        .get("reportingComponent")
        .filter(|v| v.as_str().is_some_and(|s| !s.is_empty()))
        .or_else(|| ev.pointer("/source/component"));
    put(&mut m, "reportingController", controller);
    let instance = ev
        .get("reportingInstance")
        .filter(|v| v.as_str().is_some_and(|s| !s.is_empty()))
        .or_else(|| ev.pointer("/source/host"));
    put(&mut m, "reportingInstance", instance);
    put(&mut m, "deprecatedSource", ev.get("source"));
    put(&mut m, "deprecatedFirstTimestamp", ev.get("firstTimestamp"));
    put(&mut m, "deprecatedLastTimestamp", ev.get("lastTimestamp"));
    put(&mut m, "deprecatedCount", ev.get("count"));
    Value::Object(m)
}

/// The shape the real server returns for `events.k8s.io/v1` (it always
/// carries these deprecated fields, empty).
pub fn normalize_events_v1(ev: &mut Value) {
    if let Some(m) = ev.as_object_mut() {
        m.entry("deprecatedSource").or_insert(json!({}));
        m.entry("deprecatedFirstTimestamp").or_insert(Value::Null);
        m.entry("deprecatedLastTimestamp").or_insert(Value::Null);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_view() {
        let ev = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e", "namespace": "n"},
            "eventTime": "2026-11-21T10:00:00.000000Z", "reportingController": "c", "reportingInstance": "i",
            "action": "A", "reason": "R", "type": "Normal", "note": "hello",
            "regarding": {"kind": "Gadget", "name": "w1"}, "series": {"count": 3, "lastObservedTime": "2026-11-21T10:05:00.000000Z"}});
        let c = to_core(&ev);
        assert_eq!(c["involvedObject"]["name"], "w1");
        assert_eq!(c["message"], "hello");
        assert_eq!(c["source"]["component"], "c");
        assert_eq!(c["reportingComponent"], "c");
        assert_eq!(c["count"], 3);
        assert_eq!(c["firstTimestamp"], "2026-11-21T10:00:00Z");
        assert_eq!(c["lastTimestamp"], "2026-11-21T10:05:00Z");
        let back = from_core(&c);
        assert_eq!(back["regarding"], ev["regarding"]);
        assert_eq!(back["note"], "hello");
    }
}
