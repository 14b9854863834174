//! `VHost`: one virtual host's exchanges, queues and bindings, and the topology operations
//! (declare, delete, bind, unbind, purge) with RabbitMQ's checks and texts. The exchange and queue
//! maps are `std::sync::RwLock`s read by every publish; topology changes are serialised by the
//! `admin` mutex so that, for example, a bind cannot race the deletion of its queue. No lock here
//! is held across `.await`. Durable entities are written through to the store (`Persistence`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use warren_protocol::{types::generation::gen_field_table, FieldTable};
use warren_storage::{BindingRecord, DestinationKind, ExchangeRecord, MessageStore, QueueRecord};

use crate::args;
use crate::auth::{Access, Perm, Resource};
use crate::deadletter::{self, Reason};
use crate::delay::{self, Delayer};
use crate::delivery::Consumer;
use crate::error::{AmqpError, AmqpResult};
use crate::exchange::{Bound, Destination, Exchange, ExchangeKind};
use crate::headers;
use crate::message::{now_ms, Message};
use crate::names::NameMap;
use crate::persist::Persistence;
use crate::policy::{self, Policy};
use crate::queue::{Entry, Queue, QueueSpec};

/// An exchange.declare, decoded.
#[derive(Debug, Clone)]
pub struct ExchangeDeclare {
    pub name: String,
    pub kind: String,
    pub passive: bool,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

/// A queue.declare, decoded.
#[derive(Debug, Clone)]
pub struct QueueDeclare {
    pub name: String,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

pub struct VHost {
    pub name: String,
    /// This vhost, for the timers and dead-letter routes its queues hold.
    me: Weak<VHost>,
    exchanges: RwLock<NameMap<Arc<Exchange>>>,
    queues: RwLock<NameMap<Arc<Queue>>>,
    admin: Mutex<()>,
    pub persist: Arc<Persistence>,
    /// Direct reply-to addresses of this vhost's channels.
    pub replies: crate::replyto::Replies,
    /// Description, tags and default queue type, as the management API shows them.
    meta: Mutex<VhostMeta>,
    /// Vhost limits (`vhost-limits` parameter): -1 is unlimited.
    pub max_connections: AtomicI64,
    pub max_queues: AtomicI64,
    /// Runtime parameters, by (component, name): the JSON text of each value.
    params: RwLock<BTreeMap<(String, String), String>>,
    /// Policies and operator policies, parsed from the `policy` and `operator_policy`
    /// parameters.
    policies: RwLock<(Vec<Policy>, Vec<Policy>)>,
    /// The node's counters (queue churn).
    stats: Arc<crate::stats::GlobalStats>,
}

/// The parameter components that hold policies.
pub const POLICY: &str = "policy";
pub const OPERATOR_POLICY: &str = "operator_policy";

/// A vhost's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostMeta {
    pub description: String,
    pub tags: Vec<String>,
    pub default_queue_type: String,
}

impl Default for VhostMeta {
    fn default() -> Self {
        VhostMeta {
            description: String::new(),
            tags: Vec::new(),
            default_queue_type: "classic".to_string(),
        }
    }
}

const BUILTIN: &[(&str, ExchangeKind)] = &[
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

fn encode_table(t: &FieldTable) -> Bytes {
    match gen_field_table(t)(warren_protocol::WriteContext::from(Vec::new())) {
        Ok(ctx) => Bytes::from(ctx.into_inner().0),
        Err(_) => Bytes::new(),
    }
}

fn decode_table(b: &[u8]) -> FieldTable {
    if b.is_empty() {
        return FieldTable::default();
    }
    match warren_protocol::types::parsing::parse_field_table(b) {
        Ok((_, t)) => t,
        Err(_) => {
            tracing::error!("stored argument table unreadable; using an empty one");
            FieldTable::default()
        }
    }
}

fn reserved(name: &str) -> bool {
    name.starts_with("amq.")
}

impl VHost {
    pub fn new(
        name: &str,
        persist: Arc<Persistence>,
        stats: Arc<crate::stats::GlobalStats>,
    ) -> Arc<Self> {
        let mut exchanges = NameMap::default();
        for (n, k) in BUILTIN {
            exchanges.insert(
                n.to_string(),
                Exchange::new(n, *k, true, false, false, FieldTable::default()),
            );
        }
        Arc::new_cyclic(|me| VHost {
            name: name.to_string(),
            me: me.clone(),
            exchanges: RwLock::new(exchanges),
            queues: RwLock::new(NameMap::default()),
            admin: Mutex::new(()),
            persist,
            replies: Default::default(),
            meta: Mutex::new(VhostMeta::default()),
            max_connections: AtomicI64::new(-1),
            max_queues: AtomicI64::new(-1),
            params: RwLock::new(BTreeMap::new()),
            policies: RwLock::new((Vec::new(), Vec::new())),
            stats,
        })
    }

    pub fn meta(&self) -> VhostMeta {
        self.meta.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_meta(&self, m: VhostMeta) {
        *self.meta.lock().unwrap_or_else(|e| e.into_inner()) = m;
    }

    /// Every exchange, the default one included.
    pub fn exchanges(&self) -> Vec<Arc<Exchange>> {
        self.all_exchanges()
    }

    /// Every queue (delayed exchanges' hidden stores are not queues here).
    pub fn queues(&self) -> Vec<Arc<Queue>> {
        self.queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn queue_count(&self) -> usize {
        self.queues.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The runtime parameter (component, name), as JSON text.
    pub fn parameter(&self, component: &str, name: &str) -> Option<String> {
        self.params
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(component.to_string(), name.to_string()))
            .cloned()
    }

    /// Every runtime parameter: (component, name, JSON text).
    pub fn parameters(&self) -> Vec<(String, String, String)> {
        self.params
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((c, n), v)| (c.clone(), n.clone(), v.clone()))
            .collect()
    }

    /// Sets (Some) or clears (None) a runtime parameter in memory; the caller stores it.
    /// `vhost-limits` takes effect at once.
    pub fn set_parameter(&self, component: &str, name: &str, value: Option<String>) {
        let key = (component.to_string(), name.to_string());
        {
            let mut p = self.params.write().unwrap_or_else(|e| e.into_inner());
            match &value {
                Some(v) => p.insert(key, v.clone()),
                None => p.remove(&key),
            };
        }
        if component == POLICY || component == OPERATOR_POLICY {
            self.reload_policies();
        }
        if component == "vhost-limits" {
            let limits: serde_json::Map<String, serde_json::Value> = value
                .as_deref()
                .and_then(|v| serde_json::from_str(v).ok())
                .unwrap_or_default();
            let limit = |k: &str| limits.get(k).and_then(|v| v.as_i64()).unwrap_or(-1);
            self.max_connections
                .store(limit("max-connections"), AtomicOrdering::Relaxed);
            self.max_queues
                .store(limit("max-queues"), AtomicOrdering::Relaxed);
        }
    }

    /// Parses the stored policies again and applies them to every queue and exchange.
    fn reload_policies(&self) {
        let parse = |component: &str, operator: bool| -> Vec<Policy> {
            self.parameters()
                .into_iter()
                .filter(|(c, _, _)| c == component)
                .filter_map(|(_, n, v)| {
                    let value: serde_json::Value = serde_json::from_str(&v).ok()?;
                    match Policy::parse(&n, &value, operator) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            tracing::error!(policy = %n, vhost = %self.name, "stored policy unusable: {e}");
                            None
                        }
                    }
                })
                .collect()
        };
        let lists = (parse(POLICY, false), parse(OPERATOR_POLICY, true));
        *self.policies.write().unwrap_or_else(|e| e.into_inner()) = lists;
        for q in self.queues() {
            self.apply_policy_to(&q);
        }
        for x in self.exchanges() {
            self.apply_policy_to_exchange(&x);
        }
    }

    /// Every policy (`operator` false) or operator policy of this vhost.
    pub fn policies(&self, operator: bool) -> Vec<Policy> {
        let g = self.policies.read().unwrap_or_else(|e| e.into_inner());
        if operator {
            g.1.clone()
        } else {
            g.0.clone()
        }
    }

    fn apply_policy_to(&self, q: &Arc<Queue>) {
        let e = {
            let g = self.policies.read().unwrap_or_else(|e| e.into_inner());
            policy::for_queue(
                &q.spec.arguments,
                policy::select(&g.0, q.name(), true),
                policy::select(&g.1, q.name(), true),
            )
        };
        q.apply_policy(e);
        self.watch_expiry(q);
    }

    /// A new or recovered exchange: its policy applies, then it is routable.
    fn install_exchange(&self, x: Arc<Exchange>) {
        self.apply_policy_to_exchange(&x);
        self.exchanges
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(x.name.clone(), x);
    }

    fn apply_policy_to_exchange(&self, x: &Arc<Exchange>) {
        let g = self.policies.read().unwrap_or_else(|e| e.into_inner());
        let p = policy::select(&g.0, &x.name, false);
        x.set_policy(
            p.map(|p| p.name.clone()),
            policy::alternate_for_exchange(&x.arguments, p),
        );
    }

    fn admin(&self) -> MutexGuard<'_, ()> {
        // The guard protects no data of its own, only ordering.
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn exchange(&self, name: &str) -> Option<Arc<Exchange>> {
        self.exchanges
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    pub fn queue(&self, name: &str) -> Option<Arc<Queue>> {
        self.queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    fn all_exchanges(&self) -> Vec<Arc<Exchange>> {
        self.exchanges
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn queue_names(&self) -> Vec<String> {
        self.queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn exchange_or_404(&self, name: &str) -> AmqpResult<Arc<Exchange>> {
        self.exchange(name)
            .ok_or_else(|| AmqpError::no_exchange(name, &self.name))
    }

    /// A queue `conn_id` may use: 405 beats 404 for exclusive queues of others.
    pub fn queue_for(&self, conn_id: u64, name: &str) -> AmqpResult<Arc<Queue>> {
        let q = self
            .queue(name)
            .ok_or_else(|| AmqpError::no_queue(name, &self.name))?;
        q.check_access(conn_id)?;
        Ok(q)
    }

    /// The exchange a basic.publish names (404 if missing, 403 if internal).
    pub fn publish_exchange(&self, name: &str) -> AmqpResult<Arc<Exchange>> {
        let x = self.exchange_or_404(name)?;
        if x.internal {
            return Err(AmqpError::access_refused(format!(
                "cannot publish to internal exchange '{}' in vhost '{}'",
                name, self.name
            )));
        }
        Ok(x)
    }

    pub fn declare_exchange(&self, d: &ExchangeDeclare) -> AmqpResult<()> {
        let _g = self.admin();
        // RabbitMQ's order: the type, the default exchange, existence, then the reserved prefix.
        let delayed = d.kind == delay::KIND;
        let kind = if d.passive {
            None
        } else if delayed {
            // The delayed-message plugin's rule: `x-delayed-type` names the routing.
            let t = d
                .arguments
                .inner()
                .get("x-delayed-type")
                .and_then(args::as_str);
            Some(t.as_deref().and_then(ExchangeKind::parse).ok_or_else(|| {
                AmqpError::precondition(
                    "Invalid argument, 'x-delayed-type' must be an existing exchange type",
                )
            })?)
        } else {
            Some(ExchangeKind::parse(&d.kind).ok_or_else(|| {
                AmqpError::precondition(format!("unknown exchange type '{}'", d.kind))
            })?)
        };
        if d.name.is_empty() {
            return Err(AmqpError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        let Some(kind) = kind else {
            self.exchange_or_404(&d.name)?;
            return Ok(());
        };
        if reserved(&d.name) && self.exchange(&d.name).is_none() {
            return Err(AmqpError::access_refused(format!(
                "exchange name '{}' contains reserved prefix 'amq.*'",
                d.name
            )));
        }
        if let Some(ae) = d.arguments.inner().get("alternate-exchange") {
            if args::as_str(ae).is_none() {
                return Err(AmqpError::precondition(format!(
                    "invalid type '{}' for arg 'alternate-exchange' in exchange '{}' in vhost '{}'",
                    args::type_name(ae),
                    d.name,
                    self.name
                )));
            }
        }
        if let Some(x) = self.exchange(&d.name) {
            let ineq = |what: &str, rec: String, cur: String| {
                Err(AmqpError::precondition(format!(
                    "inequivalent arg '{what}' for exchange '{}' in vhost '{}': received '{rec}' but current is '{cur}'",
                    d.name, self.name
                )))
            };
            if x.kind != kind || x.delay.get().is_some() != delayed {
                return ineq("type", d.kind.clone(), x.type_name().into());
            }
            if x.durable != d.durable {
                return ineq("durable", d.durable.to_string(), x.durable.to_string());
            }
            if x.auto_delete != d.auto_delete {
                return ineq(
                    "auto_delete",
                    d.auto_delete.to_string(),
                    x.auto_delete.to_string(),
                );
            }
            if x.internal != d.internal {
                return ineq("internal", d.internal.to_string(), x.internal.to_string());
            }
            args::check_equivalent(
                &format!("exchange '{}' in vhost '{}'", d.name, self.name),
                &["alternate-exchange", "x-delayed-type"],
                &x.arguments,
                &d.arguments,
            )?;
            // Its record may not be committed yet: the reply waits as the creator's does.
            warren_storage::Capture::include(x.stored.load(AtomicOrdering::Relaxed));
            return Ok(());
        }
        let x = Exchange::new(
            &d.name,
            kind,
            d.durable,
            d.auto_delete,
            d.internal,
            d.arguments.clone(),
        );
        if d.durable {
            let t = self.persist.put_exchange(ExchangeRecord {
                vhost: self.name.clone(),
                name: d.name.clone(),
                kind: if delayed { delay::KIND } else { kind.as_str() }.to_string(),
                auto_delete: d.auto_delete,
                internal: d.internal,
                arguments: encode_table(&d.arguments),
            });
            x.stored.store(t, AtomicOrdering::Relaxed);
        }
        if delayed {
            if let Some(me) = self.me.upgrade() {
                let _ = x.delay.set(Delayer::start(&me, &x, None));
            }
        }
        self.install_exchange(x);
        Ok(())
    }

    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> AmqpResult<()> {
        let _g = self.admin();
        if name.is_empty() {
            return Err(AmqpError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        if reserved(name) {
            return Err(AmqpError::access_refused(format!(
                "deletion of system exchange '{name}' in vhost '{}' not allowed",
                self.name
            )));
        }
        let Some(x) = self.exchange(name) else {
            return Ok(());
        };
        if if_unused && (x.has_bindings() || self.is_exchange_destination(&x)) {
            return Err(AmqpError::precondition(format!(
                "exchange '{name}' in vhost '{}' in use",
                self.name
            )));
        }
        self.remove_exchange_locked(&x)
    }

    fn is_exchange_destination(&self, x: &Arc<Exchange>) -> bool {
        let dest = Destination::Exchange(x.clone());
        let all = self.all_exchanges();
        all.iter()
            .any(|s| s.bindings().iter().any(|b| b.destination == dest))
    }

    fn remove_exchange_locked(&self, x: &Arc<Exchange>) -> AmqpResult<()> {
        self.exchanges
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&x.name);
        let dest = Destination::Exchange(x.clone());
        let all = self.all_exchanges();
        for s in all {
            if s.unbind_all_to(&dest) > 0 {
                self.maybe_auto_delete_locked(&s)?;
            }
        }
        // Its own bindings go with it. Losing an incoming binding never auto-deletes the
        // destination: RabbitMQ deletes an auto-delete exchange only when its last outgoing
        // binding goes.
        for b in x.bindings() {
            x.unbind(&b.destination, &b.routing_key, &b.arguments);
        }
        if x.durable {
            self.persist.delete_exchange(&self.name, &x.name);
        }
        if let Some(d) = x.delay.get() {
            d.delete(&self.name);
        }
        Ok(())
    }

    fn maybe_auto_delete_locked(&self, x: &Arc<Exchange>) -> AmqpResult<()> {
        if x.auto_delete
            && !x.has_bindings()
            && self
                .exchange(&x.name)
                .is_some_and(|cur| Arc::ptr_eq(&cur, x))
        {
            self.remove_exchange_locked(x)?;
        }
        Ok(())
    }

    /// queue.declare: returns the queue and its (message, consumer) counts.
    /// Permissions as RabbitMQ checks them: configure on the (generated) name unless passive;
    /// for a new queue with a dead-letter exchange, read on the queue and write on the DLX.
    pub fn declare_queue(
        &self,
        conn_id: u64,
        access: &Access,
        d: &QueueDeclare,
    ) -> AmqpResult<(Arc<Queue>, u32, u32)> {
        let _g = self.admin();
        self.stats.queue_declared.inc();
        let mut name = d.name.clone();
        if !d.passive {
            if reserved(&name) {
                return Err(AmqpError::access_refused(format!(
                    "queue name '{name}' contains reserved prefix 'amq.*'"
                )));
            }
            if name.is_empty() {
                name = server_name("amq.gen-");
            }
            access.check(Perm::Configure, Resource::Queue, &name)?;
        }
        if let Some(q) = self.queue(&name) {
            q.check_access(conn_id)?;
            if !d.passive {
                let ineq = |what: &str, rec: bool, cur: bool| {
                    Err(AmqpError::precondition(format!(
                        "inequivalent arg '{what}' for queue '{name}' in vhost '{}': received '{rec}' but current is '{cur}'",
                        self.name
                    )))
                };
                let exclusive = q.spec.exclusive_owner.is_some();
                if exclusive != d.exclusive {
                    return Err(AmqpError::locked_queue(&name, &self.name));
                }
                // An exclusive queue's durable flag is ignored (it is never durable).
                if !exclusive && q.spec.durable != d.durable {
                    return ineq("durable", d.durable, q.spec.durable);
                }
                if q.spec.auto_delete != d.auto_delete {
                    return ineq("auto_delete", d.auto_delete, q.spec.auto_delete);
                }
                args::check_queue_args_equivalent(
                    &name,
                    &self.name,
                    &q.spec.arguments,
                    &d.arguments,
                )?;
            }
            q.touch();
            // Its record may not be committed yet: the reply waits as the creator's does.
            warren_storage::Capture::include(q.stored.load(AtomicOrdering::Relaxed));
            let (m, c) = q.counts();
            return Ok((q, m, c));
        }
        if d.passive {
            return Err(AmqpError::no_queue(&name, &self.name));
        }
        if let Some(dlx) = d
            .arguments
            .inner()
            .get("x-dead-letter-exchange")
            .and_then(args::as_str)
        {
            access.check(Perm::Read, Resource::Queue, &name)?;
            access.check(Perm::Write, Resource::Exchange, &dlx)?;
        }
        args::validate_queue_args(&name, &self.name, &d.arguments)?;
        if d.arguments
            .inner()
            .get("x-queue-type")
            .and_then(args::as_str)
            .as_deref()
            == Some("quorum")
        {
            // RabbitMQ's quorum queues are durable and never exclusive or auto-delete.
            let bad = if !d.durable {
                Some("non-durable")
            } else if d.exclusive {
                Some("exclusive-owner")
            } else if d.auto_delete {
                Some("auto-delete")
            } else {
                None
            };
            if d.name.is_empty() {
                return Err(AmqpError::precondition(
                    "Cannot declare a server-named queue for type rabbit_quorum_queue",
                ));
            }
            if let Some(p) = bad {
                return Err(AmqpError::precondition(format!(
                    "invalid property '{p}' for queue '{name}' in vhost '{}'",
                    self.name
                )));
            }
        }
        let max = self.max_queues.load(AtomicOrdering::Relaxed);
        if max >= 0 && self.queue_count() as i64 >= max {
            return Err(AmqpError::precondition(format!(
                "cannot declare queue '{name}' in vhost '{}': queue limit in vhost '{}' ({max}) \
                 is reached",
                self.name, self.name
            )));
        }
        let durable = d.durable && !d.exclusive;
        let id = self.persist.next_queue_id();
        let q = Queue::new(
            &self.name,
            QueueSpec {
                name: name.clone(),
                durable,
                exclusive_owner: d.exclusive.then_some(conn_id),
                auto_delete: d.auto_delete,
                arguments: d.arguments.clone(),
            },
            id,
            self.persist.clone(),
        );
        self.apply_policy_to(&q);
        if durable {
            let t = self.persist.put_queue(QueueRecord {
                id,
                vhost: self.name.clone(),
                name: name.clone(),
                auto_delete: d.auto_delete,
                arguments: encode_table(&d.arguments),
                delivered_seq: 0,
            });
            q.stored.store(t, AtomicOrdering::Relaxed);
        }
        self.stats.queue_created.inc();
        self.adopt(&q);
        self.queues
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone(), q.clone());
        // Every queue is bound to the default exchange under its own name; that binding is
        // implicit in routing (see `route`).
        Ok((q, 0, 0))
    }

    /// queue.delete with its conditions: the number of messages deleted, and the consumers the
    /// caller must cancel (after its delete-ok).
    pub fn delete_queue(
        &self,
        conn_id: u64,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> AmqpResult<(u32, Vec<Arc<Consumer>>)> {
        let _g = self.admin();
        let Some(q) = self.queue(name) else {
            return Ok((0, Vec::new()));
        };
        q.check_access(conn_id)?;
        let (messages, consumers) = q.counts();
        if if_empty && messages > 0 {
            return Err(AmqpError::precondition(format!(
                "queue '{name}' in vhost '{}' not empty",
                self.name
            )));
        }
        if if_unused && consumers > 0 {
            return Err(AmqpError::precondition(format!(
                "queue '{name}' in vhost '{}' in use",
                self.name
            )));
        }
        self.remove_queue_locked(&q)
    }

    /// Deletes a queue unconditionally (exclusive owner gone, auto-delete), cancelling its
    /// consumers.
    pub fn remove_queue(&self, q: &Arc<Queue>) -> AmqpResult<u32> {
        let (n, consumers) = {
            let _g = self.admin();
            self.remove_queue_locked(q)?
        };
        Queue::cancel_consumers(consumers);
        Ok(n)
    }

    fn remove_queue_locked(&self, q: &Arc<Queue>) -> AmqpResult<(u32, Vec<Arc<Consumer>>)> {
        {
            let mut map = self.queues.write().unwrap_or_else(|e| e.into_inner());
            match map.get(q.name()) {
                Some(cur) if Arc::ptr_eq(cur, q) => {
                    map.remove(q.name());
                }
                _ => return Ok((0, Vec::new())),
            }
        }
        let (n, consumers) = q.mark_deleted();
        self.stats.queue_deleted.inc();
        let dest = Destination::Queue(q.clone());
        let all = self.all_exchanges();
        for x in all {
            if x.unbind_all_to(&dest) > 0 {
                self.maybe_auto_delete_locked(&x)?;
            }
        }
        if q.spec.durable || q.stored_any() {
            self.persist.delete_queue(q.id, &self.name, q.name());
        }
        Ok((n, consumers))
    }

    pub fn purge_queue(&self, conn_id: u64, name: &str) -> AmqpResult<u32> {
        Ok(self.queue_for(conn_id, name)?.purge())
    }

    fn check_bindable(&self, name: &str) -> AmqpResult<()> {
        if name.is_empty() {
            return Err(AmqpError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        Ok(())
    }

    fn check_binding_args(&self, x: &Exchange, arguments: &FieldTable) -> AmqpResult<()> {
        if x.kind == ExchangeKind::Headers {
            headers::x_match(arguments)?;
        }
        Ok(())
    }

    fn binding_record(
        &self,
        source: &str,
        dest: &str,
        kind: DestinationKind,
        key: &str,
        a: &FieldTable,
    ) -> BindingRecord {
        BindingRecord {
            vhost: self.name.clone(),
            source: source.to_string(),
            destination: dest.to_string(),
            destination_kind: kind,
            routing_key: key.to_string(),
            arguments: encode_table(a),
        }
    }

    pub fn bind_queue(
        &self,
        conn_id: u64,
        queue: &str,
        exchange: &str,
        key: &str,
        a: &FieldTable,
    ) -> AmqpResult<()> {
        let _g = self.admin();
        self.check_bindable(exchange)?;
        let q = self.queue_for(conn_id, queue)?;
        let x = self.exchange_or_404(exchange)?;
        self.check_binding_args(&x, a)?;
        let bound = x.bind(Destination::Queue(q.clone()), key, a.clone());
        if x.durable && q.spec.durable {
            self.store_binding(bound, || {
                self.binding_record(exchange, queue, DestinationKind::Queue, key, a)
            });
        }
        Ok(())
    }

    pub fn unbind_queue(
        &self,
        conn_id: u64,
        queue: &str,
        exchange: &str,
        key: &str,
        a: &FieldTable,
    ) -> AmqpResult<()> {
        let _g = self.admin();
        self.check_bindable(exchange)?;
        // RabbitMQ answers unbind-ok when the binding, the queue or the exchange is already
        // gone; clients' clean-up code (aio-pika's RPC among them) depends on it.
        let Some(q) = self.queue(queue) else {
            return Ok(());
        };
        q.check_access(conn_id)?;
        let Some(x) = self.exchange(exchange) else {
            return Ok(());
        };
        if x.unbind(&Destination::Queue(q.clone()), key, a) {
            if x.durable && q.spec.durable {
                self.persist.delete_binding(self.binding_record(
                    exchange,
                    queue,
                    DestinationKind::Queue,
                    key,
                    a,
                ));
            }
            self.maybe_auto_delete_locked(&x)?;
        }
        Ok(())
    }

    pub fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: &str,
        a: &FieldTable,
    ) -> AmqpResult<()> {
        let _g = self.admin();
        self.check_bindable(source)?;
        self.check_bindable(destination)?;
        let d = self.exchange_or_404(destination)?;
        let s = self.exchange_or_404(source)?;
        self.check_binding_args(&s, a)?;
        let bound = s.bind(Destination::Exchange(d.clone()), key, a.clone());
        if s.durable && d.durable {
            self.store_binding(bound, || {
                self.binding_record(source, destination, DestinationKind::Exchange, key, a)
            });
        }
        Ok(())
    }

    /// Writes a new durable binding's record; for one found already there, the reply waits
    /// for its record's commit (bind-ok means it survives a restart), as a declare does.
    fn store_binding(&self, bound: Bound, record: impl FnOnce() -> BindingRecord) {
        match bound {
            Bound::New(b) => {
                let t = self.persist.put_binding(record());
                b.stored.store(t, AtomicOrdering::Relaxed);
            }
            Bound::Existing(b) => {
                warren_storage::Capture::include(b.stored.load(AtomicOrdering::Relaxed))
            }
        }
    }

    pub fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: &str,
        a: &FieldTable,
    ) -> AmqpResult<()> {
        let _g = self.admin();
        self.check_bindable(source)?;
        self.check_bindable(destination)?;
        // As queue.unbind: what is already gone is unbound.
        let (Some(d), Some(s)) = (self.exchange(destination), self.exchange(source)) else {
            return Ok(());
        };
        if s.unbind(&Destination::Exchange(d.clone()), key, a) {
            if s.durable && d.durable {
                self.persist.delete_binding(self.binding_record(
                    source,
                    destination,
                    DestinationKind::Exchange,
                    key,
                    a,
                ));
            }
            self.maybe_auto_delete_locked(&s)?;
        }
        Ok(())
    }

    /// The queues `msg` reaches from `exchange`: bindings, exchange-to-exchange bindings (each
    /// exchange visited once) and alternate exchanges for what an exchange cannot route.
    /// Each queue appears once.
    pub fn route(&self, exchange: &Arc<Exchange>, msg: &Message, out: &mut Vec<Arc<Queue>>) {
        let mut visited: Vec<*const Exchange> = Vec::new();
        self.route_into(exchange, msg, out, &mut visited);
        if out.len() > 1 {
            out.sort_by_key(|q| Arc::as_ptr(q) as usize);
            out.dedup_by(|a, b| Arc::ptr_eq(a, b));
        }
        exchange.taps.offer(msg, out);
    }

    fn route_into(
        &self,
        x: &Arc<Exchange>,
        msg: &Message,
        out: &mut Vec<Arc<Queue>>,
        visited: &mut Vec<*const Exchange>,
    ) -> bool {
        if visited.contains(&Arc::as_ptr(x)) {
            return false;
        }
        visited.push(Arc::as_ptr(x));
        let start = out.len();
        let mut routed = false;
        if x.name.is_empty() {
            if let Some(q) = self.queue(msg.routing_key.as_str()) {
                out.push(q);
                routed = true;
            }
        } else {
            let mut dests = Vec::new();
            x.route(msg, &mut dests);
            for d in dests {
                match d {
                    Destination::Queue(q) => {
                        out.push(q);
                        routed = true;
                    }
                    Destination::Exchange(e) => routed |= self.route_into(&e, msg, out, visited),
                }
            }
        }
        if !routed {
            let alternate = x.alternate.load_full();
            if let Some(ae) = alternate.as_deref().and_then(|n| self.exchange(n)) {
                routed = self.route_into(&ae, msg, out, visited);
            }
        }
        // The published-to exchange's watchers see the deduplicated list (`route`); one
        // reached through an exchange-to-exchange binding or as an alternate sees what it
        // routed to.
        if visited.first() != Some(&Arc::as_ptr(x)) {
            x.taps.offer(msg, &out[start..]);
        }
        routed
    }

    /// Rebuilds this vhost's durable exchanges, queues (their messages paged, read lazily) and
    /// bindings from what the store recovered.
    /// Returns how many queues and stored messages it recovered.
    pub async fn restore(
        &self,
        snap: &warren_storage::Snapshot,
    ) -> Result<(usize, u64), warren_storage::StoreError> {
        let (mut queues, mut messages) = (0usize, 0u64);
        for r in snap.exchanges.iter().filter(|r| r.vhost == self.name) {
            let arguments = decode_table(&r.arguments);
            let delayed = r.kind == delay::KIND;
            let kind = if delayed {
                arguments
                    .inner()
                    .get("x-delayed-type")
                    .and_then(args::as_str)
                    .and_then(|t| ExchangeKind::parse(&t))
            } else {
                ExchangeKind::parse(&r.kind)
            };
            let Some(kind) = kind else {
                tracing::error!(exchange = %r.name, kind = %r.kind, "stored exchange of unknown type skipped");
                continue;
            };
            if r.name.len() > 255 {
                tracing::error!(exchange = %r.name, "stored exchange name longer than 255 bytes skipped");
                continue;
            }
            let x = Exchange::new(&r.name, kind, true, r.auto_delete, r.internal, arguments);
            if delayed {
                let hidden = format!("{}{}", delay::HIDDEN_PREFIX, r.name);
                let held = match snap
                    .queues
                    .iter()
                    .find(|q| q.vhost == self.name && q.name == hidden)
                {
                    Some(q) => {
                        let summary = self.persist.store.queue_summary(q.id).await?;
                        messages += summary.count;
                        Some((q.id, summary.count))
                    }
                    None => None,
                };
                if let Some(me) = self.me.upgrade() {
                    let _ = x.delay.set(Delayer::start(&me, &x, held));
                }
            }
            self.install_exchange(x);
        }
        for r in snap.queues.iter().filter(|r| r.vhost == self.name) {
            if let Some(x) = r.name.strip_prefix(delay::HIDDEN_PREFIX) {
                // A delayed exchange's held messages: attached above, or orphaned.
                if self.exchange(x).is_none_or(|x| x.delay.get().is_none()) {
                    self.persist.delete_queue(r.id, &self.name, &r.name);
                }
                continue;
            }
            let arguments = decode_table(&r.arguments);
            if r.name.len() > 255 {
                tracing::error!(queue = %r.name, "stored queue name longer than 255 bytes skipped");
                continue;
            }
            if let Err(e) = args::validate_queue_args(&r.name, &self.name, &arguments) {
                // Stored by an older version that checked less: kept, but it will not
                // dead-letter through an argument that cannot be sent.
                tracing::warn!(queue = %r.name, error = %e.text, "stored queue arguments no longer valid");
            }
            let summary = self.persist.store.queue_summary(r.id).await?;
            // Only a byte-limited queue needs its stored bytes (a scan of its bodies' sizes).
            let bytes = if summary.count > 0
                && args::QueueArgs::parse(&arguments)
                    .max_length_bytes
                    .is_some()
            {
                self.persist.store.queue_bytes(r.id).await?
            } else {
                0
            };
            queues += 1;
            messages += summary.count;
            let q = Queue::recovered(
                &self.name,
                QueueSpec {
                    name: r.name.clone(),
                    durable: true,
                    exclusive_owner: None,
                    auto_delete: r.auto_delete,
                    arguments,
                },
                r.id,
                self.persist.clone(),
                summary,
                r.delivered_seq,
                bytes,
            );
            // Adopted first: a policy's limits may dead-letter at once.
            self.adopt(&q);
            self.apply_policy_to(&q);
            self.queues
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(r.name.clone(), q);
        }
        for b in snap.bindings.iter().filter(|b| b.vhost == self.name) {
            let Some(x) = self.exchange(&b.source) else {
                continue;
            };
            let dest = match b.destination_kind {
                DestinationKind::Queue => self.queue(&b.destination).map(Destination::Queue),
                DestinationKind::Exchange => {
                    self.exchange(&b.destination).map(Destination::Exchange)
                }
            };
            if let Some(dest) = dest {
                x.bind(dest, &b.routing_key, decode_table(&b.arguments));
            }
        }
        // A queue with a message TTL expires its head from the start, as RabbitMQ's recovered
        // queues do, not only once a client touches it: load its head (which arms its timer).
        let ttl_queues: Vec<Arc<Queue>> = self
            .queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|q| q.args().message_ttl.is_some())
            .cloned()
            .collect();
        for q in ttl_queues {
            q.dispatch();
        }
        Ok((queues, messages))
    }

    /// A new or recovered queue: dead letters route through this vhost, and an `x-expires`
    /// queue gets its watcher.
    fn adopt(&self, q: &Arc<Queue>) {
        let router: Weak<dyn crate::queue::Router> = self.me.clone();
        q.set_router(router);
        self.watch_expiry(q);
    }

    /// Starts the `x-expires` watcher of a queue that has the argument (declared or by policy)
    /// and none yet. The period is read again on every wake-up, so a policy change applies;
    /// the watcher ends when the queue no longer expires.
    fn watch_expiry(&self, q: &Arc<Queue>) {
        if q.args().expires.is_none() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if q.expiry_watched.swap(true, AtomicOrdering::AcqRel) {
            return;
        }
        let (vh, wq) = (self.me.clone(), Arc::downgrade(q));
        // One sleeping task per expiring queue: it wakes once per period while the queue is
        // in use, so idle queues cost no CPU.
        rt.spawn(async move {
            loop {
                let wait = {
                    let Some(q) = wq.upgrade() else { return };
                    let Some(ms) = q.args().expires else {
                        q.expiry_watched.store(false, AtomicOrdering::Release);
                        return;
                    };
                    let ttl = Duration::from_millis(ms);
                    let (deleted, idle) = q.idle_since();
                    if deleted {
                        return;
                    }
                    match idle {
                        None => ttl,
                        Some(since) if since.elapsed() >= ttl => {
                            if let Some(vh) = vh.upgrade() {
                                tracing::info!(queue = q.name(), vhost = %vh.name, "queue expired (x-expires); deleting it");
                                if let Err(e) = vh.remove_queue(&q) {
                                    tracing::warn!(queue = q.name(), error = %e, "expiring queue failed");
                                }
                            }
                            return;
                        }
                        Some(since) => ttl - since.elapsed(),
                    }
                };
                // A shorter period set by a policy meanwhile is seen within a second.
                tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
            }
        });
    }

    /// Dead-letters `msg`, which leaves `src` (as `entry`): republished to the queue's
    /// dead-letter exchange with its `x-death` history, minus the queues that would close a
    /// cycle. The removal from `src` commits with the inserts into the targets.
    pub fn dead_letter(&self, src: &Arc<Queue>, entry: Entry, msg: Arc<Message>, reason: Reason) {
        let removal = src.removal(&entry);
        let drop_it = |removal: Option<warren_storage::Op>| {
            if let Some(op) = removal {
                self.persist.submit(op);
            }
        };
        let args = src.args();
        let Some(dlx) = args.dead_letter_exchange.as_deref() else {
            return drop_it(removal);
        };
        let Some(x) = self.exchange(dlx) else {
            tracing::debug!(
                queue = src.name(),
                exchange = dlx,
                "dead-letter exchange missing; message dropped"
            );
            return drop_it(removal);
        };
        let rk = src
            .args()
            .dead_letter_routing_key
            .clone()
            .unwrap_or_else(|| msg.routing_key.to_string());
        let Some(dl) = deadletter::dead_lettered(
            &msg,
            self.persist.next_message_id(),
            src.name(),
            reason,
            dlx,
            &rk,
            now_ms() / 1000,
        ) else {
            tracing::error!(
                queue = src.name(),
                exchange = dlx,
                "dead-letter exchange or routing key longer than 255 bytes; message dropped"
            );
            return drop_it(removal);
        };
        let dl = Arc::new(dl);
        let mut targets = Vec::new();
        self.route(&x, &dl, &mut targets);
        targets.retain(|q| {
            let cycle = deadletter::is_cycle(&dl, q.name());
            if cycle {
                tracing::warn!(
                    queue = q.name(),
                    from = src.name(),
                    "dead-letter cycle without a rejection; message dropped for this queue"
                );
            }
            !cycle
        });
        if targets.is_empty() {
            tracing::debug!(queue = src.name(), seq = entry.seq, exchange = dlx, routing_key = %rk, "dead letter routed nowhere; dropped");
            return drop_it(removal);
        }
        Queue::publish_atomic(&targets, &dl, removal);
    }

    /// Deletes the exclusive queues `conn_id` owns (its connection closed).
    pub fn drop_exclusive(&self, conn_id: u64) {
        let owned: Vec<_> = self
            .queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|q| q.spec.exclusive_owner == Some(conn_id))
            .cloned()
            .collect();
        for q in owned {
            if let Err(e) = self.remove_queue(&q) {
                tracing::warn!(queue = q.name(), error = %e, "could not delete exclusive queue");
            }
        }
    }
}

/// `amq.gen-` followed by 22 URL-safe base64 characters of 128 random bits, as RabbitMQ names
/// server-named queues (and `amq.ctag-` consumer tags).
pub fn server_name(prefix: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bits: u128 = rand::random();
    let mut s = String::with_capacity(prefix.len() + 22);
    s.push_str(prefix);
    for i in 0..22 {
        s.push(ALPHABET[((bits >> (i * 6)) & 63) as usize] as char);
    }
    s
}

impl crate::queue::Router for VHost {
    fn dead_letter(&self, src: &Arc<Queue>, entry: Entry, msg: Arc<Message>, reason: Reason) {
        VHost::dead_letter(self, src, entry, msg, reason)
    }

    fn remove_queue(&self, q: &Arc<Queue>) -> AmqpResult<u32> {
        VHost::remove_queue(self, q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::persist::Persistence;

    async fn vh() -> Arc<VHost> {
        let (p, _) = Persistence::open(&Config::for_tests()).await.unwrap();
        VHost::new("/", p, Default::default())
    }
    fn qd(name: &str) -> QueueDeclare {
        QueueDeclare {
            name: name.into(),
            passive: false,
            durable: false,
            exclusive: false,
            auto_delete: false,
            arguments: FieldTable::default(),
        }
    }
    fn xd(name: &str, kind: &str) -> ExchangeDeclare {
        ExchangeDeclare {
            name: name.into(),
            kind: kind.into(),
            passive: false,
            durable: false,
            auto_delete: false,
            internal: false,
            arguments: FieldTable::default(),
        }
    }
    fn msg(rk: &str) -> Message {
        Message::encoded(
            1,
            "".into(),
            rk.into(),
            &Default::default(),
            Bytes::new(),
            None,
        )
        .unwrap()
    }
    fn routed(v: &VHost, x: &str, rk: &str) -> Vec<String> {
        let mut out = vec![];
        v.route(&v.exchange(x).unwrap(), &msg(rk), &mut out);
        let mut names: Vec<_> = out.iter().map(|q| q.name().to_string()).collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn declare_rules() {
        let v = vh().await;
        assert_eq!(
            v.declare_exchange(&xd("amq.foo", "direct"))
                .unwrap_err()
                .code,
            403
        );
        assert_eq!(
            v.declare_exchange(&xd("x", "nonsense")).unwrap_err().code,
            406
        );
        v.declare_exchange(&xd("x", "direct")).unwrap();
        let e = v.declare_exchange(&xd("x", "fanout")).unwrap_err();
        assert_eq!(e.text, "inequivalent arg 'type' for exchange 'x' in vhost '/': received 'fanout' but current is 'direct'");
        let (q, _, _) = v
            .declare_queue(1, &crate::auth::Access::full("guest", "/"), &qd(""))
            .unwrap();
        assert!(q.name().starts_with("amq.gen-") && q.name().len() == 30);
        assert_eq!(
            v.declare_queue(1, &crate::auth::Access::full("guest", "/"), &qd("amq.q"))
                .unwrap_err()
                .code,
            403
        );
        let mut durable = qd("d");
        v.declare_queue(1, &crate::auth::Access::full("guest", "/"), &durable)
            .unwrap();
        durable.durable = true;
        let e = v
            .declare_queue(1, &crate::auth::Access::full("guest", "/"), &durable)
            .unwrap_err();
        assert_eq!(e.text, "inequivalent arg 'durable' for queue 'd' in vhost '/': received 'true' but current is 'false'");
        let mut ex = qd("ex");
        ex.exclusive = true;
        v.declare_queue(1, &crate::auth::Access::full("guest", "/"), &ex)
            .unwrap();
        assert_eq!(
            v.declare_queue(2, &crate::auth::Access::full("guest", "/"), &ex)
                .unwrap_err()
                .code,
            405
        );
        assert_eq!(v.queue_for(2, "ex").unwrap_err().code, 405);
        let mut passive = qd("missing");
        passive.passive = true;
        assert_eq!(
            v.declare_queue(1, &crate::auth::Access::full("guest", "/"), &passive)
                .unwrap_err()
                .text,
            "no queue 'missing' in vhost '/'"
        );
    }

    #[tokio::test]
    async fn routing_through_types_e2e_and_ae() {
        let v = vh().await;
        for q in ["q1", "q2", "q3", "unrouted"] {
            v.declare_queue(1, &crate::auth::Access::full("guest", "/"), &qd(q))
                .unwrap();
        }
        let t = FieldTable::default();
        v.bind_queue(1, "q1", "amq.topic", "a.*", &t).unwrap();
        v.bind_queue(1, "q2", "amq.topic", "a.#", &t).unwrap();
        assert_eq!(routed(&v, "amq.topic", "a.b"), vec!["q1", "q2"]);
        assert_eq!(routed(&v, "amq.topic", "a"), vec!["q2"]);
        assert_eq!(routed(&v, "", "q3"), vec!["q3"]);
        // exchange to exchange, with a cycle
        v.declare_exchange(&xd("fan", "fanout")).unwrap();
        v.bind_exchange("fan", "amq.topic", "#", &t).unwrap();
        v.bind_exchange("amq.topic", "fan", "", &t).unwrap();
        v.bind_queue(1, "q3", "fan", "", &t).unwrap();
        assert_eq!(routed(&v, "amq.topic", "a.b"), vec!["q1", "q2", "q3"]);
        // alternate exchange
        let mut d = xd("withae", "direct");
        d.arguments.insert(
            "alternate-exchange".into(),
            warren_protocol::AMQPValue::LongString("ae".into()),
        );
        v.declare_exchange(&d).unwrap();
        v.declare_exchange(&xd("ae", "fanout")).unwrap();
        v.bind_queue(1, "unrouted", "ae", "", &t).unwrap();
        v.bind_queue(1, "q1", "withae", "k", &t).unwrap();
        assert_eq!(routed(&v, "withae", "k"), vec!["q1"]);
        assert_eq!(routed(&v, "withae", "other"), vec!["unrouted"]);
    }

    #[tokio::test]
    async fn auto_delete_exchange_and_queue_cleanup() {
        let v = vh().await;
        v.declare_queue(1, &crate::auth::Access::full("guest", "/"), &qd("q"))
            .unwrap();
        let mut d = xd("ad", "direct");
        d.auto_delete = true;
        v.declare_exchange(&d).unwrap();
        let t = FieldTable::default();
        v.bind_queue(1, "q", "ad", "k", &t).unwrap();
        v.unbind_queue(1, "q", "ad", "k", &t).unwrap();
        assert!(v.exchange("ad").is_none());
        v.declare_exchange(&d).unwrap();
        v.bind_queue(1, "q", "ad", "k", &t).unwrap();
        v.delete_queue(1, "q", false, false).unwrap();
        assert!(
            v.exchange("ad").is_none(),
            "deleting the queue removed the last binding"
        );
        assert_eq!(
            v.delete_exchange("amq.direct", false).unwrap_err().code,
            403
        );
        v.delete_exchange("nope", false).unwrap();
        v.delete_queue(1, "nope", false, false).unwrap();
    }
}
