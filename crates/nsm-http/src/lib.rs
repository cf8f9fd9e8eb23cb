//! HTTP for nsm: Prometheus exposition at `/metrics`, health at `/healthz` and `/readyz`, and
//! the JSON API under `/api/v1`.
//!
//! This crate owns axum and prometheus. It reads state (the store, the published partition
//! status) but never changes it, and it never blocks the pipeline: handlers read RocksDB on
//! tokio's blocking pool.

mod api;
mod telemetry;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use nsm_core::engine::{PartitionStatus, Plan};
use nsm_state::Store;
use tokio::net::TcpListener;

pub use telemetry::{BatchCounts, Telemetry};

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
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/metrics", get(api::list_metrics))
        .route("/api/v1/metrics/{name}/windows", get(api::metric_windows))
        .with_state(state)
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
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

async fn readyz(State(state): State<AppState>) -> Response {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", state.readiness.reason()),
        )
            .into_response()
    }
}
