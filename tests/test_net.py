"""mailplat.net.writeNow on real TCP connections on 127.0.0.1."""

import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import Clock, deferLater
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial import unittest

from mailplat.net import IdleTimer, writeNow


class Keep(protocol.Protocol):
    def connectionMade(self):
        self.factory.connected.callback(self)


class KeepFactory(protocol.ServerFactory):
    protocol = Keep

    def __init__(self):
        self.connected = defer.Deferred()


class WriteNowTests(unittest.TestCase):
    @defer.inlineCallbacks
    def connect(self, wrap=False):
        inner = KeepFactory()
        factory = WrappingFactory(inner) if wrap else inner
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        server = yield inner.connected
        self.addCleanup(server.transport.loseConnection)
        return server, client

    def recvNow(self, client):
        """What the client can read without the reactor taking another turn."""
        try:
            return client.recv(65536)
        except BlockingIOError:
            return b""

    @defer.inlineCallbacks
    def test_sentBeforeTheReactorTurns(self):
        server, client = yield self.connect()
        writeNow(server.transport, b"+OK one\r\n")
        self.assertEqual(self.recvNow(client), b"+OK one\r\n")

    @defer.inlineCallbacks
    def test_throughAPassThroughWrapper(self):
        server, client = yield self.connect(wrap=True)
        self.assertIsInstance(server.transport, ProtocolWrapper)
        writeNow(server.transport, b"250 ok\r\n")
        self.assertEqual(self.recvNow(client), b"250 ok\r\n")

    @defer.inlineCallbacks
    def test_queuedBytesKeepTheirOrder(self):
        server, client = yield self.connect()
        server.transport.write(b"first ")
        writeNow(server.transport, b"second")
        self.assertEqual(self.recvNow(client), b"")  # both wait for the reactor
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.recvNow(client), b"first second")

    @defer.inlineCallbacks
    def test_aWrapperThatChangesWritesIsNotBypassed(self):
        server, client = yield self.connect()
        written = []

        class Changing(ProtocolWrapper):
            def write(self, data):
                written.append(data)

        wrapper = Changing(WrappingFactory(KeepFactory()), server)
        wrapper.transport = server.transport
        writeNow(wrapper, b"secret")
        self.assertEqual(written, [b"secret"])
        self.assertEqual(self.recvNow(client), b"")

    @defer.inlineCallbacks
    def test_largeWriteQueuesTheRest(self):
        server, client = yield self.connect()
        data = bytes(range(256)) * 40000  # 10 MB: more than the socket buffers hold
        writeNow(server.transport, data)
        got = bytearray()
        for _ in range(2000):
            got += self.recvNow(client)
            if len(got) >= len(data):
                break
            yield deferLater(reactor, 0.001, lambda: None)
        self.assertEqual(bytes(got), data)

    @defer.inlineCallbacks
    def test_nagleOffOnceUsed(self):
        # Two replies sent at once must not wait for the peer's delayed ACK.
        server, client = yield self.connect()
        sock = server.transport.getHandle()
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
        writeNow(server.transport, b"* 1 EXISTS\r\n")
        self.assertNotEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)


class IdleTimerTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.fired = []

    def timer(self, timeout):
        return IdleTimer(self.clock, timeout, lambda: self.fired.append(self.clock.seconds()))

    def test_expiresAfterTheTimeoutWithoutATouch(self):
        t = self.timer(30)
        t.touch()
        self.clock.advance(29.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [30])

    def test_touchStartsTheCountdownAgain(self):
        t = self.timer(30)
        t.touch()
        self.clock.advance(20)
        t.touch()
        self.clock.advance(20)
        self.assertEqual(self.fired, [])
        self.clock.advance(10)
        self.assertEqual(self.fired, [50])
        t.touch()  # after expiry: a new countdown
        self.clock.advance(30)
        self.assertEqual(self.fired, [50, 80])

    def test_cancelAndZero(self):
        t = self.timer(30)
        t.touch()
        t.cancel()
        t.cancel()
        self.clock.advance(100)
        never = self.timer(0)
        never.touch()
        self.clock.advance(10**6)
        self.assertEqual(self.fired, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
