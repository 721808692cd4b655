//! `cargo xtask demo`: the agent over the bundled examples, steering real connections.
//!
//! A throw-away node network namespace (no default route) hosts the agent; two pod namespaces
//! host Istio's tcp-echo v1 and v2 at the Pod IPs that `examples/tcp-echo.yaml` declares. Clients
//! in a dedicated cgroup dial the service VIP; everything is removed at the end.

use anyhow::{Result, ensure};
use std::collections::BTreeMap;
use std::time::Duration;
use steerd_e2e::{
    Agent, BpffsDir, Node, ProbeResult, TcpIdentityServer, TestCgroup, admin_addr, run_probe,
};

/// Connects per VIP; `STEERD_DEMO_CONNECTS` overrides.
fn connects() -> u64 {
    std::env::var("STEERD_DEMO_CONNECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn show(title: &str, r: &ProbeResult) {
    println!(
        "\n{title}: {} connects, {} failed",
        r.attempts.max(r.successes() + r.failures),
        r.failures
    );
    let counts: BTreeMap<_, _> = r.counts.iter().collect();
    let total = r.successes().max(1) as f64;
    for (id, n) in counts {
        println!("  {id:<22} {n:>5}  {:>5.1}%", *n as f64 * 100.0 / total);
    }
    println!(
        "  getpeername showed the VIP on every connection: {}",
        if r.peer_mismatches == 0 { "yes" } else { "NO" }
    );
}

pub fn run() -> Result<()> {
    let examples = crate::workspace_root().join("examples");
    println!("building steerd and setting up a node with two tcp-echo pods ...");
    let node = Node::new();
    let v1 = node.add_pod("tcp-echo-v1");
    let v2 = node.add_pod("tcp-echo-v2");
    // examples/tcp-echo.yaml names these Pod IPs; the harness hands them out in this order.
    ensure!(
        v1.ipv4.to_string() == "10.244.1.2" && v2.ipv4.to_string() == "10.244.2.2",
        "pod addresses {} / {} do not match examples/tcp-echo.yaml",
        v1.ipv4,
        v2.ipv4
    );
    let mut servers = Vec::new();
    for (pod, version) in [(&v1, "v1"), (&v2, "v2")] {
        for port in [9000, 9001] {
            let id = format!("tcp-echo-{version} :{port}");
            servers.push(TcpIdentityServer::start(pod, pod.sock_v4(port), &id));
            servers.push(TcpIdentityServer::start(pod, pod.sock_v6(port), &id));
        }
    }
    let clients = TestCgroup::new();
    let bpffs = BpffsDir::new();
    let source = format!("files:{}", examples.display());
    let admin = admin_addr().to_string();
    let args = [
        "run",
        "--source",
        &source,
        "--bpffs",
        bpffs.as_str(),
        "--cgroup",
        clients.path().to_str().expect("cgroup path is UTF-8"),
        "--admin",
        &admin,
    ];
    println!("$ steerd {}", args.join(" "));
    let mut agent = Agent::spawn(&node, &args);
    agent.wait_ready(admin_addr(), Duration::from_secs(30));
    println!("agent ready (/readyz = 200)");

    let maps = Agent::run_cli(&node, &["maps", "backends", "--bpffs", bpffs.as_str()]);
    println!(
        "\n$ steerd maps backends\n{}",
        String::from_utf8_lossy(&maps.stdout)
    );

    let count = connects().to_string();
    let v4 = run_probe(
        Some(&node.netns),
        Some(&clients),
        &["tcp", "--to", "10.96.0.20:9000", "--count", &count],
    );
    show(
        "tcp-echo 10.96.0.20:9000 (VirtualService tcp-echo: 80% v1, 20% v2)",
        &v4,
    );
    let v6 = run_probe(
        Some(&node.netns),
        Some(&clients),
        &["tcp", "--to", "[fd00:96::20]:9000", "--count", &count],
    );
    show("tcp-echo [fd00:96::20]:9000 (same route, IPv6)", &v6);
    let other = run_probe(
        Some(&node.netns),
        Some(&clients),
        &["tcp", "--to", "10.96.0.20:9001", "--count", &count],
    );
    show(
        "tcp-echo 10.96.0.20:9001 (no route for this port: all endpoints)",
        &other,
    );
    let outside = run_probe(
        Some(&node.netns),
        None,
        &[
            "tcp",
            "--to",
            "10.96.0.20:9000",
            "--count",
            "3",
            "--timeout-ms",
            "300",
        ],
    );
    println!(
        "\noutside the steered cgroup the VIP is not translated: {} of 3 connects failed in the node namespace",
        outside.failures
    );

    ensure!(
        v4.failures == 0 && v6.failures == 0 && other.failures == 0,
        "steered connects failed; agent log:\n{}",
        agent.log()
    );
    println!("\ndone; removing the namespaces, cgroup and pins");
    drop(agent);
    Ok(())
}
