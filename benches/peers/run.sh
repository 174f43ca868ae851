#!/usr/bin/env bash
# Entry point of the peer relays for outboxd's benchmark (see README.md here).
#   run.sh PEER MODE [options]     PEER: seed | gw   MODE: install | preload | workload | load | drain | lag
# Installs what PEER needs on first use (idempotent, from the pinned lockfiles),
# then hands over to harness.py, which prints one JSON object on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
home="${PEERS_HOME:-${CARGO_TARGET_DIR:-$repo/target}/peers}"
venv="$home/venv"

[[ $# -ge 2 ]] || { echo "usage: run.sh seed|gw install|preload|workload|load|drain|lag [options]" >&2; exit 2; }
peer="$1" mode="$2"
case "$peer" in seed | gw) ;; *) echo "run.sh: unknown peer '$peer' (seed or gw)" >&2; exit 2 ;; esac

# A stamp holds the lockfile's hash: install again only when the lockfile changed.
install_python() {
  local want stamp="$venv/.outboxd-stamp"
  want="$(sha256sum "$here/seed/requirements.txt" | cut -d' ' -f1)"
  [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && return
  echo "run.sh: installing the Python peer dependencies into $venv" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --no-deps -r "$here/seed/requirements.txt" >&2
  echo "$want" >"$stamp"
}

install_node() {
  local want stamp="$here/gw/node_modules/.outboxd-stamp"
  want="$(sha256sum "$here/gw/package-lock.json" | cut -d' ' -f1)"
  [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && return
  echo "run.sh: installing graphile-worker (npm ci) into $here/gw/node_modules" >&2
  (cd "$here/gw" && npm ci --omit=dev --no-audit --no-fund --loglevel=error >&2)
  echo "$want" >"$stamp"
}

# The harness is Python for both peers (load, offer, verify); gw also needs node.
install_python
[[ "$peer" == gw ]] && install_node
[[ "$mode" == install ]] && exit 0

exec "$venv/bin/python" "$here/harness.py" "$@"
