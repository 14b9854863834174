//! `Admin`: the one facade through which operations tools (the management API, the CLI behind
//! it, definitions import) read and change the broker. It creates and deletes vhosts, users,
//! permissions, parameters and topology with the same checks as AMQP clients get, waits for
//! each change to be committed before answering, and hands out read-only views (queue state,
//! counters, connections) without reaching into queue internals. No HTTP here: errors are
//! `AdminError`, which the HTTP layer maps to status codes.

use std::sync::Arc;

use warren_protocol::protocol::{basic, AMQPClass};
use warren_protocol::{AMQPProperties, FieldTable};
use warren_storage::{
    Capture, GlobalParameterRecord, MetaStore, Op, ParameterRecord, PermissionRecord, Tickets,
    TopicPermissionRecord, UserRecord, VhostRecord,
};

use crate::auth::Access;
use crate::broker::Broker;
use crate::delivery::{ChannelHandle, DeliverySink};
use crate::error::AmqpError;
use crate::exchange::Exchange;
use crate::message::Message;
use crate::queue::{Enqueued, Got as QueueGot, Queue};
use crate::vhost::{ExchangeDeclare, QueueDeclare, VHost, VhostMeta};

/// Why an admin operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// The object (or its vhost) does not exist.
    #[error("not found")]
    NotFound,
    /// The request is malformed or refused by a check (RabbitMQ's 400 bad_request).
    #[error("{0}")]
    BadRequest(String),
    /// Refused as an access violation (a reserved `amq.` name).
    #[error("access refused")]
    Refused,
    /// The store could not commit the change.
    #[error("store unavailable: {0}")]
    Store(String),
}

impl From<AmqpError> for AdminError {
    /// As RabbitMQ's management API reports a refused AMQP operation: 404 for not found, 401
    /// "Access refused." for an access refusal (reserved names), 400 with the text otherwise.
    fn from(e: AmqpError) -> Self {
        match e.code {
            warren_protocol::reply::NOT_FOUND => AdminError::NotFound,
            warren_protocol::reply::ACCESS_REFUSED => AdminError::Refused,
            _ => AdminError::BadRequest(e.text),
        }
    }
}

impl From<warren_storage::StoreError> for AdminError {
    fn from(e: warren_storage::StoreError) -> Self {
        AdminError::Store(e.to_string())
    }
}

pub type AdminResult<T> = Result<T, AdminError>;

/// A binding as listed: source exchange, destination, key and arguments.
#[derive(Debug, Clone)]
pub struct BindingView {
    pub vhost: String,
    pub source: String,
    pub destination: String,
    /// "queue" or "exchange"
    pub destination_type: &'static str,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// How "get messages" settles what it took (the management API's `ackmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetMode {
    AckRequeueTrue,
    AckRequeueFalse,
    RejectRequeueTrue,
    RejectRequeueFalse,
}

/// One message "get messages" returned.
#[derive(Debug, Clone)]
pub struct Got {
    pub message: Arc<Message>,
    pub redelivered: bool,
    /// Messages left in the queue after this one.
    pub message_count: u32,
}

/// The delivery sink of a management "get": collects get-ok replies.
#[derive(Default)]
struct Collect(std::sync::Mutex<Vec<Got>>);

impl Collect {
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn take(&self) -> Vec<Got> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl DeliverySink for Collect {
    fn send_method(&self, _channel: u16, _method: AMQPClass) {}

    fn send_content(&self, _channel: u16, method: AMQPClass, msg: Arc<Message>) {
        if let AMQPClass::Basic(basic::AMQPMethod::GetOk(g)) = method {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(Got {
                message: msg,
                redelivered: g.redelivered,
                message_count: g.message_count,
            });
        }
    }

    fn has_room(&self) -> bool {
        true
    }

    fn park(&self, _queue: &Arc<Queue>) {}

    fn wait_room(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }
}

/// The facade. Cheap to clone.
#[derive(Clone)]
pub struct Admin {
    pub broker: Arc<Broker>,
}

impl Admin {
    pub fn new(broker: Arc<Broker>) -> Admin {
        Admin { broker }
    }

    fn vhost(&self, name: &str) -> AdminResult<Arc<VHost>> {
        self.broker.vhost(name).ok_or(AdminError::NotFound)
    }

    /// Waits until the store writes `t` are committed, and fails if the store refused one of
    /// the change's own. `t` is what a change's `Capture` recorded: an operator's transient
    /// declare does not wait for other clients' writes (during a database outage, for ever).
    pub(crate) async fn committed(&self, t: &Tickets) -> AdminResult<()> {
        if !self.broker.persist.writer.stored(t).await {
            return Err(AdminError::Store("the change could not be stored".into()));
        }
        Ok(())
    }

    /// Waits until everything submitted so far is committed: for changes made across awaits
    /// (message operations), which no `Capture` can follow.
    pub(crate) async fn everything_committed(&self) -> AdminResult<()> {
        self.committed(&Tickets::one(self.broker.persist.writer.last_ticket()))
            .await
    }

    async fn store(&self, op: Op) -> AdminResult<()> {
        let t = self.broker.persist.submit(op);
        self.committed(&Tickets::one(t)).await
    }

    /// Users and permissions changed: forget what the data cache holds.
    fn auth_changed(&self) {
        self.broker.users.invalidate();
    }

    // ----- vhosts -----

    pub fn vhosts(&self) -> Vec<Arc<VHost>> {
        self.broker.vhosts()
    }

    pub fn find_vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.broker.vhost(name)
    }

    /// Creates a vhost (with its default exchanges) or updates its metadata. Returns whether
    /// it was created.
    pub async fn put_vhost(&self, name: &str, meta: VhostMeta) -> AdminResult<bool> {
        if name.is_empty() || name.len() > 255 {
            return Err(AdminError::BadRequest(
                "vhost names are 1 to 255 bytes".into(),
            ));
        }
        let record = VhostRecord {
            name: name.to_string(),
            description: meta.description.clone(),
            tags: meta.tags.join(","),
            default_queue_type: meta.default_queue_type.clone(),
        };
        let created = match self.broker.vhost(name) {
            Some(v) => {
                v.set_meta(meta);
                false
            }
            None => {
                let v = VHost::new(name, self.broker.persist.clone(), self.broker.stats.clone());
                v.set_meta(meta);
                self.broker.insert_vhost(v);
                true
            }
        };
        self.store(Op::PutVhost(record)).await?;
        self.auth_changed();
        Ok(created)
    }

    /// Deletes a vhost: its connections are closed with 320, its queues (with their messages),
    /// exchanges, bindings, permissions and parameters are removed.
    pub async fn delete_vhost(&self, name: &str) -> AdminResult<()> {
        let v = self.broker.remove_vhost(name).ok_or(AdminError::NotFound)?;
        for c in self.broker.connections.in_vhost(name) {
            c.request_close(&format!("vhost '{name}' is deleted"));
        }
        for x in v.exchanges() {
            if !x.name.is_empty() && !x.name.starts_with("amq.") {
                let _ = v.delete_exchange(&x.name, false);
            }
        }
        for q in v.queues() {
            let _ = v.remove_queue(&q);
        }
        self.store(Op::DeleteVhost {
            name: name.to_string(),
        })
        .await?;
        self.auth_changed();
        Ok(())
    }

    // ----- users and permissions -----

    pub async fn users(&self) -> AdminResult<Vec<UserRecord>> {
        Ok(self.broker.persist.store.list_users().await?)
    }

    pub async fn user(&self, name: &str) -> AdminResult<Option<UserRecord>> {
        Ok(self.broker.persist.store.user(name).await?)
    }

    /// Checks a login (Basic auth of the HTTP API): the user's record if the password
    /// matches.
    /// Checks a login from `peer` as an AMQP login is checked (password, loopback users).
    pub async fn login(
        &self,
        name: &str,
        password: &str,
        peer: std::net::IpAddr,
    ) -> AdminResult<Option<Arc<UserRecord>>> {
        match self.broker.authenticate(name, password, peer).await {
            Ok(()) => Ok(self.broker.users.user(name).await?),
            Err(crate::auth::LoginError::StoreUnavailable(e)) => Err(AdminError::Store(e)),
            Err(_) => Ok(None),
        }
    }

    /// Creates or replaces a user. Returns whether it was created.
    pub async fn put_user(&self, name: &str, hash: Vec<u8>, tags: &[String]) -> AdminResult<bool> {
        if name.is_empty() || name.len() > 255 {
            return Err(AdminError::BadRequest(
                "user names are 1 to 255 bytes".into(),
            ));
        }
        let existing = self.user(name).await?;
        let created = existing.is_none();
        self.store(Op::PutUser(UserRecord {
            name: name.to_string(),
            password_hash: hash,
            tags: tags.join(","),
            // A new password or new tags keep the user's limits.
            limits: existing.map_or_else(|| "{}".to_string(), |u| u.limits),
        }))
        .await?;
        self.auth_changed();
        Ok(created)
    }

    /// A user's limits as stored (a JSON object, `{}` for none); NotFound for no such user.
    pub async fn user_limits(
        &self,
        name: &str,
    ) -> AdminResult<serde_json::Map<String, serde_json::Value>> {
        let u = self.user(name).await?.ok_or(AdminError::NotFound)?;
        Ok(serde_json::from_str(&u.limits).unwrap_or_default())
    }

    /// Sets (Some) or clears (None) one of a user's limits (`crate::auth::USER_LIMITS`).
    /// It applies to connections and channels opened from then on.
    pub async fn set_user_limit(
        &self,
        user: &str,
        limit: &str,
        value: Option<i64>,
    ) -> AdminResult<()> {
        if !crate::auth::USER_LIMITS.contains(&limit) {
            return Err(AdminError::BadRequest(format!(
                "unknown user limit {limit}"
            )));
        }
        let mut u = self.user(user).await?.ok_or(AdminError::NotFound)?;
        let mut limits: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&u.limits).unwrap_or_default();
        let changed = match value {
            Some(v) => limits.insert(limit.to_string(), v.into()) != Some(v.into()),
            None => limits.remove(limit).is_some(),
        };
        if !changed {
            return Ok(());
        }
        u.limits = serde_json::Value::Object(limits).to_string();
        self.store(Op::PutUser(u)).await?;
        self.auth_changed();
        Ok(())
    }

    pub async fn delete_user(&self, name: &str) -> AdminResult<()> {
        if self.user(name).await?.is_none() {
            return Err(AdminError::NotFound);
        }
        self.store(Op::DeleteUser {
            name: name.to_string(),
        })
        .await?;
        self.auth_changed();
        Ok(())
    }

    pub async fn permissions(&self) -> AdminResult<Vec<PermissionRecord>> {
        Ok(self.broker.persist.store.list_permissions().await?)
    }

    pub async fn topic_permissions(&self) -> AdminResult<Vec<TopicPermissionRecord>> {
        Ok(self.broker.persist.store.list_topic_permissions().await?)
    }

    fn check_regex(re: &str) -> AdminResult<()> {
        regex::Regex::new(re).map(|_| ()).map_err(|_| {
            AdminError::BadRequest(format!("cannot compile regular expression '{re}'"))
        })
    }

    /// Sets a user's permissions in a vhost. Returns whether they are new.
    pub async fn put_permission(&self, p: PermissionRecord) -> AdminResult<bool> {
        if self.broker.vhost(&p.vhost).is_none() || self.user(&p.user).await?.is_none() {
            return Err(AdminError::BadRequest("vhost_or_user_not_found".into()));
        }
        for re in [&p.configure, &p.write, &p.read] {
            Self::check_regex(re)?;
        }
        let created = self
            .broker
            .persist
            .store
            .permission(&p.vhost, &p.user)
            .await?
            .is_none();
        self.store(Op::PutPermission(p)).await?;
        self.auth_changed();
        Ok(created)
    }

    pub async fn delete_permission(&self, vhost: &str, user: &str) -> AdminResult<()> {
        if self
            .broker
            .persist
            .store
            .permission(vhost, user)
            .await?
            .is_none()
        {
            return Err(AdminError::NotFound);
        }
        self.store(Op::DeletePermission {
            vhost: vhost.to_string(),
            user: user.to_string(),
        })
        .await?;
        self.auth_changed();
        Ok(())
    }

    pub async fn put_topic_permission(&self, p: TopicPermissionRecord) -> AdminResult<bool> {
        if self.broker.vhost(&p.vhost).is_none() || self.user(&p.user).await?.is_none() {
            return Err(AdminError::BadRequest("vhost_or_user_not_found".into()));
        }
        for re in [&p.write, &p.read] {
            Self::check_regex(re)?;
        }
        let created = !self
            .broker
            .persist
            .store
            .topic_permissions(&p.vhost, &p.user)
            .await?
            .iter()
            .any(|t| t.exchange == p.exchange);
        self.store(Op::PutTopicPermission(p)).await?;
        self.auth_changed();
        Ok(created)
    }

    pub async fn delete_topic_permission(
        &self,
        vhost: &str,
        user: &str,
        exchange: Option<&str>,
    ) -> AdminResult<()> {
        let held = self
            .broker
            .persist
            .store
            .topic_permissions(vhost, user)
            .await?;
        if !held
            .iter()
            .any(|t| exchange.is_none_or(|x| t.exchange == x))
        {
            return Err(AdminError::NotFound);
        }
        self.store(Op::DeleteTopicPermission {
            vhost: vhost.to_string(),
            user: user.to_string(),
            exchange: exchange.map(str::to_string),
        })
        .await?;
        self.auth_changed();
        Ok(())
    }

    // ----- parameters -----

    /// Sets a vhost's runtime parameter (`value` is JSON text). Returns whether it was new.
    pub async fn set_parameter(
        &self,
        vhost: &str,
        component: &str,
        name: &str,
        value: String,
    ) -> AdminResult<bool> {
        let v = self.vhost(vhost)?;
        if component == crate::vhost::POLICY || component == crate::vhost::OPERATOR_POLICY {
            let json: serde_json::Value = serde_json::from_str(&value)
                .map_err(|_| AdminError::BadRequest("not_json".into()))?;
            crate::policy::Policy::parse(name, &json, component == crate::vhost::OPERATOR_POLICY)
                .map_err(AdminError::BadRequest)?;
        }
        if name.is_empty() || name.len() > 255 {
            return Err(AdminError::BadRequest("names are 1 to 255 bytes".into()));
        }
        let created = v.parameter(component, name).is_none();
        v.set_parameter(component, name, Some(value.clone()));
        self.store(Op::PutParameter(ParameterRecord {
            vhost: vhost.to_string(),
            component: component.to_string(),
            name: name.to_string(),
            value,
        }))
        .await?;
        Ok(created)
    }

    pub async fn clear_parameter(
        &self,
        vhost: &str,
        component: &str,
        name: &str,
    ) -> AdminResult<()> {
        let v = self.vhost(vhost)?;
        if v.parameter(component, name).is_none() {
            return Err(AdminError::NotFound);
        }
        v.set_parameter(component, name, None);
        self.store(Op::DeleteParameter {
            vhost: vhost.to_string(),
            component: component.to_string(),
            name: name.to_string(),
        })
        .await
    }

    pub fn global_parameters(&self) -> Vec<(String, String)> {
        self.broker
            .globals
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub async fn set_global_parameter(&self, name: &str, value: String) -> AdminResult<bool> {
        let created = self
            .broker
            .globals
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), value.clone())
            .is_none();
        self.store(Op::PutGlobalParameter(GlobalParameterRecord {
            name: name.to_string(),
            value,
        }))
        .await?;
        Ok(created)
    }

    pub async fn clear_global_parameter(&self, name: &str) -> AdminResult<()> {
        let had = self
            .broker
            .globals
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .is_some();
        if !had {
            return Err(AdminError::NotFound);
        }
        self.store(Op::DeleteGlobalParameter {
            name: name.to_string(),
        })
        .await
    }

    // ----- topology -----

    /// Declares an exchange as a client would (same checks). Returns whether it was created.
    pub async fn declare_exchange(&self, vhost: &str, d: ExchangeDeclare) -> AdminResult<bool> {
        let v = self.vhost(vhost)?;
        let created = v.exchange(&d.name).is_none();
        let (r, t) = Capture::run(|| v.declare_exchange(&d));
        r?;
        self.committed(&t).await?;
        Ok(created)
    }

    pub async fn delete_exchange(
        &self,
        vhost: &str,
        name: &str,
        if_unused: bool,
    ) -> AdminResult<()> {
        let v = self.vhost(vhost)?;
        if v.exchange(name).is_none() {
            return Err(AdminError::NotFound);
        }
        let (r, t) = Capture::run(|| v.delete_exchange(name, if_unused));
        r?;
        self.committed(&t).await
    }

    /// Declares a queue as a client would (no owner: never exclusive). Returns whether it was
    /// created.
    pub async fn declare_queue(
        &self,
        vhost: &str,
        user: &str,
        d: QueueDeclare,
    ) -> AdminResult<bool> {
        let v = self.vhost(vhost)?;
        if d.exclusive {
            return Err(AdminError::BadRequest(
                "exclusive queues belong to a connection".into(),
            ));
        }
        let created = v.queue(&d.name).is_none();
        let (r, t) = Capture::run(|| v.declare_queue(0, &Access::full(user, vhost), &d));
        r?;
        self.committed(&t).await?;
        Ok(created)
    }

    pub async fn delete_queue(
        &self,
        vhost: &str,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> AdminResult<()> {
        let v = self.vhost(vhost)?;
        let q = v.queue(name).ok_or(AdminError::NotFound)?;
        // The AMQP method's checks and texts; an operator may delete another's exclusive queue.
        let owner = q.spec.exclusive_owner.unwrap_or(0);
        let (r, t) = Capture::run(|| {
            let (_, consumers) = v.delete_queue(owner, name, if_unused, if_empty)?;
            Queue::cancel_consumers(consumers);
            Ok::<_, AdminError>(())
        });
        r?;
        self.committed(&t).await
    }

    pub async fn purge_queue(&self, vhost: &str, name: &str) -> AdminResult<u32> {
        let v = self.vhost(vhost)?;
        let q = v.queue(name).ok_or(AdminError::NotFound)?;
        let (n, t) = Capture::run(|| q.purge());
        self.committed(&t).await?;
        Ok(n)
    }

    /// Binds `destination` (a queue, or an exchange when `to_exchange`) to `source`.
    pub async fn bind(
        &self,
        vhost: &str,
        source: &str,
        to_exchange: bool,
        destination: &str,
        key: &str,
        arguments: &FieldTable,
    ) -> AdminResult<()> {
        let v = self.vhost(vhost)?;
        if v.exchange(source).is_none() {
            return Err(AdminError::NotFound);
        }
        let (r, t) = Capture::run(|| {
            if to_exchange {
                if v.exchange(destination).is_none() {
                    return Err(AdminError::NotFound);
                }
                v.bind_exchange(destination, source, key, arguments)?;
            } else {
                let q = v.queue(destination).ok_or(AdminError::NotFound)?;
                let owner = q.spec.exclusive_owner.unwrap_or(0);
                v.bind_queue(owner, destination, source, key, arguments)?;
            }
            Ok(())
        });
        r?;
        self.committed(&t).await
    }

    pub async fn unbind(
        &self,
        vhost: &str,
        source: &str,
        to_exchange: bool,
        destination: &str,
        key: &str,
        arguments: &FieldTable,
    ) -> AdminResult<()> {
        let v = self.vhost(vhost)?;
        let found = self.bindings(vhost).into_iter().any(|b| {
            b.source == source
                && b.destination == destination
                && (b.destination_type == "exchange") == to_exchange
                && b.routing_key == key
                && b.arguments == *arguments
        });
        if !found {
            return Err(AdminError::NotFound);
        }
        let (r, t) = Capture::run(|| {
            if to_exchange {
                v.unbind_exchange(destination, source, key, arguments)?;
            } else {
                let owner = v
                    .queue(destination)
                    .and_then(|q| q.spec.exclusive_owner)
                    .unwrap_or(0);
                v.unbind_queue(owner, destination, source, key, arguments)?;
            }
            Ok::<_, AdminError>(())
        });
        r?;
        self.committed(&t).await
    }

    /// Every binding of a vhost, the default exchange's implicit ones first (as RabbitMQ
    /// lists them: one per queue, keyed by the queue's name).
    pub fn bindings(&self, vhost: &str) -> Vec<BindingView> {
        let Some(v) = self.broker.vhost(vhost) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut queues = v.queues();
        queues.sort_by(|a, b| a.name().cmp(b.name()));
        for q in &queues {
            out.push(BindingView {
                vhost: vhost.to_string(),
                source: String::new(),
                destination: q.name().to_string(),
                destination_type: "queue",
                routing_key: q.name().to_string(),
                arguments: FieldTable::default(),
            });
        }
        let mut exchanges = v.exchanges();
        exchanges.sort_by(|a, b| a.name.cmp(&b.name));
        for x in exchanges.iter().filter(|x| !x.name.is_empty()) {
            for b in x.bindings() {
                let (destination, destination_type) = match &b.destination {
                    crate::exchange::Destination::Queue(q) => (q.name().to_string(), "queue"),
                    crate::exchange::Destination::Exchange(x) => (x.name.clone(), "exchange"),
                };
                out.push(BindingView {
                    vhost: vhost.to_string(),
                    source: x.name.clone(),
                    destination,
                    destination_type,
                    routing_key: b.routing_key.clone(),
                    arguments: b.arguments.clone(),
                });
            }
        }
        out
    }

    pub fn exchange(&self, vhost: &str, name: &str) -> Option<Arc<Exchange>> {
        self.broker.vhost(vhost)?.exchange(name)
    }

    pub fn queue(&self, vhost: &str, name: &str) -> Option<Arc<Queue>> {
        self.broker.vhost(vhost)?.queue(name)
    }

    /// Unacknowledged deliveries per queue (by address), counted over every open channel.
    pub fn unacked_by_queue(&self) -> std::collections::HashMap<usize, u64> {
        self.broker.unacked_by_queue()
    }

    /// Publishes a message as the management API's "publish message" does: routed like a
    /// client's basic.publish (without mandatory); a persistent message is committed before
    /// this returns. Returns whether any queue (or a delayed exchange) took it.
    pub async fn publish(
        &self,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
        properties: AMQPProperties,
        body: bytes::Bytes,
    ) -> AdminResult<bool> {
        let v = self.vhost(vhost)?;
        let x = v.publish_exchange(exchange)?;
        if routing_key.len() > 255 {
            return Err(AdminError::BadRequest(
                "routing_key longer than 255 bytes".into(),
            ));
        }
        let persist = &self.broker.persist;
        if let Some(e) = properties.expiration() {
            if let Some(why) = crate::message::expiration_problem(e.as_str()) {
                return Err(AdminError::BadRequest(format!(
                    "invalid expiration '{}': {why}",
                    e.as_str()
                )));
            }
        }
        let msg = Arc::new(
            Message::encoded(
                persist.next_message_id(),
                warren_protocol::short::truncated(exchange),
                warren_protocol::short::truncated(routing_key),
                &properties,
                body,
                Some(persist.gauge.clone()),
            )
            .map_err(|e| AdminError::BadRequest(format!("properties: {e}")))?,
        );
        let stats = &self.broker.stats;
        stats.publish.inc();
        x.stats.publish_in.inc();
        let mut ticket = 0;
        let mut routed = false;
        match x
            .delay
            .get()
            .and_then(|d| crate::delay::delay_of(&msg).map(|ms| (d, ms)))
        {
            Some((d, ms)) => {
                ticket = d.hold(&msg, ms);
                routed = true;
            }
            None => {
                let mut queues = Vec::new();
                v.route(&x, &msg, &mut queues);
                let mut row = None;
                for q in queues {
                    // An HTTP publish is not slowed by a congested queue.
                    match q.publish(&msg, &mut row, None).0 {
                        Enqueued::Deleted => {}
                        Enqueued::Rejected | Enqueued::Held => routed = true,
                        Enqueued::Stored { ticket: t, durable } => {
                            routed = true;
                            if durable {
                                ticket = ticket.max(t);
                            }
                        }
                    }
                }
            }
        }
        if routed {
            x.stats.publish_out.inc();
        } else {
            stats.drop_unroutable.inc();
        }
        if ticket > 0 {
            let w = &persist.writer;
            if !w.wait(ticket).await || w.failed(ticket) {
                return Err(AdminError::Store("the message could not be stored".into()));
            }
        }
        Ok(routed)
    }

    /// Takes up to `count` messages from a queue as the management API's "get messages"
    /// does, then settles them by `mode`. The queue's own rules apply (TTL, dead-lettering of
    /// rejected messages, delivery counts).
    pub async fn get(
        &self,
        vhost: &str,
        queue: &str,
        count: usize,
        mode: GetMode,
    ) -> AdminResult<Vec<Got>> {
        let q = self.queue(vhost, queue).ok_or(AdminError::NotFound)?;
        let sink = Arc::new(Collect::default());
        let ch = ChannelHandle::new(0, 0, sink.clone(), false, self.broker.stats.clone());
        let no_ack = mode == GetMode::AckRequeueFalse;
        let mut loads = 0;
        while sink.len() < count {
            match q.get(&ch, no_ack) {
                QueueGot::Delivered => {}
                QueueGot::Empty => break,
                QueueGot::Load(f) => {
                    loads += 1;
                    if loads > 3 {
                        break;
                    }
                    f.await;
                }
            }
        }
        let taken = ch.take_all_unacked();
        for u in &taken {
            ch.release(u);
        }
        match mode {
            GetMode::AckRequeueFalse => {}
            GetMode::AckRequeueTrue | GetMode::RejectRequeueTrue => {
                q.requeue(taken.into_iter().map(|u| u.entry));
            }
            GetMode::RejectRequeueFalse => {
                for u in taken {
                    u.queue.discard(u.entry);
                }
            }
        }
        q.dispatch();
        self.everything_committed().await?;
        Ok(sink.take())
    }

    /// Asks the named connection to close with 320 CONNECTION_FORCED.
    pub fn close_connection(&self, name: &str, reason: &str) -> AdminResult<()> {
        let c = self
            .broker
            .connections
            .by_name(name)
            .ok_or(AdminError::NotFound)?;
        c.request_close(reason);
        Ok(())
    }
}
