//! Each aggregate's current state, its newest synced message (which retention
//! keeps), as `audit --all` and `resync` read it; and `outbox_resyncs`, the
//! runs of `resync` with their cursors.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::Value;
use tokio_postgres::Error;

use super::Claimed;

/// An aggregate's newest synced message, as the relay would write it.
#[derive(Debug, Clone)]
pub struct Current {
    pub row: Claimed,
    pub synced_at: DateTime<Utc>,
    /// A newer message is pending or processing: the document is about to change.
    pub inflight: bool,
}

/// The current state of each of `ids` that has a synced message.
pub async fn newest_synced_of(
    client: &impl GenericClient,
    ids: &[String],
) -> Result<Vec<Current>, Error> {
    const SQL: &str = "
        SELECT o.id, o.operation, o.aggregate_id, o.payload, o.email_id, o.idempotency_key,
               o.attempts, o.created_at, e.ticket_id, e.webhook_id, o.synced_at,
               EXISTS (SELECT 1 FROM outbox_messages b
                       WHERE b.aggregate_id = o.aggregate_id AND b.id > o.id
                         AND b.status IN ('pending', 'processing'))
        FROM pg_catalog.unnest($1::text[]) AS a(id)
        JOIN LATERAL (SELECT * FROM outbox_messages m
                      WHERE m.aggregate_id = a.id AND m.status = 'synced'
                      ORDER BY m.id DESC LIMIT 1) AS o ON true
        JOIN incoming_emails e ON e.id = o.email_id";
    let rows = client.query(SQL, &[&ids]).await?;
    Ok(rows
        .iter()
        .map(|r| Current {
            row: Claimed::from_row(r),
            synced_at: r.get(10),
            inflight: r.get(11),
        })
        .collect())
}

/// Those of `ids` with a message that did not fail: a first message on its
/// way, or one synced since `newest_synced_of` looked.
pub async fn inflight_of(
    client: &impl GenericClient,
    ids: &[String],
) -> Result<Vec<String>, Error> {
    const SQL: &str = "
        SELECT DISTINCT aggregate_id FROM outbox_messages
        WHERE aggregate_id = ANY($1) AND status <> 'failed'";
    let rows = client.query(SQL, &[&ids]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A session's table of the document ids an audit saw, so that memory stays
/// bounded however many aggregates there are.
pub async fn create_seen(client: &impl GenericClient) -> Result<(), Error> {
    client
        .batch_execute(
            "CREATE TEMPORARY TABLE IF NOT EXISTS outboxd_audit_seen (aggregate_id text PRIMARY KEY);
             TRUNCATE outboxd_audit_seen",
        )
        .await
}

/// Records document ids as seen.
pub async fn add_seen(client: &impl GenericClient, ids: &[String]) -> Result<(), Error> {
    client
        .execute(
            "INSERT INTO outboxd_audit_seen SELECT pg_catalog.unnest($1::text[]) ON CONFLICT DO NOTHING",
            &[&ids],
        )
        .await
        .map(|_| ())
}

/// An aggregate with a synced message whose document the audit did not see.
#[derive(Debug, Clone)]
pub struct Unseen {
    pub aggregate_id: String,
    pub id: i64,
    pub synced_at: DateTime<Utc>,
    pub inflight: bool,
}

/// One page of aggregates with a synced message, after `after`: how many, the
/// last one, and those not seen.
pub async fn unseen_page(
    client: &impl GenericClient,
    after: &str,
    limit: i64,
) -> Result<(usize, Option<String>, Vec<Unseen>), Error> {
    const SQL: &str = "
        WITH page AS (
            SELECT DISTINCT aggregate_id FROM outbox_messages
            WHERE status = 'synced' AND aggregate_id > $1
            ORDER BY aggregate_id LIMIT $2)
        SELECT p.aggregate_id, s.aggregate_id IS NOT NULL, o.id, o.synced_at,
               EXISTS (SELECT 1 FROM outbox_messages b
                       WHERE b.aggregate_id = p.aggregate_id AND b.id > o.id
                         AND b.status IN ('pending', 'processing'))
        FROM page p
        LEFT JOIN outboxd_audit_seen s ON s.aggregate_id = p.aggregate_id
        JOIN LATERAL (SELECT id, synced_at FROM outbox_messages m
                      WHERE m.aggregate_id = p.aggregate_id AND m.status = 'synced'
                      ORDER BY m.id DESC LIMIT 1) AS o ON true
        ORDER BY p.aggregate_id";
    let rows = client.query(SQL, &[&after, &limit]).await?;
    let last = rows.last().map(|r| r.get(0));
    let unseen = rows
        .iter()
        .filter(|r| !r.get::<_, bool>(1))
        .map(|r| Unseen {
            aggregate_id: r.get(0),
            id: r.get(2),
            synced_at: r.get(3),
            inflight: r.get(4),
        })
        .collect();
    Ok((rows.len(), last, unseen))
}

/// The server's clock.
pub async fn now(client: &impl GenericClient) -> Result<DateTime<Utc>, Error> {
    Ok(client.query_one("SELECT now()", &[]).await?.get(0))
}

/// A resync run.
#[derive(Debug, Clone)]
pub struct Run {
    pub id: i64,
    /// The last aggregate done; `None` before the first page.
    pub cursor: Option<String>,
    pub rows_requeued: i64,
    /// An unfinished run with this filter was found and is resumed.
    pub resumed: bool,
}

/// The unfinished run with `filter`, or a new one. `restart` first abandons
/// the unfinished run, so that all starts over.
pub async fn open_run(
    client: &impl GenericClient,
    filter: &Value,
    restart: bool,
) -> Result<Run, Error> {
    if restart {
        client
            .execute(
                "UPDATE outbox_resyncs SET finished_at = now(), outcome = 'abandoned', updated_at = now()
                 WHERE filter = $1 AND finished_at IS NULL",
                &[filter],
            )
            .await?;
    }
    let inserted = client
        .query_opt(
            "INSERT INTO outbox_resyncs (filter) VALUES ($1)
             ON CONFLICT (filter) WHERE finished_at IS NULL DO NOTHING
             RETURNING id",
            &[filter],
        )
        .await?;
    if let Some(row) = inserted {
        return Ok(Run {
            id: row.get(0),
            cursor: None,
            rows_requeued: 0,
            resumed: false,
        });
    }
    let row = client
        .query_one(
            "SELECT id, cursor, rows_requeued FROM outbox_resyncs
             WHERE filter = $1 AND finished_at IS NULL",
            &[filter],
        )
        .await?;
    Ok(Run {
        id: row.get(0),
        cursor: row.get(1),
        rows_requeued: row.get(2),
        resumed: true,
    })
}

/// Locks an unfinished run's row for this transaction and returns its cursor
/// (`None` inside when no page was done); `None` when the run is finished.
pub async fn lock_run(
    client: &impl GenericClient,
    run: i64,
) -> Result<Option<Option<String>>, Error> {
    let row = client
        .query_opt(
            "SELECT cursor FROM outbox_resyncs WHERE id = $1 AND finished_at IS NULL FOR UPDATE",
            &[&run],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// One page of aggregates after `after` (matching `aggregates` when given):
/// the page's last aggregate and size, the newest synced row of each whose
/// newest message that did not fail is synced (at or after `since`), and how
/// many were skipped as in flight.
pub async fn resync_page(
    client: &impl GenericClient,
    after: &str,
    aggregates: Option<&[String]>,
    since: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<(Option<String>, usize, Vec<i64>, usize), Error> {
    const SQL: &str = "
        WITH page AS (
            SELECT DISTINCT aggregate_id FROM outbox_messages
            WHERE aggregate_id > $1 AND ($2::text[] IS NULL OR aggregate_id = ANY($2))
            ORDER BY aggregate_id LIMIT $3)
        SELECT p.aggregate_id, n.id, n.status, n.synced_at
        FROM page p
        LEFT JOIN LATERAL (SELECT id, status, synced_at FROM outbox_messages m
                           WHERE m.aggregate_id = p.aggregate_id AND m.status <> 'failed'
                           ORDER BY id DESC LIMIT 1) AS n ON true
        ORDER BY p.aggregate_id";
    let rows = client.query(SQL, &[&after, &aggregates, &limit]).await?;
    let last = rows.last().map(|r| r.get(0));
    let (mut ids, mut inflight) = (Vec::new(), 0);
    for r in &rows {
        let (id, status, synced_at): (Option<i64>, Option<String>, Option<DateTime<Utc>>) =
            (r.get(1), r.get(2), r.get(3));
        match (id, status.as_deref()) {
            (Some(id), Some("synced")) if since.is_none_or(|s| synced_at >= Some(s)) => {
                ids.push(id)
            }
            (Some(_), Some("pending" | "processing")) => inflight += 1,
            _ => {}
        }
    }
    Ok((last, rows.len(), ids, inflight))
}

/// Advances a run's cursor past a page and adds the rows it requeued; the
/// caller holds the run's lock (`lock_run`) in the same transaction.
pub async fn advance_run(
    client: &impl GenericClient,
    run: i64,
    cursor: &str,
    requeued: u64,
) -> Result<u64, Error> {
    client
        .execute(
            "UPDATE outbox_resyncs
             SET cursor = $2, rows_requeued = rows_requeued + $3, updated_at = now()
             WHERE id = $1 AND finished_at IS NULL",
            &[&run, &cursor, &(requeued as i64)],
        )
        .await
}

/// Marks a run done.
pub async fn finish_run(client: &impl GenericClient, run: i64) -> Result<u64, Error> {
    client
        .execute(
            "UPDATE outbox_resyncs SET finished_at = now(), outcome = 'done', updated_at = now()
             WHERE id = $1 AND finished_at IS NULL",
            &[&run],
        )
        .await
}
