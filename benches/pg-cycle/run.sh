#!/usr/bin/env bash
# PostgreSQL's CPU per outbox row for the relay's statements, apart from MongoDB:
# a fresh backlog of N rows (one aggregate per row), then the relay's claim and
# mark looped under pgbench (one client), summing the CPU of every PostgreSQL
# process. Services as for `make test`.
#   benches/pg-cycle/run.sh
#   N=30000 (rows), LIM=100 (batch size), GUARD=0 (leave out the claim's aggregate
#   guard), EMAIL=0 (leave out the mark's e-mail update)
# The statements mirror src/outbox.rs (claim, mark_synced, unlock_aggregates);
# sessions run with synchronous_commit off, so WAL flushes are left out.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/../.."
eval "$(scripts/services.sh 2>/dev/null)"
sql="$here/cycle.sql"
on_off() { [ "$1" = 0 ] && echo false || echo true; }
guard="$(on_off "${GUARD:-1}")"
email="$(on_off "${EMAIL:-1}")"
n="${N:-30000}"
lim="${LIM:-100}"
bin="${CARGO_TARGET_DIR:-target}/release/outboxd"
[ -x "$bin" ] || { echo "no binary at $bin (cargo build --release)" >&2; exit 1; }
pgbin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
db="pg_cycle_$$"
url="${DATABASE_URL%/*}/$db"
psql "$DATABASE_URL" -qc "CREATE DATABASE $db"
trap 'psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true' EXIT
DATABASE_URL="$url" "$bin" migrate >/dev/null
psql "$url" -q -v n="$n" -f "$here/backlog.sql" >/dev/null

pg_cpu() { # CPU seconds of all PostgreSQL processes, exited children included
    python3 - <<'PY'
import os
hz = os.sysconf('SC_CLK_TCK'); total = 0
for p in filter(str.isdigit, os.listdir('/proc')):
    try:
        comm = open(f'/proc/{p}/comm').read().strip()
        f = open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()
    except OSError:
        continue
    if comm.startswith('postgres'):
        # utime+stime, plus cutime+cstime of reaped children (backends that exited)
        total += (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / hz
print(total)
PY
}
c0="$(pg_cpu)"
PGOPTIONS="-c synchronous_commit=off" "$pgbin/pgbench" -n -r -c 1 -t $((n / lim)) -D lim="$lim" -D guard="$guard" -D email="$email" \
    -f "$sql" "$url" |
    grep -E "latency average|^ +[0-9]"
c1="$(pg_cpu)"
python3 -c "print(f'PostgreSQL CPU per row: {($c1 - $c0) / $n * 1e6:.1f} µs ($n rows, batches of $lim, guard $guard, e-mail update $email)')"
