//! Notification e-mails: one for each message whose MongoDB write changed the
//! document, owed from the moment its outbox row is marked synced (the same
//! statement records it in `outbox_notifications`), sent over SMTP by a task
//! of each relay apart from its MongoDB workers, at least once.
//!
//! The sender claims due rows with a lease, sends each mail (Message-ID from the
//! outbox id, so a resend after a crash is the same mail), and marks it sent, or
//! back to pending with backoff, or failed. While SMTP is down it probes instead
//! of claiming, so an outage costs each row at most one attempt.

pub mod mail;
pub mod smtp;
pub mod store;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Invalid, NotifyConfig};
use crate::db;
use crate::outbox::{Failure, RetryPolicy};
use crate::relay::health::Health;
use crate::relay::worker::is_transient;
use crate::status::MailStatus;
use mail::Composer;
use smtp::{SendError, Smtp};

/// One relay's notification sender.
pub struct Sender {
    relay_id: String,
    config: NotifyConfig,
    /// `notify.max_attempts`, with the outbox rows' backoff.
    retry: RetryPolicy,
    poll: Duration,
    pool: Pool,
    composer: Composer,
    smtp: Smtp,
    health: Health,
    /// Woken by a mark that created notifications.
    pub wake: Arc<Notify>,
}

/// What one round did.
enum Round {
    /// Rows claimed (and how many); SMTP answered.
    Sent(usize),
    /// Nothing due.
    Idle,
    /// SMTP is down: wait, then probe.
    Down,
}

impl Sender {
    /// Checks `[notify]` (addresses, templates, URL, password); errors are
    /// configuration errors. Connects to nothing: a relay starts and syncs
    /// MongoDB while the SMTP server is down.
    pub fn new(config: &Config, relay_id: &str, pool: Pool) -> Result<Sender, Invalid> {
        Ok(Sender {
            relay_id: relay_id.to_owned(),
            composer: Composer::new(&config.notify)?,
            smtp: Smtp::new(&config.notify)?,
            config: config.notify.clone(),
            retry: RetryPolicy {
                max_attempts: config.notify.max_attempts,
                ..RetryPolicy::of_rows(&config.relay)
            },
            poll: Duration::from_millis(config.relay.poll_interval_ms),
            pool,
            health: Health::new("SMTP"),
            wake: Arc::new(Notify::new()),
        })
    }

    /// Sends until `shutdown`; the batch in hand is finished first.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let schedule = || crate::relay::retry_forever(Duration::from_millis(500), self.poll * 5);
        let mut backoff = schedule();
        let mut failing: Option<String> = None;
        while !shutdown.is_cancelled() {
            let pause = match self.round(&shutdown).await {
                Ok(round) => {
                    if failing.take().is_some() {
                        tracing::info!(relay_id = %self.relay_id, "notification rounds succeed again");
                    }
                    match round {
                        Round::Sent(n) if n as i64 >= self.config.batch_size => {
                            backoff = schedule();
                            continue;
                        }
                        Round::Sent(_) | Round::Idle => {
                            backoff = schedule();
                            self.idle_wait().await
                        }
                        Round::Down => backoff.next().unwrap_or(self.poll),
                    }
                }
                Err(e) => {
                    let error = db::summarize_any(&e);
                    if failing.as_ref() != Some(&error) {
                        tracing::error!(error = %error, relay_id = %self.relay_id,
                            "notification round failed; retrying with backoff");
                    }
                    failing = Some(error);
                    backoff.next().unwrap_or(self.poll)
                }
            };
            let woken = !self.health.is_down() && failing.is_none();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified(), if woken => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Until the earliest pending row is due, at most the poll interval.
    async fn idle_wait(&self) -> Duration {
        let due = match self.pool.get().await {
            Ok(client) => store::next_due(&client).await.ok().flatten(),
            Err(_) => None,
        };
        due.and_then(|d| (d - chrono::Utc::now()).to_std().ok())
            .unwrap_or(self.poll)
            .clamp(Duration::from_millis(20), self.poll)
    }

    /// One claim, its sends and their marks.
    async fn round(&self, shutdown: &CancellationToken) -> anyhow::Result<Round> {
        if self.health.is_down() {
            // A probe, not a claim: rows keep their attempts through an outage.
            if let Err(e) = self.smtp.probe().await {
                self.health.failed(&e);
                return Ok(Round::Down);
            }
        }
        let lease = Duration::from_secs(self.config.lease_s);
        let send_time = self.smtp.timeout() * 2;
        // No send starts that could outlast the lease (with a margin for marks).
        let last_start = Instant::now() + lease.saturating_sub(send_time + lease / 10);
        let claim = {
            let client = self.pool.get().await?;
            store::claim(
                &client,
                &self.relay_id,
                self.config.batch_size,
                self.config.lease_s as f64,
            )
            .await?
        };
        if claim.rows.is_empty() {
            return Ok(Round::Idle);
        }
        let claimed = claim.rows.len();
        let results: Vec<(i64, Result<(), SendError>)> =
            futures_util::stream::iter(claim.rows.clone())
                .map(|n| async move {
                    if shutdown.is_cancelled() || Instant::now() > last_start {
                        return (n.outbox_id, Err(SendError::NotStarted));
                    }
                    let result = match self.composer.compose(&n) {
                        Ok(message) => self.smtp.send(message).await,
                        Err(e) => Err(SendError::Permanent(e)),
                    };
                    (n.outbox_id, result)
                })
                .buffer_unordered(self.config.concurrency.max(1))
                .collect()
                .await;
        let mut sent = Vec::new();
        let mut not_started = Vec::new();
        let mut failures: BTreeMap<(bool, String), Vec<i64>> = BTreeMap::new();
        for (id, result) in results {
            match result {
                Ok(()) => sent.push(id),
                Err(SendError::NotStarted) => not_started.push(id),
                Err(SendError::Permanent(e)) => failures.entry((true, e)).or_default().push(id),
                Err(SendError::Transient(e)) => failures.entry((false, e)).or_default().push(id),
            }
        }
        let down = failures.keys().find(|(permanent, _)| !permanent);
        match down {
            Some((_, error)) => self.health.failed(error),
            None if !sent.is_empty() || !failures.is_empty() => self.health.ok(),
            None => {}
        }
        let down = down.is_some();
        self.mark(&claim, sent, not_started, failures).await?;
        Ok(if down {
            Round::Down
        } else {
            Round::Sent(claimed)
        })
    }

    /// Records each send's outcome, retrying PostgreSQL while the lease lasts.
    async fn mark(
        &self,
        claim: &store::Claim,
        sent: Vec<i64>,
        not_started: Vec<i64>,
        failures: BTreeMap<(bool, String), Vec<i64>>,
    ) -> anyhow::Result<()> {
        let retry = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .with_total_delay(Some(Duration::from_secs(self.config.lease_s / 2)));
        let (relay_id, until) = (self.relay_id.as_str(), claim.locked_until);
        let attempts: BTreeMap<i64, i32> = claim
            .rows
            .iter()
            .map(|n| (n.outbox_id, n.attempts))
            .collect();
        if !sent.is_empty() {
            let marked = (|| async {
                let client = self.pool.get().await?;
                Ok::<_, anyhow::Error>(store::mark_sent(&client, &sent, relay_id, until).await?)
            })
            .retry(retry)
            .when(is_transient)
            .await?;
            metrics::counter!("outboxd_notify_sent_total").increment(sent.len() as u64);
            for id in &sent {
                if !marked.contains(id) {
                    tracing::warn!(
                        outbox_id = id,
                        relay_id,
                        "notification sent after its lease ended: it may be sent again, with the same Message-ID"
                    );
                }
            }
        }
        if !not_started.is_empty() {
            let client = self.pool.get().await?;
            store::release(&client, &not_started, relay_id, until).await?;
        }
        for ((permanent, error), ids) in failures {
            let moved = (|| async {
                let client = self.pool.get().await?;
                Ok::<_, anyhow::Error>(
                    store::mark_attempt_failed(
                        &client,
                        &ids,
                        relay_id,
                        until,
                        &Failure {
                            error: &error,
                            permanent,
                        },
                        &self.retry,
                    )
                    .await?,
                )
            })
            .retry(retry)
            .when(is_transient)
            .await?;
            for (id, status) in moved {
                let attempts = attempts.get(&id).copied().unwrap_or(0) + 1;
                if status == MailStatus::Failed {
                    metrics::counter!("outboxd_notify_failed_total").increment(1);
                    tracing::warn!(outbox_id = id, relay_id, attempts, error = %error,
                        "notification failed");
                } else {
                    metrics::counter!("outboxd_notify_retried_total").increment(1);
                    tracing::debug!(outbox_id = id, relay_id, attempts, error = %error,
                        "notification will retry");
                }
            }
        }
        Ok(())
    }

    /// Lease rescue, every poll interval, and the gauges.
    pub async fn rescue(&self) -> anyhow::Result<()> {
        let client = self.pool.get().await?;
        let limit = 1000;
        for (id, status, held_by) in
            store::rescue_expired(&client, self.config.max_attempts, limit).await?
        {
            let counter = if status == MailStatus::Failed {
                "outboxd_notify_failed_total"
            } else {
                "outboxd_notify_retried_total"
            };
            metrics::counter!(counter).increment(1);
            tracing::warn!(outbox_id = id, held_by = ?held_by, status = %status,
                "notification lease expired: taken back (it may have been sent: a resend has the same Message-ID)");
        }
        let counts = store::counts(&client).await?;
        for (status, n) in counts {
            match status {
                MailStatus::Pending => metrics::gauge!("outboxd_notify_pending_rows").set(n as f64),
                MailStatus::Failed => metrics::gauge!("outboxd_notify_failed_rows").set(n as f64),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Deletes sent notifications older than the retention, in batches.
pub async fn clean_up(
    client: &impl deadpool_postgres::GenericClient,
    retention_s: f64,
    limit: i64,
) -> Result<u64, tokio_postgres::Error> {
    store::delete_sent_before(client, retention_s, limit).await
}
