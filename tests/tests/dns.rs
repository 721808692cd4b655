//! ServiceEntries with `resolution: DNS` / `DNS_ROUND_ROBIN` end to end: the agent resolves
//! endpoint addresses with a DNS server the test runs on 127.0.0.1 in the node netns
//! (`steerd run --dns-server`), follows answer changes after their TTL, keeps the last answer
//! while DNS fails, and reports names that do not resolve while the rest serves.
//!
//! All traffic stays inside the test's netns: DNS on the node's loopback, connections from the
//! steered cgroup to VIPs that the kernel sends to pod netns.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use steerd_e2e::{
    Agent, BpffsDir, Node, Pod, ProbeResult, TcpIdentityServer, TempDir, TestCgroup, admin_addr,
    run_probe, spawn_probe, wait_until,
};

/// TTL of every answer the test server gives.
const TTL: u32 = 1;
const DB_VIP: &str = "10.96.7.7";
const CACHE_VIP: &str = "10.96.7.8";

/// A minimal authoritative DNS server (UDP) on 127.0.0.1 in a netns: A/AAAA answers from a
/// table that the test changes, NXDOMAIN for names not in it, or no answer at all while
/// `silent`. Stops on drop.
struct DnsServer {
    addr: SocketAddr,
    zone: Arc<Mutex<HashMap<String, Vec<IpAddr>>>>,
    silent: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    fn start(node: &Node) -> DnsServer {
        let socket = node
            .netns
            .run_in(|| UdpSocket::bind("127.0.0.1:0"))
            .expect("binding the DNS server in the node netns");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let zone: Arc<Mutex<HashMap<String, Vec<IpAddr>>>> = Arc::default();
        let silent = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (zone, silent, stop) = (zone.clone(), silent.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    if silent.load(Ordering::Relaxed) {
                        continue;
                    }
                    let reply = reply(&buf[..n], &zone.lock().unwrap());
                    if let Some(reply) = reply {
                        let _ = socket.send_to(&reply, from);
                    }
                }
            })
        };
        DnsServer {
            addr,
            zone,
            silent,
            stop,
            thread: Some(thread),
        }
    }

    fn set(&self, name: &str, ips: &[IpAddr]) {
        self.zone
            .lock()
            .unwrap()
            .insert(name.to_string(), ips.to_vec());
    }

    fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::Relaxed);
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The answer to one query (RFC 1035 wire format), or `None` for what is not a one-question
/// query. Answers copy the question and point back at its name.
fn reply(query: &[u8], zone: &HashMap<String, Vec<IpAddr>>) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || query[4..6] != [0, 1] {
        return None;
    }
    let mut labels = Vec::new();
    let mut i = 12;
    loop {
        let len = *query.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let question = query.get(12..i + 4)?;
    let (rcode, ips): (u8, Vec<IpAddr>) = match zone.get(&labels.join(".")) {
        None => (3, Vec::new()),
        Some(ips) => (
            0,
            ips.iter()
                .filter(|ip| match qtype {
                    1 => ip.is_ipv4(),
                    28 => ip.is_ipv6(),
                    _ => false,
                })
                .copied()
                .collect(),
        ),
    };
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&query[0..2]);
    out.push(0x84 | (query[2] & 0x01)); // QR, AA, RD as asked
    out.push(0x80 | rcode); // RA
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    for ip in ips {
        out.extend_from_slice(&[0xc0, 12]);
        let (kind, data) = match ip {
            IpAddr::V4(v4) => (1u16, v4.octets().to_vec()),
            IpAddr::V6(v6) => (28u16, v6.octets().to_vec()),
        };
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&[0, 1]);
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(&data);
    }
    Some(out)
}

/// A node with two database pods (identity servers "db1", "db2" on :5432), the test's DNS
/// server, and an agent that resolves with it.
struct Fixture {
    // Field order is drop order: the agent goes before the pins, netns and cgroup it uses.
    agent: Agent,
    /// The agent's command line.
    args: Vec<String>,
    _manifests: TempDir,
    /// `--state-dir`: kept across restarts, like /run/steerd on a node.
    state: TempDir,
    client: TestCgroup,
    bpffs: BpffsDir,
    dns: DnsServer,
    _servers: Vec<TcpIdentityServer>,
    db1: Pod,
    db2: Pod,
    node: Node,
}

impl Fixture {
    /// `zone` (name → `db1`/`db2`, comma-separated, in answer order) is set before the agent
    /// starts; `manifests` are the ServiceEntries.
    fn start(zone: &[(&str, &str)], manifests: &str) -> Fixture {
        let node = Node::new();
        let db1 = node.add_pod("db1");
        let db2 = node.add_pod("db2");
        let servers = vec![
            TcpIdentityServer::start(&db1, db1.sock_v4(5432), "db1"),
            TcpIdentityServer::start(&db2, db2.sock_v4(5432), "db2"),
        ];
        let dns = DnsServer::start(&node);
        for (name, pods) in zone {
            let ips: Vec<IpAddr> = pods
                .split(',')
                .map(|p| if p == "db1" { db1.ipv4 } else { db2.ipv4 }.into())
                .collect();
            dns.set(name, &ips);
        }
        let dir = TempDir::new("steerd-dns");
        dir.write("entries.yaml", manifests);
        let client = TestCgroup::new();
        let bpffs = BpffsDir::new();
        let source = format!("files:{}", dir.as_str());
        let admin = admin_addr().to_string();
        let server = dns.addr.to_string();
        let state = TempDir::new("steerd-dns-state");
        let args: Vec<String> = [
            "run",
            "--state-dir",
            state.as_str(),
            "--source",
            &source,
            "--bpffs",
            bpffs.as_str(),
            "--cgroup",
            client.path().to_str().unwrap(),
            "--admin",
            &admin,
            "--dns-server",
            &server,
        ]
        .map(String::from)
        .into();
        let agent = spawn_agent(&node, &args);
        Fixture {
            agent,
            args,
            _manifests: dir,
            state,
            client,
            bpffs,
            dns,
            _servers: servers,
            db1,
            db2,
            node,
        }
    }

    /// `kill -9` and a new agent on the same pins.
    fn restart(&mut self) {
        self.agent.kill9();
        self.agent = spawn_agent(&self.node, &self.args);
    }

    fn tcp(&self, to: &str, count: u64) -> ProbeResult {
        let count = count.to_string();
        run_probe(
            Some(&self.node.netns),
            Some(&self.client),
            &["tcp", "--to", to, "--count", &count, "--timeout-ms", "1000"],
        )
    }

    /// Every one of `count` connections to `to` reaches `id`.
    fn assert_all_reach(&self, to: &str, id: &str, count: u64) {
        let result = self.tcp(to, count);
        assert_eq!(
            result.counts.get(id).copied().unwrap_or(0),
            count,
            "{to}: {result:?}\nagent log:\n{}",
            self.agent.log()
        );
    }

    /// `(backend, weight %)` of `vip:5432` as the kernel has them.
    fn backends(&self, vip: &str) -> Vec<(String, f64)> {
        let rows = Agent::run_cli_json(
            &self.node,
            &[
                "maps",
                "backends",
                "-o",
                "json",
                "--bpffs",
                self.bpffs.as_str(),
            ],
        );
        let mut out: Vec<(String, f64)> = rows
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["vip"] == vip && r["port"] == 5432)
            .filter_map(|r| Some((r["backend"].as_str()?.to_string(), r["weight"].as_f64()?)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Whether the kernel sends every connection to `vip:5432` to `pod`.
    fn only_to(&self, vip: &str, pod: &Pod) -> bool {
        let now = self.backends(vip);
        now.len() == 1
            && now[0].0 == pod.sock_v4(5432).to_string()
            && (now[0].1 - 100.0).abs() < 0.01
    }

    /// Waits until `vip:5432` goes to `pod` alone; returns how long that took.
    fn wait_for_only(&self, vip: &str, pod: &Pod, timeout: Duration) -> Duration {
        let started = Instant::now();
        let ok = wait_until(timeout, || self.only_to(vip, pod));
        assert!(
            ok,
            "{vip}:5432 never went to {} alone: {:?}\nagent log:\n{}",
            pod.ipv4,
            self.backends(vip),
            self.agent.log()
        );
        started.elapsed()
    }

    /// The agent's current diagnostics (`/debug/config_dump`).
    fn diagnostics(&self) -> Vec<String> {
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
        let dump: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("config_dump is not JSON ({e}): {body}"));
        dump["diagnostics"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|d| d.as_str().map(str::to_string))
            .collect()
    }

    /// Waits for a diagnostic that contains every one of `needles`.
    fn wait_for_diagnostic(&self, needles: &[&str], timeout: Duration) {
        let ok = wait_until(timeout, || {
            self.diagnostics()
                .iter()
                .any(|d| needles.iter().all(|n| d.contains(n)))
        });
        assert!(
            ok,
            "no diagnostic containing {needles:?}: {:#?}\nagent log:\n{}",
            self.diagnostics(),
            self.agent.log()
        );
    }
}

fn spawn_agent(node: &Node, args: &[String]) -> Agent {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Agent::spawn(node, &args);
    agent.wait_ready(admin_addr(), Duration::from_secs(20));
    agent
}

fn db_entry() -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: db, namespace: data}}\nspec:\n  hosts: [db.example.test]\n  addresses: [{DB_VIP}]\n  ports: [{{number: 5432, name: tcp-pg, protocol: TCP}}]\n  location: MESH_EXTERNAL\n  resolution: DNS\n  endpoints:\n  - address: db-1.example.test\n"
    )
}

#[test]
fn dns_endpoints_follow_the_answers_and_survive_dns_failures() {
    let t = Fixture::start(&[("db-1.example.test", "db1")], &db_entry());
    t.wait_for_only(DB_VIP, &t.db1, Duration::from_secs(10));
    t.assert_all_reach(&format!("{DB_VIP}:5432"), "db1", 20);

    // A new answer: maps and connections follow once the 1 s TTL has run out.
    t.dns.set("db-1.example.test", &[t.db2.ipv4.into()]);
    let took = t.wait_for_only(DB_VIP, &t.db2, Duration::from_secs(10));
    assert!(
        took < Duration::from_secs(5),
        "took {took:?} with a 1 s TTL"
    );
    t.assert_all_reach(&format!("{DB_VIP}:5432"), "db2", 20);

    // DNS stops answering: the agent notices, says so, and keeps serving the last answer.
    t.dns.set_silent(true);
    let kept = format!("; serving its last answer ({})", t.db2.ipv4);
    t.wait_for_diagnostic(
        &["resolving db-1.example.test failed: ", &kept],
        Duration::from_secs(30),
    );
    assert!(t.only_to(DB_VIP, &t.db2), "{:?}", t.backends(DB_VIP));
    t.assert_all_reach(&format!("{DB_VIP}:5432"), "db2", 20);
    assert!(
        t.agent
            .log()
            .contains("DNS lookup failed; keeping the last answer"),
        "{}",
        t.agent.log()
    );

    // DNS is back with another answer: the retries (backoff) pick it up.
    t.dns.set("db-1.example.test", &[t.db1.ipv4.into()]);
    t.dns.set_silent(false);
    t.wait_for_only(DB_VIP, &t.db1, Duration::from_secs(40));
    t.assert_all_reach(&format!("{DB_VIP}:5432"), "db1", 20);
    let ok = wait_until(Duration::from_secs(5), || {
        !t.diagnostics()
            .iter()
            .any(|d| d.contains("db-1.example.test"))
    });
    assert!(ok, "stale diagnostic stays: {:#?}", t.diagnostics());
}

#[test]
fn unresolvable_names_are_reported_while_the_rest_serves() {
    let entries = format!(
        "{}  - address: missing.example.test\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: cache, namespace: data}}\nspec:\n  hosts: [cache.example.test]\n  addresses: [{CACHE_VIP}]\n  ports: [{{number: 5432, name: tcp-cache, protocol: TCP}}]\n  location: MESH_EXTERNAL\n  resolution: DNS_ROUND_ROBIN\n",
        db_entry()
    );
    // cache.example.test answers db2 first, then db1: DNS_ROUND_ROBIN uses the first only.
    let t = Fixture::start(
        &[
            ("db-1.example.test", "db1"),
            ("cache.example.test", "db2,db1"),
        ],
        &entries,
    );
    t.wait_for_diagnostic(
        &["missing.example.test does not resolve: no such name (NXDOMAIN); it has no endpoints"],
        Duration::from_secs(10),
    );
    let diagnostic = t
        .diagnostics()
        .into_iter()
        .find(|d| d.contains("missing.example.test"))
        .unwrap();
    assert!(
        diagnostic.starts_with("Error (ServiceEntry data/db)")
            && diagnostic.contains("spec.endpoints[1].address"),
        "{diagnostic}"
    );
    t.wait_for_only(DB_VIP, &t.db1, Duration::from_secs(10));
    t.assert_all_reach(&format!("{DB_VIP}:5432"), "db1", 20);
    t.wait_for_only(CACHE_VIP, &t.db2, Duration::from_secs(10));
    t.assert_all_reach(&format!("{CACHE_VIP}:5432"), "db2", 20);
    assert!(
        t.agent.log().contains("missing.example.test"),
        "the resolver logs it too:\n{}",
        t.agent.log()
    );
}

#[test]
fn a_restarted_agent_keeps_dns_endpoints_serving() {
    let mut t = Fixture::start(&[("db-1.example.test", "db1")], &db_entry());
    t.wait_for_only(DB_VIP, &t.db1, Duration::from_secs(10));
    let to = format!("{DB_VIP}:5432");
    let probe = spawn_probe(
        Some(&t.node.netns),
        Some(&t.client),
        &[
            "loop",
            "--to",
            &to,
            "--duration-ms",
            "4000",
            "--interval-ms",
            "2",
        ],
    );
    std::thread::sleep(Duration::from_millis(1000));
    // The new agent's first plan waits for its first DNS answers instead of writing the entry
    // without endpoints: the pinned maps keep serving meanwhile.
    t.restart();
    std::thread::sleep(Duration::from_millis(500));
    t.restart();
    let r = probe.wait();
    assert!(
        r.attempts > 200,
        "too few attempts to prove anything: {r:?}"
    );
    assert_eq!(r.failures, 0, "connects failed across restarts: {r:?}");
    assert_eq!(r.counts.get("db1").copied(), Some(r.attempts), "{r:?}");
    assert!(t.only_to(DB_VIP, &t.db1), "{:?}", t.backends(DB_VIP));
}

#[test]
fn dns_answers_outlive_the_agent_and_serve_while_dns_is_down() {
    let mut t = Fixture::start(&[("db-1.example.test", "db1")], &db_entry());
    t.wait_for_only(DB_VIP, &t.db1, Duration::from_secs(10));
    let saved = t.state.path().join("dns-answers.json");
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(&saved)
            .is_ok_and(|s| s.contains(&t.db1.ipv4.to_string()))),
        "{}",
        t.agent.log()
    );
    // Stop the agent, take its maps away (so only the new agent can steer), stop DNS, start.
    t.agent.terminate(Duration::from_secs(10));
    let cleanup = Agent::run_cli(&t.node, &["cleanup", "--bpffs", t.bpffs.as_str()]);
    assert!(cleanup.status.success(), "{cleanup:?}");
    t.dns.set_silent(true);
    t.agent = spawn_agent(&t.node, &t.args);
    // The last answer serves at once, and still after the new agent's own lookup failed.
    t.wait_for_only(DB_VIP, &t.db1, Duration::from_secs(5));
    let kept = format!("; serving its last answer ({})", t.db1.ipv4);
    // First marked as the previous agent's answer, then with the new lookup's own failure.
    let failed_lookup = wait_until(Duration::from_secs(30), || {
        t.diagnostics().iter().any(|d| {
            d.contains("resolving db-1.example.test failed: ")
                && d.contains(&kept)
                && !d.contains(dns_state_marker())
        })
    });
    assert!(
        failed_lookup,
        "the seeded answer was not looked up again: {:#?}\n{}",
        t.diagnostics(),
        t.agent.log()
    );
    assert!(t.only_to(DB_VIP, &t.db1), "{:?}", t.backends(DB_VIP));
    t.assert_all_reach(&format!("{DB_VIP}:5432"), "db1", 20);

    // DNS back with another answer: the seeded answer is replaced.
    t.dns.set("db-1.example.test", &[t.db2.ipv4.into()]);
    t.dns.set_silent(false);
    t.wait_for_only(DB_VIP, &t.db2, Duration::from_secs(40));

    // A corrupt state file: a warning, and the agent starts as on a first start.
    t.agent.terminate(Duration::from_secs(10));
    std::fs::write(&saved, "{not json").unwrap();
    t.agent = spawn_agent(&t.node, &t.args);
    t.wait_for_only(DB_VIP, &t.db2, Duration::from_secs(10));
    assert!(
        t.agent.log().contains("saved DNS answers are corrupt"),
        "{}",
        t.agent.log()
    );
}

/// Part of the stale marker a seeded answer carries until its first lookup.
fn dns_state_marker() -> &'static str {
    "answer saved by the previous agent"
}
