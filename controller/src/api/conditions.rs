//! The Machine's condition types and the one way conditions are set.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One condition of a Machine: `metav1.Condition` on the wire, with its type, status and
/// reason held as shared [`Text`]. Every cached Machine holds six conditions; with plain
/// strings those three fields were a third of the cache's heap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(description = "Condition contains details for one aspect of the current state of this API Resource.")]
pub struct Condition {
    /// lastTransitionTime is the last time the condition transitioned from one status to another. This should be when the underlying condition changed.  If that is not known, then using the time when the API field changed is acceptable.
    pub last_transition_time: Time,
    /// message is a human readable message indicating details about the transition. This may be an empty string.
    pub message: String,
    /// observedGeneration represents the .metadata.generation that the condition was set based upon. For instance, if .metadata.generation is currently 12, but the .status.conditions[x].observedGeneration is 9, the condition is out of date with respect to the current state of the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// reason contains a programmatic identifier indicating the reason for the condition's last transition. Producers of specific condition types may define expected values and meanings for this field, and whether the values are considered a guaranteed API. The value should be a CamelCase string. This field may not be empty.
    pub reason: Text,
    /// status of the condition, one of True, False, Unknown.
    pub status: Text,
    /// type of condition in CamelCase or in foo.example.com/CamelCase.
    #[serde(rename = "type")]
    pub type_: Text,
}

/// A short string that many objects share (a condition's type, status or reason): the
/// first copy is kept in a process-wide table and later ones point at it. The table is
/// bounded, since status is machinist's own but could hold anything; beyond it, strings
/// are simply not shared.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Text(Arc<str>);

/// How many distinct strings are shared at most: machinist's own reasons are a few dozen.
const SHARED_TEXTS: usize = 4096;

impl Text {
    pub fn new(s: &str) -> Text {
        static TABLE: OnceLock<Mutex<HashSet<Arc<str>>>> = OnceLock::new();
        let mut table = TABLE.get_or_init(Default::default).lock().expect("not poisoned");
        if let Some(shared) = table.get(s) {
            return Text(shared.clone());
        }
        let text: Arc<str> = Arc::from(s);
        if table.len() < SHARED_TEXTS {
            table.insert(text.clone());
        }
        Text(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Text {
        Text::new(s)
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<Text> for &str {
    fn eq(&self, other: &Text) -> bool {
        *self == &*other.0
    }
}

impl PartialEq<Text> for str {
    fn eq(&self, other: &Text) -> bool {
        self == &*other.0
    }
}

impl PartialEq<String> for Text {
    fn eq(&self, other: &String) -> bool {
        &*self.0 == other.as_str()
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Text, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Ok(Text::new(&s))
    }
}

impl JsonSchema for Text {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "String".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        String::json_schema(generator)
    }

    fn inline_schema() -> bool {
        true
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionType {
    /// Summary: running and usable.
    Ready,
    InstanceCreated,
    PowerStateSynced,
    SSHReady,
    Provisioned,
    Paused,
    Deleting,
}

impl ConditionType {
    /// Every condition, in the order status lists them.
    pub const ALL: [ConditionType; 7] = [
        ConditionType::Ready,
        ConditionType::InstanceCreated,
        ConditionType::PowerStateSynced,
        ConditionType::SSHReady,
        ConditionType::Provisioned,
        ConditionType::Paused,
        ConditionType::Deleting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::InstanceCreated => "InstanceCreated",
            ConditionType::PowerStateSynced => "PowerStateSynced",
            ConditionType::SSHReady => "SSHReady",
            ConditionType::Provisioned => "Provisioned",
            ConditionType::Paused => "Paused",
            ConditionType::Deleting => "Deleting",
        }
    }
}

/// Sets a condition, keeping `lastTransitionTime` unless the status flips, and the
/// list in [`ConditionType::ALL`] order so that equal content compares equal.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    kind: ConditionType,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: i64,
    now: Timestamp,
) {
    let status = if status { "True" } else { "False" };
    set_condition_status(conditions, kind, status, reason, message, generation, now)
}

/// As [`set_condition`], for a tri-state (`"Unknown"`) status.
pub fn set_condition_status(
    conditions: &mut Vec<Condition>,
    kind: ConditionType,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    generation: i64,
    now: Timestamp,
) {
    let message = message.into();
    let previous = conditions.iter().find(|c| c.type_ == kind.as_str());
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: Text::new(kind.as_str()),
        status: Text::new(status),
        reason: Text::new(reason),
        message,
        observed_generation: Some(generation),
        last_transition_time,
    };
    conditions.retain(|c| c.type_ != kind.as_str());
    conditions.push(condition);
    let order = |c: &Condition| ConditionType::ALL.iter().position(|k| c.type_ == *k.as_str()).unwrap_or(usize::MAX);
    conditions.sort_by_key(order);
}

pub fn get_condition(conditions: &[Condition], kind: ConditionType) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == kind.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_read_and_write_as_metav1_conditions_and_share_their_short_strings() {
        let json = serde_json::json!({
            "type": "Ready", "status": "True", "reason": "Ready", "message": "the instance is running and ready",
            "lastTransitionTime": "2026-12-01T10:00:00Z", "observedGeneration": 3
        });
        let a: Condition = serde_json::from_value(json.clone()).unwrap();
        let b: Condition = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(serde_json::to_value(&a).unwrap(), json, "the same object on the wire");
        // The same k8s-openapi type reads it identically.
        let upstream: k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition = serde_json::from_value(json).unwrap();
        assert_eq!((upstream.type_.as_str(), upstream.reason.as_str()), (a.type_.as_str(), a.reason.as_str()));
        assert!(Arc::ptr_eq(&a.reason.0, &b.reason.0), "one shared copy of the reason, not one per Machine");
        assert!(Arc::ptr_eq(&a.status.0, &b.status.0));
        assert_eq!(a.type_, "Ready");
        assert!(a.status != "False");
    }
}
