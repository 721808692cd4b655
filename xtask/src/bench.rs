//! `cargo xtask bench …`: performance measured against a peer in the same run.
//!
//! Results go to BENCHMARKS.md, one `##` section per benchmark between
//! `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->`; a run replaces only its own
//! section, so benchmarks written later (L7, control plane, ...) add sections of their own.

mod control;
mod l4;
mod l7;
mod plot;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::workspace_root;

#[derive(Subcommand, Clone)]
pub enum Which {
    /// Connect + first byte through a VIP vs. direct, and vs. iptables DNAT, at 1/1k/10k services.
    L4(l4::Options),
    /// HTTP requests/s and latency through steerd's L7 proxy vs. nginx and Envoy with the same
    /// routes (header match + 90/10, and with mirroring), each on one proxy core.
    L7(l7::Options),
    /// The control plane at 10,000 Services / 50,000 endpoints + VirtualServices: time to ready,
    /// one object's change to the map update, agent RSS and BPF map memory.
    Control(control::Options),
}

pub fn run(which: Which) -> Result<()> {
    match which {
        Which::L4(options) => l4::run(&options),
        Which::L7(options) => l7::run(&options),
        Which::Control(options) => control::run(&options),
    }
}

/// The executables a benchmark runs.
struct Binaries {
    steerd: PathBuf,
    probe: PathBuf,
    /// Where the agent binary came from, for the report.
    steerd_origin: String,
}

/// Builds the agent and the probe in release mode (the agent as deployed; the probe so that the
/// client adds as little as possible). `$STEERD_BIN` (the harness's own override) replaces the
/// agent build.
fn build_release() -> Result<Binaries> {
    let given = std::env::var_os("STEERD_BIN").map(PathBuf::from);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args([
        "build",
        "--release",
        "--message-format=json-render-diagnostics",
    ]);
    if given.is_none() {
        cmd.args(["-p", "steerd", "--bin", "steerd"]);
    }
    cmd.args(["-p", "steerd-e2e", "--bin", "steerd-probe"])
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!("+ {cmd:?}");
    let output = cmd
        .output()
        .with_context(|| format!("spawning {cargo:?}"))?;
    if !output.status.success() {
        bail!("{cmd:?} failed: {}", output.status);
    }
    let executable = |name: &str| -> Result<PathBuf> {
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .with_context(|| format!("cargo reported no executable `{name}`"))
    };
    let probe = executable("steerd-probe")?;
    let (steerd, steerd_origin) = match given {
        Some(path) => {
            if !path.is_file() {
                bail!("STEERD_BIN={} is not a file", path.display());
            }
            let origin = format!("binary from `STEERD_BIN` ({})", path.display());
            (path, origin)
        }
        None => (
            executable("steerd")?,
            format!("release build of {}", git_revision()),
        ),
    };
    Ok(Binaries {
        steerd,
        probe,
        steerd_origin,
    })
}

/// `` `abc1234` ``, or `` `abc1234` + uncommitted changes `` when what goes into the agent binary
/// (agent/, ebpf/, common/, the lock file) differs from that commit.
fn git_revision() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(workspace_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(rev) = git(&["rev-parse", "--short=10", "HEAD"]) else {
        return "an unknown revision".into();
    };
    let agent_sources = ["agent", "ebpf", "common", "Cargo.lock", "Cargo.toml"];
    let mut status = vec!["status", "--porcelain", "--"];
    status.extend(agent_sources);
    match git(&status) {
        Some(changes) if !changes.is_empty() => format!("`{rev}` + uncommitted changes"),
        _ => format!("`{rev}`"),
    }
}

/// What the numbers were measured on.
struct Machine {
    date: String,
    kernel: String,
    cpu: String,
    cpus: usize,
}

impl Machine {
    fn describe() -> Machine {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, model)| model.split_whitespace().collect::<Vec<_>>().join(" "))
            })
            .unwrap_or_else(|| "unknown CPU".into());
        Machine {
            date: utc_date(SystemTime::now()),
            kernel,
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// `YYYY-MM-DD` (UTC) of `time`.
fn utc_date(time: SystemTime) -> String {
    let days = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) / 86_400;
    // Civil from days (H. Hinnant's algorithm), for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Writes `body` as the section `name` of BENCHMARKS.md: replaces what is between its markers,
/// or appends it (creating the file) if it is not there yet.
fn write_section(name: &str, body: &str) -> Result<PathBuf> {
    let path = workspace_root().join("BENCHMARKS.md");
    let old = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let new = replace_section(&old, name, body)?;
    write_atomically(&path, new.as_bytes())?;
    Ok(path)
}

const BENCHMARKS_HEADER: &str = "# Benchmarks\n\n\
Written by `cargo xtask bench …`: each benchmark measures steerd against a peer in the same run \
on the same machine, and replaces only its own section below.\n";

fn replace_section(old: &str, name: &str, body: &str) -> Result<String> {
    let start = format!("<!-- bench:{name}:start -->");
    let end = format!("<!-- bench:{name}:end -->");
    let section = format!("{start}\n{}\n{end}", body.trim_end());
    match (old.find(&start), old.find(&end)) {
        (Some(s), Some(e)) if s < e => {
            Ok(format!("{}{section}{}", &old[..s], &old[e + end.len()..]))
        }
        (None, None) => {
            let mut text = if old.trim().is_empty() {
                BENCHMARKS_HEADER.to_owned()
            } else {
                old.trim_end().to_owned() + "\n"
            };
            text.push('\n');
            text.push_str(&section);
            text.push('\n');
            Ok(text)
        }
        _ => bail!("BENCHMARKS.md: the markers {start} and {end} are broken; fix them by hand"),
    }
}

/// Writes through a temporary file in the same directory and a rename, so a reader never sees
/// half a file.
fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let stem = name.split('.').next().unwrap_or(name);
    let tmp = path.with_file_name(format!("{stem}.tmp{}", std::process::id()));
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// Summary of latency samples, in microseconds.
#[derive(Clone, Copy, Debug)]
struct Stats {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Stats {
    /// `samples` in nanoseconds; nearest-rank percentiles. Panics on an empty slice.
    fn of(samples: &[u64]) -> Stats {
        assert!(!samples.is_empty(), "no samples");
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let rank = |q: f64| {
            let k = (q * sorted.len() as f64).ceil() as usize;
            sorted[k.clamp(1, sorted.len()) - 1] as f64 / 1e3
        };
        Stats {
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: rank(1.0),
            mean: sorted.iter().map(|&s| s as f64).sum::<f64>() / sorted.len() as f64 / 1e3,
        }
    }
}

/// The median of `values` (which must not be empty).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_appended_then_replaced_in_place() {
        let first = replace_section("", "l4", "## L4\none").unwrap();
        assert!(first.starts_with("# Benchmarks\n"));
        assert!(first.contains("<!-- bench:l4:start -->\n## L4\none\n<!-- bench:l4:end -->"));
        let both = replace_section(&first, "l7", "## L7\nx\n").unwrap();
        let again = replace_section(&both, "l4", "## L4\ntwo").unwrap();
        assert!(again.contains("## L4\ntwo\n<!-- bench:l4:end -->"));
        assert!(!again.contains("one"));
        assert!(again.find("bench:l4:start") < again.find("bench:l7:start"));
        assert!(again.ends_with("<!-- bench:l7:end -->\n"));
        assert!(replace_section("<!-- bench:l4:end -->", "l4", "x").is_err());
    }

    #[test]
    fn percentiles_and_dates() {
        let samples: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        let s = Stats::of(&samples);
        assert_eq!((s.p50, s.p90, s.p99), (50.0, 90.0, 99.0));
        assert!((s.mean - 50.5).abs() < 1e-9);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(utc_date(UNIX_EPOCH), "1970-01-01");
        let leap = UNIX_EPOCH + std::time::Duration::from_secs(1_709_164_800);
        assert_eq!(utc_date(leap), "2024-02-29");
    }
}
