use super::*;
use crate::model::{ConfigSet, Object, Origin, ParseError, parse_documents, parse_value};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

fn shared(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/istio")
        .join(path)
}

fn parse_one(yaml: &str) -> Result<Object, Vec<ParseError>> {
    let (mut objs, errs) = parse_documents("t.yaml", yaml);
    if !errs.is_empty() {
        return Err(errs);
    }
    assert_eq!(objs.len(), 1, "{objs:?}");
    Ok(objs.remove(0))
}

fn vs(spec: &str) -> Result<VirtualService, Box<ParseError>> {
    let doc = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r, namespace: n}}\nspec:\n{}",
        indent(spec)
    );
    match parse_one(&doc) {
        Ok(Object::VirtualService(r)) => Ok(r.spec.clone()),
        Ok(o) => panic!("{o:?}"),
        Err(mut e) => Err(Box::new(e.remove(0))),
    }
}

fn dr(spec: &str) -> Result<DestinationRule, Box<ParseError>> {
    let doc = format!(
        "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {{name: r, namespace: n}}\nspec:\n{}",
        indent(spec)
    );
    match parse_one(&doc) {
        Ok(Object::DestinationRule(r)) => Ok(r.spec.clone()),
        Ok(o) => panic!("{o:?}"),
        Err(mut e) => Err(Box::new(e.remove(0))),
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

#[test]
fn every_istio_sample_parses() {
    let mut files = Vec::new();
    yaml_files(&shared("samples"), &mut files);
    files.sort();
    assert!(files.len() >= 30, "{files:?}");
    let mut config = ConfigSet::default();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let (objs, errs) = parse_documents(&file.display().to_string(), &text);
        assert!(errs.is_empty(), "{}: {errs:#?}", file.display());
        config.extend(objs);
    }
    assert!(config.virtual_services.len() >= 15);
    assert!(config.destination_rules.len() >= 4);
    assert!(config.service_entries.len() >= 5);
    assert!(config.gateways.len() >= 4);
    // The samples are valid Istio configuration: the validator has nothing to say but warnings.
    let errors: Vec<_> = crate::model::validate::validate(&config)
        .into_iter()
        .filter(|d| d.level == crate::compile::Level::Error)
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn samples_are_typed() {
    let text = std::fs::read_to_string(shared(
        "samples/bookinfo/networking/virtual-service-reviews-jason-v2-v3.yaml",
    ))
    .unwrap();
    let Object::VirtualService(r) = parse_one(&text).unwrap() else {
        panic!()
    };
    let m = &r.spec.http[0].matches[0];
    assert_eq!(
        m.headers.get("end-user"),
        Some(&StringMatch::Exact("jason".into()))
    );
    assert_eq!(
        r.spec.http[0].route[0].destination.subset.as_deref(),
        Some("v2")
    );

    let text = std::fs::read_to_string(shared(
        "samples/bookinfo/networking/virtual-service-ratings-test-delay.yaml",
    ))
    .unwrap();
    let Object::VirtualService(r) = parse_one(&text).unwrap() else {
        panic!()
    };
    let delay = r.spec.http[0]
        .fault
        .as_ref()
        .unwrap()
        .delay
        .as_ref()
        .unwrap();
    assert_eq!(delay.delay, Some(DelayKind::Fixed(Duration::from_secs(7))));
    assert_eq!(delay.percentage, Some(Percent { value: 100.0 }));

    let text = std::fs::read_to_string(shared(
        "samples/bookinfo/networking/destination-rule-all-mtls.yaml",
    ))
    .unwrap();
    let (objs, errs) = parse_documents("f", &text);
    assert!(errs.is_empty());
    let Object::DestinationRule(r) = &objs[0] else {
        panic!()
    };
    let tp = r.spec.traffic_policy.as_ref().unwrap();
    assert_eq!(
        tp.tls.as_ref().unwrap().mode,
        Some(ClientTlsMode::IstioMutual)
    );
}

// ------------------------------------------------------------------------------------------------
// Every field of the CRD schemas has a typed home
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Step {
    Field(String),
    Item,
    MapValue,
}

fn leaf_paths(schema: &Value, path: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    match schema["type"].as_str() {
        Some("object") => {
            let mut any = false;
            if let Some(props) = schema["properties"].as_object() {
                for (name, sub) in props {
                    any = true;
                    path.push(Step::Field(name.clone()));
                    leaf_paths(sub, path, out);
                    path.pop();
                }
            }
            if schema["additionalProperties"].is_object() {
                any = true;
                path.push(Step::MapValue);
                leaf_paths(&schema["additionalProperties"], path, out);
                path.pop();
            }
            if !any {
                out.push(path.clone());
            }
        }
        Some("array") => {
            path.push(Step::Item);
            leaf_paths(&schema["items"], path, out);
            path.pop();
        }
        _ => out.push(path.clone()),
    }
}

/// A valid value for a leaf: "1s" serves both plain strings and durations.
fn dummy(schema: &Value) -> Value {
    match schema["type"].as_str() {
        Some("string") => {
            if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
                first.clone()
            } else if schema["format"] == "byte" {
                json!("aGk=")
            } else {
                json!("1s")
            }
        }
        Some("integer") => json!(schema["minimum"].as_i64().unwrap_or(1).max(1)),
        Some("number") => json!(1.0),
        Some("boolean") => json!(true),
        Some("array") => json!([]),
        _ => json!({}),
    }
}

/// An object with its required fields only.
fn minimal(schema: &Value) -> Value {
    if schema["type"] != "object" {
        return dummy(schema);
    }
    let mut obj = serde_json::Map::new();
    for req in schema["required"].as_array().into_iter().flatten() {
        let name = req.as_str().unwrap();
        obj.insert(name.into(), minimal(&schema["properties"][name]));
    }
    Value::Object(obj)
}

fn build(schema: &Value, steps: &[Step]) -> Value {
    let Some((step, rest)) = steps.split_first() else {
        return if schema["type"] == "object" {
            minimal(schema)
        } else {
            dummy(schema)
        };
    };
    match step {
        Step::Field(name) => {
            let mut obj = minimal(schema);
            obj[name.as_str()] = build(&schema["properties"][name.as_str()], rest);
            obj
        }
        Step::Item => json!([build(&schema["items"], rest)]),
        Step::MapValue => {
            let mut obj = minimal(schema);
            obj["k"] = build(&schema["additionalProperties"], rest);
            obj
        }
    }
}

fn describe(steps: &[Step]) -> String {
    steps
        .iter()
        .map(|s| match s {
            Step::Field(f) => format!(".{f}"),
            Step::Item => "[]".into(),
            Step::MapValue => "{*}".into(),
        })
        .collect()
}

/// Records every key of `value` that `schema` does not define (null values included, so a
/// Rust field without a schema counterpart shows up even when unset).
fn fields_outside_schema(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if let Some(sub) = schema["properties"].get(k) {
                    fields_outside_schema(sub, v, &format!("{path}.{k}"), out);
                } else if schema["additionalProperties"].is_object() {
                    fields_outside_schema(
                        &schema["additionalProperties"],
                        v,
                        &format!("{path}{{*}}"),
                        out,
                    );
                } else {
                    let msg = format!("written field {path}.{k} is not in the schema");
                    if !out.contains(&msg) {
                        out.push(msg);
                    }
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                fields_outside_schema(&schema["items"], item, &format!("{path}[]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_crd_schema_field_parses() {
    let text = std::fs::read_to_string(shared("crds/crd-all.gen.yaml")).unwrap();
    let kinds = [
        ("networking.istio.io", "VirtualService"),
        ("networking.istio.io", "DestinationRule"),
        ("networking.istio.io", "ServiceEntry"),
        ("networking.istio.io", "Gateway"),
        ("networking.istio.io", "WorkloadEntry"),
        ("networking.istio.io", "Sidecar"),
        ("security.istio.io", "AuthorizationPolicy"),
    ];
    let mut seen = Vec::new();
    let mut checked = 0;
    let mut failures = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let crd: Value = serde::Deserialize::deserialize(doc).unwrap();
        let kind = crd["spec"]["names"]["kind"].as_str().unwrap_or_default();
        let group = crd["spec"]["group"].as_str().unwrap_or_default();
        if !kinds.contains(&(group, kind)) {
            continue;
        }
        for version in crd["spec"]["versions"].as_array().unwrap() {
            let name = version["name"].as_str().unwrap();
            seen.push(format!("{kind}/{name}"));
            let schema = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
            let mut paths = Vec::new();
            leaf_paths(schema, &mut Vec::new(), &mut paths);
            assert!(paths.len() > 5, "{kind}: {paths:?}");
            for steps in paths {
                let spec = build(schema, &steps);
                let object = json!({
                    "apiVersion": format!("{group}/{name}"),
                    "kind": kind,
                    "metadata": {"name": "x", "namespace": "n"},
                    "spec": spec,
                });
                checked += 1;
                match parse_value(&Origin::default(), &object) {
                    Err(e) => failures.push(format!("{kind}/{name} spec{}: {e}", describe(&steps))),
                    Ok(Some(objs)) => {
                        // And the other way round: what we write back is in the schema.
                        let written = match &objs[0] {
                            Object::VirtualService(r) => serde_json::to_value(&r.spec),
                            Object::DestinationRule(r) => serde_json::to_value(&r.spec),
                            Object::ServiceEntry(r) => serde_json::to_value(&r.spec),
                            Object::Gateway(r) => serde_json::to_value(&r.spec),
                            Object::WorkloadEntry(r) => serde_json::to_value(&r.spec),
                            Object::Sidecar(r) => serde_json::to_value(&r.spec),
                            Object::AuthorizationPolicy(r) => serde_json::to_value(&r.spec),
                            o => panic!("{o:?}"),
                        }
                        .unwrap();
                        fields_outside_schema(schema, &written, "spec", &mut failures);
                    }
                    Ok(None) => failures.push(format!("{kind}/{name}: skipped")),
                }
            }
        }
    }
    seen.sort();
    assert_eq!(seen.len(), 20, "{seen:?}");
    assert!(checked > 1500, "{checked}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ------------------------------------------------------------------------------------------------
// Strictness
// ------------------------------------------------------------------------------------------------

#[test]
fn unknown_fields_are_errors_with_their_path() {
    let e = vs("hosts: [r]\nhttp:\n- route:\n  - destination: {host: r}\n  retry: {attempts: 3}\n")
        .unwrap_err();
    assert_eq!(e.field, "spec.http[0].retry");
    assert!(e.message.contains("unknown field `retry`"), "{e}");

    let e = vs("hosts: [r]\nbogus: 1\n").unwrap_err();
    assert_eq!(e.field, "spec.bogus");

    // Inside a `oneof` type too.
    let e =
        dr("host: r\ntrafficPolicy:\n  loadBalancer: {simple: RANDOM, bogus: 1}\n").unwrap_err();
    assert_eq!(e.field, "spec.trafficPolicy.loadBalancer.bogus");
    let e = vs("hosts: [r]\nhttp:\n- match: [{uri: {exact: /, suffix: x}}]\n  route: [{destination: {host: r}}]\n")
        .unwrap_err();
    assert_eq!(e.field, "spec.http[0].match[0].uri.suffix");
    let e = vs("hosts: [r]\ntcp:\n- route:\n  - destination: {host: r, weight: 1}\n").unwrap_err();
    assert_eq!(e.field, "spec.tcp[0].route[0].destination.weight");
}

#[test]
fn one_of_groups_admit_one_member() {
    let e = vs("hosts: [r]\nhttp:\n- match: [{uri: {exact: /a, prefix: /b}}]\n  route: [{destination: {host: r}}]\n")
        .unwrap_err();
    assert_eq!(e.field, "spec.http[0].match[0].uri");
    assert!(
        e.message
            .contains("only one of exact, prefix, regex may be set, found exact and prefix"),
        "{e}"
    );
    let e = dr("host: r\ntrafficPolicy:\n  loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}\n")
        .unwrap_err();
    assert_eq!(e.field, "spec.trafficPolicy.loadBalancer");
    let e = dr("host: r\ntrafficPolicy:\n  loadBalancer:\n    consistentHash: {httpHeaderName: x, useSourceIp: true}\n")
        .unwrap_err();
    assert!(
        e.message.contains("found httpHeaderName and useSourceIp"),
        "{e}"
    );
    let e = dr("host: r\ntrafficPolicy:\n  loadBalancer:\n    consistentHash: {ringHash: {}, maglev: {tableSize: 7}}\n")
        .unwrap_err();
    assert!(e.message.contains("ringHash, maglev"), "{e}");
    let e = vs("hosts: [r]\nhttp:\n- redirect: {port: 8080, derivePort: FROM_REQUEST_PORT}\n")
        .unwrap_err();
    assert_eq!(e.field, "spec.http[0].redirect");
    let e =
        vs("hosts: [r]\nhttp:\n- directResponse: {status: 200, body: {string: a, bytes: YQ==}}\n")
            .unwrap_err();
    assert_eq!(e.field, "spec.http[0].directResponse.body");
    let e = vs("hosts: [r]\nhttp:\n- fault: {abort: {httpStatus: 500, grpcStatus: UNAVAILABLE}}\n  route: [{destination: {host: r}}]\n")
        .unwrap_err();
    assert_eq!(e.field, "spec.http[0].fault.abort");
    let e = vs("hosts: [r]\nhttp:\n- fault: {delay: {fixedDelay: 1s, exponentialDelay: 2s}}\n  route: [{destination: {host: r}}]\n")
        .unwrap_err();
    assert_eq!(e.field, "spec.http[0].fault.delay");
}

#[test]
fn required_fields_are_required() {
    let e = vs("hosts: [r]\nhttp:\n- route:\n  - destination: {subset: v1}\n").unwrap_err();
    assert_eq!(e.field, "spec.http[0].route[0].destination");
    assert!(e.message.contains("missing field `host`"), "{e}");
    let e = vs("hosts: [r]\ntls:\n- route: [{destination: {host: r}}]\n").unwrap_err();
    assert!(e.message.contains("missing field `match`"), "{e}");
    let e = vs("hosts: [r]\nhttp:\n- directResponse: {body: {string: x}}\n").unwrap_err();
    assert!(e.message.contains("missing field `status`"), "{e}");
    let gw = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec:\n  servers:\n  - port: {number: 80, name: http}\n    hosts: ['*']\n";
    let e = parse_one(gw).unwrap_err();
    assert_eq!(e[0].field, "spec.servers[0].port");
    assert!(e[0].message.contains("missing field `protocol`"), "{e:?}");
    let se = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s}\nspec:\n  hosts: [a.example.com]\n  ports: [{number: 80}]\n";
    let e = parse_one(se).unwrap_err();
    assert!(e[0].message.contains("missing field `name`"), "{e:?}");
}

#[test]
fn wrappers_are_written_as_istio_writes_them() {
    // Percent is {value: f64}; mirrorPercent (UInt32Value) and delay.percent are bare integers.
    let ok = vs("hosts: [r]\nhttp:\n- route: [{destination: {host: r}}]\n  mirror: {host: m}\n  mirrorPercentage: {value: 12.5}\n  mirrorPercent: 50\n  mirror_percent: 40\n").unwrap();
    assert_eq!(ok.http[0].mirror_percentage, Some(Percent { value: 12.5 }));
    assert_eq!(ok.http[0].mirror_percent(), Some(50));
    assert_eq!(ok.http[0].mirror_percent_proto_name, Some(40));
    let e = vs("hosts: [r]\nhttp:\n- route: [{destination: {host: r}}]\n  mirrorPercentage: 50\n")
        .unwrap_err();
    assert_eq!(e.field, "spec.http[0].mirrorPercentage");
    let e = vs(
        "hosts: [r]\nhttp:\n- route: [{destination: {host: r}}]\n  mirrorPercent: {value: 50}\n",
    )
    .unwrap_err();
    assert_eq!(e.field, "spec.http[0].mirrorPercent");
    let e = vs("hosts: [r]\nhttp:\n- route: [{destination: {host: r}}]\n  mirrorPercent: -1\n")
        .unwrap_err();
    assert_eq!(e.field, "spec.http[0].mirrorPercent");
    let ok = vs("hosts: [r]\nhttp:\n- route: [{destination: {host: r}}]\n  fault: {delay: {fixedDelay: 5s, percent: 10}}\n").unwrap();
    assert_eq!(
        ok.http[0]
            .fault
            .as_ref()
            .unwrap()
            .delay
            .as_ref()
            .unwrap()
            .percent,
        Some(10)
    );
    // weight is an int32.
    let e = vs("hosts: [r]\ntcp:\n- route:\n  - destination: {host: r}\n    weight: 3000000000\n")
        .unwrap_err();
    assert_eq!(e.field, "spec.tcp[0].route[0].weight");
    let ok = dr("host: r\ntrafficPolicy:\n  outlierDetection: {consecutive5xxErrors: 7, splitExternalLocalOriginErrors: true}\n").unwrap();
    let od = ok.traffic_policy.unwrap().outlier_detection.unwrap();
    assert_eq!(od.consecutive_5xx_errors, Some(7));
}

#[test]
fn durations_accept_go_syntax_and_reject_junk() {
    let ok = vs("hosts: [r]\nhttp:\n- route: [{destination: {host: r}}]\n  timeout: 1m\n  retries: {attempts: 3, perTryTimeout: 1.5s, backoff: 100ms}\n").unwrap();
    assert_eq!(ok.http[0].timeout, Some(Duration::from_secs(60)));
    let r = ok.http[0].retries.as_ref().unwrap();
    assert_eq!(r.per_try_timeout, Some(Duration::from_millis(1500)));
    assert_eq!(r.backoff, Some(Duration::from_millis(100)));
    let e = vs("hosts: [r]\nhttp:\n- route: [{destination: {host: r}}]\n  timeout: 10 seconds\n")
        .unwrap_err();
    assert_eq!(e.field, "spec.http[0].timeout");
    assert!(e.message.contains("invalid duration \"10 seconds\""), "{e}");
    let e =
        vs("hosts: [r]\nhttp:\n- route: [{destination: {host: r}}]\n  timeout: 5\n").unwrap_err();
    assert!(e.message.contains("duration string"), "{e}");
}

#[test]
fn enums_are_their_names() {
    let ok = dr("host: r\ntrafficPolicy:\n  loadBalancer: {simple: LEAST_REQUEST}\n  tls: {mode: SIMPLE}\n  proxyProtocol: {version: V2}\n").unwrap();
    let tp = ok.traffic_policy.unwrap();
    assert_eq!(
        tp.load_balancer.unwrap().simple(),
        Some(SimpleLb::LeastRequest)
    );
    assert_eq!(
        tp.proxy_protocol.unwrap().version,
        Some(ProxyProtocolVersion::V2)
    );
    let e = dr("host: r\ntrafficPolicy:\n  loadBalancer: {simple: FASTEST}\n").unwrap_err();
    assert_eq!(e.field, "spec.trafficPolicy.loadBalancer.simple");
    assert!(e.message.contains("unknown variant `FASTEST`"), "{e}");
    let se = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s}\nspec:\n  hosts: ['*.example.com']\n  resolution: DYNAMIC_DNS\n";
    let Object::ServiceEntry(r) = parse_one(se).unwrap() else {
        panic!()
    };
    assert_eq!(r.spec.resolution, Resolution::DynamicDns);
}

#[test]
fn nulls_are_pruned_like_the_api_server_does() {
    let ok = vs("hosts: [r]\ngateways: ~\nhttp:\n- match:\n  route: [{destination: {host: r, subset: null}}]\n").unwrap();
    assert!(ok.gateways.is_empty());
    assert!(ok.http[0].matches.is_empty());
    assert!(ok.binds_mesh());
    // A null list item is still an error.
    assert!(vs("hosts: [r, null]\n").is_err());
}

#[test]
fn a_full_http_route_is_typed() {
    let spec = r#"hosts: [reviews.example.com]
gateways: [istio-system/gw, mesh]
http:
- name: main
  match:
  - name: m1
    uri: {prefix: /api}
    scheme: {exact: https}
    method: {regex: "GET|HEAD"}
    authority: {exact: reviews.example.com}
    headers: {x-user: {exact: jason}, x-any: {}}
    queryParams: {debug: {exact: "1"}}
    withoutHeaders: {x-skip: {regex: "*"}}
    port: 8080
    sourceLabels: {app: web}
    gateways: [mesh]
    sourceNamespace: shop
    ignoreUriCase: true
    statPrefix: api
  route:
  - destination: {host: reviews, subset: v2, port: {number: 9080}}
    weight: 90
    headers: {request: {set: {x-route: v2}}, response: {remove: [x-internal]}}
  - destination: {host: reviews, subset: v3}
    weight: 10
  rewrite: {uri: /v1/api, authority: internal}
  timeout: 2.5s
  retries: {attempts: 3, perTryTimeout: 1s, retryOn: "5xx,connect-failure,503", retryRemoteLocalities: true, retryIgnorePreviousHosts: false}
  fault:
    delay: {fixedDelay: 100ms, percentage: {value: 5}}
    abort: {grpcStatus: UNAVAILABLE, percentage: {value: 1.5}}
  mirrors:
  - destination: {host: shadow}
    percentage: {value: 10}
  corsPolicy:
    allowOrigins: [{exact: "https://example.com"}, {regex: "https://.*\\.example\\.com"}]
    allowMethods: [GET, POST]
    allowHeaders: [content-type]
    exposeHeaders: [x-trace]
    maxAge: 24h
    allowCredentials: true
    unmatchedPreflights: IGNORE
  headers:
    request: {add: {x-a: "1"}, remove: [cookie]}
- name: redirect
  match: [{uri: {exact: /old}}]
  redirect: {uri: /new, authority: example.com, derivePort: FROM_PROTOCOL_DEFAULT, scheme: https, redirectCode: 308}
- name: direct
  directResponse: {status: 503, body: {bytes: "b3ZlcmxvYWRlZA=="}}
- name: regex
  rewrite: {uriRegexRewrite: {match: "^/service/([^/]+)(/.*)$", rewrite: "\\2/instance/\\1"}}
  route: [{destination: {host: reviews}}]
- name: delegated
  delegate: {name: reviews-delegate, namespace: shop}
"#;
    let v = vs(spec).unwrap();
    let h = &v.http[0];
    let m = &h.matches[0];
    assert_eq!(m.uri, Some(StringMatch::Prefix("/api".into())));
    assert_eq!(
        m.method.as_ref().and_then(StringMatch::regex),
        Some("GET|HEAD")
    );
    assert_eq!(m.headers["x-any"], StringMatch::Unset);
    assert_eq!(m.without_headers["x-skip"], StringMatch::Regex("*".into()));
    assert_eq!(m.port, Some(8080));
    assert_eq!(m.ignore_uri_case, Some(true));
    assert_eq!(h.route[0].weight, Some(90));
    assert_eq!(
        h.route[0]
            .headers
            .as_ref()
            .unwrap()
            .request
            .as_ref()
            .unwrap()
            .set["x-route"],
        "v2"
    );
    assert_eq!(h.timeout, Some(Duration::from_millis(2500)));
    let fault = h.fault.as_ref().unwrap();
    assert_eq!(
        fault.abort.as_ref().unwrap().error,
        Some(AbortError::GrpcStatus("UNAVAILABLE".into()))
    );
    assert_eq!(h.mirrors[0].percentage, Some(Percent { value: 10.0 }));
    let cors = h.cors_policy.as_ref().unwrap();
    assert_eq!(cors.max_age, Some(Duration::from_secs(86400)));
    assert_eq!(cors.unmatched_preflights, Some(UnmatchedPreflights::Ignore));
    let redirect = v.http[1].redirect.as_ref().unwrap();
    assert_eq!(
        redirect.port,
        Some(RedirectPort::Derive(DerivePort::FromProtocolDefault))
    );
    assert_eq!(redirect.redirect_code, Some(308));
    let direct = v.http[2].direct_response.as_ref().unwrap();
    assert_eq!(direct.body, Some(HttpBody::Bytes(b"overloaded".to_vec())));
    let rr = v.http[3]
        .rewrite
        .as_ref()
        .unwrap()
        .uri_regex_rewrite
        .as_ref()
        .unwrap();
    assert_eq!(rr.pattern.as_deref(), Some("^/service/([^/]+)(/.*)$"));
    assert_eq!(
        v.http[4].delegate,
        Some(Delegate {
            name: Some("reviews-delegate".into()),
            namespace: Some("shop".into())
        })
    );
    assert!(v.binds_mesh());

    // What we serialize parses back to the same thing (config_dump round trip).
    let json = serde_json::to_value(&v).unwrap();
    let mut pruned = json.clone();
    super::super::prune_nulls(&mut pruned);
    let back: VirtualService = serde_json::from_value(pruned).unwrap();
    assert_eq!(back, v);
}

#[test]
fn a_full_destination_rule_is_typed() {
    let spec = r#"host: reviews.shop.svc.cluster.local
trafficPolicy:
  loadBalancer:
    consistentHash:
      httpCookie: {name: session, ttl: 0s, path: /, attributes: [{name: SameSite, value: Strict}]}
      ringHash: {minimumRingSize: 1024}
    localityLbSetting:
      enabled: true
      distribute: [{from: us-west/zone1/*, to: {"us-west/zone1/*": 80, "us-west/zone2/*": 20}}]
    warmup: {duration: 60s, minimumPercent: 10, aggression: 1.0}
  connectionPool:
    tcp: {maxConnections: 100, connectTimeout: 30ms, tcpKeepalive: {time: 7200s, interval: 75s, probes: 9}, idleTimeout: 1h}
    http: {http2MaxRequests: 1000, maxRequestsPerConnection: 10, h2UpgradePolicy: UPGRADE, http2KeepAlive: {interval: 10s, timeout: 2s}}
  outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50, outlierDetectionHttpErrorCodes: [503]}
  tls: {mode: SIMPLE, sni: reviews.example.com, subjectAltNames: [reviews]}
  portLevelSettings:
  - port: {number: 9080}
    loadBalancer: {simple: LEAST_CONN}
  retryBudget: {percent: 20, minRetryConcurrency: 3}
subsets:
- name: v1
  labels: {version: v1}
  trafficPolicy:
    loadBalancer: {consistentHash: {maglev: {tableSize: 65537}, useSourceIp: true}}
    tunnel: {protocol: CONNECT, targetHost: egress.example.com, targetPort: 8443}
workloadSelector: {matchLabels: {app: ratings}}
exportTo: ["."]
"#;
    let d = dr(spec).unwrap();
    let tp = d.traffic_policy.as_ref().unwrap();
    let lb = tp.load_balancer.as_ref().unwrap();
    let ch = lb.consistent_hash().unwrap();
    let Some(HashKey::HttpCookie(cookie)) = &ch.hash_key else {
        panic!("{ch:?}")
    };
    assert_eq!(cookie.ttl, Some(Duration::ZERO));
    assert_eq!(
        ch.hash_algorithm,
        Some(HashAlgorithm::RingHash(RingHash {
            minimum_ring_size: Some(1024)
        }))
    );
    assert_eq!(
        lb.locality_lb_setting.as_ref().unwrap().distribute[0].to["us-west/zone2/*"],
        20
    );
    assert_eq!(
        lb.warmup.as_ref().unwrap().duration,
        Duration::from_secs(60)
    );
    let cp = tp.connection_pool.as_ref().unwrap();
    assert_eq!(cp.tcp.as_ref().unwrap().max_connections, Some(100));
    assert_eq!(
        cp.http.as_ref().unwrap().h2_upgrade_policy,
        Some(H2UpgradePolicy::Upgrade)
    );
    assert_eq!(
        tp.port_level_settings[0].port.as_ref().unwrap().number,
        Some(9080)
    );
    let sub = d.subsets[0].traffic_policy.as_ref().unwrap();
    assert_eq!(
        sub.load_balancer
            .as_ref()
            .unwrap()
            .consistent_hash()
            .unwrap()
            .hash_key,
        Some(HashKey::UseSourceIp(true))
    );
    assert_eq!(sub.tunnel.as_ref().unwrap().target_port, 8443);
    assert_eq!(
        d.workload_selector.as_ref().unwrap().match_labels["app"],
        "ratings"
    );
    let json = serde_json::to_value(&d).unwrap();
    let mut pruned = json.clone();
    super::super::prune_nulls(&mut pruned);
    let back: DestinationRule = serde_json::from_value(pruned).unwrap();
    assert_eq!(back, d);
}

#[test]
fn gateway_sidecar_and_workload_entry_are_typed() {
    let text = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, protocol: HTTPS, name: https}
    bind: 0.0.0.0
    hosts: ["shop/*.example.com"]
    name: main
    tls:
      mode: SIMPLE
      credentialName: example-cert
      minProtocolVersion: TLSV1_2
      maxProtocolVersion: TLSV1_3
      cipherSuites: [ECDHE-RSA-AES128-GCM-SHA256]
  - port: {number: 80, protocol: HTTP, name: http}
    hosts: ["*"]
    tls: {httpsRedirect: true}
    defaultEndpoint: 127.0.0.1:8080
---
apiVersion: networking.istio.io/v1beta1
kind: Sidecar
metadata: {name: default, namespace: shop}
spec:
  workloadSelector: {labels: {app: web}}
  ingress:
  - port: {number: 9080, protocol: HTTP, name: http}
    defaultEndpoint: 127.0.0.1:8080
    captureMode: IPTABLES
    connectionPool: {http: {http1MaxPendingRequests: 10}}
  egress:
  - port: {number: 3306, protocol: MYSQL, name: mysql}
    bind: 127.0.0.1
    hosts: ["*/mysql.db.svc.cluster.local"]
  - hosts: ["./*", "istio-system/*"]
  outboundTrafficPolicy:
    mode: ALLOW_ANY
    egressProxy: {host: egress.example.com, port: {number: 3128}}
  inboundConnectionPool: {tcp: {maxConnections: 100}}
---
apiVersion: networking.istio.io/v1alpha3
kind: WorkloadEntry
metadata: {name: vm1, namespace: shop}
spec:
  address: 10.0.0.5
  ports: {http: 8080}
  labels: {app: ratings}
  network: vpc1
  locality: us-west/zone1
  weight: 3
  serviceAccount: ratings
"#;
    let (objs, errs) = parse_documents("f.yaml", text);
    assert!(errs.is_empty(), "{errs:?}");
    let Object::Gateway(gw) = &objs[0] else {
        panic!()
    };
    let tls = gw.spec.servers[0].tls.as_ref().unwrap();
    assert_eq!(tls.mode(), ServerTlsMode::Simple);
    assert_eq!(tls.min_protocol_version, Some(TlsProtocolVersion::Tlsv1_2));
    assert_eq!(
        gw.spec.servers[1].tls.as_ref().unwrap().mode(),
        ServerTlsMode::Passthrough
    );
    let Object::Sidecar(sc) = &objs[1] else {
        panic!()
    };
    assert_eq!(sc.meta.key(), "shop/default");
    assert_eq!(sc.spec.ingress[0].capture_mode, Some(CaptureMode::Iptables));
    assert!(sc.spec.egress[1].port.is_none());
    let otp = sc.spec.outbound_traffic_policy.as_ref().unwrap();
    assert_eq!(otp.mode, Some(OutboundTrafficPolicyMode::AllowAny));
    let Object::WorkloadEntry(we) = &objs[2] else {
        panic!()
    };
    assert_eq!(we.spec.ports["http"], 8080);
    assert_eq!(we.spec.weight, Some(3));

    let mut config = ConfigSet::default();
    config.extend(objs);
    assert_eq!(config.sidecars.len(), 1);
    assert_eq!(config.len(), 3);
    let mut merged = ConfigSet::default();
    merged.merge_from(&config);
    merged.merge_from(&config);
    assert_eq!(merged.len(), 6);
    assert_eq!(merged.sidecars.len(), 2);
}
