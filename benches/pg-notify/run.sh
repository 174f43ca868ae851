#!/usr/bin/env bash
# What a NOTIFY inside the ingest transaction would cost (README, "Waking the
# relays"): pgbench at 32 clients runs ingest's enqueue statement in a
# transaction followed by `SELECT 1` (as ingest commits: no NOTIFY), then the
# same with `SELECT pg_notify('outboxd_outbox', '')` instead, alternating, while
# one session LISTENs as a relay does. Services as for `make test`.
#   benches/pg-notify/run.sh            ROUNDS=2 (per variant), SECS=15
# Needs the enqueue script that `make bench` writes (any BENCH_SCALE), and a
# release or debug binary for `migrate`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/../.."
services_env="$(scripts/services.sh)"
eval "$services_env"
target="${CARGO_TARGET_DIR:-target}"
enqueue="$target/bench/pgbench-enqueue.sql"
[ -f "$enqueue" ] || { echo "no $enqueue: run make bench (BENCH_SCALE=small BENCH_ONLY=ingest is enough) first" >&2; exit 1; }
bin="$target/release/outboxd"
[ -x "$bin" ] || bin="$target/debug/outboxd"
[ -x "$bin" ] || { echo "no outboxd binary under $target (cargo build)" >&2; exit 1; }
pgbin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
rounds="${ROUNDS:-2}"
secs="${SECS:-15}"
db="pg_notify_$$"
# DATABASE_URL with its database replaced (services.sh writes no query string).
url="${DATABASE_URL%/*}/$db"
work="$(mktemp -d)"
listener=""
cleanup() {
    exec 3>&- 2>/dev/null || true
    if [ -n "$listener" ]; then kill "$listener" 2>/dev/null || true; fi
    psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
psql "$DATABASE_URL" -qc "CREATE DATABASE $db"
DATABASE_URL="$url" "$bin" migrate >/dev/null

# The enqueue script: `\set` lines, then one statement ending in `;`.
grep '^\\set' "$enqueue" > "$work/head"
grep -v '^\\set' "$enqueue" > "$work/stmt"
for variant in plain notify; do
    extra="SELECT 1;"
    [ "$variant" = notify ] && extra="SELECT pg_notify('outboxd_outbox', '');"
    { cat "$work/head"; echo "BEGIN;"; cat "$work/stmt"; echo "$extra"; echo "COMMIT;"; } > "$work/$variant.sql"
done

# LISTEN takes effect at its commit: its own statement, then an idle session
# that holds the channel until the FIFO closes.
mkfifo "$work/listen"
psql "$url" -q < "$work/listen" >/dev/null 2>&1 &
listener=$!
exec 3>"$work/listen"
echo 'LISTEN outboxd_outbox;' >&3
sleep 1

for round in $(seq 1 "$rounds"); do
    for variant in plain notify; do
        psql "$url" -qc "TRUNCATE outbox_messages, incoming_emails, idempotency_keys" >/dev/null
        if ! PGCLIENTENCODING=UTF8 "$pgbin/pgbench" -n -M prepared -c 32 -j 2 -T "$secs" \
                -f "$work/$variant.sql" "$url" > "$work/out" 2>&1; then
            echo "pgbench failed:" >&2
            cat "$work/out" >&2
            exit 1
        fi
        tps="$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$work/out")"
        echo "round $round  $variant  ${tps} tps"
    done
done
