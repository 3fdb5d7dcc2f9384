"""Webhook actions (DELAYQ_WEBHOOK_<ACTION>) as a receiving service sees them: a real
HTTP server started by the test records every request and answers from a script, while
`delayq listen` runs as a real subprocess against a real Redis."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sqlalchemy as sa

from delayq.keys import Keys
from delayq.producer import Producer
from delayq.timing import to_ms
from tests.harness import (
    ListenerProcess,
    clean_env,
    create_orders,
    engine_for,
    migrate_cli,
    outcome_rows,
    run_cli,
    statuses,
)
from tests.servers import RedisServer, free_port, wait_for

SECRET = "whsec-test-7f3a91"
#: `listen(env, *args)`: a started `delayq listen`, stopped when the test ends.
Listen = Callable[..., ListenerProcess]
#: Seconds a webhook test may wait for firings that retry with 50 ms backoffs.
SETTLE_S = 30


@dataclass(frozen=True)
class Request:
    """One request the hook received, and the status it answered."""

    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def json(self) -> dict[str, object]:
        parsed: dict[str, object] = json.loads(self.body)
        return parsed

    @property
    def key(self) -> str:
        return self.headers.get("idempotency-key", "")


class Hook(ThreadingHTTPServer):
    """A receiving service on 127.0.0.1: records every request, answers each firing
    (told apart by its Idempotency-Key) from `script` -- its first request gets
    script[0], and so on, then `then` -- after `delay_s`."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HookHandler)
        self.script: list[int] = []
        self.then = 200
        self.delay_s = 0.0
        self.requests: list[Request] = []
        #: Set at teardown, so that requests still being delayed end at once.
        self.closing = threading.Event()
        self._lock = threading.Lock()

    def url(self, path: str = "/hook", userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.server_address[1]}{path}"

    def record(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            key = headers.get("idempotency-key", "")
            n = sum(1 for r in self.requests if r.key == key)
            status = self.script[n] if n < len(self.script) else self.then
            self.requests.append(Request(path, headers, body, status))
            return status

    def of(self, order_sn: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.json.get("order_sn") == order_sn]


class _HookHandler(BaseHTTPRequestHandler):
    server: Hook
    protocol_version = "HTTP/1.1"  # keep-alive, as a real service would

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        status = self.server.record(self.path, headers, body)
        if self.server.delay_s and self.server.closing.wait(self.server.delay_s):
            return
        answer = b'{"ok": true}' if status < 300 else b'{"error": "scripted"}'
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
        except OSError:
            pass  # the caller gave up waiting (its timeout): nothing to answer

    def log_message(self, format: str, *args: object) -> None:
        pass  # the test asserts on `requests`, not on a log


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook()
    thread = threading.Thread(target=server.serve_forever, name="test-hook", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.closing.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def base_env(redis_server: RedisServer, sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    env = clean_env(
        REDIS_URL=redis_server.url(0),
        DATABASE_URL=sqlite_url,
        HOME=str(tmp_path / "home"),
        WEBHOOK_SECRET=SECRET,
        RETRY_BACKOFF_S="0.05",
        RETRY_BACKOFF_MAX_S="0.2",
    )
    migrate_cli(env)
    return env


@pytest.fixture
def listen(tmp_path: Path) -> Iterator[Listen]:
    """`listen(env, *args)` starts `delayq listen`; every one started is stopped."""
    started: list[ListenerProcess] = []

    def start(env: dict[str, str], *args: str) -> ListenerProcess:
        proc = ListenerProcess(env, tmp_path / f"listener{len(started)}.log", args=args)
        started.append(proc)
        return proc.start()

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


def outcomes_with_detail(engine: sa.Engine) -> dict[tuple[str, str], tuple[str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT order_sn, action, outcome, detail FROM delayq_outcomes")
        ).all()
    return {(r[0], r[1]): (r[2], r[3]) for r in rows}


def dead_letters(redis_server: RedisServer) -> dict[str, dict[str, object]]:
    raw = redis_server.client().hgetall(Keys().dead)
    return {str(k): json.loads(v) for k, v in raw.items()}


def dead_letter(redis_server: RedisServer, firing: str) -> dict[str, object]:
    """The dead letter of `firing`, once there is one."""
    wait_for(lambda: firing in dead_letters(redis_server), SETTLE_S, what=f"{firing} dead")
    return dead_letters(redis_server)[firing]


def test_webhook_that_fails_twice_then_accepts_is_called_until_accepted_with_one_key_per_firing(
    hook: Hook, base_env: dict[str, str], redis_server: RedisServer, listen: Listen, sqlite_url: str
) -> None:
    hook.script = [503, 503]
    env = {**base_env, "DELAYQ_WEBHOOK_NOTIFY": hook.url("/notify")}
    listen(env)
    producer = Producer(redis_server.client(), Keys())
    due = {sn: producer.schedule(sn, 0.2, action="notify") for sn in ("WH-1", "WH-2", "WH-3")}
    engine = engine_for(sqlite_url)
    wait_for(lambda: len(outcome_rows(engine)) == 3, SETTLE_S, what="three webhook outcomes")

    keys = set()
    for sn, due_at in due.items():
        key = f"{sn}:notify@{to_ms(due_at)}"
        requests = hook.of(sn)
        assert [r.status for r in requests] == [503, 503, 200], requests
        assert {r.key for r in requests} == {key}
        assert [r.json["attempt"] for r in requests] == [1, 2, 3]
        for r in requests:
            assert r.path == "/notify"
            assert r.headers["content-type"] == "application/json"
            body = r.json
            assert set(body) == {
                "order_sn",
                "action",
                "due_at",
                "fired_at",
                "attempt",
                "idempotency_key",
            }
            assert (body["order_sn"], body["action"], body["idempotency_key"]) == (
                sn,
                "notify",
                key,
            )
            assert isinstance(body["due_at"], str) and isinstance(body["fired_at"], str)
            sent_due = datetime.fromisoformat(body["due_at"].replace("Z", "+00:00"))
            assert sent_due == due_at
            assert datetime.fromisoformat(body["fired_at"].replace("Z", "+00:00")) >= sent_due
            expected = hmac.new(SECRET.encode(), r.body, hashlib.sha256).hexdigest()
            signature = r.headers["x-delayq-signature"]
            assert signature.startswith("sha256=")
            assert hmac.compare_digest(signature.removeprefix("sha256="), expected)
        keys.add(key)
    assert len(keys) == 3, "each firing has its own idempotency key"
    assert len(hook.requests) == 9
    outcomes = outcomes_with_detail(engine)
    assert outcomes == {(sn, "notify"): ("applied", "HTTP 200") for sn in due}
    assert dead_letters(redis_server) == {}


def test_webhook_answering_400_is_dead_lettered_after_one_request_without_an_outcome(
    hook: Hook, base_env: dict[str, str], redis_server: RedisServer, listen: Listen, sqlite_url: str
) -> None:
    hook.script = [400]
    env = {**base_env, "DELAYQ_WEBHOOK_NOTIFY": hook.url()}
    listen(env)
    producer = Producer(redis_server.client(), Keys())
    due = producer.schedule("WH-BAD", 0, action="notify")
    firing = f"WH-BAD:notify@{to_ms(due)}"
    dead_letter(redis_server, firing)

    # A firing after it that is accepted: a retry of WH-BAD (50 ms backoff) would have
    # reached the hook by the time this one's outcome is recorded.
    hook.script = []
    producer.schedule("WH-GOOD", 0.2, action="notify")
    engine = engine_for(sqlite_url)
    wait_for(lambda: outcome_rows(engine), SETTLE_S, what="WH-GOOD's outcome")
    assert [r.status for r in hook.of("WH-BAD")] == [400]
    assert [(r.order_sn, r.outcome) for r in outcome_rows(engine)] == [("WH-GOOD", "applied")]

    shown = json.loads(run_cli("status", "--json", env=env).stdout)
    (dead,) = shown["dead_letters"]
    assert dead["timer"] == "WH-BAD:notify"
    assert "HTTP 400" in dead["error"], dead
    assert dead["attempts"] == 1


def test_webhook_that_never_answers_in_time_is_retried_then_dead_lettered_after_max_attempts(
    hook: Hook, base_env: dict[str, str], redis_server: RedisServer, listen: Listen, sqlite_url: str
) -> None:
    hook.delay_s = 30  # far past the timeout; released when the test ends
    env = {
        **base_env,
        "DELAYQ_WEBHOOK_NOTIFY": hook.url(),
        "DELAYQ_ACTION_NOTIFY_TIMEOUT_S": "0.5",
        "DELAYQ_ACTION_NOTIFY_MAX_ATTEMPTS": "3",
        "DELAYQ_ACTION_NOTIFY_BACKOFF_S": "0.05",
    }
    listen(env)
    due = Producer(redis_server.client(), Keys()).schedule("WH-SLOW", 0, action="notify")
    firing = f"WH-SLOW:notify@{to_ms(due)}"
    dead = dead_letter(redis_server, firing)
    assert dead["attempts"] == 3
    assert "no answer within 0.5 s" in str(dead["error"]), dead
    assert [r.json["attempt"] for r in hook.of("WH-SLOW")] == [1, 2, 3]
    assert outcome_rows(engine_for(sqlite_url)) == []


def test_webhook_whose_server_refuses_connections_is_dead_lettered_after_max_attempts(
    base_env: dict[str, str], redis_server: RedisServer, listen: Listen, sqlite_url: str
) -> None:
    env = {
        **base_env,
        "DELAYQ_WEBHOOK_NOTIFY": f"http://127.0.0.1:{free_port()}/hook",
        "DELAYQ_ACTION_NOTIFY_MAX_ATTEMPTS": "4",
    }
    listen(env)
    due = Producer(redis_server.client(), Keys()).schedule("WH-DOWN", 0, action="notify")
    firing = f"WH-DOWN:notify@{to_ms(due)}"
    dead = dead_letter(redis_server, firing)
    assert dead["attempts"] == 4
    assert outcome_rows(engine_for(sqlite_url)) == []


def test_slow_webhook_does_not_delay_cancels_due_at_the_same_moment(
    hook: Hook, base_env: dict[str, str], redis_server: RedisServer, listen: Listen, sqlite_url: str
) -> None:
    hook.delay_s = 3.0
    env = {**base_env, "DELAYQ_WEBHOOK_NOTIFY": hook.url()}
    engine = engine_for(sqlite_url)
    cancels = [f"SN-{n}" for n in range(4)]
    create_orders(engine, cancels)
    listen(env)
    due = datetime.now(UTC) + timedelta(seconds=1)
    items = [(f"WH-{n}", due, "notify") for n in range(4)] + [(sn, due, "cancel") for sn in cancels]
    Producer(redis_server.client(), Keys()).schedule_many(items)

    wait_for(
        lambda: set(statuses(engine).values()) == {"cancelled"}, SETTLE_S, what="orders cancelled"
    )
    rows = outcome_rows(engine)
    cancel_lateness = [r.lateness_ms for r in rows if r.action == "cancel"]
    assert len(cancel_lateness) == 4
    assert max(cancel_lateness) < 1500, cancel_lateness  # the webhook answers after 3,000 ms
    wait_for(lambda: len(outcome_rows(engine)) == 8, SETTLE_S, what="the webhooks' outcomes too")
    assert len(hook.requests) == 4


def test_webhook_secret_and_url_credentials_stay_out_of_the_log_and_delayq_actions(
    hook: Hook, base_env: dict[str, str], redis_server: RedisServer, listen: Listen, sqlite_url: str
) -> None:
    password, token = "pw-hunter2-9c1e", "tok-5b77e0aa"
    secrets = (password, token, SECRET)
    url = hook.url(f"/hook?token={token}", userinfo=f"user:{password}@")
    hook.script = [503]  # one failure, so that the call is logged with its URL
    env = {**base_env, "DELAYQ_WEBHOOK_NOTIFY": url, "DELAYQ_WEBHOOK_REFUND": url}
    listener = listen(env, "--log-level", "debug")
    producer = Producer(redis_server.client(), Keys())
    producer.schedule("WH-LOG", 0, action="notify")
    engine = engine_for(sqlite_url)
    wait_for(lambda: outcome_rows(engine), SETTLE_S, what="WH-LOG's outcome")
    hook.script, hook.then = [], 404  # a dead letter, whose error is logged too
    producer.schedule("WH-GONE", 0, action="refund")
    wait_for(lambda: dead_letters(redis_server), SETTLE_S, what="WH-GONE dead-lettered")
    listener.stop()

    # The credentials were used: in the request, never in what delayq shows.
    first = hook.requests[0]
    assert first.path == f"/hook?token={token}"
    assert first.headers["authorization"] == "Basic " + base64.b64encode(
        f"user:{password}".encode()
    ).decode("ascii")
    log = listener.text()
    assert "notify failed" in log and "WH-GONE" in log, log
    actions = run_cli("actions", env=env)
    assert actions.returncode == 0, actions.stderr
    notify_line = next(line for line in actions.stdout.splitlines() if line.startswith("notify"))
    assert "webhook" in notify_line and "127.0.0.1" in notify_line
    status = run_cli("status", env=env)
    for secret in secrets:
        for shown, text in (("log", log), ("actions", actions.stdout + actions.stderr)):
            assert secret not in text, f"{shown} shows {secret}"
        assert secret not in status.stdout + status.stderr
        assert secret not in json.dumps(dead_letters(redis_server))


@pytest.mark.parametrize("url", ["ftp://user:pw-hunter2-9c1e@x/hook", "not a url"])
def test_invalid_webhook_url_stops_listen_with_one_line_naming_the_variable(
    url: str, tmp_path: Path
) -> None:
    env = clean_env(
        REDIS_URL="redis://127.0.0.1:1/0",
        DATABASE_URL=f"sqlite:///{tmp_path}/d.db",
        HOME=str(tmp_path / "home"),
        WEBHOOK_SECRET=SECRET,
        WEBHOOK_NOTIFY=url,
    )
    done = run_cli("listen", env=env, timeout_s=30)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert re.match(r"delayq: error: .*DELAYQ_WEBHOOK_NOTIFY", lines[0]), lines
    assert "pw-hunter2-9c1e" not in done.stderr and SECRET not in done.stderr
    assert done.stdout == ""
