//! Tutorial 2, "Work Queues" (producer): publish a persistent task to the durable queue
//! `task_queue`; the message is the arguments joined by spaces, each `.` a second of work.

use anyhow::Result;
use lapin::{
    options::{BasicPublishOptions, QueueDeclareOptions},
    types::FieldTable,
    BasicProperties,
};

#[tokio::main]
async fn main() -> Result<()> {
    let args = warren_examples::args()?;
    let message = if args.is_empty() {
        "Hello World!".to_owned()
    } else {
        args.join(" ")
    };

    let connection = warren_examples::connect("tutorial-2 new_task").await?;
    let channel = connection.create_channel().await?;

    channel
        .queue_declare(
            "task_queue".into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;

    channel
        .basic_publish(
            "".into(),
            "task_queue".into(),
            BasicPublishOptions::default(),
            message.as_bytes(),
            // delivery_mode 2 = persistent: the message survives a broker restart.
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?
        .await?;
    println!(" [x] Sent '{message}'");

    connection.close(200, "OK".into()).await?;
    Ok(())
}
