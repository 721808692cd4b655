//! AuthorizationPolicy, compiled (pure): which policies apply to each destination workload, how
//! a request or connection is decided, and the kernel's per-destination decision tables.
//!
//! Istio's semantics, as the destination's sidecar enforces them:
//! - A policy applies to the workloads (Pods, WorkloadEntries) of its namespace that its
//!   `selector.matchLabels` selects (all of them without a selector); in the root namespace
//!   (`istio-system`) to the workloads of every namespace.
//! - CUSTOM, then DENY, then ALLOW: a request matched by a DENY policy is denied; when ALLOW
//!   policies apply to the workload, a request must match one of them; otherwise it is allowed.
//!   An ALLOW policy without rules matches nothing, so it denies everything.
//! - A rule matches when any `from` (or none), any `to` (or none) and every `when` match.
//!   Within a field any value matches (OR), `not*` values must all miss.
//!
//! What steerd cannot see, and how it keeps that from granting access (Istio's own rule for
//! fields a filter chain cannot evaluate, `pilot/pkg/security/authz/model`): in an ALLOW policy a
//! rule using such a field never matches; in a DENY (or CUSTOM) policy the field is dropped, so
//! the rule matches more. Such fields are
//! - mTLS and JWT identities (`principals`, `requestPrincipals`, `serviceAccounts`,
//!   `trustDomains`, their `not*` forms, `source.principal`, `request.auth.*`,
//!   `connection.sni`, `experimental.*`): steerd has neither mTLS nor JWT;
//! - HTTP attributes (`hosts`, `methods`, `paths`, `request.headers[..]`) for TCP
//!   connections, as Istio does on TCP ports.
//!
//! `ipBlocks` and `remoteIpBlocks` (and `source.ip`, `remote.ip`) are both the connection's
//! peer address: steerd sees no X-Forwarded-For or PROXY protocol. `namespaces` is the
//! namespace of the Pod that owns the peer address (Istio reads it from the mTLS identity).
//!
//! CUSTOM policies need an external authorizer steerd does not have: requests they select are
//! denied, as Envoy does when the authorizer cannot be reached. AUDIT policies, dry-run
//! policies (`istio.io/dry-run: "true"`) and policies attached by `targetRef(s)` (gateways and
//! waypoints, which steerd does not serve) are reported and not enforced.
//!
//! The kernel cannot parse HTTP, so for TCP connections every destination (workload address,
//! port) gets a table from source prefixes to a verdict, evaluated with the TCP semantics above.
//! Connections the node itself opens (kubelet probes, the L7 proxy) are not checked there: as
//! with Kubernetes NetworkPolicy the node is always allowed, and the proxy authorizes each
//! request it forwards with the full HTTP semantics. On the HTTP ports of a workload, node
//! addresses (Pods' `status.hostIPs`, where other nodes' proxies connect from) are allowed too.

use super::{Diagnostic, Level, ROOT_NAMESPACE};
use crate::model::security::{self, Action, AuthorizationPolicy};
use crate::model::validate::{DRY_RUN_ANNOTATION, annotation_is_true, parse_prefix};
use crate::model::{ConfigSet, Resource};
use ipnet::{IpNet, Ipv6Net};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The compiled policies of a configuration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuthzPlan {
    /// Every policy, ordered by namespace/name.
    pub policies: Vec<Policy>,
    /// The policies that apply to each workload address (indices into `policies`).
    pub workloads: BTreeMap<IpAddr, WorkloadPolicies>,
    /// The kernel's tables for TCP connections.
    pub kernel: KernelAuthz,
    /// Namespace of the Pod behind each address (host-network Pods excluded: their address is
    /// the node's, shared by every host-network Pod).
    #[serde(skip)]
    pub namespaces: HashMap<IpAddr, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadPolicies {
    /// `namespace/name` of the Pod or WorkloadEntry.
    pub workload: String,
    pub policies: Vec<usize>,
}

/// One AuthorizationPolicy.
#[derive(Debug, Clone, Serialize)]
pub struct Policy {
    /// `namespace/name`.
    pub name: String,
    pub action: Action,
    /// Why the policy is not enforced (dry-run, AUDIT, targetRef), if it is not.
    pub not_enforced: Option<String>,
    /// `selector.matchLabels`, `*` for every workload of the scope.
    pub selector: String,
    /// `namespace` or `mesh` (root namespace).
    pub scope: String,
    pub rules: Vec<Rule>,
    /// Workloads it applies to, `namespace/name`.
    pub workloads: Vec<String>,
}

/// One rule; see the module docs for how it matches.
#[derive(Debug, Clone, Serialize)]
pub struct Rule {
    /// `spec.rules[i]`.
    pub path: String,
    /// None: no `from` (any source). Each entry's fields must all match.
    pub from: Option<Vec<Vec<Field>>>,
    pub to: Option<Vec<Vec<Field>>>,
    pub when: Vec<Field>,
}

/// One attribute condition: any of `values` (when set) and none of `not_values`.
#[derive(Debug, Clone, Serialize)]
pub struct Field {
    /// `spec.rules[0].from[1].source.ipBlocks`.
    pub path: String,
    pub attribute: Attribute,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
    #[serde(skip)]
    compiled: Vec<Value>,
    #[serde(skip)]
    not_compiled: Vec<Value>,
}

/// What a field tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Attribute {
    /// The connection's peer address (`ipBlocks`, `remoteIpBlocks`, `source.ip`, `remote.ip`).
    SourceIp,
    /// The peer Pod's namespace.
    SourceNamespace,
    DestinationIp,
    DestinationPort,
    /// HTTP only.
    Host,
    Method,
    Path,
    Header(String),
    /// Needs mTLS or JWT: never evaluated (see the module docs).
    Unsupported(String),
}

impl Attribute {
    fn http_only(&self) -> bool {
        matches!(
            self,
            Attribute::Host | Attribute::Method | Attribute::Path | Attribute::Header(_)
        )
    }
}

#[derive(Debug, Clone)]
enum Value {
    Net(Ipv6Net),
    Port(u16),
    Pattern(Pattern),
    /// A value that cannot be parsed (validation reports it): matches nothing.
    Invalid,
}

/// Istio's string matching: `*` alone (anything non-empty), `*suffix`, `prefix*`, exact; or for
/// namespaces a glob with `*` anywhere; or a `{*}`/`{**}` path template.
#[derive(Debug, Clone)]
enum Pattern {
    Any,
    Prefix(String),
    Suffix(String),
    Exact(String),
    Glob(String),
    Template(Vec<String>),
}

impl Pattern {
    fn new(v: &str) -> Pattern {
        if v == "*" {
            Pattern::Any
        } else if let Some(s) = v.strip_prefix('*') {
            Pattern::Suffix(s.to_string())
        } else if let Some(p) = v.strip_suffix('*') {
            Pattern::Prefix(p.to_string())
        } else {
            Pattern::Exact(v.to_string())
        }
    }

    fn path(v: &str) -> Pattern {
        if v.contains("{*}") || v.contains("{**}") {
            Pattern::Template(v.split('/').map(str::to_string).collect())
        } else {
            Pattern::new(v)
        }
    }

    fn lowercase(self) -> Pattern {
        match self {
            Pattern::Prefix(s) => Pattern::Prefix(s.to_ascii_lowercase()),
            Pattern::Suffix(s) => Pattern::Suffix(s.to_ascii_lowercase()),
            Pattern::Exact(s) => Pattern::Exact(s.to_ascii_lowercase()),
            other => other,
        }
    }

    fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Any => !s.is_empty(),
            Pattern::Prefix(p) => s.starts_with(p.as_str()),
            Pattern::Suffix(p) => s.ends_with(p.as_str()),
            Pattern::Exact(p) => s == p,
            Pattern::Glob(g) => glob_matches(g, s),
            Pattern::Template(segments) => template_matches(segments, s),
        }
    }
}

/// `*` matches any run of characters (Istio turns namespace globs into `.*`).
fn glob_matches(glob: &str, s: &str) -> bool {
    let Some((first, tail)) = glob.split_once('*') else {
        return glob == s;
    };
    let (middles, last) = tail.rsplit_once('*').unwrap_or(("", tail));
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for middle in middles.split('*').filter(|m| !m.is_empty()) {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

/// Envoy's URI template: `{*}` is one non-empty segment, `{**}` (last) the rest of the path.
fn template_matches(template: &[String], path: &str) -> bool {
    let segments: Vec<&str> = path.split('/').collect();
    for (i, t) in template.iter().enumerate() {
        if t == "{**}" {
            return segments.len() >= i;
        }
        let Some(s) = segments.get(i) else {
            return false;
        };
        let ok = if t == "{*}" { !s.is_empty() } else { t == s };
        if !ok {
            return false;
        }
    }
    segments.len() == template.len()
}

/// IPv4 addresses and prefixes live in the IPv4-mapped range, so one table covers both families
/// (as the kernel's keys do).
pub fn mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn mapped_net(net: IpNet) -> Ipv6Net {
    match net {
        IpNet::V4(n) => Ipv6Net::new(n.network().to_ipv6_mapped(), n.prefix_len() + 96)
            .expect("a /0-32 IPv4 prefix is a /96-128 mapped prefix"),
        IpNet::V6(n) => n.trunc(),
    }
}

/// The prefix as written by users: IPv4-mapped prefixes of /96 and longer as IPv4.
pub fn unmapped_net(net: Ipv6Net) -> IpNet {
    if net.prefix_len() >= 96
        && let Some(v4) = net.network().to_ipv4_mapped()
    {
        return IpNet::V4(
            ipnet::Ipv4Net::new(v4, net.prefix_len() - 96).expect("mapped prefix in range"),
        );
    }
    IpNet::V6(net)
}

fn parse_net(v: &str) -> Value {
    let net = if v.contains('/') {
        parse_prefix(v).ok()
    } else {
        v.parse::<IpAddr>().ok().map(IpNet::from)
    };
    net.map_or(Value::Invalid, |n| Value::Net(mapped_net(n)))
}

impl Field {
    fn new(path: String, attribute: Attribute, values: &[String], not_values: &[String]) -> Self {
        let compile = |v: &String| match &attribute {
            Attribute::SourceIp | Attribute::DestinationIp => parse_net(v),
            Attribute::DestinationPort => v.parse().map_or(Value::Invalid, Value::Port),
            Attribute::SourceNamespace => Value::Pattern(Pattern::Glob(v.clone())),
            Attribute::Host => Value::Pattern(Pattern::new(v).lowercase()),
            Attribute::Path => Value::Pattern(Pattern::path(v)),
            Attribute::Method | Attribute::Header(_) => Value::Pattern(Pattern::new(v)),
            Attribute::Unsupported(_) => Value::Invalid,
        };
        Field {
            compiled: values.iter().map(compile).collect(),
            not_compiled: not_values.iter().map(compile).collect(),
            path,
            attribute,
            values: values.to_vec(),
            not_values: not_values.to_vec(),
        }
    }

    /// Whether the field can be evaluated for this traffic.
    fn usable(&self, tcp: bool) -> bool {
        let unsupported = matches!(self.attribute, Attribute::Unsupported(_));
        let needs_http = tcp && self.attribute.http_only();
        !(unsupported || needs_http)
    }

    fn matches(&self, t: &impl Traffic) -> bool {
        let hit = |v: &Value| t.value_matches(&self.attribute, v);
        (self.compiled.is_empty() || self.compiled.iter().any(hit))
            && !self.not_compiled.iter().any(hit)
    }

    /// `ipBlocks=10.0.0.0/8,!10.1.0.0/16` (the last path element names the field).
    pub fn describe(&self) -> String {
        let name = self.path.rsplit('.').next().unwrap_or_default();
        let name = match &self.attribute {
            Attribute::Header(h) => format!("request.headers[{h}]"),
            _ if name.starts_with("when[") => match &self.attribute {
                Attribute::SourceIp => "source.ip".into(),
                Attribute::SourceNamespace => "source.namespace".into(),
                Attribute::DestinationIp => "destination.ip".into(),
                Attribute::DestinationPort => "destination.port".into(),
                Attribute::Unsupported(k) => k.clone(),
                _ => name.to_string(),
            },
            _ => name.to_string(),
        };
        let values: Vec<String> = self
            .values
            .iter()
            .cloned()
            .chain(self.not_values.iter().map(|v| format!("!{v}")))
            .collect();
        format!("{name}={}", values.join(","))
    }
}

impl Rule {
    /// One line: `from[...]|[...] to[...] when[...]`, `*` for an empty rule.
    pub fn describe(&self) -> String {
        let entries = |entries: &Vec<Vec<Field>>| {
            entries
                .iter()
                .map(|fields| {
                    let f: Vec<String> = fields.iter().map(Field::describe).collect();
                    format!("[{}]", f.join(" "))
                })
                .collect::<Vec<_>>()
                .join("|")
        };
        let mut parts = Vec::new();
        if let Some(from) = &self.from {
            parts.push(format!("from{}", entries(from)));
        }
        if let Some(to) = &self.to {
            parts.push(format!("to{}", entries(to)));
        }
        if !self.when.is_empty() {
            let w: Vec<String> = self.when.iter().map(Field::describe).collect();
            parts.push(format!("when[{}]", w.join(" ")));
        }
        if parts.is_empty() {
            "*".into()
        } else {
            parts.join(" ")
        }
    }

    fn fields(&self) -> impl Iterator<Item = &Field> {
        self.from
            .iter()
            .flatten()
            .chain(self.to.iter().flatten())
            .flatten()
            .chain(&self.when)
    }

    /// Whether the rule matches; `drop_unusable` is DENY's broadening (unusable fields count
    /// as matching), otherwise a rule with an unusable field never matches (ALLOW).
    fn matches(&self, t: &impl Traffic, drop_unusable: bool) -> bool {
        let tcp = t.http().is_none();
        if !drop_unusable && self.fields().any(|f| !f.usable(tcp)) {
            return false;
        }
        let field_ok = |f: &Field| !f.usable(tcp) || f.matches(t);
        let any_entry = |entries: &Option<Vec<Vec<Field>>>| match entries {
            None => true,
            Some(entries) => entries.iter().any(|fields| fields.iter().all(field_ok)),
        };
        any_entry(&self.from) && any_entry(&self.to) && self.when.iter().all(field_ok)
    }
}

/// What a rule is evaluated against: a request, a connection, or (for the kernel's tables) a
/// whole source prefix.
trait Traffic {
    fn source_in(&self, net: &Ipv6Net) -> bool;
    fn source_namespace(&self) -> Option<&str>;
    fn destination(&self) -> (IpAddr, u16);
    fn http(&self) -> Option<&HttpAttributes<'_>>;

    fn value_matches(&self, attribute: &Attribute, v: &Value) -> bool {
        let (dest_ip, dest_port) = self.destination();
        match (attribute, v) {
            (Attribute::SourceIp, Value::Net(n)) => self.source_in(n),
            (Attribute::DestinationIp, Value::Net(n)) => n.contains(&mapped(dest_ip)),
            (Attribute::DestinationPort, Value::Port(p)) => *p == dest_port,
            (Attribute::SourceNamespace, Value::Pattern(p)) => {
                self.source_namespace().is_some_and(|ns| p.matches(ns))
            }
            (Attribute::Host, Value::Pattern(p)) => self
                .http()
                .is_some_and(|h| p.matches(&h.host.to_ascii_lowercase())),
            (Attribute::Method, Value::Pattern(p)) => {
                self.http().is_some_and(|h| p.matches(h.method))
            }
            (Attribute::Path, Value::Pattern(p)) => self
                .http()
                .is_some_and(|h| p.matches(&normalize_path(h.path))),
            (Attribute::Header(name), Value::Pattern(p)) => self.http().is_some_and(|h| {
                // Envoy joins repeated headers with "," before matching.
                let joined: Vec<&str> = h
                    .headers
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.as_str())
                    .collect();
                match p {
                    Pattern::Any => !joined.is_empty(),
                    _ => !joined.is_empty() && p.matches(&joined.join(",")),
                }
            }),
            _ => false,
        }
    }
}

/// The HTTP side of a request.
#[derive(Debug, Clone, Copy)]
pub struct HttpAttributes<'a> {
    pub method: &'a str,
    /// The `Host`/`:authority` as sent.
    pub host: &'a str,
    /// The path without the query.
    pub path: &'a str,
    /// Names in any case.
    pub headers: &'a [(String, String)],
}

/// One request (with `http`) or TCP connection to authorize.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub source: IpAddr,
    /// The client Pod's namespace; None when the address is not a known Pod's.
    pub source_namespace: Option<&'a str>,
    pub destination: SocketAddr,
    pub http: Option<HttpAttributes<'a>>,
}

impl Traffic for Request<'_> {
    fn source_in(&self, net: &Ipv6Net) -> bool {
        net.contains(&mapped(self.source))
    }
    fn source_namespace(&self) -> Option<&str> {
        self.source_namespace
    }
    fn destination(&self) -> (IpAddr, u16) {
        (
            self.destination.ip().to_canonical(),
            self.destination.port(),
        )
    }
    fn http(&self) -> Option<&HttpAttributes<'_>> {
        self.http.as_ref()
    }
}

/// Every source address of a prefix, for the kernel's tables: a prefix is inside a field's
/// network exactly when the network contains all of it (tables split at every network a policy
/// names, so no prefix is partly inside one).
struct SourcePrefix<'a> {
    net: Ipv6Net,
    namespace: Option<&'a str>,
    destination: (IpAddr, u16),
}

impl Traffic for SourcePrefix<'_> {
    fn source_in(&self, net: &Ipv6Net) -> bool {
        net.contains(&self.net)
    }
    fn source_namespace(&self) -> Option<&str> {
        self.namespace
    }
    fn destination(&self) -> (IpAddr, u16) {
        self.destination
    }
    fn http(&self) -> Option<&HttpAttributes<'_>> {
        None
    }
}

/// Removes `.` and `..` segments and decodes percent-encoded unreserved characters, as Envoy's
/// path normalization (Istio's default `BASE`) does before authorization, so `/a/../admin`
/// cannot slip past a rule on `/admin`.
pub fn normalize_path(path: &str) -> String {
    let mut decoded = String::with_capacity(path.len());
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&path[i + 1..i + 3], 16)
            && (b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
        {
            decoded.push(b as char);
            i += 3;
            continue;
        }
        // Multi-byte characters are copied through whole.
        let ch = path[i..].chars().next().expect("i is on a char boundary");
        decoded.push(ch);
        i += ch.len_utf8();
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        let last = i == segments.len() - 1;
        match *seg {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                if out.len() > 1 {
                    out.pop();
                }
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let joined = out.join("/");
    if joined.starts_with('/') || !path.starts_with('/') {
        joined
    } else {
        format!("/{joined}")
    }
}

/// The outcome for one request or connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// The policy that decided (`namespace/name`), if one did.
    pub policy: Option<String>,
    /// Its action.
    pub action: Option<Action>,
    /// `spec.rules[i]` of that policy.
    pub rule: Option<String>,
    /// One line: why.
    pub reason: String,
}

impl Decision {
    fn allow(reason: String) -> Self {
        Decision {
            allowed: true,
            policy: None,
            action: None,
            rule: None,
            reason,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.allowed { "ALLOW" } else { "DENY" })?;
        write!(f, ": {}", self.reason)
    }
}

impl AuthzPlan {
    /// The policies that apply to traffic to `ip`.
    pub fn policies_for(&self, ip: IpAddr) -> impl Iterator<Item = &Policy> + Clone {
        self.workloads
            .get(&ip.to_canonical())
            .into_iter()
            .flat_map(|w| w.policies.iter().map(|i| &self.policies[*i]))
    }

    /// Decides one request (with `http`) or TCP connection.
    pub fn decide(&self, req: &Request<'_>) -> Decision {
        decide(self.policies_for(req.destination.ip()), req)
    }

    /// The namespace of the Pod behind an address.
    pub fn namespace_of(&self, ip: IpAddr) -> Option<&str> {
        self.namespaces.get(&ip.to_canonical()).map(String::as_str)
    }
}

/// Decides `req` with exactly these policies (explain's what-if for unenforced ones).
pub fn decide_policies<'p>(
    policies: impl Iterator<Item = &'p Policy> + Clone,
    req: &Request<'_>,
) -> Decision {
    decide(policies, req)
}

/// Which policy and rule decided, without the words (the kernel's tables evaluate every
/// source region of every destination).
enum Outcome<'p> {
    Denied(&'p Policy, &'p Rule),
    Allowed(&'p Policy, &'p Rule),
    /// No ALLOW policy applies; whether any (DENY) policy does.
    NoAllowPolicy(bool),
    NoAllowMatch(Vec<&'p Policy>),
}

impl Outcome<'_> {
    fn allowed(&self) -> bool {
        matches!(self, Outcome::Allowed(..) | Outcome::NoAllowPolicy(_))
    }
}

fn evaluate<'p>(
    policies: impl Iterator<Item = &'p Policy> + Clone,
    t: &impl Traffic,
) -> Outcome<'p> {
    let enforced = policies.filter(|p| p.not_enforced.is_none());
    // CUSTOM first, then DENY; both broaden what they cannot evaluate.
    for action in [Action::Custom, Action::Deny] {
        for p in enforced.clone().filter(|p| p.action == action) {
            if let Some(rule) = p.rules.iter().find(|r| r.matches(t, true)) {
                return Outcome::Denied(p, rule);
            }
        }
    }
    let any = enforced.clone().next().is_some();
    let mut allow = enforced.filter(|p| p.action == Action::Allow).peekable();
    if allow.peek().is_none() {
        return Outcome::NoAllowPolicy(any);
    }
    let mut tried = Vec::new();
    for p in allow {
        if let Some(rule) = p.rules.iter().find(|r| r.matches(t, false)) {
            return Outcome::Allowed(p, rule);
        }
        tried.push(p);
    }
    Outcome::NoAllowMatch(tried)
}

fn decide<'p>(policies: impl Iterator<Item = &'p Policy> + Clone, t: &impl Traffic) -> Decision {
    match evaluate(policies, t) {
        Outcome::Denied(p, rule) => Decision {
            allowed: false,
            policy: Some(p.name.clone()),
            action: Some(p.action),
            rule: Some(rule.path.clone()),
            reason: if p.action == Action::Custom {
                format!(
                    "CUSTOM policy {} {} selects it and steerd has no external authorizer",
                    p.name, rule.path
                )
            } else {
                format!("DENY policy {} {} matches", p.name, rule.path)
            },
        },
        Outcome::Allowed(p, rule) => Decision {
            allowed: true,
            policy: Some(p.name.clone()),
            action: Some(Action::Allow),
            rule: Some(rule.path.clone()),
            reason: format!("ALLOW policy {} {} matches", p.name, rule.path),
        },
        Outcome::NoAllowPolicy(false) => Decision::allow("no policy applies".into()),
        Outcome::NoAllowPolicy(true) => {
            Decision::allow("no DENY policy matches and no ALLOW policy applies".into())
        }
        Outcome::NoAllowMatch(tried) => {
            let names: Vec<&str> = tried.iter().map(|p| p.name.as_str()).collect();
            Decision {
                allowed: false,
                policy: None,
                action: Some(Action::Allow),
                rule: None,
                reason: format!(
                    "ALLOW policies apply and none matches ({})",
                    names.join(", ")
                ),
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Kernel tables
// ------------------------------------------------------------------------------------------------

/// What the kernel needs: for each destination (workload address, port), a table of source
/// prefixes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KernelAuthz {
    pub destinations: Vec<KernelDestination>,
    pub tables: Vec<SourceTable>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct KernelDestination {
    pub ip: IpAddr,
    /// 0: every port without an entry of its own.
    pub port: u16,
    /// Index into [`KernelAuthz::tables`].
    pub table: usize,
}

/// Longest-prefix match over source addresses; `default_deny` for sources no prefix covers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct SourceTable {
    pub default_deny: bool,
    /// (source prefix, deny); IPv4 prefixes as IPv4.
    pub prefixes: Vec<(IpNet, bool)>,
}

impl SourceTable {
    fn allows_all(&self) -> bool {
        !self.default_deny && self.prefixes.iter().all(|(_, deny)| !deny)
    }

    /// The verdict for one source address (as the kernel's longest-prefix match gives it).
    pub fn denies(&self, source: IpAddr) -> bool {
        let ip = mapped(source);
        self.prefixes
            .iter()
            .filter(|(n, _)| mapped_net(*n).contains(&ip))
            .max_by_key(|(n, _)| mapped_net(*n).prefix_len())
            .map_or(self.default_deny, |(_, deny)| *deny)
    }
}

/// Builds the table for one destination: the verdict of every region the prefixes in `splits`
/// cut the address space into, then only the prefixes whose verdict differs from the one
/// around them.
fn source_table(
    policies: &[&Policy],
    destination: (IpAddr, u16),
    splits: &BTreeSet<Ipv6Net>,
    namespaces: &HashMap<Ipv6Addr, &str>,
    trusted: &BTreeSet<Ipv6Net>,
) -> SourceTable {
    let verdict = |net: Ipv6Net| -> bool {
        if trusted.contains(&net) {
            return false;
        }
        let namespace = if net.prefix_len() == 128 {
            namespaces.get(&net.network()).copied()
        } else {
            None
        };
        let probe = SourcePrefix {
            net,
            namespace,
            destination,
        };
        !evaluate(policies.iter().copied(), &probe).allowed()
    };
    let everything = Ipv6Net::default();
    let default_deny = verdict(everything);
    // Shortest first, so each prefix's enclosing entries are decided before it.
    let mut ordered: Vec<Ipv6Net> = splits
        .iter()
        .copied()
        .filter(|n| *n != everything)
        .collect();
    ordered.sort_by_key(|n| (n.prefix_len(), *n));
    let mut kept: BTreeMap<Ipv6Net, bool> = BTreeMap::new();
    // The lengths kept so far: a prefix's closest kept ancestor has one of them.
    let mut lengths: BTreeSet<u8> = BTreeSet::new();
    for net in ordered {
        let deny = verdict(net);
        let around = lengths
            .iter()
            .rev()
            .filter(|len| **len < net.prefix_len())
            .find_map(|len| {
                let ancestor = Ipv6Net::new(net.network(), *len).ok()?.trunc();
                kept.get(&ancestor).copied()
            })
            .unwrap_or(default_deny);
        if deny != around {
            kept.insert(net, deny);
            lengths.insert(net.prefix_len());
        }
    }
    SourceTable {
        default_deny,
        prefixes: kept
            .into_iter()
            .map(|(n, d)| (unmapped_net(n), d))
            .collect(),
    }
}

/// What a destination's table depends on.
#[derive(PartialEq, Eq, Hash)]
struct TableInput {
    /// The enforced policies, by index.
    policies: Vec<usize>,
    port: u16,
    /// Node addresses are admitted (an HTTP port).
    trusted: bool,
    /// The destination address, when a rule tests it (`destination.ip`).
    destination: Option<IpAddr>,
}

fn kernel_tables(
    plan: &AuthzPlan,
    http_endpoints: &BTreeSet<SocketAddr>,
    node_addresses: &BTreeSet<IpAddr>,
) -> KernelAuthz {
    let namespaces: HashMap<Ipv6Addr, &str> = plan
        .namespaces
        .iter()
        .map(|(ip, ns)| (mapped(*ip), ns.as_str()))
        .collect();
    let node_nets: BTreeSet<Ipv6Net> = node_addresses
        .iter()
        .map(|ip| Ipv6Net::from(mapped(*ip)))
        .collect();
    let mut http_ports_by_ip: HashMap<IpAddr, BTreeSet<u16>> = HashMap::new();
    for e in http_endpoints {
        http_ports_by_ip
            .entry(e.ip().to_canonical())
            .or_default()
            .insert(e.port());
    }
    // Every distinct table computed, by content; destinations point into it.
    let mut candidates: Vec<SourceTable> = Vec::new();
    let mut by_content: HashMap<SourceTable, usize> = HashMap::new();
    let mut destinations = Vec::new();
    // Workloads selected by the same policies get the same tables (a namespace-wide policy
    // selects many), unless a rule looks at the destination address.
    let mut memo: HashMap<TableInput, usize> = HashMap::new();
    for (ip, w) in &plan.workloads {
        let enforced: Vec<usize> = w
            .policies
            .iter()
            .copied()
            .filter(|i| plan.policies[*i].not_enforced.is_none())
            .collect();
        let policies: Vec<&Policy> = enforced.iter().map(|i| &plan.policies[*i]).collect();
        if policies.is_empty() {
            continue;
        }
        let fields = || {
            policies
                .iter()
                .flat_map(|p| &p.rules)
                .flat_map(Rule::fields)
        };
        let mut ports: BTreeSet<u16> = BTreeSet::new();
        let mut uses_destination_ip = false;
        for f in fields() {
            uses_destination_ip |= f.attribute == Attribute::DestinationIp;
            if f.attribute == Attribute::DestinationPort {
                for v in f.compiled.iter().chain(&f.not_compiled) {
                    if let Value::Port(p) = v {
                        ports.insert(*p);
                    }
                }
            }
        }
        let http_ports = http_ports_by_ip.get(ip).cloned().unwrap_or_default();
        ports.extend(&http_ports);
        let mut table_for = |port: u16, trusted: &BTreeSet<Ipv6Net>| -> usize {
            let key = TableInput {
                policies: enforced.clone(),
                port,
                trusted: !trusted.is_empty(),
                destination: uses_destination_ip.then_some(*ip),
            };
            *memo.entry(key).or_insert_with(|| {
                let splits = source_splits(&policies, &namespaces, trusted);
                let table = source_table(&policies, (*ip, port), &splits, &namespaces, trusted);
                *by_content.entry(table.clone()).or_insert_with(|| {
                    candidates.push(table);
                    candidates.len() - 1
                })
            })
        };
        // Port 0 stands for every port no policy names (no rule can name port 0: TCP has none).
        let no_trust = BTreeSet::new();
        let others = table_for(0, &no_trust);
        for port in ports {
            let trusted = if http_ports.contains(&port) {
                &node_nets
            } else {
                &no_trust
            };
            let table = table_for(port, trusted);
            if table != others {
                destinations.push(KernelDestination {
                    ip: *ip,
                    port,
                    table,
                });
            }
        }
        if !candidates[others].allows_all() {
            destinations.push(KernelDestination {
                ip: *ip,
                port: 0,
                table: others,
            });
        }
    }
    // Only the tables some destination uses go to the kernel.
    let mut renumber: BTreeMap<usize, usize> = BTreeMap::new();
    let mut tables = Vec::new();
    for d in &mut destinations {
        d.table = *renumber.entry(d.table).or_insert_with(|| {
            tables.push(candidates[d.table].clone());
            tables.len() - 1
        });
    }
    destinations.sort();
    KernelAuthz {
        destinations,
        tables,
    }
}

/// The prefixes that cut the source address space into regions with one verdict each: every
/// network the policies name, every Pod address when they name namespaces, and the trusted
/// (node) addresses.
fn source_splits(
    policies: &[&Policy],
    namespaces: &HashMap<Ipv6Addr, &str>,
    trusted: &BTreeSet<Ipv6Net>,
) -> BTreeSet<Ipv6Net> {
    let mut splits: BTreeSet<Ipv6Net> = trusted.clone();
    let mut uses_namespaces = false;
    for f in policies
        .iter()
        .flat_map(|p| &p.rules)
        .flat_map(Rule::fields)
    {
        match f.attribute {
            Attribute::SourceIp => {
                splits.extend(
                    f.compiled
                        .iter()
                        .chain(&f.not_compiled)
                        .filter_map(|v| match v {
                            Value::Net(n) => Some(*n),
                            _ => None,
                        }),
                );
            }
            Attribute::SourceNamespace => uses_namespaces = true,
            _ => {}
        }
    }
    if uses_namespaces {
        splits.extend(namespaces.keys().map(|a| Ipv6Net::from(*a)));
    }
    splits
}

// ------------------------------------------------------------------------------------------------
// Compilation
// ------------------------------------------------------------------------------------------------

/// A workload policies can select.
struct Workload<'a> {
    key: String,
    namespace: &'a str,
    labels: crate::model::Labels,
    ips: Vec<IpAddr>,
}

fn workloads(config: &ConfigSet) -> Vec<Workload<'_>> {
    let mut out: Vec<Workload<'_>> = config
        .pods
        .iter()
        .filter(|p| !is_host_network(&p.spec))
        .map(|p| Workload {
            key: p.meta.key(),
            namespace: &p.meta.namespace,
            labels: p.meta.labels.clone(),
            ips: super::registry::pod_ips(&p.spec),
        })
        .collect();
    out.extend(config.workload_entries.iter().map(|w| Workload {
        key: w.meta.key(),
        namespace: &w.meta.namespace,
        // A WorkloadEntry's own labels are what selectors see.
        labels: w.spec.labels.clone().into(),
        ips: w.spec.address.parse::<IpAddr>().into_iter().collect(),
    }));
    out.retain(|w| !w.ips.is_empty());
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

fn is_host_network(pod: &crate::model::Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

/// Where other nodes' proxies connect from: every node address a Pod reports.
fn node_addresses(config: &ConfigSet) -> BTreeSet<IpAddr> {
    config
        .pods
        .iter()
        .filter_map(|p| p.spec.status.as_ref())
        .flat_map(|s| {
            s.host_ips
                .iter()
                .flatten()
                .map(|h| h.ip.clone())
                .chain(s.host_ip.clone())
        })
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .collect()
}

struct Warn<'a> {
    r: &'a Resource<AuthorizationPolicy>,
    out: &'a mut Vec<Diagnostic>,
}

impl Warn<'_> {
    fn at(&mut self, field: &str, message: String) {
        self.out.push(Diagnostic {
            level: Level::Warning,
            code: None,
            kind: "AuthorizationPolicy".into(),
            object: self.r.meta.key(),
            origin: self.r.origin.clone(),
            field: field.into(),
            message,
        });
    }
}

/// How an unsupported field affects an ALLOW or a DENY rule, for the warnings.
fn unsupported_effect(action: Action) -> &'static str {
    match action {
        Action::Allow => "this ALLOW rule never matches",
        _ => "this condition is ignored, so the rule matches more requests",
    }
}

fn compile_rule(rule: &security::Rule, path: String, action: Action, warn: &mut Warn<'_>) -> Rule {
    let mut unsupported = |field: &str, what: &str| {
        if matches!(action, Action::Allow | Action::Deny | Action::Custom) {
            warn.at(
                field,
                format!(
                    "{what} needs mTLS or JWT authentication, which steerd does not have: {}",
                    unsupported_effect(action)
                ),
            );
        }
    };
    let from = rule.from.as_ref().map(|from| {
        from.iter()
            .enumerate()
            .map(|(j, f)| {
                let base = format!("{path}.from[{j}].source");
                let Some(s) = &f.source else {
                    return Vec::new();
                };
                let mut fields = Vec::new();
                let mut add = |name: &str, attribute: Attribute, v: &[String], n: &[String]| {
                    if !v.is_empty() || !n.is_empty() {
                        fields.push(Field::new(format!("{base}.{name}"), attribute, v, n));
                    }
                };
                add(
                    "ipBlocks",
                    Attribute::SourceIp,
                    &s.ip_blocks,
                    &s.not_ip_blocks,
                );
                add(
                    "remoteIpBlocks",
                    Attribute::SourceIp,
                    &s.remote_ip_blocks,
                    &s.not_remote_ip_blocks,
                );
                add(
                    "namespaces",
                    Attribute::SourceNamespace,
                    &s.namespaces,
                    &s.not_namespaces,
                );
                for (name, values, not_values) in [
                    ("principals", &s.principals, &s.not_principals),
                    (
                        "requestPrincipals",
                        &s.request_principals,
                        &s.not_request_principals,
                    ),
                    (
                        "serviceAccounts",
                        &s.service_accounts,
                        &s.not_service_accounts,
                    ),
                    ("trustDomains", &s.trust_domains, &s.not_trust_domains),
                ] {
                    if !values.is_empty() || !not_values.is_empty() {
                        add(
                            name,
                            Attribute::Unsupported(name.into()),
                            values,
                            not_values,
                        );
                        unsupported(&format!("{base}.{name}"), name);
                    }
                }
                fields
            })
            .collect()
    });
    let to = rule.to.as_ref().map(|to| {
        to.iter()
            .enumerate()
            .map(|(j, t)| {
                let base = format!("{path}.to[{j}].operation");
                let Some(o) = &t.operation else {
                    return Vec::new();
                };
                let mut fields = Vec::new();
                for (name, attribute, v, n) in [
                    ("ports", Attribute::DestinationPort, &o.ports, &o.not_ports),
                    ("hosts", Attribute::Host, &o.hosts, &o.not_hosts),
                    ("methods", Attribute::Method, &o.methods, &o.not_methods),
                    ("paths", Attribute::Path, &o.paths, &o.not_paths),
                ] {
                    if !v.is_empty() || !n.is_empty() {
                        fields.push(Field::new(format!("{base}.{name}"), attribute, v, n));
                    }
                }
                fields
            })
            .collect()
    });
    let when = rule
        .when()
        .iter()
        .enumerate()
        .map(|(j, c)| {
            let field = format!("{path}.when[{j}]");
            let k = c.key.as_str();
            let attribute = match k {
                "source.ip" | "remote.ip" => Attribute::SourceIp,
                "source.namespace" => Attribute::SourceNamespace,
                "destination.ip" => Attribute::DestinationIp,
                "destination.port" => Attribute::DestinationPort,
                _ if k.starts_with("request.headers[") && k.ends_with(']') => {
                    Attribute::Header(k["request.headers[".len()..k.len() - 1].to_ascii_lowercase())
                }
                _ => {
                    let what = if k == "connection.sni" {
                        format!("{k} (TLS server name)")
                    } else {
                        k.to_string()
                    };
                    unsupported(&format!("{field}.key"), &what);
                    Attribute::Unsupported(k.to_string())
                }
            };
            Field::new(field, attribute, &c.values, &c.not_values)
        })
        .collect();
    Rule {
        path,
        from,
        to,
        when,
    }
}

/// Compiles every AuthorizationPolicy. `http_endpoints` are the endpoints (address, port) the
/// L7 proxy serves; the kernel admits node addresses on them (see the module docs).
pub fn compile(
    config: &ConfigSet,
    http_endpoints: &BTreeSet<SocketAddr>,
    diags: &mut Vec<Diagnostic>,
) -> AuthzPlan {
    if config.authorization_policies.is_empty() {
        // Nothing to decide: spare large clusters the per-Pod work.
        return AuthzPlan::default();
    }
    let mut resources: Vec<&Resource<AuthorizationPolicy>> =
        config.authorization_policies.iter().map(|p| &**p).collect();
    resources.sort_by_key(|r| r.meta.key());
    let workloads = workloads(config);
    let mut plan = AuthzPlan {
        namespaces: workloads
            .iter()
            .flat_map(|w| w.ips.iter().map(|ip| (*ip, w.namespace.to_string())))
            .collect(),
        ..Default::default()
    };
    for r in resources {
        let mut warn = Warn { r, out: diags };
        let ap = &r.spec;
        let action = ap.action();
        let targeted =
            ap.target_ref.is_some() || ap.target_refs.as_ref().is_some_and(|t| !t.is_empty());
        let dry_run = r
            .meta
            .annotations
            .get(DRY_RUN_ANNOTATION)
            .is_some_and(|v| annotation_is_true(v));
        let not_enforced = if targeted {
            let field = if ap.target_ref.is_some() {
                "spec.targetRef"
            } else {
                "spec.targetRefs"
            };
            warn.at(
                field,
                "targetRef(s) attach a policy to gateways and waypoints, which steerd does not serve: not enforced".into(),
            );
            Some("attached by targetRef to a gateway or waypoint".to_string())
        } else if action == Action::Audit {
            warn.at(
                "spec.action",
                "AUDIT policies only mark requests for an audit log, which steerd does not write: not enforced".into(),
            );
            Some("AUDIT".to_string())
        } else if dry_run {
            warn.at(
                "metadata.annotations",
                "istio.io/dry-run: the policy is evaluated by `steerd explain` only, not enforced"
                    .into(),
            );
            Some("dry-run".to_string())
        } else {
            None
        };
        if action == Action::Custom && not_enforced.is_none() {
            let provider = ap
                .provider
                .as_ref()
                .and_then(|p| p.name.clone())
                .unwrap_or_default();
            warn.at(
                "spec.action",
                format!("CUSTOM needs the external authorizer {provider:?}, which steerd cannot call: requests the policy selects are denied, as when the authorizer is unreachable"),
            );
        }
        let rules = ap
            .rules()
            .iter()
            .enumerate()
            .map(|(i, rule)| compile_rule(rule, format!("spec.rules[{i}]"), action, &mut warn))
            .collect();
        let root = r.meta.namespace == ROOT_NAMESPACE;
        let labels = ap.selector.as_ref().map(|s| &s.match_labels);
        let index = plan.policies.len();
        let mut selected = Vec::new();
        if !targeted {
            for w in &workloads {
                let in_scope = root || w.namespace == r.meta.namespace;
                let selects =
                    labels.is_none_or(|l| l.iter().all(|(k, v)| w.labels.get(k) == Some(v)));
                if in_scope && selects {
                    selected.push(w.key.clone());
                    for ip in &w.ips {
                        plan.workloads
                            .entry(ip.to_canonical())
                            .or_insert_with(|| WorkloadPolicies {
                                workload: w.key.clone(),
                                policies: Vec::new(),
                            })
                            .policies
                            .push(index);
                    }
                }
            }
        }
        plan.policies.push(Policy {
            name: r.meta.key(),
            action,
            not_enforced,
            selector: labels.map_or("*".into(), |l| {
                l.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            }),
            scope: if root {
                "mesh".into()
            } else {
                r.meta.namespace.to_string()
            },
            rules,
            workloads: selected,
        });
    }
    plan.kernel = kernel_tables(&plan, http_endpoints, &node_addresses(config));
    plan
}

#[cfg(test)]
mod tests;
