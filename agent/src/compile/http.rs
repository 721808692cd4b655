//! HTTP routing as Istio evaluates it, compiled once per plan and evaluated per request.
//!
//! This is the single evaluator: the L7 proxy routes every request with [`HttpRoutes::select`],
//! and `steerd explain` calls the same function, so what explain prints is what the proxy does.
//!
//! Semantics (Envoy's, as Istio configures it): rules are tried in order and the first rule with
//! a matching `match` block wins; blocks are ORed, conditions within a block ANDed; a rule with
//! no `match` matches everything. A request no rule matches gets a 404 (Envoy's "route not
//! found"), except that a service without a VirtualService has one implicit catch-all rule.

use http::HeaderMap;
use http::header::COOKIE;
use regex::Regex;
use serde::Serialize;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::WeightedBackend;

/// A compiled `StringMatch`.
#[derive(Debug, Clone)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    /// Anchored: Envoy's safe_regex matches the whole value.
    Regex(Regex),
    /// `{}`: the value only has to be present.
    Present,
}

impl StrMatch {
    /// `value` is the request's value; `ignore_case` applies to exact and prefix (Istio's
    /// `ignoreUriCase`).
    pub fn matches(&self, value: &str, ignore_case: bool) -> bool {
        match self {
            StrMatch::Exact(e) if ignore_case => e.eq_ignore_ascii_case(value),
            StrMatch::Exact(e) => e == value,
            StrMatch::Prefix(p) if ignore_case => {
                value.len() >= p.len()
                    && value.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            StrMatch::Prefix(p) => value.starts_with(p.as_str()),
            StrMatch::Regex(r) => r.is_match(value),
            StrMatch::Present => true,
        }
    }

    /// Compiles a regex with full-match semantics.
    pub fn regex(pattern: &str) -> Result<Self, regex::Error> {
        Regex::new(&format!("^(?:{pattern})$")).map(StrMatch::Regex)
    }

    fn describe(&self) -> String {
        match self {
            StrMatch::Exact(e) => format!("exact {e:?}"),
            StrMatch::Prefix(p) => format!("prefix {p:?}"),
            StrMatch::Regex(r) => {
                let s = r.as_str();
                format!("regex {:?}", &s[4..s.len() - 2])
            }
            StrMatch::Present => "present".into(),
        }
    }
}

/// One `match` block: every condition must hold.
#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    pub name: Option<String>,
    pub uri: Option<StrMatch>,
    pub scheme: Option<StrMatch>,
    pub method: Option<StrMatch>,
    pub authority: Option<StrMatch>,
    /// Lower-case header name → condition.
    pub headers: Vec<(String, StrMatch)>,
    /// Headers that must NOT match (absent, or present with a non-matching value).
    pub without_headers: Vec<(String, StrMatch)>,
    pub query_params: Vec<(String, StrMatch)>,
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    pub gateways: Vec<String>,
    pub ignore_uri_case: bool,
}

/// What the evaluator needs to know about a request.
///
/// The proxy builds one per request over the request's own `HeaderMap` (borrowed: route
/// evaluation copies no header); `steerd explain` builds its map from `--header` arguments.
#[derive(Debug, Clone, Default)]
pub struct RequestView<'a> {
    pub method: &'a str,
    pub scheme: &'a str,
    /// Host header (HTTP/1.1) or :authority (HTTP/2), as sent.
    pub authority: &'a str,
    /// Path without the query.
    pub path: &'a str,
    /// Raw query string, without `?`.
    pub query: &'a str,
    /// The request's headers (names are case-insensitive).
    pub headers: Cow<'a, HeaderMap>,
    /// The service port the client dialled.
    pub port: u16,
    pub source_labels: Option<&'a crate::model::Labels>,
    pub source_namespace: Option<&'a str>,
    /// `mesh` for sidecar-style traffic, or a gateway name.
    pub gateway: &'a str,
}

impl RequestView<'_> {
    /// A header's value as Envoy's header matchers see it: repeated headers joined with `,`;
    /// `None` when absent or not valid text.
    fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        let mut values = self.headers.get_all(name).iter();
        let first = values.next()?.to_str().ok()?;
        match values.next() {
            None => Some(Cow::Borrowed(first)),
            Some(second) => {
                let mut joined = format!("{first},{}", second.to_str().ok()?);
                for v in values {
                    joined.push(',');
                    joined.push_str(v.to_str().ok()?);
                }
                Some(Cow::Owned(joined))
            }
        }
    }

    /// A header's value for a `headers`/`withoutHeaders` condition: Envoy matches the
    /// `:authority` (also as `host`), `:method` and `:path` pseudo-headers by these names too.
    fn header_for_match(&self, name: &str) -> Option<Cow<'_, str>> {
        match name {
            ":authority" | "host" => Some(Cow::Borrowed(self.authority)),
            ":method" => Some(Cow::Borrowed(self.method)),
            ":path" => Some(Cow::Borrowed(self.path)),
            _ => self.header(name),
        }
    }

    /// A header's value by (case-insensitive) name.
    pub fn header_value(&self, name: &str) -> Option<Cow<'_, str>> {
        self.header(name)
    }

    /// A cookie's value from the `cookie` header(s) (HTTP/2 clients may send one per cookie).
    /// A quoted value is unquoted, as Envoy's cookie parser does (the cookies it generates are
    /// quoted).
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v);
                (k == name).then_some(v)
            })
    }

    /// A query parameter's value.
    pub fn query_value(&self, name: &str) -> Option<&str> {
        self.query_param(name)
    }

    fn query_param(&self, name: &str) -> Option<&str> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then_some(v)
        })
    }
}

impl RequestMatch {
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        let str_ok =
            |m: &Option<StrMatch>, v: &str, ci: bool| m.as_ref().is_none_or(|m| m.matches(v, ci));
        str_ok(&self.uri, req.path, self.ignore_uri_case)
            && str_ok(&self.scheme, req.scheme, false)
            && str_ok(&self.method, req.method, false)
            && str_ok(&self.authority, req.authority, false)
            && self.port.is_none_or(|p| p == req.port)
            && self.headers.iter().all(|(name, m)| {
                req.header_for_match(name)
                    .is_some_and(|v| m.matches(&v, false))
            })
            && self.without_headers.iter().all(|(name, m)| {
                req.header_for_match(name)
                    .is_none_or(|v| !m.matches(&v, false))
            })
            && self
                .query_params
                .iter()
                .all(|(name, m)| req.query_param(name).is_some_and(|v| m.matches(v, false)))
            && (self.source_labels.is_empty()
                || req
                    .source_labels
                    .is_some_and(|l| self.source_labels.iter().all(|(k, v)| l.get(k) == Some(v))))
            && self
                .source_namespace
                .as_ref()
                .is_none_or(|ns| req.source_namespace == Some(ns.as_str()))
            && (self.gateways.is_empty() || self.gateways.iter().any(|g| g == req.gateway))
    }
}

/// Request or response header edits (`headers.request`/`headers.response`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct HeaderOps {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// Where a destination's requests go: one Istio cluster.
#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    /// `outbound|<port>|<subset>|<host>`.
    pub name: String,
    pub host: String,
    pub port: u16,
    pub subset: Option<String>,
    pub endpoints: Vec<WeightedBackend>,
    /// Per endpoint, its values of the `failoverPriority` labels, in their order (empty when the
    /// policy has none); its locality's topology labels included, as Istio augments endpoint
    /// labels.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub priority_labels: Vec<Vec<String>>,
    pub policy: ClusterPolicy,
    /// `ns/name` of the DestinationRule that defines the subset or policy.
    pub destination_rule: Option<String>,
}

/// DestinationRule traffic policy as the proxy applies it (subset-level overrides merged).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterPolicy {
    pub load_balancer: LoadBalancer,
    pub connect_timeout: Option<Duration>,
    /// `tcp.maxConnections`.
    pub max_connections: Option<u32>,
    /// `http.http1MaxPendingRequests`.
    pub max_pending_requests: Option<u32>,
    /// `http.http2MaxRequests`: concurrent requests.
    pub max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub idle_timeout: Option<Duration>,
    pub outlier: Option<OutlierPolicy>,
    /// Upstream speaks HTTP/2 (service port protocol HTTP2/GRPC, or `h2UpgradePolicy: UPGRADE`).
    pub http2: bool,
    /// Locality load balancing (None: `localityLbSetting.enabled: false`).
    pub locality: Option<LocalityPolicy>,
    /// `tls` SIMPLE/MUTUAL: the proxy originates TLS to the endpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// `loadBalancer.warmup` (or the deprecated `warmupDurationSecs`): new endpoints ramp up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup: Option<Warmup>,
}

/// Envoy's slow start, as Istio configures it for ROUND_ROBIN and LEAST_REQUEST clusters: an
/// endpoint that joined the cluster less than `window` ago gets a share of its weight that grows
/// with its age, so a new replica is not sent its full share of traffic while it warms up.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Warmup {
    pub window: Duration,
    /// The least share of its weight an endpoint gets (Istio's `minimumPercent`, default 10).
    pub min_weight_percent: f64,
    /// How the share grows: `(age / window)^(1 / aggression)` (1.0: linearly).
    pub aggression: f64,
}

impl Warmup {
    /// The factor applied to the weight of an endpoint that joined `age` ago (1 once warm).
    /// Envoy's `applySlowStartFactor`: the age counts in milliseconds, at least one.
    pub fn factor(&self, age: Duration) -> f64 {
        if age >= self.window {
            return 1.0;
        }
        let window_ms = self.window.as_secs_f64() * 1000.0;
        let time_factor = (age.as_secs_f64() * 1000.0).max(1.0) / window_ms;
        time_factor
            .powf(1.0 / self.aggression)
            .max(self.min_weight_percent / 100.0)
    }
}

/// TLS the proxy originates to a cluster's endpoints (DestinationRule `tls`, SIMPLE or MUTUAL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamTls {
    /// `SIMPLE` or `MUTUAL`.
    pub mode: &'static str,
    /// The SNI sent; None: the cluster's host.
    pub sni: Option<String>,
    /// The server certificate must carry one of these (DNS/URI/IP, exact); empty: it must be
    /// valid for the SNI.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    pub ca: UpstreamCa,
    /// MUTUAL: the certificate presented.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<super::gateway::Credential>,
    /// Why no connection can be made (missing Secret, ...): connections fail with `UF`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl UpstreamTls {
    /// `SIMPLE sni=api.example.com ca=/etc/ca.pem san=a,b`, for `inspect clusters`/`explain`.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "{} sni={}",
            self.mode,
            self.sni.as_deref().unwrap_or("<host>")
        );
        out += &match &self.ca {
            UpstreamCa::System => " ca=system".to_string(),
            UpstreamCa::File(p) => format!(" ca={}", p.display()),
            UpstreamCa::Secret { name, .. } => format!(" ca=secret:{name}"),
            UpstreamCa::InsecureSkipVerify => " insecureSkipVerify".to_string(),
        };
        if !self.subject_alt_names.is_empty() {
            out += &format!(" san={}", self.subject_alt_names.join(","));
        }
        match &self.client_certificate {
            Some(super::gateway::Credential::Secret { name, .. }) => {
                out += &format!(" cert=secret:{name}")
            }
            Some(super::gateway::Credential::Files { cert, .. }) => {
                out += &format!(" cert={}", cert.display())
            }
            _ => {}
        }
        if let Some(e) = &self.error {
            out += &format!(" (error: {e})");
        }
        out
    }
}

/// What a server certificate is verified against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum UpstreamCa {
    /// The system's CA bundle (Istio's default without `caCertificates`).
    System,
    /// `caCertificates`, read by the dataplane.
    File(std::path::PathBuf),
    /// A `credentialName` Secret's `ca.crt`/`cacert`.
    Secret {
        name: String,
        #[serde(skip)]
        pem: super::gateway::Pem,
    },
    /// `insecureSkipVerify: true`: no verification at all.
    InsecureSkipVerify,
}

/// `localityLbSetting` as Istio applies it for a client in some locality.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LocalityPolicy {
    /// `distribute`: (from, [(to, weight)]); the first `from` matching the client applies.
    pub distribute: Vec<(String, Vec<(String, u32)>)>,
    /// `failover`: (from region, to region).
    pub failover: Vec<(String, String)>,
    /// `failoverPriority`: labels (`label`, or `label=value` to compare endpoints with a fixed
    /// value rather than the client's), most important first.
    pub failover_priority: Vec<String>,
    /// Priority failover applies: Istio enables it only with outlier detection (without health
    /// information traffic would never fail over).
    pub failover_enabled: bool,
}

/// A `region/zone/subzone` locality.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl std::fmt::Display for Locality {
    /// `region/zone/subzone`, without empty trailing parts.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = format!("{}/{}/{}", self.region, self.zone, self.subzone);
        while s.ends_with('/') {
            s.pop();
        }
        f.write_str(&s)
    }
}

/// `region/zone/subzone` as its three parts (missing ones empty), without copying.
fn locality_parts(s: &str) -> [&str; 3] {
    let mut it = s.splitn(3, '/');
    [
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
    ]
}

/// Istio's `LocalityMatch`: a rule locality (`*` wildcards, missing zone/subzone match
/// anything) covers `locality`.
fn rule_covers(rule: &str, locality: [&str; 3]) -> bool {
    let rule = locality_parts(rule);
    (0..3).all(|i| rule[i] == "*" || (i > 0 && rule[i].is_empty()) || rule[i] == locality[i])
}

/// Istio's `LbPriority`: 0 same subzone, 1 same zone, 2 same region, 3 elsewhere.
fn lb_priority(client: [&str; 3], endpoint: [&str; 3]) -> u32 {
    match (
        client[0] == endpoint[0],
        client[1] == endpoint[1],
        client[2] == endpoint[2],
    ) {
        (true, true, true) => 0,
        (true, true, false) => 1,
        (true, false, _) => 2,
        (false, _, _) => 3,
    }
}

impl Locality {
    /// `region/zone/subzone`, each part optional from the right.
    pub fn parse(s: &str) -> Self {
        let [region, zone, subzone] = locality_parts(s).map(str::to_string);
        Self {
            region,
            zone,
            subzone,
        }
    }

    fn parts(&self) -> [&str; 3] {
        [&self.region, &self.zone, &self.subzone]
    }

    /// Whether nothing is known (no region, zone nor subzone).
    pub fn is_empty(&self) -> bool {
        self.parts().iter().all(|p| p.is_empty())
    }

    /// Whether a rule locality (`region/zone/subzone`, `*` wildcards, missing parts match
    /// anything) covers this one.
    pub fn matches_rule(&self, rule: &str) -> bool {
        rule_covers(rule, self.parts())
    }

    /// 0 same subzone, 1 same zone, 2 same region, 3 elsewhere.
    pub fn priority_of(&self, endpoint: &Locality) -> u32 {
        lb_priority(self.parts(), endpoint.parts())
    }
}

/// The topology labels Istio adds to workload labels from their locality.
pub const TOPOLOGY_LABELS: [&str; 3] = [
    crate::model::node::REGION_LABEL,
    crate::model::node::ZONE_LABEL,
    crate::model::node::SUBZONE_LABEL,
];

/// The value of `label` for a workload with `labels` in `locality`: the locality's part for a
/// topology label (when known), else the label's (Istio's augmented workload labels).
pub fn augmented_label<'a, L: crate::model::labels::LabelLookup + ?Sized>(
    label: &str,
    labels: Option<&'a L>,
    locality: [&'a str; 3],
) -> &'a str {
    TOPOLOGY_LABELS
        .iter()
        .position(|t| *t == label)
        .map(|i| locality[i])
        .filter(|v| !v.is_empty())
        .or_else(|| labels.and_then(|l| l.label(label)).map(String::as_str))
        .unwrap_or("")
}

/// `failoverPriority` entries as (label, fixed value).
fn parse_failover_priority(entries: &[String]) -> impl Iterator<Item = (&str, Option<&str>)> {
    entries.iter().map(|e| match e.split_once('=') {
        Some((label, value)) => (label, Some(value)),
        None => (e.as_str(), None),
    })
}

/// The label names of `failoverPriority` entries (without `=value`).
pub fn failover_priority_labels(entries: &[String]) -> Vec<String> {
    parse_failover_priority(entries)
        .map(|(l, _)| l.to_string())
        .collect()
}

/// The client of a request, as locality load balancing compares it with endpoints.
#[derive(Debug, Clone, Copy, Default)]
pub struct Client<'a> {
    /// This node's locality.
    pub locality: Option<&'a Locality>,
    /// The labels of the workload that sent the request (the Pod owning the source address).
    pub labels: Option<&'a crate::model::Labels>,
}

impl LocalityPolicy {
    /// Each endpoint's failover priority for `client` (Istio's applyFailoverPriorities and
    /// applyLocalityFailover, priorities renumbered to 0..N without gaps), or None when no
    /// failover applies. `priority_labels` are the endpoints' values of the `failoverPriority`
    /// labels ([`Cluster::priority_labels`]).
    pub fn priorities(
        &self,
        client: Client<'_>,
        endpoints: &[WeightedBackend],
        priority_labels: &[Vec<String>],
    ) -> Option<Vec<u32>> {
        if !self.failover_enabled {
            return None;
        }
        let unknown = Locality::default();
        let locality = client.locality.unwrap_or(&unknown);
        let by_locality = |e: &WeightedBackend| -> u32 {
            let endpoint = locality_parts(&e.locality);
            let p = lb_priority(locality.parts(), endpoint);
            if p < 3 {
                return p;
            }
            // A failover rule for the client's region: its `to` region next, others last.
            match self
                .failover
                .iter()
                .find(|(from, _)| *from == locality.region)
            {
                Some((_, to)) if to != endpoint[0] => 4,
                _ => 3,
            }
        };
        let raw: Vec<u32> = if self.failover_priority.is_empty() {
            endpoints.iter().map(by_locality).collect()
        } else {
            // Labels first: an endpoint matching the client on every label is best; one that
            // differs first on label j of n gets n - j (so the longer the matching prefix, the
            // better). Istio skips this for a proxy without labels. Region/zone/subzone only
            // refine it with explicit `failover` rules.
            let n = self.failover_priority.len() as u32;
            let known = client.labels.is_some_and(|l| !l.is_empty())
                || client.locality.is_some_and(|l| !l.is_empty());
            let client_parts = locality.parts();
            endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let values = priority_labels.get(i);
                    let by_labels = if known {
                        parse_failover_priority(&self.failover_priority)
                            .enumerate()
                            .find(|(j, (label, fixed))| {
                                let wanted = fixed.unwrap_or_else(|| {
                                    augmented_label(label, client.labels, client_parts)
                                });
                                let has = values.and_then(|v| v.get(*j)).map_or("", String::as_str);
                                wanted != has
                            })
                            .map_or(0, |(j, _)| n - j as u32)
                    } else {
                        0
                    };
                    if self.failover.is_empty() {
                        by_labels
                    } else {
                        by_labels * 5 + by_locality(e)
                    }
                })
                .collect()
        };
        let mut levels: Vec<u32> = raw.clone();
        levels.sort_unstable();
        levels.dedup();
        Some(
            raw.iter()
                .map(|p| levels.iter().position(|l| l == p).unwrap_or(0) as u32)
                .collect(),
        )
    }

    /// The `distribute` weight of each endpoint for a client in `client` (Istio's
    /// applyLocalityWeights: a locality's weight shared by its endpoints, endpoints of no
    /// listed locality get none), or None when no `from` matches.
    pub fn distribution(
        &self,
        client: &Locality,
        endpoints: &[WeightedBackend],
    ) -> Option<Vec<f64>> {
        let (_, to) = self
            .distribute
            .iter()
            .find(|(from, _)| client.matches_rule(from))?;
        let mut weights = vec![0.0; endpoints.len()];
        let mut taken = vec![false; endpoints.len()];
        for (locality, weight) in to {
            let members: Vec<usize> = (0..endpoints.len())
                .filter(|&i| {
                    !taken[i] && rule_covers(locality, locality_parts(&endpoints[i].locality))
                })
                .collect();
            let total: f64 = members.iter().map(|&i| endpoints[i].weight).sum();
            for &i in &members {
                taken[i] = true;
                if total > 0.0 {
                    weights[i] = *weight as f64 * endpoints[i].weight / total;
                }
            }
        }
        Some(weights)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    Random,
    LeastRequest,
    /// Consistent hashing on a header, cookie, the source IP or a query parameter.
    Hash(HashKey),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum HashKey {
    Header(String),
    /// With a `ttl`, a request without the cookie gets one generated (and set on its response),
    /// as Envoy does; a zero ttl makes it a session cookie.
    Cookie {
        name: String,
        ttl: Option<Duration>,
        path: Option<String>,
        /// Extra `Set-Cookie` attributes (`name` or `name=value`).
        attributes: Vec<(String, Option<String>)>,
    },
    SourceIp,
    QueryParam(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct OutlierPolicy {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpDestination {
    pub cluster: Arc<Cluster>,
    pub weight: u32,
    pub headers_request: HeaderOps,
    pub headers_response: HeaderOps,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Rewrite {
    pub uri: Option<String>,
    /// (regex, substitution) for `uriRegexRewrite`.
    #[serde(skip)]
    pub uri_regex: Option<(Regex, String)>,
    pub authority: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub scheme: Option<String>,
    pub port: Option<u16>,
    pub code: u16,
}

#[derive(Debug, Clone, Serialize)]
pub enum RouteAction {
    Forward(Vec<HttpDestination>),
    Redirect(Redirect),
    DirectResponse { status: u16, body: Option<String> },
}

#[derive(Debug, Clone, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    /// Envoy retry conditions (`5xx`, `gateway-error`, `reset`, `connect-failure`, ...).
    pub retry_on: Vec<String>,
    /// Status codes from `retriable-status-codes` entries given as numbers.
    pub retriable_status_codes: Vec<u16>,
}

impl RetryPolicy {
    /// Istio's default when a route sets no `retries`.
    pub fn istio_default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            retry_on: [
                "connect-failure",
                "refused-stream",
                "unavailable",
                "cancelled",
                "retriable-status-codes",
            ]
            .map(String::from)
            .to_vec(),
            retriable_status_codes: vec![503],
        }
    }

    pub fn none() -> Self {
        Self {
            attempts: 0,
            per_try_timeout: None,
            retry_on: Vec::new(),
            retriable_status_codes: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    /// (delay, percentage of requests 0–100).
    pub delay: Option<(Duration, f64)>,
    /// (HTTP status, percentage of requests 0–100).
    pub abort: Option<(u16, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Mirror {
    pub cluster: Arc<Cluster>,
    /// Percentage of requests mirrored (0–100).
    pub percentage: f64,
}

/// A rule's `corsPolicy`, as Istio configures Envoy's CORS filter for the route.
#[derive(Debug, Clone, Serialize)]
pub struct CorsPolicy {
    /// `allowOrigins` (or the deprecated exact `allowOrigin` list).
    #[serde(skip)]
    pub allow_origins: Vec<StrMatch>,
    /// Joined with `,` as Istio joins them; `*` echoes the preflight's requested method.
    pub allow_methods: String,
    /// Joined with `,`; `*` echoes the preflight's requested headers.
    pub allow_headers: String,
    pub expose_headers: String,
    /// Whole seconds, as Istio writes it.
    pub max_age: Option<String>,
    pub allow_credentials: bool,
    /// `unmatchedPreflights`: FORWARD (default) sends a preflight from an origin that is not
    /// allowed on to the upstream; IGNORE answers it with a 200 without CORS headers.
    pub forward_unmatched_preflights: bool,
}

/// What the CORS filter does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsDecision {
    /// No `Origin` header: not a CORS request.
    NotCors,
    /// The origin is not allowed: the request is forwarded and its response gets no CORS
    /// headers (for a preflight: `unmatchedPreflights: FORWARD`).
    OriginNotAllowed,
    /// A preflight answered by the proxy with 200 and these headers, not forwarded.
    Preflight {
        origin_allowed: bool,
        headers: Vec<(&'static str, String)>,
    },
    /// A request from an allowed origin: forwarded, and these headers are set on its response.
    Allowed {
        headers: Vec<(&'static str, String)>,
    },
}

impl CorsPolicy {
    /// Envoy's `isOriginAllowed`: an origin matcher that accepts `*` allows every origin.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.allow_origins
            .iter()
            .any(|m| m.matches("*", false) || m.matches(origin, false))
    }

    /// Envoy's CORS filter on one request (decodeHeaders for preflights, encodeHeaders for the
    /// headers an actual request's response gets).
    pub fn evaluate(&self, req: &RequestView<'_>) -> CorsDecision {
        let Some(origin) = req.header("origin").filter(|o| !o.is_empty()) else {
            return CorsDecision::NotCors;
        };
        let allowed = self.origin_allowed(&origin);
        let requested_method = req
            .header("access-control-request-method")
            .filter(|m| !m.is_empty());
        let preflight = req.method == "OPTIONS" && requested_method.is_some();
        if !preflight {
            if !allowed {
                return CorsDecision::OriginNotAllowed;
            }
            let mut headers = vec![("access-control-allow-origin", origin.into_owned())];
            if self.allow_credentials {
                headers.push(("access-control-allow-credentials", "true".into()));
            }
            if !self.expose_headers.is_empty() {
                headers.push(("access-control-expose-headers", self.expose_headers.clone()));
            }
            return CorsDecision::Allowed { headers };
        }
        if !allowed && self.forward_unmatched_preflights {
            return CorsDecision::OriginNotAllowed;
        }
        let mut headers = Vec::new();
        if allowed {
            headers.push(("access-control-allow-origin", origin.into_owned()));
        }
        // As Envoy does, an IGNOREd preflight still gets the policy's other headers (without
        // an allowed origin, browsers fail it anyway).
        if self.allow_credentials {
            headers.push(("access-control-allow-credentials", "true".into()));
        }
        if !self.allow_methods.is_empty() {
            let methods = if self.allow_methods == "*" {
                requested_method.map(Cow::into_owned).unwrap_or_default()
            } else {
                self.allow_methods.clone()
            };
            headers.push(("access-control-allow-methods", methods));
        }
        if !self.allow_headers.is_empty() {
            let names = if self.allow_headers == "*" {
                req.header("access-control-request-headers")
                    .map(Cow::into_owned)
                    .unwrap_or_default()
            } else {
                self.allow_headers.clone()
            };
            headers.push(("access-control-allow-headers", names));
        }
        if let Some(max_age) = &self.max_age {
            headers.push(("access-control-max-age", max_age.clone()));
        }
        CorsDecision::Preflight {
            origin_allowed: allowed,
            headers,
        }
    }

    /// The allowed origins, for explain and inspect.
    pub fn describe_origins(&self) -> Vec<String> {
        self.allow_origins.iter().map(StrMatch::describe).collect()
    }
}

impl fmt::Display for CorsDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |headers: &[(&str, String)]| {
            headers
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            CorsDecision::NotCors => f.write_str("not a CORS request (no Origin)"),
            CorsDecision::OriginNotAllowed => {
                f.write_str("origin not allowed: forwarded without CORS headers")
            }
            CorsDecision::Preflight {
                origin_allowed: true,
                headers,
            } => write!(f, "preflight answered 200 by the proxy ({})", list(headers)),
            CorsDecision::Preflight {
                origin_allowed: false,
                headers,
            } => write!(
                f,
                "preflight from an origin not allowed, answered 200 without allow-origin (unmatchedPreflights: IGNORE){}",
                if headers.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", list(headers))
                }
            ),
            CorsDecision::Allowed { headers } => {
                write!(f, "origin allowed; the response gets {}", list(headers))
            }
        }
    }
}

/// One `http` rule of a VirtualService.
#[derive(Debug, Clone, Serialize)]
pub struct HttpRule {
    /// Index in `spec.http`.
    pub index: usize,
    pub name: Option<String>,
    #[serde(skip)]
    pub matches: Vec<RequestMatch>,
    pub action: RouteAction,
    pub rewrite: Option<Rewrite>,
    pub timeout: Option<Duration>,
    pub retries: RetryPolicy,
    pub fault: Option<Fault>,
    pub mirrors: Vec<Mirror>,
    pub headers_request: HeaderOps,
    pub headers_response: HeaderOps,
    pub cors: Option<Arc<CorsPolicy>>,
    /// For a rule that comes from a delegate VirtualService: which (`index` is then the
    /// delegating route's index in the root's `spec.http`).
    pub delegate: Option<DelegateRef>,
}

/// Where a delegated rule is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DelegateRef {
    /// `ns/name` of the delegate VirtualService.
    pub virtual_service: String,
    /// Index in its `spec.http`.
    pub index: usize,
}

impl HttpRule {
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(req))
    }

    /// Descriptions of the match blocks, for explain and inspect.
    pub fn describe_matches(&self) -> Vec<String> {
        self.matches
            .iter()
            .map(|m| {
                let mut parts = Vec::new();
                let mut push = |what: &str, s: &Option<StrMatch>| {
                    if let Some(s) = s {
                        parts.push(format!("{what} {}", s.describe()));
                    }
                };
                push("uri", &m.uri);
                push("scheme", &m.scheme);
                push("method", &m.method);
                push("authority", &m.authority);
                for (h, s) in &m.headers {
                    parts.push(format!("header {h} {}", s.describe()));
                }
                for (h, s) in &m.without_headers {
                    parts.push(format!("without header {h} {}", s.describe()));
                }
                for (q, s) in &m.query_params {
                    parts.push(format!("query {q} {}", s.describe()));
                }
                if let Some(p) = m.port {
                    parts.push(format!("port {p}"));
                }
                if !m.source_labels.is_empty() {
                    parts.push(format!("sourceLabels {:?}", m.source_labels));
                }
                if parts.is_empty() {
                    "*".to_string()
                } else {
                    parts.join(" && ")
                }
            })
            .collect()
    }

    /// Picks a destination by weight with `r` uniform in [0, 1).
    pub fn pick(&self, r: f64) -> Option<&HttpDestination> {
        let RouteAction::Forward(dests) = &self.action else {
            return None;
        };
        let total: u64 = dests.iter().map(|d| d.weight as u64).sum();
        if total == 0 {
            return None;
        }
        let mut x = (r * total as f64) as u64;
        for d in dests {
            if x < d.weight as u64 {
                return Some(d);
            }
            x -= d.weight as u64;
        }
        dests.iter().rev().find(|d| d.weight > 0)
    }
}

/// The HTTP routing of one service port.
#[derive(Debug, Clone, Serialize)]
pub struct HttpRoutes {
    /// `ns/name` of the VirtualService, if one applies.
    pub virtual_service: Option<String>,
    pub rules: Vec<HttpRule>,
}

impl HttpRoutes {
    /// Every cluster the routes send to or mirror to (with repeats).
    pub fn clusters(&self) -> impl Iterator<Item = &Cluster> {
        self.rules.iter().flat_map(|rule| {
            let primaries = match &rule.action {
                RouteAction::Forward(d) => d.as_slice(),
                _ => &[],
            };
            primaries
                .iter()
                .map(|d| &*d.cluster)
                .chain(rule.mirrors.iter().map(|m| &*m.cluster))
        })
    }

    /// The first rule matching the request (None: Envoy's 404 "route not found").
    pub fn select(&self, req: &RequestView<'_>) -> Option<&HttpRule> {
        self.rules.iter().find(|r| r.matches(req))
    }
}

/// Applies `rewrite.uri` / `uriRegexRewrite` the way Envoy does: a prefix match's matched part is
/// replaced, an exact or regex match (or no uri match) replaces the whole path.
pub fn rewrite_path(rewrite: &Rewrite, matched_prefix: Option<&str>, path: &str) -> String {
    if let Some((re, sub)) = &rewrite.uri_regex {
        // Envoy's regex_rewrite substitutes every match; \1 → $1.
        let sub = sub.replace("\\", "$");
        return re.replace_all(path, sub.as_str()).into_owned();
    }
    match (&rewrite.uri, matched_prefix) {
        (Some(new), Some(prefix)) if path.starts_with(prefix) => {
            format!("{new}{}", &path[prefix.len()..])
        }
        (Some(new), _) => new.clone(),
        (None, _) => path.to_string(),
    }
}

/// The prefix of the block that matched, when it matched on a uri prefix (for rewrite).
pub fn matched_prefix<'r>(rule: &'r HttpRule, req: &RequestView<'_>) -> Option<&'r str> {
    rule.matches
        .iter()
        .find(|m| m.matches(req))
        .and_then(|m| match &m.uri {
            Some(StrMatch::Prefix(p)) => Some(p.as_str()),
            _ => None,
        })
}

/// A cluster's endpoint by address, for tests and explain output.
pub fn endpoint_addrs(cluster: &Cluster) -> Vec<SocketAddr> {
    cluster.endpoints.iter().map(|e| e.addr).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str) -> Arc<Cluster> {
        Arc::new(Cluster {
            name: name.into(),
            host: "reviews.default.svc.cluster.local".into(),
            port: 9080,
            subset: None,
            endpoints: vec![],
            priority_labels: Vec::new(),
            policy: ClusterPolicy::default(),
            destination_rule: None,
        })
    }

    fn forward(dests: &[(&str, u32)]) -> RouteAction {
        RouteAction::Forward(
            dests
                .iter()
                .map(|(c, w)| HttpDestination {
                    cluster: cluster(c),
                    weight: *w,
                    headers_request: HeaderOps::default(),
                    headers_response: HeaderOps::default(),
                })
                .collect(),
        )
    }

    fn rule(index: usize, matches: Vec<RequestMatch>, action: RouteAction) -> HttpRule {
        HttpRule {
            index,
            name: None,
            matches,
            action,
            rewrite: None,
            timeout: None,
            retries: RetryPolicy::istio_default(),
            fault: None,
            mirrors: vec![],
            headers_request: HeaderOps::default(),
            headers_response: HeaderOps::default(),
            cors: None,
            delegate: None,
        }
    }

    fn req<'a>(path: &'a str, headers: &[(&str, &str)]) -> RequestView<'a> {
        RequestView {
            method: "GET",
            scheme: "http",
            authority: "reviews:9080",
            path,
            query: "",
            headers: Cow::Owned(header_map(headers)),
            port: 9080,
            gateway: "mesh",
            ..Default::default()
        }
    }

    fn header_map(headers: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    fn cohort_routes() -> HttpRoutes {
        // The seed scenario: x-istio-cohort: internal → v2, everyone else → v1.
        HttpRoutes {
            virtual_service: Some("default/reviews".into()),
            rules: vec![
                rule(
                    0,
                    vec![RequestMatch {
                        headers: vec![(
                            "x-istio-cohort".into(),
                            StrMatch::Exact("internal".into()),
                        )],
                        ..Default::default()
                    }],
                    forward(&[("v2", 100)]),
                ),
                rule(1, vec![], forward(&[("v1", 100)])),
            ],
        }
    }

    fn chosen(routes: &HttpRoutes, r: &RequestView<'_>) -> Option<String> {
        routes
            .select(r)
            .and_then(|rule| rule.pick(0.5))
            .map(|d| d.cluster.name.clone())
    }

    #[test]
    fn header_match_routes_cohort_to_v2() {
        let routes = cohort_routes();
        assert_eq!(
            chosen(&routes, &req("/", &[("x-istio-cohort", "internal")])).as_deref(),
            Some("v2")
        );
        assert_eq!(
            chosen(&routes, &req("/", &[("x-istio-cohort", "external")])).as_deref(),
            Some("v1")
        );
        assert_eq!(chosen(&routes, &req("/", &[])).as_deref(), Some("v1"));
    }

    #[test]
    fn blocks_are_ored_and_conditions_anded() {
        let m = |uri: StrMatch, method: Option<&str>| RequestMatch {
            uri: Some(uri),
            method: method.map(|m| StrMatch::Exact(m.into())),
            ..Default::default()
        };
        let routes = HttpRoutes {
            virtual_service: None,
            rules: vec![rule(
                0,
                vec![
                    m(StrMatch::Prefix("/api".into()), Some("POST")),
                    m(StrMatch::Exact("/health".into()), None),
                ],
                forward(&[("a", 1)]),
            )],
        };
        let mut post = req("/api/x", &[]);
        post.method = "POST";
        assert!(routes.select(&post).is_some());
        assert!(
            routes.select(&req("/api/x", &[])).is_none(),
            "GET fails the AND"
        );
        assert!(
            routes.select(&req("/health", &[])).is_some(),
            "second block ORs"
        );
        assert!(
            routes.select(&req("/healthz", &[])).is_none(),
            "exact is exact"
        );
    }

    #[test]
    fn first_matching_rule_wins_and_no_match_is_404() {
        let routes = HttpRoutes {
            virtual_service: None,
            rules: vec![
                rule(
                    0,
                    vec![RequestMatch {
                        uri: Some(StrMatch::Prefix("/a".into())),
                        ..Default::default()
                    }],
                    forward(&[("first", 1)]),
                ),
                rule(
                    1,
                    vec![RequestMatch {
                        uri: Some(StrMatch::Prefix("/a/b".into())),
                        ..Default::default()
                    }],
                    forward(&[("never", 1)]),
                ),
            ],
        };
        assert_eq!(
            chosen(&routes, &req("/a/b/c", &[])).as_deref(),
            Some("first")
        );
        assert!(routes.select(&req("/z", &[])).is_none());
    }

    #[test]
    fn regex_is_anchored_and_ignore_case_applies_to_uri() {
        let re = StrMatch::regex("/reviews/[0-9]+").unwrap();
        assert!(re.matches("/reviews/12", false));
        assert!(
            !re.matches("/reviews/12/x", false),
            "full match, like Envoy's safe_regex"
        );
        assert!(StrMatch::Prefix("/API".into()).matches("/api/v1", true));
        assert!(!StrMatch::Prefix("/API".into()).matches("/api/v1", false));
        assert!(StrMatch::Exact("/Login".into()).matches("/login", true));
    }

    #[test]
    fn without_headers_query_params_port_and_source_labels() {
        let m = RequestMatch {
            without_headers: vec![("x-debug".into(), StrMatch::Present)],
            query_params: vec![("user".into(), StrMatch::Exact("jason".into()))],
            port: Some(9080),
            source_labels: [("app".to_string(), "productpage".to_string())].into(),
            ..Default::default()
        };
        let labels: crate::model::Labels = [("app".to_string(), "productpage".to_string())]
            .into_iter()
            .collect();
        let mut r = req("/", &[]);
        r.query = "a=1&user=jason";
        r.source_labels = Some(&labels);
        assert!(m.matches(&r));
        let mut with_debug = r.clone();
        with_debug
            .headers
            .to_mut()
            .insert("x-debug", "1".parse().unwrap());
        assert!(!m.matches(&with_debug));
        let mut other_port = r.clone();
        other_port.port = 9081;
        assert!(!m.matches(&other_port));
        let mut unknown_source = r.clone();
        unknown_source.source_labels = None;
        assert!(
            !m.matches(&unknown_source),
            "sourceLabels need a known client"
        );
        let mut no_user = r.clone();
        no_user.query = "user=mike";
        assert!(!m.matches(&no_user));
    }

    #[test]
    fn without_headers_see_pseudo_headers_like_headers() {
        // Found by the route-selection property tests: `withoutHeaders: {host: ...}` used to
        // look for a literal `host` header and so never excluded anything.
        let m = RequestMatch {
            without_headers: vec![("host".into(), StrMatch::Prefix("reviews".into()))],
            ..Default::default()
        };
        assert!(
            !m.matches(&req("/", &[])),
            "authority reviews:9080 is excluded"
        );
        let mut other = req("/", &[]);
        other.authority = "ratings:9080";
        assert!(m.matches(&other));
        let m = RequestMatch {
            without_headers: vec![(":method".into(), StrMatch::Exact("GET".into()))],
            ..Default::default()
        };
        assert!(!m.matches(&req("/", &[])));
    }

    #[test]
    fn repeated_headers_are_joined_and_names_are_case_insensitive() {
        let m = RequestMatch {
            headers: vec![("x-tag".into(), StrMatch::Exact("a,b".into()))],
            ..Default::default()
        };
        assert!(m.matches(&req("/", &[("X-Tag", "a"), ("x-tag", "b")])));
        assert!(!m.matches(&req("/", &[("x-tag", "a")])));
        let r = req(
            "/",
            &[
                ("cookie", "a=1; user=jason"),
                ("cookie", "b=2"),
                ("X-User", "mike"),
            ],
        );
        assert_eq!(r.cookie("user"), Some("jason"));
        assert_eq!(
            r.cookie("b"),
            Some("2"),
            "a second cookie header is read too"
        );
        assert_eq!(r.header_value("x-USER").as_deref(), Some("mike"));
        let quoted = req("/", &[("cookie", "session=\"0123abcd\"; x=\"")]);
        assert_eq!(
            quoted.cookie("session"),
            Some("0123abcd"),
            "a quoted value (as generated) is unquoted"
        );
        assert_eq!(quoted.cookie("x"), Some("\""), "a lone quote stays");
    }

    #[test]
    fn gateways_restrict_a_block() {
        let m = RequestMatch {
            gateways: vec!["istio-system/ingress".into()],
            ..Default::default()
        };
        assert!(
            !m.matches(&req("/", &[])),
            "a gateway-only block does not match mesh traffic"
        );
    }

    #[test]
    fn weighted_pick_follows_weights() {
        let r = rule(0, vec![], forward(&[("v1", 90), ("v2", 10)]));
        let n = 10_000;
        let v2 = (0..n)
            .filter(|i| r.pick(*i as f64 / n as f64).unwrap().cluster.name == "v2")
            .count();
        assert_eq!(v2, 1000, "exactly 10% of [0,1) maps to v2");
        let zero = rule(0, vec![], forward(&[("v1", 0), ("v2", 0)]));
        assert!(zero.pick(0.3).is_none());
        let last = rule(0, vec![], forward(&[("v1", 1), ("v2", 0)]));
        assert_eq!(last.pick(0.999_999).unwrap().cluster.name, "v1");
    }

    #[test]
    fn rewrites_follow_envoy() {
        let rw = Rewrite {
            uri: Some("/v2/".into()),
            ..Default::default()
        };
        assert_eq!(
            rewrite_path(&rw, Some("/v1/"), "/v1/reviews"),
            "/v2/reviews"
        );
        assert_eq!(rewrite_path(&rw, None, "/anything"), "/v2/");
        let rx = Rewrite {
            uri_regex: Some((
                Regex::new("^/service/([^/]+)(/.*)$").unwrap(),
                "\\2/instance/\\1".into(),
            )),
            ..Default::default()
        };
        assert_eq!(
            rewrite_path(&rx, None, "/service/foo/v1/api"),
            "/v1/api/instance/foo"
        );
    }

    fn cors(forward: bool) -> CorsPolicy {
        CorsPolicy {
            allow_origins: vec![
                StrMatch::Exact("https://a.example".into()),
                StrMatch::Prefix("https://dev.".into()),
                StrMatch::regex(r"https://[a-z]+\.b\.example").unwrap(),
            ],
            allow_methods: "GET,POST".into(),
            allow_headers: "x-token,content-type".into(),
            expose_headers: "x-served-by".into(),
            max_age: Some("86400".into()),
            allow_credentials: true,
            forward_unmatched_preflights: forward,
        }
    }

    fn preflight<'a>(origin: &'a str, extra: &[(&'a str, &'a str)]) -> RequestView<'a> {
        let mut headers = vec![
            ("origin", origin),
            ("access-control-request-method", "POST"),
        ];
        headers.extend_from_slice(extra);
        let mut r = req("/", &headers);
        r.method = "OPTIONS";
        r
    }

    #[test]
    fn cors_preflight_from_an_allowed_origin_is_answered() {
        let policy = cors(true);
        for origin in [
            "https://a.example",
            "https://dev.anything",
            "https://shop.b.example",
        ] {
            assert_eq!(
                policy.evaluate(&preflight(origin, &[])),
                CorsDecision::Preflight {
                    origin_allowed: true,
                    headers: vec![
                        ("access-control-allow-origin", origin.to_string()),
                        ("access-control-allow-credentials", "true".into()),
                        ("access-control-allow-methods", "GET,POST".into()),
                        (
                            "access-control-allow-headers",
                            "x-token,content-type".into()
                        ),
                        ("access-control-max-age", "86400".into()),
                    ],
                },
                "{origin}"
            );
        }
        // Exact is exact and case-sensitive; a regex matches the whole origin.
        for origin in [
            "https://A.example",
            "https://a.example.evil",
            "https://x.b.example.evil",
            "http://dev.x",
        ] {
            assert!(!policy.origin_allowed(origin), "{origin}");
        }
    }

    #[test]
    fn cors_unmatched_preflights_forward_or_ignore() {
        let r = preflight("https://evil.example", &[]);
        assert_eq!(cors(true).evaluate(&r), CorsDecision::OriginNotAllowed);
        let CorsDecision::Preflight {
            origin_allowed: false,
            headers,
        } = cors(false).evaluate(&r)
        else {
            panic!("IGNORE answers the preflight itself");
        };
        assert!(
            headers
                .iter()
                .all(|(k, _)| *k != "access-control-allow-origin"),
            "{headers:?}"
        );
    }

    #[test]
    fn cors_actual_requests_and_wildcards() {
        let policy = cors(true);
        let mut get = req("/", &[("origin", "https://a.example")]);
        assert_eq!(
            policy.evaluate(&get),
            CorsDecision::Allowed {
                headers: vec![
                    ("access-control-allow-origin", "https://a.example".into()),
                    ("access-control-allow-credentials", "true".into()),
                    ("access-control-expose-headers", "x-served-by".into()),
                ]
            }
        );
        // OPTIONS without Access-Control-Request-Method is not a preflight: it is forwarded.
        get.method = "OPTIONS";
        assert!(matches!(
            policy.evaluate(&get),
            CorsDecision::Allowed { .. }
        ));
        assert_eq!(policy.evaluate(&req("/", &[])), CorsDecision::NotCors);
        assert_eq!(
            policy.evaluate(&req("/", &[("origin", "https://evil.example")])),
            CorsDecision::OriginNotAllowed
        );
        // `*` methods/headers echo the preflight's request; an origin matcher accepting "*"
        // allows every origin.
        let any = CorsPolicy {
            allow_origins: vec![StrMatch::Exact("*".into())],
            allow_methods: "*".into(),
            allow_headers: "*".into(),
            expose_headers: String::new(),
            max_age: None,
            allow_credentials: false,
            forward_unmatched_preflights: true,
        };
        assert_eq!(
            any.evaluate(&preflight(
                "https://whoever.example",
                &[("access-control-request-headers", "x-a,x-b")]
            )),
            CorsDecision::Preflight {
                origin_allowed: true,
                headers: vec![
                    (
                        "access-control-allow-origin",
                        "https://whoever.example".into()
                    ),
                    ("access-control-allow-methods", "POST".into()),
                    ("access-control-allow-headers", "x-a,x-b".into()),
                ],
            }
        );
    }

    #[test]
    fn failover_priority_ranks_endpoints_by_matching_label_prefix() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let endpoint = |locality: &str| WeightedBackend {
            addr: "10.0.0.1:80".parse().unwrap(),
            weight: 1.0,
            clusters: std::sync::Arc::from([]),
            workload: Default::default(),
            locality: locality.into(),
        };
        let policy = |priority: &[&str], failover: &[(&str, &str)]| LocalityPolicy {
            failover_priority: priority.iter().map(|s| s.to_string()).collect(),
            failover: failover
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            failover_enabled: true,
            ..Default::default()
        };
        let client_labels: crate::model::Labels =
            labels(&[("team", "a"), ("track", "stable")]).into();
        let here = Locality::parse("us/z1");
        let client = Client {
            locality: Some(&here),
            labels: Some(&client_labels),
        };
        // Values of [team, track] per endpoint: both match, team only, neither, track only.
        let endpoints: Vec<_> = ["us/z1", "eu/z1", "us/z1", "us/z2"]
            .iter()
            .map(|l| endpoint(l))
            .collect();
        let values = |v: &[[&str; 2]]| -> Vec<Vec<String>> {
            v.iter()
                .map(|p| p.iter().map(|s| s.to_string()).collect())
                .collect()
        };
        let values2 = values(&[
            ["a", "stable"],
            ["a", "canary"],
            ["b", "stable"],
            ["b", "stable"],
        ]);
        // Istio: a mismatch on label j of n is priority n - j; the first label weighs most.
        // Raw 0, 1, 2, 2 → 0, 1, 2, 2; locality plays no part without `failover` rules.
        assert_eq!(
            policy(&["team", "track"], &[]).priorities(client, &endpoints, &values2),
            Some(vec![0, 1, 2, 2])
        );
        // A fixed value instead of the client's: endpoints of team b first (raw 2, 2, 0, 0).
        assert_eq!(
            policy(&["team=b", "track"], &[]).priorities(client, &endpoints, &values2),
            Some(vec![1, 1, 0, 0])
        );
        // With failover rules, locality breaks ties within a label level: raw 5·p + locality.
        assert_eq!(
            policy(&["team"], &[("us", "eu")]).priorities(client, &endpoints, &values2),
            // team a: us/z1 (0), eu/z1 (3); team b: us/z1 (5), us/z2 (6).
            Some(vec![0, 1, 2, 3])
        );
        // Topology labels come from the localities (the client's node, the endpoint's).
        let zone = vec![
            vec!["z1".to_string()],
            vec!["z1".to_string()],
            vec!["z1".to_string()],
            vec!["z2".to_string()],
        ];
        assert_eq!(
            policy(&["topology.kubernetes.io/zone"], &[]).priorities(client, &endpoints, &zone),
            Some(vec![0, 0, 0, 1])
        );
        // Nothing known of the client: Istio leaves every endpoint at priority 0.
        assert_eq!(
            policy(&["team"], &[]).priorities(Client::default(), &endpoints, &values2),
            Some(vec![0, 0, 0, 0])
        );
        assert_eq!(
            augmented_label(
                "topology.kubernetes.io/region",
                Some(&client_labels),
                ["us", "", ""]
            ),
            "us"
        );
        assert_eq!(
            augmented_label("team", Some(&client_labels), ["us", "", ""]),
            "a"
        );
        assert_eq!(
            augmented_label::<BTreeMap<String, String>>("team", None, ["", "", ""]),
            ""
        );
    }

    #[test]
    fn localities_match_and_rank_like_istio() {
        let me = Locality::parse("us-east/z1/rack1");
        for rule in [
            "us-east",
            "us-east/*",
            "us-east/z1",
            "us-east/z1/rack1",
            "*",
        ] {
            assert!(me.matches_rule(rule), "{rule}");
        }
        for rule in ["us-west", "us-east/z2", "us-east/z1/rack2"] {
            assert!(!me.matches_rule(rule), "{rule}");
        }
        let rank = |l: &str| me.priority_of(&Locality::parse(l));
        assert_eq!(
            [
                rank("us-east/z1/rack1"),
                rank("us-east/z1/rack2"),
                rank("us-east/z2"),
                rank("eu/z1")
            ],
            [0, 1, 2, 3]
        );
    }

    #[test]
    fn describe_matches_for_explain() {
        let r = rule(
            0,
            vec![RequestMatch {
                uri: Some(StrMatch::Prefix("/api".into())),
                headers: vec![("end-user".into(), StrMatch::Exact("jason".into()))],
                ..Default::default()
            }],
            forward(&[("v1", 1)]),
        );
        assert_eq!(
            r.describe_matches(),
            vec!["uri prefix \"/api\" && header end-user exact \"jason\""]
        );
    }
}
