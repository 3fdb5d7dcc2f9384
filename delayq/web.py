"""The listener's HTTP server (`delayq listen --http ADDR`): one WSGI application, served by
the standard library's threading WSGI server on a daemon thread.

* `/livez`    200 while the process and its loops are alive; answered from memory, with no
              round trip to Redis or the database (a Kubernetes liveness probe: a database
              outage must not get the listener restarted).
* `/readyz`   200 once the listener is subscribed and not stopping.
* `/healthz`  200 only when Redis and the database answer and the subscription is live (the
              background probes' latest answers, from memory; delayq/liveness.py).
* `/metrics`  prometheus-client's own WSGI exposition: the text format or OpenMetrics as the
              scraper's Accept header asks, gzip when it accepts it, `name[]=` filters.
* anything else: the dashboard (delayq/dashboard/), with its own Host, token and CSRF
  checks.

A handful of requests a minute from Prometheus, a kubelet and a browser need no web server
of their own: the routing here is a dict, and the dashboard brings Werkzeug for the rest.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from collections.abc import Iterable, Sequence
from http import HTTPStatus
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app

from delayq.errors import InvalidInput

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from delayq.listener import Listener

log = logging.getLogger("delayq.http")

#: A client that has not sent its whole request after this long is disconnected.
REQUEST_TIMEOUT_S = 10.0
#: The paths served here; every other one goes to the dashboard.
PROBES = ("/livez", "/readyz", "/healthz")


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:9808' or ':9808' (loopback) -> (host, port). All interfaces only when
    named: '0.0.0.0:9808', '[::]:9808'."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise InvalidInput(
            f"invalid --http address (DELAYQ_HTTP) {text!r}: use HOST:PORT, e.g. 127.0.0.1:9808"
        )
    return host.strip("[]") or "127.0.0.1", int(port)


def probe(listener: Listener, path: str) -> tuple[HTTPStatus, str]:
    """The answer of one probe, from memory."""
    if path == "/livez":
        problems = listener.live_problems()
        ok = "alive\n"
    elif path == "/readyz":
        ready = listener.ready.is_set() and not listener.stopping.is_set()
        problems = [] if ready else ["not ready"]
        ok = "ready\n"
    else:
        problems = listener.health_problems()
        ok = "ok\n"
    if problems:
        return HTTPStatus.SERVICE_UNAVAILABLE, "".join(f"{p}\n" for p in problems)
    return HTTPStatus.OK, ok


def make_app(listener: Listener, dashboard: WSGIApplication) -> WSGIApplication:
    """The whole HTTP surface of a listener: probes, metrics, and `dashboard` for the rest."""
    metrics: WSGIApplication = make_wsgi_app(listener.metrics.registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path not in PROBES:
            return dashboard(environ, start_response)
        if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
            return _plain(start_response, HTTPStatus.METHOD_NOT_ALLOWED, "use GET\n")
        status, text = probe(listener, path)
        return _plain(start_response, status, text, head=environ["REQUEST_METHOD"] == "HEAD")

    return app


def _plain(
    start_response: StartResponse, status: HTTPStatus, text: str, *, head: bool = False
) -> list[bytes]:
    data = text.encode()
    start_response(
        f"{status.value} {status.phrase}",
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [] if head else [data]


def serve(
    listener: Listener,
    address: tuple[str, int],
    token: str | None,
    allowed_hosts: Sequence[str] = (),
) -> WSGIServer:
    """Start the HTTP server on a daemon thread; the caller shuts it down."""
    from delayq.dashboard import make_dashboard
    from delayq.observe import RedisFigures

    listener.metrics.registry.register(RedisFigures(listener.client, listener))
    dashboard = make_dashboard(listener, token=token, allowed_hosts=allowed_hosts)
    server_class = _Server6 if ":" in address[0] else _Server
    try:
        server = server_class(address, _RequestHandler)
    except OSError as exc:
        raise InvalidInput(f"cannot serve HTTP on {address[0]}:{address[1]}: {exc}") from None
    server.set_app(make_app(listener, dashboard))
    threading.Thread(target=server.serve_forever, name="delayq-http", daemon=True).start()
    log.info(
        "serving /metrics, /livez, /readyz, /healthz and the dashboard on http://%s:%d/",
        *server.server_address[:2],
    )
    return server


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks for the fully qualified name of the address, a DNS
        # lookup that can hang on a machine without a resolver; the name is only used in
        # SERVER_NAME, which nothing here reads.
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])
        self.setup_environ()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, BrokenPipeError | ConnectionResetError | TimeoutError):
            _went_away(client_address, exc)
            return
        log.exception("HTTP request from %s failed", client_address[0])


class _Server6(_Server):
    address_family = socket.AF_INET6


def _went_away(client_address: Any, exc: BaseException) -> None:
    # Routine (a scrape that timed out, a closed browser tab): one line, no traceback.
    log.debug("client %s went away or was too slow: %s", client_address[0], exc)


class _Handler(ServerHandler):
    """wsgiref's gateway, with its errors in the log instead of on stderr."""

    client_address: Any = ("?", 0)
    server_software = "delayq"  # not the Python version

    def finish_response(self) -> None:
        try:
            super().finish_response()
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as exc:
            _went_away(self.client_address, exc)
            raise  # wsgiref then closes quietly

    def log_exception(self, exc_info: Any) -> None:
        log.error("HTTP request from %s failed", self.client_address[0], exc_info=exc_info)


class _RequestHandler(WSGIRequestHandler):
    server_version = "delayq"
    # A client that sends nothing, or not its whole body, must not hold a thread for ever.
    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def handle(self) -> None:
        """wsgiref's handle(), with a request whose Content-Length is not a number answered
        400 before any application reads a body of a length nobody knows."""
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return
        if not self.parse_request():
            return
        length = self.headers.get("Content-Length")
        if length is not None and not (length.strip().isascii() and length.strip().isdigit()):
            self.send_error(HTTPStatus.BAD_REQUEST, "bad Content-Length")
            return
        handler = _Handler(
            self.rfile,
            self.wfile,  # type: ignore[arg-type]  # a socket's writer, as wsgiref passes
            self.get_stderr(),
            self.get_environ(),
            multithread=True,
        )
        handler.client_address = self.client_address
        handler.request_handler = self  # type: ignore[attr-defined]  # for log_request
        handler.run(self.server.get_app())  # type: ignore[attr-defined]
