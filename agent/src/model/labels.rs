//! Object labels, kept as one sorted boxed slice: the agent holds the labels of every Service,
//! EndpointSlice and Pod of the cluster, and a `BTreeMap` spends a 0.5 KB node on even one
//! label, where this spends the pairs themselves. Keys and values are interned: a cluster's
//! objects repeat a few keys, and a workload's values (`app: reviews`) are on its Service, its
//! selector, its Pods and its EndpointSlices alike.

use super::interned::Interned;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

/// `key → value` labels, sorted by key, each key once. Read like a map (`get`, `iter`, `[key]`).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Box<[(Interned, Interned)]>);

impl Labels {
    pub fn new() -> Self {
        Self::default()
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| (**k).cmp(key))
    }

    pub fn get(&self, key: &str) -> Option<&String> {
        self.position(key).ok().map(|i| self.0[i].1.as_string())
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The pairs in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&String, &String)> + Clone {
        self.0.iter().map(pair)
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(k, _)| k.as_string())
    }

    pub fn values(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(_, v)| v.as_string())
    }

    /// Sets `key` (rare: labels are built whole; this copies the pairs).
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.position(&key) {
            Ok(i) => {
                let old = std::mem::replace(&mut self.0[i].1, Interned::new(&value));
                Some(old.as_string().clone())
            }
            Err(i) => {
                let mut pairs = std::mem::take(&mut self.0).into_vec();
                pairs.insert(i, (Interned::new(&key), Interned::new(&value)));
                self.0 = pairs.into_boxed_slice();
                None
            }
        }
    }

    /// Whether every `key: value` of `selector` is among these labels.
    pub fn matches<'s>(
        &self,
        selector: impl IntoIterator<Item = (&'s String, &'s String)>,
    ) -> bool {
        selector.into_iter().all(|(k, v)| self.get(k) == Some(v))
    }

    /// As a `BTreeMap` (for code that builds or merges maps).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

fn pair((k, v): &(Interned, Interned)) -> (&String, &String) {
    (k.as_string(), v.as_string())
}

fn interned_pairs(map: BTreeMap<String, String>) -> Box<[(Interned, Interned)]> {
    map.into_iter()
        .map(|(k, v)| (Interned::new(&k), Interned::new(&v)))
        .collect()
}

/// Reading one label, from [`Labels`] or from a `BTreeMap` (Istio selectors, client labels).
pub trait LabelLookup {
    fn label(&self, key: &str) -> Option<&String>;
}

impl LabelLookup for Labels {
    fn label(&self, key: &str) -> Option<&String> {
        self.get(key)
    }
}

impl LabelLookup for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&String> {
        self.get(key)
    }
}

impl FromIterator<(String, String)> for Labels {
    /// The last value of a repeated key wins, as in a map.
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let map: BTreeMap<String, String> = iter.into_iter().collect();
        Labels(interned_pairs(map))
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        Labels(interned_pairs(map))
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Interned, Interned)>,
        fn(&'a (Interned, Interned)) -> (&'a String, &'a String),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(pair)
    }
}

impl std::ops::Index<&str> for Labels {
    type Output = String;
    fn index(&self, key: &str) -> &String {
        self.get(key).unwrap_or_else(|| panic!("no label {key:?}"))
    }
}

impl PartialEq<BTreeMap<String, String>> for Labels {
    fn eq(&self, other: &BTreeMap<String, String>) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct LabelsVisitor;
        impl<'de> Visitor<'de> for LabelsVisitor {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Labels, A::Error> {
                let mut pairs = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    pairs.insert(k, v);
                }
                Ok(Labels::from(pairs))
            }
        }
        d.deserialize_map(LabelsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_like_a_sorted_map() {
        let mut l = labels(&[("version", "v1"), ("app", "web"), ("app", "api")]);
        assert_eq!(l.len(), 2, "a repeated key keeps the last value");
        assert_eq!(l.get("app").map(String::as_str), Some("api"));
        assert_eq!(l["version"], "v1");
        assert!(l.get("zone").is_none() && !l.contains_key("zone"));
        let keys: Vec<&String> = l.keys().collect();
        assert_eq!(keys, ["app", "version"]);
        assert_eq!(l.insert("tier".into(), "gold".into()), None);
        assert_eq!(l.insert("app".into(), "web".into()), Some("api".into()));
        assert_eq!(
            l.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
            ["app=web", "tier=gold", "version=v1"]
        );
        assert_eq!(l, l.to_map());
    }

    #[test]
    fn selectors_match_subsets_of_the_labels() {
        let l = labels(&[("app", "web"), ("version", "v1")]);
        assert!(l.matches(&labels(&[("app", "web")])));
        assert!(l.matches(&BTreeMap::new()));
        assert!(!l.matches(&labels(&[("app", "web"), ("version", "v2")])));
        assert!(!l.matches(&labels(&[("zone", "a")])));
    }

    #[test]
    fn serializes_as_a_map() {
        let l: Labels = serde_json::from_str(r#"{"b": "2", "a": "1"}"#).unwrap();
        assert_eq!(serde_json::to_string(&l).unwrap(), r#"{"a":"1","b":"2"}"#);
        assert!(serde_json::from_str::<Labels>(r#"["a"]"#).is_err());
        assert!(serde_json::from_str::<Labels>(r#"{"a": 1}"#).is_err());
        assert_eq!(format!("{l:?}"), r#"{"a": "1", "b": "2"}"#);
    }
}
