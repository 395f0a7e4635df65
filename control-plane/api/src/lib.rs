//! What the Leash sidecar and control plane share: the gRPC protocol, the
//! policy model with its validation, and the server side of the SPIFFE
//! Workload API (used by the dev identity provider).

pub mod h2_authority;
pub mod identity;
pub mod jwt_svid;
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

/// The vocabulary of usage records (`UsageRecord.method`, `.status_class`:
/// wire enums whose value less one indexes these names), shared by the
/// sidecar that counts and the control plane that checks and stores.
pub mod usage {
    pub const METHODS: [&str; 8] = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "OTHER",
    ];
    /// `error`: the upstream gave no answer.
    pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

    /// The wire value of the name at `index` of [`METHODS`] or [`STATUS_CLASSES`].
    pub fn wire(index: usize) -> i32 {
        i32::try_from(index + 1).unwrap_or(0)
    }

    /// The name of a wire `Method`, if it is one this build knows.
    pub fn method_name(wire: i32) -> Option<&'static str> {
        name(&METHODS, wire)
    }

    /// The name of a wire `StatusClass`, if it is one this build knows.
    pub fn status_class_name(wire: i32) -> Option<&'static str> {
        name(&STATUS_CLASSES, wire)
    }

    fn name(names: &[&'static str], wire: i32) -> Option<&'static str> {
        let index = usize::try_from(wire).ok()?.checked_sub(1)?;
        names.get(index).copied()
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::v1::{Method, StatusClass};

        /// The proto enums and the names agree, value for value.
        #[test]
        fn wire_values_index_the_names() {
            let methods = [
                (Method::Get, "GET"),
                (Method::Post, "POST"),
                (Method::Put, "PUT"),
                (Method::Delete, "DELETE"),
                (Method::Patch, "PATCH"),
                (Method::Head, "HEAD"),
                (Method::Options, "OPTIONS"),
                (Method::Other, "OTHER"),
            ];
            for (m, name) in methods {
                assert_eq!(method_name(m as i32), Some(name));
            }
            let classes = [
                (StatusClass::StatusClass1xx, "1xx"),
                (StatusClass::StatusClass2xx, "2xx"),
                (StatusClass::StatusClass3xx, "3xx"),
                (StatusClass::StatusClass4xx, "4xx"),
                (StatusClass::StatusClass5xx, "5xx"),
                (StatusClass::NoAnswer, "error"),
            ];
            for (c, name) in classes {
                assert_eq!(status_class_name(c as i32), Some(name));
            }
            assert_eq!(method_name(0), None);
            assert_eq!(method_name(9), None);
            assert_eq!(status_class_name(-1), None);
            assert_eq!(wire(0), Method::Get as i32);
        }
    }
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
