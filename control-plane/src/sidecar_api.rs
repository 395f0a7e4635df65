//! The gRPC API that sidecars call: their routing view of the policy, and
//! short-lived credentials for (caller, upstream).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use leash_api::policy::{CredentialKind, InjectSpec, ValidPolicy};
use leash_api::v1::sidecar_api_server::SidecarApi;
use leash_api::v1::{
    BasicInjection, Credential, Denial, GetRoutesRequest, HeaderInjection, Injection, IssueRequest,
    IssueResponse, QueryInjection, Route, RouteSet, TlsSettings, injection, issue_response,
};
use std::time::Duration;

use leash_api::revocation::RevocationKind;
use leash_api::v1::{ControlMessage, SidecarMessage, sidecar_message};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::sessions::SessionDriver;

use crate::jwt::Claims;
use crate::mtls::PeerIdentity;
use crate::state::ControlPlaneState;
use crate::store::{CredentialRecord, now_ms};

pub struct SidecarService {
    state: Arc<ControlPlaneState>,
    heartbeat: Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl SidecarService {
    pub fn new(
        state: Arc<ControlPlaneState>,
        heartbeat: Duration,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            state,
            heartbeat,
            shutdown,
        }
    }

    /// The current version of an upstream's brokered secret, or the answer
    /// to give instead (a typed denial, or unavailable).
    async fn brokered_secret(
        &self,
        upstream: &leash_api::policy::Upstream,
    ) -> Result<(i64, zeroize::Zeroizing<Vec<u8>>), Result<Response<IssueResponse>, Status>> {
        let Some(key) = &self.state.master_key else {
            return Err(Ok(self.deny(
                "no_master_key",
                "the control plane has no master key; brokered secrets are unavailable".into(),
            )));
        };
        match crate::secrets::current(&self.state.store, key, &upstream.name).await {
            Ok(v) => Ok(v),
            Err(crate::secrets::SecretError::Missing(_)) => Err(Ok(self.deny(
                "no_secret",
                format!("no secret is stored for upstream {:?}", upstream.name),
            ))),
            // No usable secret until a new version is put: the sidecar
            // answers 503 credential_unavailable with this message.
            Err(e @ crate::secrets::SecretError::CurrentRevoked { .. }) => {
                tracing::warn!(upstream = %upstream.name, error = %e, "no current secret");
                Err(Err(Status::unavailable(e.to_string())))
            }
            Err(e) => {
                tracing::error!(upstream = %upstream.name, error = %e, "cannot read a brokered secret");
                Err(Err(Status::unavailable("secret store unavailable")))
            }
        }
    }

    /// Records a credential before it is handed out: every credential in use
    /// is on file (id, workload, upstream, kind, issue and expiry; never the
    /// value), so that it can be revoked by id and its use accounted for.
    async fn record(
        &self,
        id: &str,
        upstream: &leash_api::policy::Upstream,
        peer: &PeerIdentity,
        issued_at_ms: i64,
        expires_at_ms: i64,
    ) -> Result<(), Status> {
        let record = CredentialRecord {
            id: id.to_owned(),
            workload: peer.spiffe_id.to_string(),
            upstream: upstream.name.clone(),
            kind: upstream.credential.kind.as_str().to_owned(),
            issued_at_ms,
            expires_at_ms,
        };
        self.state
            .store
            .record_credential(&record)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot record issued credential");
                Status::unavailable("credential store unavailable")
            })
    }

    /// Leases the current version of a brokered secret for the policy's TTL.
    async fn lease_static(
        &self,
        upstream: &leash_api::policy::Upstream,
        peer: &PeerIdentity,
    ) -> Result<Response<IssueResponse>, Status> {
        let (version, secret) = match self.brokered_secret(upstream).await {
            Ok(v) => v,
            Err(answer) => return answer,
        };
        let id = crate::secrets::lease_id(&upstream.name, version);
        self.lease(id, upstream, peer, &secret, None, "static secret leased")
            .await
    }

    /// Leases a cached (or freshly exchanged) access token until shortly
    /// before it expires, and never longer than the policy's TTL.
    async fn lease_oauth2(
        &self,
        upstream: &leash_api::policy::Upstream,
        peer: &PeerIdentity,
    ) -> Result<Response<IssueResponse>, Status> {
        use crate::oauth2::{ClientAuth, Grant};
        let c = &upstream.credential;
        let token_url = c.token_url.as_deref().unwrap_or_default();
        // Per the OAuth SPIFFE client-authentication draft, the workload's
        // SPIFFE ID is its client id unless policy names one.
        let client_id = c.client_id.as_deref().unwrap_or(&peer.spiffe_id);
        let secret_based = c.kind == CredentialKind::Oauth2ClientCredentials;
        let client_secret = if secret_based {
            match self.brokered_secret(upstream).await {
                Ok((_, secret)) => Some(secret),
                Err(answer) => return answer,
            }
        } else {
            None
        };
        let mint = |iss: &str, sub: &str, aud: &str, jti: &str, ttl: i64| {
            self.sign_short(iss, sub, aud, jti, ttl)
                .map_err(|e| Status::internal(e.to_string()))
        };
        // RFC 7523 §3: iss and sub are the client id, aud the token endpoint.
        let assertion = match &client_secret {
            Some(_) => None,
            None => Some(mint(
                client_id,
                client_id,
                token_url,
                &uuid::Uuid::new_v4().to_string(),
                60,
            )?),
        };
        let auth = match (&client_secret, &assertion) {
            (Some(secret), _) => ClientAuth::SecretBasic(secret),
            (None, Some(jwt)) => ClientAuth::Assertion(jwt),
            (None, None) => return Err(Status::internal("no client authentication")),
        };
        // RFC 8693: the subject is the workload (its SPIFFE ID), for the
        // token endpoint; the jti names the lease.
        let exchange_jti = uuid::Uuid::new_v4().to_string();
        let subject = match c.kind {
            CredentialKind::Oauth2TokenExchange => Some(mint(
                self.state.issuer.issuer(),
                &peer.spiffe_id,
                token_url,
                &exchange_jti,
                300,
            )?),
            _ => None,
        };
        let grant = match &subject {
            Some(token) => Grant::TokenExchange {
                subject_token: token,
                jti: &exchange_jti,
                audience: c.audience.as_deref(),
                resource: c.resource.as_deref(),
            },
            None => Grant::ClientCredentials,
        };
        // Tokens made for one workload are cached for that workload only.
        let key = if secret_based && c.client_id.is_some() && subject.is_none() {
            upstream.name.clone()
        } else {
            format!("{}#{}", upstream.name, peer.spiffe_id)
        };
        let exchange = crate::oauth2::Exchange {
            upstream: &key,
            token_url,
            client_id,
            auth,
            grant,
            scopes: &c.scopes,
        };
        let revocations = self.state.revocations.snapshot();
        let revoked = |id: &str| revocations.set.credential_revoked(id);
        let token = match self
            .state
            .tokens
            .get(&exchange, &self.state.store, revoked)
            .await
        {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(upstream = %upstream.name, error = %e, "token exchange failed");
                // Transient from the sidecar's point of view: it answers 503.
                return Err(Status::unavailable(format!("token endpoint: {e}")));
            }
        };
        self.lease(
            token.id.clone(),
            upstream,
            peer,
            token.token.as_bytes(),
            Some(token.use_until_unix_ms),
            "access token leased",
        )
        .await
    }

    /// Leases temporary AWS credentials for this workload, obtained from STS
    /// with a JWT issued for it (`sts.rs`), never past the policy's TTL.
    async fn lease_sts(
        &self,
        upstream: &leash_api::policy::Upstream,
        peer: &PeerIdentity,
    ) -> Result<Response<IssueResponse>, Status> {
        let ttl = upstream.credential.ttl;
        let assume = crate::sts::Assume {
            upstream: &upstream.name,
            workload: &peer.spiffe_id,
            sts_url: upstream
                .credential
                .sts_url
                .as_deref()
                .unwrap_or(crate::sts::DEFAULT_STS_URL),
            role_arn: upstream.credential.role_arn.as_deref().unwrap_or_default(),
            duration: ttl,
        };
        let mint = || {
            let jti = uuid::Uuid::new_v4().to_string();
            let aud = upstream
                .credential
                .audience
                .as_deref()
                .unwrap_or("sts.amazonaws.com");
            // Only to be exchanged, at once.
            let token = self
                .sign_short(self.state.issuer.issuer(), &peer.spiffe_id, aud, &jti, 300)
                .map_err(|e| crate::oauth2::TokenError::Invalid(e.to_string()))?;
            Ok((format!("sts:{}:{jti}", upstream.name), token))
        };
        let revocations = self.state.revocations.snapshot();
        let revoked = |id: &str| revocations.set.credential_revoked(id);
        let creds = match self.state.sts.get(&assume, revoked, mint).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(upstream = %upstream.name, workload = %peer.spiffe_id, error = %e, "AssumeRoleWithWebIdentity failed");
                return Err(Status::unavailable(format!("STS: {e}")));
            }
        };
        self.lease(
            creds.id.clone(),
            upstream,
            peer,
            creds.secret.as_bytes(),
            Some(creds.use_until_unix_ms),
            "temporary AWS credentials leased",
        )
        .await
    }

    /// A short-lived JWT the control plane presents on the workload's
    /// behalf (a client assertion, a subject token, a web identity token).
    fn sign_short(
        &self,
        iss: &str,
        sub: &str,
        aud: &str,
        jti: &str,
        ttl_secs: i64,
    ) -> Result<zeroize::Zeroizing<String>, crate::jwt::JwtError> {
        let iat = now_ms() / 1000;
        self.state
            .issuer
            .sign(&Claims {
                iss,
                sub,
                aud,
                jti,
                iat,
                exp: iat + ttl_secs,
            })
            .map(zeroize::Zeroizing::new)
    }

    /// Records a leased credential, counts it, and hands it out. It is
    /// leased for the policy's TTL, never past `use_until_ms` (when the
    /// token or key it carries must no longer be used).
    async fn lease(
        &self,
        id: String,
        upstream: &leash_api::policy::Upstream,
        peer: &PeerIdentity,
        secret: &[u8],
        use_until_ms: Option<i64>,
        what: &'static str,
    ) -> Result<Response<IssueResponse>, Status> {
        let issued_at_ms = now_ms();
        let ttl_ms = i64::try_from(upstream.credential.ttl.as_millis()).unwrap_or(i64::MAX);
        let by_ttl = issued_at_ms.saturating_add(ttl_ms);
        let expires_at_ms = use_until_ms.map_or(by_ttl, |until| until.min(by_ttl));
        self.record(&id, upstream, peer, issued_at_ms, expires_at_ms)
            .await?;
        self.state
            .metrics
            .credentials_issued
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(credential_id = %id, workload = %peer.spiffe_id, upstream = %upstream.name, "{what}");
        Ok(Response::new(IssueResponse {
            result: Some(issue_response::Result::Credential(Credential {
                id,
                upstream: upstream.name.clone(),
                kind: upstream.credential.kind.as_str().to_owned(),
                secret: secret.to_vec(),
                issued_at_unix_ms: issued_at_ms,
                expires_at_unix_ms: expires_at_ms,
            })),
        }))
    }

    fn deny(&self, code: &str, message: String) -> Response<IssueResponse> {
        self.state
            .metrics
            .issue_denied
            .fetch_add(1, Ordering::Relaxed);
        Response::new(IssueResponse {
            result: Some(issue_response::Result::Denial(Denial {
                code: code.to_owned(),
                message,
            })),
        })
    }
}

/// The verified caller. A request without one did not come through the mTLS
/// listener, which cannot happen in production wiring; refuse it anyway.
fn caller<T>(req: &Request<T>) -> Result<PeerIdentity, Status> {
    req.extensions()
        .get::<PeerIdentity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified SPIFFE identity on this connection"))
}

pub fn routes_for(policy: &ValidPolicy, spiffe_id: &str) -> Vec<Route> {
    policy
        .policy
        .upstreams
        .iter()
        .map(|u| Route {
            upstream: u.name.clone(),
            hosts: u.hosts.clone(),
            target: u.target.clone(),
            tls: u.tls.as_ref().map(|t| TlsSettings {
                ca_pem: policy.ca_pems.get(&u.name).cloned().unwrap_or_default(),
                server_name: t.server_name.clone().unwrap_or_default(),
                ca_only: t.ca_only,
            }),
            inject: Some(Injection {
                how: Some(match &u.inject {
                    InjectSpec::Header { name, format } => {
                        injection::How::Header(HeaderInjection {
                            name: name.clone(),
                            format: format.clone(),
                        })
                    }
                    InjectSpec::Basic { username } => injection::How::Basic(BasicInjection {
                        username: username.clone(),
                    }),
                    InjectSpec::Query { param } => injection::How::Query(QueryInjection {
                        param: param.clone(),
                    }),
                    InjectSpec::AwsSigv4 {
                        region,
                        service,
                        payload,
                        signature,
                    } => injection::How::Sigv4(leash_api::v1::SigV4Injection {
                        region: region.clone(),
                        service: service.clone(),
                        unsigned_payload: *payload == leash_api::policy::SigV4Payload::Unsigned,
                        query: *signature == leash_api::policy::SigV4Location::Query,
                    }),
                }),
            }),
            granted: policy.is_granted(spiffe_id, &u.name),
            credential_kind: u.credential.kind.as_str().to_owned(),
            scan_body_bytes: u.scan_body_bytes,
            intercept: u.intercept,
            passthrough: u.passthrough,
        })
        .collect()
}

#[tonic::async_trait]
impl SidecarApi for SidecarService {
    type SessionStream = ReceiverStream<Result<ControlMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<SidecarMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = caller(&request)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??;
        let Some(SidecarMessage {
            msg: Some(sidecar_message::Msg::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument("a session starts with a hello"));
        };
        if let Err(e) = crate::sessions::check_hello(&hello) {
            return Err(Status::invalid_argument(e));
        };
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let driver = SessionDriver {
            state: self.state.clone(),
            registry: self.state.sessions.clone(),
            metrics: self.state.metrics.clone(),
            heartbeat: self.heartbeat,
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(driver.run(peer.spiffe_id.clone(), hello, inbound, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_routes(
        &self,
        request: Request<GetRoutesRequest>,
    ) -> Result<Response<RouteSet>, Status> {
        let peer = caller(&request)?;
        let snapshot = self.state.policy.load();
        tracing::debug!(
            workload = %peer.spiffe_id,
            sidecar_version = %request.get_ref().sidecar_version,
            "routes requested"
        );
        Ok(Response::new(RouteSet {
            policy_version: snapshot.version.clone(),
            routes: routes_for(&snapshot.policy, &peer.spiffe_id),
        }))
    }

    async fn issue(
        &self,
        request: Request<IssueRequest>,
    ) -> Result<Response<IssueResponse>, Status> {
        let Some(otel) = &self.state.otel else {
            return self.issue_inner(request).await;
        };
        use opentelemetry::KeyValue;
        let headers = request.metadata().clone().into_headers();
        let mut attrs = vec![KeyValue::new(
            "leash.upstream",
            request.get_ref().upstream.clone(),
        )];
        if let Some(peer) = request.extensions().get::<PeerIdentity>() {
            attrs.push(KeyValue::new("leash.workload", peer.spiffe_id.to_string()));
        }
        let cx = crate::telemetry::server_span(otel, "leash.issue".into(), &headers, attrs);
        let result = self.issue_inner(request).await;
        let (attrs, error) = match &result {
            Ok(r) => match &r.get_ref().result {
                Some(issue_response::Result::Credential(c)) => (
                    vec![
                        KeyValue::new("leash.decision", "issued"),
                        KeyValue::new("leash.credential_id", c.id.clone()),
                    ],
                    None,
                ),
                Some(issue_response::Result::Denial(d)) => (
                    vec![
                        KeyValue::new("leash.decision", "denied"),
                        KeyValue::new("leash.denial", d.code.clone()),
                    ],
                    None,
                ),
                None => (vec![], None),
            },
            Err(s) => (
                vec![KeyValue::new("leash.decision", "error")],
                Some(s.message().to_owned()),
            ),
        };
        crate::telemetry::end(&cx, attrs, error);
        result
    }
}

impl SidecarService {
    async fn issue_inner(
        &self,
        request: Request<IssueRequest>,
    ) -> Result<Response<IssueResponse>, Status> {
        let peer = caller(&request)?;
        let upstream_name = &request.get_ref().upstream;
        let snapshot = self.state.policy.load();
        let Some(upstream) = snapshot.policy.upstream(upstream_name) else {
            return Ok(self.deny(
                "unknown_upstream",
                format!("policy names no upstream {upstream_name:?}"),
            ));
        };
        if !snapshot.policy.is_granted(&peer.spiffe_id, upstream_name) {
            tracing::info!(workload = %peer.spiffe_id, upstream = %upstream_name, "issue denied: not granted");
            return Ok(self.deny(
                "not_granted",
                format!(
                    "{} is not granted upstream {upstream_name:?}",
                    peer.spiffe_id
                ),
            ));
        }
        if let Some(r) = self
            .state
            .revocations
            .snapshot()
            .set
            .check(&peer.spiffe_id, upstream_name)
        {
            let kind = RevocationKind::of(r).map_or("revoked", RevocationKind::refusal_code);
            return Ok(self.deny(
                kind,
                format!("revoked by {} ({}): {}", r.id, r.kind, r.reason),
            ));
        }
        if upstream.credential.kind == CredentialKind::AwsSigv4
            && upstream.credential.role_arn.is_some()
        {
            return self.lease_sts(upstream, &peer).await;
        }
        if matches!(
            upstream.credential.kind,
            CredentialKind::Static | CredentialKind::AwsSigv4
        ) {
            return self.lease_static(upstream, &peer).await;
        }
        if upstream.credential.kind.is_oauth2() {
            return self.lease_oauth2(upstream, &peer).await;
        }
        if upstream.credential.kind != CredentialKind::Jwt {
            return Ok(self.deny(
                "unsupported_credential_kind",
                format!(
                    "credential kind {} is not supported",
                    upstream.credential.kind.as_str()
                ),
            ));
        }

        let id = uuid::Uuid::new_v4().to_string();
        let issued_at_ms = now_ms();
        let ttl_ms = i64::try_from(upstream.credential.ttl.as_millis()).unwrap_or(i64::MAX);
        let expires_at_ms = issued_at_ms.saturating_add(ttl_ms);
        let aud = upstream
            .credential
            .audience
            .as_deref()
            .unwrap_or(&upstream.name);
        let token = self
            .state
            .issuer
            .sign(&Claims {
                iss: self.state.issuer.issuer(),
                sub: &peer.spiffe_id,
                aud,
                jti: &id,
                iat: issued_at_ms / 1000,
                exp: expires_at_ms / 1000,
            })
            .map_err(|e| Status::internal(e.to_string()))?;
        self.record(&id, upstream, &peer, issued_at_ms, expires_at_ms)
            .await?;
        self.state
            .metrics
            .credentials_issued
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            credential_id = %id,
            workload = %peer.spiffe_id,
            upstream = %upstream.name,
            expires_at_ms,
            "credential issued"
        );
        Ok(Response::new(IssueResponse {
            result: Some(issue_response::Result::Credential(Credential {
                id,
                upstream: upstream.name.clone(),
                kind: upstream.credential.kind.as_str().to_owned(),
                secret: token.into_bytes(),
                issued_at_unix_ms: issued_at_ms,
                expires_at_unix_ms: expires_at_ms,
            })),
        }))
    }
}
