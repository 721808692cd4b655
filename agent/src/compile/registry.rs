//! The service registry: every service host with its VIPs, ports and endpoints, built from
//! Kubernetes Services (+ EndpointSlices, or Pods when a Service has no slice) and Istio
//! ServiceEntries (+ inline endpoints, WorkloadEntries and Pods selected by `workloadSelector`).

use super::{Diagnostic, Level};
use crate::model::{
    ConfigSet, Labels, Meta, Origin, Pod, Resource, Service,
    istio::{self, Resolution},
    node::Node,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

/// The Kubernetes cluster DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Transport protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "TCP",
            Transport::Udp => "UDP",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub transport: Transport,
    /// The application protocol as Istio infers it (`appProtocol`, the port name prefix, or the
    /// ServiceEntry protocol), upper-cased: HTTP, HTTP2, GRPC, TCP, TLS, ...
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub labels: Labels,
    /// Service port → the port this endpoint serves it on. A port missing here is not served.
    pub ports: BTreeMap<u16, u16>,
    /// Load-balancing weight relative to the service's other endpoints.
    pub weight: u32,
    /// What the endpoint is (`Pod ns/name`, `WorkloadEntry ns/name`, `EndpointSlice ns/name`).
    pub source: String,
    /// Who serves it, as Istio's telemetry names it.
    pub workload: std::sync::Arc<Workload>,
    /// `region/zone/subzone` (empty: unknown), for locality load balancing.
    pub locality: String,
}

/// A Pod's locality from Istio's `istio-locality` label (`region.zone.subzone`: label values
/// cannot hold `/`).
pub fn pod_locality_label(labels: &Labels) -> Option<String> {
    labels
        .get("istio-locality")
        .filter(|l| !l.is_empty())
        .map(|l| l.replace('.', "/"))
}

/// The Nodes of a configuration by name (the first copy of a name wins, as for every kind).
pub fn nodes_by_name(config: &ConfigSet) -> HashMap<&str, &Resource<Node>> {
    let mut nodes = HashMap::new();
    for n in &config.nodes {
        nodes.entry(n.meta.name.as_str()).or_insert(&**n);
    }
    nodes
}

/// A Pod's locality as Istio derives it: its `istio-locality` label, else the topology labels
/// of the Node it runs on (`spec.nodeName`); empty when neither says anything.
pub fn pod_locality(pod: &Resource<Pod>, nodes: &HashMap<&str, &Resource<Node>>) -> String {
    pod_locality_label(&pod.meta.labels).unwrap_or_else(|| {
        pod.spec
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .map(|n| node_locality(n, nodes))
            .unwrap_or_default()
    })
}

/// The locality of the Node `name` (empty when unknown or without topology labels).
pub fn node_locality(name: &str, nodes: &HashMap<&str, &Resource<Node>>) -> String {
    nodes
        .get(name)
        .map(|n| n.spec.locality())
        .unwrap_or_default()
}

/// A workload as Istio's standard metrics label it (`destination_workload`, `destination_app`,
/// `destination_version`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Workload {
    pub name: String,
    /// The namespace, app and version are shared by many workloads: interned (see
    /// [`crate::model::interned::intern`]).
    pub namespace: Arc<str>,
    pub app: Arc<str>,
    pub version: Arc<str>,
}

use crate::model::interned::intern;

impl Workload {
    /// Istio's derivation: the app and version labels (canonical-service labels first), and for
    /// a Pod the name of the Deployment that owns it, recovered from the ReplicaSet naming
    /// pattern `<deployment>-<replicaset hash>-<pod hash>` when no owner is known.
    pub fn new(kind: &str, namespace: &str, name: &str, labels: &Labels) -> Self {
        let label = |keys: &[&str]| keys.iter().find_map(|k| labels.get(k));
        let workload = if kind == "Pod" {
            let parts: Vec<&str> = name.rsplitn(3, '-').collect();
            match parts.as_slice() {
                [pod_hash, rs_hash, deployment]
                    if pod_hash.len() == 5 && (6..=10).contains(&rs_hash.len()) =>
                {
                    deployment.to_string()
                }
                _ => name.to_string(),
            }
        } else {
            name.to_string()
        };
        Self {
            name: workload,
            namespace: intern(namespace),
            app: intern(
                label(&[
                    "service.istio.io/canonical-name",
                    "app.kubernetes.io/name",
                    "app",
                ])
                .map_or("unknown", String::as_str),
            ),
            version: intern(
                label(&[
                    "service.istio.io/canonical-revision",
                    "app.kubernetes.io/version",
                    "version",
                ])
                .map_or("unknown", String::as_str),
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ServiceKind {
    Kubernetes,
    ServiceEntry,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegistryService {
    /// Fully qualified host name (`reviews.default.svc.cluster.local`, `api.example.com`).
    pub hostname: String,
    pub namespace: String,
    pub kind: ServiceKind,
    /// `namespace/name` of the object that defines the service.
    pub object: String,
    pub origin: Origin,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub resolution: Resolution,
    pub endpoints: Vec<Endpoint>,
}

/// Services by hostname. A host defined twice keeps the first definition (Kubernetes Services
/// first, then ServiceEntries, each in namespace/name order) and reports the rest.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Registry {
    pub services: BTreeMap<String, RegistryService>,
}

/// Expands a short host name the way Istio does: a name without dots is relative to the
/// namespace of the object that mentions it.
pub fn resolve_host(host: &str, namespace: &str) -> String {
    if host.contains('.') || host == "*" || host.is_empty() {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.{CLUSTER_DOMAIN}")
    }
}

/// Whether `pattern` (a host, possibly `*` or `*.suffix`) covers `host`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// Istio's protocol selection for a Kubernetes port: `appProtocol`, else the name prefix.
fn k8s_port_protocol(name: &str, app_protocol: Option<&str>) -> Option<String> {
    const KNOWN: [&str; 10] = [
        "http", "http2", "https", "grpc", "grpc-web", "tcp", "tls", "mongo", "redis", "mysql",
    ];
    if let Some(p) = app_protocol {
        let p = p.rsplit('/').next().unwrap_or(p);
        return Some(p.to_ascii_uppercase());
    }
    let prefix = name.split('-').next().unwrap_or(name).to_ascii_lowercase();
    KNOWN
        .contains(&prefix.as_str())
        .then(|| prefix.to_ascii_uppercase())
}

fn labels_match<'s>(
    selector: impl IntoIterator<Item = (&'s String, &'s String)>,
    labels: &Labels,
) -> bool {
    labels.matches(selector)
}

/// The IPs of a pod that is a usable endpoint: it has an IP, is not being deleted, and is not
/// reported unready.
pub(crate) fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Vec::new();
    }
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let unready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "False");
    if unready || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Vec::new();
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status.pod_ip.as_deref().and_then(|s| s.parse().ok())
    {
        ips.push(ip);
    }
    ips
}

/// A usable pod's addresses as endpoints serving `ports` (service port → pod port).
fn pod_endpoints<'p>(
    pod: &'p Resource<Pod>,
    ports: BTreeMap<u16, u16>,
    nodes: &HashMap<&str, &Resource<Node>>,
) -> impl Iterator<Item = Endpoint> + 'p {
    let source = format!("Pod {}", pod.meta.key());
    let workload = std::sync::Arc::new(Workload::new(
        "Pod",
        &pod.meta.namespace,
        &pod.meta.name,
        &pod.meta.labels,
    ));
    let locality = pod_locality(pod, nodes);
    pod_ips(&pod.spec).into_iter().map(move |ip| Endpoint {
        ip,
        labels: pod.meta.labels.clone(),
        ports: ports.clone(),
        weight: 1,
        source: source.clone(),
        workload: workload.clone(),
        locality: locality.clone(),
    })
}

/// Resolves a Service `targetPort` on one pod: a number, or a container port name.
fn pod_target_port(pod: &Pod, target: &IntOrString) -> Option<u16> {
    match target {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

struct Builder<'a> {
    config: &'a ConfigSet,
    diags: &'a mut Vec<Diagnostic>,
    pods_by_ns: HashMap<&'a str, Vec<&'a Resource<Pod>>>,
    pod_by_name: HashMap<(&'a str, &'a str), &'a Resource<Pod>>,
    /// Nodes by name, for the localities of the endpoints on them.
    nodes: HashMap<&'a str, &'a Resource<Node>>,
    /// EndpointSlices by (namespace, `kubernetes.io/service-name`), built once: looking them up
    /// per Service by scanning made the registry quadratic in cluster size.
    slices_by_service: HashMap<(&'a str, &'a str), Vec<&'a Resource<crate::model::EndpointSlice>>>,
    /// The workload of each Pod EndpointSlices name, by (slice namespace, reference namespace,
    /// Pod name): shared by the Pod's endpoints in every slice (a Pod behind ten Services is
    /// one workload, not ten).
    slice_workloads: HashMap<(&'a str, &'a str, &'a str), std::sync::Arc<Workload>>,
}

impl<'a> Builder<'a> {
    fn diag(
        &mut self,
        level: Level,
        kind: &str,
        meta: &Meta,
        origin: &Origin,
        field: &str,
        msg: String,
    ) {
        self.diags.push(Diagnostic {
            level,
            code: None,
            kind: kind.to_string(),
            object: meta.key(),
            origin: origin.clone(),
            field: field.to_string(),
            message: msg,
        });
    }

    fn kubernetes_service(&mut self, svc: &Resource<Service>) -> Option<RegistryService> {
        let meta = &svc.meta;
        let spec = svc.spec.spec.as_ref()?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return None;
        }
        let mut vips = Vec::new();
        let ips = spec.cluster_ips.clone().unwrap_or_default();
        let ips = if ips.is_empty() {
            spec.cluster_ip.iter().cloned().collect()
        } else {
            ips
        };
        for (i, ip) in ips.iter().enumerate() {
            if ip == "None" || ip.is_empty() {
                continue;
            }
            match ip.parse::<IpAddr>() {
                Ok(ip) => vips.push(ip),
                Err(e) => self.diag(
                    Level::Error,
                    "Service",
                    meta,
                    &svc.origin,
                    &format!("spec.clusterIPs[{i}]"),
                    format!("invalid IP {ip:?}: {e}"),
                ),
            }
        }
        let mut ports = Vec::new();
        let mut targets = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let transport = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Transport::Tcp,
                "UDP" => Transport::Udp,
                other => {
                    self.diag(
                        Level::Warning,
                        "Service",
                        meta,
                        &svc.origin,
                        &format!("spec.ports[{i}].protocol"),
                        format!("protocol {other} is not steered"),
                    );
                    continue;
                }
            };
            let Ok(port) = u16::try_from(p.port) else {
                self.diag(
                    Level::Error,
                    "Service",
                    meta,
                    &svc.origin,
                    &format!("spec.ports[{i}].port"),
                    format!("port {} out of range", p.port),
                );
                continue;
            };
            let name = p.name.clone().unwrap_or_default();
            ports.push(ServicePort {
                protocol: k8s_port_protocol(&name, p.app_protocol.as_deref()),
                name,
                port,
                transport,
            });
            targets.push(p.target_port.clone().unwrap_or(IntOrString::Int(p.port)));
        }

        let slices: Vec<_> = self
            .slices_by_service
            .get(&(meta.namespace.as_str(), meta.name.as_str()))
            .cloned()
            .unwrap_or_default();
        let endpoints = if !slices.is_empty() {
            self.endpoints_from_slices(&slices, &ports)
        } else if let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) {
            self.endpoints_from_pods(&meta.namespace, selector, &ports, &targets)
        } else {
            Vec::new()
        };
        Some(RegistryService {
            hostname: format!("{}.{}.svc.{CLUSTER_DOMAIN}", meta.name, meta.namespace),
            namespace: meta.namespace.to_string(),
            kind: ServiceKind::Kubernetes,
            object: meta.key(),
            origin: svc.origin.clone(),
            vips,
            ports,
            resolution: Resolution::Static,
            endpoints,
        })
    }

    fn endpoints_from_slices(
        &mut self,
        slices: &[&'a Resource<crate::model::EndpointSlice>],
        ports: &[ServicePort],
    ) -> Vec<Endpoint> {
        let mut out = Vec::new();
        for slice in slices {
            let es = &slice.spec;
            // Slice ports are matched to service ports by name, as kube-proxy does.
            let mut port_map = BTreeMap::new();
            for sp in ports {
                let served = es.ports.iter().flatten().find(|p| {
                    p.name.as_deref().unwrap_or("") == sp.name
                        && p.protocol.as_deref().unwrap_or("TCP") == sp.transport.as_str()
                });
                if let Some(port) = served
                    .and_then(|p| p.port)
                    .and_then(|p| u16::try_from(p).ok())
                {
                    port_map.insert(sp.port, port);
                }
            }
            for ep in &es.endpoints {
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if !ready {
                    continue;
                }
                let pod_ref = ep
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"));
                let pod = pod_ref.and_then(|r| {
                    let ns = r.namespace.as_deref().unwrap_or(&slice.meta.namespace);
                    self.pod_by_name.get(&(ns, r.name.as_deref().unwrap_or("")))
                });
                let labels = pod.map(|p| p.meta.labels.clone()).unwrap_or_default();
                // The Pod's locality; for an endpoint of no known Pod, its Node's, else the
                // zone the EndpointSlice controller recorded (its region unknown).
                let locality = match pod {
                    Some(p) => pod_locality(p, &self.nodes),
                    None => ep
                        .node_name
                        .as_deref()
                        .map(|n| node_locality(n, &self.nodes))
                        .filter(|l| !l.is_empty())
                        .or_else(|| ep.zone.as_ref().map(|z| format!("/{z}")))
                        .unwrap_or_default(),
                };
                let workload = match pod_ref.and_then(|r| Some((r, r.name.as_deref()?))) {
                    Some((r, name)) => {
                        let ref_namespace = r.namespace.as_deref().unwrap_or("");
                        self.slice_workloads
                            .entry((slice.meta.namespace.as_str(), ref_namespace, name))
                            .or_insert_with(|| {
                                std::sync::Arc::new(Workload::new(
                                    "Pod",
                                    &slice.meta.namespace,
                                    name,
                                    &labels,
                                ))
                            })
                            .clone()
                    }
                    None => std::sync::Arc::new(Workload::new(
                        "EndpointSlice",
                        &slice.meta.namespace,
                        "unknown",
                        &labels,
                    )),
                };
                for (i, addr) in ep.addresses.iter().enumerate() {
                    match addr.parse::<IpAddr>() {
                        Ok(ip) => out.push(Endpoint {
                            ip,
                            labels: labels.clone(),
                            ports: port_map.clone(),
                            weight: 1,
                            source: format!("EndpointSlice {}", slice.meta.key()),
                            workload: workload.clone(),
                            locality: locality.clone(),
                        }),
                        Err(e) => {
                            let (meta, origin) = (slice.meta.clone(), slice.origin.clone());
                            self.diag(
                                Level::Error,
                                "EndpointSlice",
                                &meta,
                                &origin,
                                &format!("endpoints[].addresses[{i}]"),
                                format!("invalid address {addr:?}: {e}"),
                            );
                        }
                    }
                }
            }
        }
        out
    }

    fn endpoints_from_pods(
        &self,
        namespace: &str,
        selector: &Labels,
        ports: &[ServicePort],
        targets: &[IntOrString],
    ) -> Vec<Endpoint> {
        let mut out = Vec::new();
        for pod in self.pods_by_ns.get(namespace).into_iter().flatten() {
            if !labels_match(selector, &pod.meta.labels) {
                continue;
            }
            let port_map: BTreeMap<u16, u16> = ports
                .iter()
                .zip(targets)
                .filter_map(|(sp, t)| pod_target_port(&pod.spec, t).map(|tp| (sp.port, tp)))
                .collect();
            out.extend(pod_endpoints(pod, port_map, &self.nodes));
        }
        out
    }

    fn service_entry(&mut self, se: &Resource<istio::ServiceEntry>) -> Vec<RegistryService> {
        let (meta, spec) = (&se.meta, &se.spec);
        let mut vips = Vec::new();
        for (i, a) in spec.addresses.iter().enumerate() {
            // A /32 or /128 CIDR is one address; wider ranges cannot be a connect-time VIP.
            let parsed = a.parse::<IpAddr>().ok().or_else(|| {
                a.parse::<ipnet::IpNet>()
                    .ok()
                    .filter(|n| n.prefix_len() == n.max_prefix_len())
                    .map(|n| n.addr())
            });
            match parsed {
                Some(ip) => vips.push(ip),
                None => self.diag(
                    Level::Warning,
                    "ServiceEntry",
                    meta,
                    &se.origin,
                    &format!("spec.addresses[{i}]"),
                    format!(
                        "address {a:?} is not a single IP; only single-address VIPs are steered"
                    ),
                ),
            }
        }
        let ports: Vec<ServicePort> = spec
            .ports
            .iter()
            .filter_map(|p| {
                Some(ServicePort {
                    name: p.name.clone(),
                    port: u16::try_from(p.number).ok()?,
                    transport: Transport::Tcp,
                    protocol: p.protocol.as_ref().map(|p| p.to_ascii_uppercase()),
                })
            })
            .collect();
        let port_map_for = |named: &BTreeMap<String, u32>| -> BTreeMap<u16, u16> {
            spec.ports
                .iter()
                .filter_map(|p| {
                    let svc_port = u16::try_from(p.number).ok()?;
                    let ep_port = named
                        .get(&p.name)
                        .copied()
                        .or(p.target_port)
                        .unwrap_or(p.number);
                    Some((svc_port, u16::try_from(ep_port).ok()?))
                })
                .collect()
        };
        let mut endpoints = Vec::new();
        // DNS entries without endpoints: each host's own endpoints, in `spec.hosts` order.
        let mut per_host: Vec<Vec<Endpoint>> = Vec::new();
        if spec.resolution == Resolution::Static {
            for (i, we) in spec.endpoints().iter().enumerate() {
                match we.address.parse::<IpAddr>() {
                    Ok(ip) => endpoints.push(Endpoint {
                        ip,
                        labels: we.labels.clone().into(),
                        ports: port_map_for(&we.ports),
                        weight: we.weight.unwrap_or(1).max(1),
                        source: format!("ServiceEntry {}", meta.key()),
                        workload: Workload::new(
                            "ServiceEntry",
                            &meta.namespace,
                            &meta.name,
                            &we.labels.clone().into(),
                        )
                        .into(),
                        locality: we.locality.clone().unwrap_or_default(),
                    }),
                    Err(_) => self.diag(
                        Level::Warning,
                        "ServiceEntry",
                        meta,
                        &se.origin,
                        &format!("spec.endpoints[{i}].address"),
                        format!("endpoint address {:?} is not an IP; skipped", we.address),
                    ),
                }
            }
            if let Some(sel) = &spec.workload_selector {
                for we in self.config.workload_entries.iter().filter(|w| {
                    w.meta.namespace == meta.namespace
                        && labels_match(
                            &sel.labels,
                            &w.meta
                                .labels
                                .iter()
                                .chain(&w.spec.labels)
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect(),
                        )
                }) {
                    if let Ok(ip) = we.spec.address.parse::<IpAddr>() {
                        let mut labels = we.meta.labels.to_map();
                        labels.extend(we.spec.labels.clone());
                        let labels = Labels::from(labels);
                        endpoints.push(Endpoint {
                            ip,
                            ports: port_map_for(&we.spec.ports),
                            weight: we.spec.weight.unwrap_or(1).max(1),
                            source: format!("WorkloadEntry {}", we.meta.key()),
                            workload: Workload::new(
                                "WorkloadEntry",
                                &we.meta.namespace,
                                &we.meta.name,
                                &labels,
                            )
                            .into(),
                            labels,
                            locality: we.spec.locality.clone().unwrap_or_default(),
                        });
                    }
                }
                for pod in self
                    .pods_by_ns
                    .get(meta.namespace.as_str())
                    .into_iter()
                    .flatten()
                {
                    if labels_match(&sel.labels, &pod.meta.labels) {
                        endpoints.extend(pod_endpoints(
                            pod,
                            port_map_for(&BTreeMap::new()),
                            &self.nodes,
                        ));
                    }
                }
            }
        } else if resolves_by_dns(spec.resolution) {
            // Like Envoy's STRICT_DNS (DNS) and LOGICAL_DNS (DNS_ROUND_ROBIN) clusters: the
            // endpoints are the addresses the agent's resolver found for each endpoint address,
            // for the selected WorkloadEntries' addresses, or, with neither, for each host.
            let round_robin = spec.resolution == Resolution::DnsRoundRobin;
            let source = format!("ServiceEntry {}", meta.key());
            if !spec.endpoints().is_empty() {
                for (i, we) in spec.endpoints().iter().enumerate() {
                    let template = Endpoint {
                        ip: IpAddr::from([0, 0, 0, 0]),
                        labels: we.labels.clone().into(),
                        ports: port_map_for(&we.ports),
                        weight: we.weight.unwrap_or(1).max(1),
                        source: source.clone(),
                        workload: Workload::new(
                            "ServiceEntry",
                            &meta.namespace,
                            &meta.name,
                            &we.labels.clone().into(),
                        )
                        .into(),
                        locality: we.locality.clone().unwrap_or_default(),
                    };
                    let field = format!("spec.endpoints[{i}].address");
                    endpoints.extend(self.dns_endpoints(
                        se,
                        &field,
                        &we.address,
                        template,
                        round_robin,
                    ));
                }
            } else if let Some(sel) = &spec.workload_selector {
                for we in selected_workload_entries(self.config, se) {
                    let mut labels = we.meta.labels.to_map();
                    labels.extend(we.spec.labels.clone());
                    let labels = Labels::from(labels);
                    let template = Endpoint {
                        ip: IpAddr::from([0, 0, 0, 0]),
                        ports: port_map_for(&we.spec.ports),
                        weight: we.spec.weight.unwrap_or(1).max(1),
                        source: format!("WorkloadEntry {}", we.meta.key()),
                        workload: Workload::new(
                            "WorkloadEntry",
                            &we.meta.namespace,
                            &we.meta.name,
                            &labels,
                        )
                        .into(),
                        labels,
                        locality: we.spec.locality.clone().unwrap_or_default(),
                    };
                    endpoints.extend(self.dns_endpoints(
                        se,
                        "spec.workloadSelector",
                        &we.spec.address,
                        template,
                        round_robin,
                    ));
                }
                for pod in self
                    .pods_by_ns
                    .get(meta.namespace.as_str())
                    .into_iter()
                    .flatten()
                    .filter(|p| labels_match(&sel.labels, &p.meta.labels))
                {
                    endpoints.extend(pod_endpoints(
                        pod,
                        port_map_for(&BTreeMap::new()),
                        &self.nodes,
                    ));
                }
            } else {
                // Each host is its own service whose one endpoint is the host itself (Istio
                // converts such an entry into one service per host). Wildcard hosts are
                // invalid here and resolve to nothing.
                for (i, host) in spec.hosts.iter().enumerate() {
                    let template = Endpoint {
                        ip: IpAddr::from([0, 0, 0, 0]),
                        labels: Labels::new(),
                        ports: port_map_for(&BTreeMap::new()),
                        weight: 1,
                        source: source.clone(),
                        workload: Workload::new(
                            "ServiceEntry",
                            &meta.namespace,
                            &meta.name,
                            &Labels::new(),
                        )
                        .into(),
                        locality: String::new(),
                    };
                    let resolved = if host.contains('*') {
                        Vec::new()
                    } else {
                        let field = format!("spec.hosts[{i}]");
                        self.dns_endpoints(se, &field, host, template, round_robin)
                    };
                    per_host.push(resolved);
                }
            }
        } else if spec.resolution == Resolution::DynamicDns {
            self.diag(
                Level::Warning,
                "ServiceEntry",
                meta,
                &se.origin,
                "spec.resolution",
                "DYNAMIC_DNS resolution is not supported yet; the entry is not steered".into(),
            );
        }
        let mut per_host = per_host.into_iter();
        spec.hosts
            .iter()
            .map(|h| RegistryService {
                hostname: h.clone(),
                namespace: meta.namespace.to_string(),
                kind: ServiceKind::ServiceEntry,
                object: meta.key(),
                origin: se.origin.clone(),
                vips: vips.clone(),
                ports: ports.clone(),
                resolution: spec.resolution,
                endpoints: per_host.next().unwrap_or_else(|| endpoints.clone()),
            })
            .collect()
    }

    /// The endpoints one address of a DNS ServiceEntry stands for: itself when it is an IP,
    /// else the addresses the resolver found for it (only the first of each family for
    /// DNS_ROUND_ROBIN, as Envoy's LOGICAL_DNS connects to the first address it resolved).
    /// Resolution problems are reported on `field`; a name not resolved yet has no endpoints.
    fn dns_endpoints(
        &mut self,
        se: &Resource<istio::ServiceEntry>,
        field: &str,
        address: &str,
        template: Endpoint,
        round_robin: bool,
    ) -> Vec<Endpoint> {
        if let Ok(ip) = address.parse::<IpAddr>() {
            return vec![Endpoint { ip, ..template }];
        }
        if !is_dns_name(address) {
            self.diag(
                Level::Warning,
                "ServiceEntry",
                &se.meta,
                &se.origin,
                field,
                format!("address {address:?} is neither an IP nor a DNS name; skipped"),
            );
            return Vec::new();
        }
        let Some(answer) = self.config.resolved.get(&dns_key(address)) else {
            return Vec::new();
        };
        let listed = || {
            answer
                .addresses
                .iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match (&answer.error, answer.addresses.is_empty()) {
            (Some(e), true) => self.diag(
                Level::Error,
                "ServiceEntry",
                &se.meta,
                &se.origin,
                field,
                format!("{address} does not resolve: {e}; it has no endpoints"),
            ),
            (Some(e), false) => self.diag(
                Level::Warning,
                "ServiceEntry",
                &se.meta,
                &se.origin,
                field,
                format!(
                    "resolving {address} failed: {e}; serving its last answer ({})",
                    listed()
                ),
            ),
            (None, true) => self.diag(
                Level::Warning,
                "ServiceEntry",
                &se.meta,
                &se.origin,
                field,
                format!("{address} resolves to no addresses; it has no endpoints"),
            ),
            (None, false) => {}
        }
        let mut ips: Vec<IpAddr> = Vec::new();
        for ip in &answer.addresses {
            let take = if round_robin {
                !ips.iter().any(|i| i.is_ipv4() == ip.is_ipv4())
            } else {
                !ips.contains(ip)
            };
            if take {
                ips.push(*ip);
            }
        }
        ips.into_iter()
            .map(|ip| Endpoint {
                ip,
                source: format!("{} ({address})", template.source),
                ..template.clone()
            })
            .collect()
    }
}

/// Whether a ServiceEntry's endpoints come from DNS.
fn resolves_by_dns(resolution: Resolution) -> bool {
    matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin)
}

/// The key of a DNS name in [`ConfigSet::resolved`]: lower case, without a trailing dot.
pub fn dns_key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether an address of a DNS ServiceEntry is a name to resolve (not an IP, a CIDR, a
/// `unix://` path or a wildcard).
fn is_dns_name(address: &str) -> bool {
    !address.is_empty() && address.parse::<IpAddr>().is_err() && !address.contains(['*', '/', ':'])
}

/// The WorkloadEntries a ServiceEntry's `workloadSelector` selects (none without one).
fn selected_workload_entries<'a>(
    config: &'a ConfigSet,
    se: &'a Resource<istio::ServiceEntry>,
) -> impl Iterator<Item = &'a Resource<istio::WorkloadEntry>> {
    let selector = se.spec.workload_selector.as_ref();
    config
        .workload_entries
        .iter()
        .map(|w| &**w)
        .filter(move |w| {
            selector.is_some_and(|sel| {
                w.meta.namespace == se.meta.namespace
                    && sel.labels.iter().all(|(k, v)| {
                        w.spec.labels.get(k).or_else(|| w.meta.labels.get(k)) == Some(v)
                    })
            })
        })
}

/// Every name the DNS ServiceEntries of `config` need resolved (keys of
/// [`ConfigSet::resolved`]): their endpoint addresses that are names, the addresses of the
/// WorkloadEntries they select, or, with neither, their hosts. Wildcards are never resolved.
pub fn dns_names(config: &ConfigSet) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for se in &config.service_entries {
        let spec = &se.spec;
        if !resolves_by_dns(spec.resolution) {
            continue;
        }
        let addresses: Vec<&str> = if !spec.endpoints().is_empty() {
            spec.endpoints()
                .iter()
                .map(|e| e.address.as_str())
                .collect()
        } else if spec.workload_selector.is_some() {
            selected_workload_entries(config, se)
                .map(|w| w.spec.address.as_str())
                .collect()
        } else {
            spec.hosts.iter().map(String::as_str).collect()
        };
        names.extend(
            addresses
                .into_iter()
                .filter(|a| is_dns_name(a))
                .map(dns_key),
        );
    }
    names
}

/// Builds the registry, reporting problems into `diags`.
pub fn build(config: &ConfigSet, diags: &mut Vec<Diagnostic>) -> Registry {
    let mut tagged = Vec::new();
    let registry = build_tagged(config, &mut tagged);
    diags.extend(tagged.into_iter().map(|(_, d)| d));
    registry
}

/// The host name a Kubernetes Service defines.
pub fn kubernetes_service_host(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}")
}

/// The Service (namespace, name) behind a Kubernetes service host name, if it is one.
pub fn kubernetes_service_of(host: &str) -> Option<(&str, &str)> {
    let rest = host.strip_suffix(CLUSTER_DOMAIN)?.strip_suffix(".svc.")?;
    let (name, namespace) = rest.split_once('.')?;
    (!namespace.contains('.')).then_some((namespace, name))
}

/// Builds the registry; each problem comes with the host it concerns (every host of the object
/// it is about), so that a compiler working host by host can keep them apart.
pub fn build_tagged(config: &ConfigSet, diags: &mut Vec<(String, Diagnostic)>) -> Registry {
    let mut untagged = Vec::new();
    let mut pods_by_ns: HashMap<&str, Vec<&Resource<Pod>>> = HashMap::new();
    let mut pod_by_name = HashMap::new();
    for p in config.pods.iter().map(|p| &**p) {
        pods_by_ns
            .entry(p.meta.namespace.as_str())
            .or_default()
            .push(p);
        pod_by_name.insert((p.meta.namespace.as_str(), p.meta.name.as_str()), p);
    }
    let mut slices_by_service: HashMap<(&str, &str), Vec<_>> = HashMap::new();
    for s in config.endpoint_slices.iter().map(|s| &**s) {
        if let Some(service) = s.meta.labels.get("kubernetes.io/service-name") {
            slices_by_service
                .entry((s.meta.namespace.as_str(), service.as_str()))
                .or_default()
                .push(s);
        }
    }
    let mut b = Builder {
        config,
        diags: &mut untagged,
        pods_by_ns,
        pod_by_name,
        nodes: nodes_by_name(config),
        slices_by_service,
        slice_workloads: HashMap::new(),
    };
    let mut registry = Registry::default();
    let mut services: Vec<_> = config.services.iter().collect();
    services.sort_by_key(|s| s.meta.key());
    let mut entries: Vec<_> = config.service_entries.iter().collect();
    entries.sort_by_key(|s| s.meta.key());

    let mut defined: Vec<RegistryService> = Vec::new();
    for s in services {
        defined.extend(b.kubernetes_service(s));
        let host = kubernetes_service_host(&s.meta.namespace, &s.meta.name);
        diags.extend(b.diags.drain(..).map(|d| (host.clone(), d)));
    }
    for se in entries {
        defined.extend(b.service_entry(se));
        for d in b.diags.drain(..) {
            diags.extend(se.spec.hosts.iter().map(|h| (h.clone(), d.clone())));
        }
    }
    for svc in defined {
        if let Some(first) = registry.services.get(&svc.hostname) {
            let host = svc.hostname.clone();
            diags.push((
                host,
                Diagnostic {
                    level: Level::Warning,
                    code: None,
                    kind: match svc.kind {
                        ServiceKind::Kubernetes => "Service",
                        ServiceKind::ServiceEntry => "ServiceEntry",
                    }
                    .into(),
                    object: svc.object.clone(),
                    origin: svc.origin.clone(),
                    field: "hosts".into(),
                    message: format!(
                        "host {} is already defined by {}; ignored",
                        svc.hostname, first.object
                    ),
                },
            ));
            continue;
        }
        registry.services.insert(svc.hostname.clone(), svc);
    }
    registry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_follow_istio() {
        let labels: Labels = [
            ("app".to_string(), "reviews".to_string()),
            ("version".to_string(), "v2".to_string()),
        ]
        .into_iter()
        .collect();
        let w = Workload::new("Pod", "shop", "reviews-v2-7dd5c5dcfb-x2x9k", &labels);
        assert_eq!(
            (w.name.as_str(), &*w.app, &*w.version),
            ("reviews-v2", "reviews", "v2")
        );
        assert_eq!(
            Workload::new("Pod", "shop", "standalone", &Labels::new()).name,
            "standalone"
        );
        assert_eq!(
            &*Workload::new("Pod", "shop", "standalone", &Labels::new()).version,
            "unknown"
        );
        // Shared copies of the names many workloads carry.
        let (a, b) = (
            Workload::new("Pod", "shop", "a", &labels),
            Workload::new("Pod", "shop", "b", &labels),
        );
        assert!(Arc::ptr_eq(&a.namespace, &b.namespace) && Arc::ptr_eq(&a.app, &b.app));
        assert_eq!(
            Workload::new("WorkloadEntry", "shop", "vm-1", &labels).name,
            "vm-1"
        );
    }

    #[test]
    fn short_names_resolve_like_istio() {
        assert_eq!(
            resolve_host("reviews", "shop"),
            "reviews.shop.svc.cluster.local"
        );
        assert_eq!(
            resolve_host("reviews.shop.svc.cluster.local", "x"),
            "reviews.shop.svc.cluster.local"
        );
        assert_eq!(resolve_host("api.example.com", "x"), "api.example.com");
        assert_eq!(resolve_host("*", "x"), "*");
        assert_eq!(resolve_host("*.example.com", "x"), "*.example.com");
    }

    #[test]
    fn wildcards_match_suffixes_only() {
        assert!(host_matches("*", "a.b"));
        assert!(host_matches("*.example.com", "api.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(host_matches("API.example.com", "api.example.com"));
        assert!(!host_matches("api.example.com", "www.example.com"));
    }

    #[test]
    fn protocol_sniffing_follows_istio() {
        assert_eq!(k8s_port_protocol("http-web", None).as_deref(), Some("HTTP"));
        assert_eq!(k8s_port_protocol("grpc", None).as_deref(), Some("GRPC"));
        assert_eq!(k8s_port_protocol("web", None), None);
        assert_eq!(
            k8s_port_protocol("web", Some("kubernetes.io/h2c")).as_deref(),
            Some("H2C")
        );
        assert_eq!(
            k8s_port_protocol("tcp", Some("http")).as_deref(),
            Some("HTTP")
        );
    }
}

#[cfg(test)]
mod locality_tests {
    use crate::compile::compile;
    use crate::model::{ConfigSet, parse_documents};

    const NODES: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels: {topology.kubernetes.io/region: us-east1, topology.kubernetes.io/zone: us-east1-b, topology.istio.io/subzone: rack1, kubernetes.io/hostname: node-a}\n---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-b\n  labels: {topology.kubernetes.io/region: us-east1, topology.kubernetes.io/zone: us-east1-c}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: bare}\n";

    /// A Service with its EndpointSlice: Pods p1 (on node-a), p2 (on node-b, with an
    /// `istio-locality` label), p3 (on bare), p4 (on a Node that is not known); and endpoints of
    /// no known Pod naming node-b, an unknown Node with a zone, and nothing.
    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.7.7\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p1, namespace: shop}\nspec: {nodeName: node-a, containers: [{name: c, image: x}]}\nstatus: {podIP: 10.1.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p2, namespace: shop, labels: {istio-locality: eu.z9}}\nspec: {nodeName: node-b, containers: [{name: c, image: x}]}\nstatus: {podIP: 10.1.0.2}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p3, namespace: shop}\nspec: {nodeName: bare, containers: [{name: c, image: x}]}\nstatus: {podIP: 10.1.0.3}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p4, namespace: shop}\nspec: {nodeName: gone, containers: [{name: c, image: x}]}\nstatus: {podIP: 10.1.0.4}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- {addresses: [10.1.0.1], targetRef: {kind: Pod, name: p1}}\n- {addresses: [10.1.0.2], targetRef: {kind: Pod, name: p2}}\n- {addresses: [10.1.0.3], targetRef: {kind: Pod, name: p3}}\n- {addresses: [10.1.0.4], targetRef: {kind: Pod, name: p4}}\n- {addresses: [10.1.0.5], nodeName: node-b}\n- {addresses: [10.1.0.6], nodeName: elsewhere, zone: us-west1-a}\n- {addresses: [10.1.0.7]}\n";

    fn localities(texts: &[&str]) -> Vec<(String, String)> {
        let mut config = ConfigSet::default();
        for (i, t) in texts.iter().enumerate() {
            let (objects, errors) = parse_documents(&format!("{i}.yaml"), t);
            assert!(errors.is_empty(), "{errors:?}");
            config.extend(objects);
        }
        let plan = compile(&config);
        let svc = plan
            .services
            .values()
            .find(|s| s.host == "web.shop.svc.cluster.local")
            .expect("the web service");
        let mut out: Vec<(String, String)> = svc
            .backends
            .iter()
            .map(|b| (b.addr.ip().to_string(), b.locality.clone()))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn endpoint_localities_come_from_their_nodes() {
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            localities(&[NODES, SERVICE]),
            pairs(&[
                ("10.1.0.1", "us-east1/us-east1-b/rack1"),
                // The Pod's label wins over its Node.
                ("10.1.0.2", "eu/z9"),
                // A Node without topology labels, an unknown Node: no locality.
                ("10.1.0.3", ""),
                ("10.1.0.4", ""),
                ("10.1.0.5", "us-east1/us-east1-c"),
                // No Node to ask: the slice's zone, in no known region.
                ("10.1.0.6", "/us-west1-a"),
                ("10.1.0.7", ""),
            ])
        );
        // Without Nodes (the files source, usually), only the labels and zones speak.
        assert_eq!(
            localities(&[SERVICE]),
            pairs(&[
                ("10.1.0.1", ""),
                ("10.1.0.2", "eu/z9"),
                ("10.1.0.3", ""),
                ("10.1.0.4", ""),
                ("10.1.0.5", ""),
                ("10.1.0.6", "/us-west1-a"),
                ("10.1.0.7", ""),
            ])
        );
    }

    #[test]
    fn nodes_are_cluster_scoped_and_keep_only_their_topology() {
        let (objects, errors) = parse_documents("n.yaml", NODES);
        assert!(errors.is_empty(), "{errors:?}");
        let mut config = ConfigSet::default();
        config.extend(objects);
        let a = &config.nodes[0];
        assert_eq!(
            (a.meta.name.as_str(), a.meta.namespace.as_str()),
            ("node-a", "")
        );
        assert!(
            a.meta.labels.is_empty(),
            "labels are not kept: {:?}",
            a.meta
        );
        assert_eq!(a.spec.locality(), "us-east1/us-east1-b/rack1");
    }
}

#[cfg(test)]
mod dns_tests {
    use super::*;
    use crate::compile::{Plan, VipKey, compile};
    use crate::model::{Resolved, parse_documents};

    fn config(text: &str, answers: &[(&str, &[&str], Option<&str>)]) -> ConfigSet {
        let (objects, errors) = parse_documents("dns.yaml", text);
        assert!(errors.is_empty(), "{errors:?}");
        let mut config = ConfigSet::default();
        config.extend(objects);
        for (name, ips, error) in answers {
            config.resolved.insert(
                name.to_string(),
                Resolved {
                    addresses: ips.iter().map(|s| s.parse().unwrap()).collect(),
                    error: error.map(str::to_string),
                },
            );
        }
        config
    }

    fn backends(plan: &Plan, vip: &str) -> Vec<(String, f64)> {
        let addr: std::net::SocketAddr = vip.parse().unwrap();
        let key = VipKey {
            ip: addr.ip(),
            port: addr.port(),
            transport: Transport::Tcp,
        };
        plan.services
            .get(&key)
            .unwrap_or_else(|| panic!("{vip} not in the plan"))
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), (b.weight * 1e6).round() / 1e6))
            .collect()
    }

    fn messages(plan: &Plan) -> Vec<String> {
        plan.diagnostics
            .iter()
            .map(|d| format!("{} {}: {}", d.level, d.field, d.message))
            .collect()
    }

    const DB: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: data}
spec:
  hosts: [db.example.test]
  addresses: [10.96.7.7, "fd00:96::7"]
  ports: [{number: 5432, name: pg, protocol: TCP, targetPort: 15432}]
  location: MESH_EXTERNAL
  resolution: DNS
  endpoints:
  - address: db-1.example.test
    labels: {zone: a}
    weight: 3
  - address: DB-2.Example.Test.
    ports: {pg: 25432}
  - address: 10.244.9.9
"#;

    #[test]
    fn dns_endpoints_are_the_resolved_addresses() {
        let config = config(
            DB,
            &[
                (
                    "db-1.example.test",
                    &["10.244.1.2", "10.244.1.3", "fd00:244:1::2"],
                    None,
                ),
                ("db-2.example.test", &["10.244.2.2"], None),
            ],
        );
        assert_eq!(
            dns_names(&config).into_iter().collect::<Vec<_>>(),
            ["db-1.example.test", "db-2.example.test"]
        );
        let plan = compile(&config);
        assert!(plan.diagnostics.is_empty(), "{:?}", messages(&plan));
        // Every address of an endpoint carries its weight and ports.
        assert_eq!(
            backends(&plan, "10.96.7.7:5432"),
            vec![
                ("10.244.1.2:15432".into(), 0.375),
                ("10.244.1.3:15432".into(), 0.375),
                ("10.244.2.2:25432".into(), 0.125),
                ("10.244.9.9:15432".into(), 0.125),
            ]
        );
        assert_eq!(
            backends(&plan, "[fd00:96::7]:5432"),
            vec![("[fd00:244:1::2]:15432".into(), 1.0)]
        );
        let registry = build(&config, &mut Vec::new());
        let svc = &registry.services["db.example.test"];
        assert_eq!(svc.endpoints[0].labels["zone"], "a");
        assert_eq!(
            svc.endpoints[0].source,
            "ServiceEntry data/db (db-1.example.test)"
        );
    }

    #[test]
    fn names_not_resolved_yet_have_no_endpoints_and_no_findings() {
        let config = config(DB, &[]);
        let plan = compile(&config);
        assert!(plan.diagnostics.is_empty(), "{:?}", messages(&plan));
        assert_eq!(
            backends(&plan, "10.96.7.7:5432"),
            vec![("10.244.9.9:15432".into(), 1.0)]
        );
        assert_eq!(
            backends(&plan, "[fd00:96::7]:5432"),
            vec![],
            "no backends: connects are refused"
        );
    }

    #[test]
    fn failures_serve_the_last_answer_and_unresolvable_names_are_errors() {
        let config = config(
            DB,
            &[
                (
                    "db-1.example.test",
                    &["10.244.1.2"],
                    Some("request timed out"),
                ),
                ("db-2.example.test", &[], Some("no such name (NXDOMAIN)")),
            ],
        );
        let plan = compile(&config);
        assert_eq!(
            backends(&plan, "10.96.7.7:5432"),
            vec![
                ("10.244.1.2:15432".into(), 0.75),
                ("10.244.9.9:15432".into(), 0.25),
            ]
        );
        assert_eq!(
            messages(&plan),
            [
                "Warning spec.endpoints[0].address: resolving db-1.example.test failed: request timed out; serving its last answer (10.244.1.2)",
                "Error spec.endpoints[1].address: DB-2.Example.Test. does not resolve: no such name (NXDOMAIN); it has no endpoints",
            ]
        );
        assert!(plan.diagnostics.iter().all(|d| d.object == "data/db"
            && d.kind == "ServiceEntry"
            && d.origin.source == "dns.yaml"));
    }

    #[test]
    fn round_robin_uses_the_first_address_of_each_family() {
        let text = DB
            .replace("resolution: DNS", "resolution: DNS_ROUND_ROBIN")
            .replace(
                "  - address: DB-2.Example.Test.\n    ports: {pg: 25432}\n  - address: 10.244.9.9\n",
                "",
            );
        let config = config(
            &text,
            &[(
                "db-1.example.test",
                &["fd00:244:1::2", "10.244.1.3", "10.244.1.2", "fd00:244:1::3"],
                None,
            )],
        );
        let plan = compile(&config);
        assert!(plan.diagnostics.is_empty(), "{:?}", messages(&plan));
        assert_eq!(
            backends(&plan, "10.96.7.7:5432"),
            vec![("10.244.1.3:15432".into(), 1.0)]
        );
        assert_eq!(
            backends(&plan, "[fd00:96::7]:5432"),
            vec![("[fd00:244:1::2]:15432".into(), 1.0)]
        );
    }

    #[test]
    fn without_endpoints_each_host_resolves_itself() {
        let text = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: apis, namespace: web}
spec:
  hosts: [a.example.test, b.example.test]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: web}
spec:
  hosts: ["*.wild.test"]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough, namespace: web}
spec:
  hosts: [pass.example.test]
  addresses: [10.96.8.8]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: static, namespace: web}
spec:
  hosts: [static.example.test]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.244.3.3}]
"#;
        let config = config(
            text,
            &[
                ("a.example.test", &["10.244.1.2"], None),
                ("b.example.test", &["10.244.2.2"], None),
            ],
        );
        // Wildcards, NONE and STATIC entries need no DNS.
        assert_eq!(
            dns_names(&config).into_iter().collect::<Vec<_>>(),
            ["a.example.test", "b.example.test"]
        );
        let registry = build(&config, &mut Vec::new());
        let ips = |host: &str| -> Vec<String> {
            registry.services[host]
                .endpoints
                .iter()
                .map(|e| format!("{}:{}", e.ip, e.ports[&80]))
                .collect()
        };
        assert_eq!(ips("a.example.test"), ["10.244.1.2:80"]);
        assert_eq!(ips("b.example.test"), ["10.244.2.2:80"]);
        assert!(ips("*.wild.test").is_empty());
        let plan = compile(&config);
        assert!(
            !plan
                .services
                .keys()
                .any(|k| k.ip.to_string() == "10.96.8.8"),
            "resolution NONE passes through"
        );
    }

    #[test]
    fn workload_selector_entries_resolve_their_addresses() {
        let text = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: data}
spec:
  hosts: [vms.example.test]
  addresses: [10.96.9.9]
  ports: [{number: 8080, name: tcp, protocol: TCP}]
  resolution: DNS
  workloadSelector: {labels: {app: vm}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: data}
spec: {address: vm-1.example.test, labels: {app: vm}, ports: {tcp: 18080}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-2, namespace: data}
spec: {address: 10.244.6.6, labels: {app: vm}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other, namespace: data}
spec: {address: other.example.test, labels: {app: other}}
"#;
        let config = config(text, &[("vm-1.example.test", &["10.244.5.5"], None)]);
        assert_eq!(
            dns_names(&config).into_iter().collect::<Vec<_>>(),
            ["vm-1.example.test"]
        );
        let plan = compile(&config);
        assert_eq!(
            backends(&plan, "10.96.9.9:8080"),
            vec![
                ("10.244.5.5:18080".into(), 0.5),
                ("10.244.6.6:8080".into(), 0.5),
            ]
        );
    }
}
