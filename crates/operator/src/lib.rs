//! The operator: controllers for the three custom resources and the coordinator service.
//!
//! Pure decision logic lives in its own modules (egress allocation today) and is unit-tested
//! without a cluster; the controllers that talk to the API server wire it up.

pub mod egress;
