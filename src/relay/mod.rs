//! `outboxd relay`: listens, claims, applies to MongoDB, marks. Run as many as needed.

pub mod health;
pub mod listener;
pub mod locks;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use backon::BackoffBuilder;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::http;
use crate::systemd::{self, Heartbeat};
use crate::{db, mongo, notify, outbox};
use health::Health;
use worker::Shared;

/// The default relay id: host name and process id.
pub fn default_id() -> String {
    format!(
        "{}-{}",
        gethostname::gethostname().to_string_lossy(),
        std::process::id()
    )
}

/// Refuses a relay whose aggregate locks could take more than its share of
/// PostgreSQL's lock table (`locks`), and says what share it may take.
async fn check_lock_table(
    client: &deadpool_postgres::Object,
    config: &Config,
) -> anyhow::Result<()> {
    let table = match locks::LockTable::read(client).await {
        Ok(table) => table,
        Err(e) => {
            tracing::warn!(error = %db::summarize(&e), "the lock table's size is not checked");
            return Ok(());
        }
    };
    let max_lock_entries = locks::check(&table, config.relay.workers, config.relay.batch_size)?;
    tracing::info!(
        max_lock_entries,
        lock_table_entries = table.entries(),
        workers = config.relay.workers,
        batch_size = config.relay.batch_size,
        "lock table: this relay holds at most max_lock_entries advisory locks (refused past 1/{})",
        locks::SHARE
    );
    Ok(())
}

/// Runs until `shutdown`, then stops claiming, gives back the rows not yet sent,
/// finishes the writes in flight and their marks, and returns. Past the shutdown
/// timeout it returns anyway, and the rows still held wait for their lease.
pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let relay_id = config.relay.id.clone().unwrap_or_else(default_id);
    let metrics = crate::telemetry::init_metrics(&[("relay_id", &relay_id)]);
    let pool = db::pool(&config.database)?;
    if config.database.pool_size < config.relay.workers + 2 {
        // Each worker holds one connection per batch; rescue and clean-up one each.
        tracing::warn!(
            pool_size = config.database.pool_size,
            workers = config.relay.workers,
            "database.pool_size is below relay.workers + 2: workers will wait for connections"
        );
    }
    match pool.get().await {
        Ok(client) => {
            crate::migrate::warn_unless_current(&client).await;
            check_lock_table(&client, config).await?;
        }
        // The relay waits for PostgreSQL as for any outage.
        Err(e) => tracing::warn!(
            error = %db::summarize_pool(&e),
            "PostgreSQL unreachable at start: the lock table's size is not checked"
        ),
    }
    let sink = mongo::connect(&config.mongodb).await?;
    let sender = match config.notify.enabled {
        true => Some(Arc::new(notify::Sender::new(
            config,
            &relay_id,
            pool.clone(),
        )?)),
        false => None,
    };
    let notify_wake = sender
        .as_ref()
        .map_or_else(|| Arc::new(Notify::new()), |s| s.wake.clone());
    let shared = Arc::new(Shared {
        relay_id: relay_id.clone(),
        config: config.relay.clone(),
        pool: pool.clone(),
        sink,
        postgres: Health::new("PostgreSQL"),
        mongodb: Health::new("MongoDB"),
        // A worker beats between steps; the longest, a batch's writes, ends with
        // its lease.
        heartbeat: Heartbeat::new(Duration::from_secs(config.relay.lease_s + 10)),
        notify_enabled: sender.is_some(),
        notify_wake,
        shutdown: shutdown.clone(),
    });
    shared.heartbeat.beat();
    metrics::gauge!("outboxd_relay_listener_connected").set(0.0);

    let tasks = TaskTracker::new();
    // Helpers stop with `background`; workers with `shutdown`, after their batch.
    let background = CancellationToken::new();
    if let Some(addr) = config.relay.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (`relay.metrics_listen`)"))?;
        tasks.spawn(http::serve_metrics(listener, metrics, background.clone()));
    }
    let wakers: Vec<Arc<Notify>> = (0..config.relay.workers)
        .map(|_| Arc::new(Notify::new()))
        .collect();
    let pg = db::connector(&config.database)?;
    let nudge = Arc::new(Notify::new());
    tasks.spawn(listener::run(
        pg,
        wakers.clone(),
        nudge.clone(),
        config.relay.poll_interval_ms,
        background.clone(),
    ));
    tasks.spawn(rescue(shared.clone(), background.clone()));
    tasks.spawn(housekeeping(shared.clone(), background.clone()));
    if let Some(sender) = &sender {
        tasks.spawn(rescue_notifications(
            shared.clone(),
            sender.clone(),
            background.clone(),
        ));
    }
    let workers = TaskTracker::new();
    // A worker that panicked would leave its batch held and its session's
    // aggregate locks taken: the relay stops, and its supervisor restarts it.
    let panicked = CancellationToken::new();
    for wake in &wakers {
        let worker = tokio::spawn(worker::run(shared.clone(), wake.clone(), nudge.clone()));
        let panicked = panicked.clone();
        workers.spawn(async move {
            if let Err(e) = worker.await
                && e.is_panic()
            {
                let panic = e.into_panic();
                let message = panic
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("(no message)");
                tracing::error!(
                    panic = message,
                    "a relay worker panicked: the relay stops, to be restarted"
                );
                panicked.cancel();
            }
        });
    }
    // The sender stops with the workers: on SIGTERM it starts no more sends,
    // gives back the rest, and finishes and marks the sends in flight.
    if let Some(sender) = &sender {
        workers.spawn(sender.clone().run(shutdown.clone()));
    }
    workers.close();
    tracing::info!(relay_id = %relay_id, workers = config.relay.workers, "relay started");
    systemd::ready();
    let watchdog = systemd::spawn_watchdog(shutdown.clone(), Some(shared.heartbeat.clone()));

    tokio::select! {
        _ = shutdown.cancelled() => {}
        // The other workers stop as at SIGTERM (they watch the same token); the
        // watchdog stops with them, so systemd must know the relay is stopping.
        _ = panicked.cancelled() => {
            systemd::stopping();
            shutdown.cancel();
        }
    }
    // The workers get the timeout less a tail, in which the leases of rows still
    // held are extended and the helpers and the driver close: all within it.
    let timeout = Duration::from_secs(config.relay.shutdown_timeout_s);
    let step = (timeout / 6).min(Duration::from_secs(1));
    if tokio::time::timeout(timeout - 3 * step, workers.wait())
        .await
        .is_err()
    {
        // The workers gave back the rows they had not sent. The rows still held
        // have writes that may yet land: given back, they could be written anew
        // and then overtaken by the late write. They wait for their lease,
        // extended as a worker would before waiting out an unanswered write.
        let extra = (shared.sink.timeout() * 3).as_secs_f64();
        let held = tokio::time::timeout(step, async {
            outbox::extend_held(&pool.get().await?, &relay_id, extra)
                .await
                .map_err(anyhow::Error::from)
        })
        .await;
        let (rows, lease_until) = match held {
            Ok(Ok((rows, until))) => (Some(rows), until),
            _ => (None, None),
        };
        tracing::warn!(
            rows = ?rows, lease_until = ?lease_until,
            "shutdown timeout: rows still held go back to pending when their lease ends"
        );
    }
    background.cancel();
    watchdog.abort();
    tasks.close();
    let _ = tokio::time::timeout(step, tasks.wait()).await;
    let _ = tokio::time::timeout(step, shared.sink.shutdown()).await;
    if panicked.is_cancelled() {
        anyhow::bail!("a relay worker panicked (its message is logged above)");
    }
    tracing::info!(relay_id = %relay_id, "relay stopped");
    Ok(())
}

/// Lease rescue (every poll interval) and the backlog gauges. Apart from the
/// clean-up, whose loop over a large retention backlog must not delay rescue.
async fn rescue(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut rescue = tokio::time::interval(Duration::from_millis(shared.config.poll_interval_ms));
    let mut gauges = tokio::time::interval(Duration::from_secs(10));
    rescue.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = rescue.tick() => rescue_leases(&shared).await,
            _ = gauges.tick() => refresh_gauges(&shared).await,
        };
        if let Err(e) = result {
            failed(&shared, "lease rescue", &e);
        }
    }
}

/// Notification lease rescue and gauges, every poll interval.
async fn rescue_notifications(
    shared: Arc<Shared>,
    sender: Arc<notify::Sender>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(shared.config.poll_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = sender.rescue().await {
            failed(&shared, "notification lease rescue", &e);
        }
    }
}

/// Retention and key expiry, every housekeeping interval, in small batches.
async fn housekeeping(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut cleanup = tokio::time::interval(Duration::from_secs(
        shared.config.housekeeping_interval_s.max(1),
    ));
    cleanup.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = cleanup.tick() => {}
        }
        if let Err(e) = clean_up(&shared, &shutdown).await {
            failed(&shared, "housekeeping", &e);
        }
    }
}

/// Capped, jittered exponential pauses that never give up: a relay outlives
/// any outage.
pub(crate) fn retry_forever(min: Duration, max: Duration) -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// An outage goes to the shared PostgreSQL state (logged once); any other error,
/// such as a missing privilege, is logged as what it is, and is no outage.
fn failed(shared: &Shared, task: &str, e: &anyhow::Error) {
    let error = db::summarize_any(e);
    if worker::is_transient(e) {
        shared.postgres.failed(&error);
    } else {
        tracing::error!(error = %error, "{task} failed");
    }
}

async fn rescue_leases(shared: &Shared) -> anyhow::Result<()> {
    let client = shared.pool.get().await?;
    let rescued = outbox::rescue_expired(
        &client,
        shared.config.max_attempts,
        shared.config.housekeeping_batch,
    )
    .await?;
    for row in &rescued {
        let counter = if row.status == crate::status::Status::Failed {
            "outboxd_relay_rows_failed_total"
        } else {
            "outboxd_relay_rows_retried_total"
        };
        metrics::counter!(counter).increment(1);
        tracing::warn!(
            outbox_id = row.id, email_id = row.email_id, idempotency_key = %row.idempotency_key,
            operation = %row.operation, held_by = ?row.held_by, attempts = row.attempts,
            status = %row.status, "lease expired: row taken back"
        );
    }
    if !rescued.is_empty() {
        tracing::warn!(
            rows = rescued.len(),
            "took back rows whose lease expired (a relay died or stalled)"
        );
    }
    Ok(())
}

async fn clean_up(shared: &Shared, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let batch = shared.config.housekeeping_batch;
    let retention = shared.config.retention_s as f64;
    let mut deleted = (0, 0);
    loop {
        let client = shared.pool.get().await?;
        let keys = outbox::delete_expired_keys(&client, batch).await?;
        let rows = outbox::delete_synced_before(&client, retention, batch).await?;
        // Sent notifications age out with the synced rows they came from.
        let mails = notify::clean_up(&client, retention, batch).await?;
        deleted = (deleted.0 + keys, deleted.1 + rows);
        if (keys < batch as u64 && rows < batch as u64 && mails < batch as u64)
            || shutdown.is_cancelled()
        {
            break;
        }
        // Small batches with pauses keep locks and WAL bursts short.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if deleted != (0, 0) {
        tracing::info!(
            expired_keys = deleted.0,
            synced_rows = deleted.1,
            "housekeeping deleted"
        );
    }
    Ok(())
}

async fn refresh_gauges(shared: &Shared) -> anyhow::Result<()> {
    let client = shared.pool.get().await?;
    let (pending, failed) = outbox::pending_and_failed(&client).await?;
    metrics::gauge!("outboxd_relay_pending_rows").set(pending as f64);
    metrics::gauge!("outboxd_relay_failed_rows").set(failed as f64);
    Ok(())
}
