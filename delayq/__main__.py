"""`python -m delayq`: the same command as `delayq` (same entry point, so a producer-only
install gets the same one-line 'needs delayq[listener]' error)."""

from delayq.entry import main

if __name__ == "__main__":
    main()
