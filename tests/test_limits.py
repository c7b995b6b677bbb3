"""Connection limits in front of a listener, with real sockets on 127.0.0.1."""

import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailplat.limits import REFUSALS, LimitedFactory


class Greeter(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"* OK hello\r\n")


class LimitTests(unittest.TestCase):
    def setUp(self):
        inner = protocol.ServerFactory.forProtocol(Greeter)
        self.factory = LimitedFactory(inner, "imap", perPeer=2, total=3)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.sockets = []
        self.addCleanup(lambda: [s.close() for s in self.sockets])

    def connect(self):
        def go():
            s = socket.create_connection(("127.0.0.1", self.port.getHost().port), timeout=5)
            self.sockets.append(s)
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = s.recv(100)
                if not chunk:
                    break
                data += chunk
            return data

        return deferToThread(go)

    @defer.inlineCallbacks
    def waitForCount(self, n):
        for _ in range(200):
            if self.factory.count == n:
                return
            yield deferToThread(lambda: __import__("time").sleep(0.01))
        self.fail(f"count stayed {self.factory.count}, expected {n}")

    @defer.inlineCallbacks
    def test_perPeerLimitAnswersInTheProtocol(self):
        self.assertEqual((yield self.connect()), b"* OK hello\r\n")
        self.assertEqual((yield self.connect()), b"* OK hello\r\n")
        self.assertEqual((yield self.connect()), REFUSALS["imap"])
        yield self.waitForCount(2)
        self.sockets[0].close()
        yield self.waitForCount(1)
        self.assertEqual((yield self.connect()), b"* OK hello\r\n", "a freed slot can be used again")


def test_connectionCounter():
    from mailplat.limits import ConnectionCounter
    from mailplat.metrics import Metrics

    m = Metrics()
    c = ConnectionCounter("imap", perPeer=2, total=3, metrics=m)
    assert c.admit("a") and c.admit("a")
    assert not c.admit("a")
    assert c.admit("b")
    assert not c.admit("c")  # three in all
    assert m.get("mailplat_connections_refused_total", protocol="imap") == 2
    c.release("a")
    assert c.byPeer == {"a": 1, "b": 1} and c.count == 2
    assert c.admit("c")
    c.release("b")
    assert "b" not in c.byPeer
