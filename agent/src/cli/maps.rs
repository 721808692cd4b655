//! `steerd maps`: the pinned maps as tables or JSON, read from a second process.

use super::{MapsTable, Output};
use crate::dataplane::{Pins, kernel, maps};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;
use steerd_common::SVC_F_NO_BACKENDS;

#[derive(Debug, Serialize)]
pub struct ServiceRow {
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    pub table: u32,
    pub backends: u32,
    pub no_backends: bool,
}

#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    pub backend: String,
    /// Percentage of new connections, as computed from the kernel's alias table.
    pub weight: f64,
}

pub fn rows(bpffs: &Path) -> Result<(Vec<ServiceRow>, Vec<BackendRow>), maps::MapsError> {
    let snap = maps::read_pinned(&Pins::new(bpffs).maps())?;
    let mut services = Vec::new();
    let mut backends = Vec::new();
    for (key, (value, slots)) in &snap.services {
        let Some(vip) = kernel::vip_of(key) else {
            continue;
        };
        let shares = kernel::backend_shares(slots);
        services.push(ServiceRow {
            vip: vip.ip.to_string(),
            port: vip.port,
            protocol: vip.transport.as_str().into(),
            table: value.table_id,
            backends: shares.len() as u32,
            no_backends: value.flags & SVC_F_NO_BACKENDS != 0,
        });
        for (addr, share) in shares {
            backends.push(BackendRow {
                vip: vip.ip.to_string(),
                port: vip.port,
                protocol: vip.transport.as_str().into(),
                backend: addr.to_string(),
                weight: (share * 1e4).round() / 100.0,
            });
        }
    }
    Ok((services, backends))
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let _ = write!(s, "{c:<w$}  ", w = widths[i]);
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut out, header.to_vec());
    for r in &rows {
        line(&mut out, r.iter().map(String::as_str).collect());
    }
    out
}

#[derive(Debug, Serialize)]
pub struct EgressView {
    pub outbound_traffic_policy: &'static str,
    /// Pod cgroups whose Sidecar sets their own policy.
    pub workloads: Vec<WorkloadPolicyView>,
    pub registered: Vec<String>,
    /// (destination, refused connects)
    pub denied: Vec<(String, u64)>,
}

#[derive(Debug, Serialize)]
pub struct WorkloadPolicyView {
    pub cgroup_id: u64,
    pub outbound_traffic_policy: &'static str,
    /// The Pod uid and cgroup directory (found under the cgroup2 mount), if still there.
    pub pod_uid: Option<String>,
    pub cgroup: Option<String>,
}

fn policy_name(registry_only: bool) -> &'static str {
    if registry_only {
        "REGISTRY_ONLY"
    } else {
        "ALLOW_ANY"
    }
}

/// The egress maps, read from their pins.
pub fn egress(bpffs: &Path) -> Result<EgressView, aya::maps::MapError> {
    use aya::maps::{Array, HashMap, LpmTrie, Map, MapData};
    use steerd_common::{Addr, EgressPolicy, map_names};
    let dir = Pins::new(bpffs).maps();
    let open = |name: &str| MapData::from_pin(dir.join(name));
    let policy: Array<MapData, EgressPolicy> =
        Array::try_from(Map::Array(open(map_names::EGRESS)?))?;
    let registry: LpmTrie<MapData, Addr, u32> =
        LpmTrie::try_from(Map::LpmTrie(open(map_names::REGISTRY)?))?;
    let denied: HashMap<MapData, Addr, u64> =
        HashMap::try_from(Map::LruHashMap(open(map_names::DENIED)?))?;
    let registry_only = policy.get(&0, 0)?.registry_only != 0;
    // Pins of an agent from before per-workload policies have no such map.
    let workload_map: Option<HashMap<MapData, u64, u32>> = open(map_names::EGRESS_WORKLOADS)
        .ok()
        .and_then(|m| HashMap::try_from(Map::HashMap(m)).ok());
    let mut workloads: Vec<WorkloadPolicyView> = Vec::new();
    if let Some(map) = workload_map {
        let cgroups = super::cgroup2_root()
            .map(|root| crate::dataplane::cgroups::by_id(&root))
            .unwrap_or_default();
        for (id, p) in map.iter().filter_map(Result::ok) {
            let found = cgroups.get(&id);
            workloads.push(WorkloadPolicyView {
                cgroup_id: id,
                outbound_traffic_policy: policy_name(p == steerd_common::EGRESS_REGISTRY_ONLY),
                pod_uid: found.map(|(uid, _)| uid.clone()),
                cgroup: found.map(|(_, path)| path.display().to_string()),
            });
        }
        workloads.sort_by(|a, b| (&a.cgroup, a.cgroup_id).cmp(&(&b.cgroup, b.cgroup_id)));
    }
    let mut registered: Vec<String> = registry
        .keys()
        .filter_map(Result::ok)
        .map(|k| {
            let ip = kernel::ip_of(&k.data());
            let len = if ip.is_ipv4() {
                k.prefix_len().saturating_sub(96)
            } else {
                k.prefix_len()
            };
            format!("{ip}/{len}")
        })
        .collect();
    registered.sort();
    Ok(EgressView {
        outbound_traffic_policy: policy_name(registry_only),
        workloads,
        registered,
        denied: crate::dataplane::egress::denied(&denied)
            .into_iter()
            .map(|(ip, n)| (ip.to_string(), n))
            .collect(),
    })
}

/// `steerd maps authz`: one row per (destination, source prefix), then the refusals.
fn render_authz(view: &crate::dataplane::authz::AuthzMapsView, output: Output) -> String {
    match output {
        Output::Json => serde_json::to_string_pretty(view).expect("views serialize") + "\n",
        Output::Table => {
            let mut rows = Vec::new();
            for d in &view.destinations {
                let dest = vec![d.address.to_string(), d.port.clone(), d.table.to_string()];
                rows.push([dest.clone(), vec!["*".into(), d.default.clone()]].concat());
                for (prefix, verdict) in &d.prefixes {
                    rows.push([dest.clone(), vec![prefix.clone(), verdict.clone()]].concat());
                }
            }
            let mut out = table(&["DESTINATION", "PORT", "TABLE", "SOURCE", "VERDICT"], rows);
            out += "\n";
            out += &table(
                &["REFUSED DESTINATION", "PORT", "CONNECTS"],
                view.denied
                    .iter()
                    .map(|d| {
                        vec![
                            d.address.to_string(),
                            d.port.to_string(),
                            d.connections.to_string(),
                        ]
                    })
                    .collect(),
            );
            out
        }
    }
}

pub fn render(bpffs: &Path, which: MapsTable, output: Output) -> Result<String, maps::MapsError> {
    if let MapsTable::Authz = which {
        let view =
            crate::dataplane::authz::open_pinned(&Pins::new(bpffs).maps()).map_err(
                |e| match e {
                    crate::dataplane::DataplaneError::Map { name, source } => {
                        maps::MapsError::Map { name, source }
                    }
                    other => maps::MapsError::Partial {
                        failed: 1,
                        total: 1,
                        first: other.to_string(),
                    },
                },
            )?;
        return Ok(render_authz(&view, output));
    }
    if let MapsTable::Egress = which {
        let view = egress(bpffs).map_err(|source| maps::MapsError::Map {
            name: "egress",
            source,
        })?;
        return Ok(match output {
            Output::Json => serde_json::to_string_pretty(&view).expect("views serialize") + "\n",
            Output::Table => {
                let mut out = format!(
                    "outboundTrafficPolicy (mesh default): {}\n\n",
                    view.outbound_traffic_policy
                );
                if !view.workloads.is_empty() {
                    out += &table(
                        &["CGROUP ID", "POLICY", "POD UID", "CGROUP"],
                        view.workloads
                            .iter()
                            .map(|w| {
                                vec![
                                    w.cgroup_id.to_string(),
                                    w.outbound_traffic_policy.to_string(),
                                    w.pod_uid.clone().unwrap_or_else(|| "-".into()),
                                    w.cgroup.clone().unwrap_or_else(|| "(gone)".into()),
                                ]
                            })
                            .collect(),
                    );
                    out += "\n";
                }
                out += &table(
                    &["REGISTERED"],
                    view.registered.iter().map(|r| vec![r.clone()]).collect(),
                );
                out += "\n";
                out += &table(
                    &["REFUSED DESTINATION", "CONNECTS"],
                    view.denied
                        .iter()
                        .map(|(d, n)| vec![d.clone(), n.to_string()])
                        .collect(),
                );
                out
            }
        });
    }
    let (services, backends) = rows(bpffs)?;
    Ok(match (which, output) {
        (MapsTable::Egress | MapsTable::Authz, _) => unreachable!("handled above"),
        (MapsTable::Services, Output::Json) => {
            serde_json::to_string_pretty(&services).expect("rows serialize") + "\n"
        }
        (MapsTable::Backends, Output::Json) => {
            serde_json::to_string_pretty(&backends).expect("rows serialize") + "\n"
        }
        (MapsTable::Services, Output::Table) => table(
            &["VIP", "PORT", "PROTO", "TABLE", "BACKENDS"],
            services
                .into_iter()
                .map(|r| {
                    let n = if r.no_backends {
                        "0 (reject)".to_string()
                    } else {
                        r.backends.to_string()
                    };
                    vec![
                        r.vip,
                        r.port.to_string(),
                        r.protocol,
                        r.table.to_string(),
                        n,
                    ]
                })
                .collect(),
        ),
        (MapsTable::Backends, Output::Table) => table(
            &["VIP", "PORT", "PROTO", "BACKEND", "WEIGHT"],
            backends
                .into_iter()
                .map(|r| {
                    vec![
                        r.vip,
                        r.port.to_string(),
                        r.protocol,
                        r.backend,
                        format!("{:.2}%", r.weight),
                    ]
                })
                .collect(),
        ),
    })
}
