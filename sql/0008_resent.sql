-- outboxd schema, version 8: a synced row sent again says so.
--
-- `outboxd resync` and `audit --all --repair` requeue an aggregate's newest
-- synced row. Its second write must not mail the office again: the mail went
-- out when the message first synced, and its notification row may be gone with
-- retention. Its lag counts from the requeue, not from the weeks-old commit.
-- Nullable, no default: adding it rewrites nothing.
ALTER TABLE outbox_messages ADD COLUMN resent_at timestamptz;

COMMENT ON COLUMN outbox_messages.resent_at IS
    'When `outboxd resync` or `audit --all --repair` last requeued this synced row (NULL: never). '
    'Its write then sends no notification e-mail, and its lag counts from here.';
