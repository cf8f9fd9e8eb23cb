//! HTTP for nsm: Prometheus exposition at `/metrics`, health at `/healthz` and `/readyz`, and
//! the JSON API under `/api/v1`, over plain HTTP or HTTPS (rustls), optionally behind basic
//! authentication with bcrypt hashes.
//!
//! This crate owns axum, hyper, rustls and prometheus. It reads state (the store, the
//! published partition status) but never changes it, and it never blocks the pipeline:
//! handlers read RocksDB, and passwords are checked, on tokio's blocking pool. What one client
//! can take is bounded: connections by number and by timeouts (`server.rs`), a windows request
//! by the windows it reads (`api.rs`), a password check by a queue and by remembering its
//! result (`auth.rs`).

mod api;
mod auth;
mod liveness;
mod server;
mod telemetry;
mod tls;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use nsm_core::engine::{PartitionStatus, Plan};
use nsm_state::Store;
use tokio::net::TcpListener;

pub use auth::{hash_password, BasicAuth};
pub use liveness::{Liveness, Watch};
pub use server::Limits;
pub use telemetry::{BatchCounts, DeadLetterCounts, OffsetSkip, Telemetry};
pub use tls::server_config as tls_server_config;

/// Errors of the HTTP edge.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The certificate or key cannot be used; the message names the file.
    #[error("{0}")]
    Tls(String),
    #[error("cannot hash the password: {0}")]
    Auth(String),
}

/// How the endpoint is protected: HTTPS when `tls` is set; when `basic_auth` is set,
/// `/metrics` and `/api` need credentials, while the probes `/healthz` and `/readyz` stay
/// open (`/readyz` says why it is not ready only to a client whose credentials were verified
/// before, on `/metrics` or `/api`: it never runs bcrypt itself).
#[derive(Clone, Default)]
pub struct Protection {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub basic_auth: Option<Arc<BasicAuth>>,
}

/// What the pipeline publishes for the HTTP side to read.
#[derive(Debug, Default)]
pub struct Published {
    /// Owned partitions and their watermarks, as of the last durable checkpoint.
    pub partitions: Vec<PartitionStatus>,
}

/// Readiness: true once the consumer runs with its partitions' state loaded.
#[derive(Debug, Default)]
pub struct Readiness {
    ready: AtomicBool,
    reason: RwLock<String>,
}

impl Readiness {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        self.ready.store(false, Ordering::SeqCst);
        *self
            .reason
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = reason.into();
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    fn reason(&self) -> String {
        self.reason
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Everything the handlers read.
#[derive(Clone)]
pub struct AppState {
    pub plan: Arc<Plan>,
    pub store: Store,
    pub telemetry: Arc<Telemetry>,
    pub published: Arc<RwLock<Published>>,
    pub readiness: Arc<Readiness>,
    pub liveness: Arc<Liveness>,
}

pub fn router(state: AppState, basic_auth: Option<Arc<BasicAuth>>) -> Router {
    let mut protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/metrics", get(api::list_metrics))
        .route("/api/v1/metrics/{name}/windows", get(api::metric_windows));
    if let Some(auth) = &basic_auth {
        protected = protected.layer(middleware::from_fn_with_state(auth.clone(), auth::require));
    }
    // Kubelet probes carry no credentials, so the probes stay open; they tell nothing but
    // whether nsm is up and ready.
    let probes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(Extension(Probes { basic_auth }));
    protected.merge(probes).with_state(state)
}

/// Serves until `shutdown` completes, over HTTPS when `protection.tls` is set, within
/// `limits`; then lets the requests being handled finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    protection: Protection,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router(state, protection.basic_auth);
    let tls = protection.tls.map(tokio_rustls::TlsAcceptor::from);
    server::serve_router(listener, router, tls, limits, shutdown).await
}

#[derive(Clone)]
struct Probes {
    basic_auth: Option<Arc<BasicAuth>>,
}

async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.telemetry.render();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Up unless a watched thread is stuck (see `liveness.rs`): what is stuck is said to anyone,
/// it names threads, not data.
async fn healthz(State(state): State<AppState>) -> Response {
    let stuck = state.liveness.stuck_at(std::time::Instant::now());
    if stuck.is_empty() {
        return (StatusCode::OK, "ok\n").into_response();
    }
    let body = format!("stuck: {}\n", stuck.join("; "));
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

async fn readyz(
    State(state): State<AppState>,
    Extension(probes): Extension<Probes>,
    headers: HeaderMap,
) -> Response {
    if state.readiness.is_ready() {
        return (StatusCode::OK, "ready\n").into_response();
    }
    // The reason can name paths and storage errors: for authenticated clients only. Probes
    // are open to anyone, so credentials are only looked up among those verified before,
    // never checked with bcrypt here.
    let show_reason = match &probes.basic_auth {
        None => true,
        Some(auth) => auth.allows_remembered(&headers),
    };
    let body = if show_reason {
        format!("not ready: {}\n", state.readiness.reason())
    } else {
        "not ready\n".to_string()
    };
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}
