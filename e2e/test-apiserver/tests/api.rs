//! Wire-level behaviour checked with raw HTTP: watches (resourceVersion,
//! bookmarks, 410, initial events), selectors, pagination, Table output,
//! fieldValidation, discovery.

#![recursion_limit = "512"]

mod common;

use std::time::Duration;

use common::{GADGETS_V, gadget, get, json, request_accept, setup, watch};
use machinist_test_apiserver::{ServerOptions, TestApiServer};
use serde_json::{Value, json};

fn coll(ns: &str) -> String {
    format!("{GADGETS_V}/namespaces/{ns}/gadgets")
}

fn names(list: &Value) -> Vec<String> {
    list["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap().to_string()).collect()
}

fn summary(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let t = e["type"].as_str().unwrap();
            match t {
                "BOOKMARK" | "ERROR" => t.to_string(),
                _ => format!("{t} {}", e["object"]["metadata"]["name"].as_str().unwrap()),
            }
        })
        .collect()
}

#[tokio::test]
async fn watch_from_resource_version_with_bookmarks() {
    let server = TestApiServer::start().await;
    let a = server.addr();
    setup(a, "default").await;
    json(a, "POST", &coll("default"), &gadget("before")).await;
    let rv = get(a, &coll("default")).await.body["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let (status, events) = watch(
        a,
        &format!("{}?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=2", coll("default")),
        Duration::from_secs(6),
        || async {
            json(a, "POST", &coll("default"), &gadget("after")).await;
            common::patch(
                a,
                &format!("{}/after", coll("default")),
                "application/merge-patch+json",
                &json!({"spec": {"powerState": "Stopped"}}),
            )
            .await;
            common::request(a, "DELETE", &format!("{}/after", coll("default")), None, None).await;
        },
    )
    .await;
    assert_eq!(status, 200);
    let s = summary(&events);
    let non_bm: Vec<&String> = s.iter().filter(|x| *x != "BOOKMARK").collect();
    assert_eq!(non_bm, ["ADDED after", "MODIFIED after", "DELETED after"]);
    assert!(s.iter().any(|x| x == "BOOKMARK"), "bookmarks asked for: {s:?}");
    let bm = events.iter().rev().find(|e| e["type"] == "BOOKMARK").unwrap();
    assert_eq!(bm["object"]["kind"], "Gadget");
    assert_eq!(bm["object"]["metadata"]["resourceVersion"].as_str().unwrap(), server.resource_version().to_string());

    // Without a resourceVersion: ADDED for what exists, then changes.
    let (_, events) =
        watch(a, &format!("{}?watch=1&timeoutSeconds=1", coll("default")), Duration::from_secs(4), || async {}).await;
    assert_eq!(summary(&events), ["ADDED before"]);

    // Streaming list: initial events then the initial-events-end bookmark.
    let (_, events) = watch(
        a,
        &format!(
            "{}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1",
            coll("default")
        ),
        Duration::from_secs(4),
        || async {},
    )
    .await;
    assert_eq!(summary(&events)[..2], ["ADDED before", "BOOKMARK"]);
    assert_eq!(events[1]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");
}

#[tokio::test]
async fn watch_too_old_is_410_expired() {
    let server = TestApiServer::start_with(ServerOptions { history_limit: 20, ..Default::default() }).await.unwrap();
    let a = server.addr();
    setup(a, "default").await;
    json(a, "POST", &coll("default"), &gadget("x")).await;
    let old = server.resource_version();
    for i in 0..30 {
        common::patch(
            a,
            &format!("{}/x", coll("default")),
            "application/merge-patch+json",
            &json!({"metadata": {"labels": {"i": i.to_string()}}}),
        )
        .await;
    }
    for rv in [old.to_string(), "5".to_string()] {
        let (status, events) = watch(
            a,
            &format!("{}?watch=true&resourceVersion={rv}", coll("default")),
            Duration::from_secs(5),
            || async {},
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["type"], "ERROR");
        assert_eq!(events[0]["object"]["code"], 410);
        assert_eq!(events[0]["object"]["reason"], "Expired");
    }
    // A recent one still works.
    let recent = server.resource_version() - 2;
    let (_, events) = watch(
        a,
        &format!("{}?watch=true&resourceVersion={recent}&timeoutSeconds=1", coll("default")),
        Duration::from_secs(4),
        || async {},
    )
    .await;
    assert_eq!(summary(&events), ["MODIFIED x", "MODIFIED x"]);
}

#[tokio::test]
async fn selectors_and_pagination() {
    let server = TestApiServer::start().await;
    let a = server.addr();
    setup(a, "one").await;
    json(a, "POST", "/api/v1/namespaces", &json!({"metadata": {"name": "two"}})).await;
    for (i, tier) in ["a", "b", "c", "", "a", "b", "a"].iter().enumerate() {
        let mut g = gadget(&format!("g{i}"));
        if !tier.is_empty() {
            g["metadata"]["labels"] = json!({"tier": tier});
        }
        let ns = if i % 2 == 0 { "one" } else { "two" };
        let r = json(a, "POST", &coll(ns), &g).await;
        assert_eq!(r.status, 201);
    }
    let all = format!("{GADGETS_V}/gadgets");
    let sel =
        |s: &str| format!("{all}?labelSelector={}", s.replace(' ', "%20").replace('!', "%21").replace('=', "%3D"));
    assert_eq!(names(&get(a, &sel("tier=a")).await.body), ["g0", "g4", "g6"]);
    assert_eq!(names(&get(a, &sel("tier!=a")).await.body), ["g2", "g1", "g3", "g5"]);
    assert_eq!(names(&get(a, &sel("tier in (b,c)")).await.body), ["g2", "g1", "g5"]);
    assert_eq!(names(&get(a, &sel("tier notin (a)")).await.body), ["g2", "g1", "g3", "g5"]);
    assert_eq!(names(&get(a, &sel("!tier")).await.body), ["g3"]);
    assert_eq!(names(&get(a, &sel("tier")).await.body).len(), 6);
    assert_eq!(names(&get(a, &format!("{all}?fieldSelector=metadata.namespace%3Dtwo")).await.body), ["g1", "g3", "g5"]);
    assert_eq!(names(&get(a, &format!("{}?fieldSelector=metadata.name%3Dg2", coll("one"))).await.body), ["g2"]);

    // Pages of 3 across namespaces: every object exactly once, in key order.
    let mut seen = Vec::new();
    let mut cont = String::new();
    let mut first_rv = None;
    loop {
        let r = get(a, &format!("{all}?limit=3&continue={cont}")).await.body;
        let rv = r["metadata"]["resourceVersion"].as_str().unwrap().to_string();
        first_rv.get_or_insert(rv.clone());
        assert_eq!(Some(rv), first_rv, "pages share the snapshot");
        seen.extend(names(&r));
        cont = r["metadata"]["continue"].as_str().unwrap_or_default().to_string();
        if cont.is_empty() {
            assert!(r["metadata"].get("remainingItemCount").is_none());
            break;
        }
        assert!(r["metadata"]["remainingItemCount"].as_u64().unwrap() > 0);
        // Writes between pages do not leak into the snapshot.
        json(a, "POST", &coll("one"), &gadget(&format!("late{}", seen.len()))).await;
    }
    assert_eq!(seen, ["g0", "g2", "g4", "g6", "g1", "g3", "g5"]);

    // Exact list at an older resourceVersion.
    let rv: u64 = first_rv.unwrap().parse().unwrap();
    let r = get(a, &format!("{all}?resourceVersion={rv}&resourceVersionMatch=Exact")).await.body;
    assert_eq!(names(&r).len(), 7);
    let r = get(a, &format!("{all}?resourceVersion=5&resourceVersionMatch=Exact")).await.body;
    assert_eq!(names(&r).len(), 0);

    // deletecollection with a selector.
    let r = common::request(a, "DELETE", &format!("{}?labelSelector=tier%3Da", coll("one")), None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(names(&get(a, &sel("tier=a")).await.body), Vec::<String>::new());
}

#[tokio::test]
async fn table_output_uses_printer_columns() {
    let server = TestApiServer::start().await;
    let a = server.addr();
    setup(a, "default").await;
    json(a, "POST", &coll("default"), &gadget("t1")).await;
    common::patch(
        a,
        &format!("{}/t1/status", coll("default")),
        "application/merge-patch+json",
        &json!({"status": {"state": "Running", "conditions": [{"type": "Other", "status": "False"}, {"type": "Ready", "status": "True"}]}}),
    )
    .await;
    json(a, "POST", &coll("default"), &gadget("t2")).await;
    let accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
    let r = request_accept(a, "GET", &coll("default"), None, Some(accept), None).await.body;
    assert_eq!(r["kind"], "Table");
    assert_eq!(r["apiVersion"], "meta.k8s.io/v1");
    let cols: Vec<&str> =
        r["columnDefinitions"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(cols, ["Name", "State", "Ready", "Age"]);
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["cells"].as_array().unwrap()[..3], [json!("t1"), json!("Running"), json!("True")]);
    assert!(rows[0]["cells"][3].as_str().unwrap().ends_with('s'), "age like 0s: {}", rows[0]["cells"][3]);
    assert_eq!(rows[1]["cells"][1], Value::Null);
    assert_eq!(rows[0]["object"]["kind"], "PartialObjectMetadata");
    let one =
        request_accept(a, "GET", &format!("{}/t1?includeObject=Object", coll("default")), None, Some(accept), None)
            .await
            .body;
    assert_eq!(one["rows"][0]["object"]["kind"], "Gadget");
    // Built-in types get their own columns.
    let ns = request_accept(a, "GET", "/api/v1/namespaces", None, Some(accept), None).await.body;
    assert_eq!(ns["columnDefinitions"][1]["name"], "Status");
    assert_eq!(ns["rows"][0]["cells"][1], "Active");
    // PartialObjectMetadata for metadata watchers.
    let pm = request_accept(
        a,
        "GET",
        &coll("default"),
        None,
        Some("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"),
        None,
    )
    .await
    .body;
    assert_eq!(pm["kind"], "PartialObjectMetadataList");
    assert_eq!(pm["items"][0]["metadata"]["name"], "t1");
    assert!(pm["items"][0].get("spec").is_none());
}

#[tokio::test]
async fn field_validation_and_pruning() {
    let server = TestApiServer::start().await;
    let a = server.addr();
    setup(a, "default").await;
    let mut g = gadget("p");
    g["spec"]["bogus"] = json!(1);
    g["spec"]["driver"]["fake"]["anything"] = json!({"goes": true});
    let r = json(a, "POST", &format!("{}?fieldValidation=Strict", coll("default")), &g).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        r.body["message"],
        "Gadget in version \"v1alpha1\" cannot be handled as a Gadget: strict decoding error: unknown field \"spec.bogus\""
    );
    let r = json(a, "POST", &coll("default"), &g).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.headers["warning"], "299 - \"unknown field \\\"spec.bogus\\\"\"");
    assert!(r.body["spec"].get("bogus").is_none(), "pruned");
    assert_eq!(r.body["spec"]["driver"]["fake"]["anything"]["goes"], true, "preserved");
    assert_eq!(r.body["spec"]["powerState"], "Running", "defaulted");
    let r = json(a, "POST", &format!("{}?fieldValidation=Ignore", coll("default")), &gadget("q")).await;
    assert!(r.headers.get("warning").is_none());
}

#[tokio::test]
async fn discovery_documents() {
    let server = TestApiServer::start().await;
    let a = server.addr();
    setup(a, "default").await;
    assert_eq!(get(a, "/version").await.body["major"], "1");
    assert_eq!(get(a, "/api").await.body["versions"], json!(["v1"]));
    let groups = get(a, "/apis").await.body;
    let gnames: Vec<&str> = groups["groups"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert!(gnames.contains(&"test.machinist.dev") && gnames.contains(&"events.k8s.io"));
    let rl = get(a, GADGETS_V).await.body;
    assert_eq!(rl["resources"][0]["name"], "gadgets");
    assert_eq!(rl["resources"][0]["shortNames"], json!(["gd"]));
    assert_eq!(rl["resources"][0]["categories"], json!(["machinist"]));
    assert_eq!(rl["resources"][1]["name"], "gadgets/status");
    let core = get(a, "/api/v1").await.body;
    assert!(core["resources"].as_array().unwrap().iter().any(|r| r["name"] == "secrets"));
    let root = get(a, "/openapi/v3").await.body;
    let url = root["paths"]["apis/test.machinist.dev/v1alpha1"]["serverRelativeURL"].as_str().unwrap().to_string();
    let doc = get(a, &url).await.body;
    let p = &doc["paths"]["/apis/test.machinist.dev/v1alpha1/namespaces/{namespace}/gadgets/{name}"]["patch"];
    assert_eq!(p["x-kubernetes-group-version-kind"]["kind"], "Gadget");
    assert!(p["parameters"].as_array().unwrap().iter().any(|x| x["name"] == "fieldValidation"));
    assert_eq!(get(a, "/apis/nope.dev/v1/things").await.status, 404);
}

#[tokio::test]
async fn write_counters_count_by_resource_and_verb() {
    let server = TestApiServer::start().await;
    let a = server.addr();
    setup(a, "default").await;
    server.reset_write_counts();
    json(a, "POST", &coll("default"), &gadget("c")).await;
    for _ in 0..3 {
        common::patch(
            a,
            &format!("{}/c/status", coll("default")),
            "application/merge-patch+json",
            &json!({"status": {"state": "x"}}),
        )
        .await;
    }
    common::patch(
        a,
        &format!("{}/c", coll("default")),
        "application/merge-patch+json",
        &json!({"metadata": {"labels": {"a": "b"}}}),
    )
    .await;
    get(a, &coll("default")).await;
    let c = server.write_counts();
    assert_eq!(c.get("gadgets", "POST"), 1);
    assert_eq!(c.get("gadgets/status", "PATCH"), 3);
    assert_eq!(c.get("gadgets", "PATCH"), 1);
    assert_eq!(c.total(), 5, "reads are not counted: {c}");
    server.reset_write_counts();
    assert_eq!(server.write_counts().total(), 0);
}

#[tokio::test]
async fn watch_from_the_future_is_504_after_a_wait() {
    let server = TestApiServer::start().await;
    let a = server.addr();
    let future = server.resource_version() + 1000;
    let started = std::time::Instant::now();
    let (status, events) = watch(
        a,
        &format!("/api/v1/namespaces?watch=true&resourceVersion={future}"),
        Duration::from_secs(8),
        || async {},
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["object"]["code"], 504);
    assert!(started.elapsed() >= Duration::from_secs(2));
}

#[tokio::test]
async fn deleting_a_crd_deletes_its_objects() {
    let server = TestApiServer::start().await;
    let a = server.addr();
    setup(a, "default").await;
    json(a, "POST", &coll("default"), &gadget("d1")).await;
    let r = common::request(
        a,
        "DELETE",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gadgets.test.machinist.dev",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(get(a, &coll("default")).await.status, 404, "no longer served");
    assert_eq!(
        get(a, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gadgets.test.machinist.dev").await.status,
        404
    );
    // And it can be installed again, empty.
    setup(a, "default").await;
    assert_eq!(names(&get(a, &coll("default")).await.body).len(), 0);
}

#[tokio::test]
async fn namespace_termination_waits_for_finalizers() {
    let server = TestApiServer::start().await;
    let a = server.addr();
    setup(a, "term").await;
    let ns = "/api/v1/namespaces/term";
    // A finalizer of someone else's on the namespace itself (set through /finalize).
    let mut obj = get(a, ns).await.body;
    obj["spec"]["finalizers"] = json!(["kubernetes", "example.com/hold"]);
    assert_eq!(json(a, "PUT", &format!("{ns}/finalize"), &obj).await.status, 200);
    json(a, "POST", "/api/v1/namespaces/term/secrets", &json!({"metadata": {"name": "plain"}})).await;
    let mut held = gadget("held");
    held["metadata"]["finalizers"] = json!(["example.com/cleanup"]);
    assert_eq!(json(a, "POST", &coll("term"), &held).await.status, 201);

    let r = common::request(a, "DELETE", ns, None, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"]["phase"], "Terminating");
    assert!(r.body["metadata"].get("deletionGracePeriodSeconds").is_none());
    assert_eq!(get(a, "/api/v1/namespaces/term/secrets/plain").await.status, 404, "deleted at once");
    let terminating = get(a, ns).await.body;
    let remaining = &terminating["status"]["conditions"][3];
    assert_eq!(remaining["type"], "NamespaceContentRemaining");
    assert_eq!(
        remaining["message"],
        "Some resources are remaining: gadgets.test.machinist.dev has 1 resource instances"
    );
    let managers: Vec<&Value> = terminating["metadata"]["managedFields"].as_array().unwrap().iter().collect();
    assert!(managers.iter().any(|m| m["manager"] == "kube-controller-manager" && m["subresource"] == "status"));

    // Nothing new in it, events included; both event APIs name what was asked for.
    let event = json!({"metadata": {"name": "e"}, "involvedObject": {"kind": "Gadget", "name": "held"},
        "reason": "R", "message": "m", "type": "Normal"});
    let r = json(a, "POST", "/api/v1/namespaces/term/events", &event).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(
        r.body["message"],
        "events \"e\" is forbidden: unable to create new content in namespace term because it is being terminated"
    );
    assert!(r.body["details"].get("group").is_none());
    let r = json(a, "POST", "/apis/events.k8s.io/v1/namespaces/term/events", &event).await;
    assert_eq!((r.status, r.body["details"]["group"].as_str()), (403, Some("events.k8s.io")));
    let r = get(a, "/api/v1/namespaces/term/events/nope").await;
    assert_eq!(r.body["message"], "events \"nope\" not found");

    // Writes to what is left still work; the last finalizer lets the content go.
    let held_url = format!("{}/held", coll("term"));
    let r = common::patch(
        a,
        &format!("{held_url}/status"),
        "application/merge-patch+json",
        &json!({"status": {"state": "Gone"}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r =
        common::patch(a, &held_url, "application/merge-patch+json", &json!({"metadata": {"finalizers": null}})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(get(a, &held_url).await.status, 404);
    // The namespace controller removed its own finalizer; the other one holds the namespace.
    let waiting = get(a, ns).await.body;
    assert_eq!(waiting["spec"]["finalizers"], json!(["example.com/hold"]));
    assert_eq!(waiting["status"]["conditions"][3]["reason"], "ContentRemoved");
    let mut obj = waiting.clone();
    obj["spec"]["finalizers"] = json!([]);
    assert_eq!(json(a, "PUT", &format!("{ns}/finalize"), &obj).await.status, 200);
    assert_eq!(get(a, ns).await.status, 404, "gone with its last finalizer");

    // An empty namespace goes right after its deletion is answered.
    json(a, "POST", "/api/v1/namespaces", &json!({"metadata": {"name": "empty"}})).await;
    let r = common::request(a, "DELETE", "/api/v1/namespaces/empty", None, None).await;
    assert_eq!((r.status, r.body["status"]["phase"].as_str()), (200, Some("Terminating")));
    assert_eq!(get(a, "/api/v1/namespaces/empty").await.status, 404);
}

#[tokio::test]
async fn managed_fields_can_be_reset_and_apply_must_not_set_them() {
    let server = TestApiServer::start().await;
    let a = server.addr();
    setup(a, "default").await;
    let created = json(a, "POST", &coll("default"), &gadget("m")).await.body;
    assert_eq!(created["metadata"]["managedFields"][0]["manager"], common::USER_AGENT.split('/').next().unwrap());
    let url = format!("{}/m", coll("default"));
    let r = common::patch(a, &url, "application/merge-patch+json", &json!({"metadata": {"managedFields": [{}]}})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body["metadata"].get("managedFields").is_none(), "{}", r.body);
    let mut config = gadget("m");
    config["metadata"]["managedFields"] = json!([{"manager": "x"}]);
    let r = common::patch(a, &format!("{url}?fieldManager=x"), "application/apply-patch+yaml", &config).await;
    assert_eq!((r.status, r.body["message"].as_str()), (400, Some("metadata.managedFields must be nil")));
}
