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
    self, Cluster, ClusterPolicy, CorsDecision, HashKey, HeaderOps, HttpRoutes, LoadBalancer,
    Redirect, RequestView, RetryPolicy, RouteAction,
};
use crate::compile::registry::Workload;
use crate::compile::{Plan, Source, VipKey};
use crate::dataplane::kernel;
use crate::dataplane::pool::{PoolSettings, UpstreamError};
use crate::dataplane::upstream::{ClusterState, Clusters, HashInput, MemberSource, Outcome};
use crate::dataplane::workers::ProxyWorkers;
use crate::metrics::{Metrics, RequestKey};
use crate::model::istio::MESH_GATEWAY;
use crate::model::security::Action;
use arc_swap::ArcSwap;
use aya::maps::{HashMap as BpfHashMap, MapData};
use bytes::Bytes;
use hashbrown::HashMap;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{HOST, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};
use steerd_common::{ClientKey, RevNatValue};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Upstream TCP connect timeout when no DestinationRule sets one (Envoy's default is 10 s;
/// Istio's is the same).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle upstream connection is kept when no DestinationRule sets `idleTimeout`
/// (Envoy's default is 1 h; a node agent keeps fewer sockets open).
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often idle upstream connections past their idle timeout are closed.
const IDLE_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

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
    pub sources: HashMap<IpAddr, Arc<Source>>,
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
            sources: plan
                .sources
                .iter()
                .map(|(ip, s)| (*ip, s.clone()))
                .collect(),
            authz: plan.authz.clone(),
        }
    }
}

/// The upstream connection settings of a cluster's DestinationRule.
fn pool_settings(cluster: &Cluster, state: &ClusterState) -> PoolSettings {
    let policy: &ClusterPolicy = &cluster.policy;
    PoolSettings {
        http2: policy.http2,
        connect_timeout: policy.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        idle_timeout: policy.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT),
        max_requests_per_connection: policy.max_requests_per_connection,
        tls: state.tls_origination(cluster),
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
    /// Read by every request without a lock; replaced whole by each plan.
    table: ArcSwap<ProxyTable>,
    /// The kernel's record of which VIP each redirected client dialled.
    connections: Mutex<BpfHashMap<MapData, ClientKey, RevNatValue>>,
    /// Per-cluster state, including each endpoint's upstream connections.
    clusters: Clusters,
    mirrors: Arc<tokio::sync::Semaphore>,
    metrics: Arc<Metrics>,
    idle_sweeper: Once,
    /// This node's locality (`--locality`, or its Node's topology labels, which may change),
    /// for locality load balancing.
    locality: arc_swap::ArcSwapOption<http::Locality>,
}

/// What became of a request, for telemetry.
struct Served<'a> {
    response: Response<ProxyBody>,
    /// The workload of the endpoint that answered, if any.
    destination: Option<&'a Workload>,
    /// Envoy's response flags (`-`, `NR`, `UO`, `UT`, `UF`, `FI`, `DI`, ...).
    flags: &'static str,
}

impl Served<'_> {
    fn local(status: StatusCode, body: &'static str, flags: &'static str) -> Self {
        Self {
            response: local_reply(status, body),
            destination: None,
            flags,
        }
    }
}

/// The request headers the upstream request carries (edited), and whether they are still
/// needed for another attempt or a mirror copy.
struct UpstreamHead {
    method: hyper::Method,
    path_and_query: PathAndQuery,
    headers: hyper::HeaderMap,
}

impl Proxy {
    pub fn new(
        connections: BpfHashMap<MapData, ClientKey, RevNatValue>,
        metrics: Arc<Metrics>,
        locality: Option<http::Locality>,
    ) -> Arc<Self> {
        Arc::new(Self {
            table: ArcSwap::from_pointee(ProxyTable::default()),
            connections: Mutex::new(connections),
            clusters: Clusters::default(),
            mirrors: Arc::new(tokio::sync::Semaphore::new(MAX_MIRRORS_IN_FLIGHT)),
            metrics,
            idle_sweeper: Once::new(),
            locality: arc_swap::ArcSwapOption::from(locality.map(Arc::new)),
        })
    }

    /// Sets this node's locality (None: unknown, locality is then ignored). Requests already
    /// routed keep the one they started with.
    pub fn set_locality(&self, locality: Option<http::Locality>) {
        self.locality.store(locality.map(Arc::new));
    }

    /// This node's locality as the proxy uses it.
    pub fn locality(&self) -> Option<Arc<http::Locality>> {
        self.locality.load_full()
    }

    /// Swaps in the routing of a new plan; requests in flight finish with the table they
    /// started with.
    pub fn update(&self, table: ProxyTable) {
        self.clusters.observe_members(
            MemberSource::Mesh,
            table.services.values().flat_map(|s| s.routes.clusters()),
            std::time::Instant::now(),
        );
        self.table.store(Arc::new(table));
    }

    /// Records which endpoints the `warmup` clusters of a gateway plan list (see
    /// [`Clusters::observe_members`]); the mesh table's are recorded by [`Proxy::update`].
    pub fn observe_gateway_members<'c>(&self, clusters: impl IntoIterator<Item = &'c Cluster>) {
        self.clusters
            .observe_members(MemberSource::Gateway, clusters, std::time::Instant::now());
    }

    /// Runtime state of a cluster (ejections, pool usage), for `inspect`.
    pub fn cluster_state(&self, name: &str) -> Arc<ClusterState> {
        self.clusters.get(name)
    }

    /// Closes idle upstream connections past their idle timeout, in the background (started
    /// with the first listener, as it needs the runtime).
    fn start_idle_sweeper(self: &Arc<Self>) {
        self.idle_sweeper.call_once(|| {
            let proxy = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(IDLE_SWEEP_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(proxy) = proxy.upgrade() else { return };
                    for cluster in proxy.clusters.all() {
                        cluster.evict_idle_connections();
                    }
                }
            });
        });
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

    /// Binds one `SO_REUSEPORT` listener on `addr` per worker now (so errors surface at
    /// start-up) and runs each one's accept loop on its worker.
    pub fn bind_workers(
        self: &Arc<Self>,
        workers: &ProxyWorkers,
        addr: SocketAddr,
    ) -> Result<(), ProxyError> {
        let listeners = workers
            .handles()
            .iter()
            .map(|_| bind_listener(addr).map_err(|source| ProxyError::Bind { addr, source }))
            .collect::<Result<Vec<_>, _>>()?;
        info!(%addr, workers = listeners.len(), "L7 proxy listening");
        self.start_idle_sweeper();
        for (listener, worker) in listeners.into_iter().zip(workers.handles()) {
            let proxy = self.clone();
            worker.spawn(async move {
                // Registers the socket with this worker's reactor.
                match TcpListener::from_std(listener) {
                    Ok(listener) => proxy.accept_loop(listener).await,
                    Err(e) => warn!(%addr, error = %e, "proxy listener on a worker"),
                }
            });
        }
        Ok(())
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "proxy accept");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let proxy = self.clone();
            tokio::spawn(async move { proxy.serve_connection(stream, peer).await });
        }
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
            // Boxed: the request's future is several KiB, and hyper moves the future it is
            // handed into its connection state; moving a pointer instead is cheaper.
            Box::pin(async move {
                Ok::<_, std::convert::Infallible>(proxy.handle(vip, peer, req).await)
            })
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
        let table = self.table.load_full();
        let source = table.sources.get(&peer.ip().to_canonical()).map(|s| &**s);
        let Some(service) = table.services.get(&vip) else {
            return local_reply(StatusCode::NOT_FOUND, "");
        };
        self.serve_request(service, source, peer, req, MESH_GATEWAY, "http")
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
        let mut cors_headers = Vec::new();
        let mut served = self
            .route(
                service,
                source,
                peer,
                req,
                gateway,
                scheme,
                &mut cors_headers,
            )
            .await;
        // Envoy's CORS filter sets these on every response to an allowed origin's request,
        // the proxy's own replies (faults, timeouts, 503s) included.
        for (name, value) in cors_headers {
            served
                .response
                .headers_mut()
                .insert(name, header_value(&value));
        }
        let series = self.metrics.request_series(&RequestKey {
            source: source.map(|s| &s.workload),
            service: &service.host,
            destination: served.destination,
            response_code: served.response.status().as_u16(),
            response_flags: served.flags,
        });
        series.requests.inc();
        series
            .duration
            .observe(started.elapsed().as_secs_f64() * 1000.0);
        served.response
    }

    /// Routes and forwards one request. `cors_headers` receives the CORS headers the response
    /// is to carry (the rule's `corsPolicy`, for an allowed origin).
    #[allow(clippy::too_many_arguments)]
    async fn route<'s>(
        &self,
        service: &'s ProxyService,
        source: Option<&Source>,
        peer: SocketAddr,
        req: Request<Incoming>,
        gateway: &str,
        scheme: &'static str,
        cors_headers: &mut Vec<(&'static str, String)>,
    ) -> Served<'s> {
        let (mut parts, body) = req.into_parts();
        let view = RequestView {
            method: parts.method.as_str(),
            scheme,
            authority: request_authority(&parts).unwrap_or(&service.host),
            path: parts.uri.path(),
            query: parts.uri.query().unwrap_or(""),
            headers: Cow::Borrowed(&parts.headers),
            port: service.port,
            source_labels: source.map(|s| &s.labels),
            source_namespace: source.map(|s| &*s.workload.namespace),
            gateway,
        };
        let Some(rule) = service.routes.select(&view) else {
            return Served::local(StatusCode::NOT_FOUND, "", "NR");
        };
        // The CORS filter runs before faults and routing: it answers preflights itself.
        if let Some(cors) = &rule.cors {
            match cors.evaluate(&view) {
                CorsDecision::Preflight { headers, .. } => {
                    let mut response = Response::new(full(Bytes::new()));
                    for (name, value) in headers {
                        response.headers_mut().insert(name, header_value(&value));
                    }
                    return Served {
                        response,
                        destination: None,
                        flags: "-",
                    };
                }
                CorsDecision::Allowed { headers } => *cors_headers = headers,
                CorsDecision::NotCors | CorsDecision::OriginNotAllowed => {}
            }
        }

        // Faults first; as in Istio, a faulted route gets no retries and no timeout.
        let (retries, timeout) = if rule.fault.is_some() {
            (Cow::Owned(RetryPolicy::none()), None)
        } else {
            (Cow::Borrowed(&rule.retries), rule.timeout)
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
                    destination: None,
                    flags: "-",
                };
            }
            RouteAction::Redirect(r) => {
                return Served {
                    response: redirect(r, &view),
                    destination: None,
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

        // Path and authority after rewrite: without a rewrite the request's own path (no new
        // string, no parse) and Host header go upstream.
        let path_and_query = match &rule.rewrite {
            Some(rw) if rw.uri.is_some() || rw.uri_regex.is_some() => {
                let path = http::rewrite_path(rw, http::matched_prefix(rule, &view), view.path);
                let rewritten = match view.query {
                    "" => path,
                    q => format!("{path}?{q}"),
                };
                match PathAndQuery::try_from(rewritten) {
                    Ok(pq) => pq,
                    Err(_) => {
                        return Served::local(
                            StatusCode::BAD_REQUEST,
                            "invalid rewritten path",
                            "-",
                        );
                    }
                }
            }
            _ => parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        };
        let new_authority: Option<HeaderValue> =
            match rule.rewrite.as_ref().and_then(|r| r.authority.as_deref()) {
                Some(a) => Some(header_value(a)),
                // HTTP/2 clients send :authority, which the upstream request needs as Host.
                None if !parts.headers.contains_key(HOST) => Some(header_value(view.authority)),
                None => None,
            };
        // A cookie Envoy would generate for a request without one (hash key and Set-Cookie).
        let mut set_cookie: Option<HeaderValue> = None;
        let hash_key: Option<String> = match &dest.cluster.policy.load_balancer {
            LoadBalancer::Hash(HashKey::Header(h)) => view.header_value(h).map(Cow::into_owned),
            LoadBalancer::Hash(HashKey::Cookie {
                name,
                ttl,
                path,
                attributes,
            }) => match (view.cookie(name).filter(|v| !v.is_empty()), ttl) {
                // An empty cookie counts as none, as in Envoy.
                (Some(v), _) => Some(v.to_string()),
                (None, Some(ttl)) => {
                    let value = generated_cookie_value(peer, &service.host, service.port);
                    set_cookie = Some(set_cookie_header(
                        name,
                        &value,
                        *ttl,
                        path.as_deref(),
                        attributes,
                    ));
                    Some(value)
                }
                (None, None) => None,
            },
            LoadBalancer::Hash(HashKey::QueryParam(q)) => view.query_value(q).map(str::to_string),
            _ => None,
        };
        // The mirror copies' Host: Istio/Envoy mark shadow traffic with a -shadow host suffix.
        let mirror_host = (!rule.mirrors.is_empty()).then(|| {
            let authority = rule
                .rewrite
                .as_ref()
                .and_then(|r| r.authority.as_deref())
                .unwrap_or(view.authority);
            shadow_host(authority)
        });
        drop(view);

        // The request's own header map, edited in place, goes upstream.
        let mut headers = std::mem::take(&mut parts.headers);
        if let Some(host) = new_authority {
            headers.insert(HOST, host);
        }
        apply_header_ops(&mut headers, &rule.headers_request);
        apply_header_ops(&mut headers, &dest.headers_request);
        headers.remove(hyper::header::CONNECTION);
        if !headers.contains_key("x-forwarded-proto") {
            headers.insert("x-forwarded-proto", HeaderValue::from_static(scheme));
        }

        // Replayable body (retries, mirrors) when small and of known length.
        let known_len = headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let bodyless = known_len == Some(0)
            || (known_len.is_none() && !headers.contains_key(hyper::header::TRANSFER_ENCODING));
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
        let head = UpstreamHead {
            method: parts.method,
            path_and_query,
            headers,
        };

        if let (Some(body), Some(host)) = (&buffered, &mirror_host) {
            for mirror in &rule.mirrors {
                if fastrand::f64() * 100.0 < mirror.percentage {
                    self.mirror(&mirror.cluster, &head, host, body.clone());
                }
            }
        }

        let cluster = &dest.cluster;
        let state = self.clusters.get(&cluster.name);
        let Some(_admission) = state.admit(cluster) else {
            let mut r = local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            );
            r.headers_mut()
                .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
            return Served {
                response: r,
                destination: None,
                flags: "UO",
            };
        };
        let locality = self.locality.load_full();
        let hash = HashInput {
            client_locality: locality.as_deref(),
            client_labels: source.map(|s| &s.labels),
            header: hash_key.as_deref(),
            cookie: hash_key.as_deref(),
            query_param: hash_key.as_deref(),
            source_ip: Some(peer.ip()),
        };
        let settings = pool_settings(cluster, &state);
        // The destination workload authorizes the request as it arrives there: after rewrites
        // and header changes, from the client's address.
        let policies = self.table.load().authz.clone();
        let authz_request = (!policies.workloads.is_empty()).then(|| {
            let headers: Vec<(String, String)> = head
                .headers
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect();
            let host = head
                .headers
                .get(HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            (
                head.method.as_str().to_string(),
                host,
                head.path_and_query.path().to_string(),
                headers,
            )
        });
        let authorize = |endpoint: SocketAddr,
                         destination: Option<&'s Workload>|
         -> Option<Served<'s>> {
            let (method, host, path, headers) = authz_request.as_ref()?;
            let source = peer.ip().to_canonical();
            let decision = policies.decide(&authz::Request {
                source,
                source_namespace: policies.namespace_of(source),
                destination: endpoint,
                http: Some(HttpAttributes {
                    method,
                    host,
                    path,
                    headers,
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
                    destination,
                    flags: "UAEX",
                }
            } else {
                Served {
                    response: local_reply(StatusCode::FORBIDDEN, "RBAC: access denied"),
                    destination,
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
            // The head goes with the last attempt; earlier ones send a copy.
            let mut head = Some(head);
            let mut last: Option<Served<'s>> = None;
            for attempt in 0..max_attempts {
                if attempt > 0 {
                    // Envoy's default back-off: 25 ms base, exponential, jittered.
                    let base = 25u64 << (attempt - 1).min(4);
                    tokio::time::sleep(Duration::from_millis(base + fastrand::u64(..=base))).await;
                }
                let Some(picked) = state.pick(cluster, &hash, &tried) else {
                    return Served::local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no healthy upstream",
                        "UH",
                    );
                };
                let endpoint = picked.addr;
                let destination = Some(&*cluster.endpoints[picked.index].workload);
                tried.push(endpoint);
                if let Some(denied) = authorize(endpoint, destination) {
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
                let UpstreamHead {
                    method,
                    path_and_query,
                    mut headers,
                } = if attempt + 1 < max_attempts {
                    let h = head.as_ref().expect("head kept for later attempts");
                    UpstreamHead {
                        method: h.method.clone(),
                        path_and_query: h.path_and_query.clone(),
                        headers: h.headers.clone(),
                    }
                } else {
                    head.take().expect("head for the last attempt")
                };
                if attempt > 0 {
                    headers.insert("x-envoy-attempt-count", HeaderValue::from(attempt + 1));
                }
                let mut up = Request::new(body);
                *up.method_mut() = method;
                *up.headers_mut() = headers;
                let sent =
                    picked
                        .in_flight
                        .pool()
                        .send(endpoint, settings.clone(), path_and_query, up);
                let result = within(retries.per_try_timeout, sent).await;
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
                            destination,
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
                        let served = upstream_failure(&e, destination);
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
        let mut served = within(timeout, attempts).await.unwrap_or_else(|()| {
            Served::local(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream request timeout",
                "UT",
            )
        });
        if delayed && served.flags == "-" {
            served.flags = "DI";
        }
        let headers = served.response.headers_mut();
        apply_header_ops(headers, &dest.headers_response);
        apply_header_ops(headers, &rule.headers_response);
        if let Some(cookie) = set_cookie {
            headers.append(hyper::header::SET_COOKIE, cookie);
        }
        served
    }

    /// Sends a copy of a request to a mirror cluster and forgets it: the response is dropped,
    /// failures only show in debug logs, and the copy never delays the primary request.
    fn mirror(&self, cluster: &Arc<Cluster>, head: &UpstreamHead, host: &HeaderValue, body: Bytes) {
        let Ok(permit) = self.mirrors.clone().try_acquire_owned() else {
            debug!(cluster = %cluster.name, "mirror dropped: too many in flight");
            return;
        };
        let state = self.clusters.get(&cluster.name);
        let Some(picked) = state.pick(cluster, &HashInput::default(), &[]) else {
            return;
        };
        let mut req = Request::new(full(body));
        *req.method_mut() = head.method.clone();
        *req.headers_mut() = head.headers.clone();
        req.headers_mut().insert(HOST, host.clone());
        let settings = pool_settings(cluster, &state);
        let path_and_query = head.path_and_query.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let endpoint = picked.addr;
            let sent = picked
                .in_flight
                .pool()
                .send(endpoint, settings, path_and_query, req);
            match tokio::time::timeout(Duration::from_secs(30), sent).await {
                Ok(Ok(resp)) => {
                    let _ = resp.into_body().collect().await;
                }
                Ok(Err(e)) => debug!(%endpoint, error = %e, "mirror failed"),
                Err(_) => debug!(%endpoint, "mirror timed out"),
            }
        });
    }
}

/// The Host header (HTTP/1.1) or :authority (HTTP/2) the client sent.
fn request_authority(parts: &hyper::http::request::Parts) -> Option<&str> {
    parts
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
}

/// The Host of a mirrored copy: `host-shadow[:port]`.
fn shadow_host(authority: &str) -> HeaderValue {
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => format!("{h}-shadow:{p}"),
        _ => format!("{authority}-shadow"),
    };
    header_value(&host)
}

/// The value of a consistent-hash cookie generated for a request that had none. Like Envoy's,
/// it is the hash of the downstream connection's addresses, so requests racing on one connection
/// get the same cookie, and 16 hex digits.
fn generated_cookie_value(peer: SocketAddr, host: &str, port: u16) -> String {
    use std::hash::BuildHasher;
    // A fixed seed: the value means the same endpoint after an agent restart.
    let hasher = foldhash::fast::FixedState::with_seed(0xc00c_1e5e_ed00_0001);
    format!("{:016x}", hasher.hash_one((peer, host, port)))
}

/// Envoy's `Set-Cookie` for a generated hash cookie: quoted value, `Max-Age` unless the ttl is
/// zero (a session cookie), `Path`, the extra attributes, `HttpOnly`.
fn set_cookie_header(
    name: &str,
    value: &str,
    ttl: Duration,
    path: Option<&str>,
    attributes: &[(String, Option<String>)],
) -> HeaderValue {
    let mut cookie = format!("{name}=\"{value}\"");
    if !ttl.is_zero() {
        cookie += &format!("; Max-Age={}", ttl.as_secs());
    }
    if let Some(path) = path {
        cookie += &format!("; Path={path}");
    }
    for (attribute, value) in attributes {
        match value {
            Some(v) => cookie += &format!("; {attribute}={v}"),
            None => cookie += &format!("; {attribute}"),
        }
    }
    cookie += "; HttpOnly";
    header_value(&cookie)
}

/// Envoy's 503 for an attempt that failed before a response: connection failure (`UF`) or
/// termination (`UC`).
/// `fut`, bounded by `limit` if there is one (`Err(())` once it passes). One future type for
/// both cases: awaiting `timeout(t, fut)` in one branch and `fut` in the other would keep two
/// copies of `fut`'s state in the caller's future, which the request path moves around.
fn within<F: std::future::Future>(
    limit: Option<Duration>,
    fut: F,
) -> impl std::future::Future<Output = Result<F::Output, ()>> {
    use futures::FutureExt;
    match limit {
        Some(t) => {
            futures::future::Either::Left(tokio::time::timeout(t, fut).map(|r| r.map_err(|_| ())))
        }
        None => futures::future::Either::Right(fut.map(Ok)),
    }
}

fn upstream_failure<'a>(e: &UpstreamError, destination: Option<&'a Workload>) -> Served<'a> {
    let (reason, flags) = if e.is_connect() {
        ("connection failure", "UF")
    } else {
        ("connection termination", "UC")
    };
    // Envoy appends the TLS error as `transport failure reason`.
    let transport = e
        .transport_failure()
        .map(|r| format!(", transport failure reason: TLS_error: {r}"))
        .unwrap_or_default();
    Served {
        response: local_reply_owned(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "upstream connect error or disconnect/reset before headers. reset reason: {reason}{transport}"
            ),
        ),
        destination,
        flags,
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

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
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

/// A listening socket on `addr`, one of several: `SO_REUSEPORT` lets every worker (and, during
/// an upgrade, the next agent's workers) bind the same address.
fn bind_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_hash_cookie_follows_envoy() {
        let attributes = vec![
            ("SameSite".to_string(), Some("Strict".to_string())),
            ("Secure".to_string(), None),
        ];
        let cookie = set_cookie_header(
            "user",
            "00ff",
            Duration::from_secs(60),
            Some("/"),
            &attributes,
        );
        assert_eq!(
            cookie,
            "user=\"00ff\"; Max-Age=60; Path=/; SameSite=Strict; Secure; HttpOnly"
        );
        assert_eq!(
            set_cookie_header("user", "00ff", Duration::ZERO, None, &[]),
            "user=\"00ff\"; HttpOnly",
            "a zero ttl is a session cookie"
        );
        let peer: SocketAddr = "10.244.1.2:40000".parse().unwrap();
        let value = generated_cookie_value(peer, "reviews", 9080);
        assert_eq!(value.len(), 16);
        assert_eq!(value, generated_cookie_value(peer, "reviews", 9080));
        let other: SocketAddr = "10.244.1.2:40001".parse().unwrap();
        assert_ne!(
            value,
            generated_cookie_value(other, "reviews", 9080),
            "another connection gets another cookie"
        );
    }
}
