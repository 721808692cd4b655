//! `cargo xtask bench …`: performance measured against a peer in the same run.

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand, Clone, Copy)]
pub enum Which {
    /// Connect + first byte through a VIP vs. direct, and vs. iptables DNAT, at 1/1k/10k services.
    L4,
}

pub fn run(which: Which) -> Result<()> {
    match which {
        Which::L4 => anyhow::bail!("bench l4 is being written"),
    }
}
