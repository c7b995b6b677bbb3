"""
The IMessageStore contract, run against every backend.

A backend's test case mixes in L{StoreContractMixin} and defines
C{makeStore()}, returning a store that has not been opened yet.
"""

import os

from twisted.internet import defer, reactor
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailplat.interfaces.storage import (
    AccountExists,
    IMessageStore,
    InvalidMailboxName,
    MailboxExists,
    MailboxNotEmpty,
    NoSuchAccount,
    NoSuchMailbox,
)
from mailplat.store.sqlite import SQLiteStore
from mailplat.testing import MemoryStore

MSG = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hello\r\n\r\nbody line\r\n"


class StoreContractMixin:
    @defer.inlineCallbacks
    def setUp(self):
        self.store = self.makeStore()
        yield self.store.open()
        self.addCleanup(lambda: self.store.close())
        yield self.store.createAccount("alice@example.org")
        self.user = "alice@example.org"

    def test_interface(self):
        verifyObject(IMessageStore, self.store)

    @defer.inlineCallbacks
    def test_accounts(self):
        self.assertTrue((yield self.store.hasAccount(self.user)))
        self.assertFalse((yield self.store.hasAccount("nobody@example.org")))
        yield self.assertFailure(self.store.createAccount(self.user), AccountExists)
        yield self.store.createAccount("bob@example.org")
        self.assertEqual((yield self.store.listAccounts()), ["alice@example.org", "bob@example.org"])
        yield self.store.deleteAccount("bob@example.org")
        self.assertEqual((yield self.store.listAccounts()), ["alice@example.org"])
        yield self.assertFailure(self.store.deleteAccount("bob@example.org"), NoSuchAccount)

    @defer.inlineCallbacks
    def test_defaultMailboxes(self):
        boxes = yield self.store.listMailboxes(self.user)
        byName = {b.name: b for b in boxes}
        self.assertEqual(set(byName), {"INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"})
        self.assertEqual(byName["Sent"].specialUse, "\\Sent")
        self.assertIsNone(byName["INBOX"].specialUse)
        self.assertEqual(byName["INBOX"].uidnext, 1)
        self.assertGreater(byName["INBOX"].uidvalidity, 0)
        self.assertEqual(len({b.uidvalidity for b in boxes}), len(boxes))
        self.assertIn("INBOX", (yield self.store.listSubscriptions(self.user)))

    @defer.inlineCallbacks
    def test_inboxCaseInsensitive(self):
        info = yield self.store.getMailbox(self.user, "inbox")
        self.assertEqual(info.name, "INBOX")

    @defer.inlineCallbacks
    def test_appendAndRead(self):
        uidvalidity, uid = yield self.store.append(self.user, "INBOX", MSG, flags=["\\seen", "$Label"], internalDate=1000.5)
        self.assertEqual(uid, 1)
        info = yield self.store.getMailbox(self.user, "INBOX")
        self.assertEqual(info.uidvalidity, uidvalidity)
        self.assertEqual((info.messages, info.uidnext, info.unseen), (1, 2, 0))
        self.assertEqual(info.size, len(MSG))
        [meta] = yield self.store.fetchMeta(self.user, "INBOX")
        self.assertEqual(meta.uid, 1)
        self.assertEqual(meta.flags, frozenset({"\\Seen", "$Label"}))
        self.assertEqual(meta.internalDate, 1000.5)
        self.assertEqual(meta.size, len(MSG))
        self.assertIsNone(meta.structure)
        self.assertEqual((yield self.store.getContent(self.user, "INBOX", 1)), MSG)
        [meta] = yield self.store.fetchMeta(self.user, "INBOX", withStructure=True)
        self.assertIsInstance(meta.structure, dict)

    @defer.inlineCallbacks
    def test_appendFromFile(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(MSG)
        _, uid = yield self.store.append(self.user, "INBOX", path)
        self.assertEqual((yield self.store.getContent(self.user, "INBOX", uid)), MSG)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), MSG, "the source file must not be modified")

    @defer.inlineCallbacks
    def test_uidsStrictlyAscending(self):
        uids = []
        for i in range(5):
            uids.append((yield self.store.append(self.user, "INBOX", MSG))[1])
        self.assertEqual(uids, [1, 2, 3, 4, 5])
        yield self.store.storeFlags(self.user, "INBOX", [5], "add", ["\\Deleted"])
        self.assertEqual((yield self.store.expunge(self.user, "INBOX")), [5])
        _, uid = yield self.store.append(self.user, "INBOX", MSG)
        self.assertEqual(uid, 6, "UIDs are never reused")

    @defer.inlineCallbacks
    def test_concurrentAppends(self):
        results = yield defer.gatherResults([self.store.append(self.user, "INBOX", MSG + b"%d" % i) for i in range(20)])
        self.assertEqual(sorted(uid for _, uid in results), list(range(1, 21)))
        metas = yield self.store.fetchMeta(self.user, "INBOX")
        self.assertEqual([m.uid for m in metas], list(range(1, 21)))

    @defer.inlineCallbacks
    def test_deliveryIdIsIdempotent(self):
        first = yield self.store.append(self.user, "INBOX", MSG, deliveryId="Q1/alice")
        again = yield self.store.append(self.user, "INBOX", MSG, deliveryId="Q1/alice")
        self.assertEqual(first, again)
        self.assertEqual(len((yield self.store.fetchMeta(self.user, "INBOX"))), 1)
        other = yield self.store.append(self.user, "INBOX", MSG, deliveryId="Q2/alice")
        self.assertEqual(other[1], first[1] + 1)

    @defer.inlineCallbacks
    def test_appendToMissingMailbox(self):
        yield self.assertFailure(self.store.append(self.user, "Nope", MSG), NoSuchMailbox)
        yield self.assertFailure(self.store.append("nobody@example.org", "INBOX", MSG), NoSuchAccount)

    @defer.inlineCallbacks
    def test_flagsAndModseq(self):
        for _ in range(3):
            yield self.store.append(self.user, "INBOX", MSG)
        before = (yield self.store.getMailbox(self.user, "INBOX")).highestModseq
        changes, failed = yield self.store.storeFlags(self.user, "INBOX", [1, 2, 99], "add", ["\\Flagged"])
        self.assertEqual(failed, [])
        self.assertEqual([c.uid for c in changes], [1, 2])
        self.assertTrue(all(c.flags == frozenset({"\\Flagged"}) for c in changes))
        self.assertTrue(all(c.modseq > before for c in changes))
        after = (yield self.store.getMailbox(self.user, "INBOX")).highestModseq
        self.assertEqual(after, max(c.modseq for c in changes))
        # A no-op change does not bump MODSEQ.
        changes2, _ = yield self.store.storeFlags(self.user, "INBOX", [1], "add", ["\\flagged"])
        self.assertEqual(changes2[0].modseq, changes[0].modseq)
        changes3, _ = yield self.store.storeFlags(self.user, "INBOX", [1], "remove", ["\\FLAGGED"])
        self.assertEqual(changes3[0].flags, frozenset())
        changes4, _ = yield self.store.storeFlags(self.user, "INBOX", [2], "set", ["$Junk", "\\Seen"])
        self.assertEqual(changes4[0].flags, frozenset({"$Junk", "\\Seen"}))
        changed = yield self.store.fetchMeta(self.user, "INBOX", changedSince=after)
        self.assertEqual([m.uid for m in changed], [1, 2])

    @defer.inlineCallbacks
    def test_unchangedSince(self):
        yield self.store.append(self.user, "INBOX", MSG)
        yield self.store.append(self.user, "INBOX", MSG)
        [c1], _ = yield self.store.storeFlags(self.user, "INBOX", [1], "add", ["\\Seen"])
        changes, failed = yield self.store.storeFlags(
            self.user, "INBOX", [1, 2], "add", ["\\Answered"], unchangedSince=c1.modseq - 1
        )
        self.assertEqual(failed, [1])
        self.assertEqual([c.uid for c in changes], [2])

    @defer.inlineCallbacks
    def test_expunge(self):
        for _ in range(4):
            yield self.store.append(self.user, "INBOX", MSG)
        yield self.store.storeFlags(self.user, "INBOX", [1, 3, 4], "add", ["\\Deleted"])
        self.assertEqual((yield self.store.expunge(self.user, "INBOX", uids=[3, 4])), [3, 4])
        self.assertEqual([m.uid for m in (yield self.store.fetchMeta(self.user, "INBOX"))], [1, 2])
        self.assertEqual((yield self.store.expunge(self.user, "INBOX")), [1])
        self.assertEqual((yield self.store.expunge(self.user, "INBOX")), [])
        yield self.assertFailure(self.store.getContent(self.user, "INBOX", 1), KeyError)

    @defer.inlineCallbacks
    def test_copyAndMove(self):
        for i in range(3):
            yield self.store.append(self.user, "INBOX", MSG + b"%d" % i, flags=["\\Seen"], internalDate=50 + i)
        yield self.store.createMailbox(self.user, "Work")
        dstValidity, mapping = yield self.store.copy(self.user, "INBOX", [1, 3, 7], "Work")
        self.assertEqual(mapping, [(1, 1), (3, 2)])
        self.assertEqual(dstValidity, (yield self.store.getMailbox(self.user, "Work")).uidvalidity)
        metas = yield self.store.fetchMeta(self.user, "Work")
        self.assertEqual([(m.flags, m.internalDate) for m in metas], [(frozenset({"\\Seen"}), 50), (frozenset({"\\Seen"}), 52)])
        self.assertEqual((yield self.store.getContent(self.user, "Work", 2)), MSG + b"2")
        _, moved = yield self.store.copy(self.user, "INBOX", [2], "Work", move=True)
        self.assertEqual(moved, [(2, 3)])
        self.assertEqual([m.uid for m in (yield self.store.fetchMeta(self.user, "INBOX"))], [1, 3])
        self.assertEqual((yield self.store.getContent(self.user, "Work", 3)), MSG + b"1")
        # The copy is independent of the original.
        yield self.store.storeFlags(self.user, "INBOX", [1], "add", ["\\Deleted"])
        yield self.store.expunge(self.user, "INBOX")
        self.assertEqual((yield self.store.getContent(self.user, "Work", 1)), MSG + b"0")

    @defer.inlineCallbacks
    def test_mailboxLifecycle(self):
        yield self.store.createMailbox(self.user, "Projects")
        yield self.store.createMailbox(self.user, "Projects/mailplat")
        yield self.assertFailure(self.store.createMailbox(self.user, "Projects"), MailboxExists)
        yield self.assertFailure(self.store.createMailbox(self.user, "a//b"), InvalidMailboxName)
        yield self.assertFailure(self.store.createMailbox(self.user, "../etc"), InvalidMailboxName)
        yield self.assertFailure(self.store.createMailbox(self.user, "x\x00y"), InvalidMailboxName)
        yield self.assertFailure(self.store.deleteMailbox(self.user, "Projects"), MailboxNotEmpty)
        yield self.assertFailure(self.store.deleteMailbox(self.user, "INBOX"), InvalidMailboxName)
        yield self.store.append(self.user, "Projects/mailplat", MSG)
        yield self.store.renameMailbox(self.user, "Projects", "Old")
        names = [b.name for b in (yield self.store.listMailboxes(self.user))]
        self.assertIn("Old/mailplat", names)
        self.assertNotIn("Projects", names)
        self.assertEqual((yield self.store.getContent(self.user, "Old/mailplat", 1)), MSG)
        yield self.store.deleteMailbox(self.user, "Old/mailplat")
        yield self.store.deleteMailbox(self.user, "Old")
        yield self.assertFailure(self.store.getMailbox(self.user, "Old"), NoSuchMailbox)
        info = yield self.store.createMailbox(self.user, "Old")
        self.assertEqual(info.uidnext, 1)

    @defer.inlineCallbacks
    def test_renameInbox(self):
        yield self.store.append(self.user, "INBOX", MSG)
        yield self.store.renameMailbox(self.user, "INBOX", "Saved")
        self.assertEqual((yield self.store.getMailbox(self.user, "INBOX")).messages, 0)
        self.assertEqual((yield self.store.getContent(self.user, "Saved", 1)), MSG)

    @defer.inlineCallbacks
    def test_subscriptions(self):
        yield self.store.setSubscribed(self.user, "Later", True)
        self.assertIn("Later", (yield self.store.listSubscriptions(self.user)))
        yield self.store.setSubscribed(self.user, "Later", False)
        self.assertNotIn("Later", (yield self.store.listSubscriptions(self.user)))

    @defer.inlineCallbacks
    def test_recent(self):
        yield self.store.append(self.user, "INBOX", MSG)
        yield self.store.append(self.user, "INBOX", MSG)
        self.assertEqual((yield self.store.getMailbox(self.user, "INBOX")).recent, 2)
        self.assertEqual((yield self.store.claimRecent(self.user, "INBOX")), [1, 2])
        self.assertEqual((yield self.store.claimRecent(self.user, "INBOX")), [])

    @defer.inlineCallbacks
    def test_listeners(self):
        events = []
        remove = self.store.addListener(self.user, events.append)
        yield self.store.append(self.user, "INBOX", MSG)
        yield self.store.storeFlags(self.user, "INBOX", [1], "add", ["\\Deleted"])
        yield self.store.expunge(self.user, "INBOX")
        self.assertEqual([(e.mailbox, e.kind, e.uids) for e in events],
                         [("INBOX", "append", (1,)), ("INBOX", "flags", (1,)), ("INBOX", "expunge", (1,))])
        remove()
        yield self.store.append(self.user, "INBOX", MSG)
        self.assertEqual(len(events), 3)


class MemoryStoreContractTests(StoreContractMixin, unittest.TestCase):
    def makeStore(self):
        return MemoryStore()


class SQLiteStoreContractTests(StoreContractMixin, unittest.TestCase):
    def makeStore(self):
        self.directory = self.mktemp()
        return SQLiteStore(self.directory, reactor)

    @defer.inlineCallbacks
    def test_durableAcrossReopen(self):
        yield self.store.append(self.user, "INBOX", MSG, flags=["\\Seen"])
        yield self.store.close()
        again = SQLiteStore(self.directory, reactor)
        yield again.open()
        try:
            self.assertEqual((yield again.getContent(self.user, "INBOX", 1)), MSG)
            [meta] = yield again.fetchMeta(self.user, "INBOX")
            self.assertEqual(meta.flags, frozenset({"\\Seen"}))
        finally:
            yield again.close()
        self.store = SQLiteStore(self.directory, reactor)
        yield self.store.open()

    @defer.inlineCallbacks
    def test_filesRemovedOnExpunge(self):
        yield self.store.append(self.user, "INBOX", MSG)
        files = [f for _, _, fs in os.walk(os.path.join(self.directory, "messages")) for f in fs]
        self.assertEqual(len(files), 1)
        yield self.store.storeFlags(self.user, "INBOX", [1], "add", ["\\Deleted"])
        yield self.store.expunge(self.user, "INBOX")
        files = [f for _, _, fs in os.walk(os.path.join(self.directory, "messages")) for f in fs]
        self.assertEqual(files, [])

    @defer.inlineCallbacks
    def test_mailboxNamesNeverBecomePaths(self):
        yield self.store.createMailbox(self.user, "..\\..\\evil")
        yield self.store.append(self.user, "..\\..\\evil", MSG)
        for root, dirs, files in os.walk(self.directory):
            for name in dirs + files:
                self.assertNotIn("evil", name)
