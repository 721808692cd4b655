//! A model of a Kubernetes node: a node netns (where the agent runs) with no default route, and
//! pod netns joined to it by veth pairs.
//!
//! Addressing, for the pod with index k (1, 2, ... in order of `add_pod`):
//! - pod `eth0`: 10.244.k.2/24 and fd00:244:k::2/64 (k written as a hex group), default routes
//!   via the node side;
//! - node `veth<k>`: 10.244.k.1/24 and fd00:244:k::1/64.
//!
//! The node has only the connected routes to its pods, so anything else (a service VIP that
//! nothing steers) is unroutable there: from the node it fails with ENETUNREACH, from a pod it
//! is answered with an ICMP unreachable by the node. Nothing leaves the machine.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};

use crate::netns::Netns;

/// The node namespace. Forwarding is on (v4 and v6), DAD is off.
#[derive(Debug)]
pub struct Node {
    pub netns: Netns,
    next_pod_index: AtomicU8,
}

/// A pod namespace attached to a [`Node`]. Dropping it deletes its netns, which also removes
/// the veth pair (and so the node's connected routes to it).
#[derive(Debug)]
pub struct Pod {
    /// The label given to `add_pod`; the netns has a generated short name.
    pub name: String,
    pub netns: Netns,
    /// 1-based position of the pod on its node; selects the subnets.
    pub index: u8,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The node side of the veth (the pod's default gateway).
    pub node_ipv4: Ipv4Addr,
    pub node_ipv6: Ipv6Addr,
    /// Interface name of the node side of the veth (in the node netns); the pod side is `eth0`.
    pub node_ifname: String,
    node_netns_name: String,
}

/// Interface name of the pod side of every veth.
pub const POD_IFNAME: &str = "eth0";

impl Node {
    pub fn new() -> Node {
        let netns = Netns::new();
        netns.sysctl("net.ipv4.ip_forward", "1");
        netns.sysctl("net.ipv6.conf.all.forwarding", "1");
        netns.sysctl("net.ipv6.conf.default.forwarding", "1");
        disable_dad(&netns);
        Node {
            netns,
            next_pod_index: AtomicU8::new(1),
        }
    }

    /// Creates a pod netns, wires it to the node with a veth pair and configures addresses and
    /// routes (see the module docs). Up to 254 pods per node.
    pub fn add_pod(&self, name: &str) -> Pod {
        let index = self.next_pod_index.fetch_add(1, Ordering::Relaxed);
        assert!(
            (1..=254).contains(&index),
            "too many pods on node {}",
            self.netns.name()
        );
        let netns = Netns::new();
        // Interfaces take the namespace's `default` settings when they are created, so this has
        // to precede the veth.
        disable_dad(&netns);

        let node_ifname = format!("veth{index}");
        let ipv4 = Ipv4Addr::new(10, 244, index, 2);
        let node_ipv4 = Ipv4Addr::new(10, 244, index, 1);
        let ipv6 = Ipv6Addr::new(0xfd00, 0x244, index.into(), 0, 0, 0, 0, 2);
        let node_ipv6 = Ipv6Addr::new(0xfd00, 0x244, index.into(), 0, 0, 0, 0, 1);

        // Both ends are created directly in their namespaces, so nothing ever appears in (or can
        // collide with names in) the root namespace.
        self.netns.ip(&[
            "link",
            "add",
            &node_ifname,
            "type",
            "veth",
            "peer",
            "name",
            POD_IFNAME,
            "netns",
            netns.name(),
        ]);
        // Links go up before the addresses are added: IPv6 addresses that exist when a link
        // comes up go through (skipped) DAD from a work queue that runs up to a second later,
        // and until then neighbour discovery for them fails and first connects stall for 1 s.
        let node_ns = &self.netns;
        node_ns.ip(&["link", "set", &node_ifname, "up"]);
        netns.ip(&["link", "set", POD_IFNAME, "up"]);
        node_ns.ip(&[
            "addr",
            "add",
            &format!("{node_ipv4}/24"),
            "dev",
            &node_ifname,
        ]);
        node_ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{node_ipv6}/64"),
            "dev",
            &node_ifname,
            "nodad",
        ]);
        netns.ip(&["addr", "add", &format!("{ipv4}/24"), "dev", POD_IFNAME]);
        netns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ipv6}/64"),
            "dev",
            POD_IFNAME,
            "nodad",
        ]);
        netns.ip(&["route", "add", "default", "via", &node_ipv4.to_string()]);
        netns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &node_ipv6.to_string(),
        ]);

        Pod {
            name: name.to_owned(),
            netns,
            index,
            ipv4,
            ipv6,
            node_ipv4,
            node_ipv6,
            node_ifname,
            node_netns_name: self.netns.name().to_owned(),
        }
    }
}

impl Default for Node {
    fn default() -> Self {
        Node::new()
    }
}

impl Pod {
    /// `ipv4:port`.
    pub fn sock_v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ipv4.into(), port)
    }

    /// `[ipv6]:port`.
    pub fn sock_v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ipv6.into(), port)
    }

    /// Adds `addr/32` to the pod's `eth0` and a node route to it via the pod.
    pub fn add_ipv4(&self, addr: Ipv4Addr) {
        self.netns
            .ip(&["addr", "add", &format!("{addr}/32"), "dev", POD_IFNAME]);
        self.node_ip(&[
            "route",
            "add",
            &format!("{addr}/32"),
            "via",
            &self.ipv4.to_string(),
            "dev",
            &self.node_ifname,
        ]);
    }

    /// Adds `addr/128` to the pod's `eth0` and a node route to it via the pod.
    pub fn add_ipv6(&self, addr: Ipv6Addr) {
        self.netns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr}/128"),
            "dev",
            POD_IFNAME,
            "nodad",
        ]);
        self.node_ip(&[
            "-6",
            "route",
            "add",
            &format!("{addr}/128"),
            "via",
            &self.ipv6.to_string(),
            "dev",
            &self.node_ifname,
        ]);
    }

    fn node_ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.node_netns_name.as_str()];
        full.extend_from_slice(args);
        crate::util::run_cmd("ip", &full).unwrap_or_else(|e| panic!("{e:#}"));
    }
}

impl AsRef<Netns> for Node {
    fn as_ref(&self) -> &Netns {
        &self.netns
    }
}

impl AsRef<Netns> for Pod {
    fn as_ref(&self) -> &Netns {
        &self.netns
    }
}

/// Makes IPv6 addresses usable at once (no tentative state), including link-local ones of
/// interfaces created later in `netns`.
fn disable_dad(netns: &Netns) {
    netns.sysctl("net.ipv6.conf.all.accept_dad", "0");
    netns.sysctl("net.ipv6.conf.default.accept_dad", "0");
}
