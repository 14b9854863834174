//! Tutorial 2, "Work Queues" (consumer): take tasks from the durable queue `task_queue` one at
//! a time (prefetch 1), sleep a second per `.` in the body, then acknowledge manually.

use anyhow::Result;
use futures_lite::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions},
    types::FieldTable,
};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<()> {
    let limit = warren_examples::exit_after()?;
    let connection = warren_examples::connect("tutorial-2 worker").await?;
    let channel = connection.create_channel().await?;

    channel
        .queue_declare(
            "task_queue".into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    // Fair dispatch: no new task until the previous one is acknowledged.
    channel.basic_qos(1, BasicQosOptions::default()).await?;

    let mut consumer = channel
        .basic_consume(
            "task_queue".into(),
            "".into(),
            BasicConsumeOptions::default(),
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
        let body = String::from_utf8_lossy(&delivery.data);
        println!(" [x] Received '{body}'");
        let dots = body.bytes().filter(|&b| b == b'.').count();
        tokio::time::sleep(Duration::from_secs(u64::try_from(dots)?)).await;
        println!(" [x] Done");
        delivery.ack(BasicAckOptions::default()).await?;
        handled += 1;
    }

    connection.close(200, "OK".into()).await?;
    Ok(())
}
