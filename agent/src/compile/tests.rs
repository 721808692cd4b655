use super::*;
use crate::model::parse_documents;

fn config(texts: &[&str]) -> ConfigSet {
    let mut cfg = ConfigSet::default();
    for (i, t) in texts.iter().enumerate() {
        let (objs, errs) = parse_documents(&format!("test{i}.yaml"), t);
        assert!(errs.is_empty(), "{errs:?}");
        cfg.extend(objs);
    }
    cfg
}

fn shared(path: &str) -> String {
    let p = format!(
        "{}/../../shared/istio/samples/{path}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn vip(s: &str, transport: Transport) -> VipKey {
    let a: SocketAddr = s.parse().unwrap();
    VipKey {
        ip: a.ip(),
        port: a.port(),
        transport,
    }
}

fn weights(plan: &Plan, key: &str) -> Vec<(String, f64)> {
    let svc = plan
        .services
        .get(&vip(key, Transport::Tcp))
        .unwrap_or_else(|| {
            panic!(
                "{key} not in plan: {:?}",
                plan.services.keys().collect::<Vec<_>>()
            )
        });
    let mut v: Vec<_> = svc
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), (b.weight * 1e6).round() / 1e6))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The tcp-echo sample's Service with a cluster IP (the API server would assign one).
fn tcp_echo_services() -> String {
    shared("tcp-echo/tcp-echo-services.yaml").replace(
        "spec:\n  ports:",
        "spec:\n  clusterIP: 10.96.0.20\n  ports:",
    )
}

const TCP_ECHO_PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: tcp-echo-v1-a, labels: {app: tcp-echo, version: v1}}
spec: {containers: [{name: c, ports: [{containerPort: 9000}]}]}
status: {podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: tcp-echo-v2-a, labels: {app: tcp-echo, version: v2}}
spec: {containers: [{name: c}]}
status: {podIP: 10.244.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: other, labels: {app: other, version: v1}}
spec: {containers: [{name: c}]}
status: {podIP: 10.244.3.2}
"#;

/// The sample's 80/20 route, bound to the mesh instead of the ingress gateway.
fn mesh_80_20() -> String {
    shared("tcp-echo/tcp-echo-20-v2.yaml")
        .replace(
            "  - \"*\"\n  gateways:\n  - tcp-echo-gateway",
            "  - tcp-echo\n  gateways:\n  - mesh",
        )
        .replace("port: 31400", "port: 9000")
}

#[test]
fn service_without_virtual_service_uses_all_pods_equally() {
    let plan = compile(&config(&[&tcp_echo_services(), TCP_ECHO_PODS]));
    assert_eq!(
        weights(&plan, "10.96.0.20:9000"),
        vec![
            ("10.244.1.2:9000".into(), 0.5),
            ("10.244.2.2:9000".into(), 0.5)
        ]
    );
    // Both ports of the sample are steered; the target port defaults to the service port.
    assert_eq!(weights(&plan, "10.96.0.20:9001").len(), 2);
    let svc = &plan.services[&vip("10.96.0.20:9000", Transport::Tcp)];
    assert_eq!(svc.route, "default");
    assert_eq!(svc.host, "tcp-echo.default.svc.cluster.local");
    assert_eq!(
        *svc.backends[0].clusters,
        [std::sync::Arc::<str>::from(
            "outbound|9000||tcp-echo.default.svc.cluster.local"
        )]
    );
}

#[test]
fn tcp_echo_80_20_with_subsets() {
    let dr = shared("tcp-echo/tcp-echo-all-v1.yaml");
    let plan = compile(&config(&[
        &tcp_echo_services(),
        TCP_ECHO_PODS,
        &dr,
        &mesh_80_20(),
    ]));
    assert_eq!(
        weights(&plan, "10.96.0.20:9000"),
        vec![
            ("10.244.1.2:9000".into(), 0.8),
            ("10.244.2.2:9000".into(), 0.2)
        ]
    );
    let svc = &plan.services[&vip("10.96.0.20:9000", Transport::Tcp)];
    assert_eq!(svc.route, "VirtualService default/tcp-echo tcp[0]");
    let v1 = svc
        .backends
        .iter()
        .find(|b| b.addr.ip().to_string() == "10.244.1.2")
        .unwrap();
    assert_eq!(
        *v1.clusters,
        [std::sync::Arc::<str>::from(
            "outbound|9000|v1|tcp-echo.default.svc.cluster.local"
        )]
    );
    // The route matches port 9000 only: 9001 keeps the default.
    assert_eq!(
        plan.services[&vip("10.96.0.20:9001", Transport::Tcp)].route,
        "default"
    );
}

#[test]
fn gateway_bound_virtual_service_does_not_steer_mesh_traffic() {
    // The sample as shipped: bound to tcp-echo-gateway only.
    let dr_and_vs = shared("tcp-echo/tcp-echo-all-v1.yaml");
    let plan = compile(&config(&[&tcp_echo_services(), TCP_ECHO_PODS, &dr_and_vs]));
    let svc = &plan.services[&vip("10.96.0.20:9000", Transport::Tcp)];
    assert_eq!(svc.route, "default");
    assert_eq!(svc.backends.len(), 2);
}

#[test]
fn relative_weights_any_sum() {
    for (w1, w2, e1, e2) in [(1, 3, 0.25, 0.75), (0, 100, 0.0, 1.0), (30, 30, 0.5, 0.5)] {
        let vs = format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: t}}\nspec:\n  hosts: [tcp-echo]\n  tcp:\n  - route:\n    - destination: {{host: tcp-echo, subset: v1}}\n      weight: {w1}\n    - destination: {{host: tcp-echo, subset: v2}}\n      weight: {w2}\n"
        );
        let dr = shared("tcp-echo/tcp-echo-all-v1.yaml");
        let plan = compile(&config(&[&tcp_echo_services(), TCP_ECHO_PODS, &dr, &vs]));
        let mut expected = vec![];
        if e1 > 0.0 {
            expected.push(("10.244.1.2:9000".to_string(), e1));
        }
        expected.push(("10.244.2.2:9000".to_string(), e2));
        assert_eq!(weights(&plan, "10.96.0.20:9000"), expected, "{w1}/{w2}");
    }
}

#[test]
fn single_destination_without_weight_gets_everything() {
    let vs = "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: t}\nspec:\n  hosts: [tcp-echo.default.svc.cluster.local]\n  tcp:\n  - route:\n    - destination: {host: tcp-echo, subset: v2}\n";
    let dr = shared("tcp-echo/tcp-echo-all-v1.yaml");
    let plan = compile(&config(&[&tcp_echo_services(), TCP_ECHO_PODS, &dr, vs]));
    assert_eq!(
        weights(&plan, "10.96.0.20:9000"),
        vec![("10.244.2.2:9000".into(), 1.0)]
    );
}

#[test]
fn endpoint_slices_take_precedence_and_map_named_ports() {
    let text = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIPs: [10.96.1.1, "fd00:96::1"]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: web}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true}
- addresses: [10.244.1.6]
  conditions: {ready: false}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints:
- addresses: ["fd00:244:1::5"]
---
apiVersion: v1
kind: Pod
metadata: {name: ignored-because-slices-exist, namespace: shop, labels: {app: web}}
status: {podIP: 10.244.9.9}
"#;
    let plan = compile(&config(&[text]));
    assert_eq!(
        weights(&plan, "10.96.1.1:80"),
        vec![("10.244.1.5:8080".into(), 1.0)]
    );
    assert_eq!(
        weights(&plan, "[fd00:96::1]:80"),
        vec![("[fd00:244:1::5]:8080".into(), 1.0)]
    );
    let udp = &plan.services[&vip("10.96.1.1:53", Transport::Udp)];
    assert_eq!(udp.backends[0].addr.to_string(), "10.244.1.5:5353");
    // No IPv6 slice serves the UDP port: the IPv6 VIP rejects rather than cross families.
    assert!(
        plan.services[&vip("[fd00:96::1]:53", Transport::Udp)]
            .backends
            .is_empty()
    );
}

#[test]
fn pods_resolve_named_target_ports_and_skip_unready() {
    let text = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.1.2
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http-alt}]
---
apiVersion: v1
kind: Pod
metadata: {name: a, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http-alt, containerPort: 8081}]}]}
status: {podIP: 10.244.1.7, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: b, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http-alt, containerPort: 8081}]}]}
status: {podIP: 10.244.1.8, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, labels: {app: web}}
spec: {containers: [{name: c}]}
status: {podIP: 10.244.1.9}
"#;
    let plan = compile(&config(&[text]));
    // b is unready; c has no port named http-alt, so it cannot serve this port.
    assert_eq!(
        weights(&plan, "10.96.1.2:80"),
        vec![("10.244.1.7:8081".into(), 1.0)]
    );
}

#[test]
fn service_entry_static_endpoints_and_workload_entries() {
    let text = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: data}
spec:
  hosts: [db.internal]
  addresses: [10.96.5.5/32]
  ports: [{number: 5432, name: pg, protocol: TCP, targetPort: 15432}]
  resolution: STATIC
  endpoints:
  - address: 10.244.5.1
    weight: 3
  - address: 10.244.5.2
    ports: {pg: 25432}
  workloadSelector: {labels: {app: db}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm1, namespace: data}
spec: {address: 10.244.5.3, labels: {app: db}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough, namespace: data}
spec:
  hosts: [ext.example.com]
  addresses: [10.96.5.6]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
"#;
    let plan = compile(&config(&[text]));
    assert_eq!(
        weights(&plan, "10.96.5.5:5432"),
        vec![
            ("10.244.5.1:15432".into(), 0.6),
            ("10.244.5.2:25432".into(), 0.2),
            ("10.244.5.3:15432".into(), 0.2)
        ]
    );
    assert!(
        !plan
            .services
            .contains_key(&vip("10.96.5.6:443", Transport::Tcp)),
        "resolution NONE passes through"
    );
}

#[test]
fn missing_host_and_subset_are_reported_and_skipped() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: t}\nspec:\n  hosts: [tcp-echo]\n  tcp:\n  - route:\n    - destination: {host: nowhere}\n      weight: 50\n    - destination: {host: tcp-echo, subset: v9}\n      weight: 25\n    - destination: {host: tcp-echo}\n      weight: 25\n";
    let dr = shared("tcp-echo/tcp-echo-all-v1.yaml");
    let plan = compile(&config(&[&tcp_echo_services(), TCP_ECHO_PODS, &dr, vs]));
    assert_eq!(
        weights(&plan, "10.96.0.20:9000"),
        vec![
            ("10.244.1.2:9000".into(), 0.5),
            ("10.244.2.2:9000".into(), 0.5)
        ]
    );
    let codes: Vec<_> = plan
        .diagnostics
        .iter()
        .filter_map(|d| d.code.as_deref())
        .collect();
    assert_eq!(codes, vec!["IST0101", "IST0101"], "{:?}", plan.diagnostics);
    assert!(
        plan.diagnostics
            .iter()
            .any(|d| d.field == "spec.tcp[0].route[0].destination.host")
    );
}

#[test]
fn exact_host_beats_wildcard() {
    let wild = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a-wild}\nspec:\n  hosts: ['*.svc.cluster.local']\n  tcp:\n  - route:\n    - destination: {host: tcp-echo, subset: v1}\n";
    let exact = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: z-exact}\nspec:\n  hosts: [tcp-echo]\n  tcp:\n  - route:\n    - destination: {host: tcp-echo, subset: v2}\n";
    let dr = shared("tcp-echo/tcp-echo-all-v1.yaml");
    let plan = compile(&config(&[
        &tcp_echo_services(),
        TCP_ECHO_PODS,
        &dr,
        wild,
        exact,
    ]));
    assert_eq!(
        weights(&plan, "10.96.0.20:9000"),
        vec![("10.244.2.2:9000".into(), 1.0)]
    );
    let plan = compile(&config(&[&tcp_echo_services(), TCP_ECHO_PODS, &dr, wild]));
    assert_eq!(
        weights(&plan, "10.96.0.20:9000"),
        vec![("10.244.1.2:9000".into(), 1.0)]
    );
}

#[test]
fn virtual_service_precedence_exact_case_insensitive_first_by_name_then_longest_wildcard() {
    let vs = |name: &str, hosts: &str, subset: &str, extra: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{hosts}]\n{extra}  tcp:\n  - route:\n    - destination: {{host: tcp-echo, subset: {subset}}}\n"
        )
    };
    let dr = shared("tcp-echo/tcp-echo-all-v1.yaml");
    let v1 = vec![("10.244.1.2:9000".to_string(), 1.0)];
    let v2 = vec![("10.244.2.2:9000".to_string(), 1.0)];
    let plan_of = |vss: &[String]| {
        let mut texts: Vec<&str> = vec![TCP_ECHO_PODS, &dr];
        let services = tcp_echo_services();
        texts.push(&services);
        texts.extend(vss.iter().map(String::as_str));
        compile(&config(&texts))
    };
    // Exact hosts match case-insensitively; of two exact ones the first by name wins; one
    // bound only to a gateway does not count for the mesh.
    let plan = plan_of(&[
        vs("a-gw", "tcp-echo", "v1", "  gateways: [gw]\n"),
        vs("b-exact", "TCP-Echo.default.svc.cluster.local", "v2", ""),
        vs("c-exact", "tcp-echo", "v1", ""),
        vs("a-wild", "'*.svc.cluster.local'", "v1", ""),
    ]);
    assert_eq!(weights(&plan, "10.96.0.20:9000"), v2);
    // Without exact hosts the longest wildcard wins, whatever the names.
    let plan = plan_of(&[
        vs("a-short", "'*.cluster.local'", "v1", ""),
        vs("z-long", "'*.svc.cluster.local'", "v2", ""),
        vs("a-gw", "tcp-echo", "v1", "  gateways: [gw]\n"),
    ]);
    assert_eq!(weights(&plan, "10.96.0.20:9000"), v2);
    let plan = plan_of(&[vs("a-short", "'*.cluster.local'", "v1", "")]);
    assert_eq!(weights(&plan, "10.96.0.20:9000"), v1);
}

#[test]
fn http_routes_on_http_ports_are_marked_for_l7() {
    let text = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {clusterIP: 10.96.2.2, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: r1, labels: {app: reviews, version: v1}}
status: {podIP: 10.244.4.1}
"#;
    let vs = shared("bookinfo/networking/virtual-service-reviews-80-20.yaml");
    let plan = compile(&config(&[text, &vs]));
    let svc = &plan.services[&vip("10.96.2.2:9080", Transport::Tcp)];
    assert!(svc.needs_l7);
    assert_eq!(svc.backends.len(), 1, "the per-connection fallback");
    // Without a VirtualService an HTTP port still goes through the proxy; a TCP port does not.
    let plan =
        compile(&config(&[&text.replace(
            "name: http, port: 9080",
            "name: http-web, port: 9080",
        )]));
    assert!(plan.services[&vip("10.96.2.2:9080", Transport::Tcp)].needs_l7);
    let plan = compile(&config(&[
        &text.replace("name: http, port: 9080", "name: tcp, port: 9080")
    ]));
    assert!(!plan.services[&vip("10.96.2.2:9080", Transport::Tcp)].needs_l7);
}

#[test]
fn udp_services_ignore_tcp_routes() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: dns}\nspec: {clusterIP: 10.96.0.10, selector: {app: dns}, ports: [{name: dns, port: 53, protocol: UDP}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: d, labels: {app: dns}}\nstatus: {podIP: 10.244.0.53}\n";
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: t}\nspec:\n  hosts: [dns]\n  tcp:\n  - route:\n    - destination: {host: nowhere}\n";
    let plan = compile(&config(&[text, vs]));
    let svc = &plan.services[&vip("10.96.0.10:53", Transport::Udp)];
    assert_eq!(svc.backends.len(), 1);
    assert_eq!(svc.route, "default");
}

#[test]
fn headless_and_external_name_services_are_not_steered() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: e}\nspec: {type: ExternalName, externalName: example.com}\n";
    let plan = compile(&config(&[text]));
    assert!(plan.services.is_empty());
}

#[test]
fn service_without_endpoints_has_empty_backends() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: lonely}\nspec: {clusterIP: 10.96.3.3, selector: {app: none}, ports: [{port: 80}]}\n";
    let plan = compile(&config(&[text]));
    assert!(
        plan.services[&vip("10.96.3.3:80", Transport::Tcp)]
            .backends
            .is_empty()
    );
}

#[test]
fn compile_is_deterministic() {
    let dr = shared("tcp-echo/tcp-echo-all-v1.yaml");
    let inputs = [
        tcp_echo_services(),
        TCP_ECHO_PODS.to_string(),
        dr,
        mesh_80_20(),
    ];
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let a = compile(&config(&refs));
    let mut rev = refs.clone();
    rev.reverse();
    let b = compile(&config(&rev));
    // Regexes have no PartialEq; their Debug form is their pattern.
    assert_eq!(format!("{:?}", a.services), format!("{:?}", b.services));
}
