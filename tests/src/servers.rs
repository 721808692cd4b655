//! Identity servers: they answer every TCP connection / UDP datagram with `<id>\n`, so a client
//! can tell which backend it actually reached.

use std::io::{ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};

use crate::netns::Netns;

/// Listen backlog of the TCP servers: bursts of connects from load tests must not hit SYN drops.
pub const LISTEN_BACKLOG: i32 = 4096;

/// How often serving threads look at the stop flag; bounds how long a drop takes.
const STOP_POLL: Duration = Duration::from_millis(50);

/// Answers every accepted connection with `<id>\n` and closes it. Stops on drop.
#[derive(Debug)]
pub struct TcpIdentityServer {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpIdentityServer {
    /// Binds `addr` inside `netns` (port 0 picks a free port, see [`Self::addr`]).
    pub fn start(netns: &impl AsRef<Netns>, addr: SocketAddr, id: &str) -> TcpIdentityServer {
        let netns = netns.as_ref();
        let listener: TcpListener = netns
            .run_in(|| -> anyhow::Result<TcpListener> {
                let fd = bound_socket(addr, SockType::Stream)?;
                listen(&fd, Backlog::new(LISTEN_BACKLOG)?)?;
                Ok(TcpListener::from(fd))
            })
            .unwrap_or_else(|e| {
                panic!(
                    "TCP identity server {id} on {addr} in {}: {e:#}",
                    netns.name()
                )
            });
        let addr = listener.local_addr().expect("local_addr of listener");
        listener.set_nonblocking(true).expect("set_nonblocking");

        let served = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let reply = format!("{id}\n").into_bytes();
        let thread = {
            let (served, stop) = (served.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("tcp-id-{id}"))
                .spawn(move || serve_tcp(listener, &reply, &served, &stop))
                .expect("spawning TCP server thread")
        };
        TcpIdentityServer {
            addr,
            served,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for TcpIdentityServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_tcp(listener: TcpListener, reply: &[u8], served: &AtomicU64, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                // The accepted socket does not inherit O_NONBLOCK; a timeout still bounds a
                // write to a peer that never reads (the reply fits the send buffer anyway).
                let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                if stream.write_all(reply).is_ok() {
                    served.fetch_add(1, Ordering::Relaxed);
                }
                let _ = stream.shutdown(Shutdown::Write);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => wait_readable(&listener, STOP_POLL),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // ECONNABORTED, EMFILE and the like: keep serving, but don't spin.
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Replies `<id>\n` to every datagram, to its sender. Stops on drop.
#[derive(Debug)]
pub struct UdpIdentityServer {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpIdentityServer {
    /// Binds `addr` inside `netns`. Bind a specific address rather than a wildcard: replies leave
    /// from the bound address, and a wildcard socket would let routing pick the source.
    pub fn start(netns: &impl AsRef<Netns>, addr: SocketAddr, id: &str) -> UdpIdentityServer {
        let netns = netns.as_ref();
        let socket: UdpSocket = netns
            .run_in(|| -> anyhow::Result<UdpSocket> {
                Ok(UdpSocket::from(bound_socket(addr, SockType::Datagram)?))
            })
            .unwrap_or_else(|e| {
                panic!(
                    "UDP identity server {id} on {addr} in {}: {e:#}",
                    netns.name()
                )
            });
        let addr = socket.local_addr().expect("local_addr of UDP socket");
        socket
            .set_read_timeout(Some(STOP_POLL))
            .expect("set_read_timeout");

        let served = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let reply = format!("{id}\n").into_bytes();
        let thread = {
            let (served, stop) = (served.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("udp-id-{id}"))
                .spawn(move || serve_udp(socket, &reply, &served, &stop))
                .expect("spawning UDP server thread")
        };
        UdpIdentityServer {
            addr,
            served,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for UdpIdentityServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_udp(socket: UdpSocket, reply: &[u8], served: &AtomicU64, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((_, from)) => {
                if socket.send_to(reply, from).is_ok() {
                    served.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// A CLOEXEC socket of `kind` bound to `addr`, with SO_REUSEADDR (restarted servers must not trip
/// over TIME_WAIT) and, for IPv6, V6ONLY (so [::] and 0.0.0.0 servers can share a port).
fn bound_socket(addr: SocketAddr, kind: SockType) -> anyhow::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, kind, SockFlag::SOCK_CLOEXEC, None).context("socket")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).context("SO_REUSEADDR")?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).context("IPV6_V6ONLY")?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).with_context(|| format!("bind {addr}"))?;
    Ok(fd)
}

fn wait_readable(fd: &impl AsRawFd, timeout: Duration) {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pollfd, 1, timeout.as_millis() as libc::c_int) };
}
