//! REGISTRY_ONLY in the kernel: the registered-destination LPM trie and the policy switch.

use super::kernel::addr_of;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError};
use ipnet::IpNet;
use std::collections::BTreeSet;
use steerd_common::{Addr, EgressPolicy};

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
    installed: BTreeSet<IpNet>,
}

impl EgressWriter {
    pub fn new(
        policy: Array<MapData, EgressPolicy>,
        registry: LpmTrie<MapData, Addr, u32>,
    ) -> Self {
        Self {
            policy,
            registry,
            // Unknown after a restart: the first apply rewrites every prefix (inserts are
            // idempotent) and can only remove what it knows, so stale ones are cleared below.
            installed: BTreeSet::new(),
        }
    }

    /// Makes the trie hold exactly `registered` (inserting before deleting, so a destination
    /// present in both plans is never briefly refused), then sets the policy.
    pub fn apply(&mut self, registered: &[IpNet], registry_only: bool) -> Result<(), MapError> {
        let want: BTreeSet<IpNet> = registered.iter().map(|n| n.trunc()).collect();
        for net in want.difference(&self.installed) {
            self.registry.insert(&key(net), 1, 0)?;
        }
        if self.installed.is_empty() {
            // First apply of this agent: drop whatever a previous generation left.
            let stale: Vec<Key<Addr>> = self
                .registry
                .keys()
                .filter_map(Result::ok)
                .filter(|k| {
                    !want.iter().any(|n| {
                        let w = key(n);
                        w.prefix_len() == k.prefix_len() && w.data() == k.data()
                    })
                })
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
        self.policy.set(
            0,
            EgressPolicy {
                registry_only: registry_only as u32,
                _pad: 0,
            },
            0,
        )
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
        self.policy.set(
            0,
            EgressPolicy {
                registry_only: registry_only as u32,
                _pad: 0,
            },
            0,
        )
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
