//! The in-process L7 proxy.
//!
//! The kernel sends every TCP connection to an L7 service (see `SVC_F_L7`) to this listener on
//! the node's own address. On accept, the proxy recovers the VIP:port the client dialled from the
//! `sd_l7conn_v1` map (keyed by the client's address and port, which is the accepted socket's
//! peer), serves the connection as HTTP/1.1 or HTTP/2 (h2c prior knowledge), routes every request
//! with the plan for that VIP, and forwards it over pooled upstream connections. Upstream sockets
//! carry [`PROXY_SOCKET_MARK`] so the kernel never steers them back here.

use crate::compile::authz::{self, AuthzPlan, HttpAttributes};
use crate::compile::http::{
    self, Cluster, ClusterPolicy, HashKey, HeaderOps, HttpRoutes, LoadBalancer, Redirect,
    RequestView, RetryPolicy, RouteAction,
};
use crate::compile::{Plan, Source, VipKey};
use crate::dataplane::kernel;
use crate::dataplane::upstream::{ClusterState, Clusters, HashInput, Outcome};
use crate::metrics::{IstioLabels, Metrics, ServiceLabels};
use crate::model::istio::MESH_GATEWAY;
use crate::model::security::Action;
use aya::maps::{HashMap as BpfHashMap, MapData};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use steerd_common::{ClientKey, PROXY_SOCKET_MARK, RevNatValue};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Upstream TCP connect timeout when no DestinationRule sets one (Envoy's default is 10 s;
/// Istio's is the same).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle upstream connection is kept when no DestinationRule sets `idleTimeout`
/// (Envoy's default is 1 h; a node agent keeps fewer sockets open).
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What distinguishes one upstream pool from another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ClientKind {
    http2: bool,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("binding the proxy listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// One L7 service as the proxy routes it.
#[derive(Debug, Clone)]
pub struct ProxyService {
    pub host: String,
    pub port: u16,
    pub routes: Arc<HttpRoutes>,
}

/// Everything the proxy needs, rebuilt from each plan and swapped in atomically.
#[derive(Debug, Default)]
pub struct ProxyTable {
    pub services: HashMap<VipKey, Arc<ProxyService>>,
    pub sources: HashMap<IpAddr, Source>,
    /// AuthorizationPolicies of the destination workloads.
    pub authz: Arc<AuthzPlan>,
}

impl ProxyTable {
    pub fn from_plan(plan: &Plan) -> Self {
        let services = plan
            .services
            .iter()
            .filter_map(|(vip, s)| {
                let routes = s.http.clone()?;
                Some((
                    *vip,
                    Arc::new(ProxyService {
                        host: s.host.clone(),
                        port: vip.port,
                        routes,
                    }),
                ))
            })
            .collect();
        Self {
            services,
            sources: plan.sources.clone(),
            authz: plan.authz.clone(),
        }
    }
}

/// Opens upstream TCP connections with the proxy's socket mark.
#[derive(Clone)]
pub struct MarkedConnector {
    connect_timeout: Duration,
}

impl tower_service::Service<Uri> for MarkedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.connect_timeout;
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("upstream {uri} is not ip:port")))?;
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.set_mark(PROXY_SOCKET_MARK)?;
            socket.set_tcp_nodelay(true)?;
            socket.set_nonblocking(true)?;
            let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
            let stream = tokio::time::timeout(timeout, socket.connect(addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout")
                })??;
            Ok(TokioIo::new(stream))
        })
    }
}

/// Bodies up to this size are buffered so that retries and mirrors can replay them; larger or
/// unknown-length bodies stream through with a single attempt and no mirror copy (Envoy's
/// per-request buffer limit plays the same role).
const REPLAY_LIMIT: u64 = 1 << 20;
/// Mirrors in flight at once; beyond this, copies are dropped, so a slow shadow service can never
/// hold more than this many requests in memory or slow the primary path.
const MAX_MIRRORS_IN_FLIGHT: usize = 256;

/// The proxy: shared state of the listeners and request handlers.
pub struct Proxy {
    table: RwLock<Arc<ProxyTable>>,
    /// The kernel's record of which VIP each redirected client dialled.
    connections: Mutex<BpfHashMap<MapData, ClientKey, RevNatValue>>,
    /// Upstream connection pools, one per (protocol, connect timeout, idle timeout): clusters
    /// with the same DestinationRule connection settings share one.
    clients: Mutex<HashMap<ClientKind, Client<MarkedConnector, ProxyBody>>>,
    clusters: Clusters,
    mirrors: Arc<tokio::sync::Semaphore>,
    metrics: Arc<Metrics>,
}

/// What became of a request, for telemetry.
struct Served {
    response: Response<ProxyBody>,
    /// The endpoint that answered, if any.
    endpoint: Option<SocketAddr>,
    /// Envoy's response flags (`-`, `NR`, `UO`, `UT`, `UF`, `FI`, `DI`, ...).
    flags: &'static str,
}

impl Served {
    fn local(status: StatusCode, body: &'static str, flags: &'static str) -> Self {
        Self {
            response: local_reply(status, body),
            endpoint: None,
            flags,
        }
    }
}

impl Proxy {
    pub fn new(
        connections: BpfHashMap<MapData, ClientKey, RevNatValue>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            table: RwLock::new(Arc::new(ProxyTable::default())),
            connections: Mutex::new(connections),
            clients: Mutex::new(HashMap::new()),
            clusters: Clusters::default(),
            mirrors: Arc::new(tokio::sync::Semaphore::new(MAX_MIRRORS_IN_FLIGHT)),
            metrics,
        })
    }

    /// The upstream pool for a cluster's connection settings (`tcp.connectTimeout`,
    /// `http.idleTimeout`, HTTP/2 or not).
    fn client_for(&self, policy: &ClusterPolicy) -> Client<MarkedConnector, ProxyBody> {
        let kind = ClientKind {
            http2: policy.http2,
            connect_timeout: policy.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            idle_timeout: policy.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT),
        };
        self.clients
            .lock()
            .expect("client pool lock")
            .entry(kind)
            .or_insert_with(|| {
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(kind.idle_timeout)
                    .http2_only(kind.http2)
                    .build(MarkedConnector {
                        connect_timeout: kind.connect_timeout,
                    })
            })
            .clone()
    }

    /// Swaps in the routing of a new plan; requests in flight finish with the table they
    /// started with.
    pub fn update(&self, table: ProxyTable) {
        *self.table.write().expect("proxy table lock") = Arc::new(table);
    }

    fn table(&self) -> Arc<ProxyTable> {
        self.table.read().expect("proxy table lock").clone()
    }

    /// Runtime state of a cluster (ejections, pool usage), for `inspect`.
    pub fn cluster_state(&self, name: &str) -> Arc<ClusterState> {
        self.clusters.get(name)
    }

    /// The VIP the client behind `peer` dialled, consuming the kernel's record of it.
    fn original_destination(&self, peer: SocketAddr) -> Option<VipKey> {
        let key = ClientKey {
            addr: kernel::addr_of(peer.ip().to_canonical()),
            port: peer.port().to_be(),
            _pad: 0,
        };
        let mut map = self.connections.lock().expect("l7 connection map lock");
        let vip = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(VipKey {
            ip: kernel::ip_of(&vip.vip),
            port: u16::from_be(vip.port),
            transport: crate::compile::registry::Transport::Tcp,
        })
    }

    /// Binds the listener now (so errors surface at start-up) and returns the accept loop.
    pub async fn bind(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> Result<impl Future<Output = ()> + use<>, ProxyError> {
        let listener = bind_listener(addr).map_err(|source| ProxyError::Bind { addr, source })?;
        info!(%addr, "L7 proxy listening");
        let proxy = self.clone();
        Ok(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "proxy accept");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let proxy = proxy.clone();
                tokio::spawn(async move { proxy.serve_connection(stream, peer).await });
            }
        })
    }

    async fn serve_connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let Some(vip) = self.original_destination(peer) else {
            // Not a redirected connection (or its record was evicted): nothing to route by.
            debug!(%peer, "no original destination; closing");
            return;
        };
        let _ = stream.set_nodelay(true);
        let proxy = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(vip, peer, req).await) }
        });
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        if let Err(e) = builder
            .serve_connection(TokioIo::new(stream), service)
            .await
        {
            debug!(%peer, %vip, error = %e, "downstream connection ended");
        }
    }

    async fn handle(
        &self,
        vip: VipKey,
        peer: SocketAddr,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let table = self.table();
        let source = table.sources.get(&peer.ip().to_canonical());
        let Some(service) = table.services.get(&vip).cloned() else {
            return local_reply(StatusCode::NOT_FOUND, "");
        };
        self.serve_request(&service, source, peer, req, MESH_GATEWAY, "http")
            .await
    }

    /// Routes one request with `service`'s routes as `gateway` sees them (`mesh`, or a Gateway's
    /// `ns/name` for the gateway listeners), forwards it, and records its telemetry. `scheme`
    /// is what the client spoke (`http`, or `https` behind a terminating gateway).
    pub async fn serve_request(
        &self,
        service: &ProxyService,
        source: Option<&Source>,
        peer: SocketAddr,
        req: Request<Incoming>,
        gateway: &str,
        scheme: &'static str,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let served = self
            .route(service, source, peer, req, gateway, scheme)
            .await;
        let status = served.response.status().as_u16();
        let labels_service = ServiceLabels::from_host(&service.host);
        let index = self.metrics.label_index();
        let destination = served.endpoint.and_then(|e| index.workloads.get(&e));
        let mut labels = IstioLabels::new(
            source.map(|s| &s.workload),
            &labels_service,
            destination,
            "http",
        );
        labels.response_code = status.to_string();
        labels.response_flags = served.flags.to_string();
        self.metrics.requests.get_or_create(&labels).inc();
        self.metrics
            .request_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64() * 1000.0);
        served.response
    }

    async fn route(
        &self,
        service: &ProxyService,
        source: Option<&Source>,
        peer: SocketAddr,
        req: Request<Incoming>,
        gateway: &str,
        scheme: &'static str,
    ) -> Served {
        let (parts, body) = req.into_parts();
        let authority = parts
            .headers
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()))
            .unwrap_or_else(|| service.host.clone());
        let headers: Vec<(String, String)> = parts
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let view = RequestView {
            method: parts.method.as_str(),
            scheme,
            authority: &authority,
            path: parts.uri.path(),
            query: parts.uri.query().unwrap_or(""),
            headers,
            port: service.port,
            source_labels: source.map(|s| &s.labels),
            source_namespace: source.map(|s| s.workload.namespace.as_str()),
            gateway,
        };
        let Some(rule) = service.routes.select(&view) else {
            return Served::local(StatusCode::NOT_FOUND, "", "NR");
        };

        // Faults first; as in Istio, a faulted route gets no retries and no timeout.
        let (retries, timeout) = if rule.fault.is_some() {
            (RetryPolicy::none(), None)
        } else {
            (rule.retries.clone(), rule.timeout)
        };
        let mut delayed = false;
        if let Some(fault) = &rule.fault {
            if let Some((delay, pct)) = fault.delay
                && fastrand::f64() * 100.0 < pct
            {
                tokio::time::sleep(delay).await;
                delayed = true;
            }
            if let Some((status, pct)) = fault.abort
                && fastrand::f64() * 100.0 < pct
            {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return Served::local(status, "fault filter abort", "FI");
            }
        }

        let dest = match &rule.action {
            RouteAction::DirectResponse { status, body } => {
                let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
                let body = body.clone().unwrap_or_default();
                return Served {
                    response: Response::builder()
                        .status(status)
                        .body(full(Bytes::from(body)))
                        .expect("valid direct response"),
                    endpoint: None,
                    flags: "-",
                };
            }
            RouteAction::Redirect(r) => {
                return Served {
                    response: redirect(r, &view),
                    endpoint: None,
                    flags: "-",
                };
            }
            RouteAction::Forward(_) => match rule.pick(fastrand::f64()) {
                Some(d) => d,
                None => {
                    return Served::local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no healthy upstream",
                        "UH",
                    );
                }
            },
        };

        // Path and authority after rewrite.
        let prefix = http::matched_prefix(rule, &view);
        let path = match &rule.rewrite {
            Some(rw) => http::rewrite_path(rw, prefix, view.path),
            None => view.path.to_string(),
        };
        let path_and_query = match view.query {
            "" => path,
            q => format!("{path}?{q}"),
        };
        let authority = rule
            .rewrite
            .as_ref()
            .and_then(|r| r.authority.clone())
            .unwrap_or_else(|| authority.clone());
        let hash_input_header = match &dest.cluster.policy.load_balancer {
            LoadBalancer::Hash(HashKey::Header(h)) => view.header_value(h).map(str::to_string),
            LoadBalancer::Hash(HashKey::Cookie { name, .. }) => {
                view.cookie(name).map(str::to_string)
            }
            LoadBalancer::Hash(HashKey::QueryParam(q)) => view.query_value(q),
            _ => None,
        };
        let mut upstream_headers = parts.headers.clone();
        upstream_headers.insert(hyper::header::HOST, header_value(&authority));
        apply_header_ops(&mut upstream_headers, &rule.headers_request);
        apply_header_ops(&mut upstream_headers, &dest.headers_request);
        upstream_headers.remove(hyper::header::CONNECTION);
        if !upstream_headers.contains_key("x-forwarded-proto") {
            upstream_headers.insert(
                "x-forwarded-proto",
                hyper::header::HeaderValue::from_static(scheme),
            );
        }

        // Replayable body (retries, mirrors) when small and of known length.
        let known_len = parts
            .headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let bodyless = known_len == Some(0)
            || (known_len.is_none()
                && !parts.headers.contains_key(hyper::header::TRANSFER_ENCODING));
        let (buffered, mut streaming) = if bodyless {
            (Some(Bytes::new()), None)
        } else if known_len.is_some_and(|l| l <= REPLAY_LIMIT) {
            match body.collect().await {
                Ok(c) => (Some(c.to_bytes()), None),
                Err(_) => {
                    return Served::local(
                        StatusCode::BAD_REQUEST,
                        "error reading request body",
                        "DPE",
                    );
                }
            }
        } else {
            (None, Some(body))
        };

        for mirror in &rule.mirrors {
            if let Some(body) = &buffered
                && fastrand::f64() * 100.0 < mirror.percentage
            {
                self.mirror(
                    mirror.cluster.clone(),
                    &parts.method,
                    &path_and_query,
                    &authority,
                    &upstream_headers,
                    body.clone(),
                );
            }
        }

        let cluster = dest.cluster.clone();
        let state = self.clusters.get(&cluster.name);
        let Some(_admission) = state.admit(&cluster) else {
            let mut r = local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            );
            r.headers_mut().insert(
                "x-envoy-overloaded",
                hyper::header::HeaderValue::from_static("true"),
            );
            return Served {
                response: r,
                endpoint: None,
                flags: "UO",
            };
        };
        let hash = HashInput {
            header: hash_input_header.as_deref(),
            cookie: hash_input_header.as_deref(),
            query_param: hash_input_header.as_deref(),
            source_ip: Some(peer.ip()),
        };
        // The destination workload authorizes the request as it arrives there: after rewrites
        // and header changes, from the client's address.
        let policies = self.table().authz.clone();
        let authz_headers: Vec<(String, String)> = if policies.workloads.is_empty() {
            Vec::new()
        } else {
            upstream_headers
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect()
        };
        let authorize = |endpoint: SocketAddr| -> Option<Served> {
            let source = peer.ip().to_canonical();
            let decision = policies.decide(&authz::Request {
                source,
                source_namespace: policies.namespace_of(source),
                destination: endpoint,
                http: Some(HttpAttributes {
                    method: parts.method.as_str(),
                    host: &authority,
                    path: path_and_query.split('?').next().unwrap_or_default(),
                    headers: &authz_headers,
                }),
            });
            if decision.allowed {
                return None;
            }
            debug!(%peer, %endpoint, decision = %decision, "request denied by authorization policy");
            // Envoy's RBAC filter answers exactly this; an external authorizer's refusal (here:
            // CUSTOM without one) is flagged UAEX and has no body.
            Some(if decision.action == Some(Action::Custom) {
                Served {
                    response: local_reply(StatusCode::FORBIDDEN, ""),
                    endpoint: Some(endpoint),
                    flags: "UAEX",
                }
            } else {
                Served {
                    response: local_reply(StatusCode::FORBIDDEN, "RBAC: access denied"),
                    endpoint: Some(endpoint),
                    flags: "-",
                }
            })
        };
        let attempts = async {
            let mut tried = Vec::new();
            let max_attempts = if buffered.is_some() {
                retries.attempts + 1
            } else {
                1
            };
            let mut last: Option<Served> = None;
            for attempt in 0..max_attempts {
                if attempt > 0 {
                    // Envoy's default back-off: 25 ms base, exponential, jittered.
                    let base = 25u64 << (attempt - 1).min(4);
                    tokio::time::sleep(Duration::from_millis(base + fastrand::u64(..=base))).await;
                }
                let Some((endpoint, _in_flight)) = state.pick(&cluster, &hash, &tried) else {
                    return Served::local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no healthy upstream",
                        "UH",
                    );
                };
                tried.push(endpoint);
                if let Some(denied) = authorize(endpoint) {
                    if attempt + 1 < max_attempts && retriable_status(&retries, 403) {
                        last = Some(denied);
                        continue;
                    }
                    return denied;
                }
                let body = match (&buffered, streaming.take()) {
                    (Some(b), _) => full(b.clone()),
                    (None, Some(s)) => s.boxed(),
                    (None, None) => break,
                };
                let mut up = Request::builder()
                    .method(parts.method.clone())
                    .uri(format!("http://{endpoint}{path_and_query}"))
                    .body(body)
                    .expect("valid upstream request");
                *up.headers_mut() = upstream_headers.clone();
                if attempt > 0 {
                    up.headers_mut().insert(
                        "x-envoy-attempt-count",
                        header_value(&(attempt + 1).to_string()),
                    );
                }
                let client = self.client_for(&cluster.policy);
                let sent = client.request(up);
                let result = match retries.per_try_timeout {
                    Some(t) => tokio::time::timeout(t, sent).await.map_err(|_| ()),
                    None => Ok(sent.await),
                };
                let outlier = cluster.policy.outlier.as_ref();
                let n = cluster.endpoints.len();
                match result {
                    Ok(Ok(resp)) => {
                        let code = resp.status().as_u16();
                        let outcome = match code {
                            502..=504 => Outcome::GatewayError,
                            500..=599 => Outcome::ServerError,
                            _ => Outcome::Success,
                        };
                        state.record(endpoint, outcome, outlier, n);
                        let served = Served {
                            response: resp.map(|b| b.boxed()),
                            endpoint: Some(endpoint),
                            flags: "-",
                        };
                        if attempt + 1 < max_attempts && retriable_status(&retries, code) {
                            last = Some(served);
                            continue;
                        }
                        return served;
                    }
                    Ok(Err(e)) => {
                        state.record(endpoint, Outcome::GatewayError, outlier, n);
                        let connect_failure = e.is_connect();
                        debug!(%endpoint, error = %e, "upstream attempt failed");
                        let (reason, flag) = if connect_failure {
                            ("connection failure", "UF")
                        } else {
                            ("connection termination", "UC")
                        };
                        let served = Served {
                            response: local_reply_owned(
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!(
                                    "upstream connect error or disconnect/reset before headers. reset reason: {reason}"
                                ),
                            ),
                            endpoint: Some(endpoint),
                            flags: flag,
                        };
                        if attempt + 1 < max_attempts && retriable_error(&retries, connect_failure)
                        {
                            last = Some(served);
                            continue;
                        }
                        return served;
                    }
                    Err(()) => {
                        state.record(endpoint, Outcome::GatewayError, outlier, n);
                        let served = Served::local(
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream request timeout",
                            "UT",
                        );
                        // Envoy retries per-try timeouts on 5xx, gateway-error and reset.
                        if attempt + 1 < max_attempts
                            && retries
                                .retry_on
                                .iter()
                                .any(|r| matches!(r.as_str(), "5xx" | "gateway-error" | "reset"))
                        {
                            last = Some(served);
                            continue;
                        }
                        return served;
                    }
                }
            }
            last.unwrap_or_else(|| {
                Served::local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream", "UH")
            })
        };
        let mut served = match timeout {
            Some(t) => match tokio::time::timeout(t, attempts).await {
                Ok(s) => s,
                Err(_) => Served::local(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream request timeout",
                    "UT",
                ),
            },
            None => attempts.await,
        };
        if delayed && served.flags == "-" {
            served.flags = "DI";
        }
        let headers = served.response.headers_mut();
        apply_header_ops(headers, &dest.headers_response);
        apply_header_ops(headers, &rule.headers_response);
        served
    }

    /// Sends a copy of a request to a mirror cluster and forgets it: the response is dropped,
    /// failures only show in debug logs, and the copy never delays the primary request.
    fn mirror(
        &self,
        cluster: Arc<Cluster>,
        method: &hyper::Method,
        path_and_query: &str,
        authority: &str,
        headers: &hyper::HeaderMap,
        body: Bytes,
    ) {
        let Ok(permit) = self.mirrors.clone().try_acquire_owned() else {
            debug!(cluster = %cluster.name, "mirror dropped: too many in flight");
            return;
        };
        let state = self.clusters.get(&cluster.name);
        let Some((endpoint, in_flight)) = state.pick(&cluster, &HashInput::default(), &[]) else {
            return;
        };
        // Istio/Envoy mark shadow traffic by suffixing the host with -shadow.
        let host = match authority.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => format!("{h}-shadow:{p}"),
            _ => format!("{authority}-shadow"),
        };
        let mut req = Request::builder()
            .method(method.clone())
            .uri(format!("http://{endpoint}{path_and_query}"))
            .body(full(body))
            .expect("valid mirror request");
        *req.headers_mut() = headers.clone();
        req.headers_mut()
            .insert(hyper::header::HOST, header_value(&host));
        let client = self.client_for(&cluster.policy);
        tokio::spawn(async move {
            let _permit = permit;
            let _in_flight = in_flight;
            match tokio::time::timeout(Duration::from_secs(30), client.request(req)).await {
                Ok(Ok(resp)) => {
                    let _ = resp.into_body().collect().await;
                }
                Ok(Err(e)) => debug!(%endpoint, error = %e, "mirror failed"),
                Err(_) => debug!(%endpoint, "mirror timed out"),
            }
        });
    }
}

fn retriable_status(policy: &RetryPolicy, code: u16) -> bool {
    policy.retry_on.iter().any(|on| match on.as_str() {
        "5xx" => (500..=599).contains(&code),
        "gateway-error" => matches!(code, 502..=504),
        "retriable-4xx" => code == 409,
        "retriable-status-codes" => policy.retriable_status_codes.contains(&code),
        "unavailable" | "cancelled" | "resource-exhausted" | "internal" | "deadline-exceeded" => {
            false
        }
        other => other.parse::<u16>().ok() == Some(code),
    })
}

fn retriable_error(policy: &RetryPolicy, connect_failure: bool) -> bool {
    policy.retry_on.iter().any(|on| match on.as_str() {
        "5xx" | "gateway-error" | "reset" => true,
        "connect-failure" => connect_failure,
        "refused-stream" => !connect_failure,
        _ => false,
    })
}

fn header_value(s: &str) -> hyper::header::HeaderValue {
    hyper::header::HeaderValue::from_str(s)
        .unwrap_or_else(|_| hyper::header::HeaderValue::from_static("invalid"))
}

fn apply_header_ops(headers: &mut hyper::HeaderMap, ops: &HeaderOps) {
    for name in &ops.remove {
        if let Ok(n) = hyper::header::HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(n);
        }
    }
    for (name, value) in &ops.set {
        if let Ok(n) = hyper::header::HeaderName::from_bytes(name.as_bytes()) {
            headers.insert(n, header_value(value));
        }
    }
    for (name, value) in &ops.add {
        if let Ok(n) = hyper::header::HeaderName::from_bytes(name.as_bytes()) {
            headers.append(n, header_value(value));
        }
    }
}

fn redirect(r: &Redirect, view: &RequestView<'_>) -> Response<ProxyBody> {
    let authority = r
        .authority
        .clone()
        .unwrap_or_else(|| view.authority.to_string());
    let authority = match r.port {
        Some(p) => format!(
            "{}:{p}",
            authority
                .rsplit_once(':')
                .map_or(authority.as_str(), |(h, _)| h)
        ),
        None => authority,
    };
    let scheme = r.scheme.as_deref().unwrap_or(view.scheme);
    let path = r.uri.clone().unwrap_or_else(|| view.path.to_string());
    let location = match view.query {
        "" => format!("{scheme}://{authority}{path}"),
        q => format!("{scheme}://{authority}{path}?{q}"),
    };
    Response::builder()
        .status(StatusCode::from_u16(r.code).unwrap_or(StatusCode::MOVED_PERMANENTLY))
        .header(hyper::header::LOCATION, header_value(&location))
        .body(full(Bytes::new()))
        .expect("valid redirect")
}

fn full(b: Bytes) -> ProxyBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// A response generated by the proxy itself, marked the way Envoy marks its own replies.
pub fn local_reply(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    local_reply_owned(status, body.to_string())
}

fn local_reply_owned(status: StatusCode, body: String) -> Response<ProxyBody> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .header("server", "steerd")
        .body(full(Bytes::from(body)))
        .expect("static response parts are valid")
}
