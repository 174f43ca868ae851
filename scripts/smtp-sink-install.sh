#!/usr/bin/env bash
# Installs the test SMTP server (aiosmtpd, pinned) into .tools/smtp-venv, once;
# safe to run concurrently (flock). Prints the venv's python on stdout.
set -euo pipefail
AIOSMTPD_VERSION=1.4.6
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.tools/smtp-venv"
mkdir -p "$root/.tools"
exec 9>"$root/.tools/smtp-venv.lock"
flock 9
if ! "$venv/bin/python" -c "import aiosmtpd, sys; sys.exit(aiosmtpd.__version__ != '$AIOSMTPD_VERSION')" 2>/dev/null; then
    if ! python3 -m venv "$venv" >&2; then
        # Debian and Ubuntu ship venv apart from python3.
        echo "smtp-sink-install: python3 -m venv failed; installing python3-venv" >&2
        if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
        $SUDO apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >&2
        rm -rf "$venv"
        python3 -m venv "$venv" >&2
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check "aiosmtpd==$AIOSMTPD_VERSION" >&2
fi
echo "$venv/bin/python"
