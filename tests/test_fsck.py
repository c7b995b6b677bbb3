"""
C{mailplat fsck}: a real SQLite store and queue are filled, damaged on disk,
and checked and repaired, by L{mailplat.store.fsck} and by the command.
"""

import os
import sqlite3

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailplat import cli
from mailplat.interfaces.queue import Envelope
from mailplat.interfaces.routing import LocalDestination, Route
from mailplat.queue.sqlite import SQLiteQueue
from mailplat.store.fsck import LOST_AND_FOUND, FsckError, checkQueue, checkStore
from mailplat.store.sqlite import SQLiteStore

USER = "alice@example.org"


def message(n):
    return f"From: bob@example.org\r\nSubject: message {n}\r\n\r\nbody {n}\r\n".encode()


def rows(directory, sql, args=()):
    db = sqlite3.connect(os.path.join(directory, "index.sqlite"))
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def fileOf(directory, uid):
    [(rel,)] = rows(directory, "SELECT m.file FROM messages m JOIN mailboxes b ON b.id=m.mailbox"
                               " WHERE b.name='INBOX' AND m.uid=?", (uid,))
    return os.path.join(directory, "messages", rel)


class StoreFsckTests(unittest.TestCase):
    """A store with every message in a file (C{inlineMax=0})."""

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        store = SQLiteStore(self.dir, reactor, inlineMax=0)
        yield store.open()
        yield store.createAccount(USER)
        for n in range(1, 5):
            yield store.append(USER, "INBOX", message(n))
        yield store.close()

    @defer.inlineCallbacks
    def reopen(self):
        store = SQLiteStore(self.dir, reactor)
        yield store.open()
        self.addCleanup(store.close)
        return store

    def test_cleanStore(self):
        report = checkStore(self.dir)
        self.assertTrue(report.clean, report.lines())
        self.assertEqual(report.checked, {"messages": 4, "files": 4, "in the index": 0})
        self.assertEqual(report.lines()[-1], f"{self.dir}: clean")

    @defer.inlineCallbacks
    def test_missingFileRowRemovedAndExpunged(self):
        os.unlink(fileOf(self.dir, 2))
        [(highest,)] = rows(self.dir, "SELECT highestmodseq FROM mailboxes WHERE name='INBOX'")

        report = checkStore(self.dir)
        [finding] = report.findings
        self.assertEqual(finding.kind, "missing-file")
        self.assertIn(f"{USER}/INBOX UID 2", finding.detail)
        self.assertEqual(finding.action, "removed the index row (expunged)")
        self.assertTrue(checkStore(self.dir).clean, "a second run finds nothing")

        store = yield self.reopen()
        metas = yield store.fetchMeta(USER, "INBOX")
        self.assertEqual([m.uid for m in metas], [1, 3, 4])
        for uid in (1, 3, 4):
            self.assertEqual((yield store.getContent(USER, "INBOX", uid)), message(uid))
        # CONDSTORE/QRESYNC clients learn of the vanished message.
        self.assertEqual((yield store.vanishedSince(USER, "INBOX", highest)), [2])
        self.assertEqual(rows(self.dir, "SELECT COUNT(*) FROM msgindex WHERE uid=2"), [(0,)])

    def test_checkOnlyChangesNothing(self):
        os.unlink(fileOf(self.dir, 3))
        orphan = os.path.join(self.dir, "messages", "zz", "stray")
        os.makedirs(os.path.dirname(orphan))
        with open(orphan, "wb") as f:
            f.write(b"Subject: stray\r\n\r\nmail\r\n")

        report = checkStore(self.dir, repair=False)
        self.assertEqual(sorted(f.kind for f in report.findings), ["missing-file", "orphan-file"])
        self.assertEqual({f.action for f in report.findings}, {"kept (check only)"})
        self.assertEqual(rows(self.dir, "SELECT COUNT(*) FROM messages"), [(4,)])
        self.assertTrue(os.path.exists(orphan))
        self.assertFalse(os.path.exists(os.path.join(self.dir, LOST_AND_FOUND)))

    def test_orphanFileMovedToLostAndFound(self):
        content = b"Subject: stray\r\n\r\nnever deleted\r\n"
        orphan = os.path.join(self.dir, "messages", "ab", "abcdef")
        os.makedirs(os.path.dirname(orphan), exist_ok=True)
        with open(orphan, "wb") as f:
            f.write(content)

        [finding] = checkStore(self.dir).findings
        self.assertEqual(finding.kind, "orphan-file")
        self.assertEqual(finding.detail, "messages/ab/abcdef is named by no message")
        self.assertEqual(finding.action, f"moved to {LOST_AND_FOUND}/ab_abcdef")
        self.assertFalse(os.path.exists(orphan))
        with open(os.path.join(self.dir, LOST_AND_FOUND, "ab_abcdef"), "rb") as f:
            self.assertEqual(f.read(), content)
        self.assertTrue(checkStore(self.dir).clean)

    def test_youngOrphanLeftAlone(self):
        """A file a live delivery has just written (its row not yet committed) is not taken."""
        orphan = os.path.join(self.dir, "messages", "cd", "cdef")
        os.makedirs(os.path.dirname(orphan), exist_ok=True)
        with open(orphan, "wb") as f:
            f.write(b"x")
        self.assertTrue(checkStore(self.dir, grace=60).clean)
        self.assertTrue(os.path.exists(orphan))
        os.utime(orphan, (0, 0))
        self.assertEqual([f.kind for f in checkStore(self.dir, grace=60).findings], ["orphan-file"])

    def test_sizeMismatchReportedOnly(self):
        path = fileOf(self.dir, 1)
        with open(path, "r+b") as f:
            f.truncate(5)
        [finding] = checkStore(self.dir).findings
        self.assertEqual(finding.kind, "size-mismatch")
        self.assertIn("UID 1", finding.detail)
        self.assertEqual(os.path.getsize(path), 5)
        self.assertEqual(rows(self.dir, "SELECT COUNT(*) FROM messages"), [(4,)])

    def test_mailboxCountsRecounted(self):
        db = sqlite3.connect(os.path.join(self.dir, "index.sqlite"))
        try:
            db.execute("UPDATE mailboxes SET nmessages=9, nunseen=0 WHERE name='INBOX'")
            db.commit()
        finally:
            db.close()
        [finding] = checkStore(self.dir, repair=False).findings
        self.assertEqual(finding.kind, "mailbox-counts")
        self.assertIn("INBOX: the index keeps 9 messages, 0 unseen", finding.detail)
        self.assertIn("there are 4, 4,", finding.detail)
        self.assertEqual(rows(self.dir, "SELECT nmessages FROM mailboxes WHERE name='INBOX'"), [(9,)])
        [finding] = checkStore(self.dir).findings
        self.assertEqual(finding.action, "recounted")
        self.assertEqual(rows(self.dir, "SELECT nmessages, nunseen FROM mailboxes WHERE name='INBOX'"), [(4, 4)])
        self.assertTrue(checkStore(self.dir).clean)

    def test_corruptDatabaseReportedNotRepaired(self):
        os.unlink(fileOf(self.dir, 1))
        [(root,)] = rows(self.dir, "SELECT rootpage FROM sqlite_master WHERE name='messages_modseq'")
        [(pageSize,)] = rows(self.dir, "PRAGMA page_size")
        with open(os.path.join(self.dir, "index.sqlite"), "r+b") as f:
            f.seek((root - 1) * pageSize)
            f.write(b"\x0d" + b"\xff" * (pageSize - 1))
        report = checkStore(self.dir)
        self.assertTrue(report.findings)
        self.assertEqual({f.kind for f in report.findings}, {"integrity"})
        self.assertIn("not repaired", report.findings[0].action)
        self.assertEqual(rows(self.dir, "SELECT COUNT(*) FROM expunged"), [(0,)], "no row was removed")

    def test_noStore(self):
        self.assertRaises(FsckError, checkStore, self.mktemp())


class InlineStoreFsckTests(unittest.TestCase):
    """A store with its messages' content in the index (the default)."""

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        store = SQLiteStore(self.dir, reactor)
        yield store.open()
        yield store.createAccount(USER)
        for n in range(1, 4):
            yield store.append(USER, "INBOX", message(n))
        yield store.close()

    def execute(self, sql, args=()):
        db = sqlite3.connect(os.path.join(self.dir, "index.sqlite"), isolation_level=None)
        try:
            db.execute(sql, args)
        finally:
            db.close()

    def blobOf(self, uid):
        return int(fileOf(self.dir, uid).rsplit(":", 1)[1])

    def test_clean(self):
        report = checkStore(self.dir)
        self.assertTrue(report.clean, report.lines())
        self.assertEqual(report.checked, {"messages": 3, "files": 0, "in the index": 3})

    @defer.inlineCallbacks
    def test_missingContentRowRemovedAndExpunged(self):
        self.execute("DELETE FROM blobs WHERE id=?", (self.blobOf(2),))
        [finding] = checkStore(self.dir, repair=False).findings
        self.assertEqual((finding.kind, finding.action), ("missing-file", "kept (check only)"))
        [finding] = checkStore(self.dir).findings
        self.assertIn(f"{USER}/INBOX UID 2", finding.detail)
        self.assertIn("content in the index is missing", finding.detail)
        self.assertEqual(finding.action, "removed the index row (expunged)")
        self.assertTrue(checkStore(self.dir).clean)
        store = SQLiteStore(self.dir, reactor)
        yield store.open()
        self.addCleanup(store.close)
        self.assertEqual([m.uid for m in (yield store.fetchMeta(USER, "INBOX"))], [1, 3])
        self.assertEqual((yield store.getContent(USER, "INBOX", 3)), message(3))

    def test_orphanContentSavedThenRemoved(self):
        self.execute("INSERT INTO blobs (id, data) VALUES (999, ?)", (b"the only copy",))
        [finding] = checkStore(self.dir, repair=False).findings
        self.assertEqual((finding.kind, finding.action), ("orphan-blob", "kept (check only)"))
        self.assertEqual(rows(self.dir, "SELECT COUNT(*) FROM blobs"), [(4,)])
        [finding] = checkStore(self.dir).findings
        self.assertEqual(finding.action, f"written to {LOST_AND_FOUND}/blob-999 and removed from the index")
        with open(os.path.join(self.dir, LOST_AND_FOUND, "blob-999"), "rb") as f:
            self.assertEqual(f.read(), b"the only copy")
        self.assertEqual(rows(self.dir, "SELECT COUNT(*) FROM blobs"), [(3,)])
        self.assertTrue(checkStore(self.dir).clean)

    def test_sizeMismatchReportedOnly(self):
        self.execute("UPDATE blobs SET data=? WHERE id=?", (b"short", self.blobOf(1)))
        [finding] = checkStore(self.dir).findings
        self.assertEqual(finding.kind, "size-mismatch")
        self.assertIn("UID 1", finding.detail)
        self.assertEqual(rows(self.dir, "SELECT COUNT(*) FROM messages"), [(3,)])


class QueueFsckTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        queue = SQLiteQueue(self.dir, reactor, inlineSize=16)
        yield queue.open()
        self.ids = []
        for n in range(3):
            env = Envelope("s@example.net", (f"r{n}@example.org",),
                           routes=(Route.deliver(LocalDestination(f"r{n}@example.org")),))
            t = queue.begin(env)
            t.write(message(n))
            self.ids.append((yield t.commit()))
        yield queue.close()

    def test_clean(self):
        report = checkQueue(self.dir)
        self.assertTrue(report.clean, report.lines())
        self.assertEqual(report.checked, {"queue entries": 3, "files": 3})

    def test_missingFileAndOrphan(self):
        os.unlink(os.path.join(self.dir, "messages", self.ids[0]))
        with open(os.path.join(self.dir, "messages", "DEADBEEF"), "wb") as f:
            f.write(message(9))

        checked = checkQueue(self.dir, repair=False)
        self.assertEqual(len(checked.findings), 2)
        self.assertTrue(os.path.exists(os.path.join(self.dir, "messages", "DEADBEEF")))

        report = checkQueue(self.dir)
        byKind = {f.kind: f for f in report.findings}
        self.assertEqual(set(byKind), {"queue-missing-file", "queue-orphan-file"})
        self.assertIn(self.ids[0], byKind["queue-missing-file"].detail)
        self.assertIn("from <s@example.net> to <r0@example.org>", byKind["queue-missing-file"].detail)
        with open(os.path.join(self.dir, LOST_AND_FOUND, "DEADBEEF"), "rb") as f:
            self.assertEqual(f.read(), message(9))
        db = sqlite3.connect(os.path.join(self.dir, "queue.sqlite"))
        try:
            self.assertEqual(sorted(r[0] for r in db.execute("SELECT id FROM entries")), sorted(self.ids[1:]))
            self.assertEqual(db.execute("SELECT COUNT(*) FROM recipients WHERE entry=?", (self.ids[0],)).fetchone(),
                             (0,))
        finally:
            db.close()
        self.assertTrue(checkQueue(self.dir).clean)


class FsckCommandTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.data = os.path.abspath(self.mktemp())
        self.store = os.path.join(self.data, "store")
        store = SQLiteStore(self.store, reactor, inlineMax=0)
        yield store.open()
        yield store.createAccount(USER)
        for n in range(1, 3):
            yield store.append(USER, "INBOX", message(n))
        yield store.close()
        queue = SQLiteQueue(os.path.join(self.data, "queue"), reactor)
        yield queue.open()
        yield queue.close()

    def run_(self, *argv):
        out, err = [], []
        code = cli.main(["--data", self.data, "fsck", *argv], out=out.append, err=err.append)
        return code, out, err

    def test_cleanExitsZero(self):
        code, out, err = self.run_()
        self.assertEqual((code, err), (0, []))
        self.assertEqual(out[-1], "fsck: clean")

    def test_problemsExitOneAndAreReported(self):
        os.unlink(fileOf(self.store, 1))
        stray = os.path.join(self.store, "messages", "ee", "ee01")
        os.makedirs(os.path.dirname(stray), exist_ok=True)
        with open(stray, "wb") as f:
            f.write(b"stray")
        os.utime(stray, (0, 0))

        code, out, err = self.run_("--check-only")
        self.assertEqual((code, err), (1, []))
        text = "\n".join(out)
        self.assertIn(f"missing-file: {USER}/INBOX UID 1", text)
        self.assertIn("orphan-file: messages/ee/ee01 is named by no message -> kept (check only)", text)
        self.assertIn("fsck: 2 problem(s) found (check only: nothing changed)", text)

        code, out, err = self.run_()
        self.assertEqual(code, 1)
        text = "\n".join(out)
        self.assertIn("-> removed the index row (expunged)", text)
        self.assertIn(f"-> moved to {LOST_AND_FOUND}/ee_ee01", text)
        self.assertIn("fsck: 2 problem(s) found and handled", text)

        code, out, _ = self.run_()
        self.assertEqual((code, out[-1]), (0, "fsck: clean"))

    def test_defaultGraceSparesFreshFiles(self):
        stray = os.path.join(self.store, "messages", "ee", "ee02")
        os.makedirs(os.path.dirname(stray), exist_ok=True)
        with open(stray, "wb") as f:
            f.write(b"being written")
        self.assertEqual(self.run_()[0], 0)
        self.assertEqual(self.run_("--grace", "0")[0], 1)

    def test_noStoreIsAnError(self):
        out, err = [], []
        code = cli.main(["--data", os.path.abspath(self.mktemp()), "fsck"], out=out.append, err=err.append)
        self.assertEqual(code, 1)
        self.assertIn("no database at", err[0])
