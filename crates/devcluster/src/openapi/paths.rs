//! The v2 paths of one kind: its collection, items and status, each operation with the
//! `fieldValidation` parameter and the kind's `x-kubernetes-group-version-kind`, as the
//! apiextensions builder (and, for built-in kinds, the API installer) writes them.

use serde_json::{Map, Value, json};

use super::{META, gvk};
use crate::resources::ResourceType;

fn camel(s: &str) -> String {
    s.split(['.', '-'])
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

fn query(name: &str, ty: &str, description: &str) -> Value {
    json!({"uniqueItems": true, "type": ty, "description": description, "name": name, "in": "query"})
}

pub(super) fn add_paths(paths: &mut Map<String, Value>, rt: &ResourceType, model: &str) {
    let group = rt.group.strip_suffix(".k8s.io").unwrap_or(&rt.group);
    let group = if group.is_empty() { "core" } else { group };
    let id_group = format!("{}{}", camel(group), camel(&rt.version));
    let mut tag = camel(group);
    if let Some(first) = tag.get(..1) {
        tag = format!("{}{}", first.to_lowercase(), &tag[1..]);
    }
    let tag = format!("{tag}_{}", rt.version);
    let namespaced = if rt.namespaced { "Namespaced" } else { "" };
    let (object, list) = if rt.raw_schema.is_some() {
        (
            json!({"$ref": format!("#/definitions/{model}")}),
            json!({"$ref": format!("#/definitions/{model}List")}),
        )
    } else {
        (json!({"type": "object"}), json!({"type": "object"}))
    };
    let status = json!({"$ref": format!("#/definitions/{META}.Status")});
    let dry_run = query(
        "dryRun",
        "string",
        "When present, indicates that modifications should not be persisted. Valid values are: - All: all dry run stages will be processed",
    );
    let field_manager = query(
        "fieldManager",
        "string",
        "fieldManager is a name associated with the actor or entity that is making these changes.",
    );
    let field_validation = query(
        "fieldValidation",
        "string",
        "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - Ignore - Warn - Strict",
    );
    let force = query(
        "force",
        "boolean",
        "Force is going to \"force\" Apply requests. It means user will re-acquire conflicting fields owned by other people.",
    );
    let body =
        |schema: &Value| json!({"name": "body", "in": "body", "required": true, "schema": schema});
    let op = |action: &str,
              verb: &str,
              sub: &str,
              description: String,
              params: Vec<Value>,
              responses: Value| {
        let consumes = if action == "patch" {
            json!([
                "application/json-patch+json",
                "application/merge-patch+json",
                "application/apply-patch+yaml"
            ])
        } else {
            json!(["application/json", "application/yaml"])
        };
        json!({
            "description": description,
            "consumes": consumes,
            "produces": ["application/json", "application/yaml"],
            "schemes": ["https"],
            "tags": [tag],
            "operationId": format!("{verb}{id_group}{namespaced}{}{}", rt.kind, camel(sub)),
            "parameters": params,
            "responses": responses,
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": gvk(rt, &rt.kind),
        })
    };
    let ok = |schema: &Value| json!({"200": {"description": "OK", "schema": schema}, "401": {"description": "Unauthorized"}});
    let written = |schema: &Value, extra: &str, text: &str| {
        let mut r = ok(schema);
        r[extra] = json!({"description": text, "schema": schema});
        r
    };
    let prefix = if rt.group.is_empty() {
        format!("/api/{}", rt.version)
    } else {
        format!("/apis/{}/{}", rt.group, rt.version)
    };
    let collection = if rt.namespaced {
        format!("{prefix}/namespaces/{{namespace}}/{}", rt.plural)
    } else {
        format!("{prefix}/{}", rt.plural)
    };
    let kind = &rt.kind;
    let article = if kind.starts_with(['A', 'E', 'I', 'O', 'U']) {
        "an"
    } else {
        "a"
    };
    let path_params = |with_name: bool| {
        let mut p = Vec::new();
        if with_name {
            p.push(json!({"uniqueItems": true, "type": "string", "description": format!("name of the {kind}"), "name": "name", "in": "path", "required": true}));
        }
        if rt.namespaced {
            p.push(json!({"uniqueItems": true, "type": "string", "description": "object name and auth scope, such as for teams and projects", "name": "namespace", "in": "path", "required": true}));
        }
        p.push(query(
            "pretty",
            "string",
            "If 'true', then the output is pretty printed.",
        ));
        p
    };
    paths.insert(
        collection.clone(),
        json!({
            "get": op("list", "list", "", format!("list objects of kind {kind}"), vec![], ok(&list)),
            "post": op("post", "create", "", format!("create {article} {kind}"),
                vec![body(&object), dry_run.clone(), field_manager.clone(), field_validation.clone()],
                written(&written(&object, "201", "Created"), "202", "Accepted")),
            "delete": op("deletecollection", "deletecollection", "", format!("delete collection of {kind}"), vec![], ok(&status)),
            "parameters": path_params(false),
        }),
    );
    if rt.namespaced {
        let all = op(
            "list",
            "list",
            "",
            format!("list objects of kind {kind}"),
            vec![],
            ok(&list),
        );
        let mut all = all;
        all["operationId"] = json!(format!("list{id_group}{kind}ForAllNamespaces"));
        paths.insert(
            format!("{prefix}/{}", rt.plural),
            json!({"get": all, "parameters": [query("pretty", "string", "If 'true', then the output is pretty printed.")]}),
        );
    }
    let mut subs = vec![""];
    if rt.status_subresource {
        subs.push("status");
    }
    for sub in subs {
        let (path, of) = if sub.is_empty() {
            (format!("{collection}/{{name}}"), String::new())
        } else {
            (format!("{collection}/{{name}}/{sub}"), format!(" {sub} of"))
        };
        let patch_body = json!({"name": "body", "in": "body", "required": true, "schema": {"$ref": format!("#/definitions/{META}.Patch")}});
        let mut item = json!({
            "get": op("get", "read", sub, format!("read{of} the specified {kind}"), vec![], ok(&object)),
            "put": op("put", "replace", sub, format!("replace{of} the specified {kind}"),
                vec![body(&object), dry_run.clone(), field_manager.clone(), field_validation.clone()],
                written(&object, "201", "Created")),
            "patch": op("patch", "patch", sub, format!("partially update{of} the specified {kind}"),
                vec![patch_body, dry_run.clone(), field_manager.clone(), field_validation.clone(), force.clone()],
                ok(&object)),
            "parameters": path_params(true),
        });
        if sub.is_empty() {
            let delete_body = json!({"name": "body", "in": "body", "schema": {"$ref": format!("#/definitions/{META}.DeleteOptions")}});
            item["delete"] = op(
                "delete",
                "delete",
                sub,
                format!("delete {article} {kind}"),
                vec![delete_body, dry_run.clone()],
                written(&status, "202", "Accepted"),
            );
        }
        paths.insert(path, item);
    }
}
