//! Named network namespaces (`ip netns add`), and running code inside them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use nix::sched::CloneFlags;

use crate::util::{run_cmd, unique_suffix};

/// `ip netns add` bind-mounts /run/netns onto itself the first time; concurrent first calls race
/// on that, so all add/del calls of this process go one at a time.
static IP_NETNS_LOCK: Mutex<()> = Mutex::new(());

/// A named network namespace at `/run/netns/<name>`, with `lo` up. Deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a fresh unique name (`sdt<pid>n<k>`).
    pub fn new() -> Netns {
        Netns::with_name(&format!("sdt{}", unique_suffix()))
    }

    /// Creates a namespace with the given name. A stale namespace of the same name (left by a
    /// crashed run whose pid was reused) is replaced.
    pub fn with_name(name: &str) -> Netns {
        {
            let _guard = IP_NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            if Path::new("/run/netns").join(name).exists() {
                let _ = run_cmd("ip", &["netns", "del", name]);
            }
            run_cmd("ip", &["netns", "add", name])
                .unwrap_or_else(|e| panic!("creating netns {name}: {e:#}"));
        }
        let netns = Netns {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, usable with `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Opens the namespace file, e.g. to `setns` into it.
    pub fn open(&self) -> File {
        File::open(self.path()).unwrap_or_else(|e| panic!("opening {}: {e}", self.path().display()))
    }

    /// Runs `f` on a fresh thread that has entered this namespace and returns its result (a
    /// panic in `f` is re-raised here). Sockets created inside stay in this namespace after the
    /// thread ends, so servers can create their socket here and serve it from any thread.
    pub fn run_in<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        run_in_path(&self.path(), f)
    }

    /// Runs `ip -n <name> args...`, panicking with ip's stderr on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_cmd("ip", &full).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Sets a sysctl in this namespace. `key` is dotted (`net.ipv4.ip_forward`) or a path below
    /// /proc/sys. The file is opened by a thread inside the namespace: the kernel picks the
    /// net namespace of /proc/sys/net entries from the opening task, not from the process.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = sysctl_path(key);
        self.run_in(|| std::fs::write(&path, value))
            .unwrap_or_else(|e| {
                panic!(
                    "netns {}: writing {value} to {}: {e}",
                    self.name,
                    path.display()
                )
            });
    }

    /// Reads a sysctl in this namespace (trimmed).
    pub fn read_sysctl(&self, key: &str) -> String {
        let path = sysctl_path(key);
        self.run_in(|| std::fs::read_to_string(&path))
            .unwrap_or_else(|e| panic!("netns {}: reading {}: {e}", self.name, path.display()))
            .trim()
            .to_owned()
    }

    /// Pids of processes whose network namespace is this one.
    pub fn pids(&self) -> Vec<i32> {
        run_cmd("ip", &["netns", "pids", &self.name])
            .map(|out| {
                out.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl AsRef<Netns> for Netns {
    fn as_ref(&self) -> &Netns {
        self
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Whatever still runs in here was started by this test (the name is unique to it); it
        // would keep the namespace and its veths alive after the name is gone.
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _guard = IP_NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = run_cmd("ip", &["netns", "del", &self.name]) {
            eprintln!("steerd-e2e: deleting netns {}: {e:#}", self.name);
        }
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    if key.starts_with('/') {
        PathBuf::from(key)
    } else {
        Path::new("/proc/sys").join(key.replace('.', "/"))
    }
}

/// [`Netns::run_in`] for a namespace known only by its path (e.g. one owned elsewhere).
pub fn run_in_path<F, R>(netns_path: &Path, f: F) -> R
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let file = File::open(netns_path)
        .with_context(|| format!("opening {}", netns_path.display()))
        .unwrap_or_else(|e| panic!("{e:#}"));
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || {
            // setns(CLONE_NEWNET) only changes the calling thread, which is why this runs on a
            // thread of its own that ends right after `f`.
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns into {}: {e}", netns_path.display()));
            drop(file);
            f()
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
