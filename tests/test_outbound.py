"""
The outbound client and transport against real SMTP servers on 127.0.0.1:
mailplat's own SMTP server (for the success paths) and a scripted server
(for every kind of failure), with MX records from a test DNS server.
"""

import random

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineReceiver
from twisted.trial import unittest

from mailplat.dns import MailResolver
from mailplat.outbound.client import Recipient, SMTPProtocolError, dotStuff
from mailplat.outbound.transport import DomainPolicy, OutboundSettings, OutboundTransport
from mailplat.smtp.server import SMTPFactory
from mailplat.testing import MemoryQueue, StaticRouter, memoryPortal

from dnsserver import DNSTestServer

MSG = b"From: a@example.org\r\nTo: x@good.test\r\nSubject: out\r\n\r\n.leading dot\r\nbody\r\n"


class Scripted(LineReceiver):
    """An SMTP server that answers from a script: a dict verb -> reply (or a callable)."""

    delimiter = b"\r\n"

    def connectionMade(self):
        self.factory.connections += 1
        self.inData = False
        self.data = []
        self.sendLine(self.factory.script.get("greeting", b"220 scripted ESMTP"))

    def lineReceived(self, line):
        self.factory.log.append(line)
        if self.inData:
            if line == b".":
                self.inData = False
                self.factory.messages.append(b"\r\n".join(self.data) + b"\r\n")
                self.data = []
                self.sendLine(self.factory.script.get("end", b"250 2.0.0 ok"))
            else:
                self.data.append(line[1:] if line.startswith(b".") else line)
            return
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        if verb == b"BDAT":
            size = int(line.split()[1])
            self.setRawMode()
            self._bdat = (size, b"")
            return
        reply = self.factory.script.get(verb.decode(), b"250 2.0.0 ok")
        if callable(reply):
            reply = reply(line)
        if verb == b"DATA" and reply.startswith(b"354"):
            self.inData = True
        self.sendLine(reply)
        if verb == b"QUIT":
            self.transport.loseConnection()

    def rawDataReceived(self, data):
        size, got = self._bdat
        got += data
        if len(got) >= size:
            self.factory.messages.append(got[:size])
            rest = got[size:]
            self.setLineMode(rest)
            self.sendLine(self.factory.script.get("end", b"250 2.0.0 ok"))
        else:
            self._bdat = (size, got)


class ScriptedFactory(protocol.ServerFactory):
    protocol = Scripted

    def __init__(self, script):
        self.script = script
        self.log = []
        self.messages = []
        self.connections = 0


class OutboundTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.queue = MemoryQueue()
        router = StaticRouter(domains=["good.test", "multi.test", "reuse.test"],
                              users=["x@good.test", "y@good.test", "m@multi.test", "r@reuse.test"])
        good = SMTPFactory(hostname="mx.good.test", portal=memoryPortal({}), router=router, queue=self.queue,
                           reactor=reactor)
        self.goodPort = reactor.listenTCP(0, good, interface="127.0.0.1")
        self.addCleanup(self.goodPort.stopListening)
        self.port = self.goodPort.getHost().port
        self.zone = {
            "good.test": [("MX", 10, "mx.good.test")],
            "mx.good.test": [("A", "127.0.0.1")],
            "multi.test": [("MX", 10, "dead.multi.test"), ("MX", 20, "mx.good.test")],
            "dead.multi.test": [("A", "127.0.0.2")],
            "reuse.test": [("MX", 10, "mx.good.test")],
            "null.test": [("MX", 0, "")],
            "loop.test": [("MX", 10, "me.example.org")],
        }
        self.dns = DNSTestServer(self.zone)
        dnsPort = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.resolver = MailResolver(servers=[("127.0.0.1", dnsPort)], reactor=reactor, timeout=(2,),
                                     randomSource=random.Random(1))

    def transport(self, **kw):
        settings = OutboundSettings(heloName="me.example.org", port=self.port, connectTimeout=2,
                                    ownNames=frozenset({"me.example.org"}), **kw)
        t = OutboundTransport(self.resolver, settings, reactor)
        self.addCleanup(t.close)
        return t

    @defer.inlineCallbacks
    def test_deliversThroughMX(self):
        t = self.transport()
        results = yield t.deliver("a@example.org", [Recipient("x@good.test"), Recipient("nobody@good.test")], MSG)
        self.assertEqual([r.state for r in results], ["delivered", "failed"])
        self.assertEqual(results[1].status, "5.1.1")
        self.assertIn("550", results[1].diagnostic)
        self.assertEqual(results[0].remoteMTA, "mx.good.test")
        [(qid, envelope, content)] = self.queue.committed
        self.assertEqual(envelope.sender, "a@example.org")
        self.assertEqual(envelope.recipients, ("x@good.test",))
        self.assertTrue(content.endswith(MSG), "content arrives byte-exact after the Received: header")

    @defer.inlineCallbacks
    def test_eightBitAndReuse(self):
        t = self.transport()
        eight = "Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode()
        yield t.deliver("a@example.org", [Recipient("x@good.test")], eight)
        yield t.deliver("a@example.org", [Recipient("r@reuse.test")], MSG)
        self.assertTrue(self.queue.committed[0][2].endswith(eight))
        self.assertEqual(self.queue.committed[0][1].mailParams.get("BODY"), "8BITMIME")
        self.assertEqual(len(self.queue.committed), 2)

    @defer.inlineCallbacks
    def test_nextMXWhenTheFirstIsDown(self):
        t = self.transport()
        [r] = yield t.deliver("a@example.org", [Recipient("m@multi.test")], MSG)
        self.assertEqual(r.state, "delivered")

    @defer.inlineCallbacks
    def test_nullMXAndLoopAndNoDomain(self):
        t = self.transport()
        [r] = yield t.deliver("a@example.org", [Recipient("x@null.test")], MSG)
        self.assertEqual((r.state, r.status), ("failed", "5.1.10"))
        [r] = yield t.deliver("a@example.org", [Recipient("x@loop.test")], MSG)
        self.assertEqual((r.state, r.status), ("failed", "5.4.6"))
        [r] = yield t.deliver("a@example.org", [Recipient("x@nonexistent.test")], MSG)
        self.assertEqual((r.state, r.status), ("failed", "5.1.2"))

    @defer.inlineCallbacks
    def scripted(self, script, recipients, content=MSG, **kw):
        factory = ScriptedFactory(script)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        t = self.transport(smarthost=f"127.0.0.1:{port.getHost().port}", **kw)
        results = yield t.deliver("a@example.org", recipients, content, **{
            k: v for k, v in (("ret", "HDRS"), ("envid", "E1")) if script.get("_dsn")})
        return factory, results

    @defer.inlineCallbacks
    def test_perRecipientAnswers(self):
        def rcpt(line):
            if b"<bad@" in line:
                return b"550 5.1.1 unknown"
            if b"<later@" in line:
                return b"452 4.2.2 mailbox full"
            return b"250 2.1.5 ok"

        factory, results = yield self.scripted(
            {"EHLO": b"250-scripted\r\n250 PIPELINING", "RCPT": rcpt, "DATA": b"354 go"},
            [Recipient("ok@far.test"), Recipient("bad@far.test"), Recipient("later@far.test")])
        self.assertEqual([(r.state, r.status) for r in results],
                         [("delivered", "2.0.0"), ("failed", "5.1.1"), ("deferred", "4.2.2")])
        self.assertEqual(factory.messages, [MSG])
        # Pipelined: MAIL, three RCPTs and DATA arrived before the first reply was read.
        verbs = [l.split(b" ")[0].split(b":")[0] for l in factory.log if not l.startswith((b"From", b"To", b"Sub"))]
        self.assertEqual(verbs[:6], [b"EHLO", b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"DATA"])

    @defer.inlineCallbacks
    def test_refusedDataResetsTheTransactionBeforeTheConnectionIsReused(self):
        """RFC 5321 §4.1.1.5: MAIL and RCPT were accepted, DATA was not: RSET before the next MAIL."""
        factory = ScriptedFactory({"EHLO": b"250-scripted\r\n250 PIPELINING", "DATA": b"451 4.3.0 not now"})
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        t = self.transport(smarthost=f"127.0.0.1:{port.getHost().port}")
        [r] = yield t.deliver("a@example.org", [Recipient("one@far.test")], MSG)
        self.assertEqual((r.state, r.status), ("deferred", "4.3.0"))
        factory.script["DATA"] = b"354 go"
        [r] = yield t.deliver("a@example.org", [Recipient("two@far.test")], MSG)
        self.assertEqual(r.state, "delivered")
        self.assertEqual(factory.connections, 1, "the connection was reused")
        verbs = [l.split(b" ")[0].split(b":")[0] for l in factory.log if l[:4] in (b"MAIL", b"RCPT", b"DATA", b"RSET")]
        self.assertEqual(verbs, [b"MAIL", b"RCPT", b"DATA", b"RSET", b"MAIL", b"RCPT", b"DATA"])

    @defer.inlineCallbacks
    def test_connectionLostMidPipelineLeavesNoUnhandledError(self):
        """A 421 to a pipelined RCPT and the connection closed: the recipients wait, nothing is logged as unhandled."""

        class Closing(Scripted):
            def lineReceived(self, line):
                if line.startswith(b"RCPT"):
                    self.factory.log.append(line)
                    self.sendLine(b"421 4.3.2 shutting down")
                    self.transport.loseConnection()
                    return
                Scripted.lineReceived(self, line)

        factory = ScriptedFactory({"EHLO": b"250-scripted\r\n250 PIPELINING", "DATA": b"354 go"})
        factory.protocol = Closing
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        t = self.transport(smarthost=f"127.0.0.1:{port.getHost().port}")
        from twisted.logger import globalLogPublisher

        unhandled = []

        def observe(event):
            if "Unhandled error in Deferred" in str(event.get("log_format", "")):
                unhandled.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        results = yield t.deliver("a@example.org", [Recipient("one@far.test"), Recipient("two@far.test")], MSG)
        self.assertEqual([r.state for r in results], ["deferred", "deferred"])
        import gc

        for _ in range(3):
            yield deferLater(reactor, 0.05, lambda: None)
            gc.collect()
        self.flushLoggedErrors(SMTPProtocolError)
        self.assertEqual(unhandled, [])

    @defer.inlineCallbacks
    def test_binaryMimeOnlyToAServerThatTakesIt(self):
        """RFC 3030 §3: BODY=BINARYMIME with BDAT where BINARYMIME and CHUNKING are offered; elsewhere 5.6.3."""
        binary = b"Subject: x\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n\x00\n\r\xff"
        factory = ScriptedFactory({"EHLO": b"250-scripted\r\n250-CHUNKING\r\n250-BINARYMIME\r\n250 8BITMIME"})
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        t = self.transport(smarthost=f"127.0.0.1:{port.getHost().port}")
        [r] = yield t.deliver("a@example.org", [Recipient("ok@far.test")], binary, binary=True)
        self.assertEqual(r.state, "delivered")
        self.assertEqual(factory.messages, [binary])
        self.assertTrue(any(l.startswith(b"MAIL FROM:<a@example.org>") and b"BODY=BINARYMIME" in l for l in factory.log))
        for ehlo in (b"250-scripted\r\n250 8BITMIME", b"250-scripted\r\n250-CHUNKING\r\n250 8BITMIME"):
            factory, [r] = yield self.scripted({"EHLO": ehlo, "DATA": b"354 go"}, [Recipient("ok@far.test")])
            self.assertEqual(r.state, "delivered", "an ordinary message")
            other = ScriptedFactory({"EHLO": ehlo, "DATA": b"354 go"})
            port = reactor.listenTCP(0, other, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            t = self.transport(smarthost=f"127.0.0.1:{port.getHost().port}")
            [r] = yield t.deliver("a@example.org", [Recipient("ok@far.test")], binary, binary=True)
            self.assertEqual((r.state, r.status), ("failed", "5.6.3"))
            self.assertEqual(other.messages, [])

    @defer.inlineCallbacks
    def test_dotStuffingAndEhloFallback(self):
        factory, [r] = yield self.scripted(
            {"EHLO": b"502 5.5.1 no", "HELO": b"250 hi", "DATA": b"354 go"}, [Recipient("ok@far.test")])
        self.assertEqual(r.state, "delivered")
        self.assertEqual(factory.messages, [MSG])
        self.assertIn(b"..leading dot", factory.log)
        self.assertIn(b"HELO me.example.org", factory.log)

    @defer.inlineCallbacks
    def test_bdatWhenChunking(self):
        eight = b"Subject: x\r\n\r\n\xff\x00binary\r\n.\r\n"
        factory, [r] = yield self.scripted(
            {"EHLO": b"250-scripted\r\n250-CHUNKING\r\n250-8BITMIME\r\n250 PIPELINING"}, [Recipient("ok@far.test")],
            eight)
        self.assertEqual(r.state, "delivered")
        self.assertEqual(factory.messages, [eight], "BDAT carries the content unchanged")

    @defer.inlineCallbacks
    def test_sizeAndSmtputf8AndDowngrade(self):
        factory, [r] = yield self.scripted({"EHLO": b"250-scripted\r\n250 SIZE 10"}, [Recipient("ok@far.test")])
        self.assertEqual((r.state, r.status), ("failed", "5.3.4"))
        self.assertFalse(any(l.startswith(b"MAIL") for l in factory.log))
        eight = "Subject: caf\u00e9\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nna\u00efve\r\n".encode()
        factory, [r] = yield self.scripted({"EHLO": b"250 scripted", "DATA": b"354 go"}, [Recipient("ok@far.test")],
                                           eight)
        self.assertEqual(r.state, "delivered")
        self.assertTrue(all(b < 128 for b in factory.messages[0]), "downgraded to 7 bits for a server without 8BITMIME")
        self.assertIn(b"quoted-printable", factory.messages[0])

    @defer.inlineCallbacks
    def test_greetingFailuresAndTLSRequired(self):
        factory, [r] = yield self.scripted({"greeting": b"421 4.3.2 busy"}, [Recipient("ok@far.test")])
        self.assertEqual(r.state, "deferred")
        self.assertIn("421", r.diagnostic)
        factory, [r] = yield self.scripted({}, [Recipient("ok@far.test")], tls="require")
        self.assertEqual((r.state, r.status), ("deferred", "4.7.10"))
        self.assertFalse(any(l.startswith(b"MAIL") for l in factory.log))

    @defer.inlineCallbacks
    def test_dsnParametersOnlyWhenOffered(self):
        recipients = [Recipient("ok@far.test", notify="SUCCESS,FAILURE", orcpt="rfc822;ok@far.test")]
        factory, [r] = yield self.scripted({"EHLO": b"250-scripted\r\n250 DSN", "DATA": b"354 go", "_dsn": True},
                                           recipients)
        self.assertEqual(r.state, "delivered")
        self.assertIn(b"MAIL FROM:<a@example.org> RET=HDRS ENVID=E1", factory.log)
        self.assertIn(b"RCPT TO:<ok@far.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;ok@far.test", factory.log)
        factory, [r] = yield self.scripted({"EHLO": b"250 scripted", "DATA": b"354 go", "_dsn": True}, recipients)
        self.assertEqual(r.state, "relayed", "NOTIFY=SUCCESS to a server without DSN is reported as relayed")
        self.assertIn(b"RCPT TO:<ok@far.test>", factory.log)

    def test_dotStuff(self):
        self.assertEqual(dotStuff(b".a\r\nb\n..c"), b"..a\r\nb\r\n...c\r\n.\r\n")
