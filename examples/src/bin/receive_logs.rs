//! Tutorial 3, "Publish/Subscribe" (consumer): bind a server-named exclusive queue to the
//! fanout exchange `logs` and print every log message (auto-ack).

use anyhow::Result;
use futures_lite::StreamExt;
use lapin::{
    options::{BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
    ExchangeKind,
};

#[tokio::main]
async fn main() -> Result<()> {
    let limit = warren_examples::exit_after()?;
    let connection = warren_examples::connect("tutorial-3 receive_logs").await?;
    let channel = connection.create_channel().await?;

    channel
        .exchange_declare(
            "logs".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;

    // An empty name asks the broker to pick one (amq.gen-...); exclusive deletes it on disconnect.
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions::exclusive(),
            FieldTable::default(),
        )
        .await?;
    let queue_name = queue.name().clone();

    channel
        .queue_bind(
            queue_name.clone(),
            "logs".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

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
        println!(" [x] {}", String::from_utf8_lossy(&delivery.data));
        handled += 1;
    }

    connection.close(200, "OK".into()).await?;
    Ok(())
}
