//! The typed configuration steerd acts on: Istio networking and security objects plus the
//! Kubernetes objects that define services and their endpoints. Every source (files, Kubernetes) produces a
//! [`ConfigSet`]; the compiler consumes nothing else.

pub mod duration;
pub mod interned;
pub mod istio;
pub mod k8s;
pub mod labels;
pub mod node;
pub mod secret;
pub mod security;
pub mod validate;

use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;

pub use k8s::{EndpointSlice, Pod, Service};
pub use labels::Labels;

/// Where an object came from, for error messages.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Origin {
    /// A file path, or `kube` for objects read from the API server (interned: every object
    /// of a file names it).
    pub source: interned::Interned,
    /// 1-based line of the object's document, when known.
    pub line: Option<usize>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}", self.source),
            None => f.write_str(&self.source),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Meta {
    pub name: String,
    /// Interned: a cluster's objects name a few namespaces.
    pub namespace: interned::Interned,
    pub labels: Labels,
    pub annotations: BTreeMap<String, String>,
}

impl Meta {
    /// `namespace/name`, as istioctl prints objects.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One object: its metadata, where it came from, and its typed content (the `spec` for Istio
/// kinds; the whole object for Kubernetes kinds, whose interesting fields are not all in `spec`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resource<T> {
    pub meta: Meta,
    pub origin: Origin,
    pub spec: T,
}

/// One object as every holder shares it: the source that read it, the agent's store, and the
/// configurations handed to the compiler point at one copy (objects are never changed in
/// place; a new version is a new object).
pub type Shared<T> = std::sync::Arc<Resource<T>>;

/// The kinds steerd reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Node,
    VirtualService,
    DestinationRule,
    ServiceEntry,
    WorkloadEntry,
    Gateway,
    Sidecar,
    Secret,
    AuthorizationPolicy,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Node => "Node",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::Gateway => "Gateway",
            Kind::Sidecar => "Sidecar",
            Kind::Secret => "Secret",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything the compiler needs, from every source.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ConfigSet {
    pub services: Vec<Shared<Service>>,
    pub endpoint_slices: Vec<Shared<EndpointSlice>>,
    pub pods: Vec<Shared<Pod>>,
    /// Only the topology labels (see [`node`]), for endpoint localities.
    pub nodes: Vec<Shared<node::Node>>,
    pub virtual_services: Vec<Shared<istio::VirtualService>>,
    pub destination_rules: Vec<Shared<istio::DestinationRule>>,
    pub service_entries: Vec<Shared<istio::ServiceEntry>>,
    pub workload_entries: Vec<Shared<istio::WorkloadEntry>>,
    pub gateways: Vec<Shared<istio::Gateway>>,
    pub sidecars: Vec<Shared<istio::Sidecar>>,
    /// Only what Gateway credentials need (see [`secret`]).
    pub secrets: Vec<Shared<secret::Secret>>,
    pub authorization_policies: Vec<Shared<security::AuthorizationPolicy>>,
    /// What DNS said about the names `resolution: DNS`/`DNS_ROUND_ROBIN` ServiceEntries need,
    /// by name (lower case, no trailing dot; see [`crate::compile::registry::dns_names`]).
    /// Filled by the agent's resolver (`sources::dns`), not by manifests; a name missing here
    /// has not been resolved yet.
    pub resolved: BTreeMap<String, Resolved>,
}

/// The addresses of one DNS name, as the agent's resolver last saw them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Resolved {
    /// A records, then AAAA records, each in the order the server answered.
    pub addresses: Vec<std::net::IpAddr>,
    /// Set when the last lookup did not give a usable answer: `addresses` are then the last
    /// good answer (kept while DNS fails), or empty when there never was one or the name does
    /// not exist (NXDOMAIN) or has no A/AAAA records.
    pub error: Option<String>,
}

/// One parsed object of any supported kind, shared (see [`Shared`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(Shared<Service>),
    EndpointSlice(Shared<EndpointSlice>),
    Pod(Shared<Pod>),
    Node(Shared<node::Node>),
    VirtualService(Shared<istio::VirtualService>),
    DestinationRule(Shared<istio::DestinationRule>),
    ServiceEntry(Shared<istio::ServiceEntry>),
    WorkloadEntry(Shared<istio::WorkloadEntry>),
    Gateway(Shared<istio::Gateway>),
    Sidecar(Shared<istio::Sidecar>),
    Secret(Shared<secret::Secret>),
    AuthorizationPolicy(Shared<security::AuthorizationPolicy>),
}

impl ConfigSet {
    pub fn insert(&mut self, object: Object) {
        match object {
            Object::Service(r) => self.services.push(r),
            Object::EndpointSlice(r) => self.endpoint_slices.push(r),
            Object::Pod(r) => self.pods.push(r),
            Object::Node(r) => self.nodes.push(r),
            Object::VirtualService(r) => self.virtual_services.push(r),
            Object::DestinationRule(r) => self.destination_rules.push(r),
            Object::ServiceEntry(r) => self.service_entries.push(r),
            Object::WorkloadEntry(r) => self.workload_entries.push(r),
            Object::Gateway(r) => self.gateways.push(r),
            Object::Sidecar(r) => self.sidecars.push(r),
            Object::Secret(r) => self.secrets.push(r),
            Object::AuthorizationPolicy(r) => self.authorization_policies.push(r),
        }
    }

    pub fn extend(&mut self, objects: impl IntoIterator<Item = Object>) {
        for o in objects {
            self.insert(o);
        }
    }

    /// Appends clones of every object of `other` (for merging the snapshots of several sources).
    pub fn merge_from(&mut self, other: &ConfigSet) {
        let ConfigSet {
            services,
            endpoint_slices,
            pods,
            nodes,
            virtual_services,
            destination_rules,
            service_entries,
            workload_entries,
            gateways,
            sidecars,
            secrets,
            authorization_policies,
            resolved,
        } = other;
        self.services.extend(services.iter().cloned());
        self.endpoint_slices.extend(endpoint_slices.iter().cloned());
        self.pods.extend(pods.iter().cloned());
        self.nodes.extend(nodes.iter().cloned());
        self.virtual_services
            .extend(virtual_services.iter().cloned());
        self.destination_rules
            .extend(destination_rules.iter().cloned());
        self.service_entries.extend(service_entries.iter().cloned());
        self.workload_entries
            .extend(workload_entries.iter().cloned());
        self.gateways.extend(gateways.iter().cloned());
        self.sidecars.extend(sidecars.iter().cloned());
        self.secrets.extend(secrets.iter().cloned());
        self.authorization_policies
            .extend(authorization_policies.iter().cloned());
        self.resolved
            .extend(resolved.iter().map(|(k, v)| (k.clone(), v.clone())));
    }

    /// Number of objects of all kinds (DNS answers in `resolved` are not objects).
    pub fn len(&self) -> usize {
        self.services.len()
            + self.endpoint_slices.len()
            + self.pods.len()
            + self.nodes.len()
            + self.virtual_services.len()
            + self.destination_rules.len()
            + self.service_entries.len()
            + self.workload_entries.len()
            + self.gateways.len()
            + self.sidecars.len()
            + self.secrets.len()
            + self.authorization_policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A document that could not become an object, with everything a user needs to find it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{origin}: {kind} {object}: {field}: {message}")]
pub struct ParseError {
    pub origin: Origin,
    /// The document's `kind`, or `document` when even that is unknown.
    pub kind: String,
    /// `namespace/name`, or `-` when unknown.
    pub object: String,
    /// Path of the offending field (`spec.tcp[0].route[1].weight`), or `-`.
    pub field: String,
    pub message: String,
}

/// Istio's networking API group and the versions it serves with one schema.
const ISTIO_NETWORKING_GROUP: &str = "networking.istio.io";
const ISTIO_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];
/// Istio's security API group and the versions it serves with one schema.
const ISTIO_SECURITY_GROUP: &str = "security.istio.io";
const ISTIO_SECURITY_VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// Splits a multi-document YAML text into documents with their 1-based starting line.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (idx, line) in text.lines().enumerate() {
        let is_separator = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if is_separator {
            docs.push((start, std::mem::take(&mut current)));
            start = idx + 2;
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs.push((start, current));
    docs.retain(|(_, d)| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    docs
}

/// Parses every document of one file. Documents of kinds steerd does not read (Deployments,
/// ServiceAccounts, ...) are skipped silently; Istio networking kinds it does not know yet are
/// reported. Each bad document becomes one [`ParseError`]; the rest of the file still parses.
pub fn parse_documents(source: &str, text: &str) -> (Vec<Object>, Vec<ParseError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (line, doc) in split_documents(text) {
        let origin = Origin {
            source: source.into(),
            line: Some(line),
        };
        match parse_document(&origin, &doc) {
            Ok(Some(objs)) => objects.extend(objs),
            Ok(None) => {}
            Err(e) => errors.push(*e),
        }
    }
    (objects, errors)
}

fn parse_document(origin: &Origin, doc: &str) -> Result<Option<Vec<Object>>, Box<ParseError>> {
    let value: serde_json::Value = serde_yaml::from_str(doc).map_err(|e| {
        let mut origin = origin.clone();
        let start = origin.line.unwrap_or(1);
        if let Some(loc) = e.location() {
            origin.line = Some(start + loc.line() - 1);
        }
        Box::new(ParseError {
            origin,
            kind: "document".into(),
            object: "-".into(),
            field: "-".into(),
            message: format!("invalid YAML: {}", lines_of_the_file(&e.to_string(), start)),
        })
    })?;
    parse_value(origin, &value)
}

/// serde_yaml counts the lines of its messages ("... at line 3 column 5, while parsing a
/// block mapping at line 1 column 1") from the start of the document it was given; next to a
/// `file:line` they must count from the start of the file, where the document begins at
/// `first_line`.
fn lines_of_the_file(message: &str, first_line: usize) -> String {
    const LINE: &str = "line ";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(LINE) {
        let (before, after) = rest.split_at(i + LINE.len());
        out.push_str(before);
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(n) if after[digits..].starts_with(" column ") => {
                out.push_str(&(first_line + n.saturating_sub(1)).to_string());
            }
            _ => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// Parses one object already decoded from YAML or JSON (the Kubernetes source hands over the
/// API server's JSON). `Ok(None)` for kinds steerd does not read; a `List` yields its items.
pub fn parse_value(
    origin: &Origin,
    value: &serde_json::Value,
) -> Result<Option<Vec<Object>>, Box<ParseError>> {
    let err = |kind: &str, object: &str, field: &str, message: String| {
        Box::new(ParseError {
            origin: origin.clone(),
            kind: kind.to_string(),
            object: object.to_string(),
            field: field.to_string(),
            message,
        })
    };
    let serde_json::Value::Object(map) = value else {
        if value.is_null() {
            return Ok(None);
        }
        return Err(err("document", "-", "-", "expected a mapping".into()));
    };
    let kind = map.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let api_version = map.get("apiVersion").and_then(|k| k.as_str()).unwrap_or("");
    if kind == "List" {
        let items = map.get("items").and_then(|i| i.as_array()).cloned();
        let mut out = Vec::new();
        for item in items.unwrap_or_default() {
            if let Some(objs) = parse_value(origin, &item)? {
                out.extend(objs);
            }
        }
        return Ok(Some(out));
    }
    let meta = parse_meta(map).map_err(|m| err(kind, "-", "metadata", m))?;
    let object = meta.key();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));

    let parsed = match (group, kind) {
        ("", "Service") if version == "v1" => {
            typed(value, "").map(|s| Object::Service(resource(&meta, origin, s)))
        }
        ("", "Pod") if version == "v1" => typed(value, "")
            .map(|p: Pod| Object::Pod(resource(&meta, origin, p.keep_named_ports()))),
        ("", "Node") if version == "v1" => {
            // Cluster-scoped: no namespace (parse_meta defaults one), and only the topology.
            let node = node::Node::from_labels(&meta.labels);
            let meta = Meta {
                name: meta.name.clone(),
                ..Default::default()
            };
            return Ok(Some(vec![Object::Node(std::sync::Arc::new(Resource {
                meta,
                origin: origin.clone(),
                spec: node,
            }))]));
        }
        ("", "Secret") if version == "v1" => {
            secret::parse(map).map(|s| Object::Secret(resource(&meta, origin, s)))
        }
        ("discovery.k8s.io", "EndpointSlice") if version == "v1" => {
            typed(value, "").map(|s| Object::EndpointSlice(resource(&meta, origin, s)))
        }
        (ISTIO_SECURITY_GROUP, _) => {
            if !ISTIO_SECURITY_VERSIONS.contains(&version) {
                return Err(err(
                    kind,
                    &object,
                    "apiVersion",
                    format!("unsupported version {api_version:?} (served: v1, v1beta1)"),
                ));
            }
            let spec = istio_spec(map);
            match kind {
                "AuthorizationPolicy" => typed(&spec, "spec")
                    .map(|s| Object::AuthorizationPolicy(resource(&meta, origin, s))),
                _ => {
                    return Err(err(
                        kind,
                        &object,
                        "kind",
                        format!("{ISTIO_SECURITY_GROUP} kind {kind:?} is not supported yet"),
                    ));
                }
            }
        }
        (ISTIO_NETWORKING_GROUP, _) => {
            if !ISTIO_VERSIONS.contains(&version) {
                return Err(err(
                    kind,
                    &object,
                    "apiVersion",
                    format!("unsupported version {api_version:?} (served: v1, v1beta1, v1alpha3)"),
                ));
            }
            let spec = istio_spec(map);
            match kind {
                "VirtualService" => {
                    typed(&spec, "spec").map(|s| Object::VirtualService(resource(&meta, origin, s)))
                }
                "DestinationRule" => typed(&spec, "spec")
                    .map(|s| Object::DestinationRule(resource(&meta, origin, s))),
                "ServiceEntry" => {
                    typed(&spec, "spec").map(|s| Object::ServiceEntry(resource(&meta, origin, s)))
                }
                "WorkloadEntry" => {
                    typed(&spec, "spec").map(|s| Object::WorkloadEntry(resource(&meta, origin, s)))
                }
                "Gateway" => {
                    typed(&spec, "spec").map(|s| Object::Gateway(resource(&meta, origin, s)))
                }
                "Sidecar" => {
                    typed(&spec, "spec").map(|s| Object::Sidecar(resource(&meta, origin, s)))
                }
                _ => {
                    return Err(err(
                        kind,
                        &object,
                        "kind",
                        format!("{ISTIO_NETWORKING_GROUP} kind {kind:?} is not supported yet"),
                    ));
                }
            }
        }
        _ => return Ok(None),
    };
    parsed
        .map(|o| Some(vec![o]))
        .map_err(|(field, message)| err(kind, &object, &field, message))
}

/// The `spec` of an Istio object (`{}` when absent), with null fields pruned: the API server
/// prunes them from CRDs, so `hosts: ~` is as good as absent.
fn istio_spec(map: &serde_json::Map<String, serde_json::Value>) -> serde_json::Value {
    let mut spec = map
        .get("spec")
        .cloned()
        .unwrap_or(serde_json::Value::Object(Default::default()));
    prune_nulls(&mut spec);
    spec
}

/// Removes object fields whose value is null, at every depth (list items are kept).
fn prune_nulls(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(prune_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(prune_nulls),
        _ => {}
    }
}

fn resource<T>(meta: &Meta, origin: &Origin, spec: T) -> Shared<T> {
    std::sync::Arc::new(Resource {
        meta: meta.clone(),
        origin: origin.clone(),
        spec,
    })
}

/// Deserializes with the path of the failing field (`spec.tcp[0].route`).
fn typed<T: serde::de::DeserializeOwned>(
    value: &serde_json::Value,
    prefix: &str,
) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = match (prefix.is_empty(), path.as_str()) {
            (true, ".") => "-".to_string(),
            (true, _) => path,
            (false, ".") => prefix.to_string(),
            (false, p) if p.starts_with('[') => format!("{prefix}{p}"),
            (false, p) => format!("{prefix}.{p}"),
        };
        (field, e.into_inner().to_string())
    })
}

fn parse_meta(map: &serde_json::Map<String, serde_json::Value>) -> Result<Meta, String> {
    let md = map.get("metadata").and_then(|m| m.as_object());
    let Some(md) = md else {
        return Err("missing metadata".into());
    };
    let name = md
        .get("name")
        .and_then(|n| n.as_str())
        .filter(|n| !n.is_empty())
        .ok_or("missing metadata.name")?;
    let namespace = md
        .get("namespace")
        .and_then(|n| n.as_str())
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    let strings = |key: &str| -> Result<BTreeMap<String, String>, String> {
        match md.get(key) {
            None | Some(serde_json::Value::Null) => Ok(BTreeMap::new()),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| format!("metadata.{key}: expected a map of strings: {e}")),
        }
    };
    Ok(Meta {
        name: name.to_string(),
        namespace: interned::Interned::new(namespace),
        labels: strings("labels")?.into(),
        annotations: strings("annotations")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_with_lines() {
        let text = "a: 1\n---\n# only a comment\n---\nb: 2\nc: 3\n--- \nd: 4\n";
        let docs = split_documents(text);
        assert_eq!(
            docs,
            vec![
                (1, "a: 1\n".to_string()),
                (5, "b: 2\nc: 3\n".to_string()),
                (8, "d: 4\n".to_string())
            ]
        );
    }

    #[test]
    fn parses_istio_and_k8s_kinds_and_skips_others() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 9080, name: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  tcp:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 80
"#;
        let (objs, errs) = parse_documents("x.yaml", text);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(objs.len(), 2);
        let Object::VirtualService(vs) = &objs[1] else {
            panic!("expected a VirtualService: {:?}", objs[1])
        };
        assert_eq!(vs.meta.key(), "default/reviews");
        assert_eq!(vs.origin.line, Some(13));
        assert_eq!(vs.spec.tcp[0].route[0].weight, Some(80));
    }

    #[test]
    fn type_errors_name_file_line_object_and_field() {
        let text = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: n}\nspec:\n  hosts: [r]\n  tcp:\n  - route:\n    - destination: {host: r}\n      weight: heavy\n";
        let (objs, errs) = parse_documents("bad.yaml", text);
        assert!(objs.is_empty());
        assert_eq!(errs.len(), 1);
        let e = &errs[0];
        assert_eq!(e.kind, "VirtualService");
        assert_eq!(e.object, "n/r");
        assert_eq!(e.field, "spec.tcp[0].route[0].weight");
        assert_eq!(e.origin.line, Some(1));
        assert!(
            e.to_string().starts_with(
                "bad.yaml:1: VirtualService n/r: spec.tcp[0].route[0].weight: invalid type"
            ),
            "{e}"
        );
    }

    #[test]
    fn yaml_syntax_errors_point_at_the_line() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\nkind: Service\nmetadata: [unclosed\n";
        let (objs, errs) = parse_documents("f.yaml", text);
        assert_eq!(objs.len(), 1, "the good document still parses");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].kind, "document");
        assert!(errs[0].origin.line.unwrap() >= 6, "{:?}", errs[0]);
    }

    #[test]
    fn yaml_error_messages_count_lines_from_the_start_of_the_file() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\nkind: Service\nmetadata:\n  name: b\n spec: {}\n";
        let (_, errs) = parse_documents("f.yaml", text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        let e = &errs[0];
        assert_eq!(e.origin.line, Some(8), "{e}");
        assert!(e.message.contains(" at line 8 column "), "{e}");
        assert!(!e.message.contains(" at line 4 column "), "{e}");
        assert_eq!(
            lines_of_the_file(
                "x at line 3 column 5, while parsing y at line 1 column 1",
                10
            ),
            "x at line 12 column 5, while parsing y at line 10 column 1"
        );
        // Only `line N column M` is a position.
        assert_eq!(
            lines_of_the_file("a line 3 of text; line x column 1; at line 2", 10),
            "a line 3 of text; line x column 1; at line 2"
        );
    }

    #[test]
    fn unknown_istio_version_and_kind_are_errors() {
        let (_, errs) = parse_documents(
            "f.yaml",
            "apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: a}\n---\napiVersion: networking.istio.io/v1\nkind: EnvoyFilter\nmetadata: {name: b}\n",
        );
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0].field, "apiVersion");
        assert_eq!(errs[1].field, "kind");
    }

    #[test]
    fn missing_name_is_an_error() {
        let (_, errs) = parse_documents("f.yaml", "apiVersion: v1\nkind: Service\nmetadata: {}\n");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "metadata");
    }

    #[test]
    fn kubernetes_objects_keep_only_what_steerd_reads() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels: {app: a}\n  annotations: {big: x}\n  deletionTimestamp: \"2026-01-01T00:00:00Z\"\n  uid: u-1\nspec:\n  nodeName: n-1\n  hostNetwork: true\n  containers:\n  - name: app\n    image: registry/app:1\n    env: [{name: A, value: b}]\n    ports: [{name: http, containerPort: 8080, protocol: TCP, hostPort: 80}, {containerPort: 7070}]\n  - name: sidecar\n    ports: [{name: grpc, containerPort: 9090}]\n  - name: plain\nstatus:\n  phase: Running\n  podIP: 10.0.0.1\n  podIPs: [{ip: 10.0.0.1}]\n  hostIP: 192.168.0.1\n  conditions: [{type: Ready, status: \"False\"}, {type: PodScheduled, status: \"True\"}]\n  containerStatuses: [{name: app, image: registry/app:1, imageID: x, ready: true, restartCount: 0}]\n";
        let (objs, errs) = parse_documents("f.yaml", text);
        assert!(errs.is_empty(), "{errs:?}");
        let Object::Pod(pod) = &objs[0] else {
            panic!("expected a Pod: {:?}", objs[0])
        };
        assert_eq!(pod.meta.labels["app"], "a");
        let (spec, status) = (
            pod.spec.spec.as_ref().unwrap(),
            pod.spec.status.as_ref().unwrap(),
        );
        assert!(pod.spec.metadata.deletion_timestamp.is_some());
        assert_eq!(pod.spec.metadata.uid.as_deref(), Some("u-1"));
        assert_eq!(spec.host_network, Some(true));
        assert_eq!(spec.node_name.as_deref(), Some("n-1"));
        assert_eq!(spec.containers.len(), 1);
        // The named ports of all containers, in one (unnamed ports and the rest are dropped:
        // the types do not even hold images, env or host ports).
        let container = &spec.containers[0];
        let ports: Vec<_> = container
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref(), p.container_port))
            .collect();
        assert_eq!(ports, [(Some("http"), 8080), (Some("grpc"), 9090)]);
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(status.host_ip.as_deref(), Some("192.168.0.1"));
        let conditions = status.conditions.as_ref().unwrap();
        assert_eq!(conditions.len(), 1);
        assert_eq!(
            (conditions[0].type_.as_str(), conditions[0].status.as_str()),
            ("Ready", "False")
        );
    }

    #[test]
    fn lists_are_flattened() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: p}\n";
        let (objs, errs) = parse_documents("f.yaml", text);
        assert!(errs.is_empty());
        assert_eq!(objs.len(), 2);
    }
}
