-- outboxd schema, version 4: two corrections to the DBA views of version 2.
--
-- outbox_status found the oldest pending and failed rows by sorting every row
-- in that state by created_at: during a backlog of a million rows, each look
-- read them all. It now takes the lowest id, from the state's partial index
-- (0001). Ids follow creation, so this is the same row, but for rows created
-- in the same instant. 'processing' keeps the sort: those rows are few, and
-- their index (on locked_until) gives no id order.
--
-- outbox_failed's comment, which \d+ shows, now says how to requeue.
CREATE OR REPLACE VIEW outbox_status AS
WITH lag AS (
    SELECT count(*)                                                            AS n,
           percentile_cont(0.5)  WITHIN GROUP (ORDER BY synced_at - created_at) AS p50,
           percentile_cont(0.99) WITHIN GROUP (ORDER BY synced_at - created_at) AS p99,
           max(synced_at - created_at)                                         AS max
    FROM outbox_messages
    WHERE status = 'synced'
      AND synced_at > now() - interval '1 minute'
)
SELECT s.status,
       s.count,
       now() - s.oldest_created_at AS oldest_age,
       s.oldest_id,
       l.p50                       AS lag_p50,
       l.p99                       AS lag_p99,
       l.max                       AS lag_max,
       l.n                         AS lag_rows
FROM (
    SELECT 1 AS ord, 'pending'::text AS status,
           (SELECT count(*) FROM outbox_messages WHERE status = 'pending') AS count,
           o.created_at AS oldest_created_at, o.id AS oldest_id
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (SELECT id, created_at FROM outbox_messages
                       WHERE status = 'pending' ORDER BY id LIMIT 1) AS o ON true
    UNION ALL
    SELECT 2, 'processing',
           (SELECT count(*) FROM outbox_messages WHERE status = 'processing'),
           o.created_at, o.id
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (SELECT id, created_at FROM outbox_messages
                       WHERE status = 'processing' ORDER BY created_at, id LIMIT 1) AS o ON true
    UNION ALL
    SELECT 3, 'synced',
           (SELECT count(*) FROM outbox_messages WHERE status = 'synced'),
           NULL::timestamptz, NULL::bigint
    UNION ALL
    SELECT 4, 'failed',
           (SELECT count(*) FROM outbox_messages WHERE status = 'failed'),
           o.created_at, o.id
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (SELECT id, created_at FROM outbox_messages
                       WHERE status = 'failed' ORDER BY id LIMIT 1) AS o ON true
) AS s
LEFT JOIN lag AS l ON s.status = 'synced'
ORDER BY s.ord;

COMMENT ON VIEW outbox_failed IS
    'Failed outbox rows, newest failure first: what (operation, aggregate, e-mail, '
    'idempotency key), how many attempts, and why (last_error). updated_at is when it failed. '
    'Requeue with `outboxd retry --id N...`, `--all-failed` or `--failed-since TIME`.';
