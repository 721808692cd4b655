//! Kubernetes Nodes, reduced to what locality load balancing reads: the topology labels Istio
//! derives a workload's locality from. Everything else of a Node (its status above all, which
//! kubelets rewrite every few seconds) is never read nor kept.

use serde::Serialize;

/// The Node label that holds its region.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// The Node label that holds its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Istio's Node label for a subzone (Kubernetes has none).
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
/// The deprecated labels Istio still falls back to when the GA ones are missing.
const REGION_LABEL_BETA: &str = "failure-domain.beta.kubernetes.io/region";
const ZONE_LABEL_BETA: &str = "failure-domain.beta.kubernetes.io/zone";

/// The topology of one Node (its name is the object's `metadata.name`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Node {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub region: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub zone: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub subzone: String,
}

impl Node {
    /// The topology of a Node with these labels.
    pub fn from_labels(labels: &super::Labels) -> Node {
        let get = |k: &str, beta: &str| {
            labels
                .get(k)
                .or_else(|| labels.get(beta))
                .cloned()
                .unwrap_or_default()
        };
        Node {
            region: get(REGION_LABEL, REGION_LABEL_BETA),
            zone: get(ZONE_LABEL, ZONE_LABEL_BETA),
            subzone: get(SUBZONE_LABEL, SUBZONE_LABEL),
        }
    }

    /// `region/zone/subzone` as Istio writes a Node-derived locality, without empty trailing
    /// parts; empty when the Node has no topology labels.
    pub fn locality(&self) -> String {
        let mut s = format!("{}/{}/{}", self.region, self.zone, self.subzone);
        while s.ends_with('/') {
            s.pop();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locality_from_topology_labels() {
        let labels = |pairs: &[(&str, &str)]| -> super::super::Labels {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let full = Node::from_labels(&labels(&[
            (REGION_LABEL, "us-east1"),
            (ZONE_LABEL, "us-east1-b"),
            (SUBZONE_LABEL, "rack7"),
            ("kubernetes.io/hostname", "n1"),
        ]));
        assert_eq!(full.locality(), "us-east1/us-east1-b/rack7");
        let zone = Node::from_labels(&labels(&[(REGION_LABEL, "r"), (ZONE_LABEL, "z")]));
        assert_eq!(zone.locality(), "r/z");
        let beta = Node::from_labels(&labels(&[
            ("failure-domain.beta.kubernetes.io/region", "old"),
            ("failure-domain.beta.kubernetes.io/zone", "old-a"),
            (ZONE_LABEL, "new-a"),
        ]));
        assert_eq!(beta.locality(), "old/new-a");
        // A zone without a region keeps its place.
        let no_region = Node::from_labels(&labels(&[(ZONE_LABEL, "z")]));
        assert_eq!(no_region.locality(), "/z");
        assert_eq!(Node::from_labels(&labels(&[])).locality(), "");
    }
}
