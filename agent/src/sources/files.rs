//! The file source: every `*.yaml`/`*.yml` under a directory (recursively, multi-document),
//! re-read when inotify reports a change.
//!
//! A file that fails to parse keeps contributing the objects of its last good version, the way
//! the API server keeps the old object when an update is rejected; its errors are reported with
//! every snapshot until it is fixed.

use super::Snapshot;
use crate::model::{Object, ParseError, parse_documents};
use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecursiveMode, Watcher};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Editors and `kubectl`-style writers touch a file several times per save; wait this long for
/// the burst to end before re-reading.
const DEBOUNCE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("watching {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

pub struct FileSource {
    dir: PathBuf,
    last_good: BTreeMap<PathBuf, Vec<Object>>,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    ) && !path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// An open, or a close without a write (a write still counts: it also ends in close-after-write).
fn is_read_only_access(kind: &EventKind) -> bool {
    matches!(kind, EventKind::Access(a) if *a != AccessKind::Close(AccessMode::Write))
}

fn manifests_under(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), FilesError> {
    let io = |source| FilesError::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.is_dir() {
            manifests_under(&path, out)?;
        } else if is_manifest(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads files and directories (recursively) once: for `steerd check` and `explain`.
pub fn load_paths(paths: &[PathBuf]) -> Result<Snapshot, FilesError> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            manifests_under(p, &mut files)?;
        } else {
            files.push(p.clone());
        }
    }
    let mut snapshot = Snapshot::default();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|source| FilesError::Io {
            path: path.clone(),
            source,
        })?;
        let (objects, errors) = parse_documents(&path.display().to_string(), &text);
        snapshot.config.extend(objects);
        snapshot.errors.extend(errors);
    }
    Ok(snapshot)
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            last_good: BTreeMap::new(),
        }
    }

    /// Reads the directory and returns the current snapshot.
    pub fn load(&mut self) -> Result<Snapshot, FilesError> {
        let mut files = Vec::new();
        manifests_under(&self.dir, &mut files)?;
        files.sort();
        let mut snapshot = Snapshot::default();
        let mut next_good = BTreeMap::new();
        for path in files {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                // Deleted between listing and reading: treat as gone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    snapshot.errors.push(ParseError {
                        origin: crate::model::Origin {
                            source: path.display().to_string(),
                            line: None,
                        },
                        kind: "file".into(),
                        object: "-".into(),
                        field: "-".into(),
                        message: e.to_string(),
                    });
                    if let Some(prev) = self.last_good.remove(&path) {
                        next_good.insert(path, prev);
                    }
                    continue;
                }
            };
            let (objects, mut errors) = parse_documents(&path.display().to_string(), &text);
            errors.extend(super::rejected(&objects));
            if errors.is_empty() {
                next_good.insert(path, objects);
            } else {
                snapshot.errors.extend(errors);
                if let Some(prev) = self.last_good.remove(&path) {
                    next_good.insert(path, prev);
                }
            }
        }
        self.last_good = next_good;
        for objects in self.last_good.values() {
            snapshot.config.extend(objects.iter().cloned());
        }
        Ok(snapshot)
    }

    /// Loads now and after every change, sending each snapshot to `tx`, until `tx` closes.
    pub async fn watch(mut self, tx: mpsc::Sender<Snapshot>) -> Result<(), FilesError> {
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            // Reading the manifests makes inotify report opens and closes of them; were those a
            // change, every read would trigger the next.
            if ev.as_ref().is_ok_and(|e| is_read_only_access(&e.kind)) {
                return;
            }
            let _ = ev_tx.send(ev);
        })
        .map_err(|source| FilesError::Watch {
            path: self.dir.clone(),
            source,
        })?;
        watcher
            .watch(&self.dir, RecursiveMode::Recursive)
            .map_err(|source| FilesError::Watch {
                path: self.dir.clone(),
                source,
            })?;
        loop {
            match self.load() {
                Ok(snap) => {
                    if tx.send(snap).await.is_err() {
                        return Ok(());
                    }
                }
                Err(e) => warn!(error = %e, "reading manifests failed; keeping the current plan"),
            }
            // Wait for a change, then for the burst to settle.
            match ev_rx.recv().await {
                None => return Ok(()),
                Some(Err(e)) => warn!(error = %e, "watch error"),
                Some(Ok(ev)) => debug!(?ev.kind, paths = ?ev.paths, "manifest change"),
            }
            loop {
                match tokio::time::timeout(DEBOUNCE, ev_rx.recv()).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return Ok(()),
                    Err(_) => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";

    #[test]
    fn bad_file_keeps_its_last_good_objects() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.yaml");
        std::fs::write(&f, SVC).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml: [").unwrap();
        let mut src = FileSource::new(dir.path());
        let snap = src.load().unwrap();
        assert_eq!(snap.config.services.len(), 1);
        assert!(snap.errors.is_empty());

        std::fs::write(&f, "kind: Service\nmetadata: [\n").unwrap();
        let snap = src.load().unwrap();
        assert_eq!(
            snap.config.services.len(),
            1,
            "last good version still served"
        );
        assert_eq!(snap.errors.len(), 1);
        assert!(snap.errors[0].origin.source.ends_with("a.yaml"));

        std::fs::remove_file(&f).unwrap();
        let snap = src.load().unwrap();
        assert!(snap.config.is_empty(), "a deleted file's objects go away");
    }

    #[test]
    fn objects_istio_would_reject_keep_their_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("vs.yaml");
        let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [r]\n  http:\n  - route:\n    - destination: {host: r}\n      weight: 100\n";
        std::fs::write(&f, vs).unwrap();
        let mut src = FileSource::new(dir.path());
        assert_eq!(src.load().unwrap().config.virtual_services.len(), 1);
        // Parses, but the webhook refuses a negative weight.
        std::fs::write(&f, vs.replace("weight: 100", "weight: -5")).unwrap();
        let snap = src.load().unwrap();
        assert_eq!(snap.errors.len(), 1, "{:?}", snap.errors);
        assert_eq!(snap.errors[0].field, "spec.http[0].route[0].weight");
        assert_eq!(
            snap.config.virtual_services[0].spec.http[0].route[0].weight,
            Some(100)
        );
    }

    #[test]
    fn reads_nested_directories_and_both_extensions() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(
            dir.path().join("sub/b.yml"),
            SVC.replace("name: a", "name: b"),
        )
        .unwrap();
        std::fs::write(dir.path().join("a.yaml"), SVC).unwrap();
        std::fs::write(
            dir.path().join(".hidden.yaml"),
            SVC.replace("name: a", "name: h"),
        )
        .unwrap();
        let snap = FileSource::new(dir.path()).load().unwrap();
        let names: Vec<_> = snap
            .config
            .services
            .iter()
            .map(|s| s.meta.name.as_str())
            .collect();
        assert_eq!(names, vec!["a", "b"]);
    }

    #[tokio::test]
    async fn reading_the_manifests_does_not_trigger_another_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), SVC).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(FileSource::new(dir.path()).watch(tx));
        rx.recv().await.unwrap();
        let again = tokio::time::timeout(DEBOUNCE * 5, rx.recv()).await;
        assert!(again.is_err(), "a snapshot without any change: {again:?}");
        task.abort();
    }

    #[tokio::test]
    async fn watch_sends_a_snapshot_per_change() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), SVC).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(FileSource::new(dir.path()).watch(tx));
        let first = rx.recv().await.unwrap();
        assert_eq!(first.config.services.len(), 1);
        std::fs::write(dir.path().join("b.yaml"), SVC.replace("name: a", "name: b")).unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next.config.services.len(), 2);
        drop(rx);
        task.abort();
    }
}
