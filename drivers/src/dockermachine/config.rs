//! The `spec.driver.dockerMachine` block, and how its flags become the plugin's.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::gob::{Type, Value};
use crate::{CREDENTIALS_FIELD, Credentials, DriverError};

pub const FIELD: &str = "spec.driver.dockerMachine";

/// Any Docker Machine driver plugin (`docker-machine-driver-<name>`, from machinist's
/// plugin directory), driven over the plugin protocol: Hetzner, Linode, OpenStack,
/// vSphere, docker-machine's own drivers, ... The plugin generates the instance's SSH
/// key; machinist keeps it in the Machine's key Secret and uses it for SSHReady and
/// provisioning. The driver's state (its config and store directory) lives in a Secret
/// owned by the Machine.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DockerMachineConfig {
    /// The plugin: `docker-machine-driver-<name>` in the plugin directory
    /// (`--driver-plugin-dir`; `machinist plugins` lists them). Cannot change.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self == oldSelf",
        "message": "name cannot change; create a new Machine for another driver"
    }]))]
    pub name: String,
    /// The driver's create flags, without `--` (`hetzner-server-type: cx22`): a string,
    /// an integer, a boolean or a list of strings, as the flag's type is. Flags not
    /// given keep the plugin's defaults. Secrets do not belong here: every key of
    /// `credentialsSecretRef` is passed as the flag it names (by flag name or by its
    /// environment variable, e.g. `HETZNER_API_TOKEN`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "flag_values_schema")]
    pub flags: BTreeMap<String, serde_json::Value>,
    /// Flags whose value is a file path (`generic-ssh-key`), each naming a key of
    /// `credentialsSecretRef`: that key is written to a file (mode 0600) in the driver's
    /// store directory, and the file's path is passed as the flag.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub file_flags: BTreeMap<String, String>,
    /// Whether the instances are reached over SSH with the key the plugin made (default
    /// true): SSHReady, host-key pinning and provisioning. False for drivers that offer no
    /// SSH, such as docker-machine's `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<bool>,
    /// How long one plugin call may take, in seconds, before the plugin is killed and the
    /// call counts as a transient failure (default: 1200 for Create and Remove, 600 for
    /// Start, Stop, Kill and Restart, 120 for the others). The controller's
    /// `--driver-timeout` (default 600) bounds every driver call as well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 7200))]
    pub call_timeout_seconds: Option<u32>,
}

impl DockerMachineConfig {
    pub fn offers_ssh(&self) -> bool {
        self.ssh.unwrap_or(true)
    }
}

/// A map of flag values of several types: kept as given, checked against the plugin's
/// own flags when the Machine is reconciled.
fn flag_values_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": 256,
        "additionalProperties": { "x-kubernetes-preserve-unknown-fields": true },
    })
}

/// The type of a plugin flag (`mcnflag`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum FlagKind {
    String,
    Int,
    Bool,
    StringSlice,
}

impl FlagKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FlagKind::String => "string",
            FlagKind::Int => "int",
            FlagKind::Bool => "bool",
            FlagKind::StringSlice => "string list",
        }
    }
}

/// One create flag, as GetCreateFlags answers it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Flag {
    pub name: String,
    pub kind: FlagKind,
    pub usage: String,
    pub env_var: String,
    /// The plugin's default, as a flag value.
    pub default: FlagValue,
}

/// A flag's value, as SetConfigFromFlags sends it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum FlagValue {
    String(String),
    Int(i64),
    Bool(bool),
    StringSlice(Vec<String>),
}

impl FlagValue {
    /// The interface value Go's `RPCFlags.Values` holds.
    fn to_gob(&self) -> Value {
        match self {
            FlagValue::String(s) => Value::interface("string", Type::String, Value::String(s.clone())),
            FlagValue::Int(i) => Value::interface("int", Type::Int, Value::Int(*i)),
            FlagValue::Bool(b) => Value::interface("bool", Type::Bool, Value::Bool(*b)),
            FlagValue::StringSlice(items) => Value::interface(
                "[]string",
                Type::slice(Type::String),
                Value::List(items.iter().map(|s| Value::String(s.clone())).collect()),
            ),
        }
    }
}

/// Reads GetCreateFlags' answer: `[]mcnflag.Flag`.
pub fn flags_from_gob(reply: &Value) -> Result<Vec<Flag>, String> {
    let Value::List(items) = reply else { return Err(format!("GetCreateFlags answered {reply:?}")) };
    let mut flags = Vec::new();
    for item in items {
        let Value::Interface(Some(concrete)) = item else { continue };
        let v = &concrete.value;
        let kind = match concrete.name.rsplit('.').next().unwrap_or_default() {
            "StringFlag" => FlagKind::String,
            "IntFlag" => FlagKind::Int,
            "BoolFlag" => FlagKind::Bool,
            "StringSliceFlag" => FlagKind::StringSlice,
            other => return Err(format!("GetCreateFlags answered a flag of unknown type {other}")),
        };
        let default = match kind {
            FlagKind::String => FlagValue::String(v.str_field("Value")),
            FlagKind::Int => FlagValue::Int(v.field("Value").and_then(Value::as_i64).unwrap_or(0)),
            FlagKind::Bool => FlagValue::Bool(false),
            FlagKind::StringSlice => FlagValue::StringSlice(match v.field("Value") {
                Some(Value::List(items)) => items.iter().filter_map(|i| i.as_str().map(str::to_string)).collect(),
                _ => Vec::new(),
            }),
        };
        flags.push(Flag {
            name: v.str_field("Name"),
            kind,
            usage: v.str_field("Usage"),
            env_var: v.str_field("EnvVar"),
            default,
        });
    }
    Ok(flags)
}

/// The values SetConfigFromFlags sends: every flag's default, overlaid by the spec's
/// flags, then by the credentials. `files` are the paths the `fileFlags` were written to.
/// Errors name the field at fault.
pub fn flag_values(
    flags: &[Flag],
    config: &DockerMachineConfig,
    credentials: &Credentials,
    files: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, FlagValue>, DriverError> {
    let known = || flags.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ");
    let by_name = |name: &str| flags.iter().find(|f| f.name == name);
    let mut values: BTreeMap<String, FlagValue> = flags.iter().map(|f| (f.name.clone(), f.default.clone())).collect();
    for (name, given) in &config.flags {
        let field = format!("{FIELD}.flags.{name}");
        let Some(flag) = by_name(name) else {
            return Err(DriverError::invalid_config(
                field,
                format!("plugin {} has no flag {name}; its flags: {}", config.name, known()),
            ));
        };
        if credential_for(flag, credentials).is_some() {
            return Err(DriverError::invalid_config(
                field,
                "also given in credentialsSecretRef; set it in one place (the Secret, if it is secret)",
            ));
        }
        values.insert(name.clone(), from_json(flag, given).map_err(|m| DriverError::invalid_config(field, m))?);
    }
    for (name, key) in &config.file_flags {
        let field = format!("{FIELD}.fileFlags.{name}");
        if by_name(name).is_none_or(|f| f.kind != FlagKind::String) || config.flags.contains_key(name) {
            return Err(DriverError::invalid_config(
                field,
                format!("plugin {} has no string flag {name} that flags does not already set", config.name),
            ));
        }
        let Some(path) = files.get(name) else {
            return Err(DriverError::invalid_config(
                CREDENTIALS_FIELD,
                format!("{field} names the key {key}, which the credentials Secret does not have"),
            ));
        };
        values.insert(name.clone(), FlagValue::String(path.clone()));
    }
    for key in credentials.0.keys() {
        if config.file_flags.values().any(|k| k == key) {
            continue;
        }
        let Some(flag) = flags.iter().find(|f| f.name == *key || (!f.env_var.is_empty() && f.env_var == *key)) else {
            return Err(DriverError::invalid_config(
                CREDENTIALS_FIELD,
                format!(
                    "the key {key} names no flag of plugin {} (by name or environment variable); its flags: {}",
                    config.name,
                    known()
                ),
            ));
        };
        let text = credential_for(flag, credentials).unwrap_or_default();
        let value = from_text(flag, &text).map_err(|m| {
            DriverError::invalid_config(CREDENTIALS_FIELD, format!("the key {key}, for flag {}: {m}", flag.name))
        })?;
        values.insert(flag.name.clone(), value);
    }
    Ok(values)
}

/// A flag's credential value (by flag name, else by environment variable), as text
/// without the trailing newline files usually end with.
fn credential_for(flag: &Flag, credentials: &Credentials) -> Option<String> {
    let raw = credentials
        .0
        .get(&flag.name)
        .or_else(|| (!flag.env_var.is_empty()).then(|| credentials.0.get(&flag.env_var)).flatten())?;
    Some(String::from_utf8_lossy(raw).trim_end_matches(['\r', '\n']).to_string())
}

fn from_json(flag: &Flag, given: &serde_json::Value) -> Result<FlagValue, String> {
    use serde_json::Value as J;
    let wrong = || format!("must be a {} (the plugin's flag type), not {given}", flag.kind.as_str());
    match (flag.kind, given) {
        (FlagKind::String, J::String(s)) => Ok(FlagValue::String(s.clone())),
        // YAML turns `1.5` or `10` into numbers; a string flag takes them as written.
        (FlagKind::String, J::Number(n)) => Ok(FlagValue::String(n.to_string())),
        (FlagKind::Int, J::Number(n)) => n.as_i64().map(FlagValue::Int).ok_or_else(wrong),
        (FlagKind::Bool, J::Bool(b)) => Ok(FlagValue::Bool(*b)),
        (FlagKind::StringSlice, J::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string).ok_or_else(wrong))
            .collect::<Result<_, _>>()
            .map(FlagValue::StringSlice),
        _ => Err(wrong()),
    }
}

fn from_text(flag: &Flag, text: &str) -> Result<FlagValue, String> {
    match flag.kind {
        FlagKind::String => Ok(FlagValue::String(text.to_string())),
        FlagKind::Int => text.trim().parse().map(FlagValue::Int).map_err(|_| "must be an integer".to_string()),
        FlagKind::Bool => match text.trim() {
            "true" | "1" => Ok(FlagValue::Bool(true)),
            "false" | "0" | "" => Ok(FlagValue::Bool(false)),
            _ => Err("must be true or false".to_string()),
        },
        FlagKind::StringSlice => Ok(FlagValue::StringSlice(
            text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect(),
        )),
    }
}

/// SetConfigFromFlags' argument: a `drivers.DriverOptions` holding `*rpcdriver.RPCFlags`.
pub fn rpc_flags(values: &BTreeMap<String, FlagValue>) -> (Type, Value) {
    let rpc_flags = Type::structure("RPCFlags", &[("Values", Type::map(Type::String, Type::Interface))]);
    let map = Value::Map(values.iter().map(|(k, v)| (Value::String(k.clone()), v.to_gob())).collect());
    (Type::Interface, Value::interface("*rpcdriver.RPCFlags", rpc_flags, Value::Struct(vec![("Values".into(), map)])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(name: &str, kind: FlagKind, env: &str, default: FlagValue) -> Flag {
        Flag { name: name.into(), kind, usage: String::new(), env_var: env.into(), default }
    }

    fn flags() -> Vec<Flag> {
        vec![
            flag("x-token", FlagKind::String, "X_TOKEN", FlagValue::String(String::new())),
            flag("x-size", FlagKind::Int, "", FlagValue::Int(10)),
            flag("x-private", FlagKind::Bool, "", FlagValue::Bool(false)),
            flag("x-tags", FlagKind::StringSlice, "", FlagValue::StringSlice(vec![])),
            flag("x-key", FlagKind::String, "", FlagValue::String(String::new())),
        ]
    }

    fn config(flags: serde_json::Value) -> DockerMachineConfig {
        DockerMachineConfig {
            name: "x".into(),
            flags: serde_json::from_value(flags).unwrap(),
            file_flags: BTreeMap::new(),
            ssh: None,
            call_timeout_seconds: None,
        }
    }

    #[test]
    fn defaults_are_overlaid_by_the_spec_then_by_the_credentials() {
        let credentials = Credentials(BTreeMap::from([("X_TOKEN".to_string(), b"s3cret\n".to_vec())]));
        let values = flag_values(
            &flags(),
            &config(serde_json::json!({"x-size": 20, "x-tags": ["a", "b"]})),
            &credentials,
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(values["x-size"], FlagValue::Int(20));
        assert_eq!(values["x-private"], FlagValue::Bool(false));
        assert_eq!(values["x-tags"], FlagValue::StringSlice(vec!["a".into(), "b".into()]));
        assert_eq!(values["x-token"], FlagValue::String("s3cret".into()));
    }

    #[test]
    fn unknown_flags_and_wrong_types_name_the_field() {
        let none = Credentials::default();
        let e = flag_values(&flags(), &config(serde_json::json!({"x-sise": 1})), &none, &BTreeMap::new()).unwrap_err();
        assert!(
            matches!(&e, DriverError::InvalidConfig { field, message }
            if field == "spec.driver.dockerMachine.flags.x-sise" && message.contains("x-size")),
            "{e}"
        );
        assert!(!e.is_retryable());
        let e =
            flag_values(&flags(), &config(serde_json::json!({"x-size": "big"})), &none, &BTreeMap::new()).unwrap_err();
        assert!(matches!(&e, DriverError::InvalidConfig { field, .. } if field.ends_with("flags.x-size")), "{e}");
        let e = flag_values(&flags(), &config(serde_json::json!({"x-private": "yes"})), &none, &BTreeMap::new());
        assert!(e.is_err());
        let stray = Credentials(BTreeMap::from([("OTHER".to_string(), b"v".to_vec())]));
        let e = flag_values(&flags(), &config(serde_json::json!({})), &stray, &BTreeMap::new()).unwrap_err();
        assert!(matches!(&e, DriverError::InvalidConfig { field, .. } if field == CREDENTIALS_FIELD), "{e}");
    }

    #[test]
    fn a_file_flag_passes_the_path_of_its_credential() {
        let mut c = config(serde_json::json!({}));
        c.file_flags.insert("x-key".into(), "id".into());
        let credentials = Credentials(BTreeMap::from([("id".to_string(), b"KEY".to_vec())]));
        let files = BTreeMap::from([("x-key".to_string(), "/store/files/id".to_string())]);
        let values = flag_values(&flags(), &c, &credentials, &files).unwrap();
        assert_eq!(values["x-key"], FlagValue::String("/store/files/id".into()));
    }
}
