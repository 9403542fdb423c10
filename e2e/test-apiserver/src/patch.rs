//! The patch flavours clients send: JSON patch (RFC 6902), JSON merge patch
//! (RFC 7386), strategic merge patch (approximated) and server-side apply's
//! merge (field ownership is `managed`'s).

use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::typed::{ListKind, Typed};

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

/// Server-side apply's merge of a configuration into the live object: maps
/// recursively, lists with `x-kubernetes-list-type: map` by key and `set` by
/// value, atomic maps and other lists replaced. (What the applier omits now
/// is removed separately, by field ownership: `managed::prune_dropped`.)
pub fn apply(doc: &mut Value, applied: &Value, t: Typed) {
    match applied {
        Value::Object(am) if !t.atomic_map() => {
            if !doc.is_object() {
                *doc = Value::Object(Map::new());
            }
            let dm = doc.as_object_mut().expect("object");
            for (k, av) in am {
                let ct = t.field(k).0;
                let entry = dm.entry(k.clone()).or_insert(Value::Null);
                if av.is_object() {
                    apply(entry, av, ct);
                    continue;
                }
                match (av, ct.list_kind(), entry) {
                    (Value::Array(items), ListKind::Map(keys), Value::Array(cur)) => {
                        let key_of = |i: &Value| -> Vec<Value> {
                            keys.iter().map(|k| i.get(k).cloned().unwrap_or(Value::Null)).collect()
                        };
                        for it in items {
                            match cur.iter().position(|c| key_of(c) == key_of(it)) {
                                Some(pos) => apply(&mut cur[pos], it, ct.items()),
                                None => cur.push(it.clone()),
                            }
                        }
                    }
                    (Value::Array(items), ListKind::Set, Value::Array(cur)) => {
                        for it in items {
                            if !cur.contains(it) {
                                cur.push(it.clone());
                            }
                        }
                    }
                    (_, _, entry) => *entry = av.clone(),
                }
            }
        }
        other => *doc = other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_directives() {
        let mut doc = json!({"metadata": {"finalizers": ["a"], "labels": {"x": "1"}}, "data": {"k": "v"}});
        let p = json!({"metadata": {"finalizers": ["b"], "$setElementOrder/finalizers": ["a", "b"], "labels": {"x": null}},
            "data": {"$patch": "replace", "n": "m"}});
        strategic_patch(&mut doc, &p);
        assert_eq!(doc, json!({"metadata": {"finalizers": ["a", "b"], "labels": {}}, "data": {"n": "m"}}));
    }
}
