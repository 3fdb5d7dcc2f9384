"""The same with unittest: `python -m unittest test_orders_unittest` in this directory."""

from __future__ import annotations

import contextlib
import tempfile
import unittest

import shop
import sqlalchemy as sa

from delayq.testing import running


class OrderExpiryTest(unittest.TestCase):
    def setUp(self) -> None:
        stack = contextlib.ExitStack()
        self.addCleanup(stack.close)  # runs even when a test fails: Redis is stopped
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        url = f"sqlite:///{tmp}/shop.db"
        self.engine = sa.create_engine(url)
        stack.callback(self.engine.dispose)
        shop.metadata.create_all(self.engine)
        self.server = stack.enter_context(running(database_url=url, app="shop_timers"))
        stack.enter_context(self.server.use())

    def test_an_unpaid_order_is_cancelled(self) -> None:
        shop.create_order(self.engine, "SN1")
        fired = self.server.fire_due()
        self.assertIn(
            ("SN1", "cancel", "applied"), [(f.order_sn, f.action, f.outcome) for f in fired]
        )
        self.assertEqual(shop.status(self.engine, "SN1"), "cancelled")

    def test_a_paid_order_stays_paid(self) -> None:
        shop.create_order(self.engine, "SN2")
        shop.pay(self.engine, "SN2")
        self.assertEqual(self.server.fire_due(), [])
        self.assertEqual(shop.status(self.engine, "SN2"), "paid")


if __name__ == "__main__":
    unittest.main()
