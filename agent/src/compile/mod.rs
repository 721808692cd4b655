//! The compiler: a pure function from a [`ConfigSet`] to a [`Plan`] — for every service
//! VIP:port:protocol, the weighted backends a new connection is sent to.
//!
//! No I/O happens here. The same inputs always give the same plan, so the dataplane can diff
//! plans and tests can check routing without a kernel.

pub mod alias;
pub mod analyze;
pub mod authz;
pub mod delegate;
pub mod egress;
pub mod explain;
pub mod gateway;
pub mod http;
mod l7;
pub mod registry;

pub mod incremental;

use crate::model::{
    ConfigSet, Origin, Pod, Resource,
    istio::{self, MESH_GATEWAY, RouteDestination},
};
use registry::{Endpoint, Registry, RegistryService, Transport, host_matches, resolve_host};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warning,
    Error,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Info => "Info",
            Level::Warning => "Warning",
            Level::Error => "Error",
        })
    }
}

/// A finding about the configuration, as specific as istioctl's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Diagnostic {
    pub level: Level,
    /// Istio analyzer code (`IST0101`) where Istio has one.
    pub code: Option<String>,
    pub kind: String,
    /// `namespace/name`.
    pub object: String,
    pub origin: Origin,
    /// Path of the field concerned, or `-`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.level)?;
        if let Some(code) = &self.code {
            write!(f, " [{code}]")?;
        }
        write!(
            f,
            " ({} {}) {}: {}: {}",
            self.kind, self.object, self.origin, self.field, self.message
        )
    }
}

/// A service address as applications dial it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct VipKey {
    pub ip: IpAddr,
    pub port: u16,
    pub transport: Transport,
}

impl fmt::Display for VipKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.ip, self.port),
            self.transport.as_str()
        )
    }
}

/// The Istio cluster names of a backend, see [`WeightedBackend::clusters`].
pub type ClusterNames = Arc<[Arc<str>]>;

/// The names list of one cluster, to share between its backends.
pub fn cluster_names(cluster: Arc<str>) -> ClusterNames {
    Arc::from([cluster])
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WeightedBackend {
    pub addr: SocketAddr,
    /// Share of new connections, in (0, 1]; the backends of one VIP sum to 1.
    pub weight: f64,
    /// Istio cluster names this backend belongs to (`outbound|9000|v1|tcp-echo.ns.svc.cluster.local`).
    /// One list shared by every backend of a cluster (a cluster's endpoints all carry the same
    /// names; only a backend in two destinations of one route gets a list of its own).
    pub clusters: ClusterNames,
    /// Who serves this address, for telemetry (shared by the backend's entries under every VIP
    /// and subset, and by the metrics' label index).
    pub workload: Arc<registry::Workload>,
    /// `region/zone/subzone` of the endpoint (empty: unknown), for locality load balancing.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub locality: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServicePlan {
    pub host: String,
    pub port_name: String,
    /// `VirtualService ns/name tcp[i]` when a route decided the backends, else `default`.
    pub route: String,
    /// Empty means "no backends": connects are rejected rather than sent nowhere.
    pub backends: Vec<WeightedBackend>,
    /// The port speaks HTTP: the kernel sends its connections to the L7 proxy.
    pub needs_l7: bool,
    /// How the L7 proxy routes each request (HTTP ports only; shared by the port's VIPs).
    pub http: Option<Arc<http::HttpRoutes>>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    /// Shared with the per-host outputs of the incremental compiler and with published copies
    /// of the plan: copying a plan copies pointers, not backends.
    pub services: BTreeMap<VipKey, Arc<ServicePlan>>,
    pub diagnostics: Vec<Diagnostic>,
    /// Pods by IP: who a client is, for `sourceLabels` matches and telemetry.
    #[serde(skip)]
    /// Shared per Pod: the published copies of the plan and the proxy's table copy pointers.
    pub sources: HashMap<IpAddr, Arc<Source>>,
    /// What REGISTRY_ONLY lets through, and the mesh-wide policy the configuration sets.
    pub egress: EgressPlan,
    /// AuthorizationPolicies: per destination workload, for the proxy and the kernel.
    pub authz: Arc<authz::AuthzPlan>,
}

/// Istio's `outboundTrafficPolicy`, compiled.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EgressPlan {
    /// From a Sidecar without workloadSelector in the root namespace (Istio's mesh-wide
    /// default); None leaves the mesh config (`--outbound-traffic-policy`) in charge.
    pub registry_only: Option<bool>,
    /// By Pod `metadata.uid`: the Pods a workload or namespace Sidecar governs, with its policy.
    pub workloads: BTreeMap<String, egress::WorkloadEgress>,
}

/// Istio's default root namespace, whose selector-less Sidecar applies mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// A client workload, as the L7 proxy identifies it from the connection's source address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    pub workload: registry::Workload,
    /// The Pod's labels (a sorted slice: a map node per Pod cost half a kilobyte).
    pub labels: crate::model::Labels,
}

impl Plan {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.level == Level::Error)
    }
}

/// A VirtualService's gateway reference as `ns/name` (`mesh` stays `mesh`): short names are in
/// the VirtualService's namespace.
pub fn gateway_ref(gateway: &str, namespace: &str) -> String {
    if gateway == MESH_GATEWAY || gateway.contains('/') {
        gateway.to_string()
    } else {
        format!("{namespace}/{gateway}")
    }
}

/// Istio's cluster name for a destination.
pub fn cluster_name(port: u16, subset: Option<&str>, host: &str) -> String {
    format!("outbound|{port}|{}|{host}", subset.unwrap_or(""))
}

/// Every destination a Service or ServiceEntry of `config` registers (what REGISTRY_ONLY lets
/// through): VIPs, endpoint addresses and ServiceEntry address ranges, in order. The agent
/// keeps them in its incremental compiler ([`incremental::IncrementalCompiler::registered`])
/// and the kernel's registry map, not in the plan, which is copied for every publication.
pub fn registered(config: &ConfigSet) -> std::collections::BTreeSet<ipnet::IpNet> {
    compile_hosts(config, None)
        .into_values()
        .flat_map(|output| output.registered)
        .collect()
}

/// Compiles the configuration into a routing plan.
pub fn compile(config: &ConfigSet) -> Plan {
    let hosts = compile_hosts(config, None);
    let mut services = BTreeMap::new();
    let mut diagnostics = Vec::new();
    // Hosts in name order: when two hosts claim one VIP:port the last one wins, as the
    // incremental compiler decides it too.
    for output in hosts.into_values() {
        services.extend(output.services);
        diagnostics.extend(output.diagnostics);
    }
    let authz = Arc::new(authz::compile(
        config,
        &http_endpoints(&services),
        &mut diagnostics,
    ));
    diagnostics.sort();
    diagnostics.dedup();
    Plan {
        authz,
        egress: EgressPlan {
            registry_only: mesh_registry_only(config),
            workloads: egress::compile(config.pods.iter().map(|p| &**p), &config.sidecars),
        },
        sources: sources(config.pods.iter().map(|p| &**p)),
        services,
        diagnostics,
    }
}

/// The endpoints the L7 proxy serves (the kernel's authorization admits node addresses there).
pub fn http_endpoints(
    services: &BTreeMap<VipKey, Arc<ServicePlan>>,
) -> std::collections::BTreeSet<SocketAddr> {
    services
        .values()
        .filter(|s| s.needs_l7)
        .flat_map(|s| s.backends.iter().map(|b| b.addr))
        .collect()
}

/// What one service host contributes to a plan. The compiler works host by host so that
/// [`incremental`] can recompile just the hosts a change affects: everything here depends only
/// on the objects that define the host, its endpoints, the VirtualServices that match it, its
/// DestinationRule, and the same for the hosts its routes send to ([`Self::references`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostOutput {
    pub services: Vec<(VipKey, Arc<ServicePlan>)>,
    /// Findings about the objects that define the host and about the routes that serve it.
    pub diagnostics: Vec<Diagnostic>,
    /// Destinations REGISTRY_ONLY lets through because of this host: its VIPs, its endpoint
    /// addresses, and the address ranges of the ServiceEntries that name it.
    pub registered: Vec<ipnet::IpNet>,
    /// Other hosts whose endpoints or DestinationRule this host's routes use.
    pub references: std::collections::BTreeSet<String>,
}

impl HostOutput {
    /// Whether two outputs are the same. Compiled HTTP routes hold regexes, which have no
    /// equality; their debug form (which shows the patterns) stands in for it.
    pub fn same_as(&self, other: &HostOutput) -> bool {
        self.diagnostics == other.diagnostics
            && self.registered == other.registered
            && self.references == other.references
            && format!("{:?}", self.services) == format!("{:?}", other.services)
    }
}

/// Compiles every service host of `config`, or only those in `only`, into per-host outputs.
pub fn compile_hosts(
    config: &ConfigSet,
    only: Option<&std::collections::HashSet<String>>,
) -> BTreeMap<String, HostOutput> {
    let wanted = |host: &str| only.is_none_or(|o| o.contains(host));
    let mut outputs: BTreeMap<String, HostOutput> = BTreeMap::new();
    let mut tagged = Vec::new();
    let registry = registry::build_tagged(config, &mut tagged);
    for (host, diag) in tagged {
        if wanted(&host) {
            outputs.entry(host).or_default().diagnostics.push(diag);
        }
    }
    for se in &config.service_entries {
        let nets: Vec<ipnet::IpNet> = se
            .spec
            .addresses
            .iter()
            .filter_map(|a| {
                a.parse::<ipnet::IpNet>()
                    .ok()
                    .or_else(|| a.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
            })
            .collect();
        if nets.is_empty() {
            continue;
        }
        for host in &se.spec.hosts {
            if wanted(host) {
                let out = outputs.entry(host.clone()).or_default();
                out.registered.extend(nets.iter().copied());
            }
        }
    }
    let mut diags = Vec::new();
    let mut ctx = Ctx {
        config,
        registry: &registry,
        diags: &mut diags,
        subsets: subset_index(config),
        destination_rules: destination_rule_index(config),
        vs_hosts: Default::default(),
    };
    for svc in registry.services.values() {
        if !wanted(&svc.hostname) {
            continue;
        }
        let mut services = Vec::new();
        let mut references = std::collections::BTreeSet::new();
        let skip = svc.resolution == istio::Resolution::None
            && svc.kind == registry::ServiceKind::ServiceEntry;
        // Istio passes traffic of NONE ServiceEntries through to the address the application
        // dialled: no service entry, but the addresses are still registered.
        if !skip {
            let vs = ctx.virtual_service_for(&svc.hostname);
            if let Some(vs) = vs {
                references = destination_hosts(vs);
                // Delegated routes send where their delegates say.
                for (ns, name) in delegate::delegate_keys(vs) {
                    if let Some(d) = delegate::find_delegate(&config.virtual_services, &ns, &name) {
                        references.extend(destination_hosts(d));
                    }
                }
            }
            for port in &svc.ports {
                let (route, backends, needs_l7) = ctx.route_port(svc, port, vs);
                let http = needs_l7.then(|| Arc::new(ctx.http_routes(svc, port, vs)));
                for vip in &svc.vips {
                    let backends: Vec<WeightedBackend> = backends
                        .iter()
                        .filter(|b| b.addr.is_ipv4() == vip.is_ipv4())
                        .cloned()
                        .collect();
                    let key = VipKey {
                        ip: *vip,
                        port: port.port,
                        transport: port.transport,
                    };
                    services.push((
                        key,
                        Arc::new(ServicePlan {
                            host: svc.hostname.clone(),
                            port_name: port.name.clone(),
                            route: route.clone(),
                            backends: normalise(backends),
                            needs_l7,
                            http: http.clone(),
                        }),
                    ));
                }
            }
        }
        let out = outputs.entry(svc.hostname.clone()).or_default();
        out.services = services;
        out.references = references;
        out.diagnostics.append(ctx.diags);
        out.registered
            .extend(svc.vips.iter().map(|ip| ipnet::IpNet::from(*ip)));
        out.registered
            .extend(svc.endpoints.iter().map(|e| ipnet::IpNet::from(e.ip)));
    }
    for out in outputs.values_mut() {
        out.diagnostics.sort();
        out.diagnostics.dedup();
        out.registered.sort();
        out.registered.dedup();
        // The incremental compiler keeps every host's output: no spare capacity.
        out.services.shrink_to_fit();
        out.diagnostics.shrink_to_fit();
        out.registered.shrink_to_fit();
    }
    outputs
}

/// Every host a VirtualService's routes and mirrors send to, resolved as the compiler does.
pub fn destination_hosts(
    vs: &Resource<istio::VirtualService>,
) -> std::collections::BTreeSet<String> {
    let ns = &vs.meta.namespace;
    let spec = &vs.spec;
    let mut hosts = std::collections::BTreeSet::new();
    let mut add = |d: &istio::Destination| {
        hosts.insert(resolve_host(&d.host, ns));
    };
    for r in &spec.tcp {
        r.route.iter().for_each(|d| add(&d.destination));
    }
    for r in &spec.tls {
        r.route.iter().for_each(|d| add(&d.destination));
    }
    for r in &spec.http {
        r.route.iter().for_each(|d| add(&d.destination));
        r.mirror.iter().for_each(&mut add);
        r.mirrors.iter().for_each(|m| add(&m.destination));
    }
    hosts
}

/// The mesh-wide `outboundTrafficPolicy` a configuration sets: a Sidecar without
/// workloadSelector in the root namespace (the first by name); None leaves the mesh config
/// (`--outbound-traffic-policy`) in charge.
pub fn mesh_registry_only(config: &ConfigSet) -> Option<bool> {
    let mut sidecars: Vec<_> = config
        .sidecars
        .iter()
        .filter(|s| s.meta.namespace == ROOT_NAMESPACE && s.spec.workload_selector.is_none())
        .collect();
    sidecars.sort_by_key(|s| s.meta.key());
    sidecars.iter().find_map(|s| {
        let mode = s.spec.outbound_traffic_policy.as_ref()?.mode?;
        Some(mode == istio::OutboundTrafficPolicyMode::RegistryOnly)
    })
}

/// Pods by IP. Two pods claiming one IP (a stale object next to its replacement) resolve to
/// the first by namespace/name, whatever order they come in.
pub fn sources<'p>(pods: impl Iterator<Item = &'p Resource<Pod>>) -> HashMap<IpAddr, Arc<Source>> {
    let mut by_ip: HashMap<IpAddr, (String, &Resource<Pod>)> = HashMap::new();
    for p in pods {
        let key = p.meta.key();
        for ip in registry::pod_ips(&p.spec) {
            match by_ip.get(&ip) {
                Some((k, _)) if *k <= key => {}
                _ => {
                    by_ip.insert(ip, (key.clone(), p));
                }
            }
        }
    }
    by_ip
        .into_iter()
        .map(|(ip, (_, p))| (ip, Arc::new(source_of(p))))
        .collect()
}

/// How the L7 proxy and telemetry see a client pod.
pub fn source_of(p: &Resource<Pod>) -> Source {
    Source {
        workload: registry::Workload::new("Pod", &p.meta.namespace, &p.meta.name, &p.meta.labels),
        labels: p.meta.labels.clone(),
    }
}

/// The order backends are listed in: by address, then by who serves it.
fn backend_order(a: &WeightedBackend, b: &WeightedBackend) -> std::cmp::Ordering {
    (a.addr, &a.workload.namespace, &a.workload.name).cmp(&(
        b.addr,
        &b.workload.namespace,
        &b.workload.name,
    ))
}

fn normalise(mut backends: Vec<WeightedBackend>) -> Vec<WeightedBackend> {
    backends.retain(|b| b.weight > 0.0);
    // Input order (files, watch events) must not change the plan.
    backends.sort_by(backend_order);
    let total: f64 = backends.iter().map(|b| b.weight).sum();
    for b in &mut backends {
        b.weight /= total;
    }
    // Collected through filters, the list has room for more: a plan keeps one per VIP:port.
    backends.shrink_to_fit();
    backends
}

/// DestinationRule subsets by resolved host: subset name → labels.
type SubsetIndex = HashMap<String, (String, BTreeMap<String, BTreeMap<String, String>>)>;

fn subset_index(config: &ConfigSet) -> SubsetIndex {
    let mut rules: Vec<&Resource<istio::DestinationRule>> =
        config.destination_rules.iter().map(|r| &**r).collect();
    rules.sort_by_key(|r| r.meta.key());
    let mut index = SubsetIndex::new();
    for dr in rules {
        let host = resolve_host(&dr.spec.host, &dr.meta.namespace);
        let subsets = dr
            .spec
            .subsets
            .iter()
            .map(|s| (s.name.clone(), s.labels.clone()))
            .collect();
        index.entry(host).or_insert((dr.meta.key(), subsets));
    }
    index
}

fn destination_rule_index(
    config: &ConfigSet,
) -> HashMap<String, &Resource<istio::DestinationRule>> {
    let mut rules: Vec<&Resource<istio::DestinationRule>> =
        config.destination_rules.iter().map(|r| &**r).collect();
    rules.sort_by_key(|r| r.meta.key());
    let mut index = HashMap::new();
    for dr in rules {
        index
            .entry(resolve_host(&dr.spec.host, &dr.meta.namespace))
            .or_insert(dr);
    }
    index
}

struct Ctx<'a> {
    config: &'a ConfigSet,
    registry: &'a Registry,
    diags: &'a mut Vec<Diagnostic>,
    subsets: SubsetIndex,
    /// The DestinationRule that applies to each resolved host (first by namespace/name).
    destination_rules: HashMap<String, &'a Resource<istio::DestinationRule>>,
    /// The VirtualServices by the hosts they name, built on first use.
    vs_hosts: std::cell::OnceCell<VsHostIndex<'a>>,
}

/// Every VirtualService host, resolved once per compile: finding a host's VirtualService
/// looked at (and formatted the hosts of) every VirtualService, for every service, which at
/// 10,000 Services and 1,000 VirtualServices was a third of the first build.
#[derive(Default)]
struct VsHostIndex<'a> {
    /// Exact hosts, lower case (they match case-insensitively).
    exact: HashMap<String, Vec<&'a Resource<istio::VirtualService>>>,
    /// Wildcard hosts (`*`, `*.suffix`), with their VirtualService.
    wildcard: Vec<(String, &'a Resource<istio::VirtualService>)>,
}

impl<'a> VsHostIndex<'a> {
    fn new(virtual_services: &'a [crate::model::Shared<istio::VirtualService>]) -> Self {
        let mut index = VsHostIndex::default();
        for vs in virtual_services {
            for h in &vs.spec.hosts {
                let pattern = resolve_host(h, &vs.meta.namespace);
                if pattern.starts_with('*') {
                    index.wildcard.push((pattern, &**vs));
                } else {
                    let candidates = index.exact.entry(pattern.to_ascii_lowercase()).or_default();
                    // A VirtualService naming one host twice is one candidate.
                    if !candidates.iter().any(|c| std::ptr::eq(*c, &**vs)) {
                        candidates.push(&**vs);
                    }
                }
            }
        }
        index
    }
}

impl<'a> Ctx<'a> {
    fn warn(
        &mut self,
        vs: &Resource<istio::VirtualService>,
        field: String,
        code: Option<&str>,
        message: String,
    ) {
        self.diags.push(Diagnostic {
            level: Level::Warning,
            code: code.map(str::to_string),
            kind: "VirtualService".into(),
            object: vs.meta.key(),
            origin: vs.origin.clone(),
            field,
            message,
        });
    }

    /// The mesh VirtualService for a host: an exact host match beats a wildcard, a longer
    /// wildcard beats a shorter one, and among equals the first by namespace/name wins.
    fn virtual_service_for(&self, hostname: &str) -> Option<&'a Resource<istio::VirtualService>> {
        self.virtual_service_for_gateway(hostname, MESH_GATEWAY)
    }

    /// The VirtualService for a host as seen by `gateway` (`mesh`, or a Gateway as `ns/name`).
    fn virtual_service_for_gateway(
        &self,
        hostname: &str,
        gateway: &str,
    ) -> Option<&'a Resource<istio::VirtualService>> {
        let binds = |vs: &Resource<istio::VirtualService>| {
            if gateway == MESH_GATEWAY {
                vs.spec.binds_mesh()
            } else {
                vs.spec
                    .gateways
                    .iter()
                    .any(|g| gateway_ref(g, &vs.meta.namespace) == gateway)
            }
        };
        let index = self
            .vs_hosts
            .get_or_init(|| VsHostIndex::new(&self.config.virtual_services));
        // An exact host ranks above every wildcard; among equals the first by namespace/name.
        let exact = index
            .exact
            .get(&hostname.to_ascii_lowercase())
            .into_iter()
            .flatten()
            .filter(|vs| binds(vs))
            .min_by_key(|vs| vs.meta.key());
        if let Some(vs) = exact {
            return Some(*vs);
        }
        // The longest matching wildcard.
        let mut best: Option<(usize, String, &Resource<istio::VirtualService>)> = None;
        for (pattern, vs) in &index.wildcard {
            if !host_matches(pattern, hostname) || !binds(vs) {
                continue;
            }
            let (rank, key) = (pattern.len(), vs.meta.key());
            let better = match &best {
                None => true,
                Some((r, k, _)) => rank > *r || (rank == *r && key < *k),
            };
            if better {
                best = Some((rank, key, vs));
            }
        }
        best.map(|(_, _, vs)| vs)
    }

    /// Returns (route description, backends, needs L7) for one service port.
    fn route_port(
        &mut self,
        svc: &RegistryService,
        port: &registry::ServicePort,
        vs: Option<&'a Resource<istio::VirtualService>>,
    ) -> (String, Vec<WeightedBackend>, bool) {
        let default = |ctx: &mut Self| {
            let backends = ctx.endpoints_of(svc, port.port, None, 1.0);
            ("default".to_string(), backends)
        };
        // Like Istio, every HTTP port goes through the L7 proxy (routes, retries, telemetry), with
        // or without a VirtualService. Its backends stay as the per-connection fallback the
        // kernel uses while no proxy runs.
        let is_http = port.transport == Transport::Tcp
            && matches!(
                port.protocol.as_deref(),
                Some("HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" | "H2C")
            );
        let Some(vs) = vs.filter(|_| port.transport == Transport::Tcp && !is_http) else {
            let (r, b) = default(self);
            return (r, b, is_http);
        };
        for (i, tcp) in vs.spec.tcp.iter().enumerate() {
            if tcp_route_applies(tcp, port.port, svc) {
                let route = format!("VirtualService {} tcp[{i}]", vs.meta.key());
                let backends =
                    self.weighted(vs, &format!("spec.tcp[{i}].route"), &tcp.route, port.port);
                return (route, backends, false);
            }
        }
        for (i, tls) in vs.spec.tls.iter().enumerate() {
            let applies = tls.matches.iter().any(|m| {
                (m.port.is_none() || m.port == Some(port.port as u32))
                    && (m.gateways.is_empty() || m.gateways.iter().any(|g| g == MESH_GATEWAY))
                    && m.source_labels.is_empty()
                    && m.sni_hosts
                        .iter()
                        .any(|s| host_matches(&resolve_host(s, &vs.meta.namespace), &svc.hostname))
            });
            if applies {
                let route = format!("VirtualService {} tls[{i}]", vs.meta.key());
                let backends =
                    self.weighted(vs, &format!("spec.tls[{i}].route"), &tls.route, port.port);
                return (route, backends, false);
            }
        }
        let (r, b) = default(self);
        (r, b, false)
    }

    /// Weighted backends of a route: each destination's share split over its endpoints by
    /// endpoint weight.
    fn weighted(
        &mut self,
        vs: &Resource<istio::VirtualService>,
        field: &str,
        route: &[RouteDestination],
        incoming_port: u16,
    ) -> Vec<WeightedBackend> {
        let weights: Vec<f64> = if route.len() == 1 {
            vec![route[0].weight.unwrap_or(100).max(0) as f64]
        } else {
            route
                .iter()
                .map(|r| r.weight.unwrap_or(0).max(0) as f64)
                .collect()
        };
        let total: f64 = weights.iter().sum();
        let mut merged: Vec<WeightedBackend> = Vec::new();
        if total <= 0.0 {
            self.warn(
                vs,
                field.into(),
                None,
                "total destination weight is 0; no backends".into(),
            );
            return merged;
        }
        for (i, (rd, w)) in route.iter().zip(&weights).enumerate() {
            if *w <= 0.0 {
                continue;
            }
            let dest = &rd.destination;
            let host = resolve_host(&dest.host, &vs.meta.namespace);
            let Some(target) = self.registry.services.get(&host) else {
                self.warn(
                    vs,
                    format!("{field}[{i}].destination.host"),
                    Some("IST0101"),
                    format!("Referenced host not found: {:?}", dest.host),
                );
                continue;
            };
            let port = dest
                .port
                .as_ref()
                .and_then(|p| p.number)
                .map_or(incoming_port, |n| n as u16);
            let labels = match &dest.subset {
                None => None,
                Some(subset) => match self.subsets.get(&host).and_then(|(_, s)| s.get(subset)) {
                    Some(labels) => Some(labels.clone()),
                    None => {
                        self.warn(
                                vs,
                                format!("{field}[{i}].destination.subset"),
                                Some("IST0101"),
                                format!("Referenced host+subset in destinationrule not found: \"{host}+{subset}\""),
                            );
                        continue;
                    }
                },
            };
            let share = w / total;
            let mut backends = self.endpoints_filtered(target, port, labels.as_ref(), share);
            let clusters = cluster_names(cluster_name(port, dest.subset.as_deref(), &host).into());
            for b in &mut backends {
                b.clusters = clusters.clone();
            }
            for b in backends {
                match merged.iter_mut().find(|m| m.addr == b.addr) {
                    Some(m) => {
                        m.weight += b.weight;
                        m.clusters = m
                            .clusters
                            .iter()
                            .chain(b.clusters.iter())
                            .cloned()
                            .collect();
                    }
                    None => merged.push(b),
                }
            }
        }
        merged
    }

    fn endpoints_of(
        &mut self,
        svc: &RegistryService,
        port: u16,
        labels: Option<&BTreeMap<String, String>>,
        share: f64,
    ) -> Vec<WeightedBackend> {
        let mut backends = self.endpoints_filtered(svc, port, labels, share);
        let clusters = cluster_names(cluster_name(port, None, &svc.hostname).into());
        for b in &mut backends {
            b.clusters = clusters.clone();
        }
        backends
    }

    fn endpoints_filtered(
        &mut self,
        svc: &RegistryService,
        port: u16,
        labels: Option<&BTreeMap<String, String>>,
        share: f64,
    ) -> Vec<WeightedBackend> {
        let selected: Vec<(&Endpoint, u16)> = svc
            .endpoints
            .iter()
            .filter(|e| labels.is_none_or(|l| l.iter().all(|(k, v)| e.labels.get(k) == Some(v))))
            .filter_map(|e| e.ports.get(&port).map(|p| (e, *p)))
            .collect();
        let total: f64 = selected.iter().map(|(e, _)| e.weight as f64).sum();
        selected
            .into_iter()
            .map(|(e, p)| WeightedBackend {
                addr: SocketAddr::new(e.ip, p),
                weight: share * e.weight as f64 / total,
                clusters: Arc::from([]),
                workload: e.workload.clone(),
                locality: e.locality.clone(),
            })
            .collect()
    }
}

fn tcp_route_applies(tcp: &istio::TcpRoute, port: u16, svc: &RegistryService) -> bool {
    if tcp.matches.is_empty() {
        return true;
    }
    tcp.matches.iter().any(|m| {
        (m.port.is_none() || m.port == Some(port as u32))
            && (m.gateways.is_empty() || m.gateways.iter().any(|g| g == MESH_GATEWAY))
            // Source-dependent matches cannot be decided once per node.
            && m.source_labels.is_empty()
            && m.source_namespace.is_none()
            && (m.destination_subnets.is_empty()
                || m.destination_subnets.iter().any(|s| {
                    let net = s.parse::<ipnet::IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(ipnet::IpNet::from));
                    net.is_some_and(|n| svc.vips.iter().any(|v| n.contains(v)))
                }))
    })
}

#[cfg(test)]
mod http_props;
#[cfg(test)]
mod tests;
