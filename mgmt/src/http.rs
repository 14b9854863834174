//! HTTP plumbing shared by every endpoint: RabbitMQ's error bodies (`ApiError`), Basic
//! authentication against the broker's users with RabbitMQ's tags (`Caller`), and request
//! bodies parsed as JSON with RabbitMQ's 400 answers.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Value};
use warren_core::admin::{Admin, AdminError};

/// A failed request, answered with RabbitMQ's status and `{"error": ..., "reason": ...}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: String,
    pub reason: String,
    /// A reason RabbitMQ gives as a JSON term rather than text (it replaces `reason`).
    pub reason_term: Option<Value>,
}

impl ApiError {
    pub fn not_found() -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            error: "Object Not Found".into(),
            reason: "Not Found".into(),
            reason_term: None,
        }
    }

    pub fn bad_request(reason: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error: "bad_request".into(),
            reason: reason.into(),
            reason_term: None,
        }
    }

    /// A failed login: 401 with a Basic challenge.
    pub fn login_failed() -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            error: "not_authorized".into(),
            reason: "Login failed".into(),
            reason_term: None,
        }
    }

    /// No credentials at all: 401, an empty body and a Basic challenge.
    pub fn no_credentials() -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            error: String::new(),
            reason: String::new(),
            reason_term: None,
        }
    }

    /// Logged in but not allowed (a missing tag, a vhost without permissions): RabbitMQ
    /// answers 401 with `not_authorised` (British spelling) and no challenge.
    pub fn unauthorized(reason: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            error: "not_authorised".into(),
            reason: reason.into(),
            reason_term: None,
        }
    }

    pub fn pagination(reason: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error: "invalid_pagination_parameters".into(),
            reason: reason.into(),
            reason_term: None,
        }
    }

    pub fn forbidden(reason: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::FORBIDDEN,
            error: "not_authorized".into(),
            reason: reason.into(),
            reason_term: None,
        }
    }

    pub fn unavailable(reason: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: "service_unavailable".into(),
            reason: reason.into(),
            reason_term: None,
        }
    }

    /// RabbitMQ's 404 for a PUT into a vhost that does not exist.
    pub fn vhost_not_found() -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            error: "not_found".into(),
            reason: "vhost_not_found".into(),
            reason_term: None,
        }
    }

    /// 400 with a JSON term as the reason (RabbitMQ's `["no_such_user", "bob"]`).
    pub fn bad_request_term(term: Value) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error: "bad_request".into(),
            reason: String::new(),
            reason_term: Some(term),
        }
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            error: "Method Not Allowed".into(),
            reason: "Method Not Allowed".into(),
            reason_term: None,
        }
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::NotFound => ApiError::not_found(),
            AdminError::BadRequest(r) => ApiError::bad_request(r),
            AdminError::Refused => ApiError::unauthorized("Access refused."),
            AdminError::Store(r) => {
                tracing::error!("management API: {r}");
                ApiError::unavailable(r)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = if self.error.is_empty() {
            self.status.into_response()
        } else {
            (
                self.status,
                axum::Json(json!({
                    "error": self.error,
                    "reason": self.reason_term.unwrap_or(Value::String(self.reason)),
                })),
            )
                .into_response()
        };
        if self.status == StatusCode::UNAUTHORIZED && self.error != "not_authorised" {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"RabbitMQ Management\""),
            );
        }
        r
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub admin: Admin,
    /// Every listener of the node: (protocol as RabbitMQ names it, address).
    pub listeners: Vec<(&'static str, std::net::SocketAddr)>,
}

impl AppState {
    /// The cluster's name: the `cluster_name` global parameter, or the node's name.
    pub fn cluster_name(&self) -> String {
        self.admin
            .global_parameters()
            .into_iter()
            .find(|(n, _)| n == "cluster_name")
            .and_then(|(_, v)| serde_json::from_str::<String>(&v).ok())
            .unwrap_or_else(crate::views::node_name)
    }

    /// The management listeners, as RabbitMQ's `contexts`.
    pub fn http_contexts(&self) -> Value {
        Value::Array(
            self.listeners
                .iter()
                .filter(|(p, _)| *p == "http" || *p == "https")
                .map(|(p, a)| {
                    json!({
                        "node": crate::views::node_name(),
                        "description": "RabbitMQ Management",
                        "path": "/",
                        "port": a.port().to_string(),
                        "protocol": p,
                    })
                })
                .collect(),
        )
    }
}

/// What a user's tags allow (RabbitMQ's management tags).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tags {
    pub administrator: bool,
    pub monitoring: bool,
    pub policymaker: bool,
    pub management: bool,
}

impl Tags {
    pub fn parse(tags: &[String]) -> Tags {
        let has = |t: &str| tags.iter().any(|x| x == t);
        let administrator = has("administrator");
        let monitoring = administrator || has("monitoring");
        let policymaker = administrator || has("policymaker");
        Tags {
            administrator,
            monitoring,
            policymaker,
            management: monitoring || policymaker || has("management"),
        }
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub tags: Vec<String>,
    pub can: Tags,
    /// Vhosts the caller has permissions in (None: sees every vhost, as monitoring users do).
    pub vhosts: Option<Vec<String>>,
}

impl Caller {
    /// May the caller see objects of `vhost`?
    pub fn sees(&self, vhost: &str) -> bool {
        self.vhosts
            .as_ref()
            .is_none_or(|v| v.iter().any(|x| x == vhost))
    }

    /// 403 unless the caller may use `vhost` (a vhost it cannot see is "not found" to it only
    /// if it does not exist: RabbitMQ answers 401 "Access refused." for one it lacks).
    pub fn check_vhost(&self, vhost: &str) -> ApiResult<()> {
        if self.sees(vhost) {
            Ok(())
        } else {
            Err(ApiError::unauthorized("Access refused."))
        }
    }

    pub fn require_admin(&self) -> ApiResult<()> {
        if self.can.administrator {
            Ok(())
        } else {
            Err(ApiError::unauthorized("Not administrator user"))
        }
    }

    pub fn require_monitor(&self) -> ApiResult<()> {
        if self.can.monitoring {
            Ok(())
        } else {
            Err(ApiError::unauthorized("Not monitor user"))
        }
    }

    pub fn require_policymaker(&self) -> ApiResult<()> {
        if self.can.policymaker {
            Ok(())
        } else {
            Err(ApiError::unauthorized("Not policymaker user"))
        }
    }
}

fn credentials(parts: &Parts) -> Option<(String, String)> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_string(), pass.to_string()))
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> ApiResult<Caller> {
        let Some((name, pass)) = credentials(parts) else {
            return Err(ApiError::no_credentials());
        };
        // loopback_users (guest by default) log in from this host only, over HTTP as over AMQP;
        // without the peer's address the login is treated as remote.
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip())
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let attempts = &state.admin.broker.auth_attempts.http;
        let user = match state.admin.login(&name, &pass, peer).await {
            Ok(u) => u,
            Err(e) => {
                attempts.record(false);
                return Err(ApiError::from(e));
            }
        };
        let Some(user) = user else {
            attempts.record(false);
            tracing::warn!(user = %name, %peer, "HTTP access denied: login failed");
            return Err(ApiError::login_failed());
        };
        let tags = warren_core::broker::split_tags(&user.tags);
        let can = Tags::parse(&tags);
        // As RabbitMQ, a login refused for want of the management tag is a failed attempt.
        attempts.record(can.management);
        if !can.management {
            tracing::warn!(user = %name, "HTTP access denied: no management tag");
            return Err(ApiError::unauthorized("Not management user"));
        }
        let vhosts = if can.monitoring {
            None
        } else {
            let perms = state.admin.permissions().await.map_err(ApiError::from)?;
            Some(
                perms
                    .into_iter()
                    .filter(|p| p.user == name)
                    .map(|p| p.vhost)
                    .collect(),
            )
        };
        Ok(Caller {
            name,
            tags,
            can,
            vhosts,
        })
    }
}

/// Parses a request body as a JSON object (RabbitMQ's 400 for anything else). An empty body
/// is an empty object.
pub fn object(body: &[u8]) -> ApiResult<serde_json::Map<String, Value>> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request("not_json")),
        Err(_) => Err(ApiError::bad_request("not_json")),
    }
}

/// A string member of a request body.
pub fn str_field<'a>(m: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a str> {
    m.get(key).and_then(Value::as_str)
}

/// A boolean member, given as a JSON boolean or as "true"/"false" (rabbitmqadmin sends
/// strings).
pub fn bool_field(m: &serde_json::Map<String, Value>, key: &str, default: bool) -> ApiResult<bool> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "true" => Ok(true),
        Some(Value::String(s)) if s == "false" => Ok(false),
        Some(_) => Err(ApiError::bad_request(format!(
            "{key} must be true or false"
        ))),
    }
}

/// 201 Created or 204 No Content, as RabbitMQ answers a PUT.
pub fn created_or_updated(created: bool) -> Response {
    if created {
        StatusCode::CREATED.into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    }
}
