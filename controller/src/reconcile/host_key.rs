//! SSH host-key trust, decided in one place: which keys the Machine's host may present on
//! any connection (the controller's checks and the drivers' own logins alike), when an
//! acceptance applies, and what a mismatch tells the user.
//!
//! The rules:
//! - `spec.driver.generic.hostKeyFingerprint`, when set, is the user's own word: the only
//!   trusted key.
//! - Otherwise the pinned key (`status.ssh.hostKeyFingerprint`) is trusted, and so is the
//!   key the annotation `machinist.dev/accept-host-key` names (before anything is pinned,
//!   that one alone, whatever a console lists): honoured only when the host presents
//!   exactly that key, then pinned, and the annotation is removed.
//! - Before anything is pinned, the first contact is verified against the provider's
//!   console where the driver can read it, else trusted, and pinned.
//! - A mismatch is recorded once and not retried: the user accepts the key (the hold on
//!   the failure lifts when the annotation names the key presented), fixes the spec, or
//!   deletes the Machine with `deletionPolicy: Orphan`.

use kube::ResourceExt;

use crate::api::{ACCEPT_HOST_KEY_ANNOTATION, Machine, MachineStatus};

/// The condition and failure reason of a host presenting an untrusted key.
pub const HOST_KEY_MISMATCH: &str = "HostKeyMismatch";

/// How the host key of a successful SSH check came to be trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostKeyTrust {
    /// It is the pinned key (or the accepted one, or the spec's).
    Pinned,
    /// Nothing was pinned; it is one of the keys `source` shows (a console).
    Verified { source: String },
    /// Nothing was pinned and no other source showed the keys: trusted at first contact;
    /// `why` says why no source could verify it, when a driver has one.
    FirstContact { why: Option<String> },
}

/// The pinned host key.
pub fn pinned(status: Option<&MachineStatus>) -> Option<&str> {
    status.and_then(|s| s.ssh.as_ref()).and_then(|s| s.host_key_fingerprint.as_deref())
}

fn spec_fingerprint(machine: &Machine) -> Option<&str> {
    machine.spec.driver.generic.as_ref().and_then(|g| g.host_key_fingerprint.as_deref())
}

/// The value of the accept annotation, when set.
pub fn accept_annotation(machine: &Machine) -> Option<&str> {
    machine.annotations().get(ACCEPT_HOST_KEY_ANNOTATION).map(|a| a.trim()).filter(|a| !a.is_empty())
}

/// The host keys every SSH connection to the Machine's host accepts; empty before the
/// first contact.
pub fn trusted_host_keys(machine: &Machine) -> Vec<String> {
    if let Some(fingerprint) = spec_fingerprint(machine) {
        return vec![fingerprint.to_string()];
    }
    let mut trusted: Vec<String> = pinned(machine.status.as_ref()).map(str::to_string).into_iter().collect();
    // Before anything is pinned, an accepted key is the only one: the user's word wins
    // over a console that does not list it.
    if let Some(accepted) = accept_annotation(machine)
        && !trusted.iter().any(|t| t == accepted)
    {
        trusted.push(accepted.to_string());
    }
    trusted
}

/// Whether the user accepted exactly the key the host presented at the recorded
/// mismatch: that lifts the hold on the failure, as a spec change lifts other holds.
/// It holds only where the accepted key is trusted (not under a spec fingerprint), so a
/// lifted hold can never meet the same mismatch again: no loop.
pub(super) fn acceptance_pending(before: &MachineStatus, machine: &Machine) -> bool {
    let presented = before.ssh.as_ref().and_then(|s| s.presented_host_key_fingerprint.as_deref());
    before.failures.as_ref().is_some_and(|f| f.reason == HOST_KEY_MISMATCH)
        && presented.is_some_and(|p| trusted_host_keys(machine).iter().any(|t| t == p))
        && presented == accept_annotation(machine)
}

/// Whether the accept annotation has just done its work (its key replaced the pin from
/// `before` to `after`): the controller then removes it, so that it can never accept a
/// later key. An annotation that accepted nothing is left as the user wrote it.
pub fn accept_annotation_consumed(machine: &Machine, before: Option<&MachineStatus>, after: &MachineStatus) -> bool {
    let now = pinned(Some(after));
    accept_annotation(machine).is_some_and(|accepted| now == Some(accepted) && pinned(before) != now)
}

/// What the user can do about a host presenting `presented`, for the condition message.
pub(super) fn mismatch_advice(machine: &Machine, presented: &str) -> String {
    // Nothing here depends on the accept annotation: a value that does not match changes
    // nothing, not even this message.
    let mut advice = String::new();
    if spec_fingerprint(machine).is_some() {
        advice.push_str(&format!(
            "If the host was reinstalled or its key rotated on purpose, set spec.driver.generic.hostKeyFingerprint \
             to {presented}"
        ));
    } else {
        let why = match pinned(machine.status.as_ref()) {
            Some(_) => "If the host was reinstalled or its key rotated on purpose, accept the new key",
            None => "If you know this key to be the host's, accept it",
        };
        advice.push_str(&format!(
            "{why}: kubectl annotate machine {} {ACCEPT_HOST_KEY_ANNOTATION}={presented} --overwrite",
            machine.name_any()
        ));
    }
    if machine.metadata.deletion_timestamp.is_some() {
        advice.push_str(
            "; or set spec.deletionPolicy: Orphan to let the Machine go without logging in to the host again",
        );
    }
    advice.push_str("; otherwise someone may be intercepting the connection");
    advice
}

/// The SSHReady message for a successful check.
pub(super) fn ready_message(host: &str, port: u16, user: &str, fingerprint: &str, trust: &HostKeyTrust) -> String {
    let answers = format!("SSH answers on {host}:{port} as {user} with the Machine's key");
    match trust {
        HostKeyTrust::Pinned => format!("{answers}; host key {fingerprint} as pinned"),
        HostKeyTrust::Verified { source } => {
            format!("{answers}; host key {fingerprint} verified against {source}, and pinned")
        }
        HostKeyTrust::FirstContact { why: Some(why) } => {
            format!("{answers}; host key {fingerprint} trusted at first contact and pinned ({why})")
        }
        HostKeyTrust::FirstContact { why: None } => {
            format!("{answers}; host key {fingerprint} trusted at first contact and pinned")
        }
    }
}
