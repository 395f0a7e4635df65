//! The `oauth2-client-credentials` credential: the control plane exchanges
//! the upstream's brokered client secret at its token endpoint (RFC 6749
//! §4.4), caches the access token, and leases it to sidecars until shortly
//! before it expires. One exchange per upstream at a time; a token endpoint
//! that fails, hangs or answers garbage yields a typed error, never a token
//! past its expiry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use zeroize::Zeroizing;

/// A token is not leased in the last part of its life: 10 % of it, at least 5 s.
fn margin(lifetime: Duration) -> Duration {
    (lifetime / 10)
        .max(Duration::from_secs(5))
        .min(lifetime / 2)
}

const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_RESPONSE: usize = 64 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("token endpoint unreachable: {0}")]
    Unreachable(String),
    #[error("token endpoint did not answer within {0:?}")]
    Timeout(Duration),
    #[error("token endpoint refused the exchange: HTTP {status}{detail}")]
    Refused { status: u16, detail: String },
    #[error("token endpoint answered something that is not a token response: {0}")]
    Invalid(String),
}

/// A leased access token.
#[derive(Clone)]
pub struct AccessToken {
    pub id: String,
    pub token: Arc<Zeroizing<String>>,
    /// Stop leasing after this.
    pub use_until: Instant,
    /// Wall-clock expiry of the lease, in Unix ms.
    pub use_until_unix_ms: i64,
}

pub struct Exchange<'a> {
    pub upstream: &'a str,
    pub token_url: &'a str,
    pub client_id: &'a str,
    pub client_secret: &'a [u8],
    pub scopes: &'a [String],
}

#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<AccessToken>>>>>,
    client: std::sync::OnceLock<Client<HttpsConnector<HttpConnector>, Full<Bytes>>>,
}

impl TokenCache {
    fn client(&self) -> &Client<HttpsConnector<HttpConnector>, Full<Bytes>> {
        self.client.get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let (_added, _ignored) =
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            let tls = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let connector = HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .build();
            Client::builder(TokioExecutor::new()).build(connector)
        })
    }

    /// Drops the cached token whose lease id is `id` (it was revoked): the
    /// next lease exchanges anew. A slot busy with an exchange already holds
    /// (or is getting) another token.
    pub fn forget(&self, id: &str) -> bool {
        let tokens = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for slot in tokens.values() {
            if let Ok(mut cached) = slot.try_lock()
                && cached.as_ref().is_some_and(|t| t.id == id)
            {
                *cached = None;
                return true;
            }
        }
        false
    }

    /// A token valid for a while yet: the cached one, or a fresh exchange.
    pub async fn get(&self, x: &Exchange<'_>) -> Result<AccessToken, TokenError> {
        let slot = {
            let mut tokens = self
                .tokens
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            tokens.entry(x.upstream.to_owned()).or_default().clone()
        };
        // Held across the exchange: concurrent callers wait for its result.
        let mut cached = slot.lock().await;
        if let Some(t) = cached.as_ref().filter(|t| Instant::now() < t.use_until) {
            return Ok(t.clone());
        }
        *cached = None;
        let fresh = self.exchange(x).await?;
        *cached = Some(fresh.clone());
        Ok(fresh)
    }

    async fn exchange(&self, x: &Exchange<'_>) -> Result<AccessToken, TokenError> {
        let mut form = format!(
            "grant_type=client_credentials&client_id={}",
            encode(x.client_id.as_bytes())
        );
        if !x.scopes.is_empty() {
            form.push_str("&scope=");
            form.push_str(&encode(x.scopes.join(" ").as_bytes()));
        }
        // client_secret_basic (RFC 6749 §2.3.1): form-encoded id and secret.
        let mut basic = Zeroizing::new(encode(x.client_id.as_bytes()).into_bytes());
        basic.push(b':');
        basic.extend_from_slice(encode(x.client_secret).as_bytes());
        let authorization = Zeroizing::new(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(&*basic)
        ));
        let req = http::Request::post(x.token_url)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::AUTHORIZATION, authorization.as_str())
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| TokenError::Unreachable(e.to_string()))?;
        let started = Instant::now();
        let call = async {
            let resp = self
                .client()
                .request(req)
                .await
                .map_err(|e| TokenError::Unreachable(e.to_string()))?;
            let status = resp.status().as_u16();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| TokenError::Invalid(format!("body: {e}")))?
                .to_bytes();
            Ok::<_, TokenError>((status, body))
        };
        let (status, body) = tokio::time::timeout(EXCHANGE_TIMEOUT, call)
            .await
            .map_err(|_| TokenError::Timeout(EXCHANGE_TIMEOUT))??;
        if status != 200 {
            // The error response (RFC 6749 §5.2) names the problem; it holds no secret.
            let detail = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(|e| format!(" ({e})")))
                .unwrap_or_default();
            return Err(TokenError::Refused { status, detail });
        }
        let parsed: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| TokenError::Invalid(format!("not JSON: {e}")))?;
        let token = parsed["access_token"]
            .as_str()
            .filter(|t| !t.is_empty() && http::HeaderValue::from_str(t).is_ok())
            .ok_or_else(|| TokenError::Invalid("no usable access_token".into()))?;
        if let Some(kind) = parsed["token_type"].as_str()
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(TokenError::Invalid(format!(
                "token_type {kind:?} is not bearer"
            )));
        }
        let expires_in = parsed["expires_in"]
            .as_u64()
            .filter(|s| *s > 0)
            .ok_or_else(|| TokenError::Invalid("no positive expires_in".into()))?;
        // Counted from when the request was sent: the token cannot be older.
        let lifetime = Duration::from_secs(expires_in);
        let use_for = lifetime.saturating_sub(margin(lifetime));
        let use_until = started + use_for;
        let use_until_unix_ms = crate::store::now_ms().saturating_add(
            i64::try_from(use_for.saturating_sub(started.elapsed()).as_millis()).unwrap_or(0),
        );
        tracing::info!(upstream = %x.upstream, expires_in, "access token obtained");
        Ok(AccessToken {
            id: format!("oauth2:{}:{}", x.upstream, uuid::Uuid::new_v4().simple()),
            token: Arc::new(Zeroizing::new(token.to_owned())),
            use_until,
            use_until_unix_ms,
        })
    }
}

/// `application/x-www-form-urlencoded` encoding.
fn encode(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for &c in b {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}
