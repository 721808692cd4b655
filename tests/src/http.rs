//! HTTP test tools for the L7 proxy: an identity server built on hyper (HTTP/1.1 and h2c on one
//! port) that reports what it received and can be told to fail, stall or reset, and the
//! `steerd-http-probe` client (src/bin/steerd-http-probe.rs) with its report.
//!
//! ```text
//! let node = Node::new();
//! let pod = node.add_pod("web");
//! let server = HttpIdentityServer::start(&pod, pod.sock_v4(8080), "web");
//! server.fail_next(2, 503);
//! let result = run_http_probe(Some(&node.netns), None,
//!     &["--url", "http://10.244.1.2:8080/x", "--count", "10", "--keepalive"]);
//! assert_eq!(result.status(503), 2);
//! assert_eq!(result.count("web"), 10);
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST, HeaderMap};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use crate::cgroup::TestCgroup;
use crate::netns::Netns;
use crate::process::{describe_status, spawn_in, wait_with_timeout};
use crate::servers::LISTEN_BACKLOG;

/// How many requests [`HttpIdentityServer::received`] keeps (the oldest are dropped first).
pub const MAX_RECORDED: usize = 10_000;
/// Request bodies larger than this are answered with 413 (and not recorded).
pub const MAX_REQUEST_BODY: usize = 64 << 20;
/// Upper bound of the `body=N` query parameter.
pub const MAX_RESPONSE_BODY: usize = 64 << 20;
/// Response header that names the server that answered.
pub const BACKEND_ID_HEADER: &str = "x-backend-id";
/// Per-request timeout of `steerd-http-probe` when `--timeout-ms` is not given.
pub const HTTP_PROBE_DEFAULT_TIMEOUT_MS: u64 = 2000;

/// One request as the server saw it (see [`HttpIdentityServer::received`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The raw query (without `?`), empty if there is none.
    pub query: String,
    /// `:authority` for HTTP/2, else the Host header (each falling back to the other); empty if
    /// the request had neither.
    pub host: String,
    /// `HTTP/1.1`, `HTTP/2.0`, ...
    pub version: String,
    /// Lower-case header name to value; repeated headers are joined with `, `.
    pub headers: BTreeMap<String, String>,
    pub body_len: u64,
    /// The client end of the connection (the proxy, when there is one).
    pub peer: SocketAddr,
}

/// A hyper server that answers every request with who it is and what it received:
///
/// `200` with `x-backend-id: <id>` and the JSON body `{"id", "method", "path", "query", "host",
/// "version", "headers", "body_len", "peer"}` (fields as in [`RecordedRequest`]).
///
/// HTTP/1.1 (with keep-alive) and HTTP/2 with prior knowledge share the port. Query parameters
/// change one answer: `status=NNN` (that status, same body), `delay_ms=N` (wait first, on top of
/// [`Self::set_delay`]), `body=N` (N bytes of `x` instead of the JSON), `echo` (the request's
/// body back, as `application/octet-stream`). An invalid parameter gets
/// a 400. The server-wide controls ([`Self::reset_next`], [`Self::fail_next`],
/// [`Self::set_delay`]) apply in that order: a request consumed by `reset_next` is not counted
/// against `fail_next`.
///
/// Stops on drop (at most about a second): the listener and all connections are closed.
#[derive(Debug)]
pub struct HttpIdentityServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct ServerState {
    id: String,
    requests: AtomicU64,
    connections: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    delay_us: AtomicU64,
    reset_next: AtomicU64,
    /// (remaining, status)
    fail_next: Mutex<(u64, u16)>,
    received: Mutex<VecDeque<RecordedRequest>>,
}

impl HttpIdentityServer {
    /// Binds `addr` inside `netns` (port 0 picks a free port, see [`Self::addr`]) with a listen
    /// backlog of [`LISTEN_BACKLOG`], and serves it from a tokio runtime on a thread of its own.
    pub fn start(netns: &impl AsRef<Netns>, addr: SocketAddr, id: &str) -> HttpIdentityServer {
        let netns = netns.as_ref();
        let listener = netns.run_in(|| listen_tcp(addr)).unwrap_or_else(|e| {
            panic!(
                "HTTP identity server {id} on {addr} in {}: {e:#}",
                netns.name()
            )
        });
        HttpIdentityServer::serve(listener, id)
    }

    /// [`Self::start`] in the calling thread's network namespace (`steerd-http-probe --serve`,
    /// a server in a process of its own, e.g. inside a test cgroup).
    pub fn start_here(addr: SocketAddr, id: &str) -> anyhow::Result<HttpIdentityServer> {
        Ok(HttpIdentityServer::serve(listen_tcp(addr)?, id))
    }

    fn serve(listener: StdTcpListener, id: &str) -> HttpIdentityServer {
        let addr = listener.local_addr().expect("local_addr of listener");
        listener.set_nonblocking(true).expect("set_nonblocking");

        let state = Arc::new(ServerState {
            id: id.to_owned(),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            delay_us: AtomicU64::new(0),
            reset_next: AtomicU64::new(0),
            fail_next: Mutex::new((0, 200)),
            received: Mutex::new(VecDeque::new()),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building the HTTP server's tokio runtime");
        let (stop, stopped) = oneshot::channel();
        let thread = {
            let state = state.clone();
            std::thread::Builder::new()
                .name(format!("http-id-{id}"))
                .spawn(move || {
                    runtime.block_on(serve(listener, state, stopped));
                    // Drops every connection task; nothing here blocks, so this is quick.
                    runtime.shutdown_timeout(Duration::from_secs(1));
                })
                .expect("spawning HTTP server thread")
        };
        HttpIdentityServer {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn id(&self) -> &str {
        &self.state.id
    }

    /// Requests received so far (every request whose head arrived, whatever its answer).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Connections accepted so far (tells keep-alive and HTTP/2 reuse from a connection per
    /// request).
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }

    /// Requests being handled right now.
    pub fn in_flight(&self) -> u64 {
        self.state.in_flight.load(Ordering::Relaxed)
    }

    /// The most requests that were ever handled at the same time.
    pub fn max_in_flight(&self) -> u64 {
        self.state.max_in_flight.load(Ordering::Relaxed)
    }

    /// The last (up to [`MAX_RECORDED`]) requests, oldest first. A request is recorded once its
    /// body has been read, before any delay, reset or failure is applied.
    pub fn received(&self) -> Vec<RecordedRequest> {
        lock(&self.state.received).iter().cloned().collect()
    }

    /// Forgets the recorded requests (the counters stay).
    pub fn clear_received(&self) {
        lock(&self.state.received).clear();
    }

    /// The next `n` requests are answered with `status` (replaces an earlier `fail_next`).
    pub fn fail_next(&self, n: u64, status: u16) {
        StatusCode::from_u16(status).unwrap_or_else(|e| panic!("fail_next({n}, {status}): {e}"));
        *lock(&self.state.fail_next) = (n, status);
    }

    /// Every request waits `delay` before it is answered (zero turns it off).
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.state.delay_us.store(us, Ordering::Relaxed);
    }

    /// The next `n` requests get no response: their connection is closed at once with a TCP RST
    /// (SO_LINGER 0). Over HTTP/2 that takes down every stream of the connection.
    pub fn reset_next(&self, n: u64) {
        self.state.reset_next.store(n, Ordering::Relaxed);
    }
}

impl Drop for HttpIdentityServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl ServerState {
    fn take_reset(&self) -> bool {
        self.reset_next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    fn take_failure(&self) -> Option<u16> {
        let mut fail = lock(&self.fail_next);
        if fail.0 == 0 {
            return None;
        }
        fail.0 -= 1;
        Some(fail.1)
    }

    fn record(&self, request: RecordedRequest) {
        let mut received = lock(&self.received);
        if received.len() >= MAX_RECORDED {
            received.pop_front();
        }
        received.push_back(request);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A listening CLOEXEC TCP socket on `addr` with SO_REUSEADDR (and V6ONLY for IPv6, so that
/// [::] and 0.0.0.0 servers can share a port) and a backlog of [`LISTEN_BACKLOG`].
pub fn listen_tcp(addr: SocketAddr) -> anyhow::Result<StdTcpListener> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd: OwnedFd =
        socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).context("socket")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).context("SO_REUSEADDR")?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).context("IPV6_V6ONLY")?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).with_context(|| format!("bind {addr}"))?;
    listen(&fd, Backlog::new(LISTEN_BACKLOG)?).context("listen")?;
    Ok(StdTcpListener::from(fd))
}

async fn serve(listener: StdTcpListener, state: Arc<ServerState>, mut stop: oneshot::Receiver<()>) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("registering the listener");
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    state.connections.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(serve_connection(stream, peer, state.clone()));
                }
                // ECONNABORTED, EMFILE and the like: keep serving, but don't spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
        }
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    state: Arc<ServerState>,
) {
    let _ = stream.set_nodelay(true);
    let fd = stream.as_raw_fd();
    // Fired by a request that must reset its connection; dropping `conn` then closes the socket.
    let kill = Arc::new(Notify::new());
    let service = {
        let kill = kill.clone();
        service_fn(move |request| handle(request, state.clone(), peer, fd, kill.clone()))
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        _ = kill.notified() => {}
    }
}

/// Counts a request as in flight while alive.
struct InFlight<'a>(&'a ServerState);

impl<'a> InFlight<'a> {
    fn enter(state: &'a ServerState) -> InFlight<'a> {
        let now = state.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        state.max_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The per-request query parameters.
#[derive(Debug, Default)]
struct Controls {
    status: Option<StatusCode>,
    delay: Duration,
    body: Option<usize>,
    /// The response body is the request body.
    echo: bool,
}

impl Controls {
    fn parse(query: &str) -> Result<Controls, String> {
        let mut controls = Controls::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|e| format!("query parameter {key}={value:?}: {e}"))
            };
            match key {
                "status" => {
                    let code = u16::try_from(number()?).map_err(|e| e.to_string())?;
                    controls.status = Some(
                        StatusCode::from_u16(code).map_err(|e| format!("status={value}: {e}"))?,
                    );
                }
                "delay_ms" => controls.delay = Duration::from_millis(number()?),
                "echo" => controls.echo = true,
                "body" => {
                    let n = usize::try_from(number()?).map_err(|e| e.to_string())?;
                    if n > MAX_RESPONSE_BODY {
                        return Err(format!("body={n}: at most {MAX_RESPONSE_BODY}"));
                    }
                    controls.body = Some(n);
                }
                _ => {}
            }
        }
        Ok(controls)
    }
}

async fn handle(
    request: Request<Incoming>,
    state: Arc<ServerState>,
    peer: SocketAddr,
    fd: RawFd,
    kill: Arc<Notify>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight::enter(&state);
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let status = if e.is::<http_body_util::LengthLimitError>() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return Ok(text_response(
                &state.id,
                status,
                format!("reading the body: {e}"),
            ));
        }
    };

    let header_host = parts
        .headers
        .get(HOST)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let authority = parts.uri.authority().map(|a| a.to_string());
    let host = if parts.version == Version::HTTP_2 {
        authority.or(header_host)
    } else {
        header_host.or(authority)
    };
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        host: host.unwrap_or_default(),
        version: format!("{:?}", parts.version),
        headers: header_map(&parts.headers),
        body_len: body.len() as u64,
        peer,
    };
    state.record(recorded.clone());

    let controls = match Controls::parse(&recorded.query) {
        Ok(controls) => controls,
        Err(e) => return Ok(text_response(&state.id, StatusCode::BAD_REQUEST, e)),
    };
    if state.take_reset() {
        // SAFETY: `fd` belongs to the connection's socket, which the connection future being
        // served (and so this request) keeps open.
        let socket = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = setsockopt(
            &socket,
            sockopt::Linger,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        );
        kill.notify_one();
        // The connection (and this future with it) is dropped without writing anything.
        std::future::pending::<()>().await;
    }
    let failure = state.take_failure();
    let delay = Duration::from_micros(state.delay_us.load(Ordering::Relaxed)) + controls.delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let status = failure
        .and_then(|code| StatusCode::from_u16(code).ok())
        .or(controls.status)
        .unwrap_or(StatusCode::OK);
    let (content_type, body) = match controls.body {
        _ if controls.echo => ("application/octet-stream", body),
        Some(n) => ("text/plain", Bytes::from(vec![b'x'; n])),
        None => {
            let json = serde_json::json!({
                "id": state.id,
                "method": recorded.method,
                "path": recorded.path,
                "query": recorded.query,
                "host": recorded.host,
                "version": recorded.version,
                "headers": recorded.headers,
                "body_len": recorded.body_len,
                "peer": recorded.peer.to_string(),
            });
            ("application/json", Bytes::from(json.to_string()))
        }
    };
    Ok(response(&state.id, status, content_type, body))
}

fn response(
    id: &str,
    status: StatusCode,
    content_type: &str,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, content_type.parse().expect("content type"));
    if let Ok(value) = id.parse() {
        headers.insert(BACKEND_ID_HEADER, value);
    }
    response
}

fn text_response(id: &str, status: StatusCode, text: String) -> Response<Full<Bytes>> {
    response(id, status, "text/plain", Bytes::from(text + "\n"))
}

/// Lower-case name to value, repeated headers joined with `, `.
pub fn header_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut map = BTreeMap::<String, String>::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    map
}

/// The JSON object `steerd-http-probe` prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpProbeResult {
    /// Responses (any status) per `x-backend-id`; `-` for responses without one.
    pub counts: HashMap<String, u64>,
    /// Responses per status code (`"200"`, `"503"`, ...).
    pub statuses: HashMap<String, u64>,
    /// Attempts without a complete response: connect/transport errors, resets, timeouts.
    pub failures: u64,
    /// The first few failure messages.
    #[serde(default)]
    pub errors: Vec<String>,
    pub attempts: u64,
    /// TCP connections the probe opened.
    #[serde(default)]
    pub connections: u64,
    /// Over the attempts that got a response (any status).
    #[serde(default)]
    pub latency_ms: HttpLatency,
    /// The first response received.
    #[serde(default)]
    pub sample: Option<HttpSample>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpLatency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpSample {
    pub status: u16,
    /// Lower-case name to value.
    pub headers: BTreeMap<String, String>,
    /// The body parsed as JSON if it is JSON, else as a (lossy, truncated) string.
    pub body: serde_json::Value,
    /// The full body length.
    #[serde(default)]
    pub body_len: u64,
}

impl HttpProbeResult {
    /// Responses received (sum of `statuses`).
    pub fn responses(&self) -> u64 {
        self.statuses.values().sum()
    }

    /// Responses with status `code`.
    pub fn status(&self, code: u16) -> u64 {
        self.statuses.get(&code.to_string()).copied().unwrap_or(0)
    }

    /// Responses from the backend `id`.
    pub fn count(&self, id: &str) -> u64 {
        self.counts.get(id).copied().unwrap_or(0)
    }
}

/// Path of the HTTP probe: `$STEERD_HTTP_PROBE_BIN`, else `steerd-http-probe` next to the
/// running executable or one level up (see [`crate::probe_bin`]).
pub fn http_probe_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("STEERD_HTTP_PROBE_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("steerd-http-probe"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "steerd-http-probe not found near {}; set STEERD_HTTP_PROBE_BIN",
                exe.display()
            )
        })
}

/// Runs `steerd-http-probe` with `args` (e.g. `["--url", "http://10.96.0.10/", "--count",
/// "100"]`) inside `netns` and `cgroup` (from its very first connect) and parses its report.
/// Panics if it cannot be spawned, does not finish within a bound derived from its arguments,
/// fails, or prints no valid report.
pub fn run_http_probe(
    netns: Option<&Netns>,
    cgroup: Option<&TestCgroup>,
    args: &[&str],
) -> HttpProbeResult {
    run_http_probe_with(&http_probe_bin(), netns, cgroup, args)
}

/// [`run_http_probe`] with an explicit binary path.
pub fn run_http_probe_with(
    bin: &Path,
    netns: Option<&Netns>,
    cgroup: Option<&TestCgroup>,
    args: &[&str],
) -> HttpProbeResult {
    spawn_http_probe_with(bin, netns, cgroup, args).wait()
}

/// Starts the probe like [`run_http_probe`] but returns at once (e.g. a `--duration-ms` probe
/// kept running across an agent restart); [`HttpProbeHandle::wait`] collects the report.
pub fn spawn_http_probe(
    netns: Option<&Netns>,
    cgroup: Option<&TestCgroup>,
    args: &[&str],
) -> HttpProbeHandle {
    spawn_http_probe_with(&http_probe_bin(), netns, cgroup, args)
}

/// [`spawn_http_probe`] with an explicit binary path.
pub fn spawn_http_probe_with(
    bin: &Path,
    netns: Option<&Netns>,
    cgroup: Option<&TestCgroup>,
    args: &[&str],
) -> HttpProbeHandle {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    HttpProbeHandle {
        child: Some(spawn_in(&mut cmd, netns, cgroup)),
        args: args.join(" "),
        limit: overall_limit(args),
    }
}

/// A running HTTP probe. Dropping it without [`HttpProbeHandle::wait`] kills it.
#[derive(Debug)]
pub struct HttpProbeHandle {
    child: Option<Child>,
    args: String,
    limit: Duration,
}

impl HttpProbeHandle {
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits (bounded by the probe's arguments) and parses the report; panics if there is none.
    pub fn wait(mut self) -> HttpProbeResult {
        let child = self.child.take().expect("probe already waited for");
        let args = &self.args;
        let output = wait_with_timeout(child, self.limit)
            .unwrap_or_else(|e| panic!("steerd-http-probe {args}: {e:#}"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            panic!(
                "steerd-http-probe {args} failed ({}): {}{}",
                describe_status(output.status),
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("steerd-http-probe {args}: bad report {stdout:?}: {e}"))
    }
}

impl Drop for HttpProbeHandle {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Every attempt is bounded by `--timeout-ms` in the probe itself; this is the backstop for the
/// whole run: the worst case for the arguments plus a generous margin.
fn overall_limit(args: &[&str]) -> Duration {
    let value = |flag: &str| -> Option<u64> {
        let at = args.iter().position(|a| *a == flag)?;
        args.get(at + 1)?.parse().ok()
    };
    let timeout_ms = value("--timeout-ms").unwrap_or(HTTP_PROBE_DEFAULT_TIMEOUT_MS);
    let concurrency = value("--concurrency").unwrap_or(1).max(1);
    let worst_ms = match value("--duration-ms") {
        Some(duration) => duration.saturating_add(2 * timeout_ms),
        None => value("--count")
            .unwrap_or(1)
            .div_ceil(concurrency)
            .saturating_mul(2 * timeout_ms),
    };
    Duration::from_millis(worst_ms.min(600_000) + 30_000)
}
