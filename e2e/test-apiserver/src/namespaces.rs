//! The status conditions kube-controller-manager's namespace controller
//! keeps on a Terminating namespace: what its deletion waits for.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// Condition types in kube's order, with their "nothing wrong" reason and message.
const OK: [(&str, &str, &str); 5] = [
    ("NamespaceDeletionDiscoveryFailure", "ResourcesDiscovered", "All resources successfully discovered"),
    ("NamespaceDeletionGroupVersionParsingFailure", "ParsedGroupVersions", "All legacy kube types successfully parsed"),
    (
        "NamespaceDeletionContentFailure",
        "ContentDeleted",
        "All content successfully deleted, may be waiting on finalization",
    ),
    ("NamespaceContentRemaining", "ContentRemoved", "All content successfully removed"),
    ("NamespaceFinalizersRemaining", "ContentHasNoFinalizers", "All content-preserving finalizers finished"),
];

/// What is left in a namespace after its content was deleted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Remaining {
    /// `resource.group` -> objects left (they have finalizers).
    pub by_resource: BTreeMap<String, usize>,
    /// finalizer -> objects carrying it.
    pub by_finalizer: BTreeMap<String, usize>,
}

impl Remaining {
    pub fn is_empty(&self) -> bool {
        self.by_resource.is_empty()
    }

    fn condition(&self, ty: &str) -> Option<(&'static str, String)> {
        let list = |m: &BTreeMap<String, usize>, f: &dyn Fn(&String, &usize) -> String| {
            let mut v: Vec<String> = m.iter().map(|(k, n)| f(k, n)).collect();
            v.sort();
            v.join(", ")
        };
        match ty {
            "NamespaceContentRemaining" if !self.by_resource.is_empty() => Some((
                "SomeResourcesRemain",
                format!(
                    "Some resources are remaining: {}",
                    list(&self.by_resource, &|r, n| format!("{r} has {n} resource instances"))
                ),
            )),
            "NamespaceFinalizersRemaining" if !self.by_finalizer.is_empty() => Some((
                "SomeFinalizersRemain",
                format!(
                    "Some content in the namespace has finalizers remaining: {}",
                    list(&self.by_finalizer, &|f, n| format!("{f} in {n} resource instances"))
                ),
            )),
            _ => None,
        }
    }
}

/// The namespace's conditions updated for `remaining`, as kube's
/// `updateConditions` does: a condition keeps its lastTransitionTime unless
/// its status flips; missing ones are appended in kube's order.
pub fn conditions(old: &[Value], remaining: &Remaining, now: &str) -> Vec<Value> {
    let mut out = old.to_vec();
    for (ty, ok_reason, ok_message) in OK {
        let (status, reason, message) = match remaining.condition(ty) {
            Some((reason, message)) => ("True", reason, message),
            None => ("False", ok_reason, ok_message.to_string()),
        };
        match out.iter_mut().find(|c| c.get("type").and_then(Value::as_str) == Some(ty)) {
            Some(c) => {
                if c.get("status").and_then(Value::as_str) != Some(status) {
                    c["lastTransitionTime"] = json!(now);
                }
                c["status"] = json!(status);
                c["reason"] = json!(reason);
                c["message"] = json!(message);
            }
            None => out.push(json!({"type": ty, "status": status, "lastTransitionTime": now,
                "reason": reason, "message": message})),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_say_what_remains() {
        let mut r = Remaining::default();
        r.by_resource.insert("secrets.".into(), 1);
        r.by_resource.insert("gadgets.g.io".into(), 2);
        r.by_finalizer.insert("x/y".into(), 3);
        let c = conditions(&[], &r, "t1");
        assert_eq!(c.len(), 5);
        assert_eq!(
            c[3]["message"],
            "Some resources are remaining: gadgets.g.io has 2 resource instances, secrets. has 1 resource instances"
        );
        assert_eq!(c[4]["reason"], "SomeFinalizersRemain");
        let done = conditions(&c, &Remaining::default(), "t2");
        assert_eq!(done[3]["reason"], "ContentRemoved");
        assert_eq!(done[3]["lastTransitionTime"], "t2");
        assert_eq!(done[0]["lastTransitionTime"], "t1", "unchanged status keeps its time");
    }
}
