"""The `delayq` command's entry point: one clear line, not an ImportError, when the
command runs on a producer-only install (plain `pip install delayq`)."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from delayq.cli import main as cli_main
    except ModuleNotFoundError as exc:
        print(
            f"delayq: error: the delayq command needs the listener extra ({exc.name} is "
            "not installed): pip install 'delayq[listener]'",
            file=sys.stderr,
        )
        sys.exit(4)
    cli_main()
