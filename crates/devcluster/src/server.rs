//! The HTTP layer: routes Kubernetes API paths to the store, decodes bodies and query
//! parameters, encodes lists, Tables, watch streams and error Status objects. Serves the same
//! handler over HTTPS (rustls) and, optionally, plain HTTP; HTTP/1.1 only.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};

use crate::discovery;
use crate::patch;
use crate::resources::ResourceType;
use crate::selectors::{FieldSelector, LabelSelector, Selectors};
use crate::ssa;
use crate::status::{self, ApiError};
use crate::store::{
    DeleteOptions, Ownership, Propagation, Store, StoredEvent, WatchStart, WriteOptions,
    with_version,
};
use crate::table;

type Body = BoxBody<Bytes, Infallible>;

/// Largest request body accepted (Helm release secrets are big).
const MAX_BODY: usize = 64 << 20;

/// Shared state of the handlers.
#[derive(Debug)]
pub struct ServerState {
    /// The store.
    pub store: Arc<Store>,
    /// `host:port` clients reach the HTTPS endpoint at.
    pub server_address: String,
    /// How often watches that allow bookmarks get one.
    pub bookmark_interval: Duration,
    /// Flips to true on shutdown; watch streams end.
    pub shutdown: watch::Receiver<bool>,
    /// Where the pod runner writes process output (`<ns>_<pod>.log`), served by `pods/<name>/log`.
    pub pod_logs: std::path::PathBuf,
}

/// Serve HTTPS on `listener` until shutdown.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<ServerState>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut shutdown = state.shutdown.clone();
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r { Ok(c) => c, Err(err) => { tracing::warn!(%err, "accept failed"); continue; } },
            _ = shutdown.changed() => return,
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            match acceptor.accept(tcp).await {
                Ok(stream) => serve_connection(TokioIo::new(stream), state).await,
                Err(err) => tracing::debug!(%err, "TLS handshake failed"),
            }
        });
    }
}

/// Serve plain HTTP on `listener` until shutdown.
pub async fn serve_plain(listener: TcpListener, state: Arc<ServerState>) {
    let mut shutdown = state.shutdown.clone();
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r { Ok(c) => c, Err(err) => { tracing::warn!(%err, "accept failed"); continue; } },
            _ = shutdown.changed() => return,
        };
        let state = state.clone();
        tokio::spawn(async move { serve_connection(TokioIo::new(tcp), state).await });
    }
}

async fn serve_connection<I>(io: I, state: Arc<ServerState>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(req, state).await) }
    });
    if let Err(err) = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service)
        .await
    {
        tracing::debug!(%err, "connection ended with an error");
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_response(err: &ApiError) -> Response<Body> {
    json_response(err.code, &err.to_status())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a request carries besides its path.
struct Req {
    method: Method,
    query: BTreeMap<String, String>,
    accept: String,
    content_type: String,
    user_agent: String,
    body: Bytes,
}

impl Req {
    fn q(&self, key: &str) -> Option<&str> {
        self.query
            .get(key)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }
    fn flag(&self, key: &str) -> bool {
        matches!(self.q(key), Some("true") | Some("1"))
    }
    fn wants_table(&self) -> bool {
        self.accept.contains("as=Table")
    }
    fn strict(&self) -> bool {
        self.q("fieldValidation") == Some("Strict")
    }
    fn dry_run(&self) -> bool {
        self.q("dryRun") == Some("All")
    }
    fn manager(&self) -> String {
        if let Some(m) = self.q("fieldManager") {
            return m.to_string();
        }
        let ua = self.user_agent.split('/').next().unwrap_or_default();
        if ua.is_empty() {
            "unknown".into()
        } else {
            ua.chars().take(128).collect()
        }
    }
    fn body_json(&self) -> Result<Value, ApiError> {
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        if self.content_type.starts_with(crate::protobuf::MEDIA_TYPE) {
            return crate::protobuf::decode(&self.body);
        }
        if self.content_type.contains("yaml") {
            serde_yaml::from_slice::<Value>(&self.body)
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
        } else {
            serde_json::from_slice::<Value>(&self.body).or_else(|_| {
                serde_yaml::from_slice::<Value>(&self.body).map_err(|e| {
                    ApiError::bad_request(format!(
                        "the body of the request was in an unknown format: {e}"
                    ))
                })
            })
        }
    }
    fn selectors(&self) -> Result<Selectors, ApiError> {
        Ok(Selectors {
            labels: LabelSelector::parse(self.q("labelSelector").unwrap_or_default())?,
            fields: FieldSelector::parse(self.q("fieldSelector").unwrap_or_default())?,
        })
    }
}

async fn handle(req: Request<Incoming>, state: Arc<ServerState>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let accept = header("accept");
    let content_type = header("content-type");
    let user_agent = header("user-agent");
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(err) => {
            return error_response(&ApiError::bad_request(format!(
                "failed to read the request body: {err}"
            )));
        }
    };
    let r = Req {
        method,
        query,
        accept,
        content_type,
        user_agent,
        body,
    };
    tracing::debug!(method = %r.method, %path, "request");
    match route(&r, &path, &state) {
        Ok(resp) => resp,
        Err(err) => error_response(&err),
    }
}

fn route(r: &Req, path: &str, state: &Arc<ServerState>) -> Result<Response<Body>, ApiError> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let reg = state.store.registry();
    let ok = |v: Value| Ok(json_response(200, &v));
    match segs.as_slice() {
        ["version"] => return ok(discovery::version()),
        ["healthz"] | ["readyz"] | ["livez"] => return Ok(Response::new(full("ok"))),
        ["api"] => return ok(discovery::core_versions(&state.server_address)),
        ["apis"] => return ok(discovery::groups(&reg)),
        ["openapi", "v2"] => return openapi_v2(r, &reg),
        ["openapi", "v3"] => return ok(discovery::openapi_v3_root(&reg)),
        ["openapi", "v3", "api", v] => {
            return discovery::openapi_v3_group(&reg, "", v)
                .map(|d| json_response(200, &d))
                .ok_or_else(|| ApiError::no_route(path));
        }
        ["openapi", "v3", "apis", g, v] => {
            return discovery::openapi_v3_group(&reg, g, v)
                .map(|d| json_response(200, &d))
                .ok_or_else(|| ApiError::no_route(path));
        }
        ["api", "v1"] if r.method == Method::GET => {
            return discovery::resource_list(&reg, "", "v1")
                .map(|d| json_response(200, &d))
                .ok_or_else(|| ApiError::no_route(path));
        }
        ["apis", g] if r.method == Method::GET => {
            return discovery::group(&reg, g)
                .map(|d| json_response(200, &d))
                .ok_or_else(|| ApiError::no_route(path));
        }
        ["apis", g, v] if r.method == Method::GET => {
            return discovery::resource_list(&reg, g, v)
                .map(|d| json_response(200, &d))
                .ok_or_else(|| ApiError::no_route(path));
        }
        _ => {}
    }
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", v, rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return Err(ApiError::no_route(path)),
    };
    let lookup = |plural: &str| reg.get(group, version, plural).cloned();
    // `namespaces/<ns>/<resource>...` addresses a namespaced resource; otherwise the path is
    // cluster-scoped (which includes `namespaces/<name>[/status]` itself).
    let (ns, rt, name, sub) = match rest {
        ["namespaces", ns, plural, tail @ ..] if lookup(plural).is_some_and(|rt| rt.namespaced) => {
            (
                Some(ns.to_string()),
                lookup(plural),
                tail.first().map(|s| s.to_string()),
                tail.get(1).map(|s| s.to_string()),
            )
        }
        [plural, tail @ ..] => (
            None,
            lookup(plural),
            tail.first().map(|s| s.to_string()),
            tail.get(1).map(|s| s.to_string()),
        ),
        [] => return Err(ApiError::no_route(path)),
    };
    let rt = rt.ok_or_else(|| ApiError::no_route(path))?;
    if let Some(sub) = &sub
        && !(sub == "status" && rt.status_subresource)
    {
        if sub == "log"
            && rt.group.is_empty()
            && rt.plural == "pods"
            && let Some(name) = &name
        {
            return pod_log(r, state, ns.as_deref().unwrap_or_default(), name);
        }
        if sub == "scale"
            && has_scale(&rt)
            && let Some(name) = &name
        {
            return scale(
                r,
                &state.store,
                &rt,
                ns.as_deref().unwrap_or_default(),
                name,
            );
        }
        return Err(ApiError::no_route(path));
    }
    resource(r, state, &rt, ns, name, sub)
}

/// `/openapi/v2` in JSON or protobuf, as `Accept` asks; 406 (empty body) for anything else,
/// as kube-apiserver answers.
fn openapi_v2(r: &Req, reg: &crate::resources::Registry) -> Result<Response<Body>, ApiError> {
    let Some(encoding) = crate::openapi::negotiate(&r.accept) else {
        let mut resp = Response::new(full(Bytes::new()));
        *resp.status_mut() = StatusCode::NOT_ACCEPTABLE;
        return Ok(resp);
    };
    let (content_type, body) = crate::openapi::encode(reg, &encoding);
    let mut resp = Response::new(full(body));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    Ok(resp)
}

fn resource(
    r: &Req,
    state: &Arc<ServerState>,
    rt: &ResourceType,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
) -> Result<Response<Body>, ApiError> {
    let store = &state.store;
    let nsr = ns.as_deref().unwrap_or_default();
    match (&r.method, name) {
        (&Method::GET, None) if r.flag("watch") => watch(r, state, rt, ns.as_deref()),
        (&Method::GET, None) => list(r, store, rt, ns.as_deref()),
        (&Method::GET, Some(name)) => {
            let obj = store.get(rt, nsr, &name)?;
            if r.wants_table() {
                let rv = obj["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                return Ok(json_response(
                    200,
                    &table::table(rt, &[obj], &rv, r.q("includeObject").unwrap_or("Metadata")),
                ));
            }
            Ok(json_response(200, &obj))
        }
        (&Method::POST, None) => {
            if rt.namespaced && ns.is_none() {
                return Err(ApiError::method_not_allowed(
                    "create of a namespaced resource needs a namespace in the path",
                ));
            }
            let opts = WriteOptions {
                ownership: Ownership::Update(r.manager()),
                subresource: None,
                dry_run: r.dry_run(),
                strict: r.strict(),
            };
            let obj = store.create(rt, nsr, r.body_json()?, &opts)?;
            Ok(json_response(201, &obj))
        }
        (&Method::PUT, Some(name)) => {
            let opts = WriteOptions {
                ownership: Ownership::Update(r.manager()),
                subresource: sub,
                dry_run: r.dry_run(),
                strict: r.strict(),
            };
            let obj = store.update(rt, nsr, &name, r.body_json()?, &opts)?;
            Ok(json_response(200, &obj))
        }
        (&Method::PATCH, Some(name)) => patch_request(r, store, rt, nsr, &name, sub),
        (&Method::DELETE, Some(name)) => {
            let opts = delete_options(r)?;
            let obj = store.delete(rt, nsr, &name, &opts)?;
            let gone = obj["metadata"]["deletionTimestamp"].is_null()
                || obj["metadata"]["finalizers"]
                    .as_array()
                    .is_none_or(|f| f.is_empty());
            if gone && rt.custom {
                let uid = obj["metadata"]["uid"].as_str().unwrap_or_default();
                return Ok(json_response(
                    200,
                    &status::success_status(&name, &rt.group, &rt.plural, uid),
                ));
            }
            Ok(json_response(200, &obj))
        }
        (&Method::DELETE, None) => {
            let opts = delete_options(r)?;
            let items = store.delete_collection(rt, ns.as_deref(), &r.selectors()?, &opts)?;
            Ok(json_response(
                200,
                &json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(),
                "metadata": {"resourceVersion": store.resource_version().to_string()}, "items": items}),
            ))
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({})",
            r.method
        ))),
    }
}

fn delete_options(r: &Req) -> Result<DeleteOptions, ApiError> {
    let body = r.body_json()?;
    let policy = r
        .q("propagationPolicy")
        .map(str::to_string)
        .or_else(|| body["propagationPolicy"].as_str().map(str::to_string))
        .or_else(|| {
            match body["orphanDependents"]
                .as_bool()
                .or(r.q("orphanDependents").map(|v| v == "true"))
            {
                Some(true) => Some("Orphan".into()),
                _ => None,
            }
        });
    let propagation = match policy.as_deref() {
        Some("Orphan") => Propagation::Orphan,
        Some("Foreground") => Propagation::Foreground,
        _ => Propagation::Background,
    };
    let dry_run = r.dry_run()
        || body["dryRun"]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v == "All"));
    Ok(DeleteOptions {
        propagation,
        uid: body["preconditions"]["uid"].as_str().map(str::to_string),
        resource_version: body["preconditions"]["resourceVersion"]
            .as_str()
            .map(str::to_string),
        dry_run,
    })
}

fn list(
    r: &Req,
    store: &Store,
    rt: &ResourceType,
    ns: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let (mut items, rv) = store.list(rt, ns, &r.selectors()?);
    if r.q("resourceVersionMatch") == Some("Exact")
        && let Some(want) = r.q("resourceVersion")
        && want != rv.to_string()
    {
        return Err(ApiError::gone(format!(
            "too old resource version: {want} ({rv})"
        )));
    }
    // Pagination: the continue token names the last key returned.
    if let Some(token) = r.q("continue") {
        let last = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
        items.retain(|o| object_key(o) > last);
    }
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(limit) = r
        .q("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        && items.len() > limit
    {
        let remaining = items.len() - limit;
        items.truncate(limit);
        let last = items.last().map(object_key).unwrap_or_default();
        meta["continue"] = json!(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last));
        meta["remainingItemCount"] = json!(remaining);
    }
    if r.wants_table() {
        let mut t = table::table(
            rt,
            &items,
            &rv.to_string(),
            r.q("includeObject").unwrap_or("Metadata"),
        );
        t["metadata"] = meta;
        return Ok(json_response(200, &t));
    }
    Ok(json_response(
        200,
        &json!({
            "kind": format!("{}List", rt.kind),
            "apiVersion": rt.api_version(),
            "metadata": meta,
            "items": items,
        }),
    ))
}

fn object_key(o: &Value) -> String {
    format!(
        "{}/{}",
        o["metadata"]["namespace"].as_str().unwrap_or_default(),
        o["metadata"]["name"].as_str().unwrap_or_default()
    )
}

fn patch_request(
    r: &Req,
    store: &Store,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    sub: Option<String>,
) -> Result<Response<Body>, ApiError> {
    let body = r.body_json()?;
    let ct = r
        .content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let manager = r.manager();
    let dry_run = r.dry_run();
    let is_apply = ct == "application/apply-patch+yaml" || ct == "application/apply-patch+json";
    if is_apply {
        if r.q("fieldManager").is_none() {
            return Err(ApiError::bad_request(
                "PATCH apply requires fieldManager to be set",
            ));
        }
        let force = r.flag("force");
        let opts = WriteOptions {
            ownership: Ownership::Applied,
            subresource: sub.clone(),
            dry_run,
            strict: r.strict(),
        };
        let mut created = false;
        let obj = store.modify(rt, ns, name, &opts, |current| {
            created = current.is_none();
            if current.is_none() && sub.is_some() {
                return Err(ApiError::not_found(&rt.plural, &rt.group, name));
            }
            let mut config = body.clone();
            if config["metadata"]["name"].is_null() {
                config["metadata"]["name"] = json!(name);
            }
            let mut new = ssa::apply(rt, current, &config, &manager, force, sub.as_deref())?;
            if current.is_none() {
                new["metadata"]["name"] = json!(name);
            }
            Ok(new)
        })?;
        return Ok(json_response(if created { 201 } else { 200 }, &obj));
    }
    // As kube-apiserver words it: custom resources refuse other patch types (strategic merge
    // included) in their own handler, built-in kinds in the router.
    let unsupported = || {
        ApiError::unsupported_media_type(if rt.custom {
            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
        } else {
            "415: Unsupported Media Type"
        })
    };
    let kind = match ct.as_str() {
        "application/merge-patch+json" => 0,
        "application/json-patch+json" => 1,
        "application/strategic-merge-patch+json" if !rt.custom => 2,
        _ => return Err(unsupported()),
    };
    let opts = WriteOptions {
        strict: r.strict(),
        ownership: Ownership::Update(manager),
        subresource: sub,
        dry_run,
    };
    let obj = store.modify(rt, ns, name, &opts, |current| {
        let Some(current) = current else {
            return Err(ApiError::not_found(&rt.plural, &rt.group, name));
        };
        let mut doc = current.clone();
        // A patch without a resourceVersion applies to whatever is current.
        match kind {
            0 => patch::merge_patch(&mut doc, &body),
            1 => patch::json_patch(&mut doc, &body)?,
            _ => patch::strategic_merge(rt, &mut doc, &body),
        }
        if body["metadata"]["resourceVersion"].is_null() && kind != 1 {
            doc["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        }
        Ok(doc)
    })?;
    Ok(json_response(200, &obj))
}

fn watch(
    r: &Req,
    state: &Arc<ServerState>,
    rt: &ResourceType,
    ns: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let sel = r.selectors()?;
    let start =
        if r.flag("sendInitialEvents") {
            WatchStart::InitialEvents
        } else {
            match r.q("resourceVersion") {
                None | Some("0") => WatchStart::Now,
                Some(v) => WatchStart::After(v.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid resource version {v:?}"))
                })?),
            }
        };
    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    let feed = state.store.watch(rt, ns, &sel, start);
    let table_opts = r
        .wants_table()
        .then(|| r.q("includeObject").unwrap_or("Metadata").to_string());
    let bookmarks = r.flag("allowWatchBookmarks");
    let timeout = r
        .q("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let rt = rt.clone();
    let ns = ns.map(str::to_string);
    let interval = state.bookmark_interval;
    let mut shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let encode = |type_: &str, object: &Value| -> Bytes {
            let object = match &table_opts {
                Some(inc) if type_ != "ERROR" && type_ != "BOOKMARK" => {
                    let rv = object["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    table::table(&rt, std::slice::from_ref(object), &rv, inc)
                }
                _ => object.clone(),
            };
            let mut line =
                serde_json::to_vec(&json!({"type": type_, "object": object})).unwrap_or_default();
            line.push(b'\n');
            Bytes::from(line)
        };
        let bookmark = |rv: u64, end: bool| -> Bytes {
            let mut meta = json!({"resourceVersion": rv.to_string()});
            if end {
                meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            encode(
                "BOOKMARK",
                &json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta}),
            )
        };
        let mut feed = match feed {
            Ok(feed) => feed,
            Err(err) => {
                // Too old: like the API server, answer 200 and an ERROR event carrying 410.
                let _ = tx.send(encode("ERROR", &err.to_status())).await;
                return;
            }
        };
        let mut last = 0u64;
        for ev in &feed.initial {
            let type_ = ev.seen_through(&sel).unwrap_or(ev.type_);
            if tx
                .send(encode(type_.as_str(), &with_version(&ev.object, &rt)))
                .await
                .is_err()
            {
                return;
            }
            last = last.max(ev.rv);
        }
        let mut seen = feed.start_rv.max(last);
        if !matches!(start, WatchStart::After(_)) {
            last = feed.start_rv;
        }
        if feed.initial_bookmark && tx.send(bookmark(seen, true)).await.is_err() {
            return;
        }
        let gr = rt.group_resource();
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            let ev: Arc<StoredEvent> = tokio::select! {
                ev = feed.live.recv() => match ev {
                    Ok(ev) => ev,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(encode("ERROR", &ApiError::gone("watch channel fell behind; too old resource version").to_status())).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = ticker.tick(), if bookmarks => {
                    if tx.send(bookmark(seen, false)).await.is_err() { return; }
                    continue;
                }
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => return,
                _ = shutdown.changed() => return,
                _ = tx.closed() => return,
            };
            seen = seen.max(ev.rv);
            if ev.rv <= last || ev.gr != gr || ns.as_deref().is_some_and(|n| n != ev.namespace) {
                continue;
            }
            let Some(type_) = ev.seen_through(&sel) else {
                continue;
            };
            last = ev.rv;
            if tx
                .send(encode(type_.as_str(), &with_version(&ev.object, &rt)))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|o| o.map(|b| Ok::<_, Infallible>(Frame::data(b))))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// Kinds with a `/scale` subresource (what `kubectl scale` uses).
fn has_scale(rt: &ResourceType) -> bool {
    rt.group == "apps"
        && matches!(
            rt.plural.as_str(),
            "deployments" | "statefulsets" | "replicasets"
        )
}

fn scale_of(obj: &Value) -> Value {
    let selector = obj["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let meta = &obj["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"], "creationTimestamp": meta["creationTimestamp"]},
        "spec": {"replicas": obj["spec"]["replicas"]},
        "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector},
    })
}

/// `/scale`: read or change `spec.replicas` through an `autoscaling/v1` Scale.
fn scale(
    r: &Req,
    store: &Store,
    rt: &ResourceType,
    ns: &str,
    name: &str,
) -> Result<Response<Body>, ApiError> {
    if r.method == Method::GET {
        return Ok(json_response(200, &scale_of(&store.get(rt, ns, name)?)));
    }
    let body = r.body_json()?;
    let ct = r
        .content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let opts = WriteOptions {
        ownership: Ownership::Update(r.manager()),
        subresource: None,
        dry_run: r.dry_run(),
        strict: false,
    };
    let obj = store.modify(rt, ns, name, &opts, |current| {
        let Some(current) = current else {
            return Err(ApiError::not_found(&rt.plural, &rt.group, name));
        };
        let mut sc = scale_of(current);
        match (&r.method, ct.as_str()) {
            (&Method::PUT, _) => {
                if let Some(rv) = body["metadata"]["resourceVersion"].as_str()
                    && rv
                        != current["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap_or_default()
                {
                    return Err(ApiError::stale(&rt.plural, &rt.group, name));
                }
                sc = body.clone();
            }
            (&Method::PATCH, "application/json-patch+json") => patch::json_patch(&mut sc, &body)?,
            (&Method::PATCH, _) => patch::merge_patch(&mut sc, &body),
            _ => {
                return Err(ApiError::method_not_allowed(
                    "scale supports get, update and patch",
                ));
            }
        }
        let mut new = current.clone();
        new["spec"]["replicas"] = sc["spec"]["replicas"].clone();
        Ok(new)
    })?;
    Ok(json_response(200, &scale_of(&obj)))
}

/// `pods/<name>/log`: the output of the pod's processes so far (`tailLines` honoured; `follow`
/// returns what exists now). Pods without a process have an empty log.
fn pod_log(
    r: &Req,
    state: &Arc<ServerState>,
    ns: &str,
    name: &str,
) -> Result<Response<Body>, ApiError> {
    let reg = state.store.registry();
    let rt = reg
        .get("", "v1", "pods")
        .ok_or_else(|| ApiError::no_route("pods"))?;
    state.store.get(rt, ns, name)?;
    let text = std::fs::read_to_string(state.pod_logs.join(format!("{ns}_{name}.log")))
        .unwrap_or_default();
    let text = match r.q("tailLines").and_then(|n| n.parse::<usize>().ok()) {
        Some(n) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            let mut t = lines[start..].join("\n");
            if !t.is_empty() {
                t.push('\n');
            }
            t
        }
        None => text,
    };
    let mut resp = Response::new(full(text));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    Ok(resp)
}
