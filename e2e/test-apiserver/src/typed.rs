//! The typed view of objects that server-side apply and managedFields need
//! (what kube's structured-merge-diff reads from OpenAPI): which keys of a map
//! are declared fields, which lists are sets or maps keyed by some of their
//! items' fields, which maps are atomic. Custom resources use their CRD
//! version's schema; built-in kinds the small schemas below (only what
//! changes the answer: object-valued fields, list types, atomic structs).
//! Anything without a schema is "deduced", as kube does: maps by key, lists
//! atomic.

use std::sync::LazyLock;

use serde_json::{Value, json};

use crate::resources::{Builtin, ResourceType};

/// A position in a type: a schema node, or none (deduced).
#[derive(Clone, Copy, Debug)]
pub struct Typed<'a> {
    schema: Option<&'a Value>,
    /// The object's top level, where `metadata` is always ObjectMeta.
    root: bool,
}

/// How a list merges and is owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListKind {
    Atomic,
    /// `x-kubernetes-list-type: set`: items are their own keys.
    Set,
    /// `x-kubernetes-list-type: map`, keyed by these fields of the items.
    Map(Vec<String>),
}

const DEDUCED: Typed<'static> = Typed { schema: None, root: false };

impl<'a> Typed<'a> {
    /// The top level of `rt`'s objects at `version`.
    pub fn of(rt: &'a ResourceType, version: &str) -> Typed<'a> {
        let schema = match rt.builtin {
            Builtin::Custom => rt.version(version).unwrap_or_else(|| rt.preferred_version()).schema.as_ref(),
            b => builtin_schema(b),
        };
        Typed { schema, root: true }
    }

    /// The type of `key`'s value, and whether `key` is a declared field
    /// (a struct member) rather than a key of a map.
    pub fn field(&self, key: &str) -> (Typed<'a>, bool) {
        if self.root && key == "metadata" {
            return (Typed { schema: Some(&OBJECT_META), root: false }, true);
        }
        let Some(s) = self.schema else {
            return (DEDUCED, false);
        };
        if let Some(p) = s.get("properties").and_then(|p| p.get(key)) {
            return (Typed { schema: Some(p), root: false }, true);
        }
        match s.get("additionalProperties").filter(|a| a.is_object()) {
            Some(a) => (Typed { schema: Some(a), root: false }, false),
            None => (DEDUCED, false),
        }
    }

    /// The type of a list's items.
    pub fn items(&self) -> Typed<'a> {
        match self.schema.and_then(|s| s.get("items")) {
            Some(i) => Typed { schema: Some(i), root: false },
            None => DEDUCED,
        }
    }

    pub fn list_kind(&self) -> ListKind {
        let Some(s) = self.schema else {
            return ListKind::Atomic;
        };
        match s.get("x-kubernetes-list-type").and_then(Value::as_str) {
            Some("set") => ListKind::Set,
            Some("map") => {
                let keys: Vec<String> = s
                    .get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(|k| k.as_str().map(String::from)).collect())
                    .unwrap_or_default();
                if keys.is_empty() { ListKind::Atomic } else { ListKind::Map(keys) }
            }
            _ => ListKind::Atomic,
        }
    }

    /// `x-kubernetes-map-type: atomic` (or a `+structType=atomic` built-in).
    pub fn atomic_map(&self) -> bool {
        self.schema.and_then(|s| s.get("x-kubernetes-map-type")).and_then(Value::as_str) == Some("atomic")
    }
}

/// The Go zero value of a built-in kind as it serializes (struct-typed
/// fields are present, empty): what a create is compared against, so that
/// only fields a create adds get FieldsV1's "." (the field itself owned).
pub fn zero_object(builtin: Builtin) -> Value {
    match builtin {
        Builtin::Namespace => json!({"spec": {}, "status": {}}),
        Builtin::Lease => json!({"spec": {}}),
        Builtin::Event | Builtin::CoreEvent => json!({"regarding": {}, "deprecatedSource": {}}),
        Builtin::Crd => json!({"spec": {"names": {}}, "status": {"acceptedNames": {}}}),
        Builtin::Secret | Builtin::ConfigMap | Builtin::Custom => json!({}),
    }
}

fn string_map() -> Value {
    json!({"type": "object", "additionalProperties": {"type": "string"}})
}

fn conditions() -> Value {
    json!({"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"],
        "items": {"type": "object", "properties": {}}})
}

static OBJECT_META: LazyLock<Value> = LazyLock::new(|| {
    json!({"type": "object", "properties": {
        "labels": string_map(),
        "annotations": string_map(),
        "finalizers": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["uid"],
            "items": {"type": "object", "x-kubernetes-map-type": "atomic"}}
    }})
});

static NAMESPACE: LazyLock<Value> = LazyLock::new(|| {
    json!({"type": "object", "properties": {
        "spec": {"type": "object", "properties": {"finalizers": {"type": "array"}}},
        "status": {"type": "object", "properties": {"conditions": conditions()}}
    }})
});

static SECRET: LazyLock<Value> =
    LazyLock::new(|| json!({"type": "object", "properties": {"data": string_map(), "stringData": string_map()}}));

static CONFIG_MAP: LazyLock<Value> =
    LazyLock::new(|| json!({"type": "object", "properties": {"data": string_map(), "binaryData": string_map()}}));

static EVENT: LazyLock<Value> = LazyLock::new(|| {
    let reference = json!({"type": "object", "x-kubernetes-map-type": "atomic"});
    json!({"type": "object", "properties": {
        "regarding": reference, "related": reference,
        "series": {"type": "object", "properties": {}},
        "deprecatedSource": {"type": "object", "properties": {}}
    }})
});

static LEASE: LazyLock<Value> =
    LazyLock::new(|| json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {}}}}));

static CRD: LazyLock<Value> = LazyLock::new(|| {
    let names = json!({"type": "object", "properties": {}});
    json!({"type": "object", "properties": {
        "spec": {"type": "object", "properties": {
            "names": names,
            "conversion": {"type": "object", "properties": {"webhook": {"type": "object", "properties": {
                "clientConfig": {"type": "object", "properties": {"service": {"type": "object", "properties": {}}}}}}}}
        }},
        "status": {"type": "object", "properties": {"acceptedNames": names, "conditions": conditions()}}
    }})
});

fn builtin_schema(b: Builtin) -> Option<&'static Value> {
    Some(match b {
        Builtin::Namespace => &NAMESPACE,
        Builtin::Secret => &SECRET,
        Builtin::ConfigMap => &CONFIG_MAP,
        Builtin::Event | Builtin::CoreEvent => &EVENT,
        Builtin::Lease => &LEASE,
        Builtin::Crd => &CRD,
        Builtin::Custom => return None,
    })
}
