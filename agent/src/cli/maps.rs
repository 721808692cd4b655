//! `steerd maps`: the pinned maps as tables or JSON, read from a second process.

use super::{MapsTable, Output};
use crate::dataplane::{Pins, kernel, maps};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;
use steerd_common::SVC_F_NO_BACKENDS;

#[derive(Debug, Serialize)]
pub struct ServiceRow {
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    pub table: u32,
    pub backends: u32,
    pub no_backends: bool,
}

#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    pub backend: String,
    /// Percentage of new connections, as computed from the kernel's alias table.
    pub weight: f64,
}

pub fn rows(bpffs: &Path) -> Result<(Vec<ServiceRow>, Vec<BackendRow>), maps::MapsError> {
    let snap = maps::read_pinned(&Pins::new(bpffs).maps())?;
    let mut services = Vec::new();
    let mut backends = Vec::new();
    for (key, (value, slots)) in &snap.services {
        let Some(vip) = kernel::vip_of(key) else {
            continue;
        };
        let shares = kernel::backend_shares(slots);
        services.push(ServiceRow {
            vip: vip.ip.to_string(),
            port: vip.port,
            protocol: vip.transport.as_str().into(),
            table: value.table_id,
            backends: shares.len() as u32,
            no_backends: value.flags & SVC_F_NO_BACKENDS != 0,
        });
        for (addr, share) in shares {
            backends.push(BackendRow {
                vip: vip.ip.to_string(),
                port: vip.port,
                protocol: vip.transport.as_str().into(),
                backend: addr.to_string(),
                weight: (share * 1e4).round() / 100.0,
            });
        }
    }
    Ok((services, backends))
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let _ = write!(s, "{c:<w$}  ", w = widths[i]);
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut out, header.to_vec());
    for r in &rows {
        line(&mut out, r.iter().map(String::as_str).collect());
    }
    out
}

pub fn render(bpffs: &Path, which: MapsTable, output: Output) -> Result<String, maps::MapsError> {
    let (services, backends) = rows(bpffs)?;
    Ok(match (which, output) {
        (MapsTable::Services, Output::Json) => {
            serde_json::to_string_pretty(&services).expect("rows serialize") + "\n"
        }
        (MapsTable::Backends, Output::Json) => {
            serde_json::to_string_pretty(&backends).expect("rows serialize") + "\n"
        }
        (MapsTable::Services, Output::Table) => table(
            &["VIP", "PORT", "PROTO", "TABLE", "BACKENDS"],
            services
                .into_iter()
                .map(|r| {
                    let n = if r.no_backends {
                        "0 (reject)".to_string()
                    } else {
                        r.backends.to_string()
                    };
                    vec![
                        r.vip,
                        r.port.to_string(),
                        r.protocol,
                        r.table.to_string(),
                        n,
                    ]
                })
                .collect(),
        ),
        (MapsTable::Backends, Output::Table) => table(
            &["VIP", "PORT", "PROTO", "BACKEND", "WEIGHT"],
            backends
                .into_iter()
                .map(|r| {
                    vec![
                        r.vip,
                        r.port.to_string(),
                        r.protocol,
                        r.backend,
                        format!("{:.2}%", r.weight),
                    ]
                })
                .collect(),
        ),
    })
}
