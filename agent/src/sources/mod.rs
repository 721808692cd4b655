//! Configuration sources. Each sends a complete [`Snapshot`] first, then (files, Kubernetes)
//! the changes since; the agent's incremental compiler recompiles what they affect.

#[cfg(feature = "agent")]
pub mod dns;
#[cfg(feature = "agent")]
pub mod files;
#[cfg(feature = "agent")]
pub mod kube;

use crate::model::{ConfigSet, ParseError};

/// A complete view of one source's configuration.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub config: ConfigSet,
    /// Problems found while reading. Objects that failed are served from their last good
    /// version (when there was one).
    pub errors: Vec<ParseError>,
}

/// What a source sends the agent.
#[derive(Debug, Clone)]
pub enum Update {
    /// Everything the source serves now; replaces all it sent before.
    Full(Box<Snapshot>),
    /// What changed since the previous update, in order, and every problem the source has now
    /// (objects that failed are served from their last good version).
    Changes {
        changes: Vec<crate::compile::incremental::Change>,
        errors: Vec<ParseError>,
    },
}

impl Update {
    pub fn errors(&self) -> &[ParseError] {
        match self {
            Update::Full(s) => &s.errors,
            Update::Changes { errors, .. } => errors,
        }
    }
}

/// Where configuration comes from (`--source`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// `files:DIR`: every `*.yaml`/`*.yml` under DIR, watched for changes.
    Files(std::path::PathBuf),
    /// `builtin`: the example manifests compiled into the binary.
    Builtin,
    /// `kube`: the API server (in-cluster, `--kubeconfig` or `KUBECONFIG`), watched.
    Kube,
}

impl std::str::FromStr for SourceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("files", dir)) if !dir.is_empty() => Ok(Self::Files(dir.into())),
            None if s == "builtin" => Ok(Self::Builtin),
            None if s == "kube" => Ok(Self::Kube),
            _ => Err(format!(
                "unknown source {s:?}: expected files:DIR, kube or builtin"
            )),
        }
    }
}

/// The example manifests bundled with steerd (`examples/`), served by `--source builtin`.
pub const BUILTIN_MANIFESTS: &[(&str, &str)] = &[(
    "builtin:examples/tcp-echo.yaml",
    include_str!("../../../examples/tcp-echo.yaml"),
)];

/// Parses the built-in manifests.
pub fn builtin() -> Snapshot {
    let mut snap = Snapshot::default();
    for (name, text) in BUILTIN_MANIFESTS {
        let (objects, errors) = crate::model::parse_documents(name, text);
        snap.config.extend(objects);
        snap.errors.extend(errors);
    }
    snap
}

/// What Istio's admission webhook would refuse among `objects`, as errors: a source serves the
/// last good version of such objects instead of the new one, as the API server keeps the old
/// object when the webhook rejects an update.
pub fn rejected(objects: &[crate::model::Object]) -> Vec<ParseError> {
    let mut set = crate::model::ConfigSet::default();
    set.extend(objects.iter().cloned());
    crate::model::validate::validate(&set)
        .into_iter()
        .filter(|d| d.level == crate::compile::Level::Error)
        .map(|d| ParseError {
            origin: d.origin,
            kind: d.kind,
            object: d.object,
            field: d.field,
            message: d.message,
        })
        .collect()
}
