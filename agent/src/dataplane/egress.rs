//! REGISTRY_ONLY in the kernel: the registered-destination LPM trie, the mesh default and the
//! policies of pod cgroups whose Sidecar sets their own.

use super::kernel::addr_of;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use steerd_common::{Addr, EGRESS_ALLOW_ANY, EGRESS_REGISTRY_ONLY, EgressPolicy};

/// IPv4 prefixes live in the IPv4-mapped range, 96 bits in.
const V4_MAPPED_PREFIX: u8 = 96;

fn key(net: &IpNet) -> Key<Addr> {
    let len = match net {
        IpNet::V4(n) => V4_MAPPED_PREFIX + n.prefix_len(),
        IpNet::V6(n) => n.prefix_len(),
    };
    Key::new(len as u32, addr_of(net.network()))
}

pub struct EgressWriter {
    policy: Array<MapData, EgressPolicy>,
    registry: LpmTrie<MapData, Addr, u32>,
    /// Pod cgroup id → `EGRESS_ALLOW_ANY` / `EGRESS_REGISTRY_ONLY`.
    workloads: HashMap<MapData, u64, u32>,
    installed: BTreeSet<IpNet>,
    /// What `workloads` holds (None: not known yet, the previous agent's entries).
    workloads_installed: Option<BTreeMap<u64, bool>>,
    /// The mesh default last written.
    registry_only: bool,
}

impl EgressWriter {
    pub fn new(
        policy: Array<MapData, EgressPolicy>,
        registry: LpmTrie<MapData, Addr, u32>,
        workloads: HashMap<MapData, u64, u32>,
    ) -> Self {
        let registry_only = policy.get(&0, 0).is_ok_and(|p| p.registry_only != 0);
        Self {
            policy,
            registry,
            workloads,
            // Unknown after a restart: the first apply rewrites every prefix (inserts are
            // idempotent) and can only remove what it knows, so stale ones are cleared below.
            installed: BTreeSet::new(),
            workloads_installed: None,
            registry_only,
        }
    }

    /// Writes the mesh default and whether per-workload policies exist.
    fn write_policy(&mut self, registry_only: bool) -> Result<(), MapError> {
        let workloads = match &self.workloads_installed {
            Some(w) => !w.is_empty(),
            // The previous agent's entries stay in force until the first scan replaces them.
            None => self.workloads.keys().next().is_some(),
        };
        self.policy.set(
            0,
            EgressPolicy {
                registry_only: registry_only as u32,
                workloads: workloads as u32,
            },
            0,
        )?;
        self.registry_only = registry_only;
        Ok(())
    }

    /// Makes the per-workload map hold exactly `want` (pod cgroup id → REGISTRY_ONLY?). The
    /// kernel's switch goes on after the first entry is in and off before the last one leaves.
    pub fn set_workloads(&mut self, want: &BTreeMap<u64, bool>) -> Result<(), MapError> {
        if self.workloads_installed.as_ref() == Some(want) {
            return Ok(());
        }
        let have: BTreeMap<u64, bool> = match self.workloads_installed.take() {
            Some(h) => h,
            None => self
                .workloads
                .iter()
                .filter_map(Result::ok)
                .map(|(id, p)| (id, p == EGRESS_REGISTRY_ONLY))
                .collect(),
        };
        // Until this call succeeds the installed state is unknown (None): a retry rereads it.
        for (id, registry_only) in want {
            if have.get(id) != Some(registry_only) {
                let value = if *registry_only {
                    EGRESS_REGISTRY_ONLY
                } else {
                    EGRESS_ALLOW_ANY
                };
                self.workloads.insert(id, value, 0)?;
            }
        }
        if want.is_empty() {
            self.workloads_installed = Some(BTreeMap::new());
            self.write_policy(self.registry_only)?;
        }
        for id in have.keys().filter(|id| !want.contains_key(id)) {
            let _ = self.workloads.remove(id);
        }
        self.workloads_installed = Some(want.clone());
        self.write_policy(self.registry_only)
    }

    /// Makes the trie hold exactly `registered` (inserting before deleting, so a destination
    /// present in both plans is never briefly refused), then sets the policy.
    pub fn apply<'n>(
        &mut self,
        registered: impl IntoIterator<Item = &'n IpNet>,
        registry_only: bool,
    ) -> Result<(), MapError> {
        let want: BTreeSet<IpNet> = registered.into_iter().map(|n| n.trunc()).collect();
        for net in want.difference(&self.installed) {
            self.registry.insert(&key(net), 1, 0)?;
        }
        if self.installed.is_empty() {
            // First apply of this agent: drop whatever a previous generation left (a set lookup
            // per key: a cluster registers some 60,000 destinations).
            let wanted: std::collections::HashSet<(u32, Addr)> = want
                .iter()
                .map(|n| {
                    let k = key(n);
                    (k.prefix_len(), k.data())
                })
                .collect();
            let stale: Vec<Key<Addr>> = self
                .registry
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
                .collect();
            for k in stale {
                let _ = self.registry.remove(&k);
            }
        } else {
            for net in self.installed.difference(&want) {
                let _ = self.registry.remove(&key(net));
            }
        }
        self.installed = want;
        self.write_policy(registry_only)
    }
}

impl EgressWriter {
    /// Adds and removes registered destinations (inserting first, so that one moving between
    /// hosts is never briefly refused), then sets the policy.
    pub fn apply_changes(
        &mut self,
        added: &BTreeSet<IpNet>,
        removed: &BTreeSet<IpNet>,
        registry_only: bool,
    ) -> Result<(), MapError> {
        for net in added {
            let net = net.trunc();
            if self.installed.insert(net) {
                self.registry.insert(&key(&net), 1, 0)?;
            }
        }
        for net in removed {
            let net = net.trunc();
            if !added.iter().any(|a| a.trunc() == net) && self.installed.remove(&net) {
                let _ = self.registry.remove(&key(&net));
            }
        }
        self.write_policy(registry_only)
    }
}

/// Connects refused per destination, summed from the kernel's counters.
pub fn denied(map: &HashMap<MapData, Addr, u64>) -> Vec<(std::net::IpAddr, u64)> {
    let mut out: Vec<_> = map
        .iter()
        .filter_map(Result::ok)
        .map(|(a, n)| (super::kernel::ip_of(&a), n))
        .collect();
    out.sort();
    out
}
