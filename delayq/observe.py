"""What a running listener shows its operators over HTTP (`delayq listen --http ADDR`):

* `/metrics`  Prometheus text format (prometheus-client),
* `/healthz`  200 only when Redis and the database answer and the subscription is live,
* `/readyz`   200 once the listener is subscribed and not stopping,
* `/`         a dashboard that refreshes itself, with a re-queue button for dead letters
              (POST /dead/requeue, which needs DELAYQ_DASHBOARD_TOKEN).

Served by the standard library's threading HTTP server on a daemon thread: a handful of
requests a minute from Prometheus and a browser do not need a web framework.
"""

from __future__ import annotations

import hmac
import html
import logging
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import redis
import sqlalchemy as sa
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from delayq.actions import (
    ALREADY_RECORDED,
    APPLIED,
    FAILED,
    MALFORMED_KEY,
    NOT_FOUND,
    SKIPPED,
    UNKNOWN_ACTION,
    UNMAPPED_FLAG,
    Actions,
)
from delayq.actions.builtin import StatusChange, builtin_actions
from delayq.errors import InvalidInput
from delayq.settings import Settings

if TYPE_CHECKING:
    from delayq.listener import Listener

log = logging.getLogger("delayq.http")

LATENESS_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)
#: The dashboard's lateness percentiles cover this many seconds of firings.
WINDOW_S = 300.0
#: A client that has not sent its whole request after this long is disconnected.
REQUEST_TIMEOUT_S = 10.0
#: Largest re-queue form read; the rest of a longer body is ignored.
MAX_FORM_BYTES = 64 * 1024
#: The label that stands for every action or outcome outside the known ones.
OTHER = "other"
#: Scrapes that fail to read Redis are logged at most once per this many seconds.
ERROR_LOG_INTERVAL_S = 60.0


def known_labels(actions: Actions) -> tuple[set[str], set[str]]:
    """The actions a listener knows and the outcomes it can report for certain: the label
    values of delayq_timers_fired. Timer keys are written by anyone, so their action names
    are not: outside these sets they are counted as "other" (outcome unknown_action says
    which timers name an action nobody here knows)."""
    outcomes = {APPLIED, NOT_FOUND, UNKNOWN_ACTION, UNMAPPED_FLAG, MALFORMED_KEY, ALREADY_RECORDED}
    outcomes |= {SKIPPED, FAILED}
    for spec in actions:
        if isinstance(spec.handler, StatusChange):
            outcomes |= spec.handler.outcomes
    return {spec.name for spec in actions}, outcomes


class Metrics:
    """The listener's own counters, and a collector that reads Redis at scrape time.

    Firings are counted by action and outcome among `actions` and `outcomes` (default:
    those of the default settings; `allow` adds more), any other value as "other"."""

    def __init__(
        self, actions: Iterable[str] | None = None, outcomes: Iterable[str] | None = None
    ) -> None:
        builtins = Actions({spec.name: spec for spec in builtin_actions(Settings())})
        default_actions, default_outcomes = known_labels(builtins)
        self.actions = set(default_actions if actions is None else actions)
        self.outcomes = set(default_outcomes if outcomes is None else outcomes)
        self.registry = CollectorRegistry()
        r = self.registry
        self.fired = Counter(
            "delayq_timers_fired",
            "Timers fired, by action and outcome.",
            ["action", "outcome"],
            registry=r,
        )
        self.lateness = Histogram(
            "delayq_lateness_seconds",
            "Due time to applied, for applied firings.",
            buckets=LATENESS_BUCKETS_S,
            registry=r,
        )
        self.batch = Histogram(
            "delayq_db_batch_seconds",
            "Duration of one database transaction applying a batch.",
            registry=r,
        )
        self.batch_size = Histogram(
            "delayq_db_batch_size",
            "Firings per database transaction.",
            buckets=(1, 2, 5, 10, 50, 100, 500, 1000, 5000),
            registry=r,
        )
        self.dead_lettered = Counter("delayq_dead_lettered", "Timers given up on.", registry=r)
        self.redis_reconnects = Counter(
            "delayq_redis_reconnects", "Times Redis came back after an outage.", registry=r
        )
        self.db_outages = Counter("delayq_database_outages", "Database outages.", registry=r)
        self.last_event = time.monotonic()
        Gauge(
            "delayq_last_event_age_seconds",
            "Seconds since the last keyspace event or claim.",
            registry=r,
        ).set_function(lambda: time.monotonic() - self.last_event)
        # For alerts (deploy/prometheus/delayq-rules.yml): the listener points these at its
        # liveness probes (answers from memory) and sets last_batch after each commit.
        self.redis_up = Gauge(
            "delayq_redis_up", "1 if Redis answered the latest probe (each second).", registry=r
        )
        self.database_up = Gauge(
            "delayq_database_up",
            "1 if the database answered the latest probe (each second).",
            registry=r,
        )
        self.last_batch = Gauge(
            "delayq_last_batch_timestamp_seconds",
            "Unix time of the last batch this listener committed (0: none yet).",
            registry=r,
        )
        # (monotonic time, lateness ms or None) of recent firings, for the dashboard.
        self.recent: deque[tuple[float, float | None]] = deque(maxlen=200_000)
        self._lock = threading.Lock()

    def allow(self, *, actions: Iterable[str] = (), outcomes: Iterable[str] = ()) -> None:
        """Count these actions and outcomes under their own labels from now on."""
        self.actions.update(actions)
        self.outcomes.update(outcomes)

    def observe_firing(self, action: str, outcome: str, lateness_ms: float | None) -> None:
        self.fired.labels(
            action if action in self.actions else OTHER,
            outcome if outcome in self.outcomes else OTHER,
        ).inc()
        if lateness_ms is not None:
            self.lateness.observe(max(lateness_ms, 0.0) / 1000)
        with self._lock:
            self.recent.append((time.monotonic(), lateness_ms))

    def window(self) -> dict[str, float | int | None]:
        """Fired in the last minute, and lateness percentiles over the last minutes."""
        now = time.monotonic()
        with self._lock:
            recent = [(t, ms) for t, ms in self.recent if t >= now - WINDOW_S]
        late = sorted(ms for _, ms in recent if ms is not None)

        def pick(q: float) -> float | None:
            return round(late[min(len(late) - 1, int(q * len(late)))], 1) if late else None

        return {
            "fired_last_minute": sum(1 for t, _ in recent if t >= now - 60),
            "lateness_p50_ms": pick(0.5),
            "lateness_p99_ms": pick(0.99),
        }


class RedisFigures(Collector):
    """Pending, overdue, in-flight, dead-lettered and listeners, read when scraped."""

    def __init__(self, client: redis.Redis, listener: Listener) -> None:
        self.client = client
        self.listener = listener
        self._logged_at: float | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            f = self.listener.figures.get(dead_limit=0)
        except Exception as exc:
            # The series are left out (absent series are what alerting expects, and
            # /healthz says why); the log says so once a minute, not at every scrape.
            now = time.monotonic()
            if self._logged_at is None or now - self._logged_at >= ERROR_LOG_INTERVAL_S:
                self._logged_at = now
                log.warning(
                    "/metrics without the Redis gauges: %s: %s",
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                    exc_info=not isinstance(exc, redis.RedisError),
                )
            return
        for name, value, text in (
            ("delayq_pending", f["pending"], "Timers waiting for their due time."),
            ("delayq_overdue", f["overdue"], "Timers past due and not yet claimed."),
            ("delayq_in_flight", f["in_flight"], "Timers claimed or waiting for a retry."),
            ("delayq_dead_letters", f["dead_lettered"], "Timers in the dead letters."),
            ("delayq_listeners_alive", len(f["listeners"]), "Listeners with a recent heartbeat."),
        ):
            yield GaugeMetricFamily(name, text, value=value)
        # A cluster: each primary's share, by node ("127.0.0.1:7001"), under names of
        # their own so that sums over the totals above count nothing twice.
        primaries = f.get("primaries", [])
        for field, name, text in (
            ("pending", "delayq_primary_pending", "Timers waiting, per cluster primary."),
            ("overdue", "delayq_primary_overdue", "Timers past due, per cluster primary."),
            ("in_flight", "delayq_primary_in_flight", "Timers claimed, per cluster primary."),
            ("dead_lettered", "delayq_primary_dead_letters", "Dead letters, per cluster primary."),
            ("used_memory", "delayq_primary_used_memory_bytes", "used_memory of each primary."),
        ):
            rows = [(p["node"], p[field]) for p in primaries if p[field] is not None]
            if rows:
                family = GaugeMetricFamily(name, text, labels=["node"])
                for node, value in rows:
                    family.add_metric([node], value)
                yield family


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:9808' or ':9808' (loopback) -> (host, port). All interfaces only when
    named: '0.0.0.0:9808', '[::]:9808'."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise InvalidInput(
            f"invalid --http address (DELAYQ_HTTP) {text!r}: use HOST:PORT, e.g. 127.0.0.1:9808"
        )
    return host.strip("[]") or "127.0.0.1", int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, BrokenPipeError | ConnectionResetError | TimeoutError):
            # Routine (a scrape that timed out, a closed browser tab): no traceback.
            log.debug("client %s went away or was too slow: %s", client_address[0], exc)
            return
        log.exception("HTTP request from %s failed", client_address[0])


class _Server6(_Server):
    address_family = socket.AF_INET6


def serve(listener: Listener, address: tuple[str, int], token: str | None) -> ThreadingHTTPServer:
    """Start the HTTP server on a daemon thread; the caller shuts it down."""
    listener.metrics.registry.register(RedisFigures(listener.client, listener))
    handler = type("Handler", (_Handler,), {"listener": listener, "token": token})
    server_class = _Server6 if ":" in address[0] else _Server
    try:
        server = server_class(address, handler)
    except OSError as exc:
        raise InvalidInput(f"cannot serve HTTP on {address[0]}:{address[1]}: {exc}") from None
    threading.Thread(target=server.serve_forever, name="delayq-http", daemon=True).start()
    log.info(
        "serving /metrics, /healthz, /readyz and the dashboard on http://%s:%d/",
        *server.server_address[:2],
    )
    return server


class _Handler(BaseHTTPRequestHandler):
    listener: Listener
    token: str | None
    server_version = "delayq"
    # A client that sends nothing must not hold a thread for ever.
    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        routes: dict[str, Callable[[], None]] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/": self._dashboard,
        }
        route = routes.get(self.path.split("?", 1)[0])
        if route is None:
            self._send(HTTPStatus.NOT_FOUND, "not found\n")
        else:
            route()

    def do_POST(self) -> None:
        if self.path != "/dead/requeue":
            self._send(HTTPStatus.NOT_FOUND, "not found\n")
            return
        length = self.headers.get("Content-Length", "0").strip()
        if not (length.isascii() and length.isdigit()):
            self._send(HTTPStatus.BAD_REQUEST, "bad Content-Length\n")
            return
        body = self.rfile.read(min(int(length), MAX_FORM_BYTES))
        form = parse_qs(body.decode(errors="replace"))
        given = form.get("token", [""])[0]
        if not self.token or not hmac.compare_digest(given.encode(), self.token.encode()):
            page = _page(
                "delayq: refused",
                '<p class="error">Re-queue refused: wrong or missing token.</p>'
                '<p><a href="/">Back to the dashboard</a></p>',
            )
            self._send(HTTPStatus.FORBIDDEN, page, "text/html")
            return
        # "Re-queue selected" sends the ticked rows; "Re-queue all" sends none: all of them.
        timers = [t for t in form.get("timer", []) if t] if form.get("selected") else []
        if form.get("selected") and not timers:
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", "/?requeued=0")
            self.end_headers()
            return
        n = self.listener.retry_dead(timers)
        log.info("dashboard re-queued %d dead-lettered timers", n)
        self.send_response(HTTPStatus.SEE_OTHER)
        self.send_header("Location", f"/?requeued={n}")
        self.end_headers()

    def _send(self, status: HTTPStatus, body: str, content_type: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _metrics(self) -> None:
        data = generate_latest(self.listener.metrics.registry)
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _healthz(self) -> None:
        problems = self.listener.health_problems()
        if problems:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, "".join(f"{p}\n" for p in problems))
        else:
            self._send(HTTPStatus.OK, "ok\n")

    def _readyz(self) -> None:
        ready = self.listener.ready.is_set() and not self.listener.stopping.is_set()
        self._send(
            HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
            "ready\n" if ready else "not ready\n",
        )

    def _dashboard(self) -> None:
        problems = self.listener.health_problems()
        try:
            figures: dict[str, Any] = self.listener.figures.get()
        except redis.RedisError:
            figures = {}
        query = parse_qs(self.path.partition("?")[2])
        requeued = query.get("requeued", [""])[0]
        # ASCII digits only: '²'.isdigit() is True, and int() refuses it.
        shown = requeued.isascii() and requeued.isdigit() and len(requeued) <= 9
        page = render_dashboard(
            figures,
            self.listener.metrics.window(),
            problems,
            requeue_enabled=bool(self.token),
            notice=f"Re-queued {int(requeued)} dead-lettered timers." if shown else "",
        )
        self._send(HTTPStatus.OK, page, "text/html")


_STYLE = """
body{font:15px system-ui,sans-serif;margin:2rem;color:#1d2330;background:#f6f7f9}
h1{font-size:1.4rem;margin-bottom:.2rem} h2{font-size:1.1rem;margin-top:2rem}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(12rem,1fr));gap:.8rem}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:.8rem}
.label{color:#5b6474;font-size:.8rem} .value{font-size:1.4rem;font-weight:600}
table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #dde1e7;padding:.3rem .6rem;text-align:left;vertical-align:top}
.dim{color:#5b6474} .error{color:#b00020;font-weight:600} .notice{color:#0a6b2d;font-weight:600}
form{margin-top:.8rem} #next-due{font-size:1.05rem;padding-top:.3rem} td.when{white-space:nowrap}
"""

# Reloads every 5 s, except while the operator is typing the token or has ticked rows.
_REFRESH = """<script>
setInterval(function () {
  var token = document.getElementById("token");
  var busy = (token && (token.value || document.activeElement === token)) ||
             document.querySelector("input[name=timer]:checked");
  if (!busy) { location.replace("/"); }
}, 5000);
</script><noscript><meta http-equiv="refresh" content="5"></noscript>"""


def _page(title: str, body: str, head: str = "") -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_STYLE}</style>{head}</head><body>\n{body}\n</body></html>\n"
    )


def _when(iso: str | None) -> str | None:
    """'2026-11-23T17:14:59.877000+00:00' -> '2026-11-23 17:14:59 UTC'."""
    return None if iso is None else iso[:19].replace("T", " ") + " UTC"


def render_dashboard(
    figures: dict[str, Any],
    window: dict[str, Any],
    problems: list[str],
    *,
    requeue_enabled: bool,
    notice: str = "",
) -> str:
    e = html.escape

    def card(label: str, value: Any, ident: str) -> str:
        shown = "-" if value is None else (f"{value:,}" if isinstance(value, int) else value)
        return (
            f'<div class="card"><div class="label">{e(label)}</div>'
            f'<div class="value" id="{ident}">{e(str(shown))}</div></div>'
        )

    cards = "".join(
        card(label, value, ident)
        for label, value, ident in (
            ("pending (all listeners)", figures.get("pending"), "pending"),
            ("next due", _when(figures.get("next_due_at")), "next-due"),
            ("overdue", figures.get("overdue"), "overdue"),
            ("in flight", figures.get("in_flight"), "in-flight"),
            ("dead-lettered", figures.get("dead_lettered"), "dead-lettered"),
            ("fired last minute (this listener)", window.get("fired_last_minute"),
             "fired-last-minute"),
            ("lateness p50, ms (this listener, 5 min)", window.get("lateness_p50_ms"),
             "lateness-p50"),
            ("lateness p99, ms (this listener, 5 min)", window.get("lateness_p99_ms"),
             "lateness-p99"),
            ("listeners alive", len(figures.get("listeners", [])), "listeners-alive"),
        )
    )  # fmt: skip
    listeners = "".join(
        f"<li>{e(lst['id'])} <span class=dim>seen {lst['last_seen_s']} s ago</span></li>"
        for lst in figures.get("listeners", [])
    )
    dead_letters = figures.get("dead_letters", [])
    rows = "".join(
        f'<tr><td><input type="checkbox" name="timer" value="{e(d["firing"])}"'
        f' form="requeue-form"{"" if requeue_enabled else " disabled"}></td>'
        f"<td>{e(d['timer'])}</td><td class=when>{e(_when(d['due_at']) or '')}</td>"
        f"<td class=when>{e(_when(d.get('dead_at')) or '')}</td><td>{d['attempts']}</td>"
        f"<td>{e(d['error'])}</td></tr>"
        for d in dead_letters
    )
    shown = len(dead_letters)
    total = figures.get("dead_lettered", shown)
    more = f'<p class="dim">Showing {shown} of {total:,}.</p>' if total > shown else ""
    if requeue_enabled:
        form = (
            '<form method="post" action="/dead/requeue" id="requeue-form">'
            '<input type="password" name="token" id="token" placeholder="dashboard token"'
            ' autocomplete="off" required> '
            '<button type="submit" id="requeue-selected" name="selected" value="1">'
            "Re-queue selected</button> "
            '<button type="submit" id="requeue" formnovalidate>Re-queue all</button></form>'
        )
    else:
        form = '<p class="dim">Set DELAYQ_DASHBOARD_TOKEN to re-queue from here.</p>'
    dead = (
        "<table><tr><th></th><th>timer</th><th>due</th><th>given up</th><th>attempts</th>"
        f"<th>last error</th></tr>{rows}</table>{more}{form}"
        if rows
        else "<p class=dim>none</p>"
    )
    primaries = _primaries_table(figures.get("primaries", []))
    banner = "".join(f'<p class="error">{e(p)}</p>' for p in problems)
    if notice:
        banner += f'<p class="notice" id="notice">{e(notice)}</p>'
    as_of = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return _page(
        "delayq",
        f'<h1>delayq</h1><p class="dim" id="as-of">as of {as_of}</p>{banner}'
        f'<div class="cards">{cards}</div>{primaries}'
        f'<h2>Listeners</h2><ul id="listeners">{listeners or "<li class=dim>none</li>"}</ul>'
        f'<h2>Dead letters</h2><div id="dead">{dead}</div>',
        head=_REFRESH,
    )


def _primaries_table(primaries: list[dict[str, Any]]) -> str:
    """A cluster's figures per primary (nothing on one Redis)."""
    if not primaries:
        return ""

    def n(value: int | None) -> str:
        return "-" if value is None else f"{value:,}"

    rows = "".join(
        f"<tr><td>{html.escape(p['node'])}</td><td>{n(p['slots'])}</td><td>{n(p['pending'])}</td>"
        f"<td>{n(p['overdue'])}</td><td>{n(p['in_flight'])}</td><td>{n(p['dead_lettered'])}</td>"
        f"<td>{n(p['used_memory'])}</td></tr>"
        for p in primaries
    )
    return (
        '<h2>Cluster primaries</h2><table id="primaries"><tr><th>node</th><th>slots</th>'
        "<th>pending</th><th>overdue</th><th>in flight</th><th>dead-lettered</th>"
        f"<th>used memory, bytes</th></tr>{rows}</table>"
    )


def database_answers(engine: sa.Engine) -> str | None:
    """None if the database answers, else why not (one line)."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:
        return f"database: {str(getattr(exc, 'orig', None) or exc).splitlines()[0]}"
    return None
