//! A Kubernetes API server emulator and pod runner, for end-to-end tests and `mailfleet dev`.
