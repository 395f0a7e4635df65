//! What the Leash sidecar and control plane share: the gRPC protocol, the
//! policy model with its validation, and the server side of the SPIFFE
//! Workload API (used by the dev identity provider).

pub mod identity;
pub mod metrics;
pub mod policy;
pub mod process;
pub mod revocation;
pub mod telemetry;
pub mod workload_server;

/// The sidecar <-> control plane protocol (`proto/leash.proto`).
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("leash.v1");
}

/// The SPIFFE Workload API (`proto/workload.proto`), server side only.
pub mod workload {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("_");
}

/// The vocabulary of usage records (`UsageRecord.method`, `.status_class`),
/// shared by the sidecar that counts and the control plane that checks.
pub mod usage {
    pub const METHODS: [&str; 8] = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "OTHER",
    ];
    /// `error`: the upstream gave no answer.
    pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];
}

/// The gRPC metadata key every Workload API client must send (value `true`);
/// servers reject calls without it, as SPIRE does.
/// Largest gRPC message either side of the sidecar API accepts or sends,
/// set explicitly on both ends (tonic's default is 4 MiB for decoding and
/// unbounded for encoding). Nothing legitimate comes near it: snapshots are
/// sent in parts of [`SNAPSHOT_PART_BYTES`].
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Encoded size a snapshot part stays under.
pub const SNAPSHOT_PART_BYTES: usize = 512 * 1024;

pub const WORKLOAD_API_HEADER: &str = "workload.spiffe.io";
