//! Delegate VirtualServices (Istio's VirtualService chaining): a root VirtualService's `http`
//! route with `delegate: {name, namespace}` is replaced by the delegate's `http` routes, each
//! merged with the root route the way Istio's `mergeHTTPRoute` merges them, before routes are
//! compiled.
//!
//! Semantics, as Istio's:
//! - A delegate is a VirtualService without `hosts`, looked up by `namespace/name` (namespace
//!   defaults to the root's); one that does not exist (or is not exported to the root's
//!   namespace) drops just that root route, with a warning.
//! - Each delegate match block must lie within some root match block (no conflict, see
//!   [`match_conflict`]); it becomes one merged block per non-conflicting root block: the
//!   delegate's conditions, the root's where the delegate sets none, header, query and
//!   sourceLabels maps merged (the delegate's value wins). A delegate route with a block that
//!   fits no root block is dropped, with a warning. Without root matches the delegate's stand;
//!   without delegate matches the root's.
//! - Route-level settings the delegate route leaves unset come from the root route: rewrite,
//!   directResponse, timeout, retries, fault, mirror(s) and their percentage, corsPolicy,
//!   headers. Names join as `root-delegate`.
//! - The delegate's short host names resolve in the delegate's namespace; what is inherited
//!   from the root (mirrors, match gateways) in the root's.

use super::registry::resolve_host;
use super::{Ctx, gateway_ref};
use crate::model::Resource;
use crate::model::istio::{self, HttpMatchRequest, HttpRoute, StringMatch, VirtualService};
use std::borrow::Cow;
use std::collections::BTreeSet;

/// One `http` route of a VirtualService as routes are compiled, after delegation.
pub(super) struct ExpandedRoute<'r> {
    /// Where the route is written: the root, or the delegate whose route it is. Diagnostics
    /// name it and its namespace resolves the route's short host names.
    pub owner: &'r Resource<VirtualService>,
    /// Index in the owner's `spec.http`.
    pub index: usize,
    pub route: Cow<'r, HttpRoute>,
    /// For a delegate's route: the index of the root route that delegated to it.
    pub delegated_by: Option<usize>,
}

/// The `(namespace, name)` of every VirtualService `vs`'s routes delegate to.
pub fn delegate_keys(vs: &Resource<VirtualService>) -> BTreeSet<(String, String)> {
    vs.spec
        .http
        .iter()
        .filter_map(|r| r.delegate.as_ref())
        .filter_map(|d| {
            let name = d.name.clone().filter(|n| !n.is_empty())?;
            let namespace = d
                .namespace
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| vs.meta.namespace.to_string());
            Some((namespace, name))
        })
        .collect()
}

/// The delegate VirtualService `namespace/name`: the first without `hosts` (Istio only takes
/// host-less VirtualServices as delegates).
pub fn find_delegate<'c>(
    virtual_services: &'c [crate::model::Shared<VirtualService>],
    namespace: &str,
    name: &str,
) -> Option<&'c Resource<VirtualService>> {
    virtual_services
        .iter()
        .map(|v| &**v)
        .find(|v| v.meta.namespace == namespace && v.meta.name == name && v.spec.is_delegate())
}

/// Whether a VirtualService is visible from `namespace` (`exportTo`; none means everywhere).
fn exported_to(vs: &Resource<VirtualService>, namespace: &str) -> bool {
    vs.spec.export_to.is_empty()
        || vs
            .spec
            .export_to
            .iter()
            .any(|e| e == "*" || e == namespace || (e == "." && vs.meta.namespace == namespace))
}

/// Istio's `stringMatchConflict`: whether a delegate condition can match outside the root's.
fn string_match_conflict(root: Option<&StringMatch>, leaf: Option<&StringMatch>) -> bool {
    let (Some(root), Some(leaf)) = (root, leaf) else {
        return false;
    };
    // Istio reads unset kinds as empty strings.
    let parts = |m: &StringMatch| -> (String, String, String) {
        match m {
            StringMatch::Exact(s) => (s.clone(), String::new(), String::new()),
            StringMatch::Prefix(s) => (String::new(), s.clone(), String::new()),
            StringMatch::Regex(s) => (String::new(), String::new(), s.clone()),
            StringMatch::Unset => Default::default(),
        }
    };
    let (r_exact, r_prefix, r_regex) = parts(root);
    let (l_exact, l_prefix, l_regex) = parts(leaf);
    let leaf_any = !(l_exact.is_empty() && l_prefix.is_empty() && l_regex.is_empty());
    let root_any = !(r_exact.is_empty() && r_prefix.is_empty() && r_regex.is_empty());
    // A regex on either side cannot be compared with anything.
    if (!r_regex.is_empty() && leaf_any) || (!l_regex.is_empty() && root_any) {
        return true;
    }
    if !r_exact.is_empty() {
        return !l_prefix.is_empty() || l_exact != r_exact;
    }
    if !r_prefix.is_empty() {
        if !l_prefix.is_empty() {
            return !l_prefix.starts_with(&r_prefix);
        }
        if !l_exact.is_empty() {
            return !l_exact.starts_with(&r_prefix);
        }
    }
    true
}

/// Istio's `hasConflict`: whether a delegate match block can match requests the root block
/// does not.
pub fn match_conflict(root: &HttpMatchRequest, leaf: &HttpMatchRequest) -> bool {
    let pairs = [
        (&root.uri, &leaf.uri),
        (&root.scheme, &leaf.scheme),
        (&root.method, &leaf.method),
        (&root.authority, &leaf.authority),
    ];
    if pairs
        .iter()
        .any(|(r, l)| string_match_conflict(r.as_ref(), l.as_ref()))
    {
        return true;
    }
    let maps = [
        (&root.headers, &leaf.headers),
        (&root.without_headers, &leaf.without_headers),
        (&root.query_params, &leaf.query_params),
    ];
    for (r, l) in maps {
        if l.iter()
            .any(|(k, v)| string_match_conflict(r.get(k), Some(v)))
        {
            return true;
        }
    }
    if root.ignore_uri_case.unwrap_or(false) != leaf.ignore_uri_case.unwrap_or(false) {
        return true;
    }
    let port = |p: Option<u32>| p.filter(|p| *p > 0);
    if let (Some(r), Some(l)) = (port(root.port), port(leaf.port))
        && r != l
    {
        return true;
    }
    if let Some(ns) = root.source_namespace.as_deref().filter(|n| !n.is_empty())
        && leaf.source_namespace.as_deref() != Some(ns)
    {
        return true;
    }
    if leaf
        .source_labels
        .iter()
        .any(|(k, v)| root.source_labels.get(k).is_some_and(|r| r != v))
    {
        return true;
    }
    if !root.gateways.is_empty() && !leaf.gateways.is_empty() {
        let roots: BTreeSet<&String> = root.gateways.iter().collect();
        if root.gateways.len() < leaf.gateways.len()
            || leaf.gateways.iter().any(|g| !roots.contains(g))
        {
            return true;
        }
    }
    false
}

fn joined_name(root: &Option<String>, leaf: &Option<String>) -> Option<String> {
    let root = root.as_deref().filter(|n| !n.is_empty());
    match (root, leaf.as_deref().filter(|n| !n.is_empty())) {
        (None, leaf) => leaf.map(str::to_string),
        (Some(r), None) => Some(r.to_string()),
        (Some(r), Some(l)) => Some(format!("{r}-{l}")),
    }
}

/// Istio's `mergeHTTPMatchRequest`. The root's match gateways are resolved in its namespace.
fn merge_match(
    root: &HttpMatchRequest,
    leaf: &HttpMatchRequest,
    root_ns: &str,
) -> HttpMatchRequest {
    let mut out = leaf.clone();
    out.name = joined_name(&root.name, &leaf.name);
    for (o, r) in [
        (&mut out.uri, &root.uri),
        (&mut out.scheme, &root.scheme),
        (&mut out.method, &root.method),
        (&mut out.authority, &root.authority),
    ] {
        if o.is_none() {
            o.clone_from(r);
        }
    }
    let merge = |r: &std::collections::BTreeMap<String, StringMatch>,
                 l: &std::collections::BTreeMap<String, StringMatch>| {
        let mut m = r.clone();
        m.extend(l.iter().map(|(k, v)| (k.clone(), v.clone())));
        m
    };
    out.headers = merge(&root.headers, &leaf.headers);
    out.without_headers = merge(&root.without_headers, &leaf.without_headers);
    out.query_params = merge(&root.query_params, &leaf.query_params);
    if out.port.unwrap_or(0) == 0 {
        out.port = root.port;
    }
    let mut labels = root.source_labels.clone();
    labels.extend(
        leaf.source_labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    out.source_labels = labels;
    if out.source_namespace.as_deref().unwrap_or("").is_empty() {
        out.source_namespace.clone_from(&root.source_namespace);
    }
    if out.gateways.is_empty() {
        out.gateways = root
            .gateways
            .iter()
            .map(|g| gateway_ref(g, root_ns))
            .collect();
    }
    if out.stat_prefix.as_deref().unwrap_or("").is_empty() {
        out.stat_prefix.clone_from(&root.stat_prefix);
    }
    out
}

/// Istio's `mergeHTTPMatchRequests`: None when a delegate block fits no root block.
fn merge_matches(
    root: &[HttpMatchRequest],
    leaf: &[HttpMatchRequest],
    root_ns: &str,
) -> Option<Vec<HttpMatchRequest>> {
    if root.is_empty() {
        return Some(leaf.to_vec());
    }
    if leaf.is_empty() {
        return Some(
            root.iter()
                .map(|r| merge_match(r, &HttpMatchRequest::default(), root_ns))
                .collect(),
        );
    }
    let mut out = Vec::new();
    for l in leaf {
        let before = out.len();
        out.extend(
            root.iter()
                .filter(|r| !match_conflict(r, l))
                .map(|r| merge_match(r, l, root_ns)),
        );
        if out.len() == before {
            return None;
        }
    }
    Some(out)
}

/// Istio's `mergeHTTPRoute`: the delegate route under the root route, or None when their
/// matches conflict. Inherited destinations are resolved in the root's namespace.
pub fn merge_route(root: &HttpRoute, root_ns: &str, leaf: &HttpRoute) -> Option<HttpRoute> {
    let matches = merge_matches(&root.matches, &leaf.matches, root_ns)?;
    let mut out = leaf.clone();
    out.matches = matches;
    out.delegate = None;
    out.name = joined_name(&root.name, &leaf.name);
    let resolved = |d: &istio::Destination| istio::Destination {
        host: resolve_host(&d.host, root_ns),
        ..d.clone()
    };
    if out.rewrite.is_none() {
        out.rewrite.clone_from(&root.rewrite);
    }
    if out.direct_response.is_none() {
        out.direct_response.clone_from(&root.direct_response);
    }
    if out.timeout.is_none() {
        out.timeout = root.timeout;
    }
    if out.retries.is_none() {
        out.retries.clone_from(&root.retries);
    }
    if out.fault.is_none() {
        out.fault.clone_from(&root.fault);
    }
    if out.mirror.is_none() {
        out.mirror = root.mirror.as_ref().map(resolved);
    }
    if out.mirror_percent().is_none() {
        out.mirror_percent = root.mirror_percent();
    }
    if out.mirror_percentage.is_none() {
        out.mirror_percentage = root.mirror_percentage;
    }
    if out.cors_policy.is_none() {
        out.cors_policy.clone_from(&root.cors_policy);
    }
    if out.mirrors.is_empty() {
        out.mirrors = root
            .mirrors
            .iter()
            .map(|m| istio::HttpMirrorPolicy {
                destination: resolved(&m.destination),
                ..m.clone()
            })
            .collect();
    }
    if out.headers.is_none() {
        out.headers.clone_from(&root.headers);
    }
    Some(out)
}

impl<'a> Ctx<'a> {
    /// `root`'s http routes with every delegating route replaced by its delegate's routes,
    /// merged under it (see the module docs). Routes without delegation are borrowed as they
    /// are.
    pub(super) fn expanded_http<'r>(
        &mut self,
        root: &'r Resource<VirtualService>,
    ) -> Vec<ExpandedRoute<'r>>
    where
        'a: 'r,
    {
        let config: &'a crate::model::ConfigSet = self.config;
        let mut out = Vec::with_capacity(root.spec.http.len());
        for (i, route) in root.spec.http.iter().enumerate() {
            let Some(delegate) = &route.delegate else {
                out.push(ExpandedRoute {
                    owner: root,
                    index: i,
                    route: Cow::Borrowed(route),
                    delegated_by: None,
                });
                continue;
            };
            let field = format!("spec.http[{i}].delegate");
            let namespace = delegate
                .namespace
                .as_deref()
                .filter(|n| !n.is_empty())
                .unwrap_or(&root.meta.namespace);
            let name = delegate.name.as_deref().unwrap_or("");
            let Some(vs) = find_delegate(&config.virtual_services, namespace, name) else {
                self.warn(
                    root,
                    field,
                    Some("IST0101"),
                    format!(
                        "Referenced delegate VirtualService not found: \"{namespace}/{name}\"; the route is dropped"
                    ),
                );
                continue;
            };
            if !exported_to(vs, &root.meta.namespace) {
                self.warn(
                    root,
                    field,
                    None,
                    format!(
                        "delegate VirtualService {namespace}/{name} is not exported to namespace {}; the route is dropped",
                        root.meta.namespace
                    ),
                );
                continue;
            }
            for (j, leaf) in vs.spec.http.iter().enumerate() {
                if leaf.delegate.is_some() {
                    self.warn(
                        vs,
                        format!("spec.http[{j}].delegate"),
                        None,
                        "a delegate's route cannot delegate again; the route is dropped".into(),
                    );
                    continue;
                }
                match merge_route(route, &root.meta.namespace, leaf) {
                    Some(merged) => out.push(ExpandedRoute {
                        owner: vs,
                        index: j,
                        route: Cow::Owned(merged),
                        delegated_by: Some(i),
                    }),
                    None => self.warn(
                        vs,
                        format!("spec.http[{j}].match"),
                        None,
                        format!(
                            "the matches conflict with those of the delegating route (VirtualService {} spec.http[{i}]); the route is dropped, as Istio does",
                            root.meta.key()
                        ),
                    ),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_documents;

    fn route(yaml: &str) -> HttpRoute {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn m(yaml: &str) -> HttpMatchRequest {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn string_conditions_must_lie_within_the_root() {
        let exact = |s: &str| StringMatch::Exact(s.into());
        let prefix = |s: &str| StringMatch::Prefix(s.into());
        let regex = |s: &str| StringMatch::Regex(s.into());
        let conflict = |r: StringMatch, l: StringMatch| string_match_conflict(Some(&r), Some(&l));
        assert!(!conflict(prefix("/a"), prefix("/a/b")));
        assert!(
            conflict(prefix("/a/b"), prefix("/a")),
            "wider than the root"
        );
        assert!(!conflict(prefix("/a"), exact("/a/x")));
        assert!(conflict(prefix("/a"), exact("/b")));
        assert!(!conflict(exact("/a"), exact("/a")));
        assert!(conflict(exact("/a"), exact("/b")));
        assert!(conflict(exact("/a"), prefix("/a")));
        assert!(conflict(regex("/a.*"), prefix("/a")));
        assert!(conflict(prefix("/a"), regex("/a.*")));
        assert!(!string_match_conflict(Some(&regex("/a.*")), None));
        assert!(!string_match_conflict(None, Some(&regex("/a.*"))));
    }

    #[test]
    fn blocks_conflict_like_istio() {
        let root = m("{uri: {prefix: /productpage}, headers: {x-a: {exact: '1'}}, port: 9080}");
        assert!(!match_conflict(
            &root,
            &m("{uri: {prefix: /productpage/v2}}")
        ));
        assert!(!match_conflict(
            &root,
            &m("{headers: {x-a: {exact: '1'}, end-user: {exact: jason}}}")
        ));
        assert!(match_conflict(&root, &m("{headers: {x-a: {exact: '2'}}}")));
        assert!(match_conflict(&root, &m("{port: 9081}")));
        assert!(match_conflict(&root, &m("{ignoreUriCase: true}")));
        let ns = m("{sourceNamespace: shop, sourceLabels: {app: a}}");
        assert!(
            match_conflict(&ns, &m("{}")),
            "the root's namespace must be kept"
        );
        assert!(!match_conflict(
            &ns,
            &m("{sourceNamespace: shop, sourceLabels: {v: '1'}}")
        ));
        assert!(match_conflict(
            &ns,
            &m("{sourceNamespace: shop, sourceLabels: {app: b}}")
        ));
        let gw = m("{gateways: [a, b]}");
        assert!(!match_conflict(&gw, &m("{gateways: [a]}")));
        assert!(match_conflict(&gw, &m("{gateways: [c]}")));
    }

    #[test]
    fn routes_merge_like_istio() {
        let root = route(
            "{name: pp, match: [{uri: {prefix: /productpage}}, {uri: {prefix: /static}}], delegate: {name: d}, timeout: 5s, mirror: {host: shadow}, headers: {request: {set: {x-root: '1'}}}}",
        );
        let leaf = route(
            "{name: jason, match: [{headers: {end-user: {exact: jason}}}, {uri: {prefix: /productpage/v2}}], route: [{destination: {host: reviews, subset: v2}}], timeout: 1s}",
        );
        let merged = merge_route(&root, "shop", &leaf).unwrap();
        assert_eq!(merged.name.as_deref(), Some("pp-jason"));
        assert_eq!(merged.delegate, None);
        // Block 1 (a header) fits both root blocks; block 2 (a uri) only the first.
        assert_eq!(
            merged.matches,
            vec![
                m("{uri: {prefix: /productpage}, headers: {end-user: {exact: jason}}}"),
                m("{uri: {prefix: /static}, headers: {end-user: {exact: jason}}}"),
                m("{uri: {prefix: /productpage/v2}}"),
            ]
        );
        assert_eq!(
            merged.timeout, leaf.timeout,
            "the delegate's own setting wins"
        );
        assert_eq!(
            merged.mirror.as_ref().map(|d| d.host.as_str()),
            Some("shadow.shop.svc.cluster.local"),
            "inherited, resolved in the root's namespace"
        );
        assert_eq!(merged.headers, root.headers);
        assert_eq!(merged.route, leaf.route);
        // No matches on either side.
        let bare = merge_route(&route("{delegate: {name: d}}"), "shop", &leaf).unwrap();
        assert_eq!(bare.matches, leaf.matches);
        let catch_all =
            merge_route(&root, "shop", &route("{route: [{destination: {host: r}}]}")).unwrap();
        assert_eq!(catch_all.matches.len(), 2, "the root's blocks");
        // A block outside every root block drops the route.
        assert!(merge_route(&root, "shop", &route("{match: [{uri: {prefix: /api}}]}")).is_none());
    }

    #[test]
    fn delegate_keys_default_to_the_root_namespace() {
        let (objs, errs) = parse_documents(
            "vs.yaml",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: root, namespace: shop}\nspec:\n  hosts: [web]\n  http:\n  - match: [{uri: {prefix: /a}}]\n    delegate: {name: a}\n  - match: [{uri: {prefix: /b}}]\n    delegate: {name: b, namespace: other}\n  - route: [{destination: {host: web}}]\n",
        );
        assert!(errs.is_empty(), "{errs:?}");
        let crate::model::Object::VirtualService(vs) = &objs[0] else {
            panic!()
        };
        assert_eq!(
            delegate_keys(vs),
            [
                ("other".to_string(), "b".to_string()),
                ("shop".to_string(), "a".to_string())
            ]
            .into()
        );
    }
}
