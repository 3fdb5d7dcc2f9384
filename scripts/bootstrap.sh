#!/usr/bin/env bash
# Set up a Debian 12 machine for the test suite: redis-server (tests start their
# own), a MariaDB answering root@127.0.0.1:3306 with an empty password, Debian's
# chromium and chromedriver (the dashboard's browser test), and .venv.
# Idempotent: on a machine that has everything it only re-runs pip. It never
# stops or reconfigures a running service, and never touches the Redis on 6379.
# Run from the repository root (make venv does).
set -euo pipefail

MARIADB_PORT=3306
MARIADB_START_TIMEOUT_S=60

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

# --- system packages ---------------------------------------------------------
missing=()
if [[ -z ${DELAYQ_TEST_REDIS_SERVER:-} ]] && ! command -v redis-server >/dev/null; then
    missing+=(redis-server)
fi
if [[ ! -x /usr/sbin/mariadbd ]] && ! command -v mariadbd >/dev/null; then
    missing+=(mariadb-server)
fi
if ! command -v python3 >/dev/null; then
    missing+=(python3 python3-venv)
fi
# The TLS tests make their certificates with the openssl CLI.
if ! command -v openssl >/dev/null; then
    missing+=(openssl)
fi
# tests/test_dashboard.py runs these exact paths; Selenium must not fetch its own.
if [[ ! -x /usr/bin/chromium ]]; then
    missing+=(chromium)
fi
if [[ ! -x /usr/bin/chromedriver ]]; then
    missing+=(chromium-driver)
fi
if ((${#missing[@]})); then
    if is_root; then
        apt_install "${missing[@]}"
    else
        log "warning: missing ${missing[*]} and not root; tests needing them will fail or skip"
    fi
else
    log "redis-server, mariadbd, python3, chromium and chromedriver present"
fi

# --- MariaDB -----------------------------------------------------------------
port_answers() {
    # bash's /dev/tcp: no client needed; timeout guards against a filtered port.
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

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
log "done"
