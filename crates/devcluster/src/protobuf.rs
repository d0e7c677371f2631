//! Decoding of Kubernetes protobuf request bodies into JSON objects.
//!
//! Typed client-go clientsets (kubectl's `create namespace|configmap|secret`, Helm's release
//! storage) send built-in objects as `application/vnd.kubernetes.protobuf`: the `k8s\0` magic
//! followed by a `runtime.Unknown` envelope whose `raw` bytes are the object. The emulator
//! stores JSON, so it decodes the kinds those clients write (Namespace, ConfigMap, Secret,
//! ServiceAccount, DeleteOptions) with small field tables taken from the Kubernetes
//! `generated.proto` numbering. Other kinds are refused with 415, and responses are always
//! JSON, which clients accept because they list `application/json` too.

use base64::Engine;
use serde_json::{Map, Value, json};

use crate::status::ApiError;

/// The media type of protobuf bodies.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";

const MAGIC: &[u8] = b"k8s\0";

#[derive(Debug, Clone, Copy)]
enum T {
    Str,
    Int,
    Bool,
    Time,
    FieldsV1,
    MapStr,
    MapBytes,
    Msg(&'static [F]),
}

#[derive(Debug)]
struct F {
    tag: u32,
    name: &'static str,
    t: T,
    repeated: bool,
}

const fn f(tag: u32, name: &'static str, t: T) -> F {
    F {
        tag,
        name,
        t,
        repeated: false,
    }
}

const fn r(tag: u32, name: &'static str, t: T) -> F {
    F {
        tag,
        name,
        t,
        repeated: true,
    }
}

const OWNER_REFERENCE: &[F] = &[
    f(5, "apiVersion", T::Str),
    f(1, "kind", T::Str),
    f(3, "name", T::Str),
    f(4, "uid", T::Str),
    f(6, "controller", T::Bool),
    f(7, "blockOwnerDeletion", T::Bool),
];

const MANAGED_FIELDS_ENTRY: &[F] = &[
    f(1, "manager", T::Str),
    f(2, "operation", T::Str),
    f(3, "apiVersion", T::Str),
    f(4, "time", T::Time),
    f(6, "fieldsType", T::Str),
    f(7, "fieldsV1", T::FieldsV1),
    f(8, "subresource", T::Str),
];

const OBJECT_META: &[F] = &[
    f(1, "name", T::Str),
    f(2, "generateName", T::Str),
    f(3, "namespace", T::Str),
    f(4, "selfLink", T::Str),
    f(5, "uid", T::Str),
    f(6, "resourceVersion", T::Str),
    f(7, "generation", T::Int),
    f(8, "creationTimestamp", T::Time),
    f(9, "deletionTimestamp", T::Time),
    f(10, "deletionGracePeriodSeconds", T::Int),
    f(11, "labels", T::MapStr),
    f(12, "annotations", T::MapStr),
    r(13, "ownerReferences", T::Msg(OWNER_REFERENCE)),
    r(14, "finalizers", T::Str),
    r(17, "managedFields", T::Msg(MANAGED_FIELDS_ENTRY)),
];

const CONFIG_MAP: &[F] = &[
    f(1, "metadata", T::Msg(OBJECT_META)),
    f(2, "data", T::MapStr),
    f(3, "binaryData", T::MapBytes),
    f(4, "immutable", T::Bool),
];

const SECRET: &[F] = &[
    f(1, "metadata", T::Msg(OBJECT_META)),
    f(2, "data", T::MapBytes),
    f(3, "type", T::Str),
    f(4, "stringData", T::MapStr),
    f(5, "immutable", T::Bool),
];

const NAMESPACE_SPEC: &[F] = &[r(1, "finalizers", T::Str)];
const NAMESPACE_STATUS: &[F] = &[f(1, "phase", T::Str)];
const NAMESPACE: &[F] = &[
    f(1, "metadata", T::Msg(OBJECT_META)),
    f(2, "spec", T::Msg(NAMESPACE_SPEC)),
    f(3, "status", T::Msg(NAMESPACE_STATUS)),
];

const LOCAL_OBJECT_REFERENCE: &[F] = &[f(1, "name", T::Str)];
const OBJECT_REFERENCE: &[F] = &[
    f(1, "kind", T::Str),
    f(2, "namespace", T::Str),
    f(3, "name", T::Str),
    f(4, "uid", T::Str),
    f(5, "apiVersion", T::Str),
    f(6, "resourceVersion", T::Str),
    f(7, "fieldPath", T::Str),
];
const SERVICE_ACCOUNT: &[F] = &[
    f(1, "metadata", T::Msg(OBJECT_META)),
    r(2, "secrets", T::Msg(OBJECT_REFERENCE)),
    r(3, "imagePullSecrets", T::Msg(LOCAL_OBJECT_REFERENCE)),
    f(4, "automountServiceAccountToken", T::Bool),
];

const PRECONDITIONS: &[F] = &[f(1, "uid", T::Str), f(2, "resourceVersion", T::Str)];
const DELETE_OPTIONS: &[F] = &[
    f(1, "gracePeriodSeconds", T::Int),
    f(2, "preconditions", T::Msg(PRECONDITIONS)),
    f(3, "orphanDependents", T::Bool),
    f(4, "propagationPolicy", T::Str),
    r(5, "dryRun", T::Str),
];

const TYPE_META: &[F] = &[f(1, "apiVersion", T::Str), f(2, "kind", T::Str)];

fn schema_of(kind: &str) -> Option<&'static [F]> {
    Some(match kind {
        "ConfigMap" => CONFIG_MAP,
        "Secret" => SECRET,
        "Namespace" => NAMESPACE,
        "ServiceAccount" => SERVICE_ACCOUNT,
        "DeleteOptions" => DELETE_OPTIONS,
        _ => return None,
    })
}

fn malformed() -> ApiError {
    ApiError::bad_request("the protobuf body of the request is malformed")
}

/// One wire field: tag and either a varint or a length-delimited payload.
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    /// 32- and 64-bit fixed fields: no Kubernetes field the emulator decodes uses them.
    Fixed,
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, ApiError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or_else(malformed)?;
        *pos += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(malformed())
}

fn wire_fields(buf: &[u8]) -> Result<Vec<(u32, Wire<'_>)>, ApiError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let tag = u32::try_from(key >> 3).map_err(|_| malformed())?;
        let wire = match key & 7 {
            0 => Wire::Varint(varint(buf, &mut pos)?),
            1 => {
                buf.get(pos..pos + 8).ok_or_else(malformed)?;
                pos += 8;
                Wire::Fixed
            }
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).map_err(|_| malformed())?;
                let bytes = buf.get(pos..pos + len).ok_or_else(malformed)?;
                pos += len;
                Wire::Bytes(bytes)
            }
            5 => {
                buf.get(pos..pos + 4).ok_or_else(malformed)?;
                pos += 4;
                Wire::Fixed
            }
            _ => return Err(malformed()),
        };
        out.push((tag, wire));
    }
    Ok(out)
}

fn text(b: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(b).into_owned())
}

fn time(b: &[u8]) -> Result<Value, ApiError> {
    let mut seconds = 0i64;
    for (tag, w) in wire_fields(b)? {
        if let (1, Wire::Varint(v)) = (tag, w) {
            seconds = v as i64;
        }
    }
    let t = chrono::DateTime::from_timestamp(seconds, 0).ok_or_else(malformed)?;
    Ok(json!(t.format("%Y-%m-%dT%H:%M:%SZ").to_string()))
}

fn map_entry(b: &[u8], bytes_value: bool) -> Result<(String, Value), ApiError> {
    let mut key = String::new();
    let mut value = json!("");
    for (tag, w) in wire_fields(b)? {
        match (tag, w) {
            (1, Wire::Bytes(k)) => key = String::from_utf8_lossy(k).into_owned(),
            (2, Wire::Bytes(v)) if bytes_value => {
                value = json!(base64::engine::general_purpose::STANDARD.encode(v))
            }
            (2, Wire::Bytes(v)) => value = text(v),
            _ => {}
        }
    }
    Ok((key, value))
}

fn message(buf: &[u8], schema: &'static [F]) -> Result<Value, ApiError> {
    let mut out = Map::new();
    for (tag, w) in wire_fields(buf)? {
        // Unknown fields are skipped, as a protobuf decoder does.
        let Some(field) = schema.iter().find(|fl| fl.tag == tag) else {
            continue;
        };
        let value = match (field.t, w) {
            (T::Str, Wire::Bytes(b)) => text(b),
            (T::Int, Wire::Varint(v)) => json!(v as i64),
            (T::Bool, Wire::Varint(v)) => json!(v != 0),
            (T::Time, Wire::Bytes(b)) => time(b)?,
            (T::FieldsV1, Wire::Bytes(b)) => {
                let mut raw = Value::Null;
                for (t, w) in wire_fields(b)? {
                    if let (1, Wire::Bytes(j)) = (t, w) {
                        raw = serde_json::from_slice(j).map_err(|_| malformed())?;
                    }
                }
                raw
            }
            (T::MapStr | T::MapBytes, Wire::Bytes(b)) => {
                let (k, v) = map_entry(b, matches!(field.t, T::MapBytes))?;
                let entry = out.entry(field.name).or_insert_with(|| json!({}));
                if let Some(m) = entry.as_object_mut() {
                    m.insert(k, v);
                }
                continue;
            }
            (T::Msg(sub), Wire::Bytes(b)) => message(b, sub)?,
            (_, Wire::Fixed) => continue,
            _ => return Err(malformed()),
        };
        if field.repeated {
            let entry = out.entry(field.name).or_insert_with(|| json!([]));
            if let Some(a) = entry.as_array_mut() {
                a.push(value);
            }
        } else {
            out.insert(field.name.to_string(), value);
        }
    }
    Ok(Value::Object(out))
}

/// Decode a protobuf request body into the JSON object it encodes.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let envelope = body.strip_prefix(MAGIC).ok_or_else(malformed)?;
    let mut type_meta = json!({});
    let mut raw: &[u8] = &[];
    for (tag, w) in wire_fields(envelope)? {
        match (tag, w) {
            (1, Wire::Bytes(b)) => type_meta = message(b, TYPE_META)?,
            (2, Wire::Bytes(b)) => raw = b,
            _ => {}
        }
    }
    let kind = type_meta["kind"].as_str().unwrap_or_default().to_string();
    let schema = schema_of(&kind).ok_or_else(|| {
        ApiError::unsupported_media_type(format!(
            "devcluster decodes protobuf bodies of Namespace, ConfigMap, Secret, ServiceAccount and \
             DeleteOptions only, not {kind}; send JSON (e.g. `kubectl apply`)"
        ))
    })?;
    let mut obj = message(raw, schema)?;
    if kind != "DeleteOptions" {
        obj["apiVersion"] = type_meta["apiVersion"].clone();
        obj["kind"] = json!(kind);
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(tag: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![((tag << 3) | 2) as u8, payload.len() as u8];
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_a_configmap_envelope() {
        let name = field(1, b"settings");
        let labels = field(11, &[field(1, b"app"), field(2, b"web")].concat());
        let meta = field(1, &[name, labels].concat());
        let data = field(2, &[field(1, b"k"), field(2, b"v")].concat());
        let raw = [meta, data].concat();
        let type_meta = field(1, &[field(1, b"v1"), field(2, b"ConfigMap")].concat());
        let body = [MAGIC.to_vec(), type_meta, field(2, &raw)].concat();
        let obj = decode(&body).ok();
        assert_eq!(
            obj,
            Some(json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "settings", "labels": {"app": "web"}}, "data": {"k": "v"}}))
        );
    }
}
