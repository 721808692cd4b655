//! Running the steerd agent binary (package `steerd`) and its one-shot CLI, and throw-away
//! bpffs directories for it to pin into.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::netns::{Netns, run_in_path};
use crate::process::{describe_status, spawn_in, wait_with_timeout};
use crate::util::unique_suffix;

/// Bound for one-shot CLI calls (`maps`, `cleanup`).
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound for building the agent (it also compiles the eBPF object).
const BUILD_TIMEOUT: Duration = Duration::from_secs(1500);

static STEERD_BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The steerd binary: `$STEERD_BIN` if set, else built once per process with
/// `$CARGO build -p steerd` in this workspace. Panics with cargo's output if the build fails.
pub fn steerd_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("STEERD_BIN") {
        return path.into();
    }
    STEERD_BIN
        .get_or_init(|| build_steerd().map_err(|e| format!("{e:#}")))
        .clone()
        .unwrap_or_else(|e| panic!("building steerd: {e}"))
}

/// The steerd binary if it is already at hand (no build is started): for cleanup paths.
fn steerd_bin_if_present() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("STEERD_BIN") {
        return Some(path.into());
    }
    if let Some(built) = STEERD_BIN.get() {
        return built.clone().ok();
    }
    Some(target_dir().join("debug/steerd")).filter(|p| p.is_file())
}

/// The workspace this test runs from. `cargo test` sets `CARGO_MANIFEST_DIR` for the test
/// process; the compile-time value is only a fallback, because this library's build can be
/// shared by another checkout of the same workspace using the same target directory (cargo
/// fingerprints workspace members by relative path), and would then build that checkout's agent.
fn workspace_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// `$CARGO_TARGET_DIR` (relative to the workspace root if relative), else `<workspace>/target`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

fn build_steerd() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    // `cargo test` gives this process the test crate's CARGO_PKG_*/CARGO_MANIFEST_* variables.
    // Build scripts (ring's, aya-build's) watch some of them, so passing them on would rebuild
    // every dependency next to the fresh build `cargo xtask test` already made.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO_PKG_") || key.starts_with("CARGO_MANIFEST_"))
            || matches!(
                &*key,
                "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "OUT_DIR"
            )
        {
            cmd.env_remove(&*key);
        }
    }
    cmd.args([
        "build",
        "-p",
        "steerd",
        "--bin",
        "steerd",
        "--message-format=json-render-diagnostics",
    ])
    .current_dir(workspace_root())
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = cmd.spawn().with_context(|| format!("spawning {cargo:?}"))?;
    let output = wait_with_timeout(child, BUILD_TIMEOUT)?;
    if !output.status.success() {
        bail!(
            "`cargo build -p steerd` failed ({}):\n{}",
            describe_status(output.status),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Cargo reports where it put the executable; that covers target-dir settings in config
    // files too. The computed path is only a fallback.
    let reported = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "steerd")
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from));
    let bin = reported.unwrap_or_else(|| target_dir().join("debug/steerd"));
    if !bin.is_file() {
        bail!(
            "cargo build -p steerd succeeded but {} does not exist",
            bin.display()
        );
    }
    Ok(bin)
}

/// A running steerd process in a node netns (in no test cgroup unless spawned with
/// [`Agent::spawn_in_cgroup`]), logging to a file.
/// Dropping it SIGKILLs and reaps it; if the test is panicking, the log is printed.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    netns_path: PathBuf,
    log_path: PathBuf,
    /// The `--state-dir` given to `run` when the caller passed none (each agent its own, so
    /// concurrent tests never share saved DNS answers).
    _state_dir: Option<crate::util::TempDir>,
}

impl Agent {
    /// Starts `steerd args...` (e.g. `["run", "--source", "files:DIR", ...]`) in `node`'s netns.
    pub fn spawn(node: &impl AsRef<Netns>, args: &[&str]) -> Agent {
        Agent::spawn_bin(&steerd_bin(), node, args)
    }

    /// [`Agent::spawn`] with an explicit binary.
    pub fn spawn_bin(bin: &Path, node: &impl AsRef<Netns>, args: &[&str]) -> Agent {
        Agent::spawn_bin_in(bin, node, None, args)
    }

    /// [`Agent::spawn`] inside `cgroup` from its start, as on a node where the agent runs
    /// below the cgroup its programs steer (e.g. a child of the steered test cgroup).
    pub fn spawn_in_cgroup(
        node: &impl AsRef<Netns>,
        cgroup: &crate::TestCgroup,
        args: &[&str],
    ) -> Agent {
        Agent::spawn_bin_in(&steerd_bin(), node, Some(cgroup), args)
    }

    /// [`Agent::spawn_bin`] inside `cgroup` (if any) from its start.
    pub fn spawn_bin_in(
        bin: &Path,
        node: &impl AsRef<Netns>,
        cgroup: Option<&crate::TestCgroup>,
        args: &[&str],
    ) -> Agent {
        let netns = node.as_ref();
        let log_path =
            std::env::temp_dir().join(format!("steerd-e2e-agent-{}.log", unique_suffix()));
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log_path.display()));
        let log_err = log.try_clone().expect("cloning log file handle");
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let state_dir = (args.first() == Some(&"run") && !args.contains(&"--state-dir"))
            .then(|| crate::util::TempDir::new("steerd-e2e-state"));
        if let Some(dir) = &state_dir {
            cmd.args(["--state-dir", dir.as_str()]);
        }
        let child = spawn_in(&mut cmd, Some(netns), cgroup);
        Agent {
            child: Some(child),
            netns_path: netns.path(),
            log_path,
            _state_dir: state_dir,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the agent has written to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `None` while running; the exit status once it has exited (or been killed).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Polls `GET /readyz` on `admin` (from inside the node netns) until it answers 200. Panics
    /// with the agent's log if that does not happen within `timeout` or the agent exits.
    pub fn wait_ready(&mut self, admin: SocketAddr, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("not polled yet");
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait() {
                panic!(
                    "steerd exited ({}) before becoming ready; log {}:\n{}",
                    describe_status(status),
                    self.log_path.display(),
                    self.log()
                );
            }
            match http_get_status(&self.netns_path, admin, "/readyz") {
                Ok(200) => return,
                Ok(code) => last = format!("HTTP {code}"),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "steerd not ready on {admin} after {timeout:?} (last: {last}); log {}:\n{}",
            self.log_path.display(),
            self.log()
        );
    }

    /// SIGKILL and reap: an agent crash. What it pinned and attached stays behind.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// SIGTERM, then wait up to `timeout` (SIGKILL after that). Returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Runs a one-shot `steerd args...` (e.g. `maps services -o json --bpffs P`) in `node`'s
    /// netns and returns its output, whatever the exit status. Bounded by 60 s.
    pub fn run_cli(node: &impl AsRef<Netns>, args: &[&str]) -> Output {
        run_steerd_cli(&steerd_bin(), Some(node.as_ref()), args)
    }

    /// [`Agent::run_cli`], requiring success and parsing stdout as JSON.
    pub fn run_cli_json(node: &impl AsRef<Netns>, args: &[&str]) -> serde_json::Value {
        let output = Agent::run_cli(node, args);
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            panic!(
                "steerd {} failed ({}): {}{}",
                args.join(" "),
                describe_status(output.status),
                stdout,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "steerd {}: stdout is not JSON ({e}): {stdout}",
                args.join(" ")
            )
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- steerd log {} ---\n{}--- end of steerd log ---",
                self.log_path.display(),
                self.log()
            );
        } else {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

fn run_steerd_cli(bin: &Path, netns: Option<&Netns>, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = spawn_in(&mut cmd, netns, None);
    wait_with_timeout(child, CLI_TIMEOUT)
        .unwrap_or_else(|e| panic!("steerd {}: {e:#}", args.join(" ")))
}

/// Status code of `GET path` on `addr`, over a connection made inside the netns at `netns_path`.
pub fn http_get_status(netns_path: &Path, addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let response = run_in_path(netns_path, || -> anyhow::Result<String> {
        let timeout = Duration::from_millis(500);
        let mut stream = TcpStream::connect_timeout(&addr, timeout).context("connect")?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        // One write: `write!` on an unbuffered stream sends every formatted piece as a segment
        // of its own, and a minimal server that reads once would see half a request.
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes())?;
        // The status line is all that is needed; don't wait for the body.
        let mut buf = [0u8; 64];
        let mut len = 0;
        while len < buf.len() && !buf[..len].contains(&b'\n') {
            let n = stream.read(&mut buf[len..]).context("read")?;
            if n == 0 {
                break;
            }
            len += n;
        }
        Ok(String::from_utf8_lossy(&buf[..len]).into_owned())
    })?;
    // "HTTP/1.1 200 OK"
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP response: {response:?}"))
}

/// A unique directory `/sys/fs/bpf/steerd-test-<pid>n<k>` (bpffs is mounted at /sys/fs/bpf first
/// if it is not). On drop, `steerd cleanup --bpffs <dir>` runs if the steerd binary is at hand
/// (it detaches and unpins what the agent left there), then the directory is removed. Declare
/// it before the [`Agent`] using it, so that the agent is dropped (killed) first.
#[derive(Debug)]
pub struct BpffsDir {
    path: PathBuf,
}

/// Where bpffs is expected.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

impl BpffsDir {
    pub fn new() -> BpffsDir {
        ensure_bpffs_mounted();
        let path = Path::new(BPFFS_MOUNT).join(format!("steerd-test-{}", unique_suffix()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        BpffsDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as a `&str`, for command lines.
    pub fn as_str(&self) -> &str {
        self.path.to_str().expect("bpffs path is UTF-8")
    }
}

impl Default for BpffsDir {
    fn default() -> Self {
        BpffsDir::new()
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        if let Some(bin) = steerd_bin_if_present() {
            let output = run_steerd_cli(&bin, None, &["cleanup", "--bpffs", self.as_str()]);
            if !output.status.success() {
                eprintln!(
                    "steerd-e2e: steerd cleanup --bpffs {} failed ({}): {}",
                    self.path.display(),
                    describe_status(output.status),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("steerd-e2e: removing {}: {e}", self.path.display());
        }
    }
}

/// Mounts bpffs at /sys/fs/bpf unless a bpf filesystem is already mounted there.
pub fn ensure_bpffs_mounted() {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("reading /proc/self/mounts");
    let mounted = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 2
            && crate::cgroup::unescape_mount_path(fields[1]) == BPFFS_MOUNT
            && fields[2] == "bpf"
    });
    if !mounted {
        std::fs::create_dir_all(BPFFS_MOUNT).expect("creating /sys/fs/bpf");
        nix::mount::mount(
            Some("bpf"),
            BPFFS_MOUNT,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mounting bpffs at {BPFFS_MOUNT}: {e}"));
    }
}

/// GET `path` from the agent's admin listener ([`crate::admin_addr`], inside `node`'s netns);
/// the response body.
pub fn admin_get(node: &impl AsRef<Netns>, path: &str) -> String {
    node.as_ref().run_in(|| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(crate::admin_addr()).expect("admin listener");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .expect("writing to the admin listener");
        let mut out = String::new();
        s.read_to_string(&mut out)
            .expect("reading from the admin listener");
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    })
}

/// Sum of the samples of metric `name` (exactly that name, with or without labels) in a
/// `/metrics` text whose labels include every `(label, value)` of `labels`.
pub fn metric_sum(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
