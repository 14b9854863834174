//! The broker's settings: command-line flags, each also read from `WARREN_<FLAG>`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// Warren: an AMQP 0-9-1 message broker, a drop-in replacement for RabbitMQ.
#[derive(Debug, Clone, Parser)]
#[command(name = "warren", version, about)]
pub struct Config {
    /// Addresses the AMQP listener binds (the flag may be repeated; the variable takes a
    /// comma-separated list). `[::]:PORT` is dual-stack (IPv4 too), falling back to
    /// `0.0.0.0:PORT` where IPv6 is off.
    #[arg(
        long,
        env = "WARREN_AMQP_LISTEN",
        default_value = "[::]:5672",
        value_delimiter = ','
    )]
    pub amqp_listen: Vec<SocketAddr>,

    /// Addresses for AMQP over TLS (AMQPS; RabbitMQ's 5671), comma-separated; off by default.
    /// Needs --tls-cert and --tls-key.
    #[arg(long, env = "WARREN_AMQPS_LISTEN", default_value = "", value_parser = parse_listen)]
    pub amqps_listen: Listen,

    /// The server's certificate chain (PEM) for AMQPS and HTTPS.
    #[arg(long, env = "WARREN_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The server's private key (PEM) for AMQPS and HTTPS.
    #[arg(long, env = "WARREN_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,

    /// CA certificates (PEM) that client certificates are verified against; a client with a
    /// verified certificate may log in with SASL EXTERNAL as the certificate's CN.
    #[arg(long, env = "WARREN_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,

    /// Addresses for the management HTTP API (RabbitMQ's 15672), comma-separated; "" turns
    /// it off.
    #[arg(long, env = "WARREN_HTTP_LISTEN", default_value = "[::]:15672", value_parser = parse_listen)]
    pub http_listen: Listen,

    /// Addresses for the management HTTP API over TLS (RabbitMQ's `management.ssl`, 15671 by
    /// convention), comma-separated; off by default. Uses --tls-cert, --tls-key and --tls-ca.
    #[arg(long, env = "WARREN_HTTPS_LISTEN", default_value = "", value_parser = parse_listen)]
    pub https_listen: Listen,

    /// Addresses for the Prometheus endpoint (RabbitMQ's 15692), comma-separated; "" turns it
    /// off.
    #[arg(long, env = "WARREN_PROMETHEUS_LISTEN", default_value = "[::]:15692", value_parser = parse_listen)]
    pub prometheus_listen: Listen,

    /// A definitions file (RabbitMQ's JSON format) to import at start, as RabbitMQ's
    /// `load_definitions`: what it names and the broker lacks is created; existing objects
    /// are left as they are.
    #[arg(long, env = "WARREN_LOAD_DEFINITIONS")]
    pub load_definitions: Option<std::path::PathBuf>,

    /// Directory for the broker's data: the embedded SQLite store (`warren.db`) lives here.
    #[arg(long, env = "WARREN_DATA_DIR", default_value = "./warren-data")]
    pub data_dir: PathBuf,

    /// Storage URL: `sqlite://PATH` or `mysql://user:pass@host:3306/db`. Default: SQLite in the
    /// data directory.
    #[arg(long, env = "WARREN_STORAGE", value_parser = parse_storage_url)]
    pub storage: Option<String>,

    /// Memory budget for message bodies (bytes, or with a unit: 512MiB, 2GiB). A quarter is the
    /// moka cache of stored bodies; past three quarters, new messages page out to the store.
    #[arg(long, env = "WARREN_CACHE_MEMORY", default_value = "512MiB", value_parser = parse_size)]
    pub cache_memory: u64,

    /// Over the memory budget, a delivery unacked for longer than this (ms) gives its body up:
    /// written to the store if it is not there, then held by the cache only (a requeue reads it
    /// back). Deliveries acked sooner are never written for this.
    #[arg(long, env = "WARREN_UNACKED_PAGE_AFTER_MS", default_value_t = 1000)]
    pub unacked_page_after_ms: u64,

    /// When a publisher confirm is sent for a persistent message: `confirm` (after the commit
    /// that stores it) or `periodic:<ms>` (write-behind: at once, with the store flushed every
    /// <ms>; a crash can lose up to that window of confirmed messages).
    #[arg(long, env = "WARREN_SYNC", default_value = "confirm", value_parser = parse_sync)]
    pub sync: SyncMode,

    /// Group commit: how long a batch gathers writes after its first one, in microseconds.
    #[arg(long, env = "WARREN_COMMIT_INTERVAL_US", default_value_t = 1000)]
    pub commit_interval_us: u64,

    /// Group commit: most operations in one transaction.
    #[arg(long, env = "WARREN_COMMIT_MAX_OPS", default_value_t = 10_000)]
    pub commit_max_ops: usize,

    /// Group commit: most bytes in one transaction (inserts whose ack joined the batch, which
    /// are not written, do not count).
    #[arg(long, env = "WARREN_COMMIT_MAX_BYTES", default_value = "16MiB", value_parser = parse_size)]
    pub commit_max_bytes: u64,

    /// Bytes waiting for the store above which publishers are held (and sent connection.blocked).
    #[arg(long, env = "WARREN_STORE_HOLD_BYTES", default_value = "32MiB", value_parser = parse_size)]
    pub store_hold_bytes: u64,

    /// The memory alarm's threshold as a fraction of the host's memory (RabbitMQ's
    /// `vm_memory_high_watermark.relative`): while the process's resident memory is above it,
    /// publishing connections are blocked.
    #[arg(long, env = "WARREN_VM_MEMORY_HIGH_WATERMARK", default_value_t = 0.4, value_parser = parse_fraction)]
    pub vm_memory_high_watermark: f64,

    /// The memory alarm's threshold in bytes (RabbitMQ's `vm_memory_high_watermark.absolute`);
    /// overrides the fraction.
    #[arg(long, env = "WARREN_VM_MEMORY_HIGH_WATERMARK_ABSOLUTE", value_parser = parse_size)]
    pub vm_memory_high_watermark_absolute: Option<u64>,

    /// The disk alarm's threshold (RabbitMQ's `disk_free_limit.absolute`): while the free space
    /// under the data directory is below it, publishing connections are blocked.
    #[arg(long, env = "WARREN_DISK_FREE_LIMIT", default_value = "50MB", value_parser = parse_size)]
    pub disk_free_limit: u64,

    /// Cluster mode (needs --storage mysql://...): this node's name among the Warren nodes
    /// sharing the database. One node is active and serves; the others are standbys that proxy
    /// AMQP connections to it and take over when its lease expires.
    #[arg(long, env = "WARREN_CLUSTER_NODE")]
    pub cluster_node: Option<String>,

    /// Cluster mode: the lease a node renews on the database clock (every quarter of it).
    #[arg(long, env = "WARREN_CLUSTER_LEASE_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(200..=600_000))]
    pub cluster_lease_ms: u64,

    /// Cluster mode: how other nodes reach this node's AMQP listener (host:port); the first
    /// --amqp-listen address by default.
    #[arg(long, env = "WARREN_CLUSTER_ADVERTISE")]
    pub cluster_advertise: Option<String>,

    /// Cluster mode: the identity the store proves in every transaction (set once this node
    /// is active; not a flag).
    #[arg(skip)]
    pub cluster_fence: Option<warren_storage::cluster::NodeId>,

    /// The user created at start (RabbitMQ's default_user).
    #[arg(long, env = "WARREN_DEFAULT_USER", default_value = "guest")]
    pub default_user: String,

    /// The default user's password.
    #[arg(
        long,
        env = "WARREN_DEFAULT_PASS",
        default_value = "guest",
        hide_env_values = true
    )]
    pub default_pass: String,

    /// Users that may log in only from loopback, comma separated (RabbitMQ's loopback_users).
    /// Give an empty string to let guest connect from anywhere.
    #[arg(
        long,
        env = "WARREN_LOOPBACK_USERS",
        default_value = "guest",
        value_delimiter = ','
    )]
    pub loopback_users: Vec<String>,

    /// Heartbeat interval the server proposes, in seconds (0 disables).
    #[arg(long, env = "WARREN_HEARTBEAT", default_value_t = 60)]
    pub heartbeat: u16,

    /// Largest frame the server accepts, in bytes (at least 8192; 0 means no limit).
    #[arg(long, env = "WARREN_FRAME_MAX", default_value_t = 131_072, value_parser = parse_frame_max)]
    pub frame_max: u32,

    /// Most channels per connection.
    #[arg(long, env = "WARREN_CHANNEL_MAX", default_value_t = 2047)]
    pub channel_max: u16,

    /// Largest message body accepted, in bytes or with a unit (at most 512MiB, as RabbitMQ).
    #[arg(long, env = "WARREN_MAX_MESSAGE_SIZE", default_value = "128MiB", value_parser = parse_message_size)]
    pub max_message_size: u64,

    /// Most concurrent client connections: the next one is refused at connection.open with
    /// 530 (RabbitMQ's `connection_max`).
    #[arg(long, env = "WARREN_MAX_CONNECTIONS", default_value_t = 65_536)]
    pub max_connections: usize,

    /// Seconds a client has from connecting to connection.open (RabbitMQ's handshake_timeout).
    #[arg(long, env = "WARREN_HANDSHAKE_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub handshake_timeout: u64,

    /// Most consumers on one channel (RabbitMQ's consumer_max_per_channel): one more is 530.
    #[arg(long, env = "WARREN_CONSUMER_MAX_PER_CHANNEL", default_value_t = 4096)]
    pub consumer_max_per_channel: usize,

    /// Most messages one open transaction holds before tx.commit (406 beyond).
    #[arg(long, env = "WARREN_TX_MAX_MESSAGES", default_value_t = 65_536)]
    pub tx_max_messages: usize,

    /// Most body bytes one open transaction holds before tx.commit (406 beyond).
    #[arg(long, env = "WARREN_TX_MAX_BYTES", default_value = "64MiB", value_parser = parse_size)]
    pub tx_max_bytes: u64,

    /// Bytes of outgoing frames a connection may have pending before deliveries to it pause.
    #[arg(long, env = "WARREN_OUTBOX_BYTES", default_value = "1MiB", value_parser = parse_size)]
    pub outbox_bytes: u64,

    /// Product name reported in connection.start (kombu reads it to pick QoS semantics).
    #[arg(long, env = "WARREN_PRODUCT", default_value = "RabbitMQ")]
    pub product: String,

    /// Version reported in connection.start.
    #[arg(long, env = "WARREN_PRODUCT_VERSION", default_value = "3.13.7")]
    pub product_version: String,

    /// Fault injection for tests (no flag): a connection task panics when one of its channels
    /// declares a queue of this name, to prove a panicking connection releases what it held.
    #[arg(skip)]
    pub fault_panic_on_queue: Option<String>,

    /// Fault injection for tests (no flag): the store's commits and reads go through this
    /// control (outages, refusals, lost answers, delays).
    #[arg(skip)]
    pub faults: Option<std::sync::Arc<warren_storage::Faults>>,
}

/// When publisher confirms for persistent messages are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// After the commit that stores the message.
    Confirm,
    /// On enqueue; the store is flushed every this many milliseconds.
    Periodic(u64),
}

fn parse_sync(s: &str) -> Result<SyncMode, String> {
    if s == "confirm" {
        return Ok(SyncMode::Confirm);
    }
    if let Some(ms) = s.strip_prefix("periodic:") {
        return match ms.parse::<u64>() {
            Ok(n) if (1..=60_000).contains(&n) => Ok(SyncMode::Periodic(n)),
            _ => Err(format!(
                "periodic interval must be 1..=60000 milliseconds, got '{ms}'"
            )),
        };
    }
    Err(format!(
        "unknown sync mode '{s}': use confirm or periodic:<ms>"
    ))
}

impl Config {
    /// Settings for an in-process test broker: an ephemeral port and a fresh data directory.
    pub fn for_tests() -> Self {
        let mut c = Config::parse_from(["warren", "--amqp-listen", "127.0.0.1:0"]);
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        c.data_dir = std::env::temp_dir().join(format!(
            "warren-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&c.data_dir);
        // Tests that want the HTTP listeners ask for them (port 0).
        c.http_listen = Listen::default();
        c.prometheus_listen = Listen::default();
        c
    }

    /// The store's URL: `--storage`, or SQLite in the data directory.
    pub fn storage_url(&self) -> String {
        self.storage
            .clone()
            .unwrap_or_else(|| warren_storage::SqlStore::sqlite_url(&self.data_dir))
    }
}

/// Listener addresses (possibly none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listen(pub Vec<SocketAddr>);

/// "" (off), or comma-separated socket addresses.
pub fn parse_listen(s: &str) -> Result<Listen, String> {
    s.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.parse::<SocketAddr>()
                .map_err(|_| format!("'{a}' is not an address (try [::]:15672 or 127.0.0.1:15672)"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Listen)
}

/// Parses `1234`, `512KiB`, `512MiB`, `2GiB`, `1GB`, `10MB`, `64kB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (try 1048576, 512MiB or 2GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit '{other}' (use B, KiB, MiB, GiB, kB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!(
            "'{s}' is not a fraction between 0 and 1 (RabbitMQ's default is 0.4)"
        )),
    }
}

fn parse_message_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if n == 0 || n > 512 << 20 {
        return Err(format!(
            "max message size must be between 1 byte and 512MiB, got {n}"
        ));
    }
    Ok(n)
}

fn parse_frame_max(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a frame size"))?;
    if n != 0 && n < warren_protocol::FRAME_MIN_SIZE {
        return Err(format!(
            "frame_max must be 0 or at least {}",
            warren_protocol::FRAME_MIN_SIZE
        ));
    }
    Ok(n)
}

fn parse_storage_url(s: &str) -> Result<String, String> {
    let scheme = s.split("://").next().unwrap_or("");
    match scheme {
        "sqlite" | "mysql" | "mariadb" if s.contains("://") => Ok(s.to_string()),
        _ => Err(format!(
            "unsupported storage URL '{s}': use sqlite://PATH or mysql://user:pass@host:3306/db"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_message_size("600MiB").is_err());
        assert!(parse_frame_max("4096").is_err());
        assert_eq!(parse_frame_max("0"), Ok(0));
        assert!(parse_storage_url("postgres://x").is_err());
        assert_eq!(parse_sync("confirm"), Ok(SyncMode::Confirm));
        assert_eq!(parse_sync("periodic:200"), Ok(SyncMode::Periodic(200)));
        assert!(parse_sync("periodic:0").is_err());
        assert!(parse_sync("always").is_err());
        assert!(parse_storage_url("mysql://u:p@h:3306/db").is_ok());
    }

    #[test]
    fn defaults_match_rabbitmq() {
        let c = Config::parse_from(["warren"]);
        assert_eq!(c.frame_max, 131_072);
        assert_eq!(c.channel_max, 2047);
        assert_eq!(c.heartbeat, 60);
        assert_eq!(c.max_message_size, 128 << 20);
        assert_eq!(c.loopback_users, vec!["guest".to_string()]);
    }
}
