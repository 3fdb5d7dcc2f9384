"""What the bench's timers do when they fire (`delayq bench --action`).

* `cancel`: the built-in, unpaid orders -> cancelled (the runs BENCHMARKS.md began with).
* `handler`: a Python handler (`delayq.bench_app`) doing one UPDATE of another table in
  the listener's transaction.
* `webhook`: a POST to a local HTTP server that answers 200 at once. The server runs in a
  process of its own (`python -m delayq.bench_actions`), so that neither the bench's nor
  the listener's GIL slows its answers. A webhook's lateness counts to the request being
  sent: the outcome's fired_at is taken just before the POST.

Each scenario makes its tables, gives the listener its settings, and afterwards counts
what the action did on its far side (orders cancelled, stock rows updated, requests
received): a run then shows each timer's work done once, not only its outcome row.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import sqlalchemy as sa

from delayq.errors import ServiceUnavailable

INSERT_CHUNK = 5000

#: The table the `handler` scenario's action (delayq.bench_app) updates: one row per
#: measured order; `touched` counts the updates, so that a run shows each done once.
stock = sa.Table(
    "bench_stock",
    sa.MetaData(),
    sa.Column("sku", sa.String(64), primary_key=True),
    sa.Column("touched", sa.Integer, nullable=False, server_default="0"),
    sa.Column("touched_at", sa.DateTime),
)


class Scenario:
    """What one `--action` choice sets up, gives the listener, and counts."""

    #: The `--action` value.
    name: str
    #: The action of the measured timers.
    action: str

    def prepare(self, conn: sa.Connection, order_sns: list[str]) -> None:
        """Rows the action works on, one per measured order."""
        raise NotImplementedError

    @contextlib.contextmanager
    def running(self, workdir: Path) -> Iterator[dict[str, str]]:
        """While the listener runs: settings it needs besides the bench's own."""
        yield {}

    def effects(self, conn: sa.Connection) -> int:
        """How many times the action's work was done, counted where it is done."""
        raise NotImplementedError


class Cancel(Scenario):
    """The built-in `cancel`: every measured order is unpaid, and each firing cancels it."""

    name = "cancel"
    action = "cancel"

    def prepare(self, conn: sa.Connection, order_sns: list[str]) -> None:
        _insert(conn, "INSERT INTO orders (order_sn, status) VALUES (:sn, 'unpaid')", order_sns)

    def effects(self, conn: sa.Connection) -> int:
        query = "SELECT COUNT(*) FROM orders WHERE status = 'cancelled'"
        return int(conn.exec_driver_sql(query).scalar_one())


class Handler(Scenario):
    """A Python handler doing one UPDATE of `bench_stock` per firing."""

    name = "handler"
    action = "bench_touch"

    def prepare(self, conn: sa.Connection, order_sns: list[str]) -> None:
        stock.create(conn)
        _insert(conn, f"INSERT INTO {stock.name} (sku) VALUES (:sn)", order_sns)

    @contextlib.contextmanager
    def running(self, workdir: Path) -> Iterator[dict[str, str]]:
        # Only the listener imports the handler's module: importing it here would register
        # the action in the bench's process too.
        yield {"DELAYQ_APP": "delayq.bench_app"}

    def effects(self, conn: sa.Connection) -> int:
        query = sa.select(sa.func.coalesce(sa.func.sum(stock.c.touched), 0))
        return int(conn.execute(query).scalar_one())


class Webhook(Scenario):
    """A POST per firing to a local server in a process of its own."""

    name = "webhook"
    action = "bench_hook"

    def __init__(self) -> None:
        self.url: str | None = None

    def prepare(self, conn: sa.Connection, order_sns: list[str]) -> None:
        pass  # the far side is the server, which counts what it receives

    @contextlib.contextmanager
    def running(self, workdir: Path) -> Iterator[dict[str, str]]:
        with (workdir / "receiver.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "delayq.bench_actions"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        try:
            assert proc.stdout is not None
            # The server binds a free port and prints it: no port to guess, nor a race.
            line = proc.stdout.readline().decode().strip()
            if not line.isdigit():
                raise ServiceUnavailable(
                    f"the bench's webhook receiver did not start: {_tail(workdir / 'receiver.log')}"
                )
            self.url = f"http://127.0.0.1:{line}/"
            yield {f"DELAYQ_WEBHOOK_{self.action.upper()}": self.url}
        finally:
            self.url = None
            terminate(proc, timeout_s=10)
            if proc.stdout is not None:
                proc.stdout.close()

    def effects(self, conn: sa.Connection) -> int:
        assert self.url is not None, "counted while the receiver runs"
        with urllib.request.urlopen(self.url, timeout=10) as answer:
            received: int = json.load(answer)["received"]
            return received


SCENARIOS: dict[str, type[Scenario]] = {s.name: s for s in (Cancel, Handler, Webhook)}


def terminate(proc: subprocess.Popen[bytes], *, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`: how every process
    the bench starts is stopped."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _insert(conn: sa.Connection, sql: str, order_sns: list[str]) -> None:
    statement = sa.text(sql)
    for i in range(0, len(order_sns), INSERT_CHUNK):
        conn.execute(statement, [{"sn": sn} for sn in order_sns[i : i + INSERT_CHUNK]])


def _tail(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1] if lines else "no output"


# -- the webhook receiver (its own process) ----------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    """200 with an empty body to every POST, on kept-alive connections; GET says how many
    POSTs came."""

    protocol_version = "HTTP/1.1"  # keep-alive: the listener's pool reuses connections
    received = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.lock:
            _Receiver.received += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        body = json.dumps({"received": _Receiver.received}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # a line per request would cost more than the answer


def serve() -> None:
    """Answer on a free port of 127.0.0.1, printed on the first line of stdout."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    serve()
