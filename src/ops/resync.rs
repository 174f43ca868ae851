//! `outboxd resync`: re-sends the current state of aggregates to MongoDB
//! through the outbox, by requeueing each one's newest synced message. The
//! requeued row keeps its outbox id, so the relay's guard never lets it move
//! a document back past a newer live message, nor turn one into a no-op.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::json;

use super::progress::Progress;
use super::{client, lock_wait_hint};
use crate::config::Config;
use crate::outbox::{self, current};

/// What to re-send, and how fast.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only these aggregates (all when empty).
    pub aggregates: Vec<String>,
    /// Only aggregates whose newest message was synced at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Rows requeued per second at most.
    pub rate: u32,
    /// Abandon the unfinished run with this filter and start over.
    pub restart: bool,
}

/// Aggregates per page (one transaction each), at most.
const PAGE: i64 = 500;

/// `outboxd resync`: exit 0 when the run finished, 1 when stopped by a signal
/// (run it again to resume).
pub async fn run(config: &Config, options: &Options) -> anyhow::Result<u8> {
    resync(config, options).await.map_err(lock_wait_hint)
}

async fn resync(config: &Config, options: &Options) -> anyhow::Result<u8> {
    let mut client = client(config, true).await?;
    let mut aggregates = options.aggregates.clone();
    aggregates.sort();
    aggregates.dedup();
    let filter = json!({"aggregates": aggregates, "since": options.since.map(|t| t.to_rfc3339())});
    let run = current::open_run(&client, &filter, options.restart).await?;
    if run.resumed {
        println!(
            "resuming resync run {} after {} ({} rows requeued so far; --restart starts over)",
            run.id,
            run.cursor.as_deref().unwrap_or("the start"),
            run.rows_requeued
        );
    }
    let shutdown = crate::shutdown::on_signal();
    let rate = f64::from(options.rate.max(1));
    let page = PAGE.min(i64::from(options.rate.max(1)));
    let only = (!aggregates.is_empty()).then_some(aggregates.as_slice());
    let mut cursor = run.cursor.clone();
    let (mut requeued, mut inflight) = (0u64, 0u64);
    let begun = Instant::now();
    let mut progress = Progress::new("aggregates", None);
    loop {
        if shutdown.is_cancelled() {
            progress.finish();
            println!(
                "resync run {} stopped after {} ({requeued} rows requeued now); run it again to resume",
                run.id,
                cursor.as_deref().unwrap_or("the start")
            );
            return Ok(1);
        }
        let tx = client.transaction().await?;
        let Some(locked) = current::lock_run(&tx, run.id).await? else {
            anyhow::bail!("resync run {} was finished or abandoned meanwhile", run.id);
        };
        if locked != cursor {
            anyhow::bail!(
                "another resync is running run {} (its cursor moved)",
                run.id
            );
        }
        let after = cursor.clone().unwrap_or_default();
        let (last, n, ids, busy) =
            current::resync_page(&tx, &after, only, options.since, page).await?;
        let Some(last) = last else {
            tx.commit().await?;
            break;
        };
        let moved = outbox::requeue_synced(&tx, &ids).await?;
        if current::advance_run(&tx, run.id, &last, moved).await? != 1 {
            anyhow::bail!("resync run {} was finished or abandoned meanwhile", run.id);
        }
        tx.commit().await?;
        if moved > 0 {
            outbox::notify(&client).await?;
        }
        cursor = Some(last);
        requeued += moved;
        inflight += busy as u64;
        progress.inc(n as u64);
        if (n as i64) < page {
            break;
        }
        // Throttle: no faster than `rate` rows a second, on average.
        let due = Duration::from_secs_f64(requeued as f64 / rate);
        if let Some(wait) = due.checked_sub(begun.elapsed()) {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
    progress.finish();
    current::finish_run(&client, run.id).await?;
    println!(
        "resync run {} done: requeued {} rows ({requeued} now), skipped {inflight} aggregates in flight",
        run.id,
        run.rows_requeued as u64 + requeued
    );
    Ok(0)
}
