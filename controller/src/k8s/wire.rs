//! Machines as they are read off the wire, without what reconcile never reads.
//!
//! A real API server sends every object with its `managedFields`, about half of a
//! Machine. kube's `DeserializeGuard` buffers each watched object into a tree, clones the
//! tree and parses the clone, `managedFields` included, only for the cache to drop them.
//! Here a Machine is parsed once, straight from the text, skipping `managedFields`; and
//! the answer to a write is read for its metadata alone.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeSeed, Deserializer, Error as _, IgnoredAny, IntoDeserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::api::{Machine, MachineSpec, MachineStatus};

/// A watched Machine: parsed, or, when it does not parse, its metadata and why (as kube's
/// `DeserializeGuard`, into which it turns for the cache).
#[derive(Clone, Debug)]
pub struct WatchedMachine(pub Result<Machine, InvalidObject>);

impl<'de> Deserialize<'de> for WatchedMachine {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // The object's text, kept only until it is parsed: an invalid Machine is read a
        // second time, for its metadata.
        let text = Box::<RawValue>::deserialize(deserializer)?;
        match serde_json::from_str::<LeanMachine>(text.get()) {
            Ok(LeanMachine { metadata, spec, status }) => {
                Ok(WatchedMachine(Ok(Machine { metadata: metadata.0, spec, status })))
            }
            Err(error) => {
                let MetadataOnly { metadata } = serde_json::from_str(text.get()).map_err(D::Error::custom)?;
                Ok(WatchedMachine(Err(InvalidObject { error: error.to_string(), metadata: metadata.0 })))
            }
        }
    }
}

impl From<WatchedMachine> for DeserializeGuard<Machine> {
    fn from(watched: WatchedMachine) -> Self {
        DeserializeGuard(watched.0)
    }
}

/// A watch event of [`WatchedMachine`]s as one of the cache's items.
pub fn into_guarded(event: watcher::Event<WatchedMachine>) -> watcher::Event<DeserializeGuard<Machine>> {
    use watcher::Event;
    match event {
        Event::Apply(m) => Event::Apply(m.into()),
        Event::Delete(m) => Event::Delete(m.into()),
        Event::Init => Event::Init,
        Event::InitApply(m) => Event::InitApply(m.into()),
        Event::InitDone => Event::InitDone,
    }
}

/// A Machine's metadata alone: how the answer to one of machinist's writes is read, since
/// all it needs of it is the resourceVersion the write made. Requests through an
/// `Api<MachineMeta>` go to the Machine's own URLs.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct MachineMeta {
    #[serde(default)]
    pub metadata: LeanMeta,
}

/// The Machine API of `api`, for writes to `machine` whose answer is read for its
/// metadata alone.
pub(super) fn answers_of(api: &Api<Machine>, machine: &Machine) -> Api<MachineMeta> {
    Api::namespaced(api.clone().into_client(), &machine.namespace().unwrap_or_default())
}

#[derive(Deserialize)]
struct LeanMachine {
    #[serde(default)]
    metadata: LeanMeta,
    spec: MachineSpec,
    #[serde(default)]
    status: Option<MachineStatus>,
}

#[derive(Deserialize)]
struct MetadataOnly {
    #[serde(default)]
    metadata: LeanMeta,
}

/// `ObjectMeta` read without its `managedFields`, which are skipped unparsed.
#[derive(Clone, Debug, Default)]
pub struct LeanMeta(pub ObjectMeta);

impl<'de> Deserialize<'de> for LeanMeta {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MetaVisitor;
        impl<'de> Visitor<'de> for MetaVisitor {
            type Value = ObjectMeta;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("object metadata")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ObjectMeta, A::Error> {
                ObjectMeta::deserialize(MapAccessDeserializer::new(WithoutManagedFields(map)))
            }
        }
        deserializer.deserialize_map(MetaVisitor).map(LeanMeta)
    }
}

/// The entries of a metadata map, but for `managedFields`.
struct WithoutManagedFields<A>(A);

impl<'de, A: MapAccess<'de>> MapAccess<'de> for WithoutManagedFields<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        while let Some(key) = self.0.next_key::<Key<'de>>()? {
            if key.0 == "managedFields" {
                self.0.next_value::<IgnoredAny>()?;
                continue;
            }
            return seed.deserialize(key.0.into_deserializer()).map(Some);
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.0.next_value_seed(seed)
    }
}

/// A map key, borrowed from the text when it can be.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_string())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

macro_rules! as_machine_resource {
    ($ty:ty) => {
        impl Resource for $ty {
            type DynamicType = ();
            type Scope = <Machine as Resource>::Scope;

            fn kind(dt: &()) -> Cow<'_, str> {
                Machine::kind(dt)
            }
            fn group(dt: &()) -> Cow<'_, str> {
                Machine::group(dt)
            }
            fn version(dt: &()) -> Cow<'_, str> {
                Machine::version(dt)
            }
            fn plural(dt: &()) -> Cow<'_, str> {
                Machine::plural(dt)
            }
            fn meta(&self) -> &ObjectMeta {
                self.meta_ref()
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                self.meta_ref_mut()
            }
        }
    };
}

as_machine_resource!(WatchedMachine);
as_machine_resource!(MachineMeta);

impl WatchedMachine {
    fn meta_ref(&self) -> &ObjectMeta {
        self.0.as_ref().map_or_else(|invalid| &invalid.metadata, |m| &m.metadata)
    }
    fn meta_ref_mut(&mut self) -> &mut ObjectMeta {
        match &mut self.0 {
            Ok(m) => &mut m.metadata,
            Err(invalid) => &mut invalid.metadata,
        }
    }
}

impl MachineMeta {
    fn meta_ref(&self) -> &ObjectMeta {
        &self.metadata.0
    }
    fn meta_ref_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A Machine as a real API server sends it: three managers' managedFields (trace 08).
    fn machine_json(spec: serde_json::Value) -> String {
        json!({
            "apiVersion": "machinist.dev/v1alpha1",
            "kind": "Machine",
            "metadata": {
                "name": "m1", "namespace": "ns", "uid": "u-1", "resourceVersion": "42", "generation": 1,
                "finalizers": ["machinist.dev/machine"],
                "annotations": {"a": "b"},
                "managedFields": [
                    {"manager": "kubectl", "operation": "Update", "apiVersion": "machinist.dev/v1alpha1",
                     "time": "2026-12-01T00:00:00Z", "fieldsType": "FieldsV1",
                     "fieldsV1": {"f:spec": {"f:driver": {"f:fake": {}}}}},
                    {"manager": "machinist", "operation": "Apply", "subresource": "status",
                     "apiVersion": "machinist.dev/v1alpha1", "fieldsType": "FieldsV1",
                     "fieldsV1": {"f:status": {"f:phase": {}, "f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}}}}}}
                ]
            },
            "spec": spec,
            "status": {"phase": "Running", "providerID": "fake-1"}
        })
        .to_string()
    }

    #[test]
    fn a_watched_machine_is_the_full_parse_without_managed_fields() {
        let text = machine_json(json!({"driver": {"fake": {}}}));
        let mut full: Machine = serde_json::from_str(&text).unwrap();
        assert_eq!(full.metadata.managed_fields.as_ref().map(Vec::len), Some(2), "the fixture has them");
        full.metadata.managed_fields = None;
        let watched: WatchedMachine = serde_json::from_str(&text).unwrap();
        assert_eq!(watched.0.unwrap(), full);
    }

    #[test]
    fn a_machine_that_does_not_parse_keeps_its_metadata_and_the_reason() {
        let text = machine_json(json!({"driver": {"fake": {}}, "powerState": "Sideways"}));
        let watched: WatchedMachine = serde_json::from_str(&text).unwrap();
        assert_eq!(watched.name_any(), "m1");
        assert_eq!(watched.uid().as_deref(), Some("u-1"));
        let invalid = watched.0.unwrap_err();
        assert!(invalid.error.contains("Sideways"), "{}", invalid.error);
        assert_eq!(invalid.metadata.managed_fields, None);
    }

    #[test]
    fn the_answer_to_a_write_is_read_for_its_metadata() {
        let answer: MachineMeta = serde_json::from_str(&machine_json(json!({"driver": {"fake": {}}}))).unwrap();
        assert_eq!(answer.resource_version().as_deref(), Some("42"));
        assert_eq!(answer.finalizers(), ["machinist.dev/machine"]);
        assert_eq!(answer.metadata.0.managed_fields, None);
        // And the same from an object with escaped keys and no metadata at all.
        let answer: MachineMeta = serde_json::from_str(r#"{"metad\u0061ta": {"n\u0061me": "x"}}"#).unwrap();
        assert_eq!(answer.name_any(), "x");
        assert!(serde_json::from_str::<MachineMeta>("{}").is_ok());
    }

    #[test]
    fn a_watch_list_of_machines_parses_item_by_item() {
        let list = format!(
            r#"{{"metadata": {{"resourceVersion": "7"}}, "items": [{}, {}]}}"#,
            machine_json(json!({"driver": {"fake": {}}})),
            machine_json(json!({"driver": 3}))
        );
        let list: kube::core::ObjectList<WatchedMachine> = serde_json::from_str(&list).unwrap();
        assert!(list.items[0].0.is_ok());
        assert!(list.items[1].0.is_err());
    }
}
