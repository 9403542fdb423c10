//! The committed CRD under `crds/` is what the Rust types generate.

use kube::CustomResourceExt;
use machinist::api::{Machine, crd_yaml};

#[test]
fn committed_crd_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/machine.yaml");
    let committed = std::fs::read_to_string(path).expect("crds/machine.yaml exists");
    assert!(
        committed == crd_yaml(),
        "crds/machine.yaml is stale: regenerate it with `cargo run -p machinist -- crd > crds/machine.yaml`"
    );
}

#[test]
fn crd_has_contract_names_columns_and_rules() {
    let crd = serde_json::to_value(Machine::crd()).unwrap();
    let spec = &crd["spec"];
    assert_eq!(spec["group"], "machinist.dev");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["plural"], "machines");
    assert_eq!(spec["names"]["categories"][0], "machinist");
    let version = &spec["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> =
        version["additionalPrinterColumns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    for wanted in ["Driver", "Desired", "State", "Ready", "Address", "Age"] {
        assert!(columns.contains(&wanted), "missing printer column {wanted}: {columns:?}");
    }
    let driver = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["driver"];
    let rules: Vec<&str> =
        driver["x-kubernetes-validations"].as_array().unwrap().iter().map(|r| r["rule"].as_str().unwrap()).collect();
    // Every driver block takes part in both rules: exactly one, and immutable kind.
    for name in machinist_drivers::DriverSpec::NAMES {
        assert!(rules.iter().all(|r| r.contains(&format!("has(self.{name})"))), "{name} missing from {rules:?}");
        assert!(driver["properties"][name].is_object(), "no {name} block in the schema");
    }
    assert!(rules.iter().any(|r| r.contains("oldSelf")), "no transition rule keeps the driver kind");
    let spec_props = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(spec_props["powerState"]["enum"], serde_json::json!(["Running", "Stopped"]));
    assert_eq!(spec_props["stopTimeoutSeconds"]["minimum"], 1.0);
}

/// Kubernetes knows the integer formats `int32` and `int64` only, and warns on every apply
/// of a CRD with another (`unrecognized format "uint32"`); the bounds stay in the schema.
#[test]
fn integer_formats_are_ones_kubernetes_knows_and_bounds_stay() {
    let crd: serde_json::Value = serde_yaml::from_str(&crd_yaml()).unwrap();
    fn walk(value: &serde_json::Value, path: &str, seen: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                if map.get("type").and_then(|t| t.as_str()) == Some("integer") {
                    if let Some(format) = map.get("format").and_then(|f| f.as_str()) {
                        assert!(["int32", "int64"].contains(&format), "{path}: format {format}");
                    }
                    seen.push(path.to_string());
                }
                for (key, v) in map {
                    walk(v, &format!("{path}.{key}"), seen);
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, path, seen)),
            _ => {}
        }
    }
    let mut integers = Vec::new();
    walk(&crd, "", &mut integers);
    assert!(integers.len() > 5, "{integers:?}");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let port = &spec["ssh"]["properties"]["port"];
    assert_eq!((port["minimum"].as_f64(), port["maximum"].as_f64()), (Some(1.0), Some(65535.0)), "{port}");
}
