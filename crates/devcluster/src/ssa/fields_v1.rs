//! `metadata.managedFields`: the `FieldsV1` encoding of field sets and the entries of
//! managers, in kube-apiserver's order.

use serde_json::{Map, Value, json};

use super::{FieldPath, FieldSet};

fn insert_path(node: &mut Map<String, Value>, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let entry = node
        .entry(first.clone())
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(next) = entry {
        insert_path(next, rest);
    }
}

/// Marks a member that also has members below it with `.`, as FieldsV1 does (a member
/// without children is just `{}`).
fn mark_member(node: &mut Map<String, Value>, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        if !node.is_empty() {
            node.insert(".".into(), json!({}));
        }
        return;
    };
    if let Some(Value::Object(next)) = node.get_mut(first) {
        mark_member(next, rest);
    }
}

/// Serialize a set to `FieldsV1`.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        insert_path(&mut root, path);
    }
    for path in set.iter().filter(|p| !p.is_empty()) {
        mark_member(&mut root, path);
    }
    Value::Object(root)
}

fn from_fields_v1_into(node: &Value, path: &mut FieldPath, out: &mut FieldSet) {
    let Some(map) = node.as_object() else {
        return;
    };
    let children: Vec<(&String, &Value)> = map.iter().filter(|(k, _)| *k != ".").collect();
    if (children.is_empty() || map.contains_key(".")) && !path.is_empty() {
        out.insert(path.clone());
    }
    for (k, v) in children {
        path.push(k.clone());
        from_fields_v1_into(v, path, out);
        path.pop();
    }
}

/// Parse `FieldsV1`.
pub fn from_fields_v1(fields: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    from_fields_v1_into(fields, &mut Vec::new(), &mut out);
    out
}

/// One `managedFields` entry, parsed.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) manager: String,
    pub(super) operation: String,
    pub(super) api_version: String,
    pub(super) subresource: String,
    pub(super) time: String,
    pub(super) set: FieldSet,
}

pub(super) fn entries_of(object: Option<&Value>) -> Vec<Entry> {
    let Some(list) = object.and_then(|o| o["metadata"]["managedFields"].as_array()) else {
        return Vec::new();
    };
    list.iter()
        .map(|e| Entry {
            manager: e["manager"].as_str().unwrap_or_default().into(),
            operation: e["operation"].as_str().unwrap_or("Update").into(),
            api_version: e["apiVersion"].as_str().unwrap_or_default().into(),
            subresource: e["subresource"].as_str().unwrap_or_default().into(),
            time: e["time"].as_str().unwrap_or_default().into(),
            set: from_fields_v1(&e["fieldsV1"]),
        })
        .collect()
}

pub(super) fn write_entries(object: &mut Value, mut entries: Vec<Entry>) {
    // kube-apiserver's order: Apply before Update, then by time (none first), manager,
    // apiVersion and subresource.
    entries.sort_by(|a, b| {
        (
            &a.operation,
            &a.time,
            &a.manager,
            &a.api_version,
            &a.subresource,
        )
            .cmp(&(
                &b.operation,
                &b.time,
                &b.manager,
                &b.api_version,
                &b.subresource,
            ))
    });
    let list: Vec<Value> = entries
        .into_iter()
        .filter(|e| !e.set.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.set),
            });
            // Entries a client wrote without a time keep none.
            if !e.time.is_empty() {
                v["time"] = json!(e.time);
            }
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    if list.is_empty() {
        if let Some(meta) = object["metadata"].as_object_mut() {
            meta.remove("managedFields");
        }
    } else {
        object["metadata"]["managedFields"] = Value::Array(list);
    }
}

pub(super) fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The set with the maps and lists that hold its members (but not `metadata` itself), as
/// `Update` operations own them.
pub(super) fn with_containers(set: FieldSet) -> FieldSet {
    let mut out = set.clone();
    for p in &set {
        for n in 1..p.len() {
            if !(n == 1 && p[0] == "f:metadata") {
                out.insert(p[..n].to_vec());
            }
        }
    }
    out
}

/// Whether some member of `set` lies below `path` (paths below one sort right after it).
pub(super) fn has_below(set: &FieldSet, path: &FieldPath) -> bool {
    set.range(path.clone()..)
        .find(|q| *q != path)
        .is_some_and(|next| next.len() > path.len() && next.starts_with(path))
}
