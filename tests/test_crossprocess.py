"""
Changes made through one SQLiteStore are noticed by another one on the same
files (as when mailplat-smtp delivers and mailplat-imap serves the mailbox):
the store reports them as "changed" events and IMAP sessions read them back.
"""

import os
import re

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailplat.imap.server import IMAPFactory
from mailplat.store.sqlite import SQLiteStore
from mailplat.testing import memoryPortal

USER = "alice@example.org"


def message(n):
    return f"From: bob@example.org\r\nSubject: message {n}\r\n\r\nbody {n}\r\n".encode()


class TwoStores(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        self.writer = SQLiteStore(directory, reactor)  # "the other process"
        self.writer.changePollInterval = 0
        yield self.writer.open()
        yield self.writer.createAccount(USER)
        for n in (1, 2, 3):
            yield self.writer.append(USER, "INBOX", message(n))
        self.reader = SQLiteStore(directory, reactor)
        self.reader.changePollInterval = 0.05
        yield self.reader.open()
        self.addCleanup(self.reader.close)
        self.addCleanup(self.writer.close)

    written = None

    def session(self):
        """An IMAP session on the reading store, over a StringTransport."""
        factory = IMAPFactory(hostname="imap.example.org", portal=memoryPortal({USER: "pw"}),
                              store=self.reader, reactor=reactor)
        self.addCleanup(factory.stopFactory)  # a pending \Recent claim
        proto = factory.buildProtocol(None)
        transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 143),
                                    peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        proto.makeConnection(transport)
        self.addCleanup(proto.connectionLost, None)
        self.written = transport.value
        return proto, transport

    @defer.inlineCallbacks
    def command(self, proto, transport, line, tag):
        """Send one command line to a session; what it wrote, once the tagged answer came."""
        transport.clear()
        proto.dataReceived(line)
        yield self.until(lambda: re.search(tag + rb" (OK|NO|BAD)", transport.value()), line)
        return transport.value()

    @defer.inlineCallbacks
    def until(self, condition, what, seconds=5.0):
        for _ in range(int(seconds / 0.02)):
            if condition():
                return
            yield deferLater(reactor, 0.02, lambda: None)
        self.fail(f"not within {seconds}s: {what}" + (f"; written: {self.written()!r}" if self.written else ""))

    @defer.inlineCallbacks
    def test_storeReportsAnotherWritersChanges(self):
        events = []
        self.reader.addListener(USER, events.append)
        yield self.until(lambda: events, "the first look reports the mailboxes")
        del events[:]
        yield self.writer.append(USER, "INBOX", message(4))
        yield self.until(lambda: any(e.mailbox == "INBOX" for e in events), "a changed event for INBOX")
        [event] = [e for e in events if e.mailbox == "INBOX"]
        info = yield self.writer.getMailbox(USER, "INBOX")
        self.assertEqual((event.kind, event.modseq), ("changed", info.highestModseq))
        del events[:]
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(events, [], "nothing more while nothing changes")

    @defer.inlineCallbacks
    def test_imapSessionSeesAnotherProcessesChanges(self):
        proto, transport = self.session()

        def command(line, tag):
            return self.command(proto, transport, line, tag)

        yield command(b"a LOGIN alice@example.org pw\r\n", b"a")
        out = yield command(b"b SELECT INBOX\r\n", b"b")
        self.assertIn(b"* 3 EXISTS", out)
        transport.clear()
        proto.dataReceived(b"c IDLE\r\n")
        yield self.until(lambda: b"+ idling" in transport.value(), "IDLE started")

        yield self.writer.append(USER, "INBOX", message(4))
        yield self.until(lambda: b"* 4 EXISTS" in transport.value(), "the new message announced in IDLE")
        yield self.writer.storeFlags(USER, "INBOX", [2], "add", ["\\Seen"])
        yield self.until(lambda: re.search(rb"\* 2 FETCH \(FLAGS \([^)]*\\Seen", transport.value()),
                         "the flag change announced")
        yield self.writer.storeFlags(USER, "INBOX", [1], "add", ["\\Deleted"])
        yield self.writer.expunge(USER, "INBOX")
        yield self.until(lambda: b"* 1 EXPUNGE" in transport.value(), "the expunge announced")
        out = yield command(b"DONE\r\n", b"c")
        out = yield command(b"d FETCH 1:* (UID FLAGS)\r\n", b"d")
        self.assertEqual(re.findall(rb"\* (\d+) FETCH \(UID (\d+)", out), [(b"1", b"2"), (b"2", b"3"), (b"3", b"4")])

    @defer.inlineCallbacks
    def test_messageExpungedElsewhereBeforeItWasAnnouncedIsNeverAnnounced(self):
        """
        A message appended in this process (its event waiting for the
        session's next command) and expunged by another process before
        that: the session never counts it (no EXISTS without its EXPUNGE).
        """
        proto, transport = self.session()
        proto.dataReceived(b"a LOGIN alice@example.org pw\r\nb SELECT INBOX\r\n")
        yield self.until(lambda: b"b OK" in transport.value(), "SELECT")
        _, uid = yield self.reader.append(USER, "INBOX", message(4))  # this process: an event, pending
        yield self.writer.storeFlags(USER, "INBOX", [uid], "add", ["\\Deleted"])  # the other process
        yield self.writer.expunge(USER, "INBOX")
        yield self.until(lambda: proto._selected.resync, "the other process's change noticed")
        transport.clear()
        proto.dataReceived(b"c NOOP\r\n")
        yield self.until(lambda: b"c OK" in transport.value(), "NOOP")
        out = transport.value()
        self.assertEqual(out.count(b" EXISTS\r\n"), out.count(b" EXPUNGE\r\n"), out)
        transport.clear()
        proto.dataReceived(b"d FETCH 1:* (UID)\r\n")
        yield self.until(lambda: b"d OK" in transport.value() or b"d NO" in transport.value(), "FETCH")
        out = transport.value()
        self.assertIn(b"d OK", out)
        self.assertEqual(re.findall(rb"\* (\d+) FETCH \(UID (\d+)\)", out), [(b"1", b"1"), (b"2", b"2"), (b"3", b"3")])

    @defer.inlineCallbacks
    def test_gapInOwnEventsReadsTheMailboxBack(self):
        # No looking for other processes' changes: a change of this process
        # whose MODSEQ skips one reveals that another process changed the
        # mailbox meanwhile.
        self.reader.changePollInterval = 0
        if self.reader._pollCall is not None:
            self.reader._pollCall.cancel()
            self.reader._pollCall = None
        proto, transport = self.session()
        proto.dataReceived(b"a LOGIN alice@example.org pw\r\nb SELECT INBOX\r\n")
        yield self.until(lambda: b"b OK" in transport.value(), "SELECT")
        yield self.writer.storeFlags(USER, "INBOX", [2], "add", ["\\Flagged"])  # the other process
        yield self.reader.storeFlags(USER, "INBOX", [3], "add", ["\\Seen"])  # this one
        transport.clear()
        proto.dataReceived(b"c NOOP\r\n")
        yield self.until(lambda: b"c OK" in transport.value(), "NOOP")
        out = transport.value()
        self.assertRegex(out, rb"\* 3 FETCH \(FLAGS \([^)]*\\Seen")
        self.assertRegex(out, rb"\* 2 FETCH \(FLAGS \([^)]*\\Flagged")

    @defer.inlineCallbacks
    def test_pop3MaildropLockHoldsAcrossStoreObjects(self):
        # Two store objects on one directory stand for two processes.
        from mailplat.pop3.server import POP3Factory

        def pop3(store):
            factory = POP3Factory(hostname="pop.example.org", portal=memoryPortal({USER: "pw"}), store=store,
                                  reactor=reactor, apop=False)
            proto = factory.buildProtocol(None)
            transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 110),
                                        peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
            proto.makeConnection(transport)
            self.addCleanup(proto.connectionLost, None)
            return proto, transport

        @defer.inlineCallbacks
        def login(proto, transport):
            transport.clear()
            proto.dataReceived(b"USER alice@example.org\r\nPASS pw\r\n")
            yield self.until(lambda: transport.value().count(b"\r\n") >= 2, "the PASS reply")
            return transport.value().split(b"\r\n")[1]

        first, firstT = pop3(self.writer)
        second, secondT = pop3(self.reader)
        self.assertTrue((yield login(first, firstT)).startswith(b"+OK"))
        self.assertTrue((yield login(second, secondT)).startswith(b"-ERR [IN-USE]"))
        firstT.clear()
        first.dataReceived(b"QUIT\r\n")
        yield self.until(lambda: firstT.value().startswith(b"+OK"), "QUIT")
        third, thirdT = pop3(self.reader)
        self.assertTrue((yield login(third, thirdT)).startswith(b"+OK"))


class TwoStoresMailboxes(TwoStores):
    """Mailboxes created, renamed and deleted by the other process."""

    @defer.inlineCallbacks
    def test_uidvalidityIsNeverGivenTwice(self):
        # RFC 3501 2.3.1.1: a name deleted and created again, in the same
        # second, by two processes gets a new UIDVALIDITY.
        from mailplat.store import sqlite as module

        now = int(module.time.time()) + 3600  # ahead of both stores' last values, and the same for both
        self.patch(module.time, "time", lambda: now)
        first = yield self.reader.createMailbox(USER, "Box")
        yield self.reader.deleteMailbox(USER, "Box")
        second = yield self.writer.createMailbox(USER, "Box")
        yield self.writer.deleteMailbox(USER, "Box")
        third = yield self.reader.createMailbox(USER, "Box")
        self.assertEqual(len({first.uidvalidity, second.uidvalidity, third.uidvalidity}), 3)

    @defer.inlineCallbacks
    def test_renameAndDeleteElsewhereAreReported(self):
        yield self.writer.createMailbox(USER, "Old")
        yield self.writer.createMailbox(USER, "Old/Child")
        yield self.writer.createMailbox(USER, "Gone")
        old = yield self.writer.getMailbox(USER, "Old")
        child = yield self.writer.getMailbox(USER, "Old/Child")
        gone = yield self.writer.getMailbox(USER, "Gone")
        events = []
        self.reader.addListener(USER, events.append)
        yield self.until(lambda: events, "the first look")
        del events[:]
        yield self.writer.renameMailbox(USER, "Old", "New")
        yield self.writer.deleteMailbox(USER, "Gone")
        yield self.writer.createMailbox(USER, "Gone")
        yield self.until(lambda: any(e.kind == "delete" for e in events), "the delete reported")
        told = {(e.kind, e.mailbox, e.newName, e.uidvalidity) for e in events if e.kind in ("rename", "delete")}
        self.assertEqual(told, {("rename", "Old", "New", old.uidvalidity),
                                ("rename", "Old/Child", "New/Child", child.uidvalidity),
                                ("delete", "Gone", None, gone.uidvalidity)})

    @defer.inlineCallbacks
    def test_sessionIsToldItsMailboxWentElsewhere(self):
        yield self.writer.createMailbox(USER, "Work")
        yield self.writer.append(USER, "Work", message(9))
        proto, transport = self.session()

        def command(line, tag):
            return self.command(proto, transport, line, tag)

        yield command(b"a LOGIN alice@example.org pw\r\n", b"a")
        yield command(b"b SELECT Work\r\n", b"b")
        yield deferLater(reactor, 0.2, lambda: None)  # the store's first look at this account
        # Deleted and made again elsewhere: the session must not act on the new one.
        yield self.writer.deleteMailbox(USER, "Work")
        yield self.writer.createMailbox(USER, "Work")
        yield self.writer.append(USER, "Work", message(10))
        transport.clear()
        proto.dataReceived(b"c IDLE\r\n")
        yield self.until(lambda: b"* BYE" in transport.value(), "the session told its mailbox was deleted")
        self.assertTrue(transport.disconnecting)
        # Renamed elsewhere: a session follows its mailbox to the new name.
        yield self.writer.append(USER, "Work", message(11))
        proto, transport = self.session()
        yield command(b"a LOGIN alice@example.org pw\r\n", b"a")
        yield command(b"b SELECT Work\r\n", b"b")
        yield deferLater(reactor, 0.2, lambda: None)
        yield self.writer.renameMailbox(USER, "Work", "Archive/Work")
        yield self.writer.createMailbox(USER, "Work")
        yield self.writer.append(USER, "Work", message(12))
        yield deferLater(reactor, 0.3, lambda: None)
        out = yield command(b"d UID FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n", b"d")
        self.assertIn(b"Subject: message 10", out)
        self.assertNotIn(b"message 12", out)
