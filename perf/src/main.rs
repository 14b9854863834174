//! `warren-perf`: an AMQP 0-9-1 load generator taking RabbitMQ PerfTest's flags. Parses the
//! command line, builds the runtime, runs the test and prints the summary (JSON with `--json`).

mod args;
mod body;
mod conn;
mod consumer;
mod procstat;
mod producer;
mod rate;
mod run;
mod stats;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cfg = match args::Args::parse().into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren-perf: {e:#}");
            return ExitCode::from(2);
        }
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(t) = cfg.threads {
        rt.worker_threads(t.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren-perf: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = cfg.json;
    let summary = match rt.block_on(run::run(cfg)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("warren-perf: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    rt.shutdown_background();
    if json {
        match serde_json::to_string_pretty(&summary) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("warren-perf: encoding the summary: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", summary.render());
    }
    if summary.consumed_matches == Some(false) {
        eprintln!(
            "warren-perf: MISMATCH: consumed {} messages, expected {}",
            summary.consumed,
            summary.expected_consumed.unwrap_or(0)
        );
    }
    ExitCode::SUCCESS
}
