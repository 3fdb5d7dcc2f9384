"""The listener's dashboard: pages an operator works in, served by `delayq listen --http`
(delayq/web.py mounts it for every path but /metrics and the probes).

    app.py        routes, rendering, and the checks wrapped around every request
    security.py   Host check, dashboard token, CSRF, security headers
    pages.py      what each page reads (bounded, through delayq.browse and delayq.db)
    chart.py      the last hour's lateness and firings, as SVG geometry
    templates/    Jinja2 templates (autoescaped)
    static/       the stylesheet and the one script (no inline script or style)

docs/dashboard.md describes the pages and the security model.
"""

from delayq.dashboard.app import make_dashboard

__all__ = ["make_dashboard"]
