//! The L4 slice end to end on the real kernel: Istio YAML → agent → pinned BPF maps → steered
//! connect()/sendmsg() from a test cgroup → identity servers in pod network namespaces.
//!
//! Every VIP is dialled from inside the node netns, which has no default route: a connection
//! the programs do not steer fails there instead of leaving the machine.

use std::time::{Duration, Instant};
use steerd_e2e::{
    Agent, BpffsDir, Node, Pod, ProbeResult, TcpIdentityServer, TempDir, TestCgroup,
    UdpIdentityServer, admin_addr, assert_split, run_probe, spawn_probe, wait_until,
};

const VIP4: &str = "10.96.0.20";
const VIP6: &str = "fd00:96::20";
const SPLIT_CONNECTS: u64 = 2_000;
const SIGMAS: f64 = 4.0;

fn shared(path: &str) -> String {
    let p = format!(
        "{}/../../shared/istio/samples/{path}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// Istio's tcp-echo Service with the dual-stack cluster IPs an API server would assign.
fn tcp_echo_service() -> String {
    shared("tcp-echo/tcp-echo-services.yaml").replace(
        "spec:\n  ports:",
        &format!("spec:\n  clusterIPs: [{VIP4}, \"{VIP6}\"]\n  ipFamilies: [IPv4, IPv6]\n  ports:"),
    )
}

/// A Pod object as the kubelet would report it, for a test pod netns.
fn pod_manifest(name: &str, version: &str, pod: &Pod) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: tcp-echo, version: {version}}}\nspec:\n  containers: [{{name: tcp-echo, ports: [{{containerPort: 9000}}, {{containerPort: 9001}}]}}]\nstatus:\n  phase: Running\n  podIP: {}\n  podIPs: [{{ip: {}}}, {{ip: \"{}\"}}]\n",
        pod.ipv4, pod.ipv4, pod.ipv6
    )
}

/// The sample's 80/20 route bound to the mesh (the shipped one is bound to an ingress gateway).
fn mesh_route(w1: u32, w2: u32) -> String {
    shared("tcp-echo/tcp-echo-20-v2.yaml")
        .replace("name: tcp-echo\n", "name: tcp-echo-mesh\n")
        .replace(
            "  - \"*\"\n  gateways:\n  - tcp-echo-gateway",
            "  - tcp-echo\n  gateways:\n  - mesh",
        )
        .replace("port: 31400", "port: 9000")
        .replace("weight: 80", &format!("weight: {w1}"))
        .replace("weight: 20", &format!("weight: {w2}"))
}

/// A node with tcp-echo v1 and v2 pods serving TCP on 9000/9001 (IPv4 and IPv6), an agent over
/// a watched manifest directory, and a cgroup whose processes are steered.
struct TcpEcho {
    // Field order is drop order: the agent goes before the pins, netns and cgroup it uses.
    agent: Agent,
    manifests: TempDir,
    client: TestCgroup,
    bpffs: BpffsDir,
    _servers: Vec<TcpIdentityServer>,
    v1: Pod,
    v2: Pod,
    node: Node,
}

impl TcpEcho {
    fn start(extra: &[(&str, String)]) -> TcpEcho {
        let node = Node::new();
        let v1 = node.add_pod("tcp-echo-v1");
        let v2 = node.add_pod("tcp-echo-v2");
        let mut servers = Vec::new();
        for (pod, id) in [(&v1, "v1"), (&v2, "v2")] {
            for port in [9000, 9001] {
                servers.push(TcpIdentityServer::start(
                    pod,
                    pod.sock_v4(port),
                    &format!("{id}:{port}"),
                ));
                servers.push(TcpIdentityServer::start(
                    pod,
                    pod.sock_v6(port),
                    &format!("{id}:{port}"),
                ));
            }
        }
        let manifests = TempDir::new("steerd-manifests");
        manifests.write("tcp-echo-services.yaml", tcp_echo_service());
        manifests.write(
            "pods.yaml",
            format!(
                "{}---\n{}",
                pod_manifest("tcp-echo-v1-a", "v1", &v1),
                pod_manifest("tcp-echo-v2-a", "v2", &v2)
            ),
        );
        for (name, text) in extra {
            manifests.write(name, text);
        }
        let client = TestCgroup::new();
        let bpffs = BpffsDir::new();
        let agent = spawn_agent(&node, &manifests, &bpffs, &client);
        TcpEcho {
            agent,
            manifests,
            client,
            bpffs,
            _servers: servers,
            v1,
            v2,
            node,
        }
    }

    fn probe(&self, args: &[&str]) -> ProbeResult {
        run_probe(Some(&self.node.netns), Some(&self.client), args)
    }

    fn tcp(&self, to: &str, count: u64) -> ProbeResult {
        let count = count.to_string();
        self.probe(&["tcp", "--to", to, "--count", &count])
    }

    fn maps_backends(&self) -> serde_json::Value {
        Agent::run_cli_json(
            &self.node,
            &[
                "maps",
                "backends",
                "-o",
                "json",
                "--bpffs",
                self.bpffs.as_str(),
            ],
        )
    }

    /// Waits until the kernel gives `backend` the share `percent` of `vip:port`.
    fn wait_for_weight(&self, vip: &str, port: u16, backend: &str, percent: f64) {
        let ok = wait_until(Duration::from_secs(10), || {
            self.maps_backends().as_array().unwrap().iter().any(|r| {
                r["vip"] == vip
                    && r["port"] == port
                    && r["backend"] == backend
                    && (r["weight"].as_f64().unwrap() - percent).abs() < 0.01
            })
        });
        assert!(
            ok,
            "{vip}:{port} → {backend} never reached {percent}%: {:#}\nagent log:\n{}",
            self.maps_backends(),
            self.agent.log()
        );
    }
}

fn spawn_agent(node: &Node, manifests: &TempDir, bpffs: &BpffsDir, client: &TestCgroup) -> Agent {
    let source = format!("files:{}", manifests.as_str());
    let admin = admin_addr().to_string();
    let mut agent = Agent::spawn(
        node,
        &[
            "run",
            "--source",
            &source,
            "--bpffs",
            bpffs.as_str(),
            "--cgroup",
            client.path().to_str().unwrap(),
            "--admin",
            &admin,
        ],
    );
    agent.wait_ready(admin_addr(), Duration::from_secs(20));
    agent
}

/// Sum of the samples of one metric whose labels include all of `labels`.
fn metric(t: &TcpEcho, name: &str, labels: &[(&str, &str)]) -> f64 {
    steerd_e2e::metric_sum(&steerd_e2e::admin_get(&t.node, "/metrics"), name, labels)
}

fn assert_clean(r: &ProbeResult, what: &str) {
    assert_eq!(r.failures, 0, "{what}: failures: {r:?}");
    assert_eq!(
        r.peer_mismatches, 0,
        "{what}: getpeername/recvfrom showed a backend, not the VIP: {r:?}"
    );
}

#[test]
fn tcp_echo_80_20_split_through_the_vip() {
    let dr = shared("tcp-echo/tcp-echo-all-v1.yaml");
    let t = TcpEcho::start(&[
        ("tcp-echo-all-v1.yaml", dr),
        ("mesh-route.yaml", mesh_route(80, 20)),
    ]);
    let to = format!("{VIP4}:9000");
    let r = t.tcp(&to, SPLIT_CONNECTS);
    assert_clean(&r, "80/20");
    assert_split(&r.counts, &[("v1:9000", 0.8), ("v2:9000", 0.2)], SIGMAS);

    // The kernel counted every connection per backend, and /metrics reports it with Istio's
    // names and labels: exactly the connects each version answered, all closed, and the
    // identity line ("v1:9000\n", 8 bytes) received on each.
    for version in ["v1", "v2"] {
        let answered = r.counts[&format!("{version}:9000")] as f64;
        let series = |name: &str| {
            metric(
                &t,
                name,
                &[
                    ("destination_service", "tcp-echo.default.svc.cluster.local"),
                    ("destination_version", version),
                    ("destination_app", "tcp-echo"),
                ],
            )
        };
        assert_eq!(
            series("istio_tcp_connections_opened_total"),
            answered,
            "{version}"
        );
        let closed = wait_until(Duration::from_secs(5), || {
            series("istio_tcp_connections_closed_total") == answered
        });
        assert!(
            closed,
            "{version}: closed {} of {answered}",
            series("istio_tcp_connections_closed_total")
        );
        assert_eq!(
            series("istio_tcp_received_bytes_total"),
            answered * 8.0,
            "{version}"
        );
    }

    // The route matches port 9000 only; 9001 splits evenly over both pods.
    let r = t.tcp(&format!("{VIP4}:9001"), 1_000);
    assert_clean(&r, "9001");
    assert_split(&r.counts, &[("v1:9001", 0.5), ("v2:9001", 0.5)], SIGMAS);

    // A second process reads the same split from the pinned maps.
    let rows = t.maps_backends();
    let weight = |backend: String| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["vip"] == VIP4 && r["port"] == 9000 && r["backend"] == backend)
            .map(|r| r["weight"].as_f64().unwrap())
    };
    assert_eq!(
        weight(format!("{}:9000", t.v1.ipv4)),
        Some(80.0),
        "{rows:#}"
    );
    assert_eq!(
        weight(format!("{}:9000", t.v2.ipv4)),
        Some(20.0),
        "{rows:#}"
    );

    // `steerd inspect listeners` names the route and the subset clusters.
    let out = Agent::run_cli(
        &t.node,
        &[
            "inspect",
            "listeners",
            "--port",
            "9000",
            "--admin",
            "127.0.0.1:15000",
        ],
    );
    let listeners = String::from_utf8_lossy(&out.stdout);
    assert!(
        listeners.lines().any(|l| l.starts_with(VIP4)
            && l.contains(" L4 ")
            && l.contains("VirtualService default/tcp-echo-mesh tcp[0] -> outbound|9000|v1|tcp-echo.default.svc.cluster.local,outbound|9000|v2|tcp-echo.default.svc.cluster.local")),
        "{listeners}"
    );
}

#[test]
fn gateway_bound_virtual_service_does_not_steer_mesh_traffic() {
    // The sample exactly as shipped: its VirtualService is bound to tcp-echo-gateway.
    let t = TcpEcho::start(&[(
        "tcp-echo-all-v1.yaml",
        shared("tcp-echo/tcp-echo-all-v1.yaml"),
    )]);
    let r = t.tcp(&format!("{VIP4}:9000"), 1_000);
    assert_clean(&r, "gateway-bound");
    assert_split(&r.counts, &[("v1:9000", 0.5), ("v2:9000", 0.5)], SIGMAS);
}

#[test]
fn ipv6_vip_is_steered_to_ipv6_backends() {
    let dr = shared("tcp-echo/tcp-echo-all-v1.yaml");
    let t = TcpEcho::start(&[("dr.yaml", dr), ("mesh-route.yaml", mesh_route(80, 20))]);
    let r = t.tcp(&format!("[{VIP6}]:9000"), SPLIT_CONNECTS);
    assert_clean(&r, "IPv6");
    assert_split(&r.counts, &[("v1:9000", 0.8), ("v2:9000", 0.2)], SIGMAS);
    let rows = t.maps_backends();
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["vip"] == VIP6 && r["backend"] == format!("[{}]:9000", t.v1.ipv6)),
        "{rows:#}"
    );
}

#[test]
fn live_weight_change_removal_and_invalid_yaml() {
    let dr = shared("tcp-echo/tcp-echo-all-v1.yaml");
    let t = TcpEcho::start(&[("dr.yaml", dr), ("mesh-route.yaml", mesh_route(100, 0))]);
    let to = format!("{VIP4}:9000");
    let r = t.tcp(&to, 300);
    assert_clean(&r, "100/0");
    assert_split(&r.counts, &[("v1:9000", 1.0)], SIGMAS);

    // Live weight change through the watched directory.
    t.manifests.write("mesh-route.yaml", mesh_route(0, 100));
    t.wait_for_weight(VIP4, 9000, &format!("{}:9000", t.v2.ipv4), 100.0);
    let r = t.tcp(&to, 300);
    assert_clean(&r, "0/100");
    assert_split(&r.counts, &[("v2:9000", 1.0)], SIGMAS);

    t.manifests.write("mesh-route.yaml", mesh_route(1, 3));
    t.wait_for_weight(VIP4, 9000, &format!("{}:9000", t.v2.ipv4), 75.0);
    let r = t.tcp(&to, SPLIT_CONNECTS);
    assert_clean(&r, "1/3");
    assert_split(&r.counts, &[("v1:9000", 0.25), ("v2:9000", 0.75)], SIGMAS);

    // Invalid YAML in the route file: reported, and the last good plan keeps serving.
    t.manifests.write("mesh-route.yaml", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: tcp-echo-mesh\n");
    t.manifests.write(
        "typo.yaml",
        mesh_route(100, 0).replace("weight: 100", "weight: all"),
    );
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        t.agent.log().contains("typo.yaml"),
        "the bad file is reported by name"
    );
    let r = t.tcp(&to, SPLIT_CONNECTS);
    assert_clean(&r, "after invalid YAML");
    assert_split(&r.counts, &[("v1:9000", 0.25), ("v2:9000", 0.75)], SIGMAS);
    let mut agent = t.agent;
    assert!(
        agent.try_wait().is_none(),
        "the agent survived bad input:\n{}",
        agent.log()
    );
    let t = TcpEcho { agent, ..t };

    // Removing the Service removes its VIP: connects are no longer steered and die in the node.
    std::fs::remove_file(t.manifests.path().join("tcp-echo-services.yaml")).unwrap();
    let gone = wait_until(Duration::from_secs(10), || {
        !t.maps_backends()
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["vip"] == VIP4)
    });
    assert!(gone, "service still in the maps: {:#}", t.maps_backends());
    let r = t.probe(&["tcp", "--to", &to, "--count", "3", "--timeout-ms", "300"]);
    assert_eq!(r.failures, 3, "a removed VIP must not be steered: {r:?}");
}

#[test]
fn service_from_pods_with_subsets_and_no_endpoint_slices() {
    // A Service whose endpoints come from Pods (no EndpointSlice), split by subset labels, plus
    // a service with no endpoints at all.
    let dr = "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: echo}\nspec:\n  host: tcp-echo.default.svc.cluster.local\n  subsets:\n  - {name: one, labels: {version: v1}}\n  - {name: two, labels: {version: v2}}\n";
    let vs = "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {name: echo}\nspec:\n  hosts: [tcp-echo]\n  tcp:\n  - route:\n    - destination: {host: tcp-echo, subset: two}\n";
    let empty = "apiVersion: v1\nkind: Service\nmetadata: {name: empty}\nspec: {clusterIP: 10.96.0.30, selector: {app: nothing}, ports: [{port: 80}]}\n";
    let t = TcpEcho::start(&[
        ("dr.yaml", dr.into()),
        ("vs.yaml", vs.into()),
        ("empty.yaml", empty.into()),
    ]);
    let r = t.tcp(&format!("{VIP4}:9001"), 300);
    assert_clean(&r, "subset two");
    assert_split(&r.counts, &[("v2:9001", 1.0)], SIGMAS);

    // No backends: rejected at connect() right away (EPERM), not sent into the void.
    let started = Instant::now();
    let r = t.probe(&[
        "tcp",
        "--to",
        "10.96.0.30:80",
        "--count",
        "3",
        "--timeout-ms",
        "2000",
    ]);
    assert_eq!(r.failures, 3, "{r:?}");
    assert!(
        r.errors.iter().any(|e| e.contains("not permitted")),
        "{r:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "rejections must be immediate"
    );
}

#[test]
fn udp_connected_and_unconnected() {
    let node = Node::new();
    let a = node.add_pod("dns-a");
    let b = node.add_pod("dns-b");
    let _servers: Vec<UdpIdentityServer> = [(&a, "a"), (&b, "b")]
        .into_iter()
        .flat_map(|(p, id)| {
            [
                UdpIdentityServer::start(p, p.sock_v4(5353), id),
                UdpIdentityServer::start(p, p.sock_v6(5353), id),
            ]
        })
        .collect();
    let manifests = TempDir::new("steerd-manifests");
    let pod = |name: &str, p: &Pod| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: dns}}}}\nstatus: {{podIP: {}, podIPs: [{{ip: {}}}, {{ip: \"{}\"}}]}}\n",
            p.ipv4, p.ipv4, p.ipv6
        )
    };
    manifests.write(
        "dns.yaml",
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: dns}}\nspec: {{clusterIPs: [10.96.0.10, \"fd00:96::10\"], selector: {{app: dns}}, ports: [{{name: dns, port: 53, targetPort: 5353, protocol: UDP}}]}}\n---\n{}---\n{}",
            pod("a", &a),
            pod("b", &b)
        ),
    );
    let client = TestCgroup::new();
    let bpffs = BpffsDir::new();
    let _agent = spawn_agent(&node, &manifests, &bpffs, &client);
    for to in ["10.96.0.10:53", "[fd00:96::10]:53"] {
        let connected = run_probe(
            Some(&node.netns),
            Some(&client),
            &["udp", "--to", to, "--count", "1000", "--connected"],
        );
        assert_clean(&connected, &format!("connected UDP {to}"));
        assert_split(&connected.counts, &[("a", 0.5), ("b", 0.5)], SIGMAS);
        // Unconnected: sendto/recvfrom on one socket per attempt; recvfrom must show the VIP.
        let unconnected = run_probe(
            Some(&node.netns),
            Some(&client),
            &["udp", "--to", to, "--count", "300"],
        );
        assert_clean(&unconnected, &format!("unconnected UDP {to}"));
        assert_eq!(unconnected.successes(), 300);
    }
}

#[test]
fn kill9_and_restart_lose_no_connects() {
    let dr = shared("tcp-echo/tcp-echo-all-v1.yaml");
    let mut t = TcpEcho::start(&[("dr.yaml", dr), ("mesh-route.yaml", mesh_route(80, 20))]);
    let to = format!("{VIP4}:9000");
    let probe = spawn_probe(
        Some(&t.node.netns),
        Some(&t.client),
        &[
            "loop",
            "--to",
            &to,
            "--duration-ms",
            "6000",
            "--interval-ms",
            "2",
        ],
    );

    std::thread::sleep(Duration::from_millis(1000));
    t.agent.kill9();
    // Steering continues from the pinned links and maps with no agent at all.
    std::thread::sleep(Duration::from_millis(1000));
    let mut agent = spawn_agent(&t.node, &t.manifests, &t.bpffs, &t.client);
    std::thread::sleep(Duration::from_millis(1000));
    // A second generation replaces the first's links while traffic flows.
    agent.kill9();
    // Pins of maps an earlier layout used (per-CPU counters): stand-ins made by hard-linking
    // current maps under the retired names. The next agent must unpin them.
    let maps_dir = t.bpffs.path().join("maps");
    const RETIRED: [&str; 2] = ["sd_stats_v1", "sd_authz_dny_v1"];
    for (current, retired) in ["sd_stats_v2", "sd_authz_dny_v2"].iter().zip(RETIRED) {
        std::fs::hard_link(maps_dir.join(current), maps_dir.join(retired))
            .unwrap_or_else(|e| panic!("linking {current} as {retired}: {e}"));
    }
    agent = spawn_agent(&t.node, &t.manifests, &t.bpffs, &t.client);
    t.agent = agent;
    for retired in RETIRED {
        assert!(
            !maps_dir.join(retired).exists(),
            "the retired pin {retired} is still there"
        );
    }
    for current in ["sd_stats_v2", "sd_authz_dny_v2"] {
        assert!(maps_dir.join(current).exists(), "{current} is not pinned");
    }

    let r = probe.wait();
    assert!(
        r.attempts > 200,
        "the loop made too few attempts to prove anything: {r:?}"
    );
    assert_eq!(
        r.failures, 0,
        "connects failed across kill -9 and restart: {r:?}"
    );
    assert_eq!(r.peer_mismatches, 0, "{r:?}");
    assert_split(&r.counts, &[("v1:9000", 0.8), ("v2:9000", 0.2)], SIGMAS);

    // The adopted maps are under the new agent's control.
    t.manifests.write("mesh-route.yaml", mesh_route(0, 100));
    t.wait_for_weight(VIP4, 9000, &format!("{}:9000", t.v2.ipv4), 100.0);
    let r = t.tcp(&to, 200);
    assert_clean(&r, "after restart");
    assert_split(&r.counts, &[("v2:9000", 1.0)], SIGMAS);
    // Exactly one generation of links is pinned: the cgroup programs, and the authorization
    // program once per pod veth (by default the agent attaches it to every `veth*`).
    let (authz, cgroup): (Vec<_>, Vec<_>) = std::fs::read_dir(t.bpffs.path().join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .partition(|name| name.starts_with("sd_authz_if"));
    assert_eq!(cgroup.len(), 9, "{cgroup:?}");
    assert_eq!(authz.len(), 2, "{authz:?}");
}
