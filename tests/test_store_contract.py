"""
The IMessageStore contract, run against every backend.

A backend's test case mixes in L{StoreContractMixin} and defines
C{makeStore()}, returning a store that has not been opened yet.
"""

import os
import sqlite3

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailplat.interfaces.storage import (
    AccountExists,
    IMessageStore,
    InvalidMailboxName,
    MailboxExists,
    MailboxNotEmpty,
    IBatchReadStore,
    IContentStore,
    IEnvelopeStore,
    IQuotaStore,
    ISearchIndex,
    IVanishedStore,
    NoSuchAccount,
    NoSuchMailbox,
    QuotaExceeded,
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
    def test_batchReads(self):
        verifyObject(IBatchReadStore, self.store)
        other = b"Subject: two\r\n\r\nsecond\r\n"
        yield self.store.append(self.user, "INBOX", MSG)
        yield self.store.append(self.user, "INBOX", other, flags=["\\Seen", "$Label"])
        yield self.store.append(self.user, "INBOX", MSG)
        got = yield self.store.getContents(self.user, "INBOX", [3, 2, 99, 2])
        self.assertEqual(got, {2: other, 3: MSG})
        self.assertEqual((yield self.store.getContents(self.user, "INBOX", [])), {})
        data = yield self.store.selectData(self.user, "INBOX")
        info = yield self.store.getMailbox(self.user, "INBOX")
        self.assertEqual(data.info, info)
        self.assertEqual(data.uids, (1, 2, 3))
        self.assertEqual(data.flags, (frozenset(), frozenset({"\\Seen", "$Label"}), frozenset()))
        metas = yield self.store.fetchMeta(self.user, "INBOX")
        self.assertEqual(data.modseqs, tuple(m.modseq for m in metas))
        self.assertEqual(data.recent, (1, 2, 3))
        self.assertEqual(info.recent, 3)
        self.assertEqual(info.unseen, 2)
        # selectData claims nothing; claimRecent does.
        self.assertEqual((yield self.store.claimRecent(self.user, "INBOX")), [1, 2, 3])
        data = yield self.store.selectData(self.user, "INBOX")
        self.assertEqual((data.recent, data.info.recent), ((), 0))
        empty = yield self.store.selectData(self.user, "Sent")
        self.assertEqual((empty.uids, empty.flags, empty.modseqs, empty.info.messages), ((), (), (), 0))
        yield self.assertFailure(self.store.selectData(self.user, "Nope"), NoSuchMailbox)
        yield self.assertFailure(self.store.getContents(self.user, "Nope", [1]), NoSuchMailbox)
        yield self.assertFailure(self.store.getContent(self.user, "Nope", 1), NoSuchMailbox)
        yield self.assertFailure(self.store.fetchMeta(self.user, "Nope"), NoSuchMailbox)
        yield self.assertFailure(self.store.fetchMeta(self.user, "Nope", [1]), NoSuchMailbox)
        self.assertEqual((yield self.store.fetchMeta(self.user, "Sent", [1])), [])
        self.assertEqual([m.uid for m in (yield self.store.fetchMeta(self.user, "inbox", [2, 3]))], [2, 3])
        yield self.assertFailure(self.store.getContent(self.user, "Sent", 1), KeyError)
        yield self.assertFailure(self.store.getContent("nobody@example.org", "INBOX", 1), NoSuchAccount)
        # INBOX in any case is INBOX.
        self.assertEqual((yield self.store.getContent(self.user, "inbox", 2)),
                         (yield self.store.getContent(self.user, "INBOX", 2)))

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
        yield self.assertFailure(self.store.getMailbox("bob@example.org", "INBOX"), NoSuchAccount)
        yield self.assertFailure(self.store.getMailbox(self.user, "Nowhere"), NoSuchMailbox)
        yield self.assertFailure(self.store.getMailbox(self.user, "a/../b\x00"), NoSuchMailbox)
        yield self.assertFailure(self.store.fetchMeta("bob@example.org", "INBOX"), NoSuchAccount)
        yield self.assertFailure(self.store.fetchMeta(self.user, "Nowhere", [1]), NoSuchMailbox)

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
    def test_appendAllIsAllOrNone(self):
        from mailplat.interfaces.storage import IMultiAppendStore

        verifyObject(IMultiAppendStore, self.store)
        events = []
        self.store.addListener(self.user, events.append)
        yield self.store.append(self.user, "INBOX", MSG)
        big = MSG + b"x" * 200_000 + b"\r\n"
        uidvalidity, uids = yield self.store.appendAll(
            self.user, "INBOX", [(MSG, ["\\Seen"], 1700000000), (big, [], None), (MSG + b"3", ["$Label"], None)])
        self.assertEqual(uids, [2, 3, 4])
        self.assertEqual(uidvalidity, (yield self.store.getMailbox(self.user, "INBOX")).uidvalidity)
        self.assertEqual((yield self.store.getContent(self.user, "INBOX", 3)), big)
        metas = yield self.store.fetchMeta(self.user, "INBOX", [2, 4])
        self.assertEqual([(m.flags, m.internalDate) for m in metas][0], (frozenset({"\\Seen"}), 1700000000.0))
        self.assertIn("$Label", metas[1].flags)
        told = [u for e in events if e.kind == "append" for u in e.uids]
        self.assertEqual(told, [1, 2, 3, 4])
        self.store.setQuota(self.user, messages=6)
        yield self.assertFailure(self.store.appendAll(self.user, "INBOX", [(MSG, [], None)] * 3), QuotaExceeded)
        self.assertEqual(len((yield self.store.fetchMeta(self.user, "INBOX"))), 4)
        yield self.assertFailure(self.store.appendAll(self.user, "Nope", [(MSG, [], None)] * 2), NoSuchMailbox)

    @defer.inlineCallbacks
    def test_deliveryIdHoldsAfterTheMessageMovedOrWasExpunged(self):
        # A queue entry run again after a crash, once the user has moved the
        # message away or expunged it: nothing is stored a second time.
        yield self.store.createMailbox(self.user, "Kept")
        first = yield self.store.append(self.user, "INBOX", MSG, deliveryId="Q1:alice:INBOX")
        yield self.store.copy(self.user, "INBOX", [first[1]], "Kept", move=True)
        again = yield self.store.append(self.user, "INBOX", MSG, deliveryId="Q1:alice:INBOX")
        self.assertEqual(again, first)
        self.assertEqual((yield self.store.fetchMeta(self.user, "INBOX")), [])
        second = yield self.store.append(self.user, "INBOX", MSG, deliveryId="Q2:alice:INBOX")
        yield self.store.storeFlags(self.user, "INBOX", [second[1]], "add", ["\\Deleted"])
        yield self.store.expunge(self.user, "INBOX")
        again = yield self.store.append(self.user, "INBOX", MSG, deliveryId="Q2:alice:INBOX")
        self.assertEqual(again, second)
        self.assertEqual((yield self.store.fetchMeta(self.user, "INBOX")), [])
        self.assertEqual(len((yield self.store.fetchMeta(self.user, "Kept"))), 1)

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


    # --- optional interfaces: every built-in store provides them all -----

    def test_optionalInterfaces(self):
        for iface in (ISearchIndex, IQuotaStore, IVanishedStore, IContentStore):
            verifyObject(iface, self.store)

    @defer.inlineCallbacks
    def _searchCorpus(self):
        msgs = [
            (b"From: Zed <zed@example.org>\r\nTo: b@example.org\r\nSubject: =?utf-8?q?Caf=C3=A9?= menu\r\n"
             b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <m1@x>\r\nX-Tag: Blue\r\n\r\nSoup of the day\r\n", ["$MDNSent"], 1000.0),
            (b"From: amy@example.org\r\nSubject: Re: Cafe menu\r\nDate: Tue, 2 Jan 2024 10:00:00 +0000\r\n"
             b"References: <m1@x>\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
             b"w6lsw6lwaGFudA==\r\n", ["\\Seen"], 200000.0),
            (b"From: bob@example.org\r\nSubject: other\r\n\r\n" + b"x" * 5000 + b"\r\n", [], 300000.0),
        ]
        for raw, flags, date in msgs:
            yield self.store.append(self.user, "INBOX", raw, flags=flags, internalDate=date)

    @defer.inlineCallbacks
    def test_searchIndex(self):
        import datetime

        yield self._searchCorpus()
        s = lambda q: self.store.search(self.user, "INBOX", q)
        self.assertEqual((yield s(("all",))), [1, 2, 3])
        self.assertEqual((yield s(("header", "subject", "café"))), [1])
        self.assertEqual((yield s(("header", "subject", "menu"))), [1, 2])
        self.assertEqual((yield s(("header", "from", "zed"))), [1])
        self.assertEqual((yield s(("header", "x-tag", "blue"))), [1])
        self.assertEqual((yield s(("header", "x-tag", ""))), [1])
        self.assertEqual((yield s(("header", "references", "m1@x"))), [2])
        self.assertEqual((yield s(("body", "soup"))), [1])
        self.assertEqual((yield s(("body", "éléphant"))), [2])
        self.assertEqual((yield s(("body", "el"))), [])
        self.assertEqual((yield s(("text", "amy@"))), [2])
        self.assertEqual((yield s(("flag", "$mdnsent", True))), [1])
        self.assertEqual((yield s(("flag", "\\seen", False))), [1, 3])
        self.assertEqual((yield s(("larger", 1000))), [3])
        self.assertEqual((yield s(("smaller", 1000))), [1, 2])
        self.assertEqual((yield s(("or", ("uids", frozenset({1})), ("not", ("smaller", 1000))))), [1, 3])
        self.assertEqual((yield s(("and", (("uids", frozenset(range(1, 1000, 2))), ("all",))))), [1, 3])
        day = datetime.date(2024, 1, 2)
        self.assertEqual((yield s(("date", "on", day, True))), [2])
        self.assertEqual((yield s(("date", "before", day, True))), [1])
        self.assertEqual((yield s(("date", "since", datetime.date(1970, 1, 3), False))), [2, 3])
        self.assertEqual((yield s(("date", "on", datetime.date(1970, 1, 1), False))), [1])
        meta = yield self.store.fetchMeta(self.user, "INBOX", [3])
        self.assertEqual((yield s(("modseq", meta[0].modseq))), [3])

    @defer.inlineCallbacks
    def test_indexData(self):
        yield self._searchCorpus()
        data = yield self.store.indexData(self.user, "INBOX", [1, 2])
        self.assertEqual(sorted(data), [1, 2])
        self.assertEqual(data[1]["sortSubject"], "CAFÉ MENU")
        self.assertEqual(data[2]["sortSubject"], "CAFE MENU")
        self.assertTrue(data[2]["isReply"])
        self.assertEqual(data[1]["sortFrom"], "ZED")
        self.assertEqual(data[1]["displayFrom"], "ZED")
        self.assertEqual(data[1]["messageId"], "<m1@x>")
        self.assertEqual(data[2]["references"], ["<m1@x>"])
        self.assertEqual(data[1]["internalDate"], 1000.0)
        self.assertIsNone(data[2]["messageId"])
        # copies keep their index
        _, mapping = yield self.store.copy(self.user, "INBOX", [1], "Archive")
        copied = yield self.store.indexData(self.user, "Archive")
        self.assertEqual(copied[mapping[0][1]]["sortSubject"], "CAFÉ MENU")
        self.assertEqual((yield self.store.search(self.user, "Archive", ("body", "soup"))), [1])

    @defer.inlineCallbacks
    def test_quota(self):
        q = yield self.store.getQuota(self.user)
        self.assertEqual((q.storageUsed, q.storageLimit, q.messagesUsed, q.messagesLimit), (0, None, 0, None))
        yield self.store.append(self.user, "INBOX", MSG)
        q = yield self.store.setQuota(self.user, storage=len(MSG) * 2, messages=10)
        self.assertEqual((q.storageUsed, q.storageLimit, q.messagesUsed), (len(MSG), len(MSG) * 2, 1))
        yield self.store.append(self.user, "Sent", MSG)
        yield self.assertFailure(self.store.append(self.user, "INBOX", MSG), QuotaExceeded)
        yield self.assertFailure(self.store.copy(self.user, "INBOX", [1], "Archive"), QuotaExceeded)
        yield self.store.copy(self.user, "INBOX", [1], "Archive", move=True)
        yield self.store.setQuota(self.user)
        yield self.store.append(self.user, "INBOX", MSG)

    @defer.inlineCallbacks
    def test_vanishedAndOpenContent(self):
        for _ in range(3):
            yield self.store.append(self.user, "INBOX", MSG)
        info = yield self.store.getMailbox(self.user, "INBOX")
        f = yield self.store.openContent(self.user, "INBOX", 2)
        yield self.store.storeFlags(self.user, "INBOX", [1, 2], "add", ["\\Deleted"])
        yield self.store.expunge(self.user, "INBOX")
        try:
            self.assertEqual(f.read(), MSG)
        finally:
            f.close()
        self.assertEqual((yield self.store.vanishedSince(self.user, "INBOX", info.highestModseq)), [1, 2])
        yield self.store.copy(self.user, "INBOX", [3], "Archive", move=True)
        self.assertEqual((yield self.store.vanishedSince(self.user, "INBOX", info.highestModseq)), [1, 2, 3])
        self.assertEqual((yield self.store.vanishedSince(self.user, "INBOX", 10**9)), [])
        yield self.assertFailure(self.store.openContent(self.user, "INBOX", 99), KeyError)

    @defer.inlineCallbacks
    def test_eventDetail(self):
        events = []
        self.store.addListener(self.user, events.append)
        _, uid = yield self.store.append(self.user, "INBOX", MSG, flags=["$x"], internalDate=5.0)
        yield self.store.storeFlags(self.user, "INBOX", [uid], "add", ["\\Seen"])
        yield self.store.createMailbox(self.user, "A")
        yield self.store.createMailbox(self.user, "A/B")
        yield self.store.renameMailbox(self.user, "A", "C")
        append, flags = events[0], events[1]
        self.assertEqual(append.metas[0].uid, uid)
        self.assertEqual(append.metas[0].flags, frozenset({"$x"}))
        self.assertEqual(append.metas[0].size, len(MSG))
        self.assertEqual(flags.changes[0].flags, frozenset({"$x", "\\Seen"}))
        renames = sorted((e.mailbox, e.newName) for e in events if e.kind == "rename")
        self.assertEqual(renames, [("A", "C"), ("A/B", "C/B")])


class EnvelopeStoreContractMixin:
    """L{IEnvelopeStore}, for the backends that provide it."""

    @defer.inlineCallbacks
    def test_envelopes(self):
        """A store that keeps envelopes gives each message's, formatted, through append, COPY and MOVE."""
        from mailplat.imap.fetch import formatEnvelope
        from mailplat.mime.structure import analyze

        verifyObject(IEnvelopeStore, self.store)
        yield self.store.append(self.user, "INBOX", MSG)
        yield self.store.append(self.user, "INBOX", b"Subject: two\r\n\r\nsecond\r\n")
        yield self.store.copy(self.user, "INBOX", [1], "Trash")
        yield self.store.copy(self.user, "INBOX", [2], "Trash", move=True)
        expected = formatEnvelope(analyze(MSG)["envelope"])
        self.assertIn(b'"hello"', expected)
        [one] = yield self.store.fetchMeta(self.user, "INBOX", [1, 2], withEnvelope=True)
        self.assertEqual(one.envelope, expected)
        self.assertIsNone(one.structure)
        copied = yield self.store.fetchMeta(self.user, "Trash", withEnvelope=True, withStructure=True)
        self.assertEqual([m.envelope for m in copied],
                         [expected, formatEnvelope(analyze(b"Subject: two\r\n\r\nsecond\r\n")["envelope"])])
        self.assertEqual(copied[0].structure["envelope"]["subject"], "hello")
        [plain] = yield self.store.fetchMeta(self.user, "INBOX", [1])
        self.assertIsNone(plain.envelope)


class MemoryStoreContractTests(StoreContractMixin, unittest.TestCase):
    def makeStore(self):
        return MemoryStore()


class SQLiteStoreContractTests(StoreContractMixin, EnvelopeStoreContractMixin, unittest.TestCase):
    def makeStore(self):
        self.directory = self.mktemp()
        return SQLiteStore(self.directory, reactor)

    @defer.inlineCallbacks
    def test_searchWithThousandsOfKeys(self):
        """SQLite refuses expressions over 1,000 deep: long lists of keys are grouped, not chained."""
        for n in range(6):
            yield self.store.append(self.user, "INBOX", MSG, flags=["\\Seen"] if n % 2 else [])
        s = lambda q: self.store.search(self.user, "INBOX", q)
        self.assertEqual((yield s(("and", [("flag", "\\Seen", True)] * 3000))), [2, 4, 6])
        self.assertEqual((yield s(("and", [("flag", "\\Seen", False), ("larger", 1)] * 1500))), [1, 3, 5])
        self.assertEqual((yield s(("uids", frozenset(range(1, 3000, 2))))), [1, 3, 5])  # 1,500 ranges

    @defer.inlineCallbacks
    def test_appendAllIsOneTransaction(self):
        """A MULTIAPPEND is one write, so a crash leaves all of it or none (RFC 3502)."""
        writes = []
        submit = self.store._db.submit
        self.store._db.submit = lambda op: writes.append(op) or submit(op)
        big = MSG + b"x" * 200_000 + b"\r\n"
        yield self.store.appendAll(self.user, "INBOX", [(MSG, [], None), (big, [], None), (MSG, [], None)])
        self.assertEqual(len(writes), 1)

    @defer.inlineCallbacks
    def test_selectDataCacheFollowsChanges(self):
        """The remembered SELECT data of a big mailbox is never stale."""
        self.store._selectCacheMin = 1
        for _ in range(3):
            yield self.store.append(self.user, "INBOX", MSG)
        s = lambda: self.store.selectData(self.user, "INBOX")
        first = yield s()
        self.assertIs((yield s()).uids, first.uids)  # served from memory
        yield self.store.storeFlags(self.user, "INBOX", [2], "add", ["\\Deleted"])
        data = yield s()
        self.assertEqual(data.flags[1], frozenset({"\\Deleted"}))
        self.assertEqual(data.info.unseen, 3)
        yield self.store.expunge(self.user, "INBOX")
        data = yield s()
        self.assertEqual((data.uids, data.info.messages), ((1, 3), 2))
        yield self.store.claimRecent(self.user, "INBOX")
        yield self.store.append(self.user, "INBOX", MSG, flags=["\\Seen"])
        data = yield s()
        self.assertEqual((data.uids, data.recent, data.info.unseen), ((1, 3, 4), (4,), 2))
        yield self.store.copy(self.user, "INBOX", [1], "INBOX")
        self.assertEqual((yield s()).uids, (1, 3, 4, 5))
        yield self.store.copy(self.user, "INBOX", [3], "Archive", move=True)
        self.assertEqual((yield s()).uids, (1, 4, 5))
        metas = yield self.store.fetchMeta(self.user, "INBOX")
        self.assertEqual((yield s()).modseqs, tuple(m.modseq for m in metas))

    def test_fulltextOffByDefault(self):
        self.assertFalse(self.store._fts)

    @defer.inlineCallbacks
    def test_fulltextSwitchedOnAndOff(self):
        """Turning the index on builds it over stored text; off drops it; answers stay the same."""
        import sqlite3

        from mailplat.store.sqlite import _hasFTS5

        if not _hasFTS5():
            raise unittest.SkipTest("this SQLite has no FTS5")
        yield self._searchCorpus()

        def tables():
            db = sqlite3.connect(os.path.join(self.directory, "index.sqlite"))
            try:
                return {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            finally:
                db.close()

        self.assertNotIn("msgfts", tables())
        for fulltext in (True, False, True):
            yield self.store.close()
            self.store = SQLiteStore(self.directory, reactor, fulltext=fulltext)
            yield self.store.open()
            self.assertEqual(("msgfts" in tables()), fulltext)
            s = lambda q: self.store.search(self.user, "INBOX", q)
            self.assertEqual((yield s(("body", "soup"))), [1])
            self.assertEqual((yield s(("body", "éléphant"))), [2])
            self.assertEqual((yield s(("body", "el"))), [])
            self.assertEqual((yield s(("text", "amy@"))), [2])
        yield self.store.append(self.user, "INBOX", b"Subject: new\r\n\r\nfresh parsnip\r\n")
        self.assertEqual((yield self.store.search(self.user, "INBOX", ("body", "parsnip"))), [4])

    def test_factoryArguments(self):
        from types import SimpleNamespace

        from mailplat.store.sqlite import SQLiteStoreFactory

        context = SimpleNamespace(dataDir=self.mktemp(), reactor=reactor)
        factory = SQLiteStoreFactory()
        self.assertFalse(factory.build({}, context)._fts)
        self.assertFalse(factory.build({"fulltext": False}, context)._fts)
        from mailplat.store.sqlite import _hasFTS5

        self.assertEqual(factory.build({"fulltext": True, "path": "s"}, context)._fts, _hasFTS5())
        for bad in ("yes", 1, None):
            with self.assertRaises(ValueError) as e:
                factory.build({"fulltext": bad}, context)
            self.assertIn("fulltext", str(e.exception))
        with self.assertRaises(ValueError) as e:
            factory.build({"colour": "red"}, context)
        self.assertIn("fulltext", str(e.exception))

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
    def test_envelopesOfAnOlderIndex(self):
        """
        An index from before envelopes were kept gets the column at open; its
        rows' envelopes come from their structure, or are None without one.
        """
        yield self.store.append(self.user, "INBOX", MSG)
        yield self.store.append(self.user, "INBOX", MSG)
        yield self.store.close()
        path = os.path.join(self.directory, "index.sqlite")
        db = sqlite3.connect(path)
        try:
            db.execute("ALTER TABLE messages DROP COLUMN envelope")
            db.execute("UPDATE messages SET structure=NULL WHERE uid=2")
            db.commit()
        finally:
            db.close()
        self.store = SQLiteStore(self.directory, reactor)
        yield self.store.open()
        one, two = yield self.store.fetchMeta(self.user, "INBOX", withEnvelope=True)
        self.assertIn(b'"hello"', one.envelope)
        self.assertIsNone(two.envelope)
        yield self.store.append(self.user, "INBOX", MSG)
        [three] = yield self.store.fetchMeta(self.user, "INBOX", [3], withEnvelope=True)
        self.assertEqual(three.envelope, one.envelope)

    @defer.inlineCallbacks
    def test_bigSelectAndListGoToAThread(self):
        """SELECT of a big mailbox and LIST of an account with many mailboxes read in a thread, with the same result."""
        from twisted.internet import threads

        for _ in range(3):
            yield self.store.append(self.user, "INBOX", MSG)
        small = yield self.store.selectData(self.user, "INBOX")
        boxes = yield self.store.listMailboxes(self.user)
        inThreads = []
        original = threads.deferToThreadPool

        def counting(*a, **kw):
            inThreads.append(a[2])
            return original(*a, **kw)

        self.patch(threads, "deferToThreadPool", counting)
        yield self.store.selectData(self.user, "INBOX")
        yield self.store.listMailboxes(self.user)
        self.assertEqual(inThreads, [])
        self.store._inlineSelect = 2
        self.store._inlineMailboxes = 2
        self.assertEqual((yield self.store.selectData(self.user, "INBOX")), small)
        self.assertEqual((yield self.store.listMailboxes(self.user)), boxes)
        self.assertEqual(len(inThreads), 2)

    def keptCounts(self):
        """Each mailbox's kept (count, unseen, size) and the same counted from its messages."""
        db = sqlite3.connect(os.path.join(self.directory, "index.sqlite"))
        try:
            kept = db.execute("SELECT name, nmessages, nunseen, nsize FROM mailboxes ORDER BY name").fetchall()
            counted = db.execute(
                "SELECT b.name, COUNT(m.uid), COALESCE(SUM(m.flags NOT LIKE '%\\Seen%'), 0),"
                " COALESCE(SUM(m.size), 0) FROM mailboxes b LEFT JOIN messages m ON m.mailbox=b.id"
                " GROUP BY b.id ORDER BY b.name"
            ).fetchall()
        finally:
            db.close()
        return kept, counted

    @defer.inlineCallbacks
    def test_mailboxCountsFollowEveryChange(self):
        """STATUS and LIST read counts kept in the mailbox rows: they stay true through every kind of change."""
        big = b"Subject: big\r\n\r\n" + b"y" * 300
        yield self.store.append(self.user, "INBOX", MSG)
        yield self.store.append(self.user, "INBOX", big, flags=["\\Seen"])
        yield self.store.append(self.user, "INBOX", MSG, flags=["$Label"])
        yield self.store.createMailbox(self.user, "Work")
        yield self.store.append(self.user, "Work", MSG)
        info = yield self.store.getMailbox(self.user, "INBOX")
        self.assertEqual((info.messages, info.unseen, info.size), (3, 2, 2 * len(MSG) + len(big)))
        yield self.store.storeFlags(self.user, "INBOX", [1], "add", ["\\Seen", "\\Flagged"])
        yield self.store.storeFlags(self.user, "INBOX", [3], "add", ["\\Answered"])  # \Seen untouched
        yield self.store.storeFlags(self.user, "INBOX", [2], "set", ["\\Deleted"])
        yield self.store.copy(self.user, "INBOX", [1, 2], "Work")
        yield self.store.copy(self.user, "INBOX", [3], "Trash", move=True)
        yield self.store.expunge(self.user, "INBOX")
        yield self.store.storeFlags(self.user, "Work", [1], "add", ["\\Deleted"])
        yield self.store.expunge(self.user, "Work", [1])
        infos = {i.name: i for i in (yield self.store.listMailboxes(self.user))}
        self.assertEqual((infos["INBOX"].messages, infos["INBOX"].unseen), (1, 0))
        self.assertEqual((infos["Work"].messages, infos["Work"].unseen, infos["Work"].size),
                         (2, 1, len(MSG) + len(big)))
        self.assertEqual((infos["Trash"].messages, infos["Trash"].unseen), (1, 1))
        yield self.store.renameMailbox(self.user, "INBOX", "Old")
        yield self.store.renameMailbox(self.user, "Work", "Done")
        kept, counted = self.keptCounts()
        self.assertEqual(kept, counted)
        self.assertIn(("Done", 2, 1, len(MSG) + len(big)), kept)
        self.assertIn(("Old", 1, 0, len(MSG)), kept)
        yield self.store.deleteMailbox(self.user, "Done")
        kept, counted = self.keptCounts()
        self.assertEqual(kept, counted)
        self.assertNotIn("Done", [k[0] for k in kept])

    @defer.inlineCallbacks
    def test_mailboxCountsOfAnOlderIndex(self):
        """An index from before the kept counts gets them, counted, at open; and they follow changes."""
        yield self.store.append(self.user, "INBOX", MSG)
        yield self.store.append(self.user, "INBOX", MSG, flags=["\\Seen"])
        yield self.store.close()
        db = sqlite3.connect(os.path.join(self.directory, "index.sqlite"))
        try:
            for trigger in ("messages_count_insert", "messages_count_delete", "messages_count_update"):
                db.execute(f"DROP TRIGGER {trigger}")
            for column in ("nmessages", "nunseen", "nsize"):
                db.execute(f"ALTER TABLE mailboxes DROP COLUMN {column}")
            db.execute("DROP INDEX messages_recent")
            db.execute("CREATE INDEX messages_recent ON messages (mailbox, uid) WHERE recent=1")  # as it was
            db.commit()
        finally:
            db.close()
        self.store = SQLiteStore(self.directory, reactor)
        yield self.store.open()
        info = yield self.store.getMailbox(self.user, "INBOX")
        self.assertEqual((info.messages, info.unseen, info.size), (2, 1, 2 * len(MSG)))
        yield self.store.append(self.user, "INBOX", MSG)
        kept, counted = self.keptCounts()
        self.assertEqual(kept, counted)
        self.assertIn(("INBOX", 3, 2, 3 * len(MSG)), kept)
        self.assertEqual(info.recent, 2)
        db = sqlite3.connect(os.path.join(self.directory, "index.sqlite"))
        try:
            columns = [r[2] for r in db.execute("PRAGMA index_info(messages_recent)")]
            plan = " ".join(r[3] for r in db.execute(
                "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM messages INDEXED BY messages_recent WHERE mailbox=1 AND recent=1"))
        finally:
            db.close()
        self.assertEqual(columns, ["mailbox", "uid", "recent"])
        self.assertIn("COVERING INDEX messages_recent", plan)

    def blobCount(self):
        db = sqlite3.connect(os.path.join(self.directory, "index.sqlite"))
        try:
            return db.execute("SELECT count(*) FROM blobs").fetchone()[0]
        finally:
            db.close()

    def messageFiles(self):
        return [f for _, _, fs in os.walk(os.path.join(self.directory, "messages")) for f in fs]

    @defer.inlineCallbacks
    def test_smallMessagesLiveInTheIndex(self):
        yield self.store.append(self.user, "INBOX", MSG)
        self.assertEqual((self.messageFiles(), self.blobCount()), ([], 1))
        f = yield self.store.openContent(self.user, "INBOX", 1)
        with f:
            self.assertEqual(f.read(), MSG)
        yield self.store.storeFlags(self.user, "INBOX", [1], "add", ["\\Deleted"])
        yield self.store.expunge(self.user, "INBOX")
        self.assertEqual((self.messageFiles(), self.blobCount()), ([], 0))

    @defer.inlineCallbacks
    def test_inlineContentFollowsCopyMoveAndDeletion(self):
        yield self.store.append(self.user, "INBOX", MSG)
        yield self.store.createMailbox(self.user, "Box")
        yield self.store.copy(self.user, "INBOX", [1], "Box")
        yield self.store.copy(self.user, "Box", [1], "Archive", move=True)
        self.assertEqual(self.blobCount(), 2)
        self.assertEqual((yield self.store.getContent(self.user, "INBOX", 1)), MSG)
        self.assertEqual((yield self.store.getContent(self.user, "Archive", 1)), MSG)
        self.assertEqual((yield self.store.getContents(self.user, "Archive", [1, 7])), {1: MSG})
        yield self.store.deleteMailbox(self.user, "Archive")
        self.assertEqual(self.blobCount(), 1)
        yield self.store.deleteAccount(self.user)
        self.assertEqual(self.blobCount(), 0)

    @defer.inlineCallbacks
    def test_biggerMessagesGetAFile(self):
        self.store.inlineMax = len(MSG) - 1
        yield self.store.append(self.user, "INBOX", MSG)
        self.store.inlineMax = len(MSG)
        yield self.store.append(self.user, "INBOX", MSG)
        self.assertEqual((len(self.messageFiles()), self.blobCount()), (1, 1))
        self.assertEqual((yield self.store.getContents(self.user, "INBOX", [1, 2])), {1: MSG, 2: MSG})
        yield self.store.copy(self.user, "INBOX", [1, 2], "Archive", move=True)
        self.assertEqual((len(self.messageFiles()), self.blobCount()), (1, 1))
        self.assertEqual((yield self.store.getContents(self.user, "Archive", [1, 2])), {1: MSG, 2: MSG})

    def test_inlineMaxArgument(self):
        from types import SimpleNamespace

        from mailplat.store.sqlite import SQLiteStoreFactory

        factory = SQLiteStoreFactory()
        context = SimpleNamespace(dataDir=self.mktemp(), reactor=reactor)
        self.assertEqual(factory.build({"inline_max": 0}, context).inlineMax, 0)
        self.assertEqual(factory.build({}, context).inlineMax, SQLiteStore.INLINE_MAX)
        for bad in (-1, "big", True, 2**40):
            with self.assertRaises(ValueError) as e:
                factory.build({"inline_max": bad}, context)
            self.assertIn("inline_max", str(e.exception))

    @defer.inlineCallbacks
    def test_filesRemovedOnExpunge(self):
        self.store.inlineMax = 0
        yield self.store.append(self.user, "INBOX", MSG)
        files = [f for _, _, fs in os.walk(os.path.join(self.directory, "messages")) for f in fs]
        self.assertEqual(len(files), 1)
        yield self.store.storeFlags(self.user, "INBOX", [1], "add", ["\\Deleted"])
        yield self.store.expunge(self.user, "INBOX")
        files = [f for _, _, fs in os.walk(os.path.join(self.directory, "messages")) for f in fs]
        self.assertEqual(files, [])

    @defer.inlineCallbacks
    def test_expungedFilesGoOnlyOnceTheExpungeIsDurable(self):
        """An expunge commits without an fsync; files it frees are removed after a WAL fsync that covers it."""
        from mailplat.store import writer

        syncs = []
        real = writer._syncWal

        def syncWal(path):
            real(path)
            syncs.append(sorted(f for _, _, fs in os.walk(os.path.join(self.directory, "messages")) for f in fs))

        self.store.inlineMax = 0
        yield self.store.append(self.user, "INBOX", MSG)
        yield self.store.append(self.user, "INBOX", MSG)
        self.store.inlineMax = SQLiteStore.INLINE_MAX
        yield self.store.append(self.user, "INBOX", MSG)
        files = sorted(f for _, _, fs in os.walk(os.path.join(self.directory, "messages")) for f in fs)
        self.assertEqual(len(files), 2)
        self.patch(writer, "_syncWal", syncWal)
        yield self.store.storeFlags(self.user, "INBOX", [1, 3], "add", ["\\Deleted"])
        self.assertEqual((yield self.store.expunge(self.user, "INBOX", [3])), [3])
        self.assertEqual(syncs, [], "content kept in the index goes without an fsync")
        self.assertEqual((yield self.store.expunge(self.user, "INBOX")), [1])
        self.assertEqual(len(syncs), 1)
        self.assertEqual(syncs[0], files, "both files were still there when the WAL was synced")
        left = [f for _, _, fs in os.walk(os.path.join(self.directory, "messages")) for f in fs]
        self.assertEqual(len(left), 1)
        self.assertEqual([m.uid for m in (yield self.store.fetchMeta(self.user, "INBOX"))], [2])

    @defer.inlineCallbacks
    def test_aFlagChangeThatChangesNothingDoesNotWrite(self):
        yield self.store.append(self.user, "INBOX", MSG, flags=["\\Flagged"])
        writes = []
        real = self.store._write

        def write(apply, *a, **kw):
            writes.append(kw)
            return real(apply, *a, **kw)

        self.patch(self.store, "_write", write)
        changes, failed = yield self.store.storeFlags(self.user, "INBOX", [1, 7], "add", ["\\Flagged"])
        self.assertEqual([(c.uid, c.flags) for c in changes], [(1, frozenset({"\\Flagged"}))])
        self.assertEqual((failed, writes), ([], []))
        modseq = changes[0].modseq
        changes, failed = yield self.store.storeFlags(self.user, "INBOX", [1], "add", ["\\Seen"], unchangedSince=0)
        self.assertEqual((changes, failed, writes), ([], [1], []))
        changes, _ = yield self.store.storeFlags(self.user, "INBOX", [1], "remove", ["\\Flagged"])
        self.assertEqual(len(writes), 1)
        self.assertEqual((changes[0].flags, changes[0].modseq > modseq), (frozenset(), True))

    @defer.inlineCallbacks
    def test_anAppendDoesNotOvertakeOneUnderWay(self):
        """
        Content kept in the index is committed in the calling thread unless
        an append submitted earlier in the same turn of the reactor went to
        the commit thread: that one must not be overtaken (MULTIAPPEND keeps
        its order).  In a later turn the calling thread commits again.
        """
        smalls = []
        real = self.store._write

        def write(apply, *a, **kw):
            smalls.append(kw.get("small", False))
            return real(apply, *a, **kw)

        self.patch(self.store, "_write", write)
        writer = self.store._db.writer
        # The commit thread holds the transaction lock: the first append
        # cannot be committed here and is queued.
        writer._txLock.acquire()
        try:
            first = self.store.append(self.user, "INBOX", MSG)
            self.assertFalse(writer.lastInline)
            second = self.store.append(self.user, "INBOX", MSG + b"2")
        finally:
            writer._txLock.release()
        self.assertEqual([(yield first)[1], (yield second)[1]], [1, 2])
        yield deferLater(reactor, 0, lambda: None)
        yield self.store.append(self.user, "INBOX", MSG + b"3")
        self.assertTrue(writer.lastInline)
        fourth = self.store.append(self.user, "INBOX", MSG + b"4")
        self.assertTrue(writer.lastInline, "the one before was committed already: nothing to overtake")
        yield fourth
        self.assertEqual(smalls, [True, False, True, True])
        contents = yield self.store.getContents(self.user, "INBOX", [1, 2, 3, 4])
        self.assertEqual([contents[u] for u in (1, 2, 3, 4)], [MSG, MSG + b"2", MSG + b"3", MSG + b"4"])

    @defer.inlineCallbacks
    def test_indexMadeWhenAListTagCountedAsAReplyIsMadeAgain(self):
        """Rows marked as replies by an older version are rebuilt from their messages at open."""
        yield self.store.append(self.user, "INBOX", b"Subject: [PATCH] tagged\r\n\r\nbody\r\n")
        db = sqlite3.connect(os.path.join(self.directory, "index.sqlite"))
        db.execute("UPDATE msgindex SET isreply=1")
        db.execute("DELETE FROM meta WHERE key='isreply'")
        db.commit()
        db.close()
        yield self.store.close()
        self.store = SQLiteStore(self.directory, reactor)
        yield self.store.open()
        for _ in range(50):
            db = sqlite3.connect(os.path.join(self.directory, "index.sqlite"))
            rows = db.execute("SELECT isreply FROM msgindex").fetchall()
            db.close()
            if rows:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(rows, [(0,)])

    @defer.inlineCallbacks
    def test_aSmallAppendDoesNotOvertakeABigOne(self):
        """A message kept in a file goes through the files thread; one kept in the index submitted after it waits its turn."""
        big = MSG + b"x" * (self.store.inlineMax + 1)
        first = self.store.append(self.user, "INBOX", big)
        second = self.store.append(self.user, "INBOX", MSG + b"2")
        self.assertEqual([(yield first)[1], (yield second)[1]], [1, 2])
        contents = yield self.store.getContents(self.user, "INBOX", [1, 2])
        self.assertEqual([contents[1], contents[2]], [big, MSG + b"2"])

    @defer.inlineCallbacks
    def test_recentClaimOfAFewIsCommittedAtOnce(self):
        """SELECT waits for its \\Recent claim: a claim of a few commits in the calling thread, many in the commit thread."""
        for _ in range(3):
            yield self.store.append(self.user, "INBOX", MSG)
        self.assertEqual(self.successResultOf(self.store.claimRecent(self.user, "INBOX")), [1, 2, 3])
        n = self.store._inlineRows + 1
        for _ in range(n):
            yield self.store.append(self.user, "INBOX", MSG)
        d = self.store.claimRecent(self.user, "INBOX")
        self.assertNoResult(d)
        self.assertEqual((yield d), list(range(4, 4 + n)))
        writes = []
        self.patch(self.store, "_write", lambda *a, **kw: writes.append(kw))
        self.assertEqual(self.successResultOf(self.store.claimRecent(self.user, "INBOX")), [])
        self.assertEqual(writes, [], "nothing to claim: no write")

    @defer.inlineCallbacks
    def test_expungeOfManyMessagesLeavesTheReactorThread(self):
        """An expunge that finds more than a few messages is committed by the commit thread."""
        import threading

        for _ in range(self.store._inlineRows + 6):
            yield self.store.append(self.user, "INBOX", MSG)
        n = self.store._inlineRows + 6
        yield self.store.storeFlags(self.user, "INBOX", list(range(1, n + 1)), "add", ["\\Deleted"])
        threads = []
        original = SQLiteStore._mailboxRow

        def mailboxRow(db, user, name):
            threads.append(threading.current_thread() is threading.main_thread())
            return original(db, user, name)

        self.patch(self.store, "_mailboxRow", mailboxRow)
        gone = yield self.store.expunge(self.user, "INBOX")
        self.assertEqual(gone, list(range(1, n + 1)))
        self.assertEqual(threads, [True, False], "tried inline, then done in the commit thread")
        self.assertEqual((yield self.store.fetchMeta(self.user, "INBOX")), [])

    @defer.inlineCallbacks
    def test_mailboxNamesNeverBecomePaths(self):
        yield self.store.createMailbox(self.user, "..\\..\\evil")
        yield self.store.append(self.user, "..\\..\\evil", MSG)
        for root, dirs, files in os.walk(self.directory):
            for name in dirs + files:
                self.assertNotIn("evil", name)


class SQLiteFileStoreContractTests(StoreContractMixin, EnvelopeStoreContractMixin, unittest.TestCase):
    """The whole contract again with every message in a file of its own."""

    def makeStore(self):
        self.directory = self.mktemp()
        return SQLiteStore(self.directory, reactor, inlineMax=0)


class SQLiteFulltextStoreContractTests(StoreContractMixin, unittest.TestCase):
    """The whole contract again with the full-text index kept."""

    def makeStore(self):
        self.directory = self.mktemp()
        return SQLiteStore(self.directory, reactor, fulltext=True)
