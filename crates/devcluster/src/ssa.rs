//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! Every write records which manager set which fields, as sets of field paths serialized in
//! the `FieldsV1` format. An apply merges the applied configuration into the live object
//! (maps recursively, list-maps by their keys, everything else atomically), refuses with 409
//! when it would change a field another manager owns (unless forced, which takes ownership),
//! and removes fields the manager applied before but no longer applies and nobody else owns.
//! Sets and granular lists of scalars are treated as atomic (documented in the README).

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::resources::ResourceType;
use crate::status::{ApiError, Cause};

mod fields_v1;

use fields_v1::{Entry, entries_of, has_below, now, with_containers, write_entries};
pub use fields_v1::{from_fields_v1, to_fields_v1};

/// A path into an object: `f:<field>` and `k:<json key>` elements.
pub type FieldPath = Vec<String>;
/// A set of owned paths.
pub type FieldSet = BTreeSet<FieldPath>;

/// Metadata fields the server manages; nobody owns them.
const SERVER_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "generateName",
];

/// The keys of a list that merges by key, if the list at `names` is one.
pub fn list_map_keys(rt: &ResourceType, names: &[&str]) -> Option<Vec<String>> {
    if let Some(schema) = &rt.raw_schema {
        let mut node: &Value = schema;
        for name in names {
            if node["type"] == "array" {
                node = &node["items"];
            }
            node = &node["properties"][*name];
        }
        if node["x-kubernetes-list-type"] == "map" {
            let keys = node["x-kubernetes-list-map-keys"]
                .as_array()?
                .iter()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect();
            return Some(keys);
        }
        return None;
    }
    let last = *names.last()?;
    let parent = names.len().checked_sub(2).map(|i| names[i]).unwrap_or("");
    let keys: &[&str] = match last {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets" => &["name"],
        "volumeMounts" => &["mountPath"],
        "volumeDevices" => &["devicePath"],
        "ownerReferences" => &["uid"],
        "conditions" => &["type"],
        "ports" if parent == "containers" || parent == "initContainers" => {
            &["containerPort", "protocol"]
        }
        "ports" if rt.kind == "Service" => &["port", "protocol"],
        _ => return None,
    };
    Some(keys.iter().map(|k| k.to_string()).collect())
}

/// The `k:` element of a list item: its key fields as a JSON object with sorted keys.
fn item_key(item: &Value, keys: &[String]) -> String {
    let mut sorted: Vec<&String> = keys.iter().collect();
    sorted.sort();
    let parts: Vec<String> = sorted
        .iter()
        .map(|k| {
            format!(
                "{}:{}",
                json!(k),
                item.get(k.as_str()).unwrap_or(&Value::Null)
            )
        })
        .collect();
    format!("k:{{{}}}", parts.join(","))
}

fn collect(
    value: &Value,
    rt: &ResourceType,
    names: &mut Vec<String>,
    path: &mut FieldPath,
    out: &mut FieldSet,
) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                names.push(k.clone());
                path.push(format!("f:{k}"));
                collect_field(v, rt, names, path, out);
                path.pop();
                names.pop();
            }
        }
        _ => {
            out.insert(path.clone());
        }
    }
}

fn collect_field(
    v: &Value,
    rt: &ResourceType,
    names: &mut Vec<String>,
    path: &mut FieldPath,
    out: &mut FieldSet,
) {
    if let Value::Array(items) = v {
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        if let Some(keys) = list_map_keys(rt, &name_refs) {
            for item in items {
                path.push(item_key(item, &keys));
                out.insert(path.clone());
                collect(item, rt, names, path, out);
                path.pop();
            }
            return;
        }
    }
    collect(v, rt, names, path, out);
}

/// Which part of an object a write addresses: the main resource or the status subresource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything but server-managed metadata (and status, when it is a subresource).
    Main {
        /// Whether status is excluded (separate subresource).
        status_separate: bool,
    },
    /// Only `.status`.
    Status,
}

/// The owned-field set of an object within a scope.
pub fn field_set(object: &Value, rt: &ResourceType, scope: Scope) -> FieldSet {
    let mut out = FieldSet::new();
    let Some(map) = object.as_object() else {
        return out;
    };
    for (k, v) in map {
        let keep = match scope {
            Scope::Status => k == "status",
            Scope::Main { status_separate } => {
                !(k == "apiVersion" || k == "kind" || (status_separate && k == "status"))
            }
        };
        if !keep {
            continue;
        }
        if k == "metadata" {
            if let Some(meta) = v.as_object() {
                for (mk, mv) in meta {
                    if SERVER_METADATA.contains(&mk.as_str()) {
                        continue;
                    }
                    let mut names = vec!["metadata".to_string(), mk.clone()];
                    let mut path = vec!["f:metadata".to_string(), format!("f:{mk}")];
                    collect_field(mv, rt, &mut names, &mut path, &mut out);
                }
            }
            continue;
        }
        let mut names = vec![k.clone()];
        let mut path = vec![format!("f:{k}")];
        collect_field(v, rt, &mut names, &mut path, &mut out);
    }
    out
}

/// The value at a field path, if present.
pub fn value_at<'a>(object: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = object;
    for el in path {
        if let Some(field) = el.strip_prefix("f:") {
            cur = cur.get(field)?;
        } else if let Some(key) = el.strip_prefix("k:") {
            let want: Map<String, Value> = serde_json::from_str(key).ok()?;
            cur = cur
                .as_array()?
                .iter()
                .find(|item| want.iter().all(|(k, v)| item.get(k) == Some(v)))?;
        } else {
            return None;
        }
    }
    Some(cur)
}

/// Remove the value at a field path (a field or a list item).
fn remove_at(object: &mut Value, path: &[String]) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    let mut cur = object;
    for el in parent_path {
        let next = if let Some(field) = el.strip_prefix("f:") {
            cur.get_mut(field)
        } else if let Some(key) = el.strip_prefix("k:") {
            let Ok(want) = serde_json::from_str::<Map<String, Value>>(key) else {
                return;
            };
            cur.as_array_mut().and_then(|items| {
                items
                    .iter_mut()
                    .find(|item| want.iter().all(|(k, v)| item.get(k) == Some(v)))
            })
        } else {
            None
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(field) = last.strip_prefix("f:") {
        if let Some(map) = cur.as_object_mut() {
            map.remove(field);
        }
    } else if let Some(key) = last.strip_prefix("k:")
        && let Ok(want) = serde_json::from_str::<Map<String, Value>>(key)
        && let Some(items) = cur.as_array_mut()
    {
        items.retain(|item| !want.iter().all(|(k, v)| item.get(k) == Some(v)));
    }
}

/// A field path as people read it in conflict messages: `.spec.containers[name="relay"].image`.
pub fn path_display(path: &[String]) -> String {
    let mut s = String::new();
    for el in path {
        if let Some(field) = el.strip_prefix("f:") {
            s.push('.');
            s.push_str(field);
        } else if let Some(key) = el.strip_prefix("k:") {
            let parts: Vec<String> = serde_json::from_str::<Map<String, Value>>(key)
                .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            s.push_str(&format!("[{}]", parts.join(",")));
        }
    }
    s
}

fn scope_for(rt: &ResourceType, subresource: Option<&str>) -> Scope {
    if subresource == Some("status") {
        Scope::Status
    } else {
        Scope::Main {
            status_separate: rt.status_subresource,
        }
    }
}

/// Record an `Update` (create, replace or non-apply patch) by `manager` in `new`'s managedFields,
/// starting from the entries `new` carries (the live ones, or those the client wrote).
pub fn record_update(
    rt: &ResourceType,
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    subresource: Option<&str>,
) {
    let scope = scope_for(rt, subresource);
    let new_set = with_containers(field_set(new, rt, scope));
    let all_new = with_containers(field_set(
        new,
        rt,
        Scope::Main {
            status_separate: false,
        },
    ));
    // A leaf is the updater's when its value changed; a map, list or list item only when it
    // is new (what structured-merge-diff's comparison reports as added).
    let changed: FieldSet = new_set
        .iter()
        .filter(|p| {
            let before = old.and_then(|o| value_at(o, p));
            if has_below(&new_set, p) {
                before.is_none()
            } else {
                before != value_at(new, p)
            }
        })
        .cloned()
        .collect();
    let mut entries = entries_of(Some(&*new));
    for e in &mut entries {
        e.set
            .retain(|p| all_new.contains(p) && !changed.contains(p));
    }
    if !changed.is_empty() {
        let sub = subresource.unwrap_or_default();
        let api_version = rt.api_version();
        match entries
            .iter_mut()
            .find(|e| e.manager == manager && e.operation == "Update" && e.subresource == sub)
        {
            Some(e) => {
                e.set.extend(changed);
                e.time = now();
                e.api_version = api_version;
            }
            None => entries.push(Entry {
                manager: manager.into(),
                operation: "Update".into(),
                api_version,
                subresource: sub.into(),
                time: now(),
                set: changed,
            }),
        }
    }
    write_entries(new, entries);
}

fn merge_into(cur: &mut Value, cfg: &Value, rt: &ResourceType, names: &mut Vec<String>) {
    match (cur, cfg) {
        (Value::Object(cur_map), Value::Object(cfg_map)) => {
            for (k, v) in cfg_map {
                names.push(k.clone());
                let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
                let keys = match v {
                    Value::Array(_) => list_map_keys(rt, &name_refs),
                    _ => None,
                };
                match (cur_map.get_mut(k), keys) {
                    (Some(Value::Array(cur_items)), Some(keys)) => {
                        for item in v.as_array().map(Vec::as_slice).unwrap_or(&[]) {
                            let key = item_key(item, &keys);
                            match cur_items.iter_mut().find(|c| item_key(c, &keys) == key) {
                                Some(existing) => merge_into(existing, item, rt, names),
                                None => cur_items.push(item.clone()),
                            }
                        }
                    }
                    (Some(existing @ Value::Object(_)), None) if v.is_object() => {
                        merge_into(existing, v, rt, names)
                    }
                    _ => {
                        cur_map.insert(k.clone(), v.clone());
                    }
                }
                names.pop();
            }
        }
        (cur, cfg) => *cur = cfg.clone(),
    }
}

/// kubectl's client-side apply annotation.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Server-side apply of `config` by `manager` onto `current` (None: the object does not exist).
/// Returns the new object with its managedFields, or a 409 listing the conflicts.
pub fn apply(
    rt: &ResourceType,
    current: Option<&Value>,
    config: &Value,
    manager: &str,
    force: bool,
    subresource: Option<&str>,
) -> Result<Value, ApiError> {
    let name = config["metadata"]["name"].as_str().unwrap_or_default();
    if config["apiVersion"].as_str().is_none() || config["kind"].as_str().is_none() {
        return Err(ApiError::bad_request(
            "apiVersion and kind must be set in an apply configuration",
        ));
    }
    let scope = scope_for(rt, subresource);
    // Only the part of the configuration that this endpoint writes counts.
    let mut scoped_cfg = config.clone();
    if let Some(map) = scoped_cfg.as_object_mut() {
        match scope {
            Scope::Status => map.retain(|k, _| {
                k == "status" || k == "metadata" || k == "apiVersion" || k == "kind"
            }),
            Scope::Main {
                status_separate: true,
            } => {
                map.remove("status");
            }
            Scope::Main { .. } => {}
        }
        if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.retain(|k, _| {
                !SERVER_METADATA.contains(&k.as_str())
                    || k == "name"
                    || k == "namespace"
                    || k == "generateName"
            });
            if scope == Scope::Status {
                meta.retain(|k, _| k == "name" || k == "namespace");
            }
        }
    }
    let new_set = field_set(&scoped_cfg, rt, scope);
    let mut entries = entries_of(current);
    let sub = subresource.unwrap_or_default();

    // Conflicts: fields this apply would change that another manager owns.
    let mut conflicts: Vec<(String, String, FieldPath)> = Vec::new();
    if let Some(cur) = current {
        for path in &new_set {
            let live = value_at(cur, path);
            if live.is_none() || live == value_at(&scoped_cfg, path) {
                continue;
            }
            for e in &entries {
                let same = e.manager == manager && e.operation == "Apply" && e.subresource == sub;
                if !same && e.set.contains(path) {
                    conflicts.push((e.manager.clone(), e.api_version.clone(), path.clone()));
                }
            }
        }
    }
    if !conflicts.is_empty() && !force {
        let causes: Vec<Cause> = conflicts
            .iter()
            .map(|(m, v, p)| Cause {
                reason: "FieldManagerConflict".into(),
                message: format!("conflict with \"{m}\" using {v}"),
                field: path_display(p),
            })
            .collect();
        let mut message = format!(
            "Apply failed with {} conflict{}: ",
            causes.len(),
            if causes.len() == 1 { "" } else { "s" }
        );
        let parts: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.message, c.field))
            .collect();
        message.push_str(&parts.join("\n"));
        return Err(ApiError::conflict(
            &rt.plural, &rt.group, name, message, causes,
        ));
    }
    let taken: BTreeSet<FieldPath> = conflicts.into_iter().map(|(_, _, p)| p).collect();

    let mut result = current.cloned().unwrap_or_else(|| json!({}));
    merge_into(&mut result, &scoped_cfg, rt, &mut Vec::new());

    // Fields this manager applied before but no longer applies, and nobody else owns, go.
    let previous: FieldSet = entries
        .iter()
        .find(|e| e.manager == manager && e.operation == "Apply" && e.subresource == sub)
        .map(|e| e.set.clone())
        .unwrap_or_default();
    let owned_by_others = |p: &FieldPath| {
        entries.iter().any(|e| {
            !(e.manager == manager && e.operation == "Apply" && e.subresource == sub)
                && e.set.contains(p)
        })
    };
    // A map or list stays while anything below it is still owned (by this configuration or
    // by others), as structured-merge-diff adds owned items back after pruning.
    let still_owned: FieldSet = entries
        .iter()
        .filter(|e| !(e.manager == manager && e.operation == "Apply" && e.subresource == sub))
        .flat_map(|e| e.set.iter().cloned())
        .chain(new_set.iter().cloned())
        .collect();
    let mut removed: Vec<FieldPath> = previous
        .iter()
        .filter(|p| !new_set.contains(*p) && !owned_by_others(p) && !has_below(&still_owned, p))
        .cloned()
        .collect();
    // Leaves before the list items that hold them.
    removed.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in &removed {
        remove_at(&mut result, p);
    }

    // kube-apiserver keeps client-side apply's annotation in step with what kubectl applies
    // server-side, so that a later client-side apply still computes the right patch.
    if manager == "kubectl"
        && result["metadata"]["annotations"][LAST_APPLIED]
            .as_str()
            .is_some_and(|a| !a.is_empty())
    {
        let mut applied = config.clone();
        if let Some(annotations) = applied
            .get_mut("metadata")
            .and_then(|m| m.get_mut("annotations"))
            .and_then(Value::as_object_mut)
        {
            annotations.remove(LAST_APPLIED);
        }
        let text = serde_json::to_string(&applied).unwrap_or_default();
        result["metadata"]["annotations"][LAST_APPLIED] = json!(format!("{text}\n"));
    }

    for e in &mut entries {
        e.set.retain(|p| !taken.contains(p));
    }
    let api_version = rt.api_version();
    // An apply that changes nothing but ownership does not stamp a time (kube-apiserver sets
    // it only when the object changed).
    let without_fields = |o: &Value| {
        let mut o = o.clone();
        if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
        }
        o
    };
    let changed_object = current.is_none_or(|c| without_fields(c) != without_fields(&result));
    match entries
        .iter_mut()
        .find(|e| e.manager == manager && e.operation == "Apply" && e.subresource == sub)
    {
        Some(e) => {
            e.set = new_set;
            if changed_object {
                e.time = now();
            }
            e.api_version = api_version;
        }
        None => entries.push(Entry {
            manager: manager.into(),
            operation: "Apply".into(),
            api_version,
            subresource: sub.into(),
            time: if changed_object { now() } else { String::new() },
            set: new_set,
        }),
    }
    write_entries(&mut result, entries);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Registry;

    fn deployment() -> ResourceType {
        Registry::with_builtins()
            .get("apps", "v1", "deployments")
            .cloned()
            .unwrap_or_else(|| unreachable!())
    }

    #[test]
    fn fields_v1_round_trip_with_keyed_items() {
        let rt = deployment();
        let obj = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "a", "labels": {"x": "y"}},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        let set = field_set(
            &obj,
            &rt,
            Scope::Main {
                status_separate: true,
            },
        );
        assert!(set.contains(&vec!["f:spec".to_string(), "f:replicas".to_string()]));
        let back = from_fields_v1(&to_fields_v1(&set));
        assert_eq!(back, set);
    }

    #[test]
    fn apply_conflicts_then_force_takes_ownership() {
        let rt = deployment();
        let base = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "a"}, "spec": {"replicas": 1}});
        let first = apply(&rt, None, &base, "alice", false, None).ok();
        let Some(first) = first else { unreachable!() };
        let mut change = base.clone();
        change["spec"]["replicas"] = json!(3);
        let err = apply(&rt, Some(&first), &change, "bob", false, None).err();
        assert_eq!(err.as_ref().map(|e| e.code), Some(409));
        assert!(
            err.map(|e| e.message)
                .unwrap_or_default()
                .contains("conflict with \"alice\"")
        );
        let forced = apply(&rt, Some(&first), &change, "bob", true, None).ok();
        assert_eq!(
            forced.as_ref().map(|o| o["spec"]["replicas"].clone()),
            Some(json!(3))
        );
        let managers: Vec<String> = forced
            .and_then(|o| o["metadata"]["managedFields"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|e| e["manager"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(managers, vec!["bob".to_string()]);
    }

    #[test]
    fn apply_removes_fields_no_longer_applied() {
        let rt = deployment();
        let v1 = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "a", "labels": {"keep": "1", "drop": "1"}}});
        let Ok(o1) = apply(&rt, None, &v1, "m", false, None) else {
            unreachable!()
        };
        let v2 = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "a", "labels": {"keep": "1"}}});
        let Ok(o2) = apply(&rt, Some(&o1), &v2, "m", false, None) else {
            unreachable!()
        };
        assert_eq!(o2["metadata"]["labels"], json!({"keep": "1"}));
    }

    #[test]
    fn updates_own_the_maps_they_create_and_kubectl_applies_keep_last_applied() {
        let rt = deployment();
        let mut created = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "a", "annotations": {LAST_APPLIED: "{}\n"}},
            "spec": {"replicas": 1}});
        record_update(&rt, None, &mut created, "csa", None);
        let fields = &created["metadata"]["managedFields"][0]["fieldsV1"];
        assert_eq!(fields["f:spec"], json!({".": {}, "f:replicas": {}}));
        assert_eq!(fields["f:metadata"]["f:annotations"]["."], json!({}));

        let config = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "a"}, "spec": {"replicas": 1}});
        let Ok(applied) = apply(&rt, Some(&created), &config, "kubectl", false, None) else {
            unreachable!()
        };
        assert_eq!(
            applied["metadata"]["annotations"][LAST_APPLIED],
            json!(format!("{config}\n"))
        );
        // Nothing changed for another co-owner: its entry gets no time.
        let Ok(again) = apply(&rt, Some(&applied), &config, "other", false, None) else {
            unreachable!()
        };
        let entries = again["metadata"]["managedFields"].as_array().cloned();
        let other = entries
            .unwrap_or_default()
            .into_iter()
            .find(|e| e["manager"] == "other");
        assert!(other.is_some_and(|e| e.get("time").is_none()));
    }
}
