//! steerd-probe: dials an address repeatedly and reports which identity servers answered.
//!
//! ```text
//! steerd-probe tcp  --to ADDR:PORT --count N [--timeout-ms T]
//! steerd-probe udp  --to ADDR:PORT --count N [--connected] [--timeout-ms T]
//! steerd-probe loop --to ADDR:PORT --duration-ms D [--interval-ms I] [--timeout-ms T]
//! steerd-probe latency --to ADDR:PORT --count N [--warmup W] [--cpu C] [--fifo P] [--timeout-ms T]
//! ```
//!
//! Prints one JSON object on stdout:
//! `{"counts":{"id":n,...},"failures":n,"peer_mismatches":n,"errors":[...],"attempts":n}`.
//! `latency` (for `cargo xtask bench`) makes `W` unrecorded connections, then `N` recorded ones,
//! one after another, optionally pinned to CPU `C` and at real-time priority `P` (SCHED_FIFO,
//! so that other work on a busy machine does not delay it; it only ever blocks, never spins). Each recorded one times `connect()` up to the
//! end of the identity line with the monotonic clock; the report adds `"samples_ns":[...]` (one
//! per successful attempt, in order). It does not compare peers (`peer_mismatches` stays 0).
//! Every connect, send and read is bounded by the timeout (default 1000 ms), so it never hangs.
//! Exit status 0 whenever a report was printed, 2 on bad arguments.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Error messages kept in the report; the rest are only counted.
const MAX_ERRORS: usize = 10;
/// Hard caps so that no invocation can turn into an unbounded load.
const MAX_COUNT: u64 = 1_000_000;
const MAX_DURATION_MS: u64 = 600_000;
/// Identity lines are short; anything longer is not an identity server.
const MAX_REPLY: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Tcp,
    Udp,
    Loop,
    Latency,
}

#[derive(Debug)]
struct Args {
    mode: Mode,
    to: SocketAddr,
    count: u64,
    timeout: Duration,
    connected: bool,
    duration: Duration,
    interval: Duration,
    warmup: u64,
    cpu: Option<usize>,
    fifo: Option<i32>,
    /// `tcp` over IPv6: send every packet (the SYN included) with this extension header.
    ipv6_ext: Option<Ipv6Ext>,
}

/// IPv6 extension headers the probe can add (sticky socket options, CAP_NET_RAW).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ipv6Ext {
    HopByHop,
    DestinationOptions,
}

#[derive(Default)]
struct Report {
    counts: BTreeMap<String, u64>,
    failures: u64,
    peer_mismatches: u64,
    errors: Vec<String>,
    attempts: u64,
    /// `latency` mode only: per-attempt latency of the successful recorded attempts.
    samples_ns: Option<Vec<u64>>,
}

/// What one successful attempt saw.
struct Reply {
    id: String,
    peer: SocketAddr,
}

impl Report {
    fn record(&mut self, dialled: SocketAddr, check_peer: bool, result: Result<Reply, String>) {
        self.attempts += 1;
        match result {
            Ok(reply) => {
                if check_peer && !same_endpoint(reply.peer, dialled) {
                    self.peer_mismatches += 1;
                    self.note_error(format!("peer {} is not the dialled {dialled}", reply.peer));
                }
                *self.counts.entry(reply.id).or_default() += 1;
            }
            Err(e) => {
                self.failures += 1;
                self.note_error(e);
            }
        }
    }

    fn note_error(&mut self, e: String) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(format!("attempt {}: {e}", self.attempts));
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let mut json = serde_json::json!({
            "counts": self.counts,
            "failures": self.failures,
            "peer_mismatches": self.peer_mismatches,
            "errors": self.errors,
            "attempts": self.attempts,
        });
        if let Some(samples) = &self.samples_ns {
            json["samples_ns"] = serde_json::json!(samples);
        }
        json
    }
}

fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("steerd-probe: {e}");
            eprintln!(
                "usage: steerd-probe tcp|udp|loop --to ADDR:PORT [--count N] [--timeout-ms T] \
                 [--connected] [--duration-ms D] [--interval-ms I] [--warmup W] [--cpu C] [--fifo P] \
                 [--ipv6-ext hopopts|dstopts]"
            );
            std::process::exit(2);
        }
    };
    let mut report = Report::default();
    match args.mode {
        Mode::Tcp => {
            for _ in 0..args.count {
                report.record(
                    args.to,
                    true,
                    tcp_attempt_with(args.to, args.timeout, args.ipv6_ext),
                );
            }
        }
        Mode::Udp => {
            for _ in 0..args.count {
                let result = udp_attempt(args.to, args.timeout, args.connected);
                // A connected socket only accepts datagrams from its peer, so there is no source
                // to compare; an unconnected one must see replies come from the dialled address.
                report.record(args.to, !args.connected, result);
            }
        }
        Mode::Loop => {
            let end = Instant::now() + args.duration;
            while Instant::now() < end {
                report.record(args.to, true, tcp_attempt(args.to, args.timeout));
                if !args.interval.is_zero() {
                    std::thread::sleep(args.interval);
                }
            }
        }
        Mode::Latency => latency(&args, &mut report),
    }
    println!("{}", report.to_json());
}

/// `latency` mode: warm-up attempts (not recorded), then `count` timed ones.
fn latency(args: &Args, report: &mut Report) {
    if let Some(cpu) = args.cpu {
        let mut set = nix::sched::CpuSet::new();
        let pinned = set
            .set(cpu)
            .and_then(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
        if let Err(e) = pinned {
            eprintln!("steerd-probe: pinning to CPU {cpu}: {e}");
            std::process::exit(2);
        }
    }
    if let Some(priority) = args.fifo {
        let param = libc::sched_param {
            sched_priority: priority,
        };
        // SAFETY: a valid sched_param for the calling process.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
            let e = std::io::Error::last_os_error();
            eprintln!("steerd-probe: SCHED_FIFO {priority}: {e}");
            std::process::exit(2);
        }
    }
    for _ in 0..args.warmup {
        let _ = timed_tcp_attempt(args.to, args.timeout);
    }
    let mut samples = Vec::with_capacity(args.count as usize);
    for _ in 0..args.count {
        let result = timed_tcp_attempt(args.to, args.timeout).map(|(elapsed, id)| {
            samples.push(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
            Reply { id, peer: args.to }
        });
        report.record(args.to, false, result);
    }
    report.samples_ns = Some(samples);
}

/// One connection: a blocking `connect()` (bounded by SO_SNDTIMEO) and reads up to the end of
/// the identity line, timed; then, untimed, reading to EOF so that the server closes first and
/// the client is left with no TIME_WAIT socket.
fn timed_tcp_attempt(to: SocketAddr, timeout: Duration) -> Result<(Duration, String), String> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, sockopt};
    let family = if to.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = nix::sys::socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("socket: {e}"))?;
    let tv = nix::sys::time::TimeVal::new(
        timeout.as_secs() as libc::time_t,
        timeout.subsec_micros() as libc::suseconds_t,
    );
    nix::sys::socket::setsockopt(&fd, sockopt::SendTimeout, &tv)
        .map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
    nix::sys::socket::setsockopt(&fd, sockopt::ReceiveTimeout, &tv)
        .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    let addr = SockaddrStorage::from(to);
    let mut stream = TcpStream::from(fd);

    let start = Instant::now();
    nix::sys::socket::connect(stream.as_raw_fd(), &addr)
        .map_err(|e| format!("connect {to}: {e}"))?;
    let mut buf = [0u8; MAX_REPLY];
    let mut len = 0;
    let elapsed = loop {
        let n = stream
            .read(&mut buf[len..])
            .map_err(|e| format!("read from {to}: {e}"))?;
        len += n;
        if buf[..len].contains(&b'\n') {
            break start.elapsed();
        }
        if n == 0 || len == buf.len() {
            return Err(format!("no identity line from {to}: {:?}", &buf[..len]));
        }
    };

    let mut rest = [0u8; MAX_REPLY];
    while matches!(stream.read(&mut rest), Ok(n) if n > 0) {}
    let id = identity(&buf[..len]).ok_or_else(|| format!("no identity line from {to}"))?;
    Ok((elapsed, id))
}

fn tcp_attempt(to: SocketAddr, timeout: Duration) -> Result<Reply, String> {
    tcp_attempt_with(to, timeout, None)
}

/// A TCP socket whose packets carry an IPv6 extension header: an 8-byte header holding one
/// PadN option (nothing for the receiver to act on), set before connect so the SYN has it.
fn ipv6_ext_connect(to: SocketAddr, timeout: Duration, ext: Ipv6Ext) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V6(to6) = to else {
        return Err(std::io::Error::other(
            "IPv6 extension headers need an IPv6 --to",
        ));
    };
    // SAFETY: plain socket calls on a descriptor this function owns (TcpStream takes it).
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        // Next header (the kernel fills it), length 0 (8 bytes), PadN with 4 bytes of padding.
        let header: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
        let option = match ext {
            Ipv6Ext::HopByHop => libc::IPV6_HOPOPTS,
            Ipv6Ext::DestinationOptions => libc::IPV6_DSTOPTS,
        };
        if libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            option,
            header.as_ptr().cast(),
            header.len() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        // A blocking connect gives up after SO_SNDTIMEO.
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let addr = libc::sockaddr_in6 {
            sin6_family: libc::AF_INET6 as libc::sa_family_t,
            sin6_port: to6.port().to_be(),
            sin6_flowinfo: 0,
            sin6_addr: libc::in6_addr {
                s6_addr: to6.ip().octets(),
            },
            sin6_scope_id: to6.scope_id(),
        };
        if libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

fn tcp_attempt_with(
    to: SocketAddr,
    timeout: Duration,
    ext: Option<Ipv6Ext>,
) -> Result<Reply, String> {
    let connected = match ext {
        None => TcpStream::connect_timeout(&to, timeout),
        Some(ext) => ipv6_ext_connect(to, timeout, ext),
    };
    let mut stream = connected.map_err(|e| format!("connect {to}: {e}"))?;
    let peer = stream
        .peer_addr()
        .map_err(|e| format!("getpeername: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    let mut buf = Vec::with_capacity(64);
    stream
        .by_ref()
        .take(MAX_REPLY as u64)
        .read_to_end(&mut buf)
        .map_err(|e| format!("read from {to}: {e}"))?;
    Ok(Reply {
        id: identity(&buf).ok_or_else(|| format!("no identity line from {to}: {buf:?}"))?,
        peer,
    })
}

fn udp_attempt(to: SocketAddr, timeout: Duration, connected: bool) -> Result<Reply, String> {
    let local: SocketAddr = match to.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).map_err(|e| format!("bind {local}: {e}"))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    socket
        .set_write_timeout(Some(timeout))
        .map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
    let mut buf = [0u8; MAX_REPLY];
    let (len, peer) = if connected {
        socket
            .connect(to)
            .map_err(|e| format!("connect {to}: {e}"))?;
        socket
            .send(b"probe\n")
            .map_err(|e| format!("send to {to}: {e}"))?;
        let len = socket
            .recv(&mut buf)
            .map_err(|e| format!("recv from {to}: {e}"))?;
        (len, to)
    } else {
        socket
            .send_to(b"probe\n", to)
            .map_err(|e| format!("sendto {to}: {e}"))?;
        socket
            .recv_from(&mut buf)
            .map_err(|e| format!("recvfrom after sendto {to}: {e}"))?
    };
    let id = identity(&buf[..len]).ok_or_else(|| format!("no identity line from {peer}"))?;
    Ok(Reply { id, peer })
}

/// The text before the first newline; `None` if there is no complete, non-empty line.
fn identity(reply: &[u8]) -> Option<String> {
    let line = &reply[..reply.iter().position(|b| *b == b'\n')?];
    let id = String::from_utf8_lossy(line).trim().to_owned();
    (!id.is_empty()).then_some(id)
}

/// Address and port equality; IPv6 flow info and scope id are not part of the endpoint here.
fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip() == b.ip() && a.port() == b.port()
}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mode = match argv.next().as_deref() {
        Some("tcp") => Mode::Tcp,
        Some("udp") => Mode::Udp,
        Some("loop") => Mode::Loop,
        Some("latency") => Mode::Latency,
        Some(other) => return Err(format!("unknown mode {other:?}")),
        None => return Err("missing mode".into()),
    };
    let mut to = None;
    let mut count = None;
    let mut timeout_ms = 1000;
    let mut connected = false;
    let mut duration_ms = None;
    let mut interval_ms = 5;
    let mut warmup = 0;
    let mut cpu = None;
    let mut fifo = None;
    let mut ipv6_ext = None;
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|e| format!("{flag} {v:?}: {e}"));
        match flag.as_str() {
            "--to" => {
                let v = value()?;
                to = Some(
                    v.parse::<SocketAddr>()
                        .map_err(|e| format!("--to {v:?}: {e}"))?,
                );
            }
            "--count" => count = Some(number(value()?)?),
            "--timeout-ms" => timeout_ms = number(value()?)?,
            "--duration-ms" => duration_ms = Some(number(value()?)?),
            "--interval-ms" => interval_ms = number(value()?)?,
            "--connected" => connected = true,
            "--warmup" => warmup = number(value()?)?,
            "--cpu" => cpu = Some(number(value()?)? as usize),
            "--fifo" => match number(value()?)? {
                p @ 1..=99 => fifo = Some(p as i32),
                p => return Err(format!("--fifo {p}: a priority from 1 to 99")),
            },
            "--ipv6-ext" => {
                ipv6_ext = Some(match value()?.as_str() {
                    "hopopts" => Ipv6Ext::HopByHop,
                    "dstopts" => Ipv6Ext::DestinationOptions,
                    v => return Err(format!("--ipv6-ext {v:?}: hopopts or dstopts")),
                })
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let to = to.ok_or("--to is required")?;
    if timeout_ms == 0 {
        return Err("--timeout-ms must be positive".into());
    }
    let (count, duration_ms) = match mode {
        Mode::Loop => (0, duration_ms.ok_or("loop needs --duration-ms")?),
        Mode::Tcp | Mode::Udp | Mode::Latency => (count.ok_or("--count is required")?, 0),
    };
    if count.saturating_add(warmup) > MAX_COUNT
        || duration_ms > MAX_DURATION_MS
        || timeout_ms > MAX_DURATION_MS
    {
        return Err(format!(
            "at most {MAX_COUNT} attempts and {MAX_DURATION_MS} ms per run or attempt"
        ));
    }
    Ok(Args {
        mode,
        to,
        count,
        timeout: Duration::from_millis(timeout_ms),
        connected,
        duration: Duration::from_millis(duration_ms),
        interval: Duration::from_millis(interval_ms),
        warmup,
        cpu,
        fifo,
        ipv6_ext,
    })
}
