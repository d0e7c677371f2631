//! Admission of custom resources against their CRD's openAPIV3Schema: pruning, defaulting and
//! validation (schema and CEL rules), as the API server runs them on every write. The schema
//! engine itself lives in `mailfleet-crdschema`; this module only adapts its results to
//! Kubernetes `Status` causes.

use serde_json::Value;

use crate::status::Cause;

/// The compiled schema of one CRD version.
#[derive(Debug)]
pub struct CrdSchema {
    schema: mailfleet_crdschema::Schema,
}

impl CrdSchema {
    /// Compile a CRD version's `openAPIV3Schema`.
    pub fn compile(raw: &Value) -> Result<Self, String> {
        mailfleet_crdschema::Schema::compile(raw)
            .map(|schema| CrdSchema { schema })
            .map_err(|e| e.to_string())
    }

    /// Prune unknown fields, apply defaults and validate the whole object (spec and status);
    /// returns the causes of refusal, empty when the object is admitted. Transition rules see
    /// `old` on updates.
    pub fn admit(&self, object: &mut Value, old: Option<&Value>) -> Vec<Cause> {
        self.schema
            .admit(object, old)
            .into_iter()
            .map(|e| Cause {
                reason: e.reason.as_str().to_string(),
                message: e.message,
                field: e.field,
            })
            .collect()
    }
}
