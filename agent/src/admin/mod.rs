//! The admin listener (`--admin`, loopback by default): probes and debug views.
//!
//! - `GET /healthz`: 200 while the agent runs.
//! - `GET /readyz`: 200 once the first plan is in the maps, 503 before.
//! - `GET /debug/config_dump`: the current plan and diagnostics as JSON.
//! - `GET /metrics`: Prometheus metrics (see [`crate::metrics`]).

pub mod dump;

use crate::compile::Plan;
use crate::dataplane::proxy::Proxy;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use tokio::net::TcpListener;
use tracing::{debug, info};

/// Shared between the agent loop (writer) and the admin server (reader).
#[derive(Default)]
pub struct AdminState {
    ready: AtomicBool,
    generation: AtomicU64,
    plan: RwLock<Arc<Plan>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The L7 proxy, when running (live outlier status for the dump).
    pub proxy: OnceLock<Arc<Proxy>>,
    /// The gateway listeners (`--gateway`), when serving any.
    pub gateways: OnceLock<Arc<crate::dataplane::gateway::Gateways>>,
}

impl AdminState {
    /// Records a plan that is now in the maps.
    pub fn publish(&self, plan: Arc<Plan>) {
        *self.plan.write().expect("plan lock") = plan;
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if state.is_ready() => respond(StatusCode::OK, "text/plain", "ready\n"),
        "/readyz" => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "no plan in the maps yet\n",
        ),
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        ),
        "/debug/config_dump" => {
            let plan = state.plan.read().expect("plan lock").clone();
            let mut dump = dump::build(&plan, state.proxy.get().map(|p| p.as_ref()));
            if let Some(g) = state.gateways.get() {
                dump.gateway_listeners = dump::gateway_listeners(g);
            }
            let body = serde_json::to_vec_pretty(&dump).expect("the dump serializes");
            respond(StatusCode::OK, "application/json", body)
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Binds the admin listener (so bind errors surface at start-up) and returns the serving task.
pub async fn bind(
    addr: SocketAddr,
    state: Arc<AdminState>,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let listener = TcpListener::bind(addr).await?;
    info!(%addr, "admin listening");
    Ok(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "admin accept");
                    continue;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let resp = route(&state, &req);
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    debug!(%peer, error = %e, "admin connection");
                }
            });
        }
    })
}
