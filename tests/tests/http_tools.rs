//! Tests of the HTTP test tools themselves (no steerd involved): `HttpIdentityServer` in pod
//! netns, `steerd-http-probe` in the node netns, talking directly over the veths.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use steerd_e2e::{HttpIdentityServer, HttpProbeResult, Node, Pod, run_http_probe, wait_until};

fn probe(node: &Node, args: &[&str]) -> HttpProbeResult {
    run_http_probe(Some(&node.netns), None, args)
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

/// A node with one pod serving HTTP on port 8080 (v4 and v6) as `id`.
struct Fixture {
    // Fields drop in declaration order: servers before the pod before the node.
    server: HttpIdentityServer,
    server_v6: HttpIdentityServer,
    pod: Pod,
    node: Node,
}

impl Fixture {
    fn new(id: &str) -> Fixture {
        let node = Node::new();
        let pod = node.add_pod(id);
        let server = HttpIdentityServer::start(&pod, pod.sock_v4(8080), id);
        let server_v6 = HttpIdentityServer::start(&pod, pod.sock_v6(8080), &format!("{id}-v6"));
        Fixture {
            server,
            server_v6,
            pod,
            node,
        }
    }

    fn url(&self, path: &str) -> String {
        url(self.pod.sock_v4(8080), path)
    }

    fn probe(&self, args: &[&str]) -> HttpProbeResult {
        probe(&self.node, args)
    }
}

fn assert_all_ok(result: &HttpProbeResult, id: &str, n: u64) {
    assert_eq!(result.failures, 0, "{result:#?}");
    assert_eq!(result.attempts, n, "{result:#?}");
    assert_eq!(result.status(200), n, "{result:#?}");
    assert_eq!(result.responses(), n, "{result:#?}");
    assert_eq!(result.counts.len(), 1, "{result:#?}");
    assert_eq!(result.count(id), n, "{result:#?}");
}

#[test]
fn http1_connection_per_request() {
    let f = Fixture::new("web");
    let result = f.probe(&["--url", &f.url("/hello/world?x=y&z=1"), "--count", "20"]);
    assert_all_ok(&result, "web", 20);
    assert_eq!(result.connections, 20, "{result:#?}");
    assert_eq!(f.server.requests(), 20);
    assert_eq!(f.server.connections(), 20);
    assert_eq!(f.server_v6.requests(), 0);

    let sample = result.sample.as_ref().expect("a sample");
    assert_eq!(sample.status, 200);
    assert_eq!(
        sample.headers.get("x-backend-id").map(String::as_str),
        Some("web")
    );
    let body = &sample.body;
    assert_eq!(body["id"], "web", "{body}");
    assert_eq!(body["method"], "GET", "{body}");
    assert_eq!(body["path"], "/hello/world", "{body}");
    assert_eq!(body["query"], "x=y&z=1", "{body}");
    assert_eq!(body["host"], f.pod.sock_v4(8080).to_string(), "{body}");
    assert_eq!(body["version"], "HTTP/1.1", "{body}");
    assert_eq!(body["body_len"], 0, "{body}");
    assert_eq!(
        body["headers"]["host"],
        f.pod.sock_v4(8080).to_string(),
        "{body}"
    );
    // The client is the node end of the veth.
    let peer: SocketAddr = body["peer"].as_str().unwrap().parse().unwrap();
    assert_eq!(peer.ip(), f.pod.node_ipv4, "{body}");
    assert!(result.latency_ms.p50 > 0.0 && result.latency_ms.p50 <= result.latency_ms.p99);
    assert!(result.latency_ms.p99 <= result.latency_ms.max);
}

#[test]
fn http1_keepalive_reuses_one_connection() {
    let f = Fixture::new("web");
    let result = f.probe(&["--url", &f.url("/"), "--count", "50", "--keepalive"]);
    assert_all_ok(&result, "web", 50);
    assert_eq!(result.connections, 1, "{result:#?}");
    assert_eq!(f.server.connections(), 1);
    assert_eq!(f.server.requests(), 50);
    let received = f.server.received();
    assert_eq!(received.len(), 50);
    assert!(received.iter().all(|r| r.peer == received[0].peer));

    // One connection per worker.
    let result = f.probe(&[
        "--url",
        &f.url("/"),
        "--count",
        "40",
        "--keepalive",
        "--concurrency",
        "4",
    ]);
    assert_all_ok(&result, "web", 40);
    assert_eq!(result.connections, 4, "{result:#?}");
    assert_eq!(f.server.connections(), 5);
}

#[test]
fn h2_prior_knowledge_on_one_connection_v4_and_v6() {
    let f = Fixture::new("web");
    let result = f.probe(&[
        "--url",
        &f.url("/h2?a=b"),
        "--count",
        "40",
        "--h2",
        "--concurrency",
        "4",
    ]);
    assert_all_ok(&result, "web", 40);
    assert_eq!(result.connections, 1, "{result:#?}");
    assert_eq!(f.server.connections(), 1);
    let body = &result.sample.as_ref().unwrap().body;
    assert_eq!(body["version"], "HTTP/2.0", "{body}");
    assert_eq!(body["host"], f.pod.sock_v4(8080).to_string(), "{body}");
    assert_eq!(body["path"], "/h2", "{body}");
    assert_eq!(body["query"], "a=b", "{body}");

    let v6 = url(f.pod.sock_v6(8080), "/six");
    let result = f.probe(&["--url", &v6, "--count", "10", "--h2"]);
    assert_all_ok(&result, "web-v6", 10);
    assert_eq!(f.server_v6.connections(), 1);
    let body = &result.sample.as_ref().unwrap().body;
    assert_eq!(body["host"], f.pod.sock_v6(8080).to_string(), "{body}");
    assert_eq!(body["version"], "HTTP/2.0", "{body}");

    // HTTP/1.1 over v6 on the same port.
    let result = f.probe(&["--url", &v6, "--count", "5", "--keepalive"]);
    assert_all_ok(&result, "web-v6", 5);
    assert_eq!(result.sample.as_ref().unwrap().body["version"], "HTTP/1.1");
}

#[test]
fn status_body_and_delay_query_parameters() {
    let f = Fixture::new("web");
    let result = f.probe(&["--url", &f.url("/?status=503"), "--count", "5"]);
    assert_eq!(result.failures, 0, "{result:#?}");
    assert_eq!(result.status(503), 5, "{result:#?}");
    assert_eq!(result.count("web"), 5, "{result:#?}");
    assert_eq!(result.sample.as_ref().unwrap().body["id"], "web");

    let result = f.probe(&["--url", &f.url("/?body=1000"), "--count", "2"]);
    assert_all_ok(&result, "web", 2);
    let sample = result.sample.as_ref().unwrap();
    assert_eq!(sample.body_len, 1000);
    assert_eq!(sample.body.as_str(), Some("x".repeat(1000).as_str()));

    let result = f.probe(&["--url", &f.url("/?status=abc"), "--count", "1"]);
    assert_eq!(result.status(400), 1, "{result:#?}");

    let result = f.probe(&["--url", &f.url("/?delay_ms=300"), "--count", "2"]);
    assert_all_ok(&result, "web", 2);
    assert!(result.latency_ms.p50 >= 300.0, "{result:#?}");

    // A delay beyond the probe's timeout is a failure.
    let result = f.probe(&[
        "--url",
        &f.url("/?delay_ms=1000"),
        "--count",
        "2",
        "--timeout-ms",
        "200",
    ]);
    assert_eq!(result.failures, 2, "{result:#?}");
    assert_eq!(result.responses(), 0, "{result:#?}");
    assert!(result.errors[0].contains("timed out"), "{result:#?}");
}

#[test]
fn set_delay_applies_to_every_request() {
    let f = Fixture::new("web");
    f.server.set_delay(Duration::from_millis(500));
    let result = f.probe(&[
        "--url",
        &f.url("/"),
        "--count",
        "3",
        "--timeout-ms",
        "150",
        "--keepalive",
    ]);
    assert_eq!(result.failures, 3, "{result:#?}");
    // The requests arrived (and were recorded) even though nobody got an answer.
    assert_eq!(f.server.requests(), 3);
    assert_eq!(f.server.received().len(), 3);

    let result = f.probe(&["--url", &f.url("/"), "--count", "2", "--h2"]);
    assert_all_ok(&result, "web", 2);
    assert!(result.latency_ms.p50 >= 500.0, "{result:#?}");

    f.server.set_delay(Duration::ZERO);
    let result = f.probe(&["--url", &f.url("/"), "--count", "3", "--timeout-ms", "150"]);
    assert_all_ok(&result, "web", 3);
}

#[test]
fn fail_next_answers_the_next_requests_with_a_status() {
    let f = Fixture::new("web");
    f.server.fail_next(3, 503);
    let result = f.probe(&["--url", &f.url("/"), "--count", "10", "--keepalive"]);
    assert_eq!(result.failures, 0, "{result:#?}");
    assert_eq!(result.status(503), 3, "{result:#?}");
    assert_eq!(result.status(200), 7, "{result:#?}");
    assert_eq!(result.count("web"), 10, "{result:#?}");
    // Sequential requests: the first three failed.
    assert_eq!(result.sample.as_ref().unwrap().status, 503);

    let result = f.probe(&["--url", &f.url("/"), "--count", "5"]);
    assert_all_ok(&result, "web", 5);
}

#[test]
fn reset_next_closes_connections_without_a_response() {
    let f = Fixture::new("web");
    f.server.reset_next(2);
    let result = f.probe(&["--url", &f.url("/"), "--count", "5", "--keepalive"]);
    assert_eq!(result.failures, 2, "{result:#?}");
    assert_eq!(result.status(200), 3, "{result:#?}");
    assert_eq!(result.attempts, 5, "{result:#?}");
    assert!(!result.errors.is_empty(), "{result:#?}");
    // Each reset cost a connection; the rest shared one.
    assert_eq!(result.connections, 3, "{result:#?}");
    assert_eq!(f.server.requests(), 5);

    f.server.reset_next(1);
    let result = f.probe(&["--url", &f.url("/"), "--count", "5", "--h2"]);
    assert_eq!(result.failures, 1, "{result:#?}");
    assert_eq!(result.status(200), 4, "{result:#?}");
    assert_eq!(result.connections, 2, "{result:#?}");

    // reset_next comes before fail_next.
    f.server.reset_next(1);
    f.server.fail_next(1, 502);
    let result = f.probe(&["--url", &f.url("/"), "--count", "3"]);
    assert_eq!(result.failures, 1, "{result:#?}");
    assert_eq!(result.status(502), 1, "{result:#?}");
    assert_eq!(result.status(200), 1, "{result:#?}");
}

#[test]
fn received_records_method_host_headers_and_body() {
    let f = Fixture::new("web");
    let result = f.probe(&[
        "--url",
        &f.url("/api/items?page=2"),
        "--count",
        "3",
        "--method",
        "POST",
        "--header",
        "Host: shop.example",
        "--header",
        "X-Test: one",
        "--header",
        "x-multi: a",
        "--header",
        "x-multi: b",
        "--data-len",
        "10",
    ]);
    assert_all_ok(&result, "web", 3);
    let body = &result.sample.as_ref().unwrap().body;
    assert_eq!(body["host"], "shop.example", "{body}");
    assert_eq!(body["body_len"], 10, "{body}");

    let received = f.server.received();
    assert_eq!(received.len(), 3);
    for r in &received {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/api/items");
        assert_eq!(r.query, "page=2");
        assert_eq!(r.host, "shop.example");
        assert_eq!(r.version, "HTTP/1.1");
        assert_eq!(r.body_len, 10);
        assert_eq!(r.headers.get("x-test").map(String::as_str), Some("one"));
        assert_eq!(r.headers.get("x-multi").map(String::as_str), Some("a, b"));
        assert_eq!(
            r.headers.get("host").map(String::as_str),
            Some("shop.example")
        );
        assert_eq!(r.peer.ip(), f.pod.node_ipv4);
    }

    // Over HTTP/2 the Host header becomes :authority.
    f.server.clear_received();
    let result = f.probe(&[
        "--url",
        &f.url("/m"),
        "--count",
        "2",
        "--h2",
        "--header",
        "host:shop.example-shadow",
    ]);
    assert_all_ok(&result, "web", 2);
    let received = f.server.received();
    assert_eq!(received.len(), 2);
    assert!(
        received
            .iter()
            .all(|r| r.host == "shop.example-shadow" && r.version == "HTTP/2.0"),
        "{received:#?}"
    );
}

#[test]
fn concurrency_runs_requests_in_parallel() {
    let f = Fixture::new("web");
    let result = f.probe(&["--url", &f.url("/"), "--count", "200", "--concurrency", "8"]);
    assert_all_ok(&result, "web", 200);
    assert_eq!(f.server.requests(), 200);
    assert_eq!(f.server.connections(), 200);

    // 16 requests of 300 ms each: about 600 ms with 8 workers, 4.8 s one at a time.
    let started = Instant::now();
    let result = f.probe(&[
        "--url",
        &f.url("/?delay_ms=300"),
        "--count",
        "16",
        "--concurrency",
        "8",
    ]);
    let elapsed = started.elapsed();
    assert_all_ok(&result, "web", 16);
    assert_eq!(f.server.max_in_flight(), 8, "{result:#?}");
    assert!(elapsed < Duration::from_millis(2500), "{elapsed:?}");

    let result = f.probe(&[
        "--url",
        &f.url("/?delay_ms=100"),
        "--count",
        "32",
        "--concurrency",
        "16",
        "--h2",
    ]);
    assert_all_ok(&result, "web", 32);
    assert_eq!(result.connections, 1);
    assert!(f.server.max_in_flight() >= 9, "{result:#?}");
}

#[test]
fn two_backends_are_told_apart_and_a_dropped_server_refuses() {
    let node = Node::new();
    let pod_a = node.add_pod("a");
    let pod_b = node.add_pod("b");
    let server_a = HttpIdentityServer::start(&pod_a, pod_a.sock_v4(80), "a");
    let server_b = HttpIdentityServer::start(&pod_b, pod_b.sock_v4(0), "b");
    assert_ne!(server_b.addr().port(), 0);

    let result = probe(
        &node,
        &["--url", &url(server_a.addr(), "/"), "--count", "5"],
    );
    assert_all_ok(&result, "a", 5);
    let result = probe(
        &node,
        &["--url", &url(server_b.addr(), "/"), "--count", "5"],
    );
    assert_all_ok(&result, "b", 5);

    let addr_b = server_b.addr();
    let started = Instant::now();
    drop(server_b);
    assert!(started.elapsed() < Duration::from_secs(2));
    let result = probe(&node, &["--url", &url(addr_b, "/"), "--count", "3"]);
    assert_eq!(result.failures, 3, "{result:#?}");
    assert!(result.errors[0].contains("refused"), "{result:#?}");

    // A server dropped while a client waits on it closes that connection too.
    let handle = steerd_e2e::spawn_http_probe(
        Some(&node.netns),
        None,
        &[
            "--url",
            &url(server_a.addr(), "/?delay_ms=5000"),
            "--count",
            "1",
            "--timeout-ms",
            "10000",
        ],
    );
    assert!(wait_until(Duration::from_secs(5), || server_a.in_flight() == 1));
    let started = Instant::now();
    drop(server_a);
    let result = handle.wait();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(result.failures, 1, "{result:#?}");
}
