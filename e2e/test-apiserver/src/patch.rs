//! The patch flavours clients send: JSON patch (RFC 6902), JSON merge patch
//! (RFC 7386), strategic merge patch (approximated) and server-side apply
//! (approximated; see the crate docs).

use serde_json::{Map, Value};

use crate::error::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<PatchType> {
        let base = ct.split(';').next().unwrap_or_default().trim();
        match base {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(PatchType::Apply),
            _ => None,
        }
    }
}

pub fn parse_body(body: &[u8], yaml: bool) -> Result<Value, ApiError> {
    if yaml {
        let v: serde_yaml::Value =
            serde_yaml::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
        serde_json::to_value(v).map_err(|e| ApiError::bad_request(e.to_string()))
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))
    }
}

/// RFC 6902. Any failing op (including `test`) is kube's generic 422.
/// Like kube's implementation (evanphx/json-patch), a `test` for `null`
/// passes on a missing path: kube-runtime's finalizer helper relies on it.
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let p: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    for op in p.0 {
        if let json_patch::PatchOperation::Test(t) = &op
            && t.value.is_null()
            && doc.pointer(t.path.as_str()).is_none_or(Value::is_null)
        {
            continue;
        }
        json_patch::patch(doc, &[op]).map_err(|_| ApiError::json_patch_failed())?;
    }
    Ok(())
}

/// RFC 7386.
pub fn merge_patch(doc: &mut Value, patch: &Value) {
    json_patch::merge(doc, patch);
}

/// Strategic merge patch, approximated as a merge patch that understands the
/// directives kubectl emits (`$patch`, `$retainKeys`, `$setElementOrder/…`,
/// `$deleteFromPrimitiveList/…`) and merges `metadata.finalizers` as a set and
/// `metadata.ownerReferences` by uid (their patch strategies in ObjectMeta).
/// Other lists are replaced (kube merges some built-in lists by key).
pub fn strategic_patch(doc: &mut Value, patch: &Value) {
    smp(doc, patch, "");
}

fn smp(doc: &mut Value, patch: &Value, path: &str) {
    let Some(pmap) = patch.as_object() else {
        *doc = patch.clone();
        return;
    };
    match pmap.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut p = pmap.clone();
            p.remove("$patch");
            *doc = Value::Object(p);
            return;
        }
        Some("delete") => {
            *doc = Value::Null;
            return;
        }
        _ => {}
    }
    if !doc.is_object() {
        *doc = Value::Object(Map::new());
    }
    let dmap = doc.as_object_mut().expect("object");
    for (k, pv) in pmap {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Some(del)) = (dmap.get_mut(field), pv.as_array()) {
                items.retain(|i| !del.contains(i));
            }
            continue;
        }
        let child = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
        match pv {
            Value::Null => {
                dmap.remove(k);
            }
            Value::Object(_) => {
                let entry = dmap.entry(k.clone()).or_insert(Value::Null);
                smp(entry, pv, &child);
                if entry.is_null() {
                    dmap.remove(k);
                }
            }
            Value::Array(items) if child == "metadata.finalizers" => {
                let entry = dmap.entry(k.clone()).or_insert_with(|| Value::Array(vec![]));
                if let Some(cur) = entry.as_array_mut() {
                    for i in items {
                        if !cur.contains(i) {
                            cur.push(i.clone());
                        }
                    }
                }
            }
            Value::Array(items) if child == "metadata.ownerReferences" => {
                let entry = dmap.entry(k.clone()).or_insert_with(|| Value::Array(vec![]));
                if let Some(cur) = entry.as_array_mut() {
                    for i in items {
                        let uid = i.get("uid");
                        if i.get("$patch").and_then(Value::as_str) == Some("delete") {
                            cur.retain(|c| c.get("uid") != uid);
                        } else if let Some(pos) = cur.iter().position(|c| c.get("uid") == uid) {
                            smp(&mut cur[pos], i, &child);
                        } else {
                            cur.push(i.clone());
                        }
                    }
                }
            }
            other => {
                dmap.insert(k.clone(), strip_directives(other));
            }
        }
    }
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter().filter(|(k, _)| !k.starts_with('$')).map(|(k, v)| (k.clone(), strip_directives(v))).collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

/// Server-side apply, approximated without managedFields:
/// 1. fields this manager applied last time but not now are removed;
/// 2. the applied configuration is merged in (maps recursively; lists with
///    `x-kubernetes-list-type: map` by key, `set` by value, others replaced).
///
/// Fields set by other managers are kept; there are no ownership conflicts.
pub fn apply(doc: &mut Value, applied: &Value, previous: Option<&Value>, schema: Option<&Value>) {
    if let Some(prev) = previous {
        remove_dropped(doc, prev, applied, schema, "");
    }
    apply_merge(doc, applied, schema, "");
}

/// Schema node for a child property (built-in types have no schema; a few
/// well-known metadata lists are given their list types here).
fn child_schema<'a>(schema: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    let s = schema?;
    s.get("properties").and_then(|p| p.get(key)).or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
}

fn list_type(schema: Option<&Value>, path: &str) -> (String, Vec<String>) {
    match path {
        "metadata.finalizers" => return ("set".into(), vec![]),
        "metadata.ownerReferences" => return ("map".into(), vec!["uid".into()]),
        _ => {}
    }
    let Some(s) = schema else {
        return ("atomic".into(), vec![]);
    };
    let t = s.get("x-kubernetes-list-type").and_then(Value::as_str).unwrap_or("atomic").to_string();
    let keys = s
        .get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|k| k.as_str().map(String::from)).collect())
        .unwrap_or_default();
    (t, keys)
}

fn key_of(item: &Value, keys: &[String]) -> Vec<Value> {
    keys.iter().map(|k| item.get(k).cloned().unwrap_or(Value::Null)).collect()
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() { k.to_string() } else { format!("{path}.{k}") }
}

fn apply_merge(doc: &mut Value, applied: &Value, schema: Option<&Value>, path: &str) {
    match applied {
        Value::Object(am) => {
            if !doc.is_object() {
                *doc = Value::Object(Map::new());
            }
            let dm = doc.as_object_mut().expect("object");
            for (k, av) in am {
                let cs = child_schema(schema, k);
                let p = join(path, k);
                if av.is_object() {
                    let entry = dm.entry(k.clone()).or_insert(Value::Null);
                    apply_merge(entry, av, cs, &p);
                } else if let Some(items) = av.as_array() {
                    let (lt, keys) = list_type(cs, &p);
                    let entry = dm.entry(k.clone()).or_insert(Value::Null);
                    match (lt.as_str(), entry.as_array_mut()) {
                        ("map", Some(cur)) if !keys.is_empty() => {
                            let item_schema = cs.and_then(|s| s.get("items"));
                            for it in items {
                                let key = key_of(it, &keys);
                                match cur.iter().position(|c| key_of(c, &keys) == key) {
                                    Some(pos) => apply_merge(&mut cur[pos], it, item_schema, &p),
                                    None => cur.push(it.clone()),
                                }
                            }
                        }
                        ("set", Some(cur)) => {
                            for it in items {
                                if !cur.contains(it) {
                                    cur.push(it.clone());
                                }
                            }
                        }
                        _ => *entry = av.clone(),
                    }
                } else {
                    dm.insert(k.clone(), av.clone());
                }
            }
        }
        other => *doc = other.clone(),
    }
}

/// Remove what `prev` (this manager's last applied config) had and `now` lacks.
fn remove_dropped(doc: &mut Value, prev: &Value, now: &Value, schema: Option<&Value>, path: &str) {
    let (Some(pm), Some(dm)) = (prev.as_object(), doc.as_object_mut()) else {
        return;
    };
    for (k, pv) in pm {
        // Identity fields are never removed by apply.
        if path == "metadata" && matches!(k.as_str(), "name" | "namespace") {
            continue;
        }
        if path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind") {
            continue;
        }
        let nv = now.get(k);
        let p = join(path, k);
        let cs = child_schema(schema, k);
        match (pv, nv) {
            (_, None) => {
                dm.remove(k);
            }
            (Value::Object(_), Some(nv @ Value::Object(_))) => {
                if let Some(dv) = dm.get_mut(k) {
                    remove_dropped(dv, pv, nv, cs, &p);
                }
            }
            (Value::Array(pitems), Some(Value::Array(nitems))) => {
                let (lt, keys) = list_type(cs, &p);
                let Some(cur) = dm.get_mut(k).and_then(Value::as_array_mut) else {
                    continue;
                };
                match lt.as_str() {
                    "map" if !keys.is_empty() => {
                        for pi in pitems {
                            let key = key_of(pi, &keys);
                            if !nitems.iter().any(|n| key_of(n, &keys) == key) {
                                cur.retain(|c| key_of(c, &keys) != key);
                            }
                        }
                    }
                    "set" => {
                        for pi in pitems {
                            if !nitems.contains(pi) {
                                cur.retain(|c| c != pi);
                            }
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn apply_keeps_other_fields_and_drops_own_removed() {
        let schema = json!({"type": "object", "properties": {"status": {"type": "object", "properties": {
            "conditions": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"],
                "items": {"type": "object"}},
            "state": {"type": "string"}, "providerID": {"type": "string"}, "extra": {"type": "string"}}}}});
        let mut doc = json!({"status": {"providerID": "p", "state": "A"}});
        let first = json!({"status": {"state": "B", "extra": "e", "conditions": [{"type": "Ready", "status": "True"}, {"type": "X", "status": "True"}]}});
        apply(&mut doc, &first, None, Some(&schema));
        assert_eq!(doc["status"]["providerID"], "p");
        assert_eq!(doc["status"]["conditions"].as_array().unwrap().len(), 2);
        let second = json!({"status": {"state": "C", "conditions": [{"type": "Ready", "status": "False"}]}});
        apply(&mut doc, &second, Some(&first), Some(&schema));
        assert_eq!(
            doc,
            json!({"status": {"providerID": "p", "state": "C", "conditions": [{"type": "Ready", "status": "False"}]}})
        );
    }

    #[test]
    fn strategic_directives() {
        let mut doc = json!({"metadata": {"finalizers": ["a"], "labels": {"x": "1"}}, "data": {"k": "v"}});
        let p = json!({"metadata": {"finalizers": ["b"], "$setElementOrder/finalizers": ["a", "b"], "labels": {"x": null}},
            "data": {"$patch": "replace", "n": "m"}});
        strategic_patch(&mut doc, &p);
        assert_eq!(doc, json!({"metadata": {"finalizers": ["a", "b"], "labels": {}}, "data": {"n": "m"}}));
    }
}
