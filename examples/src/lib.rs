//! The quickstart's example upstream: an HTTP API that accepts only Leash
//! JWTs, verified with a standard JWT library against the control plane's
//! published JWKS, and answers `/whoami` with the caller's SPIFFE ID.
//!
//! It also echoes what it received (`/echo`), so tests can check exactly
//! which headers and query the sidecar forwarded.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Where the JWKS is published, e.g. http://127.0.0.1:8080/.well-known/jwks.json.
    pub jwks_url: String,
    /// Expected `aud`.
    pub audience: String,
    /// Expected `iss`, if checked.
    pub issuer: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LeashClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub jti: String,
    pub iat: i64,
    pub exp: i64,
}

/// Verifies Leash JWTs against a JWKS, refetching it when a `kid` is unknown.
pub struct Verifier {
    config: UpstreamConfig,
    keys: RwLock<HashMap<String, DecodingKey>>,
}

impl Verifier {
    pub fn new(config: UpstreamConfig) -> Self {
        Self {
            config,
            keys: RwLock::new(HashMap::new()),
        }
    }

    async fn key(&self, kid: &str) -> Result<DecodingKey, String> {
        if let Some(k) = self.keys.read().map_err(|_| "lock")?.get(kid) {
            return Ok(k.clone());
        }
        // Unknown kid: the issuer may have rotated; fetch the JWKS again.
        let set: JwkSet = serde_json::from_slice(&http_get(&self.config.jwks_url).await?)
            .map_err(|e| format!("bad JWKS: {e}"))?;
        let mut keys = self.keys.write().map_err(|_| "lock")?;
        for jwk in &set.keys {
            if let (Some(id), Ok(key)) = (&jwk.common.key_id, DecodingKey::from_jwk(jwk)) {
                keys.insert(id.clone(), key);
            }
        }
        keys.get(kid)
            .cloned()
            .ok_or_else(|| format!("no key {kid:?} in the JWKS"))
    }

    pub async fn verify(&self, token: &str) -> Result<LeashClaims, String> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
        let kid = header.kid.ok_or("token has no kid")?;
        let key = self.key(&kid).await?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.leeway = 0;
        validation.set_audience(&[&self.config.audience]);
        if let Some(iss) = &self.config.issuer {
            validation.set_issuer(&[iss]);
        }
        validation.set_required_spec_claims(&["exp", "aud", "sub", "iss"]);
        jsonwebtoken::decode::<LeashClaims>(token, &key, &validation)
            .map(|d| d.claims)
            .map_err(|e| format!("invalid token: {e}"))
    }
}

/// A tiny HTTP/1.1 GET, enough to fetch a JWKS from loopback.
async fn http_get(url: &str) -> Result<Vec<u8>, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let authority = uri.authority().ok_or("URL has no host")?.clone();
    let tcp = tokio::net::TcpStream::connect(authority.as_str())
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(uri.path())
        .header(hyper::header::HOST, authority.as_str())
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("{url} answered {}", resp.status()));
    }
    Ok(resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes()
        .to_vec())
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string() + "\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// One request as the upstream saw it (tests use this to prove what arrived).
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: std::time::Instant,
    pub path: String,
    pub jti: Option<String>,
    pub sub: Option<String>,
    /// The `x-api-key` header, else `authorization`, as received.
    pub credential: Option<String>,
}

/// Where the requests seen are recorded, in order, before each is answered
/// (so a caller that has its answer finds its request here).
pub type Observer = Arc<std::sync::Mutex<Vec<Seen>>>;

async fn handle(
    verifier: Arc<Verifier>,
    observer: Option<Observer>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let arrived = std::time::Instant::now();
    let path = req.uri().path().to_owned();
    // The request target as it was on the request line.
    let target = req.uri().to_string();
    let query = req.uri().query().unwrap_or("").to_owned();
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("<binary>").into()))
        .collect();
    let credential = req
        .headers()
        .get("x-api-key")
        .or_else(|| req.headers().get(hyper::header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bearer = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let body_len = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    let claims = match bearer {
        Some(token) => verifier.verify(&token).await,
        None => Err("no bearer token".to_owned()),
    };
    if let Some(observer) = observer {
        observer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Seen {
                at: arrived,
                path: path.clone(),
                jti: claims.as_ref().ok().map(|c| c.jti.clone()),
                sub: claims.as_ref().ok().map(|c| c.sub.clone()),
                credential,
            });
    }
    if path == "/echo" {
        return json(
            StatusCode::OK,
            serde_json::json!({
                "path": path,
                "target": target,
                "query": query,
                "headers": headers,
                "body_bytes": body_len,
                "verified_sub": claims.as_ref().ok().map(|c| c.sub.clone()),
                "jti": claims.as_ref().ok().map(|c| c.jti.clone()),
                "verify_error": claims.err(),
            }),
        );
    }
    match claims {
        Err(reason) => json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "unauthorized", "reason": reason}),
        ),
        Ok(c) if path == "/whoami" => json(
            StatusCode::OK,
            serde_json::json!({"sub": c.sub, "aud": c.aud, "jti": c.jti, "exp": c.exp}),
        ),
        Ok(c) => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found", "sub": c.sub, "try": ["/whoami", "/echo"]}),
        ),
    }
}

/// Serves plain HTTP until the task is dropped.
pub async fn serve(listener: TcpListener, config: UpstreamConfig) {
    serve_with(listener, config, None).await;
}

/// Serves HTTP, or HTTPS when `tls` is given, until the task is dropped.
pub async fn serve_with(listener: TcpListener, config: UpstreamConfig, tls: Option<TlsAcceptor>) {
    serve_observed(listener, config, tls, None).await;
}

/// As `serve_with`, reporting every request to `observer`.
pub async fn serve_observed(
    listener: TcpListener,
    config: UpstreamConfig,
    tls: Option<TlsAcceptor>,
    observer: Option<Observer>,
) {
    let verifier = Arc::new(Verifier::new(config));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let verifier = verifier.clone();
        let tls = tls.clone();
        let observer = observer.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let verifier = verifier.clone();
                let observer = observer.clone();
                async move { Ok::<_, Infallible>(handle(verifier, observer, req).await) }
            });
            let http = http1::Builder::new();
            match tls {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
                None => {
                    let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
                }
            }
        });
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
