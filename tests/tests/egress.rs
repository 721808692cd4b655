//! `outboundTrafficPolicy: REGISTRY_ONLY` in the kernel: connects from the steered cgroup to
//! destinations no Service or ServiceEntry registers are refused with EPERM; registered ones,
//! service VIPs and loopback pass. Only addresses inside the test's own netns are dialled.

use std::time::Duration;
use steerd_e2e::{
    Agent, BpffsDir, Node, Pod, TcpIdentityServer, TempDir, TestCgroup, admin_addr, run_probe,
    wait_until,
};

const ROOT_SIDECAR: &str = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: istio-system}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n";

struct Egress {
    agent: Agent,
    manifests: TempDir,
    client: TestCgroup,
    bpffs: BpffsDir,
    _servers: Vec<TcpIdentityServer>,
    registered: Pod,
    unregistered: Pod,
    node: Node,
}

fn start(extra_args: &[&str]) -> Egress {
    let node = Node::new();
    let registered = node.add_pod("web");
    let unregistered = node.add_pod("stray");
    let servers = vec![
        TcpIdentityServer::start(&registered, registered.sock_v4(8080), "web"),
        TcpIdentityServer::start(&unregistered, unregistered.sock_v4(8080), "stray"),
        TcpIdentityServer::start(&node, "127.0.0.1:7070".parse().unwrap(), "loopback"),
    ];
    let manifests = TempDir::new("steerd-egress");
    manifests.write(
        "web.yaml",
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.80, selector: {{app: web}}, ports: [{{name: tcp, port: 80, targetPort: 8080}}]}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-1, labels: {{app: web}}}}\nstatus: {{podIP: {}}}\n",
            registered.ipv4
        ),
    );
    let client = TestCgroup::new();
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
        client.path().to_str().unwrap(),
        "--admin",
        &admin,
    ];
    args.extend_from_slice(extra_args);
    let mut agent = Agent::spawn(&node, &args);
    agent.wait_ready(admin_addr(), Duration::from_secs(20));
    Egress {
        agent,
        manifests,
        client,
        bpffs,
        _servers: servers,
        registered,
        unregistered,
        node,
    }
}

impl Egress {
    fn connect(&self, to: &str) -> steerd_e2e::ProbeResult {
        run_probe(
            Some(&self.node.netns),
            Some(&self.client),
            &["tcp", "--to", to, "--count", "3", "--timeout-ms", "500"],
        )
    }
    fn egress(&self) -> serde_json::Value {
        Agent::run_cli_json(
            &self.node,
            &[
                "maps",
                "egress",
                "-o",
                "json",
                "--bpffs",
                self.bpffs.as_str(),
            ],
        )
    }
}

#[test]
fn registry_only_from_the_root_sidecar_refuses_unregistered_destinations() {
    let e = start(&[]);
    let stray = format!("{}:8080", e.unregistered.ipv4);
    let web = format!("{}:8080", e.registered.ipv4);
    // ALLOW_ANY is the default.
    assert_eq!(
        e.connect(&stray).successes(),
        3,
        "ALLOW_ANY lets anything through"
    );
    assert_eq!(e.egress()["outbound_traffic_policy"], "ALLOW_ANY");

    e.manifests.write("mesh-sidecar.yaml", ROOT_SIDECAR);
    assert!(
        wait_until(
            Duration::from_secs(10),
            || e.egress()["outbound_traffic_policy"] == "REGISTRY_ONLY"
        ),
        "{:#}",
        e.egress()
    );
    let refused = e.connect(&stray);
    assert_eq!(refused.failures, 3, "{refused:?}");
    assert!(
        refused.errors.iter().all(|m| m.contains("not permitted")),
        "a clear errno (EPERM): {refused:?}"
    );
    // Registered endpoints, service VIPs and loopback still pass.
    assert_eq!(e.connect(&web).successes(), 3, "registered endpoint");
    assert_eq!(
        e.connect("10.96.0.80:80").counts.get("web"),
        Some(&3),
        "service VIP"
    );
    assert_eq!(e.connect("127.0.0.1:7070").successes(), 3, "loopback");

    let view = e.egress();
    assert!(
        view["registered"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == &format!("{}/32", e.registered.ipv4)),
        "{view:#}"
    );
    let denied = view["denied"].as_array().unwrap();
    assert!(
        denied
            .iter()
            .any(|d| d[0] == e.unregistered.ipv4.to_string() && d[1].as_u64() >= Some(3)),
        "{view:#}"
    );
    let metrics = e.node.netns.run_in(|| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(admin_addr()).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    assert!(
        metrics.contains(&format!(
            "steerd_egress_denied_total{{destination_ip=\"{}\"}}",
            e.unregistered.ipv4
        )),
        "{metrics}"
    );

    // Back to ALLOW_ANY when the Sidecar goes.
    std::fs::remove_file(e.manifests.path().join("mesh-sidecar.yaml")).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || e.connect(&stray).successes()
            == 3),
        "{}",
        e.agent.log()
    );
}

#[test]
fn mesh_config_flag_sets_registry_only() {
    let e = start(&["--outbound-traffic-policy", "REGISTRY_ONLY"]);
    assert_eq!(
        e.connect(&format!("{}:8080", e.unregistered.ipv4)).failures,
        3
    );
    assert_eq!(
        e.connect(&format!("{}:8080", e.registered.ipv4))
            .successes(),
        3
    );
}
