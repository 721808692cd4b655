use super::*;
use crate::model::parse_documents;

/// Parses one object of `kind` with `spec` (YAML, unindented) and validates it.
fn check_in(kind: &str, name: &str, namespace: &str, spec: &str) -> Vec<Diagnostic> {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    let doc = format!(
        "apiVersion: networking.istio.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}"
    );
    let (objs, errs) = parse_documents("t.yaml", &doc);
    assert!(errs.is_empty(), "parse: {errs:#?}\n{doc}");
    let mut config = ConfigSet::default();
    config.extend(objs);
    validate(&config)
}

fn check(kind: &str, spec: &str) -> Vec<Diagnostic> {
    check_in(kind, "x", "ns", spec)
}

fn errors(diags: &[Diagnostic]) -> Vec<String> {
    diags
        .iter()
        .filter(|d| d.level == Level::Error)
        .map(|d| format!("{}: {}", d.field, d.message))
        .collect()
}

fn warnings(diags: &[Diagnostic]) -> Vec<String> {
    diags
        .iter()
        .filter(|d| d.level == Level::Warning)
        .map(|d| format!("{}: {}", d.field, d.message))
        .collect()
}

#[track_caller]
fn assert_valid(diags: Vec<Diagnostic>) {
    let e = errors(&diags);
    assert!(e.is_empty(), "unexpected errors: {e:#?}");
}

/// Asserts an error at `field` whose message contains `message`.
#[track_caller]
fn assert_error(diags: Vec<Diagnostic>, field: &str, message: &str) {
    let e = errors(&diags);
    assert!(
        diags
            .iter()
            .any(|d| d.level == Level::Error && d.field == field && d.message.contains(message)),
        "expected error at {field} containing {message:?}, got {e:#?}"
    );
}

#[track_caller]
fn assert_warning(diags: Vec<Diagnostic>, field: &str, message: &str) {
    let w = warnings(&diags);
    assert!(
        diags
            .iter()
            .any(|d| d.level == Level::Warning && d.field == field && d.message.contains(message)),
        "expected warning at {field} containing {message:?}, got {w:#?}"
    );
}

const ROUTE: &str = "  route: [{destination: {host: r}}]\n";

fn vs_http(route_fields: &str) -> Vec<Diagnostic> {
    check(
        "VirtualService",
        &format!("hosts: [r]\nhttp:\n- {}", route_fields.trim_start()),
    )
}

// ------------------------------------------------------------------------------------------------
// Diagnostics carry kind, object and path
// ------------------------------------------------------------------------------------------------

#[test]
fn diagnostics_name_kind_object_origin_and_field() {
    let diags = check_in(
        "VirtualService",
        "reviews",
        "shop",
        "hosts: [reviews]\nhttp:\n- route:\n  - destination: {host: reviews}\n    weight: -1\n",
    );
    let d = diags
        .iter()
        .find(|d| d.level == Level::Error)
        .expect("an error");
    assert_eq!(d.kind, "VirtualService");
    assert_eq!(d.object, "shop/reviews");
    assert_eq!(d.origin.source, "t.yaml");
    assert_eq!(d.origin.line, Some(1));
    assert_eq!(d.field, "spec.http[0].route[0].weight");
    assert_eq!(d.message, "weight -1 < 0");
    assert_eq!(
        d.to_string(),
        "Error (VirtualService shop/reviews) t.yaml:1: spec.http[0].route[0].weight: weight -1 < 0"
    );
}

// ------------------------------------------------------------------------------------------------
// Hosts and names
// ------------------------------------------------------------------------------------------------

#[test]
fn host_names_and_wildcards() {
    for good in [
        "reviews",
        "reviews.shop.svc.cluster.local",
        "*.example.com",
        "*foo.example.com",
        "*-foo.example.com",
        "example.com.",
        "10.0.0.1",
        "Reviews.Example.com",
    ] {
        assert_valid(check(
            "VirtualService",
            &format!(
                "hosts: [{good:?}]\n{}",
                "http:\n- route: [{destination: {host: r}}]\n"
            ),
        ));
    }
    for (bad, message) in [
        ("foo.*.com", "label \"*\" invalid"),
        ("*.*.com", "label \"*\" invalid"),
        ("-foo.com", "label \"-foo\" invalid"),
        ("foo_bar.com", "invalid"),
        ("foo.123", "cannot be all-numeric"),
        ("foo..com", "label \"\" invalid"),
        ("", "empty domain name not allowed"),
    ] {
        assert_error(
            check(
                "VirtualService",
                &format!("hosts: [{bad:?}]\nhttp:\n- route: [{{destination: {{host: r}}}}]\n"),
            ),
            "spec.hosts[0]",
            message,
        );
    }
    let long = format!("{}.com", "a".repeat(64));
    assert_error(
        check(
            "VirtualService",
            &format!("hosts: [{long}]\nhttp:\n- route: [{{destination: {{host: r}}}}]\n"),
        ),
        "spec.hosts[0]",
        "invalid",
    );
    assert!(
        validate_fqdn(&"a.".repeat(128))
            .unwrap_err()
            .contains("too long")
    );
}

#[test]
fn mesh_virtual_service_cannot_use_bare_wildcard_but_gateways_can() {
    assert_error(
        check(
            "VirtualService",
            "hosts: ['*']\nhttp:\n- route: [{destination: {host: r}}]\n",
        ),
        "spec.hosts[0]",
        "wildcard host * is not allowed for virtual services bound to the mesh gateway",
    );
    assert_valid(check(
        "VirtualService",
        "hosts: ['*']\ngateways: [istio-system/gw]\nhttp:\n- route: [{destination: {host: r}}]\n",
    ));
}

#[test]
fn duplicate_and_overlapping_hosts() {
    assert_error(
        check(
            "VirtualService",
            "hosts: ['*.example.com', a.example.com]\nhttp:\n- route: [{destination: {host: r}}]\n",
        ),
        "spec.hosts[1]",
        "duplicate hosts in virtual service: *.example.com & a.example.com",
    );
    assert_valid(check(
        "VirtualService",
        "hosts: [a.example.com, b.example.com]\nhttp:\n- route: [{destination: {host: r}}]\n",
    ));
}

#[test]
fn gateway_references() {
    for good in [
        "mesh",
        "istio-system/gw",
        "gw",
        "my-gateway.istio-system.svc.cluster.local",
    ] {
        assert_valid(check(
            "VirtualService",
            &format!(
                "hosts: [a.example.com]\ngateways: [{good}]\nhttp:\n- route: [{{destination: {{host: r}}}}]\n"
            ),
        ));
    }
    assert_warning(
        check(
            "VirtualService",
            "hosts: [a.example.com]\ngateways: [gw.istio-system]\nhttp:\n- route: [{destination: {host: r}}]\n",
        ),
        "spec.gateways[0]",
        "prefer the <namespace>/<name> format: \"istio-system/gw\"",
    );
    for (bad, message) in [
        ("/gw", "config namespace and gateway name cannot be empty"),
        (
            "istio_system/gw",
            "invalid value for namespace: \"istio_system\"",
        ),
        ("ns/gw.x", "invalid value for gateway name: \"gw.x\""),
        ("ns/gw/x", "invalid value for gateway name"),
        ("gw_1", "invalid"),
    ] {
        assert_error(
            check(
                "VirtualService",
                &format!(
                    "hosts: [a.example.com]\ngateways: [mesh, {bad:?}]\nhttp:\n- route: [{{destination: {{host: r}}}}]\n"
                ),
            ),
            "spec.gateways[1]",
            message,
        );
    }
    // In matches too.
    assert_error(
        vs_http("match: [{gateways: [a/b/c]}]\n  route: [{destination: {host: r}}]\n"),
        "spec.http[0].match[0].gateways[0]",
        "invalid value for gateway name",
    );
}

#[test]
fn delegate_virtual_services() {
    assert_valid(check(
        "VirtualService",
        "http:\n- match: [{uri: {prefix: /a}}]\n  route: [{destination: {host: r}}]\n",
    ));
    let diags = check(
        "VirtualService",
        "gateways: [gw]\nhttp:\n- delegate: {name: d}\ntcp:\n- route: [{destination: {host: r}}]\n",
    );
    assert_error(
        diags.clone(),
        "spec.gateways",
        "delegate virtual service must have no gateways specified",
    );
    assert_error(
        diags.clone(),
        "spec.tcp",
        "delegate virtual service must have no tcp route specified",
    );
    assert_error(
        diags,
        "spec.http[0].delegate",
        "delegate HTTP route cannot contain delegate",
    );
    // A root route may only delegate.
    assert_valid(check(
        "VirtualService",
        "hosts: [a.example.com]\nhttp:\n- match: [{uri: {prefix: /a}}]\n  delegate: {name: d, namespace: n}\n",
    ));
    assert_error(
        check(
            "VirtualService",
            "hosts: [a.example.com]\nhttp:\n- name: root\n  delegate: {name: d}\n  route: [{destination: {host: r}}]\n",
        ),
        "spec.http[0].route",
        "root HTTP route root must not specify route",
    );
}

#[test]
fn a_virtual_service_needs_routes() {
    assert_error(
        check("VirtualService", "hosts: [r]\n"),
        "spec",
        "http, tcp or tls must be provided in virtual service",
    );
}

// ------------------------------------------------------------------------------------------------
// Route destinations and weights
// ------------------------------------------------------------------------------------------------

#[test]
fn weights() {
    assert_valid(vs_http(
        "route: [{destination: {host: a}, weight: 80}, {destination: {host: b}, weight: 20}]\n",
    ));
    // Weights are relative: they need not add up to 100.
    assert_valid(vs_http(
        "route: [{destination: {host: a}, weight: 1}, {destination: {host: b}, weight: 3}]\n",
    ));
    // A single destination needs no weight; several need a positive total.
    assert_valid(vs_http("route: [{destination: {host: a}}]\n"));
    assert_valid(vs_http(
        "route: [{destination: {host: a}, weight: 0}, {destination: {host: b}, weight: 100}]\n",
    ));
    assert_error(
        vs_http("route: [{destination: {host: a}}, {destination: {host: b}}]\n"),
        "spec.http[0].route",
        "total destination weight = 0",
    );
    assert_error(
        vs_http(
            "route: [{destination: {host: a}, weight: -5}, {destination: {host: b}, weight: 10}]\n",
        ),
        "spec.http[0].route[0].weight",
        "weight -5 < 0",
    );
    assert_error(
        check(
            "VirtualService",
            "hosts: [r]\ntcp:\n- route: [{destination: {host: a}, weight: 0}, {destination: {host: b}}]\n",
        ),
        "spec.tcp[0].route",
        "total destination weight = 0",
    );
    assert_error(
        check(
            "VirtualService",
            "hosts: [r]\ntcp:\n- match: [{port: 80}]\n",
        ),
        "spec.tcp[0].route",
        "TCP route is required",
    );
}

#[test]
fn destinations() {
    assert_error(
        vs_http("route: [{destination: {host: '*'}}]\n"),
        "spec.http[0].route[0].destination.host",
        "invalid destination host *",
    );
    assert_error(
        vs_http("route: [{destination: {host: r, subset: v1.0}}]\n"),
        "spec.http[0].route[0].destination.subset",
        "subset name is invalid: v1.0",
    );
    assert_error(
        vs_http("route: [{destination: {host: r, port: {number: 70000}}}]\n"),
        "spec.http[0].route[0].destination.port.number",
        "port number 70000 must be in the range 1..65535",
    );
    assert_error(
        vs_http("route: [{destination: {host: r, port: {}}}]\n"),
        "spec.http[0].route[0].destination.port.number",
        "port number 0",
    );
    assert_valid(vs_http(
        "route: [{destination: {host: '*.example.com', subset: V1-a, port: {number: 443}}}]\n",
    ));
}

// ------------------------------------------------------------------------------------------------
// Matches and regexes
// ------------------------------------------------------------------------------------------------

#[test]
fn string_matches() {
    assert_valid(vs_http(&format!(
        "match:\n  - uri: {{prefix: ''}}\n    headers: {{x-a: {{exact: ''}}, x-b: {{}}}}\n{ROUTE}"
    )));
    assert_error(
        vs_http(&format!("match: [{{method: {{prefix: ''}}}}]\n{ROUTE}")),
        "spec.http[0].match[0].method",
        "\"method\": prefix string match should not be empty",
    );
    assert_error(
        vs_http(&format!("match: [{{uri: {{regex: ''}}}}]\n{ROUTE}")),
        "spec.http[0].match[0].uri",
        "\"uri\": regex string match should not be empty",
    );
    assert_error(
        vs_http(&format!(
            "match: [{{queryParams: {{q: {{prefix: ''}}}}}}]\n{ROUTE}"
        )),
        "spec.http[0].match[0].queryParams.q",
        "prefix string match should not be empty",
    );
    // `regex: "*"` in withoutHeaders means "present", it is not a regex.
    assert_valid(vs_http(&format!(
        "match: [{{withoutHeaders: {{x-a: {{regex: '*'}}}}}}]\n{ROUTE}"
    )));
    assert_error(
        vs_http(&format!(
            "match: [{{headers: {{x-a: {{regex: '*'}}}}}}]\n{ROUTE}"
        )),
        "spec.http[0].match[0].headers.x-a",
        "Istio uses RE2 style regex-based match",
    );
}

#[test]
fn regexes_follow_re2() {
    for good in [
        "^/api/v[0-9]+/.*$",
        "(?i)foo",
        "(?P<name>a)(?<other>b)",
        "\\pL+",
        "[[:alpha:]]+",
        "a{1000}",
        "\\Q.*+\\E$",
        "(?sU:a.b)",
        "\\x41\\x{263a}",
    ] {
        assert!(check_re2(good).is_ok(), "{good}: {:?}", check_re2(good));
    }
    for (bad, message) in [
        ("(?=a)", "look-around"),
        ("(?<!a)b", "look-around"),
        ("(a)\\1", "backreferences"),
        ("a{1001}", "invalid repeat count"),
        ("a{2,1001}", "invalid repeat count"),
        ("(?x)a b", "flag 'x'"),
        ("[a", "unclosed"),
        ("(a", "unclosed"),
        ("*a", "repetition operator missing expression"),
        ("\\<word\\>", "not RE2 syntax"),
        ("[a&&b]", "set operations"),
        ("[a[bc]]", "nested character classes"),
        ("\\p{NotAProperty}", "Unicode property"),
    ] {
        let e = check_re2(bad).unwrap_err();
        assert!(e.contains(message), "{bad}: {e}");
    }
    assert_error(
        vs_http(&format!("match: [{{uri: {{regex: '(?=x)'}}}}]\n{ROUTE}")),
        "spec.http[0].match[0].uri",
        "\"uri\": look-around",
    );
    let long = "a".repeat(1025);
    assert_error(
        vs_http(&format!(
            "match: [{{authority: {{regex: {long}}}}}]\n{ROUTE}"
        )),
        "spec.http[0].match[0].authority",
        "regex is too large, max length allowed is 1024",
    );
}

#[test]
fn match_headers_ports_labels_and_namespaces() {
    assert_valid(vs_http(&format!(
        "match:\n  - headers: {{':authority': {{exact: a}}, '@request.auth.claims.group': {{exact: x}}}}\n    port: 8080\n    sourceLabels: {{app.kubernetes.io/name: web, version: v1}}\n    sourceNamespace: Shop-1\n{ROUTE}"
    )).into_iter().filter(|d| !d.message.contains("JWT")).collect());
    assert_error(
        vs_http(&format!(
            "match: [{{headers: {{'bad header': {{exact: a}}}}}}]\n{ROUTE}"
        )),
        "spec.http[0].match[0].headers[\"bad header\"]",
        "header name bad header is not a valid header name",
    );
    assert_error(
        vs_http(&format!("match: [{{port: 65536}}]\n{ROUTE}")),
        "spec.http[0].match[0].port",
        "port number 65536 must be in the range 1..65535",
    );
    assert_error(
        vs_http(&format!(
            "match: [{{sourceLabels: {{'-bad': x}}}}]\n{ROUTE}"
        )),
        "spec.http[0].match[0].sourceLabels.-bad",
        "invalid tag key: \"-bad\"",
    );
    assert_error(
        vs_http(&format!(
            "match: [{{sourceLabels: {{app: 'a b'}}}}]\n{ROUTE}"
        )),
        "spec.http[0].match[0].sourceLabels.app",
        "invalid tag value: \"a b\"",
    );
    assert_error(
        vs_http(&format!("match: [{{sourceNamespace: shop.prod}}]\n{ROUTE}")),
        "spec.http[0].match[0].sourceNamespace",
        "sourceNamespace match shop.prod is invalid",
    );
}

#[test]
fn jwt_claim_routing_needs_a_gateway() {
    let spec = "match: [{headers: {'@request.auth.claims.group': {exact: admin}}}]\n  route: [{destination: {host: r}}]\n";
    assert_error(
        vs_http(spec),
        "spec.http[0].match[0].headers[\"@request.auth.claims.group\"]",
        "JWT claim based routing (key: @request.auth.claims.group) is only supported for gateway",
    );
    assert_valid(check(
        "VirtualService",
        &format!("hosts: [a.example.com]\ngateways: [istio-system/gw]\nhttp:\n- {spec}"),
    ));
}

#[test]
fn header_names_with_multibyte_characters_where_the_jwt_prefix_ends() {
    // Found by the `parse` fuzz target: the JWT-claim check sliced the name at byte 20, inside
    // the `é` of `@request.auth.claimé` (bytes 19..21), and panicked.
    for name in [
        "@request.auth.claim\u{e9}",
        "@request.auth.claim\u{fffd}.x",
        "\u{e9}",
    ] {
        let spec = format!(
            "match: [{{headers: {{'{name}': {{exact: a}}}}}}]\n  route: [{{destination: {{host: r}}}}]\n"
        );
        assert_error(
            vs_http(&spec),
            &format!("spec.http[0].match[0].headers[\"{name}\"]"),
            "is not a valid header name",
        );
    }
    assert!(!is_jwt_claim_route("@request.auth.claim\u{e9}"));
    assert!(is_jwt_claim_route("@REQUEST.auth.claims.\u{e9}"));
}

// ------------------------------------------------------------------------------------------------
// Route actions
// ------------------------------------------------------------------------------------------------

#[test]
fn route_redirect_direct_response_exclusivity() {
    assert_error(
        vs_http("redirect: {uri: /new}\n  route: [{destination: {host: r}}]\n"),
        "spec.http[0]",
        "HTTP route cannot contain both route and redirect",
    );
    assert_error(
        vs_http("redirect: {uri: /new}\n  directResponse: {status: 503}\n"),
        "spec.http[0]",
        "HTTP route rule cannot contain both direct_response and redirect",
    );
    assert_error(
        vs_http("redirect: {uri: /new}\n  fault: {abort: {httpStatus: 500}}\n"),
        "spec.http[0]",
        "HTTP route cannot contain both fault and redirect",
    );
    assert_error(
        vs_http("redirect: {uri: /new}\n  rewrite: {uri: /x}\n"),
        "spec.http[0]",
        "HTTP route rule cannot contain both rewrite and redirect",
    );
    assert_error(
        vs_http("directResponse: {status: 503}\n  route: [{destination: {host: r}}]\n"),
        "spec.http[0]",
        "HTTP route cannot contain both route and direct_response",
    );
    assert_error(
        vs_http("directResponse: {status: 503}\n  rewrite: {uri: /x}\n"),
        "spec.http[0]",
        "HTTP route rule cannot contain both rewrite and direct_response",
    );
    assert_error(
        vs_http("name: empty\n  timeout: 1s\n"),
        "spec.http[0]",
        "HTTP route, redirect or direct_response is required",
    );
    assert_error(
        vs_http(
            "route: [{destination: {host: r}}]\n  mirror: {host: m}\n  mirrors: [{destination: {host: n}}]\n",
        ),
        "spec.http[0]",
        "HTTP route cannot contain both mirror and mirrors",
    );
    assert_valid(vs_http("redirect: {uri: /new, redirectCode: 302}\n"));
    assert_valid(vs_http(
        "directResponse: {status: 503, body: {string: busy}}\n",
    ));
}

#[test]
fn redirects() {
    assert_valid(vs_http(
        "redirect: {scheme: https, derivePort: FROM_REQUEST_PORT}\n",
    ));
    assert_valid(vs_http(
        "match: [{uri: {prefix: /a}}]\n  redirect: {prefixRewrite: /b, port: 8443}\n",
    ));
    for (redirect, message) in [
        (
            "{uri: /a, prefixRewrite: /b}",
            "redirect may only specify one of uri or prefix_rewrite",
        ),
        (
            "{redirectCode: 302}",
            "redirect must specify URI, authority, scheme, or port",
        ),
        (
            "{uri: /a, redirectCode: 200}",
            "200 is not a valid redirect code, must be 3xx",
        ),
        (
            "{scheme: ftp}",
            "invalid redirect scheme, must be \"http\" or \"https\"",
        ),
        (
            "{port: 70000}",
            "port number 70000 must be in the range 1..65535",
        ),
    ] {
        assert_error(
            vs_http(&format!("redirect: {redirect}\n")),
            "spec.http[0].redirect",
            message,
        );
    }
    assert_error(
        vs_http("match: [{uri: {exact: /a}}]\n  redirect: {prefixRewrite: /b}\n"),
        "spec.http[0].redirect",
        "redirect prefix_rewrite requires all URI matches to use prefix match type",
    );
}

#[test]
fn direct_responses() {
    assert_error(
        vs_http("directResponse: {status: 100}\n"),
        "spec.http[0].directResponse.status",
        "HTTP status 100 is not in range 200-599",
    );
    let big = "x".repeat(1024 * 1024 + 1);
    assert_error(
        vs_http(&format!(
            "directResponse: {{status: 200, body: {{string: {big}}}}}\n"
        )),
        "spec.http[0].directResponse.body",
        "must be less than 1MB",
    );
    let medium = "x".repeat(200 * 1024);
    assert_warning(
        vs_http(&format!(
            "directResponse: {{status: 200, body: {{string: {medium}}}}}\n"
        )),
        "spec.http[0].directResponse.body",
        "large direct_responses may impact control plane performance",
    );
}

#[test]
fn rewrites() {
    assert_valid(vs_http(&format!("rewrite: {{authority: x}}\n{ROUTE}")));
    assert_valid(vs_http(&format!(
        "rewrite: {{uriRegexRewrite: {{match: '^/a/(.*)', rewrite: '/\\1'}}}}\n{ROUTE}"
    )));
    assert_error(
        vs_http(&format!(
            "rewrite: {{uri: /a, uriRegexRewrite: {{match: a, rewrite: b}}}}\n{ROUTE}"
        )),
        "spec.http[0].rewrite",
        "rewrite may only contain one of URI or UriRegexRewrite",
    );
    assert_error(
        vs_http(&format!("rewrite: {{}}\n{ROUTE}")),
        "spec.http[0].rewrite",
        "rewrite must specify at least one of URI, UriRegexRewrite, or authority",
    );
    assert_error(
        vs_http(&format!(
            "rewrite: {{uriRegexRewrite: {{match: a}}}}\n{ROUTE}"
        )),
        "spec.http[0].rewrite",
        "UriRegexRewrite requires both Rewrite and Match fields to be specified",
    );
    assert_error(
        vs_http(&format!(
            "rewrite: {{uriRegexRewrite: {{match: '(?=a)', rewrite: b}}}}\n{ROUTE}"
        )),
        "spec.http[0].rewrite",
        "HTTPRewrite.UriRegexRewrite.Match",
    );
    assert_error(
        vs_http(&format!(
            "rewrite: {{authority: a}}\n  headers: {{request: {{set: {{host: b}}}}}}\n{ROUTE}"
        )),
        "spec.http[0].headers.request",
        "authority header cannot be set multiple times: have \"a\", attempting to set \"b\"",
    );
}

#[test]
fn header_operations() {
    assert_valid(vs_http(&format!(
        "headers:\n    request: {{set: {{':authority': a, x-b: '%DOWNSTREAM_REMOTE_ADDRESS%'}}, add: {{x-c: '100%%'}}, remove: [x-d]}}\n    response: {{set: {{x-e: '%START_TIME(%s)%'}}}}\n{ROUTE}"
    )));
    assert_error(
        vs_http(&format!(
            "headers: {{request: {{set: {{':path': /x}}}}}}\n{ROUTE}"
        )),
        "spec.http[0].headers.request.set[\":path\"]",
        "invalid header \":path\": header cannot have \":\" prefix",
    );
    assert_error(
        vs_http(&format!(
            "headers: {{request: {{remove: [Host]}}}}\n{ROUTE}"
        )),
        "spec.http[0].headers.request.remove[0]",
        "invalid header \"Host\": cannot set Host header",
    );
    assert_error(
        vs_http(&format!(
            "headers: {{response: {{add: {{host: x}}}}}}\n{ROUTE}"
        )),
        "spec.http[0].headers.response.add.host",
        "cannot set Host header",
    );
    assert_error(
        vs_http(&format!(
            "headers: {{request: {{add: {{x-a: '50%'}}}}}}\n{ROUTE}"
        )),
        "spec.http[0].headers.request.add.x-a",
        "Un-escaped %",
    );
    assert_error(
        vs_http(&format!(
            "headers: {{request: {{add: {{x-a: '%VAR'}}}}}}\n{ROUTE}"
        )),
        "spec.http[0].headers.request.add.x-a",
        "Un-terminated variable expression",
    );
    assert_error(
        vs_http(&format!(
            "headers: {{request: {{add: {{x-a: \"a\\nb\"}}}}}}\n{ROUTE}"
        )),
        "spec.http[0].headers.request.add.x-a",
        "is invalid",
    );
    // Per-destination headers too.
    assert_error(
        vs_http("route: [{destination: {host: r}, headers: {request: {set: {':method': GET}}}}]\n"),
        "spec.http[0].route[0].headers.request.set[\":method\"]",
        "header cannot have \":\" prefix",
    );
}

// ------------------------------------------------------------------------------------------------
// Timeouts, retries, faults, mirrors, CORS
// ------------------------------------------------------------------------------------------------

#[test]
fn durations_are_at_least_a_millisecond() {
    assert_valid(vs_http(&format!("timeout: 1ms\n{ROUTE}")));
    assert_valid(vs_http(&format!("timeout: 1m\n{ROUTE}")));
    assert_error(
        vs_http(&format!("timeout: 0s\n{ROUTE}")),
        "spec.http[0].timeout",
        "duration must be greater than 1ms",
    );
    assert_error(
        vs_http(&format!("timeout: 500us\n{ROUTE}")),
        "spec.http[0].timeout",
        "duration must be greater than 1ms",
    );
    assert_error(
        vs_http(&format!("timeout: 1.0005s\n{ROUTE}")),
        "spec.http[0].timeout",
        "only durations to ms precision are supported",
    );
    assert_error(
        vs_http(&format!("timeout: -1s\n{ROUTE}")),
        "spec.http[0].timeout",
        "duration must be greater than 1ms",
    );
}

#[test]
fn retries() {
    assert_valid(vs_http(&format!(
        "retries: {{attempts: 3, perTryTimeout: 2s, retryOn: 'gateway-error,connect-failure,refused-stream,503,unavailable', backoff: 25ms}}\n{ROUTE}"
    )));
    assert_valid(vs_http(&format!("retries: {{attempts: 0}}\n{ROUTE}")));
    assert_error(
        vs_http(&format!("retries: {{attempts: -1}}\n{ROUTE}")),
        "spec.http[0].retries.attempts",
        "attempts cannot be negative",
    );
    assert_error(
        vs_http(&format!("retries: {{retryOn: 5xx}}\n{ROUTE}")),
        "spec.http[0].retries",
        "http retry policy configured when attempts are set to 0 (disabled)",
    );
    assert_error(
        vs_http(&format!(
            "retries: {{attempts: 2, retryOn: '5xx,teapot'}}\n{ROUTE}"
        )),
        "spec.http[0].retries.retryOn",
        "\"teapot\" is not a valid retryOn policy",
    );
    assert_error(
        vs_http(&format!(
            "retries: {{attempts: 2, retryOn: '5xx, reset'}}\n{ROUTE}"
        )),
        "spec.http[0].retries.retryOn",
        "\" reset\" is not a valid retryOn policy",
    );
    assert_error(
        vs_http(&format!(
            "retries: {{attempts: 2, retryOn: '599'}}\n{ROUTE}"
        )),
        "spec.http[0].retries.retryOn",
        "\"599\" is not a valid retryOn policy",
    );
    assert_error(
        vs_http(&format!(
            "retries: {{attempts: 2, perTryTimeout: 0s}}\n{ROUTE}"
        )),
        "spec.http[0].retries.perTryTimeout",
        "duration must be greater than 1ms",
    );
}

#[test]
fn faults() {
    assert_valid(vs_http(&format!(
        "fault: {{delay: {{fixedDelay: 5s, percentage: {{value: 0.1}}}}, abort: {{httpStatus: 503, percentage: {{value: 100}}}}}}\n{ROUTE}"
    )));
    assert_error(
        vs_http(&format!("fault: {{}}\n{ROUTE}")),
        "spec.http[0].fault",
        "HTTP fault injection must have an abort and/or a delay",
    );
    assert_error(
        vs_http(&format!(
            "fault: {{abort: {{httpStatus: 503, percentage: {{value: 101}}}}}}\n{ROUTE}"
        )),
        "spec.http[0].fault.abort.percentage.value",
        "percentage 101 is neither 0.0, nor in range [0.0001, 100.0]",
    );
    assert_error(
        vs_http(&format!(
            "fault: {{delay: {{fixedDelay: 1s, percentage: {{value: -1}}}}}}\n{ROUTE}"
        )),
        "spec.http[0].fault.delay.percentage.value",
        "is neither 0.0",
    );
    assert_error(
        vs_http(&format!(
            "fault: {{delay: {{fixedDelay: 1s, percentage: {{value: 0.00001}}}}}}\n{ROUTE}"
        )),
        "spec.http[0].fault.delay.percentage.value",
        "is neither 0.0",
    );
    assert_error(
        vs_http(&format!("fault: {{abort: {{httpStatus: 99}}}}\n{ROUTE}")),
        "spec.http[0].fault.abort.httpStatus",
        "HTTP status 99 is not in range 200-599",
    );
    assert_error(
        vs_http(&format!(
            "fault: {{abort: {{grpcStatus: BROKEN}}}}\n{ROUTE}"
        )),
        "spec.http[0].fault.abort.grpcStatus",
        "gRPC status \"BROKEN\" is not supported",
    );
    assert_valid(vs_http(&format!(
        "fault: {{abort: {{grpcStatus: UNAVAILABLE}}}}\n{ROUTE}"
    )));
    assert_error(
        vs_http(&format!(
            "fault: {{abort: {{http2Error: REFUSED_STREAM}}}}\n{ROUTE}"
        )),
        "spec.http[0].fault.abort.http2Error",
        "HTTP/2 abort fault injection not supported yet",
    );
    assert_warning(
        vs_http(&format!(
            "fault: {{abort: {{percentage: {{value: 5}}}}}}\n{ROUTE}"
        )),
        "spec.http[0].fault.abort",
        "abort configured, but error type not set",
    );
    assert_error(
        vs_http(&format!(
            "fault: {{delay: {{exponentialDelay: 1s}}}}\n{ROUTE}"
        )),
        "spec.http[0].fault.delay.exponentialDelay",
        "exponentialDelay not supported yet",
    );
    assert_error(
        vs_http(&format!("fault: {{delay: {{fixedDelay: 0.5ms}}}}\n{ROUTE}")),
        "spec.http[0].fault.delay.fixedDelay",
        "duration must be greater than 1ms",
    );
    assert_warning(
        vs_http(&format!(
            "fault: {{delay: {{fixedDelay: 1s, percent: 150}}}}\n{ROUTE}"
        )),
        "spec.http[0].fault.delay.percent",
        "percentage 150 is not in range 0..100",
    );
}

#[test]
fn mirrors() {
    assert_valid(vs_http(&format!(
        "mirror: {{host: shadow}}\n  mirrorPercentage: {{value: 50}}\n{ROUTE}"
    )));
    assert_error(
        vs_http(&format!(
            "mirror: {{host: shadow}}\n  mirrorPercentage: {{value: 150}}\n{ROUTE}"
        )),
        "spec.http[0].mirrorPercentage.value",
        "mirror_percentage must have a max value of 100 (it has 150.000000)",
    );
    assert_error(
        vs_http(&format!(
            "mirror: {{host: shadow}}\n  mirrorPercentage: {{value: -1}}\n{ROUTE}"
        )),
        "spec.http[0].mirrorPercentage.value",
        "mirror_percentage must have a min value of 0",
    );
    let diags = vs_http(&format!(
        "mirror: {{host: shadow}}\n  mirrorPercent: 101\n{ROUTE}"
    ));
    assert_warning(
        diags.clone(),
        "spec.http[0].mirrorPercent",
        "using deprecated setting \"mirrorPercent\"",
    );
    assert_error(
        diags,
        "spec.http[0].mirrorPercent",
        "mirror_percent must have a max value of 100 (it has 101)",
    );
    assert_error(
        vs_http(&format!(
            "mirrors: [{{destination: {{host: s}}, percentage: {{value: 120}}}}]\n{ROUTE}"
        )),
        "spec.http[0].mirrors[0].percentage.value",
        "mirror percentage must have a max value of 100",
    );
    assert_error(
        vs_http(&format!("mirror: {{host: '*'}}\n{ROUTE}")),
        "spec.http[0].mirror.host",
        "invalid destination host *",
    );
}

#[test]
fn cors() {
    assert_valid(vs_http(&format!(
        "corsPolicy: {{allowOrigins: [{{exact: 'https://a.com'}}, {{regex: '.*'}}], allowMethods: [GET, '*'], allowHeaders: ['*', x-a], maxAge: 1h}}\n{ROUTE}"
    )));
    assert_error(
        vs_http(&format!(
            "corsPolicy: {{allowOrigins: [{{prefix: ''}}]}}\n{ROUTE}"
        )),
        "spec.http[0].corsPolicy.allowOrigins[0]",
        "'' is not a valid match type for CORS allow origins",
    );
    assert_error(
        vs_http(&format!(
            "corsPolicy: {{allowOrigins: [{{regex: '[a'}}]}}\n{ROUTE}"
        )),
        "spec.http[0].corsPolicy.allowOrigins[0]",
        "\"corsPolicy.allowOrigins\"",
    );
    assert_error(
        vs_http(&format!("corsPolicy: {{allowMethods: [get]}}\n{ROUTE}")),
        "spec.http[0].corsPolicy.allowMethods[0]",
        "\"get\" is not a supported HTTP method",
    );
    assert_error(
        vs_http(&format!("corsPolicy: {{exposeHeaders: ['a b']}}\n{ROUTE}")),
        "spec.http[0].corsPolicy.exposeHeaders[0]",
        "header name a b is not a valid header name",
    );
    assert_error(
        vs_http(&format!("corsPolicy: {{maxAge: 1500ms}}\n{ROUTE}")),
        "spec.http[0].corsPolicy.maxAge",
        "max_age duration is accurate only to seconds precision",
    );
}

// ------------------------------------------------------------------------------------------------
// TLS and TCP routes
// ------------------------------------------------------------------------------------------------

#[test]
fn tls_routes() {
    assert_valid(check(
        "VirtualService",
        "hosts: ['*.example.com']\ngateways: [mesh]\ntls:\n- match: [{sniHosts: [a.example.com], port: 443, destinationSubnets: [10.0.0.0/8]}]\n  route: [{destination: {host: a.example.com}}]\n",
    ));
    assert_error(
        check(
            "VirtualService",
            "hosts: [a.example.com]\ntls:\n- match: [{sniHosts: [b.example.com]}]\n  route: [{destination: {host: r}}]\n",
        ),
        "spec.tls[0].match[0].sniHosts[0]",
        "SNI host \"b.example.com\" is not a compatible subset of any of the virtual service hosts: [a.example.com]",
    );
    assert_error(
        check(
            "VirtualService",
            "hosts: [a.example.com]\ntls:\n- match: [{sniHosts: []}]\n  route: [{destination: {host: r}}]\n",
        ),
        "spec.tls[0].match[0].sniHosts",
        "TLS match must have at least one SNI host",
    );
    assert_error(
        check(
            "VirtualService",
            "hosts: [a.example.com]\ntls:\n- match: []\n  route: [{destination: {host: r}}]\n",
        ),
        "spec.tls[0].match",
        "TLS route must have at least one match condition",
    );
    assert_error(
        check(
            "VirtualService",
            "hosts: [a.example.com]\ntls:\n- match: [{sniHosts: [a.example.com]}]\n",
        ),
        "spec.tls[0].route",
        "TLS route is required",
    );
    assert_warning(
        check(
            "VirtualService",
            "hosts: [a.example.com]\ntls:\n- match: [{sniHosts: [10.0.0.1]}]\n  route: [{destination: {host: r}}]\n",
        ),
        "spec.tls[0].match[0].sniHosts[0]",
        "goes against SNI spec",
    );
    assert_error(
        check(
            "VirtualService",
            "hosts: [a.example.com]\ntls:\n- match: [{sniHosts: [a.example.com], destinationSubnets: [10.0.0.0/33]}]\n  route: [{destination: {host: r}}]\n",
        ),
        "spec.tls[0].match[0].destinationSubnets[0]",
        "10.0.0.0/33 is not a valid CIDR block",
    );
}

#[test]
fn tcp_route_matches() {
    assert_valid(check(
        "VirtualService",
        "hosts: [r]\ntcp:\n- match: [{port: 27017, destinationSubnets: ['10.1.0.0/16', 'fd00::1']}]\n  route: [{destination: {host: r}}]\n",
    ));
    assert_error(
        check(
            "VirtualService",
            "hosts: [r]\ntcp:\n- match: [{destinationSubnets: [not-an-ip]}]\n  route: [{destination: {host: r}}]\n",
        ),
        "spec.tcp[0].match[0].destinationSubnets[0]",
        "not-an-ip is not a valid IP",
    );
}

#[test]
fn export_to() {
    assert_valid(check(
        "VirtualService",
        "hosts: [r]\nexportTo: ['.', other]\nhttp:\n- route: [{destination: {host: r}}]\n",
    ));
    for (export, field, message) in [
        (
            "[ns, '.']",
            "spec.exportTo[1]",
            "duplicate entries in exportTo: . and current namespace ns",
        ),
        (
            "[a, a]",
            "spec.exportTo[1]",
            "duplicate entries in exportTo for entry a",
        ),
        (
            "['*', a]",
            "spec.exportTo",
            "cannot have both public (*) and non-public exportTo values",
        ),
        (
            "['~']",
            "spec.exportTo[0]",
            "exportTo ~ (none) is not allowed",
        ),
        (
            "[a.b]",
            "spec.exportTo[0]",
            "only .,*, or a valid DNS 1123 label is allowed",
        ),
    ] {
        assert_error(
            check(
                "VirtualService",
                &format!(
                    "hosts: [r]\nexportTo: {export}\nhttp:\n- route: [{{destination: {{host: r}}}}]\n"
                ),
            ),
            field,
            message,
        );
    }
}

// ------------------------------------------------------------------------------------------------
// DestinationRule
// ------------------------------------------------------------------------------------------------

#[test]
fn destination_rule_host_and_subsets() {
    assert_valid(check(
        "DestinationRule",
        "host: reviews\nsubsets:\n- {name: v1, labels: {version: v1}}\n- {name: V2, labels: {version: v2}}\n",
    ));
    assert_error(
        check("DestinationRule", "host: 'a.*.com'\n"),
        "spec.host",
        "invalid",
    );
    let diags = check(
        "DestinationRule",
        "host: r\nsubsets:\n- {name: v1}\n- {name: v1}\n- {name: v1.2}\n- {name: ''}\n",
    );
    assert_error(
        diags.clone(),
        "spec.subsets[1].name",
        "duplicate subset names: v1",
    );
    assert_error(
        diags.clone(),
        "spec.subsets[2].name",
        "subset name is invalid: v1.2",
    );
    assert_error(diags, "spec.subsets[3].name", "subset name cannot be empty");
    assert_error(
        check(
            "DestinationRule",
            "host: r\nsubsets:\n- {name: v1, labels: {'a/b/c': x}}\n",
        ),
        "spec.subsets[0].labels[\"a/b/c\"]",
        "invalid tag key",
    );
}

#[test]
fn destination_rule_workload_selector_and_export_to() {
    assert_valid(check(
        "DestinationRule",
        "host: r\nworkloadSelector: {matchLabels: {app: web}}\nexportTo: ['.']\n",
    ));
    assert_error(
        check(
            "DestinationRule",
            "host: r\nworkloadSelector: {matchLabels: {app: web}}\nexportTo: [other]\n",
        ),
        "spec.exportTo",
        "destination rule with workload selector cannot have exportTo beyond current namespace",
    );
    assert_error(
        check(
            "DestinationRule",
            "host: r\nworkloadSelector: {matchLabels: {app: 'web*'}}\n",
        ),
        "spec.workloadSelector.matchLabels.app",
        "wildcard is not supported in selector: \"app=web*\"",
    );
    assert_warning(
        check("DestinationRule", "host: r\nworkloadSelector: {}\n"),
        "spec.workloadSelector.matchLabels",
        "workload selector specified without labels",
    );
}

#[test]
fn traffic_policy_shape() {
    assert_error(
        check("DestinationRule", "host: r\ntrafficPolicy: {}\n"),
        "spec.trafficPolicy",
        "traffic policy must have at least one field",
    );
    assert_error(
        check(
            "DestinationRule",
            "host: r\nsubsets:\n- name: v1\n  trafficPolicy: {}\n",
        ),
        "spec.subsets[0].trafficPolicy",
        "traffic policy must have at least one field",
    );
    assert_error(
        check(
            "DestinationRule",
            "host: r\ntrafficPolicy:\n  tunnel: {targetHost: a.example.com, targetPort: 443}\n  proxyProtocol: {version: V1}\n",
        ),
        "spec.trafficPolicy",
        "tunnel and proxyProtocol must not be set together",
    );
    assert_error(
        check(
            "DestinationRule",
            "host: r\ntrafficPolicy:\n  portLevelSettings:\n  - loadBalancer: {simple: RANDOM}\n  - port: {number: 80}\n",
        ),
        "spec.trafficPolicy.portLevelSettings[0].port",
        "portTrafficPolicy must have valid port",
    );
    assert_error(
        check(
            "DestinationRule",
            "host: r\ntrafficPolicy:\n  portLevelSettings:\n  - port: {number: 80}\n",
        ),
        "spec.trafficPolicy.portLevelSettings[0]",
        "port traffic policy must have at least one field",
    );
}

#[test]
fn load_balancers() {
    assert_valid(check(
        "DestinationRule",
        "host: r\ntrafficPolicy:\n  loadBalancer:\n    consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 65537}}\n",
    ));
    let lb = |lb: &str| {
        check(
            "DestinationRule",
            &format!("host: r\ntrafficPolicy:\n  loadBalancer: {lb}\n"),
        )
    };
    assert_error(
        lb("{consistentHash: {useSourceIp: true, maglev: {tableSize: 65536}}}"),
        "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
        "tableSize must be a prime number for maglev",
    );
    assert_error(
        lb("{consistentHash: {useSourceIp: true, maglev: {}}}"),
        "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
        "tableSize must be set for maglev",
    );
    assert_error(
        lb("{consistentHash: {useSourceIp: true, maglev: {tableSize: 5000011}}}"),
        "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
        "tableSize must be less than 5000011 for maglev",
    );
    let diags = lb(
        "{consistentHash: {useSourceIp: true, minimumRingSize: 1024, ringHash: {minimumRingSize: 10}}}",
    );
    assert_warning(
        diags.clone(),
        "spec.trafficPolicy.loadBalancer.consistentHash.minimumRingSize",
        "consistent hash MinimumRingSize is deprecated",
    );
    assert_error(
        diags,
        "spec.trafficPolicy.loadBalancer.consistentHash",
        "only one of MinimumRingSize or Maglev/Ringhash can be specified",
    );
    assert_error(
        lb(
            "{consistentHash: {httpCookie: {name: '', attributes: [{name: a}, {name: a}, {name: ''}]}}}",
        ),
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name",
        "name required for HttpCookie",
    );
    let diags = lb(
        "{consistentHash: {httpCookie: {name: c, attributes: [{name: a}, {name: a}, {name: ''}]}}}",
    );
    assert_error(
        diags.clone(),
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.attributes[1]",
        "duplicate cookie attribute name: a",
    );
    assert_error(
        diags,
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.attributes[2]",
        "cookie attribute name cannot be empty",
    );
    assert_warning(
        lb("{consistentHash: {ringHash: {minimumRingSize: 64}}}"),
        "spec.trafficPolicy.loadBalancer.consistentHash",
        "has no hash key",
    );
    assert_error(
        lb(
            "{simple: ROUND_ROBIN, localityLbSetting: {enabled: true}, zoneAwareLbSetting: {enabled: true}}",
        ),
        "spec.trafficPolicy.loadBalancer",
        "only one of localityLbSetting and zoneAwareLbSetting can be set",
    );
    assert_error(
        lb("{simple: ROUND_ROBIN, warmup: {duration: 0s}}"),
        "spec.trafficPolicy.loadBalancer.warmup.duration",
        "duration must be greater than 1ms",
    );
    assert_error(
        lb("{simple: ROUND_ROBIN, warmup: {duration: 10s, minimumPercent: 101, aggression: 0}}"),
        "spec.trafficPolicy.loadBalancer.warmup.minimumPercent",
        "minimumPercent value should be less than or equal to 100",
    );
    assert_error(
        lb("{simple: ROUND_ROBIN, warmup: {duration: 10s, aggression: 0}}"),
        "spec.trafficPolicy.loadBalancer.warmup.aggression",
        "aggression should be greater than 0",
    );
    assert_error(
        lb("{simple: ROUND_ROBIN, warmupDurationSecs: 0s}"),
        "spec.trafficPolicy.loadBalancer.warmupDurationSecs",
        "must be a valid duration greater than 1ms",
    );
}

#[test]
fn locality_load_balancing() {
    let lb = |settings: &str, outlier: bool| {
        let od = if outlier {
            "\n  outlierDetection: {consecutive5xxErrors: 5}"
        } else {
            ""
        };
        check(
            "DestinationRule",
            &format!(
                "host: r\ntrafficPolicy:\n  loadBalancer: {{localityLbSetting: {settings}}}{od}\n"
            ),
        )
    };
    let path = "spec.trafficPolicy.loadBalancer.localityLbSetting";
    assert_valid(lb(
        "{distribute: [{from: 'us-west/zone1/*', to: {'us-west/zone1/*': 80, 'us-west/zone2/*': 20}}]}",
        false,
    ));
    assert_valid(lb(
        "{failover: [{from: us-east, to: eu-west}], failoverPriority: [topology.istio.io/network]}",
        true,
    ));
    assert_error(
        lb(
            "{distribute: [{from: a, to: {b: 100}}], failover: [{from: a, to: b}]}",
            true,
        ),
        path,
        "can not simultaneously specify 'distribute' and 'failover'",
    );
    assert_error(
        lb("{distribute: [{from: a, to: {b: 60, c: 30}}]}", false),
        &format!("{path}.distribute[0].to"),
        "total locality weight 90 != 100",
    );
    assert_error(
        lb("{distribute: [{from: a, to: {b: 0, c: 100}}]}", false),
        &format!("{path}.distribute[0].to"),
        "locality weight must be in range [1, 100]",
    );
    assert_error(
        lb("{distribute: [{from: 'a/*/c', to: {b: 100}}]}", false),
        &format!("{path}.distribute"),
        "wildcard '*' number can not exceed 1 and must be in the end",
    );
    assert_error(
        lb(
            "{distribute: [{from: a, to: {b: 100}}, {from: a/z, to: {b: 100}}]}",
            false,
        ),
        &format!("{path}.distribute"),
        "locality a/z overlap with previous specified ones",
    );
    assert_error(
        lb("{failover: [{from: a, to: a}]}", true),
        &format!("{path}.failover[0]"),
        "locality lb failover settings must specify different regions",
    );
    assert_error(
        lb("{failover: [{from: a/z, to: b}]}", true),
        &format!("{path}.failover[0]"),
        "locality lb failover only specify region",
    );
    assert_error(
        lb(
            "{failover: [{from: a, to: b}], failoverPriority: [topology.kubernetes.io/zone]}",
            true,
        ),
        &format!("{path}.failoverPriority"),
        "can not simultaneously set 'failover' and topology label 'topology.kubernetes.io/zone'",
    );
    assert_warning(
        lb("{failover: [{from: a, to: b}]}", false),
        path,
        "outlier detection policy must be provided for failover",
    );
    let zone = check(
        "DestinationRule",
        "host: r\ntrafficPolicy:\n  loadBalancer: {zoneAwareLbSetting: {failoverPriority: [topology.kubernetes.io/region], minClusterSize: 0}}\n",
    );
    assert_error(
        zone.clone(),
        "spec.trafficPolicy.loadBalancer.zoneAwareLbSetting.failoverPriority[0]",
        "must not use topology label 'topology.kubernetes.io/region'",
    );
    assert_error(
        zone,
        "spec.trafficPolicy.loadBalancer.zoneAwareLbSetting.minClusterSize",
        "greater than or equal to 1",
    );
}

#[test]
fn connection_pools() {
    let cp = |settings: &str| {
        check(
            "DestinationRule",
            &format!("host: r\ntrafficPolicy:\n  connectionPool: {settings}\n"),
        )
    };
    let path = "spec.trafficPolicy.connectionPool";
    assert_valid(cp(
        "{tcp: {maxConnections: 10, connectTimeout: 10ms, idleTimeout: 0s, tcpKeepalive: {time: 1s, interval: 1s}}, http: {http1MaxPendingRequests: 0, maxRetries: 3, idleTimeout: 5m, http2KeepAlive: {interval: 30s, timeout: 5s}}}",
    ));
    assert_error(
        cp("{}"),
        path,
        "connection pool must have at least one field",
    );
    assert_error(
        cp("{tcp: {maxConnections: -1}}"),
        &format!("{path}.tcp.maxConnections"),
        "max connections must be non-negative",
    );
    assert_error(
        cp("{http: {http2MaxRequests: -1}}"),
        &format!("{path}.http.http2MaxRequests"),
        "http2 max requests must be non-negative",
    );
    assert_error(
        cp("{http: {maxRequestsPerConnection: -1}}"),
        &format!("{path}.http.maxRequestsPerConnection"),
        "max requests per connection must be non-negative",
    );
    assert_error(
        cp("{http: {h2UpgradePolicy: UPGRADE, useClientProtocol: true}}"),
        &format!("{path}.http"),
        "use client protocol must not be true when H2UpgradePolicy is UPGRADE",
    );
    assert_error(
        cp("{http: {http2KeepAlive: {interval: 1s}}}"),
        &format!("{path}.http.http2KeepAlive"),
        "http2 keepalive timeout is required",
    );
    assert_error(
        cp("{tcp: {connectTimeout: 0s}}"),
        &format!("{path}.tcp.connectTimeout"),
        "duration must be greater than 1ms",
    );
    assert_error(
        cp("{tcp: {idleTimeout: 1.5ms}}"),
        &format!("{path}.tcp.idleTimeout"),
        "only durations to ms precision are supported",
    );
}

#[test]
fn outlier_detection() {
    let od = |settings: &str| {
        check(
            "DestinationRule",
            &format!("host: r\ntrafficPolicy:\n  outlierDetection: {settings}\n"),
        )
    };
    let path = "spec.trafficPolicy.outlierDetection";
    assert_valid(od(
        "{consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 100, minHealthPercent: 0}",
    ));
    assert_error(
        od("{maxEjectionPercent: 101}"),
        &format!("{path}.maxEjectionPercent"),
        "percentage 101 is not in range 0..100",
    );
    assert_error(
        od("{minHealthPercent: -1}"),
        &format!("{path}.minHealthPercent"),
        "percentage -1 is not in range 0..100",
    );
    assert_error(
        od("{interval: 0s}"),
        &format!("{path}.interval"),
        "duration must be greater than 1ms",
    );
    assert_error(
        od("{consecutiveLocalOriginFailures: 3}"),
        &format!("{path}.consecutiveLocalOriginFailures"),
        "split external local origin errors is set to false",
    );
    assert_valid(od(
        "{consecutiveLocalOriginFailures: 3, splitExternalLocalOriginErrors: true}",
    ));
    assert_warning(
        od("{consecutiveErrors: 3}"),
        &format!("{path}.consecutiveErrors"),
        "outlier detection consecutive errors is deprecated",
    );
    assert_error(
        od("{outlierDetectionHttpErrorCodes: [503, 99]}"),
        &format!("{path}.outlierDetectionHttpErrorCodes[1]"),
        "must be in the range 100..599",
    );
}

#[test]
fn client_tls() {
    let tls = |settings: &str| {
        check_in(
            "DestinationRule",
            "x",
            "shop",
            &format!("host: r\ntrafficPolicy:\n  tls: {settings}\n"),
        )
    };
    let path = "spec.trafficPolicy.tls";
    assert_valid(tls("{mode: ISTIO_MUTUAL}"));
    assert_valid(tls(
        "{mode: MUTUAL, clientCertificate: /c, privateKey: /k, caCertificates: /ca}",
    ));
    assert_valid(tls("{mode: SIMPLE, credentialName: configmap://shop/ca}"));
    assert_error(
        tls("{mode: MUTUAL}"),
        &format!("{path}.clientCertificate"),
        "client certificate required for mutual tls",
    );
    assert_error(
        tls("{mode: MUTUAL, clientCertificate: /c}"),
        &format!("{path}.privateKey"),
        "private key required for mutual tls",
    );
    assert_error(
        tls("{mode: SIMPLE, credentialName: cert, caCertificates: /ca}"),
        path,
        "cannot specify client certificates or CA certificate or CA CRL If credentialName is set",
    );
    assert_error(
        tls("{mode: SIMPLE, insecureSkipVerify: true, subjectAltNames: []}"),
        path,
        "cannot specify CaCertificates or CredentialName or SubjectAltNames when InsecureSkipVerify is set true",
    );
    assert_error(
        tls("{mode: SIMPLE, credentialName: configmap://other/ca}"),
        &format!("{path}.credentialName"),
        "namespace must match the configuration namespace \"shop\"",
    );
    assert_error(
        tls("{mode: SIMPLE, credentialName: configmap://ca}"),
        &format!("{path}.credentialName"),
        "Expected namespace and name",
    );
}

#[test]
fn tunnels_and_retry_budgets() {
    let tp = |settings: &str| {
        check(
            "DestinationRule",
            &format!("host: r\ntrafficPolicy:\n  {settings}\n"),
        )
    };
    assert_valid(tp(
        "tunnel: {protocol: POST, targetHost: 10.0.0.1, targetPort: 8080}",
    ));
    assert_error(
        tp("tunnel: {protocol: GET, targetHost: a.example.com, targetPort: 80}"),
        "spec.trafficPolicy.tunnel.protocol",
        "tunnel protocol must be \"CONNECT\" or \"POST\"",
    );
    assert_error(
        tp("tunnel: {targetHost: 'bad host', targetPort: 80}"),
        "spec.trafficPolicy.tunnel.targetHost",
        "tunnel target host must be valid FQDN or IP address",
    );
    assert_error(
        tp("tunnel: {targetHost: a.example.com, targetPort: 0}"),
        "spec.trafficPolicy.tunnel.targetPort",
        "tunnel target port is invalid: port number 0 must be in the range 1..65535",
    );
    assert_error(
        tp("retryBudget: {percent: 120}"),
        "spec.trafficPolicy.retryBudget.percent",
        "must be in the range 0..100",
    );
}

// ------------------------------------------------------------------------------------------------
// ServiceEntry and WorkloadEntry
// ------------------------------------------------------------------------------------------------

const SE_PORTS: &str = "ports: [{number: 80, name: http, protocol: HTTP}]\n";

#[test]
fn service_entry_hosts() {
    assert_valid(check(
        "ServiceEntry",
        &format!("hosts: [api.example.com, '*.example.org']\n{SE_PORTS}"),
    ));
    assert_error(
        check("ServiceEntry", &format!("hosts: []\n{SE_PORTS}")),
        "spec.hosts",
        "service entry must have at least one host",
    );
    assert_error(
        check("ServiceEntry", &format!("hosts: ['*']\n{SE_PORTS}")),
        "spec.hosts[0]",
        "invalid host *",
    );
    assert_warning(
        check(
            "ServiceEntry",
            &format!("hosts: ['*foo.example.com']\n{SE_PORTS}"),
        ),
        "spec.hosts[0]",
        "partial wildcard \"*foo.example.com\" not allowed",
    );
}

#[test]
fn service_entry_addresses_and_ports() {
    assert_valid(check(
        "ServiceEntry",
        "hosts: [db.example.com]\naddresses: [10.0.0.1, 192.168.0.0/16, 'fd00::/64']\nports: [{number: 5432, name: pg, protocol: TCP, targetPort: 15432}]\n",
    ));
    assert_error(
        check(
            "ServiceEntry",
            &format!(
                "hosts: [a.example.com]\naddresses: [10.0.0.0/8]\nresolution: DNS\n{SE_PORTS}"
            ),
        ),
        "spec.addresses",
        "CIDR addresses are allowed only for NONE/STATIC resolution types",
    );
    assert_error(
        check(
            "ServiceEntry",
            &format!("hosts: [a.example.com]\naddresses: [10.0.0.256]\n{SE_PORTS}"),
        ),
        "spec.addresses[0]",
        "10.0.0.256 is not a valid IP",
    );
    let diags = check(
        "ServiceEntry",
        "hosts: [a.example.com]\nports:\n- {number: 80, name: http}\n- {number: 80, name: http}\n- {number: 0, name: Bad_Name, protocol: SPDY, targetPort: 70000}\n",
    );
    assert_error(
        diags.clone(),
        "spec.ports[1].name",
        "service entry port name \"http\" already defined",
    );
    assert_error(
        diags.clone(),
        "spec.ports[1].number",
        "service entry port 80 already defined",
    );
    assert_error(
        diags.clone(),
        "spec.ports[2].name",
        "invalid port name: Bad_Name",
    );
    assert_error(
        diags.clone(),
        "spec.ports[2].protocol",
        "unsupported protocol: SPDY",
    );
    assert_error(
        diags.clone(),
        "spec.ports[2].number",
        "port number 0 must be in the range 1..65535",
    );
    assert_error(diags, "spec.ports[2].targetPort", "port number 70000");
}

#[test]
fn service_entry_resolutions() {
    // NONE: no endpoints.
    assert_error(
        check(
            "ServiceEntry",
            &format!("hosts: [a.example.com]\n{SE_PORTS}endpoints: [{{address: 10.0.0.1}}]\n"),
        ),
        "spec.endpoints",
        "no endpoints should be provided for resolution type none",
    );
    assert_error(
        check(
            "ServiceEntry",
            &format!("hosts: [a.example.com]\n{SE_PORTS}endpoints: []\n"),
        ),
        "spec.endpoints",
        "NONE mode cannot set endpoints",
    );
    // STATIC: IP (or unix) endpoints on declared ports.
    assert_valid(check(
        "ServiceEntry",
        &format!(
            "hosts: [a.example.com]\n{SE_PORTS}resolution: STATIC\nendpoints: [{{address: 10.0.0.1, ports: {{http: 8080}}}}, {{address: 'fd00::1'}}]\n"
        ),
    ));
    assert_valid(check(
        "ServiceEntry",
        &format!(
            "hosts: [a.example.com]\n{SE_PORTS}resolution: STATIC\nworkloadSelector: {{labels: {{app: vm}}}}\n"
        ),
    ));
    assert_valid(check(
        "ServiceEntry",
        &format!(
            "hosts: [a.example.com]\n{SE_PORTS}resolution: STATIC\nendpoints: [{{address: 'unix:///var/run/a.sock'}}]\n"
        ),
    ));
    assert_error(
        check(
            "ServiceEntry",
            &format!(
                "hosts: [a.example.com]\n{SE_PORTS}resolution: STATIC\nendpoints: [{{address: backend.example.com}}]\n"
            ),
        ),
        "spec.endpoints[0].address",
        "endpoint address \"backend.example.com\" is not a valid IP address",
    );
    assert_error(
        check(
            "ServiceEntry",
            &format!(
                "hosts: [a.example.com]\n{SE_PORTS}resolution: STATIC\nendpoints: [{{address: 10.0.0.1, ports: {{grpc: 9090}}}}]\n"
            ),
        ),
        "spec.endpoints[0].ports.grpc",
        "endpoint port 9090 is not defined by the service entry",
    );
    assert_error(
        check(
            "ServiceEntry",
            &format!(
                "hosts: [a.example.com]\n{SE_PORTS}resolution: STATIC\nendpoints: [{{address: 'unix:///a.sock', ports: {{http: 1}}}}]\n"
            ),
        ),
        "spec.endpoints[0].ports",
        "unix endpoint unix:///a.sock must not include ports",
    );
    assert_error(
        check(
            "ServiceEntry",
            &format!(
                "hosts: [a.example.com]\n{SE_PORTS}resolution: STATIC\nendpoints: [{{address: ''}}]\n"
            ),
        ),
        "spec.endpoints[0].address",
        "address is required",
    );
    assert_error(
        check(
            "ServiceEntry",
            &format!(
                "hosts: [a.example.com]\n{SE_PORTS}resolution: STATIC\nendpoints: [{{address: 10.0.0.1}}]\nworkloadSelector: {{labels: {{app: a}}}}\n"
            ),
        ),
        "spec",
        "only one of WorkloadSelector or Endpoints is allowed in Service Entry",
    );
    // DNS: hostnames or IPs; wildcard hosts need endpoints.
    assert_valid(check(
        "ServiceEntry",
        &format!(
            "hosts: [a.example.com]\n{SE_PORTS}resolution: DNS\nendpoints: [{{address: backend.example.com}}, {{address: 10.0.0.2}}]\n"
        ),
    ));
    assert_valid(check(
        "ServiceEntry",
        &format!(
            "hosts: ['*.example.com']\n{SE_PORTS}resolution: DNS\nendpoints: [{{address: backend.example.com}}]\n"
        ),
    ));
    assert_error(
        check(
            "ServiceEntry",
            &format!("hosts: ['*.example.com']\n{SE_PORTS}resolution: DNS\n"),
        ),
        "spec.hosts[0]",
        "hosts must be FQDN or contain only prefix wildcards if no endpoints are provided for resolution mode DNS",
    );
    assert_error(
        check(
            "ServiceEntry",
            &format!(
                "hosts: [a.example.com]\n{SE_PORTS}resolution: DNS\nendpoints: [{{address: 'bad_host'}}]\n"
            ),
        ),
        "spec.endpoints[0].address",
        "endpoint address \"bad_host\" is not a valid FQDN or an IP address",
    );
    assert_error(
        check(
            "ServiceEntry",
            &format!(
                "hosts: [a.example.com]\n{SE_PORTS}resolution: DNS_ROUND_ROBIN\nendpoints: [{{address: a.example.net}}, {{address: b.example.net}}]\n"
            ),
        ),
        "spec.endpoints",
        "there must only be 0 or 1 endpoint for resolution mode DNS_ROUND_ROBIN",
    );
    // DYNAMIC_DNS: wildcard hosts only, HTTP/TLS ports, no addresses or endpoints.
    assert_valid(check(
        "ServiceEntry",
        &format!("hosts: ['*.example.com']\n{SE_PORTS}resolution: DYNAMIC_DNS\n"),
    ));
    let diags = check(
        "ServiceEntry",
        "hosts: [a.example.com]\nports: [{number: 22, name: ssh, protocol: TCP}]\naddresses: [10.0.0.1]\nresolution: DYNAMIC_DNS\n",
    );
    assert_error(
        diags.clone(),
        "spec.hosts[0]",
        "host must be wildcarded for resolution mode DYNAMIC_DNS",
    );
    assert_error(
        diags.clone(),
        "spec.addresses",
        "addresses cannot be set for resolution type DYNAMIC_DNS",
    );
    assert_error(
        diags,
        "spec.ports[0].protocol",
        "only HTTP, TLS, GRPC, and HTTP2 protocols are supported",
    );
}

#[test]
fn service_entry_multiple_hosts_need_http_or_tls() {
    assert_error(
        check(
            "ServiceEntry",
            "hosts: [a.example.com, b.example.com]\nports: [{number: 5432, name: pg, protocol: TCP}]\nresolution: DNS\n",
        ),
        "spec.ports[0].protocol",
        "multiple hosts provided with non-HTTP, non-TLS ports",
    );
    assert_valid(check(
        "ServiceEntry",
        "hosts: [a.example.com, b.example.com]\nports: [{number: 443, name: tls, protocol: TLS}]\nresolution: DNS\n",
    ));
    assert_valid(check(
        "ServiceEntry",
        "hosts: [a.example.com, b.example.com]\nports: [{number: 5432, name: pg, protocol: TCP}]\n",
    ));
}

#[test]
fn service_entry_selector_and_export_to() {
    assert_error(
        check(
            "ServiceEntry",
            &format!(
                "hosts: [a.example.com]\n{SE_PORTS}resolution: STATIC\nworkloadSelector: {{labels: {{'app*': x}}}}\n"
            ),
        ),
        "spec.workloadSelector.labels[\"app*\"]",
        "wildcard is not supported in selector",
    );
    assert_warning(
        check(
            "ServiceEntry",
            &format!(
                "hosts: [a.example.com]\n{SE_PORTS}workloadSelector: {{labels: {{app: x}}}}\n"
            ),
        ),
        "spec.workloadSelector",
        "workloadSelector should not be set when resolution mode is NONE",
    );
    assert_valid(check(
        "ServiceEntry",
        &format!("hosts: [a.example.com]\n{SE_PORTS}exportTo: ['~']\n"),
    ));
    assert_error(
        check(
            "ServiceEntry",
            &format!("hosts: [a.example.com]\n{SE_PORTS}exportTo: ['~', other]\n"),
        ),
        "spec.exportTo",
        "cannot export service entry to no one (~) and someone",
    );
}

#[test]
fn workload_entries() {
    assert_valid(check(
        "WorkloadEntry",
        "address: 10.0.0.5\nports: {http: 8080}\nlabels: {app: ratings}\n",
    ));
    assert_valid(check("WorkloadEntry", "address: vm1.example.com\n"));
    assert_valid(check(
        "WorkloadEntry",
        "address: 'unix:///var/run/app.sock'\n",
    ));
    assert_error(
        check("WorkloadEntry", "labels: {app: a}\n"),
        "spec.address",
        "address is required",
    );
    assert_warning(
        check("WorkloadEntry", "network: vpc1\n"),
        "spec.address",
        "address is unset with network \"vpc1\"",
    );
    assert_error(
        check("WorkloadEntry", "address: 'not a host'\n"),
        "spec.address",
        "endpoint address \"not a host\" is not a valid FQDN or an IP address",
    );
    assert_error(
        check("WorkloadEntry", "address: 'unix://relative.sock'\n"),
        "spec.address",
        "relative.sock is not an absolute path to a file",
    );
    assert_error(
        check("WorkloadEntry", "address: 'unix:///dir/'\n"),
        "spec.address",
        "is not an absolute path to a file",
    );
    assert_error(
        check(
            "WorkloadEntry",
            "address: 10.0.0.5\nports: {http: 0, Bad_Name: 80}\n",
        ),
        "spec.ports.http",
        "port number 0 must be in the range 1..65535",
    );
    assert_error(
        check(
            "WorkloadEntry",
            "address: 10.0.0.5\nports: {Bad_Name: 80}\n",
        ),
        "spec.ports.Bad_Name",
        "invalid port name: Bad_Name",
    );
}

// ------------------------------------------------------------------------------------------------
// Gateway
// ------------------------------------------------------------------------------------------------

fn gateway(servers: &str) -> Vec<Diagnostic> {
    check(
        "Gateway",
        &format!("selector: {{istio: ingressgateway}}\nservers:\n{servers}"),
    )
}

#[test]
fn gateway_servers_and_hosts() {
    assert_valid(gateway(
        "- port: {number: 80, name: http, protocol: HTTP}\n  hosts: ['*', 'shop/*.example.com', './a.example.com', 10.0.0.1]\n",
    ));
    assert_error(
        check("Gateway", "servers: []\n"),
        "spec.servers",
        "gateway must have at least one server",
    );
    assert_error(
        check_in(
            "Gateway",
            "my.gateway",
            "ns",
            "servers:\n- port: {number: 80, name: http, protocol: HTTP}\n  hosts: ['*']\n",
        ),
        "metadata.name",
        "invalid gateway name: \"my.gateway\"",
    );
    for (host, message) in [
        ("shop/reviews", "short names (non FQDN) are not allowed"),
        (
            "*foo.example.com",
            "partial wildcard \"*foo.example.com\" not allowed",
        ),
        (
            "Sh_op/a.example.com",
            "invalid namespace value \"Sh_op\" in gateway",
        ),
        (
            "/a.example.com",
            "config namespace and dnsName in host entry cannot be empty",
        ),
        ("a.*.com", "invalid"),
    ] {
        assert_error(
            gateway(&format!(
                "- port: {{number: 80, name: http, protocol: HTTP}}\n  hosts: [{host:?}]\n"
            )),
            "spec.servers[0].hosts[0]",
            message,
        );
    }
    assert_error(
        gateway("- port: {number: 80, name: http, protocol: HTTP}\n  hosts: []\n"),
        "spec.servers[0].hosts",
        "server config must contain at least one host",
    );
}

#[test]
fn gateway_ports() {
    let diags = gateway(
        "- port: {number: 0, name: '', protocol: SPDY, targetPort: 8080}\n  hosts: ['*']\n",
    );
    assert_error(
        diags.clone(),
        "spec.servers[0].port.protocol",
        "invalid protocol \"SPDY\", supported protocols are HTTP, HTTP2, GRPC, GRPC-WEB, MONGO, REDIS, MYSQL, TCP",
    );
    assert_error(
        diags.clone(),
        "spec.servers[0].port.number",
        "port number 0 must be in the range 1..65535",
    );
    assert_error(
        diags.clone(),
        "spec.servers[0].port.targetPort",
        "targetPort has no impact on Gateways",
    );
    assert_error(diags, "spec.servers[0].port.name", "port name must be set");
    assert_error(
        gateway(
            "- port: {number: 80, name: http, protocol: HTTP}\n  hosts: ['*']\n- port: {number: 81, name: http, protocol: HTTP}\n  hosts: ['*']\n",
        ),
        "spec.servers[1].port.name",
        "port names in servers must be unique: duplicate name http",
    );
    // Unix domain sockets: port 0 and an absolute path.
    assert_valid(gateway(
        "- port: {number: 0, name: uds, protocol: HTTP}\n  bind: unix:///var/run/gw.sock\n  hosts: ['*']\n",
    ));
    assert_error(
        gateway(
            "- port: {number: 80, name: uds, protocol: HTTP}\n  bind: unix:///var/run/gw.sock\n  hosts: ['*']\n",
        ),
        "spec.servers[0].port.number",
        "port number must be 0 for unix domain socket",
    );
    assert_error(
        gateway(
            "- port: {number: 80, name: http, protocol: HTTP}\n  bind: localhost\n  hosts: ['*']\n",
        ),
        "spec.servers[0].bind",
        "localhost is not a valid IP",
    );
}

#[test]
fn gateway_tls() {
    let server = |protocol: &str, tls: &str| {
        gateway(&format!(
            "- port: {{number: 443, name: p, protocol: {protocol}}}\n  hosts: ['*']\n  tls: {tls}\n"
        ))
    };
    assert_valid(server("HTTPS", "{mode: SIMPLE, credentialName: cert}"));
    assert_valid(server(
        "HTTPS",
        "{mode: SIMPLE, serverCertificate: /c, privateKey: /k}",
    ));
    assert_valid(server("TLS", "{mode: PASSTHROUGH}"));
    assert_valid(server(
        "HTTPS",
        "{mode: MUTUAL, serverCertificate: /c, privateKey: /k, caCertificates: /ca}",
    ));
    assert_valid(server("HTTP", "{httpsRedirect: true}"));
    assert_error(
        gateway("- port: {number: 443, name: https, protocol: HTTPS}\n  hosts: ['*']\n"),
        "spec.servers[0].tls",
        "server must have TLS settings for HTTPS/TLS protocols",
    );
    assert_error(
        server("HTTP", "{mode: SIMPLE, credentialName: c}"),
        "spec.servers[0].tls",
        "server cannot have TLS settings for plain text HTTP ports",
    );
    assert_error(
        server("TCP", "{mode: PASSTHROUGH}"),
        "spec.servers[0].tls",
        "server cannot have TLS settings for non HTTPS/TLS ports",
    );
    assert_error(
        server("HTTPS", "{mode: SIMPLE}"),
        "spec.servers[0].tls.serverCertificate",
        "SIMPLE TLS requires a server certificate",
    );
    assert_error(
        server("HTTPS", "{mode: SIMPLE, serverCertificate: /c}"),
        "spec.servers[0].tls.privateKey",
        "SIMPLE TLS requires a private key",
    );
    assert_error(
        server(
            "HTTPS",
            "{mode: MUTUAL, serverCertificate: /c, privateKey: /k}",
        ),
        "spec.servers[0].tls.caCertificates",
        "MUTUAL TLS requires a client CA bundle",
    );
    assert_error(
        server(
            "HTTPS",
            "{mode: SIMPLE, credentialName: a, serverCertificate: /c, privateKey: /k}",
        ),
        "spec.servers[0].tls",
        "only one of credential_name, credential_names, server_certificate/private_key, tls_certificates should be specified",
    );
    assert_error(
        server("HTTPS", "{mode: ISTIO_MUTUAL, credentialName: a}"),
        "spec.servers[0].tls",
        "ISTIO_MUTUAL TLS cannot have associated credentialName",
    );
    assert_error(
        server(
            "HTTPS",
            "{mode: SIMPLE, serverCertificate: /c, privateKey: /k, caCrl: /crl}",
        ),
        "spec.servers[0].tls.caCrl",
        "CRL is not supported with SIMPLE TLS",
    );
    assert_error(
        server("HTTPS", "{mode: SIMPLE, credentialNames: [a, b, c]}"),
        "spec.servers[0].tls.credentialNames",
        "must have at most 2 items",
    );
    assert_error(
        server(
            "HTTPS",
            "{mode: SIMPLE, tlsCertificates: [{serverCertificate: /c}]}",
        ),
        "spec.servers[0].tls.tlsCertificates[0].privateKey",
        "SIMPLE TLS requires a private key",
    );
    assert_warning(
        server("TLS", "{mode: PASSTHROUGH, credentialName: c}"),
        "spec.servers[0].tls",
        "PASSTHROUGH mode does not use certificates, they will be ignored",
    );
    assert_warning(
        server("TCP", "{httpsRedirect: true}"),
        "spec.servers[0].tls.httpsRedirect",
        "tls.httpsRedirect should only be used with http servers",
    );
    assert_warning(
        server(
            "HTTPS",
            "{mode: SIMPLE, credentialName: c, minProtocolVersion: TLSV1_1}",
        ),
        "spec.servers[0].tls.minProtocolVersion",
        "TLS version below TLSV1_2 require setting compatible ciphers",
    );
}

// ------------------------------------------------------------------------------------------------
// Sidecar
// ------------------------------------------------------------------------------------------------

#[test]
fn sidecar_egress() {
    assert_valid(check(
        "Sidecar",
        "egress:\n- port: {number: 3306, protocol: MYSQL, name: mysql}\n  bind: 127.0.0.2\n  hosts: ['*/mysql.db.svc.cluster.local']\n- port: {number: 0, protocol: HTTP, name: uds}\n  bind: unix:///var/run/egress.sock\n  captureMode: NONE\n  hosts: ['./*']\n- hosts: ['~/*', 'istio-system/*', '*/*.example.com']\n",
    ));
    assert_error(
        check("Sidecar", "{}\n"),
        "spec",
        "sidecar: empty configuration provided",
    );
    let diags = check(
        "Sidecar",
        "egress:\n- hosts: ['./*']\n- hosts: [istio-system/*]\n",
    );
    assert_error(
        diags,
        "spec.egress[0].port",
        "sidecar: the egress listener with empty port should be the last listener in the list",
    );
    for (host, message) in [
        (
            "reviews.shop.svc.cluster.local",
            "host must be of form namespace/dnsName",
        ),
        ("shop/reviews", "short names (non FQDN) are not allowed"),
        ("Sh_op/*", "invalid namespace value \"Sh_op\" in sidecar"),
        ("shop/*.*", "invalid"),
    ] {
        assert_error(
            check("Sidecar", &format!("egress:\n- hosts: [{host:?}]\n")),
            "spec.egress[0].hosts[0]",
            message,
        );
    }
    assert_error(
        check("Sidecar", "egress:\n- hosts: []\n"),
        "spec.egress[0].hosts",
        "sidecar: egress listener must contain at least one host",
    );
    assert_error(
        check(
            "Sidecar",
            "egress:\n- port: {number: 0, protocol: HTTP}\n  bind: 127.0.0.1\n  hosts: ['*/*']\n",
        ),
        "spec.egress[0].bind",
        "sidecar: ports with 0 value must have a unix domain socket bind address",
    );
    assert_error(
        check(
            "Sidecar",
            "egress:\n- port: {number: 0, protocol: HTTP}\n  bind: unix:///a.sock\n  captureMode: IPTABLES\n  hosts: ['*/*']\n",
        ),
        "spec.egress[0].captureMode",
        "sidecar: captureMode must be DEFAULT/NONE for unix domain socket listeners",
    );
    assert_error(
        check(
            "Sidecar",
            "egress:\n- port: {number: 80, protocol: HTTP}\n  hosts: ['*/*']\n- port: {number: 80, protocol: TCP}\n  hosts: ['*/*']\n",
        ),
        "spec.egress[1].port.number",
        "sidecar: ports on IP bound listeners must be unique",
    );
    assert_warning(
        check(
            "Sidecar",
            "egress:\n- hosts: ['shop/*', 'shop/a.example.com']\n",
        ),
        "spec.egress[0].hosts[1]",
        "duplicated egress host: shop/a.example.com",
    );
    assert_warning(
        check(
            "Sidecar",
            "egress:\n- hosts: ['*/*', 'shop/a.example.com']\n",
        ),
        "spec.egress[0].hosts",
        "`*/*` host select all resources, no other hosts can be added",
    );
}

#[test]
fn sidecar_ingress() {
    assert_valid(check(
        "Sidecar",
        "ingress:\n- port: {number: 9080, protocol: HTTP, name: http}\n  defaultEndpoint: 127.0.0.1:8080\n- port: {number: 9443, protocol: HTTPS, name: https}\n  defaultEndpoint: unix:///var/run/app.sock\n  tls: {mode: SIMPLE, serverCertificate: /c, privateKey: /k}\n",
    ));
    assert_error(
        check(
            "Sidecar",
            "ingress:\n- port: {number: 9080, protocol: HTTP}\n  defaultEndpoint: 10.0.0.1:8080\n",
        ),
        "spec.ingress[0].defaultEndpoint",
        "sidecar: defaultEndpoint must be of form 127.0.0.1:<port>",
    );
    assert_error(
        check(
            "Sidecar",
            "ingress:\n- port: {number: 9080, protocol: HTTP}\n  defaultEndpoint: 127.0.0.1\n",
        ),
        "spec.ingress[0].defaultEndpoint",
        "missing port in address",
    );
    assert_error(
        check(
            "Sidecar",
            "ingress:\n- port: {number: 9080, protocol: HTTP}\n  defaultEndpoint: '[::1]:http'\n",
        ),
        "spec.ingress[0].defaultEndpoint",
        "sidecar: defaultEndpoint port (http) is not a number",
    );
    let diags = check(
        "Sidecar",
        "ingress:\n- port: {number: 9080, protocol: HTTP, targetPort: 1}\n- port: {number: 9080, protocol: HTTP}\n",
    );
    assert_error(
        diags.clone(),
        "spec.ingress[0].port.targetPort",
        "targetPort has no impact on Sidecars",
    );
    assert_error(
        diags,
        "spec.ingress[1].port.number",
        "sidecar: ports on IP bound listeners must be unique",
    );
    let diags = check(
        "Sidecar",
        "ingress:\n- port: {number: 9080, protocol: HTTP}\n  tls: {mode: ISTIO_MUTUAL, credentialName: c, httpsRedirect: true, subjectAltNames: [a]}\n",
    );
    assert_error(
        diags.clone(),
        "spec.ingress[0].tls.mode",
        "cannot set mode to ISTIO_MUTUAL in sidecar ingress tls",
    );
    assert_error(
        diags.clone(),
        "spec.ingress[0].tls.credentialName",
        "sidecar: credentialName is not currently supported",
    );
    assert_error(
        diags.clone(),
        "spec.ingress[0].tls.httpsRedirect",
        "sidecar: httpsRedirect is not supported",
    );
    assert_error(
        diags.clone(),
        "spec.ingress[0].tls.subjectAltNames",
        "subjectAltNames is not supported in ingress tls",
    );
    assert_error(
        diags,
        "spec.ingress[0].tls",
        "server cannot have TLS settings for non HTTPS/TLS ports",
    );
    assert_warning(
        check(
            "Sidecar",
            "ingress:\n- port: {number: 5432, protocol: TCP, name: pg}\n  connectionPool: {http: {maxRetries: 1}}\n",
        ),
        "spec.ingress[0].connectionPool.http",
        "HTTP connection pool settings are configured for port 5432",
    );
    assert_error(
        check(
            "Sidecar",
            "inboundConnectionPool: {tcp: {maxConnections: -1}}\n",
        ),
        "spec.inboundConnectionPool.tcp.maxConnections",
        "max connections must be non-negative",
    );
}

#[test]
fn sidecar_outbound_traffic_policy_and_selector() {
    assert_valid(check(
        "Sidecar",
        "outboundTrafficPolicy: {mode: ALLOW_ANY, egressProxy: {host: egress.example.com, port: {number: 3128}}}\n",
    ));
    assert_valid(check(
        "Sidecar",
        "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
    ));
    assert_error(
        check(
            "Sidecar",
            "outboundTrafficPolicy: {mode: REGISTRY_ONLY, egressProxy: {host: egress.example.com, port: {number: 3128}}}\n",
        ),
        "spec.outboundTrafficPolicy.egressProxy",
        "sidecar: egress_proxy must be set only with ALLOW_ANY outbound_traffic_policy mode",
    );
    assert_error(
        check(
            "Sidecar",
            "outboundTrafficPolicy: {mode: ALLOW_ANY, egressProxy: {host: egress.example.com}}\n",
        ),
        "spec.outboundTrafficPolicy.egressProxy.port",
        "sidecar: egress_proxy port must be non-nil",
    );
    assert_error(
        check(
            "Sidecar",
            "outboundTrafficPolicy: {mode: ALLOW_ANY, egressProxy: {host: '*.example.com', port: {number: 3128}}}\n",
        ),
        "spec.outboundTrafficPolicy.egressProxy.host",
        "invalid",
    );
    assert_warning(
        check(
            "Sidecar",
            "workloadSelector: {}\noutboundTrafficPolicy: {mode: ALLOW_ANY}\n",
        ),
        "spec.workloadSelector",
        "sidecar: workload selector specified without labels",
    );
    assert_error(
        check(
            "Sidecar",
            "workloadSelector: {labels: {'': x}}\noutboundTrafficPolicy: {mode: ALLOW_ANY}\n",
        ),
        "spec.workloadSelector.labels[\"\"]",
        "empty key is not supported in selector: \"=x\"",
    );
}

// ------------------------------------------------------------------------------------------------
// Metadata
// ------------------------------------------------------------------------------------------------

#[test]
fn reserved_annotations_are_rejected() {
    let doc = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: x\n  namespace: ns\n  annotations: {istio.io/dry-run: 'true', internal.istio.io/parents: a}\nspec: {host: r}\n";
    let (objs, errs) = parse_documents("t.yaml", doc);
    assert!(errs.is_empty());
    let mut config = ConfigSet::default();
    config.extend(objs);
    let diags = validate(&config);
    assert_error(
        diags.clone(),
        "metadata.annotations",
        "ns/x has unsupported annotation istio.io/dry-run, please remove the annotation",
    );
    assert_error(
        diags,
        "metadata.annotations",
        "\"internal.istio.io/parents\" annotation found, this may not be set by users",
    );
}

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

#[test]
fn host_relations() {
    assert!(hosts_overlap("*.com", "foo.com"));
    assert!(hosts_overlap("foo.com", "*.com"));
    assert!(!hosts_overlap("*.foo.com", "foo.com"));
    assert!(hosts_overlap("*", "*.com"));
    assert!(hosts_overlap("*.a.com", "*.com"));
    assert!(host_subset_of("a.foo.com", "*.foo.com"));
    assert!(host_subset_of("*.a.foo.com", "*.foo.com"));
    assert!(!host_subset_of("*.foo.com", "*.a.foo.com"));
    assert!(!host_subset_of("*.foo.com", "a.foo.com"));
}

#[test]
fn labels_and_names() {
    assert!(is_dns1123_label("a"));
    assert!(is_dns1123_label("A-1"));
    assert!(!is_dns1123_label("-a"));
    assert!(!is_dns1123_label("a-"));
    assert!(!is_dns1123_label(&"a".repeat(64)));
    assert!(is_wildcard_dns1123_label("*"));
    assert!(is_wildcard_dns1123_label("*-a"));
    assert!(!is_wildcard_dns1123_label("a*"));
    let mut report = Report::default();
    let labels: StringMap = [
        ("app.kubernetes.io/name", "web"),
        ("a_b.c", "x-y_z.1"),
        ("empty", ""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    validate_labels(&mut report, "l", &labels);
    assert!(report.items.is_empty(), "{:?}", report.items);
}

#[test]
fn envoy_header_expressions() {
    for ok in [
        "",
        "plain",
        "100%%",
        "%HOSTNAME%",
        "a %START_TIME(%Y)% b",
        "%PER_REQUEST_STATE([\"a\", \"b\"])%",
    ] {
        assert!(
            validate_header_value(ok).is_ok(),
            "{ok}: {:?}",
            validate_header_value(ok)
        );
    }
    for bad in [
        "%",
        "abc%123",
        "%START_TIME%%",
        "%VAR([\"a\" x])%",
        "tab\u{1}",
    ] {
        assert!(validate_header_value(bad).is_err(), "{bad}");
    }
    assert!(validate_header_value("a\tb").is_ok());
}

#[test]
fn known_http_statuses() {
    for code in [100, 200, 226, 308, 418, 429, 451, 503, 511] {
        assert!(is_known_http_status(code), "{code}");
    }
    for code in [0, 99, 209, 306, 419, 509, 512, 600] {
        assert!(!is_known_http_status(code), "{code}");
    }
}

#[test]
fn ip_subnets() {
    for ok in ["10.0.0.1", "10.0.0.0/8", "::1", "fd00::/8", "0.0.0.0/0"] {
        assert!(validate_ip_subnet(ok).is_ok(), "{ok}");
    }
    for bad in [
        "10.0.0.0/33",
        "10.0.0.0/",
        "10.0.0.0/08",
        "10.0.0.0/8/8",
        "host",
        "10.0.0/8",
    ] {
        assert!(validate_ip_subnet(bad).is_err(), "{bad}");
    }
}
