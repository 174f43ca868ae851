//! The command line: one subcommand per job.

use std::net::SocketAddr;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};

/// outboxd: moves writes from PostgreSQL to MongoDB through a transactional outbox.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// Config file (TOML). Without it, built-in defaults apply; see config/outboxd.toml.
    #[arg(long, global = true, env = crate::config::CONFIG_ENV)]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending schema migrations from sql/ (safe to run again, and concurrently).
    Migrate,
    /// Serve the Zendesk webhook endpoint (POST /webhooks/email).
    #[command(
        after_help = "SIGTERM or Ctrl-C: stop accepting, finish the requests in flight \
                      (up to ingest.shutdown_timeout_s), exit 0. A second signal ends it at once."
    )]
    Ingest {
        /// Address to listen on (overrides `ingest.listen`).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve Prometheus metrics on this address instead of the listen
        /// address (overrides `ingest.metrics_listen`).
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
    },
    /// Relay outbox rows to MongoDB; run as many as you like.
    #[command(
        after_help = "SIGTERM or Ctrl-C: stop claiming, give back the rows not yet sent, finish \
                      the writes in flight (up to relay.shutdown_timeout_s; rows still held then \
                      wait for their lease), exit 0. A second signal ends it at once."
    )]
    Relay {
        /// Relay id recorded on the rows it holds (default: hostname-pid).
        #[arg(long)]
        id: Option<String>,
        /// Serve Prometheus metrics on this address (overrides `relay.metrics_listen`).
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
    },
    /// Show counts, lag, failures and rows in flight. Exits 2 when rows have failed.
    Status {
        /// Print stable JSON for machines.
        #[arg(long)]
        json: bool,
        /// Refresh every second, with rates, until interrupted.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
    /// Requeue failed rows, or failed notification e-mails (attempts reset). Safe to run twice.
    Retry(RetryArgs),
    /// Compare synced rows with MongoDB; report documents missing or behind. Exits 1 when any.
    #[command(
        after_help = "--all compares every aggregate's current state field by field and lists                       documents no aggregate explains; exit 0 clean, 1 not clean (with --repair:                       something was left unfixed, such as unknown documents)."
    )]
    Audit {
        /// Only rows synced at or after this time (RFC 3339).
        #[arg(long, conflicts_with = "all")]
        since: Option<DateTime<Utc>>,
        /// Requeue the latest message of each bad aggregate.
        #[arg(long)]
        repair: bool,
        /// Compare every aggregate's current state field by field, and find unknown documents.
        #[arg(long)]
        all: bool,
        /// With --all --repair: also delete the documents no aggregate explains.
        #[arg(long, requires_all = ["all", "repair"])]
        delete_unknown: bool,
        /// With --all: print stable JSON for machines.
        #[arg(long, requires = "all")]
        json: bool,
    },
    /// Re-send aggregates' current state to MongoDB through the outbox (resumable).
    #[command(
        after_help = "Requeues each matching aggregate's newest synced message; a relay writes                       it, and never past a newer live message. Ctrl-C stops between pages (exit                       1); running it again with the same filter resumes where it stopped,                       --restart starts over. Runs are recorded in the outbox_resyncs table."
    )]
    Resync(ResyncArgs),
    /// Check PostgreSQL (and its schema version) and MongoDB: one line each, exit 1 on a problem.
    Check,
    /// Print the Zendesk signature headers (or a curl command) for a body file.
    Sign {
        /// The JSON body to sign.
        file: PathBuf,
        /// Print a ready curl command for this URL instead of the headers.
        #[arg(long, value_name = "URL")]
        curl: Option<String>,
        /// Timestamp to sign (RFC 3339; default: now).
        #[arg(long)]
        timestamp: Option<String>,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RetryArgs {
    /// Requeue these failed rows; exit 1, naming them, if some are not failed.
    #[arg(long, num_args = 1..)]
    pub id: Vec<i64>,
    /// Requeue every failed row.
    #[arg(long)]
    pub all_failed: bool,
    /// Requeue rows that failed at or after this time (RFC 3339).
    #[arg(long)]
    pub failed_since: Option<DateTime<Utc>>,
    /// Requeue every failed notification e-mail (not outbox rows).
    #[arg(long)]
    pub notifications: bool,
    /// Requeue these failed notifications, by outbox id; exit 1 if some are not failed.
    #[arg(long, num_args = 1.., value_name = "OUTBOX_ID")]
    pub notification_id: Vec<i64>,
}

#[derive(Debug, Args)]
pub struct ResyncArgs {
    /// Only this aggregate (repeat for more); default: all.
    #[arg(long = "aggregate", value_name = "ID")]
    pub aggregates: Vec<String>,
    /// Only aggregates whose newest message was synced at or after this time (RFC 3339).
    #[arg(long)]
    pub since: Option<DateTime<Utc>>,
    /// Rows requeued per second at most.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate: u32,
    /// Abandon the unfinished run with this filter and start over.
    #[arg(long)]
    pub restart: bool,
}
