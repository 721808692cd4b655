//! Prometheus metrics, served on the admin listener's `/metrics`.
//!
//! Istio's standard metric names and labels, so Kiali and Istio's Grafana dashboards work
//! unmodified: `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total` (from the kernel's
//! per-(service, backend) counters, read at scrape time), and `istio_requests_total` /
//! `istio_request_duration_milliseconds` from the L7 proxy. steerd's own `steerd_*` metrics
//! cover the control plane (plan generations, apply latency, map entries and errors) and the
//! kernel's refusals (REGISTRY_ONLY, AuthorizationPolicy).
//!
//! Labels the node cannot know (the client workload of a kernel-balanced connection, mTLS
//! principals) are `unknown`, as Istio reports them when it lacks the peer's metadata.

use crate::compile::{Plan, VipKey, registry::Workload};
use crate::dataplane::kernel;
use aya::maps::{HashMap as BpfHashMap, MapData};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use steerd_common::{BackendStats, StatsKey};

/// Istio's standard labels (the subset that a node-level agent can fill).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IstioLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_app: String,
    pub source_version: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_principal: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_code: String,
    pub response_flags: String,
    pub connection_security_policy: String,
}

impl IstioLabels {
    /// Labels for traffic from `source` to `service` served by `destination`.
    pub fn new(
        source: Option<&Workload>,
        service: &ServiceLabels,
        destination: Option<&Workload>,
        protocol: &str,
    ) -> Self {
        let unknown = || "unknown".to_string();
        let w = |w: Option<&Workload>, f: fn(&Workload) -> &str| {
            w.map_or_else(unknown, |w| f(w).to_string())
        };
        Self {
            reporter: "source".into(),
            source_workload: w(source, |w| &w.name),
            source_workload_namespace: w(source, |w| &w.namespace),
            source_app: w(source, |w| &w.app),
            source_version: w(source, |w| &w.version),
            source_principal: unknown(),
            destination_workload: w(destination, |w| &w.name),
            destination_workload_namespace: w(destination, |w| &w.namespace),
            destination_app: w(destination, |w| &w.app),
            destination_version: w(destination, |w| &w.version),
            destination_service: service.host.clone(),
            destination_service_name: service.name.clone(),
            destination_service_namespace: service.namespace.clone(),
            destination_principal: unknown(),
            destination_cluster: "Kubernetes".into(),
            request_protocol: protocol.into(),
            response_code: "0".into(),
            response_flags: "-".into(),
            connection_security_policy: "unknown".into(),
        }
    }
}

/// How a service appears in `destination_service*` labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceLabels {
    pub host: String,
    pub name: String,
    pub namespace: String,
}

impl ServiceLabels {
    /// Kubernetes hosts are `name.namespace.svc.<domain>`; other hosts name themselves.
    pub fn from_host(host: &str) -> Self {
        let mut parts = host.splitn(4, '.');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(name), Some(ns), Some("svc")) => Self {
                host: host.into(),
                name: name.into(),
                namespace: ns.into(),
            },
            _ => Self {
                host: host.into(),
                name: host.into(),
                namespace: "unknown".into(),
            },
        }
    }
}

/// What the current plan says about VIPs and endpoints, for labelling. Taking it from a plan
/// copies pointers only; the lookup by endpoint address is built on the first scrape that needs
/// it. Plans are published on every change (at most once a second) and scraped far less often,
/// so indexing 50,000 backends per publish was most of the agent's CPU per change.
#[derive(Debug, Default)]
pub struct LabelIndex {
    services: std::collections::BTreeMap<VipKey, Arc<crate::compile::ServicePlan>>,
    workloads: std::sync::OnceLock<HashMap<SocketAddr, Arc<Workload>>>,
    authz: Arc<crate::compile::authz::AuthzPlan>,
}

impl LabelIndex {
    pub fn from_plan(plan: &Plan) -> Self {
        Self {
            services: plan.services.clone(),
            workloads: std::sync::OnceLock::new(),
            authz: plan.authz.clone(),
        }
    }

    /// The `destination_service*` labels of a VIP the plan has.
    pub fn service(&self, vip: &VipKey) -> Option<ServiceLabels> {
        self.services
            .get(vip)
            .map(|s| ServiceLabels::from_host(&s.host))
    }

    /// Who serves `backend`.
    pub fn workload(&self, backend: &SocketAddr) -> Option<&Workload> {
        self.workloads
            .get_or_init(|| {
                self.services
                    .values()
                    .flat_map(|s| s.backends.iter())
                    .map(|b| (b.addr, b.workload.clone()))
                    .collect()
            })
            .get(backend)
            .map(|w| &**w)
    }

    /// `namespace/name` of a workload with AuthorizationPolicies, by address.
    pub fn authz_workload(&self, ip: &std::net::IpAddr) -> Option<String> {
        self.authz.workloads.get(ip).map(|w| w.workload.clone())
    }
}

/// One request's `istio_requests_total` and `istio_request_duration_milliseconds` series.
#[derive(Clone, Debug)]
pub struct RequestSeries {
    pub requests: Counter,
    pub duration: Histogram,
}

/// What tells one request's series from another's: the labels that vary, borrowed from the
/// request (the cache is probed without building label strings).
#[derive(Debug, Hash)]
pub struct RequestKey<'a> {
    pub source: Option<&'a Workload>,
    pub service: &'a str,
    pub destination: Option<&'a Workload>,
    pub response_code: u16,
    pub response_flags: &'a str,
}

/// [`RequestKey`], owned. Its derived `Hash` hashes the same values in the same order, so the
/// two hash alike (`Option<&T>` as `Option<T>`, `&str` as `String`).
#[derive(Debug, Hash, PartialEq, Eq)]
struct OwnedRequestKey {
    source: Option<Workload>,
    service: String,
    destination: Option<Workload>,
    response_code: u16,
    response_flags: String,
}

impl hashbrown::Equivalent<OwnedRequestKey> for RequestKey<'_> {
    fn equivalent(&self, key: &OwnedRequestKey) -> bool {
        self.response_code == key.response_code
            && self.response_flags == key.response_flags
            && self.service == key.service
            && self.source == key.source.as_ref()
            && self.destination == key.destination.as_ref()
    }
}

/// The request series resolved so far. Families are looked up once per label set (building 19
/// label strings and hashing them); after that a request costs one hash of the borrowed key.
#[derive(Debug, Default)]
struct RequestSeriesCache {
    series: RwLock<hashbrown::HashMap<OwnedRequestKey, RequestSeries>>,
}

/// A counter family derived from the kernel's per-backend stats: name, help, value.
type CounterFamily = (&'static str, &'static str, fn(&BackendStats) -> u64);

/// Reads the kernel's traffic counters when scraped.
struct TcpCollector {
    stats: Mutex<Option<aya::maps::HashMap<MapData, StatsKey, BackendStats>>>,
    /// REGISTRY_ONLY refusals per destination.
    denied: Mutex<Option<aya::maps::HashMap<MapData, steerd_common::Addr, u64>>>,
    /// AuthorizationPolicy refusals per destination (per CPU).
    authz_denied: Mutex<Option<BpfHashMap<MapData, steerd_common::AuthzDestKey, u64>>>,
    /// The socket redirect's counters (per CPU).
    redirect: Mutex<Option<aya::maps::PerCpuArray<MapData, steerd_common::RedirectStats>>>,
    labels: Arc<RwLock<Arc<LabelIndex>>>,
}

impl std::fmt::Debug for TcpCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpCollector").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for TcpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let labels = self.labels.read().expect("label index lock").clone();
        let mut totals: HashMap<IstioLabels, BackendStats> = HashMap::new();
        let mut services: HashMap<VipKey, ServiceLabels> = HashMap::new();
        if let Some(map) = self.stats.lock().expect("stats map lock").as_ref() {
            for entry in map.iter().flatten() {
                let (key, s) = entry;
                let Some(vip) = kernel::vip_of(&key.service) else {
                    continue;
                };
                let backend = kernel::socket_of(&key.backend);
                // Once per VIP per scrape (a VIP has one entry per backend).
                let service = services
                    .entry(vip)
                    .or_insert_with(|| {
                        labels
                            .service(&vip)
                            .unwrap_or_else(|| ServiceLabels::from_host(&vip.ip.to_string()))
                    })
                    .clone();
                let l = IstioLabels::new(None, &service, labels.workload(&backend), "tcp");
                let t = totals.entry(l).or_default();
                t.connections_opened += s.connections_opened;
                t.connections_closed += s.connections_closed;
                t.bytes_sent += s.bytes_sent;
                t.bytes_received += s.bytes_received;
            }
        }
        let families: [CounterFamily; 4] = [
            (
                "istio_tcp_connections_opened",
                "TCP connections opened",
                |s| s.connections_opened,
            ),
            (
                "istio_tcp_connections_closed",
                "TCP connections closed",
                |s| s.connections_closed,
            ),
            (
                "istio_tcp_sent_bytes",
                "Bytes sent by clients on closed TCP connections",
                |s| s.bytes_sent,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes received by clients on closed TCP connections",
                |s| s.bytes_received,
            ),
        ];
        if let Some(map) = self.denied.lock().expect("denied map lock").as_ref() {
            let mut family = encoder.encode_descriptor(
                "steerd_egress_denied",
                "Connections to unregistered destinations refused by REGISTRY_ONLY",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (ip, n) in crate::dataplane::egress::denied(map) {
                let labels = [("destination_ip".to_string(), ip.to_string())];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        if let Some(map) = self.authz_denied.lock().expect("authz map lock").as_ref() {
            let mut family = encoder.encode_descriptor(
                "steerd_authz_denied",
                "TCP connections refused in the kernel by AuthorizationPolicies",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for d in crate::dataplane::authz::denied_counts(map) {
                let workload = labels
                    .authz_workload(&d.address)
                    .unwrap_or_else(|| "unknown".into());
                let labels = [
                    ("destination_ip".to_string(), d.address.to_string()),
                    ("destination_port".to_string(), d.port.to_string()),
                    ("destination_workload".to_string(), workload),
                ];
                ConstCounter::new(d.connections).encode(family.encode_family(&labels)?)?;
            }
        }
        if let Some(map) = self.redirect.lock().expect("redirect map lock").as_ref() {
            encode_redirect(&mut encoder, &redirect_totals(map))?;
        }
        for (name, help, value) in families {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (l, s) in &totals {
                ConstCounter::new(value(s)).encode(family.encode_family(l)?)?;
            }
        }
        Ok(())
    }
}

/// The socket redirect's counters summed over CPUs.
fn redirect_totals(
    map: &aya::maps::PerCpuArray<MapData, steerd_common::RedirectStats>,
) -> steerd_common::RedirectStats {
    let mut total = steerd_common::RedirectStats::default();
    if let Ok(per_cpu) = map.get(&0, 0) {
        for s in per_cpu.iter() {
            total.sockets += s.sockets;
            total.redirected_messages += s.redirected_messages;
            total.redirected_bytes += s.redirected_bytes;
            total.tcp_messages += s.tcp_messages;
            total.tcp_bytes += s.tcp_bytes;
        }
    }
    total
}

fn encode_redirect(
    encoder: &mut DescriptorEncoder,
    totals: &steerd_common::RedirectStats,
) -> Result<(), std::fmt::Error> {
    use prometheus_client::metrics::MetricType;
    let family = encoder.encode_descriptor(
        "steerd_socket_redirect_sockets",
        "Node-local sockets of the L7 path tracked for the in-kernel socket redirect",
        None,
        MetricType::Counter,
    )?;
    ConstCounter::new(totals.sockets).encode(family)?;
    for (name, help, redirected, tcp) in [
        (
            "steerd_socket_redirect_messages",
            "Sends of tracked sockets, by path: handed to the peer socket, or over TCP",
            totals.redirected_messages,
            totals.tcp_messages,
        ),
        (
            "steerd_socket_redirect_bytes",
            "Bytes sent by tracked sockets, by path: handed to the peer socket, or over TCP",
            totals.redirected_bytes,
            totals.tcp_bytes,
        ),
    ] {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (path, n) in [("redirect", redirected), ("tcp", tcp)] {
            let labels = [("path".to_string(), path.to_string())];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    labels: Arc<RwLock<Arc<LabelIndex>>>,
    tcp: Arc<TcpCollector>,
    pub plan_generation: Gauge,
    pub plan_apply_seconds: Histogram,
    pub map_services: Gauge,
    pub map_slots: Gauge,
    pub config_errors: Gauge,
    pub map_write_errors: Counter,
    pub requests: Family<IstioLabels, Counter>,
    pub request_duration: Family<IstioLabels, Histogram>,
    request_series: RequestSeriesCache,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let labels = Arc::new(RwLock::new(Arc::new(LabelIndex::default())));
        let tcp = Arc::new(TcpCollector {
            stats: Mutex::new(None),
            denied: Mutex::new(None),
            authz_denied: Mutex::new(None),
            redirect: Mutex::new(None),
            labels: labels.clone(),
        });
        let plan_generation = Gauge::default();
        let plan_apply_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        let map_services = Gauge::default();
        let map_slots = Gauge::default();
        let config_errors = Gauge::default();
        let map_write_errors = Counter::default();
        let requests = Family::<IstioLabels, Counter>::default();
        let request_duration = Family::<IstioLabels, Histogram>::new_with_constructor(|| {
            // Istio's default buckets for istio_request_duration_milliseconds.
            Histogram::new([
                0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                10000.0, 30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
            ])
        });
        let mut registry = Registry::default();
        registry.register(
            "steerd_plan_generation",
            "Plans compiled and written to the maps",
            plan_generation.clone(),
        );
        registry.register(
            "steerd_plan_apply_seconds",
            "Time to compile a configuration snapshot and write its plan to the maps",
            plan_apply_seconds.clone(),
        );
        registry.register(
            "steerd_map_services",
            "Service entries in the kernel map",
            map_services.clone(),
        );
        registry.register(
            "steerd_map_slots",
            "Alias-table slots in the kernel map (live and awaiting collection)",
            map_slots.clone(),
        );
        registry.register(
            "steerd_config_errors",
            "Configuration objects currently rejected (their last good version serves)",
            config_errors.clone(),
        );
        registry.register(
            "steerd_map_write_errors",
            "Plan writes to the kernel maps that failed",
            map_write_errors.clone(),
        );
        registry.register(
            "istio_requests",
            "Requests routed by the L7 proxy",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request durations through the L7 proxy",
            request_duration.clone(),
        );
        registry.register_collector(Box::new(tcp.clone()));
        Self {
            registry,
            labels,
            tcp,
            plan_generation,
            plan_apply_seconds,
            map_services,
            map_slots,
            config_errors,
            map_write_errors,
            requests,
            request_duration,
            request_series: RequestSeriesCache::default(),
        }
    }

    /// The series of a request with these labels.
    pub fn request_series(&self, key: &RequestKey<'_>) -> RequestSeries {
        if let Some(series) = self
            .request_series
            .series
            .read()
            .expect("request series lock")
            .get(key)
        {
            return series.clone();
        }
        let service = ServiceLabels::from_host(key.service);
        let mut labels = IstioLabels::new(key.source, &service, key.destination, "http");
        labels.response_code = key.response_code.to_string();
        labels.response_flags = key.response_flags.to_string();
        let series = RequestSeries {
            requests: self.requests.get_or_create(&labels).clone(),
            duration: self.request_duration.get_or_create(&labels).clone(),
        };
        self.request_series
            .series
            .write()
            .expect("request series lock")
            .insert(
                OwnedRequestKey {
                    source: key.source.cloned(),
                    service: key.service.to_owned(),
                    destination: key.destination.cloned(),
                    response_code: key.response_code,
                    response_flags: key.response_flags.to_owned(),
                },
                series.clone(),
            );
        series
    }

    /// Hands the kernel's counter map to the scraper.
    pub fn attach_stats(&self, map: aya::maps::HashMap<MapData, StatsKey, BackendStats>) {
        *self.tcp.stats.lock().expect("stats map lock") = Some(map);
    }

    /// Hands the kernel's REGISTRY_ONLY refusal counters to the scraper.
    pub fn attach_denied(&self, map: aya::maps::HashMap<MapData, steerd_common::Addr, u64>) {
        *self.tcp.denied.lock().expect("denied map lock") = Some(map);
    }

    /// Hands the kernel's AuthorizationPolicy refusal counters to the scraper.
    pub fn attach_authz_denied(&self, map: BpfHashMap<MapData, steerd_common::AuthzDestKey, u64>) {
        *self.tcp.authz_denied.lock().expect("authz map lock") = Some(map);
    }

    /// Hands the socket redirect's counters to the scraper.
    pub fn attach_redirect_stats(
        &self,
        map: aya::maps::PerCpuArray<MapData, steerd_common::RedirectStats>,
    ) {
        *self.tcp.redirect.lock().expect("redirect map lock") = Some(map);
    }

    /// Labels for the plan now in the maps.
    pub fn set_plan(&self, plan: &Plan) {
        *self.labels.write().expect("label index lock") = Arc::new(LabelIndex::from_plan(plan));
    }

    pub fn label_index(&self) -> Arc<LabelIndex> {
        self.labels.read().expect("label index lock").clone()
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_labels_split_kubernetes_hosts() {
        let l = ServiceLabels::from_host("reviews.shop.svc.cluster.local");
        assert_eq!((l.name.as_str(), l.namespace.as_str()), ("reviews", "shop"));
        let l = ServiceLabels::from_host("api.example.com");
        assert_eq!(
            (l.name.as_str(), l.namespace.as_str()),
            ("api.example.com", "unknown")
        );
    }

    #[test]
    fn exposition_has_istio_and_steerd_names() {
        let m = Metrics::new();
        m.plan_generation.set(3);
        let service = ServiceLabels::from_host("reviews.shop.svc.cluster.local");
        let dest = Workload {
            name: "reviews-v2".into(),
            namespace: "shop".into(),
            app: "reviews".into(),
            version: "v2".into(),
        };
        let mut labels = IstioLabels::new(None, &service, Some(&dest), "http");
        labels.response_code = "200".into();
        m.requests.get_or_create(&labels).inc();
        let text = m.encode();
        assert!(text.contains("steerd_plan_generation 3"), "{text}");
        assert!(
            text.contains("istio_requests_total{reporter=\"source\""),
            "{text}"
        );
        assert!(text.contains("destination_version=\"v2\""), "{text}");
        assert!(
            text.contains("destination_service=\"reviews.shop.svc.cluster.local\""),
            "{text}"
        );
        assert!(
            text.contains("# TYPE istio_tcp_connections_opened counter"),
            "{text}"
        );
    }

    #[test]
    fn request_series_are_resolved_once_per_label_set() {
        let m = Metrics::new();
        let source = Workload {
            name: "productpage-v1".into(),
            namespace: "shop".into(),
            app: "productpage".into(),
            version: "v1".into(),
        };
        let dest = Workload {
            name: "reviews-v2".into(),
            namespace: "shop".into(),
            app: "reviews".into(),
            version: "v2".into(),
        };
        let key = |code| RequestKey {
            source: Some(&source),
            service: "reviews.shop.svc.cluster.local",
            destination: Some(&dest),
            response_code: code,
            response_flags: "-",
        };
        m.request_series(&key(200)).requests.inc();
        // The borrowed key finds the owned entry: both hash alike.
        let cache = m.request_series.series.read().unwrap();
        assert!(cache.get(&key(200)).is_some());
        assert!(cache.get(&key(503)).is_none());
        drop(cache);
        m.request_series(&key(200)).requests.inc();
        m.request_series(&key(503)).requests.inc();
        assert_eq!(m.request_series.series.read().unwrap().len(), 2);
        let text = m.encode();
        assert!(
            text.contains("response_code=\"200\",response_flags=\"-\",connection_security_policy=\"unknown\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("source_workload=\"productpage-v1\""),
            "{text}"
        );
    }
}
