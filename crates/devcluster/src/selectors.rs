//! Label and field selectors of list and watch requests (`labelSelector=app=relay,tier!=db`,
//! `fieldSelector=metadata.name=x`). Field selectors are evaluated generically as dotted paths
//! into the object, which covers the fields real clients select on (`metadata.name`,
//! `metadata.namespace`, `involvedObject.uid`, `spec.nodeName`, `status.phase`, `type`).

use serde_json::Value;

use crate::status::ApiError;

#[derive(Debug, Clone, PartialEq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<LabelReq>);

/// Split on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                cur.push(c)
            }
            ')' => {
                depth -= 1;
                cur.push(c)
            }
            ',' if depth == 0 => parts.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

fn set_values(rest: &str) -> Result<Vec<String>, ApiError> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| ApiError::bad_request(format!("unable to parse requirement: {rest}")))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    /// Parse the `labelSelector` query parameter.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            if let Some(key) = part.strip_prefix('!') {
                reqs.push(LabelReq::NotExists(key.trim().to_string()));
            } else if let Some((k, v)) = part.split_once("!=") {
                reqs.push(LabelReq::NotEq(k.trim().into(), v.trim().into()));
            } else if let Some((k, v)) = part.split_once("==") {
                reqs.push(LabelReq::Eq(k.trim().into(), v.trim().into()));
            } else if let Some((k, v)) = part.split_once('=') {
                reqs.push(LabelReq::Eq(k.trim().into(), v.trim().into()));
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                reqs.push(LabelReq::NotIn(k.trim().into(), set_values(rest)?));
            } else if let Some((k, rest)) = part.split_once(" in ") {
                reqs.push(LabelReq::In(k.trim().into(), set_values(rest)?));
            } else {
                reqs.push(LabelReq::Exists(part.trim().into()));
            }
        }
        Ok(LabelSelector(reqs))
    }

    /// A selector from a `matchLabels` map (StatefulSet selectors).
    pub fn from_match_labels(labels: &Value) -> Self {
        let reqs = labels
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| LabelReq::Eq(k.clone(), v.as_str().unwrap_or_default().into()))
                    .collect()
            })
            .unwrap_or_default();
        LabelSelector(reqs)
    }

    /// Whether an object's labels match.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A parsed field selector.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// The string form of a scalar at a dotted path, as field selectors compare it.
pub fn field_value(object: &Value, path: &str) -> String {
    let mut cur = object;
    for seg in path.split('.') {
        cur = &cur[seg];
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

impl FieldSelector {
    /// Parse the `fieldSelector` query parameter.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            if let Some((k, v)) = part.split_once("!=") {
                reqs.push((k.trim().to_string(), false, v.trim().to_string()));
            } else if let Some((k, v)) = part.split_once("==") {
                reqs.push((k.trim().to_string(), true, v.trim().to_string()));
            } else if let Some((k, v)) = part.split_once('=') {
                reqs.push((k.trim().to_string(), true, v.trim().to_string()));
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: {part}"
                )));
            }
        }
        Ok(FieldSelector(reqs))
    }

    /// Whether an object matches.
    pub fn matches(&self, object: &Value) -> bool {
        self.0
            .iter()
            .all(|(path, eq, want)| (field_value(object, path) == *want) == *eq)
    }
}

/// Both selectors of a request.
#[derive(Debug, Clone, Default)]
pub struct Selectors {
    /// `labelSelector`.
    pub labels: LabelSelector,
    /// `fieldSelector`.
    pub fields: FieldSelector,
}

impl Selectors {
    /// Whether an object matches both.
    pub fn matches(&self, object: &Value) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selector_forms() {
        let obj = json!({"metadata": {"labels": {"app": "relay", "tier": "mail"}}});
        for (sel, want) in [
            ("app=relay", true),
            ("app==relay,tier=mail", true),
            ("app!=relay", false),
            ("app in (relay,web)", true),
            ("tier notin (mail)", false),
            ("app", true),
            ("!app", false),
            ("!missing", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).map(|s| s.matches(&obj)).ok(),
                Some(want),
                "{sel}"
            );
        }
    }

    #[test]
    fn field_selector_paths() {
        let obj =
            json!({"metadata": {"name": "a", "namespace": "ns"}, "involvedObject": {"uid": "u1"}});
        let sel = FieldSelector::parse("metadata.name=a,involvedObject.uid=u1").ok();
        assert_eq!(sel.map(|s| s.matches(&obj)), Some(true));
        let sel = FieldSelector::parse("metadata.namespace!=ns").ok();
        assert_eq!(sel.map(|s| s.matches(&obj)), Some(false));
    }
}
