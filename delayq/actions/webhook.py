"""The webhook action: DELAYQ_WEBHOOK_<ACTION>=https://... makes firing <action> POST

    {"order_sn": ..., "action": ..., "due_at": ..., "fired_at": ..., "attempt": ...,
     "idempotency_key": ...}

with `Idempotency-Key: <idempotency_key>` and, when DELAYQ_WEBHOOK_SECRET is set,
`X-Delayq-Signature: sha256=<hex HMAC-SHA256 of the body>`.

A 2xx is success. Connection errors, timeouts, 5xx, 408, 425 and 429 are retried with the
action's backoff; any other status (4xx, a redirect) will not get better by retrying and
dead-letters the firing at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from datetime import datetime

import httpx

from delayq.actions.core import APPLIED, Context, GiveUp, Result
from delayq.actions.registry import ActionSpec
from delayq.settings import Settings, mask_url

#: Statuses worth another try: the server is overloaded, restarting or asked us to wait.
RETRYABLE_STATUSES = frozenset({408, 425, 429})


class WebhookError(Exception):
    """A call that may succeed if tried again (connection, timeout, 5xx)."""


def sign(secret: str, body: bytes) -> str:
    """The X-Delayq-Signature header value of `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def body_of(ctx: Context) -> bytes:
    return json.dumps(
        {
            "order_sn": ctx.order_sn,
            "action": ctx.action,
            "due_at": _iso(ctx.due_at),
            "fired_at": _iso(ctx.fired_at),
            "attempt": ctx.attempt,
            "idempotency_key": ctx.idempotency_key,
        },
        separators=(",", ":"),
    ).encode()


class Webhook:
    """POSTs one firing to `url`; one pooled client per action (thread-safe)."""

    def __init__(self, url: str, secret: str | None) -> None:
        self.url = url
        self.masked = mask_url(url)
        self.secret = secret
        #: Pooled connections: the action's concurrency, told by warm_up.
        self.concurrency = 1
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                limits = httpx.Limits(
                    max_connections=self.concurrency, max_keepalive_connections=self.concurrency
                )
                from delayq import __version__

                self._client = httpx.Client(
                    limits=limits,
                    follow_redirects=False,
                    headers={"User-Agent": f"delayq/{__version__}"},
                )
            return self._client

    def __call__(self, ctx: Context) -> Result:
        body = body_of(ctx)
        headers = {"Content-Type": "application/json", "Idempotency-Key": ctx.idempotency_key}
        if self.secret:
            headers["X-Delayq-Signature"] = sign(self.secret, body)
        timeout = ctx.timeout_s or 10.0
        try:
            response = self.client.post(self.url, content=body, headers=headers, timeout=timeout)
        except httpx.TimeoutException:
            raise WebhookError(f"POST {self.masked}: no answer within {timeout:g} s") from None
        except httpx.HTTPError as exc:
            reason = (str(exc) or type(exc).__name__).replace(self.url, self.masked)
            raise WebhookError(f"POST {self.masked}: {reason.splitlines()[0]}") from None
        status = response.status_code
        if 200 <= status < 300:
            return Result(APPLIED, f"HTTP {status}")
        said = response.text[:120].replace("\n", " ").strip()
        what = f"POST {self.masked}: HTTP {status}" + (f" {said}" if said else "")
        if status >= 500 or status in RETRYABLE_STATUSES:
            raise WebhookError(what)
        if 300 <= status < 400:
            raise GiveUp(f"{what}: redirects are not followed; set the final URL")
        raise GiveUp(what)

    def warm_up(self, concurrency: int) -> None:
        """Make the client now, pooling a connection per call that may run at once: its
        TLS context takes ~80 ms, which the first firings would otherwise wait for
        (BENCHMARKS.md, issue 9)."""
        with self._lock:
            self.concurrency = concurrency
        _ = self.client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def webhook_action(name: str, url: str, settings: Settings) -> ActionSpec:
    """The action `name` as a webhook to `url` (DELAYQ_WEBHOOK_<NAME>)."""
    return ActionSpec(
        name=name,
        handler=Webhook(url, settings.webhook_secret),
        external=True,
        source=f"webhook {mask_url(url)}",
        summary=f"POST {mask_url(url)}",
    )


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
