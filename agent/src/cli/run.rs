//! `steerd run`: the agent loop. Sources send snapshots; each one is compiled and written to
//! the maps; readiness follows the first successful write.

use super::RunArgs;
use crate::admin::{self, AdminState};
use crate::compile::{self, Level, Plan};
use crate::dataplane::{Dataplane, Pins, kernel};
use crate::model::ConfigSet;
use crate::sources::{self, Snapshot, SourceSpec, files::FileSource};
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
    let mut dataplane = Dataplane::start(&pins, &cgroup)
        .with_context(|| format!("starting the dataplane (bpffs {})", args.bpffs.display()))?;

    let state = Arc::new(AdminState::default());
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

    let (tx, mut rx) = mpsc::channel::<(usize, Snapshot)>(16);
    for (index, spec) in args.sources.iter().enumerate() {
        let tx = tx.clone();
        match spec.clone() {
            SourceSpec::Builtin => {
                let _ = tx.send((index, sources::builtin())).await;
            }
            SourceSpec::Files(dir) => {
                let (snap_tx, mut snap_rx) = mpsc::channel(4);
                tokio::spawn(async move {
                    if let Err(e) = FileSource::new(&dir).watch(snap_tx).await {
                        error!(error = %e, dir = %dir.display(), "file source stopped");
                    }
                });
                tokio::spawn(async move {
                    while let Some(snap) = snap_rx.recv().await {
                        if tx.send((index, snap)).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    }
    // Held so the channel stays open after one-shot sources (builtin) have sent.
    let _sources_open = tx;

    let mut latest: Vec<Option<Snapshot>> = vec![None; args.sources.len()];
    let mut gc = tokio::time::interval(GC_INTERVAL);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            update = rx.recv() => {
                let Some((index, snap)) = update else { break };
                latest[index] = Some(snap);
                let mut config = ConfigSet::default();
                for snap in latest.iter().flatten() {
                    for e in &snap.errors {
                        warn!(error = %e, "invalid configuration; serving its last good version");
                    }
                    merge(&mut config, &snap.config);
                }
                reconcile(&mut dataplane, &config, &state);
            }
            _ = gc.tick() => {
                dataplane.writer.collect_garbage(Instant::now());
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!("stopping; pinned programs and maps keep steering until the next agent adopts them");
    Ok(())
}

fn merge(into: &mut ConfigSet, from: &ConfigSet) {
    into.services.extend(from.services.iter().cloned());
    into.endpoint_slices
        .extend(from.endpoint_slices.iter().cloned());
    into.pods.extend(from.pods.iter().cloned());
    into.virtual_services
        .extend(from.virtual_services.iter().cloned());
    into.destination_rules
        .extend(from.destination_rules.iter().cloned());
    into.service_entries
        .extend(from.service_entries.iter().cloned());
    into.workload_entries
        .extend(from.workload_entries.iter().cloned());
    into.gateways.extend(from.gateways.iter().cloned());
}

fn reconcile(dataplane: &mut Dataplane, config: &ConfigSet, state: &AdminState) {
    let started = Instant::now();
    let plan = compile::compile(config);
    for d in &plan.diagnostics {
        match d.level {
            Level::Error => warn!(diagnostic = %d, "configuration error"),
            Level::Warning => warn!(diagnostic = %d, "configuration warning"),
            Level::Info => info!(diagnostic = %d, "configuration note"),
        }
    }
    let tables = kernel::tables(&plan);
    match dataplane.writer.apply(&tables) {
        Ok(stats) => {
            info!(
                services = tables.len(),
                added = stats.added,
                updated = stats.updated,
                removed = stats.removed,
                unchanged = stats.unchanged,
                elapsed_us = started.elapsed().as_micros() as u64,
                "plan applied"
            );
            state.publish(config_dump(&plan));
        }
        Err(e) => {
            error!(error = %e, "writing the plan to the maps failed; will retry on the next change")
        }
    }
}

/// The plan as JSON for `/debug/config_dump`.
pub fn config_dump(plan: &Plan) -> serde_json::Value {
    let services: Vec<serde_json::Value> = plan
        .services
        .iter()
        .map(|(vip, svc)| {
            serde_json::json!({
                "vip": vip.to_string(),
                "host": svc.host,
                "portName": svc.port_name,
                "route": svc.route,
                "needsL7": svc.needs_l7,
                "backends": svc.backends,
            })
        })
        .collect();
    serde_json::json!({ "services": services, "diagnostics": plan.diagnostics })
}
