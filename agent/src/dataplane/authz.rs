//! AuthorizationPolicy in the kernel: writing the compiled per-destination source tables into
//! `sd_authz_dst_v1`/`sd_authz_src_v1` without a SYN ever meeting a half-written table, reading
//! them back (`steerd maps authz`), and attaching the TC program to the node side of pod veths.
//!
//! Which interfaces: every interface of the agent's network namespace whose name matches one of
//! the `--policy-interface` globs (default: the host-side veth names of common CNIs, see
//! [`DEFAULT_INTERFACES`]), looked for again every [`RESCAN`] so new pods are covered. The
//! program runs on egress, i.e. on packets going into the pod, whether the client is a pod of
//! this node or comes from another node. It needs TCX links (Linux ≥ 6.6), pinned as
//! `links/sd_authz_if<ifindex>` so that enforcement survives agent restarts like steering does.

use super::bpf::{DataplaneError, Pins};
use super::kernel::{addr_of, ip_of};
use crate::compile::authz::{KernelAuthz, SourceTable};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData, MapError};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use ipnet::IpNet;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use steerd_common::{
    AUTHZ_ALLOW, AUTHZ_DENY, AUTHZ_TABLE_BITS, AuthzDestKey, AuthzDestValue, AuthzSourceKey,
    map_names,
};
use tracing::{debug, info, warn};

/// Host-side veth names of common CNIs: bridge/ptp plugins, flannel, kindnet and Weave
/// (`veth*`), Calico (`cali*`), Cilium (`lxc*`), AWS VPC CNI (`eni*`), GKE (`gke*`), Azure
/// (`azv*`).
pub const DEFAULT_INTERFACES: [&str; 6] = ["veth*", "cali*", "lxc*", "eni*", "gke*", "azv*"];
/// How often interfaces are listed again for new pods.
pub const RESCAN: Duration = Duration::from_secs(1);
/// A superseded table stays this long after no destination points at it (a SYN holds a table
/// id only between two lookups in one program run).
const RETIRE_GRACE: Duration = super::maps::RETIRE_GRACE;
const PIN_PREFIX: &str = "sd_authz_if";

/// IPv4 prefixes live in the IPv4-mapped range, 96 bits in.
const V4_MAPPED_PREFIX: u32 = 96;

fn source_key(table_id: u32, net: Option<&IpNet>) -> Key<AuthzSourceKey> {
    let (bits, addr) = match net {
        None => (0, steerd_common::Addr::default()),
        Some(IpNet::V4(n)) => (
            V4_MAPPED_PREFIX + u32::from(n.prefix_len()),
            addr_of(n.network().into()),
        ),
        Some(IpNet::V6(n)) => (u32::from(n.prefix_len()), addr_of(n.network().into())),
    };
    Key::new(AUTHZ_TABLE_BITS + bits, AuthzSourceKey { table_id, addr })
}

/// The kernel entries of one table: its default, then its prefixes.
fn table_entries(table_id: u32, table: &SourceTable) -> Vec<(Key<AuthzSourceKey>, u32)> {
    let verdict = |deny: bool| if deny { AUTHZ_DENY } else { AUTHZ_ALLOW };
    std::iter::once((source_key(table_id, None), verdict(table.default_deny)))
        .chain(
            table
                .prefixes
                .iter()
                .map(|(n, d)| (source_key(table_id, Some(&n.trunc())), verdict(*d))),
        )
        .collect()
}

fn dest_key(ip: IpAddr, port: u16) -> AuthzDestKey {
    AuthzDestKey {
        addr: addr_of(ip),
        port: port.to_be(),
        _pad: 0,
    }
}

/// Keeps the kernel's tables equal to the plan's.
pub struct AuthzWriter {
    destinations: HashMap<MapData, AuthzDestKey, AuthzDestValue>,
    sources: LpmTrie<MapData, AuthzSourceKey, u32>,
    /// Tables in the kernel by content.
    installed: BTreeMap<SourceTable, u32>,
    /// What `destinations` holds, as last written.
    pointed: BTreeMap<AuthzDestKey, u32>,
    next_table: u32,
    /// Unreferenced tables: (retired at, id, entries).
    retired: Vec<(Instant, u32, Vec<Key<AuthzSourceKey>>)>,
    /// True until the first apply: what a previous agent left is unknown to this one.
    adopting: bool,
}

impl AuthzWriter {
    pub fn new(
        destinations: HashMap<MapData, AuthzDestKey, AuthzDestValue>,
        sources: LpmTrie<MapData, AuthzSourceKey, u32>,
    ) -> Self {
        // New ids must not collide with a previous agent's tables, which keep serving until
        // the first apply replaces them.
        let max = sources
            .keys()
            .filter_map(Result::ok)
            .map(|k| k.data().table_id)
            .max()
            .unwrap_or(0);
        Self {
            destinations,
            sources,
            installed: BTreeMap::new(),
            pointed: BTreeMap::new(),
            next_table: max.wrapping_add(1).max(1),
            retired: Vec::new(),
            adopting: true,
        }
    }

    /// Writes new tables, points the destinations at them, removes destinations that lost
    /// their policies, and retires unreferenced tables.
    pub fn apply(&mut self, plan: &KernelAuthz) -> Result<(), MapError> {
        let mut ids = Vec::with_capacity(plan.tables.len());
        for table in &plan.tables {
            let id = match self.installed.get(table) {
                Some(id) => *id,
                None => {
                    let id = self.next_table;
                    self.next_table = self.next_table.wrapping_add(1).max(1);
                    for (k, v) in table_entries(id, table) {
                        self.sources.insert(&k, v, 0)?;
                    }
                    self.installed.insert(table.clone(), id);
                    id
                }
            };
            ids.push(id);
        }
        let want: BTreeMap<AuthzDestKey, u32> = plan
            .destinations
            .iter()
            .map(|d| (dest_key(d.ip, d.port), ids[d.table]))
            .collect();
        for (k, id) in &want {
            if self.pointed.get(k) != Some(id) {
                let value = AuthzDestValue {
                    table_id: *id,
                    _pad: 0,
                };
                self.destinations.insert(k, value, 0)?;
            }
        }
        let stale: Vec<AuthzDestKey> = if self.adopting {
            self.destinations
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !want.contains_key(k))
                .collect()
        } else {
            self.pointed
                .keys()
                .filter(|k| !want.contains_key(k))
                .copied()
                .collect()
        };
        for k in stale {
            let _ = self.destinations.remove(&k);
        }
        self.pointed = want;
        let now = Instant::now();
        let used: BTreeSet<u32> = ids.iter().copied().collect();
        if self.adopting {
            // A previous agent's tables: everything not written by this one.
            let mut foreign: BTreeMap<u32, Vec<Key<AuthzSourceKey>>> = BTreeMap::new();
            for k in self.sources.keys().filter_map(Result::ok) {
                if !used.contains(&k.data().table_id) {
                    foreign.entry(k.data().table_id).or_default().push(k);
                }
            }
            self.retired
                .extend(foreign.into_iter().map(|(id, keys)| (now, id, keys)));
            self.adopting = false;
        }
        let unused: Vec<SourceTable> = self
            .installed
            .iter()
            .filter(|(_, id)| !used.contains(id))
            .map(|(t, _)| t.clone())
            .collect();
        for table in unused {
            if let Some(id) = self.installed.remove(&table) {
                let keys = table_entries(id, &table)
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect();
                self.retired.push((now, id, keys));
            }
        }
        Ok(())
    }

    /// Deletes the prefixes of tables retired more than the grace period ago.
    pub fn collect_garbage(&mut self, now: Instant) {
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|(at, _, _)| now.duration_since(*at) >= RETIRE_GRACE);
        self.retired = keep;
        for (_, id, keys) in due {
            for k in keys {
                let _ = self.sources.remove(&k);
            }
            debug!(table = id, "authorization table collected");
        }
    }

    pub fn destination_count(&self) -> usize {
        self.pointed.len()
    }
}

/// What `steerd maps authz` shows: the kernel's destinations, their tables and refusals.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuthzMapsView {
    pub destinations: Vec<DestinationView>,
    /// Refused SYNs per destination (summed over CPUs).
    pub denied: Vec<DeniedView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DestinationView {
    pub address: IpAddr,
    /// `*` for every port without an entry of its own.
    pub port: String,
    pub table: u32,
    /// `deny`/`allow` for sources no prefix covers.
    pub default: String,
    /// (source prefix, `deny`/`allow`), longest match wins.
    pub prefixes: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeniedView {
    pub address: IpAddr,
    pub port: u16,
    pub connections: u64,
}

fn verdict_name(v: u32) -> String {
    if v == AUTHZ_DENY { "deny" } else { "allow" }.to_string()
}

/// Reads the maps (from the agent or another process).
pub fn read(
    destinations: &HashMap<MapData, AuthzDestKey, AuthzDestValue>,
    sources: &LpmTrie<MapData, AuthzSourceKey, u32>,
    denied: Option<&HashMap<MapData, AuthzDestKey, u64>>,
) -> AuthzMapsView {
    let mut tables: BTreeMap<u32, Vec<(u32, steerd_common::Addr, u32)>> = BTreeMap::new();
    for (k, v) in sources.iter().filter_map(Result::ok) {
        tables
            .entry(k.data().table_id)
            .or_default()
            .push((k.prefix_len(), k.data().addr, v));
    }
    let mut view = AuthzMapsView::default();
    for (k, v) in destinations.iter().filter_map(Result::ok) {
        let entries = tables.get(&v.table_id).cloned().unwrap_or_default();
        let default = entries
            .iter()
            .find(|(len, _, _)| *len == AUTHZ_TABLE_BITS)
            .map_or_else(|| "missing".into(), |(_, _, v)| verdict_name(*v));
        let mut prefixes: Vec<(IpNet, String)> = entries
            .iter()
            .filter(|(len, _, _)| *len > AUTHZ_TABLE_BITS)
            .filter_map(|(len, addr, v)| {
                let bits = len - AUTHZ_TABLE_BITS;
                let ip = ip_of(addr);
                let bits = match ip {
                    IpAddr::V4(_) => bits.saturating_sub(V4_MAPPED_PREFIX),
                    IpAddr::V6(_) => bits,
                };
                let net = IpNet::new(ip, u8::try_from(bits).ok()?).ok()?;
                Some((net, verdict_name(*v)))
            })
            .collect();
        prefixes.sort();
        let prefixes = prefixes
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .collect();
        view.destinations.push(DestinationView {
            address: ip_of(&k.addr),
            port: match u16::from_be(k.port) {
                0 => "*".into(),
                p => p.to_string(),
            },
            table: v.table_id,
            default,
            prefixes,
        });
    }
    view.destinations
        .sort_by(|a, b| (a.address, &a.port).cmp(&(b.address, &b.port)));
    if let Some(denied) = denied {
        view.denied = denied_counts(denied);
    }
    view
}

/// Refused SYNs per destination address and port.
pub fn denied_counts(map: &HashMap<MapData, AuthzDestKey, u64>) -> Vec<DeniedView> {
    let mut out: Vec<DeniedView> = map
        .iter()
        .filter_map(Result::ok)
        .map(|(k, connections)| DeniedView {
            address: ip_of(&k.addr),
            port: u16::from_be(k.port),
            connections,
        })
        .collect();
    out.sort_by_key(|d| (d.address, d.port));
    out
}

/// `*` matches any run of characters, `?` one character.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// The TC program and the interfaces it is attached to.
pub struct PolicyAttachments {
    patterns: Vec<String>,
    /// ifindex → interface name.
    attached: BTreeMap<u32, String>,
    /// Interfaces whose attach failed, not retried until they disappear.
    failed: BTreeSet<u32>,
    supported: bool,
}

impl PolicyAttachments {
    pub fn new(patterns: Vec<String>) -> Self {
        let supported = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        if !supported && !patterns.is_empty() {
            warn!(
                "the kernel has no TCX links (Linux < 6.6): AuthorizationPolicies are enforced for HTTP by the L7 proxy only, not for TCP connections"
            );
        }
        Self {
            patterns,
            attached: BTreeMap::new(),
            failed: BTreeSet::new(),
            supported,
        }
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.values().map(String::as_str)
    }

    /// Attaches the program to new matching interfaces, forgets vanished ones and removes
    /// their pins. Errors on one interface are logged and do not stop the others.
    pub fn rescan(&mut self, program: &mut SchedClassifier, pins: &Pins) {
        if !self.supported || self.patterns.is_empty() {
            return;
        }
        let interfaces: BTreeMap<u32, String> = match nix::net::if_::if_nameindex() {
            Ok(list) => list
                .iter()
                .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
                .collect(),
            Err(e) => {
                warn!(error = %e, "listing interfaces for policy enforcement");
                return;
            }
        };
        self.attached
            .retain(|index, name| interfaces.get(index) == Some(name));
        self.failed.retain(|index| interfaces.contains_key(index));
        remove_stale_pins(pins, &interfaces);
        for (index, name) in &interfaces {
            let wanted = self.patterns.iter().any(|p| glob_matches(p, name));
            if !wanted || self.attached.contains_key(index) || self.failed.contains(index) {
                continue;
            }
            match attach(program, pins, *index, name) {
                Ok(()) => {
                    info!(interface = %name, "authorization policy program attached");
                    self.attached.insert(*index, name.clone());
                }
                Err(e) => {
                    warn!(interface = %name, error = %e, "attaching the authorization policy program");
                    self.failed.insert(*index);
                }
            }
        }
    }
}

fn pin_path(pins: &Pins, index: u32) -> std::path::PathBuf {
    pins.links().join(format!("{PIN_PREFIX}{index}"))
}

/// Attaches to `index`'s egress: by replacing the program of a link a previous agent pinned
/// (atomically), or with a new link.
fn attach(
    program: &mut SchedClassifier,
    pins: &Pins,
    index: u32,
    name: &str,
) -> Result<(), DataplaneError> {
    let perr = |source| DataplaneError::Program {
        name: format!("sd_authz on {name}"),
        source,
    };
    let path = pin_path(pins, index);
    let adopted = PinnedLink::from_pin(&path)
        .ok()
        .and_then(|old| SchedClassifierLink::try_from(FdLink::from(old)).ok())
        .and_then(|link| program.attach_to_link(link).ok());
    let id = match adopted {
        Some(id) => id,
        None => {
            // The old link (if any) is gone with its interface, or was never there.
            let _ = std::fs::remove_file(&path);
            program
                .attach_with_options(
                    name,
                    TcAttachType::Egress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(perr)?
        }
    };
    let link: FdLink = program
        .take_link(id)
        .map_err(perr)?
        .try_into()
        .map_err(|source| DataplaneError::Link {
            name: format!("sd_authz on {name}"),
            source,
        })?;
    super::bpf::replace_link_pin(pins, &format!("{PIN_PREFIX}{index}"), link)
}

/// Pins of interfaces that no longer exist hold defunct links: remove them.
fn remove_stale_pins(pins: &Pins, interfaces: &BTreeMap<u32, String>) {
    let Ok(entries) = std::fs::read_dir(pins.links()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(index) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PIN_PREFIX))
            .and_then(|i| i.parse::<u32>().ok())
        else {
            continue;
        };
        if !interfaces.contains_key(&index) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Opens the pinned maps for `steerd maps authz`.
pub fn open_pinned(maps: &Path) -> Result<AuthzMapsView, DataplaneError> {
    let open = |name: &'static str| {
        aya::maps::MapData::from_pin(maps.join(name))
            .map_err(|source| DataplaneError::Map { name, source })
    };
    let map_err = |name: &'static str| move |source| DataplaneError::Map { name, source };
    let destinations: HashMap<MapData, AuthzDestKey, AuthzDestValue> =
        HashMap::try_from(aya::maps::Map::HashMap(open(map_names::AUTHZ_DEST)?))
            .map_err(map_err(map_names::AUTHZ_DEST))?;
    let sources: LpmTrie<MapData, AuthzSourceKey, u32> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(open(map_names::AUTHZ_SOURCE)?))
            .map_err(map_err(map_names::AUTHZ_SOURCE))?;
    let denied: Option<HashMap<MapData, AuthzDestKey, u64>> = open(map_names::AUTHZ_DENIED)
        .ok()
        .and_then(|m| HashMap::try_from(aya::maps::Map::LruHashMap(m)).ok());
    Ok(read(&destinations, &sources, denied.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_keys_cover_the_table_id_then_the_address() {
        let k = source_key(7, None);
        assert_eq!(k.prefix_len(), 32);
        assert_eq!(k.data().table_id, 7);
        let k = source_key(7, Some(&"10.0.0.0/8".parse().unwrap()));
        assert_eq!(k.prefix_len(), 32 + 96 + 8);
        assert_eq!(k.data().addr, addr_of("10.0.0.0".parse().unwrap()));
        let k = source_key(7, Some(&"fd00::/64".parse().unwrap()));
        assert_eq!(k.prefix_len(), 32 + 64);
        let table = SourceTable {
            default_deny: true,
            prefixes: vec![("10.0.0.1/8".parse().unwrap(), false)],
        };
        let entries = table_entries(3, &table);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].1, AUTHZ_DENY);
        assert_eq!(entries[1].1, AUTHZ_ALLOW);
        // Host bits are cleared: the kernel's trie rejects nothing, but lookups must match.
        assert_eq!(
            entries[1].0.data().addr,
            addr_of("10.0.0.0".parse().unwrap())
        );
    }

    #[test]
    fn globs() {
        assert!(glob_matches("veth*", "veth1"));
        assert!(glob_matches("veth*", "veth"));
        assert!(glob_matches("cali?23", "cali123"));
        assert!(glob_matches("web-*-x", "web-abc-x"));
        assert!(!glob_matches("veth*", "eth0"));
        assert!(!glob_matches("lxc", "lxc1"));
    }
}
