//! Label and field selectors for list and watch.

use serde_json::Value;

use crate::error::ApiError;

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Exists,
    NotExists,
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Gt(i64),
    Lt(i64),
}

#[derive(Clone, Debug, PartialEq)]
struct Requirement {
    key: String,
    op: Op,
}

/// A parsed `labelSelector` (all requirements must hold).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector {
    reqs: Vec<Requirement>,
}

/// Split on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                cur.push(c)
            }
            ')' => {
                depth -= 1;
                cur.push(c)
            }
            ',' if depth == 0 => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

fn parse_set(s: &str) -> Option<Vec<String>> {
    let s = s.trim();
    let inner = s.strip_prefix('(')?.strip_suffix(')')?;
    Some(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let bad = || ApiError::bad_request(format!("unable to parse requirement: invalid label selector: {s:?}"));
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let req = if let Some(k) = part.strip_prefix('!') {
                Requirement { key: k.trim().into(), op: Op::NotExists }
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement { key: k.trim().into(), op: Op::NotEq(v.trim().into()) }
            } else if let Some((k, v)) = part.split_once("==") {
                Requirement { key: k.trim().into(), op: Op::Eq(v.trim().into()) }
            } else if let Some((k, v)) = part.split_once('=') {
                Requirement { key: k.trim().into(), op: Op::Eq(v.trim().into()) }
            } else if let Some((k, v)) = part.split_once(" notin ") {
                Requirement { key: k.trim().into(), op: Op::NotIn(parse_set(v).ok_or_else(bad)?) }
            } else if let Some((k, v)) = part.split_once(" in ") {
                Requirement { key: k.trim().into(), op: Op::In(parse_set(v).ok_or_else(bad)?) }
            } else if let Some((k, v)) = part.split_once('>') {
                Requirement { key: k.trim().into(), op: Op::Gt(v.trim().parse().map_err(|_| bad())?) }
            } else if let Some((k, v)) = part.split_once('<') {
                Requirement { key: k.trim().into(), op: Op::Lt(v.trim().parse().map_err(|_| bad())?) }
            } else {
                if part.contains(' ') || part.contains('(') {
                    return Err(bad());
                }
                Requirement { key: part.clone(), op: Op::Exists }
            };
            if req.key.is_empty() {
                return Err(bad());
            }
            reqs.push(req);
        }
        Ok(LabelSelector { reqs })
    }

    /// Does the object's `metadata.labels` satisfy the selector?
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.reqs.iter().all(|r| match &r.op {
            Op::Exists => get(&r.key).is_some(),
            Op::NotExists => get(&r.key).is_none(),
            Op::Eq(v) => get(&r.key) == Some(v.as_str()),
            Op::NotEq(v) => get(&r.key) != Some(v.as_str()),
            Op::In(vs) => get(&r.key).is_some_and(|x| vs.iter().any(|v| v == x)),
            Op::NotIn(vs) => get(&r.key).is_none_or(|x| !vs.iter().any(|v| v == x)),
            Op::Gt(n) => get(&r.key).and_then(|x| x.parse::<i64>().ok()).is_some_and(|x| x > *n),
            Op::Lt(n) => get(&r.key).and_then(|x| x.parse::<i64>().ok()).is_some_and(|x| x < *n),
        })
    }
}

/// A parsed `fieldSelector`: `path=value`, `path==value`, `path!=value`.
/// Any dotted path into the served object is accepted (kube allows only a
/// per-type list, e.g. `metadata.name`, `involvedObject.uid`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector {
    reqs: Vec<(String, bool, String)>,
}

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let (k, eq, v) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, true, v)
            } else {
                return Err(ApiError::bad_request(format!("invalid selector: '{s}'; can't understand '{part}'")));
            };
            reqs.push((k.trim().to_string(), eq, v.trim().to_string()));
        }
        Ok(FieldSelector { reqs })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs.iter().all(|(k, eq, v)| {
            let mut cur = Some(obj);
            for seg in k.split('.') {
                cur = cur.and_then(|c| c.get(seg));
            }
            let actual = match cur {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (actual == *v) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selector_ops() {
        let o = json!({"metadata": {"labels": {"a": "b", "tier": "x", "n": "5"}}});
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(m("a=b"));
        assert!(m("a==b"));
        assert!(!m("a!=b"));
        assert!(m("a"));
        assert!(!m("!a"));
        assert!(m("!zz"));
        assert!(m("tier in (x,y)"));
        assert!(!m("tier notin (x)"));
        assert!(m("zz notin (x)"));
        assert!(m("a=b,tier in (x, y),n>4"));
        assert!(!m("a=b,tier in (y)"));
        assert!(m(""));
    }

    #[test]
    fn field_selector_paths() {
        let o = json!({"metadata": {"name": "x", "namespace": "ns"}, "involvedObject": {"uid": "u1"}});
        let m = |s: &str| FieldSelector::parse(s).unwrap().matches(&o);
        assert!(m("metadata.name=x"));
        assert!(m("metadata.name=x,involvedObject.uid=u1"));
        assert!(!m("metadata.namespace!=ns"));
        assert!(m("involvedObject.kind="));
    }
}
