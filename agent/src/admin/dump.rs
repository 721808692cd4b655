//! `/debug/config_dump`: the plan as the agent serves it, in the shapes `istioctl proxy-config`
//! shows (listeners, routes, clusters, endpoints), with live outlier status from the proxy.
//! `steerd inspect` reads it back with these same types.

use crate::compile::{Plan, VipKey, http::RouteAction};
use crate::dataplane::proxy::Proxy;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigDump {
    pub listeners: Vec<ListenerView>,
    pub routes: Vec<RouteView>,
    pub clusters: Vec<ClusterView>,
    /// AuthorizationPolicies and the workloads they apply to.
    #[serde(default)]
    pub authorization: Vec<PolicyView>,
    /// Istio's `outboundTrafficPolicy`: the mesh default and the Pods with a Sidecar of their own.
    #[serde(default)]
    pub outbound: OutboundView,
    /// Current configuration findings, one line each.
    pub diagnostics: Vec<String>,
    /// The servers of the Gateways this agent serves (`--gateway`), per bound address.
    #[serde(default)]
    pub gateway_listeners: Vec<GatewayListenerView>,
    /// This node's locality as the L7 proxy uses it (`--locality`, or its Node's labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
}

/// One server of a served Gateway on one bound address.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayListenerView {
    /// `ip:port`.
    pub address: String,
    pub port: u16,
    /// `ns/name`.
    pub gateway: String,
    /// `spec.servers[i]`, with the server's name if it has one.
    pub server: String,
    pub protocol: String,
    /// `SIMPLE`, `MUTUAL`, `OPTIONAL_MUTUAL`, `PASSTHROUGH`, or `-` (no TLS).
    pub tls_mode: String,
    pub hosts: Vec<String>,
    /// Terminating servers: where the certificate comes from and its state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateView>,
    /// `ns/name` of the VirtualServices bound to this server.
    pub virtual_services: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateView {
    /// `secret ns/name`, `files CERT KEY` or `missing`.
    pub source: String,
    /// `loaded`, `error (serving the last good certificate)` or `error`.
    pub state: String,
    /// notAfter of the certificate being served (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The gateway listeners view of what `gateways` serves right now.
pub fn gateway_listeners(
    gateways: &crate::dataplane::gateway::Gateways,
) -> Vec<GatewayListenerView> {
    gateways
        .served()
        .into_iter()
        .map(|(addr, server, status)| {
            let mut vs: Vec<String> = server
                .virtual_hosts
                .iter()
                .filter_map(|v| v.routes.virtual_service.clone())
                .chain(server.tls_routes.iter().map(|r| r.route.clone()))
                .chain(server.tcp.iter().map(|r| r.route.clone()))
                .map(|r| {
                    // `VirtualService ns/name tcp[0]` → `ns/name`.
                    let r = r.strip_prefix("VirtualService ").unwrap_or(&r).to_string();
                    r.split_whitespace().next().unwrap_or_default().to_string()
                })
                .collect();
            vs.sort();
            vs.dedup();
            GatewayListenerView {
                address: addr.to_string(),
                port: addr.port(),
                gateway: server.gateway.clone(),
                server: match &server.name {
                    Some(n) => format!("spec.servers[{}] {n}", server.index),
                    None => format!("spec.servers[{}]", server.index),
                },
                protocol: server.protocol.clone(),
                tls_mode: server
                    .tls
                    .as_ref()
                    .map_or("-".to_string(), |t| t.mode.as_str().to_string()),
                hosts: server.hosts.clone(),
                certificate: status.map(|c| CertificateView {
                    source: c.source,
                    state: match (c.loaded, &c.error) {
                        (true, None) => "loaded".into(),
                        (true, Some(_)) => "error (serving the last good certificate)".into(),
                        (false, _) => "error".into(),
                    },
                    not_after: c.not_after,
                    error: c.error,
                }),
                virtual_services: vs,
            }
        })
        .collect()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OutboundView {
    /// From the root namespace's selector-less Sidecar: `REGISTRY_ONLY`, `ALLOW_ANY`, or
    /// `mesh config` (`--outbound-traffic-policy`).
    pub mesh: String,
    pub workloads: Vec<WorkloadOutboundView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadOutboundView {
    /// `namespace/name`.
    pub pod: String,
    pub uid: String,
    pub sidecar: String,
    /// `workload` (its selector) or `namespace` (the namespace's default).
    pub scope: String,
    pub policy: String,
}

fn policy_text(registry_only: Option<bool>) -> String {
    match registry_only {
        Some(true) => "REGISTRY_ONLY",
        Some(false) => "ALLOW_ANY",
        None => "mesh config",
    }
    .into()
}

/// One AuthorizationPolicy as the agent enforces it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyView {
    /// `namespace/name`.
    pub name: String,
    /// `ALLOW`, `DENY`, `AUDIT` or `CUSTOM`.
    pub action: String,
    /// The policy's namespace, or `mesh` for the root namespace.
    pub scope: String,
    /// `k=v,...` of `selector.matchLabels`, `*` for the whole scope.
    pub selector: String,
    /// One line per rule (see `compile::authz::Rule::describe`).
    pub rules: Vec<String>,
    /// `namespace/name` of the Pods and WorkloadEntries it applies to.
    pub workloads: Vec<String>,
    /// `enforced`, or why not (`dry-run`, `AUDIT`, ...).
    pub status: String,
}

/// A service VIP:port as the kernel programs handle it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerView {
    pub address: String,
    pub port: u16,
    pub protocol: String,
    /// `L4` (balanced per connection in the kernel), `L7` (sent to the proxy) or `reject` (no
    /// backends).
    pub mode: String,
    pub host: String,
    /// What decides the backends (`VirtualService ns/name tcp[0]`, `default`, or the HTTP route
    /// name for L7).
    pub route: String,
    pub clusters: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteView {
    /// Istio names a sidecar's HTTP route config by port.
    pub name: String,
    pub host: String,
    pub vips: Vec<String>,
    pub virtual_service: Option<String>,
    pub rules: Vec<RuleView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleView {
    pub index: usize,
    pub name: Option<String>,
    /// One line per match block (ORed); `*` matches everything.
    pub matches: Vec<String>,
    /// `route`, `redirect ...` or `direct response N`.
    pub action: String,
    pub destinations: Vec<WeightedCluster>,
    pub timeout: Option<String>,
    pub retries: String,
    pub fault: Option<String>,
    pub mirrors: Vec<WeightedCluster>,
    /// For a rule of a delegate VirtualService: `ns/name http[i]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegate: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WeightedCluster {
    pub cluster: String,
    /// Route weight, or mirror percentage.
    pub weight: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterView {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub subset: String,
    pub direction: String,
    pub r#type: String,
    pub destination_rule: Option<String>,
    /// DestinationRule `tls` origination, described (None: plain text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    pub endpoints: Vec<EndpointView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointView {
    pub address: String,
    /// Share of the cluster's traffic, percent.
    pub weight: f64,
    pub status: String,
    /// `OK`, or `FAILED` while outlier detection has the endpoint ejected.
    pub outlier_check: String,
    /// `region/zone/subzone` (empty: unknown).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub locality: String,
}

fn cluster_parts(name: &str) -> (u16, String, String) {
    let mut p = name.splitn(4, '|');
    let _direction = p.next();
    let port = p.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let subset = p.next().unwrap_or("").to_string();
    let host = p.next().unwrap_or("").to_string();
    (port, subset, host)
}

fn vip_string(vip: &VipKey) -> String {
    std::net::SocketAddr::new(vip.ip, vip.port).to_string()
}

/// Builds the dump; `proxy` supplies live outlier state.
pub fn build(plan: &Plan, proxy: Option<&Proxy>) -> ConfigDump {
    let mut dump = ConfigDump {
        locality: proxy.and_then(|p| p.locality()).map(|l| l.to_string()),
        ..Default::default()
    };
    let mut clusters: BTreeMap<String, ClusterView> = BTreeMap::new();
    let mut routes: BTreeMap<(String, u16), RouteView> = BTreeMap::new();
    let status = |cluster: &str, addr: std::net::SocketAddr| {
        let ejected = proxy.is_some_and(|p| p.cluster_state(cluster).is_ejected(addr));
        (
            if ejected { "UNHEALTHY" } else { "HEALTHY" },
            if ejected { "FAILED" } else { "OK" },
        )
    };
    for (vip, svc) in &plan.services {
        let mode = if svc.needs_l7 {
            "L7"
        } else if svc.backends.is_empty() {
            "reject"
        } else {
            "L4"
        };
        let mut names: Vec<String> = svc
            .backends
            .iter()
            .flat_map(|b| b.clusters.iter().map(|c| c.to_string()))
            .collect();
        names.sort();
        names.dedup();
        for b in &svc.backends {
            for name in b.clusters.iter() {
                let (port, subset, host) = cluster_parts(name);
                let view = clusters
                    .entry(name.to_string())
                    .or_insert_with(|| ClusterView {
                        name: name.to_string(),
                        host,
                        port,
                        subset,
                        direction: "outbound".into(),
                        r#type: "EDS".into(),
                        destination_rule: None,
                        tls: None,
                        endpoints: Vec::new(),
                    });
                if !view
                    .endpoints
                    .iter()
                    .any(|e| e.address == b.addr.to_string())
                {
                    let (st, oc) = status(name, b.addr);
                    view.endpoints.push(EndpointView {
                        address: b.addr.to_string(),
                        weight: (b.weight * 1e4).round() / 100.0,
                        status: st.into(),
                        outlier_check: oc.into(),
                        locality: b.locality.clone(),
                    });
                }
            }
        }
        let mut route_desc = svc.route.clone();
        if let Some(http) = &svc.http {
            route_desc = vip.port.to_string();
            let key = (svc.host.clone(), vip.port);
            let entry = routes.entry(key).or_insert_with(|| RouteView {
                name: vip.port.to_string(),
                host: svc.host.clone(),
                vips: Vec::new(),
                virtual_service: http.virtual_service.clone(),
                rules: http
                    .rules
                    .iter()
                    .map(|r| {
                        let (action, destinations) = match &r.action {
                            RouteAction::Forward(d) => (
                                "route".to_string(),
                                d.iter()
                                    .map(|d| WeightedCluster {
                                        cluster: d.cluster.name.clone(),
                                        weight: d.weight as f64,
                                    })
                                    .collect(),
                            ),
                            RouteAction::Redirect(r) => {
                                (format!("redirect {}", r.code), Vec::new())
                            }
                            RouteAction::DirectResponse { status, .. } => {
                                (format!("direct response {status}"), Vec::new())
                            }
                        };
                        let matches = r.describe_matches();
                        RuleView {
                            index: r.index,
                            name: r.name.clone(),
                            delegate: r
                                .delegate
                                .as_ref()
                                .map(|d| format!("{} http[{}]", d.virtual_service, d.index)),
                            matches: if matches.is_empty() {
                                vec!["*".into()]
                            } else {
                                matches
                            },
                            action,
                            destinations,
                            timeout: r.timeout.map(|t| format!("{}ms", t.as_millis())),
                            retries: if r.retries.attempts == 0 {
                                "none".into()
                            } else {
                                format!(
                                    "{} on {}",
                                    r.retries.attempts,
                                    r.retries.retry_on.join(",")
                                )
                            },
                            fault: r.fault.as_ref().map(|f| {
                                let mut parts = Vec::new();
                                if let Some((d, p)) = f.delay {
                                    parts.push(format!("delay {}ms {p}%", d.as_millis()));
                                }
                                if let Some((s, p)) = f.abort {
                                    parts.push(format!("abort {s} {p}%"));
                                }
                                parts.join(", ")
                            }),
                            mirrors: r
                                .mirrors
                                .iter()
                                .map(|m| WeightedCluster {
                                    cluster: m.cluster.name.clone(),
                                    weight: m.percentage,
                                })
                                .collect(),
                        }
                    })
                    .collect(),
            });
            entry.vips.push(vip_string(vip));
            for rule in &http.rules {
                let dests = match &rule.action {
                    RouteAction::Forward(d) => d.iter().map(|d| d.cluster.clone()).collect(),
                    _ => Vec::new(),
                };
                for c in dests
                    .into_iter()
                    .chain(rule.mirrors.iter().map(|m| m.cluster.clone()))
                {
                    names.push(c.name.clone());
                    let view = clusters
                        .entry(c.name.clone())
                        .or_insert_with(|| ClusterView {
                            name: c.name.clone(),
                            host: c.host.clone(),
                            port: c.port,
                            subset: c.subset.clone().unwrap_or_default(),
                            direction: "outbound".into(),
                            r#type: "EDS".into(),
                            destination_rule: None,
                            tls: None,
                            endpoints: Vec::new(),
                        });
                    view.destination_rule = c.destination_rule.clone();
                    view.tls = c.policy.tls.as_ref().map(|t| t.describe());
                    let total: f64 = c.endpoints.iter().map(|e| e.weight).sum();
                    view.endpoints = c
                        .endpoints
                        .iter()
                        .map(|e| {
                            let (st, oc) = status(&c.name, e.addr);
                            EndpointView {
                                address: e.addr.to_string(),
                                weight: if total > 0.0 {
                                    (e.weight / total * 1e4).round() / 100.0
                                } else {
                                    0.0
                                },
                                status: st.into(),
                                outlier_check: oc.into(),
                                locality: e.locality.clone(),
                            }
                        })
                        .collect();
                }
            }
            names.sort();
            names.dedup();
        }
        dump.listeners.push(ListenerView {
            address: vip.ip.to_string(),
            port: vip.port,
            protocol: vip.transport.as_str().into(),
            mode: mode.into(),
            host: svc.host.clone(),
            route: route_desc,
            clusters: names,
        });
    }
    dump.routes = routes.into_values().collect();
    dump.clusters = clusters.into_values().collect();
    dump.authorization = plan
        .authz
        .policies
        .iter()
        .map(|p| PolicyView {
            name: p.name.clone(),
            action: p.action.as_str().into(),
            scope: p.scope.clone(),
            selector: p.selector.clone(),
            rules: p.rules.iter().map(|r| r.describe()).collect(),
            workloads: p.workloads.clone(),
            status: p.not_enforced.clone().unwrap_or_else(|| "enforced".into()),
        })
        .collect();
    dump.outbound = OutboundView {
        mesh: policy_text(plan.egress.registry_only),
        workloads: plan
            .egress
            .workloads
            .iter()
            .map(|(uid, w)| WorkloadOutboundView {
                pod: w.pod.clone(),
                uid: uid.clone(),
                sidecar: w.sidecar.clone(),
                scope: match w.scope {
                    crate::compile::egress::Scope::Workload => "workload",
                    crate::compile::egress::Scope::Namespace => "namespace",
                    crate::compile::egress::Scope::Mesh => "mesh",
                }
                .into(),
                policy: policy_text(w.registry_only),
            })
            .collect(),
    };
    dump.diagnostics = plan.diagnostics.iter().map(|d| d.to_string()).collect();
    dump
}
