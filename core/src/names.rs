//! Name comparison and lookup on the publish path: `same` compares two short names without a
//! call into libc, and `NameMap` is the exchange and queue table a vhost consults on every
//! publish. Profiles of S1 (16-byte messages) put glibc's `memcmp` at 12% of the broker's CPU
//! for the two or three name comparisons each message needs; these are done inline. The hash
//! stays std's randomly keyed SipHash: names are chosen by clients.

use std::hash::{Hash, Hasher, RandomState};

use warren_protocol::same_bytes;

/// Whether two names are the same (`warren_protocol::same_bytes`: inline, no libc call).
#[inline]
pub fn same(a: &str, b: &str) -> bool {
    same_bytes(a.as_bytes(), b.as_bytes())
}

/// A name looked up in a `NameMap`: hashes as the `String` key does, compares with `same`.
struct Key<'a>(&'a str);

impl Hash for Key<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.hash(h)
    }
}

impl hashbrown::Equivalent<String> for Key<'_> {
    fn equivalent(&self, k: &String) -> bool {
        same(self.0, k)
    }
}

/// Values by name.
#[derive(Debug, Clone)]
pub struct NameMap<V>(hashbrown::HashMap<String, V, RandomState>);

impl<V> Default for NameMap<V> {
    fn default() -> Self {
        NameMap(hashbrown::HashMap::with_hasher(RandomState::new()))
    }
}

impl<V> NameMap<V> {
    pub fn get(&self, name: &str) -> Option<&V> {
        self.0.get(&Key(name))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(&Key(name))
    }

    pub fn insert(&mut self, name: String, v: V) -> Option<V> {
        self.0.insert(name, v)
    }

    pub fn remove(&mut self, name: &str) -> Option<V> {
        self.0.remove(&Key(name))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.0.values()
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_agrees_with_eq_at_every_length_and_position() {
        // Every length from 0 to 40 (whole words and every remainder), differing at each byte.
        for n in 0..40usize {
            let a: String = (0..n).map(|i| (b'a' + (i % 26) as u8) as char).collect();
            assert!(same(&a, &a.clone()));
            for i in 0..n {
                let mut b = a.clone().into_bytes();
                b[i] = b'Z';
                let b = String::from_utf8(b).unwrap();
                assert_eq!(same(&a, &b), a == b, "{a} {b}");
            }
            let longer = format!("{a}x");
            assert!(!same(&a, &longer) && !same(&longer, &a));
        }
    }

    #[test]
    fn a_name_map_finds_what_it_holds_and_nothing_else() {
        let mut m = NameMap::default();
        for i in 0..100 {
            m.insert(format!("queue.{i}"), i);
        }
        m.insert(String::new(), -1);
        assert_eq!(m.get(""), Some(&-1));
        for i in 0..100 {
            assert_eq!(m.get(&format!("queue.{i}")), Some(&i));
        }
        assert_eq!(m.get("queue.100"), None);
        assert_eq!(m.get("queue.1 "), None);
        assert_eq!(m.remove("queue.7"), Some(7));
        assert!(!m.contains("queue.7"));
        assert_eq!(m.len(), 100);
    }
}
