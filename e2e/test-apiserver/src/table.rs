//! `meta.k8s.io/v1 Table` output (what `kubectl get` asks for): the CRD
//! version's `additionalPrinterColumns` (a JSONPath subset) plus the implicit
//! Name column, and fixed columns for the built-in types.

use serde_json::{Value, json};

use crate::resources::{Builtin, ResourceType};

/// Evaluate a JSONPath of the subset kube's printer columns use:
/// `.a.b`, `.a[0].b`, `.a[*].b`, `.a[?(@.type=="Ready")].status`, `.a['x.y']`.
pub fn jsonpath(obj: &Value, path: &str) -> Vec<Value> {
    let path = path.trim();
    let path = path.strip_prefix('{').and_then(|p| p.strip_suffix('}')).unwrap_or(path);
    let path = path.strip_prefix('$').unwrap_or(path);
    let mut cur: Vec<Value> = vec![obj.clone()];
    let chars: Vec<char> = path.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '.' => {
                let start = i + 1;
                let mut j = start;
                while j < chars.len() && chars[j] != '.' && chars[j] != '[' {
                    j += 1;
                }
                let key: String = chars[start..j].iter().collect();
                if !key.is_empty() {
                    cur = cur.iter().filter_map(|v| v.get(&key).cloned()).collect();
                }
                i = j;
            }
            '[' => {
                let mut depth = 0;
                let mut j = i;
                while j < chars.len() {
                    match chars[j] {
                        '[' => depth += 1,
                        ']' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                let inner: String = chars[i + 1..j.min(chars.len())].iter().collect();
                cur = index(&cur, inner.trim());
                i = j + 1;
            }
            _ => {
                // A path without a leading dot: treat as a key segment.
                let start = i;
                let mut j = i;
                while j < chars.len() && chars[j] != '.' && chars[j] != '[' {
                    j += 1;
                }
                let key: String = chars[start..j].iter().collect();
                cur = cur.iter().filter_map(|v| v.get(&key).cloned()).collect();
                i = j;
            }
        }
    }
    cur
}

fn index(cur: &[Value], inner: &str) -> Vec<Value> {
    if inner == "*" {
        return cur
            .iter()
            .flat_map(|v| match v {
                Value::Array(a) => a.clone(),
                Value::Object(m) => m.values().cloned().collect(),
                _ => vec![],
            })
            .collect();
    }
    if let Some(filter) = inner.strip_prefix("?(").and_then(|f| f.strip_suffix(')')) {
        // @.a.b=="x" or @.a!="x" or @.a (exists)
        let (lhs, op, rhs) = if let Some((l, r)) = filter.split_once("==") {
            (l.trim(), Some(true), Some(r.trim()))
        } else if let Some((l, r)) = filter.split_once("!=") {
            (l.trim(), Some(false), Some(r.trim()))
        } else {
            (filter.trim(), None, None)
        };
        let sub = lhs.strip_prefix('@').unwrap_or(lhs);
        let want: Option<Value> = rhs.map(|r| {
            let r = r.trim_matches(|c| c == '"' || c == '\'');
            serde_json::from_str::<Value>(r)
                .ok()
                .filter(|v| !v.is_string())
                .unwrap_or_else(|| Value::String(r.to_string()))
        });
        return cur
            .iter()
            .filter_map(Value::as_array)
            .flatten()
            .filter(|item| {
                let got = jsonpath(item, sub).into_iter().next();
                match (op, &want) {
                    (Some(eq), Some(w)) => (got.as_ref() == Some(w)) == eq,
                    _ => got.is_some(),
                }
            })
            .cloned()
            .collect();
    }
    if let Ok(n) = inner.parse::<i64>() {
        return cur
            .iter()
            .filter_map(Value::as_array)
            .filter_map(|a| {
                let idx = if n < 0 { a.len() as i64 + n } else { n };
                a.get(usize::try_from(idx).ok()?).cloned()
            })
            .collect();
    }
    let key = inner.trim_matches(|c| c == '\'' || c == '"');
    cur.iter().filter_map(|v| v.get(key).cloned()).collect()
}

/// kube's `duration.HumanDuration`, which renders `date` cells.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 { format!("{minutes}m") } else { format!("{minutes}m{s}s") };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = secs / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 { format!("{hours}h") } else { format!("{hours}h{m}m") };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 { format!("{}d", hours / 24) } else { format!("{}d{h}h", hours / 24) };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 { format!("{}y", hours / 24 / 365) } else { format!("{}y{dy}d", hours / 24 / 365) };
    }
    format!("{}y", hours / 24 / 365)
}

fn age(ts: &Value) -> Value {
    match ts.as_str().and_then(|s| s.parse::<jiff::Timestamp>().ok()) {
        Some(t) => {
            let secs = jiff::Timestamp::now().as_second() - t.as_second();
            Value::String(human_duration(secs))
        }
        None => Value::String("<invalid>".into()),
    }
}

/// A cell for a column of the given OpenAPI type (kube's `cellForJSONValue`).
fn cell(ty: &str, v: Option<Value>) -> Value {
    let Some(v) = v else { return Value::Null };
    match ty {
        "date" => age(&v),
        "integer" => v.as_i64().map(Value::from).unwrap_or(Value::Null),
        "number" => v.as_f64().map(Value::from).unwrap_or(Value::Null),
        "boolean" => v.as_bool().map(Value::from).unwrap_or(Value::Null),
        "string" => match v {
            Value::String(s) => Value::String(s),
            Value::Null => Value::Null,
            other => Value::String(other.to_string()),
        },
        _ => match v {
            Value::String(s) => Value::String(s),
            other => Value::String(other.to_string()),
        },
    }
}

struct Column {
    name: String,
    ty: String,
    format: String,
    description: String,
    priority: i64,
    path: Option<String>,
}

const NAME_DESC: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";
const AGE_DESC: &str = "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";

fn col(name: &str, ty: &str, path: &str, desc: &str) -> Column {
    Column {
        name: name.into(),
        ty: ty.into(),
        format: String::new(),
        description: desc.into(),
        priority: 0,
        path: Some(path.into()),
    }
}

fn columns(rt: &ResourceType, version: &str) -> Vec<Column> {
    let mut cols = vec![Column {
        name: "Name".into(),
        ty: "string".into(),
        format: "name".into(),
        description: NAME_DESC.into(),
        priority: 0,
        path: None,
    }];
    let age = || col("Age", "date", ".metadata.creationTimestamp", AGE_DESC);
    match rt.builtin {
        Builtin::Custom => {
            let vi = rt.version(version).unwrap_or_else(|| rt.preferred_version());
            if vi.printer_columns.is_empty() {
                cols.push(age());
            }
            for pc in &vi.printer_columns {
                let s = |k: &str| pc.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
                cols.push(Column {
                    name: s("name"),
                    ty: s("type"),
                    format: s("format"),
                    description: s("description"),
                    priority: pc.get("priority").and_then(Value::as_i64).unwrap_or(0),
                    path: Some(s("jsonPath")),
                });
            }
        }
        Builtin::Namespace => {
            cols.push(col("Status", "string", ".status.phase", "The status of the namespace"));
            cols.push(age());
        }
        Builtin::Secret => {
            cols.push(col("Type", "string", ".type", "The type of the secret"));
            cols.push(col("Data", "string", "#datacount", "The number of entries in the secret"));
            cols.push(age());
        }
        Builtin::ConfigMap => {
            cols.push(col("Data", "string", "#datacount", "Number of entries in the configmap"));
            cols.push(age());
        }
        Builtin::Lease => {
            cols.push(col("Holder", "string", ".spec.holderIdentity", "The holder of the lease"));
            cols.push(age());
        }
        Builtin::Crd => {
            cols.push(col("Created At", "date", "#createdat", "Date and time the CRD was created"));
        }
        Builtin::CoreEvent => {
            cols = vec![
                col("Last Seen", "string", "#lastseen", "Time since the event was last seen"),
                col("Type", "string", ".type", "Type of the event"),
                col("Reason", "string", ".reason", "Reason of the event"),
                col("Object", "string", "#object", "The object the event is about"),
                col("Message", "string", ".message", "Message of the event"),
            ];
        }
        Builtin::Event => {
            cols.push(col("Type", "string", ".type", "Type of the event"));
            cols.push(col("Reason", "string", ".reason", "Reason of the event"));
            cols.push(col("Note", "string", ".note", "Note of the event"));
            cols.push(age());
        }
    }
    cols
}

fn row_cells(cols: &[Column], obj: &Value) -> Vec<Value> {
    cols.iter()
        .map(|c| match c.path.as_deref() {
            None => obj.pointer("/metadata/name").cloned().unwrap_or(Value::Null),
            Some("#datacount") => json!(
                obj.get("data").and_then(Value::as_object).map_or(0, |m| m.len())
                    + obj.get("binaryData").and_then(Value::as_object).map_or(0, |m| m.len())
            ),
            Some("#createdat") => obj.pointer("/metadata/creationTimestamp").cloned().unwrap_or(Value::Null),
            Some("#lastseen") => {
                let t = obj.get("lastTimestamp").or_else(|| obj.get("eventTime")).cloned().unwrap_or(Value::Null);
                age(&t)
            }
            Some("#object") => {
                let io = obj.get("involvedObject").cloned().unwrap_or(json!({}));
                let s = |k: &str| io.get(k).and_then(Value::as_str).unwrap_or_default().to_lowercase();
                Value::String(format!("{}/{}", s("kind"), io.get("name").and_then(Value::as_str).unwrap_or_default()))
            }
            Some(p) => cell(&c.ty, jsonpath(obj, p).into_iter().next()),
        })
        .collect()
}

/// Which object each row carries (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(s: Option<&str>) -> IncludeObject {
        match s {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

fn row(cols: &[Column], obj: &Value, include: IncludeObject) -> Value {
    let mut r = json!({"cells": row_cells(cols, obj)});
    match include {
        IncludeObject::None => {}
        IncludeObject::Object => r["object"] = obj.clone(),
        IncludeObject::Metadata => {
            r["object"] = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": obj.get("metadata").cloned().unwrap_or(json!({}))});
        }
    }
    r
}

/// A Table of `objs`; `headers=false` omits columnDefinitions (watch events after the first).
pub fn table(
    rt: &ResourceType,
    version: &str,
    objs: &[Value],
    list_meta: Value,
    include: IncludeObject,
    headers: bool,
) -> Value {
    let cols = columns(rt, version);
    let defs: Vec<Value> = if headers {
        cols.iter()
            .map(|c| {
                json!({"name": c.name, "type": c.ty, "format": c.format,
                    "description": c.description, "priority": c.priority})
            })
            .collect()
    } else {
        vec![]
    };
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": defs,
        "rows": objs.iter().map(|o| row(&cols, o, include)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonpath_subset() {
        let o = json!({"status": {"state": "Running", "conditions": [
            {"type": "Ready", "status": "True"}, {"type": "Other", "status": "False"}]},
            "metadata": {"annotations": {"a.b/c": "x"}}});
        assert_eq!(jsonpath(&o, ".status.state"), vec![json!("Running")]);
        assert_eq!(jsonpath(&o, ".status.conditions[?(@.type==\"Ready\")].status"), vec![json!("True")]);
        assert_eq!(jsonpath(&o, ".status.conditions[1].type"), vec![json!("Other")]);
        assert_eq!(jsonpath(&o, ".metadata.annotations['a.b/c']"), vec![json!("x")]);
        assert!(jsonpath(&o, ".status.missing").is_empty());
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(130), "2m10s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
        assert_eq!(human_duration(3 * 86400), "3d");
    }
}
