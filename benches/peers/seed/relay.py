"""The seed design's relay: `process_pending_outbox` polled every second on outboxd's tables.

One process is one relay. Each batch is one transaction: claim up to 100
pending rows with FOR UPDATE SKIP LOCKED, and for each row one guarded upsert
then the two status updates; commit. It sleeps 1 s only after a short batch.
"""

import argparse
import os
import signal
import sys
import time

import psycopg
from pymongo import MongoClient

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mongo_write import write_guarded  # noqa: E402

BATCH = 100
POLL_SECONDS = 1.0

CLAIM = """
    SELECT m.id, m.aggregate_id, m.payload, m.email_id, m.idempotency_key, e.ticket_id, e.webhook_id
      FROM outbox_messages m JOIN incoming_emails e ON e.id = m.email_id
     WHERE m.status = 'pending'
     ORDER BY m.id
     LIMIT %s
       FOR UPDATE OF m SKIP LOCKED
"""
MARK_SYNCED = """
    UPDATE outbox_messages SET status = 'synced', synced_at = now(), updated_at = now()
     WHERE id = %s AND status = 'pending'
"""
MARK_EMAIL = "UPDATE incoming_emails SET sync_status = 'synced' WHERE id = %s"

stopping = False


def process_pending_outbox(conn, collection, apply_log):
    """Relays one batch; returns how many rows it claimed."""
    with conn.transaction():
        rows = conn.execute(CLAIM, (BATCH,)).fetchall()
        for oid, aggregate_id, payload, email_id, key, ticket_id, webhook_id in rows:
            msg = {
                "outbox_id": oid,
                "aggregate_id": aggregate_id,
                "email_id": email_id,
                "ticket_id": ticket_id,
                "webhook_id": webhook_id,
                "idempotency_key": key,
                "payload": payload,
            }
            write_guarded(collection, msg)
            if apply_log:
                apply_log.write(f"{oid} {time.time() * 1000:.3f}\n")
            if conn.execute(MARK_SYNCED, (oid,)).rowcount != 1:
                raise RuntimeError(f"outbox row {oid} was not pending any more")
            conn.execute(MARK_EMAIL, (email_id,))
    if apply_log:
        apply_log.flush()
    return len(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--database-url", required=True)
    ap.add_argument("--mongodb-url", required=True)
    ap.add_argument("--collection", default="creditor_debts")
    ap.add_argument("--apply-log", help="append `outbox_id apply_time_ms` per applied row")
    ap.add_argument("--ready-file", help="created once connected")
    a = ap.parse_args()

    def stop(*_):
        global stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    mongo = MongoClient(a.mongodb_url)
    collection = mongo.get_default_database()[a.collection]
    apply_log = open(a.apply_log, "a", encoding="ascii") if a.apply_log else None
    with psycopg.connect(a.database_url, autocommit=True) as conn:
        mongo.admin.command("ping")
        if a.ready_file:
            open(a.ready_file, "w").close()
        while not stopping:
            try:
                n = process_pending_outbox(conn, collection, apply_log)
            except (psycopg.OperationalError, RuntimeError) as e:
                raise SystemExit(f"seed relay: {e}")
            except Exception as e:  # a failed write: the batch rolled back, its rows stay pending
                print(f"seed relay: batch rolled back: {e}", file=sys.stderr)
                n = 0
            if n < BATCH and not stopping:
                time.sleep(POLL_SECONDS)
    if apply_log:
        apply_log.close()
    mongo.close()


if __name__ == "__main__":
    main()
