#!/usr/bin/env bash
# Instructions per accepted webhook of `outboxd ingest`, counted by callgrind:
# repeatable on a noisy machine, unlike CPU time. Services as for `make test`.
#   benches/callgrind/ingest.sh [BINARY] [REQUESTS]    (default: the release build, 1000)
# Prints the total; the profile is kept in target/bench/callgrind-ingest.out
# (read it with callgrind_annotate --inclusive=yes). Under valgrind, sha2 runs
# its portable code, not SHA-NI, so hashing weighs more here than natively.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
eval "$(scripts/services.sh 2>/dev/null)"
bin="${1:-${CARGO_TARGET_DIR:-target}/release/outboxd}"
n="${2:-1000}"
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install -y valgrind)" >&2; exit 1; }
[ -x "$bin" ] || { echo "no binary at $bin (cargo build --release)" >&2; exit 1; }

db="callgrind_ingest_$$"
url="${DATABASE_URL%/*}/$db"
out_dir="${CARGO_TARGET_DIR:-target}/bench"
mkdir -p "$out_dir"
raw="$(mktemp -d)"
psql "$DATABASE_URL" -qc "CREATE DATABASE $db"
cleanup() {
    [ -n "${vg:-}" ] && kill -TERM "$vg" 2>/dev/null && wait "$vg" 2>/dev/null
    psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$raw"
}
trap cleanup EXIT
DATABASE_URL="$url" "$bin" migrate >/dev/null

port=$((20000 + RANDOM % 20000))
DATABASE_URL="$url" OUTBOXD_WEBHOOK_SECRET=bench-secret-not-for-production OUTBOXD__LOG__FORMAT=json \
    valgrind --tool=callgrind --callgrind-out-file="$raw/cg.out" \
    "$bin" ingest --listen "127.0.0.1:$port" >"$raw/ingest.log" 2>&1 &
vg=$!
for _ in $(seq 120); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.5; done
# Warm up with the measured concurrency, so that every pooled connection (and
# its SCRAM handshake) exists before counting starts.
python3 benches/callgrind/load.py "$port" 400 8 >/dev/null
callgrind_control -z "$vg" >/dev/null 2>&1
python3 benches/callgrind/load.py "$port" "$n" 8
kill -TERM "$vg"
wait "$vg" || true
vg=
total="$(sed -n 's/^\(summary\|totals\): *\([0-9]*\).*/\2/p' "$raw"/cg.out* | sort -n | tail -1)"
cp "$(ls -t "$raw"/cg.out* | head -1)" "$out_dir/callgrind-ingest.out"
echo "instructions per request: $((total / n)) ($n requests, 8 connections; profile: $out_dir/callgrind-ingest.out)"
