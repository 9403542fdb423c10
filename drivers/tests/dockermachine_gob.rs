//! The gob codec against bytes Go produced, and Go decoding what the codec produced: the
//! exact messages the Docker Machine plugin protocol exchanges.

use std::collections::BTreeMap;

use machinist_drivers::dockermachine::config::{FlagKind, FlagValue, flags_from_gob, rpc_flags};
use machinist_drivers::dockermachine::gob::{Decoded, Decoder, Encoder, Type, Value};
use machinist_test_dmplugin::{gob_decode_with_go, gob_fixture};

/// Every top-level value in `bytes`, in order.
fn decode_all(bytes: &[u8]) -> Vec<Value> {
    let mut decoder = Decoder::new();
    let mut values = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        match decoder.decode(rest).expect("decodes") {
            Decoded::Value(value, used) => {
                values.push(value);
                rest = &rest[used..];
            }
            Decoded::NeedMore => panic!("{} bytes left over that are not a whole value", rest.len()),
        }
    }
    values
}

#[test]
fn replies_go_wrote_decode() {
    let flags = decode_all(&gob_fixture("response-create-flags"));
    assert_eq!(flags.len(), 2, "a Response header, then the reply");
    assert_eq!(flags[0].str_field("ServiceMethod"), "RPCServerDriver.GetCreateFlags");
    assert_eq!(flags[0].field("Seq"), Some(&Value::Uint(7)));
    let parsed = flags_from_gob(&flags[1]).unwrap();
    let summary: Vec<_> =
        parsed.iter().map(|f| (f.name.as_str(), f.kind, f.env_var.as_str(), f.default.clone())).collect();
    assert_eq!(
        summary,
        [
            ("fixture-string", FlagKind::String, "FIXTURE_STRING", FlagValue::String("default".into())),
            (
                "fixture-list",
                FlagKind::StringSlice,
                "FIXTURE_LIST",
                FlagValue::StringSlice(vec!["a".into(), "b".into()])
            ),
            ("fixture-int", FlagKind::Int, "FIXTURE_INT", FlagValue::Int(42)),
            ("fixture-bool", FlagKind::Bool, "FIXTURE_BOOL", FlagValue::Bool(false)),
            ("fixture-empty", FlagKind::String, "", FlagValue::String(String::new())),
        ]
    );
    assert_eq!(parsed[0].usage, "a string flag");

    let error = decode_all(&gob_fixture("response-error"));
    assert_eq!(error[0].str_field("Error"), "fakecloud-token is required");
    assert_eq!(decode_all(&gob_fixture("response-int"))[1], Value::Int(2222));
    assert_eq!(decode_all(&gob_fixture("response-int-negative"))[1], Value::Int(-2222));
    assert_eq!(decode_all(&gob_fixture("response-state"))[1], Value::Int(7));
    assert_eq!(decode_all(&gob_fixture("response-version"))[1], Value::Int(1));
    assert_eq!(decode_all(&gob_fixture("response-string"))[1], Value::String("127.0.0.1".into()));
    assert_eq!(
        decode_all(&gob_fixture("response-bytes"))[1],
        Value::Bytes(br#"{"MachineName":"m1","StorePath":"/tmp/store"}"#.to_vec())
    );
    assert_eq!(decode_all(&gob_fixture("response-empty"))[1], Value::Struct(vec![]));
    let missing = decode_all(&gob_fixture("response-error-missing-method"));
    assert!(missing[0].str_field("Error").contains("can't find method"));

    // The fake plugin's real flags, all of them.
    let fakecloud = decode_all(&gob_fixture("response-fakecloud-flags"));
    let parsed = flags_from_gob(&fakecloud[1]).unwrap();
    assert!(parsed.iter().any(|f| f.name == "fakecloud-token" && f.env_var == "FAKECLOUD_TOKEN"));
    assert!(parsed.iter().any(|f| f.name == "fakecloud-disk-size" && f.default == FlagValue::Int(10)));
}

#[test]
fn a_stream_of_replies_reuses_its_types_and_splits_anywhere() {
    let bytes = gob_fixture("response-stream");
    let values = decode_all(&bytes);
    assert_eq!(values.len(), 10);
    assert_eq!(values[4].str_field("Error"), "boom");
    assert_eq!(values[7], Value::String("127.0.0.1".into()));
    assert_eq!(flags_from_gob(&values[9]).unwrap().len(), 5, "the second []Flag uses the types the first defined");
    // Fed a byte at a time, as a socket may deliver it, the decoder asks for more until a
    // value is whole, and then gives the same values.
    let mut decoder = Decoder::new();
    let mut buffer = Vec::new();
    let mut got = Vec::new();
    for byte in bytes {
        buffer.push(byte);
        if let Decoded::Value(value, used) = decoder.decode(&buffer).unwrap() {
            buffer.drain(..used);
            got.push(value);
        }
    }
    assert!(buffer.is_empty());
    assert_eq!(got, values);
}

#[test]
fn requests_go_wrote_decode_with_nested_interface_types() {
    // Go defines []string inside the interface value, in the middle of the message.
    let values = decode_all(&gob_fixture("set-config-from-flags"));
    assert_eq!(values[0].str_field("ServiceMethod"), "RPCServerDriver.SetConfigFromFlags");
    let Value::Interface(Some(options)) = &values[1] else { panic!("{:?}", values[1]) };
    assert_eq!(options.name, "*rpcdriver.RPCFlags");
    let Some(Value::Map(entries)) = options.value.field("Values") else { panic!("{:?}", options.value) };
    let decoded: BTreeMap<String, Value> = entries
        .iter()
        .map(|(k, v)| {
            let Value::Interface(Some(c)) = v else { panic!("{v:?}") };
            (k.as_str().unwrap().to_string(), c.value.clone())
        })
        .collect();
    assert_eq!(decoded["fakecloud-token"], Value::String("s3cret".into()));
    assert_eq!(decoded["fakecloud-disk-size"], Value::Int(20));
    assert_eq!(decoded["fakecloud-private-network"], Value::Bool(true));
    assert_eq!(decoded["fakecloud-tags"], Value::List(vec![Value::String("a".into()), Value::String("b".into())]));
    assert_eq!(decode_all(&gob_fixture("request-stream")).len(), 10);
}

fn request(encoder: &mut Encoder, method: &str, seq: u64) -> Vec<u8> {
    let header = Type::structure("Request", &[("ServiceMethod", Type::String), ("Seq", Type::Uint)]);
    let value = Value::Struct(vec![
        ("ServiceMethod".into(), Value::String(format!("RPCServerDriver.{method}"))),
        ("Seq".into(), Value::Uint(seq)),
    ]);
    encoder.encode(&header, &value).unwrap()
}

#[test]
fn go_decodes_the_requests_machinist_sends() {
    let empty = Type::structure("struct {}", &[]);
    let mut encoder = Encoder::new();
    let mut bytes = request(&mut encoder, "GetVersion", 0);
    bytes.extend(encoder.encode(&empty, &Value::Struct(vec![])).unwrap());
    assert_eq!(
        gob_decode_with_go("request-empty", &bytes),
        "request RPCServerDriver.GetVersion seq=0\nargument struct{}\n"
    );

    let mut encoder = Encoder::new();
    let mut bytes = request(&mut encoder, "SetConfigRaw", 8);
    bytes.extend(encoder.encode(&Type::Bytes, &Value::Bytes(br#"{"MachineName":"m1"}"#.to_vec())).unwrap());
    let out = gob_decode_with_go("request-set-config-raw", &bytes);
    assert!(out.contains("SetConfigRaw seq=8") && out.contains(r#"MachineName\":\"m1"#), "{out}");

    let values = BTreeMap::from([
        ("fakecloud-token".to_string(), FlagValue::String("s3cret".into())),
        ("fakecloud-disk-size".to_string(), FlagValue::Int(-20)),
        ("fakecloud-private-network".to_string(), FlagValue::Bool(true)),
        ("fakecloud-tags".to_string(), FlagValue::StringSlice(vec!["a".into(), "b".into()])),
        ("fakecloud-none".to_string(), FlagValue::StringSlice(vec![])),
    ]);
    let (ty, arg) = rpc_flags(&values);
    // (An empty list arrives as Go's nil slice, as it does between Go programs.)
    let mut encoder = Encoder::new();
    let mut bytes = request(&mut encoder, "SetConfigFromFlags", 9);
    bytes.extend(encoder.encode(&ty, &arg).unwrap());
    assert_eq!(
        gob_decode_with_go("request-set-config-from-flags", &bytes),
        "request RPCServerDriver.SetConfigFromFlags seq=9\n\
         argument *rpcdriver.RPCFlags\n\
         fakecloud-disk-size=-20 (int)\n\
         fakecloud-none=[]string(nil) ([]string)\n\
         fakecloud-private-network=true (bool)\n\
         fakecloud-tags=[]string{\"a\", \"b\"} ([]string)\n\
         fakecloud-token=\"s3cret\" (string)\n"
    );

    // A stream of calls on one connection defines each type once; Go follows.
    let mut encoder = Encoder::new();
    let mut stream = Vec::new();
    for (seq, method) in ["GetVersion", "GetCreateFlags", "Create"].iter().enumerate() {
        stream.extend(request(&mut encoder, method, seq as u64));
        stream.extend(encoder.encode(&empty, &Value::Struct(vec![])).unwrap());
    }
    let out = machinist_test_dmplugin::try_gob_decode_with_go("requests", &stream).unwrap();
    assert_eq!(out.matches("argument struct{}").count(), 3, "{out}");
}
