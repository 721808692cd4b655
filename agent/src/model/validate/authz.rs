//! AuthorizationPolicy validation: what Istio's webhook (`ValidateAuthorizationPolicy` and
//! `pkg/config/security`) and the CRD's CEL rules refuse, with Istio's messages, each at the
//! path of the offending field (`spec.rules[0].from[1].source.ipBlocks[2]`).
//!
//! Deliberate deviations:
//! - Istio reports errors once per rule (`..., found at rule 0`); here they name the field, so
//!   the "found at rule N" suffixes are dropped.
//! - `from: []` and `to: []` are refused as Istio's code intends (its protobuf decoding turns an
//!   empty list into an absent one, so the check rarely fires there).
//! - Methods that are not HTTP tokens and paths that start with neither `/` nor `*` are
//!   warnings: Istio admits them, but no request can ever match them.
//!
//! What steerd cannot enforce (principals, JWT attributes, CUSTOM, ...) is valid Istio and is
//! reported by the compiler (`compile::authz`), not here.

use super::{Report, at, idx, validate_match_labels};
use crate::compile::Diagnostic;
use crate::model::security::{
    Action, AuthorizationPolicy, Operation, PolicyTargetReference, Source,
};
use crate::model::{Kind, Resource};

/// Istio's `istio.io/dry-run` annotation: allowed on AuthorizationPolicies only.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Whether an annotation value is true as Istio reads it (`strconv.ParseBool`).
pub fn annotation_is_true(value: &str) -> bool {
    parse_go_bool(value) == Some(true)
}

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

pub fn validate_authorization_policy(r: &Resource<AuthorizationPolicy>) -> Vec<Diagnostic> {
    let mut report = Report::default();
    super::validate_metadata_except_dry_run(&mut report, r);
    let ap = &r.spec;
    let action = ap.action();
    if let Some(value) = r.meta.annotations.get(DRY_RUN_ANNOTATION) {
        let name = format!("{}/{}", r.meta.namespace, r.meta.name);
        match action {
            Action::Allow | Action::Deny => {
                if parse_go_bool(value).is_none() {
                    report.error(
                        "metadata.annotations",
                        format!(
                            "{name} has annotation {DRY_RUN_ANNOTATION} with invalid value ({value}): strconv.ParseBool: parsing {value:?}: invalid syntax"
                        ),
                    );
                }
            }
            other => report.error(
                "metadata.annotations",
                format!(
                    "the annotation {DRY_RUN_ANNOTATION} currently only supports action ALLOW/DENY, found action {} in {name}",
                    other.as_str()
                ),
            ),
        }
    }

    let target_refs = ap.target_refs.as_deref().unwrap_or_default();
    let selectors = usize::from(ap.selector.is_some())
        + usize::from(ap.target_ref.is_some())
        + usize::from(!target_refs.is_empty());
    if selectors > 1 {
        report.error(
            "spec",
            "only one of targetRefs or workloadSelector can be set",
        );
    }
    if let Some(selector) = &ap.selector {
        validate_match_labels(
            &mut report,
            "spec.selector.matchLabels",
            &selector.match_labels,
        );
        if selector.match_labels.is_empty() {
            report.warning(
                "spec.selector",
                "workload selector specified without labels",
            );
        }
    }
    if let Some(t) = &ap.target_ref {
        validate_target_ref(&mut report, "spec.targetRef", t);
    }
    for (i, t) in target_refs.iter().enumerate() {
        validate_target_ref(&mut report, &idx("spec", "targetRefs", i), t);
    }

    let provider_name = ap.provider.as_ref().and_then(|p| p.name.as_deref());
    if action == Action::Custom {
        if ap.rules.is_none() {
            report.error(
                "spec.rules",
                "CUSTOM action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request",
            );
        } else if provider_name.is_none_or(str::is_empty) {
            report.error("spec.provider.name", "`provider.name` must not be empty");
        }
    }
    if ap.provider.is_some() && action != Action::Custom {
        report.error(
            "spec.provider",
            format!(
                "`provider` must not be with non CUSTOM action, found {}",
                action.as_str()
            ),
        );
    }
    // Istio's protobuf decoding makes `rules: []` as absent as no `rules` at all.
    if action == Action::Deny && ap.rules().is_empty() {
        report.error(
            "spec.rules",
            "DENY action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request",
        );
    }

    for (i, rule) in ap.rules().iter().enumerate() {
        let rp = idx("spec", "rules", i);
        if rule.from.as_ref().is_some_and(Vec::is_empty) {
            report.error(&at(&rp, "from"), "`from` must not be empty");
        }
        let (mut from_exists, mut tcp_in_from) = (false, false);
        for (j, from) in rule.from().iter().enumerate() {
            let fp = idx(&rp, "from", j);
            let Some(src) = &from.source else {
                report.error(&at(&fp, "source"), "`from.source` must not be nil");
                continue;
            };
            from_exists = true;
            tcp_in_from |= validate_source(&mut report, &at(&fp, "source"), src, action);
        }
        if rule.to.as_ref().is_some_and(Vec::is_empty) {
            report.error(&at(&rp, "to"), "`to` must not be empty");
        }
        let (mut to_exists, mut tcp_in_to) = (false, false);
        for (j, to) in rule.to().iter().enumerate() {
            let tp = idx(&rp, "to", j);
            let Some(op) = &to.operation else {
                report.error(&at(&tp, "operation"), "`to.operation` must not be nil");
                continue;
            };
            to_exists = true;
            tcp_in_to |= validate_operation(&mut report, &at(&tp, "operation"), op);
        }
        for (j, cond) in rule.when().iter().enumerate() {
            let wp = idx(&rp, "when", j);
            let k = cond.key.as_str();
            if k.is_empty() {
                report.error(&at(&wp, "key"), "`key` must not be empty");
                continue;
            }
            if cond.values.is_empty() && cond.not_values.is_empty() {
                report.error(
                    &wp,
                    format!("at least one of `values` or `notValues` must be set for key {k}"),
                );
                continue;
            }
            for (field, values, what) in [
                ("values", &cond.values, "value"),
                ("notValues", &cond.not_values, "notValue"),
            ] {
                // Istio checks the key again for an empty list; once is enough.
                if values.is_empty() {
                    continue;
                }
                if let Err(e) = validate_attribute(k, values) {
                    report.error(
                        &at(&wp, field),
                        format!("invalid `{what}` for `key` {k}: {e}"),
                    );
                }
            }
            if action == Action::Custom && custom_unsupported_key(k) {
                report.error(
                    &at(&wp, "key"),
                    format!("{k} is currently not supported with CUSTOM action"),
                );
            }
        }
        if action == Action::Deny
            && ((from_exists && !to_exists && !tcp_in_from) || (to_exists && !tcp_in_to))
        {
            report.warning(
                &rp,
                "configured AuthorizationPolicy will deny all traffic to TCP ports under its scope due to the use of only HTTP attributes in a DENY rule; it is recommended to explicitly specify the port",
            );
        }
    }
    report.finish(Kind::AuthorizationPolicy, r)
}

/// Allowed `targetRef` kinds (Istio's `allowedTargetRefs`), as (group, kind).
const ALLOWED_TARGET_REFS: [(&str, &str); 4] = [
    ("core", "Service"),
    ("networking.istio.io", "ServiceEntry"),
    ("gateway.networking.k8s.io", "Gateway"),
    ("gateway.networking.k8s.io", "GatewayClass"),
];

fn validate_target_ref(report: &mut Report, path: &str, t: &PolicyTargetReference) {
    if t.name.is_empty() {
        report.error(&at(path, "name"), "targetRef name must be set");
    }
    if t.namespace.as_deref().is_some_and(|n| !n.is_empty()) {
        report.error(
            &at(path, "namespace"),
            "targetRef namespace must not be set; cross namespace referencing is not supported",
        );
    }
    let group = t.group.as_deref().unwrap_or_default();
    let canonical = if group.is_empty() { "core" } else { group };
    if !ALLOWED_TARGET_REFS.contains(&(canonical, t.kind.as_str())) {
        report.error(
            path,
            format!(
                "targetRef must be to one of [core/v1/Service networking.istio.io/v1/ServiceEntry gateway.networking.k8s.io/v1/Gateway gateway.networking.k8s.io/v1/GatewayClass] but was {group}/{}",
                t.kind
            ),
        );
    }
}

/// Checks one `from[].source`; returns whether it has fields a TCP connection can be matched
/// on (Istio's `tcpRulesInFrom`).
fn validate_source(report: &mut Report, path: &str, src: &Source, action: Action) -> bool {
    let identity = src.principals.len()
        + src.not_principals.len()
        + src.namespaces.len()
        + src.not_namespaces.len();
    if identity > 0 && src.service_accounts.len() + src.not_service_accounts.len() > 0 {
        report.error(
            path,
            "cannot set serviceAccounts with namespaces or principals",
        );
    }
    let lists: [(&str, &Vec<String>); 14] = [
        ("principals", &src.principals),
        ("notPrincipals", &src.not_principals),
        ("requestPrincipals", &src.request_principals),
        ("notRequestPrincipals", &src.not_request_principals),
        ("namespaces", &src.namespaces),
        ("notNamespaces", &src.not_namespaces),
        ("serviceAccounts", &src.service_accounts),
        ("notServiceAccounts", &src.not_service_accounts),
        ("trustDomains", &src.trust_domains),
        ("notTrustDomains", &src.not_trust_domains),
        ("ipBlocks", &src.ip_blocks),
        ("notIpBlocks", &src.not_ip_blocks),
        ("remoteIpBlocks", &src.remote_ip_blocks),
        ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
    ];
    if lists.iter().all(|(_, l)| l.is_empty()) {
        report.error(path, "`from.source` must not be empty");
    }
    for (field, values) in lists {
        let fp = at(path, field);
        let go_name = go_field_name(field);
        match field {
            "serviceAccounts" | "notServiceAccounts" => {
                report.result(&fp, check_service_accounts(&go_name, values));
            }
            "trustDomains" | "notTrustDomains" => {
                report.result(&fp, check_trust_domains(&go_name, values));
            }
            _ => report.result(&fp, check_empty_values(&go_name, values)),
        }
        if field.ends_with("IpBlocks") || field.ends_with("ipBlocks") {
            for (i, v) in values.iter().enumerate() {
                if let Err(e) = validate_ip(v) {
                    report.error(&format!("{fp}[{i}]"), e);
                }
            }
        }
        if action == Action::Custom
            && !values.is_empty()
            && !field.ends_with("IpBlocks")
            && !field.ends_with("ipBlocks")
        {
            report.error(
                &fp,
                format!("From.{go_name} is currently not supported with CUSTOM action"),
            );
        }
    }
    !(src.principals.is_empty()
        && src.not_principals.is_empty()
        && src.ip_blocks.is_empty()
        && src.not_ip_blocks.is_empty()
        && src.namespaces.is_empty()
        && src.not_namespaces.is_empty()
        && src.remote_ip_blocks.is_empty()
        && src.not_remote_ip_blocks.is_empty()
        && src.service_accounts.is_empty()
        && src.not_service_accounts.is_empty())
}

/// Checks one `to[].operation`; returns whether it has ports (Istio's `tcpRulesInTo`).
fn validate_operation(report: &mut Report, path: &str, op: &Operation) -> bool {
    let lists: [(&str, &Vec<String>); 8] = [
        ("hosts", &op.hosts),
        ("notHosts", &op.not_hosts),
        ("ports", &op.ports),
        ("notPorts", &op.not_ports),
        ("methods", &op.methods),
        ("notMethods", &op.not_methods),
        ("paths", &op.paths),
        ("notPaths", &op.not_paths),
    ];
    if lists.iter().all(|(_, l)| l.is_empty()) {
        report.error(path, "`to.operation` must not be empty");
    }
    for (field, values) in lists {
        let fp = at(path, field);
        let go_name = go_field_name(field);
        report.result(&fp, check_empty_values(&go_name, values));
        for (i, v) in values.iter().enumerate() {
            let vp = format!("{fp}[{i}]");
            match field {
                "ports" | "notPorts" => report.result(&vp, validate_port_value(v)),
                "paths" | "notPaths" => {
                    report.result(&vp, check_valid_path_template(&go_name, v));
                    if !v.is_empty() && !v.starts_with('/') && !v.starts_with('*') {
                        report.warning(
                            &vp,
                            format!("path {v:?} starts with neither \"/\" nor \"*\"; no request path can match it"),
                        );
                    }
                }
                "methods" | "notMethods" => {
                    let token = v.trim_matches('*');
                    if !token.is_empty() && !is_http_token(token) {
                        report.warning(
                            &vp,
                            format!(
                                "method {v:?} is not an HTTP token; no request method can match it"
                            ),
                        );
                    }
                }
                _ => {}
            }
        }
    }
    !(op.ports.is_empty() && op.not_ports.is_empty())
}

/// The protobuf field name Istio's messages use (`notIpBlocks` → `NotIpBlocks`).
fn go_field_name(field: &str) -> String {
    let mut c = field.chars();
    match c.next() {
        Some(first) => first.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

fn is_http_token(s: &str) -> bool {
    s.bytes().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            )
    })
}

fn custom_unsupported_key(k: &str) -> bool {
    matches!(
        k,
        "source.namespace" | "source.serviceAccount" | "source.trustDomain" | "source.principal"
    ) || k.starts_with("request.auth.")
}

fn check_empty_values(key: &str, values: &[String]) -> Result<(), String> {
    if values.iter().any(String::is_empty) {
        return Err(format!("empty value not allowed, found in {key}"));
    }
    Ok(())
}

fn check_wildcard_values(key: &str, values: &[String]) -> Result<(), String> {
    check_empty_values(key, values)?;
    for v in values {
        let count = v.matches('*').count();
        if count > 1 {
            return Err(format!(
                "at most one wildcard is allowed, found in {key}: {v:?}"
            ));
        }
        if count == 1 && v != "*" && !v.starts_with('*') && !v.ends_with('*') {
            return Err(format!(
                "wildcard is only allowed at the start or end, found in {key}: {v:?}"
            ));
        }
    }
    Ok(())
}

fn check_trust_domains(key: &str, values: &[String]) -> Result<(), String> {
    check_wildcard_values(key, values)?;
    if let Some(v) = values.iter().find(|v| v.contains('/')) {
        return Err(format!(
            "trust domain must not contain '/', found in {key}: {v:?}"
        ));
    }
    Ok(())
}

fn check_service_accounts(key: &str, values: &[String]) -> Result<(), String> {
    if values.len() > 16 {
        return Err("may not have more than 16 values".into());
    }
    const FORMAT: &str = "expected format 'serviceAccount' or 'namespace/serviceAccount'";
    for v in values {
        if v.is_empty() {
            return Err(format!("empty value not allowed, found in {key}"));
        }
        if v.contains('*') {
            return Err(format!("wildcard not allowed, found in {key}"));
        }
        if v.matches('/').count() > 1 {
            return Err(format!("{FORMAT}, found {v:?} in {key}"));
        }
        if v.len() > 320 {
            return Err(format!(
                "value cannot exceed 320 characters, found {v:?} in {key}"
            ));
        }
        if let Some((ns, sa)) = v.split_once('/') {
            if ns.is_empty() {
                return Err(format!("{FORMAT}, found empty namespace {v:?} in {key}"));
            }
            if sa.is_empty() {
                return Err(format!(
                    "{FORMAT}, found empty serviceAccount {v:?} in {key}"
                ));
            }
        }
    }
    Ok(())
}

/// One `{*}`/`{**}` path template (Istio's `CheckValidPathTemplate`).
fn check_valid_path_template(key: &str, path: &str) -> Result<(), String> {
    let templated = path.contains("{*}") || path.contains("{**}");
    let trimmed = path.trim_matches('/');
    let mut any_seen = false;
    for glob in trimmed.split('/') {
        match glob {
            "{*}" if !any_seen => continue,
            "{**}" if !any_seen => {
                any_seen = true;
                continue;
            }
            "{*}" | "{**}" => {
                return Err(format!(
                    "invalid or unsupported path {trimmed}, found in {key}. {{**}} is not the last operator"
                ));
            }
            _ => {}
        }
        if glob.contains(['{', '}']) {
            return Err(format!(
                "invalid or unsupported path {trimmed}, found in {key}. Contains '{{' or '}}' beyond a supported path template"
            ));
        }
        if templated && !is_valid_literal(glob) {
            return Err(format!(
                "invalid or unsupported path {trimmed}, found in {key}. Contains segment {glob} with invalid string literal"
            ));
        }
    }
    Ok(())
}

/// `^[a-zA-Z0-9-._~%!$&'()+,;:@=]+$`.
fn is_valid_literal(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'+'
                        | b','
                        | b';'
                        | b':'
                        | b'@'
                        | b'='
                )
        })
}

/// An address or CIDR block (Istio's `ValidateIPs`: Go's `netip.ParseAddr`/`ParsePrefix`).
pub fn validate_ip(v: &str) -> Result<(), String> {
    if v.contains('/') {
        parse_prefix(v)
            .map(|_| ())
            .map_err(|e| format!("bad CIDR range ({v}): {e}"))
    } else if v.contains('%') || v.parse::<std::net::IpAddr>().is_err() {
        Err(format!("bad IP address ({v})"))
    } else {
        Ok(())
    }
}

/// Parses `addr/bits` as Go's `netip.ParsePrefix` does (host bits may be set; the prefix is
/// masked where it is used). The message says which half is wrong.
pub fn parse_prefix(v: &str) -> Result<ipnet::IpNet, String> {
    let Some((addr, bits)) = v.split_once('/') else {
        return Err("no '/'".into());
    };
    if addr.contains('%') {
        return Err("IPv6 zones cannot be present in a prefix".into());
    }
    let ip: std::net::IpAddr = addr
        .parse()
        .map_err(|_| format!("address {addr:?} is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let ok = !bits.is_empty()
        && bits.bytes().all(|b| b.is_ascii_digit())
        && (bits == "0" || !bits.starts_with('0'));
    let len = bits
        .parse::<u8>()
        .ok()
        .filter(|l| ok && *l <= max)
        .ok_or_else(|| format!("bad bits after slash: {bits:?} (0 to {max})"))?;
    ipnet::IpNet::new(ip, len).map_err(|e| e.to_string())
}

/// A port as a decimal string (Istio's `ValidatePorts`).
fn validate_port_value(v: &str) -> Result<(), String> {
    match v.parse::<u64>() {
        Ok(p) if p <= 65535 => Ok(()),
        Ok(_) => Err(format!("bad port ({v}): out of range (0 to 65535)")),
        Err(_) => Err(format!("bad port ({v}): not a decimal number")),
    }
}

/// Istio's `ValidateAttribute`: known `when` keys and the shape of their values.
fn validate_attribute(key: &str, values: &[String]) -> Result<(), String> {
    check_empty_values(key, values)?;
    let map_key = |k: &str| -> Result<(), String> {
        let open = k.find('[');
        match open {
            Some(open) if k.ends_with(']') && open > 0 && open < k.len() - 2 => Ok(()),
            _ => Err(format!("bad key ({k}): should have format a[b]")),
        }
    };
    match key {
        k if k.starts_with("request.headers") => map_key(k),
        "source.ip" | "remote.ip" | "destination.ip" => {
            let errs: Vec<String> = values.iter().filter_map(|v| validate_ip(v).err()).collect();
            if errs.is_empty() {
                Ok(())
            } else {
                Err(errs.join("; "))
            }
        }
        "source.namespace"
        | "source.principal"
        | "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "connection.sni" => Ok(()),
        "source.serviceAccount" => check_service_accounts(key, values),
        "source.trustDomain" => check_wildcard_values(key, values),
        k if k.starts_with("request.auth.claims") => map_key(k),
        "destination.port" => values.iter().try_for_each(|v| validate_port_value(v)),
        k if k.starts_with("experimental.envoy.filters.") => map_key(k),
        "destination.namespace" => Err(format!(
            "attribute {key} is replaced by the metadata.namespace"
        )),
        k if k.starts_with("destination.labels") => Err(format!(
            "attribute {key} is replaced by the workload selector"
        )),
        "destination.name" | "destination.user" => Err(format!(
            "deprecated attribute {key}: only supported in v1alpha1"
        )),
        _ => Err(format!("unknown attribute: {key}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::Level;
    use crate::model::{ConfigSet, parse_documents};

    fn check_policy(metadata: &str, spec: &str) -> Vec<Diagnostic> {
        let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
        let doc = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: ns{metadata}}}\nspec:\n{spec}"
        );
        let (objs, errs) = parse_documents("ap.yaml", &doc);
        assert!(errs.is_empty(), "parse: {errs:#?}\n{doc}");
        let mut config = ConfigSet::default();
        config.extend(objs);
        super::super::validate(&config)
    }

    fn check(spec: &str) -> Vec<Diagnostic> {
        check_policy("", spec)
    }

    fn found(diags: &[Diagnostic], level: Level) -> Vec<String> {
        diags
            .iter()
            .filter(|d| d.level == level)
            .map(|d| format!("{}: {}", d.field, d.message))
            .collect()
    }

    #[track_caller]
    fn assert_only_error(diags: Vec<Diagnostic>, expected: &str) {
        assert_eq!(found(&diags, Level::Error), [expected], "{diags:#?}");
    }

    #[track_caller]
    fn assert_clean(diags: Vec<Diagnostic>) {
        assert!(diags.is_empty(), "{diags:#?}");
    }

    #[test]
    fn good_policies_are_clean() {
        assert_clean(check("{}"));
        assert_clean(check("action: ALLOW\nrules: [{}]"));
        assert_clean(check(
            "selector: {matchLabels: {app: web}}\naction: DENY\nrules:\n- from:\n  - source: {ipBlocks: [10.0.0.0/8, 192.168.1.7, \"fd00::/64\"], notIpBlocks: [10.1.0.0/16]}\n  to:\n  - operation: {ports: [\"8080\"], methods: [GET, \"PO*\"], paths: [/admin, \"/api/*\", \"/v1/{*}/x/{**}\"]}\n  when:\n  - {key: \"request.headers[x-user]\", values: [bob]}\n  - {key: source.ip, notValues: [10.0.0.1/32]}\n  - {key: destination.port, values: [\"80\"]}",
        ));
        assert_clean(check(
            "action: CUSTOM\nprovider: {name: opa}\nrules: [{to: [{operation: {paths: [/x]}}]}]",
        ));
        assert_clean(check_policy(
            ", annotations: {istio.io/dry-run: \"true\"}",
            "action: DENY\nrules: [{}]",
        ));
    }

    #[test]
    fn malformed_cidrs_and_ips_name_the_entry() {
        assert_only_error(
            check("rules:\n- from:\n  - source: {ipBlocks: [10.0.0.0/8, 10.0.0.0/33]}"),
            "spec.rules[0].from[0].source.ipBlocks[1]: bad CIDR range (10.0.0.0/33): bad bits after slash: \"33\" (0 to 32)",
        );
        assert_only_error(
            check("rules:\n- from:\n  - source: {notRemoteIpBlocks: [300.1.2.0/24]}"),
            "spec.rules[0].from[0].source.notRemoteIpBlocks[0]: bad CIDR range (300.1.2.0/24): address \"300.1.2.0\" is not an IP address",
        );
        assert_only_error(
            check("rules:\n- from:\n  - source: {ipBlocks: [not-an-ip]}"),
            "spec.rules[0].from[0].source.ipBlocks[0]: bad IP address (not-an-ip)",
        );
        assert_only_error(
            check("rules:\n- when:\n  - {key: source.ip, values: [10.0.0.0/08]}"),
            "spec.rules[0].when[0].values: invalid `value` for `key` source.ip: bad CIDR range (10.0.0.0/08): bad bits after slash: \"08\" (0 to 32)",
        );
    }

    #[test]
    fn empty_entries_are_refused() {
        assert_only_error(
            check("rules:\n- from: []"),
            "spec.rules[0].from: `from` must not be empty",
        );
        assert_only_error(
            check("rules:\n- to: []"),
            "spec.rules[0].to: `to` must not be empty",
        );
        assert_only_error(
            check("rules:\n- from: [{}]"),
            "spec.rules[0].from[0].source: `from.source` must not be nil",
        );
        assert_only_error(
            check("rules:\n- from: [{source: {}}]"),
            "spec.rules[0].from[0].source: `from.source` must not be empty",
        );
        assert_only_error(
            check("rules:\n- to: [{operation: {}}]"),
            "spec.rules[0].to[0].operation: `to.operation` must not be empty",
        );
        assert_only_error(
            check("rules:\n- to: [{operation: {methods: [GET, \"\"]}}]"),
            "spec.rules[0].to[0].operation.methods: empty value not allowed, found in Methods",
        );
        assert_only_error(
            check("action: DENY"),
            "spec.rules: DENY action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request",
        );
    }

    #[test]
    fn ports_paths_methods_and_when_keys() {
        assert_only_error(
            check("rules:\n- to: [{operation: {ports: [\"80\", \"http\"]}}]"),
            "spec.rules[0].to[0].operation.ports[1]: bad port (http): not a decimal number",
        );
        assert_only_error(
            check("rules:\n- to: [{operation: {notPorts: [\"70000\"]}}]"),
            "spec.rules[0].to[0].operation.notPorts[0]: bad port (70000): out of range (0 to 65535)",
        );
        assert_only_error(
            check("rules:\n- to: [{operation: {paths: [\"/a/{**}/{*}\"]}}]"),
            "spec.rules[0].to[0].operation.paths[0]: invalid or unsupported path a/{**}/{*}, found in Paths. {**} is not the last operator",
        );
        assert_only_error(
            check("rules:\n- to: [{operation: {paths: [\"/a/{x}\"]}}]"),
            "spec.rules[0].to[0].operation.paths[0]: invalid or unsupported path a/{x}, found in Paths. Contains '{' or '}' beyond a supported path template",
        );
        let d = check("rules:\n- to: [{operation: {paths: [admin], methods: [\"GE T\"]}}]");
        assert_eq!(
            found(&d, Level::Warning),
            [
                "spec.rules[0].to[0].operation.methods[0]: method \"GE T\" is not an HTTP token; no request method can match it",
                "spec.rules[0].to[0].operation.paths[0]: path \"admin\" starts with neither \"/\" nor \"*\"; no request path can match it",
            ]
        );
        assert_only_error(
            check("rules:\n- when: [{key: request.headers}]"),
            "spec.rules[0].when[0]: at least one of `values` or `notValues` must be set for key request.headers",
        );
        assert_only_error(
            check("rules:\n- when: [{key: \"request.headers[]\", values: [a]}]"),
            "spec.rules[0].when[0].values: invalid `value` for `key` request.headers[]: bad key (request.headers[]): should have format a[b]",
        );
        assert_only_error(
            check("rules:\n- when: [{key: \"destination.labels[app]\", values: [a]}]"),
            "spec.rules[0].when[0].values: invalid `value` for `key` destination.labels[app]: attribute destination.labels[app] is replaced by the workload selector",
        );
        assert_only_error(
            check("rules:\n- when: [{key: source.color, notValues: [red]}]"),
            "spec.rules[0].when[0].notValues: invalid `notValue` for `key` source.color: unknown attribute: source.color",
        );
    }

    #[test]
    fn selectors_target_refs_and_providers() {
        assert_only_error(
            check("selector: {matchLabels: {app: web}}\ntargetRef: {kind: Service, name: web}"),
            "spec: only one of targetRefs or workloadSelector can be set",
        );
        assert_only_error(
            check("selector: {matchLabels: {app: \"w*\"}}"),
            "spec.selector.matchLabels.app: wildcard is not supported in selector: \"app=w*\"",
        );
        assert_eq!(
            found(&check("selector: {}"), Level::Warning),
            ["spec.selector: workload selector specified without labels"]
        );
        assert_only_error(
            check("targetRefs: [{kind: Deployment, name: web}]"),
            "spec.targetRefs[0]: targetRef must be to one of [core/v1/Service networking.istio.io/v1/ServiceEntry gateway.networking.k8s.io/v1/Gateway gateway.networking.k8s.io/v1/GatewayClass] but was /Deployment",
        );
        assert_only_error(
            check("targetRef: {kind: Service, name: web, namespace: other}"),
            "spec.targetRef.namespace: targetRef namespace must not be set; cross namespace referencing is not supported",
        );
        assert_only_error(
            check("action: CUSTOM\nrules: [{}]"),
            "spec.provider.name: `provider.name` must not be empty",
        );
        assert_only_error(
            check("action: DENY\nprovider: {name: opa}\nrules: [{}]"),
            "spec.provider: `provider` must not be with non CUSTOM action, found DENY",
        );
        assert_only_error(
            check(
                "action: CUSTOM\nprovider: {name: opa}\nrules: [{from: [{source: {namespaces: [a]}}]}]",
            ),
            "spec.rules[0].from[0].source.namespaces: From.Namespaces is currently not supported with CUSTOM action",
        );
        assert_only_error(
            check("rules: [{from: [{source: {serviceAccounts: [a/b], namespaces: [a]}}]}]"),
            "spec.rules[0].from[0].source: cannot set serviceAccounts with namespaces or principals",
        );
        assert_only_error(
            check("rules: [{from: [{source: {serviceAccounts: [a/b/c]}}]}]"),
            "spec.rules[0].from[0].source.serviceAccounts: expected format 'serviceAccount' or 'namespace/serviceAccount', found \"a/b/c\" in ServiceAccounts",
        );
    }

    #[test]
    fn dry_run_is_for_allow_and_deny_only() {
        assert_only_error(
            check_policy(
                ", annotations: {istio.io/dry-run: \"yes\"}",
                "action: DENY\nrules: [{}]",
            ),
            "metadata.annotations: ns/p has annotation istio.io/dry-run with invalid value (yes): strconv.ParseBool: parsing \"yes\": invalid syntax",
        );
        assert_only_error(
            check_policy(
                ", annotations: {istio.io/dry-run: \"true\"}",
                "action: AUDIT\nrules: [{}]",
            ),
            "metadata.annotations: the annotation istio.io/dry-run currently only supports action ALLOW/DENY, found action AUDIT in ns/p",
        );
    }

    #[test]
    fn deny_rules_with_only_http_attributes_warn() {
        let d = check("action: DENY\nrules:\n- to: [{operation: {paths: [/admin]}}]");
        assert_eq!(
            found(&d, Level::Warning),
            [
                "spec.rules[0]: configured AuthorizationPolicy will deny all traffic to TCP ports under its scope due to the use of only HTTP attributes in a DENY rule; it is recommended to explicitly specify the port"
            ]
        );
        assert_clean(check(
            "action: DENY\nrules:\n- to: [{operation: {paths: [/admin], ports: [\"80\"]}}]",
        ));
        assert_clean(check(
            "action: DENY\nrules:\n- from: [{source: {ipBlocks: [1.2.3.4]}}]",
        ));
    }
}
