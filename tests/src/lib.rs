//! Test harness (filled in with the end-to-end tests).
