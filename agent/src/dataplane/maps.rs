//! Writing plans into the pinned maps without ever exposing a half-written service, and reading
//! them back (from the agent, or from another process for `steerd maps`).

use super::kernel::KernelService;
use aya::maps::{HashMap, Map, MapData, MapError};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};
use steerd_common::{ServiceKey, ServiceValue, Slot, SlotKey, map_names};

/// How long a superseded alias table stays in the map after the service stopped pointing at it.
/// A connect() holds the table id only for the microseconds between its two lookups, inside an
/// RCU read section; a second is orders of magnitude of margin.
pub const RETIRE_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{failed} of {total} service updates failed; first: {first}")]
    Partial {
        failed: usize,
        total: usize,
        first: String,
    },
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

/// What one [`MapWriter::apply`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
}

/// What the kernel holds for one service. The table itself is not kept (the agent would hold a
/// second copy of every alias table, 3 MiB at 10,000 services): only its digest, to tell
/// whether a wanted table differs.
struct Installed {
    value: ServiceValue,
    digest: TableDigest,
}

/// 128 bits of two independently seeded SipHashes over a table's slots: two different tables
/// agree on both with odds far below those of a memory error.
type TableDigest = (u64, u64);

impl Installed {
    /// Whether the kernel already holds `want` (a torn table found at adoption holds nothing:
    /// its digest is that of an empty table, its slot count the kernel's).
    fn holds(&self, want: &KernelService) -> bool {
        self.value.flags == want.flags
            && self.value.slot_count as usize == want.slots.len()
            && self.digest == table_digest(&want.slots)
    }
}

fn table_digest(slots: &[Slot]) -> TableDigest {
    use std::hash::{Hash, Hasher};
    let mut a = std::hash::DefaultHasher::new();
    let mut b = std::hash::DefaultHasher::new();
    b.write_u64(0x9e37_79b9_7f4a_7c15);
    slots.hash(&mut a);
    slots.hash(&mut b);
    (a.finish(), b.finish())
}

pub struct MapWriter {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, Slot>,
    /// What the kernel holds, as last written or adopted.
    installed: BTreeMap<ServiceKey, Installed>,
    next_table: u32,
    /// Tables no service points at any more: (retired at, table id, slot count).
    retired: Vec<(Instant, u32, u32)>,
}

impl MapWriter {
    /// Takes over the maps, including whatever a previous agent left in them, so that a restart
    /// continues from the kernel's state instead of clearing it.
    pub fn adopt(services: Map, slots: Map) -> Result<Self, MapsError> {
        let services: HashMap<MapData, ServiceKey, ServiceValue> =
            HashMap::try_from(services).map_err(map_err(map_names::SERVICES))?;
        let slots: HashMap<MapData, SlotKey, Slot> =
            HashMap::try_from(slots).map_err(map_err(map_names::SLOTS))?;
        let mut installed = BTreeMap::new();
        let mut max_table = 0;
        for entry in services.iter() {
            let (key, value) = entry.map_err(map_err(map_names::SERVICES))?;
            max_table = max_table.max(value.table_id);
            let mut table = Vec::with_capacity(value.slot_count as usize);
            for slot in 0..value.slot_count {
                let sk = SlotKey {
                    table_id: value.table_id,
                    slot,
                };
                match slots.get(&sk, 0) {
                    Ok(s) => table.push(s),
                    // A torn table: force a rewrite by recording it as empty.
                    Err(_) => {
                        table.clear();
                        break;
                    }
                }
            }
            installed.insert(
                key,
                Installed {
                    value,
                    digest: table_digest(&table),
                },
            );
        }
        let live: BTreeSet<u32> = installed.values().map(|i| i.value.table_id).collect();
        let mut orphans: BTreeMap<u32, u32> = BTreeMap::new();
        for key in slots.keys() {
            let key = key.map_err(map_err(map_names::SLOTS))?;
            max_table = max_table.max(key.table_id);
            if !live.contains(&key.table_id) {
                let n = orphans.entry(key.table_id).or_default();
                *n = (*n).max(key.slot + 1);
            }
        }
        // Orphans were left by an agent that died mid-update; nothing references them, so they
        // can go as soon as the grace period passes.
        let now = Instant::now();
        let retired = orphans.into_iter().map(|(t, n)| (now, t, n)).collect();
        Ok(Self {
            services,
            slots,
            installed,
            next_table: max_table.wrapping_add(1).max(1),
            retired,
        })
    }

    pub fn service_count(&self) -> usize {
        self.installed.len()
    }

    pub fn slot_count(&self) -> usize {
        self.installed
            .values()
            .map(|i| i.value.slot_count as usize)
            .sum::<usize>()
            + self.retired.iter().map(|r| r.2 as usize).sum::<usize>()
    }

    /// Makes the maps hold exactly `desired`. Changed services get a complete new table before
    /// their service entry is swapped to it in one update; removed services are deleted before
    /// their table. Tables are freed by [`Self::collect_garbage`] after [`RETIRE_GRACE`].
    pub fn apply(
        &mut self,
        desired: &BTreeMap<ServiceKey, KernelService>,
    ) -> Result<ApplyStats, MapsError> {
        let mut stats = ApplyStats::default();
        let mut failures = Vec::new();
        let now = Instant::now();
        for (key, want) in desired {
            let current = self.installed.get(key);
            if current.is_some_and(|cur| cur.holds(want)) {
                stats.unchanged += 1;
                continue;
            }
            let existed = current.is_some();
            match self.install(key, want) {
                Ok(()) => {
                    if existed {
                        stats.updated += 1
                    } else {
                        stats.added += 1
                    }
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        let stale: Vec<ServiceKey> = self
            .installed
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            match self.services.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {
                    let old = self.installed.remove(&key).expect("stale key is installed");
                    self.retired
                        .push((now, old.value.table_id, old.value.slot_count));
                    stats.removed += 1;
                }
                Err(e) => failures.push(format!("remove service: {e}")),
            }
        }
        if failures.is_empty() {
            Ok(stats)
        } else {
            Err(MapsError::Partial {
                failed: failures.len(),
                total: desired.len(),
                first: failures.swap_remove(0),
            })
        }
    }

    /// Writes only `changes` (a service's new entry, or None to remove it), in the same way as
    /// [`Self::apply`]. Returns, with the stats, the keys whose write failed.
    pub fn apply_changes(
        &mut self,
        changes: &[(ServiceKey, Option<KernelService>)],
    ) -> (ApplyStats, Vec<(ServiceKey, String)>) {
        let mut stats = ApplyStats::default();
        let mut failures = Vec::new();
        let now = Instant::now();
        for (key, want) in changes {
            let current = self.installed.get(key);
            match want {
                Some(want) => {
                    if current.is_some_and(|cur| cur.holds(want)) {
                        stats.unchanged += 1;
                        continue;
                    }
                    let existed = current.is_some();
                    match self.install(key, want) {
                        Ok(()) if existed => stats.updated += 1,
                        Ok(()) => stats.added += 1,
                        Err(e) => failures.push((*key, e.to_string())),
                    }
                }
                None if current.is_none() => stats.unchanged += 1,
                None => match self.services.remove(key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {
                        let old = self.installed.remove(key).expect("key is installed");
                        self.retired
                            .push((now, old.value.table_id, old.value.slot_count));
                        stats.removed += 1;
                    }
                    Err(e) => failures.push((*key, format!("remove service: {e}"))),
                },
            }
        }
        (stats, failures)
    }

    fn install(&mut self, key: &ServiceKey, want: &KernelService) -> Result<(), MapsError> {
        let table_id = self.next_table;
        self.next_table = self.next_table.wrapping_add(1).max(1);
        for (i, slot) in want.slots.iter().enumerate() {
            let sk = SlotKey {
                table_id,
                slot: i as u32,
            };
            if let Err(e) = self.slots.insert(sk, slot, 0) {
                // Undo the partial table; the service keeps its old one.
                for j in 0..i {
                    let _ = self.slots.remove(&SlotKey {
                        table_id,
                        slot: j as u32,
                    });
                }
                return Err(map_err(map_names::SLOTS)(e));
            }
        }
        let value = ServiceValue {
            table_id,
            slot_count: want.slots.len() as u32,
            flags: want.flags,
            _pad: 0,
        };
        if let Err(e) = self.services.insert(key, value, 0) {
            self.retired
                .push((Instant::now(), table_id, value.slot_count));
            return Err(map_err(map_names::SERVICES)(e));
        }
        if let Some(old) = self.installed.insert(
            *key,
            Installed {
                value,
                digest: table_digest(&want.slots),
            },
        ) {
            self.retired
                .push((Instant::now(), old.value.table_id, old.value.slot_count));
        }
        Ok(())
    }

    /// Deletes the slots of tables retired at least [`RETIRE_GRACE`] ago. Returns how many
    /// tables were freed.
    pub fn collect_garbage(&mut self, now: Instant) -> usize {
        let (due, keep): (Vec<_>, Vec<_>) = self
            .retired
            .drain(..)
            .partition(|(at, _, _)| now.duration_since(*at) >= RETIRE_GRACE);
        self.retired = keep;
        for (_, table_id, count) in &due {
            for slot in 0..*count {
                let _ = self.slots.remove(&SlotKey {
                    table_id: *table_id,
                    slot,
                });
            }
        }
        due.len()
    }
}

/// A snapshot of the services map and their tables, read from pinned maps.
pub struct Snapshot {
    pub services: BTreeMap<ServiceKey, (ServiceValue, Vec<Slot>)>,
}

/// Reads the maps pinned under `<bpffs>/maps` (works from any process with CAP_BPF).
pub fn read_pinned(maps_dir: &Path) -> Result<Snapshot, MapsError> {
    let open = |name: &'static str| -> Result<MapData, MapsError> {
        MapData::from_pin(maps_dir.join(name)).map_err(map_err(name))
    };
    let services: HashMap<MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(Map::HashMap(open(map_names::SERVICES)?))
            .map_err(map_err(map_names::SERVICES))?;
    let slots: HashMap<MapData, SlotKey, Slot> =
        HashMap::try_from(Map::HashMap(open(map_names::SLOTS)?))
            .map_err(map_err(map_names::SLOTS))?;
    let mut out = BTreeMap::new();
    for entry in services.iter() {
        let (key, value) = entry.map_err(map_err(map_names::SERVICES))?;
        let table = (0..value.slot_count)
            .filter_map(|slot| {
                slots
                    .get(
                        &SlotKey {
                            table_id: value.table_id,
                            slot,
                        },
                        0,
                    )
                    .ok()
            })
            .collect();
        out.insert(key, (value, table));
    }
    Ok(Snapshot { services: out })
}
