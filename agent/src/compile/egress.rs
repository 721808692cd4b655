//! Istio's Sidecar `outboundTrafficPolicy` per workload.
//!
//! Istio gives every workload exactly one Sidecar: the first (by name here; by age in Istio)
//! Sidecar of its namespace whose `workloadSelector` matches its labels, else the namespace's
//! Sidecar without selector, else the selector-less Sidecar of the root namespace (the mesh
//! default, [`super::mesh_registry_only`]). The chosen Sidecar's `outboundTrafficPolicy` applies;
//! a Sidecar without one leaves the mesh config (`--outbound-traffic-policy`) in charge — not the
//! root Sidecar, as in Istio, which fills a missing policy from meshConfig.
//!
//! The kernel knows a workload by its pod cgroup, whose name carries the Pod's `metadata.uid`,
//! so the plan lists policies by uid; the dataplane finds the cgroups.

use super::ROOT_NAMESPACE;
use crate::model::istio::{OutboundTrafficPolicyMode, Sidecar};
use crate::model::{Pod, Resource};
use serde::Serialize;
use std::collections::BTreeMap;

/// How a Sidecar reaches a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Its `workloadSelector` matches the workload's labels.
    Workload,
    /// The selector-less Sidecar of the workload's namespace.
    Namespace,
    /// The selector-less Sidecar of the root namespace.
    Mesh,
}

/// The outbound policy of one Pod whose Sidecar is not the mesh default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkloadEgress {
    /// `namespace/name` of the Pod.
    pub pod: String,
    /// `namespace/name` of the Sidecar that applies.
    pub sidecar: String,
    pub scope: Scope,
    /// The Sidecar's mode; None: it sets none, the mesh config applies.
    pub registry_only: Option<bool>,
}

/// The Sidecars that may apply, in the order Istio prefers them (by namespace, then name).
pub fn ordered(sidecars: &[crate::model::Shared<Sidecar>]) -> Vec<&Resource<Sidecar>> {
    let mut out: Vec<&Resource<Sidecar>> = sidecars.iter().map(|s| &**s).collect();
    out.sort_by(|a, b| {
        (&a.meta.namespace, &a.meta.name, &a.origin).cmp(&(
            &b.meta.namespace,
            &b.meta.name,
            &b.origin,
        ))
    });
    out
}

/// The Sidecar that applies to a workload of `namespace` with `labels`, and how it applies.
/// `sidecars` as [`ordered`] returns them.
pub fn sidecar_for<'s>(
    sidecars: &[&'s Resource<Sidecar>],
    namespace: &str,
    labels: &crate::model::Labels,
) -> Option<(&'s Resource<Sidecar>, Scope)> {
    let in_namespace = || sidecars.iter().filter(|s| s.meta.namespace == namespace);
    if let Some(s) = in_namespace().find(|s| {
        s.spec
            .workload_selector
            .as_ref()
            .is_some_and(|sel| sel.labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }) {
        return Some((s, Scope::Workload));
    }
    if let Some(s) = in_namespace().find(|s| s.spec.workload_selector.is_none()) {
        let scope = if namespace == ROOT_NAMESPACE {
            Scope::Mesh
        } else {
            Scope::Namespace
        };
        return Some((s, scope));
    }
    sidecars
        .iter()
        .find(|s| s.meta.namespace == ROOT_NAMESPACE && s.spec.workload_selector.is_none())
        .map(|s| (*s, Scope::Mesh))
}

/// A Sidecar's mode: Some(true) for REGISTRY_ONLY, None when it sets none.
pub fn registry_only(sidecar: &Resource<Sidecar>) -> Option<bool> {
    let mode = sidecar.spec.outbound_traffic_policy.as_ref()?.mode?;
    Some(mode == OutboundTrafficPolicyMode::RegistryOnly)
}

/// Pods' `metadata.uid` (those without one cannot be found on the node).
pub fn pod_uid(pod: &Resource<Pod>) -> Option<&str> {
    pod.spec
        .metadata
        .uid
        .as_deref()
        .filter(|uid| !uid.is_empty())
}

/// Per Pod uid, the policy of every Pod that a workload or namespace Sidecar governs. Pods under
/// the mesh default are left out: the kernel's default covers them. When two Pods claim one uid
/// the first by `namespace/name` wins.
pub fn compile<'p>(
    pods: impl Iterator<Item = &'p Resource<Pod>>,
    sidecars: &[crate::model::Shared<Sidecar>],
) -> BTreeMap<String, WorkloadEgress> {
    let mut out: BTreeMap<String, WorkloadEgress> = BTreeMap::new();
    let sidecars = ordered(sidecars);
    // Only namespaces with a Sidecar of their own can hold a Pod that is not under the default.
    if sidecars
        .iter()
        .all(|s| s.meta.namespace == ROOT_NAMESPACE && s.spec.workload_selector.is_none())
    {
        return out;
    }
    for pod in pods {
        let Some(uid) = pod_uid(pod) else { continue };
        let Some((sidecar, scope)) = sidecar_for(&sidecars, &pod.meta.namespace, &pod.meta.labels)
        else {
            continue;
        };
        if scope == Scope::Mesh {
            continue;
        }
        let entry = WorkloadEgress {
            pod: pod.meta.key(),
            sidecar: sidecar.meta.key(),
            scope,
            registry_only: registry_only(sidecar),
        };
        match out.get(uid) {
            Some(have) if have.pod <= entry.pod => {}
            _ => {
                out.insert(uid.to_string(), entry);
            }
        }
    }
    out
}

/// The outbound policy one Pod gets, for `steerd explain --source-pod`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodOutbound {
    /// `namespace/name`.
    pub pod: String,
    pub uid: Option<String>,
    /// `namespace/name` of the Sidecar that applies, if any.
    pub sidecar: Option<String>,
    pub scope: Option<Scope>,
    /// `REGISTRY_ONLY`, `ALLOW_ANY`, or `mesh config` (`--outbound-traffic-policy`).
    pub policy: String,
}

impl std::fmt::Display for PodOutbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "outbound traffic policy of Pod {}: {}",
            self.pod, self.policy
        )?;
        match (&self.sidecar, self.scope) {
            (Some(s), Some(Scope::Workload)) => write!(f, " (Sidecar {s}, its workloadSelector)"),
            (Some(s), Some(Scope::Namespace)) => write!(f, " (Sidecar {s}, namespace default)"),
            (Some(s), _) => write!(f, " (Sidecar {s}, mesh default)"),
            (None, _) => f.write_str(" (no Sidecar)"),
        }?;
        if self.uid.is_none() && self.scope.is_some_and(|s| s != Scope::Mesh) {
            f.write_str("; the Pod has no metadata.uid, so the node cannot find its cgroup")?;
        }
        Ok(())
    }
}

/// What applies to the Pod `namespace/name` of `config`; None if there is no such Pod.
pub fn for_pod(config: &crate::model::ConfigSet, key: &str) -> Option<PodOutbound> {
    let pod = config.pods.iter().find(|p| p.meta.key() == key)?;
    let sidecars = ordered(&config.sidecars);
    let chosen = sidecar_for(&sidecars, &pod.meta.namespace, &pod.meta.labels);
    let mode = chosen.and_then(|(s, _)| registry_only(s));
    Some(PodOutbound {
        pod: key.to_string(),
        uid: pod_uid(pod).map(str::to_string),
        sidecar: chosen.map(|(s, _)| s.meta.key()),
        scope: chosen.map(|(_, scope)| scope),
        policy: match mode {
            Some(true) => "REGISTRY_ONLY",
            Some(false) => "ALLOW_ANY",
            None => "mesh config (--outbound-traffic-policy)",
        }
        .to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ConfigSet, parse_documents};

    fn config(text: &str) -> ConfigSet {
        let (objects, errors) = parse_documents("t.yaml", text);
        assert!(errors.is_empty(), "{errors:?}");
        let mut c = ConfigSet::default();
        for o in objects {
            c.insert(o);
        }
        c
    }

    fn pod(ns: &str, name: &str, uid: &str, app: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, uid: {uid}, labels: {{app: {app}}}}}\n---\n"
        )
    }

    fn sidecar(ns: &str, name: &str, selector: Option<&str>, mode: Option<&str>) -> String {
        let mut spec = String::new();
        if let Some(app) = selector {
            spec.push_str(&format!("workloadSelector: {{labels: {{app: {app}}}}}, "));
        }
        match mode {
            Some(m) => spec.push_str(&format!("outboundTrafficPolicy: {{mode: {m}}}")),
            None => spec.push_str("egress: [{hosts: [\"./*\"]}]"),
        }
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{{spec}}}\n---\n"
        )
    }

    fn policies(text: &str) -> BTreeMap<String, (String, Scope, Option<bool>)> {
        let c = config(text);
        compile(c.pods.iter().map(|p| &**p), &c.sidecars)
            .into_iter()
            .map(|(uid, w)| (uid, (w.sidecar, w.scope, w.registry_only)))
            .collect()
    }

    #[test]
    fn only_the_root_sidecar_lists_nothing() {
        let text = pod("a", "p", "u1", "web")
            + &sidecar(ROOT_NAMESPACE, "default", None, Some("REGISTRY_ONLY"));
        assert!(policies(&text).is_empty());
    }

    #[test]
    fn a_selector_sidecar_wins_over_the_namespace_one_which_wins_over_the_root() {
        let text = pod("a", "web", "u-web", "web")
            + &pod("a", "db", "u-db", "db")
            + &pod("b", "other", "u-other", "web")
            + &sidecar("a", "web-only", Some("web"), Some("REGISTRY_ONLY"))
            + &sidecar("a", "ns", None, Some("ALLOW_ANY"))
            + &sidecar(ROOT_NAMESPACE, "default", None, Some("REGISTRY_ONLY"));
        let got = policies(&text);
        assert_eq!(
            got.get("u-web"),
            Some(&("a/web-only".into(), Scope::Workload, Some(true)))
        );
        assert_eq!(
            got.get("u-db"),
            Some(&("a/ns".into(), Scope::Namespace, Some(false)))
        );
        // Namespace b has no Sidecar: the root default (not listed).
        assert_eq!(got.get("u-other"), None);
    }

    #[test]
    fn a_sidecar_without_mode_leaves_the_mesh_config_in_charge() {
        let text = pod("a", "web", "u-web", "web")
            + &sidecar("a", "hosts-only", Some("web"), None)
            + &sidecar(ROOT_NAMESPACE, "default", None, Some("REGISTRY_ONLY"));
        assert_eq!(
            policies(&text).get("u-web"),
            Some(&("a/hosts-only".into(), Scope::Workload, None))
        );
    }

    #[test]
    fn selectors_apply_in_their_namespace_only_and_first_by_name_wins() {
        let text = pod("a", "web", "u-web", "web")
            + &pod(ROOT_NAMESPACE, "gw", "u-gw", "web")
            + &sidecar("a", "b-second", Some("web"), Some("ALLOW_ANY"))
            + &sidecar("a", "a-first", Some("web"), Some("REGISTRY_ONLY"))
            + &sidecar(ROOT_NAMESPACE, "sel", Some("web"), Some("ALLOW_ANY"));
        let got = policies(&text);
        assert_eq!(
            got.get("u-web"),
            Some(&("a/a-first".into(), Scope::Workload, Some(true)))
        );
        // A selector Sidecar in the root namespace selects the root namespace's own Pods.
        assert_eq!(
            got.get("u-gw"),
            Some(&("istio-system/sel".into(), Scope::Workload, Some(false)))
        );
    }

    #[test]
    fn explain_names_the_deciding_sidecar() {
        let text = pod("a", "web", "u-web", "web")
            + &pod("b", "other", "u-other", "web")
            + &sidecar("a", "web-only", Some("web"), Some("REGISTRY_ONLY"))
            + &sidecar(ROOT_NAMESPACE, "default", None, Some("ALLOW_ANY"));
        let c = config(&text);
        assert_eq!(
            for_pod(&c, "a/web").unwrap().to_string(),
            "outbound traffic policy of Pod a/web: REGISTRY_ONLY (Sidecar a/web-only, its workloadSelector)"
        );
        assert_eq!(
            for_pod(&c, "b/other").unwrap().to_string(),
            "outbound traffic policy of Pod b/other: ALLOW_ANY (Sidecar istio-system/default, mesh default)"
        );
        assert_eq!(for_pod(&c, "b/none"), None);
    }

    #[test]
    fn pods_without_uid_are_left_out() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\n---\n"
            .to_string()
            + &sidecar("a", "ns", None, Some("REGISTRY_ONLY"));
        assert!(policies(&text).is_empty());
    }
}
