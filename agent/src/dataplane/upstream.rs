//! Per-cluster runtime state of the L7 proxy: load balancing, connection-pool limits, outlier
//! detection and upstream connections, kept across plan updates (keyed by cluster name and
//! endpoint address) so a config change does not reset ejections, in-flight counts or pooled
//! connections.
//!
//! Every request looks its cluster and endpoint up here, so reads take no lock: the maps are
//! swapped whole (copy on insert, which happens once per new cluster or endpoint).

use crate::compile::http::{
    Client, Cluster, HashKey, LoadBalancer, Locality, LocalityPolicy, OutlierPolicy, Warmup,
};
use crate::dataplane::pool::{EndpointPool, TlsOrigination};
use arc_swap::ArcSwap;
use hashbrown::HashMap;
use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hash};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Up to this many candidate endpoints, LEAST_REQUEST compares all of them; beyond, two random
/// ones (Envoy's power of two choices). With few endpoints two random picks are often the same
/// busy one, while checking a handful of counters costs next to nothing.
const LEAST_REQUEST_FULL_SCAN: usize = 8;

/// What the load balancer needs from the request: the consistent-hash key, and where the
/// client is.
#[derive(Debug, Default)]
pub struct HashInput<'a> {
    /// This node's locality, for locality load balancing (None: not configured).
    pub client_locality: Option<&'a Locality>,
    /// The labels of the workload that sent the request, for `failoverPriority` (None: not a
    /// known Pod).
    pub client_labels: Option<&'a crate::model::Labels>,
    pub header: Option<&'a str>,
    pub cookie: Option<&'a str>,
    pub source_ip: Option<std::net::IpAddr>,
    pub query_param: Option<&'a str>,
}

/// One endpoint's state within one cluster.
#[derive(Debug, Default)]
pub struct EndpointState {
    in_flight: AtomicU32,
    /// Consecutive 5xx / gateway errors (reset by a success).
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Times ejected, for the ejection time backoff (baseEjectionTime × ejections).
    ejections: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
    /// Upstream connections to this endpoint for this cluster.
    pub pool: Arc<EndpointPool>,
}

impl EndpointState {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until
            .lock()
            .expect("ejection lock")
            .is_some_and(|t| t > now)
    }
}

/// A lock-free read-mostly map: readers load a snapshot, writers copy it (rare: once per new
/// key).
#[derive(Debug)]
struct SwapMap<K, V> {
    map: ArcSwap<HashMap<K, Arc<V>>>,
    insert: Mutex<()>,
}

impl<K, V> Default for SwapMap<K, V> {
    fn default() -> Self {
        Self {
            map: ArcSwap::from_pointee(HashMap::default()),
            insert: Mutex::new(()),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Default> SwapMap<K, V> {
    fn get_or_default<Q>(&self, key: &Q) -> Arc<V>
    where
        Q: Hash + hashbrown::Equivalent<K> + ?Sized + ToOwned<Owned = K>,
    {
        if let Some(v) = self.map.load().get(key) {
            return v.clone();
        }
        let _writer = self.insert.lock().expect("swap map insert lock");
        let current = self.map.load_full();
        if let Some(v) = current.get(key) {
            return v.clone();
        }
        let mut next =
            HashMap::with_capacity_and_hasher(current.len() + 1, current.hasher().clone());
        next.extend(current.iter().map(|(k, v)| (k.clone(), v.clone())));
        let v = Arc::new(V::default());
        next.insert(key.to_owned(), v.clone());
        self.map.store(Arc::new(next));
        v
    }

    fn values(&self) -> Vec<Arc<V>> {
        self.map.load().values().cloned().collect()
    }
}

/// One cluster's state.
#[derive(Debug)]
pub struct ClusterState {
    endpoints: SwapMap<SocketAddr, EndpointState>,
    /// Time base of `ejections_end_ms`.
    epoch: Instant,
    /// Milliseconds after `epoch` until which some endpoint may be ejected: before it, picks
    /// check every endpoint's ejection; after it, none can be ejected and picks skip the check.
    ejections_end_ms: AtomicU64,
    round_robin: AtomicU64,
    /// Requests in flight (active + pending), for `http2MaxRequests` / `http1MaxPendingRequests`.
    requests: AtomicU32,
    /// Requests rejected by the pool limits (Envoy's `upstream_rq_pending_overflow`).
    pub overflows: AtomicU64,
    /// DestinationRule `tls` origination, rebuilt when the plan's settings change.
    tls: Mutex<Option<Arc<TlsOrigination>>>,
    /// When each endpoint joined the cluster, for `warmup` (kept only for clusters with it).
    members: ArcSwap<Membership>,
}

/// A cluster's endpoints as the last plans listed them, with the time each joined.
#[derive(Debug, Default)]
struct Membership {
    joined: HashMap<SocketAddr, Instant>,
    /// The last join: after it plus the warmup window, every endpoint is warm.
    last_join: Option<Instant>,
}

impl Default for ClusterState {
    fn default() -> Self {
        Self {
            endpoints: SwapMap::default(),
            epoch: Instant::now(),
            ejections_end_ms: AtomicU64::new(0),
            round_robin: AtomicU64::new(0),
            requests: AtomicU32::new(0),
            overflows: AtomicU64::new(0),
            tls: Mutex::new(None),
            members: ArcSwap::from_pointee(Membership::default()),
        }
    }
}

impl ClusterState {
    /// The TLS origination of `cluster` (built on first use and when its settings change), or
    /// None when it speaks plain text.
    pub fn tls_origination(&self, cluster: &Cluster) -> Option<Arc<TlsOrigination>> {
        let plan = cluster.policy.tls.as_ref()?;
        let mut cached = self.tls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cached.as_ref().filter(|t| t.plan == *plan) {
            return Some(t.clone());
        }
        let built = Arc::new(crate::dataplane::upstream_tls::build(plan, &cluster.host));
        if let Err(e) = &built.connector {
            tracing::warn!(cluster = %cluster.name, error = %e, "upstream TLS settings unusable; connections fail (503 UF)");
        }
        *cached = Some(built.clone());
        Some(built)
    }
}

/// An admitted request: holds its slot in the cluster's pool until dropped.
pub struct Admission {
    state: Arc<ClusterState>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.state.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request in flight to one endpoint (for least-request balancing).
pub struct InFlight {
    endpoint: Arc<EndpointState>,
}

impl InFlight {
    /// The endpoint's upstream connections.
    pub fn pool(&self) -> &Arc<EndpointPool> {
        &self.endpoint.pool
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The endpoint a request goes to.
pub struct Picked {
    /// Index in the cluster's `endpoints`.
    pub index: usize,
    pub addr: SocketAddr,
    pub in_flight: InFlight,
}

/// How an attempt ended, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// 5xx other than gateway errors.
    ServerError,
    /// 502/503/504 or a connect failure / reset (Envoy's gateway errors).
    GatewayError,
}

impl ClusterState {
    /// Sets the cluster's endpoints (the union over every route that uses it) and times the
    /// new ones' joining from `now`; an address that left and comes back joins again, as a new
    /// Envoy host would.
    fn set_members(&self, addrs: &BTreeSet<SocketAddr>, now: Instant) {
        let current = self.members.load();
        let joined: HashMap<SocketAddr, Instant> = addrs
            .iter()
            .map(|a| (*a, current.joined.get(a).copied().unwrap_or(now)))
            .collect();
        let last_join = joined.values().copied().max();
        self.members
            .store(Arc::new(Membership { joined, last_join }));
    }

    /// Per endpoint index, the slow-start factor of its weight; None when every endpoint is
    /// past the warmup window (the common case: one comparison). An endpoint no plan has listed
    /// yet counts as warm.
    fn warmup_factors(&self, cluster: &Cluster, warmup: &Warmup, now: Instant) -> Option<Vec<f64>> {
        let members = self.members.load();
        let last = members.last_join?;
        if now.saturating_duration_since(last) >= warmup.window {
            return None;
        }
        Some(
            cluster
                .endpoints
                .iter()
                .map(|e| {
                    members
                        .joined
                        .get(&e.addr)
                        .map_or(1.0, |t| warmup.factor(now.saturating_duration_since(*t)))
                })
                .collect(),
        )
    }

    fn endpoint(&self, addr: SocketAddr) -> Arc<EndpointState> {
        self.endpoints.get_or_default(&addr)
    }

    fn millis(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Admits a request under the pool limits, or reports overflow (answered with 503 and
    /// `x-envoy-overloaded`, as Envoy does).
    pub fn admit(self: &Arc<Self>, cluster: &Cluster) -> Option<Admission> {
        let p = &cluster.policy;
        // Envoy's HTTP/1 pool queues up to http1MaxPendingRequests beyond maxConnections active
        // requests; HTTP/2 multiplexes up to http2MaxRequests.
        let limit = if p.http2 {
            p.max_requests
        } else {
            match (p.max_connections, p.max_pending_requests) {
                (None, None) => p.max_requests,
                (c, q) => Some(
                    c.unwrap_or(u32::MAX / 2)
                        .saturating_add(q.unwrap_or(u32::MAX / 2)),
                ),
            }
        };
        let now = self.requests.fetch_add(1, Ordering::AcqRel) + 1;
        if limit.is_some_and(|l| now > l) {
            self.requests.fetch_sub(1, Ordering::AcqRel);
            self.overflows.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(Admission {
            state: self.clone(),
        })
    }

    /// Picks an endpoint, skipping ejected ones (unless all are ejected: Envoy's panic mode
    /// then balances over everything) and the ones already tried by this request's retries
    /// when others remain.
    pub fn pick(
        &self,
        cluster: &Cluster,
        hash: &HashInput<'_>,
        exclude: &[SocketAddr],
    ) -> Option<Picked> {
        self.pick_at(cluster, hash, exclude, Instant::now())
    }

    fn pick_at(
        &self,
        cluster: &Cluster,
        hash: &HashInput<'_>,
        exclude: &[SocketAddr],
        now: Instant,
    ) -> Option<Picked> {
        let endpoints = &cluster.endpoints;
        if endpoints.is_empty() {
            return None;
        }
        let may_be_ejected = self.millis(now) < self.ejections_end_ms.load(Ordering::Acquire);
        // Locality load balancing needs to know where the client is: this node's locality, or
        // (failoverPriority) the client workload's labels.
        let client = Client {
            locality: hash.client_locality,
            labels: hash.client_labels,
        };
        let locality = match &cluster.policy.locality {
            Some(policy)
                if (policy.failover_enabled || !policy.distribute.is_empty())
                    && (client.locality.is_some()
                        || (policy.failover_enabled && !policy.failover_priority.is_empty())) =>
            {
                Some((client, policy))
            }
            _ => None,
        };
        // The common case (no ejections, first attempt, no locality preference) balances over
        // the cluster's endpoints as they are; otherwise over the indices of the remaining
        // candidates.
        let filtered: Option<Vec<usize>> = (may_be_ejected
            || !exclude.is_empty()
            || locality.is_some())
        .then(|| {
            let all: Vec<usize> = (0..endpoints.len()).collect();
            let healthy: Vec<usize> = if may_be_ejected {
                all.iter()
                    .copied()
                    .filter(|&i| !self.endpoint(endpoints[i].addr).is_ejected(now))
                    .collect()
            } else {
                all.clone()
            };
            let mut candidates = match locality {
                Some((client, policy)) => locality_candidates(cluster, client, policy, &healthy),
                None if healthy.is_empty() => all,
                None => healthy,
            };
            if candidates.len() > 1 {
                let fresh: Vec<usize> = candidates
                    .iter()
                    .copied()
                    .filter(|&i| !exclude.contains(&endpoints[i].addr))
                    .collect();
                if !fresh.is_empty() {
                    candidates = fresh;
                }
            }
            candidates
        });
        if filtered.as_ref().is_some_and(Vec::is_empty) {
            return None;
        }
        // Slow start scales the weights of endpoints that joined recently (ROUND_ROBIN and
        // LEAST_REQUEST only; compile leaves `warmup` unset for the others).
        let factors = cluster
            .policy
            .warmup
            .as_ref()
            .and_then(|w| self.warmup_factors(cluster, w, now));
        let candidates = Candidates {
            cluster,
            indices: filtered.as_deref(),
            factors: factors.as_deref(),
        };
        let index = match &cluster.policy.load_balancer {
            LoadBalancer::RoundRobin => {
                let i = self.round_robin.fetch_add(1, Ordering::Relaxed);
                if candidates.equal_weights() {
                    candidates.index((i % candidates.len() as u64) as usize)
                } else {
                    // Weighted rotation: the golden-ratio sequence visits [0, 1) evenly, so each
                    // endpoint's share of picks converges to its weight without randomness.
                    let x = (i as f64 * 0.618_033_988_749_894_9).fract();
                    candidates.weighted(x * candidates.total())
                }
            }
            LoadBalancer::Random => candidates.weighted(fastrand::f64() * candidates.total()),
            LoadBalancer::LeastRequest => {
                let load = |x: usize| {
                    self.endpoint(endpoints[x].addr)
                        .in_flight
                        .load(Ordering::Acquire)
                };
                let n = candidates.len();
                if !candidates.equal_weights() {
                    // Unequal weights (endpoint weights, slow start): Envoy's weighted least
                    // request, each endpoint's weight divided by its requests in flight plus one
                    // (active_request_bias 1.0), drawn in proportion rather than by EDF.
                    let effective =
                        |k: usize| candidates.weight(k) / (load(candidates.index(k)) as f64 + 1.0);
                    let total: f64 = (0..n).map(effective).sum();
                    let mut x = fastrand::f64() * total;
                    let mut chosen = candidates.index(n - 1);
                    for k in 0..n {
                        let w = effective(k);
                        if x < w {
                            chosen = candidates.index(k);
                            break;
                        }
                        x -= w;
                    }
                    chosen
                } else if n <= LEAST_REQUEST_FULL_SCAN {
                    // Few endpoints: the least loaded of all of them (Envoy's full scan), ties
                    // broken by a random starting point so idle endpoints share the load.
                    let start = fastrand::usize(..n);
                    (0..n)
                        .map(|k| candidates.index((start + k) % n))
                        .min_by_key(|&i| load(i))
                        .expect("candidates are not empty")
                } else {
                    // Power of two distinct choices, Envoy's default for LEAST_REQUEST.
                    let a = fastrand::usize(..n);
                    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                    let (a, b) = (candidates.index(a), candidates.index(b));
                    if load(b) < load(a) { b } else { a }
                }
            }
            LoadBalancer::Hash(key) => {
                let value: Option<std::borrow::Cow<'_, str>> = match key {
                    HashKey::Header(_) => hash.header.map(Into::into),
                    HashKey::Cookie { .. } => hash.cookie.map(Into::into),
                    HashKey::SourceIp => hash.source_ip.map(|ip| ip.to_string().into()),
                    HashKey::QueryParam(_) => hash.query_param.map(Into::into),
                };
                match value {
                    Some(v) => candidates.rendezvous(&v),
                    // No hash key in the request: Envoy picks randomly.
                    None => candidates.weighted(fastrand::f64() * candidates.total()),
                }
            }
        };
        let addr = endpoints[index].addr;
        let endpoint = self.endpoint(addr);
        endpoint.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(Picked {
            index,
            addr,
            in_flight: InFlight { endpoint },
        })
    }

    /// Feeds an attempt's outcome to outlier detection.
    pub fn record(
        &self,
        addr: SocketAddr,
        outcome: Outcome,
        policy: Option<&OutlierPolicy>,
        endpoint_count: usize,
    ) {
        let ep = self.endpoint(addr);
        match outcome {
            Outcome::Success => {
                ep.consecutive_5xx.store(0, Ordering::Relaxed);
                ep.consecutive_gateway.store(0, Ordering::Relaxed);
                return;
            }
            Outcome::ServerError => {
                ep.consecutive_5xx.fetch_add(1, Ordering::Relaxed);
                ep.consecutive_gateway.store(0, Ordering::Relaxed);
            }
            Outcome::GatewayError => {
                // Gateway errors are 5xx too.
                ep.consecutive_5xx.fetch_add(1, Ordering::Relaxed);
                ep.consecutive_gateway.fetch_add(1, Ordering::Relaxed);
            }
        }
        let Some(policy) = policy else { return };
        let trip_5xx = policy
            .consecutive_5xx
            .is_some_and(|n| n > 0 && ep.consecutive_5xx.load(Ordering::Relaxed) >= n);
        let trip_gw = policy
            .consecutive_gateway_errors
            .is_some_and(|n| n > 0 && ep.consecutive_gateway.load(Ordering::Relaxed) >= n);
        if !(trip_5xx || trip_gw) {
            return;
        }
        let now = Instant::now();
        let ejected_now = self
            .endpoints
            .values()
            .iter()
            .filter(|e| e.is_ejected(now))
            .count();
        // maxEjectionPercent caps how much of the cluster can be out (at least one host may go,
        // as in Envoy when the percentage rounds down to zero only if it is 0).
        let max =
            (endpoint_count as u64 * policy.max_ejection_percent as u64).div_ceil(100) as usize;
        if ejected_now >= max.max(usize::from(policy.max_ejection_percent > 0)) {
            return;
        }
        let mut until = ep.ejected_until.lock().expect("ejection lock");
        if until.is_some_and(|t| t > now) {
            return;
        }
        let n = ep.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let end = now + policy.base_ejection_time * n.min(10);
        *until = Some(end);
        // Rounded up, so that picks check ejections for as long as this one lasts.
        self.ejections_end_ms
            .fetch_max(self.millis(end) + 1, Ordering::AcqRel);
        ep.consecutive_5xx.store(0, Ordering::Relaxed);
        ep.consecutive_gateway.store(0, Ordering::Relaxed);
    }

    /// Whether `addr` is ejected now (for `inspect endpoints`).
    pub fn is_ejected(&self, addr: SocketAddr) -> bool {
        self.endpoint(addr).is_ejected(Instant::now())
    }

    /// Closes upstream connections that have been idle for longer than their idle timeout.
    pub fn evict_idle_connections(&self) {
        for endpoint in self.endpoints.values() {
            endpoint.pool.evict_idle();
        }
    }
}

/// Envoy's overprovisioning factor (1.4): a priority level keeps all its traffic while at least
/// 1/1.4 ≈ 71% of its endpoints are healthy, and spills the rest to the next level below that.
const OVERPROVISIONING: f64 = 1.4;

/// The endpoints locality load balancing lets a request use, among `healthy` (indices; empty
/// when every endpoint is ejected): with `distribute`, those of one locality picked by its
/// weight (endpoints of no listed locality never); with failover, those of one priority level
/// picked by Envoy's priority load (each level's share is its healthy fraction times the
/// overprovisioning factor, what it cannot take goes to the next level).
fn locality_candidates(
    cluster: &Cluster,
    client: Client<'_>,
    policy: &LocalityPolicy,
    healthy: &[usize],
) -> Vec<usize> {
    let endpoints = &cluster.endpoints;
    if let Some(weights) = client
        .locality
        .and_then(|l| policy.distribution(l, endpoints))
    {
        // Healthy endpoints of a weighted locality; in panic (none healthy) any weighted one.
        let usable: Vec<usize> = healthy
            .iter()
            .copied()
            .filter(|&i| weights[i] > 0.0)
            .collect();
        let usable = if usable.is_empty() {
            (0..endpoints.len()).filter(|&i| weights[i] > 0.0).collect()
        } else {
            usable
        };
        let total: f64 = usable.iter().map(|&i| weights[i]).sum();
        let mut x = fastrand::f64() * total;
        let chosen = usable
            .iter()
            .copied()
            .find(|&i| {
                x -= weights[i];
                x < 0.0
            })
            .or(usable.last().copied());
        return match chosen {
            Some(c) => {
                let locality = &endpoints[c].locality;
                usable
                    .into_iter()
                    .filter(|&i| endpoints[i].locality == *locality)
                    .collect()
            }
            None => Vec::new(),
        };
    }
    let Some(priorities) = policy.priorities(client, endpoints, &cluster.priority_labels) else {
        return if healthy.is_empty() {
            (0..endpoints.len()).collect()
        } else {
            healthy.to_vec()
        };
    };
    let levels = priorities.iter().max().map_or(0, |m| *m as usize + 1);
    let mut total = vec![0usize; levels];
    let mut up = vec![0usize; levels];
    for p in &priorities {
        total[*p as usize] += 1;
    }
    for &i in healthy {
        up[priorities[i] as usize] += 1;
    }
    let health: Vec<f64> = (0..levels)
        .map(|p| (OVERPROVISIONING * 100.0 * up[p] as f64 / total[p].max(1) as f64).min(100.0))
        .collect();
    let health_sum: f64 = health.iter().sum();
    let level = if health_sum <= 0.0 {
        // Nothing healthy anywhere: Envoy's panic mode on the first level.
        0
    } else {
        // Loads in priority order; below 100% in total they are scaled up (Envoy normalizes).
        let mut remaining = 100.0;
        let loads: Vec<f64> = health
            .iter()
            .map(|h| {
                let load = h.min(remaining);
                remaining -= load;
                load
            })
            .collect();
        let scale = if health_sum < 100.0 {
            100.0 / health_sum
        } else {
            1.0
        };
        let mut x = fastrand::f64() * 100.0;
        loads
            .iter()
            .position(|l| {
                x -= l * scale;
                x < 0.0
            })
            .unwrap_or_else(|| loads.iter().rposition(|l| *l > 0.0).unwrap_or(0))
    };
    let in_level: Vec<usize> = healthy
        .iter()
        .copied()
        .filter(|&i| priorities[i] as usize == level)
        .collect();
    if in_level.is_empty() {
        (0..endpoints.len())
            .filter(|&i| priorities[i] as usize == level)
            .collect()
    } else {
        in_level
    }
}

/// The endpoints a pick chooses among: all of a cluster's, or the listed indices.
struct Candidates<'a> {
    cluster: &'a Cluster,
    indices: Option<&'a [usize]>,
    /// Per endpoint index, a factor on its weight (slow start).
    factors: Option<&'a [f64]>,
}

impl Candidates<'_> {
    fn len(&self) -> usize {
        self.indices
            .map_or(self.cluster.endpoints.len(), <[usize]>::len)
    }

    /// The endpoint index of the `k`-th candidate.
    fn index(&self, k: usize) -> usize {
        self.indices.map_or(k, |i| i[k])
    }

    fn weight(&self, k: usize) -> f64 {
        let i = self.index(k);
        self.cluster.endpoints[i].weight * self.factors.map_or(1.0, |f| f[i])
    }

    fn total(&self) -> f64 {
        (0..self.len()).map(|k| self.weight(k)).sum()
    }

    fn equal_weights(&self) -> bool {
        let first = self.weight(0);
        (1..self.len()).all(|k| (self.weight(k) - first).abs() < 1e-12)
    }

    /// The candidate whose cumulative weight covers `x`.
    fn weighted(&self, mut x: f64) -> usize {
        for k in 0..self.len() {
            let w = self.weight(k);
            if x < w {
                return self.index(k);
            }
            x -= w;
        }
        self.index(self.len() - 1)
    }

    /// Rendezvous (highest random weight) hashing: stable per key, and only keys of a removed
    /// endpoint move when the endpoint set changes — the property Istio's ring hash provides.
    fn rendezvous(&self, key: &str) -> usize {
        // Fixed seeds: the same key must land on the same endpoint after an agent restart.
        let hasher = foldhash::fast::FixedState::with_seed(0x5eed_57ee_d000_0001);
        (0..self.len())
            .map(|k| {
                let i = self.index(k);
                let e = &self.cluster.endpoints[i];
                let h = hasher.hash_one((key, e.addr));
                let u = (h >> 11) as f64 / (1u64 << 53) as f64;
                // Weighted rendezvous: -w / ln(u).
                (i, -e.weight / u.max(f64::MIN_POSITIVE).ln())
            })
            .max_by(|x, y| x.1.total_cmp(&y.1))
            .map(|(i, _)| i)
            .expect("candidates are not empty")
    }
}

/// All clusters' state, by cluster name.
#[derive(Debug, Default)]
pub struct Clusters {
    states: SwapMap<String, ClusterState>,
    /// The endpoints of the clusters with `warmup`, as each kind of plan lists them: the mesh
    /// routes and the gateways' share cluster state, and a cluster's endpoints are the union.
    members: Mutex<[HashMap<String, BTreeSet<SocketAddr>>; 2]>,
}

/// Which plan lists a cluster's endpoints (see [`Clusters::observe_members`]).
#[derive(Debug, Clone, Copy)]
pub enum MemberSource {
    Mesh = 0,
    Gateway = 1,
}

impl Clusters {
    /// Records the endpoints of the `warmup` clusters in a new plan of `source`, so slow start
    /// times each endpoint from the plan that brought it (not from the first request after
    /// it), and restarts it for an endpoint that left and came back.
    pub fn observe_members<'c>(
        &self,
        source: MemberSource,
        clusters: impl IntoIterator<Item = &'c Cluster>,
        now: Instant,
    ) {
        let mut listed: HashMap<String, BTreeSet<SocketAddr>> = HashMap::default();
        for c in clusters.into_iter().filter(|c| c.policy.warmup.is_some()) {
            listed
                .entry(c.name.clone())
                .or_default()
                .extend(c.endpoints.iter().map(|e| e.addr));
        }
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let previous = std::mem::replace(&mut members[source as usize], listed);
        let touched: BTreeSet<&String> = previous
            .keys()
            .chain(members[source as usize].keys())
            .collect();
        for name in touched {
            let union: BTreeSet<SocketAddr> = members
                .iter()
                .filter_map(|m| m.get(name))
                .flatten()
                .copied()
                .collect();
            self.get(name).set_members(&union, now);
        }
    }

    pub fn get(&self, name: &str) -> Arc<ClusterState> {
        self.states.get_or_default(name)
    }

    /// Every cluster seen so far.
    pub fn all(&self) -> Vec<Arc<ClusterState>> {
        self.states.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::WeightedBackend;
    use crate::compile::http::{ClusterPolicy, LocalityPolicy};
    use std::time::Duration;

    fn cluster(n: usize, lb: LoadBalancer) -> Cluster {
        Cluster {
            name: "c".into(),
            host: "h".into(),
            port: 80,
            subset: None,
            endpoints: (0..n)
                .map(|i| WeightedBackend {
                    addr: format!("10.0.0.{}:80", i + 1).parse().unwrap(),
                    weight: 1.0 / n as f64,
                    clusters: std::sync::Arc::from([]),
                    workload: Default::default(),
                    locality: String::new(),
                })
                .collect(),
            priority_labels: Vec::new(),
            policy: ClusterPolicy {
                load_balancer: lb,
                ..Default::default()
            },
            destination_rule: None,
        }
    }

    #[test]
    fn round_robin_rotates() {
        let c = cluster(3, LoadBalancer::RoundRobin);
        let s = Arc::new(ClusterState::default());
        let mut seen = std::collections::HashMap::new();
        for _ in 0..300 {
            let a = s.pick(&c, &HashInput::default(), &[]).unwrap().addr;
            *seen.entry(a).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3);
        assert!(seen.values().all(|n| (90..=110).contains(n)), "{seen:?}");
    }

    fn share_of(s: &ClusterState, c: &Cluster, addr: SocketAddr, at: Instant, n: usize) -> f64 {
        let hits = (0..n)
            .filter(|_| s.pick_at(c, &HashInput::default(), &[], at).unwrap().addr == addr)
            .count();
        hits as f64 / n as f64
    }

    fn warm(lb: LoadBalancer, window: u64, min: f64, aggression: f64) -> Cluster {
        let mut c = cluster(2, lb);
        c.policy.warmup = Some(Warmup {
            window: Duration::from_secs(window),
            min_weight_percent: min,
            aggression,
        });
        c
    }

    /// A plan listing `c`'s endpoints arrives at `at`.
    fn join(s: &ClusterState, c: &Cluster, at: Instant) {
        s.set_members(&c.endpoints.iter().map(|e| e.addr).collect(), at);
    }

    fn with_third(c: &Cluster) -> Cluster {
        let mut c = c.clone();
        let mut new = c.endpoints[0].clone();
        new.addr = "10.0.0.9:80".parse().unwrap();
        c.endpoints.push(new);
        c
    }

    #[test]
    fn warmup_ramps_a_new_endpoint_up_over_the_window() {
        for lb in [LoadBalancer::RoundRobin, LoadBalancer::LeastRequest] {
            let before = warm(lb.clone(), 10, 10.0, 1.0);
            let s = ClusterState::default();
            let t0 = Instant::now();
            join(&s, &before, t0);
            // The first two are warm 20 s later, when a third joins.
            let after = with_third(&before);
            let joined = t0 + Duration::from_secs(20);
            join(&s, &after, joined);
            let new: SocketAddr = "10.0.0.9:80".parse().unwrap();
            let at = |secs: f64| joined + Duration::from_secs_f64(secs);
            // Factor max(0.1, age/10): at 0.5 s the 10 % floor, 0.1 / 2.1 of the picks.
            let early = share_of(&s, &after, new, at(0.5), 4000);
            assert!((0.03..0.07).contains(&early), "{lb:?} at 0.5 s: {early}");
            // At 5 s: 0.5 / 2.5.
            let half = share_of(&s, &after, new, at(5.0), 4000);
            assert!((0.16..0.24).contains(&half), "{lb:?} at 5 s: {half}");
            // Past the window: a third, as without warmup.
            let done = share_of(&s, &after, new, at(10.5), 4000);
            assert!((0.30..0.37).contains(&done), "{lb:?} at 10.5 s: {done}");
        }
    }

    #[test]
    fn warmup_aggression_and_floor_shape_the_ramp() {
        let before = warm(LoadBalancer::RoundRobin, 10, 30.0, 2.0);
        let s = ClusterState::default();
        let t0 = Instant::now();
        join(&s, &before, t0);
        let after = with_third(&before);
        let joined = t0 + Duration::from_secs(60);
        join(&s, &after, joined);
        let new: SocketAddr = "10.0.0.9:80".parse().unwrap();
        // Floor 30 %: 0.3 / 2.3 right away (age/10 would be far less).
        let early = share_of(&s, &after, new, joined + Duration::from_millis(100), 4000);
        assert!((0.11..0.15).contains(&early), "{early}");
        // Aggression 2: (0.64)^(1/2) = 0.8 at 6.4 s, 0.8 / 2.8 of the picks.
        let later = share_of(&s, &after, new, joined + Duration::from_millis(6400), 4000);
        assert!((0.26..0.31).contains(&later), "{later}");
    }

    #[test]
    fn warmup_restarts_for_an_endpoint_that_leaves_and_returns() {
        let three = with_third(&warm(LoadBalancer::RoundRobin, 10, 10.0, 1.0));
        let s = ClusterState::default();
        let t0 = Instant::now();
        join(&s, &three, t0);
        let new: SocketAddr = "10.0.0.9:80".parse().unwrap();
        // Everyone joined together: equal shares even inside the window.
        let together = share_of(&s, &three, new, t0 + Duration::from_secs(2), 3000);
        assert!((0.30..0.37).contains(&together), "{together}");
        let two = warm(LoadBalancer::RoundRobin, 10, 10.0, 1.0);
        join(&s, &two, t0 + Duration::from_secs(30));
        let back = t0 + Duration::from_secs(40);
        join(&s, &three, back);
        let again = share_of(&s, &three, new, back + Duration::from_millis(500), 4000);
        assert!((0.03..0.07).contains(&again), "{again}");
    }

    #[test]
    fn warmup_members_are_the_union_of_every_route_and_plan_kind() {
        // One cluster name, two endpoint lists (the IPv4 and IPv6 VIPs' routes), plus a gateway.
        let v4 = warm(LoadBalancer::RoundRobin, 10, 10.0, 1.0);
        let mut v6 = v4.clone();
        for (i, e) in v6.endpoints.iter_mut().enumerate() {
            e.addr = format!("[fd00::{}]:80", i + 1).parse().unwrap();
        }
        let clusters = Clusters::default();
        let t0 = Instant::now();
        clusters.observe_members(MemberSource::Mesh, [&v4, &v6], t0);
        clusters.observe_members(MemberSource::Gateway, [&v4], t0);
        // Later plans list the same endpoints: nobody rejoins, so nobody is throttled.
        let later = t0 + Duration::from_secs(30);
        clusters.observe_members(MemberSource::Mesh, [&v6, &v4], later);
        clusters.observe_members(MemberSource::Gateway, [&v4], later);
        let state = clusters.get("c");
        assert!(
            state
                .warmup_factors(&v4, v4.policy.warmup.as_ref().unwrap(), later)
                .is_none()
        );
        // The mesh drops the IPv4 list but the gateway still lists it: still members.
        let t2 = t0 + Duration::from_secs(60);
        clusters.observe_members(MemberSource::Mesh, [&v6], t2);
        assert!(
            state
                .warmup_factors(&v4, v4.policy.warmup.as_ref().unwrap(), t2)
                .is_none()
        );
        // Dropped by both, then back: it joins again.
        clusters.observe_members(MemberSource::Gateway, [&v6], t2);
        clusters.observe_members(MemberSource::Gateway, [&v4], t2 + Duration::from_secs(1));
        let factors = state
            .warmup_factors(
                &v4,
                v4.policy.warmup.as_ref().unwrap(),
                t2 + Duration::from_secs(2),
            )
            .expect("the rejoined endpoints warm up");
        assert_eq!(factors, vec![0.1, 0.1]);
        // A cluster without warmup is not tracked.
        let plain = cluster(2, LoadBalancer::RoundRobin);
        clusters.observe_members(MemberSource::Mesh, [&plain], t2);
        assert!(clusters.members.lock().unwrap()[0].is_empty());
    }

    #[test]
    fn least_request_honours_unequal_endpoint_weights() {
        let mut c = cluster(2, LoadBalancer::LeastRequest);
        c.endpoints[0].weight = 3.0;
        c.endpoints[1].weight = 1.0;
        let s = ClusterState::default();
        let first = c.endpoints[0].addr;
        let share = share_of(&s, &c, first, Instant::now(), 4000);
        assert!((0.70..0.80).contains(&share), "{share}");
        // A busy endpoint's weight is divided by its requests in flight plus one.
        let held: Vec<Picked> = (0..200)
            .filter_map(|_| {
                let p = s.pick(&c, &HashInput::default(), &[]).unwrap();
                (p.addr == first).then_some(p)
            })
            .take(5)
            .collect();
        assert_eq!(held.len(), 5);
        // 3 / 6 against 1 / 1: a third of the picks.
        let busy = share_of(&s, &c, first, Instant::now(), 4000);
        assert!((0.28..0.39).contains(&busy), "{busy}");
    }

    #[test]
    fn consistent_hash_is_sticky_and_spreads() {
        let c = cluster(4, LoadBalancer::Hash(HashKey::Header("x-user".into())));
        let s = Arc::new(ClusterState::default());
        let pick = |user: &str| {
            s.pick(
                &c,
                &HashInput {
                    header: Some(user),
                    ..Default::default()
                },
                &[],
            )
            .unwrap()
            .addr
        };
        for u in ["alice", "bob", "carol"] {
            let first = pick(u);
            assert!((0..20).all(|_| pick(u) == first), "{u} must stick");
        }
        let distinct: std::collections::HashSet<_> =
            (0..64).map(|i| pick(&format!("user{i}"))).collect();
        assert!(
            distinct.len() >= 3,
            "keys spread over endpoints: {distinct:?}"
        );
    }

    #[test]
    fn least_request_avoids_busy_endpoints() {
        for n in [3, 20] {
            let c = cluster(n, LoadBalancer::LeastRequest);
            let s = Arc::new(ClusterState::default());
            let busy: SocketAddr = "10.0.0.1:80".parse().unwrap();
            // Requests in flight everywhere, then all but the first endpoint's finish. Picks
            // are random (two choices above the full-scan size): keep picking until the first
            // endpoint holds some, within a bound.
            let mut all: Vec<Picked> = Vec::new();
            while all.len() < 4 * n || !all.iter().any(|p| p.addr == busy) {
                assert!(all.len() < 10_000, "the first endpoint is never picked");
                all.push(s.pick(&c, &HashInput::default(), &[]).unwrap());
            }
            let held: Vec<Picked> = all.into_iter().filter(|p| p.addr == busy).collect();
            assert!(!held.is_empty());
            let picks: Vec<SocketAddr> = (0..100)
                .map(|_| s.pick(&c, &HashInput::default(), &[]).unwrap().addr)
                .collect();
            let to_busy = picks.iter().filter(|a| **a == busy).count();
            if n <= LEAST_REQUEST_FULL_SCAN {
                assert_eq!(to_busy, 0, "full scan never picks the busy endpoint");
                let distinct: std::collections::HashSet<_> = picks.iter().collect();
                assert_eq!(distinct.len(), n - 1, "idle endpoints share: {distinct:?}");
            } else {
                // Two distinct choices: the busy one only wins against another with as many
                // requests in flight, which no idle endpoint has.
                assert_eq!(to_busy, 0);
            }
        }
    }

    /// Endpoints 10.0.0.1.. in the given localities.
    fn cluster_in(localities: &[&str], policy: LocalityPolicy) -> Cluster {
        let mut c = cluster(localities.len(), LoadBalancer::RoundRobin);
        for (e, l) in c.endpoints.iter_mut().zip(localities) {
            e.locality = l.to_string();
        }
        c.policy.locality = Some(policy);
        c
    }

    fn counts(s: &ClusterState, c: &Cluster, client: &Locality, n: usize) -> Vec<usize> {
        let mut out = vec![0; c.endpoints.len()];
        let input = HashInput {
            client_locality: Some(client),
            ..Default::default()
        };
        for _ in 0..n {
            out[s.pick(c, &input, &[]).unwrap().index] += 1;
        }
        out
    }

    #[test]
    fn locality_failover_prefers_the_nearest_healthy_endpoints() {
        let failover = LocalityPolicy {
            failover_enabled: true,
            ..Default::default()
        };
        let c = cluster_in(&["us/z1", "us/z1", "us/z2", "eu/z1"], failover.clone());
        let client = Locality::parse("us/z1");
        let s = Arc::new(ClusterState::default());
        let c1 = counts(&s, &c, &client, 100);
        assert_eq!(
            (c1[2], c1[3]),
            (0, 0),
            "the local zone takes everything: {c1:?}"
        );
        assert!(c1[0] > 0 && c1[1] > 0, "{c1:?}");
        // One of two local endpoints out: 50% healthy × 1.4 = 70% stays local, 30% spills to
        // the same region's other zone, nothing to the other region.
        let policy = OutlierPolicy {
            consecutive_5xx: Some(1),
            consecutive_gateway_errors: None,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 100,
        };
        s.record(c.endpoints[0].addr, Outcome::ServerError, Some(&policy), 4);
        let c2 = counts(&s, &c, &client, 2000);
        assert_eq!((c2[0], c2[3]), (0, 0), "{c2:?}");
        assert!((1250..=1550).contains(&c2[1]), "about 70% local: {c2:?}");
        // Both local endpoints out: the region's other zone, then (with it out) the other
        // region.
        s.record(c.endpoints[1].addr, Outcome::ServerError, Some(&policy), 4);
        assert_eq!(counts(&s, &c, &client, 50), vec![0, 0, 50, 0]);
        s.record(c.endpoints[2].addr, Outcome::ServerError, Some(&policy), 4);
        assert_eq!(counts(&s, &c, &client, 50), vec![0, 0, 0, 50]);
        // Without failover (no outlier detection), locality does not matter.
        let plain = cluster_in(
            &["us/z1", "us/z1", "us/z2", "eu/z1"],
            LocalityPolicy::default(),
        );
        let all = counts(&Arc::new(ClusterState::default()), &plain, &client, 100);
        assert!(all.iter().all(|n| *n == 25), "{all:?}");
    }

    #[test]
    fn failover_priority_prefers_endpoints_with_the_client_labels() {
        // No node locality: the client's Pod labels alone decide.
        let mut c = cluster_in(
            &["", "", ""],
            LocalityPolicy {
                failover_priority: vec!["team".into()],
                failover_enabled: true,
                ..Default::default()
            },
        );
        c.priority_labels = vec![vec!["a".into()], vec!["b".into()], vec!["a".into()]];
        let labels: crate::model::Labels = [("team".to_string(), "a".to_string())]
            .into_iter()
            .collect();
        let input = HashInput {
            client_labels: Some(&labels),
            ..Default::default()
        };
        let s = Arc::new(ClusterState::default());
        let pick = |s: &ClusterState| {
            let mut out = vec![0; 3];
            for _ in 0..60 {
                out[s.pick(&c, &input, &[]).unwrap().index] += 1;
            }
            out
        };
        let n = pick(&s);
        assert_eq!(n[1], 0, "team a first: {n:?}");
        assert!(n[0] > 0 && n[2] > 0, "{n:?}");
        // Team a ejected: team b takes over.
        let policy = OutlierPolicy {
            consecutive_5xx: Some(1),
            consecutive_gateway_errors: None,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 100,
        };
        s.record(c.endpoints[0].addr, Outcome::ServerError, Some(&policy), 3);
        s.record(c.endpoints[2].addr, Outcome::ServerError, Some(&policy), 3);
        assert_eq!(pick(&s), vec![0, 60, 0]);
        // A client that is no known Pod (and no node locality): no preference.
        let n = counts_without_client(&c);
        assert!(n.iter().all(|x| *x > 0), "{n:?}");
    }

    fn counts_without_client(c: &Cluster) -> Vec<usize> {
        let s = ClusterState::default();
        let mut out = vec![0; c.endpoints.len()];
        for _ in 0..60 {
            out[s.pick(c, &HashInput::default(), &[]).unwrap().index] += 1;
        }
        out
    }

    #[test]
    fn locality_failover_rules_and_distribute() {
        let client = Locality::parse("us/z1");
        // us has nothing; failover us → eu comes before ap.
        let c = cluster_in(
            &["ap/z1", "eu/z9"],
            LocalityPolicy {
                failover: vec![("us".into(), "eu".into())],
                failover_enabled: true,
                ..Default::default()
            },
        );
        let s = Arc::new(ClusterState::default());
        assert_eq!(counts(&s, &c, &client, 40), vec![0, 40]);
        // distribute: 80% to us/z2, 20% to eu, nothing to ap.
        let c = cluster_in(
            &["us/z2", "us/z2", "eu/z1", "ap/z1"],
            LocalityPolicy {
                distribute: vec![(
                    "us/*".into(),
                    vec![("us/z2".into(), 80), ("eu/*".into(), 20)],
                )],
                ..Default::default()
            },
        );
        let n = counts(&s, &c, &client, 2000);
        assert_eq!(n[3], 0, "{n:?}");
        assert!((1500..=1700).contains(&(n[0] + n[1])), "{n:?}");
        assert!(n[0] > 0 && n[1] > 0, "{n:?}");
        // A client no `from` matches: no distribution.
        let other = Locality::parse("ap/z1");
        let n = counts(&s, &c, &other, 400);
        assert!(n.iter().all(|c| *c > 0), "{n:?}");
    }

    #[test]
    fn outlier_detection_ejects_and_caps() {
        let c = cluster(2, LoadBalancer::RoundRobin);
        let s = Arc::new(ClusterState::default());
        let policy = OutlierPolicy {
            consecutive_5xx: Some(3),
            consecutive_gateway_errors: None,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_millis(200),
            max_ejection_percent: 50,
        };
        let bad: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let good: SocketAddr = "10.0.0.2:80".parse().unwrap();
        for _ in 0..2 {
            s.record(bad, Outcome::ServerError, Some(&policy), 2);
        }
        assert!(!s.is_ejected(bad));
        s.record(bad, Outcome::ServerError, Some(&policy), 2);
        assert!(s.is_ejected(bad));
        assert!((0..20).all(|_| s.pick(&c, &HashInput::default(), &[]).unwrap().addr == good));
        // 50% of 2 = 1: the second host cannot be ejected while the first is out.
        for _ in 0..3 {
            s.record(good, Outcome::GatewayError, Some(&policy), 2);
        }
        assert!(!s.is_ejected(good));
        std::thread::sleep(Duration::from_millis(250));
        assert!(!s.is_ejected(bad), "ejection expires");
    }

    #[test]
    fn pool_limits_overflow() {
        let mut c = cluster(1, LoadBalancer::RoundRobin);
        c.policy.max_connections = Some(1);
        c.policy.max_pending_requests = Some(1);
        let s = Arc::new(ClusterState::default());
        let a = s.admit(&c).unwrap();
        let b = s.admit(&c).unwrap();
        assert!(s.admit(&c).is_none(), "1 active + 1 pending");
        assert_eq!(s.overflows.load(Ordering::Relaxed), 1);
        drop(a);
        assert!(s.admit(&c).is_some());
        drop(b);
    }

    #[test]
    fn retries_prefer_other_endpoints() {
        let c = cluster(2, LoadBalancer::Random);
        let s = Arc::new(ClusterState::default());
        let tried: SocketAddr = "10.0.0.1:80".parse().unwrap();
        assert!(
            (0..50).all(|_| s.pick(&c, &HashInput::default(), &[tried]).unwrap().addr != tried)
        );
    }
}
