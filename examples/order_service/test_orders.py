"""The shop's order expiry, tested with pytest and delayq.testing's `delayq_server`."""

from __future__ import annotations

import shop
from sqlalchemy.engine import Engine

from delayq.testing import TimerTestServer


def test_an_unpaid_order_is_cancelled_when_its_payment_window_ends(
    engine: Engine, delayq_server: TimerTestServer
) -> None:
    shop.create_order(engine, "SN1")

    fired = delayq_server.fire_due()

    assert shop.status(engine, "SN1") == "cancelled"
    assert [(f.order_sn, f.action, f.outcome) for f in fired] == [
        ("SN1", "remind", "reminded"),  # due first: after 15 minutes
        ("SN1", "cancel", "applied"),
    ]
    assert delayq_server.pending() == []


def test_a_paid_order_is_never_cancelled(engine: Engine, delayq_server: TimerTestServer) -> None:
    shop.create_order(engine, "SN2")
    assert shop.pay(engine, "SN2")

    assert delayq_server.pending() == []
    assert delayq_server.fire_due() == []
    assert shop.status(engine, "SN2") == "paid"


def test_the_buyer_is_reminded_before_the_order_is_cancelled(
    engine: Engine, delayq_server: TimerTestServer
) -> None:
    shop.create_order(engine, "SN3")

    fired = delayq_server.fire_due(within="16m")  # the reminder is due, the cancel not yet

    assert [(f.action, f.outcome) for f in fired] == [("remind", "reminded")]
    assert shop.reminders_sent(engine, "SN3") == 1
    assert shop.status(engine, "SN3") == "unpaid"
    assert [(t.order_sn, t.action) for t in delayq_server.pending()] == [("SN3", "cancel")]


def test_an_order_paid_after_the_reminder_stays_paid(
    engine: Engine, delayq_server: TimerTestServer
) -> None:
    shop.create_order(engine, "SN4")
    delayq_server.fire_due(within="16m")
    assert shop.pay(engine, "SN4")

    assert delayq_server.fire_due() == []
    assert shop.status(engine, "SN4") == "paid"


def test_an_order_cancelled_by_its_timer_cannot_be_paid(
    engine: Engine, delayq_server: TimerTestServer
) -> None:
    shop.create_order(engine, "SN5")
    delayq_server.fire_due()

    assert not shop.pay(engine, "SN5")
    assert shop.status(engine, "SN5") == "cancelled"
