"""The MongoDB write outboxd makes (src/mongo.rs `document()` and `write_guarded()`), in pymongo."""

import datetime
import re

from bson.int64 import Int64
from pymongo.errors import DuplicateKeyError

AMOUNT = re.compile(r"^([0-9]{1,15})(?:\.([0-9]{1,2}))?$")


def amount_minor(text):
    """Exact minor units of a decimal text ("1234.56" -> 123456), never via float."""
    m = AMOUNT.match(text)
    if not m:
        raise ValueError(f"payload field `amount` is not a decimal such as \"1234.56\": {text!r}")
    return int(m.group(1)) * 100 + int((m.group(2) or "").ljust(2, "0"))


def document(msg):
    """The `$set` document for one workload message, field for field as outboxd writes it."""
    p = msg["payload"]
    return {
        "client_reference": p["client_reference"],
        "creditor_name": p["creditor_name"],
        "creditor_reference": p.get("creditor_reference"),
        "amount": p["amount"],
        "amount_minor": Int64(amount_minor(p["amount"])),
        "currency": p["currency"],
        "email_id": Int64(msg["email_id"]),
        "ticket_id": Int64(msg["ticket_id"]),
        "webhook_id": msg["webhook_id"],
        "idempotency_key": msg["idempotency_key"],
        "outbox_id": Int64(msg["outbox_id"]),
        "synced_at": datetime.datetime.now(datetime.timezone.utc),
    }


def write_guarded(collection, msg):
    """Upserts unless the document already holds this message or a newer one.

    Duplicate key (11000) on the first try may be a concurrent upsert of the
    same new aggregate: try once more, as outboxd does; a second one means the
    document is already newer, which counts as applied.
    """
    query = {"_id": msg["aggregate_id"], "outbox_id": {"$not": {"$gte": Int64(msg["outbox_id"])}}}
    update = {"$set": document(msg)}
    for _ in range(2):
        try:
            collection.update_one(query, update, upsert=True)
            return
        except DuplicateKeyError:
            continue
