//! End-to-end test harness for steerd.
//!
//! Everything here needs root and creates only namespaced, uniquely named resources (netns
//! `sdt<pid>n<k>`, cgroups and bpffs dirs `steerd-test-<pid>n<k>`), each removed on drop.
//! Traffic only goes to loopback or to hosts in namespaces created here: a [`Node`] netns with no
//! default route and [`Pod`] netns behind it, so anything a test dials that is not steered dies
//! in the node.
//!
//! Setup helpers panic with a descriptive message on failure: in a test, a broken fixture is a
//! failed test.
//!
//! A typical test (locals drop in reverse order, so declare the fixtures first):
//!
//! ```text
//! let node = Node::new();
//! let backend = node.add_pod("backend");
//! let _server = TcpIdentityServer::start(&backend, backend.sock_v4(8080), "backend");
//! let client_cgroup = TestCgroup::new();
//! let bpffs = BpffsDir::new();
//! let services = TempDir::new("steerd-services");
//! services.write("svc.yaml", "...");
//! let mut agent = Agent::spawn(&node, &["run", "--source", &format!("files:{}", services.as_str()),
//!     "--bpffs", bpffs.as_str(), "--cgroup", client_cgroup.path().to_str().unwrap(),
//!     "--admin", &admin_addr().to_string()]);
//! agent.wait_ready(admin_addr(), Duration::from_secs(10));
//! let result = run_probe(Some(&node.netns), Some(&client_cgroup),
//!     &["tcp", "--to", "10.96.0.10:80", "--count", "200"]);
//! assert_split(&result.counts, &[("backend", 1.0)], 4.0);
//! ```

pub mod agent;
pub mod cgroup;
pub mod http;
pub mod netns;
pub mod probe;
pub mod process;
pub mod servers;
pub mod stats;
pub mod topology;
pub mod util;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

pub use agent::{
    Agent, BpffsDir, admin_get, ensure_bpffs_mounted, http_get_status, metric_sum, steerd_bin,
};
pub use cgroup::{TestCgroup, cgroup2_mount};
pub use http::{
    HttpIdentityServer, HttpLatency, HttpProbeHandle, HttpProbeResult, HttpSample, RecordedRequest,
    http_probe_bin, run_http_probe, run_http_probe_with, spawn_http_probe, spawn_http_probe_with,
};
pub use netns::{Netns, run_in_path};
pub use probe::{
    ProbeHandle, ProbeResult, probe_bin, run_probe, run_probe_with, spawn_probe, spawn_probe_with,
};
pub use process::{ChildGuard, describe_status, spawn_in, wait_with_timeout};
pub use servers::{TcpIdentityServer, UdpIdentityServer};
pub use stats::{assert_split, check_split};
pub use topology::{Node, POD_IFNAME, Pod};
pub use util::{TempDir, unique_suffix, wait_until};

/// A fixed admin port for the agent. Ports only collide within one netns and every test has its
/// own node netns, so parallel tests can all use this one.
pub const ADMIN_PORT: u16 = 15000;

/// `127.0.0.1:ADMIN_PORT`.
pub fn admin_addr() -> SocketAddr {
    (Ipv4Addr::LOCALHOST, ADMIN_PORT).into()
}

/// A TCP port on 127.0.0.1 that is free in `netns` right now (the kernel picks it). Only needed
/// when one netns hosts several listeners; otherwise [`ADMIN_PORT`] will do.
pub fn free_port(netns: &impl AsRef<netns::Netns>) -> u16 {
    netns.as_ref().run_in(|| {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("binding 127.0.0.1:0: {e}"))
    })
}
