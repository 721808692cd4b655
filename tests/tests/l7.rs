//! The L7 path end to end: a client pod's connect() to an HTTP service VIP is redirected by the
//! kernel to the agent's proxy on the node address, the proxy recovers the original VIP from the
//! kernel's records and routes each request to a backend pod.
//!
//! Topology (per the safety rules): a node netns with no default route, where the agent runs
//! and the node address lives on its loopback; pod netns behind veth pairs whose default
//! route is the node. Clients run in a client pod, inside the steered test cgroup, and the agent
//! below it (so the client-to-proxy hop takes the socket redirect, see `socket_redirect.rs`).

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
    /// The agent's, below the steered one: the client's connections to the proxy take the
    /// socket redirect (the backends are threads of the test, outside it: proxy to backend is
    /// TCP).
    _agent_cgroup: TestCgroup,
    client_cgroup: TestCgroup,
    _bpffs: BpffsDir,
    servers: Vec<HttpIdentityServer>,
    client: Pod,
    backends: Vec<Pod>,
    node: Node,
}

fn pod_manifest(name: &str, labels: &str, pod: &Pod) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: reviews, {labels}}}}}\nstatus: {{phase: Running, podIP: {}, podIPs: [{{ip: {}}}, {{ip: \"{}\"}}]}}\n---\n",
        pod.ipv4, pod.ipv4, pod.ipv6
    )
}

impl Mesh {
    /// A client pod and backends `reviews` v1/v2/v3 (HTTP on 9080), plus `extra` manifests.
    fn start(extra: &[(&str, &str)]) -> Mesh {
        Mesh::start_with(extra, &[None, None, None], &[])
    }

    /// [`Mesh::start`] with the pods v1/v2/v3 in `localities` (their `istio-locality` label)
    /// and more agent arguments.
    fn start_with(
        extra: &[(&str, &str)],
        localities: &[Option<&str>; 3],
        agent_args: &[&str],
    ) -> Mesh {
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
        for (version, locality) in ["v1", "v2", "v3"].into_iter().zip(localities) {
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
            let labels = match locality {
                Some(l) => format!("version: {version}, istio-locality: {l}"),
                None => format!("version: {version}"),
            };
            pods += &pod_manifest(
                &format!("reviews-{version}-5b9c8d7f6d-abcde"),
                &labels,
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
        let mut args = vec![
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
            "--socket-redirect",
            "true",
        ];
        args.extend_from_slice(agent_args);
        let agent_cgroup = client_cgroup.child("agent");
        let mut agent = Agent::spawn_in_cgroup(&node, &agent_cgroup, &args);
        agent.wait_ready(admin_addr(), Duration::from_secs(20));
        Mesh {
            agent,
            manifests,
            _agent_cgroup: agent_cgroup,
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

// ---------------------------------------------------------------------------------------------
// Istio's HTTP semantics through the kernel redirect. Servers: [v1 v4, v1 v6, v2 v4, v2 v6, v3
// v4, v3 v6] (both addresses of a pod answer with the pod's identity).
// ---------------------------------------------------------------------------------------------

fn shared(path: &str) -> String {
    let p = format!(
        "{}/../../shared/istio/samples/bookinfo/networking/{path}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// bookinfo's DestinationRules (reviews subsets v1/v2/v3) plus one routing file.
fn bookinfo(routing: &str) -> Mesh {
    Mesh::start(&[
        (
            "destination-rule-all.yaml",
            &shared("destination-rule-all.yaml"),
        ),
        ("routing.yaml", &shared(routing)),
    ])
}

fn url(path: &str) -> String {
    format!("http://{VIP4}:9080{path}")
}

const REVIEWS_DR: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n  - {name: v3, labels: {version: v3}}\n";

fn virtual_service(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews}}\nspec:\n  hosts: [reviews]\n  http:\n{http}"
    )
}

#[test]
fn header_match_routes_jason_to_v2_and_everyone_else_to_v3() {
    let m = bookinfo("virtual-service-reviews-jason-v2-v3.yaml");
    let jason = m.http(&[
        "--url",
        &url("/"),
        "--count",
        "100",
        "--header",
        "end-user:jason",
        "--keepalive",
    ]);
    assert_eq!(jason.status(200), 100, "{jason:?}\n{}", m.agent.log());
    assert_split(&jason.counts, &[("reviews-v2", 1.0)], 4.0);
    let others = m.http(&[
        "--url",
        &url("/"),
        "--count",
        "100",
        "--header",
        "end-user:mike",
        "--keepalive",
    ]);
    assert_split(&others.counts, &[("reviews-v3", 1.0)], 4.0);
    let anonymous = m.http(&["--url", &url("/"), "--count", "50"]);
    assert_split(&anonymous.counts, &[("reviews-v3", 1.0)], 4.0);
}

#[test]
fn weighted_splits_per_request_90_10_and_50_50() {
    let m = bookinfo("virtual-service-reviews-90-10.yaml");
    // One keep-alive connection: the split happens per request, not per connection.
    let r = m.http(&["--url", &url("/"), "--count", "2000", "--keepalive"]);
    assert_eq!(r.status(200), 2000, "{r:?}");
    assert_eq!(r.connections, 1);
    assert_split(&r.counts, &[("reviews-v1", 0.9), ("reviews-v2", 0.1)], 4.0);
    m.manifests
        .write("routing.yaml", shared("virtual-service-reviews-50-v3.yaml"));
    let switched = steerd_e2e::wait_until(Duration::from_secs(10), || {
        m.http(&["--url", &url("/"), "--count", "40", "--keepalive"])
            .count("reviews-v3")
            > 0
    });
    assert!(switched, "the new route never applied:\n{}", m.agent.log());
    let r = m.http(&[
        "--url",
        &url("/"),
        "--count",
        "2000",
        "--h2",
        "--concurrency",
        "4",
    ]);
    assert_eq!(r.status(200), 2000, "{r:?}");
    assert_split(&r.counts, &[("reviews-v1", 0.5), ("reviews-v3", 0.5)], 4.0);
}

#[test]
fn uri_prefix_exact_and_regex_with_rewrites() {
    let http = "  - match: [{uri: {prefix: /v1/}}]\n    rewrite: {uri: /api/, authority: reviews.internal}\n    route: [{destination: {host: reviews, subset: v1}}]\n  - match: [{uri: {exact: /health}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - match: [{uri: {regex: '/items/[0-9]+'}}]\n    rewrite:\n      uriRegexRewrite: {match: '^/items/([0-9]+)$', rewrite: '/item?id=\\1'}\n    route: [{destination: {host: reviews, subset: v3}}]\n";
    let vs = virtual_service(http);
    let m = Mesh::start(&[("dr.yaml", REVIEWS_DR), ("vs.yaml", &vs)]);
    let r = m.http(&["--url", &url("/v1/reviews/7?x=1"), "--count", "5"]);
    assert_eq!(r.count("reviews-v1"), 5, "{r:?}\n{}", m.agent.log());
    let body = r.sample.unwrap().body;
    assert_eq!(body["path"], "/api/reviews/7", "prefix rewritten");
    assert_eq!(body["query"], "x=1", "query kept");
    assert_eq!(body["host"], "reviews.internal", "authority rewritten");
    let r = m.http(&["--url", &url("/health"), "--count", "5"]);
    assert_eq!(r.count("reviews-v2"), 5, "{r:?}");
    let r = m.http(&["--url", &url("/healthz"), "--count", "3"]);
    assert_eq!(
        r.status(404),
        3,
        "no rule matches: Envoy's route-not-found 404: {r:?}"
    );
    let r = m.http(&["--url", &url("/items/42"), "--count", "3"]);
    assert_eq!(r.count("reviews-v3"), 3, "{r:?}");
    let body = r.sample.unwrap().body;
    assert_eq!(
        (body["path"].as_str(), body["query"].as_str()),
        (Some("/item"), Some("id=42")),
        "regex rewrite to a path with a query"
    );
    let r = m.http(&["--url", &url("/items/42/x"), "--count", "2"]);
    assert_eq!(r.status(404), 2, "regex is a full match: {r:?}");
}

#[test]
fn mirror_copies_to_shadow_with_shadow_host_and_client_sees_primary_only() {
    let http = "  - route: [{destination: {host: reviews, subset: v1}}]\n    mirror: {host: reviews, subset: v2}\n    mirrorPercentage: {value: 100.0}\n";
    let m = Mesh::start(&[("dr.yaml", REVIEWS_DR), ("vs.yaml", &virtual_service(http))]);
    // The shadow is slow: the primary path must not wait for it.
    for s in &m.servers[2..4] {
        s.set_delay(Duration::from_millis(400));
    }
    let r = m.http(&["--url", &url("/mirrored"), "--count", "50", "--keepalive"]);
    assert_eq!(r.status(200), 50, "{r:?}");
    assert_split(&r.counts, &[("reviews-v1", 1.0)], 4.0);
    assert!(
        r.latency_ms.p99 < 300.0,
        "the primary waited for the mirror: {:?}",
        r.latency_ms
    );
    let shadow_seen = steerd_e2e::wait_until(Duration::from_secs(5), || {
        m.servers[2].requests() + m.servers[3].requests() == 50
    });
    assert!(
        shadow_seen,
        "shadow got {} of 50",
        m.servers[2].requests() + m.servers[3].requests()
    );
    let shadow: Vec<_> = m.servers[2]
        .received()
        .into_iter()
        .chain(m.servers[3].received())
        .collect();
    assert!(
        shadow
            .iter()
            .all(|r| r.host == format!("{VIP4}-shadow:9080") && r.path == "/mirrored"),
        "{shadow:?}"
    );
}

#[test]
fn retries_hide_failures_and_per_try_timeout_moves_on() {
    let http = "  - route: [{destination: {host: reviews, subset: v1}}]\n    retries: {attempts: 3, retryOn: 5xx, perTryTimeout: 150ms}\n";
    let m = Mesh::start(&[("dr.yaml", REVIEWS_DR), ("vs.yaml", &virtual_service(http))]);
    // Each v1 endpoint fails its next request: a retry on the other (or the same) recovers.
    m.servers[0].fail_next(1, 503);
    m.servers[1].fail_next(1, 503);
    let r = m.http(&["--url", &url("/"), "--count", "1"]);
    assert_eq!(r.status(200), 1, "{r:?}\n{}", m.agent.log());
    assert_eq!(
        m.servers[0].requests() + m.servers[1].requests(),
        3,
        "two failed attempts, one success"
    );

    // One v1 endpoint hangs: each try on it is cut at 150 ms and retried on the other.
    m.servers[0].set_delay(Duration::from_secs(2));
    let r = m.http(&["--url", &url("/"), "--count", "20"]);
    assert_eq!(r.status(200), 20, "{r:?}");
    assert!(
        r.latency_ms.max < 1000.0,
        "per-try timeout did not cut the slow try: {:?}",
        r.latency_ms
    );
}

#[test]
fn route_timeout_answers_504() {
    let http = "  - route: [{destination: {host: reviews, subset: v2}}]\n    timeout: 200ms\n    retries: {attempts: 0}\n";
    let m = Mesh::start(&[("dr.yaml", REVIEWS_DR), ("vs.yaml", &virtual_service(http))]);
    m.servers[2].set_delay(Duration::from_secs(2));
    m.servers[3].set_delay(Duration::from_secs(2));
    let r = m.http(&["--url", &url("/"), "--count", "3"]);
    assert_eq!(r.status(504), 3, "{r:?}");
    assert!(r.latency_ms.max < 1000.0, "{:?}", r.latency_ms);
    assert!(r.latency_ms.p50 >= 190.0, "{:?}", r.latency_ms);
}

#[test]
fn fault_abort_and_delay() {
    let http = "  - match: [{headers: {end-user: {exact: jason}}}]\n    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}\n    route: [{destination: {host: reviews, subset: v1}}]\n  - fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}\n    route: [{destination: {host: reviews, subset: v1}}]\n";
    let m = Mesh::start(&[("dr.yaml", REVIEWS_DR), ("vs.yaml", &virtual_service(http))]);
    let aborted = m.http(&[
        "--url",
        &url("/"),
        "--count",
        "10",
        "--header",
        "end-user:jason",
    ]);
    assert_eq!(aborted.status(503), 10, "{aborted:?}");
    assert_eq!(
        m.servers[0].requests() + m.servers[1].requests(),
        0,
        "aborted requests never reach a backend"
    );
    let delayed = m.http(&["--url", &url("/"), "--count", "5"]);
    assert_eq!(delayed.status(200), 5, "{delayed:?}");
    assert!(delayed.latency_ms.p50 >= 295.0, "{:?}", delayed.latency_ms);
}

#[test]
fn connection_pool_overflow_answers_503_overloaded() {
    let dr = format!(
        "{REVIEWS_DR}  trafficPolicy:\n    connectionPool:\n      tcp: {{maxConnections: 1}}\n      http: {{http1MaxPendingRequests: 1, http2MaxRequests: 1}}\n"
    );
    let http =
        "  - route: [{destination: {host: reviews, subset: v1}}]\n    retries: {attempts: 0}\n";
    let m = Mesh::start(&[("dr.yaml", &dr), ("vs.yaml", &virtual_service(http))]);
    m.servers[0].set_delay(Duration::from_millis(300));
    m.servers[1].set_delay(Duration::from_millis(300));
    let r = m.http(&[
        "--url",
        &url("/"),
        "--count",
        "24",
        "--concurrency",
        "8",
        "--keepalive",
    ]);
    assert!(
        r.status(503) > 0,
        "no overflow with 8 concurrent requests and a limit of 2: {r:?}"
    );
    assert!(r.status(200) > 0, "{r:?}");
    assert_eq!(r.status(200) + r.status(503), 24, "{r:?}");
}

#[test]
fn outlier_detection_ejects_a_failing_backend_and_lets_it_back() {
    let dr = format!(
        "{REVIEWS_DR}  trafficPolicy:\n    loadBalancer: {{simple: ROUND_ROBIN}}\n    outlierDetection: {{consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 1s, maxEjectionPercent: 100}}\n"
    );
    let m = Mesh::start(&[("dr.yaml", &dr)]);
    m.servers[0].fail_next(1000, 500);
    m.servers[1].fail_next(1000, 500);
    let r = m.http(&["--url", &url("/"), "--count", "60", "--keepalive"]);
    // Two consecutive 500s per v1 endpoint eject it; after that only v2/v3 answer.
    assert_eq!(r.status(500), 4, "{r:?}");
    assert_eq!(r.status(200), 56, "{r:?}");
    let ejected = Agent::run_cli(
        &m.node,
        &["inspect", "endpoints", "--admin", "127.0.0.1:15000"],
    );
    let table = String::from_utf8_lossy(&ejected.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&format!("{}:9080", m.backends[0].ipv4))
                && l.contains("UNHEALTHY")
                && l.contains("FAILED")),
        "{table}"
    );
    // Healed and past the ejection time: v1 serves again.
    m.servers[0].fail_next(0, 500);
    m.servers[1].fail_next(0, 500);
    std::thread::sleep(Duration::from_millis(1200));
    let r = m.http(&["--url", &url("/"), "--count", "30", "--keepalive"]);
    assert_eq!(r.status(200), 30, "{r:?}");
    assert!(r.count("reviews-v1") > 0, "v1 never came back: {r:?}");
}

#[test]
fn consistent_hash_on_a_header_is_sticky() {
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      consistentHash: {httpHeaderName: x-user}\n";
    let m = Mesh::start(&[("dr.yaml", dr)]);
    let mut seen = std::collections::HashSet::new();
    for user in [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    ] {
        let r = m.http(&[
            "--url",
            &url("/"),
            "--count",
            "20",
            "--header",
            &format!("x-user:{user}"),
        ]);
        assert_eq!(r.status(200), 20, "{r:?}");
        assert_eq!(r.counts.len(), 1, "{user} moved between backends: {r:?}");
        seen.extend(r.counts.keys().cloned());
    }
    assert!(seen.len() >= 2, "all users hashed to one backend: {seen:?}");
}

#[test]
fn header_edits_redirect_direct_response_and_http2_upstream() {
    let http = "  - match: [{uri: {prefix: /old}}]\n    redirect: {uri: /new, authority: reviews.example, redirectCode: 302}\n  - match: [{uri: {exact: /teapot}}]\n    directResponse: {status: 418, body: {string: short and stout}}\n  - route:\n    - destination: {host: reviews, subset: v1}\n      headers:\n        request: {set: {x-destination: v1}}\n    headers:\n      request:\n        set: {x-added: yes}\n        add: {x-multi: two}\n        remove: [x-strip]\n      response:\n        set: {x-served-by: steerd}\n        remove: [content-type]\n";
    // A second service on the same pods whose port speaks HTTP/2 (Istio: port name http2-*).
    let h2_service = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews-h2}\nspec: {clusterIP: 10.96.0.51, selector: {app: reviews}, ports: [{name: http2-api, port: 9080}]}\n";
    let m = Mesh::start(&[
        ("dr.yaml", REVIEWS_DR),
        ("vs.yaml", &virtual_service(http)),
        ("h2.yaml", h2_service),
    ]);

    let r = m.http(&["--url", &url("/old?x=1"), "--count", "1"]);
    assert_eq!(r.status(302), 1, "{r:?}\n{}", m.agent.log());
    assert_eq!(
        r.sample.as_ref().unwrap().headers["location"],
        "http://reviews.example/new?x=1"
    );

    let r = m.http(&["--url", &url("/teapot"), "--count", "1"]);
    assert_eq!(r.status(418), 1, "{r:?}");
    assert_eq!(
        r.sample.as_ref().unwrap().body,
        serde_json::json!("short and stout")
    );

    let r = m.http(&[
        "--url",
        &url("/reviews"),
        "--count",
        "1",
        "--header",
        "x-strip:secret",
        "--header",
        "x-multi:one",
    ]);
    assert_eq!(r.status(200), 1, "{r:?}");
    let sample = r.sample.unwrap();
    let seen = &sample.body["headers"];
    assert_eq!(seen["x-added"], "yes", "{seen:#}");
    assert_eq!(
        seen["x-destination"], "v1",
        "destination-level edits apply too: {seen:#}"
    );
    assert_eq!(seen["x-multi"], "one, two", "add appends: {seen:#}");
    assert!(
        seen.get("x-strip").is_none(),
        "removed before reaching the backend: {seen:#}"
    );
    assert_eq!(sample.headers["x-served-by"], "steerd");
    assert!(
        !sample.headers.contains_key("content-type"),
        "response header removed: {:?}",
        sample.headers
    );

    // HTTP/1.1 from the client, HTTP/2 to the backend: the port's protocol decides upstream.
    let r = m.http(&["--url", "http://10.96.0.51:9080/", "--count", "5"]);
    assert_eq!(r.status(200), 5, "{r:?}");
    assert_eq!(r.sample.unwrap().body["version"], "HTTP/2.0");
}

#[test]
fn max_requests_per_connection_closes_upstream_connections() {
    // Subset v1 allows 2 requests per upstream connection; v2 keeps the default (no limit).
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n  subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy:\n      connectionPool:\n        http: {maxRequestsPerConnection: 2}\n  - {name: v2, labels: {version: v2}}\n";
    let http = "  - match: [{headers: {x-subset: {exact: v2}}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - route: [{destination: {host: reviews, subset: v1}}]\n";
    let m = Mesh::start(&[("dr.yaml", dr), ("vs.yaml", &virtual_service(http))]);
    let upstream_connections = |servers: &[HttpIdentityServer]| -> u64 {
        servers.iter().map(HttpIdentityServer::connections).sum()
    };
    // Sequential requests on one client connection: each finishes before the next starts, so
    // a pooled connection is free for every next request to the same endpoint. v1 has two
    // endpoints (its pod's IPv4 and IPv6 addresses), each with a pool of its own.
    let v1 = &m.servers[0..2];
    let before: Vec<(u64, u64)> = v1.iter().map(|s| (s.requests(), s.connections())).collect();
    let r = m.http(&["--url", &url("/"), "--count", "20", "--keepalive"]);
    assert_eq!(r.count("reviews-v1"), 20, "{r:?}\n{}", m.agent.log());
    for (server, (requests, connections)) in v1.iter().zip(before) {
        let requests = server.requests() - requests;
        let connections = server.connections() - connections;
        assert_eq!(
            connections,
            requests.div_ceil(2),
            "{}: {requests} requests at most 2 per connection",
            server.addr()
        );
    }
    let v2_before = upstream_connections(&m.servers[2..4]);
    let r = m.http(&[
        "--url",
        &url("/"),
        "--count",
        "20",
        "--keepalive",
        "--header",
        "x-subset:v2",
    ]);
    assert_eq!(r.count("reviews-v2"), 20, "{r:?}\n{}", m.agent.log());
    let v2_connections = upstream_connections(&m.servers[2..4]) - v2_before;
    assert!(
        (1..=2).contains(&v2_connections),
        "without a limit the pool reuses one connection per endpoint: {v2_connections}"
    );
}

#[test]
fn destination_rule_connect_timeout_bounds_a_silent_backend() {
    let dr = format!(
        "{REVIEWS_DR}  trafficPolicy:\n    connectionPool:\n      tcp: {{connectTimeout: 250ms}}\n"
    );
    let http =
        "  - route: [{destination: {host: reviews, subset: v1}}]\n    retries: {attempts: 0}\n";
    let m = Mesh::start(&[("dr.yaml", &dr), ("vs.yaml", &virtual_service(http))]);
    // v1's pod drops SYNs: connects hang until the connect timeout, not the default 10 s.
    for cmd in [
        [
            "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "9080", "-j", "DROP",
        ],
        [
            "ip6tables",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            "9080",
            "-j",
            "DROP",
        ],
    ] {
        let status = std::process::Command::new("nsenter")
            .arg(format!("--net={}", m.backends[0].netns.path().display()))
            .args(cmd)
            .status()
            .unwrap();
        assert!(status.success(), "{cmd:?}");
    }
    let r = m.http(&["--url", &url("/"), "--count", "2", "--timeout-ms", "5000"]);
    assert_eq!(r.status(503), 2, "{r:?}");
    assert!(
        r.latency_ms.max < 2000.0,
        "connect timeout not applied: {:?}",
        r.latency_ms
    );
}

// ---------------------------------------------------------------------------------------------
// DestinationRule load balancing through the kernel redirect. Every pod serves on its IPv4 and
// IPv6 address, so the service's cluster has six endpoints, two per pod identity.
// ---------------------------------------------------------------------------------------------

fn load_balancer_dr(lb: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews}}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer: {lb}\n"
    )
}

/// The one backend that answered all of `r` (panics if several did or none did).
fn only_backend(r: &HttpProbeResult) -> String {
    assert_eq!(r.failures, 0, "{r:?}");
    assert_eq!(r.counts.len(), 1, "requests moved between backends: {r:?}");
    r.counts.keys().next().unwrap().clone()
}

#[test]
fn consistent_hash_cookie_is_generated_then_sticky() {
    let dr =
        load_balancer_dr("{consistentHash: {httpCookie: {name: session, ttl: 120s, path: /}}}");
    let m = Mesh::start(&[("dr.yaml", &dr)]);
    // A new connection per request: each request without the cookie gets a fresh one (Envoy
    // derives it from the connection's addresses), so first visits spread over the backends.
    let first = m.http(&["--url", &url("/"), "--count", "30"]);
    assert_eq!(first.status(200), 30, "{first:?}\n{}", m.agent.log());
    assert!(
        first.counts.len() >= 2,
        "generated cookies all hashed to one backend: {first:?}"
    );
    let sample = first.sample.expect("a response");
    let set_cookie = sample
        .headers
        .get("set-cookie")
        .unwrap_or_else(|| panic!("no cookie generated: {:?}", sample.headers));
    let value = set_cookie
        .strip_prefix("session=\"")
        .and_then(|v| v.split_once("\"; Max-Age=120; Path=/; HttpOnly"))
        .map(|(v, rest)| {
            assert!(rest.is_empty(), "{set_cookie}");
            v
        })
        .unwrap_or_else(|| panic!("not Envoy's Set-Cookie: {set_cookie}"));
    assert_eq!(value.len(), 16, "{set_cookie}");
    let first_backend = sample.headers["x-backend-id"].clone();
    // Requests that carry it (quoted, as browsers send it back) stick to that backend, on new
    // connections too, and get no new cookie.
    for cookie in [
        format!("session=\"{value}\""),
        format!("a=1; session={value}"),
    ] {
        let r = m.http(&[
            "--url",
            &url("/"),
            "--count",
            "20",
            "--header",
            &format!("cookie:{cookie}"),
        ]);
        assert_eq!(only_backend(&r), first_backend, "{cookie}");
        let headers = &r.sample.unwrap().headers;
        assert!(!headers.contains_key("set-cookie"), "{headers:?}");
    }
    // Any value of the cookie sticks, even one the proxy did not generate.
    let mut seen = std::collections::HashSet::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let r = m.http(&[
            "--url",
            &url("/"),
            "--count",
            "10",
            "--header",
            &format!("cookie:session={user}"),
        ]);
        seen.insert(only_backend(&r));
    }
    assert!(
        seen.len() >= 2,
        "all cookies hashed to one backend: {seen:?}"
    );
}

#[test]
fn consistent_hash_on_the_source_ip_sticks_per_client() {
    let dr = load_balancer_dr("{consistentHash: {useSourceIp: true}}");
    let m = Mesh::start(&[("dr.yaml", &dr)]);
    // More client pods, each with an address of its own, all in the steered cgroup.
    let clients: Vec<Pod> = (0..5)
        .map(|i| m.node.add_pod(&format!("client{i}")))
        .collect();
    let mut seen = std::collections::HashSet::new();
    for client in std::iter::once(&m.client).chain(&clients) {
        // A new connection (and source port) per request: only the address is the key.
        let r = run_http_probe(
            Some(&client.netns),
            Some(&m.client_cgroup),
            &["--url", &url("/"), "--count", "20"],
        );
        let backend = only_backend(&r);
        // Sticky over time and over HTTP/2 too.
        let again = run_http_probe(
            Some(&client.netns),
            Some(&m.client_cgroup),
            &["--url", &url("/"), "--count", "20", "--h2"],
        );
        assert_eq!(only_backend(&again), backend, "{}", client.ipv4);
        seen.insert(backend);
    }
    assert!(
        seen.len() >= 2,
        "six client addresses all hashed to one backend: {seen:?}"
    );
}

#[test]
fn consistent_hash_on_a_query_parameter_is_sticky() {
    let dr = load_balancer_dr("{consistentHash: {httpQueryParameterName: user}}");
    let m = Mesh::start(&[("dr.yaml", &dr)]);
    let mut seen = std::collections::HashSet::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let r = m.http(&[
            "--url",
            &url(&format!("/reviews?x=1&user={user}")),
            "--count",
            "20",
        ]);
        seen.insert(only_backend(&r));
    }
    assert!(seen.len() >= 2, "all users hashed to one backend: {seen:?}");
    // Without the parameter there is no key: requests spread (Envoy picks at random).
    let r = m.http(&["--url", &url("/reviews?x=1"), "--count", "60"]);
    assert!(r.counts.len() >= 2, "{r:?}");
}

#[test]
fn ring_hash_and_maglev_settings_keep_hashing_sticky() {
    for lb in [
        "{consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 1024}}}",
        "{consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 65537}}}",
    ] {
        let dr = load_balancer_dr(lb);
        let m = Mesh::start(&[("dr.yaml", &dr)]);
        let mut seen = std::collections::HashSet::new();
        for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
            let r = m.http(&[
                "--url",
                &url("/"),
                "--count",
                "15",
                "--header",
                &format!("x-user:{user}"),
            ]);
            seen.insert(only_backend(&r));
        }
        assert!(seen.len() >= 2, "{lb}: {seen:?}");
    }
}

#[test]
fn random_spreads_over_every_endpoint() {
    let dr = load_balancer_dr("{simple: RANDOM}");
    let m = Mesh::start(&[("dr.yaml", &dr)]);
    let r = m.http(&["--url", &url("/"), "--count", "300", "--keepalive"]);
    assert_eq!(r.status(200), 300, "{r:?}\n{}", m.agent.log());
    // Expected 100 each; below 30 is more than 8 standard deviations away.
    for pod in ["reviews-v1", "reviews-v2", "reviews-v3"] {
        assert!(r.count(pod) >= 30, "{pod}: {r:?}");
    }
}

#[test]
fn least_request_sends_new_requests_to_idle_backends() {
    let dr = load_balancer_dr("{simple: LEAST_REQUEST}");
    let m = Mesh::start(&[("dr.yaml", &dr)]);
    // v1 (both of its endpoints) holds every request it gets for 8 s.
    m.servers[0].set_delay(Duration::from_secs(8));
    m.servers[1].set_delay(Duration::from_secs(8));
    // Concurrent load for a moment: with every endpoint idle at first, v1's endpoints get
    // requests too, which they then hold.
    let load = steerd_e2e::spawn_http_probe(
        Some(&m.client.netns),
        Some(&m.client_cgroup),
        &[
            "--url",
            &url("/load"),
            "--duration-ms",
            "500",
            "--concurrency",
            "8",
            "--timeout-ms",
            "12000",
        ],
    );
    let holding = steerd_e2e::wait_until(Duration::from_secs(5), || {
        m.servers[0].in_flight() >= 1 && m.servers[1].in_flight() >= 1
    });
    assert!(
        holding,
        "v1 never got a request to hold:\n{}",
        m.agent.log()
    );
    // Past the load's 500 ms its other requests finish: only v1 has requests in flight.
    std::thread::sleep(Duration::from_millis(700));
    let settled = steerd_e2e::wait_until(Duration::from_secs(5), || {
        m.servers[2..].iter().all(|s| s.in_flight() == 0)
    });
    assert!(settled, "the load did not stop");
    let r = m.http(&["--url", &url("/new"), "--count", "60", "--keepalive"]);
    assert_eq!(r.status(200), 60, "{r:?}\n{}", m.agent.log());
    assert_eq!(
        r.count("reviews-v1"),
        0,
        "a new request went to the busy v1: {r:?}"
    );
    assert!(
        r.count("reviews-v2") > 0 && r.count("reviews-v3") > 0,
        "idle backends share the load: {r:?}"
    );
    assert!(
        m.servers[0].in_flight() + m.servers[1].in_flight() >= 2,
        "v1 still held its requests while the new ones were served"
    );
    drop(load);
}

#[test]
fn warmup_ramps_up_an_endpoint_that_joins() {
    // The default balancer (LEAST_REQUEST) with Envoy's slow start over 6 s.
    let window = Duration::from_secs(6);
    let dr = load_balancer_dr("{warmup: {duration: 6s, minimumPercent: 10}}");
    let m = Mesh::start(&[("dr.yaml", &dr)]);
    let started = std::time::Instant::now();
    let reviews = std::fs::read_to_string(m.manifests.path().join("reviews.yaml")).unwrap();
    let v3_pod = "app: reviews, version: v3";
    assert!(reviews.contains(v3_pod));
    // Once the first three are warm, v3 leaves the service and comes back.
    std::thread::sleep(
        (started + window + Duration::from_millis(500))
            .saturating_duration_since(std::time::Instant::now()),
    );
    m.manifests.write(
        "reviews.yaml",
        reviews.replace(v3_pod, "app: retired, version: v3"),
    );
    let gone = steerd_e2e::wait_until(Duration::from_secs(10), || {
        m.http(&["--url", &url("/"), "--count", "40", "--keepalive"])
            .count("reviews-v3")
            == 0
    });
    assert!(gone, "v3 never left the service:\n{}", m.agent.log());
    m.manifests.write("reviews.yaml", &reviews);
    let back = steerd_e2e::wait_until(Duration::from_secs(10), || {
        m.http(&["--url", &url("/"), "--count", "30", "--keepalive"])
            .count("reviews-v3")
            > 0
    });
    let rejoined = std::time::Instant::now();
    assert!(back, "v3 never came back:\n{}", m.agent.log());
    // Within its first second v3's weight is at the 10 % floor (or just above): about 5 % of
    // the requests (15 of 300), where it would get a third (100) without warmup.
    let early = m.http(&["--url", &url("/"), "--count", "300", "--keepalive"]);
    assert_eq!(early.status(200), 300, "{early:?}");
    assert!(
        early.count("reviews-v3") <= 60,
        "a warming endpoint got its full share: {early:?}\n{}",
        m.agent.log()
    );
    assert!(early.count("reviews-v3") >= 1, "{early:?}");
    // Past the window it gets its share.
    std::thread::sleep(
        (rejoined + window + Duration::from_millis(500))
            .saturating_duration_since(std::time::Instant::now()),
    );
    let warm = m.http(&["--url", &url("/"), "--count", "300", "--keepalive"]);
    assert_eq!(warm.status(200), 300, "{warm:?}");
    assert!(
        warm.count("reviews-v3") >= 70,
        "the warm endpoint did not get its share: {warm:?}"
    );
}

#[test]
fn cors_preflights_are_answered_and_allowed_origins_get_cors_headers() {
    let http = "  - match: [{uri: {prefix: /ignore}}]\n    corsPolicy:\n      allowOrigins: [{exact: 'https://a.example'}]\n      unmatchedPreflights: IGNORE\n    route: [{destination: {host: reviews, subset: v1}}]\n  - corsPolicy:\n      allowOrigins: [{exact: 'https://a.example'}, {prefix: 'https://dev.'}, {regex: 'https://[a-z]+\\.b\\.example'}]\n      allowMethods: [GET, POST]\n      allowHeaders: [x-token]\n      exposeHeaders: [x-backend-id]\n      maxAge: 10m\n      allowCredentials: true\n    route: [{destination: {host: reviews, subset: v1}}]\n";
    let m = Mesh::start(&[("dr.yaml", REVIEWS_DR), ("vs.yaml", &virtual_service(http))]);
    let v1_requests = || m.servers[0].requests() + m.servers[1].requests();
    let preflight = |path: &str, origin: &str| {
        m.http(&[
            "--url",
            &url(path),
            "--count",
            "1",
            "--method",
            "OPTIONS",
            "--header",
            &format!("origin:{origin}"),
            "--header",
            "access-control-request-method:POST",
            "--header",
            "access-control-request-headers:x-token",
        ])
    };

    // A preflight from an allowed origin is answered by the proxy, never forwarded.
    for origin in [
        "https://a.example",
        "https://dev.local",
        "https://shop.b.example",
    ] {
        let r = preflight("/api", origin);
        assert_eq!(r.status(200), 1, "{origin}: {r:?}\n{}", m.agent.log());
        let h = &r.sample.unwrap().headers;
        assert!(!h.contains_key("x-backend-id"), "forwarded: {h:?}");
        assert_eq!(h["access-control-allow-origin"], origin);
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(h["access-control-allow-methods"], "GET,POST");
        assert_eq!(h["access-control-allow-headers"], "x-token");
        assert_eq!(h["access-control-max-age"], "600");
    }
    assert_eq!(v1_requests(), 0, "preflights reached a backend");

    // Another origin's preflight goes on to the backend (unmatchedPreflights FORWARD, the
    // default) and its response gets no CORS headers.
    let r = preflight("/api", "https://evil.example");
    assert_eq!(r.count("reviews-v1"), 1, "{r:?}");
    let sample = r.sample.unwrap();
    assert_eq!(sample.body["method"], "OPTIONS");
    assert!(
        !sample.headers.contains_key("access-control-allow-origin"),
        "{:?}",
        sample.headers
    );
    assert_eq!(v1_requests(), 1);

    // With IGNORE the proxy answers it without CORS headers and does not forward it.
    let r = preflight("/ignore", "https://evil.example");
    assert_eq!(r.status(200), 1, "{r:?}");
    let h = &r.sample.unwrap().headers;
    assert!(!h.contains_key("x-backend-id"), "{h:?}");
    assert!(!h.contains_key("access-control-allow-origin"), "{h:?}");
    assert_eq!(v1_requests(), 1, "an ignored preflight was forwarded");

    // Actual requests are forwarded; an allowed origin's response gets the CORS headers.
    let r = m.http(&[
        "--url",
        &url("/api"),
        "--count",
        "3",
        "--method",
        "POST",
        "--header",
        "origin:https://a.example",
    ]);
    assert_eq!(r.count("reviews-v1"), 3, "{r:?}");
    let h = &r.sample.unwrap().headers;
    assert_eq!(h["access-control-allow-origin"], "https://a.example");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-expose-headers"], "x-backend-id");
    for headers in [&["--header", "origin:https://evil.example"][..], &[][..]] {
        let target = url("/api");
        let mut args = vec!["--url", &target, "--count", "1"];
        args.extend_from_slice(headers);
        let r = m.http(&args);
        assert_eq!(r.count("reviews-v1"), 1, "{r:?}");
        let h = &r.sample.unwrap().headers;
        assert!(!h.contains_key("access-control-allow-origin"), "{h:?}");
    }
}

#[test]
fn delegate_virtual_service_routes_under_the_root_prefix() {
    let root = "  - name: productpage\n    match: [{uri: {prefix: /productpage}}]\n    delegate: {name: reviews-split}\n  - route: [{destination: {host: reviews, subset: v1}}]\n";
    let split = |rest: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews-split}}\nspec:\n  http:\n  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]\n    route: [{{destination: {{host: reviews, subset: v2}}}}]\n  - route: [{{destination: {{host: reviews, subset: {rest}}}}}]\n"
        )
    };
    let m = Mesh::start(&[
        ("dr.yaml", REVIEWS_DR),
        ("vs.yaml", &virtual_service(root)),
        ("split.yaml", &split("v3")),
    ]);
    let get = |path: &str, user: Option<&str>| {
        let mut args = vec![
            "--url".to_string(),
            url(path),
            "--count".into(),
            "10".into(),
        ];
        if let Some(u) = user {
            args.extend(["--header".into(), format!("end-user:{u}")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        m.http(&args)
    };
    let r = get("/productpage/1", Some("jason"));
    assert_eq!(r.count("reviews-v2"), 10, "{r:?}\n{}", m.agent.log());
    assert_eq!(get("/productpage", None).count("reviews-v3"), 10);
    // Outside the root's prefix the delegate does not apply.
    assert_eq!(get("/other", Some("jason")).count("reviews-v1"), 10);

    // A change of the delegate alone re-routes the root's host.
    m.manifests.write("split.yaml", split("v1"));
    let applied = steerd_e2e::wait_until(Duration::from_secs(10), || {
        get("/productpage", None).count("reviews-v1") == 10
    });
    assert!(
        applied,
        "the delegate's change never applied:\n{}",
        m.agent.log()
    );
    assert_eq!(get("/productpage", Some("jason")).count("reviews-v2"), 10);

    // Without its delegate the route is dropped: the next route takes /productpage.
    std::fs::remove_file(m.manifests.path().join("split.yaml")).unwrap();
    let dropped = steerd_e2e::wait_until(Duration::from_secs(10), || {
        get("/productpage", Some("jason")).count("reviews-v1") == 10
    });
    assert!(
        dropped,
        "the delegating route still applies:\n{}",
        m.agent.log()
    );
    assert!(
        m.agent.log().contains("reviews-split"),
        "the missing delegate is reported:\n{}",
        m.agent.log()
    );
}

#[test]
fn locality_failover_prefers_the_local_zone_then_the_region_then_elsewhere() {
    // The node is in us-east/zone1: v1 is local, v2 in the same region, v3 in another one.
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 100}\n";
    let m = Mesh::start_with(
        &[("dr.yaml", dr)],
        &[
            Some("us-east.zone1"),
            Some("us-east.zone2"),
            Some("us-west.zone1"),
        ],
        &["--locality", "us-east/zone1"],
    );
    let r = m.http(&["--url", &url("/"), "--count", "40", "--keepalive"]);
    assert_eq!(r.count("reviews-v1"), 40, "{r:?}\n{}", m.agent.log());

    // v1 fails: outlier detection ejects its endpoints and traffic fails over to the same
    // region's other zone, never to the other region while that one is healthy.
    m.servers[0].fail_next(1000, 503);
    m.servers[1].fail_next(1000, 503);
    let ejected = steerd_e2e::wait_until(Duration::from_secs(10), || {
        m.http(&["--url", &url("/"), "--count", "20", "--keepalive"])
            .count("reviews-v2")
            == 20
    });
    assert!(ejected, "v1 never failed over to v2:\n{}", m.agent.log());
    let r = m.http(&["--url", &url("/"), "--count", "40", "--keepalive"]);
    assert_eq!(r.count("reviews-v2"), 40, "{r:?}");
    let v3_before = m.servers[4].requests() + m.servers[5].requests();
    assert_eq!(
        v3_before, 0,
        "the other region got requests while us-east was healthy"
    );

    // The whole region down: the other region takes over.
    m.servers[2].fail_next(1000, 503);
    m.servers[3].fail_next(1000, 503);
    let moved = steerd_e2e::wait_until(Duration::from_secs(10), || {
        m.http(&["--url", &url("/"), "--count", "20", "--keepalive"])
            .count("reviews-v3")
            == 20
    });
    assert!(moved, "never failed over to us-west:\n{}", m.agent.log());
}

// ---------------------------------------------------------------------------------------------
// DestinationRule TLS origination
// ---------------------------------------------------------------------------------------------

#[path = "support/tls.rs"]
mod tls;

/// Istio's "egress TLS origination": the client speaks plain HTTP to a service's port 80, a
/// DestinationRule `tls: SIMPLE` makes the proxy open TLS to the endpoint (port 8443 of the v1
/// pod, a rustls server with a test certificate) with the configured SNI, verifying the
/// server against `caCertificates` and `subjectAltNames`. A wrong SAN, an unknown CA and a
/// unknown CA give 503 `UF` with the TLS error, while the other services keep serving. MUTUAL
/// presents the configured client certificate to a backend that requires one.
#[test]
fn destination_rule_tls_originates_and_verifies_the_server() {
    let ca = tls::Ca::new();
    let server_cert = ca.leaf("api.example.com");
    let certs = TempDir::new("steerd-l7-certs");
    let ca_file = certs.write("ca.pem", ca.pem());
    let service = |name: &str, vip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: {vip}\n  selector: {{app: reviews, version: v1}}\n  ports: [{{name: http, port: 80, targetPort: 8443}}]\n---\n"
        )
    };
    let dr = |host: &str, tls: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {host}}}\nspec:\n  host: {host}\n  trafficPolicy:\n    tls: {tls}\n---\n"
        )
    };
    let ca_path = ca_file.display().to_string();
    let services = [
        service("secure", "10.96.0.60"),
        service("wrong-san", "10.96.0.61"),
        service("unknown-ca", "10.96.0.62"),
    ]
    .concat();
    let rules = [
        dr(
            "secure",
            &format!("{{mode: SIMPLE, sni: api.example.com, caCertificates: {ca_path}}}"),
        ),
        dr(
            "wrong-san",
            &format!(
                "{{mode: SIMPLE, sni: api.example.com, caCertificates: {ca_path}, subjectAltNames: [other.example.com]}}"
            ),
        ),
        // No caCertificates: the system CAs, which never signed the test certificate.
        dr("unknown-ca", "{mode: SIMPLE, sni: api.example.com}"),
    ]
    .concat();
    let m = Mesh::start(&[("services.yaml", &services), ("tls-drs.yaml", &rules)]);
    // The pod's IPv4 and IPv6 addresses are both endpoints.
    let v1 = &m.backends[0];
    let _backends = [v1.sock_v4(8443), v1.sock_v6(8443)]
        .map(|addr| tls::TlsBackend::start_at(v1, addr, "secure-backend", &server_cert));

    let r = m.http(&["--url", "http://10.96.0.60/orders?id=7", "--count", "3"]);
    assert_eq!(r.status(200), 3, "{r:?}\n{}", m.agent.log());
    let sample = r.sample.as_ref().unwrap();
    assert_eq!(sample.headers["x-backend-id"], "secure-backend", "{r:?}");
    assert_eq!(sample.headers["x-sni"], "api.example.com", "{r:?}");
    assert!(
        sample
            .body
            .as_str()
            .is_some_and(|b| b.ends_with("GET /orders?id=7 HTTP/1.1")),
        "the request went through the TLS connection: {r:?}"
    );

    for (vip, why) in [
        ("10.96.0.61", "other.example.com"),
        ("10.96.0.62", "UnknownIssuer"),
    ] {
        let r = m.http(&["--url", &format!("http://{vip}/"), "--count", "2"]);
        assert_eq!(r.status(503), 2, "{vip}: {r:?}\n{}", m.agent.log());
        let body = r.sample.as_ref().unwrap().body.to_string();
        assert!(
            body.contains("reset reason: connection failure")
                && body.contains("transport failure reason: TLS_error")
                && body.contains(why),
            "{vip}: {body}\n{}",
            m.agent.log()
        );
    }

    // The rest serves: the mesh service, and the secure one again.
    let r = m.http(&["--url", &url("/"), "--count", "3"]);
    assert_eq!(r.status(200), 3, "{r:?}");
    let r = m.http(&["--url", "http://10.96.0.60/", "--count", "1"]);
    assert_eq!(r.status(200), 1, "{r:?}");

    // MUTUAL: a backend that requires a client certificate from the test CA (port 9443) gets
    // the one of `clientCertificate`/`privateKey`; SIMPLE to it fails the handshake.
    let client_cert = ca.leaf("client.example.com");
    let crt = certs.write("client.crt", &client_cert.cert_pem);
    let key = certs.write("client.key", &client_cert.key_pem);
    let _mutual = [v1.sock_v4(9443), v1.sock_v6(9443)].map(|addr| {
        tls::TlsBackend::start_with(v1, addr, "mutual-backend", &server_cert, Some(&ca))
    });
    let mutual_services = "apiVersion: v1\nkind: Service\nmetadata: {name: mutual}\nspec:\n  clusterIP: 10.96.0.63\n  selector: {app: reviews, version: v1}\n  ports: [{name: http, port: 80, targetPort: 9443}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: mutual-nocert}\nspec:\n  clusterIP: 10.96.0.64\n  selector: {app: reviews, version: v1}\n  ports: [{name: http, port: 80, targetPort: 9443}]\n---\n";
    let mutual_rules = [
        dr(
            "mutual",
            &format!(
                "{{mode: MUTUAL, sni: api.example.com, caCertificates: {ca_path}, clientCertificate: {}, privateKey: {}}}",
                crt.display(),
                key.display()
            ),
        ),
        dr(
            "mutual-nocert",
            &format!("{{mode: SIMPLE, sni: api.example.com, caCertificates: {ca_path}}}"),
        ),
    ]
    .concat();
    m.manifests
        .write("mutual.yaml", format!("{mutual_services}{mutual_rules}"));
    let mut last = None;
    let served = steerd_e2e::wait_until(Duration::from_secs(10), || {
        let r = m.http(&["--url", "http://10.96.0.63/m", "--count", "1"]);
        let ok = r.status(200) == 1
            && r.sample.as_ref().unwrap().headers["x-backend-id"] == "mutual-backend";
        last = Some(r);
        ok
    });
    assert!(served, "{last:?}\n{}", m.agent.log());
    let r = m.http(&["--url", "http://10.96.0.64/m", "--count", "1"]);
    assert_eq!(r.status(503), 1, "no client certificate, no request: {r:?}");

    // The TLS settings show in `inspect clusters`.
    let out = Agent::run_cli(
        &m.node,
        &["inspect", "clusters", "--admin", "127.0.0.1:15000"],
    );
    assert!(out.status.success(), "{out:?}");
    let clusters = String::from_utf8(out.stdout).unwrap();
    assert!(
        clusters
            .lines()
            .any(|l| l.starts_with("secure.default.svc.cluster.local ")
                && l.contains("SIMPLE sni=api.example.com ca=/")),
        "{clusters}"
    );
    assert!(
        clusters
            .lines()
            .any(|l| l.starts_with("unknown-ca.default") && l.contains("ca=system")),
        "{clusters}"
    );
}

#[test]
fn failover_priority_prefers_endpoints_labelled_like_the_client() {
    // The client Pod is `version: v1`. v1 is far away (another region), v2 and v3 local: with
    // failoverPriority [version] the labels decide, locality does not (no `failover` rules).
    let dr = |priority: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews}}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      simple: ROUND_ROBIN\n      localityLbSetting: {{failoverPriority: [{priority}]}}\n    outlierDetection: {{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 100}}\n"
        )
    };
    let m = Mesh::start_with(
        &[("dr.yaml", &dr("version"))],
        &[
            Some("us-west.zone1"),
            Some("us-east.zone1"),
            Some("us-east.zone1"),
        ],
        &["--locality", "us-east/zone1"],
    );
    let r = m.http(&["--url", &url("/"), "--count", "40", "--keepalive"]);
    assert_eq!(r.count("reviews-v1"), 40, "{r:?}\n{}", m.agent.log());

    // v1 fails: ejected, the next priority (every other version) shares the traffic.
    m.servers[0].fail_next(1000, 503);
    m.servers[1].fail_next(1000, 503);
    let ejected = steerd_e2e::wait_until(Duration::from_secs(10), || {
        m.http(&["--url", &url("/"), "--count", "20", "--keepalive"])
            .count("reviews-v1")
            == 0
    });
    assert!(ejected, "v1 was never failed over:\n{}", m.agent.log());
    let r = m.http(&["--url", &url("/"), "--count", "40", "--keepalive"]);
    assert!(
        r.count("reviews-v2") > 0 && r.count("reviews-v3") > 0,
        "v2 and v3 share the next priority: {r:?}"
    );
    assert_eq!(r.count("reviews-v2") + r.count("reviews-v3"), 40, "{r:?}");

    // A fixed value instead of the client's label: v3 first.
    m.manifests.write("dr.yaml", dr("version=v3"));
    let moved = steerd_e2e::wait_until(Duration::from_secs(10), || {
        m.http(&["--url", &url("/"), "--count", "20", "--keepalive"])
            .count("reviews-v3")
            == 20
    });
    assert!(moved, "version=v3 never preferred v3:\n{}", m.agent.log());
}
