//! steerd's kernel programs.
//!
//! Cgroup `sock_addr` hooks translate a service VIP:port into a backend once per connection (TCP
//! and connected UDP: `connect4/6`) or per message of an unconnected UDP socket (`sendmsg4/6`),
//! so established traffic flows directly between the application and the backend with no
//! per-packet work. The reverse hooks (`getpeername4/6`, `recvmsg4/6`) show the application the
//! VIP it dialled, never the backend it was sent to.
//!
//! A TC program on the node side of each pod's veth enforces AuthorizationPolicies for TCP: a
//! SYN towards the pod that its destination's table denies is turned into the RST|ACK the pod
//! would have sent and handed back to the client, so a refused connect fails at once with
//! ECONNREFUSED, as a reset from Istio's sidecar does.
//!
//! All policy lives in the agent: these programs only look up the tables it writes (see
//! `steerd-common` for every key and value).
#![no_std]
#![no_main]
// Atomic adds to shared counters (`count`): the BPF target lacks `AtomicU64::fetch_add`.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_F_NO_PREALLOC, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, bpf_sock_addr, bpf_sock_ops,
        sk_msg_md,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_prandom_u32, bpf_get_socket_cookie,
        bpf_redirect,
    },
    macros::{cgroup_sock_addr, classifier, map, sk_msg, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, lpm_trie::Key as LpmKey},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext, TcContext},
};
use aya_log_ebpf::debug;
use core::intrinsics::AtomicOrdering;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use steerd_common::{
    AUTHZ_DENY, AUTHZ_TABLE_BITS, Addr, AuthzDestKey, AuthzDestValue, AuthzSourceKey, Backend,
    BackendStats, ClientKey, EGRESS_REGISTRY_ONLY, EgressPolicy, MAX_AUTHZ_DENIED,
    MAX_AUTHZ_DESTINATIONS, MAX_AUTHZ_PREFIXES, MAX_CGROUP_LEVELS, MAX_DENIED,
    MAX_EGRESS_WORKLOADS, MAX_L7_PENDING, MAX_PROXY_UPSTREAM_PENDING, MAX_REDIRECT_SOCKETS,
    MAX_REGISTRY, MAX_REVNAT, MAX_SERVICES, MAX_SLOTS, MAX_STATS, PROTO_TCP, PROTO_UDP,
    PROXY_SOCKET_MARK, ProxyConfig, RedirectStats, RevNatKey, RevNatValue, SOCKET_REDIRECT,
    SOCKET_TCP, SOCKET_UNDECIDED, SVC_F_L7, SVC_F_NO_BACKENDS, ServiceKey, ServiceValue, Slot,
    SlotKey, SockTuple, StatsKey,
};

// Map names must match `steerd_common::map_names` (the attribute takes a literal).
#[map(name = "sd_svc_v1")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

#[map(name = "sd_slot_v1")]
static SLOTS: HashMap<SlotKey, Slot> = HashMap::pinned(MAX_SLOTS, BPF_F_NO_PREALLOC);

#[map(name = "sd_revnat_v1")]
static REVNAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::pinned(MAX_REVNAT, 0);

#[map(name = "sd_proxy_v1")]
static PROXY: Array<ProxyConfig> = Array::pinned(1, 0);

#[map(name = "sd_l7conn_v1")]
static L7CONN: LruHashMap<ClientKey, RevNatValue> = LruHashMap::pinned(MAX_L7_PENDING, 0);

#[map(name = "sd_egress_v1")]
static EGRESS: Array<EgressPolicy> = Array::pinned(1, 0);

#[map(name = "sd_registry_v1")]
static REGISTRY: LpmTrie<Addr, u32> = LpmTrie::pinned(MAX_REGISTRY, 0);

#[map(name = "sd_denied_v1")]
static DENIED: LruHashMap<Addr, u64> = LruHashMap::pinned(MAX_DENIED, 0);

#[map(name = "sd_egress_wl_v1")]
static EGRESS_WORKLOADS: HashMap<u64, u32> =
    HashMap::pinned(MAX_EGRESS_WORKLOADS, BPF_F_NO_PREALLOC);

#[map(name = "sd_stats_v2")]
static STATS: LruHashMap<StatsKey, BackendStats> = LruHashMap::pinned(MAX_STATS, 0);

#[map(name = "sd_authz_dst_v1")]
static AUTHZ_DEST: HashMap<AuthzDestKey, AuthzDestValue> =
    HashMap::pinned(MAX_AUTHZ_DESTINATIONS, BPF_F_NO_PREALLOC);

#[map(name = "sd_authz_src_v1")]
static AUTHZ_SOURCE: LpmTrie<AuthzSourceKey, u32> = LpmTrie::pinned(MAX_AUTHZ_PREFIXES, 0);

#[map(name = "sd_authz_dny_v2")]
static AUTHZ_DENIED: LruHashMap<AuthzDestKey, u64> = LruHashMap::pinned(MAX_AUTHZ_DENIED, 0);

#[map(name = "sd_sockets_v1")]
static SOCKETS: SockHash<SockTuple> = SockHash::pinned(MAX_REDIRECT_SOCKETS, 0);

#[map(name = "sd_sock_path_v1")]
static SOCKET_PATHS: HashMap<SockTuple, u32> =
    HashMap::pinned(MAX_REDIRECT_SOCKETS, BPF_F_NO_PREALLOC);

#[map(name = "sd_proxy_up_v1")]
static PROXY_UPSTREAM: LruHashMap<u64, u32> = LruHashMap::pinned(MAX_PROXY_UPSTREAM_PENDING, 0);

#[map(name = "sd_redir_st_v1")]
static REDIRECT_STATS: PerCpuArray<RedirectStats> = PerCpuArray::pinned(1, 0);

/// Set by the agent at load (`--socket-redirect`): non-zero tracks the L7 path's node-local
/// sockets for the `sk_msg` redirect.
#[unsafe(no_mangle)]
static SOCKET_REDIRECT_ENABLED: u32 = 0;

/// Return value that lets the syscall proceed.
const ALLOW: i32 = 1;
/// Return value that fails the syscall with EPERM.
const REJECT: i32 = 0;

enum Verdict {
    /// Not a service, or not ours to touch: leave the address alone.
    Pass,
    /// A service with no backends: fail fast instead of sending traffic nowhere.
    Reject,
    /// Send to this backend.
    Steer(Backend),
    /// Send to the agent's L7 proxy, which routes each request.
    Proxy(Backend),
}

/// Where the random numbers of a pick come from.
#[derive(Clone, Copy)]
enum Draw {
    /// Fresh per call: every connection is an independent weighted pick.
    Random,
    /// Derived from the socket cookie: every message of one unconnected UDP socket to one VIP
    /// goes to the same backend, so request/response protocols keep working.
    Sticky(u64),
}

impl Draw {
    #[inline(always)]
    fn two_u32(self, key: &ServiceKey) -> (u32, u32) {
        match self {
            Draw::Random => unsafe { (bpf_get_prandom_u32(), bpf_get_prandom_u32()) },
            Draw::Sticky(cookie) => {
                let h = mix64(cookie ^ ((key.port as u64) << 32) ^ key.addr.words[3] as u64);
                ((h >> 32) as u32, h as u32)
            }
        }
    }
}

/// splitmix64's finaliser: spreads every input bit over the output.
#[inline(always)]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The weighted pick: one uniform slot, then a biased coin between its primary and alias.
#[inline(always)]
fn pick(key: &ServiceKey, draw: Draw) -> Verdict {
    // SAFETY: the map has BPF_F_NO_PREALLOC, so an element replaced concurrently by the agent is
    // freed only after an RCU grace period; we copy the value out immediately.
    let svc: ServiceValue = match unsafe { SERVICES.get(key) } {
        Some(v) => *v,
        None => return Verdict::Pass,
    };
    if svc.flags & SVC_F_L7 != 0
        && key.protocol == PROTO_TCP
        && let Some(proxy) = proxy_for(&key.addr)
    {
        return Verdict::Proxy(proxy);
    }
    if svc.flags & SVC_F_NO_BACKENDS != 0 || svc.slot_count == 0 {
        return Verdict::Reject;
    }
    let (r1, r2) = draw.two_u32(key);
    // Multiply-shift maps r1 uniformly onto [0, slot_count) without a division.
    let slot = ((r1 as u64 * svc.slot_count as u64) >> 32) as u32;
    let slot_key = SlotKey {
        table_id: svc.table_id,
        slot,
    };
    match unsafe { SLOTS.get(&slot_key) } {
        Some(s) => Verdict::Steer(if r2 < s.threshold { s.primary } else { s.alias }),
        // Only possible if a table were collected under a reader: fail open to the VIP.
        None => Verdict::Pass,
    }
}

/// The proxy listener for a VIP of this family, if a proxy is running.
#[inline(always)]
fn proxy_for(vip: &Addr) -> Option<Backend> {
    let cfg = PROXY.get(0)?;
    if cfg.port == 0 {
        return None;
    }
    let addr = if vip.is_ipv4_mapped() {
        if cfg.ipv4 == 0 {
            return None;
        }
        Addr::from_ipv4_be(cfg.ipv4)
    } else {
        if cfg.ipv6.words == [0; 4] {
            return None;
        }
        cfg.ipv6
    };
    Some(Backend {
        addr,
        port: cfg.port,
        _pad: 0,
    })
}

/// Whether REGISTRY_ONLY applies to the calling process: its pod's policy (the first of its
/// ancestor cgroups in `sd_egress_wl_v1`), else the mesh default.
#[inline(always)]
fn registry_only_for_caller() -> bool {
    let Some(policy) = EGRESS.get(0) else {
        return false;
    };
    if policy.workloads != 0 {
        // Bounded (the verifier unrolls or bounds it); a level beyond the caller's depth gives 0.
        let mut level = 1;
        while level <= MAX_CGROUP_LEVELS {
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
            if id == 0 {
                break;
            }
            if let Some(p) = unsafe { EGRESS_WORKLOADS.get(&id) } {
                return *p == EGRESS_REGISTRY_ONLY;
            }
            level += 1;
        }
    }
    policy.registry_only != 0
}

/// REGISTRY_ONLY: whether a destination that is not a service must be refused. Loopback always
/// passes; refusals are counted per destination.
#[inline(always)]
fn egress_denied(dest: &Addr) -> bool {
    if !EGRESS
        .get(0)
        .is_some_and(|p| p.registry_only != 0 || p.workloads != 0)
    {
        return false;
    }
    let loopback4 = dest.is_ipv4_mapped() && (dest.ipv4_be().to_ne_bytes()[0] == 127);
    let loopback6 = dest.words == [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
    if loopback4 || loopback6 {
        return false;
    }
    if REGISTRY.get(LpmKey::new(128, *dest)).is_some() {
        return false;
    }
    if !registry_only_for_caller() {
        return false;
    }
    match DENIED.get_ptr_mut(dest) {
        // Racy increments across CPUs only under-count; the count is diagnostic.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = DENIED.insert(dest, &1, 0);
        }
    }
    true
}

/// Whether the socket belongs to the agent's proxy (see [`PROXY_SOCKET_MARK`]).
#[inline(always)]
fn is_proxy_socket(sa: *const bpf_sock_addr) -> bool {
    let sk = unsafe { (*sa).__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    rd(unsafe { addr_of!((*sk).mark) }) == PROXY_SOCKET_MARK
}

#[inline(always)]
fn remember_vip(cookie: u64, backend: &Backend, key: &ServiceKey) {
    let rk = RevNatKey {
        cookie,
        backend: *backend,
        _pad: 0,
    };
    let rv = RevNatValue {
        vip: key.addr,
        port: key.port,
        _pad: 0,
    };
    // Best effort: on failure getpeername shows the backend, the connection still works.
    let _ = REVNAT.insert(&rk, &rv, 0);
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

// The kernel only accepts 4-byte accesses to some bpf_sock_addr fields; volatile accesses stop
// LLVM from merging or splitting them.
#[inline(always)]
fn rd(p: *const u32) -> u32 {
    unsafe { read_volatile(p) }
}
#[inline(always)]
fn wr(p: *mut u32, v: u32) {
    unsafe { write_volatile(p, v) }
}

#[inline(always)]
fn protocol(sa: *const bpf_sock_addr) -> Option<u8> {
    let p = rd(unsafe { addr_of!((*sa).protocol) }) as u8;
    if p == PROTO_TCP || p == PROTO_UDP {
        Some(p)
    } else {
        None
    }
}

#[inline(always)]
fn dest4(sa: *const bpf_sock_addr) -> (Addr, u16) {
    let ip = rd(unsafe { addr_of!((*sa).user_ip4) });
    let port = rd(unsafe { addr_of!((*sa).user_port) }) as u16;
    (Addr::from_ipv4_be(ip), port)
}

#[inline(always)]
fn dest6(sa: *const bpf_sock_addr) -> (Addr, u16) {
    let base = unsafe { addr_of!((*sa).user_ip6) } as *const u32;
    let words = unsafe { [rd(base), rd(base.add(1)), rd(base.add(2)), rd(base.add(3))] };
    let port = rd(unsafe { addr_of!((*sa).user_port) }) as u16;
    (Addr { words }, port)
}

#[inline(always)]
fn set_dest4(sa: *mut bpf_sock_addr, addr: &Addr, port: u16) {
    wr(unsafe { addr_of_mut!((*sa).user_ip4) }, addr.ipv4_be());
    wr(unsafe { addr_of_mut!((*sa).user_port) }, port as u32);
}

#[inline(always)]
fn set_dest6(sa: *mut bpf_sock_addr, addr: &Addr, port: u16) {
    let base = unsafe { addr_of_mut!((*sa).user_ip6) } as *mut u32;
    unsafe {
        wr(base, addr.words[0]);
        wr(base.add(1), addr.words[1]);
        wr(base.add(2), addr.words[2]);
        wr(base.add(3), addr.words[3]);
    }
    wr(unsafe { addr_of_mut!((*sa).user_port) }, port as u32);
}

/// Forward translation shared by connect and sendmsg, both families.
#[inline(always)]
fn forward(ctx: &SockAddrContext, v6: bool, sticky: bool) -> i32 {
    let sa = ctx.sock_addr;
    let Some(protocol) = protocol(sa) else {
        return ALLOW;
    };
    if is_proxy_socket(sa) {
        // The proxy's upstream connections join the socket redirect once established; the
        // sock_ops program knows them by cookie.
        if !sticky && protocol == PROTO_TCP && redirect_enabled() {
            let _ = PROXY_UPSTREAM.insert(&cookie(ctx), &0, 0);
        }
        return ALLOW;
    }
    let (addr, port) = if v6 { dest6(sa) } else { dest4(sa) };
    let key = ServiceKey {
        addr,
        port,
        protocol,
        _pad: 0,
    };
    // The cookie costs a helper call: only sendmsg's sticky pick needs it before the lookup,
    // connect only once it steers.
    let draw = if sticky {
        Draw::Sticky(cookie(ctx))
    } else {
        Draw::Random
    };
    let verdict = pick(&key, draw);
    let socket_cookie = || match draw {
        Draw::Sticky(c) => c,
        Draw::Random => cookie(ctx),
    };
    match verdict {
        Verdict::Pass if egress_denied(&key.addr) => {
            debug!(
                ctx,
                "steerd: REGISTRY_ONLY refused an unregistered destination"
            );
            REJECT
        }
        Verdict::Pass => ALLOW,
        Verdict::Reject => {
            debug!(ctx, "steerd: rejected connect to service without backends");
            REJECT
        }
        Verdict::Proxy(proxy) => {
            if !set_dest(sa, v6, &proxy) {
                return ALLOW;
            }
            // The reverse entry doubles as the record the sock_ops program hands to the proxy
            // once the connection has its local port.
            remember_vip(socket_cookie(), &proxy, &key);
            ALLOW
        }
        Verdict::Steer(backend) => {
            if !set_dest(sa, v6, &backend) {
                return ALLOW;
            }
            remember_vip(socket_cookie(), &backend, &key);
            ALLOW
        }
    }
}

/// Writes the new destination; false when an IPv4 socket would need an IPv6 address (the
/// compiler never pairs them, so this only guards against a misconfigured proxy).
#[inline(always)]
fn set_dest(sa: *mut bpf_sock_addr, v6: bool, to: &Backend) -> bool {
    if v6 {
        set_dest6(sa, &to.addr, to.port);
    } else if to.addr.is_ipv4_mapped() {
        set_dest4(sa, &to.addr, to.port);
    } else {
        return false;
    }
    true
}

/// Reverse translation shared by getpeername and recvmsg: backend → VIP the socket dialled.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    let (addr, port) = if v6 { dest6(sa) } else { dest4(sa) };
    let rk = RevNatKey {
        cookie: cookie(ctx),
        backend: Backend {
            addr,
            port,
            _pad: 0,
        },
        _pad: 0,
    };
    if let Some(v) = unsafe { REVNAT.get(&rk) } {
        let (vip, vport) = (v.vip, v.port);
        if v6 {
            set_dest6(sa, &vip, vport);
        } else {
            set_dest4(sa, &vip, vport);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn sd_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, false, false)
}

#[cgroup_sock_addr(connect6)]
pub fn sd_connect6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, true, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sd_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, false, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sd_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, true, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sd_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sd_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sd_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sd_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}

/// Connection events of steered TCP sockets: re-keys proxied connections for the L7 proxy and
/// keeps the per-backend traffic counters.
#[sock_ops]
pub fn sd_sockops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    let op = rd(unsafe { addr_of!((*ops).op) });
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
        // One lookup tells whether connect() steered this socket, and to which VIP.
        let Some(key) = stats_key(ops, cookie) else {
            // The proxy's own upstream connections (never steered, so never in REVNAT).
            if redirect_enabled() && PROXY_UPSTREAM.get_ptr(&cookie).is_some() {
                let _ = PROXY_UPSTREAM.remove(&cookie);
                track_for_redirect(&ctx);
            }
            return 1;
        };
        if is_proxy(&key.backend) {
            claim_for_proxy(ops, key.service);
            track_for_redirect(&ctx);
        } else {
            count(&key, 1, 0, 0, 0);
            // Ask for state changes of this socket only, to count its close and bytes.
            let flags = rd(unsafe { addr_of!((*ops).bpf_sock_ops_cb_flags) });
            let _ = ctx.set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
    } else if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        // An accepted socket joins when the connecting socket did: the proxy's side of a
        // client's connection, a node-local backend's side of the proxy's. The connecting side
        // completed its handshake first, so it is already tracked if it ever will be.
        if redirect_enabled() && SOCKET_PATHS.get_ptr(&sock_tuple(ops).peer()).is_some() {
            track_for_redirect(&ctx);
        }
    } else if op == BPF_SOCK_OPS_STATE_CB
        && unsafe { (*ops).__bindgen_anon_1.args[1] } == BPF_TCP_CLOSE
    {
        if redirect_enabled() {
            // The sockhash drops the socket by itself; its path entry goes here.
            let _ = SOCKET_PATHS.remove(&sock_tuple(ops));
        }
        let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
        if let Some(key) = stats_key(ops, cookie) {
            let mut sent = unsafe { read_volatile(addr_of!((*ops).bytes_acked)) };
            let mut received = unsafe { read_volatile(addr_of!((*ops).bytes_received)) };
            // Both counters advance with sequence numbers, so a graceful close adds each side's
            // FIN as one byte; Istio reports application bytes only.
            let old_state = unsafe { (*ops).__bindgen_anon_1.args[0] };
            if matches!(
                old_state,
                TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_LAST_ACK | TCP_CLOSING
            ) {
                sent = sent.saturating_sub(1);
                received = received.saturating_sub(1);
            }
            count(&key, 0, 1, sent, received);
        }
    }
    1
}

#[inline(always)]
fn redirect_enabled() -> bool {
    // SAFETY: a plain read of a global the loader may have rewritten.
    unsafe { read_volatile(&SOCKET_REDIRECT_ENABLED) != 0 }
}

/// A port field of `bpf_sock_ops` or `sk_msg_md` as a network-order `u16`. The kernel hands
/// `remote_port` over in network order in the upper 16 bits and `local_port` in host order;
/// a connected socket's ports are never 0, so whichever half is set is the port.
#[inline(always)]
fn remote_port(raw: u32) -> u16 {
    if raw & 0xffff == 0 {
        (raw >> 16) as u16
    } else {
        raw as u16
    }
}

/// The socket's connection as its own key (see [`SockTuple`]).
#[inline(always)]
fn sock_tuple(ops: *mut bpf_sock_ops) -> SockTuple {
    SockTuple {
        local: sock_ops_addr(ops, unsafe { addr_of!((*ops).local_ip4) }, unsafe {
            addr_of!((*ops).local_ip6)
        }
            as *const u32),
        remote: sock_ops_addr(ops, unsafe { addr_of!((*ops).remote_ip4) }, unsafe {
            addr_of!((*ops).remote_ip6)
        }
            as *const u32),
        local_port: (rd(unsafe { addr_of!((*ops).local_port) }) as u16).to_be(),
        remote_port: remote_port(rd(unsafe { addr_of!((*ops).remote_port) })),
    }
}

/// Adds an L7-path socket to the sockhash (which gives it the `sk_msg` program) and to the
/// path table, undecided. A socket the path table cannot take stays out of it, so no peer
/// ever redirects to it and its own sends find no entry and take TCP.
#[inline(always)]
fn track_for_redirect(ctx: &SockOpsContext) {
    if !redirect_enabled() {
        return;
    }
    let ops = ctx.ops;
    let mut tuple = sock_tuple(ops);
    // SAFETY: `ops` is the program's context.
    if SOCKETS.update(&mut tuple, unsafe { &mut *ops }, 0).is_err() {
        return;
    }
    if SOCKET_PATHS.insert(&tuple, &SOCKET_UNDECIDED, 0).is_err() {
        return;
    }
    // The path entry goes at close.
    let flags = rd(unsafe { addr_of!((*ops).bpf_sock_ops_cb_flags) });
    let _ = ctx.set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    if let Some(stats) = REDIRECT_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU value, this CPU's copy; programs do not migrate while running.
        unsafe { (*stats).sockets += 1 };
    }
}

/// Sends of tracked sockets: hands the data straight to the peer socket's receive queue when
/// the peer was tracked at the socket's first send, which skips TCP, IP and the veth on both
/// sides (the L7 path's two hops are node-local: client to proxy always, proxy to backend when
/// the backend is on the node). Each socket decides once, at its first send, and never switches
/// path: the receiver reads redirected data before unread TCP data, so a direction that mixed
/// the two could reorder the stream.
#[sk_msg]
pub fn sd_redirect(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    let tuple = msg_tuple(md);
    let size = rd(unsafe { addr_of!((*md).size) }) as u64;
    let mut redirected = false;
    if let Some(path) = SOCKET_PATHS.get_ptr_mut(&tuple) {
        // SAFETY: the value outlives this call; a socket's sends are serialized by its lock,
        // so no other program run decides for it concurrently.
        let mut decided = unsafe { *path };
        if decided == SOCKET_UNDECIDED {
            decided = if SOCKET_PATHS.get_ptr(&tuple.peer()).is_some() {
                SOCKET_REDIRECT
            } else {
                SOCKET_TCP
            };
            unsafe { *path = decided };
        }
        if decided == SOCKET_REDIRECT {
            // Fails only if the peer left the sockhash (it is closing): then the data takes
            // TCP towards a socket that will reset it, as it would have anyway.
            redirected =
                SOCKETS.redirect_msg(&ctx, tuple.peer(), BPF_F_INGRESS as u64) == SK_PASS as i64;
        }
    }
    if let Some(stats) = REDIRECT_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU value, this CPU's copy.
        unsafe {
            if redirected {
                (*stats).redirected_messages += 1;
                (*stats).redirected_bytes += size;
            } else {
                (*stats).tcp_messages += 1;
                (*stats).tcp_bytes += size;
            }
        }
    }
    SK_PASS
}

/// `sk_msg` verdict: deliver (to the redirect target if one was set, else over TCP).
const SK_PASS: u32 = 1;

/// The sending socket's key, read from the `sk_msg` context as [`sock_tuple`] reads it from
/// `sock_ops`.
#[inline(always)]
fn msg_tuple(md: *mut sk_msg_md) -> SockTuple {
    let family = rd(unsafe { addr_of!((*md).family) });
    let l4 = rd(unsafe { addr_of!((*md).local_ip4) });
    let r4 = rd(unsafe { addr_of!((*md).remote_ip4) });
    let l6 = unsafe { addr_of!((*md).local_ip6) } as *const u32;
    let r6 = unsafe { addr_of!((*md).remote_ip6) } as *const u32;
    let l6 = unsafe { [rd(l6), rd(l6.add(1)), rd(l6.add(2)), rd(l6.add(3))] };
    let r6 = unsafe { [rd(r6), rd(r6.add(1)), rd(r6.add(2)), rd(r6.add(3))] };
    let (local, remote) = if family == AF_INET {
        (Addr::from_ipv4_be(l4), Addr::from_ipv4_be(r4))
    } else {
        (Addr { words: l6 }, Addr { words: r6 })
    };
    SockTuple {
        local,
        remote,
        local_port: (rd(unsafe { addr_of!((*md).local_port) }) as u16).to_be(),
        remote_port: remote_port(rd(unsafe { addr_of!((*md).remote_port) })),
    }
}

/// Whether a steered socket's destination is the L7 proxy.
#[inline(always)]
fn is_proxy(to: &Backend) -> bool {
    proxy_for(&to.addr).is_some_and(|p| p.addr == to.addr && p.port == to.port)
}

/// Records a proxied connection's original destination under the client's local address and
/// port, which is what the proxy sees as the peer of the accepted socket. Runs when the client's
/// handshake completes, before the client's final ACK reaches the proxy.
#[inline(always)]
fn claim_for_proxy(ops: *mut bpf_sock_ops, service: ServiceKey) {
    let vip = RevNatValue {
        vip: service.addr,
        port: service.port,
        _pad: 0,
    };
    let addr = sock_ops_addr(ops, unsafe { addr_of!((*ops).local_ip4) }, unsafe {
        addr_of!((*ops).local_ip6)
    }
        as *const u32);
    // local_port is in host byte order in bpf_sock_ops (unlike remote_port).
    let port = (rd(unsafe { addr_of!((*ops).local_port) }) as u16).to_be();
    let key = ClientKey {
        addr,
        port,
        _pad: 0,
    };
    let _ = L7CONN.insert(&key, &vip, 0);
}

/// The (service, backend) of a socket the connect program steered, from its reverse entry.
#[inline(always)]
fn stats_key(ops: *mut bpf_sock_ops, cookie: u64) -> Option<StatsKey> {
    let addr = sock_ops_addr(ops, unsafe { addr_of!((*ops).remote_ip4) }, unsafe {
        addr_of!((*ops).remote_ip6)
    }
        as *const u32);
    // remote_port holds the network-order port in its upper 16 bits (a sock_ops quirk).
    let port = (rd(unsafe { addr_of!((*ops).remote_port) }) >> 16) as u16;
    let backend = Backend {
        addr,
        port,
        _pad: 0,
    };
    let rk = RevNatKey {
        cookie,
        backend,
        _pad: 0,
    };
    let vip = unsafe { REVNAT.get(&rk) }?;
    Some(StatsKey {
        service: ServiceKey {
            addr: vip.vip,
            port: vip.port,
            protocol: PROTO_TCP,
            _pad: 0,
        },
        backend,
    })
}

/// One of the socket's addresses as an [`Addr`]. Both fields are read unconditionally: if the
/// loads sat in two branches, LLVM would merge them into one load at a computed offset, and the
/// verifier only allows constant offsets into the context.
#[inline(always)]
fn sock_ops_addr(ops: *const bpf_sock_ops, ip4: *const u32, ip6: *const u32) -> Addr {
    let family = rd(unsafe { addr_of!((*ops).family) });
    let v4 = rd(ip4);
    let words = unsafe { [rd(ip6), rd(ip6.add(1)), rd(ip6.add(2)), rd(ip6.add(3))] };
    if family == AF_INET {
        Addr::from_ipv4_be(v4)
    } else {
        Addr { words }
    }
}

/// Adds to one (service, backend) pair's counters. The entry is shared by all CPUs (a per-CPU
/// map's memory grows with the CPU count), so the adds are atomic.
#[inline(always)]
fn count(key: &StatsKey, opened: u64, closed: u64, sent: u64, received: u64) {
    if STATS.get_ptr_mut(key).is_none() {
        let _ = STATS.insert(key, &BackendStats::default(), BPF_NOEXIST);
    }
    if let Some(stats) = STATS.get_ptr_mut(key) {
        // SAFETY: the map value outlives this call; only field addresses are taken.
        unsafe {
            atomic_add(addr_of_mut!((*stats).connections_opened), opened);
            atomic_add(addr_of_mut!((*stats).connections_closed), closed);
            atomic_add(addr_of_mut!((*stats).bytes_sent), sent);
            atomic_add(addr_of_mut!((*stats).bytes_received), received);
        }
    }
}

/// Adds `n` to a counter in a map value shared by all CPUs.
///
/// # Safety
/// `field` points into a live map value, 8-byte aligned.
#[inline(always)]
unsafe fn atomic_add(field: *mut u64, n: u64) {
    if n != 0 {
        // The BPF target has no `AtomicU64::fetch_add`; the intrinsic with an unused result is
        // the kernel's atomic add (BPF_ATOMIC | BPF_ADD).
        unsafe { core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, n) };
    }
}

const BPF_NOEXIST: u64 = 1;
// include/net/tcp_states.h
const TCP_FIN_WAIT1: u32 = 4;
const TCP_FIN_WAIT2: u32 = 5;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;
const AF_INET: u32 = 2;

// ------------------------------------------------------------------------------------------------
// AuthorizationPolicy for TCP, at the destination pod's veth
// ------------------------------------------------------------------------------------------------

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;
// IPv6 extension headers (next-header values) the parser walks through.
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
/// Extension headers looked through before the TCP header; a longer chain cannot be checked
/// and is dropped (see [`Parsed::Unknown`]).
const MAX_IPV6_EXT_HEADERS: usize = 8;
/// `bpf_adj_room_mode`: room is added or removed right after the fixed IPv6 header.
const BPF_ADJ_ROOM_NET: u32 = 0;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_ACK: u8 = 0x10;

/// Where the TCP header and the addresses of a SYN are.
struct Syn {
    src: Addr,
    dst: Addr,
    /// Destination port, network byte order.
    dport: u16,
    /// Offsets of the addresses (to swap) and of the TCP header.
    src_off: usize,
    addr_len: usize,
    tcp_off: usize,
    /// IPv6 only: the first fragment of a fragmented SYN (its TCP checksum covers bytes this
    /// packet does not have, so no reset can be built from it).
    fragmented: bool,
}

/// What a packet towards a pod is, for authorization.
enum Parsed {
    /// A TCP SYN to check.
    Syn(Syn),
    /// An IPv6 packet whose extension headers go on beyond [`MAX_IPV6_EXT_HEADERS`]: it may be
    /// a SYN, and nothing can tell, so it never reaches a pod (a chain that long is not sent by
    /// ordinary stacks, but one could hide a SYN from the check).
    Unknown,
}

/// Attached to egress of the node side of pod veths: sees every packet going to the pod.
#[classifier]
pub fn sd_authz(ctx: TcContext) -> i32 {
    match authorize(&ctx) {
        Some(verdict) => verdict,
        None => TC_ACT_OK as i32,
    }
}

#[inline(always)]
fn authorize(ctx: &TcContext) -> Option<i32> {
    let skb = ctx.skb.skb;
    // The node's own connections (kubelet probes, the L7 proxy, host-network Pods) are not
    // checked, as Kubernetes NetworkPolicy always allows the node; the proxy authorizes each
    // request it forwards. A packet forwarded from a pod or another node has no local socket.
    let sk = unsafe { read_volatile(addr_of!((*skb).__bindgen_anon_2.sk)) };
    if !sk.is_null() {
        return None;
    }
    let mut syn = match parse_syn(ctx)? {
        Parsed::Syn(syn) => syn,
        Parsed::Unknown => return Some(TC_ACT_SHOT as i32),
    };
    let mut key = AuthzDestKey {
        addr: syn.dst,
        port: syn.dport,
        _pad: 0,
    };
    let table = match unsafe { AUTHZ_DEST.get(&key) } {
        Some(v) => v.table_id,
        None => {
            key.port = 0;
            let v = unsafe { AUTHZ_DEST.get(&key) }?;
            key.port = syn.dport;
            v.table_id
        }
    };
    let lookup = LpmKey::new(
        AUTHZ_TABLE_BITS + 128,
        AuthzSourceKey {
            table_id: table,
            addr: syn.src,
        },
    );
    // A missing table can only be one collected under a reader: let that SYN through.
    if *AUTHZ_SOURCE.get(lookup)? != AUTHZ_DENY {
        return None;
    }
    count_denied(&key);
    // A fragmented SYN cannot be answered: it is dropped, and the fragments that follow die
    // in the pod's reassembly queue (the client times out).
    if syn.fragmented {
        return Some(TC_ACT_SHOT as i32);
    }
    // Should the rewrite fail half-way, the SYN must not reach the pod either: drop it (the
    // client then times out instead of being reset).
    let rewritten = strip_ipv6_extensions(ctx, &mut syn).is_some() && reset(ctx, &syn).is_some();
    Some(if rewritten {
        TC_ACT_REDIRECT as i32
    } else {
        TC_ACT_SHOT as i32
    })
}

/// The reset goes back without the SYN's IPv6 extension headers: options addressed to the pod
/// (hop-by-hop, destination options, a spent routing header, AH) mean nothing in a reply, and
/// a plain IPv6 + TCP reset is what the pod's stack would send. The TCP header stays where it
/// is; the fixed header moves up to it (`bpf_skb_adjust_room` on the network layer), and the
/// TCP checksum needs no change (its pseudo-header has the same addresses, length and protocol).
#[inline(always)]
fn strip_ipv6_extensions(ctx: &TcContext, syn: &mut Syn) -> Option<()> {
    if syn.addr_len != 16 {
        return Some(());
    }
    let ext_len = syn.tcp_off.checked_sub(ETH_HLEN + IPV6_HLEN)?;
    if ext_len == 0 {
        return Some(());
    }
    let payload_len = u16::from_be(ctx.load::<u16>(ETH_HLEN + 4).ok()?);
    let payload_len = payload_len.checked_sub(ext_len as u16)?;
    ctx.adjust_room(-(ext_len as i32), BPF_ADJ_ROOM_NET, 0)
        .ok()?;
    ctx.store(ETH_HLEN + 4, &payload_len.to_be(), 0).ok()?;
    ctx.store(ETH_HLEN + 6, &PROTO_TCP, 0).ok()?;
    syn.tcp_off = ETH_HLEN + IPV6_HLEN;
    Some(())
}

/// Walks an IPv6 packet's extension headers to its upper-layer header: (its protocol, its
/// offset, whether the packet is the first fragment of several); None for a later fragment
/// (it carries no TCP header; without the first, the pod cannot reassemble it).
#[inline(always)]
fn ipv6_upper_layer(ctx: &TcContext) -> Option<Result<(u8, usize, bool), ()>> {
    let mut next: u8 = ctx.load(ETH_HLEN + 6).ok()?;
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut fragmented = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let hdr: [u8; 2] = ctx.load(off).ok()?;
                next = hdr[0];
                off += (hdr[1] as usize + 1) * 8;
            }
            IPPROTO_AH => {
                let hdr: [u8; 2] = ctx.load(off).ok()?;
                next = hdr[0];
                off += (hdr[1] as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let hdr: [u8; 4] = ctx.load(off).ok()?;
                next = hdr[0];
                let offset_and_flags = u16::from_be_bytes([hdr[2], hdr[3]]);
                if offset_and_flags & 0xfff8 != 0 {
                    return None;
                }
                // M: more fragments follow.
                fragmented |= offset_and_flags & 1 != 0;
                off += 8;
            }
            _ => return Some(Ok((next, off, fragmented))),
        }
    }
    match next {
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT => {
            Some(Err(()))
        }
        _ => Some(Ok((next, off, fragmented))),
    }
}

#[inline(always)]
fn parse_syn(ctx: &TcContext) -> Option<Parsed> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let mut fragmented = false;
    let (src_off, addr_len, tcp_off, src, dst) = if ethertype == ETH_P_IP {
        let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        let protocol: u8 = ctx.load(ETH_HLEN + 9).ok()?;
        // Fragments other than the first carry no TCP header.
        let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?) & 0x1fff;
        if protocol != PROTO_TCP || frag != 0 || ihl < 20 {
            return None;
        }
        let src: u32 = ctx.load(ETH_HLEN + 12).ok()?;
        let dst: u32 = ctx.load(ETH_HLEN + 16).ok()?;
        (
            ETH_HLEN + 12,
            4,
            ETH_HLEN + ihl,
            Addr::from_ipv4_be(src),
            Addr::from_ipv4_be(dst),
        )
    } else if ethertype == ETH_P_IPV6 {
        let (next, tcp_off, first_fragment) = match ipv6_upper_layer(ctx)? {
            Ok(found) => found,
            Err(()) => return Some(Parsed::Unknown),
        };
        if next != PROTO_TCP {
            return None;
        }
        fragmented = first_fragment;
        let src: Addr = ctx.load(ETH_HLEN + 8).ok()?;
        let dst: Addr = ctx.load(ETH_HLEN + 24).ok()?;
        (ETH_HLEN + 8, 16, tcp_off, src, dst)
    } else {
        return None;
    };
    let flags: u8 = ctx.load(tcp_off + 13).ok()?;
    if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST) != TCP_FLAG_SYN {
        return None;
    }
    let dport: u16 = ctx.load(tcp_off + 2).ok()?;
    Some(Parsed::Syn(Syn {
        src,
        dst,
        dport,
        src_off,
        addr_len,
        tcp_off,
        fragmented,
    }))
}

#[inline(always)]
fn count_denied(key: &AuthzDestKey) {
    // One entry for all CPUs (a per-CPU map's memory grows with the CPU count): atomic adds.
    // A failed insert means another CPU inserted the entry meanwhile: count on that one.
    if AUTHZ_DENIED.get_ptr_mut(key).is_none() && AUTHZ_DENIED.insert(key, &1, BPF_NOEXIST).is_ok()
    {
        return;
    }
    if let Some(n) = AUTHZ_DENIED.get_ptr_mut(key) {
        // SAFETY: `n` points into a live map value (a u64).
        unsafe { atomic_add(n, 1) };
    }
}

/// Rewrites the SYN in place into the pod's RST|ACK (RFC 9293: `<SEQ=0><ACK=SEG.SEQ+1>`) and
/// sends it back in through the same veth, as if the pod had answered. Swapping addresses and
/// ports leaves every checksum as it was; the changed sequence, acknowledgement and flag words
/// are patched into the TCP checksum (a no-op while it is still to be computed by offload).
#[inline(always)]
fn reset(ctx: &TcContext, syn: &Syn) -> Option<()> {
    // Ethernet: the reply goes from the pod's MAC to the node side's, which makes it ours.
    let dst_mac: [u8; 6] = ctx.load(0).ok()?;
    let src_mac: [u8; 6] = ctx.load(6).ok()?;
    ctx.store(0, &src_mac, 0).ok()?;
    ctx.store(6, &dst_mac, 0).ok()?;
    if syn.addr_len == 4 {
        ctx.store(syn.src_off, &syn.dst.ipv4_be(), 0).ok()?;
        ctx.store(syn.src_off + 4, &syn.src.ipv4_be(), 0).ok()?;
    } else {
        ctx.store(syn.src_off, &syn.dst, 0).ok()?;
        ctx.store(syn.src_off + 16, &syn.src, 0).ok()?;
    }
    let t = syn.tcp_off;
    let ports: u32 = ctx.load(t).ok()?;
    let swapped = ports.rotate_left(16);
    ctx.store(t, &swapped, 0).ok()?;
    let csum = t + 16;
    let seq: u32 = ctx.load(t + 4).ok()?;
    let old_ack: u32 = ctx.load(t + 8).ok()?;
    let ack = (u32::from_be(seq).wrapping_add(1)).to_be();
    let zero = 0u32;
    ctx.store(t + 4, &zero, 0).ok()?;
    ctx.l4_csum_replace(csum, seq as u64, 0, 4).ok()?;
    ctx.store(t + 8, &ack, 0).ok()?;
    ctx.l4_csum_replace(csum, old_ack as u64, ack as u64, 4)
        .ok()?;
    // Data offset, flags and window as one word: keep the offset, RST|ACK, window 0.
    let old_word: u32 = ctx.load(t + 12).ok()?;
    let new_word =
        u32::from_ne_bytes([old_word.to_ne_bytes()[0], TCP_FLAG_RST | TCP_FLAG_ACK, 0, 0]);
    ctx.store(t + 12, &new_word, 0).ok()?;
    ctx.l4_csum_replace(csum, old_word as u64, new_word as u64, 4)
        .ok()?;
    let ifindex = unsafe { read_volatile(addr_of!((*ctx.skb.skb).ifindex)) };
    let r = unsafe { bpf_redirect(ifindex, BPF_F_INGRESS as u64) };
    (r == TC_ACT_REDIRECT as i64).then_some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
