//! Helpers shared by the RabbitMQ tutorial programs: broker URL, connecting, `EXIT_AFTER`.

use anyhow::{bail, Context, Result};
use lapin::{Connection, ConnectionProperties};
use std::env::{self, VarError};

/// Broker URL used when `AMQP_URL` is not set: Warren (or RabbitMQ) on localhost, vhost `/`.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The broker URL: env `AMQP_URL`, or [`DEFAULT_AMQP_URL`] when it is unset or empty.
pub fn amqp_url() -> Result<String> {
    match env::var("AMQP_URL") {
        Ok(url) if !url.trim().is_empty() => Ok(url),
        Ok(_) | Err(VarError::NotPresent) => Ok(DEFAULT_AMQP_URL.to_owned()),
        Err(VarError::NotUnicode(_)) => bail!("AMQP_URL is not valid UTF-8"),
    }
}

/// Open a connection to [`amqp_url`], naming it `name` (visible in the broker's connection list).
pub async fn connect(name: &str) -> Result<Connection> {
    let url = amqp_url()?;
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    // The URL is deliberately left out of the error: it usually carries a password.
    Connection::connect(&url, properties)
        .await
        .context("cannot connect to the AMQP broker (set AMQP_URL to change the address)")
}

/// Env `EXIT_AFTER=N`: a consumer stops after handling N messages; unset means run forever.
pub fn exit_after() -> Result<Option<u64>> {
    let raw = match env::var("EXIT_AFTER") {
        Ok(raw) if !raw.trim().is_empty() => raw,
        Ok(_) | Err(VarError::NotPresent) => return Ok(None),
        Err(VarError::NotUnicode(_)) => bail!("EXIT_AFTER is not valid UTF-8"),
    };
    let n: u64 = raw
        .trim()
        .parse()
        .with_context(|| format!("EXIT_AFTER must be a positive integer, got {raw:?}"))?;
    if n == 0 {
        bail!("EXIT_AFTER must be a positive integer, got 0");
    }
    Ok(Some(n))
}

/// Whether a consumer that has handled `handled` messages should stop, given [`exit_after`].
pub fn done(limit: Option<u64>, handled: u64) -> bool {
    limit.is_some_and(|n| handled >= n)
}

/// The command-line arguments after the program name.
pub fn args() -> Result<Vec<String>> {
    env::args_os()
        .skip(1)
        .map(|arg| {
            arg.into_string()
                .map_err(|arg| anyhow::anyhow!("argument {arg:?} is not valid UTF-8"))
        })
        .collect()
}
