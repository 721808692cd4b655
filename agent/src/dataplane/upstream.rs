//! Per-cluster runtime state of the L7 proxy: load balancing, connection-pool limits and
//! outlier detection, kept across plan updates (keyed by cluster name and endpoint address) so a
//! config change does not reset ejections or in-flight counts.

use crate::compile::http::{Cluster, HashKey, LoadBalancer, OutlierPolicy};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What the load balancer needs from the request for consistent hashing.
#[derive(Debug, Default)]
pub struct HashInput<'a> {
    pub header: Option<&'a str>,
    pub cookie: Option<&'a str>,
    pub source_ip: Option<std::net::IpAddr>,
    pub query_param: Option<&'a str>,
}

#[derive(Debug, Default)]
struct EndpointState {
    in_flight: AtomicU32,
    /// Consecutive 5xx / gateway errors (reset by a success).
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Times ejected, for the ejection time backoff (baseEjectionTime × ejections).
    ejections: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

/// One cluster's state.
#[derive(Debug, Default)]
pub struct ClusterState {
    endpoints: Mutex<HashMap<SocketAddr, Arc<EndpointState>>>,
    round_robin: AtomicU64,
    /// Requests in flight (active + pending), for `http2MaxRequests` / `http1MaxPendingRequests`.
    requests: AtomicU32,
    /// Upstream connections opened and not yet closed, for `tcp.maxConnections`.
    pub connections: AtomicU32,
    /// Requests rejected by the pool limits (Envoy's `upstream_rq_pending_overflow`).
    pub overflows: AtomicU64,
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

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
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
    fn endpoint(&self, addr: SocketAddr) -> Arc<EndpointState> {
        self.endpoints
            .lock()
            .expect("endpoint state lock")
            .entry(addr)
            .or_default()
            .clone()
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
    ) -> Option<(SocketAddr, InFlight)> {
        let now = Instant::now();
        let all: Vec<(SocketAddr, f64)> = cluster
            .endpoints
            .iter()
            .map(|e| (e.addr, e.weight))
            .collect();
        if all.is_empty() {
            return None;
        }
        let healthy: Vec<(SocketAddr, f64)> = all
            .iter()
            .copied()
            .filter(|(a, _)| {
                !self
                    .endpoint(*a)
                    .ejected_until
                    .lock()
                    .expect("ejection lock")
                    .is_some_and(|t| t > now)
            })
            .collect();
        let mut candidates = if healthy.is_empty() { all } else { healthy };
        if candidates.len() > 1 {
            let fresh: Vec<_> = candidates
                .iter()
                .copied()
                .filter(|(a, _)| !exclude.contains(a))
                .collect();
            if !fresh.is_empty() {
                candidates = fresh;
            }
        }
        let addr = match &cluster.policy.load_balancer {
            LoadBalancer::RoundRobin => {
                let i = self.round_robin.fetch_add(1, Ordering::Relaxed);
                let first = candidates[0].1;
                if candidates.iter().all(|(_, w)| (w - first).abs() < 1e-12) {
                    candidates[(i % candidates.len() as u64) as usize].0
                } else {
                    // Weighted rotation: the golden-ratio sequence visits [0, 1) evenly, so each
                    // endpoint's share of picks converges to its weight without randomness.
                    let x = (i as f64 * 0.618_033_988_749_894_9).fract();
                    weighted_index(&candidates, x * total(&candidates))?
                }
            }
            LoadBalancer::Random => {
                weighted_index(&candidates, fastrand::f64() * total(&candidates))?
            }
            LoadBalancer::LeastRequest => {
                // Power of two choices, Envoy's default for LEAST_REQUEST.
                let a = candidates[fastrand::usize(..candidates.len())].0;
                let b = candidates[fastrand::usize(..candidates.len())].0;
                let load = |x: SocketAddr| self.endpoint(x).in_flight.load(Ordering::Acquire);
                if load(b) < load(a) { b } else { a }
            }
            LoadBalancer::Hash(key) => {
                let value: Option<String> = match key {
                    HashKey::Header(_) => hash.header.map(str::to_string),
                    HashKey::Cookie { .. } => hash.cookie.map(str::to_string),
                    HashKey::SourceIp => hash.source_ip.map(|ip| ip.to_string()),
                    HashKey::QueryParam(_) => hash.query_param.map(str::to_string),
                };
                match value {
                    Some(v) => rendezvous(&candidates, &v),
                    // No hash key in the request: Envoy picks randomly.
                    None => weighted_index(&candidates, fastrand::f64() * total(&candidates))?,
                }
            }
        };
        let endpoint = self.endpoint(addr);
        endpoint.in_flight.fetch_add(1, Ordering::AcqRel);
        Some((addr, InFlight { endpoint }))
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
            .lock()
            .expect("endpoint state lock")
            .values()
            .filter(|e| {
                e.ejected_until
                    .lock()
                    .expect("ejection lock")
                    .is_some_and(|t| t > now)
            })
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
        *until = Some(now + policy.base_ejection_time * n.min(10));
        ep.consecutive_5xx.store(0, Ordering::Relaxed);
        ep.consecutive_gateway.store(0, Ordering::Relaxed);
    }

    /// Whether `addr` is ejected now (for `inspect endpoints`).
    pub fn is_ejected(&self, addr: SocketAddr) -> bool {
        self.endpoint(addr)
            .ejected_until
            .lock()
            .expect("ejection lock")
            .is_some_and(|t| t > Instant::now())
    }
}

fn total(c: &[(SocketAddr, f64)]) -> f64 {
    c.iter().map(|(_, w)| w).sum()
}

/// The candidate whose cumulative weight covers `x`.
fn weighted_index(c: &[(SocketAddr, f64)], x: f64) -> Option<SocketAddr> {
    let mut x = x;
    for (a, w) in c {
        if x < *w {
            return Some(*a);
        }
        x -= w;
    }
    c.last().map(|(a, _)| *a)
}

/// Rendezvous (highest random weight) hashing: stable per key, and only keys of a removed
/// endpoint move when the endpoint set changes — the property Istio's ring hash provides.
fn rendezvous(c: &[(SocketAddr, f64)], key: &str) -> SocketAddr {
    c.iter()
        .map(|(a, w)| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            key.hash(&mut h);
            a.hash(&mut h);
            let u = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
            // Weighted rendezvous: -w / ln(u).
            (a, -w / u.max(f64::MIN_POSITIVE).ln())
        })
        .max_by(|x, y| x.1.total_cmp(&y.1))
        .map(|(a, _)| *a)
        .expect("candidates are not empty")
}

/// All clusters' state, by cluster name.
#[derive(Debug, Default)]
pub struct Clusters {
    states: Mutex<HashMap<String, Arc<ClusterState>>>,
}

impl Clusters {
    pub fn get(&self, name: &str) -> Arc<ClusterState> {
        self.states
            .lock()
            .expect("cluster state lock")
            .entry(name.to_string())
            .or_default()
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::WeightedBackend;
    use crate::compile::http::ClusterPolicy;
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
                    clusters: vec![],
                    workload: Default::default(),
                })
                .collect(),
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
            let (a, _) = s.pick(&c, &HashInput::default(), &[]).unwrap();
            *seen.entry(a).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3);
        assert!(seen.values().all(|n| (90..=110).contains(n)), "{seen:?}");
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
            .0
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
        assert!((0..20).all(|_| s.pick(&c, &HashInput::default(), &[]).unwrap().0 == good));
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
        assert!((0..50).all(|_| s.pick(&c, &HashInput::default(), &[tried]).unwrap().0 != tried));
    }
}
