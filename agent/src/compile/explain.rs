//! `steerd explain`: where one request goes, evaluated exactly as the agent routes it.
//!
//! HTTP requests go through the same compiled [`HttpRoutes`] and the same
//! [`HttpRoutes::select`] the L7 proxy uses; TCP connections through the same route selection
//! the kernel tables are built from. Only the presentation is specific to explain.

use super::authz::{self, HttpAttributes};
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
    /// The client's address: AuthorizationPolicies' `ipBlocks`, and (when it is a Pod's) the
    /// client's namespace and labels.
    pub source_ip: Option<IpAddr>,
    /// The client's namespace, when not known from `source_ip`.
    pub source_namespace: Option<String>,
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
    /// For a rule of a delegate VirtualService: `ns/name http[i]` (`index` is then the
    /// delegating route's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delegate: Option<String>,
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
    /// DestinationRule `tls` origination (HTTP destinations), described.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
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
    /// What the rule's `corsPolicy` does with the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors: Option<String>,
    /// What the AuthorizationPolicies of each destination endpoint decide.
    pub authorization: Vec<AuthorizationView>,
    /// Findings of the compiler about the objects involved.
    pub diagnostics: Vec<String>,
    /// The client Pod's outbound traffic policy (`--source-pod`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound: Option<super::egress::PodOutbound>,
}

/// The authorization decision at one destination endpoint.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationView {
    pub endpoint: String,
    /// `namespace/name` of the Pod or WorkloadEntry.
    pub workload: Option<String>,
    pub decision: authz::Decision,
    /// Policies that apply but are not enforced (dry-run, AUDIT), with what they would decide.
    pub not_enforced: Vec<String>,
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
        tls: c.policy.tls.as_ref().map(|t| t.describe()),
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
        vs_hosts: Default::default(),
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
        cors: None,
        authorization: Vec::new(),
        diagnostics: Vec::new(),
        outbound: None,
    };
    let plan = super::compile(config);
    let source_ip = q.source_ip.map(|ip| ip.to_canonical());
    // Routing knows every Pod's namespace (as the proxy's `sourceNamespace` matches do);
    // authorization only those of Pods with their own address (no host-network Pods).
    let source_namespace = q.source_namespace.clone().or_else(|| {
        source_ip
            .and_then(|ip| plan.sources.get(&ip))
            .map(|s| s.workload.namespace.to_string())
    });
    let authz_namespace = q
        .source_namespace
        .clone()
        .or_else(|| source_ip.and_then(|ip| plan.authz.namespace_of(ip).map(str::to_string)));
    let source_labels = if q.source_labels.is_empty() {
        source_ip
            .and_then(|ip| plan.sources.get(&ip))
            .map(|s| s.labels.clone())
            .unwrap_or_default()
    } else {
        q.source_labels.clone().into()
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
            source_labels: (!source_labels.is_empty()).then_some(&source_labels),
            source_namespace: source_namespace.as_deref(),
            gateway: &gateway,
        };
        match routes.select(&view) {
            None => out.action = "404 route not found (no http rule matches)".into(),
            Some(rule) => {
                out.route = Some(RouteRef {
                    index: rule.index,
                    name: rule.name.clone(),
                    delegate: rule
                        .delegate
                        .as_ref()
                        .map(|d| format!("{} http[{}]", d.virtual_service, d.index)),
                    kind: if routes.virtual_service.is_some() {
                        "http".into()
                    } else {
                        "default".into()
                    },
                });
                out.matched = rule.describe_matches();
                let cors = rule.cors.as_ref().map(|c| c.evaluate(&view));
                if let (Some(policy), Some(decision)) = (&rule.cors, &cors) {
                    out.cors = Some(format!(
                        "allow origins [{}]: {decision}",
                        policy.describe_origins().join(", ")
                    ));
                }
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
                if let Some(http::CorsDecision::Preflight { .. }) = cors {
                    out.action = "CORS preflight answered 200 by the proxy (not forwarded)".into();
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
                // The destination sees the request after rewrites and header changes.
                let upstream_path = match &rule.rewrite {
                    Some(rw) => http::rewrite_path(rw, http::matched_prefix(rule, &view), &path),
                    None => path.clone(),
                };
                let upstream_authority = rule
                    .rewrite
                    .as_ref()
                    .and_then(|r| r.authority.clone())
                    .unwrap_or_else(|| authority.clone());
                if let RouteAction::Forward(dests) = &rule.action {
                    for d in dests {
                        let mut headers: Vec<(String, String)> = view
                            .headers
                            .iter()
                            .filter_map(|(k, v)| {
                                Some((k.as_str().to_string(), v.to_str().ok()?.to_string()))
                            })
                            .collect();
                        for ops in [&rule.headers_request, &d.headers_request] {
                            headers.retain(|(k, _)| {
                                !ops.remove.iter().any(|r| r.eq_ignore_ascii_case(k))
                                    && !ops.set.iter().any(|(s, _)| s.eq_ignore_ascii_case(k))
                            });
                            headers.extend(
                                ops.set
                                    .iter()
                                    .chain(&ops.add)
                                    .map(|(k, v)| (k.to_ascii_lowercase(), v.clone())),
                            );
                        }
                        let endpoints: Vec<std::net::SocketAddr> =
                            d.cluster.endpoints.iter().map(|e| e.addr).collect();
                        out.authorization.extend(authorize(
                            &plan.authz,
                            &endpoints,
                            source_ip,
                            authz_namespace.as_deref(),
                            Some(HttpAttributes {
                                method: view.method,
                                host: &upstream_authority,
                                path: &upstream_path,
                                headers: &headers,
                            }),
                        ));
                    }
                }
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
                b.clusters.iter().map(|c| c.to_string()).collect()
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
        let endpoints: Vec<std::net::SocketAddr> = backends.iter().map(|b| b.addr).collect();
        out.authorization = authorize(
            &plan.authz,
            &endpoints,
            source_ip,
            authz_namespace.as_deref(),
            None,
        );
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
                    tls: None,
                }
            })
            .collect();
    }
    let delegates: Vec<String> = vs
        .map(super::delegate::delegate_keys)
        .unwrap_or_default()
        .into_iter()
        .map(|(ns, name)| format!("{ns}/{name}"))
        .collect();
    diags.sort();
    diags.dedup();
    out.diagnostics = diags
        .iter()
        .filter(|d| {
            out.virtual_service.as_deref() == Some(d.object.as_str())
                || d.object == svc.object
                || (d.kind == "VirtualService" && delegates.contains(&d.object))
        })
        .map(|d| d.to_string())
        .collect();
    Ok(out)
}

/// The decision at each endpoint (once per endpoint) for a client at `source` (unknown: the
/// unspecified address, which no `ipBlocks` short of `0.0.0.0/0` contains).
fn authorize(
    plan: &authz::AuthzPlan,
    endpoints: &[std::net::SocketAddr],
    source: Option<IpAddr>,
    source_namespace: Option<&str>,
    http: Option<HttpAttributes<'_>>,
) -> Vec<AuthorizationView> {
    let mut seen = std::collections::BTreeSet::new();
    endpoints
        .iter()
        .filter(|e| seen.insert(**e))
        .map(|endpoint| {
            let source = source.unwrap_or(if endpoint.is_ipv4() {
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            });
            let req = authz::Request {
                source,
                source_namespace,
                destination: *endpoint,
                http,
            };
            let not_enforced = plan
                .policies_for(endpoint.ip())
                .filter_map(|p| {
                    let why = p.not_enforced.as_deref()?;
                    let enforced = authz::Policy {
                        not_enforced: None,
                        ..p.clone()
                    };
                    let d = authz::decide_policies(std::iter::once(&enforced), &req);
                    Some(format!("{} ({why}): would {d}", p.name))
                })
                .collect();
            AuthorizationView {
                endpoint: endpoint.to_string(),
                workload: plan
                    .workloads
                    .get(&endpoint.ip().to_canonical())
                    .map(|w| w.workload.clone()),
                decision: plan.decide(&req),
                not_enforced,
            }
        })
        .collect()
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
        delegate: None,
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
            let delegate = r
                .delegate
                .as_ref()
                .map(|d| format!(", delegated to VirtualService {d}"))
                .unwrap_or_default();
            line(
                &mut s,
                format!("Route: {}[{}]{name}{delegate}", r.kind, r.index),
            );
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
            if let Some(tls) = &d.tls {
                line(&mut s, format!("    TLS origination: {tls}"));
            }
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
        ("CORS", &e.cors),
    ] {
        if let Some(v) = v {
            line(&mut s, format!("{label}: {v}"));
        }
    }
    if !e.authorization.is_empty() {
        line(&mut s, "Authorization:".into());
        for a in &e.authorization {
            let workload = a
                .workload
                .as_deref()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default();
            line(
                &mut s,
                format!("  {}{workload}  {}", a.endpoint, a.decision),
            );
            for n in &a.not_enforced {
                line(&mut s, format!("    not enforced: {n}"));
            }
        }
    }
    if let Some(o) = &e.outbound {
        line(&mut s, format!("Client: {o}"));
    }
    for d in &e.diagnostics {
        line(&mut s, format!("Note: {d}"));
    }
    s
}

/// The request headers `--header` gives, as the proxy would receive them (a name or value no
/// client could send is left out, as the proxy never sees one).
pub(crate) fn header_map(headers: &[(String, String)]) -> ::http::HeaderMap {
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
    fn cors_preflights_and_allowed_origins() {
        let mut cfg = samples(&["bookinfo/platform/kube/bookinfo.yaml"]);
        let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings}\nspec:\n  hosts: [ratings]\n  http:\n  - corsPolicy:\n      allowOrigins: [{exact: 'https://a.example'}]\n      allowMethods: [GET, POST]\n      maxAge: 1m\n    route: [{destination: {host: ratings}}]\n";
        let (objs, errs) = parse_documents("vs.yaml", vs);
        assert!(errs.is_empty(), "{errs:?}");
        cfg.extend(objs);
        let mut query = q(
            "ratings",
            &[
                ("origin", "https://a.example"),
                ("access-control-request-method", "POST"),
            ],
        );
        query.method = Some("OPTIONS".into());
        let e = explain(&cfg, &query).unwrap();
        assert_eq!(
            e.action,
            "CORS preflight answered 200 by the proxy (not forwarded)"
        );
        assert_eq!(
            e.cors.as_deref(),
            Some(
                "allow origins [exact \"https://a.example\"]: preflight answered 200 by the proxy (access-control-allow-origin: https://a.example, access-control-allow-methods: GET,POST, access-control-max-age: 60)"
            )
        );
        let e = explain(&cfg, &q("ratings", &[("origin", "https://a.example")])).unwrap();
        assert_eq!(e.action, "route");
        assert_eq!(
            e.cors.as_deref(),
            Some(
                "allow origins [exact \"https://a.example\"]: origin allowed; the response gets access-control-allow-origin: https://a.example"
            )
        );
        query.headers[0].1 = "https://evil.example".into();
        let e = explain(&cfg, &query).unwrap();
        assert_eq!(e.action, "route", "forwarded (unmatchedPreflights FORWARD)");
        assert!(
            e.cors
                .unwrap()
                .ends_with("origin not allowed: forwarded without CORS headers")
        );
    }

    #[test]
    fn delegated_rules_name_their_delegate() {
        let mut cfg = bookinfo("virtual-service-reviews-v3.yaml");
        let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - match: [{uri: {prefix: /r}}]\n    delegate: {name: split}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: split}\nspec:\n  http:\n  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n";
        cfg.virtual_services.clear();
        let (objs, errs) = parse_documents("vs.yaml", vs);
        assert!(errs.is_empty(), "{errs:?}");
        cfg.extend(objs);
        let mut query = q("reviews", &[("end-user", "jason")]);
        query.path = Some("/r/1".into());
        let e = explain(&cfg, &query).unwrap();
        let route = e.route.as_ref().unwrap();
        assert_eq!(route.delegate.as_deref(), Some("default/split http[0]"));
        assert_eq!(e.destinations[0].subset.as_deref(), Some("v2"));
        assert!(
            render_text(&e)
                .contains("Route: http[0], delegated to VirtualService default/split http[0]"),
            "{}",
            render_text(&e)
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

    #[test]
    fn authorization_decisions_per_endpoint() {
        let text = "\
apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.9, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}, {name: tcp-db, port: 5432}]}\n---
apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop, labels: {app: web}}\nstatus: {podIP: 10.0.1.1}\n---
apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: shop, labels: {app: client}}\nstatus: {podIP: 10.0.2.1}\n---
apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [\"/admin*\"], ports: [\"8080\"]}}]\n  - from: [{source: {ipBlocks: [10.0.9.0/24]}}]\n---
apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: dry, namespace: shop, annotations: {istio.io/dry-run: \"true\"}}\nspec:\n  action: DENY\n  rules: [{from: [{source: {namespaces: [shop]}}]}]\n";
        let (objs, errs) = parse_documents("w.yaml", text);
        assert!(errs.is_empty(), "{errs:?}");
        let mut cfg = ConfigSet::default();
        cfg.extend(objs);
        let query = |path: &str, port: u16, source: &str| Query {
            host: "web".into(),
            namespace: "shop".into(),
            port: Some(port),
            path: (!path.is_empty()).then(|| path.to_string()),
            source_ip: Some(source.parse().unwrap()),
            ..Default::default()
        };
        let e = explain(&cfg, &query("/admin/users", 80, "10.0.2.1")).unwrap();
        assert_eq!(e.authorization.len(), 1, "{e:#?}");
        let a = &e.authorization[0];
        assert_eq!(a.endpoint, "10.0.1.1:8080");
        assert_eq!(a.workload.as_deref(), Some("shop/web-1"));
        assert!(!a.decision.allowed);
        assert_eq!(a.decision.rule.as_deref(), Some("spec.rules[0]"));
        assert_eq!(
            a.not_enforced,
            ["shop/dry (dry-run): would DENY: DENY policy shop/dry spec.rules[0] matches"]
        );
        let text = render_text(&e);
        assert!(
            text.contains("Authorization:\n  10.0.1.1:8080 (shop/web-1)  DENY: DENY policy shop/no-admin spec.rules[0] matches\n"),
            "{text}"
        );
        assert!(
            explain(&cfg, &query("/", 80, "10.0.2.1"))
                .unwrap()
                .authorization[0]
                .decision
                .allowed
        );
        // A TCP connection: the HTTP-only rule does not apply to port 5432, the source rule does.
        let tcp = explain(&cfg, &query("", 5432, "10.0.2.1")).unwrap();
        assert_eq!(tcp.protocol, "tcp");
        assert!(tcp.authorization[0].decision.allowed, "{tcp:#?}");
        let tcp = explain(&cfg, &query("", 5432, "10.0.9.7")).unwrap();
        assert_eq!(
            tcp.authorization[0].decision.rule.as_deref(),
            Some("spec.rules[1]")
        );
    }
}
