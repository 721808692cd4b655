//! The L7 path end to end: a client pod's connect() to an HTTP service VIP is redirected by the
//! kernel to the agent's proxy on the node address, the proxy recovers the original VIP from the
//! kernel's records and routes each request to a backend pod.
//!
//! Topology (per the safety rules): a node netns with no default route, where the agent runs
//! and the node address lives on its loopback; pod netns behind veth pairs whose default
//! route is the node. Clients run in a client pod, inside the steered test cgroup.

use std::time::Duration;
use steerd_e2e::{
    Agent, BpffsDir, HttpIdentityServer, HttpProbeResult, Node, Pod, TempDir, TestCgroup,
    admin_addr, assert_split, run_http_probe,
};

const NODE_IP4: &str = "10.250.0.1";
const NODE_IP6: &str = "fd00:250::1";
const VIP4: &str = "10.96.0.50";
const VIP6: &str = "fd00:96::50";

struct Mesh {
    agent: Agent,
    manifests: TempDir,
    client_cgroup: TestCgroup,
    _bpffs: BpffsDir,
    servers: Vec<HttpIdentityServer>,
    client: Pod,
    backends: Vec<Pod>,
    node: Node,
}

fn pod_manifest(name: &str, version: &str, pod: &Pod) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: reviews, version: {version}}}}}\nstatus: {{phase: Running, podIP: {}, podIPs: [{{ip: {}}}, {{ip: \"{}\"}}]}}\n---\n",
        pod.ipv4, pod.ipv4, pod.ipv6
    )
}

impl Mesh {
    /// A client pod and backends `reviews` v1/v2/v3 (HTTP on 9080), plus `extra` manifests.
    fn start(extra: &[(&str, &str)]) -> Mesh {
        let node = Node::new();
        // The node's own address, reachable from every pod through its default route (on the
        // node's loopback: this kernel has no dummy interfaces).
        node.netns
            .ip(&["addr", "add", &format!("{NODE_IP4}/32"), "dev", "lo"]);
        node.netns.ip(&[
            "addr",
            "add",
            &format!("{NODE_IP6}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
        let client = node.add_pod("client");
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        // The client is a Pod too, so the proxy can name it (sourceLabels, source_workload).
        let mut pods = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: client, labels: {{app: client, version: v1}}}}\nstatus: {{podIP: {}, podIPs: [{{ip: {}}}, {{ip: \"{}\"}}]}}\n---\n",
            client.ipv4, client.ipv4, client.ipv6
        );
        for version in ["v1", "v2", "v3"] {
            let pod = node.add_pod(&format!("reviews-{version}"));
            servers.push(HttpIdentityServer::start(
                &pod,
                pod.sock_v4(9080),
                &format!("reviews-{version}"),
            ));
            servers.push(HttpIdentityServer::start(
                &pod,
                pod.sock_v6(9080),
                &format!("reviews-{version}"),
            ));
            pods += &pod_manifest(
                &format!("reviews-{version}-5b9c8d7f6d-abcde"),
                version,
                &pod,
            );
            backends.push(pod);
        }
        let manifests = TempDir::new("steerd-l7");
        manifests.write(
            "reviews.yaml",
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews}}\nspec:\n  clusterIPs: [{VIP4}, \"{VIP6}\"]\n  selector: {{app: reviews}}\n  ports: [{{name: http, port: 9080}}]\n---\n{pods}"
            ),
        );
        for (name, text) in extra {
            manifests.write(name, text);
        }
        let client_cgroup = TestCgroup::new();
        let bpffs = BpffsDir::new();
        let source = format!("files:{}", manifests.as_str());
        let admin = admin_addr().to_string();
        let mut agent = Agent::spawn(
            &node,
            &[
                "run",
                "--source",
                &source,
                "--bpffs",
                bpffs.as_str(),
                "--cgroup",
                client_cgroup.path().to_str().unwrap(),
                "--admin",
                &admin,
                "--node-ip",
                NODE_IP4,
                "--node-ip",
                NODE_IP6,
            ],
        );
        agent.wait_ready(admin_addr(), Duration::from_secs(20));
        Mesh {
            agent,
            manifests,
            client_cgroup,
            _bpffs: bpffs,
            servers,
            client,
            backends,
            node,
        }
    }

    fn admin_get(&self, path: &str) -> String {
        self.node.netns.run_in(|| {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(admin_addr()).expect("admin listener");
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default()
        })
    }

    fn http(&self, args: &[&str]) -> HttpProbeResult {
        run_http_probe(Some(&self.client.netns), Some(&self.client_cgroup), args)
    }
}

#[test]
fn http_service_is_proxied_with_the_vip_recovered() {
    let m = Mesh::start(&[]);
    for (url, host) in [
        (
            format!("http://{VIP4}:9080/reviews/1"),
            format!("{VIP4}:9080"),
        ),
        (
            format!("http://[{VIP6}]:9080/reviews/1"),
            format!("[{VIP6}]:9080"),
        ),
    ] {
        let r = m.http(&["--url", &url, "--count", "300"]);
        assert_eq!(r.failures, 0, "{url}: {r:?}\n{}", m.agent.log());
        assert_eq!(r.status(200), 300, "{url}: {r:?}");
        // No route: every endpoint of the service, evenly.
        assert_split(
            &r.counts,
            &[
                ("reviews-v1", 1.0 / 3.0),
                ("reviews-v2", 1.0 / 3.0),
                ("reviews-v3", 1.0 / 3.0),
            ],
            4.0,
        );
        let sample = r.sample.expect("a response");
        assert_eq!(
            sample.body["host"],
            host.as_str(),
            "the client's Host reaches the backend"
        );
        assert_eq!(sample.body["path"], "/reviews/1");
    }
    // The backends saw the proxy (on the node), never the client pod: requests went through it.
    let client_ip = m.client.ipv4.to_string();
    for s in &m.servers {
        assert!(
            s.received()
                .iter()
                .all(|r| r.peer.ip().to_string() != client_ip)
        );
    }

    // `steerd inspect` shows the agent's view in istioctl proxy-config form.
    let inspect = |what: &str, extra: &[&str]| {
        let mut args = vec!["inspect", what, "--admin", "127.0.0.1:15000"];
        args.extend_from_slice(extra);
        let out = Agent::run_cli(&m.node, &args);
        assert!(
            out.status.success(),
            "inspect {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listeners = inspect("listeners", &[]);
    assert!(
        listeners.lines().any(|l| l.starts_with(VIP4)
            && l.contains(" L7 ")
            && l.contains("reviews.default.svc.cluster.local")),
        "{listeners}"
    );
    let clusters = inspect("clusters", &["--fqdn", "reviews"]);
    assert!(clusters.starts_with("SERVICE FQDN"), "{clusters}");
    assert!(
        clusters.contains("reviews.default.svc.cluster.local  9080  -       outbound   EDS"),
        "{clusters}"
    );
    let endpoints = inspect("endpoints", &[]);
    for pod in &m.backends {
        let line = format!("{}:9080", pod.ipv4);
        assert!(
            endpoints.lines().any(|l| l.starts_with(&line)
                && l.contains("HEALTHY")
                && l.contains(" OK ")
                && l.ends_with("outbound|9080||reviews.default.svc.cluster.local")),
            "{line} missing:\n{endpoints}"
        );
    }
    let routes: serde_json::Value =
        serde_json::from_str(&inspect("routes", &["-o", "json"])).unwrap();
    assert_eq!(routes[0]["name"], "9080", "{routes:#}");
    assert_eq!(routes[0]["rules"][0]["matches"][0], "*", "{routes:#}");
    assert_eq!(
        routes[0]["rules"][0]["destinations"][0]["cluster"],
        "outbound|9080||reviews.default.svc.cluster.local"
    );

    // Istio's request metrics, labelled with the client pod and the backend's version.
    let metrics = m.admin_get("/metrics");
    let ok_v1: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("response_code=\"200\"")
                && l.contains("destination_version=\"v1\"")
                && l.contains("source_workload=\"client\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let v1_served = (m.servers[0].requests() + m.servers[1].requests()) as f64;
    assert_eq!(ok_v1, v1_served, "{metrics}");
}

#[test]
fn http2_and_keepalive_downstream() {
    let m = Mesh::start(&[]);
    let url = format!("http://{VIP4}:9080/");
    let h2 = m.http(&[
        "--url",
        &url,
        "--count",
        "200",
        "--h2",
        "--concurrency",
        "4",
    ]);
    assert_eq!(h2.status(200), 200, "{h2:?}\n{}", m.agent.log());
    // One downstream connection carries every request, yet each request is balanced.
    assert_split(
        &h2.counts,
        &[
            ("reviews-v1", 1.0 / 3.0),
            ("reviews-v2", 1.0 / 3.0),
            ("reviews-v3", 1.0 / 3.0),
        ],
        4.0,
    );
    let ka = m.http(&["--url", &url, "--count", "200", "--keepalive"]);
    assert_eq!(ka.status(200), 200, "{ka:?}");
    assert_eq!(ka.connections, 1, "{ka:?}");
    assert_eq!(
        ka.counts.len(),
        3,
        "per-request balancing on one connection: {ka:?}"
    );
}

#[test]
fn without_a_node_address_http_falls_back_to_per_connection_balancing() {
    // Same service, but the proxy is withdrawn: the agent is restarted without --node-ip... the
    // simplest way to get there is a clean stop, which withdraws the proxy from the kernel.
    let mut m = Mesh::start(&[]);
    m.agent.terminate(Duration::from_secs(10));
    let r = m.http(&["--url", &format!("http://{VIP4}:9080/"), "--count", "150"]);
    assert_eq!(
        r.status(200),
        150,
        "pinned programs keep balancing per connection: {r:?}"
    );
    assert_eq!(r.counts.len(), 3, "{r:?}");
    let _ = &m.manifests;
}
