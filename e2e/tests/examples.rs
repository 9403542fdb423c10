//! Every manifest under `examples/` is accepted by the API server (schema and CEL rules
//! of the generated CRD) with no field silently pruned.

use anyhow::{Context, Result};
use kube::api::{DynamicObject, PostParams};
use kube::discovery::ApiResource;
use machinist::api::Machine;
use machinist_e2e::Env;
use serde::Deserialize;

#[tokio::test]
async fn examples_are_valid_machines() -> Result<()> {
    // No controller: admission is the point, and the amazonec2 example would call AWS.
    let env = Env::idle("examples").await?;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let object = DynamicObject::deserialize(document).with_context(|| format!("{}", path.display()))?;
            if object.types.as_ref().map(|t| t.kind.as_str()) != Some("Machine") {
                // Companion objects (a credentials Secret) are created as they are.
                let kind = object.types.clone().unwrap_or_default();
                let resource = ApiResource::from_gvk(&kube::core::GroupVersionKind::try_from(&kind)?);
                let api: kube::Api<DynamicObject> =
                    kube::Api::namespaced_with(env.client.clone(), &env.namespace, &resource);
                api.create(&PostParams::default(), &object)
                    .await
                    .with_context(|| format!("{}: {} is rejected", path.display(), kind.kind))?;
                continue;
            }
            check_machine(&env, &path, object).await?;
            checked += 1;
        }
    }
    assert!(checked >= 4, "example Machines found: {checked}");
    // Never reconciled, so no finalizer holds them: gone before a controller could start.
    env.machines.delete_collection(&Default::default(), &Default::default()).await?;
    env.cleanup().await
}

/// Creates the Machine and checks nothing of it was pruned.
async fn check_machine(env: &Env, path: &std::path::Path, object: DynamicObject) -> Result<()> {
    let api: kube::Api<DynamicObject> =
        kube::Api::namespaced_with(env.client.clone(), &env.namespace, &ApiResource::erase::<Machine>(&()));
    let created =
        api.create(&PostParams::default(), &object).await.with_context(|| format!("{} is rejected", path.display()))?;
    let sent = &object.data["spec"];
    let stored = &created.data["spec"];
    assert_subset(sent, stored, &format!("{}: spec", path.display()));
    // It parses as the typed Machine too.
    serde_json::from_value::<Machine>(serde_json::to_value(&created)?)
        .with_context(|| format!("{} does not parse as a Machine", path.display()))?;
    Ok(())
}

/// Everything in `sent` is in `stored` (which may add defaults).
fn assert_subset(sent: &serde_json::Value, stored: &serde_json::Value, at: &str) {
    match (sent, stored) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in a {
                let there = b.get(k).unwrap_or_else(|| panic!("{at}.{k} was pruned: it is not part of the schema"));
                assert_subset(v, there, &format!("{at}.{k}"));
            }
        }
        (serde_json::Value::Array(a), serde_json::Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{at}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_subset(x, y, &format!("{at}[{i}]"));
            }
        }
        (a, b) => assert_eq!(a, b, "{at}"),
    }
}
