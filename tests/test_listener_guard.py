"""A bug in one of the listener's threads must stop the listener with an error (systemd
then restarts it), never leave it running without that thread."""

from __future__ import annotations

import threading
from pathlib import Path

from delayq.actions import Outcome
from delayq.context import Delayq
from delayq.listener import ListenerCrashed
from delayq.settings import Settings
from delayq.store import Firing
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
    def buggy_apply(firings: list[Firing]) -> list[Outcome]:
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
