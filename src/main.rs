//! outboxd: parse the command line, load the config, start telemetry, dispatch.

use std::process::ExitCode;

use clap::Parser;
use outboxd::cli::{Cli, Command};
use outboxd::config::{self, Config};
use outboxd::{check, ingest, migrate, ops, relay, shutdown, sign, telemetry};

// jemalloc: about 10% fewer instructions per webhook than glibc's malloc, and
// a smaller relay RSS (docs/benchmarks.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Not clap's 2, which `status` answers for failed rows.
            return ExitCode::from(if e.use_stderr() { 64 } else { 0 }); // EX_USAGE
        }
    };
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("outboxd: {e:#}");
            return ExitCode::from(78); // EX_CONFIG
        }
    };
    telemetry::init_logs(&config.log);
    // `threads = 0`: one per CPU, tokio's default (docs/benchmarks.md).
    let threads = match cli.command {
        Command::Ingest { .. } => config.ingest.threads,
        Command::Relay { .. } => config.relay.threads,
        _ => 1,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("outboxd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli.command, config));
    // Not held up by a blocking task left behind, such as a DNS lookup that hangs.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("outboxd: {e:#}");
            match e.downcast_ref::<config::Invalid>() {
                Some(_) => ExitCode::from(78),
                None => ExitCode::FAILURE,
            }
        }
    }
}

async fn dispatch(command: Command, mut config: Config) -> anyhow::Result<u8> {
    match command {
        Command::Migrate => migrate::command(&config).await,
        Command::Ingest {
            listen,
            metrics_listen,
        } => {
            config.ingest.metrics_listen = metrics_listen.or(config.ingest.metrics_listen);
            ingest::run(&config, listen, shutdown::on_signal())
                .await
                .map(|_| 0)
        }
        Command::Relay { id, metrics_listen } => {
            config.relay.id = id.or(config.relay.id);
            config.relay.metrics_listen = metrics_listen.or(config.relay.metrics_listen);
            relay::run(&config, shutdown::on_signal()).await.map(|_| 0)
        }
        Command::Status { json, watch } => ops::status(&config, json, watch).await,
        Command::Retry(args) => ops::retry(&config, &args).await,
        Command::Audit {
            all: true,
            repair,
            delete_unknown,
            json,
            ..
        } => ops::audit_all(&config, repair, delete_unknown, json).await,
        Command::Audit { since, repair, .. } => ops::audit(&config, since, repair).await,
        Command::Resync(args) => ops::resync(&config, &args).await,
        Command::Check => check::run(&config).await,
        Command::Sign {
            file,
            curl,
            timestamp,
        } => sign::run(&config, &file, curl.as_deref(), timestamp).map(|_| 0),
    }
}
