//! The non-apply PATCH formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and
//! strategic merge patch. Strategic merge is implemented as far as kubectl and controllers
//! use it on built-in kinds: lists merge by the same keys server-side apply uses (containers
//! by name, ports by port and protocol...), `$patch: replace|delete`, `$retainKeys`,
//! `$deleteFromPrimitiveList/` and `$setElementOrder/` (order hints, ignored).

use serde_json::{Map, Value};

use crate::resources::ResourceType;
use crate::ssa::list_map_keys;
use crate::status::ApiError;

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn pointer_parts(path: &str) -> Result<Vec<String>, ApiError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| ApiError::bad_request(format!("invalid JSON pointer {path:?}")))?;
    Ok(rest.split('/').map(unescape).collect())
}

fn parent_mut<'a>(doc: &'a mut Value, parts: &[String]) -> Result<&'a mut Value, ApiError> {
    let mut cur = doc;
    for p in parts {
        cur = match cur {
            Value::Object(m) => m.get_mut(p),
            Value::Array(a) => p.parse::<usize>().ok().and_then(move |i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| ApiError::unprocessable(format!("path /{} not found", parts.join("/"))))?;
    }
    Ok(cur)
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), ApiError> {
    let parts = pointer_parts(path)?;
    let Some((last, parents)) = parts.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent_mut(doc, parents)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
            } else {
                let i: usize = last
                    .parse()
                    .map_err(|_| ApiError::unprocessable(format!("invalid array index {last}")))?;
                if i > a.len() {
                    return Err(ApiError::unprocessable(format!("index {i} out of bounds")));
                }
                a.insert(i, value);
            }
        }
        _ => return Err(ApiError::unprocessable(format!("cannot add at {path}"))),
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, ApiError> {
    let parts = pointer_parts(path)?;
    let Some((last, parents)) = parts.split_last() else {
        return Err(ApiError::unprocessable("cannot remove the whole document"));
    };
    let missing = || {
        ApiError::unprocessable(format!(
            "unable to remove nonexistent key: {last}: missing value"
        ))
    };
    match parent_mut(doc, parents)? {
        Value::Object(m) => m.remove(last).ok_or_else(missing),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| missing())?;
            if i < a.len() {
                Ok(a.remove(i))
            } else {
                Err(missing())
            }
        }
        _ => Err(missing()),
    }
}

/// RFC 6902 JSON patch.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), ApiError> {
    let ops = ops
        .as_array()
        .ok_or_else(|| ApiError::bad_request("a JSON patch must be an array of operations"))?;
    for op in ops {
        let path = op["path"].as_str().unwrap_or_default();
        match op["op"].as_str().unwrap_or_default() {
            "add" => add(doc, path, op["value"].clone())?,
            "remove" => {
                remove(doc, path)?;
            }
            "replace" => {
                remove(doc, path)?;
                add(doc, path, op["value"].clone())?;
            }
            "move" => {
                let v = remove(doc, op["from"].as_str().unwrap_or_default())?;
                add(doc, path, v)?;
            }
            "copy" => {
                let v = doc
                    .pointer(op["from"].as_str().unwrap_or_default())
                    .cloned()
                    .ok_or_else(|| ApiError::unprocessable("copy from a missing path"))?;
                add(doc, path, v)?;
            }
            "test" => {
                // As the API server's json-patch library does: testing for null passes when
                // the path is missing (kube-rs adds a first finalizer with exactly that test).
                let current = doc.pointer(path).unwrap_or(&Value::Null);
                if *current != op["value"] {
                    return Err(ApiError::unprocessable(format!(
                        "testing value {path} failed"
                    )));
                }
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown JSON patch operation {other:?}"
                )));
            }
        }
    }
    Ok(())
}

/// Strategic merge patch for built-in kinds.
pub fn strategic_merge(rt: &ResourceType, target: &mut Value, patch: &Value) {
    smp(rt, target, patch, &mut Vec::new());
}

fn smp(rt: &ResourceType, target: &mut Value, patch: &Value, names: &mut Vec<String>) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut clean = p.clone();
        clean.remove("$patch");
        *target = Value::Object(clean);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    if let Some(Value::Array(keep)) = p.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        t.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, v) in p {
        if k.starts_with("$setElementOrder/") || k == "$retainKeys" || k == "$patch" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let drop: Vec<Value> = v.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(items)) = t.get_mut(field) {
                items.retain(|i| !drop.contains(i));
            }
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        names.push(k.clone());
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let keys = if v.is_array() {
            list_map_keys(rt, &name_refs)
        } else {
            None
        };
        match (t.get_mut(k), keys, v) {
            (Some(Value::Array(items)), Some(keys), Value::Array(patch_items)) => {
                for pi in patch_items {
                    let same = |i: &Value| {
                        keys.iter().all(|key| {
                            i.get(key) == pi.get(key)
                                || (key == "protocol" && pi.get(key).is_none())
                        })
                    };
                    if pi.get("$patch").and_then(Value::as_str) == Some("delete") {
                        items.retain(|i| !same(i));
                        continue;
                    }
                    match items.iter_mut().find(|i| same(i)) {
                        Some(existing) => smp(rt, existing, pi, names),
                        None => {
                            let mut fresh = Value::Null;
                            smp(rt, &mut fresh, pi, names);
                            items.push(fresh);
                        }
                    }
                }
            }
            (Some(existing @ Value::Object(_)), _, Value::Object(_)) => smp(rt, existing, v, names),
            _ => {
                let mut fresh = Value::Null;
                if v.is_object() {
                    smp(rt, &mut fresh, v, names);
                } else {
                    fresh = v.clone();
                }
                t.insert(k.clone(), fresh);
            }
        }
        names.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Registry;
    use serde_json::json;

    #[test]
    fn merge_patch_removes_nulls() {
        let mut doc = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge_patch(&mut doc, &json!({"a": null, "b": {"c": 5}}));
        assert_eq!(doc, json!({"b": {"c": 5, "d": 3}}));
    }

    #[test]
    fn json_patch_ops() {
        let mut doc = json!({"a": [1, 2], "b": "x"});
        let ops = json!([
            {"op": "add", "path": "/a/-", "value": 3},
            {"op": "replace", "path": "/b", "value": "y"},
            {"op": "remove", "path": "/a/0"},
            {"op": "test", "path": "/b", "value": "y"},
        ]);
        assert!(json_patch(&mut doc, &ops).is_ok());
        assert_eq!(doc, json!({"a": [2, 3], "b": "y"}));
        assert_eq!(
            json_patch(
                &mut doc,
                &json!([{"op": "test", "path": "/b", "value": "z"}])
            )
            .err()
            .map(|e| e.code),
            Some(422)
        );
        // A missing path tests equal to null, not to anything else.
        assert!(
            json_patch(
                &mut doc,
                &json!([{"op": "test", "path": "/metadata/finalizers", "value": null}])
            )
            .is_ok()
        );
        assert!(
            json_patch(
                &mut doc,
                &json!([{"op": "test", "path": "/metadata/finalizers", "value": []}])
            )
            .is_err()
        );
    }

    #[test]
    fn strategic_merge_merges_containers_by_name() {
        let reg = Registry::with_builtins();
        let Some(rt) = reg.get("apps", "v1", "deployments") else {
            unreachable!()
        };
        let mut doc = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}]}}}});
        let patch = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "b", "image": "b:2"}, {"name": "a", "$patch": "delete"}]}}}});
        strategic_merge(rt, &mut doc, &patch);
        assert_eq!(
            doc["spec"]["template"]["spec"]["containers"],
            json!([{"name": "b", "image": "b:2"}])
        );
    }
}
