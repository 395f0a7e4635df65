//! `/v1/tokens`: admin API tokens, created by an admin and shown once.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;

use super::types::{ErrorBody, TokenCreated, TokenRequest};
use super::{AdminRole, AdminState, ApiError, Audited};
use crate::auth::{self, Role};

/// Create an API token (its secret is shown once, stored only as a hash).
///
/// Role: admin.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens",
    request_body = TokenRequest, security(("bearer" = [])),
    responses((status = 201, body = TokenCreated), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub(super) async fn create(
    State(s): State<AdminState>,
    AdminRole(caller): AdminRole,
    body: Result<Json<TokenRequest>, JsonRejection>,
) -> Result<Audited<TokenCreated>, ApiError> {
    let Json(req) = body?;
    let role = Role::parse(&req.role)
        .ok_or_else(|| ApiError::invalid("role must be viewer, responder or admin"))?;
    if req.name.is_empty() || req.name.len() > 64 {
        return Err(ApiError::invalid("name must be 1-64 bytes"));
    }
    let token = auth::create_token(&s.cp.store, &req.name, role, &caller.actor).await?;
    // The audit entry names the token, never its secret.
    let detail = format!("created {} token {:?}", role.as_str(), req.name);
    Ok(Audited(
        StatusCode::CREATED,
        TokenCreated {
            name: req.name,
            role: role.as_str().to_owned(),
            token,
        },
        detail,
    ))
}
