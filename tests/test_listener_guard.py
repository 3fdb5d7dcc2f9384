"""A bug in one of the listener's threads must stop the listener with an error (systemd
then restarts it), never leave it running without that thread."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import delayq.listener as listener_module
from delayq.actions import Outcome
from delayq.context import Delayq
from delayq.listener import ListenerCrashed
from delayq.settings import Settings
from delayq.store import Claim, Firing
from tests.harness import create_orders
from tests.servers import RedisServer, wait_for


def test_a_crashing_applier_stops_the_listener_with_an_error_and_loses_nothing(
    redis_server: RedisServer, sqlite_url: str, tmp_path: Path
) -> None:
    dq = Delayq(Settings(redis_url=redis_server.url(0), database_url=sqlite_url, home=tmp_path))
    dq.migrate()
    create_orders(dq.engine, ["BUG-1"])
    listener = dq.listener()

    # No real fault reaches past the applier's error handling (that is its job), so the
    # bug is simulated: the one fake in this suite.
    def buggy_apply(firings: list[Firing], not_before: float = 0.0) -> list[Outcome]:
        raise RuntimeError("a bug")

    listener.applier.apply = buggy_apply  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            listener.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(listener.ready.is_set, 30, what="listener ready")
        dq.producer.schedule("BUG-1", 0)
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        listener.stop()
        thread.join(timeout=30)
    (error,) = errors
    assert isinstance(error, ListenerCrashed) and "applier" in str(error) and "a bug" in str(error)
    # The firing is still in Redis, claimable again when its lease runs out.
    client = redis_server.client()
    assert [fid for fid, _ in client.zscan_iter(dq.keys.claims, match="BUG-1:cancel@*")]


def test_a_wedged_claim_loop_fails_livez_and_an_outage_does_not(
    redis_server: RedisServer, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener_module, "PULSE_STALE_S", 1.0)
    dq = Delayq(Settings(redis_url=redis_server.url(0), database_url=sqlite_url, home=tmp_path))
    dq.migrate()
    listener = dq.listener()
    assert listener.live_problems() == []  # not started yet: nothing to restart
    release = threading.Event()
    real_claim_due = listener.claim_due

    # A loop that stops turning without dying (a deadlock, a call that never returns)
    # cannot be produced on purpose: the claim is made to hang, the second fake here.
    def wedged() -> Claim:
        if wedge.is_set():
            release.wait(60)
        return real_claim_due()

    wedge = threading.Event()
    listener.claim_due = wedged  # type: ignore[method-assign]
    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    try:
        wait_for(listener.ready.is_set, 30, what="listener ready")
        assert listener.live_problems() == []
        wedge.set()
        problems = wait_for(listener.live_problems, 30, what="/livez failing")
        assert problems == [problems[0]] and "claim loop has not turned" in problems[0]
        release.set()
        wedge.clear()
        wait_for(lambda: listener.live_problems() == [], 30, what="alive again")
    finally:
        release.set()
        listener.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()
