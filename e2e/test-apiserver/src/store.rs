//! In-memory object storage: one process-wide resourceVersion counter,
//! objects keyed by resource / namespace / name, a bounded history of watch
//! events, and the write semantics of kube-apiserver (+ kube-controller-
//! manager's garbage collector, run synchronously inside the write that
//! triggers it, and its namespace controller, run right after the write:
//! `Inner::run_controllers`).
//!
//! All state sits behind one mutex; each request holds it only for the
//! in-memory computation (no I/O, no serialization of responses).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::Rng as _;
use serde_json::{Map, Value, json};

use crate::error::{ApiError, Cause};
use crate::managed::{self, FieldSet};
use crate::namespaces;
use crate::patch::{self, PatchType};
use crate::resources::{Builtin, ResourceType};
use crate::typed::Typed;
use crate::validation;

/// The first resourceVersion handed out is just above this (a fresh real
/// cluster is never at "1" either, and it keeps small RVs clearly "too old").
pub const INITIAL_RV: u64 = 100;

const NAMESPACES: &str = "/namespaces";
const CRDS: &str = "apiextensions.k8s.io/customresourcedefinitions";
/// The field manager of the controllers kube-controller-manager runs.
const KCM: &str = "kube-controller-manager";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One entry of the watch history.
#[derive(Debug)]
pub struct HistEvent {
    pub rv: u64,
    pub key: String,
    pub ns: String,
    pub etype: EventType,
    pub obj: Arc<Value>,
    /// The object before this event (for selector transitions and for
    /// reconstructing past states of `resourceVersionMatch=Exact` lists).
    pub prev: Option<Arc<Value>>,
}

type ObjKey = (String, String);

/// Which part of an object a write addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sub {
    Main,
    Status,
    /// A namespace's `/finalize`: the only way to change its `spec.finalizers`.
    Finalize,
}

#[derive(Clone, Debug, Default)]
pub struct WriteOpts {
    /// The field manager (`fieldManager`, else the User-Agent's first word).
    pub manager: String,
    /// `force=true`: a server-side apply takes over conflicting fields.
    pub force: bool,
    pub dry_run: bool,
    /// The write came through `events.k8s.io` (whose validation applies).
    pub via_events_api: bool,
    /// Filled with the paths of unknown (pruned) fields, for fieldValidation.
    pub unknown_fields: Vec<String>,
    /// `fieldValidation=Strict`: unknown fields are an error.
    pub strict: bool,
    /// The fields a server-side apply's configuration sets.
    pub(crate) apply: Option<FieldSet>,
}

fn check_strict(rt: &ResourceType, version: &str, opts: &WriteOpts) -> Result<(), ApiError> {
    if !opts.strict || opts.unknown_fields.is_empty() {
        return Ok(());
    }
    let fields: Vec<String> =
        opts.unknown_fields.iter().map(|f| format!("unknown field {:?}", f.trim_start_matches('.'))).collect();
    Err(ApiError::bad_request(format!(
        "{} in version {version:?} cannot be handled as a {}: strict decoding error: {}",
        rt.kind,
        rt.kind,
        fields.join(", ")
    )))
}

#[derive(Clone, Debug, Default)]
pub struct DeleteOpts {
    pub propagation: Option<String>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub dry_run: bool,
}

pub enum DeleteOutcome {
    /// The object stays (finalizers, or a terminating namespace): 200 with it.
    Pending(Arc<Value>),
    /// The object is gone: 200 with a Success Status.
    Deleted(Arc<Value>),
}

pub struct Inner {
    pub rv: u64,
    pub types: BTreeMap<(String, String), Arc<ResourceType>>,
    pub objects: HashMap<String, BTreeMap<ObjKey, Arc<Value>>>,
    /// uid -> where the object lives (for garbage collection).
    uids: HashMap<String, (String, String, String)>,
    /// owner uid -> dependents (storage key, namespace, name).
    owners: HashMap<String, BTreeSet<(String, String, String)>>,
    pub history: VecDeque<Arc<HistEvent>>,
    history_cap: usize,
    /// Events with rv <= this may have been dropped from the history.
    pub compacted_rv: u64,
    /// rv at which each storage key began to be served (CRDs: when established).
    pub start_rv: HashMap<String, u64>,
    /// Terminating namespaces whose content changed: the namespace
    /// controller's work queue.
    dirty_namespaces: BTreeSet<String>,
}

pub struct Store {
    inner: Mutex<Inner>,
    latest: tokio::sync::watch::Sender<u64>,
}

pub fn now_rfc3339() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn new_uid() -> String {
    let b: [u8; 16] = rand::rng().random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-4{}-a{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

fn random_suffix() -> String {
    // kube's alphabet for generateName (no vowels, no confusable digits).
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut r = rand::rng();
    (0..5).map(|_| ALPHA[r.random_range(0..ALPHA.len())] as char).collect()
}

pub fn meta<'a>(obj: &'a Value, field: &str) -> Option<&'a Value> {
    obj.get("metadata").and_then(|m| m.get(field))
}

pub fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    meta(obj, field).and_then(Value::as_str).unwrap_or_default()
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = Value::Object(Map::new());
    }
    obj["metadata"].as_object_mut().expect("metadata object")
}

fn finalizers(obj: &Value) -> Vec<String> {
    meta(obj, "finalizers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|f| f.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

fn owner_uids(obj: &Value) -> Vec<String> {
    meta(obj, "ownerReferences")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|o| o.get("uid").and_then(Value::as_str).map(String::from)).collect())
        .unwrap_or_default()
}

fn is_deleting(obj: &Value) -> bool {
    meta(obj, "deletionTimestamp").is_some_and(|v| !v.is_null())
}

/// Keep only ObjectMeta's fields and drop empty collections (omitempty).
fn normalize_metadata(obj: &mut Value) {
    let m = meta_mut(obj);
    const KNOWN: &[&str] = &[
        "name",
        "generateName",
        "namespace",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    ];
    m.retain(|k, v| {
        KNOWN.contains(&k.as_str())
            && !v.is_null()
            && !(v.as_object().is_some_and(Map::is_empty))
            && !(v.as_array().is_some_and(Vec::is_empty))
            && !(v.as_str().is_some_and(str::is_empty))
    });
}

/// The object with the fields a no-op check and generation ignore removed.
fn without(obj: &Value, fields: &[&str]) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        for f in fields {
            m.remove(*f);
        }
    }
    o
}

fn same_ignoring_rv(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        v
    };
    strip(a) == strip(b)
}

impl Store {
    pub fn new(history_cap: usize) -> Arc<Store> {
        let mut types = BTreeMap::new();
        let mut start_rv = HashMap::new();
        for rt in ResourceType::builtins() {
            start_rv.insert(rt.storage_key(), INITIAL_RV);
            types.insert((rt.group.clone(), rt.plural.clone()), Arc::new(rt));
        }
        let inner = Inner {
            rv: INITIAL_RV,
            types,
            objects: HashMap::new(),
            uids: HashMap::new(),
            owners: HashMap::new(),
            history: VecDeque::new(),
            history_cap: history_cap.max(1),
            compacted_rv: INITIAL_RV,
            start_rv,
            dirty_namespaces: BTreeSet::new(),
        };
        let (latest, _) = tokio::sync::watch::channel(INITIAL_RV);
        let store = Arc::new(Store { inner: Mutex::new(inner), latest });
        {
            let mut g = store.lock();
            let ns_rt = g.type_of("", "namespaces").expect("builtin");
            for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
                let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
                let mut opts = WriteOpts { manager: "kube-apiserver".into(), ..Default::default() };
                g.create(&ns_rt, "v1", "", obj, &mut opts).expect("bootstrap namespace");
            }
        }
        store.notify();
        store
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock must not wedge every later request.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wake watchers after a write (call after releasing the lock).
    pub fn notify(&self) {
        let rv = self.lock().rv;
        self.latest.send_replace(rv);
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.latest.subscribe()
    }
}

impl Inner {
    pub fn type_of(&self, group: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types.get(&(group.to_string(), plural.to_string())).cloned()
    }

    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> Result<Arc<Value>, ApiError> {
        self.objects
            .get(&rt.storage_key())
            .and_then(|b| b.get(&(ns.to_string(), name.to_string())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// Objects of a storage key (optionally in one namespace), in key order,
    /// as they were at `at_rv` (`resourceVersionMatch=Exact`) or now.
    pub fn snapshot(&self, key: &str, ns: Option<&str>, at_rv: Option<u64>) -> Result<Vec<Arc<Value>>, ApiError> {
        let in_ns = |n: &str| ns.is_none_or(|x| x == n);
        let bucket = self.objects.get(key);
        let current = || {
            bucket
                .into_iter()
                .flat_map(|b| b.iter())
                .filter(|((n, _), _)| in_ns(n))
                .map(|(_, o)| o.clone())
                .collect::<Vec<_>>()
        };
        let Some(at) = at_rv.filter(|at| *at < self.rv) else {
            return Ok(current());
        };
        if self.compacted_rv > INITIAL_RV && at < self.compacted_rv {
            return Err(ApiError::expired("The resourceVersion for the provided list is too old."));
        }
        // Undo the events newer than `at`, newest first.
        let mut state: BTreeMap<ObjKey, Arc<Value>> = bucket
            .into_iter()
            .flat_map(|b| b.iter())
            .filter(|((n, _), _)| in_ns(n))
            .map(|(k, o)| (k.clone(), o.clone()))
            .collect();
        for ev in self.history.iter().rev() {
            if ev.rv <= at {
                break;
            }
            if ev.key != key || !in_ns(&ev.ns) {
                continue;
            }
            let k = (ev.ns.clone(), meta_str(&ev.obj, "name").to_string());
            match (ev.etype, &ev.prev) {
                (EventType::Added, _) => {
                    state.remove(&k);
                }
                (_, Some(p)) => {
                    state.insert(k, p.clone());
                }
                (_, None) => {}
            }
        }
        Ok(state.into_values().collect())
    }

    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, ev: HistEvent) {
        if self.history.len() >= self.history_cap
            && let Some(old) = self.history.pop_front()
        {
            self.compacted_rv = old.rv;
        }
        self.history.push_back(Arc::new(ev));
    }

    fn index(&mut self, key: &str, ns: &str, name: &str, old: Option<&Value>, new: Option<&Value>) {
        let loc = (key.to_string(), ns.to_string(), name.to_string());
        if let Some(o) = old {
            for u in owner_uids(o) {
                if let Some(s) = self.owners.get_mut(&u) {
                    s.remove(&loc);
                    if s.is_empty() {
                        self.owners.remove(&u);
                    }
                }
            }
            self.uids.remove(meta_str(o, "uid"));
        }
        if let Some(n) = new {
            for u in owner_uids(n) {
                self.owners.entry(u).or_default().insert(loc.clone());
            }
            self.uids.insert(meta_str(n, "uid").to_string(), loc);
        }
    }

    /// Store `obj` with a fresh resourceVersion and record the watch event.
    fn put(&mut self, key: &str, ns: &str, mut obj: Value) -> Arc<Value> {
        let rv = self.bump();
        meta_mut(&mut obj).insert("resourceVersion".into(), Value::String(rv.to_string()));
        let name = meta_str(&obj, "name").to_string();
        let obj = Arc::new(obj);
        let prev = self.objects.entry(key.to_string()).or_default().insert((ns.to_string(), name.clone()), obj.clone());
        self.index(key, ns, &name, prev.as_deref(), Some(&obj));
        self.record(HistEvent {
            rv,
            key: key.to_string(),
            ns: ns.to_string(),
            etype: if prev.is_some() { EventType::Modified } else { EventType::Added },
            obj: obj.clone(),
            prev,
        });
        self.touch_namespace(if key == NAMESPACES { &name } else { ns });
        obj
    }

    /// Remove an object for real: DELETED event, then the garbage collector
    /// and the CRD finalization its disappearance unblocks.
    fn remove(&mut self, key: &str, ns: &str, name: &str, orphan: bool) -> Option<Arc<Value>> {
        let obj = self.objects.get_mut(key)?.remove(&(ns.to_string(), name.to_string()))?;
        let rv = self.bump();
        let mut last = (*obj).clone();
        meta_mut(&mut last).insert("resourceVersion".into(), Value::String(rv.to_string()));
        let last = Arc::new(last);
        self.index(key, ns, name, Some(&obj), None);
        self.record(HistEvent {
            rv,
            key: key.to_string(),
            ns: ns.to_string(),
            etype: EventType::Deleted,
            obj: last.clone(),
            prev: Some(obj.clone()),
        });
        let uid = meta_str(&obj, "uid").to_string();
        self.collect_dependents(&uid, orphan);
        if key == NAMESPACES {
            return Some(last);
        }
        if key == CRDS {
            self.unregister_crd(&obj);
        }
        self.touch_namespace(ns);
        self.maybe_finish_crd(key);
        Some(last)
    }

    /// Queue a terminating namespace for the namespace controller.
    fn touch_namespace(&mut self, ns: &str) {
        if !ns.is_empty() && self.get_by_key(NAMESPACES, "", ns).is_some_and(|n| is_deleting(&n)) {
            self.dirty_namespaces.insert(ns.to_string());
        }
    }

    /// A write by one of the cluster's own controllers, recorded in
    /// managedFields as an update by `manager`.
    fn controller_write(
        &mut self,
        key: &str,
        ns: &str,
        old: &Value,
        mut new: Value,
        manager: &str,
        sub: Sub,
    ) -> Arc<Value> {
        if let Some(rt) = self.type_for_key(key) {
            let version = rt.preferred_version().name.clone();
            let w = managed::Writer { manager, sub, apply: None, sent: None };
            // Only applies can conflict.
            let _ = managed::record(&rt, &version, Some(old), &mut new, &w);
        }
        self.put(key, ns, new)
    }

    /// Background garbage collection of the dependents of a deleted owner.
    fn collect_dependents(&mut self, owner_uid: &str, orphan: bool) {
        let Some(deps) = self.owners.get(owner_uid).cloned() else {
            return;
        };
        for (key, ns, name) in deps {
            let Some(obj) = self.get_by_key(&key, &ns, &name) else {
                continue;
            };
            let others_alive = owner_uids(&obj).iter().any(|u| u != owner_uid && self.uids.contains_key(u));
            if orphan || others_alive {
                // Drop the dangling reference, as the GC does.
                let mut o = (*obj).clone();
                if let Some(refs) = meta_mut(&mut o).get_mut("ownerReferences").and_then(Value::as_array_mut) {
                    refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid));
                }
                normalize_metadata(&mut o);
                self.controller_write(&key, &ns, &obj, o, KCM, Sub::Main);
            } else {
                self.delete_object(&key, &ns, &name, false);
            }
        }
    }

    /// Delete one object: mark it when it has finalizers, remove it otherwise.
    fn delete_object(&mut self, key: &str, ns: &str, name: &str, orphan: bool) -> Option<DeleteOutcome> {
        let obj = self.get_by_key(key, ns, name)?;
        if key == NAMESPACES {
            return Some(DeleteOutcome::Pending(self.terminate_namespace(name)));
        }
        if key == CRDS {
            return Some(self.terminate_crd(name));
        }
        if !finalizers(&obj).is_empty() {
            if is_deleting(&obj) {
                return Some(DeleteOutcome::Pending(obj));
            }
            let has_generation = self.has_generation(key);
            let mut o = (*obj).clone();
            mark_deleting(&mut o, has_generation);
            return Some(DeleteOutcome::Pending(self.put(key, ns, o)));
        }
        self.remove(key, ns, name, orphan).map(DeleteOutcome::Deleted)
    }

    /// The (storage) resource type of a storage key.
    fn type_for_key(&self, key: &str) -> Option<Arc<ResourceType>> {
        self.types.values().find(|t| t.storage_key() == key && t.builtin != Builtin::CoreEvent).cloned()
    }

    fn has_generation(&self, key: &str) -> bool {
        self.type_for_key(key).is_some_and(|t| t.has_generation)
    }

    /// The apiserver's part of deleting a namespace: it becomes Terminating
    /// (no grace period, unlike other objects); its namespace controller
    /// does the rest.
    fn terminate_namespace(&mut self, name: &str) -> Arc<Value> {
        let cur = self.get_by_key(NAMESPACES, "", name).expect("namespace exists");
        self.dirty_namespaces.insert(name.to_string());
        if is_deleting(&cur) {
            return cur;
        }
        let mut o = (*cur).clone();
        meta_mut(&mut o).insert("deletionTimestamp".into(), Value::String(now_rfc3339()));
        o["status"]["phase"] = json!("Terminating");
        self.put(NAMESPACES, "", o)
    }

    /// Run what the cluster's controllers do after a write: here, the
    /// namespace controller for the terminating namespaces whose content
    /// changed (kube's runs moments later; this one before the next request).
    pub fn run_controllers(&mut self) {
        while let Some(ns) = self.dirty_namespaces.pop_first() {
            self.sync_namespace(&ns);
            // Its own writes need no second pass.
            self.dirty_namespaces.remove(&ns);
        }
    }

    /// The namespace controller, for one terminating namespace: delete its
    /// content (what has finalizers is only marked), say in its conditions
    /// what remains, and once nothing does remove its `kubernetes` finalizer.
    /// A terminating namespace without finalizers goes.
    fn sync_namespace(&mut self, name: &str) {
        let Some(mut ns) = self.get_by_key(NAMESPACES, "", name).filter(|n| is_deleting(n)) else {
            return;
        };
        let mut spec_finalizers: Vec<Value> =
            ns.pointer("/spec/finalizers").and_then(Value::as_array).cloned().unwrap_or_default();
        if spec_finalizers.contains(&json!("kubernetes")) {
            let remaining = self.delete_content(name);
            let old = ns.pointer("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
            let conditions = namespaces::conditions(&old, &remaining, &now_rfc3339());
            if conditions != old {
                let mut o = (*ns).clone();
                o["status"]["conditions"] = Value::Array(conditions);
                ns = self.controller_write(NAMESPACES, "", &ns, o, KCM, Sub::Status);
            }
            if !remaining.is_empty() {
                return;
            }
            spec_finalizers.retain(|f| f != "kubernetes");
            if !(spec_finalizers.is_empty() && finalizers(&ns).is_empty()) {
                let mut o = (*ns).clone();
                o["spec"] = if spec_finalizers.is_empty() { json!({}) } else { json!({"finalizers": spec_finalizers}) };
                self.controller_write(NAMESPACES, "", &ns, o, KCM, Sub::Finalize);
                return;
            }
            // kube deletes the namespace in the same /finalize write.
        }
        if spec_finalizers.is_empty() && finalizers(&ns).is_empty() {
            self.remove(NAMESPACES, "", name, false);
        }
    }

    /// Delete everything in namespace `ns`, resource by resource (what has
    /// finalizers is marked and stays), and count what is left.
    fn delete_content(&mut self, ns: &str) -> namespaces::Remaining {
        let mut keys: Vec<String> = self.objects.keys().filter(|k| *k != NAMESPACES).cloned().collect();
        keys.sort();
        let mut left = namespaces::Remaining::default();
        for key in keys {
            let in_ns = |this: &Self| -> Vec<Arc<Value>> {
                this.objects
                    .get(&key)
                    .map(|b| b.iter().filter(|((n, _), _)| n == ns).map(|(_, o)| o.clone()).collect())
                    .unwrap_or_default()
            };
            for o in in_ns(self) {
                self.delete_object(&key, ns, meta_str(&o, "name"), false);
            }
            let remaining = in_ns(self);
            if remaining.is_empty() {
                continue;
            }
            let (group, plural) = key.split_once('/').unwrap_or_default();
            left.by_resource.insert(format!("{plural}.{group}"), remaining.len());
            for f in remaining.iter().flat_map(|o| finalizers(o)) {
                *left.by_finalizer.entry(f).or_default() += 1;
            }
        }
        left
    }

    fn terminate_crd(&mut self, name: &str) -> DeleteOutcome {
        let key = CRDS;
        let cur = self.get_by_key(key, "", name).expect("CRD exists");
        let target = ResourceType::from_crd(&cur).map(|t| t.storage_key());
        let marked = if is_deleting(&cur) {
            cur
        } else {
            let mut o = (*cur).clone();
            mark_deleting(&mut o, true);
            self.put(key, "", o)
        };
        if let Some(tk) = target {
            let victims: Vec<ObjKey> = self.objects.get(&tk).map(|b| b.keys().cloned().collect()).unwrap_or_default();
            for (ns, n) in victims {
                self.delete_object(&tk, &ns, &n, false);
            }
            self.maybe_finish_crd(&tk);
        }
        match self.get_by_key(key, "", name) {
            Some(o) => DeleteOutcome::Pending(o),
            None => DeleteOutcome::Deleted(marked),
        }
    }

    fn get_by_key(&self, key: &str, ns: &str, name: &str) -> Option<Arc<Value>> {
        self.objects.get(key).and_then(|b| b.get(&(ns.to_string(), name.to_string()))).cloned()
    }

    /// A terminating CRD goes once its last custom resource is gone.
    fn maybe_finish_crd(&mut self, cr_key: &str) {
        let crd_key = CRDS;
        let Some((group, plural)) = cr_key.split_once('/') else {
            return;
        };
        let crd_name = format!("{plural}.{group}");
        let Some(crd) = self.get_by_key(crd_key, "", &crd_name) else {
            return;
        };
        if !is_deleting(&crd) || !finalizers(&crd).is_empty() {
            return;
        }
        if self.objects.get(cr_key).is_none_or(BTreeMap::is_empty) {
            self.remove(crd_key, "", &crd_name, false);
        }
    }

    fn unregister_crd(&mut self, crd: &Value) {
        if let Some(rt) = ResourceType::from_crd(crd) {
            self.types.remove(&(rt.group.clone(), rt.plural.clone()));
            self.objects.remove(&rt.storage_key());
        }
    }

    /// Serve (or re-serve) the resource a CRD defines, and mark it Established.
    fn register_crd(&mut self, crd: &Value) {
        let Some(rt) = ResourceType::from_crd(crd) else {
            return;
        };
        let key = rt.storage_key();
        let fresh = !self.start_rv.contains_key(&key);
        self.types.insert((rt.group.clone(), rt.plural.clone()), Arc::new(rt));
        let mut o = crd.clone();
        let names = o.pointer("/spec/names").cloned().unwrap_or(json!({}));
        let now = now_rfc3339();
        let status = json!({
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "lastTransitionTime": now,
                 "reason": "NoConflicts", "message": "no conflicts found"},
                {"type": "Established", "status": "True", "lastTransitionTime": now,
                 "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"}
            ],
            "acceptedNames": names,
            "storedVersions": o.pointer("/status/storedVersions").cloned().unwrap_or(json!([])),
        });
        if o.get("status") != Some(&status) {
            o["status"] = status;
            self.controller_write(CRDS, "", crd, o, "kube-apiserver", Sub::Status);
        }
        if fresh {
            self.start_rv.insert(key, self.rv);
        }
    }

    fn check_namespace(&self, rt: &ResourceType, ns: &str, name: &str) -> Result<(), ApiError> {
        if !rt.namespaced {
            return Ok(());
        }
        match self.get_by_key(NAMESPACES, "", ns) {
            None => Err(ApiError::not_found_gr("", "namespaces", ns)),
            Some(n) if is_deleting(&n) => Err(ApiError::forbidden(
                rt,
                name,
                &format!("unable to create new content in namespace {ns} because it is being terminated"),
                vec![json!({"reason": "NamespaceTerminating",
                    "message": format!("namespace {ns} is being terminated"),
                    "field": "metadata.namespace"})],
            )),
            Some(_) => Ok(()),
        }
    }

    /// POST.
    pub fn create(
        &mut self,
        rt: &Arc<ResourceType>,
        version: &str,
        ns: &str,
        mut obj: Value,
        opts: &mut WriteOpts,
    ) -> Result<Arc<Value>, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body of the request must be a JSON object"));
        }
        obj["apiVersion"] = Value::String(rt.api_version(version));
        obj["kind"] = Value::String(rt.kind.clone());
        let sent_managed = meta(&obj, "managedFields").cloned();
        let body_ns = meta_str(&obj, "namespace").to_string();
        if rt.namespaced && !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let m = meta_mut(&mut obj);
        if rt.namespaced {
            m.insert("namespace".into(), Value::String(ns.to_string()));
        } else {
            m.remove("namespace");
        }
        let mut name = m.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        if name.is_empty() {
            let gen_name = m.get("generateName").and_then(Value::as_str).unwrap_or_default();
            if gen_name.is_empty() {
                return Err(ApiError::invalid_for(
                    rt,
                    "",
                    vec![Cause::required("metadata.name", "name or generateName is required")],
                ));
            }
            name = format!("{gen_name}{}", random_suffix());
            m.insert("name".into(), Value::String(name.clone()));
        }
        for f in [
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            m.remove(f);
        }
        validation::validate_name(rt, &name)?;
        self.check_namespace(rt, ns, &name)?;
        if rt.builtin == Builtin::Custom
            && let Some(crd) = self.get_by_key(CRDS, "", &format!("{}.{}", rt.plural, rt.group))
            && is_deleting(&crd)
        {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                "create not allowed while custom resource definition is terminating",
            ));
        }
        let key = rt.storage_key();
        if self.get_by_key(&key, ns, &name).is_some() {
            return Err(ApiError::already_exists(rt, &name));
        }
        if rt.has_status() {
            obj.as_object_mut().expect("object").remove("status");
        }
        match rt.builtin {
            Builtin::Namespace => {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
                obj["status"] = json!({"phase": "Active"});
                let labels = meta_mut(&mut obj).entry("labels").or_insert_with(|| json!({}));
                if let Some(l) = labels.as_object_mut() {
                    l.insert("kubernetes.io/metadata.name".into(), Value::String(name.clone()));
                }
            }
            Builtin::Crd => {
                validation::validate_crd(&obj)?;
                if let Some(names) = obj.pointer_mut("/spec/names").and_then(Value::as_object_mut) {
                    let kind = names.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
                    names.entry("listKind").or_insert(Value::String(format!("{kind}List")));
                    names.entry("singular").or_insert(Value::String(kind.to_lowercase()));
                }
                if obj.pointer("/spec/conversion").is_none() {
                    obj["spec"]["conversion"] = json!({"strategy": "None"});
                }
                let stored: Vec<Value> = obj
                    .pointer("/spec/versions")
                    .and_then(Value::as_array)
                    .map(|vs| {
                        vs.iter()
                            .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                            .filter_map(|v| v.get("name").cloned())
                            .collect()
                    })
                    .unwrap_or_default();
                obj["status"] = json!({"conditions": null,
                    "acceptedNames": {"plural": "", "kind": ""}, "storedVersions": stored});
            }
            _ => {}
        }
        if rt.builtin == Builtin::Custom {
            validation::admit_custom(rt, version, &mut obj, None, &mut opts.unknown_fields)?;
            check_strict(rt, version, opts)?;
        } else {
            validation::admit_builtin(rt, &mut obj, None, opts.via_events_api)?;
        }
        let m = meta_mut(&mut obj);
        m.insert("uid".into(), Value::String(new_uid()));
        m.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
        if rt.has_generation {
            m.insert("generation".into(), json!(1));
        }
        normalize_metadata(&mut obj);
        managed::record(rt, version, None, &mut obj, &writer(opts, Sub::Main, sent_managed.as_ref()))?;
        // Keep the usual field order: apiVersion, kind, metadata first.
        let obj = reorder(obj);
        if opts.dry_run {
            return Ok(Arc::new(obj));
        }
        let out = self.put(&key, ns, obj);
        if rt.builtin == Builtin::Crd {
            self.register_crd(&out);
        }
        Ok(out)
    }

    /// PUT (and the second half of PATCH): `new` is the full desired object.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        rt: &Arc<ResourceType>,
        version: &str,
        ns: &str,
        name: &str,
        mut new: Value,
        sub: Sub,
        opts: &mut WriteOpts,
        require_rv: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let key = rt.storage_key();
        let old = self.get_by_key(&key, ns, name).ok_or_else(|| ApiError::not_found(rt, name))?;
        if !new.is_object() {
            return Err(ApiError::bad_request("the body of the request must be a JSON object"));
        }
        let body_name = meta_str(&new, "name");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let body_ns = meta_str(&new, "namespace");
        if rt.namespaced && !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let sent_rv = meta_str(&new, "resourceVersion").to_string();
        if sent_rv.is_empty() && require_rv && rt.builtin == Builtin::Custom {
            return Err(ApiError::invalid_for(
                rt,
                name,
                vec![Cause::invalid("metadata.resourceVersion", Some("0x0".into()), "must be specified for an update")],
            ));
        }
        if !sent_rv.is_empty() && sent_rv != meta_str(&old, "resourceVersion") {
            return Err(ApiError::conflict(rt, name));
        }
        let sent_uid = meta_str(&new, "uid");
        if !sent_uid.is_empty() && sent_uid != meta_str(&old, "uid") {
            return Err(ApiError::conflict_msg(
                rt,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {sent_uid}, UID in object meta: {}",
                    meta_str(&old, "uid")
                ),
            ));
        }
        let sent_managed = meta(&new, "managedFields").cloned();
        // What each endpoint may change.
        let mut new = match sub {
            Sub::Status => {
                let mut o = (*old).clone();
                match new.as_object_mut().and_then(|m| m.remove("status")) {
                    Some(s) => o["status"] = s,
                    None => {
                        o.as_object_mut().expect("object").remove("status");
                    }
                }
                o
            }
            Sub::Main | Sub::Finalize => {
                if rt.has_status() {
                    let m = new.as_object_mut().expect("object");
                    match old.get("status") {
                        Some(s) => m.insert("status".into(), s.clone()),
                        None => m.remove("status"),
                    };
                }
                if rt.builtin == Builtin::Namespace && sub == Sub::Main {
                    new["spec"] = old.get("spec").cloned().unwrap_or(json!({}));
                }
                new["apiVersion"] = Value::String(rt.api_version(version));
                new["kind"] = Value::String(rt.kind.clone());
                // System-managed metadata cannot be written.
                let om = old.get("metadata").cloned().unwrap_or(json!({}));
                let m = meta_mut(&mut new);
                for f in [
                    "name",
                    "namespace",
                    "uid",
                    "creationTimestamp",
                    "generation",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                ] {
                    match om.get(f) {
                        Some(v) => m.insert(f.into(), v.clone()),
                        None => m.remove(f),
                    };
                }
                new
            }
        };
        meta_mut(&mut new)
            .insert("resourceVersion".into(), Value::String(meta_str(&old, "resourceVersion").to_string()));
        normalize_metadata(&mut new);
        if is_deleting(&old) {
            let before = finalizers(&old);
            let added: Vec<String> = finalizers(&new).into_iter().filter(|f| !before.contains(f)).collect();
            if !added.is_empty() {
                let shown: Vec<String> = added.iter().map(|f| format!("{f:?}")).collect();
                let detail = format!(
                    "no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                    shown.join(", ")
                );
                // kube validates object meta twice for custom resources.
                let mut causes = vec![Cause::forbidden("metadata.finalizers", &detail)];
                if rt.builtin == Builtin::Custom {
                    causes.push(causes[0].clone());
                }
                return Err(ApiError::invalid_for(rt, name, causes));
            }
        }
        if rt.builtin == Builtin::Custom {
            validation::admit_custom(rt, version, &mut new, Some(&old), &mut opts.unknown_fields)?;
            check_strict(rt, version, opts)?;
        } else {
            validation::admit_builtin(rt, &mut new, Some(&old), opts.via_events_api)?;
            if rt.builtin == Builtin::Crd && sub == Sub::Main {
                validation::validate_crd(&new)?;
            }
        }
        if rt.has_generation {
            let ignore: &[&str] = if rt.has_status() { &["metadata", "status"] } else { &["metadata"] };
            if without(&new, ignore) != without(&old, ignore) {
                let g = meta(&old, "generation").and_then(Value::as_i64).unwrap_or(0);
                meta_mut(&mut new).insert("generation".into(), json!(g + 1));
            }
        }
        managed::record(rt, version, Some(&old), &mut new, &writer(opts, sub, sent_managed.as_ref()))?;
        let new = reorder(new);
        if same_ignoring_rv(&new, &old) {
            // A no-op write keeps the resourceVersion and makes no event.
            return Ok(old);
        }
        if opts.dry_run {
            return Ok(Arc::new(new));
        }
        if is_deleting(&new) && finalizers(&new).is_empty() && rt.builtin != Builtin::Namespace {
            // Removing the last finalizer deletes. Like kube, the answer is
            // the updated object at its previous resourceVersion; the DELETED
            // event carries the last stored state.
            self.remove(&key, ns, name, false);
            return Ok(Arc::new(new));
        }
        let out = self.put(&key, ns, new);
        if rt.builtin == Builtin::Crd && sub == Sub::Main {
            self.register_crd(&out);
        }
        Ok(out)
    }

    /// PATCH of any type; server-side apply creates missing objects.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        rt: &Arc<ResourceType>,
        version: &str,
        ns: &str,
        name: &str,
        ptype: PatchType,
        body: &Value,
        sub: Sub,
        opts: &mut WriteOpts,
    ) -> Result<Arc<Value>, ApiError> {
        let key = rt.storage_key();
        let typed = Typed::of(rt, version);
        if ptype == PatchType::Apply {
            managed::check_apply_config(rt, version, body)?;
        }
        let Some(live) = self.get_by_key(&key, ns, name) else {
            if ptype == PatchType::Apply && sub == Sub::Main {
                let mut doc = json!({});
                patch::apply(&mut doc, body, typed);
                opts.apply = Some(managed::applied_fields(rt, version, sub, body));
                let m = meta_mut(&mut doc);
                m.insert("name".into(), Value::String(name.to_string()));
                return self.create(rt, version, ns, doc, opts);
            }
            return Err(ApiError::not_found(rt, name));
        };
        let mut doc = (*live).clone();
        doc["apiVersion"] = Value::String(rt.api_version(version));
        match ptype {
            PatchType::Json => patch::json_patch(&mut doc, body)?,
            PatchType::Merge => patch::merge_patch(&mut doc, body),
            PatchType::Strategic => {
                if rt.builtin == Builtin::Custom {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                    ));
                }
                patch::strategic_patch(&mut doc, body)
            }
            PatchType::Apply => {
                let config = match sub {
                    // Only the status of an apply to /status counts.
                    Sub::Status => json!({"status": body.get("status").cloned().unwrap_or(json!({}))}),
                    Sub::Main | Sub::Finalize => body.clone(),
                };
                patch::apply(&mut doc, &config, typed);
                // The configuration's resourceVersion and uid are preconditions.
                for f in ["resourceVersion", "uid"] {
                    if let Some(v) = meta(body, f).filter(|v| !v.is_null()) {
                        meta_mut(&mut doc).insert(f.into(), v.clone());
                    }
                }
                let applied = managed::applied_fields(rt, version, sub, &config);
                managed::prune_dropped(rt, version, sub, &live, &mut doc, &opts.manager, &applied);
                opts.apply = Some(applied);
            }
        }
        if !doc.is_object() {
            return Err(ApiError::bad_request("the patch produced a non-object"));
        }
        self.update(rt, version, ns, name, doc, sub, opts, false)
    }

    /// DELETE.
    pub fn delete(
        &mut self,
        rt: &Arc<ResourceType>,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<DeleteOutcome, ApiError> {
        let key = rt.storage_key();
        let cur = self.get_by_key(&key, ns, name).ok_or_else(|| ApiError::not_found(rt, name))?;
        if let Some(u) = &opts.precondition_uid
            && u != meta_str(&cur, "uid")
        {
            return Err(ApiError::conflict_msg(
                rt,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {u}, UID in object meta: {}",
                    meta_str(&cur, "uid")
                ),
            ));
        }
        if let Some(r) = &opts.precondition_rv
            && r != meta_str(&cur, "resourceVersion")
        {
            return Err(ApiError::conflict_msg(
                rt,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {r}, ResourceVersion in object meta: {}",
                    meta_str(&cur, "resourceVersion")
                ),
            ));
        }
        if opts.dry_run {
            return Ok(if finalizers(&cur).is_empty() {
                DeleteOutcome::Deleted(cur)
            } else {
                DeleteOutcome::Pending(cur)
            });
        }
        let orphan = opts.propagation.as_deref() == Some("Orphan");
        Ok(self.delete_object(&key, ns, name, orphan).unwrap_or(DeleteOutcome::Deleted(cur)))
    }
}

fn mark_deleting(o: &mut Value, bump_generation: bool) {
    let g = meta(o, "generation").and_then(Value::as_i64);
    let m = meta_mut(o);
    m.insert("deletionTimestamp".into(), Value::String(now_rfc3339()));
    m.insert("deletionGracePeriodSeconds".into(), json!(0));
    if bump_generation && let Some(g) = g {
        m.insert("generation".into(), json!(g + 1));
    }
}

/// Who a write is, for managedFields (`sent`: the managedFields the request's object carried).
fn writer<'a>(opts: &'a WriteOpts, sub: Sub, sent: Option<&'a Value>) -> managed::Writer<'a> {
    managed::Writer { manager: &opts.manager, sub, apply: opts.apply.as_ref().map(|a| (a, opts.force)), sent }
}

/// apiVersion, kind, metadata first; then the rest in the order given.
fn reorder(obj: Value) -> Value {
    let Value::Object(mut m) = obj else {
        return obj;
    };
    let mut out = Map::new();
    for k in ["apiVersion", "kind", "metadata"] {
        if let Some(v) = m.remove(k) {
            out.insert(k.into(), v);
        }
    }
    out.extend(m);
    Value::Object(out)
}
