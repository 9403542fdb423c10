//! Discovery (`/version`, `/api`, `/apis`, `/apis/<g>/<v>`; the legacy,
//! unaggregated format) and OpenAPI v3 documents just rich enough for
//! kubectl: each PATCH operation advertises `fieldValidation` (so kubectl
//! validates server-side) and CRD kinds carry their schemas.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::resources::{Builtin, ResourceType};

pub const GIT_VERSION: &str = "v1.33.0";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "emulationMajor": "1",
        "emulationMinor": "33",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "32",
        "gitVersion": GIT_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

pub fn core_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
}

/// group -> versions (preferred first), over all served non-core types.
fn groups(types: &[Arc<ResourceType>]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for rt in types.iter().filter(|t| !t.group.is_empty()) {
        let vs = out.entry(rt.group.clone()).or_default();
        for v in &rt.versions {
            if !vs.contains(&v.name) {
                vs.push(v.name.clone());
            }
        }
    }
    out
}

fn group_json(name: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> =
        versions.iter().map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v})).collect();
    json!({"name": name, "versions": vs, "preferredVersion": vs[0].clone()})
}

pub fn group_list(types: &[Arc<ResourceType>]) -> Value {
    let gs: Vec<Value> = groups(types).iter().map(|(g, vs)| group_json(g, vs)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": gs})
}

pub fn group(types: &[Arc<ResourceType>], name: &str) -> Option<Value> {
    let gs = groups(types);
    let vs = gs.get(name)?;
    let mut g = group_json(name, vs);
    g["kind"] = "APIGroup".into();
    g["apiVersion"] = "v1".into();
    Some(g)
}

const VERBS: &[&str] = &["delete", "deletecollection", "get", "list", "patch", "create", "update", "watch"];

/// `APIResourceList` of a group/version (None if nothing is served there).
pub fn resource_list(types: &[Arc<ResourceType>], group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for rt in types.iter().filter(|t| t.group == group && t.version(version).is_some()) {
        let mut r = json!({
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": VERBS,
        });
        if !rt.short_names.is_empty() {
            r["shortNames"] = json!(rt.short_names);
        }
        if !rt.categories.is_empty() {
            r["categories"] = json!(rt.categories);
        }
        resources.push(r);
        if rt.version(version).is_some_and(|v| v.has_status) {
            resources.push(json!({
                "name": format!("{}/status", rt.plural),
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if rt.builtin == Builtin::Namespace {
            resources.push(json!({"name": "namespaces/finalize", "singularName": "",
                "namespaced": false, "kind": "Namespace", "verbs": ["update"]}));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}))
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() { format!("api/{version}") } else { format!("apis/{group}/{version}") }
}

/// `/openapi/v3`: one entry per served group/version.
pub fn openapi_v3_root(types: &[Arc<ResourceType>], hash: u64) -> Value {
    let mut paths = serde_json::Map::new();
    for rt in types {
        for v in &rt.versions {
            let p = gv_path(&rt.group, &v.name);
            paths.insert(p.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={hash:016X}")}));
        }
    }
    json!({"paths": paths})
}

/// Reverse-DNS schema name, as kube names definitions.
fn definition_name(rt: &ResourceType, version: &str) -> String {
    let group = if rt.group.is_empty() {
        "io.k8s.api.core".to_string()
    } else {
        rt.group.split('.').rev().collect::<Vec<_>>().join(".")
    };
    format!("{group}.{version}.{}", rt.kind)
}

/// `/openapi/v3/<gv>`: operations per resource and the CRD schemas.
pub fn openapi_v3_gv(types: &[Arc<ResourceType>], gv: &str) -> Option<Value> {
    let (group, version) = match gv.strip_prefix("api/") {
        Some(v) => (String::new(), v.to_string()),
        None => {
            let rest = gv.strip_prefix("apis/")?;
            let (g, v) = rest.split_once('/')?;
            (g.to_string(), v.to_string())
        }
    };
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    let mut found = false;
    for rt in types.iter().filter(|t| t.group == group && t.version(&version).is_some()) {
        found = true;
        let gvk = json!({"group": rt.group, "version": version, "kind": rt.kind});
        let def = definition_name(rt, &version);
        let body_ref =
            json!({"content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{def}")}}}});
        let param = |n: &str| json!({"name": n, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
        let op = |action: &str| {
            json!({
                "operationId": format!("{action}{}", rt.kind),
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
                "parameters": [param("dryRun"), param("fieldManager"), param("fieldValidation")],
                "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{def}")}}}}}
            })
        };
        let base =
            if rt.group.is_empty() { format!("/api/{version}") } else { format!("/apis/{}/{version}", rt.group) };
        let coll = if rt.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}", rt.plural)
        } else {
            format!("{base}/{}", rt.plural)
        };
        let mut post = op("post");
        post["requestBody"] = body_ref.clone();
        let mut put = op("put");
        put["requestBody"] = body_ref.clone();
        let mut patch = op("patch");
        // No strategic-merge-patch+json here: kubectl would then compute
        // strategic patches from these (schema-less) documents; without it,
        // it uses merge patches for custom resources and its compiled-in
        // types for built-in ones, as with a real server's CRDs.
        patch["requestBody"] = json!({"content": {
            "application/json-patch+json": {"schema": {"type": "object"}},
            "application/merge-patch+json": {"schema": {"type": "object"}},
            "application/apply-patch+yaml": {"schema": {"type": "object"}}}});
        patch["parameters"].as_array_mut().expect("array").push(param("force"));
        paths.insert(coll.clone(), json!({"get": op("list"), "post": post}));
        paths.insert(
            format!("{coll}/{{name}}"),
            json!({"get": op("get"), "put": put, "patch": patch, "delete": op("delete")}),
        );
        if rt.version(&version).is_some_and(|v| v.has_status) {
            let mut sp = op("patch");
            sp["parameters"].as_array_mut().expect("array").push(param("force"));
            paths.insert(format!("{coll}/{{name}}/status"), json!({"get": op("get"), "put": op("put"), "patch": sp}));
        }
        // Built-in kinds get no schema: kubectl then falls back to its
        // compiled-in types (e.g. for strategic merge patches).
        let Some(mut schema) = rt.version(&version).and_then(|v| v.schema.clone()) else {
            continue;
        };
        if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
            props.insert("apiVersion".into(), json!({"type": "string"}));
            props.insert("kind".into(), json!({"type": "string"}));
            props.insert("metadata".into(), json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
        }
        schema["x-kubernetes-group-version-kind"] = json!([gvk]);
        schemas.insert(def, schema);
    }
    if !found {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": paths,
        "components": {"schemas": schemas}
    }))
}
