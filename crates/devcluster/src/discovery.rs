//! Discovery documents (`/api`, `/apis`, group and group/version resource lists), `/version`
//! and a minimal OpenAPI v3: what clients read before they talk to resources. Only the
//! legacy (unaggregated) discovery format is served; clients that ask for aggregated
//! discovery fall back to it because the answer's content type says so.

use serde_json::{Value, json};

use crate::resources::{Registry, ResourceType};

/// The Kubernetes version the emulator claims.
pub const MAJOR: &str = "1";
/// Minor version.
pub const MINOR: &str = "34";

/// `/version`.
pub fn version() -> Value {
    json!({
        "major": MAJOR, "minor": MINOR, "emulationMajor": MAJOR, "emulationMinor": MINOR,
        "gitVersion": format!("v{MAJOR}.{MINOR}.0-devcluster"),
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24.0", "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// `/api`.
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_doc(name: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    let preferred = vs.first().cloned().unwrap_or(Value::Null);
    json!({"name": name, "versions": vs, "preferredVersion": preferred})
}

/// `/apis`.
pub fn groups(reg: &Registry) -> Value {
    let groups: Vec<Value> = reg
        .groups()
        .iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, vs)| group_doc(g, vs))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`.
pub fn group(reg: &Registry, name: &str) -> Option<Value> {
    let groups = reg.groups();
    let versions = groups.get(name)?;
    let mut doc = group_doc(name, versions);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

fn verbs(rt: &ResourceType) -> Vec<&'static str> {
    let _ = rt;
    vec![
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    ]
}

/// `/api/v1` and `/apis/<group>/<version>`.
pub fn resource_list(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    let types: Vec<&ResourceType> = reg
        .all()
        .filter(|rt| rt.group == group && rt.version == version)
        .collect();
    if types.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for rt in &types {
        let mut r = json!({
            "name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced,
            "kind": rt.kind, "verbs": verbs(rt),
        });
        if !rt.short_names.is_empty() {
            r["shortNames"] = json!(rt.short_names);
        }
        if !rt.categories.is_empty() {
            r["categories"] = json!(rt.categories);
        }
        resources.push(r);
        if rt.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", rt.plural), "singularName": "",
                "namespaced": rt.namespaced, "kind": rt.kind, "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

/// `/openapi/v3`: one entry per group/version.
pub fn openapi_v3_root(reg: &Registry) -> Value {
    let mut paths = serde_json::Map::new();
    for (g, vs) in reg.groups() {
        for v in vs {
            let key = if g.is_empty() {
                format!("api/{v}")
            } else {
                format!("apis/{g}/{v}")
            };
            let url = format!("/openapi/v3/{key}?hash={}", reg_hash(reg));
            paths.insert(key, json!({"serverRelativeURL": url}));
        }
    }
    json!({"paths": paths})
}

fn reg_hash(reg: &Registry) -> String {
    // Changes whenever the set of resources changes, so clients refetch after a CRD appears.
    let mut h: u64 = 1469598103934665603;
    for rt in reg.all() {
        for b in rt.api_version().bytes().chain(rt.plural.bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(1099511628211);
        }
    }
    format!("{h:016X}")
}

/// `/openapi/v3/<gv path>`: the paths of each resource with the `fieldValidation` parameter,
/// which tells kubectl the server validates fields itself (so it skips client-side schema
/// validation), and for custom resources their schema, so `kubectl explain` works.
pub fn openapi_v3_group(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    let types: Vec<&ResourceType> = reg
        .all()
        .filter(|rt| rt.group == group && rt.version == version)
        .collect();
    if types.is_empty() {
        return None;
    }
    let field_validation = json!({"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    let mut paths = serde_json::Map::new();
    let schemas = crate::openapi::v3_schemas(types.iter().copied());
    let prefix = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    for rt in types {
        let gvk = json!([{"group": rt.group, "version": rt.version, "kind": rt.kind}]);
        let ref_ = if rt.raw_schema.is_some() {
            json!({"$ref": format!("#/components/schemas/{}", crate::openapi::model_name(rt))})
        } else {
            json!({"type": "object"})
        };
        // Writes advertise `fieldValidation`; reads and deletes (which kubectl 1.27's
        // `explain` looks up a resource's kind through) carry only the kind.
        let op = |verb: &str| {
            let params = if matches!(verb, "post" | "put" | "patch") {
                json!([field_validation])
            } else {
                json!([])
            };
            json!({
                "parameters": params,
                "x-kubernetes-action": verb,
                "x-kubernetes-group-version-kind": gvk[0],
                "requestBody": {"content": {"application/json": {"schema": ref_}}},
                "responses": {"200": {"content": {"application/json": {"schema": ref_}}}},
            })
        };
        let base = if rt.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", rt.plural)
        } else {
            format!("{prefix}/{}", rt.plural)
        };
        paths.insert(
            base.clone(),
            json!({"get": op("list"), "post": op("post"), "delete": op("deletecollection")}),
        );
        // The list over all namespaces: kubectl 1.27's `explain` finds a namespaced kind
        // only through this path.
        if rt.namespaced {
            paths.insert(
                format!("{prefix}/{}", rt.plural),
                json!({"get": op("list")}),
            );
        }
        paths.insert(
            format!("{base}/{{name}}"),
            json!({"get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete")}),
        );
    }
    // Built-in kinds get no schema: kubectl then computes strategic merge patches from its
    // compiled-in types, which know the merge keys.
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (devcluster)", "version": format!("v{MAJOR}.{MINOR}.0")},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}
