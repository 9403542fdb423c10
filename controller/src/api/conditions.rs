//! The Machine's condition types and the one way conditions are set.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

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
        type_: kind.as_str().to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: Some(generation),
        last_transition_time,
    };
    conditions.retain(|c| c.type_ != kind.as_str());
    conditions.push(condition);
    let order = |c: &Condition| ConditionType::ALL.iter().position(|k| k.as_str() == c.type_).unwrap_or(usize::MAX);
    conditions.sort_by_key(order);
}

pub fn get_condition(conditions: &[Condition], kind: ConditionType) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == kind.as_str())
}
