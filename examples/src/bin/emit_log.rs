//! Tutorial 3, "Publish/Subscribe" (producer): broadcast a log message (the arguments joined
//! by spaces) through the fanout exchange `logs`.

use anyhow::Result;
use lapin::{
    options::{BasicPublishOptions, ExchangeDeclareOptions},
    types::FieldTable,
    BasicProperties, ExchangeKind,
};

#[tokio::main]
async fn main() -> Result<()> {
    let args = warren_examples::args()?;
    let message = if args.is_empty() {
        "info: Hello World!".to_owned()
    } else {
        args.join(" ")
    };

    let connection = warren_examples::connect("tutorial-3 emit_log").await?;
    let channel = connection.create_channel().await?;

    channel
        .exchange_declare(
            "logs".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;

    channel
        .basic_publish(
            "logs".into(),
            "".into(),
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
