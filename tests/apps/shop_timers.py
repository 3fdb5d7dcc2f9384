"""A shop's own timer actions, as a user would write them, steered by the test that runs
the listener.

Every handler writes its effect to `shop_effects` through `ctx.connection`: the effect
commits with the firing's outcome row, or is rolled back with it. Every call is also
appended to the file named by SHOP_TEST_CALL_LOG, which no rollback undoes, so a test can
count calls and the attempt numbers they saw (and, by pid, which listener made them).

Knobs (environment of the listener):

* SHOP_TEST_FAIL_ATTEMPTS=N: `charge_retry` raises on attempts 1..N.
* SHOP_TEST_BAD_ORDERS=SN,SN: `charge_retry` always raises for these orders.
* SHOP_TEST_GATE=PATH: `close_auction` waits, after writing its effects, until PATH
  exists when its batch holds an order whose number starts with HOLD-.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import sqlalchemy as sa

import delayq

EFFECTS = "shop_effects"
BATCH_CALLS = "shop_batch_calls"
#: How long `close_auction` waits for its gate at most (the test kills it long before).
GATE_TIMEOUT_S = 120.0

_insert_effect = sa.text(
    f"INSERT INTO {EFFECTS} (order_sn, action, attempt, idempotency_key, fired_at,"
    " in_transaction, pid) VALUES (:order_sn, :action, :attempt, :idempotency_key,"
    " :fired_at, :in_transaction, :pid)"
)


def _record_call(ctx: delayq.Context) -> None:
    path = os.environ.get("SHOP_TEST_CALL_LOG")
    if path:
        # One short write in append mode: lines of concurrent calls never interleave.
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{ctx.action} {ctx.order_sn} {ctx.attempt} {os.getpid()}\n")


def _write_effect(ctx: delayq.Context) -> None:
    conn = ctx.connection
    assert conn is not None, "a database handler runs in the listener's transaction"
    conn.execute(
        _insert_effect,
        {
            "order_sn": ctx.order_sn,
            "action": ctx.action,
            "attempt": ctx.attempt,
            "idempotency_key": ctx.idempotency_key,
            "fired_at": ctx.fired_at.replace(tzinfo=None).isoformat(),
            "in_transaction": conn.in_transaction(),
            "pid": os.getpid(),
        },
    )


def _effect(ctx: delayq.Context) -> None:
    _record_call(ctx)
    _write_effect(ctx)


@delayq.action("release_stock", tables=[EFFECTS])
def release_stock(ctx: delayq.Context) -> None:
    """Returns nothing: recorded as `applied`."""
    _effect(ctx)


@delayq.action("award_points", tables=[EFFECTS])
def award_points(ctx: delayq.Context) -> str:
    """Names its own outcome."""
    _effect(ctx)
    return "points_awarded"


@delayq.action("notify_buyer", tables=[EFFECTS])
def notify_buyer(ctx: delayq.Context) -> delayq.Result:
    """An outcome with a detail."""
    _effect(ctx)
    return delayq.Result("notified", f"sms to the buyer of {ctx.order_sn}")


@delayq.action("expire_coupons", batch=True, tables=[EFFECTS, BATCH_CALLS])
def expire_coupons(contexts: list[delayq.Context]) -> None:
    """A batch handler: records how many firings each call was given."""
    for ctx in contexts:
        _effect(ctx)
    conn = contexts[0].connection
    assert conn is not None
    conn.execute(sa.text(f"INSERT INTO {BATCH_CALLS} (size) VALUES (:n)"), {"n": len(contexts)})


@delayq.action("charge_retry", tables=[EFFECTS])
def charge_retry(ctx: delayq.Context) -> None:
    """Fails as the knobs say, after writing its effect (which is then rolled back)."""
    _effect(ctx)
    if ctx.attempt <= int(os.environ.get("SHOP_TEST_FAIL_ATTEMPTS", "0")):
        raise RuntimeError(f"payment gateway timed out on attempt {ctx.attempt}")
    if ctx.order_sn in os.environ.get("SHOP_TEST_BAD_ORDERS", "").split(","):
        raise RuntimeError(f"card of {ctx.order_sn} declined")


@delayq.action("refund_deposit", tables=[EFFECTS])
def refund_deposit(ctx: delayq.Context) -> None:
    """Always fails."""
    _effect(ctx)
    raise RuntimeError("bank refused the refund")


@delayq.action("ship_reminder", tables=[EFFECTS])
def ship_reminder(ctx: delayq.Context) -> None:
    """Decides, after writing, that there is nothing to do."""
    _effect(ctx)
    raise delayq.Skip("order already shipped")


@delayq.action("close_auction", batch=True, tables=[EFFECTS])
def close_auction(contexts: list[delayq.Context]) -> None:
    """Writes its effects, then may wait for the gate: the test kills the listener there."""
    for ctx in contexts:
        _effect(ctx)
    gate = os.environ.get("SHOP_TEST_GATE")
    if gate and any(c.order_sn.startswith("HOLD-") for c in contexts):
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while not Path(gate).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
