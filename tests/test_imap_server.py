"""Tests for mailplat.imap.server: sessions over StringTransport and real sockets."""

from __future__ import annotations

import base64
import imaplib
import re
import ssl

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailplat import tls
from mailplat.imap.server import IMAPFactory, listMatcher
from mailplat.metrics import Metrics
from mailplat.testing import MemoryStore, memoryPortal

MESSAGE = (
    b"Date: Tue, 2 Jan 2024 10:00:00 +0000\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: Quarterly report\r\n"
    b"Message-ID: <r1@example.org>\r\n"
    b"Content-Type: multipart/mixed; boundary=\"XX\"\r\n"
    b"\r\n"
    b"--XX\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Numbers are up.\r\n"
    b"--XX\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"Subject: inner\r\n"
    b"From: carol@example.org\r\n"
    b"\r\n"
    b"Inner body\r\n"
    b"--XX--\r\n"
)


def plain(subject, body=b"hello\r\n", sender=b"someone@example.org", date=b"Mon, 1 Jan 2024 00:00:00 +0000"):
    return (
        b"From: " + sender + b"\r\nTo: alice@example.org\r\nSubject: " + subject + b"\r\nDate: " + date + b"\r\n\r\n" + body
    )


class FakeTLSTransport(StringTransport):
    """A StringTransport that records startTLS."""

    tlsStarted = None

    def startTLS(self, contextFactory):
        self.tlsStarted = contextFactory


class Client:
    def __init__(self, factory, host="127.0.0.1"):
        self.transport = FakeTLSTransport(
            hostAddress=IPv4Address("TCP", host, 143), peerAddress=IPv4Address("TCP", "192.0.2.7", 50000)
        )
        self.proto = factory.buildProtocol(None)
        self.proto.makeConnection(self.transport)
        self.greeting = self.read()

    def read(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def send(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        return self.read()

    def ok(self, line: bytes) -> bytes:
        tag = line.split(b" ", 1)[0]
        out = self.send(line + b"\r\n")
        assert re.search(rb"(^|\r\n)" + re.escape(tag) + rb" OK [^\r\n]*\r\n$", out), out
        return out


class Base(unittest.TestCase):
    allowInsecureAuth = None

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1704067200)  # 2024-01-01
        self.store = MemoryStore(self.clock)
        self.store.createAccount("alice")
        self.metrics = Metrics()
        self.factory = IMAPFactory(
            hostname="imap.example.org",
            portal=memoryPortal({"alice": "secret"}),
            store=self.store,
            tlsContextFactory=object(),
            allowInsecureAuth=self.allowInsecureAuth,
            metrics=self.metrics,
            reactor=self.clock,
            idleTimeout=600,
        )

    def append(self, raw, mailbox="INBOX", flags=(), date=None):
        d = self.store.append("alice", mailbox, raw, flags, date)
        return self.successResultOf(d)[1]

    def loggedIn(self, select=None):
        c = Client(self.factory)
        c.ok(b"L LOGIN alice secret")
        if select:
            c.ok(b"S SELECT " + select)
        return c


class GreetingAndAuthTests(Base):
    def test_greeting(self):
        c = Client(self.factory)
        assert c.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
        assert c.greeting.endswith(b"] imap.example.org IMAP4rev1 mailplat ready\r\n")
        assert b"STARTTLS" in c.greeting and b"AUTH=PLAIN" in c.greeting
        assert self.metrics.get("mailplat_sessions_active", protocol="imap") == 1
        c.proto.connectionLost(None)
        assert self.metrics.get("mailplat_sessions_active", protocol="imap") == 0

    def test_login_and_failure(self):
        c = Client(self.factory)
        out = c.send(b"a LOGIN alice wrong\r\n")
        assert out == b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
        assert self.metrics.get("mailplat_auth_failures_total", protocol="imap") == 1
        out = c.ok(b'b LOGIN "alice" {6+}\r\nsecret')
        assert out.startswith(b"b OK [CAPABILITY IMAP4rev1")
        assert b"a BAD" in c.send(b"a LOGIN alice secret\r\n")

    def test_too_many_failures_disconnects(self):
        c = Client(self.factory)
        for i in range(5):
            out = c.send(b"a LOGIN alice wrong\r\n")
        assert out.endswith(b"* BYE Too many authentication failures\r\n")
        assert c.transport.disconnecting

    def test_logindisabled_on_non_loopback_plaintext(self):
        c = Client(self.factory, host="203.0.113.5")
        assert b"LOGINDISABLED" in c.greeting and b"AUTH=PLAIN" not in c.greeting
        out = c.send(b"a LOGIN alice secret\r\n")
        assert out.startswith(b"a NO [PRIVACYREQUIRED]")
        out = c.send(b"b AUTHENTICATE PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n")
        assert out.startswith(b"b NO [PRIVACYREQUIRED]")
        # after STARTTLS the same commands work
        assert c.send(b"c STARTTLS\r\n") == b"c OK Begin TLS negotiation now\r\n"
        assert c.transport.tlsStarted is self.factory.tlsContextFactory
        caps = c.send(b"d CAPABILITY\r\n")
        assert b"LOGINDISABLED" not in caps and b"STARTTLS" not in caps and b"AUTH=PLAIN" in caps
        c.ok(b"e LOGIN alice secret")

    def test_starttls_discards_pipelined_commands(self):
        c = Client(self.factory, host="203.0.113.5")
        out = c.send(b"a STARTTLS\r\nb LOGIN alice secret\r\nc SELECT INBOX\r\n")
        assert out == b"a OK Begin TLS negotiation now\r\n"
        assert c.proto._state == "notauth"
        # a second STARTTLS is refused
        assert c.send(b"d STARTTLS\r\n").startswith(b"d BAD")

    def test_authenticate_plain_with_initial_response(self):
        c = Client(self.factory)
        out = c.send(b"a AUTHENTICATE PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n")
        assert out.startswith(b"a OK [CAPABILITY")

    def test_authenticate_plain_with_continuation(self):
        c = Client(self.factory)
        assert c.send(b"a AUTHENTICATE PLAIN\r\n") == b"+ \r\n"
        out = c.send(base64.b64encode(b"\0alice\0secret") + b"\r\n")
        assert out.startswith(b"a OK [CAPABILITY")

    def test_authenticate_empty_initial_response(self):
        """SASL-IR (RFC 4959): "=" is an empty initial response, not a request for a challenge."""
        c = Client(self.factory)
        assert c.send(b"a AUTHENTICATE PLAIN =\r\n").startswith(b"a NO [AUTHENTICATIONFAILED]")
        assert c.send(b"b AUTHENTICATE PLAIN\r\n") == b"+ \r\n"

    def test_authenticate_login_mechanism_pipelined_responses(self):
        c = Client(self.factory)
        out = c.send(
            b"a AUTHENTICATE LOGIN\r\n" + base64.b64encode(b"alice") + b"\r\n" + base64.b64encode(b"secret") + b"\r\n"
        )
        assert out.startswith(b"+ " + base64.b64encode(b"Username:") + b"\r\n+ " + base64.b64encode(b"Password:"))
        assert b"a OK [CAPABILITY" in out

    def test_authenticate_cancel_and_bad_base64(self):
        c = Client(self.factory)
        c.send(b"a AUTHENTICATE LOGIN\r\n")
        assert c.send(b"*\r\n") == b"a BAD Authentication cancelled\r\n"
        c.send(b"b AUTHENTICATE LOGIN\r\n")
        assert c.send(b"!!!\r\n").startswith(b"b BAD")
        assert c.send(b"c AUTHENTICATE PLAIN ###\r\n").startswith(b"c BAD")
        padded = base64.b64encode(b"\0alice\0secret") + b"="  # one "=" too many
        assert c.send(b"c AUTHENTICATE PLAIN " + padded + b"\r\n").startswith(b"c BAD")
        assert c.send(b"d AUTHENTICATE CRAM-MD5\r\n").startswith(b"d NO")
        out = c.send(b"e AUTHENTICATE PLAIN " + base64.b64encode(b"\0alice\0bad") + b"\r\n")
        assert out.startswith(b"e NO [AUTHENTICATIONFAILED]")
        c.ok(b"f NOOP")

    def test_state_checks_and_bad_commands(self):
        c = Client(self.factory)
        assert c.send(b"a SELECT INBOX\r\n").startswith(b"a BAD")
        assert c.send(b"b FROB\r\n") == b"b BAD unknown command\r\n"
        assert c.send(b"c FETCH 1 FLAGS\r\n").startswith(b"c BAD")
        assert c.send(b"\r\n").startswith(b"* BAD")
        c.ok(b"d LOGIN alice secret")
        assert c.send(b"e FETCH 1 FLAGS\r\n").startswith(b"e BAD")  # nothing selected
        assert c.send(b'f LOGIN "unterminated\r\n').startswith(b"f BAD")

    def test_authenticate_response_too_long(self):
        c = Client(self.factory)
        c.send(b"a AUTHENTICATE PLAIN\r\n")
        out = c.send(b"A" * 70000 + b"\r\nb NOOP\r\n")
        assert out == b"a BAD Invalid authentication response\r\nb OK NOOP completed\r\n"

    def test_literal_too_big(self):
        self.factory.maxLiteralSize = 100
        c = self.loggedIn()
        out = c.send(b"a APPEND INBOX {101}\r\n")
        assert out == b"a NO [TOOBIG] Literal too big\r\n"
        c.ok(b"b NOOP")

    def test_logout(self):
        c = Client(self.factory)
        assert c.send(b"a LOGOUT\r\nb NOOP\r\n") == b"* BYE IMAP4rev1 Server logging out\r\na OK LOGOUT completed\r\n"
        assert c.transport.disconnecting

    def test_idle_autologout(self):
        c = self.loggedIn()
        self.clock.advance(599)
        c.ok(b"a NOOP")
        self.clock.advance(599)
        assert not c.transport.disconnecting
        self.clock.advance(2)
        assert c.read() == b"* BYE Autologout; idle for too long\r\n"
        assert c.transport.disconnecting
        c.proto.connectionLost(None)
        assert not self.clock.getDelayedCalls()

    def test_too_many_bad_commands(self):
        c = Client(self.factory)
        out = c.send(b"a BOGUS\r\n" * 25)
        assert out.count(b"BAD") == 20 and out.endswith(b"* BYE Too many invalid commands\r\n")


class MailboxTests(Base):
    def test_list_and_hierarchy(self):
        c = self.loggedIn()
        c.ok(b"a CREATE Projects/2024/Q1")
        out = c.ok(b'b LIST "" "*"')
        assert b'* LIST (\\HasChildren) "/" "Projects"\r\n' in out
        assert b'* LIST (\\HasChildren) "/" "Projects/2024"\r\n' in out
        assert b'* LIST (\\HasNoChildren) "/" "Projects/2024/Q1"\r\n' in out
        assert b'* LIST (\\HasNoChildren \\Sent) "/" "Sent"\r\n' in out
        out = c.ok(b'c LIST "" %')
        assert b'"Projects/2024"' not in out and b'"Projects"' in out and b'"INBOX"' in out
        out = c.ok(b'd LIST Projects/ %')
        assert out.startswith(b'* LIST (\\HasChildren) "/" "Projects/2024"\r\nd OK')
        out = c.ok(b'e LIST "" inbox')
        assert out.startswith(b'* LIST (\\HasNoChildren) "/" "INBOX"\r\n')
        out = c.ok(b'f LIST "" ""')
        assert out.startswith(b'* LIST (\\Noselect) "/" ""\r\n')
        assert b"NO [ALREADYEXISTS]" in c.send(b"g CREATE Projects\r\n")
        assert b"NO [ALREADYEXISTS]" in c.send(b"g CREATE inbox\r\n")

    def test_international_names(self):
        c = self.loggedIn()
        c.ok(b"a CREATE Entw&APw-rfe")
        assert "Entwürfe" in [i.name for i in self.successResultOf(self.store.listMailboxes("alice"))]
        out = c.ok(b'b LIST "" Entw*')
        assert b'"Entw&APw-rfe"' in out

    def test_delete_rename_subscribe_lsub(self):
        c = self.loggedIn()
        c.ok(b"a CREATE Old")
        self.append(plain(b"x"), "Old")
        c.ok(b"b RENAME Old New/Name")
        out = c.ok(b"c STATUS New/Name (MESSAGES UIDNEXT UNSEEN)")
        assert out.startswith(b'* STATUS "New/Name" (MESSAGES 1 UIDNEXT 2 UNSEEN 1)\r\n')
        assert b"NO [NONEXISTENT]" in c.send(b"d STATUS Old (MESSAGES)\r\n")
        c.ok(b"e SUBSCRIBE New/Name")
        out = c.ok(b'f LSUB "" *')
        assert b'* LSUB () "/" "New/Name"\r\n' in out and b'"Sent"' in out
        out = c.ok(b'g LSUB "" New')
        assert out.startswith(b"g OK")
        out = c.ok(b'h LSUB "" %')
        assert b'* LSUB (\\Noselect) "/" "New"\r\n' in out
        c.ok(b"i UNSUBSCRIBE New/Name")
        assert b"New/Name" not in c.ok(b'j LSUB "" *')
        assert b"NO [HASCHILDREN]" in c.send(b"k DELETE New\r\n")  # RFC 9051 §7.1
        c.ok(b"l DELETE New/Name")
        assert b"NO [NONEXISTENT]" in c.send(b"m DELETE New/Name\r\n")
        assert b"NO" in c.send(b"n DELETE INBOX\r\n")

    def test_select_and_examine(self):
        self.append(plain(b"one"), flags=["\\Seen"])
        self.append(plain(b"two"), flags=["$Important"])
        c = self.loggedIn()
        out = c.ok(b"a SELECT inbox")
        assert b"* FLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $Important)\r\n" in out
        assert b"* OK [PERMANENTFLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $Important \\*)]" in out
        assert b"* 2 EXISTS\r\n* 2 RECENT\r\n" in out
        assert b"* OK [UNSEEN 2]" in out
        info = self.successResultOf(self.store.getMailbox("alice", "INBOX"))
        assert b"* OK [UIDVALIDITY %d]" % info.uidvalidity in out
        assert b"* OK [UIDNEXT 3]" in out and b"[HIGHESTMODSEQ " in out
        assert out.endswith(b"a OK [READ-WRITE] SELECT completed\r\n")
        out = c.ok(b"b FETCH 1:* FLAGS")
        assert b"* 1 FETCH (FLAGS (\\Recent \\Seen))" in out
        # a second session sees no \Recent: the first one claimed them
        d = self.loggedIn()
        out = d.ok(b"c EXAMINE INBOX")
        assert b"* 0 RECENT" in out and out.endswith(b"c OK [READ-ONLY] EXAMINE completed\r\n")
        assert b"PERMANENTFLAGS ()" in out
        assert d.send(b"d STORE 1 +FLAGS (\\Flagged)\r\n").startswith(b"d NO [READ-ONLY]")
        out = d.ok(b"e FETCH 2 BODY[]")
        assert b"FLAGS" not in out  # no implicit \Seen when read-only
        assert b"NO [NONEXISTENT]" in d.send(b"f SELECT Nope\r\n")
        assert d.send(b"g FETCH 1 FLAGS\r\n").startswith(b"g BAD")  # failed SELECT deselects

    def test_append(self):
        c = self.loggedIn()
        raw = plain(b"appended", body=b"line1\r\nline2\r\n")
        out = c.send(b'a APPEND Sent (\\Seen $Sent) "05-Mar-2024 14:30:00 +0100" {%d}\r\n' % len(raw))
        assert out == b"+ Ready for literal data\r\n"
        out = c.send(raw + b"\r\n")
        assert re.match(rb"a OK \[APPENDUID \d+ 1\] APPEND completed\r\n", out), out
        (meta,) = self.successResultOf(self.store.fetchMeta("alice", "Sent"))
        assert meta.flags == frozenset({"\\Seen", "$Sent"})
        assert meta.internalDate == 1709645400.0
        c.ok(b"b SELECT Sent")
        out = c.ok(b"c FETCH 1 (INTERNALDATE BODY.PEEK[])")
        assert b'INTERNALDATE "05-Mar-2024 13:30:00 +0000"' in out
        assert b"BODY[] {%d}\r\n" % len(raw) + raw + b")" in out
        out = c.send(b"d APPEND Missing {1+}\r\nx\r\n")
        assert out.startswith(b"d NO [TRYCREATE]")
        out = c.send(b"e APPEND INBOX {0+}\r\n\r\n")
        assert out.startswith(b"e NO")


class FetchTests(Base):
    def setUp(self):
        super().setUp()
        self.uid = self.append(MESSAGE, date=1704189600.0)
        self.c = self.loggedIn(select=b"INBOX")

    def literal(self, out, name):
        m = re.search(re.escape(name) + rb" \{(\d+)\}\r\n", out)
        assert m, (name, out)
        start = m.end()
        return out[start : start + int(m.group(1))]

    def test_simple_items(self):
        out = self.c.ok(b"a FETCH 1 (FLAGS UID RFC822.SIZE INTERNALDATE)")
        assert out.startswith(
            b'* 1 FETCH (FLAGS (\\Recent) UID 1 RFC822.SIZE %d INTERNALDATE "02-Jan-2024 10:00:00 +0000")\r\n'
            % len(MESSAGE)
        )
        out = self.c.ok(b"b FETCH 1 ALL")
        assert b"ENVELOPE (" in out and b"RFC822.SIZE" in out

    def test_big_answer_waits_for_the_client(self):
        """
        A FETCH whose answer passes the write chunk registers as a producer and
        stops while the transport is paused (its buffer full: a slow client);
        a small one writes at once without registering.
        """

        class BufferingTransport(FakeTLSTransport):
            """Pauses its producer once 100 KB wait unread, as a real transport does."""

            def write(self, data):
                super().write(data)
                if self.producer is not None and len(self.value()) > 100_000:
                    self.producer.pauseProducing()

        big = plain(b"big", body=b"x" * 40000 + b"\r\n")
        for _ in range(5):
            self.append(big)
        c = Client(self.factory)
        c.transport = BufferingTransport(hostAddress=c.transport.getHost(), peerAddress=c.transport.getPeer())
        c.proto = self.factory.buildProtocol(None)
        c.proto.makeConnection(c.transport)
        c.read()
        c.ok(b"L LOGIN alice secret")
        c.ok(b"S SELECT INBOX")
        c.ok(b"s FETCH 1 (FLAGS)")
        assert c.transport.producer is None
        out = c.send(b"a FETCH 1:6 (BODY.PEEK[])\r\n")
        producer = c.transport.producer
        assert producer is not None, "a big answer is written as the client takes it"
        assert b"a OK" not in out and out.count(b"BODY[] {") < 6
        producer.resumeProducing()
        out += c.read()
        assert b"a OK FETCH completed" in out
        assert out.count(b"BODY[] {") == 6
        assert c.transport.producer is None

    def test_envelopes_kept_by_the_store(self):
        """
        A store that keeps formatted envelopes (IEnvelopeStore) answers FETCH
        ENVELOPE from them; a message it has none for is analysed instead.
        """
        from dataclasses import replace

        from zope.interface import alsoProvides

        from mailplat.interfaces.storage import IEnvelopeStore

        self.append(MESSAGE)
        calls = []
        fetchMeta = self.store.fetchMeta

        def withEnvelopes(user, mailbox, uids=None, withStructure=False, changedSince=None, withEnvelope=False):
            calls.append((withStructure, withEnvelope))
            d = fetchMeta(user, mailbox, uids, withStructure, changedSince)
            if withEnvelope:
                d.addCallback(lambda metas: [replace(m, envelope=b"(KEPT)" if m.uid == 1 else None) for m in metas])
            return d

        self.store.fetchMeta = withEnvelopes
        alsoProvides(self.store, IEnvelopeStore)
        self.c.ok(b"n NOOP")
        out = self.c.ok(b"a FETCH 1:2 (FLAGS ENVELOPE)")
        assert b"* 1 FETCH (FLAGS (\\Recent) ENVELOPE (KEPT))\r\n" in out, out
        assert b'* 2 FETCH (FLAGS (\\Recent) ENVELOPE ("Tue, 2 Jan 2024 10:00:00 +0000" "Quarterly report"' in out, out
        assert calls == [(False, True)]
        # Anything else that needs the structure reads it, as before.
        out = self.c.ok(b"b FETCH 1 (ENVELOPE BODYSTRUCTURE)")
        assert b"ENVELOPE (KEPT)" not in out and b'"Quarterly report"' in out
        assert calls[-1] == (True, False)

    def test_kept_envelopes_with_metadata(self):
        """
        FETCH of metadata and ENVELOPE, every envelope kept by the store, is
        answered from them in the items' order, the same whether the answer
        is built in one piece (a few messages) or item by item (more than
        L{server.ENVELOPES_AT_ONCE}).
        """
        from dataclasses import replace

        from zope.interface import alsoProvides

        from mailplat.imap import server
        from mailplat.interfaces.storage import IEnvelopeStore

        self.append(MESSAGE)
        fetchMeta = self.store.fetchMeta

        def withEnvelopes(user, mailbox, uids=None, withStructure=False, changedSince=None, withEnvelope=False):
            d = fetchMeta(user, mailbox, uids, withStructure, changedSince)
            if withEnvelope:
                d.addCallback(lambda metas: [replace(m, envelope=b"(E%d)" % m.uid) for m in metas])
            return d

        self.store.fetchMeta = withEnvelopes
        alsoProvides(self.store, IEnvelopeStore)
        self.c.ok(b"n NOOP")
        self.c.ok(b"s STORE 2 +FLAGS (\\Flagged $Work)")
        command = b"a UID FETCH 1:* (ENVELOPE RFC822.SIZE FLAGS INTERNALDATE)"
        whole = self.c.ok(command)
        size = len(MESSAGE.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        assert b"* 1 FETCH (UID 1 ENVELOPE (E1) RFC822.SIZE " in whole, whole
        assert b'* 2 FETCH (UID 2 ENVELOPE (E2) RFC822.SIZE %d FLAGS (\\Recent \\Flagged $Work) INTERNALDATE "' % size \
            in whole, whole
        self.patch(server, "ENVELOPES_AT_ONCE", 1)
        assert self.c.ok(command) == whole

    def test_envelope_and_bodystructure(self):
        out = self.c.ok(b"a FETCH 1 (ENVELOPE BODYSTRUCTURE BODY)")
        assert (
            b'ENVELOPE ("Tue, 2 Jan 2024 10:00:00 +0000" "Quarterly report" (("Alice" NIL "alice" "example.org")) '
            b'(("Alice" NIL "alice" "example.org")) (("Alice" NIL "alice" "example.org")) '
            b'(("Bob" NIL "bob" "example.org")) NIL NIL NIL "<r1@example.org>")'
        ) in out
        assert b'BODYSTRUCTURE (("TEXT" "PLAIN" ("charset" "utf-8") NIL NIL "7BIT" 15 1 NIL NIL NIL NIL)' in out
        assert b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 53 (NIL "inner" ((NIL NIL "carol" "example.org"))' in out
        assert b' "MIXED" ("boundary" "XX") NIL NIL NIL)' in out
        assert b'BODY (("TEXT" "PLAIN" ("charset" "utf-8") NIL NIL "7BIT" 15 1)' in out

    def test_sections(self):
        c = self.c
        out = c.ok(b"a FETCH 1 (BODY.PEEK[] BODY.PEEK[]<0.10> BODY.PEEK[]<2000.10> BODY.PEEK[HEADER])")
        assert self.literal(out, b"BODY[]") == MESSAGE
        assert self.literal(out, b"BODY[]<0>") == MESSAGE[:10]
        assert self.literal(out, b"BODY[]<2000>") == b""
        assert self.literal(out, b"BODY[HEADER]") == MESSAGE[: MESSAGE.index(b"\r\n\r\n") + 4]
        out = c.ok(b"b FETCH 1 (BODY.PEEK[HEADER.FIELDS (subject to)] BODY.PEEK[HEADER.FIELDS.NOT (Content-Type)])")
        assert self.literal(out, b"BODY[HEADER.FIELDS (SUBJECT TO)]") == b"To: Bob <bob@example.org>\r\nSubject: Quarterly report\r\n\r\n"
        assert b"Content-Type" not in self.literal(out, b"BODY[HEADER.FIELDS.NOT (CONTENT-TYPE)]")
        out = c.ok(b"c UID FETCH 1 (BODY.PEEK[1] BODY.PEEK[1.MIME] BODY.PEEK[2.HEADER] BODY.PEEK[2.TEXT] BODY.PEEK[2.1] BODY.PEEK[TEXT]<2.4>)")
        assert out.startswith(b"* 1 FETCH (UID 1 ")
        assert self.literal(out, b"BODY[1]") == b"Numbers are up."
        assert self.literal(out, b"BODY[1.MIME]") == b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        assert self.literal(out, b"BODY[2.HEADER]") == b"Subject: inner\r\nFrom: carol@example.org\r\n\r\n"
        assert self.literal(out, b"BODY[2.TEXT]") == b"Inner body"
        assert self.literal(out, b"BODY[2.1]") == b"Inner body"
        assert self.literal(out, b"BODY[TEXT]<2>") == b"XX\r\n"
        out = c.ok(b"d FETCH 1 (RFC822.HEADER RFC822.SIZE)")
        assert self.literal(out, b"RFC822.HEADER").endswith(b'boundary="XX"\r\n\r\n')
        assert b"FLAGS" not in out  # RFC822.HEADER does not set \Seen
        out = c.ok(b"e FETCH 1 BODY.PEEK[9]")
        assert b"BODY[9] {0}\r\n" in out

    def test_non_peek_sets_seen(self):
        out = self.c.ok(b"a FETCH 1 BODY[1]")
        assert out.startswith(b"* 1 FETCH (BODY[1] {15}\r\nNumbers are up. FLAGS (\\Recent \\Seen))\r\n")
        (meta,) = self.successResultOf(self.store.fetchMeta("alice", "INBOX"))
        assert "\\Seen" in meta.flags
        # no duplicate unsolicited FLAGS afterwards
        assert self.c.ok(b"b NOOP") == b"b OK NOOP completed\r\n"
        out = self.c.ok(b"c FETCH 1 (FLAGS RFC822)")
        assert out.count(b"FLAGS") == 1
        assert self.literal(out, b"RFC822") == MESSAGE
        out = self.c.ok(b"d FETCH 1 RFC822.TEXT")
        assert self.literal(out, b"RFC822.TEXT") == MESSAGE[MESSAGE.index(b"\r\n\r\n") + 4 :]

    def test_sequence_errors(self):
        assert self.c.send(b"a FETCH 2 FLAGS\r\n").startswith(b"a BAD")
        assert self.c.ok(b"b UID FETCH 2:10 FLAGS") == b"b OK FETCH completed\r\n"
        out = self.c.ok(b"c UID FETCH 5:* FLAGS")  # n:* includes the highest UID
        assert out.startswith(b"* 1 FETCH (UID 1 FLAGS")

    def test_stale_structure_is_recomputed(self):
        box = self.store._accounts["alice"]["INBOX"]
        box.messages[self.uid].structure = None
        out = self.c.ok(b"a FETCH 1 (ENVELOPE BODY.PEEK[2.TEXT])")
        assert b'"Quarterly report"' in out and b"BODY[2.TEXT] {10}\r\nInner body" in out


class StoreSearchExpungeTests(Base):
    def setUp(self):
        super().setUp()
        self.append(plain(b"Alpha", sender=b"Ann <ann@example.org>"), date=1700000000.0)
        self.append(plain(b"Beta =?utf-8?q?Gr=C3=BC=C3=9Fe?=", body=b"the secret word\r\n"), flags=["\\Seen"])
        self.append(plain(b"Gamma", date=b"Wed, 10 Jan 2024 23:30:00 -0800"), flags=["\\Flagged", "$Work"])
        self.append(
            b"Subject: Delta\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.b64encode("Käsekuchen".encode("utf-8")) + b"\r\n",
            flags=["\\Seen", "\\Answered"],
        )
        self.append(plain(b"Epsilon", body=b"x" * 5000))
        self.c = self.loggedIn(select=b"INBOX")

    def search(self, criteria, uid=False):
        out = self.c.ok((b"s UID SEARCH " if uid else b"s SEARCH ") + criteria)
        line = out.split(b"\r\n")[0]
        assert line.startswith(b"* SEARCH"), out
        return [int(x) for x in line.split()[2:]]

    def test_anAnswerIsOneWrite(self):
        """A command's untagged responses, the other sessions' news and its tagged answer go out in one write."""
        other = self.loggedIn(select=b"INBOX")
        other.ok(b"o STORE 2 +FLAGS ($Other)")
        writes = []
        real = self.c.transport.write
        self.c.transport.write = lambda data: (writes.append(data), real(data))[1]
        out = self.c.ok(b"a STORE 1 +FLAGS (\\Flagged)")
        assert b"* 1 FETCH (FLAGS" in out and b"* 2 FETCH (FLAGS" in out, out
        self.assertEqual(writes, [out])

    def test_store(self):
        c = self.c
        out = c.ok(b"a STORE 1 +FLAGS (\\Deleted $Label)")
        assert out.startswith(b"* 1 FETCH (FLAGS (\\Recent \\Deleted $Label))\r\n")
        out = c.ok(b"b STORE 1 -FLAGS ($label)")
        assert out.startswith(b"* 1 FETCH (FLAGS (\\Recent \\Deleted))\r\n")
        out = c.ok(b"c STORE 1:2 FLAGS.SILENT (\\Draft)")
        assert out == b"c OK STORE completed\r\n"
        out = c.ok(b"d UID STORE 2 FLAGS (\\Seen)")
        assert out.startswith(b"* 2 FETCH (FLAGS (\\Recent \\Seen) UID 2)\r\n")
        assert b"BAD" in c.send(b"e STORE 1 FLAGS (\\Recent \\Bogus)\r\n")

    def test_search_keys(self):
        assert self.search(b"ALL") == [1, 2, 3, 4, 5]
        assert self.search(b"SEEN") == [2, 4]
        assert self.search(b"UNSEEN") == [1, 3, 5]
        assert self.search(b"FLAGGED") == [3]
        assert self.search(b"ANSWERED") == [4]
        assert self.search(b"UNANSWERED NOT FLAGGED") == [1, 2, 5]
        assert self.search(b"KEYWORD $work") == [3]
        assert self.search(b"UNKEYWORD $Work") == [1, 2, 4, 5]
        assert self.search(b"FROM ann") == [1]
        assert self.search(b"FROM ANN@EXAMPLE") == [1]
        assert self.search(b"SUBJECT gamma") == [3]
        assert self.search(b"CHARSET UTF-8 SUBJECT {7+}\r\n" + "Grüße".encode()) == [2]  # RFC 2047 decoded
        assert self.search(b"HEADER Content-Transfer-Encoding base64") == [4]
        assert self.search(b'HEADER Content-Transfer-Encoding ""') == [4]
        assert self.search(b"TO alice") == [1, 2, 3, 5]
        assert self.search(b"BODY secret") == [2]
        assert self.search(b"BODY {11+}\r\n" + "KÄSEKUCHEN".encode()) == [4]  # base64 + charset decoded
        assert self.search(b"TEXT delta") == [4]
        assert self.search(b"LARGER 1000") == [5]
        assert self.search(b"SMALLER 1000") == [1, 2, 3, 4]
        assert self.search(b"OR SUBJECT alpha SUBJECT beta") == [1, 2]
        assert self.search(b"2:3,5") == [2, 3, 5]
        assert self.search(b"*") == [5]
        assert self.search(b"UID 4:*") == [4, 5]
        assert self.search(b"NOT (OR SEEN OR FLAGGED LARGER 1000)") == [1]
        assert self.search(b"(SEEN OR FLAGGED LARGER 1000)") == []
        assert self.search(b"RECENT") == [1, 2, 3, 4, 5]
        assert self.search(b"NEW") == [1, 3, 5]
        assert self.search(b"OLD") == []
        assert self.search(b"SENTON 10-Jan-2024") == [3]  # the Date field's own day
        assert self.search(b"SENTBEFORE 2-Jan-2024") == [1, 2, 5]
        assert self.search(b"SENTSINCE 2-Jan-2024") == [3]
        assert self.search(b"BEFORE 15-Nov-2023") == [1]
        assert self.search(b"ON 14-Nov-2023") == [1]
        assert self.search(b"SINCE 15-Nov-2023") == [2, 3, 4, 5]
        assert self.search(b"CHARSET UTF-8 BODY secret") == [2]
        assert self.search(b"UID 2:3", uid=True) == [2, 3]
        out = self.c.send(b"x SEARCH CHARSET KOI8-R ALL\r\n")
        assert out == b"x NO [BADCHARSET (UTF-8 US-ASCII)] Unsupported charset\r\n"

    def test_expunge_renumbers(self):
        c = self.c
        c.ok(b"a STORE 2,4 +FLAGS.SILENT (\\Deleted)")
        out = c.ok(b"b EXPUNGE")
        assert out == b"* 4 EXPUNGE\r\n* 2 EXPUNGE\r\nb OK EXPUNGE completed\r\n"
        out = c.ok(b"c FETCH 1:* UID")
        assert out == b"* 1 FETCH (UID 1)\r\n* 2 FETCH (UID 3)\r\n* 3 FETCH (UID 5)\r\nc OK FETCH completed\r\n"
        assert self.search(b"ALL", uid=True) == [1, 3, 5]
        c.ok(b"d UID STORE 1,5 +FLAGS.SILENT (\\Deleted)")
        out = c.ok(b"e UID EXPUNGE 5")
        assert out == b"* 3 EXPUNGE\r\ne OK EXPUNGE completed\r\n"
        c.ok(b"f CLOSE")
        assert [m.uid for m in self.successResultOf(self.store.fetchMeta("alice", "INBOX"))] == [3]
        assert c.send(b"g FETCH 1 UID\r\n").startswith(b"g BAD")

    def test_unselect_does_not_expunge(self):
        self.c.ok(b"a STORE 1 +FLAGS (\\Deleted)")
        self.c.ok(b"b UNSELECT")
        assert len(self.successResultOf(self.store.fetchMeta("alice", "INBOX"))) == 5

    def test_copy(self):
        out = self.c.ok(b"a COPY 2:3,5 Archive")
        assert re.search(rb"a OK \[COPYUID \d+ 2:3,5 1:3\] COPY completed", out)
        metas = self.successResultOf(self.store.fetchMeta("alice", "Archive"))
        assert [sorted(m.flags) for m in metas] == [["\\Seen"], ["$Work", "\\Flagged"], []]
        out = self.c.ok(b"b UID COPY 1 Archive")
        assert b"[COPYUID" in out and b" 1 4]" in out
        assert self.c.send(b"c COPY 1 Nowhere\r\n").startswith(b"c NO [TRYCREATE]")
        # MOVE is COPY then expunge (RFC 6851 §3.1): the same code for a missing target
        assert self.c.send(b"d MOVE 1 Nowhere\r\n").startswith(b"d NO [TRYCREATE]")
        assert self.c.send(b"e UID MOVE 1:* Nowhere\r\n").startswith(b"e NO [TRYCREATE]")


class ConcurrencyTests(Base):
    def setUp(self):
        super().setUp()
        for i in range(3):
            self.append(plain(b"msg %d" % i))
        self.a = self.loggedIn(select=b"INBOX")
        self.b = self.loggedIn(select=b"INBOX")

    def test_flags_and_expunge_seen_by_other_session(self):
        a, b = self.a, self.b
        b.ok(b"x STORE 2 +FLAGS (\\Flagged)")
        out = a.ok(b"n NOOP")
        assert out == b"* 2 FETCH (FLAGS (\\Recent \\Flagged) UID 2)\r\nn OK NOOP completed\r\n"
        b.ok(b"y STORE 1 +FLAGS.SILENT (\\Deleted)")
        b.ok(b"z EXPUNGE")
        # during FETCH, STORE and SEARCH no EXPUNGE may be sent: message 1
        # keeps its number and cannot be fetched any more
        out = a.send(b"f FETCH 1:* UID\r\n")
        assert out == (
            b"* 2 FETCH (UID 2)\r\n* 3 FETCH (UID 3)\r\n"
            b"f NO [EXPUNGEISSUED] Some messages were expunged meanwhile\r\n"
        )
        out = a.ok(b"s SEARCH ALL")
        assert b"EXPUNGE" not in out and out.startswith(b"* SEARCH 2 3\r\n")
        out = a.ok(b"n2 NOOP")
        assert out == b"* 1 EXPUNGE\r\nn2 OK NOOP completed\r\n"
        out = a.ok(b"f2 FETCH 1:* UID")
        assert out == b"* 1 FETCH (UID 2)\r\n* 2 FETCH (UID 3)\r\nf2 OK FETCH completed\r\n"

    def test_uid_commands_may_send_expunge(self):
        self.b.ok(b"y STORE 3 +FLAGS.SILENT (\\Deleted)")
        self.b.ok(b"z EXPUNGE")
        out = self.a.ok(b"f UID FETCH 1 UID")
        assert out == b"* 1 FETCH (UID 1)\r\n* 3 EXPUNGE\r\nf OK FETCH completed\r\n"

    def test_new_mail_announced(self):
        self.append(plain(b"new"))
        out = self.a.ok(b"n NOOP")
        assert out == b"* 4 EXISTS\r\n* 4 RECENT\r\nn OK NOOP completed\r\n"
        out = self.b.ok(b"n NOOP")
        assert out == b"* 4 EXISTS\r\n* 0 RECENT\r\nn OK NOOP completed\r\n"
        out = self.b.ok(b"f FETCH 4 (UID FLAGS)")
        assert out.startswith(b"* 4 FETCH (UID 4 FLAGS ())")
        out = self.a.ok(b"f FETCH 4 FLAGS")
        assert out.startswith(b"* 4 FETCH (FLAGS (\\Recent))")

    def test_appended_then_expunged_before_announcement(self):
        uid = self.append(plain(b"brief"))
        self.successResultOf(self.store.storeFlags("alice", "INBOX", [uid], "add", ["\\Deleted"]))
        self.successResultOf(self.store.expunge("alice", "INBOX"))
        out = self.a.ok(b"n NOOP")
        assert out == b"n OK NOOP completed\r\n"


class ErrorHandlingTests(Base):
    def test_store_crash_gives_no_without_internals(self):
        c = self.loggedIn(select=None)

        def broken(*a, **kw):
            return defer.fail(RuntimeError("database file /var/secret is corrupt"))

        self.store.getMailbox = self.store.selectData = broken
        out = c.send(b"a SELECT INBOX\r\n")
        assert out == b"a NO [SERVERBUG] Internal server error\r\n"
        assert len(self.flushLoggedErrors(RuntimeError)) == 1
        c.ok(b"b NOOP")


class DelayedStore:
    """Wraps a store so that every answer arrives later on the clock."""

    def __init__(self, inner, clock):
        self._inner = inner
        self._clock = clock

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        method = getattr(self._inner, name)
        if name == "addListener":
            return method

        def call(*a, **kw):
            d = defer.Deferred()
            inner = method(*a, **kw)
            self._clock.callLater(1, lambda: inner.chainDeferred(d))
            return d

        return call


class AsyncStoreTests(Base):
    def test_pipelined_commands_answered_in_order(self):
        self.append(plain(b"one"))
        self.factory.store = DelayedStore(self.store, self.clock)
        c = Client(self.factory)
        assert c.send(b"a LOGIN alice secret\r\n").startswith(b"a OK")
        out = c.send(b"b SELECT INBOX\r\nc FETCH 1 (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\nd NOOP\r\ne APPEND INBOX {3+}\r\nabc\r\n")
        assert out == b""
        for _ in range(20):
            self.clock.advance(1)
            out += c.read()
        tags = re.findall(rb"^([a-e]) (?:OK|NO|BAD)", out, re.M)
        assert tags == [b"b", b"c", b"d", b"e"], out
        assert b"Subject: one" in out
        assert out.index(b"* 1 FETCH") > out.index(b"b OK") and out.index(b"* 1 FETCH") < out.index(b"c OK")
        assert b"* 2 EXISTS" in out


    def test_sync_literal_waits_for_previous_command(self):
        self.factory.store = DelayedStore(self.store, self.clock)
        c = self.loggedIn()
        out = c.send(b"a SELECT INBOX\r\nb APPEND INBOX {5}\r\n")
        assert out == b""  # no "+" while SELECT is still running
        self.clock.advance(1)
        self.clock.advance(1)
        self.clock.advance(1)
        out = c.read()
        assert out.endswith(b"a OK [READ-WRITE] SELECT completed\r\n+ Ready for literal data\r\n"), out
        c.send(b"hello\r\n")
        for _ in range(5):
            self.clock.advance(1)
        out = c.read()
        assert b"b OK [APPENDUID" in out and b"* 1 EXISTS" in out

    def test_reading_paused_while_busy_with_much_input(self):
        self.factory.store = DelayedStore(self.store, self.clock)
        c = self.loggedIn()
        big = b"x" * 1_200_000
        c.send(b"a SELECT INBOX\r\nb APPEND INBOX {%d+}\r\n" % len(big) + big + b"\r\n")
        assert c.transport.producerState == "paused"
        for _ in range(10):
            self.clock.advance(1)
        assert c.transport.producerState == "producing"
        out = c.read()
        assert b"a OK" in out and b"b OK [APPENDUID" in out
        uid = int(re.search(rb"APPENDUID \d+ (\d+)", out).group(1))
        self.assertEqual(self.successResultOf(self.store.getContent("alice", "INBOX", uid)), big)


def test_list_matcher():
    m = listMatcher("INBOX/%")
    assert m("INBOX/a") and not m("INBOX/a/b") and not m("INBOX")
    m = listMatcher("inbox")
    assert m("INBOX")
    m = listMatcher("a*z")
    assert m("a/b/z") and m("az") and not m("a/b")
    m = listMatcher("a.b(c)")
    assert m("a.b(c)") and not m("aXb(c)")


# --- real sockets -------------------------------------------------------------


class RealSocketTests(unittest.TestCase):
    def setUp(self):
        self.store = MemoryStore()
        self.successResultOf(self.store.createAccount("alice"))
        certDir = self.mktemp()
        cert, key = tls.ensureCertificate(certDir)
        self.factory = IMAPFactory(
            hostname="localhost",
            portal=memoryPortal({"alice": "secret"}),
            store=self.store,
            tlsContextFactory=tls.serverContextFactory(cert, key),
            allowInsecureAuth=False,
        )
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.portNumber = self.port.getHost().port

    def clientContext(self):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    @defer.inlineCallbacks
    def test_imaplib_starttls_append_fetch_byte_exact(self):
        raw = MESSAGE + b"Trailing line without CRLF, 8-bit: \xc3\xa9 \x00 NUL"  # imaplib turns lone LF into CRLF

        def talk():
            m = imaplib.IMAP4("127.0.0.1", self.portNumber)
            try:
                caps = m.capabilities
                assert "LOGINDISABLED" in caps and "STARTTLS" in caps
                try:
                    m.login("alice", "secret")
                except imaplib.IMAP4.error:
                    pass
                else:
                    raise AssertionError("plaintext login was accepted")
                m.starttls(self.clientContext())
                m.login("alice", "secret")
                typ, data = m.append("INBOX", "(\\Flagged)", None, raw)
                assert typ == "OK", data
                m.select("INBOX")
                typ, data = m.fetch("1", "(BODY.PEEK[] FLAGS)")
                assert typ == "OK"
                body = data[0][1]
                typ, data2 = m.uid("FETCH", "1", "(BODY[HEADER.FIELDS (SUBJECT)] BODYSTRUCTURE)")
                typ, found = m.search(None, "SUBJECT", '"Quarterly"')
                m.store("1", "+FLAGS", "\\Deleted")
                typ, gone = m.expunge()
                return body, data, data2, found, gone
            finally:
                try:
                    m.logout()
                except Exception:
                    pass

        body, data, data2, found, gone = yield threads.deferToThread(talk)
        # Byte for byte, but for the NUL: a literal carries CHAR8 only (RFC 3501 §9)
        assert body == raw.replace(b"\x00", b"\x80")
        assert b"\\Flagged" in data[1]
        assert data2[0][1] == b"Subject: Quarterly report\r\n\r\n"
        assert found == [b"1"]
        assert gone == [b"1"]
        self.assertEqual(self.successResultOf(self.store.fetchMeta("alice", "INBOX")), [])

    @defer.inlineCallbacks
    def test_imapclient(self):
        imapclient = __import__("imapclient")
        self.successResultOf(self.store.append("alice", "INBOX", MESSAGE, ["\\Seen"]))

        def talk():
            c = imapclient.IMAPClient("127.0.0.1", port=self.portNumber, ssl=False)
            try:
                c.starttls(self.clientContext())
                c.login("alice", "secret")
                folders = c.list_folders()
                c.create_folder("Reports/2024")
                info = c.select_folder("INBOX")
                fetched = c.fetch([1], ["ENVELOPE", "BODYSTRUCTURE", "FLAGS", "RFC822.SIZE", "BODY.PEEK[1]"])
                uids = c.search(["FROM", "alice"])
                status = c.folder_status("Reports/2024", ["MESSAGES", "UIDNEXT"])
                c.copy([1], "Reports/2024")
                return folders, info, fetched, uids, status
            finally:
                c.logout()

        folders, info, fetched, uids, status = yield threads.deferToThread(talk)
        names = [f[2] for f in folders]
        assert "INBOX" in names and "Sent" in names
        assert (b"\\HasNoChildren", b"\\Sent") in [f[0] for f in folders]
        assert info[b"EXISTS"] == 1 and info[b"READ-WRITE"]
        msg = fetched[1]
        env = msg[b"ENVELOPE"]
        assert env.subject == b"Quarterly report"
        assert env.from_[0].mailbox == b"alice" and env.from_[0].host == b"example.org"
        bs = msg[b"BODYSTRUCTURE"]
        assert bs.is_multipart and bs[1] == b"MIXED"
        assert msg[b"BODY[1]"] == b"Numbers are up."
        assert msg[b"RFC822.SIZE"] == len(MESSAGE)
        assert uids == [1]
        assert status[b"MESSAGES"] == 0 and status[b"UIDNEXT"] == 1
        metas = self.successResultOf(self.store.fetchMeta("alice", "Reports/2024"))
        assert len(metas) == 1


# --- robustness -------------------------------------------------------------

_FRAGMENTS = [
    b"a FETCH 1:* (FLAGS BODY[1.2.MIME] BODY.PEEK[HEADER.FIELDS (X)]<0.5> ENVELOPE BODYSTRUCTURE)\r\n",
    b"b STORE 1 +FLAGS (\\Deleted)\r\n",
    b"c EXPUNGE\r\n",
    b"d SEARCH OR BODY x NOT HEADER y z\r\n",
    b"e APPEND INBOX {3+}\r\nabc\r\n",
    b"f UID FETCH 1:* RFC822\r\n",
    b"g SELECT INBOX\r\n",
    b"h COPY 1:2 Sent\r\n",
    b"i LIST \"\" *\r\n",
    b"j CLOSE\r\n",
    b"k FETCH 9 FLAGS\r\n",
    b"{5}\r\n",
    b"(((\r\n",
    b"\x00\xff\r\n",
    b"l AUTHENTICATE PLAIN\r\n",
    b"*\r\n",
    b"m UID EXPUNGE 1:*\r\n",
    b"n STATUS INBOX (MESSAGES RECENT)\r\n",
    b"o UNSELECT\r\n",
    b"p RENAME Sent Sent2\r\n",
]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS) | st.binary(max_size=30), max_size=25))
def test_random_sessions_never_break(chunks):
    from twisted.logger import globalLogPublisher

    errors = []

    def observer(event):
        if event.get("log_failure") is not None:
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        clock = task.Clock()
        store = MemoryStore(clock)
        store.createAccount("alice")
        store.append("alice", "INBOX", MESSAGE)
        store.append("alice", "INBOX", plain(b"two"))
        factory = IMAPFactory(
            hostname="h", portal=memoryPortal({"alice": "secret"}), store=store, reactor=clock, tlsContextFactory=object()
        )
        c = Client(factory)
        c.send(b"L LOGIN alice secret\r\nS SELECT INBOX\r\n")
        out = c.send(b"".join(chunks))
        assert b"Traceback" not in out
        assert not errors, errors
        # the connection is only closed after saying why
        assert not c.transport.disconnecting or b"* BYE" in out
    finally:
        globalLogPublisher.removeObserver(observer)


class KnownTests(unittest.TestCase):
    """The per-session record of flags shown: SELECT arrays under later changes."""

    def test_snapshot_then_changes(self):
        from mailplat.imap.server import _Known

        seen = frozenset({"\\Seen"})
        known = _Known((2, 5, 9), (seen, frozenset(), seen), (3, 4, 7))
        self.assertEqual(known.get(5), (frozenset(), 4))
        self.assertIn(9, known)
        self.assertNotIn(3, known)
        self.assertEqual(known.get(3, (None, 0)), (None, 0))
        with self.assertRaises(KeyError):
            known[10]
        known[5] = (seen, 8)
        self.assertEqual(known[5], (seen, 8))
        known[11] = (frozenset(), 12)  # appended after SELECT
        self.assertEqual(known[11], (frozenset(), 12))
        self.assertEqual(known.pop(2), (seen, 3))
        self.assertNotIn(2, known)
        self.assertIsNone(known.pop(2))
        known.pop(5)
        self.assertNotIn(5, known)
        self.assertEqual(known.get(9), (seen, 7))


def test_storeRecentClaimsAreCoalesced():
    # New mail seen by a session clears the store's \Recent at most once
    # per STORE_CLAIM_DELAY for a mailbox, however many messages came.
    from twisted.internet.task import Clock

    from mailplat.imap.server import STORE_CLAIM_DELAY

    class Store:
        def __init__(self):
            self.calls = []

        def claimRecent(self, user, mailbox):
            self.calls.append((user, mailbox))
            return defer.succeed([])

    clock, store = Clock(), Store()
    factory = IMAPFactory(hostname="h", portal=memoryPortal({}), store=store, reactor=clock)
    for _ in range(3):
        factory.claimRecentInStore(store, "u", "INBOX")
    factory.claimRecentInStore(store, "u", "Other")
    assert store.calls == []
    clock.advance(STORE_CLAIM_DELAY)
    assert sorted(store.calls) == [("u", "INBOX"), ("u", "Other")]
    factory.claimRecentInStore(store, "u", "INBOX")
    factory.stopFactory()
    clock.advance(STORE_CLAIM_DELAY)
    assert len(store.calls) == 2 and not clock.getDelayedCalls()


class MailboxTreeAndRecentTests(Base):
    def test_rename_under_itself_is_refused(self):
        c = self.loggedIn()
        c.ok(b"c CREATE Proj/Old")
        out = c.send(b"r RENAME Proj/Old Proj/Old/Archive/2024\r\n")
        assert out.startswith(b"r NO [CANNOT]"), out
        assert [i.name for i in self.successResultOf(self.store.listMailboxes("alice")) if i.name.startswith("Proj")] \
            == ["Proj", "Proj/Old"]
        c.ok(b"r2 RENAME INBOX INBOX/Saved")  # INBOX's messages move; INBOX stays

    def test_refused_rename_creates_nothing(self):
        self.successResultOf(self.store.createMailbox("alice", "other2"))
        self.successResultOf(self.store.createMailbox("alice", "top2/kid"))  # top2: a placeholder
        c = self.loggedIn()
        out = c.send(b"r RENAME other2 top2/kid\r\n")
        assert out.startswith(b"r NO [ALREADYEXISTS]"), out
        names = {i.name for i in self.successResultOf(self.store.listMailboxes("alice"))}
        assert "top2" not in names and "other2" in names
        c.ok(b"r2 RENAME other2 deeper/still/kid")
        names = {i.name for i in self.successResultOf(self.store.listMailboxes("alice"))}
        assert {"deeper", "deeper/still", "deeper/still/kid"} <= names and "other2" not in names

    def test_has_children_through_a_placeholder(self):
        # RFC 3348: a mailbox whose only child is a \Noselect placeholder still has children.
        self.successResultOf(self.store.createMailbox("alice", "a"))
        self.successResultOf(self.store.createMailbox("alice", "a/b/c"))
        out = self.loggedIn().ok(b'l LIST "" "*"')
        assert b'* LIST (\\HasChildren) "/" "a"\r\n' in out
        assert b'* LIST (\\Noselect \\HasChildren) "/" "a/b"\r\n' in out

    def test_examine_shows_recent_messages_it_counts(self):
        for i in range(2):
            self.append(plain(b"new %d" % i))
        c = self.loggedIn()
        out = c.ok(b"e EXAMINE INBOX")
        assert b"* 2 RECENT\r\n" in out
        out = c.ok(b"f FETCH 1:* FLAGS")
        assert out.count(b"\\Recent") == 2, out
        assert c.ok(b"s SEARCH RECENT").startswith(b"* SEARCH 1 2\r\n")
        # EXAMINE claimed nothing: SELECT still gets them.
        assert b"* 2 RECENT\r\n" in c.ok(b"s2 SELECT INBOX")

    def test_one_session_of_a_process_gets_recent(self):
        a = self.loggedIn(select=b"INBOX")
        self.append(plain(b"arrives"))
        assert a.ok(b"n NOOP").startswith(b"* 1 EXISTS\r\n* 1 RECENT\r\n")
        # A second session selecting before the first one's claim reached the store.
        b = self.loggedIn()
        assert b"* 0 RECENT\r\n" in b.ok(b"s SELECT INBOX")
        assert b"\\Recent" not in b.ok(b"f FETCH 1 FLAGS")
        e = self.loggedIn()
        assert b"* 0 RECENT\r\n" in e.ok(b"e EXAMINE INBOX")
        assert b"\\Recent" not in e.ok(b"f FETCH 1 FLAGS")


def test_list_patterns_with_many_wildcards():
    # "*a*a*a...b" as a regular expression backtracks for hours on a long
    # name it does not match (one LIST would stall every session of the
    # process): such patterns are matched by a set of states instead.
    import random

    for pattern in ("*a" * 30 + "b", "%a" * 30 + "b", "*%" * 40 + "z"):
        assert not listMatcher(pattern)("a" * 1000)
    assert listMatcher("*a*b*c*")("xaybzc/q") and not listMatcher("%a%b%c%")("xaybzc/q")
    assert listMatcher("inbox/*%*")("INBOX/x") and listMatcher("*/*/*")("a/b/c") and not listMatcher("*/*/*")("a/b")

    def reference(p):  # the grammar as a regular expression, on names short enough for it
        r = re.compile("".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in p), re.DOTALL)
        return lambda name: r.fullmatch(name) is not None

    rng = random.Random(7)
    for _ in range(5000):
        p = "".join(rng.choice("ab/*%") for _ in range(rng.randint(0, 9)))
        name = "".join(rng.choice("ab/") for _ in range(rng.randint(0, 9)))
        assert listMatcher(p)(name) == reference(p)(name), (p, name)


class RefusedCreateTests(Base):
    def test_a_refused_create_makes_no_parents(self):
        c = self.loggedIn()
        for name in (b'"p1/p2/.."', b'"' + b"/".join([b"lvl"] * 600) + b'"'):
            assert c.send(b"c CREATE " + name + b"\r\n").startswith(b"c NO"), name
        names = {i.name for i in self.successResultOf(self.store.listMailboxes("alice"))}
        assert not {n for n in names if n.startswith(("p1", "lvl"))}, names


class UnreadRepliesTests(unittest.TestCase):
    """A client that pipelines commands and never reads: the server stops taking them, loses none."""

    def setUp(self):
        self.factory = IMAPFactory(hostname="localhost", portal=memoryPortal({"alice": "secret"}),
                                   store=MemoryStore(), allowInsecureAuth=True)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        import socket

        # Small kernel buffers: what the client can push past a server that
        # stopped reading is theirs, and the test stays short.
        self.port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    @defer.inlineCallbacks
    def test_commands_wait_while_replies_wait(self):
        from unread import pushUnread

        from mailplat import net

        self.patch(net, "WRITE_BACKLOG", 64 * 1024)
        port = self.port.getHost().port

        def flood():
            line = b"a NOOP\r\n"
            s, sent = pushUnread(port, line)
            try:
                # The server stopped reading once its unsent replies passed the
                # limit: far fewer commands than the client tried to send.
                assert sent < 2 * 1024 * 1024, sent
                # Every whole command sent gets its answer once the client reads.
                commands, answered, buf = sent // len(line), 0, b""
                while answered < commands:
                    buf += s.recv(1 << 20)
                    answered += buf.count(b"a OK NOOP completed\r\n")
                    buf = buf[buf.rfind(b"\n") + 1:]
                assert answered == commands, (answered, commands)
            finally:
                s.close()

        yield threads.deferToThread(flood)


class PausingTransport(FakeTLSTransport):
    """Asks its producer to pause once C{limit} octets wait, as a TCP transport does when the client reads slowly."""

    limit = 256 * 1024

    def write(self, data):
        super().write(data)
        if self.producer is not None and self.streaming and len(self.value()) > self.limit:
            self.producer.pauseProducing()


class ManyItemsFetchTests(Base):
    def test_items_of_a_big_message_wait_for_the_client(self):
        # FETCH of the same big section many times: written item by item as
        # the client takes them, not all built in memory first.
        body = b"".join(b"line %06d of a big message\r\n" % i for i in range(20000))  # ~600 KB
        self.append(b"Subject: big\r\n\r\n" + body)
        c = Client(self.factory)
        c.transport = PausingTransport(hostAddress=c.transport.getHost(), peerAddress=c.transport.getPeer())
        c.proto.makeConnection(c.transport)
        c.read()
        c.ok(b"L LOGIN alice secret")
        c.ok(b"S SELECT INBOX")
        c.proto.dataReceived(b"f FETCH 1 (" + b" ".join([b"BODY.PEEK[TEXT]"] * 40) + b")\r\n")
        waiting = c.transport.value()
        # Paused: far less than the 24 MB answer, at most a chunk past the limit and an item.
        assert len(waiting) < PausingTransport.limit + 2 * len(body), len(waiting)
        out = waiting
        for _ in range(200):
            c.transport.clear()
            c.transport.producer.resumeProducing()
            out += c.transport.value()
            if out.endswith(b"f OK FETCH completed\r\n"):
                break
        assert out.endswith(b"f OK FETCH completed\r\n")
        assert out.count(b"BODY[TEXT] {%d}\r\n" % len(body) + body) == 40
        assert out.startswith(b"* 1 FETCH (BODY[TEXT] {%d}\r\n" % len(body))
