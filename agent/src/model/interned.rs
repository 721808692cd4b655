//! Strings that many objects repeat (namespaces, node and zone names, `kind`s, app and version
//! labels), kept once: a cluster's 50,000 endpoints name a few hundred of them.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::sync::{Arc, Mutex, OnceLock};

/// The shared copy of `s`. Names nothing uses any more are dropped when the table has doubled
/// since the last sweep, so churn cannot grow it without bound.
pub fn intern(s: &str) -> Arc<str> {
    static TABLE: OnceLock<Mutex<(std::collections::HashSet<Arc<str>>, usize)>> = OnceLock::new();
    let mut guard = TABLE
        .get_or_init(|| Mutex::new((Default::default(), 1024)))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let (table, sweep_at) = &mut *guard;
    if let Some(shared) = table.get(s) {
        return shared.clone();
    }
    if table.len() >= *sweep_at {
        table.retain(|name| Arc::strong_count(name) > 1);
        *sweep_at = (table.len() * 2).max(1024);
    }
    let shared: Arc<str> = Arc::from(s);
    table.insert(shared.clone());
    shared
}

/// A string read from a manifest and shared with every equal one ([`intern`]). Reads as a
/// `&str`; (de)serializes as a plain string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Interned(Arc<str>);

impl Interned {
    pub fn new(s: &str) -> Self {
        Interned(intern(s))
    }
}

impl std::ops::Deref for Interned {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Interned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for Interned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Interned {
    fn from(s: &str) -> Self {
        Interned::new(s)
    }
}

impl PartialEq<str> for Interned {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Interned {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl Serialize for Interned {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Interned {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Ok(Interned::new(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_strings_share_one_copy() {
        let a = Interned::new("us-east1-b");
        let b: Interned = serde_json::from_str("\"us-east1-b\"").unwrap();
        assert_eq!(a, b);
        assert!(Arc::ptr_eq(&a.0, &b.0));
        assert_eq!(serde_json::to_string(&b).unwrap(), "\"us-east1-b\"");
        assert_eq!(&*b, "us-east1-b");
    }

    #[test]
    fn a_sweep_drops_only_unused_names() {
        let kept = Interned::new("kept-name-for-the-sweep-test");
        for i in 0..3000 {
            let _ = intern(&format!("churn-{i}"));
        }
        let again = Interned::new("kept-name-for-the-sweep-test");
        assert!(Arc::ptr_eq(&kept.0, &again.0));
    }
}
