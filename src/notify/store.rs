//! SQL on `outbox_notifications`: claim, mark, rescue, clean up, count,
//! requeue. Rows are created by `outbox::mark_synced`. Every transition names
//! the expected status, holder and lease, and answers the rows it moved.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Error;

use crate::outbox::{Failure, RetryPolicy};
use crate::status::MailStatus;

/// One notification owed, with everything its mail needs.
#[derive(Debug, Clone)]
pub struct Notification {
    pub outbox_id: i64,
    pub aggregate_id: String,
    pub attempts: i32,
    pub client_reference: String,
    pub creditor_name: String,
    pub amount: String,
    pub currency: String,
    pub previous_amount: Option<String>,
    pub previous_currency: Option<String>,
    pub email_id: i64,
    pub ticket_id: i64,
    pub email_message_id: Option<String>,
    pub email_from: String,
    pub email_subject: String,
}

impl Notification {
    /// A made-up notification, to try the templates at start-up.
    pub fn sample() -> Notification {
        Notification {
            outbox_id: 1,
            aggregate_id: "client:creditor".into(),
            attempts: 0,
            client_reference: "K-1".into(),
            creditor_name: "Gläubiger GmbH".into(),
            amount: "1234.56".into(),
            currency: "EUR".into(),
            previous_amount: Some("1000".into()),
            previous_currency: Some("EUR".into()),
            email_id: 1,
            ticket_id: 1,
            email_message_id: Some("<m@example.com>".into()),
            email_from: "a@example.com".into(),
            email_subject: "Betreff".into(),
        }
    }
}

/// A claimed batch of notifications and the lease that guards its marks.
pub struct Claim {
    pub rows: Vec<Notification>,
    pub locked_until: DateTime<Utc>,
}

/// Claims up to `limit` due pending notifications, in the order they came due,
/// skipping rows another relay holds.
pub async fn claim(
    client: &impl GenericClient,
    relay_id: &str,
    limit: i64,
    lease_s: f64,
) -> Result<Claim, Error> {
    const SQL: &str = "
        WITH due AS (
            SELECT outbox_id FROM outbox_notifications
            WHERE status = 'pending' AND next_attempt_at <= now()
            ORDER BY next_attempt_at, outbox_id LIMIT $2
            FOR UPDATE SKIP LOCKED)
        UPDATE outbox_notifications n
        SET status = 'processing', locked_by = $1,
            locked_until = now() + $3::float8 * interval '1 second', updated_at = now()
        FROM due WHERE n.outbox_id = due.outbox_id
        RETURNING n.outbox_id, n.aggregate_id, n.attempts, n.client_reference, n.creditor_name,
                  n.amount, n.currency, n.previous_amount, n.previous_currency, n.email_id,
                  n.ticket_id, n.email_message_id, n.email_from, n.email_subject, n.locked_until";
    let stmt = client.prepare_cached(SQL).await?;
    let rows = client.query(&stmt, &[&relay_id, &limit, &lease_s]).await?;
    let locked_until = rows.first().map(|r| r.get(14)).unwrap_or_else(Utc::now);
    let mut rows: Vec<Notification> = rows
        .iter()
        .map(|r| Notification {
            outbox_id: r.get(0),
            aggregate_id: r.get(1),
            attempts: r.get(2),
            client_reference: r.get(3),
            creditor_name: r.get(4),
            amount: r.get(5),
            currency: r.get(6),
            previous_amount: r.get(7),
            previous_currency: r.get(8),
            email_id: r.get(9),
            ticket_id: r.get(10),
            email_message_id: r.get(11),
            email_from: r.get(12),
            email_subject: r.get(13),
        })
        .collect();
    rows.sort_by_key(|r| r.outbox_id);
    Ok(Claim { rows, locked_until })
}

/// Marks held notifications sent. Returns the ids marked; a missing one had
/// lost its lease (and may be sent again, with the same Message-ID).
pub async fn mark_sent(
    client: &impl GenericClient,
    ids: &[i64],
    relay_id: &str,
    locked_until: DateTime<Utc>,
) -> Result<Vec<i64>, Error> {
    const SQL: &str = "
        UPDATE outbox_notifications
        SET status = 'sent', sent_at = now(), updated_at = now(), last_error = NULL,
            attempts = attempts + 1, locked_by = NULL, locked_until = NULL
        WHERE outbox_id = ANY($1) AND status = 'processing' AND locked_by = $2 AND locked_until = $3
        RETURNING outbox_id";
    let stmt = client.prepare_cached(SQL).await?;
    let rows = client
        .query(&stmt, &[&ids, &relay_id, &locked_until])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Records a failed send: back to `pending` with the outbox's backoff formula,
/// or `failed` when permanent or out of attempts. Returns `(id, status)`.
pub async fn mark_attempt_failed(
    client: &impl GenericClient,
    ids: &[i64],
    relay_id: &str,
    locked_until: DateTime<Utc>,
    failure: &Failure<'_>,
    retry: &RetryPolicy,
) -> Result<Vec<(i64, MailStatus)>, Error> {
    const SQL: &str = concat!(
        "
        UPDATE outbox_notifications
        SET attempts = attempts + 1,
            status = CASE WHEN $5 OR attempts + 1 >= $6 THEN 'failed' ELSE 'pending' END,
            next_attempt_at = ",
        crate::backoff_sql!(),
        ",
            last_error = $4, locked_by = NULL, locked_until = NULL, updated_at = now()
        WHERE outbox_id = ANY($1) AND status = 'processing' AND locked_by = $2 AND locked_until = $3
        RETURNING outbox_id, status"
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

/// Gives held notifications back untouched (not sent: shutting down).
pub async fn release(
    client: &impl GenericClient,
    ids: &[i64],
    relay_id: &str,
    locked_until: DateTime<Utc>,
) -> Result<u64, Error> {
    const SQL: &str = "
        UPDATE outbox_notifications
        SET status = 'pending', locked_by = NULL, locked_until = NULL, updated_at = now()
        WHERE outbox_id = ANY($1) AND status = 'processing' AND locked_by = $2 AND locked_until = $3";
    let stmt = client.prepare_cached(SQL).await?;
    client
        .execute(&stmt, &[&ids, &relay_id, &locked_until])
        .await
}

/// Takes back notifications whose holder's lease expired (a relay died, perhaps
/// mid-send): `pending` with the attempt counted, or `failed` when out of
/// attempts. Returns `(id, status, held_by)`.
pub async fn rescue_expired(
    client: &impl GenericClient,
    max_attempts: i32,
    limit: i64,
) -> Result<Vec<(i64, MailStatus, Option<String>)>, Error> {
    const SQL: &str = "
        WITH expired AS (
            SELECT outbox_id, locked_by FROM outbox_notifications
            WHERE status = 'processing' AND locked_until < now()
            ORDER BY locked_until LIMIT $2
            FOR UPDATE SKIP LOCKED)
        UPDATE outbox_notifications n
        SET attempts = n.attempts + 1,
            status = CASE WHEN n.attempts + 1 >= $1 THEN 'failed' ELSE 'pending' END,
            last_error = 'lease expired while held by ' || n.locked_by,
            next_attempt_at = now(), locked_by = NULL, locked_until = NULL, updated_at = now()
        FROM expired
        WHERE n.outbox_id = expired.outbox_id AND n.status = 'processing' AND n.locked_until < now()
        RETURNING n.outbox_id, n.status, expired.locked_by";
    let stmt = client.prepare_cached(SQL).await?;
    let rows = client.query(&stmt, &[&max_attempts, &limit]).await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// When the earliest pending notification comes due, if any.
pub async fn next_due(client: &impl GenericClient) -> Result<Option<DateTime<Utc>>, Error> {
    let stmt = client
        .prepare_cached(
            "SELECT min(next_attempt_at) FROM outbox_notifications WHERE status = 'pending'",
        )
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}

/// Deletes up to `limit` notifications sent longer ago than `retention_s`.
pub async fn delete_sent_before(
    client: &impl GenericClient,
    retention_s: f64,
    limit: i64,
) -> Result<u64, Error> {
    const SQL: &str = "
        DELETE FROM outbox_notifications WHERE outbox_id IN (
            SELECT outbox_id FROM outbox_notifications
            WHERE status = 'sent' AND sent_at < now() - $1::float8 * interval '1 second'
            ORDER BY sent_at LIMIT $2)";
    let stmt = client.prepare_cached(SQL).await?;
    client.execute(&stmt, &[&retention_s, &limit]).await
}

/// Notification counts by status: pending, processing, sent, failed.
pub async fn counts(client: &impl GenericClient) -> Result<[(MailStatus, i64); 4], Error> {
    const SQL: &str = "
        SELECT count(*) FILTER (WHERE status = 'pending'),
               count(*) FILTER (WHERE status = 'processing'),
               count(*) FILTER (WHERE status = 'sent'),
               count(*) FILTER (WHERE status = 'failed')
        FROM outbox_notifications";
    let row = client.query_one(SQL, &[]).await?;
    Ok([
        (MailStatus::Pending, row.get(0)),
        (MailStatus::Processing, row.get(1)),
        (MailStatus::Sent, row.get(2)),
        (MailStatus::Failed, row.get(3)),
    ])
}

/// Requeues failed notifications (all, or those in `ids`): `pending`, due now,
/// attempts reset. Returns the ids requeued.
pub async fn requeue_failed(
    client: &impl GenericClient,
    ids: Option<&[i64]>,
) -> Result<Vec<i64>, Error> {
    const SQL: &str = "
        UPDATE outbox_notifications
        SET status = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now()
        WHERE status = 'failed' AND ($1::bigint[] IS NULL OR outbox_id = ANY($1))
        RETURNING outbox_id";
    let rows = client.query(SQL, &[&ids]).await?;
    let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    ids.sort_unstable();
    Ok(ids)
}
