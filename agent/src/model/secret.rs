//! Kubernetes Secrets, reduced to what Gateway servers read: the certificate, key and CA of a
//! `credentialName` (`kubernetes.io/tls`'s `tls.crt`/`tls.key`/`ca.crt`, or Istio's generic
//! `cert`/`key`/`cacert`). Other keys are dropped at parse time, and the key material never
//! shows in `Debug` output or serialized dumps.

use serde::{Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

/// The data keys a gateway credential can use; everything else in a Secret is ignored.
pub const CREDENTIAL_KEYS: [&str; 6] = ["tls.crt", "tls.key", "ca.crt", "cert", "key", "cacert"];

#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret {
    /// `type` (`kubernetes.io/tls`, `Opaque`, ...), if set.
    pub kind: Option<String>,
    /// Decoded values of the [`CREDENTIAL_KEYS`] present in `data` / `stringData`.
    pub data: BTreeMap<String, Vec<u8>>,
}

impl Secret {
    /// Certificate chain and private key (PEM): `tls.crt`/`tls.key`, else `cert`/`key`.
    pub fn certificate_and_key(&self) -> Option<(&[u8], &[u8])> {
        let pair =
            |c: &str, k: &str| Some((self.data.get(c)?.as_slice(), self.data.get(k)?.as_slice()));
        pair("tls.crt", "tls.key").or_else(|| pair("cert", "key"))
    }

    /// CA bundle (PEM) for client verification: `ca.crt`, else `cacert`.
    pub fn ca_certificates(&self) -> Option<&[u8]> {
        self.data
            .get("ca.crt")
            .or_else(|| self.data.get("cacert"))
            .map(Vec::as_slice)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("kind", &self.kind)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Serialize for Secret {
    /// Only the type and key names: key material stays out of every dump.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Redacted<'a> {
            #[serde(rename = "type")]
            kind: &'a Option<String>,
            keys: Vec<&'a String>,
        }
        Redacted {
            kind: &self.kind,
            keys: self.data.keys().collect(),
        }
        .serialize(s)
    }
}

/// Parses a `v1` Secret object: `data` values are base64 (as the API server stores them),
/// `stringData` values plain text and win over `data`, as the API server merges them.
/// Errors are (field path, message).
pub fn parse(
    object: &serde_json::Map<String, serde_json::Value>,
) -> Result<Secret, (String, String)> {
    use base64::Engine;
    let kind = match object.get("type") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(("type".into(), format!("expected a string, got {other}"))),
    };
    let mut data = BTreeMap::new();
    for (field, base64) in [("data", true), ("stringData", false)] {
        let map = match object.get(field) {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::Object(m)) => m,
            Some(other) => return Err((field.into(), format!("expected a map, got {other}"))),
        };
        for (key, value) in map {
            if !CREDENTIAL_KEYS.contains(&key.as_str()) {
                continue;
            }
            let path = format!("{field}.{key}");
            let text = match value {
                serde_json::Value::String(s) => s,
                serde_json::Value::Null => continue,
                other => return Err((path, format!("expected a string, got {other}"))),
            };
            let bytes = if base64 {
                // The API server accepts standard base64 and so does this; whitespace (folded
                // YAML) is ignored.
                let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
                base64::engine::general_purpose::STANDARD
                    .decode(compact)
                    .map_err(|e| (path, format!("invalid base64: {e}")))?
            } else {
                text.as_bytes().to_vec()
            };
            data.insert(key.clone(), bytes);
        }
    }
    Ok(Secret { kind, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_credential_keys_only_and_redacts() {
        let value = serde_json::json!({
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": "Q0VSVA==", "tls.key": "S0VZ", "other": "eA=="},
            "stringData": {"ca.crt": "CA"},
        });
        let s = parse(value.as_object().unwrap()).unwrap();
        assert_eq!(s.kind.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(
            s.certificate_and_key(),
            Some((b"CERT".as_slice(), b"KEY".as_slice()))
        );
        assert_eq!(s.ca_certificates(), Some(b"CA".as_slice()));
        assert!(!s.data.contains_key("other"));
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("KEY\"") && !debug.contains("75, 69, 89"),
            "{debug}"
        );
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(
            json,
            r#"{"type":"kubernetes.io/tls","keys":["ca.crt","tls.crt","tls.key"]}"#
        );
    }

    #[test]
    fn bad_base64_names_the_field() {
        let value = serde_json::json!({"data": {"tls.key": "!!"}});
        let (field, message) = parse(value.as_object().unwrap()).unwrap_err();
        assert_eq!(field, "data.tls.key");
        assert!(message.contains("base64"), "{message}");
    }
}
