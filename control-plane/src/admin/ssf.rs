//! OpenID Shared Signals on the admin API.
//!
//! - `POST /ssf/events`: Security Event Tokens pushed by transmitters (RFC
//!   8935), authenticated by the SET's own signature (the transmitter's
//!   JWKS), not by an admin token; every event, accepted or refused, is
//!   audited.
//! - `/.well-known/ssf-configuration`: this control plane as a transmitter.
//! - `/v1/ssf/streams`, `/v1/ssf/status`, `/v1/ssf/verify`: the streams it
//!   transmits on (SSF 1.0 §8.1), and `/ssf/poll/{stream_id}`, where a poll
//!   stream's receiver polls (RFC 8936) with the stream's own token.

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};

use super::types::{ErrorBody, SsfErrorBody};
use super::{AdminRole, AdminState, ApiError, Audited, Viewer};
use crate::ssf::{MAX_SET_BYTES, refuse};
use crate::ssf_out::{POLL, PUSH, PollRequest, PollToken, STATUSES, StreamConfig};

// `202` once the revocation it maps to is committed, else `400` with RFC
// 8935's error code (`invalid_request`, `invalid_key`, `invalid_issuer`,
// `invalid_audience`, `access_denied`). Authenticated by the SET's
// signature, not by an admin token.
/// Receive one Security Event Token (RFC 8935 push delivery).
///
/// Public.
#[utoipa::path(post, path = "/ssf/events", operation_id = "ssf_push", tag = "ssf",
    request_body(content = String, content_type = "application/secevent+jwt",
        description = "A SET (RFC 8417), compact JWS"),
    responses((status = 202, description = "accepted: the revocation is committed"),
        (status = 400, body = SsfErrorBody,
            description = "refused: invalid_request, invalid_key, invalid_issuer, invalid_audience or access_denied")))]
pub(super) async fn push(State(s): State<AdminState>, headers: HeaderMap, body: Body) -> Response {
    let typed = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/secevent+jwt"));
    let outcome = if typed {
        match http_body_util::Limited::new(body, MAX_SET_BYTES)
            .collect()
            .await
        {
            Ok(bytes) => s.cp.ssf.receive(&s.cp, &bytes.to_bytes(), None).await,
            Err(_) => Err(refuse(
                "invalid_request",
                format!("a SET of more than {MAX_SET_BYTES} bytes"),
            )),
        }
    } else {
        Err(refuse(
            "invalid_request",
            "Content-Type must be application/secevent+jwt",
        ))
    };
    crate::ssf::audit(&s.cp, "/ssf/events", &outcome).await;
    match outcome {
        Ok(_) => StatusCode::ACCEPTED.into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(SsfErrorBody {
                err: e.err.to_owned(),
                description: e.description,
            }),
        )
            .into_response(),
    }
}

/// The admin API's URL as the caller reached it.
fn base_url(s: &AdminState, headers: &HeaderMap) -> String {
    let scheme = if s.config_dump["admin_tls"].is_null() || s.config_dump["admin_tls"] == false {
        "http"
    } else {
        "https"
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| h.parse::<http::uri::Authority>().is_ok())
        .unwrap_or("localhost");
    format!("{scheme}://{host}")
}

/// The transmitter's metadata (SSF 1.0 §7.1): issuer, JWKS, delivery
/// methods, the stream, status and verification endpoints.
///
/// Public.
#[utoipa::path(get, path = "/.well-known/ssf-configuration", operation_id = "ssf_configuration", tag = "ssf",
    responses((status = 200, body = Object, content_type = "application/json",
        description = "SSF transmitter configuration metadata")))]
pub(super) async fn configuration(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    let base = base_url(&s, &headers);
    Json(json!({
        "spec_version": "1_0",
        "issuer": s.cp.issuer.issuer(),
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "delivery_methods_supported": [PUSH, POLL],
        "configuration_endpoint": format!("{base}/v1/ssf/streams"),
        "status_endpoint": format!("{base}/v1/ssf/status"),
        "verification_endpoint": format!("{base}/v1/ssf/verify"),
        "authorization_schemes": [{"spec_urn": "urn:ietf:rfc:6750"}],
    }))
    .into_response()
}

/// `?stream_id=`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct StreamQuery {
    /// The stream; every stream when left out (reading only).
    stream_id: Option<String>,
}

fn stream_query(q: Result<Query<StreamQuery>, QueryRejection>) -> Result<StreamQuery, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::invalid(e.body_text()))
}

/// The stream `id`, or 404.
async fn find(s: &AdminState, id: &str) -> Result<StreamConfig, ApiError> {
    s.cp.ssf_out
        .stream(&s.cp, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no stream {id:?}")))
}

/// A stream policy names cannot be changed here.
fn owned(stream: &StreamConfig) -> Result<(), ApiError> {
    if stream.from_policy {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "stream {:?} is named in policy (ssf.receivers): change it there",
                stream.stream_id
            ),
        ));
    }
    Ok(())
}

/// The stream as SSF shows it, with what it delivered, was refused,
/// failed and dropped.
fn shown(s: &AdminState, base: &str, stream: &StreamConfig) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let mut v = stream.to_json(s.cp.issuer.issuer(), base);
    let c = s.cp.ssf_out.counts(&stream.stream_id);
    v["leash_counts"] = json!({
        "delivered": c.delivered.load(Relaxed),
        "refused": c.refused.load(Relaxed),
        "failed": c.failed.load(Relaxed),
        "dropped": c.dropped.load(Relaxed),
    });
    v
}

/// The streams this control plane transmits on (SSF 1.0 §8.1.1.2): those
/// policy names (`ssf.receivers`) and those receivers created, or one
/// (`?stream_id=`). `leash_counts` says what this replica delivered on
/// each.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/ssf/streams", operation_id = "ssf_streams", tag = "ssf",
    params(StreamQuery), security(("bearer" = [])),
    responses((status = 200, body = Object, content_type = "application/json",
        description = "a stream configuration, or an array of them"),
        (status = 404, body = ErrorBody)))]
pub(super) async fn streams(
    State(s): State<AdminState>,
    _: Viewer,
    headers: HeaderMap,
    q: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = stream_query(q)?;
    let base = base_url(&s, &headers);
    if let Some(id) = q.stream_id {
        return Ok(Json(shown(&s, &base, &find(&s, &id).await?)));
    }
    let streams = s.cp.ssf_out.streams(&s.cp).await?;
    Ok(Json(Value::Array(
        streams.iter().map(|st| shown(&s, &base, st)).collect(),
    )))
}

/// A stream configuration as a receiver sends it (SSF 1.0 §8.1.1).
/// Transmitter-supplied members (`iss`, `events_supported`, …) are
/// ignored, so a configuration read can be sent back changed.
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
pub(super) struct StreamRequest {
    /// Needed to change or replace a stream.
    #[serde(default)]
    stream_id: Option<String>,
    /// `{"method": "urn:ietf:rfc:8935", "endpoint_url": "…"}` (push) or
    /// `{"method": "urn:ietf:rfc:8936"}` (poll: the endpoint is Leash's).
    #[serde(default)]
    delivery: Option<DeliveryRequest>,
    /// Event-type URIs.
    #[serde(default)]
    events_requested: Option<Vec<String>>,
    #[serde(default)]
    description: Option<String>,
    /// The `aud` of the stream's SETs (default: the stream id).
    #[serde(default)]
    aud: Option<String>,
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
pub(super) struct DeliveryRequest {
    method: String,
    #[serde(default)]
    endpoint_url: Option<String>,
}

/// `req` applied to `stream` (every member given replaces the stream's).
fn apply(mut stream: StreamConfig, req: StreamRequest) -> Result<StreamConfig, ApiError> {
    if let Some(d) = req.delivery {
        match d.method.as_str() {
            PUSH => {
                let url = d.endpoint_url.unwrap_or_default();
                leash_api::policy::parse_target_url(&url)
                    .map_err(|e| ApiError::invalid(format!("delivery.endpoint_url: {e}")))?;
                stream.poll = false;
                stream.endpoint_url = url;
            }
            POLL => {
                // The endpoint is the transmitter's to say.
                stream.poll = true;
                stream.endpoint_url = String::new();
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "delivery.method {other:?}: use {PUSH} (push) or {POLL} (poll)"
                )));
            }
        }
    }
    if let Some(events) = req.events_requested {
        if events.len() > 32 || events.iter().any(|e| e.is_empty() || e.len() > 256) {
            return Err(ApiError::invalid(
                "events_requested: at most 32 event-type URIs of at most 256 bytes",
            ));
        }
        stream.events_requested = events;
    }
    if let Some(d) = req.description {
        if d.chars().count() > 256 {
            return Err(ApiError::invalid("description: at most 256 characters"));
        }
        stream.description = Some(d);
    }
    if let Some(aud) = req.aud {
        if aud.is_empty() || aud.len() > 256 {
            return Err(ApiError::invalid("aud: 1 to 256 bytes"));
        }
        stream.audience = aud;
    }
    Ok(stream)
}

/// A stream that became a poll stream gets a token (returned once, as
/// `leash_poll_token`); one that became a push stream loses it.
fn token_for(stream: &mut StreamConfig) -> Option<String> {
    match (stream.poll, &stream.poll_token) {
        (true, PollToken::None) => {
            let (token, record) = PollToken::generate();
            stream.poll_token = record;
            Some(token)
        }
        (false, _) => {
            stream.poll_token = PollToken::None;
            None
        }
        (true, _) => None,
    }
}

/// The stream as shown, with a new poll token once.
fn with_token(mut shown: Value, token: Option<String>) -> Value {
    if let Some(token) = token {
        shown["leash_poll_token"] = token.into();
    }
    shown
}

/// Create a stream (SSF 1.0 §8.1.1.1): push to the receiver's
/// `endpoint_url`, or held for it to poll. It is enabled at once; its id,
/// `aud` and (poll) endpoint are in the answer, and for a poll stream the
/// bearer token its receiver polls with (`leash_poll_token`, shown only
/// here: Leash keeps its SHA-256).
///
/// Role: admin.
#[utoipa::path(post, path = "/v1/ssf/streams", operation_id = "ssf_stream_create", tag = "ssf",
    request_body = StreamRequest, security(("bearer" = [])),
    responses((status = 201, body = Object, content_type = "application/json"),
        (status = 400, body = ErrorBody)))]
pub(super) async fn create_stream(
    State(s): State<AdminState>,
    AdminRole(caller): AdminRole,
    headers: HeaderMap,
    body: Result<Json<StreamRequest>, JsonRejection>,
) -> Result<Audited<Value>, ApiError> {
    let Json(req) = body?;
    if req.stream_id.is_some() {
        return Err(ApiError::invalid(
            "stream_id is the transmitter's to choose",
        ));
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let fresh = StreamConfig {
        stream_id: id.clone(),
        audience: id.clone(),
        poll: true,
        endpoint_url: String::new(),
        events_requested: Vec::new(),
        description: None,
        status: "enabled".into(),
        reason: None,
        from_policy: false,
        poll_token: PollToken::None,
        ca_pem: None,
    };
    let mut stream = apply(fresh, req)?;
    let token = token_for(&mut stream);
    s.cp.store
        .put_ssf_stream(&stream.to_row(crate::store::now_ms(), &caller.actor), false)
        .await?;
    let detail = format!(
        "stream {id} created ({})",
        if stream.poll { "poll" } else { "push" }
    );
    Ok(Audited(
        StatusCode::CREATED,
        with_token(shown(&s, &base_url(&s, &headers), &stream), token),
        detail,
    ))
}

async fn change(
    s: &AdminState,
    headers: &HeaderMap,
    req: StreamRequest,
    replace: bool,
) -> Result<Audited<Value>, ApiError> {
    let id = req
        .stream_id
        .clone()
        .ok_or_else(|| ApiError::invalid("stream_id is required"))?;
    let old = find(s, &id).await?;
    owned(&old)?;
    let base = if replace {
        if req.delivery.is_none() {
            return Err(ApiError::invalid(
                "delivery is required: PUT replaces the whole configuration",
            ));
        }
        StreamConfig {
            events_requested: Vec::new(),
            description: None,
            audience: id.clone(),
            ..old.clone()
        }
    } else {
        old.clone()
    };
    let mut stream = apply(base, req)?;
    let token = token_for(&mut stream);
    s.cp.store
        .put_ssf_stream(&stream.to_row(0, ""), true)
        .await?;
    if old.poll && !stream.poll {
        s.cp.ssf_out.resume(&s.cp, &stream).await?;
    }
    Ok(Audited(
        StatusCode::OK,
        with_token(shown(s, &base_url(s, headers), &stream), token),
        format!(
            "stream {id} {}",
            if replace { "replaced" } else { "updated" }
        ),
    ))
}

/// Change a stream (SSF 1.0 §8.1.1.3): the members given replace the
/// stream's. Streams policy names are changed in policy (`409`).
///
/// Role: admin.
#[utoipa::path(patch, path = "/v1/ssf/streams", operation_id = "ssf_stream_update", tag = "ssf",
    request_body = StreamRequest, security(("bearer" = [])),
    responses((status = 200, body = Object, content_type = "application/json"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub(super) async fn update_stream(
    State(s): State<AdminState>,
    _: AdminRole,
    headers: HeaderMap,
    body: Result<Json<StreamRequest>, JsonRejection>,
) -> Result<Audited<Value>, ApiError> {
    let Json(req) = body?;
    change(&s, &headers, req, false).await
}

/// Replace a stream's configuration (SSF 1.0 §8.1.1.4): members left out
/// take their defaults.
///
/// Role: admin.
#[utoipa::path(put, path = "/v1/ssf/streams", operation_id = "ssf_stream_replace", tag = "ssf",
    request_body = StreamRequest, security(("bearer" = [])),
    responses((status = 200, body = Object, content_type = "application/json"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub(super) async fn replace_stream(
    State(s): State<AdminState>,
    _: AdminRole,
    headers: HeaderMap,
    body: Result<Json<StreamRequest>, JsonRejection>,
) -> Result<Audited<Value>, ApiError> {
    let Json(req) = body?;
    change(&s, &headers, req, true).await
}

/// Delete a stream and the SETs it held (SSF 1.0 §8.1.1.5).
///
/// Role: admin.
#[utoipa::path(delete, path = "/v1/ssf/streams", operation_id = "ssf_stream_delete", tag = "ssf",
    params(StreamQuery), security(("bearer" = [])),
    responses((status = 204, description = "deleted"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub(super) async fn delete_stream(
    State(s): State<AdminState>,
    _: AdminRole,
    q: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = stream_query(q)?
        .stream_id
        .ok_or_else(|| ApiError::invalid("stream_id is required"))?;
    owned(&find(&s, &id).await?)?;
    if !s.cp.store.delete_ssf_stream(&id).await? {
        return Err(ApiError::not_found(format!("no stream {id:?}")));
    }
    Ok(super::with_detail(
        StatusCode::NO_CONTENT.into_response(),
        format!("stream {id} deleted"),
    ))
}

/// A stream's status (SSF 1.0 §8.1.2.1).
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/ssf/status", operation_id = "ssf_status", tag = "ssf",
    params(StreamQuery), security(("bearer" = [])),
    responses((status = 200, body = Object, content_type = "application/json"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn status(
    State(s): State<AdminState>,
    _: Viewer,
    q: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = stream_query(q)?
        .stream_id
        .ok_or_else(|| ApiError::invalid("stream_id is required"))?;
    let stream = find(&s, &id).await?;
    let mut v = json!({"stream_id": id, "status": stream.status});
    if let Some(r) = stream.reason {
        v["reason"] = r.into();
    }
    Ok(Json(v))
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
pub(super) struct StatusRequest {
    stream_id: String,
    /// `enabled`, `paused` (SETs held, sent once enabled) or `disabled`
    /// (no SETs made).
    status: String,
    #[serde(default)]
    reason: Option<String>,
}

/// Change a stream's status (SSF 1.0 §8.1.2.2). A push stream enabled
/// again gets what was held while it was paused.
///
/// Role: admin.
#[utoipa::path(post, path = "/v1/ssf/status", operation_id = "ssf_status_update", tag = "ssf",
    request_body = StatusRequest, security(("bearer" = [])),
    responses((status = 200, body = Object, content_type = "application/json"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub(super) async fn set_status(
    State(s): State<AdminState>,
    _: AdminRole,
    body: Result<Json<StatusRequest>, JsonRejection>,
) -> Result<Audited<Value>, ApiError> {
    let Json(req) = body?;
    if !STATUSES.contains(&req.status.as_str()) {
        return Err(ApiError::invalid(format!(
            "status {:?}: use enabled, paused or disabled",
            req.status
        )));
    }
    if req.reason.as_ref().is_some_and(|r| r.chars().count() > 256) {
        return Err(ApiError::invalid("reason: at most 256 characters"));
    }
    let old = find(&s, &req.stream_id).await?;
    owned(&old)?;
    let stream = StreamConfig {
        status: req.status.clone(),
        reason: req.reason.clone(),
        ..old
    };
    s.cp.store
        .put_ssf_stream(&stream.to_row(0, ""), true)
        .await?;
    s.cp.ssf_out.resume(&s.cp, &stream).await?;
    let mut v = json!({"stream_id": stream.stream_id, "status": stream.status});
    if let Some(r) = &stream.reason {
        v["reason"] = r.clone().into();
    }
    let detail = format!("stream {} {}", stream.stream_id, stream.status);
    Ok(Audited(StatusCode::OK, v, detail))
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
pub(super) struct VerifyRequest {
    stream_id: String,
    /// Echoed in the verification event.
    #[serde(default)]
    state: Option<String>,
}

/// Ask for a verification event (SSF 1.0 §8.1.4) on a stream.
///
/// Role: admin.
#[utoipa::path(post, path = "/v1/ssf/verify", operation_id = "ssf_verify", tag = "ssf", security(("bearer" = [])),
    request_body = VerifyRequest,
    responses((status = 204, description = "queued"), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub(super) async fn verify(
    State(s): State<AdminState>,
    _: AdminRole,
    body: Result<Json<VerifyRequest>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(req) = body?;
    if req.state.as_ref().is_some_and(|st| st.len() > 256) {
        return Err(ApiError::invalid("state: at most 256 bytes"));
    }
    let stream = find(&s, &req.stream_id).await?;
    if stream.status == "disabled" {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("stream {:?} is disabled", stream.stream_id),
        ));
    }
    s.cp.ssf_out
        .verify(&s.cp, &stream, req.state.as_deref())
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Poll a stream for its SETs (RFC 8936 §2.4): acknowledge (`ack`) or
/// report (`setErrs`) those received, and get those still held, oldest
/// first, waiting up to 25 s unless `returnImmediately`. A SET is
/// returned again until it is acknowledged or reported. Authenticated by
/// the stream's own bearer token (`leash_poll_token` at creation, or the
/// policy's `poll_token_file`), not by an admin token: `401` for a wrong
/// token and for a stream that does not exist alike.
///
/// Public.
#[utoipa::path(post, path = "/ssf/poll/{stream_id}", operation_id = "ssf_poll", tag = "ssf",
    params(("stream_id" = String, Path, description = "A poll stream")),
    request_body = PollRequest,
    responses((status = 200, body = Object, content_type = "application/json",
        description = "{\"sets\": {jti: SET}, \"moreAvailable\": true}"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 429, body = ErrorBody, description = "too_many_failures: too many calls without a valid token from this address")))]
pub(super) async fn poll(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<PollRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let stream = s.cp.ssf_out.stream(&s.cp, &id).await?;
    // A valid token is never limited; failures count against the address
    // as they do on /v1.
    let Some(stream) = stream.filter(|st| presented.is_some_and(|t| st.poll_token.admits(t)))
    else {
        return Ok(super::access::unauthenticated(
            &s,
            peer.ip(),
            "POST",
            "/ssf/poll/{stream_id}",
            "a poll stream and its bearer token (Authorization: Bearer …)".into(),
        ));
    };
    let Json(req) = body?;
    if req.ack.len() + req.set_errs.len() > 1000 {
        return Err(ApiError::invalid(
            "at most 1000 SETs acknowledged or reported per poll",
        ));
    }
    if !stream.poll {
        return Err(ApiError::invalid(format!(
            "stream {id:?} is pushed ({PUSH}), not polled"
        )));
    }
    Ok(Json(s.cp.ssf_out.poll(&s.cp, &stream, req).await?).into_response())
}
