//! Tutorial 6, "RPC" (server): answer requests on the queue `rpc_queue` with fib(n), replying
//! to each request's `reply_to` queue with its `correlation_id`, one request at a time.

use anyhow::Result;
use futures_lite::StreamExt;
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        QueueDeclareOptions,
    },
    types::FieldTable,
    BasicProperties,
};

/// The n-th Fibonacci number (fib(0) = 0, fib(1) = 1), or `None` if it does not fit in a u128.
fn fib(n: u32) -> Option<u128> {
    if n == 0 {
        return Some(0);
    }
    let (mut previous, mut current) = (0u128, 1u128);
    for _ in 1..n {
        (previous, current) = (current, previous.checked_add(current)?);
    }
    Some(current)
}

/// The reply body for a request body: fib(n) in decimal, or an error text.
fn answer(request: &str) -> String {
    match request.trim().parse::<u32>() {
        Ok(n) => {
            println!(" [.] fib({n})");
            match fib(n) {
                Some(value) => value.to_string(),
                None => format!("error: fib({n}) does not fit in 128 bits"),
            }
        }
        Err(err) => {
            eprintln!(" [!] bad request {request:?}: {err}");
            format!("error: expected a non-negative integer, got {request:?}")
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let limit = warren_examples::exit_after()?;
    let connection = warren_examples::connect("tutorial-6 rpc_server").await?;
    let channel = connection.create_channel().await?;

    channel
        .queue_declare(
            "rpc_queue".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Spread the load evenly when several servers consume from rpc_queue.
    channel.basic_qos(1, BasicQosOptions::default()).await?;

    let mut consumer = channel
        .basic_consume(
            "rpc_queue".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    println!(" [x] Awaiting RPC requests");

    let mut handled = 0;
    while !warren_examples::done(limit, handled) {
        let Some(delivery) = consumer.next().await else {
            break;
        };
        let delivery = delivery?;
        let response = answer(&String::from_utf8_lossy(&delivery.data));

        match delivery.properties.reply_to() {
            Some(reply_to) => {
                let mut properties = BasicProperties::default();
                if let Some(correlation_id) = delivery.properties.correlation_id() {
                    properties = properties.with_correlation_id(correlation_id.clone());
                }
                channel
                    .basic_publish(
                        "".into(),
                        reply_to.clone(),
                        BasicPublishOptions::default(),
                        response.as_bytes(),
                        properties,
                    )
                    .await?
                    .await?;
            }
            None => eprintln!(" [!] request has no reply_to, dropping the answer"),
        }

        delivery.ack(BasicAckOptions::default()).await?;
        handled += 1;
    }

    connection.close(200, "OK".into()).await?;
    Ok(())
}
