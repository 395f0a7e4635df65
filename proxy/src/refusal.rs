//! Every reason the sidecar refuses a request, and the one place where each
//! becomes an HTTP status and a JSON body. Bodies never carry secret values.

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use leash_api::revocation::RevocationKind;

use crate::body::ProxyBody;

/// Declares the refusal codes once: the enum, every code in order (for the
/// metrics' counters, indexed by discriminant) and each one's name. A code
/// added here is counted; one missing here does not compile.
macro_rules! codes {
    ($($variant:ident => $name:literal,)*) => {
        /// A refusal's stable, machine-readable reason (the JSON `error`,
        /// the `x-leash-refusal` header, the metrics' `reason` label).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code {
            $($variant,)*
        }

        impl Code {
            /// Every code, at the index of its discriminant.
            pub const ALL: &[Code] = &[$(Code::$variant,)*];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => $name,)*
                }
            }
        }
    };
}

codes! {
    UnknownUpstream => "unknown_upstream",
    NoHost => "no_host",
    NotGranted => "not_granted",
    Denied => "denied_by_control_plane",
    ConnectNotSupported => "connect_not_supported",
    TraceRefused => "trace_refused",
    IdentityUnavailable => "identity_unavailable",
    ControlPlaneUnavailable => "control_plane_unavailable",
    CredentialUnavailable => "credential_unavailable",
    UpstreamUnreachable => "upstream_unreachable",
    BadRequest => "bad_request",
    HeadersTooLarge => "headers_too_large",
    RevokedCredential => "revoked_credential",
    RevokedGrant => "revoked_grant",
    RevokedWorkload => "revoked_workload",
    RevokedUpstream => "revoked_upstream",
    Revoked => "revoked",
    Stale => "stale_revocation_state",
    LeakedSecret => "leaked_secret",
    UpstreamTimeout => "upstream_timeout",
    Overloaded => "overloaded",
    ConnectNotAllowed => "connect_not_allowed",
    ConnectToIp => "connect_to_ip",
    PassthroughOnly => "passthrough_only",
    Misdirected => "misdirected_request",
    TlsNoSni => "tls_no_sni",
    SniMismatch => "sni_mismatch",
    BodyTooLargeToSign => "body_too_large_to_sign",
    SigningFailed => "signing_failed",
}

impl Code {
    /// The code of a refusal caused by a revocation of `kind` (`Revoked`
    /// when the kind is unknown).
    pub fn revoked(kind: Option<RevocationKind>) -> Self {
        match kind {
            Some(RevocationKind::Credential) => Self::RevokedCredential,
            Some(RevocationKind::Grant) => Self::RevokedGrant,
            Some(RevocationKind::Workload) => Self::RevokedWorkload,
            Some(RevocationKind::Upstream) => Self::RevokedUpstream,
            Some(RevocationKind::Leaked) => Self::LeakedSecret,
            Some(RevocationKind::Unspecified) | None => Self::Revoked,
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    #[error("no upstream in policy matches host {host:?}; Leash denies by default")]
    UnknownUpstream { host: String },
    #[error("request has no host to route by (use an absolute http:// URL or a Host header)")]
    NoHost,
    #[error("this workload is not granted upstream {upstream:?}")]
    NotGranted { upstream: String },
    #[error("the control plane refused a credential for {upstream:?} ({code}): {message}")]
    Denied {
        upstream: String,
        code: String,
        message: String,
    },
    #[error(
        "CONNECT is not accepted on a named listener: send requests in origin-form, or use the proxy port for https:// calls"
    )]
    ConnectNotSupported,
    #[error(
        "CONNECT to {host:?} is refused: upstream {upstream:?} is reached with plain http:// through this proxy (set `intercept: true` in its policy to let clients call https:// with HTTPS_PROXY)"
    )]
    ConnectNotAllowed { host: String, upstream: String },
    #[error(
        "CONNECT to the address {host} is refused: name the upstream's host, which policy routes by (deny by default)"
    )]
    ConnectToIp { host: String },
    #[error(
        "upstream {upstream:?} is passthrough: reach it with CONNECT (an https:// URL with HTTPS_PROXY); no credential is injected into it"
    )]
    PassthroughOnly { upstream: String },
    #[error(
        "this tunnel is for {sni:?}, but the request is for {host:?}: send it through a tunnel to its own host"
    )]
    Misdirected { sni: String, host: String },
    #[error("the TLS ClientHello in the CONNECT tunnel to {host:?} has no server name (SNI)")]
    TlsNoSni { host: String },
    #[error("the TLS ClientHello names {sni:?}, but the CONNECT was to {host:?}")]
    SniMismatch { sni: String, host: String },
    #[error(
        "upstream {upstream:?} signs the body's hash (aws-sigv4, payload: signed), and bodies over {limit} bytes are not read whole: send less, or set payload: unsigned in policy"
    )]
    BodyTooLargeToSign { upstream: String, limit: usize },
    #[error("the request to {upstream:?} could not be signed: {reason}")]
    SigningFailed { upstream: String, reason: String },
    #[error(
        "{method} is refused to managed upstream {upstream:?}: it echoes the request, with the injected credential, back to the workload"
    )]
    TraceRefused {
        method: &'static str,
        upstream: String,
    },
    #[error("the sidecar has no workload identity yet (SPIFFE Workload API not reachable)")]
    IdentityUnavailable,
    #[error("the sidecar has not reached the control plane yet; policy is unknown")]
    ControlPlaneUnavailable,
    #[error("no credential could be obtained for {upstream:?}: {reason}")]
    CredentialUnavailable { upstream: String, reason: String },
    #[error("upstream {upstream:?} could not be reached: {reason}")]
    UpstreamUnreachable { upstream: String, reason: String },
    #[error("{what} is revoked ({revocation_id}): {reason}")]
    Revoked {
        code: Code,
        what: String,
        revocation_id: String,
        reason: String,
        upstream: String,
    },
    #[error(
        "the sidecar has not heard from the control plane for {silence_secs}s (more than max_staleness {max_secs}s); refusing to inject credentials that may have been revoked"
    )]
    Stale { silence_secs: u64, max_secs: u64 },
    #[error(
        "the request carries a value registered as leaked ({revocation_id}) in {location}; it was not forwarded and the control plane has been told that {workload} still uses it. Remove that secret from this workload."
    )]
    LeakedSecret {
        revocation_id: String,
        location: String,
        workload: String,
        upstream: String,
        host: String,
    },
    #[error("request header block is larger than the {limit} bytes this sidecar accepts")]
    HeadersTooLarge { limit: usize },
    #[error("upstream {upstream:?} did not answer within {timeout_ms} ms")]
    UpstreamTimeout { upstream: String, timeout_ms: u64 },
    #[error("the sidecar is at its limit of {limit} {what}; try again shortly")]
    Overloaded { what: &'static str, limit: usize },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownUpstream { .. }
            | Self::NotGranted { .. }
            | Self::Denied { .. }
            | Self::Revoked { .. }
            | Self::LeakedSecret { .. }
            | Self::ConnectNotAllowed { .. }
            | Self::ConnectToIp { .. }
            | Self::PassthroughOnly { .. } => StatusCode::FORBIDDEN,
            Self::Misdirected { .. } | Self::SniMismatch { .. } => StatusCode::MISDIRECTED_REQUEST,
            Self::TlsNoSni { .. } => StatusCode::BAD_REQUEST,
            Self::BodyTooLargeToSign { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::SigningFailed { .. } => StatusCode::BAD_GATEWAY,
            Self::Stale { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::NoHost | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::ConnectNotSupported | Self::TraceRefused { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::IdentityUnavailable
            | Self::ControlPlaneUnavailable
            | Self::CredentialUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamUnreachable { .. } => StatusCode::BAD_GATEWAY,
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Stable, machine-readable reason code.
    pub fn code(&self) -> Code {
        match self {
            Self::UnknownUpstream { .. } => Code::UnknownUpstream,
            Self::NoHost => Code::NoHost,
            Self::NotGranted { .. } => Code::NotGranted,
            Self::Denied { .. } => Code::Denied,
            Self::ConnectNotSupported => Code::ConnectNotSupported,
            Self::TraceRefused { .. } => Code::TraceRefused,
            Self::IdentityUnavailable => Code::IdentityUnavailable,
            Self::ControlPlaneUnavailable => Code::ControlPlaneUnavailable,
            Self::CredentialUnavailable { .. } => Code::CredentialUnavailable,
            Self::UpstreamUnreachable { .. } => Code::UpstreamUnreachable,
            Self::BadRequest(_) => Code::BadRequest,
            Self::HeadersTooLarge { .. } => Code::HeadersTooLarge,
            Self::UpstreamTimeout { .. } => Code::UpstreamTimeout,
            Self::Overloaded { .. } => Code::Overloaded,
            Self::Revoked { code, .. } => *code,
            Self::Stale { .. } => Code::Stale,
            Self::LeakedSecret { .. } => Code::LeakedSecret,
            Self::ConnectNotAllowed { .. } => Code::ConnectNotAllowed,
            Self::ConnectToIp { .. } => Code::ConnectToIp,
            Self::PassthroughOnly { .. } => Code::PassthroughOnly,
            Self::Misdirected { .. } => Code::Misdirected,
            Self::TlsNoSni { .. } => Code::TlsNoSni,
            Self::SniMismatch { .. } => Code::SniMismatch,
            Self::BodyTooLargeToSign { .. } => Code::BodyTooLargeToSign,
            Self::SigningFailed { .. } => Code::SigningFailed,
        }
    }

    /// The upstream the request was for, when one was matched.
    pub fn upstream(&self) -> Option<&str> {
        match self {
            Self::LeakedSecret { upstream, .. } if upstream.is_empty() => None,
            Self::NotGranted { upstream }
            | Self::LeakedSecret { upstream, .. }
            | Self::Denied { upstream, .. }
            | Self::CredentialUnavailable { upstream, .. }
            | Self::UpstreamUnreachable { upstream, .. }
            | Self::UpstreamTimeout { upstream, .. }
            | Self::TraceRefused { upstream, .. }
            | Self::ConnectNotAllowed { upstream, .. }
            | Self::PassthroughOnly { upstream }
            | Self::BodyTooLargeToSign { upstream, .. }
            | Self::SigningFailed { upstream, .. }
            | Self::Revoked { upstream, .. } => Some(upstream),
            _ => None,
        }
    }

    /// The gRPC status a gRPC client gets for this refusal:
    /// `PERMISSION_DENIED` for policy's refusals, `UNAVAILABLE` for what
    /// may pass on retry, `INVALID_ARGUMENT` for a malformed request.
    pub fn grpc_status(&self) -> u8 {
        match self.status().as_u16() {
            400 | 413 | 431 => 3,
            403 | 405 | 421 => 7,
            _ => 14,
        }
    }

    /// A gRPC "trailers-only" answer (RFC-less but specified by gRPC over
    /// HTTP/2): status 200, `grpc-status` and `grpc-message` (the Leash code
    /// first) in the headers, no body.
    pub fn into_grpc_response(self) -> Response<ProxyBody> {
        let message = format!("leash {}: {self}", self.code().as_str());
        // gRPC's percent-encoding: everything outside printable ASCII, and '%'.
        const GRPC_MESSAGE: &percent_encoding::AsciiSet =
            &percent_encoding::CONTROLS.add(b'%').add(0x7f);
        let encoded = percent_encoding::utf8_percent_encode(&message, GRPC_MESSAGE).to_string();
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("grpc-status", self.grpc_status().to_string())
            .header("grpc-message", encoded)
            .header("x-leash-refusal", self.code().as_str())
            .body(ProxyBody::default())
            .unwrap_or_else(|_| Response::new(ProxyBody::default()))
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let mut body = serde_json::json!({
            "error": self.code().as_str(),
            "message": self.to_string(),
            "upstream": self.upstream(),
        });
        if let Self::Revoked { revocation_id, .. } = &self {
            body["revocation_id"] = revocation_id.as_str().into();
        }
        if let Self::LeakedSecret {
            revocation_id,
            location,
            workload,
            upstream,
            ..
        } = &self
        {
            body["revocation_id"] = revocation_id.as_str().into();
            body["location"] = location.as_str().into();
            body["workload"] = workload.as_str().into();
            body["upstream"] = upstream.as_str().into();
        }
        let mut builder = Response::builder()
            .status(self.status())
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-leash-refusal", self.code().as_str());
        if matches!(self, Self::ConnectNotSupported | Self::TraceRefused { .. }) {
            builder = builder.header(
                header::ALLOW,
                "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
            );
        }
        let mut bytes = body.to_string().into_bytes();
        bytes.push(b'\n');
        builder
            .body(
                Full::new(Bytes::from(bytes))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .unwrap_or_else(|_| Response::new(ProxyBody::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::Code;

    #[test]
    fn every_code_sits_at_its_discriminant_and_has_a_distinct_name() {
        for (i, code) in Code::ALL.iter().enumerate() {
            assert_eq!(*code as usize, i, "{code}");
        }
        let names: std::collections::HashSet<_> = Code::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), Code::ALL.len());
    }
}
