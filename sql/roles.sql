-- outboxd least-privilege roles. NOT a migration: `outboxd migrate` never runs
-- this file. A DBA runs it once per database, after `outboxd migrate` (it grants
-- on the tables, views and schema_migrations the migrations create), and again
-- after any upgrade that adds a migration. Running it again is harmless: roles
-- are created only when missing, and the grants are first revoked and then
-- given again, in one transaction, so each role ends with exactly the
-- privileges below, whatever was granted before (by the same grantor).
--
-- Run it as the owner of the tables (the role `outboxd migrate` connects as),
-- which needs CREATEROLE the first time (or a superuser creates the roles):
--
--     psql -v ON_ERROR_STOP=1 -d outboxd -f sql/roles.sql
--
-- The three roles are NOLOGIN groups. Give each process its own login user in
-- the matching group, and put that user's URL in the process's database-url
-- credential:
--
--     CREATE ROLE ingest_app   LOGIN PASSWORD '…' IN ROLE outboxd_ingest;
--     CREATE ROLE relay_app    LOGIN PASSWORD '…' IN ROLE outboxd_relay;
--     CREATE ROLE grafana_ro   LOGIN PASSWORD '…' IN ROLE outboxd_readonly;
--
-- (Membership is inherited, the default, so no SET ROLE is needed.) On
-- PostgreSQL 15 any CREATEROLE role may run these; from PostgreSQL 16 on, adding
-- a member needs ADMIN OPTION on the group, which the role that ran this file
-- first (the groups' creator) has, as has a superuser. Roles are
-- cluster-wide: with several outboxd databases on one cluster, run this file in
-- each of them; the roles are shared, the grants are per database.
-- If PUBLIC's default CONNECT on the database was revoked, also run
-- `GRANT CONNECT ON DATABASE outboxd TO outboxd_ingest, outboxd_relay, outboxd_readonly;`.
--
-- It also takes CREATE on schema public from PUBLIC (every role, before
-- PostgreSQL 15), so no role can plant a function or table there that outboxd's
-- sessions would run. A function planted earlier stays: list them with
-- `\df public.*` and drop what you did not create.
--
-- What each role may do:
--   outboxd_ingest    insert the e-mail, its outbox row and its idempotency key
--                     (one transaction per webhook), read the keys back, re-take
--                     an expired key, and read back only the ids it needs.
--                     Never updates or deletes an outbox row or an e-mail.
--   outboxd_relay     claim, update and delete (retention) outbox rows, set an
--                     e-mail's sync_status, delete expired idempotency keys;
--                     also what `outboxd status|retry|audit|check` need.
--                     Records, sends and deletes notifications (outbox_notifications).
--                     Inserts nothing else, never deletes an e-mail, never truncates.
--   outboxd_readonly  read the tables, views and schema_migrations, except
--                     an e-mail's sender, subject and body.

\set ON_ERROR_STOP 1

BEGIN;

-- The objects this file grants on must exist: run `outboxd migrate` first.
DO $$
DECLARE
    missing text;
BEGIN
    SELECT string_agg(name, ', ') INTO missing
    FROM unnest(ARRAY['incoming_emails', 'outbox_messages', 'idempotency_keys',
                      'schema_migrations', 'outbox_status', 'outbox_failed',
                      'outbox_inflight', 'outbox_notifications']) AS name
    WHERE to_regclass(name) IS NULL;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'outboxd roles.sql: missing in database %: %', current_database(), missing
            USING HINT = 'Run `outboxd migrate` against this database first, then this file.';
    END IF;
END
$$;

-- Group roles, created only when missing (the existence test first, so that a
-- table owner without CREATEROLE can re-run this file once the roles exist;
-- duplicate_object covers a concurrent run).
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outboxd_ingest') THEN
        CREATE ROLE outboxd_ingest NOLOGIN;
        COMMENT ON ROLE outboxd_ingest IS
            'outboxd ingest: inserts e-mails, outbox rows and idempotency keys; reads its keys back.';
    END IF;
EXCEPTION WHEN duplicate_object THEN
    RAISE NOTICE 'role outboxd_ingest exists, kept';
END $$;
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outboxd_relay') THEN
        CREATE ROLE outboxd_relay NOLOGIN;
        COMMENT ON ROLE outboxd_relay IS
            'outboxd relay: claims, updates and cleans up outbox rows; sets e-mail sync_status.';
    END IF;
EXCEPTION WHEN duplicate_object THEN
    RAISE NOTICE 'role outboxd_relay exists, kept';
END $$;
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outboxd_readonly') THEN
        CREATE ROLE outboxd_readonly NOLOGIN;
        COMMENT ON ROLE outboxd_readonly IS
            'outboxd read-only: SELECT on the outbox tables, views and schema_migrations.';
    END IF;
EXCEPTION WHEN duplicate_object THEN
    RAISE NOTICE 'role outboxd_readonly exists, kept';
END $$;

-- Start from nothing (table-level REVOKE ALL also drops column privileges), so
-- a second run, or a run after a hand-made GRANT, ends in exactly the list below.
REVOKE ALL ON TABLE incoming_emails, outbox_messages, idempotency_keys, schema_migrations,
                    outbox_status, outbox_failed, outbox_inflight, outbox_notifications,
                    creditor_debts_current, outbox_resyncs
    FROM outboxd_ingest, outboxd_relay, outboxd_readonly;
DO $$
DECLARE
    seq text;
BEGIN
    FOREACH seq IN ARRAY ARRAY[pg_get_serial_sequence('incoming_emails', 'id'),
                               pg_get_serial_sequence('outbox_messages', 'id'),
                               pg_get_serial_sequence('outbox_resyncs', 'id')] LOOP
        EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM outboxd_ingest, outboxd_relay, outboxd_readonly', seq);
    END LOOP;
END
$$;

-- All three: the schema.
GRANT USAGE ON SCHEMA public TO outboxd_ingest, outboxd_relay, outboxd_readonly;
-- No one else creates in it (the default from PostgreSQL 15 on; before, every
-- role may): outboxd's sessions would run a function planted there with their
-- privileges. Only the schema's owner can revoke (before 15, a superuser);
-- anyone else gets the warning below.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
DO $$ BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
               WHERE n.nspname = 'public' AND a.grantee = 0 AND a.privilege_type = 'CREATE') THEN
        RAISE WARNING 'outboxd roles.sql: every role may still CREATE in schema public'
            USING HINT = 'As a superuser or the schema''s owner: REVOKE CREATE ON SCHEMA public FROM PUBLIC;';
    END IF;
END $$;

-- outboxd_ingest ------------------------------------------------------------
-- Only the columns its statement writes: state columns (status, attempts,
-- locked_until, ...) take their defaults, and a row cannot arrive pre-claimed.
GRANT INSERT (id, webhook_id, ticket_id, message_id, from_address, subject, body, received_at)
    ON incoming_emails TO outboxd_ingest;
GRANT INSERT (id, operation, aggregate_id, payload, email_id, idempotency_key)
    ON outbox_messages TO outboxd_ingest;
GRANT INSERT (key, webhook_id, email_id, outbox_id, expires_at) ON idempotency_keys
    TO outboxd_ingest;
-- The cached answer of a duplicate, and the key's own ON CONFLICT checks.
GRANT SELECT ON idempotency_keys TO outboxd_ingest;
-- Re-taking an expired key: INSERT … ON CONFLICT (key) DO UPDATE SET … WHERE expires_at <= now().
GRANT UPDATE (email_id, outbox_id, webhook_id, created_at, expires_at) ON idempotency_keys
    TO outboxd_ingest;
-- RETURNING id, and the duplicate lookup by webhook_id.
GRANT SELECT (id, webhook_id) ON incoming_emails TO outboxd_ingest;
GRANT SELECT (id, email_id, idempotency_key) ON outbox_messages TO outboxd_ingest;
-- The identity sequences behind incoming_emails.id and outbox_messages.id:
-- ingest's one statement takes both ids with nextval() (src/outbox.rs).
DO $$
DECLARE
    seq text;
BEGIN
    FOREACH seq IN ARRAY ARRAY[pg_get_serial_sequence('incoming_emails', 'id'),
                               pg_get_serial_sequence('outbox_messages', 'id')] LOOP
        EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %s TO outboxd_ingest', seq);
    END LOOP;
END
$$;
-- `outboxd check` reads the schema version.
GRANT SELECT ON schema_migrations TO outboxd_ingest;

-- outboxd_relay -------------------------------------------------------------
-- Claim (SELECT … FOR UPDATE SKIP LOCKED), mark, requeue, retention deletes.
-- Only the columns of a row's state may change, never what the message says.
GRANT SELECT, DELETE ON outbox_messages TO outboxd_relay;
GRANT UPDATE (status, attempts, next_attempt_at, last_error, locked_by, locked_until,
              updated_at, synced_at, resent_at) ON outbox_messages TO outboxd_relay;
-- The e-mail's sync_status follows its outbox row; the document's source
-- fields. Not the sender, subject or body: personal data the relay never needs.
GRANT SELECT (id, ticket_id, webhook_id, sync_status) ON incoming_emails TO outboxd_relay;
GRANT UPDATE (sync_status) ON incoming_emails TO outboxd_relay;
-- Notifications (`[notify]`): the mark records one, copying what the mail
-- names of the e-mail it came from (sender, subject, Message-ID); the sender
-- claims, marks, and deletes sent ones. Its content never changes.
GRANT SELECT (message_id, from_address, subject) ON incoming_emails TO outboxd_relay;
GRANT SELECT, INSERT, DELETE ON outbox_notifications TO outboxd_relay;
GRANT UPDATE (status, attempts, next_attempt_at, last_error, locked_by, locked_until,
              updated_at, sent_at) ON outbox_notifications TO outboxd_relay;
-- Housekeeping of expired keys.
GRANT SELECT, DELETE ON idempotency_keys TO outboxd_relay;
GRANT SELECT ON schema_migrations TO outboxd_relay;
GRANT SELECT ON outbox_status, outbox_failed, outbox_inflight, creditor_debts_current
    TO outboxd_relay;
-- `outboxd resync` records its runs and their cursors.
GRANT SELECT, INSERT, UPDATE ON outbox_resyncs TO outboxd_relay;
-- `outboxd audit` reads the last outbox id issued (SELECT: no nextval).
DO $$
BEGIN
    EXECUTE format('GRANT SELECT ON SEQUENCE %s TO outboxd_relay',
                   pg_get_serial_sequence('outbox_messages', 'id'));
    EXECUTE format('GRANT USAGE ON SEQUENCE %s TO outboxd_relay',
                   pg_get_serial_sequence('outbox_resyncs', 'id'));
END
$$;

-- outboxd_readonly ----------------------------------------------------------
-- Dashboards need no e-mail's sender, subject or body: a debtor's
-- correspondence stays with the roles that handle it.
GRANT SELECT ON outbox_messages, idempotency_keys, schema_migrations,
                outbox_status, outbox_failed, outbox_inflight, creditor_debts_current,
                outbox_resyncs
    TO outboxd_readonly;
-- Notifications, less the e-mail's sender and subject they copy.
GRANT SELECT (outbox_id, aggregate_id, status, attempts, next_attempt_at, last_error, locked_by,
              locked_until, created_at, updated_at, sent_at, client_reference, creditor_name,
              amount, currency, previous_amount, previous_currency, email_id, ticket_id,
              email_message_id)
    ON outbox_notifications TO outboxd_readonly;
GRANT SELECT (id, webhook_id, ticket_id, message_id, received_at, sync_status, created_at)
    ON incoming_emails TO outboxd_readonly;

-- Row-level security: which rows each role may touch ------------------------
-- Column privileges say what a role may write; these policies say which rows.
-- The tables' owner (outboxd migrate) is not subject to them. Views run as
-- their owner, so dashboards read them whole.
ALTER TABLE incoming_emails ENABLE ROW LEVEL SECURITY;
ALTER TABLE outbox_messages ENABLE ROW LEVEL SECURITY;
ALTER TABLE idempotency_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE outbox_notifications ENABLE ROW LEVEL SECURITY;
DO $$
DECLARE
    p record;
BEGIN
    -- Re-created each run, so that a changed policy takes effect.
    FOR p IN SELECT schemaname, tablename, policyname FROM pg_policies
             WHERE policyname LIKE 'outboxd\_%'
               AND to_regclass(format('%I.%I', schemaname, tablename)) = to_regclass(tablename) LOOP
        EXECUTE format('DROP POLICY %I ON %I.%I', p.policyname, p.schemaname, p.tablename);
    END LOOP;
    -- Ingest inserts the ids its own statement drew from the sequences (a
    -- huge id would make its message every later one's "newer"), and reads
    -- what answers a redelivery.
    EXECUTE format('CREATE POLICY outboxd_ingest_insert ON incoming_emails FOR INSERT
                    TO outboxd_ingest WITH CHECK (id = currval(%L::regclass))',
                   pg_get_serial_sequence('incoming_emails', 'id'));
    EXECUTE format('CREATE POLICY outboxd_ingest_insert ON outbox_messages FOR INSERT
                    TO outboxd_ingest WITH CHECK (id = currval(%L::regclass))',
                   pg_get_serial_sequence('outbox_messages', 'id'));
END
$$;
CREATE POLICY outboxd_read ON incoming_emails FOR SELECT
    TO outboxd_ingest, outboxd_relay, outboxd_readonly USING (true);
CREATE POLICY outboxd_relay_update ON incoming_emails FOR UPDATE
    TO outboxd_relay USING (true) WITH CHECK (true);

CREATE POLICY outboxd_read ON outbox_messages FOR SELECT
    TO outboxd_ingest, outboxd_relay, outboxd_readonly USING (true);
CREATE POLICY outboxd_relay_update ON outbox_messages FOR UPDATE
    TO outboxd_relay USING (true) WITH CHECK (true);
-- Retention deletes synced rows only: never one still owed to MongoDB.
CREATE POLICY outboxd_relay_delete ON outbox_messages FOR DELETE
    TO outboxd_relay USING (status = 'synced');

CREATE POLICY outboxd_read ON idempotency_keys FOR SELECT
    TO outboxd_ingest, outboxd_relay, outboxd_readonly USING (true);
CREATE POLICY outboxd_ingest_insert ON idempotency_keys FOR INSERT
    TO outboxd_ingest WITH CHECK (true);
-- A key is taken again only once it expired; a live one answers duplicates.
CREATE POLICY outboxd_ingest_retake ON idempotency_keys FOR UPDATE
    TO outboxd_ingest USING (expires_at <= now()) WITH CHECK (true);
CREATE POLICY outboxd_relay_delete ON idempotency_keys FOR DELETE
    TO outboxd_relay USING (expires_at <= now());

CREATE POLICY outboxd_read ON outbox_notifications FOR SELECT
    TO outboxd_relay, outboxd_readonly USING (true);
CREATE POLICY outboxd_relay_insert ON outbox_notifications FOR INSERT
    TO outboxd_relay WITH CHECK (true);
CREATE POLICY outboxd_relay_update ON outbox_notifications FOR UPDATE
    TO outboxd_relay USING (true) WITH CHECK (true);
CREATE POLICY outboxd_relay_delete ON outbox_notifications FOR DELETE
    TO outboxd_relay USING (status = 'sent');

COMMIT;
