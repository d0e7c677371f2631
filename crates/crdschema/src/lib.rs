//! Kubernetes structural-schema validation, defaulting, pruning and CEL rules for custom
//! resources, without an API server.
//!
//! An API server runs three steps on every write of a custom resource: it prunes fields the
//! schema does not know, fills in schema defaults, then validates the object against the
//! OpenAPI v3 schema and its `x-kubernetes-validations` CEL rules. [`Schema`] does the same
//! for one CRD version, so that devcluster (the API server emulator) and the tests refuse
//! exactly what a real cluster refuses, with messages shaped like the API server's
//! (`spec.replicas: Invalid value: -1: spec.replicas in body should be greater than or equal
//! to 0`).
//!
//! CEL evaluation comes from kube-cel (the Kubernetes CEL libraries: lists, strings, ip,
//! quantity...). Everything else (types, bounds, patterns, enums, required fields, list-map
//! keys) is checked here.

use std::collections::{BTreeMap, BTreeSet};

use kube_cel::{CompiledSchema, ErrorKind, Validator, compile_schema, estimate_rule_cost};
use regex::Regex;
use serde_json::{Map, Value};

/// Errors of compiling a schema.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// A `pattern` is not a valid regular expression.
    #[error("invalid pattern {pattern:?} at {path}")]
    Pattern {
        /// Where in the schema.
        path: String,
        /// The pattern.
        pattern: String,
        /// The regex error.
        #[source]
        source: regex::Error,
    },
    /// A CEL rule does not compile.
    #[error("invalid x-kubernetes-validations rule: {message}")]
    Cel {
        /// The compiler's message.
        message: String,
    },
    /// The schema is not structural (a node without a type, or a non-object root).
    #[error("schema is not structural: {path}: {reason}")]
    NotStructural {
        /// Where in the schema.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The `metav1.CauseType` of a field error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldErrorReason {
    /// A required field is missing.
    Required,
    /// The value is malformed or out of bounds.
    Invalid,
    /// The value is not one of the enumerated values.
    NotSupported,
    /// A list item repeats a key that must be unique.
    Duplicate,
    /// A string is too long.
    TooLong,
    /// A list or map has too many entries.
    TooMany,
    /// The value is of the wrong JSON type.
    TypeInvalid,
    /// The field may not be set (unknown field in strict mode).
    Forbidden,
}

impl FieldErrorReason {
    /// The `metav1.CauseType` spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            FieldErrorReason::Required => "FieldValueRequired",
            FieldErrorReason::Invalid => "FieldValueInvalid",
            FieldErrorReason::NotSupported => "FieldValueNotSupported",
            FieldErrorReason::Duplicate => "FieldValueDuplicate",
            FieldErrorReason::TooLong => "FieldValueTooLong",
            FieldErrorReason::TooMany => "FieldValueTooMany",
            FieldErrorReason::TypeInvalid => "FieldValueTypeInvalid",
            FieldErrorReason::Forbidden => "FieldValueForbidden",
        }
    }
}

/// One refused field, as the API server reports it in `details.causes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.egress.cidrs[0]`.
    pub field: String,
    /// The kind of error.
    pub reason: FieldErrorReason,
    /// The complete message, beginning with the field path.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, Default)]
struct Node {
    type_: Option<String>,
    nullable: bool,
    properties: BTreeMap<String, Node>,
    required: Vec<String>,
    additional: Option<Box<Node>>,
    items: Option<Box<Node>>,
    enum_values: Option<Vec<Value>>,
    minimum: Option<f64>,
    maximum: Option<f64>,
    exclusive_minimum: bool,
    exclusive_maximum: bool,
    min_length: Option<u64>,
    max_length: Option<u64>,
    pattern: Option<(String, Regex)>,
    min_items: Option<u64>,
    max_items: Option<u64>,
    max_properties: Option<u64>,
    default: Option<Value>,
    preserve_unknown: bool,
    int_or_string: bool,
    embedded: bool,
    list_type: Option<String>,
    list_map_keys: Vec<String>,
    all_of: Vec<Node>,
    any_of: Vec<Node>,
    one_of: Vec<Node>,
}

/// A compiled `openAPIV3Schema` of one CRD version.
pub struct Schema {
    root: Node,
    cel: CompiledSchema,
    validator: Validator,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema").finish_non_exhaustive()
    }
}

impl Schema {
    /// Compiles an `openAPIV3Schema` (the value under
    /// `spec.versions[].schema.openAPIV3Schema` of a CRD).
    pub fn compile(open_api_v3_schema: &Value) -> Result<Schema, CompileError> {
        let root = compile_node(open_api_v3_schema, "openAPIV3Schema", true)?;
        if root.type_.as_deref() != Some("object") {
            return Err(CompileError::NotStructural {
                path: "openAPIV3Schema".to_owned(),
                reason: "the root must be of type object".to_owned(),
            });
        }
        let cel = compile_schema(open_api_v3_schema);
        let mut problems = Vec::new();
        collect_cel_errors(&cel, &mut problems);
        if !problems.is_empty() {
            return Err(CompileError::Cel {
                message: problems.join("; "),
            });
        }
        Ok(Schema {
            root,
            cel,
            validator: Validator::new(),
        })
    }

    /// Fills in schema defaults where fields are missing (or null and not nullable),
    /// recursively, as the API server does on every write.
    pub fn apply_defaults(&self, object: &mut Value) {
        default_node(&self.root, object);
    }

    /// Drops fields the schema does not declare (except under
    /// `x-kubernetes-preserve-unknown-fields`); `apiVersion`, `kind` and `metadata` of the
    /// object itself are kept.
    pub fn prune(&self, object: &mut Value) {
        prune_node(&self.root, object, true);
    }

    /// Validates an object (already pruned and defaulted) against the schema and its CEL
    /// rules. Transition rules (those using `oldSelf`) run only when `old` is given.
    pub fn validate(&self, object: &Value, old: Option<&Value>) -> Vec<FieldError> {
        let mut errors = Vec::new();
        for (key, node) in &self.root.properties {
            if key == "metadata" || key == "apiVersion" || key == "kind" {
                continue;
            }
            if let Some(value) = object.get(key) {
                validate_node(node, value, key, &mut errors);
            } else if self.root.required.contains(key) {
                errors.push(required(key));
            }
        }
        // CEL rules assume a well-typed object: after a blocking schema error (wrong type,
        // missing, unsupported, too long, too many) the API server skips them and says so;
        // after other schema errors (bounds, patterns) they still run.
        if errors.iter().any(|e| {
            matches!(
                e.reason,
                FieldErrorReason::NotSupported
                    | FieldErrorReason::Required
                    | FieldErrorReason::TooLong
                    | FieldErrorReason::TooMany
                    | FieldErrorReason::TypeInvalid
            )
        }) {
            errors.push(FieldError {
                field: "<nil>".to_owned(),
                reason: FieldErrorReason::Invalid,
                message: "<nil>: Invalid value: null: some validation rules were not checked \
                          because the object was invalid; correct the existing errors to \
                          complete validation"
                    .to_owned(),
            });
            return errors;
        }
        if let Err(cel_errors) = self.validator.validate_compiled(&self.cel, object, old) {
            for e in cel_errors {
                // A rule of the root object has no path: the API server prints a nil path.
                let field = if e.field_path.is_empty() {
                    "<nil>".to_owned()
                } else {
                    e.field_path.clone()
                };
                let message = match e.kind {
                    // A failed rule shows the value only when it is a scalar (objects and
                    // lists are omitted), as the API server's CEL validator does.
                    ErrorKind::ValidationFailure => match value_at(object, &e.field_path) {
                        Some(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => {
                            format!("{field}: Invalid value: {v}: {}", e.message)
                        }
                        _ => format!("{field}: Invalid value: {}", e.message),
                    },
                    _ => {
                        let shown = value_at(object, &e.field_path)
                            .map(type_word)
                            .unwrap_or("object");
                        format!("{field}: Invalid value: \"{shown}\": {}", e.message)
                    }
                };
                errors.push(FieldError {
                    field,
                    reason: FieldErrorReason::Invalid,
                    message,
                });
            }
        }
        errors
    }

    /// Prunes, defaults and validates in the API server's order. Returns the errors; the
    /// object is left pruned and defaulted.
    pub fn admit(&self, object: &mut Value, old: Option<&Value>) -> Vec<FieldError> {
        self.prune(object);
        self.apply_defaults(object);
        self.validate(object, old)
    }
}

/// The static check a real API server makes on CEL rules when a CRD is created: each rule's
/// estimated cost must fit the budget, which needs `maxItems`/`maxLength` bounds on what it
/// iterates. Returns one line per problem, naming the schema path and the rule.
pub fn analyze_rules(open_api_v3_schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    analyze_node(open_api_v3_schema, "openAPIV3Schema", &mut out);
    out
}

fn analyze_node(schema: &Value, path: &str, out: &mut Vec<String>) {
    let Some(obj) = schema.as_object() else {
        return;
    };
    if let Some(rules) = obj
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        let compiled = compile_schema(schema);
        for rule in rules
            .iter()
            .filter_map(|r| r.get("rule").and_then(Value::as_str))
        {
            for w in estimate_rule_cost(rule, &compiled) {
                out.push(format!("{path}: {rule}: {}", w.message));
            }
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            analyze_node(v, &format!("{path}.{k}"), out);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(v) = obj.get(key) {
            analyze_node(v, &format!("{path}[*]"), out);
        }
    }
}

fn collect_cel_errors(node: &CompiledSchema, out: &mut Vec<String>) {
    for e in node.compilation_errors() {
        out.push(e.to_string());
    }
    for child in node.properties.values() {
        collect_cel_errors(child, out);
    }
    for child in node.items.iter().chain(node.additional_properties.iter()) {
        collect_cel_errors(child, out);
    }
    for child in node.all_of.iter().chain(&node.one_of).chain(&node.any_of) {
        collect_cel_errors(child, out);
    }
}

fn compile_node(schema: &Value, path: &str, needs_type: bool) -> Result<Node, CompileError> {
    let mut node = Node::default();
    let obj = match schema.as_object() {
        Some(o) => o,
        None => return Ok(node),
    };
    node.type_ = obj.get("type").and_then(Value::as_str).map(str::to_owned);
    node.nullable = flag(obj, "nullable");
    node.preserve_unknown = flag(obj, "x-kubernetes-preserve-unknown-fields");
    node.int_or_string = flag(obj, "x-kubernetes-int-or-string");
    node.embedded = flag(obj, "x-kubernetes-embedded-resource");
    if needs_type && node.type_.is_none() && !node.int_or_string && !node.preserve_unknown {
        return Err(CompileError::NotStructural {
            path: path.to_owned(),
            reason: "type is missing".to_owned(),
        });
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            node.properties
                .insert(k.clone(), compile_node(v, &format!("{path}.{k}"), true)?);
        }
    }
    node.required = obj
        .get("required")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if let Some(ap) = obj.get("additionalProperties").filter(|v| v.is_object()) {
        node.additional = Some(Box::new(compile_node(ap, &format!("{path}[*]"), true)?));
    }
    if let Some(items) = obj.get("items").filter(|v| v.is_object()) {
        node.items = Some(Box::new(compile_node(items, &format!("{path}[*]"), true)?));
    }
    node.enum_values = obj.get("enum").and_then(Value::as_array).cloned();
    node.minimum = obj.get("minimum").and_then(Value::as_f64);
    node.maximum = obj.get("maximum").and_then(Value::as_f64);
    node.exclusive_minimum = flag(obj, "exclusiveMinimum");
    node.exclusive_maximum = flag(obj, "exclusiveMaximum");
    node.min_length = obj.get("minLength").and_then(Value::as_u64);
    node.max_length = obj.get("maxLength").and_then(Value::as_u64);
    node.min_items = obj.get("minItems").and_then(Value::as_u64);
    node.max_items = obj.get("maxItems").and_then(Value::as_u64);
    node.max_properties = obj.get("maxProperties").and_then(Value::as_u64);
    if let Some(p) = obj.get("pattern").and_then(Value::as_str) {
        let re = Regex::new(p).map_err(|source| CompileError::Pattern {
            path: path.to_owned(),
            pattern: p.to_owned(),
            source,
        })?;
        node.pattern = Some((p.to_owned(), re));
    }
    node.default = obj.get("default").cloned();
    node.list_type = obj
        .get("x-kubernetes-list-type")
        .and_then(Value::as_str)
        .map(str::to_owned);
    node.list_map_keys = obj
        .get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    for (key, target) in [
        ("allOf", &mut node.all_of),
        ("anyOf", &mut node.any_of),
        ("oneOf", &mut node.one_of),
    ] {
        if let Some(list) = obj.get(key).and_then(Value::as_array) {
            for s in list {
                target.push(compile_node(s, path, false)?);
            }
        }
    }
    Ok(node)
}

fn flag(obj: &Map<String, Value>, key: &str) -> bool {
    obj.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn default_node(node: &Node, value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, child) in &node.properties {
                let missing = match map.get(key) {
                    None => true,
                    Some(Value::Null) => !child.nullable,
                    Some(_) => false,
                };
                if missing && let Some(d) = &child.default {
                    map.insert(key.clone(), d.clone());
                }
                if let Some(v) = map.get_mut(key) {
                    default_node(child, v);
                }
            }
            if let Some(add) = &node.additional {
                for v in map.values_mut() {
                    default_node(add, v);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = &node.items {
                for v in items {
                    default_node(item, v);
                }
            }
        }
        _ => {}
    }
}

fn prune_node(node: &Node, value: &mut Value, is_root: bool) {
    match value {
        Value::Object(map) => {
            if node.properties.is_empty() && node.additional.is_none() {
                if node.preserve_unknown {
                    return;
                }
                if node.type_.as_deref() == Some("object") && !node.embedded {
                    map.clear();
                    return;
                }
            }
            let keep_meta = is_root || node.embedded;
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                if keep_meta
                    && (key == "apiVersion" || key == "kind" || key == "metadata")
                    && (key != "metadata" || is_root || !node.properties.contains_key("metadata"))
                {
                    continue;
                }
                if let Some(child) = node.properties.get(&key) {
                    if let Some(v) = map.get_mut(&key) {
                        prune_node(child, v, false);
                    }
                } else if let Some(add) = &node.additional {
                    if let Some(v) = map.get_mut(&key) {
                        prune_node(add, v, false);
                    }
                } else if !node.preserve_unknown {
                    map.remove(&key);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = &node.items {
                for v in items {
                    prune_node(item, v, false);
                }
            }
        }
        _ => {}
    }
}

fn required(path: &str) -> FieldError {
    FieldError {
        field: path.to_owned(),
        reason: FieldErrorReason::Required,
        message: format!("{path}: Required value"),
    }
}

fn invalid(path: &str, value: &Value, detail: &str) -> FieldError {
    FieldError {
        field: path.to_owned(),
        reason: FieldErrorReason::Invalid,
        message: format!("{path}: Invalid value: {}: {detail}", show(value)),
    }
}

fn show(value: &Value) -> String {
    match value {
        Value::Object(_) => "\"object\"".to_owned(),
        Value::Array(_) => "\"array\"".to_owned(),
        other => other.to_string(),
    }
}

fn type_word(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Finds the value at a field path like `spec.egress.cidrs[0]`.
fn value_at<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = root;
    for part in path.split('.') {
        let (name, rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            cur = cur.get(name)?;
        }
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            let idx = idx.trim_end_matches(']');
            cur = match idx.parse::<usize>() {
                Ok(i) => cur.get(i)?,
                Err(_) => cur.get(idx.trim_matches('"'))?,
            };
        }
    }
    Some(cur)
}

fn type_matches(node: &Node, value: &Value) -> bool {
    if node.int_or_string {
        return value.is_string() || value.is_i64() || value.is_u64();
    }
    match node.type_.as_deref() {
        None => true,
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some(_) => true,
    }
}

fn validate_node(node: &Node, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    if value.is_null() {
        if !node.nullable && !node.preserve_unknown {
            errors.push(FieldError {
                field: path.to_owned(),
                reason: FieldErrorReason::TypeInvalid,
                message: format!(
                    "{path}: Invalid value: \"null\": {path} in body must be of type {}: \"null\"",
                    node.type_.as_deref().unwrap_or("object")
                ),
            });
        }
        return;
    }
    if !type_matches(node, value) {
        let want = node.type_.as_deref().unwrap_or("integer or string");
        errors.push(FieldError {
            field: path.to_owned(),
            reason: FieldErrorReason::TypeInvalid,
            message: format!(
                "{path}: Invalid value: \"{}\": {path} in body must be of type {want}: \"{}\"",
                type_word(value),
                type_word(value)
            ),
        });
        return;
    }
    if let Some(allowed) = &node.enum_values
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        errors.push(FieldError {
            field: path.to_owned(),
            reason: FieldErrorReason::NotSupported,
            message: format!(
                "{path}: Unsupported value: {}: supported values: {}",
                value,
                list.join(", ")
            ),
        });
    }
    match value {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if let Some(min) = node.minimum {
                let bad = if node.exclusive_minimum {
                    x <= min
                } else {
                    x < min
                };
                if bad {
                    let rel = if node.exclusive_minimum {
                        "greater than"
                    } else {
                        "greater than or equal to"
                    };
                    errors.push(invalid(
                        path,
                        value,
                        &format!("{path} in body should be {rel} {}", num(min)),
                    ));
                }
            }
            if let Some(max) = node.maximum {
                let bad = if node.exclusive_maximum {
                    x >= max
                } else {
                    x > max
                };
                if bad {
                    let rel = if node.exclusive_maximum {
                        "less than"
                    } else {
                        "less than or equal to"
                    };
                    errors.push(invalid(
                        path,
                        value,
                        &format!("{path} in body should be {rel} {}", num(max)),
                    ));
                }
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as u64;
            if let Some(max) = node.max_length
                && len > max
            {
                errors.push(FieldError {
                    field: path.to_owned(),
                    reason: FieldErrorReason::TooLong,
                    message: format!("{path}: Too long: may not be more than {max} bytes"),
                });
            }
            if let Some(min) = node.min_length
                && len < min
            {
                errors.push(invalid(
                    path,
                    value,
                    &format!("{path} in body should be at least {min} chars long"),
                ));
            }
            if let Some((pattern, re)) = &node.pattern
                && !re.is_match(s)
            {
                errors.push(invalid(
                    path,
                    value,
                    &format!("{path} in body should match '{pattern}'"),
                ));
            }
        }
        Value::Array(items) => {
            let count = items.len() as u64;
            if let Some(max) = node.max_items
                && count > max
            {
                errors.push(FieldError {
                    field: path.to_owned(),
                    reason: FieldErrorReason::TooMany,
                    message: format!("{path}: Too many: {count}: must have at most {max} items"),
                });
            }
            if let Some(min) = node.min_items
                && count < min
            {
                errors.push(invalid(
                    path,
                    value,
                    &format!("{path} in body should have at least {min} items"),
                ));
            }
            if let Some(item) = &node.items {
                for (i, v) in items.iter().enumerate() {
                    validate_node(item, v, &format!("{path}[{i}]"), errors);
                }
            }
            check_list_uniqueness(node, items, path, errors);
        }
        Value::Object(map) => {
            if let Some(max) = node.max_properties
                && map.len() as u64 > max
            {
                errors.push(FieldError {
                    field: path.to_owned(),
                    reason: FieldErrorReason::TooMany,
                    message: format!(
                        "{path}: Too many: {}: must have at most {max} items",
                        map.len()
                    ),
                });
            }
            for key in &node.required {
                if map.get(key).is_none_or(Value::is_null)
                    && !node.properties.get(key).is_some_and(|n| n.nullable)
                {
                    errors.push(required(&format!("{path}.{key}")));
                }
            }
            for (key, v) in map {
                if let Some(child) = node.properties.get(key) {
                    validate_node(child, v, &format!("{path}.{key}"), errors);
                } else if let Some(add) = &node.additional {
                    validate_node(add, v, &format!("{path}[{key}]"), errors);
                }
            }
        }
        _ => {}
    }
    for sub in &node.all_of {
        validate_node(sub, value, path, errors);
    }
    if !node.any_of.is_empty() {
        let ok = node.any_of.iter().any(|sub| {
            let mut e = Vec::new();
            validate_node(sub, value, path, &mut e);
            e.is_empty()
        });
        if !ok {
            errors.push(invalid(
                path,
                value,
                &format!("{path} in body must match at least one schema in anyOf"),
            ));
        }
    }
    if !node.one_of.is_empty() {
        let matching = node
            .one_of
            .iter()
            .filter(|sub| {
                let mut e = Vec::new();
                validate_node(sub, value, path, &mut e);
                e.is_empty()
            })
            .count();
        if matching != 1 {
            errors.push(invalid(
                path,
                value,
                &format!("{path} in body must match exactly one schema in oneOf"),
            ));
        }
    }
}

fn check_list_uniqueness(node: &Node, items: &[Value], path: &str, errors: &mut Vec<FieldError>) {
    match node.list_type.as_deref() {
        Some("set") => {
            let mut seen = BTreeSet::new();
            for (i, v) in items.iter().enumerate() {
                if !seen.insert(v.to_string()) {
                    errors.push(FieldError {
                        field: format!("{path}[{i}]"),
                        reason: FieldErrorReason::Duplicate,
                        message: format!("{path}[{i}]: Duplicate value: {v}"),
                    });
                }
            }
        }
        Some("map") if !node.list_map_keys.is_empty() => {
            let mut seen = BTreeSet::new();
            for (i, v) in items.iter().enumerate() {
                let key: Map<String, Value> = node
                    .list_map_keys
                    .iter()
                    .filter_map(|k| v.get(k).map(|x| (k.clone(), x.clone())))
                    .collect();
                let key = Value::Object(key);
                if !seen.insert(key.to_string()) {
                    errors.push(FieldError {
                        field: format!("{path}[{i}]"),
                        reason: FieldErrorReason::Duplicate,
                        message: format!("{path}[{i}]: Duplicate value: {key}"),
                    });
                }
            }
        }
        _ => {}
    }
}

fn num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::compile(&json!({
            "type": "object",
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": {
                    "type": "object",
                    "required": ["name"],
                    "x-kubernetes-validations": [
                        {"rule": "self.replicas <= 5 || self.name == 'big'", "message": "only big may exceed 5"}
                    ],
                    "properties": {
                        "name": {"type": "string", "maxLength": 5, "pattern": "^[a-z]+$"},
                        "replicas": {"type": "integer", "minimum": 0, "default": 1},
                        "mode": {"type": "string", "enum": ["a", "b"], "default": "a"},
                        "tags": {"type": "array", "maxItems": 2, "items": {"type": "string"},
                                 "x-kubernetes-list-type": "set"},
                        "ports": {"type": "array", "x-kubernetes-list-type": "map",
                                  "x-kubernetes-list-map-keys": ["name"],
                                  "items": {"type": "object", "properties": {
                                      "name": {"type": "string"}, "port": {"type": "integer", "default": 80}}}},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                    }
                }
            }
        }))
        .unwrap()
    }

    fn admit(mut obj: Value) -> (Value, Vec<String>) {
        let errs = schema().admit(&mut obj, None);
        (obj, errs.into_iter().map(|e| e.message).collect())
    }

    #[test]
    fn defaults_and_prunes() {
        let (obj, errs) = admit(json!({
            "apiVersion": "x/v1", "kind": "K", "metadata": {"name": "n", "labels": {"a": "b"}},
            "spec": {"name": "ok", "unknown": 1, "ports": [{"name": "p"}], "free": {"x": {"y": 1}}}
        }));
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(obj["spec"]["replicas"], 1);
        assert_eq!(obj["spec"]["mode"], "a");
        assert_eq!(obj["spec"]["ports"][0]["port"], 80);
        assert!(obj["spec"].get("unknown").is_none());
        assert_eq!(obj["spec"]["free"]["x"]["y"], 1);
        assert_eq!(obj["metadata"]["labels"]["a"], "b");
    }

    #[test]
    fn reports_kubernetes_shaped_errors() {
        let (_, errs) = admit(
            json!({"spec": {"name": "TOOLONGNAME", "replicas": -1, "mode": "c",
            "tags": ["x", "x", "y"]}}),
        );
        let all = errs.join("\n");
        assert!(
            all.contains("spec.name: Too long: may not be more than 5 bytes"),
            "{all}"
        );
        assert!(all.contains("spec.name: Invalid value: \"TOOLONGNAME\": spec.name in body should match '^[a-z]+$'"), "{all}");
        assert!(all.contains("spec.replicas: Invalid value: -1: spec.replicas in body should be greater than or equal to 0"), "{all}");
        assert!(
            all.contains("spec.mode: Unsupported value: \"c\": supported values: \"a\", \"b\""),
            "{all}"
        );
        assert!(
            all.contains("spec.tags: Too many: 3: must have at most 2 items"),
            "{all}"
        );
        assert!(
            all.contains("spec.tags[1]: Duplicate value: \"x\""),
            "{all}"
        );
    }

    #[test]
    fn required_type_and_duplicates() {
        let (_, errs) = admit(json!({"spec": {"replicas": "three",
            "ports": [{"name": "a"}, {"name": "a"}]}}));
        let all = errs.join("\n");
        assert!(all.contains("spec.name: Required value"), "{all}");
        assert!(all.contains("spec.replicas: Invalid value: \"string\": spec.replicas in body must be of type integer"), "{all}");
        assert!(
            all.contains("spec.ports[1]: Duplicate value: {\"name\":\"a\"}"),
            "{all}"
        );
    }

    #[test]
    fn runs_cel_rules_after_schema() {
        let (_, errs) = admit(json!({"spec": {"name": "small", "replicas": 9}}));
        assert_eq!(
            errs,
            vec!["spec: Invalid value: only big may exceed 5".to_owned()]
        );
        let (_, errs) = admit(json!({"spec": {"name": "big", "replicas": 9}}));
        assert!(errs.is_empty(), "{errs:?}");
    }

    #[test]
    fn cel_rules_run_after_bound_errors_but_not_after_blocking_ones() {
        // A pattern violation is not blocking: the rule still runs.
        let (_, errs) = admit(json!({"spec": {"name": "Small", "replicas": 9}}));
        assert_eq!(
            errs,
            vec![
                "spec.name: Invalid value: \"Small\": spec.name in body should match '^[a-z]+$'"
                    .to_owned(),
                "spec: Invalid value: only big may exceed 5".to_owned(),
            ]
        );
        // A wrong type is: the rules are skipped, with the API server's note.
        let (_, errs) = admit(json!({"spec": {"name": "small", "replicas": "9"}}));
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(
            errs[1],
            "<nil>: Invalid value: null: some validation rules were not checked because the \
             object was invalid; correct the existing errors to complete validation"
        );
    }

    #[test]
    fn flags_rules_over_unbounded_lists() {
        let unbounded = json!({"type": "object", "properties": {"l": {
            "type": "array", "items": {"type": "string"},
            "x-kubernetes-validations": [{"rule": "self.all(x, self.all(y, x != y || x == y))"}]}}});
        assert!(!analyze_rules(&unbounded).is_empty());
        let bounded = json!({"type": "object", "properties": {"l": {
            "type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 8},
            "x-kubernetes-validations": [{"rule": "self.all(x, self.all(y, x != y || x == y))"}]}}});
        assert_eq!(analyze_rules(&bounded), Vec::<String>::new());
    }

    #[test]
    fn refuses_non_structural_and_bad_rules() {
        assert!(matches!(
            Schema::compile(&json!({"type": "object", "properties": {"x": {}}})),
            Err(CompileError::NotStructural { .. })
        ));
        assert!(matches!(
            Schema::compile(
                &json!({"type": "object", "x-kubernetes-validations": [{"rule": "self.("}]})
            ),
            Err(CompileError::Cel { .. })
        ));
    }
}
