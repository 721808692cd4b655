//! Strings that many objects repeat (namespaces, node and zone names, `kind`s, label keys and
//! values, workloads' app and version), kept once: a cluster's 50,000 endpoints name a few
//! hundred of them.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock};

/// A table of shared strings. Names nothing uses any more are dropped when the table has
/// doubled since the last sweep, so churn cannot grow it without bound.
struct Table<E> {
    names: HashSet<E>,
    sweep_at: usize,
}

impl<E: Borrow<str> + Hash + Eq + Clone> Table<E> {
    fn new() -> Self {
        Table {
            names: HashSet::new(),
            sweep_at: 1024,
        }
    }

    fn get(&mut self, s: &str, make: impl FnOnce(&str) -> E, users: impl Fn(&E) -> usize) -> E {
        if let Some(shared) = self.names.get(s) {
            return shared.clone();
        }
        if self.names.len() >= self.sweep_at {
            self.names.retain(|name| users(name) > 1);
            self.sweep_at = (self.names.len() * 2).max(1024);
        }
        let shared = make(s);
        self.names.insert(shared.clone());
        shared
    }
}

fn lock<E>(table: &'static OnceLock<Mutex<Table<E>>>) -> std::sync::MutexGuard<'static, Table<E>>
where
    E: Borrow<str> + Hash + Eq + Clone,
{
    table
        .get_or_init(|| Mutex::new(Table::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// The shared copy of `s`.
pub fn intern(s: &str) -> Arc<str> {
    static TABLE: OnceLock<Mutex<Table<Arc<str>>>> = OnceLock::new();
    lock(&TABLE).get(s, |s| Arc::from(s), Arc::strong_count)
}

/// [`Interned`]'s shared string: a thin pointer (8 bytes, where `Arc<str>` takes 16), as the
/// model holds four of them in each of a cluster's endpoints and two in every label. A `String`
/// inside, so that labels read as `&String` as a map's do.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
struct Thin(Arc<String>);

impl Borrow<str> for Thin {
    fn borrow(&self) -> &str {
        &self.0
    }
}

fn intern_thin(s: &str) -> Thin {
    static TABLE: OnceLock<Mutex<Table<Thin>>> = OnceLock::new();
    lock(&TABLE).get(
        s,
        |s| Thin(Arc::new(s.to_string())),
        |t| Arc::strong_count(&t.0),
    )
}

/// A string read from a manifest and shared with every equal one. Reads as a `&str`;
/// (de)serializes as a plain string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Interned(Thin);

impl Interned {
    pub fn new(s: &str) -> Self {
        Interned(intern_thin(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0.0
    }

    /// The shared string itself.
    pub fn as_string(&self) -> &String {
        &self.0.0
    }
}

impl std::ops::Deref for Interned {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0.0
    }
}

impl std::fmt::Debug for Interned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self.0.0, f)
    }
}

impl std::fmt::Display for Interned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.0)
    }
}

impl From<&str> for Interned {
    fn from(s: &str) -> Self {
        Interned::new(s)
    }
}

impl PartialEq<str> for Interned {
    fn eq(&self, other: &str) -> bool {
        **self.0.0 == *other
    }
}

impl PartialEq<&str> for Interned {
    fn eq(&self, other: &&str) -> bool {
        **self.0.0 == **other
    }
}

impl PartialEq<String> for Interned {
    fn eq(&self, other: &String) -> bool {
        *self.0.0 == *other
    }
}

impl PartialEq<Interned> for &str {
    fn eq(&self, other: &Interned) -> bool {
        **self == **other.0.0
    }
}

impl PartialEq<Interned> for String {
    fn eq(&self, other: &Interned) -> bool {
        *self == *other.0.0
    }
}

impl Serialize for Interned {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0.0)
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
        assert!(Arc::ptr_eq(&a.0.0, &b.0.0));
        assert_eq!(std::mem::size_of::<Option<Interned>>(), 8);
        assert_eq!(serde_json::to_string(&b).unwrap(), "\"us-east1-b\"");
        assert_eq!(&*b, "us-east1-b");
    }

    #[test]
    fn a_sweep_drops_only_unused_names() {
        let kept = Interned::new("kept-name-for-the-sweep-test");
        for i in 0..3000 {
            let _ = intern(&format!("churn-{i}"));
            let _ = Interned::new(&format!("churn-{i}"));
        }
        let again = Interned::new("kept-name-for-the-sweep-test");
        assert!(Arc::ptr_eq(&kept.0.0, &again.0.0));
        let kept = intern("kept-arc-for-the-sweep-test");
        for i in 0..3000 {
            let _ = intern(&format!("churn-{i}"));
        }
        assert!(Arc::ptr_eq(&kept, &intern("kept-arc-for-the-sweep-test")));
    }
}
