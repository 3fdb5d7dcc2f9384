"""What stands between a web page in the operator's browser and the dashboard's actions.

* **Host check** (DNS rebinding): a page on `evil.example` whose name is made to resolve to
  the listener's address would otherwise be same-origin with the dashboard. Only IP
  literals, `localhost` and the names in DELAYQ_DASHBOARD_HOSTS are answered.
* **Token**: re-queue and delete need DELAYQ_DASHBOARD_TOKEN, typed into the form each
  time, compared in constant time. No token set: the actions are off.
* **CSRF**, double-submit: a random cookie (HttpOnly, SameSite=Strict) and the same value
  in a hidden form field, which another site can neither read nor set; and the POST's
  Origin (or, without one, its Referer) must be this dashboard's own.
* **Headers** on every response: no framing, a Content-Security-Policy that allows no
  inline script or style, no sniffing, no caching, no referrer outside the dashboard.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Iterable
from urllib.parse import urlsplit

from werkzeug.wrappers import Request, Response

#: Sent with every dashboard response, pages, static files and refusals alike.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
#: The double-submit cookie and the form field carrying its value.
CSRF_COOKIE = "delayq_csrf"
CSRF_FIELD = "csrf"
_CSRF_BYTES = 32


def host_name(host_header: str) -> str:
    """The name or address of a Host header, without its port: 'a.b:80' -> 'a.b',
    '[::1]:80' -> '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def host_allowed(host_header: str, allowed: Iterable[str]) -> bool:
    """An IP literal, `localhost`, or one of the `allowed` names (lower case)."""
    name = host_name(host_header)
    if not name:
        return False
    if name == "localhost" or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def csrf_value(request: Request) -> tuple[str, bool]:
    """The CSRF value for the forms of this response, and whether it is new (then the
    response sets the cookie). A cookie that is not one of ours is replaced."""
    given = request.cookies.get(CSRF_COOKIE, "")
    if len(given) == 43 and given.isascii() and given.replace("-", "").replace("_", "").isalnum():
        return given, False
    return secrets.token_urlsafe(_CSRF_BYTES), True


def set_csrf_cookie(response: Response, value: str, secure: bool) -> None:
    response.set_cookie(
        CSRF_COOKIE, value, httponly=True, samesite="Strict", secure=secure, path="/"
    )


def csrf_refusal(request: Request) -> str | None:
    """Why this POST is refused as a possible cross-site request, or None."""
    origin = request.headers.get("Origin")
    referer = request.headers.get("Referer")
    own = _origin(f"{request.scheme}://{request.host}")
    if origin is not None:
        if origin == "null" or _origin(origin) != own:
            return "the form was sent from another site (its Origin is not this dashboard)"
    elif referer is not None:
        if _origin(referer) != own:
            return "the form was sent from another site (its Referer is not this dashboard)"
    else:
        return "the request says neither where it comes from (Origin) nor which page sent it"
    cookie = request.cookies.get(CSRF_COOKIE, "")
    field = request.form.get(CSRF_FIELD, "")
    if not cookie or not field or not hmac.compare_digest(cookie.encode(), field.encode()):
        return "the form's CSRF token does not match this browser's: reload the page and retry"
    return None


def token_refusal(given: str, expected: str | None) -> str | None:
    """Why the dashboard token does not allow the action, or None."""
    if not expected:
        return "actions are off: set DELAYQ_DASHBOARD_TOKEN to re-queue or delete from here"
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return "wrong or missing dashboard token"
    return None


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of a URL, the scheme's default port filled in; None if it is
    not a URL."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.scheme.lower(), parts.hostname.lower(), port
