"""The dashboard's pages and actions through Werkzeug's test client, against a real Redis
and a real database, with a real Listener object (not running: the state is made with the
store's own calls, as a running listener makes it).

What an operator relies on: every page is framed by the security headers; a foreign Host,
a cross-site form, a missing CSRF value or a wrong token is refused and changes nothing;
the lists page through every timer in due order; the outcomes filter and pages; the search
finds an order's timers; bad input answers 400 with one line."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from werkzeug.test import Client, TestResponse

from delayq.context import Delayq
from delayq.dashboard import make_dashboard
from delayq.db import outcomes as outcomes_table
from delayq.keys import Keys
from delayq.listener import Listener
from delayq.producer import Producer
from delayq.settings import Settings
from tests.servers import RedisServer

TOKEN = "pages-test-token"
BASE = "http://127.0.0.1:9808"
ORIGIN = {"Origin": BASE}
CSP = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


@dataclass
class Scene:
    listener: Listener
    client: Client
    producer: Producer
    engine: sa.Engine

    def get(self, url: str, **headers: str) -> TestResponse:
        return self.client.get(url, base_url=BASE, headers=headers)

    def post(self, url: str, data: dict[str, Any], **headers: str) -> TestResponse:
        return self.client.post(url, base_url=BASE, data=data, headers=headers)

    def dead_letters(self, sns: list[str]) -> list[str]:
        """Dead-letter a timer of each order the way the listener does: claimed, then its
        one allowed attempt failed."""
        self.producer.schedule_many((sn, 0) for sn in sns)
        store = self.listener.store
        claim = store.claim_due(len(sns), 60_000)
        ids = [f.id for f in claim.firings]
        assert len(ids) == len(sns)
        store.retry_later(
            ids, max_attempts=1, backoff_ms=100, backoff_max_ms=100, error="permission denied"
        )
        return ids

    def dead_count(self) -> int:
        return int(self.listener.client.hlen(self.listener.keys.dead))

    def form_csrf(self, url: str = "/dead") -> str:
        page = self.get(url)
        found = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert found, page.text
        return found.group(1)


def _scene(server: RedisServer, database_url: str, home: Path, token: str | None) -> Scene:
    settings = Settings(redis_url=server.url(0), database_url=database_url, home=home)
    dq = Delayq(settings)
    dq.migrate()
    client = server.client()
    listener = Listener(settings, client, dq.engine, Keys())
    app = make_dashboard(listener, token=token, allowed_hosts=("ops.example",))
    return Scene(listener, Client(app), Producer(client, Keys()), dq.engine)


@pytest.fixture
def scene(redis_server: RedisServer, sqlite_url: str, tmp_path: Path) -> Iterator[Scene]:
    made = _scene(redis_server, sqlite_url, tmp_path, TOKEN)
    yield made
    made.engine.dispose()


def _one_line(response: TestResponse) -> str:
    text = response.text
    assert text.endswith("\n") and text.count("\n") == 1, text
    assert "Traceback" not in text
    return text.strip()


def test_every_response_frames_nothing_runs_no_inline_script_and_is_not_cached(
    scene: Scene,
) -> None:
    scene.producer.schedule_many([("SN1", "1h")])
    for url, status in (
        ("/", 200),
        ("/pending", 200),
        ("/in-flight", 200),
        ("/dead", 200),
        ("/outcomes", 200),
        ("/timer?order=SN1&action=cancel", 200),
        ("/search?order=NOBODY", 200),
        ("/static/dashboard.css", 200),
        ("/static/dashboard.js", 200),
        ("/static/missing.js", 404),
        ("/pending?after=nonsense", 400),
    ):
        response = scene.get(url)
        assert response.status_code == status, url
        headers = response.headers
        assert headers["Content-Security-Policy"] == CSP, url
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "same-origin"
        assert headers["Cache-Control"] == "no-store"
        if response.mimetype == "text/html":
            # Scripts only from files (the CSP would block any other); no style attributes.
            assert re.findall(r"<script[^>]*>", response.text) == [
                '<script src="/static/dashboard.js" defer>'
            ], url
            assert " style=" not in response.text and "<style" not in response.text, url
    refused = scene.get("/", Host="evil.example")
    assert refused.headers["X-Frame-Options"] == "DENY"


def test_only_ip_addresses_localhost_and_configured_names_are_answered(scene: Scene) -> None:
    for host in ("127.0.0.1:9808", "localhost:9808", "[::1]:9808", "10.1.2.3", "ops.example"):
        assert scene.get("/", Host=host).status_code == 200, host
    for host in ("evil.example", "ops.example.evil.example", "localhost.evil.example", ""):
        response = scene.get("/", Host=host)
        assert response.status_code == 400, host
        assert "DELAYQ_DASHBOARD_HOSTS" in _one_line(response)


def test_a_dead_letter_action_refused_for_csrf_origin_or_token_changes_nothing(
    scene: Scene,
) -> None:
    firings = scene.dead_letters(["D1", "D2"])
    csrf = scene.form_csrf()
    good = {"csrf": csrf, "token": TOKEN, "scope": "all"}
    refusals: list[tuple[dict[str, Any], dict[str, str], str]] = [
        ({**good, "csrf": ""}, ORIGIN, "CSRF token does not match"),
        ({**good, "csrf": "x" * 43}, ORIGIN, "CSRF token does not match"),
        (good, {"Origin": "http://evil.example"}, "another site"),
        (good, {"Origin": "null"}, "another site"),
        (good, {"Referer": "http://evil.example/page"}, "another site"),
        (good, {}, "neither where it comes from"),
        ({**good, "token": "not-the-token"}, ORIGIN, "wrong or missing dashboard token"),
        ({**good, "token": ""}, ORIGIN, "wrong or missing dashboard token"),
    ]
    for path in ("/dead/requeue", "/dead/delete"):
        for data, headers, reason in refusals:
            response = scene.post(path, data, **headers)
            assert response.status_code == 403, (path, data, headers)
            assert reason in response.text
            assert "Nothing was changed" in response.text
            assert scene.dead_count() == 2
    # The same form from the dashboard itself, with the right token: done.
    response = scene.post("/dead/delete", {**good, "scope": "selected", "firing": firings[0]},
                          Referer=f"{BASE}/dead")  # fmt: skip
    assert response.status_code == 303 and response.headers["Location"] == "/dead?deleted=1"
    assert scene.dead_count() == 1


def test_the_csrf_cookie_is_http_only_same_site_strict_and_kept_across_pages(
    scene: Scene,
) -> None:
    scene.dead_letters(["D1"])
    first = scene.get("/dead")
    cookie = first.headers["Set-Cookie"]
    assert cookie.startswith("delayq_csrf=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    assert f'name="csrf" value="{value}"' in first.text
    # The browser sends it back: the same value, and no new cookie.
    again = scene.get("/dead")
    assert "Set-Cookie" not in again.headers
    assert f'name="csrf" value="{value}"' in again.text


def test_without_a_dashboard_token_the_actions_are_off(
    redis_server: RedisServer, sqlite_url: str, tmp_path: Path
) -> None:
    scene = _scene(redis_server, sqlite_url, tmp_path, token=None)
    scene.dead_letters(["D1"])
    page = scene.get("/dead")
    assert "Set DELAYQ_DASHBOARD_TOKEN" in page.text and 'id="token"' not in page.text
    csrf = scene.form_csrf()
    response = scene.post("/dead/requeue", {"csrf": csrf, "token": "", "scope": "all"}, **ORIGIN)
    assert response.status_code == 403 and "actions are off" in response.text
    assert scene.dead_count() == 1
    scene.engine.dispose()


def test_requeue_and_delete_work_on_the_ticked_dead_letters_or_on_all(scene: Scene) -> None:
    firings = scene.dead_letters([f"D{i}" for i in range(5)])
    csrf = scene.form_csrf()
    form = {"csrf": csrf, "token": TOKEN}

    def act(path: str, **fields: Any) -> str:
        response = scene.post(path, {**form, **fields}, **ORIGIN)
        assert response.status_code == 303, response.text
        return str(response.headers["Location"])

    assert act("/dead/requeue", scope="selected", firing=firings[:2]) == "/dead?requeued=2"
    assert scene.dead_count() == 3
    # Back among the claims with their lease run out: the next claim fires them.
    assert set(scene.listener.client.zrange(scene.listener.keys.claims, 0, -1)) == set(firings[:2])
    assert act("/dead/delete", scope="selected", firing=[firings[2]]) == "/dead?deleted=1"
    assert act("/dead/delete", scope="selected") == "/dead?deleted=0"  # nothing ticked
    assert scene.dead_count() == 2
    assert "Deleted 1 dead letters." in scene.get("/dead?deleted=1").text
    assert act("/dead/delete", scope="all") == "/dead?deleted=2"
    assert scene.dead_count() == 0
    assert 'id="empty"' in scene.get("/dead").text


def _next_link(html: str) -> str | None:
    found = re.search(r'<a href="([^"]+)" id="next">', html)
    return found.group(1).replace("&amp;", "&") if found else None


def test_pending_pages_follow_the_cursor_through_every_timer_in_due_order(scene: Scene) -> None:
    # 120 timers over 2 hours, scheduled out of order: three pages of 50.
    sns = [f"P{i:03d}" for i in range(120)]
    now = datetime.now(UTC)
    scene.producer.schedule_many((sn, now + timedelta(minutes=1 + (i * 37) % 120)) for i, sn in
                                 enumerate(sns))  # fmt: skip
    seen: list[str] = []
    url: str | None = "/pending"
    pages = 0
    while url is not None:
        page = scene.get(url)
        assert page.status_code == 200
        pages += 1
        seen += re.findall(r">(P\d{3}):cancel</a>", page.text)
        assert ('id="first"' in page.text) == (pages > 1)
        url = _next_link(page.text)
    assert pages == 3
    order = sorted(sns, key=lambda sn: ((sns.index(sn) * 37) % 120, sn))
    assert seen == order


def test_in_flight_page_lists_claimed_firings_with_lease_and_attempts(scene: Scene) -> None:
    scene.producer.schedule_many([("F1", 0), ("F2", 0)])
    scene.listener.store.claim_due(10, 60_000)
    page = scene.get("/in-flight")
    assert "F1:cancel" in page.text and "F2:cancel" in page.text
    assert page.text.count('class="when"') == 4  # due and lease until, each row


@pytest.mark.parametrize(
    "url",
    [
        "/pending?after=nonsense",
        "/in-flight?after=cDE3OTU1MTQ1NzQzOTE6U04zNjpjYW5jZWw",  # a pending cursor
        "/dead?after=" + "x" * 600,
        "/outcomes?after=2026-01-01T00:00:00~x",
        "/outcomes?since=yesterday",
        "/outcomes?since=2026-01-02T00:00&until=2026-01-01T00:00",
        "/outcomes?action=Cancel",
        "/outcomes?outcome=no%20such",
        "/search?order=bad%20id",
        "/search?order=",
        "/timer?order=SN1&action=Bad",
        "/timer?order=SN1",
    ],
)
def test_bad_input_answers_400_with_one_line(scene: Scene, url: str) -> None:
    response = scene.get(url)
    assert response.status_code == 400
    assert response.mimetype == "text/plain"
    _one_line(response)


def _insert_outcomes(engine: sa.Engine, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(sa.insert(outcomes_table), rows)


def test_outcomes_filter_by_action_outcome_and_time_and_page_by_fired_time(
    redis_server: RedisServer, database_url: str, tmp_path: Path
) -> None:
    scene = _scene(redis_server, database_url, tmp_path, TOKEN)
    t0 = datetime(2026, 3, 1, 12, 0)
    rows = [
        {
            "order_sn": f"O{i:03d}",
            "action": "cancel" if i % 3 else "complete",
            "due_at": t0 + timedelta(seconds=i),
            # Two rows a second: ties on fired_at are broken by id.
            "fired_at": t0 + timedelta(seconds=i // 2),
            "outcome": "cancelled" if i % 4 else "already_paid",
            "detail": None,
        }
        for i in range(130)
    ]
    _insert_outcomes(scene.engine, rows)

    def walk(url: str) -> list[str]:
        found: list[str] = []
        next_url: str | None = url
        while next_url is not None:
            page = scene.get(next_url)
            assert page.status_code == 200, page.text
            found += re.findall(r">(O\d{3}):\w+</a>", page.text)
            next_url = _next_link(page.text)
        return found

    everything = walk("/outcomes")
    assert len(everything) == 130 and len(set(everything)) == 130
    # Latest fired first; within one second, the later row first.
    assert everything[:3] == ["O129", "O128", "O127"] and everything[-1] == "O000"
    cancel = walk("/outcomes?action=cancel&outcome=cancelled")
    expected = [r["order_sn"] for r in reversed(rows)
                if r["action"] == "cancel" and r["outcome"] == "cancelled"]  # fmt: skip
    assert cancel == expected and len(cancel) > 50  # more than one page, filters kept
    window = walk("/outcomes?since=2026-03-01T12:00:10&until=2026-03-01T12:00:20")
    assert window == [f"O{i:03d}" for i in range(39, 19, -1)]
    with_zone = walk("/outcomes?since=2026-03-01T13:00:10%2B01:00&until=2026-03-01T12:00:20Z")
    assert with_zone == window
    page = scene.get("/outcomes?action=complete&since=2026-03-01T12:00:10")
    assert 'value="complete" selected' in page.text and 'value="2026-03-01T12:00:10"' in page.text
    scene.engine.dispose()


def test_search_finds_an_orders_timers_and_one_hit_opens_the_timer(scene: Scene) -> None:
    scene.producer.schedule_many([("S1", "1h")])
    scene.producer.schedule_many([("S2", "1h")])
    _insert_outcomes(scene.engine, [{
        "order_sn": "S2", "action": "complete", "due_at": datetime(2026, 1, 1),
        "fired_at": datetime(2026, 1, 1, 0, 0, 1), "outcome": "completed", "detail": None,
    }])  # fmt: skip
    one = scene.get("/search?order=S1")
    assert one.status_code == 303 and one.headers["Location"] == "/timer?order=S1&action=cancel"
    two = scene.get("/search?order=S2")
    assert two.status_code == 200
    assert "/timer?order=S2&amp;action=cancel" in two.text
    assert "/timer?order=S2&amp;action=complete" in two.text and "completed" in two.text
    none = scene.get("/search?order=S3")
    assert none.status_code == 200 and 'id="no-hits"' in none.text


def test_timer_page_shows_state_dead_letters_and_outcome_history(scene: Scene) -> None:
    scene.dead_letters(["T1"])
    _insert_outcomes(scene.engine, [{
        "order_sn": "T1", "action": "cancel", "due_at": datetime(2026, 1, 1, 10),
        "fired_at": datetime(2026, 1, 1, 10, 0, 0, 5000), "outcome": "already_paid",
        "detail": "<b>not escaped?</b>",
    }])  # fmt: skip
    page = scene.get("/timer?order=T1&action=cancel")
    assert page.status_code == 200
    text = page.text
    assert '<dd id="timer-state">dead_lettered</dd>' in text
    assert "permission denied" in text  # the dead letter's last error
    assert "already_paid at 2026-01-01 10:00:00 UTC" in text  # last outcome
    assert 'id="timer-history"' in text and "2026-01-01 10:00:00 UTC" in text
    assert "&lt;b&gt;not escaped?&lt;/b&gt;" in text and "<b>not" not in text
    missing = scene.get("/timer?order=T2&action=cancel")
    assert '<dd id="timer-state">none</dd>' in missing.text
    assert 'id="timer-no-history"' in missing.text
