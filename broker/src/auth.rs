//! Users and vhost access: RabbitMQ's password hashing, the default user written on the first
//! start of an empty store, and the data cache (moka) in front of the store's users and
//! permissions, so a login reads the database only on a miss.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use warren_storage::{MetaStore, Op, PermissionRecord, SqlStore, StoreError, UserRecord};

/// How long a cached lookup (a hit or a "no such user") is trusted: the bound on how stale a
/// login can be after the rows change in the database. (Nothing writes users through the broker
/// yet; the management API will invalidate the entries it changes.)
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

/// Checks `password` against a stored hash in constant time (for hashes of the right length).
pub fn password_matches(stored: &[u8], password: &str) -> bool {
    if stored.len() != 4 + 32 {
        return false;
    }
    constant_time_eq(stored, &salted_hash(&stored[..4], password))
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

/// The data cache: users and permissions as the store holds them, cached with negative
/// answers too (a flood of logins with unknown names does not reach the database).
pub struct Users {
    store: Arc<SqlStore>,
    users: moka::sync::Cache<String, Option<Arc<UserRecord>>>,
    permissions: moka::sync::Cache<(String, String), Option<Arc<PermissionRecord>>>,
}

impl Users {
    pub fn new(store: Arc<SqlStore>) -> Users {
        Users {
            store,
            users: moka::sync::Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(TTL)
                .build(),
            permissions: moka::sync::Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(TTL)
                .build(),
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
        if let Some(hit) = self.users.get(name) {
            return Ok(hit);
        }
        let found = self.store.user(name).await?.map(Arc::new);
        self.users.insert(name.to_string(), found.clone());
        Ok(found)
    }

    pub async fn permission(
        &self,
        vhost: &str,
        user: &str,
    ) -> Result<Option<Arc<PermissionRecord>>, StoreError> {
        let key = (vhost.to_string(), user.to_string());
        if let Some(hit) = self.permissions.get(&key) {
            return Ok(hit);
        }
        let found = self.store.permission(vhost, user).await?.map(Arc::new);
        self.permissions.insert(key, found.clone());
        Ok(found)
    }

    /// Entries the cache holds (users, permissions): for tests and metrics.
    pub fn cached(&self) -> (u64, u64) {
        self.users.run_pending_tasks();
        self.permissions.run_pending_tasks();
        (self.users.entry_count(), self.permissions.entry_count())
    }
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
}
