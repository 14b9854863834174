//! `warrenctl`: manage a Warren node from the command line with `rabbitmqctl`'s command names,
//! over the management HTTP API (so it works from any host that can reach port 15672).
//! Lists print as tab-separated tables (or JSON with `--formatter json`); `-q` drops the
//! informational lines. `warrenctl ping` exits 0 only when the node answers, which makes it
//! the Docker health check.

use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "warrenctl",
    version,
    about = "Manage a Warren node (rabbitmqctl's commands, over the HTTP API)"
)]
struct Cli {
    /// The management API's base URL.
    #[arg(
        long,
        global = true,
        env = "WARRENCTL_URL",
        default_value = "http://localhost:15672"
    )]
    url: String,
    /// User for the API (needs the administrator tag for most commands).
    // Ids distinct from the subcommands' own `name` and `password` arguments (clap shares
    // global arguments with subcommands by id).
    #[arg(
        long = "username",
        short = 'u',
        id = "api_username",
        global = true,
        env = "WARRENCTL_USER",
        default_value = "guest"
    )]
    username: String,
    #[arg(
        long = "password",
        id = "api_password",
        global = true,
        env = "WARRENCTL_PASSWORD",
        default_value = "guest"
    )]
    api_password: String,
    /// Virtual host for commands that work in one.
    #[arg(short = 'p', long = "vhost", global = true, default_value = "/")]
    vhost: String,
    /// Quiet: no informational lines.
    #[arg(short = 'q', long, global = true)]
    quiet: bool,
    /// Output format: table (default) or json.
    #[arg(long, global = true, default_value = "table")]
    formatter: String,
    /// Leave out the header row of tables.
    #[arg(long, global = true)]
    no_table_headers: bool,
    /// CA certificate (PEM) that an https:// URL's server certificate is verified against,
    /// beside the system's roots.
    #[arg(long, global = true, env = "WARRENCTL_CACERT")]
    cacert: Option<std::path::PathBuf>,
    /// Seconds to wait for an answer.
    #[arg(long, short = 't', global = true, default_value_t = 60)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[command(rename_all = "snake_case")]
enum Command {
    /// Creates a user (no tags).
    AddUser {
        name: String,
        password: String,
    },
    DeleteUser {
        name: String,
    },
    ChangePassword {
        name: String,
        password: String,
    },
    /// Replaces a user's tags (none clears them).
    SetUserTags {
        name: String,
        tags: Vec<String>,
    },
    ListUsers,
    AddVhost {
        name: String,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        tags: Option<String>,
        #[arg(long = "default-queue-type")]
        default_queue_type: Option<String>,
    },
    DeleteVhost {
        name: String,
    },
    ListVhosts {
        columns: Vec<String>,
    },
    /// Sets a user's configure, write and read patterns in the vhost (-p).
    SetPermissions {
        user: String,
        configure: String,
        write: String,
        read: String,
    },
    ClearPermissions {
        user: String,
    },
    ListPermissions,
    ListUserPermissions {
        user: String,
    },
    /// Sets a vhost limit: max-connections or max-queues, as JSON ('{"max-queues": 10}').
    SetVhostLimits {
        definition: String,
    },
    ClearVhostLimits,
    /// Sets a policy in the vhost (-p): NAME PATTERN DEFINITION (JSON).
    SetPolicy {
        name: String,
        pattern: String,
        definition: String,
        #[arg(long, default_value_t = 0)]
        priority: i64,
        /// queues, exchanges or all.
        #[arg(long = "apply-to", default_value = "all")]
        apply_to: String,
    },
    ClearPolicy {
        name: String,
    },
    ListPolicies,
    /// Sets an operator policy in the vhost (-p): NAME PATTERN DEFINITION (JSON).
    SetOperatorPolicy {
        name: String,
        pattern: String,
        definition: String,
        #[arg(long, default_value_t = 0)]
        priority: i64,
        #[arg(long = "apply-to", default_value = "queues")]
        apply_to: String,
    },
    ClearOperatorPolicy {
        name: String,
    },
    ListOperatorPolicies,
    /// Imports a definitions file (RabbitMQ's JSON format); "-" reads standard input.
    ImportDefinitions {
        file: String,
    },
    /// Exports the node's definitions to a file; "-" writes standard output.
    ExportDefinitions {
        file: String,
    },
    ListQueues {
        columns: Vec<String>,
    },
    ListExchanges {
        columns: Vec<String>,
    },
    ListBindings {
        columns: Vec<String>,
    },
    ListConnections {
        columns: Vec<String>,
    },
    ListChannels {
        columns: Vec<String>,
    },
    ListConsumers {
        columns: Vec<String>,
    },
    /// Closes a connection (by name, as list_connections shows it) with 320 and `reason`.
    CloseConnection {
        name: String,
        reason: String,
    },
    PurgeQueue {
        queue: String,
    },
    DeleteQueue {
        queue: String,
        #[arg(long = "if-unused")]
        if_unused: bool,
        #[arg(long = "if-empty")]
        if_empty: bool,
    },
    /// The node's status: versions, listeners, memory, disk, file descriptors.
    Status,
    /// Exits 0 if the node answers (the Docker health check).
    Ping,
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

struct Api {
    http: reqwest::blocking::Client,
    base: String,
    user: String,
    pass: String,
}

impl Api {
    fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Result<Value> {
        let url = format!("{}/api{}", self.base.trim_end_matches('/'), path);
        let mut r = self
            .http
            .request(method, &url)
            .basic_auth(&self.user, Some(&self.pass));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().with_context(|| format!("cannot reach {url}"))?;
        let status = resp.status();
        let text = resp.text().unwrap_or_default();
        let v: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let reason = v
                .get("reason")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            bail!(
                "{} {}: {reason}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            );
        }
        Ok(v)
    }

    fn get(&self, path: &str) -> Result<Value> {
        self.send(reqwest::Method::GET, path, None, &[])
    }

    fn put(&self, path: &str, body: Value) -> Result<Value> {
        self.send(reqwest::Method::PUT, path, Some(body), &[])
    }

    fn delete(&self, path: &str) -> Result<Value> {
        self.send(reqwest::Method::DELETE, path, None, &[])
    }
}

/// A cell as rabbitmqctl prints it.
fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| cell(Some(x)))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

struct Out<'a> {
    cli: &'a Cli,
}

impl Out<'_> {
    fn info(&self, line: &str) {
        if !self.cli.quiet && self.cli.formatter != "json" {
            println!("{line}");
        }
    }

    fn table(&self, items: &Value, columns: &[String]) {
        let empty = Vec::new();
        let rows = items.as_array().unwrap_or(&empty);
        if self.cli.formatter == "json" {
            let out: Vec<Value> = rows
                .iter()
                .map(|r| {
                    let mut m = serde_json::Map::new();
                    for c in columns {
                        m.insert(c.clone(), at(r, c).cloned().unwrap_or(Value::Null));
                    }
                    Value::Object(m)
                })
                .collect();
            println!("{}", Value::Array(out));
            return;
        }
        if !self.cli.no_table_headers {
            println!("{}", columns.join("\t"));
        }
        for r in rows {
            let cells: Vec<String> = columns.iter().map(|c| cell(at(r, c))).collect();
            println!("{}", cells.join("\t"));
        }
    }
}

fn cols(given: &[String], default: &[&str]) -> Vec<String> {
    if given.is_empty() {
        default.iter().map(|s| s.to_string()).collect()
    } else {
        given.to_vec()
    }
}

/// rabbitmqctl's column names for bindings, from the API's.
fn binding_rows(v: Value) -> Value {
    let rows = v.as_array().cloned().unwrap_or_default();
    Value::Array(
        rows.into_iter()
            .map(|b| {
                json!({
                    "source_name": b["source"],
                    "source_kind": "exchange",
                    "destination_name": b["destination"],
                    "destination_kind": b["destination_type"],
                    "routing_key": b["routing_key"],
                    "arguments": b["arguments"],
                    "vhost": b["vhost"],
                })
            })
            .collect(),
    )
}

fn run(cli: &Cli) -> Result<()> {
    let mut http =
        reqwest::blocking::Client::builder().timeout(std::time::Duration::from_secs(cli.timeout));
    if let Some(path) = &cli.cacert {
        let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("{}: not a PEM certificate", path.display()))?
        {
            http = http.add_root_certificate(cert);
        }
    }
    let api = Api {
        http: http.build()?,
        base: cli.url.clone(),
        user: cli.username.clone(),
        pass: cli.api_password.clone(),
    };
    let out = Out { cli };
    let vh = enc(&cli.vhost);
    match &cli.command {
        Command::AddUser { name, password } => {
            out.info(&format!("Adding user \"{name}\" ..."));
            if api.get(&format!("/users/{}", enc(name))).is_ok() {
                bail!("user \"{name}\" already exists");
            }
            api.put(
                &format!("/users/{}", enc(name)),
                json!({"password": password, "tags": ""}),
            )?;
        }
        Command::DeleteUser { name } => {
            out.info(&format!("Deleting user \"{name}\" ..."));
            api.delete(&format!("/users/{}", enc(name)))?;
        }
        Command::ChangePassword { name, password } => {
            out.info(&format!("Changing password for user \"{name}\" ..."));
            let u = api.get(&format!("/users/{}", enc(name)))?;
            api.put(
                &format!("/users/{}", enc(name)),
                json!({"password": password, "tags": u["tags"]}),
            )?;
        }
        Command::SetUserTags { name, tags } => {
            out.info(&format!(
                "Setting tags for user \"{name}\" to [{}] ...",
                tags.join(", ")
            ));
            let u = api.get(&format!("/users/{}", enc(name)))?;
            api.put(
                &format!("/users/{}", enc(name)),
                json!({
                    "password_hash": u["password_hash"],
                    "hashing_algorithm": u["hashing_algorithm"],
                    "tags": tags.join(","),
                }),
            )?;
        }
        Command::ListUsers => {
            out.info("Listing users ...");
            out.table(&api.get("/users")?, &cols(&[], &["name", "tags"]));
        }
        Command::AddVhost {
            name,
            description,
            tags,
            default_queue_type,
        } => {
            out.info(&format!("Adding vhost \"{name}\" ..."));
            let mut body = serde_json::Map::new();
            if let Some(d) = description {
                body.insert("description".into(), json!(d));
            }
            if let Some(t) = tags {
                body.insert("tags".into(), json!(t));
            }
            if let Some(q) = default_queue_type {
                body.insert("default_queue_type".into(), json!(q));
            }
            api.put(&format!("/vhosts/{}", enc(name)), Value::Object(body))?;
        }
        Command::DeleteVhost { name } => {
            out.info(&format!("Deleting vhost \"{name}\" ..."));
            api.delete(&format!("/vhosts/{}", enc(name)))?;
        }
        Command::ListVhosts { columns } => {
            out.info("Listing vhosts ...");
            out.table(&api.get("/vhosts")?, &cols(columns, &["name"]));
        }
        Command::SetPermissions {
            user,
            configure,
            write,
            read,
        } => {
            out.info(&format!(
                "Setting permissions for user \"{user}\" in vhost \"{}\" ...",
                cli.vhost
            ));
            api.put(
                &format!("/permissions/{vh}/{}", enc(user)),
                json!({"configure": configure, "write": write, "read": read}),
            )?;
        }
        Command::ClearPermissions { user } => {
            out.info(&format!(
                "Clearing permissions for user \"{user}\" in vhost \"{}\" ...",
                cli.vhost
            ));
            api.delete(&format!("/permissions/{vh}/{}", enc(user)))?;
        }
        Command::ListPermissions => {
            out.info(&format!(
                "Listing permissions for vhost \"{}\" ...",
                cli.vhost
            ));
            out.table(
                &api.get(&format!("/vhosts/{vh}/permissions"))?,
                &cols(&[], &["user", "configure", "write", "read"]),
            );
        }
        Command::ListUserPermissions { user } => {
            out.info(&format!("Listing permissions for user \"{user}\" ..."));
            out.table(
                &api.get(&format!("/users/{}/permissions", enc(user)))?,
                &cols(&[], &["vhost", "configure", "write", "read"]),
            );
        }
        Command::SetVhostLimits { definition } => {
            out.info(&format!("Applying limits to vhost \"{}\" ...", cli.vhost));
            let def: Value = serde_json::from_str(definition)
                .map_err(|e| anyhow!("the definition is not JSON: {e}"))?;
            let m = def
                .as_object()
                .ok_or_else(|| anyhow!("the definition must be an object"))?;
            for (k, v) in m {
                api.put(
                    &format!("/vhost-limits/{vh}/{}", enc(k)),
                    json!({"value": v}),
                )?;
            }
        }
        Command::ClearVhostLimits => {
            out.info(&format!("Clearing limits of vhost \"{}\" ...", cli.vhost));
            let l = api.get(&format!("/vhost-limits/{vh}"))?;
            if let Some(m) = l
                .get(0)
                .and_then(|x| x.get("value"))
                .and_then(Value::as_object)
            {
                for k in m.keys() {
                    api.delete(&format!("/vhost-limits/{vh}/{}", enc(k)))?;
                }
            }
        }
        Command::SetPolicy {
            name,
            pattern,
            definition,
            priority,
            apply_to,
        }
        | Command::SetOperatorPolicy {
            name,
            pattern,
            definition,
            priority,
            apply_to,
        } => {
            let kind = if matches!(cli.command, Command::SetPolicy { .. }) {
                "policies"
            } else {
                "operator-policies"
            };
            out.info(&format!(
                "Setting policy \"{name}\" for pattern \"{pattern}\" to \"{definition}\" with priority \"{priority}\" for vhost \"{}\" ...",
                cli.vhost
            ));
            let def: Value = serde_json::from_str(definition)
                .map_err(|e| anyhow!("the definition is not JSON: {e}"))?;
            api.put(
                &format!("/{kind}/{vh}/{}", enc(name)),
                json!({"pattern": pattern, "definition": def, "priority": priority, "apply-to": apply_to}),
            )?;
        }
        Command::ClearPolicy { name } | Command::ClearOperatorPolicy { name } => {
            let kind = if matches!(cli.command, Command::ClearPolicy { .. }) {
                "policies"
            } else {
                "operator-policies"
            };
            out.info(&format!(
                "Clearing policy \"{name}\" on vhost \"{}\" ...",
                cli.vhost
            ));
            api.delete(&format!("/{kind}/{vh}/{}", enc(name)))?;
        }
        Command::ListPolicies | Command::ListOperatorPolicies => {
            let kind = if matches!(cli.command, Command::ListPolicies) {
                "policies"
            } else {
                "operator-policies"
            };
            out.info(&format!("Listing policies for vhost \"{}\" ...", cli.vhost));
            out.table(
                &api.get(&format!("/{kind}/{vh}"))?,
                &cols(
                    &[],
                    &[
                        "vhost",
                        "name",
                        "pattern",
                        "apply-to",
                        "definition",
                        "priority",
                    ],
                ),
            );
        }
        Command::ImportDefinitions { file } => {
            out.info(&format!(
                "Importing definitions in JSON from a file at \"{file}\" ..."
            ));
            let text = if file == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                s
            } else {
                std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?
            };
            let d: Value =
                serde_json::from_str(&text).map_err(|e| anyhow!("{file} is not JSON: {e}"))?;
            api.send(reqwest::Method::POST, "/definitions", Some(d), &[])?;
            out.info("Definitions imported.");
        }
        Command::ExportDefinitions { file } => {
            let d = api.get("/definitions")?;
            let text = serde_json::to_string_pretty(&d)?;
            if file == "-" {
                println!("{text}");
            } else {
                out.info(&format!(
                    "Exporting definitions in JSON to a file at \"{file}\" ..."
                ));
                std::fs::write(file, text).with_context(|| format!("cannot write {file}"))?;
            }
        }
        Command::ListQueues { columns } => {
            out.info(&format!("Listing queues for vhost {} ...", cli.vhost));
            out.table(
                &api.get(&format!("/queues/{vh}"))?,
                &cols(columns, &["name", "messages"]),
            );
        }
        Command::ListExchanges { columns } => {
            out.info(&format!("Listing exchanges for vhost {} ...", cli.vhost));
            out.table(
                &api.get(&format!("/exchanges/{vh}"))?,
                &cols(columns, &["name", "type"]),
            );
        }
        Command::ListBindings { columns } => {
            out.info(&format!("Listing bindings for vhost {}...", cli.vhost));
            out.table(
                &binding_rows(api.get(&format!("/bindings/{vh}"))?),
                &cols(
                    columns,
                    &[
                        "source_name",
                        "source_kind",
                        "destination_name",
                        "destination_kind",
                        "routing_key",
                        "arguments",
                    ],
                ),
            );
        }
        Command::ListConnections { columns } => {
            out.info("Listing connections ...");
            out.table(
                &api.get("/connections")?,
                &cols(columns, &["user", "peer_host", "peer_port", "state"]),
            );
        }
        Command::ListChannels { columns } => {
            out.info("Listing channels ...");
            out.table(
                &api.get("/channels")?,
                &cols(
                    columns,
                    &["name", "user", "consumer_count", "messages_unacknowledged"],
                ),
            );
        }
        Command::ListConsumers { columns } => {
            out.info(&format!("Listing consumers in vhost {} ...", cli.vhost));
            out.table(
                &api.get(&format!("/consumers/{vh}"))?,
                &cols(
                    columns,
                    &[
                        "queue.name",
                        "channel_details.name",
                        "consumer_tag",
                        "ack_required",
                        "prefetch_count",
                        "active",
                        "arguments",
                    ],
                ),
            );
        }
        Command::CloseConnection { name, reason } => {
            out.info(&format!("Closing connection {name}, reason: {reason}..."));
            api.send(
                reqwest::Method::DELETE,
                &format!("/connections/{}", enc(name)),
                None,
                &[("X-Reason", reason)],
            )?;
        }
        Command::PurgeQueue { queue } => {
            out.info(&format!(
                "Purging queue '{queue}' in vhost '{}' ...",
                cli.vhost
            ));
            api.delete(&format!("/queues/{vh}/{}/contents", enc(queue)))?;
        }
        Command::DeleteQueue {
            queue,
            if_unused,
            if_empty,
        } => {
            out.info(&format!(
                "Deleting queue '{queue}' on vhost '{}' ...",
                cli.vhost
            ));
            api.delete(&format!(
                "/queues/{vh}/{}?if-unused={if_unused}&if-empty={if_empty}",
                enc(queue)
            ))?;
        }
        Command::Status => {
            let o = api.get("/overview")?;
            let node = o["node"].as_str().unwrap_or("").to_string();
            let n = api.get(&format!("/nodes/{}", enc(&node)))?;
            if cli.formatter == "json" {
                println!("{}", json!({"overview": o, "node": n}));
                return Ok(());
            }
            out.info(&format!("Status of node {node} ..."));
            println!("Runtime\n");
            println!("Product name: {}", cell(o.get("product_name")));
            println!("Product version: {}", cell(o.get("product_version")));
            println!(
                "RabbitMQ version (compatible): {}",
                cell(o.get("rabbitmq_version"))
            );
            println!("Node name: {node}");
            println!(
                "Uptime (seconds): {}",
                n["uptime"].as_u64().unwrap_or(0) / 1000
            );
            println!("\nMemory\n");
            println!("Resident memory (bytes): {}", cell(n.get("mem_used")));
            println!(
                "Memory high watermark (bytes): {}",
                cell(n.get("mem_limit"))
            );
            println!("\nFree Disk Space\n");
            println!("Free disk space (bytes): {}", cell(n.get("disk_free")));
            println!("\nFile Descriptors\n");
            println!(
                "Used: {}, limit: {}",
                cell(n.get("fd_used")),
                cell(n.get("fd_total"))
            );
            println!("\nListeners\n");
            for l in o["listeners"].as_array().cloned().unwrap_or_default() {
                println!(
                    "Interface: {}, port: {}, protocol: {}",
                    cell(l.get("ip_address")),
                    cell(l.get("port")),
                    cell(l.get("protocol"))
                );
            }
            println!("\nTotals\n");
            let t = &o["object_totals"];
            println!(
                "Connections: {}, channels: {}, queues: {}, consumers: {}",
                cell(t.get("connections")),
                cell(t.get("channels")),
                cell(t.get("queues")),
                cell(t.get("consumers"))
            );
        }
        Command::Ping => {
            out.info(
                "Will ping the node. This only checks if the node is running and its API answers.",
            );
            api.get("/health/checks/alarms")?;
            out.info("Ping succeeded");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::from(69)
        }
    }
}
