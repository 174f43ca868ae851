"""Driver of the peer relays for outboxd's benchmark; see README.md beside this file.

    harness.py PEER MODE [options]     PEER: seed | gw   MODE: preload | workload | drain | lag

Loads the backlog (not timed), runs the peer, times it or measures its lag,
verifies every aggregate's document, and prints one JSON object on stdout.
Everything else goes to stderr.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import psycopg
from pymongo import MongoClient

HERE = os.path.dirname(os.path.abspath(__file__))
OPERATION = "update_creditor_debt"
POLL_SECONDS = 0.05


class Stop(Exception):
    """SIGTERM or SIGINT: stop the peer and leave nothing behind."""


def say(*args):
    """Progress, on stderr."""
    print("peers:", *args, file=sys.stderr, flush=True)


def read_workload(path):
    """The workload's messages, in the order they are enqueued."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def collection_of(url, name):
    """The target collection of a MongoDB URL that names its database."""
    client = MongoClient(url)
    return client, client.get_default_database()[name]


# ----------------------------------------------------------------- workload, preload

def cmd_workload(a):
    """Writes a skewed update workload and the aggregates to preload.

    `--documents` aggregates exist before the run (preload them); a message
    updates one of them, chosen with a skew (a few aggregates get many
    messages), except for `--new-fraction` of them, which each create one new
    aggregate.
    """
    rng = random.Random(a.seed)
    existing = [aggregate_id(i) for i in range(a.documents)]
    hot = existing[:]
    rng.shuffle(hot)
    with open(a.aggregates_out, "w", encoding="ascii") as f:
        f.writelines(agg + "\n" for agg in existing)
    new = a.documents
    with open(a.out, "w", encoding="utf-8") as f:
        for n in range(1, a.messages + 1):
            if rng.random() < a.new_fraction:
                agg, new = aggregate_id(new), new + 1
            else:
                agg = hot[int(len(hot) * rng.random() ** 3)]
            client, creditor = agg.split("/")
            msg = {
                "outbox_id": n,
                "aggregate_id": agg,
                "email_id": n,
                "ticket_id": 90000 + n,
                "webhook_id": f"evt-{n}",
                "idempotency_key": f"{OPERATION}:{agg}:{rng.getrandbits(64):016x}",
                "payload": {
                    "client_reference": client,
                    "creditor_name": "Sparkasse KölnBonn",
                    "creditor_reference": creditor,
                    "amount": f"{rng.randrange(1, 10_000_000) / 100:.2f}",
                    "currency": "EUR",
                },
            }
            f.write(json.dumps(msg, ensure_ascii=False) + "\n")
    print(json.dumps({"mode": "workload", "messages": a.messages, "documents": a.documents}))


def aggregate_id(i):
    """Aggregate i: client i // 5, its creditor i % 5."""
    return f"MP-{i // 5:07d}/K-{i % 5:05d}"


def preload(url, name, path):
    """Replaces the collection by one document per aggregate in `path`, each with outbox_id 0."""
    from bson.int64 import Int64

    with open(path, encoding="ascii") as f:
        ids = [line.strip() for line in f if line.strip()]
    client, coll = collection_of(url, name)
    with client:
        coll.drop()
        for i in range(0, len(ids), 1000):
            coll.insert_many([{"_id": agg, "outbox_id": Int64(0)} for agg in ids[i : i + 1000]], ordered=False)
    say(f"preloaded {len(ids)} documents into {name}")
    return len(ids)


def cmd_preload(a):
    """`preload` mode."""
    n = preload(a.mongodb_url, a.collection, a.aggregates)
    print(json.dumps({"mode": "preload", "documents": n}))


# ----------------------------------------------------------------- the peers

class Seed:
    """The seed-style relay on outboxd's tables; `concurrency` relay processes."""

    name = "seed"

    def __init__(self, a):
        self.a = a
        self.pg = psycopg.connect(a.database_url, autocommit=True)

    def prepare(self, reset):
        """Checks that the outbox is empty (or empties it with --reset)."""
        if reset:
            self.pg.execute("TRUNCATE outbox_messages, incoming_emails, idempotency_keys")
        if self.pg.execute("SELECT EXISTS (SELECT 1 FROM outbox_messages)").fetchone()[0]:
            raise SystemExit("peers: outbox_messages is not empty: give each run a fresh database, or pass --reset")

    def load(self, msgs):
        """The whole backlog as pending rows, as ingest would have written them."""
        with self.pg.transaction():
            cur = self.pg.cursor()
            with cur.copy("COPY incoming_emails (id, webhook_id, ticket_id, from_address, subject, body) FROM STDIN") as cp:
                for m in msgs:
                    cp.write_row(email_row(m))
            with cur.copy(
                "COPY outbox_messages (id, operation, aggregate_id, payload, email_id, idempotency_key) FROM STDIN"
            ) as cp:
                for m in msgs:
                    cp.write_row(outbox_row(m))
        self.pg.execute("ANALYZE outbox_messages, incoming_emails")

    def enqueue(self, m):
        """One message in its own transaction, as a webhook would."""
        with self.pg.transaction():
            self.pg.execute(
                "INSERT INTO incoming_emails (id, webhook_id, ticket_id, from_address, subject, body)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                email_row(m),
            )
            self.pg.execute(
                "INSERT INTO outbox_messages (id, operation, aggregate_id, payload, email_id, idempotency_key)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                outbox_row(m),
            )

    def spawn(self, tmp):
        """`concurrency` relay processes."""
        procs = []
        for i in range(self.a.concurrency):
            procs.append(spawn(
                [sys.executable, os.path.join(HERE, "seed", "relay.py"),
                 "--database-url", self.a.database_url, "--mongodb-url", self.a.mongodb_url,
                 "--collection", self.a.collection,
                 "--apply-log", os.path.join(tmp, f"apply.{i}"), "--ready-file", os.path.join(tmp, f"ready.{i}")]))
        return procs

    def done(self):
        """No row is left pending."""
        return not self.pg.execute(
            "SELECT EXISTS (SELECT 1 FROM outbox_messages WHERE status = 'pending')").fetchone()[0]


class Gw:
    """graphile-worker 0.16: one job per message, one worker process of `concurrency`."""

    name = "gw"

    def __init__(self, a):
        self.a = a
        self.pg = psycopg.connect(a.database_url, autocommit=True)

    def prepare(self, reset):
        """Installs graphile-worker's schema; checks that no job is queued (or deletes them with --reset)."""
        node(["migrate", "--database-url", self.a.database_url])
        if reset:
            self.pg.execute("DELETE FROM graphile_worker._private_jobs")
        if not self.done():
            raise SystemExit("peers: graphile_worker has jobs queued: give each run a fresh database, or pass --reset")

    def load(self, msgs):
        """All jobs, added in batches of 1,000 through `graphile_worker.add_jobs`."""
        for i in range(0, len(msgs), 1000):
            self.pg.execute(
                "SELECT count(*) FROM graphile_worker.add_jobs(ARRAY("
                " SELECT ROW('apply_debt', p, NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec"
                " FROM json_array_elements(%s::json) AS p))",
                (json.dumps(msgs[i : i + 1000]),),
            )
        self.pg.execute("ANALYZE graphile_worker._private_jobs")

    def enqueue(self, m):
        """One job in its own transaction, as a webhook would."""
        self.pg.execute("SELECT graphile_worker.add_job('apply_debt', %s::json)", (json.dumps(m),))

    def spawn(self, tmp):
        """One worker process running `concurrency` jobs at once."""
        return [spawn(node_command(
            ["run", "--database-url", self.a.database_url, "--mongodb-url", self.a.mongodb_url,
             "--collection", self.a.collection, "--concurrency", str(self.a.concurrency),
             "--apply-log", os.path.join(tmp, "apply.0"), "--ready-file", os.path.join(tmp, "ready.0")]))]

    def done(self):
        """No job is left: graphile-worker deletes a job once it completed."""
        return not self.pg.execute("SELECT EXISTS (SELECT 1 FROM graphile_worker._private_jobs)").fetchone()[0]

    def failures(self):
        """Jobs that failed at least once, with their last error."""
        return self.pg.execute(
            "SELECT id, attempts, last_error FROM graphile_worker._private_jobs WHERE last_error IS NOT NULL LIMIT 5"
        ).fetchall()


def email_row(m):
    """The incoming_emails row of a message."""
    return (m["email_id"], m["webhook_id"], m["ticket_id"], "debtor@example.com", "Forderung", "bench")


def outbox_row(m):
    """The outbox_messages row of a message."""
    return (m["outbox_id"], OPERATION, m["aggregate_id"], json.dumps(m["payload"]), m["email_id"], m["idempotency_key"])


def node_command(args):
    """`node gw/worker.js ARGS`."""
    return ["node", os.path.join(HERE, "gw", "worker.js"), *args]


def node(args):
    """Runs the gw worker script to completion."""
    subprocess.run(node_command(args), check=True, stdout=sys.stderr)


def spawn(cmd):
    """A peer process, its output on our stderr."""
    return subprocess.Popen(cmd, stdout=sys.stderr, stdin=subprocess.DEVNULL)


def stop_all(procs):
    """SIGTERM, then SIGKILL whatever did not exit within 10 s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_until(peer, procs, timeout, what):
    """Polls every 50 ms until the peer is done; fails if a peer exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not peer.done():
        for i, p in enumerate(procs):
            if p.poll() is not None:
                raise SystemExit(f"peers: {peer.name} process {i} exited with {p.returncode} during {what}")
        if time.monotonic() > deadline:
            extra = f"; failed jobs: {peer.failures()}" if hasattr(peer, "failures") else ""
            raise SystemExit(f"peers: {peer.name} {what} did not finish within {timeout:.0f} s{extra}")
        time.sleep(POLL_SECONDS)


def wait_ready(procs, tmp, timeout=60):
    """Until every peer process created its ready file."""
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(os.path.join(tmp, f"ready.{i}")) for i in range(len(procs))):
        for i, p in enumerate(procs):
            if p.poll() is not None:
                raise SystemExit(f"peers: process {i} exited with {p.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise SystemExit(f"peers: not ready within {timeout} s")
        time.sleep(POLL_SECONDS)


def verify(a, msgs):
    """Every aggregate's document holds the outbox_id of its newest message."""
    want = {}
    for m in msgs:
        want[m["aggregate_id"]] = max(want.get(m["aggregate_id"], 0), m["outbox_id"])
    client, coll = collection_of(a.mongodb_url, a.collection)
    with client:
        have = {d["_id"]: d.get("outbox_id") for d in coll.find({}, {"outbox_id": 1})}
    wrong = [(agg, oid, have.get(agg)) for agg, oid in want.items() if have.get(agg) != oid]
    if not wrong:
        say(f"verified {len(want)} aggregates")
        return {"verified": True}
    # FerretDB 1.24 (SQLite) filters and writes in two steps: concurrent guarded
    # updates of one document lose the newer one (gw/guard_race.js shows it).
    text = (f"{len(wrong)} of {len(want)} aggregates do not hold their newest message,"
            f" e.g. (aggregate, want, have) {wrong[:3]}; is the server's guarded update atomic?"
            " (node benches/peers/gw/guard_race.js URL)")
    if not a.allow_stale:
        raise SystemExit("peers: " + text)
    say(text)
    return {"verified": False, "stale": len(wrong)}


def read_apply_logs(tmp, n):
    """outbox_id -> first time (ms since the epoch) its MongoDB write returned."""
    first = {}
    for i in range(n):
        path = os.path.join(tmp, f"apply.{i}")
        if not os.path.exists(path):
            continue
        with open(path, encoding="ascii") as f:
            for line in f:
                oid, ms = line.split()
                first[int(oid)] = min(first.get(int(oid), float("inf")), float(ms))
    return first


def percentile(sorted_values, q):
    """Linear interpolation between closest ranks, as PostgreSQL's percentile_cont."""
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def cmd_load(a, peer, msgs=None):
    """`load` mode (and drain's first step): preload, then the whole backlog, not timed."""
    msgs = read_workload(a.workload) if msgs is None else msgs
    if a.preload:
        preload(a.mongodb_url, a.collection, a.preload)
    peer.prepare(a.reset)
    say(f"loading {len(msgs)} messages for {peer.name}")
    peer.load(msgs)
    try:
        peer.pg.execute("CHECKPOINT")  # the load's, not during the drain
    except psycopg.Error:
        say("no CHECKPOINT before the drain (needs pg_checkpoint); the load's may run during it")


def cmd_drain(a, peer):
    """`drain` mode: load, then time the peer until every message is applied."""
    msgs = read_workload(a.workload)
    if not a.loaded:
        cmd_load(a, peer, msgs)
    with tempfile.TemporaryDirectory(prefix=f"peer-{peer.name}-") as tmp:
        t0 = time.monotonic()
        procs = peer.spawn(tmp)
        try:
            wait_until(peer, procs, a.timeout, "drain")
            seconds = time.monotonic() - t0
        finally:
            stop_all(procs)
    checked = verify(a, msgs)
    print(json.dumps({"peer": peer.name, "mode": "drain", "concurrency": a.concurrency, "rows": len(msgs),
                      "seconds": round(seconds, 3), "rps": round(len(msgs) / seconds, 1), **checked}))


def cmd_lag(a, peer):
    """`lag` mode: offer messages at a fixed rate while the peer runs; commit-to-apply lag per message."""
    msgs = read_workload(a.workload)
    n = round(a.rate * a.seconds)
    if n > len(msgs):
        raise SystemExit(f"peers: {a.rate}/s for {a.seconds} s needs {n} messages; the workload has {len(msgs)}")
    msgs = msgs[:n]
    if a.preload:
        preload(a.mongodb_url, a.collection, a.preload)
    peer.prepare(a.reset)
    committed = {}
    with tempfile.TemporaryDirectory(prefix=f"peer-{peer.name}-") as tmp:
        procs = peer.spawn(tmp)
        try:
            wait_ready(procs, tmp)
            say(f"offering {n} messages at {a.rate}/s to {peer.name}")
            t0 = time.monotonic()
            for i, m in enumerate(msgs):
                delay = t0 + i / a.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                peer.enqueue(m)
                committed[m["outbox_id"]] = time.time() * 1000
            offered = n / (time.monotonic() - t0)
            wait_until(peer, procs, max(30.0, 3 * a.seconds), "lag run")
        finally:
            stop_all(procs)
        applied = read_apply_logs(tmp, len(procs))
    missing = [oid for oid in committed if oid not in applied]
    if missing:
        raise SystemExit(f"peers: {len(missing)} messages have no apply time, e.g. {missing[:5]}")
    checked = verify(a, msgs)
    lags = sorted(applied[oid] - t for oid, t in committed.items())
    print(json.dumps({"peer": peer.name, "mode": "lag", "concurrency": a.concurrency, "offered_rps": a.rate,
                      "achieved_rps": round(offered, 1), "rows": n,
                      "p50_ms": round(percentile(lags, 0.5), 3), "p99_ms": round(percentile(lags, 0.99), 3),
                      "max_ms": round(lags[-1], 3), **checked}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("peer", choices=["seed", "gw"])
    ap.add_argument("mode", choices=["preload", "workload", "load", "drain", "lag"])
    ap.add_argument("--database-url", help="a PostgreSQL database of the peer's own (seed: migrated by outboxd)")
    ap.add_argument("--mongodb-url", help="MongoDB-wire server URL including the database name")
    ap.add_argument("--collection", default="creditor_debts")
    ap.add_argument("--concurrency", type=int, default=1, help="gw: worker concurrency; seed: relay processes")
    ap.add_argument("--workload", help="JSONL, one message per line, in the order enqueued")
    ap.add_argument("--preload", metavar="AGGREGATES",
                    help="drain/lag: first replace the collection by one document per aggregate in this file")
    ap.add_argument("--loaded", action="store_true",
                    help="drain: the backlog was loaded by `load` (so a caller can measure the drain alone)")
    ap.add_argument("--reset", action="store_true", help="empty the peer's queue first instead of refusing")
    ap.add_argument("--allow-stale", action="store_true",
                    help="report aggregates that lost their newest message as \"verified\": false instead of failing")
    ap.add_argument("--rate", type=float, help="lag: offered messages/s")
    ap.add_argument("--seconds", type=float, help="lag: how long to offer")
    ap.add_argument("--timeout", type=float, default=600, help="drain: fail after this many seconds")
    ap.add_argument("--aggregates", help="preload: one aggregate id a line")
    ap.add_argument("--out", help="workload: the JSONL to write")
    ap.add_argument("--aggregates-out", help="workload: where to write the aggregates to preload")
    ap.add_argument("--documents", type=int, default=300, help="workload: aggregates that exist before the run")
    ap.add_argument("--messages", type=int, default=2000, help="workload: messages")
    ap.add_argument("--new-fraction", type=float, default=0.05, help="workload: share of messages that create")
    ap.add_argument("--seed", type=int, default=21, help="workload: random seed")
    a = ap.parse_args()

    def need(*names):
        missing = [n for n in names if getattr(a, n.replace("-", "_")) is None]
        if missing:
            ap.error(f"{a.mode} needs " + ", ".join("--" + n for n in missing))

    def on_signal(*_):
        raise Stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if a.mode == "workload":
            need("out", "aggregates-out")
            return cmd_workload(a)
        if a.mode == "preload":
            need("mongodb-url", "aggregates")
            return cmd_preload(a)
        need("database-url", "mongodb-url", "workload")
        if a.mode == "lag":
            need("rate", "seconds")
        peer = (Seed if a.peer == "seed" else Gw)(a)
        {"load": cmd_load, "drain": cmd_drain, "lag": cmd_lag}[a.mode](a, peer)
    except Stop:
        raise SystemExit("peers: stopped by a signal")


if __name__ == "__main__":
    main()
