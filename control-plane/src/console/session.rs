//! Console sessions: sign-in with an admin token exchanged for a cookie,
//! the per-session CSRF value, and the extractor that turns a request's
//! cookie back into the token's caller.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::{SecureRandom as _, SystemRandom};

use super::ConsoleState;
use crate::auth::Caller;
use crate::store::{ConsoleSession, StoreError, now_ms};

/// The cookie's name.
pub const COOKIE: &str = "leash_console";

/// How long a session lasts from sign-in.
pub const LIFETIME: std::time::Duration = std::time::Duration::from_secs(8 * 3600);

/// 32 random bytes, base64url.
fn random() -> String {
    let mut b = [0u8; 32];
    // SystemRandom only fails if the OS has no entropy source at all.
    let _ = SystemRandom::new().fill(&mut b);
    B64.encode(b)
}

fn sha256_hex(s: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()))
}

/// Opens a session for token `token_id`; returns the cookie's secret.
pub async fn open(state: &ConsoleState, token_id: &str) -> Result<String, StoreError> {
    let secret = random();
    let now = now_ms();
    state
        .cp
        .store
        .insert_console_session(&ConsoleSession {
            id_sha256: sha256_hex(&secret),
            token_id: token_id.to_owned(),
            csrf: random(),
            created_at_ms: now,
            expires_at_ms: now + i64::try_from(LIFETIME.as_millis()).unwrap_or(i64::MAX),
            ended_at_ms: None,
        })
        .await?;
    Ok(secret)
}

/// The `Set-Cookie` value of a session (`secret`), or of its removal.
pub fn set_cookie(secret: Option<&str>, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let text = match secret {
        Some(s) => format!(
            "{COOKIE}={s}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            LIFETIME.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    };
    // Only base64url characters and fixed text: always a valid header.
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static(""))
}

/// The session cookie's value in `headers`, if any.
pub fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|v| !v.is_empty())
}

/// A signed-in session: who it acts as, and its CSRF value.
pub struct Signed {
    pub caller: Caller,
    pub csrf: String,
    pub id_sha256: String,
}

impl Signed {
    /// Whether `sent` is this session's CSRF value (constant time).
    pub fn csrf_ok(&self, sent: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        self.csrf.as_bytes().ct_eq(sent.as_bytes()).into()
    }
}

/// Why a request has no session: the page sends the browser to sign in,
/// saying why.
pub struct NotSignedIn(&'static str);

impl IntoResponse for NotSignedIn {
    fn into_response(self) -> Response {
        Redirect::to(&format!("/console/sign-in?why={}", self.0)).into_response()
    }
}

impl FromRequestParts<Arc<ConsoleState>> for Signed {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ConsoleState>,
    ) -> Result<Self, Self::Rejection> {
        let secret = cookie(&parts.headers).ok_or(NotSignedIn("none").into_response())?;
        let id_sha256 = sha256_hex(&secret);
        let session = match state.cp.store.console_session(&id_sha256).await {
            Ok(Some(s)) => s,
            Ok(None) => return Err(NotSignedIn("unknown").into_response()),
            Err(e) => return Err(super::unavailable(&e)),
        };
        if session.ended_at_ms.is_some() {
            return Err(NotSignedIn("signed-out").into_response());
        }
        if session.expires_at_ms <= now_ms() {
            return Err(NotSignedIn("expired").into_response());
        }
        let caller = match crate::auth::caller_of(&state.cp.store, &session.token_id).await {
            Ok(c) => c,
            Err(crate::auth::AuthError::Store(e)) => return Err(super::unavailable(&e)),
            Err(_) => return Err(NotSignedIn("token-gone").into_response()),
        };
        Ok(Signed {
            caller,
            csrf: session.csrf,
            id_sha256,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_among_others_and_its_attributes_are_strict() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; leash_console=abc_-9; b=2"),
        );
        assert_eq!(cookie(&h).as_deref(), Some("abc_-9"));
        h.clear();
        h.append(header::COOKIE, HeaderValue::from_static("leash_console="));
        assert_eq!(cookie(&h), None);
        let set = set_cookie(Some("s3cret"), true);
        let set = set.to_str().unwrap();
        for part in [
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Path=/console",
            "Max-Age=28800",
        ] {
            assert!(set.contains(part), "{set}");
        }
        assert!(
            !set_cookie(Some("x"), false)
                .to_str()
                .unwrap()
                .contains("Secure")
        );
        assert!(
            set_cookie(None, false)
                .to_str()
                .unwrap()
                .contains("Max-Age=0")
        );
    }
}
