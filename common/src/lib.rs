//! Map keys and values shared by the steerd eBPF programs (`ebpf/`) and the agent (`agent/`).
//!
//! Every type is `#[repr(C)]` with explicit padding so that its layout is identical in the kernel
//! and in user space. All addresses and ports are stored in **network byte order**, exactly as the
//! kernel presents them in `struct bpf_sock_addr` (`user_ip4`, `user_ip6`, `user_port`), so the
//! programs compare and copy them without conversions.
//!
//! IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`) in the same 16-byte form as IPv6. One
//! key format then serves `connect4` and `connect6`, and a dual-stack socket dialling a v4-mapped
//! VIP through `connect6` finds the IPv4 service without a second lookup.
#![no_std]

/// Version of the map layout. It is part of every pinned map's name, so an agent with a different
/// layout never reuses (and misreads) maps pinned by another version.
pub const MAP_LAYOUT_VERSION: u32 = 1;

/// Pinned map names (under `<bpffs>/maps/`; at most 15 bytes, the kernel's object name limit).
/// The `#[map]` statics in `ebpf/` use these constants.
pub mod map_names {
    /// [`crate::ServiceKey`] → [`crate::ServiceValue`].
    pub const SERVICES: &str = "sd_svc_v1";
    /// [`crate::SlotKey`] → [`crate::Slot`].
    pub const SLOTS: &str = "sd_slot_v1";
    /// [`crate::RevNatKey`] → [`crate::RevNatValue`].
    pub const REVNAT: &str = "sd_revnat_v1";
    /// index 0 → [`crate::ProxyConfig`].
    pub const PROXY: &str = "sd_proxy_v1";
    /// [`crate::ClientKey`] → [`crate::RevNatValue`].
    pub const L7CONN: &str = "sd_l7conn_v1";
    /// [`crate::StatsKey`] → [`crate::BackendStats`] (shared by all CPUs, atomic adds;
    /// `sd_stats_v1` was per CPU).
    pub const STATS: &str = "sd_stats_v2";
    /// index 0 → [`crate::EgressPolicy`].
    pub const EGRESS: &str = "sd_egress_v1";
    /// LPM `{prefix_len, Addr}` → `u32` (unused): registered destinations.
    pub const REGISTRY: &str = "sd_registry_v1";
    /// [`crate::Addr`] → `u64`: connects refused by REGISTRY_ONLY, per destination.
    pub const DENIED: &str = "sd_denied_v1";
    /// Pod cgroup id (`u64`) → `u32` policy ([`crate::EGRESS_ALLOW_ANY`] or
    /// [`crate::EGRESS_REGISTRY_ONLY`]): workloads whose Sidecar sets their own policy.
    pub const EGRESS_WORKLOADS: &str = "sd_egress_wl_v1";
    /// [`crate::AuthzDestKey`] → [`crate::AuthzDestValue`]: destinations with a policy.
    pub const AUTHZ_DEST: &str = "sd_authz_dst_v1";
    /// LPM [`crate::AuthzSourceKey`] → `u32` verdict: each destination's source table.
    pub const AUTHZ_SOURCE: &str = "sd_authz_src_v1";
    /// [`crate::AuthzDestKey`] → `u64` (LRU hash shared by all CPUs, atomic adds): connections
    /// refused, per destination (`sd_authz_dny_v1` was per CPU).
    pub const AUTHZ_DENIED: &str = "sd_authz_dny_v2";
    /// [`crate::SockTuple`] → socket (sockhash): the L7 path's node-local TCP sockets, whose
    /// sends the `sk_msg` program hands straight to the peer socket. Pinned like the others: a
    /// socket dropped from the map loses the redirected data it has not read yet, so the map
    /// (and its sockets) outlive an agent restart, and each generation attaches its `sk_msg`
    /// program to it, replacing the previous one for sockets added from then on.
    pub const SOCKETS: &str = "sd_sockets_v1";
    /// [`crate::SockTuple`] → `u32`, one of [`crate::SOCKET_UNDECIDED`],
    /// [`crate::SOCKET_REDIRECT`], [`crate::SOCKET_TCP`] (hash, `BPF_F_NO_PREALLOC`): every socket
    /// in [`SOCKETS`] and how its sends travel. Added with the socket, removed at its close.
    pub const SOCKET_PATHS: &str = "sd_sock_path_v1";
    /// socket cookie (`u64`) → `u32` (unused) (LRU hash): the proxy's upstream sockets between
    /// `connect()` and their handshake, when `sock_ops` adds them to [`SOCKETS`] (it cannot
    /// read a socket's mark: `bpf_sock_ops` has no socket pointer before Linux 5.10).
    pub const PROXY_UPSTREAM: &str = "sd_proxy_up_v1";
    /// index 0 → [`crate::RedirectStats`] (per-CPU array): what the socket redirect did.
    pub const REDIRECT_STATS: &str = "sd_redir_st_v1";
}

/// Maximum number of service VIP:port:protocol entries.
pub const MAX_SERVICES: u32 = 65_536;
/// Maximum number of alias-table slots over all services (one slot per backend per service, plus
/// the slots of superseded tables awaiting garbage collection).
pub const MAX_SLOTS: u32 = 262_144;
/// Reverse-translation entries (one per steered socket and backend); LRU-evicted. The object's
/// size; the agent sizes the map at load time (`--max-tracked-sockets`, default
/// [`DEFAULT_TRACKED_SOCKETS`]).
pub const MAX_REVNAT: u32 = 262_144;
/// The agent's default size of the reverse-translation map: 7.5 MiB of kernel memory, enough
/// for a busy node's concurrent connections (the previous 262,144 took 30 MiB on every node).
pub const DEFAULT_TRACKED_SOCKETS: u32 = 65_536;
/// Registered destination prefixes (VIPs, endpoint addresses, ServiceEntry address ranges).
pub const MAX_REGISTRY: u32 = 262_144;
/// Distinct refused destinations counted; LRU-evicted beyond this.
pub const MAX_DENIED: u32 = 16_384;
/// Pod cgroups with an outbound policy of their own (one per Pod on the node).
pub const MAX_EGRESS_WORKLOADS: u32 = 16_384;
/// Cgroup levels below the root the connect program looks through for a pod cgroup (kubelet
/// puts pod cgroups at level 2 or 3; nested container runtimes, kind for one, add a few).
pub const MAX_CGROUP_LEVELS: u32 = 12;

/// Destination (workload address, port) entries with an authorization table.
pub const MAX_AUTHZ_DESTINATIONS: u32 = 65_536;
/// Source prefixes over all authorization tables (live and awaiting collection).
pub const MAX_AUTHZ_PREFIXES: u32 = 262_144;
/// Distinct destinations whose refused connections are counted; LRU-evicted beyond this.
pub const MAX_AUTHZ_DENIED: u32 = 16_384;

/// (service, backend) pairs with traffic counters; LRU-evicted beyond this. The object's size;
/// the agent sizes the map at load time (`--max-traffic-counters`, default
/// [`DEFAULT_TRAFFIC_COUNTERS`]).
pub const MAX_STATS: u32 = 65_536;
/// The agent's default size of the traffic counters map: 4.25 MiB of kernel memory, preallocated
/// (an LRU map). Only pairs with traffic from this node take an entry; beyond it the least
/// recently used pair's counters restart from zero, which Prometheus reads as a counter reset.
pub const DEFAULT_TRAFFIC_COUNTERS: u32 = 32_768;
/// Connections redirected to the L7 proxy whose original destination has not been claimed yet.
pub const MAX_L7_PENDING: u32 = 65_536;

/// Node-local sockets of the L7 path the socket redirect tracks (sockets in `sd_sockets`; four
/// per proxied connection whose backend is on the node). Beyond it, new sockets take the TCP path.
pub const MAX_REDIRECT_SOCKETS: u32 = 32_768;

/// The proxy's upstream connections whose handshake is under way (`sd_proxy_up_v1`); LRU, so
/// connects that never complete are forgotten.
pub const MAX_PROXY_UPSTREAM_PENDING: u32 = 4_096;

/// `SO_MARK` the agent's own proxy sockets carry. The programs never steer a marked socket, so
/// the proxy's upstream connections cannot loop back into the proxy (Istio's proxy uses 1337
/// for the same purpose).
pub const PROXY_SOCKET_MARK: u32 = 0x5d00;

/// IP protocol numbers as used in [`ServiceKey::protocol`].
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// A 16-byte IP address in network byte order; IPv4 is stored IPv4-mapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    /// The address as four 32-bit words, each in network byte order (the `user_ip6` layout).
    pub words: [u32; 4],
}

impl Addr {
    /// The IPv4-mapped address for an IPv4 address given in network byte order (`user_ip4`).
    #[inline(always)]
    pub const fn from_ipv4_be(ip4: u32) -> Self {
        Self {
            words: [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4],
        }
    }

    /// Whether this is an IPv4-mapped address (`::ffff:0:0/96`).
    #[inline(always)]
    pub const fn is_ipv4_mapped(&self) -> bool {
        self.words[0] == 0
            && self.words[1] == 0
            && self.words[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
    }

    /// The IPv4 address in network byte order; meaningful only when [`Self::is_ipv4_mapped`].
    #[inline(always)]
    pub const fn ipv4_be(&self) -> u32 {
        self.words[3]
    }
}

/// Key of the services map: a service VIP, port and protocol as the application dials it.
///
/// Map `sd_svc_v1` (hash, `BPF_F_NO_PREALLOC` so a replaced value is RCU-freed and a
/// concurrent reader never sees it reused): [`ServiceKey`] → [`ServiceValue`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Port in network byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub protocol: u8,
    pub _pad: u8,
}

/// The service has no backends: connect() is rejected (EPERM) instead of leaving the machine for
/// an address nobody serves, as Cilium's socket LB does.
pub const SVC_F_NO_BACKENDS: u32 = 1 << 0;

/// The service is routed per request by the agent's L7 proxy: TCP connects go to the proxy
/// address in [`ProxyConfig`] (the alias table stays as the fallback while no proxy is
/// configured).
pub const SVC_F_L7: u32 = 1 << 1;

/// Value of the services map: which alias table currently serves the service.
///
/// The agent never rewrites a live table. It writes a complete new table under a fresh
/// `table_id`, then swaps this value in one map update, and deletes the old table's slots only
/// after a grace period; a concurrent connect() therefore sees either the old or the new table,
/// never a half-written one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Identifies the table's slots in the slots map ([`SlotKey::table_id`]).
    pub table_id: u32,
    /// Number of slots in the table (= number of backends); 0 with [`SVC_F_NO_BACKENDS`].
    pub slot_count: u32,
    /// `SVC_F_*` flags.
    pub flags: u32,
    pub _pad: u32,
}

/// Key of the slots map: one slot of one alias table.
///
/// Map `sd_slot_v1` (hash, `BPF_F_NO_PREALLOC`): [`SlotKey`] → [`Slot`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub table_id: u32,
    /// 0 ≤ slot < [`ServiceValue::slot_count`].
    pub slot: u32,
}

/// A backend address and port (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: Addr,
    pub port: u16,
    pub _pad: u16,
}

/// One column of a Walker/Vose alias table: the kernel draws a slot uniformly, then keeps
/// `primary` when a second uniform 32-bit draw is below `threshold` and takes `alias` otherwise.
/// Two random numbers and one map lookup give an exact weighted pick in O(1), with one slot per
/// backend (a slot ring exact to 1 % would need 100+ slots per service).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Slot {
    pub primary: Backend,
    pub alias: Backend,
    /// Probability of `primary` scaled to 2^32; `u32::MAX` with `primary == alias` means "always".
    pub threshold: u32,
    pub _pad: u32,
}

/// Key of the reverse-translation map, written on every steered connect()/sendmsg(): the socket
/// and the backend it was sent to.
///
/// Map `sd_revnat_v1` (LRU hash): [`RevNatKey`] → [`RevNatValue`]. `getpeername` and
/// `recvmsg` look it up to show the application the VIP it dialled instead of the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    /// `bpf_get_socket_cookie()` of the application's socket.
    pub cookie: u64,
    pub backend: Backend,
    pub _pad: u32,
}

/// The VIP and port the application originally dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatValue {
    pub vip: Addr,
    pub port: u16,
    pub _pad: u16,
}

/// Where L7 connections are sent: the agent's proxy listener on the node's own address, which
/// every pod on the node can reach through its default route.
///
/// Map `sd_proxy_v1` (array, one entry): `0` → [`ProxyConfig`]. `port == 0` means no proxy is
/// running; connects to L7 services then use the service's alias table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// IPv4 listener address, network byte order (0: none).
    pub ipv4: u32,
    /// IPv6 listener address (all zero: none).
    pub ipv6: Addr,
    /// Listener port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// The client side of a connection redirected to the proxy: the address and port the proxy
/// sees as the peer of the accepted socket.
///
/// Map `sd_l7conn_v1` (LRU hash): [`ClientKey`] → [`RevNatValue`] (the VIP the client dialled).
/// Written by the `sock_ops` program when the client's connection is established (it finds the
/// VIP in the socket's reverse entry, `sd_revnat_v1`, written at connect()); the proxy reads and
/// deletes it on accept.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub addr: Addr,
    /// Port in network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Key of the traffic counters: which service a connection dialled and which backend it was
/// sent to.
///
/// Map `sd_stats_v2` (LRU hash): [`StatsKey`] → [`BackendStats`]. Counted by the `sock_ops`
/// program, with atomic adds, for steered TCP connections that the kernel balances (not the ones
/// sent to the L7 proxy, which counts requests itself). One entry for all CPUs: the per-CPU
/// `sd_stats_v1` took `MAX_STATS` × value size × CPUs (11 MiB on 2 CPUs, over 350 MiB on 64).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StatsKey {
    pub service: ServiceKey,
    pub backend: Backend,
}

/// Counters of one (service, backend) pair. Bytes are counted when a connection closes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub connections_opened: u64,
    pub connections_closed: u64,
    /// Bytes the client sent that the backend acknowledged.
    pub bytes_sent: u64,
    /// Bytes the client received from the backend.
    pub bytes_received: u64,
}

/// Istio's `outboundTrafficPolicy` as the kernel enforces it.
///
/// Map `sd_egress_v1` (array, one entry): `0` → [`EgressPolicy`]. With `registry_only` set, a
/// connect() or sendmsg() to an address that is neither a service VIP nor in the registry LPM
/// trie `sd_registry_v1` (key: prefix length + [`Addr`], IPv4 as /96+len of the mapped form)
/// nor loopback fails with EPERM and is counted in `sd_denied_v1` (LRU hash: [`Addr`] → `u64`).
///
/// `registry_only` is the mesh default. Pods whose Sidecar sets a policy of their own have their
/// pod cgroup's id in `sd_egress_wl_v1` (hash: cgroup id `u64` → `u32`, [`EGRESS_ALLOW_ANY`] or
/// [`EGRESS_REGISTRY_ONLY`]); the program looks up the caller's ancestor cgroups, levels 1 to
/// [`MAX_CGROUP_LEVELS`], and the first one found decides instead of the mesh default. It only
/// does so while `workloads` is non-zero (the map has entries), so nodes without per-workload
/// Sidecars pay nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    pub registry_only: u32,
    /// Non-zero while `sd_egress_wl_v1` has entries (was padding: old pins read as 0).
    pub workloads: u32,
}

/// `sd_egress_wl_v1` values.
pub const EGRESS_ALLOW_ANY: u32 = 0;
pub const EGRESS_REGISTRY_ONLY: u32 = 1;

/// A destination of AuthorizationPolicies: a workload address and TCP port.
///
/// Map `sd_authz_dst_v1` (hash): [`AuthzDestKey`] → [`AuthzDestValue`]. The TC program on the
/// node side of each pod's veth looks up every TCP SYN towards the pod by its destination
/// address and port, then by the address with `port == 0` (every port without an entry of its
/// own); no entry means no policy: the SYN passes. Also the key of `sd_authz_dny_v2` (LRU
/// hash → `u64`, shared by all CPUs), which counts refused SYNs per destination (with the real
/// port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuthzDestKey {
    pub addr: Addr,
    /// Port in network byte order; 0 for "any other port".
    pub port: u16,
    pub _pad: u16,
}

/// Which source table decides for a destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AuthzDestValue {
    /// [`AuthzSourceKey::table_id`] of the table's prefixes.
    pub table_id: u32,
    pub _pad: u32,
}

/// The data of an `sd_authz_src_v1` key: a table and a source prefix.
///
/// Map `sd_authz_src_v1` (LPM trie, key `{prefix_len, AuthzSourceKey}`) → `u32`, one of
/// [`AUTHZ_ALLOW`] or [`AUTHZ_DENY`]. Every prefix length covers the 32 bits of `table_id`
/// first, then the address bits: a table's default is its entry of length 32, an IPv4 prefix
/// `a.b.c.d/n` is length `32 + 96 + n` (IPv4-mapped), an IPv6 `/n` is `32 + n`. A table's
/// content never changes under its id: the agent writes a new table under a fresh id, points
/// the destinations at it, and deletes the old prefixes after a grace period, so a SYN never
/// meets a half-written table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuthzSourceKey {
    pub table_id: u32,
    /// Source address.
    pub addr: Addr,
}

/// `sd_authz_src_v1` verdicts.
pub const AUTHZ_ALLOW: u32 = 0;
/// The SYN is answered with a RST|ACK and never reaches the pod.
pub const AUTHZ_DENY: u32 = 1;
/// Prefix bits of [`AuthzSourceKey::table_id`] in every `sd_authz_src_v1` key.
pub const AUTHZ_TABLE_BITS: u32 = 32;

/// A TCP socket's connection as the socket sees it: the key of `sd_sockets` and
/// `sd_sock_paths`. The peer socket of the same connection (both ends on this node) has the
/// [`SockTuple::peer`] key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockTuple {
    pub local: Addr,
    pub remote: Addr,
    /// Ports in network byte order.
    pub local_port: u16,
    pub remote_port: u16,
}

impl SockTuple {
    /// The key of the socket at the other end of the connection.
    #[inline(always)]
    pub const fn peer(&self) -> SockTuple {
        SockTuple {
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// The socket has sent nothing yet: its first send decides its path, for good. Within one
/// direction of a connection the two paths must never mix, since the receiver reads redirected
/// data before unread TCP data.
pub const SOCKET_UNDECIDED: u32 = 0;
/// The peer socket was tracked at the first send: every send goes straight to its receive queue.
pub const SOCKET_REDIRECT: u32 = 1;
/// The peer socket was not tracked at the first send (not on this node, not yet established, or
/// not part of the L7 path): every send takes TCP.
pub const SOCKET_TCP: u32 = 2;

/// Counters of the socket redirect (map `sd_redir_stats`, per CPU; the agent sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectStats {
    /// Sockets added to `sd_sockets`.
    pub sockets: u64,
    /// Sends handed to the peer socket, and their bytes.
    pub redirected_messages: u64,
    pub redirected_bytes: u64,
    /// Sends of tracked sockets that took TCP, and their bytes.
    pub tcp_messages: u64,
    pub tcp_bytes: u64,
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::SockTuple {}
    unsafe impl aya::Pod for super::RedirectStats {}
    unsafe impl aya::Pod for super::AuthzDestKey {}
    unsafe impl aya::Pod for super::AuthzDestValue {}
    unsafe impl aya::Pod for super::AuthzSourceKey {}
    unsafe impl aya::Pod for super::EgressPolicy {}
    unsafe impl aya::Pod for super::Addr {}
    unsafe impl aya::Pod for super::StatsKey {}
    unsafe impl aya::Pod for super::BackendStats {}
    unsafe impl aya::Pod for super::ProxyConfig {}
    unsafe impl aya::Pod for super::ClientKey {}
    // SAFETY: all types are #[repr(C)], Copy, contain only integers and have no implicit padding.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::SlotKey {}
    unsafe impl aya::Pod for super::Slot {}
    unsafe impl aya::Pod for super::RevNatKey {}
    unsafe impl aya::Pod for super::RevNatValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Addr>(), 16);
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<Slot>(), 48);
        assert_eq!(size_of::<RevNatKey>(), 32);
        assert_eq!(size_of::<RevNatValue>(), 20);
        assert_eq!(size_of::<ProxyConfig>(), 24);
        assert_eq!(size_of::<ClientKey>(), 20);
        assert_eq!(size_of::<StatsKey>(), 40);
        assert_eq!(size_of::<BackendStats>(), 32);
        assert_eq!(size_of::<AuthzDestKey>(), 20);
        assert_eq!(size_of::<AuthzDestValue>(), 8);
        assert_eq!(size_of::<AuthzSourceKey>(), 20);
        assert_eq!(size_of::<SockTuple>(), 36);
        assert_eq!(size_of::<RedirectStats>(), 40);
    }

    #[test]
    fn a_sockets_peer_key_swaps_the_ends() {
        let t = SockTuple {
            local: Addr::from_ipv4_be(1),
            remote: Addr::from_ipv4_be(2),
            local_port: 3,
            remote_port: 4,
        };
        let p = t.peer();
        assert_eq!((p.local, p.remote), (t.remote, t.local));
        assert_eq!((p.local_port, p.remote_port), (4, 3));
        assert_eq!(p.peer(), t);
    }

    #[test]
    fn ipv4_mapped_roundtrip() {
        let ip = u32::from_ne_bytes([10, 96, 0, 1]);
        let a = Addr::from_ipv4_be(ip);
        assert!(a.is_ipv4_mapped());
        assert_eq!(a.ipv4_be(), ip);
        let bytes: [u8; 4] = a.words[2].to_ne_bytes();
        assert_eq!(bytes, [0, 0, 0xff, 0xff]);
    }
}
