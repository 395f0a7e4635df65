//! The Leash sidecar: a forward proxy that routes a workload's outbound
//! calls by host, refuses what policy does not name, and injects a
//! short-lived credential fetched against the workload's SPIFFE identity.

pub mod app;
pub mod body;
pub mod cache;
pub mod cli;
pub mod conn;
pub mod control;
pub mod credential;
pub mod egress;
pub mod headers;
pub mod identity;
pub mod intercept;
pub mod leak;
pub mod metrics;
pub mod refusal;
pub mod reports;
pub mod revocation;
pub mod routes;
pub mod serve;
pub mod sigv4;
pub mod telemetry;
pub mod tunnel;
pub mod upstream;
pub mod usage;
pub mod websocket;

pub use app::{Limits, Sidecar, SidecarConfig};
pub use control::ControlConfig;
pub use routes::UpstreamTimeouts;
