//! AWS Signature Version 4 (`credential.kind: aws-sigv4`), with AWS's own
//! signer (`aws-sigv4`). The workload's own signature (the `Authorization`
//! header, `X-Amz-Date`, `X-Amz-Security-Token`, `X-Amz-Content-Sha256`,
//! and a presigned query's `X-Amz-*` parameters) is removed, and the
//! request is signed with the brokered key as the last change to it before
//! it is handed to the upstream connection: after the hop-by-hop headers
//! went, `Host` was set to the target and the target made origin-form, so
//! the signature covers exactly what the upstream receives.
//!
//! Payload: `signed` hashes the whole body (read first, at most
//! [`MAX_SIGNED_BODY`]); `unsigned` sends `UNSIGNED-PAYLOAD` (S3, large or
//! streaming uploads). Location: the `Authorization` header, or a
//! presigned query (`X-Amz-Signature`, valid [`PRESIGNED_FOR`]).

use std::time::{Duration, SystemTime};

use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SignatureLocation,
    SigningSettings, UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4;
use http::{HeaderMap, Request};
use zeroize::Zeroizing;

/// The largest body whose hash is signed; larger ones need `payload:
/// unsigned`.
pub const MAX_SIGNED_BODY: usize = 8 * 1024 * 1024;
/// How long a presigned request the sidecar makes stays valid.
pub const PRESIGNED_FOR: Duration = Duration::from_secs(300);

/// How a route signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigV4Spec {
    pub region: String,
    pub service: String,
    pub unsigned_payload: bool,
    pub query: bool,
}

/// A brokered AWS key as the sidecar holds it (zeroized on drop).
pub struct AwsSecret {
    pub access_key_id: String,
    secret_access_key: Zeroizing<String>,
    session_token: Option<Zeroizing<String>>,
}

impl AwsSecret {
    /// From the brokered secret (`ACCESS_KEY_ID:SECRET_ACCESS_KEY[:TOKEN]`).
    pub fn parse(secret: &[u8]) -> Option<Self> {
        let key = leash_api::policy::AwsKey::parse(secret).ok()?;
        Some(Self {
            access_key_id: key.access_key_id.to_owned(),
            secret_access_key: Zeroizing::new(key.secret_access_key.to_owned()),
            session_token: key.session_token.map(|t| Zeroizing::new(t.to_owned())),
        })
    }

    /// The values that must never come back to the workload.
    pub fn secrets(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(self.secret_access_key.as_bytes())
            .chain(self.session_token.as_deref().map(|t| t.as_bytes()))
    }
}

/// The signed body's SHA-256, hex (a request extension, kept for a
/// re-signing with a fresh credential).
#[derive(Debug, Clone)]
pub struct PayloadHash(pub String);

/// Headers of the workload's own signature.
const SIGNATURE_HEADERS: [&str; 3] = ["x-amz-date", "x-amz-security-token", "x-amz-content-sha256"];

/// Query parameters of a presigned request (compared case-insensitively).
const SIGNATURE_PARAMS: [&str; 7] = [
    "x-amz-algorithm",
    "x-amz-credential",
    "x-amz-date",
    "x-amz-expires",
    "x-amz-signedheaders",
    "x-amz-signature",
    "x-amz-security-token",
];

/// Removes the workload's signature headers (its `Authorization` is
/// removed with every route's); returns whether there were any.
pub fn strip_headers(headers: &mut HeaderMap) -> bool {
    let mut stripped = false;
    for name in SIGNATURE_HEADERS {
        stripped |= headers.remove(name).is_some();
    }
    stripped
}

/// `query` without a presigned request's parameters; `None` when it had
/// none (nothing to rewrite).
pub fn strip_query(query: &str) -> Option<String> {
    let is_sig = |pair: &str| {
        let name = pair.split('=').next().unwrap_or_default();
        let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
        SIGNATURE_PARAMS
            .iter()
            .any(|p| name.eq_ignore_ascii_case(p))
    };
    if !query.split('&').any(is_sig) {
        return None;
    }
    Some(
        query
            .split('&')
            .filter(|p| !p.is_empty() && !is_sig(p))
            .collect::<Vec<_>>()
            .join("&"),
    )
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SignError(String);

/// Signs `req` (origin-form target, `Host` set) for `spec` with `secret`.
pub fn sign_request<B>(
    req: &mut Request<B>,
    spec: &SigV4Spec,
    secret: &AwsSecret,
) -> Result<(), SignError> {
    let s3 = spec.service == "s3";
    let mut settings = SigningSettings::default();
    if s3 {
        // S3 signs the path as sent: no normalisation, no double encoding,
        // and always the payload's hash (or UNSIGNED-PAYLOAD) in a header.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    if spec.query {
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(PRESIGNED_FOR);
    }
    let identity = aws_credential_types::Credentials::new(
        secret.access_key_id.clone(),
        secret.secret_access_key.to_string(),
        secret.session_token.as_ref().map(|t| t.to_string()),
        None,
        "leash",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&spec.region)
        .name(&spec.service)
        .time(SystemTime::now())
        .settings(settings)
        .build()
        .map_err(|e| SignError(e.to_string()))?
        .into();
    let hash = req.extensions().get::<PayloadHash>().map(|h| h.0.clone());
    let body = match (spec.unsigned_payload || (spec.query && s3), hash) {
        (true, _) => SignableBody::UnsignedPayload,
        (false, Some(hash)) => SignableBody::Precomputed(hash),
        (false, None) => SignableBody::empty(),
    };
    let headers = req
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)));
    let uri = req.uri().to_string();
    let signable = SignableRequest::new(req.method().as_str(), uri, headers, body)
        .map_err(|e| SignError(e.to_string()))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| SignError(e.to_string()))?
        .into_parts();
    instructions.apply_to_request_http1x(req);
    Ok(())
}

/// The SHA-256 of a body, hex.
pub fn payload_hash(frames: &[bytes::Bytes]) -> PayloadHash {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for f in frames {
        ctx.update(f);
    }
    PayloadHash(hex_lower(ctx.finish().as_ref()))
}

fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presigned_parameters_are_found_however_written() {
        assert_eq!(strip_query("a=1&b=2"), None);
        assert_eq!(
            strip_query(
                "X-Amz-Algorithm=AWS4-HMAC-SHA256&a=1&x-amz-signature=ff&X%2DAmz%2DDate=1&b=2"
            )
            .as_deref(),
            Some("a=1&b=2")
        );
    }

    #[test]
    fn the_empty_body_hashes_as_aws_documents() {
        assert_eq!(
            payload_hash(&[]).0,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
