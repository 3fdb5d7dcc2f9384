"""examples/inventory.py as its docstring tells a user to run it: set up the shop, then
`delayq listen --app examples/inventory.py` (real subprocesses, real Redis and database)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from delayq.keys import Keys
from delayq.producer import Producer
from tests.harness import (
    ListenerProcess,
    clean_env,
    engine_for,
    migrate_cli,
    outcome_rows,
    statuses,
)
from tests.servers import RedisServer, wait_for

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "inventory.py"


@pytest.fixture(params=["mariadb", "postgres"])
def shop_url(request: pytest.FixtureRequest) -> str:
    """The example on each database whose row locks it relies on."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


def place_order(engine: Engine, order_sn: str, items: dict[str, int]) -> None:
    """The shop's checkout, in plain SQL: an unpaid order whose items are reserved."""
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO orders (order_sn, status) VALUES (:sn, 'unpaid')"),
            {"sn": order_sn},
        )
        for sku, quantity in items.items():
            conn.execute(
                sa.text("INSERT INTO order_items (order_sn, sku, quantity) VALUES (:sn, :sku, :q)"),
                {"sn": order_sn, "sku": sku, "q": quantity},
            )
            conn.execute(
                sa.text(
                    "UPDATE inventory SET available = available - :q, reserved = reserved + :q "
                    "WHERE sku = :sku"
                ),
                {"sku": sku, "q": quantity},
            )


def stock(engine: Engine) -> dict[str, tuple[int, int]]:
    """sku -> (available, reserved)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT sku, available, reserved FROM inventory")).all()
    return {sku: (available, reserved) for sku, available, reserved in rows}


def test_unpaid_orders_are_cancelled_and_their_stock_returned_once_paid_order_keeps_its_stock(
    redis_server: RedisServer, shop_url: str, tmp_path: Path
) -> None:
    env = clean_env(REDIS_URL=redis_server.url(0), DATABASE_URL=shop_url, HOME=str(tmp_path))
    setup = subprocess.run(
        [sys.executable, str(EXAMPLE), "setup"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert setup.returncode == 0, setup.stderr
    migrate_cli(env)  # delayq's outcomes table; the example's orders table stays as it is
    engine = engine_for(shop_url)
    before = stock(engine)
    assert before == {"MUG": (18, 2), "TEE": (9, 1)}, "setup reserved SN-1001's items"
    place_order(engine, "SN-A", {"MUG": 3, "TEE": 2})
    place_order(engine, "SN-B", {"MUG": 1})
    place_order(engine, "SN-PAID", {"TEE": 4})
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE orders SET status = 'paid' WHERE order_sn = 'SN-PAID'"))
    assert stock(engine) == {"MUG": (14, 6), "TEE": (3, 7)}

    listener = ListenerProcess(env, tmp_path / "listener.log", args=("--app", str(EXAMPLE)))
    try:
        listener.start()
        producer = Producer(redis_server.client(), Keys())
        # SN-PAID's timer was left armed: the handler must see that it is paid.
        for sn in ("SN-A", "SN-B", "SN-PAID", "SN-GHOST"):
            producer.schedule(sn, 0.3)
        wait_for(lambda: len(outcome_rows(engine)) == 4, 30, what="four outcomes")
    finally:
        listener.stop()

    assert statuses(engine) == {
        "SN-1001": "unpaid",  # no timer
        "SN-A": "cancelled",
        "SN-B": "cancelled",
        "SN-PAID": "paid",
    }
    # SN-A's and SN-B's stock is back, once; SN-PAID's 4 TEE and SN-1001's items stay reserved.
    assert stock(engine) == {"MUG": (18, 2), "TEE": (5, 5)}
    assert {r.order_sn: r.outcome for r in outcome_rows(engine)} == {
        "SN-A": "applied",
        "SN-B": "applied",
        "SN-PAID": "skipped_not_unpaid",
        "SN-GHOST": "not_found",
    }
    with engine.connect() as conn:
        stamped = conn.execute(
            sa.text("SELECT order_sn FROM orders WHERE cancelled_at IS NOT NULL")
        ).all()
    assert sorted(sn for (sn,) in stamped) == ["SN-A", "SN-B"]
    assert "action cancel: inventory.cancel replaces the built-in" in listener.text()
