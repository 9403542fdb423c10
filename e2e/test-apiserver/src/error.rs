//! API errors rendered as `meta/v1 Status` bodies, with the messages and
//! reasons the real kube-apiserver uses (see `shared/apiserver-traces`).

use serde_json::{Map, Value, json};

use crate::resources::ResourceType;

/// One `details.causes[]` entry of an `Invalid` error (a Go `field.Error`).
#[derive(Clone, Debug, PartialEq)]
pub struct Cause {
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldValueNotSupported`, ...
    pub reason: &'static str,
    /// The message without the field prefix (what `field.Error.ErrorBody()` gives).
    pub message: String,
    /// Field path like `spec.powerState`, or `<nil>`.
    pub field: String,
}

impl Cause {
    pub fn required(field: impl Into<String>, detail: &str) -> Self {
        let message =
            if detail.is_empty() { "Required value".to_string() } else { format!("Required value: {detail}") };
        Cause { reason: "FieldValueRequired", message, field: field.into() }
    }

    /// `field.Invalid(path, value, detail)`; `value` is already rendered
    /// (`"abc"` quoted, numbers bare, `null`); `None` omits it like CEL errors do.
    pub fn invalid(field: impl Into<String>, value: Option<String>, detail: &str) -> Self {
        let message = match (value, detail.is_empty()) {
            (Some(v), true) => format!("Invalid value: {v}"),
            (Some(v), false) => format!("Invalid value: {v}: {detail}"),
            (None, _) => format!("Invalid value: {detail}"),
        };
        Cause { reason: "FieldValueInvalid", message, field: field.into() }
    }

    pub fn not_supported(field: impl Into<String>, value: &Value, allowed: &[Value]) -> Self {
        let allowed: Vec<String> = allowed.iter().map(render_value).collect();
        Cause {
            reason: "FieldValueNotSupported",
            message: format!("Unsupported value: {}: supported values: {}", render_value(value), allowed.join(", ")),
            field: field.into(),
        }
    }

    pub fn forbidden(field: impl Into<String>, detail: &str) -> Self {
        Cause { reason: "FieldValueForbidden", message: format!("Forbidden: {detail}"), field: field.into() }
    }

    pub fn too_long(field: impl Into<String>, max: u64) -> Self {
        Cause {
            reason: "FieldValueTooLong",
            message: format!("Too long: may not be more than {max} bytes"),
            field: field.into(),
        }
    }

    pub fn too_many(field: impl Into<String>, actual: usize, max: u64) -> Self {
        Cause {
            reason: "FieldValueTooMany",
            message: format!("Too many: {actual}: must have at most {max} items"),
            field: field.into(),
        }
    }

    pub fn type_invalid(field: impl Into<String>, value: &Value, detail: &str) -> Self {
        Cause {
            reason: "FieldValueTypeInvalid",
            message: format!("Invalid value: {}: {detail}", render_value(value)),
            field: field.into(),
        }
    }

    /// Errors of these kinds stop CEL rules from running (kube's `hasBlockingErr`).
    pub fn blocks_cel(&self) -> bool {
        matches!(
            self.reason,
            "FieldValueNotSupported"
                | "FieldValueRequired"
                | "FieldValueTooLong"
                | "FieldValueTooMany"
                | "FieldValueTypeInvalid"
        )
    }

    fn to_json(&self) -> Value {
        json!({"reason": self.reason, "message": self.message, "field": self.field})
    }
}

/// Render a JSON value the way Go's `field.Error` prints values.
pub fn render_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Array(_) => "\"array\"".into(),
        Value::Object(_) => "\"object\"".into(),
    }
}

/// An error answer: HTTP code plus the `Status` body.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

fn details(name: &str, group: &str, kind: &str) -> Map<String, Value> {
    let mut d = Map::new();
    if !name.is_empty() {
        d.insert("name".into(), name.into());
    }
    if !group.is_empty() {
        d.insert("group".into(), group.into());
    }
    if !kind.is_empty() {
        d.insert("kind".into(), kind.into());
    }
    d
}

impl ApiError {
    pub fn status_json(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s["code"] = self.code.into();
        s
    }

    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError { code, reason, message: message.into(), details: None }
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::not_found_gr(&rt.group, &rt.plural, name)
    }

    pub fn not_found_gr(group: &str, plural: &str, name: &str) -> Self {
        ApiError {
            code: 404,
            reason: "NotFound",
            message: format!("{} {name:?} not found", group_resource(group, plural)),
            details: Some(details(name, group, plural).into()),
        }
    }

    pub fn already_exists(rt: &ResourceType, name: &str) -> Self {
        ApiError {
            code: 409,
            reason: "AlreadyExists",
            message: format!("{} {name:?} already exists", rt.group_resource()),
            details: Some(details(name, &rt.group, &rt.plural).into()),
        }
    }

    pub fn conflict(rt: &ResourceType, name: &str) -> Self {
        ApiError {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                rt.group_resource()
            ),
            details: Some(details(name, &rt.group, &rt.plural).into()),
        }
    }

    pub fn conflict_msg(rt: &ResourceType, name: &str, msg: &str) -> Self {
        ApiError {
            code: 409,
            reason: "Conflict",
            message: format!("Operation cannot be fulfilled on {} {name:?}: {msg}", rt.group_resource()),
            details: Some(details(name, &rt.group, &rt.plural).into()),
        }
    }

    /// 422 Invalid for an object of kind `kind` in `group` (the `Kind.group "name"` prefix).
    pub fn invalid(group: &str, kind: &str, name: &str, causes: Vec<Cause>) -> Self {
        let qualified = if group.is_empty() { kind.to_string() } else { format!("{kind}.{group}") };
        // The top-level message lists each distinct cause once, like Go's ToAggregate.
        let mut seen: Vec<String> = Vec::new();
        for c in &causes {
            let s = format!("{}: {}", c.field, c.message);
            if !seen.contains(&s) {
                seen.push(s);
            }
        }
        let summary = if seen.len() == 1 { seen[0].clone() } else { format!("[{}]", seen.join(", ")) };
        let mut d = details(name, group, kind);
        d.insert("causes".into(), Value::Array(causes.iter().map(Cause::to_json).collect()));
        ApiError {
            code: 422,
            reason: "Invalid",
            message: format!("{qualified} {name:?} is invalid: {summary}"),
            details: Some(d.into()),
        }
    }

    pub fn invalid_for(rt: &ResourceType, name: &str, causes: Vec<Cause>) -> Self {
        Self::invalid(&rt.group, &rt.kind, name, causes)
    }

    pub fn forbidden(rt: &ResourceType, name: &str, msg: &str, causes: Vec<Value>) -> Self {
        let mut d = details(name, &rt.group, &rt.plural);
        if !causes.is_empty() {
            d.insert("causes".into(), Value::Array(causes));
        }
        ApiError {
            code: 403,
            reason: "Forbidden",
            message: format!("{} {name:?} is forbidden: {msg}", rt.group_resource()),
            details: Some(d.into()),
        }
    }

    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", msg)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
    }

    pub fn unsupported_media_type(ct: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml; got {ct}"
            ),
        )
    }

    /// What kube answers when a JSON patch's `test` op (or another op) fails.
    pub fn json_patch_failed() -> Self {
        ApiError {
            code: 422,
            reason: "Invalid",
            message: "the server rejected our request due to an error in our request".into(),
            details: Some(json!({})),
        }
    }

    pub fn expired(msg: impl Into<String>) -> Self {
        Self::new(410, "Expired", msg)
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(500, "InternalError", msg)
    }

    pub fn generic_not_found(path: &str) -> Self {
        let _ = path;
        Self::new(404, "NotFound", "the server could not find the requested resource").with_details(json!({}))
    }

    /// The same error about `to`'s objects rather than `from`'s (core/v1
    /// events are stored as events.k8s.io ones, but kube names what was asked for).
    pub fn about(mut self, from: &ResourceType, to: &ResourceType) -> Self {
        if from.group == to.group && from.plural == to.plural {
            return self;
        }
        let qualified =
            |t: &ResourceType| if t.group.is_empty() { t.kind.clone() } else { format!("{}.{}", t.kind, t.group) };
        for (f, t) in [(from.group_resource(), to.group_resource()), (qualified(from), qualified(to))] {
            if let Some(rest) = self.message.strip_prefix(&format!("{f} ")) {
                self.message = format!("{t} {rest}");
                break;
            }
        }
        if let Some(d) = self.details.as_mut().and_then(Value::as_object_mut)
            && d.get("group").and_then(Value::as_str) == Some(from.group.as_str())
        {
            match to.group.as_str() {
                "" => d.remove("group"),
                g => d.insert("group".into(), g.into()),
            };
        }
        self
    }

    pub fn with_details(mut self, d: Value) -> Self {
        self.details = Some(d);
        self
    }
}

/// `gadgets.traces.machinist.dev` or `secrets` for the core group.
pub fn group_resource(group: &str, plural: &str) -> String {
    if group.is_empty() { plural.to_string() } else { format!("{plural}.{group}") }
}
