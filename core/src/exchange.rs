//! `Exchange`: an exchange's properties and bindings, with the per-type indexes routing reads:
//! a key map for direct, a trie for topic, the list for fanout and headers. Bindings sit behind a
//! `std::sync::RwLock`: many publishers route at once, binding changes are rare and short.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use warren_protocol::{FieldTable, ShortString};

use crate::delay::Delayer;
use crate::headers::{self, XMatch};
use crate::message::Message;
use crate::queue::Queue;
use crate::topic::TopicTrie;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "topic" => ExchangeKind::Topic,
            "headers" => ExchangeKind::Headers,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// Where a binding sends messages.
#[derive(Debug, Clone)]
pub enum Destination {
    Queue(Arc<Queue>),
    Exchange(Arc<Exchange>),
}

impl PartialEq for Destination {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Destination::Queue(a), Destination::Queue(b)) => Arc::ptr_eq(a, b),
            (Destination::Exchange(a), Destination::Exchange(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// What `Exchange::bind` did.
#[derive(Debug)]
pub enum Bound {
    New(Arc<Binding>),
    /// An equal binding was already there (this one).
    Existing(Arc<Binding>),
}

#[derive(Debug)]
pub struct Binding {
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: FieldTable,
    x_match: XMatch,
    /// The store ticket of its record (0: nothing to wait for: not durable, or recovered from
    /// the store): a bind that finds it already there answers once that is committed.
    pub stored: AtomicU64,
}

impl PartialEq for Binding {
    fn eq(&self, other: &Self) -> bool {
        self.destination == other.destination
            && self.routing_key == other.routing_key
            && self.arguments == other.arguments
    }
}

#[derive(Debug, Default)]
struct Table {
    all: Vec<Arc<Binding>>,
    direct: HashMap<String, Vec<Arc<Binding>>>,
    topic: TopicTrie<Arc<Binding>>,
}

#[derive(Debug)]
pub struct Exchange {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    /// Where unroutable messages go: the `alternate-exchange` argument, else the policy's.
    pub alternate: arc_swap::ArcSwapOption<String>,
    /// The policy that applies, for the management API.
    pub policy: arc_swap::ArcSwapOption<String>,
    pub short_name: ShortString,
    /// Set for an `x-delayed-message` exchange (`kind` is then its `x-delayed-type`).
    pub delay: OnceLock<Arc<Delayer>>,
    table: RwLock<Table>,
    /// Messages in and routed out (the management API's `message_stats`).
    pub stats: crate::stats::ExchangeStats,
    /// Live-tail watchers (the console).
    pub taps: crate::tap::Taps,
    /// The store ticket of its record (0: none): a declare that finds it waits for that commit.
    pub stored: std::sync::atomic::AtomicU64,
}

impl Exchange {
    pub fn new(
        name: &str,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Arc<Self> {
        let alternate = match arguments.inner().get("alternate-exchange") {
            Some(warren_protocol::AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            Some(warren_protocol::AMQPValue::ShortString(s)) => Some(s.as_str().to_string()),
            _ => None,
        };
        Arc::new(Exchange {
            name: name.to_string(),
            kind,
            durable,
            auto_delete,
            internal,
            arguments,
            alternate: arc_swap::ArcSwapOption::from(alternate.map(Arc::new)),
            policy: arc_swap::ArcSwapOption::empty(),
            short_name: warren_protocol::short::truncated(name),
            delay: OnceLock::new(),
            table: RwLock::new(Table::default()),
            stats: Default::default(),
            taps: Default::default(),
            stored: Default::default(),
        })
    }

    /// A policy was set, changed or removed.
    pub fn set_policy(&self, name: Option<String>, alternate: Option<String>) {
        self.policy.store(name.map(Arc::new));
        self.alternate.store(alternate.map(Arc::new));
    }

    /// The type as declared: `x-delayed-message` for a delayed exchange.
    pub fn type_name(&self) -> &'static str {
        if self.delay.get().is_some() {
            crate::delay::KIND
        } else {
            self.kind.as_str()
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Table> {
        // Each write is one complete insert or remove; a poisoned lock still holds a valid table.
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a binding, or finds an identical one. `x-match` must have been validated.
    pub fn bind(
        &self,
        destination: Destination,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Bound {
        let x_match = headers::x_match(&arguments).unwrap_or(XMatch::All);
        let b = Arc::new(Binding {
            destination,
            routing_key: routing_key.to_string(),
            arguments,
            x_match,
            stored: AtomicU64::new(0),
        });
        let mut t = self.write();
        if let Some(old) = t.all.iter().find(|x| ***x == *b) {
            return Bound::Existing(old.clone());
        }
        match self.kind {
            ExchangeKind::Direct => t
                .direct
                .entry(b.routing_key.clone())
                .or_default()
                .push(b.clone()),
            ExchangeKind::Topic => t.topic.insert(&b.routing_key, b.clone()),
            ExchangeKind::Fanout | ExchangeKind::Headers => {}
        }
        t.all.push(b.clone());
        Bound::New(b)
    }

    /// Removes the binding equal to (destination, key, args); true if it was there.
    pub fn unbind(
        &self,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> bool {
        let mut t = self.write();
        let Some(pos) = t.all.iter().position(|b| {
            b.destination == *destination
                && b.routing_key == routing_key
                && b.arguments == *arguments
        }) else {
            return false;
        };
        let b = t.all.remove(pos);
        Self::unindex(self.kind, &mut t, &b);
        true
    }

    fn unindex(kind: ExchangeKind, t: &mut Table, b: &Arc<Binding>) {
        match kind {
            ExchangeKind::Direct => {
                if let Some(v) = t.direct.get_mut(&b.routing_key) {
                    v.retain(|x| !Arc::ptr_eq(x, b));
                    if v.is_empty() {
                        t.direct.remove(&b.routing_key);
                    }
                }
            }
            ExchangeKind::Topic => {
                t.topic.remove(&b.routing_key, b);
            }
            ExchangeKind::Fanout | ExchangeKind::Headers => {}
        }
    }

    /// Removes every binding to `destination`; returns how many.
    pub fn unbind_all_to(&self, destination: &Destination) -> usize {
        let mut t = self.write();
        let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut t.all)
            .into_iter()
            .partition(|b| b.destination == *destination);
        t.all = keep;
        for b in &gone {
            Self::unindex(self.kind, &mut t, b);
        }
        gone.len()
    }

    pub fn has_bindings(&self) -> bool {
        !self.read().all.is_empty()
    }

    pub fn has_binding(
        &self,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> bool {
        self.read().all.iter().any(|b| {
            b.destination == *destination
                && b.routing_key == routing_key
                && b.arguments == *arguments
        })
    }

    /// Every binding (for listing and cleanup).
    pub fn bindings(&self) -> Vec<Arc<Binding>> {
        self.read().all.clone()
    }

    /// Appends the destinations `msg` routes to through this exchange's own bindings.
    pub fn route(&self, msg: &Message, out: &mut Vec<Destination>) {
        // Decoded before taking the lock (only headers exchanges read the properties).
        let props = (self.kind == ExchangeKind::Headers).then(|| msg.properties());
        let t = self.read();
        match self.kind {
            ExchangeKind::Fanout => out.extend(t.all.iter().map(|b| b.destination.clone())),
            ExchangeKind::Direct => {
                if let Some(v) = t.direct.get(msg.routing_key.as_str()) {
                    out.extend(v.iter().map(|b| b.destination.clone()));
                }
            }
            ExchangeKind::Topic => {
                let mut hits = Vec::new();
                t.topic.matches(msg.routing_key.as_str(), &mut hits);
                out.extend(hits.into_iter().map(|b| b.destination.clone()));
            }
            ExchangeKind::Headers => {
                let h = props.as_ref().and_then(|p| p.headers().as_ref());
                out.extend(
                    t.all
                        .iter()
                        .filter(|b| headers::matches(b.x_match, &b.arguments, h))
                        .map(|b| b.destination.clone()),
                );
            }
        }
    }
}
