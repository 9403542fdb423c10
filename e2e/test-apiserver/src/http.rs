//! HTTP/1.1 front end: URL routing in kube's layout, query parameters,
//! content negotiation (JSON, Table, PartialObjectMetadata), write counters.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};

use crate::discovery;
use crate::error::ApiError;
use crate::events;
use crate::patch::{self, PatchType};
use crate::protobuf;
use crate::resources::{Builtin, ResourceType};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{DeleteOpts, DeleteOutcome, Inner, Store, Sub, WriteOpts, meta_str};
use crate::table::{self, IncludeObject};
use crate::watch::{self, WatchRequest};

pub type Body = BoxBody<Bytes, Infallible>;

/// Shared state of one server.
pub struct App {
    pub store: Arc<Store>,
    pub counters: Mutex<BTreeMap<String, u64>>,
    /// Read requests, keyed `"<resource> GET|LIST|WATCH"`.
    pub read_counters: Mutex<BTreeMap<String, u64>>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub bookmark_interval: Duration,
    /// `ServerOptions::crd_warmup_429s`, and what is left of it per resource.
    pub warmup_429s: u32,
    pub warmup: Mutex<HashMap<String, u32>>,
}

/// How objects are rendered for a request (from its Accept header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputForm {
    Plain,
    Table(IncludeObject),
    PartialMetadata,
}

impl OutputForm {
    fn from_accept(accept: &str, include: IncludeObject) -> OutputForm {
        // The first acceptable media type wins, as in kube's negotiation.
        for part in accept.split(',') {
            let p = part.replace(' ', "");
            if p.contains("as=Table") && p.contains("g=meta.k8s.io") {
                return OutputForm::Table(include);
            }
            if p.contains("as=PartialObjectMetadata") && p.contains("g=meta.k8s.io") {
                return OutputForm::PartialMetadata;
            }
            if p.starts_with("application/json") || p.starts_with("*/*") {
                return OutputForm::Plain;
            }
        }
        OutputForm::Plain
    }

    /// One object as a watch event's payload.
    pub fn wrap_event(&self, rt: &ResourceType, version: &str, view: &Value, headers: bool) -> Value {
        match self {
            OutputForm::Plain => view.clone(),
            OutputForm::PartialMetadata => partial(view),
            OutputForm::Table(inc) => table::table(
                rt,
                version,
                std::slice::from_ref(view),
                json!({"resourceVersion": meta_str(view, "resourceVersion")}),
                *inc,
                headers,
            ),
        }
    }
}

fn partial(view: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
        "metadata": view.get("metadata").cloned().unwrap_or(json!({}))})
}

/// The object as served by `rt` at `version` (core events converted,
/// apiVersion of multi-version CRDs rewritten).
pub fn render_view<'a>(rt: &ResourceType, version: &str, obj: &'a Value) -> Cow<'a, Value> {
    match rt.builtin {
        Builtin::CoreEvent => Cow::Owned(events::to_core(obj)),
        Builtin::Event => {
            let mut o = obj.clone();
            events::normalize_events_v1(&mut o);
            Cow::Owned(o)
        }
        _ => {
            let av = rt.api_version(version);
            if obj.get("apiVersion").and_then(Value::as_str) == Some(av.as_str()) {
                Cow::Borrowed(obj)
            } else {
                let mut o = obj.clone();
                o["apiVersion"] = Value::String(av);
                Cow::Owned(o)
            }
        }
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(code: u16, v: &Value, warnings: &[String]) -> Response<Body> {
    let mut b = Response::builder().status(code).header(header::CONTENT_TYPE, "application/json");
    for w in warnings {
        b = b.header("Warning", format!("299 - {w:?}"));
    }
    b.body(full(serde_json::to_vec(v).expect("serializable"))).expect("response")
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.code, &e.status_json(), &[]);
    if e.code == 429 {
        r.headers_mut().insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    }
    r
}

/// A parsed resource URL.
#[derive(Debug)]
struct ResourcePath {
    group: String,
    version: String,
    ns: Option<String>,
    plural: String,
    name: Option<String>,
    sub: Option<String>,
    watch_prefix: bool,
}

enum Route {
    Static(Value),
    OpenApiV3Root,
    OpenApiV3(String),
    Discovery { group: String, version: Option<String> },
    Resource(ResourcePath),
    NotFound,
}

fn route(path: &str) -> Route {
    let segs: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest): (String, String, &[&str]) = match segs.as_slice() {
        ["version"] => return Route::Static(discovery::version()),
        ["healthz"] | ["livez"] | ["readyz"] => return Route::Static(Value::String("ok".into())),
        ["api"] => return Route::Static(discovery::core_versions()),
        ["apis"] => {
            return Route::Discovery { group: "*".into(), version: None };
        }
        ["openapi", "v3"] => return Route::OpenApiV3Root,
        ["openapi", "v3", rest @ ..] => return Route::OpenApiV3(rest.join("/")),
        ["api", v, rest @ ..] => (String::new(), v.to_string(), rest),
        ["apis", g] => {
            return Route::Discovery { group: g.to_string(), version: None };
        }
        ["apis", g, v, rest @ ..] => (g.to_string(), v.to_string(), rest),
        _ => return Route::NotFound,
    };
    let (watch_prefix, rest) = match rest {
        ["watch", r @ ..] => (true, r),
        r => (false, r),
    };
    let rp = |ns: Option<&str>, r: &[&str]| -> Route {
        match r {
            [plural] | [plural, ..] if r.len() <= 3 => Route::Resource(ResourcePath {
                group: group.clone(),
                version: version.clone(),
                ns: ns.map(String::from),
                plural: plural.to_string(),
                name: r.get(1).map(|s| s.to_string()),
                sub: r.get(2).map(|s| s.to_string()),
                watch_prefix,
            }),
            _ => Route::NotFound,
        }
    };
    match rest {
        [] => Route::Discovery { group, version: Some(version) },
        ["namespaces", ns, third, r @ ..] if !(r.is_empty() && (*third == "status" || *third == "finalize")) => {
            let mut v = vec![*third];
            v.extend_from_slice(r);
            rp(Some(ns), &v)
        }
        r => rp(None, r),
    }
}

fn query_map(q: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(q.unwrap_or_default().as_bytes()).into_owned().collect()
}

fn truthy(q: &HashMap<String, String>, k: &str) -> bool {
    matches!(q.get(k).map(String::as_str), Some("true" | "1"))
}

impl App {
    fn count(&self, key: String) {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        *c.entry(key).or_default() += 1;
    }

    fn count_read(&self, key: String) {
        let mut c = self.read_counters.lock().unwrap_or_else(|e| e.into_inner());
        *c.entry(key).or_default() += 1;
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let path = parts.uri.path().to_string();
        let q = query_map(parts.uri.query());
        let header =
            |n: header::HeaderName| parts.headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let accept = header(header::ACCEPT);
        let ctype = header(header::CONTENT_TYPE);
        let agent = header(header::USER_AGENT);
        tracing::debug!(method = %parts.method, %path, query = ?parts.uri.query(), "request");
        let req = RequestInfo { accept: &accept, ctype: &ctype, agent: &agent };
        match self.dispatch(&parts.method, &path, &q, &req, &body) {
            Ok(Reply::Json(code, v, warnings)) => json_response(code, &v, &warnings),
            Ok(Reply::Stream(rx)) => {
                let stream = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
                });
                Response::builder()
                    .status(StatusCode::OK)
                    .header(header::CONTENT_TYPE, "application/json")
                    .header("Transfer-Encoding", "chunked")
                    .body(StreamBody::new(stream).boxed())
                    .expect("response")
            }
            Err(e) => {
                tracing::debug!(%path, code = e.code, reason = e.reason, detail = %e.message, "refused");
                error_response(&e)
            }
        }
    }

    fn dispatch(
        self: &Arc<Self>,
        method: &Method,
        path: &str,
        q: &HashMap<String, String>,
        req: &RequestInfo,
        body: &Bytes,
    ) -> Result<Reply, ApiError> {
        let types: Vec<Arc<ResourceType>> = self.store.lock().types.values().cloned().collect();
        match route(path) {
            Route::Static(v) => Ok(Reply::Json(200, v, vec![])),
            Route::NotFound => Err(ApiError::generic_not_found(path)),
            Route::OpenApiV3Root => {
                let hash = self.store.lock().types.len() as u64;
                Ok(Reply::Json(200, discovery::openapi_v3_root(&types, hash), vec![]))
            }
            Route::OpenApiV3(gv) => discovery::openapi_v3_gv(&types, &gv)
                .map(|v| Reply::Json(200, v, vec![]))
                .ok_or_else(|| ApiError::generic_not_found(path)),
            Route::Discovery { group, version } => {
                let v = match (group.as_str(), version) {
                    ("*", _) => Some(discovery::group_list(&types)),
                    (g, None) => discovery::group(&types, g),
                    (g, Some(v)) => discovery::resource_list(&types, g, &v),
                };
                v.map(|v| Reply::Json(200, v, vec![])).ok_or_else(|| ApiError::generic_not_found(path))
            }
            Route::Resource(rp) => self.resource(method, rp, q, req, body),
        }
    }

    /// Run a write under the store's lock, then what the cluster's
    /// controllers do after it; then wake the watchers.
    fn write<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut g = self.store.lock();
        let out = f(&mut g);
        g.run_controllers();
        drop(g);
        self.store.notify();
        out
    }

    fn resource(
        self: &Arc<Self>,
        method: &Method,
        rp: ResourcePath,
        q: &HashMap<String, String>,
        req: &RequestInfo,
        body: &Bytes,
    ) -> Result<Reply, ApiError> {
        let rt = self
            .store
            .lock()
            .type_of(&rp.group, &rp.plural)
            .filter(|t| t.version(&rp.version).is_some())
            .ok_or_else(|| ApiError::generic_not_found(""))?;
        // The storage type (core events are stored as events.k8s.io).
        let srt = if rt.builtin == Builtin::CoreEvent {
            self.store.lock().type_of("events.k8s.io", "events").expect("builtin")
        } else {
            rt.clone()
        };
        let (served, stored) = (rt.clone(), srt.clone());
        self.serve(method, rp, q, req, body, rt, srt).map_err(|e| e.about(&stored, &served))
    }

    /// A request for `rt`'s objects, stored as `srt`'s.
    #[allow(clippy::too_many_arguments)]
    fn serve(
        self: &Arc<Self>,
        method: &Method,
        rp: ResourcePath,
        q: &HashMap<String, String>,
        req: &RequestInfo,
        body: &Bytes,
        rt: Arc<ResourceType>,
        srt: Arc<ResourceType>,
    ) -> Result<Reply, ApiError> {
        let (accept, ctype) = (req.accept, req.ctype);
        let version = rp.version.clone();
        if rt.namespaced != rp.ns.is_some() && !(rp.ns.is_none() && rp.name.is_none()) {
            return Err(ApiError::generic_not_found(""));
        }
        let ns = rp.ns.clone().unwrap_or_default();
        let sub = match rp.sub.as_deref() {
            None => Sub::Main,
            Some("status") if rt.version(&version).is_some_and(|v| v.has_status) => Sub::Status,
            Some("finalize") if rt.builtin == Builtin::Namespace => Sub::Finalize,
            Some(_) => return Err(ApiError::generic_not_found("")),
        };
        let include = IncludeObject::parse(q.get("includeObject").map(String::as_str));
        let form = OutputForm::from_accept(accept, include);
        if matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE) {
            let what = match &rp.sub {
                Some(s) => format!("{}/{s}", rt.plural),
                None => rt.plural.clone(),
            };
            self.count(format!("{what} {method}"));
        } else if *method == Method::GET {
            let kind = match rp.name {
                Some(_) => "GET",
                None if rp.watch_prefix || truthy(q, "watch") => "WATCH",
                None => "LIST",
            };
            self.count_read(format!("{} {kind}", rt.plural));
        }
        let dry_run = q.get("dryRun").is_some_and(|d| d == "All");
        let validation = q.get("fieldValidation").cloned().unwrap_or_else(|| "Warn".into());
        let field_manager = q.get("fieldManager").cloned().unwrap_or_default();
        let mut wopts = WriteOpts {
            manager: if field_manager.is_empty() { manager_of_agent(req.agent) } else { field_manager.clone() },
            force: truthy(q, "force"),
            dry_run,
            via_events_api: rt.builtin == Builtin::Event,
            strict: validation == "Strict",
            ..Default::default()
        };
        let out = |obj: &Value| -> Value {
            let view = render_view(&rt, &version, obj);
            match form {
                OutputForm::Plain => view.into_owned(),
                OutputForm::PartialMetadata => partial(&view),
                OutputForm::Table(inc) => table::table(
                    &rt,
                    &version,
                    std::slice::from_ref(&view),
                    json!({"resourceVersion": meta_str(&view, "resourceVersion")}),
                    inc,
                    true,
                ),
            }
        };
        let warnings = |w: &WriteOpts| -> Vec<String> {
            if validation == "Warn" {
                w.unknown_fields.iter().map(|f| format!("unknown field {:?}", f.trim_start_matches('.'))).collect()
            } else {
                vec![]
            }
        };
        if ctype.contains("cbor") {
            return Err(ApiError::unsupported_media_type(ctype));
        }
        let parse_obj = |body: &Bytes| -> Result<Value, ApiError> {
            let v = if ctype.contains("protobuf") {
                protobuf::decode(body)?
            } else {
                patch::parse_body(body, ctype.contains("yaml"))?
            };
            Ok(if rt.builtin == Builtin::CoreEvent { events::from_core(&v) } else { v })
        };
        let result = match (method, rp.name.as_deref()) {
            (&Method::GET, Some(name)) => {
                let obj = self.store.lock().get(&srt, &ns, name)?;
                Reply::Json(200, out(&obj), vec![])
            }
            (&Method::GET, None) if rp.watch_prefix || truthy(q, "watch") => {
                self.watch(rt.clone(), version.clone(), rp.ns.clone(), q, form)?
            }
            (&Method::GET, None) => {
                if rt.builtin == Builtin::Custom && self.warming_up(&rt.storage_key()) {
                    return Err(ApiError::new(429, "TooManyRequests", "storage is (re)initializing")
                        .with_details(json!({"retryAfterSeconds": 1})));
                }
                self.list(&rt, &srt, &version, rp.ns.as_deref(), q, form)?
            }
            (&Method::POST, None) => {
                if rp.ns.is_none() && rt.namespaced {
                    return Err(ApiError::method_not_allowed());
                }
                let obj = parse_obj(body)?;
                let created = self.write(|g| g.create(&srt, &version, &ns, obj, &mut wopts));
                Reply::Json(201, out(&*created?), warnings(&wopts))
            }
            (&Method::PUT, Some(name)) => {
                let obj = parse_obj(body)?;
                let r = self.write(|g| g.update(&srt, &version, &ns, name, obj, sub, &mut wopts, true));
                Reply::Json(200, out(&*r?), warnings(&wopts))
            }
            (&Method::PATCH, Some(name)) => {
                let ptype =
                    PatchType::from_content_type(ctype).ok_or_else(|| ApiError::unsupported_media_type(ctype))?;
                if ptype == PatchType::Apply && field_manager.is_empty() {
                    return Err(ApiError::invalid(
                        "meta.k8s.io",
                        "PatchOptions",
                        "",
                        vec![crate::error::Cause::required("fieldManager", "is required for apply patch")],
                    ));
                }
                let mut pbody = patch::parse_body(body, ptype == PatchType::Apply)?;
                if rt.builtin == Builtin::CoreEvent && ptype == PatchType::Apply {
                    // Applied in storage terms, like a create through /api/v1.
                    pbody = events::from_core(&pbody);
                }
                let (existed, r) = self.write(|g| {
                    let existed = g.get(&srt, &ns, name).is_ok();
                    let r = if rt.builtin == Builtin::CoreEvent && ptype != PatchType::Apply {
                        // Patch the core/v1 view, then store it converted back.
                        g.get(&srt, &ns, name).and_then(|cur| {
                            let mut doc = events::to_core(&cur);
                            match ptype {
                                PatchType::Json => patch::json_patch(&mut doc, &pbody)?,
                                PatchType::Merge => patch::merge_patch(&mut doc, &pbody),
                                _ => patch::strategic_patch(&mut doc, &pbody),
                            }
                            g.update(&srt, &version, &ns, name, events::from_core(&doc), sub, &mut wopts, false)
                        })
                    } else {
                        g.patch(&srt, &version, &ns, name, ptype, &pbody, sub, &mut wopts)
                    };
                    (existed, r)
                });
                let code = if existed { 200 } else { 201 };
                Reply::Json(code, out(&*r?), warnings(&wopts))
            }
            (&Method::DELETE, Some(name)) => {
                let dopts = delete_opts(q, body, dry_run);
                match self.write(|g| g.delete(&srt, &ns, name, &dopts))? {
                    DeleteOutcome::Pending(obj) => Reply::Json(200, out(&obj), vec![]),
                    DeleteOutcome::Deleted(obj) => {
                        let mut details = json!({"name": name, "kind": rt.plural, "uid": meta_str(&obj, "uid")});
                        if !rt.group.is_empty() {
                            details["group"] = Value::String(rt.group.clone());
                        }
                        Reply::Json(
                            200,
                            json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Success", "details": details}),
                            vec![],
                        )
                    }
                }
            }
            (&Method::DELETE, None) => {
                // deletecollection: delete each selected object.
                let dopts = delete_opts(q, body, dry_run);
                let label = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or_default())?;
                let field = FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or_default())?;
                let (items, rv) = self.write(|g| -> Result<_, ApiError> {
                    let mut items = Vec::new();
                    for o in g.snapshot(&srt.storage_key(), rp.ns.as_deref(), None)? {
                        let view = render_view(&rt, &version, &o).into_owned();
                        if label.matches(&view) && field.matches(&view) {
                            let n = meta_str(&o, "name").to_string();
                            let ons = meta_str(&o, "namespace").to_string();
                            if g.delete(&srt, &ons, &n, &dopts).is_ok() {
                                items.push(view);
                            }
                        }
                    }
                    Ok((items, g.rv))
                })?;
                Reply::Json(
                    200,
                    json!({"apiVersion": rt.api_version(&version), "kind": rt.list_kind,
                        "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
                    vec![],
                )
            }
            _ => return Err(ApiError::method_not_allowed()),
        };
        Ok(result)
    }

    /// Consume one of a new resource's emulated warm-up 429s, if any are left.
    fn warming_up(&self, key: &str) -> bool {
        if self.warmup_429s == 0 {
            return false;
        }
        let mut w = self.warmup.lock().unwrap_or_else(|e| e.into_inner());
        let left = w.entry(key.to_string()).or_insert(self.warmup_429s);
        if *left == 0 {
            return false;
        }
        *left -= 1;
        true
    }

    fn list(
        &self,
        rt: &Arc<ResourceType>,
        srt: &Arc<ResourceType>,
        version: &str,
        ns: Option<&str>,
        q: &HashMap<String, String>,
        form: OutputForm,
    ) -> Result<Reply, ApiError> {
        let label = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or_default())?;
        let field = FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or_default())?;
        let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
        let cont = q.get("continue").filter(|c| !c.is_empty()).map(|c| decode_continue(c)).transpose()?;
        let exact_rv = match (q.get("resourceVersionMatch").map(String::as_str), q.get("resourceVersion")) {
            (Some("Exact"), Some(rv)) => Some(parse_rv(rv)?),
            _ => None,
        };
        let at = cont.as_ref().map(|c| c.0).or(exact_rv);
        let (objs, current) = {
            let g = self.store.lock();
            (g.snapshot(&srt.storage_key(), ns, at)?, g.rv)
        };
        let list_rv = at.unwrap_or(current);
        let start_after = cont.map(|c| c.1);
        let mut items = Vec::new();
        let mut remaining = 0usize;
        let mut last_key = None;
        for o in &objs {
            let key = format!("{}/{}", meta_str(o, "namespace"), meta_str(o, "name"));
            if start_after.as_ref().is_some_and(|s| key <= *s) {
                continue;
            }
            let view = render_view(rt, version, o);
            if !(label.matches(&view) && field.matches(&view)) {
                continue;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                remaining += 1;
                continue;
            }
            last_key = Some(key);
            items.push(view.into_owned());
        }
        let mut meta = json!({"resourceVersion": list_rv.to_string()});
        if remaining > 0 {
            meta["continue"] = Value::String(encode_continue(list_rv, last_key.as_deref().unwrap_or_default()));
            meta["remainingItemCount"] = json!(remaining);
        } else {
            meta["continue"] = Value::String(String::new());
        }
        let v = match form {
            OutputForm::Table(inc) => table::table(rt, version, &items, meta, inc, true),
            OutputForm::PartialMetadata => json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                "metadata": meta, "items": items.iter().map(partial).collect::<Vec<_>>()}),
            OutputForm::Plain => json!({"apiVersion": rt.api_version(version), "items": items,
                "kind": rt.list_kind, "metadata": meta}),
        };
        Ok(Reply::Json(200, v, vec![]))
    }

    fn watch(
        &self,
        rt: Arc<ResourceType>,
        version: String,
        ns: Option<String>,
        q: &HashMap<String, String>,
        form: OutputForm,
    ) -> Result<Reply, ApiError> {
        let label = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or_default())?;
        let field = FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or_default())?;
        let send_initial_events = truthy(q, "sendInitialEvents");
        let rv = match q.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(r) if send_initial_events => {
                parse_rv(r)?;
                None
            }
            Some(r) => Some(parse_rv(r)?),
        };
        let timeout = q.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).map(Duration::from_secs);
        let req = WatchRequest {
            rt,
            version,
            ns,
            label,
            field,
            rv,
            send_initial_events,
            bookmarks: truthy(q, "allowWatchBookmarks"),
            timeout,
            form,
            bookmark_interval: self.bookmark_interval,
        };
        Ok(Reply::Stream(watch::start(self.store.clone(), self.shutdown.clone(), req)))
    }
}

enum Reply {
    Json(u16, Value, Vec<String>),
    Stream(tokio::sync::mpsc::Receiver<Bytes>),
}

/// The request headers that matter.
struct RequestInfo<'a> {
    accept: &'a str,
    ctype: &'a str,
    agent: &'a str,
}

/// kube's field manager for writes without `fieldManager`: the User-Agent
/// up to its first `/` (e.g. `kubectl` for `kubectl/v1.36.0 (...)`), printable
/// characters only, at most 128 bytes.
fn manager_of_agent(agent: &str) -> String {
    let mut out = String::new();
    for c in agent.split('/').next().unwrap_or_default().chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > 128 {
            break;
        }
        out.push(c);
    }
    out
}

fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid resource version: {s:?}")))
}

fn delete_opts(q: &HashMap<String, String>, body: &Bytes, dry_run: bool) -> DeleteOpts {
    let b: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let s = |v: Option<&Value>| v.and_then(Value::as_str).map(String::from);
    DeleteOpts {
        propagation: q.get("propagationPolicy").cloned().or_else(|| s(b.get("propagationPolicy"))).or_else(|| match b
            .get("orphanDependents")
            .and_then(Value::as_bool)
        {
            Some(true) => Some("Orphan".into()),
            _ => None,
        }),
        precondition_uid: s(b.pointer("/preconditions/uid")),
        precondition_rv: s(b.pointer("/preconditions/resourceVersion")),
        dry_run: dry_run || b.get("dryRun").and_then(Value::as_array).is_some_and(|a| a.iter().any(|x| x == "All")),
    }
}

/// Continue tokens look like kube's: base64 of {"v","rv","start"}.
fn encode_continue(rv: u64, last_key: &str) -> String {
    let t = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{last_key}\u{0}")});
    base64::engine::general_purpose::STANDARD.encode(t.to_string())
}

fn decode_continue(s: &str) -> Result<(u64, String), ApiError> {
    let bad = || ApiError::bad_request("continue key is not valid");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(s)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(s))
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let start = v.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    Ok((rv, start.trim_end_matches('\u{0}').to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = |p: &str| match route(p) {
            Route::Resource(rp) => format!(
                "{}|{}|{:?}|{}|{:?}|{:?}|{}",
                rp.group, rp.version, rp.ns, rp.plural, rp.name, rp.sub, rp.watch_prefix
            ),
            Route::Discovery { group, version } => format!("disc {group} {version:?}"),
            _ => "other".into(),
        };
        assert_eq!(r("/api/v1/namespaces"), "|v1|None|namespaces|None|None|false");
        assert_eq!(r("/api/v1/namespaces/x"), "|v1|None|namespaces|Some(\"x\")|None|false");
        assert_eq!(r("/api/v1/namespaces/x/status"), "|v1|None|namespaces|Some(\"x\")|Some(\"status\")|false");
        assert_eq!(r("/api/v1/namespaces/x/secrets"), "|v1|Some(\"x\")|secrets|None|None|false");
        assert_eq!(
            r("/apis/g.io/v1/namespaces/n/things/a/status"),
            "g.io|v1|Some(\"n\")|things|Some(\"a\")|Some(\"status\")|false"
        );
        assert_eq!(r("/apis/g.io/v1/things"), "g.io|v1|None|things|None|None|false");
        assert_eq!(r("/apis/g.io/v1/watch/namespaces/n/things"), "g.io|v1|Some(\"n\")|things|None|None|true");
        assert_eq!(r("/apis/g.io/v1"), "disc g.io Some(\"v1\")");
    }

    #[test]
    fn continue_roundtrip() {
        let t = encode_continue(42, "ns/name");
        assert_eq!(decode_continue(&t).unwrap(), (42, "ns/name".to_string()));
    }
}
