"""
Tests for mailplat.pop3.server: sessions driven through StringTransport and a
task.Clock against MemoryStore, then real sockets with poplib.
"""

import base64
import hashlib
import poplib
import re
import socket
import ssl

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer, protocol, reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from zope.interface import alsoProvides, implementer

import mailplat
from mailplat import tls
from mailplat.auth.realm import MailRealm
from mailplat.interfaces.storage import TemporaryStoreFailure
from mailplat.metrics import Metrics
from mailplat.pop3 import wire
from mailplat.pop3.server import POP3Factory
from mailplat.testing import MemoryStore, memoryPortal

USERS = {"alice": "secret", "bob": "hunter2"}

MSG1 = b"From: carol@example.org\r\nSubject: one\r\n\r\nHello Alice.\r\n"
# Bare LFs, a leading dot, a lone dot line and no final line end.
MSG2 = b".Subject: two\n\n.\nbody line\n..two dots\nlast"
MSG3 = b"Subject: three\r\n\r\n" + b"x" * 5000 + b"\r\n"


def b64(data):
    return base64.b64encode(data)


class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS and then claims to be TLS."""

    tlsContext = None

    def startTLS(self, contextFactory):
        self.tlsContext = contextFactory
        alsoProvides(self, ISSLTransport)


class SlowStore:
    """Wraps a store so every result arrives later, after varying delays."""

    def __init__(self, store, clock):
        self._store = store
        self._clock = clock
        self._delays = iter([0.3, 0.1, 0.5, 0.2] * 1000)

    def __getattr__(self, name):
        method = getattr(self._store, name)
        if name.startswith("__"):
            return method  # the interfaces the store provides

        def call(*args, **kwargs):
            d = defer.Deferred()
            self._clock.callLater(next(self._delays), lambda: method(*args, **kwargs).chainDeferred(d))
            return d

        return call


class FailingStore:
    """A store whose named methods fail with TemporaryStoreFailure."""

    def __init__(self, store, failing):
        self._store = store
        self.failing = set(failing)

    def __getattr__(self, name):
        if name in self.failing:
            return lambda *a, **kw: defer.fail(TemporaryStoreFailure("disk on fire at /secret/path"))
        return getattr(self._store, name)


def skipStructure(testCase):
    # POP3 never asks for the MIME structure, but MemoryStore analyses (and
    # indexes) every message at append time; the real analyser is fast
    # enough for these messages.
    return None


class SessionMixin:
    def setUp(self):
        skipStructure(self)
        self.clock = task.Clock()
        self.store = MemoryStore(clock=self.clock)
        self.metrics = Metrics()
        for user in USERS:
            self.store.createAccount(user)
        self.uids = [self.successResultOf(self.store.append("alice", "INBOX", m))[1] for m in (MSG1, MSG2, MSG3)]
        self.uidvalidity = self.successResultOf(self.store.getMailbox("alice", "INBOX")).uidvalidity

    def factory(self, store=None, **kwargs):
        kwargs.setdefault("metrics", self.metrics)
        # memoryPortal's checker also lists IUsernameHashedPassword; the APOP
        # tests below choose their portal themselves.
        kwargs.setdefault("apop", False)
        kwargs.setdefault("portal", memoryPortal(USERS))
        return POP3Factory(
            hostname="pop.example.org",
            store=store if store is not None else self.store,
            reactor=self.clock,
            **kwargs,
        )

    def connect(self, factory=None, host="127.0.0.1"):
        factory = factory if factory is not None else self.factory()
        proto = factory.buildProtocol(None)
        transport = TLSStringTransport(hostAddress=IPv4Address("TCP", host, 110))
        proto.makeConnection(transport)
        greeting = transport.value()
        transport.clear()
        self.assertEqual(greeting, b"+OK pop.example.org POP3 server ready\r\n")
        return proto, transport

    def send(self, proto, transport, data):
        transport.clear()
        proto.dataReceived(data)
        return transport.value()

    def login(self, proto, transport, user="alice"):
        self.assertEqual(self.send(proto, transport, b"USER %s\r\n" % user.encode()), b"+OK Send your password\r\n")
        reply = self.send(proto, transport, b"PASS %s\r\n" % USERS[user].encode())
        self.assertTrue(reply.startswith(b"+OK Logged in"), reply)
        return reply

    def messages(self, user="alice"):
        return self.successResultOf(self.store.fetchMeta(user, "INBOX"))


class SessionTests(SessionMixin, unittest.TestCase):
    def test_full_session(self):
        proto, t = self.connect()
        self.assertEqual(self.login(proto, t), b"+OK Logged in, 3 messages\r\n")
        sizes = [wire.normalisedSize(m) for m in (MSG1, MSG2, MSG3)]
        self.assertEqual(self.send(proto, t, b"STAT\r\n"), b"+OK 3 %d\r\n" % sum(sizes))
        self.assertEqual(
            self.send(proto, t, b"LIST\r\n"),
            b"+OK 3 messages (%d octets)\r\n1 %d\r\n2 %d\r\n3 %d\r\n.\r\n" % (sum(sizes), *sizes),
        )
        self.assertEqual(self.send(proto, t, b"LIST 2\r\n"), b"+OK 2 %d\r\n" % sizes[1])
        v = self.uidvalidity
        self.assertEqual(
            self.send(proto, t, b"UIDL\r\n"),
            b"+OK Unique-ID listing follows\r\n1 %d-%d\r\n2 %d-%d\r\n3 %d-%d\r\n.\r\n"
            % (v, self.uids[0], v, self.uids[1], v, self.uids[2]),
        )
        self.assertEqual(self.send(proto, t, b"UIDL 3\r\n"), b"+OK 3 %d-%d\r\n" % (v, self.uids[2]))
        self.assertEqual(self.send(proto, t, b"RETR 1\r\n"), b"+OK %d octets\r\n" % sizes[0] + MSG1 + b".\r\n")
        self.assertEqual(self.send(proto, t, b"NOOP\r\n"), b"+OK\r\n")
        self.assertEqual(
            self.send(proto, t, b"QUIT\r\n"),
            b"+OK pop.example.org POP3 server signing off (maildrop empty or unchanged)\r\n",
        )
        self.assertTrue(t.disconnecting)
        proto.connectionLost()
        self.assertEqual(len(self.messages()), 3)
        self.assertEqual(self.metrics.get("mailplat_sessions_total", protocol="pop3"), 1)
        self.assertEqual(self.metrics.get("mailplat_sessions_active", protocol="pop3"), 0)

    def test_retr_is_byte_exact_and_size_matches(self):
        proto, t = self.connect()
        self.login(proto, t)
        reply = self.send(proto, t, b"RETR 2\r\n")
        expected = b"..Subject: two\r\n\r\n..\r\nbody line\r\n...two dots\r\nlast\r\n.\r\n"
        self.assertEqual(reply, b"+OK %d octets\r\n" % wire.normalisedSize(MSG2) + expected)
        status, _, body = reply.partition(b"\r\n")
        self.assertEqual(int(status.split()[1]), len(wire.decodeMultiline(body)))
        self.assertEqual(self.send(proto, t, b"LIST 2\r\n"), b"+OK 2 %d\r\n" % len(wire.decodeMultiline(body)))

    def test_retr_streams_through_a_producer(self):
        proto, t = self.connect()
        self.login(proto, t)
        big = b"Subject: big\r\n\r\n" + (b"." + b"y" * 998 + b"\r\n") * 300
        self.store.append("alice", "INBOX", big)
        # A new session sees it.
        self.send(proto, t, b"QUIT\r\n")
        proto.connectionLost()
        proto, t = self.connect()
        self.login(proto, t)
        reply = self.send(proto, t, b"RETR 4\r\n")
        self.assertIsNone(t.producer)
        _, _, body = reply.partition(b"\r\n")
        self.assertEqual(wire.decodeMultiline(body), big)

    def test_top(self):
        proto, t = self.connect()
        self.login(proto, t)
        self.assertEqual(
            self.send(proto, t, b"TOP 2 1\r\n"), b"+OK Top of message follows\r\n..Subject: two\r\n\r\n..\r\n.\r\n"
        )
        self.assertEqual(
            self.send(proto, t, b"TOP 1 0\r\n"),
            b"+OK Top of message follows\r\nFrom: carol@example.org\r\nSubject: one\r\n\r\n.\r\n",
        )
        self.assertEqual(self.send(proto, t, b"TOP 1 x\r\n"), b"-ERR Invalid number of lines\r\n")
        # TOP does not mark the message as read.
        self.assertNotIn("\\Seen", self.messages()[0].flags)

    def test_retr_sets_seen(self):
        proto, t = self.connect()
        self.login(proto, t)
        self.send(proto, t, b"RETR 2\r\n")
        # Written in the background, within seenDelay.
        self.assertFalse(any("\\Seen" in m.flags for m in self.messages()))
        self.clock.advance(proto.seenDelay)
        flags = [m.flags for m in self.messages()]
        self.assertEqual([("\\Seen" in f) for f in flags], [False, True, False])

    def test_dele_then_rset_keeps_everything(self):
        proto, t = self.connect()
        self.login(proto, t)
        self.assertEqual(self.send(proto, t, b"DELE 1\r\n"), b"+OK Message 1 deleted\r\n")
        self.assertEqual(self.send(proto, t, b"DELE 3\r\n"), b"+OK Message 3 deleted\r\n")
        self.assertEqual(self.send(proto, t, b"STAT\r\n"), b"+OK 1 %d\r\n" % wire.normalisedSize(MSG2))
        self.assertEqual(self.send(proto, t, b"RSET\r\n"), b"+OK Maildrop has 3 messages\r\n")
        self.assertTrue(self.send(proto, t, b"STAT\r\n").startswith(b"+OK 3 "))
        self.send(proto, t, b"QUIT\r\n")
        self.assertEqual(len(self.messages()), 3)
        self.assertFalse(any("\\Deleted" in m.flags for m in self.messages()))

    def test_dele_then_quit_expunges_exactly_those(self):
        # A message flagged \Deleted by another client is not in the maildrop
        # and is not expunged by POP3.
        other = self.successResultOf(self.store.append("alice", "INBOX", b"Subject: imap\r\n\r\n", flags=["\\Deleted"]))[1]
        proto, t = self.connect()
        self.assertEqual(self.login(proto, t), b"+OK Logged in, 3 messages\r\n")
        self.send(proto, t, b"DELE 1\r\n")
        self.send(proto, t, b"DELE 3\r\n")
        self.assertEqual(
            self.send(proto, t, b"QUIT\r\n"), b"+OK pop.example.org POP3 server signing off (2 messages deleted)\r\n"
        )
        self.assertEqual([m.uid for m in self.messages()], [self.uids[1], other])

    def test_update_failure_keeps_messages(self):
        store = FailingStore(self.store, ["expunge"])
        proto, t = self.connect(self.factory(store=store))
        self.login(proto, t)
        self.send(proto, t, b"DELE 2\r\n")
        reply = self.send(proto, t, b"QUIT\r\n")
        self.assertEqual(reply, b"-ERR [SYS/TEMP] Some deleted messages not removed\r\n")
        self.assertTrue(t.disconnecting)
        self.assertEqual(len(self.messages()), 3)
        self.assertFalse(any("\\Deleted" in m.flags for m in self.messages()))
        self.assertEqual(len(self.flushLoggedErrors(TemporaryStoreFailure)), 1)

    def test_dropped_connection_does_not_update(self):
        proto, t = self.connect()
        self.login(proto, t)
        self.send(proto, t, b"DELE 1\r\nDELE 2\r\n")
        proto.connectionLost()
        self.assertEqual(len(self.messages()), 3)
        # The lock is released: a new session can log in.
        proto2, t2 = self.connect()
        self.login(proto2, t2)

    def test_idle_timeout_closes_silently_without_update(self):
        proto, t = self.connect()
        self.login(proto, t)
        self.send(proto, t, b"DELE 1\r\n")
        t.clear()
        self.clock.advance(599)
        self.assertFalse(t.disconnecting)
        self.send(proto, t, b"NOOP\r\n")
        t.clear()
        self.clock.advance(599)
        self.assertFalse(t.disconnecting)
        self.clock.advance(1)
        self.assertTrue(t.disconnecting)
        self.assertEqual(t.value(), b"")
        proto.connectionLost()
        self.assertEqual(len(self.messages()), 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_in_use_lock(self):
        factory = self.factory()
        first, t1 = self.connect(factory)
        self.login(first, t1)
        second, t2 = self.connect(self.factory())  # another factory on the same store shares the lock
        self.send(second, t2, b"USER alice\r\n")
        self.assertEqual(
            self.send(second, t2, b"PASS secret\r\n"), b"-ERR [IN-USE] Maildrop already locked by another session\r\n"
        )
        self.assertFalse(t2.disconnecting)
        # Another account is not affected.
        self.login(second, t2, "bob")
        self.send(first, t1, b"QUIT\r\n")
        first.connectionLost()
        third, t3 = self.connect(factory)
        self.login(third, t3)

    def test_pipelined_commands_answer_in_order_with_slow_store(self):
        store = SlowStore(self.store, self.clock)
        proto, t = self.connect(self.factory(store=store))
        t.clear()
        proto.dataReceived(
            b"CAPA\r\nUSER alice\r\nPASS secret\r\nSTAT\r\nLIST 1\r\nRETR 1\r\nDELE 1\r\nRETR 1\r\n"
            b"UIDL 2\r\nBOGUS\r\nQUIT\r\n"
        )
        self.clock.pump([0.1] * 100)
        lines = t.value().split(b"\r\n")
        statuses = [line for line in lines if line.startswith((b"+OK", b"-ERR"))]
        total = sum(wire.normalisedSize(m) for m in (MSG1, MSG2, MSG3))
        self.assertEqual(
            statuses,
            [
                b"+OK Capability list follows",
                b"+OK Send your password",
                b"+OK Logged in, 3 messages",
                b"+OK 3 %d" % total,
                b"+OK 1 %d" % wire.normalisedSize(MSG1),
                b"+OK %d octets" % wire.normalisedSize(MSG1),
                b"+OK Message 1 deleted",
                b"-ERR No such message",
                b"+OK 2 %d-%d" % (self.uidvalidity, self.uids[1]),
                b"-ERR Unknown command",
                b"+OK pop.example.org POP3 server signing off (1 messages deleted)",
            ],
        )
        self.assertIn(b"+OK %d octets\r\n" % wire.normalisedSize(MSG1) + MSG1 + b".\r\n+OK Message 1", t.value())
        self.assertEqual([m.uid for m in self.messages()], self.uids[1:])

    def test_stls_discards_pipelined_plaintext(self):
        ctx = object()
        proto, t = self.connect(self.factory(tlsContextFactory=ctx), host="10.1.2.3")
        reply = self.send(proto, t, b"STLS\r\nUSER alice\r\nPASS secret\r\n")
        self.assertEqual(reply, b"+OK Begin TLS negotiation\r\n")
        self.assertIs(t.tlsContext, ctx)
        self.assertIsNone(proto.user)
        # Inside TLS, plaintext login is allowed and STLS is no longer offered.
        caps = self.send(proto, t, b"CAPA\r\n")
        self.assertIn(b"\r\nUSER\r\n", caps)
        self.assertIn(b"\r\nSASL PLAIN LOGIN\r\n", caps)
        self.assertNotIn(b"STLS", caps)
        self.assertEqual(self.send(proto, t, b"STLS\r\n"), b"-ERR Command not permitted when TLS active\r\n")
        self.login(proto, t)

    def test_stls_without_tls_configured(self):
        proto, t = self.connect()
        self.assertEqual(self.send(proto, t, b"STLS\r\n"), b"-ERR TLS not available\r\n")
        self.assertNotIn(b"STLS", self.send(proto, t, b"CAPA\r\n"))

    def test_plaintext_refused_on_non_loopback(self):
        proto, t = self.connect(self.factory(tlsContextFactory=object()), host="10.1.2.3")
        caps = self.send(proto, t, b"CAPA\r\n")
        self.assertEqual(
            caps,
            b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
            b"STLS\r\nEXPIRE NEVER\r\nIMPLEMENTATION mailplat\r\nUTF8 USER\r\nLANG\r\n.\r\n",
        )
        refused = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections; use STLS first\r\n"
        self.assertEqual(self.send(proto, t, b"USER alice\r\n"), refused)
        self.assertEqual(self.send(proto, t, b"PASS secret\r\n"), refused)
        self.assertEqual(self.send(proto, t, b"AUTH PLAIN %s\r\n" % b64(b"\0alice\0secret")), refused)
        self.assertEqual(self.send(proto, t, b"AUTH LOGIN\r\n"), refused)
        self.assertEqual(self.send(proto, t, b"AUTH\r\n"), b"+OK Supported mechanisms follow\r\n.\r\n")
        self.assertEqual(self.send(proto, t, b"STAT\r\n"), b"-ERR Command not valid in this state\r\n")
        self.assertIsNone(proto.user)

    def test_allow_insecure_auth_settings(self):
        proto, t = self.connect(self.factory(allowInsecureAuth=True), host="10.1.2.3")
        self.assertIn(b"\r\nUSER\r\n", self.send(proto, t, b"CAPA\r\n"))
        self.login(proto, t)
        proto, t = self.connect(self.factory(allowInsecureAuth=False), host="127.0.0.1")
        self.assertNotIn(b"\r\nUSER\r\n", self.send(proto, t, b"CAPA\r\n"))
        self.assertTrue(self.send(proto, t, b"USER alice\r\n").startswith(b"-ERR [AUTH] Plaintext"))

    def test_capa_on_loopback(self):
        proto, t = self.connect()
        self.assertEqual(
            self.send(proto, t, b"capa\r\n"),
            b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
            b"USER\r\nSASL PLAIN LOGIN\r\nEXPIRE NEVER\r\nIMPLEMENTATION mailplat\r\nUTF8 USER\r\nLANG\r\n.\r\n",
        )
        self.login(proto, t)
        caps = self.send(proto, t, b"CAPA\r\n")
        self.assertNotIn(b"\r\nUSER\r\n", caps)
        self.assertNotIn(b"SASL", caps)
        self.assertIn(b"\r\nIMPLEMENTATION mailplat-%s\r\n" % mailplat.__version__.encode(), caps)

    def test_auth_plain_with_initial_response(self):
        proto, t = self.connect()
        reply = self.send(proto, t, b"AUTH PLAIN %s\r\n" % b64(b"\0alice\0secret"))
        self.assertEqual(reply, b"+OK Logged in, 3 messages\r\n")
        self.assertEqual(proto.user, "alice")

    def test_auth_plain_with_continuation(self):
        proto, t = self.connect()
        self.assertEqual(self.send(proto, t, b"AUTH plain\r\n"), b"+ \r\n")
        self.assertEqual(self.send(proto, t, b"%s\r\n" % b64(b"\0bob\0hunter2")), b"+OK Logged in, 0 messages\r\n")

    def test_auth_plain_with_empty_initial_response(self):
        """RFC 5034: "=" is an empty initial response, which PLAIN cannot take: no challenge."""
        proto, t = self.connect()
        self.assertEqual(self.send(proto, t, b"AUTH PLAIN =\r\n"), b"", "no challenge")
        self.clock.advance(1)
        self.assertTrue(t.value().startswith(b"-ERR"), t.value())
        self.assertEqual(self.send(proto, t, b"AUTH PLAIN\r\n"), b"+ \r\n")

    def test_auth_login(self):
        proto, t = self.connect()
        self.assertEqual(self.send(proto, t, b"AUTH LOGIN\r\n"), b"+ VXNlcm5hbWU6\r\n")
        self.assertEqual(self.send(proto, t, b64(b"alice") + b"\r\n"), b"+ UGFzc3dvcmQ6\r\n")
        self.assertEqual(self.send(proto, t, b64(b"secret") + b"\r\n"), b"+OK Logged in, 3 messages\r\n")

    def test_auth_login_with_initial_response(self):
        proto, t = self.connect()
        self.assertEqual(self.send(proto, t, b"AUTH LOGIN %s\r\n" % b64(b"alice")), b"+ UGFzc3dvcmQ6\r\n")
        self.assertEqual(self.send(proto, t, b64(b"secret") + b"\r\n"), b"+OK Logged in, 3 messages\r\n")

    def test_auth_cancel_unknown_and_listing(self):
        proto, t = self.connect()
        self.assertEqual(self.send(proto, t, b"AUTH\r\n"), b"+OK Supported mechanisms follow\r\nPLAIN\r\nLOGIN\r\n.\r\n")
        self.assertEqual(self.send(proto, t, b"AUTH LOGIN\r\n"), b"+ VXNlcm5hbWU6\r\n")
        self.assertEqual(self.send(proto, t, b"*\r\n"), b"-ERR Authentication cancelled\r\n")
        self.assertEqual(self.send(proto, t, b"AUTH CRAM-MD5\r\n"), b"-ERR Unrecognized authentication type\r\n")
        self.assertEqual(self.send(proto, t, b"AUTH PLAIN !!!\r\n"), b"-ERR Invalid base64 data\r\n")
        self.assertEqual(self.send(proto, t, b"AUTH PLAIN\r\n"), b"+ \r\n")
        self.assertEqual(self.send(proto, t, b"@@@\r\n"), b"-ERR Invalid base64 data\r\n")
        self.assertEqual(self.send(proto, t, b"NOOP\r\n"), b"+OK\r\n")

    def test_long_sasl_response_accepted(self):
        proto, t = self.connect()
        self.assertEqual(self.send(proto, t, b"AUTH PLAIN\r\n"), b"+ \r\n")
        blob = b64(b"\0alice\0" + b"p" * 3000)
        reply = self.send(proto, t, blob + b"\r\n")
        self.assertEqual(reply, b"")  # an ordinary failure, answered after the delay
        self.clock.advance(1)
        self.assertEqual(t.value(), b"-ERR [AUTH] Authentication failed\r\n")
        # Back to the normal limit for commands.
        self.assertEqual(self.send(proto, t, b"NOOP " + b"x" * 300 + b"\r\n"), b"-ERR Line too long\r\n")

    def test_auth_failure_delay_grows(self):
        proto, t = self.connect()
        self.send(proto, t, b"USER alice\r\n")
        self.assertEqual(self.send(proto, t, b"PASS wrong\r\nNOOP\r\n"), b"")
        self.clock.advance(0.9)
        self.assertEqual(t.value(), b"")
        self.clock.advance(0.1)
        self.assertEqual(t.value(), b"-ERR [AUTH] Authentication failed\r\n+OK\r\n")
        self.assertEqual(
            self.send(proto, t, b"AUTH PLAIN %s\r\n" % b64(b"\0alice\0nope")), b""
        )
        self.clock.advance(1.9)
        self.assertEqual(t.value(), b"")
        self.clock.advance(0.1)
        self.assertEqual(t.value(), b"-ERR [AUTH] Authentication failed\r\n")
        self.assertEqual(self.metrics.get("mailplat_auth_failures_total", protocol="pop3"), 2)
        self.login(proto, t)

    def test_too_many_auth_failures_close(self):
        factory = self.factory()
        factory.maxAuthFailures = 3
        proto, t = self.connect(factory)
        t.clear()
        for _ in range(3):
            proto.dataReceived(b"USER alice\r\nPASS wrong\r\n")
            self.clock.advance(16)
        self.assertTrue(t.value().endswith(b"-ERR [AUTH] Too many authentication failures\r\n"))
        self.assertTrue(t.disconnecting)

    def test_connection_lost_during_auth_delay(self):
        proto, t = self.connect()
        self.send(proto, t, b"USER alice\r\nPASS wrong\r\n")
        proto.connectionLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_apop_not_offered(self):
        proto, t = self.connect()
        self.assertEqual(
            self.send(proto, t, b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n"),
            b"-ERR [AUTH] APOP unavailable: passwords are stored as one-way (argon2id) hashes, so an APOP "
            b"digest cannot be checked; use USER/PASS or AUTH over TLS\r\n",
        )
        self.assertNotIn(b"APOP", self.send(proto, t, b"CAPA\r\n"))
        # Not an authentication failure: no delay, and the session goes on.
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 600)
        self.login(proto, t)

    def test_pass_without_user(self):
        proto, t = self.connect()
        self.assertEqual(self.send(proto, t, b"PASS secret\r\n"), b"-ERR USER first\r\n")

    def test_message_number_validation(self):
        proto, t = self.connect()
        self.login(proto, t)
        self.send(proto, t, b"DELE 2\r\n")
        for command, expected in [
            (b"RETR 0", b"-ERR Invalid message number\r\n"),
            (b"RETR 4", b"-ERR No such message\r\n"),
            (b"RETR 2", b"-ERR No such message\r\n"),
            (b"LIST 2", b"-ERR No such message\r\n"),
            (b"UIDL 2", b"-ERR No such message\r\n"),
            (b"TOP 2 0", b"-ERR No such message\r\n"),
            (b"LIST 99999999999", b"-ERR Invalid message number\r\n"),
            (b"RETR -1", b"-ERR Invalid message number\r\n"),
        ]:
            self.assertEqual(self.send(proto, t, command + b"\r\n"), expected, command)
        self.assertEqual(self.send(proto, t, b"RETR abc\r\n"), b"-ERR Invalid message number\r\n")
        self.assertEqual(self.send(proto, t, b"DELE 2\r\n"), b"-ERR Message 2 already deleted\r\n")
        self.assertEqual(self.send(proto, t, b"DELE 7\r\n"), b"-ERR No such message\r\n")
        self.assertEqual(self.send(proto, t, b"LIST\r\n").count(b"\r\n"), 4)  # status, 1, 3, terminator

    def test_bad_input_never_drops_the_connection(self):
        proto, t = self.connect()
        self.assertEqual(self.send(proto, t, b"\r\n"), b"-ERR Empty command\r\n")
        self.assertEqual(self.send(proto, t, b"X" * 1000 + b"\r\n"), b"-ERR Line too long\r\n")
        self.assertEqual(self.send(proto, t, b"NOOP\rUSER x\r\n"), b"-ERR Invalid characters in command line\r\n")
        self.assertEqual(self.send(proto, t, b"\xff\xfe\r\n"), b"-ERR Unknown command\r\n")
        self.assertEqual(self.send(proto, t, b"USER \xff\r\n"), b"-ERR User name is not valid UTF-8\r\n")
        self.assertEqual(self.send(proto, t, b"RETR 1\r\n"), b"-ERR Command not valid in this state\r\n")
        self.assertEqual(self.send(proto, t, b"NOOP extra\r\n"), b"-ERR NOOP takes no arguments\r\n")
        self.login(proto, t)
        self.assertEqual(self.send(proto, t, b"USER bob\r\n"), b"-ERR Command not valid in this state\r\n")
        self.assertEqual(self.send(proto, t, b"STLS\r\n"), b"-ERR Command not valid in this state\r\n")
        self.assertFalse(t.disconnecting)

    def test_store_error_at_login_releases_lock(self):
        store = FailingStore(self.store, ["fetchMeta"])
        factory = self.factory(store=store)
        proto, t = self.connect(factory)
        self.send(proto, t, b"USER alice\r\n")
        reply = self.send(proto, t, b"PASS secret\r\n")
        self.assertEqual(reply, b"-ERR [SYS/TEMP] Unable to open maildrop\r\n")
        self.assertNotIn(b"/secret/path", reply)
        self.assertFalse(factory.locks.isLocked("alice"))
        self.assertEqual(len(self.flushLoggedErrors(TemporaryStoreFailure)), 1)
        store.failing.clear()
        self.login(proto, t)

    def test_message_removed_by_another_client(self):
        proto, t = self.connect()
        self.login(proto, t)
        self.store.storeFlags("alice", "INBOX", [self.uids[0]], "add", ["\\Deleted"])
        self.store.expunge("alice", "INBOX")
        self.assertEqual(self.send(proto, t, b"RETR 1\r\n"), b"-ERR Message has been removed from the maildrop\r\n")
        self.assertTrue(self.send(proto, t, b"STAT\r\n").startswith(b"+OK 3 "))
        self.send(proto, t, b"DELE 1\r\n")
        self.assertTrue(self.send(proto, t, b"QUIT\r\n").startswith(b"+OK"))

    def test_input_flow_control(self):
        store = SlowStore(self.store, self.clock)
        proto, t = self.connect(self.factory(store=store))
        proto.dataReceived(b"USER alice\r\nPASS secret\r\n" + b"NOOP\r\n" * 20000)
        self.assertEqual(t.producerState, "paused")
        self.clock.pump([0.5] * 10)
        self.assertEqual(t.producerState, "producing")
        self.assertEqual(t.value().count(b"+OK\r\n"), 20000)


class SocketTests(unittest.TestCase):
    """Real connections on 127.0.0.1 with poplib."""

    def setUp(self):
        skipStructure(self)
        self.store = MemoryStore()
        self.store.createAccount("alice")
        for m in (MSG1, MSG2, MSG3):
            self.store.append("alice", "INBOX", m)
        self.lost = []

    def listen(self, implicitTLS=None, **kwargs):
        kwargs.setdefault("apop", False)
        factory = POP3Factory(hostname="localhost", portal=memoryPortal(USERS), store=self.store, **kwargs)
        build = factory.buildProtocol

        def buildProtocol(addr):
            proto = build(addr)
            done = defer.Deferred()
            self.lost.append(done)
            original = proto.connectionLost

            def connectionLost(reason=protocol.connectionDone):
                original(reason)
                done.callback(None)

            proto.connectionLost = connectionLost
            return proto

        factory.buildProtocol = buildProtocol
        if implicitTLS is not None:
            factory = TLSMemoryBIOFactory(implicitTLS, False, factory)
        if getattr(self, "limited", False):
            from mailplat.limits import LimitedFactory

            factory = LimitedFactory(factory, "pop3", 10, 100)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: defer.DeferredList(self.lost))
        return port.getHost().port

    @defer.inlineCallbacks
    def test_poplib_session(self):
        port = self.listen()

        def client():
            p = poplib.POP3("127.0.0.1", port, timeout=10)
            try:
                caps = p.capa()
                p.user("alice")
                p.pass_("secret")
                stat = p.stat()
                listing = p.list()
                uidl = p.uidl()
                retr = p.retr(2)
                top = p.top(1, 0)
                p.dele(1)
            finally:
                p.quit()
            return caps, stat, listing, uidl, retr, top

        caps, stat, listing, uidl, retr, top = yield threads.deferToThread(client)
        self.assertIn("PIPELINING", caps)
        self.assertEqual(caps["SASL"], ["PLAIN", "LOGIN"])
        sizes = [wire.normalisedSize(m) for m in (MSG1, MSG2, MSG3)]
        self.assertEqual(stat, (3, sum(sizes)))
        self.assertEqual(listing[1], [b"%d %d" % (i, s) for i, s in enumerate(sizes, 1)])
        self.assertEqual(len(uidl[1]), 3)
        resp, lines, octets = retr
        self.assertEqual(resp, b"+OK %d octets" % sizes[1])
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", wire.decodeMultiline(b"".join(wire.encodeMessage([MSG2]))))
        self.assertEqual(top[1], [b"From: carol@example.org", b"Subject: one", b""])
        metas = yield self.store.fetchMeta("alice", "INBOX")
        self.assertEqual(len(metas), 2)
        self.assertIn("\\Seen", metas[0].flags)

    @defer.inlineCallbacks
    def test_byte_exact_retr_on_raw_socket(self):
        port = self.listen()

        def client():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"USER alice\r\nPASS secret\r\nRETR 2\r\nRETR 3\r\nQUIT\r\n")
                data = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        return data
                    data += chunk

        transcript = yield threads.deferToThread(client)
        expected = (
            b"+OK localhost POP3 server ready\r\n"
            b"+OK Send your password\r\n"
            b"+OK Logged in, 3 messages\r\n"
            + b"+OK %d octets\r\n" % wire.normalisedSize(MSG2)
            + b"..Subject: two\r\n\r\n..\r\nbody line\r\n...two dots\r\nlast\r\n.\r\n"
            + b"+OK %d octets\r\n" % len(MSG3)
            + MSG3
            + b".\r\n"
            + b"+OK localhost POP3 server signing off (maildrop empty or unchanged)\r\n"
        )
        self.assertEqual(transcript, expected)

    @defer.inlineCallbacks
    def test_stls_with_poplib(self):
        cert, key = tls.ensureCertificate(self.mktemp())
        # Large enough to fill the transport's buffers and pause the producer.
        big = b"Subject: big\n\n" + b"".join(b".%06d line\n" % i for i in range(200000))
        self.store.append("alice", "INBOX", big)
        port = self.listen(tlsContextFactory=tls.serverContextFactory(cert, key), allowInsecureAuth=False)

        def client():
            context = ssl.create_default_context(cafile=cert)
            p = poplib.POP3("127.0.0.1", port, timeout=10)
            try:
                before = p.capa()
                try:
                    p.user("alice")
                    refused = None
                except poplib.error_proto as e:
                    refused = e.args[0]
                p.stls(context)
                after = p.capa()
                p.user("alice")
                p.pass_("secret")
                lines = p.retr(1)[1]
                bigLines = p.retr(4)[1]
                cipher = p.sock.cipher()
            finally:
                p.quit()
            return before, refused, after, lines, bigLines, cipher

        before, refused, after, lines, bigLines, cipher = yield threads.deferToThread(client)
        self.assertEqual(b"\r\n".join(bigLines) + b"\r\n", big.replace(b"\n", b"\r\n"))
        self.assertIn("STLS", before)
        self.assertNotIn("USER", before)
        self.assertTrue(refused.startswith(b"-ERR [AUTH] Plaintext"))
        self.assertNotIn("STLS", after)
        self.assertIn("USER", after)
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", MSG1)
        self.assertIsNotNone(cipher)

    def test_stls_behind_the_connection_limits(self):
        """
        As the platform serves POP3: behind L{LimitedFactory}, whose wrapper
        copied the transport's interfaces before STLS.  After STLS the
        session knows it is encrypted (RFC 2595 §4): no STLS in CAPA, USER
        allowed.
        """
        self.limited = True
        return self.test_stls_with_poplib()

    @defer.inlineCallbacks
    def test_implicit_tls_pop3s(self):
        cert, key = tls.ensureCertificate(self.mktemp())
        contextFactory = tls.serverContextFactory(cert, key)
        port = self.listen(implicitTLS=contextFactory, tlsContextFactory=contextFactory, allowInsecureAuth=False)

        def client():
            p = poplib.POP3_SSL("127.0.0.1", port, context=ssl.create_default_context(cafile=cert), timeout=10)
            try:
                caps = p.capa()
                p.user("alice")
                p.pass_("secret")
                return caps, p.stat()
            finally:
                p.quit()

        caps, stat = yield threads.deferToThread(client)
        self.assertNotIn("STLS", caps)
        self.assertIn("USER", caps)
        self.assertEqual(stat[0], 3)


@implementer(ICredentialsChecker)
class CleartextChecker:
    """A checker that keeps passwords as they are, so it can verify APOP."""

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def __init__(self, users):
        self.users = users

    def requestAvatarId(self, credentials):
        name = credentials.username
        name = name.decode("utf-8") if isinstance(name, bytes) else name
        password = self.users.get(name)
        if password is not None and credentials.checkPassword(password.encode("utf-8")):
            return defer.succeed(name)
        return defer.fail(UnauthorizedLogin())


@implementer(ICredentialsChecker)
class HashOnlyChecker(CleartextChecker):
    """Like the built-in checkers: plain passwords only."""

    credentialInterfaces = (IUsernamePassword,)


class ExtensionTests(SessionMixin, unittest.TestCase):
    """APOP, LOGIN-DELAY, UTF8, LANG, the bad-command limit, batched \\Seen."""

    def pump(self, seconds=100):
        for _ in range(seconds * 10):
            self.clock.advance(0.1)

    def apopSession(self, checker=None, **kwargs):
        portal = Portal(MailRealm(), [checker or CleartextChecker(USERS)])
        factory = self.factory(portal=portal, apop=kwargs.pop("apop", None), **kwargs)
        proto = factory.buildProtocol(None)
        t = TLSStringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 110))
        proto.makeConnection(t)
        greeting = t.value()
        t.clear()
        return proto, t, greeting

    def test_apop_offered_when_a_checker_can_verify_it(self):
        proto, t, greeting = self.apopSession()
        match = re.match(rb"\+OK pop\.example\.org POP3 server ready (<[^<>@]+@pop\.example\.org>)\r\n\Z", greeting)
        self.assertIsNotNone(match, greeting)
        self.assertIn(b"\r\nAPOP\r\n", self.send(proto, t, b"CAPA\r\n"))
        digest = hashlib.md5(match.group(1) + b"secret").hexdigest().encode()
        self.assertEqual(self.send(proto, t, b"APOP alice " + digest.upper() + b"\r\n"), b"+OK Logged in, 3 messages\r\n")
        self.assertEqual(proto.user, "alice")

    def test_apop_wrong_digest_is_an_authentication_failure(self):
        proto, t, greeting = self.apopSession()
        wrong = hashlib.md5(b"<1.2@x>secret").hexdigest().encode()
        self.assertEqual(self.send(proto, t, b"APOP alice " + wrong + b"\r\n"), b"")
        self.clock.advance(1)
        self.assertEqual(t.value(), b"-ERR [AUTH] Authentication failed\r\n")
        self.assertEqual(self.send(proto, t, b"APOP alice xyz\r\n"), b"-ERR Invalid APOP digest\r\n")
        self.assertEqual(self.send(proto, t, b"APOP alice\r\n"), b"-ERR APOP requires 2 arguments\r\n")
        self.assertIsNone(proto.user)

    def test_apop_timestamps_differ_between_sessions(self):
        stamps = {self.apopSession()[2] for _ in range(3)}
        self.assertEqual(len(stamps), 3)

    def test_apop_not_offered_with_hash_only_checkers_or_when_disabled(self):
        for checker, apop in ((HashOnlyChecker(USERS), None), (HashOnlyChecker(USERS), True), (None, False)):
            proto, t, greeting = self.apopSession(checker, apop=apop)
            self.assertEqual(greeting, b"+OK pop.example.org POP3 server ready\r\n")
            reply = self.send(proto, t, b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n")
            self.assertTrue(reply.startswith(b"-ERR [AUTH] APOP unavailable: passwords are stored as one-way"), reply)

    def test_bad_command_limit(self):
        proto, t = self.connect(self.factory())
        for i in range(19):
            line = [b"BOGUS\r\n", b"STAT\r\n", b"x" * 300 + b"\r\n", b"NOOP a\r\n"][i % 4]
            self.assertTrue(self.send(proto, t, line).startswith(b"-ERR "))
            self.assertFalse(t.disconnecting)
        # A valid command starts the count again.
        self.assertEqual(self.send(proto, t, b"NOOP\r\n"), b"+OK\r\n")
        for _ in range(19):
            self.send(proto, t, b"BOGUS\r\n")
        self.assertFalse(t.disconnecting)
        self.assertEqual(self.send(proto, t, b"BOGUS\r\n"), b"-ERR Too many invalid commands\r\n")
        self.assertTrue(t.disconnecting)

    def test_bad_command_limit_closes_without_update(self):
        proto, t = self.connect()
        self.login(proto, t)
        self.send(proto, t, b"DELE 1\r\n")
        self.send(proto, t, b"FOO\r\n" * 20)
        self.assertTrue(t.value().endswith(b"-ERR Too many invalid commands\r\n"))
        self.assertTrue(t.disconnecting)
        proto.connectionLost()
        self.assertEqual(len(self.messages()), 3)
        self.assertFalse(proto.factory.locks.isLocked("alice"))

    def test_failing_valid_commands_do_not_count(self):
        proto, t = self.connect()
        self.login(proto, t)
        for _ in range(30):
            self.assertEqual(self.send(proto, t, b"RETR 99\r\n"), b"-ERR No such message\r\n")
        self.assertFalse(t.disconnecting)

    def test_login_delay(self):
        factory = self.factory(loginDelay=60)
        proto, t = self.connect(factory)
        self.assertIn(b"\r\nLOGIN-DELAY 60\r\n", self.send(proto, t, b"CAPA\r\n"))
        self.login(proto, t)
        self.assertIn(b"\r\nLOGIN-DELAY 60\r\n", self.send(proto, t, b"CAPA\r\n"))
        self.send(proto, t, b"QUIT\r\n")
        proto.connectionLost()
        self.clock.advance(30)
        proto, t = self.connect(factory)
        # A wrong password is a plain failure: LOGIN-DELAY tells nothing before the password is right.
        self.send(proto, t, b"USER alice\r\nPASS wrong\r\n")
        self.clock.advance(1)
        self.assertEqual(t.value(), b"+OK Send your password\r\n-ERR [AUTH] Authentication failed\r\n")
        self.send(proto, t, b"USER alice\r\n")
        self.assertEqual(
            self.send(proto, t, b"PASS secret\r\n"), b"-ERR [LOGIN-DELAY] Minimum time between logins is 60 seconds\r\n"
        )
        self.assertIsNone(proto.user)
        self.assertFalse(factory.locks.isLocked("alice"))
        # Another account is not affected, and after the delay alice may log in.
        self.login(proto, t, "bob")
        proto, t = self.connect(factory)
        self.clock.advance(30)
        self.login(proto, t)

    def test_no_login_delay_by_default(self):
        proto, t = self.connect()
        self.assertNotIn(b"LOGIN-DELAY", self.send(proto, t, b"CAPA\r\n"))

    def test_utf8_command_and_user_names(self):
        portal = Portal(MailRealm(), [HashOnlyChecker({"jürgen": "pässwörd"})])
        self.store.createAccount("jürgen")
        proto, t = self.connect(self.factory(portal=portal))
        self.assertIn(b"\r\nUTF8 USER\r\n", self.send(proto, t, b"CAPA\r\n"))
        self.assertEqual(self.send(proto, t, b"UTF8\r\n"), b"+OK UTF-8 mode enabled\r\n")
        self.assertEqual(self.send(proto, t, "USER jürgen\r\n".encode()), b"+OK Send your password\r\n")
        self.assertTrue(self.send(proto, t, "PASS pässwörd\r\n".encode()).startswith(b"+OK Logged in, 0 messages"))
        self.assertEqual(self.send(proto, t, b"UTF8\r\n"), b"-ERR Command not valid in this state\r\n")
        self.assertEqual(self.send(proto, t, b"USER \xff\r\n"), b"-ERR Command not valid in this state\r\n")

    def test_non_utf8_user_name_refused(self):
        proto, t = self.connect()
        self.assertEqual(self.send(proto, t, b"USER \xffalice\r\n"), b"-ERR User name is not valid UTF-8\r\n")

    def test_lang(self):
        proto, t = self.connect()
        self.assertIn(b"\r\nLANG\r\n", self.send(proto, t, b"CAPA\r\n"))
        self.assertEqual(self.send(proto, t, b"LANG\r\n"), b"+OK Language listing follows\r\nen English\r\n.\r\n")
        self.assertEqual(self.send(proto, t, b"LANG en\r\n"), b"+OK en Language is English\r\n")
        self.assertEqual(self.send(proto, t, b"LANG EN-gb\r\n"), b"+OK en Language is English\r\n")
        self.assertEqual(self.send(proto, t, b"LANG en-x-foo\r\n"), b"+OK en Language is English\r\n")
        self.assertEqual(self.send(proto, t, b"LANG *\r\n"), b"+OK en Language is English\r\n")
        self.assertEqual(self.send(proto, t, b"LANG fr\r\n"), b"-ERR Unsupported language\r\n")
        self.assertEqual(self.send(proto, t, b"LANG e_n\r\n"), b"-ERR Invalid language range\r\n")
        self.login(proto, t)
        self.assertEqual(self.send(proto, t, b"LANG *\r\n"), b"+OK en Language is English\r\n")
        self.assertEqual(proto.language, "en")

    def test_seen_flags_are_batched_and_written_before_update(self):
        calls = []
        proto, t = self.connect(self.factory(store=_Tracking(self.store, self.clock, calls)))
        proto.dataReceived(b"USER alice\r\nPASS secret\r\n")
        self.pump()
        t.clear()
        proto.dataReceived(b"RETR 1\r\nRETR 2\r\nRETR 3\r\nDELE 1\r\nQUIT\r\n")
        self.pump()
        replies = t.value()
        self.assertTrue(replies.endswith(b"+OK pop.example.org POP3 server signing off (1 messages deleted)\r\n"))
        # One \Seen write for the three RETRs (at QUIT, before the seenDelay
        # ran out), then the \Deleted of UPDATE.
        self.assertEqual(calls, [self.uids, [self.uids[0]]])
        metas = self.messages()
        self.assertEqual([m.uid for m in metas], self.uids[1:])
        self.assertTrue(all("\\Seen" in m.flags for m in metas))

    def test_seen_written_in_batches_while_the_session_goes_on(self):
        calls = []
        proto, t = self.connect(self.factory(store=_Tracking(self.store, self.clock, calls)))
        proto.seenBatch = 2
        self.login(proto, t)
        self.send(proto, t, b"RETR 1\r\n")
        self.assertEqual(calls, [])
        self.send(proto, t, b"RETR 2\r\n")
        self.assertEqual(calls, [self.uids[:2]])  # a full batch goes at once
        self.send(proto, t, b"RETR 3\r\n")
        self.clock.advance(proto.seenDelay)
        # The first write has not finished: the third waits for it ...
        self.assertEqual(calls, [self.uids[:2]])
        self.clock.advance(5)
        self.clock.advance(proto.seenDelay)
        # ... and goes after it, within seenDelay.
        self.assertEqual(calls, [self.uids[:2], self.uids[2:]])
        self.clock.advance(5)
        self.assertTrue(all("\\Seen" in m.flags for m in self.messages()))
        self.assertEqual(self.send(proto, t, b"NOOP\r\n"), b"+OK\r\n")

    def test_seen_written_when_the_connection_drops(self):
        proto, t = self.connect()
        self.login(proto, t)
        self.send(proto, t, b"RETR 2\r\n")
        proto.connectionLost()
        self.assertIn("\\Seen", self.messages()[1].flags)

    def test_sizes_of_many_messages(self):
        for i in range(50):
            self.store.append("alice", "INBOX", b"Subject: %d\n\n%s\n" % (i, b"y\n" * i))
        proto, t = self.connect(self.factory(store=SlowStore(self.store, self.clock)))
        proto.dataReceived(b"USER alice\r\nPASS secret\r\nLIST\r\n")
        self.pump()
        listing = t.value().split(b"+OK 53 messages")[1]
        sizes = [wire.normalisedSize(self.successResultOf(self.store.getContent("alice", "INBOX", m.uid)))
                 for m in self.messages()]
        self.assertIn(b"\r\n53 %d\r\n.\r\n" % sizes[-1], listing)
        self.assertIn(b" (%d octets)\r\n" % sum(sizes), listing)


    def _counting(self):
        calls = {"getContent": 0, "getContents": []}
        store = self.store

        class Counting:
            def __getattr__(self, name):
                method = getattr(store, name)
                if name == "getContent":
                    calls["getContent"] += 1
                elif name == "getContents":
                    def many(user, mailbox, uids):
                        calls["getContents"].append(list(uids))
                        return method(user, mailbox, uids)

                    return many
                return method

        return Counting(), calls

    def test_sequential_retr_reads_ahead_in_batches(self):
        """A download reads many messages per store round trip; every RETR stays byte-exact."""
        bodies = [b"Subject: %d\r\n\r\n.dot %d\nbare\rcr\r\n" % (i, i) for i in range(100)]
        for raw in bodies:
            self.store.append("alice", "INBOX", raw)
        store, calls = self._counting()
        proto, t = self.connect(self.factory(store=store))
        self.login(proto, t)
        for n in range(4, 104):
            raw = bodies[n - 4]
            body = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
            expected = b"+OK %d octets\r\n" % len(body) + body.replace(b"\r\n.", b"\r\n..") + b".\r\n"
            self.assertEqual(self.send(proto, t, b"RETR %d\r\n" % n), expected)
        # Two single reads start the sequence; then about one batch per 16.
        self.assertLessEqual(calls["getContent"], 3)
        self.assertLessEqual(len(calls["getContents"]), 100 // (proto.readAhead // 2) + 2)
        fetched = [u for batch in calls["getContents"] for u in batch]
        self.assertEqual(len(fetched), len(set(fetched)))

    def test_read_ahead_of_a_message_expunged_meanwhile(self):
        for i in range(40):
            self.store.append("alice", "INBOX", b"Subject: %d\r\n\r\nx\r\n" % i)
        proto, t = self.connect()
        self.login(proto, t)
        metas = self.messages()
        # Message 20 goes (an IMAP session expunges it) before the batch is read.
        self.store.storeFlags("alice", "INBOX", [metas[19].uid], "add", ["\\Deleted"])
        self.store.expunge("alice", "INBOX")
        self.assertTrue(self.send(proto, t, b"RETR 1\r\n").startswith(b"+OK"))
        self.assertTrue(self.send(proto, t, b"RETR 2\r\n").startswith(b"+OK"))
        for n in range(3, 20):
            self.assertTrue(self.send(proto, t, b"RETR %d\r\n" % n).startswith(b"+OK"), n)
        self.assertEqual(self.send(proto, t, b"RETR 20\r\n"), b"-ERR Message has been removed from the maildrop\r\n")
        self.assertEqual(self.send(proto, t, b"RETR 21\r\n"), b"+OK 18 octets\r\nSubject: 17\r\n\r\nx\r\n.\r\n")
        self.assertEqual(self.send(proto, t, b"NOOP\r\n"), b"+OK\r\n")

    def test_sizes_measured_in_batches(self):
        for i in range(100):
            self.store.append("alice", "INBOX", b"Subject: %d\n\n%s\n" % (i, b"z\n" * i))
        store, calls = self._counting()
        proto, t = self.connect(self.factory(store=store))
        self.login(proto, t)
        reply = self.send(proto, t, b"STAT\r\n")
        total = sum(wire.normalisedSize(self.successResultOf(self.store.getContent("alice", "INBOX", m.uid)))
                    for m in self.messages())
        self.assertEqual(reply, b"+OK 103 %d\r\n" % total)
        self.assertEqual(calls["getContent"], 0)
        self.assertEqual(len(calls["getContents"]), 1)


class _Tracking:
    """
    A store whose C{storeFlags} answers only after 5 seconds, recording the
    UIDs of every call; everything else answers at once.
    """

    def __init__(self, store, clock, calls):
        self._store = store
        self._clock = clock
        self._calls = calls

    def __getattr__(self, name):
        method = getattr(self._store, name)
        if name != "storeFlags":
            return method

        def storeFlags(user, mailbox, uids, *a, **kw):
            self._calls.append(list(uids))
            d = defer.Deferred()
            self._clock.callLater(5, lambda: method(user, mailbox, uids, *a, **kw).chainDeferred(d))
            return d

        return storeFlags
