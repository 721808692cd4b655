//! The L7 path's in-kernel socket redirect: with the agent and the backends running below the
//! steered cgroup (as on a node where the programs steer the root cgroup), a client's connection
//! to the proxy and the proxy's connections to node-local backends are tracked in the sockhash,
//! and the `sk_msg` program hands their data straight to the peer socket.
//!
//! What must hold: every byte arrives intact and in order in both directions (echoed bodies
//! compared byte for byte, HTTP/1.1 keep-alive and HTTP/2, bodies from a few bytes to megabytes),
//! the redirect carries the traffic of both hops, and pure L4 connections stay out of it (their
//! byte counters come from the kernel's TCP state).
//!
//! Topology (per the safety rules): a node netns with no default route, the node address on its
//! loopback, and pod netns behind veth pairs. The steered test cgroup has three children: the
//! client, the agent and the backends (each backend a `steerd-http-probe --serve` process).

use std::process::Command;
use std::time::Duration;
use steerd_e2e::{
    Agent, BpffsDir, ChildGuard, HttpProbeResult, Node, Pod, TempDir, TestCgroup, admin_addr,
    admin_get, assert_split, http_probe_bin, metric_sum, run_http_probe, spawn_in, wait_until,
    wait_with_timeout,
};

const NODE_IP4: &str = "10.250.0.1";
const HTTP_VIP: &str = "10.96.0.50";
const TCP_VIP: &str = "10.96.0.51";
const PORT: u16 = 9080;

/// Fields drop in order: processes first, then the cgroups (children before the parent), the
/// pins, the pods and the node.
struct Node2 {
    agent: Agent,
    _servers: Vec<ChildGuard>,
    client_cgroup: TestCgroup,
    _agent_cgroup: TestCgroup,
    _backend_cgroup: TestCgroup,
    _steered: TestCgroup,
    _manifests: TempDir,
    _bpffs: BpffsDir,
    client: Pod,
    _backends: Vec<Pod>,
    node: Node,
}

fn manifests(backends: &[Pod]) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews}}\nspec:\n  clusterIP: {HTTP_VIP}\n  selector: {{app: reviews}}\n  ports: [{{name: http, port: {PORT}}}]\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: raw}}\nspec:\n  clusterIP: {TCP_VIP}\n  selector: {{app: reviews}}\n  ports: [{{name: tcp, port: {PORT}}}]\n---\n\
         apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews}}\nspec:\n  host: reviews\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews}}\nspec:\n  hosts: [reviews]\n  http:\n  - match: [{{headers: {{x-istio-cohort: {{exact: internal}}}}}}]\n    route: [{{destination: {{host: reviews, subset: v2}}}}]\n  - route:\n    - {{destination: {{host: reviews, subset: v1}}, weight: 50}}\n    - {{destination: {{host: reviews, subset: v2}}, weight: 50}}\n---\n"
    );
    for (pod, version) in backends.iter().zip(["v1", "v2"]) {
        text += &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: reviews-{version}, labels: {{app: reviews, version: {version}}}}}\nstatus: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n---\n",
            ip = pod.ipv4
        );
    }
    text
}

impl Node2 {
    /// The node with the agent's `--socket-redirect` set to `redirect`.
    fn start(redirect: bool) -> Node2 {
        let node = Node::new();
        node.netns
            .ip(&["addr", "add", &format!("{NODE_IP4}/32"), "dev", "lo"]);
        let client = node.add_pod("client");
        let backends = vec![node.add_pod("reviews-v1"), node.add_pod("reviews-v2")];
        let steered = TestCgroup::new();
        let client_cgroup = steered.child("client");
        let agent_cgroup = steered.child("agent");
        let backend_cgroup = steered.child("backends");

        let mut servers = Vec::new();
        for (pod, version) in backends.iter().zip(["v1", "v2"]) {
            let addr = pod.sock_v4(PORT);
            let mut cmd = Command::new(http_probe_bin());
            cmd.args([
                "--serve",
                &addr.to_string(),
                "--id",
                &format!("reviews-{version}"),
            ]);
            servers.push(ChildGuard::new(spawn_in(
                &mut cmd,
                Some(&pod.netns),
                Some(&backend_cgroup),
            )));
            let up = wait_until(Duration::from_secs(10), || {
                node.netns
                    .run_in(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
                    .is_ok()
            });
            assert!(up, "backend {version} never listened on {addr}");
        }

        let files = TempDir::new("steerd-redirect");
        files.write("reviews.yaml", manifests(&backends));
        let bpffs = BpffsDir::new();
        let source = format!("files:{}", files.as_str());
        let admin = admin_addr().to_string();
        let steered_path = steered.path().to_str().expect("UTF-8 cgroup path");
        let mut args = vec![
            "run",
            "--source",
            &source,
            "--bpffs",
            bpffs.as_str(),
            "--cgroup",
            steered_path,
            "--admin",
            &admin,
            "--node-ip",
            NODE_IP4,
        ];
        args.extend_from_slice(&["--socket-redirect", if redirect { "true" } else { "false" }]);
        let mut agent = Agent::spawn_in_cgroup(&node, &agent_cgroup, &args);
        agent.wait_ready(admin_addr(), Duration::from_secs(20));
        Node2 {
            agent,
            _servers: servers,
            client_cgroup,
            _agent_cgroup: agent_cgroup,
            _backend_cgroup: backend_cgroup,
            _steered: steered,
            _manifests: files,
            _bpffs: bpffs,
            client,
            _backends: backends,
            node,
        }
    }

    fn http(&self, args: &[&str]) -> HttpProbeResult {
        run_http_probe(Some(&self.client.netns), Some(&self.client_cgroup), args)
    }

    /// Every attempt answered 200 and echoed its body unchanged.
    fn echo(&self, what: &str, args: &[&str], count: u64) -> HttpProbeResult {
        let url = format!("http://{HTTP_VIP}:{PORT}/upload?echo");
        let count_text = count.to_string();
        let mut all = vec![
            "--url",
            &url,
            "--method",
            "POST",
            "--echo",
            "--count",
            &count_text,
        ];
        all.extend_from_slice(args);
        let r = self.http(&all);
        assert_eq!(r.status(200), count, "{what}: {r:?}\n{}", self.agent.log());
        assert_eq!(r.failures, 0, "{what}: {r:?}");
        r
    }

    /// (sockets tracked, bytes redirected, bytes that took TCP) so far.
    fn redirect(&self) -> (f64, f64, f64) {
        let m = admin_get(&self.node, "/metrics");
        (
            metric_sum(&m, "steerd_socket_redirect_sockets_total", &[]),
            metric_sum(
                &m,
                "steerd_socket_redirect_bytes_total",
                &[("path", "redirect")],
            ),
            metric_sum(&m, "steerd_socket_redirect_bytes_total", &[("path", "tcp")]),
        )
    }
}

#[test]
fn l7_data_between_node_local_sockets_skips_tcp_and_arrives_intact() {
    let n = Node2::start(true);
    let (sockets0, redirected0, _) = n.redirect();
    assert_eq!(sockets0, 0.0, "nothing is tracked before any L7 traffic");

    // HTTP/1.1 keep-alive, four connections, 64 KiB bodies both ways, split per request.
    let small = 64 * 1024;
    let r = n.echo(
        "HTTP/1.1 keep-alive",
        &[
            "--data-len",
            &small.to_string(),
            "--keepalive",
            "--concurrency",
            "4",
        ],
        400,
    );
    assert_split(&r.counts, &[("reviews-v1", 0.5), ("reviews-v2", 0.5)], 5.0);
    // The header route still picks per request over the redirected connection.
    let r = n.http(&[
        "--url",
        &format!("http://{HTTP_VIP}:{PORT}/"),
        "--count",
        "50",
        "--keepalive",
        "--header",
        "x-istio-cohort:internal",
    ]);
    assert_split(&r.counts, &[("reviews-v2", 1.0)], 4.0);
    // HTTP/2: many streams interleaved on one connection each way.
    n.echo(
        "HTTP/2",
        &["--data-len", "100000", "--h2", "--concurrency", "8"],
        200,
    );
    // Megabyte bodies: many sends per direction, more than a socket buffer.
    let large = 3 << 20;
    n.echo(
        "3 MiB bodies",
        &["--data-len", &large.to_string(), "--keepalive"],
        6,
    );
    // Tiny bodies on fresh connections: every connection decides its path anew.
    n.echo("a connection per request", &["--data-len", "1"], 100);

    let (sockets, redirected, tcp) = n.redirect();
    // Each body crosses each hop twice (request and echo): client→proxy, proxy→backend and
    // back. Both hops redirected carry four times the body bytes; client→proxy alone, two.
    let bodies = (400 * small + 200 * 100_000 + 6 * large + 100) as f64;
    assert!(
        redirected - redirected0 >= 3.0 * bodies,
        "redirected {redirected} bytes (TCP {tcp}) for {bodies} body bytes: not both hops\n{}",
        admin_get(&n.node, "/metrics")
    );
    // Client + proxy side per downstream connection (4 + 1 + 1 + 100 + probes), and both ends
    // of the proxy's pooled upstream connections.
    assert!(sockets >= 2.0 * 106.0 + 4.0, "{sockets} sockets tracked");

    // Pure L4 (a `tcp` port: the connect hook picks the backend, no proxy): never tracked, and
    // its byte counters still come from the TCP state.
    let url = format!("http://{TCP_VIP}:{PORT}/upload?echo");
    let r = n.http(&[
        "--url",
        &url,
        "--method",
        "POST",
        "--echo",
        "--data-len",
        "10000",
        "--count",
        "20",
    ]);
    assert_eq!(r.status(200), 20, "{r:?}");
    let (sockets_after, _, _) = n.redirect();
    assert_eq!(sockets_after, sockets, "L4 sockets were tracked");
    let counted = wait_until(Duration::from_secs(5), || {
        let m = admin_get(&n.node, "/metrics");
        metric_sum(
            &m,
            "istio_tcp_sent_bytes_total",
            &[("destination_service_name", "raw")],
        ) >= 20.0 * 10_000.0
    });
    assert!(
        counted,
        "L4 bytes not counted:\n{}",
        admin_get(&n.node, "/metrics")
    );
}

#[test]
fn with_the_redirect_off_nothing_is_tracked_and_traffic_flows_over_tcp() {
    let n = Node2::start(false);
    n.echo(
        "HTTP/1.1 keep-alive",
        &["--data-len", "65536", "--keepalive", "--concurrency", "2"],
        100,
    );
    let (sockets, redirected, tcp) = n.redirect();
    assert_eq!((sockets, redirected, tcp), (0.0, 0.0, 0.0));
}

/// The redirect's trade-off, pinned so that a change in it is noticed (and why it is opt-in):
/// redirected data has no TCP flow control, so while a client does not read (for 4 s), the proxy pushes
/// the whole response into the client's socket at once (with TCP it would stop at the socket
/// buffers). The client then reads every byte, in order.
#[test]
fn a_client_that_stops_reading_does_not_hold_back_a_redirected_response() {
    let n = Node2::start(true);
    let len: u64 = 40_000_000;
    let script = format!(
        "import socket, time\n\
         s = socket.create_connection(('{HTTP_VIP}', {PORT}))\n\
         s.sendall(b'GET /big?body={len} HTTP/1.1\\r\\nHost: reviews\\r\\nConnection: close\\r\\n\\r\\n')\n\
         time.sleep(4)\n\
         data = bytearray()\n\
         while True:\n\
         \x20   chunk = s.recv(1 << 20)\n\
         \x20   if not chunk: break\n\
         \x20   data += chunk\n\
         head, _, body = bytes(data).partition(b'\\r\\n\\r\\n')\n\
         print(head.split(b' ')[1].decode(), len(body), body.count(b'x'))\n"
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let client = spawn_in(&mut cmd, Some(&n.client.netns), Some(&n.client_cgroup));
    // Both hops carry the whole body while the client sleeps.
    let pushed = wait_until(Duration::from_secs(3), || {
        n.redirect().1 >= 2.0 * len as f64
    });
    let (_, redirected, tcp) = n.redirect();
    let out = wait_with_timeout(client, Duration::from_secs(30)).expect("the client finishes");
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        report.trim(),
        format!("200 {len} {len}"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        n.agent.log()
    );
    assert!(
        pushed,
        "{redirected} bytes redirected ({tcp} over TCP) before the client read: flow control \
         now holds the response back; update the README's --socket-redirect trade-off"
    );
}
