//! `metadata.managedFields`: which field manager set which fields, kept the
//! way kube-apiserver's fieldmanager (structured-merge-diff) keeps them.
//!
//! - An `Update` (create, update, non-apply patch) gives its manager the
//!   fields it added or changed and takes them from every other manager;
//!   fields it removed leave every manager.
//! - An `Apply` (server-side apply) makes its manager own exactly the fields
//!   of its configuration. Changing a field another manager owns is a
//!   conflict (409) unless forced, which moves the ownership. What it applied
//!   last time and omits now is removed from the object unless some manager
//!   still owns it.
//! - `apiVersion`, `kind` and the server-set metadata are never owned, nor
//!   what the endpoint resets (`status` through the main resource,
//!   everything but `status` through `/status`).
//!
//! Not emulated: the cap of 10 `Update` entries (kube folds older ones into
//! "ancient-changes"), the `last-applied-configuration` upgrade kube does for
//! the manager `kubectl`, conversion of entries between versions (CRDs are
//! served with `strategy: None`, so the fields are the same).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::resources::{Builtin, ResourceType};
use crate::store::{Sub, meta, now_rfc3339};
use crate::typed::{ListKind, Typed, zero_object};

/// A set of field paths as FieldsV1 encodes it: a tree of path elements
/// (`f:name`, `k:{"type":"Ready"}`, `v:"x"`, `i:0`); `member` says the path
/// to this node is itself in the set (FieldsV1's `"."`, implied for leaves).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSet {
    member: bool,
    children: BTreeMap<String, FieldSet>,
}

impl FieldSet {
    pub fn is_empty(&self) -> bool {
        !self.member && self.children.is_empty()
    }

    fn insert(&mut self, path: &[String]) {
        let mut node = self;
        for pe in path {
            node = node.children.entry(pe.clone()).or_default();
        }
        node.member = true;
    }

    fn union(&mut self, other: &FieldSet) {
        self.member |= other.member;
        for (k, c) in &other.children {
            self.children.entry(k.clone()).or_default().union(c);
        }
    }

    /// Remove `other`'s members.
    fn subtract(&mut self, other: &FieldSet) {
        if other.member {
            self.member = false;
        }
        for (k, c) in &other.children {
            if let Some(mine) = self.children.get_mut(k) {
                mine.subtract(c);
                if mine.is_empty() {
                    self.children.remove(k);
                }
            }
        }
    }

    fn intersection(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet { member: self.member && other.member, children: BTreeMap::new() };
        for (k, c) in &self.children {
            if let Some(o) = other.children.get(k) {
                let i = c.intersection(o);
                if !i.is_empty() {
                    out.children.insert(k.clone(), i);
                }
            }
        }
        out
    }

    /// The member paths, in order.
    fn paths(&self) -> Vec<Vec<String>> {
        fn walk(s: &FieldSet, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
            if s.member && !prefix.is_empty() {
                out.push(prefix.clone());
            }
            for (k, c) in &s.children {
                prefix.push(k.clone());
                walk(c, prefix, out);
                prefix.pop();
            }
        }
        let mut out = Vec::new();
        walk(self, &mut Vec::new(), &mut out);
        out
    }

    /// The metadata field itself is never owned, only what is in it.
    fn unown_metadata(&mut self) {
        if let Some(m) = self.children.get_mut("f:metadata") {
            m.member = false;
            if m.is_empty() {
                self.children.remove("f:metadata");
            }
        }
    }

    pub fn from_fields_v1(v: &Value) -> Option<FieldSet> {
        let mut s = FieldSet::default();
        for (k, c) in v.as_object()? {
            if k == "." {
                s.member = true;
                continue;
            }
            if !["f:", "k:", "v:", "i:"].iter().any(|p| k.starts_with(p)) {
                return None;
            }
            let mut child = FieldSet::from_fields_v1(c)?;
            child.member |= child.children.is_empty();
            s.children.insert(k.clone(), child);
        }
        Some(s)
    }

    pub fn to_fields_v1(&self) -> Value {
        let mut m = Map::new();
        if self.member && !self.children.is_empty() {
            m.insert(".".into(), json!({}));
        }
        for (k, c) in &self.children {
            m.insert(k.clone(), c.to_fields_v1());
        }
        Value::Object(m)
    }
}

fn field_pe(k: &str) -> String {
    format!("f:{k}")
}

/// The path elements of a list's items, or None when it is owned as a whole
/// (atomic, or a map-list item lacking a key).
fn item_pes(items: &[Value], kind: &ListKind) -> Option<Vec<String>> {
    match kind {
        ListKind::Atomic => None,
        ListKind::Set => Some(items.iter().map(|i| format!("v:{i}")).collect()),
        ListKind::Map(keys) => items
            .iter()
            .map(|i| {
                let m = i.as_object()?;
                let key: Map<String, Value> =
                    keys.iter().map(|k| Some((k.clone(), m.get(k)?.clone()))).collect::<Option<_>>()?;
                Some(format!("k:{}", Value::Object(key)))
            })
            .collect(),
    }
}

/// Where an item path element points in a list.
fn item_index(items: &[Value], pe: &str) -> Option<usize> {
    if let Some(j) = pe.strip_prefix("k:") {
        let want: Map<String, Value> = serde_json::from_str(j).ok()?;
        items.iter().position(|i| want.iter().all(|(k, x)| i.get(k) == Some(x)))
    } else if let Some(j) = pe.strip_prefix("v:") {
        let want: Value = serde_json::from_str(j).ok()?;
        items.iter().position(|i| *i == want)
    } else {
        pe.strip_prefix("i:")?.parse().ok().filter(|n| *n < items.len())
    }
}

/// The value a path element points to in `v`, with its type.
fn child<'v, 'a>(v: &'v Value, pe: &str, t: Typed<'a>) -> Option<(&'v Value, Typed<'a>)> {
    match pe.strip_prefix("f:") {
        Some(k) => v.get(k).map(|c| (c, t.field(k).0)),
        None => {
            let items = v.as_array()?;
            item_index(items, pe).map(|i| (&items[i], t.items()))
        }
    }
}

fn child_mut<'v, 'a>(v: &'v mut Value, pe: &str, t: Typed<'a>) -> Option<(&'v mut Value, Typed<'a>)> {
    match pe.strip_prefix("f:") {
        Some(k) => v.get_mut(k).map(|c| (c, t.field(k).0)),
        None => {
            let items = v.as_array_mut()?;
            let i = item_index(items, pe)?;
            Some((&mut items[i], t.items()))
        }
    }
}

fn remove_child(v: &mut Value, pe: &str) {
    match (pe.strip_prefix("f:"), v) {
        (Some(k), Value::Object(m)) => {
            m.remove(k);
        }
        (None, Value::Array(items)) => {
            if let Some(i) = item_index(items, pe) {
                items.remove(i);
            }
        }
        _ => {}
    }
}

/// How a value is walked: by key, by list item, or as a whole.
enum Shape {
    Map,
    List(ListKind),
    Leaf,
}

fn shape(values: &[Option<&Value>], t: Typed) -> Shape {
    let present: Vec<&Value> = values.iter().flatten().copied().filter(|v| !v.is_null()).collect();
    if present.is_empty() {
        return Shape::Leaf;
    }
    if present.iter().all(|v| v.is_object()) && !t.atomic_map() {
        return Shape::Map;
    }
    if present.iter().all(|v| v.is_array()) {
        let kind = t.list_kind();
        if present.iter().all(|v| item_pes(v.as_array().expect("array"), &kind).is_some()) {
            return Shape::List(kind);
        }
    }
    Shape::Leaf
}

/// What a write changed: fields added or modified, and fields removed
/// (structured-merge-diff's Compare). Maps and lists that are walked into
/// count only when they appear or disappear; leaves when their value differs.
#[derive(Default)]
struct Changes {
    changed: FieldSet,
    removed: FieldSet,
}

fn compare(old: Option<&Value>, new: Option<&Value>, t: Typed, path: &mut Vec<String>, ch: &mut Changes) {
    match shape(&[old, new], t) {
        Shape::Map => {
            let keys = |v: Option<&Value>| -> Vec<String> {
                v.and_then(Value::as_object).map(|m| m.keys().cloned().collect()).unwrap_or_default()
            };
            let all: BTreeSet<String> = keys(old).into_iter().chain(keys(new)).collect();
            for k in all {
                path.push(field_pe(&k));
                compare(old.and_then(|o| o.get(&k)), new.and_then(|n| n.get(&k)), t.field(&k).0, path, ch);
                path.pop();
            }
        }
        Shape::List(kind) => {
            let index = |v: Option<&Value>| -> BTreeMap<String, Value> {
                let items = v.and_then(Value::as_array).cloned().unwrap_or_default();
                item_pes(&items, &kind).map(|pes| pes.into_iter().zip(items).collect()).unwrap_or_default()
            };
            let (oi, ni) = (index(old), index(new));
            let all: BTreeSet<&String> = oi.keys().chain(ni.keys()).collect();
            for pe in all {
                path.push(pe.clone());
                compare(oi.get(pe), ni.get(pe), t.items(), path, ch);
                path.pop();
            }
        }
        Shape::Leaf => {
            if let (Some(a), Some(b)) = (old, new)
                && a != b
            {
                ch.changed.insert(path);
            }
        }
    }
    match (old, new) {
        (None, Some(_)) => ch.changed.insert(path),
        (Some(_), None) => ch.removed.insert(path),
        _ => {}
    }
}

/// The fields a server-side apply configuration sets (ToFieldSet): leaves,
/// list items, map keys; declared fields holding a non-empty map only
/// through what is in them.
fn field_set(v: &Value, t: Typed, path: &mut Vec<String>, out: &mut FieldSet) {
    match (v, shape(&[Some(v)], t)) {
        (Value::Object(m), Shape::Map) => {
            for (k, cv) in m {
                let (ct, declared) = t.field(k);
                path.push(field_pe(k));
                field_set(cv, ct, path, out);
                if cv.is_null() || cv.as_object().is_some_and(Map::is_empty) || !declared {
                    out.insert(path);
                }
                path.pop();
            }
        }
        (Value::Array(items), Shape::List(kind)) => {
            for (pe, it) in item_pes(items, &kind).unwrap_or_default().into_iter().zip(items) {
                path.push(pe);
                field_set(it, t.items(), path, out);
                out.insert(path);
                path.pop();
            }
        }
        _ => out.insert(path),
    }
}

/// Keep only the paths that exist in `v` (an applied field the server
/// pruned or dropped is not owned).
fn retain_present(set: &mut FieldSet, v: &Value, t: Typed) {
    set.children.retain(|pe, c| match child(v, pe, t) {
        Some((cv, ct)) => {
            retain_present(c, cv, ct);
            !c.is_empty()
        }
        None => false,
    });
}

/// Remove from `doc` what `last` (an applier's previous fields) has and no
/// manager owns now (`owned`, the applier's new fields included). A named
/// field counts as owned when anything in it is.
fn prune(doc: &mut Value, last: &FieldSet, owned: Option<&FieldSet>, t: Typed) {
    for (pe, lc) in &last.children {
        let oc = owned.and_then(|o| o.children.get(pe));
        let named = pe.starts_with("f:");
        let kept = oc.is_some_and(|o| named || o.member);
        if (lc.member || named) && !kept {
            remove_child(doc, pe);
        } else if let Some((cv, ct)) = child_mut(doc, pe, t) {
            prune(cv, lc, oc, ct);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Operation {
    Apply,
    Update,
}

/// One `managedFields[]` entry.
#[derive(Clone, Debug, PartialEq)]
struct ManagedEntry {
    manager: String,
    operation: Operation,
    api_version: String,
    subresource: String,
    time: Option<String>,
    fields: FieldSet,
}

impl ManagedEntry {
    /// Appliers are one manager across versions; updaters one per version.
    fn is(&self, manager: &str, operation: Operation, api_version: &str, subresource: &str) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource == subresource
            && (operation == Operation::Apply || self.api_version == api_version)
    }

    /// How kube names a manager in conflict messages.
    fn describe(&self) -> String {
        let mut s = format!("{:?}", self.manager);
        if !self.subresource.is_empty() {
            s.push_str(&format!(" with subresource {:?}", self.subresource));
        }
        if self.operation == Operation::Update {
            s.push_str(&format!(" using {}", self.api_version));
        }
        s
    }

    fn to_json(&self) -> Value {
        // ManagedFieldsEntry's field order; empty strings are omitted.
        let mut m = Map::new();
        let mut put = |k: &str, v: &str| {
            if !v.is_empty() {
                m.insert(k.into(), Value::String(v.into()));
            }
        };
        put("manager", &self.manager);
        put("operation", if self.operation == Operation::Apply { "Apply" } else { "Update" });
        put("apiVersion", &self.api_version);
        put("time", self.time.as_deref().unwrap_or_default());
        put("fieldsType", "FieldsV1");
        m.insert("fieldsV1".into(), self.fields.to_fields_v1());
        if !self.subresource.is_empty() {
            m.insert("subresource".into(), Value::String(self.subresource.clone()));
        }
        Value::Object(m)
    }
}

fn decode(v: &Value) -> Option<Vec<ManagedEntry>> {
    v.as_array()?
        .iter()
        .map(|e| {
            let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
            let operation = match s("operation").as_str() {
                "Apply" => Operation::Apply,
                "Update" => Operation::Update,
                _ => return None,
            };
            if s("fieldsType") != "FieldsV1" {
                return None;
            }
            Some(ManagedEntry {
                manager: s("manager"),
                operation,
                api_version: s("apiVersion"),
                subresource: s("subresource"),
                time: e.get("time").and_then(Value::as_str).map(String::from),
                fields: FieldSet::from_fields_v1(e.get("fieldsV1")?)?,
            })
        })
        .collect()
}

fn entries_of(obj: &Value) -> Vec<ManagedEntry> {
    meta(obj, "managedFields").and_then(decode).unwrap_or_default()
}

/// Store the entries in kube's order: appliers first, then by time, manager,
/// apiVersion, subresource.
fn set_entries(obj: &mut Value, mut entries: Vec<ManagedEntry>) {
    entries.retain(|e| !e.fields.is_empty());
    entries.sort_by(|a, b| {
        (a.operation, &a.time, &a.manager, &a.api_version, &a.subresource).cmp(&(
            b.operation,
            &b.time,
            &b.manager,
            &b.api_version,
            &b.subresource,
        ))
    });
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if entries.is_empty() {
            m.remove("managedFields");
        } else {
            m.insert("managedFields".into(), Value::Array(entries.iter().map(ManagedEntry::to_json).collect()));
        }
    }
}

fn subresource(sub: Sub) -> &'static str {
    match sub {
        Sub::Main => "",
        Sub::Status => "status",
        Sub::Finalize => "finalize",
    }
}

/// Metadata the server sets (kube's stripped fields): never owned.
const SERVER_SET: &[&str] =
    &["name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp", "managedFields", "selfLink"];

/// What field ownership is about in `obj` for a write through `sub`.
fn ownable(obj: &Value, rt: &ResourceType, sub: Sub) -> Value {
    let mut v = obj.clone();
    let Some(m) = v.as_object_mut() else {
        return v;
    };
    m.remove("apiVersion");
    m.remove("kind");
    if let Some(meta) = m.entry("metadata").or_insert_with(|| json!({})).as_object_mut() {
        meta.retain(|k, _| !SERVER_SET.contains(&k.as_str()));
    }
    match sub {
        Sub::Status => m.retain(|k, _| k == "status" || k == "metadata"),
        // A namespace's spec changes only through /finalize.
        Sub::Main if rt.builtin == Builtin::Namespace => {
            m.remove("spec");
            m.remove("status");
        }
        Sub::Main | Sub::Finalize => {
            if rt.has_status() {
                m.remove("status");
            }
        }
    }
    v
}

/// The fields a server-side apply of `config` through `sub` sets.
pub fn applied_fields(rt: &ResourceType, version: &str, sub: Sub, config: &Value) -> FieldSet {
    let mut set = FieldSet::default();
    field_set(&ownable(config, rt, sub), Typed::of(rt, version), &mut Vec::new(), &mut set);
    set.unown_metadata();
    set
}

/// What kube checks of an apply configuration before anything else.
pub fn check_apply_config(rt: &ResourceType, version: &str, config: &Value) -> Result<(), ApiError> {
    let expected = rt.api_version(version);
    let sent = config.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    if sent != expected {
        return Err(ApiError::bad_request(format!(
            "Incorrect version specified in apply patch. Specified patch version: {sent}, expected: {expected}"
        )));
    }
    if meta(config, "managedFields").is_some_and(|m| !m.is_null()) {
        return Err(ApiError::bad_request("metadata.managedFields must be nil"));
    }
    Ok(())
}

/// Before an apply's merged object is stored: remove what `manager` applied
/// last time through `sub` and omits now, unless another manager owns it.
pub fn prune_dropped(
    rt: &ResourceType,
    version: &str,
    sub: Sub,
    live: &Value,
    doc: &mut Value,
    manager: &str,
    applied: &FieldSet,
) {
    let entries = entries_of(live);
    let me = |e: &ManagedEntry| e.is(manager, Operation::Apply, "", subresource(sub));
    let Some(last) = entries.iter().find(|e| me(e)) else {
        return;
    };
    let mut owned = applied.clone();
    for e in entries.iter().filter(|e| !me(e)) {
        owned.union(&e.fields);
    }
    prune(doc, &last.fields, Some(&owned), Typed::of(rt, version));
}

/// Who writes, and how.
pub struct Writer<'a> {
    pub manager: &'a str,
    pub sub: Sub,
    /// Server-side apply: the configuration's fields and `force`.
    pub apply: Option<(&'a FieldSet, bool)>,
    /// The `managedFields` the request's object carried (writes through the
    /// main resource may set them: `[]` or `[{}]` clears them).
    pub sent: Option<&'a Value>,
}

/// Record in `new.metadata.managedFields` who owns what once `new` replaces
/// `old` (None: a create). An apply that changes another manager's field
/// without `force` is a 409 Conflict naming the manager.
pub fn record(
    rt: &ResourceType,
    version: &str,
    old: Option<&Value>,
    new: &mut Value,
    w: &Writer,
) -> Result<(), ApiError> {
    let live = old.map(entries_of).unwrap_or_default();
    let reset = |s: &Value| s.as_array().is_some_and(|a| a.is_empty() || (a.len() == 1 && a[0] == json!({})));
    let mut entries = match (w.apply, w.sub, w.sent) {
        (None, Sub::Main | Sub::Finalize, Some(s)) if reset(s) => Vec::new(),
        (None, Sub::Main | Sub::Finalize, Some(s)) => decode(s).filter(|e| !e.is_empty()).unwrap_or(live),
        _ => live,
    };
    let t = Typed::of(rt, version);
    let zero = zero_object(rt.builtin);
    let mut ch = Changes::default();
    compare(
        Some(&ownable(old.unwrap_or(&zero), rt, w.sub)),
        Some(&ownable(new, rt, w.sub)),
        t,
        &mut Vec::new(),
        &mut ch,
    );
    ch.changed.unown_metadata();
    ch.removed.unown_metadata();
    let api_version = rt.api_version(version);
    let sub = subresource(w.sub);
    let now = now_rfc3339();
    match w.apply {
        Some((applied, force)) => {
            let me = |e: &ManagedEntry| e.is(w.manager, Operation::Apply, "", sub);
            let conflicts: Vec<(ManagedEntry, FieldSet)> = entries
                .iter()
                .filter(|e| !me(e))
                .map(|e| (e.clone(), e.fields.intersection(&ch.changed)))
                .filter(|(_, c)| !c.is_empty())
                .collect();
            if !force && !conflicts.is_empty() {
                return Err(conflict_error(conflicts));
            }
            for e in entries.iter_mut() {
                if let Some((_, c)) = conflicts.iter().find(|(o, _)| o == e) {
                    e.fields.subtract(c);
                }
                e.fields.subtract(&ch.removed);
            }
            let mut owned = applied.clone();
            retain_present(&mut owned, new, t);
            let touched = !ch.changed.is_empty() || !ch.removed.is_empty();
            match entries.iter_mut().find(|e| me(e)) {
                Some(e) => {
                    e.fields = owned;
                    e.api_version = api_version;
                    if touched || e.time.is_none() {
                        e.time = Some(now);
                    }
                }
                None => entries.push(ManagedEntry {
                    manager: w.manager.into(),
                    operation: Operation::Apply,
                    api_version,
                    subresource: sub.into(),
                    time: Some(now),
                    fields: owned,
                }),
            }
        }
        None => {
            for e in entries.iter_mut() {
                e.fields.subtract(&ch.changed);
                e.fields.subtract(&ch.removed);
            }
            if !ch.changed.is_empty() {
                match entries.iter_mut().find(|e| e.is(w.manager, Operation::Update, &api_version, sub)) {
                    Some(e) => {
                        e.fields.union(&ch.changed);
                        e.time = Some(now);
                    }
                    None => entries.push(ManagedEntry {
                        manager: w.manager.into(),
                        operation: Operation::Update,
                        api_version,
                        subresource: sub.into(),
                        time: Some(now),
                        fields: ch.changed,
                    }),
                }
            }
        }
    }
    set_entries(new, entries);
    Ok(())
}

/// A path as kube prints it: `.status.conditions[type="Ready"].status`.
fn path_string(path: &[String]) -> String {
    path.iter()
        .map(|pe| {
            if let Some(f) = pe.strip_prefix("f:") {
                format!(".{f}")
            } else if let Some(k) = pe.strip_prefix("k:") {
                let m: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
                let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("[{}]", parts.join(","))
            } else if let Some(v) = pe.strip_prefix("v:") {
                format!("[={v}]")
            } else {
                format!("[{}]", pe.trim_start_matches("i:"))
            }
        })
        .collect()
}

fn conflict_error(mut conflicts: Vec<(ManagedEntry, FieldSet)>) -> ApiError {
    conflicts.sort_by(|(a, _), (b, _)| {
        (&a.manager, a.operation, &a.subresource).cmp(&(&b.manager, b.operation, &b.subresource))
    });
    let all: Vec<(String, String)> = conflicts
        .iter()
        .flat_map(|(e, set)| set.paths().into_iter().map(|p| (e.describe(), path_string(&p))))
        .collect();
    let message = match all.as_slice() {
        [(who, path)] => format!("Apply failed with 1 conflict: conflict with {who}: {path}"),
        _ => {
            let mut lines = Vec::new();
            for (i, (who, path)) in all.iter().enumerate() {
                if i == 0 || all[i - 1].0 != *who {
                    lines.push(format!("conflict with {who}:"));
                }
                lines.push(format!("- {path}"));
            }
            format!("Apply failed with {} conflicts: {}", all.len(), lines.join("\n"))
        }
    };
    let causes: Vec<Value> = all
        .iter()
        .map(|(who, path)| json!({"reason": "FieldManagerConflict", "message": format!("conflict with {who}"), "field": path}))
        .collect();
    ApiError::new(409, "Conflict", message).with_details(json!({"causes": causes}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gadget_type() -> ResourceType {
        let crd = json!({"spec": {"group": "g.io", "names": {"kind": "Gadget", "plural": "gadgets"}, "scope": "Namespaced",
            "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {"a": {"type": "string"}, "m": {"type": "object",
                        "additionalProperties": {"type": "string"}}}},
                    "status": {"type": "object", "properties": {"state": {"type": "string"}, "extra": {"type": "string"},
                        "conditions": {"type": "array", "x-kubernetes-list-type": "map",
                            "x-kubernetes-list-map-keys": ["type"], "items": {"type": "object", "properties": {
                                "type": {"type": "string"}, "status": {"type": "string"}}}}}}}}}}]}});
        ResourceType::from_crd(&crd).unwrap()
    }

    fn fields(obj: &Value, i: usize) -> Value {
        obj["metadata"]["managedFields"][i]["fieldsV1"].clone()
    }

    fn update(rt: &ResourceType, old: Option<&Value>, new: &mut Value, manager: &str, sub: Sub) {
        let w = Writer { manager, sub, apply: None, sent: None };
        record(rt, "v1", old, new, &w).unwrap();
    }

    fn apply(rt: &ResourceType, old: &Value, config: &Value, manager: &str, force: bool) -> Result<Value, ApiError> {
        let set = applied_fields(rt, "v1", Sub::Status, config);
        let mut doc = old.clone();
        crate::patch::apply(&mut doc, config, Typed::of(rt, "v1"));
        prune_dropped(rt, "v1", Sub::Status, old, &mut doc, manager, &set);
        let w = Writer { manager, sub: Sub::Status, apply: Some((&set, force)), sent: None };
        record(rt, "v1", Some(old), &mut doc, &w).map(|_| doc)
    }

    #[test]
    fn updates_own_what_they_add_or_change() {
        let rt = gadget_type();
        let mut created = json!({"apiVersion": "g.io/v1", "kind": "Gadget",
            "metadata": {"name": "x", "uid": "u", "labels": {"l": "1"}}, "spec": {"a": "1", "m": {"k": "v"}}});
        update(&rt, None, &mut created, "creator", Sub::Main);
        assert_eq!(
            fields(&created, 0),
            json!({"f:metadata": {"f:labels": {".": {}, "f:l": {}}},
                "f:spec": {".": {}, "f:a": {}, "f:m": {".": {}, "f:k": {}}}})
        );
        let mut changed = created.clone();
        changed["spec"]["a"] = json!("2");
        changed["metadata"].as_object_mut().unwrap().remove("labels");
        update(&rt, Some(&created), &mut changed, "other", Sub::Main);
        assert_eq!(fields(&changed, 0), json!({"f:spec": {".": {}, "f:m": {".": {}, "f:k": {}}}}));
        assert_eq!(changed["metadata"]["managedFields"][1]["manager"], "other");
        assert_eq!(fields(&changed, 1), json!({"f:spec": {"f:a": {}}}));
        let roundtrip = FieldSet::from_fields_v1(&fields(&changed, 0)).unwrap();
        assert_eq!(roundtrip.to_fields_v1(), fields(&changed, 0));
    }

    #[test]
    fn apply_conflicts_force_and_drops_its_own_omitted_fields() {
        let rt = gadget_type();
        let mut obj = json!({"apiVersion": "g.io/v1", "kind": "Gadget", "metadata": {"name": "x"}, "spec": {"a": "1"}});
        update(&rt, None, &mut obj, "creator", Sub::Main);
        let mut with_status = obj.clone();
        with_status["status"] = json!({"state": "A", "extra": "e"});
        update(&rt, Some(&obj), &mut with_status, "patcher", Sub::Status);
        let config = |state: &str, conds: Value| {
            json!({"apiVersion": "g.io/v1", "kind": "Gadget", "metadata": {"name": "x"},
                "status": {"state": state, "conditions": conds}})
        };
        let first = config("B", json!([{"type": "Ready", "status": "True"}, {"type": "X", "status": "True"}]));
        let err = apply(&rt, &with_status, &first, "ctl", false).unwrap_err();
        assert_eq!(err.code, 409);
        assert_eq!(
            err.message,
            "Apply failed with 1 conflict: conflict with \"patcher\" with subresource \"status\" using g.io/v1: .status.state"
        );
        let applied = apply(&rt, &with_status, &first, "ctl", true).unwrap();
        assert_eq!(applied["metadata"]["managedFields"][0]["manager"], "ctl");
        assert_eq!(
            fields(&applied, 0),
            json!({"f:status": {"f:conditions": {
                "k:{\"type\":\"Ready\"}": {".": {}, "f:status": {}, "f:type": {}},
                "k:{\"type\":\"X\"}": {".": {}, "f:status": {}, "f:type": {}}}, "f:state": {}}})
        );
        let second = config("C", json!([{"type": "Ready", "status": "False"}]));
        let again = apply(&rt, &applied, &second, "ctl", false).unwrap();
        assert_eq!(
            again["status"],
            json!({"state": "C", "extra": "e", "conditions": [{"type": "Ready", "status": "False"}]}),
            "its omitted condition dropped, the other manager's field kept"
        );
        let noop = apply(&rt, &again, &second, "ctl", false).unwrap();
        assert_eq!(noop, again);
    }
}
