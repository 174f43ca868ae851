//! One worker loop: claim a batch, apply it to MongoDB, mark each row.
//!
//! `run_batch` returns `Ok(Some(progress))` when it claimed rows (go on at once
//! after a full batch; after a partial one, wait for a wake-up or a short pause;
//! back off while MongoDB is down), `Ok(None)` when nothing was due (wait for a
//! wake-up, the next due row, or the poll interval; when rows are due but all
//! held by other sessions, a pause that doubles up to the poll interval), and
//! `Err` when PostgreSQL failed (back off, then try again).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Pool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::health::Health;
use crate::config::RelayConfig;
use crate::db;
use crate::mongo::{self, Outcome, Sink, StartBy};
use crate::outbox::{self, Batch};
use crate::status::Status;
use crate::systemd::Heartbeat;

/// The first pause before claiming again when due rows are all held by others;
/// it doubles while they stay held, up to the poll interval.
const BUSY_RETRY: Duration = Duration::from_millis(20);

/// What all workers of one relay share.
pub struct Shared {
    pub relay_id: String,
    pub config: RelayConfig,
    pub pool: Pool,
    pub sink: Sink,
    pub postgres: Health,
    pub mongodb: Health,
    pub heartbeat: Heartbeat,
    /// Whether marks record notifications (`notify.enabled`).
    pub notify_enabled: bool,
    /// Wakes the notification sender after a mark that created obligations.
    pub notify_wake: Arc<Notify>,
    /// Cancelled on SIGTERM: workers stop claiming, and send no more writes.
    pub shutdown: CancellationToken,
}

/// What one batch did.
pub struct Progress {
    rows: usize,
    mongo_down: bool,
}

/// `wake` is this worker's own wake-up; `nudge` is shared by the relay's workers
/// and wakes one of them.
pub async fn run(shared: Arc<Shared>, wake: Arc<Notify>, nudge: Arc<Notify>) {
    let shutdown = shared.shutdown.clone();
    let poll = Duration::from_millis(shared.config.poll_interval_ms);
    // Jitter adds up to as much again: an outage's end is seen within 4 s.
    let schedule = || super::retry_forever(Duration::from_millis(200), Duration::from_secs(2));
    let mut backoff = schedule();
    // An error that is no outage (a missing privilege, say): logged once, and
    // retried with backoff rather than on every wake-up.
    let mut failing: Option<String> = None;
    // While every due row is held by another session (a frozen relay, say),
    // empty claims only cost PostgreSQL time: the pause between them grows.
    let mut held_pause = BUSY_RETRY;
    while !shutdown.is_cancelled() {
        shared.heartbeat.beat();
        let result = run_batch(&shared).await;
        // A ping while MongoDB is down claims nothing, so it proves nothing.
        let claimed = matches!(&result, Ok(None) | Ok(Some(Progress { rows: 1.., .. })));
        if claimed && failing.take().is_some() {
            tracing::info!(relay_id = %shared.relay_id, "batches succeed again");
        }
        let pause = match result {
            Ok(Some(Progress {
                mongo_down: false,
                rows,
            })) => {
                backoff = schedule();
                if rows > 0 {
                    held_pause = BUSY_RETRY;
                }
                if rows as i64 >= shared.config.batch_size {
                    // More is likely due: go on, and bring in an idle worker.
                    nudge.notify_one();
                    continue;
                }
                // The claim took all it could: rows committed since come with a
                // NOTIFY. Claiming again at once mostly finds nothing, at the cost
                // of PostgreSQL time the other processes need; the pause bounds
                // the wait for rows skipped because their aggregate was busy.
                Some(BUSY_RETRY)
            }
            Ok(Some(Progress {
                mongo_down: true, ..
            })) => backoff.next(),
            Ok(None) if shutdown.is_cancelled() => break,
            Ok(None) => {
                backoff = schedule();
                match idle_wait(&shared, poll).await {
                    Some(Idle::Held) => {
                        let pause = held_pause;
                        held_pause = (held_pause * 2).min(poll);
                        Some(pause)
                    }
                    Some(Idle::Until(pause)) => {
                        held_pause = BUSY_RETRY;
                        Some(pause)
                    }
                    None => None,
                }
            }
            Err(e) if is_transient(&e) => {
                shared.postgres.failed(&db::summarize_any(&e));
                backoff.next()
            }
            Err(e) => {
                let error = db::summarize_any(&e);
                if failing.as_ref() != Some(&error) {
                    tracing::error!(error = %error, relay_id = %shared.relay_id, "batch failed; retrying with backoff");
                }
                failing = Some(error);
                backoff.next()
            }
        };
        let pause = pause.unwrap_or(poll);
        let woken =
            failing.is_none() && !shared.mongodb.is_unreachable() && !shared.postgres.is_down();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = wake.notified(), if woken => {}
            _ = nudge.notified(), if woken => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Why a claim found nothing.
enum Idle {
    /// Rows are due, but another session holds them or their aggregate.
    Held,
    /// Nothing is due: sleep this long (until the earliest `next_attempt_at`,
    /// at most the poll interval).
    Until(Duration),
}

/// Why a claim found nothing; `None` when that cannot be read (or nothing is
/// pending): sleep the poll interval. A NOTIFY ends any sleep sooner.
async fn idle_wait(shared: &Shared, poll: Duration) -> Option<Idle> {
    let client = shared.pool.get().await.ok()?;
    let due = outbox::next_due(&client).await.ok()??;
    match (due - Utc::now()).to_std() {
        Ok(until) if until > Duration::ZERO => Some(Idle::Until(until.max(BUSY_RETRY).min(poll))),
        _ => Some(Idle::Held),
    }
}

pub async fn run_batch(shared: &Shared) -> Result<Option<Progress>, anyhow::Error> {
    let config = &shared.config;
    if shared.shutdown.is_cancelled() {
        return Ok(None);
    }
    // While MongoDB is down, probe it instead of claiming rows only to fail them.
    // A ping that answers is not the end of the outage (a server may answer but
    // refuse writes): only a batch written without transient errors is.
    if shared.mongodb.is_down() {
        let ping = shared.sink.ping().await;
        shared.mongodb.probed(ping.is_ok());
        if let Err(e) = ping {
            shared.mongodb.failed(&mongo::redact(&e));
            return Ok(Some(Progress {
                rows: 0,
                mongo_down: true,
            }));
        }
    }
    let client = shared.pool.get().await?;
    // The lease is `now() + lease_s` on the server, so it ends no sooner than
    // `lease_s` after this instant. A write may start while it can finish (or be
    // given up) before then, with a margin in which to extend the lease of a
    // write that got no answer before rescue may take its row.
    let lease = Duration::from_secs(config.lease_s);
    let timeout = shared.sink.timeout();
    let margin = (lease / 10)
        .max(Duration::from_secs(1))
        .min(lease.saturating_sub(timeout) / 2);
    let last_start = Instant::now() + lease.saturating_sub(timeout + margin);
    // The claim also locks the batch's aggregates for this session (see `outbox::claim`).
    let batch = match outbox::claim(
        &client,
        &shared.relay_id,
        config.batch_size,
        config.lease_s as f64,
    )
    .await
    {
        Ok(batch) => batch,
        Err(e) => {
            release_locks(client).await;
            return Err(e.into());
        }
    };
    shared.postgres.ok();
    let result = if batch.rows.is_empty() {
        "empty"
    } else {
        "rows"
    };
    metrics::counter!("outboxd_relay_claims_total", "result" => result).increment(1);
    if batch.rows.is_empty() {
        release_locks(client).await;
        return Ok(None);
    }
    let claimed = batch.rows.len();
    metrics::histogram!("outboxd_relay_batch_size").record(claimed as f64);

    let started = Instant::now();
    let outcomes = shared
        .sink
        .apply_detailed(
            &batch.rows,
            config.write_concurrency,
            StartBy::new(last_start, shared.shutdown.clone()),
        )
        .await;
    metrics::histogram!("outboxd_relay_apply_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    // `Late` while the lease had time left: shutdown stopped the writes.
    let late_reason = if Instant::now() <= last_start {
        GivenBack::ShuttingDown
    } else {
        GivenBack::LeaseTooShort
    };
    shared.heartbeat.beat();

    let mut applied = Vec::new();
    // Per aggregate, the newest message written: the one write that changed
    // the document. Older rows coalesced into it are synced but not mailed.
    let mut written: BTreeMap<&str, i64> = BTreeMap::new();
    let mut late = Vec::new();
    let mut untried = Vec::new();
    let mut failures: BTreeMap<(bool, String), Vec<i64>> = BTreeMap::new();
    let mut unanswered: BTreeMap<(bool, String), Vec<i64>> = BTreeMap::new();
    for row in &batch.rows {
        match &outcomes[&row.id] {
            Outcome::Applied => {
                applied.push(row.id);
                let newest = written.entry(&row.aggregate_id).or_insert(row.id);
                *newest = (*newest).max(row.id);
            }
            Outcome::AlreadyNewer => applied.push(row.id),
            Outcome::Late => {
                tracing::debug!(
                    outbox_id = row.id, email_id = row.email_id, idempotency_key = %row.idempotency_key,
                    operation = %row.operation, relay_id = %shared.relay_id, "not sent: given back"
                );
                late.push(row.id)
            }
            Outcome::Untried => {
                tracing::debug!(
                    outbox_id = row.id, email_id = row.email_id, idempotency_key = %row.idempotency_key,
                    operation = %row.operation, relay_id = %shared.relay_id,
                    "not tried: the newer message it was coalesced into was rejected; given back"
                );
                untried.push(row.id)
            }
            Outcome::Transient(e) => failures.entry((false, e.clone())).or_default().push(row.id),
            Outcome::Unanswered(e) => unanswered
                .entry((false, e.clone()))
                .or_default()
                .push(row.id),
            Outcome::Permanent(e) => failures.entry((true, e.clone())).or_default().push(row.id),
        }
    }
    let transient = failures
        .keys()
        .chain(unanswered.keys())
        .find(|(permanent, _)| !permanent);
    let mongo_down = transient.is_some();
    match transient {
        Some((_, error)) => shared.mongodb.failed(error),
        None => shared.mongodb.ok(),
    }
    // No write went through, and MongoDB failed for reasons that are not the
    // rows' own (not primary, read-only, no privilege, the network): an outage,
    // which must not use up the backlog's attempts. Rejections still count.
    let outage = mongo_down && applied.is_empty();
    let mut refused = BTreeMap::new();
    if outage {
        (refused, failures) = failures
            .into_iter()
            .partition(|((permanent, _), _)| !permanent);
    }
    // First, while the lease surely holds: rescue must not hand these rows on
    // while their writes may still land.
    let held = if unanswered.is_empty() {
        None
    } else {
        let ids: Vec<i64> = unanswered.values().flatten().copied().collect();
        Some(hold_unanswered(shared, &client, &batch, &ids).await)
    };
    // Not attempts: the rows were never sent. The next claim takes them; given
    // back before the marks, which may retry for a while.
    give_back(shared, &client, &batch, &untried, GivenBack::Untried).await;
    give_back(shared, &client, &batch, &late, late_reason).await;
    defer(shared, &client, &batch, refused).await;
    let notify: Vec<i64> = if shared.notify_enabled {
        written.into_values().collect()
    } else {
        Vec::new()
    };
    let marked = mark(shared, &client, &batch, applied, &notify, failures).await;
    shared.heartbeat.beat();
    let marked = match held {
        None => marked,
        Some(locked_until) => {
            let held = Batch {
                locked_until,
                ..batch
            };
            marked.and(await_unanswered(shared, &client, &held, unanswered, outage).await)
        }
    };
    release_locks(client).await;
    marked?;
    Ok(Some(Progress {
        rows: claimed,
        mongo_down,
    }))
}

/// Frees this session's aggregate locks before the connection goes back to the
/// pool; a connection that cannot is closed instead, which frees them too.
async fn release_locks(client: Object) {
    if outbox::unlock_aggregates(&client).await.is_err() {
        drop(Object::take(client));
    }
}

/// How the batch's transitions are retried: briefly, since a row left unmarked
/// waits for its lease.
fn transition_retry(config: &RelayConfig) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .with_total_delay(Some(Duration::from_secs(config.lease_s / 2)))
}

/// Why rows go back unwritten.
#[derive(Clone, Copy)]
enum GivenBack<'a> {
    Untried,
    ShuttingDown,
    LeaseTooShort,
    /// MongoDB refused every write of the batch (an outage): this reason is
    /// kept as the rows' `last_error`.
    Refused(&'a str),
}

/// Gives held rows back unwritten, with no attempt counted. Rows not given back
/// had already lost their lease to rescue or a new holder: not ours to release.
async fn give_back(shared: &Shared, held: &Object, batch: &Batch, ids: &[i64], why: GivenBack<'_>) {
    if ids.is_empty() {
        return;
    }
    let reason = match why {
        GivenBack::Refused(error) => Some(error),
        _ => None,
    };
    let released = (|| async {
        let client = connection(shared, held).await?;
        Ok::<_, anyhow::Error>(
            outbox::release(&*client, &shared.relay_id, ids, batch.locked_until, reason).await?,
        )
    })
    .retry(transition_retry(&shared.config))
    .when(is_transient)
    .await;
    let relay_id = &shared.relay_id;
    let n = match released {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(
                error = %db::summarize_any(&e), %relay_id, rows = ids.len(),
                "could not give rows back; their leases will expire"
            );
            return;
        }
    };
    let not_held = (ids.len() as u64).saturating_sub(n);
    match why {
        GivenBack::Untried => tracing::info!(
            rows = n, not_held, %relay_id,
            "rows given back untried: the newer message of their aggregate was rejected"
        ),
        GivenBack::ShuttingDown => tracing::info!(
            rows = n, not_held, %relay_id, "rows given back unwritten: shutting down"
        ),
        GivenBack::LeaseTooShort => tracing::warn!(
            rows = n, not_held, %relay_id, lease_s = shared.config.lease_s,
            "rows given back unwritten: the lease would end before their writes could finish; raise relay.lease_s or lower relay.batch_size"
        ),
        GivenBack::Refused(error) => tracing::debug!(
            rows = n, not_held, %relay_id, error,
            "MongoDB refused every write of the batch: rows given back, no attempt counted"
        ),
    }
}

/// Extends the lease of rows whose write got no answer, to cover the wait in
/// `await_unanswered`. Returns the lease that now guards the batch's later
/// transitions on them.
async fn hold_unanswered(
    shared: &Shared,
    held: &Object,
    batch: &Batch,
    ids: &[i64],
) -> DateTime<Utc> {
    let extra = (shared.sink.timeout() * 3).as_secs_f64();
    let extended = (|| async {
        let client = connection(shared, held).await?;
        Ok::<_, anyhow::Error>(
            outbox::extend_lease(&*client, ids, &shared.relay_id, batch.locked_until, extra)
                .await?,
        )
    })
    .retry(transition_retry(&shared.config))
    .when(is_transient)
    .await;
    match extended {
        Ok(Some(until)) => until,
        Ok(None) => batch.locked_until,
        Err(e) => {
            tracing::warn!(
                error = %db::summarize_any(&e), relay_id = %shared.relay_id, rows = ids.len(),
                "could not extend the lease of rows whose write got no answer"
            );
            batch.locked_until
        }
    }
}

/// Records each row's outcome.
async fn mark(
    shared: &Shared,
    held: &Object,
    batch: &Batch,
    applied: Vec<i64>,
    notify: &[i64],
    failures: BTreeMap<(bool, String), Vec<i64>>,
) -> anyhow::Result<()> {
    let config = &shared.config;
    let retry = transition_retry(config);
    let rows_by_id: BTreeMap<i64, &outbox::Claimed> =
        batch.rows.iter().map(|r| (r.id, r)).collect();

    if !applied.is_empty() {
        let marked = (|| async {
            let client = connection(shared, held).await?;
            Ok::<_, anyhow::Error>(
                outbox::mark_synced(
                    &*client,
                    &applied,
                    notify,
                    &shared.relay_id,
                    batch.locked_until,
                )
                .await?,
            )
        })
        .retry(retry)
        .when(is_transient)
        .await?;
        metrics::counter!("outboxd_relay_rows_applied_total").increment(marked.len() as u64);
        let lag_seconds = metrics::histogram!("outboxd_relay_lag_seconds");
        for m in &marked {
            lag_seconds.record(m.lag_s);
            let row = rows_by_id[&m.id];
            tracing::debug!(
                outbox_id = row.id, email_id = row.email_id, idempotency_key = %row.idempotency_key,
                operation = %row.operation, relay_id = %shared.relay_id, lag_ms = m.lag_s * 1000.0,
                notifies = m.notifies, "synced"
            );
        }
        if marked.iter().any(|m| m.notifies) {
            shared.notify_wake.notify_one();
        }
        stale(shared, &applied, marked.iter().map(|m| m.id), &rows_by_id);
    }
    for ((permanent, error), ids) in failures {
        let moved = (|| async {
            let client = connection(shared, held).await?;
            Ok::<_, anyhow::Error>(
                outbox::mark_attempt_failed(
                    &*client,
                    &ids,
                    &shared.relay_id,
                    batch.locked_until,
                    &outbox::Failure {
                        error: &error,
                        permanent,
                    },
                    &outbox::RetryPolicy::of_rows(config),
                )
                .await?,
            )
        })
        .retry(retry)
        .when(is_transient)
        .await?;
        for (id, status) in &moved {
            let row = rows_by_id[id];
            if *status == Status::Failed {
                metrics::counter!("outboxd_relay_rows_failed_total").increment(1);
                tracing::warn!(
                    outbox_id = row.id, email_id = row.email_id, idempotency_key = %row.idempotency_key,
                    operation = %row.operation, relay_id = %shared.relay_id, attempts = row.attempts + 1,
                    error = %error, "failed"
                );
            } else {
                metrics::counter!("outboxd_relay_rows_retried_total").increment(1);
                tracing::debug!(
                    outbox_id = row.id, email_id = row.email_id, idempotency_key = %row.idempotency_key,
                    operation = %row.operation, relay_id = %shared.relay_id, attempts = row.attempts + 1,
                    error = %error, "will retry"
                );
            }
        }
        // Not applied, so not stale: rescue counted the attempt once the lease
        // ended, or a new holder has the row.
        for row in unmarked(&ids, moved.iter().map(|m| m.0), &rows_by_id) {
            tracing::debug!(
                outbox_id = row.id, email_id = row.email_id, idempotency_key = %row.idempotency_key,
                operation = %row.operation, relay_id = %shared.relay_id, error = %error,
                "failed attempt not recorded: the row was already taken back with its lease"
            );
        }
    }
    Ok(())
}

/// Waits out writes that got no answer, then counts their attempts. A write that
/// timed out may still land, and FerretDB's guarded update is not atomic: until
/// it surely has, its rows stay `processing` (which bars claims of their
/// aggregates even if this session dies) and their aggregates locked, or a newer
/// write could be overtaken by it. The wait may outlast the claim's lease, which
/// `hold_unanswered` extended so that rescue does not hand the rows on meanwhile.
async fn await_unanswered(
    shared: &Shared,
    client: &Object,
    held: &Batch,
    unanswered: BTreeMap<(bool, String), Vec<i64>>,
    outage: bool,
) -> anyhow::Result<()> {
    tokio::time::sleep(shared.sink.timeout() * 2).await;
    shared.heartbeat.beat();
    if outage {
        defer(shared, client, held, unanswered).await;
        return Ok(());
    }
    mark(shared, client, held, Vec::new(), &[], unanswered).await
}

/// Gives back rows whose writes an outage refused, with the reason and no
/// attempt counted: they are due again at once, and the worker's backoff while
/// MongoDB is down paces the next try.
async fn defer(
    shared: &Shared,
    held: &Object,
    batch: &Batch,
    refused: BTreeMap<(bool, String), Vec<i64>>,
) {
    for ((_, error), ids) in refused {
        give_back(shared, held, batch, &ids, GivenBack::Refused(&error)).await;
    }
}

/// The batch's own connection while it is open, else a pooled one. A worker thus
/// holds a second pooled connection only once its own broke, and marks cannot
/// starve for connections however many workers share the pool.
async fn connection<'a>(
    shared: &Shared,
    held: &'a Object,
) -> Result<Held<'a>, deadpool_postgres::PoolError> {
    if held.is_closed() {
        Ok(Held::Pooled(Box::new(shared.pool.get().await?)))
    } else {
        Ok(Held::Batch(held))
    }
}

enum Held<'a> {
    Batch(&'a Object),
    Pooled(Box<Object>),
}

impl std::ops::Deref for Held<'_> {
    type Target = Object;

    fn deref(&self) -> &Object {
        match self {
            Held::Batch(client) => client,
            Held::Pooled(client) => client,
        }
    }
}

/// Rows we applied but could not mark: their lease expired and another relay took
/// them; its outcome stands, and ours is dropped.
fn stale(
    shared: &Shared,
    expected: &[i64],
    marked: impl Iterator<Item = i64>,
    rows: &BTreeMap<i64, &outbox::Claimed>,
) {
    for row in unmarked(expected, marked, rows) {
        metrics::counter!("outboxd_relay_rows_stale_total").increment(1);
        tracing::warn!(
            outbox_id = row.id, email_id = row.email_id, idempotency_key = %row.idempotency_key,
            operation = %row.operation, relay_id = %shared.relay_id,
            "lease lost before the mark; leaving the row to its new holder"
        );
    }
}

/// The rows of `expected` that a mark did not move: their lease had gone to
/// rescue or to a new holder.
fn unmarked<'a>(
    expected: &[i64],
    marked: impl Iterator<Item = i64>,
    rows: &BTreeMap<i64, &'a outbox::Claimed>,
) -> Vec<&'a outbox::Claimed> {
    let marked: std::collections::HashSet<i64> = marked.collect();
    expected
        .iter()
        .filter(|id| !marked.contains(id))
        .map(|id| rows[id])
        .collect()
}

pub(crate) fn is_transient(e: &anyhow::Error) -> bool {
    if let Some(pg) = e.downcast_ref::<tokio_postgres::Error>() {
        return db::is_transient(pg);
    }
    if let Some(pool) = e.downcast_ref::<deadpool_postgres::PoolError>() {
        return db::pool_error_is_transient(pool);
    }
    false
}

impl Progress {
    pub fn rows(&self) -> usize {
        self.rows
    }
}
