//! `cargo xtask bench control`: the control plane at scale. The agent (release build) watches a
//! manifest directory (`--source files:DIR`) holding 10,000 Services with an EndpointSlice of 5
//! endpoints each (50,000 endpoints), and 1,000 of them with a VirtualService (weighted TCP
//! route over two subsets) and a DestinationRule. Measured:
//!
//! - time from agent start to `/readyz` 200 and to every service being in the pinned map;
//! - for N single-object changes (one VirtualService's weights rewritten in its own small file):
//!   the agent's own apply time for that change (its `plan applied ... elapsed_us=` log line:
//!   compile + map diff + map writes), the time from the inotify event reaching the agent to the
//!   map entry (from the agent's log timestamps), and the end-to-end time from the file write to
//!   the service's map entry pointing at a new table (polled from the pinned map by this process
//!   with raw `bpf(2)` calls);
//! - the agent's RSS (`VmRSS`/`VmHWM`) and the memory of its BPF maps (`memlock` of every map
//!   fd in `/proc/PID/fdinfo`).
//!
//! No traffic is sent: the agent runs in a harness node netns, steering only an empty test
//! cgroup.

use anyhow::{Context, Result, bail, ensure};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::process::{Command, Stdio};
use steerd_e2e::{
    Agent, BpffsDir, ChildGuard, Node, TempDir, TestCgroup, admin_addr, http_get_status,
    run_in_path, wait_until, wait_with_timeout,
};

use super::plot;
use super::{Binaries, Machine, Stats};

const NAMESPACE: &str = "bench";
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
/// Service VIPs are taken in order from 10.96.0.1 (10.96.0.0/12, Kubernetes' default range).
const FIRST_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// Endpoint addresses are taken in order from 10.128.0.1 (10.128.0.0/9: 8 million addresses).
const FIRST_ENDPOINT: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 1);
/// The file source waits this long after the last inotify event of a burst (agent/src/sources/
/// files.rs `DEBOUNCE`).
const DEBOUNCE: Duration = Duration::from_millis(100);
/// The VirtualServices start at this weight for subset v1 (v2 gets the rest).
const INITIAL_V1_WEIGHT: u32 = 80;
/// How long the agent may take to load everything.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long one change may take to reach the map.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(180);
/// Changes made even when the time budget runs out sooner.
const MIN_CHANGES: u32 = 3;
/// Interval of the map poll that timestamps a change's arrival in the kernel.
const MAP_POLL: Duration = Duration::from_micros(100);
/// Targets from issue 6.
const TARGET_CHANGE_P99_MS: f64 = 5.0;
const TARGET_RSS_MIB: f64 = 50.0;
const TARGET_MAP_MIB: f64 = 32.0;
/// Nice value the agent runs at (see the method in the report).
const AGENT_NICE: i32 = -10;
const SVG_PATH: &str = "docs/bench-control.svg";
const MIB: f64 = 1024.0 * 1024.0;

#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// Kubernetes Services (one TCP port each, a ClusterIP from 10.96.0.0/12).
    #[arg(long, default_value_t = 10_000)]
    services: u32,
    /// Ready endpoints per Service, in one EndpointSlice.
    #[arg(long, default_value_t = 5)]
    endpoints: u32,
    /// Services that also get a VirtualService (weighted TCP route over subsets v1/v2) and a
    /// DestinationRule (the subsets), and Pods for their endpoints (the subsets' labels).
    #[arg(long, default_value_t = 1_000)]
    routed: u32,
    /// Services (with their EndpointSlices and Pods) per manifest file.
    #[arg(long, default_value_t = 100)]
    per_file: u32,
    /// Single-object changes to time (at most; see --budget).
    #[arg(long, default_value_t = 50)]
    changes: u32,
    /// Seconds after which no further change is started (at least 3 are made), so that a slow
    /// agent does not make the run unbounded.
    #[arg(long, default_value_t = 120)]
    budget: u64,
    /// Pause after each change has been applied, before the next one (ms).
    #[arg(long, default_value_t = 300)]
    pause_ms: u64,
    /// Do not profile the agent during the changes (by default `perf record` samples it at
    /// 29 Hz, when `perf` is installed).
    #[arg(long)]
    no_profile: bool,
    /// Only print the results; leave BENCHMARKS.md and the plot alone.
    #[arg(long)]
    no_write: bool,
    /// Also write every per-change measurement to this JSON file.
    #[arg(long)]
    raw: Option<PathBuf>,
}

pub fn run(options: &Options) -> Result<()> {
    ensure!(
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() } == 0,
        "bench control needs root (network namespaces, cgroups, bpffs)"
    );
    ensure!(
        (1..=60_000).contains(&options.services),
        "--services: 1 to 60000 (the maps hold 65,536)"
    );
    ensure!(
        (2..=100).contains(&options.endpoints),
        "--endpoints: 2 to 100 (both subsets need one)"
    );
    ensure!(
        u64::from(options.services) * u64::from(options.endpoints) < 1 << 22,
        "--services × --endpoints: fewer than 4 million endpoints"
    );
    ensure!(
        (1..=options.services).contains(&options.routed),
        "--routed: 1 to --services"
    );
    ensure!(options.per_file >= 1, "--per-file: at least 1");
    ensure!(
        (1..=10_000).contains(&options.changes),
        "--changes: 1 to 10000"
    );
    ensure!(
        crate::have("ip"),
        "`ip` is missing; `cargo xtask setup` installs it"
    );

    let bins = super::build_release()?;
    let started = Instant::now();
    // The harness's helpers (`maps` calls, bpffs clean-up) run `$STEERD_BIN`; the agent logs the
    // file source's events at debug level (their timestamps are when a change reached it).
    // SAFETY: this process has a single thread here; nothing reads the environment concurrently.
    unsafe {
        std::env::set_var("STEERD_BIN", &bins.steerd);
        std::env::set_var("STEERD_LOG", "info,steerd::sources::files=debug");
    }
    let machine = Machine::describe();
    let load_before = Load::sample();

    let result = measure(options, &bins)?;
    let load_after = Load::sample();
    let elapsed = started.elapsed();
    let load = LoadReport {
        before: load_before,
        after: load_after,
        busy_during_changes: result.busy_during_changes,
        agent_share_during_changes: result.agent_share_during_changes,
    };

    if let Some(path) = &options.raw {
        let changes: Vec<_> = result
            .changes
            .iter()
            .map(|c| {
                serde_json::json!({
                    "service": c.service,
                    "v1_weight": c.v1_weight,
                    "write_to_map_ns": c.write_to_map.as_nanos() as u64,
                    "event_to_applied_ns": c.event_to_applied.as_nanos() as u64,
                    "write_to_event_ns": c.write_to_event.as_nanos() as u64,
                    "apply_us": c.apply_us,
                    "agent_cpu_ns": c.agent_cpu_ns,
                    "updated": c.updated,
                    "noop_reloads_after": c.noop_reloads_after,
                    "rss_after": c.rss_after,
                })
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&changes)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }

    let report = Report {
        options,
        machine: &machine,
        bins: &bins,
        result: &result,
        load: &load,
        elapsed,
    };
    let markdown = report.section();
    println!("\n{markdown}");
    println!(
        "(bench control took {:.0} s after the build)",
        elapsed.as_secs_f64()
    );
    if options.no_write {
        return Ok(());
    }
    let svg = crate::workspace_root().join(SVG_PATH);
    change_chart(&svg, &result)?;
    let path = super::write_section("control", &markdown)?;
    eprintln!("wrote {} and {}", path.display(), svg.display());
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// The manifests
// ------------------------------------------------------------------------------------------------

fn vip(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(FIRST_VIP) + index)
}

fn endpoint_ip(service: u32, endpoint: u32, per_service: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(FIRST_ENDPOINT) + service * per_service + endpoint)
}

fn service_name(index: u32) -> String {
    format!("svc-{index:05}")
}

/// Which services get a VirtualService and a DestinationRule: `routed` of them, spread evenly.
fn routed_services(services: u32, routed: u32) -> Vec<u32> {
    (0..routed)
        .map(|k| (u64::from(k) * u64::from(services) / u64::from(routed)) as u32)
        .collect()
}

/// The subset (`version` label) of endpoint `j` of `n`: the first half (rounded up) is v1.
fn version_of(j: u32, n: u32) -> &'static str {
    if j < n.div_ceil(2) { "v1" } else { "v2" }
}

/// A Service, its EndpointSlice and (for routed services) the Pods behind the endpoints, as a
/// controller-manager would have them: block-style YAML, as `kubectl get -o yaml` writes it.
fn write_service(out: &mut String, index: u32, endpoints: u32, routed: bool) {
    let name = service_name(index);
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n  labels:\n    app: {name}\nspec:\n  type: ClusterIP\n  clusterIP: {vip}\n  clusterIPs:\n  - {vip}\n  ports:\n  - name: tcp\n    port: {SERVICE_PORT}\n    protocol: TCP\n    targetPort: {TARGET_PORT}\n  selector:\n    app: {name}\n",
        vip = vip(index)
    );
    let _ = write!(
        out,
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-x7k2p\n  namespace: {NAMESPACE}\n  labels:\n    kubernetes.io/service-name: {name}\n    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\naddressType: IPv4\nports:\n- name: tcp\n  port: {TARGET_PORT}\n  protocol: TCP\nendpoints:\n"
    );
    for j in 0..endpoints {
        let _ = write!(
            out,
            "- addresses:\n  - {ip}\n  conditions:\n    ready: true\n  targetRef:\n    kind: Pod\n    name: {name}-{j}\n    namespace: {NAMESPACE}\n",
            ip = endpoint_ip(index, j, endpoints)
        );
    }
    if routed {
        for j in 0..endpoints {
            let _ = write!(
                out,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}-{j}\n  namespace: {NAMESPACE}\n  labels:\n    app: {name}\n    version: {version}\nspec:\n  containers:\n  - name: app\n    ports:\n    - containerPort: {TARGET_PORT}\nstatus:\n  phase: Running\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n",
                version = version_of(j, endpoints),
                ip = endpoint_ip(index, j, endpoints)
            );
        }
    }
}

/// The VirtualService (v1 gets `v1_weight` %, v2 the rest) and DestinationRule of one routed
/// service: the content of its own small file.
fn routing(index: u32, v1_weight: u32) -> String {
    let name = service_name(index);
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\nspec:\n  hosts:\n  - {name}\n  tcp:\n  - match:\n    - port: {SERVICE_PORT}\n    route:\n    - destination:\n        host: {name}\n        port:\n          number: {SERVICE_PORT}\n        subset: v1\n      weight: {v1_weight}\n    - destination:\n        host: {name}\n        port:\n          number: {SERVICE_PORT}\n        subset: v2\n      weight: {v2_weight}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\nspec:\n  host: {name}\n  subsets:\n  - name: v1\n    labels:\n      version: v1\n  - name: v2\n    labels:\n      version: v2\n",
        v2_weight = 100 - v1_weight
    )
}

fn routing_file(index: u32) -> String {
    format!("routes/{}.yaml", service_name(index))
}

/// What was written: file and byte counts, for the report.
struct Corpus {
    files: usize,
    bytes: u64,
    routed: Vec<u32>,
}

fn write_manifests(dir: &TempDir, options: &Options) -> Result<Corpus> {
    let routed = routed_services(options.services, options.routed);
    let is_routed: std::collections::BTreeSet<u32> = routed.iter().copied().collect();
    std::fs::create_dir_all(dir.path().join("routes")).context("creating routes/")?;
    let (mut files, mut bytes) = (0, 0u64);
    let mut first = 0;
    while first < options.services {
        let last = (first + options.per_file).min(options.services);
        let mut text = String::new();
        for i in first..last {
            write_service(&mut text, i, options.endpoints, is_routed.contains(&i));
        }
        dir.write(
            &format!("services-{:05}.yaml", first / options.per_file),
            &text,
        );
        files += 1;
        bytes += text.len() as u64;
        first = last;
    }
    for &i in &routed {
        let text = routing(i, INITIAL_V1_WEIGHT);
        dir.write(&routing_file(i), &text);
        files += 1;
        bytes += text.len() as u64;
    }
    Ok(Corpus {
        files,
        bytes,
        routed,
    })
}

// ------------------------------------------------------------------------------------------------
// Reading the pinned services map with bpf(2)
// ------------------------------------------------------------------------------------------------

mod bpf {
    use anyhow::{Context, Result, bail};
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::path::Path;

    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }

    #[repr(C)]
    struct MapElem {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    #[repr(C)]
    struct GetById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }

    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }

    /// The head of `struct bpf_map_info` (the kernel fills as much as `info_len` asks for).
    #[repr(C)]
    #[derive(Default)]
    struct MapInfo {
        map_type: u32,
        id: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        name: [u8; 16],
    }

    fn sys<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
        // SAFETY: `attr` is a live, properly laid out bpf_attr prefix of the given size, and
        // every pointer in it refers to memory that outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T as *mut libc::c_void,
                std::mem::size_of::<T>() as libc::c_uint,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// A pinned map, opened read-only from this process.
    pub struct PinnedMap {
        fd: OwnedFd,
    }

    impl PinnedMap {
        pub fn open(path: &Path) -> Result<PinnedMap> {
            let c = CString::new(path.as_os_str().as_encoded_bytes())?;
            let mut attr = ObjGet {
                pathname: c.as_ptr() as u64,
                bpf_fd: 0,
                // BPF_F_RDONLY
                file_flags: 1 << 3,
            };
            let fd = sys(BPF_OBJ_GET, &mut attr)
                .with_context(|| format!("BPF_OBJ_GET {}", path.display()))?;
            // SAFETY: the kernel just returned this fd to us; nobody else owns it.
            Ok(PinnedMap {
                fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            })
        }

        /// The value under `key`, or `None` if there is none.
        pub fn lookup<const V: usize>(&self, key: &[u8]) -> Result<Option<[u8; V]>> {
            let mut value = [0u8; V];
            let mut attr = MapElem {
                map_fd: self.fd.as_raw_fd() as u32,
                _pad: 0,
                key: key.as_ptr() as u64,
                value: value.as_mut_ptr() as u64,
                flags: 0,
            };
            match sys(BPF_MAP_LOOKUP_ELEM, &mut attr) {
                Ok(_) => Ok(Some(value)),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
                Err(e) => bail!("BPF_MAP_LOOKUP_ELEM: {e}"),
            }
        }

        /// Number of keys (walks them with `BPF_MAP_GET_NEXT_KEY`).
        pub fn count<const K: usize>(&self) -> Result<usize> {
            let mut key = [0u8; K];
            let mut next = [0u8; K];
            let mut n = 0;
            let mut first = true;
            loop {
                let mut attr = MapElem {
                    map_fd: self.fd.as_raw_fd() as u32,
                    _pad: 0,
                    key: if first { 0 } else { key.as_ptr() as u64 },
                    value: next.as_mut_ptr() as u64,
                    flags: 0,
                };
                match sys(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                    Ok(_) => {
                        n += 1;
                        key = next;
                        first = false;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
                    Err(e) => bail!("BPF_MAP_GET_NEXT_KEY: {e}"),
                }
            }
        }
    }

    /// The name of the map with kernel id `id` (empty if it cannot be opened).
    pub fn map_name(id: u32) -> String {
        let mut attr = GetById {
            id,
            next_id: 0,
            open_flags: 1 << 3,
        };
        let Ok(fd) = sys(BPF_MAP_GET_FD_BY_ID, &mut attr) else {
            return String::new();
        };
        // SAFETY: the kernel just returned this fd to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut info = MapInfo::default();
        let mut attr = InfoByFd {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: std::mem::size_of::<MapInfo>() as u32,
            info: &mut info as *mut MapInfo as u64,
        };
        if sys(BPF_OBJ_GET_INFO_BY_FD, &mut attr).is_err() {
            return String::new();
        }
        let len = info.name.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&info.name[..len]).into_owned()
    }
}

/// `steerd_common::ServiceKey` for an IPv4 VIP: the address IPv4-mapped in 16 bytes, the port in
/// network byte order, the protocol (TCP), one byte of padding.
fn service_key(vip: Ipv4Addr, port: u16) -> [u8; 20] {
    let mut key = [0u8; 20];
    key[10] = 0xff;
    key[11] = 0xff;
    key[12..16].copy_from_slice(&vip.octets());
    key[16..18].copy_from_slice(&port.to_be_bytes());
    key[18] = 6;
    key
}

/// `steerd_common::ServiceValue` is `{table_id, slot_count, flags, _pad}` (u32s, host order).
fn table_id(value: &[u8; 16]) -> u32 {
    u32::from_ne_bytes([value[0], value[1], value[2], value[3]])
}

// ------------------------------------------------------------------------------------------------
// The agent's process: log, memory, CPU time, BPF maps, metrics
// ------------------------------------------------------------------------------------------------

/// One JSON log line of the agent.
struct LogLine {
    /// Wall-clock time the agent logged it.
    at: SystemTime,
    message: String,
    fields: serde_json::Value,
}

/// Reads the agent's log (JSON lines) incrementally.
struct LogTail {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl LogTail {
    fn new(path: &Path) -> LogTail {
        LogTail {
            path: path.to_owned(),
            offset: 0,
            partial: String::new(),
        }
    }

    /// Complete lines written since the last call.
    fn read_new(&mut self) -> Vec<LogLine> {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        use std::io::Seek;
        if file.seek(std::io::SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut text = String::new();
        let Ok(n) = file.read_to_string(&mut text) else {
            return Vec::new();
        };
        self.offset += n as u64;
        self.partial.push_str(&text);
        let Some(end) = self.partial.rfind('\n') else {
            return Vec::new();
        };
        let complete: String = self.partial.drain(..=end).collect();
        complete.lines().filter_map(parse_log_line).collect()
    }
}

fn parse_log_line(line: &str) -> Option<LogLine> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let at = parse_rfc3339(v["timestamp"].as_str()?)?;
    let fields = v["fields"].clone();
    Some(LogLine {
        at,
        message: fields["message"].as_str().unwrap_or_default().to_owned(),
        fields,
    })
}

/// `2026-11-23T16:57:36.123456Z` (or with a `±hh:mm` offset) as a [`SystemTime`].
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let rest = s.get(19..)?;
    let (frac, zone) = match rest.strip_prefix('.') {
        Some(r) => {
            let digits = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            (&r[..digits], &r[digits..])
        }
        None => ("", rest),
    };
    let mut nanos: i64 = 0;
    for (i, c) in frac.chars().take(9).enumerate() {
        nanos += i64::from(c.to_digit(10)?) * 10i64.pow(8 - i as u32);
    }
    let offset = match zone {
        "Z" | "z" | "" => 0,
        z => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let h: i64 = z.get(1..3)?.parse().ok()?;
            let m: i64 = z.get(4..6)?.parse().ok()?;
            sign * (h * 3600 + m * 60)
        }
    };
    // Days from civil (H. Hinnant).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos as u32))
}

/// `b - a`, or zero if `b` is earlier.
fn since(a: SystemTime, b: SystemTime) -> Duration {
    b.duration_since(a).unwrap_or_default()
}

/// `VmRSS`, `VmHWM` and `RssAnon` of a process, in bytes.
#[derive(Clone, Copy, Debug, Default)]
struct Rss {
    rss: u64,
    hwm: u64,
    anon: u64,
}

fn rss_of(pid: u32) -> Result<Rss> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = |field: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    };
    Ok(Rss {
        rss: kib("VmRSS:").context("no VmRSS")?,
        hwm: kib("VmHWM:").context("no VmHWM")?,
        anon: kib("RssAnon:").unwrap_or(0),
    })
}

/// Time every thread of `pid` has spent on a CPU, in ns (`/proc/PID/task/*/schedstat`).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// One BPF map the agent holds open.
#[derive(Clone, Debug)]
struct BpfMap {
    id: u32,
    name: String,
    map_type: u32,
    max_entries: u64,
    memlock: u64,
    /// `BPF_F_NO_PREALLOC`: entries are allocated as they are inserted.
    on_demand: bool,
}

/// The BPF maps `pid` has fds for (each map once), from `/proc/PID/fdinfo`.
fn bpf_maps_of(pid: u32) -> Result<Vec<BpfMap>> {
    let mut maps: BTreeMap<u32, BpfMap> = BTreeMap::new();
    let dir = format!("/proc/{pid}/fd");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.as_os_str() != "anon_inode:bpf-map" {
            continue;
        }
        let fd = entry.file_name();
        let Ok(info) =
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy()))
        else {
            continue;
        };
        let field = |name: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name))?
                .trim()
                .parse()
                .ok()
        };
        let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) else {
            continue;
        };
        let id = id as u32;
        maps.entry(id).or_insert_with(|| BpfMap {
            id,
            name: bpf::map_name(id),
            map_type: field("map_type:").unwrap_or(0) as u32,
            max_entries: field("max_entries:").unwrap_or(0),
            memlock,
            on_demand: info
                .lines()
                .find_map(|l| l.strip_prefix("map_flags:"))
                .and_then(|f| u64::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
                .is_some_and(|f| f & 1 != 0),
        });
    }
    Ok(maps.into_values().collect())
}

fn map_type_name(t: u32) -> &'static str {
    match t {
        1 => "hash",
        2 => "array",
        3 => "prog_array",
        4 => "perf_event_array",
        5 => "percpu_hash",
        6 => "percpu_array",
        9 => "lru_hash",
        10 => "lru_percpu_hash",
        11 => "lpm_trie",
        27 => "ringbuf",
        _ => "other",
    }
}

/// `GET path` on `addr` from inside the netns at `netns_path`; the response body.
fn http_get(netns_path: &Path, addr: SocketAddr, path: &str) -> Result<String> {
    let response = run_in_path(netns_path, || -> Result<String> {
        let timeout = Duration::from_secs(5);
        let mut stream = TcpStream::connect_timeout(&addr, timeout).context("connect")?;
        stream.set_read_timeout(Some(timeout))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes())?;
        let mut body = String::new();
        stream.read_to_string(&mut body).context("read")?;
        Ok(body)
    })?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: not an HTTP response"))?;
    ensure!(
        head.starts_with("HTTP/1.1 200"),
        "GET {path}: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_owned())
}

/// The agent's `/metrics` values this benchmark reads.
#[derive(Clone, Copy, Debug, Default)]
struct Metrics {
    apply_sum: f64,
    apply_count: f64,
    map_services: f64,
    map_slots: f64,
}

fn metrics(netns_path: &Path) -> Result<Metrics> {
    let text = http_get(netns_path, admin_addr(), "/metrics")?;
    let value = |name: &str| -> f64 {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let rest = l.strip_prefix(name)?;
                // `name value` or `name{labels} value`, not a longer name.
                if !(rest.starts_with(' ') || rest.starts_with('{')) {
                    return None;
                }
                rest.rsplit(' ').next()?.parse().ok()
            })
            .unwrap_or(f64::NAN)
    };
    Ok(Metrics {
        apply_sum: value("steerd_plan_apply_seconds_sum"),
        apply_count: value("steerd_plan_apply_seconds_count"),
        map_services: value("steerd_map_services"),
        map_slots: value("steerd_map_slots"),
    })
}

// ------------------------------------------------------------------------------------------------
// Machine load
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, Default)]
struct Load {
    /// 1-minute load average.
    avg1: f64,
    /// `rustc` processes running at the time (other builds sharing the machine).
    rustc: usize,
}

impl Load {
    fn sample() -> Load {
        let avg1 = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(f64::NAN);
        let rustc = std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
                    .filter(|c| c.trim() == "rustc")
                    .count()
            })
            .unwrap_or(0);
        Load { avg1, rustc }
    }
}

/// Busy and total jiffies of all CPUs (`/proc/stat`).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

struct LoadReport {
    before: Load,
    after: Load,
    /// Fraction of all CPUs busy while the changes ran.
    busy_during_changes: f64,
    /// Fraction of all CPUs the agent used in that time.
    agent_share_during_changes: f64,
}

// ------------------------------------------------------------------------------------------------
// The measurement
// ------------------------------------------------------------------------------------------------

/// One timed change.
struct Change {
    service: u32,
    v1_weight: u32,
    /// File write → the service's map entry points at a new table (polled).
    write_to_map: Duration,
    /// The file source's "manifest change" → "plan applied" (agent log timestamps).
    event_to_applied: Duration,
    /// File write → the file source's "manifest change" (wall clocks of this process and the
    /// agent's log).
    write_to_event: Duration,
    /// The agent's `elapsed_us` for the plan: compile + map diff + map writes.
    apply_us: u64,
    /// CPU time the agent used from the write until the plan was applied (all threads).
    agent_cpu_ns: u64,
    /// Services the apply rewrote (`updated`; must be 1).
    updated: u64,
    /// Further plans applied before the next change (reloads that changed nothing).
    noop_reloads_after: usize,
    /// The agent's VmRSS after the pause that follows the change.
    rss_after: u64,
}

impl Change {
    /// After the debounce: re-read and re-parse every manifest, merge, compile, write.
    fn after_debounce(&self) -> Duration {
        self.event_to_applied.saturating_sub(DEBOUNCE)
    }
}

struct Ready {
    /// Agent start → `/readyz` 200.
    readyz: Duration,
    /// Agent start → every service in the pinned map (polled every few ms).
    all_in_map: Duration,
    /// Agent start → the first "plan applied" log line (agent log timestamp).
    first_plan: Duration,
    /// The first plan's `elapsed_us` (compile + writing every service).
    first_apply_us: u64,
    /// Agent CPU time until ready.
    cpu: Duration,
}

struct Measured {
    corpus: Corpus,
    ready: Ready,
    changes: Vec<Change>,
    rss_ready: Rss,
    rss_after: Rss,
    maps_ready: Vec<BpfMap>,
    maps_after: Vec<BpfMap>,
    metrics_before: Metrics,
    metrics_after: Metrics,
    /// Services and backends `steerd maps services` listed after ready.
    listed_services: usize,
    listed_backends: u64,
    busy_during_changes: f64,
    agent_share_during_changes: f64,
    profile: Option<Profile>,
}

fn measure(options: &Options, bins: &Binaries) -> Result<Measured> {
    // Fixtures drop in reverse order: agent, pins, manifests, cgroup, node.
    let node = Node::new();
    let cgroup = TestCgroup::new();
    let manifests = TempDir::new("steerd-bench-control");
    eprintln!(
        "bench control: writing {} services × {} endpoints, {} VirtualServices + DestinationRules",
        options.services, options.endpoints, options.routed
    );
    let corpus = write_manifests(&manifests, options)?;
    eprintln!(
        "bench control: {} files, {:.1} MiB",
        corpus.files,
        corpus.bytes as f64 / MIB
    );
    let bpffs = BpffsDir::new();
    let services_pin = bpffs.path().join("maps").join("sd_svc_v1");
    let source = format!("files:{}", manifests.as_str());
    let admin = admin_addr().to_string();
    let cgroup_path = cgroup.path().to_str().context("cgroup path is not UTF-8")?;

    // The agent inherits this thread's nice value.
    let reniced = set_nice(AGENT_NICE);
    let spawned_wall = SystemTime::now();
    let spawned = Instant::now();
    let mut agent = Agent::spawn_bin(
        &bins.steerd,
        &node,
        &[
            "run",
            "--source",
            &source,
            "--bpffs",
            bpffs.as_str(),
            "--cgroup",
            cgroup_path,
            "--admin",
            &admin,
            "--log-format",
            "json",
        ],
    );
    if reniced {
        set_nice(0);
    }
    let pid = agent.pid().context("agent has no pid")?;
    let mut log = LogTail::new(agent.log_path());

    // Ready: /readyz, and every service in the map.
    let mut readyz = None;
    let mut all_in_map = None;
    let mut in_map = 0;
    let mut map: Option<bpf::PinnedMap> = None;
    while readyz.is_none() || all_in_map.is_none() {
        if let Some(status) = agent.try_wait() {
            bail!(
                "the agent exited ({status}) before it was ready; log:\n{}",
                agent.log()
            );
        }
        if spawned.elapsed() > READY_TIMEOUT {
            bail!(
                "not ready after {READY_TIMEOUT:?} (readyz {readyz:?}, {in_map} services in the map); log:\n{}",
                agent.log()
            );
        }
        if readyz.is_none()
            && http_get_status(&node.netns.path(), admin_addr(), "/readyz").is_ok_and(|s| s == 200)
        {
            readyz = Some(spawned.elapsed());
        }
        if all_in_map.is_none() {
            if map.is_none() && services_pin.exists() {
                map = bpf::PinnedMap::open(&services_pin).ok();
            }
            if let Some(m) = &map {
                in_map = m.count::<20>()?;
                if in_map >= options.services as usize {
                    all_in_map = Some(spawned.elapsed());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let ready_cpu = Duration::from_nanos(cpu_ns(pid));
    let map = map.context("services map")?;
    let (readyz, all_in_map) = (readyz.unwrap_or_default(), all_in_map.unwrap_or_default());
    let mut first_plan = None;
    ensure!(
        wait_until(Duration::from_secs(10), || {
            first_plan = first_plan.take().or_else(|| {
                log.read_new()
                    .into_iter()
                    .find(|l| l.message == "plan applied")
            });
            first_plan.is_some()
        }),
        "no \"plan applied\" in the agent's log:\n{}",
        agent.log()
    );
    let first_plan = first_plan.expect("waited for it");
    let ready = Ready {
        readyz,
        all_in_map,
        first_plan: since(spawned_wall, first_plan.at),
        first_apply_us: first_plan.fields["elapsed_us"].as_u64().unwrap_or(0),
        cpu: ready_cpu,
    };
    eprintln!(
        "bench control: /readyz after {:.2} s, all {} services in the map after {:.2} s (first plan: {} ms)",
        ready.readyz.as_secs_f64(),
        options.services,
        ready.all_in_map.as_secs_f64(),
        ready.first_apply_us / 1000
    );

    // What `steerd maps services` shows: every service, routed ones with every endpoint.
    let rows = Agent::run_cli_json(
        &node,
        &["maps", "services", "-o", "json", "--bpffs", bpffs.as_str()],
    );
    let rows = rows.as_array().context("maps services: not a list")?;
    let listed_services = rows
        .iter()
        .filter(|r| {
            r["port"] == SERVICE_PORT
                && r["protocol"] == "TCP"
                && r["backends"] == options.endpoints
        })
        .count();
    let listed_backends: u64 = rows.iter().filter_map(|r| r["backends"].as_u64()).sum();
    ensure!(
        listed_services == options.services as usize,
        "steerd maps services lists {listed_services} services with {} backends, expected {}",
        options.endpoints,
        options.services
    );

    // Settle (the first plan's garbage, the GC tick), then memory at ready.
    std::thread::sleep(Duration::from_millis(1500));
    let rss_ready = rss_of(pid)?;
    let maps_ready = bpf_maps_of(pid)?;
    let metrics_before = metrics(&node.netns.path())?;
    log.read_new();

    // The changes: one VirtualService's weights at a time, spread over the routed services.
    eprintln!("bench control: {} single-object changes", options.changes);
    let mut weights: BTreeMap<u32, u32> = BTreeMap::new();
    let mut changes: Vec<Change> = Vec::new();
    let profile_dir = TempDir::new("steerd-bench-control-perf");
    let profiler = if options.no_profile {
        None
    } else {
        Profiler::start(pid, &profile_dir)
    };
    let (busy0, total0) = cpu_jiffies();
    let agent_cpu0 = cpu_ns(pid);
    let wall0 = Instant::now();
    for k in 0..options.changes {
        if k >= MIN_CHANGES && wall0.elapsed() > Duration::from_secs(options.budget) {
            eprintln!(
                "bench control: time budget ({} s) spent after {k} changes",
                options.budget
            );
            break;
        }
        let service = corpus.routed[(k as usize * 7919) % corpus.routed.len()];
        let current = *weights.get(&service).unwrap_or(&INITIAL_V1_WEIGHT);
        // 10..90 in steps of 10, never the current value.
        let mut v1_weight = 10 + (k * 7 % 9) * 10;
        if v1_weight == current {
            v1_weight = if current >= 90 { 10 } else { current + 10 };
        }
        weights.insert(service, v1_weight);
        let key = service_key(vip(service), SERVICE_PORT);
        let before = map
            .lookup::<16>(&key)?
            .map(|v| table_id(&v))
            .context("a routed service is not in the map")?;
        let text = routing(service, v1_weight);
        let path = manifests.path().join(routing_file(service));
        let cpu_before = cpu_ns(pid);
        let written_wall = SystemTime::now();
        let written = Instant::now();
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        let write_to_map = loop {
            if let Some(v) = map.lookup::<16>(&key)?
                && table_id(&v) != before
            {
                break written.elapsed();
            }
            if written.elapsed() > CHANGE_TIMEOUT {
                bail!(
                    "change {k} ({}) not in the map after {CHANGE_TIMEOUT:?}; log:\n{}",
                    service_name(service),
                    agent.log()
                );
            }
            std::thread::sleep(MAP_POLL);
        };
        let mut lines = Vec::new();
        let logged = wait_until(Duration::from_secs(10), || {
            lines.extend(log.read_new());
            lines.iter().any(|l| l.message == "plan applied")
        });
        let agent_cpu = cpu_ns(pid) - cpu_before;
        ensure!(
            logged,
            "change {k}: no \"plan applied\" logged; log:\n{}",
            agent.log()
        );
        let event = lines.iter().find(|l| l.message == "manifest change");
        let applied = lines
            .iter()
            .find(|l| l.message == "plan applied")
            .expect("waited for it");
        let event_at = event.map_or(written_wall, |e| e.at);
        let change = Change {
            service,
            v1_weight,
            write_to_map,
            event_to_applied: since(event_at, applied.at),
            write_to_event: since(written_wall, event_at),
            apply_us: applied.fields["elapsed_us"].as_u64().unwrap_or(0),
            agent_cpu_ns: agent_cpu,
            updated: applied.fields["updated"].as_u64().unwrap_or(0),
            noop_reloads_after: 0,
            rss_after: 0,
        };
        ensure!(
            event.is_some(),
            "change {k}: no \"manifest change\" debug line before the plan; log:\n{}",
            agent.log()
        );
        ensure!(
            change.updated == 1 && applied.fields["added"] == 0 && applied.fields["removed"] == 0,
            "change {k}: expected exactly one service updated, the agent logged {}",
            applied.fields
        );
        let more_plans = lines.iter().filter(|l| l.message == "plan applied").count() - 1;
        let c_apply_us = change.apply_us;
        changes.push(change);
        std::thread::sleep(Duration::from_millis(options.pause_ms));
        // Reloads triggered by late events of the same write (they change nothing).
        let late = log
            .read_new()
            .iter()
            .filter(|l| l.message == "plan applied")
            .count();
        let rss = rss_of(pid)?.rss;
        if let Some(c) = changes.last_mut() {
            c.noop_reloads_after = more_plans + late;
            c.rss_after = rss;
        }
        eprintln!(
            "bench control: change {}: {:.1} ms to the map, apply {:.1} ms, RSS {:.0} MiB",
            k + 1,
            write_to_map.as_secs_f64() * 1e3,
            c_apply_us as f64 / 1e3,
            rss as f64 / MIB
        );
    }
    let wall = wall0.elapsed();
    let (busy1, total1) = cpu_jiffies();
    let agent_cpu_changes = cpu_ns(pid) - agent_cpu0;
    let profiling = Instant::now();
    let profile = profiler.and_then(Profiler::finish);
    if profile.is_some() {
        eprintln!(
            "bench control: profile summarised in {:.0} s",
            profiling.elapsed().as_secs_f64()
        );
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let busy_during_changes = (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64;
    let agent_share_during_changes = agent_cpu_changes as f64 / wall.as_nanos() as f64 / cpus;

    // The last change, as `steerd maps backends` computes it from the kernel's alias tables.
    if let Some(last) = changes.last() {
        let rows = Agent::run_cli_json(
            &node,
            &["maps", "backends", "-o", "json", "--bpffs", bpffs.as_str()],
        );
        let vip = vip(last.service).to_string();
        let v1: Vec<String> = (0..options.endpoints)
            .filter(|&j| version_of(j, options.endpoints) == "v1")
            .map(|j| {
                SocketAddr::new(
                    endpoint_ip(last.service, j, options.endpoints).into(),
                    TARGET_PORT,
                )
                .to_string()
            })
            .collect();
        let share: f64 = rows
            .as_array()
            .context("maps backends: not a list")?
            .iter()
            .filter(|r| r["vip"] == vip.as_str() && r["port"] == SERVICE_PORT)
            .filter(|r| {
                r["backend"]
                    .as_str()
                    .is_some_and(|b| v1.iter().any(|x| x == b))
            })
            .filter_map(|r| r["weight"].as_f64())
            .sum();
        ensure!(
            (share - f64::from(last.v1_weight)).abs() < 0.1,
            "{}: subset v1 has {share:.2}% in the kernel, the last change set {}%",
            service_name(last.service),
            last.v1_weight
        );
    }

    std::thread::sleep(Duration::from_millis(1500));
    let rss_after = rss_of(pid)?;
    let maps_after = bpf_maps_of(pid)?;
    let metrics_after = metrics(&node.netns.path())?;
    drop(agent);
    Ok(Measured {
        corpus,
        ready,
        changes,
        rss_ready,
        rss_after,
        maps_ready,
        maps_after,
        metrics_before,
        metrics_after,
        listed_services,
        listed_backends,
        busy_during_changes,
        agent_share_during_changes,
        profile,
    })
}

/// Where the agent's CPU time went: inclusive and self shares of the samples `perf` took.
struct Profile {
    /// As perf reports it (`831`, `3K`).
    samples: String,
    /// steerd's own functions, inclusive of what they call (% of samples).
    inclusive: Vec<(String, f64)>,
    /// Any function, exclusive (% of samples).
    exclusive: Vec<(String, f64)>,
}

/// `perf record` with DWARF call graphs on the agent, if `perf` is installed.
struct Profiler {
    child: ChildGuard,
    data: PathBuf,
}

const PROFILE_HZ: u32 = 29;

impl Profiler {
    fn start(pid: u32, dir: &TempDir) -> Option<Profiler> {
        if !crate::have("perf") {
            eprintln!("bench control: no `perf`; no profile");
            return None;
        }
        let data = dir.path().join("perf.data");
        let child = Command::new("perf")
            .args(["record", "--quiet", "--call-graph", "dwarf,16384", "-F"])
            .arg(PROFILE_HZ.to_string())
            .arg("-p")
            .arg(pid.to_string())
            .arg("-o")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(Profiler {
            child: ChildGuard::new(child),
            data,
        })
    }

    /// Stops recording and summarises (`perf report`); `None` if that fails.
    fn finish(mut self) -> Option<Profile> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let stopped = wait_until(Duration::from_secs(60), || {
            self.child.child_mut().try_wait().ok().flatten().is_some()
        });
        if !stopped {
            return None;
        }
        let mut cmd = Command::new("perf");
        cmd.arg("report")
            .arg("-i")
            .arg(&self.data)
            .args([
                "--children",
                "--sort",
                "symbol",
                "-g",
                "none",
                "--stdio",
                "--percent-limit",
                "1",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let output = wait_with_timeout(cmd.spawn().ok()?, Duration::from_secs(180)).ok()?;
        parse_perf_report(&String::from_utf8_lossy(&output.stdout))
    }
}

/// `perf report --children --sort symbol -g none --stdio`: `# Samples: 831  of event ...` and
/// rows `  84.24%  0.24%  [.] steerd::compile::compile`.
fn parse_perf_report(text: &str) -> Option<Profile> {
    let samples = text
        .lines()
        .find_map(|l| l.strip_prefix("# Samples: "))
        .and_then(|l| l.split_whitespace().next())?
        .to_owned();
    let mut rows = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let mut fields = line.split_whitespace();
        let (Some(children), Some(own), Some(_kind)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let percent = |f: &str| f.strip_suffix('%')?.parse::<f64>().ok();
        let (Some(children), Some(own)) = (percent(children), percent(own)) else {
            continue;
        };
        // Without inline information perf ends a row with `- -` (no source lines).
        let mut words: Vec<&str> = fields.collect();
        while words.last() == Some(&"-") {
            words.pop();
        }
        let symbol = words.join(" ");
        // One row per name: generic instances share a demangled name; keep the largest.
        if !rows
            .iter()
            .any(|(s, _, _): &(String, f64, f64)| *s == symbol)
        {
            rows.push((symbol, children, own));
        }
    }
    let mut inclusive: Vec<(String, f64)> = rows
        .iter()
        .filter(|(s, _, _)| s.starts_with("steerd::") && !s.contains("{{closure}}"))
        .map(|(s, c, _)| (s.clone(), *c))
        .collect();
    inclusive.sort_by(|a, b| b.1.total_cmp(&a.1));
    inclusive.truncate(12);
    let mut exclusive: Vec<(String, f64)> = rows
        .iter()
        .filter(|(_, _, o)| *o >= 1.0)
        .map(|(s, _, o)| (s.clone(), *o))
        .collect();
    exclusive.sort_by(|a, b| b.1.total_cmp(&a.1));
    exclusive.truncate(6);
    (!inclusive.is_empty()).then_some(Profile {
        samples,
        inclusive,
        exclusive,
    })
}

/// Sets the calling thread's nice value; whether that worked.
fn set_nice(nice: i32) -> bool {
    // SAFETY: plain syscall; `who = 0` is the calling thread (Linux nice values are per thread).
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) == 0 }
}

// ------------------------------------------------------------------------------------------------
// The report
// ------------------------------------------------------------------------------------------------

struct Report<'a> {
    options: &'a Options,
    machine: &'a Machine,
    bins: &'a Binaries,
    result: &'a Measured,
    load: &'a LoadReport,
    elapsed: Duration,
}

fn ms(us: f64) -> String {
    let ms = us / 1000.0;
    if ms >= 10_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB)
}

fn met(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**missed**" }
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Per-change series, as [`Stats`] (µs).
struct ChangeStats {
    write_to_map: Stats,
    event_to_applied: Stats,
    after_debounce: Stats,
    apply: Stats,
    reload: Stats,
    cpu: Stats,
}

impl ChangeStats {
    fn of(changes: &[Change]) -> ChangeStats {
        let ns = |f: &dyn Fn(&Change) -> u64| -> Stats {
            Stats::of(&changes.iter().map(f).collect::<Vec<_>>())
        };
        ChangeStats {
            write_to_map: ns(&|c| c.write_to_map.as_nanos() as u64),
            event_to_applied: ns(&|c| c.event_to_applied.as_nanos() as u64),
            after_debounce: ns(&|c| c.after_debounce().as_nanos() as u64),
            apply: ns(&|c| c.apply_us * 1000),
            reload: ns(&|c| {
                (c.after_debounce().as_nanos() as u64).saturating_sub(c.apply_us * 1000)
            }),
            cpu: ns(&|c| c.agent_cpu_ns),
        }
    }
}

impl Report<'_> {
    fn section(&self) -> String {
        let (o, r, m) = (self.options, self.result, self.machine);
        let s = ChangeStats::of(&r.changes);
        let memlock = |maps: &[BpfMap]| -> u64 { maps.iter().map(|m| m.memlock).sum() };
        let (map_ready, map_after) = (memlock(&r.maps_ready), memlock(&r.maps_after));
        let map_max = map_ready.max(map_after);
        let preallocated: u64 = r
            .maps_after
            .iter()
            .filter(|m| !m.on_demand)
            .map(|m| m.memlock)
            .sum();
        let rss_max = r.rss_ready.rss.max(r.rss_after.rss);
        let endpoints = u64::from(o.services) * u64::from(o.endpoints);
        let noop: usize = r.changes.iter().map(|c| c.noop_reloads_after).sum();
        let hist_mean_us = (r.metrics_after.apply_sum - r.metrics_before.apply_sum)
            / (r.metrics_after.apply_count - r.metrics_before.apply_count)
            * 1e6;

        let mut md = String::new();
        let w = &mut md;
        let _ = writeln!(w, "## Control plane\n");
        let _ = writeln!(
            w,
            "The agent over {} Services with {} endpoints ({} per Service, one EndpointSlice \
             each), {} of them with a VirtualService (weighted TCP route over two subsets) and a \
             DestinationRule, from the file source: time to ready, time from one object's change \
             to the map update, agent memory and BPF map memory. Targets (issue 6): **single \
             change → map < {TARGET_CHANGE_P99_MS} ms p99 after the event arrives; RSS < \
             {TARGET_RSS_MIB} MiB; map memory < {TARGET_MAP_MIB} MiB.**\n",
            thousands(o.services.into()),
            thousands(endpoints),
            o.endpoints,
            thousands(o.routed.into()),
        );
        let _ = writeln!(
            w,
            "Measured {} by `cargo xtask bench control` ({:.0} s after the release build) on \
             Linux {}, {} × {}; steerd: {}. The machine was shared with builds: 1-min load \
             average {:.1} before and {:.1} after ({} and {} `rustc` processes running); during \
             the changes the CPUs were {:.0}% busy, {:.0} points of it the agent (which ran at \
             nice {AGENT_NICE}).\n",
            m.date,
            self.elapsed.as_secs_f64(),
            m.kernel,
            m.cpus,
            m.cpu,
            self.bins.steerd_origin,
            self.load.before.avg1,
            self.load.after.avg1,
            self.load.before.rustc,
            self.load.after.rustc,
            self.load.busy_during_changes * 100.0,
            self.load.agent_share_during_changes * 100.0,
        );

        let _ = writeln!(w, "| | measured | target | |");
        let _ = writeln!(w, "|---|---:|---:|---|");
        let _ = writeln!(
            w,
            "| one change, event → map after the {} ms debounce (re-read and parse the changed \
             file, recompile the affected hosts, write), p50 / p99 | {} / {} | < {TARGET_CHANGE_P99_MS} ms p99 | {} |",
            DEBOUNCE.as_millis(),
            ms(s.after_debounce.p50),
            ms(s.after_debounce.p99),
            met(s.after_debounce.p99 < TARGET_CHANGE_P99_MS * 1000.0)
        );
        let _ = writeln!(
            w,
            "| one change, the agent's apply alone (compile + map diff + write), p50 / p99 | {} \
             / {} | (< {TARGET_CHANGE_P99_MS} ms) | {} |",
            ms(s.apply.p50),
            ms(s.apply.p99),
            met(s.apply.p99 < TARGET_CHANGE_P99_MS * 1000.0)
        );
        let _ = writeln!(
            w,
            "| one change, file write → map entry (end to end, with the debounce), p50 / p99 | \
             {} / {} | | |",
            ms(s.write_to_map.p50),
            ms(s.write_to_map.p99),
        );
        let _ = writeln!(
            w,
            "| agent RSS (VmRSS after ready / after the changes; peak VmHWM {}) | {} / {} | < \
             {TARGET_RSS_MIB} MiB | {} |",
            mib(r.rss_ready.hwm.max(r.rss_after.hwm)),
            mib(r.rss_ready.rss),
            mib(r.rss_after.rss),
            met((rss_max as f64) < TARGET_RSS_MIB * MIB)
        );
        let _ = writeln!(
            w,
            "| BPF map memory (memlock of the agent's {} maps after ready / after the changes; \
             {} of it preallocated whatever the config) | {} / {} | < {TARGET_MAP_MIB} MiB | {} |",
            r.maps_after.len(),
            mib(preallocated),
            mib(map_ready),
            mib(map_after),
            met((map_max as f64) < TARGET_MAP_MIB * MIB)
        );
        let _ = writeln!(
            w,
            "| agent start → `/readyz` 200 / → all {} services in the pinned map | {:.2} s / \
             {:.2} s | | |",
            thousands(o.services.into()),
            r.ready.readyz.as_secs_f64(),
            r.ready.all_in_map.as_secs_f64()
        );
        let _ = writeln!(w);
        let _ = writeln!(w, "{}\n", self.verdict(&s));
        let _ = writeln!(
            w,
            "![per change: the agent's apply, event to map after the debounce, and file write \
             to map]({SVG_PATH})\n"
        );

        let n = r.changes.len();
        let _ = writeln!(
            w,
            "<details><summary>Every measurement ({n} changes{})</summary>\n",
            if n < 100 {
                "; with fewer than 100, p99 is the largest"
            } else {
                ""
            }
        );
        let _ = writeln!(w, "| per change, ms | p50 | p90 | p99 | max | mean |");
        let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|");
        for (label, st) in [
            (
                "file write → map entry (polled every 0.1 ms)",
                &s.write_to_map,
            ),
            (
                "inotify event at the agent → plan applied (agent log timestamps)",
                &s.event_to_applied,
            ),
            ("the same less the 100 ms debounce", &s.after_debounce),
            (
                "… of which re-reading, parsing and validating the changed file, diffing it against its last version",
                &s.reload,
            ),
            (
                "… of which the apply (`elapsed_us`: recompiling the affected hosts, patching the plan, writing the changed entries)",
                &s.apply,
            ),
            ("agent CPU time (all threads)", &s.cpu),
        ] {
            let _ = writeln!(
                w,
                "| {label} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                st.p50 / 1e3,
                st.p90 / 1e3,
                st.p99 / 1e3,
                st.max / 1e3,
                st.mean / 1e3
            );
        }
        let write_to_event: Vec<u64> = r
            .changes
            .iter()
            .map(|c| c.write_to_event.as_nanos() as u64)
            .collect();
        let wte = Stats::of(&write_to_event);
        let _ = writeln!(
            w,
            "\nFile write → the event at the agent: p50 {:.2} ms, max {:.2} ms. Every change \
             rewrote exactly one service in the map (`updated=1`, nothing added or removed); {} \
             further reload(s) of unchanged files followed the {n} changes. The histogram \
             `steerd_plan_apply_seconds` agrees with the log: mean {} per apply over the changes \
             (log: {}). `/metrics` after the changes: `steerd_map_services` {}, \
             `steerd_map_slots` {}. `steerd maps services` listed {} services with {} backends \
             in all.\n",
            wte.p50 / 1e3,
            wte.max / 1e3,
            noop,
            ms(hist_mean_us),
            ms(s.apply.mean),
            r.metrics_after.map_services,
            r.metrics_after.map_slots,
            thousands(r.listed_services as u64),
            thousands(r.listed_backends),
        );
        let _ = writeln!(
            w,
            "Start-up: the first plan was applied {:.2} s after the agent started and took {} \
             (compile + writing all {} services); the agent used {:.2} s of CPU until ready. \
             Memory: RssAnon {} after ready and {} after the changes.\n",
            r.ready.first_plan.as_secs_f64(),
            ms(r.ready.first_apply_us as f64),
            thousands(o.services.into()),
            r.ready.cpu.as_secs_f64(),
            mib(r.rss_ready.anon),
            mib(r.rss_after.anon),
        );
        if let Some(p) = &r.profile {
            let _ = writeln!(
                w,
                "Where the agent's CPU time went during the changes (`perf record` at \
                 {PROFILE_HZ} Hz with DWARF call graphs, {} samples; a function's share includes \
                 what it calls):\n",
                p.samples
            );
            let _ = writeln!(w, "| steerd function | share |");
            let _ = writeln!(w, "|---|---:|");
            for (symbol, share) in &p.inclusive {
                let _ = writeln!(w, "| `{symbol}` | {share:.1}% |");
            }
            let _ = writeln!(w, "\n| hottest code (self time) | share |");
            let _ = writeln!(w, "|---|---:|");
            for (symbol, share) in &p.exclusive {
                let symbol = if symbol.len() > 90 {
                    format!("{}…", &symbol[..symbol.floor_char_boundary(90)])
                } else {
                    symbol.clone()
                };
                let _ = writeln!(w, "| `{symbol}` | {share:.1}% |");
            }
            let _ = writeln!(w);
        }
        let _ = writeln!(
            w,
            "| BPF map | type | max entries | allocated | memlock after ready | after the changes |"
        );
        let _ = writeln!(w, "|---|---|---:|---|---:|---:|");
        let mut rows: Vec<&BpfMap> = r.maps_after.iter().collect();
        rows.sort_by_key(|m| std::cmp::Reverse(m.memlock));
        for map in rows {
            let ready = r
                .maps_ready
                .iter()
                .find(|x| x.id == map.id)
                .map_or("–".into(), |x| {
                    format!("{:.2} MiB", x.memlock as f64 / MIB)
                });
            let name = if map.name.is_empty() { "?" } else { &map.name };
            let _ = writeln!(
                w,
                "| `{name}` | {} | {} | {} | {ready} | {:.2} MiB |",
                map_type_name(map.map_type),
                thousands(map.max_entries),
                if map.on_demand {
                    "on demand"
                } else {
                    "up front"
                },
                map.memlock as f64 / MIB
            );
        }
        let _ = writeln!(w, "\n</details>\n");

        let _ = writeln!(w, "### Method\n");
        let _ = writeln!(
            w,
            "- **Config.** {} manifest files ({:.1} MiB) in one directory, block-style YAML as \
             `kubectl get -o yaml` writes it: {} Services per file (ClusterIP from {FIRST_VIP} up \
             in 10.96.0.0/12, one TCP port {SERVICE_PORT} → {TARGET_PORT}) each with its \
             EndpointSlice ({} ready endpoints with Pod targetRefs, addresses from \
             {FIRST_ENDPOINT} up), and the Pods behind the endpoints of the {} routed services \
             (label `version: v1` on {} of them, `v2` on the rest); each routed service's \
             VirtualService (TCP route, port {SERVICE_PORT}, subset v1 {INITIAL_V1_WEIGHT}% / v2 \
             {}%) and DestinationRule (subsets v1, v2) are in a small file of their own under \
             `routes/`.",
            thousands(r.corpus.files as u64),
            r.corpus.bytes as f64 / MIB,
            o.per_file,
            o.endpoints,
            thousands(o.routed.into()),
            o.endpoints.div_ceil(2),
            100 - INITIAL_V1_WEIGHT,
        );
        let _ = writeln!(
            w,
            "- **Agent.** The release build runs `steerd run --source files:DIR --log-format \
             json` in a harness node network namespace, attached to an empty test cgroup (no \
             traffic is sent), with its own bpffs directory; \
             `STEERD_LOG=info,steerd::sources::files=debug` makes the file source log each \
             inotify event it receives. It runs at nice {AGENT_NICE} so that builds sharing the \
             machine delay it less; its CPU time per change is reported too, which waiting for \
             a CPU does not inflate."
        );
        let _ = writeln!(
            w,
            "- **Ready.** From spawning the agent, `/readyz` is polled every 10 ms, and so is the \
             number of keys in the pinned services map (`sd_svc_v1`, walked with \
             `BPF_MAP_GET_NEXT_KEY`); `steerd maps services -o json` then has to list every \
             service with all its backends."
        );
        let _ = writeln!(
            w,
            "- **Changes.** {n} ({}): one routed service's file is rewritten in place with new \
             weights for its VirtualService (10–90% for v1 in steps of 10, always different \
             from the previous value; services spread over all routed ones). This process then \
             polls that service's entry in the pinned services map with `BPF_MAP_LOOKUP_ELEM` \
             every {} µs until it points at a new alias table (the agent writes a complete new \
             table, then swaps the entry): **file write → map entry**. The agent's log gives, \
             for the same change, the timestamps of the file source's `manifest change` event \
             and of `plan applied` (logged right after the map update), and `elapsed_us` \
             (recompiling the hosts the change affects, patching the plan, writing the changed map \
             entries); \
             **event → map after the debounce** is the difference of the two timestamps less \
             the file source's fixed {} ms debounce: re-reading, parsing and validating the \
             changed file, diffing it against its last version, recompiling and writing. Each change must update exactly \
             one service in the map, and after the last one `steerd maps backends` must show \
             the new split. {} ms pause after each change.",
            if n < o.changes as usize {
                format!(
                    "as many as fit in {} s, at least {MIN_CHANGES}; {} were asked for",
                    o.budget, o.changes
                )
            } else {
                format!("with at most {} s allowed for them", o.budget)
            },
            MAP_POLL.as_micros(),
            DEBOUNCE.as_millis(),
            o.pause_ms
        );
        let _ = writeln!(
            w,
            "- **Memory.** `VmRSS`, `VmHWM` and `RssAnon` from `/proc/PID/status` 1.5 s after \
             ready and 1.5 s after the last change. BPF map memory is the sum of `memlock` in \
             `/proc/PID/fdinfo` over the agent's map fds (each map once; since Linux 6.4 that is \
             what a map actually uses: its entries so far for maps allocated on demand \
             (`BPF_F_NO_PREALLOC`), its full size for preallocated ones); names from \
             `BPF_OBJ_GET_INFO_BY_FD`."
        );
        md
    }

    /// One paragraph: where the time of a change goes, and what the memory is.
    fn verdict(&self, s: &ChangeStats) -> String {
        let r = self.result;
        let share = |part: f64| part / s.after_debounce.p50.max(1.0) * 100.0;
        let mut text = format!(
            "A single change takes {} (p50) from the event reaching the agent to the map once the \
             {} ms debounce has passed: {} ({:.0}%) re-reading, parsing and validating the \
             changed file (one of {}) and diffing it against its last version, and {} ({:.0}%) \
             in the apply, which recompiles only the hosts the change affects and writes the \
             one changed service. The agent spent {} of CPU on each change (p50).",
            ms(s.after_debounce.p50),
            DEBOUNCE.as_millis(),
            ms(s.reload.p50),
            share(s.reload.p50),
            thousands(r.corpus.files as u64),
            ms(s.apply.p50),
            share(s.apply.p50),
            ms(s.cpu.p50),
        );
        if let Some(p) = &r.profile {
            let find = |name: &str| p.inclusive.iter().find(|(s, _)| s == name).map(|(_, v)| *v);
            if let Some(compile) = find("steerd::compile::compile") {
                let _ = write!(
                    text,
                    " In the profile, compiling takes {compile:.0}% of the agent's CPU time"
                );
                if let Some(registry) = find("steerd::compile::registry::build") {
                    let _ = write!(
                        text,
                        ", {registry:.0} points of it building the service registry"
                    );
                }
                let rest: Vec<String> = ["steerd::sources::files::FileSource::load"]
                    .iter()
                    .filter_map(|n| find(n).map(|v| format!("`{n}` {v:.0}%")))
                    .collect();
                if !rest.is_empty() {
                    let _ = write!(text, "; {}", rest.join(", "));
                }
                match find("steerd::dataplane::maps::MapWriter::apply") {
                    Some(v) => {
                        let _ = write!(text, "; writing the maps {v:.1}%.");
                    }
                    None => text.push_str("; writing the maps is below the 1% the profile lists."),
                }
            }
        }
        let after: Vec<u64> = r.changes.iter().map(|c| c.rss_after).collect();
        if let (Some(lo), Some(hi)) = (after.iter().min(), after.iter().max()) {
            let _ = write!(
                text,
                " The agent's RSS was {} after ready, for {:.1} MiB of manifests, and between {} \
                 and {} after the changes (each read after the {} ms pause).",
                mib(r.rss_ready.rss),
                r.corpus.bytes as f64 / MIB,
                mib(*lo),
                mib(*hi),
                self.options.pause_ms,
            );
        }
        text
    }
}

/// Two panels, per change in the order measured: latencies (ms, log scale) with the 5 ms
/// target, and the agent's RSS after each change (MiB) with the 50 MiB target.
fn change_chart(path: &Path, result: &Measured) -> Result<()> {
    use plotters::coord::Shift;
    use plotters::prelude::*;

    type Panel<'a> = DrawingArea<SVGBackend<'a>, Shift>;
    #[derive(Clone, Copy)]
    enum Key {
        Dot(RGBColor),
        Line(RGBColor),
        Dashed,
    }
    let n = result.changes.len().max(1) as f64;
    let latency: [(&str, RGBColor, Vec<f64>); 3] = [
        (
            "file write → map entry",
            plot::GREY,
            result
                .changes
                .iter()
                .map(|c| c.write_to_map.as_secs_f64() * 1e3)
                .collect(),
        ),
        (
            "event → map, less the 100 ms debounce",
            plot::RED,
            result
                .changes
                .iter()
                .map(|c| c.after_debounce().as_secs_f64() * 1e3)
                .collect(),
        ),
        (
            "apply (compile + diff + write)",
            plot::BLUE,
            result
                .changes
                .iter()
                .map(|c| c.apply_us as f64 / 1e3)
                .collect(),
        ),
    ];
    let rss: Vec<f64> = std::iter::once(result.rss_ready.rss)
        .chain(result.changes.iter().map(|c| c.rss_after))
        .map(|b| b as f64 / MIB)
        .collect();

    let dashed = |y: f64, x: std::ops::Range<f64>| {
        let style = ShapeStyle::from(&BLACK.mix(0.7)).stroke_width(1);
        DashedLineSeries::new([(x.start, y), (x.end, y)], 6, 4, style)
    };
    let left = |area: &Panel| -> Result<(), Box<dyn std::error::Error>> {
        let values = || latency.iter().flat_map(|s| s.2.iter().copied());
        let y_max = values().fold(TARGET_CHANGE_P99_MS, f64::max) * 4.0;
        let y_min = values()
            .filter(|v| *v > 0.0)
            .fold(TARGET_CHANGE_P99_MS, f64::min)
            / 3.0;
        let mut chart = ChartBuilder::on(area)
            .caption("time to the map, per change", ("sans-serif", 14))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..n + 1.0, (y_min..y_max).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("change")
            .y_desc("ms")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y}"))
            .bold_line_style(BLACK.mix(0.12))
            .light_line_style(TRANSPARENT)
            .draw()?;
        let target = dashed(TARGET_CHANGE_P99_MS, 0.0..n + 1.0);
        chart.draw_series(target)?;
        for (k, (_, color, values)) in latency.iter().enumerate() {
            let color = *color;
            // Side by side, so that equal values stay visible.
            let dx = (k as f64 - 1.0) * 0.12;
            chart.draw_series(values.iter().enumerate().map(|(i, &v)| {
                Circle::new(((i + 1) as f64 + dx, v.max(y_min)), 3, color.filled())
            }))?;
        }
        Ok(())
    };
    let right = |area: &Panel| -> Result<(), Box<dyn std::error::Error>> {
        let y_max = rss.iter().copied().fold(TARGET_RSS_MIB, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption("agent RSS (0 = after ready)", ("sans-serif", 14))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.5..n + 0.5, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("after change")
            .y_desc("MiB")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .bold_line_style(BLACK.mix(0.12))
            .light_line_style(TRANSPARENT)
            .draw()?;
        let target = dashed(TARGET_RSS_MIB, -0.5..n + 0.5);
        chart.draw_series(target)?;
        let points: Vec<(f64, f64)> = rss
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as f64, v))
            .collect();
        chart.draw_series(LineSeries::new(
            points.iter().copied(),
            plot::ORANGE.stroke_width(2),
        ))?;
        chart.draw_series(
            points
                .iter()
                .map(|&p| Circle::new(p, 3, plot::ORANGE.filled())),
        )?;
        Ok(())
    };
    // Legends go under the panels, where they cannot hide points.
    let legend =
        |area: &Panel, entries: &[(&str, Key)]| -> Result<(), Box<dyn std::error::Error>> {
            let font = ("sans-serif", 12).into_font();
            let width = area.dim_in_pixel().0 as i32;
            let column = (width - 80) / 2;
            for (i, (label, key)) in entries.iter().enumerate() {
                let x = 70 + (i as i32 % 2) * column;
                let y = 12 + (i as i32 / 2) * 18;
                match *key {
                    Key::Dot(color) => area.draw(&Circle::new((x + 10, y), 3, color.filled()))?,
                    Key::Line(color) => area.draw(&PathElement::new(
                        [(x, y), (x + 20, y)],
                        color.stroke_width(2),
                    ))?,
                    Key::Dashed => {
                        for dx in [0, 8, 16] {
                            area.draw(&PathElement::new(
                                [(x + dx, y), (x + dx + 5, y)],
                                BLACK.mix(0.7),
                            ))?;
                        }
                    }
                }
                area.draw(&Text::new(label.to_string(), (x + 28, y - 7), font.clone()))?;
            }
            Ok(())
        };
    let target_ms = format!("target < {TARGET_CHANGE_P99_MS} ms");
    let target_mib = format!("target < {TARGET_RSS_MIB} MiB");
    let mut left_keys = vec![(target_ms.as_str(), Key::Dashed)];
    left_keys.extend(
        latency
            .iter()
            .map(|(name, color, _)| (*name, Key::Dot(*color))),
    );
    let right_keys = [
        (target_mib.as_str(), Key::Dashed),
        ("VmRSS", Key::Line(plot::ORANGE)),
    ];

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 440)).into_drawing_area();
        let draw = || -> Result<(), Box<dyn std::error::Error>> {
            root.fill(&WHITE)?;
            let titled = root.titled(
                "one VirtualService change at a time, with every Service and EndpointSlice loaded",
                ("sans-serif", 18),
            )?;
            let (l, r) = titled.split_horizontally(600);
            let height = l.dim_in_pixel().1;
            let (l, l_legend) = l.split_vertically(height - 44);
            let (r, r_legend) = r.split_vertically(height - 44);
            left(&l)?;
            right(&r)?;
            legend(&l_legend, &left_keys)?;
            legend(&r_legend, &right_keys)?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
    }
    super::write_atomically(path, svg.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_and_keys() {
        assert_eq!(vip(9_999), Ipv4Addr::new(10, 96, 39, 16));
        assert_eq!(endpoint_ip(9_999, 4, 5), Ipv4Addr::new(10, 128, 195, 80));
        assert_eq!(routed_services(10_000, 1_000)[..3], [0, 10, 20]);
        assert_eq!(routed_services(10, 10), (0..10).collect::<Vec<_>>());
        assert_eq!(
            (0..5).map(|j| version_of(j, 5)).collect::<Vec<_>>(),
            ["v1", "v1", "v1", "v2", "v2"]
        );
        let mut text = String::new();
        write_service(&mut text, 3, 5, true);
        assert_eq!(text.matches("\nkind: Pod\n").count(), 5);
        assert!(text.contains("clusterIP: 10.96.0.4\n"));
        assert!(text.contains("kubernetes.io/service-name: svc-00003\n"));
        let routes = routing(3, 70);
        assert!(routes.contains("weight: 70\n") && routes.contains("weight: 30\n"));
        let key = service_key(Ipv4Addr::new(10, 96, 0, 1), 80);
        assert_eq!(&key[10..], &[0xff, 0xff, 10, 96, 0, 1, 0, 80, 6, 0]);
    }

    #[test]
    fn perf_reports() {
        let text = "# Samples: 1K  of event 'cpu-clock:pppH'\n\
                    # Children      Self  Symbol\n\
                    #\n    \
                    88.09%     0.00%  [.] steerd::cli::run::run::{{closure}}\n    \
                    84.24%     0.24%  [.] steerd::compile::compile  - -\n    \
                    53.67%    52.71%  [.] __memcmp_evex_movbe\n    \
                    12.00%     1.50%  [.] steerd::model::typed\n    \
                    11.00%     9.00%  [.] steerd::model::typed\n";
        let p = parse_perf_report(text).unwrap();
        assert_eq!(p.samples, "1K");
        assert_eq!(
            p.inclusive,
            [
                ("steerd::compile::compile".to_owned(), 84.24),
                ("steerd::model::typed".to_owned(), 12.0)
            ]
        );
        assert_eq!(p.exclusive[0], ("__memcmp_evex_movbe".to_owned(), 52.71));
        assert_eq!(p.exclusive.len(), 2);
    }

    #[test]
    fn log_timestamps() {
        let t = parse_rfc3339("1970-01-02T00:00:01.5Z").unwrap();
        assert_eq!(t, UNIX_EPOCH + Duration::from_millis(86_401_500));
        let t = parse_rfc3339("2024-02-29T12:00:00.000001+01:00").unwrap();
        assert_eq!(
            t,
            UNIX_EPOCH + Duration::from_secs(1_709_164_800 + 11 * 3600) + Duration::from_micros(1)
        );
        let line = r#"{"timestamp":"2024-02-29T00:00:00.25Z","level":"INFO","fields":{"message":"plan applied","elapsed_us":1234,"updated":1},"target":"steerd::cli::run"}"#;
        let l = parse_log_line(line).unwrap();
        assert_eq!(l.message, "plan applied");
        assert_eq!(l.fields["elapsed_us"], 1234);
        assert_eq!(l.at, UNIX_EPOCH + Duration::from_millis(1_709_164_800_250));
    }
}
