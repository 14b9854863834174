//! Definitions in RabbitMQ's format: export (users, vhosts, permissions, topic permissions,
//! parameters, global parameters, policies, queues, exchanges, bindings; the whole node or one
//! vhost) and import (the management API's POST, and `--load-definitions` at start). Files
//! exported by RabbitMQ 3.x and 4.x import (vhost metadata either flat or under `metadata`;
//! user tags as a list or a comma-separated string; `password_hash` with its algorithm, or a
//! plain `password`), and Warren's export imports into RabbitMQ.

use serde_json::{json, Map, Value};
use warren_core::admin::{Admin, AdminError};
use warren_core::vhost::{ExchangeDeclare, QueueDeclare, VhostMeta, OPERATOR_POLICY, POLICY};
use warren_storage::{PermissionRecord, TopicPermissionRecord};

use crate::json::{json_to_table, table_to_json};

/// What an import does with objects that exist already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// The management API's import: users, permissions, parameters and policies are replaced;
    /// queues and exchanges are declared (an inequivalent one is an error, as RabbitMQ's).
    Update,
    /// `--load-definitions` at start: only what is missing is created.
    Keep,
}

fn s<'a>(m: &'a Value, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

fn b(m: &Value, k: &str, default: bool) -> bool {
    match m.get(k) {
        Some(Value::Bool(x)) => *x,
        Some(Value::String(x)) => x == "true",
        _ => default,
    }
}

fn tags(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => warren_core::broker::split_tags(s),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .filter(|t| !t.is_empty())
            .collect(),
        _ => Vec::new(),
    }
}

fn parameter_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// Exports the node's definitions, or one vhost's (then without users, vhosts, permissions
/// and global parameters, and without `vhost` members, as RabbitMQ).
pub async fn export(admin: &Admin, vhost: Option<&str>) -> Result<Value, AdminError> {
    let vhosts: Vec<_> = match vhost {
        Some(v) => vec![admin.find_vhost(v).ok_or(AdminError::NotFound)?],
        None => admin.vhosts(),
    };
    let with_vhost = |mut o: Map<String, Value>, v: &str| {
        if vhost.is_none() {
            o.insert("vhost".into(), json!(v));
        }
        Value::Object(o)
    };
    let (mut parameters, mut policies, mut queues, mut exchanges, mut bindings) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for v in &vhosts {
        for (component, name, value) in v.parameters() {
            if component == POLICY {
                let mut p = parameter_value(&value);
                if let Value::Object(m) = &mut p {
                    m.insert("name".into(), json!(name));
                    if vhost.is_none() {
                        m.insert("vhost".into(), json!(v.name));
                    }
                }
                policies.push(p);
                continue;
            }
            parameters.push(json!({
                "value": parameter_value(&value),
                "vhost": v.name,
                "component": component,
                "name": name,
            }));
        }
        let mut qs = v.queues();
        qs.sort_by(|a, b| a.name().cmp(b.name()));
        for q in qs.iter().filter(|q| q.spec.exclusive_owner.is_none()) {
            let mut o = Map::new();
            o.insert("name".into(), json!(q.name()));
            o.insert("durable".into(), json!(q.spec.durable));
            o.insert("auto_delete".into(), json!(q.spec.auto_delete));
            o.insert("arguments".into(), table_to_json(&q.spec.arguments));
            queues.push(with_vhost(o, &v.name));
        }
        let mut xs = v.exchanges();
        xs.sort_by(|a, b| a.name.cmp(&b.name));
        for x in xs
            .iter()
            .filter(|x| !x.name.is_empty() && !x.name.starts_with("amq."))
        {
            let mut o = Map::new();
            o.insert("name".into(), json!(x.name));
            o.insert("type".into(), json!(x.type_name()));
            o.insert("durable".into(), json!(x.durable));
            o.insert("auto_delete".into(), json!(x.auto_delete));
            o.insert("internal".into(), json!(x.internal));
            let mut args = x.arguments.clone();
            if x.delay.get().is_some() {
                // A delayed exchange is declared with its routing type as x-delayed-type.
                args.insert(
                    "x-delayed-type".into(),
                    warren_protocol::AMQPValue::LongString(x.kind.as_str().into()),
                );
            }
            o.insert("arguments".into(), table_to_json(&args));
            exchanges.push(with_vhost(o, &v.name));
        }
        for bd in admin
            .bindings(&v.name)
            .into_iter()
            .filter(|bd| !bd.source.is_empty())
        {
            if bd.destination_type == "queue"
                && v.queue(&bd.destination)
                    .is_some_and(|q| q.spec.exclusive_owner.is_some())
            {
                continue;
            }
            let mut o = Map::new();
            o.insert("source".into(), json!(bd.source));
            o.insert("destination".into(), json!(bd.destination));
            o.insert("destination_type".into(), json!(bd.destination_type));
            o.insert("routing_key".into(), json!(bd.routing_key));
            o.insert("arguments".into(), table_to_json(&bd.arguments));
            bindings.push(with_vhost(o, &v.name));
        }
    }
    let version = crate::RABBITMQ_VERSION;
    let mut out = Map::new();
    out.insert("rabbit_version".into(), json!(version));
    if vhost.is_none() {
        out.insert("rabbitmq_version".into(), json!(version));
        out.insert("product_name".into(), json!("Warren"));
        out.insert("product_version".into(), json!(env!("CARGO_PKG_VERSION")));
        let users = admin.users().await?;
        out.insert(
            "users".into(),
            Value::Array(users.iter().map(crate::views::user).collect()),
        );
        out.insert(
            "vhosts".into(),
            Value::Array(
                vhosts
                    .iter()
                    .map(|v| {
                        let m = v.meta();
                        json!({
                            "name": v.name,
                            "description": m.description,
                            "tags": m.tags,
                            "default_queue_type": m.default_queue_type,
                            "metadata": {"description": m.description, "tags": m.tags,
                                         "default_queue_type": m.default_queue_type},
                        })
                    })
                    .collect(),
            ),
        );
        out.insert(
            "permissions".into(),
            Value::Array(
                admin
                    .permissions()
                    .await?
                    .iter()
                    .map(crate::views::permission)
                    .collect(),
            ),
        );
        out.insert(
            "topic_permissions".into(),
            Value::Array(
                admin
                    .topic_permissions()
                    .await?
                    .iter()
                    .map(crate::views::topic_permission)
                    .collect(),
            ),
        );
    }
    out.insert("parameters".into(), Value::Array(parameters));
    if vhost.is_none() {
        out.insert(
            "global_parameters".into(),
            Value::Array(
                admin
                    .global_parameters()
                    .iter()
                    .map(|(n, v)| json!({"name": n, "value": parameter_value(v)}))
                    .collect(),
            ),
        );
    }
    out.insert("policies".into(), Value::Array(policies));
    out.insert("queues".into(), Value::Array(queues));
    out.insert("exchanges".into(), Value::Array(exchanges));
    out.insert("bindings".into(), Value::Array(bindings));
    Ok(Value::Object(out))
}

fn list<'a>(d: &'a Value, key: &str) -> &'a [Value] {
    d.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn err(what: &str, name: &str, e: impl std::fmt::Display) -> String {
    format!("{what} '{name}': {e}")
}

/// The parameter components an import may set (RabbitMQ's plugins' components are not here:
/// Warren has no federation or shovel).
const COMPONENTS: &[&str] = &["vhost-limits", OPERATOR_POLICY, POLICY];

/// Imports definitions (into `vhost` when given: its objects carry no `vhost` member then).
/// Stops at the first error, with a message naming the object.
pub async fn import(
    admin: &Admin,
    d: &Value,
    vhost: Option<&str>,
    existing: Existing,
    acting_user: &str,
) -> Result<(), String> {
    if !d.is_object() {
        return Err("definitions must be a JSON object".into());
    }
    let vh = |o: &Value| -> String {
        vhost
            .map(str::to_string)
            .or_else(|| s(o, "vhost").map(str::to_string))
            .unwrap_or_else(|| "/".to_string())
    };
    let keep = existing == Existing::Keep;
    for u in list(d, "users") {
        let name = s(u, "name").ok_or("a user without a name")?;
        if keep && admin.user(name).await.map_err(|e| e.to_string())?.is_some() {
            continue;
        }
        let hash = if let Some(p) = s(u, "password") {
            warren_core::auth::hash_password(p)
        } else {
            use base64::Engine;
            let h = s(u, "password_hash").unwrap_or("");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(h)
                .map_err(|_| err("user", name, "password_hash is not base64"))?;
            let algo = s(u, "hashing_algorithm").unwrap_or("rabbit_password_hashing_sha256");
            let want = match algo {
                "rabbit_password_hashing_sha256" => 36,
                "rabbit_password_hashing_sha512" => 68,
                other => {
                    return Err(err(
                        "user",
                        name,
                        format!("hashing algorithm {other} is not supported"),
                    ))
                }
            };
            if !bytes.is_empty() && bytes.len() != want {
                return Err(err(
                    "user",
                    name,
                    "password_hash has the wrong length for its algorithm",
                ));
            }
            bytes
        };
        admin
            .put_user(name, hash, &tags(u.get("tags")))
            .await
            .map_err(|e| err("user", name, e))?;
        // User limits, as RabbitMQ 3.x exports them (`"limits": {"max-connections": 5}`).
        if let Some(Value::Object(limits)) = u.get("limits") {
            for (k, v) in limits {
                if let Some(n) = v.as_i64() {
                    admin
                        .set_user_limit(name, k, Some(n))
                        .await
                        .map_err(|e| err("user", name, e))?;
                }
            }
        }
    }
    for v in list(d, "vhosts") {
        let name = s(v, "name").ok_or("a vhost without a name")?;
        if keep && admin.find_vhost(name).is_some() {
            continue;
        }
        let md = v.get("metadata").unwrap_or(v);
        let meta = VhostMeta {
            description: s(md, "description")
                .or(s(v, "description"))
                .unwrap_or("")
                .to_string(),
            tags: tags(md.get("tags").or(v.get("tags"))),
            default_queue_type: s(md, "default_queue_type")
                .or(s(v, "default_queue_type"))
                .filter(|t| matches!(*t, "classic" | "quorum"))
                .unwrap_or("classic")
                .to_string(),
        };
        admin
            .put_vhost(name, meta)
            .await
            .map_err(|e| err("vhost", name, e))?;
    }
    let perms = admin.permissions().await.map_err(|e| e.to_string())?;
    for p in list(d, "permissions") {
        let rec = PermissionRecord {
            vhost: vh(p),
            user: s(p, "user")
                .ok_or("a permission without a user")?
                .to_string(),
            configure: s(p, "configure").unwrap_or("").to_string(),
            write: s(p, "write").unwrap_or("").to_string(),
            read: s(p, "read").unwrap_or("").to_string(),
        };
        if keep
            && perms
                .iter()
                .any(|x| x.vhost == rec.vhost && x.user == rec.user)
        {
            continue;
        }
        let who = format!("{}@{}", rec.user, rec.vhost);
        admin
            .put_permission(rec)
            .await
            .map_err(|e| err("permission", &who, e))?;
    }
    let topics = admin.topic_permissions().await.map_err(|e| e.to_string())?;
    for p in list(d, "topic_permissions") {
        let rec = TopicPermissionRecord {
            vhost: vh(p),
            user: s(p, "user")
                .ok_or("a topic permission without a user")?
                .to_string(),
            exchange: s(p, "exchange").unwrap_or("amq.topic").to_string(),
            write: s(p, "write").unwrap_or("").to_string(),
            read: s(p, "read").unwrap_or("").to_string(),
        };
        if keep
            && topics
                .iter()
                .any(|x| x.vhost == rec.vhost && x.user == rec.user && x.exchange == rec.exchange)
        {
            continue;
        }
        let who = format!("{}@{}", rec.user, rec.vhost);
        admin
            .put_topic_permission(rec)
            .await
            .map_err(|e| err("topic permission", &who, e))?;
    }
    for p in list(d, "parameters") {
        let component = s(p, "component").ok_or("a parameter without a component")?;
        let name = s(p, "name").ok_or("a parameter without a name")?;
        if !COMPONENTS.contains(&component) {
            return Err(err(
                "parameter",
                name,
                format!("component '{component}' is not supported by Warren"),
            ));
        }
        let v = vh(p);
        if keep
            && admin
                .find_vhost(&v)
                .is_some_and(|x| x.parameter(component, name).is_some())
        {
            continue;
        }
        let value = p.get("value").cloned().unwrap_or(Value::Null).to_string();
        admin
            .set_parameter(&v, component, name, value)
            .await
            .map_err(|e| err("parameter", name, e))?;
    }
    for g in list(d, "global_parameters") {
        let name = s(g, "name").ok_or("a global parameter without a name")?;
        if keep && admin.global_parameters().iter().any(|(n, _)| n == name) {
            continue;
        }
        let value = g.get("value").cloned().unwrap_or(Value::Null).to_string();
        admin
            .set_global_parameter(name, value)
            .await
            .map_err(|e| err("global parameter", name, e))?;
    }
    for p in list(d, "policies") {
        let name = s(p, "name").ok_or("a policy without a name")?;
        let v = vh(p);
        if keep
            && admin
                .find_vhost(&v)
                .is_some_and(|x| x.parameter(POLICY, name).is_some())
        {
            continue;
        }
        let mut value = p.clone();
        if let Value::Object(m) = &mut value {
            m.remove("vhost");
            m.remove("name");
        }
        admin
            .set_parameter(&v, POLICY, name, value.to_string())
            .await
            .map_err(|e| err("policy", name, e))?;
    }
    for x in list(d, "exchanges") {
        let name = s(x, "name").ok_or("an exchange without a name")?;
        if name.is_empty() || name.starts_with("amq.") {
            continue;
        }
        let v = vh(x);
        if keep && admin.exchange(&v, name).is_some() {
            continue;
        }
        let decl = ExchangeDeclare {
            name: name.to_string(),
            kind: s(x, "type").unwrap_or("direct").to_string(),
            passive: false,
            durable: b(x, "durable", true),
            auto_delete: b(x, "auto_delete", false),
            internal: b(x, "internal", false),
            arguments: json_to_table(x.get("arguments").unwrap_or(&Value::Null))
                .map_err(|e| err("exchange", name, e.reason))?,
        };
        admin
            .declare_exchange(&v, decl)
            .await
            .map_err(|e| err("exchange", name, e))?;
    }
    for q in list(d, "queues") {
        let name = s(q, "name").ok_or("a queue without a name")?;
        let v = vh(q);
        if keep && admin.queue(&v, name).is_some() {
            continue;
        }
        let decl = QueueDeclare {
            name: name.to_string(),
            passive: false,
            durable: b(q, "durable", true),
            exclusive: false,
            auto_delete: b(q, "auto_delete", false),
            arguments: json_to_table(q.get("arguments").unwrap_or(&Value::Null))
                .map_err(|e| err("queue", name, e.reason))?,
        };
        admin
            .declare_queue(&v, acting_user, decl)
            .await
            .map_err(|e| err("queue", name, e))?;
    }
    for bd in list(d, "bindings") {
        let source = s(bd, "source").unwrap_or("");
        if source.is_empty() {
            continue;
        }
        let dest = s(bd, "destination").ok_or("a binding without a destination")?;
        let to_exchange = s(bd, "destination_type") == Some("exchange");
        let args = json_to_table(bd.get("arguments").unwrap_or(&Value::Null))
            .map_err(|e| err("binding", dest, e.reason))?;
        admin
            .bind(
                &vh(bd),
                source,
                to_exchange,
                dest,
                s(bd, "routing_key").unwrap_or(""),
                &args,
            )
            .await
            .map_err(|e| err("binding", &format!("{source} -> {dest}"), e))?;
    }
    Ok(())
}
