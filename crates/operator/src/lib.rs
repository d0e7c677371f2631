//! The operator: controllers for the three custom resources and the coordinator service.
