//! Malformed, hostile and huge manifests: whatever a file holds, parsing reports clear errors
//! (file, line, kind, object, field) for the bad documents, keeps the good ones, and nothing
//! on the way to a plan (validate, compile, analyze, explain) panics or runs away.
//!
//! The huge inputs have no timing assertions: finishing at all (no stack overflow, no
//! quadratic blow-up that would stall the test run) is the property.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use steerd::compile::analyze::analyze;
use steerd::compile::compile;
use steerd::compile::explain::{Query, explain};
use steerd::model::{ConfigSet, ParseError, parse_documents};
use steerd::sources::files::{FileSource, load_paths};

/// Parses `text` and puts the result through everything `steerd check` and the agent do.
/// Returns the number of objects and the parse errors.
fn pipeline(text: &str) -> (usize, Vec<ParseError>) {
    let (objects, errors) = parse_documents("bad.yaml", text);
    for e in &errors {
        // Every error names the file and a line.
        assert_eq!(e.origin.source, "bad.yaml");
        assert!(e.origin.line.is_some(), "{e}");
    }
    let n = objects.len();
    let mut cfg = ConfigSet::default();
    cfg.extend(objects);
    let _ = analyze(&cfg);
    let _ = compile(&cfg);
    for host in ["r", "reviews", "a"] {
        let _ = explain(
            &cfg,
            &Query {
                host: host.into(),
                path: Some("/".into()),
                ..Default::default()
            },
        );
    }
    (n, errors)
}

fn one_error(text: &str) -> ParseError {
    let (n, errors) = pipeline(text);
    assert_eq!(n, 0, "{text}");
    assert_eq!(errors.len(), 1, "{text}: {errors:#?}");
    errors.into_iter().next().unwrap()
}

const VS: &str =
    "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: n}\n";
const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n";

#[test]
fn malformed_yaml_is_an_error_at_its_line() {
    for (text, line) in [
        ("metadata: [unclosed\n", 1),
        ("a: b: c\n", 1),
        ("a: 1\nb:\n\t- tab\n", 3),
        ("{\n", 2),
        ("key: \"unterminated\n", 1),
        ("- a\nb: c\n", 2),
        ("a: *undefined\n", 1),
        ("a: !!int x\n", 1),
        ("kind: Service\n  indented: badly\n", 2),
    ] {
        let e = one_error(text);
        assert_eq!(e.kind, "document", "{text:?}: {e}");
        assert!(e.message.starts_with("invalid YAML"), "{text:?}: {e}");
        assert!(
            e.origin.line.unwrap() >= line,
            "{text:?}: {e} (expected line >= {line})"
        );
    }
}

#[test]
fn a_bad_document_does_not_hide_the_good_ones() {
    let text = format!("{SVC}---\nkind: [\n---\n{VS}spec: {{hosts: [r]}}\n---\n{SVC}");
    let (n, errors) = pipeline(&text);
    assert_eq!(n, 3);
    assert_eq!(errors.len(), 1);
    // Where the scanner noticed: the line after the unclosed `[` of line 5.
    assert_eq!(errors[0].origin.line, Some(6), "{}", errors[0]);
}

#[test]
fn wrong_types_name_the_field() {
    let mut mismatches = Vec::new();
    for (text, field, message) in [
        (format!("{VS}spec: 5\n"), "spec", "invalid type"),
        (format!("{VS}spec: {{hosts: 5}}\n"), "spec.hosts", "invalid type"),
        (format!("{VS}spec: {{hosts: [[r]]}}\n"), "spec.hosts[0]", "invalid type"),
        (
            format!("{VS}spec:\n  hosts: [r]\n  http:\n  - route:\n    - destination: {{host: r}}\n      weight: heavy\n"),
            "spec.http[0].route[0].weight",
            "invalid type",
        ),
        (
            // Beyond what JSON numbers hold: serde_yaml names the path in its message.
            format!("{VS}spec:\n  hosts: [r]\n  http:\n  - route:\n    - destination: {{host: r}}\n      weight: 99999999999999999999\n"),
            "-",
            "spec.http[0].route[0].weight: JSON number out of range",
        ),
        (
            format!("{VS}spec:\n  hosts: [r]\n  http:\n  - timeout: 1 fortnight\n    route: [{{destination: {{host: r}}}}]\n"),
            "spec.http[0].timeout",
            "",
        ),
        (
            format!("{VS}spec:\n  hosts: [r]\n  http:\n  - match: [{{uri: {{exact: /a, prefix: /b}}}}]\n    route: [{{destination: {{host: r}}}}]\n"),
            "spec.http[0].match[0].uri",
            "",
        ),
        (
            format!("{VS}spec:\n  hosts: [r]\n  tcp: {{route: []}}\n"),
            "spec.tcp",
            "invalid type",
        ),
        (
            format!("{VS}spec:\n  hosts: [r]\n  unknownField: 1\n"),
            "spec.unknownField",
            "unknown field `unknownField`, expected one of",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {host: [a]}\n".into(),
            "spec.host",
            "invalid type",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec:\n  servers:\n  - port: {number: -1, name: http, protocol: HTTP}\n    hosts: ['*']\n".into(),
            "spec.servers[0].port.number",
            "",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s}\nspec: {hosts: a.com}\n".into(),
            "spec.hosts",
            "invalid type",
        ),
        (format!("{SVC}spec: {{ports: [{{port: abc}}]}}\n"), "spec.ports[0].port", "invalid type"),
        (format!("{SVC}spec: []\n"), "spec", "invalid type"),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: [1]}\n".into(),
            "status.podIP",
            "invalid type",
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e}\naddressType: IPv4\nendpoints: 5\n".into(),
            "endpoints",
            "invalid type",
        ),
        ("apiVersion: v1\nkind: Service\nmetadata: []\n".into(), "metadata", "missing metadata"),
        ("apiVersion: v1\nkind: Service\n".into(), "metadata", "missing metadata"),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: 5}\n".into(),
            "metadata",
            "missing metadata.name",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: a, labels: [x]}\n".into(),
            "metadata",
            "expected a map of strings",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: a, annotations: {a: {b: c}}}\n".into(),
            "metadata",
            "expected a map of strings",
        ),
        ("just a string\n".into(), "-", "expected a mapping"),
        ("- a\n- b\n".into(), "-", "expected a mapping"),
        ("42\n".into(), "-", "expected a mapping"),
    ] {
        let (n, errors) = pipeline(&text);
        match errors.as_slice() {
            [e] if n == 0 && e.field == field && e.message.contains(message) => {}
            _ => mismatches.push(format!("{text}\n  want {field}: {message}\n  got {errors:?}")),
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n\n"));
}

#[test]
fn unknown_kinds_and_versions() {
    // Istio networking kinds steerd does not read are errors, not silently ignored...
    let e = one_error(
        "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: f}\n",
    );
    assert_eq!((e.kind.as_str(), e.field.as_str()), ("EnvoyFilter", "kind"));
    assert!(e.message.contains("not supported"), "{e}");
    let e = one_error("apiVersion: networking.istio.io/v1\nkind: 5\nmetadata: {name: f}\n");
    assert_eq!(e.field, "kind");
    let e = one_error(
        "apiVersion: networking.istio.io/v3\nkind: VirtualService\nmetadata: {name: v}\n",
    );
    assert_eq!(e.field, "apiVersion");
    assert!(e.message.contains("unsupported version"), "{e}");
    // ...as are their items inside a List.
    let e = one_error(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: networking.istio.io/v1\n  kind: Telemetry\n  metadata: {name: t}\n",
    );
    assert_eq!(e.kind, "Telemetry");
    // Security kinds other than AuthorizationPolicy too.
    let e = one_error(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\n",
    );
    assert!(e.message.contains("not supported"), "{e}");
    // Other groups' kinds and documents without a kind are skipped without an error.
    for text in [
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: 5\n",
        "apiVersion: example.com/v1\nkind: Service\nmetadata: {name: s}\n",
        "metadata: {name: nameless}\n",
        "apiVersion: v1\nkind: List\nitems: 5\n",
        "apiVersion: v1\nkind: List\n",
        "~\n",
        "# only a comment\n",
        "",
    ] {
        let (n, errors) = pipeline(text);
        assert_eq!((n, errors.len()), (0, 0), "{text}: {errors:?}");
    }
}

#[test]
fn non_utf8_files_are_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        b"apiVersion: v1\nkind: Service\nmetadata: {name: \xff\xfe}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("good.yaml"), SVC).unwrap();

    // `steerd check`/`explain` stop with the file's name.
    let Err(e) = load_paths(std::slice::from_ref(&bad)) else {
        panic!("a non-UTF-8 file is an error");
    };
    let e = e.to_string();
    assert!(
        e.contains("bad.yaml") && e.contains("UTF-8"),
        "unclear error: {e}"
    );

    // The agent's file source reports it and keeps serving the other files.
    let snapshot = FileSource::new(dir.path()).load().unwrap();
    assert_eq!(snapshot.config.services.len(), 1);
    assert_eq!(snapshot.errors.len(), 1, "{:?}", snapshot.errors);
    assert_eq!(snapshot.errors[0].kind, "file");
    assert!(
        snapshot.errors[0].origin.source.ends_with("bad.yaml"),
        "{}",
        snapshot.errors[0]
    );

    // Text that made it through a lossy conversion, control characters and a BOM.
    let lossy = String::from_utf8_lossy(b"kind: \xff\xfe\xfd\nmetadata: {name: \xc3}\n");
    pipeline(&lossy);
    pipeline("kind: Service\u{0}\u{1}\u{7f}\n");
    pipeline("apiVersion: v1\nkind: Service\nmetadata: {name: \"\u{0}\"}\n");
    pipeline(&format!("\u{feff}{SVC}"));
    pipeline(&format!("{SVC}---\n\u{feff}{SVC}"));
}

/// Billion laughs: nine levels of nine aliases each.
#[test]
fn alias_expansion_is_bounded() {
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 9].join(", ");
        writeln!(text, "a{i}: &a{i} [{refs}]").unwrap();
    }
    let e = one_error(&text);
    assert!(e.message.starts_with("invalid YAML"), "{e}");
    // Aliases inside a real object are fine when small.
    let (n, errors) = pipeline(&format!(
        "{VS}spec:\n  hosts: &h [r]\n  http:\n  - route: [{{destination: {{host: r}}}}]\n---\n{SVC}spec:\n  ports: &p [{{port: 80}}]\n"
    ));
    assert_eq!((n, errors.len()), (2, 0), "{errors:?}");
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    // serde_yaml stops at 128 levels, after its scanner has read the whole document; for flow
    // collections that read takes time quadratic in the depth (libyaml re-checks every open
    // level per token), so the depth here is kept to what a debug build reads in well under a
    // second. 100k levels would take minutes.
    let depth = 5_000;
    for (open, close) in [("[", "]"), ("{a: ", "}")] {
        let text = format!("spec: {}{}\n", open.repeat(depth), close.repeat(depth));
        let e = one_error(&text);
        assert!(e.message.contains("recursion limit"), "{e}");
        // The same depth inside an object steerd reads.
        let text = format!("{VS}spec: {}{}\n", open.repeat(depth), close.repeat(depth));
        one_error(&text);
    }
    // Unclosed.
    one_error(&"[".repeat(depth));
    // Block-style nesting, indented (4 MB).
    let mut text = String::from(VS);
    text.push_str("spec:\n");
    for i in 0..2_000 {
        writeln!(text, "{}a:", " ".repeat(2 * (i + 1))).unwrap();
    }
    let e = one_error(&text);
    assert!(e.message.contains("recursion limit"), "{e}");
    // Just under the limit is fine for YAML, and a type error for steerd.
    let text = format!(
        "{VS}spec: {{hosts: {}r{}}}\n",
        "[".repeat(100),
        "]".repeat(100)
    );
    let e = one_error(&text);
    assert_eq!(e.field, "spec.hosts[0]", "{e}");
}

#[test]
fn huge_files_complete() {
    // 100k documents (11 MB) through parse, compile and analyze.
    let mut text = String::new();
    for i in 0..100_000 {
        write!(
            text,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{clusterIP: 10.{}.{}.{}, ports: [{{port: 80, name: http}}]}}\n",
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        )
        .unwrap();
    }
    let (objects, errors) = parse_documents("huge.yaml", &text);
    assert_eq!((objects.len(), errors.len()), (100_000, 0));
    let mut cfg = ConfigSet::default();
    cfg.extend(objects);
    assert_eq!(compile(&cfg).services.len(), 100_000);
    let _ = analyze(&cfg);
    drop(cfg);

    // One 5 MB VirtualService of 20k rules through the whole pipeline (the IST0131 duplicate
    // check was quadratic in the number of match blocks: minutes for this file).
    let mut text = format!("{VS}spec:\n  hosts: [r]\n  http:\n");
    for i in 0..20_000 {
        let uri = if i % 500 == 0 {
            format!("regex: \"/r{i}/[0-9]+\"")
        } else {
            format!("exact: /r{i}")
        };
        write!(
            text,
            "  - name: rule-{i}\n    match:\n    - uri: {{prefix: /p{i}/}}\n      headers: {{x-user: {{exact: u{i}}}}}\n    - uri: {{{uri}}}\n    route:\n    - destination: {{host: r, subset: v{}}}\n      weight: 60\n    - destination: {{host: r, subset: v{}}}\n      weight: 40\n    timeout: 5s\n",
            i % 3,
            (i + 1) % 3
        )
        .unwrap();
    }
    let (n, errors) = pipeline(&text);
    assert_eq!((n, errors.len()), (1, 0), "{errors:?}");

    // A 20 MB scalar, a 200k-entry flow mapping on one line, and a million empty documents.
    let big = "x".repeat(20 << 20);
    let (n, errors) = pipeline(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: a, annotations: {{big: {big}}}}}\n"
    ));
    assert_eq!((n, errors.len()), (1, 0), "{errors:?}");
    let mut flow = String::from("{");
    for i in 0..200_000 {
        write!(flow, "k{i}: v, ").unwrap();
    }
    flow.push('}');
    let (n, errors) = pipeline(&flow);
    assert_eq!((n, errors.len()), (0, 1), "a mapping without metadata");
    let (n, errors) = pipeline(&"---\n".repeat(1_000_000));
    assert_eq!((n, errors.len()), (0, 0));
}

// ---- The same through `steerd check`: exit 1 when objects are bad, 2 when it cannot run ----

/// What one `steerd check` run printed.
struct CheckRun {
    code: i32,
    stdout: String,
    stderr: String,
}

fn steerd_check(paths: &[&Path]) -> CheckRun {
    let out = Command::new(env!("CARGO_BIN_EXE_steerd"))
        .arg("check")
        .args(paths)
        .output()
        .expect("run steerd");
    let run = CheckRun {
        code: out.status.code().expect("steerd exits (no signal)"),
        stdout: String::from_utf8(out.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("UTF-8 stderr"),
    };
    assert!(
        !run.stderr.contains("panicked"),
        "steerd check panicked:\n{}",
        run.stderr
    );
    run
}

/// The `IST0106` line of `stdout` that names `kind object file:line`.
fn error_line<'a>(stdout: &'a str, kind: &str, object: &str, at: &str) -> &'a str {
    let prefix = format!("Error [IST0106] ({kind} {object} {at}) Schema validation error: ");
    stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in\n{stdout}"))
}

#[test]
fn check_names_file_line_object_and_field_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    let docs = [
        format!("{SVC}spec: {{ports: [{{port: 80, name: http}}]}}\n"),
        format!(
            "{VS}spec:\n  hosts: [r]\n  http:\n  - route:\n    - destination: {{host: a}}\n      weight: heavy\n"
        ),
        "apiVersion: networking.istio.io/v1\nkind: EnvoyFilter\nmetadata: {name: f}\n".into(),
        "kind: [\n".into(),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {host: [a]}\n".into(),
    ];
    std::fs::write(&file, docs.join("---\n")).unwrap();
    // Each document's first line, and `file:line` for a line.
    let starts: Vec<usize> = docs
        .iter()
        .scan(1, |line, doc| {
            let start = *line;
            *line += doc.lines().count() + 1;
            Some(start)
        })
        .collect();
    let at = |line: usize| format!("{}:{line}", file.display());
    let run = steerd_check(&[&file]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let e = error_line(&run.stdout, "VirtualService", "n/r", &at(starts[1]));
    assert!(
        e.ends_with("spec.http[0].route[0].weight: invalid type: string \"heavy\", expected i32"),
        "{e}"
    );
    let e = error_line(&run.stdout, "EnvoyFilter", "default/f", &at(starts[2]));
    assert!(
        e.ends_with("kind: networking.istio.io kind \"EnvoyFilter\" is not supported yet"),
        "{e}"
    );
    // A YAML error is placed where the scanner noticed it: the line after the unclosed `[`,
    // in the file's numbering, in the message too.
    let yaml_error = starts[3] + 1;
    let e = error_line(&run.stdout, "document", "-", &at(yaml_error));
    assert!(e.contains("-: invalid YAML: "), "{e}");
    assert!(e.contains(&format!(" at line {yaml_error} column ")), "{e}");
    let e = error_line(&run.stdout, "DestinationRule", "default/d", &at(starts[4]));
    assert!(e.contains("spec.host: invalid type"), "{e}");
    assert_eq!(run.stdout.matches("IST0106").count(), 4, "{}", run.stdout);

    // The good document alone is clean.
    std::fs::write(&file, SVC).unwrap();
    let run = steerd_check(&[&file]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .starts_with("\u{2714} No validation issues found"),
        "{}",
        run.stdout
    );
}

#[test]
fn check_exits_2_when_a_file_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.yaml");
    let run = steerd_check(&[&missing]);
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(
        run.stderr
            .starts_with(&format!("steerd check: {}: ", missing.display())),
        "{}",
        run.stderr
    );

    let bad = dir.path().join("latin1.yaml");
    std::fs::write(
        &bad,
        b"apiVersion: v1\nkind: Service\nmetadata: {name: caf\xe9}\n",
    )
    .unwrap();
    let run = steerd_check(&[dir.path()]);
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains(&bad.display().to_string()) && run.stderr.contains("UTF-8"),
        "{}",
        run.stderr
    );
}

#[test]
fn check_reports_deep_nesting_and_huge_files() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("deep.yaml");
    std::fs::write(
        &deep,
        format!("{VS}spec: {}{}\n", "[".repeat(5_000), "]".repeat(5_000)),
    )
    .unwrap();
    let run = steerd_check(&[&deep]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    // Line 4 is `spec: [[[...`, the line serde_yaml gives up on.
    let e = error_line(
        &run.stdout,
        "document",
        "-",
        &format!("{}:4", deep.display()),
    );
    assert!(e.contains("recursion limit exceeded"), "{e}");

    // 100k Services (11 MB), the last one with a wrong type: one error, at its line.
    let huge = dir.path().join("huge.yaml");
    let mut text = String::new();
    let n = 100_000;
    for i in 0..n {
        let port = if i == n - 1 { "eighty" } else { "80" };
        write!(
            text,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{clusterIP: 10.{}.{}.{}, ports: [{{port: {port}, name: http}}]}}\n",
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        )
        .unwrap();
    }
    std::fs::write(&huge, &text).unwrap();
    let run = steerd_check(&[&huge]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let at = format!("{}:{}", huge.display(), 5 * (n - 1) + 2);
    let e = error_line(&run.stdout, "Service", &format!("default/s{}", n - 1), &at);
    assert!(e.contains("spec.ports[0].port: invalid type"), "{e}");
    assert_eq!(run.stdout.matches("IST0106").count(), 1);
}
