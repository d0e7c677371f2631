//! OpenAPI documents of custom resources, and `/openapi/v2`.
//!
//! `/openapi/v2` is the Swagger 2.0 document that clients older than OpenAPI v3 support read
//! (kubectl up to 1.2x fetches it for `apply`, `explain --output=plaintext-openapiv2` and
//! client-side validation), as JSON or as the gnostic protobuf that kubectl asks for
//! (`application/com.github.proto-openapi.spec.v2@v1.0+protobuf`).
//!
//! Custom resources are described as kube-apiserver's apiextensions builder describes them,
//! with `apiVersion`, `kind` and a `metadata` reference to `ObjectMeta` (whose `meta/v1`
//! definitions are served alongside): in v2 the CRD schema converted (no `nullable`,
//! junctors or defaults; nullable fields lose their type and children), in v3 as written
//! with `x-kubernetes-int-or-string` unfolded ([`v3_schemas`], used by the v3 documents). v2
//! paths carry the `fieldValidation` parameter and each operation's
//! `x-kubernetes-group-version-kind`. Built-in kinds have paths but no definitions, so
//! kubectl falls back to its compiled-in types for them, as with v3.

mod paths;
mod proto;

use std::sync::OnceLock;

use serde_json::{Map, Value, json};

use crate::discovery::{MAJOR, MINOR};
use crate::resources::{Registry, ResourceType};

/// Content type of the protobuf encoding, as the API server answers it.
pub const PROTOBUF_CONTENT_TYPE: &str =
    "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

/// The definitions from `meta/v1` that custom resource definitions refer to (`ObjectMeta`,
/// `ListMeta`, `Status`, `DeleteOptions`, `Patch` and theirs), as kube-apiserver serves them.
const META_DEFINITIONS: &str = include_str!("openapi/meta.json");

const META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1";

/// How `/openapi/v2` answers a request with this `Accept` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoding {
    /// `application/json`.
    Json,
    /// The gnostic `openapi.v2.Document` protobuf.
    Protobuf,
}

/// Picks the encoding as kube-openapi does: the clauses of `Accept` in order of preference
/// (`q`), the first that matches JSON or one of the two protobuf spellings wins; `None` means
/// 406 Not Acceptable. An empty header accepts anything (JSON).
pub fn negotiate(accept: &str) -> Option<Encoding> {
    let accept = if accept.trim().is_empty() {
        "*/*"
    } else {
        accept
    };
    let mut clauses: Vec<(f64, &str, &str)> = accept
        .split(',')
        .filter_map(|clause| {
            let mut parts = clause.split(';').map(str::trim);
            let (ty, sub) = parts.next()?.split_once('/')?;
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f64>().ok())
                .unwrap_or(1.0);
            Some((q, ty, sub))
        })
        .collect();
    // Preferred first; among equals, specific types before wildcards (as goautoneg sorts).
    let wildcards = |ty: &str, sub: &str| usize::from(ty == "*") + usize::from(sub == "*");
    clauses.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then_with(|| wildcards(a.1, a.2).cmp(&wildcards(b.1, b.2)))
    });
    let offered = [
        ("json", Encoding::Json),
        (
            "com.github.proto-openapi.spec.v2@v1.0+protobuf",
            Encoding::Protobuf,
        ),
        (
            "com.github.proto-openapi.spec.v2.v1.0+protobuf",
            Encoding::Protobuf,
        ),
    ];
    clauses
        .iter()
        .filter(|(q, _, _)| *q > 0.0)
        .find_map(|(_, ty, sub)| {
            offered
                .iter()
                .find(|(s, _)| (*ty == "application" || *ty == "*") && (sub == s || *sub == "*"))
                .map(|(_, e)| e.clone())
        })
}

/// The document, encoded: `(content type, body)`.
pub fn encode(reg: &Registry, encoding: &Encoding) -> (&'static str, Vec<u8>) {
    let doc = document(reg);
    match encoding {
        Encoding::Json => (
            "application/json",
            serde_json::to_vec(&doc).unwrap_or_default(),
        ),
        Encoding::Protobuf => (PROTOBUF_CONTENT_TYPE, proto::document(&doc)),
    }
}

fn meta_definitions() -> &'static Map<String, Value> {
    static DEFS: OnceLock<Map<String, Value>> = OnceLock::new();
    DEFS.get_or_init(|| serde_json::from_str(META_DEFINITIONS).unwrap_or_default())
}

/// The Swagger 2.0 document of everything the registry serves.
pub fn document(reg: &Registry) -> Value {
    let mut paths = Map::new();
    let mut definitions = meta_definitions().clone();
    for rt in reg.all() {
        let model = model_name(rt);
        if let Some(raw) = &rt.raw_schema {
            definitions.insert(model.clone(), kind_definition(rt, raw, true));
            definitions.insert(format!("{model}List"), list_definition(rt, &model));
        }
        paths::add_paths(&mut paths, rt, &model);
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": format!("v{MAJOR}.{MINOR}.0")},
        "paths": paths,
        "definitions": definitions,
        "securityDefinitions": {"BearerToken": {
            "description": "Bearer Token authentication", "type": "apiKey",
            "name": "authorization", "in": "header",
        }},
        "security": [{"BearerToken": []}],
    })
}

/// `dev.mailfleet.v1alpha1.RelayPool`: the group's labels reversed, as kube-openapi names
/// custom resource models.
pub fn model_name(rt: &ResourceType) -> String {
    let group = if rt.group.is_empty() {
        "io.k8s.api.core".to_string()
    } else {
        rt.group.split('.').rev().collect::<Vec<_>>().join(".")
    };
    format!("{group}.{}.{}", rt.version, rt.kind)
}

fn gvk(rt: &ResourceType, kind: &str) -> Value {
    json!({"group": rt.group, "version": rt.version, "kind": kind})
}

fn type_meta_property(name: &str) -> Value {
    let description = if name == "apiVersion" {
        "APIVersion defines the versioned schema of this representation of an object. Servers should convert recognized schemas to the latest internal value, and may reject unrecognized values. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources"
    } else {
        "Kind is a string value representing the REST resource this object represents. Servers may infer this from the endpoint the client submits requests to. Cannot be updated. In CamelCase. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"
    };
    json!({"description": description, "type": "string"})
}

/// A custom resource's schema with `apiVersion`, `kind` and `metadata` (a reference to
/// `ObjectMeta`) and its kind: for v2 converted and without defaults, for v3 as the CRD
/// says with `x-kubernetes-int-or-string` unfolded (references still in the v2 form).
fn kind_definition(rt: &ResourceType, raw: &Value, v2: bool) -> Value {
    let mut schema = raw.clone();
    if v2 && schema["x-kubernetes-preserve-unknown-fields"] == json!(true) {
        // kubectl would refuse every field but apiVersion, kind and metadata otherwise.
        schema = json!({"type": "object"});
    } else {
        if v2 {
            to_v2(&mut schema);
            prune_defaults(&mut schema);
        } else {
            unfold_int_or_string(&mut schema);
        }
        if let Some(obj) = schema.as_object_mut() {
            let props = obj.entry("properties").or_insert_with(|| json!({}));
            props["apiVersion"] = type_meta_property("apiVersion");
            props["kind"] = type_meta_property("kind");
            props["metadata"] = json!({
                "description": "Standard object's metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata",
                "$ref": format!("#/definitions/{META}.ObjectMeta"),
            });
        }
    }
    schema["x-kubernetes-group-version-kind"] = json!([gvk(rt, &rt.kind)]);
    schema
}

fn list_definition(rt: &ResourceType, model: &str) -> Value {
    let list_kind = format!("{}List", rt.kind);
    json!({
        "description": format!("{list_kind} is a list of {}", rt.kind),
        "type": "object",
        "required": ["items"],
        "properties": {
            "apiVersion": type_meta_property("apiVersion"),
            "items": {
                "description": format!("List of {}. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md", rt.plural),
                "type": "array",
                "items": {"$ref": format!("#/definitions/{model}")},
            },
            "kind": type_meta_property("kind"),
            "metadata": {
                "description": "Standard list metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds",
                "$ref": format!("#/definitions/{META}.ListMeta"),
            },
        },
        "x-kubernetes-group-version-kind": [gvk(rt, &list_kind)],
    })
}

/// The `components.schemas` of an OpenAPI v3 group/version document: each custom
/// resource's schema and list, and the `meta/v1` schemas they refer to.
pub fn v3_schemas<'a>(types: impl IntoIterator<Item = &'a ResourceType>) -> Map<String, Value> {
    let mut schemas = Map::new();
    for rt in types {
        if let Some(raw) = &rt.raw_schema {
            let model = model_name(rt);
            schemas.insert(model.clone(), to_v3_refs(&kind_definition(rt, raw, false)));
            let list = to_v3_refs(&list_definition(rt, &model));
            schemas.insert(format!("{model}List"), list);
        }
    }
    if !schemas.is_empty() {
        for (name, schema) in meta_definitions() {
            schemas.insert(name.clone(), to_v3_refs(schema));
        }
    }
    schemas
}

/// `#/definitions/X` becomes `#/components/schemas/X`; a reference with siblings (a
/// description) moves into `allOf`, as kube-openapi writes v3.
fn to_v3_refs(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut out: Map<String, Value> = map
                .iter()
                .map(|(k, v)| (k.clone(), to_v3_refs(v)))
                .collect();
            if let Some(Value::String(r)) = out.remove("$ref") {
                let r = r.replace("#/definitions/", "#/components/schemas/");
                if out.is_empty() {
                    out.insert("$ref".into(), json!(r));
                } else {
                    out.insert("allOf".into(), json!([{"$ref": r}]));
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(to_v3_refs).collect()),
        other => other.clone(),
    }
}

/// The structural schema's `Unfold`: `x-kubernetes-int-or-string` without an `anyOf` gets
/// `anyOf: [{type: integer}, {type: string}]`.
fn unfold_int_or_string(s: &mut Value) {
    let Some(obj) = s.as_object_mut() else {
        return;
    };
    if obj.get("x-kubernetes-int-or-string") == Some(&json!(true)) && !obj.contains_key("anyOf") {
        obj.insert(
            "anyOf".into(),
            json!([{"type": "integer"}, {"type": "string"}]),
        );
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = obj.get_mut(key) {
            unfold_int_or_string(child);
        }
    }
    if let Some(props) = obj.get_mut("properties").and_then(Value::as_object_mut) {
        props.values_mut().for_each(unfold_int_or_string);
    }
}

/// kube-apiserver's `ToStructuralOpenAPIV2`, on a raw schema: junctors go, nullable fields
/// lose `type`, `items` and `properties` (and are no longer required), fields that keep
/// unknown fields lose their children, arrays without items and objects that preserve
/// unknown fields lose their type.
fn to_v2(s: &mut Value) {
    let Some(obj) = s.as_object_mut() else {
        return;
    };
    for junctor in ["allOf", "oneOf", "anyOf", "not"] {
        obj.remove(junctor);
    }
    if obj.remove("nullable") == Some(json!(true)) {
        obj.remove("type");
        obj.remove("items");
        obj.remove("properties");
    }
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    if preserve {
        obj.remove("items");
        obj.remove("properties");
    }
    let ty = obj.get("type").and_then(Value::as_str).map(str::to_string);
    if (ty.as_deref() == Some("array") && !obj.contains_key("items"))
        || (preserve && ty.as_deref() == Some("object"))
    {
        obj.remove("type");
    }
    let nullable_props: Vec<String> = obj
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| {
            p.iter()
                .filter(|(_, v)| v["nullable"] == json!(true))
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    if let Some(required) = obj.get_mut("required").and_then(Value::as_array_mut) {
        required.retain(|r| {
            !r.as_str()
                .is_some_and(|r| nullable_props.iter().any(|p| p == r))
        });
    }
    if obj
        .get("additionalProperties")
        .is_some_and(|a| a["nullable"] == json!(true))
    {
        obj.remove("required");
    }
    if obj
        .get("required")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
    {
        obj.remove("required");
    }
    if let Some(items) = obj.get_mut("items") {
        to_v2(items);
    }
    if let Some(props) = obj.get_mut("properties").and_then(Value::as_object_mut) {
        props.values_mut().for_each(to_v2);
    }
    if let Some(additional) = obj.get_mut("additionalProperties") {
        to_v2(additional);
    }
}

/// Defaults are pruned from the published v2 definitions, as kube-apiserver does.
fn prune_defaults(s: &mut Value) {
    let Some(obj) = s.as_object_mut() else {
        return;
    };
    obj.remove("default");
    for key in ["items", "additionalProperties"] {
        if let Some(child) = obj.get_mut(key) {
            prune_defaults(child);
        }
    }
    if let Some(props) = obj.get_mut("properties").and_then(Value::as_object_mut) {
        props.values_mut().for_each(prune_defaults);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_kube_openapi() {
        let pb = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";
        assert_eq!(negotiate(pb), Some(Encoding::Protobuf));
        assert_eq!(negotiate(PROTOBUF_CONTENT_TYPE), Some(Encoding::Protobuf));
        assert_eq!(negotiate(""), Some(Encoding::Json));
        assert_eq!(negotiate("application/json, */*"), Some(Encoding::Json));
        assert_eq!(
            negotiate(&format!("application/json;q=0.5, {pb}")),
            Some(Encoding::Protobuf)
        );
        assert_eq!(negotiate(&format!("*/*, {pb}")), Some(Encoding::Protobuf));
        assert_eq!(negotiate("text/html"), None);
    }

    #[test]
    fn serves_the_meta_definitions_custom_resources_refer_to() {
        let defs = meta_definitions();
        for name in ["ObjectMeta", "ListMeta", "Status", "DeleteOptions", "Patch"] {
            assert!(defs.contains_key(&format!("{META}.{name}")), "{name}");
        }
    }

    /// The payload of the first field `tag` of a message.
    fn field(message: &[u8], tag: u32) -> Vec<u8> {
        proto::fields(message)
            .into_iter()
            .find(|(t, _, _)| *t == tag)
            .map(|(_, _, payload)| payload)
            .unwrap_or_default()
    }

    #[test]
    fn protobuf_follows_the_gnostic_field_numbers() {
        let doc = json!({
            "swagger": "2.0",
            "info": {"title": "Kubernetes", "version": "v1.34.0"},
            "paths": {"/x": {"get": {"operationId": "readX", "x-kubernetes-action": "get"}}},
            "definitions": {"D": {
                "type": "object", "required": ["a"], "additionalProperties": false,
                "properties": {"a": {"type": "integer", "minimum": 1.0, "maxLength": 3}},
            }},
        });
        let pb = proto::document(&doc);
        assert_eq!(field(&pb, 1), b"2.0");
        assert_eq!(field(&field(&pb, 2), 1), b"Kubernetes");
        // paths: NamedPathItem{name, PathItem{get: Operation{operation_id, vendor_extension}}}
        let item = field(&field(&pb, 8), 2);
        assert_eq!(field(&item, 1), b"/x");
        let get = field(&field(&item, 2), 2);
        assert_eq!(field(&get, 5), b"readX");
        let ext = field(&get, 13);
        assert_eq!(field(&ext, 1), b"x-kubernetes-action");
        assert_eq!(field(&field(&ext, 2), 2), b"get\n");
        // definitions: NamedSchema{name, Schema{type, required, additionalProperties, properties}}
        let named = field(&field(&pb, 9), 1);
        assert_eq!(field(&named, 1), b"D");
        let schema = field(&named, 2);
        assert_eq!(field(&field(&schema, 22), 1), b"object");
        assert_eq!(field(&schema, 19), b"a");
        let additional = proto::fields(&field(&schema, 21));
        assert_eq!(additional, vec![(2, 0, 0u64.to_le_bytes().to_vec())]);
        let a = field(&field(&field(&schema, 25), 1), 2);
        assert_eq!(field(&a, 9), 1.0f64.to_le_bytes());
        assert_eq!(field(&a, 11), 3u64.to_le_bytes());
    }

    #[test]
    fn nullable_fields_lose_type_and_children_and_are_not_required() {
        let mut s = json!({
            "type": "object", "required": ["a", "b"],
            "properties": {
                "a": {"type": "object", "nullable": true, "properties": {"x": {"type": "string"}}},
                "b": {"type": "array", "x-kubernetes-preserve-unknown-fields": true, "items": {"type": "string"}},
                "c": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": true, "default": 1},
            },
        });
        to_v2(&mut s);
        prune_defaults(&mut s);
        assert_eq!(
            s,
            json!({
                "type": "object", "required": ["b"],
                "properties": {
                    "a": {},
                    "b": {"x-kubernetes-preserve-unknown-fields": true},
                    "c": {"x-kubernetes-int-or-string": true},
                },
            })
        );
    }
}
