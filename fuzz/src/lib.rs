//! Shared by the fuzz targets: the pipeline `steerd check`/`run` put manifests through, and
//! Istio's sample manifests (embedded at build time) as known-good configurations.

use steerd::compile::analyze::{analyze, render};
use steerd::compile::compile;
use steerd::compile::explain::{Query, explain, render_text};
use steerd::model::{ConfigSet, Object, parse_documents};

/// One file's text through everything that reads manifests: parse, the webhook-style
/// rejection of the file source, validation + compile + analyzers (`steerd check`), the plan,
/// and `steerd explain` for the hosts the configuration names. None of it may panic.
pub fn pipeline(text: &str) {
    let (objects, errors) = parse_documents("fuzz.yaml", text);
    for e in &errors {
        let _ = e.to_string();
    }
    let _ = steerd::sources::rejected(&objects);
    let mut cfg = ConfigSet::default();
    cfg.extend(objects);
    check_and_explain(&cfg);
}

/// `steerd check` and the plan over `cfg`, then explain for (a few of) its hosts.
pub fn check_and_explain(cfg: &ConfigSet) {
    for d in analyze(cfg) {
        let _ = render(&d);
    }
    let plan = compile(cfg);
    let _ = serde_json::to_string(&plan.diagnostics);
    for host in hosts(cfg).into_iter().take(8) {
        for path in [None, Some("/")] {
            let q = Query {
                host: host.clone(),
                path: path.map(String::from),
                ..Default::default()
            };
            if let Ok(e) = explain(cfg, &q) {
                let _ = render_text(&e);
                let _ = serde_json::to_string(&e);
            }
        }
    }
}

/// Host names (and service IPs) a client could ask explain about.
pub fn hosts(cfg: &ConfigSet) -> Vec<String> {
    let mut out = Vec::new();
    for s in &cfg.services {
        out.push(s.meta.name.clone());
        out.push(format!(
            "{}.{}.svc.cluster.local",
            s.meta.name, s.meta.namespace
        ));
        if let Some(ip) = s.spec.spec.as_ref().and_then(|s| s.cluster_ip.clone()) {
            out.push(ip);
        }
    }
    for vs in &cfg.virtual_services {
        out.extend(vs.spec.hosts.iter().cloned());
    }
    for se in &cfg.service_entries {
        out.extend(se.spec.hosts.iter().cloned());
        out.extend(se.spec.addresses.iter().cloned());
    }
    out.sort();
    out.dedup();
    out
}

macro_rules! sample {
    ($p:literal) => {
        (
            $p,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/istio/samples/",
                $p
            )),
        )
    };
}

type Sample = (&'static str, &'static str);

const BOOKINFO: Sample = sample!("bookinfo/platform/kube/bookinfo.yaml");
const DR_ALL: Sample = sample!("bookinfo/networking/destination-rule-all.yaml");

/// Istio's samples, as the sets a user would apply together.
pub fn sample_sets() -> Vec<Vec<Sample>> {
    let routing: &[Sample] = &[
        sample!("bookinfo/networking/virtual-service-all-v1.yaml"),
        sample!("bookinfo/networking/virtual-service-details-v2.yaml"),
        sample!("bookinfo/networking/virtual-service-ratings-db.yaml"),
        sample!("bookinfo/networking/virtual-service-ratings-mysql-vm.yaml"),
        sample!("bookinfo/networking/virtual-service-ratings-mysql.yaml"),
        sample!("bookinfo/networking/virtual-service-ratings-test-abort.yaml"),
        sample!("bookinfo/networking/virtual-service-ratings-test-delay.yaml"),
        sample!("bookinfo/networking/virtual-service-reviews-50-v3.yaml"),
        sample!("bookinfo/networking/virtual-service-reviews-80-20.yaml"),
        sample!("bookinfo/networking/virtual-service-reviews-90-10.yaml"),
        sample!("bookinfo/networking/virtual-service-reviews-jason-v2-v3.yaml"),
        sample!("bookinfo/networking/virtual-service-reviews-test-v2.yaml"),
        sample!("bookinfo/networking/virtual-service-reviews-v2-v3.yaml"),
        sample!("bookinfo/networking/virtual-service-reviews-v3.yaml"),
        sample!("bookinfo/networking/fault-injection-details-v1.yaml"),
        sample!("bookinfo/networking/egress-rule-google-apis.yaml"),
    ];
    let mut sets: Vec<Vec<Sample>> = routing.iter().map(|r| vec![BOOKINFO, DR_ALL, *r]).collect();
    sets.extend([
        vec![
            BOOKINFO,
            sample!("bookinfo/networking/bookinfo-gateway.yaml"),
        ],
        vec![
            BOOKINFO,
            sample!("bookinfo/platform/kube/bookinfo-versions.yaml"),
            sample!("bookinfo/networking/destination-rule-all-mtls.yaml"),
            sample!("bookinfo/networking/destination-rule-reviews.yaml"),
            sample!("bookinfo/networking/certmanager-gateway.yaml"),
        ],
        vec![
            sample!("tcp-echo/tcp-echo-services.yaml"),
            sample!("tcp-echo/tcp-echo-all-v1.yaml"),
        ],
        vec![
            sample!("tcp-echo/tcp-echo-services.yaml"),
            sample!("tcp-echo/tcp-echo-all-v1.yaml"),
            sample!("tcp-echo/tcp-echo-20-v2.yaml"),
        ],
        vec![
            sample!("httpbin/httpbin.yaml"),
            sample!("httpbin/httpbin-gateway.yaml"),
        ],
        vec![
            sample!("helloworld/helloworld.yaml"),
            sample!("helloworld/helloworld-gateway.yaml"),
        ],
        vec![
            sample!("external/aptget.yaml"),
            sample!("external/github.yaml"),
            sample!("external/pypi.yaml"),
        ],
    ]);
    sets
}

/// The sample sets, parsed (they must parse cleanly).
pub fn sample_configs() -> Vec<ConfigSet> {
    sample_sets()
        .into_iter()
        .map(|set| {
            let mut cfg = ConfigSet::default();
            for (name, text) in set {
                let (objects, errors) = parse_documents(name, text);
                assert!(errors.is_empty(), "{name}: {errors:?}");
                cfg.extend(objects);
            }
            cfg
        })
        .collect()
}

/// Adds parsed objects to a configuration.
pub fn with_objects(cfg: &ConfigSet, objects: Vec<Object>) -> ConfigSet {
    let mut cfg = cfg.clone();
    cfg.extend(objects);
    cfg
}
