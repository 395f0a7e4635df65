//! The `oauth2-client-credentials` credential: the control plane exchanges
//! the upstream's brokered client secret at its token endpoint (RFC 6749
//! §4.4), caches the access token, and leases it to sidecars until shortly
//! before it expires. One exchange per upstream at a time; a token endpoint
//! that fails, hangs or answers garbage yields a typed error, never a token
//! past its expiry.
//!
//! Replicas on one store share the token (sealed in `oauth2_tokens`) and
//! exchange one at a time per upstream (a lease): the token endpoint sees
//! one exchange per token lifetime, however many replicas lease it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use zeroize::Zeroizing;

use crate::https::HttpsClient;

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
    #[error("the store cannot share the token: {0}")]
    Store(String),
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
    /// What the token is cached, shared and leased under: the upstream, or
    /// `upstream#workload` for tokens made for one workload.
    pub upstream: &'a str,
    pub token_url: &'a str,
    pub client_id: &'a str,
    pub auth: ClientAuth<'a>,
    pub grant: Grant<'a>,
    pub scopes: &'a [String],
}

/// How the control plane authenticates to the token endpoint.
pub enum ClientAuth<'a> {
    /// `client_secret_basic` with the upstream's brokered client secret.
    SecretBasic(&'a [u8]),
    /// RFC 7523 `private_key_jwt`: a JWT the control plane signed
    /// (`client_assertion_type` `...:jwt-bearer`). Nothing stored to leak.
    Assertion(&'a str),
}

/// What is asked for.
pub enum Grant<'a> {
    /// RFC 6749 §4.4.
    ClientCredentials,
    /// RFC 8693: `subject_token` (a JWT issued for the workload) exchanged
    /// for an access token; its `jti` names the lease.
    TokenExchange {
        subject_token: &'a str,
        jti: &'a str,
        audience: Option<&'a str>,
        resource: Option<&'a str>,
    },
}

pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<AccessToken>>>>>,
    client: std::sync::OnceLock<HttpsClient>,
}

impl TokenCache {
    fn client(&self) -> &HttpsClient {
        self.client
            .get_or_init(|| crate::https::client(crate::https::system_trust(), None))
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

    /// A token valid for a while yet and not `revoked`: the cached one, the
    /// one another replica stored, or a fresh exchange (stored for them).
    pub async fn get(
        &self,
        x: &Exchange<'_>,
        store: &crate::store::Store,
        revoked: impl Fn(&str) -> bool,
    ) -> Result<AccessToken, TokenError> {
        let slot = {
            let mut tokens = self
                .tokens
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            tokens.entry(x.upstream.to_owned()).or_default().clone()
        };
        // Held across the exchange: concurrent callers wait for its result.
        let mut cached = slot.lock().await;
        if let Some(t) = cached
            .as_ref()
            .filter(|t| Instant::now() < t.use_until && !revoked(&t.id))
        {
            return Ok(t.clone());
        }
        *cached = None;
        let store_error = |e: crate::store::StoreError| TokenError::Store(e.to_string());
        // One exchange per upstream among the replicas: the others wait,
        // then find the token it stored.
        let lease = store
            .lease(crate::store::Job::TokenExchange(x.upstream))
            .await
            .map_err(store_error)?;
        let now_ms = crate::store::now_ms();
        let shared = match store.shared_token(x.upstream).await {
            Ok(t) => t.filter(|t| t.use_until_ms > now_ms && !revoked(&t.id)),
            Err(e) => {
                lease.release().await;
                return Err(store_error(e));
            }
        };
        let token = match shared {
            Some(t) => {
                let left = u64::try_from(t.use_until_ms - now_ms).unwrap_or(0);
                AccessToken {
                    id: t.id,
                    token: Arc::new(t.token),
                    use_until: Instant::now() + Duration::from_millis(left),
                    use_until_unix_ms: t.use_until_ms,
                }
            }
            None => {
                let fresh = match self.exchange(x).await {
                    Ok(t) => t,
                    Err(e) => {
                        lease.release().await;
                        return Err(e);
                    }
                };
                let shared = crate::store::SharedToken {
                    id: fresh.id.clone(),
                    token: (*fresh.token).clone(),
                    use_until_ms: fresh.use_until_unix_ms,
                };
                if let Err(e) = store.put_shared_token(x.upstream, &shared).await {
                    // Still usable here; the other replicas exchange their own.
                    tracing::warn!(upstream = %x.upstream, error = %e, "cannot share the access token with other replicas");
                }
                fresh
            }
        };
        lease.release().await;
        *cached = Some(token.clone());
        Ok(token)
    }

    async fn exchange(&self, x: &Exchange<'_>) -> Result<AccessToken, TokenError> {
        let mut form = Zeroizing::new(match &x.grant {
            Grant::ClientCredentials => "grant_type=client_credentials".to_owned(),
            Grant::TokenExchange {
                subject_token,
                audience,
                resource,
                ..
            } => {
                let mut f = format!(
                    "grant_type={}&subject_token={}&subject_token_type={}&requested_token_type={}",
                    encode(TOKEN_EXCHANGE.as_bytes()),
                    encode(subject_token.as_bytes()),
                    encode(JWT_TOKEN_TYPE.as_bytes()),
                    encode(ACCESS_TOKEN_TYPE.as_bytes()),
                );
                for (name, value) in [("audience", audience), ("resource", resource)] {
                    if let Some(v) = value {
                        f.push_str(&format!("&{name}={}", encode(v.as_bytes())));
                    }
                }
                f
            }
        });
        form.push_str("&client_id=");
        form.push_str(&encode(x.client_id.as_bytes()));
        if !x.scopes.is_empty() {
            form.push_str("&scope=");
            form.push_str(&encode(x.scopes.join(" ").as_bytes()));
        }
        let mut req = http::Request::post(x.token_url)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json");
        match x.auth {
            ClientAuth::SecretBasic(secret) => {
                // client_secret_basic (RFC 6749 §2.3.1): form-encoded id and secret.
                let mut basic = Zeroizing::new(encode(x.client_id.as_bytes()).into_bytes());
                basic.push(b':');
                // Straight into the zeroized buffer: no copy of the secret elsewhere.
                for part in percent_encoding::percent_encode(secret, FORM) {
                    basic.extend_from_slice(part.as_bytes());
                }
                let authorization = Zeroizing::new(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(&*basic)
                ));
                req = req.header(http::header::AUTHORIZATION, authorization.as_str());
            }
            ClientAuth::Assertion(jwt) => {
                form.push_str("&client_assertion_type=");
                form.push_str(&encode(ASSERTION_TYPE.as_bytes()));
                form.push_str("&client_assertion=");
                form.push_str(&encode(jwt.as_bytes()));
            }
        }
        let req = req
            .body(Full::new(Bytes::from(form.as_bytes().to_vec())))
            .map_err(|e| TokenError::Unreachable(e.to_string()))?;
        let started = Instant::now();
        let (status, body) = call(self.client(), req).await?;
        if status != 200 {
            // The error response (RFC 6749 §5.2) names the problem; it holds no secret.
            let detail = serde_json::from_slice::<TokenErrorResponse>(&body)
                .map(|e| format!(" ({})", e.error))
                .unwrap_or_default();
            return Err(TokenError::Refused { status, detail });
        }
        let (token, expires_in) = parse_token_response(&body)?;
        // Counted from when the request was sent: the token cannot be older.
        let lifetime = Duration::from_secs(expires_in);
        let use_for = lifetime.saturating_sub(margin(lifetime));
        let use_until = started + use_for;
        let use_until_unix_ms = crate::store::now_ms().saturating_add(
            i64::try_from(use_for.saturating_sub(started.elapsed()).as_millis()).unwrap_or(0),
        );
        tracing::info!(upstream = %x.upstream, expires_in, "access token obtained");
        let id = match &x.grant {
            Grant::ClientCredentials => {
                format!(
                    "oauth2:{}:{}",
                    upstream_name(x),
                    uuid::Uuid::new_v4().simple()
                )
            }
            // The subject token's jti: revoking this lease names it.
            Grant::TokenExchange { jti, .. } => format!("oauth2x:{}:{jti}", upstream_name(x)),
        };
        Ok(AccessToken {
            id,
            token: Arc::new(token),
            use_until,
            use_until_unix_ms,
        })
    }
}

/// The upstream of an exchange cached per workload (`upstream#workload`).
fn upstream_name<'a>(x: &Exchange<'a>) -> &'a str {
    x.upstream.split('#').next().unwrap_or(x.upstream)
}

/// Sends a request to a token endpoint (or STS), within the exchange
/// timeout, and reads at most 64 KiB of its answer: (status, body).
pub(crate) async fn call(
    client: &HttpsClient,
    req: http::Request<Full<Bytes>>,
) -> Result<(u16, Bytes), TokenError> {
    call_within(client, req, EXCHANGE_TIMEOUT, MAX_RESPONSE).await
}

/// [`call`], answered within `timeout` and in at most `max_body` bytes.
pub(crate) async fn call_within(
    client: &HttpsClient,
    req: http::Request<Full<Bytes>>,
    timeout: Duration,
    max_body: usize,
) -> Result<(u16, Bytes), TokenError> {
    let call = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| TokenError::Unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| TokenError::Invalid(format!("body: {e}")))?
            .to_bytes();
        Ok::<_, TokenError>((status, body))
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| TokenError::Timeout(timeout))?
}

/// What `application/x-www-form-urlencoded` leaves as it is (RFC 3986's
/// unreserved characters); everything else is percent-encoded.
const FORM: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `application/x-www-form-urlencoded` encoding (spaces as `%20`).
fn encode(b: &[u8]) -> String {
    percent_encoding::percent_encode(b, FORM).to_string()
}

/// A token endpoint's answer (RFC 6749 §5.1). The token is zeroized when
/// dropped; nothing else of the answer is kept.
#[derive(serde::Deserialize)]
struct TokenResponse {
    access_token: Zeroizing<String>,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// A usable bearer token and its lifetime in seconds, from a token
/// endpoint's successful answer. Errors never quote the answer.
fn parse_token_response(body: &[u8]) -> Result<(Zeroizing<String>, u64), TokenError> {
    // Only where it failed: serde_json's message can quote a value.
    let parsed: TokenResponse = serde_json::from_slice(body).map_err(|e| {
        TokenError::Invalid(format!(
            "not a token response ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    let token = parsed.access_token;
    if token.is_empty() || http::HeaderValue::from_str(&token).is_err() {
        return Err(TokenError::Invalid("no usable access_token".into()));
    }
    if let Some(kind) = &parsed.token_type
        && !kind.eq_ignore_ascii_case("bearer")
    {
        return Err(TokenError::Invalid(format!(
            "token_type {kind:?} is not bearer"
        )));
    }
    let expires_in = parsed
        .expires_in
        .filter(|s| *s > 0)
        .ok_or_else(|| TokenError::Invalid("no positive expires_in".into()))?;
    Ok((token, expires_in))
}

/// A token endpoint's refusal (RFC 6749 §5.2): only the error code is read.
#[derive(serde::Deserialize)]
struct TokenErrorResponse {
    error: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_db::store_test;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A token endpoint answering a new token to each exchange, counting them.
    async fn counting_token_endpoint() -> (String, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let count = Arc::new(AtomicU64::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(
                        hyper_util::rt::TokioIo::new(tcp),
                        hyper::service::service_fn(move |_req| {
                            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
                            async move {
                                // Slow enough that the replicas ask at once.
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                let body = format!(
                                    r#"{{"access_token":"at-{n}","token_type":"Bearer","expires_in":3600}}"#
                                );
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                    Bytes::from(body),
                                )))
                            }
                        }),
                    ),
                );
            }
        });
        (url, count)
    }

    store_test!(
        /// Two replicas lease one upstream's token at once: one exchange,
        /// one token; once it is revoked, one new exchange for both.
        async fn replicas_share_one_exchange_per_upstream(db: &TestDb) {
            let key = || {
                Some(Arc::new(
                    crate::secrets::MasterKey::from_base64(
                        &crate::secrets::MasterKey::generate_base64(),
                    )
                    .unwrap(),
                ))
            };
            let master = key();
            let a = db.open(master.clone()).await.unwrap();
            let b = db.open(master).await.unwrap();
            let (token_url, exchanges) = counting_token_endpoint().await;
            let x = Exchange {
                upstream: "payments",
                token_url: &token_url,
                client_id: "leash",
                auth: ClientAuth::SecretBasic(b"client-secret"),
                grant: Grant::ClientCredentials,
                scopes: &[],
            };
            let (cache_a, cache_b) = (TokenCache::default(), TokenCache::default());
            let (ta, tb) = tokio::join!(
                cache_a.get(&x, &a, |_| false),
                cache_b.get(&x, &b, |_| false)
            );
            let (ta, tb) = (ta.unwrap(), tb.unwrap());
            if db.backend() == crate::store::Backend::Postgres {
                assert_eq!(exchanges.load(Ordering::SeqCst), 1, "one exchange");
                assert_eq!(ta.id, tb.id);
                assert_eq!(ta.token.as_str(), tb.token.as_str());
            }
            // Sealed at rest: the token is not in the table in the clear.
            let sealed = db
                .text(if db.backend() == crate::store::Backend::Postgres {
                    "SELECT encode(sealed, 'hex') FROM oauth2_tokens WHERE upstream = 'payments'"
                } else {
                    "SELECT lower(hex(sealed)) FROM oauth2_tokens WHERE upstream = 'payments'"
                })
                .await;
            let clear = hex::encode(ta.token.as_bytes());
            assert!(!sealed.is_empty() && !sealed.contains(&clear), "{sealed}");

            // Revoked: neither replica leases it again; one new exchange.
            let before = exchanges.load(Ordering::SeqCst);
            let revoked_id = ta.id.clone();
            let revoked = |id: &str| id == revoked_id;
            let (na, nb) = tokio::join!(cache_a.get(&x, &a, revoked), cache_b.get(&x, &b, revoked));
            let (na, nb) = (na.unwrap(), nb.unwrap());
            assert_ne!(na.id, revoked_id);
            assert_ne!(nb.id, revoked_id);
            if db.backend() == crate::store::Backend::Postgres {
                assert_eq!(exchanges.load(Ordering::SeqCst), before + 1);
                assert_eq!(na.id, nb.id);
            }
            // A store without the master key shares nothing.
            let c = db.open(None).await.unwrap();
            assert!(c.shared_token("payments").await.unwrap().is_none());
            a.close().await;
            b.close().await;
            c.close().await;
        }
    );

    #[test]
    fn token_responses_are_read_typed_and_errors_never_quote_them() {
        let (token, expires_in) = parse_token_response(
            br#"{"access_token":"at-123","token_type":"Bearer","expires_in":60,"scope":"x"}"#,
        )
        .unwrap();
        assert_eq!((token.as_str(), expires_in), ("at-123", 60));
        for (body, want) in [
            (
                &br#"{"access_token":"s3cr3t-value","expires_in":"s3cr3t-value"}"#[..],
                "not a token response",
            ),
            (
                br#"{"access_token":"s3cr3t-value"}"#,
                "no positive expires_in",
            ),
            (
                br#"{"access_token":"s3cr3t-value","token_type":"mac","expires_in":5}"#,
                "not bearer",
            ),
            (
                br#"{"access_token":"","expires_in":5}"#,
                "no usable access_token",
            ),
            (
                br#"{"access_token":"s3cr3t\nvalue","expires_in":5}"#,
                "no usable access_token",
            ),
            (
                br#"{"expires_in":5,"note":"s3cr3t-value"}"#,
                "not a token response",
            ),
        ] {
            let e = parse_token_response(body).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains("s3cr3t"), "{e}");
        }
    }
}
