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
    Agent, BpffsDir, HttpIdentityServer, HttpProbeResult, Node, Pod, TcpIdentityServer, TempDir,
    TestCgroup, admin_addr, run_http_probe, wait_until,
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
    manifests: TempDir,
    clients: TestCgroup,
    _bpffs: BpffsDir,
    web_servers: Vec<HttpIdentityServer>,
    _db_server: TcpIdentityServer,
    client: Pod,
    _intruder: Pod,
    _web: Vec<Pod>,
    _db: Pod,
    node: Node,
}

fn pod(name: &str, namespace: &str, app: &str, pod: &Pod) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{app: {app}}}}}\nstatus: {{phase: Running, podIP: {}, hostIP: {NODE_IP4}}}\n---\n",
        pod.ipv4
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
        let args = vec![
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
        let mut agent = Agent::spawn(&node, &args);
        agent.wait_ready(admin_addr(), Duration::from_secs(30));
        Cluster {
            agent,
            manifests,
            clients,
            _bpffs: bpffs,
            web_servers,
            _db_server: db_server,
            client,
            _intruder: intruder,
            _web: web,
            _db: db,
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
            "destination_app=\"web\"",
        ],
    );
    assert_eq!(denied_total, 20.0);

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
