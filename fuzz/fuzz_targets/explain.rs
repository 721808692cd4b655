//! `steerd explain` over Istio's sample sets with an arbitrary request (host, port, path,
//! method, headers, query, source labels, gateway), optionally after adding one arbitrary
//! object built from the schema's field names: explain never panics, and whatever it says
//! renders as text and JSON.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::OnceLock;
use steerd::compile::explain::{Query, explain, render_text};
use steerd::model::{ConfigSet, Origin, parse_value};

#[derive(Debug, Arbitrary)]
enum Pick {
    /// One of the configuration's hosts (by index).
    Known(u8),
    Any(String),
}

#[derive(Debug, Arbitrary)]
struct Input {
    set: u8,
    host: Pick,
    port: Option<u16>,
    path: Option<String>,
    method: Option<String>,
    headers: Vec<(String, String)>,
    query: Vec<(String, String)>,
    source_labels: Vec<(String, String)>,
    gateway: Option<Pick>,
    namespace: Option<String>,
    /// The client: an address (authorization looks up its Pod) and/or a namespace.
    source_ip: Option<[u8; 4]>,
    source_namespace: Option<String>,
    extra: Option<Extra>,
}

/// One more object: a kind, a name, and a `spec` tree whose keys come from the schema.
#[derive(Debug)]
struct Extra {
    kind: &'static str,
    name: &'static str,
    spec: Value,
}

const KINDS: &[&str] = &[
    "VirtualService",
    "DestinationRule",
    "ServiceEntry",
    "Gateway",
    "Sidecar",
    "WorkloadEntry",
];
const NAMES: &[&str] = &[
    "reviews",
    "ratings",
    "productpage",
    "tcp-echo",
    "httpbin",
    "x",
];
/// Field names of the Istio networking schema, by the key of the object that holds them (the
/// kind for `spec`), so that random objects are often valid enough to reach the compiler.
fn children(parent: &str) -> &'static [&'static str] {
    match parent {
        "VirtualService" => &["hosts", "gateways", "http", "tcp", "tls", "exportTo"],
        "DestinationRule" => &[
            "host",
            "trafficPolicy",
            "subsets",
            "exportTo",
            "workloadSelector",
        ],
        "ServiceEntry" => &[
            "hosts",
            "addresses",
            "ports",
            "location",
            "resolution",
            "endpoints",
            "workloadSelector",
            "exportTo",
        ],
        "Gateway" => &["servers", "selector"],
        "Sidecar" => &[
            "egress",
            "outboundTrafficPolicy",
            "workloadSelector",
            "ingress",
        ],
        "WorkloadEntry" => &[
            "address", "ports", "labels", "weight", "network", "locality",
        ],
        // Also the `http` of connectionPool.
        "http" => &[
            "http1MaxPendingRequests",
            "http2MaxRequests",
            "maxRequestsPerConnection",
            "idleTimeout",
            "h2UpgradePolicy",
            "name",
            "match",
            "route",
            "redirect",
            "directResponse",
            "delegate",
            "rewrite",
            "timeout",
            "retries",
            "fault",
            "mirror",
            "mirrors",
            "mirrorPercentage",
            "mirrorPercent",
            "corsPolicy",
            "headers",
        ],
        "match" => &[
            "name",
            "uri",
            "scheme",
            "method",
            "authority",
            "headers",
            "port",
            "sourceLabels",
            "gateways",
            "queryParams",
            "ignoreUriCase",
            "withoutHeaders",
            "sourceNamespace",
            "sniHosts",
            "destinationSubnets",
        ],
        "uri" | "scheme" | "method" | "authority" | "x-user" | "end-user" => {
            &["exact", "prefix", "regex"]
        }
        "headers" | "queryParams" | "withoutHeaders" => {
            &["x-user", "end-user", "request", "response"]
        }
        "request" | "response" => &["set", "add", "remove"],
        "route" => &["destination", "weight", "headers"],
        "destination" | "mirror" => &["host", "subset", "port"],
        "port" => &["number", "name", "protocol", "targetPort"],
        "redirect" => &[
            "uri",
            "authority",
            "port",
            "derivePort",
            "scheme",
            "redirectCode",
        ],
        "directResponse" => &["status", "body"],
        "body" => &["string", "bytes"],
        "rewrite" => &["uri", "authority", "uriRegexRewrite"],
        "uriRegexRewrite" => &["match", "rewrite"],
        "retries" => &["attempts", "perTryTimeout", "retryOn"],
        "fault" => &["delay", "abort"],
        "delay" => &["fixedDelay", "percentage", "percent"],
        "abort" => &["httpStatus", "percentage", "grpcStatus"],
        "percentage" | "mirrorPercentage" => &["value"],
        "mirrors" => &["destination", "percentage"],
        // Also the `tcp` of connectionPool.
        "tcp" => &["match", "route", "maxConnections", "connectTimeout"],
        "tls" => &["match", "route", "mode", "credentialName", "httpsRedirect"],
        "trafficPolicy" | "portLevelSettings" => &[
            "loadBalancer",
            "connectionPool",
            "outlierDetection",
            "portLevelSettings",
            "port",
            "tls",
        ],
        "subsets" => &["name", "labels", "trafficPolicy"],
        "loadBalancer" => &["simple", "consistentHash"],
        "consistentHash" => &[
            "httpHeaderName",
            "httpCookie",
            "useSourceIp",
            "httpQueryParameterName",
        ],
        "httpCookie" => &["name", "path", "ttl"],
        "connectionPool" => &["tcp", "http"],
        "outlierDetection" => &[
            "consecutive5xxErrors",
            "consecutiveGatewayErrors",
            "interval",
            "baseEjectionTime",
            "maxEjectionPercent",
        ],
        "ports" => &["number", "protocol", "name", "targetPort"],
        "endpoints" => &["address", "ports", "labels", "weight"],
        "servers" => &["port", "hosts", "tls", "name"],
        "egress" | "ingress" => &["hosts", "port", "bind"],
        "outboundTrafficPolicy" => &["mode"],
        "selector" | "labels" | "sourceLabels" | "workloadSelector" => &["app", "version", "istio"],
        _ => KEYS,
    }
}

/// Any field name, for objects under keys [`children`] does not know.
const KEYS: &[&str] = &[
    "hosts",
    "http",
    "match",
    "route",
    "destination",
    "host",
    "subset",
    "port",
    "number",
    "weight",
    "uri",
    "exact",
    "prefix",
    "regex",
    "timeout",
    "name",
    "labels",
    "value",
];
const STRINGS: &[&str] = &[
    "reviews",
    "ratings",
    "v1",
    "v2",
    "v3",
    "*",
    "mesh",
    "bookinfo-gateway",
    "/",
    "/api",
    "5s",
    "1ms",
    "0s",
    "-1s",
    "10000000000000s",
    "1.5h",
    "HTTP",
    "TCP",
    "GRPC",
    "HTTPS",
    "TLS",
    "DNS",
    "STATIC",
    "NONE",
    "MESH_EXTERNAL",
    "MESH_INTERNAL",
    "ROUND_ROBIN",
    "RANDOM",
    "LEAST_REQUEST",
    "5xx",
    "gateway-error",
    "503",
    "10.96.0.1",
    "10.0.0.0/8",
    "::1",
    "*.example.com",
    "default/x",
    "./x",
    "(",
    "[a-",
    "\\1",
    "UPGRADE",
    "REGISTRY_ONLY",
    "FROM_REQUEST_PORT",
    "SIMPLE",
    "PASSTHROUGH",
    "reviews.default.svc.cluster.local",
];

/// A JSON value for a field named `parent`: a scalar of any type, or a list or object (whose
/// keys are the fields `parent` has).
fn value(u: &mut Unstructured<'_>, parent: &str, depth: u32) -> arbitrary::Result<Value> {
    let choice = if depth == 0 {
        u.int_in_range(0..=5)?
    } else {
        u.int_in_range(0..=7)?
    };
    Ok(match choice {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => json!(u.arbitrary::<i64>()?),
        3 => json!(u.int_in_range(-2i64..=70000)?),
        4 => serde_json::Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
        5 => {
            if u.arbitrary()? {
                Value::String(u.choose(STRINGS)?.to_string())
            } else {
                Value::String(u.arbitrary()?)
            }
        }
        6 => {
            let n = u.int_in_range(0..=3)?;
            Value::Array(
                (0..n)
                    .map(|_| value(u, parent, depth - 1))
                    .collect::<arbitrary::Result<_>>()?,
            )
        }
        _ => {
            let n = u.int_in_range(0..=4)?;
            let mut m = Map::new();
            for _ in 0..n {
                let key = *u.choose(children(parent))?;
                m.insert(key.to_string(), value(u, key, depth - 1)?);
            }
            Value::Object(m)
        }
    })
}

impl<'a> Arbitrary<'a> for Extra {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let kind = *u.choose(KINDS)?;
        let mut spec = Map::new();
        for _ in 0..u.int_in_range(0..=4)? {
            let key = *u.choose(children(kind))?;
            spec.insert(key.to_string(), value(u, key, 6)?);
        }
        Ok(Extra {
            kind,
            name: u.choose(NAMES)?,
            spec: Value::Object(spec),
        })
    }
}

fn configs() -> &'static [ConfigSet] {
    static CONFIGS: OnceLock<Vec<ConfigSet>> = OnceLock::new();
    CONFIGS.get_or_init(steerd_fuzz::sample_configs)
}

fn pick(p: &Pick, known: &[String]) -> String {
    match p {
        Pick::Known(i) if !known.is_empty() => known[*i as usize % known.len()].clone(),
        Pick::Known(_) => String::new(),
        Pick::Any(s) => s.clone(),
    }
}

fuzz_target!(|input: Input| {
    let configs = configs();
    let base = &configs[input.set as usize % configs.len()];
    let extended;
    let cfg = match &input.extra {
        Some(extra) => {
            let object = json!({
                "apiVersion": "networking.istio.io/v1",
                "kind": extra.kind,
                "metadata": { "name": extra.name, "namespace": "default" },
                "spec": extra.spec,
            });
            let origin = Origin {
                source: "fuzz.yaml".into(),
                line: Some(1),
            };
            match parse_value(&origin, &object) {
                Ok(Some(objects)) => {
                    extended = steerd_fuzz::with_objects(base, objects);
                    // The changed configuration must also survive check and the plan.
                    steerd_fuzz::check_and_explain(&extended);
                    &extended
                }
                _ => base,
            }
        }
        None => base,
    };
    let hosts = steerd_fuzz::hosts(cfg);
    let gateways: Vec<String> = cfg.gateways.iter().map(|g| g.meta.name.clone()).collect();
    let q = Query {
        host: pick(&input.host, &hosts),
        port: input.port,
        namespace: input.namespace.unwrap_or_default(),
        path: input.path,
        method: input.method,
        headers: input.headers,
        query: input.query,
        source_labels: input.source_labels.into_iter().collect::<BTreeMap<_, _>>(),
        gateway: input.gateway.as_ref().map(|g| pick(g, &gateways)),
        source_ip: input.source_ip.map(|a| std::net::IpAddr::from(a)),
        source_namespace: input.source_namespace,
    };
    match explain(cfg, &q) {
        Ok(e) => {
            let _ = render_text(&e);
            serde_json::to_string(&e).expect("explanations serialize");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
