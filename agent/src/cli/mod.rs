//! Command-line interface: `steerd run | maps | cleanup | version`.

pub mod check;
pub mod inspect;
pub mod maps;
pub mod run;

use crate::sources::SourceSpec;
use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/steerd";

#[derive(Debug, Parser)]
#[command(
    name = "steerd",
    version,
    about = "Istio traffic steering for Kubernetes nodes, in eBPF"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutboundPolicy {
    #[value(name = "ALLOW_ANY")]
    AllowAny,
    #[value(name = "REGISTRY_ONLY")]
    RegistryOnly,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum CheckOutput {
    #[default]
    Text,
    Json,
    Yaml,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: watch configuration, compile it, keep the kernel maps in sync.
    Run(RunArgs),
    /// Print the pinned maps of a running (or killed) agent.
    Maps {
        #[arg(value_enum)]
        table: MapsTable,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Validate and analyze manifests like `istioctl analyze` (exit 0: no errors, 1: errors,
    /// 2: could not run).
    Check {
        /// Files or directories of manifests (applied together).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(short, long, value_enum, default_value_t)]
        output: CheckOutput,
    },
    /// Show where one request (or TCP connection) goes, evaluated exactly as the agent routes it.
    Explain(check::ExplainArgs),
    /// Show a running agent's listeners, routes, clusters, endpoints (like `istioctl
    /// proxy-config`) or AuthorizationPolicies, from its admin API.
    Inspect {
        #[arg(value_enum)]
        what: inspect::What,
        /// Only this service host (FQDN or a prefix of it, e.g. `reviews`); for `authz`, the
        /// policies of this workload (`namespace/name` or a prefix of the name).
        #[arg(long)]
        fqdn: Option<String>,
        #[arg(long)]
        port: Option<u16>,
        #[arg(long)]
        subset: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
        /// The agent's admin listener.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
    },
    /// Detach the programs and remove every map and link pinned under --bpffs (uninstall).
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Print the version.
    Version,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MapsTable {
    /// One row per service VIP:port:protocol.
    Services,
    /// One row per service backend, with the share of connections the kernel gives it.
    Backends,
    /// The outbound traffic policy, the registered destinations and REGISTRY_ONLY refusals.
    Egress,
    /// AuthorizationPolicy destinations with their source tables, and refused connections.
    Authz,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Configuration source: `files:DIR` (watched), `kube` (the API server, watched) or
    /// `builtin` (the bundled examples). Repeat to merge several sources.
    #[arg(long = "source", default_value = "builtin")]
    pub sources: Vec<SourceSpec>,
    /// Kubeconfig for `--source kube`. Default: `$KUBECONFIG`, then `~/.kube/config`, then the
    /// in-cluster service account (a Pod's mounted token and `KUBERNETES_SERVICE_HOST`).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Where maps and links are pinned.
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// The cgroup (v2) whose processes are steered; default: the cgroup2 root.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// The node's own address(es), where the L7 proxy listens and the kernel sends L7
    /// connections (in the DaemonSet: the downward API's `status.hostIP`). Repeat for IPv4 and
    /// IPv6. Default: the address of the interface holding the IPv4 default route; with no
    /// address the L7 proxy is off and HTTP services are balanced per connection.
    #[arg(long = "node-ip")]
    pub node_ips: Vec<std::net::IpAddr>,
    /// This node's locality, `region/zone/subzone`, for locality load balancing in the L7
    /// proxy. Default: the topology labels of the Node `--node-name` (with `--source kube`),
    /// followed as they change. Without either, endpoints are balanced without regard to
    /// locality.
    #[arg(long, env = "STEERD_LOCALITY")]
    pub locality: Option<String>,
    /// The name of the Node this agent runs on (in the DaemonSet: the downward API's
    /// `spec.nodeName`): its topology labels are the agent's locality unless `--locality` is
    /// given.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The mesh's default `outboundTrafficPolicy` (meshConfig). A Sidecar without
    /// workloadSelector in the root namespace (istio-system) overrides it, as in Istio.
    #[arg(long, value_enum)]
    pub outbound_traffic_policy: Option<OutboundPolicy>,
    /// Port of the L7 proxy listener on the node addresses.
    #[arg(long, default_value_t = 15001)]
    pub proxy_port: u16,
    /// Serve an Istio Gateway (`ns/name`, or `name` in namespace `default`): the ports of its
    /// servers are bound on the node addresses (or `server.bind`) and routed with the
    /// VirtualServices bound to it (HTTP, HTTPS/TLS with SIMPLE or PASSTHROUGH, TCP). Repeat to
    /// serve several Gateways; needs a node address.
    #[arg(long = "gateway", value_name = "NS/NAME")]
    pub gateways: Vec<String>,
    /// Admin listener (probes, debug views).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    #[arg(long, value_enum, default_value_t)]
    pub log_format: LogFormat,
    /// Interfaces (globs, `*` and `?`) whose egress enforces AuthorizationPolicies for TCP: the
    /// node side of pod veths. Repeat for several. Default: the host-side veth names of common
    /// CNIs (`veth*`, `cali*`, `lxc*`, `eni*`, `gke*`, `azv*`); `none` turns TCP enforcement
    /// off (the L7 proxy still enforces HTTP). Needs Linux ≥ 6.6 (TCX).
    #[arg(long = "policy-interface", value_name = "GLOB")]
    pub policy_interfaces: Vec<String>,
    /// How many steered sockets the kernel remembers the dialled VIP of (for `getpeername`,
    /// UDP replies and telemetry); the least recently used are forgotten beyond it, and such a
    /// socket then sees its backend's address. 120 bytes each. Takes effect when the map is
    /// first created (after `steerd cleanup`); a running node keeps its pinned map's size.
    #[arg(long, env = "STEERD_MAX_TRACKED_SOCKETS", default_value_t = steerd_common::DEFAULT_TRACKED_SOCKETS)]
    pub max_tracked_sockets: u32,
    /// How many (service, backend) pairs the kernel keeps traffic counters for (the
    /// `istio_tcp_*` metrics); beyond it the least recently used pair's counters are dropped
    /// and restart from zero (a counter reset to Prometheus). 136 bytes each, preallocated.
    /// Takes effect when the map is first created (after `steerd cleanup`).
    #[arg(long, env = "STEERD_MAX_TRAFFIC_COUNTERS", default_value_t = steerd_common::DEFAULT_TRAFFIC_COUNTERS)]
    pub max_traffic_counters: u32,
    /// Hand the L7 path's data between node-local sockets in the kernel (sockhash + `sk_msg`,
    /// as Cilium's and Merbridge's socket acceleration): a client's connection to the proxy,
    /// and the proxy's connection to a backend on this node, skip TCP/IP and the veth. Only
    /// sockets the agent's programs see are tracked: with `--cgroup` below the root, the
    /// agent and the backends must run under it too for their ends to take part. Off by
    /// default: redirected data has no TCP flow control, so a receiver that stops reading
    /// lets its peer queue without bound (charged to the receiver's memory cgroup).
    #[arg(long, env = "STEERD_SOCKET_REDIRECT", default_value_t = false, action = clap::ArgAction::Set)]
    pub socket_redirect: bool,
    /// Nameserver (`IP[:PORT]`) for ServiceEntries with `resolution: DNS`/`DNS_ROUND_ROBIN`.
    /// Default: the system's (/etc/resolv.conf).
    #[arg(long, value_parser = crate::sources::dns::parse_server)]
    pub dns_server: Option<SocketAddr>,
    /// Where the agent keeps state that must outlive it in regular files (bpffs cannot hold
    /// them): the last DNS answers, so that a restarted agent steers DNS ServiceEntries even
    /// while DNS is down.
    #[arg(long, default_value = "/run/steerd")]
    pub state_dir: PathBuf,
    /// Worker threads of the L7 proxy (each a single-threaded event loop with its own listener).
    /// Default: the CPUs the agent may use (its CPU affinity and cgroup CPU quota).
    #[arg(long, env = "STEERD_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
}

/// Worker threads for the L7 proxy: `configured`, else what [`std::thread::available_parallelism`]
/// reports (which honours `sched_setaffinity`/`taskset` and the cgroup v2 `cpu.max` quota, so a
/// DaemonSet with a CPU limit of 1 gets one worker: more threads than cores only add wake-ups
/// and context switches on the request path).
pub fn worker_threads(configured: Option<u16>) -> usize {
    configured.map_or_else(
        || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        usize::from,
    )
}

/// The cgroup2 mount point, from /proc/self/mounts.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// The address of the interface that holds the IPv4 default route (the node's primary
/// address), from /proc/net/route and getifaddrs.
pub fn default_node_ip() -> Option<std::net::IpAddr> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    let iface = routes.lines().skip(1).find_map(|l| {
        let mut f = l.split_whitespace();
        let (iface, dest) = (f.next()?, f.next()?);
        (dest == "00000000").then(|| iface.to_string())
    })?;
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        if a.interface_name != iface {
            return None;
        }
        let sin = a.address?.as_sockaddr_in()?.ip();
        Some(std::net::IpAddr::V4(sin))
    })
}
