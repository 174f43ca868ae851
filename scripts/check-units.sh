#!/usr/bin/env bash
# Check the systemd units in systemd/ without a running systemd and without
# touching /usr/bin:
#   1. `systemd-analyze verify` accepts every unit (and the relay template,
#      instantiated) without a single warning;
#   2. `systemd-analyze security --offline=true` rates ingest, a relay instance
#      and migrate at an overall exposure of at most $MAX_EXPOSURE (default 2.5).
# The units are copied to a temporary directory with ExecStart's /usr/bin/outboxd
# replaced by a stub there, since verify requires the executable to exist.
# Exits non-zero on any failure. Called by `make test`; runs as root or not.
set -euo pipefail

MAX_EXPOSURE=${MAX_EXPOSURE:-2.5}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UNITS=(outboxd-ingest.service outboxd-relay@.service outboxd-migrate.service)
INSTANCE=check

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-units: systemd-analyze missing, installing systemd" >&2
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq systemd >/dev/null
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/bin"
printf '#!/bin/sh\nexit 0\n' >"$tmp/bin/outboxd"
chmod 0755 "$tmp/bin/outboxd"

fail=0
for u in "${UNITS[@]}"; do
    src="$ROOT/systemd/$u"
    if [ ! -f "$src" ]; then
        echo "check-units: FAIL $src is missing" >&2
        fail=1
        continue
    fi
    if ! grep -q '^ExecStart=/usr/bin/outboxd ' "$src"; then
        echo "check-units: FAIL $u: ExecStart does not run /usr/bin/outboxd" >&2
        fail=1
    fi
    sed "s#/usr/bin/outboxd#$tmp/bin/outboxd#g" "$src" >"$tmp/$u"
done
[ "$fail" -eq 0 ] || exit 1
cp "$tmp/outboxd-relay@.service" "$tmp/outboxd-relay@$INSTANCE.service"

export SYSTEMD_COLORS=0 SYSTEMD_PAGER=cat SYSTEMD_LOG_COLOR=0

# 1. verify: any output is a warning (unknown key, bad value, missing binary…).
to_verify=(outboxd-ingest.service "outboxd-relay@.service" "outboxd-relay@$INSTANCE.service" outboxd-migrate.service)
for u in "${to_verify[@]}"; do
    rc=0
    out=$(cd "$tmp" && systemd-analyze verify --man=no "$tmp/$u" 2>&1) || rc=$?
    # Name the repository file, not the temporary copy, in messages.
    out=${out//$tmp\/bin\/outboxd//usr/bin/outboxd}
    out=${out//$tmp\//systemd/}
    if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
        echo "check-units: FAIL verify $u (exit $rc):" >&2
        printf '%s\n' "$out" >&2
        fail=1
    else
        echo "check-units: ok   verify $u"
    fi
done

# 2. security: overall exposure per unit.
for u in outboxd-ingest.service "outboxd-relay@$INSTANCE.service" outboxd-migrate.service; do
    rc=0
    out=$(systemd-analyze security --offline=true --no-pager "$tmp/$u" 2>&1) || rc=$?
    score=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9][0-9.]*\).*/\1/p' | tail -n1)
    if [ -z "$score" ]; then
        echo "check-units: FAIL security $u: no exposure level in output (exit $rc):" >&2
        printf '%s\n' "$out" >&2
        fail=1
    elif awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s > m) }'; then
        echo "check-units: FAIL security $u: exposure $score > $MAX_EXPOSURE" >&2
        printf '%s\n' "$out" | grep '✗' >&2 || true
        fail=1
    else
        echo "check-units: ok   security $u: exposure $score (max $MAX_EXPOSURE)"
    fi
done

exit "$fail"
