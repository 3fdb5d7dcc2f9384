"""`delayq demo`: the product in one minute, on whatever settings are in force (by default
the embedded SQLite and Redis). Three orders get timers; one is paid, one has its timer
cancelled; the listener cancels the one left unpaid."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime

import sqlalchemy as sa

from delayq.context import Delayq
from delayq.db import orders_table, outcomes
from delayq.errors import DelayqError


def run_demo(dq: Delayq, *, delay_s: float, out: Callable[[str], None]) -> None:
    s = dq.settings
    _, after = dq.migrate()
    out(f"database {dq.engine.url.render_as_string(hide_password=True)} at schema {after}")
    for line in dq.check(configure_redis=True):
        out(line if line.startswith("warning:") else f"ok: {line}")

    stamp = datetime.now().strftime("%H%M%S")
    unpaid, paid, kept = (f"DEMO-{stamp}-{n}" for n in ("A", "B", "C"))
    orders = orders_table(s)
    key = orders.c[s.order_key_column]
    status = orders.c[s.status_column]
    with dq.engine.begin() as conn:
        conn.execute(
            sa.insert(orders),
            [
                {s.order_key_column: sn, s.status_column: s.status_unpaid}
                for sn in (unpaid, paid, kept)
            ],
        )
    out(f"created unpaid orders {unpaid}, {paid}, {kept}")
    for sn in (unpaid, paid, kept):
        due = dq.producer.schedule(sn, delay_s)
        out(f"  scheduled {sn}:cancel due {due.isoformat(timespec='milliseconds')}")

    with dq.engine.begin() as conn:
        conn.execute(sa.update(orders).where(key == paid).values({s.status_column: s.status_paid}))
    dq.producer.cancel(paid)
    out(f"{paid} was paid: its timer was cancelled")
    dq.producer.cancel(kept)
    out(f"{kept}: its timer was cancelled by hand (the order stays unpaid)")

    listener = dq.listener()
    thread = threading.Thread(target=listener.run, name="delayq-demo-listener", daemon=True)
    thread.start()
    out(f"listener running; waiting {delay_s:.1f} s for the timers to fall due ...")
    o = outcomes
    deadline = time.monotonic() + delay_s + 30
    try:
        while True:
            with dq.engine.connect() as conn:
                row = conn.execute(
                    sa.select(o.c.outcome, o.c.due_at, o.c.fired_at).where(o.c.order_sn == unpaid)
                ).first()
            if row is not None:
                break
            if time.monotonic() > deadline:
                raise DelayqError(f"the listener did not fire {unpaid} within {delay_s + 30:.0f} s")
            time.sleep(0.05)
    finally:
        listener.stop()
        thread.join(timeout=30)
    late_ms = (row.fired_at - row.due_at).total_seconds() * 1000
    out(f"fired {unpaid}:cancel -> {row.outcome}, {late_ms:.1f} ms after its due time")
    with dq.engine.connect() as conn:
        rows = conn.execute(
            sa.select(key, status).where(key.in_([unpaid, paid, kept])).order_by(key)
        )
        out("orders now:")
        for sn, st in rows:
            out(f"  {sn}  {st}")
