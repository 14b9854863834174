//! Tutorial 5, "Topics" (producer): publish a log message to the topic exchange
//! `topic_logs` with a dotted routing key (`emit_log_topic [routing.key] [message...]`).

use anyhow::Result;
use lapin::{
    options::{BasicPublishOptions, ExchangeDeclareOptions},
    types::{FieldTable, ShortString},
    BasicProperties, ExchangeKind,
};

#[tokio::main]
async fn main() -> Result<()> {
    let args = warren_examples::args()?;
    let key = args.first().map_or("anonymous.info", String::as_str);
    let message = if args.len() > 1 {
        args[1..].join(" ")
    } else {
        "Hello World!".to_owned()
    };
    let routing_key = ShortString::try_new(key)?;

    let connection = warren_examples::connect("tutorial-5 emit_log_topic").await?;
    let channel = connection.create_channel().await?;

    channel
        .exchange_declare(
            "topic_logs".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;

    channel
        .basic_publish(
            "topic_logs".into(),
            routing_key,
            BasicPublishOptions::default(),
            message.as_bytes(),
            BasicProperties::default(),
        )
        .await?
        .await?;
    println!(" [x] Sent '{key}':'{message}'");

    connection.close(200, "OK".into()).await?;
    Ok(())
}
