-- The relay's claim (src/outbox.rs `claim`), mark (`mark_synced`) and unlock, as a
-- pgbench script for run.sh. :guard and :email (true/false) keep or leave out the
-- claim's aggregate guard and the mark's e-mail update; pgbench substitutes them as
-- text, so the planner folds a left-out part away.
WITH retry AS (
    SELECT id FROM outbox_messages
    WHERE status = 'pending' AND attempts > 0 AND next_attempt_at <= now()
      AND (NOT :guard OR
           (NOT EXISTS (SELECT 1 FROM outbox_messages busy
                        WHERE busy.aggregate_id = outbox_messages.aggregate_id AND busy.status = 'processing')
            AND pg_try_advisory_lock(28514, hashtext(aggregate_id))))
    ORDER BY next_attempt_at, id LIMIT :lim
    FOR UPDATE SKIP LOCKED),
fresh AS (
    SELECT id FROM outbox_messages
    WHERE status = 'pending' AND attempts = 0 AND next_attempt_at <= now()
      AND (SELECT count(*) FROM retry) < :lim
      AND (NOT :guard OR
           (NOT EXISTS (SELECT 1 FROM outbox_messages busy
                        WHERE busy.aggregate_id = outbox_messages.aggregate_id AND busy.status = 'processing')
            AND pg_try_advisory_lock(28514, hashtext(aggregate_id))))
    ORDER BY id LIMIT :lim
    FOR UPDATE SKIP LOCKED),
due AS (
    SELECT id FROM retry
    UNION ALL
    (SELECT id FROM fresh ORDER BY id LIMIT :lim - (SELECT count(*) FROM retry))),
c AS (
UPDATE outbox_messages o
SET status = 'processing', locked_by = 'x' || :client_id, locked_until = now() + 30 * interval '1 second', updated_at = now()
FROM incoming_emails e
WHERE o.id = ANY(ARRAY(SELECT id FROM due)) AND e.id = o.email_id
RETURNING o.id, o.operation, o.aggregate_id, o.payload, o.email_id, o.idempotency_key,
          o.attempts, o.created_at, e.ticket_id, e.webhook_id, o.locked_until)
SELECT '''' || coalesce(array_agg(id), '{}')::text || '''' AS ids, max(locked_until) AS lu FROM c
\gset
WITH done AS (
    UPDATE outbox_messages
    SET status = 'synced', synced_at = now(), updated_at = now(),
        locked_by = NULL, locked_until = NULL, last_error = NULL
    WHERE id = ANY(:ids::bigint[]) AND status = 'processing' AND locked_by = 'x' || :client_id
    RETURNING id, email_id, extract(epoch FROM synced_at - created_at)::float8 AS lag),
emails AS (
    UPDATE incoming_emails SET sync_status = 'synced'
    WHERE :email AND id IN (SELECT email_id FROM done) AND sync_status <> 'synced')
SELECT id, lag FROM done;
SELECT pg_advisory_unlock_all();
