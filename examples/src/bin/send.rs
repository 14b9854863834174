//! Tutorial 1, "Hello World!" (producer): publish one message to the queue `hello`.

use anyhow::Result;
use lapin::{
    options::{BasicPublishOptions, QueueDeclareOptions},
    types::FieldTable,
    BasicProperties,
};

#[tokio::main]
async fn main() -> Result<()> {
    let connection = warren_examples::connect("tutorial-1 send").await?;
    let channel = connection.create_channel().await?;

    channel
        .queue_declare(
            "hello".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let message = "Hello World!";
    channel
        .basic_publish(
            "".into(),
            "hello".into(),
            BasicPublishOptions::default(),
            message.as_bytes(),
            BasicProperties::default(),
        )
        .await?
        .await?;
    println!(" [x] Sent '{message}'");

    connection.close(200, "OK".into()).await?;
    Ok(())
}
