//! Object storage with Kubernetes write semantics.
//!
//! Objects are `serde_json::Value`s keyed by group/resource, namespace and name. One global
//! counter gives every write its `resourceVersion`, and a bounded log of change events serves
//! watches from a past version (older than the log: 410 Gone). Writes implement the API
//! server's rules: optimistic concurrency, `generation` bumped on spec changes, status kept
//! apart when it is a subresource, finalizers and `deletionTimestamp`, ownerReference garbage
//! collection (background, foreground and orphan, synchronous here), namespace lifecycle, CRD registration,
//! managed fields. Everything happens under one lock, so each write is atomic and events are
//! emitted in resourceVersion order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::resources::{GroupResource, Registry, ResourceType};
use crate::selectors::Selectors;
use crate::ssa;
use crate::status::{ApiError, Cause};

/// The type of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Removed.
    Deleted,
}

impl EventType {
    /// The wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as kept in the log and sent to watchers.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// The resourceVersion of the change.
    pub rv: u64,
    /// Which resource.
    pub gr: GroupResource,
    /// The object's namespace ("" for cluster-scoped).
    pub namespace: String,
    /// ADDED / MODIFIED / DELETED.
    pub type_: EventType,
    /// The object after the change (before removal, for DELETED).
    pub object: Value,
    /// For MODIFIED: the object before the change, so that selector watches can turn a
    /// change into ADDED or DELETED when the object enters or leaves the selection.
    pub previous: Option<Value>,
}

impl StoredEvent {
    /// The event as a watcher with `sel` sees it, if at all: an object entering the
    /// selection is ADDED, one leaving it is DELETED, as on a real API server.
    pub fn seen_through(&self, sel: &Selectors) -> Option<EventType> {
        let now = sel.matches(&self.object);
        match self.type_ {
            EventType::Added | EventType::Deleted => now.then_some(self.type_),
            EventType::Modified => {
                let before = self.previous.as_ref().map_or(now, |p| sel.matches(p));
                match (before, now) {
                    (true, true) => Some(EventType::Modified),
                    (false, true) => Some(EventType::Added),
                    (true, false) => Some(EventType::Deleted),
                    (false, false) => None,
                }
            }
        }
    }
}

/// How a write records field ownership.
#[derive(Debug, Clone)]
pub enum Ownership {
    /// A create, update or non-apply patch by this manager.
    Update(String),
    /// Server-side apply: managedFields were computed by the caller.
    Applied,
    /// An internal write by the emulator's own controllers.
    System(String),
}

/// Options of a write.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Who writes.
    pub ownership: Ownership,
    /// `status` for the status subresource.
    pub subresource: Option<String>,
    /// `dryRun=All`: validate and answer, store nothing.
    pub dry_run: bool,
    /// `fieldValidation=Strict`: refuse fields a custom resource's schema does not declare
    /// (otherwise they are pruned silently).
    pub strict: bool,
}

impl WriteOptions {
    /// A write by the emulator itself.
    pub fn system(manager: &str) -> Self {
        WriteOptions {
            ownership: Ownership::System(manager.into()),
            subresource: None,
            dry_run: false,
            strict: false,
        }
    }
}

/// `propagationPolicy` of a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// Dependents are deleted after the owner (the default here).
    Background,
    /// The owner waits (finalizer `foregroundDeletion`) until its dependents are deleted.
    Foreground,
    /// Dependents lose their ownerReference and stay.
    Orphan,
}

/// Options of a delete.
#[derive(Debug, Clone)]
pub struct DeleteOptions {
    /// Cascade policy.
    pub propagation: Propagation,
    /// `preconditions.uid`.
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub resource_version: Option<String>,
    /// `dryRun=All`.
    pub dry_run: bool,
}

impl Default for DeleteOptions {
    fn default() -> Self {
        DeleteOptions {
            propagation: Propagation::Background,
            uid: None,
            resource_version: None,
            dry_run: false,
        }
    }
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchStart {
    /// `resourceVersion` unset or "0": synthetic ADDED events for every current object first.
    Now,
    /// After this resourceVersion: replay the log from there.
    After(u64),
    /// `sendInitialEvents=true`: ADDED for every object, then a BOOKMARK marking the end.
    InitialEvents,
}

/// What a watch starts with and where it continues.
#[derive(Debug)]
pub struct WatchFeed {
    /// Events to send first.
    pub initial: Vec<Arc<StoredEvent>>,
    /// Whether an initial-events-end BOOKMARK follows `initial`.
    pub initial_bookmark: bool,
    /// The resourceVersion at the moment the watch started.
    pub start_rv: u64,
    /// Later changes (filter by resource, namespace and selectors; skip rv <= last sent).
    pub live: broadcast::Receiver<Arc<StoredEvent>>,
}

type ObjKey = (String, String);

struct Inner {
    rv: u64,
    objects: BTreeMap<GroupResource, BTreeMap<ObjKey, Value>>,
    log: VecDeque<Arc<StoredEvent>>,
    /// Watches must start at or after this resourceVersion; older ones get 410.
    compacted: u64,
    history: usize,
    registry: Registry,
    next_cluster_ip: u32,
}

/// The store.
pub struct Store {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<StoredEvent>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or_default()
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let id = uuid::Uuid::new_v4();
    id.as_bytes()
        .iter()
        .take(5)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// The object without the fields that change on every write, to detect no-op updates and
/// spec changes.
fn without(obj: &Value, drop_top: &[&str], drop_meta: &[&str]) -> Value {
    let mut o = obj.clone();
    if let Some(map) = o.as_object_mut() {
        for k in drop_top {
            map.remove(*k);
        }
    }
    if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in drop_meta {
            meta.remove(*k);
        }
    }
    o
}

/// managedFields without their times.
fn ownership(obj: &Value) -> Vec<Value> {
    obj["metadata"]["managedFields"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|e| {
                    let mut e = e.clone();
                    if let Some(m) = e.as_object_mut() {
                        m.remove("time");
                    }
                    e
                })
                .collect()
        })
        .unwrap_or_default()
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj["metadata"]["finalizers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

impl Store {
    /// An empty store with the default namespaces, keeping `history` events for watches.
    pub fn new(history: usize) -> Arc<Self> {
        let (tx, _) = broadcast::channel(4096);
        let store = Arc::new(Store {
            inner: Mutex::new(Inner {
                rv: 0,
                objects: BTreeMap::new(),
                log: VecDeque::new(),
                compacted: 0,
                history: history.max(1),
                registry: Registry::with_builtins(),
                next_cluster_ip: 1,
            }),
            tx,
        });
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let rt = store.registry().get("", "v1", "namespaces").cloned();
            if let Some(rt) = rt {
                // Creating the built-in namespaces cannot fail on an empty store.
                let _ = store.create(
                    &rt,
                    "",
                    json!({"metadata": {"name": ns}}),
                    &WriteOptions::system("devcluster"),
                );
            }
        }
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-written object (writes build the
        // new value first), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A snapshot of the registry.
    pub fn registry(&self) -> Registry {
        self.lock().registry.clone()
    }

    /// Every change from now on (the pod runner reconciles on them).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StoredEvent>> {
        self.tx.subscribe()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Drop the whole event history: watches from any earlier resourceVersion get 410 Gone,
    /// as after an etcd compaction. For tests of clients' recovery.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.log.clear();
        inner.compacted = inner.rv;
    }

    /// Get one object.
    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> Result<Value, ApiError> {
        let inner = self.lock();
        inner
            .objects
            .get(&rt.group_resource())
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .map(|o| with_version(o, rt))
            .ok_or_else(|| ApiError::not_found(&rt.plural, &rt.group, name))
    }

    /// List objects (all namespaces when `ns` is None), sorted by namespace and name.
    pub fn list(&self, rt: &ResourceType, ns: Option<&str>, sel: &Selectors) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let items = inner
            .objects
            .get(&rt.group_resource())
            .map(|m| {
                m.iter()
                    .filter(|((n, _), _)| ns.is_none_or(|want| want == n))
                    .filter(|(_, o)| sel.matches(o))
                    .map(|(_, o)| with_version(o, rt))
                    .collect()
            })
            .unwrap_or_default();
        (items, inner.rv)
    }

    /// List every object of every resource (for the emulator's controllers).
    pub fn list_group_resource(&self, gr: &GroupResource) -> Vec<Value> {
        let inner = self.lock();
        inner
            .objects
            .get(gr)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Start a watch.
    pub fn watch(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        sel: &Selectors,
        start: WatchStart,
    ) -> Result<WatchFeed, ApiError> {
        let inner = self.lock();
        // Subscribing under the lock means no event can fall between the replay and the feed.
        let live = self.tx.subscribe();
        let gr = rt.group_resource();
        let initial: Vec<Arc<StoredEvent>> = match start {
            WatchStart::After(from) => {
                if from < inner.compacted {
                    return Err(ApiError::gone(format!(
                        "too old resource version: {from} ({})",
                        inner.compacted
                    )));
                }
                inner
                    .log
                    .iter()
                    .filter(|e| e.rv > from && e.gr == gr)
                    .filter(|e| ns.is_none_or(|n| n == e.namespace))
                    .filter(|e| e.seen_through(sel).is_some())
                    .cloned()
                    .collect()
            }
            WatchStart::Now | WatchStart::InitialEvents => inner
                .objects
                .get(&gr)
                .map(|m| {
                    m.iter()
                        .filter(|((n, _), _)| ns.is_none_or(|want| want == n))
                        .filter(|(_, o)| sel.matches(o))
                        .map(|((n, _), o)| {
                            Arc::new(StoredEvent {
                                rv: meta_str(o, "resourceVersion").parse().unwrap_or(0),
                                gr: gr.clone(),
                                namespace: n.clone(),
                                type_: EventType::Added,
                                object: o.clone(),
                                previous: None,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        Ok(WatchFeed {
            initial,
            initial_bookmark: start == WatchStart::InitialEvents,
            start_rv: inner.rv,
            live,
        })
    }

    /// Create an object.
    pub fn create(
        &self,
        rt: &ResourceType,
        ns: &str,
        obj: Value,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let created = self.create_locked(&mut inner, rt, ns, obj, opts)?;
        Ok(with_version(&created, rt))
    }

    /// Replace an object (PUT), or its status.
    pub fn update(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        obj: Value,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let updated = self.update_locked(&mut inner, rt, ns, name, obj, opts)?;
        Ok(with_version(&updated, rt))
    }

    /// Read-modify-write under the lock (patches): `f` gets the current object (None if it
    /// does not exist) and returns the new one; a missing object is created only when `f`
    /// returns Some for None (server-side apply).
    pub fn modify<F>(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        opts: &WriteOptions,
        f: F,
    ) -> Result<Value, ApiError>
    where
        F: FnOnce(Option<&Value>) -> Result<Value, ApiError>,
    {
        let mut inner = self.lock();
        let current = inner
            .objects
            .get(&rt.group_resource())
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .map(|o| with_version(o, rt));
        let exists = current.is_some();
        let new = f(current.as_ref())?;
        let result = if exists {
            self.update_locked(&mut inner, rt, ns, name, new, opts)?
        } else {
            self.create_locked(&mut inner, rt, ns, new, opts)?
        };
        Ok(with_version(&result, rt))
    }

    /// Delete an object: marks it with deletionTimestamp while finalizers remain, removes it
    /// (and cascades to dependents) otherwise. Returns the object as it ends up.
    pub fn delete(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let obj = self.delete_locked(&mut inner, &rt.group_resource(), ns, name, opts)?;
        Ok(with_version(&obj, rt))
    }

    /// Delete every matching object of a resource.
    pub fn delete_collection(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        sel: &Selectors,
        opts: &DeleteOptions,
    ) -> Result<Vec<Value>, ApiError> {
        let (items, _) = self.list(rt, ns, sel);
        let mut inner = self.lock();
        let mut out = Vec::new();
        for item in items {
            let n = meta_str(&item, "namespace").to_string();
            let name = meta_str(&item, "name").to_string();
            match self.delete_locked(&mut inner, &rt.group_resource(), &n, &name, opts) {
                Ok(o) => out.push(with_version(&o, rt)),
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    // ---- internals -------------------------------------------------------------------------

    /// Stores a changed object under the next resourceVersion and emits MODIFIED: the one
    /// write path of every update that keeps the object (edits, deletion marks, finalizer
    /// removal).
    fn write_modified(
        &self,
        inner: &mut Inner,
        gr: &GroupResource,
        ns: &str,
        key: ObjKey,
        mut new: Value,
        old: &Value,
    ) -> Value {
        inner.rv += 1;
        new["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        inner
            .objects
            .entry(gr.clone())
            .or_default()
            .insert(key, new.clone());
        self.emit(inner, gr, ns, EventType::Modified, &new, Some(old));
        new
    }

    fn emit(
        &self,
        inner: &mut Inner,
        gr: &GroupResource,
        ns: &str,
        type_: EventType,
        obj: &Value,
        previous: Option<&Value>,
    ) {
        let event = Arc::new(StoredEvent {
            rv: inner.rv,
            gr: gr.clone(),
            namespace: ns.to_string(),
            type_,
            object: obj.clone(),
            previous: previous.cloned(),
        });
        inner.log.push_back(event.clone());
        while inner.log.len() > inner.history {
            if let Some(old) = inner.log.pop_front() {
                inner.compacted = old.rv;
            }
        }
        // No receivers is fine: nobody watches.
        let _ = self.tx.send(event);
    }

    fn namespace_check(&self, inner: &Inner, rt: &ResourceType, ns: &str) -> Result<(), ApiError> {
        if !rt.namespaced {
            return Ok(());
        }
        if ns.is_empty() {
            return Err(ApiError::bad_request(
                "the namespace of the object is required for a namespaced resource",
            ));
        }
        let nsobj = inner
            .objects
            .get(&GroupResource {
                group: String::new(),
                resource: "namespaces".into(),
            })
            .and_then(|m| m.get(&(String::new(), ns.to_string())));
        match nsobj {
            None => Err(ApiError::not_found("namespaces", "", ns)),
            Some(o) if !o["metadata"]["deletionTimestamp"].is_null() => {
                Err(ApiError::forbidden(format!(
                    "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    crate::status::qualified(&rt.plural, &rt.group),
                    "",
                )))
            }
            Some(_) => Ok(()),
        }
    }

    fn create_locked(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        ns: &str,
        mut obj: Value,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        check_shape(&obj)?;
        let ns = if rt.namespaced { ns } else { "" };
        let body_ns = meta_str(&obj, "namespace");
        if rt.namespaced && !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        self.namespace_check(inner, rt, ns)?;
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        let mut name = meta_str(&obj, "name").to_string();
        if name.is_empty() {
            let prefix = meta_str(&obj, "generateName").to_string();
            if prefix.is_empty() {
                return Err(ApiError::invalid(
                    &rt.kind,
                    &rt.group,
                    "",
                    vec![Cause {
                        reason: "FieldValueRequired".into(),
                        message: "metadata.name: Required value: name or generateName is required"
                            .into(),
                        field: "metadata.name".into(),
                    }],
                ));
            }
            name = format!("{prefix}{}", random_suffix());
        }
        let gr = rt.group_resource();
        let key = (ns.to_string(), name.clone());
        if inner.objects.get(&gr).is_some_and(|m| m.contains_key(&key)) {
            return Err(ApiError::already_exists(&rt.plural, &rt.group, &name));
        }
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        {
            let meta = &mut obj["metadata"];
            meta["name"] = json!(name);
            if rt.namespaced {
                meta["namespace"] = json!(ns);
            } else if let Some(m) = meta.as_object_mut() {
                m.remove("namespace");
            }
            meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
            meta["creationTimestamp"] = json!(now());
            if let Some(m) = meta.as_object_mut() {
                m.remove("deletionTimestamp");
                m.remove("deletionGracePeriodSeconds");
                m.remove("resourceVersion");
                m.remove("selfLink");
            }
        }
        if rt.status_subresource
            && !matches!(opts.ownership, Ownership::System(_))
            && let Some(m) = obj.as_object_mut()
        {
            m.remove("status");
        }
        if rt.custom || obj.get("spec").is_some() {
            obj["metadata"]["generation"] = json!(1);
        }
        self.admit(inner, rt, &mut obj, None, opts.strict)?;
        match &opts.ownership {
            Ownership::Update(manager) | Ownership::System(manager) => {
                ssa::record_update(rt, None, &mut obj, manager, opts.subresource.as_deref())
            }
            Ownership::Applied => {}
        }
        if opts.dry_run {
            return Ok(obj);
        }
        inner.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        inner
            .objects
            .entry(gr.clone())
            .or_default()
            .insert(key, obj.clone());
        self.emit(inner, &gr, ns, EventType::Added, &obj, None);
        self.after_create(inner, rt, &obj);
        Ok(obj)
    }

    fn update_locked(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        mut obj: Value,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        let ns = if rt.namespaced { ns } else { "" };
        let gr = rt.group_resource();
        let key = (ns.to_string(), name.to_string());
        let Some(old) = inner.objects.get(&gr).and_then(|m| m.get(&key)).cloned() else {
            return Err(ApiError::not_found(&rt.plural, &rt.group, name));
        };
        check_shape(&obj)?;
        let body_name = meta_str(&obj, "name");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let body_rv = meta_str(&obj, "resourceVersion");
        if !body_rv.is_empty() && body_rv != meta_str(&old, "resourceVersion") {
            return Err(ApiError::stale(&rt.plural, &rt.group, name));
        }
        let status_write = opts.subresource.as_deref() == Some("status");
        // A client may rewrite managedFields (kubectl does, to hand client-side apply's
        // fields over to server-side apply): a non-empty list in a write of the main resource
        // replaces the live one, as on a real server; an absent or empty one keeps it.
        let sent_fields = obj["metadata"]["managedFields"]
            .as_array()
            .is_some_and(|l| !l.is_empty())
            && matches!(opts.ownership, Ownership::Update(_))
            && !status_write;
        let mut new = if status_write {
            // The status subresource changes status only.
            let mut n = old.clone();
            n["status"] = obj.get("status").cloned().unwrap_or(Value::Null);
            if n["status"].is_null()
                && let Some(m) = n.as_object_mut()
            {
                m.remove("status");
            }
            if matches!(opts.ownership, Ownership::Applied) {
                n["metadata"]["managedFields"] = obj["metadata"]["managedFields"].clone();
            }
            n
        } else {
            if !obj["metadata"].is_object() {
                obj["metadata"] = json!({});
            }
            // Server-owned metadata stays as it was.
            for field in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "namespace",
                "name",
            ] {
                match old["metadata"].get(field) {
                    Some(v) => obj["metadata"][field] = v.clone(),
                    None => {
                        if let Some(m) = obj["metadata"].as_object_mut() {
                            m.remove(field);
                        }
                    }
                }
            }
            obj["apiVersion"] = json!(rt.api_version());
            obj["kind"] = json!(rt.kind);
            if rt.status_subresource && !matches!(opts.ownership, Ownership::System(_)) {
                match old.get("status") {
                    Some(s) => obj["status"] = s.clone(),
                    None => {
                        if let Some(m) = obj.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            if !matches!(opts.ownership, Ownership::Applied) && !sent_fields {
                obj["metadata"]["managedFields"] = old["metadata"]["managedFields"].clone();
                if obj["metadata"]["managedFields"].is_null()
                    && let Some(m) = obj["metadata"].as_object_mut()
                {
                    m.remove("managedFields");
                }
            }
            obj
        };
        if !old["metadata"]["deletionTimestamp"].is_null() {
            let before: BTreeSet<String> = finalizers(&old).into_iter().collect();
            if let Some(added) = finalizers(&new).into_iter().find(|f| !before.contains(f)) {
                return Err(ApiError::invalid(
                    &rt.kind,
                    &rt.group,
                    name,
                    vec![Cause {
                        reason: "FieldValueForbidden".into(),
                        message: format!(
                            "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{\"{added}\"}}"
                        ),
                        field: "metadata.finalizers".into(),
                    }],
                ));
            }
        }
        self.admit(inner, rt, &mut new, Some(&old), opts.strict)?;
        // generation follows the spec (everything but metadata and status).
        let spec_changed = {
            let skip_status = rt.status_subresource;
            let drop: &[&str] = if skip_status {
                &["metadata", "status"]
            } else {
                &["metadata"]
            };
            without(&old, drop, &[]) != without(&new, drop, &[])
        };
        if spec_changed && !status_write {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            new["metadata"]["generation"] = json!(g);
        }
        match &opts.ownership {
            Ownership::Update(manager) | Ownership::System(manager) => ssa::record_update(
                rt,
                Some(&old),
                &mut new,
                manager,
                opts.subresource.as_deref(),
            ),
            Ownership::Applied => {}
        }
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        // A write that changes only who owns what (a server-side apply by a new co-owner,
        // a client rewriting managedFields) is kept; one that changes only their times is not.
        let unchanged = without(&old, &[], &["managedFields"])
            == without(&new, &[], &["managedFields"])
            && ownership(&old) == ownership(&new);
        if unchanged || opts.dry_run {
            // A no-op write changes nothing, not even the resourceVersion, as on a real server.
            return Ok(if unchanged { old } else { new });
        }
        let finished =
            !new["metadata"]["deletionTimestamp"].is_null() && finalizers(&new).is_empty();
        let new = self.write_modified(inner, &gr, ns, key, new, &old);
        self.after_update(inner, rt, &new);
        if finished {
            self.remove_locked(inner, &gr, ns, name, Propagation::Background);
        }
        Ok(new)
    }

    fn delete_locked(
        &self,
        inner: &mut Inner,
        gr: &GroupResource,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        let key = (ns.to_string(), name.to_string());
        let Some(old) = inner.objects.get(gr).and_then(|m| m.get(&key)).cloned() else {
            return Err(ApiError::not_found(&gr.resource, &gr.group, name));
        };
        if let Some(uid) = &opts.uid
            && uid != meta_str(&old, "uid")
        {
            return Err(ApiError::conflict(
                &gr.resource,
                &gr.group,
                name,
                format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&old, "uid")
                ),
                vec![],
            ));
        }
        if let Some(rv) = &opts.resource_version
            && rv != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(
                &gr.resource,
                &gr.group,
                name,
                format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta_str(&old, "resourceVersion")
                ),
                vec![],
            ));
        }
        if opts.dry_run {
            return Ok(old);
        }
        let is_namespace = gr.group.is_empty() && gr.resource == "namespaces";
        if is_namespace {
            return Ok(self.delete_namespace(inner, name, old));
        }
        if opts.propagation == Propagation::Foreground
            && old["metadata"]["deletionTimestamp"].is_null()
        {
            let uid = meta_str(&old, "uid").to_string();
            let dependents = dependents_of(inner, &uid);
            if !dependents.is_empty() {
                // Foreground: the owner waits, marked, with the `foregroundDeletion`
                // finalizer, until its dependents are gone.
                let mut new = old.clone();
                new["metadata"]["deletionTimestamp"] = json!(now());
                new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                let mut fins = finalizers(&old);
                fins.push(FOREGROUND.to_string());
                new["metadata"]["finalizers"] = json!(fins);
                let new = self.write_modified(inner, gr, ns, key, new, &old);
                let child_opts = DeleteOptions {
                    propagation: Propagation::Foreground,
                    ..DeleteOptions::default()
                };
                for (g, n, dep) in dependents {
                    let _ = self.delete_locked(inner, &g, &n, &dep, &child_opts);
                }
                self.finish_foreground(inner, gr, ns, name);
                let current = inner
                    .objects
                    .get(gr)
                    .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
                    .cloned();
                return Ok(current.unwrap_or(new));
            }
        }
        if !finalizers(&old).is_empty() {
            if !old["metadata"]["deletionTimestamp"].is_null() {
                return Ok(old);
            }
            let mut new = old.clone();
            new["metadata"]["deletionTimestamp"] = json!(now());
            new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            return Ok(self.write_modified(inner, gr, ns, key, new, &old));
        }
        Ok(self
            .remove_locked(inner, gr, ns, name, opts.propagation)
            .unwrap_or(old))
    }

    fn delete_namespace(&self, inner: &mut Inner, name: &str, old: Value) -> Value {
        let gr = GroupResource {
            group: String::new(),
            resource: "namespaces".into(),
        };
        let mut ns_obj = old.clone();
        if ns_obj["metadata"]["deletionTimestamp"].is_null() {
            ns_obj["metadata"]["deletionTimestamp"] = json!(now());
            ns_obj["status"]["phase"] = json!("Terminating");
            inner.rv += 1;
            ns_obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
            inner
                .objects
                .entry(gr.clone())
                .or_default()
                .insert((String::new(), name.to_string()), ns_obj.clone());
            self.emit(inner, &gr, "", EventType::Modified, &ns_obj, Some(&old));
        }
        let contents: Vec<(GroupResource, String)> = inner
            .objects
            .iter()
            .flat_map(|(g, m)| {
                m.keys()
                    .filter(|(n, _)| n == name)
                    .map(|(_, obj_name)| (g.clone(), obj_name.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (g, obj_name) in contents {
            let _ = self.delete_locked(inner, &g, name, &obj_name, &DeleteOptions::default());
        }
        self.finish_namespace_if_empty(inner, name);
        ns_obj
    }

    fn finish_namespace_if_empty(&self, inner: &mut Inner, ns: &str) {
        let gr = GroupResource {
            group: String::new(),
            resource: "namespaces".into(),
        };
        let terminating = inner
            .objects
            .get(&gr)
            .and_then(|m| m.get(&(String::new(), ns.to_string())))
            .is_some_and(|o| !o["metadata"]["deletionTimestamp"].is_null());
        if !terminating {
            return;
        }
        let empty = inner
            .objects
            .values()
            .all(|m| !m.keys().any(|(n, _)| n == ns));
        if empty {
            self.remove_locked(inner, &gr, "", ns, Propagation::Background);
        }
    }

    /// Remove an object for good, then collect its dependents.
    fn remove_locked(
        &self,
        inner: &mut Inner,
        gr: &GroupResource,
        ns: &str,
        name: &str,
        propagation: Propagation,
    ) -> Option<Value> {
        let key = (ns.to_string(), name.to_string());
        let mut obj = inner.objects.get_mut(gr)?.remove(&key)?;
        inner.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        self.emit(inner, gr, ns, EventType::Deleted, &obj, None);
        self.after_remove(inner, gr, &obj);
        let uid = meta_str(&obj, "uid").to_string();
        self.collect_dependents(inner, &uid, propagation);
        // Owners waiting in foreground deletion may now be free to go.
        let owner_uids: Vec<String> = obj["metadata"]["ownerReferences"]
            .as_array()
            .map(|refs| {
                refs.iter()
                    .filter_map(|r| r["uid"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        for owner_uid in owner_uids {
            let owner = inner.objects.iter().find_map(|(g, m)| {
                m.iter()
                    .find(|(_, o)| {
                        meta_str(o, "uid") == owner_uid
                            && finalizers(o).iter().any(|f| f == FOREGROUND)
                    })
                    .map(|((n, name), _)| (g.clone(), n.clone(), name.clone()))
            });
            if let Some((g, n, name)) = owner {
                self.finish_foreground(inner, &g, &n, &name);
            }
        }
        if !ns.is_empty() {
            self.finish_namespace_if_empty(inner, ns);
        }
        Some(obj)
    }

    /// An owner in foreground deletion loses its `foregroundDeletion` finalizer once no
    /// dependent is left, and is removed if no other finalizer remains.
    fn finish_foreground(&self, inner: &mut Inner, gr: &GroupResource, ns: &str, name: &str) {
        let key = (ns.to_string(), name.to_string());
        let Some(old) = inner.objects.get(gr).and_then(|m| m.get(&key)).cloned() else {
            return;
        };
        if !finalizers(&old).iter().any(|f| f == FOREGROUND)
            || !dependents_of(inner, meta_str(&old, "uid")).is_empty()
        {
            return;
        }
        let fins: Vec<String> = finalizers(&old)
            .into_iter()
            .filter(|f| f != FOREGROUND)
            .collect();
        if fins.is_empty() {
            self.remove_locked(inner, gr, ns, name, Propagation::Background);
            return;
        }
        let mut new = old.clone();
        new["metadata"]["finalizers"] = json!(fins);
        self.write_modified(inner, gr, ns, key, new, &old);
    }

    /// Garbage collection: dependents whose owners are all gone are deleted (background
    /// cascade); with Orphan they only lose the reference.
    fn collect_dependents(&self, inner: &mut Inner, uid: &str, propagation: Propagation) {
        if uid.is_empty() {
            return;
        }
        let live_uids: BTreeSet<String> = inner
            .objects
            .values()
            .flat_map(|m| m.values().map(|o| meta_str(o, "uid").to_string()))
            .collect();
        let dependents: Vec<(GroupResource, String, String, bool)> = inner
            .objects
            .iter()
            .flat_map(|(g, m)| {
                m.iter()
                    .filter_map(|((n, name), o)| {
                        let owners = o["metadata"]["ownerReferences"].as_array()?;
                        if !owners.iter().any(|r| r["uid"].as_str() == Some(uid)) {
                            return None;
                        }
                        let orphaned = owners
                            .iter()
                            .all(|r| !live_uids.contains(r["uid"].as_str().unwrap_or_default()));
                        Some((g.clone(), n.clone(), name.clone(), orphaned))
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        for (g, n, name, orphaned) in dependents {
            if propagation == Propagation::Orphan {
                let key = (n.clone(), name.clone());
                let Some(mut o) = inner.objects.get(&g).and_then(|m| m.get(&key)).cloned() else {
                    continue;
                };
                let previous = o.clone();
                if let Some(refs) = o["metadata"]["ownerReferences"].as_array_mut() {
                    refs.retain(|r| r["uid"].as_str() != Some(uid));
                    if refs.is_empty()
                        && let Some(m) = o["metadata"].as_object_mut()
                    {
                        m.remove("ownerReferences");
                    }
                }
                inner.rv += 1;
                o["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
                inner
                    .objects
                    .entry(g.clone())
                    .or_default()
                    .insert(key, o.clone());
                self.emit(inner, &g, &n, EventType::Modified, &o, Some(&previous));
            } else if orphaned {
                let _ = self.delete_locked(inner, &g, &n, &name, &DeleteOptions::default());
            }
        }
    }

    /// Defaults and validation on every write.
    fn admit(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        obj: &mut Value,
        old: Option<&Value>,
        strict: bool,
    ) -> Result<(), ApiError> {
        let name = meta_str(obj, "name").to_string();
        if rt.custom {
            if let Some(schema) = &rt.schema {
                let before = strict.then(|| obj.clone());
                let causes = schema.admit(obj, old);
                if let Some(before) = before {
                    let mut unknown = Vec::new();
                    pruned_paths(&before, obj, "", &mut unknown);
                    if !unknown.is_empty() {
                        let list: Vec<String> = unknown
                            .iter()
                            .map(|p| format!("unknown field \"{p}\""))
                            .collect();
                        return Err(ApiError::bad_request(format!(
                            "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
                            rt.kind,
                            rt.version,
                            rt.kind,
                            list.join(", ")
                        )));
                    }
                }
                if !causes.is_empty() {
                    return Err(ApiError::invalid(&rt.kind, &rt.group, &name, causes));
                }
            }
            return Ok(());
        }
        match (rt.group.as_str(), rt.kind.as_str()) {
            ("", "Namespace") => {
                if obj["metadata"]["deletionTimestamp"].is_null() {
                    obj["status"]["phase"] = json!("Active");
                }
                if obj["metadata"]["labels"]["kubernetes.io/metadata.name"].is_null() {
                    obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
                }
            }
            ("", "Secret") => {
                if obj["type"].is_null() {
                    obj["type"] = json!("Opaque");
                }
                if let Some(string_data) = obj.as_object_mut().and_then(|m| m.remove("stringData"))
                {
                    for (k, v) in string_data.as_object().cloned().unwrap_or_default() {
                        let text = v.as_str().unwrap_or_default();
                        obj["data"][k] =
                            json!(base64::engine::general_purpose::STANDARD.encode(text));
                    }
                }
            }
            ("", "Service") => {
                if obj["spec"]["type"].is_null() {
                    obj["spec"]["type"] = json!("ClusterIP");
                }
                if obj["spec"]["clusterIP"].is_null() {
                    let n = inner.next_cluster_ip;
                    inner.next_cluster_ip += 1;
                    let ip = format!("10.96.{}.{}", (n >> 8) & 0xff, n & 0xff);
                    obj["spec"]["clusterIP"] = json!(ip);
                    obj["spec"]["clusterIPs"] = json!([ip]);
                }
                default_protocols(obj["spec"]["ports"].as_array_mut());
            }
            ("", "Pod") => {
                if obj["status"]["phase"].is_null() {
                    obj["status"]["phase"] = json!("Pending");
                }
                default_pod_spec(&mut obj["spec"]);
            }
            ("apps", "StatefulSet") | ("apps", "Deployment") | ("apps", "ReplicaSet") => {
                let template = &obj["spec"]["template"];
                if !(template.is_null() || template.is_object())
                    || !(template["spec"].is_null() || template["spec"].is_object())
                {
                    return Err(ApiError::bad_request(
                        "spec.template and spec.template.spec must be objects",
                    ));
                }
                if obj["spec"]["replicas"].is_null() {
                    obj["spec"]["replicas"] = json!(1);
                }
                if rt.kind == "StatefulSet" && obj["spec"]["podManagementPolicy"].is_null() {
                    obj["spec"]["podManagementPolicy"] = json!("OrderedReady");
                }
                default_pod_spec(&mut obj["spec"]["template"]["spec"]);
            }
            ("apiextensions.k8s.io", "CustomResourceDefinition") => {
                let mut probe = inner.registry.clone();
                if let Err(e) = probe.register_crd(obj) {
                    return Err(ApiError::invalid(
                        &rt.kind,
                        &rt.group,
                        &name,
                        vec![Cause {
                            reason: "FieldValueInvalid".into(),
                            message: format!("spec: Invalid value: {e}"),
                            field: "spec".into(),
                        }],
                    ));
                }
                let names = obj["spec"]["names"].clone();
                let versions: Vec<Value> = obj["spec"]["versions"]
                    .as_array()
                    .map(|vs| {
                        vs.iter()
                            .filter(|v| v["storage"] == json!(true))
                            .map(|v| v["name"].clone())
                            .collect()
                    })
                    .unwrap_or_default();
                let t = old
                    .and_then(|o| {
                        o["status"]["conditions"][0]["lastTransitionTime"]
                            .as_str()
                            .map(str::to_string)
                    })
                    .unwrap_or_else(now);
                obj["status"] = json!({
                    "acceptedNames": names,
                    "storedVersions": versions,
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": t},
                        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": t},
                    ],
                });
            }
            _ => {}
        }
        Ok(())
    }

    fn after_create(&self, inner: &mut Inner, rt: &ResourceType, obj: &Value) {
        match (rt.group.as_str(), rt.kind.as_str()) {
            ("apiextensions.k8s.io", "CustomResourceDefinition") => {
                let _ = inner.registry.register_crd(obj);
            }
            ("", "Namespace") => {
                // The service-account controller gives every namespace a `default` account.
                let name = meta_str(obj, "name").to_string();
                if let Some(sa) = inner.registry.get("", "v1", "serviceaccounts").cloned() {
                    let _ = self.create_locked(
                        inner,
                        &sa,
                        &name,
                        json!({"metadata": {"name": "default"}}),
                        &WriteOptions::system("devcluster"),
                    );
                }
            }
            _ => {}
        }
    }

    fn after_update(&self, inner: &mut Inner, rt: &ResourceType, obj: &Value) {
        if rt.group == "apiextensions.k8s.io" && rt.kind == "CustomResourceDefinition" {
            let _ = inner.registry.register_crd(obj);
        }
    }

    fn after_remove(&self, inner: &mut Inner, gr: &GroupResource, obj: &Value) {
        if gr.group == "apiextensions.k8s.io" && gr.resource == "customresourcedefinitions" {
            let name = meta_str(obj, "name").to_string();
            inner.registry.unregister_crd(&name);
            let target = GroupResource {
                group: obj["spec"]["group"].as_str().unwrap_or_default().into(),
                resource: obj["spec"]["names"]["plural"]
                    .as_str()
                    .unwrap_or_default()
                    .into(),
            };
            let keys: Vec<ObjKey> = inner
                .objects
                .get(&target)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            for (n, name) in keys {
                self.remove_locked(inner, &target, &n, &name, Propagation::Background);
            }
        }
    }
}

/// The finalizer that holds an owner in foreground deletion.
const FOREGROUND: &str = "foregroundDeletion";

/// Objects with an ownerReference to `uid`: (group/resource, namespace, name).
fn dependents_of(inner: &Inner, uid: &str) -> Vec<(GroupResource, String, String)> {
    if uid.is_empty() {
        return Vec::new();
    }
    inner
        .objects
        .iter()
        .flat_map(|(g, m)| {
            m.iter()
                .filter(|(_, o)| {
                    o["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(uid)))
                })
                .map(|((n, name), _)| (g.clone(), n.clone(), name.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Refuse bodies whose well-known fields have the wrong JSON type, before any code relies on
/// them being objects (metadata, labels, annotations, spec, status).
fn check_shape(obj: &Value) -> Result<(), ApiError> {
    let bad = |what: &str| ApiError::bad_request(format!("{what} must be an object"));
    if !obj.is_object() {
        return Err(bad("the body of the request"));
    }
    let meta = &obj["metadata"];
    if !(meta.is_null() || meta.is_object()) {
        return Err(bad("metadata"));
    }
    for field in ["labels", "annotations"] {
        let v = &meta[field];
        if !(v.is_null()
            || v.as_object()
                .is_some_and(|m| m.values().all(Value::is_string)))
        {
            return Err(ApiError::bad_request(format!(
                "metadata.{field} must be a map of strings"
            )));
        }
    }
    for field in ["finalizers", "ownerReferences", "managedFields"] {
        let v = &meta[field];
        if !(v.is_null() || v.is_array()) {
            return Err(ApiError::bad_request(format!(
                "metadata.{field} must be a list"
            )));
        }
    }
    for field in ["spec", "status"] {
        let v = &obj[field];
        if !(v.is_null() || v.is_object()) {
            return Err(bad(field));
        }
    }
    Ok(())
}

/// Paths of fields present in `before` but gone from `after` (what pruning removed).
fn pruned_paths(before: &Value, after: &Value, prefix: &str, out: &mut Vec<String>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            for (k, v) in b {
                if prefix.is_empty() && (k == "metadata" || k == "apiVersion" || k == "kind") {
                    continue;
                }
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match a.get(k) {
                    Some(av) => pruned_paths(v, av, &path, out),
                    None => out.push(path),
                }
            }
        }
        (Value::Array(b), Value::Array(a)) => {
            for (i, (bv, av)) in b.iter().zip(a).enumerate() {
                pruned_paths(bv, av, &format!("{prefix}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn default_protocols(ports: Option<&mut Vec<Value>>) {
    for p in ports.into_iter().flatten().filter(|p| p.is_object()) {
        if p["protocol"].is_null() {
            p["protocol"] = json!("TCP");
        }
    }
}

fn default_pod_spec(spec: &mut Value) {
    if !spec.is_object() {
        return;
    }
    for list in ["containers", "initContainers"] {
        for c in spec[list]
            .as_array_mut()
            .into_iter()
            .flatten()
            .filter(|c| c.is_object())
        {
            default_protocols(c["ports"].as_array_mut());
        }
    }
    if spec["restartPolicy"].is_null() {
        spec["restartPolicy"] = json!("Always");
    }
}

/// The object as served at a version: storage holds one copy per group/resource, and the
/// versions of a CRD share it without conversion (apiVersion is rewritten).
pub fn with_version(obj: &Value, rt: &ResourceType) -> Value {
    let mut o = obj.clone();
    o["apiVersion"] = json!(rt.api_version());
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selectors::LabelSelector;

    fn configmaps(store: &Store) -> ResourceType {
        store
            .registry()
            .get("", "v1", "configmaps")
            .cloned()
            .unwrap_or_else(|| unreachable!())
    }

    fn update_opts() -> WriteOptions {
        WriteOptions {
            ownership: Ownership::Update("test".into()),
            subresource: None,
            dry_run: false,
            strict: false,
        }
    }

    #[test]
    fn selector_watch_sees_objects_enter_and_leave() {
        let store = Store::new(100);
        let rt = configmaps(&store);
        let from = store.resource_version();
        let cm = json!({"metadata": {"name": "a", "labels": {"app": "x"}}});
        assert!(store.create(&rt, "default", cm, &update_opts()).is_ok());
        let relabel = |app: &str| json!({"metadata": {"name": "a", "labels": {"app": app}}});
        assert!(
            store
                .update(&rt, "default", "a", relabel("y"), &update_opts())
                .is_ok()
        );
        assert!(
            store
                .update(&rt, "default", "a", relabel("x"), &update_opts())
                .is_ok()
        );
        let sel = Selectors {
            labels: LabelSelector::parse("app=x").unwrap_or_default(),
            ..Selectors::default()
        };
        let feed = store.watch(&rt, Some("default"), &sel, WatchStart::After(from));
        let types: Vec<Option<EventType>> = feed
            .map(|f| f.initial.iter().map(|e| e.seen_through(&sel)).collect())
            .unwrap_or_default();
        assert_eq!(
            types,
            vec![
                Some(EventType::Added),
                Some(EventType::Deleted),
                Some(EventType::Added)
            ]
        );
    }

    #[test]
    fn stale_update_conflicts_and_noop_keeps_resource_version() {
        let store = Store::new(100);
        let rt = configmaps(&store);
        let created = store.create(
            &rt,
            "default",
            json!({"metadata": {"name": "a"}, "data": {"k": "1"}}),
            &update_opts(),
        );
        let Ok(created) = created else { unreachable!() };
        let mut changed = created.clone();
        changed["data"]["k"] = json!("2");
        assert!(
            store
                .update(&rt, "default", "a", changed.clone(), &update_opts())
                .is_ok()
        );
        // The same body again carries the old resourceVersion: 409.
        let err = store
            .update(&rt, "default", "a", changed, &update_opts())
            .err();
        assert_eq!(err.map(|e| e.code), Some(409));
        // A write that changes nothing keeps the resourceVersion.
        let Ok(current) = store.get(&rt, "default", "a") else {
            unreachable!()
        };
        let again = store.update(&rt, "default", "a", current.clone(), &update_opts());
        assert_eq!(
            again.map(|o| o["metadata"]["resourceVersion"].clone()).ok(),
            Some(current["metadata"]["resourceVersion"].clone())
        );
    }

    #[test]
    fn watch_from_compacted_history_is_gone() {
        let store = Store::new(100);
        let rt = configmaps(&store);
        let from = store.resource_version();
        assert!(
            store
                .create(
                    &rt,
                    "default",
                    json!({"metadata": {"name": "a"}}),
                    &update_opts()
                )
                .is_ok()
        );
        store.compact();
        assert!(
            store
                .create(
                    &rt,
                    "default",
                    json!({"metadata": {"name": "b"}}),
                    &update_opts()
                )
                .is_ok()
        );
        let err = store
            .watch(&rt, None, &Selectors::default(), WatchStart::After(from))
            .err();
        assert_eq!(err.map(|e| e.code), Some(410));
    }

    #[test]
    fn foreground_deletion_waits_for_dependents() {
        let store = Store::new(100);
        let rt = configmaps(&store);
        let Ok(owner) = store.create(
            &rt,
            "default",
            json!({"metadata": {"name": "owner"}}),
            &update_opts(),
        ) else {
            unreachable!()
        };
        let uid = owner["metadata"]["uid"].clone();
        let dep = json!({"metadata": {"name": "dep", "finalizers": ["example.com/hold"],
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]}});
        assert!(store.create(&rt, "default", dep, &update_opts()).is_ok());
        let opts = DeleteOptions {
            propagation: Propagation::Foreground,
            ..DeleteOptions::default()
        };
        let marked = store.delete(&rt, "default", "owner", &opts).ok();
        assert_eq!(
            marked.map(|o| o["metadata"]["finalizers"].clone()),
            Some(json!(["foregroundDeletion"])),
            "the owner waits for its dependent"
        );
        // The dependent's finalizer goes: it is removed, and then the owner.
        let Ok(mut d) = store.get(&rt, "default", "dep") else {
            unreachable!()
        };
        d["metadata"]["finalizers"] = json!([]);
        assert!(
            store
                .update(&rt, "default", "dep", d, &update_opts())
                .is_ok()
        );
        assert_eq!(
            store.get(&rt, "default", "dep").err().map(|e| e.code),
            Some(404)
        );
        assert_eq!(
            store.get(&rt, "default", "owner").err().map(|e| e.code),
            Some(404)
        );
    }
}
