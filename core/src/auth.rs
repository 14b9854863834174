//! Users and vhost access: RabbitMQ's password hashing, the default user written on the first
//! start of an empty store, the data cache (moka) in front of the store's users and
//! permissions, so a login reads the database only on a miss, and `Access`: a user's compiled
//! configure/write/read and topic patterns in one vhost, checked as RabbitMQ checks them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use warren_storage::{
    MetaStore, Op, PermissionRecord, StoreError, TopicPermissionRecord, UserRecord,
};

use crate::error::{AmqpError, AmqpResult};

/// How long a cached lookup (a hit or a "no such user") is trusted: the bound on how stale a
/// login can be after the rows change in the database behind the broker's back (the
/// management API invalidates the entries it changes).
const TTL: Duration = Duration::from_secs(60);
/// Most users and most (vhost, user) permissions the data cache holds.
const CAPACITY: u64 = 10_000;

/// Why a login or a vhost open was refused (logged; the client sees RabbitMQ's generic text).
#[derive(Debug, PartialEq, Eq)]
pub enum LoginError {
    UnknownUser,
    BadPassword,
    LoopbackOnly,
    /// The user has no permissions in the vhost.
    NoVhostAccess,
    /// The store could not answer and the cache had nothing.
    StoreUnavailable(String),
}

/// `rabbit_password_hashing_sha256`: a random 4-byte salt, then sha256(salt ++ password).
/// RabbitMQ's definitions export shows the same bytes in base64.
pub fn hash_password(password: &str) -> Vec<u8> {
    let salt: [u8; 4] = rand::random();
    salted_hash(&salt, password)
}

fn salted_hash(salt: &[u8], password: &str) -> Vec<u8> {
    let mut out = salt.to_vec();
    out.extend_from_slice(
        &Sha256::new()
            .chain_update(salt)
            .chain_update(password)
            .finalize(),
    );
    out
}

/// Checks `password` against a stored hash in constant time. The hash's length tells its
/// algorithm: 36 bytes is RabbitMQ's sha256 (its default), 68 bytes its sha512 (imported with
/// `hashing_algorithm: rabbit_password_hashing_sha512`); an empty hash never matches (a user
/// without a password, as RabbitMQ's `password_hash: ""`).
pub fn password_matches(stored: &[u8], password: &str) -> bool {
    match stored.len() {
        36 => constant_time_eq(stored, &salted_hash(&stored[..4], password)),
        68 => {
            let mut want = stored[..4].to_vec();
            want.extend_from_slice(
                &sha2::Sha512::new()
                    .chain_update(&stored[..4])
                    .chain_update(password)
                    .finalize(),
            );
            constant_time_eq(stored, &want)
        }
        _ => false,
    }
}

/// Whether a stored hash has a length `password_matches` knows (sha256 or sha512), or is
/// empty (no password).
pub fn hash_is_usable(stored: &[u8]) -> bool {
    matches!(stored.len(), 0 | 36 | 68)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= (x ^ y) as usize;
    }
    diff == 0
}

/// A permission pattern as RabbitMQ matches it: a regular expression searched for anywhere in
/// the name (unanchored, as `re:run`); `""` means `^$` (nothing real matches); a pattern that
/// does not compile denies.
#[derive(Debug, Clone)]
enum Pattern {
    /// `.*`: matches every name (the common case, checked without a regex).
    Any,
    Regex(regex::Regex),
    Deny,
}

impl Pattern {
    fn new(p: &str) -> Pattern {
        let p = if p.is_empty() { "^$" } else { p };
        if matches!(p, ".*" | "^.*" | "^.*$" | ".*$") {
            return Pattern::Any;
        }
        match regex::Regex::new(p) {
            Ok(r) => Pattern::Regex(r),
            Err(e) => {
                tracing::warn!(pattern = p, error = %e, "permission pattern does not compile; it denies");
                Pattern::Deny
            }
        }
    }

    fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Regex(r) => r.is_match(s),
            Pattern::Deny => false,
        }
    }
}

/// The three permissions of RabbitMQ's access-control table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    Configure,
    Write,
    Read,
}

impl Perm {
    fn as_str(self) -> &'static str {
        match self {
            Perm::Configure => "configure",
            Perm::Write => "write",
            Perm::Read => "read",
        }
    }
}

/// What a permission is checked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Queue,
    Exchange,
}

/// A user's permissions in one vhost, compiled once and cached with the user's data.
#[derive(Debug)]
pub struct Access {
    user: String,
    vhost: String,
    configure: Pattern,
    write: Pattern,
    read: Pattern,
    /// Topic permissions by exchange: (write, read) on routing keys, `{username}` and
    /// `{vhost}` already expanded. An exchange without an entry is not restricted.
    topics: HashMap<String, (Pattern, Pattern)>,
}

impl Access {
    pub fn new(p: &PermissionRecord, topics: &[TopicPermissionRecord]) -> Access {
        // RabbitMQ substitutes the values regex-escaped.
        let expand = |pat: &str| {
            pat.replace("{username}", &regex::escape(&p.user))
                .replace("{vhost}", &regex::escape(&p.vhost))
        };
        Access {
            user: p.user.clone(),
            vhost: p.vhost.clone(),
            configure: Pattern::new(&p.configure),
            write: Pattern::new(&p.write),
            read: Pattern::new(&p.read),
            topics: topics
                .iter()
                .map(|t| {
                    (
                        t.exchange.clone(),
                        (
                            Pattern::new(&expand(&t.write)),
                            Pattern::new(&expand(&t.read)),
                        ),
                    )
                })
                .collect(),
        }
    }

    /// Everything allowed (tests and internal use).
    pub fn full(user: &str, vhost: &str) -> Access {
        Access {
            user: user.to_string(),
            vhost: vhost.to_string(),
            configure: Pattern::Any,
            write: Pattern::Any,
            read: Pattern::Any,
            topics: HashMap::new(),
        }
    }

    /// 403 ACCESS_REFUSED with RabbitMQ's text unless `perm` on the named resource is granted.
    /// The default exchange is checked as `amq.default`, as RabbitMQ does.
    pub fn check(&self, perm: Perm, kind: Resource, name: &str) -> AmqpResult<()> {
        let pattern = match perm {
            Perm::Configure => &self.configure,
            Perm::Write => &self.write,
            Perm::Read => &self.read,
        };
        let name = match (kind, name) {
            (Resource::Exchange, "") => "amq.default",
            _ => name,
        };
        if pattern.matches(name) {
            return Ok(());
        }
        let kind = match kind {
            Resource::Queue => "queue",
            Resource::Exchange => "exchange",
        };
        Err(AmqpError::access_refused(format!(
            "{} access to {kind} '{name}' in vhost '{}' refused for user '{}'",
            perm.as_str(),
            self.vhost,
            self.user
        )))
    }

    /// Topic permissions: `perm` (write for publishing, read for binding) on `routing_key` of
    /// the topic exchange `exchange`. Allowed when the user has none for that exchange.
    pub fn check_topic(&self, perm: Perm, exchange: &str, routing_key: &str) -> AmqpResult<()> {
        let Some((write, read)) = self.topics.get(exchange) else {
            return Ok(());
        };
        let pattern = if perm == Perm::Write { write } else { read };
        if pattern.matches(routing_key) {
            return Ok(());
        }
        Err(AmqpError::access_refused(format!(
            "{} access to topic '{routing_key}' in exchange '{exchange}' in vhost '{}' refused for user '{}'",
            perm.as_str(),
            self.vhost,
            self.user
        )))
    }
}

/// RabbitMQ's user limits, by name.
pub const USER_LIMITS: &[&str] = &["max-connections", "max-channels"];

/// A user's limits as the connection code applies them: None is no limit (RabbitMQ takes a
/// negative value as no limit, and 0 as "none allowed").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserLimits {
    pub max_connections: Option<u64>,
    pub max_channels: Option<u64>,
}

impl UserLimits {
    /// Reads a user record's `limits` (a JSON object); anything unreadable is no limit.
    pub fn parse(text: &str) -> UserLimits {
        let m: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).unwrap_or_default();
        let get = |k: &str| {
            m.get(k)
                .and_then(serde_json::Value::as_i64)
                .and_then(|n| u64::try_from(n).ok())
        };
        UserLimits {
            max_connections: get("max-connections"),
            max_channels: get("max-channels"),
        }
    }
}

/// The data cache: users and permissions as the store holds them, cached with negative
/// answers too (a flood of logins with unknown names does not reach the database).
/// Permissions are cached compiled (`Access`), topic permissions with them.
///
/// An entry older than the TTL is looked up again; if the store cannot answer (an outage, or
/// no answer within `STALE_WAIT`), the last known answer is served and logged, and the store
/// is asked again after `RETRY_AFTER`. So a database outage does not lock out users who logged
/// in before it, and a login never waits on a dead database for what the cache already knew.
pub struct Users {
    store: Arc<crate::persist::Store>,
    ttl: Duration,
    users: moka::sync::Cache<String, Known<Option<Arc<UserRecord>>>>,
    permissions: moka::sync::Cache<(String, String), Known<Option<Arc<Access>>>>,
}

/// How long a lookup of a stale entry may wait on the store before the stale answer is served.
const STALE_WAIT: Duration = Duration::from_secs(1);
/// After the store failed to refresh an entry, how long the stale answer is served without
/// asking again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// A cached answer and when it stops being trusted without asking the store.
#[derive(Clone)]
struct Known<T> {
    value: T,
    fresh_until: Instant,
}

impl<T: Clone> Known<T> {
    fn fresh(&self) -> Option<T> {
        (Instant::now() < self.fresh_until).then(|| self.value.clone())
    }
}

impl Users {
    pub fn new(store: Arc<crate::persist::Store>) -> Users {
        Users::with_ttl(store, TTL)
    }

    pub fn with_ttl(store: Arc<crate::persist::Store>, ttl: Duration) -> Users {
        Users {
            store,
            ttl,
            users: moka::sync::Cache::builder().max_capacity(CAPACITY).build(),
            permissions: moka::sync::Cache::builder().max_capacity(CAPACITY).build(),
        }
    }

    /// The ops that create RabbitMQ's default user (tag administrator, all permissions on
    /// "/") when the store has no user yet, as RabbitMQ does on its first boot. Later starts
    /// keep what the store holds, whatever `--default-user`/`--default-pass` say.
    pub async fn default_user_ops(
        &self,
        name: &str,
        password: &str,
    ) -> Result<Vec<Op>, StoreError> {
        if self.store.has_users().await? {
            return Ok(Vec::new());
        }
        Ok(vec![
            Op::PutUser(UserRecord {
                name: name.to_string(),
                password_hash: hash_password(password),
                tags: "administrator".to_string(),
                limits: "{}".into(),
            }),
            Op::PutPermission(PermissionRecord {
                vhost: "/".to_string(),
                user: name.to_string(),
                configure: ".*".to_string(),
                write: ".*".to_string(),
                read: ".*".to_string(),
            }),
        ])
    }

    pub async fn user(&self, name: &str) -> Result<Option<Arc<UserRecord>>, StoreError> {
        let known = self.users.get(name);
        if let Some(hit) = known.as_ref().and_then(Known::fresh) {
            return Ok(hit);
        }
        let store = self.store.clone();
        let key = name.to_string();
        let lookup = async move { Ok(store.user(&key).await?.map(Arc::new)) };
        refresh(
            &self.users,
            name.to_string(),
            known,
            lookup,
            self.ttl,
            "user",
        )
        .await
    }

    pub async fn permission(
        &self,
        vhost: &str,
        user: &str,
    ) -> Result<Option<Arc<Access>>, StoreError> {
        let key = (vhost.to_string(), user.to_string());
        let known = self.permissions.get(&key);
        if let Some(hit) = known.as_ref().and_then(Known::fresh) {
            return Ok(hit);
        }
        let store = self.store.clone();
        let (v, u) = key.clone();
        let lookup = async move {
            Ok(match store.permission(&v, &u).await? {
                Some(p) => {
                    let topics = store.topic_permissions(&v, &u).await?;
                    Some(Arc::new(Access::new(&p, &topics)))
                }
                None => None,
            })
        };
        refresh(
            &self.permissions,
            key,
            known,
            lookup,
            self.ttl,
            "permission",
        )
        .await
    }

    /// Forgets every cached user and permission (the admin facade changed some).
    pub fn invalidate(&self) {
        self.users.invalidate_all();
        self.permissions.invalidate_all();
    }

    /// Entries the cache holds (users, permissions): for tests and metrics.
    pub fn cached(&self) -> (u64, u64) {
        self.users.run_pending_tasks();
        self.permissions.run_pending_tasks();
        (self.users.entry_count(), self.permissions.entry_count())
    }
}

/// Asks the store for an entry that is missing or stale and caches the answer. With a stale
/// answer at hand, the store gets `STALE_WAIT`; if it fails or is slower, the stale answer is
/// served (and trusted for `RETRY_AFTER`). Without one, the store's error is the answer.
async fn refresh<K, T>(
    cache: &moka::sync::Cache<K, Known<T>>,
    key: K,
    known: Option<Known<T>>,
    lookup: impl std::future::Future<Output = Result<T, StoreError>>,
    ttl: Duration,
    what: &'static str,
) -> Result<T, StoreError>
where
    K: std::hash::Hash + Eq + Send + Sync + std::fmt::Debug + 'static,
    T: Clone + Send + Sync + 'static,
{
    // Caches `value`, trusted for `for_`, and answers it.
    let keep = |key: K, value: T, for_: Duration| {
        cache.insert(
            key,
            Known {
                value: value.clone(),
                fresh_until: Instant::now() + for_,
            },
        );
        Ok(value)
    };
    let Some(stale) = known else {
        return keep(key, lookup.await?, ttl);
    };
    let error = match tokio::time::timeout(STALE_WAIT, lookup).await {
        Ok(Ok(value)) => return keep(key, value, ttl),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {STALE_WAIT:?}"),
    };
    tracing::warn!(
        ?key,
        "store cannot refresh the cached {what} ({error}); serving the last known"
    );
    keep(key, stale.value, RETRY_AFTER.min(ttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rabbitmq_sha256_hashing() {
        let h = hash_password("guest");
        assert_eq!(h.len(), 36);
        assert!(password_matches(&h, "guest"));
        assert!(!password_matches(&h, "Guest"));
        assert!(!password_matches(&h, ""));
        assert!(!password_matches(&h[..35], "guest"));
        // Salted: the same password hashes differently (4 random bytes; equal by chance once
        // in 2^32).
        assert_ne!(hash_password("guest")[..4], hash_password("guest")[..4]);
        // RabbitMQ's documented example (docs "Credentials and Passwords"): salt 908DC60A,
        // password test12, base64 kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR.
        let documented = [
            0x90, 0x8d, 0xc6, 0x0a, 0xa5, 0xb9, 0x24, 0xb3, 0x09, 0x6b, 0x88, 0x97, 0xd6, 0x5a,
            0x3b, 0x5f, 0x80, 0xfa, 0x5d, 0xb6, 0x2a, 0x94, 0xb8, 0x31, 0x22, 0xcd, 0xf4, 0xf8,
            0xfe, 0xad, 0x10, 0xd5, 0x15, 0xd8, 0xf3, 0x91,
        ];
        assert_eq!(salted_hash(&documented[..4], "test12"), documented);
        assert!(password_matches(&documented, "test12"));
        assert!(!password_matches(&documented, "test13"));
    }

    /// A database outage must not lock out a user the cache knew: past the TTL, a lookup the
    /// store cannot answer (or answers too slowly) serves the last known record, and the store is
    /// asked again once it is back.
    #[tokio::test]
    async fn outage_serves_the_last_known_user_and_permissions() {
        use warren_storage::{Faults, Faulty, MessageStore, Plan, SqlStore};
        let dir = std::env::temp_dir().join(format!(
            "warren-auth-outage-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let sql = SqlStore::open(&SqlStore::sqlite_url(&dir), false)
            .await
            .unwrap();
        let faults = Faults::new();
        let store = Arc::new(Faulty::new(sql, faults.clone()));
        let bob = UserRecord {
            name: "bob".into(),
            password_hash: hash_password("pw"),
            tags: String::new(),
            limits: r#"{"max-connections":3}"#.into(),
        };
        let put = Plan::from_ops([
            Op::PutUser(bob.clone()),
            Op::PutPermission(record(".*", ".*", ".*")),
        ]);
        store.apply(&put).await.unwrap();
        let ttl = Duration::from_millis(50);
        let users = Users::with_ttl(store.clone(), ttl);
        assert_eq!(users.user("bob").await.unwrap().unwrap().limits, bob.limits);
        assert!(users.permission("/", "bob").await.unwrap().is_some());
        assert!(users.user("nobody").await.unwrap().is_none());

        // The entries go stale, then the database goes away.
        tokio::time::sleep(ttl * 2).await;
        faults.set_outage(true);
        let u = users.user("bob").await.expect("the last known user");
        assert_eq!(u.unwrap().name, "bob");
        assert!(users.permission("/", "bob").await.unwrap().is_some());
        // A negative answer is an answer too.
        assert!(users.user("nobody").await.unwrap().is_none());
        // Nothing known: the outage is the answer.
        assert!(users.user("carol").await.is_err());
        assert!(users.permission("other", "bob").await.is_err());

        // A store that hangs rather than fails: the stale answer comes within STALE_WAIT.
        faults.set_outage(false);
        faults.set_read_delay(Duration::from_secs(10));
        tokio::time::sleep(ttl * 2).await;
        let started = Instant::now();
        assert!(users.user("bob").await.unwrap().is_some());
        assert!(started.elapsed() < STALE_WAIT + Duration::from_millis(500));

        // Back: a change made meanwhile is seen once the retry interval has passed.
        faults.set_read_delay(Duration::ZERO);
        store
            .apply(&Plan::from_ops([Op::DeleteUser { name: "bob".into() }]))
            .await
            .unwrap();
        tokio::time::sleep(ttl * 2).await;
        assert!(users.user("bob").await.unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn record(c: &str, w: &str, r: &str) -> PermissionRecord {
        PermissionRecord {
            vhost: "/".to_string(),
            user: "bob".to_string(),
            configure: c.to_string(),
            write: w.to_string(),
            read: r.to_string(),
        }
    }

    #[test]
    fn permissions_match_as_rabbitmq() {
        let a = Access::new(&record("^bob-", "", "q"), &[]);
        assert!(a.check(Perm::Configure, Resource::Queue, "bob-1").is_ok());
        assert!(a
            .check(Perm::Configure, Resource::Queue, "alice-bob-1")
            .is_err());
        // "" is ^$: nothing real matches.
        let e = a.check(Perm::Write, Resource::Exchange, "").unwrap_err();
        assert_eq!(e.code, 403);
        assert_eq!(
            e.text,
            "write access to exchange 'amq.default' in vhost '/' refused for user 'bob'"
        );
        // Unanchored: "q" matches anywhere.
        assert!(a.check(Perm::Read, Resource::Queue, "aqa").is_ok());
        assert_eq!(
            a.check(Perm::Read, Resource::Queue, "x").unwrap_err().text,
            "read access to queue 'x' in vhost '/' refused for user 'bob'"
        );
        // A pattern that does not compile denies.
        let a = Access::new(&record("(", ".*", ".*"), &[]);
        assert!(a.check(Perm::Configure, Resource::Queue, "(").is_err());
        assert!(a.check(Perm::Write, Resource::Exchange, "anything").is_ok());
    }

    #[test]
    fn topic_permissions_expand_variables_and_default_to_allowed() {
        let topic = TopicPermissionRecord {
            vhost: "/".to_string(),
            user: "bob".to_string(),
            exchange: "amq.topic".to_string(),
            write: "^{username}\\.".to_string(),
            read: "^{vhost}$".to_string(),
        };
        let a = Access::new(&record(".*", ".*", ".*"), &[topic]);
        assert!(a.check_topic(Perm::Write, "amq.topic", "bob.x").is_ok());
        assert_eq!(
            a.check_topic(Perm::Write, "amq.topic", "alice.x").unwrap_err().text,
            "write access to topic 'alice.x' in exchange 'amq.topic' in vhost '/' refused for user 'bob'"
        );
        assert!(a.check_topic(Perm::Read, "amq.topic", "/").is_ok());
        assert!(a.check_topic(Perm::Read, "amq.topic", "bob.x").is_err());
        assert!(a.check_topic(Perm::Write, "other", "alice.x").is_ok());
    }
}
