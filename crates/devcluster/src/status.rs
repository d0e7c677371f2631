//! Kubernetes-shaped API errors: every refusal the server sends is a `metav1.Status` body with
//! the reason, code and details a real API server would use, because clients (kubectl, helm,
//! kube-rs) branch on `reason` and `code`, and people read `message`.

use serde_json::{Value, json};

/// One cause of an error (`details.causes[]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    /// `metav1.CauseType`, e.g. `FieldValueInvalid` or `FieldManagerConflict`.
    pub reason: String,
    /// Human-readable text.
    pub message: String,
    /// The field path, e.g. `spec.replicas`.
    pub field: String,
}

/// `details` of a Status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Details {
    /// `details.name`.
    pub name: Option<String>,
    /// `details.group`.
    pub group: Option<String>,
    /// `details.kind`.
    pub kind: Option<String>,
    /// `details.causes`.
    pub causes: Vec<Cause>,
}

/// An error answer of the API, rendered as a `Status` object.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `metav1.StatusReason`, e.g. `NotFound`.
    pub reason: &'static str,
    /// Human-readable text.
    pub message: String,
    /// `details`, boxed to keep `Result<_, ApiError>` small.
    pub details: Option<Box<Details>>,
}

/// `plural.group` as the API server prints a resource in messages (`pods`, `relaypools.mailfleet.dev`).
pub fn qualified(plural: &str, group: &str) -> String {
    if group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{group}")
    }
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, name: &str, group: &str, kind: &str) -> Self {
        self.details = Some(Box::new(Details {
            name: Some(name.to_string()),
            group: Some(group.to_string()),
            kind: Some(kind.to_string()),
            causes: Vec::new(),
        }));
        self
    }

    fn with_causes(mut self, causes: Vec<Cause>) -> Self {
        if let Some(d) = self.details.as_mut() {
            d.causes = causes;
        } else {
            self.details = Some(Box::new(Details {
                causes,
                ..Details::default()
            }));
        }
        self
    }

    /// The causes, if any.
    pub fn causes(&self) -> &[Cause] {
        self.details
            .as_ref()
            .map(|d| d.causes.as_slice())
            .unwrap_or(&[])
    }

    /// 404 for a named object.
    pub fn not_found(plural: &str, group: &str, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified(plural, group)),
        )
        .with_details(name, group, plural)
    }

    /// 404 for a path that names no resource.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }

    /// 409 AlreadyExists on create.
    pub fn already_exists(plural: &str, group: &str, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", qualified(plural, group)),
        )
        .with_details(name, group, plural)
    }

    /// 409 Conflict on a stale resourceVersion (optimistic concurrency).
    pub fn stale(plural: &str, group: &str, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                qualified(plural, group)
            ),
        )
        .with_details(name, group, plural)
    }

    /// 409 Conflict with an arbitrary message (precondition failures, SSA conflicts).
    pub fn conflict(
        plural: &str,
        group: &str,
        name: &str,
        message: String,
        causes: Vec<Cause>,
    ) -> Self {
        Self::new(409, "Conflict", message)
            .with_details(name, group, plural)
            .with_causes(causes)
    }

    /// 422 Invalid with field causes, worded as the API server does: the message lists each
    /// cause as `field: body`, while each cause's own `message` is the body alone (clients
    /// such as kubectl print `field: message`). Causes may come with or without the
    /// `field: ` prefix.
    pub fn invalid(kind: &str, group: &str, name: &str, causes: Vec<Cause>) -> Self {
        let what = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let causes: Vec<Cause> = causes
            .into_iter()
            .map(|mut c| {
                if let Some(body) = c.message.strip_prefix(&format!("{}: ", c.field)) {
                    c.message = body.to_string();
                }
                c
            })
            .collect();
        let list: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let joined = if list.len() == 1 {
            list.join("")
        } else {
            format!("[{}]", list.join(", "))
        };
        Self::new(
            422,
            "Invalid",
            format!("{what} \"{name}\" is invalid: {joined}"),
        )
        .with_details(name, group, kind)
        .with_causes(causes)
    }

    /// 400 BadRequest.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 422 for a patch that cannot be applied.
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    /// 405 MethodNotAllowed.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    /// 415 UnsupportedMediaType.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(415, "UnsupportedMediaType", message)
    }

    /// 410 Gone (`Expired`): a watch or list asked for history that was compacted.
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// 500 InternalError.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// 403 Forbidden (e.g. creating in a terminating namespace).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            let mut details = serde_json::Map::new();
            if let Some(name) = &d.name {
                details.insert("name".into(), json!(name));
            }
            if let Some(group) = d.group.as_deref().filter(|g| !g.is_empty()) {
                details.insert("group".into(), json!(group));
            }
            if let Some(kind) = &d.kind {
                details.insert("kind".into(), json!(kind));
            }
            if !d.causes.is_empty() {
                let causes: Vec<Value> = d
                    .causes
                    .iter()
                    .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                    .collect();
                details.insert("causes".into(), Value::Array(causes));
            }
            status["details"] = Value::Object(details);
        }
        status
    }
}

/// A `Status` of success, as DELETE of a collection or of an already removed object answers.
pub fn success_status(name: &str, group: &str, plural: &str, uid: &str) -> Value {
    let mut details = json!({"name": name, "kind": plural, "uid": uid});
    if !group.is_empty() {
        details["group"] = json!(group);
    }
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_causes_carry_their_message_without_the_field() {
        let cause = |field: &str, message: &str| Cause {
            reason: "FieldValueInvalid".into(),
            message: message.into(),
            field: field.into(),
        };
        let err = ApiError::invalid(
            "RelayPool",
            "mailfleet.dev",
            "p",
            vec![
                cause(
                    "spec.egress",
                    "spec.egress: Invalid value: needs an address",
                ),
                cause("spec", "Invalid value: too many replicas"),
            ],
        );
        let status = err.to_status();
        assert_eq!(
            status["message"],
            "RelayPool.mailfleet.dev \"p\" is invalid: [spec.egress: Invalid value: needs an \
             address, spec: Invalid value: too many replicas]"
        );
        let causes = &status["details"]["causes"];
        assert_eq!(causes[0]["message"], "Invalid value: needs an address");
        assert_eq!(causes[0]["field"], "spec.egress");
        assert_eq!(causes[1]["message"], "Invalid value: too many replicas");
    }
}
