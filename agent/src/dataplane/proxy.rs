//! The in-process L7 proxy.
//!
//! The kernel sends every TCP connection to an L7 service (see `SVC_F_L7`) to this listener on
//! the node's own address. On accept, the proxy recovers the VIP:port the client dialled from the
//! `sd_l7conn_v1` map (keyed by the client's address and port, which is the accepted socket's
//! peer), serves the connection as HTTP/1.1 or HTTP/2 (h2c prior knowledge), routes every request
//! with the plan for that VIP, and forwards it over pooled upstream connections. Upstream sockets
//! carry [`PROXY_SOCKET_MARK`] so the kernel never steers them back here.

use crate::compile::{Plan, VipKey, WeightedBackend};
use crate::dataplane::kernel;
use aya::maps::{HashMap as BpfHashMap, MapData};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use steerd_common::{ClientKey, PROXY_SOCKET_MARK, RevNatValue};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Upstream TCP connect timeout when no DestinationRule sets one (Envoy's default is 10 s;
/// Istio's is the same).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Weighted endpoints of the default route.
    pub backends: Vec<WeightedBackend>,
}

/// Everything the proxy needs, rebuilt from each plan and swapped in atomically.
#[derive(Debug, Default)]
pub struct ProxyTable {
    pub services: HashMap<VipKey, Arc<ProxyService>>,
}

impl ProxyTable {
    pub fn from_plan(plan: &Plan) -> Self {
        let services = plan
            .services
            .iter()
            .filter(|(_, s)| s.needs_l7)
            .map(|(vip, s)| {
                (
                    *vip,
                    Arc::new(ProxyService {
                        host: s.host.clone(),
                        backends: s.backends.clone(),
                    }),
                )
            })
            .collect();
        Self { services }
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

/// The proxy: shared state of the listeners and request handlers.
pub struct Proxy {
    table: RwLock<Arc<ProxyTable>>,
    /// The kernel's record of which VIP each redirected client dialled.
    connections: Mutex<BpfHashMap<MapData, ClientKey, RevNatValue>>,
    http1: Client<MarkedConnector, ProxyBody>,
}

impl Proxy {
    pub fn new(connections: BpfHashMap<MapData, ClientKey, RevNatValue>) -> Arc<Self> {
        let connector = MarkedConnector {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        };
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Arc::new(Self {
            table: RwLock::new(Arc::new(ProxyTable::default())),
            connections: Mutex::new(connections),
            http1,
        })
    }

    /// Swaps in the routing of a new plan; connections in flight finish their current request
    /// with the table they started it with.
    pub fn update(&self, table: ProxyTable) {
        *self.table.write().expect("proxy table lock") = Arc::new(table);
    }

    fn table(&self) -> Arc<ProxyTable> {
        self.table.read().expect("proxy table lock").clone()
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
        _peer: SocketAddr,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let table = self.table();
        let Some(service) = table.services.get(&vip).cloned() else {
            return local_reply(StatusCode::NOT_FOUND, "no route for this service\n");
        };
        let Some(backend) = pick_weighted(&service.backends) else {
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = match format!("http://{backend}{path}").parse() {
            Ok(u) => u,
            Err(_) => return local_reply(StatusCode::BAD_REQUEST, "bad request path\n"),
        };
        if parts.headers.get(hyper::header::HOST).is_none()
            && let Ok(v) = service.host.parse()
        {
            parts.headers.insert(hyper::header::HOST, v);
        }
        parts.version = hyper::Version::HTTP_11;
        let upstream = Request::from_parts(parts, body.boxed());
        match self.http1.request(upstream).await {
            Ok(resp) => resp.map(|b| b.boxed()),
            Err(e) => {
                debug!(%backend, error = %e, "upstream request failed");
                local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                )
            }
        }
    }
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

/// A weighted random pick (weights need not be normalised).
fn pick_weighted(backends: &[WeightedBackend]) -> Option<SocketAddr> {
    let total: f64 = backends.iter().map(|b| b.weight).sum();
    if backends.is_empty() || total <= 0.0 {
        return None;
    }
    let mut x = fastrand::f64() * total;
    for b in backends {
        if x < b.weight {
            return Some(b.addr);
        }
        x -= b.weight;
    }
    backends.last().map(|b| b.addr)
}

/// A response generated by the proxy itself, marked the way Envoy marks its own replies.
pub fn local_reply(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .header("server", "steerd")
        .body(
            Full::new(Bytes::from_static(body.as_bytes()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("static response parts are valid")
}
