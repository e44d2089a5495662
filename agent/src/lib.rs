//! Device agent library and binary
#![forbid(unsafe_code)]
