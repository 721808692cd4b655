//! Running the `steerd-probe` binary (src/bin/steerd-probe.rs) and reading its report.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cgroup::TestCgroup;
use crate::netns::Netns;
use crate::process::{describe_status, spawn_in, wait_with_timeout};

/// The JSON object the probe prints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// Successful attempts per identity line received.
    pub counts: HashMap<String, u64>,
    pub failures: u64,
    /// Successful attempts whose peer (getpeername for TCP, recvfrom's source for unconnected
    /// UDP) was not the dialled address.
    pub peer_mismatches: u64,
    /// The first few error messages.
    #[serde(default)]
    pub errors: Vec<String>,
    /// Attempts made (all modes report it; it matters for `loop`).
    #[serde(default)]
    pub attempts: u64,
}

impl ProbeResult {
    /// Sum of `counts`.
    pub fn successes(&self) -> u64 {
        self.counts.values().sum()
    }
}

/// Path of the probe binary: `$STEERD_PROBE_BIN`, else `steerd-probe` next to the running
/// executable or one level up. Cargo puts integration-test executables in `target/<profile>/deps`
/// and binaries in `target/<profile>`, and builds this package's binaries before running its
/// integration tests. (`env!("CARGO_BIN_EXE_steerd-probe")` names the same file, but only
/// integration tests are compiled with it.)
pub fn probe_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("STEERD_PROBE_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("steerd-probe"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "steerd-probe not found near {}; set STEERD_PROBE_BIN",
                exe.display()
            )
        })
}

/// Runs the probe with `args` (e.g. `["tcp", "--to", "10.96.0.1:80", "--count", "100"]`)
/// inside `netns` and `cgroup`, and parses its report. Panics if it cannot be spawned, does not
/// finish within a bound derived from its arguments, or prints no valid report.
pub fn run_probe(netns: Option<&Netns>, cgroup: Option<&TestCgroup>, args: &[&str]) -> ProbeResult {
    run_probe_with(&probe_bin(), netns, cgroup, args)
}

/// [`run_probe`] with an explicit binary path.
pub fn run_probe_with(
    bin: &Path,
    netns: Option<&Netns>,
    cgroup: Option<&TestCgroup>,
    args: &[&str],
) -> ProbeResult {
    spawn_probe_with(bin, netns, cgroup, args).wait()
}

/// Starts the probe like [`run_probe`] but returns at once, e.g. to keep a `loop` probe running
/// while the test restarts the agent. [`ProbeHandle::wait`] collects the report.
pub fn spawn_probe(
    netns: Option<&Netns>,
    cgroup: Option<&TestCgroup>,
    args: &[&str],
) -> ProbeHandle {
    spawn_probe_with(&probe_bin(), netns, cgroup, args)
}

/// [`spawn_probe`] with an explicit binary path.
pub fn spawn_probe_with(
    bin: &Path,
    netns: Option<&Netns>,
    cgroup: Option<&TestCgroup>,
    args: &[&str],
) -> ProbeHandle {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    ProbeHandle {
        child: Some(spawn_in(&mut cmd, netns, cgroup)),
        args: args.join(" "),
        limit: overall_limit(args),
    }
}

/// A running probe. Dropping it without [`ProbeHandle::wait`] kills it.
#[derive(Debug)]
pub struct ProbeHandle {
    child: Option<Child>,
    args: String,
    limit: Duration,
}

impl ProbeHandle {
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits (bounded by the probe's arguments) and parses the report; panics if there is none.
    pub fn wait(mut self) -> ProbeResult {
        let child = self.child.take().expect("probe already waited for");
        let args = &self.args;
        let output = wait_with_timeout(child, self.limit)
            .unwrap_or_else(|e| panic!("steerd-probe {args}: {e:#}"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            panic!(
                "steerd-probe {args} failed ({}): {}{}",
                describe_status(output.status),
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("steerd-probe {args}: bad report {stdout:?}: {e}"))
    }
}

impl Drop for ProbeHandle {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The probe bounds each attempt itself (connect and read each up to `--timeout-ms`); this is
/// the backstop for the whole run: worst case for the arguments plus a generous margin.
fn overall_limit(args: &[&str]) -> Duration {
    let value = |flag: &str| -> Option<u64> {
        let at = args.iter().position(|a| *a == flag)?;
        args.get(at + 1)?.parse().ok()
    };
    let timeout_ms = value("--timeout-ms").unwrap_or(1000);
    let worst_ms = match value("--duration-ms") {
        Some(duration) => duration + 2 * timeout_ms,
        None => value("--count").unwrap_or(1).saturating_mul(2 * timeout_ms),
    };
    Duration::from_millis(worst_ms.min(600_000) + 30_000)
}
