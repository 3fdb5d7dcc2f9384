"""`python -m delayq`: the same command line as `delayq`."""

from delayq.cli import main

main()
