//! Server-side printing: the `meta.k8s.io/v1` Table that `kubectl get` asks for. Custom
//! resources use their CRD's additionalPrinterColumns (JSONPath subset: fields, `[n]`, `[*]`
//! and `[?(@.f=="v")]` filters); built-in kinds get the columns kubectl users expect for the
//! kinds the operator manages, others Name and Age.

use serde_json::{Value, json};

use crate::resources::{PrinterColumn, ResourceType};

fn col(name: &str, type_: &str, json_path: &str, priority: i64) -> PrinterColumn {
    PrinterColumn {
        name: name.into(),
        type_: type_.into(),
        json_path: json_path.into(),
        description: String::new(),
        priority,
    }
}

/// The Table of a list of objects.
pub fn table(
    rt: &ResourceType,
    objects: &[Value],
    resource_version: &str,
    include_object: &str,
) -> Value {
    let columns = columns(rt);
    let mut defs = vec![json!({"name": "Name", "type": "string", "format": "name",
        "description": "Name must be unique within a namespace.", "priority": 0})];
    for c in &columns {
        let format = "";
        let type_ = if c.type_ == "date" {
            "string"
        } else {
            c.type_.as_str()
        };
        defs.push(json!({"name": c.name, "type": type_, "format": format,
            "description": c.description, "priority": c.priority}));
    }
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            for c in &columns {
                cells.push(cell(rt, o, c));
            }
            let object = match include_object {
                "None" => Value::Null,
                "Object" => o.clone(),
                _ => json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                    "metadata": o["metadata"]}),
            };
            json!({"cells": cells, "object": object})
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": defs,
        "rows": rows,
    })
}

fn columns(rt: &ResourceType) -> Vec<PrinterColumn> {
    if rt.custom {
        if rt.printer_columns.is_empty() {
            return vec![col("Age", "date", ".metadata.creationTimestamp", 0)];
        }
        return rt.printer_columns.clone();
    }
    let age = col("Age", "date", ".metadata.creationTimestamp", 0);
    match (rt.group.as_str(), rt.kind.as_str()) {
        ("", "Pod") => vec![
            col("Ready", "builtin:podready", "", 0),
            col("Status", "string", ".status.phase", 0),
            col("Restarts", "builtin:restarts", "", 0),
            age,
            col("IP", "string", ".status.podIP", 1),
        ],
        ("apps", "StatefulSet") => vec![col("Ready", "builtin:ready", "", 0), age],
        ("apps", "Deployment") => vec![
            col("Ready", "builtin:ready", "", 0),
            col("Up-to-date", "integer", ".status.updatedReplicas", 0),
            col("Available", "integer", ".status.availableReplicas", 0),
            age,
        ],
        ("", "Namespace") => vec![col("Status", "string", ".status.phase", 0), age],
        ("", "Service") => vec![
            col("Type", "string", ".spec.type", 0),
            col("Cluster-IP", "string", ".spec.clusterIP", 0),
            col("Port(s)", "builtin:ports", "", 0),
            age,
        ],
        ("", "Secret") => vec![
            col("Type", "string", ".type", 0),
            col("Data", "builtin:datacount", "", 0),
            age,
        ],
        ("", "ConfigMap") => vec![col("Data", "builtin:datacount", "", 0), age],
        ("apiextensions.k8s.io", _) => vec![col(
            "Created At",
            "string",
            ".metadata.creationTimestamp",
            0,
        )],
        ("", "Event") => vec![
            col("Last Seen", "date", ".lastTimestamp", 0),
            col("Type", "string", ".type", 0),
            col("Reason", "string", ".reason", 0),
            col("Message", "string", ".message", 0),
        ],
        _ => vec![age],
    }
}

fn cell(_rt: &ResourceType, o: &Value, c: &PrinterColumn) -> Value {
    match c.type_.as_str() {
        "builtin:podready" => {
            let statuses = o["status"]["containerStatuses"].as_array();
            let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
            let ready = statuses.map_or(0, |s| {
                s.iter().filter(|c| c["ready"] == json!(true)).count()
            });
            json!(format!("{ready}/{total}"))
        }
        "builtin:restarts" => {
            let n: i64 = o["status"]["containerStatuses"].as_array().map_or(0, |s| {
                s.iter().filter_map(|c| c["restartCount"].as_i64()).sum()
            });
            json!(n)
        }
        "builtin:ready" => {
            let ready = o["status"]["readyReplicas"].as_i64().unwrap_or(0);
            let want = o["spec"]["replicas"].as_i64().unwrap_or(1);
            json!(format!("{ready}/{want}"))
        }
        "builtin:ports" => {
            let ports: Vec<String> = o["spec"]["ports"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .map(|p| {
                            format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            json!(if ports.is_empty() {
                "<none>".to_string()
            } else {
                ports.join(",")
            })
        }
        "builtin:datacount" => {
            let n = o["data"].as_object().map_or(0, |m| m.len())
                + o["binaryData"].as_object().map_or(0, |m| m.len());
            json!(n)
        }
        "date" => match jsonpath(o, &c.json_path).and_then(|v| v.as_str().map(str::to_string)) {
            Some(ts) => json!(age(&ts)),
            None => json!("<unknown>"),
        },
        _ => jsonpath(o, &c.json_path).unwrap_or(Value::Null),
    }
}

/// Human age of a timestamp, as `kubectl` prints it (`5s`, `3m`, `2h`, `4d`).
pub fn age(timestamp: &str) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(timestamp) else {
        return "<invalid>".into();
    };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 8 * 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s if s < 8 * 86400 => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Evaluate the JSONPath subset of printer columns; the first match.
pub fn jsonpath(obj: &Value, path: &str) -> Option<Value> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let mut current: Vec<&Value> = vec![obj];
    let mut rest = path.strip_prefix('$').unwrap_or(path);
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let field = &r[..end];
            rest = &r[end..];
            if field.is_empty() {
                continue;
            }
            current = current.into_iter().filter_map(|v| v.get(field)).collect();
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            // A filter may contain ']' only inside quotes; the column paths we serve do not.
            let inner = &r[..end];
            rest = &r[end + 1..];
            if inner == "*" {
                current = current
                    .into_iter()
                    .flat_map(|v| {
                        v.as_array()
                            .map(|a| a.iter().collect::<Vec<_>>())
                            .unwrap_or_default()
                    })
                    .collect();
            } else if let Ok(i) = inner.parse::<usize>() {
                current = current.into_iter().filter_map(|v| v.get(i)).collect();
            } else if let Some(filter) =
                inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')'))
            {
                let (field, want) = filter.split_once("==")?;
                let want = want.trim().trim_matches('"').trim_matches('\'');
                let field = field.trim();
                current = current
                    .into_iter()
                    .flat_map(|v| {
                        v.as_array()
                            .map(|a| a.iter().collect::<Vec<_>>())
                            .unwrap_or_default()
                    })
                    .filter(|item| {
                        item.get(field).is_some_and(|x| match x {
                            Value::String(s) => s == want,
                            other => *other == want,
                        })
                    })
                    .collect();
            } else {
                return None;
            }
        } else {
            return None;
        }
    }
    current.first().map(|v| (*v).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonpath_subset() {
        let o = json!({"spec": {"replicas": 3}, "status": {"conditions": [
            {"type": "Progressing", "reason": "A"}, {"type": "Ready", "reason": "B"}]}});
        assert_eq!(jsonpath(&o, ".spec.replicas"), Some(json!(3)));
        assert_eq!(
            jsonpath(&o, ".status.conditions[?(@.type==\"Ready\")].reason"),
            Some(json!("B"))
        );
        assert_eq!(
            jsonpath(&o, ".status.conditions[0].type"),
            Some(json!("Progressing"))
        );
        assert_eq!(jsonpath(&o, ".status.missing"), None);
    }
}
