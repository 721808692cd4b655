//! Pod cgroups: where kubelet puts each Pod's processes, found by the Pod uid in the directory
//! name, and their cgroup ids (the directory's inode number on cgroup2), which is what the
//! kernel programs see as `bpf_get_current_ancestor_cgroup_id`.
//!
//! kubelet names them `pod<uid>` with the cgroupfs driver
//! (`kubepods/burstable/pod1234abcd-...`) and `kubepods-<qos>-pod<uid with _ for ->.slice` with
//! the systemd driver (`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234abcd_....slice`).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use steerd_common::MAX_CGROUP_LEVELS;

/// One Pod's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    pub id: u64,
    pub path: PathBuf,
}

/// The Pod uid a cgroup directory name carries, if it is a pod cgroup.
pub fn pod_uid(dir_name: &str) -> Option<String> {
    let uid = if let Some(slice) = dir_name.strip_suffix(".slice") {
        // systemd: the uid is the last `-`-separated part, with `_` for `-`.
        let (_, last) = slice.rsplit_once("-pod")?;
        last.replace('_', "-")
    } else {
        dir_name.strip_prefix("pod")?.to_string()
    };
    let plausible = uid.len() >= 8
        && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        && uid.chars().any(|c| c.is_ascii_hexdigit());
    plausible.then(|| uid.to_ascii_lowercase())
}

/// Every pod cgroup under `root` (not looking deeper than the kernel program does, nor into
/// pod cgroups: containers are below them), by Pod uid. Directories that vanish or cannot be
/// read while walking are skipped: the next scan sees the tree as it is then.
pub fn scan(root: &Path) -> BTreeMap<String, PodCgroup> {
    walk(root).into_iter().collect()
}

fn walk(root: &Path) -> Vec<(String, PodCgroup)> {
    let mut found = Vec::new();
    let mut stack = vec![(root.to_path_buf(), 0u32)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if !kind.is_dir() {
                continue;
            }
            let path = entry.path();
            let name = entry.file_name();
            match pod_uid(&name.to_string_lossy()) {
                Some(uid) => {
                    if let Ok(meta) = entry.metadata() {
                        found.push((
                            uid,
                            PodCgroup {
                                id: meta.ino(),
                                path,
                            },
                        ));
                    }
                }
                None if depth + 1 < MAX_CGROUP_LEVELS => stack.push((path, depth + 1)),
                None => {}
            }
        }
    }
    found
}

/// Pod cgroups by id (for showing what the kernel map holds; a uid may show up more than once
/// when several hierarchies are below `root`).
pub fn by_id(root: &Path) -> BTreeMap<u64, (String, PathBuf)> {
    walk(root)
        .into_iter()
        .map(|(uid, c)| (c.id, (uid, c.path)))
        .collect()
}

/// Tells the agent when a pod cgroup may have appeared, sooner than its periodic scan: inotify
/// on the directories that hold pod cgroups (kubelet's QoS directories, as the last scan found
/// them) and on the scanned root. Directories that do not hold a pod cgroup yet are covered by
/// the periodic scan only.
pub struct PodCgroupWatcher {
    watcher: notify::RecommendedWatcher,
    watched: std::collections::BTreeSet<PathBuf>,
    changed: tokio::sync::mpsc::Receiver<()>,
}

impl PodCgroupWatcher {
    pub fn new() -> notify::Result<PodCgroupWatcher> {
        let (tx, changed) = tokio::sync::mpsc::channel(1);
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            // New directories only: cgroupfs reports every change of files like cgroup.events.
            if ev.is_ok_and(|e| matches!(e.kind, notify::EventKind::Create(_))) {
                // Full: a rescan is already due.
                let _ = tx.try_send(());
            }
        })?;
        Ok(PodCgroupWatcher {
            watcher,
            watched: Default::default(),
            changed,
        })
    }

    /// Watches `root` and the parents of `found` (and only those).
    pub fn follow(&mut self, root: &Path, found: &BTreeMap<String, PodCgroup>) {
        use notify::Watcher;
        let want: std::collections::BTreeSet<PathBuf> = found
            .values()
            .filter_map(|c| c.path.parent().map(Path::to_path_buf))
            .chain([root.to_path_buf()])
            .collect();
        for gone in self.watched.difference(&want) {
            let _ = self.watcher.unwatch(gone);
        }
        for dir in want.difference(&self.watched) {
            if let Err(e) = self.watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot watch a cgroup directory");
            }
        }
        self.watched = want;
    }

    /// Stops watching everything (no Sidecar policy of a workload left to enforce).
    pub fn clear(&mut self) {
        use notify::Watcher;
        for dir in std::mem::take(&mut self.watched) {
            let _ = self.watcher.unwatch(&dir);
        }
    }

    /// Resolves when a directory appeared in a watched directory.
    pub async fn changed(&mut self) {
        if self.changed.recv().await.is_none() {
            std::future::pending::<()>().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_names_give_the_pod_uid() {
        let uid = "0f4a5c3e-9b1d-4e2f-8a7b-1c2d3e4f5a6b";
        assert_eq!(pod_uid(&format!("pod{uid}")).as_deref(), Some(uid));
        assert_eq!(
            pod_uid("kubepods-burstable-pod0f4a5c3e_9b1d_4e2f_8a7b_1c2d3e4f5a6b.slice").as_deref(),
            Some(uid)
        );
        assert_eq!(
            pod_uid("kubepods-pod0f4a5c3e_9b1d_4e2f_8a7b_1c2d3e4f5a6b.slice").as_deref(),
            Some(uid)
        );
        for not_a_pod in [
            "kubepods.slice",
            "kubepods-burstable.slice",
            "burstable",
            "podman",
            "pod",
            "system.slice",
            "cri-containerd-0f4a5c3e9b1d.scope",
        ] {
            assert_eq!(pod_uid(not_a_pod), None, "{not_a_pod}");
        }
    }

    #[test]
    fn scan_finds_pod_directories_and_stops_inside_them() {
        let root = std::env::temp_dir().join(format!("steerd-cgscan-{}", std::process::id()));
        let uid = "0f4a5c3e-9b1d-4e2f-8a7b-1c2d3e4f5a6b";
        let pod = root.join("kubepods/burstable").join(format!("pod{uid}"));
        // A container cgroup named like a pod must not shadow its pod.
        std::fs::create_dir_all(pod.join("pod99999999-0000")).unwrap();
        std::fs::create_dir_all(
            root.join("system.slice/kubepods-besteffort-podaaaaaaaa_bbbb.slice"),
        )
        .unwrap();
        let found = scan(&root);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            found.keys().cloned().collect::<Vec<_>>(),
            [uid.to_string(), "aaaaaaaa-bbbb".to_string()]
        );
        assert_eq!(found[uid].path, pod);
    }
}
