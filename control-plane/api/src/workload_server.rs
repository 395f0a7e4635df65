//! A SPIFFE Workload API server (X.509 part) over a Unix socket, serving
//! whatever SVID a `watch` channel holds and streaming each change.
//!
//! Two things use it: the dev identity provider (SVIDs from a local CA) and
//! SVID files on disk (served on a private socket to the process's own
//! `X509Source`, so both identity modes take the same `spiffe` client path).

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::UnixListener;
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
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let service = WorkloadApiService { current };
    tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(service))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(socket = %path.display(), error = %e, "workload API server failed");
        }
        let _ = std::fs::remove_file(&path);
    })
}

struct WorkloadApiService {
    current: watch::Receiver<Arc<X509svidResponse>>,
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

const NO_JWT: &str = "this Workload API serves X.509-SVIDs only";

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
        Err(Status::unimplemented(NO_JWT))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        Err(Status::unimplemented(NO_JWT))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        Err(Status::unimplemented(NO_JWT))
    }
}
