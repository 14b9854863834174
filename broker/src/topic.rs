//! Topic-pattern matching without a regex: a trie over binding-key words, with `*` (one word) and
//! `#` (zero or more words) branches. Patterns are added and removed incrementally.

use std::collections::HashMap;

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
        for w in pattern.split('.') {
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
        let words: Vec<&str> = pattern.split('.').collect();
        remove_at(&mut self.root, &words, value)
    }

    /// Appends the values of every pattern matching `key` (a value bound twice appears twice).
    pub fn matches(&self, key: &str, out: &mut Vec<T>) {
        let words: Vec<&str> = key.split('.').collect();
        walk(&self.root, &words, out);
    }
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

fn walk<T: Clone>(node: &Node<T>, words: &[&str], out: &mut Vec<T>) {
    if let Some(h) = &node.hash {
        // `#` takes zero or more words; try every split.
        for i in 0..=words.len() {
            walk(h, &words[i..], out);
        }
    }
    let Some((first, rest)) = words.split_first() else {
        out.extend(node.values.iter().cloned());
        return;
    };
    if let Some(child) = node.words.get(*first) {
        walk(child, rest, out);
    }
    if let Some(child) = &node.star {
        walk(child, rest, out);
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
        assert_eq!(m(&t, ""), vec![1, 4, 5]);
        assert_eq!(m(&t, "a.b"), vec![1, 2]);
        assert_eq!(m(&t, "a.x.y.b"), vec![1, 2]);
        assert_eq!(m(&t, "z"), vec![1, 3, 5]);
        assert_eq!(m(&t, "q.r.z"), vec![1, 3]);
        assert_eq!(m(&t, "a..b"), vec![1, 2]);
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
