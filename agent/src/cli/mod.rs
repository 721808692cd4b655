//! Command-line interface: `steerd run | maps | cleanup | version`.

pub mod maps;
pub mod run;

use crate::sources::SourceSpec;
use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/steerd";

#[derive(Debug, Parser)]
#[command(
    name = "steerd",
    version,
    about = "Istio traffic steering for Kubernetes nodes, in eBPF"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: watch configuration, compile it, keep the kernel maps in sync.
    Run(RunArgs),
    /// Print the pinned maps of a running (or killed) agent.
    Maps {
        #[arg(value_enum)]
        table: MapsTable,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Detach the programs and remove every map and link pinned under --bpffs (uninstall).
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Print the version.
    Version,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MapsTable {
    /// One row per service VIP:port:protocol.
    Services,
    /// One row per service backend, with the share of connections the kernel gives it.
    Backends,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Configuration source: `files:DIR` (watched) or `builtin` (the bundled examples).
    /// Repeat to merge several sources.
    #[arg(long = "source", default_value = "builtin")]
    pub sources: Vec<SourceSpec>,
    /// Where maps and links are pinned.
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// The cgroup (v2) whose processes are steered; default: the cgroup2 root.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Admin listener (probes, debug views).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    #[arg(long, value_enum, default_value_t)]
    pub log_format: LogFormat,
}

/// The cgroup2 mount point, from /proc/self/mounts.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}
