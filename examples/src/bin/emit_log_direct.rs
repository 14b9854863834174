//! Tutorial 4, "Routing" (producer): publish a log message to the direct exchange
//! `direct_logs` with its severity as routing key (`emit_log_direct [severity] [message...]`).

use anyhow::Result;
use lapin::{
    options::{BasicPublishOptions, ExchangeDeclareOptions},
    types::{FieldTable, ShortString},
    BasicProperties, ExchangeKind,
};

#[tokio::main]
async fn main() -> Result<()> {
    let args = warren_examples::args()?;
    let severity = args.first().map_or("info", String::as_str);
    let message = if args.len() > 1 {
        args[1..].join(" ")
    } else {
        "Hello World!".to_owned()
    };
    let routing_key = ShortString::try_new(severity)?;

    let connection = warren_examples::connect("tutorial-4 emit_log_direct").await?;
    let channel = connection.create_channel().await?;

    channel
        .exchange_declare(
            "direct_logs".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;

    channel
        .basic_publish(
            "direct_logs".into(),
            routing_key,
            BasicPublishOptions::default(),
            message.as_bytes(),
            BasicProperties::default(),
        )
        .await?
        .await?;
    println!(" [x] Sent '{severity}':'{message}'");

    connection.close(200, "OK".into()).await?;
    Ok(())
}
