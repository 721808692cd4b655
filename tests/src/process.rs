//! Spawning processes inside a netns and/or a cgroup, and waiting for them with a bound.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::cgroup::TestCgroup;
use crate::netns::Netns;

/// Spawns `cmd` so that it is already in `cgroup` and `netns` when it execs: its very first
/// connect is steered by programs attached to the cgroup.
///
/// Both files are opened here, before the fork; between fork and exec the child only makes
/// raw `write` and `setns` syscalls (async-signal-safe, no allocation).
pub fn spawn_in(cmd: &mut Command, netns: Option<&Netns>, cgroup: Option<&TestCgroup>) -> Child {
    let netns_file: Option<File> = netns.map(Netns::open);
    let procs_file: Option<File> = cgroup.map(|cg| {
        let path = cg.path().join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
    });
    let netns_fd = netns_file.as_ref().map(AsRawFd::as_raw_fd);
    let procs_fd = procs_file.as_ref().map(AsRawFd::as_raw_fd);

    // SAFETY: the closure only calls write(2) and setns(2) on fds that stay open in the parent
    // until spawn returns (the files are dropped after it), and builds its error without
    // allocating.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = procs_fd {
                // "0" means the writing task: the child moves itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = netns_fd
                && libc::setns(fd, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "spawning {:?} (netns {:?}, cgroup {:?}): {e}",
            cmd,
            netns.map(Netns::name),
            cgroup.map(TestCgroup::path)
        )
    });
    drop((netns_file, procs_file));
    child
}

/// Owns a child process: SIGKILLs and reaps it on drop.
#[derive(Debug)]
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard(Some(child))
    }

    pub fn id(&self) -> u32 {
        self.child().id()
    }

    pub fn child(&self) -> &Child {
        self.0.as_ref().expect("child already taken")
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("child already taken")
    }

    /// Hands the child back; the guard no longer kills it.
    pub fn into_inner(mut self) -> Child {
        self.0.take().expect("child already taken")
    }

    /// SIGKILL (if still running) and reap.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let child = self.0.as_mut()?;
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits for `child` for at most `timeout`, collecting piped stdout/stderr (set
/// `Stdio::piped()` to capture them). On timeout the child is SIGKILLed and reaped, and the
/// error carries what it had printed.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> anyhow::Result<Output> {
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait()? {
            break (status, false);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break (child.wait()?, true);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let output = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if timed_out {
        bail!(
            "pid {} still running after {timeout:?}, killed ({}); stdout: {}; stderr: {}",
            child.id(),
            describe_status(output.status),
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// "exit 3" / "signal 9" rather than ExitStatus's platform text.
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => format!("{status}"),
    }
}
