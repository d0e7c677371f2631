//! Coordinator protocol between the operator and the relays (generated from proto/ with issue #5).
