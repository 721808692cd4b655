//! Typed `networking.istio.io` specs: VirtualService, DestinationRule, ServiceEntry, Gateway,
//! WorkloadEntry and Sidecar. The served versions (v1, v1beta1, v1alpha3) share one schema, and
//! every field of that schema (`crd-all.gen.yaml`) has a typed home here.
//!
//! Decoding follows what the API server and Istio accept:
//! - Field names are the JSON (lowerCamelCase) names; unknown fields are errors
//!   (`deny_unknown_fields`), as with `kubectl apply`'s strict field validation.
//! - `oneof` groups (`StringMatch`'s `exact|prefix|regex`, a load balancer's
//!   `simple|consistentHash|backendUtilization`, ...) become enums, and setting two members is an
//!   error, as the CRD's `oneOf` makes it.
//! - Fields the schema marks `required` are required.
//! - Durations are [`Duration`]s (`5s`, `1.5s`, `100ms`, `1m`); `google.protobuf` wrappers are
//!   written as Istio's JSON writes them: `Percent` is `{value: 12.5}`, while `UInt32Value`,
//!   `BoolValue` and `DoubleValue` fields (`mirrorPercent`, `consecutive5xxErrors`,
//!   `retryRemoteLocalities`, ...) are bare values. Scalars left out are `None` (proto3's 0).
//! - Enums are their string names; a value left out is `None`, whose meaning is the enum's
//!   default (documented on each enum as "default").
//!
//! Semantic rules (host syntax, weights, regexes, ...) are checked by [`super::validate`].

use super::duration::Duration;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The gateway name Istio uses for sidecar (east-west) traffic.
pub const MESH_GATEWAY: &str = "mesh";

/// Labels, header maps and other string maps.
pub type StringMap = BTreeMap<String, String>;

/// Message for a `oneof` group with more than one member set.
fn one_of_error(group: &[&str], set: &[&str]) -> String {
    format!(
        "only one of {} may be set, found {}",
        group.join(", "),
        set.join(" and ")
    )
}

/// Checks that at most one member of a `oneof` group is set.
fn at_most_one(members: &[(&'static str, bool)]) -> Result<(), String> {
    let set: Vec<&str> = members.iter().filter(|m| m.1).map(|m| m.0).collect();
    if set.len() > 1 {
        let group: Vec<&str> = members.iter().map(|m| m.0).collect();
        return Err(one_of_error(&group, &set));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Common types
// ------------------------------------------------------------------------------------------------

/// `istio.networking.v1.Percent`: a percentage in `[0.0, 100.0]`, written `{value: 12.5}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Percent {
    #[serde(default)]
    pub value: f64,
}

/// A string matcher (`oneof match_type`). `{}` (no member set) is [`StringMatch::Unset`], which
/// Istio treats as "any value" (a presence match for headers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StringMatchRepr", into = "StringMatchRepr")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// RE2 syntax.
    Regex(String),
    Unset,
}

impl StringMatch {
    /// The regular expression, for regex matches.
    pub fn regex(&self) -> Option<&str> {
        match self {
            StringMatch::Regex(r) => Some(r),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StringMatchRepr {
    #[serde(skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
}

impl TryFrom<StringMatchRepr> for StringMatch {
    type Error = String;
    fn try_from(r: StringMatchRepr) -> Result<Self, String> {
        at_most_one(&[
            ("exact", r.exact.is_some()),
            ("prefix", r.prefix.is_some()),
            ("regex", r.regex.is_some()),
        ])?;
        Ok(match (r.exact, r.prefix, r.regex) {
            (Some(s), _, _) => StringMatch::Exact(s),
            (_, Some(s), _) => StringMatch::Prefix(s),
            (_, _, Some(s)) => StringMatch::Regex(s),
            _ => StringMatch::Unset,
        })
    }
}

impl From<StringMatch> for StringMatchRepr {
    fn from(m: StringMatch) -> Self {
        let mut r = StringMatchRepr::default();
        match m {
            StringMatch::Exact(s) => r.exact = Some(s),
            StringMatch::Prefix(s) => r.prefix = Some(s),
            StringMatch::Regex(s) => r.regex = Some(s),
            StringMatch::Unset => {}
        }
        r
    }
}

/// The destination of traffic: a service host, optionally a subset and a port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSelector {
    pub number: Option<u32>,
}

/// `WorkloadSelector` of ServiceEntry and Sidecar (`labels`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: StringMap,
}

/// `istio.type.v1beta1.WorkloadSelector` of DestinationRule (`matchLabels`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchLabelsSelector {
    #[serde(default)]
    pub match_labels: StringMap,
}

// ------------------------------------------------------------------------------------------------
// VirtualService
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualService {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    #[serde(default)]
    pub tls: Vec<TlsRoute>,
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    #[serde(default)]
    pub export_to: Vec<String>,
}

impl VirtualService {
    /// Whether the VirtualService applies to mesh traffic: no `gateways` means `[mesh]`.
    pub fn binds_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == MESH_GATEWAY)
    }

    /// A delegate VirtualService (one referenced by another's `http[].delegate`) has no hosts.
    pub fn is_delegate(&self) -> bool {
        self.hosts.is_empty()
    }
}

/// One HTTP route rule: matches, and what to do with matching requests (route, redirect,
/// direct response or delegate) plus per-route policies.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
    pub redirect: Option<HttpRedirect>,
    pub direct_response: Option<HttpDirectResponse>,
    pub delegate: Option<Delegate>,
    pub rewrite: Option<HttpRewrite>,
    /// Request timeout; absent means disabled.
    pub timeout: Option<Duration>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFaultInjection>,
    pub mirror: Option<Destination>,
    #[serde(default)]
    pub mirrors: Vec<HttpMirrorPolicy>,
    pub mirror_percentage: Option<Percent>,
    /// Deprecated `UInt32Value`; use [`HttpRoute::mirror_percent`] to read either spelling.
    pub mirror_percent: Option<u32>,
    /// The same deprecated field under its proto name, which the CRD also accepts.
    #[serde(rename = "mirror_percent")]
    pub mirror_percent_proto_name: Option<u32>,
    pub cors_policy: Option<CorsPolicy>,
    pub headers: Option<Headers>,
}

impl HttpRoute {
    /// `mirrorPercent` or `mirror_percent`, whichever is set.
    pub fn mirror_percent(&self) -> Option<u32> {
        self.mirror_percent.or(self.mirror_percent_proto_name)
    }
}

/// Conditions a request must meet (all of them) for a rule to apply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatchRequest {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    /// Lower-case header names; `@request.auth.claims.*` keys match JWT claims (gateways only).
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    pub port: Option<u32>,
    #[serde(default)]
    pub source_labels: StringMap,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    pub ignore_uri_case: Option<bool>,
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    pub source_namespace: Option<String>,
    pub stat_prefix: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteDestination {
    pub destination: Destination,
    /// Relative weight; absent means 0 when there are several destinations, all when one.
    pub weight: Option<i32>,
    pub headers: Option<Headers>,
}

/// Header manipulation for requests and responses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOperations {
    /// Overwrite these headers.
    #[serde(default)]
    pub set: StringMap,
    /// Append these headers.
    #[serde(default)]
    pub add: StringMap,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    rename_all = "camelCase",
    try_from = "HttpRedirectRepr",
    into = "HttpRedirectRepr"
)]
pub struct HttpRedirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    /// `port` or `derivePort` (a `oneof`).
    pub port: Option<RedirectPort>,
    pub scheme: Option<String>,
    /// Default 301.
    pub redirect_code: Option<u32>,
    pub prefix_rewrite: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RedirectPort {
    Number(u32),
    Derive(DerivePort),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DerivePort {
    /// 80 for http, 443 for https.
    FromProtocolDefault,
    FromRequestPort,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpRedirectRepr {
    #[serde(skip_serializing_if = "Option::is_none")]
    uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authority: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    derive_port: Option<DerivePort>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scheme: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redirect_code: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix_rewrite: Option<String>,
}

impl TryFrom<HttpRedirectRepr> for HttpRedirect {
    type Error = String;
    fn try_from(r: HttpRedirectRepr) -> Result<Self, String> {
        at_most_one(&[
            ("port", r.port.is_some()),
            ("derivePort", r.derive_port.is_some()),
        ])?;
        Ok(HttpRedirect {
            uri: r.uri,
            authority: r.authority,
            port: r
                .port
                .map(RedirectPort::Number)
                .or(r.derive_port.map(RedirectPort::Derive)),
            scheme: r.scheme,
            redirect_code: r.redirect_code,
            prefix_rewrite: r.prefix_rewrite,
        })
    }
}

impl From<HttpRedirect> for HttpRedirectRepr {
    fn from(r: HttpRedirect) -> Self {
        HttpRedirectRepr {
            uri: r.uri,
            authority: r.authority,
            port: match r.port {
                Some(RedirectPort::Number(n)) => Some(n),
                _ => None,
            },
            derive_port: match r.port {
                Some(RedirectPort::Derive(d)) => Some(d),
                _ => None,
            },
            scheme: r.scheme,
            redirect_code: r.redirect_code,
            prefix_rewrite: r.prefix_rewrite,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpDirectResponse {
    pub status: u32,
    pub body: Option<HttpBody>,
}

/// A direct response body (`oneof specifier`): text, or base64-encoded bytes in YAML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "HttpBodyRepr", into = "HttpBodyRepr")]
pub enum HttpBody {
    String(String),
    Bytes(Vec<u8>),
    /// `body: {}`: an empty body.
    Unset,
}

impl HttpBody {
    pub fn len(&self) -> usize {
        match self {
            HttpBody::String(s) => s.len(),
            HttpBody::Bytes(b) => b.len(),
            HttpBody::Unset => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpBodyRepr {
    #[serde(skip_serializing_if = "Option::is_none")]
    string: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<String>,
}

impl TryFrom<HttpBodyRepr> for HttpBody {
    type Error = String;
    fn try_from(r: HttpBodyRepr) -> Result<Self, String> {
        use base64::Engine as _;
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        at_most_one(&[("string", r.string.is_some()), ("bytes", r.bytes.is_some())])?;
        Ok(match (r.string, r.bytes) {
            (Some(s), _) => HttpBody::String(s),
            (_, Some(b)) => HttpBody::Bytes(
                [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
                    .iter()
                    .find_map(|e| e.decode(&b).ok())
                    .ok_or_else(|| format!("bytes: {b:?} is not valid base64"))?,
            ),
            _ => HttpBody::Unset,
        })
    }
}

impl From<HttpBody> for HttpBodyRepr {
    fn from(b: HttpBody) -> Self {
        use base64::Engine as _;
        match b {
            HttpBody::String(s) => HttpBodyRepr {
                string: Some(s),
                bytes: None,
            },
            HttpBody::Bytes(b) => HttpBodyRepr {
                string: None,
                bytes: Some(base64::engine::general_purpose::STANDARD.encode(b)),
            },
            HttpBody::Unset => HttpBodyRepr::default(),
        }
    }
}

/// Where a root VirtualService hands a route over to a delegate VirtualService.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delegate {
    pub name: Option<String>,
    /// Default: the root VirtualService's namespace.
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRewrite {
    /// Replaces the path, or the matched prefix for prefix matches.
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegexRewrite {
    /// RE2 syntax.
    #[serde(rename = "match")]
    pub pattern: Option<String>,
    pub rewrite: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRetry {
    pub attempts: Option<i32>,
    pub per_try_timeout: Option<Duration>,
    /// Comma-separated Envoy retry policies and HTTP status codes (`5xx,connect-failure,503`).
    pub retry_on: Option<String>,
    pub retry_remote_localities: Option<bool>,
    pub retry_ignore_previous_hosts: Option<bool>,
    pub backoff: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpFaultInjection {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "FaultDelayRepr", into = "FaultDelayRepr")]
pub struct FaultDelay {
    /// `fixedDelay` or `exponentialDelay` (a `oneof`).
    pub delay: Option<DelayKind>,
    pub percentage: Option<Percent>,
    /// Deprecated integer percentage.
    pub percent: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DelayKind {
    Fixed(Duration),
    Exponential(Duration),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FaultDelayRepr {
    #[serde(skip_serializing_if = "Option::is_none")]
    fixed_delay: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exponential_delay: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    percentage: Option<Percent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    percent: Option<i32>,
}

impl TryFrom<FaultDelayRepr> for FaultDelay {
    type Error = String;
    fn try_from(r: FaultDelayRepr) -> Result<Self, String> {
        at_most_one(&[
            ("fixedDelay", r.fixed_delay.is_some()),
            ("exponentialDelay", r.exponential_delay.is_some()),
        ])?;
        Ok(FaultDelay {
            delay: r
                .fixed_delay
                .map(DelayKind::Fixed)
                .or(r.exponential_delay.map(DelayKind::Exponential)),
            percentage: r.percentage,
            percent: r.percent,
        })
    }
}

impl From<FaultDelay> for FaultDelayRepr {
    fn from(d: FaultDelay) -> Self {
        FaultDelayRepr {
            fixed_delay: match d.delay {
                Some(DelayKind::Fixed(v)) => Some(v),
                _ => None,
            },
            exponential_delay: match d.delay {
                Some(DelayKind::Exponential(v)) => Some(v),
                _ => None,
            },
            percentage: d.percentage,
            percent: d.percent,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "FaultAbortRepr", into = "FaultAbortRepr")]
pub struct FaultAbort {
    /// `httpStatus`, `grpcStatus` or `http2Error` (a `oneof`).
    pub error: Option<AbortError>,
    pub percentage: Option<Percent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AbortError {
    HttpStatus(i32),
    /// A gRPC status name such as `UNAVAILABLE`.
    GrpcStatus(String),
    Http2Error(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FaultAbortRepr {
    #[serde(skip_serializing_if = "Option::is_none")]
    http_status: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http2_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    percentage: Option<Percent>,
}

impl TryFrom<FaultAbortRepr> for FaultAbort {
    type Error = String;
    fn try_from(r: FaultAbortRepr) -> Result<Self, String> {
        at_most_one(&[
            ("httpStatus", r.http_status.is_some()),
            ("grpcStatus", r.grpc_status.is_some()),
            ("http2Error", r.http2_error.is_some()),
        ])?;
        Ok(FaultAbort {
            error: r
                .http_status
                .map(AbortError::HttpStatus)
                .or(r.grpc_status.map(AbortError::GrpcStatus))
                .or(r.http2_error.map(AbortError::Http2Error)),
            percentage: r.percentage,
        })
    }
}

impl From<FaultAbort> for FaultAbortRepr {
    fn from(a: FaultAbort) -> Self {
        let mut r = FaultAbortRepr {
            percentage: a.percentage,
            ..Default::default()
        };
        match a.error {
            Some(AbortError::HttpStatus(s)) => r.http_status = Some(s),
            Some(AbortError::GrpcStatus(s)) => r.grpc_status = Some(s),
            Some(AbortError::Http2Error(s)) => r.http2_error = Some(s),
            None => {}
        }
        r
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMirrorPolicy {
    pub destination: Destination,
    /// Default: all requests.
    pub percentage: Option<Percent>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CorsPolicy {
    /// Deprecated exact origins.
    #[serde(default)]
    pub allow_origin: Vec<String>,
    #[serde(default)]
    pub allow_origins: Vec<StringMatch>,
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    pub max_age: Option<Duration>,
    pub allow_credentials: Option<bool>,
    pub unmatched_preflights: Option<UnmatchedPreflights>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum UnmatchedPreflights {
    /// Default (behaves as `FORWARD`).
    Unspecified,
    Forward,
    Ignore,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRoute {
    #[serde(default, rename = "match")]
    pub matches: Vec<L4MatchAttributes>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsRoute {
    #[serde(rename = "match")]
    pub matches: Vec<TlsMatchAttributes>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4MatchAttributes {
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    pub port: Option<u32>,
    /// Deprecated; never used by Istio.
    pub source_subnet: Option<String>,
    #[serde(default)]
    pub source_labels: StringMap,
    #[serde(default)]
    pub gateways: Vec<String>,
    pub source_namespace: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsMatchAttributes {
    pub sni_hosts: Vec<String>,
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    pub port: Option<u32>,
    #[serde(default)]
    pub source_labels: StringMap,
    #[serde(default)]
    pub gateways: Vec<String>,
    pub source_namespace: Option<String>,
}

/// A weighted destination of a TCP or TLS route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteDestination {
    pub destination: Destination,
    /// Relative weight; absent means 0 when there are several destinations, all when one.
    pub weight: Option<i32>,
}

// ------------------------------------------------------------------------------------------------
// DestinationRule
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRule {
    pub host: String,
    /// Boxed: most rules and subsets have none, and the policy is nearly a kilobyte inline.
    pub traffic_policy: Option<Box<TrafficPolicy>>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub export_to: Vec<String>,
    pub workload_selector: Option<MatchLabelsSelector>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: StringMap,
    /// Boxed: most rules and subsets have none, and the policy is nearly a kilobyte inline.
    pub traffic_policy: Option<Box<TrafficPolicy>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTlsSettings>,
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    pub tunnel: Option<TunnelSettings>,
    pub proxy_protocol: Option<ProxyProtocol>,
    pub retry_budget: Option<RetryBudget>,
}

/// Traffic policy for one port of the destination.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTlsSettings>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(
    try_from = "LoadBalancerSettingsRepr",
    into = "LoadBalancerSettingsRepr"
)]
pub struct LoadBalancerSettings {
    /// `simple`, `consistentHash` or `backendUtilization` (a `oneof`).
    pub policy: Option<LbPolicy>,
    pub locality_lb_setting: Option<LocalityLbSetting>,
    /// Deprecated: use `warmup`.
    pub warmup_duration_secs: Option<Duration>,
    pub warmup: Option<WarmupConfiguration>,
    pub zone_aware_lb_setting: Option<ZoneAwareLbSetting>,
}

impl LoadBalancerSettings {
    pub fn simple(&self) -> Option<SimpleLb> {
        match &self.policy {
            Some(LbPolicy::Simple(s)) => Some(*s),
            _ => None,
        }
    }

    pub fn consistent_hash(&self) -> Option<&ConsistentHashLb> {
        match &self.policy {
            Some(LbPolicy::ConsistentHash(c)) => Some(c),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LbPolicy {
    Simple(SimpleLb),
    ConsistentHash(ConsistentHashLb),
    BackendUtilization(BackendUtilizationLb),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    /// Default: Istio picks (LEAST_REQUEST).
    Unspecified,
    LeastConn,
    Random,
    Passthrough,
    RoundRobin,
    LeastRequest,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LoadBalancerSettingsRepr {
    #[serde(skip_serializing_if = "Option::is_none")]
    simple: Option<SimpleLb>,
    #[serde(skip_serializing_if = "Option::is_none")]
    consistent_hash: Option<ConsistentHashLb>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend_utilization: Option<BackendUtilizationLb>,
    #[serde(skip_serializing_if = "Option::is_none")]
    locality_lb_setting: Option<LocalityLbSetting>,
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup_duration_secs: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup: Option<WarmupConfiguration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone_aware_lb_setting: Option<ZoneAwareLbSetting>,
}

impl TryFrom<LoadBalancerSettingsRepr> for LoadBalancerSettings {
    type Error = String;
    fn try_from(r: LoadBalancerSettingsRepr) -> Result<Self, String> {
        at_most_one(&[
            ("simple", r.simple.is_some()),
            ("consistentHash", r.consistent_hash.is_some()),
            ("backendUtilization", r.backend_utilization.is_some()),
        ])?;
        Ok(LoadBalancerSettings {
            policy: r
                .simple
                .map(LbPolicy::Simple)
                .or(r.consistent_hash.map(LbPolicy::ConsistentHash))
                .or(r.backend_utilization.map(LbPolicy::BackendUtilization)),
            locality_lb_setting: r.locality_lb_setting,
            warmup_duration_secs: r.warmup_duration_secs,
            warmup: r.warmup,
            zone_aware_lb_setting: r.zone_aware_lb_setting,
        })
    }
}

impl From<LoadBalancerSettings> for LoadBalancerSettingsRepr {
    fn from(s: LoadBalancerSettings) -> Self {
        let mut r = LoadBalancerSettingsRepr {
            locality_lb_setting: s.locality_lb_setting,
            warmup_duration_secs: s.warmup_duration_secs,
            warmup: s.warmup,
            zone_aware_lb_setting: s.zone_aware_lb_setting,
            ..Default::default()
        };
        match s.policy {
            Some(LbPolicy::Simple(v)) => r.simple = Some(v),
            Some(LbPolicy::ConsistentHash(v)) => r.consistent_hash = Some(v),
            Some(LbPolicy::BackendUtilization(v)) => r.backend_utilization = Some(v),
            None => {}
        }
        r
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ConsistentHashLbRepr", into = "ConsistentHashLbRepr")]
pub struct ConsistentHashLb {
    /// `httpHeaderName`, `httpCookie`, `useSourceIp` or `httpQueryParameterName` (a `oneof`).
    pub hash_key: Option<HashKey>,
    /// `ringHash` or `maglev` (a `oneof`).
    pub hash_algorithm: Option<HashAlgorithm>,
    /// Deprecated: use `ringHash.minimumRingSize`.
    pub minimum_ring_size: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HashKey {
    HttpHeaderName(String),
    HttpCookie(HttpCookie),
    UseSourceIp(bool),
    HttpQueryParameterName(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HashAlgorithm {
    RingHash(RingHash),
    Maglev(Maglev),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCookie {
    pub name: String,
    pub path: Option<String>,
    pub ttl: Option<Duration>,
    #[serde(default)]
    pub attributes: Vec<CookieAttribute>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CookieAttribute {
    pub name: String,
    pub value: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RingHash {
    pub minimum_ring_size: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Maglev {
    /// Must be prime.
    pub table_size: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConsistentHashLbRepr {
    #[serde(skip_serializing_if = "Option::is_none")]
    http_header_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_cookie: Option<HttpCookie>,
    #[serde(skip_serializing_if = "Option::is_none")]
    use_source_ip: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_query_parameter_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ring_hash: Option<RingHash>,
    #[serde(skip_serializing_if = "Option::is_none")]
    maglev: Option<Maglev>,
    #[serde(skip_serializing_if = "Option::is_none")]
    minimum_ring_size: Option<u64>,
}

impl TryFrom<ConsistentHashLbRepr> for ConsistentHashLb {
    type Error = String;
    fn try_from(r: ConsistentHashLbRepr) -> Result<Self, String> {
        at_most_one(&[
            ("httpHeaderName", r.http_header_name.is_some()),
            ("httpCookie", r.http_cookie.is_some()),
            ("useSourceIp", r.use_source_ip.is_some()),
            (
                "httpQueryParameterName",
                r.http_query_parameter_name.is_some(),
            ),
        ])?;
        at_most_one(&[
            ("ringHash", r.ring_hash.is_some()),
            ("maglev", r.maglev.is_some()),
        ])?;
        Ok(ConsistentHashLb {
            hash_key: r
                .http_header_name
                .map(HashKey::HttpHeaderName)
                .or(r.http_cookie.map(HashKey::HttpCookie))
                .or(r.use_source_ip.map(HashKey::UseSourceIp))
                .or(r
                    .http_query_parameter_name
                    .map(HashKey::HttpQueryParameterName)),
            hash_algorithm: r
                .ring_hash
                .map(HashAlgorithm::RingHash)
                .or(r.maglev.map(HashAlgorithm::Maglev)),
            minimum_ring_size: r.minimum_ring_size,
        })
    }
}

impl From<ConsistentHashLb> for ConsistentHashLbRepr {
    fn from(c: ConsistentHashLb) -> Self {
        let mut r = ConsistentHashLbRepr {
            minimum_ring_size: c.minimum_ring_size,
            ..Default::default()
        };
        match c.hash_key {
            Some(HashKey::HttpHeaderName(v)) => r.http_header_name = Some(v),
            Some(HashKey::HttpCookie(v)) => r.http_cookie = Some(v),
            Some(HashKey::UseSourceIp(v)) => r.use_source_ip = Some(v),
            Some(HashKey::HttpQueryParameterName(v)) => r.http_query_parameter_name = Some(v),
            None => {}
        }
        match c.hash_algorithm {
            Some(HashAlgorithm::RingHash(v)) => r.ring_hash = Some(v),
            Some(HashAlgorithm::Maglev(v)) => r.maglev = Some(v),
            None => {}
        }
        r
    }
}

/// Weights endpoints by the load they report (ORCA).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendUtilizationLb {
    pub error_utilization_penalty_percent: Option<u32>,
    #[serde(default)]
    pub metric_names_for_computing_utilization: Vec<String>,
    pub weight_expiration_period: Option<Duration>,
    pub weight_stabilization_period: Option<Duration>,
    pub weight_update_period: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityLbSetting {
    #[serde(default)]
    pub distribute: Vec<LocalityDistribute>,
    #[serde(default)]
    pub failover: Vec<LocalityFailover>,
    #[serde(default)]
    pub failover_priority: Vec<String>,
    pub enabled: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityDistribute {
    /// `region/zone/subzone`, with an optional trailing `*`.
    pub from: Option<String>,
    /// Locality → weight (the weights sum to 100).
    #[serde(default)]
    pub to: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityFailover {
    pub from: Option<String>,
    pub to: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZoneAwareLbSetting {
    pub enabled: Option<bool>,
    #[serde(default)]
    pub failover: Vec<LocalityFailover>,
    #[serde(default)]
    pub failover_priority: Vec<String>,
    pub min_cluster_size: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WarmupConfiguration {
    pub duration: Duration,
    pub minimum_percent: Option<f64>,
    pub aggression: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPoolSettings {
    pub tcp: Option<TcpPoolSettings>,
    pub http: Option<HttpPoolSettings>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpPoolSettings {
    pub max_connections: Option<i32>,
    pub connect_timeout: Option<Duration>,
    pub tcp_keepalive: Option<TcpKeepalive>,
    pub max_connection_duration: Option<Duration>,
    /// `0s` disables the timeout.
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPoolSettings {
    pub http1_max_pending_requests: Option<i32>,
    pub http2_max_requests: Option<i32>,
    pub max_requests_per_connection: Option<i32>,
    pub max_retries: Option<i32>,
    pub idle_timeout: Option<Duration>,
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    pub use_client_protocol: Option<bool>,
    pub max_concurrent_streams: Option<i32>,
    pub http2_keep_alive: Option<Http2KeepAlive>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum H2UpgradePolicy {
    /// Default: the mesh-wide setting.
    Default,
    DoNotUpgrade,
    Upgrade,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Http2KeepAlive {
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Deprecated `int32`: use `consecutive5xxErrors`/`consecutiveGatewayErrors`.
    pub consecutive_errors: Option<i32>,
    pub split_external_local_origin_errors: Option<bool>,
    pub consecutive_local_origin_failures: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub consecutive_5xx_errors: Option<u32>,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<i32>,
    pub min_health_percent: Option<i32>,
    #[serde(default)]
    pub outlier_detection_http_error_codes: Vec<u32>,
}

/// TLS from the proxy to the upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTlsSettings {
    pub mode: Option<ClientTlsMode>,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub credential_name: Option<String>,
    /// Absent and empty differ for Istio's checks (`subjectAltNames: []` counts as set).
    pub subject_alt_names: Option<Vec<String>>,
    pub sni: Option<String>,
    pub insecure_skip_verify: Option<bool>,
    pub ca_crl: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClientTlsMode {
    /// Default.
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TunnelSettings {
    /// `CONNECT` (default) or `POST`.
    pub protocol: Option<String>,
    pub target_host: String,
    pub target_port: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyProtocol {
    pub version: Option<ProxyProtocolVersion>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProxyProtocolVersion {
    /// Default.
    V1,
    V2,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    pub percent: Option<f64>,
    pub min_retry_concurrency: Option<u32>,
    pub budget_interval: Option<Duration>,
}

// ------------------------------------------------------------------------------------------------
// ServiceEntry and WorkloadEntry
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    #[default]
    None,
    Static,
    Dns,
    DnsRoundRobin,
    DynamicDns,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::None => "NONE",
            Resolution::Static => "STATIC",
            Resolution::Dns => "DNS",
            Resolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
            Resolution::DynamicDns => "DYNAMIC_DNS",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    #[default]
    MeshExternal,
    MeshInternal,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntry {
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServiceEntryPort>,
    pub location: Option<Location>,
    #[serde(default)]
    pub resolution: Resolution,
    /// `None` and `Some([])` differ: Istio rejects `endpoints: []` next to a `workloadSelector`.
    pub endpoints: Option<Vec<WorkloadEntry>>,
    pub workload_selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

impl ServiceEntry {
    /// The inline endpoints (none when absent).
    pub fn endpoints(&self) -> &[WorkloadEntry] {
        self.endpoints.as_deref().unwrap_or_default()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntryPort {
    pub number: u32,
    pub protocol: Option<String>,
    pub name: String,
    pub target_port: Option<u32>,
}

/// The spec of a `WorkloadEntry`, also the element type of `ServiceEntry.endpoints`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntry {
    /// An IP, a DNS name (DNS resolution) or `unix:///path`.
    #[serde(default)]
    pub address: String,
    /// Port name → port number on this endpoint.
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    #[serde(default)]
    pub labels: StringMap,
    pub network: Option<String>,
    pub locality: Option<String>,
    /// Load-balancing weight relative to the other endpoints (default 1).
    pub weight: Option<u32>,
    pub service_account: Option<String>,
}

// ------------------------------------------------------------------------------------------------
// Gateway
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Gateway {
    #[serde(default)]
    pub servers: Vec<Server>,
    #[serde(default)]
    pub selector: StringMap,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Server {
    pub port: Port,
    /// An IP or `unix://` socket to bind to.
    pub bind: Option<String>,
    /// `[namespace/]dnsName`, with `*` wildcards.
    pub hosts: Vec<String>,
    pub tls: Option<ServerTlsSettings>,
    pub default_endpoint: Option<String>,
    pub name: Option<String>,
}

/// A gateway listener port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Port {
    pub number: u32,
    /// `HTTP|HTTPS|GRPC|GRPC-WEB|HTTP2|MONGO|TCP|TLS`.
    pub protocol: String,
    pub name: String,
    /// Deprecated; has no effect.
    pub target_port: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerTlsSettings {
    pub https_redirect: Option<bool>,
    pub mode: Option<ServerTlsMode>,
    pub server_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub ca_crl: Option<String>,
    pub credential_name: Option<String>,
    #[serde(default)]
    pub credential_names: Vec<String>,
    #[serde(default)]
    pub tls_certificates: Vec<TlsCertificate>,
    pub ca_cert_credential_name: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub verify_certificate_spki: Vec<String>,
    #[serde(default)]
    pub verify_certificate_hash: Vec<String>,
    pub min_protocol_version: Option<TlsProtocolVersion>,
    pub max_protocol_version: Option<TlsProtocolVersion>,
    #[serde(default)]
    pub cipher_suites: Vec<String>,
    #[serde(default)]
    pub ecdh_curves: Vec<String>,
    pub insecure_skip_verify: Option<bool>,
}

impl ServerTlsSettings {
    /// The mode, defaulting to `PASSTHROUGH` as the protobuf enum does.
    pub fn mode(&self) -> ServerTlsMode {
        self.mode.unwrap_or(ServerTlsMode::Passthrough)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsCertificate {
    pub server_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServerTlsMode {
    /// Default.
    Passthrough,
    Simple,
    Mutual,
    AutoPassthrough,
    IstioMutual,
    OptionalMutual,
}

impl ServerTlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerTlsMode::Passthrough => "PASSTHROUGH",
            ServerTlsMode::Simple => "SIMPLE",
            ServerTlsMode::Mutual => "MUTUAL",
            ServerTlsMode::AutoPassthrough => "AUTO_PASSTHROUGH",
            ServerTlsMode::IstioMutual => "ISTIO_MUTUAL",
            ServerTlsMode::OptionalMutual => "OPTIONAL_MUTUAL",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsProtocolVersion {
    /// Default.
    #[serde(rename = "TLS_AUTO")]
    TlsAuto,
    #[serde(rename = "TLSV1_0")]
    Tlsv1_0,
    #[serde(rename = "TLSV1_1")]
    Tlsv1_1,
    #[serde(rename = "TLSV1_2")]
    Tlsv1_2,
    #[serde(rename = "TLSV1_3")]
    Tlsv1_3,
}

// ------------------------------------------------------------------------------------------------
// Sidecar
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Sidecar {
    pub workload_selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub ingress: Vec<IstioIngressListener>,
    #[serde(default)]
    pub egress: Vec<IstioEgressListener>,
    pub inbound_connection_pool: Option<ConnectionPoolSettings>,
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioIngressListener {
    pub port: SidecarPort,
    pub bind: Option<String>,
    pub capture_mode: Option<CaptureMode>,
    /// `127.0.0.1:PORT`, `0.0.0.0:PORT`, `[::1]:PORT`, `[::]:PORT` or `unix:///path`.
    pub default_endpoint: Option<String>,
    pub tls: Option<ServerTlsSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioEgressListener {
    /// Absent: a catch-all listener (allowed once, last).
    pub port: Option<SidecarPort>,
    pub bind: Option<String>,
    pub capture_mode: Option<CaptureMode>,
    /// `namespace/dnsName` (`*/*`, `./foo.example.com`, `~/*`, ...).
    pub hosts: Vec<String>,
}

/// A sidecar listener port; unlike a gateway [`Port`] nothing is required.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarPort {
    /// 0 (or absent) with a `unix://` bind for a Unix domain socket listener.
    pub number: Option<u32>,
    pub protocol: Option<String>,
    pub name: Option<String>,
    /// Deprecated; has no effect.
    pub target_port: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CaptureMode {
    /// Default.
    Default,
    Iptables,
    None,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundTrafficPolicy {
    pub mode: Option<OutboundTrafficPolicyMode>,
    pub egress_proxy: Option<Destination>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundTrafficPolicyMode {
    /// Default.
    RegistryOnly,
    AllowAny,
}

#[cfg(test)]
mod tests;
