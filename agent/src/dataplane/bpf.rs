//! Loading the kernel programs, pinning maps and links, and adopting a previous agent's pins.
//!
//! Layout under `--bpffs` (default `/sys/fs/bpf/steerd`):
//! - `maps/<name>`: the maps of `steerd-common`, shared by every program generation;
//! - `links/<program>`: one cgroup link per program. A pinned link keeps its program attached
//!   after the agent exits (or is killed), so steering never depends on the agent being alive.
//!
//! Restart without a gap: the new agent loads its programs against the *same* pinned maps,
//! attaches them next to the old ones (cgroup bpf_links always stack), and only then replaces the old link
//! pins. While both run, the first rewrites VIP → backend and the second sees a backend address it
//! does not know, so every connect is translated exactly once.

use super::maps::MapWriter;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, Program, SchedClassifier, links::FdLink},
};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use steerd_common::{
    AuthzDestKey, BackendStats, ClientKey, ProxyConfig, RedirectStats, RevNatValue, SockTuple,
    StatsKey, map_names,
};
use tracing::{debug, info, warn};

/// The TC program enforcing AuthorizationPolicies on pod veths (see [`super::authz`]).
const AUTHZ_PROGRAM: &str = "sd_authz";

/// The compiled eBPF object (built by build.rs from `ebpf/`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steerd"));

const BPF_FS_MAGIC: libc::__fsword_t = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not on a BPF filesystem (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs(PathBuf),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("program {name}: link: {source}")]
    Link {
        name: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning link {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("program {0} has a type steerd does not attach")]
    UnexpectedProgram(String),
    #[error(transparent)]
    Maps(#[from] super::maps::MapsError),
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> DataplaneError + '_ {
    move |source| DataplaneError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the pins live.
#[derive(Debug, Clone)]
pub struct Pins {
    pub root: PathBuf,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Makes sure `root` can hold pins: mounts bpffs at /sys/fs/bpf when that is where the root is
/// and nothing is mounted there yet (a bare node), then creates the directories.
pub fn prepare_bpffs(pins: &Pins) -> Result<(), DataplaneError> {
    let sys_bpf = Path::new("/sys/fs/bpf");
    if pins.root.starts_with(sys_bpf) && !is_bpffs(sys_bpf) {
        info!("mounting bpffs at /sys/fs/bpf");
        nix::mount::mount(
            Some("bpf"),
            sys_bpf,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| io_err(sys_bpf)(e.into()))?;
    }
    for dir in [pins.root.clone(), pins.maps(), pins.links()] {
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    }
    if !is_bpffs(&pins.root) {
        return Err(DataplaneError::NotBpffs(pins.root.clone()));
    }
    Ok(())
}

/// The loaded programs and the writer over their maps.
pub struct Dataplane {
    pub writer: MapWriter,
    /// Where the kernel sends L7 connections (see [`ProxyConfig`]).
    pub proxy_config: Array<MapData, ProxyConfig>,
    /// Original destinations of connections redirected to the proxy, by client address (taken
    /// by the proxy when it starts).
    pub l7_connections: Option<HashMap<MapData, ClientKey, RevNatValue>>,
    /// REGISTRY_ONLY: policy switch and registered destinations.
    pub egress: super::egress::EgressWriter,
    /// Connects refused by REGISTRY_ONLY, per destination (taken by the metrics scraper).
    pub denied: Option<HashMap<MapData, steerd_common::Addr, u64>>,
    /// Per-(service, backend) traffic counters (taken by the metrics scraper).
    pub stats: Option<HashMap<MapData, StatsKey, BackendStats>>,
    /// AuthorizationPolicy tables for TCP.
    pub authz: super::authz::AuthzWriter,
    /// Connections refused by AuthorizationPolicies, per destination (taken by the scraper).
    pub authz_denied: Option<HashMap<MapData, AuthzDestKey, u64>>,
    /// Which pod veths the authorization program is attached to.
    pub policy_interfaces: super::authz::PolicyAttachments,
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// What the socket redirect did (taken by the metrics scraper).
    pub redirect_stats: Option<PerCpuArray<MapData, RedirectStats>>,
    // The sockhash the `sk_msg` program is attached to.
    _redirect_sockets: SockHash<MapData, SockTuple>,
    pins: Pins,
    // Keeps program fds alive for the process lifetime (links are pinned independently), and
    // holds the authorization program for interfaces that appear later.
    ebpf: Ebpf,
}

/// What the agent chooses at load.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Sizes of the LRU maps (`--max-tracked-sockets`, `--max-traffic-counters`): they are
    /// preallocated, so their size is kernel memory whatever the traffic.
    pub tracked_sockets: u32,
    pub traffic_counters: u32,
    /// Track the L7 path's node-local sockets for the `sk_msg` redirect (`--socket-redirect`).
    pub socket_redirect: bool,
}

/// The `sk_msg` program of the socket redirect, attached to the `sd_sockets` sockhash.
const REDIRECT_PROGRAM: &str = "sd_redirect";

/// Pinned maps earlier versions created and this one no longer uses (`sd_stats_v1` and
/// `sd_authz_dny_v1`: per-CPU counters, now `sd_stats_v2` and `sd_authz_dny_v2`).
const RETIRED_MAPS: &[&str] = &["sd_stats_v1", "sd_authz_dny_v1"];

impl Dataplane {
    /// Loads the programs against the pinned maps (creating them on first start), attaches
    /// them to `cgroup` and to the pod veths matching `policy_interfaces`, replaces any previous
    /// generation's links, and adopts the maps' content.
    pub fn start(
        pins: &Pins,
        cgroup: &Path,
        policy_interfaces: Vec<String>,
        options: LoadOptions,
    ) -> Result<Self, DataplaneError> {
        prepare_bpffs(pins)?;
        let redirect_enabled = u32::from(options.socket_redirect);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins.maps())
            .map_max_entries(map_names::REVNAT, options.tracked_sockets.max(1024))
            .map_max_entries(map_names::STATS, options.traffic_counters.max(1024))
            .override_global("SOCKET_REDIRECT_ENABLED", &redirect_enabled, true)
            .load(EBPF_OBJECT)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(error = %e, "kernel program logs unavailable");
                None
            }
        };
        let cgroup_dir = fs::File::open(cgroup).map_err(io_err(cgroup))?;
        let redirect_sockets: SockHash<MapData, SockTuple> = SockHash::try_from(
            ebpf.take_map(map_names::SOCKETS)
                .ok_or(DataplaneError::MissingMap(map_names::SOCKETS))?,
        )
        .map_err(|source| DataplaneError::Map {
            name: map_names::SOCKETS,
            source,
        })?;
        let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
        for name in names {
            let perr = |source| DataplaneError::Program {
                name: name.clone(),
                source,
            };
            // bpf_link-based cgroup attachments always stack and reject attach flags, so
            // "Single" (no flags) is what lets old and new generations coexist.
            let link: FdLink = match ebpf.program_mut(&name).expect("listed program exists") {
                Program::SchedClassifier(p) if name == AUTHZ_PROGRAM => {
                    // Attached per interface, below and on every rescan.
                    p.load().map_err(perr)?;
                    continue;
                }
                Program::CgroupSockAddr(p) => {
                    p.load().map_err(perr)?;
                    let id = p
                        .attach(&cgroup_dir, CgroupAttachMode::Single)
                        .map_err(perr)?;
                    p.take_link(id).map_err(perr)?.try_into()
                }
                Program::SockOps(p) => {
                    p.load().map_err(perr)?;
                    let id = p
                        .attach(&cgroup_dir, CgroupAttachMode::Single)
                        .map_err(perr)?;
                    p.take_link(id).map_err(perr)?.try_into()
                }
                Program::SkMsg(p) if name == REDIRECT_PROGRAM => {
                    // Attached to the pinned sockhash, not to a cgroup: it replaces the previous
                    // generation's program for sockets added from now on (sockets keep the
                    // program they joined with) and stays attached as long as the map.
                    p.load().map_err(perr)?;
                    p.attach(redirect_sockets.fd()).map_err(perr)?;
                    continue;
                }
                _ => return Err(DataplaneError::UnexpectedProgram(name)),
            }
            .map_err(|source| DataplaneError::Link {
                name: name.clone(),
                source,
            })?;
            replace_link_pin(pins, &name, link)?;
        }
        info!(cgroup = %cgroup.display(), bpffs = %pins.root.display(), "programs attached");
        let services = ebpf
            .take_map(map_names::SERVICES)
            .ok_or(DataplaneError::MissingMap(map_names::SERVICES))?;
        let slots = ebpf
            .take_map(map_names::SLOTS)
            .ok_or(DataplaneError::MissingMap(map_names::SLOTS))?;
        let writer = MapWriter::adopt(services, slots)?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(DataplaneError::MissingMap(name))
        };
        let map_err = |name: &'static str| move |source| DataplaneError::Map { name, source };
        let proxy_config = Array::try_from(take(&mut ebpf, map_names::PROXY)?)
            .map_err(map_err(map_names::PROXY))?;
        let l7_connections = HashMap::try_from(take(&mut ebpf, map_names::L7CONN)?)
            .map_err(map_err(map_names::L7CONN))?;
        let stats = HashMap::try_from(take(&mut ebpf, map_names::STATS)?)
            .map_err(map_err(map_names::STATS))?;
        let egress = super::egress::EgressWriter::new(
            Array::try_from(take(&mut ebpf, map_names::EGRESS)?)
                .map_err(map_err(map_names::EGRESS))?,
            aya::maps::LpmTrie::try_from(take(&mut ebpf, map_names::REGISTRY)?)
                .map_err(map_err(map_names::REGISTRY))?,
            HashMap::try_from(take(&mut ebpf, map_names::EGRESS_WORKLOADS)?)
                .map_err(map_err(map_names::EGRESS_WORKLOADS))?,
        );
        let denied = HashMap::try_from(take(&mut ebpf, map_names::DENIED)?)
            .map_err(map_err(map_names::DENIED))?;
        let authz = super::authz::AuthzWriter::new(
            HashMap::try_from(take(&mut ebpf, map_names::AUTHZ_DEST)?)
                .map_err(map_err(map_names::AUTHZ_DEST))?,
            aya::maps::LpmTrie::try_from(take(&mut ebpf, map_names::AUTHZ_SOURCE)?)
                .map_err(map_err(map_names::AUTHZ_SOURCE))?,
        );
        let authz_denied = HashMap::try_from(take(&mut ebpf, map_names::AUTHZ_DENIED)?)
            .map_err(map_err(map_names::AUTHZ_DENIED))?;
        let redirect_stats = PerCpuArray::try_from(take(&mut ebpf, map_names::REDIRECT_STATS)?)
            .map_err(map_err(map_names::REDIRECT_STATS))?;
        if writer.service_count() > 0 {
            info!(
                services = writer.service_count(),
                "adopted services from pinned maps"
            );
        }
        let mut dataplane = Self {
            writer,
            proxy_config,
            l7_connections: Some(l7_connections),
            stats: Some(stats),
            egress,
            denied: Some(denied),
            authz,
            authz_denied: Some(authz_denied),
            policy_interfaces: super::authz::PolicyAttachments::new(policy_interfaces),
            logger,
            redirect_stats: Some(redirect_stats),
            _redirect_sockets: redirect_sockets,
            pins: pins.clone(),
            ebpf,
        };
        dataplane.rescan_policy_interfaces();
        // Maps of earlier layouts that this generation replaced: their programs' links are
        // replaced above, so unpinning frees them once the last program lets go.
        for stale in RETIRED_MAPS {
            let path = pins.maps().join(stale);
            if path.exists() {
                match fs::remove_file(&path) {
                    Ok(()) => info!(map = stale, "removed a retired map's pin"),
                    Err(e) => {
                        warn!(map = stale, error = %e, "could not remove a retired map's pin")
                    }
                }
            }
        }
        Ok(dataplane)
    }

    /// Attaches the authorization program to pod veths that appeared since the last call.
    pub fn rescan_policy_interfaces(&mut self) {
        let Some(program) = self.ebpf.program_mut(AUTHZ_PROGRAM) else {
            return;
        };
        let Ok(program) = <&mut SchedClassifier>::try_from(program) else {
            return;
        };
        self.policy_interfaces.rescan(program, &self.pins);
    }
}

impl Dataplane {
    /// Tells the kernel where the L7 proxy listens (`None`: no proxy, L7 services fall back to
    /// per-connection balancing).
    pub fn set_proxy(
        &mut self,
        ipv4: Option<std::net::Ipv4Addr>,
        ipv6: Option<std::net::Ipv6Addr>,
        port: Option<u16>,
    ) -> Result<(), DataplaneError> {
        let cfg = ProxyConfig {
            ipv4: ipv4.map_or(0, |ip| u32::from_ne_bytes(ip.octets())),
            ipv6: ipv6.map_or_else(Default::default, |ip| super::kernel::addr_of(ip.into())),
            port: port.unwrap_or(0).to_be(),
            _pad: 0,
        };
        self.proxy_config
            .set(0, cfg, 0)
            .map_err(|source| DataplaneError::Map {
                name: map_names::PROXY,
                source,
            })
    }
}

/// Pins `link` as `links/<name>`, detaching whatever was pinned there before — but only after
/// the new link is attached, so the cgroup is never without a program.
pub(super) fn replace_link_pin(
    pins: &Pins,
    name: &str,
    link: FdLink,
) -> Result<(), DataplaneError> {
    let final_path = pins.links().join(name);
    // bpffs refuses names containing a dot.
    let staging = pins.links().join(format!("{name}_next"));
    if staging.exists() {
        fs::remove_file(&staging).map_err(io_err(&staging))?;
    }
    let pinned = link.pin(&staging).map_err(|source| DataplaneError::Pin {
        path: staging.clone(),
        source,
    })?;
    // rename(2) on bpffs atomically replaces the old pin; dropping the old pin's last reference
    // detaches the previous generation's program.
    fs::rename(&staging, &final_path).map_err(io_err(&final_path))?;
    drop(pinned);
    debug!(link = %final_path.display(), "link pinned");
    Ok(())
}

/// Detaches every program and removes every pin under `root` (uninstall, test teardown).
pub fn cleanup(pins: &Pins) -> Result<usize, DataplaneError> {
    let mut removed = 0;
    for dir in [pins.links(), pins.maps()] {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&dir)(e)),
        };
        for entry in entries {
            let path = entry.map_err(io_err(&dir))?.path();
            fs::remove_file(&path).map_err(io_err(&path))?;
            removed += 1;
        }
        fs::remove_dir(&dir).map_err(io_err(&dir))?;
    }
    match fs::remove_dir(&pins.root) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&pins.root)(e)),
    }
    Ok(removed)
}
