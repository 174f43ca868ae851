-- outboxd schema, version 2: views for the questions a DBA asks of the outbox.
-- Plain SQL; the migrator runs this file in one transaction.
--
--   SELECT * FROM outbox_status;    -- how many rows in each state, how late are we?
--   SELECT * FROM outbox_failed;    -- what failed, and why?
--   SELECT * FROM outbox_inflight;  -- which relay holds what, and until when?
--
-- The views run with their owner's rights: outboxd_relay and outboxd_readonly
-- (sql/roles.sql) read them without further grants on the tables.

-- Question: how many outbox rows are in each state, how old is the oldest
-- pending row, and how long do rows take from commit to MongoDB right now?
--
-- One row per status, all four always present (count 0 when there are none).
-- Each branch filters on a constant status, so the planner can use the partial
-- indexes of 0001 (claim, lease, synced, failed) rather than scan the table.
--   oldest_age   now() - min(created_at) of the rows in that state: on the
--                'pending' row this is the oldest pending row's age. Not computed
--                for 'synced' (the retained history; see the lag columns).
--   oldest_id    the id of that oldest row, for a follow-up query.
--   lag_*        commit-to-apply lag (synced_at - created_at) of the rows synced
--                in the last minute: p50, p99, max, and how many rows that is.
--                Only on the 'synced' row; NULL when nothing synced in that minute.
--                Served by outbox_messages_synced_idx (synced_at) WHERE status = 'synced'.
CREATE VIEW outbox_status AS
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
                       WHERE status = 'pending' ORDER BY created_at, id LIMIT 1) AS o ON true
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
                       WHERE status = 'failed' ORDER BY created_at, id LIMIT 1) AS o ON true
) AS s
LEFT JOIN lag AS l ON s.status = 'synced'
ORDER BY s.ord;

COMMENT ON VIEW outbox_status IS
    'How many outbox rows are in each state (all four always listed), the oldest '
    'row''s age per state (oldest_age on ''pending'' = oldest pending row), and the '
    'commit-to-apply lag (p50/p99/max of synced_at - created_at) over the last minute, '
    'on the ''synced'' row.';
COMMENT ON COLUMN outbox_status.count IS 'Rows in this state (0 when none).';
COMMENT ON COLUMN outbox_status.oldest_age IS
    'now() - created_at of the oldest row in this state; NULL when none, and for ''synced''.';
COMMENT ON COLUMN outbox_status.oldest_id IS 'id of that oldest row.';
COMMENT ON COLUMN outbox_status.lag_p50 IS
    'Median synced_at - created_at of rows synced in the last minute (''synced'' row only).';
COMMENT ON COLUMN outbox_status.lag_p99 IS
    '99th percentile synced_at - created_at of rows synced in the last minute (''synced'' row only).';
COMMENT ON COLUMN outbox_status.lag_max IS
    'Largest synced_at - created_at of rows synced in the last minute (''synced'' row only).';
COMMENT ON COLUMN outbox_status.lag_rows IS
    'How many rows were synced in the last minute (''synced'' row only).';

-- Question: what failed, and why? Every failed outbox row, newest failure
-- first. updated_at is set by every transition, so on a failed row it is when
-- the row failed. To requeue: `outboxd retry` (all) or `outboxd retry --id N`.
CREATE VIEW outbox_failed AS
SELECT id,
       operation,
       aggregate_id,
       email_id,
       idempotency_key,
       attempts,
       last_error,
       created_at,
       updated_at
FROM outbox_messages
WHERE status = 'failed'
ORDER BY updated_at DESC, id DESC;

COMMENT ON VIEW outbox_failed IS
    'Failed outbox rows, newest failure first: what (operation, aggregate, e-mail, '
    'idempotency key), how many attempts, and why (last_error). updated_at is when it failed.';
COMMENT ON COLUMN outbox_failed.updated_at IS 'When the row failed (its last transition).';
COMMENT ON COLUMN outbox_failed.last_error IS 'The reason recorded by the relay.';

-- Question: which relay holds which rows right now, until when, and has any
-- lease run out (a relay that died or hangs; another relay will take its rows
-- over once locked_until has passed)? One row per relay id holding rows.
CREATE VIEW outbox_inflight AS
SELECT locked_by,
       count(*)                      AS count,
       min(locked_until)             AS earliest_locked_until,
       max(locked_until)             AS latest_locked_until,
       bool_or(locked_until < now()) AS lease_expired
FROM outbox_messages
WHERE status = 'processing'
GROUP BY locked_by
ORDER BY locked_by;

COMMENT ON VIEW outbox_inflight IS
    'Rows being processed, per relay (locked_by): how many, the earliest and latest '
    'lease expiry (locked_until), and whether any of its leases has expired.';
COMMENT ON COLUMN outbox_inflight.lease_expired IS
    'true when at least one of this relay''s leases is past: the relay died or hangs.';
