//! `steerd check` and `steerd explain`: offline, over manifest files.

use super::{CheckOutput, Output};
use crate::compile::analyze::{analyze, render};
use crate::compile::explain::{Query, explain as run_explain, render_text};
use crate::compile::{Diagnostic, Level};
use crate::sources::files::load_paths;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Exit codes, as `istioctl analyze` uses them.
const CLEAN: i32 = 0;
const FOUND_ERRORS: i32 = 1;
const COULD_NOT_RUN: i32 = 2;

/// Runs the analysis and prints it; returns the exit code.
pub fn check(paths: &[PathBuf], output: CheckOutput) -> i32 {
    let snapshot = match load_paths(paths) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("steerd check: {e}");
            return COULD_NOT_RUN;
        }
    };
    let mut diags: Vec<Diagnostic> = snapshot
        .errors
        .into_iter()
        .map(|e| Diagnostic {
            level: Level::Error,
            code: Some("IST0106".into()),
            kind: e.kind,
            object: e.object,
            origin: e.origin,
            message: format!("Schema validation error: {}: {}", e.field, e.message),
            field: e.field,
        })
        .collect();
    diags.extend(analyze(&snapshot.config));
    let errors = diags.iter().filter(|d| d.level == Level::Error).count();
    match output {
        CheckOutput::Text => {
            if diags.is_empty() {
                println!(
                    "\u{2714} No validation issues found when analyzing {}.",
                    paths
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            for d in &diags {
                println!("{}", render(d));
            }
        }
        CheckOutput::Json => println!(
            "{}",
            serde_json::to_string_pretty(&diags).expect("diagnostics serialize")
        ),
        CheckOutput::Yaml => print!(
            "{}",
            serde_yaml::to_string(&diags).expect("diagnostics serialize")
        ),
    }
    if errors > 0 { FOUND_ERRORS } else { CLEAN }
}

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Files or directories of manifests.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Destination as HOST[:PORT] (short name, FQDN or service IP).
    #[arg(long)]
    pub to: String,
    /// Namespace for short host names.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    #[arg(long)]
    pub path: Option<String>,
    #[arg(long)]
    pub method: Option<String>,
    /// A request header, K=V (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// A query parameter, K=V (repeatable).
    #[arg(long = "query")]
    pub query: Vec<String>,
    /// Labels of the client workload, k=v,k2=v2 (default: its Pod's, with --source-ip).
    #[arg(long)]
    pub source_labels: Option<String>,
    /// The client's address, for AuthorizationPolicies (`ipBlocks`; its Pod gives the
    /// namespace and labels).
    #[arg(long)]
    pub source_ip: Option<std::net::IpAddr>,
    /// The client's namespace (default: its Pod's, with --source-ip).
    #[arg(long)]
    pub source_namespace: Option<String>,
    /// Evaluate as this Gateway (`name` or `ns/name`) instead of the mesh.
    #[arg(long)]
    pub gateway: Option<String>,
    /// The client Pod (`ns/name`): shows which Sidecar's outboundTrafficPolicy applies to it,
    /// and for an unregistered destination whether REGISTRY_ONLY refuses it.
    #[arg(long)]
    pub source_pod: Option<String>,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

fn pairs(items: &[String], what: &str) -> Result<Vec<(String, String)>, String> {
    items
        .iter()
        .flat_map(|i| {
            i.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("{what} {kv:?}: expected K=V"))
        })
        .collect()
}

/// Explains one request; returns the exit code.
pub fn explain(args: &ExplainArgs) -> i32 {
    let snapshot = match load_paths(&args.paths) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("steerd explain: {e}");
            return COULD_NOT_RUN;
        }
    };
    for e in &snapshot.errors {
        eprintln!("warning: {e} (object skipped)");
    }
    let (host, port) = match args.to.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => match p.parse::<u16>() {
            Ok(p) => (
                h.trim_matches(|c| c == '[' || c == ']').to_string(),
                Some(p),
            ),
            Err(_) => {
                eprintln!(
                    "steerd explain: --to {}: port {p:?} is not a number",
                    args.to
                );
                return COULD_NOT_RUN;
            }
        },
        _ => (args.to.clone(), None),
    };
    let parsed = (|| -> Result<_, String> {
        Ok((
            pairs(&args.headers, "--header")?,
            pairs(&args.query, "--query")?,
            pairs(
                &args.source_labels.iter().cloned().collect::<Vec<_>>(),
                "--source-labels",
            )?
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        ))
    })();
    let (headers, query, source_labels) = match parsed {
        Ok(p) => p,
        Err(e) => {
            eprintln!("steerd explain: {e}");
            return COULD_NOT_RUN;
        }
    };
    let q = Query {
        host,
        port,
        namespace: args.namespace.clone(),
        path: args.path.clone(),
        method: args.method.clone(),
        headers,
        query,
        source_labels,
        source_ip: args.source_ip,
        source_namespace: args.source_namespace.clone(),
        gateway: args.gateway.clone(),
    };
    let outbound = match &args.source_pod {
        None => None,
        Some(key) => match crate::compile::egress::for_pod(&snapshot.config, key) {
            Some(o) => Some(o),
            None => {
                eprintln!("steerd explain: --source-pod {key}: no such Pod in the manifests");
                return COULD_NOT_RUN;
            }
        },
    };
    let result = run_explain(&snapshot.config, &q);
    // An address no Service or ServiceEntry registers: what the client's policy does with it.
    if let (Err(crate::compile::explain::ExplainError::UnknownHost(host)), Some(o)) =
        (&result, &outbound)
        && let Ok(ip) = host.parse::<std::net::IpAddr>()
    {
        let registered = crate::compile::registered(&snapshot.config)
            .iter()
            .any(|net| net.contains(&ip));
        let verdict = match o.policy.as_str() {
            _ if registered => "passes (a registered endpoint or ServiceEntry address)",
            "REGISTRY_ONLY" => "refused (EPERM) by REGISTRY_ONLY",
            "ALLOW_ANY" => "passed through unchanged (ALLOW_ANY)",
            _ => "refused if --outbound-traffic-policy is REGISTRY_ONLY, else passed through",
        };
        match args.output {
            Output::Table => println!("{o}\n{host} is not a service VIP: {verdict}"),
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "host": host, "registered": registered, "outbound": o, "verdict": verdict,
                }))
                .expect("explanations serialize")
            ),
        }
        return CLEAN;
    }
    match result.map(|mut e| {
        e.outbound = outbound;
        e
    }) {
        Ok(e) => {
            match args.output {
                Output::Table => print!("{}", render_text(&e)),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&e).expect("explanations serialize")
                ),
            }
            CLEAN
        }
        Err(e) => {
            eprintln!("steerd explain: {e}");
            FOUND_ERRORS
        }
    }
}
