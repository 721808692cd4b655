//! The Kubernetes objects steerd keeps, as steerd's own types: the subset of the fields of
//! `core/v1` Service and Pod and `discovery.k8s.io/v1` EndpointSlice that steerd reads, under
//! the same names and shapes as the API's (and `k8s_openapi`'s), so code reads them the same
//! way. The agent holds every Service, EndpointSlice and Pod of the cluster: `k8s_openapi`'s
//! structs carry every field inline (a `Pod` is 2.3 KB before any of its strings, a `Container`
//! over 2 KB), so parsing straight into these keeps a cluster's objects several times smaller.
//! Unknown fields are ignored; required fields stay required, with serde's `missing field`
//! errors.

use super::interned::Interned;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Deserializer, Serialize};

/// An optional object field that must be a mapping (or null). Serde's derived structs also
/// accept a sequence of their fields in order, so `spec: []` would parse as an empty spec;
/// the API server (and `k8s_openapi`) reject it, and so does steerd.
fn mapping<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Mapping<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Mapping<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a mapping")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }
    d.deserialize_any(Mapping(std::marker::PhantomData))
}

/// A Service: its `spec` (the object's metadata is in [`super::Meta`]; the status is unused).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Service {
    #[serde(default, deserialize_with = "mapping")]
    pub spec: Option<ServiceSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(rename = "type", default)]
    pub type_: Option<String>,
    #[serde(rename = "clusterIP", default)]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs", default)]
    pub cluster_ips: Option<Vec<String>>,
    #[serde(default)]
    pub ports: Option<Vec<ServicePort>>,
    #[serde(default)]
    pub selector: Option<super::Labels>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: i32,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// An EndpointSlice: address type, ports and endpoints (metadata in [`super::Meta`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub address_type: String,
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub ports: Option<Vec<EndpointPort>>,
}

/// One endpoint: its addresses, readiness, Pod reference and where it runs (not the
/// deprecated topology map, hints or deprecated fields).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Boxed slices and strings, not `Vec`s and `String`s: a cluster has tens of thousands of
    /// endpoints, and they never change once read.
    pub addresses: Box<[Box<str>]>,
    #[serde(default, deserialize_with = "mapping")]
    pub conditions: Option<EndpointConditions>,
    #[serde(default)]
    pub hostname: Option<Box<str>>,
    #[serde(default)]
    pub node_name: Option<Interned>,
    #[serde(default)]
    pub zone: Option<Interned>,
    #[serde(default, deserialize_with = "mapping")]
    pub target_ref: Option<ObjectReference>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointConditions {
    #[serde(default)]
    pub ready: Option<bool>,
    #[serde(default)]
    pub serving: Option<bool>,
    #[serde(default)]
    pub terminating: Option<bool>,
}

/// The kind, name and namespace of what an endpoint is (a Pod, usually).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectReference {
    #[serde(default)]
    pub kind: Option<Interned>,
    #[serde(default)]
    pub name: Option<Box<str>>,
    #[serde(default)]
    pub namespace: Option<Interned>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<i32>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// A Pod: its deletion mark and uid; host network, Node and the containers' named ports; phase,
/// Ready condition, Pod and host IPs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: PodMetadata,
    #[serde(default, deserialize_with = "mapping")]
    pub spec: Option<PodSpec>,
    #[serde(default, deserialize_with = "mapping")]
    pub status: Option<PodStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMetadata {
    /// Only whether it is set matters: a Pod being deleted is no endpoint.
    #[serde(default)]
    pub deletion_timestamp: Option<String>,
    /// Names the Pod's cgroup on the node (per-workload Sidecar policy).
    #[serde(default)]
    pub uid: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub host_network: Option<bool>,
    /// The Node whose topology labels are the Pod's locality.
    #[serde(default)]
    pub node_name: Option<String>,
    /// After parsing, at most one container holding the named ports of all containers, in
    /// order (see [`Pod::keep_named_ports`]): a Service's `targetPort` names a container port,
    /// and unnamed ports are never looked up.
    #[serde(default)]
    pub containers: Vec<Container>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Container {
    #[serde(default)]
    pub ports: Option<Vec<ContainerPort>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: i32,
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default)]
    pub phase: Option<String>,
    /// After parsing, only the `Ready` condition.
    #[serde(default)]
    pub conditions: Option<Vec<PodCondition>>,
    #[serde(rename = "podIP", default)]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs", default)]
    pub pod_ips: Option<Vec<PodIP>>,
    #[serde(rename = "hostIP", default)]
    pub host_ip: Option<String>,
    #[serde(rename = "hostIPs", default)]
    pub host_ips: Option<Vec<HostIP>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PodCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PodIP {
    pub ip: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostIP {
    pub ip: String,
}

impl Pod {
    /// Drops what parsing kept but steerd never reads: unnamed container ports (all named
    /// ones go into one container) and every condition but `Ready`.
    pub(super) fn keep_named_ports(mut self) -> Self {
        if let Some(spec) = &mut self.spec {
            let named: Vec<ContainerPort> = std::mem::take(&mut spec.containers)
                .into_iter()
                .flat_map(|c| c.ports.unwrap_or_default())
                .filter(|p| p.name.is_some())
                .collect();
            if !named.is_empty() {
                spec.containers = vec![Container { ports: Some(named) }];
            }
        }
        if let Some(conditions) = self.status.as_mut().and_then(|s| s.conditions.as_mut()) {
            conditions.retain(|c| c.type_ == "Ready");
        }
        self
    }
}
