//! Go's `encoding/gob`, as much of it as the Docker Machine plugin protocol uses.
//!
//! The decoder reads any gob stream Go writes (every wire type: arrays, slices, maps,
//! structs, interface values with type definitions wherever Go puts them, GobEncoder
//! values as bytes) into a [`Value`]. The encoder writes values of the [`Type`]s the
//! protocol sends (basic types, slices, maps, structs, interfaces) and defines each new
//! type in a message of its own before the first value that uses it, which Go accepts.
//!
//! A codec of our own rather than a crate: crates.io's `gob` is serde-based and has no
//! interface values, and `gobwire` has a single release; the protocol needs seven types.

use std::collections::HashMap;
use std::fmt;

/// Go's predefined type ids.
mod id {
    pub const BOOL: i64 = 1;
    pub const INT: i64 = 2;
    pub const UINT: i64 = 3;
    pub const FLOAT: i64 = 4;
    pub const BYTES: i64 = 5;
    pub const STRING: i64 = 6;
    pub const COMPLEX: i64 = 7;
    pub const INTERFACE: i64 = 8;
    /// Ids below this are Go's own; ours start here.
    pub const FIRST_USER: i64 = 65;
}

/// A malformed or unsupported gob stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GobError(pub String);

impl fmt::Display for GobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gob: {}", self.0)
    }
}

impl std::error::Error for GobError {}

fn err<T>(message: impl Into<String>) -> Result<T, GobError> {
    Err(GobError(message.into()))
}

/// A decoded value, or one to encode (with its [`Type`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Complex(f64, f64),
    Bytes(Vec<u8>),
    String(String),
    /// A slice or an array.
    List(Vec<Value>),
    Map(Vec<(Value, Value)>),
    /// The fields that were sent, by name (Go omits zero-valued fields).
    Struct(Vec<(String, Value)>),
    /// An interface value: `None` is nil.
    Interface(Option<Box<Concrete>>),
}

/// The value inside an interface, with the name its type was registered under in Go
/// (`gob.Register`: `*mcnflag.StringFlag`, `string`, `[]string`, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct Concrete {
    pub name: String,
    /// Needed to encode; decoding leaves it `None`.
    pub ty: Option<Type>,
    pub value: Value,
}

impl Value {
    /// A struct's field, when it was sent.
    pub fn field(&self, name: &str) -> Option<&Value> {
        match self {
            Value::Struct(fields) => fields.iter().find(|(n, _)| n == name).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Uint(u) => i64::try_from(*u).ok(),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// A string field, empty when Go left it out as zero.
    pub fn str_field(&self, name: &str) -> String {
        self.field(name).and_then(Value::as_str).unwrap_or_default().to_string()
    }

    /// An interface value holding `value` of type `ty`, registered in Go as `name`.
    pub fn interface(name: impl Into<String>, ty: Type, value: Value) -> Value {
        Value::Interface(Some(Box::new(Concrete { name: name.into(), ty: Some(ty), value })))
    }
}

/// The type of a value to encode.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Type {
    Bool,
    Int,
    Uint,
    Bytes,
    String,
    Interface,
    Slice(Box<Type>),
    Map(Box<Type>, Box<Type>),
    /// A named struct and its fields in order.
    Struct(String, Vec<(String, Type)>),
}

impl Type {
    pub fn slice(elem: Type) -> Type {
        Type::Slice(Box::new(elem))
    }

    pub fn map(key: Type, elem: Type) -> Type {
        Type::Map(Box::new(key), Box::new(elem))
    }

    pub fn structure(name: &str, fields: &[(&str, Type)]) -> Type {
        Type::Struct(name.to_string(), fields.iter().map(|(n, t)| (n.to_string(), t.clone())).collect())
    }

    fn predefined(&self) -> Option<i64> {
        match self {
            Type::Bool => Some(id::BOOL),
            Type::Int => Some(id::INT),
            Type::Uint => Some(id::UINT),
            Type::Bytes => Some(id::BYTES),
            Type::String => Some(id::STRING),
            Type::Interface => Some(id::INTERFACE),
            _ => None,
        }
    }

    /// The name Go gives an unnamed type (`[]string`, `map[string]interface {}`).
    fn go_name(&self) -> String {
        match self {
            Type::Bool => "bool".into(),
            Type::Int => "int".into(),
            Type::Uint => "uint".into(),
            Type::Bytes => "[]uint8".into(),
            Type::String => "string".into(),
            Type::Interface => "interface {}".into(),
            Type::Slice(elem) => format!("[]{}", elem.go_name()),
            Type::Map(key, elem) => format!("map[{}]{}", key.go_name(), elem.go_name()),
            Type::Struct(name, _) => name.clone(),
        }
    }
}

// ---- primitives ----

fn put_uint(out: &mut Vec<u8>, x: u64) {
    if x < 0x80 {
        out.push(x as u8);
        return;
    }
    let bytes = x.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    out.push((-((8 - skip) as i8)) as u8);
    out.extend_from_slice(&bytes[skip..]);
}

fn put_int(out: &mut Vec<u8>, i: i64) {
    let u = if i < 0 { ((!i as u64) << 1) | 1 } else { (i as u64) << 1 };
    put_uint(out, u);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_uint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A gob message: its length, then its bytes.
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 9);
    put_uint(&mut out, message.len() as u64);
    out.extend_from_slice(message);
    out
}

/// Reads one gob unsigned integer from the front of `input`, if it is all there.
pub fn take_uint(input: &[u8]) -> Result<Option<(u64, usize)>, GobError> {
    let Some(&first) = input.first() else { return Ok(None) };
    if first < 0x80 {
        return Ok(Some((first as u64, 1)));
    }
    let n = (-(first as i8 as i16)) as usize;
    if n > 8 {
        return err(format!("invalid unsigned integer length {n}"));
    }
    if input.len() < 1 + n {
        return Ok(None);
    }
    let x = input[1..=n].iter().fold(0u64, |acc, b| (acc << 8) | *b as u64);
    Ok(Some((x, 1 + n)))
}

// ---- encoder ----

/// The sending half of one gob stream: remembers which types it has defined.
#[derive(Debug, Default)]
pub struct Encoder {
    sent: HashMap<Type, i64>,
    next_id: i64,
}

impl Encoder {
    pub fn new() -> Self {
        Encoder { sent: HashMap::new(), next_id: id::FIRST_USER }
    }

    /// The bytes that send `value` of type `ty`: the definitions of types this stream has
    /// not sent yet, each a message, then the value's message.
    pub fn encode(&mut self, ty: &Type, value: &Value) -> Result<Vec<u8>, GobError> {
        let mut out = Vec::new();
        self.define(ty, &mut out);
        self.define_concrete(value, &mut out)?;
        let type_id = self.type_id(ty);
        let mut message = Vec::new();
        put_int(&mut message, type_id);
        if !matches!(ty, Type::Struct(..)) {
            message.push(0); // a non-struct top-level value is a single field, delta 0
        }
        self.value(ty, value, &mut message)?;
        out.extend(frame(&message));
        Ok(out)
    }

    fn type_id(&self, ty: &Type) -> i64 {
        ty.predefined().unwrap_or_else(|| self.sent[ty])
    }

    /// Sends the definition of `ty` and of the types inside it, once per stream.
    fn define(&mut self, ty: &Type, out: &mut Vec<u8>) {
        if ty.predefined().is_some() || self.sent.contains_key(ty) {
            return;
        }
        // Inner types first, so that every id a definition names is known.
        match ty {
            Type::Slice(elem) => self.define(elem, out),
            Type::Map(key, elem) => {
                self.define(key, out);
                self.define(elem, out);
            }
            Type::Struct(_, fields) => fields.iter().for_each(|(_, t)| self.define(t, out)),
            _ => {}
        }
        let type_id = self.next_id;
        self.next_id += 1;
        self.sent.insert(ty.clone(), type_id);

        // wireType {ArrayT 1, SliceT 2, StructT 3, MapT 4, ...}; CommonType {Name, Id}.
        let mut common = Vec::new();
        common.push(1);
        put_bytes(&mut common, ty.go_name().as_bytes());
        common.push(1);
        put_int(&mut common, type_id);
        common.push(0);
        let mut body = Vec::new();
        match ty {
            Type::Slice(elem) => {
                body.push(2); // SliceT
                body.push(1);
                body.extend(&common);
                body.push(1);
                put_int(&mut body, self.type_id(elem));
                body.push(0);
            }
            Type::Map(key, elem) => {
                body.push(4); // MapT
                body.push(1);
                body.extend(&common);
                body.push(1);
                put_int(&mut body, self.type_id(key));
                body.push(1);
                put_int(&mut body, self.type_id(elem));
                body.push(0);
            }
            Type::Struct(_, fields) => {
                body.push(3); // StructT
                body.push(1);
                body.extend(&common);
                body.push(1);
                put_uint(&mut body, fields.len() as u64);
                for (name, t) in fields {
                    body.push(1);
                    put_bytes(&mut body, name.as_bytes());
                    body.push(1);
                    put_int(&mut body, self.type_id(t));
                    body.push(0);
                }
                body.push(0);
            }
            _ => unreachable!("predefined types are not defined"),
        }
        body.push(0); // end of wireType
        let mut message = Vec::new();
        put_int(&mut message, -type_id);
        message.extend(body);
        out.extend(frame(&message));
    }

    /// Defines the concrete types held by interface values inside `value`.
    fn define_concrete(&mut self, value: &Value, out: &mut Vec<u8>) -> Result<(), GobError> {
        match value {
            Value::Interface(Some(concrete)) => {
                let Some(ty) = &concrete.ty else {
                    return err(format!("no type for the interface value {}", concrete.name));
                };
                self.define(ty, out);
                self.define_concrete(&concrete.value, out)
            }
            Value::List(items) => items.iter().try_for_each(|v| self.define_concrete(v, out)),
            Value::Map(entries) => entries.iter().try_for_each(|(k, v)| {
                self.define_concrete(k, out)?;
                self.define_concrete(v, out)
            }),
            Value::Struct(fields) => fields.iter().try_for_each(|(_, v)| self.define_concrete(v, out)),
            _ => Ok(()),
        }
    }

    fn value(&self, ty: &Type, value: &Value, out: &mut Vec<u8>) -> Result<(), GobError> {
        match (ty, value) {
            (Type::Bool, Value::Bool(b)) => put_uint(out, *b as u64),
            (Type::Int, Value::Int(i)) => put_int(out, *i),
            (Type::Uint, Value::Uint(u)) => put_uint(out, *u),
            (Type::Bytes, Value::Bytes(b)) => put_bytes(out, b),
            (Type::String, Value::String(s)) => put_bytes(out, s.as_bytes()),
            (Type::Slice(elem), Value::List(items)) => {
                put_uint(out, items.len() as u64);
                for item in items {
                    self.value(elem, item, out)?;
                }
            }
            (Type::Map(key, elem), Value::Map(entries)) => {
                put_uint(out, entries.len() as u64);
                for (k, v) in entries {
                    self.value(key, k, out)?;
                    self.value(elem, v, out)?;
                }
            }
            (Type::Struct(name, fields), Value::Struct(values)) => {
                if let Some((unknown, _)) = values.iter().find(|(n, _)| !fields.iter().any(|(f, _)| f == n)) {
                    return err(format!("struct {name} has no field {unknown}"));
                }
                let mut last: i64 = -1;
                for (index, (field, t)) in fields.iter().enumerate() {
                    if let Some((_, v)) = values.iter().find(|(n, _)| n == field) {
                        put_uint(out, (index as i64 - last) as u64);
                        last = index as i64;
                        self.value(t, v, out)?;
                    }
                }
                out.push(0);
            }
            (Type::Interface, Value::Interface(None)) => out.push(0),
            (Type::Interface, Value::Interface(Some(concrete))) => {
                let ty = concrete.ty.as_ref().expect("defined by define_concrete");
                put_bytes(out, concrete.name.as_bytes());
                put_int(out, self.type_id(ty));
                let mut inner = Vec::new();
                if !matches!(ty, Type::Struct(..)) {
                    inner.push(0);
                }
                self.value(ty, &concrete.value, &mut inner)?;
                put_bytes(out, &inner);
            }
            (ty, value) => return err(format!("cannot encode {value:?} as {}", ty.go_name())),
        }
        Ok(())
    }
}

// ---- decoder ----

#[derive(Clone, Debug)]
enum WireType {
    Array {
        elem: i64,
        len: u64,
    },
    Slice {
        elem: i64,
    },
    Struct {
        fields: Vec<(String, i64)>,
    },
    Map {
        key: i64,
        elem: i64,
    },
    /// GobEncoder, BinaryMarshaler or TextMarshaler: the value is a byte string.
    Encoded,
}

/// What decoding stopped at.
#[derive(Debug)]
pub enum Decoded {
    /// A whole value, and how many bytes of the input it took.
    Value(Value, usize),
    /// The input ends inside the value: call again with more.
    NeedMore,
}

/// The receiving half of one gob stream: remembers the types the peer defined.
#[derive(Debug, Default)]
pub struct Decoder {
    types: HashMap<i64, WireType>,
}

/// Nesting beyond this is refused (a hostile or broken peer could recurse forever).
const MAX_DEPTH: usize = 64;

/// The part of a stream a top-level value is read from: its messages, which Go may
/// split a value across (type definitions inside interface values flush the message
/// being written).
struct Reader<'a> {
    input: &'a [u8],
    /// Offset of the next message's length prefix.
    next_message: usize,
    /// The current message's unread bytes: `pos..end`.
    pos: usize,
    end: usize,
}

/// The input ends before the value does.
struct Short;

enum Fail {
    Short,
    Bad(GobError),
}

impl From<Short> for Fail {
    fn from(_: Short) -> Self {
        Fail::Short
    }
}

impl From<GobError> for Fail {
    fn from(e: GobError) -> Self {
        Fail::Bad(e)
    }
}

fn bad<T>(message: impl Into<String>) -> Result<T, Fail> {
    Err(Fail::Bad(GobError(message.into())))
}

impl Reader<'_> {
    fn buffered(&self) -> usize {
        self.end - self.pos
    }

    fn next_message(&mut self) -> Result<(), Fail> {
        let Some((len, used)) = take_uint(&self.input[self.next_message..])? else { return Err(Fail::Short) };
        let start = self.next_message + used;
        let len = usize::try_from(len).map_err(|_| GobError("message too long".into()))?;
        if len == 0 {
            return bad("empty message");
        }
        if self.input.len() - start < len {
            return Err(Fail::Short);
        }
        self.pos = start;
        self.end = start + len;
        self.next_message = self.end;
        Ok(())
    }

    fn uint(&mut self) -> Result<u64, Fail> {
        match take_uint(&self.input[self.pos..self.end])? {
            Some((x, used)) => {
                self.pos += used;
                Ok(x)
            }
            None => bad("value runs past the end of its message"),
        }
    }

    fn int(&mut self) -> Result<i64, Fail> {
        let u = self.uint()?;
        Ok(if u & 1 == 1 { !((u >> 1) as i64) } else { (u >> 1) as i64 })
    }

    fn len(&mut self) -> Result<usize, Fail> {
        let n = self.uint()?;
        if n > self.buffered() as u64 {
            return bad(format!("length {n} exceeds the message"));
        }
        Ok(n as usize)
    }

    fn bytes(&mut self) -> Result<&[u8], Fail> {
        let n = self.len()?;
        let b = &self.input[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }

    fn string(&mut self) -> Result<String, Fail> {
        Ok(String::from_utf8_lossy(self.bytes()?).into_owned())
    }

    fn float(&mut self) -> Result<f64, Fail> {
        Ok(f64::from_bits(self.uint()?.swap_bytes()))
    }
}

impl Decoder {
    pub fn new() -> Self {
        Decoder::default()
    }

    /// Decodes the next top-level value from the front of `input` (a byte stream of
    /// length-prefixed messages). Type definitions it meets are kept for later values;
    /// `NeedMore` means the input ends inside this value.
    pub fn decode(&mut self, input: &[u8]) -> Result<Decoded, GobError> {
        let mut r = Reader { input, next_message: 0, pos: 0, end: 0 };
        match self.top_level(&mut r) {
            Ok(value) => {
                if r.buffered() != 0 {
                    return err("extra data after a value");
                }
                Ok(Decoded::Value(value, r.next_message))
            }
            Err(Fail::Short) => Ok(Decoded::NeedMore),
            Err(Fail::Bad(e)) => Err(e),
        }
    }

    fn top_level(&mut self, r: &mut Reader) -> Result<Value, Fail> {
        let type_id = self.type_sequence(r, false)?;
        self.single_or_struct(r, type_id, 0)
    }

    /// Type definitions up to the id of the value that follows them (Go's
    /// `decodeTypeSequence`).
    fn type_sequence(&mut self, r: &mut Reader, in_interface: bool) -> Result<i64, Fail> {
        loop {
            if r.buffered() == 0 {
                r.next_message()?;
            }
            let type_id = r.int()?;
            if type_id >= 0 {
                return Ok(type_id);
            }
            let wire = self.wire_type(r)?;
            self.types.insert(-type_id, wire);
            if r.buffered() > 0 {
                if !in_interface {
                    return bad("extra data after a type definition");
                }
                r.uint()?; // the byte count of what follows
            }
        }
    }

    fn wire_type(&mut self, r: &mut Reader) -> Result<WireType, Fail> {
        // wireType is a struct whose one set field says the kind.
        let kind = r.uint()?;
        let common = |r: &mut Reader| -> Result<(), Fail> {
            // The embedded CommonType {Name string, Id int}, then the kind's own fields.
            if r.uint()? != 1 {
                return bad("type definition without CommonType");
            }
            let mut field = -1i64;
            loop {
                let delta = r.uint()?;
                if delta == 0 {
                    return Ok(());
                }
                field += delta as i64;
                match field {
                    0 => {
                        r.bytes()?;
                    }
                    1 => {
                        r.int()?;
                    }
                    _ => return bad("unknown CommonType field"),
                }
            }
        };
        let ints = |r: &mut Reader, count: usize| -> Result<Vec<i64>, Fail> {
            // Fields after CommonType, each an int, by delta.
            let mut values = vec![0i64; count];
            let mut field = 0i64;
            loop {
                let delta = r.uint()?;
                if delta == 0 {
                    return Ok(values);
                }
                field += delta as i64;
                match values.get_mut(field as usize - 1) {
                    Some(slot) => *slot = r.int()?,
                    None => return bad("unknown type definition field"),
                }
            }
        };
        let wire = match kind {
            1 => {
                common(r)?;
                let v = ints(r, 2)?;
                WireType::Array { elem: v[0], len: v[1] as u64 }
            }
            2 => {
                common(r)?;
                WireType::Slice { elem: ints(r, 1)?[0] }
            }
            3 => {
                common(r)?;
                let mut fields = Vec::new();
                match r.uint()? {
                    0 => {}
                    1 => {
                        let count = r.uint()?;
                        for _ in 0..count {
                            let (mut name, mut type_id) = (String::new(), 0);
                            let mut field = -1i64;
                            loop {
                                let delta = r.uint()?;
                                if delta == 0 {
                                    break;
                                }
                                field += delta as i64;
                                match field {
                                    0 => name = r.string()?,
                                    1 => type_id = r.int()?,
                                    _ => return bad("unknown fieldType field"),
                                }
                            }
                            fields.push((name, type_id));
                        }
                        if r.uint()? != 0 {
                            return bad("unknown structType field");
                        }
                    }
                    _ => return bad("unknown structType field"),
                }
                WireType::Struct { fields }
            }
            4 => {
                common(r)?;
                let v = ints(r, 2)?;
                WireType::Map { key: v[0], elem: v[1] }
            }
            5..=7 => {
                common(r)?;
                if r.uint()? != 0 {
                    return bad("unknown gobEncoderType field");
                }
                WireType::Encoded
            }
            other => return bad(format!("unknown kind of type definition {other}")),
        };
        if r.uint()? != 0 {
            return bad("type definition with more than one kind");
        }
        Ok(wire)
    }

    /// A value of `type_id` standing alone (top level, or inside an interface): a
    /// struct's fields, or any other value after a 0 field delta.
    fn single_or_struct(&mut self, r: &mut Reader, type_id: i64, depth: usize) -> Result<Value, Fail> {
        if !matches!(self.types.get(&type_id), Some(WireType::Struct { .. })) && r.uint()? != 0 {
            return bad("non-zero field delta before a single value");
        }
        self.value(r, type_id, depth)
    }

    fn value(&mut self, r: &mut Reader, type_id: i64, depth: usize) -> Result<Value, Fail> {
        if depth > MAX_DEPTH {
            return bad("values nested too deep");
        }
        Ok(match type_id {
            id::BOOL => Value::Bool(r.uint()? != 0),
            id::INT => Value::Int(r.int()?),
            id::UINT => Value::Uint(r.uint()?),
            id::FLOAT => Value::Float(r.float()?),
            id::COMPLEX => Value::Complex(r.float()?, r.float()?),
            id::BYTES => Value::Bytes(r.bytes()?.to_vec()),
            id::STRING => Value::String(r.string()?),
            id::INTERFACE => self.interface(r, depth)?,
            _ => match self.types.get(&type_id).cloned() {
                None => return bad(format!("value of undefined type {type_id}")),
                Some(WireType::Encoded) => Value::Bytes(r.bytes()?.to_vec()),
                Some(WireType::Slice { elem }) => Value::List(self.items(r, elem, depth, None)?),
                Some(WireType::Array { elem, len }) => Value::List(self.items(r, elem, depth, Some(len))?),
                Some(WireType::Map { key, elem }) => {
                    let count = r.uint()?;
                    let mut entries = Vec::new();
                    for _ in 0..count {
                        let k = self.value(r, key, depth + 1)?;
                        let v = self.value(r, elem, depth + 1)?;
                        entries.push((k, v));
                    }
                    Value::Map(entries)
                }
                Some(WireType::Struct { fields }) => {
                    let mut values = Vec::new();
                    let mut field = -1i64;
                    loop {
                        let delta = r.uint()?;
                        if delta == 0 {
                            break;
                        }
                        field = field.saturating_add(i64::try_from(delta).unwrap_or(i64::MAX));
                        let Some((name, field_type)) = usize::try_from(field).ok().and_then(|f| fields.get(f)) else {
                            return bad(format!("field {field} out of range"));
                        };
                        let v = self.value(r, *field_type, depth + 1)?;
                        values.push((name.clone(), v));
                    }
                    Value::Struct(values)
                }
            },
        })
    }

    fn items(&mut self, r: &mut Reader, elem: i64, depth: usize, len: Option<u64>) -> Result<Vec<Value>, Fail> {
        let count = r.uint()?;
        if len.is_some_and(|len| len != count) {
            return bad("array length differs from its type");
        }
        if count > r.buffered() as u64 {
            return bad(format!("{count} elements cannot fit in the message"));
        }
        (0..count).map(|_| self.value(r, elem, depth + 1)).collect()
    }

    fn interface(&mut self, r: &mut Reader, depth: usize) -> Result<Value, Fail> {
        let name = r.string()?;
        if name.is_empty() {
            return Ok(Value::Interface(None));
        }
        let type_id = self.type_sequence(r, true)?;
        r.uint()?; // the value's byte count
        let value = self.single_or_struct(r, type_id, depth + 1)?;
        Ok(Value::Interface(Some(Box::new(Concrete { name, ty: None, value }))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(ty: &Type, value: &Value) -> Value {
        let bytes = Encoder::new().encode(ty, value).unwrap();
        match Decoder::new().decode(&bytes).unwrap() {
            Decoded::Value(v, used) => {
                assert_eq!(used, bytes.len());
                v
            }
            Decoded::NeedMore => panic!("short"),
        }
    }

    #[test]
    fn unsigned_integers_are_encoded_as_go_does() {
        // From the encoding/gob documentation.
        let mut out = Vec::new();
        put_uint(&mut out, 7);
        assert_eq!(out, [7]);
        out.clear();
        put_uint(&mut out, 256);
        assert_eq!(out, [0xFE, 0x01, 0x00]);
        out.clear();
        put_int(&mut out, -129);
        assert_eq!(out, [0xFE, 0x01, 0x01]);
        out.clear();
        put_int(&mut out, 1);
        assert_eq!(out, [2]);
    }

    #[test]
    fn values_round_trip() {
        let flag = Type::structure("StringFlag", &[("Name", Type::String), ("Value", Type::String)]);
        let ty = Type::structure(
            "T",
            &[
                ("A", Type::Int),
                ("B", Type::slice(Type::String)),
                ("C", Type::map(Type::String, Type::Interface)),
                ("D", Type::Bool),
            ],
        );
        let value = Value::Struct(vec![
            ("A".into(), Value::Int(-300)),
            ("B".into(), Value::List(vec![Value::String("x".into()), Value::String("".into())])),
            (
                "C".into(),
                Value::Map(vec![
                    (Value::String("i".into()), Value::interface("int", Type::Int, Value::Int(0))),
                    (
                        Value::String("f".into()),
                        Value::interface(
                            "*mcnflag.StringFlag",
                            flag.clone(),
                            Value::Struct(vec![("Name".into(), Value::String("n".into()))]),
                        ),
                    ),
                    (Value::String("nil".into()), Value::Interface(None)),
                ]),
            ),
        ]);
        let back = round_trip(&ty, &value);
        assert_eq!(back.field("A"), Some(&Value::Int(-300)));
        assert_eq!(back.field("B"), value.field("B"));
        let Some(Value::Map(entries)) = back.field("C") else { panic!("{back:?}") };
        let Value::Interface(Some(f)) = &entries[1].1 else { panic!() };
        assert_eq!(f.name, "*mcnflag.StringFlag");
        assert_eq!(f.value.str_field("Name"), "n");
        assert_eq!(entries[2].1, Value::Interface(None));
        assert_eq!(round_trip(&Type::Bytes, &Value::Bytes(b"{}".to_vec())), Value::Bytes(b"{}".to_vec()));
    }

    #[test]
    fn a_value_cut_short_asks_for_more_and_types_are_remembered() {
        let ty = Type::structure("R", &[("S", Type::String)]);
        let mut encoder = Encoder::new();
        let first = encoder.encode(&ty, &Value::Struct(vec![("S".into(), Value::String("a".into()))])).unwrap();
        let second = encoder.encode(&ty, &Value::Struct(vec![("S".into(), Value::String("b".into()))])).unwrap();
        assert!(second.len() < first.len(), "the type is defined once");
        let mut decoder = Decoder::new();
        for cut in 0..first.len() {
            assert!(matches!(decoder.decode(&first[..cut]).unwrap(), Decoded::NeedMore), "cut at {cut}");
        }
        assert!(matches!(decoder.decode(&first).unwrap(), Decoded::Value(..)));
        let Decoded::Value(v, _) = decoder.decode(&second).unwrap() else { panic!() };
        assert_eq!(v.str_field("S"), "b");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut decoder = Decoder::new();
        for input in [&[3u8, 0xff, 0xff, 0xff][..], &[2, 0x7f, 0], &[4, 0x02, 0x00, 0x05, 0x7f], &[1, 0]] {
            assert!(!matches!(decoder.decode(input), Ok(Decoded::Value(..))), "{input:?}");
        }
    }
}
