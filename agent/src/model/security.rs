//! Typed `security.istio.io` specs: AuthorizationPolicy. The served versions (v1, v1beta1)
//! share one schema (`crd-all.gen.yaml`), and every field of it has a typed home here.
//!
//! Decoding follows the same rules as [`super::istio`]: JSON (lowerCamelCase) field names,
//! unknown fields are errors, enums are their string names and a value left out is `None`.
//!
//! Lists whose presence matters are `Option<Vec<_>>`: Istio's webhook refuses `from: []` and
//! `to: []` (present but empty) while accepting them absent, and an AuthorizationPolicy without
//! `rules` differs from one with `rules: []` in none of Istio's semantics but in its messages.
//! Semantic rules (CIDRs, ports, `when` keys, ...) are checked by [`super::validate`].

use super::istio::StringMap;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    /// Which workloads (pods, WorkloadEntries) of the policy's namespace it applies to; absent:
    /// all of them (all of the mesh in the root namespace).
    pub selector: Option<PolicySelector>,
    /// Gateway API / waypoint attachment; steerd serves neither (see [`super::validate`]).
    pub target_ref: Option<PolicyTargetReference>,
    pub target_refs: Option<Vec<PolicyTargetReference>>,
    /// Absent or empty: match nothing (an ALLOW policy then denies every request).
    pub rules: Option<Vec<Rule>>,
    /// Default ALLOW.
    pub action: Option<Action>,
    /// The external authorizer of a CUSTOM policy.
    pub provider: Option<ExtensionProvider>,
}

impl AuthorizationPolicy {
    pub fn action(&self) -> Action {
        self.action.unwrap_or(Action::Allow)
    }

    pub fn rules(&self) -> &[Rule] {
        self.rules.as_deref().unwrap_or_default()
    }
}

/// `istio.type.v1beta1.WorkloadSelector`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySelector {
    #[serde(default)]
    pub match_labels: StringMap,
}

/// `istio.type.v1beta1.PolicyTargetReference`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Default.
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionProvider {
    pub name: Option<String>,
}

/// Matches a request when (any `from` matches, or there is none) and (any `to` matches, or
/// there is none) and every `when` condition holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    pub from: Option<Vec<From>>,
    pub to: Option<Vec<To>>,
    pub when: Option<Vec<Condition>>,
}

impl Rule {
    pub fn from(&self) -> &[From] {
        self.from.as_deref().unwrap_or_default()
    }
    pub fn to(&self) -> &[To] {
        self.to.as_deref().unwrap_or_default()
    }
    pub fn when(&self) -> &[Condition] {
        self.when.as_deref().unwrap_or_default()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    /// Required by Istio's webhook (a `from` entry without `source` is refused there, not here,
    /// so the message names the field).
    pub source: Option<Source>,
}

/// Where a request comes from. Every field set must match (AND); within a field any value
/// (OR); `not*` fields must match none of their values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub trust_domains: Vec<String>,
    #[serde(default)]
    pub not_trust_domains: Vec<String>,
    /// The peer address of the connection (single IPs or CIDRs).
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// The original client address (X-Forwarded-For / PROXY protocol in Istio).
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    /// Required by Istio's webhook (see [`From::source`]).
    pub operation: Option<Operation>,
}

/// What a request does. Fields combine like [`Source`]'s.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// The `Host`/`:authority` (case-insensitive; `*` prefix or suffix wildcards). HTTP only.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Destination ports of the workload (decimal strings).
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    /// HTTP methods (`*` prefix or suffix wildcards). HTTP only.
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// Request paths without the query (`*` prefix or suffix wildcards, `{*}`/`{**}`
    /// templates). HTTP only.
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// An extra condition on an Istio attribute (`request.headers[x-user]`, `source.ip`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

#[cfg(test)]
mod tests {
    use crate::model::{Object, parse_documents};

    #[test]
    fn parses_v1_and_v1beta1_with_every_field() {
        let text = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from:
    - source: {ipBlocks: [10.0.0.0/8], notIpBlocks: [10.1.0.0/16], namespaces: [a], remoteIpBlocks: [1.2.3.4]}
    to:
    - operation: {methods: [POST], paths: [/admin*], ports: ["8080"], hosts: [web.shop]}
    when:
    - key: request.headers[x-user]
      values: [bob]
      notValues: [alice]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: shop}
spec: {}
"#;
        let (objs, errs) = parse_documents("p.yaml", text);
        assert!(errs.is_empty(), "{errs:?}");
        let [
            Object::AuthorizationPolicy(p),
            Object::AuthorizationPolicy(all),
        ] = objs.as_slice()
        else {
            panic!("two policies expected: {objs:?}");
        };
        assert_eq!(p.meta.key(), "shop/deny-admin");
        assert_eq!(p.spec.action(), super::Action::Deny);
        let rule = &p.spec.rules()[0];
        let src = rule.from()[0].source.as_ref().unwrap();
        assert_eq!(src.not_ip_blocks, ["10.1.0.0/16"]);
        assert_eq!(rule.to()[0].operation.as_ref().unwrap().paths, ["/admin*"]);
        assert_eq!(rule.when()[0].not_values, ["alice"]);
        assert_eq!(all.spec.action(), super::Action::Allow, "ALLOW by default");
        assert!(all.spec.rules.is_none());
    }

    #[test]
    fn unknown_fields_and_bad_enums_name_the_field() {
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n  - from:\n    - source: {ipBlock: [1.2.3.4]}\n";
        let (_, errs) = parse_documents("p.yaml", text);
        assert_eq!(
            errs[0].field, "spec.rules[0].from[0].source.ipBlock",
            "{errs:?}"
        );
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: REJECT}\n";
        let (_, errs) = parse_documents("p.yaml", text);
        assert_eq!(errs[0].field, "spec.action", "{errs:?}");
        let text = "apiVersion: security.istio.io/v1alpha3\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {}\n";
        let (_, errs) = parse_documents("p.yaml", text);
        assert_eq!(errs[0].field, "apiVersion", "{errs:?}");
        let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec: {}\n";
        let (_, errs) = parse_documents("p.yaml", text);
        assert_eq!(errs[0].field, "kind", "{errs:?}");
    }
}
