//! `outboundTrafficPolicy: REGISTRY_ONLY` in the kernel: connects from the steered cgroup to
//! destinations no Service or ServiceEntry registers are refused with EPERM; registered ones,
//! service VIPs and loopback pass. Only addresses inside the test's own netns are dialled.

use std::time::Duration;
use steerd_e2e::{
    Agent, BpffsDir, Node, Pod, TcpIdentityServer, TempDir, TestCgroup, admin_addr, run_probe,
    wait_until,
};

const LOCKED_UID: &str = "3f0c9a52-7d1e-4b8a-9c6f-0a1b2c3d4e5f";
const FREE_UID: &str = "8e2d4b61-1a3c-4f5e-b7d9-f0e1d2c3b4a5";
/// A Pod like `locked` whose cgroup only appears while the agent runs.
const LATE_UID: &str = "c41f7e08-5b2a-4d93-8e16-7a0b9c2d1e3f";

/// A Sidecar in namespace `default` selecting `app: APP` with outbound MODE.
fn workload_sidecar(app: &str, mode: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: {app}, namespace: default}}\nspec:\n  workloadSelector: {{labels: {{app: {app}}}}}\n  outboundTrafficPolicy: {{mode: {mode}}}\n"
    )
}

const ROOT_SIDECAR: &str = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: istio-system}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n";

struct Egress {
    agent: Agent,
    manifests: TempDir,
    /// Pod cgroups below `client` (dropped first: a cgroup with children cannot be removed).
    pods: Vec<TestCgroup>,
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
    // Two workloads as kubelet lays them out: a cgroupfs-style and a systemd-style pod cgroup,
    // for Pods carrying these uids.
    let pods = vec![
        client.child(&format!("pod{LOCKED_UID}")),
        client.child(&format!(
            "kubepods-burstable-pod{}.slice",
            FREE_UID.replace('-', "_")
        )),
    ];
    manifests.write(
        "pods.yaml",
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: locked, uid: {LOCKED_UID}, labels: {{app: locked}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: free, uid: {FREE_UID}, labels: {{app: free}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: late, uid: {LATE_UID}, labels: {{app: locked}}}}\n"
        ),
    );
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
        pods,
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
        self.connect_from(&self.client, to)
    }
    fn connect_from(&self, cgroup: &TestCgroup, to: &str) -> steerd_e2e::ProbeResult {
        run_probe(
            Some(&self.node.netns),
            Some(cgroup),
            &["tcp", "--to", to, "--count", "3", "--timeout-ms", "500"],
        )
    }
    /// The cgroups of the Pods `locked` and `free`.
    fn locked(&self) -> &TestCgroup {
        &self.pods[0]
    }
    fn free(&self) -> &TestCgroup {
        &self.pods[1]
    }
    fn config_dump(&self) -> serde_json::Value {
        let body = self.node.netns.run_in(|| {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(admin_addr()).expect("admin listener");
            s.write_all(
                b"GET /debug/config_dump HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default()
        });
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("config_dump is not JSON ({e}): {body}"))
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

#[test]
fn a_workload_sidecar_sets_registry_only_for_its_pod_only() {
    let e = start(&[]);
    let stray = format!("{}:8080", e.unregistered.ipv4);
    let web = format!("{}:8080", e.registered.ipv4);
    e.manifests
        .write("locked.yaml", workload_sidecar("locked", "REGISTRY_ONLY"));
    // The Sidecar is in force once the locked Pod's cgroup is in the kernel's map.
    assert!(
        wait_until(Duration::from_secs(10), || {
            e.egress()["workloads"]
                .as_array()
                .is_some_and(|w| w.iter().any(|w| w["pod_uid"] == LOCKED_UID))
        }),
        "{:#}\n{}",
        e.egress(),
        e.agent.log()
    );
    let view = e.egress();
    assert_eq!(view["outbound_traffic_policy"], "ALLOW_ANY", "{view:#}");
    let workloads = view["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 1, "only the selected Pod: {view:#}");
    assert_eq!(workloads[0]["outbound_traffic_policy"], "REGISTRY_ONLY");

    let refused = e.connect_from(e.locked(), &stray);
    assert_eq!(refused.failures, 3, "{refused:?}");
    assert!(
        refused.errors.iter().all(|m| m.contains("not permitted")),
        "{refused:?}"
    );
    assert_eq!(e.connect_from(e.free(), &stray).successes(), 3, "other Pod");
    // A Pod whose cgroup appears now (kubelet starting it) is found and gets its policy.
    let late = e.client.child(&format!("pod{LATE_UID}"));
    assert!(
        wait_until(Duration::from_secs(10), || e
            .connect_from(&late, &stray)
            .failures
            == 3),
        "{:#}\n{}",
        e.egress(),
        e.agent.log()
    );
    drop(late);
    assert_eq!(
        e.connect(&stray).successes(),
        3,
        "a process outside any pod cgroup gets the mesh default"
    );
    for pod in [e.locked(), e.free()] {
        assert_eq!(
            e.connect_from(pod, &web).successes(),
            3,
            "registered endpoint"
        );
        assert_eq!(
            e.connect_from(pod, "10.96.0.80:80").counts.get("web"),
            Some(&3),
            "service VIP"
        );
    }
    let dump = e.config_dump();
    let outbound = &dump["outbound"];
    assert_eq!(
        outbound["workloads"][0]["pod"], "default/locked",
        "{outbound:#}"
    );
    assert_eq!(outbound["workloads"][0]["sidecar"], "default/locked");
    assert_eq!(outbound["workloads"][0]["policy"], "REGISTRY_ONLY");

    // A live change of the Sidecar flips the Pod without a restart.
    e.manifests
        .write("locked.yaml", workload_sidecar("locked", "ALLOW_ANY"));
    assert!(
        wait_until(Duration::from_secs(10), || e
            .connect_from(e.locked(), &stray)
            .successes()
            == 3),
        "{:#}\n{}",
        e.egress(),
        e.agent.log()
    );
    // Now select the other Pod instead.
    e.manifests
        .write("locked.yaml", workload_sidecar("free", "REGISTRY_ONLY"));
    assert!(
        wait_until(Duration::from_secs(10), || e
            .connect_from(e.free(), &stray)
            .failures
            == 3),
        "{:#}\n{}",
        e.egress(),
        e.agent.log()
    );
    assert_eq!(e.connect_from(e.locked(), &stray).successes(), 3);
    // Without the Sidecar the kernel's per-workload map empties again.
    std::fs::remove_file(e.manifests.path().join("locked.yaml")).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || e.egress()["workloads"]
            .as_array()
            .is_some_and(Vec::is_empty)),
        "{:#}",
        e.egress()
    );
    assert_eq!(e.connect_from(e.free(), &stray).successes(), 3);
}

#[test]
fn a_workload_sidecar_allows_any_for_its_pod_in_a_registry_only_mesh() {
    let e = start(&["--outbound-traffic-policy", "REGISTRY_ONLY"]);
    let stray = format!("{}:8080", e.unregistered.ipv4);
    // A namespace default without a mode leaves the mesh config in charge; the workload's own
    // Sidecar wins over it.
    e.manifests.write(
        "sidecars.yaml",
        workload_sidecar("free", "ALLOW_ANY")
            + "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: default}\nspec:\n  egress: [{hosts: [\"./*\"]}]\n",
    );
    assert!(
        wait_until(Duration::from_secs(10), || e
            .connect_from(e.free(), &stray)
            .successes()
            == 3),
        "{:#}\n{}",
        e.egress(),
        e.agent.log()
    );
    let refused = e.connect_from(e.locked(), &stray);
    assert_eq!(refused.failures, 3, "{refused:?}");
    assert_eq!(e.connect(&stray).failures, 3, "mesh default");
    assert_eq!(
        e.connect_from(e.locked(), &format!("{}:8080", e.registered.ipv4))
            .successes(),
        3
    );
    assert_eq!(
        e.connect_from(e.free(), "10.96.0.80:80").counts.get("web"),
        Some(&3)
    );
    let view = e.egress();
    let mut policies: Vec<(String, String)> = view["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["pod_uid"].as_str().unwrap_or("?").to_string(),
                w["outbound_traffic_policy"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    policies.sort();
    let mut want = vec![
        (LOCKED_UID.to_string(), "REGISTRY_ONLY".to_string()),
        (FREE_UID.to_string(), "ALLOW_ANY".to_string()),
    ];
    want.sort();
    assert_eq!(policies, want, "{view:#}");
}
