//! The Leash control plane: loads policy, issues short-lived credentials to
//! sidecars over SPIFFE mTLS, publishes the JWKS, and (as a dev tool) serves
//! SPIFFE identities from a local CA.

pub mod admin;
pub mod anchor;
pub mod app;
pub mod auth;
pub mod cli;
pub mod console;
pub mod devid;
pub mod https;
pub mod jwt;
pub mod listeners;
pub mod metrics;
pub mod missions;
pub mod mtls;
pub mod oauth2;
pub mod posture;
pub mod probes;
pub mod replicas;
pub mod revocations;
pub mod scanners;
pub mod secrets;
pub mod sessions;
pub mod sidecar_api;
pub mod ssf;
pub mod ssf_out;
pub mod state;
pub mod store;
pub mod sts;
pub mod telemetry;
pub mod unauthenticated;
pub mod usage;

pub use leash_api::process::{init_logging, shutdown_signal};
