"""Wrong on purpose: two handlers for one action."""

from __future__ import annotations

import delayq


@delayq.action("gift_wrap")
def gift_wrap(ctx: delayq.Context) -> None:
    pass


@delayq.action("gift_wrap")
def gift_wrap_again(ctx: delayq.Context) -> None:
    pass
