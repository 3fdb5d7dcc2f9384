"""`delayq listen --http`: what reaches the HTTP server from a network is held to account.
It binds the loopback interface unless told otherwise, a silent or broken client cannot
hold a thread or crash a handler, a client that goes away leaves one log line and no
traceback, metric labels stay bounded, and the Redis gauges survive dead letters."""

from __future__ import annotations

import gzip
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from delayq.errors import InvalidInput
from delayq.keys import Keys
from delayq.observe import Metrics
from delayq.producer import Producer
from delayq.web import parse_address
from tests.harness import ListenerProcess, clean_env, create_orders, engine_for, migrate_cli
from tests.proxy import FreezableProxy
from tests.servers import HOST, RedisServer, free_port, wait_for

#: The server's request timeout, and the margin a loaded machine may add to it.
REQUEST_TIMEOUT_S = 10
MARGIN_S = 10

ListenerFactory = Callable[..., ListenerProcess]


@pytest.fixture
def listeners(tmp_path: Path) -> Iterator[ListenerFactory]:
    started: list[ListenerProcess] = []

    def make(env: dict[str, str], *args: str) -> ListenerProcess:
        proc = ListenerProcess(env, tmp_path / f"listener-{len(started)}.log", args)
        started.append(proc)
        return proc.start()

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture
def env(redis_server: RedisServer, sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    env = clean_env(REDIS_URL=redis_server.url(0), DATABASE_URL=sqlite_url, HOME=str(tmp_path))
    migrate_cli(env)
    return env


@pytest.fixture
def served(env: dict[str, str], listeners: ListenerFactory) -> tuple[ListenerProcess, int]:
    """A listener serving HTTP on a free loopback port, logging at debug level."""
    port = free_port()
    return listeners(env, "--http", f"127.0.0.1:{port}", "--log-level", "debug"), port


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _fetch(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and the raw (undecoded) body."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _raw(port: int, request: bytes, timeout_s: float = 10) -> bytes:
    """Send `request` as is and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _assert_no_traceback(listener: ListenerProcess) -> None:
    assert "Traceback" not in listener.text(), listener.text()
    assert listener.proc is not None and listener.proc.poll() is None


# -- binding ------------------------------------------------------------------------------


def test_an_address_without_a_host_binds_the_loopback_interface_only() -> None:
    assert parse_address(":9808") == ("127.0.0.1", 9808)
    assert parse_address("127.0.0.1:9808") == ("127.0.0.1", 9808)
    # All interfaces only when asked for by name.
    assert parse_address("0.0.0.0:9808") == ("0.0.0.0", 9808)
    assert parse_address("[::]:9808") == ("::", 9808)
    assert parse_address("[::1]:9808") == ("::1", 9808)
    for bad in ("9808", ":0", ":99999", "host:", ":http", ":٩٨٠٨"):
        with pytest.raises(InvalidInput, match="invalid --http address"):
            parse_address(bad)


def test_listen_with_http_colon_port_serves_on_loopback_only(
    env: dict[str, str], listeners: ListenerFactory
) -> None:
    port = free_port()
    listener = listeners(env, "--http", f":{port}")
    assert _get(f"http://127.0.0.1:{port}/readyz") == (200, "ready\n")
    assert f"on http://127.0.0.1:{port}/" in listener.text(), listener.text()
    # Not on the machine's other address, where it has one.
    address = _outward_address()
    if address is not None:
        with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
            pass


def _outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
        except OSError:
            return None
        address: str = sock.getsockname()[0]
    return None if address.startswith("127.") else address


# -- clients that misbehave ---------------------------------------------------------------


@pytest.mark.slow
def test_a_client_that_sends_nothing_is_disconnected_after_the_request_timeout(
    served: tuple[ListenerProcess, int],
) -> None:
    listener, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S + MARGIN_S) as s:
        # Meanwhile other requests are served.
        assert _get(f"http://127.0.0.1:{port}/readyz") == (200, "ready\n")
        try:
            assert s.recv(1024) == b""  # closed by the server, not by our own timeout
        except TimeoutError:
            pytest.fail("the server never closed a connection that sent nothing")
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S + MARGIN_S) as s:
        # A POST whose body never comes is let go as well.
        s.sendall(b"POST /dead/requeue HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nto")
        try:
            s.recv(1024)
        except TimeoutError:
            pytest.fail("the server waited for ever for a body that never came")
    _assert_no_traceback(listener)


@pytest.mark.parametrize("length", ["-1", "abc", "1e3", "", "٣"])
def test_a_post_with_a_bad_content_length_is_answered_400(
    length: str, served: tuple[ListenerProcess, int]
) -> None:
    listener, port = served
    request = (
        "POST /dead/requeue HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\ntoken=x"
    )

    reply = _raw(port, request.encode())

    assert reply.startswith(b"HTTP/1.0 400 ") or reply.startswith(b"HTTP/1.1 400 "), reply
    _assert_no_traceback(listener)


def test_a_requeued_notice_with_a_non_ascii_digit_is_ignored(
    served: tuple[ListenerProcess, int],
) -> None:
    listener, port = served
    base = f"http://127.0.0.1:{port}"
    for shown in ("%C2%B2", "%D9%A3", "9" * 5000):  # '²', '٣' and more than int() takes
        status, page = _get(f"{base}/dead?requeued={shown}")
        assert status == 200 and 'id="notice"' not in page
    status, page = _get(f"{base}/dead?requeued=3")
    assert status == 200 and "Re-queued 3 dead letters." in page
    _assert_no_traceback(listener)


def test_a_client_that_goes_away_mid_response_leaves_one_line_and_no_traceback(
    served: tuple[ListenerProcess, int],
) -> None:
    listener, port = served

    def hang_up() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            # Close with a reset at once: the dashboard is written to a connection gone.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return "went away" in listener.text()

    wait_for(hang_up, 20, interval_s=0.05, what="a response to a client gone")
    assert _get(f"http://127.0.0.1:{port}/readyz") == (200, "ready\n")
    _assert_no_traceback(listener)


# -- metrics ------------------------------------------------------------------------------


def test_metric_labels_from_timer_keys_are_bounded() -> None:
    metrics = Metrics()
    for i in range(50):
        metrics.observe_firing(f"made_up_{i}", "unknown_action", None)
    metrics.observe_firing("cancel", "applied", 5.0)
    metrics.observe_firing("complete", "skipped_not_paid", None)
    metrics.observe_firing("cancel", "unmapped_flag", None)
    metrics.observe_firing("cancel", "something_new", None)
    metrics.allow(actions=["refund"], outcomes=["skipped_not_pending"])
    metrics.observe_firing("refund", "skipped_not_pending", None)

    series = {
        tuple(sorted(s.labels.items()))
        for family in metrics.registry.collect()
        if family.name == "delayq_timers_fired"
        for s in family.samples
        if s.name.endswith("_total")
    }

    assert series == {
        (("action", "other"), ("outcome", "unknown_action")),
        (("action", "cancel"), ("outcome", "applied")),
        (("action", "complete"), ("outcome", "skipped_not_paid")),
        (("action", "cancel"), ("outcome", "unmapped_flag")),
        (("action", "cancel"), ("outcome", "other")),
        (("action", "refund"), ("outcome", "skipped_not_pending")),
    }


def test_timers_of_unknown_actions_are_counted_under_one_label(
    env: dict[str, str], listeners: ListenerFactory, redis_server: RedisServer, sqlite_url: str
) -> None:
    port = free_port()
    listeners(env, "--http", f"127.0.0.1:{port}")
    create_orders(engine_for(sqlite_url), ["U1"])
    producer = Producer(redis_server.client(), Keys())
    producer.schedule_many([("U1", 0, f"nonsense_{i}") for i in range(5)])

    def counted() -> str:
        text = _get(f"http://127.0.0.1:{port}/metrics")[1]
        return text if 'action="other",outcome="unknown_action"} 5.0' in text else ""

    text = wait_for(counted, 30, what="five unknown actions counted")

    assert "nonsense" not in text


def test_metrics_keep_every_redis_gauge_while_a_dead_letter_exists(
    redis_server: RedisServer, sqlite_url: str, tmp_path: Path, listeners: ListenerFactory
) -> None:
    env = clean_env(
        REDIS_URL=redis_server.url(0), DATABASE_URL=sqlite_url, HOME=str(tmp_path),
        MAX_ATTEMPTS="1",
    )  # fmt: skip
    migrate_cli(env)
    engine = engine_for(sqlite_url)
    create_orders(engine, ["DEAD1", "LATER1"])
    with engine.begin() as conn:
        # The database refuses this order's outcome: its firing fails and, with one
        # attempt allowed, is dead-lettered by the listener.
        conn.execute(
            sa.text(
                "CREATE TRIGGER refuse_dead1 BEFORE INSERT ON delayq_outcomes "
                "WHEN NEW.order_sn = 'DEAD1' BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        )
    port = free_port()
    listener = listeners(env, "--http", f"127.0.0.1:{port}")
    client = redis_server.client()
    producer = Producer(client, Keys())
    producer.schedule("LATER1", 3600)
    producer.schedule("DEAD1", 0)
    wait_for(lambda: client.hlen(Keys().dead) == 1, 30, what="one dead letter")

    text = _get(f"http://127.0.0.1:{port}/metrics")[1]

    assert "delayq_dead_letters 1.0" in text, text
    assert "delayq_pending 1.0" in text
    assert "delayq_overdue 0.0" in text
    assert "delayq_in_flight 0.0" in text
    assert "delayq_listeners_alive 1.0" in text
    _assert_no_traceback(listener)


def test_metrics_answer_openmetrics_and_gzip_when_the_scraper_asks(
    served: tuple[ListenerProcess, int],
) -> None:
    listener, port = served
    url = f"http://127.0.0.1:{port}/metrics"

    plain_status, plain_headers, plain = _fetch(url)
    om_status, om_headers, om_zipped = _fetch(
        url,
        Accept="application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5",
        **{"Accept-Encoding": "gzip"},
    )

    assert plain_status == 200 and plain_headers["Content-Type"].startswith("text/plain")
    assert "Content-Encoding" not in plain_headers
    assert b"delayq_lateness_seconds_bucket" in plain and not plain.endswith(b"# EOF\n")
    assert om_status == 200
    assert om_headers["Content-Type"].startswith("application/openmetrics-text")
    assert om_headers["Content-Encoding"] == "gzip"
    openmetrics = gzip.decompress(om_zipped)
    assert openmetrics.endswith(b"# EOF\n") and b"delayq_pending" in openmetrics
    assert len(om_zipped) < len(plain) / 3  # compressed for real
    # name[] narrows a scrape to the series asked for.
    status, _, only = _fetch(f"{url}?name[]=delayq_pending")
    assert status == 200 and only.decode().strip().endswith("delayq_pending 0.0")
    assert b"delayq_lateness_seconds" not in only
    _assert_no_traceback(listener)


def test_livez_stays_alive_and_quick_while_redis_hangs_but_healthz_reports_it(
    redis_server: RedisServer, sqlite_url: str, tmp_path: Path, listeners: ListenerFactory
) -> None:
    with FreezableProxy((HOST, redis_server.port)) as proxy:
        env = clean_env(
            REDIS_URL=f"redis://{HOST}:{proxy.port}/0", DATABASE_URL=sqlite_url,
            HOME=str(tmp_path),
        )  # fmt: skip
        migrate_cli(env)
        port = free_port()
        listener = listeners(env, "--http", f"127.0.0.1:{port}")
        base = f"http://127.0.0.1:{port}"
        assert _get(f"{base}/livez") == (200, "alive\n")
        assert _get(f"{base}/healthz") == (200, "ok\n")

        proxy.freeze(new_connections="hang")  # Redis stops answering, as a dead link does

        def unhealthy() -> str:
            status, text = _get(f"{base}/healthz")
            return text if status == 503 and "redis" in text else ""

        wait_for(unhealthy, 30, what="/healthz reporting Redis")
        # A liveness probe must not fail, nor wait, on a dependency: nothing to restart.
        for _ in range(5):
            started = time.monotonic()
            assert _get(f"{base}/livez") == (200, "alive\n")
            assert time.monotonic() - started < 1.0
        proxy.thaw()
        wait_for(lambda: _get(f"{base}/healthz") == (200, "ok\n"), 60, what="healthy again")
    _assert_no_traceback(listener)


def test_probes_refuse_other_methods_and_answer_head(served: tuple[ListenerProcess, int]) -> None:
    listener, port = served
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _get(f"{base}/healthz")[0] == 200, 30, what="the first health probes")
    for path in ("/livez", "/readyz", "/healthz"):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="HEAD")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200 and response.read() == b""
        assert _fetch(f"http://127.0.0.1:{port}{path}?x=1")[0] == 200
        post = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(post, timeout=10)
        assert refused.value.code == 405
    _assert_no_traceback(listener)
