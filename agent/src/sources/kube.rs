//! The Kubernetes source (`--source kube`): watches the API server and sends a complete
//! [`Snapshot`] whenever what it serves changes.
//!
//! - Services and Pods (core/v1), EndpointSlices (`discovery.k8s.io/v1`, else `v1beta1`, else
//!   core `Endpoints`) and the `networking.istio.io` and `security.istio.io` kinds the model knows, each in the best
//!   version the server serves (found by API discovery, v1 first). Every object is watched as a
//!   [`DynamicObject`], turned into the JSON a manifest would hold and parsed with
//!   [`parse_value`]: the same typed model, and the same error messages, as `files:`.
//! - Nodes, for the topology labels localities come from, with a metadata-only watch (an
//!   `Api<PartialObjectMeta<Node>>`, what `metadata_watcher` became):
//!   a Node's status (rewritten by its kubelet every few seconds, and large) is never fetched.
//! - Nothing is sent before the initial list of every watched kind is in, so the first plan is
//!   never built from half a cluster; after that, bursts of changes are coalesced.
//! - Watch errors (the API server restarting, RBAC being fixed, ...) are retried with
//!   kube-runtime's default backoff. State only ever changes from what the server says, so an
//!   unreachable server leaves the current plan in place instead of emptying it.
//! - An object that does not parse is left out (or keeps its last good version, like a file
//!   does), is reported in the snapshot's errors, and gets a Warning Event `InvalidConfig`.
//! - Secrets only when the agent serves gateways ([`KubeSource::watch_secrets_in`]): one watcher
//!   per served Gateway's namespace (Istio reads `credentialName` there), skipping the Secret
//!   types that never hold a gateway credential. Only the credential keys of a Secret are kept
//!   (see [`crate::model::secret`]), and Secrets without any are dropped as they arrive, so the
//!   agent's memory holds the certificates it may serve and nothing else.

use super::Update;
use crate::compile::incremental::Change;
use crate::model::{Object, Origin, ParseError, parse_value};
use futures::stream::{BoxStream, SelectAll};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::Discovery;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, DefaultBackoff};
use kube::{Client, Config};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// `Origin::source` of every object read from the API server.
pub const SOURCE: &str = "kube";

/// How long to wait after a change for more changes: a `kubectl apply` of a few objects, or
/// a rollout's burst of Pod and EndpointSlice updates, becomes one snapshot and one reconcile.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Steady churn must not postpone a snapshot forever.
const MAX_DELAY: Duration = Duration::from_millis(500);
/// How often to look again for Istio kinds the server did not serve (CRDs installed later).
const REDISCOVERY: Duration = Duration::from_secs(30);
/// Events carry at most 1 kB of note.
const EVENT_NOTE_MAX: usize = 1024;

const ISTIO_GROUP: &str = "networking.istio.io";
/// Preferred first: v1 is what current Istio stores and documents.
const ISTIO_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];
const ISTIO_SECURITY_GROUP: &str = "security.istio.io";
const ISTIO_SECURITY_VERSIONS: [&str; 2] = ["v1", "v1beta1"];
/// The Istio kinds the model parses, with their group and served versions (preferred first).
const ISTIO_KINDS: [(&str, &[&str], &str); 7] = [
    (ISTIO_GROUP, &ISTIO_VERSIONS, "VirtualService"),
    (ISTIO_GROUP, &ISTIO_VERSIONS, "DestinationRule"),
    (ISTIO_GROUP, &ISTIO_VERSIONS, "ServiceEntry"),
    (ISTIO_GROUP, &ISTIO_VERSIONS, "Gateway"),
    (ISTIO_GROUP, &ISTIO_VERSIONS, "WorkloadEntry"),
    (ISTIO_GROUP, &ISTIO_VERSIONS, "Sidecar"),
    (
        ISTIO_SECURITY_GROUP,
        &ISTIO_SECURITY_VERSIONS,
        "AuthorizationPolicy",
    ),
];
const DISCOVERY_GROUP: &str = "discovery.k8s.io";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes client configuration (KUBECONFIG, ~/.kube/config or in-cluster): {0}")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("creating the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// How an object's JSON becomes something [`parse_value`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Parsed as served.
    Native,
    /// `discovery.k8s.io/v1beta1` EndpointSlice (Kubernetes < 1.21): rewritten to v1.
    EndpointSliceV1beta1,
    /// Core `Endpoints` (no EndpointSlice API at all): rewritten to v1 EndpointSlices.
    CoreEndpoints,
}

/// Secret types that never carry a gateway credential: service-account and bootstrap tokens,
/// image pull secrets and Helm releases (the largest Secrets of most clusters).
const SECRET_FIELD_SELECTOR: &str = "type!=kubernetes.io/service-account-token,type!=bootstrap.kubernetes.io/token,type!=kubernetes.io/dockerconfigjson,type!=kubernetes.io/dockercfg,type!=helm.sh/release.v1";

/// One watched resource.
#[derive(Debug, Clone)]
struct Target {
    ar: ApiResource,
    shape: Shape,
    /// Watch this namespace only (Secrets); None: all namespaces.
    namespace: Option<String>,
    field_selector: Option<&'static str>,
}

impl Target {
    fn native(ar: ApiResource) -> Target {
        Target {
            ar,
            shape: Shape::Native,
            namespace: None,
            field_selector: None,
        }
    }

    /// The Secrets of one namespace that may hold a gateway credential.
    fn secrets(namespace: &str) -> Target {
        use k8s_openapi::api::core::v1::Secret;
        Target {
            namespace: Some(namespace.to_string()),
            field_selector: Some(SECRET_FIELD_SELECTOR),
            ..Target::native(ApiResource::erase::<Secret>(&()))
        }
    }
}

/// The resources to watch given what the server serves (`group → version → resources`), and
/// the Istio kinds it does not serve.
fn select_targets(
    served: &HashMap<String, Vec<(String, Vec<ApiResource>)>>,
) -> (Vec<Target>, Vec<&'static str>) {
    use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
    let find = |group: &str, version: &str, kind: &str| -> Option<ApiResource> {
        served
            .get(group)?
            .iter()
            .find(|(v, _)| v == version)?
            .1
            .iter()
            .find(|ar| ar.kind == kind)
            .cloned()
    };
    // The core group is always there; no need to discover it.
    let mut targets = vec![
        Target::native(ApiResource::erase::<Service>(&())),
        Target::native(ApiResource::erase::<Pod>(&())),
    ];
    targets.push(
        if let Some(ar) = find(DISCOVERY_GROUP, "v1", "EndpointSlice") {
            Target::native(ar)
        } else if let Some(ar) = find(DISCOVERY_GROUP, "v1beta1", "EndpointSlice") {
            Target {
                shape: Shape::EndpointSliceV1beta1,
                ..Target::native(ar)
            }
        } else {
            Target {
                shape: Shape::CoreEndpoints,
                ..Target::native(ApiResource::erase::<Endpoints>(&()))
            }
        },
    );
    let mut missing = Vec::new();
    for (group, versions, kind) in ISTIO_KINDS {
        match versions.iter().find_map(|v| find(group, v, kind)) {
            Some(ar) => targets.push(Target::native(ar)),
            None => missing.push(kind),
        }
    }
    (targets, missing)
}

/// Asks the server which of the groups steerd reads it serves, in which versions.
async fn discover(
    client: &Client,
) -> Result<HashMap<String, Vec<(String, Vec<ApiResource>)>>, kube::Error> {
    let discovery = Discovery::new(client.clone())
        .filter(&[DISCOVERY_GROUP, ISTIO_GROUP, ISTIO_SECURITY_GROUP])
        .run()
        .await?;
    Ok(discovery
        .groups()
        .map(|g| {
            let versions = g
                .versions()
                .map(|v| {
                    let ars = g
                        .versioned_resources(v)
                        .into_iter()
                        .map(|(ar, _)| ar)
                        .collect();
                    (v.to_string(), ars)
                })
                .collect();
            (g.name().to_string(), versions)
        })
        .collect())
}

/// The JSON [`parse_value`] reads for one served object: `apiVersion`/`kind` set (list items
/// of built-in kinds come without them), `managedFields` dropped (large and never read), and
/// older API shapes rewritten to the ones the model knows.
fn to_model_json(target: &Target, obj: &DynamicObject) -> Value {
    // A DynamicObject is JSON already; serializing it cannot fail (Null would be skipped).
    let mut value = serde_json::to_value(obj).unwrap_or(Value::Null);
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), target.ar.api_version.clone().into());
        map.insert("kind".into(), target.ar.kind.clone().into());
        if let Some(md) = map.get_mut("metadata").and_then(Value::as_object_mut) {
            md.remove("managedFields");
        }
    }
    match target.shape {
        Shape::Native => value,
        Shape::EndpointSliceV1beta1 => endpoint_slice_v1beta1_to_v1(value),
        Shape::CoreEndpoints => endpoints_to_slices(&value),
    }
}

/// v1beta1 → v1 EndpointSlice: the same object except that per-endpoint `topology` became
/// `deprecatedTopology`, with the zone label promoted to `zone`.
fn endpoint_slice_v1beta1_to_v1(mut value: Value) -> Value {
    value["apiVersion"] = format!("{DISCOVERY_GROUP}/v1").into();
    if let Some(endpoints) = value.get_mut("endpoints").and_then(Value::as_array_mut) {
        for ep in endpoints.iter_mut().filter_map(Value::as_object_mut) {
            if let Some(topology) = ep.remove("topology") {
                if let Some(zone) = topology.get("topology.kubernetes.io/zone").cloned() {
                    ep.entry("zone").or_insert(zone);
                }
                ep.insert("deprecatedTopology".into(), topology);
            }
        }
    }
    value
}

/// Core `Endpoints` → a `List` of v1 EndpointSlices, one per subset and address family,
/// labelled with the service name the way the EndpointSlice mirroring controller does.
fn endpoints_to_slices(value: &Value) -> Value {
    let md = &value["metadata"];
    let name = md["name"].as_str().unwrap_or_default();
    let mut items = Vec::new();
    for (i, subset) in value["subsets"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let ports: Vec<Value> = subset["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let mut port = json!({"port": p["port"], "protocol": p.get("protocol").cloned().unwrap_or("TCP".into())});
                for key in ["name", "appProtocol"] {
                    if let Some(v) = p.get(key) {
                        port[key] = v.clone();
                    }
                }
                port
            })
            .collect();
        for (family, v6) in [("IPv4", false), ("IPv6", true)] {
            let endpoints: Vec<Value> = [("addresses", true), ("notReadyAddresses", false)]
                .into_iter()
                .flat_map(|(key, ready)| {
                    subset[key]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(move |a| (a, ready))
                })
                .filter(|(a, _)| a["ip"].as_str().is_some_and(|ip| ip.contains(':') == v6))
                .map(|(a, ready)| {
                    let mut ep = json!({"addresses": [a["ip"]], "conditions": {"ready": ready}});
                    for key in ["targetRef", "nodeName", "hostname"] {
                        if let Some(v) = a.get(key) {
                            ep[key] = v.clone();
                        }
                    }
                    ep
                })
                .collect();
            if endpoints.is_empty() {
                continue;
            }
            items.push(json!({
                "apiVersion": format!("{DISCOVERY_GROUP}/v1"),
                "kind": "EndpointSlice",
                "metadata": {
                    "name": format!("{name}-{i}-{}", family.to_ascii_lowercase()),
                    "namespace": md["namespace"],
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": family,
                "ports": ports,
                "endpoints": endpoints,
            }));
        }
    }
    json!({"kind": "List", "items": items})
}

/// An object whose current version does not parse, and what to attach the Event to.
#[derive(Debug, Clone)]
struct Invalid {
    error: ParseError,
    reference: ObjectReference,
}

/// One object's contribution to the config: its last good parse, and the error of its current
/// version if that one did not parse.
#[derive(Debug, Clone, Default)]
struct Entry {
    resource_version: Option<String>,
    objects: Vec<Object>,
    error: Option<ParseError>,
}

/// `(namespace, name)`.
type Key = (String, String);

/// The objects of one watched resource, maintained from its watcher's events.
struct KindState {
    target: Target,
    live: BTreeMap<Key, Entry>,
    /// Filled during a (re)list; replaces `live` atomically when the list is complete, so a
    /// relist after a watch error never shows a partial view.
    relist: Option<BTreeMap<Key, Entry>>,
    /// The first list has completed.
    listed: bool,
}

impl KindState {
    fn new(target: Target) -> KindState {
        KindState {
            target,
            live: BTreeMap::new(),
            relist: None,
            listed: false,
        }
    }

    /// Applies one watcher event, appending what changed in the served objects to `changes`;
    /// returns whether the visible objects (may) have changed. Objects whose new version fails
    /// to parse are appended to `invalid`.
    fn handle(
        &mut self,
        event: watcher::Event<DynamicObject>,
        invalid: &mut Vec<Invalid>,
        changes: &mut Vec<Change>,
    ) -> bool {
        match event {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(obj) => {
                let key = key_of(&obj);
                let entry = self.ingest(&obj, self.live.get(&key), invalid);
                self.relist.get_or_insert_default().insert(key, entry);
                false
            }
            watcher::Event::InitDone => {
                let relisted = self.relist.take().unwrap_or_default();
                let old = std::mem::replace(&mut self.live, relisted);
                for (key, entry) in &old {
                    let now = self
                        .live
                        .get(key)
                        .map(|e| e.objects.as_slice())
                        .unwrap_or_default();
                    if now != entry.objects.as_slice() {
                        changes.extend(entry.objects.iter().cloned().map(Change::Removed));
                    }
                }
                for (key, entry) in &self.live {
                    let before = old
                        .get(key)
                        .map(|e| e.objects.as_slice())
                        .unwrap_or_default();
                    if before != entry.objects.as_slice() {
                        changes.extend(entry.objects.iter().cloned().map(Change::Added));
                    }
                }
                self.listed = true;
                true
            }
            watcher::Event::Apply(obj) => {
                let key = key_of(&obj);
                let entry = self.ingest(&obj, self.live.get(&key), invalid);
                let old = self.live.insert(key, entry.clone());
                let old = old.map(|e| e.objects).unwrap_or_default();
                if old != entry.objects {
                    changes.extend(old.into_iter().map(Change::Removed));
                    changes.extend(entry.objects.into_iter().map(Change::Added));
                }
                true
            }
            watcher::Event::Delete(obj) => match self.live.remove(&key_of(&obj)) {
                Some(old) => {
                    changes.extend(old.objects.into_iter().map(Change::Removed));
                    true
                }
                None => false,
            },
        }
    }

    /// Parses `obj` unless `prev` already holds this very version (a relist after a watch error
    /// sees every object again; they are not re-parsed nor re-reported).
    fn ingest(
        &self,
        obj: &DynamicObject,
        prev: Option<&Entry>,
        invalid: &mut Vec<Invalid>,
    ) -> Entry {
        let resource_version = obj.metadata.resource_version.clone();
        if let Some(prev) =
            prev.filter(|p| resource_version.is_some() && p.resource_version == resource_version)
        {
            return prev.clone();
        }
        let origin = Origin {
            source: SOURCE.into(),
            line: None,
        };
        // What Istio's webhook would refuse is treated like a parse error: the API server on its
        // own (without istiod) stores it, but it must not reach the dataplane.
        let parsed = parse_value(&origin, &to_model_json(&self.target, obj)).and_then(|objects| {
            let objects = objects.unwrap_or_default();
            match super::rejected(&objects).into_iter().next() {
                Some(first) => Err(Box::new(first)),
                None => Ok(Some(objects)),
            }
        });
        match parsed {
            Ok(objects) => {
                let mut objects = objects.unwrap_or_default();
                // A Secret without any credential key is of no use to a gateway: not kept.
                objects.retain(|o| !matches!(o, Object::Secret(s) if s.spec.data.is_empty()));
                Entry {
                    resource_version,
                    objects,
                    error: None,
                }
            }
            Err(error) => {
                invalid.push(Invalid {
                    error: (*error).clone(),
                    reference: self.reference(obj),
                });
                Entry {
                    resource_version,
                    // Like a file whose new version is broken: keep serving the last good one.
                    objects: prev.map(|p| p.objects.clone()).unwrap_or_default(),
                    error: Some(*error),
                }
            }
        }
    }

    fn reference(&self, obj: &DynamicObject) -> ObjectReference {
        ObjectReference {
            api_version: Some(self.target.ar.api_version.clone()),
            kind: Some(self.target.ar.kind.clone()),
            name: obj.metadata.name.clone(),
            namespace: obj.metadata.namespace.clone(),
            uid: obj.metadata.uid.clone(),
            resource_version: obj.metadata.resource_version.clone(),
            field_path: None,
        }
    }
}

fn key_of(obj: &DynamicObject) -> Key {
    (
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone().unwrap_or_default(),
    )
}

/// Every object of the watched kinds whose current version does not parse.
fn errors(states: &[KindState]) -> Vec<ParseError> {
    states
        .iter()
        .flat_map(|s| s.live.values())
        .filter_map(|e| e.error.clone())
        .collect()
}

type EventStream =
    BoxStream<'static, (usize, Result<watcher::Event<DynamicObject>, watcher::Error>)>;

/// A connected Kubernetes source.
pub struct KubeSource {
    client: Client,
    recorder: Recorder,
    /// Namespaces whose Secrets are watched (those of the served gateways).
    secret_namespaces: Vec<String>,
}

impl KubeSource {
    /// Builds the client from `kubeconfig` if given, else from `KUBECONFIG`, `~/.kube/config`
    /// or the in-cluster service account. Nothing is sent to the server yet.
    pub async fn connect(kubeconfig: Option<&Path>) -> Result<KubeSource, KubeError> {
        let config = match kubeconfig {
            Some(path) => {
                let err = |source| KubeError::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                };
                let file = Kubeconfig::read_from(path).map_err(err)?;
                Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                    .await
                    .map_err(err)?
            }
            None => Config::infer().await.map_err(KubeError::Infer)?,
        };
        info!(server = %config.cluster_url, "Kubernetes source");
        let client = Client::try_from(config).map_err(KubeError::Client)?;
        // Events name the agent instance, so `kubectl get events` tells nodes apart.
        let mut reporter = Reporter::from("steerd");
        if let Ok(node) = std::env::var("NODE_NAME") {
            reporter.instance = Some(format!("steerd-{node}"));
        }
        let recorder = Recorder::new(client.clone(), reporter);
        Ok(KubeSource {
            client,
            recorder,
            secret_namespaces: Vec::new(),
        })
    }

    /// Also watches the Secrets of `namespaces` (the served gateways' namespaces), for
    /// `credentialName`. Without this no Secret is read at all.
    pub fn watch_secrets_in(mut self, namespaces: impl IntoIterator<Item = String>) -> Self {
        self.secret_namespaces = namespaces.into_iter().collect();
        self.secret_namespaces.sort();
        self.secret_namespaces.dedup();
        self
    }

    /// Watches until `tx` closes, sending a complete snapshot after the initial lists and after
    /// every (debounced) change.
    pub async fn watch(self, tx: mpsc::Sender<Update>) {
        let served = tokio::select! {
            served = self.discover_until_served() => served,
            _ = tx.closed() => return,
        };
        let (mut targets, mut missing) = select_targets(&served);
        targets.extend(self.secret_namespaces.iter().map(|ns| Target::secrets(ns)));
        if !missing.is_empty() {
            warn!(kinds = ?missing, "not served by the API server (Istio CRDs not installed?); looking again every {}s", REDISCOVERY.as_secs());
        }
        let mut states = Vec::new();
        let mut streams: SelectAll<EventStream> = SelectAll::new();
        for target in targets {
            self.start_watch(target, &mut states, &mut streams);
        }
        self.start_node_watch(&mut states, &mut streams);

        let mut rediscovery = tokio::time::interval_at(Instant::now() + REDISCOVERY, REDISCOVERY);
        let mut pending_since: Option<Instant> = None;
        let mut last_change = Instant::now();
        let mut pending: Vec<Change> = Vec::new();
        let mut last_errors: Option<Vec<ParseError>> = None;
        loop {
            let all_listed = states.iter().all(|s| s.listed);
            let deadline = pending_since
                .filter(|_| all_listed)
                .map(|since| (last_change + DEBOUNCE).min(since + MAX_DELAY));
            tokio::select! {
                Some((index, event)) = streams.next() => {
                    let state = &mut states[index];
                    match event {
                        Ok(event) => {
                            let mut invalid = Vec::new();
                            if state.handle(event, &mut invalid, &mut pending) {
                                last_change = Instant::now();
                                pending_since.get_or_insert(last_change);
                            }
                            for inv in invalid {
                                self.report(inv);
                            }
                        }
                        // The stream backs off before it tries again; what was seen so far stays.
                        Err(e) => warn!(kind = %state.target.ar.kind, error = %e, "watch failed; retrying, the current plan stays"),
                    }
                }
                () = sleep_until_opt(deadline) => {
                    pending_since = None;
                    let errors = errors(&states);
                    if pending.is_empty() && last_errors.as_ref() == Some(&errors) {
                        continue;
                    }
                    if last_errors.is_none() {
                        info!(objects = pending.len(), invalid = errors.len(), "initial lists complete");
                    } else {
                        debug!(changes = pending.len(), invalid = errors.len(), "cluster changed");
                    }
                    last_errors = Some(errors.clone());
                    let update = Update::Changes { changes: std::mem::take(&mut pending), errors };
                    if tx.send(update).await.is_err() {
                        return;
                    }
                }
                _ = rediscovery.tick(), if !missing.is_empty() => {
                    match discover(&self.client).await {
                        Ok(served) => {
                            let (targets, still_missing) = select_targets(&served);
                            for target in targets.into_iter().filter(|t| missing.contains(&t.ar.kind.as_str())) {
                                self.start_watch(target, &mut states, &mut streams);
                            }
                            missing = still_missing;
                        }
                        Err(e) => debug!(error = %e, "rediscovery failed"),
                    }
                }
                _ = tx.closed() => return,
            }
        }
    }

    fn start_watch(
        &self,
        target: Target,
        states: &mut Vec<KindState>,
        streams: &mut SelectAll<EventStream>,
    ) {
        info!(kind = %target.ar.kind, api_version = %target.ar.api_version, namespace = ?target.namespace, "watching");
        let index = states.len();
        let api: Api<DynamicObject> = match &target.namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &target.ar),
            None => Api::all_with(self.client.clone(), &target.ar),
        };
        // The default config lists then watches: streaming lists need Kubernetes ≥ 1.27.
        let mut config = watcher::Config::default();
        if let Some(selector) = target.field_selector {
            config = config.fields(selector);
        }
        let stream = watcher::watcher(api, config)
            .default_backoff()
            .map(move |event| (index, event));
        streams.push(boxed(stream));
        states.push(KindState::new(target));
    }

    /// Nodes, by metadata only: their labels are all steerd reads (see [`crate::model::node`]).
    fn start_node_watch(&self, states: &mut Vec<KindState>, streams: &mut SelectAll<EventStream>) {
        use k8s_openapi::api::core::v1::Node;
        use kube::core::{PartialObjectMeta, TypeMeta};
        let target = Target::native(ApiResource::erase::<Node>(&()));
        info!(
            kind = "Node",
            api_version = "v1",
            "watching (metadata only)"
        );
        let index = states.len();
        // An Api of PartialObjectMeta makes metadata-only requests.
        let api: Api<PartialObjectMeta<Node>> = Api::all(self.client.clone());
        let as_object = |m: PartialObjectMeta<Node>| DynamicObject {
            types: Some(TypeMeta {
                api_version: "v1".into(),
                kind: "Node".into(),
            }),
            metadata: m.metadata,
            data: json!({}),
        };
        let stream = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .map(move |event| {
                let event = event.map(|e| match e {
                    watcher::Event::Init => watcher::Event::Init,
                    watcher::Event::InitDone => watcher::Event::InitDone,
                    watcher::Event::InitApply(m) => watcher::Event::InitApply(as_object(m)),
                    watcher::Event::Apply(m) => watcher::Event::Apply(as_object(m)),
                    watcher::Event::Delete(m) => watcher::Event::Delete(as_object(m)),
                });
                (index, event)
            });
        streams.push(boxed(stream));
        states.push(KindState::new(target));
    }

    /// Discovery, retried with kube-runtime's default backoff until the server answers.
    async fn discover_until_served(&self) -> HashMap<String, Vec<(String, Vec<ApiResource>)>> {
        let mut backoff = DefaultBackoff::default();
        loop {
            match discover(&self.client).await {
                Ok(served) => return served,
                Err(e) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    warn!(error = %e, retry_in = ?delay, "API discovery failed");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// A Warning Event on the object. Sent in the background: the API server being slow must
    /// not hold up the plan.
    fn report(&self, invalid: Invalid) {
        let recorder = self.recorder.clone();
        let mut note = invalid.error.to_string();
        if note.len() > EVENT_NOTE_MAX {
            let mut end = EVENT_NOTE_MAX - 3;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str("...");
        }
        tokio::spawn(async move {
            let event = KubeEvent {
                type_: EventType::Warning,
                reason: "InvalidConfig".into(),
                note: Some(note),
                action: "Parse".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &invalid.reference).await {
                warn!(object = %invalid.error.object, kind = %invalid.error.kind, error = %e, "could not publish the InvalidConfig event");
            }
        });
    }
}

fn boxed<S>(stream: S) -> EventStream
where
    S: Stream<Item = (usize, Result<watcher::Event<DynamicObject>, watcher::Error>)>
        + Send
        + 'static,
{
    stream.boxed()
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Kind;

    fn ar(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
        let api_version = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version,
            kind: kind.into(),
            plural: plural.into(),
        }
    }

    fn istio(versions: &[&str], kinds: &[&str]) -> Vec<(String, Vec<ApiResource>)> {
        istio_group(ISTIO_GROUP, versions, kinds)
    }

    fn istio_group(
        group: &str,
        versions: &[&str],
        kinds: &[&str],
    ) -> Vec<(String, Vec<ApiResource>)> {
        versions
            .iter()
            .map(|v| {
                let ars = kinds
                    .iter()
                    .map(|k| ar(group, v, k, &format!("{}s", k.to_lowercase())))
                    .collect();
                (v.to_string(), ars)
            })
            .collect()
    }

    fn networking_kinds() -> Vec<&'static str> {
        ISTIO_KINDS
            .iter()
            .filter(|(g, _, _)| *g == ISTIO_GROUP)
            .map(|(_, _, k)| *k)
            .collect()
    }

    fn slices(versions: &[&str]) -> Vec<(String, Vec<ApiResource>)> {
        versions
            .iter()
            .map(|v| {
                let ars = vec![ar(DISCOVERY_GROUP, v, "EndpointSlice", "endpointslices")];
                (v.to_string(), ars)
            })
            .collect()
    }

    fn describe(targets: &[Target]) -> Vec<String> {
        targets
            .iter()
            .map(|t| format!("{} {} {:?}", t.ar.api_version, t.ar.kind, t.shape))
            .collect()
    }

    #[test]
    fn prefers_v1_and_falls_back_to_what_is_served() {
        let served = HashMap::from([
            (DISCOVERY_GROUP.to_string(), slices(&["v1", "v1beta1"])),
            (
                ISTIO_GROUP.to_string(),
                istio(&["v1", "v1beta1", "v1alpha3"], &networking_kinds()),
            ),
            (
                ISTIO_SECURITY_GROUP.to_string(),
                istio_group(
                    ISTIO_SECURITY_GROUP,
                    &["v1", "v1beta1"],
                    &["AuthorizationPolicy", "PeerAuthentication"],
                ),
            ),
        ]);
        let (targets, missing) = select_targets(&served);
        assert!(missing.is_empty());
        assert_eq!(
            describe(&targets),
            [
                "v1 Service Native",
                "v1 Pod Native",
                "discovery.k8s.io/v1 EndpointSlice Native",
                "networking.istio.io/v1 VirtualService Native",
                "networking.istio.io/v1 DestinationRule Native",
                "networking.istio.io/v1 ServiceEntry Native",
                "networking.istio.io/v1 Gateway Native",
                "networking.istio.io/v1 WorkloadEntry Native",
                "networking.istio.io/v1 Sidecar Native",
                "security.istio.io/v1 AuthorizationPolicy Native",
            ]
        );

        // Kubernetes 1.20 with an Istio that predates v1, and no WorkloadEntry CRD.
        let served = HashMap::from([
            (DISCOVERY_GROUP.to_string(), slices(&["v1beta1"])),
            (
                ISTIO_GROUP.to_string(),
                istio(
                    &["v1beta1", "v1alpha3"],
                    &[
                        "VirtualService",
                        "DestinationRule",
                        "ServiceEntry",
                        "Gateway",
                    ],
                ),
            ),
        ]);
        let (targets, missing) = select_targets(&served);
        assert_eq!(missing, ["WorkloadEntry", "Sidecar", "AuthorizationPolicy"]);
        let described = describe(&targets);
        assert_eq!(
            described[2],
            "discovery.k8s.io/v1beta1 EndpointSlice EndpointSliceV1beta1"
        );
        assert_eq!(
            described[3],
            "networking.istio.io/v1beta1 VirtualService Native"
        );

        // Nothing but the core group.
        let (targets, missing) = select_targets(&HashMap::new());
        assert_eq!(describe(&targets)[2], "v1 Endpoints CoreEndpoints");
        assert_eq!(
            missing,
            ISTIO_KINDS.iter().map(|(_, _, k)| *k).collect::<Vec<_>>()
        );
    }

    fn dynamic(target: &Target, ns: &str, name: &str, rv: &str, data: Value) -> DynamicObject {
        let mut obj = DynamicObject::new(name, &target.ar).within(ns).data(data);
        obj.metadata.resource_version = Some(rv.into());
        obj.metadata.uid = Some(format!("uid-{name}"));
        obj
    }

    fn parse(target: &Target, obj: &DynamicObject) -> Vec<Object> {
        parse_value(&Origin::default(), &to_model_json(target, obj))
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap()
    }

    #[test]
    fn v1beta1_endpoint_slices_become_v1() {
        let target = Target {
            ar: ar(
                DISCOVERY_GROUP,
                "v1beta1",
                "EndpointSlice",
                "endpointslices",
            ),
            shape: Shape::EndpointSliceV1beta1,
            namespace: None,
            field_selector: None,
        };
        let obj = dynamic(
            &target,
            "default",
            "tcp-echo-abc",
            "7",
            json!({
                "addressType": "IPv4",
                "ports": [{"name": "tcp", "port": 9000, "protocol": "TCP"}],
                "endpoints": [{
                    "addresses": ["10.244.1.2"],
                    "conditions": {"ready": true},
                    "topology": {"topology.kubernetes.io/zone": "z1", "kubernetes.io/hostname": "n1"},
                    "targetRef": {"kind": "Pod", "name": "p1", "namespace": "default"},
                }],
            }),
        );
        let Ok([Object::EndpointSlice(slice)]) = <[Object; 1]>::try_from(parse(&target, &obj))
        else {
            panic!("not one EndpointSlice");
        };
        let ep = &slice.spec.endpoints[0];
        assert_eq!(&*ep.addresses, [Box::from("10.244.1.2")]);
        assert_eq!(ep.zone.as_deref(), Some("z1"));
        assert_eq!(ep.target_ref.as_ref().unwrap().name.as_deref(), Some("p1"));
        assert_eq!(slice.spec.ports.as_ref().unwrap()[0].port, Some(9000));
    }

    #[test]
    fn core_endpoints_become_one_slice_per_subset_and_family() {
        let target = Target {
            ar: ApiResource::erase::<k8s_openapi::api::core::v1::Endpoints>(&()),
            shape: Shape::CoreEndpoints,
            namespace: None,
            field_selector: None,
        };
        let obj = dynamic(
            &target,
            "shop",
            "web",
            "1",
            json!({"subsets": [{
                "addresses": [{"ip": "10.244.1.2", "targetRef": {"kind": "Pod", "name": "web-a"}}, {"ip": "fd00::2"}],
                "notReadyAddresses": [{"ip": "10.244.1.3"}],
                "ports": [{"name": "http", "port": 8080}],
            }]}),
        );
        let slices: Vec<_> = parse(&target, &obj)
            .into_iter()
            .map(|o| match o {
                Object::EndpointSlice(s) => s,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(slices.len(), 2);
        let v4 = &slices[0];
        assert_eq!(v4.meta.namespace, "shop");
        assert_eq!(v4.meta.labels["kubernetes.io/service-name"], "web");
        assert_eq!(v4.spec.address_type, "IPv4");
        let ready: Vec<_> = v4
            .spec
            .endpoints
            .iter()
            .map(|e| (&*e.addresses[0], e.conditions.as_ref().unwrap().ready))
            .collect();
        assert_eq!(
            ready,
            [("10.244.1.2", Some(true)), ("10.244.1.3", Some(false))]
        );
        let port = &v4.spec.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.port, port.protocol.as_deref()),
            (Some("http"), Some(8080), Some("TCP"))
        );
        assert_eq!(slices[1].spec.address_type, "IPv6");
    }

    fn vs_target() -> Target {
        Target::native(ar(ISTIO_GROUP, "v1", "VirtualService", "virtualservices"))
    }

    fn vs(name: &str, rv: &str, weight: Value) -> DynamicObject {
        dynamic(
            &vs_target(),
            "default",
            name,
            rv,
            json!({"spec": {"hosts": ["tcp-echo"], "tcp": [{"route": [{"destination": {"host": "tcp-echo"}, "weight": weight}]}]}}),
        )
    }

    /// Replays `changes` onto `served` (what the agent holds from this source) and returns
    /// the VirtualServices' weights there: the changes must describe the state exactly.
    fn weights(served: &mut Vec<Object>, changes: &mut Vec<Change>) -> Vec<(String, Option<i64>)> {
        for change in changes.drain(..) {
            match change {
                Change::Removed(o) => {
                    let at = served
                        .iter()
                        .position(|s| *s == o)
                        .unwrap_or_else(|| panic!("removed an object never added: {o:?}"));
                    served.remove(at);
                }
                Change::Added(o) => served.push(o),
            }
        }
        let mut out: Vec<_> = served
            .iter()
            .filter_map(|o| match o {
                Object::VirtualService(v) => Some((
                    v.meta.name.clone(),
                    v.spec.tcp[0].route[0].weight.map(i64::from),
                )),
                _ => None,
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn secrets_keep_credential_keys_only_and_unrelated_secrets_are_dropped() {
        use watcher::Event::*;
        let target = Target::secrets("edge");
        assert_eq!(target.namespace.as_deref(), Some("edge"));
        assert!(
            target
                .field_selector
                .unwrap()
                .contains("type!=kubernetes.io/service-account-token")
        );
        let mut state = KindState::new(target.clone());
        let (mut invalid, mut changes) = (Vec::new(), Vec::new());
        let tls = dynamic(
            &target,
            "edge",
            "a-cert",
            "1",
            json!({"type": "kubernetes.io/tls", "data": {"tls.crt": "Q0VSVA==", "tls.key": "S0VZ", "extra": "eA=="}}),
        );
        let unrelated = dynamic(
            &target,
            "edge",
            "db-password",
            "2",
            json!({"type": "Opaque", "data": {"password": "eA=="}}),
        );
        state.handle(Init, &mut invalid, &mut changes);
        state.handle(InitApply(tls), &mut invalid, &mut changes);
        state.handle(InitApply(unrelated), &mut invalid, &mut changes);
        state.handle(InitDone, &mut invalid, &mut changes);
        assert!(invalid.is_empty(), "{invalid:?}");
        let secrets: Vec<_> = changes
            .iter()
            .map(|c| match c {
                Change::Added(Object::Secret(s)) => s,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(secrets.len(), 1, "only the credential Secret is kept");
        assert_eq!(secrets[0].meta.key(), "edge/a-cert");
        assert_eq!(
            secrets[0].spec.data.keys().collect::<Vec<_>>(),
            ["tls.crt", "tls.key"]
        );
        assert!(
            state.live[&("edge".into(), "db-password".into())]
                .objects
                .is_empty()
        );
    }

    #[test]
    fn relists_replace_atomically_and_invalid_objects_keep_their_last_good_version() {
        use watcher::Event::*;
        let mut state = KindState::new(vs_target());
        let mut invalid = Vec::new();
        let (mut served, mut changes) = (Vec::new(), Vec::new());
        assert!(!state.handle(Init, &mut invalid, &mut changes));
        assert!(!state.handle(
            InitApply(vs("a", "1", json!(80))),
            &mut invalid,
            &mut changes
        ));
        assert!(!state.handle(
            InitApply(vs("bad", "2", json!("heavy"))),
            &mut invalid,
            &mut changes
        ));
        assert!(!state.listed, "not listed before InitDone");
        assert!(
            weights(&mut served, &mut changes).is_empty(),
            "nothing visible mid-list"
        );
        assert!(state.handle(InitDone, &mut invalid, &mut changes));
        assert!(state.listed);
        assert_eq!(
            weights(&mut served, &mut changes),
            [("a".to_string(), Some(80))]
        );

        // The bad one is reported with kind, object, field and message, and an Event reference.
        assert_eq!(invalid.len(), 1);
        let inv = &invalid[0];
        assert_eq!(inv.error.origin.source, SOURCE);
        assert_eq!(inv.error.kind, Kind::VirtualService.as_str());
        assert_eq!(inv.error.object, "default/bad");
        assert_eq!(inv.error.field, "spec.tcp[0].route[0].weight");
        assert_eq!(inv.reference.uid.as_deref(), Some("uid-bad"));
        assert_eq!(
            inv.reference.api_version.as_deref(),
            Some("networking.istio.io/v1")
        );
        assert_eq!(errors(std::slice::from_ref(&state)).len(), 1);

        // A broken update keeps the last good version (and is reported once).
        invalid.clear();
        assert!(state.handle(
            Apply(vs("a", "3", json!("all"))),
            &mut invalid,
            &mut changes
        ));
        assert_eq!(invalid.len(), 1);
        assert_eq!(
            weights(&mut served, &mut changes),
            [("a".to_string(), Some(80))]
        );
        assert_eq!(errors(std::slice::from_ref(&state)).len(), 2);

        // A relist after a watch error (same versions) neither re-parses nor re-reports, and
        // what is seen during it stays as it was until the list is complete.
        invalid.clear();
        state.handle(Init, &mut invalid, &mut changes);
        state.handle(
            InitApply(vs("a", "3", json!("all"))),
            &mut invalid,
            &mut changes,
        );
        assert_eq!(
            weights(&mut served, &mut changes),
            [("a".to_string(), Some(80))]
        );
        state.handle(
            InitApply(vs("c", "4", json!(5))),
            &mut invalid,
            &mut changes,
        );
        state.handle(InitDone, &mut invalid, &mut changes);
        assert!(invalid.is_empty(), "{invalid:?}");
        // `bad` was not listed again: deleted while the watch was down.
        assert_eq!(
            weights(&mut served, &mut changes),
            [("a".to_string(), Some(80)), ("c".to_string(), Some(5))]
        );

        // Fixed, then deleted.
        state.handle(Apply(vs("a", "5", json!(20))), &mut invalid, &mut changes);
        assert_eq!(
            weights(&mut served, &mut changes)[0],
            ("a".to_string(), Some(20))
        );
        assert!(errors(std::slice::from_ref(&state)).is_empty());
        assert!(state.handle(Delete(vs("a", "6", json!(20))), &mut invalid, &mut changes));
        assert_eq!(
            weights(&mut served, &mut changes),
            [("c".to_string(), Some(5))]
        );
        assert!(invalid.is_empty());
    }

    #[test]
    fn model_json_has_type_meta_and_no_managed_fields() {
        let target = Target::native(ApiResource::erase::<k8s_openapi::api::core::v1::Service>(
            &(),
        ));
        let mut obj = dynamic(
            &target,
            "default",
            "web",
            "1",
            json!({"spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}),
        );
        // As listed: items of built-in kinds carry no apiVersion/kind.
        obj.types = None;
        obj.metadata.managed_fields = Some(vec![Default::default()]);
        let value = to_model_json(&target, &obj);
        assert_eq!(value["apiVersion"], "v1");
        assert_eq!(value["kind"], "Service");
        assert!(value["metadata"].get("managedFields").is_none());
        let Ok([Object::Service(svc)]) = <[Object; 1]>::try_from(parse(&target, &obj)) else {
            panic!("not one Service");
        };
        assert_eq!(svc.meta.key(), "default/web");
    }
}

/// `deploy/steerd.yaml` must be the kustomize base rendered: the same objects (comments and
/// key order aside). The base only lists plain `resources`, so rendering is concatenation.
#[cfg(test)]
mod deploy_tests {
    use std::path::Path;

    fn documents(path: &Path) -> Vec<serde_json::Value> {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_yaml::Deserializer::from_str(&text)
            .map(|doc| {
                serde::Deserialize::deserialize(doc)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            })
            .filter(|v: &serde_json::Value| !v.is_null())
            .collect()
    }

    #[test]
    fn deploy_yaml_is_the_rendered_kustomization() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let kustomization = &documents(&deploy.join("kustomization.yaml"))[0];
        let keys: Vec<&str> = kustomization
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert!(
            keys.iter()
                .all(|k| ["apiVersion", "kind", "resources"].contains(k)),
            "the kustomization uses more than resources ({keys:?}): compare with `kubectl kustomize` output instead"
        );
        let mut base: Vec<serde_json::Value> = kustomization["resources"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| documents(&deploy.join(r.as_str().unwrap())))
            .collect();
        let rendered = documents(&deploy.join("steerd.yaml"));
        assert_eq!(rendered.len(), base.len(), "object counts differ");
        for object in rendered {
            let Some(i) = base.iter().position(|b| *b == object) else {
                panic!(
                    "deploy/steerd.yaml has {} {} that differs from the base; re-render it",
                    object["kind"], object["metadata"]["name"]
                );
            };
            base.remove(i);
        }
    }
}
