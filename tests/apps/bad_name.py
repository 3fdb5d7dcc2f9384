"""Wrong on purpose: an action name with a capital and a space."""

from __future__ import annotations

import delayq


@delayq.action("Bad Name")
def bad_name(ctx: delayq.Context) -> None:
    pass
