-- outboxd schema, version 7: the notification e-mail owed for each message the
-- relay wrote to MongoDB.
--
-- A row is inserted by the statement that marks the outbox row synced (same
-- transaction), only for a message whose write changed the document, and never
-- twice for one outbox id: a message synced again (audit --repair, resync) does
-- not mail again. No foreign key to outbox_messages: retention deletes synced
-- outbox rows, and an unsent notification must outlive them; the row holds all
-- the mail needs. Relays claim, lease and back off on these rows as they do on
-- outbox rows; `sent` rows are deleted after relay.retention_s.
CREATE TABLE outbox_notifications (
    outbox_id          bigint      PRIMARY KEY,
    aggregate_id       text        NOT NULL,
    status             text        NOT NULL DEFAULT 'pending',
    attempts           integer     NOT NULL DEFAULT 0,
    next_attempt_at    timestamptz NOT NULL DEFAULT now(),
    last_error         text,
    locked_by          text,
    locked_until       timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    sent_at            timestamptz,
    -- What the mail says, copied at mark time from the payload and the e-mail.
    client_reference   text        NOT NULL,
    creditor_name      text        NOT NULL,
    amount             text        NOT NULL,
    currency           text        NOT NULL,
    -- The aggregate's newest earlier synced message still retained, if any.
    previous_amount    text,
    previous_currency  text,
    email_id           bigint      NOT NULL,
    ticket_id          bigint      NOT NULL,
    email_message_id   text,
    email_from         text        NOT NULL,
    email_subject      text        NOT NULL,
    CONSTRAINT outbox_notifications_status_check
        CHECK (status IN ('pending', 'processing', 'sent', 'failed')),
    CONSTRAINT outbox_notifications_attempts_check CHECK (attempts >= 0),
    CONSTRAINT outbox_notifications_lease_check CHECK (
        (status = 'processing') = (locked_by IS NOT NULL AND locked_until IS NOT NULL)),
    CONSTRAINT outbox_notifications_sent_at_check CHECK ((status = 'sent') = (sent_at IS NOT NULL))
);

-- Claim: due pending rows, in the order they came due.
CREATE INDEX outbox_notifications_due_idx ON outbox_notifications (next_attempt_at, outbox_id)
    WHERE status = 'pending';
-- Lease rescue.
CREATE INDEX outbox_notifications_lease_idx ON outbox_notifications (locked_until)
    WHERE status = 'processing';
-- Housekeeping of sent rows.
CREATE INDEX outbox_notifications_sent_idx ON outbox_notifications (sent_at) WHERE status = 'sent';
-- `outboxd retry --notifications` and status read failed rows.
CREATE INDEX outbox_notifications_failed_idx ON outbox_notifications (outbox_id)
    WHERE status = 'failed';
