//! `steerd run`: the agent loop. Sources send snapshots; each one is compiled and written to
//! the maps; readiness follows the first successful write.

use super::RunArgs;
use crate::admin::{self, AdminState};
use crate::compile::{
    self, Diagnostic, Level,
    incremental::{Dirty, IncrementalCompiler},
};
use crate::dataplane::{
    Dataplane, LoadOptions, Pins, authz, kernel,
    proxy::{Proxy, ProxyTable},
    workers::ProxyWorkers,
};
use crate::sources::{
    self, Snapshot, SourceSpec, Update,
    dns::{self, DnsSource},
    files::FileSource,
    kube::KubeSource,
};
use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

/// How often retired alias tables are collected.
const GC_INTERVAL: Duration = Duration::from_millis(500);

pub async fn run(args: RunArgs) -> Result<()> {
    let cgroup = match args.cgroup.clone() {
        Some(c) => c,
        None => super::cgroup2_root().context("no cgroup2 mount found; pass --cgroup")?,
    };
    let pins = Pins::new(&args.bpffs);
    let policy_interfaces: Vec<String> = if args.policy_interfaces.is_empty() {
        authz::DEFAULT_INTERFACES.map(str::to_string).to_vec()
    } else {
        args.policy_interfaces
            .iter()
            .filter(|p| *p != "none")
            .cloned()
            .collect()
    };
    let mut dataplane = Dataplane::start(
        &pins,
        &cgroup,
        policy_interfaces,
        LoadOptions {
            tracked_sockets: args.max_tracked_sockets,
            traffic_counters: args.max_traffic_counters,
            socket_redirect: args.socket_redirect,
        },
    )
    .with_context(|| format!("starting the dataplane (bpffs {})", args.bpffs.display()))?;

    let state = Arc::new(AdminState::default());
    let (proxy, _proxy_workers) = match start_proxy(&args, &mut dataplane, state.metrics.clone())? {
        Some((proxy, workers)) => (Some(proxy), Some(workers)),
        None => (None, None),
    };
    if let Some(p) = &proxy {
        let _ = state.proxy.set(p.clone());
    }
    let gateways = start_gateways(&args, proxy.as_ref())?;
    if let Some(g) = &gateways {
        let _ = state.gateways.set(g.clone());
    }
    if let Some(stats) = dataplane.stats.take() {
        state.metrics.attach_stats(stats);
    }
    if let Some(denied) = dataplane.denied.take() {
        state.metrics.attach_denied(denied);
    }
    if let Some(redirect) = dataplane.redirect_stats.take() {
        state.metrics.attach_redirect_stats(redirect);
    }
    if let Some(denied) = dataplane.authz_denied.take() {
        state.metrics.attach_authz_denied(denied);
    }
    let admin = admin::bind(args.admin, state.clone())
        .await
        .with_context(|| format!("binding the admin listener {}", args.admin))?;
    tokio::spawn(admin);

    if let Some(logger) = dataplane.logger.take() {
        tokio::spawn(async move {
            // SAFETY: the logger owns its ring buffer fd and AsyncFd owns the logger, so the fd
            // stays open for as long as it is registered.
            let Ok(mut fd) =
                (unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) })
            else {
                return;
            };
            loop {
                let Ok(mut guard) = fd.readable_mut().await else {
                    return;
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
    }

    let (tx, mut rx) = mpsc::channel::<(usize, Update)>(16);
    for (index, spec) in args.sources.iter().enumerate() {
        let tx = tx.clone();
        match spec.clone() {
            SourceSpec::Builtin => {
                let _ = tx
                    .send((index, Update::Full(Box::new(sources::builtin()))))
                    .await;
            }
            SourceSpec::Files(dir) => {
                let (snap_tx, snap_rx) = mpsc::channel(4);
                tokio::spawn(async move {
                    if let Err(e) = FileSource::new(&dir).watch(snap_tx).await {
                        error!(error = %e, dir = %dir.display(), "file source stopped");
                    }
                });
                tokio::spawn(forward(index, snap_rx, tx));
            }
            SourceSpec::Kube => {
                // Gateways read their `credentialName` Secrets from their own namespace.
                let secret_namespaces = args.gateways.iter().filter_map(|g| {
                    let key = compile::gateway_ref(g, compile::gateway::DEFAULT_NAMESPACE);
                    key.split_once('/').map(|(ns, _)| ns.to_string())
                });
                let source = KubeSource::connect(args.kubeconfig.as_deref())
                    .await
                    .context("--source kube")?
                    .watch_secrets_in(secret_namespaces);
                let (snap_tx, snap_rx) = mpsc::channel(4);
                tokio::spawn(source.watch(snap_tx));
                tokio::spawn(forward(index, snap_rx, tx));
            }
        }
    }
    // DNS answers for ServiceEntries come in as one more source, after the configured ones.
    let dns = {
        let (snap_tx, snap_rx) = mpsc::channel(4);
        tokio::spawn(forward_snapshots(args.sources.len(), snap_rx, tx.clone()));
        DnsSource::spawn(
            args.dns_server,
            Some(dns::StateFile::in_dir(&args.state_dir)),
            snap_tx,
        )
    };
    // Held so the channel stays open after one-shot sources (builtin) have sent.
    let _sources_open = tx;

    let mut errors: Vec<Vec<crate::model::ParseError>> = vec![Vec::new(); args.sources.len() + 1];
    let mut compiler = IncrementalCompiler::default();
    let mut writer = PlanWriter::default();
    let mut gc = tokio::time::interval(GC_INTERVAL);
    let mut rescan = tokio::time::interval(authz::RESCAN);
    // Without inotify, new pod cgroups are found by the periodic scan alone.
    let mut pod_watcher = match crate::dataplane::cgroups::PodCgroupWatcher::new() {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, "cannot watch cgroups; new pods are found by the scan every second");
            None
        }
    };
    let (started, mut planned) = (Instant::now(), false);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            update = rx.recv() => {
                let Some((index, update)) = update else { break };
                // Sources repeat their errors in every update until fixed; log each once, or a
                // cluster's steady Pod churn would repeat every warning on every update.
                for e in update.errors().iter().filter(|e| !errors[index].contains(e)) {
                    warn!(error = %e, "invalid configuration; serving its last good version");
                }
                errors[index] = update.errors().to_vec();
                let rejected: usize = errors.iter().map(Vec::len).sum();
                state.metrics.config_errors.set(rejected as i64);
                let compile_started = Instant::now();
                match update {
                    Update::Full(snap) => compiler.replace_source(index, snap.config),
                    Update::Changes { changes, .. } => compiler.apply(index, changes),
                }
                if let Some(p) = &proxy {
                    follow_node_locality(&args, p, &compiler);
                }
                let dns_config = compiler.store().dns_config();
                dns.want(&dns_config);
                // The first plan waits (briefly) for a first answer for every DNS name: until
                // then the previous agent's pinned maps keep serving, where writing now would
                // leave DNS ServiceEntries without endpoints until the resolver answers.
                if !planned && dns.waiting(&dns_config) && started.elapsed() < dns::STARTUP_GRACE {
                    continue;
                }
                planned = true;
                let mesh_registry_only = args.outbound_traffic_policy == Some(super::OutboundPolicy::RegistryOnly);
                // Gateway listeners first: readiness (in reconcile) then covers them too. They
                // compile from the whole configuration.
                if let Some(g) = &gateways {
                    g.apply(&compiler.store().to_config());
                }
                writer.reconcile(&mut dataplane, proxy.as_deref(), &mut compiler, &state, mesh_registry_only, compile_started);
                writer.sync_workloads(&mut dataplane, compiler.plan(), &cgroup, pod_watcher.as_mut(), mesh_registry_only, false);
                // Publishing copies the plan: done once the burst of updates is over.
                if rx.is_empty() || writer.published_at.elapsed() > PUBLISH_INTERVAL {
                    writer.publish(&compiler, &state);
                }
            }
            _ = gc.tick() => {
                if writer.unpublished {
                    writer.publish(&compiler, &state);
                }
                dataplane.writer.collect_garbage(Instant::now());
                dataplane.authz.collect_garbage(Instant::now());
            }
            _ = rescan.tick() => {
                // New pods bring new veths and new pod cgroups.
                dataplane.rescan_policy_interfaces();
                if planned {
                    let mesh_registry_only = args.outbound_traffic_policy == Some(super::OutboundPolicy::RegistryOnly);
                    writer.sync_workloads(&mut dataplane, compiler.plan(), &cgroup, pod_watcher.as_mut(), mesh_registry_only, true);
                }
            }
            _ = async { pod_watcher.as_mut().expect("guarded").changed().await }, if pod_watcher.is_some() && planned => {
                // A new directory next to known pod cgroups: likely a new Pod's.
                let mesh_registry_only = args.outbound_traffic_policy == Some(super::OutboundPolicy::RegistryOnly);
                writer.sync_workloads(&mut dataplane, compiler.plan(), &cgroup, pod_watcher.as_mut(), mesh_registry_only, true);
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    if proxy.is_some() {
        // Without this the kernel would keep sending L7 connections to a closed port; with it
        // they fall back to per-connection balancing until the next agent starts its proxy.
        if let Err(e) = dataplane.set_proxy(None, None, None) {
            warn!(error = %e, "could not withdraw the proxy from the kernel");
        }
    }
    info!("stopping; pinned programs and maps keep steering until the next agent adopts them");
    Ok(())
}

/// Without `--locality`, the proxy's locality is the topology of this agent's Node
/// (`--node-name`), followed as its labels change (rare, but a relabelled node must not keep
/// steering by its old zone).
fn follow_node_locality(args: &RunArgs, proxy: &Proxy, compiler: &IncrementalCompiler) {
    if args.locality.as_deref().is_some_and(|l| !l.is_empty()) {
        return;
    }
    let Some(name) = args.node_name.as_deref().filter(|n| !n.is_empty()) else {
        return;
    };
    let locality = compiler
        .store()
        .node(name)
        .map(|n| crate::compile::http::Locality::parse(&n.spec.locality()))
        .filter(|l| !l.is_empty());
    let current = proxy.locality();
    if current.as_deref() != locality.as_ref() {
        match &locality {
            Some(l) => info!(node = name, locality = %l, "this node's locality"),
            None => info!(
                node = name,
                "this node's locality is unknown (no Node object or no topology labels): locality is ignored"
            ),
        }
        proxy.set_locality(locality);
    }
}

/// Tags one source's updates with its index for the agent loop.
async fn forward(
    index: usize,
    mut updates: mpsc::Receiver<Update>,
    tx: mpsc::Sender<(usize, Update)>,
) {
    while let Some(update) = updates.recv().await {
        if tx.send((index, update)).await.is_err() {
            return;
        }
    }
}

/// Tags the snapshots of a source that always sends everything (the DNS resolver).
async fn forward_snapshots(
    index: usize,
    mut snapshots: mpsc::Receiver<Snapshot>,
    tx: mpsc::Sender<(usize, Update)>,
) {
    while let Some(snap) = snapshots.recv().await {
        if tx
            .send((index, Update::Full(Box::new(snap))))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Starts the L7 proxy's workers on the node addresses and tells the kernel about it.
fn start_proxy(
    args: &RunArgs,
    dataplane: &mut Dataplane,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<Option<(Arc<Proxy>, ProxyWorkers)>> {
    let node_ips = if args.node_ips.is_empty() {
        super::default_node_ip().into_iter().collect()
    } else {
        args.node_ips.clone()
    };
    let ipv4 = node_ips.iter().find_map(|ip| match ip {
        std::net::IpAddr::V4(v4) => Some(*v4),
        _ => None,
    });
    let ipv6 = node_ips.iter().find_map(|ip| match ip {
        std::net::IpAddr::V6(v6) => Some(*v6),
        _ => None,
    });
    let Some(connections) = dataplane
        .l7_connections
        .take()
        .filter(|_| ipv4.is_some() || ipv6.is_some())
    else {
        warn!(
            "no node address (--node-ip): the L7 proxy is off; HTTP services are balanced per connection"
        );
        dataplane.set_proxy(None, None, None)?;
        return Ok(None);
    };
    let locality = args
        .locality
        .as_deref()
        .filter(|l| !l.is_empty())
        .map(crate::compile::http::Locality::parse);
    let proxy = Proxy::new(connections, metrics, locality);
    let workers = ProxyWorkers::start(super::worker_threads(args.worker_threads))
        .context("starting the L7 proxy's worker threads")?;
    for ip in [
        ipv4.map(std::net::IpAddr::V4),
        ipv6.map(std::net::IpAddr::V6),
    ]
    .into_iter()
    .flatten()
    {
        proxy.bind_workers(&workers, (ip, args.proxy_port).into())?;
    }
    dataplane.set_proxy(ipv4, ipv6, Some(args.proxy_port))?;
    Ok(Some((proxy, workers)))
}

/// Writes what the compiler changed to the kernel and the proxy.
struct PlanWriter {
    /// Nothing written yet by this agent: the first write makes the maps hold exactly the plan
    /// (removing what a previous agent left); later ones write only what changed.
    first: bool,
    /// The registered-destination trie needs a complete rewrite (first write, failed write).
    egress_full: bool,
    /// The last write of the authorization tables failed.
    authz_failed: bool,
    /// Diagnostics already logged.
    logged: std::collections::BTreeSet<Diagnostic>,
    /// Pod cgroups by Pod uid, from the last scan.
    pod_cgroups: std::collections::BTreeMap<String, crate::dataplane::cgroups::PodCgroup>,
    /// The Pod uids the last scan looked for.
    scanned_for: std::collections::BTreeSet<String>,
    published_at: Instant,
    /// A plan is in the maps that admin and metrics have not seen yet.
    unpublished: bool,
}

impl Default for PlanWriter {
    fn default() -> Self {
        Self {
            first: true,
            egress_full: true,
            authz_failed: false,
            logged: Default::default(),
            pod_cgroups: Default::default(),
            scanned_for: Default::default(),
            published_at: Instant::now(),
            unpublished: false,
        }
    }
}

/// Recompiling at least this many hosts (a relist, a large change) frees enough transient memory
/// to be worth handing back at once.
const LARGE_RECOMPILE_HOSTS: usize = 1000;

/// Hands the pages freed by a large recompile back to the OS now. mimalloc purges freed memory
/// lazily, when its heaps are used again; after the first plan the agent mostly idles, so the
/// build's peak would otherwise stay in its RSS.
fn release_freed_memory() {
    // SAFETY: `mi_collect` only walks and purges mimalloc's own heaps; callable at any time
    // (and harmless when mimalloc is not the global allocator: its heaps are then empty).
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Admin views and metric labels follow the maps at least this often during a burst.
const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

impl PlanWriter {
    fn reconcile(
        &mut self,
        dataplane: &mut Dataplane,
        proxy: Option<&Proxy>,
        compiler: &mut IncrementalCompiler,
        state: &AdminState,
        mesh_registry_only: bool,
        // When the compiler started on the changes being written (for `elapsed_us`).
        started: Instant,
    ) {
        let dirty: Dirty = compiler.take_dirty();
        if dirty.unknown_removals > 0 {
            warn!(
                count = dirty.unknown_removals,
                "a source removed objects it had not sent; ignored"
            );
        }
        if dirty.is_empty() && !self.first {
            return;
        }
        let plan = compiler.plan();
        // The proxy learns new L7 services before the kernel starts sending it their connections.
        if let Some(proxy) = proxy
            && (self.first || dirty.l7 || dirty.sources || dirty.authz)
        {
            proxy.update(ProxyTable::from_plan(plan));
        }
        // Only new findings are logged; the set is rebuilt only when the findings changed.
        if self.first || dirty.diagnostics {
            for d in plan
                .diagnostics
                .iter()
                .filter(|d| !self.logged.contains(*d))
            {
                match d.level {
                    Level::Error => warn!(diagnostic = %d, "configuration error"),
                    Level::Warning => warn!(diagnostic = %d, "configuration warning"),
                    Level::Info => info!(diagnostic = %d, "configuration note"),
                }
            }
            self.logged = plan.diagnostics.iter().cloned().collect();
        }
        let metrics = &state.metrics;
        // Policies go in before the services that make their workloads reachable.
        if (self.first || self.authz_failed || dirty.authz)
            && let Err(e) = dataplane.authz.apply(&plan.authz.kernel)
        {
            self.authz_failed = true;
            metrics.map_write_errors.inc();
            error!(error = %e, "writing the authorization tables failed; will retry on the next change");
        } else {
            self.authz_failed = false;
        }
        // Registered destinations go in before the services that make them reachable, and
        // before REGISTRY_ONLY is switched on.
        let registry_only = plan.egress.registry_only.unwrap_or(mesh_registry_only);
        let egress = if self.egress_full {
            dataplane.egress.apply(compiler.registered(), registry_only)
        } else {
            dataplane.egress.apply_changes(
                &dirty.registered_added,
                &dirty.registered_removed,
                registry_only,
            )
        };
        match egress {
            Ok(()) => self.egress_full = false,
            Err(e) => {
                self.egress_full = true;
                metrics.map_write_errors.inc();
                error!(error = %e, "writing the egress registry failed; will retry on the next change");
            }
        }
        if dirty.services.is_empty() && !self.first {
            // Nothing for the maps (diagnostics, sources, policy): still a new plan to publish.
            self.unpublished = true;
            return;
        }
        let first_plan = self.first;
        let result = if self.first {
            dataplane
                .writer
                .apply(&kernel::tables(plan))
                .map_err(|e| e.to_string())
        } else {
            let changes: Vec<_> = dirty
                .services
                .iter()
                .map(|(vip, svc)| {
                    (
                        kernel::service_key(vip),
                        svc.as_deref().map(kernel::kernel_service),
                    )
                })
                .collect();
            let (stats, failures) = dataplane.writer.apply_changes(&changes);
            if failures.is_empty() {
                Ok(stats)
            } else {
                let first = failures[0].1.clone();
                let failed: Vec<_> = failures
                    .iter()
                    .filter_map(|(k, _)| kernel::vip_of(k))
                    .collect();
                compiler.mark_dirty(failed);
                Err(format!(
                    "{} of {} services: {first}",
                    failures.len(),
                    changes.len()
                ))
            }
        };
        match result {
            Ok(stats) => {
                self.first = false;
                self.unpublished = true;
                metrics.plan_generation.inc();
                metrics
                    .plan_apply_seconds
                    .observe(started.elapsed().as_secs_f64());
                metrics
                    .map_services
                    .set(dataplane.writer.service_count() as i64);
                metrics.map_slots.set(dataplane.writer.slot_count() as i64);
                info!(
                    services = dataplane.writer.service_count(),
                    authz_destinations = dataplane.authz.destination_count(),
                    hosts = dirty.hosts,
                    added = stats.added,
                    updated = stats.updated,
                    removed = stats.removed,
                    unchanged = stats.unchanged,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "plan applied"
                );
                // The first plan also follows start-up (loading the programs, reading kernel
                // BTF), whose transient memory is freed by then.
                if first_plan || dirty.hosts >= LARGE_RECOMPILE_HOSTS {
                    release_freed_memory();
                }
            }
            Err(e) => {
                metrics.map_write_errors.inc();
                error!(error = %e, "writing the plan to the maps failed; will retry on the next change");
            }
        }
    }

    /// Points the pod cgroups of Pods with a Sidecar policy of their own at it. `rescan` looks
    /// for pod cgroups again (the timer); otherwise only when a Pod's is not known yet.
    fn sync_workloads(
        &mut self,
        dataplane: &mut Dataplane,
        plan: &compile::Plan,
        cgroup_root: &std::path::Path,
        watcher: Option<&mut crate::dataplane::cgroups::PodCgroupWatcher>,
        mesh_registry_only: bool,
        rescan: bool,
    ) {
        let workloads = &plan.egress.workloads;
        // Pods of other nodes have no cgroup here: only Pods new since the last scan trigger one.
        let new_pods = workloads
            .keys()
            .any(|uid| !self.pod_cgroups.contains_key(uid) && !self.scanned_for.contains(uid));
        if rescan || new_pods {
            self.pod_cgroups = if workloads.is_empty() {
                Default::default()
            } else {
                crate::dataplane::cgroups::scan(cgroup_root)
            };
            self.scanned_for = workloads.keys().cloned().collect();
            if let Some(w) = watcher {
                if workloads.is_empty() {
                    w.clear();
                } else {
                    w.follow(cgroup_root, &self.pod_cgroups);
                }
            }
        }
        let want: std::collections::BTreeMap<u64, bool> = workloads
            .iter()
            .filter_map(|(uid, w)| {
                let cgroup = self.pod_cgroups.get(uid)?;
                Some((cgroup.id, w.registry_only.unwrap_or(mesh_registry_only)))
            })
            .collect();
        if let Err(e) = dataplane.egress.set_workloads(&want) {
            error!(error = %e, "writing the per-workload outbound policies failed; will retry");
        }
    }

    /// Hands the plan in the maps to the admin views and metric labels (a copy).
    fn publish(&mut self, compiler: &IncrementalCompiler, state: &AdminState) {
        if !self.unpublished {
            return;
        }
        let plan = compiler.plan();
        state.metrics.set_plan(plan);
        state.publish(Arc::new(plan.clone()));
        self.unpublished = false;
        self.published_at = Instant::now();
    }
}

/// The `--gateway` listeners; they bind when the first configuration arrives.
fn start_gateways(
    args: &RunArgs,
    proxy: Option<&Arc<Proxy>>,
) -> Result<Option<Arc<crate::dataplane::gateway::Gateways>>> {
    if args.gateways.is_empty() {
        return Ok(None);
    }
    let Some(proxy) = proxy else {
        anyhow::bail!("--gateway needs a node address to listen on (--node-ip)");
    };
    let node_ips = if args.node_ips.is_empty() {
        super::default_node_ip().into_iter().collect()
    } else {
        args.node_ips.clone()
    };
    let names: Vec<String> = args
        .gateways
        .iter()
        .map(|g| compile::gateway_ref(g, compile::gateway::DEFAULT_NAMESPACE))
        .collect();
    info!(gateways = ?names, "serving gateways");
    Ok(Some(crate::dataplane::gateway::Gateways::new(
        proxy.clone(),
        node_ips,
        names,
    )))
}
