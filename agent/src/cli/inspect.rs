//! `steerd inspect listeners|routes|clusters|endpoints|authz`: the running agent's view of the
//! mesh, in `istioctl proxy-config` form, read from its admin API.

use super::Output;
use crate::admin::dump::ConfigDump;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum What {
    Listeners,
    Routes,
    Clusters,
    Endpoints,
    /// AuthorizationPolicies: action, scope, selector, rules and the workloads they apply to.
    Authz,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(
        "reading {admin}/debug/config_dump (is the agent running with --admin {admin}?): {source}"
    )]
    Fetch {
        admin: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{admin}/debug/config_dump answered {status}")]
    Status { admin: SocketAddr, status: String },
    #[error("{admin}/debug/config_dump is not a config dump: {source}")]
    Decode {
        admin: SocketAddr,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug, Default)]
pub struct Filter {
    pub fqdn: Option<String>,
    pub port: Option<u16>,
    pub subset: Option<String>,
}

impl Filter {
    fn host(&self, host: &str) -> bool {
        self.fqdn
            .as_deref()
            .is_none_or(|f| host == f || host.starts_with(&format!("{f}.")))
    }
    fn port(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }
    fn subset(&self, subset: &str) -> bool {
        self.subset.as_deref().is_none_or(|s| s == subset)
    }
}

/// Fetches the dump over plain HTTP/1.1 (the admin listener is local and unauthenticated).
pub fn fetch(admin: SocketAddr) -> Result<ConfigDump, InspectError> {
    let io = |source| InspectError::Fetch { admin, source };
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5)).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    s.write_all(b"GET /debug/config_dump HTTP/1.1\r\nHost: steerd\r\nConnection: close\r\n\r\n")
        .map_err(io)?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(io)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    if !status.contains(" 200 ") {
        return Err(InspectError::Status { admin, status });
    }
    serde_json::from_str(body).map_err(|source| InspectError::Decode { admin, source })
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header.iter().map(|s| s.to_string()).collect::<Vec<_>>()).chain(rows)
    {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Renders one view of the dump.
pub fn render(dump: &ConfigDump, what: What, f: &Filter, output: Output) -> String {
    let json = |v: serde_json::Value| {
        serde_json::to_string_pretty(&v).expect("JSON values serialize") + "\n"
    };
    match what {
        What::Authz => render_authz(dump, f, output),
        What::Listeners => {
            let rows: Vec<_> = dump
                .listeners
                .iter()
                .filter(|l| f.host(&l.host) && f.port(l.port))
                .collect();
            let gateway_rows: Vec<_> = dump
                .gateway_listeners
                .iter()
                .filter(|g| {
                    f.port(g.port) && (f.fqdn.is_none() || g.hosts.iter().any(|h| f.host(h)))
                })
                .collect();
            match output {
                // Gateway listeners follow the mesh ones; they are the rows with a `gateway`.
                Output::Json => {
                    let mut all = serde_json::to_value(&rows).expect("views serialize");
                    if let (Some(list), serde_json::Value::Array(more)) = (
                        all.as_array_mut(),
                        serde_json::to_value(&gateway_rows).expect("views serialize"),
                    ) {
                        list.extend(more);
                    }
                    json(all)
                }
                Output::Table => {
                    let mut out = listeners_table(&rows);
                    if !gateway_rows.is_empty() {
                        out.push_str("\nGateway listeners:\n");
                        out.push_str(&gateway_table(&gateway_rows));
                    }
                    out
                }
            }
        }
        What::Routes => {
            let rows: Vec<_> = dump
                .routes
                .iter()
                .filter(|r| f.host(&r.host) && f.port(r.name.parse().unwrap_or(0)))
                .collect();
            match output {
                Output::Json => json(serde_json::to_value(&rows).expect("views serialize")),
                Output::Table => table(
                    &[
                        "NAME",
                        "VHOST NAME",
                        "MATCH",
                        "VIRTUAL SERVICE",
                        "DESTINATIONS",
                    ],
                    rows.iter()
                        .flat_map(|r| {
                            r.rules.iter().map(move |rule| {
                                let dests = if rule.destinations.is_empty() {
                                    rule.action.clone()
                                } else {
                                    rule.destinations
                                        .iter()
                                        .map(|d| format!("{} {}", d.cluster, d.weight))
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                };
                                vec![
                                    r.name.clone(),
                                    format!("{}:{}", r.host, r.name),
                                    rule.matches.join(" || "),
                                    r.virtual_service.clone().unwrap_or_else(|| "-".into()),
                                    dests,
                                ]
                            })
                        })
                        .collect(),
                ),
            }
        }
        What::Clusters => {
            let rows: Vec<_> = dump
                .clusters
                .iter()
                .filter(|c| f.host(&c.host) && f.port(c.port) && f.subset(&c.subset))
                .collect();
            match output {
                Output::Json => json(serde_json::to_value(&rows).expect("views serialize")),
                Output::Table => table(
                    &[
                        "SERVICE FQDN",
                        "PORT",
                        "SUBSET",
                        "DIRECTION",
                        "TYPE",
                        "DESTINATION RULE",
                        "TLS",
                    ],
                    rows.iter()
                        .map(|c| {
                            vec![
                                c.host.clone(),
                                c.port.to_string(),
                                if c.subset.is_empty() {
                                    "-".into()
                                } else {
                                    c.subset.clone()
                                },
                                c.direction.clone(),
                                c.r#type.clone(),
                                c.destination_rule.clone().unwrap_or_else(|| "-".into()),
                                c.tls.clone().unwrap_or_else(|| "-".into()),
                            ]
                        })
                        .collect(),
                ),
            }
        }
        What::Endpoints => {
            let rows: Vec<_> = dump
                .clusters
                .iter()
                .filter(|c| f.host(&c.host) && f.port(c.port) && f.subset(&c.subset))
                .flat_map(|c| c.endpoints.iter().map(move |e| (c, e)))
                .collect();
            match output {
                Output::Json => json(serde_json::Value::Array(
                    rows.iter()
                        .map(|(c, e)| {
                            serde_json::json!({"endpoint": e.address, "status": e.status, "outlierCheck": e.outlier_check, "cluster": c.name, "weight": e.weight})
                        })
                        .collect(),
                )),
                Output::Table => table(
                    &["ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER"],
                    rows.iter().map(|(c, e)| vec![e.address.clone(), e.status.clone(), e.outlier_check.clone(), c.name.clone()]).collect(),
                ),
            }
        }
    }
}

/// The mesh listeners table.
fn listeners_table(rows: &[&crate::admin::dump::ListenerView]) -> String {
    table(
        &[
            "ADDRESSES",
            "PORT",
            "PROTOCOL",
            "MODE",
            "HOST",
            "DESTINATION",
        ],
        rows.iter()
            .map(|l| {
                let dest = if l.mode == "L7" {
                    format!("Route: {}", l.route)
                } else {
                    format!("{} -> {}", l.route, l.clusters.join(","))
                };
                vec![
                    l.address.clone(),
                    l.port.to_string(),
                    l.protocol.clone(),
                    l.mode.clone(),
                    l.host.clone(),
                    dest,
                ]
            })
            .collect(),
    )
}

/// Each served gateway server: address, protocol, TLS mode, hosts, certificate and its state,
/// bound VirtualServices.
fn gateway_table(rows: &[&crate::admin::dump::GatewayListenerView]) -> String {
    table(
        &[
            "ADDRESS",
            "GATEWAY",
            "SERVER",
            "PROTOCOL",
            "TLS",
            "HOSTS",
            "CERTIFICATE",
            "STATE",
            "NOT AFTER",
            "VIRTUAL SERVICES",
        ],
        rows.iter()
            .map(|g| {
                let cert = g.certificate.as_ref();
                let state = cert.map_or("-".to_string(), |c| match &c.error {
                    Some(e) => format!("{}: {e}", c.state),
                    None => c.state.clone(),
                });
                vec![
                    g.address.clone(),
                    g.gateway.clone(),
                    g.server.clone(),
                    g.protocol.clone(),
                    g.tls_mode.clone(),
                    g.hosts.join(","),
                    cert.map_or("-".into(), |c| c.source.clone()),
                    state,
                    cert.and_then(|c| c.not_after.clone())
                        .unwrap_or_else(|| "-".into()),
                    if g.virtual_services.is_empty() {
                        "-".into()
                    } else {
                        g.virtual_services.join(",")
                    },
                ]
            })
            .collect(),
    )
}

/// The AuthorizationPolicies view; `--fqdn` filters by workload (`namespace/name` or a prefix
/// of the name) and shows each workload's policies.
fn render_authz(dump: &ConfigDump, f: &Filter, output: Output) -> String {
    let applies = |p: &crate::admin::dump::PolicyView| {
        f.fqdn.as_deref().is_none_or(|w| {
            p.workloads.iter().any(|k| {
                k == w
                    || k.split_once('/')
                        .is_some_and(|(_, name)| name.starts_with(w))
            })
        })
    };
    let rows: Vec<_> = dump.authorization.iter().filter(|p| applies(p)).collect();
    match output {
        Output::Json => serde_json::to_string_pretty(&rows).expect("views serialize") + "\n",
        Output::Table => table(
            &[
                "NAME",
                "ACTION",
                "SCOPE",
                "SELECTOR",
                "STATUS",
                "WORKLOADS",
                "RULES",
            ],
            rows.iter()
                .flat_map(|p| {
                    let rules = if p.rules.is_empty() {
                        vec!["(none: matches nothing)".to_string()]
                    } else {
                        p.rules.clone()
                    };
                    rules.into_iter().enumerate().map(move |(i, rule)| {
                        if i == 0 {
                            vec![
                                p.name.clone(),
                                p.action.clone(),
                                p.scope.clone(),
                                p.selector.clone(),
                                p.status.clone(),
                                p.workloads.len().to_string(),
                                rule,
                            ]
                        } else {
                            let mut row = vec![String::new(); 6];
                            row.push(rule);
                            row
                        }
                    })
                })
                .collect(),
        ),
    }
}

pub fn run(
    admin: SocketAddr,
    what: What,
    f: &Filter,
    output: Output,
) -> Result<String, InspectError> {
    Ok(render(&fetch(admin)?, what, f, output))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::dump::PolicyView;

    #[test]
    fn authz_view_lists_policies_with_one_line_per_rule() {
        let dump = ConfigDump {
            authorization: vec![
                PolicyView {
                    name: "shop/no-admin".into(),
                    action: "DENY".into(),
                    scope: "shop".into(),
                    selector: "app=web".into(),
                    rules: vec![
                        "to[paths=/admin*]".into(),
                        "from[ipBlocks=10.0.9.0/24]".into(),
                    ],
                    workloads: vec!["shop/web-1".into(), "shop/web-2".into()],
                    status: "enforced".into(),
                },
                PolicyView {
                    name: "shop/deny-all".into(),
                    action: "ALLOW".into(),
                    scope: "shop".into(),
                    selector: "app=db".into(),
                    rules: vec![],
                    workloads: vec!["shop/db-0".into()],
                    status: "enforced".into(),
                },
            ],
            ..Default::default()
        };
        let text = render(&dump, What::Authz, &Filter::default(), Output::Table);
        assert_eq!(
            text,
            "\
NAME           ACTION  SCOPE  SELECTOR  STATUS    WORKLOADS  RULES
shop/no-admin  DENY    shop   app=web   enforced  2          to[paths=/admin*]
                                                             from[ipBlocks=10.0.9.0/24]
shop/deny-all  ALLOW   shop   app=db    enforced  1          (none: matches nothing)
"
        );
        let only_db = Filter {
            fqdn: Some("db".into()),
            ..Default::default()
        };
        let json: serde_json::Value =
            serde_json::from_str(&render(&dump, What::Authz, &only_db, Output::Json)).unwrap();
        assert_eq!(json.as_array().unwrap().len(), 1);
        assert_eq!(json[0]["name"], "shop/deny-all");
    }
}
