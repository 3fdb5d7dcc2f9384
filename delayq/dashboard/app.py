"""The dashboard's WSGI application: routes, rendering and the security checks around them.

    GET  /                      summary cards, chart, search box
    GET  /search?order=SN       an order's timers (one: straight to its page)
    GET  /timer?order=SN&action=A   one timer: state, claims, dead letters, outcomes
    GET  /pending, /in-flight, /dead   the lists, by due time, ?after=CURSOR
    GET  /outcomes              delayq_outcomes, ?action= &outcome= &since= &until= &after=
    POST /dead/requeue, /dead/delete   token + CSRF; scope=selected (ticked) or all
    GET  /static/NAME           the stylesheet and the script

Timers are named by query parameters, not path segments: an order id may be `..`, which a
browser would fold out of a path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import redis
from jinja2 import Environment, PackageLoader, StrictUndefined
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from delayq.dashboard import pages, security
from delayq.errors import InvalidInput, ServiceUnavailable
from delayq.timing import from_ms

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from delayq.listener import Listener

log = logging.getLogger("delayq.dashboard")

#: Seconds between reloads of the front page (by static/dashboard.js).
REFRESH_S = 5
#: What the dead-letter list says after an action, by the redirect's query parameter.
_NOTICES = {"requeued": "Re-queued {:,} dead letters.", "deleted": "Deleted {:,} dead letters."}
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


class _Request(Request):
    # The largest form is a page of ticked dead letters.
    max_content_length = 256 * 1024
    max_form_memory_size = 256 * 1024
    max_form_parts = 2 * pages.MAX_SELECTED


def make_dashboard(
    listener: Listener, *, token: str | None, allowed_hosts: Sequence[str] = ()
) -> WSGIApplication:
    """The dashboard of `listener` as a WSGI application. `token` (DELAYQ_DASHBOARD_TOKEN)
    allows re-queue and delete; `allowed_hosts` are the host names answered besides IP
    addresses and localhost (DELAYQ_DASHBOARD_HOSTS)."""
    return Dashboard(listener, token, allowed_hosts)


def _when(iso: str | None) -> str:
    """'2026-11-23T17:14:59.877000+00:00' -> '2026-11-23 17:14:59 UTC'."""
    return "" if not iso else iso[:19].replace("T", " ") + " UTC"


def _ms_when(ms: Any) -> str:
    """Milliseconds since the epoch (as dead-letter entries keep times) -> _when."""
    return _when(from_ms(int(ms)).isoformat()) if ms is not None else ""


def _count(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else str(value)


class Dashboard:
    def __init__(self, listener: Listener, token: str | None, allowed_hosts: Iterable[str]) -> None:
        self.listener = listener
        self.token = token or None
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self.env = Environment(
            loader=PackageLoader("delayq.dashboard"), autoescape=True, undefined=StrictUndefined
        )
        self.env.filters["when"] = _when
        self.env.filters["count"] = _count
        self.env.filters["ms_when"] = _ms_when
        static = resources.files("delayq.dashboard") / "static"
        self.static = {
            f.name: (f.read_bytes(), _STATIC_TYPES[f.name[f.name.rfind(".") :]])
            for f in static.iterdir()
            if f.name[f.name.rfind(".") :] in _STATIC_TYPES
        }
        get, post = ["GET", "HEAD"], ["POST"]
        self.url_map = Map(
            [
                Rule("/", endpoint=self.front, methods=get),
                Rule("/search", endpoint=self.search, methods=get),
                Rule("/timer", endpoint=self.timer, methods=get),
                *(
                    Rule(f"/{kind}", endpoint=self.listing, methods=get, defaults={"kind": kind})
                    for kind in pages.LISTS
                ),
                Rule("/outcomes", endpoint=self.outcomes, methods=get),
                Rule(
                    "/dead/requeue",
                    endpoint=self.dead_action,
                    methods=post,
                    defaults={"what": "requeue"},
                ),
                Rule(
                    "/dead/delete",
                    endpoint=self.dead_action,
                    methods=post,
                    defaults={"what": "delete"},
                ),
                Rule("/static/<name>", endpoint=self.static_file, methods=get),
            ],
            strict_slashes=False,
        )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = _Request(environ)
        response = self.respond(request)
        response.headers.update(security.HEADERS)
        return response(environ, start_response)

    def respond(self, request: Request) -> Response:
        if not security.host_allowed(request.host, self.allowed_hosts):
            host = request.host[:100]
            return _line(400, f"Host {host!r} is not allowed: add it to DELAYQ_DASHBOARD_HOSTS")
        adapter = self.url_map.bind_to_environ(request.environ)
        try:
            endpoint, args = adapter.match()
            handler: Callable[..., Response] = endpoint
            return handler(request, **args)
        except InvalidInput as exc:
            return _line(400, str(exc))
        except NotFound:
            return _line(404, "not found")
        except MethodNotAllowed as exc:
            response = _line(405, "method not allowed")
            response.headers["Allow"] = ", ".join(exc.valid_methods or ())
            return response
        except HTTPException as exc:  # a body too large, a malformed form
            return _line(exc.code or 400, exc.description or exc.name)
        except (redis.RedisError, ServiceUnavailable) as exc:
            return _line(503, pages.one_line(exc))

    # -- pages --------------------------------------------------------------------------

    def render(
        self, request: Request, template: str, status: int = 200, **context: Any
    ) -> Response:
        csrf, new = security.csrf_value(request)
        context = {"problems": [], "refresh_s": None, "order_sn": "", **context}
        html = self.env.get_template(template).render(
            csrf=csrf,
            csrf_field=security.CSRF_FIELD,
            actions_on=self.token is not None,
            as_of=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            path=request.path,
            **context,
        )
        response = Response(html, status=status, mimetype="text/html")
        if new:
            security.set_csrf_cookie(response, csrf, secure=request.scheme == "https")
        return response

    def front(self, request: Request) -> Response:
        return self.render(request, "front.html", refresh_s=REFRESH_S, **pages.front(self.listener))

    def search(self, request: Request) -> Response:
        order_sn = pages.order_sn_of(request.args.get("order", ""))
        hits, problems = pages.search(self.listener, order_sn)
        if len(hits) == 1 and not problems:
            return _redirect(_timer_url(order_sn, hits[0].action))
        return self.render(
            request, "search.html", order_sn=order_sn, hits=hits, problems=problems,
            timer_url=_timer_url,
        )  # fmt: skip

    def timer(self, request: Request) -> Response:
        order_sn = pages.order_sn_of(request.args.get("order", ""))
        action = pages.action_of(request.args.get("action", ""))
        return self.render(
            request, "timer.html", order_sn=order_sn, action=action,
            **pages.timer(self.listener, order_sn, action),
        )  # fmt: skip

    def listing(self, request: Request, kind: str) -> Response:
        after = pages.cursor_of(request.args)
        page = pages.listing(self.listener, kind, after)
        notice = ""
        for done, text in _NOTICES.items():
            n = request.args.get(done, "")
            # ASCII digits only: '²'.isdigit() is True, and int() refuses it.
            if n.isascii() and n.isdigit() and len(n) <= 9:
                notice = text.format(int(n))
        return self.render(
            request, "list.html", kind=kind, title=pages.LISTS[kind][0], page=page,
            after=after, notice=notice, timer_url=_timer_url,
            next_url=None if page.next is None else f"/{kind}?{urlencode({'after': page.next})}",
        )  # fmt: skip

    def outcomes(self, request: Request) -> Response:
        f = pages.outcome_filter(request.args)
        after = pages.cursor_of(request.args)
        problems: list[str] = []
        found: dict[str, Any] = {"rows": [], "next": None}
        status = 200
        try:
            found = pages.outcomes(self.listener, f, after)
        except ServiceUnavailable as exc:
            problems.append(str(exc))
            status = 503
        following = found["next"]
        return self.render(
            request, "outcomes.html", status, filter=f, rows=found["rows"], after=after,
            problems=problems, actions=pages.known_actions(self.listener), timer_url=_timer_url,
            next_url=None if following is None
            else f"/outcomes?{urlencode({**f.query(), 'after': following})}",
            first_url=f"/outcomes?{urlencode(f.query())}" if f.query() else "/outcomes",
        )  # fmt: skip

    # -- actions ------------------------------------------------------------------------

    def dead_action(self, request: Request, what: str) -> Response:
        refusal = security.csrf_refusal(request) or security.token_refusal(
            request.form.get("token", ""), self.token
        )
        if refusal:
            log.warning("dashboard %s refused: %s", what, refusal)
            return self.render(request, "refused.html", 403, what=what, reason=refusal)
        scope = request.form.get("scope", "selected")
        firings = pages.firings_of(request.form.getlist("firing"))
        if scope == "selected" and not firings:
            n = 0
        else:
            chosen = firings if scope == "selected" else []
            act = pages.requeue_dead if what == "requeue" else pages.delete_dead
            n = act(self.listener, chosen)
            log.info("dashboard %s: %d dead letters (%s)", what, n, scope)
        return _redirect(f"/dead?{what}d={n}")

    def static_file(self, request: Request, name: str) -> Response:
        found = self.static.get(name)
        if found is None:
            raise NotFound()
        return Response(found[0], content_type=found[1])


def _timer_url(order_sn: str, action: str) -> str:
    return f"/timer?{urlencode({'order': order_sn, 'action': action})}"


def _redirect(location: str) -> Response:
    return Response("", status=303, headers={"Location": location})


def _line(status: int, text: str) -> Response:
    """A refusal of a request as one line of text."""
    line = " ".join(text.split()) or "bad request"
    return Response(line + "\n", status=status, mimetype="text/plain")
