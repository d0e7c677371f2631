//! Encodes a Swagger 2.0 JSON document as gnostic's `openapi.v2.Document` protobuf (field
//! numbers from gnostic-models' `openapiv2/OpenAPIv2.proto`), the form kubectl 1.2x reads.
//! Only what the API server's documents use is encoded: info, paths with their operations,
//! parameters and responses, definitions (schemas), security; vendor extensions (`x-…`),
//! enums, defaults and examples become `Any` values holding YAML, as gnostic writes them.

use serde_json::Value;

/// A protobuf message being written.
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn key(&mut self, tag: u32, wire: u8) {
        self.varint(u64::from(tag) << 3 | u64::from(wire));
    }
    fn bytes(&mut self, tag: u32, b: &[u8]) {
        self.key(tag, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    /// A proto3 string: omitted when empty.
    fn string(&mut self, tag: u32, v: &Value) {
        if let Some(s) = v.as_str().filter(|s| !s.is_empty()) {
            self.bytes(tag, s.as_bytes());
        }
    }
    fn strings(&mut self, tag: u32, v: &Value) {
        for s in v.as_array().into_iter().flatten().filter_map(Value::as_str) {
            self.bytes(tag, s.as_bytes());
        }
    }
    fn boolean(&mut self, tag: u32, v: &Value) {
        if v.as_bool() == Some(true) {
            self.key(tag, 0);
            self.varint(1);
        }
    }
    fn int64(&mut self, tag: u32, v: &Value) {
        if let Some(i) = v.as_i64().or_else(|| v.as_f64().map(|f| f as i64))
            && i != 0
        {
            self.key(tag, 0);
            self.varint(i as u64);
        }
    }
    fn double(&mut self, tag: u32, v: &Value) {
        if let Some(f) = v.as_f64()
            && f != 0.0
        {
            self.key(tag, 1);
            self.0.extend_from_slice(&f.to_le_bytes());
        }
    }
    fn message(&mut self, tag: u32, m: Msg) {
        self.bytes(tag, &m.0);
    }
    /// A repeated message of `(name, value)` pairs: one per key of `obj` that `keep` selects.
    fn named(
        &mut self,
        tag: u32,
        obj: &Value,
        keep: impl Fn(&str) -> bool,
        value: impl Fn(&Value) -> Msg,
    ) {
        for (k, v) in obj.as_object().into_iter().flatten() {
            if keep(k) {
                let mut pair = Msg::default();
                pair.bytes(1, k.as_bytes());
                pair.message(2, value(v));
                self.message(tag, pair);
            }
        }
    }
    /// `repeated NamedAny vendor_extension`: every `x-` key.
    fn extensions(&mut self, tag: u32, obj: &Value) {
        self.named(tag, obj, |k| k.starts_with("x-"), any);
    }
}

/// `Any`: the value as YAML (field 2).
fn any(v: &Value) -> Msg {
    let mut m = Msg::default();
    let yaml = serde_yaml::to_string(v).unwrap_or_default();
    m.bytes(2, yaml.as_bytes());
    m
}

/// `openapi.v2.Document`.
pub fn document(doc: &Value) -> Vec<u8> {
    let mut m = Msg::default();
    m.string(1, &doc["swagger"]);
    if doc["info"].is_object() {
        let mut info = Msg::default();
        info.string(1, &doc["info"]["title"]);
        info.string(2, &doc["info"]["version"]);
        info.string(3, &doc["info"]["description"]);
        m.message(2, info);
    }
    let mut paths = Msg::default();
    paths.extensions(1, &doc["paths"]);
    paths.named(2, &doc["paths"], |k| !k.starts_with("x-"), path_item);
    m.message(8, paths);
    let mut definitions = Msg::default();
    definitions.named(1, &doc["definitions"], |_| true, schema);
    m.message(9, definitions);
    for requirement in doc["security"].as_array().into_iter().flatten() {
        let mut req = Msg::default();
        req.named(
            1,
            requirement,
            |_| true,
            |scopes| {
                let mut array = Msg::default();
                array.strings(1, scopes);
                array
            },
        );
        m.message(12, req);
    }
    if doc["securityDefinitions"].is_object() {
        let mut defs = Msg::default();
        defs.named(
            1,
            &doc["securityDefinitions"],
            |_| true,
            security_definition,
        );
        m.message(13, defs);
    }
    m.extensions(16, doc);
    m.0
}

/// `SecurityDefinitionsItem`: only `apiKey` (`ApiKeySecurity`, field 2) and `basic` (1).
fn security_definition(v: &Value) -> Msg {
    let mut item = Msg::default();
    let mut sec = Msg::default();
    if v["type"] == "basic" {
        sec.string(1, &v["type"]);
        sec.string(2, &v["description"]);
        sec.extensions(3, v);
        item.message(1, sec);
    } else {
        sec.string(1, &v["type"]);
        sec.string(2, &v["name"]);
        sec.string(3, &v["in"]);
        sec.string(4, &v["description"]);
        sec.extensions(5, v);
        item.message(2, sec);
    }
    item
}

fn path_item(v: &Value) -> Msg {
    let mut m = Msg::default();
    m.string(1, &v["$ref"]);
    for (tag, method) in [
        (2, "get"),
        (3, "put"),
        (4, "post"),
        (5, "delete"),
        (6, "options"),
        (7, "head"),
        (8, "patch"),
    ] {
        if v[method].is_object() {
            m.message(tag, operation(&v[method]));
        }
    }
    for p in v["parameters"].as_array().into_iter().flatten() {
        m.message(9, parameters_item(p));
    }
    m.extensions(10, v);
    m
}

fn operation(v: &Value) -> Msg {
    let mut m = Msg::default();
    m.strings(1, &v["tags"]);
    m.string(2, &v["summary"]);
    m.string(3, &v["description"]);
    m.string(5, &v["operationId"]);
    m.strings(6, &v["produces"]);
    m.strings(7, &v["consumes"]);
    for p in v["parameters"].as_array().into_iter().flatten() {
        m.message(8, parameters_item(p));
    }
    if v["responses"].is_object() {
        let mut responses = Msg::default();
        responses.named(
            1,
            &v["responses"],
            |k| !k.starts_with("x-"),
            |r| {
                // ResponseValue: a `$ref` (JsonReference, 2) or a Response (1).
                let mut value = Msg::default();
                if let Some(reference) = r.get("$ref") {
                    let mut json_ref = Msg::default();
                    json_ref.string(1, reference);
                    value.message(2, json_ref);
                } else {
                    let mut response = Msg::default();
                    response.string(1, &r["description"]);
                    if r["schema"].is_object() {
                        let mut item = Msg::default();
                        item.message(1, schema(&r["schema"]));
                        response.message(2, item);
                    }
                    response.extensions(5, r);
                    value.message(1, response);
                }
                value
            },
        );
        responses.extensions(2, &v["responses"]);
        m.message(9, responses);
    }
    m.strings(10, &v["schemes"]);
    m.boolean(11, &v["deprecated"]);
    m.extensions(13, v);
    m
}

/// `ParametersItem`: a `$ref` (JsonReference, 2) or a Parameter (1), which is a body
/// parameter (1) or a non-body one (2: header 1, formData 2, query 3, path 4).
fn parameters_item(p: &Value) -> Msg {
    let mut item = Msg::default();
    if let Some(reference) = p.get("$ref") {
        let mut json_ref = Msg::default();
        json_ref.string(1, reference);
        json_ref.string(2, &p["description"]);
        item.message(2, json_ref);
        return item;
    }
    let mut parameter = Msg::default();
    if p["in"] == "body" {
        let mut body = Msg::default();
        body.string(1, &p["description"]);
        body.string(2, &p["name"]);
        body.string(3, &p["in"]);
        body.boolean(4, &p["required"]);
        if p["schema"].is_object() {
            body.message(5, schema(&p["schema"]));
        }
        body.extensions(6, p);
        parameter.message(1, body);
    } else {
        // Query and formData sub-schemas have `allow_empty_value` at 5, so the fields after
        // `name` sit one number higher than in header and path sub-schemas.
        let (which, shift) = match p["in"].as_str() {
            Some("header") => (1, 0),
            Some("formData") => (2, 1),
            Some("path") => (4, 0),
            _ => (3, 1),
        };
        let mut sub = Msg::default();
        sub.boolean(1, &p["required"]);
        sub.string(2, &p["in"]);
        sub.string(3, &p["description"]);
        sub.string(4, &p["name"]);
        if shift == 1 {
            sub.boolean(5, &p["allowEmptyValue"]);
        }
        sub.string(5 + shift, &p["type"]);
        sub.string(6 + shift, &p["format"]);
        sub.string(8 + shift, &p["collectionFormat"]);
        if p.get("default").is_some() {
            sub.message(9 + shift, any(&p["default"]));
        }
        sub.boolean(19 + shift, &p["uniqueItems"]);
        for e in p["enum"].as_array().into_iter().flatten() {
            sub.message(20 + shift, any(e));
        }
        sub.extensions(22 + shift, p);
        let mut non_body = Msg::default();
        non_body.message(which, sub);
        parameter.message(2, non_body);
    }
    item.message(1, parameter);
    item
}

/// `openapi.v2.Schema`.
fn schema(v: &Value) -> Msg {
    let mut m = Msg::default();
    let Some(obj) = v.as_object() else {
        return m;
    };
    let get = |k: &str| obj.get(k).unwrap_or(&Value::Null);
    m.string(1, get("$ref"));
    m.string(2, get("format"));
    m.string(3, get("title"));
    m.string(4, get("description"));
    if let Some(d) = obj.get("default") {
        m.message(5, any(d));
    }
    m.double(6, get("multipleOf"));
    m.double(7, get("maximum"));
    m.boolean(8, get("exclusiveMaximum"));
    m.double(9, get("minimum"));
    m.boolean(10, get("exclusiveMinimum"));
    m.int64(11, get("maxLength"));
    m.int64(12, get("minLength"));
    m.string(13, get("pattern"));
    m.int64(14, get("maxItems"));
    m.int64(15, get("minItems"));
    m.boolean(16, get("uniqueItems"));
    m.int64(17, get("maxProperties"));
    m.int64(18, get("minProperties"));
    m.strings(19, get("required"));
    for e in get("enum").as_array().into_iter().flatten() {
        m.message(20, any(e));
    }
    match obj.get("additionalProperties") {
        // A oneof: `false` is written too.
        Some(Value::Bool(b)) => {
            let mut item = Msg::default();
            item.key(2, 0);
            item.varint(u64::from(*b));
            m.message(21, item);
        }
        Some(s @ Value::Object(_)) => {
            let mut item = Msg::default();
            item.message(1, schema(s));
            m.message(21, item);
        }
        _ => {}
    }
    match obj.get("type") {
        Some(Value::String(t)) => {
            let mut item = Msg::default();
            item.bytes(1, t.as_bytes());
            m.message(22, item);
        }
        Some(types @ Value::Array(_)) => {
            let mut item = Msg::default();
            item.strings(1, types);
            m.message(22, item);
        }
        _ => {}
    }
    match obj.get("items") {
        Some(s @ Value::Object(_)) => {
            let mut item = Msg::default();
            item.message(1, schema(s));
            m.message(23, item);
        }
        Some(Value::Array(list)) => {
            let mut item = Msg::default();
            for s in list {
                item.message(1, schema(s));
            }
            m.message(23, item);
        }
        _ => {}
    }
    for s in get("allOf").as_array().into_iter().flatten() {
        m.message(24, schema(s));
    }
    if let Some(props) = obj.get("properties").filter(|p| p.is_object()) {
        let mut properties = Msg::default();
        properties.named(1, props, |_| true, schema);
        m.message(25, properties);
    }
    m.string(26, get("discriminator"));
    m.boolean(27, get("readOnly"));
    if let Some(e) = obj.get("example") {
        m.message(30, any(e));
    }
    m.extensions(31, v);
    m
}

/// Decodes what [`document`] writes far enough for tests: the fields of one message as
/// `(tag, wire type, payload)`; varints and fixed64 payloads as their raw bytes.
#[cfg(test)]
pub(crate) fn fields(mut b: &[u8]) -> Vec<(u32, u8, Vec<u8>)> {
    fn varint(b: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        while let Some((&byte, rest)) = b.split_first() {
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte < 0x80 {
                break;
            }
        }
        v
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b);
        let (tag, wire) = ((key >> 3) as u32, (key & 7) as u8);
        let payload = match wire {
            0 => varint(&mut b).to_le_bytes().to_vec(),
            1 => {
                let (p, rest) = b.split_at(8.min(b.len()));
                b = rest;
                p.to_vec()
            }
            _ => {
                let len = varint(&mut b) as usize;
                let (p, rest) = b.split_at(len.min(b.len()));
                b = rest;
                p.to_vec()
            }
        };
        out.push((tag, wire, payload));
    }
    out
}
