"""pytest fixtures for testing a service against delayq (docs/testing.md).

Opt in from your project's root conftest.py:

    pytest_plugins = ["delayq.testing.pytest_plugin"]

It is not registered as an automatic (`pytest11`) plugin: that would load it into every
pytest run of every project that has delayq installed, producer-only installs included.

Fixtures:

* `delayq_server`: a started TimerTestServer, in use (delayq.schedule_expiry and the
  DELAYQ_* environment point at it) for the test; stopped afterwards, pass or fail.
* `delayq_database_url`: the database it applies timers in. An SQLite file in the test's
  tmp_path unless you override this fixture with your test database's URL.
* `delayq_options`: Settings fields for the server, `{}` unless overridden, e.g.
  `{"app": "shop.timers", "orders_table": "shop_orders"}`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from delayq.testing.server import TimerTestServer, running


@pytest.fixture
def delayq_database_url(tmp_path: Path) -> str:
    """The database delayq_server applies timers in (override it for yours)."""
    return f"sqlite:///{tmp_path / 'delayq-test.db'}"


@pytest.fixture
def delayq_options() -> dict[str, Any]:
    """Settings fields given to delayq_server (override it: app=, orders_table=, ...)."""
    return {}


@pytest.fixture
def delayq_server(
    delayq_database_url: str, delayq_options: dict[str, Any]
) -> Iterator[TimerTestServer]:
    """A private Redis that delayq.schedule_expiry talks to during the test."""
    with running(database_url=delayq_database_url, **delayq_options) as server, server.use():
        yield server
