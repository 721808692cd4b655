//! `steerd explain`: where one request goes, evaluated exactly as the agent routes it.
//!
//! HTTP requests go through the same compiled [`HttpRoutes`] and the same
//! [`HttpRoutes::select`] the L7 proxy uses; TCP connections through the same route selection
//! the kernel tables are built from. Only the presentation is specific to explain.

use super::http::{self, HttpRoutes, RequestView, RouteAction};
use super::registry::{self, Transport, resolve_host};
use super::{Ctx, Diagnostic, cluster_name, destination_rule_index, gateway_ref, subset_index};
use crate::model::ConfigSet;
use crate::model::istio::MESH_GATEWAY;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The request to explain.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Host (short name, FQDN or service IP) as the client addresses it.
    pub host: String,
    pub port: Option<u16>,
    /// Namespace for short host names.
    pub namespace: String,
    /// `Some` for an HTTP request; `None` explains the TCP connection (unless the port is HTTP).
    pub path: Option<String>,
    pub method: Option<String>,
    pub headers: Vec<(String, String)>,
    pub query: Vec<(String, String)>,
    pub source_labels: BTreeMap<String, String>,
    /// `mesh` (default) or a Gateway as `name` / `ns/name`.
    pub gateway: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("host {0:?} is not a Service or ServiceEntry host in this configuration")]
    UnknownHost(String),
    #[error("{host} has several ports ({ports}); pass one with --to {host}:PORT")]
    AmbiguousPort { host: String, ports: String },
    #[error("{host} has no port {port} (ports: {ports})")]
    UnknownPort {
        host: String,
        port: u16,
        ports: String,
    },
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRef {
    /// Index in `spec.http` (or `spec.tcp`/`spec.tls`).
    pub index: usize,
    pub name: Option<String>,
    /// `http`, `tcp`, `tls`, or `default` (no VirtualService rule).
    pub kind: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationView {
    pub cluster: String,
    pub host: String,
    pub subset: Option<String>,
    pub port: u16,
    /// Route weight (relative, as written) for HTTP; share of connections (percent) for TCP.
    pub weight: f64,
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub host: String,
    pub port: u16,
    /// `http` or `tcp`.
    pub protocol: String,
    pub gateway: String,
    pub virtual_service: Option<String>,
    /// The rule that matched (None: no rule matched — Envoy answers 404).
    pub route: Option<RouteRef>,
    /// Match blocks of the rule, as text.
    pub matched: Vec<String>,
    /// `route`, `redirect N to ...`, `direct response N`, or `404 route not found`.
    pub action: String,
    pub destinations: Vec<DestinationView>,
    pub mirrors: Vec<DestinationView>,
    pub timeout: Option<String>,
    pub retries: Option<String>,
    pub fault: Option<String>,
    pub rewrite: Option<String>,
    /// Findings of the compiler about the objects involved.
    pub diagnostics: Vec<String>,
}

fn ms(d: std::time::Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn cluster_view(c: &http::Cluster, weight: f64) -> DestinationView {
    DestinationView {
        cluster: c.name.clone(),
        host: c.host.clone(),
        subset: c.subset.clone(),
        port: c.port,
        weight,
        endpoints: c.endpoints.iter().map(|e| e.addr.to_string()).collect(),
    }
}

/// Explains one request or connection.
pub fn explain(config: &ConfigSet, q: &Query) -> Result<Explanation, ExplainError> {
    let mut diags: Vec<Diagnostic> = Vec::new();
    let registry = registry::build(config, &mut diags);
    let namespace = if q.namespace.is_empty() {
        "default"
    } else {
        &q.namespace
    };
    let host = match q.host.parse::<IpAddr>() {
        Ok(ip) => registry
            .services
            .values()
            .find(|s| s.vips.contains(&ip))
            .map(|s| s.hostname.clone())
            .ok_or_else(|| ExplainError::UnknownHost(q.host.clone()))?,
        Err(_) => resolve_host(&q.host, namespace),
    };
    let svc = registry
        .services
        .get(&host)
        .ok_or_else(|| ExplainError::UnknownHost(q.host.clone()))?;
    let ports = || {
        svc.ports
            .iter()
            .map(|p| p.port.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let port = match q.port {
        Some(p) => svc
            .ports
            .iter()
            .find(|sp| sp.port == p && sp.transport == Transport::Tcp)
            .ok_or_else(|| ExplainError::UnknownPort {
                host: host.clone(),
                port: p,
                ports: ports(),
            })?,
        None => match svc.ports.as_slice() {
            [only] => only,
            _ => {
                return Err(ExplainError::AmbiguousPort {
                    host: host.clone(),
                    ports: ports(),
                });
            }
        },
    };
    let gateway = match q.gateway.as_deref() {
        None | Some("mesh") => MESH_GATEWAY.to_string(),
        Some(g) => gateway_ref(g, namespace),
    };
    let mut ctx = Ctx {
        config,
        registry: &registry,
        diags: &mut diags,
        subsets: subset_index(config),
        destination_rules: destination_rule_index(config),
    };
    let vs = ctx.virtual_service_for_gateway(&host, &gateway);
    let is_http_port = matches!(
        port.protocol.as_deref(),
        Some("HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" | "H2C")
    );
    let wants_http =
        q.path.is_some() || q.method.is_some() || !q.headers.is_empty() || is_http_port;
    let has_tcp_rules = vs.is_some_and(|v| !v.spec.tcp.is_empty() || !v.spec.tls.is_empty());
    let mut out = Explanation {
        host: host.clone(),
        port: port.port,
        protocol: String::new(),
        gateway: gateway.clone(),
        virtual_service: vs.map(|v| v.meta.key()),
        route: None,
        matched: Vec::new(),
        action: String::new(),
        destinations: Vec::new(),
        mirrors: Vec::new(),
        timeout: None,
        retries: None,
        fault: None,
        rewrite: None,
        diagnostics: Vec::new(),
    };
    if wants_http && !(has_tcp_rules && !is_http_port && vs.is_some_and(|v| v.spec.http.is_empty()))
    {
        out.protocol = "http".into();
        let routes: HttpRoutes = ctx.http_routes(svc, port, vs);
        let path = q.path.clone().unwrap_or_else(|| "/".into());
        let query = q
            .query
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let authority = format!("{}:{}", q.host, port.port);
        let view = RequestView {
            method: q.method.as_deref().unwrap_or("GET"),
            scheme: "http",
            authority: &authority,
            path: &path,
            query: &query,
            headers: std::borrow::Cow::Owned(header_map(&q.headers)),
            port: port.port,
            source_labels: (!q.source_labels.is_empty()).then_some(&q.source_labels),
            source_namespace: None,
            gateway: &gateway,
        };
        match routes.select(&view) {
            None => out.action = "404 route not found (no http rule matches)".into(),
            Some(rule) => {
                out.route = Some(RouteRef {
                    index: rule.index,
                    name: rule.name.clone(),
                    kind: if routes.virtual_service.is_some() {
                        "http".into()
                    } else {
                        "default".into()
                    },
                });
                out.matched = rule.describe_matches();
                match &rule.action {
                    RouteAction::Forward(dests) => {
                        out.action = "route".into();
                        out.destinations = dests
                            .iter()
                            .map(|d| cluster_view(&d.cluster, d.weight as f64))
                            .collect();
                    }
                    RouteAction::Redirect(r) => {
                        out.action = format!(
                            "redirect {} to {}{}",
                            r.code,
                            r.authority.as_deref().unwrap_or("<same host>"),
                            r.uri.as_deref().unwrap_or("<same path>")
                        );
                    }
                    RouteAction::DirectResponse { status, body } => {
                        out.action = format!(
                            "direct response {status}{}",
                            body.as_ref().map(|b| format!(" {b:?}")).unwrap_or_default()
                        );
                    }
                }
                out.mirrors = rule
                    .mirrors
                    .iter()
                    .map(|m| cluster_view(&m.cluster, m.percentage))
                    .collect();
                out.timeout = Some(rule.timeout.map_or("none".into(), ms));
                out.retries = Some(if rule.retries.attempts == 0 {
                    "none".into()
                } else {
                    format!(
                        "{} attempts on {}{}",
                        rule.retries.attempts,
                        rule.retries.retry_on.join(","),
                        rule.retries
                            .per_try_timeout
                            .map(|t| format!(", {} per try", ms(t)))
                            .unwrap_or_default()
                    )
                });
                out.fault = rule.fault.as_ref().map(|f| {
                    let mut parts = Vec::new();
                    if let Some((d, p)) = f.delay {
                        parts.push(format!("delay {} for {p}%", ms(d)));
                    }
                    if let Some((s, p)) = f.abort {
                        parts.push(format!("abort {s} for {p}%"));
                    }
                    parts.join(", ")
                });
                out.rewrite = rule.rewrite.as_ref().map(|rw| {
                    let new_path = http::rewrite_path(rw, http::matched_prefix(rule, &view), &path);
                    match &rw.authority {
                        Some(a) => format!("path {new_path}, authority {a}"),
                        None => format!("path {new_path}"),
                    }
                });
            }
        }
    } else {
        out.protocol = "tcp".into();
        let (route, backends, _) = ctx.route_port(svc, port, vs);
        let mut by_cluster: BTreeMap<String, (f64, Vec<String>)> = BTreeMap::new();
        let total: f64 = backends.iter().map(|b| b.weight).sum();
        for b in &backends {
            let names = if b.clusters.is_empty() {
                vec![cluster_name(port.port, None, &host)]
            } else {
                b.clusters.clone()
            };
            for n in names {
                let e = by_cluster.entry(n).or_default();
                e.0 += if total > 0.0 {
                    b.weight / total * 100.0
                } else {
                    0.0
                };
                e.1.push(b.addr.to_string());
            }
        }
        out.action = if backends.is_empty() {
            "reject (no endpoints)".into()
        } else {
            "connect".into()
        };
        out.route = Some(route_ref(&route));
        out.destinations = by_cluster
            .into_iter()
            .map(|(cluster, (weight, endpoints))| {
                let (subset, chost) = {
                    let mut p = cluster.splitn(4, '|');
                    let (_, _, s, h) = (
                        p.next(),
                        p.next(),
                        p.next().unwrap_or(""),
                        p.next().unwrap_or(""),
                    );
                    ((!s.is_empty()).then(|| s.to_string()), h.to_string())
                };
                DestinationView {
                    cluster,
                    host: chost,
                    subset,
                    port: port.port,
                    weight: (weight * 100.0).round() / 100.0,
                    endpoints,
                }
            })
            .collect();
    }
    diags.sort();
    diags.dedup();
    out.diagnostics = diags
        .iter()
        .filter(|d| {
            out.virtual_service.as_deref() == Some(d.object.as_str()) || d.object == svc.object
        })
        .map(|d| d.to_string())
        .collect();
    Ok(out)
}

/// Parses the compiler's route description (`VirtualService ns/name tcp[0]`, `default`).
fn route_ref(desc: &str) -> RouteRef {
    let tail = desc.rsplit(' ').next().unwrap_or("");
    let (kind, index) = match tail.split_once('[') {
        Some((k, i)) if desc.starts_with("VirtualService") => {
            (k.to_string(), i.trim_end_matches(']').parse().unwrap_or(0))
        }
        _ => ("default".to_string(), 0),
    };
    RouteRef {
        index,
        name: None,
        kind,
    }
}

/// The explanation as text.
pub fn render_text(e: &Explanation) -> String {
    let mut s = String::new();
    let line = |s: &mut String, t: String| {
        s.push_str(&t);
        s.push('\n');
    };
    line(
        &mut s,
        format!(
            "{} {}:{} via {}",
            e.protocol.to_uppercase(),
            e.host,
            e.port,
            e.gateway
        ),
    );
    line(
        &mut s,
        format!(
            "VirtualService: {}",
            e.virtual_service
                .as_deref()
                .unwrap_or("none (default route to the service)")
        ),
    );
    match &e.route {
        Some(r) => {
            let name = r
                .name
                .as_ref()
                .map(|n| format!(" {n:?}"))
                .unwrap_or_default();
            line(&mut s, format!("Route: {}[{}]{name}", r.kind, r.index));
            for m in &e.matched {
                line(&mut s, format!("  matched: {m}"));
            }
        }
        None => line(&mut s, "Route: none".into()),
    }
    line(&mut s, format!("Action: {}", e.action));
    if !e.destinations.is_empty() {
        line(&mut s, "Destinations:".into());
        for d in &e.destinations {
            let eps = if d.endpoints.is_empty() {
                "no endpoints (503)".to_string()
            } else {
                d.endpoints.join(", ")
            };
            line(
                &mut s,
                format!("  {}  weight {}  endpoints: {eps}", d.cluster, d.weight),
            );
        }
    }
    for m in &e.mirrors {
        line(
            &mut s,
            format!(
                "Mirror: {} ({}%) endpoints: {}",
                m.cluster,
                m.weight,
                m.endpoints.join(", ")
            ),
        );
    }
    for (label, v) in [
        ("Timeout", &e.timeout),
        ("Retries", &e.retries),
        ("Fault", &e.fault),
        ("Rewrite", &e.rewrite),
    ] {
        if let Some(v) = v {
            line(&mut s, format!("{label}: {v}"));
        }
    }
    for d in &e.diagnostics {
        line(&mut s, format!("Note: {d}"));
    }
    s
}

/// The request headers `--header` gives, as the proxy would receive them (a name or value no
/// client could send is left out, as the proxy never sees one).
fn header_map(headers: &[(String, String)]) -> ::http::HeaderMap {
    let mut map = ::http::HeaderMap::new();
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            ::http::HeaderName::from_bytes(name.as_bytes()),
            ::http::HeaderValue::from_str(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_documents;

    fn samples(paths: &[&str]) -> ConfigSet {
        let mut cfg = ConfigSet::default();
        for p in paths {
            let path = format!(
                "{}/../../shared/istio/samples/{p}",
                env!("CARGO_MANIFEST_DIR")
            );
            let text = std::fs::read_to_string(&path).unwrap();
            let (objs, errs) = parse_documents(&path, &text);
            assert!(errs.is_empty(), "{errs:?}");
            cfg.extend(objs);
        }
        cfg
    }

    fn bookinfo(routing: &str) -> ConfigSet {
        samples(&[
            "bookinfo/platform/kube/bookinfo.yaml",
            "bookinfo/networking/destination-rule-all.yaml",
            &format!("bookinfo/networking/{routing}"),
        ])
    }

    fn q(host: &str, headers: &[(&str, &str)]) -> Query {
        Query {
            host: host.into(),
            path: Some("/".into()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn jason_goes_to_v2_everyone_else_to_v3() {
        let cfg = bookinfo("virtual-service-reviews-jason-v2-v3.yaml");
        let e = explain(&cfg, &q("reviews", &[("end-user", "jason")])).unwrap();
        assert_eq!(e.virtual_service.as_deref(), Some("default/reviews"));
        assert_eq!(e.route.as_ref().unwrap().index, 0);
        assert_eq!(e.matched, vec!["header end-user exact \"jason\""]);
        assert_eq!(
            e.destinations[0].cluster,
            "outbound|9080|v2|reviews.default.svc.cluster.local"
        );
        assert_eq!(
            e.retries.as_deref(),
            Some(
                "2 attempts on connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
            )
        );
        let e = explain(&cfg, &q("reviews.default.svc.cluster.local", &[])).unwrap();
        assert_eq!(e.route.as_ref().unwrap().index, 1);
        assert_eq!(e.destinations[0].subset.as_deref(), Some("v3"));
        let json = serde_json::to_value(&e).unwrap();
        for key in [
            "virtualService",
            "route",
            "destinations",
            "mirrors",
            "timeout",
            "retries",
            "fault",
            "rewrite",
        ] {
            assert!(json.get(key).is_some(), "{key} missing: {json:#}");
        }
    }

    #[test]
    fn weighted_destinations_fault_and_timeout() {
        let e = explain(
            &bookinfo("virtual-service-reviews-90-10.yaml"),
            &q("reviews", &[]),
        )
        .unwrap();
        let w: Vec<_> = e
            .destinations
            .iter()
            .map(|d| (d.subset.clone().unwrap(), d.weight))
            .collect();
        assert_eq!(w, vec![("v1".to_string(), 90.0), ("v2".to_string(), 10.0)]);
        let e = explain(
            &bookinfo("virtual-service-ratings-test-abort.yaml"),
            &q("ratings", &[("end-user", "jason")]),
        )
        .unwrap();
        assert_eq!(e.fault.as_deref(), Some("abort 500 for 100%"));
        assert_eq!(
            e.retries.as_deref(),
            Some(
                "2 attempts on connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
            )
        );
    }

    #[test]
    fn no_virtual_service_is_the_default_route() {
        let cfg = samples(&["bookinfo/platform/kube/bookinfo.yaml"]);
        let e = explain(&cfg, &q("details", &[])).unwrap();
        assert_eq!(e.virtual_service, None);
        assert_eq!(e.route.as_ref().unwrap().kind, "default");
        assert_eq!(
            e.destinations[0].cluster,
            "outbound|9080||details.default.svc.cluster.local"
        );
        assert_eq!(e.timeout.as_deref(), Some("none"));
    }

    #[test]
    fn gateway_bound_rules_only_apply_at_that_gateway() {
        let cfg = samples(&[
            "bookinfo/platform/kube/bookinfo.yaml",
            "bookinfo/networking/bookinfo-gateway.yaml",
        ]);
        let mut query = q("productpage", &[]);
        query.path = Some("/productpage".into());
        let mesh = explain(&cfg, &query).unwrap();
        assert_eq!(
            mesh.virtual_service, None,
            "the gateway's VirtualService does not bind mesh traffic"
        );
        query.gateway = Some("bookinfo-gateway".into());
        query.host = "productpage".into();
        // The sample's VirtualService has hosts ["*"], so it covers productpage at the gateway.
        let gw = explain(&cfg, &query).unwrap();
        assert_eq!(gw.virtual_service.as_deref(), Some("default/bookinfo"));
        assert_eq!(
            gw.destinations[0].host,
            "productpage.default.svc.cluster.local"
        );
        query.path = Some("/nope".into());
        assert_eq!(
            explain(&cfg, &query).unwrap().action,
            "404 route not found (no http rule matches)"
        );
    }

    #[test]
    fn tcp_connections_explain_the_l4_pick() {
        let services = std::fs::read_to_string(format!(
            "{}/../../shared/istio/samples/tcp-echo/tcp-echo-services.yaml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let route = std::fs::read_to_string(format!(
            "{}/../../shared/istio/samples/tcp-echo/tcp-echo-20-v2.yaml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
        .replace(
            "  - \"*\"\n  gateways:\n  - tcp-echo-gateway",
            "  - tcp-echo\n  gateways:\n  - mesh",
        )
        .replace("port: 31400", "port: 9000");
        let dr = std::fs::read_to_string(format!(
            "{}/../../shared/istio/samples/tcp-echo/tcp-echo-all-v1.yaml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let pods = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: tcp-echo, version: v1}}\nstatus: {podIP: 10.0.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, labels: {app: tcp-echo, version: v2}}\nstatus: {podIP: 10.0.0.2}\n";
        let mut cfg = ConfigSet::default();
        for (n, t) in [
            ("s", services.as_str()),
            ("r", &route),
            ("d", &dr),
            ("p", pods),
        ] {
            let (objs, errs) = parse_documents(n, t);
            assert!(errs.is_empty(), "{errs:?}");
            cfg.extend(objs);
        }
        let e = explain(
            &cfg,
            &Query {
                host: "tcp-echo".into(),
                port: Some(9000),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(e.protocol, "tcp");
        let w: Vec<_> = e
            .destinations
            .iter()
            .map(|d| (d.cluster.clone(), d.weight, d.endpoints.clone()))
            .collect();
        assert_eq!(
            w,
            vec![
                (
                    "outbound|9000|v1|tcp-echo.default.svc.cluster.local".to_string(),
                    80.0,
                    vec!["10.0.0.1:9000".to_string()]
                ),
                (
                    "outbound|9000|v2|tcp-echo.default.svc.cluster.local".to_string(),
                    20.0,
                    vec!["10.0.0.2:9000".to_string()]
                ),
            ]
        );
        assert_eq!(
            explain(
                &cfg,
                &Query {
                    host: "tcp-echo".into(),
                    ..Default::default()
                }
            )
            .unwrap_err(),
            ExplainError::AmbiguousPort {
                host: "tcp-echo.default.svc.cluster.local".into(),
                ports: "9000, 9001".into()
            }
        );
        assert!(matches!(
            explain(
                &cfg,
                &Query {
                    host: "nope".into(),
                    ..Default::default()
                }
            ),
            Err(ExplainError::UnknownHost(_))
        ));
    }
}
