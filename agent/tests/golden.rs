//! Golden tests of `steerd check` and `steerd explain`: the real binary's output over Istio's
//! samples (`../shared/istio/samples`) compared with transcripts under `tests/golden/<case>/`:
//! `check.txt`, `explain.txt` (text) and `explain-json.txt` (the same queries with `-o json`).
//! A transcript holds each command line, run from the repository root so that its paths are
//! the ones a user types there, then its stdout, its stderr after a `[stderr]` line when there
//! is any, and its exit code. `tests/golden/fixtures/` adds what the samples leave to a cluster
//! (Pods, so that endpoints show) and a file of mistakes for `check`.
//!
//! After an intended change of output, regenerate the transcripts and review the diff:
//!
//! ```sh
//! STEERD_BLESS=1 cargo test -p steerd --test golden
//! git diff tests/golden
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

/// The samples as seen from the repository root.
const SAMPLES: &str = "../shared/istio/samples";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate lives in the repository")
        .to_path_buf()
}

fn golden_dir() -> PathBuf {
    repo_root().join("tests/golden")
}

/// A case's file as given on the command line: `fixtures/...` under `tests/golden/`, anything
/// else under the samples.
fn arg_path(file: &str) -> String {
    let path = if file.starts_with("fixtures/") {
        format!("tests/golden/{file}")
    } else {
        format!("{SAMPLES}/{file}")
    };
    assert!(
        repo_root().join(&path).is_file(),
        "{path} (from the repository root) is missing; the samples are shared/istio/samples \
         beside the repository"
    );
    path
}

fn bless() -> bool {
    std::env::var_os("STEERD_BLESS").is_some_and(|v| v != "0")
}

/// Runs `steerd ARGS` from the repository root; returns its transcript.
fn transcript(args: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_steerd"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("run steerd");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("steerd prints UTF-8");
    let mut t = format!("$ steerd {}\n", args.join(" "));
    t.push_str(&text(out.stdout));
    let stderr = text(out.stderr);
    if !stderr.is_empty() {
        t.push_str("[stderr]\n");
        t.push_str(&stderr);
    }
    match out.status.code() {
        Some(code) => t.push_str(&format!("[exit code {code}]\n")),
        None => panic!("steerd {}: {}\n{t}", args.join(" "), out.status),
    }
    t
}

/// One `steerd explain` invocation.
#[derive(Default)]
struct Q {
    to: &'static str,
    path: Option<&'static str>,
    method: Option<&'static str>,
    headers: Vec<(&'static str, &'static str)>,
    gateway: Option<&'static str>,
}

fn to(to: &'static str) -> Q {
    Q {
        to,
        ..Default::default()
    }
}

impl Q {
    fn path(mut self, p: &'static str) -> Self {
        self.path = Some(p);
        self
    }
    fn method(mut self, m: &'static str) -> Self {
        self.method = Some(m);
        self
    }
    fn header(mut self, k: &'static str, v: &'static str) -> Self {
        self.headers.push((k, v));
        self
    }
    fn gateway(mut self, g: &'static str) -> Self {
        self.gateway = Some(g);
        self
    }

    /// `steerd explain` arguments for this query over `files`.
    fn args(&self, files: &[String]) -> Vec<String> {
        let mut args = vec!["explain".to_string()];
        args.extend(files.iter().cloned());
        args.extend(["--to".into(), self.to.into()]);
        if let Some(p) = self.path {
            args.extend(["--path".into(), p.into()]);
        }
        if let Some(m) = self.method {
            args.extend(["--method".into(), m.into()]);
        }
        for (k, v) in &self.headers {
            args.extend(["--header".into(), format!("{k}={v}")]);
        }
        if let Some(g) = self.gateway {
            args.extend(["--gateway".into(), g.into()]);
        }
        args
    }
}

/// Runs one case and compares (or, with STEERD_BLESS=1, rewrites) its three transcripts.
fn case(name: &str, files: &[&str], queries: &[Q]) {
    assert!(CASES.contains(&name), "add {name} to CASES");
    let files: Vec<String> = files.iter().map(|f| arg_path(f)).collect();
    let mut check = vec!["check".to_string()];
    check.extend(files.iter().cloned());
    let check = transcript(&check);
    let mut text = String::new();
    let mut json = String::new();
    for q in queries {
        let mut args = q.args(&files);
        text.push_str(&transcript(&args));
        text.push('\n');
        args.extend(["-o".into(), "json".into()]);
        json.push_str(&transcript(&args));
        json.push('\n');
    }

    let dir = golden_dir().join(name);
    let mut failures = Vec::new();
    for (file, actual) in [
        ("check.txt", check),
        ("explain.txt", text),
        ("explain-json.txt", json),
    ] {
        let path = dir.join(file);
        if bless() {
            std::fs::create_dir_all(&dir).expect("create the golden directory");
            std::fs::write(&path, &actual).expect("write the golden file");
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(expected) if expected == actual => {}
            Ok(expected) => failures.push(format!(
                "--- {} (golden)\n+++ actual\n{}",
                path.display(),
                diff(&expected, &actual)
            )),
            Err(e) => failures.push(format!("{}: {e}", path.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "output differs from the golden files; if the change is intended, regenerate them with \
         `STEERD_BLESS=1 cargo test -p steerd --test golden` and review `git diff tests/golden`\n\n{}",
        failures.join("\n")
    );
}

/// A line diff (longest common subsequence) with two lines of context around each change.
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut ops: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            ops.push(('-', a[i]));
            i += 1;
        } else {
            ops.push(('+', b[j]));
            j += 1;
        }
    }
    let near_change = |k: usize| {
        ops[k.saturating_sub(2)..(k + 3).min(ops.len())]
            .iter()
            .any(|(c, _)| *c != ' ')
    };
    let mut out = String::new();
    let mut skipped = false;
    for (k, (c, line)) in ops.iter().enumerate() {
        if near_change(k) {
            if skipped {
                out.push_str("@@\n");
                skipped = false;
            }
            out.push_str(&format!("{c}{line}\n"));
        } else {
            skipped = true;
        }
    }
    out
}

#[test]
fn diff_shows_changed_lines_with_context() {
    let expected = "a\nb\nc\nd\ne\nf\ng\nh\n";
    let actual = "a\nb\nc\nd\ne\nf\nG\nh\n";
    assert_eq!(diff(expected, actual), "@@\n e\n f\n-g\n+G\n h\n");
    assert_eq!(diff("x\n", "x\ny\n"), " x\n+y\n");
    assert_eq!(diff("same\n", "same\n"), "");
}

const BOOKINFO: &str = "bookinfo/platform/kube/bookinfo.yaml";
const DR_ALL: &str = "bookinfo/networking/destination-rule-all.yaml";

/// Every case, by the name of its directory under `tests/golden/`.
const CASES: &[&str] = &[
    "bookinfo-all-v1",
    "bookinfo-reviews-jason-v2-v3",
    "bookinfo-reviews-90-10",
    "bookinfo-reviews-80-20-pods",
    "bookinfo-ratings-test-abort",
    "bookinfo-ratings-test-delay",
    "bookinfo-fault-injection-details-v1",
    "bookinfo-ratings-db",
    "bookinfo-egress-google-apis",
    "bookinfo-gateway",
    "tcp-echo",
    "tcp-echo-20-v2",
    "tcp-echo-pods",
    "httpbin-gateway",
    "helloworld-gateway",
    "external",
    "check-mistakes",
];

fn bookinfo(routing: &str) -> [String; 3] {
    [
        BOOKINFO.to_string(),
        DR_ALL.to_string(),
        format!("bookinfo/networking/{routing}"),
    ]
}

fn bookinfo_case(name: &str, routing: &str, queries: &[Q]) {
    let files = bookinfo(routing);
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    case(name, &files, queries);
}

#[test]
fn bookinfo_all_v1() {
    bookinfo_case(
        "bookinfo-all-v1",
        "virtual-service-all-v1.yaml",
        &[
            to("productpage:9080").path("/productpage"),
            to("reviews").path("/reviews/0"),
            to("ratings.default.svc.cluster.local:9080").path("/ratings/0"),
            to("details").method("POST").path("/details/0"),
        ],
    );
}

#[test]
fn bookinfo_reviews_jason_v2_v3() {
    bookinfo_case(
        "bookinfo-reviews-jason-v2-v3",
        "virtual-service-reviews-jason-v2-v3.yaml",
        &[
            to("reviews").path("/").header("end-user", "jason"),
            to("reviews").path("/").header("end-user", "Jason"),
            to("reviews").path("/"),
            to("reviews:9080"),
        ],
    );
}

#[test]
fn bookinfo_reviews_90_10() {
    bookinfo_case(
        "bookinfo-reviews-90-10",
        "virtual-service-reviews-90-10.yaml",
        &[to("reviews").path("/reviews/1")],
    );
}

#[test]
fn bookinfo_reviews_80_20_pods() {
    case(
        "bookinfo-reviews-80-20-pods",
        &[
            BOOKINFO,
            DR_ALL,
            "bookinfo/networking/virtual-service-reviews-80-20.yaml",
            "fixtures/bookinfo-pods.yaml",
        ],
        &[
            to("reviews:9080").path("/reviews/1"),
            to("productpage").path("/productpage"),
            to("ratings:9080").path("/ratings/1"),
        ],
    );
}

#[test]
fn bookinfo_ratings_test_abort() {
    bookinfo_case(
        "bookinfo-ratings-test-abort",
        "virtual-service-ratings-test-abort.yaml",
        &[
            to("ratings").path("/ratings/0").header("end-user", "jason"),
            to("ratings").path("/ratings/0"),
        ],
    );
}

#[test]
fn bookinfo_ratings_test_delay() {
    bookinfo_case(
        "bookinfo-ratings-test-delay",
        "virtual-service-ratings-test-delay.yaml",
        &[
            to("ratings").path("/ratings/0").header("end-user", "jason"),
            to("ratings").path("/ratings/0").header("end-user", "mike"),
        ],
    );
}

#[test]
fn bookinfo_fault_injection_details_v1() {
    bookinfo_case(
        "bookinfo-fault-injection-details-v1",
        "fault-injection-details-v1.yaml",
        &[to("details").path("/details/0")],
    );
}

#[test]
fn bookinfo_ratings_db() {
    bookinfo_case(
        "bookinfo-ratings-db",
        "virtual-service-ratings-db.yaml",
        &[to("ratings").path("/ratings/0"), to("reviews").path("/")],
    );
}

#[test]
fn bookinfo_egress_google_apis() {
    bookinfo_case(
        "bookinfo-egress-google-apis",
        "egress-rule-google-apis.yaml",
        &[
            to("www.googleapis.com:443"),
            to("www.googleapis.com:80").path("/books/v1/volumes"),
            to("www.googleapis.com"),
        ],
    );
}

#[test]
fn bookinfo_gateway() {
    case(
        "bookinfo-gateway",
        &[BOOKINFO, "bookinfo/networking/bookinfo-gateway.yaml"],
        &[
            to("productpage:9080").path("/productpage"),
            to("productpage:9080")
                .path("/productpage")
                .gateway("bookinfo-gateway"),
            to("productpage:9080")
                .path("/static/css/style.css")
                .gateway("bookinfo-gateway"),
            to("productpage:9080")
                .path("/api/v1/products/1/reviews")
                .gateway("default/bookinfo-gateway"),
            to("productpage:9080")
                .path("/admin")
                .gateway("bookinfo-gateway"),
        ],
    );
}

#[test]
fn tcp_echo() {
    case(
        "tcp-echo",
        &[
            "tcp-echo/tcp-echo-services.yaml",
            "tcp-echo/tcp-echo-all-v1.yaml",
        ],
        &[
            to("tcp-echo:9000"),
            to("tcp-echo:9000").gateway("tcp-echo-gateway"),
            to("tcp-echo:9001"),
            to("tcp-echo"),
            to("tcp-echo:9002"),
            to("no-such-service:9000"),
        ],
    );
}

#[test]
fn tcp_echo_20_v2() {
    case(
        "tcp-echo-20-v2",
        &[
            "tcp-echo/tcp-echo-services.yaml",
            "tcp-echo/tcp-echo-all-v1.yaml",
            "tcp-echo/tcp-echo-20-v2.yaml",
        ],
        &[
            to("tcp-echo:9000").gateway("tcp-echo-gateway"),
            to("tcp-echo:9000"),
        ],
    );
}

#[test]
fn tcp_echo_pods() {
    case(
        "tcp-echo-pods",
        &[
            "tcp-echo/tcp-echo-services.yaml",
            "tcp-echo/tcp-echo-all-v1.yaml",
            "fixtures/tcp-echo-pods.yaml",
        ],
        &[to("tcp-echo:9000"), to("tcp-echo:9001")],
    );
}

#[test]
fn httpbin_gateway() {
    case(
        "httpbin-gateway",
        &["httpbin/httpbin.yaml", "httpbin/httpbin-gateway.yaml"],
        &[
            to("httpbin:8000").path("/status/418"),
            to("httpbin:8000")
                .path("/headers")
                .gateway("httpbin-gateway"),
            to("httpbin.default.svc.cluster.local:8000")
                .path("/status/200")
                .method("POST")
                .gateway("httpbin-gateway"),
        ],
    );
}

#[test]
fn helloworld_gateway() {
    case(
        "helloworld-gateway",
        &[
            "helloworld/helloworld.yaml",
            "helloworld/helloworld-gateway.yaml",
        ],
        &[
            to("helloworld:5000").path("/hello"),
            to("helloworld:5000")
                .path("/hello")
                .gateway("helloworld-gateway"),
            to("helloworld:5000")
                .path("/goodbye")
                .gateway("helloworld-gateway"),
        ],
    );
}

#[test]
fn external() {
    case(
        "external",
        &[
            "external/aptget.yaml",
            "external/github.yaml",
            "external/pypi.yaml",
        ],
        &[
            to("github.com:443"),
            to("pypi.python.org:443"),
            to("deb.debian.org:80").path("/debian/"),
        ],
    );
}

/// A file of mistakes beside bookinfo: `check` reports each (exit code 1); `explain` skips the
/// bad objects with a warning each and explains with the rest.
#[test]
fn check_mistakes() {
    case(
        "check-mistakes",
        &[BOOKINFO, DR_ALL, "fixtures/mistakes.yaml"],
        &[
            to("ratings").path("/ratings/0"),
            to("reviews").path("/reviews/0"),
        ],
    );
}

/// Every directory under `tests/golden/` belongs to a case (no stale files after a rename).
#[test]
fn no_stale_golden_files() {
    let stale: Vec<String> = std::fs::read_dir(golden_dir())
        .expect("tests/golden exists")
        .map(|e| {
            e.expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|d| d != "fixtures" && !CASES.contains(&d.as_str()))
        .collect();
    assert!(
        stale.is_empty(),
        "golden directories without a case: {stale:?}"
    );
}
