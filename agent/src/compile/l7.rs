//! Compiling VirtualService `http` rules and DestinationRule traffic policies into the
//! [`HttpRoutes`] the L7 proxy evaluates (Istio's semantics, field by field).

use super::http::{
    Cluster, ClusterPolicy, CorsPolicy, Fault, HashKey, HeaderOps, HttpDestination, HttpRoutes,
    HttpRule, LoadBalancer, LocalityPolicy, Mirror, OutlierPolicy, Redirect, RequestMatch,
    RetryPolicy, Rewrite, RouteAction, StrMatch, UpstreamCa, UpstreamTls, Warmup,
};
use super::registry::{self, RegistryService, resolve_host};
use super::{Ctx, cluster_name};
use crate::model::Resource;
use crate::model::istio::{self, AbortError, DelayKind, HttpBody, RedirectPort, StringMatch};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Clusters built for one port's routes, shared by every rule that names them.
pub(super) type ClusterCache = HashMap<String, Arc<Cluster>>;

fn duration(d: Option<crate::model::duration::Duration>) -> Option<Duration> {
    d.and_then(|d| d.as_std())
}

fn str_match(m: &StringMatch) -> Result<StrMatch, regex::Error> {
    Ok(match m {
        StringMatch::Exact(s) => StrMatch::Exact(s.clone()),
        StringMatch::Prefix(s) => StrMatch::Prefix(s.clone()),
        StringMatch::Regex(r) => StrMatch::regex(r)?,
        StringMatch::Unset => StrMatch::Present,
    })
}

fn header_ops(ops: Option<&istio::HeaderOperations>) -> HeaderOps {
    let Some(ops) = ops else {
        return HeaderOps::default();
    };
    HeaderOps {
        set: ops
            .set
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect(),
        add: ops
            .add
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect(),
        remove: ops.remove.iter().map(|k| k.to_ascii_lowercase()).collect(),
    }
}

/// Istio's `Percent` or the deprecated integer percent; unset means 0 for faults (Istio's
/// translateFault) and 100 for mirrors.
fn percent(p: Option<istio::Percent>, legacy: Option<i32>, default: f64) -> f64 {
    match (p, legacy) {
        (Some(p), _) => p.value,
        (None, Some(i)) => i as f64,
        (None, None) => default,
    }
}

fn retry_policy(r: Option<&istio::HttpRetry>) -> RetryPolicy {
    let Some(r) = r else {
        return RetryPolicy::istio_default();
    };
    let attempts = r.attempts.unwrap_or(0).max(0) as u32;
    if attempts == 0 {
        return RetryPolicy::none();
    }
    let on = r.retry_on.clone().unwrap_or_else(|| {
        "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes".into()
    });
    let mut policy = RetryPolicy {
        attempts,
        per_try_timeout: duration(r.per_try_timeout),
        retry_on: Vec::new(),
        retriable_status_codes: Vec::new(),
    };
    for part in on.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        // Istio turns numeric entries into retriable-status-codes.
        match part.parse::<u16>() {
            Ok(code) => {
                policy.retriable_status_codes.push(code);
                if !policy
                    .retry_on
                    .iter()
                    .any(|r| r == "retriable-status-codes")
                {
                    policy.retry_on.push("retriable-status-codes".into());
                }
            }
            Err(_) => policy.retry_on.push(part.to_string()),
        }
    }
    if policy
        .retry_on
        .iter()
        .any(|r| r == "retriable-status-codes")
        && policy.retriable_status_codes.is_empty()
    {
        policy.retriable_status_codes.push(503);
    }
    policy
}

/// A DestinationRule's `localityLbSetting` (Istio's mesh default: enabled, with failover by
/// locality once outlier detection is set).
fn locality_policy(
    setting: Option<&istio::LocalityLbSetting>,
    outlier: bool,
) -> Option<LocalityPolicy> {
    let Some(s) = setting else {
        return Some(LocalityPolicy {
            failover_enabled: outlier,
            ..Default::default()
        });
    };
    if s.enabled == Some(false) {
        return None;
    }
    Some(LocalityPolicy {
        distribute: s
            .distribute
            .iter()
            .map(|d| {
                (
                    d.from.clone().unwrap_or_default(),
                    d.to.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                )
            })
            .collect(),
        failover: s
            .failover
            .iter()
            .map(|f| {
                (
                    f.from.clone().unwrap_or_default(),
                    f.to.clone().unwrap_or_default(),
                )
            })
            .collect(),
        failover_priority: s.failover_priority.clone(),
        // Distribute and failover exclude each other in Istio: distribute wins.
        failover_enabled: outlier && s.distribute.is_empty(),
    })
}

/// Merges a DestinationRule's policies for one subset and port: subset-level settings override
/// host-level ones, port-level settings override both, each at the level of whole sections
/// (loadBalancer, connectionPool, outlierDetection), as Istio does.
fn cluster_policy(
    dr: Option<&istio::DestinationRule>,
    subset: Option<&str>,
    port: u16,
    http2_port: bool,
) -> ClusterPolicy {
    let mut lb = None;
    let mut pool = None;
    let mut outlier = None;
    let mut layer = |tp: &istio::TrafficPolicy| {
        if tp.load_balancer.is_some() {
            lb = tp.load_balancer.clone();
        }
        if tp.connection_pool.is_some() {
            pool = tp.connection_pool.clone();
        }
        if tp.outlier_detection.is_some() {
            outlier = tp.outlier_detection.clone();
        }
        for pl in &tp.port_level_settings {
            if pl.port.as_ref().and_then(|p| p.number) == Some(port as u32) {
                if pl.load_balancer.is_some() {
                    lb = pl.load_balancer.clone();
                }
                if pl.connection_pool.is_some() {
                    pool = pl.connection_pool.clone();
                }
                if pl.outlier_detection.is_some() {
                    outlier = pl.outlier_detection.clone();
                }
            }
        }
    };
    if let Some(dr) = dr {
        if let Some(tp) = &dr.traffic_policy {
            layer(tp);
        }
        if let Some(tp) = subset
            .and_then(|s| dr.subsets.iter().find(|x| x.name == s))
            .and_then(|s| s.traffic_policy.as_deref())
        {
            layer(tp);
        }
    }
    let load_balancer = match lb.as_ref().and_then(|l| l.policy.as_ref()) {
        Some(istio::LbPolicy::Simple(istio::SimpleLb::RoundRobin)) => LoadBalancer::RoundRobin,
        Some(istio::LbPolicy::Simple(istio::SimpleLb::Random | istio::SimpleLb::Passthrough)) => {
            LoadBalancer::Random
        }
        Some(istio::LbPolicy::ConsistentHash(ch)) => match &ch.hash_key {
            Some(istio::HashKey::HttpHeaderName(h)) => {
                LoadBalancer::Hash(HashKey::Header(h.to_ascii_lowercase()))
            }
            Some(istio::HashKey::HttpCookie(c)) => LoadBalancer::Hash(HashKey::Cookie {
                name: c.name.clone(),
                // A zero ttl still generates the cookie (a session cookie), so it is kept.
                ttl: c.ttl.and_then(|d| d.as_std()),
                path: c.path.clone().filter(|p| !p.is_empty()),
                attributes: c
                    .attributes
                    .iter()
                    .map(|a| (a.name.clone(), a.value.clone().filter(|v| !v.is_empty())))
                    .collect(),
            }),
            Some(istio::HashKey::UseSourceIp(true)) => LoadBalancer::Hash(HashKey::SourceIp),
            Some(istio::HashKey::HttpQueryParameterName(q)) => {
                LoadBalancer::Hash(HashKey::QueryParam(q.clone()))
            }
            _ => LoadBalancer::LeastRequest,
        },
        // Istio's default (and LEAST_CONN's modern meaning).
        _ => LoadBalancer::LeastRequest,
    };
    let warmup = warmup(lb.as_ref(), &load_balancer);
    let outlier_set = outlier.is_some();
    let tcp = pool.as_ref().and_then(|p| p.tcp.as_ref());
    let http = pool.as_ref().and_then(|p| p.http.as_ref());
    let positive = |v: Option<i32>| v.filter(|v| *v > 0).map(|v| v as u32);
    ClusterPolicy {
        load_balancer,
        connect_timeout: tcp.and_then(|t| duration(t.connect_timeout)),
        max_connections: positive(tcp.and_then(|t| t.max_connections)),
        max_pending_requests: positive(http.and_then(|h| h.http1_max_pending_requests)),
        max_requests: positive(http.and_then(|h| h.http2_max_requests)),
        max_requests_per_connection: positive(http.and_then(|h| h.max_requests_per_connection)),
        idle_timeout: http.and_then(|h| duration(h.idle_timeout)),
        outlier: outlier.map(|o| OutlierPolicy {
            consecutive_5xx: o.consecutive_5xx_errors,
            // The deprecated consecutiveErrors meant gateway errors in Istio.
            consecutive_gateway_errors: o
                .consecutive_gateway_errors
                .or(o.consecutive_errors.filter(|e| *e > 0).map(|e| e as u32)),
            interval: duration(o.interval).unwrap_or(Duration::from_secs(10)),
            base_ejection_time: duration(o.base_ejection_time).unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: o
                .max_ejection_percent
                .map_or(10, |p| p.clamp(0, 100) as u32),
        }),
        http2: http2_port
            || matches!(
                http.and_then(|h| h.h2_upgrade_policy),
                Some(istio::H2UpgradePolicy::Upgrade)
            ),
        locality: locality_policy(
            lb.as_ref().and_then(|l| l.locality_lb_setting.as_ref()),
            outlier_set,
        ),
        // Filled by `Ctx::upstream_tls`, which can read Secrets.
        tls: None,
        warmup,
    }
}

/// `loadBalancer.warmup` or the deprecated `warmupDurationSecs` (the newer field wins), for the
/// balancers Istio configures Envoy's slow start on: ROUND_ROBIN and LEAST_REQUEST (also the
/// default). RANDOM and consistent hashing ignore it, as in Istio.
fn warmup(lb: Option<&istio::LoadBalancerSettings>, balancer: &LoadBalancer) -> Option<Warmup> {
    if !matches!(
        balancer,
        LoadBalancer::RoundRobin | LoadBalancer::LeastRequest
    ) {
        return None;
    }
    let lb = lb?;
    let (window, min_weight_percent, aggression) = match (&lb.warmup, lb.warmup_duration_secs) {
        (Some(w), _) => (w.duration.as_std()?, w.minimum_percent, w.aggression),
        (None, Some(d)) => (d.as_std()?, None, None),
        (None, None) => return None,
    };
    // Validation rejects the out-of-range values; these guards keep the factor finite anyway.
    (!window.is_zero()).then(|| Warmup {
        window,
        min_weight_percent: min_weight_percent.unwrap_or(10.0).clamp(0.0, 100.0),
        aggression: aggression.filter(|a| *a > 0.0).unwrap_or(1.0),
    })
}

impl<'a> Ctx<'a> {
    /// The HTTP routing of one service port. Without a VirtualService (or one without `http`
    /// rules): Istio's implicit route to the service itself, with the default retry policy and
    /// no timeout.
    pub(super) fn http_routes(
        &mut self,
        svc: &RegistryService,
        port: &registry::ServicePort,
        vs: Option<&'a Resource<istio::VirtualService>>,
    ) -> HttpRoutes {
        let mut cache = ClusterCache::new();
        if let Some(vs) = vs.filter(|vs| !vs.spec.http.is_empty()) {
            let mut rules = Vec::new();
            for r in self.expanded_http(vs) {
                if let Some(rule) = self.expanded_rule(&r, port.port, &mut cache) {
                    rules.push(rule);
                }
            }
            return HttpRoutes {
                virtual_service: Some(vs.meta.key()),
                rules,
            };
        }
        let cluster = self.cluster(&svc.hostname, port.port, None, &mut cache);
        HttpRoutes {
            virtual_service: None,
            rules: vec![HttpRule {
                index: 0,
                name: Some("default".into()),
                matches: Vec::new(),
                action: RouteAction::Forward(vec![HttpDestination {
                    cluster,
                    weight: 100,
                    headers_request: HeaderOps::default(),
                    headers_response: HeaderOps::default(),
                }]),
                rewrite: None,
                timeout: None,
                retries: RetryPolicy::istio_default(),
                fault: None,
                mirrors: Vec::new(),
                headers_request: HeaderOps::default(),
                headers_response: HeaderOps::default(),
                cors: None,
                delegate: None,
            }],
        }
    }

    pub(super) fn http_rule(
        &mut self,
        vs: &Resource<istio::VirtualService>,
        index: usize,
        route: &istio::HttpRoute,
        port: u16,
        cache: &mut ClusterCache,
    ) -> Option<HttpRule> {
        let field = format!("spec.http[{index}]");
        let mut matches = Vec::new();
        for (m_index, m) in route.matches.iter().enumerate() {
            match self.request_match(m) {
                Ok(rm) => matches.push(rm),
                Err(e) => {
                    // Validation reports the regex; a rule whose match cannot compile never
                    // matches, like a route Envoy rejected.
                    self.warn(
                        vs,
                        format!("{field}.match[{m_index}]"),
                        None,
                        format!("invalid regex, the match block is skipped: {e}"),
                    );
                }
            }
        }
        if !route.matches.is_empty() && matches.is_empty() {
            return None;
        }
        if route.delegate.is_some() {
            // Delegation is expanded before rules are compiled (`expanded_http`); a route that
            // still delegates has nothing to route to.
            return None;
        }
        let cors = route
            .cors_policy
            .as_ref()
            .map(|c| Arc::new(self.cors_policy(vs, &format!("{field}.corsPolicy"), c)));
        let action = if let Some(r) = &route.redirect {
            RouteAction::Redirect(Redirect {
                uri: r.uri.clone().or_else(|| r.prefix_rewrite.clone()),
                authority: r.authority.clone(),
                scheme: r.scheme.clone(),
                port: match r.port {
                    Some(RedirectPort::Number(n)) => u16::try_from(n).ok(),
                    Some(RedirectPort::Derive(istio::DerivePort::FromRequestPort)) => Some(port),
                    Some(RedirectPort::Derive(istio::DerivePort::FromProtocolDefault)) => Some(80),
                    None => None,
                },
                code: r
                    .redirect_code
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(301),
            })
        } else if let Some(d) = &route.direct_response {
            RouteAction::DirectResponse {
                status: u16::try_from(d.status).unwrap_or(500),
                body: d.body.as_ref().map(|b| match b {
                    HttpBody::String(s) => s.clone(),
                    HttpBody::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
                    HttpBody::Unset => String::new(),
                }),
            }
        } else {
            let single = route.route.len() == 1;
            let mut dests = Vec::new();
            for (d_index, rd) in route.route.iter().enumerate() {
                let weight = if single {
                    rd.weight.unwrap_or(100)
                } else {
                    rd.weight.unwrap_or(0)
                }
                .max(0) as u32;
                let dest_field = format!("{field}.route[{d_index}].destination");
                let cluster =
                    self.destination_cluster(vs, &dest_field, &rd.destination, port, cache);
                dests.push(HttpDestination {
                    cluster,
                    weight,
                    headers_request: header_ops(
                        rd.headers.as_ref().and_then(|h| h.request.as_ref()),
                    ),
                    headers_response: header_ops(
                        rd.headers.as_ref().and_then(|h| h.response.as_ref()),
                    ),
                });
            }
            RouteAction::Forward(dests)
        };
        let rewrite = route.rewrite.as_ref().map(|r| Rewrite {
            uri: r.uri.clone(),
            uri_regex: r.uri_regex_rewrite.as_ref().and_then(|rr| {
                let re = regex::Regex::new(rr.pattern.as_deref()?).ok()?;
                Some((re, rr.rewrite.clone().unwrap_or_default()))
            }),
            authority: r.authority.clone(),
        });
        let fault = route.fault.as_ref().map(|f| Fault {
            delay: f.delay.as_ref().and_then(|d| {
                let delay = match d.delay? {
                    DelayKind::Fixed(d) | DelayKind::Exponential(d) => d.as_std()?,
                };
                Some((delay, percent(d.percentage, d.percent, 0.0)))
            }),
            abort: f.abort.as_ref().and_then(|a| match &a.error {
                Some(AbortError::HttpStatus(s)) => {
                    Some((u16::try_from(*s).ok()?, percent(a.percentage, None, 0.0)))
                }
                // gRPC and HTTP/2 aborts answer as an HTTP 503 here.
                Some(_) => Some((503, percent(a.percentage, None, 0.0))),
                None => None,
            }),
        });
        let mut mirrors = Vec::new();
        if let Some(m) = &route.mirror {
            let cluster = self.destination_cluster(vs, &format!("{field}.mirror"), m, port, cache);
            let pct = percent(
                route.mirror_percentage,
                route.mirror_percent.map(|p| p as i32),
                100.0,
            );
            mirrors.push(Mirror {
                cluster,
                percentage: pct,
            });
        }
        for (m_index, m) in route.mirrors.iter().enumerate() {
            let cluster = self.destination_cluster(
                vs,
                &format!("{field}.mirrors[{m_index}].destination"),
                &m.destination,
                port,
                cache,
            );
            mirrors.push(Mirror {
                cluster,
                percentage: percent(m.percentage, None, 100.0),
            });
        }
        Some(HttpRule {
            index,
            name: route.name.clone(),
            matches,
            action,
            rewrite,
            // 0s means "no timeout" in Istio.
            timeout: duration(route.timeout).filter(|t| !t.is_zero()),
            retries: retry_policy(route.retries.as_ref()),
            fault,
            mirrors,
            headers_request: header_ops(route.headers.as_ref().and_then(|h| h.request.as_ref())),
            headers_response: header_ops(route.headers.as_ref().and_then(|h| h.response.as_ref())),
            cors,
            delegate: None,
        })
    }

    /// The rule of one route after delegation: a delegated route is compiled as written in its
    /// delegate (diagnostics name it there) and numbered by the root route that delegated.
    pub(super) fn expanded_rule(
        &mut self,
        r: &super::delegate::ExpandedRoute<'_>,
        port: u16,
        cache: &mut ClusterCache,
    ) -> Option<HttpRule> {
        let mut rule = self.http_rule(r.owner, r.index, &r.route, port, cache)?;
        if let Some(root_index) = r.delegated_by {
            rule.delegate = Some(super::http::DelegateRef {
                virtual_service: r.owner.meta.key(),
                index: r.index,
            });
            rule.index = root_index;
        }
        Some(rule)
    }

    /// Istio's translation of a `corsPolicy` for Envoy's CORS filter: `allowOrigins` as string
    /// matchers (or the deprecated `allowOrigin` list as exact ones), the lists joined with `,`,
    /// `maxAge` in whole seconds.
    fn cors_policy(
        &mut self,
        vs: &Resource<istio::VirtualService>,
        field: &str,
        c: &istio::CorsPolicy,
    ) -> CorsPolicy {
        let mut allow_origins = Vec::new();
        if c.allow_origins.is_empty() {
            allow_origins.extend(c.allow_origin.iter().cloned().map(StrMatch::Exact));
        } else {
            for (i, m) in c.allow_origins.iter().enumerate() {
                match str_match(m) {
                    // An empty matcher is refused by validation; it never allows anything.
                    Ok(StrMatch::Present) => {}
                    Ok(m) => allow_origins.push(m),
                    Err(e) => self.warn(
                        vs,
                        format!("{field}.allowOrigins[{i}]"),
                        None,
                        format!("invalid regex, the origin is not allowed: {e}"),
                    ),
                }
            }
        }
        CorsPolicy {
            allow_origins,
            allow_methods: c.allow_methods.join(","),
            allow_headers: c.allow_headers.join(","),
            expose_headers: c.expose_headers.join(","),
            max_age: c
                .max_age
                .and_then(|d| d.as_std())
                .map(|d| d.as_secs().to_string()),
            allow_credentials: c.allow_credentials == Some(true),
            forward_unmatched_preflights: c.unmatched_preflights
                != Some(istio::UnmatchedPreflights::Ignore),
        }
    }

    fn request_match(&self, m: &istio::HttpMatchRequest) -> Result<RequestMatch, regex::Error> {
        let opt = |s: &Option<StringMatch>| s.as_ref().map(str_match).transpose();
        let map = |h: &std::collections::BTreeMap<String, StringMatch>| -> Result<Vec<(String, StrMatch)>, regex::Error> {
            h.iter().map(|(k, v)| Ok((k.to_ascii_lowercase(), str_match(v)?))).collect()
        };
        Ok(RequestMatch {
            name: m.name.clone(),
            uri: opt(&m.uri)?,
            scheme: opt(&m.scheme)?,
            method: opt(&m.method)?,
            authority: opt(&m.authority)?,
            headers: map(&m.headers)?,
            without_headers: map(&m.without_headers)?,
            query_params: m
                .query_params
                .iter()
                .map(|(k, v)| Ok((k.clone(), str_match(v)?)))
                .collect::<Result<_, regex::Error>>()?,
            port: m.port.and_then(|p| u16::try_from(p).ok()),
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
            gateways: m.gateways.clone(),
            ignore_uri_case: m.ignore_uri_case.unwrap_or(false),
        })
    }

    /// The cluster of a route destination. A host or subset that does not exist still gets a
    /// cluster (with no endpoints): as in Istio, its share of requests fails with 503 instead of
    /// silently moving to the other destinations.
    fn destination_cluster(
        &mut self,
        vs: &Resource<istio::VirtualService>,
        field: &str,
        dest: &istio::Destination,
        incoming_port: u16,
        cache: &mut ClusterCache,
    ) -> Arc<Cluster> {
        let host = resolve_host(&dest.host, &vs.meta.namespace);
        let port = dest
            .port
            .as_ref()
            .and_then(|p| p.number)
            .map_or(incoming_port, |n| n as u16);
        if !self.registry.services.contains_key(&host) {
            self.warn(
                vs,
                format!("{field}.host"),
                Some("IST0101"),
                format!("Referenced host not found: {:?}", dest.host),
            );
        } else if let Some(subset) = &dest.subset
            && !self
                .subsets
                .get(&host)
                .is_some_and(|(_, s)| s.contains_key(subset))
        {
            self.warn(
                vs,
                format!("{field}.subset"),
                Some("IST0101"),
                format!("Referenced host+subset in destinationrule not found: \"{host}+{subset}\""),
            );
        }
        self.cluster(&host, port, dest.subset.as_deref(), cache)
    }

    fn cluster(
        &mut self,
        host: &str,
        port: u16,
        subset: Option<&str>,
        cache: &mut ClusterCache,
    ) -> Arc<Cluster> {
        let name = cluster_name(port, subset, host);
        if let Some(c) = cache.get(&name) {
            return c.clone();
        }
        let svc = self.registry.services.get(host);
        let labels =
            subset.and_then(|s| self.subsets.get(host).and_then(|(_, m)| m.get(s)).cloned());
        let mut endpoints = match (svc, subset, &labels) {
            (Some(svc), None, _) => self.endpoints_filtered(svc, port, None, 1.0),
            (Some(svc), Some(_), Some(l)) => self.endpoints_filtered(svc, port, Some(l), 1.0),
            _ => Vec::new(),
        };
        let shared = super::cluster_names(name.as_str().into());
        for e in &mut endpoints {
            e.clusters = shared.clone();
        }
        // Input order (files, watch events) must not change the plan.
        endpoints.sort_by(super::backend_order);
        let http2_port = svc
            .and_then(|s| s.ports.iter().find(|p| p.port == port))
            .is_some_and(|p| {
                matches!(
                    p.protocol.as_deref(),
                    Some("HTTP2" | "GRPC" | "GRPC-WEB" | "H2C")
                )
            });
        let dr = self.destination_rules.get(host).copied();
        if let Some(dr) = dr {
            self.report_hash_algorithms(dr);
        }
        let mut policy = cluster_policy(dr.map(|d| &d.spec), subset, port, http2_port);
        if let Some(dr) = dr {
            policy.tls = self.upstream_tls(dr, subset, port);
        }
        // The endpoints' values of the failoverPriority labels, from their workloads' labels.
        let labels = policy
            .locality
            .as_ref()
            .map(|l| super::http::failover_priority_labels(&l.failover_priority))
            .unwrap_or_default();
        let priority_labels = if labels.is_empty() {
            Vec::new()
        } else {
            endpoints
                .iter()
                .map(|e| {
                    let workload_labels = svc.and_then(|s| {
                        s.endpoints
                            .iter()
                            .find(|r| {
                                r.ip == e.addr.ip()
                                    && r.workload == e.workload
                                    && r.locality == e.locality
                            })
                            .map(|r| &r.labels)
                    });
                    let mut parts = e.locality.splitn(3, '/');
                    let locality = [(); 3].map(|_| parts.next().unwrap_or(""));
                    labels
                        .iter()
                        .map(|l| {
                            super::http::augmented_label(l, workload_labels, locality).to_string()
                        })
                        .collect()
                })
                .collect()
        };
        let cluster = Arc::new(Cluster {
            name: name.clone(),
            host: host.to_string(),
            port,
            subset: subset.map(str::to_string),
            endpoints,
            priority_labels,
            policy,
            destination_rule: dr.map(|d| d.meta.key()),
        });
        cache.insert(name, cluster.clone());
        cluster
    }
}

impl Ctx<'_> {
    /// The DestinationRule's `tls` for one subset and port (port-level over subset-level over
    /// host-level, as Istio merges them), as the proxy originates it. DISABLE: None.
    /// ISTIO_MUTUAL: None with a warning — steerd has no mesh CA, and the workloads it serves
    /// have no sidecar to terminate Istio mTLS, so requests stay plain text as before.
    fn upstream_tls(
        &mut self,
        dr: &Resource<istio::DestinationRule>,
        subset: Option<&str>,
        port: u16,
    ) -> Option<UpstreamTls> {
        let consider = |path: String,
                        tp: Option<&istio::TrafficPolicy>|
         -> Vec<(String, istio::ClientTlsSettings)> {
            let Some(tp) = tp else { return Vec::new() };
            let mut out = Vec::new();
            if let Some(t) = &tp.tls {
                out.push((format!("{path}.tls"), t.clone()));
            }
            for (i, pl) in tp.port_level_settings.iter().enumerate() {
                if pl.port.as_ref().and_then(|p| p.number) == Some(port as u32)
                    && let Some(t) = &pl.tls
                {
                    out.push((format!("{path}.portLevelSettings[{i}].tls"), t.clone()));
                }
            }
            out
        };
        let mut layers = consider(
            "spec.trafficPolicy".into(),
            dr.spec.traffic_policy.as_deref(),
        );
        if let Some((i, s)) = subset.and_then(|s| {
            dr.spec
                .subsets
                .iter()
                .enumerate()
                .find(|(_, x)| x.name == s)
        }) {
            layers.extend(consider(
                format!("spec.subsets[{i}].trafficPolicy"),
                s.traffic_policy.as_deref(),
            ));
        }
        let (path, tls) = layers.pop()?;
        let mode = tls.mode.unwrap_or(istio::ClientTlsMode::Disable);
        let mode = match mode {
            istio::ClientTlsMode::Disable => return None,
            istio::ClientTlsMode::IstioMutual => {
                self.dr_diag(
                    dr,
                    format!("{path}.mode"),
                    super::Level::Warning,
                    "ISTIO_MUTUAL needs Istio's mesh CA and a sidecar at the destination; steerd                      has neither, so requests to this destination are sent in plain text"
                        .into(),
                );
                return None;
            }
            istio::ClientTlsMode::Simple => "SIMPLE",
            istio::ClientTlsMode::Mutual => "MUTUAL",
        };
        let mut error = None;
        let secret = tls.credential_name.as_ref().map(|name| {
            let bare = name.strip_prefix("kubernetes://").unwrap_or(name);
            let key = match bare.split_once('/') {
                Some((ns, n)) => format!("{ns}/{n}"),
                None => format!("{}/{bare}", dr.meta.namespace),
            };
            let found = self
                .config
                .secrets
                .iter()
                .filter(|s| s.meta.key() == key)
                .min_by(|a, b| a.origin.cmp(&b.origin));
            (name.clone(), key, found.map(|s| s.spec.clone()))
        });
        if let Some((name, key, None)) = &secret {
            error = Some(format!("credentialName {name:?}: secret {key} not found"));
        }
        let ca = if tls.insecure_skip_verify == Some(true) {
            UpstreamCa::InsecureSkipVerify
        } else if let Some(path) = &tls.ca_certificates {
            UpstreamCa::File(path.into())
        } else if let Some((_, key, Some(spec))) = &secret
            && let Some(pem) = spec.ca_certificates()
        {
            UpstreamCa::Secret {
                name: key.clone(),
                pem: super::gateway::Pem(pem.into()),
            }
        } else {
            UpstreamCa::System
        };
        let client_certificate = (mode == "MUTUAL").then(|| {
            use super::gateway::{Credential, Pem};
            match (&secret, &tls.client_certificate, &tls.private_key) {
                (Some((_, key, Some(spec))), _, _) => match spec.certificate_and_key() {
                    Some((c, k)) => Credential::Secret {
                        name: key.clone(),
                        cert: Pem(c.into()),
                        key: Pem(k.into()),
                    },
                    None => Credential::Missing(format!(
                        "secret {key} has no tls.crt and tls.key (nor cert and key)"
                    )),
                },
                (Some((name, key, None)), _, _) => {
                    Credential::Missing(format!("credentialName {name:?}: secret {key} not found"))
                }
                (None, Some(c), Some(k)) => Credential::Files {
                    cert: c.into(),
                    key: k.into(),
                },
                _ => Credential::Missing(
                    "MUTUAL without credentialName nor clientCertificate/privateKey".into(),
                ),
            }
        });
        if let Some(super::gateway::Credential::Missing(reason)) = &client_certificate {
            error.get_or_insert_with(|| reason.clone());
        }
        if let Some(e) = &error {
            self.dr_diag(
                dr,
                path.clone(),
                super::Level::Error,
                format!("{e}; connections to this destination fail (503 UF)"),
            );
        }
        Some(UpstreamTls {
            mode,
            sni: tls.sni.clone().filter(|s| !s.is_empty()),
            subject_alt_names: tls.subject_alt_names.clone().unwrap_or_default(),
            ca,
            client_certificate,
            error,
        })
    }

    fn dr_diag(
        &mut self,
        dr: &Resource<istio::DestinationRule>,
        field: String,
        level: super::Level,
        message: String,
    ) {
        let d = super::Diagnostic {
            level,
            code: None,
            kind: "DestinationRule".into(),
            object: dr.meta.key(),
            origin: dr.origin.clone(),
            field,
            message,
        };
        // A DestinationRule's tls serves many clusters (ports, subsets): said once.
        if !self.diags.contains(&d) {
            self.diags.push(d);
        }
    }

    /// `consistentHash.ringHash`/`maglev`/`minimumRingSize` choose Envoy's hashing algorithm;
    /// steerd hashes every key with rendezvous hashing, which gives the same guarantees (a key
    /// sticks to its endpoint, and only a removed endpoint's keys move), so the settings are
    /// reported as not used rather than silently dropped.
    fn report_hash_algorithms(&mut self, dr: &Resource<istio::DestinationRule>) {
        fn collect<'d>(
            policies: &mut Vec<(String, &'d istio::LoadBalancerSettings)>,
            path: String,
            tp: Option<&'d istio::TrafficPolicy>,
        ) {
            let Some(tp) = tp else { return };
            if let Some(lb) = &tp.load_balancer {
                policies.push((format!("{path}.loadBalancer"), lb));
            }
            for (i, pl) in tp.port_level_settings.iter().enumerate() {
                if let Some(lb) = &pl.load_balancer {
                    policies.push((format!("{path}.portLevelSettings[{i}].loadBalancer"), lb));
                }
            }
        }
        let mut policies = Vec::new();
        collect(
            &mut policies,
            "spec.trafficPolicy".into(),
            dr.spec.traffic_policy.as_deref(),
        );
        for (i, subset) in dr.spec.subsets.iter().enumerate() {
            collect(
                &mut policies,
                format!("spec.subsets[{i}].trafficPolicy"),
                subset.traffic_policy.as_deref(),
            );
        }
        let mut found = Vec::new();
        let mut idle_warmups = Vec::new();
        for (path, lb) in policies {
            let warmup_field = if lb.warmup.is_some() {
                Some("warmup")
            } else {
                lb.warmup_duration_secs.map(|_| "warmupDurationSecs")
            };
            let slow_start_ignored = matches!(
                lb.policy,
                Some(istio::LbPolicy::ConsistentHash(_))
                    | Some(istio::LbPolicy::Simple(
                        istio::SimpleLb::Random | istio::SimpleLb::Passthrough
                    ))
            );
            if let (Some(field), true) = (warmup_field, slow_start_ignored) {
                idle_warmups.push(format!("{path}.{field}"));
            }
            let Some(ch) = lb.consistent_hash() else {
                continue;
            };
            let field = match (&ch.hash_algorithm, ch.minimum_ring_size) {
                (Some(istio::HashAlgorithm::RingHash(_)), _) => "ringHash",
                (Some(istio::HashAlgorithm::Maglev(_)), _) => "maglev",
                (None, Some(n)) if n > 0 => "minimumRingSize",
                _ => continue,
            };
            found.push(format!("{path}.consistentHash.{field}"));
        }
        for field in found {
            self.diags.push(super::Diagnostic {
                level: super::Level::Info,
                code: None,
                kind: "DestinationRule".into(),
                object: dr.meta.key(),
                origin: dr.origin.clone(),
                field,
                message: "steerd's L7 proxy hashes with rendezvous hashing (a key sticks to its \
                          endpoint, only a removed endpoint's keys move); the ring hash or maglev \
                          settings are not used"
                    .into(),
            });
        }
        for field in idle_warmups {
            self.diags.push(super::Diagnostic {
                level: super::Level::Info,
                code: None,
                kind: "DestinationRule".into(),
                object: dr.meta.key(),
                origin: dr.origin.clone(),
                field,
                message:
                    "warmup (slow start) applies to ROUND_ROBIN and LEAST_REQUEST only, as in \
                          Istio; with this load balancer it is not used"
                        .into(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{Plan, VipKey, compile, registry::Transport};
    use crate::model::{ConfigSet, parse_documents};

    /// `reviews` (HTTP on 9080, VIP 10.96.2.2) with pods v1, v2, v3, plus `extra` documents.
    pub(crate) fn reviews_plan(extra: &[&str]) -> Plan {
        let mut texts = vec![REVIEWS.to_string()];
        texts.extend(extra.iter().map(|t| t.to_string()));
        let mut cfg = ConfigSet::default();
        for (i, t) in texts.iter().enumerate() {
            let (objs, errs) = parse_documents(&format!("test{i}.yaml"), t);
            assert!(errs.is_empty(), "{errs:?}");
            cfg.extend(objs);
        }
        compile(&cfg)
    }

    const REVIEWS: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\nspec: {clusterIP: 10.96.2.2, selector: {app: reviews}, ports: [{name: http, port: 9080}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: r1, labels: {app: reviews, version: v1}}\nstatus: {podIP: 10.244.4.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: r2, labels: {app: reviews, version: v2}}\nstatus: {podIP: 10.244.4.2}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: r3, labels: {app: reviews, version: v3}}\nstatus: {podIP: 10.244.4.3}\n";

    pub(crate) fn routes(plan: &Plan) -> &HttpRoutes {
        let key = VipKey {
            ip: "10.96.2.2".parse().unwrap(),
            port: 9080,
            transport: Transport::Tcp,
        };
        plan.services[&key].http.as_deref().expect("an HTTP port")
    }

    fn default_cluster(plan: &Plan) -> &Cluster {
        let RouteAction::Forward(d) = &routes(plan).rules[0].action else {
            panic!("a forward rule");
        };
        &d[0].cluster
    }

    #[test]
    fn destination_rule_tls_is_merged_by_level_and_resolved() {
        let dr = |tls: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  host: reviews\n  trafficPolicy:\n{tls}"
            )
        };
        // Host level, overridden at port level.
        let plan = reviews_plan(&[&dr(
            "    tls: {mode: SIMPLE, sni: host.example}\n    portLevelSettings:\n    - port: {number: 9080}\n      tls: {mode: SIMPLE, sni: port.example, caCertificates: /etc/ca.pem, subjectAltNames: [a.example]}\n",
        )]);
        let tls = default_cluster(&plan).policy.tls.clone().expect("tls");
        assert_eq!(tls.sni.as_deref(), Some("port.example"));
        assert_eq!(tls.ca, UpstreamCa::File("/etc/ca.pem".into()));
        assert_eq!(tls.subject_alt_names, ["a.example"]);
        assert_eq!(tls.error, None);
        assert_eq!(
            tls.describe(),
            "SIMPLE sni=port.example ca=/etc/ca.pem san=a.example"
        );

        // Without caCertificates: the system CAs; DISABLE: plain text.
        let plan = reviews_plan(&[&dr("    tls: {mode: SIMPLE}\n")]);
        assert_eq!(
            default_cluster(&plan).policy.tls.as_ref().unwrap().ca,
            UpstreamCa::System
        );
        let plan = reviews_plan(&[&dr("    tls: {mode: DISABLE}\n")]);
        assert!(default_cluster(&plan).policy.tls.is_none());

        // ISTIO_MUTUAL: plain text, and said so.
        let plan = reviews_plan(&[&dr("    tls: {mode: ISTIO_MUTUAL}\n")]);
        assert!(default_cluster(&plan).policy.tls.is_none());
        assert!(
            plan.diagnostics
                .iter()
                .any(|d| d.field == "spec.trafficPolicy.tls.mode"
                    && d.message.contains("ISTIO_MUTUAL")),
            "{:?}",
            plan.diagnostics
        );

        // MUTUAL from a Secret that does not exist: an error naming it, connections fail.
        let plan = reviews_plan(&[&dr(
            "    tls: {mode: MUTUAL, credentialName: client-cert}\n",
        )]);
        let tls = default_cluster(&plan).policy.tls.clone().unwrap();
        assert_eq!(
            tls.error.as_deref(),
            Some("credentialName \"client-cert\": secret default/client-cert not found")
        );
        assert!(
            plan.diagnostics
                .iter()
                .any(|d| d.level == crate::compile::Level::Error
                    && d.field == "spec.trafficPolicy.tls"
                    && d.message.contains("503 UF")),
            "{:?}",
            plan.diagnostics
        );

        // MUTUAL from a Secret: its certificate, key and CA.
        let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: client-cert, namespace: default}\nstringData: {tls.crt: C, tls.key: K, ca.crt: CA}\n";
        let plan = reviews_plan(&[
            &dr("    tls: {mode: MUTUAL, credentialName: client-cert}\n"),
            secret,
        ]);
        let tls = default_cluster(&plan).policy.tls.clone().unwrap();
        assert_eq!(tls.error, None);
        assert!(
            matches!(tls.ca, UpstreamCa::Secret { ref name, .. } if name == "default/client-cert")
        );
        assert!(matches!(
            tls.client_certificate,
            Some(crate::compile::gateway::Credential::Secret { ref name, .. }) if name == "default/client-cert"
        ));
    }

    #[test]
    fn load_balancer_modes_compile() {
        let dr = |lb: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews}}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer: {lb}\n"
            )
        };
        let lb = |text: &str| {
            default_cluster(&reviews_plan(&[&dr(text)]))
                .policy
                .load_balancer
                .clone()
        };
        assert_eq!(
            lb(
                "{consistentHash: {httpCookie: {name: user, ttl: 60s, path: /, attributes: [{name: SameSite, value: Strict}, {name: Secure}]}}}"
            ),
            LoadBalancer::Hash(HashKey::Cookie {
                name: "user".into(),
                ttl: Some(Duration::from_secs(60)),
                path: Some("/".into()),
                attributes: vec![
                    ("SameSite".into(), Some("Strict".into())),
                    ("Secure".into(), None)
                ],
            })
        );
        assert_eq!(
            lb("{consistentHash: {httpCookie: {name: user, ttl: 0s}}}"),
            LoadBalancer::Hash(HashKey::Cookie {
                name: "user".into(),
                ttl: Some(Duration::ZERO),
                path: None,
                attributes: vec![],
            }),
            "a zero ttl generates a session cookie"
        );
        assert_eq!(
            lb("{consistentHash: {useSourceIp: true}}"),
            LoadBalancer::Hash(HashKey::SourceIp)
        );
        assert_eq!(
            lb("{consistentHash: {httpQueryParameterName: user}}"),
            LoadBalancer::Hash(HashKey::QueryParam("user".into()))
        );
        assert_eq!(lb("{simple: RANDOM}"), LoadBalancer::Random);
        assert_eq!(lb("{simple: LEAST_REQUEST}"), LoadBalancer::LeastRequest);
        assert_eq!(lb("{simple: ROUND_ROBIN}"), LoadBalancer::RoundRobin);
    }

    #[test]
    fn warmup_compiles_for_round_robin_and_least_request_only() {
        let warmup = |lb: &str| {
            let dr = format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews}}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer: {lb}\n  subsets:\n  - name: v1\n    labels: {{version: v1}}\n    trafficPolicy: {{loadBalancer: {{simple: RANDOM, warmup: {{duration: 5s}}}}}}\n"
            );
            let plan = reviews_plan(&[&dr]);
            let cluster = default_cluster(&plan);
            cluster.policy.warmup
        };
        assert_eq!(
            warmup(
                "{simple: ROUND_ROBIN, warmup: {duration: 60s, minimumPercent: 25, aggression: 2}}"
            ),
            Some(Warmup {
                window: Duration::from_secs(60),
                min_weight_percent: 25.0,
                aggression: 2.0
            })
        );
        // Istio's defaults: 10 % floor, linear; the deprecated field means the same.
        let defaults = Some(Warmup {
            window: Duration::from_secs(30),
            min_weight_percent: 10.0,
            aggression: 1.0,
        });
        assert_eq!(
            warmup("{warmup: {duration: 30s}}"),
            defaults,
            "the default balancer"
        );
        assert_eq!(
            warmup("{simple: LEAST_REQUEST, warmupDurationSecs: 30s}"),
            defaults
        );
        assert_eq!(
            warmup("{simple: ROUND_ROBIN, warmupDurationSecs: 99s, warmup: {duration: 30s}}"),
            defaults,
            "warmup wins over warmupDurationSecs"
        );
        assert_eq!(warmup("{simple: RANDOM, warmup: {duration: 30s}}"), None);
        assert_eq!(
            warmup("{consistentHash: {httpHeaderName: x-user}, warmup: {duration: 30s}}"),
            None
        );
        assert_eq!(warmup("{simple: ROUND_ROBIN}"), None);
        let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN, warmup: {duration: 5s}}\n  subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy: {loadBalancer: {simple: RANDOM, warmupDurationSecs: 5s}}\n";
        let reported: Vec<String> = reviews_plan(&[dr])
            .diagnostics
            .iter()
            .filter(|d| d.message.contains("slow start"))
            .map(|d| d.field.clone())
            .collect();
        assert_eq!(
            reported,
            ["spec.subsets[0].trafficPolicy.loadBalancer.warmupDurationSecs"]
        );
    }

    #[test]
    fn warmup_factor_follows_envoy() {
        let w = Warmup {
            window: Duration::from_secs(10),
            min_weight_percent: 10.0,
            aggression: 1.0,
        };
        assert_eq!(w.factor(Duration::ZERO), 0.1, "the floor");
        assert!((w.factor(Duration::from_secs(4)) - 0.4).abs() < 1e-9);
        assert_eq!(w.factor(Duration::from_secs(10)), 1.0);
        let steep = Warmup {
            aggression: 0.5,
            min_weight_percent: 0.0,
            ..w
        };
        // (age / window)^(1 / aggression): 0.5^2.
        assert!((steep.factor(Duration::from_secs(5)) - 0.25).abs() < 1e-9);
        // The age counts at least one millisecond.
        assert!((steep.factor(Duration::ZERO) - 1e-8).abs() < 1e-12);
    }

    fn virtual_service(http: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews}}\nspec:\n  hosts: [reviews]\n  http:\n{http}"
        )
    }

    #[test]
    fn cors_policy_compiles_as_istio_translates_it() {
        let vs = virtual_service(
            "  - corsPolicy:\n      allowOrigins: [{exact: 'https://a.example'}, {prefix: 'https://dev.'}, {regex: 'https://.*\\.b\\.example'}]\n      allowMethods: [GET, POST]\n      allowHeaders: [x-token]\n      exposeHeaders: [x-a, x-b]\n      maxAge: 24h\n      allowCredentials: true\n      unmatchedPreflights: IGNORE\n    route: [{destination: {host: reviews}}]\n  - corsPolicy: {allowOrigin: ['https://old.example'], allowCredentials: false}\n    route: [{destination: {host: reviews}}]\n",
        );
        let plan = reviews_plan(&[&vs]);
        assert!(
            plan.diagnostics
                .iter()
                .all(|d| !d.field.contains("corsPolicy")),
            "{:?}",
            plan.diagnostics
        );
        let rules = &routes(&plan).rules;
        let c = rules[0].cors.as_ref().expect("compiled");
        assert_eq!(
            c.describe_origins(),
            vec![
                "exact \"https://a.example\"",
                "prefix \"https://dev.\"",
                "regex \"https://.*\\\\.b\\\\.example\""
            ]
        );
        assert_eq!(c.allow_methods, "GET,POST");
        assert_eq!(c.allow_headers, "x-token");
        assert_eq!(c.expose_headers, "x-a,x-b");
        assert_eq!(c.max_age.as_deref(), Some("86400"));
        assert!(c.allow_credentials);
        assert!(!c.forward_unmatched_preflights);
        let old = rules[1].cors.as_ref().expect("compiled");
        assert_eq!(
            old.describe_origins(),
            vec!["exact \"https://old.example\""]
        );
        assert!(!old.allow_credentials);
        assert!(old.forward_unmatched_preflights, "FORWARD is the default");
        assert_eq!(old.max_age, None);
    }

    const SUBSETS: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n  - {name: v3, labels: {version: v3}}\n";

    fn delegate_vs(namespace: &str, extra: &str, http: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews-split, namespace: {namespace}}}\nspec:\n{extra}  http:\n{http}"
        )
    }

    /// The cluster a request to `path` with `headers` goes to (None: 404).
    fn routed(plan: &Plan, path: &str, headers: &[(&str, &str)]) -> Option<String> {
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let view = super::super::http::RequestView {
            method: "GET",
            scheme: "http",
            authority: "reviews:9080",
            path,
            headers: std::borrow::Cow::Owned(map),
            port: 9080,
            gateway: "mesh",
            ..Default::default()
        };
        let rule = routes(plan).select(&view)?;
        let RouteAction::Forward(d) = &rule.action else {
            return None;
        };
        Some(d[0].cluster.name.clone())
    }

    const ROOT: &str = "  - name: pp\n    match: [{uri: {prefix: /productpage}}]\n    timeout: 3s\n    delegate: {name: reviews-split}\n  - route: [{destination: {host: reviews, subset: v1}}]\n";
    const SPLIT: &str = "  - name: jason\n    match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - route: [{destination: {host: reviews, subset: v3}}]\n";

    #[test]
    fn delegate_routes_merge_under_the_root_route() {
        let plan = reviews_plan(&[
            SUBSETS,
            &virtual_service(ROOT),
            &delegate_vs("default", "", SPLIT),
        ]);
        assert!(
            plan.diagnostics
                .iter()
                .all(|d| d.level < super::super::Level::Warning),
            "{:?}",
            plan.diagnostics
        );
        let cluster = |s: &str| format!("outbound|9080|{s}|reviews.default.svc.cluster.local");
        assert_eq!(
            routed(&plan, "/productpage/1", &[("end-user", "jason")]),
            Some(cluster("v2"))
        );
        assert_eq!(routed(&plan, "/productpage", &[]), Some(cluster("v3")));
        assert_eq!(
            routed(&plan, "/other", &[("end-user", "jason")]),
            Some(cluster("v1")),
            "the root's match still applies to the delegate's routes"
        );
        let rules = &routes(&plan).rules;
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].name.as_deref(), Some("pp-jason"));
        assert_eq!(rules[0].index, 0, "numbered by the delegating route");
        assert_eq!(
            rules[0].delegate,
            Some(super::super::http::DelegateRef {
                virtual_service: "default/reviews-split".into(),
                index: 0
            })
        );
        assert_eq!(rules[1].timeout, Some(Duration::from_secs(3)), "inherited");
        assert_eq!(
            rules[1].describe_matches(),
            vec!["uri prefix \"/productpage\""]
        );
        assert_eq!((rules[2].index, rules[2].delegate.as_ref()), (1, None));
    }

    #[test]
    fn a_missing_or_hidden_delegate_drops_the_route() {
        let missing = reviews_plan(&[SUBSETS, &virtual_service(ROOT)]);
        let warning = missing
            .diagnostics
            .iter()
            .find(|d| d.field == "spec.http[0].delegate")
            .expect("reported");
        assert!(
            warning.message.contains("default/reviews-split"),
            "{warning}"
        );
        assert_eq!(routes(&missing).rules.len(), 1);
        assert_eq!(
            routed(&missing, "/productpage", &[]),
            Some("outbound|9080|v1|reviews.default.svc.cluster.local".into()),
            "the next route takes the requests"
        );
        // A VirtualService with hosts is no delegate; one exported elsewhere is not visible.
        let cross_namespace = virtual_service(&ROOT.replace(
            "{name: reviews-split}",
            "{name: reviews-split, namespace: other}",
        ));
        for (root, delegate) in [
            (
                virtual_service(ROOT),
                delegate_vs("default", "  hosts: [ratings]\n", SPLIT),
            ),
            (
                cross_namespace,
                delegate_vs("other", "  exportTo: [.]\n", SPLIT),
            ),
        ] {
            let plan = reviews_plan(&[SUBSETS, &root, &delegate]);
            assert_eq!(routes(&plan).rules.len(), 1, "{delegate}");
            assert!(
                plan.diagnostics
                    .iter()
                    .any(|d| d.field == "spec.http[0].delegate"
                        && d.level == super::super::Level::Warning),
                "{:?}",
                plan.diagnostics
            );
        }
    }

    #[test]
    fn delegate_hosts_resolve_in_its_namespace_and_conflicts_are_dropped() {
        let root = virtual_service(&ROOT.replace(
            "{name: reviews-split}",
            "{name: reviews-split, namespace: team}",
        ));
        let split = "  - match: [{uri: {prefix: /api}}]\n    route: [{destination: {host: reviews.default.svc.cluster.local, subset: v2}}]\n  - route: [{destination: {host: reviews}}]\n";
        let plan = reviews_plan(&[SUBSETS, &root, &delegate_vs("team", "", split)]);
        let conflict = plan
            .diagnostics
            .iter()
            .find(|d| d.object == "team/reviews-split" && d.field == "spec.http[0].match")
            .expect("the /api route is outside /productpage");
        assert!(conflict.message.contains("conflict"), "{conflict}");
        let rules = &routes(&plan).rules;
        assert_eq!(rules.len(), 2);
        let RouteAction::Forward(d) = &rules[0].action else {
            panic!()
        };
        assert_eq!(
            d[0].cluster.host, "reviews.team.svc.cluster.local",
            "the delegate's short name is in its own namespace"
        );
        assert!(
            plan.diagnostics
                .iter()
                .any(|d| d.object == "team/reviews-split" && d.code.as_deref() == Some("IST0101")),
            "the missing host is reported on the delegate: {:?}",
            plan.diagnostics
        );
    }

    #[test]
    fn failover_priority_labels_of_endpoints_compile() {
        let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 1}\n    loadBalancer:\n      localityLbSetting:\n        failoverPriority: [version=v2, topology.kubernetes.io/zone, team]\n";
        // r4 on a Node in zone z1; r5 with its own istio-locality label.
        let nodes = "apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {topology.kubernetes.io/region: us, topology.kubernetes.io/zone: z1}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: r4, labels: {app: reviews, version: v1, team: a}}\nspec: {nodeName: n1, containers: [{name: c, image: x}]}\nstatus: {podIP: 10.244.4.4}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: r5, labels: {app: reviews, version: v3, istio-locality: us.z3}}\nstatus: {podIP: 10.244.4.5}\n";
        let plan = reviews_plan(&[dr, nodes]);
        let cluster = default_cluster(&plan);
        let policy = cluster.policy.locality.as_ref().unwrap();
        assert_eq!(
            policy.failover_priority,
            ["version=v2", "topology.kubernetes.io/zone", "team"]
        );
        let values: Vec<(String, Vec<String>)> = cluster
            .endpoints
            .iter()
            .zip(&cluster.priority_labels)
            .map(|(e, v)| (e.addr.ip().to_string(), v.clone()))
            .collect();
        let row = |ip: &str, v: [&str; 3]| (ip.to_string(), v.map(str::to_string).to_vec());
        // Label names only (the `=v2` is the client's side); the zone from each locality.
        assert_eq!(
            values,
            vec![
                row("10.244.4.1", ["v1", "", ""]),
                row("10.244.4.2", ["v2", "", ""]),
                row("10.244.4.3", ["v3", "", ""]),
                row("10.244.4.4", ["v1", "z1", "a"]),
                row("10.244.4.5", ["v3", "z3", ""]),
            ]
        );
        assert!(
            !plan
                .diagnostics
                .iter()
                .any(|d| d.field.contains("failoverPriority")),
            "failoverPriority is used: {:?}",
            plan.diagnostics
        );
        // Without failoverPriority, no labels are carried.
        assert!(
            default_cluster(&reviews_plan(&[]))
                .priority_labels
                .is_empty()
        );
    }

    #[test]
    fn locality_settings_and_endpoint_localities_compile() {
        let dr = |tp: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews}}\nspec:\n  host: reviews\n  trafficPolicy:\n{tp}"
            )
        };
        let policy = |tp: &str| {
            default_cluster(&reviews_plan(&[&dr(tp)]))
                .policy
                .locality
                .clone()
        };
        let outlier = "    outlierDetection: {consecutive5xxErrors: 1}\n";
        assert_eq!(
            policy("    connectionPool: {tcp: {maxConnections: 10}}\n"),
            Some(LocalityPolicy::default()),
            "enabled by default, but no failover without outlier detection"
        );
        assert_eq!(
            policy(outlier).map(|p| p.failover_enabled),
            Some(true),
            "Istio's default failover once outlier detection is set"
        );
        assert_eq!(
            policy(&format!(
                "{outlier}    loadBalancer:\n      localityLbSetting:\n        failover: [{{from: us-east, to: eu-west}}]\n"
            )),
            Some(LocalityPolicy {
                distribute: vec![],
                failover: vec![("us-east".into(), "eu-west".into())],
                failover_priority: vec![],
                failover_enabled: true,
            })
        );
        let distribute = policy(&format!(
            "{outlier}    loadBalancer:\n      localityLbSetting:\n        distribute: [{{from: us-east/*, to: {{us-east/z1: 80, us-west/*: 20}}}}]\n"
        ))
        .unwrap();
        assert_eq!(
            distribute.distribute,
            vec![(
                "us-east/*".to_string(),
                vec![
                    ("us-east/z1".to_string(), 80),
                    ("us-west/*".to_string(), 20)
                ]
            )]
        );
        assert!(!distribute.failover_enabled, "distribute excludes failover");
        assert_eq!(
            policy(&format!(
                "{outlier}    loadBalancer:\n      localityLbSetting: {{enabled: false}}\n"
            )),
            None
        );
        // Endpoint localities: a Pod's istio-locality label, a WorkloadEntry's locality.
        let extra = "apiVersion: v1\nkind: Pod\nmetadata: {name: r9, labels: {app: reviews, istio-locality: us-east.z1.rack2}}\nstatus: {podIP: 10.244.4.9}\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: vm}\nspec:\n  hosts: [vm.example.com]\n  addresses: [240.0.0.9]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: STATIC\n  endpoints: [{address: 10.9.0.1, locality: eu-west/z2}]\n";
        let plan = reviews_plan(&[extra]);
        let localities: Vec<(String, String)> = default_cluster(&plan)
            .endpoints
            .iter()
            .map(|e| (e.addr.to_string(), e.locality.clone()))
            .collect();
        assert!(
            localities.contains(&("10.244.4.9:9080".into(), "us-east/z1/rack2".into())),
            "{localities:?}"
        );
        let vm = plan
            .services
            .values()
            .find(|s| s.host == "vm.example.com")
            .unwrap();
        assert_eq!(vm.backends[0].locality, "eu-west/z2");
    }

    #[test]
    fn ring_hash_and_maglev_are_reported_as_not_used() {
        let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer: {consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 1024}}}\n  subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy:\n      loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 65537}}}\n";
        let plan = reviews_plan(&[dr]);
        let fields: Vec<&str> = plan
            .diagnostics
            .iter()
            .filter(|d| d.kind == "DestinationRule" && d.message.contains("not used"))
            .map(|d| d.field.as_str())
            .collect();
        assert_eq!(
            fields,
            vec![
                "spec.subsets[0].trafficPolicy.loadBalancer.consistentHash.maglev",
                "spec.trafficPolicy.loadBalancer.consistentHash.ringHash",
            ]
        );
        // The hash key still applies: the algorithm is the only thing not used.
        assert_eq!(
            default_cluster(&plan).policy.load_balancer,
            LoadBalancer::Hash(HashKey::Header("x-user".into()))
        );
    }

    #[test]
    fn numeric_retry_on_becomes_status_codes() {
        let r = istio::HttpRetry {
            attempts: Some(3),
            retry_on: Some("gateway-error,503, reset".into()),
            ..Default::default()
        };
        let p = retry_policy(Some(&r));
        assert_eq!(p.attempts, 3);
        assert_eq!(
            p.retry_on,
            vec!["gateway-error", "retriable-status-codes", "reset"]
        );
        assert_eq!(p.retriable_status_codes, vec![503]);
        assert_eq!(retry_policy(None).attempts, 2, "Istio's default");
        let off = istio::HttpRetry {
            attempts: Some(0),
            ..Default::default()
        };
        assert_eq!(retry_policy(Some(&off)).attempts, 0);
    }
}
