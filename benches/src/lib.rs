//! Shared helpers for the benchmark binaries live in each bench for now.
