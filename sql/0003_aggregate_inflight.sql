-- Claims skip an aggregate while any of its rows is being processed, so no two
-- relays write one document at once, even after a relay's session died
-- mid-write. This index answers "is a row of this aggregate in flight?".
CREATE INDEX outbox_messages_inflight_aggregate_idx
    ON outbox_messages (aggregate_id) WHERE status = 'processing';
