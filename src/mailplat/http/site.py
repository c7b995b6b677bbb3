"""
The HTTP endpoints every mailplat deployment has from day one:

- C{GET /healthz}: a JSON health report for load balancers and orchestrators.
  200 with C{{"status": "ok", "checks": {...}}} when every component check
  passes, 503 with C{"status": "unavailable"} when any check is C{False} or
  the checks themselves fail.
- C{GET /metrics}: the counters of L{mailplat.metrics.Metrics} in the
  Prometheus text exposition format, version 0.0.4.
- C{GET /}: a small HTML page naming the service and linking to both.

Anything else is 404; methods other than GET and HEAD get 405 with an
C{Allow} header (RFC 9110 section 15.5.6).  HEAD answers with the headers,
including C{Content-Length}, of the GET (RFC 9110 section 9.3.2).  Errors
never show a traceback to the client (C{displayTracebacks = False}); the
reason goes to the log.  The C{Server} header names mailplat without a
version.
"""

from __future__ import annotations

import json


from mailplat.log import Logger
from twisted.web import resource, server

_log = Logger()

PROMETHEUS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE = b"application/json"
HTML_CONTENT_TYPE = b"text/html; charset=utf-8"
TEXT_CONTENT_TYPE = b"text/plain; charset=utf-8"

ALLOWED_METHODS = (b"GET", b"HEAD")

INDEX_PAGE = b"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>mailplat</title>
</head>
<body>
<h1>mailplat</h1>
<p>This host runs mailplat, a mail platform (SMTP, IMAP, POP3 and HTTP).</p>
<ul>
<li><a href="/healthz">/healthz</a> &mdash; health of the service (JSON)</li>
<li><a href="/metrics">/metrics</a> &mdash; metrics in the Prometheus text format</li>
</ul>
</body>
</html>
"""


class DayOneResource(resource.Resource):
    """
    The root resource: it dispatches on the whole path itself so that no
    other URL (C{/healthz/}, C{/metrics/x}, ...) is accidentally served.
    """

    isLeaf = True

    def __init__(self, metrics, health=None):
        super().__init__()
        self._metrics = metrics
        self._health = health
        self._routes = {
            b"/": self._index,
            b"/healthz": self._healthz,
            b"/metrics": self._metricsPage,
        }

    def render(self, request):
        request.setHeader(b"server", b"mailplat")
        request.setHeader(b"x-content-type-options", b"nosniff")
        if request.method not in ALLOWED_METHODS:
            request.setResponseCode(405)
            request.setHeader(b"allow", b", ".join(ALLOWED_METHODS))
            return self._send(request, TEXT_CONTENT_TYPE, b"Method Not Allowed\n")
        handler = self._routes.get(request.path)
        if handler is None:
            request.setResponseCode(404)
            return self._send(request, TEXT_CONTENT_TYPE, b"Not Found\n")
        return handler(request)

    def _send(self, request, contentType, body):
        request.setHeader(b"content-type", contentType)
        if request.method == b"HEAD":
            request.setHeader(b"content-length", b"%d" % len(body))
            return b""
        return body

    def _index(self, request):
        return self._send(request, HTML_CONTENT_TYPE, INDEX_PAGE)

    def _healthz(self, request):
        request.setHeader(b"cache-control", b"no-store")
        checks = {}
        healthy = True
        if self._health is not None:
            try:
                checks = dict(self._health())
            except Exception:
                _log.failure("Health check failed")
                checks = {"health": False}
            healthy = not any(value is False for value in checks.values())
        report = {"status": "ok" if healthy else "unavailable", "checks": checks}
        body = json.dumps(report, sort_keys=True, default=str).encode("utf-8") + b"\n"
        if not healthy:
            request.setResponseCode(503)
        return self._send(request, JSON_CONTENT_TYPE, body)

    def _metricsPage(self, request):
        request.setHeader(b"cache-control", b"no-store")
        return self._send(request, PROMETHEUS_CONTENT_TYPE, self._metrics.render())


def makeSite(*, metrics, health=None) -> server.Site:
    """
    The day-one site.

    @param metrics: a L{mailplat.metrics.Metrics} whose C{render()} is served
        at C{/metrics}.
    @param health: C{None}, or a callable with no arguments that returns a
        dict of component checks (name -> C{True}/C{False} or any
        JSON-friendly detail); a value C{False} makes C{/healthz} answer 503.
    """
    site = server.Site(DayOneResource(metrics, health))
    site.displayTracebacks = False
    return site
