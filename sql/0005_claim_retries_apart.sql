-- outboxd schema, version 5: a claim no longer reads past rows that are backing off.
--
-- The claim walked outbox_messages_claim_idx (every pending row, in id order)
-- and skipped the rows not yet due. After a spell of failed writes (MongoDB
-- answering pings but refusing writes), when many pending rows were backing
-- off, each claim read all of them: 48 ms per claim behind 200k such rows,
-- growing with them. Retries (attempts > 0, due at next_attempt_at) and
-- never-tried rows (attempts = 0, due at once) now have an index each: a claim
-- takes the due retries first, in the order they came due, then never-tried
-- rows in id order. outbox_messages_claim_idx stays: the DBA views and
-- `outboxd status` find the oldest pending row by it.
--
-- Building them reads the whole table and holds off writes to it meanwhile:
-- 0.4 s for both at a million rows (300k pending) on a 2-core test machine.
CREATE INDEX outbox_messages_fresh_idx ON outbox_messages (id)
    WHERE status = 'pending' AND attempts = 0;
CREATE INDEX outbox_messages_retry_idx ON outbox_messages (next_attempt_at, id)
    WHERE status = 'pending' AND attempts > 0;
