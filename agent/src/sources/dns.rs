//! DNS for ServiceEntries with `resolution: DNS` / `DNS_ROUND_ROBIN`: a resolver task that
//! keeps the addresses of every name those entries need (see
//! [`crate::compile::registry::dns_names`]) current, the way Envoy's STRICT_DNS and LOGICAL_DNS
//! clusters do for a sidecar.
//!
//! - The agent loop hands over the set of names after every merge ([`DnsSource::want`]); new
//!   names are looked up at once (A and AAAA, with hickory-resolver), dropped ones are
//!   forgotten.
//! - Each name is looked up again when its answer's TTL runs out (at least [`MIN_TTL`], at most
//!   [`MAX_TTL`] apart).
//! - A lookup that fails (timeout, SERVFAIL, REFUSED, no route...) keeps the last good answer
//!   and is retried with exponential backoff up to [`MAX_BACKOFF`]; the failure is reported
//!   with the answer so the compiler can say the endpoints are stale. An authoritative "no such
//!   name" (NXDOMAIN) or "no records" answer is an answer, not a failure: like Envoy, the name
//!   then has no addresses.
//! - The task sends a [`Snapshot`] whose config holds only `resolved`, and only when an answer
//!   changed; the agent merges it with the other sources' snapshots before compiling.
//!
//! - Answers survive the agent: every change is written to a state file
//!   (`<--state-dir>/dns-answers.json`, [`StateFile`]), and a new agent seeds its names from it.
//!   A seeded answer serves at once, marked stale, and is looked up again at once; when DNS
//!   fails it is kept like a live answer. A missing or unreadable file starts empty.
//!
//! The nameserver is the system's (`/etc/resolv.conf`: servers, search list, ndots, timeout,
//! attempts), or `steerd run --dns-server IP[:PORT]`.

use super::Snapshot;
use crate::compile::registry::dns_names;
use crate::model::{ConfigSet, Resolved};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::RecordType;
use hickory_resolver::{Resolver, TokioResolver};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

/// An answer is looked up again after its TTL, but never sooner than this...
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// ...and never later than this, whatever the TTL.
pub const MAX_TTL: Duration = Duration::from_secs(300);
/// How long "no such name" / "no records" is believed when the server gave no negative TTL.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// First retry after a failed lookup; doubled after each further failure...
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// ...up to this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long the agent's first plan waits for a first answer (or failure) for every DNS name.
pub const STARTUP_GRACE: Duration = Duration::from_secs(10);
/// Per-query timeout with `--dns-server` (resolv.conf's own `timeout:` applies otherwise).
const SERVER_TIMEOUT: Duration = Duration::from_secs(2);

/// What one query (A or AAAA) for a name gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// These addresses, valid for the TTL.
    Addresses(Vec<IpAddr>, Duration),
    /// The server says there are none: the name does not exist (`nxdomain`) or has no record of
    /// this type. For the negative TTL, when the server gave one.
    NoRecords {
        nxdomain: bool,
        ttl: Option<Duration>,
    },
    /// No usable answer (timeout, SERVFAIL, REFUSED, network error, ...).
    Failed(String),
}

/// Both queries for one name.
#[derive(Debug, Clone, PartialEq)]
pub struct NameAnswer {
    pub v4: Answer,
    pub v6: Answer,
}

impl NameAnswer {
    fn failed(message: &str) -> NameAnswer {
        NameAnswer {
            v4: Answer::Failed(message.to_string()),
            v6: Answer::Failed(message.to_string()),
        }
    }
}

/// Parses `--dns-server`: `IP:PORT`, `[IPv6]:PORT`, or a bare IP (port 53).
pub fn parse_server(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{s:?} is not IP, IP:PORT or [IPv6]:PORT"))
}

/// A hickory resolver for `server` (UDP, TCP for truncated answers), or for the system's
/// configuration when `None`.
pub fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let builder = match server {
        Some(addr) => {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for c in &mut ns.connections {
                c.port = addr.port();
            }
            let mut builder = Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            );
            builder.options_mut().timeout = SERVER_TIMEOUT;
            builder
        }
        None => TokioResolver::builder_tokio()
            .map_err(|e| format!("reading the system DNS configuration: {e}"))?,
    };
    builder
        .build()
        .map_err(|e| format!("building the DNS resolver: {e}"))
}

/// Looks a name up (A and AAAA at once), bypassing hickory's cache: the caller schedules
/// lookups by TTL itself, so every lookup must ask the server.
pub async fn lookup(resolver: &TokioResolver, name: &str) -> NameAnswer {
    resolver.clear_lookup_cache(name, RecordType::A);
    resolver.clear_lookup_cache(name, RecordType::AAAA);
    let (v4, v6) = tokio::join!(
        resolver.lookup(name, RecordType::A),
        resolver.lookup(name, RecordType::AAAA)
    );
    NameAnswer {
        v4: answer(v4),
        v6: answer(v6),
    }
}

fn answer(result: Result<Lookup, NetError>) -> Answer {
    match result {
        Ok(lookup) => {
            let ttl = lookup
                .valid_until()
                .saturating_duration_since(std::time::Instant::now());
            let ips: Vec<IpAddr> = lookup
                .answers()
                .iter()
                .filter_map(|r| r.data.ip_addr())
                .collect();
            if ips.is_empty() {
                Answer::NoRecords {
                    nxdomain: false,
                    ttl: Some(ttl),
                }
            } else {
                Answer::Addresses(ips, ttl)
            }
        }
        Err(NetError::Dns(DnsError::NoRecordsFound(no))) => Answer::NoRecords {
            nxdomain: no.response_code == hickory_resolver::proto::op::ResponseCode::NXDomain,
            ttl: no.negative_ttl.map(|s| Duration::from_secs(s.into())),
        },
        Err(e) => Answer::Failed(e.to_string()),
    }
}

/// Why a seeded answer is reported stale until the first lookup confirms or replaces it.
pub const SEEDED: &str = "answer saved by the previous agent, not yet looked up again";

/// One name's last good answer, as saved between agents.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedAnswer {
    /// A records, then AAAA records.
    pub addresses: Vec<IpAddr>,
    /// When the answer's TTL ran (or runs) out, seconds since the Unix epoch.
    pub expires_unix: u64,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct StateContent {
    version: u32,
    names: BTreeMap<String, SavedAnswer>,
}

const STATE_VERSION: u32 = 1;

/// The file that keeps the last answers across agent restarts. Regular files cannot live in
/// bpffs, hence a directory of its own (`--state-dir`, default `/run/steerd`).
#[derive(Debug, Clone)]
pub struct StateFile {
    pub path: std::path::PathBuf,
}

impl StateFile {
    pub const FILE_NAME: &str = "dns-answers.json";

    pub fn in_dir(dir: &std::path::Path) -> StateFile {
        StateFile {
            path: dir.join(Self::FILE_NAME),
        }
    }

    /// The saved answers; a missing file is an empty state, an unreadable or corrupt one too
    /// (with a warning: the agent then waits for DNS as on a first start).
    pub fn load(&self) -> BTreeMap<String, SavedAnswer> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "cannot read the saved DNS answers; starting without them");
                return BTreeMap::new();
            }
        };
        match serde_json::from_str::<StateContent>(&text) {
            Ok(c) if c.version == STATE_VERSION => c.names,
            Ok(c) => {
                warn!(path = %self.path.display(), version = c.version, "saved DNS answers have an unknown version; starting without them");
                BTreeMap::new()
            }
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "saved DNS answers are corrupt; starting without them");
                BTreeMap::new()
            }
        }
    }

    /// Replaces the file atomically (a crash leaves the old or the new one, never half).
    pub fn save(&self, names: &BTreeMap<String, SavedAnswer>) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let content = StateContent {
            version: STATE_VERSION,
            names: names.clone(),
        };
        let text = serde_json::to_vec_pretty(&content).map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The agent loop's handle on the resolver task.
pub struct DnsSource {
    names: watch::Sender<BTreeSet<String>>,
}

impl DnsSource {
    /// Starts the resolver task; it sends its answers to `out`. The resolver itself is built
    /// when the first name is wanted (a node without DNS ServiceEntries needs no resolv.conf).
    pub fn spawn(
        server: Option<SocketAddr>,
        state: Option<StateFile>,
        out: mpsc::Sender<Snapshot>,
    ) -> DnsSource {
        let (names, wanted) = watch::channel(BTreeSet::new());
        tokio::spawn(async move {
            let mut built: Option<Arc<Result<TokioResolver, String>>> = None;
            let lookup_fn = move |name: String| {
                let r = built
                    .get_or_insert_with(|| {
                        let r = resolver(server);
                        match &r {
                            Ok(_) => info!(
                                server = %server.map_or("system (resolv.conf)".into(), |s| s.to_string()),
                                "DNS resolver ready"
                            ),
                            Err(e) => warn!(error = %e, "no DNS resolver; DNS ServiceEntries have no endpoints"),
                        }
                        Arc::new(r)
                    })
                    .clone();
                async move {
                    match &*r {
                        Ok(resolver) => lookup(resolver, &name).await,
                        Err(e) => NameAnswer::failed(e),
                    }
                }
            };
            let seed = state.as_ref().map(StateFile::load).unwrap_or_default();
            if !seed.is_empty() {
                info!(
                    names = seed.len(),
                    "DNS answers of the previous agent loaded; looking them up again"
                );
            }
            let mut save_failed = false;
            let save = move |names: &BTreeMap<String, SavedAnswer>| {
                let Some(state) = &state else { return };
                match state.save(names) {
                    Ok(()) => save_failed = false,
                    Err(e) if !save_failed => {
                        save_failed = true;
                        warn!(path = %state.path.display(), error = %e, "cannot save the DNS answers; a restarted agent will wait for DNS");
                    }
                    Err(_) => {}
                }
            };
            run_with_state(lookup_fn, wanted, out, seed, save).await;
        });
        DnsSource { names }
    }

    /// Whether a name `config` needs has no answer yet (not even a failed lookup).
    pub fn waiting(&self, config: &ConfigSet) -> bool {
        dns_names(config)
            .iter()
            .any(|name| !config.resolved.contains_key(name))
    }

    /// Tells the resolver which names `config` needs (no-op when they did not change).
    pub fn want(&self, config: &ConfigSet) {
        let names = dns_names(config);
        self.names.send_if_modified(|current| {
            if *current == names {
                false
            } else {
                *current = names;
                true
            }
        });
    }
}

/// One name's state.
#[derive(Debug)]
struct Entry {
    v4: Vec<IpAddr>,
    v6: Vec<IpAddr>,
    /// Why the current answer is stale or empty (the first error of a failure streak).
    error: Option<String>,
    /// Consecutive failed lookups.
    failures: u32,
    /// When to look it up next.
    due: Instant,
    in_flight: bool,
    /// At least one lookup has finished: the name is published.
    answered: bool,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            v4: Vec::new(),
            v6: Vec::new(),
            error: None,
            failures: 0,
            due: now,
            in_flight: false,
            answered: false,
        }
    }

    /// An entry from a saved answer: served (stale) until a lookup, which is due at once.
    fn seeded(saved: &SavedAnswer, now: Instant) -> Entry {
        let (v4, v6) = saved.addresses.iter().partition(|ip| ip.is_ipv4());
        Entry {
            v4,
            v6,
            error: Some(SEEDED.to_string()),
            // A failing first lookup then reports its own error (see `apply`).
            failures: 0,
            due: now,
            in_flight: false,
            answered: true,
        }
    }

    fn resolved(&self) -> Resolved {
        Resolved {
            addresses: self.v4.iter().chain(&self.v6).copied().collect(),
            error: self.error.clone(),
        }
    }

    /// Takes in one lookup's answer and schedules the next lookup.
    fn apply(&mut self, answer: NameAnswer, now: Instant) {
        let mut failure = None;
        let mut ttl: Option<Duration> = None;
        let mut nxdomain = false;
        for (a, slot) in [(answer.v4, &mut self.v4), (answer.v6, &mut self.v6)] {
            match a {
                Answer::Addresses(ips, t) => {
                    *slot = ips;
                    ttl = Some(ttl.map_or(t, |m| m.min(t)));
                }
                Answer::NoRecords {
                    nxdomain: nx,
                    ttl: t,
                } => {
                    slot.clear();
                    nxdomain |= nx;
                    let t = t.unwrap_or(NEGATIVE_TTL);
                    ttl = Some(ttl.map_or(t, |m| m.min(t)));
                }
                // The family keeps its last good addresses.
                Answer::Failed(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        self.answered = true;
        if let Some(e) = failure {
            self.failures += 1;
            if self.failures == 1 {
                self.error = Some(e);
            }
            let backoff = FIRST_BACKOFF.saturating_mul(1 << (self.failures - 1).min(16));
            self.due = now + backoff.min(MAX_BACKOFF);
        } else {
            self.failures = 0;
            self.error = match (self.v4.is_empty() && self.v6.is_empty(), nxdomain) {
                (false, _) => None,
                (true, true) => Some("no such name (NXDOMAIN)".into()),
                (true, false) => Some("no A or AAAA records".into()),
            };
            self.due = now + ttl.unwrap_or(MIN_TTL).clamp(MIN_TTL, MAX_TTL);
        }
    }
}

/// The resolver loop, with the lookup as a parameter (tests use a scripted one). Ends when the
/// agent drops its [`DnsSource`] or stops listening.
pub async fn run<L, F>(
    lookup: L,
    wanted: watch::Receiver<BTreeSet<String>>,
    out: mpsc::Sender<Snapshot>,
) where
    L: FnMut(String) -> F,
    F: Future<Output = NameAnswer> + Send + 'static,
{
    run_with_state(lookup, wanted, out, BTreeMap::new(), |_| {}).await
}

/// [`run`], seeded with saved answers (used for names when they are first wanted) and handing
/// every changed set of answers to `save`.
pub async fn run_with_state<L, F, S>(
    mut lookup: L,
    mut wanted: watch::Receiver<BTreeSet<String>>,
    out: mpsc::Sender<Snapshot>,
    mut seed: BTreeMap<String, SavedAnswer>,
    mut save: S,
) where
    L: FnMut(String) -> F,
    F: Future<Output = NameAnswer> + Send + 'static,
    S: FnMut(&BTreeMap<String, SavedAnswer>),
{
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    // What was last saved, with each name's expiry.
    let mut saved: BTreeMap<String, SavedAnswer> = BTreeMap::new();
    // Seeded answers keep their expiry until a lookup gives a new one.
    let seed_expiry: BTreeMap<String, u64> = seed
        .iter()
        .map(|(name, s)| (name.clone(), s.expires_unix))
        .collect();
    let mut sent: BTreeMap<String, Resolved> = BTreeMap::new();
    let mut lookups: FuturesUnordered<BoxFuture<'static, (String, NameAnswer)>> =
        FuturesUnordered::new();
    let mut names = wanted.borrow_and_update().clone();
    loop {
        let now = Instant::now();
        entries.retain(|name, _| names.contains(name));
        for name in &names {
            entries
                .entry(name.clone())
                .or_insert_with(|| match seed.remove(name) {
                    Some(saved) => Entry::seeded(&saved, now),
                    None => Entry::new(now),
                });
        }
        for (name, entry) in entries.iter_mut() {
            if !entry.in_flight && entry.due <= now {
                entry.in_flight = true;
                let (name, query) = (name.clone(), lookup(name.clone()));
                lookups.push(Box::pin(async move { (name, query.await) }));
            }
        }
        let view: BTreeMap<String, Resolved> = entries
            .iter()
            .filter(|(_, e)| e.answered)
            .map(|(name, e)| (name.clone(), e.resolved()))
            .collect();
        if view != sent {
            let snapshot = Snapshot {
                config: ConfigSet {
                    resolved: view.clone(),
                    ..ConfigSet::default()
                },
                errors: Vec::new(),
            };
            if out.send(snapshot).await.is_err() {
                return;
            }
            sent = view;
            // The last good answers: what a restarted agent starts from. Names not wanted now
            // are dropped, and so are the saved answers the seed still holds for them.
            let wall = unix_now();
            let good: BTreeMap<String, SavedAnswer> = entries
                .iter()
                .filter(|(_, e)| e.answered && !(e.v4.is_empty() && e.v6.is_empty()))
                .map(|(name, e)| {
                    let remaining = e.due.saturating_duration_since(Instant::now()).as_secs();
                    let previous = saved
                        .get(name)
                        .map(|s| s.expires_unix)
                        .or_else(|| seed_expiry.get(name).copied());
                    let expires_unix = match previous {
                        // A stale or failing answer keeps the expiry it had.
                        Some(t) if e.error.is_some() => t,
                        _ => wall + remaining,
                    };
                    let addresses = e.v4.iter().chain(&e.v6).copied().collect();
                    (
                        name.clone(),
                        SavedAnswer {
                            addresses,
                            expires_unix,
                        },
                    )
                })
                .collect();
            if good != saved {
                save(&good);
                saved = good;
            }
        }
        let next_due = entries
            .values()
            .filter(|e| !e.in_flight)
            .map(|e| e.due)
            .min();
        tokio::select! {
            changed = wanted.changed() => {
                if changed.is_err() {
                    return;
                }
                names = wanted.borrow_and_update().clone();
            }
            Some(first) = lookups.next(), if !lookups.is_empty() => {
                // Every lookup that is done goes into one snapshot.
                let mut done = vec![first];
                while let Some(Some(more)) = lookups.next().now_or_never() {
                    done.push(more);
                }
                for (name, answer) in done {
                    // A name dropped while its lookup ran is simply not there any more.
                    if let Some(entry) = entries.get_mut(&name) {
                        let before = entry.resolved();
                        entry.in_flight = false;
                        entry.apply(answer, Instant::now());
                        log_change(&name, &before, &entry.resolved());
                    }
                }
            }
            _ = tokio::time::sleep_until(next_due.unwrap_or(now)), if next_due.is_some() => {}
        }
    }
}

fn log_change(name: &str, before: &Resolved, after: &Resolved) {
    let addresses: Vec<String> = after.addresses.iter().map(IpAddr::to_string).collect();
    match (&before.error, &after.error) {
        (_, Some(e)) if before.error.as_ref() != Some(e) => {
            if after.addresses.is_empty() {
                warn!(name, error = %e, "DNS name has no addresses");
            } else {
                warn!(name, error = %e, kept = ?addresses, "DNS lookup failed; keeping the last answer");
            }
        }
        (Some(_), None) => info!(name, addresses = ?addresses, "DNS lookup succeeded again"),
        _ if before.addresses != after.addresses => {
            info!(name, addresses = ?addresses, "DNS answer changed")
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ok(ips: &[&str], ttl: u64) -> Answer {
        Answer::Addresses(
            ips.iter().map(|s| ip(s)).collect(),
            Duration::from_secs(ttl),
        )
    }

    fn none() -> Answer {
        Answer::NoRecords {
            nxdomain: false,
            ttl: Some(Duration::from_secs(10)),
        }
    }

    /// A scripted DNS: the current answer per name, and when each lookup happened (seconds
    /// since the test began, in the paused test clock).
    #[derive(Clone)]
    struct Script {
        start: Instant,
        answers: Arc<Mutex<HashMap<String, NameAnswer>>>,
        lookups: Arc<Mutex<Vec<(String, u64)>>>,
    }

    impl Script {
        fn new() -> Script {
            Script {
                start: Instant::now(),
                answers: Arc::default(),
                lookups: Arc::default(),
            }
        }

        fn set(&self, name: &str, v4: Answer, v6: Answer) {
            self.answers
                .lock()
                .unwrap()
                .insert(name.into(), NameAnswer { v4, v6 });
        }

        fn times(&self, name: &str) -> Vec<u64> {
            self.lookups
                .lock()
                .unwrap()
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, t)| *t)
                .collect()
        }

        /// Starts the loop over this script; returns the names sender and the snapshots.
        fn start(
            &self,
            names: &[&str],
        ) -> (watch::Sender<BTreeSet<String>>, mpsc::Receiver<Snapshot>) {
            let (names_tx, names_rx) =
                watch::channel(names.iter().map(|s| s.to_string()).collect());
            let (tx, rx) = mpsc::channel(16);
            let script = self.clone();
            tokio::spawn(run(
                move |name: String| {
                    let elapsed = (Instant::now() - script.start).as_secs();
                    script.lookups.lock().unwrap().push((name.clone(), elapsed));
                    let answer = script
                        .answers
                        .lock()
                        .unwrap()
                        .get(&name)
                        .cloned()
                        .unwrap_or_else(|| NameAnswer::failed("unscripted"));
                    async move { answer }
                },
                names_rx,
                tx,
            ));
            (names_tx, rx)
        }
    }

    /// The next snapshot within `secs` (virtual) seconds, as its `resolved` map.
    async fn next(
        rx: &mut mpsc::Receiver<Snapshot>,
        secs: u64,
    ) -> Option<BTreeMap<String, Resolved>> {
        tokio::time::timeout(Duration::from_secs(secs), rx.recv())
            .await
            .ok()
            .flatten()
            .map(|s| {
                assert!(s.config.is_empty(), "only answers: {:?}", s.config);
                s.config.resolved
            })
    }

    fn resolved(ips: &[&str], error: Option<&str>) -> Resolved {
        Resolved {
            addresses: ips.iter().map(|s| ip(s)).collect(),
            error: error.map(str::to_string),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn follows_ttls_and_sends_only_changes() {
        let script = Script::new();
        script.set("db.example.test", ok(&["10.0.0.1"], 5), none());
        let (_names, mut rx) = script.start(&["db.example.test"]);
        let first = next(&mut rx, 1).await.expect("first answer");
        assert_eq!(first["db.example.test"], resolved(&["10.0.0.1"], None));
        // Same answer at 5 s and 10 s: looked up again, nothing sent.
        assert_eq!(next(&mut rx, 12).await, None);
        assert_eq!(script.times("db.example.test"), vec![0, 5, 10]);
        // A new answer (with both families) is sent after the next TTL.
        script.set(
            "db.example.test",
            ok(&["10.0.0.2", "10.0.0.3"], 300),
            ok(&["fd00::2"], 100),
        );
        let changed = next(&mut rx, 10).await.expect("changed answer");
        assert_eq!(
            changed["db.example.test"],
            resolved(&["10.0.0.2", "10.0.0.3", "fd00::2"], None)
        );
        // The shorter TTL of the two families counts.
        assert_eq!(next(&mut rx, 101).await, None);
        assert_eq!(script.times("db.example.test"), vec![0, 5, 10, 15, 115]);
    }

    #[tokio::test(start_paused = true)]
    async fn ttls_are_clamped() {
        let script = Script::new();
        script.set("zero.test", ok(&["10.0.0.1"], 0), ok(&["fd00::1"], 0));
        script.set(
            "long.test",
            ok(&["10.0.0.2"], 86_400),
            ok(&["fd00::2"], 3_600),
        );
        let (_names, mut rx) = script.start(&["zero.test", "long.test"]);
        assert!(next(&mut rx, 1).await.is_some());
        assert_eq!(next(&mut rx, 601).await, None);
        let zero = script.times("zero.test").len();
        assert!((600..=602).contains(&zero), "once per second: {zero}");
        assert_eq!(script.times("long.test"), vec![0, 300, 600]);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_keep_the_last_answer_and_back_off() {
        let script = Script::new();
        let name = "db.example.test";
        script.set(name, ok(&["10.0.0.1"], 2), none());
        let (_names, mut rx) = script.start(&[name]);
        assert_eq!(
            next(&mut rx, 1).await.unwrap()[name],
            resolved(&["10.0.0.1"], None)
        );
        script.set(
            name,
            Answer::Failed("request timed out".into()),
            Answer::Failed("request timed out".into()),
        );
        // The failure is reported once, with the last good addresses.
        assert_eq!(
            next(&mut rx, 3).await.unwrap()[name],
            resolved(&["10.0.0.1"], Some("request timed out"))
        );
        script.set(
            name,
            Answer::Failed("error response: SERVFAIL".into()),
            none(),
        );
        assert_eq!(next(&mut rx, 60).await, None, "still failing: nothing new");
        // Retries after 1, 2, 4, 8, 16, then every 30 s.
        assert_eq!(script.times(name), vec![0, 2, 3, 5, 9, 17, 33]);
        script.set(name, ok(&["10.0.0.9"], 60), none());
        assert_eq!(
            next(&mut rx, 31).await.unwrap()[name],
            resolved(&["10.0.0.9"], None)
        );
        assert_eq!(*script.times(name).last().unwrap(), 63);
    }

    #[tokio::test(start_paused = true)]
    async fn saved_answers_serve_at_once_stay_while_dns_fails_and_are_saved_again() {
        let name = "db.example.test";
        let script = Script::new();
        script.set(
            name,
            Answer::Failed("request timed out".into()),
            Answer::Failed("request timed out".into()),
        );
        let seed: BTreeMap<String, SavedAnswer> = [
            (
                name.to_string(),
                SavedAnswer {
                    addresses: vec![ip("10.0.0.1"), ip("fd00::1")],
                    expires_unix: 1_000,
                },
            ),
            // Not wanted by this configuration: neither served nor saved again.
            (
                "gone.example.test".to_string(),
                SavedAnswer {
                    addresses: vec![ip("10.0.0.2")],
                    expires_unix: 1_000,
                },
            ),
        ]
        .into();
        let saves: Arc<Mutex<Vec<BTreeMap<String, SavedAnswer>>>> = Arc::default();
        let (names_tx, names_rx) = watch::channel([name.to_string()].into());
        let (tx, mut rx) = mpsc::channel(16);
        let (script2, saves2) = (script.clone(), saves.clone());
        tokio::spawn(run_with_state(
            move |n: String| {
                let answer = script2.answers.lock().unwrap().get(&n).cloned().unwrap();
                async move { answer }
            },
            names_rx,
            tx,
            seed,
            move |names: &BTreeMap<String, SavedAnswer>| saves2.lock().unwrap().push(names.clone()),
        ));
        // Before any lookup: the saved answer, stale.
        let first = next(&mut rx, 1).await.unwrap();
        assert_eq!(
            first,
            [(
                name.to_string(),
                resolved(&["10.0.0.1", "fd00::1"], Some(SEEDED))
            )]
            .into()
        );
        // DNS is down: the answer stays, with the failure.
        assert_eq!(
            next(&mut rx, 1).await.unwrap()[name],
            resolved(&["10.0.0.1", "fd00::1"], Some("request timed out"))
        );
        // What is saved is the same answer with its old expiry.
        let saved = saves.lock().unwrap().last().cloned().unwrap();
        assert_eq!(saved.keys().collect::<Vec<_>>(), [name]);
        assert_eq!(saved[name].expires_unix, 1_000);
        // A new answer replaces it, and is saved with its own expiry.
        script.set(name, ok(&["10.0.0.9"], 60), none());
        assert_eq!(
            next(&mut rx, 2).await.unwrap()[name],
            resolved(&["10.0.0.9"], None)
        );
        let saved = saves.lock().unwrap().last().cloned().unwrap();
        assert_eq!(saved[name].addresses, vec![ip("10.0.0.9")]);
        assert!(saved[name].expires_unix > 1_000);
        drop(names_tx);
    }

    #[test]
    fn the_state_file_round_trips_and_a_corrupt_one_is_empty() {
        let dir = std::env::temp_dir().join(format!("steerd-dns-state-{}", std::process::id()));
        let state = StateFile::in_dir(&dir.join("sub"));
        assert!(state.load().is_empty(), "missing file");
        let names: BTreeMap<String, SavedAnswer> = [(
            "db.example.test".to_string(),
            SavedAnswer {
                addresses: vec![ip("10.0.0.1"), ip("fd00::1")],
                expires_unix: 42,
            },
        )]
        .into();
        state.save(&names).unwrap();
        assert_eq!(state.load(), names);
        std::fs::write(&state.path, "{\"version\": 1, \"names\": {\"x\": ").unwrap();
        assert!(state.load().is_empty(), "corrupt file");
        std::fs::write(&state.path, "{\"version\": 99, \"names\": {}}").unwrap();
        assert!(state.load().is_empty(), "unknown version");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_family_keeps_its_addresses() {
        let script = Script::new();
        let name = "dual.test";
        script.set(name, ok(&["10.0.0.1"], 5), ok(&["fd00::1"], 5));
        let (_names, mut rx) = script.start(&[name]);
        assert!(next(&mut rx, 1).await.is_some());
        script.set(
            name,
            ok(&["10.0.0.2"], 5),
            Answer::Failed("timed out".into()),
        );
        assert_eq!(
            next(&mut rx, 6).await.unwrap()[name],
            resolved(&["10.0.0.2", "fd00::1"], Some("timed out"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn nxdomain_is_an_answer_not_a_failure() {
        let script = Script::new();
        let name = "gone.test";
        script.set(name, ok(&["10.0.0.1"], 5), none());
        let (_names, mut rx) = script.start(&[name]);
        assert!(next(&mut rx, 1).await.is_some());
        let nx = Answer::NoRecords {
            nxdomain: true,
            ttl: None,
        };
        script.set(name, nx.clone(), nx);
        assert_eq!(
            next(&mut rx, 6).await.unwrap()[name],
            resolved(&[], Some("no such name (NXDOMAIN)"))
        );
        // Without a negative TTL from the server, NEGATIVE_TTL.
        assert_eq!(next(&mut rx, 31).await, None);
        assert_eq!(script.times(name), vec![0, 5, 35]);
        script.set(name, none(), none());
        assert_eq!(
            next(&mut rx, 31).await.unwrap()[name],
            resolved(&[], Some("no A or AAAA records"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn names_come_and_go_with_the_config() {
        let script = Script::new();
        script.set("a.test", ok(&["10.0.0.1"], 5), none());
        script.set("b.test", ok(&["10.0.0.2"], 5), none());
        let (names, mut rx) = script.start(&["a.test"]);
        let first = next(&mut rx, 1).await.unwrap();
        assert_eq!(first.keys().collect::<Vec<_>>(), ["a.test"]);
        names
            .send(["a.test", "b.test"].map(String::from).into())
            .unwrap();
        let both = next(&mut rx, 1).await.unwrap();
        assert_eq!(both.keys().collect::<Vec<_>>(), ["a.test", "b.test"]);
        names.send(["b.test".to_string()].into()).unwrap();
        let only_b = next(&mut rx, 1).await.unwrap();
        assert_eq!(only_b.keys().collect::<Vec<_>>(), ["b.test"]);
        assert_eq!(next(&mut rx, 7).await, None);
        assert_eq!(
            script.times("a.test"),
            vec![0],
            "dropped names are not looked up"
        );
        // Dropping the sender (the agent stopping) ends the task.
        drop(names);
        assert!(rx.recv().await.is_none());
    }

    #[test]
    fn dns_server_flag() {
        assert_eq!(
            parse_server("127.0.0.1:5353").unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        );
        assert_eq!(
            parse_server("10.96.0.10").unwrap(),
            "10.96.0.10:53".parse().unwrap()
        );
        assert_eq!(
            parse_server("[fd00::10]:5353").unwrap(),
            "[fd00::10]:5353".parse().unwrap()
        );
        assert_eq!(parse_server("fd00::10").unwrap().port(), 53);
        assert!(parse_server("dns.example").is_err());
    }

    /// A minimal authoritative DNS server on 127.0.0.1 (UDP): A/AAAA from a table, NXDOMAIN
    /// for other names, or silence.
    struct TestServer {
        addr: SocketAddr,
        zone: Arc<Mutex<HashMap<String, Vec<IpAddr>>>>,
        silent: Arc<AtomicBool>,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl TestServer {
        fn start(ttl: u32) -> TestServer {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let addr = socket.local_addr().unwrap();
            let zone: Arc<Mutex<HashMap<String, Vec<IpAddr>>>> = Arc::default();
            let silent = Arc::new(AtomicBool::new(false));
            let stop = Arc::new(AtomicBool::new(false));
            let (z, q, s) = (zone.clone(), silent.clone(), stop.clone());
            let thread = std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !s.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    if q.load(Ordering::Relaxed) {
                        continue;
                    }
                    if let Some(reply) = reply(&buf[..n], &z.lock().unwrap(), ttl) {
                        let _ = socket.send_to(&reply, from);
                    }
                }
            });
            TestServer {
                addr,
                zone,
                silent,
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// The answer to one query, or `None` for what is not a single-question query.
    fn reply(query: &[u8], zone: &HashMap<String, Vec<IpAddr>>, ttl: u32) -> Option<Vec<u8>> {
        if query.len() < 12 || query[2] & 0x80 != 0 || query[4..6] != [0, 1] {
            return None;
        }
        let mut labels = Vec::new();
        let mut i = 12;
        loop {
            let len = *query.get(i)? as usize;
            i += 1;
            if len == 0 {
                break;
            }
            if len & 0xc0 != 0 {
                return None;
            }
            labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_ascii_lowercase());
            i += len;
        }
        let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
        let question = query.get(12..i + 4)?;
        let (rcode, ips): (u8, Vec<IpAddr>) = match zone.get(&labels.join(".")) {
            None => (3, Vec::new()),
            Some(ips) => (
                0,
                ips.iter()
                    .filter(|ip| match qtype {
                        1 => ip.is_ipv4(),
                        28 => ip.is_ipv6(),
                        _ => false,
                    })
                    .copied()
                    .collect(),
            ),
        };
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(&query[0..2]);
        out.push(0x84 | (query[2] & 0x01)); // QR, AA, RD as asked
        out.push(0x80 | rcode); // RA
        out.extend_from_slice(&[0, 1]);
        out.extend_from_slice(&(ips.len() as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(question);
        for ip in ips {
            out.extend_from_slice(&[0xc0, 12]);
            let (kind, data) = match ip {
                IpAddr::V4(v4) => (1u16, v4.octets().to_vec()),
                IpAddr::V6(v6) => (28u16, v6.octets().to_vec()),
            };
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&[0, 1]);
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(&data);
        }
        Some(out)
    }

    /// hickory against a real server: answers with their TTL, "no AAAA", NXDOMAIN, silence.
    #[tokio::test]
    async fn hickory_lookups_against_a_local_server() {
        let server = TestServer::start(7);
        server.zone.lock().unwrap().insert(
            "db-1.example.test".into(),
            vec![ip("10.244.1.2"), ip("10.244.1.3")],
        );
        server.zone.lock().unwrap().insert(
            "dual.example.test".into(),
            vec![ip("10.244.2.2"), ip("fd00::2")],
        );
        let r = resolver(Some(server.addr)).unwrap();

        let a = lookup(&r, "db-1.example.test").await;
        let Answer::Addresses(ips, ttl) = &a.v4 else {
            panic!("{a:?}")
        };
        assert_eq!(ips, &[ip("10.244.1.2"), ip("10.244.1.3")]);
        assert!(ttl.as_secs() <= 7 && ttl.as_secs() >= 5, "{ttl:?}");
        assert!(
            matches!(
                a.v6,
                Answer::NoRecords {
                    nxdomain: false,
                    ..
                }
            ),
            "{a:?}"
        );

        let dual = lookup(&r, "DUAL.example.test.").await;
        assert!(matches!(&dual.v4, Answer::Addresses(ips, _) if ips == &[ip("10.244.2.2")]));
        assert!(matches!(&dual.v6, Answer::Addresses(ips, _) if ips == &[ip("fd00::2")]));

        let missing = lookup(&r, "nope.example.test").await;
        assert!(
            matches!(missing.v4, Answer::NoRecords { nxdomain: true, .. }),
            "{missing:?}"
        );

        // Answers change at once (no cache between our lookups).
        server
            .zone
            .lock()
            .unwrap()
            .insert("db-1.example.test".into(), vec![ip("10.244.1.9")]);
        let changed = lookup(&r, "db-1.example.test").await;
        assert!(matches!(&changed.v4, Answer::Addresses(ips, _) if ips == &[ip("10.244.1.9")]));

        server.silent.store(true, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let silent = lookup(&r, "db-1.example.test").await;
        assert!(matches!(silent.v4, Answer::Failed(_)), "{silent:?}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{:?}",
            started.elapsed()
        );
    }
}
