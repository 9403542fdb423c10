//! The server driven by a real `kube::Client`: kube-rs' watcher, finalizer
//! helper, Recorder, server-side apply and typed APIs work against it.

#![recursion_limit = "512"]

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Namespace, ObjectReference, Secret};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config, ResourceExt};
use machinist_test_apiserver::TestApiServer;
use serde_json::json;

async fn client(server: &TestApiServer) -> Client {
    let mut config = Config::new(server.url().parse().unwrap());
    config.default_namespace = "default".into();
    Client::try_from(config).expect("client")
}

fn gadget_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("test.machinist.dev", "v1alpha1", "Gadget"),
        "gadgets",
    );
    Api::namespaced_with(client.clone(), ns, &ar)
}

fn gadget(name: &str) -> DynamicObject {
    serde_json::from_value(common::gadget(name)).unwrap()
}

fn api_err(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn within<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f).await.expect("timed out")
}

#[tokio::test]
async fn conflict_generation_and_status_isolation() {
    let server = TestApiServer::start().await;
    common::setup(server.addr(), "default").await;
    let c = client(&server).await;
    let api = gadget_api(&c, "default");
    let created = api.create(&PostParams::default(), &gadget("g")).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(created.data["spec"]["powerState"], "Running", "defaulted");

    // Spec change bumps generation; label change does not.
    let p = api
        .patch("g", &PatchParams::default(), &Patch::Merge(json!({"spec": {"powerState": "Stopped"}})))
        .await
        .unwrap();
    assert_eq!(p.metadata.generation, Some(2));
    let p = api
        .patch("g", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})))
        .await
        .unwrap();
    assert_eq!(p.metadata.generation, Some(2));

    // A stale resourceVersion conflicts.
    let mut stale = created.clone();
    stale.data["spec"]["powerState"] = json!("Running");
    let err = api_err(api.replace("g", &PostParams::default(), &stale).await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));

    // /status changes only status; the main resource ignores status.
    let s = api
        .patch_status(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"powerState": "Running"}, "status": {"state": "Up"}})),
        )
        .await
        .unwrap();
    assert_eq!(s.data["status"]["state"], "Up");
    assert_eq!(s.data["spec"]["powerState"], "Stopped");
    assert_eq!(s.metadata.generation, Some(2));
    let m =
        api.patch("g", &PatchParams::default(), &Patch::Merge(json!({"status": {"state": "Hacked"}}))).await.unwrap();
    assert_eq!(m.data["status"]["state"], "Up");
    assert_eq!(m.resource_version(), s.resource_version(), "a no-op keeps the resourceVersion");

    // Status sent on create is dropped.
    let mut with_status = gadget("g2");
    with_status.data["status"] = json!({"state": "Up"});
    let g2 = api.create(&PostParams::default(), &with_status).await.unwrap();
    assert!(g2.data.get("status").is_none());
}

#[tokio::test]
async fn finalizer_helper_and_deletion_flow() {
    let server = TestApiServer::start().await;
    common::setup(server.addr(), "default").await;
    let c = client(&server).await;
    let api = gadget_api(&c, "default");
    api.create(&PostParams::default(), &gadget("f")).await.unwrap();
    // A watcher running alongside must see the object go through deletion.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut events = watcher(api.clone(), watcher::Config::default()).applied_objects().boxed();
    tokio::spawn(async move {
        while let Ok(Some(o)) = events.try_next().await {
            if seen_tx.send(o).is_err() {
                break;
            }
        }
    });
    let first = within(10, seen_rx.recv()).await.unwrap();
    assert_eq!(first.name_any(), "f");

    // First reconcile: the helper adds its finalizer (test + add JSON patch).
    let obj = Arc::new(api.get("f").await.unwrap());
    finalizer(&api, "machinist.dev/cleanup", obj, |ev| async move {
        match ev {
            FinalizerEvent::Apply(_) => Ok::<_, std::io::Error>(kube::runtime::controller::Action::await_change()),
            FinalizerEvent::Cleanup(_) => panic!("not deleting yet"),
        }
    })
    .await
    .unwrap();
    let obj = api.get("f").await.unwrap();
    assert_eq!(obj.finalizers(), ["machinist.dev/cleanup"]);

    // Delete: 200 with deletionTimestamp, the object stays; generation bumps.
    let res = api.delete("f", &DeleteParams::default()).await.unwrap();
    let deleting = res.left().expect("the object, still there");
    assert!(deleting.metadata.deletion_timestamp.is_some());
    assert_eq!(deleting.metadata.generation, Some(2));
    // Adding a finalizer now is refused.
    let err = api_err(
        api.patch(
            "f",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["machinist.dev/cleanup", "x/y"]}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));

    // Cleanup removes the finalizer and the object goes.
    let obj = Arc::new(api.get("f").await.unwrap());
    let cleaned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = cleaned.clone();
    finalizer(&api, "machinist.dev/cleanup", obj, |ev| async move {
        if let FinalizerEvent::Cleanup(_) = ev {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok::<_, std::io::Error>(kube::runtime::controller::Action::await_change())
    })
    .await
    .unwrap();
    assert!(cleaned.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(api_err(api.get("f").await.unwrap_err()).code, 404);

    // The watcher saw it with the finalizer, then deleting.
    within(10, async {
        while let Some(o) = seen_rx.recv().await {
            if o.metadata.deletion_timestamp.is_some() {
                break;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn garbage_collection_and_namespace_termination() {
    let server = TestApiServer::start().await;
    common::setup(server.addr(), "gc").await;
    let c = client(&server).await;
    let api = gadget_api(&c, "gc");
    let secrets: Api<Secret> = Api::namespaced(c.clone(), "gc");
    let owner = api.create(&PostParams::default(), &gadget("owner")).await.unwrap();
    let other = api.create(&PostParams::default(), &gadget("other")).await.unwrap();
    let owner_ref = |o: &DynamicObject| {
        json!({"apiVersion": "test.machinist.dev/v1alpha1", "kind": "Gadget",
            "name": o.name_any(), "uid": o.uid().unwrap(), "controller": true})
    };
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "owned", "ownerReferences": [owner_ref(&owner)]},
        "type": "kubernetes.io/ssh-auth",
        "stringData": {"ssh-privatekey": "k"}}))
    .unwrap();
    let created = secrets.create(&PostParams::default(), &s).await.unwrap();
    assert_eq!(created.data.unwrap()["ssh-privatekey"].0, b"k");
    let both: Secret = serde_json::from_value(json!({
        "metadata": {"name": "shared", "ownerReferences": [owner_ref(&owner), {"apiVersion": "test.machinist.dev/v1alpha1",
            "kind": "Gadget", "name": "other", "uid": other.uid().unwrap()}]}}))
    .unwrap();
    secrets.create(&PostParams::default(), &both).await.unwrap();
    // ssh-auth without its key is invalid.
    let bad: Secret =
        serde_json::from_value(json!({"metadata": {"name": "bad"}, "type": "kubernetes.io/ssh-auth"})).unwrap();
    let err = api_err(secrets.create(&PostParams::default(), &bad).await.unwrap_err());
    assert_eq!(err.code, 422);
    assert_eq!(err.message, "Secret \"bad\" is invalid: data[ssh-privatekey]: Required value");

    api.delete("owner", &DeleteParams::background()).await.unwrap();
    assert_eq!(api_err(secrets.get("owned").await.unwrap_err()).code, 404, "collected");
    let shared = secrets.get("shared").await.unwrap();
    assert_eq!(shared.owner_references().len(), 1, "dangling reference removed, object kept");

    // Namespace termination.
    let mut fin = gadget("held");
    fin.metadata.finalizers = Some(vec!["machinist.dev/cleanup".into()]);
    api.create(&PostParams::default(), &fin).await.unwrap();
    let nss: Api<Namespace> = Api::all(c.clone());
    let res = nss.delete("gc", &DeleteParams::default()).await.unwrap();
    let ns = res.left().expect("namespace object");
    assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Terminating"));
    assert_eq!(api_err(secrets.get("shared").await.unwrap_err()).code, 404);
    assert!(api.get("held").await.unwrap().metadata.deletion_timestamp.is_some());
    let err = api_err(api.create(&PostParams::default(), &gadget("late")).await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (403, "Forbidden"));
    assert!(err.message.contains("unable to create new content in namespace gc because it is being terminated"));
    assert!(nss.get("gc").await.is_ok(), "still terminating");
    api.patch("held", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await.unwrap();
    assert_eq!(api_err(nss.get("gc").await.unwrap_err()).code, 404, "namespace gone once empty");
}

#[tokio::test]
async fn watcher_paginated_and_streaming() {
    let server = TestApiServer::start().await;
    common::setup(server.addr(), "default").await;
    let c = client(&server).await;
    let api = gadget_api(&c, "default");
    for i in 0..7 {
        api.create(&PostParams::default(), &gadget(&format!("w{i}"))).await.unwrap();
    }
    for cfg in [
        watcher::Config::default().page_size(2),
        watcher::Config::default().any_semantic().page_size(3),
        watcher::Config::default().streaming_lists(),
    ] {
        let mut stream = watcher(api.clone(), cfg).boxed();
        let mut names = Vec::new();
        within(10, async {
            loop {
                match stream.try_next().await.unwrap().unwrap() {
                    watcher::Event::InitApply(o) => names.push(o.name_any()),
                    watcher::Event::InitDone => break,
                    _ => {}
                }
            }
        })
        .await;
        names.sort();
        assert_eq!(names, (0..7).map(|i| format!("w{i}")).collect::<Vec<_>>());
        api.create(&PostParams::default(), &gadget("late")).await.unwrap();
        within(10, async {
            loop {
                if let watcher::Event::Apply(o) = stream.try_next().await.unwrap().unwrap()
                    && o.name_any() == "late"
                {
                    break;
                }
            }
        })
        .await;
        api.delete("late", &DeleteParams::default()).await.unwrap();
        within(10, async {
            loop {
                if let watcher::Event::Delete(o) = stream.try_next().await.unwrap().unwrap() {
                    assert_eq!(o.name_any(), "late");
                    break;
                }
            }
        })
        .await;
    }
}

#[tokio::test]
async fn cel_transition_rule_and_schema_validation() {
    let server = TestApiServer::start().await;
    common::setup(server.addr(), "default").await;
    let c = client(&server).await;
    let api = gadget_api(&c, "default");
    let g = api.create(&PostParams::default(), &gadget("t")).await.unwrap();
    let mut changed = g.clone();
    changed.data["spec"]["driver"] = json!({"generic": {"address": "h"}});
    let err = api_err(api.replace("t", &PostParams::default(), &changed).await.unwrap_err());
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        err.message,
        "Gadget.test.machinist.dev \"t\" is invalid: spec: Invalid value: the driver kind cannot be changed"
    );
    // The same spec is fine on create (transition rules need oldSelf).
    let mut fresh = gadget("t2");
    fresh.data["spec"]["driver"] = json!({"generic": {"address": "h"}});
    api.create(&PostParams::default(), &fresh).await.unwrap();

    let mut bad = gadget("bad");
    bad.data["spec"]["tags"] = json!(["ok", "NO", "x", "y"]);
    bad.data["spec"]["stopTimeoutSeconds"] = json!(9999);
    let err = api_err(api.create(&PostParams::default(), &bad).await.unwrap_err());
    let msg = err.message;
    assert!(msg.contains("spec.tags: Too many: 4: must have at most 3 items"), "{msg}");
    assert!(msg.contains("spec.tags[1]: Invalid value: \"NO\": spec.tags[1] in body should match '^[a-z]+$'"), "{msg}");
    assert!(msg.contains("spec.stopTimeoutSeconds: Invalid value: 9999: spec.stopTimeoutSeconds in body should be less than or equal to 3600"), "{msg}");
    assert!(msg.contains("some validation rules were not checked"), "{msg}");
}

#[tokio::test]
async fn server_side_apply_status_and_leases() {
    let server = TestApiServer::start().await;
    common::setup(server.addr(), "default").await;
    let c = client(&server).await;
    let api = gadget_api(&c, "default");
    // Apply creates.
    let pp = PatchParams::apply("machinist").force();
    let applied = api.patch("a", &pp, &Patch::Apply(common::gadget("a"))).await.unwrap();
    assert_eq!(applied.metadata.generation, Some(1));
    api.patch_status("a", &PatchParams::default(), &Patch::Merge(json!({"status": {"providerID": "p"}})))
        .await
        .unwrap();
    let status = |state: &str, conds: serde_json::Value| {
        json!({"apiVersion": "test.machinist.dev/v1alpha1", "kind": "Gadget", "metadata": {"name": "a"},
            "status": {"state": state, "conditions": conds}})
    };
    let s = api
        .patch_status(
            "a",
            &pp,
            &Patch::Apply(status(
                "Running",
                json!([
            {"type": "Ready", "status": "True"}, {"type": "Extra", "status": "True"}]),
            )),
        )
        .await
        .unwrap();
    assert_eq!(s.data["status"]["conditions"].as_array().unwrap().len(), 2);
    let s = api
        .patch_status("a", &pp, &Patch::Apply(status("Stopped", json!([{"type": "Ready", "status": "False"}]))))
        .await
        .unwrap();
    assert_eq!(
        s.data["status"],
        json!({"providerID": "p", "state": "Stopped", "conditions": [{"type": "Ready", "status": "False"}]}),
        "own earlier fields dropped, other manager's kept"
    );
    let again = api
        .patch_status("a", &pp, &Patch::Apply(status("Stopped", json!([{"type": "Ready", "status": "False"}]))))
        .await
        .unwrap();
    assert_eq!(again.resource_version(), s.resource_version(), "re-applying the same is a no-op");
    // Apply needs a field manager.
    let r = common::patch(
        server.addr(),
        &format!("{}/namespaces/default/gadgets/a/status", common::GADGETS_V),
        "application/apply-patch+yaml",
        &status("X", json!([])),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);

    // Leases: optimistic concurrency on PUT.
    let leases: Api<Lease> = Api::namespaced(c.clone(), "default");
    let l: Lease = serde_json::from_value(
        json!({"metadata": {"name": "leader"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}}),
    )
    .unwrap();
    let l = leases.create(&PostParams::default(), &l).await.unwrap();
    let mut next = l.clone();
    next.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases.replace("leader", &PostParams::default(), &next).await.unwrap();
    let err = api_err(leases.replace("leader", &PostParams::default(), &next).await.unwrap_err());
    assert_eq!(err.code, 409);
    assert!(err.message.starts_with("Operation cannot be fulfilled on leases.coordination.k8s.io \"leader\""));
}

#[tokio::test]
async fn recorder_events_show_as_core_events() {
    let server = TestApiServer::start().await;
    common::setup(server.addr(), "default").await;
    let c = client(&server).await;
    let api = gadget_api(&c, "default");
    let g = api.create(&PostParams::default(), &gadget("ev")).await.unwrap();
    let reference = ObjectReference {
        api_version: Some("test.machinist.dev/v1alpha1".into()),
        kind: Some("Gadget".into()),
        name: Some("ev".into()),
        namespace: Some("default".into()),
        uid: g.uid(),
        ..Default::default()
    };
    let recorder = Recorder::new(c.clone(), Reporter { controller: "machinist".into(), instance: Some("m-0".into()) });
    let ev = Event {
        type_: EventType::Normal,
        reason: "Created".into(),
        note: Some("instance created".into()),
        action: "Create".into(),
        secondary: None,
    };
    recorder.publish(&ev, &reference).await.unwrap();
    recorder.publish(&ev, &reference).await.unwrap();
    let counts = server.write_counts();
    assert_eq!(counts.get("events", "POST"), 1);
    assert_eq!(counts.get("events", "PATCH"), 1);

    // What `kubectl describe` lists.
    let core: Api<CoreEvent> = Api::namespaced(c.clone(), "default");
    let lp = ListParams::default().fields(&format!(
        "involvedObject.name=ev,involvedObject.namespace=default,involvedObject.uid={},involvedObject.kind=Gadget",
        g.uid().unwrap()
    ));
    let list = core.list(&lp).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let e = &list.items[0];
    assert_eq!(e.message.as_deref(), Some("instance created"));
    assert_eq!(e.count, Some(2));
    assert_eq!(e.source.as_ref().unwrap().component.as_deref(), Some("machinist"));
    assert_eq!(e.reporting_component.as_deref(), Some("machinist"));
    assert!(e.first_timestamp.is_some() && e.last_timestamp.is_some());
    assert_eq!(core.list(&ListParams::default().fields("involvedObject.name=nope")).await.unwrap().items.len(), 0);
}

/// 10,000 custom objects: created concurrently, listed by kube-rs' watcher
/// in pages of 500, while another watcher follows the creations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_objects() {
    let server = TestApiServer::start().await;
    common::setup(server.addr(), "default").await;
    let c = client(&server).await;
    let api = gadget_api(&c, "default");
    let started = std::time::Instant::now();
    let follower = {
        let api = api.clone();
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default().streaming_lists()).boxed();
            let mut seen = std::collections::HashSet::new();
            while seen.len() < 10_000 {
                match stream.try_next().await.unwrap().unwrap() {
                    watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                        seen.insert(o.name_any());
                    }
                    _ => {}
                }
            }
        })
    };
    within(240, async {
        futures::stream::iter(0..10_000)
            .map(|i| {
                let api = api.clone();
                async move { api.create(&PostParams::default(), &gadget(&format!("g{i:05}"))).await.unwrap() }
            })
            .buffer_unordered(16)
            .for_each(|_| async {})
            .await;
    })
    .await;
    let created = started.elapsed();
    let listed = within(60, async {
        watcher(api.clone(), watcher::Config::default())
            .take_while(|e| futures::future::ready(!matches!(e, Ok(watcher::Event::InitDone))))
            .try_fold(0usize, |n, e| async move { Ok(n + usize::from(matches!(e, watcher::Event::InitApply(_)))) })
            .await
            .unwrap()
    })
    .await;
    assert_eq!(listed, 10_000);
    within(60, follower).await.unwrap();
    println!("created 10k in {created:?}, total {:?}", started.elapsed());
    assert_eq!(server.write_counts().get("gadgets", "POST"), 10_000);
}
