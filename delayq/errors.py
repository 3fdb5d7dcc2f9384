"""Errors that end a command with one clear line instead of a traceback."""


class DelayqError(Exception):
    """Base class: the message is shown to the user as is, on one line."""

    exit_code = 1


class InvalidInput(DelayqError, ValueError):
    """An order id, action, duration, time or setting that cannot be used (also a
    ValueError, so code that validates input the usual way catches it)."""

    exit_code = 2


class ServiceUnavailable(DelayqError):
    """Redis or the database does not answer (the message names the masked URL)."""

    exit_code = 3


class NotReady(DelayqError):
    """A server answers but is not set up for delayq (notifications off, schema missing)."""

    exit_code = 4


class NotReplicated(ServiceUnavailable):
    """A write reached the primary, but fewer replicas than DELAYQ_WAIT_REPLICAS confirmed
    it in time: it would be lost if the primary failed over now."""
