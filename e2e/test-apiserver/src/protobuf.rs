//! Just enough of Kubernetes' protobuf encoding to read the bodies kubectl
//! sends for built-in types (`kubectl create namespace|secret|configmap`
//! post `application/vnd.kubernetes.protobuf`): the `k8s\0` envelope, then
//! the object decoded to JSON with per-kind field tables. Responses stay
//! JSON (clients accept it).

use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::error::ApiError;

/// Field kinds of the tables below.
#[derive(Clone, Copy)]
enum F {
    Str,
    Int,
    Bool,
    /// `bytes` (base64 in JSON).
    Bytes,
    Time,
    StrList,
    StrMap,
    BytesMap,
    Msg(&'static [(u32, &'static str, F)]),
    MsgList(&'static [(u32, &'static str, F)]),
}

const OWNER_REF: &[(u32, &str, F)] = &[
    (1, "kind", F::Str),
    (3, "name", F::Str),
    (4, "uid", F::Str),
    (5, "apiVersion", F::Str),
    (6, "controller", F::Bool),
    (7, "blockOwnerDeletion", F::Bool),
];

const OBJECT_META: &[(u32, &str, F)] = &[
    (1, "name", F::Str),
    (2, "generateName", F::Str),
    (3, "namespace", F::Str),
    (5, "uid", F::Str),
    (6, "resourceVersion", F::Str),
    (7, "generation", F::Int),
    (8, "creationTimestamp", F::Time),
    (11, "labels", F::StrMap),
    (12, "annotations", F::StrMap),
    (13, "ownerReferences", F::MsgList(OWNER_REF)),
    (14, "finalizers", F::StrList),
];

const SECRET: &[(u32, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "data", F::BytesMap),
    (3, "type", F::Str),
    (4, "stringData", F::StrMap),
    (5, "immutable", F::Bool),
];

const CONFIG_MAP: &[(u32, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "data", F::StrMap),
    (3, "binaryData", F::BytesMap),
    (4, "immutable", F::Bool),
];

const NAMESPACE: &[(u32, &str, F)] =
    &[(1, "metadata", F::Msg(OBJECT_META)), (2, "spec", F::Msg(&[(1, "finalizers", F::StrList)]))];

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos)?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.varint()?).ok()?;
        let s = self.buf.get(self.pos..self.pos + n)?;
        self.pos += n;
        Some(s)
    }

    /// (field number, wire type, payload): varints as their value,
    /// length-delimited as bytes; fixed-width fields are skipped.
    fn next(&mut self) -> Option<Option<(u32, u64, &'a [u8])>> {
        if self.pos >= self.buf.len() {
            return Some(None);
        }
        let key = self.varint()?;
        let (field, wire) = (u32::try_from(key >> 3).ok()?, key & 7);
        match wire {
            0 => Some(Some((field, self.varint()?, &[]))),
            2 => Some(Some((field, 2, self.bytes()?))),
            1 => {
                self.pos += 8;
                Some(Some((field, 1, &[])))
            }
            5 => {
                self.pos += 4;
                Some(Some((field, 5, &[])))
            }
            _ => None,
        }
    }
}

fn message(buf: &[u8], table: &[(u32, &str, F)]) -> Option<Value> {
    let mut out = Map::new();
    let mut r = Reader { buf, pos: 0 };
    while let Some((field, num, payload)) = r.next()? {
        let Some((_, name, kind)) = table.iter().find(|(n, _, _)| *n == field) else {
            continue;
        };
        let s = || String::from_utf8_lossy(payload).into_owned();
        match kind {
            F::Str => {
                out.insert(name.to_string(), Value::String(s()));
            }
            F::Int => {
                out.insert(name.to_string(), json!(num as i64));
            }
            F::Bool => {
                out.insert(name.to_string(), Value::Bool(num != 0));
            }
            F::Bytes => {
                out.insert(name.to_string(), Value::String(base64::engine::general_purpose::STANDARD.encode(payload)));
            }
            F::Time => {
                let t = message(payload, &[(1, "seconds", F::Int)])?;
                let secs = t.get("seconds").and_then(Value::as_i64).unwrap_or(0);
                if let Ok(ts) = jiff::Timestamp::from_second(secs) {
                    out.insert(name.to_string(), Value::String(ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()));
                }
            }
            F::StrList => {
                let e = out.entry(name.to_string()).or_insert_with(|| json!([]));
                e.as_array_mut()?.push(Value::String(s()));
            }
            F::StrMap | F::BytesMap => {
                let vk = if matches!(kind, F::StrMap) { F::Str } else { F::Bytes };
                let entry = message(payload, &[(1, "k", F::Str), (2, "v", vk)])?;
                let k = entry.get("k").and_then(Value::as_str).unwrap_or_default().to_string();
                let v = entry.get("v").cloned().unwrap_or(Value::String(String::new()));
                let e = out.entry(name.to_string()).or_insert_with(|| json!({}));
                e.as_object_mut()?.insert(k, v);
            }
            F::Msg(t) => {
                out.insert(name.to_string(), message(payload, t)?);
            }
            F::MsgList(t) => {
                let e = out.entry(name.to_string()).or_insert_with(|| json!([]));
                e.as_array_mut()?.push(message(payload, t)?);
            }
        }
    }
    Some(Value::Object(out))
}

/// Decode a `application/vnd.kubernetes.protobuf` body of a supported kind.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let unsupported = || {
        ApiError::unsupported_media_type(
            "application/vnd.kubernetes.protobuf (only Namespace, Secret and ConfigMap bodies are understood)",
        )
    };
    let inner = body.strip_prefix(b"k8s\0").ok_or_else(unsupported)?;
    // runtime.Unknown: typeMeta = 1 {apiVersion = 1, kind = 2}, raw = 2.
    let mut r = Reader { buf: inner, pos: 0 };
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    while let Some((field, _, payload)) = r.next().ok_or_else(unsupported)? {
        match field {
            1 => {
                let tm = message(payload, &[(1, "apiVersion", F::Str), (2, "kind", F::Str)]).ok_or_else(unsupported)?;
                let s = |k: &str| tm.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
                api_version = s("apiVersion");
                kind = s("kind");
            }
            2 => raw = payload,
            _ => {}
        }
    }
    let table = match kind.as_str() {
        "Secret" => SECRET,
        "ConfigMap" => CONFIG_MAP,
        "Namespace" => NAMESPACE,
        _ => return Err(unsupported()),
    };
    let mut v = message(raw, table).ok_or_else(unsupported)?;
    v["apiVersion"] = Value::String(api_version);
    v["kind"] = Value::String(kind);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![((n << 3) | 2) as u8, payload.len() as u8];
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn decodes_a_secret() {
        let meta = [field(1, b"s1"), field(11, &[field(1, b"a"), field(2, b"b")].concat())].concat();
        let secret =
            [field(1, &meta), field(2, &[field(1, b"key"), field(2, b"val")].concat()), field(3, b"Opaque")].concat();
        let tm = [field(1, b"v1"), field(2, b"Secret")].concat();
        let body = [b"k8s\0".to_vec(), field(1, &tm), field(2, &secret)].concat();
        let v = decode(&body).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s1", "labels": {"a": "b"}},
                "data": {"key": "dmFs"}, "type": "Opaque"})
        );
    }
}
