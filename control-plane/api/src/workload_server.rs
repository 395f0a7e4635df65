//! A SPIFFE Workload API server over a Unix socket, serving whatever
//! X.509-SVID a `watch` channel holds and streaming each change, and, when
//! given a JWT-SVID authority, the JWT half (`jwt_svid.rs`).
//!
//! Two things use it: the dev identity provider (SVIDs from a local CA) and
//! SVID files on disk (served on a private socket to the process's own
//! `X509Source`, so both identity modes take the same `spiffe` client path).

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use crate::WORKLOAD_API_HEADER;
use crate::workload::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use crate::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svidRequest,
    X509svidResponse,
};

/// Serves the Workload API on `listener` until `shutdown` turns true, then
/// removes the socket file.
pub fn serve_unix(
    listener: UnixListener,
    path: PathBuf,
    current: watch::Receiver<Arc<X509svidResponse>>,
    jwt: Option<Arc<crate::jwt_svid::JwtSvidAuthority>>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let service = WorkloadApiService { current, jwt };
    // Each connection reaches tonic through `h2_authority::relay`, so that
    // grpc-core and grpc-java clients (which send the socket path as
    // `:authority`) are served too.
    let (conns, incoming) = tokio::sync::mpsc::channel::<std::io::Result<UnixStream>>(64);
    let mut accepting = shutdown.clone();
    tokio::spawn(async move {
        let mut accepted = UnixListenerStream::new(listener);
        loop {
            let client = tokio::select! {
                next = accepted.next() => match next {
                    Some(Ok(client)) => client,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "workload API accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                    None => return,
                },
                () = crate::process::stopped(&mut accepting) => return,
            };
            let (ours, theirs) = match UnixStream::pair() {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "workload API: no socket pair");
                    continue;
                }
            };
            tokio::spawn(crate::h2_authority::relay(client, ours));
            if conns.send(Ok(theirs)).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(service))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(incoming),
                async move {
                    let _ = shutdown.wait_for(|s| *s).await;
                },
            )
            .await;
        if let Err(e) = result {
            tracing::error!(socket = %path.display(), error = %e, "workload API server failed");
        }
        let _ = std::fs::remove_file(&path);
    })
}

struct WorkloadApiService {
    current: watch::Receiver<Arc<X509svidResponse>>,
    jwt: Option<Arc<crate::jwt_svid::JwtSvidAuthority>>,
}

impl WorkloadApiService {
    fn jwt(&self) -> Result<&crate::jwt_svid::JwtSvidAuthority, Status> {
        self.jwt
            .as_deref()
            .ok_or_else(|| Status::unimplemented(NO_JWT))
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Every Workload API call must carry `workload.spiffe.io: true`; this keeps a
/// browser or an SSRF-ed client from reaching the API by accident.
fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get(WORKLOAD_API_HEADER).map(|v| v.to_str()) {
        Some(Ok("true")) => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header workload.spiffe.io: true is missing",
        )),
    }
}

fn bundles_of(r: &X509svidResponse) -> X509BundlesResponse {
    let bundles = r
        .svids
        .iter()
        .filter_map(|s| {
            let td = s.spiffe_id.strip_prefix("spiffe://")?.split('/').next()?;
            Some((td.to_owned(), s.bundle.clone()))
        })
        .collect::<HashMap<_, _>>();
    X509BundlesResponse {
        crl: Vec::new(),
        bundles,
    }
}

const NO_JWT: &str = "this Workload API serves X.509-SVIDs only (SVID files)";

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApiService {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        // The stream stays open and yields each rotation; closing it would make
        // the client reconnect.
        let stream = WatchStream::new(self.current.clone()).map(|r| Ok((*r).clone()));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        let stream = WatchStream::new(self.current.clone()).map(|r| Ok(bundles_of(&r)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&request)?;
        let jwt = self.jwt()?;
        let req = request.into_inner();
        let served = self
            .current
            .borrow()
            .svids
            .first()
            .map(|s| s.spiffe_id.clone());
        let Some(id) = served else {
            return Err(Status::unavailable("no identity yet"));
        };
        if !req.spiffe_id.is_empty() && req.spiffe_id != id {
            return Err(Status::permission_denied(format!(
                "this socket serves {id}, not {}",
                req.spiffe_id
            )));
        }
        let svid = jwt
            .sign(&id, &req.audience)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(JwtsvidResponse {
            svids: vec![crate::workload::Jwtsvid {
                spiffe_id: id,
                svid,
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        let jwt = self.jwt()?;
        let bundles = HashMap::from([(jwt.trust_domain().to_owned(), jwt.jwks().to_vec())]);
        // One answer, then the stream stays open (the key does not rotate;
        // a closed stream would make the client reconnect).
        let stream =
            tokio_stream::once(Ok(JwtBundlesResponse { bundles })).chain(tokio_stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        let jwt = self.jwt()?;
        let req = request.into_inner();
        if req.audience.is_empty() || req.svid.is_empty() {
            return Err(Status::invalid_argument("audience and svid are required"));
        }
        let (spiffe_id, claims) = jwt
            .validate(&req.svid, &req.audience)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id,
            claims: Some(crate::jwt_svid::to_struct(claims)),
        }))
    }
}
