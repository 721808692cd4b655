//! Gateways: what `steerd run --gateway ns/name` listens on, and how each listener routes.
//!
//! Pure, like the rest of the compiler: a [`ConfigSet`] and the gateway names in, a
//! [`GatewayPlan`] out (certificate files named by `serverCertificate`/`privateKey` are only
//! named here; the dataplane reads them).
//!
//! Istio's semantics, as pilot builds an ingress gateway's listeners:
//! - Servers are grouped by (bind, port). A port carries either plain-text HTTP servers (merged
//!   into one route table, chosen by the Host header), or HTTPS/TLS servers (chosen by SNI, then
//!   terminated — SIMPLE, MUTUAL, OPTIONAL_MUTUAL — or passed through by SNI), or one opaque TCP
//!   server. ISTIO_MUTUAL and AUTO_PASSTHROUGH servers are reported and not served.
//! - A VirtualService applies to a server when it lists the gateway in `gateways` and one of its
//!   hosts intersects one of the server's hosts. Server hosts are `[namespace/]dnsName`: `*/` or
//!   no prefix admits VirtualServices of every namespace, `./` those of the Gateway's namespace,
//!   `ns/` those of `ns`.
//! - Each intersection (the more specific of the two names) becomes a virtual host; the `http`
//!   rules of every VirtualService claiming that name are concatenated (by namespace/name, with
//!   catch-all rules moved last, like Istio's SortVHostRoutes), compiled by the same builder as
//!   mesh routes and evaluated by the same evaluator ([`super::http::HttpRoutes::select`]) with
//!   the request's `gateway` set to `ns/name`.
//! - `tls.httpsRedirect` on an HTTP server makes its virtual hosts answer 301 to `https://`.
//! - A destination without a port uses the service's only port, else the server's port.

use super::http::{HttpRoutes, HttpRule};
use super::registry::{self, host_matches, resolve_host};
use super::{
    Ctx, Diagnostic, Level, Source, WeightedBackend, destination_rule_index, gateway_ref,
    normalise, subset_index,
};
use crate::model::istio::{self, ServerTlsMode, TlsProtocolVersion};
use crate::model::{ConfigSet, Resource};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// Namespace of `--gateway NAME` given without one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Everything the gateway listeners of one agent serve.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GatewayPlan {
    /// By (bind, port).
    pub listeners: Vec<ListenerPlan>,
    pub diagnostics: Vec<Diagnostic>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    /// Plain-text HTTP (HTTP, HTTP2, GRPC, GRPC-WEB): routed by Host across every server.
    Http,
    /// HTTPS and TLS: a server chosen by SNI, then terminated or passed through.
    Tls,
    /// Opaque TCP (TCP, MONGO, ...): one server, forwarded by its `tcp` route.
    Tcp,
}

impl ListenerKind {
    fn of(protocol: &str) -> Self {
        match protocol {
            "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" | "H2C" => ListenerKind::Http,
            "HTTPS" | "TLS" => ListenerKind::Tls,
            _ => ListenerKind::Tcp,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ListenerPlan {
    /// `server.bind`; None: every node address.
    pub bind: Option<IpAddr>,
    pub port: u16,
    pub kind: ListenerKind,
    pub servers: Vec<Arc<ServerPlan>>,
    /// HTTP listeners: the virtual hosts of all servers (the first claim on a name wins).
    pub virtual_hosts: Vec<VirtualHost>,
}

/// One `spec.servers[i]` of one Gateway.
#[derive(Debug, Clone, Serialize)]
pub struct ServerPlan {
    /// `ns/name` of the Gateway.
    pub gateway: String,
    pub index: usize,
    pub name: Option<String>,
    pub port: u16,
    /// Upper case: HTTP, HTTPS, TLS, TCP, ...
    pub protocol: String,
    /// DNS names with the namespace part removed (lower case, `*` wildcards).
    pub hosts: Vec<String>,
    pub https_redirect: bool,
    /// HTTPS and TLS servers.
    pub tls: Option<TlsPlan>,
    /// HTTP routing (HTTP servers, and HTTPS servers that terminate TLS).
    pub virtual_hosts: Vec<VirtualHost>,
    /// PASSTHROUGH servers: by SNI, in order.
    pub tls_routes: Vec<TlsRoutePlan>,
    /// TCP servers and TLS servers that terminate.
    pub tcp: Option<L4RoutePlan>,
}

impl ServerPlan {
    /// `default/gw spec.servers[1] (HTTPS 443, hosts a.example.com)`, for logs.
    pub fn describe(&self) -> String {
        format!(
            "{} spec.servers[{}]{} ({} {}, hosts {})",
            self.gateway,
            self.index,
            self.name
                .as_ref()
                .map(|n| format!(" {n:?}"))
                .unwrap_or_default(),
            self.protocol,
            self.port,
            self.hosts.join(" ")
        )
    }

    /// Whether TLS is terminated here (SIMPLE), as opposed to passed through.
    pub fn terminates_tls(&self) -> bool {
        self.tls
            .as_ref()
            .is_some_and(|t| t.mode != ServerTlsMode::Passthrough)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TlsPlan {
    pub mode: ServerTlsMode,
    pub credential: Credential,
    /// MUTUAL and OPTIONAL_MUTUAL: the CA client certificates must chain to.
    pub client_ca: Option<ClientCa>,
    /// MUTUAL and OPTIONAL_MUTUAL: a client certificate must carry one of these SANs (exact
    /// match on its DNS, URI, email or IP SANs); empty: any certificate the CA signed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    pub min_version: Option<TlsProtocolVersion>,
    pub max_version: Option<TlsProtocolVersion>,
}

/// PEM bytes that never show in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Pem(pub Arc<[u8]>);

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes of PEM>", self.0.len())
    }
}

/// Where a terminating server's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Credential {
    /// PASSTHROUGH: nothing to terminate with.
    None,
    /// `credentialName`: a Secret's `tls.crt`/`tls.key` (or `cert`/`key`).
    Secret {
        /// `ns/name`.
        name: String,
        #[serde(skip)]
        cert: Pem,
        #[serde(skip)]
        key: Pem,
    },
    /// `serverCertificate`/`privateKey` files, read by the dataplane.
    Files { cert: PathBuf, key: PathBuf },
    /// No usable credential: handshakes for this server are refused, with this reason.
    Missing(String),
}

/// Where the CA bundle for verifying client certificates comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCa {
    /// A Secret's `ca.crt` (or `cacert`).
    Secret {
        /// `ns/name`.
        name: String,
        #[serde(skip)]
        pem: Pem,
    },
    /// `caCertificates`, read by the dataplane.
    File(PathBuf),
    /// No CA: handshakes for this server are refused, with this reason.
    Missing(String),
}

/// Requests whose Host is `domain` (or matches it, for wildcards).
#[derive(Debug, Clone, Serialize)]
pub struct VirtualHost {
    /// `ns/name` of the Gateway, as requests see it (`RequestView::gateway`).
    pub gateway: String,
    pub domain: String,
    /// Plain-text requests get a 301 to `https://` instead of being routed.
    pub https_redirect: bool,
    pub routes: Arc<HttpRoutes>,
    /// The gateway workload, as `sourceLabels` matches see it (the Gateway's selector).
    #[serde(skip)]
    pub source: Source,
}

/// A PASSTHROUGH route: connections whose SNI matches go to these backends, still encrypted.
#[derive(Debug, Clone, Serialize)]
pub struct TlsRoutePlan {
    pub sni_hosts: Vec<String>,
    /// `VirtualService ns/name tls[i]`.
    pub route: String,
    pub backends: Vec<WeightedBackend>,
}

/// Where a TCP server's connections (or a terminated TLS server's plain streams) go.
#[derive(Debug, Clone, Serialize)]
pub struct L4RoutePlan {
    /// `VirtualService ns/name tcp[i]`.
    pub route: String,
    pub backends: Vec<WeightedBackend>,
}

impl TlsRoutePlan {
    /// How well this route's SNI hosts match `sni` (None: not at all).
    pub fn rank(&self, sni: &str) -> Option<usize> {
        self.sni_hosts.iter().filter_map(|h| rank(h, sni)).max()
    }
}

/// How specific a match of `pattern` on `host` is: exact beats every wildcard, a longer wildcard
/// beats a shorter one, `*` ranks last. None: no match.
pub fn rank(pattern: &str, host: &str) -> Option<usize> {
    if !host_matches(pattern, host) {
        return None;
    }
    Some(if pattern.starts_with('*') {
        pattern.len() - 1
    } else {
        usize::MAX
    })
}

/// The host part of a Host header or `:authority` (`a.com:8080` → `a.com`, `[::1]:80` → `::1`).
pub fn authority_host(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// Envoy's virtual host choice: exact domain, then the longest wildcard, then `*`; the port of
/// the Host header is ignored. None: 404 (no virtual host).
pub fn select_virtual_host<'a>(
    vhosts: &'a [VirtualHost],
    authority: &str,
) -> Option<&'a VirtualHost> {
    let host = authority_host(authority).trim_end_matches('.');
    let mut best: Option<(usize, &VirtualHost)> = None;
    for v in vhosts {
        if let Some(r) = rank(&v.domain, host)
            && best.is_none_or(|(b, _)| r > b)
        {
            best = Some((r, v));
        }
    }
    best.map(|(_, v)| v)
}

/// The server of a TLS listener for a ClientHello's SNI: the most specific host match; a
/// ClientHello without SNI only reaches a server with host `*`.
pub fn select_server<'a>(
    servers: &'a [Arc<ServerPlan>],
    sni: Option<&str>,
) -> Option<&'a Arc<ServerPlan>> {
    let mut best: Option<(usize, &Arc<ServerPlan>)> = None;
    for s in servers {
        let r = match sni {
            Some(sni) => s.hosts.iter().filter_map(|h| rank(h, sni)).max(),
            None => s.hosts.iter().any(|h| h == "*").then_some(0),
        };
        if let Some(r) = r
            && best.is_none_or(|(b, _)| r > b)
        {
            best = Some((r, s));
        }
    }
    best.map(|(_, s)| s)
}

/// The more specific of two host patterns if they intersect (Istio's `Names.Intersection`).
fn intersect(a: &str, b: &str) -> Option<String> {
    if host_matches(a, b) {
        Some(b.to_ascii_lowercase())
    } else if host_matches(b, a) {
        Some(a.to_ascii_lowercase())
    } else {
        None
    }
}

/// A server host: the namespaces whose VirtualServices it admits (None: all) and the DNS name.
#[derive(Debug, Clone)]
struct ServerHost {
    namespace: Option<String>,
    dns: String,
}

fn server_hosts(hosts: &[String], gateway_namespace: &str) -> Vec<ServerHost> {
    hosts
        .iter()
        .map(|h| match h.split_once('/') {
            Some(("*", dns)) => ServerHost {
                namespace: None,
                dns: dns.to_ascii_lowercase(),
            },
            Some((".", dns)) => ServerHost {
                namespace: Some(gateway_namespace.to_string()),
                dns: dns.to_ascii_lowercase(),
            },
            Some((ns, dns)) => ServerHost {
                namespace: Some(ns.to_string()),
                dns: dns.to_ascii_lowercase(),
            },
            None => ServerHost {
                namespace: None,
                dns: h.to_ascii_lowercase(),
            },
        })
        .collect()
}

/// Compiles the servers of `gateways` (`ns/name`, or `name` in [`DEFAULT_NAMESPACE`]) into
/// listeners. Gateways sharing a port are merged, like the servers of one Gateway.
pub fn compile(config: &ConfigSet, gateways: &[String]) -> GatewayPlan {
    let mut registry_diags = Vec::new();
    // The registry's own findings are the main compile's to report.
    let registry = registry::build(config, &mut registry_diags);
    let mut diags = Vec::new();
    let mut ctx = Ctx {
        config,
        registry: &registry,
        diags: &mut diags,
        subsets: subset_index(config),
        destination_rules: destination_rule_index(config),
        vs_hosts: Default::default(),
    };
    let mut servers: Vec<ServerPlan> = Vec::new();
    let mut binds: Vec<Option<IpAddr>> = Vec::new();
    for name in gateways {
        let key = gateway_ref(name, DEFAULT_NAMESPACE);
        let mut found: Vec<&Resource<istio::Gateway>> = config
            .gateways
            .iter()
            .map(|g| &**g)
            .filter(|g| g.meta.key() == key)
            .collect();
        found.sort_by(|a, b| a.origin.cmp(&b.origin));
        let Some(gw) = found.first() else {
            ctx.diags.push(Diagnostic {
                level: Level::Error,
                code: None,
                kind: "Gateway".into(),
                object: key.clone(),
                origin: Default::default(),
                field: "-".into(),
                message: format!("Gateway {key} (--gateway) not found: nothing listens for it"),
            });
            continue;
        };
        for (index, server) in gw.spec.servers.iter().enumerate() {
            if let Some((bind, plan)) = ctx.gateway_server(gw, index, server) {
                binds.push(bind);
                servers.push(plan);
            }
        }
    }

    // Group by (bind, port), in order of first appearance.
    let mut listeners: Vec<ListenerPlan> = Vec::new();
    let mut origin_of: HashMap<(Option<IpAddr>, u16), usize> = HashMap::new();
    for (server, bind) in servers.into_iter().zip(binds) {
        let kind = ListenerKind::of(&server.protocol);
        let at = *origin_of.entry((bind, server.port)).or_insert_with(|| {
            listeners.push(ListenerPlan {
                bind,
                port: server.port,
                kind,
                servers: Vec::new(),
                virtual_hosts: Vec::new(),
            });
            listeners.len() - 1
        });
        let listener = &mut listeners[at];
        let conflict = if listener.kind != kind {
            Some(format!(
                "port {} already serves {:?} servers; a {} server cannot share it",
                server.port, listener.kind, server.protocol
            ))
        } else if kind == ListenerKind::Tcp && !listener.servers.is_empty() {
            Some(format!(
                "port {} already has a TCP server; TCP servers cannot share a port",
                server.port
            ))
        } else {
            None
        };
        if let Some(message) = conflict {
            ctx.diags.push(Diagnostic {
                level: Level::Error,
                code: None,
                kind: "Gateway".into(),
                object: server.gateway.clone(),
                origin: gateway_origin(config, &server.gateway),
                field: format!("spec.servers[{}].port", server.index),
                message: format!("{message}; the server is not served"),
            });
            continue;
        }
        if kind == ListenerKind::Http {
            for v in &server.virtual_hosts {
                match listener
                    .virtual_hosts
                    .iter_mut()
                    .find(|x| x.domain == v.domain)
                {
                    // Like Istio's vHostDedupMap: the first server's routes, but a later
                    // httpsRedirect still applies.
                    Some(existing) => existing.https_redirect |= v.https_redirect,
                    None => listener.virtual_hosts.push(v.clone()),
                }
            }
        }
        listener.servers.push(Arc::new(server));
    }
    diags.sort();
    diags.dedup();
    GatewayPlan {
        listeners,
        diagnostics: diags,
    }
}

fn gateway_origin(config: &ConfigSet, key: &str) -> crate::model::Origin {
    config
        .gateways
        .iter()
        .find(|g| g.meta.key() == key)
        .map(|g| g.origin.clone())
        .unwrap_or_default()
}

/// Moves rules that match everything after the others, keeping relative order (Istio's
/// SortVHostRoutes), so that one VirtualService's catch-all cannot hide another's routes.
fn catch_alls_last(rules: Vec<HttpRule>) -> Vec<HttpRule> {
    let (all, specific): (Vec<HttpRule>, Vec<HttpRule>) =
        rules.into_iter().partition(|r| r.matches.is_empty());
    specific.into_iter().chain(all).collect()
}

impl<'a> Ctx<'a> {
    fn gateway_diag(
        &mut self,
        level: Level,
        gw: &Resource<istio::Gateway>,
        field: String,
        message: String,
    ) {
        self.diags.push(Diagnostic {
            level,
            code: None,
            kind: "Gateway".into(),
            object: gw.meta.key(),
            origin: gw.origin.clone(),
            field,
            message,
        });
    }

    /// One server, or None (with a diagnostic) when it cannot be served.
    fn gateway_server(
        &mut self,
        gw: &Resource<istio::Gateway>,
        index: usize,
        server: &istio::Server,
    ) -> Option<(Option<IpAddr>, ServerPlan)> {
        let key = gw.meta.key();
        let field = format!("spec.servers[{index}]");
        let Some(port) = u16::try_from(server.port.number).ok().filter(|p| *p > 0) else {
            self.gateway_diag(
                Level::Error,
                gw,
                format!("{field}.port.number"),
                format!(
                    "invalid port {}; the server is not served",
                    server.port.number
                ),
            );
            return None;
        };
        let bind = match server.bind.as_deref() {
            None | Some("") => None,
            Some(b) => match b.parse::<IpAddr>() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    self.gateway_diag(
                        Level::Warning,
                        gw,
                        format!("{field}.bind"),
                        format!("bind {b:?} is not an IP address (unix sockets are not supported); the server is not served"),
                    );
                    return None;
                }
            },
        };
        let protocol = server.port.protocol.to_ascii_uppercase();
        let kind = ListenerKind::of(&protocol);
        let hosts = server_hosts(&server.hosts, &gw.meta.namespace);
        let source = Source {
            workload: registry::Workload::new(
                "Gateway",
                &gw.meta.namespace,
                &gw.meta.name,
                &gw.spec.selector.clone().into(),
            ),
            labels: gw.spec.selector.clone().into(),
        };
        let https_redirect = kind == ListenerKind::Http
            && server
                .tls
                .as_ref()
                .and_then(|t| t.https_redirect)
                .unwrap_or(false);
        let tls = match (kind, &server.tls) {
            (ListenerKind::Tls, None) => {
                self.gateway_diag(
                    Level::Error,
                    gw,
                    format!("{field}.tls"),
                    format!("a {protocol} server needs tls settings; the server is not served"),
                );
                return None;
            }
            (ListenerKind::Tls, Some(t)) => {
                let mode = t.mode();
                let credential = match mode {
                    ServerTlsMode::Passthrough => Credential::None,
                    ServerTlsMode::Simple
                    | ServerTlsMode::Mutual
                    | ServerTlsMode::OptionalMutual => self.credential(gw, &field, t),
                    other => {
                        self.gateway_diag(
                            Level::Warning,
                            gw,
                            format!("{field}.tls.mode"),
                            format!(
                                "tls mode {} is not supported by steerd gateways yet; the server is not served",
                                other.as_str()
                            ),
                        );
                        return None;
                    }
                };
                let client_ca =
                    matches!(mode, ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual)
                        .then(|| self.client_ca(gw, &field, t));
                // Only client certificates are checked against them (Envoy's
                // match_typed_subject_alt_names on a downstream validation context).
                let subject_alt_names = if client_ca.is_some() {
                    t.subject_alt_names.clone()
                } else {
                    Vec::new()
                };
                Some(TlsPlan {
                    mode,
                    credential,
                    client_ca,
                    subject_alt_names,
                    min_version: t.min_protocol_version,
                    max_version: t.max_protocol_version,
                })
            }
            _ => None,
        };
        let passthrough = tls
            .as_ref()
            .is_some_and(|t| t.mode == ServerTlsMode::Passthrough);

        // The VirtualServices bound to this gateway whose hosts meet the server's, by key.
        let mut bound: Vec<&'a Resource<istio::VirtualService>> = self
            .config
            .virtual_services
            .iter()
            .map(|vs| &**vs)
            .filter(|vs| {
                vs.spec
                    .gateways
                    .iter()
                    .any(|g| gateway_ref(g, &vs.meta.namespace) == key)
            })
            .collect();
        bound.sort_by_key(|vs| vs.meta.key());
        let admitted = |vs: &Resource<istio::VirtualService>| -> Vec<String> {
            let mut names = Vec::new();
            for h in &vs.spec.hosts {
                let h = resolve_host(h, &vs.meta.namespace);
                for sh in &hosts {
                    if sh
                        .namespace
                        .as_ref()
                        .is_some_and(|n| *n != vs.meta.namespace)
                    {
                        continue;
                    }
                    if let Some(name) = intersect(&sh.dns, &h)
                        && !names.contains(&name)
                    {
                        names.push(name);
                    }
                }
            }
            names
        };
        let bound: Vec<(&'a Resource<istio::VirtualService>, Vec<String>)> = bound
            .into_iter()
            .map(|vs| (vs, admitted(vs)))
            .filter(|(_, names)| !names.is_empty())
            .collect();

        let mut plan = ServerPlan {
            gateway: key.clone(),
            index,
            name: server.name.clone(),
            port,
            protocol: protocol.clone(),
            hosts: hosts.iter().map(|h| h.dns.clone()).collect(),
            https_redirect,
            tls,
            virtual_hosts: Vec::new(),
            tls_routes: Vec::new(),
            tcp: None,
        };
        let http_terminated = kind == ListenerKind::Http || (protocol == "HTTPS" && !passthrough);
        if http_terminated {
            plan.virtual_hosts = self.virtual_hosts(&key, port, &bound, &plan, &source);
        } else if passthrough {
            plan.tls_routes = self.tls_routes(&key, port, &bound);
            if plan.tls_routes.is_empty() {
                self.gateway_diag(
                    Level::Warning,
                    gw,
                    field.clone(),
                    format!("no VirtualService bound to {key} has a tls route for this PASSTHROUGH server; its connections are closed"),
                );
            }
        } else {
            plan.tcp = self.l4_route(&key, port, &bound);
            if plan.tcp.is_none() {
                self.gateway_diag(
                    Level::Warning,
                    gw,
                    field.clone(),
                    format!("no VirtualService bound to {key} has a tcp route for this {protocol} server; its connections are closed"),
                );
            }
        }
        Some((bind, plan))
    }

    /// The certificate of a SIMPLE server: `credentialName` (a Secret in the Gateway's
    /// namespace, or `ns/name`), else `serverCertificate`/`privateKey` files.
    fn credential(
        &mut self,
        gw: &Resource<istio::Gateway>,
        field: &str,
        tls: &istio::ServerTlsSettings,
    ) -> Credential {
        let name = tls
            .credential_name
            .clone()
            .or_else(|| tls.credential_names.first().cloned());
        if let Some(name) = name {
            let bare = name.strip_prefix("kubernetes://").unwrap_or(&name);
            let secret_key = match bare.split_once('/') {
                Some((ns, n)) => format!("{ns}/{n}"),
                None => format!("{}/{bare}", gw.meta.namespace),
            };
            let mut found: Vec<_> = self
                .config
                .secrets
                .iter()
                .filter(|s| s.meta.key() == secret_key)
                .collect();
            found.sort_by(|a, b| a.origin.cmp(&b.origin));
            let reason = match found.first() {
                None => format!("credentialName {name:?}: secret {secret_key} not found"),
                Some(s) => match s.spec.certificate_and_key() {
                    Some((cert, key)) => {
                        return Credential::Secret {
                            name: secret_key,
                            cert: Pem(cert.into()),
                            key: Pem(key.into()),
                        };
                    }
                    None => format!(
                        "credentialName {name:?}: secret {secret_key} has no tls.crt and tls.key (nor cert and key)"
                    ),
                },
            };
            self.gateway_diag(
                Level::Error,
                gw,
                format!("{field}.tls.credentialName"),
                format!("{reason}; TLS handshakes for this server are refused"),
            );
            return Credential::Missing(reason);
        }
        let files = match (&tls.server_certificate, &tls.private_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            _ => tls
                .tls_certificates
                .first()
                .and_then(|t| Some((t.server_certificate.clone()?, t.private_key.clone()?))),
        };
        match files {
            Some((cert, key)) => Credential::Files {
                cert: cert.into(),
                key: key.into(),
            },
            None => {
                let reason = "no credentialName and no serverCertificate/privateKey".to_string();
                self.gateway_diag(
                    Level::Error,
                    gw,
                    format!("{field}.tls"),
                    format!("SIMPLE TLS with {reason}; TLS handshakes for this server are refused"),
                );
                Credential::Missing(reason)
            }
        }
    }

    /// The client CA of a MUTUAL server, as Istio looks for it: `caCertCredentialName`, the
    /// credential Secret's own `ca.crt`/`cacert`, a `<credentialName>-cacert` Secret, then the
    /// `caCertificates` file.
    fn client_ca(
        &mut self,
        gw: &Resource<istio::Gateway>,
        field: &str,
        tls: &istio::ServerTlsSettings,
    ) -> ClientCa {
        let secret_key = |name: &str| {
            let bare = name.strip_prefix("kubernetes://").unwrap_or(name);
            match bare.split_once('/') {
                Some((ns, n)) => format!("{ns}/{n}"),
                None => format!("{}/{bare}", gw.meta.namespace),
            }
        };
        let credential = tls
            .credential_name
            .clone()
            .or_else(|| tls.credential_names.first().cloned());
        let mut candidates: Vec<String> = Vec::new();
        if let Some(n) = &tls.ca_cert_credential_name {
            candidates.push(secret_key(n));
        }
        if let Some(n) = &credential {
            candidates.push(secret_key(n));
            candidates.push(format!("{}-cacert", secret_key(n)));
        }
        for key in &candidates {
            let mut found: Vec<_> = self
                .config
                .secrets
                .iter()
                .filter(|s| s.meta.key() == *key)
                .collect();
            found.sort_by(|a, b| a.origin.cmp(&b.origin));
            if let Some(pem) = found.first().and_then(|s| s.spec.ca_certificates()) {
                return ClientCa::Secret {
                    name: key.clone(),
                    pem: Pem(pem.into()),
                };
            }
        }
        if let Some(path) = &tls.ca_certificates {
            return ClientCa::File(path.into());
        }
        let reason = if candidates.is_empty() {
            "no caCertificates and no credentialName to take a CA from".to_string()
        } else {
            format!("no ca.crt (or cacert) in secret {}", candidates.join(", "))
        };
        self.gateway_diag(
            Level::Error,
            gw,
            format!("{field}.tls"),
            format!(
                "{} needs a client CA: {reason}; TLS handshakes for this server are refused",
                tls.mode().as_str()
            ),
        );
        ClientCa::Missing(reason)
    }

    /// A copy of `vs` as seen at `gateway`: match-level gateway names as `ns/name`, and
    /// destinations without a port given the service's only port (Istio's
    /// GetDestinationCluster; the server port otherwise).
    fn at_gateway(&self, vs: &Resource<istio::VirtualService>) -> Resource<istio::VirtualService> {
        let mut vs = vs.clone();
        let ns = vs.meta.namespace.clone();
        for h in &mut vs.spec.http {
            self.http_route_at_gateway(h, &ns);
        }
        let fill = |d: &mut istio::Destination| self.fill_destination_port(d, &ns);
        let refs = |gateways: &mut Vec<String>| {
            for g in gateways.iter_mut() {
                *g = gateway_ref(g, &ns);
            }
        };
        for t in &mut vs.spec.tls {
            t.route.iter_mut().for_each(|r| fill(&mut r.destination));
            t.matches.iter_mut().for_each(|m| refs(&mut m.gateways));
        }
        for t in &mut vs.spec.tcp {
            t.route.iter_mut().for_each(|r| fill(&mut r.destination));
            t.matches.iter_mut().for_each(|m| refs(&mut m.gateways));
        }
        vs
    }

    /// One http route as seen at a gateway (see [`Self::at_gateway`]), for a route written in
    /// namespace `ns` (a delegate's routes are written in the delegate's).
    fn http_route_at_gateway(&self, h: &mut istio::HttpRoute, ns: &str) {
        let fill = |d: &mut istio::Destination| self.fill_destination_port(d, ns);
        h.route.iter_mut().for_each(|r| fill(&mut r.destination));
        if let Some(m) = &mut h.mirror {
            fill(m);
        }
        h.mirrors.iter_mut().for_each(|m| fill(&mut m.destination));
        for m in &mut h.matches {
            for g in m.gateways.iter_mut() {
                *g = gateway_ref(g, ns);
            }
        }
    }

    /// Istio's GetDestinationCluster: a destination without a port gets its service's only
    /// port.
    fn fill_destination_port(&self, d: &mut istio::Destination, ns: &str) {
        if d.port.as_ref().and_then(|p| p.number).is_some() {
            return;
        }
        let Some(svc) = self.registry.services.get(&resolve_host(&d.host, ns)) else {
            return;
        };
        let mut ports: Vec<u16> = svc
            .ports
            .iter()
            .filter(|p| p.transport == registry::Transport::Tcp)
            .map(|p| p.port)
            .collect();
        ports.dedup();
        if let [only] = ports.as_slice() {
            d.port = Some(istio::PortSelector {
                number: Some(*only as u32),
            });
        }
    }

    fn virtual_hosts(
        &mut self,
        gateway: &str,
        port: u16,
        bound: &[(&'a Resource<istio::VirtualService>, Vec<String>)],
        server: &ServerPlan,
        source: &Source,
    ) -> Vec<VirtualHost> {
        // name → the VirtualServices claiming it, in key order.
        let mut claims: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        for (i, (vs, names)) in bound.iter().enumerate() {
            if vs.spec.http.is_empty() {
                continue;
            }
            for name in names {
                let entry = claims.entry(name.clone()).or_insert_with(|| {
                    order.push(name.clone());
                    Vec::new()
                });
                entry.push(i);
            }
        }
        let mut rules_of: HashMap<usize, Vec<HttpRule>> = HashMap::new();
        let mut vhosts = Vec::new();
        for name in order {
            let members = &claims[&name];
            let mut rules = Vec::new();
            for &i in members {
                let built = match rules_of.get(&i) {
                    Some(r) => r.clone(),
                    None => {
                        let vs = self.at_gateway(bound[i].0);
                        let mut cache = HashMap::new();
                        let mut built: Vec<HttpRule> = Vec::new();
                        for mut r in self.expanded_http(&vs) {
                            if r.delegated_by.is_some() {
                                let ns = r.owner.meta.namespace.clone();
                                self.http_route_at_gateway(r.route.to_mut(), &ns);
                            }
                            built.extend(self.expanded_rule(&r, port, &mut cache));
                        }
                        rules_of.insert(i, built.clone());
                        built
                    }
                };
                rules.extend(built);
            }
            if members.len() > 1 {
                rules = catch_alls_last(rules);
            }
            let keys: Vec<String> = members.iter().map(|&i| bound[i].0.meta.key()).collect();
            vhosts.push(VirtualHost {
                gateway: gateway.to_string(),
                domain: name,
                https_redirect: server.https_redirect,
                routes: Arc::new(HttpRoutes {
                    virtual_service: Some(keys.join(",")),
                    rules,
                }),
                source: source.clone(),
            });
        }
        if server.https_redirect {
            // Redirected names need no VirtualService (Istio adds a bare virtual host).
            for h in &server.hosts {
                if !vhosts.iter().any(|v| v.domain == *h) {
                    vhosts.push(VirtualHost {
                        gateway: gateway.to_string(),
                        domain: h.clone(),
                        https_redirect: true,
                        routes: Arc::new(HttpRoutes {
                            virtual_service: None,
                            rules: Vec::new(),
                        }),
                        source: source.clone(),
                    });
                }
            }
        }
        vhosts
    }

    fn tls_routes(
        &mut self,
        gateway: &str,
        port: u16,
        bound: &[(&'a Resource<istio::VirtualService>, Vec<String>)],
    ) -> Vec<TlsRoutePlan> {
        let mut out = Vec::new();
        for (vs, _) in bound {
            let vs = self.at_gateway(vs);
            for (i, tls) in vs.spec.tls.iter().enumerate() {
                let sni: Vec<String> = tls
                    .matches
                    .iter()
                    .filter(|m| m.port.is_none_or(|p| p == port as u32))
                    .filter(|m| m.gateways.is_empty() || m.gateways.iter().any(|g| g == gateway))
                    .flat_map(|m| m.sni_hosts.iter())
                    .map(|h| resolve_host(h, &vs.meta.namespace).to_ascii_lowercase())
                    .collect();
                if sni.is_empty() {
                    continue;
                }
                let backends = normalise(self.weighted(
                    &vs,
                    &format!("spec.tls[{i}].route"),
                    &tls.route,
                    port,
                ));
                out.push(TlsRoutePlan {
                    sni_hosts: sni,
                    route: format!("VirtualService {} tls[{i}]", vs.meta.key()),
                    backends,
                });
            }
        }
        out
    }

    fn l4_route(
        &mut self,
        gateway: &str,
        port: u16,
        bound: &[(&'a Resource<istio::VirtualService>, Vec<String>)],
    ) -> Option<L4RoutePlan> {
        for (vs, _) in bound {
            let vs = self.at_gateway(vs);
            for (i, tcp) in vs.spec.tcp.iter().enumerate() {
                let applies = tcp.matches.is_empty()
                    || tcp.matches.iter().any(|m| {
                        m.port.is_none_or(|p| p == port as u32)
                            && (m.gateways.is_empty() || m.gateways.iter().any(|g| g == gateway))
                    });
                if applies {
                    let backends = normalise(self.weighted(
                        &vs,
                        &format!("spec.tcp[{i}].route"),
                        &tcp.route,
                        port,
                    ));
                    return Some(L4RoutePlan {
                        route: format!("VirtualService {} tcp[{i}]", vs.meta.key()),
                        backends,
                    });
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::http::{RequestView, RouteAction};
    use crate::model::parse_documents;

    fn config(texts: &[&str]) -> ConfigSet {
        let mut c = ConfigSet::default();
        for (i, t) in texts.iter().enumerate() {
            let (objs, errs) = parse_documents(&format!("t{i}.yaml"), t);
            assert!(errs.is_empty(), "{errs:?}");
            c.extend(objs);
        }
        c
    }

    fn sample(path: &str) -> String {
        let path = format!(
            "{}/../../shared/istio/samples/{path}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    const PRODUCTPAGE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: productpage}\nspec:\n  clusterIP: 10.96.0.9\n  selector: {app: productpage}\n  ports: [{name: http, port: 9080}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: productpage-v1-abc, labels: {app: productpage}}\nstatus: {podIP: 10.244.1.2}\n";

    fn request<'a>(authority: &'a str, path: &'a str, gateway: &'a str) -> RequestView<'a> {
        RequestView {
            method: "GET",
            scheme: "http",
            authority,
            path,
            gateway,
            port: 8080,
            ..Default::default()
        }
    }

    fn cluster_of(routes: &HttpRoutes, req: &RequestView<'_>) -> Option<String> {
        let rule = routes.select(req)?;
        match &rule.action {
            RouteAction::Forward(d) => Some(d[0].cluster.name.clone()),
            _ => None,
        }
    }

    #[test]
    fn bookinfo_sample_binds_port_8080_with_its_routes() {
        let bookinfo = sample("bookinfo/networking/bookinfo-gateway.yaml");
        let c = config(&[PRODUCTPAGE, &bookinfo]);
        let plan = compile(&c, &["bookinfo-gateway".into()]);
        assert!(plan.diagnostics.is_empty(), "{:?}", plan.diagnostics);
        assert_eq!(plan.listeners.len(), 1);
        let l = &plan.listeners[0];
        assert_eq!((l.port, l.kind, l.bind), (8080, ListenerKind::Http, None));
        let vh = select_virtual_host(&l.virtual_hosts, "10.0.0.1:8080").expect("* vhost");
        assert_eq!(vh.domain, "*");
        assert_eq!(vh.gateway, "default/bookinfo-gateway");
        let gw = "default/bookinfo-gateway";
        assert_eq!(
            cluster_of(&vh.routes, &request("x", "/productpage", gw)).as_deref(),
            Some("outbound|9080||productpage.default.svc.cluster.local")
        );
        assert_eq!(cluster_of(&vh.routes, &request("x", "/other", gw)), None);
    }

    #[test]
    fn hosts_wildcards_namespaces_and_redirects() {
        let gw = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*/a.example.com", "*.b.example.com", "shop/c.example.com", "./d.example.com"]
  - port: {number: 80, name: http-redirect, protocol: HTTP}
    hosts: ["r.example.com"]
    tls: {httpsRedirect: true}
"#;
        let vs = |name: &str, ns: &str, hosts: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  hosts: [{hosts}]\n  gateways: [edge/gw]\n  http:\n  - route: [{{destination: {{host: productpage.default.svc.cluster.local}}}}]\n"
            )
        };
        let c = config(&[
            PRODUCTPAGE,
            gw,
            &vs("a", "default", "a.example.com"),
            &vs("b", "default", "\"*.example.com\""),
            &vs("c-wrong-ns", "default", "c.example.com"),
            &vs("c", "shop", "c.example.com"),
            &vs("d-wrong-ns", "default", "d.example.com"),
            &vs("unrelated", "default", "z.org"),
        ]);
        let plan = compile(&c, &["edge/gw".into()]);
        let l = &plan.listeners[0];
        assert_eq!(l.servers.len(), 2);
        let domains: Vec<(&str, Option<&str>, bool)> = l
            .virtual_hosts
            .iter()
            .map(|v| {
                (
                    v.domain.as_str(),
                    v.routes.virtual_service.as_deref(),
                    v.https_redirect,
                )
            })
            .collect();
        assert_eq!(
            domains,
            vec![
                // b's *.example.com meets a.example.com too: both VirtualServices' rules.
                ("a.example.com", Some("default/a,default/b"), false),
                // The more specific name of the intersection.
                ("*.b.example.com", Some("default/b"), false),
                ("c.example.com", Some("shop/c"), false),
                // b covers r.example.com too; the redirect applies first.
                ("r.example.com", Some("default/b"), true),
            ]
        );
        let pick = |h: &str| select_virtual_host(&l.virtual_hosts, h).map(|v| v.domain.clone());
        assert_eq!(pick("a.example.com:80").as_deref(), Some("a.example.com"));
        assert_eq!(pick("x.b.example.com").as_deref(), Some("*.b.example.com"));
        assert_eq!(pick("b.example.com"), None);
        assert_eq!(
            pick("d.example.com"),
            None,
            "./ admits only edge's VirtualServices"
        );
        assert_eq!(
            pick("R.Example.com.").as_deref(),
            Some("r.example.com"),
            "domains match case-insensitively, trailing dot ignored"
        );
    }

    #[test]
    fn https_servers_by_sni_with_secret_files_and_missing_credentials() {
        let text = r#"
apiVersion: v1
kind: Secret
metadata: {name: a-cert, namespace: default}
type: kubernetes.io/tls
data: {tls.crt: Q0VSVA==, tls.key: S0VZ}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: 443, name: https-a, protocol: HTTPS}
    hosts: [a.example.com]
    tls: {mode: SIMPLE, credentialName: a-cert}
  - port: {number: 443, name: https-b, protocol: HTTPS}
    hosts: ["*.b.example.com"]
    tls: {mode: SIMPLE, serverCertificate: /etc/b.crt, privateKey: /etc/b.key}
  - port: {number: 443, name: https-c, protocol: HTTPS}
    hosts: [c.example.com]
    tls: {mode: SIMPLE, credentialName: missing}
  - port: {number: 443, name: tls-p, protocol: TLS}
    hosts: [p.example.com]
    tls: {mode: PASSTHROUGH}
  - port: {number: 443, name: http-conflict, protocol: HTTP}
    hosts: [x.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: p}
spec:
  hosts: [p.example.com]
  gateways: [gw]
  tls:
  - match: [{sniHosts: [p.example.com], port: 443}]
    route: [{destination: {host: productpage}}]
"#;
        let c = config(&[PRODUCTPAGE, text]);
        let plan = compile(&c, &["gw".into()]);
        let l = &plan.listeners[0];
        assert_eq!(l.kind, ListenerKind::Tls);
        assert_eq!(
            l.servers.len(),
            4,
            "the HTTP server cannot share a TLS port"
        );
        let errors: Vec<String> = plan
            .diagnostics
            .iter()
            .map(|d| format!("{} {}", d.field, d.message))
            .collect();
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("spec.servers[2].tls.credentialName")
                    && e.contains("secret default/missing not found")),
            "{errors:?}"
        );
        assert!(
            errors.iter().any(|e| e.starts_with("spec.servers[4].port")),
            "{errors:?}"
        );
        let by_sni = |sni: Option<&str>| select_server(&l.servers, sni).map(|s| s.index);
        assert_eq!(by_sni(Some("a.example.com")), Some(0));
        assert_eq!(by_sni(Some("x.b.example.com")), Some(1));
        assert_eq!(by_sni(Some("c.example.com")), Some(2));
        assert_eq!(by_sni(Some("other.org")), None);
        assert_eq!(by_sni(None), None);
        let a = &l.servers[0];
        match &a.tls.as_ref().unwrap().credential {
            Credential::Secret { name, cert, key } => {
                assert_eq!(name, "default/a-cert");
                assert_eq!((&*cert.0, &*key.0), (b"CERT".as_slice(), b"KEY".as_slice()));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            l.servers[1].tls.as_ref().unwrap().credential,
            Credential::Files {
                cert: "/etc/b.crt".into(),
                key: "/etc/b.key".into()
            }
        );
        assert!(matches!(
            l.servers[2].tls.as_ref().unwrap().credential,
            Credential::Missing(_)
        ));
        let p = &l.servers[3];
        assert!(!p.terminates_tls());
        assert_eq!(p.tls_routes.len(), 1);
        assert_eq!(p.tls_routes[0].rank("p.example.com"), Some(usize::MAX));
        // The destination had no port: the service's only one.
        assert_eq!(
            p.tls_routes[0].backends[0].addr,
            "10.244.1.2:9080".parse().unwrap()
        );
    }

    #[test]
    fn mutual_tls_finds_the_client_ca_where_istio_does() {
        let text = r#"
apiVersion: v1
kind: Secret
metadata: {name: own}
data: {tls.crt: Q0VSVA==, tls.key: S0VZ, ca.crt: Q0E=}
---
apiVersion: v1
kind: Secret
metadata: {name: split}
data: {tls.crt: Q0VSVA==, tls.key: S0VZ}
---
apiVersion: v1
kind: Secret
metadata: {name: split-cacert}
data: {cacert: Q0Ey}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: 443, name: a, protocol: HTTPS}
    hosts: [a.example.com]
    tls: {mode: MUTUAL, credentialName: own}
  - port: {number: 443, name: b, protocol: HTTPS}
    hosts: [b.example.com]
    tls: {mode: OPTIONAL_MUTUAL, credentialName: split}
  - port: {number: 443, name: c, protocol: HTTPS}
    hosts: [c.example.com]
    tls: {mode: MUTUAL, serverCertificate: /c.crt, privateKey: /c.key, caCertificates: /ca.pem}
  - port: {number: 443, name: d, protocol: HTTPS}
    hosts: [d.example.com]
    tls: {mode: MUTUAL, serverCertificate: /d.crt, privateKey: /d.key}
  - port: {number: 443, name: e, protocol: HTTPS}
    hosts: [e.example.com]
    tls: {mode: ISTIO_MUTUAL}
"#;
        let plan = compile(&config(&[text]), &["gw".into()]);
        let servers = &plan.listeners[0].servers;
        assert_eq!(servers.len(), 4, "ISTIO_MUTUAL is not served");
        let ca = |i: usize| servers[i].tls.as_ref().unwrap().client_ca.clone();
        assert_eq!(
            ca(0),
            Some(ClientCa::Secret {
                name: "default/own".into(),
                pem: Pem(b"CA".as_slice().into())
            })
        );
        assert_eq!(
            ca(1),
            Some(ClientCa::Secret {
                name: "default/split-cacert".into(),
                pem: Pem(b"CA2".as_slice().into())
            })
        );
        assert_eq!(ca(2), Some(ClientCa::File("/ca.pem".into())));
        assert!(matches!(ca(3), Some(ClientCa::Missing(_))));
        let messages: Vec<&str> = plan
            .diagnostics
            .iter()
            .map(|d| d.message.as_str())
            .collect();
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("MUTUAL needs a client CA")),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("ISTIO_MUTUAL is not supported")),
            "{messages:?}"
        );
    }

    #[test]
    fn routes_of_several_virtual_services_merge_with_catch_alls_last() {
        let text = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a-catch-all}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - route: [{destination: {host: productpage, port: {number: 9080}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b-specific}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - match: [{uri: {prefix: /b}, gateways: [gw]}, {uri: {prefix: /mesh-only}, gateways: [mesh]}]
    directResponse: {status: 204}
"#;
        let c = config(&[PRODUCTPAGE, text]);
        let plan = compile(&c, &["default/gw".into()]);
        let vh = &plan.listeners[0].virtual_hosts[0];
        assert_eq!(
            vh.routes.virtual_service.as_deref(),
            Some("default/a-catch-all,default/b-specific")
        );
        let gw = "default/gw";
        let rule = vh.routes.select(&request("h", "/b/x", gw)).unwrap();
        assert!(matches!(
            rule.action,
            RouteAction::DirectResponse { status: 204, .. }
        ));
        let rule = vh.routes.select(&request("h", "/mesh-only", gw)).unwrap();
        assert!(
            matches!(rule.action, RouteAction::Forward(_)),
            "mesh-only block is skipped"
        );
    }

    #[test]
    fn delegated_routes_apply_at_the_gateway() {
        let text = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - match: [{uri: {prefix: /productpage}, gateways: [gw]}]
    delegate: {name: split, namespace: team}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: split, namespace: team}
spec:
  http:
  - match: [{uri: {exact: /productpage/teapot}}]
    directResponse: {status: 418}
  - route: [{destination: {host: productpage.default.svc.cluster.local}}]
"#;
        let c = config(&[PRODUCTPAGE, text]);
        let plan = compile(&c, &["default/gw".into()]);
        assert!(plan.diagnostics.is_empty(), "{:?}", plan.diagnostics);
        let vh = &plan.listeners[0].virtual_hosts[0];
        let gw = "default/gw";
        assert_eq!(
            cluster_of(&vh.routes, &request("h", "/productpage/1", gw)).as_deref(),
            Some("outbound|9080||productpage.default.svc.cluster.local"),
            "the delegate's destination gets the service's only port"
        );
        let rule = vh
            .routes
            .select(&request("h", "/productpage/teapot", gw))
            .unwrap();
        assert!(matches!(
            rule.action,
            RouteAction::DirectResponse { status: 418, .. }
        ));
        assert!(vh.routes.select(&request("h", "/other", gw)).is_none());
    }

    #[test]
    fn missing_gateway_is_an_error() {
        let plan = compile(&ConfigSet::default(), &["istio-system/nope".into()]);
        assert!(plan.listeners.is_empty());
        assert_eq!(plan.diagnostics[0].level, Level::Error);
        assert!(plan.diagnostics[0].message.contains("istio-system/nope"));
    }

    #[test]
    fn authority_hosts() {
        assert_eq!(authority_host("a.com:80"), "a.com");
        assert_eq!(authority_host("a.com"), "a.com");
        assert_eq!(authority_host("[fd00::1]:443"), "fd00::1");
        assert_eq!(authority_host("10.0.0.1"), "10.0.0.1");
    }
}
