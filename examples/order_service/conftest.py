"""The shop's test setup: delayq.testing's fixtures, and a fresh database per test with
the shop's tables, which is also the database delayq applies the timers in."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import shop
import sqlalchemy as sa
from sqlalchemy.engine import Engine

pytest_plugins = ["delayq.testing.pytest_plugin"]


@pytest.fixture
def delayq_options() -> dict[str, Any]:
    """The shop's own actions, as `delayq listen --app shop_timers` loads them."""
    return {"app": "shop_timers"}


@pytest.fixture
def engine(delayq_database_url: str) -> Iterator[Engine]:
    """The shop's database (delayq_database_url: an SQLite file in tmp_path; override that
    fixture to run on your test server)."""
    engine = sa.create_engine(delayq_database_url)
    shop.metadata.create_all(engine)
    yield engine
    engine.dispose()
