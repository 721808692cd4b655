//! `cargo xtask bench l4`: connect + first byte through a service VIP, relative to a direct
//! connect to the same backend, with 1, 1,000 and 10,000 services steered by steerd, and the
//! same through kube-proxy-style iptables DNAT rules at the same counts.
//!
//! For each service count, two throw-away nodes (harness [`Node`]s: a node netns with no
//! default route and one backend pod behind a veth) are built:
//! - the steerd node runs the agent (release build) over a manifest directory with N Services
//!   whose endpoints all resolve to the backend pod, steering the processes of one test cgroup;
//! - the iptables node has no agent, but kube-proxy's `nat` layout for the same N services (a
//!   linear `KUBE-SERVICES` chain, one `KUBE-SVC-*` and one `KUBE-SEP-*` chain per service) and
//!   a route for the service range towards the pod, so unmatched VIP traffic stays in the
//!   test namespaces.
//!
//! A client (`steerd-probe latency`, pinned to one CPU; the servers and the agent are pinned to
//! the others) then runs every case in rounds, rotating their order each round so that drift on
//! the machine lands on all of them alike.

use anyhow::{Context, Result, bail, ensure};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use steerd_e2e::{
    Agent, BpffsDir, Netns, Node, TcpIdentityServer, TempDir, TestCgroup, admin_addr, spawn_in,
    wait_until, wait_with_timeout,
};

use super::plot::{self, Series};
use super::{Binaries, Machine, Stats, median};

/// Port the backend listens on; every service maps `SERVICE_PORT` to it.
const BACKEND_PORT: u16 = 8080;
/// On the iptables node, the first and the last service DNAT to ports of their own. A socket's
/// TCP timestamps are offset per (source, destination) address pair, and a DNATed socket's
/// destination is the VIP: when its SYN lands on a server TIME_WAIT left by a connection to
/// the same backend and client port through another address, PAWS drops it, and the SYN
/// retransmission (milliseconds) would land in that case's tail. Separate ports keep each
/// case's connections apart. (steerd's sockets know the real backend, so they do not have this
/// problem.)
const FIRST_RULE_PORT: u16 = 8081;
const LAST_RULE_PORT: u16 = 8082;
const SERVICE_PORT: u16 = 80;
const BACKEND_ID: &str = "backend";
/// Service VIPs are taken in order from 10.96.0.1 (Kubernetes' default service CIDR is
/// 10.96.0.0/12).
const SERVICE_CIDR: &str = "10.96.0.0/12";
const FIRST_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// The steerd maps hold 65,536 services; 10.96.0.0/12 has room for a million.
const MAX_SERVICES: u32 = 60_000;
const MAX_CONNECTIONS: u64 = 200_000;
/// Per connection attempt (connect, then read): a stuck connect fails the run instead of hanging.
const ATTEMPT_TIMEOUT_MS: u64 = 1_000;
/// Backstop for one client run (a round of one case), far above what it takes.
const CLIENT_RUN_LIMIT: Duration = Duration::from_secs(120);
/// How long the agent may take to load the largest service set.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(300);
const SVG_PATH: &str = "docs/bench-l4.svg";

#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// Service counts to measure at (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 1_000, 10_000])]
    services: Vec<u32>,
    /// Timed connections per case at each service count.
    #[arg(long, default_value_t = 5_000)]
    connections: u64,
    /// Rounds the connections are spread over; every round runs each case once.
    #[arg(long, default_value_t = 20)]
    rounds: u64,
    /// Untimed connections each client makes before its timed ones (every round).
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    /// Only print the results; leave BENCHMARKS.md and the plot alone.
    #[arg(long)]
    no_write: bool,
    /// Also write every sample (ns, in the order measured) to this JSON file.
    #[arg(long)]
    raw: Option<std::path::PathBuf>,
}

/// What one client run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    /// Steerd node, unsteered cgroup, to the pod IP: the baseline.
    Direct,
    /// The baseline once more, as a separate run in each round: the method's own noise (an A/A
    /// comparison).
    DirectAgain,
    /// Steerd node, steered cgroup, to the last VIP.
    Steerd,
    /// Steerd node, steered cgroup, to the pod IP: the programs run but nothing matches.
    SteerdMiss,
    /// iptables node, to the VIP of the first rule in KUBE-SERVICES.
    IptablesFirst,
    /// iptables node, to the VIP of the last rule (kube-proxy's worst case).
    IptablesLast,
    /// iptables node, to the pod IP: every rule of KUBE-SERVICES is tried and none matches.
    IptablesMiss,
}

const CASES: [Case; 7] = [
    Case::Direct,
    Case::DirectAgain,
    Case::Steerd,
    Case::SteerdMiss,
    Case::IptablesFirst,
    Case::IptablesLast,
    Case::IptablesMiss,
];

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::Direct => "direct (baseline)",
            Case::DirectAgain => "direct again (A/A check)",
            Case::Steerd => "steerd VIP",
            Case::SteerdMiss => "direct from the steered cgroup",
            Case::IptablesFirst => "iptables VIP, first rule",
            Case::IptablesLast => "iptables VIP, last rule",
            Case::IptablesMiss => "direct on the iptables node",
        }
    }
}

/// Results at one service count.
struct CountResult {
    services: u32,
    /// Agent start to `/readyz` 200 (the whole set in the maps).
    agent_ready: Duration,
    /// `iptables-restore` of the whole set.
    iptables_load: Duration,
    cases: Vec<CaseResult>,
}

struct CaseResult {
    /// Every timed connection, ns, in the order measured.
    samples: Vec<u64>,
    case: Case,
    stats: Stats,
    /// Median over rounds of (this case's p50 in the round / the baseline's p50 in that round).
    round_ratio_p50: f64,
}

impl CountResult {
    fn get(&self, case: Case) -> &CaseResult {
        self.cases
            .iter()
            .find(|c| c.case == case)
            .expect("every case is measured")
    }

    fn ratio(&self, case: Case, pick: fn(&Stats) -> f64) -> f64 {
        pick(&self.get(case).stats) / pick(&self.get(Case::Direct).stats)
    }
}

pub fn run(options: &Options) -> Result<()> {
    ensure!(
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() } == 0,
        "bench l4 needs root (network namespaces, cgroups, bpffs)"
    );
    ensure!(
        !options.services.is_empty()
            && options
                .services
                .iter()
                .all(|n| (1..=MAX_SERVICES).contains(n)),
        "--services: counts from 1 to {MAX_SERVICES}"
    );
    ensure!(
        (1..=MAX_CONNECTIONS).contains(&options.connections),
        "--connections: 1 to {MAX_CONNECTIONS}"
    );
    ensure!(
        (1..=options.connections).contains(&options.rounds),
        "--rounds: 1 to --connections"
    );
    ensure!(options.warmup <= 10_000, "--warmup: at most 10000");
    for program in ["ip", "nsenter", "iptables-restore", "iptables-save"] {
        ensure!(
            crate::have(program),
            "`{program}` is missing; `cargo xtask setup` installs it"
        );
    }

    let bins = super::build_release()?;
    let started = Instant::now();
    // The harness's own helpers (`maps` calls, bpffs clean-up) run `$STEERD_BIN`. Set while this
    // process has a single thread.
    // SAFETY: no other thread exists yet that could read the environment concurrently.
    unsafe { std::env::set_var("STEERD_BIN", &bins.steerd) };
    let machine = Machine::describe();
    let cpus = pin_cpus()?;
    eprintln!(
        "bench l4: client on CPU {:?}, everything else on {:?}",
        cpus.client, cpus.rest
    );

    let mut results = Vec::new();
    for &services in &options.services {
        let result = measure(services, options, &bins, cpus.client)?;
        print_result(&result);
        results.push(result);
    }
    let elapsed = started.elapsed();
    if let Some(path) = &options.raw {
        let raw: Vec<_> = results
            .iter()
            .map(|r| {
                let cases: serde_json::Map<_, _> = r
                    .cases
                    .iter()
                    .map(|c| (c.case.label().to_owned(), serde_json::json!(c.samples)))
                    .collect();
                serde_json::json!({"services": r.services, "samples_ns": cases})
            })
            .collect();
        std::fs::write(path, serde_json::to_string(&raw)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }

    println!();
    print!("{}", summary_table(&results));
    println!(
        "(bench l4 took {:.0} s after the build)",
        elapsed.as_secs_f64()
    );
    if options.no_write {
        return Ok(());
    }
    let svg = crate::workspace_root().join(SVG_PATH);
    let (overview, zoom) = chart_series(&results);
    super::plot::ratio_chart(&svg, &overview, &zoom)?;
    let markdown = section(&results, options, &machine, &bins, elapsed);
    let path = super::write_section("l4", &markdown)?;
    eprintln!("wrote {} and {}", path.display(), svg.display());
    Ok(())
}

struct Cpus {
    client: Option<usize>,
    rest: Vec<usize>,
}

/// Gives the client the last CPU this process may use and keeps this process (its server
/// threads, and the agent it spawns) on the others. With a single CPU nothing is pinned.
fn pin_cpus() -> Result<Cpus> {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let allowed = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .collect();
    let Some((&client, rest)) = cpus.split_last().filter(|(_, rest)| !rest.is_empty()) else {
        return Ok(Cpus {
            client: None,
            rest: cpus,
        });
    };
    let mut set = CpuSet::new();
    for &c in rest {
        set.set(c)?;
    }
    // Threads inherit the affinity of the thread that creates them; this is the main thread.
    sched_setaffinity(Pid::from_raw(0), &set).context("sched_setaffinity")?;
    Ok(Cpus {
        client: Some(client),
        rest: rest.to_vec(),
    })
}

/// SCHED_FIFO priority of the client and the server threads: above every ordinary task, so that
/// builds and tests running on the machine at the same time do not put scheduling delays into
/// the numbers. Both only block (connect, read, accept), they never spin, and the kernel's RT
/// throttling still leaves ordinary tasks 5% of each CPU whatever happens.
const REALTIME_PRIORITY: i32 = 10;

/// Switches the calling thread to SCHED_FIFO at `priority`, or back to SCHED_OTHER for `None`.
/// Returns whether that worked.
fn set_fifo(priority: Option<i32>) -> bool {
    let (policy, priority) = match priority {
        Some(p) => (libc::SCHED_FIFO, p),
        None => (libc::SCHED_OTHER, 0),
    };
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: a valid sched_param; pid 0 is the calling thread.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

fn vip(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(FIRST_VIP) + index)
}

/// N Services selecting one Pod: the endpoints come from the Pod, as for a Service without
/// EndpointSlices. Port names start with `tcp` so the ports stay plain L4.
fn manifests(services: u32, backend: Ipv4Addr) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: bench-backend, namespace: bench, labels: {{app: bench-backend}}}}\nstatus: {{phase: Running, podIP: {backend}}}\n"
    );
    for i in 0..services {
        let _ = write!(
            text,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i:05}, namespace: bench}}\nspec: {{clusterIP: {}, selector: {{app: bench-backend}}, ports: [{{name: tcp, port: {SERVICE_PORT}, targetPort: {BACKEND_PORT}}}]}}\n",
            vip(i)
        );
    }
    text
}

/// The endpoint of service `index` of `services` on the iptables node.
fn iptables_endpoint(backend: Ipv4Addr, index: u32, services: u32) -> SocketAddr {
    let port = if index == 0 {
        FIRST_RULE_PORT
    } else if index == services - 1 {
        LAST_RULE_PORT
    } else {
        BACKEND_PORT
    };
    SocketAddr::new(backend.into(), port)
}

/// kube-proxy's iptables-mode `nat` table for N single-endpoint TCP services, in
/// `iptables-restore` form: OUTPUT jumps to KUBE-SERVICES, which tests every service's VIP and
/// port in turn; a match jumps to the service chain, then to the endpoint chain that DNATs.
/// The last rule sends local-address traffic to KUBE-NODEPORTS, as kube-proxy's does.
fn kube_proxy_rules(services: u32, backend: Ipv4Addr) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(chains, ":{chain} - [0:0]");
    }
    rules.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    rules.push_str("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n");
    rules.push_str("-A KUBE-POSTROUTING -j MASQUERADE --random-fully\n");
    for i in 0..services {
        let endpoint = iptables_endpoint(backend, i, services);
        let (svc, sep) = (format!("KUBE-SVC-{i:08X}"), format!("KUBE-SEP-{i:08X}"));
        let _ = writeln!(chains, ":{svc} - [0:0]\n:{sep} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/svc-{i:05}:tcp cluster IP\" -m tcp --dport {SERVICE_PORT} -j {svc}",
            vip(i)
        );
        let _ = writeln!(rules, "-A {svc} -j {sep}");
        let _ = writeln!(rules, "-A {sep} -s {backend}/32 -j KUBE-MARK-MASQ");
        let _ = writeln!(
            rules,
            "-A {sep} -p tcp -m tcp -j DNAT --to-destination {endpoint}"
        );
    }
    rules.push_str("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    format!(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n{chains}{rules}COMMIT\n"
    )
}

/// `iptables-restore FILE` inside `netns`; returns how long it took.
fn iptables_restore(netns: &Netns, file: &Path) -> Result<Duration> {
    let started = Instant::now();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.path().display()))
        .arg("iptables-restore")
        .arg(file);
    let output = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    ensure!(
        output.status.success(),
        "{cmd:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(started.elapsed())
}

/// The VIP match rules in KUBE-SERVICES, in order, as the kernel has them.
fn iptables_service_vips(netns: &Netns) -> Result<Vec<String>> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.path().display()))
        .args(["iptables-save", "-t", "nat"]);
    let output = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    ensure!(
        output.status.success(),
        "{cmd:?} failed ({})",
        output.status
    );
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("-A KUBE-SERVICES -d "))
        .filter_map(|l| l.split('/').next().map(str::to_owned))
        .collect())
}

fn measure(
    services: u32,
    options: &Options,
    bins: &Binaries,
    cpu: Option<usize>,
) -> Result<CountResult> {
    eprintln!("bench l4: {services} services: setting up");
    let first_vip = SocketAddr::new(vip(0).into(), SERVICE_PORT);
    let last_vip = SocketAddr::new(vip(services - 1).into(), SERVICE_PORT);

    // Fixtures are dropped in reverse order: agent, pins, cgroups, servers, pods, nodes.
    let steerd_node = Node::new();
    let iptables_node = Node::new();
    for node in [&steerd_node, &iptables_node] {
        // More ephemeral ports: tens of thousands of connections go to one backend.
        node.netns
            .sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    }
    let steerd_pod = steerd_node.add_pod("backend");
    let iptables_pod = iptables_node.add_pod("backend");
    // The server threads inherit the real-time priority of the thread that starts them.
    let realtime = set_fifo(Some(REALTIME_PRIORITY));
    let _steerd_server =
        TcpIdentityServer::start(&steerd_pod, steerd_pod.sock_v4(BACKEND_PORT), BACKEND_ID);
    let _iptables_servers: Vec<_> = [BACKEND_PORT, FIRST_RULE_PORT, LAST_RULE_PORT]
        .into_iter()
        .map(|port| TcpIdentityServer::start(&iptables_pod, iptables_pod.sock_v4(port), BACKEND_ID))
        .collect();
    set_fifo(None);
    if !realtime {
        eprintln!("bench l4: no real-time priority; measuring at normal priority");
    }
    let steered = TestCgroup::new();
    let unsteered = TestCgroup::new();
    let bpffs = BpffsDir::new();
    let files = TempDir::new("steerd-bench-l4");

    // iptables node: kube-proxy's rules, and a route that makes the service range routable
    // (towards the pod, so that nothing unmatched leaves the test namespaces).
    iptables_node.netns.ip(&[
        "route",
        "add",
        SERVICE_CIDR,
        "via",
        &iptables_pod.ipv4.to_string(),
    ]);
    let rules = files.write(
        "kube-proxy.rules",
        kube_proxy_rules(services, iptables_pod.ipv4),
    );
    let iptables_load = iptables_restore(&iptables_node.netns, &rules)?;
    let vips = iptables_service_vips(&iptables_node.netns)?;
    ensure!(
        vips.len() == services as usize
            && vips.first() == Some(&first_vip.ip().to_string())
            && vips.last() == Some(&last_vip.ip().to_string()),
        "KUBE-SERVICES has {} VIP rules ({:?} .. {:?}), expected {services} from {} to {}",
        vips.len(),
        vips.first(),
        vips.last(),
        first_vip.ip(),
        last_vip.ip()
    );

    // steerd node: the agent over N services.
    let manifest_dir = TempDir::new("steerd-bench-l4-manifests");
    manifest_dir.write("services.yaml", manifests(services, steerd_pod.ipv4));
    let admin = admin_addr().to_string();
    let source = format!("files:{}", manifest_dir.as_str());
    let cgroup = steered
        .path()
        .to_str()
        .context("cgroup path is not UTF-8")?;
    let spawned = Instant::now();
    let mut agent = Agent::spawn_bin(
        &bins.steerd,
        &steerd_node,
        &[
            "run",
            "--source",
            &source,
            "--bpffs",
            bpffs.as_str(),
            "--cgroup",
            cgroup,
            "--admin",
            &admin,
        ],
    );
    agent.wait_ready(admin_addr(), AGENT_READY_TIMEOUT);
    let agent_ready = spawned.elapsed();
    let maps_args = ["maps", "services", "-o", "json", "--bpffs", bpffs.as_str()];
    let mut in_maps = 0;
    let loaded = wait_until(Duration::from_secs(30), || {
        let rows = Agent::run_cli_json(&steerd_node, &maps_args);
        let rows = rows.as_array().map(Vec::as_slice).unwrap_or_default();
        in_maps = rows
            .iter()
            .filter(|r| r["backends"] == 1 && r["port"] == SERVICE_PORT && r["protocol"] == "TCP")
            .count();
        in_maps == services as usize && rows.iter().any(|r| r["vip"] == last_vip.ip().to_string())
    });
    ensure!(
        loaded,
        "steerd maps services: {in_maps} services with one backend, expected {services}\nagent log:\n{}",
        agent.log()
    );
    eprintln!(
        "bench l4: {services} services: agent ready in {:.2} s, iptables-restore {:.2} s; measuring",
        agent_ready.as_secs_f64(),
        iptables_load.as_secs_f64()
    );

    let direct_steerd_node = steerd_pod.sock_v4(BACKEND_PORT);
    let direct_iptables_node = iptables_pod.sock_v4(BACKEND_PORT);
    let client = |case: Case| -> (&Netns, &TestCgroup, SocketAddr) {
        match case {
            Case::Direct | Case::DirectAgain => {
                (&steerd_node.netns, &unsteered, direct_steerd_node)
            }
            Case::Steerd => (&steerd_node.netns, &steered, last_vip),
            Case::SteerdMiss => (&steerd_node.netns, &steered, direct_steerd_node),
            Case::IptablesFirst => (&iptables_node.netns, &unsteered, first_vip),
            Case::IptablesLast => (&iptables_node.netns, &unsteered, last_vip),
            Case::IptablesMiss => (&iptables_node.netns, &unsteered, direct_iptables_node),
        }
    };

    let settings = ClientSettings {
        probe: &bins.probe,
        warmup: options.warmup,
        cpu,
        fifo: realtime.then_some(REALTIME_PRIORITY),
    };
    let mut samples: Vec<Vec<u64>> = vec![Vec::new(); CASES.len()];
    let mut round_p50: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
    for round in 0..options.rounds {
        // Spread the connections evenly; rotate the order so no case always goes first.
        let count = options.connections * (round + 1) / options.rounds
            - options.connections * round / options.rounds;
        for k in 0..CASES.len() {
            let index = (k + round as usize) % CASES.len();
            let (netns, cgroup, to) = client(CASES[index]);
            let got = run_client(&settings, netns, cgroup, to, count)
                .with_context(|| format!("{services} services, {}", CASES[index].label()))?;
            round_p50[index].push(Stats::of(&got).p50);
            samples[index].extend(got);
        }
    }
    drop(agent);

    let cases = CASES
        .iter()
        .zip(samples)
        .zip(&round_p50)
        .map(|((&case, samples), p50s)| CaseResult {
            case,
            stats: Stats::of(&samples),
            samples,
            round_ratio_p50: median(
                &p50s
                    .iter()
                    .zip(&round_p50[0])
                    .map(|(p, base)| p / base)
                    .collect::<Vec<_>>(),
            ),
        })
        .collect();
    Ok(CountResult {
        services,
        agent_ready,
        iptables_load,
        cases,
    })
}

/// How every client run is made.
struct ClientSettings<'a> {
    probe: &'a Path,
    warmup: u64,
    cpu: Option<usize>,
    fifo: Option<i32>,
}

/// One run of `steerd-probe latency` in `netns` and `cgroup`; its samples (ns). Fails unless
/// every timed connection reached the backend.
fn run_client(
    settings: &ClientSettings,
    netns: &Netns,
    cgroup: &TestCgroup,
    to: SocketAddr,
    count: u64,
) -> Result<Vec<u64>> {
    let mut cmd = Command::new(settings.probe);
    cmd.args(["latency", "--to", &to.to_string()])
        .args(["--count", &count.to_string()])
        .args(["--warmup", &settings.warmup.to_string()])
        .args(["--timeout-ms", &ATTEMPT_TIMEOUT_MS.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cpu) = settings.cpu {
        cmd.args(["--cpu", &cpu.to_string()]);
    }
    if let Some(priority) = settings.fifo {
        cmd.args(["--fifo", &priority.to_string()]);
    }
    let output = wait_with_timeout(
        spawn_in(&mut cmd, Some(netns), Some(cgroup)),
        CLIENT_RUN_LIMIT,
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "steerd-probe latency --to {to} failed ({}): {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("steerd-probe latency: bad report {stdout:?}"))?;
    let reached = report["counts"][BACKEND_ID].as_u64().unwrap_or(0);
    ensure!(
        report["failures"] == 0 && reached == count,
        "to {to}: {reached} of {count} connections reached {BACKEND_ID}: {report}"
    );
    let samples: Vec<u64> = report["samples_ns"]
        .as_array()
        .context("report without samples_ns")?
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .collect();
    ensure!(
        samples.len() as u64 == count,
        "{} samples for {count} connections",
        samples.len()
    );
    Ok(samples)
}

fn print_result(r: &CountResult) {
    println!(
        "\n{} services (agent ready in {:.2} s, iptables-restore {:.2} s):",
        r.services,
        r.agent_ready.as_secs_f64(),
        r.iptables_load.as_secs_f64()
    );
    println!(
        "  {:<32} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>10}",
        "case", "p50 µs", "p90 µs", "p99 µs", "max µs", "mean µs", "p50 ×", "p99 ×", "rounds p50×"
    );
    for c in &r.cases {
        let s = &c.stats;
        println!(
            "  {:<32} {:>9.1} {:>9.1} {:>9.1} {:>9.0} {:>9.1} {:>8.3} {:>8.3} {:>10.3}",
            c.case.label(),
            s.p50,
            s.p90,
            s.p99,
            s.max,
            s.mean,
            r.ratio(c.case, |s| s.p50),
            r.ratio(c.case, |s| s.p99),
            c.round_ratio_p50
        );
    }
}

fn summary_table(results: &[CountResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>9}  {:>10}  {:>16}  {:>16}  {:>16}",
        "services", "direct p50", "steerd p50×", "iptables first×", "iptables last×"
    );
    for r in results {
        let _ = writeln!(
            out,
            "{:>9}  {:>7.1} µs  {:>16.3}  {:>16.3}  {:>16.3}",
            r.services,
            r.get(Case::Direct).stats.p50,
            r.ratio(Case::Steerd, |s| s.p50),
            r.ratio(Case::IptablesFirst, |s| s.p50),
            r.ratio(Case::IptablesLast, |s| s.p50),
        );
    }
    out
}

/// The overview (steerd and iptables; values written out only where they are not crowded
/// near 1×) and the close-up around 1× (with the A/A check, which shows the noise).
fn chart_series(results: &[CountResult]) -> (Vec<Series>, Vec<Series>) {
    let series = |case: Case, color, annotate| Series {
        name: case.label().to_owned(),
        points: results
            .iter()
            .map(|r| (f64::from(r.services), r.ratio(case, |s| s.p50)))
            .collect(),
        color,
        annotate,
    };
    (
        vec![
            series(Case::Steerd, plot::BLUE, false),
            series(Case::IptablesFirst, plot::ORANGE, false),
            series(Case::IptablesLast, plot::RED, true),
        ],
        vec![
            series(Case::Steerd, plot::BLUE, true),
            series(Case::IptablesFirst, plot::ORANGE, true),
            series(Case::DirectAgain, plot::GREY, true),
        ],
    )
}

/// Thousands separators: 10000 → "10,000".
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

fn section(
    results: &[CountResult],
    options: &Options,
    machine: &Machine,
    bins: &Binaries,
    elapsed: Duration,
) -> String {
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "## L4\n");
    let _ = writeln!(
        w,
        "Connect + first byte through a service VIP, relative to a direct connect to the same \
         backend, as the number of services grows; steerd's `connect()` hook against \
         kube-proxy-style iptables DNAT rules. Target: **≤ 1.02× direct at every count, and flat \
         where iptables grows.**\n"
    );
    let _ = writeln!(
        w,
        "Measured {} by `cargo xtask bench l4` ({:.0} s after the release build) on Linux {}, \
         {} × {}; steerd: {}.\n",
        machine.date,
        elapsed.as_secs_f64(),
        machine.kernel,
        machine.cpus,
        machine.cpu,
        bins.steerd_origin
    );

    let _ = writeln!(
        w,
        "| services | direct p50 | steerd VIP p50 | iptables VIP p50, first rule | iptables VIP p50, last rule |"
    );
    let _ = writeln!(w, "|---:|---:|---:|---:|---:|");
    for r in results {
        let cell = |case: Case| {
            format!(
                "{:.1} µs (**{:.3}×**)",
                r.get(case).stats.p50,
                r.ratio(case, |s| s.p50)
            )
        };
        let _ = writeln!(
            w,
            "| {} | {:.1} µs | {} | {} | {} |",
            thousands(r.services.into()),
            r.get(Case::Direct).stats.p50,
            cell(Case::Steerd),
            cell(Case::IptablesFirst),
            cell(Case::IptablesLast)
        );
    }
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "| services | direct p99 | steerd VIP p99 | iptables VIP p99, first rule | iptables VIP p99, last rule |"
    );
    let _ = writeln!(w, "|---:|---:|---:|---:|---:|");
    for r in results {
        let cell = |case: Case| {
            format!(
                "{:.1} µs ({:.3}×)",
                r.get(case).stats.p99,
                r.ratio(case, |s| s.p99)
            )
        };
        let _ = writeln!(
            w,
            "| {} | {:.1} µs | {} | {} | {} |",
            thousands(r.services.into()),
            r.get(Case::Direct).stats.p99,
            cell(Case::Steerd),
            cell(Case::IptablesFirst),
            cell(Case::IptablesLast)
        );
    }
    let _ = writeln!(w);
    let _ = writeln!(w, "{}\n", verdict(results));
    let _ = writeln!(
        w,
        "![p50 latency relative to a direct connect, against the number of services]({SVG_PATH})\n"
    );

    let _ = writeln!(
        w,
        "<details><summary>Every case (µs; × is relative to the baseline; \"rounds\" is the median of the per-round p50 ratios)</summary>\n"
    );
    let _ = writeln!(
        w,
        "| services | case | p50 | p90 | p99 | mean | p50 × | p99 × | rounds p50 × |"
    );
    let _ = writeln!(w, "|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        for c in &r.cases {
            let s = &c.stats;
            let _ = writeln!(
                w,
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} | {:.3} | {:.3} |",
                thousands(r.services.into()),
                c.case.label(),
                s.p50,
                s.p90,
                s.p99,
                s.mean,
                r.ratio(c.case, |s| s.p50),
                r.ratio(c.case, |s| s.p99),
                c.round_ratio_p50
            );
        }
    }
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "| services | agent start to ready (all services in the maps) | `iptables-restore` of the rules |"
    );
    let _ = writeln!(w, "|---:|---:|---:|");
    for r in results {
        let _ = writeln!(
            w,
            "| {} | {:.2} s | {:.2} s |",
            thousands(r.services.into()),
            r.agent_ready.as_secs_f64(),
            r.iptables_load.as_secs_f64()
        );
    }
    let _ = writeln!(w, "\n</details>\n");

    let per_round = options.connections / options.rounds;
    let _ = writeln!(w, "### Method\n");
    let _ = writeln!(
        w,
        "- **Topology.** For each service count, two throw-away nodes from the end-to-end \
         harness: a node network namespace with no default route and one backend pod behind a \
         veth pair, answering every TCP connection with an identity line. Clients run in the \
         node namespace; all traffic stays in these namespaces."
    );
    let _ = writeln!(
        w,
        "- **steerd.** The agent (release build) runs in the first node over a manifest directory \
         with N Services (cluster IPs from {FIRST_VIP} up in {SERVICE_CIDR}, port {SERVICE_PORT} → \
         {BACKEND_PORT}) selecting one Pod, the backend. Its programs steer one test cgroup. \
         `steerd maps services` must list all N before measuring. The client dials the last \
         service's VIP from that cgroup."
    );
    let _ = writeln!(
        w,
        "- **iptables.** The second node has no agent, but the `nat` table kube-proxy's iptables \
         mode writes for the same N services, loaded with one `iptables-restore` \
         ({}): `OUTPUT → KUBE-SERVICES`, one `-d VIP/32 -p tcp --dport {SERVICE_PORT}` rule per \
         service in a linear chain, each jumping to a `KUBE-SVC-*` chain and a `KUBE-SEP-*` chain \
         that DNATs to the backend, a final `addrtype LOCAL → KUBE-NODEPORTS` rule, and the \
         masquerade chains. A route sends {SERVICE_CIDR} to the pod so that VIPs are routable. The \
         client dials the VIP of the first and of the last rule (kube-proxy's best and worst \
         case). Those two services DNAT to backend ports of their own ({FIRST_RULE_PORT}, \
         {LAST_RULE_PORT}): a DNATed socket's TCP timestamps are offset for the VIP, and when its \
         SYN meets a server TIME_WAIT left by a connection through another address from the same \
         client port, PAWS drops it and a SYN retransmission lands in the tail (steerd's sockets \
         address the backend itself and are not affected). kube-proxy's IPVS and nftables modes \
         do not use a linear chain and are not measured here.",
        iptables_version()
    );
    let _ = writeln!(
        w,
        "- **Baseline.** The same client, in a second (unsteered) cgroup of the steerd node, \
         connecting straight to the backend pod's IP. A second run of the baseline in every \
         round (\"A/A check\") shows the method's own noise. Two more cases show what each \
         approach costs connections that are *not* to a service: a direct connect from the \
         steered cgroup (steerd's programs run and find nothing to do) and a direct connect on the iptables \
         node (conntrack, and every KUBE-SERVICES rule is tried)."
    );
    let _ = writeln!(
        w,
        "- **Measurement.** `steerd-probe latency` (release build) makes one connection at a \
         time: a blocking `connect()` until the identity line has been read, timed with the \
         monotonic clock (socket creation and close are not timed; the client reads to EOF \
         after timing so that the server closes first). It checks every reply came from the \
         backend. The client is pinned to one CPU, the servers and the agent to the other(s); \
         the client and the server threads run at SCHED_FIFO priority {REALTIME_PRIORITY}, so \
         builds and tests sharing the machine do not add scheduling delays (they only block, \
         never spin). Each case gets {} timed connections, in {} rounds of ~{per_round}; every round runs \
         every case once (after {} untimed warm-up connections per run), rotating their order, \
         so drift on the machine hits all cases alike.",
        thousands(options.connections),
        options.rounds,
        options.warmup
    );
    let _ = writeln!(
        w,
        "- **Ratios.** × is the case's percentile over all its samples divided by the baseline's \
         at the same service count. p50 ratios are steady to about ±1% (see the A/A check); \
         p99 ratios move by several percent from run to run, more so when the machine is busy \
         with other work. The per-round median ratio in the details is a cross-check of p50."
    );
    md
}

/// One paragraph: the ranges of the ratios and whether the target was met.
fn verdict(results: &[CountResult]) -> String {
    let range = |case: Case| {
        let ratios: Vec<f64> = results.iter().map(|r| r.ratio(case, |s| s.p50)).collect();
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    let (steerd_lo, steerd_hi) = range(Case::Steerd);
    let (aa_lo, aa_hi) = range(Case::DirectAgain);
    let (miss_lo, miss_hi) = range(Case::SteerdMiss);
    let added: Vec<f64> = results
        .iter()
        .map(|r| r.get(Case::Steerd).stats.p50 - r.get(Case::Direct).stats.p50)
        .collect();
    let added_lo = added.iter().copied().fold(f64::INFINITY, f64::min);
    let added_hi = added.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let over: Vec<String> = results
        .iter()
        .filter(|r| r.ratio(Case::Steerd, |s| s.p50) > 1.02)
        .map(|r| thousands(r.services.into()))
        .collect();
    let target = match over.as_slice() {
        [] => "the ≤ 1.02× target is **met** at every count".to_owned(),
        [one] => format!("the ≤ 1.02× target is **missed** at {one} services"),
        [rest @ .., last] => format!(
            "the ≤ 1.02× target is **missed** at {} and {last} services",
            rest.join(", ")
        ),
    };
    let (Some(first), Some(last)) = (results.first(), results.last()) else {
        return String::new();
    };
    format!(
        "steerd's p50 is {steerd_lo:.3}–{steerd_hi:.3}× direct from {} to {} services \
         ({added_lo:+.2} to {added_hi:+.2} µs): {target}. A direct connect from the steered \
         cgroup (steerd's programs run, nothing matches) is {miss_lo:.3}–{miss_hi:.3}×, and the \
         baseline against itself {aa_lo:.3}–{aa_hi:.3}×. \
         Through iptables, the last rule's p50 goes from {:.2}× to {:.2}× direct, and every \
         connection on that node, service or not, pays for the chain ({:.2}× at {} rules).",
        thousands(first.services.into()),
        thousands(last.services.into()),
        first.ratio(Case::IptablesLast, |s| s.p50),
        last.ratio(Case::IptablesLast, |s| s.p50),
        last.ratio(Case::IptablesMiss, |s| s.p50),
        thousands(last.services.into()),
    )
}

fn iptables_version() -> String {
    Command::new("iptables")
        .arg("-V")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "iptables".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vips_and_rules() {
        assert_eq!(vip(0), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(vip(9_999), Ipv4Addr::new(10, 96, 39, 16));
        let rules = kube_proxy_rules(3, Ipv4Addr::new(10, 244, 1, 2));
        assert!(rules.starts_with("*nat\n") && rules.ends_with("COMMIT\n"));
        let services: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES -d "))
            .collect();
        assert_eq!(services.len(), 3);
        assert!(
            services[2].contains("-d 10.96.0.3/32") && services[2].ends_with("KUBE-SVC-00000002")
        );
        assert!(rules.contains(
            "-A KUBE-SEP-00000000 -p tcp -m tcp -j DNAT --to-destination 10.244.1.2:8081"
        ));
        assert!(rules.contains(
            "-A KUBE-SEP-00000001 -p tcp -m tcp -j DNAT --to-destination 10.244.1.2:8080"
        ));
        assert!(rules.contains(
            "-A KUBE-SEP-00000002 -p tcp -m tcp -j DNAT --to-destination 10.244.1.2:8082"
        ));
        assert!(rules.contains(":KUBE-SEP-00000002 - [0:0]"));
        let yaml = manifests(2, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(yaml.matches("kind: Service\n").count(), 2);
        assert!(yaml.contains("clusterIP: 10.96.0.2,"));
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(1), "1");
        assert_eq!(thousands(100_000), "100,000");
    }
}
