//! Kubernetes structural-schema validation, defaulting and CEL rules, without an API server.
