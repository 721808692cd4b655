//! The file source: every `*.yaml`/`*.yml` under a directory (recursively, multi-document),
//! re-read when inotify reports a change.
//!
//! A file that fails to parse keeps contributing the objects of its last good version, the way
//! the API server keeps the old object when an update is rejected; its errors are reported with
//! every snapshot until it is fixed.

use super::{Snapshot, Update};
use crate::compile::incremental::Change;
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
    /// Each file's objects as last read without error.
    last_good: BTreeMap<PathBuf, Vec<Object>>,
    /// Each file's current problems (reading, parsing, or what Istio's webhook would refuse).
    errors: BTreeMap<PathBuf, Vec<ParseError>>,
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
            errors: BTreeMap::new(),
        }
    }

    /// Reads every manifest again: what the directory serves now.
    pub fn load(&mut self) -> Result<Snapshot, FilesError> {
        let mut files = Vec::new();
        manifests_under(&self.dir, &mut files)?;
        let mut known: std::collections::BTreeSet<PathBuf> =
            self.last_good.keys().cloned().collect();
        known.extend(self.errors.keys().cloned());
        known.extend(files);
        for path in known {
            self.reload_file(&path);
        }
        Ok(self.snapshot())
    }

    fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for objects in self.last_good.values() {
            snapshot.config.extend(objects.iter().cloned());
        }
        snapshot.errors = self.errors.values().flatten().cloned().collect();
        snapshot
    }

    /// Reads the files `paths` names (and, when an event was about something else than a
    /// manifest, e.g. a directory, every file under the directory), returning what changed.
    pub fn reload(
        &mut self,
        paths: &std::collections::BTreeSet<PathBuf>,
    ) -> Result<Vec<Change>, FilesError> {
        let mut files: std::collections::BTreeSet<PathBuf> = paths
            .iter()
            .filter(|p| is_manifest(p) && !p.is_dir())
            .cloned()
            .collect();
        if paths.is_empty() || files.len() != paths.len() {
            // Directories moved or removed, an overflowed event queue: look at everything.
            let mut listed = Vec::new();
            manifests_under(&self.dir, &mut listed)?;
            files.extend(
                listed
                    .into_iter()
                    .filter(|p| !self.last_good.contains_key(p) && !self.errors.contains_key(p)),
            );
            files.extend(
                self.last_good
                    .keys()
                    .chain(self.errors.keys())
                    .filter(|p| !p.exists())
                    .cloned(),
            );
        }
        let mut changes = Vec::new();
        for path in files {
            changes.extend(self.reload_file(&path));
        }
        Ok(changes)
    }

    /// Reads one file; returns how its objects changed. A file that does not parse or
    /// validate keeps serving its last good objects.
    fn reload_file(&mut self, path: &Path) -> Vec<Change> {
        let origin = |message: String| ParseError {
            origin: crate::model::Origin {
                source: path.display().to_string().as_str().into(),
                line: None,
            },
            kind: "file".into(),
            object: "-".into(),
            field: "-".into(),
            message,
        };
        let new = match std::fs::read_to_string(path) {
            // Deleted: its objects go.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                self.errors
                    .insert(path.to_owned(), vec![origin(e.to_string())]);
                return Vec::new();
            }
            Ok(text) => {
                let (objects, mut errors) = parse_documents(&path.display().to_string(), &text);
                errors.extend(super::rejected(&objects));
                if !errors.is_empty() {
                    self.errors.insert(path.to_owned(), errors);
                    return Vec::new();
                }
                objects
            }
        };
        self.errors.remove(path);
        let old = if new.is_empty() {
            self.last_good.remove(path).unwrap_or_default()
        } else {
            self.last_good
                .insert(path.to_owned(), new.clone())
                .unwrap_or_default()
        };
        // Unchanged objects of a changed file are not changes.
        let mut changes: Vec<Change> = old
            .iter()
            .enumerate()
            .filter(|(i, o)| new.get(*i) != Some(o) && !new.contains(o))
            .map(|(_, o)| Change::Removed(o.clone()))
            .collect();
        changes.extend(
            new.iter()
                .enumerate()
                .filter(|(i, o)| old.get(*i) != Some(o) && !old.contains(o))
                .map(|(_, o)| Change::Added(o.clone())),
        );
        changes
    }

    /// Every problem the files have now.
    pub fn errors(&self) -> Vec<ParseError> {
        self.errors.values().flatten().cloned().collect()
    }

    /// Loads now and after every change, sending each snapshot to `tx`, until `tx` closes.
    pub async fn watch(mut self, tx: mpsc::Sender<Update>) -> Result<(), FilesError> {
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
        let first = self.load()?;
        if tx.send(Update::Full(Box::new(first))).await.is_err() {
            return Ok(());
        }
        loop {
            // Wait for a change, then for the burst to settle, noting every path it names.
            let mut paths = std::collections::BTreeSet::new();
            let mut note = |ev: Option<notify::Result<notify::Event>>| match ev {
                None => false,
                Some(Err(e)) => {
                    warn!(error = %e, "watch error; reading every file again");
                    paths.insert(self.dir.clone());
                    true
                }
                Some(Ok(ev)) => {
                    debug!(?ev.kind, paths = ?ev.paths, "manifest change");
                    if ev.paths.is_empty() || ev.need_rescan() {
                        paths.insert(self.dir.clone());
                    }
                    paths.extend(ev.paths);
                    true
                }
            };
            if !note(ev_rx.recv().await) {
                return Ok(());
            }
            while let Ok(ev) = tokio::time::timeout(DEBOUNCE, ev_rx.recv()).await {
                if !note(ev) {
                    return Ok(());
                }
            }
            match self.reload(&paths) {
                Ok(changes) => {
                    let update = Update::Changes {
                        changes,
                        errors: self.errors(),
                    };
                    if tx.send(update).await.is_err() {
                        return Ok(());
                    }
                }
                Err(e) => warn!(error = %e, "reading manifests failed; keeping the current plan"),
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
        let Update::Full(first) = rx.recv().await.unwrap() else {
            panic!("the first update is complete")
        };
        assert_eq!(first.config.services.len(), 1);
        std::fs::write(dir.path().join("b.yaml"), SVC.replace("name: a", "name: b")).unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        let Update::Changes { changes, errors } = next else {
            panic!("later updates are changes")
        };
        assert!(errors.is_empty());
        assert!(
            matches!(&changes[..], [Change::Added(Object::Service(s))] if s.meta.name == "b"),
            "{changes:?}"
        );
        drop(rx);
        task.abort();
    }
}
