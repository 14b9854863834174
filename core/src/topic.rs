//! Topic-pattern matching without a regex: a trie over binding-key words, with `*` (one word) and
//! `#` (zero or more words) branches. Patterns are added and removed incrementally. Matching
//! visits each (trie node, word position) pair at most once, so a key of `w` words against a
//! trie of `n` nodes costs O(n × w) however many `#` the patterns hold.

use std::collections::{HashMap, HashSet};

#[derive(Debug)]
struct Node<T> {
    words: HashMap<Box<str>, Node<T>>,
    star: Option<Box<Node<T>>>,
    hash: Option<Box<Node<T>>>,
    values: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            words: HashMap::new(),
            star: None,
            hash: None,
            values: Vec::new(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.values.is_empty()
            && self.words.is_empty()
            && self.star.is_none()
            && self.hash.is_none()
    }
}

/// A set of topic binding keys, each with its values.
#[derive(Debug)]
pub struct TopicTrie<T> {
    root: Node<T>,
}

impl<T> Default for TopicTrie<T> {
    fn default() -> Self {
        TopicTrie {
            root: Node::default(),
        }
    }
}

impl<T: Clone + PartialEq> TopicTrie<T> {
    pub fn insert(&mut self, pattern: &str, value: T) {
        let mut node = &mut self.root;
        for w in pattern_words(pattern) {
            node = match w {
                "*" => node.star.get_or_insert_with(Default::default),
                "#" => node.hash.get_or_insert_with(Default::default),
                w => node.words.entry(w.into()).or_default(),
            };
        }
        node.values.push(value);
    }

    /// Removes one `value` under `pattern`; true if it was there.
    pub fn remove(&mut self, pattern: &str, value: &T) -> bool {
        let words: Vec<&str> = pattern_words(pattern).collect();
        remove_at(&mut self.root, &words, value)
    }

    /// Appends the values of every pattern matching `key`, each pattern's values once (a value
    /// bound under two patterns appears twice).
    pub fn matches(&self, key: &str, out: &mut Vec<T>) {
        let words: Vec<&str> = key_words(key).collect();
        let mut seen = HashSet::new();
        walk(&self.root, &words, 0, &mut seen, out);
    }
}

/// A key's words. As in RabbitMQ, the empty key has none (so `*` does not match it, `#` does).
fn key_words(key: &str) -> impl Iterator<Item = &str> {
    key.split('.').filter(move |_| !key.is_empty())
}

/// A pattern's words with runs of `#` collapsed to one (`#.#` matches what `#` matches).
fn pattern_words(pattern: &str) -> impl Iterator<Item = &str> {
    let mut prev_hash = false;
    key_words(pattern).filter(move |w| {
        let hash = *w == "#";
        let keep = !(hash && prev_hash);
        prev_hash = hash;
        keep
    })
}

fn remove_at<T: PartialEq>(node: &mut Node<T>, words: &[&str], value: &T) -> bool {
    let Some((first, rest)) = words.split_first() else {
        return match node.values.iter().position(|v| v == value) {
            Some(i) => {
                node.values.remove(i);
                true
            }
            None => false,
        };
    };
    let removed;
    match *first {
        "*" | "#" => {
            let slot = if *first == "*" {
                &mut node.star
            } else {
                &mut node.hash
            };
            let Some(child) = slot.as_mut() else {
                return false;
            };
            removed = remove_at(child, rest, value);
            if child.is_empty() {
                *slot = None;
            }
        }
        w => {
            let Some(child) = node.words.get_mut(w) else {
                return false;
            };
            removed = remove_at(child, rest, value);
            if child.is_empty() {
                node.words.remove(w);
            }
        }
    }
    removed
}

/// A matching state: a trie node at a word position; `true` marks "inside a `#` that may still
/// take the word at that position".
type Seen<T> = HashSet<(*const Node<T>, usize, bool)>;

/// Visits `node` at word position `at`, unless that state was visited already (a `#` reaches the
/// same state by many splits; visiting it once keeps matching polynomial and each match single).
fn walk<T: Clone>(node: &Node<T>, words: &[&str], at: usize, seen: &mut Seen<T>, out: &mut Vec<T>) {
    if !seen.insert((node as *const Node<T>, at, false)) {
        return;
    }
    if let Some(h) = &node.hash {
        // `#` takes zero or more words: continue after it at every later position. A position
        // already taken by this `#` means every later one was taken too.
        for i in at..=words.len() {
            if !seen.insert((&**h as *const Node<T>, i, true)) {
                break;
            }
            walk(h, words, i, seen, out);
        }
    }
    let Some(first) = words.get(at) else {
        out.extend(node.values.iter().cloned());
        return;
    };
    if let Some(child) = node.words.get(*first) {
        walk(child, words, at + 1, seen, out);
    }
    if let Some(child) = &node.star {
        walk(child, words, at + 1, seen, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(t: &TopicTrie<u32>, key: &str) -> Vec<u32> {
        let mut v = vec![];
        t.matches(key, &mut v);
        v.sort();
        v.dedup();
        v
    }

    #[test]
    fn rabbitmq_tutorial_cases() {
        let mut t = TopicTrie::default();
        t.insert("*.orange.*", 1);
        t.insert("*.*.rabbit", 2);
        t.insert("lazy.#", 2);
        assert_eq!(m(&t, "quick.orange.rabbit"), vec![1, 2]);
        assert_eq!(m(&t, "lazy.orange.elephant"), vec![1, 2]);
        assert_eq!(m(&t, "quick.orange.fox"), vec![1]);
        assert_eq!(m(&t, "lazy.brown.fox"), vec![2]);
        assert_eq!(m(&t, "lazy.pink.rabbit"), vec![2]);
        assert_eq!(m(&t, "quick.brown.fox"), Vec::<u32>::new());
        assert_eq!(m(&t, "orange"), Vec::<u32>::new());
        assert_eq!(m(&t, "quick.orange.male.rabbit"), Vec::<u32>::new());
        assert_eq!(m(&t, "lazy.orange.male.rabbit"), vec![2]);
        assert_eq!(m(&t, "lazy"), vec![2]);
    }

    #[test]
    fn hash_edge_cases() {
        let mut t = TopicTrie::default();
        t.insert("#", 1);
        t.insert("a.#.b", 2);
        t.insert("#.z", 3);
        t.insert("", 4);
        t.insert("*", 5);
        // The empty key has no words: `#` and the empty binding match it, `*` does not.
        assert_eq!(m(&t, ""), vec![1, 4]);
        assert_eq!(m(&t, "a.b"), vec![1, 2]);
        assert_eq!(m(&t, "a.x.y.b"), vec![1, 2]);
        assert_eq!(m(&t, "z"), vec![1, 3, 5]);
        assert_eq!(m(&t, "q.r.z"), vec![1, 3]);
        assert_eq!(m(&t, "a..b"), vec![1, 2]);
    }

    #[test]
    fn repeated_hashes_match_in_polynomial_time_and_once() {
        let mut t = TopicTrie::default();
        t.insert("#.#.#.#.#.#.#.#", 1);
        t.insert("#.#.#.#.#.#.#.#.x", 2);
        t.insert("a.#.*.#.*.#", 3);
        // The longest key a peer can send (255 bytes), and a much longer one.
        let mut v = vec![];
        t.matches(&vec!["a"; 128].join("."), &mut v);
        v.sort();
        assert_eq!(v, vec![1, 3]);
        let key = vec!["a"; 5000].join(".");
        let start = std::time::Instant::now();
        let mut v = vec![];
        t.matches(&key, &mut v);
        v.sort();
        assert_eq!(v, vec![1, 3], "each pattern's value once");
        // O(nodes × words): milliseconds; the exponential walk took seconds at 30 words.
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        let mut v = vec![];
        t.matches("a.b.x", &mut v);
        v.sort();
        assert_eq!(v, vec![1, 2, 3]);
        // `#.#` and `#` are one pattern: removing one form removes the other.
        assert!(t.remove("#", &1));
        assert!(t.remove("#.#.#.#.#.#.#.#.x", &2));
        assert!(t.remove("a.#.#.*.#.*.#.#", &3));
        assert!(t.root.is_empty());
    }

    #[test]
    fn remove_prunes() {
        let mut t = TopicTrie::default();
        t.insert("a.*.c", 1);
        t.insert("a.*.c", 2);
        assert!(t.remove("a.*.c", &1));
        assert!(!t.remove("a.*.c", &1));
        assert_eq!(m(&t, "a.b.c"), vec![2]);
        assert!(t.remove("a.*.c", &2));
        assert!(t.root.is_empty());
    }
}
