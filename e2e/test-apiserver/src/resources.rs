//! The resource types the server serves: built-in ones (namespaces, secrets,
//! configmaps, events, leases, CRDs) and those defined by CRDs at run time.

use std::sync::Arc;

use kube_cel::CompiledSchema;
use serde_json::Value;

/// What kind of special handling a resource type gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    Namespace,
    Secret,
    ConfigMap,
    /// `events.k8s.io/v1` events (the storage of all events).
    Event,
    /// core/v1 `events`: a view over the `events.k8s.io` storage.
    CoreEvent,
    Lease,
    Crd,
    /// Defined by a CustomResourceDefinition.
    Custom,
}

/// One served version of a resource.
#[derive(Clone, Debug)]
pub struct VersionInfo {
    pub name: String,
    /// The version's `openAPIV3Schema` (CRDs only).
    pub schema: Option<Value>,
    /// CEL rules compiled once per CRD version.
    pub compiled: Option<Arc<CompiledSchema>>,
    pub printer_columns: Vec<Value>,
    pub has_status: bool,
}

#[derive(Clone, Debug)]
pub struct ResourceType {
    pub group: String,
    /// Served versions; the first is the preferred (storage) one.
    pub versions: Vec<VersionInfo>,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub builtin: Builtin,
    /// `metadata.generation` is maintained (custom resources and CRDs).
    pub has_generation: bool,
}

impl ResourceType {
    /// The key objects are stored under (core events share events.k8s.io's).
    pub fn storage_key(&self) -> String {
        if self.builtin == Builtin::CoreEvent {
            "events.k8s.io/events".into()
        } else {
            format!("{}/{}", self.group, self.plural)
        }
    }

    pub fn group_resource(&self) -> String {
        crate::error::group_resource(&self.group, &self.plural)
    }

    pub fn preferred_version(&self) -> &VersionInfo {
        &self.versions[0]
    }

    pub fn version(&self, v: &str) -> Option<&VersionInfo> {
        self.versions.iter().find(|x| x.name == v)
    }

    pub fn api_version(&self, v: &str) -> String {
        if self.group.is_empty() { v.to_string() } else { format!("{}/{}", self.group, v) }
    }

    /// Whether writes through the main resource ignore `status` (status subresource).
    pub fn has_status(&self) -> bool {
        self.preferred_version().has_status
    }

    pub fn schema(&self) -> Option<&Value> {
        self.preferred_version().schema.as_ref()
    }

    #[allow(clippy::too_many_arguments)]
    fn builtin(
        group: &str,
        version: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
        short: &[&str],
        builtin: Builtin,
        has_status: bool,
    ) -> ResourceType {
        ResourceType {
            group: group.into(),
            versions: vec![VersionInfo {
                name: version.into(),
                schema: None,
                compiled: None,
                printer_columns: vec![],
                has_status,
            }],
            plural: plural.into(),
            singular: kind.to_lowercase(),
            kind: kind.into(),
            list_kind: format!("{kind}List"),
            namespaced,
            short_names: short.iter().map(|s| s.to_string()).collect(),
            categories: vec![],
            builtin,
            has_generation: builtin == Builtin::Crd,
        }
    }

    /// The built-in resource types every server starts with.
    pub fn builtins() -> Vec<ResourceType> {
        use Builtin::*;
        vec![
            Self::builtin("", "v1", "namespaces", "Namespace", false, &["ns"], Namespace, true),
            Self::builtin("", "v1", "secrets", "Secret", true, &[], Secret, false),
            Self::builtin("", "v1", "configmaps", "ConfigMap", true, &["cm"], ConfigMap, false),
            Self::builtin("", "v1", "events", "Event", true, &["ev"], CoreEvent, false),
            Self::builtin("events.k8s.io", "v1", "events", "Event", true, &["ev"], Event, false),
            Self::builtin("coordination.k8s.io", "v1", "leases", "Lease", true, &[], Lease, false),
            Self::builtin(
                "apiextensions.k8s.io",
                "v1",
                "customresourcedefinitions",
                "CustomResourceDefinition",
                false,
                &["crd", "crds"],
                Crd,
                true,
            ),
        ]
    }

    /// Build the resource type a (valid) CRD object defines.
    pub fn from_crd(crd: &Value) -> Option<ResourceType> {
        let spec = crd.get("spec")?;
        let names = spec.get("names")?;
        let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
        let strs = |v: Option<&Value>| -> Vec<String> {
            v.and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
                .unwrap_or_default()
        };
        let kind = s(names.get("kind"));
        let mut versions: Vec<VersionInfo> = Vec::new();
        let mut storage_first: Vec<VersionInfo> = Vec::new();
        for v in spec.get("versions")?.as_array()? {
            if v.get("served").and_then(Value::as_bool) == Some(false) {
                continue;
            }
            let schema = v.pointer("/schema/openAPIV3Schema").cloned();
            let compiled = schema.as_ref().map(|s| Arc::new(kube_cel::compile_schema(s)));
            let info = VersionInfo {
                name: s(v.get("name")),
                schema,
                compiled,
                printer_columns: v
                    .get("additionalPrinterColumns")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
                has_status: v.pointer("/subresources/status").is_some(),
            };
            if v.get("storage").and_then(Value::as_bool) == Some(true) {
                storage_first.insert(0, info);
            } else {
                versions.push(info);
            }
        }
        storage_first.extend(versions);
        if storage_first.is_empty() {
            return None;
        }
        let singular = match s(names.get("singular")) {
            x if x.is_empty() => kind.to_lowercase(),
            x => x,
        };
        let list_kind = match s(names.get("listKind")) {
            x if x.is_empty() => format!("{kind}List"),
            x => x,
        };
        Some(ResourceType {
            group: s(spec.get("group")),
            versions: storage_first,
            plural: s(names.get("plural")),
            singular,
            kind,
            list_kind,
            namespaced: s(spec.get("scope")) != "Cluster",
            short_names: strs(names.get("shortNames")),
            categories: strs(names.get("categories")),
            builtin: Builtin::Custom,
            has_generation: true,
        })
    }
}
