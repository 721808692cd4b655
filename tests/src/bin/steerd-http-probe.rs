//! steerd-http-probe: sends HTTP requests and reports which backends answered, with what status
//! and how fast.
//!
//! ```text
//! steerd-http-probe --url http://HOST:PORT/path?x=y (--count N | --duration-ms D)
//!     [--header K:V]... [--method M] [--data-len N] [--h2] [--keepalive]
//!     [--timeout-ms T] [--concurrency C]
//! ```
//!
//! - default: HTTP/1.1, a new connection per request;
//! - `--keepalive`: HTTP/1.1, each worker reuses one connection (replaced after an error);
//! - `--h2`: HTTP/2 with prior knowledge (h2c), all workers share one connection (replaced
//!   after a transport error);
//! - `--concurrency C`: C workers share the N requests (or run until D ms have passed);
//! - `--header Host:h` sets the Host header (HTTP/1.1) or `:authority` (HTTP/2);
//! - `--data-len N` sends a body of N bytes of `x`;
//! - `--echo` (for a server's `?echo` query): the bodies are N bytes of a pattern, a different
//!   window per request, and each 200 response must carry its request's body back unchanged
//!   (else the attempt fails with "echo mismatch").
//!
//! `steerd-http-probe --serve ADDR --id ID` is instead a `steerd_e2e::HttpIdentityServer` in a
//! process of its own (in the caller's network namespace), serving until killed.
//!
//! Prints one JSON object on stdout (see `steerd_e2e::HttpProbeResult`):
//! `{"counts":{"<x-backend-id or ->":n},"statuses":{"200":n},"failures":n,"errors":[...],
//! "attempts":n,"connections":n,"latency_ms":{"p50","p99","max"},"sample":{"status","headers",
//! "body","body_len"}|null}`. Every attempt (connect, request, whole response) is bounded by the
//! timeout (default 2000 ms), so it never hangs. Exit status 0 whenever a report was printed, 2 on
//! bad arguments.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::header::{HOST, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use steerd_e2e::http::{
    BACKEND_ID_HEADER, HTTP_PROBE_DEFAULT_TIMEOUT_MS, HttpLatency, HttpProbeResult, HttpSample,
    header_map,
};

/// Error messages kept in the report; the rest are only counted.
const MAX_ERRORS: usize = 10;
/// Hard caps so that no invocation can turn into an unbounded load.
const MAX_COUNT: u64 = 1_000_000;
const MAX_DURATION_MS: u64 = 600_000;
const MAX_CONCURRENCY: u64 = 1024;
const MAX_BODY: usize = 64 << 20;
/// A sample body longer than this is cut (when it is not JSON).
const MAX_SAMPLE_TEXT: usize = 64 << 10;

type Body = Full<Bytes>;

#[derive(Debug)]
struct Args {
    target: SocketAddr,
    /// Host header / :authority.
    authority: String,
    path_and_query: String,
    count: u64,
    duration: Option<Duration>,
    headers: Vec<(HeaderName, HeaderValue)>,
    method: Method,
    body: Bytes,
    h2: bool,
    keepalive: bool,
    timeout: Duration,
    concurrency: u64,
    /// `--echo`: each request's body is a different slice of [`Args::body`] (whose length is
    /// `--data-len` + 256), and the response body must be that slice, byte for byte.
    echo: bool,
    data_len: usize,
}

/// What one attempt got back.
struct Reply {
    status: u16,
    headers: hyper::HeaderMap,
    body: Bytes,
}

#[derive(Default)]
struct Collector {
    counts: HashMap<String, u64>,
    statuses: HashMap<String, u64>,
    failures: u64,
    errors: Vec<String>,
    attempts: u64,
    latencies_ms: Vec<f64>,
    sample: Option<HttpSample>,
}

struct Shared {
    args: Args,
    claimed: AtomicU64,
    /// Requests built so far (numbers `--echo` bodies).
    sent: AtomicU64,
    deadline: Option<Instant>,
    connections: AtomicU64,
    /// (generation, sender) of the shared HTTP/2 connection.
    h2: tokio::sync::Mutex<Option<(u64, http2::SendRequest<Body>)>>,
    h2_generation: AtomicU64,
    collector: Mutex<Collector>,
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("--serve") {
        serve(&argv[1..]);
    }
    let args = match parse_args(argv.into_iter()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("steerd-http-probe: {e}");
            eprintln!(
                "usage: steerd-http-probe --url http://HOST:PORT/PATH (--count N | --duration-ms \
                 D) [--header K:V]... [--method M] [--data-len N] [--h2] [--keepalive] \
                 [--timeout-ms T] [--concurrency C]"
            );
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let report = runtime.block_on(run(args));
    println!(
        "{}",
        serde_json::to_string(&report).expect("serializing the report")
    );
    // Kept-alive connections are just dropped.
    runtime.shutdown_background();
}

/// `--serve ADDR --id ID`: serves until killed.
fn serve(argv: &[String]) -> ! {
    let (addr, id) = match argv {
        [addr, flag, id] if flag == "--id" => (addr, id),
        _ => {
            eprintln!("usage: steerd-http-probe --serve ADDR --id ID");
            std::process::exit(2);
        }
    };
    let addr: SocketAddr = addr.parse().unwrap_or_else(|e| {
        eprintln!("steerd-http-probe --serve {addr:?}: {e}");
        std::process::exit(2);
    });
    let _server = steerd_e2e::HttpIdentityServer::start_here(addr, id).unwrap_or_else(|e| {
        eprintln!("steerd-http-probe --serve {addr}: {e:#}");
        std::process::exit(1);
    });
    loop {
        std::thread::park();
    }
}

async fn run(args: Args) -> HttpProbeResult {
    let shared = Arc::new(Shared {
        deadline: args.duration.map(|d| Instant::now() + d),
        claimed: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        h2: tokio::sync::Mutex::new(None),
        h2_generation: AtomicU64::new(0),
        collector: Mutex::new(Collector::default()),
        args,
    });
    let workers: Vec<_> = (0..shared.args.concurrency)
        .map(|_| tokio::spawn(worker(shared.clone())))
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    let mut collector = std::mem::take(&mut *shared.collector.lock().unwrap());
    collector.latencies_ms.sort_by(f64::total_cmp);
    HttpProbeResult {
        counts: collector.counts,
        statuses: collector.statuses,
        failures: collector.failures,
        errors: collector.errors,
        attempts: collector.attempts,
        connections: shared.connections.load(Ordering::Relaxed),
        latency_ms: HttpLatency {
            p50: percentile(&collector.latencies_ms, 0.50),
            p99: percentile(&collector.latencies_ms, 0.99),
            max: collector.latencies_ms.last().copied().unwrap_or(0.0),
        },
        sample: collector.sample,
    }
}

/// Nearest-rank percentile of sorted values; 0 when there are none.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Shared {
    /// Whether this worker may make one more attempt.
    fn claim(&self) -> bool {
        let n = self.claimed.fetch_add(1, Ordering::Relaxed);
        match self.deadline {
            Some(deadline) => n < MAX_COUNT && Instant::now() < deadline,
            None => n < self.args.count,
        }
    }

    /// The request to send, and the body the response must carry back (`--echo`).
    fn request(&self, number: u64) -> (Request<Body>, Option<Bytes>) {
        let args = &self.args;
        let body = if args.echo {
            // A window that starts at a different offset per request: a response carrying
            // another request's body, or its own bytes out of order, does not match.
            let start = (number % 256) as usize;
            args.body.slice(start..start + args.data_len)
        } else {
            args.body.clone()
        };
        let mut builder = Request::builder().method(args.method.clone());
        builder = if args.h2 {
            builder
                .version(Version::HTTP_2)
                .uri(format!("http://{}{}", args.authority, args.path_and_query))
        } else {
            builder
                .version(Version::HTTP_11)
                .uri(&args.path_and_query)
                .header(HOST, &args.authority)
        };
        for (name, value) in &args.headers {
            builder = builder.header(name, value);
        }
        let request = builder
            .body(Full::new(body.clone()))
            .expect("request from validated arguments");
        (request, args.echo.then_some(body))
    }

    async fn connect(&self) -> Result<TokioIo<tokio::net::TcpStream>, String> {
        let target = self.args.target;
        let stream = tokio::net::TcpStream::connect(target)
            .await
            .map_err(|e| format!("connect {target}: {e}"))?;
        self.connections.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        Ok(TokioIo::new(stream))
    }

    async fn connect_h1(&self) -> Result<http1::SendRequest<Body>, String> {
        let io = self.connect().await?;
        let (sender, conn) = http1::handshake(io)
            .await
            .map_err(|e| format!("HTTP/1.1 handshake: {}", chain(&e)))?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// The shared HTTP/2 connection, opened (again) if there is none or it was closed.
    async fn h2_sender(&self) -> Result<(u64, http2::SendRequest<Body>), String> {
        let mut slot = self.h2.lock().await;
        if let Some((generation, sender)) = slot.as_ref()
            && !sender.is_closed()
        {
            return Ok((*generation, sender.clone()));
        }
        *slot = None;
        let io = self.connect().await?;
        let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {}", chain(&e)))?;
        tokio::spawn(conn);
        let generation = self.h2_generation.fetch_add(1, Ordering::Relaxed) + 1;
        *slot = Some((generation, sender.clone()));
        Ok((generation, sender))
    }

    /// Drops the shared HTTP/2 connection if it is still `generation`.
    async fn discard_h2(&self, generation: u64) {
        let mut slot = self.h2.lock().await;
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            *slot = None;
        }
    }

    fn record(&self, result: Result<Reply, String>, elapsed: Duration) {
        let mut c = self.collector.lock().unwrap();
        c.attempts += 1;
        match result {
            Ok(reply) => {
                let id = reply
                    .headers
                    .get(BACKEND_ID_HEADER)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .unwrap_or_else(|| "-".to_owned());
                *c.counts.entry(id).or_default() += 1;
                *c.statuses.entry(reply.status.to_string()).or_default() += 1;
                c.latencies_ms.push(elapsed.as_secs_f64() * 1000.0);
                if c.sample.is_none() {
                    c.sample = Some(sample(&reply));
                }
            }
            Err(e) => {
                c.failures += 1;
                if c.errors.len() < MAX_ERRORS {
                    let attempt = c.attempts;
                    c.errors.push(format!("attempt {attempt}: {e}"));
                }
            }
        }
    }
}

fn sample(reply: &Reply) -> HttpSample {
    let body = serde_json::from_slice(&reply.body).unwrap_or_else(|_| {
        let cut = &reply.body[..reply.body.len().min(MAX_SAMPLE_TEXT)];
        serde_json::Value::String(String::from_utf8_lossy(cut).into_owned())
    });
    HttpSample {
        status: reply.status,
        headers: header_map(&reply.headers),
        body,
        body_len: reply.body.len() as u64,
    }
}

async fn worker(shared: Arc<Shared>) {
    // This worker's keep-alive connection.
    let mut h1: Option<http1::SendRequest<Body>> = None;
    // The HTTP/2 connection generation the current attempt used.
    let mut h2_used = 0;
    while shared.claim() {
        let started = Instant::now();
        let timeout = shared.args.timeout;
        let result = tokio::time::timeout(timeout, attempt(&shared, &mut h1, &mut h2_used)).await;
        let elapsed = started.elapsed();
        let result = match result {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                // Whatever state the connection is in, the next attempt starts on a fresh one.
                h1 = None;
                if shared.args.h2 && h2_used != 0 {
                    shared.discard_h2(h2_used).await;
                }
                Err(e)
            }
            Err(_) => {
                // An HTTP/1.1 connection with a request in flight is useless; an HTTP/2 stream
                // is reset when its future is dropped and the connection stays usable.
                h1 = None;
                Err(format!("timed out after {} ms", timeout.as_millis()))
            }
        };
        shared.record(result, elapsed);
    }
}

async fn attempt(
    shared: &Shared,
    h1: &mut Option<http1::SendRequest<Body>>,
    h2_used: &mut u64,
) -> Result<Reply, String> {
    let number = shared.sent.fetch_add(1, Ordering::Relaxed);
    let (request, echo) = shared.request(number);
    *h2_used = 0;
    // The HTTP/1.1 connection stays open until the whole response has been read.
    let mut used_h1 = None;
    let response: Response<Incoming> = if shared.args.h2 {
        let (generation, mut sender) = shared.h2_sender().await?;
        *h2_used = generation;
        sender
            .ready()
            .await
            .map_err(|e| format!("HTTP/2 connection: {}", chain(&e)))?;
        sender
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP/2 request: {}", chain(&e)))?
    } else {
        let mut kept = h1.take();
        if let Some(sender) = kept.as_mut()
            && sender.ready().await.is_err()
        {
            // A kept-alive connection the server has closed since is not a failure: reconnect.
            kept = None;
        }
        let mut sender = match kept {
            Some(sender) => sender,
            None => {
                let mut sender = shared.connect_h1().await?;
                sender
                    .ready()
                    .await
                    .map_err(|e| format!("HTTP/1.1 connection: {}", chain(&e)))?;
                sender
            }
        };
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP/1.1 request: {}", chain(&e)))?;
        used_h1 = Some(sender);
        response
    };
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the body ({} response): {e}", parts.status))?
        .to_bytes();
    if let Some(sent) = echo
        && parts.status == hyper::StatusCode::OK
        && body != sent
    {
        let at = body.iter().zip(sent.iter()).position(|(a, b)| a != b);
        return Err(format!(
            "echo mismatch: sent {} bytes, got {} back, first difference at {at:?}",
            sent.len(),
            body.len()
        ));
    }
    if shared.args.keepalive {
        *h1 = used_h1;
    }
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

/// `len` bytes with no short period (an xorshift stream), so that a shifted or reordered copy
/// differs.
fn echo_pattern(len: usize) -> Bytes {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// An error with its sources (hyper's own messages are terse).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut url = None;
    let mut count = None;
    let mut duration_ms = None;
    let mut headers = Vec::new();
    let mut host = None;
    let mut method = Method::GET;
    let mut data_len = 0u64;
    let mut h2 = false;
    let mut keepalive = false;
    let mut timeout_ms = HTTP_PROBE_DEFAULT_TIMEOUT_MS;
    let mut concurrency = 1;
    let mut echo = false;
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|e| format!("{flag} {v:?}: {e}"));
        match flag.as_str() {
            "--url" => url = Some(value()?),
            "--count" => count = Some(number(value()?)?),
            "--duration-ms" => duration_ms = Some(number(value()?)?),
            "--timeout-ms" => timeout_ms = number(value()?)?,
            "--concurrency" => concurrency = number(value()?)?,
            "--data-len" => data_len = number(value()?)?,
            "--method" => {
                let v = value()?;
                method =
                    Method::from_bytes(v.as_bytes()).map_err(|e| format!("--method {v:?}: {e}"))?;
            }
            "--header" => {
                let v = value()?;
                let (name, val) = v
                    .split_once(':')
                    .ok_or_else(|| format!("--header {v:?}: expected NAME:VALUE"))?;
                let name = HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|e| format!("--header {v:?}: {e}"))?;
                let val = HeaderValue::from_str(val.trim())
                    .map_err(|e| format!("--header {v:?}: {e}"))?;
                if name == HOST {
                    host = Some(
                        val.to_str()
                            .map_err(|e| format!("--header {v:?}: {e}"))?
                            .to_owned(),
                    );
                } else {
                    headers.push((name, val));
                }
            }
            "--h2" => h2 = true,
            "--keepalive" => keepalive = true,
            "--echo" => echo = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let url = url.ok_or("--url is required")?;
    let uri: Uri = url.parse().map_err(|e| format!("--url {url:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("--url {url:?}: only http:// URLs"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("--url {url:?}: no host"))?;
    let port = authority.port_u16().unwrap_or(80);
    let host_part = authority.host();
    let target = match host_part
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        Ok(ip) => SocketAddr::new(ip, port),
        Err(_) => (host_part, port)
            .to_socket_addrs()
            .map_err(|e| format!("resolving {host_part}: {e}"))?
            .next()
            .ok_or_else(|| format!("resolving {host_part}: no address"))?,
    };
    let path_and_query = uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
    let authority = host.unwrap_or_else(|| authority.as_str().to_owned());
    if h2 {
        format!("http://{authority}{path_and_query}")
            .parse::<Uri>()
            .map_err(|e| format!("{authority:?} as an HTTP/2 :authority: {e}"))?;
    }
    HeaderValue::from_str(&authority).map_err(|e| format!("Host {authority:?}: {e}"))?;

    let count = match (count, duration_ms) {
        (Some(count), None) => count,
        (None, Some(_)) => 0,
        _ => return Err("exactly one of --count and --duration-ms is required".into()),
    };
    if count > MAX_COUNT
        || duration_ms.unwrap_or(0) > MAX_DURATION_MS
        || timeout_ms > MAX_DURATION_MS
    {
        return Err(format!(
            "at most {MAX_COUNT} requests and {MAX_DURATION_MS} ms per run or request"
        ));
    }
    if timeout_ms == 0 {
        return Err("--timeout-ms must be positive".into());
    }
    if !(1..=MAX_CONCURRENCY).contains(&concurrency) {
        return Err(format!("--concurrency must be 1..={MAX_CONCURRENCY}"));
    }
    if data_len > MAX_BODY as u64 {
        return Err(format!("--data-len: at most {MAX_BODY}"));
    }
    Ok(Args {
        target,
        authority,
        path_and_query,
        count,
        duration: duration_ms.map(Duration::from_millis),
        headers,
        method,
        body: if echo {
            echo_pattern(data_len as usize + 256)
        } else {
            Bytes::from(vec![b'x'; data_len as usize])
        },
        echo,
        data_len: data_len as usize,
        h2,
        keepalive,
        timeout: Duration::from_millis(timeout_ms),
        concurrency,
    })
}
