//! Admission-time checks: structural-schema pruning, defaulting and
//! validation of custom resources (incl. CEL `x-kubernetes-validations` via
//! `kube-cel`), CRD validation, and the few built-in type validations the
//! traces show (Secret types, `events.k8s.io` Event fields).

use std::cell::RefCell;

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::error::{ApiError, Cause, render_value};
use crate::resources::{Builtin, ResourceType};

thread_local! {
    // Registering every CEL function is costly; one validator per thread.
    static VALIDATOR: RefCell<kube_cel::Validator> = RefCell::new(kube_cel::Validator::new());
}

fn join(path: &str, seg: &str) -> String {
    if path.is_empty() { seg.to_string() } else { format!("{path}.{seg}") }
}

fn schema_type(schema: &Value) -> &str {
    schema.get("type").and_then(Value::as_str).unwrap_or("")
}

fn bool_of(schema: &Value, key: &str) -> bool {
    schema.get(key).and_then(Value::as_bool) == Some(true)
}

/// Drop fields the structural schema does not know, and `null`s where the
/// schema is not `nullable` (what kube does before defaulting).
pub fn prune(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let preserve = bool_of(schema, "x-kubernetes-preserve-unknown-fields");
            let embedded = bool_of(schema, "x-kubernetes-embedded-resource");
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                if embedded && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let child_schema = props.and_then(|p| p.get(&k)).or(additional);
                match child_schema {
                    Some(cs) => {
                        let v = map.get_mut(&k).expect("key listed");
                        if v.is_null() && !bool_of(cs, "nullable") {
                            map.remove(&k);
                        } else {
                            prune(cs, v);
                        }
                    }
                    None if preserve => {}
                    None if schema.get("additionalProperties") == Some(&Value::Bool(true)) => {}
                    None => {
                        map.remove(&k);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = schema.get("items") {
                for it in items.iter_mut() {
                    prune(is, it);
                }
            }
        }
        _ => {}
    }
}

/// Prune and default a whole object; its apiVersion, kind and metadata are
/// not governed by the schema.
pub fn prune_and_default(schema: &Value, obj: &mut Value) {
    let keep: Vec<(String, Value)> = ["apiVersion", "kind", "metadata"]
        .iter()
        .filter_map(|k| obj.as_object_mut()?.remove(*k).map(|v| (k.to_string(), v)))
        .collect();
    prune(schema, obj);
    apply_defaults(schema, obj);
    if let Some(m) = obj.as_object_mut() {
        let rest = std::mem::take(m);
        m.extend(keep);
        m.extend(rest);
    }
}

/// Fill in `default`s for missing properties, top-down.
pub fn apply_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, ps) in props {
                    if !map.contains_key(k)
                        && let Some(d) = ps.get("default")
                    {
                        map.insert(k.clone(), d.clone());
                    }
                    if let Some(v) = map.get_mut(k) {
                        apply_defaults(ps, v);
                    }
                }
            }
            if let Some(ap) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                let known = schema.get("properties").and_then(Value::as_object);
                for (k, v) in map.iter_mut() {
                    if known.is_none_or(|p| !p.contains_key(k)) {
                        apply_defaults(ap, v);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = schema.get("items") {
                for it in items.iter_mut() {
                    apply_defaults(is, it);
                }
            }
        }
        _ => {}
    }
}

fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_ok(ty: &str, v: &Value, int_or_string: bool) -> bool {
    if int_or_string {
        return v.is_string() || v.is_i64() || v.is_u64();
    }
    match ty {
        "" => true,
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "number" => v.is_number(),
        _ => true,
    }
}

fn format_ok(format: &str, s: &str) -> bool {
    match format {
        "date-time" => s.parse::<jiff::Timestamp>().is_ok(),
        "date" => s.parse::<jiff::civil::Date>().is_ok(),
        "uuid" => {
            let b = s.as_bytes();
            s.len() == 36
                && b.iter()
                    .enumerate()
                    .all(|(i, c)| if [8, 13, 18, 23].contains(&i) { *c == b'-' } else { c.is_ascii_hexdigit() })
        }
        "byte" => base64::engine::general_purpose::STANDARD.decode(s).is_ok(),
        _ => true,
    }
}

/// OpenAPI v3 value validation (the subset listed in the crate docs).
pub fn validate_schema(schema: &Value, v: &Value, path: &str, errs: &mut Vec<Cause>) {
    let ty = schema_type(schema);
    let ios = bool_of(schema, "x-kubernetes-int-or-string");
    if v.is_null() {
        if !bool_of(schema, "nullable") && !ty.is_empty() {
            errs.push(Cause::type_invalid(
                path,
                &Value::String("null".into()),
                &format!("{path} in body must be of type {ty}: \"null\""),
            ));
        }
        return;
    }
    if !type_ok(ty, v, ios) {
        let actual = json_type_name(v);
        errs.push(Cause::type_invalid(
            path,
            &Value::String(actual.into()),
            &format!("{path} in body must be of type {ty}: \"{actual}\""),
        ));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        errs.push(Cause::not_supported(path, v, allowed));
    }
    if let Some(n) = v.as_f64() {
        let rendered = render_value(v);
        let num = |k: &str| schema.get(k).and_then(Value::as_f64);
        let show = |k: &str| schema.get(k).map(|x| x.to_string()).unwrap_or_default();
        if let Some(min) = num("minimum") {
            let excl = bool_of(schema, "exclusiveMinimum");
            if (excl && n <= min) || (!excl && n < min) {
                let rel = if excl { "greater than" } else { "greater than or equal to" };
                errs.push(Cause::invalid(
                    path,
                    Some(rendered.clone()),
                    &format!("{path} in body should be {rel} {}", show("minimum")),
                ));
            }
        }
        if let Some(max) = num("maximum") {
            let excl = bool_of(schema, "exclusiveMaximum");
            if (excl && n >= max) || (!excl && n > max) {
                let rel = if excl { "less than" } else { "less than or equal to" };
                errs.push(Cause::invalid(
                    path,
                    Some(rendered.clone()),
                    &format!("{path} in body should be {rel} {}", show("maximum")),
                ));
            }
        }
        if let Some(m) = num("multipleOf")
            && m != 0.0
            && (n / m).fract() != 0.0
        {
            errs.push(Cause::invalid(
                path,
                Some(rendered),
                &format!("{path} in body should be a multiple of {}", show("multipleOf")),
            ));
        }
    }
    if let Some(s) = v.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && len < min
        {
            errs.push(Cause::invalid(
                path,
                Some(render_value(v)),
                &format!("{path} in body should be at least {min} chars long"),
            ));
        }
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && len > max
        {
            errs.push(Cause::too_long(path, max));
        }
        if let Some(p) = schema.get("pattern").and_then(Value::as_str)
            && let Some(re) = compiled(p)
            && !re.is_match(s)
        {
            errs.push(Cause::invalid(path, Some(render_value(v)), &format!("{path} in body should match '{p}'")));
        }
        if let Some(f) = schema.get("format").and_then(Value::as_str)
            && !format_ok(f, s)
        {
            errs.push(Cause::invalid(
                path,
                Some(render_value(v)),
                &format!("{path} in body must be of type {f}: {}", render_value(v)),
            ));
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
            && n < min
        {
            errs.push(Cause::invalid(
                path,
                Some(render_value(v)),
                &format!("{path} in body should have at least {min} items"),
            ));
        }
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
            && n > max
        {
            errs.push(Cause::too_many(path, items.len(), max));
        }
        validate_list_type(schema, items, path, errs);
        if let Some(is) = schema.get("items") {
            for (i, it) in items.iter().enumerate() {
                validate_schema(is, it, &format!("{path}[{i}]"), errs);
            }
        }
    }
    if let Some(map) = v.as_object() {
        let n = map.len() as u64;
        if let Some(min) = schema.get("minProperties").and_then(Value::as_u64)
            && n < min
        {
            errs.push(Cause::invalid(
                path,
                Some(render_value(v)),
                &format!("{path} in body should have at least {min} properties"),
            ));
        }
        if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
            && n > max
        {
            errs.push(Cause::too_many(path, map.len(), max));
        }
        if let Some(req) = schema.get("required").and_then(Value::as_array) {
            for r in req.iter().filter_map(Value::as_str) {
                if !map.contains_key(r) {
                    errs.push(Cause::required(join(path, r), ""));
                }
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties").filter(|a| a.is_object());
        for (k, cv) in map {
            if path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            if let Some(ps) = props.and_then(|p| p.get(k)) {
                validate_schema(ps, cv, &join(path, k), errs);
            } else if let Some(ap) = additional {
                validate_schema(ap, cv, &format!("{path}[{k}]"), errs);
            }
        }
    }
    for junctor in ["allOf", "anyOf", "oneOf"] {
        if let Some(branches) = schema.get(junctor).and_then(Value::as_array) {
            let results: Vec<Vec<Cause>> = branches
                .iter()
                .map(|b| {
                    let mut e = Vec::new();
                    validate_schema(b, v, path, &mut e);
                    e
                })
                .collect();
            match junctor {
                "allOf" => results.into_iter().for_each(|e| errs.extend(e)),
                "anyOf" if !results.iter().any(Vec::is_empty) => errs.push(Cause::invalid(
                    path,
                    Some(render_value(v)),
                    &format!("{path} in body must be valid against any of the schemas"),
                )),
                "oneOf" if results.iter().filter(|e| e.is_empty()).count() != 1 => errs.push(Cause::invalid(
                    path,
                    Some(render_value(v)),
                    &format!("{path} in body must validate one and only one schema (oneOf)"),
                )),
                _ => {}
            }
        }
    }
}

/// `x-kubernetes-list-type: map|set` forbid duplicates.
fn validate_list_type(schema: &Value, items: &[Value], path: &str, errs: &mut Vec<Cause>) {
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("set") => {
            for (i, it) in items.iter().enumerate() {
                if items[..i].contains(it) {
                    errs.push(Cause {
                        reason: "FieldValueDuplicate",
                        message: format!("Duplicate value: {}", render_value(it)),
                        field: format!("{path}[{i}]"),
                    });
                }
            }
        }
        Some("map") => {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let key_of = |it: &Value| -> Vec<Value> {
                keys.iter().map(|k| it.get(*k).cloned().unwrap_or(Value::Null)).collect()
            };
            for (i, it) in items.iter().enumerate() {
                let k = key_of(it);
                if items[..i].iter().any(|o| key_of(o) == k) {
                    let shown: Vec<String> = keys.iter().zip(&k).map(|(n, v)| format!("{n:?}:{v}")).collect();
                    errs.push(Cause {
                        reason: "FieldValueDuplicate",
                        message: format!("Duplicate value: map[string]interface {{}}{{{}}}", shown.join(", ")),
                        field: format!("{path}[{i}]"),
                    });
                }
            }
        }
        _ => {}
    }
}

/// Prune, default and validate a custom resource against its CRD version's
/// schema, then run its CEL rules (with `oldSelf` on updates) unless a
/// blocking schema error was found first, like kube.
pub fn admit_custom(
    rt: &ResourceType,
    version: &str,
    obj: &mut Value,
    old: Option<&Value>,
    unknown_fields: &mut Vec<String>,
) -> Result<(), ApiError> {
    let vi = rt.version(version).unwrap_or_else(|| rt.preferred_version());
    let Some(schema) = vi.schema.as_ref() else {
        return Ok(());
    };
    collect_unknown(schema, obj, "", unknown_fields);
    prune_and_default(schema, obj);
    let mut errs = Vec::new();
    validate_schema(schema, obj, "", &mut errs);
    if errs.iter().any(Cause::blocks_cel) {
        errs.push(Cause::invalid(
            "<nil>",
            Some("null".into()),
            "some validation rules were not checked because the object was invalid; correct the existing errors to complete validation",
        ));
    } else if let Some(compiled) = vi.compiled.as_ref() {
        // CEL sees the object without metadata noise beyond name/namespace,
        // like kube (which exposes only metadata.name/generateName to rules).
        let strip = |o: &Value| {
            let mut o = o.clone();
            if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
                m.retain(|k, _| k == "name" || k == "generateName");
            }
            o
        };
        let cur = strip(obj);
        let old = old.map(strip);
        let res = VALIDATOR.with(|v| v.borrow().validate_compiled(compiled, &cur, old.as_ref()));
        if let Err(ces) = res {
            for ce in ces.iter() {
                let field = if ce.field_path.is_empty() { "<nil>".to_string() } else { ce.field_path.clone() };
                let cause = match ce.reason.as_deref() {
                    Some("FieldValueForbidden") => Cause::forbidden(field, &ce.message),
                    Some("FieldValueRequired") => Cause::required(field, &ce.message),
                    Some("FieldValueDuplicate") => Cause {
                        reason: "FieldValueDuplicate",
                        message: format!("Duplicate value: {}", ce.message),
                        field,
                    },
                    _ => Cause::invalid(field, None, &ce.message),
                };
                errs.push(cause);
            }
        }
    }
    if errs.is_empty() { Ok(()) } else { Err(ApiError::invalid_for(rt, &name_of(obj), errs)) }
}

/// Paths of fields pruning would drop (for `fieldValidation=Strict|Warn`).
fn collect_unknown(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let preserve = bool_of(schema, "x-kubernetes-preserve-unknown-fields")
                || schema.get("additionalProperties") == Some(&Value::Bool(true));
            for (k, v) in map {
                if (path.is_empty() || bool_of(schema, "x-kubernetes-embedded-resource"))
                    && matches!(k.as_str(), "apiVersion" | "kind" | "metadata")
                {
                    continue;
                }
                match props.and_then(|p| p.get(k)).or(additional) {
                    Some(cs) => collect_unknown(cs, v, &join(path, k), out),
                    None if preserve => {}
                    None => out.push(format!(".{}", join(path, k))),
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = schema.get("items") {
                for (i, it) in items.iter().enumerate() {
                    collect_unknown(is, it, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

pub fn name_of(obj: &Value) -> String {
    obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string()
}

/// Validate a CustomResourceDefinition: names and CEL rules that compile.
pub fn validate_crd(crd: &Value) -> Result<(), ApiError> {
    let name = name_of(crd);
    let inv = |causes| ApiError::invalid("apiextensions.k8s.io", "CustomResourceDefinition", &name, causes);
    let spec = crd.get("spec").cloned().unwrap_or(Value::Null);
    let s = |p: &str| spec.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
    let mut errs = Vec::new();
    let (group, plural, kind) = (s("/group"), s("/names/plural"), s("/names/kind"));
    if group.is_empty() {
        errs.push(Cause::required("spec.group", ""));
    }
    if plural.is_empty() {
        errs.push(Cause::required("spec.names.plural", ""));
    }
    if kind.is_empty() {
        errs.push(Cause::required("spec.names.kind", ""));
    }
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        errs.push(Cause::invalid(
            "metadata.name",
            Some(format!("{name:?}")),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    let versions = spec.get("versions").and_then(Value::as_array).cloned().unwrap_or_default();
    if versions.is_empty() {
        errs.push(Cause::required("spec.versions", "must have exactly one version marked as storage version"));
    } else if versions.iter().filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true)).count() != 1 {
        errs.push(Cause::invalid(
            "spec.versions",
            Some("[]apiextensions.CustomResourceDefinitionVersion{...}".into()),
            "must have exactly one version marked as storage version",
        ));
    }
    // Identical per-version schemas are reported under spec.validation, as
    // kube's internal (hoisted) representation does.
    let schemas: Vec<Option<&Value>> = versions.iter().map(|v| v.pointer("/schema/openAPIV3Schema")).collect();
    let all_same = schemas.windows(2).all(|w| w[0] == w[1]);
    for (i, sc) in schemas.iter().enumerate() {
        let Some(sc) = sc else { continue };
        let base = if all_same {
            "spec.validation.openAPIV3Schema".to_string()
        } else {
            format!("spec.versions[{i}].schema.openAPIV3Schema")
        };
        check_rules(sc, &base, &mut errs);
        if all_same {
            break;
        }
    }
    if errs.is_empty() { Ok(()) } else { Err(inv(errs)) }
}

/// Compile every `x-kubernetes-validations` rule of a schema tree.
fn check_rules(schema: &Value, path: &str, errs: &mut Vec<Cause>) {
    if let Some(rules) = schema.get("x-kubernetes-validations").and_then(Value::as_array) {
        for (i, r) in rules.iter().enumerate() {
            let rule = r.get("rule").and_then(Value::as_str).unwrap_or_default();
            let field = format!("{path}.x-kubernetes-validations[{i}].rule");
            let problem = match kube_cel::cel::Program::compile(rule) {
                Err(e) => Some(e.to_string()),
                Ok(_) => type_check(schema, rule),
            };
            if let Some(p) = problem {
                let s = |k: &str| match r.get(k) {
                    Some(Value::String(x)) => format!("{x:?}"),
                    Some(Value::Bool(b)) => b.to_string(),
                    _ => "null".into(),
                };
                let rendered = format!(
                    "{{\"Rule\":{},\"Message\":{},\"MessageExpression\":{},\"Reason\":{},\"FieldPath\":{},\"OptionalOldSelf\":{}}}",
                    serde_json::to_string(rule).unwrap_or_default(),
                    serde_json::to_string(r.get("message").and_then(Value::as_str).unwrap_or_default())
                        .unwrap_or_default(),
                    serde_json::to_string(r.get("messageExpression").and_then(Value::as_str).unwrap_or_default())
                        .unwrap_or_default(),
                    s("reason"),
                    serde_json::to_string(r.get("fieldPath").and_then(Value::as_str).unwrap_or_default())
                        .unwrap_or_default(),
                    s("optionalOldSelf"),
                );
                errs.push(Cause::invalid(field, Some(rendered), &format!("compilation failed: {p}")));
            }
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, ps) in props {
            check_rules(ps, &format!("{path}.properties[{k}]"), errs);
        }
    }
    if let Some(is) = schema.get("items") {
        check_rules(is, &format!("{path}.items"), errs);
    }
    if let Some(ap) = schema.get("additionalProperties").filter(|a| a.is_object()) {
        check_rules(ap, &format!("{path}.additionalProperties"), errs);
    }
}

/// kube type-checks CEL rules; kube-cel only parses them. Catch the common
/// mistake the trace shows: `size()` of a structured object (which has no
/// `size` overload, unlike maps, lists and strings).
fn type_check(schema: &Value, rule: &str) -> Option<String> {
    let structured_object = schema_type(schema) == "object"
        && schema.get("properties").is_some()
        && schema.get("additionalProperties").is_none();
    if !structured_object {
        return None;
    }
    let pos = rule.find("size(self)").map(|i| i + 4).or_else(|| rule.find("self.size()").map(|i| i + 9))?;
    Some(format!(
        "ERROR: <input>:1:{}: found no matching overload for 'size' applied to '(selfType0)'\n | {rule}\n | {}^",
        pos + 1,
        ".".repeat(pos)
    ))
}

/// Validation of built-in types on create and update.
pub fn admit_builtin(
    rt: &ResourceType,
    obj: &mut Value,
    old: Option<&Value>,
    via_events_api: bool,
) -> Result<(), ApiError> {
    match rt.builtin {
        Builtin::Secret => admit_secret(obj, old),
        Builtin::Event | Builtin::CoreEvent if via_events_api => admit_event(obj, old),
        _ => Ok(()),
    }
}

fn admit_secret(obj: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
    let name = name_of(obj);
    let map = obj.as_object_mut().expect("object");
    // stringData is write-only: merged into data (base64) and dropped.
    if let Some(Value::Object(sd)) = map.remove("stringData") {
        let data = map.entry("data").or_insert_with(|| Value::Object(Map::new()));
        if !data.is_object() {
            *data = Value::Object(Map::new());
        }
        let d = data.as_object_mut().expect("object");
        for (k, v) in sd {
            let s = v.as_str().unwrap_or_default();
            d.insert(k, Value::String(base64::engine::general_purpose::STANDARD.encode(s)));
        }
    }
    if map.get("data").is_some_and(|d| d.as_object().is_some_and(Map::is_empty)) {
        map.remove("data");
    }
    if map.get("type").and_then(Value::as_str).unwrap_or_default().is_empty() {
        map.insert("type".into(), Value::String("Opaque".into()));
    }
    let ty = map["type"].as_str().unwrap_or_default().to_string();
    let data = map.get("data").and_then(Value::as_object);
    if let Some(d) = data {
        for (k, v) in d {
            let ok = v.as_str().is_some_and(|s| base64::engine::general_purpose::STANDARD.decode(s).is_ok());
            if !ok {
                return Err(ApiError::bad_request(format!(
                    "Secret in version \"v1\" cannot be handled as a Secret: illegal base64 data at input byte 0 (key {k:?})"
                )));
            }
        }
    }
    let has = |k: &str| data.is_some_and(|d| d.contains_key(k));
    let mut errs = Vec::new();
    let required: &[&str] = match ty.as_str() {
        "kubernetes.io/ssh-auth" => &["ssh-privatekey"],
        "kubernetes.io/tls" => &["tls.crt", "tls.key"],
        "kubernetes.io/dockerconfigjson" => &[".dockerconfigjson"],
        "kubernetes.io/dockercfg" => &[".dockercfg"],
        _ => &[],
    };
    for k in required {
        if !has(k) {
            errs.push(Cause::required(format!("data[{k}]"), ""));
        }
    }
    if let Some(old) = old {
        let old_ty = old.get("type").and_then(Value::as_str).unwrap_or("Opaque");
        if old_ty != ty {
            errs.push(Cause::invalid("type", Some(format!("{ty:?}")), "field is immutable"));
        }
        if old.get("immutable").and_then(Value::as_bool) == Some(true) && old.get("data") != map.get("data") {
            errs.push(Cause::forbidden("data", "field is immutable when `immutable` is set"));
        }
    }
    if errs.is_empty() { Ok(()) } else { Err(ApiError::invalid("", "Secret", &name, errs)) }
}

/// `events.k8s.io/v1` validation (kube's `ValidateEventCreate/Update` subset).
fn admit_event(obj: &Value, old: Option<&Value>) -> Result<(), ApiError> {
    let name = name_of(obj);
    let s = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or_default();
    let mut errs = Vec::new();
    let ty = s("type");
    if ty != "Normal" && ty != "Warning" {
        errs.push(Cause::invalid("type", Some("\"\"".into()), &format!("has invalid value: {ty}")));
    }
    if old.is_none() {
        if obj.get("eventTime").is_none_or(Value::is_null) {
            errs.push(Cause::required("eventTime", ""));
        }
        for k in ["reportingController", "reportingInstance", "action", "reason"] {
            if s(k).is_empty() {
                errs.push(Cause::required(k, ""));
            }
        }
    }
    if s("note").len() > 1024 {
        errs.push(Cause::too_long("note", 1024));
    }
    if let Some(series) = obj.get("series").filter(|v| !v.is_null()) {
        if series.get("count").and_then(Value::as_i64).unwrap_or(0) < 2 {
            errs.push(Cause::invalid(
                "series.count",
                Some(series.get("count").map(render_value).unwrap_or("0".into())),
                "should be at least 2",
            ));
        }
        if series.get("lastObservedTime").is_none_or(Value::is_null) {
            errs.push(Cause::required("series.lastObservedTime", ""));
        }
    }
    if errs.is_empty() { Ok(()) } else { Err(ApiError::invalid("", "Event", &name, errs)) }
}

/// Names must be DNS subdomains (namespaces: DNS labels).
pub fn validate_name(rt: &ResourceType, name: &str) -> Result<(), ApiError> {
    let label = rt.builtin == Builtin::Namespace;
    let ok = if label {
        name.len() <= 63 && regex_ok(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", name)
    } else {
        name.len() <= 253 && regex_ok(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$", name)
    };
    // Events are named `<object>.<hex>` and kube accepts any path segment.
    if ok || matches!(rt.builtin, Builtin::Event | Builtin::CoreEvent) && !name.contains('/') {
        return Ok(());
    }
    let detail = if label {
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
    } else {
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
    };
    Err(ApiError::invalid_for(rt, name, vec![Cause::invalid("metadata.name", Some(format!("{name:?}")), detail)]))
}

fn regex_ok(re: &str, s: &str) -> bool {
    compiled(re).is_some_and(|r| r.is_match(s))
}

/// `pattern` compiled once per process (`None`: it does not compile): the patterns are
/// the few of the served schemas and names, and compiling one per request was a twentieth
/// of the server's time under load.
fn compiled(pattern: &str) -> Option<regex::Regex> {
    static CACHE: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, Option<regex::Regex>>>> =
        std::sync::LazyLock::new(Default::default);
    let mut cache = CACHE.lock().expect("not poisoned");
    cache.entry(pattern.to_string()).or_insert_with(|| regex::Regex::new(pattern).ok()).clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prunes_and_defaults() {
        let schema = json!({"type": "object", "properties": {
        "spec": {"type": "object", "properties": {
            "a": {"type": "string", "default": "x"},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            "m": {"type": "object", "additionalProperties": {"type": "integer"}}
        }}}});
        let mut v = json!({"apiVersion": "a/v1", "kind": "K", "metadata": {"name": "n"},
            "spec": {"bogus": 1, "free": {"anything": {"x": 1}}, "m": {"k": 1}}, "top": 2});
        prune_and_default(&schema, &mut v);
        assert_eq!(
            v,
            json!({"apiVersion": "a/v1", "kind": "K", "metadata": {"name": "n"},
            "spec": {"a": "x", "free": {"anything": {"x": 1}}, "m": {"k": 1}}})
        );
    }

    #[test]
    fn type_check_size_of_object() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        assert!(type_check(&schema, "size(self) == 1").is_some());
        assert!(type_check(&schema, "has(self.a)").is_none());
    }
}
