//! steerd's kernel programs.
//!
//! Cgroup `sock_addr` hooks translate a service VIP:port into a backend once per connection (TCP
//! and connected UDP: `connect4/6`) or per message of an unconnected UDP socket (`sendmsg4/6`),
//! so established traffic flows directly between the application and the backend with no
//! per-packet work. The reverse hooks (`getpeername4/6`, `recvmsg4/6`) show the application the
//! VIP it dialled, never the backend it was sent to.
//!
//! All policy lives in the agent: these programs only look up the tables it writes (see
//! `steerd-common` for every key and value).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, bpf_sock_addr},
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use steerd_common::{
    Addr, Backend, MAX_REVNAT, MAX_SERVICES, MAX_SLOTS, PROTO_TCP, PROTO_UDP, RevNatKey,
    RevNatValue, SVC_F_NO_BACKENDS, ServiceKey, ServiceValue, Slot, SlotKey,
};

// Map names must match `steerd_common::map_names` (the attribute takes a literal).
#[map(name = "sd_svc_v1")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

#[map(name = "sd_slot_v1")]
static SLOTS: HashMap<SlotKey, Slot> = HashMap::pinned(MAX_SLOTS, BPF_F_NO_PREALLOC);

#[map(name = "sd_revnat_v1")]
static REVNAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::pinned(MAX_REVNAT, 0);

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
    let (addr, port) = if v6 { dest6(sa) } else { dest4(sa) };
    let key = ServiceKey {
        addr,
        port,
        protocol,
        _pad: 0,
    };
    let cookie = cookie(ctx);
    let draw = if sticky {
        Draw::Sticky(cookie)
    } else {
        Draw::Random
    };
    match pick(&key, draw) {
        Verdict::Pass => ALLOW,
        Verdict::Reject => {
            debug!(ctx, "steerd: rejected connect to service without backends");
            REJECT
        }
        Verdict::Steer(backend) => {
            if v6 {
                set_dest6(sa, &backend.addr, backend.port);
            } else if backend.addr.is_ipv4_mapped() {
                set_dest4(sa, &backend.addr, backend.port);
            } else {
                // An IPv4 socket cannot reach an IPv6 backend; the compiler never pairs them.
                return ALLOW;
            }
            remember_vip(cookie, &backend, &key);
            ALLOW
        }
    }
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
