//! Throw-away cgroup v2 directories for test workloads.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::util::{unique_suffix, wait_until};

/// Where cgroup2 is mounted (first `cgroup2` entry of /proc/self/mounts). Panics if none is.
pub fn cgroup2_mount() -> &'static Path {
    static MOUNT: OnceLock<PathBuf> = OnceLock::new();
    MOUNT.get_or_init(|| {
        let mounts =
            std::fs::read_to_string("/proc/self/mounts").expect("reading /proc/self/mounts");
        mounts
            .lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
                (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
            })
            .expect("no cgroup2 mount in /proc/self/mounts")
    })
}

/// /proc/self/mounts writes space, tab, newline and backslash as octal escapes.
pub(crate) fn unescape_mount_path(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// `<cgroup2 mount>/steerd-test-<pid>n<k>`. On drop, every process still in it is killed, and the
/// directory is removed once it is empty.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> TestCgroup {
        let path = cgroup2_mount().join(format!("steerd-test-{}", unique_suffix()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TestCgroup { path }
    }

    /// A cgroup below this one, named `name` (e.g. like kubelet's pod cgroups). Drop it before
    /// its parent: a cgroup with children cannot be removed.
    pub fn child(&self, name: &str) -> TestCgroup {
        let path = self.path.join(name);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TestCgroup { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pids listed in `cgroup.procs` (live processes only: cgroup v2 does not list zombies).
    pub fn procs(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    pub fn contains(&self, pid: u32) -> bool {
        self.procs().contains(&(pid as i32))
    }

    /// SIGKILLs every process in the cgroup (`cgroup.kill` where the kernel has it) and waits up
    /// to `timeout` for it to be empty; returns whether it became empty.
    pub fn kill_all(&self, timeout: Duration) -> bool {
        let kill_file = self.path.join("cgroup.kill");
        if !(kill_file.exists() && std::fs::write(&kill_file, "1").is_ok()) {
            for pid in self.procs() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        wait_until(timeout, || self.procs().is_empty())
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        TestCgroup::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if !self.kill_all(Duration::from_secs(5)) {
            eprintln!(
                "steerd-e2e: cgroup {} still has processes {:?}",
                self.path.display(),
                self.procs()
            );
        }
        // The last exiting task can leave the cgroup busy for a moment after cgroup.procs is empty.
        let mut last_err = None;
        let removed = wait_until(Duration::from_secs(5), || {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(e) => {
                    last_err = Some(e);
                    false
                }
            }
        });
        if !removed {
            eprintln!(
                "steerd-e2e: removing cgroup {}: {last_err:?}",
                self.path.display()
            );
        }
    }
}
