//! Upstream HTTP connections of the L7 proxy, pooled per (cluster, endpoint).
//!
//! Each endpoint of each cluster keeps, per proxy worker, its own idle HTTP/1.1 connections (a
//! stack: the most recently used connection is reused first, so surplus ones age out) or its one
//! shared HTTP/2 connection. Requests to different endpoints therefore never wait on a common
//! lock, a worker reuses only connections its own runtime drives, and a request's path is sent
//! as it arrived (no absolute URI to format and parse again, as a generic client needs). The
//! pool applies the DestinationRule connection settings: `tcp.connectTimeout`,
//! `http.idleTimeout` and `http.maxRequestsPerConnection`.
//!
//! An HTTP/1.1 connection returns to its pool when the response body has been read to its end
//! ([`PooledBody`]); a response dropped before its end takes its connection with it, since the
//! rest of that body would still be on the wire.

use crate::compile::http::UpstreamTls;
use crate::dataplane::proxy::ProxyBody;
use crate::dataplane::workers;
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};
use steerd_common::PROXY_SOCKET_MARK;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

/// The DestinationRule settings one endpoint's connections follow.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    /// Speak HTTP/2 (prior knowledge) to the endpoint.
    pub http2: bool,
    pub connect_timeout: Duration,
    /// Idle connections are closed after this long.
    pub idle_timeout: Duration,
    /// `http.maxRequestsPerConnection`: a connection is closed once it has carried this many.
    pub max_requests_per_connection: Option<u32>,
    /// DestinationRule `tls`: connections are TLS with these settings.
    pub tls: Option<Arc<TlsOrigination>>,
}

/// The TLS a cluster's connections originate, built once per DestinationRule version (see
/// `ClusterState::tls_origination`).
pub struct TlsOrigination {
    pub plan: UpstreamTls,
    /// The connector, or why none could be built (every connection then fails with `UF`).
    pub connector: Result<(tokio_rustls::TlsConnector, ServerName<'static>), String>,
}

impl PartialEq for TlsOrigination {
    fn eq(&self, other: &Self) -> bool {
        self.plan == other.plan
            && self.connector.as_ref().map(|c| &c.1) == other.connector.as_ref().map(|c| &c.1)
    }
}

impl std::fmt::Debug for TlsOrigination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOrigination")
            .field("plan", &self.plan)
            .field("ok", &self.connector.is_ok())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    /// The TLS handshake failed (unknown CA, wrong name, refused client certificate, ...), or
    /// the cluster's TLS settings are unusable.
    #[error("TLS with {addr}: {message}")]
    Tls { addr: SocketAddr, message: String },
    #[error("request to {addr}: {source}")]
    Request {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// Envoy's `upstream_transport_failure_reason`, for TLS failures.
    pub fn transport_failure(&self) -> Option<&str> {
        match self {
            UpstreamError::Tls { message, .. } => Some(message),
            _ => None,
        }
    }

    /// The request never reached the endpoint (Envoy's `connect-failure`).
    pub fn is_connect(&self) -> bool {
        !matches!(self, UpstreamError::Request { .. })
    }
}

/// One endpoint's upstream connections (for one cluster), kept per proxy worker: a worker
/// reuses the connections its own runtime drives (see [`workers`]).
#[derive(Debug)]
pub struct EndpointPool {
    slots: Box<[Mutex<PoolInner>]>,
}

impl Default for EndpointPool {
    fn default() -> Self {
        EndpointPool {
            slots: (0..workers::count()).map(|_| Mutex::default()).collect(),
        }
    }
}

#[derive(Debug, Default)]
struct PoolInner {
    /// What the pooled connections were opened with; a change (new DestinationRule) drops them.
    settings: Option<PoolSettings>,
    /// Idle HTTP/1.1 connections, least recently used first.
    idle: Vec<Idle>,
    /// The HTTP/2 connection new requests share.
    shared: Option<Shared>,
}

#[derive(Debug)]
struct Idle {
    sender: http1::SendRequest<ProxyBody>,
    since: Instant,
    /// Requests this connection has carried.
    requests: u32,
}

#[derive(Debug)]
struct Shared {
    sender: http2::SendRequest<ProxyBody>,
    requests: u32,
}

impl PoolInner {
    /// Forgets connections opened with other settings.
    fn adopt(&mut self, settings: &PoolSettings) {
        if self.settings.as_ref() != Some(settings) {
            self.idle.clear();
            self.shared = None;
            self.settings = Some(settings.clone());
        }
    }

    fn evict_expired(&mut self, now: Instant) {
        let Some(settings) = &self.settings else {
            return;
        };
        let expired = self
            .idle
            .iter()
            .take_while(|c| now.duration_since(c.since) >= settings.idle_timeout)
            .count();
        self.idle.drain(..expired);
        if self.shared.as_ref().is_some_and(|s| s.sender.is_closed()) {
            self.shared = None;
        }
    }
}

impl EndpointPool {
    /// The calling worker's connections.
    fn slot(&self) -> std::sync::MutexGuard<'_, PoolInner> {
        self.slots[workers::current() % self.slots.len()]
            .lock()
            .expect("endpoint pool lock")
    }

    /// Sends `req` to `addr` over a pooled connection, opening one when none is idle. The
    /// request's URI is replaced by `path_and_query` (origin form; HTTP/2 adds scheme and
    /// authority).
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        settings: PoolSettings,
        path_and_query: PathAndQuery,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        if settings.http2 {
            *req.uri_mut() = absolute_uri(addr, path_and_query);
            // Boxed: its state would double the HTTP/1.1 path's, which every request carries.
            return Box::pin(self.send_http2(addr, &settings, req)).await;
        }
        *req.uri_mut() = Uri::from(path_and_query);
        loop {
            let Some(mut idle) = self.checkout(&settings) else {
                break;
            };
            if idle.sender.ready().await.is_err() {
                continue; // closed by the endpoint meanwhile
            }
            match idle.sender.try_send_request(req).await {
                Ok(response) => {
                    return Ok(self.pooled(response, idle.sender, idle.requests + 1, &settings));
                }
                Err(mut e) => match e.take_message() {
                    // Not sent: the endpoint was closing this connection; try another.
                    Some(unsent) => req = unsent,
                    None => {
                        return Err(UpstreamError::Request {
                            addr,
                            source: e.into_error(),
                        });
                    }
                },
            }
        }
        // Boxed, as every path that opens a connection: connecting and the TLS handshake are
        // kilobytes of future state that the common case (a pooled connection) would otherwise
        // carry, and move, on every request.
        let mut sender = Box::pin(self.connect_http1(addr, &settings)).await?;
        match sender.send_request(req).await {
            Ok(response) => Ok(self.pooled(response, sender, 1, &settings)),
            Err(source) => Err(UpstreamError::Request { addr, source }),
        }
    }

    /// The most recently used idle connection that is still open and not timed out.
    fn checkout(&self, settings: &PoolSettings) -> Option<Idle> {
        let mut inner = self.slot();
        inner.adopt(settings);
        inner.evict_expired(Instant::now());
        while let Some(idle) = inner.idle.pop() {
            if !idle.sender.is_closed() {
                return Some(idle);
            }
        }
        None
    }

    fn pooled(
        self: &Arc<Self>,
        response: Response<Incoming>,
        sender: http1::SendRequest<ProxyBody>,
        requests: u32,
        settings: &PoolSettings,
    ) -> Response<PooledBody> {
        let reusable = settings
            .max_requests_per_connection
            .is_none_or(|max| requests < max);
        let checkin = reusable.then(|| Checkin {
            pool: self.clone(),
            sender,
            requests,
        });
        response.map(|inner| PooledBody { inner, checkin })
    }

    fn checkin(&self, sender: http1::SendRequest<ProxyBody>, requests: u32) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut inner = self.slot();
        inner.evict_expired(now);
        inner.idle.push(Idle {
            sender,
            since: now,
            requests,
        });
    }

    /// Closes connections idle for longer than their idle timeout.
    pub fn evict_idle(&self) {
        let now = Instant::now();
        for slot in &self.slots {
            slot.lock().expect("endpoint pool lock").evict_expired(now);
        }
    }

    /// Idle HTTP/1.1 connections (for tests and debugging).
    pub fn idle_connections(&self) -> usize {
        self.slots
            .iter()
            .map(|slot| slot.lock().expect("endpoint pool lock").idle.len())
            .sum()
    }

    async fn connect_http1(
        &self,
        addr: SocketAddr,
        settings: &PoolSettings,
    ) -> Result<http1::SendRequest<ProxyBody>, UpstreamError> {
        let stream = connect(addr, settings.connect_timeout).await?;
        match &settings.tls {
            None => handshake_http1(addr, stream).await,
            Some(tls) => handshake_http1(addr, tls_connect(addr, tls, stream).await?).await,
        }
    }

    async fn send_http2(
        &self,
        addr: SocketAddr,
        settings: &PoolSettings,
        req: Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let shared = {
            let mut inner = self.slot();
            inner.adopt(settings);
            inner.evict_expired(Instant::now());
            take_stream(&mut inner.shared, settings)
        };
        let mut sender = match shared {
            Some(sender) => sender,
            None => {
                // Boxed: see `send`.
                let sender = Box::pin(async {
                    let stream = connect(addr, settings.connect_timeout).await?;
                    match &settings.tls {
                        None => handshake_http2(addr, stream).await,
                        Some(tls) => {
                            handshake_http2(addr, tls_connect(addr, tls, stream).await?).await
                        }
                    }
                })
                .await?;
                let mut inner = self.slot();
                if settings.max_requests_per_connection != Some(1) {
                    inner.shared = Some(Shared {
                        sender: sender.clone(),
                        requests: 1,
                    });
                }
                sender
            }
        };
        sender
            .ready()
            .await
            .map_err(|source| UpstreamError::Request { addr, source })?;
        match sender.send_request(req).await {
            Ok(response) => Ok(response.map(|inner| PooledBody {
                inner,
                checkin: None,
            })),
            Err(source) => Err(UpstreamError::Request { addr, source }),
        }
    }
}

async fn handshake_http1<I>(
    addr: SocketAddr,
    io: I,
) -> Result<http1::SendRequest<ProxyBody>, UpstreamError>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| UpstreamError::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(%addr, error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

async fn handshake_http2<I>(
    addr: SocketAddr,
    io: I,
) -> Result<http2::SendRequest<ProxyBody>, UpstreamError>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| UpstreamError::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
        }
    });
    Ok(sender)
}

/// The TLS handshake of DestinationRule `tls` origination on a connected stream.
async fn tls_connect(
    addr: SocketAddr,
    tls: &TlsOrigination,
    stream: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, UpstreamError> {
    let (connector, name) = tls.connector.as_ref().map_err(|e| UpstreamError::Tls {
        addr,
        message: e.clone(),
    })?;
    connector
        .connect(name.clone(), stream)
        .await
        .map_err(|e| UpstreamError::Tls {
            addr,
            message: e.to_string(),
        })
}

/// A stream on the shared HTTP/2 connection, counting it against
/// `maxRequestsPerConnection` (the connection that reaches it takes no new streams and closes
/// once its last stream ends).
fn take_stream(
    shared: &mut Option<Shared>,
    settings: &PoolSettings,
) -> Option<http2::SendRequest<ProxyBody>> {
    let s = shared.as_mut()?;
    s.requests += 1;
    let sender = s.sender.clone();
    if settings
        .max_requests_per_connection
        .is_some_and(|max| s.requests >= max)
    {
        *shared = None;
    }
    Some(sender)
}

fn absolute_uri(addr: SocketAddr, path_and_query: PathAndQuery) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Authority::try_from(addr.to_string()).ok();
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).unwrap_or_default()
}

/// Opens an upstream TCP connection with the proxy's socket mark, so the kernel never steers
/// it back to the proxy.
async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    let io = |source| UpstreamError::Connect { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(io)?;
    socket.set_mark(PROXY_SOCKET_MARK).map_err(io)?;
    socket.set_tcp_nodelay(true).map_err(io)?;
    socket.set_nonblocking(true).map_err(io)?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(connected) => connected.map_err(io),
        Err(_) => Err(io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timeout",
        ))),
    }
}

/// A response body from an upstream HTTP/1.1 connection, which goes back to its pool once the
/// body has been read to its end.
#[derive(Debug)]
pub struct PooledBody {
    inner: Incoming,
    checkin: Option<Checkin>,
}

#[derive(Debug)]
struct Checkin {
    pool: Arc<EndpointPool>,
    sender: http1::SendRequest<ProxyBody>,
    requests: u32,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(c) = self.checkin.take() {
            c.pool.checkin(c.sender, c.requests);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => this.release(),
            Some(Ok(_)) if this.inner.is_end_stream() => this.release(),
            // A broken body leaves the connection in an unknown state.
            Some(Err(_)) => this.checkin = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Bodies hyper knows to be empty (204, HEAD, `content-length: 0`) are never polled.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}
