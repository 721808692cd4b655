//! Tests of the harness itself: the topology routes what it should and drops what it should,
//! the identity servers and the probe agree, and processes land in the right cgroup and netns.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use steerd_e2e::{
    Agent, BpffsDir, ChildGuard, Netns, Node, ProbeResult, TcpIdentityServer, TempDir, TestCgroup,
    UdpIdentityServer, run_probe_with, spawn_in, spawn_probe_with, wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_steerd-probe");

fn probe(netns: &Netns, args: &[&str]) -> ProbeResult {
    run_probe_with(Path::new(PROBE), Some(netns), None, args)
}

fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn assert_all_from(result: &ProbeResult, id: &str, n: u64) {
    assert_eq!(result.failures, 0, "{result:?}");
    assert_eq!(result.peer_mismatches, 0, "{result:?}");
    assert_eq!(result.counts.len(), 1, "{result:?}");
    assert_eq!(result.counts.get(id), Some(&n), "{result:?}");
}

fn netns_list() -> String {
    String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

#[test]
fn node_reaches_pod_servers_over_tcp_and_udp_v4_and_v6() {
    let node = Node::new();
    let pod_a = node.add_pod("a");
    let pod_b = node.add_pod("b");
    let tcp_servers = [
        TcpIdentityServer::start(&pod_a, sock(pod_a.ipv4, 8080), "a-tcp4"),
        TcpIdentityServer::start(&pod_a, sock(pod_a.ipv6, 8080), "a-tcp6"),
        TcpIdentityServer::start(&pod_b, sock(pod_b.ipv4, 8080), "b-tcp4"),
        TcpIdentityServer::start(&pod_b, sock(pod_b.ipv6, 8080), "b-tcp6"),
    ];
    let udp_servers = [
        UdpIdentityServer::start(&pod_a, sock(pod_a.ipv4, 5353), "a-udp4"),
        UdpIdentityServer::start(&pod_a, sock(pod_a.ipv6, 5353), "a-udp6"),
        UdpIdentityServer::start(&pod_b, sock(pod_b.ipv4, 5353), "b-udp4"),
        UdpIdentityServer::start(&pod_b, sock(pod_b.ipv6, 5353), "b-udp6"),
    ];

    for (pod, tag) in [(&pod_a, "a"), (&pod_b, "b")] {
        for (ip, family) in [(IpAddr::from(pod.ipv4), "4"), (IpAddr::from(pod.ipv6), "6")] {
            let tcp = sock(ip, 8080).to_string();
            let result = probe(&node.netns, &["tcp", "--to", &tcp, "--count", "20"]);
            assert_all_from(&result, &format!("{tag}-tcp{family}"), 20);

            let udp = sock(ip, 5353).to_string();
            let result = probe(&node.netns, &["udp", "--to", &udp, "--count", "20"]);
            assert_all_from(&result, &format!("{tag}-udp{family}"), 20);
            let result = probe(
                &node.netns,
                &["udp", "--to", &udp, "--count", "20", "--connected"],
            );
            assert_all_from(&result, &format!("{tag}-udp{family}"), 20);
        }
    }
    // Each server saw exactly its own probes.
    assert!(tcp_servers.iter().all(|s| s.served() == 20));
    assert!(udp_servers.iter().all(|s| s.served() == 40));
}

#[test]
fn pods_reach_each_other_through_the_node() {
    let node = Node::new();
    let pod_a = node.add_pod("a");
    let pod_b = node.add_pod("b");
    let _v4 = TcpIdentityServer::start(&pod_b, sock(pod_b.ipv4, 80), "b4");
    let _v6 = TcpIdentityServer::start(&pod_b, sock(pod_b.ipv6, 80), "b6");

    let result = probe(
        &pod_a.netns,
        &[
            "tcp",
            "--to",
            &sock(pod_b.ipv4, 80).to_string(),
            "--count",
            "10",
        ],
    );
    assert_all_from(&result, "b4", 10);
    let result = probe(
        &pod_a.netns,
        &[
            "tcp",
            "--to",
            &sock(pod_b.ipv6, 80).to_string(),
            "--count",
            "10",
        ],
    );
    assert_all_from(&result, "b6", 10);
}

#[test]
fn extra_pod_addresses_are_routed() {
    let node = Node::new();
    let pod = node.add_pod("a");
    let extra4 = "10.245.0.7".parse().unwrap();
    let extra6 = "fd00:245::7".parse().unwrap();
    pod.add_ipv4(extra4);
    pod.add_ipv6(extra6);
    let _v4 = TcpIdentityServer::start(&pod, sock(extra4, 80), "x4");
    let _v6 = UdpIdentityServer::start(&pod, sock(extra6, 53), "x6");

    let result = probe(
        &node.netns,
        &["tcp", "--to", &sock(extra4, 80).to_string(), "--count", "5"],
    );
    assert_all_from(&result, "x4", 5);
    let result = probe(
        &node.netns,
        &["udp", "--to", &sock(extra6, 53).to_string(), "--count", "5"],
    );
    assert_all_from(&result, "x6", 5);
}

#[test]
fn probe_counts_replies_from_another_address_as_peer_mismatches() {
    let node = Node::new();
    let pod = node.add_pod("a");
    let secondary: std::net::Ipv4Addr = "10.245.0.9".parse().unwrap();
    pod.add_ipv4(secondary);
    // A wildcard-bound UDP server replies from the address routing picks (the pod's primary),
    // not from the secondary address it was sent to: exactly what an unsteered reverse path
    // looks like to the client.
    let _server = UdpIdentityServer::start(&pod, sock(std::net::Ipv4Addr::UNSPECIFIED, 53), "a");
    let result = probe(
        &node.netns,
        &[
            "udp",
            "--to",
            &sock(secondary, 53).to_string(),
            "--count",
            "4",
        ],
    );
    assert_eq!(result.counts.get("a"), Some(&4), "{result:?}");
    assert_eq!(result.peer_mismatches, 4, "{result:?}");
    assert!(
        result.errors[0].contains(&pod.ipv4.to_string()),
        "{result:?}"
    );
    // Connected UDP sockets only accept replies from their peer, so the same setup fails there.
    let result = probe(
        &node.netns,
        &[
            "udp",
            "--to",
            &sock(secondary, 53).to_string(),
            "--count",
            "2",
            "--connected",
            "--timeout-ms",
            "200",
        ],
    );
    assert_eq!(result.failures, 2, "{result:?}");
}

#[test]
fn probe_binary_is_found_without_cargo_env() {
    let found = steerd_e2e::probe_bin().canonicalize().unwrap();
    assert_eq!(found, Path::new(PROBE).canonicalize().unwrap());
}

#[test]
fn unsteered_vip_traffic_dies_in_the_node() {
    let node = Node::new();
    let pod = node.add_pod("a");
    // Servers on the VIP port in the pod must not matter: nothing routes the VIP anywhere.
    let _decoy = TcpIdentityServer::start(&pod, sock(pod.ipv4, 80), "decoy");

    // From the node there is no route at all: connect fails at once with ENETUNREACH.
    for vip in ["10.96.0.1:80", "[fd00:96::1]:80"] {
        let started = Instant::now();
        let result = probe(&node.netns, &["tcp", "--to", vip, "--count", "3"]);
        assert_eq!(result.failures, 3, "{vip} from node: {result:?}");
        assert_eq!(result.successes(), 0, "{result:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{vip} took {:?}",
            started.elapsed()
        );
        assert!(
            result
                .errors
                .iter()
                .all(|e| e.contains("Network is unreachable")),
            "{vip} from node: {result:?}"
        );
    }
    // From a pod the SYN reaches the node, which drops it and answers ICMP unreachable. That
    // error is rate limited (v4) or only a soft error to TCP (v6), so some attempts just time
    // out; none may succeed.
    for vip in ["10.96.0.1:80", "[fd00:96::1]:80"] {
        let result = probe(
            &pod.netns,
            &["tcp", "--to", vip, "--count", "3", "--timeout-ms", "300"],
        );
        assert_eq!(result.failures, 3, "{vip} from pod: {result:?}");
        assert_eq!(result.successes(), 0, "{result:?}");
    }

    let result = probe(
        &node.netns,
        &[
            "udp",
            "--to",
            "10.96.0.1:53",
            "--count",
            "2",
            "--timeout-ms",
            "200",
        ],
    );
    assert_eq!(result.failures, 2, "{result:?}");
}

#[test]
fn loop_mode_counts_attempts_and_sees_an_outage() {
    let node = Node::new();
    let pod = node.add_pod("a");
    let addr = pod.sock_v4(8080);
    let server = TcpIdentityServer::start(&pod, addr, "a");
    let to = addr.to_string();
    let result = probe(
        &node.netns,
        &[
            "loop",
            "--to",
            &to,
            "--duration-ms",
            "300",
            "--interval-ms",
            "10",
        ],
    );
    assert!(result.attempts >= 5, "{result:?}");
    assert_eq!(result.failures, 0, "{result:?}");
    assert_eq!(result.successes(), result.attempts, "{result:?}");

    // The server goes away while a loop probe runs: the probe must see it (connection refused).
    let running = spawn_probe_with(
        Path::new(PROBE),
        Some(&node.netns),
        None,
        &[
            "loop",
            "--to",
            &to,
            "--duration-ms",
            "600",
            "--interval-ms",
            "10",
        ],
    );
    std::thread::sleep(Duration::from_millis(200));
    drop(server);
    let result = running.wait();
    assert!(result.successes() > 0, "{result:?}");
    assert!(result.failures > 0, "{result:?}");
    assert_eq!(
        result.successes() + result.failures,
        result.attempts,
        "{result:?}"
    );
    assert!(
        result.errors.iter().any(|e| e.contains("refused")),
        "{result:?}"
    );
}

#[test]
fn temp_dir_holds_files_until_dropped() {
    let dir = TempDir::new("steerd-e2e-test");
    let file = dir.write("services.yaml", "a: 1\n");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "a: 1\n");
    let path = dir.path().to_owned();
    drop(dir);
    assert!(!path.exists());
}

#[test]
fn sysctls_are_per_netns() {
    let root_forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let node = Node::new();
    assert_eq!(node.netns.read_sysctl("net.ipv4.ip_forward"), "1");
    assert_eq!(node.netns.read_sysctl("net.ipv6.conf.all.forwarding"), "1");
    let pod = node.add_pod("a");
    assert_eq!(pod.netns.read_sysctl("net.ipv4.ip_forward"), "0");
    assert_eq!(pod.netns.read_sysctl("net.ipv6.conf.eth0.accept_dad"), "0");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        root_forwarding
    );
}

#[test]
fn spawn_in_moves_child_into_cgroup_and_netns_before_exec() {
    let netns = Netns::new();
    let cgroup = TestCgroup::new();
    let mut child = ChildGuard::new(spawn_in(
        Command::new("sleep").arg("30").stdout(Stdio::null()),
        Some(&netns),
        Some(&cgroup),
    ));
    let pid = child.id();
    assert!(
        cgroup.contains(pid),
        "pid {pid} not in {:?}",
        cgroup.procs()
    );
    let cgroup_line = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let relative = cgroup
        .path()
        .strip_prefix(steerd_e2e::cgroup2_mount())
        .unwrap();
    assert!(
        cgroup_line.contains(&format!("0::/{}", relative.display())),
        "{cgroup_line}"
    );
    let child_netns = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap();
    let expected = std::fs::metadata(netns.path()).unwrap();
    assert_eq!(
        (child_netns.dev(), child_netns.ino()),
        (expected.dev(), expected.ino())
    );
    assert_ne!(
        std::fs::metadata("/proc/self/ns/net").unwrap().ino(),
        expected.ino(),
        "the test process itself must stay in its own netns"
    );

    // Dropping the cgroup kills what is left in it, then removes it.
    let path = cgroup.path().to_owned();
    drop(cgroup);
    assert!(!path.exists(), "{} still exists", path.display());
    let status = child.kill().unwrap();
    assert!(!status.success(), "sleep was not killed: {status:?}");
}

#[test]
fn cgroup_drop_kills_grandchildren_it_does_not_own() {
    let cgroup = TestCgroup::new();
    // The shell backgrounds a sleep and exits: the sleep is nobody's Child in this process.
    let output = spawn_in(
        Command::new("sh")
            .args(["-c", "sleep 30 >/dev/null 2>&1 & echo $!"])
            .stdout(Stdio::piped()),
        None,
        Some(&cgroup),
    )
    .wait_with_output()
    .unwrap();
    let orphan: u32 = String::from_utf8(output.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || cgroup.contains(orphan)),
        "{:?}",
        cgroup.procs()
    );
    let path = cgroup.path().to_owned();
    drop(cgroup);
    assert!(!path.exists());
    assert!(
        !Path::new(&format!("/proc/{orphan}")).exists() || {
            // A zombie until init reaps it is fine; alive is not.
            let stat = std::fs::read_to_string(format!("/proc/{orphan}/stat")).unwrap_or_default();
            stat.contains(") Z")
        }
    );
}

#[test]
fn netns_and_pods_are_gone_after_drop() {
    let (names, paths, mut sleeper) = {
        let node = Node::new();
        let pod_a = node.add_pod("a");
        let pod_b = node.add_pod("b");
        // A process still running inside a pod must not keep it alive.
        let sleeper = spawn_in(Command::new("sleep").arg("30"), Some(&pod_a.netns), None);
        let names: Vec<String> = [&node.netns, &pod_a.netns, &pod_b.netns]
            .iter()
            .map(|n| n.name().to_owned())
            .collect();
        let listed = netns_list();
        for name in &names {
            assert!(
                listed
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(name)),
                "{name} not in {listed}"
            );
        }
        let paths: Vec<_> = [&node.netns, &pod_a.netns, &pod_b.netns]
            .iter()
            .map(|n| n.path())
            .collect();
        (names, paths, sleeper)
    };
    let status = sleeper.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "dropping the netns kills what runs in it: {status:?}"
    );
    let listed = netns_list();
    for name in &names {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name)),
            "{name} left in {listed}"
        );
    }
    for path in paths {
        assert!(!path.exists(), "{} left behind", path.display());
    }
}

#[test]
fn free_port_is_bindable_inside_the_netns() {
    let netns = Netns::new();
    let port = steerd_e2e::free_port(&netns);
    assert_ne!(port, 0);
    let addr = sock(std::net::Ipv4Addr::LOCALHOST, port);
    let _server = TcpIdentityServer::start(&netns, addr, "lo");
    let result = probe(&netns, &["tcp", "--to", &addr.to_string(), "--count", "3"]);
    assert_all_from(&result, "lo", 3);
    // Loopback of the netns is not the host's: the same address from the root netns is not served
    // by that server.
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .map(|mut s| {
                let mut buf = String::new();
                std::io::Read::read_to_string(&mut s, &mut buf).ok();
                buf != "lo\n"
            })
            .unwrap_or(true)
    );
}

#[test]
fn agent_helper_runs_binary_in_node_netns_and_logs() {
    let node = Node::new();
    let admin = steerd_e2e::admin_addr();
    // A stand-in for steerd that answers /readyz: proves wait_ready polls inside the node netns.
    let log_path = {
        let listener = node
            .netns
            .run_in(|| std::net::TcpListener::bind(admin).unwrap());
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            // Read the whole request: closing with unread data would reset the connection.
            let mut request = Vec::new();
            let mut buf = [0u8; 256];
            while !request.ends_with(b"\r\n\r\n") {
                let n = std::io::Read::read(&mut conn, &mut buf).unwrap();
                assert!(n > 0, "EOF before end of request: {request:?}");
                request.extend_from_slice(&buf[..n]);
            }
            assert!(
                request.starts_with(b"GET /readyz HTTP/1.1\r\n"),
                "{request:?}"
            );
            std::io::Write::write_all(&mut conn, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
        });
        let mut agent = Agent::spawn_bin(
            Path::new("/bin/sh"),
            &node,
            &["-c", "echo started; readlink /proc/self/ns/net; sleep 30"],
        );
        agent.wait_ready(admin, Duration::from_secs(5));
        server.join().unwrap();
        assert!(
            wait_until(Duration::from_secs(2), || agent.log().contains("net:[")),
            "{}",
            agent.log()
        );
        let log = agent.log();
        assert!(log.starts_with("started\n"), "{log}");
        let inode = std::fs::metadata(node.netns.path()).unwrap().ino();
        assert!(log.contains(&format!("net:[{inode}]")), "{log} vs {inode}");
        assert!(agent.try_wait().is_none());
        let status = agent.kill9().unwrap();
        assert!(!status.success());
        let log_path = agent.log_path().to_owned();
        assert!(log_path.exists(), "log kept until the agent is dropped");
        log_path
    };
    assert!(!log_path.exists(), "log of a passing test is removed");
}

#[test]
fn agent_wait_ready_fails_fast_when_binary_exits() {
    let node = Node::new();
    let mut agent = Agent::spawn_bin(Path::new("/bin/sh"), &node, &["-c", "echo boom; exit 3"]);
    let started = Instant::now();
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        agent.wait_ready(steerd_e2e::admin_addr(), Duration::from_secs(10))
    }))
    .expect_err("wait_ready must fail for an agent that exits");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let message = panic.downcast_ref::<String>().expect("panic message");
    assert!(message.contains("exited (exit 3)"), "{message}");
    assert!(
        message.contains("boom"),
        "the log is part of the message: {message}"
    );
}

#[test]
fn bpffs_dir_is_created_and_removed() {
    let dir = BpffsDir::new();
    let path = dir.path().to_owned();
    assert!(path.is_dir());
    assert!(path.starts_with("/sys/fs/bpf"));
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mounts.lines().any(|l| l.contains(" /sys/fs/bpf bpf ")),
        "{mounts}"
    );
    drop(dir);
    assert!(!path.exists());
}
