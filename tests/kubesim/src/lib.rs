//! Kubernetes API emulator over real HTTP for tests and the local stack (not shipped)
#![forbid(unsafe_code)]
