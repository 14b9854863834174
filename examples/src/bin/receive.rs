//! Tutorial 1, "Hello World!" (consumer): print messages from the queue `hello` (auto-ack).

use anyhow::Result;
use futures_lite::StreamExt;
use lapin::{
    options::{BasicConsumeOptions, QueueDeclareOptions},
    types::FieldTable,
};

#[tokio::main]
async fn main() -> Result<()> {
    let limit = warren_examples::exit_after()?;
    let connection = warren_examples::connect("tutorial-1 receive").await?;
    let channel = connection.create_channel().await?;

    channel
        .queue_declare(
            "hello".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let mut consumer = channel
        .basic_consume(
            "hello".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    println!(" [*] Waiting for messages. To exit press CTRL+C");

    let mut handled = 0;
    while !warren_examples::done(limit, handled) {
        let Some(delivery) = consumer.next().await else {
            break;
        };
        let delivery = delivery?;
        println!(
            " [x] Received '{}'",
            String::from_utf8_lossy(&delivery.data)
        );
        handled += 1;
    }

    connection.close(200, "OK".into()).await?;
    Ok(())
}
