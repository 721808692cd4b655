//! Property tests of HTTP route selection: the evaluator ([`HttpRoutes::select`],
//! [`HttpRule::pick`], [`StrMatch::matches`]) against naive reference implementations written
//! here from Istio's documented semantics, over random rule lists and requests.
//!
//! Values come from tiny alphabets so that random conditions and random requests agree often
//! enough for both outcomes of every comparison to be exercised.

use super::explain::{Query, explain};
use super::http::{
    Cluster, ClusterPolicy, HeaderOps, HttpDestination, HttpRoutes, HttpRule, RequestMatch,
    RequestView, RetryPolicy, RouteAction, StrMatch,
};
use crate::model::{ConfigSet, Origin, parse_value};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One regex atom of a pattern language small enough to match by hand: a literal, `.`, or
/// `[ab]`, optionally starred.
#[derive(Debug, Clone)]
enum Atom {
    Lit(char),
    Any,
    ClassAb,
}

type Pattern = Vec<(Atom, bool)>;

/// A `StringMatch` as the test generates it.
#[derive(Debug, Clone)]
enum Cond {
    Exact(String),
    Prefix(String),
    Regex(Pattern),
    Present,
}

fn pattern_source(p: &Pattern) -> String {
    p.iter()
        .map(|(atom, star)| {
            let a = match atom {
                Atom::Lit(c) => regex::escape(&c.to_string()),
                Atom::Any => ".".to_string(),
                Atom::ClassAb => "[ab]".to_string(),
            };
            if *star { format!("{a}*") } else { a }
        })
        .collect()
}

impl Cond {
    fn compile(&self) -> StrMatch {
        match self {
            Cond::Exact(s) => StrMatch::Exact(s.clone()),
            Cond::Prefix(s) => StrMatch::Prefix(s.clone()),
            Cond::Regex(p) => StrMatch::regex(&pattern_source(p)).expect("generated regex"),
            Cond::Present => StrMatch::Present,
        }
    }

    /// Istio's StringMatch: exact/prefix compare (ASCII case-insensitively with
    /// `ignoreUriCase`), regex must match the whole value, `{}` matches any value.
    fn reference(&self, value: &str, ignore_case: bool) -> bool {
        let fold = |s: &str| {
            if ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        match self {
            Cond::Exact(e) => fold(e) == fold(value),
            Cond::Prefix(p) => fold(value).starts_with(&fold(p)),
            Cond::Regex(p) => {
                let chars: Vec<char> = value.chars().collect();
                full_match(p, &chars)
            }
            Cond::Present => true,
        }
    }
}

/// Backtracking full match of the small pattern language.
fn full_match(p: &[(Atom, bool)], s: &[char]) -> bool {
    let one = |atom: &Atom, c: char| match atom {
        Atom::Lit(l) => *l == c,
        Atom::Any => c != '\n',
        Atom::ClassAb => c == 'a' || c == 'b',
    };
    match p.split_first() {
        None => s.is_empty(),
        Some(((atom, false), rest)) => {
            !s.is_empty() && one(atom, s[0]) && full_match(rest, &s[1..])
        }
        Some(((atom, true), rest)) => {
            // Zero repetitions, or one more and stay on the starred atom.
            full_match(rest, s) || (!s.is_empty() && one(atom, s[0]) && full_match(p, &s[1..]))
        }
    }
}

/// A request as the test generates it (owned, turned into a [`RequestView`] per check).
#[derive(Debug, Clone)]
struct Req {
    method: String,
    authority: String,
    path: String,
    query: String,
    /// Lower-case names, each at most once.
    headers: BTreeMap<String, String>,
    port: u16,
    source_labels: Option<crate::model::Labels>,
    gateway: String,
}

impl Req {
    fn view(&self) -> RequestView<'_> {
        RequestView {
            method: &self.method,
            scheme: "http",
            authority: &self.authority,
            path: &self.path,
            query: &self.query,
            headers: std::borrow::Cow::Owned(super::explain::header_map(
                &self
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Vec<_>>(),
            )),
            port: self.port,
            source_labels: self.source_labels.as_ref(),
            source_namespace: None,
            gateway: &self.gateway,
        }
    }

    /// Envoy's header lookup, pseudo-headers included.
    fn header(&self, name: &str) -> Option<&str> {
        match name {
            ":authority" | "host" => Some(&self.authority),
            ":method" => Some(&self.method),
            ":path" => Some(&self.path),
            _ => self.headers.get(name).map(String::as_str),
        }
    }

    /// The first `name=value` pair of the query string (`name` alone means an empty value).
    fn query_param(&self, name: &str) -> Option<String> {
        for pair in self.query.split('&') {
            let (k, v) = match pair.find('=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, ""),
            };
            if k == name {
                return Some(v.to_string());
            }
        }
        None
    }
}

/// One `match` block as the test generates it.
#[derive(Debug, Clone, Default)]
struct Block {
    uri: Option<Cond>,
    ignore_uri_case: bool,
    method: Option<Cond>,
    authority: Option<Cond>,
    headers: Vec<(String, Cond)>,
    without_headers: Vec<(String, Cond)>,
    query_params: Vec<(String, Cond)>,
    port: Option<u16>,
    source_labels: BTreeMap<String, String>,
    gateways: Vec<String>,
}

impl Block {
    fn compile(&self) -> RequestMatch {
        let pairs = |v: &[(String, Cond)]| {
            v.iter()
                .map(|(n, c)| (n.clone(), c.compile()))
                .collect::<Vec<_>>()
        };
        RequestMatch {
            uri: self.uri.as_ref().map(Cond::compile),
            method: self.method.as_ref().map(Cond::compile),
            authority: self.authority.as_ref().map(Cond::compile),
            headers: pairs(&self.headers),
            without_headers: pairs(&self.without_headers),
            query_params: pairs(&self.query_params),
            port: self.port,
            source_labels: self.source_labels.clone(),
            gateways: self.gateways.clone(),
            ignore_uri_case: self.ignore_uri_case,
            ..Default::default()
        }
    }

    /// Every condition of the block holds (Istio: conditions of one block are ANDed).
    fn reference(&self, r: &Req) -> bool {
        let opt = |c: &Option<Cond>, v: &str, ci: bool| match c {
            None => true,
            Some(c) => c.reference(v, ci),
        };
        if !opt(&self.uri, &r.path, self.ignore_uri_case)
            || !opt(&self.method, &r.method, false)
            || !opt(&self.authority, &r.authority, false)
        {
            return false;
        }
        if let Some(p) = self.port
            && p != r.port
        {
            return false;
        }
        for (name, c) in &self.headers {
            match r.header(name) {
                Some(v) if c.reference(v, false) => {}
                _ => return false,
            }
        }
        for (name, c) in &self.without_headers {
            if let Some(v) = r.header(name)
                && c.reference(v, false)
            {
                return false;
            }
        }
        for (name, c) in &self.query_params {
            match r.query_param(name) {
                Some(v) if c.reference(&v, false) => {}
                _ => return false,
            }
        }
        if !self.source_labels.is_empty() {
            let Some(labels) = &r.source_labels else {
                return false;
            };
            for (k, v) in &self.source_labels {
                if labels.get(k) != Some(v) {
                    return false;
                }
            }
        }
        self.gateways.is_empty() || self.gateways.contains(&r.gateway)
    }
}

/// The naive evaluator: the index of the first rule with no blocks or with a matching block.
fn reference_select(rules: &[Vec<Block>], r: &Req) -> Option<usize> {
    for (i, blocks) in rules.iter().enumerate() {
        if blocks.is_empty() {
            return Some(i);
        }
        for b in blocks {
            if b.reference(r) {
                return Some(i);
            }
        }
    }
    None
}

fn cluster(name: &str) -> Arc<Cluster> {
    Arc::new(Cluster {
        name: name.into(),
        host: "r.default.svc.cluster.local".into(),
        port: 80,
        subset: None,
        endpoints: vec![],
        priority_labels: Vec::new(),
        policy: ClusterPolicy::default(),
        destination_rule: None,
    })
}

fn rule(index: usize, blocks: &[Block], weights: &[u32]) -> HttpRule {
    HttpRule {
        index,
        name: None,
        matches: blocks.iter().map(Block::compile).collect(),
        action: RouteAction::Forward(
            weights
                .iter()
                .enumerate()
                .map(|(i, w)| HttpDestination {
                    cluster: cluster(&format!("d{i}")),
                    weight: *w,
                    headers_request: HeaderOps::default(),
                    headers_response: HeaderOps::default(),
                })
                .collect(),
        ),
        rewrite: None,
        timeout: None,
        retries: RetryPolicy::none(),
        fault: None,
        mirrors: vec![],
        headers_request: HeaderOps::default(),
        headers_response: HeaderOps::default(),
        cors: None,
        delegate: None,
    }
}

fn routes(rules: &[Vec<Block>]) -> HttpRoutes {
    HttpRoutes {
        virtual_service: Some("default/r".into()),
        rules: rules
            .iter()
            .enumerate()
            .map(|(i, b)| rule(i, b, &[1]))
            .collect(),
    }
}

// ---- generators ----

const VALUE: &str = "[aAb/]{0,4}";

fn atom() -> impl Strategy<Value = (Atom, bool)> {
    (
        prop_oneof![
            3 => prop::sample::select(vec!['a', 'A', 'b', '/', '.']).prop_map(Atom::Lit),
            1 => Just(Atom::Any),
            1 => Just(Atom::ClassAb),
        ],
        prop::bool::weighted(0.3),
    )
}

fn cond() -> impl Strategy<Value = Cond> {
    prop_oneof![
        3 => VALUE.prop_map(Cond::Exact),
        3 => "[aAb/]{0,2}".prop_map(Cond::Prefix),
        2 => prop::collection::vec(atom(), 0..4).prop_map(Cond::Regex),
        1 => Just(Cond::Present),
    ]
}

fn header_name() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["x-a", "x-b", "host", ":path", ":method", ":authority"])
        .prop_map(String::from)
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop::sample::select(vec!["app", "version"]).prop_map(String::from),
        prop::sample::select(vec!["a", "b"]).prop_map(String::from),
        0..3,
    )
}

fn block() -> impl Strategy<Value = Block> {
    (
        (
            prop::option::weighted(0.6, cond()),
            any::<bool>(),
            prop::option::weighted(0.2, cond()),
            prop::option::weighted(0.2, cond()),
        ),
        (
            prop::collection::vec((header_name(), cond()), 0..3),
            prop::collection::vec((header_name(), cond()), 0..2),
            prop::collection::vec(
                (
                    prop::sample::select(vec!["a", "b"]).prop_map(String::from),
                    cond(),
                ),
                0..2,
            ),
        ),
        (
            prop::option::weighted(0.2, prop::sample::select(vec![80u16, 9080])),
            prop::collection::btree_map(
                prop::sample::select(vec!["app", "version"]).prop_map(String::from),
                prop::sample::select(vec!["a", "b"]).prop_map(String::from),
                0..2,
            ),
            prop::collection::vec(
                prop::sample::select(vec!["mesh", "ns/gw"]).prop_map(String::from),
                0..2,
            ),
        ),
    )
        .prop_map(
            |(
                (uri, ignore_uri_case, method, authority),
                (headers, without_headers, query_params),
                (port, source_labels, gateways),
            )| Block {
                uri,
                ignore_uri_case,
                method,
                authority,
                headers,
                without_headers,
                query_params,
                port,
                source_labels,
                gateways,
            },
        )
}

fn rules() -> impl Strategy<Value = Vec<Vec<Block>>> {
    prop::collection::vec(prop::collection::vec(block(), 0..3), 0..6)
}

fn request() -> impl Strategy<Value = Req> {
    (
        prop::sample::select(vec!["GET", "POST", "a"]).prop_map(String::from),
        prop::sample::select(vec!["r:80", "a", "A/b"]).prop_map(String::from),
        VALUE,
        "[ab=&]{0,6}",
        prop::collection::btree_map(
            prop::sample::select(vec!["x-a", "x-b", "x-c"]).prop_map(String::from),
            VALUE,
            0..3,
        ),
        prop::sample::select(vec![80u16, 9080]),
        prop::option::of(labels()),
        prop::sample::select(vec!["mesh", "ns/gw"]).prop_map(String::from),
    )
        .prop_map(
            |(method, authority, path, query, headers, port, source_labels, gateway)| Req {
                method,
                authority,
                path,
                query,
                headers,
                port,
                source_labels: source_labels.map(Into::into),
                gateway,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// `select` returns the first rule whose match blocks (ORed) match, or whose block list is
    /// empty; None (Envoy's 404) when no rule does.
    #[test]
    fn select_is_the_first_matching_rule(rules in rules(), req in request()) {
        let routes = routes(&rules);
        let got = routes.select(&req.view()).map(|r| r.index);
        prop_assert_eq!(got, reference_select(&rules, &req));
    }

    /// A rule without match blocks matches every request, and shadows every later rule.
    #[test]
    fn a_rule_without_matches_matches_everything(
        mut rules in rules(),
        at in 0usize..6,
        req in request(),
    ) {
        let at = at.min(rules.len());
        rules.insert(at, Vec::new());
        let routes = routes(&rules);
        prop_assert!(routes.rules[at].matches(&req.view()));
        let got = routes.select(&req.view()).map(|r| r.index);
        prop_assert!(got.is_some_and(|i| i <= at), "{got:?} after the catch-all at {at}");
    }

    /// Each StringMatch kind agrees with the reference on random values, with and without
    /// `ignoreUriCase`.
    #[test]
    fn string_matches_agree_with_the_reference(c in cond(), v in VALUE, ci in any::<bool>()) {
        prop_assert_eq!(c.compile().matches(&v, ci), c.reference(&v, ci), "{:?} on {:?}", c, v);
    }

    /// Header, without-header and query conditions alone agree with the reference.
    #[test]
    fn header_and_query_conditions_agree(
        headers in prop::collection::vec((header_name(), cond()), 0..3),
        without in prop::collection::vec((header_name(), cond()), 0..2),
        query in prop::collection::vec(("[ab]", cond()), 0..2),
        req in request(),
    ) {
        let b = Block { headers, without_headers: without, query_params: query, ..Default::default() };
        prop_assert_eq!(b.compile().matches(&req.view()), b.reference(&req));
    }

    /// Weighted picks: over a uniform grid of `r` in [0, 1), each destination is chosen exactly
    /// in proportion to its weight; destinations of weight 0 are never chosen; all-zero weights
    /// pick nothing.
    #[test]
    fn weighted_pick_follows_weights(
        weights in prop::collection::vec(prop_oneof![1 => Just(0u32), 4 => 0u32..500], 1..6),
        edge in prop_oneof![Just(0.0), Just(1.0 - f64::EPSILON), 0.0f64..1.0],
    ) {
        let r = rule(0, &[], &weights);
        let total: u64 = weights.iter().map(|w| *w as u64).sum();
        if total == 0 {
            prop_assert!(r.pick(0.5).is_none());
            prop_assert!(r.pick(edge).is_none());
            return Ok(());
        }
        let per = 4u64;
        let n = total * per;
        let mut counts = vec![0u64; weights.len()];
        for i in 0..n {
            let x = (i as f64 + 0.5) / n as f64;
            let d = r.pick(x).expect("a destination");
            let idx: usize = d.cluster.name[1..].parse().unwrap();
            counts[idx] += 1;
        }
        let want: Vec<u64> = weights.iter().map(|w| *w as u64 * per).collect();
        prop_assert_eq!(counts, want);
        let d = r.pick(edge).expect("a destination at the edges of [0, 1)");
        prop_assert!(d.weight > 0);
    }

    /// Large weights (sums beyond u32) still pick in range.
    #[test]
    fn weighted_pick_with_huge_weights(
        weights in prop::collection::vec(any::<u32>(), 1..6),
        x in 0.0f64..1.0,
    ) {
        let r = rule(0, &[], &weights);
        match r.pick(x) {
            Some(d) => prop_assert!(d.weight > 0),
            None => prop_assert!(weights.iter().all(|w| *w == 0)),
        }
    }
}

proptest! {
    // Unicode regexes are slow to compile in debug builds.
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The same over arbitrary Unicode: exact/prefix with case folding never panic on
    /// multi-byte values (prefix compares bytes), and regexes are anchored at both ends.
    #[test]
    fn string_matches_on_unicode(p in "\\PC{0,6}", v in "\\PC{0,8}", ci in any::<bool>()) {
        prop_assert_eq!(
            StrMatch::Exact(p.clone()).matches(&v, ci),
            Cond::Exact(p.clone()).reference(&v, ci)
        );
        prop_assert_eq!(
            StrMatch::Prefix(p.clone()).matches(&v, ci),
            Cond::Prefix(p.clone()).reference(&v, ci)
        );
        let literal = StrMatch::regex(&regex::escape(&p)).unwrap();
        prop_assert_eq!(literal.matches(&v, false), p == v);
        let prefix = StrMatch::regex(&format!("{}(?s:.*)", regex::escape(&p))).unwrap();
        prop_assert_eq!(prefix.matches(&v, false), v.starts_with(&p));
        // A pattern that matches a prefix of the value only is not a match.
        let v_and_more = format!("{v}x");
        prop_assert!(!StrMatch::regex(&regex::escape(&v)).unwrap().matches(&v_and_more, false));
    }
}

// ---- the same property through the whole pipeline: VirtualService → compile → explain ----

fn cond_json(c: &Cond) -> serde_json::Value {
    match c {
        Cond::Exact(s) => serde_json::json!({ "exact": s }),
        Cond::Prefix(s) => serde_json::json!({ "prefix": s }),
        Cond::Regex(p) => serde_json::json!({ "regex": pattern_source(p) }),
        Cond::Present => serde_json::json!({}),
    }
}

/// A VirtualService for `r` with one `http` rule per entry of `rules`, each with the
/// conditions explain can express (uri, method, headers).
fn virtual_service(rules: &[Vec<Block>]) -> serde_json::Value {
    let http: Vec<serde_json::Value> = rules
        .iter()
        .enumerate()
        .map(|(i, blocks)| {
            let matches: Vec<serde_json::Value> = blocks
                .iter()
                .map(|b| {
                    let mut m = serde_json::Map::new();
                    if let Some(u) = &b.uri {
                        m.insert("uri".into(), cond_json(u));
                    }
                    if let Some(c) = &b.method {
                        m.insert("method".into(), cond_json(c));
                    }
                    if !b.headers.is_empty() {
                        let h: serde_json::Map<String, serde_json::Value> = b
                            .headers
                            .iter()
                            .map(|(n, c)| (n.clone(), cond_json(c)))
                            .collect();
                        m.insert("headers".into(), h.into());
                    }
                    serde_json::Value::Object(m)
                })
                .collect();
            let mut rule = serde_json::json!({
                "name": format!("rule{i}"),
                "route": [{ "destination": { "host": "r" } }],
            });
            if !matches.is_empty() {
                rule["match"] = matches.into();
            }
            rule
        })
        .collect();
    serde_json::json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": { "name": "r" },
        "spec": { "hosts": ["r"], "http": http },
    })
}

fn pipeline_block() -> impl Strategy<Value = Block> {
    (
        prop::option::weighted(0.7, cond()),
        prop::option::weighted(0.2, cond()),
        // Real header names only (a map: one condition per name).
        prop::collection::btree_map(
            prop::sample::select(vec!["x-a", "x-b"]).prop_map(String::from),
            cond(),
            0..2,
        ),
    )
        .prop_map(|(uri, method, headers)| Block {
            uri,
            method,
            headers: headers.into_iter().collect(),
            ..Default::default()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// `steerd explain` over a parsed and compiled VirtualService reports the first matching
    /// rule in `spec.http` order.
    #[test]
    fn explain_reports_the_first_matching_rule(
        rules in prop::collection::vec(prop::collection::vec(pipeline_block(), 0..3), 1..5),
        req in request(),
    ) {
        let origin = Origin { source: "prop.yaml".into(), line: Some(1) };
        let service = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": "r" },
            "spec": { "clusterIP": "10.96.0.1", "ports": [{ "port": 80, "name": "http" }] },
        });
        let mut cfg = ConfigSet::default();
        for v in [service, virtual_service(&rules)] {
            cfg.extend(parse_value(&origin, &v).expect("parses").expect("a supported kind"));
        }
        let q = Query {
            host: "r".into(),
            port: Some(80),
            namespace: "default".into(),
            path: Some(req.path.clone()),
            method: Some(req.method.clone()),
            headers: req.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            ..Default::default()
        };
        let e = explain(&cfg, &q).expect("explains");
        // What explain sends as the request.
        let sent = Req {
            authority: "r:80".into(),
            port: 80,
            query: String::new(),
            source_labels: None,
            gateway: "mesh".into(),
            ..req
        };
        prop_assert_eq!(e.route.map(|r| r.index), reference_select(&rules, &sent));
    }
}
