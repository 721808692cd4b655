//! Incremental compilation for the agent: the configuration of every source kept indexed, and
//! the plan patched host by host.
//!
//! A change recompiles only the service hosts it can affect, from a sub-configuration holding
//! just what those hosts depend on (see [`HostOutput`]): the objects that define them, their
//! endpoints, the VirtualServices that match them, their DestinationRules, and the same for the
//! hosts their routes send to. The plan is then always the one [`compile`] gives for the whole
//! configuration; the property test at the end of this file checks exactly that over random
//! configurations and random sequences of changes.
//!
//! Still pure: no I/O, no clock.

use super::delegate::delegate_keys;
use super::registry::{
    host_matches, kubernetes_service_host, kubernetes_service_of, pod_ips, resolve_host,
};
use super::{
    HostOutput, Plan, ServicePlan, VipKey, compile_hosts, destination_hosts, mesh_registry_only,
    source_of,
};
use crate::model::{
    ConfigSet, EndpointSlice, Object, Pod, Resolved, Resource, Service, Shared, istio, node::Node,
    secret, security,
};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `(namespace, name)`.
/// An object's (namespace, name). Shared: every index entry naming an object points at the
/// key its kind's map stores (a cluster's 50,000 endpoints put each slice's key in ten index
/// sets; as two owned strings each, those copies were most of the store).
type Key = std::sync::Arc<(String, String)>;

/// Which source (the agent's `--source` index) an object came from.
pub type SourceId = usize;

/// One change a source reports, applied in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// An object the source no longer serves in this version (the old version of an update).
    Removed(Object),
    /// An object the source now serves.
    Added(Object),
}

/// Objects of one kind by key; several sources (or files) may each hold a copy.
type ByKey<T> = BTreeMap<Key, Vec<(SourceId, Shared<T>)>>;

fn key_of(meta: &crate::model::Meta) -> Key {
    new_key(&meta.namespace, &meta.name)
}

fn new_key(namespace: &str, name: &str) -> Key {
    std::sync::Arc::new((namespace.to_string(), name.to_string()))
}

/// Copies of one key are kept in source order, the order the agent merges sources in (and so
/// the order in which "first definition wins" rules see them).
fn add_copy<T>(map: &mut ByKey<T>, source: SourceId, r: Shared<T>) -> Key {
    let key = key_of(&r.meta);
    // The key the map already stores, if any: what the indexes are to share.
    let key = match map.get_key_value(&key) {
        Some((stored, _)) => stored.clone(),
        None => key,
    };
    let copies = map.entry(key.clone()).or_default();
    let at = copies.partition_point(|(s, _)| *s <= source);
    copies.insert(at, (source, r));
    key
}

/// Removes the copy `source` holds of `r` (the equal one if it holds several). Returns whether
/// there was one.
fn remove_copy<T: PartialEq>(map: &mut ByKey<T>, source: SourceId, r: &Shared<T>) -> bool {
    let key = key_of(&r.meta);
    let Some(copies) = map.get_mut(&key) else {
        return false;
    };
    let at = copies
        .iter()
        .position(|(s, c)| *s == source && c == r)
        .or_else(|| copies.iter().position(|(s, _)| *s == source));
    let Some(at) = at else { return false };
    copies.remove(at);
    if copies.is_empty() {
        map.remove(&key);
    }
    true
}

fn in_namespace<'m, T>(
    map: &'m ByKey<T>,
    namespace: &str,
) -> impl Iterator<Item = &'m Shared<T>> + 'm {
    let start = (namespace.to_string(), String::new());
    let namespace = namespace.to_string();
    map.range(start..)
        .take_while(move |(key, _)| key.0 == namespace)
        .flat_map(|(_, copies)| copies.iter().map(|(_, r)| r))
}

fn copies<'m, T>(
    map: &'m ByKey<T>,
    key: &(String, String),
) -> impl Iterator<Item = &'m Shared<T>> + 'm {
    map.get(key)
        .into_iter()
        .flat_map(|c| c.iter().map(|(_, r)| r))
}

/// Every copy of every object of one kind, in key order.
fn all<T>(map: &ByKey<T>) -> Vec<Shared<T>> {
    map.values()
        .flat_map(|c| c.iter().map(|(_, r)| r.clone()))
        .collect()
}

/// A small ordered set, as the indexes hold them: most index entries name one or two objects,
/// and a `BTreeSet` allocates a whole node (over 500 bytes for a key of two strings) for the
/// first one, 50,000 times over for a cluster's endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SmallSet<T>(Vec<T>);

impl<T> Default for SmallSet<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Ord> SmallSet<T> {
    /// Adds `value`; false if it was there.
    pub(crate) fn insert(&mut self, value: T) -> bool {
        match self.0.binary_search(&value) {
            Ok(_) => false,
            Err(at) => {
                self.0.reserve_exact(1);
                self.0.insert(at, value);
                true
            }
        }
    }

    /// Removes `value`; false if it was not there.
    pub(crate) fn remove<Q: ?Sized + Ord>(&mut self, value: &Q) -> bool
    where
        T: std::borrow::Borrow<Q>,
    {
        match self.0.binary_search_by(|v| v.borrow().cmp(value)) {
            Ok(at) => {
                self.0.remove(at);
                self.0.shrink_to_fit();
                true
            }
            Err(_) => false,
        }
    }

    pub(crate) fn first(&self) -> Option<&T> {
        self.0.first()
    }

    pub(crate) fn last(&self) -> Option<&T> {
        self.0.last()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

impl<'a, T> IntoIterator for &'a SmallSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Points `key` at exactly the index entries `now` (it was at `before`).
fn reindex<I: std::hash::Hash + Eq + Ord + Clone>(
    index: &mut HashMap<I, SmallSet<Key>>,
    key: &Key,
    before: BTreeSet<I>,
    now: BTreeSet<I>,
) {
    for gone in before.difference(&now) {
        if let Some(keys) = index.get_mut(gone) {
            keys.remove(key);
            if keys.is_empty() {
                index.remove(gone);
            }
        }
    }
    for new in now.difference(&before) {
        index.entry(new.clone()).or_default().insert(key.clone());
    }
}

fn labels_match<'s>(
    selector: impl IntoIterator<Item = (&'s String, &'s String)>,
    labels: &crate::model::Labels,
) -> bool {
    labels.matches(selector)
}

/// Every source's objects, indexed for finding what a host depends on and what an object
/// affects.
#[derive(Debug, Default)]
pub struct Store {
    services: ByKey<Service>,
    endpoint_slices: ByKey<EndpointSlice>,
    pods: ByKey<Pod>,
    /// Cluster-scoped: keyed ("", name).
    nodes: ByKey<Node>,
    virtual_services: ByKey<istio::VirtualService>,
    destination_rules: ByKey<istio::DestinationRule>,
    service_entries: ByKey<istio::ServiceEntry>,
    workload_entries: ByKey<istio::WorkloadEntry>,
    gateways: ByKey<istio::Gateway>,
    sidecars: ByKey<istio::Sidecar>,
    secrets: ByKey<secret::Secret>,
    authorization_policies: ByKey<security::AuthorizationPolicy>,
    /// DNS answers, per source (only the resolver sends them).
    resolved: BTreeMap<SourceId, BTreeMap<String, Resolved>>,

    /// Services by [`selector_hash`] of their selector's first label: a Pod can only be selected
    /// by a Service whose first selector label it carries, so a Pod change checks those few
    /// Services rather than every Service of its namespace (5,000 Pods × 10,000 Services made
    /// the first build take seconds).
    services_by_selector: HashMap<u64, SmallSet<Key>>,
    /// EndpointSlices by their Service (namespace, `kubernetes.io/service-name`).
    slices_by_service: HashMap<Key, SmallSet<Key>>,
    /// EndpointSlices by the Pods their endpoints name (`targetRef`).
    /// Keyed by [`pod_key_hash`]: a cluster's slices name every endpoint's Pod (50,000 keys of
    /// two strings each, most for Pods this node never sees), and a hash is an eighth of that.
    /// Two Pods with one hash only make a change to one recompile the other's hosts too.
    slices_by_pod: HashMap<u64, SmallSet<Key>>,
    /// VirtualServices by each exact host they name (resolved, lower case: hosts match
    /// case-insensitively).
    vs_by_host: HashMap<String, SmallSet<Key>>,
    /// VirtualServices with at least one wildcard host.
    vs_wildcard: BTreeSet<Key>,
    /// Root VirtualServices by the delegate VirtualServices their routes name.
    vs_by_delegate: HashMap<Key, SmallSet<Key>>,
    /// DestinationRules by resolved host.
    dr_by_host: HashMap<String, SmallSet<Key>>,
    /// ServiceEntries by host.
    se_by_host: HashMap<String, SmallSet<Key>>,
    /// Pods by IP, for the plan's sources.
    pods_by_ip: HashMap<IpAddr, SmallSet<Key>>,
    /// Pods by the Node they run on (`spec.nodeName`): a Node's topology is their locality.
    pods_by_node: HashMap<String, SmallSet<Key>>,
    /// EndpointSlices by the Nodes their endpoints name (`nodeName`), for endpoints of no known
    /// Pod.
    slices_by_node: HashMap<String, SmallSet<Key>>,
}

fn pod_node(p: &Resource<Pod>) -> Option<&str> {
    p.spec.spec.as_ref()?.node_name.as_deref()
}

fn slice_nodes(s: &Resource<EndpointSlice>) -> impl Iterator<Item = String> + '_ {
    s.spec
        .endpoints
        .iter()
        .filter_map(|ep| ep.node_name.as_deref().map(str::to_string))
}

/// What an EndpointSlice refers to: Services, Pods, Nodes.
type SliceRefs = (BTreeSet<Key>, BTreeSet<u64>, BTreeSet<String>);

fn slice_service(s: &Resource<EndpointSlice>) -> Option<Key> {
    s.meta
        .labels
        .get(SERVICE_NAME_LABEL)
        .map(|svc| new_key(&s.meta.namespace, svc))
}

/// The Pods a slice's endpoints name.
fn slice_pod_refs(s: &Resource<EndpointSlice>) -> impl Iterator<Item = (&str, &str)> + '_ {
    s.spec.endpoints.iter().filter_map(|ep| {
        let r = ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))?;
        let ns = r.namespace.as_deref().unwrap_or(&s.meta.namespace);
        Some((ns, r.name.as_deref().unwrap_or_default()))
    })
}

fn slice_pods(s: &Resource<EndpointSlice>) -> impl Iterator<Item = Key> + '_ {
    slice_pod_refs(s).map(|(ns, name)| new_key(ns, name))
}

/// The Pods a slice's endpoints name, by [`pod_key_hash`].
fn slice_pod_hashes(s: &Resource<EndpointSlice>) -> impl Iterator<Item = u64> + '_ {
    slice_pod_refs(s).map(|(ns, name)| pod_key_hash(ns, name))
}

/// A selector label (namespace, key, value) as `services_by_selector` keys it.
fn selector_hash(namespace: &str, key: &str, value: &str) -> u64 {
    index_hash(&(namespace, key, value))
}

/// A hash that is the same for equal values within the process (`DefaultHasher::new` uses
/// fixed keys), for the indexes keyed by hash; the compiler has no hashing crate of its own.
fn index_hash(value: &impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut hasher = std::hash::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// A Pod's (namespace, name) as the slice index keys it: fixed seeds, so equal keys hash
/// equally in every index update.
fn pod_key_hash(namespace: &str, name: &str) -> u64 {
    index_hash(&("pod", namespace, name))
}

fn vs_patterns(vs: &Resource<istio::VirtualService>) -> impl Iterator<Item = String> + '_ {
    vs.spec
        .hosts
        .iter()
        .map(|h| resolve_host(h, &vs.meta.namespace).to_ascii_lowercase())
}

impl Store {
    fn add(&mut self, source: SourceId, object: Object) {
        match object {
            Object::Service(r) => {
                let key = key_of(&r.meta);
                let before = self.selector_hashes(&key);
                let key = add_copy(&mut self.services, source, r);
                let now = self.selector_hashes(&key);
                reindex(&mut self.services_by_selector, &key, before, now);
            }
            Object::EndpointSlice(r) => {
                let key = key_of(&r.meta);
                let refs = self.slice_refs(&key);
                let key = add_copy(&mut self.endpoint_slices, source, r);
                self.reindex_slice(&key, refs);
            }
            Object::Pod(r) => {
                let key = key_of(&r.meta);
                let (before, nodes) = (self.pod_ips(&key), self.pod_nodes(&key));
                let key = add_copy(&mut self.pods, source, r);
                let now = self.pod_ips(&key);
                reindex(&mut self.pods_by_ip, &key, before, now);
                let nodes_now = self.pod_nodes(&key);
                reindex(&mut self.pods_by_node, &key, nodes, nodes_now);
            }
            Object::Node(r) => {
                add_copy(&mut self.nodes, source, r);
            }
            Object::VirtualService(r) => {
                let key = key_of(&r.meta);
                let before = self.vs_hosts(&key);
                let delegates = self.vs_delegates(&key);
                let key = add_copy(&mut self.virtual_services, source, r);
                self.reindex_vs(&key, before, delegates);
            }
            Object::DestinationRule(r) => {
                let key = key_of(&r.meta);
                let before = self.dr_hosts(&key);
                let key = add_copy(&mut self.destination_rules, source, r);
                let now = self.dr_hosts(&key);
                reindex(&mut self.dr_by_host, &key, before, now);
            }
            Object::ServiceEntry(r) => {
                let key = key_of(&r.meta);
                let before = self.se_hosts(&key);
                let key = add_copy(&mut self.service_entries, source, r);
                let now = self.se_hosts(&key);
                reindex(&mut self.se_by_host, &key, before, now);
            }
            Object::WorkloadEntry(r) => {
                add_copy(&mut self.workload_entries, source, r);
            }
            Object::Gateway(r) => {
                add_copy(&mut self.gateways, source, r);
            }
            Object::Sidecar(r) => {
                add_copy(&mut self.sidecars, source, r);
            }
            Object::Secret(r) => {
                add_copy(&mut self.secrets, source, r);
            }
            Object::AuthorizationPolicy(r) => {
                add_copy(&mut self.authorization_policies, source, r);
            }
        }
    }

    fn remove(&mut self, source: SourceId, object: &Object) -> bool {
        match object {
            Object::Service(r) => {
                let key = key_of(&r.meta);
                let before = self.selector_hashes(&key);
                let removed = remove_copy(&mut self.services, source, r);
                let now = self.selector_hashes(&key);
                reindex(&mut self.services_by_selector, &key, before, now);
                removed
            }
            Object::EndpointSlice(r) => {
                let key = key_of(&r.meta);
                let refs = self.slice_refs(&key);
                let removed = remove_copy(&mut self.endpoint_slices, source, r);
                self.reindex_slice(&key, refs);
                removed
            }
            Object::Pod(r) => {
                let key = key_of(&r.meta);
                let (before, nodes) = (self.pod_ips(&key), self.pod_nodes(&key));
                let removed = remove_copy(&mut self.pods, source, r);
                let now = self.pod_ips(&key);
                reindex(&mut self.pods_by_ip, &key, before, now);
                let nodes_now = self.pod_nodes(&key);
                reindex(&mut self.pods_by_node, &key, nodes, nodes_now);
                removed
            }
            Object::Node(r) => remove_copy(&mut self.nodes, source, r),
            Object::VirtualService(r) => {
                let key = key_of(&r.meta);
                let before = self.vs_hosts(&key);
                let delegates = self.vs_delegates(&key);
                let removed = remove_copy(&mut self.virtual_services, source, r);
                self.reindex_vs(&key, before, delegates);
                removed
            }
            Object::DestinationRule(r) => {
                let key = key_of(&r.meta);
                let before = self.dr_hosts(&key);
                let removed = remove_copy(&mut self.destination_rules, source, r);
                let now = self.dr_hosts(&key);
                reindex(&mut self.dr_by_host, &key, before, now);
                removed
            }
            Object::ServiceEntry(r) => {
                let key = key_of(&r.meta);
                let before = self.se_hosts(&key);
                let removed = remove_copy(&mut self.service_entries, source, r);
                let now = self.se_hosts(&key);
                reindex(&mut self.se_by_host, &key, before, now);
                removed
            }
            Object::WorkloadEntry(r) => remove_copy(&mut self.workload_entries, source, r),
            Object::Gateway(r) => remove_copy(&mut self.gateways, source, r),
            Object::Sidecar(r) => remove_copy(&mut self.sidecars, source, r),
            Object::Secret(r) => remove_copy(&mut self.secrets, source, r),
            Object::AuthorizationPolicy(r) => {
                remove_copy(&mut self.authorization_policies, source, r)
            }
        }
    }

    /// Where the copies of a Service are in `services_by_selector`.
    fn selector_hashes(&self, key: &Key) -> BTreeSet<u64> {
        copies(&self.services, key)
            .filter_map(|s| {
                let (k, v) = s.spec.spec.as_ref()?.selector.as_ref()?.iter().next()?;
                Some(selector_hash(&s.meta.namespace, k, v))
            })
            .collect()
    }

    /// The Services, Pods and Nodes the copies of a slice name.
    fn slice_refs(&self, key: &Key) -> SliceRefs {
        let services = copies(&self.endpoint_slices, key)
            .filter_map(|s| slice_service(s))
            .collect();
        let pods = copies(&self.endpoint_slices, key)
            .flat_map(|s| slice_pod_hashes(s))
            .collect();
        let nodes = copies(&self.endpoint_slices, key)
            .flat_map(|s| slice_nodes(s))
            .collect();
        (services, pods, nodes)
    }

    fn reindex_slice(&mut self, key: &Key, (services, pods, nodes): SliceRefs) {
        let (services_now, pods_now, nodes_now) = self.slice_refs(key);
        reindex(&mut self.slices_by_service, key, services, services_now);
        reindex(&mut self.slices_by_pod, key, pods, pods_now);
        reindex(&mut self.slices_by_node, key, nodes, nodes_now);
    }

    fn pod_nodes(&self, key: &Key) -> BTreeSet<String> {
        copies(&self.pods, key)
            .filter_map(|p| pod_node(p).map(str::to_string))
            .collect()
    }

    /// The Node `name` (its first copy), for the agent's own locality.
    pub fn node(&self, name: &str) -> Option<&Resource<Node>> {
        copies(&self.nodes, &(String::new(), name.to_string()))
            .next()
            .map(|n| &**n)
    }

    fn pod_ips(&self, key: &Key) -> BTreeSet<IpAddr> {
        copies(&self.pods, key)
            .flat_map(|p| pod_ips(&p.spec))
            .collect()
    }

    /// The exact hosts and whether any wildcard, over every copy at `key`.
    fn vs_hosts(&self, key: &Key) -> (BTreeSet<String>, bool) {
        let mut exact = BTreeSet::new();
        let mut wildcard = false;
        for vs in copies(&self.virtual_services, key) {
            for p in vs_patterns(vs) {
                if p.starts_with('*') {
                    wildcard = true;
                } else {
                    exact.insert(p);
                }
            }
        }
        (exact, wildcard)
    }

    /// The delegates named by every copy at `key`.
    fn vs_delegates(&self, key: &Key) -> BTreeSet<Key> {
        copies(&self.virtual_services, key)
            .flat_map(|vs| delegate_keys(vs))
            .map(std::sync::Arc::new)
            .collect()
    }

    fn reindex_vs(
        &mut self,
        key: &Key,
        (before, _): (BTreeSet<String>, bool),
        delegates: BTreeSet<Key>,
    ) {
        let delegates_now = self.vs_delegates(key);
        reindex(&mut self.vs_by_delegate, key, delegates, delegates_now);
        let (now, wildcard) = self.vs_hosts(key);
        reindex(&mut self.vs_by_host, key, before, now);
        if wildcard {
            self.vs_wildcard.insert(key.clone());
        } else {
            self.vs_wildcard.remove(key);
        }
    }

    fn dr_hosts(&self, key: &Key) -> BTreeSet<String> {
        copies(&self.destination_rules, key)
            .map(|dr| resolve_host(&dr.spec.host, &dr.meta.namespace))
            .collect()
    }

    fn se_hosts(&self, key: &Key) -> BTreeSet<String> {
        copies(&self.service_entries, key)
            .flat_map(|se| se.spec.hosts.iter().cloned())
            .collect()
    }

    fn resolved(&self) -> BTreeMap<String, Resolved> {
        let mut all = BTreeMap::new();
        for answers in self.resolved.values() {
            all.extend(answers.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        all
    }

    /// The VirtualServices that may claim `host` (any gateway binding; the compiler decides).
    fn virtual_services_for(&self, host: &str) -> BTreeSet<Key> {
        let mut keys: BTreeSet<Key> = self
            .vs_by_host
            .get(&host.to_ascii_lowercase())
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for key in &self.vs_wildcard {
            if copies(&self.virtual_services, key)
                .flat_map(|vs| vs_patterns(vs))
                .any(|p| p.starts_with('*') && host_matches(&p, host))
            {
                keys.insert(key.clone());
            }
        }
        keys
    }

    /// The whole configuration, every kind in key order.
    pub fn to_config(&self) -> ConfigSet {
        ConfigSet {
            services: all(&self.services),
            endpoint_slices: all(&self.endpoint_slices),
            pods: all(&self.pods),
            nodes: all(&self.nodes),
            virtual_services: all(&self.virtual_services),
            destination_rules: all(&self.destination_rules),
            service_entries: all(&self.service_entries),
            workload_entries: all(&self.workload_entries),
            gateways: all(&self.gateways),
            sidecars: all(&self.sidecars),
            secrets: all(&self.secrets),
            authorization_policies: all(&self.authorization_policies),
            resolved: self.resolved(),
        }
    }

    /// What authorization reads: the policies and the workloads they select (Pods,
    /// WorkloadEntries). Empty without policies.
    fn authz_config(&self) -> ConfigSet {
        if self.authorization_policies.is_empty() {
            return ConfigSet::default();
        }
        ConfigSet {
            authorization_policies: all(&self.authorization_policies),
            pods: all(&self.pods),
            workload_entries: all(&self.workload_entries),
            ..Default::default()
        }
    }

    /// What the DNS resolver needs to know which names to resolve: the ServiceEntries and
    /// WorkloadEntries.
    pub fn dns_config(&self) -> ConfigSet {
        ConfigSet {
            service_entries: all(&self.service_entries),
            workload_entries: all(&self.workload_entries),
            resolved: self.resolved(),
            ..Default::default()
        }
    }

    /// Everything compiling `hosts` reads, in the order [`Self::to_config`] would give it.
    fn sub_config(&self, hosts: &BTreeSet<String>) -> ConfigSet {
        let mut vs_keys = BTreeSet::new();
        for h in hosts {
            vs_keys.extend(self.virtual_services_for(h));
        }
        // The delegates of those VirtualServices (which name no hosts themselves).
        let delegates: BTreeSet<Key> = vs_keys
            .iter()
            .flat_map(|k| copies(&self.virtual_services, k).flat_map(|vs| delegate_keys(vs)))
            .filter(|k| self.virtual_services.contains_key(k))
            .map(std::sync::Arc::new)
            .collect();
        vs_keys.extend(delegates);
        // Hosts whose definitions, endpoints and DestinationRules are read: the compiled ones
        // and every host their VirtualServices send to.
        let mut defined: BTreeSet<String> = hosts.clone();
        for key in &vs_keys {
            for vs in copies(&self.virtual_services, key) {
                defined.extend(destination_hosts(vs));
            }
        }
        let (mut svc_keys, mut slice_keys, mut pod_keys) =
            (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        let (mut se_keys, mut we_namespaces, mut dr_keys) =
            (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        let select_pods =
            |pod_keys: &mut BTreeSet<Key>, namespace: &str, selector: &crate::model::Labels| {
                for p in in_namespace(&self.pods, namespace) {
                    if labels_match(selector, &p.meta.labels) {
                        pod_keys.insert(key_of(&p.meta));
                    }
                }
            };
        for host in &defined {
            if let Some((ns, name)) = kubernetes_service_of(host) {
                let key = new_key(ns, name);
                if self.services.contains_key(&*key) {
                    match self.slices_by_service.get(&key) {
                        Some(slices) => {
                            for s in slices {
                                for slice in copies(&self.endpoint_slices, s) {
                                    pod_keys.extend(slice_pods(slice));
                                }
                            }
                            slice_keys.extend(slices.iter().cloned());
                        }
                        None => {
                            for svc in copies(&self.services, &key) {
                                if let Some(selector) = svc
                                    .spec
                                    .spec
                                    .as_ref()
                                    .and_then(|s| s.selector.as_ref())
                                    .filter(|s| !s.is_empty())
                                {
                                    select_pods(&mut pod_keys, ns, selector);
                                }
                            }
                        }
                    }
                    svc_keys.insert(key);
                }
            }
            for key in self.se_by_host.get(host).into_iter().flatten() {
                for se in copies(&self.service_entries, key) {
                    if let Some(selector) = &se.spec.workload_selector {
                        select_pods(&mut pod_keys, &key.0, &selector.labels.clone().into());
                        we_namespaces.insert(key.0.clone());
                    }
                }
                se_keys.insert(key.clone());
            }
            dr_keys.extend(self.dr_by_host.get(host).into_iter().flatten().cloned());
        }
        fn pick<T>(map: &ByKey<T>, keys: &BTreeSet<Key>) -> Vec<Shared<T>> {
            keys.iter().flat_map(|k| copies(map, k).cloned()).collect()
        }
        let pods = pick(&self.pods, &pod_keys);
        let endpoint_slices = pick(&self.endpoint_slices, &slice_keys);
        // The Nodes those Pods and slice endpoints run on, for their localities.
        let node_keys: BTreeSet<Key> = pods
            .iter()
            .filter_map(|p| pod_node(p).map(str::to_string))
            .chain(endpoint_slices.iter().flat_map(|s| slice_nodes(s)))
            .map(|n| std::sync::Arc::new((String::new(), n)))
            .collect();
        ConfigSet {
            services: pick(&self.services, &svc_keys),
            endpoint_slices,
            pods,
            nodes: pick(&self.nodes, &node_keys),
            virtual_services: pick(&self.virtual_services, &vs_keys),
            destination_rules: pick(&self.destination_rules, &dr_keys),
            service_entries: pick(&self.service_entries, &se_keys),
            workload_entries: we_namespaces
                .iter()
                .flat_map(|ns| in_namespace(&self.workload_entries, ns).cloned())
                .collect(),
            resolved: self.resolved(),
            ..Default::default()
        }
    }
}

/// What the agent has to write after some changes.
#[derive(Debug, Default)]
pub struct Dirty {
    /// VIPs whose entry may have changed, with the entry now (None: removed).
    pub services: BTreeMap<VipKey, Option<std::sync::Arc<ServicePlan>>>,
    /// Registered destinations that appeared / disappeared.
    pub registered_added: BTreeSet<IpNet>,
    pub registered_removed: BTreeSet<IpNet>,
    /// The mesh-wide or a workload's outbound policy may have changed.
    pub egress_policy: bool,
    /// Pods by IP changed.
    pub sources: bool,
    /// An HTTP (L7) service was added, changed or removed.
    pub l7: bool,
    /// The diagnostics changed.
    pub diagnostics: bool,
    /// The authorization plan was recompiled.
    pub authz: bool,
    /// Service hosts recompiled.
    pub hosts: usize,
    /// Removals of objects the source had not sent (a source bug; counted, then ignored).
    pub unknown_removals: usize,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.registered_added.is_empty()
            && self.registered_removed.is_empty()
            && !self.egress_policy
            && !self.sources
            && !self.diagnostics
            && !self.authz
    }
}

/// The agent's compiler: the store, the plan, and per host what it contributed.
#[derive(Debug, Default)]
pub struct IncrementalCompiler {
    store: Store,
    hosts: BTreeMap<String, HostOutput>,
    /// Hosts with upper-case letters, by lower-cased name (VirtualService hosts match
    /// case-insensitively; an all-lower-case host is its own lower-cased name, so it needs no
    /// entry).
    hosts_lower: HashMap<String, SmallSet<String>>,
    /// For each host, the hosts whose routes send to it.
    dependents: HashMap<String, SmallSet<String>>,
    /// The hosts claiming each VIP:port; the last by name wins, as in [`compile`].
    vip_owners: BTreeMap<VipKey, SmallSet<String>>,
    /// How many hosts register each destination.
    registered: BTreeMap<IpNet, u32>,
    /// Findings about AuthorizationPolicies.
    authz_diagnostics: Vec<super::Diagnostic>,
    plan: Plan,
    dirty: Dirty,
}

impl IncrementalCompiler {
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Every registered destination (see [`super::registered`]), in order.
    pub fn registered(&self) -> impl Iterator<Item = &IpNet> {
        self.registered.keys()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Takes what changed since the last call.
    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    /// Marks VIPs to be written again (after a failed write).
    pub fn mark_dirty(&mut self, keys: impl IntoIterator<Item = VipKey>) {
        for key in keys {
            let entry = self.plan.services.get(&key).cloned();
            self.dirty.services.insert(key, entry);
        }
    }

    /// Replaces everything `source` served with `config` (a source's first or complete view).
    pub fn replace_source(&mut self, source: SourceId, config: ConfigSet) {
        let mut changes = Vec::new();
        macro_rules! old {
            ($field:ident, $variant:ident) => {
                for copies in self.store.$field.values() {
                    for (s, r) in copies {
                        if *s == source {
                            changes.push(Change::Removed(Object::$variant(r.clone())));
                        }
                    }
                }
            };
        }
        old!(services, Service);
        old!(endpoint_slices, EndpointSlice);
        old!(pods, Pod);
        old!(nodes, Node);
        old!(virtual_services, VirtualService);
        old!(destination_rules, DestinationRule);
        old!(service_entries, ServiceEntry);
        old!(workload_entries, WorkloadEntry);
        old!(gateways, Gateway);
        old!(sidecars, Sidecar);
        old!(secrets, Secret);
        old!(authorization_policies, AuthorizationPolicy);
        let ConfigSet {
            services,
            endpoint_slices,
            pods,
            nodes,
            virtual_services,
            destination_rules,
            service_entries,
            workload_entries,
            gateways,
            sidecars,
            secrets,
            authorization_policies,
            resolved,
        } = config;
        let added = services
            .into_iter()
            .map(Object::Service)
            .chain(endpoint_slices.into_iter().map(Object::EndpointSlice))
            .chain(pods.into_iter().map(Object::Pod))
            .chain(nodes.into_iter().map(Object::Node))
            .chain(virtual_services.into_iter().map(Object::VirtualService))
            .chain(destination_rules.into_iter().map(Object::DestinationRule))
            .chain(service_entries.into_iter().map(Object::ServiceEntry))
            .chain(workload_entries.into_iter().map(Object::WorkloadEntry))
            .chain(gateways.into_iter().map(Object::Gateway))
            .chain(sidecars.into_iter().map(Object::Sidecar))
            .chain(secrets.into_iter().map(Object::Secret))
            .chain(
                authorization_policies
                    .into_iter()
                    .map(Object::AuthorizationPolicy),
            );
        changes.extend(added.map(Change::Added));
        self.apply_with_resolved(source, changes, Some(resolved));
    }

    /// Applies one source's changes, in order, and recompiles what they affect.
    pub fn apply(&mut self, source: SourceId, changes: Vec<Change>) {
        self.apply_with_resolved(source, changes, None);
    }

    fn apply_with_resolved(
        &mut self,
        source: SourceId,
        changes: Vec<Change>,
        resolved: Option<BTreeMap<String, Resolved>>,
    ) {
        let mut effects = Effects::default();
        for change in changes {
            match change {
                Change::Removed(object) => {
                    self.affected_by(&object, &mut effects);
                    if !self.store.remove(source, &object) {
                        // A source's changes that do not match what it sent before; the agent
                        // reports it (the compiler stays free of I/O).
                        self.dirty.unknown_removals += 1;
                    }
                }
                Change::Added(object) => {
                    self.affected_by(&object, &mut effects);
                    self.store.add(source, object);
                }
            }
        }
        if let Some(resolved) = resolved {
            let before = self.store.resolved.get(&source);
            if before != Some(&resolved) && !(before.is_none() && resolved.is_empty()) {
                // Only DNS ServiceEntries read answers.
                for copies in self.store.service_entries.values() {
                    for (_, se) in copies {
                        if matches!(
                            se.spec.resolution,
                            istio::Resolution::Dns | istio::Resolution::DnsRoundRobin
                        ) {
                            effects.hosts.extend(se.spec.hosts.iter().cloned());
                        }
                    }
                }
                if resolved.is_empty() {
                    self.store.resolved.remove(&source);
                } else {
                    self.store.resolved.insert(source, resolved);
                }
            }
        }
        if effects.sidecars {
            let policy = mesh_registry_only(&ConfigSet {
                sidecars: all(&self.store.sidecars),
                ..Default::default()
            });
            if policy != self.plan.egress.registry_only {
                self.plan.egress.registry_only = policy;
                self.dirty.egress_policy = true;
            }
        }
        // Per-workload policies follow Sidecars and Pods (labels, uids); without Sidecars of
        // their own in any namespace, Pod churn costs nothing here.
        if effects.sidecars || (effects.pods && !self.store.sidecars.is_empty()) {
            let sidecars = all(&self.store.sidecars);
            let pods = self
                .store
                .pods
                .values()
                .flat_map(|c| c.iter().map(|(_, r)| &**r));
            let workloads = super::egress::compile(pods, &sidecars);
            if workloads != self.plan.egress.workloads {
                self.plan.egress.workloads = workloads;
                self.dirty.egress_policy = true;
            }
        }
        self.update_sources(&effects.ips);
        self.recompile(effects.hosts);
        // Authorization is compiled as a whole (it is per workload, not per host), when its
        // inputs changed: policies, the workloads they select, or the endpoints served by L7.
        if effects.authz || self.dirty.l7 {
            self.recompile_authz();
        }
    }

    fn recompile_authz(&mut self) {
        let config = self.store.authz_config();
        if config.authorization_policies.is_empty() && self.plan.authz.policies.is_empty() {
            return;
        }
        let mut diagnostics = Vec::new();
        let authz = super::authz::compile(
            &config,
            &super::http_endpoints(&self.plan.services),
            &mut diagnostics,
        );
        diagnostics.sort();
        diagnostics.dedup();
        self.plan.authz = std::sync::Arc::new(authz);
        self.dirty.authz = true;
        if diagnostics != self.authz_diagnostics {
            self.authz_diagnostics = diagnostics;
            self.flatten_diagnostics();
        }
    }

    fn flatten_diagnostics(&mut self) {
        let mut all: Vec<_> = self
            .hosts
            .values()
            .flat_map(|o| o.diagnostics.iter().cloned())
            .chain(self.authz_diagnostics.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        self.dirty.diagnostics |= all != self.plan.diagnostics;
        self.plan.diagnostics = all;
    }

    /// Points each of `ips` at the first pod (by namespace/name) that has it.
    fn update_sources(&mut self, ips: &BTreeSet<IpAddr>) {
        for ip in ips {
            let source = self
                .store
                .pods_by_ip
                .get(ip)
                .and_then(|keys| keys.first())
                .and_then(|key| {
                    copies(&self.store.pods, key).find(|p| pod_ips(&p.spec).contains(ip))
                })
                .map(|p| std::sync::Arc::new(source_of(p)));
            let before = match source {
                Some(s) => self
                    .plan
                    .sources
                    .insert(*ip, s.clone())
                    .filter(|b| *b == s)
                    .is_none(),
                None => self.plan.sources.remove(ip).is_some(),
            };
            self.dirty.sources |= before;
        }
    }

    /// Recompiles `affected` hosts (and the hosts whose routes send to them) and patches the
    /// plan.
    fn recompile(&mut self, mut affected: BTreeSet<String>) {
        let dependents: Vec<String> = affected
            .iter()
            .flat_map(|h| self.dependents.get(h).into_iter().flatten().cloned())
            .collect();
        affected.extend(dependents);
        if affected.is_empty() {
            return;
        }
        self.dirty.hosts += affected.len();
        let only: HashSet<String> = affected.iter().cloned().collect();
        // A large share of all hosts (the first configuration, a relist) is compiled from the
        // whole configuration at once rather than a sub-configuration per host.
        let config = if affected.len() * 2 > self.hosts.len().max(1) {
            self.store.to_config()
        } else {
            self.store.sub_config(&affected)
        };
        let mut outputs = compile_hosts(&config, Some(&only));
        let mut touched: BTreeSet<VipKey> = BTreeSet::new();
        let mut diagnostics_changed = false;
        for host in affected {
            let new = outputs.remove(&host);
            let old = self.hosts.remove(&host);
            let unchanged = match (&old, &new) {
                (Some(o), Some(n)) => o.same_as(n),
                (None, None) => true,
                _ => false,
            };
            if unchanged {
                if let Some(old) = old {
                    self.hosts.insert(host, old);
                }
                continue;
            }
            if let Some(old) = &old {
                diagnostics_changed |= new
                    .as_ref()
                    .is_none_or(|n| n.diagnostics != old.diagnostics);
                for r in &old.references {
                    if let Some(d) = self.dependents.get_mut(r) {
                        d.remove(&host);
                        if d.is_empty() {
                            self.dependents.remove(r);
                        }
                    }
                }
                for (key, _) in &old.services {
                    touched.insert(*key);
                    if let Some(owners) = self.vip_owners.get_mut(key) {
                        owners.remove(&host);
                        if owners.is_empty() {
                            self.vip_owners.remove(key);
                        }
                    }
                }
                for net in &old.registered {
                    if let Some(n) = self.registered.get_mut(net) {
                        *n -= 1;
                        if *n == 0 {
                            self.registered.remove(net);
                            if !self.dirty.registered_added.remove(net) {
                                self.dirty.registered_removed.insert(*net);
                            }
                        }
                    }
                }
                self.dirty.l7 |= old.services.iter().any(|(_, s)| s.http.is_some());
                let lower = host.to_ascii_lowercase();
                if lower != host
                    && let Some(set) = self.hosts_lower.get_mut(&lower)
                {
                    set.remove(&host);
                    if set.is_empty() {
                        self.hosts_lower.remove(&lower);
                    }
                }
            }
            if let Some(new) = new {
                diagnostics_changed |= old.is_none() && !new.diagnostics.is_empty();
                for r in &new.references {
                    self.dependents
                        .entry(r.clone())
                        .or_default()
                        .insert(host.clone());
                }
                for (key, _) in &new.services {
                    touched.insert(*key);
                    self.vip_owners
                        .entry(*key)
                        .or_default()
                        .insert(host.clone());
                }
                for net in &new.registered {
                    let n = self.registered.entry(*net).or_default();
                    *n += 1;
                    if *n == 1 && !self.dirty.registered_removed.remove(net) {
                        self.dirty.registered_added.insert(*net);
                    }
                }
                self.dirty.l7 |= new.services.iter().any(|(_, s)| s.http.is_some());
                let lower = host.to_ascii_lowercase();
                if lower != host {
                    self.hosts_lower
                        .entry(lower)
                        .or_default()
                        .insert(host.clone());
                }
                self.hosts.insert(host, new);
            }
        }
        for key in touched {
            let entry = self
                .vip_owners
                .get(&key)
                .and_then(|owners| owners.last())
                .and_then(|owner| self.hosts.get(owner))
                .and_then(|out| out.services.iter().rev().find(|(k, _)| *k == key))
                .map(|(_, s)| s.clone());
            let previous = match &entry {
                Some(s) => self.plan.services.insert(key, s.clone()),
                None => self.plan.services.remove(&key),
            };
            let same = match (&previous, &entry) {
                (Some(p), Some(e)) => {
                    std::sync::Arc::ptr_eq(p, e) || format!("{p:?}") == format!("{e:?}")
                }
                (None, None) => true,
                _ => false,
            };
            if !same {
                self.dirty.services.insert(key, entry);
            }
        }
        if diagnostics_changed {
            self.flatten_diagnostics();
        }
    }

    /// The hosts a VirtualService names (and so routes).
    fn vs_affects(&self, vs: &Resource<istio::VirtualService>, hosts: &mut BTreeSet<String>) {
        for pattern in vs_patterns(vs) {
            if pattern.starts_with('*') {
                hosts.extend(
                    self.hosts
                        .keys()
                        .filter(|h| host_matches(&pattern, h))
                        .cloned(),
                );
            } else {
                hosts.extend(
                    self.hosts_lower
                        .get(&pattern)
                        .into_iter()
                        .flatten()
                        .cloned(),
                );
                hosts.insert(pattern);
            }
        }
    }

    /// The hosts a Pod is an endpoint of: through EndpointSlices naming it, Service selectors
    /// and ServiceEntry workload selectors.
    fn pod_affects(&self, r: &Resource<Pod>, hosts: &mut BTreeSet<String>) {
        let pod = pod_key_hash(&r.meta.namespace, &r.meta.name);
        for slice in self.store.slices_by_pod.get(&pod).into_iter().flatten() {
            for s in copies(&self.store.endpoint_slices, slice) {
                if let Some(key) = slice_service(s) {
                    let (ns, svc) = &*key;
                    hosts.insert(kubernetes_service_host(ns, svc));
                }
            }
        }
        let ns = &r.meta.namespace;
        let candidates: BTreeSet<&Key> = r
            .meta
            .labels
            .iter()
            .filter_map(|(k, v)| {
                self.store
                    .services_by_selector
                    .get(&selector_hash(ns, k, v))
            })
            .flatten()
            .collect();
        for svc in candidates
            .into_iter()
            .flat_map(|key| copies(&self.store.services, key))
        {
            // A hash collision can name another namespace's Service or one that does not match.
            let selects = svc.meta.namespace == *ns
                && svc
                    .spec
                    .spec
                    .as_ref()
                    .and_then(|s| s.selector.as_ref())
                    .is_some_and(|sel| !sel.is_empty() && labels_match(sel, &r.meta.labels));
            if selects {
                hosts.insert(kubernetes_service_host(&svc.meta.namespace, &svc.meta.name));
            }
        }
        for se in in_namespace(&self.store.service_entries, &r.meta.namespace) {
            if se
                .spec
                .workload_selector
                .as_ref()
                .is_some_and(|sel| labels_match(&sel.labels, &r.meta.labels))
            {
                hosts.extend(se.spec.hosts.iter().cloned());
            }
        }
    }

    /// Records what `object` (as it is, or was) can affect.
    fn affected_by(&self, object: &Object, effects: &mut Effects) {
        let Effects { hosts, ips, .. } = effects;
        match object {
            Object::Service(r) => {
                hosts.insert(kubernetes_service_host(&r.meta.namespace, &r.meta.name));
            }
            Object::EndpointSlice(r) => {
                if let Some(key) = slice_service(r) {
                    let (ns, svc) = &*key;
                    hosts.insert(kubernetes_service_host(ns, svc));
                }
            }
            Object::Pod(r) => {
                effects.authz = true;
                effects.pods = true;
                ips.extend(pod_ips(&r.spec));
                self.pod_affects(r, hosts);
            }
            Object::Node(r) => {
                // Its topology is the locality of the endpoints on it: those of its Pods, and
                // slice endpoints that name it.
                let name = &r.meta.name;
                for key in self.store.pods_by_node.get(name).into_iter().flatten() {
                    for pod in copies(&self.store.pods, key) {
                        self.pod_affects(pod, hosts);
                    }
                }
                for slice in self.store.slices_by_node.get(name).into_iter().flatten() {
                    for s in copies(&self.store.endpoint_slices, slice) {
                        if let Some(key) = slice_service(s) {
                            let (ns, svc) = &*key;
                            hosts.insert(kubernetes_service_host(ns, svc));
                        }
                    }
                }
            }
            Object::VirtualService(r) => {
                // As a delegate, it changes the routes of the VirtualServices delegating to it.
                let roots = self.store.vs_by_delegate.get(&key_of(&r.meta));
                let root_copies = roots
                    .into_iter()
                    .flatten()
                    .flat_map(|k| copies(&self.store.virtual_services, k));
                for vs in std::iter::once(r).chain(root_copies) {
                    self.vs_affects(vs, hosts);
                }
            }
            Object::DestinationRule(r) => {
                hosts.insert(resolve_host(&r.spec.host, &r.meta.namespace));
            }
            Object::ServiceEntry(r) => hosts.extend(r.spec.hosts.iter().cloned()),
            Object::WorkloadEntry(r) => {
                effects.authz = true;
                for se in in_namespace(&self.store.service_entries, &r.meta.namespace) {
                    if se.spec.workload_selector.is_some() {
                        hosts.extend(se.spec.hosts.iter().cloned());
                    }
                }
            }
            Object::Sidecar(_) => effects.sidecars = true,
            Object::AuthorizationPolicy(_) => effects.authz = true,
            Object::Gateway(_) | Object::Secret(_) => {}
        }
    }
}

/// What a batch of changes affects.
#[derive(Debug, Default)]
struct Effects {
    hosts: BTreeSet<String>,
    ips: BTreeSet<IpAddr>,
    sidecars: bool,
    /// A Pod changed (its labels or uid may put it under another Sidecar).
    pods: bool,
    /// Policies or the workloads they select changed.
    authz: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile;
    use crate::model::parse_documents;
    use proptest::prelude::*;

    /// One object of a small universe: `template` picks what it is (and so its key), `version`
    /// a variant of it. Variants change exactly what the incremental compiler must follow:
    /// selectors, labels, IPs (also clashing ones), routes across hosts, wildcard hosts,
    /// subsets, ServiceEntries sharing a Service's host, DNS answers' consumers, policies.
    fn object(template: u8, version: u8) -> Object {
        let ns = if template.is_multiple_of(2) { "a" } else { "b" };
        let n = (template / 2) % 3;
        let v = version % 3;
        let text = match (template / 6) % 10 {
            0 => {
                // Version 2 makes every such Service claim one VIP.
                let ip = if v == 2 {
                    "0.1".to_string()
                } else {
                    format!("{}.{}", template % 2, n + 1)
                };
                let selector = if v == 1 {
                    String::new()
                } else {
                    format!("selector: {{app: s{n}}}")
                };
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{n}, namespace: {ns}}}\nspec:\n  clusterIP: 10.96.{ip}\n  {selector}\n  ports:\n  - {{name: tcp, port: 80, targetPort: 8080}}\n  - {{name: http-web, port: 8000, targetPort: 9000}}\n"
                )
            }
            1 => {
                let extra = if v == 1 {
                    format!(
                        "\n- addresses: [10.1.9.{n}]\n  targetRef: {{kind: Pod, name: p{}}}",
                        (n + 1) % 3
                    )
                } else {
                    String::new()
                };
                let ready = if v == 2 { "false" } else { "true" };
                // An endpoint of no Pod: its locality comes from the Node it names, or its zone.
                let podless = match v {
                    0 => format!("\n- addresses: [10.1.8.{n}]\n  nodeName: n{n}-{ns}"),
                    1 => "\n- addresses: [10.1.8.9]\n  nodeName: n9\n  zone: z9".to_string(),
                    _ => String::new(),
                };
                format!(
                    "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{n}-x, namespace: {ns}, labels: {{kubernetes.io/service-name: s{n}}}}}\naddressType: IPv4\nports: [{{name: tcp, port: 8080}}, {{name: http-web, port: 9000}}]\nendpoints:\n- addresses: [10.1.0.{n}]\n  conditions: {{ready: {ready}}}\n  targetRef: {{kind: Pod, name: p{n}}}{extra}{podless}\n"
                )
            }
            2 => {
                let app = if v == 1 { (n + 1) % 3 } else { n };
                let version = if v == 2 { "v2" } else { "v1" };
                let ip = if v == 2 { 0 } else { n };
                // On a Node of the universe; version 2 also has its own locality label.
                let node = (n + v) % 3;
                let locality = if v == 2 { ", istio-locality: r.zl" } else { "" };
                format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{n}, namespace: {ns}, uid: u-{ns}-{n}, labels: {{app: s{app}, version: {version}{locality}}}}}\nspec: {{nodeName: n{node}-{ns}, containers: [{{name: c, image: x}}]}}\nstatus: {{phase: Running, podIP: 10.1.0.{ip}}}\n"
                )
            }
            3 => {
                let host = match v {
                    0 => format!("s{n}"),
                    1 => format!("\"*.{ns}.svc.cluster.local\""),
                    _ => format!("s{n}"),
                };
                let dest = if v == 2 { (n + 1) % 3 } else { n };
                // Delegation to a VirtualService of this namespace, or (v2) of the other one.
                let delegate_ns = match (v, ns) {
                    (2, "a") => "b",
                    (2, _) => "a",
                    _ => ns,
                };
                format!(
                    "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs{n}, namespace: {ns}}}\nspec:\n  hosts: [{host}]\n  tcp:\n  - route:\n    - destination: {{host: s{dest}, subset: v1}}\n      weight: 70\n    - destination: {{host: s{dest}, subset: v2}}\n      weight: 30\n  http:\n  - match: [{{headers: {{x: {{exact: y}}}}}}]\n    route:\n    - destination: {{host: s{dest}, subset: v2}}\n  - match: [{{uri: {{prefix: /d}}}}]\n    delegate: {{name: dvs{n}, namespace: {delegate_ns}}}\n  - route:\n    - destination: {{host: s{n}}}\n"
                )
            }
            4 => {
                let label = if v == 1 { "app" } else { "version" };
                format!(
                    "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: dr{n}, namespace: {ns}}}\nspec:\n  host: s{n}\n  subsets:\n  - {{name: v1, labels: {{{label}: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n"
                )
            }
            5 => {
                let host = if v == 1 {
                    format!("s{n}.{ns}.svc.cluster.local")
                } else {
                    format!("ext{n}.example.com")
                };
                let endpoints = if v == 2 {
                    "workloadSelector: {labels: {app: we}}".to_string()
                } else {
                    format!("endpoints: [{{address: 10.3.0.{n}}}]")
                };
                format!(
                    "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: se{n}, namespace: {ns}}}\nspec:\n  hosts: [{host}]\n  addresses: [240.0.{n}.0/24]\n  ports: [{{number: 80, name: tcp, protocol: TCP}}]\n  resolution: STATIC\n  location: MESH_EXTERNAL\n  {endpoints}\n"
                )
            }
            6 => {
                let app = if v == 1 { "other" } else { "we" };
                format!(
                    "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: we{n}, namespace: {ns}}}\nspec: {{address: 10.4.0.{n}, labels: {{app: {app}}}}}\n"
                )
            }
            8 => {
                let spec = match v {
                    0 => format!(
                        "{{selector: {{matchLabels: {{app: s{n}}}}}, action: DENY, rules: [{{from: [{{source: {{ipBlocks: [10.1.0.{n}/32]}}}}], to: [{{operation: {{ports: [\"8080\"]}}}}]}}]}}"
                    ),
                    1 => "{action: ALLOW, rules: [{from: [{source: {namespaces: [a]}}]}]}"
                        .to_string(),
                    _ => format!("{{selector: {{matchLabels: {{app: s{n}}}}}}}"),
                };
                format!(
                    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ap{n}, namespace: {ns}}}\nspec: {spec}\n"
                )
            }
            7 => {
                // A Node (cluster-scoped; named after the template's namespace so that each
                // template is its own object), whose zone changes, or which loses its topology
                // labels.
                let labels = match v {
                    2 => String::new(),
                    _ => format!(
                        "labels: {{topology.kubernetes.io/region: r, topology.kubernetes.io/zone: z{v}}}"
                    ),
                };
                format!("apiVersion: v1\nkind: Node\nmetadata: {{name: n{n}-{ns}, {labels}}}\n")
            }
            9 => {
                // A delegate: its routes' hosts, a version that names hosts (and so is no
                // delegate), and one whose match conflicts with the root's (dropped).
                let dest = (n + v) % 3;
                let (hosts, prefix) = match v {
                    1 => (format!("  hosts: [s{n}]\n"), "/d/x"),
                    2 => (String::new(), "/e"),
                    _ => (String::new(), "/d/x"),
                };
                format!(
                    "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: dvs{n}, namespace: {ns}}}\nspec:\n{hosts}  http:\n  - match: [{{uri: {{prefix: {prefix}}}}}]\n    route:\n    - destination: {{host: s{dest}, subset: v1}}\n  - route:\n    - destination: {{host: s{dest}}}\n"
                )
            }
            _ => {
                let mode = if v == 1 { "ALLOW_ANY" } else { "REGISTRY_ONLY" };
                // The mesh default, a namespace's default, a workload's (by label; without a
                // mode in one version).
                let (namespace, spec) = match n {
                    0 => (
                        "istio-system",
                        format!("{{outboundTrafficPolicy: {{mode: {mode}}}}}"),
                    ),
                    1 => (ns, format!("{{outboundTrafficPolicy: {{mode: {mode}}}}}")),
                    _ if v == 2 => (
                        ns,
                        "{workloadSelector: {labels: {app: s1}}, egress: [{hosts: [\"./*\"]}]}"
                            .to_string(),
                    ),
                    _ => (
                        ns,
                        format!(
                            "{{workloadSelector: {{labels: {{app: s{v}}}}}, outboundTrafficPolicy: {{mode: {mode}}}}}"
                        ),
                    ),
                };
                format!(
                    "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: sc{n}-{ns}, namespace: {namespace}}}\nspec: {spec}\n"
                )
            }
        };
        let (mut objects, errors) = parse_documents("prop.yaml", &text);
        assert!(errors.is_empty(), "{text}\n{errors:?}");
        objects.remove(0)
    }

    const TEMPLATES: u8 = 60;

    fn same_plan(got: &Plan, want: &Plan) -> Result<(), TestCaseError> {
        prop_assert_eq!(
            format!("{:#?}", got.services),
            format!("{:#?}", want.services)
        );
        prop_assert_eq!(&got.diagnostics, &want.diagnostics);
        prop_assert_eq!(&got.egress, &want.egress);
        let authz = |p: &Plan| {
            let mut namespaces: Vec<_> = p.authz.namespaces.iter().collect();
            namespaces.sort();
            format!(
                "{:?} {:?} {:?} {namespaces:?}",
                p.authz.policies, p.authz.workloads, p.authz.kernel
            )
        };
        prop_assert_eq!(authz(got), authz(want));
        let sorted = |p: &Plan| {
            let mut v: Vec<_> = p
                .sources
                .iter()
                .map(|(ip, s)| format!("{ip} {s:?}"))
                .collect();
            v.sort();
            v
        };
        prop_assert_eq!(sorted(got), sorted(want));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// After every change, the patched plan is the plan of the whole configuration.
        #[test]
        fn incremental_plans_equal_full_compiles(
            steps in prop::collection::vec((0..TEMPLATES, 0u8..3, 0usize..2, any::<bool>()), 1..40)
        ) {
            let mut inc = IncrementalCompiler::default();
            // What each source serves, by template.
            let mut served: [BTreeMap<u8, Object>; 2] = Default::default();
            for (template, version, source, remove) in steps {
                let old = served[source].get(&template).cloned();
                let mut changes = Vec::new();
                if let Some(old) = old.clone() {
                    changes.push(Change::Removed(old));
                    served[source].remove(&template);
                }
                if !(remove && old.is_some()) {
                    let new = object(template, version);
                    served[source].insert(template, new.clone());
                    changes.push(Change::Added(new));
                }
                inc.apply(source, changes);
                let mut full = ConfigSet::default();
                for objects in &served {
                    full.extend(objects.values().cloned());
                }
                let want = compile(&full);
                same_plan(inc.plan(), &want)?;
                let registered: BTreeSet<IpNet> = inc.registered().copied().collect();
                prop_assert_eq!(registered, super::super::registered(&full));
                let from_store = compile(&inc.store().to_config());
                same_plan(&from_store, &want)?;
            }
        }
    }

    #[test]
    fn a_node_relabelled_recompiles_the_hosts_with_endpoints_on_it() {
        let text = |zone: &str| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: n1, labels: {{topology.kubernetes.io/region: r, topology.kubernetes.io/zone: {zone}}}}}\n"
            )
        };
        let parse = |t: &str| parse_documents("n.yaml", t).0;
        let world = "apiVersion: v1\nkind: Service\nmetadata: {name: on, namespace: a}\nspec: {clusterIP: 10.96.1.1, selector: {app: on}, ports: [{name: http, port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: off, namespace: a}\nspec: {clusterIP: 10.96.1.2, selector: {app: off}, ports: [{name: http, port: 80}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p1, namespace: a, labels: {app: on}}\nspec: {nodeName: n1, containers: [{name: c, image: x}]}\nstatus: {podIP: 10.1.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p2, namespace: a, labels: {app: off}}\nspec: {nodeName: n2, containers: [{name: c, image: x}]}\nstatus: {podIP: 10.1.0.2}\n";
        let mut inc = IncrementalCompiler::default();
        let mut objects = parse(world);
        objects.extend(parse(&text("z1")));
        inc.apply(0, objects.into_iter().map(Change::Added).collect());
        let _ = inc.take_dirty();
        let locality = |inc: &IncrementalCompiler| {
            inc.plan()
                .services
                .values()
                .find(|s| s.host == "on.a.svc.cluster.local")
                .map(|s| s.backends[0].locality.clone())
        };
        assert_eq!(locality(&inc).as_deref(), Some("r/z1"));
        let mut changes: Vec<Change> = parse(&text("z1"))
            .into_iter()
            .map(Change::Removed)
            .collect();
        changes.extend(parse(&text("z2")).into_iter().map(Change::Added));
        inc.apply(0, changes);
        let dirty = inc.take_dirty();
        assert_eq!(
            dirty.hosts, 1,
            "only the host with an endpoint on n1: {dirty:?}"
        );
        assert_eq!(locality(&inc).as_deref(), Some("r/z2"));
    }

    #[test]
    fn a_virtual_service_reaches_a_mixed_case_host_in_any_case() {
        let parse = |t: &str| parse_documents("x.yaml", t).0;
        let entry = |name: &str, host: &str, vip: &str, endpoint: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: a}}\nspec:\n  hosts: [{host}]\n  addresses: [{vip}]\n  ports: [{{number: 80, name: tcp, protocol: TCP}}]\n  resolution: STATIC\n  endpoints: [{{address: {endpoint}}}]\n---\n"
            )
        };
        let world = entry("ext", "Ext.Example.com", "240.0.0.1", "10.2.0.1")
            + &entry("other", "other.example.com", "240.0.0.2", "10.2.0.9");
        let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: to-other, namespace: a}\nspec:\n  hosts: [ext.example.com]\n  tcp:\n  - route:\n    - destination: {host: other.example.com}\n";
        let mut inc = IncrementalCompiler::default();
        inc.apply(0, parse(&world).into_iter().map(Change::Added).collect());
        inc.apply(0, parse(vs).into_iter().map(Change::Added).collect());
        let mut full = ConfigSet::default();
        full.extend(parse(&world));
        full.extend(parse(vs));
        assert_eq!(
            format!("{:#?}", inc.plan().services),
            format!("{:#?}", compile(&full).services)
        );
        let ext = inc
            .plan()
            .services
            .values()
            .find(|s| s.host == "Ext.Example.com")
            .expect("the mixed-case host is in the plan");
        assert_eq!(ext.backends[0].addr.ip().to_string(), "10.2.0.9", "{ext:?}");
    }

    #[test]
    fn a_weight_change_recompiles_one_host() {
        let mut inc = IncrementalCompiler::default();
        let mut objects: Vec<Object> = Vec::new();
        for t in 0..TEMPLATES {
            objects.push(object(t, 0));
        }
        inc.apply(0, objects.iter().cloned().map(Change::Added).collect());
        let _ = inc.take_dirty();
        // VirtualService vs0 in namespace a (template 18) matches another header value: its
        // one host is recompiled and only the HTTP port's entry is rewritten.
        let vs = object(18, 0);
        let Object::VirtualService(mut changed) = vs.clone() else {
            panic!("template 18 is a VirtualService")
        };
        std::sync::Arc::make_mut(&mut changed).spec.http[0].matches[0]
            .headers
            .insert("x".into(), istio::StringMatch::Exact("z".into()));
        inc.apply(
            0,
            vec![
                Change::Removed(vs),
                Change::Added(Object::VirtualService(changed)),
            ],
        );
        let dirty = inc.take_dirty();
        assert_eq!(dirty.hosts, 1, "{dirty:?}");
        let keys: Vec<String> = dirty.services.keys().map(|k| k.to_string()).collect();
        assert_eq!(keys, ["10.96.0.1:8000/TCP"]);
        assert!(dirty.l7);
        assert!(dirty.registered_added.is_empty() && dirty.registered_removed.is_empty());
    }
}
