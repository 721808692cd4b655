//! AuthorizationPolicy end to end: HTTP requests authorized by the L7 proxy (403
//! `RBAC: access denied`, as Envoy answers) and TCP connections refused in the kernel with a
//! reset at the destination pod's veth, with real servers in pod netns and real clients.
//!
//! Topology (per the safety rules): a node netns without a default route, where the agent runs
//! and the node address lives on its loopback; client and server pods behind veths. Clients run
//! inside the steered test cgroup; the agent's TC program is attached only to the node side of
//! the test's own veths.

use std::time::Duration;
use steerd_e2e::{
    Agent, BpffsDir, HttpIdentityServer, HttpProbeResult, Node, Pod, ProbeResult,
    TcpIdentityServer, TempDir, TestCgroup, admin_addr, run_http_probe, run_probe, wait_until,
};

const NODE_IP4: &str = "10.250.0.1";
const WEB_VIP: &str = "10.96.0.80";
const DB_VIP: &str = "10.96.0.54";
/// How long a configuration change may take to reach the dataplane.
const RELOAD: Duration = Duration::from_secs(15);

/// Pods: `client` and `intruder` (clients, namespaces `shop` and `other`), `web-1`/`web-2`
/// (HTTP on 8080, Service `web` port 80), `db` (TCP on 5432, Service `db` port 5432).
struct Cluster {
    agent: Agent,
    /// The agent's command line, for restarts.
    args: Vec<String>,
    manifests: TempDir,
    clients: TestCgroup,
    bpffs: BpffsDir,
    web_servers: Vec<HttpIdentityServer>,
    db_server: TcpIdentityServer,
    _db_server_v6: TcpIdentityServer,
    client: Pod,
    intruder: Pod,
    web: Vec<Pod>,
    db: Pod,
    node: Node,
}

fn pod(name: &str, namespace: &str, app: &str, pod: &Pod) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{app: {app}}}}}\nstatus: {{phase: Running, podIP: {}, podIPs: [{{ip: {}}}, {{ip: \"{}\"}}], hostIP: {NODE_IP4}}}\n---\n",
        pod.ipv4, pod.ipv4, pod.ipv6
    )
}

/// An AuthorizationPolicy document.
fn policy(name: &str, spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}"
    )
}

impl Cluster {
    fn start(policies: &[(&str, String)]) -> Cluster {
        let node = Node::new();
        node.netns
            .ip(&["addr", "add", &format!("{NODE_IP4}/32"), "dev", "lo"]);
        let client = node.add_pod("client");
        let intruder = node.add_pod("intruder");
        let web: Vec<Pod> = (1..=2).map(|i| node.add_pod(&format!("web-{i}"))).collect();
        let db = node.add_pod("db");
        let web_servers = web
            .iter()
            .enumerate()
            .map(|(i, p)| HttpIdentityServer::start(p, p.sock_v4(8080), &format!("web-{}", i + 1)))
            .collect();
        let db_server = TcpIdentityServer::start(&db, db.sock_v4(5432), "db");
        let db_server_v6 = TcpIdentityServer::start(&db, db.sock_v6(5432), "db");
        let mut pods = pod("client", "shop", "client", &client);
        pods += &pod("intruder", "other", "intruder", &intruder);
        for (i, p) in web.iter().enumerate() {
            pods += &pod(&format!("web-{}", i + 1), "shop", "web", p);
        }
        pods += &pod("db", "shop", "db", &db);
        let manifests = TempDir::new("steerd-authz");
        manifests.write(
            "cluster.yaml",
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec: {{clusterIP: {WEB_VIP}, selector: {{app: web}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: shop}}\nspec: {{clusterIP: {DB_VIP}, selector: {{app: db}}, ports: [{{name: tcp-postgres, port: 5432}}]}}\n---\n{pods}"
            ),
        );
        for (name, text) in policies {
            manifests.write(name, text);
        }
        let clients = TestCgroup::new();
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
            clients.path().to_str().unwrap(),
            "--admin",
            &admin,
            "--node-ip",
            NODE_IP4,
        ];
        // Only the node side of this test's own server veths.
        let interfaces: Vec<String> = web
            .iter()
            .chain([&db])
            .map(|p| p.node_ifname.clone())
            .collect();
        for i in &interfaces {
            args.extend(["--policy-interface", i.as_str()]);
        }
        let mut agent = Agent::spawn(&node, &args);
        agent.wait_ready(admin_addr(), Duration::from_secs(30));
        let args = args.iter().map(|a| a.to_string()).collect();
        Cluster {
            agent,
            args,
            manifests,
            clients,
            bpffs,
            web_servers,
            db_server,
            _db_server_v6: db_server_v6,
            client,
            intruder,
            web,
            db,
            node,
        }
    }

    /// HTTP requests from `from` to the `web` Service.
    fn http(&self, from: &Pod, path: &str, extra: &[&str]) -> HttpProbeResult {
        let url = format!("http://{WEB_VIP}/{}", path.trim_start_matches('/'));
        let mut args = vec!["--url", url.as_str(), "--count", "10"];
        args.extend_from_slice(extra);
        run_http_probe(Some(&from.netns), Some(&self.clients), &args)
    }

    /// TCP connects from `from` to `to`.
    fn connect(&self, from: &Pod, to: &str, count: u32) -> ProbeResult {
        let count = count.to_string();
        run_probe(
            Some(&from.netns),
            Some(&self.clients),
            &["tcp", "--to", to, "--count", &count, "--timeout-ms", "3000"],
        )
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

    /// The value of a metric line that starts with `prefix` and contains every `labels` part
    /// (summed over matching lines).
    fn metric(&self, prefix: &str, labels: &[&str]) -> f64 {
        self.admin_get("/metrics")
            .lines()
            .filter(|l| l.starts_with(prefix) && labels.iter().all(|p| l.contains(p)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Kills the agent (SIGKILL) and starts a new one over the same pins.
    fn kill9(&mut self) {
        self.agent.kill9();
    }

    fn start_agent(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.agent = Agent::spawn(&self.node, &args);
        self.agent.wait_ready(admin_addr(), Duration::from_secs(30));
    }

    fn remove(&self, file: &str) {
        std::fs::remove_file(self.manifests.path().join(file)).unwrap();
    }
}

fn deny_admin() -> String {
    policy(
        "deny-admin",
        "selector: {matchLabels: {app: web}}\naction: DENY\nrules:\n- to:\n  - operation: {methods: [POST, DELETE], paths: [\"/admin*\"]}\n- to:\n  - operation: {paths: [/secret]}",
    )
}

fn body_text(r: &HttpProbeResult) -> String {
    r.sample
        .as_ref()
        .map(|s| s.body.as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[test]
fn l7_deny_by_path_and_method_answers_403_while_other_requests_pass() {
    let c = Cluster::start(&[("deny-admin.yaml", deny_admin())]);
    let denied = c.http(&c.client, "/admin/users", &["--method", "POST"]);
    assert_eq!(denied.status(403), 10, "{denied:?}\n{}", c.agent.log());
    assert_eq!(body_text(&denied), "RBAC: access denied", "{denied:?}");
    let secret = c.http(&c.client, "/secret", &[]);
    assert_eq!(secret.status(403), 10, "{secret:?}");
    // Another method on the same path, and other paths, reach the backends.
    for (path, extra) in [
        ("/admin/users", &["--method", "GET"][..]),
        ("/public", &["--method", "POST"][..]),
        ("/secret/not-quite", &[][..]),
    ] {
        let ok = c.http(&c.client, path, extra);
        assert_eq!(ok.status(200), 10, "{path} {extra:?}: {ok:?}");
    }
    // Direct TCP connections to the pods bypass the proxy: there, as on any TCP port, Istio drops
    // the HTTP conditions of a DENY rule, so the kernel refuses them. The proxy's own
    // connections (from the node) pass, and it authorizes each request.
    assert_reset(
        &c.connect(&c.client, &format!("{}:8080", c.web[0].ipv4), 3),
        3,
    );
    // Denied requests never reached a backend.
    for s in &c.web_servers {
        assert!(
            s.received()
                .iter()
                .all(|r| !(r.path.starts_with("/admin") && r.method == "POST")
                    && r.path != "/secret"),
            "{:?}",
            s.received()
        );
    }
    // Istio's request metric: 403 with no response flag, as Envoy's RBAC filter reports it.
    let denied_total = c.metric(
        "istio_requests_total{",
        &[
            "response_code=\"403\"",
            "response_flags=\"-\"",
            "source_workload=\"client\"",
        ],
    );
    assert_eq!(denied_total, 20.0, "{}", c.admin_get("/metrics"));

    // `steerd inspect authz` shows the policy, its rules and the workloads it applies to.
    let out = Agent::run_cli(&c.node, &["inspect", "authz", "--admin", "127.0.0.1:15000"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines().any(|l| l.starts_with("shop/deny-admin")
            && l.contains("DENY")
            && l.contains("app=web")
            && l.contains("enforced")
            && l.contains("to[methods=POST,DELETE paths=/admin*]")),
        "{text}"
    );
    let json = Agent::run_cli_json(
        &c.node,
        &[
            "inspect",
            "authz",
            "--admin",
            "127.0.0.1:15000",
            "-o",
            "json",
        ],
    );
    assert_eq!(
        json[0]["workloads"],
        serde_json::json!(["shop/web-1", "shop/web-2"])
    );

    // Removing the policy restores access (live reload).
    c.remove("deny-admin.yaml");
    assert!(
        wait_until(RELOAD, || c
            .http(&c.client, "/admin/users", &["--method", "POST"])
            .status(200)
            == 10),
        "{}",
        c.agent.log()
    );
}

#[test]
fn l7_when_on_a_request_header() {
    let allow_alice = policy(
        "allow-alice",
        "selector: {matchLabels: {app: web}}\nrules:\n- when:\n  - key: request.headers[x-user]\n    values: [alice, \"admin-*\"]",
    );
    let c = Cluster::start(&[("allow-alice.yaml", allow_alice)]);
    let anonymous = c.http(&c.client, "/", &[]);
    assert_eq!(
        anonymous.status(403),
        10,
        "{anonymous:?}\n{}",
        c.agent.log()
    );
    let bob = c.http(&c.client, "/", &["--header", "x-user:bob"]);
    assert_eq!(bob.status(403), 10, "{bob:?}");
    for user in ["alice", "admin-carol"] {
        let header = format!("x-user:{user}");
        let ok = c.http(&c.client, "/", &["--header", &header]);
        assert_eq!(ok.status(200), 10, "{user}: {ok:?}");
    }
}

#[test]
fn a_malformed_cidr_is_reported_and_the_other_policies_keep_being_enforced() {
    let c = Cluster::start(&[("deny-admin.yaml", deny_admin())]);
    let bad = policy(
        "deny-range",
        "selector: {matchLabels: {app: web}}\naction: DENY\nrules:\n- from:\n  - source: {ipBlocks: [10.244.0.0/33]}",
    );
    c.manifests.write("deny-range.yaml", &bad);
    assert!(
        wait_until(RELOAD, || c.metric("steerd_config_errors", &[]) == 1.0),
        "{}",
        c.agent.log()
    );
    let log = c.agent.log();
    assert!(
        log.lines().any(|l| l.contains("deny-range.yaml:1: AuthorizationPolicy shop/deny-range: spec.rules[0].from[0].source.ipBlocks[0]: bad CIDR range (10.244.0.0/33)")),
        "{log}"
    );
    // The broken policy is not in force (it would deny the client), the good one still is.
    assert_eq!(c.http(&c.client, "/", &[]).status(200), 10);
    assert_eq!(
        c.http(&c.client, "/admin", &["--method", "DELETE"])
            .status(403),
        10
    );
    // `steerd check` names the file, the object and the field.
    let out = Agent::run_cli(&c.node, &["check", c.manifests.as_str()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines().any(|l| l
            .starts_with("Error [IST0106] (AuthorizationPolicy shop/deny-range ")
            && l.contains("deny-range.yaml:1)")
            && l.contains(
                "spec.rules[0].from[0].source.ipBlocks[0]: bad CIDR range (10.244.0.0/33)"
            )),
        "{text}"
    );
    // Fixing it puts it in force.
    c.manifests
        .write("deny-range.yaml", bad.replace("/33", "/16"));
    assert!(
        wait_until(RELOAD, || c.http(&c.client, "/", &[]).status(403) == 10),
        "{}",
        c.agent.log()
    );
    assert_eq!(c.metric("steerd_config_errors", &[]), 0.0);
}

/// A connect refused by a reset fails with ECONNREFUSED at once; a dropped SYN would time out.
#[track_caller]
fn assert_reset(r: &ProbeResult, attempts: u64) {
    assert_eq!(r.failures, attempts, "{r:?}");
    assert!(
        r.errors.iter().all(|e| e.contains("Connection refused")),
        "a reset, not a timeout: {r:?}"
    );
}

fn deny_intruder(intruder: &Pod) -> String {
    policy(
        "deny-intruder",
        &format!(
            "selector: {{matchLabels: {{app: db}}}}\naction: DENY\nrules:\n- from:\n  - source: {{ipBlocks: [{}/32, \"{}/128\"]}}",
            intruder.ipv4, intruder.ipv6
        ),
    )
}

#[test]
fn l4_deny_by_ip_blocks_resets_the_denied_client_in_the_kernel() {
    // The policy names the intruder's address, which only exists once the pods do: start
    // without it, then add it (a live change).
    let c = Cluster::start(&[]);
    let db = format!("{DB_VIP}:5432");
    assert_eq!(c.connect(&c.intruder, &db, 3).counts.get("db"), Some(&3));
    c.manifests
        .write("deny-intruder.yaml", deny_intruder(&c.intruder));
    assert!(
        wait_until(RELOAD, || c.connect(&c.intruder, &db, 1).failures == 1),
        "{}",
        c.agent.log()
    );
    let served_before = c.db_server.served();
    // Through the Service VIP and straight to the pod address: both are the pod's SYN.
    assert_reset(&c.connect(&c.intruder, &db, 5), 5);
    assert_reset(
        &c.connect(&c.intruder, &format!("{}:5432", c.db.ipv4), 5),
        5,
    );
    // IPv6 alike.
    let db6 = format!("[{}]:5432", c.db.ipv6);
    assert_reset(&c.connect(&c.intruder, &db6, 5), 5);
    assert_eq!(c.connect(&c.client, &db6, 5).counts.get("db"), Some(&5));
    // Another pod connects as before.
    let ok = c.connect(&c.client, &db, 20);
    assert_eq!(ok.counts.get("db"), Some(&20), "{ok:?}");
    assert_eq!(
        c.db_server.served() - served_before,
        20,
        "no refused connection reached the server"
    );

    // The refusals are counted per destination.
    let refused = c.metric(
        "steerd_authz_denied_total{",
        &[
            &format!("destination_ip=\"{}\"", c.db.ipv4),
            "destination_port=\"5432\"",
            "destination_workload=\"shop/db\"",
        ],
    );
    assert!(refused >= 10.0, "{}", c.admin_get("/metrics"));
    let refused6 = c.metric(
        "steerd_authz_denied_total{",
        &[&format!("destination_ip=\"{}\"", c.db.ipv6)],
    );
    assert!(refused6 >= 5.0, "{}", c.admin_get("/metrics"));
    // `steerd maps authz` reads the kernel's table back.
    let maps = Agent::run_cli_json(
        &c.node,
        &["maps", "authz", "-o", "json", "--bpffs", c.bpffs.as_str()],
    );
    let dest = maps["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["address"] == c.db.ipv4.to_string())
        .unwrap_or_else(|| panic!("{maps:#}"));
    assert_eq!(dest["port"], "*", "{maps:#}");
    assert_eq!(dest["default"], "allow", "{maps:#}");
    assert_eq!(
        dest["prefixes"],
        serde_json::json!([
            [format!("{}/32", c.intruder.ipv4), "deny"],
            [format!("{}/128", c.intruder.ipv6), "deny"]
        ]),
        "{maps:#}"
    );

    // Removing the policy restores access.
    c.remove("deny-intruder.yaml");
    assert!(
        wait_until(RELOAD, || c.connect(&c.intruder, &db, 1).successes() == 1),
        "{}",
        c.agent.log()
    );
    assert_eq!(c.connect(&c.intruder, &db, 5).counts.get("db"), Some(&5));
}

#[test]
fn l4_allow_with_not_ip_blocks_admits_only_the_rest_of_the_block() {
    let c = Cluster::start(&[]);
    let allow = policy(
        "allow-pods-but-intruder",
        &format!(
            "selector: {{matchLabels: {{app: db}}}}\nrules:\n- from:\n  - source: {{ipBlocks: [10.244.0.0/16], notIpBlocks: [{}]}}",
            c.intruder.ipv4
        ),
    );
    c.manifests.write("allow.yaml", allow);
    let db = format!("{DB_VIP}:5432");
    assert!(
        wait_until(RELOAD, || c.connect(&c.intruder, &db, 1).failures == 1),
        "{}",
        c.agent.log()
    );
    assert_reset(&c.connect(&c.intruder, &db, 5), 5);
    assert_eq!(c.connect(&c.client, &db, 10).counts.get("db"), Some(&10));
    // The ALLOW policy selects only db: the web pods still take anyone, directly too.
    let web = format!("http://{}:8080/", c.web[0].ipv4);
    let direct = run_http_probe(
        Some(&c.intruder.netns),
        Some(&c.clients),
        &["--url", &web, "--count", "3"],
    );
    assert_eq!(direct.status(200), 3, "{direct:?}");
}

#[test]
fn l4_namespaces_come_from_the_client_pod_address() {
    let only_shop = policy(
        "only-shop",
        "selector: {matchLabels: {app: db}}\nrules:\n- from:\n  - source: {namespaces: [shop]}\n  to:\n  - operation: {ports: [\"5432\"]}",
    );
    let c = Cluster::start(&[("only-shop.yaml", only_shop)]);
    let db = format!("{DB_VIP}:5432");
    assert_eq!(c.connect(&c.client, &db, 10).counts.get("db"), Some(&10));
    // The intruder's Pod is in namespace `other`.
    assert_reset(&c.connect(&c.intruder, &db, 5), 5);
}

#[test]
fn kernel_enforcement_survives_kill9_and_a_new_agent_takes_it_over() {
    let mut c = Cluster::start(&[]);
    let db = format!("{DB_VIP}:5432");
    c.manifests
        .write("deny-intruder.yaml", deny_intruder(&c.intruder));
    assert!(
        wait_until(RELOAD, || c.connect(&c.intruder, &db, 1).failures == 1),
        "{}",
        c.agent.log()
    );
    // Pinned links and maps keep refusing with no agent at all.
    c.kill9();
    assert_reset(&c.connect(&c.intruder, &db, 5), 5);
    assert_eq!(c.connect(&c.client, &db, 5).counts.get("db"), Some(&5));
    // The policy goes while no agent runs; the next agent adopts the kernel's tables and
    // removes what the configuration no longer has.
    c.remove("deny-intruder.yaml");
    c.start_agent();
    assert_eq!(
        c.connect(&c.intruder, &db, 5).counts.get("db"),
        Some(&5),
        "{}",
        c.agent.log()
    );
    // One pinned link per interface: the new agent took the old ones over.
    let links: Vec<String> = std::fs::read_dir(c.bpffs.path().join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sd_authz_if"))
        .collect();
    assert_eq!(links.len(), 3, "{links:?}");
}

#[test]
fn l4_ipv6_syns_with_extension_headers_are_checked_and_reset() {
    let c = Cluster::start(&[(
        "deny-5432.yaml",
        policy(
            "deny-5432",
            "selector: {matchLabels: {app: db}}\naction: DENY\nrules:\n- to:\n  - operation: {ports: [\"5432\"]}",
        ),
    )]);
    let _other_port = TcpIdentityServer::start(&c.db, c.db.sock_v6(5433), "db-5433");
    let connect = |port: u16, ext: &str| {
        let to = format!("[{}]:{port}", c.db.ipv6);
        let mut args = vec!["tcp", "--to", &to, "--count", "3", "--timeout-ms", "3000"];
        if !ext.is_empty() {
            args.extend(["--ipv6-ext", ext]);
        }
        run_probe(Some(&c.client.netns), Some(&c.clients), &args)
    };
    assert!(
        wait_until(RELOAD, || connect(5432, "").failures == 3),
        "{}",
        c.agent.log()
    );
    // The SYN's destination or hop-by-hop options header does not hide its port: refused with
    // a reset (ECONNREFUSED at once, so the reply was a well-formed RST for this connection).
    assert_reset(&connect(5432, "dstopts"), 3);
    assert_reset(&connect(5432, "hopopts"), 3);
    // The other port, with the same headers, is served.
    for ext in ["", "dstopts", "hopopts"] {
        let r = connect(5433, ext);
        assert_eq!(r.counts.get("db-5433"), Some(&3), "{ext}: {r:?}");
    }
    let refused6 = c.metric(
        "steerd_authz_denied_total{",
        &[
            &format!("destination_ip=\"{}\"", c.db.ipv6),
            "destination_port=\"5432\"",
        ],
    );
    assert!(refused6 >= 9.0, "{}", c.admin_get("/metrics"));
}
