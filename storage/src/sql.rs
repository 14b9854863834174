//! `SqlStore`: the store on SQL through sqlx's `Any` driver, so one set of runtime queries serves
//! both backends: SQLite (the embedded default: a WAL-mode file in the data directory) and
//! MySQL/MariaDB. Migrations are per backend (`migrations/<backend>`). Bodies over `CHUNK` bytes
//! are split into `message_chunks` rows and multi-row statements stay under `MAX_STATEMENT`
//! bytes, so nothing comes near MySQL's `max_allowed_packet`.

use std::path::Path;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor, QueryBuilder, Row};

use crate::plan::{Plan, PlannedInsert};
use crate::{
    BindingRecord, DestinationKind, ExchangeRecord, GlobalParameterRecord, MessageRow,
    MessageStore, MetaStore, Op, ParameterRecord, PermissionRecord, QueueRecord, QueueSummary,
    Recovered, Snapshot, StoreError, StoredEntry, TopicPermissionRecord, UserRecord, VhostRecord,
};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
/// MySQL migrations run without sqlx's `GET_LOCK` (Galera refuses it) under `MigrationLease`.
static MYSQL_MIGRATIONS: Migrator = {
    let mut m = sqlx::migrate!("migrations/mysql");
    m.locking = false;
    m
};

/// How long a MySQL session may sit idle inside a write transaction before the server rolls it
/// back (MariaDB's `idle_write_transaction_timeout`): a paused process cannot hold its row
/// locks through a takeover for longer.
const IDLE_WRITE_TRANSACTION_SECS: u32 = 2;

/// Bodies larger than this are stored in chunks of this size.
pub const CHUNK: usize = 1 << 20;
/// A multi-row statement is cut once its bound bytes pass this.
const MAX_STATEMENT: usize = 2 << 20;
/// Rows per multi-row statement (SQLite allows 32766 bound values).
const MAX_ROWS: usize = 256;

/// How many of `n` rows the next multi-row statement takes: a power of two, so that a
/// handful of statement texts cover every batch and each connection prepares them once (sqlx
/// caches prepared statements by text; a new row count would be a new PREPARE, which on
/// MariaDB costs more than the insert itself).
fn rows_per_statement(n: usize) -> usize {
    let n = n.clamp(1, MAX_ROWS);
    1 << (usize::BITS - 1 - n.leading_zeros())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Mysql,
}

pub struct SqlStore {
    pub(crate) pool: AnyPool,
    /// SQLite only: a typed pool for reading messages back (a paged queue draining, dead
    /// letters, requeues). Rows read through `Any` are converted value by value and column by
    /// column, which cost as much as SQLite's own work for a queue draining from the store.
    sqlite_reads: Option<sqlx::SqlitePool>,
    backend: Backend,
    /// SQLite syncs the commits that need it (see `Plan::needs_sync`).
    fsync: bool,
    /// In cluster mode: the node whose liveness every transaction proves first
    /// (`crate::cluster`).
    pub(crate) fence: std::sync::OnceLock<crate::cluster::NodeId>,
}

impl std::fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SqlStore({:?})", self.backend)
    }
}

/// Classifies a database error: transient ones (connection, I/O, pool, deadlock, lock wait,
/// read-only, disk full) are retried; the data being refused is permanent.
/// Takes the MySQL migration lease (a row, not `GET_LOCK`, which Galera refuses): one process
/// migrates at a time; a lease left by a process that died expires after a minute. Returns the
/// holder token to release it with.
async fn migration_lease(pool: &AnyPool) -> Result<String, StoreError> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS warren_migration_lease (\
         id INT NOT NULL PRIMARY KEY, holder VARCHAR(64) NOT NULL, until DATETIME(6) NOT NULL\
         ) ENGINE = InnoDB",
    )
    .execute(pool)
    .await
    .map_err(unavailable)?;
    let holder = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        sqlx::query(
            "INSERT INTO warren_migration_lease (id, holder, until) \
             VALUES (1, ?, NOW(6) + INTERVAL 60 SECOND) \
             ON DUPLICATE KEY UPDATE \
             holder = IF(until < NOW(6), VALUES(holder), holder), \
             until = IF(holder = VALUES(holder), VALUES(until), until)",
        )
        .bind(holder.clone())
        .execute(pool)
        .await
        .map_err(unavailable)?;
        let row = sqlx::query("SELECT holder FROM warren_migration_lease WHERE id = 1")
            .fetch_optional(pool)
            .await
            .map_err(unavailable)?;
        let current: Option<String> = row.map(|r| r.try_get(0)).transpose().map_err(unavailable)?;
        if current.as_deref() == Some(holder.as_str()) {
            return Ok(holder);
        }
        if std::time::Instant::now() > deadline {
            return Err(StoreError::Unavailable(
                "another process has been migrating the store for two minutes".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) fn unavailable(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StoreError::Corrupt(e.to_string())
        }
        sqlx::Error::Database(db) if is_rejection(db.as_ref()) => {
            StoreError::Rejected(e.to_string())
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}

/// A database error that no retry can fix.
fn is_rejection(db: &dyn sqlx::error::DatabaseError) -> bool {
    use sqlx::error::ErrorKind;
    if matches!(
        db.kind(),
        ErrorKind::UniqueViolation
            | ErrorKind::ForeignKeyViolation
            | ErrorKind::NotNullViolation
            | ErrorKind::CheckViolation
    ) {
        return true;
    }
    match db.code().as_deref() {
        // MySQL/MariaDB report SQLSTATE: class 22 is a data exception (data too long, out of
        // range, incorrect string value).
        Some(c) if c.len() == 5 && c.starts_with("22") => true,
        // SQLite reports its result code: string or blob too big, datatype mismatch.
        Some("18" | "20") => true,
        _ => false,
    }
}

impl SqlStore {
    /// The SQLite URL for a data directory.
    pub fn sqlite_url(data_dir: &Path) -> String {
        format!("sqlite://{}?mode=rwc", data_dir.join("warren.db").display())
    }

    /// Opens (creating if needed) and migrates the store at `url` (`sqlite://PATH` or
    /// `mysql://user:pass@host:port/db`). `fsync` asks SQLite to sync every commit (the `confirm`
    /// guarantee survives power loss, not only a crash of the broker).
    pub async fn open(url: &str, fsync: bool) -> Result<SqlStore, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("mysql:") || url.starts_with("mariadb:") {
            Backend::Mysql
        } else {
            return Err(StoreError::Config(format!(
                "storage URL must start with sqlite:// or mysql://, got '{}'",
                redact(url)
            )));
        };
        let url = url.replacen("mariadb:", "mysql:", 1);
        let options = AnyPoolOptions::new()
            .acquire_timeout(Duration::from_secs(10))
            .min_connections(1);
        let pool = match backend {
            Backend::Sqlite => {
                let sync = if fsync { "FULL" } else { "NORMAL" };
                options
                    .max_connections(4)
                    .after_connect(move |conn, _| {
                        Box::pin(async move {
                            // 16 KiB pages (set before the file's first table; an existing
                            // file keeps its size): a 1 KiB message row and its index entries
                            // take far fewer page writes and syscalls per commit.
                            conn.execute("PRAGMA page_size = 16384").await?;
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            // 8 MiB page cache per connection (SQLite's default is 2 MB).
                            conn.execute("PRAGMA cache_size = -8192").await?;
                            conn.execute(sqlx::AssertSqlSafe(format!(
                                "PRAGMA synchronous = {sync}"
                            )))
                            .await?;
                            // Chunks are deleted with their messages explicitly: the
                            // cascade's per-row program cost 2.5 µs per acked message.
                            conn.execute("PRAGMA foreign_keys = OFF").await?;
                            conn.execute("PRAGMA busy_timeout = 10000").await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await
            }
            Backend::Mysql => {
                options
                    .max_connections(8)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // MariaDB (Galera included) only: MySQL has neither variable, and
                            // its error is ignored. On Galera, reads wait until the node has
                            // applied every commit the cluster made before them.
                            for set in [
                                format!(
                                    "SET SESSION idle_write_transaction_timeout = {IDLE_WRITE_TRANSACTION_SECS}"
                                ),
                                "SET SESSION wsrep_sync_wait = 1".to_string(),
                            ] {
                                if let Err(e) = conn.execute(sqlx::AssertSqlSafe(set)).await {
                                    tracing::debug!(error = %e, "session setting not taken");
                                }
                            }
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await
            }
        }
        .map_err(unavailable)?;
        let migrator = match backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Mysql => &MYSQL_MIGRATIONS,
        };
        let lease = match backend {
            Backend::Mysql => Some(migration_lease(&pool).await?),
            Backend::Sqlite => None,
        };
        let migrated = migrator
            .run(&pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrations failed: {e}")));
        if let Some(holder) = lease {
            let _ = sqlx::query("DELETE FROM warren_migration_lease WHERE id = 1 AND holder = ?")
                .bind(holder)
                .execute(&pool)
                .await;
        }
        migrated?;
        let sqlite_reads = match backend {
            Backend::Sqlite => Some(sqlite_read_pool(&url).await?),
            Backend::Mysql => None,
        };
        Ok(SqlStore {
            pool,
            sqlite_reads,
            backend,
            fsync,
            fence: std::sync::OnceLock::new(),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn close(&self) {
        if let Some(reads) = &self.sqlite_reads {
            reads.close().await;
        }
        self.pool.close().await;
    }
}

/// The typed read pool on the database the main pool opened (and migrated): WAL mode is the
/// file's, so these readers never wait for the writer. It never creates the file: a database
/// removed underneath fails reads rather than growing an empty one.
async fn sqlite_read_pool(url: &str) -> Result<sqlx::SqlitePool, StoreError> {
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
    let options = url
        .parse::<SqliteConnectOptions>()
        .map_err(|e| StoreError::Config(format!("storage URL '{}': {e}", redact(url))))?
        .create_if_missing(false)
        .foreign_keys(false)
        .busy_timeout(Duration::from_secs(10))
        .pragma("cache_size", "-8192");
    SqlitePoolOptions::new()
        .acquire_timeout(Duration::from_secs(10))
        .min_connections(1)
        .max_connections(2)
        .connect_with(options)
        .await
        .map_err(unavailable)
}

/// A URL with its password hidden, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn binding_id(b: &BindingRecord) -> String {
    let mut h = Sha256::new();
    for part in [&b.vhost, &b.source, &b.destination, &b.routing_key] {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.update([kind_code(b.destination_kind) as u8]);
    h.update(&b.arguments);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn kind_code(k: DestinationKind) -> i64 {
    match k {
        DestinationKind::Queue => 0,
        DestinationKind::Exchange => 1,
    }
}

type Tx<'c> = sqlx::Transaction<'c, sqlx::Any>;

async fn meta_op(tx: &mut Tx<'_>, op: &Op) -> Result<(), sqlx::Error> {
    match op {
        Op::PutExchange(x) => {
            sqlx::query(
                "REPLACE INTO exchanges (vhost, name, kind, auto_delete, internal, arguments) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(x.vhost.clone())
            .bind(x.name.clone())
            .bind(x.kind.clone())
            .bind(x.auto_delete as i64)
            .bind(x.internal as i64)
            .bind(x.arguments.to_vec())
            .execute(&mut **tx)
            .await?;
        }
        Op::DeleteExchange { vhost, name } => {
            sqlx::query("DELETE FROM exchanges WHERE vhost = ? AND name = ?")
                .bind(vhost.clone())
                .bind(name.clone())
                .execute(&mut **tx)
                .await?;
            sqlx::query(
                "DELETE FROM bindings WHERE vhost = ? AND (source = ? OR \
                 (destination = ? AND destination_kind = 1))",
            )
            .bind(vhost.clone())
            .bind(name.clone())
            .bind(name.clone())
            .execute(&mut **tx)
            .await?;
        }
        Op::PutQueue(q) => {
            sqlx::query(
                "REPLACE INTO queues (id, vhost, name, auto_delete, arguments, delivered_seq) \
                 VALUES (?, ?, ?, ?, ?, 0)",
            )
            .bind(q.id)
            .bind(q.vhost.clone())
            .bind(q.name.clone())
            .bind(q.auto_delete as i64)
            .bind(q.arguments.to_vec())
            .execute(&mut **tx)
            .await?;
        }
        Op::DeleteQueue { id, vhost, name } => {
            purge(tx, *id, i64::MIN).await?;
            sqlx::query("DELETE FROM queues WHERE id = ?")
                .bind(*id)
                .execute(&mut **tx)
                .await?;
            sqlx::query(
                "DELETE FROM bindings WHERE vhost = ? AND destination = ? AND destination_kind = 0",
            )
            .bind(vhost.clone())
            .bind(name.clone())
            .execute(&mut **tx)
            .await?;
        }
        Op::PutBinding(b) => {
            sqlx::query(
                "REPLACE INTO bindings (id, vhost, source, destination, destination_kind, \
                 routing_key, arguments) VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(binding_id(b))
            .bind(b.vhost.clone())
            .bind(b.source.clone())
            .bind(b.destination.clone())
            .bind(kind_code(b.destination_kind))
            .bind(b.routing_key.clone())
            .bind(b.arguments.to_vec())
            .execute(&mut **tx)
            .await?;
        }
        Op::DeleteBinding(b) => {
            sqlx::query("DELETE FROM bindings WHERE id = ?")
                .bind(binding_id(b))
                .execute(&mut **tx)
                .await?;
        }
        Op::PutUser(u) => {
            sqlx::query(
                "REPLACE INTO users (name, password_hash, tags, limits) VALUES (?, ?, ?, ?)",
            )
            .bind(u.name.clone())
            .bind(u.password_hash.clone())
            .bind(u.tags.clone())
            .bind(u.limits.clone())
            .execute(&mut **tx)
            .await?;
        }
        Op::PutPermission(p) => {
            sqlx::query(
                "REPLACE INTO permissions (vhost, user_name, configure_re, write_re, read_re) \
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(p.vhost.clone())
            .bind(p.user.clone())
            .bind(p.configure.clone())
            .bind(p.write.clone())
            .bind(p.read.clone())
            .execute(&mut **tx)
            .await?;
        }
        Op::PutTopicPermission(p) => {
            sqlx::query(
                "REPLACE INTO topic_permissions (vhost, user_name, exchange, write_re, read_re) \
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(p.vhost.clone())
            .bind(p.user.clone())
            .bind(p.exchange.clone())
            .bind(p.write.clone())
            .bind(p.read.clone())
            .execute(&mut **tx)
            .await?;
        }
        Op::DeleteUser { name } => {
            for sql in [
                "DELETE FROM users WHERE name = ?",
                "DELETE FROM permissions WHERE user_name = ?",
                "DELETE FROM topic_permissions WHERE user_name = ?",
            ] {
                sqlx::query(sql)
                    .bind(name.clone())
                    .execute(&mut **tx)
                    .await?;
            }
        }
        Op::DeletePermission { vhost, user } => {
            sqlx::query("DELETE FROM permissions WHERE vhost = ? AND user_name = ?")
                .bind(vhost.clone())
                .bind(user.clone())
                .execute(&mut **tx)
                .await?;
        }
        Op::DeleteTopicPermission {
            vhost,
            user,
            exchange,
        } => {
            let q = match exchange {
                Some(x) => sqlx::query(
                    "DELETE FROM topic_permissions WHERE vhost = ? AND user_name = ? \
                     AND exchange = ?",
                )
                .bind(vhost.clone())
                .bind(user.clone())
                .bind(x.clone()),
                None => {
                    sqlx::query("DELETE FROM topic_permissions WHERE vhost = ? AND user_name = ?")
                        .bind(vhost.clone())
                        .bind(user.clone())
                }
            };
            q.execute(&mut **tx).await?;
        }
        Op::PutVhost(v) => {
            sqlx::query(
                "REPLACE INTO vhosts (name, description, tags, default_queue_type) \
                 VALUES (?, ?, ?, ?)",
            )
            .bind(v.name.clone())
            .bind(v.description.clone())
            .bind(v.tags.clone())
            .bind(v.default_queue_type.clone())
            .execute(&mut **tx)
            .await?;
        }
        Op::DeleteVhost { name } => {
            for sql in [
                "DELETE FROM vhosts WHERE name = ?",
                "DELETE FROM exchanges WHERE vhost = ?",
                "DELETE FROM queues WHERE vhost = ?",
                "DELETE FROM bindings WHERE vhost = ?",
                "DELETE FROM permissions WHERE vhost = ?",
                "DELETE FROM topic_permissions WHERE vhost = ?",
                "DELETE FROM parameters WHERE vhost = ?",
            ] {
                sqlx::query(sql)
                    .bind(name.clone())
                    .execute(&mut **tx)
                    .await?;
            }
        }
        Op::PutParameter(p) => {
            sqlx::query(
                "REPLACE INTO parameters (vhost, component, name, value) VALUES (?, ?, ?, ?)",
            )
            .bind(p.vhost.clone())
            .bind(p.component.clone())
            .bind(p.name.clone())
            .bind(p.value.clone())
            .execute(&mut **tx)
            .await?;
        }
        Op::DeleteParameter {
            vhost,
            component,
            name,
        } => {
            sqlx::query("DELETE FROM parameters WHERE vhost = ? AND component = ? AND name = ?")
                .bind(vhost.clone())
                .bind(component.clone())
                .bind(name.clone())
                .execute(&mut **tx)
                .await?;
        }
        Op::PutGlobalParameter(p) => {
            sqlx::query("REPLACE INTO global_parameters (name, value) VALUES (?, ?)")
                .bind(p.name.clone())
                .bind(p.value.clone())
                .execute(&mut **tx)
                .await?;
        }
        Op::DeleteGlobalParameter { name } => {
            sqlx::query("DELETE FROM global_parameters WHERE name = ?")
                .bind(name.clone())
                .execute(&mut **tx)
                .await?;
        }
        // Message ops never reach the metadata list of a plan.
        Op::Insert { .. }
        | Op::Remove { .. }
        | Op::Purge { .. }
        | Op::Delivered { .. }
        | Op::Redelivered { .. }
        | Op::Atomic(_) => {}
    }
    Ok(())
}

/// Deletes a queue's positions after `after_seq` and the messages no other position holds.
async fn purge(tx: &mut Tx<'_>, queue_id: i64, after_seq: i64) -> Result<(), sqlx::Error> {
    // Chunks first, by the same test as their messages (see `delete_orphan_chunks`).
    for table in ["message_chunks", "messages"] {
        let id = if table == "messages" {
            "id"
        } else {
            "message_id"
        };
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE {id} IN \
             (SELECT qm.message_id FROM queue_messages qm WHERE qm.queue_id = ? AND qm.seq > ?) \
             AND NOT EXISTS (SELECT 1 FROM queue_messages o WHERE o.message_id = {table}.{id} \
                             AND (o.queue_id <> ? OR o.seq <= ?))"
        )))
        .bind(queue_id)
        .bind(after_seq)
        .bind(queue_id)
        .bind(after_seq)
        .execute(&mut **tx)
        .await?;
    }
    sqlx::query("DELETE FROM queue_messages WHERE queue_id = ? AND seq > ?")
        .bind(queue_id)
        .bind(after_seq)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Message rows are written with "insert or ignore": a message routed to several queues may
/// arrive in two batches, one per queue.
async fn insert_messages(
    tx: &mut Tx<'_>,
    backend: Backend,
    inserts: &[PlannedInsert],
) -> Result<(), sqlx::Error> {
    let insert = match backend {
        Backend::Sqlite => "INSERT OR IGNORE",
        Backend::Mysql => "INSERT IGNORE",
    };
    let mut start = 0;
    while start < inserts.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < inserts.len() && end - start < MAX_ROWS && bytes < MAX_STATEMENT {
            let m = &inserts[end].message;
            bytes += m.header.len() + inline_body(m).len() + 64;
            end += 1;
        }
        end = start + rows_per_statement(end - start);
        let mut qb = QueryBuilder::<sqlx::Any>::new(format!(
            "{insert} INTO messages (id, persistent, exchange, routing_key, header, body, chunks, published_ms) "
        ));
        qb.push_values(&inserts[start..end], |mut b, ins| {
            let m = &ins.message;
            b.push_bind(m.id)
                .push_bind(m.persistent as i64)
                .push_bind(m.exchange.clone())
                .push_bind(m.routing_key.clone())
                .push_bind(m.header.to_vec())
                .push_bind(inline_body(m).to_vec())
                .push_bind(chunk_count(m))
                .push_bind(m.published_ms);
        });
        qb.build().execute(&mut **tx).await?;
        start = end;
    }
    for ins in inserts.iter().filter(|i| chunk_count(&i.message) > 0) {
        for (idx, chunk) in ins.message.body.chunks(CHUNK).enumerate() {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "{insert} INTO message_chunks (message_id, idx, data) VALUES (?, ?, ?)"
            )))
            .bind(ins.message.id)
            .bind(idx as i64)
            .bind(chunk.to_vec())
            .execute(&mut **tx)
            .await?;
        }
    }
    let positions: Vec<(i64, i64, i64)> = inserts
        .iter()
        .flat_map(|i| i.entries.iter().map(|(q, s)| (*q, *s, i.message.id)))
        .collect();
    let mut rest = &positions[..];
    while !rest.is_empty() {
        let (rows, tail) = rest.split_at(rows_per_statement(rest.len()));
        rest = tail;
        // Also "insert or ignore": a commit whose reply was lost (the connection dropped after
        // COMMIT) is retried, and the retry must not fail on rows it already wrote.
        let mut qb = QueryBuilder::<sqlx::Any>::new(format!(
            "{insert} INTO queue_messages (queue_id, seq, message_id) "
        ));
        qb.push_values(rows, |mut b, (q, s, m)| {
            b.push_bind(*q).push_bind(*s).push_bind(*m);
        });
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
#[test]
fn statements_take_a_power_of_two_of_rows() {
    let cut = |mut n: usize| {
        let mut v = Vec::new();
        while n > 0 {
            let k = rows_per_statement(n);
            v.push(k);
            n -= k;
        }
        v
    };
    assert_eq!(cut(1), vec![1]);
    assert_eq!(cut(409), vec![256, 128, 16, 8, 1]);
    assert_eq!(cut(1000), vec![256, 256, 256, 128, 64, 32, 8]);
    assert_eq!(rows_per_statement(0), 1);
}

fn inline_body(m: &MessageRow) -> &[u8] {
    if m.body.len() > CHUNK {
        &[]
    } else {
        &m.body
    }
}

fn chunk_count(m: &MessageRow) -> i64 {
    if m.body.len() > CHUNK {
        m.body.len().div_ceil(CHUNK) as i64
    } else {
        0
    }
}

async fn apply_plan(tx: &mut Tx<'_>, backend: Backend, plan: &Plan) -> Result<(), sqlx::Error> {
    // Where a batch's statement time goes (trace level: `warren_storage::sql=trace`).
    let t = std::time::Instant::now();
    for op in &plan.meta {
        meta_op(tx, op).await?;
    }
    for (q, after) in &plan.purges {
        purge(tx, *q, *after).await?;
    }
    let t_meta = t.elapsed();
    insert_messages(tx, backend, &plan.inserts).await?;
    let t_insert = t.elapsed();
    let runs = plan.remove_runs();
    for (q, first, last) in &runs {
        sqlx::query("DELETE FROM queue_messages WHERE queue_id = ? AND seq >= ? AND seq <= ?")
            .bind(q)
            .bind(first)
            .bind(last)
            .execute(&mut **tx)
            .await?;
    }
    let t_positions = t.elapsed();
    let message_runs = plan.removed_message_runs();
    for (first, last) in &message_runs {
        sqlx::query(
            "DELETE FROM messages WHERE id >= ? AND id <= ? AND NOT EXISTS \
             (SELECT 1 FROM queue_messages qm WHERE qm.message_id = messages.id)",
        )
        .bind(first)
        .bind(last)
        .execute(&mut **tx)
        .await?;
        if backend == Backend::Sqlite {
            delete_orphan_chunks(tx, *first, *last).await?;
        }
    }
    let t_messages = t.elapsed();
    for (q, seq) in &plan.delivered {
        sqlx::query("UPDATE queues SET delivered_seq = ? WHERE id = ? AND delivered_seq < ?")
            .bind(*seq)
            .bind(*q)
            .bind(*seq)
            .execute(&mut **tx)
            .await?;
    }
    for (q, seq) in &plan.redelivered {
        sqlx::query("UPDATE queue_messages SET redelivered = 1 WHERE queue_id = ? AND seq = ?")
            .bind(*q)
            .bind(*seq)
            .execute(&mut **tx)
            .await?;
    }
    let us = |d: std::time::Duration| d.as_micros() as u64;
    tracing::trace!(
        meta_us = us(t_meta),
        inserts = plan.inserts.len(),
        insert_us = us(t_insert - t_meta),
        position_runs = runs.len(),
        positions_us = us(t_positions - t_insert),
        message_runs = message_runs.len(),
        messages_us = us(t_messages - t_positions),
        marks_us = us(t.elapsed() - t_messages),
        "statements"
    );
    Ok(())
}

/// Deletes the chunks of the messages in `first..=last` that are gone, on SQLite, which runs
/// without foreign keys: their per-row cascade program more than doubled the cost of deleting
/// acked messages. (MySQL keeps its cascade.) A range with no chunked message is one seek.
async fn delete_orphan_chunks(tx: &mut Tx<'_>, first: i64, last: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM message_chunks WHERE message_id >= ? AND message_id <= ? AND NOT EXISTS \
         (SELECT 1 FROM messages m WHERE m.id = message_chunks.message_id)",
    )
    .bind(first)
    .bind(last)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn flag(row: &AnyRow, col: &str) -> Result<bool, sqlx::Error> {
    Ok(row.try_get::<i64, _>(col)? != 0)
}

fn blob(row: &AnyRow, col: &str) -> Result<Bytes, sqlx::Error> {
    Ok(Bytes::from(row.try_get::<Vec<u8>, _>(col)?))
}

/// A message row's columns, from either driver's rows; the body is empty when it is chunked.
struct MessageColumns {
    row: MessageRow,
    chunks: i64,
}

/// The columns `read_queue` and `read_message` select, decoded from a row of any driver
/// (`Any` for MySQL, typed for SQLite). Blobs are copied once, out of the row.
fn message_columns<'r, R>(row: &'r R) -> Result<MessageColumns, sqlx::Error>
where
    R: Row,
    &'static str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    &'r [u8]: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let blob = |col| row.try_get::<&[u8], _>(col).map(Bytes::copy_from_slice);
    let chunks: i64 = row.try_get("chunks")?;
    Ok(MessageColumns {
        row: MessageRow {
            id: row.try_get("id")?,
            persistent: row.try_get::<i64, _>("persistent")? != 0,
            exchange: row.try_get("exchange")?,
            routing_key: row.try_get("routing_key")?,
            header: blob("header")?,
            body: if chunks > 0 {
                Bytes::new()
            } else {
                blob("body")?
            },
            published_ms: row.try_get("published_ms")?,
        },
        chunks,
    })
}

/// `read_queue`'s columns beyond the message's: its position and redelivered mark.
fn entry_columns<'r, R>(row: &'r R) -> Result<(i64, bool), sqlx::Error>
where
    R: Row,
    &'static str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok((
        row.try_get("seq")?,
        row.try_get::<i64, _>("redelivered")? != 0,
    ))
}

/// `read_queue`'s rows, decoded until their bodies reach `max_bytes` (at least one row). A
/// chunked body counts as its chunks' full size, which is at least its own.
async fn take_page<R, S>(
    mut rows: S,
    max_bytes: usize,
) -> Result<Vec<(MessageColumns, (i64, bool))>, sqlx::Error>
where
    S: futures_util::Stream<Item = Result<R, sqlx::Error>> + Unpin,
    R: Row,
    &'static str: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r [u8]: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    use futures_util::TryStreamExt;
    let mut page = Vec::new();
    let mut bytes = 0;
    while bytes < max_bytes || page.is_empty() {
        let Some(row) = rows.try_next().await? else {
            break;
        };
        let columns = message_columns(&row)?;
        bytes += match columns.chunks {
            0 => columns.row.body.len(),
            n => (n.max(0) as usize).saturating_mul(CHUNK),
        };
        page.push((columns, entry_columns(&row)?));
    }
    Ok(page)
}

const READ_QUEUE: &str = "SELECT qm.seq, qm.redelivered, m.id, m.persistent, m.exchange, \
     m.routing_key, m.header, m.body, m.chunks, m.published_ms FROM queue_messages qm \
     JOIN messages m ON m.id = qm.message_id \
     WHERE qm.queue_id = ? AND qm.seq > ? ORDER BY qm.seq LIMIT ?";

const READ_MESSAGE: &str = "SELECT id, persistent, exchange, routing_key, header, body, chunks, \
     published_ms FROM messages WHERE id = ?";

impl SqlStore {
    async fn chunked_body(&self, id: i64, chunks: i64) -> Result<Bytes, StoreError> {
        const SQL: &str = "SELECT data FROM message_chunks WHERE message_id = ? ORDER BY idx";
        let parts: Vec<Vec<u8>> = match &self.sqlite_reads {
            Some(reads) => sqlx::query_scalar(SQL).bind(id).fetch_all(reads).await,
            None => sqlx::query_scalar(SQL).bind(id).fetch_all(&self.pool).await,
        }
        .map_err(unavailable)?;
        if parts.len() as i64 != chunks {
            return Err(StoreError::Corrupt(format!(
                "message {id} has {} of its {chunks} chunks",
                parts.len()
            )));
        }
        let mut body = BytesMut::with_capacity(parts.iter().map(Vec::len).sum());
        for part in parts {
            body.extend_from_slice(&part);
        }
        Ok(body.freeze())
    }

    /// The message, its chunked body read in.
    async fn message_from(&self, columns: MessageColumns) -> Result<MessageRow, StoreError> {
        let mut message = columns.row;
        if columns.chunks > 0 {
            message.body = self.chunked_body(message.id, columns.chunks).await?;
        }
        Ok(message)
    }
}

fn user_row(r: &AnyRow) -> Result<UserRecord, sqlx::Error> {
    Ok(UserRecord {
        name: r.try_get("name")?,
        password_hash: r.try_get("password_hash")?,
        tags: r.try_get("tags")?,
        limits: r.try_get("limits")?,
    })
}

fn permission_row(r: &AnyRow) -> Result<PermissionRecord, sqlx::Error> {
    Ok(PermissionRecord {
        vhost: r.try_get("vhost")?,
        user: r.try_get("user_name")?,
        configure: r.try_get("configure_re")?,
        write: r.try_get("write_re")?,
        read: r.try_get("read_re")?,
    })
}

fn topic_permission_row(r: &AnyRow) -> Result<TopicPermissionRecord, sqlx::Error> {
    Ok(TopicPermissionRecord {
        vhost: r.try_get("vhost")?,
        user: r.try_get("user_name")?,
        exchange: r.try_get("exchange")?,
        write: r.try_get("write_re")?,
        read: r.try_get("read_re")?,
    })
}

impl MetaStore for SqlStore {
    async fn has_users(&self) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(row.try_get::<i64, _>(0).map_err(unavailable)? > 0)
    }

    async fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        let row = sqlx::query("SELECT name, password_hash, tags, limits FROM users WHERE name = ?")
            .bind(name.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        row.as_ref().map(user_row).transpose().map_err(unavailable)
    }

    async fn permission(
        &self,
        vhost: &str,
        user: &str,
    ) -> Result<Option<PermissionRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT vhost, user_name, configure_re, write_re, read_re FROM permissions \
             WHERE vhost = ? AND user_name = ?",
        )
        .bind(vhost.to_string())
        .bind(user.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.as_ref()
            .map(permission_row)
            .transpose()
            .map_err(unavailable)
    }

    async fn topic_permissions(
        &self,
        vhost: &str,
        user: &str,
    ) -> Result<Vec<TopicPermissionRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT vhost, user_name, exchange, write_re, read_re FROM topic_permissions \
             WHERE vhost = ? AND user_name = ? ORDER BY exchange",
        )
        .bind(vhost.to_string())
        .bind(user.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(topic_permission_row)
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(unavailable)
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let rows = sqlx::query("SELECT name, password_hash, tags, limits FROM users ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(user_row)
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(unavailable)
    }

    async fn list_permissions(&self) -> Result<Vec<PermissionRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT vhost, user_name, configure_re, write_re, read_re FROM permissions \
             ORDER BY vhost, user_name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(permission_row)
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(unavailable)
    }

    async fn list_topic_permissions(&self) -> Result<Vec<TopicPermissionRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT vhost, user_name, exchange, write_re, read_re FROM topic_permissions \
             ORDER BY vhost, user_name, exchange",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(topic_permission_row)
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(unavailable)
    }

    async fn load_meta(&self) -> Result<Snapshot, StoreError> {
        let p = &self.pool;
        let mut snap = Snapshot::default();
        let rows = sqlx::query(
            "SELECT name, description, tags, default_queue_type FROM vhosts ORDER BY name",
        )
        .fetch_all(p)
        .await
        .map_err(unavailable)?;
        for r in rows {
            snap.vhosts.push(VhostRecord {
                name: r.try_get("name").map_err(unavailable)?,
                description: r.try_get("description").map_err(unavailable)?,
                tags: r.try_get("tags").map_err(unavailable)?,
                default_queue_type: r.try_get("default_queue_type").map_err(unavailable)?,
            });
        }
        let rows = sqlx::query(
            "SELECT vhost, component, name, value FROM parameters ORDER BY vhost, component, name",
        )
        .fetch_all(p)
        .await
        .map_err(unavailable)?;
        for r in rows {
            snap.parameters.push(ParameterRecord {
                vhost: r.try_get("vhost").map_err(unavailable)?,
                component: r.try_get("component").map_err(unavailable)?,
                name: r.try_get("name").map_err(unavailable)?,
                value: r.try_get("value").map_err(unavailable)?,
            });
        }
        let rows = sqlx::query("SELECT name, value FROM global_parameters ORDER BY name")
            .fetch_all(p)
            .await
            .map_err(unavailable)?;
        for r in rows {
            snap.global_parameters.push(GlobalParameterRecord {
                name: r.try_get("name").map_err(unavailable)?,
                value: r.try_get("value").map_err(unavailable)?,
            });
        }
        let rows = sqlx::query(
            "SELECT vhost, name, kind, auto_delete, internal, arguments FROM exchanges \
             ORDER BY vhost, name",
        )
        .fetch_all(p)
        .await
        .map_err(unavailable)?;
        for r in rows {
            snap.exchanges.push(ExchangeRecord {
                vhost: r.try_get("vhost").map_err(unavailable)?,
                name: r.try_get("name").map_err(unavailable)?,
                kind: r.try_get("kind").map_err(unavailable)?,
                auto_delete: flag(&r, "auto_delete").map_err(unavailable)?,
                internal: flag(&r, "internal").map_err(unavailable)?,
                arguments: blob(&r, "arguments").map_err(unavailable)?,
            });
        }
        let rows = sqlx::query(
            "SELECT id, vhost, name, auto_delete, arguments, delivered_seq FROM queues ORDER BY id",
        )
        .fetch_all(p)
        .await
        .map_err(unavailable)?;
        for r in rows {
            snap.queues.push(QueueRecord {
                id: r.try_get("id").map_err(unavailable)?,
                vhost: r.try_get("vhost").map_err(unavailable)?,
                name: r.try_get("name").map_err(unavailable)?,
                auto_delete: flag(&r, "auto_delete").map_err(unavailable)?,
                arguments: blob(&r, "arguments").map_err(unavailable)?,
                delivered_seq: r.try_get("delivered_seq").map_err(unavailable)?,
            });
        }
        let rows = sqlx::query(
            "SELECT vhost, source, destination, destination_kind, routing_key, arguments \
             FROM bindings ORDER BY vhost, source, destination, routing_key",
        )
        .fetch_all(p)
        .await
        .map_err(unavailable)?;
        for r in rows {
            let kind: i64 = r.try_get("destination_kind").map_err(unavailable)?;
            snap.bindings.push(BindingRecord {
                vhost: r.try_get("vhost").map_err(unavailable)?,
                source: r.try_get("source").map_err(unavailable)?,
                destination: r.try_get("destination").map_err(unavailable)?,
                destination_kind: if kind == 1 {
                    DestinationKind::Exchange
                } else {
                    DestinationKind::Queue
                },
                routing_key: r.try_get("routing_key").map_err(unavailable)?,
                arguments: blob(&r, "arguments").map_err(unavailable)?,
            });
        }
        Ok(snap)
    }
}

impl MessageStore for SqlStore {
    async fn apply(&self, plan: &Plan) -> Result<(), StoreError> {
        if plan.is_empty() {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        let mut conn = self.pool.acquire().await.map_err(unavailable)?;
        if self.backend == Backend::Sqlite && self.fsync {
            // A batch of only acks, delivered marks and paged transient messages need not
            // reach the disk before its tickets are released; the next synced commit carries
            // it (WAL order). Set on every batch (pooled connections keep their setting),
            // outside the transaction as SQLite requires.
            let sync = if plan.needs_sync() {
                "PRAGMA synchronous = FULL"
            } else {
                "PRAGMA synchronous = NORMAL"
            };
            conn.execute(sync).await.map_err(unavailable)?;
        }
        let mut tx = sqlx::Acquire::begin(&mut conn).await.map_err(unavailable)?;
        // Dropping `tx` on a failed proof rolls it back: nothing of the plan is written.
        self.prove_fence(&mut tx).await?;
        let t1 = t0.elapsed();
        apply_plan(&mut tx, self.backend, plan)
            .await
            .map_err(unavailable)?;
        let t2 = t0.elapsed();
        tx.commit().await.map_err(unavailable)?;
        tracing::trace!(
            begin_us = t1.as_micros() as u64,
            statements_us = (t2 - t1).as_micros() as u64,
            commit_us = (t0.elapsed() - t2).as_micros() as u64,
            "apply"
        );
        Ok(())
    }

    async fn recover(&self) -> Result<Recovered, StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        self.prove_fence(&mut tx).await?;
        for sql in [
            "DELETE FROM queue_messages WHERE queue_id NOT IN (SELECT id FROM queues)",
            "DELETE FROM queue_messages WHERE message_id IN \
             (SELECT id FROM messages WHERE persistent = 0)",
            "DELETE FROM messages WHERE persistent = 0",
            "DELETE FROM messages WHERE NOT EXISTS \
             (SELECT 1 FROM queue_messages qm WHERE qm.message_id = messages.id)",
            "DELETE FROM message_chunks WHERE NOT EXISTS \
             (SELECT 1 FROM messages m WHERE m.id = message_chunks.message_id)",
        ] {
            sqlx::query(sql)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        let snapshot = self.load_meta().await?;
        let max_id = |sql: &'static str| async move {
            sqlx::query(sql)
                .fetch_one(&self.pool)
                .await
                .and_then(|r| r.try_get::<i64, _>(0))
                .map_err(unavailable)
        };
        Ok(Recovered {
            snapshot,
            next_message_id: max_id("SELECT COALESCE(MAX(id), 0) FROM messages").await? + 1,
            next_queue_id: max_id("SELECT COALESCE(MAX(id), 0) FROM queues").await? + 1,
        })
    }

    async fn queue_summary(&self, queue_id: i64) -> Result<QueueSummary, StoreError> {
        let r = sqlx::query(
            "SELECT COUNT(*) AS n, COALESCE(MIN(seq), 0) AS lo, COALESCE(MAX(seq), 0) AS hi \
             FROM queue_messages WHERE queue_id = ?",
        )
        .bind(queue_id)
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        let n: i64 = r.try_get("n").map_err(unavailable)?;
        Ok(QueueSummary {
            count: n.max(0) as u64,
            min_seq: r.try_get("lo").map_err(unavailable)?,
            max_seq: r.try_get("hi").map_err(unavailable)?,
        })
    }

    async fn queue_bytes(&self, queue_id: i64) -> Result<u64, StoreError> {
        // MySQL's SUM is a DECIMAL, which sqlx's Any driver cannot read: cast it per backend.
        let int = match self.backend {
            Backend::Sqlite => "INTEGER",
            Backend::Mysql => "SIGNED",
        };
        let r = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT CAST(COALESCE(SUM(CASE WHEN m.chunks > 0 THEN \
             (SELECT COALESCE(SUM(LENGTH(c.data)), 0) FROM message_chunks c \
              WHERE c.message_id = m.id) ELSE LENGTH(m.body) END), 0) AS {int}) AS b \
             FROM queue_messages qm JOIN messages m ON m.id = qm.message_id \
             WHERE qm.queue_id = ?"
        )))
        .bind(queue_id)
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        let b: i64 = r.try_get("b").map_err(unavailable)?;
        Ok(b.max(0) as u64)
    }

    async fn read_queue(
        &self,
        queue_id: i64,
        after_seq: i64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        let (q, after, n) = (queue_id, after_seq, limit as i64);
        // Rows are taken as they come, up to the byte cap: a page of large bodies is not
        // fetched whole only to be cut.
        let rows = match &self.sqlite_reads {
            Some(reads) => {
                let rows = sqlx::query(READ_QUEUE)
                    .bind(q)
                    .bind(after)
                    .bind(n)
                    .fetch(reads);
                take_page(rows, max_bytes).await
            }
            None => {
                let rows = sqlx::query(READ_QUEUE)
                    .bind(q)
                    .bind(after)
                    .bind(n)
                    .fetch(&self.pool);
                take_page(rows, max_bytes).await
            }
        }
        .map_err(unavailable)?;
        let mut out = Vec::with_capacity(rows.len());
        for (columns, (seq, redelivered)) in rows {
            out.push(StoredEntry {
                seq,
                message: self.message_from(columns).await?,
                redelivered,
            });
        }
        Ok(out)
    }

    async fn read_message(&self, id: i64) -> Result<Option<MessageRow>, StoreError> {
        let columns = match &self.sqlite_reads {
            Some(reads) => sqlx::query(READ_MESSAGE)
                .bind(id)
                .fetch_optional(reads)
                .await
                .and_then(|r| r.as_ref().map(message_columns).transpose()),
            None => sqlx::query(READ_MESSAGE)
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .and_then(|r| r.as_ref().map(message_columns).transpose()),
        }
        .map_err(unavailable)?;
        match columns {
            Some(c) => Ok(Some(self.message_from(c).await?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("mysql://warren:secret@db:3306/warren"),
            "mysql://warren:***@db:3306/warren"
        );
        assert_eq!(redact("sqlite:///x/y.db"), "sqlite:///x/y.db");
    }

    #[test]
    fn binding_ids_differ_by_every_field() {
        let b = BindingRecord {
            vhost: "/".into(),
            source: "x".into(),
            destination: "q".into(),
            destination_kind: DestinationKind::Queue,
            routing_key: "k".into(),
            arguments: Bytes::new(),
        };
        let mut other = b.clone();
        other.destination_kind = DestinationKind::Exchange;
        assert_ne!(binding_id(&b), binding_id(&other));
        let mut other = b.clone();
        other.source = "xq".into();
        other.destination = String::new();
        assert_ne!(binding_id(&b), binding_id(&other));
        assert_eq!(binding_id(&b).len(), 64);
    }
}
