"""Test your order service against delayq without mocks.

    from delayq.testing import running

    def test_unpaid_order_is_cancelled(tmp_path):
        with running(database_url=f"sqlite:///{tmp_path}/shop.db") as server, server.use():
            create_order("SN1")            # your code: delayq.schedule_expiry("SN1", "20m")
            fired = server.fire_due()      # the 20 minutes pass now
            assert [(f.order_sn, f.outcome) for f in fired] == [("SN1", "applied")]

`running()` starts a private redis-server (unix socket, keyspace events on, nothing kept
on disk) and stops it when the block ends, also when it raises. `server.use()` points
delayq.schedule_expiry / cancel_expiry and the DELAYQ_* environment at it for a block.
`server.fire_due(within=...)` fires due timers in the calling thread through the
listener's own claim, apply (your @delayq.action handlers included) and acknowledge
steps. pytest fixtures: `pytest_plugins = ["delayq.testing.pytest_plugin"]`.

Needs the listener extra (SQLAlchemy): `pip install 'delayq[listener]'`. See docs/testing.md.
"""

from delayq.introspect import PendingTimer

#: What the listener extra brings that delayq.testing imports.
_LISTENER_EXTRA = {"sqlalchemy", "alembic", "prometheus_client", "typer", "httpx", "pymysql"}

try:
    from delayq.testing.server import Fired, TimerTestServer, running
except ModuleNotFoundError as exc:
    if (exc.name or "").split(".")[0] not in _LISTENER_EXTRA:
        raise
    raise ImportError(
        f"delayq.testing fires timers with the listener's code, which needs {exc.name}: "
        "pip install 'delayq[listener]'"
    ) from exc

__all__ = ["Fired", "PendingTimer", "TimerTestServer", "running"]
