//! Every SQL statement on the outbox: the ingest write, claims, marks, rescue,
//! housekeeping and the operator queries. State transitions name the state (and
//! owner) they expect, and callers check the row count.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::Value;
use tokio_postgres::Error;

use crate::ingest::webhook::Event;
use crate::status::Status;

pub mod current;

/// The channel relays LISTEN on and ingest NOTIFYs.
pub const CHANNEL: &str = "outboxd_outbox";

/// What ingest answers with: the ids the event got when it was first accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub email_id: i64,
    pub outbox_id: Option<i64>,
    /// `None` once retention deleted the outbox row, as `outbox_id`.
    pub idempotency_key: Option<String>,
}

/// The ingest statement. Parameters: $1 key, $2 webhook_id, $3 TTL in seconds,
/// $4 ticket_id, $5 message_id, $6 from, $7 subject, $8 body, $9 received_at,
/// $10 operation, $11 aggregate_id, $12 payload. The benchmark runs it verbatim
/// under pgbench.
pub const ENQUEUE: &str = "
        WITH k AS (
            INSERT INTO idempotency_keys (key, webhook_id, email_id, outbox_id, expires_at)
            VALUES ($1, $2, pg_catalog.nextval('incoming_emails_id_seq'), pg_catalog.nextval('outbox_messages_id_seq'),
                    now() + $3::float8 * interval '1 second')
            ON CONFLICT (key) DO UPDATE
                SET webhook_id = EXCLUDED.webhook_id, email_id = EXCLUDED.email_id,
                    outbox_id = EXCLUDED.outbox_id, created_at = now(), expires_at = EXCLUDED.expires_at
                WHERE idempotency_keys.expires_at <= now()
            RETURNING email_id, outbox_id),
        e AS (
            INSERT INTO incoming_emails (id, webhook_id, ticket_id, message_id, from_address, subject, body, received_at)
            SELECT email_id, $2, $4, $5, $6, $7, $8, $9 FROM k
            RETURNING id),
        o AS (
            INSERT INTO outbox_messages (id, operation, aggregate_id, payload, email_id, idempotency_key)
            SELECT k.outbox_id, $10, $11, $12, e.id, $1 FROM k, e
            RETURNING id, email_id)
        SELECT email_id, id FROM o";

/// Records the e-mail, its outbox message and its idempotency key in one statement,
/// hence one transaction. `Ok(None)` when the key is already held (a duplicate).
/// A `webhook_id` seen before fails with the unique violation of
/// `incoming_emails_webhook_id_key`, and nothing is written.
pub async fn enqueue(
    client: &impl GenericClient,
    event: &Event,
    ttl_s: f64,
) -> Result<Option<Accepted>, Error> {
    let stmt = client.prepare_cached(ENQUEUE).await?;
    let row = client
        .query_opt(
            &stmt,
            &[
                &event.idempotency_key,
                &event.webhook_id,
                &ttl_s,
                &event.ticket_id,
                &event.message_id,
                &event.from,
                &event.subject,
                &event.body,
                &event.received_at,
                &crate::idempotency::UPDATE_CREDITOR_DEBT,
                &event.aggregate_id,
                &event.payload,
            ],
        )
        .await?;
    Ok(row.map(|r| Accepted {
        email_id: r.get(0),
        outbox_id: Some(r.get(1)),
        idempotency_key: Some(event.idempotency_key.clone()),
    }))
}

/// The first answer for an idempotency key that has not expired.
pub async fn accepted_by_key(
    client: &impl GenericClient,
    key: &str,
) -> Result<Option<Accepted>, Error> {
    let stmt = client
        .prepare_cached("SELECT email_id, outbox_id FROM idempotency_keys WHERE key = $1 AND expires_at > now()")
        .await?;
    Ok(client.query_opt(&stmt, &[&key]).await?.map(|r| Accepted {
        email_id: r.get(0),
        outbox_id: Some(r.get(1)),
        idempotency_key: Some(key.to_owned()),
    }))
}

/// The first answer for a webhook id, from the e-mail and its outbox row.
pub async fn accepted_by_webhook(
    client: &impl GenericClient,
    webhook_id: &str,
) -> Result<Option<Accepted>, Error> {
    let stmt = client
        .prepare_cached(
            "SELECT e.id, o.id, o.idempotency_key FROM incoming_emails e
             LEFT JOIN outbox_messages o ON o.email_id = e.id
             WHERE e.webhook_id = $1 ORDER BY o.id LIMIT 1",
        )
        .await?;
    Ok(client
        .query_opt(&stmt, &[&webhook_id])
        .await?
        .map(|r| Accepted {
            email_id: r.get(0),
            outbox_id: r.get(1),
            idempotency_key: r.get(2),
        }))
}

/// Wakes listening relays. Sent by ingest after commit, coalesced.
pub async fn notify(client: &impl GenericClient) -> Result<(), Error> {
    client
        .execute("SELECT pg_catalog.pg_notify($1, '')", &[&CHANNEL])
        .await
        .map(|_| ())
}

/// Subscribes a relay's dedicated connection to those wake-ups.
pub async fn listen(client: &tokio_postgres::Client) -> Result<(), Error> {
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await
}

/// One outbox row held by a relay, with what the MongoDB document needs.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub operation: String,
    pub aggregate_id: String,
    /// `Err` names why the stored jsonb cannot be read as JSON here (a number
    /// past f64, or nesting past serde_json's limit, as a DBA's edit can leave).
    pub payload: Result<Value, String>,
    pub email_id: i64,
    pub idempotency_key: String,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub ticket_id: i64,
    pub webhook_id: String,
    /// A message of this aggregate was synced before: its document most likely
    /// exists, so the sink updates it without trying an insert first.
    pub known: bool,
}

impl Claimed {
    /// From a row whose first ten columns are, in order: id, operation,
    /// aggregate_id, payload, email_id, idempotency_key, attempts, created_at,
    /// ticket_id, webhook_id (as `claim` returns them), and, if present, the
    /// twelfth `known` (the eleventh is the claim's lease).
    pub fn from_row(r: &tokio_postgres::Row) -> Claimed {
        Claimed {
            id: r.get(0),
            operation: r.get(1),
            aggregate_id: r.get(2),
            payload: r.try_get(3).map_err(|e| {
                let cause = std::error::Error::source(&e).map_or(e.to_string(), |c| c.to_string());
                format!("payload cannot be read as JSON: {cause}")
            }),
            email_id: r.get(4),
            idempotency_key: r.get(5),
            attempts: r.get(6),
            created_at: r.get(7),
            ticket_id: r.get(8),
            webhook_id: r.get(9),
            known: r.len() > 11 && r.get::<_, bool>(11),
        }
    }
}

/// A claimed batch and the lease that guards every later transition on it.
#[derive(Debug, Clone)]
pub struct Batch {
    pub rows: Vec<Claimed>,
    pub locked_until: DateTime<Utc>,
}

/// `claim`'s statement: $1 relay id, $2 limit, $3 lease in seconds, $4 the
/// aggregate lock class. Public for the test that reads its plan.
pub const CLAIM: &str = "
        WITH retry AS (
            SELECT id FROM outbox_messages
            WHERE status = 'pending' AND attempts > 0 AND next_attempt_at <= now()
              -- The planner runs the lock before the busy check: it may lock
              -- an aggregate another relay is writing, which only delays it,
              -- but skips rows of aggregates other claims hold at little cost.
              AND NOT EXISTS (SELECT 1 FROM outbox_messages busy
                              WHERE busy.aggregate_id = outbox_messages.aggregate_id
                                AND busy.status = 'processing')
              AND pg_catalog.pg_try_advisory_lock($4, pg_catalog.hashtext(aggregate_id))
            ORDER BY next_attempt_at, id LIMIT $2
            FOR UPDATE SKIP LOCKED),
        fresh AS (
            SELECT id FROM outbox_messages
            WHERE status = 'pending' AND attempts = 0 AND next_attempt_at <= now()
              AND (SELECT count(*) FROM retry) < $2
              AND NOT EXISTS (SELECT 1 FROM outbox_messages busy
                              WHERE busy.aggregate_id = outbox_messages.aggregate_id
                                AND busy.status = 'processing')
              AND pg_catalog.pg_try_advisory_lock($4, pg_catalog.hashtext(aggregate_id))
            -- A constant limit (in a custom plan): the planner reads any other
            -- as a tenth of the rows, and might sort them all instead.
            ORDER BY id LIMIT $2
            FOR UPDATE SKIP LOCKED),
        due AS (
            SELECT id FROM retry
            UNION ALL
            (SELECT id FROM fresh ORDER BY id LIMIT $2 - (SELECT count(*) FROM retry)))
        UPDATE outbox_messages o
        SET status = 'processing', locked_by = $1, locked_until = now() + $3::float8 * interval '1 second',
            updated_at = now()
        FROM incoming_emails e
        -- An array, not a join: the rows are found by primary key whatever
        -- count the planner guesses for `due`.
        WHERE o.id = ANY(ARRAY(SELECT id FROM due)) AND e.id = o.email_id
        RETURNING o.id, o.operation, o.aggregate_id, o.payload, o.email_id, o.idempotency_key,
                  o.attempts, o.created_at, e.ticket_id, e.webhook_id, o.locked_until,
                  -- Claimed::known: the sink skips the insert it would try first.
                  EXISTS (SELECT 1 FROM outbox_messages p
                          WHERE p.aggregate_id = o.aggregate_id AND p.status = 'synced') AS known";

/// Claims up to `limit` due pending rows, skipping rows other relays hold: first
/// the retries that are due, in the order they came due
/// (`outbox_messages_retry_idx`), then rows never tried, in id order
/// (`outbox_messages_fresh_idx`). A retry backing off sits outside its index's
/// due range, so a claim never reads past one; its cost grows with the rows it
/// skips because their aggregate is busy (or a DBA postponed them), never with
/// the backlog.
///
/// No two relays write one document at once, because FerretDB's guarded updates
/// are not atomic under concurrency. So a claim skips aggregates with a row in
/// flight (its lease outlives a holder whose session died mid-write), and takes a
/// session-level advisory lock per aggregate as it reads, skipping on past one
/// another session holds: that closes the race between two concurrent claims,
/// and a frozen relay's locks hold back only its own aggregates. When retries
/// fill part of the batch, the new rows read beyond the rest free at the
/// transaction's end, but their aggregates stay locked with the others: at
/// most `limit` more, for one batch. The caller releases the locks with
/// `unlock_aggregates` once its writes are done; a relay that dies frees them
/// with its session.
pub async fn claim(
    client: &impl GenericClient,
    relay_id: &str,
    limit: i64,
    lease_s: f64,
) -> Result<Batch, Error> {
    let stmt = client.prepare_cached(CLAIM).await?;
    let rows = client
        .query(&stmt, &[&relay_id, &limit, &lease_s, &AGGREGATE_LOCK_CLASS])
        .await?;
    let locked_until = rows.first().map(|r| r.get(10)).unwrap_or_else(Utc::now);
    let mut rows: Vec<Claimed> = rows.iter().map(Claimed::from_row).collect();
    rows.sort_by_key(|r| r.id);
    Ok(Batch { rows, locked_until })
}

/// Marks held rows synced, and their e-mails with them; for the ids in `notify`
/// (writes that changed the document), records the notification owed, in the
/// same statement, once per outbox id ever. Returns each id marked, its
/// commit-to-apply lag in seconds, and whether it created a notification; a
/// missing id had lost its lease.
pub async fn mark_synced(
    client: &impl GenericClient,
    ids: &[i64],
    notify: &[i64],
    relay_id: &str,
    locked_until: DateTime<Utc>,
) -> Result<Vec<Marked>, Error> {
    // The previous amount comes from the aggregate's newest earlier synced row
    // in the statement's snapshot: what the document held before this write.
    const SQL: &str = "
        WITH done AS (
            UPDATE outbox_messages
            SET status = 'synced', synced_at = now(), updated_at = now(),
                locked_by = NULL, locked_until = NULL, last_error = NULL
            WHERE id = ANY($1) AND status = 'processing' AND locked_by = $2 AND locked_until = $3
            RETURNING id, email_id, aggregate_id, payload, resent_at,
                      extract(epoch FROM synced_at - coalesce(resent_at, created_at))::float8 AS lag),
        emails AS (
            UPDATE incoming_emails SET sync_status = 'synced'
            WHERE id IN (SELECT email_id FROM done) AND sync_status <> 'synced'),
        owed AS (
            INSERT INTO outbox_notifications
                (outbox_id, aggregate_id, client_reference, creditor_name, amount, currency,
                 previous_amount, previous_currency, email_id, ticket_id, email_message_id,
                 email_from, email_subject)
            SELECT d.id, d.aggregate_id, coalesce(d.payload->>'client_reference', ''),
                   coalesce(d.payload->>'creditor_name', ''), coalesce(d.payload->>'amount', ''),
                   coalesce(d.payload->>'currency', ''), prev.payload->>'amount',
                   prev.payload->>'currency', d.email_id, e.ticket_id, e.message_id,
                   e.from_address, e.subject
            FROM done d
            JOIN incoming_emails e ON e.id = d.email_id
            LEFT JOIN LATERAL (
                SELECT p.payload FROM outbox_messages p
                WHERE p.aggregate_id = d.aggregate_id AND p.status = 'synced' AND p.id < d.id
                ORDER BY p.id DESC LIMIT 1) prev ON true
            -- A row sent again (resent_at) mailed when it first synced.
            WHERE d.id = ANY($4) AND d.resent_at IS NULL
            ON CONFLICT (outbox_id) DO NOTHING
            RETURNING outbox_id)
        SELECT id, lag, id IN (SELECT outbox_id FROM owed) FROM done";
    let stmt = client.prepare_cached(SQL).await?;
    let rows = client
        .query(&stmt, &[&ids, &relay_id, &locked_until, &notify])
        .await?;
    Ok(rows
        .iter()
        .map(|r| Marked {
            id: r.get(0),
            lag_s: r.get(1),
            notifies: r.get(2),
        })
        .collect())
}

/// One row `mark_synced` marked.
#[derive(Debug, Clone, Copy)]
pub struct Marked {
    pub id: i64,
    /// Commit-to-apply lag, in seconds.
    pub lag_s: f64,
    /// Whether marking it created a notification.
    pub notifies: bool,
}

/// Extends the lease of held rows to at least `now + extra_s`, so that rescue
/// leaves them alone while a write of theirs may still land. Returns the new
/// lease, or `None` when none of them was still held.
pub async fn extend_lease(
    client: &impl GenericClient,
    ids: &[i64],
    relay_id: &str,
    locked_until: DateTime<Utc>,
    extra_s: f64,
) -> Result<Option<DateTime<Utc>>, Error> {
    const SQL: &str = "
        UPDATE outbox_messages
        SET locked_until = greatest(locked_until, now() + $4::float8 * interval '1 second'),
            updated_at = now()
        WHERE id = ANY($1) AND status = 'processing' AND locked_by = $2 AND locked_until = $3
        RETURNING locked_until";
    let stmt = client.prepare_cached(SQL).await?;
    let rows = client
        .query(&stmt, &[&ids, &relay_id, &locked_until, &extra_s])
        .await?;
    Ok(rows.first().map(|r| r.get(0)))
}

/// The next attempt of a row that failed `attempts` times, as SQL: `now +
/// min(cap, base·2^attempts)` with equal jitter, `$7` the base and `$8` the cap
/// in ms. Shared by the outbox and the notifications (`notify::store`).
#[macro_export]
macro_rules! backoff_sql {
    () => {
        // Capped exponent: 2^1024 overflows float8, and 2^60 times even 1 ms outlasts any cap.
        "now() + least($8::float8, $7::float8 * pg_catalog.power(2, least(attempts, 60)))
         * (0.5 + random() / 2) * interval '1 millisecond'"
    };
}

/// Records a failed attempt on held rows: back to `pending` at
/// `now + min(cap, base·2^attempts)` with equal jitter, or `failed` (and the e-mail
/// with it) when `permanent` or out of attempts. Returns `(id, status)` per row moved.
#[allow(clippy::too_many_arguments)]
pub async fn mark_attempt_failed(
    client: &impl GenericClient,
    ids: &[i64],
    relay_id: &str,
    locked_until: DateTime<Utc>,
    failure: &Failure<'_>,
    retry: &RetryPolicy,
) -> Result<Vec<(i64, Status)>, Error> {
    const SQL: &str = concat!(
        "
        WITH moved AS (
            UPDATE outbox_messages
            SET attempts = attempts + 1,
                status = CASE WHEN $5 OR attempts + 1 >= $6 THEN 'failed' ELSE 'pending' END,
                next_attempt_at = ",
        crate::backoff_sql!(),
        ",
                last_error = $4, locked_by = NULL, locked_until = NULL, updated_at = now()
            WHERE id = ANY($1) AND status = 'processing' AND locked_by = $2 AND locked_until = $3
            RETURNING id, email_id, status),
        emails AS (
            UPDATE incoming_emails SET sync_status = 'failed'
            WHERE id IN (SELECT email_id FROM moved WHERE status = 'failed'))
        SELECT id, status FROM moved"
    );
    let stmt = client.prepare_cached(SQL).await?;
    let rows = client
        .query(
            &stmt,
            &[
                &ids,
                &relay_id,
                &locked_until,
                &failure.error,
                &failure.permanent,
                &retry.max_attempts,
                &retry.base_ms,
                &retry.cap_ms,
            ],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Why an attempt failed: the error recorded, and whether retrying is useless.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    pub error: &'a str,
    pub permanent: bool,
}

/// When a failed attempt is retried, and when it is given up: the `relay` or
/// `notify` section's `max_attempts` and backoff (`backoff_sql!`).
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: i32,
    pub base_ms: f64,
    pub cap_ms: f64,
}

impl RetryPolicy {
    /// Outbox rows': `relay.max_attempts` and its backoff.
    pub fn of_rows(relay: &crate::config::RelayConfig) -> RetryPolicy {
        RetryPolicy {
            max_attempts: relay.max_attempts,
            base_ms: relay.backoff_base_ms as f64,
            cap_ms: relay.backoff_cap_ms as f64,
        }
    }
}

/// Advisory-lock class for "this session writes this aggregate to MongoDB now".
pub const AGGREGATE_LOCK_CLASS: i32 = 0x6f62; // "ob"

/// Releases every aggregate lock this session holds (see `claim`).
pub async fn unlock_aggregates(client: &impl GenericClient) -> Result<(), Error> {
    client
        .execute("SELECT pg_advisory_unlock_all()", &[])
        .await
        .map(|_| ())
}

/// Gives held rows back unwritten: `pending`, due now, attempts unchanged;
/// `reason`, when given (an outage refused their writes), becomes their
/// `last_error` for the DBA. Returns how many were still held.
pub async fn release(
    client: &impl GenericClient,
    relay_id: &str,
    ids: &[i64],
    locked_until: DateTime<Utc>,
    reason: Option<&str>,
) -> Result<u64, Error> {
    const SQL: &str = "
        UPDATE outbox_messages
        SET status = 'pending', locked_by = NULL, locked_until = NULL, next_attempt_at = now(),
            last_error = coalesce($4, last_error), updated_at = now()
        WHERE id = ANY($1) AND status = 'processing' AND locked_by = $2 AND locked_until = $3";
    let stmt = client.prepare_cached(SQL).await?;
    client
        .execute(&stmt, &[&ids, &relay_id, &locked_until, &reason])
        .await
}

/// `extend_lease` for every row a relay still holds, when its shutdown cut their
/// writes short. Returns how many, and when the last lease now ends.
pub async fn extend_held(
    client: &impl GenericClient,
    relay_id: &str,
    extra_s: f64,
) -> Result<(usize, Option<DateTime<Utc>>), Error> {
    const SQL: &str = "
        UPDATE outbox_messages
        SET locked_until = greatest(locked_until, now() + $2::float8 * interval '1 second'),
            updated_at = now()
        WHERE status = 'processing' AND locked_by = $1
        RETURNING locked_until";
    let stmt = client.prepare_cached(SQL).await?;
    let rows = client.query(&stmt, &[&relay_id, &extra_s]).await?;
    let last = rows.iter().map(|r| r.get::<_, DateTime<Utc>>(0)).max();
    Ok((rows.len(), last))
}

/// A row taken back from a relay whose lease on it expired.
#[derive(Debug, Clone)]
pub struct Rescued {
    pub id: i64,
    pub email_id: i64,
    pub idempotency_key: String,
    pub operation: String,
    /// `Pending`, or `Failed` when out of attempts.
    pub status: Status,
    pub attempts: i32,
    /// The relay that held it.
    pub held_by: Option<String>,
}

/// Takes back rows whose relay died (lease expired): `pending` again with the attempt
/// counted, or `failed` when out of attempts. Returns the rows moved.
pub async fn rescue_expired(
    client: &impl GenericClient,
    max_attempts: i32,
    limit: i64,
) -> Result<Vec<Rescued>, Error> {
    const SQL: &str = "
        WITH expired AS (
            SELECT id, locked_by FROM outbox_messages
            WHERE status = 'processing' AND locked_until < now()
            ORDER BY locked_until LIMIT $2
            FOR UPDATE SKIP LOCKED),
        moved AS (
            UPDATE outbox_messages o
            SET attempts = o.attempts + 1,
                status = CASE WHEN o.attempts + 1 >= $1 THEN 'failed' ELSE 'pending' END,
                last_error = 'lease expired while held by ' || o.locked_by,
                next_attempt_at = now(), locked_by = NULL, locked_until = NULL, updated_at = now()
            FROM expired
            WHERE o.id = expired.id AND o.status = 'processing' AND o.locked_until < now()
            RETURNING o.id, o.email_id, o.idempotency_key, o.operation, o.status, o.attempts,
                      expired.locked_by),
        emails AS (
            UPDATE incoming_emails SET sync_status = 'failed'
            WHERE id IN (SELECT email_id FROM moved WHERE status = 'failed'))
        SELECT * FROM moved ORDER BY id";
    let stmt = client.prepare_cached(SQL).await?;
    let rows = client.query(&stmt, &[&max_attempts, &limit]).await?;
    Ok(rows
        .iter()
        .map(|r| Rescued {
            id: r.get(0),
            email_id: r.get(1),
            idempotency_key: r.get(2),
            operation: r.get(3),
            status: r.get(4),
            attempts: r.get(5),
            held_by: r.get(6),
        })
        .collect())
}

/// When the earliest pending row comes due, if any.
pub async fn next_due(client: &impl GenericClient) -> Result<Option<DateTime<Utc>>, Error> {
    let stmt = client
        .prepare_cached("SELECT min(next_attempt_at) FROM outbox_messages WHERE status = 'pending'")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}

/// Deletes up to `limit` synced rows older than the retention period, but never
/// an aggregate's newest synced row: PostgreSQL keeps each aggregate's current
/// state for as long as it exists (`creditor_debts_current`, `audit --all`,
/// `resync`). The EXISTS reads `outbox_messages_aggregate_idx`.
pub async fn delete_synced_before(
    client: &impl GenericClient,
    retention_s: f64,
    limit: i64,
) -> Result<u64, Error> {
    client
        .execute(
            "DELETE FROM outbox_messages WHERE id IN (
                 SELECT id FROM outbox_messages o
                 WHERE status = 'synced' AND synced_at < now() - $1::float8 * interval '1 second'
                   AND EXISTS (SELECT 1 FROM outbox_messages newer
                               WHERE newer.aggregate_id = o.aggregate_id AND newer.id > o.id
                                 AND newer.status = 'synced')
                 LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&retention_s, &limit],
        )
        .await
}

/// Deletes up to `limit` expired idempotency keys. No `FOR UPDATE`: it needs
/// UPDATE rights, which the relay's role has no business holding on keys; two
/// relays deleting the same key just wait for each other. The outer test of
/// `expires_at` spares a key that ingest took over meanwhile (a new event with
/// the same content): the subquery saw it expired, the delete sees it renewed.
pub async fn delete_expired_keys(client: &impl GenericClient, limit: i64) -> Result<u64, Error> {
    client
        .execute(
            "DELETE FROM idempotency_keys WHERE expires_at <= now() AND key IN (
                 SELECT key FROM idempotency_keys WHERE expires_at <= now() LIMIT $1)",
            &[&limit],
        )
        .await
}

/// Rows per status, for `outboxd status`. Each count names its status as a
/// constant, so that it reads that status's partial index: a status given as a
/// parameter or a column makes every count scan the whole table.
pub async fn counts(client: &impl GenericClient) -> Result<Vec<(Status, i64)>, Error> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM outbox_messages WHERE status = 'pending'),
                    (SELECT count(*) FROM outbox_messages WHERE status = 'processing'),
                    (SELECT count(*) FROM outbox_messages WHERE status = 'synced'),
                    (SELECT count(*) FROM outbox_messages WHERE status = 'failed')",
            &[],
        )
        .await?;
    // In the order of the statement's columns.
    Ok(Status::ALL
        .iter()
        .enumerate()
        .map(|(i, status)| (*status, row.get(i)))
        .collect())
}

/// One page of `requeue_failed`: the ids moved, and how many rows were picked and
/// the last of them (rows another command moved first are picked, not moved).
pub struct Requeued {
    pub moved: Vec<i64>,
    pub picked: i64,
    pub last_picked: Option<i64>,
}

/// Moves up to `limit` failed rows with ids above `after` back to `pending`, with
/// attempts reset, and their e-mails too. `ids` and `since` narrow the set; both
/// `None` means every failed row.
pub async fn requeue_failed(
    client: &impl GenericClient,
    ids: Option<&[i64]>,
    since: Option<DateTime<Utc>>,
    after: i64,
    limit: i64,
) -> Result<Requeued, Error> {
    const SQL: &str = "
        WITH picked AS (
            SELECT id FROM outbox_messages
            WHERE status = 'failed' AND id > $3
              AND ($1::bigint[] IS NULL OR id = ANY($1))
              AND ($2::timestamptz IS NULL OR updated_at >= $2)
            ORDER BY id LIMIT $4),
        moved AS (
            UPDATE outbox_messages o
            SET status = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now()
            FROM picked
            WHERE o.id = picked.id AND o.status = 'failed'
            RETURNING o.id, o.email_id),
        emails AS (
            UPDATE incoming_emails SET sync_status = 'pending'
            WHERE id IN (SELECT email_id FROM moved))
        SELECT ARRAY(SELECT id FROM moved ORDER BY id),
               (SELECT count(*) FROM picked), (SELECT max(id) FROM picked)";
    let row = client
        .query_one(SQL, &[&ids, &since, &after, &limit])
        .await?;
    Ok(Requeued {
        moved: row.get(0),
        picked: row.get(1),
        last_picked: row.get(2),
    })
}

/// The status of each of `ids` that exists.
pub async fn statuses(
    client: &impl GenericClient,
    ids: &[i64],
) -> Result<Vec<(i64, Status)>, Error> {
    let rows = client
        .query(
            "SELECT id, status FROM outbox_messages WHERE id = ANY($1) ORDER BY id",
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Requeues synced rows whose documents are missing, behind or ahead (`audit
/// --all --repair`, `resync`), marked `resent_at` so that their write does not
/// notify again. Returns how many were still synced.
pub async fn requeue_synced(client: &impl GenericClient, ids: &[i64]) -> Result<u64, Error> {
    const SQL: &str = "
        WITH moved AS (
            UPDATE outbox_messages
            SET status = 'pending', attempts = 0, synced_at = NULL, next_attempt_at = now(),
                updated_at = now(), resent_at = now()
            WHERE id = ANY($1) AND status = 'synced'
            RETURNING email_id),
        emails AS (
            UPDATE incoming_emails SET sync_status = 'pending' WHERE id IN (SELECT email_id FROM moved))
        SELECT count(*) FROM moved";
    let n: i64 = client.query_one(SQL, &[&ids]).await?.get(0);
    Ok(n as u64)
}

/// The last outbox id the sequence issued (`None` when `id` has no sequence),
/// and the table's highest id (0 when empty). The sequence is read directly:
/// `pg_sequence_last_value` reads as NULL once it was restarted.
pub async fn id_marks(client: &impl GenericClient) -> Result<(Option<i64>, i64), Error> {
    const SQL: &str = "
        SELECT coalesce(max(id), 0), pg_catalog.pg_get_serial_sequence('outbox_messages', 'id')
        FROM outbox_messages";
    let row = client.query_one(SQL, &[]).await?;
    let (max_id, sequence): (i64, Option<String>) = (row.get(0), row.get(1));
    let Some(sequence) = sequence else {
        return Ok((None, max_id));
    };
    // The name comes quoted from the catalog.
    let sql = format!(
        "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {sequence}"
    );
    let issued: i64 = client.query_one(&sql, &[]).await?.get(0);
    Ok((Some(issued), max_id))
}

/// The id of an aggregate's latest synced message, if one is retained.
pub async fn latest_synced_of(
    client: &impl GenericClient,
    aggregate_id: &str,
) -> Result<Option<i64>, Error> {
    const SQL: &str =
        "SELECT max(id) FROM outbox_messages WHERE aggregate_id = $1 AND status = 'synced'";
    Ok(client.query_one(SQL, &[&aggregate_id]).await?.get(0))
}

/// One page of aggregates with their latest synced message, after `after`, for audit.
pub async fn latest_synced_page(
    client: &impl GenericClient,
    after: &str,
    since: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<(String, i64)>, Error> {
    let rows = client
        .query(
            "SELECT aggregate_id, max(id) FROM outbox_messages
             WHERE status = 'synced' AND aggregate_id > $1
               AND ($2::timestamptz IS NULL OR synced_at >= $2)
             GROUP BY aggregate_id ORDER BY aggregate_id LIMIT $3",
            &[&after, &since, &limit],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Rows synced after `since` (none when `None`), and the server's clock now.
pub async fn synced_since(
    client: &impl GenericClient,
    since: Option<DateTime<Utc>>,
) -> Result<(i64, DateTime<Utc>), Error> {
    let row = client
        .query_one(
            "SELECT count(*), now() FROM outbox_messages
             WHERE status = 'synced' AND synced_at > coalesce($1, now())",
            &[&since],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Pending and failed rows, for the relay's gauges (constant statuses, as in `counts`).
pub async fn pending_and_failed(client: &impl GenericClient) -> Result<(i64, i64), Error> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM outbox_messages WHERE status = 'pending'),
                    (SELECT count(*) FROM outbox_messages WHERE status = 'failed')",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Age in seconds of the oldest pending row.
pub async fn oldest_pending_age(client: &impl GenericClient) -> Result<Option<f64>, Error> {
    // The lowest id, from `outbox_messages_claim_idx`: ids follow creation, and
    // `min(created_at)` would read every pending row of a backlog each second
    // under `status --watch`.
    let row = client
        .query_opt(
            "SELECT extract(epoch FROM now() - created_at)::float8 FROM outbox_messages
             WHERE status = 'pending' ORDER BY id LIMIT 1",
            &[],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Commit-to-apply lag of rows synced in the last minute: (count, p50, p99, max) in ms.
pub async fn lag_last_minute(
    client: &impl GenericClient,
) -> Result<(i64, Option<f64>, Option<f64>, Option<f64>), Error> {
    let row = client
        .query_one(
            "SELECT count(*),
                    pg_catalog.percentile_cont(0.5) WITHIN GROUP (ORDER BY lag),
                    pg_catalog.percentile_cont(0.99) WITHIN GROUP (ORDER BY lag),
                    max(lag)
             FROM (SELECT extract(epoch FROM synced_at - created_at)::float8 * 1000 AS lag
                   FROM outbox_messages
                   WHERE status = 'synced' AND synced_at > now() - interval '1 minute') l",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1), row.get(2), row.get(3)))
}

/// Failed rows grouped by their last error: (error, rows, newest id).
pub async fn failed_by_error(
    client: &impl GenericClient,
) -> Result<Vec<(String, i64, i64)>, Error> {
    let rows = client
        .query(
            "SELECT coalesce(last_error, ''), count(*), max(id) FROM outbox_messages
             WHERE status = 'failed' GROUP BY 1 ORDER BY 2 DESC, 3 DESC LIMIT 50",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Rows in flight by relay: (relay id, rows, latest lease expiry, any lease expired).
pub async fn inflight(
    client: &impl GenericClient,
) -> Result<Vec<(String, i64, DateTime<Utc>, bool)>, Error> {
    let rows = client
        .query(
            "SELECT locked_by, count(*), max(locked_until), bool_or(locked_until < now())
             FROM outbox_messages WHERE status = 'processing' GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect())
}
