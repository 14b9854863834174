//! Tutorial 4, "Routing" (consumer): bind a server-named exclusive queue to the direct exchange
//! `direct_logs` once per severity given as argument, and print the matching log messages.

use anyhow::Result;
use futures_lite::StreamExt;
use lapin::{
    options::{BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{FieldTable, ShortString},
    ExchangeKind,
};

#[tokio::main]
async fn main() -> Result<()> {
    let severities = warren_examples::args()?;
    if severities.is_empty() {
        eprintln!("Usage: receive_logs_direct [info] [warning] [error]");
        std::process::exit(1);
    }
    let limit = warren_examples::exit_after()?;

    let connection = warren_examples::connect("tutorial-4 receive_logs_direct").await?;
    let channel = connection.create_channel().await?;

    channel
        .exchange_declare(
            "direct_logs".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions::exclusive(),
            FieldTable::default(),
        )
        .await?;
    let queue_name = queue.name().clone();

    for severity in &severities {
        channel
            .queue_bind(
                queue_name.clone(),
                "direct_logs".into(),
                ShortString::try_new(severity.as_str())?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }

    let mut consumer = channel
        .basic_consume(
            queue_name,
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    println!(" [*] Waiting for logs. To exit press CTRL+C");

    let mut handled = 0;
    while !warren_examples::done(limit, handled) {
        let Some(delivery) = consumer.next().await else {
            break;
        };
        let delivery = delivery?;
        println!(
            " [x] {}:{}",
            delivery.routing_key,
            String::from_utf8_lossy(&delivery.data)
        );
        handled += 1;
    }

    connection.close(200, "OK".into()).await?;
    Ok(())
}
