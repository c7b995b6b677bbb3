"""Tests for mailplat.http.site: /healthz, /metrics, / and the errors around them."""

import json
import urllib.error
import urllib.request

from twisted.internet import defer, reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailplat.http.site import makeSite
from mailplat.metrics import Metrics


def exchange(site, method=b"GET", path=b"/", headers=b""):
    """Send one HTTP/1.1 request through a StringTransport; return (code, headers, body)."""
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"%s %s HTTP/1.1\r\nHost: localhost\r\n%s\r\n" % (method, path, headers))
    raw = transport.value()
    channel.connectionLost(Failure(ConnectionDone()))
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    code = int(lines[0].split(b" ")[1])
    parsed = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        parsed[name.strip().lower()] = value.strip()
    return code, parsed, body


class SiteTests(unittest.TestCase):
    def setUp(self):
        self.metrics = Metrics()
        self.metrics.sessionOpened("pop3")
        self.metrics.inc("mailplat_auth_failures_total", protocol="smtp")

    def test_healthz_ok_without_checks(self):
        code, headers, body = exchange(makeSite(metrics=self.metrics), path=b"/healthz")
        self.assertEqual(code, 200)
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertEqual(headers[b"cache-control"], b"no-store")
        self.assertEqual(json.loads(body), {"status": "ok", "checks": {}})
        self.assertEqual(int(headers[b"content-length"]), len(body))

    def test_healthz_ok_with_checks(self):
        site = makeSite(metrics=self.metrics, health=lambda: {"store": True, "queue": True, "queued": 3})
        code, _, body = exchange(site, path=b"/healthz")
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body), {"status": "ok", "checks": {"store": True, "queue": True, "queued": 3}})

    def test_healthz_unavailable(self):
        site = makeSite(metrics=self.metrics, health=lambda: {"store": True, "queue": False})
        code, headers, body = exchange(site, path=b"/healthz")
        self.assertEqual(code, 503)
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertEqual(json.loads(body), {"status": "unavailable", "checks": {"store": True, "queue": False}})

    def test_healthz_failing_check_does_not_leak(self):
        def health():
            raise RuntimeError("password=hunter2 at /etc/secret")

        code, _, body = exchange(makeSite(metrics=self.metrics, health=health), path=b"/healthz")
        self.assertEqual(code, 503)
        self.assertEqual(json.loads(body)["status"], "unavailable")
        self.assertNotIn(b"hunter2", body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_metrics(self):
        code, headers, body = exchange(makeSite(metrics=self.metrics), path=b"/metrics")
        self.assertEqual(code, 200)
        self.assertEqual(headers[b"content-type"], b"text/plain; version=0.0.4; charset=utf-8")
        self.assertEqual(body, self.metrics.render())
        self.assertIn(b'mailplat_sessions_active{protocol="pop3"} 1\n', body)
        self.assertIn(b'mailplat_auth_failures_total{protocol="smtp"} 1\n', body)

    def test_metrics_are_live(self):
        site = makeSite(metrics=self.metrics)
        self.metrics.sessionClosed("pop3")
        _, _, body = exchange(site, path=b"/metrics")
        self.assertIn(b'mailplat_sessions_active{protocol="pop3"} 0\n', body)

    def test_metrics_add_other_processes(self):
        # A worker pool adds its workers' values to the main process's own.
        other = Metrics()
        other.sessionOpened("imap")
        other.sessionOpened("pop3")
        source = other.snapshot
        self.metrics.addSource(source)
        _, _, body = exchange(makeSite(metrics=self.metrics), path=b"/metrics")
        self.assertIn(b'mailplat_sessions_active{protocol="pop3"} 2\n', body)
        self.assertIn(b'mailplat_sessions_active{protocol="imap"} 1\n', body)
        self.metrics.removeSource(source)
        _, _, body = exchange(makeSite(metrics=self.metrics), path=b"/metrics")
        self.assertIn(b'mailplat_sessions_active{protocol="pop3"} 1\n', body)

    def test_index(self):
        code, headers, body = exchange(makeSite(metrics=self.metrics), path=b"/")
        self.assertEqual(code, 200)
        self.assertEqual(headers[b"content-type"], b"text/html; charset=utf-8")
        self.assertIn(b"<title>mailplat</title>", body)
        self.assertIn(b'href="/healthz"', body)
        self.assertIn(b'href="/metrics"', body)
        self.assertEqual(headers[b"server"], b"mailplat")

    def test_query_string_is_ignored(self):
        code, _, body = exchange(makeSite(metrics=self.metrics), path=b"/healthz?verbose=1")
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body)["status"], "ok")

    def test_not_found(self):
        site = makeSite(metrics=self.metrics)
        for path in (b"/nope", b"/healthz/", b"/metrics/x", b"/index.html", b"//healthz"):
            code, headers, body = exchange(site, path=path)
            self.assertEqual(code, 404, path)
            self.assertEqual(body, b"Not Found\n")

    def test_method_not_allowed(self):
        site = makeSite(metrics=self.metrics)
        for method, path in ((b"POST", b"/healthz"), (b"PUT", b"/metrics"), (b"DELETE", b"/"), (b"POST", b"/nope")):
            code, headers, _ = exchange(site, method=method, path=path, headers=b"Content-Length: 0\r\n")
            self.assertEqual(code, 405, (method, path))
            self.assertEqual(headers[b"allow"], b"GET, HEAD")

    def test_head(self):
        site = makeSite(metrics=self.metrics)
        _, getHeaders, getBody = exchange(site, path=b"/metrics")
        code, headers, body = exchange(site, method=b"HEAD", path=b"/metrics")
        self.assertEqual(code, 200)
        self.assertEqual(body, b"")
        self.assertEqual(headers[b"content-type"], getHeaders[b"content-type"])
        self.assertEqual(int(headers[b"content-length"]), len(getBody))

    def test_no_tracebacks(self):
        class Broken(Metrics):
            def render(self):
                raise ValueError("internal detail /var/lib/mailplat")

        site = makeSite(metrics=Broken())
        self.assertFalse(site.displayTracebacks)
        code, _, body = exchange(site, path=b"/metrics")
        self.assertEqual(code, 500)
        self.assertNotIn(b"internal detail", body)
        self.assertNotIn(b"Traceback", body)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class ListenerTests(unittest.TestCase):
    """The site on a real listener on 127.0.0.1, fetched with urllib."""

    @defer.inlineCallbacks
    def test_urllib(self):
        metrics = Metrics()
        metrics.sessionOpened("imap")
        healthy = {"store": True}
        site = makeSite(metrics=metrics, health=lambda: dict(healthy))
        lost = []
        build = site.buildProtocol

        def buildProtocol(addr):
            channel = build(addr)
            done = defer.Deferred()
            lost.append(done)
            original = channel.connectionLost

            def connectionLost(reason):
                original(reason)
                done.callback(None)

            channel.connectionLost = connectionLost
            return channel

        site.buildProtocol = buildProtocol
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = "http://127.0.0.1:%d" % port.getHost().port

        def fetch(path, method="GET"):
            req = urllib.request.Request(base + path, method=method)
            try:
                with urllib.request.urlopen(req, timeout=10) as response:
                    return response.status, response.headers.get("Content-Type"), response.read()
            except urllib.error.HTTPError as e:
                with e:
                    return e.code, e.headers.get("Allow") or e.headers.get("Content-Type"), e.read()

        def client():
            results = [fetch("/healthz"), fetch("/metrics"), fetch("/"), fetch("/missing"), fetch("/", "POST")]
            healthy["store"] = False
            results.append(fetch("/healthz"))
            return results

        results = yield threads.deferToThread(client)
        yield defer.DeferredList(lost)
        health, metricsPage, index, missing, post, unhealthy = results
        self.assertEqual(health[:2], (200, "application/json"))
        self.assertEqual(json.loads(health[2])["status"], "ok")
        self.assertEqual(metricsPage[:2], (200, "text/plain; version=0.0.4; charset=utf-8"))
        self.assertIn(b'mailplat_sessions_total{protocol="imap"} 1', metricsPage[2])
        self.assertEqual(index[0], 200)
        self.assertIn(b"mailplat", index[2])
        self.assertEqual(missing[0], 404)
        self.assertEqual(post[:2], (405, "GET, HEAD"))
        self.assertEqual(unhealthy[0], 503)
        self.assertEqual(json.loads(unhealthy[2]), {"status": "unavailable", "checks": {"store": False}})
