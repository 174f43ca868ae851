#!/usr/bin/env bash
# Bring up (idempotently) the services outboxd needs for development and tests:
#   * a local PostgreSQL cluster (Debian packages) with role/database `outboxd`
#   * FerretDB 1.24.2 on 127.0.0.1:27017, unless MONGODB_URL already points at
#     a reachable MongoDB-compatible server. Its backend is PostgreSQL, in a
#     cluster of its own (`ferretdb`, port 5433), whose tables get a GIN index
#     on `_id` (see ensure_ferret_backend); SERVICES_FERRETDB_HANDLER=sqlite
#     keeps the SQLite backend instead.
#
# Progress goes to stderr; stdout carries only eval-able lines:
#   eval "$(scripts/services.sh)"        # or: eval "$(make -s services)"
#
# Usage: scripts/services.sh [up|stop|status]     (default: up)
# shellcheck disable=SC2015,SC2016  # intentional: A && B || die; single-quoted bash -c bodies
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
STATE="$ROOT/.state"

PG_PORT=5432
PG_ROLE=outboxd
PG_PASSWORD=outboxd
PG_DB=outboxd
PG_MAX_CONNECTIONS=400
# TLS for the tests of `sslmode`: a CA of our own, a server certificate for
# localhost and 127.0.0.1, and a role that may log in over TLS only.
PG_TLS_ROLE=outboxd_tls
PG_TLS_PASSWORD=outboxd_tls

FERRET_VERSION=v1.24.2
FERRET_MODULE=github.com/FerretDB/FerretDB
FERRET_BIN="$TOOLS/bin/ferretdb"
FERRET_HOST=127.0.0.1
FERRET_PORT="${SERVICES_FERRETDB_PORT:-27017}"   # override only to avoid a port clash
FERRET_STATE="$STATE/ferretdb"
FERRET_PIDFILE="$FERRET_STATE/ferretdb.pid"
FERRET_LOG="$FERRET_STATE/ferretdb.log"
FERRET_HANDLER="${SERVICES_FERRETDB_HANDLER:-postgresql}"   # postgresql | sqlite
# FerretDB's PostgreSQL backend: a cluster of its own, so that the outbox's
# cluster (the system of record) is measured, restarted and tuned alone.
FERRET_PG_CLUSTER=ferretdb
FERRET_PG_PORT="${SERVICES_FERRETDB_PG_PORT:-5433}"
FERRET_PG_ROLE=ferretdb
FERRET_PG_PASSWORD=ferretdb-local
FERRET_PG_DB=ferretdb
FERRET_PG_URL="postgres://$FERRET_PG_ROLE:$FERRET_PG_PASSWORD@127.0.0.1:$FERRET_PG_PORT/$FERRET_PG_DB"
GO_MIN_MAJOR=1
GO_MIN_MINOR=24

# Common install locations that may be missing from PATH (non-login shells, CI).
for d in /usr/local/go/bin "${HOME:-/root}/go/bin" "${HOME:-/root}/.cargo/bin"; do
    case ":$PATH:" in *":$d:"*) ;; *) [ -d "$d" ] && PATH="$PATH:$d" ;; esac
done
export PATH

log() { printf 'services: %s\n' "$*" >&2; }
die() {
    printf 'services: ERROR: %s\n' "$1" >&2
    shift
    local line
    for line in "$@"; do printf 'services:        %s\n' "$line" >&2; done
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# tcp_open HOST PORT: succeeds if a TCP connection can be made within 3 s.
tcp_open() {
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" >/dev/null 2>&1
}

# mongo_ping HOST PORT: sends a real OP_MSG {ping: 1, $db: "admin"} and checks
# that a wire-protocol reply with {ok: 1.0} comes back.
mongo_ping() {
    timeout 5 bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        # header(len=51, requestID=1, responseTo=0, opCode=2013 OP_MSG), flags=0,
        # section kind 0, BSON {ping: int32 1, $db: "admin"} (30 bytes)
        printf "\x33\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\xdd\x07\x00\x00\x00\x00\x00\x00\x00\x1e\x00\x00\x00\x10ping\x00\x01\x00\x00\x00\x02\$db\x00\x06\x00\x00\x00admin\x00\x00" >&3
        n=$(head -c 4 <&3 | od -An -tu4 | tr -d " \n")
        [ -n "$n" ] && [ "$n" -gt 16 ] && [ "$n" -lt 1048576 ] || exit 1
        # reply must contain the element ok: 1.0 (type 0x01 double, "ok\0", 1.0 LE)
        head -c $((n - 4)) <&3 | od -An -v -tx1 | tr -d " \n" | grep -q "016f6b00000000000000f03f"
    ' _ "$1" "$2" >/dev/null 2>&1
}

# ---------------------------------------------------------------- PostgreSQL

pg_version() {
    # Highest installed server major version that has a postgres binary.
    local v best=""
    for v in /usr/lib/postgresql/*/bin/postgres; do
        [ -x "$v" ] || continue
        v="${v#/usr/lib/postgresql/}"
        v="${v%%/*}"
        if [ -z "$best" ] || [ "$v" -gt "$best" ]; then best="$v"; fi
    done
    printf '%s' "$best"
}

# psql as the postgres superuser over the local socket (PGSUPER_PORT picks
# another cluster than the outbox's).
pg_super() {
    local -a cmd=(psql -X -q -v ON_ERROR_STOP=1 -h /var/run/postgresql -p "${PGSUPER_PORT:-$PG_PORT}" -d postgres "$@")
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "${cmd[@]}"
    elif [ "$(id -un)" = postgres ]; then
        "${cmd[@]}"
    elif have sudo; then
        sudo -n -u postgres -- "${cmd[@]}"
    else
        die "need to run psql as the postgres OS user" "run this script as root (or with passwordless sudo)"
    fi
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif have sudo; then sudo -n "$@"
    else return 1
    fi
}

# A download from a package registry: a brief outage should not fail the run.
retry3() {
    local try
    for try in 1 2 3; do
        "$@" && return 0
        [ "$try" = 3 ] || { log "'$1 ${2:-}' failed (attempt $try of 3); retrying in 15 s"; sleep 15; }
    done
    return 1
}

# `apt-get update` fails at once while another apt (apt-daily just after boot)
# holds the package lists' lock; DPkg::Lock::Timeout does not cover that lock.
apt_update() {
    local try
    for try in 1 2 3 4 5 6; do
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q && return 0
        log "apt-get update failed (attempt $try of 6; another apt running?); retrying in 20 s"
        sleep 20
    done
    return 1
}

ensure_postgres_installed() {
    if have pg_ctlcluster && have psql && [ -n "$(pg_version)" ]; then
        return 0
    fi
    log "PostgreSQL server not found; installing Debian package 'postgresql' (apt-get)"
    if ! have apt-get; then
        die "PostgreSQL is not installed and apt-get is not available" \
            "install a PostgreSQL server (with Debian's postgresql-common tools) yourself, then re-run"
    fi
    if ! { apt_update && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; } >&2; then
        die "could not install PostgreSQL with apt-get" \
            "run as root: apt-get update && apt-get install -y postgresql" \
            "then re-run: make services"
    fi
    have pg_ctlcluster && [ -n "$(pg_version)" ] ||
        die "apt-get installed 'postgresql' but no server binary was found under /usr/lib/postgresql/*/bin"
}

pg_cluster_port() { # VER -> port of cluster main, empty if absent
    pg_lsclusters -h 2>/dev/null | awk -v v="$1" '$1 == v && $2 == "main" { print $3 }'
}

pg_cluster_running() { # VER
    pg_ctlcluster "$1" main status >/dev/null 2>&1
}

pg_wait_ready() {
    local i
    for i in $(seq 1 60); do
        if pg_isready -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null; then return 0; fi
        sleep 0.5
    done
    return 1
}

ensure_postgres() {
    ensure_postgres_installed
    local ver port conf hba
    ver="$(pg_version)"
    port="$(pg_cluster_port "$ver")"
    if [ -z "$port" ]; then
        log "creating PostgreSQL $ver cluster 'main' on port $PG_PORT"
        as_root pg_createcluster --port "$PG_PORT" "$ver" main >&2 ||
            die "pg_createcluster $ver main failed" "see the messages above"
        port="$PG_PORT"
    fi
    conf="/etc/postgresql/$ver/main"

    if [ "$port" != "$PG_PORT" ]; then
        log "PostgreSQL $ver/main is configured for port $port; switching it to $PG_PORT"
        if pg_cluster_running "$ver"; then as_root pg_ctlcluster "$ver" main stop >&2; fi
        as_root pg_conftool "$ver" main set port "$PG_PORT" >&2
    fi

    # TCP on 127.0.0.1 with password auth (Debian's default is scram-sha-256).
    hba="$conf/pg_hba.conf"
    if [ -f "$hba" ] && ! grep -Eq '^[[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+(scram-sha-256|md5|password)' "$hba"; then
        log "adding 'host all all 127.0.0.1/32 scram-sha-256' to $hba"
        printf 'host    all             all             127.0.0.1/32            scram-sha-256\n' | as_root tee -a "$hba" >/dev/null
        if pg_cluster_running "$ver"; then as_root pg_ctlcluster "$ver" main reload >&2; fi
    fi
    local listen
    listen="$(pg_conftool -s "$ver" main show listen_addresses 2>/dev/null || true)"
    case "$listen" in
        "" | *localhost* | *127.0.0.1* | *"*"*) ;;
        *)
            log "listen_addresses is '$listen'; setting it to 'localhost'"
            as_root pg_conftool "$ver" main set listen_addresses localhost >&2
            if pg_cluster_running "$ver"; then as_root pg_ctlcluster "$ver" main restart >&2; fi
            ;;
    esac

    if ! pg_cluster_running "$ver"; then
        log "starting PostgreSQL $ver/main"
        as_root pg_ctlcluster "$ver" main start >&2 ||
            die "could not start PostgreSQL $ver/main" "see /var/log/postgresql/postgresql-$ver-main.log"
    else
        log "PostgreSQL $ver/main is running"
    fi
    pg_wait_ready || die "PostgreSQL did not accept connections on 127.0.0.1:$PG_PORT within 30 s" \
        "see /var/log/postgresql/postgresql-$ver-main.log"

    local cur
    cur="$(pg_super -tAc 'SHOW max_connections')"
    if [ "$cur" != "$PG_MAX_CONNECTIONS" ]; then
        log "setting max_connections = $PG_MAX_CONNECTIONS (was $cur); restarting PostgreSQL"
        pg_super -c "ALTER SYSTEM SET max_connections = $PG_MAX_CONNECTIONS"
        as_root pg_ctlcluster "$ver" main restart >&2 ||
            die "could not restart PostgreSQL $ver/main" "see /var/log/postgresql/postgresql-$ver-main.log"
        pg_wait_ready || die "PostgreSQL did not come back after restart" \
            "see /var/log/postgresql/postgresql-$ver-main.log"
    fi

    # Role and database (idempotent). The test suite creates a database per
    # test and its own login roles, hence CREATEDB CREATEROLE.
    pg_super <<SQL
DO \$\$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_ROLE') THEN
        CREATE ROLE $PG_ROLE;
    END IF;
    -- make bench checkpoints before it times claims (PostgreSQL >= 15).
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'pg_checkpoint')
       AND NOT pg_has_role('$PG_ROLE', 'pg_checkpoint', 'MEMBER') THEN
        EXECUTE 'GRANT pg_checkpoint TO $PG_ROLE';
    END IF;
END
\$\$;
ALTER ROLE $PG_ROLE WITH LOGIN CREATEDB CREATEROLE PASSWORD '$PG_PASSWORD';
SQL
    if [ "$(pg_super -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]; then
        log "creating database $PG_DB"
        pg_super -c "CREATE DATABASE $PG_DB OWNER $PG_ROLE"
    fi

    if ! PGPASSWORD="$PG_PASSWORD" PGCONNECT_TIMEOUT=5 psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U "$PG_ROLE" -d "$PG_DB" \
        -tAc 'SELECT 1' >/dev/null 2>&1; then
        die "cannot log in as $PG_ROLE over TCP at 127.0.0.1:$PG_PORT" \
            "check $hba (needs a 'host ... 127.0.0.1/32 scram-sha-256' line) and the server log"
    fi
    ensure_pg_tls "$ver" "$conf"
    log "PostgreSQL ready: postgres://$PG_ROLE:***@127.0.0.1:$PG_PORT/$PG_DB"
}

ensure_pg_tls() { # VER CONF
    local ver="$1" conf="$2" dir="$2/outboxd-tls" ca="$STATE/pg-tls/ca.crt" tmp made=""
    # A new checkout makes a new CA: the server must load the certificate it signed.
    if ! as_root test -s "$dir/server.crt" || ! [ -s "$ca" ]; then
        made=1
        if ! have openssl; then
            log "openssl not found; installing Debian package 'openssl' (for the test certificates)"
            { apt_update && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssl; } >&2 ||
                die "could not install openssl with apt-get" "run as root: apt-get install -y openssl"
        fi
        log "creating a test CA and a server certificate (localhost, 127.0.0.1) in $dir"
        tmp="$(mktemp -d)"
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=outboxd test CA" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -keyout "$tmp/ca.key" -out "$tmp/ca.crt" 2>/dev/null || die "openssl could not make the test CA"
        openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
            -keyout "$tmp/server.key" -out "$tmp/server.csr" 2>/dev/null || die "openssl could not make the server key"
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$tmp/ext"
        openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.crt" -CAkey "$tmp/ca.key" -CAcreateserial \
            -days 3650 -extfile "$tmp/ext" -out "$tmp/server.crt" 2>/dev/null || die "openssl could not sign the server certificate"
        as_root install -d -o postgres -g postgres -m 700 "$dir"
        as_root install -o postgres -g postgres -m 600 "$tmp/server.key" "$dir/server.key"
        as_root install -o postgres -g postgres -m 644 "$tmp/server.crt" "$dir/server.crt"
        mkdir -p "$(dirname "$ca")"
        cp "$tmp/ca.crt" "$ca"
        rm -rf "$tmp"
    fi
    if [ -n "$made" ] || [ "$(pg_super -tAc 'SHOW ssl')" != on ] ||
        [ "$(pg_super -tAc 'SHOW ssl_cert_file')" != "$dir/server.crt" ]; then
        log "turning on TLS in PostgreSQL $ver/main with the test certificate"
        pg_super -c "ALTER SYSTEM SET ssl = on" -c "ALTER SYSTEM SET ssl_cert_file = '$dir/server.crt'" \
            -c "ALTER SYSTEM SET ssl_key_file = '$dir/server.key'" -c "SELECT pg_reload_conf()" >/dev/null
        sleep 1
        [ "$(pg_super -tAc 'SHOW ssl_cert_file')" = "$dir/server.crt" ] ||
            die "PostgreSQL did not take the TLS settings" "see /var/log/postgresql/postgresql-$ver-main.log"
    fi
    # First lines win: this role gets in over TLS only.
    local hba="$conf/pg_hba.conf"
    if ! as_root grep -Eq "^hostssl[[:space:]]+all[[:space:]]+$PG_TLS_ROLE[[:space:]]" "$hba"; then
        log "letting $PG_TLS_ROLE log in over TLS only ($hba)"
        as_root sed -i "1i hostssl all $PG_TLS_ROLE 127.0.0.1/32 scram-sha-256\\
host    all $PG_TLS_ROLE 127.0.0.1/32 reject" "$hba"
        pg_super -tAc 'SELECT pg_reload_conf()' >/dev/null
    fi
    pg_super <<SQL
DO \$\$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_TLS_ROLE') THEN
        CREATE ROLE $PG_TLS_ROLE;
    END IF;
END
\$\$;
ALTER ROLE $PG_TLS_ROLE WITH LOGIN PASSWORD '$PG_TLS_PASSWORD';
GRANT $PG_ROLE TO $PG_TLS_ROLE;
SQL
}

# ------------------------------------------------- FerretDB's PostgreSQL backend

# FerretDB 1.24's PostgreSQL backend finds a document by `_id` with
# `_jsonb->'_id' @> $1`, which the btree index it creates cannot serve: every
# update of an existing document would read the whole collection. An event
# trigger gives each new collection table a GIN index on `_jsonb->'_id'`
# (fastupdate off: a bulk insert would otherwise leave a pending list that
# every lookup scans). It lives in template1 too, so databases that tests
# create for private FerretDB instances have it.
FERRET_PG_TRIGGER_SQL="
CREATE OR REPLACE FUNCTION public.ferretdb_id_gin() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS \$f\$
DECLARE r record;
BEGIN
    FOR r IN SELECT object_identity FROM pg_event_trigger_ddl_commands()
             WHERE command_tag = 'CREATE TABLE' AND object_type = 'table'
    LOOP
        -- Not FerretDB's own metadata tables.
        IF r.object_identity NOT LIKE '%._ferretdb_%' THEN
            EXECUTE format('CREATE INDEX ON %s USING gin ((_jsonb -> %L)) WITH (fastupdate = off)',
                           r.object_identity, '_id');
        END IF;
    END LOOP;
END \$f\$;
DO \$d\$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'ferretdb_id_gin') THEN
        CREATE EVENT TRIGGER ferretdb_id_gin ON ddl_command_end WHEN TAG IN ('CREATE TABLE')
            EXECUTE FUNCTION public.ferretdb_id_gin();
    END IF;
END \$d\$;"

ferret_pg_cluster_port() { # VER -> port of the backend cluster, empty if absent
    pg_lsclusters -h 2>/dev/null | awk -v v="$1" -v c="$FERRET_PG_CLUSTER" '$1 == v && $2 == c { print $3 }'
}

ensure_ferret_backend() {
    local ver port log
    ver="$(pg_version)"
    log="/var/log/postgresql/postgresql-$ver-$FERRET_PG_CLUSTER.log"
    port="$(ferret_pg_cluster_port "$ver")"
    if [ -z "$port" ]; then
        log "creating PostgreSQL $ver cluster '$FERRET_PG_CLUSTER' on port $FERRET_PG_PORT (FerretDB's backend)"
        as_root pg_createcluster --port "$FERRET_PG_PORT" "$ver" "$FERRET_PG_CLUSTER" >&2 ||
            die "pg_createcluster $ver $FERRET_PG_CLUSTER failed" "see the messages above"
        # A test server: loopback only, and commits not waited on (as MongoDB's
        # default journal interval); fsync stays on.
        as_root pg_conftool "$ver" "$FERRET_PG_CLUSTER" set listen_addresses localhost >&2
        as_root pg_conftool "$ver" "$FERRET_PG_CLUSTER" set synchronous_commit off >&2
        as_root pg_conftool "$ver" "$FERRET_PG_CLUSTER" set max_connections 200 >&2
        as_root pg_conftool "$ver" "$FERRET_PG_CLUSTER" set shared_buffers 256MB >&2
        port="$FERRET_PG_PORT"
    fi
    [ "$port" = "$FERRET_PG_PORT" ] ||
        die "PostgreSQL cluster $ver/$FERRET_PG_CLUSTER listens on port $port, not $FERRET_PG_PORT" \
            "set SERVICES_FERRETDB_PG_PORT=$port, or drop it: pg_dropcluster --stop $ver $FERRET_PG_CLUSTER"
    if ! pg_ctlcluster "$ver" "$FERRET_PG_CLUSTER" status >/dev/null 2>&1; then
        log "starting PostgreSQL $ver/$FERRET_PG_CLUSTER"
        as_root pg_ctlcluster "$ver" "$FERRET_PG_CLUSTER" start >&2 ||
            die "could not start PostgreSQL $ver/$FERRET_PG_CLUSTER" "see $log"
    fi
    local i
    for i in $(seq 1 60); do
        pg_isready -q -h 127.0.0.1 -p "$FERRET_PG_PORT" 2>/dev/null && break
        [ "$i" = 60 ] && die "PostgreSQL $ver/$FERRET_PG_CLUSTER did not accept connections within 30 s" "see $log"
        sleep 0.5
    done
    PGSUPER_PORT="$FERRET_PG_PORT" pg_super <<SQL
DO \$\$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$FERRET_PG_ROLE') THEN
        CREATE ROLE $FERRET_PG_ROLE;
    END IF;
END
\$\$;
ALTER ROLE $FERRET_PG_ROLE WITH LOGIN CREATEDB PASSWORD '$FERRET_PG_PASSWORD';
SQL
    PGSUPER_PORT="$FERRET_PG_PORT" pg_super -d template1 -c "$FERRET_PG_TRIGGER_SQL"
    if [ "$(PGSUPER_PORT="$FERRET_PG_PORT" pg_super -tAc "SELECT 1 FROM pg_database WHERE datname = '$FERRET_PG_DB'")" != 1 ]; then
        PGSUPER_PORT="$FERRET_PG_PORT" pg_super -c "CREATE DATABASE $FERRET_PG_DB OWNER $FERRET_PG_ROLE"
    fi
    PGSUPER_PORT="$FERRET_PG_PORT" pg_super -d "$FERRET_PG_DB" -c "$FERRET_PG_TRIGGER_SQL"
}

# ------------------------------------------------------------------ FerretDB

go_version_ok() { # prints the found version; succeeds if >= GO_MIN
    local v maj min
    v="$(go env GOVERSION 2>/dev/null || true)"
    printf '%s' "${v:-unknown}"
    [[ "$v" =~ ^go([0-9]+)\.([0-9]+) ]] || return 1
    maj="${BASH_REMATCH[1]}"
    min="${BASH_REMATCH[2]}"
    [ "$maj" -gt "$GO_MIN_MAJOR" ] || { [ "$maj" -eq "$GO_MIN_MAJOR" ] && [ "$min" -ge "$GO_MIN_MINOR" ]; }
}

ferret_bin_ok() {
    # Captured, not piped into `grep -q`: grep exits at the first line, and the
    # next line's write then kills ferretdb with SIGPIPE, which pipefail reports
    # as a failed --version (about 3% of runs).
    local out
    [ -x "$FERRET_BIN" ] && out="$("$FERRET_BIN" --version 2>/dev/null)" &&
        [[ "$out" == *"version: $FERRET_VERSION"* ]]
}

build_ferretdb() {
    local hint="or point MONGODB_URL at an existing MongoDB (e.g. export MONGODB_URL=mongodb://host:27017/outboxd) and re-run"
    if ! have go; then
        die "Go >= $GO_MIN_MAJOR.$GO_MIN_MINOR is needed to build FerretDB $FERRET_VERSION, but 'go' was not found (looked in PATH and /usr/local/go/bin)" \
            "install Go $GO_MIN_MAJOR.$GO_MIN_MINOR or newer (Debian 12's golang package is too old) and put it on PATH," \
            "$hint"
    fi
    local gv
    if ! gv="$(go_version_ok)"; then
        die "Go >= $GO_MIN_MAJOR.$GO_MIN_MINOR is needed to build FerretDB $FERRET_VERSION, but found $gv ($(command -v go))" \
            "install Go $GO_MIN_MAJOR.$GO_MIN_MINOR or newer and put it first on PATH," \
            "$hint"
    fi
    log "building FerretDB $FERRET_VERSION with $gv (first time only; takes a few minutes)"

    # A plain `go install $FERRET_MODULE/cmd/ferretdb@$FERRET_VERSION` produces a
    # binary that panics at start-up: FerretDB requires build/version/version.txt,
    # which is generated by its own build tooling and absent from the module zip.
    # So: fetch the module, copy it, add version.txt, and build from the copy.
    export GOTOOLCHAIN=local GO111MODULE=on
    local gomodcache_dir src tmp
    mkdir -p "$TOOLS/src" "$TOOLS/bin"
    gomodcache_dir="$(cd "$TOOLS" && retry3 go mod download -json "$FERRET_MODULE@$FERRET_VERSION" |
        sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')" ||
        die "could not download Go module $FERRET_MODULE@$FERRET_VERSION (Go module proxy unreachable?)" "$hint"
    [ -n "$gomodcache_dir" ] && [ -d "$gomodcache_dir" ] ||
        die "go mod download did not report a source directory for $FERRET_MODULE@$FERRET_VERSION" "$hint"

    src="$TOOLS/src/ferretdb-$FERRET_VERSION"
    rm -rf "$src"
    cp -R "$gomodcache_dir" "$src"
    chmod -R u+w "$src"
    printf '%s\n' "$FERRET_VERSION" >"$src/build/version/version.txt"
    printf '%s\n' "go-build" >"$src/build/version/package.txt"

    (cd "$src" && retry3 go mod download) >&2 ||
        die "could not download FerretDB's Go dependencies (Go module proxy unreachable?)" "$hint"
    tmp="$FERRET_BIN.tmp.$$"
    if ! (cd "$src" && go build -buildvcs=false -trimpath -o "$tmp" ./cmd/ferretdb) >&2; then
        rm -f "$tmp"
        die "building FerretDB $FERRET_VERSION failed (see the go output above)" "$hint"
    fi
    mv -f "$tmp" "$FERRET_BIN"
    rm -rf "$src"
    rmdir "$TOOLS/src" 2>/dev/null || true
    ferret_bin_ok || die "the freshly built $FERRET_BIN does not run ('$FERRET_BIN --version' failed)" "$hint"
    log "built $FERRET_BIN"
}

ferret_pid() { # prints the pid from the pidfile if that process is our ferretdb
    local pid
    [ -f "$FERRET_PIDFILE" ] || return 1
    pid="$(cat "$FERRET_PIDFILE" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    local cmdline
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ "$cmdline" == *ferretdb* ]] || return 1
    printf '%s' "$pid"
}

ensure_ferretdb() {
    # The test suite starts private FerretDB instances (to stop them as a fault),
    # so the binary must exist even when some server already answers the port.
    ferret_bin_ok || build_ferretdb
    [ "$FERRET_HANDLER" != postgresql ] || ensure_ferret_backend
    # Ours, but on another backend (the SQLite one, before 2026-12): restart it.
    local running
    if ferret_pid >/dev/null && running="$(cat "$FERRET_STATE/handler" 2>/dev/null || echo sqlite)" &&
        [ "$running" != "$FERRET_HANDLER" ]; then
        log "the running FerretDB uses its $running backend; restarting it on $FERRET_HANDLER"
        stop_ferretdb
    fi
    if mongo_ping "$FERRET_HOST" "$FERRET_PORT"; then
        log "a MongoDB-compatible server already answers on $FERRET_HOST:$FERRET_PORT; not starting another"
        return 0
    fi
    if tcp_open "$FERRET_HOST" "$FERRET_PORT"; then
        # Maybe a FerretDB we started moments ago is still initialising.
        local i
        for i in $(seq 1 20); do
            sleep 0.5
            if mongo_ping "$FERRET_HOST" "$FERRET_PORT"; then
                log "a MongoDB-compatible server answers on $FERRET_HOST:$FERRET_PORT"
                return 0
            fi
        done
        die "port $FERRET_HOST:$FERRET_PORT is in use by something that does not answer a MongoDB ping" \
            "stop it, or set MONGODB_URL to a reachable MongoDB and re-run"
    fi

    ferret_bin_ok || build_ferretdb

    mkdir -p "$FERRET_STATE/data" "$FERRET_STATE/state"
    local -a args=(
        --listen-addr="$FERRET_HOST:$FERRET_PORT"
        --handler="$FERRET_HANDLER"
        --state-dir="$FERRET_STATE/state"
        --telemetry=disable
        --debug-addr=-
        --log-level=warn
    )
    case "$FERRET_HANDLER" in
        postgresql) args+=(--postgresql-url="$FERRET_PG_URL") ;;
        sqlite) args+=(--sqlite-url="file:$FERRET_STATE/data/") ;;
        *) die "SERVICES_FERRETDB_HANDLER must be postgresql or sqlite, not '$FERRET_HANDLER'" ;;
    esac
    printf '%s\n' "$FERRET_HANDLER" >"$FERRET_STATE/handler"
    log "starting FerretDB: $FERRET_BIN ${args[*]//:$FERRET_PG_PASSWORD@/:***@}"
    printf '\n==== %s starting FerretDB %s\n' "$(date -Is)" "$FERRET_VERSION" >>"$FERRET_LOG"
    # New session (setsid) so it survives make and the terminal; the inner shell
    # writes its own pid (== ferretdb's after exec) to the pidfile.
    setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$FERRET_PIDFILE" "$FERRET_BIN" "${args[@]}" \
        </dev/null >>"$FERRET_LOG" 2>&1 &
    disown || true

    local i pid
    for i in $(seq 1 60); do
        sleep 0.5
        if mongo_ping "$FERRET_HOST" "$FERRET_PORT"; then
            pid="$(ferret_pid || true)"
            log "FerretDB ready on $FERRET_HOST:$FERRET_PORT (pid ${pid:-?}, log $FERRET_LOG)"
            return 0
        fi
        if [ "$i" -gt 2 ] && ! ferret_pid >/dev/null; then
            tail -n 20 "$FERRET_LOG" >&2 || true
            die "FerretDB exited during start-up" "see $FERRET_LOG"
        fi
    done
    tail -n 20 "$FERRET_LOG" >&2 || true
    die "FerretDB did not answer on $FERRET_HOST:$FERRET_PORT within 30 s" "see $FERRET_LOG"
}

# Prints host and port of the first host in a mongodb:// URL.
mongo_url_hostport() {
    local rest="${1#mongodb://}" hp host port
    rest="${rest##*@}"   # drop credentials
    hp="${rest%%[/?]*}"  # up to path / options
    hp="${hp%%,*}"       # first host of a seed list
    if [[ "$hp" =~ ^\[(.*)\](:([0-9]+))?$ ]]; then
        host="${BASH_REMATCH[1]}"
        port="${BASH_REMATCH[3]:-27017}"
    else
        host="${hp%%:*}"
        port=27017
        [[ "$hp" == *:* ]] && port="${hp##*:}"
    fi
    printf '%s %s\n' "$host" "$port"
}

choose_mongo() { # sets MONGO_OUT
    local given="${MONGODB_URL:-}"
    if [ -n "$given" ]; then
        case "$given" in
            mongodb+srv://*)
                log "MONGODB_URL is a mongodb+srv:// URL; using it as given (not checked)"
                MONGO_OUT="$given"
                return 0
                ;;
            mongodb://*)
                local host port
                read -r host port < <(mongo_url_hostport "$given")
                if [ -n "$host" ] && tcp_open "$host" "$port"; then
                    log "using MONGODB_URL from the environment ($host:$port is reachable)"
                    MONGO_OUT="$given"
                    return 0
                fi
                # Our own FerretDB may just have stopped: start it again. Any other
                # server was chosen on purpose; testing FerretDB instead would mislead.
                if [ "$host:$port" != "$FERRET_HOST:$FERRET_PORT" ] && [ "$host:$port" != "localhost:$FERRET_PORT" ]; then
                    die "MONGODB_URL points at $host:$port, which is not reachable; start that server, or unset MONGODB_URL to use a local FerretDB"
                fi
                log "MONGODB_URL points at the local FerretDB, which is down; starting it"
                ;;
            *)
                die "MONGODB_URL is not a mongodb:// or mongodb+srv:// URL; fix it, or unset it to use a local FerretDB"
                ;;
        esac
    fi
    ensure_ferretdb
    MONGO_OUT="mongodb://$FERRET_HOST:$FERRET_PORT/outboxd"
}

# ------------------------------------------------------------------- actions

stop_ferretdb() {
    local pid i
    if pid="$(ferret_pid)"; then
        log "stopping FerretDB (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for i in $(seq 1 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "FerretDB did not stop after 10 s; sending SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
        fi
    else
        log "no FerretDB started by this project is running (pidfile $FERRET_PIDFILE)"
    fi
    rm -f "$FERRET_PIDFILE"
    log "PostgreSQL is left running (stop it with: pg_ctlcluster <version> main stop; FerretDB's backend: pg_ctlcluster <version> $FERRET_PG_CLUSTER stop)"
}

status() {
    local ver
    ver="$(pg_version 2>/dev/null || true)"
    if [ -n "$ver" ] && pg_isready -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null; then
        log "PostgreSQL $ver: accepting connections on 127.0.0.1:$PG_PORT"
    else
        log "PostgreSQL: not running on 127.0.0.1:$PG_PORT"
    fi
    if pg_isready -q -h 127.0.0.1 -p "$FERRET_PG_PORT" 2>/dev/null; then
        log "FerretDB's PostgreSQL backend ($FERRET_PG_CLUSTER): accepting connections on 127.0.0.1:$FERRET_PG_PORT"
    fi
    if mongo_ping "$FERRET_HOST" "$FERRET_PORT"; then
        log "MongoDB-compatible server on $FERRET_HOST:$FERRET_PORT: answering (FerretDB pid $(ferret_pid || echo '-'), backend $(cat "$FERRET_STATE/handler" 2>/dev/null || echo '?'))"
    else
        log "MongoDB-compatible server on $FERRET_HOST:$FERRET_PORT: not answering"
    fi
}

up() {
    local started=$SECONDS
    ensure_postgres
    MONGO_OUT=""
    choose_mongo
    log "all services ready ($((SECONDS - started)) s)"
    # The URLs hold passwords: written for eval, never to a terminal.
    if [ -t 1 ]; then
        log "to export DATABASE_URL and MONGODB_URL into your shell: eval \"\$(make -s services)\""
        return 0
    fi
    printf 'export DATABASE_URL=%q\n' "postgres://$PG_ROLE:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
    printf 'export MONGODB_URL=%q\n' "$MONGO_OUT"
    # For the tests of sslmode: the test CA, and the role that needs TLS.
    printf 'export OUTBOXD_TEST_PG_CA=%q\n' "$STATE/pg-tls/ca.crt"
    printf 'export OUTBOXD_TEST_PG_TLS_URL=%q\n' "postgres://$PG_TLS_ROLE:$PG_TLS_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
    # For the tests' private FerretDB instances: a database each on this cluster.
    if [ "$FERRET_HANDLER" = postgresql ]; then
        printf 'export FERRETDB_POSTGRESQL_URL=%q\n' "$FERRET_PG_URL"
    fi
}

case "${1:-up}" in
    up) up ;;
    stop) stop_ferretdb ;;
    status) status ;;
    -h | --help | help)
        sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
        ;;
    *) die "unknown action '$1'" "usage: scripts/services.sh [up|stop|status]" ;;
esac
