use super::*;
use crate::model::parse_documents;

/// Pods `web` (app=web, 10.0.1.1, ns shop), `web-v6` (app=web, fd00::1:1, ns shop), `client`
/// (10.0.2.1, ns shop), `other` (10.0.3.1, ns other), plus `extra` documents.
fn config(extra: &str) -> ConfigSet {
    let pods = "\
apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nstatus: {podIP: 10.0.1.1, hostIP: 192.168.0.10}\n---
apiVersion: v1\nkind: Pod\nmetadata: {name: web-v6, namespace: shop, labels: {app: web}}\nstatus: {podIP: \"fd00::1:1\"}\n---
apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: shop, labels: {app: client}}\nstatus: {podIP: 10.0.2.1, hostIP: 192.168.0.11}\n---
apiVersion: v1\nkind: Pod\nmetadata: {name: other, namespace: other, labels: {app: other}}\nstatus: {podIP: 10.0.3.1}\n---
apiVersion: v1\nkind: Pod\nmetadata: {name: agent, namespace: kube-system, labels: {app: agent}}\nspec: {hostNetwork: true}\nstatus: {podIP: 192.168.0.10}\n";
    let mut cfg = ConfigSet::default();
    for (name, text) in [("pods.yaml", pods), ("policies.yaml", extra)] {
        let (objs, errs) = parse_documents(name, text);
        assert!(errs.is_empty(), "{errs:?}");
        cfg.extend(objs);
    }
    cfg
}

fn policy(name: &str, namespace: &str, spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}---\n"
    )
}

fn plan(policies: &[String]) -> (AuthzPlan, Vec<Diagnostic>) {
    plan_with_http(policies, &[])
}

fn plan_with_http(policies: &[String], http: &[&str]) -> (AuthzPlan, Vec<Diagnostic>) {
    let cfg = config(&policies.concat());
    let mut diags = Vec::new();
    let http = http.iter().map(|a| a.parse().unwrap()).collect();
    let p = compile(&cfg, &http, &mut diags);
    (p, diags)
}

const WEB: &str = "10.0.1.1:8080";

fn tcp<'a>(p: &'a AuthzPlan, from: &str, to: &str) -> Request<'a> {
    let source: IpAddr = from.parse().unwrap();
    Request {
        source,
        source_namespace: p.namespace_of(source),
        destination: to.parse().unwrap(),
        http: None,
    }
}

fn http_req<'a>(
    p: &'a AuthzPlan,
    from: &str,
    method: &'a str,
    path: &'a str,
    headers: &'a [(String, String)],
) -> Request<'a> {
    Request {
        http: Some(HttpAttributes {
            method,
            host: "web.shop:8080",
            path,
            headers,
        }),
        ..tcp(p, from, WEB)
    }
}

fn allowed(p: &AuthzPlan, req: &Request<'_>) -> bool {
    p.decide(req).allowed
}

/// Every (source, expected deny) pair, checked against the plan's decision for a TCP
/// connection and against the kernel table for the destination (port, then port 0).
#[track_caller]
fn assert_kernel_agrees(p: &AuthzPlan, to: &str, cases: &[(&str, bool)]) {
    let dest: SocketAddr = to.parse().unwrap();
    let entry = |port: u16| {
        p.kernel
            .destinations
            .iter()
            .find(|d| d.ip == dest.ip() && d.port == port)
    };
    let table = entry(dest.port()).or_else(|| entry(0));
    for (src, deny) in cases {
        let decided = !p.decide(&tcp(p, src, to)).allowed;
        assert_eq!(decided, *deny, "decision for {src} -> {to}");
        let kernel = table.is_some_and(|d| p.kernel.tables[d.table].denies(src.parse().unwrap()));
        assert_eq!(kernel, *deny, "kernel for {src} -> {to}: {:#?}", p.kernel);
    }
}

#[test]
fn no_policy_allows_everything_and_needs_no_kernel_entry() {
    let (p, diags) = plan(&[]);
    assert!(diags.is_empty());
    assert_eq!(
        p.decide(&tcp(&p, "10.0.2.1", WEB)).reason,
        "no policy applies"
    );
    assert_eq!(p.kernel, KernelAuthz::default());
}

#[test]
fn deny_by_ip_blocks_applies_to_the_selected_workload_only() {
    let (p, _) = plan(&[policy(
        "deny-client",
        "shop",
        "selector: {matchLabels: {app: web}}\naction: DENY\nrules:\n- from:\n  - source: {ipBlocks: [10.0.2.0/24]}",
    )]);
    let d = p.decide(&tcp(&p, "10.0.2.1", WEB));
    assert!(!d.allowed);
    assert_eq!(d.policy.as_deref(), Some("shop/deny-client"));
    assert_eq!(d.rule.as_deref(), Some("spec.rules[0]"));
    assert_eq!(
        d.to_string(),
        "DENY: DENY policy shop/deny-client spec.rules[0] matches"
    );
    assert_kernel_agrees(
        &p,
        WEB,
        &[
            ("10.0.2.1", true),
            ("10.0.2.200", true),
            ("10.0.3.1", false),
            ("fd00::9", false),
        ],
    );
    assert_eq!(
        p.decide(&tcp(&p, "10.0.3.1", WEB)).to_string(),
        "ALLOW: no DENY policy matches and no ALLOW policy applies"
    );
    // The client pod is not selected: nothing applies to traffic to it.
    assert!(allowed(&p, &tcp(&p, "10.0.2.1", "10.0.3.1:80")));
    assert_eq!(p.policies[0].workloads, ["shop/web", "shop/web-v6"]);
    // One table serves both addresses of the workload and every port.
    assert_eq!(p.kernel.tables.len(), 1, "{:#?}", p.kernel);
    assert_eq!(
        p.kernel.tables[0],
        SourceTable {
            default_deny: false,
            prefixes: vec![("10.0.2.0/24".parse().unwrap(), true)],
        }
    );
    let dests: Vec<String> = p
        .kernel
        .destinations
        .iter()
        .map(|d| format!("{}:{}", d.ip, d.port))
        .collect();
    assert_eq!(dests, ["10.0.1.1:0", "fd00::1:1:0"]);
}

#[test]
fn allow_with_not_ip_blocks_denies_the_rest() {
    let (p, _) = plan(&[policy(
        "allow-most",
        "shop",
        "selector: {matchLabels: {app: web}}\nrules:\n- from:\n  - source: {ipBlocks: [10.0.0.0/16], notIpBlocks: [10.0.3.0/24]}",
    )]);
    assert_kernel_agrees(
        &p,
        WEB,
        &[
            ("10.0.2.1", false),
            ("10.0.3.1", true),
            ("10.1.0.1", true),
            ("fd00::9", true),
        ],
    );
    let table = &p.kernel.tables[0];
    assert!(table.default_deny);
    assert_eq!(
        table.prefixes,
        [
            ("10.0.0.0/16".parse().unwrap(), false),
            ("10.0.3.0/24".parse().unwrap(), true)
        ]
    );
    let d = p.decide(&tcp(&p, "10.0.3.1", WEB));
    assert_eq!(
        d.reason,
        "ALLOW policies apply and none matches (shop/allow-most)"
    );
}

#[test]
fn allow_without_rules_denies_all_and_an_empty_rule_allows_all() {
    let (p, _) = plan(&[policy("deny-all", "shop", "{}")]);
    assert!(!allowed(&p, &tcp(&p, "10.0.2.1", WEB)));
    assert_eq!(
        p.kernel.tables[0],
        SourceTable {
            default_deny: true,
            prefixes: vec![]
        }
    );
    let (p, _) = plan(&[
        policy("deny-all", "shop", "{}"),
        policy("allow-all", "shop", "rules: [{}]"),
    ]);
    assert!(allowed(&p, &tcp(&p, "10.0.2.1", WEB)));
    assert!(p.kernel.destinations.is_empty(), "{:#?}", p.kernel);
}

#[test]
fn deny_wins_over_allow_and_root_namespace_policies_apply_mesh_wide() {
    let (p, _) = plan(&[
        policy("allow-all", "shop", "rules: [{}]"),
        policy(
            "no-other",
            "istio-system",
            "selector: {matchLabels: {app: web}}\naction: DENY\nrules:\n- from:\n  - source: {namespaces: [other]}",
        ),
    ]);
    assert!(!allowed(&p, &tcp(&p, "10.0.3.1", WEB)));
    assert!(allowed(&p, &tcp(&p, "10.0.2.1", WEB)));
    // The kernel knows namespaces by Pod address.
    assert_kernel_agrees(
        &p,
        WEB,
        &[("10.0.3.1", true), ("10.0.2.1", false), ("10.9.9.9", false)],
    );
    let root = p
        .policies
        .iter()
        .find(|p| p.name == "istio-system/no-other");
    assert_eq!(root.unwrap().scope, "mesh");
}

#[test]
fn http_rules_match_methods_paths_hosts_and_headers() {
    let (p, diags) = plan(&[policy(
        "deny-admin",
        "shop",
        "action: DENY\nrules:\n- to:\n  - operation: {methods: [POST, \"DEL*\"], paths: [\"/admin*\"]}\n- to:\n  - operation: {paths: [\"/v1/{*}/secret\"], hosts: [\"WEB.shop*\"]}\n- when:\n  - key: request.headers[X-User]\n    values: [\"*mallory\"]\n    notValues: [good-mallory]",
    )]);
    assert_eq!(
        diags.len(),
        0,
        "HTTP-only DENY rules are Istio's own warning, not the compiler's: {diags:#?}"
    );
    let none: Vec<(String, String)> = vec![];
    let h = |v: &str| vec![("x-user".to_string(), v.to_string())];
    type Case<'a> = (&'a str, &'a str, Vec<(String, String)>, bool);
    let cases: [Case; 9] = [
        ("POST", "/admin/users", none.clone(), false),
        ("DELETE", "/admin", none.clone(), false),
        ("GET", "/admin", none.clone(), true),
        ("POST", "/public", none.clone(), true),
        ("POST", "/public/../admin", none.clone(), false),
        ("GET", "/v1/a/secret", none.clone(), false),
        ("GET", "/v1/a/b/secret", none.clone(), true),
        ("GET", "/", h("eve-mallory"), false),
        ("GET", "/", h("good-mallory"), true),
    ];
    for (method, path, headers, ok) in &cases {
        let req = http_req(&p, "10.0.2.1", method, path, headers);
        assert_eq!(allowed(&p, &req), *ok, "{method} {path} {headers:?}");
    }
    // Without HTTP, Istio drops the HTTP fields of a DENY rule: every connection is denied.
    assert_kernel_agrees(&p, WEB, &[("10.0.2.1", true), ("10.0.3.1", true)]);
}

#[test]
fn ports_split_the_kernel_tables() {
    let (p, _) = plan(&[policy(
        "deny-db",
        "shop",
        "selector: {matchLabels: {app: web}}\naction: DENY\nrules:\n- from:\n  - source: {notNamespaces: [shop]}\n  to:\n  - operation: {ports: [\"5432\"]}",
    )]);
    assert_kernel_agrees(
        &p,
        "10.0.1.1:5432",
        &[("10.0.3.1", true), ("10.0.2.1", false), ("10.9.9.9", true)],
    );
    assert_kernel_agrees(&p, WEB, &[("10.0.3.1", false), ("10.9.9.9", false)]);
    let dests: Vec<String> = p
        .kernel
        .destinations
        .iter()
        .map(|d| format!("{}:{}", d.ip, d.port))
        .collect();
    assert_eq!(dests, ["10.0.1.1:5432", "fd00::1:1:5432"]);
}

#[test]
fn unsupported_identities_never_grant_access() {
    let (p, diags) = plan(&[
        policy(
            "allow-sa",
            "shop",
            "selector: {matchLabels: {app: web}}\nrules:\n- from:\n  - source: {principals: [cluster.local/ns/shop/sa/client]}\n- from:\n  - source: {ipBlocks: [10.0.3.1]}\n  when:\n  - {key: \"request.auth.claims[group]\", values: [admin]}",
        ),
        policy(
            "deny-sa",
            "shop",
            "selector: {matchLabels: {app: web}}\naction: DENY\nrules:\n- from:\n  - source: {notPrincipals: [cluster.local/ns/shop/sa/client], ipBlocks: [10.0.2.0/24]}",
        ),
    ]);
    // ALLOW rules using identities never match; the DENY rule loses its principal condition
    // and denies the whole block.
    assert!(!allowed(&p, &tcp(&p, "10.0.3.1", WEB)));
    let d = p.decide(&tcp(&p, "10.0.2.1", WEB));
    assert_eq!(d.policy.as_deref(), Some("shop/deny-sa"));
    assert_kernel_agrees(&p, WEB, &[("10.0.3.1", true), ("10.0.2.1", true)]);
    let warnings: Vec<String> = diags
        .iter()
        .map(|d| format!("{} {}: {}", d.object, d.field, d.message))
        .collect();
    assert_eq!(
        warnings,
        [
            "shop/allow-sa spec.rules[0].from[0].source.principals: principals needs mTLS or JWT authentication, which steerd does not have: this ALLOW rule never matches",
            "shop/allow-sa spec.rules[1].when[0].key: request.auth.claims[group] needs mTLS or JWT authentication, which steerd does not have: this ALLOW rule never matches",
            "shop/deny-sa spec.rules[0].from[0].source.principals: principals needs mTLS or JWT authentication, which steerd does not have: this condition is ignored, so the rule matches more requests",
        ]
    );
}

#[test]
fn custom_denies_and_audit_dry_run_and_target_refs_are_not_enforced() {
    let dry_run = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: dry, namespace: shop, annotations: {istio.io/dry-run: \"true\"}}\nspec: {action: DENY, rules: [{}]}\n---\n".to_string();
    let (p, diags) = plan(&[
        policy("audit", "shop", "action: AUDIT\nrules: [{}]"),
        dry_run,
        policy(
            "gw",
            "shop",
            "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\naction: DENY\nrules: [{}]",
        ),
    ]);
    assert!(allowed(&p, &tcp(&p, "10.0.2.1", WEB)));
    assert!(p.kernel.destinations.is_empty());
    let fields: Vec<(&str, &str)> = diags
        .iter()
        .map(|d| (d.object.as_str(), d.field.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("shop/audit", "spec.action"),
            ("shop/dry", "metadata.annotations"),
            ("shop/gw", "spec.targetRefs")
        ]
    );
    assert_eq!(p.policies[1].not_enforced.as_deref(), Some("dry-run"));
    assert!(p.policies[2].workloads.is_empty());

    let (p, diags) = plan(&[policy(
        "ext",
        "shop",
        "action: CUSTOM\nprovider: {name: opa}\nrules:\n- to:\n  - operation: {paths: [/secure]}",
    )]);
    let req = http_req(&p, "10.0.2.1", "GET", "/secure", &[]);
    let d = p.decide(&req);
    assert!(!d.allowed);
    assert!(d.reason.contains("no external authorizer"), "{d}");
    assert!(allowed(&p, &http_req(&p, "10.0.2.1", "GET", "/open", &[])));
    assert!(diags[0].message.contains("\"opa\""), "{diags:?}");
}

#[test]
fn http_ports_admit_node_addresses_in_the_kernel() {
    let (p, _) = plan_with_http(
        &[policy(
            "only-shop",
            "shop",
            "selector: {matchLabels: {app: web}}\nrules:\n- from:\n  - source: {namespaces: [shop]}",
        )],
        &[WEB],
    );
    assert_kernel_agrees(&p, WEB, &[("10.0.2.1", false), ("10.0.3.1", true)]);
    // Node addresses (other nodes' proxies, which authorize each request themselves) pass in
    // the kernel on the HTTP port only; a request from one is still decided on its own.
    let table = |port: u16| {
        let d = p
            .kernel
            .destinations
            .iter()
            .find(|d| d.ip.to_string() == "10.0.1.1" && d.port == port);
        &p.kernel.tables[d.unwrap().table]
    };
    let node: IpAddr = "192.168.0.11".parse().unwrap();
    assert!(!table(8080).denies(node));
    assert!(table(0).denies(node));
    assert!(!table(0).denies("10.0.2.1".parse().unwrap()));
    assert!(!allowed(&p, &tcp(&p, "192.168.0.11", WEB)));
    // The host-network Pod's address is not a Pod namespace.
    assert_eq!(p.namespace_of("192.168.0.10".parse().unwrap()), None);
}

#[test]
fn patterns_follow_istio() {
    assert!(glob_matches("team-*", "team-a"));
    assert!(glob_matches("*-prod", "shop-prod"));
    assert!(glob_matches("a*b*c", "axxbyyc"));
    assert!(!glob_matches("a*b*c", "axxc"));
    assert!(!glob_matches("shop", "shop2"));
    assert!(Pattern::new("*").matches("x") && !Pattern::new("*").matches(""));
    assert!(Pattern::path("/a/{**}").matches("/a/b/c"));
    assert!(Pattern::path("/a/{**}").matches("/a/"));
    assert!(!Pattern::path("/a/{*}").matches("/a/"));
    assert!(!Pattern::path("/a/{*}").matches("/a/b/c"));
    for (raw, normalized) in [
        ("/a/../admin", "/admin"),
        ("/../../admin", "/admin"),
        ("/a/./b/.", "/a/b/"),
        ("/%61dmin", "/admin"),
        ("/a%2Fb", "/a%2Fb"),
        ("/caf\u{e9}/..", "/"),
    ] {
        assert_eq!(normalize_path(raw), normalized, "{raw}");
    }
}

#[test]
fn mapped_prefixes_round_trip() {
    for s in [
        "10.0.0.0/8",
        "0.0.0.0/0",
        "fd00::/64",
        "::/0",
        "10.1.2.3/32",
    ] {
        let net: IpNet = s.parse().unwrap();
        assert_eq!(unmapped_net(mapped_net(net)), net, "{s}");
    }
}

#[test]
fn rules_describe_themselves_for_inspect() {
    let (p, _) = plan(&[policy(
        "p",
        "shop",
        "action: DENY\nrules:\n- from:\n  - source: {ipBlocks: [10.0.0.0/8], notIpBlocks: [10.1.0.0/16]}\n  - source: {namespaces: [a]}\n  to:\n  - operation: {paths: [/admin]}\n  when:\n  - {key: \"request.headers[X-User]\", values: [bob]}\n  - {key: source.ip, notValues: [10.0.0.1]}\n- {}",
    )]);
    let rules: Vec<String> = p.policies[0].rules.iter().map(Rule::describe).collect();
    assert_eq!(
        rules,
        [
            "from[ipBlocks=10.0.0.0/8,!10.1.0.0/16]|[namespaces=a] to[paths=/admin] when[request.headers[x-user]=bob source.ip=!10.0.0.1]",
            "*"
        ]
    );
}

#[test]
fn destination_ip_conditions_give_each_address_its_own_table() {
    // Both web addresses share the policy; only one matches `destination.ip`.
    let (p, _) = plan(&[policy(
        "v4-only",
        "shop",
        "selector: {matchLabels: {app: web}}\naction: DENY\nrules:\n- when:\n  - {key: destination.ip, values: [10.0.0.0/8]}",
    )]);
    assert_kernel_agrees(&p, WEB, &[("10.0.2.1", true)]);
    assert_kernel_agrees(&p, "[fd00::1:1]:8080", &[("10.0.2.1", false)]);
}
