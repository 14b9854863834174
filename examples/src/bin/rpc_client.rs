//! Tutorial 6, "RPC" (client): ask the server on `rpc_queue` for fib(n) (`rpc_client [n]`,
//! default 30) and wait on a server-named exclusive callback queue for the matching reply.

use anyhow::{bail, Context, Result};
use futures_lite::StreamExt;
use lapin::{
    options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions},
    types::{FieldTable, ShortString},
    BasicProperties,
};
use std::time::{SystemTime, UNIX_EPOCH};

/// A correlation id unique enough for the tutorial: process id plus the current time.
fn correlation_id() -> Result<ShortString> {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    Ok(ShortString::try_new(format!(
        "{:x}-{nanos:x}",
        std::process::id()
    ))?)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = warren_examples::args()?;
    let n: u32 = match args.first() {
        Some(arg) => arg
            .parse()
            .with_context(|| format!("n must be a non-negative integer, got {arg:?}"))?,
        None => 30,
    };

    let connection = warren_examples::connect("tutorial-6 rpc_client").await?;
    let channel = connection.create_channel().await?;

    // The callback queue: server-named, exclusive to this connection.
    let callback_queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions::exclusive(),
            FieldTable::default(),
        )
        .await?;
    let callback_queue_name = callback_queue.name().clone();

    let mut replies = channel
        .basic_consume(
            callback_queue_name.clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;

    let correlation_id = correlation_id()?;
    println!(" [x] Requesting fib({n})");
    channel
        .basic_publish(
            "".into(),
            "rpc_queue".into(),
            BasicPublishOptions::default(),
            n.to_string().as_bytes(),
            BasicProperties::default()
                .with_reply_to(callback_queue_name)
                .with_correlation_id(correlation_id.clone()),
        )
        .await?
        .await?;

    loop {
        let Some(delivery) = replies.next().await else {
            bail!("the callback consumer was cancelled before a reply arrived");
        };
        let delivery = delivery?;
        // Replies to other (e.g. earlier, timed-out) requests are ignored.
        if delivery.properties.correlation_id().as_ref() == Some(&correlation_id) {
            println!(" [.] Got {}", String::from_utf8_lossy(&delivery.data));
            break;
        }
    }

    connection.close(200, "OK".into()).await?;
    Ok(())
}
