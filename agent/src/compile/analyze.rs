//! `steerd check`: validation plus cross-object analysis, like `istioctl analyze` on files, with
//! Istio's message codes and levels (`pkg/config/analysis/msg/messages.yaml`).

use super::registry::{Registry, host_matches, resolve_host};
use super::{Diagnostic, Level, gateway_ref};
use crate::model::istio::{self, MESH_GATEWAY};
use crate::model::{ConfigSet, Resource};
use std::collections::{BTreeMap, HashMap};

fn diag(
    level: Level,
    code: &str,
    kind: &str,
    r: &Resource<impl Sized>,
    field: &str,
    message: String,
) -> Diagnostic {
    Diagnostic {
        level,
        code: Some(code.into()),
        kind: kind.into(),
        object: r.meta.key(),
        origin: r.origin.clone(),
        field: field.into(),
        message,
    }
}

/// Every finding about `config`: Istio's validation (IST0106 for schema errors), the compiler's
/// reference checks (IST0101) and the analyzers below. Sorted and de-duplicated.
pub fn analyze(config: &ConfigSet) -> Vec<Diagnostic> {
    let mut out: Vec<Diagnostic> = crate::model::validate::validate(config)
        .into_iter()
        .map(|mut d| {
            if d.code.is_none() {
                d.code = Some("IST0106".into());
                d.message = format!("Schema validation error: {}: {}", d.field, d.message);
            }
            d
        })
        .collect();
    let plan = super::compile(config);
    out.extend(plan.diagnostics);
    let mut scratch = Vec::new();
    let registry = super::registry::build(config, &mut scratch);
    gateways_exist(config, &mut out);
    conflicting_mesh_hosts(config, &mut out);
    destination_ports(config, &registry, &mut out);
    hosts_in_gateways(config, &mut out);
    service_entry_addresses(config, &mut out);
    conflicting_gateways(config, &mut out);
    unreachable_rules(config, &mut out);
    sidecar_selection(config, &mut out);
    out.sort();
    out.dedup();
    out
}

/// IST0101: a VirtualService names a Gateway that does not exist.
fn gateways_exist(config: &ConfigSet, out: &mut Vec<Diagnostic>) {
    let known: Vec<String> = config.gateways.iter().map(|g| g.meta.key()).collect();
    for vs in &config.virtual_services {
        for (i, g) in vs.spec.gateways.iter().enumerate() {
            if g == MESH_GATEWAY || known.contains(&gateway_ref(g, &vs.meta.namespace)) {
                continue;
            }
            out.push(diag(
                Level::Error,
                "IST0101",
                "VirtualService",
                vs,
                &format!("spec.gateways[{i}]"),
                format!("Referenced gateway not found: {g:?}"),
            ));
        }
    }
}

/// IST0109: two mesh VirtualServices define the same host.
fn conflicting_mesh_hosts(config: &ConfigSet, out: &mut Vec<Diagnostic>) {
    let mut by_host: BTreeMap<String, Vec<&Resource<istio::VirtualService>>> = BTreeMap::new();
    for vs in config
        .virtual_services
        .iter()
        .filter(|v| v.spec.binds_mesh() && !v.spec.hosts.is_empty())
    {
        for h in &vs.spec.hosts {
            let entry = by_host
                .entry(resolve_host(h, &vs.meta.namespace))
                .or_default();
            if !entry.iter().any(|v| v.meta.key() == vs.meta.key()) {
                entry.push(vs);
            }
        }
    }
    for (host, list) in by_host.into_iter().filter(|(_, l)| l.len() > 1) {
        let names: Vec<String> = list.iter().map(|v| v.meta.key()).collect();
        for vs in list {
            out.push(diag(
                Level::Error,
                "IST0109",
                "VirtualService",
                vs,
                "spec.hosts",
                format!(
                    "The VirtualServices {} associated with mesh define the same host {host} which can lead to undefined behavior. This can be fixed by merging the conflicting VirtualServices into a single resource.",
                    names.join(",")
                ),
            ));
        }
    }
}

/// IST0112: a destination without a port on a service with several ports.
fn destination_ports(config: &ConfigSet, registry: &Registry, out: &mut Vec<Diagnostic>) {
    for vs in &config.virtual_services {
        let mut check = |field: String, d: &istio::Destination| {
            if d.port.as_ref().and_then(|p| p.number).is_some() {
                return;
            }
            let host = resolve_host(&d.host, &vs.meta.namespace);
            if let Some(svc) = registry.services.get(&host)
                && svc.ports.len() > 1
            {
                let ports: Vec<String> = svc.ports.iter().map(|p| p.port.to_string()).collect();
                out.push(diag(
                    Level::Error,
                    "IST0112",
                    "VirtualService",
                    vs,
                    &field,
                    format!(
                        "This VirtualService routes to a service {:?} that exposes multiple ports [{}]. Specifying a port in the destination is required to disambiguate.",
                        d.host,
                        ports.join(" ")
                    ),
                ));
            }
        };
        for (i, r) in vs.spec.http.iter().enumerate() {
            for (j, d) in r.route.iter().enumerate() {
                check(
                    format!("spec.http[{i}].route[{j}].destination"),
                    &d.destination,
                );
            }
        }
        for (i, r) in vs.spec.tcp.iter().enumerate() {
            for (j, d) in r.route.iter().enumerate() {
                check(
                    format!("spec.tcp[{i}].route[{j}].destination"),
                    &d.destination,
                );
            }
        }
        for (i, r) in vs.spec.tls.iter().enumerate() {
            for (j, d) in r.route.iter().enumerate() {
                check(
                    format!("spec.tls[{i}].route[{j}].destination"),
                    &d.destination,
                );
            }
        }
    }
}

fn server_hosts(gw: &Resource<istio::Gateway>) -> Vec<String> {
    gw.spec
        .servers
        .iter()
        .flat_map(|s| s.hosts.iter())
        .map(|h| {
            h.rsplit_once('/')
                .map_or(h.as_str(), |(_, host)| host)
                .to_string()
        })
        .collect()
}

/// IST0132: a VirtualService host that none of its Gateway's servers expose.
fn hosts_in_gateways(config: &ConfigSet, out: &mut Vec<Diagnostic>) {
    for vs in &config.virtual_services {
        for g in vs.spec.gateways.iter().filter(|g| *g != MESH_GATEWAY) {
            let key = gateway_ref(g, &vs.meta.namespace);
            let Some(gw) = config.gateways.iter().find(|x| x.meta.key() == key) else {
                continue;
            };
            let exposed = server_hosts(gw);
            let missing: Vec<&String> = vs
                .spec
                .hosts
                .iter()
                .filter(|h| {
                    !exposed
                        .iter()
                        .any(|e| host_matches(e, h) || host_matches(h, e) || e == *h)
                })
                .collect();
            if !missing.is_empty() {
                out.push(diag(
                    Level::Warning,
                    "IST0132",
                    "VirtualService",
                    vs,
                    "spec.hosts",
                    format!(
                        "one or more host [{}] defined in VirtualService {} not found in Gateway {key}.",
                        missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" "),
                        vs.meta.key()
                    ),
                ));
            }
        }
    }
}

/// IST0134: a ServiceEntry serving plain TCP with no addresses cannot be captured by address.
fn service_entry_addresses(config: &ConfigSet, out: &mut Vec<Diagnostic>) {
    for se in &config.service_entries {
        let tcp = se.spec.ports.iter().any(|p| {
            matches!(
                p.protocol
                    .as_deref()
                    .map(str::to_ascii_uppercase)
                    .as_deref(),
                None | Some("TCP") | Some("")
            )
        });
        if tcp && se.spec.addresses.is_empty() && !se.spec.ports.is_empty() {
            out.push(diag(
                Level::Warning,
                "IST0134",
                "ServiceEntry",
                se,
                "spec.addresses",
                "ServiceEntry addresses are required for this protocol.".into(),
            ));
        }
    }
}

/// A server host and the Gateway that exposes it.
type HostClaim<'a> = (String, &'a Resource<istio::Gateway>);

/// IST0145: two Gateways on the same workload selector and port claim the same host.
fn conflicting_gateways(config: &ConfigSet, out: &mut Vec<Diagnostic>) {
    let mut claims: BTreeMap<(String, u32), Vec<HostClaim>> = BTreeMap::new();
    for gw in &config.gateways {
        let selector = gw
            .spec
            .selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        for s in &gw.spec.servers {
            let port = s.port.number;
            for h in &s.hosts {
                let host = h
                    .rsplit_once('/')
                    .map_or(h.as_str(), |(_, host)| host)
                    .to_string();
                claims
                    .entry((selector.clone(), port))
                    .or_default()
                    .push((host, gw));
            }
        }
    }
    for ((selector, port), list) in claims {
        for (i, (h1, g1)) in list.iter().enumerate() {
            for (h2, g2) in &list[i + 1..] {
                if g1.meta.key() != g2.meta.key() && (host_matches(h1, h2) || host_matches(h2, h1))
                {
                    out.push(diag(
                        Level::Error,
                        "IST0145",
                        "Gateway",
                        g2,
                        "spec.servers",
                        format!(
                            "Conflict with gateways {} (workload selector {selector}, port {port}, hosts {h2}).",
                            g1.meta.key()
                        ),
                    ));
                }
            }
        }
    }
}

/// IST0123: several Sidecars without workloadSelector in one namespace; IST0110: several
/// Sidecars selecting one Pod. Istio then picks one by age, steerd by name: which
/// `outboundTrafficPolicy` applies is not what either author may expect.
fn sidecar_selection(config: &ConfigSet, out: &mut Vec<Diagnostic>) {
    let sidecars = super::egress::ordered(&config.sidecars);
    let mut defaults: BTreeMap<&str, Vec<&Resource<istio::Sidecar>>> = BTreeMap::new();
    for s in sidecars
        .iter()
        .filter(|s| s.spec.workload_selector.is_none())
    {
        defaults.entry(&s.meta.namespace).or_default().push(s);
    }
    for (ns, list) in defaults.into_iter().filter(|(_, l)| l.len() > 1) {
        let names: Vec<String> = list.iter().map(|s| s.meta.key()).collect();
        for s in &list {
            out.push(diag(
                Level::Error,
                "IST0123",
                "Sidecar",
                s,
                "spec.workloadSelector",
                format!(
                    "The Sidecars {names:?} in namespace {ns:?} have no workload selector, which can lead to undefined behavior."
                ),
            ));
        }
    }
    for pod in &config.pods {
        let selecting: Vec<&&Resource<istio::Sidecar>> = sidecars
            .iter()
            .filter(|s| {
                s.meta.namespace == pod.meta.namespace
                    && s.spec.workload_selector.as_ref().is_some_and(|sel| {
                        sel.labels
                            .iter()
                            .all(|(k, v)| pod.meta.labels.get(k) == Some(v))
                    })
            })
            .collect();
        if selecting.len() > 1 {
            let names: Vec<String> = selecting.iter().map(|s| s.meta.key()).collect();
            for s in selecting {
                out.push(diag(
                    Level::Error,
                    "IST0110",
                    "Sidecar",
                    s,
                    "spec.workloadSelector",
                    format!(
                        "The Sidecars {names:?} in namespace {:?} select the same workload pod {:?}, which can lead to undefined behavior.",
                        pod.meta.namespace, pod.meta.name
                    ),
                ));
            }
        }
    }
}

/// IST0130/IST0131: http rules after a catch-all are never used; a match block identical to an
/// earlier one never matches anything new.
fn unreachable_rules(config: &ConfigSet, out: &mut Vec<Diagnostic>) {
    for vs in &config.virtual_services {
        let mut catch_all: Option<usize> = None;
        // First (rule, match) of each distinct match block; a map keeps huge rule lists linear.
        let mut seen: HashMap<String, (usize, usize)> = HashMap::new();
        for (i, r) in vs.spec.http.iter().enumerate() {
            if let Some(c) = catch_all {
                out.push(diag(
                    Level::Warning,
                    "IST0130",
                    "VirtualService",
                    vs,
                    &format!("spec.http[{i}]"),
                    format!("VirtualService rule #{i} not used (only the last rule can have no matches; rule #{c} matches everything)."),
                ));
                continue;
            }
            if r.matches.is_empty() {
                catch_all = Some(i);
                continue;
            }
            for (j, m) in r.matches.iter().enumerate() {
                let key = serde_json::to_string(m).unwrap_or_default();
                if let Some(&(pi, pj)) = seen.get(&key) {
                    out.push(diag(
                        Level::Warning,
                        "IST0131",
                        "VirtualService",
                        vs,
                        &format!("spec.http[{i}].match[{j}]"),
                        format!("VirtualService rule #{i} match #{j} is not used (duplicate of rule #{pi} match #{pj})."),
                    ));
                } else {
                    seen.insert(key, (i, j));
                }
            }
        }
    }
}

/// istioctl's one-line form: `Error [IST0101] (VirtualService ns/name file.yaml:12) message`.
pub fn render(d: &Diagnostic) -> String {
    let code = d
        .code
        .as_deref()
        .map(|c| format!(" [{c}]"))
        .unwrap_or_default();
    // Istio's coded messages say what they are about; steerd's own findings name the field.
    let field = if d.code.is_none() && d.field != "-" {
        format!("{}: ", d.field)
    } else {
        String::new()
    };
    format!(
        "{}{code} ({} {} {}) {field}{}",
        d.level, d.kind, d.object, d.origin, d.message
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_documents;

    fn load(texts: &[(&str, String)]) -> ConfigSet {
        let mut cfg = ConfigSet::default();
        for (name, t) in texts {
            let (objs, errs) = parse_documents(name, t);
            assert!(errs.is_empty(), "{errs:?}");
            cfg.extend(objs);
        }
        cfg
    }

    fn sample(p: &str) -> (&'static str, String) {
        let path = format!(
            "{}/../../shared/istio/samples/{p}",
            env!("CARGO_MANIFEST_DIR")
        );
        (
            "sample.yaml",
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}")),
        )
    }

    fn codes(cfg: &ConfigSet) -> Vec<String> {
        analyze(cfg)
            .iter()
            .map(|d| format!("{} {}", d.level, d.code.clone().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn bookinfo_sets_check_clean() {
        let routing = std::fs::read_dir(format!(
            "{}/../../shared/istio/samples/bookinfo/networking",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        for entry in routing {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if !name.starts_with("virtual-service") {
                continue;
            }
            let cfg = load(&[
                sample("bookinfo/platform/kube/bookinfo.yaml"),
                sample("bookinfo/networking/destination-rule-all.yaml"),
                sample(&format!("bookinfo/networking/{name}")),
            ]);
            let errors: Vec<String> = analyze(&cfg)
                .iter()
                .filter(|d| d.level == Level::Error)
                .map(render)
                .collect();
            assert!(errors.is_empty(), "{name}: {errors:#?}");
        }
    }

    #[test]
    fn gateway_and_tcp_echo_samples_check_clean() {
        for set in [
            vec![
                "bookinfo/platform/kube/bookinfo.yaml",
                "bookinfo/networking/bookinfo-gateway.yaml",
            ],
            vec![
                "tcp-echo/tcp-echo-services.yaml",
                "tcp-echo/tcp-echo-all-v1.yaml",
            ],
            vec!["httpbin/httpbin.yaml", "httpbin/httpbin-gateway.yaml"],
            vec![
                "helloworld/helloworld.yaml",
                "helloworld/helloworld-gateway.yaml",
            ],
        ] {
            let cfg = load(&set.iter().map(|p| sample(p)).collect::<Vec<_>>());
            let errors: Vec<String> = analyze(&cfg)
                .iter()
                .filter(|d| d.level == Level::Error)
                .map(render)
                .collect();
            assert!(errors.is_empty(), "{set:?}: {errors:#?}");
        }
    }

    #[test]
    fn missing_gateway_and_conflicting_mesh_hosts() {
        let vs = |name: &str, gw: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}}}\nspec:\n  hosts: [reviews]\n  gateways: [{gw}]\n  http:\n  - route: [{{destination: {{host: reviews}}}}]\n"
            )
        };
        let cfg = load(&[
            ("a.yaml", vs("a", "mesh")),
            ("b.yaml", vs("b", "mesh")),
            ("c.yaml", vs("c", "nowhere")),
        ]);
        let found = codes(&cfg);
        assert!(found.contains(&"Error IST0109".to_string()), "{found:?}");
        assert!(found.contains(&"Error IST0101".to_string()), "{found:?}");
        let d = analyze(&cfg)
            .into_iter()
            .find(|d| d.code.as_deref() == Some("IST0101") && d.object == "default/c")
            .unwrap();
        assert_eq!(
            render(&d),
            "Error [IST0101] (VirtualService default/c c.yaml:1) Referenced gateway not found: \"nowhere\""
        );
    }

    #[test]
    fn destination_port_required_for_multi_port_services() {
        let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: echo}\nspec:\n  hosts: [tcp-echo]\n  tcp:\n  - route: [{destination: {host: tcp-echo}}]\n".to_string();
        let cfg = load(&[sample("tcp-echo/tcp-echo-services.yaml"), ("vs.yaml", vs)]);
        assert!(codes(&cfg).contains(&"Error IST0112".to_string()));
    }

    #[test]
    fn unreachable_and_ineffective_rules() {
        let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [r.example.com]\n  http:\n  - match: [{uri: {prefix: /a}}]\n    route: [{destination: {host: r.example.com}}]\n  - match: [{uri: {prefix: /a}}]\n    route: [{destination: {host: r.example.com}}]\n  - route: [{destination: {host: r.example.com}}]\n  - route: [{destination: {host: r.example.com}}]\n".to_string();
        let found = codes(&load(&[("vs.yaml", vs)]));
        assert!(found.contains(&"Warning IST0130".to_string()), "{found:?}");
        assert!(found.contains(&"Warning IST0131".to_string()), "{found:?}");
    }

    #[test]
    fn sidecars_competing_for_a_workload_or_a_namespace() {
        let sc = |name: &str, sel: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: {name}, namespace: a}}\nspec: {{{sel}outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}}}\n---\n"
            )
        };
        let text = sc("d1", "")
            + &sc("d2", "")
            + &sc("w1", "workloadSelector: {labels: {app: web}}, ")
            + &sc("w2", "workloadSelector: {labels: {app: web}}, ")
            + "apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: a, labels: {app: web}}\n";
        let found = codes(&load(&[("sc.yaml", text)]));
        assert_eq!(
            found.iter().filter(|c| *c == "Error IST0123").count(),
            2,
            "{found:?}"
        );
        assert_eq!(
            found.iter().filter(|c| *c == "Error IST0110").count(),
            2,
            "{found:?}"
        );
    }

    #[test]
    fn conflicting_gateways_and_hosts_missing_from_a_gateway() {
        let gw = |name: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: {name}}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n  - port: {{number: 80, name: http, protocol: HTTP}}\n    hosts: [\"*.example.com\"]\n"
            )
        };
        let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec:\n  hosts: [other.org]\n  gateways: [g1]\n  http:\n  - route: [{destination: {host: other.org}}]\n".to_string();
        let found = codes(&load(&[
            ("g1.yaml", gw("g1")),
            ("g2.yaml", gw("g2")),
            ("vs.yaml", vs),
        ]));
        assert!(found.contains(&"Error IST0145".to_string()), "{found:?}");
        assert!(found.contains(&"Warning IST0132".to_string()), "{found:?}");
    }

    #[test]
    fn service_entry_without_addresses_for_tcp() {
        let se = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db}\nspec:\n  hosts: [db.example.com]\n  ports: [{number: 5432, name: pg, protocol: TCP}]\n  resolution: DNS\n".to_string();
        assert!(codes(&load(&[("se.yaml", se)])).contains(&"Warning IST0134".to_string()));
    }

    #[test]
    fn schema_errors_are_ist0106() {
        let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [r]\n  http:\n  - route:\n    - destination: {host: r}\n      weight: -1\n".to_string();
        let d = analyze(&load(&[("vs.yaml", vs)]));
        assert!(
            d.iter()
                .any(|d| d.code.as_deref() == Some("IST0106") && d.level == Level::Error),
            "{d:?}"
        );
    }

    #[test]
    fn authorization_policies_are_validated_and_their_limits_reported() {
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/33], principals: [cluster.local/ns/a/sa/b]}\n".to_string();
        let rendered: Vec<String> = analyze(&load(&[("ap.yaml", text)]))
            .iter()
            .map(render)
            .collect();
        assert_eq!(
            rendered,
            [
                "Warning (AuthorizationPolicy shop/p ap.yaml:1) spec.rules[0].from[0].source.principals: principals needs mTLS or JWT authentication, which steerd does not have: this condition is ignored, so the rule matches more requests",
                "Error [IST0106] (AuthorizationPolicy shop/p ap.yaml:1) Schema validation error: spec.rules[0].from[0].source.ipBlocks[0]: bad CIDR range (10.0.0.0/33): bad bits after slash: \"33\" (0 to 32)",
            ]
        );
    }
}
