//! Gateway listeners: `steerd run --gateway ns/name` binds the ports of the Gateway's servers on
//! the node addresses (or `server.bind`) and serves them from the plan of
//! [`crate::compile::gateway`]:
//!
//! - HTTP ports: every request is matched to a virtual host by its Host header and routed by the
//!   L7 proxy's request path ([`Proxy::serve_request`]: weights, retries, timeouts, faults,
//!   mirrors, load balancing, outlier detection) with the request's gateway set to `ns/name`.
//!   Virtual hosts of servers with `httpsRedirect` answer 301 to `https://`.
//! - HTTPS/TLS ports: the ClientHello's SNI picks the server. SIMPLE servers terminate TLS with
//!   rustls, MUTUAL (and OPTIONAL_MUTUAL) ones also verify client certificates against their CA
//!   (HTTPS is then routed like HTTP, TLS forwarded by the `tcp` route); PASSTHROUGH
//!   servers forward the untouched byte stream to the backend of the VirtualService `tls` route
//!   whose `sniHosts` match.
//! - TCP ports: forwarded by the `tcp` route.
//!
//! Plans are swapped in without closing listeners: a listener that stays keeps its socket, and
//! each connection (each request, for HTTP) uses the latest plan. A server whose certificate
//! cannot be loaded refuses its handshakes with a TLS alert and an error in the log, while the
//! other servers keep serving. Certificate files are re-read when they change.

use crate::compile::gateway::{
    self as plan, ClientCa, Credential, GatewayPlan, ListenerKind, ListenerPlan, ServerPlan,
    VirtualHost,
};
use crate::compile::{Level, WeightedBackend};
use crate::dataplane::proxy::{Proxy, ProxyBody, ProxyService, local_reply};
use crate::model::ConfigSet;
use crate::model::istio::TlsProtocolVersion;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};
use steerd_common::PROXY_SOCKET_MARK;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, error, info, warn};

/// How long a client may take to send its ClientHello.
const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A ClientHello larger than this is refused (they are a few hundred bytes to a few KiB).
const MAX_CLIENT_HELLO: usize = 64 << 10;
/// Upstream connect timeout for TCP and PASSTHROUGH forwarding.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often certificate files are checked for changes.
const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// At most one "handshake refused" warning per server in this interval.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// TLS alert records (TLS 1.2 framing, which every client accepts before a version is agreed).
const ALERT_HANDSHAKE_FAILURE: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 40];
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112];

/// A server as a listener serves it: its plan and, when it terminates TLS, its rustls config
/// (or why there is none).
struct ServerState {
    plan: Arc<ServerPlan>,
    tls: Option<Result<Arc<ServerConfig>, String>>,
    /// What `inspect listeners` shows of its certificate.
    status: Option<CertificateStatus>,
    /// Seconds since `epoch` of the last refusal warning.
    last_refusal_log: AtomicU64,
}

/// The state of a terminating server's certificate, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertificateStatus {
    /// `secret default/a-cert`, `files /etc/a.crt /etc/a.key`, or `missing`.
    pub source: String,
    /// Whether handshakes are being served (with the current or the last good certificate).
    pub loaded: bool,
    /// `notAfter` of the leaf certificate being served (RFC 3339).
    pub not_after: Option<String>,
    /// Why the configured credential does not load (None: it does).
    pub error: Option<String>,
    /// The error above is being ridden out with the last certificate that loaded.
    pub serving_last_good: bool,
}

/// A certificate that loaded for a server, kept while its successor does not load.
#[derive(Clone)]
struct LastGood {
    config: Arc<ServerConfig>,
    not_after: Option<String>,
}

/// What one bound address serves; replaced as a whole on each plan.
struct PortState {
    listener: ListenerPlan,
    servers: Vec<ServerState>,
    epoch: Instant,
}

impl PortState {
    fn server(&self, sni: Option<&str>) -> Option<&ServerState> {
        let chosen = plan::select_server(&self.listener.servers, sni)?;
        self.servers.iter().find(|s| Arc::ptr_eq(&s.plan, chosen))
    }
}

type SharedState = Arc<RwLock<Arc<PortState>>>;

struct Running {
    state: SharedState,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Closes the listening socket; connections already accepted finish on their own.
        self.task.abort();
    }
}

#[derive(Default)]
struct Inner {
    listeners: HashMap<SocketAddr, Running>,
    /// The plan last applied, re-applied when a certificate file changes.
    plan: Option<GatewayPlan>,
    /// Certificate files of that plan and their modification times.
    files: Vec<(PathBuf, Option<SystemTime>)>,
    /// Diagnostics and per-server TLS errors already logged, so each is logged once.
    logged: BTreeSet<String>,
    /// By [`server_key`]: the last certificate that loaded, served while a rotated Secret or
    /// file is deleted or malformed.
    last_good: HashMap<String, LastGood>,
}

/// A server's identity across plans: `ns/gateway spec.servers[i]`.
fn server_key(server: &ServerPlan) -> String {
    format!("{} spec.servers[{}]", server.gateway, server.index)
}

/// The field of a server that names its certificate, for error messages.
fn credential_field(server: &ServerPlan) -> String {
    let field = match server.tls.as_ref().map(|t| &t.credential) {
        Some(Credential::Files { .. }) => "serverCertificate",
        _ => "credentialName",
    };
    format!("{}.tls.{field}", server_key(server))
}

fn credential_source(credential: &Credential) -> String {
    match credential {
        Credential::Secret { name, .. } => format!("secret {name}"),
        Credential::Files { cert, key } => format!("files {} {}", cert.display(), key.display()),
        Credential::Missing(_) => "missing".into(),
        Credential::None => "none".into(),
    }
}

/// The gateway listeners of the agent.
pub struct Gateways {
    proxy: Arc<Proxy>,
    node_ips: Vec<IpAddr>,
    names: Vec<String>,
    inner: Mutex<Inner>,
}

impl Gateways {
    /// Gateways `names` (`ns/name`) served on `node_ips`; nothing is bound until [`Self::apply`].
    /// Starts the certificate file watcher (needs a tokio runtime).
    pub fn new(proxy: Arc<Proxy>, node_ips: Vec<IpAddr>, names: Vec<String>) -> Arc<Self> {
        let gateways = Arc::new(Self {
            proxy,
            node_ips,
            names,
            inner: Mutex::new(Inner::default()),
        });
        let weak: Weak<Self> = Arc::downgrade(&gateways);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FILE_CHECK_INTERVAL);
            loop {
                tick.tick().await;
                let Some(g) = weak.upgrade() else { return };
                g.reload_changed_files();
            }
        });
        gateways
    }

    /// Compiles the gateways from `config` and serves the result.
    pub fn apply(&self, config: &ConfigSet) {
        self.update(plan::compile(config, &self.names));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reload_changed_files(&self) {
        let plan = {
            let inner = self.lock();
            let changed = inner.files.iter().any(|(p, t)| modified(p) != *t);
            match (&inner.plan, changed) {
                (Some(plan), true) => plan.clone(),
                _ => return,
            }
        };
        info!("gateway certificate files changed; reloading");
        self.update(plan);
    }

    /// Serves `plan`: listeners that stay get the new plan, new ones are bound, others closed.
    pub fn update(&self, plan: GatewayPlan) {
        self.proxy.observe_gateway_members(
            plan.listeners
                .iter()
                .flat_map(|l| {
                    l.virtual_hosts
                        .iter()
                        .chain(l.servers.iter().flat_map(|s| &s.virtual_hosts))
                })
                .flat_map(|v| v.routes.clusters()),
        );
        let mut inner = self.lock();
        let mut logged = BTreeSet::new();
        for d in &plan.diagnostics {
            let line = d.to_string();
            if !inner.logged.contains(&line) {
                match d.level {
                    Level::Error => error!(diagnostic = %d, "gateway configuration error"),
                    Level::Warning => warn!(diagnostic = %d, "gateway configuration warning"),
                    Level::Info => info!(diagnostic = %d, "gateway configuration note"),
                }
            }
            logged.insert(line);
        }

        let mut files = Vec::new();
        let mut last_good = HashMap::new();
        let mut desired: HashMap<SocketAddr, Arc<PortState>> = HashMap::new();
        for listener in &plan.listeners {
            let mut servers = Vec::new();
            for server in &listener.servers {
                let tls = server.terminates_tls().then(|| {
                    let tls = server.tls.as_ref().expect("terminating servers have tls");
                    if let Credential::Files { cert, key } = &tls.credential {
                        files.push((cert.clone(), modified(cert)));
                        files.push((key.clone(), modified(key)));
                    }
                    if let Some(ClientCa::File(ca)) = &tls.client_ca {
                        files.push((ca.clone(), modified(ca)));
                    }
                    let key = server_key(server);
                    let loaded = server_config(server)
                        .map(|(config, leaf)| LastGood {
                            config,
                            not_after: not_after(&leaf),
                        })
                        .map_err(|e| format!("{}: {e}", credential_field(server)));
                    let previous = inner.last_good.get(&key).cloned();
                    let line = match &loaded {
                        Ok(_) => format!("ok {}", server.describe()),
                        Err(e) => format!("err {}: {e}", server.describe()),
                    };
                    if !inner.logged.contains(&line) {
                        match (&loaded, &previous) {
                            (Err(e), Some(_)) => error!(
                                server = %server.describe(),
                                error = %e,
                                "gateway certificate does not load; the last good certificate keeps serving"
                            ),
                            (Err(e), None) => error!(
                                server = %server.describe(),
                                error = %e,
                                "gateway server has no usable certificate; its TLS handshakes are refused while the other servers serve"
                            ),
                            (Ok(_), _) => info!(server = %server.describe(), "gateway certificate loaded"),
                        }
                    }
                    logged.insert(line);
                    let source = credential_source(&tls.credential);
                    match (loaded, previous) {
                        (Ok(good), _) => {
                            last_good.insert(key, good.clone());
                            let status = CertificateStatus {
                                source,
                                loaded: true,
                                not_after: good.not_after,
                                error: None,
                                serving_last_good: false,
                            };
                            (Ok(good.config), status)
                        }
                        (Err(e), Some(good)) => {
                            last_good.insert(key, good.clone());
                            let status = CertificateStatus {
                                source,
                                loaded: true,
                                not_after: good.not_after,
                                error: Some(e),
                                serving_last_good: true,
                            };
                            (Ok(good.config), status)
                        }
                        (Err(e), None) => {
                            let status = CertificateStatus {
                                source,
                                loaded: false,
                                not_after: None,
                                error: Some(e.clone()),
                                serving_last_good: false,
                            };
                            (Err(e), status)
                        }
                    }
                });
                let (tls, status) = match tls {
                    Some((tls, status)) => (Some(tls), Some(status)),
                    None => (None, None),
                };
                servers.push(ServerState {
                    plan: server.clone(),
                    tls,
                    status,
                    last_refusal_log: AtomicU64::new(0),
                });
            }
            let state = Arc::new(PortState {
                listener: listener.clone(),
                servers,
                epoch: Instant::now(),
            });
            let ips: Vec<IpAddr> = match listener.bind {
                Some(ip) => vec![ip],
                None => self.node_ips.clone(),
            };
            for ip in ips {
                let addr = SocketAddr::new(ip, listener.port);
                if desired.insert(addr, state.clone()).is_some() {
                    error!(%addr, "two gateway listeners claim this address; the last one serves it");
                }
            }
        }

        inner.listeners.retain(|addr, _| {
            let keep = desired.contains_key(addr);
            if !keep {
                info!(%addr, "gateway listener closed");
            }
            keep
        });
        for (addr, state) in desired {
            if let Some(running) = inner.listeners.get(&addr) {
                *running.state.write().unwrap_or_else(|e| e.into_inner()) = state;
                continue;
            }
            let kind = state.listener.kind;
            match bind_listener(addr) {
                Ok(listener) => {
                    info!(%addr, kind = ?kind, "gateway listening");
                    let shared: SharedState = Arc::new(RwLock::new(state));
                    let task = tokio::spawn(accept_loop(
                        listener,
                        addr,
                        shared.clone(),
                        self.proxy.clone(),
                    ));
                    inner.listeners.insert(
                        addr,
                        Running {
                            state: shared,
                            task,
                        },
                    );
                }
                // Retried with the next plan.
                Err(e) => error!(%addr, error = %e, "gateway listener could not bind"),
            }
        }
        inner.logged = logged;
        inner.last_good = last_good;
        inner.files = files;
        inner.plan = Some(plan);
    }

    /// Every server of every bound address, with its certificate state (terminating servers),
    /// by address then server order: what `inspect listeners` shows.
    pub fn served(&self) -> Vec<(SocketAddr, Arc<ServerPlan>, Option<CertificateStatus>)> {
        let inner = self.lock();
        let mut out = Vec::new();
        for (addr, running) in &inner.listeners {
            let state = running
                .state
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            for s in &state.servers {
                out.push((*addr, s.plan.clone(), s.status.clone()));
            }
        }
        out.sort_by_key(|s| (s.0, s.1.index));
        out
    }

    /// Addresses currently listening.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = self.lock().listeners.keys().copied().collect();
        v.sort();
        v
    }
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// `notAfter` of a DER certificate, RFC 3339.
fn not_after(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    cert.validity()
        .not_after
        .to_datetime()
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// The rustls configuration of a terminating server and its leaf certificate, or why it cannot
/// have one.
fn server_config(
    server: &ServerPlan,
) -> Result<(Arc<ServerConfig>, CertificateDer<'static>), String> {
    let tls = server.tls.as_ref().ok_or("no tls settings")?;
    let (cert, key, what) = match &tls.credential {
        Credential::Secret { name, cert, key } => {
            (cert.0.to_vec(), key.0.to_vec(), format!("secret {name}"))
        }
        Credential::Files { cert, key } => {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))
            };
            (
                read(cert)?,
                read(key)?,
                format!("{} and {}", cert.display(), key.display()),
            )
        }
        Credential::Missing(reason) => return Err(reason.clone()),
        Credential::None => return Err("no credential".into()),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what}: certificate: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{what}: no CERTIFICATE in the certificate PEM"));
    }
    let leaf = chain[0].clone();
    let key =
        PrivateKeyDer::from_pem_slice(&key).map_err(|e| format!("{what}: private key: {e}"))?;
    let all = [&rustls::version::TLS12, &rustls::version::TLS13];
    let level = |v: Option<TlsProtocolVersion>, default: u8| match v {
        Some(TlsProtocolVersion::Tlsv1_3) => 3,
        Some(TlsProtocolVersion::Tlsv1_2) => 2,
        // TLS 1.0 and 1.1 are not offered by rustls; 1.2 is the floor.
        Some(TlsProtocolVersion::Tlsv1_0 | TlsProtocolVersion::Tlsv1_1) => 2,
        Some(TlsProtocolVersion::TlsAuto) | None => default,
    };
    let (min, max) = (level(tls.min_version, 2), level(tls.max_version, 3));
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = all
        .into_iter()
        .filter(|v| {
            let n = if v.version == rustls::ProtocolVersion::TLSv1_3 {
                3
            } else {
                2
            };
            (min..=max).contains(&n)
        })
        .collect();
    if versions.is_empty() {
        return Err("minProtocolVersion is above maxProtocolVersion".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("{what}: {e}"))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let (pem, source) = match ca {
                ClientCa::Secret { name, pem } => (pem.0.to_vec(), format!("secret {name}")),
                ClientCa::File(path) => (
                    std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?,
                    path.display().to_string(),
                ),
                ClientCa::Missing(reason) => return Err(reason.clone()),
            };
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("{source}: client CA: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{source}: client CA: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!("{source}: no CERTIFICATE in the client CA PEM"));
            }
            let mut verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider);
            if tls.mode == crate::model::istio::ServerTlsMode::OptionalMutual {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| format!("{source}: client CA: {e}"))?;
            if tls.subject_alt_names.is_empty() {
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_client_cert_verifier(Arc::new(SanCheckingVerifier {
                    inner: verifier,
                    subject_alt_names: tls.subject_alt_names.clone(),
                }))
            }
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("{what}: {e}"))?;
    if server.protocol == "HTTPS" {
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    Ok((Arc::new(config), leaf))
}

/// The CA's verdict, then Envoy's `match_typed_subject_alt_names` as Istio configures it for a
/// Gateway's `subjectAltNames`: the client certificate must carry one of the listed names as a
/// DNS, URI, email or IP SAN (exact match; a `*.` DNS SAN of the certificate covers one label).
#[derive(Debug)]
struct SanCheckingVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    subject_alt_names: Vec<String>,
}

impl rustls::server::danger::ClientCertVerifier for SanCheckingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let names = certificate_sans(end_entity);
        if san_matches(&self.subject_alt_names, &names) {
            Ok(verified)
        } else {
            debug!(certificate = ?names, allowed = ?self.subject_alt_names, "client certificate refused: no allowed subjectAltName");
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A certificate's subjectAltNames as (type, value): `DNS`, `URI`, `EMAIL`, `IP`.
pub(crate) fn certificate_sans(der: &CertificateDer<'_>) -> Vec<(&'static str, String)> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(ext)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(n) => Some(("DNS", n.to_string())),
            GeneralName::URI(u) => Some(("URI", u.to_string())),
            GeneralName::RFC822Name(e) => Some(("EMAIL", e.to_string())),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes)
                    .ok()
                    .map(|b| ("IP", IpAddr::from(b).to_string())),
                16 => <[u8; 16]>::try_from(*bytes)
                    .ok()
                    .map(|b| ("IP", IpAddr::from(b).to_string())),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Whether one of the certificate's SANs is one of `allowed` (Envoy's exact matchers; DNS SANs
/// with Envoy's `dnsNameMatch`: `*.example.com` covers `a.example.com`, not `a.b.example.com`).
pub(crate) fn san_matches(allowed: &[String], names: &[(&'static str, String)]) -> bool {
    names.iter().any(|(kind, name)| {
        allowed.iter().any(|want| {
            if *kind == "DNS" {
                dns_name_match(want, name)
            } else if *kind == "IP" {
                want.parse::<IpAddr>()
                    .is_ok_and(|ip| ip.to_string() == *name)
            } else {
                want == name
            }
        })
    })
}

fn dns_name_match(want: &str, cert_name: &str) -> bool {
    if want.eq_ignore_ascii_case(cert_name) {
        return true;
    }
    match cert_name.strip_prefix("*.") {
        Some(suffix) => want
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => false,
    }
}

fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    state: SharedState,
    proxy: Arc<Proxy>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(%addr, error = %e, "gateway accept");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let current = state.read().unwrap_or_else(|e| e.into_inner()).clone();
            let result = match current.listener.kind {
                ListenerKind::Http => {
                    serve_http(TokioIo::new(stream), peer, state, proxy, None).await;
                    Ok(())
                }
                ListenerKind::Tls => serve_tls(stream, peer, &current, state, proxy).await,
                ListenerKind::Tcp => {
                    match current.servers.first().and_then(|s| s.plan.tcp.as_ref()) {
                        Some(route) => forward(stream, &route.backends, &[]).await,
                        None => Err(io::Error::other("no tcp route")),
                    }
                }
            };
            if let Err(e) = result {
                debug!(%addr, %peer, error = %e, "gateway connection ended");
            }
        });
    }
}

/// Serves HTTP on `io`: per request, the virtual host for its Host (among the listener's, or the
/// SNI-selected server's once TLS is terminated), then the proxy's request path.
/// `tls`: the connection's SNI, when TLS was terminated here.
async fn serve_http<I>(
    io: I,
    peer: SocketAddr,
    state: SharedState,
    proxy: Arc<Proxy>,
    tls: Option<Option<String>>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let scheme: &'static str = if tls.is_some() { "https" } else { "http" };
    let sni = tls.flatten();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let state = state.clone();
        let proxy = proxy.clone();
        let sni = sni.clone();
        async move {
            let current = state.read().unwrap_or_else(|e| e.into_inner()).clone();
            let vhosts: &[VirtualHost] = if scheme == "https" {
                match current.server(sni.as_deref()) {
                    Some(s) if s.plan.terminates_tls() => &s.plan.virtual_hosts,
                    _ => &[],
                }
            } else {
                &current.listener.virtual_hosts
            };
            let authority = req
                .headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
                .or_else(|| req.uri().authority().map(|a| a.to_string()))
                .unwrap_or_default();
            let Some(vhost) = plan::select_virtual_host(vhosts, &authority) else {
                return Ok::<_, std::convert::Infallible>(local_reply(StatusCode::NOT_FOUND, ""));
            };
            if vhost.https_redirect && scheme == "http" {
                return Ok(https_redirect(&authority, req.uri()));
            }
            let service = ProxyService {
                host: vhost.domain.clone(),
                port: current.listener.port,
                routes: vhost.routes.clone(),
            };
            let gateway = vhost.gateway.clone();
            let source = vhost.source.clone();
            Ok(proxy
                .serve_request(&service, Some(&source), peer, req, &gateway, scheme)
                .await)
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection(io, service).await {
        debug!(%peer, error = %e, "gateway HTTP connection ended");
    }
}

/// Envoy's `require_tls` answer: 301 to the same host (without its port) and path over https.
fn https_redirect(authority: &str, uri: &hyper::Uri) -> Response<ProxyBody> {
    let host = plan::authority_host(authority);
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    Response::builder()
        .status(StatusCode::MOVED_PERMANENTLY)
        .header(hyper::header::LOCATION, format!("https://{host}{path}"))
        .header("server", "steerd")
        .body(
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap_or_else(|_| local_reply(StatusCode::BAD_REQUEST, ""))
}

async fn serve_tls(
    mut stream: TcpStream,
    peer: SocketAddr,
    current: &PortState,
    state: SharedState,
    proxy: Arc<Proxy>,
) -> io::Result<()> {
    let mut hello = Vec::new();
    let sni = tokio::time::timeout(
        CLIENT_HELLO_TIMEOUT,
        read_client_hello(&mut stream, &mut hello),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no ClientHello"))??;
    let Some(server) = current.server(sni.as_deref()) else {
        debug!(%peer, sni = ?sni, port = current.listener.port, "no gateway server for this SNI");
        let _ = stream.write_all(&ALERT_UNRECOGNIZED_NAME).await;
        return Ok(());
    };
    let Some(tls) = &server.tls else {
        // PASSTHROUGH: the most specific tls route for the SNI.
        let sni = sni.unwrap_or_default();
        let route = server
            .plan
            .tls_routes
            .iter()
            .filter_map(|r| r.rank(&sni).map(|rank| (rank, r)))
            .fold(None, |best: Option<(usize, _)>, (rank, r)| match best {
                Some((b, _)) if b >= rank => best,
                _ => Some((rank, r)),
            });
        let Some((_, route)) = route else {
            debug!(%peer, %sni, "no tls route for this SNI");
            let _ = stream.write_all(&ALERT_UNRECOGNIZED_NAME).await;
            return Ok(());
        };
        return forward(stream, &route.backends, &hello).await;
    };
    let config = match tls {
        Ok(config) => config.clone(),
        Err(reason) => {
            let now = current.epoch.elapsed().as_secs() + 1;
            let last = server.last_refusal_log.load(Ordering::Relaxed);
            if last == 0 || now >= last + REFUSAL_LOG_INTERVAL.as_secs() {
                server.last_refusal_log.store(now, Ordering::Relaxed);
                warn!(
                    %peer,
                    sni = ?sni,
                    server = %server.plan.describe(),
                    error = %reason,
                    "TLS handshake refused: the gateway server has no usable certificate"
                );
            }
            let _ = stream.write_all(&ALERT_HANDSHAKE_FAILURE).await;
            return Ok(());
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tls_stream = acceptor.accept(Prefixed::new(hello, stream)).await?;
    if server.plan.protocol == "HTTPS" {
        serve_http(TokioIo::new(tls_stream), peer, state, proxy, Some(sni)).await;
        Ok(())
    } else {
        match &server.plan.tcp {
            Some(route) => forward(tls_stream, &route.backends, &[]).await,
            None => Ok(()),
        }
    }
}

/// Reads the first TLS handshake message (the ClientHello) into `buf` and returns its SNI.
async fn read_client_hello(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> io::Result<Option<String>> {
    let mut chunk = [0u8; 4096];
    loop {
        match parse_client_hello(buf) {
            Hello::Complete(sni) => return Ok(sni),
            Hello::Invalid(why) => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, why));
            }
            Hello::Partial => {}
        }
        if buf.len() >= MAX_CLIENT_HELLO {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "ClientHello too large",
            ));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before ClientHello",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Hello {
    Partial,
    Complete(Option<String>),
    Invalid(&'static str),
}

/// Parses a ClientHello spread over one or more handshake records at the start of `data`.
fn parse_client_hello(data: &[u8]) -> Hello {
    // Reassemble the handshake bytes from the records received so far.
    let mut handshake = Vec::new();
    let mut at = 0;
    while data.len() >= at + 5 {
        if data[at] != 0x16 {
            return Hello::Invalid("not a TLS handshake");
        }
        if data[at + 1] != 0x03 {
            return Hello::Invalid("not TLS");
        }
        let len = u16::from_be_bytes([data[at + 3], data[at + 4]]) as usize;
        let end = (at + 5 + len).min(data.len());
        handshake.extend_from_slice(&data[at + 5..end]);
        at += 5 + len;
    }
    if data.first().is_some_and(|b| *b != 0x16) {
        return Hello::Invalid("not a TLS handshake");
    }
    if handshake.len() < 4 {
        return Hello::Partial;
    }
    if handshake[0] != 0x01 {
        return Hello::Invalid("first handshake message is not a ClientHello");
    }
    let len = u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]) as usize;
    if handshake.len() < 4 + len {
        return Hello::Partial;
    }
    match client_hello_sni(&handshake[4..4 + len]) {
        Some(sni) => Hello::Complete(sni),
        None => Hello::Invalid("malformed ClientHello"),
    }
}

/// The server_name extension of a ClientHello body (None: malformed; Some(None): no SNI).
fn client_hello_sni(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(body);
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    let n = r.u8()? as usize;
    r.take(n)?; // session id
    let n = r.u16()? as usize;
    r.take(n)?; // cipher suites
    let n = r.u8()? as usize;
    r.take(n)?; // compression methods
    if r.0.is_empty() {
        return Some(None);
    }
    let n = r.u16()? as usize;
    let mut ext = Reader(r.take(n)?);
    while !ext.0.is_empty() {
        let kind = ext.u16()?;
        let n = ext.u16()? as usize;
        let data = ext.take(n)?;
        if kind != 0 {
            continue;
        }
        let mut names = Reader(data);
        let n = names.u16()? as usize;
        let mut names = Reader(names.take(n)?);
        while !names.0.is_empty() {
            let kind = names.u8()?;
            let n = names.u16()? as usize;
            let name = names.take(n)?;
            if kind == 0 {
                let name = std::str::from_utf8(name).ok()?;
                return Some(Some(name.trim_end_matches('.').to_ascii_lowercase()));
            }
        }
        return Some(None);
    }
    Some(None)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

/// A stream whose first bytes were already read (the ClientHello): they are read again first.
struct Prefixed {
    prefix: Vec<u8>,
    at: usize,
    inner: TcpStream,
}

impl Prefixed {
    fn new(prefix: Vec<u8>, inner: TcpStream) -> Self {
        Self {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Forwards `downstream` to one of `backends` (by weight; the next ones on connect failure),
/// sending `first` ahead of the stream's own bytes.
async fn forward<S>(mut downstream: S, backends: &[WeightedBackend], first: &[u8]) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if backends.is_empty() {
        return Err(io::Error::other("no backends"));
    }
    // Weighted order: the first pick by weight, then the rest as a fallback.
    let mut x = fastrand::f64();
    let mut start = backends.len() - 1;
    for (i, b) in backends.iter().enumerate() {
        if x < b.weight {
            start = i;
            break;
        }
        x -= b.weight;
    }
    let mut last = None;
    for i in 0..backends.len() {
        let addr = backends[(start + i) % backends.len()].addr;
        match connect(addr).await {
            Ok(mut upstream) => {
                upstream.write_all(first).await?;
                tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await?;
                return Ok(());
            }
            Err(e) => {
                debug!(%addr, error = %e, "gateway upstream connect failed");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no backends")))
}

/// An upstream connection with the proxy's mark, so the kernel never steers it.
async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_mark(PROXY_SOCKET_MARK)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timeout"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::gateway::{Pem, TlsPlan};
    use crate::model::istio::ServerTlsMode;

    fn server(credential: Credential) -> ServerPlan {
        ServerPlan {
            gateway: "default/gw".into(),
            index: 0,
            name: None,
            port: 443,
            protocol: "HTTPS".into(),
            hosts: vec!["a.example.com".into()],
            https_redirect: false,
            tls: Some(TlsPlan {
                mode: ServerTlsMode::Simple,
                credential,
                client_ca: None,
                subject_alt_names: vec![],
                min_version: None,
                max_version: None,
            }),
            virtual_hosts: vec![],
            tls_routes: vec![],
            tcp: None,
        }
    }

    fn cert(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn pem(s: &str) -> Pem {
        Pem(s.as_bytes().into())
    }

    #[test]
    fn certificates_load_from_secrets_and_files_and_errors_are_clear() {
        let (c, k) = cert("a.example.com");
        let ok = server(Credential::Secret {
            name: "default/a".into(),
            cert: pem(&c),
            key: pem(&k),
        });
        let (config, leaf) = server_config(&ok).expect("a valid pair loads");
        let not_after = not_after(&leaf).expect("rcgen's default validity");
        assert!(not_after.starts_with("4096-01-01"), "{not_after}");
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );

        let (_, other_key) = cert("b.example.com");
        let mismatch = server(Credential::Secret {
            name: "default/a".into(),
            cert: pem(&c),
            key: pem(&other_key),
        });
        let e = server_config(&mismatch).unwrap_err();
        assert!(e.starts_with("secret default/a: "), "{e}");

        let garbage = server(Credential::Secret {
            name: "default/g".into(),
            cert: pem("not a pem"),
            key: pem(&k),
        });
        assert!(
            server_config(&garbage)
                .unwrap_err()
                .contains("no CERTIFICATE")
        );

        let dir = tempfile::tempdir().unwrap();
        let (cp, kp) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cp, &c).unwrap();
        std::fs::write(&kp, &k).unwrap();
        let files = server(Credential::Files {
            cert: cp.clone(),
            key: kp,
        });
        assert!(server_config(&files).is_ok());
        let gone = server(Credential::Files {
            cert: dir.path().join("missing.pem"),
            key: cp,
        });
        let e = server_config(&gone).unwrap_err();
        assert!(
            e.contains("missing.pem") && e.contains("No such file"),
            "{e}"
        );

        let missing = server(Credential::Missing("secret default/x not found".into()));
        assert_eq!(
            server_config(&missing).unwrap_err(),
            "secret default/x not found"
        );
    }

    #[test]
    fn mutual_servers_verify_clients_with_their_ca() {
        let (c, k) = cert("a.example.com");
        let (ca, _) = cert("client-ca");
        let mut mutual = server(Credential::Secret {
            name: "default/a".into(),
            cert: pem(&c),
            key: pem(&k),
        });
        let tls = mutual.tls.as_mut().unwrap();
        tls.mode = ServerTlsMode::Mutual;
        tls.client_ca = Some(ClientCa::Secret {
            name: "default/a".into(),
            pem: pem(&ca),
        });
        assert!(server_config(&mutual).is_ok());
        mutual.tls.as_mut().unwrap().client_ca = Some(ClientCa::Secret {
            name: "default/a".into(),
            pem: pem("no pem here"),
        });
        assert!(
            server_config(&mutual)
                .unwrap_err()
                .contains("no CERTIFICATE in the client CA")
        );
        mutual.tls.as_mut().unwrap().client_ca = Some(ClientCa::Missing("no ca.crt".into()));
        assert_eq!(server_config(&mutual).unwrap_err(), "no ca.crt");
    }

    #[test]
    fn client_sans_match_exactly_by_type() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![
            "*.clients.example.com".to_string(),
            "10.0.0.7".to_string(),
        ])
        .unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
        ));
        let cert = params.self_signed(&key).unwrap();
        let names = certificate_sans(cert.der());
        assert_eq!(
            names,
            [
                ("DNS", "*.clients.example.com".to_string()),
                ("IP", "10.0.0.7".to_string()),
                ("URI", "spiffe://cluster.local/ns/a/sa/b".to_string()),
            ]
        );
        let ok = |allowed: &[&str]| {
            san_matches(
                &allowed.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                &names,
            )
        };
        assert!(ok(&["spiffe://cluster.local/ns/a/sa/b"]));
        assert!(!ok(&["spiffe://cluster.local/ns/a/sa/c"]));
        assert!(ok(&["x.clients.example.com"]));
        assert!(!ok(&["x.y.clients.example.com"]));
        assert!(ok(&["other", "10.0.0.7"]));
        assert!(!ok(&["10.0.0.8"]));
    }

    /// A real ClientHello, as rustls writes it.
    fn client_hello(sni: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), sni.to_string().try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn sni_is_read_from_client_hellos_in_any_fragmentation() {
        let hello = client_hello("Secure.Example.com");
        assert_eq!(
            parse_client_hello(&hello),
            Hello::Complete(Some("secure.example.com".into()))
        );
        for cut in [0, 3, 5, 9, hello.len() - 1] {
            assert_eq!(
                parse_client_hello(&hello[..cut]),
                Hello::Partial,
                "cut at {cut}"
            );
        }
        // The same handshake split over two records.
        let body = &hello[5..];
        let (a, b) = body.split_at(40);
        let mut split = Vec::new();
        for part in [a, b] {
            split.extend_from_slice(&[0x16, 0x03, 0x01]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        assert_eq!(
            parse_client_hello(&split),
            Hello::Complete(Some("secure.example.com".into()))
        );
        let ip_hello = client_hello("10.0.0.1");
        assert_eq!(
            parse_client_hello(&ip_hello),
            Hello::Complete(None),
            "no SNI for IPs"
        );
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            Hello::Invalid("not a TLS handshake")
        );
    }

    #[test]
    fn redirects_keep_path_and_query_and_drop_the_port() {
        let uri: hyper::Uri = "/a/b?x=1".parse().unwrap();
        let r = https_redirect("shop.example.com:8080", &uri);
        assert_eq!(r.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(
            r.headers()[hyper::header::LOCATION],
            "https://shop.example.com/a/b?x=1"
        );
    }
}
