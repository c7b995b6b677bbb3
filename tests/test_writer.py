"""The write pipeline (mailplat.store.writer.Writer) on a real SQLite database."""

import os
import threading

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from mailplat.interfaces.storage import TemporaryStoreFailure
from mailplat.store import writer
from mailplat.store.writer import Database, NotSmall, WriteOp

SCHEMA = "CREATE TABLE IF NOT EXISTS log (n INTEGER PRIMARY KEY AUTOINCREMENT, what TEXT NOT NULL);"


def heldInsert(what):
    """An operation whose apply() waits inside its transaction: it, an Event set once there, one that lets it go."""
    entered, release = threading.Event(), threading.Event()

    def apply(db):
        entered.set()
        release.wait(10)
        return db.execute("INSERT INTO log (what) VALUES (?)", (what,)).lastrowid

    return WriteOp(apply), entered, release


class WriterTests(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.db = Database(os.path.join(self.dir, "t.sqlite"), SCHEMA, reactor, "test-writer")
        self.db.start()
        self.addCleanup(self.db.stop)

    def insert(self, what, **kw):
        def apply(db):
            return db.execute("INSERT INTO log (what) VALUES (?)", (what,)).lastrowid

        return self.db.submit(WriteOp(apply, **kw))

    def fileOp(self, what, gate=None):
        path = os.path.join(self.dir, what)

        def prepare():
            if gate is not None:
                gate.wait(10)
            with open(path, "wb") as f:
                f.write(what.encode())
            return [path], [self.dir]

        return self.insert(what, prepare=prepare)

    @defer.inlineCallbacks
    def test_changeWithoutFilesDoesNotWaitForAnotherOnesFiles(self):
        gate = threading.Event()
        slow = self.fileOp("slow", gate)
        fired = []
        slow.addCallback(lambda r: fired.append(r) or r)
        quick = yield self.insert("flags", durable=False)
        self.assertEqual(fired, [], "the file operation is still held")
        gate.set()
        slowRow = yield slow
        self.assertGreater(slowRow, quick)
        self.assertTrue(os.path.exists(os.path.join(self.dir, "slow")))

    @defer.inlineCallbacks
    def test_fileOperationsKeepTheirOrder(self):
        rows = yield defer.gatherResults([self.fileOp(f"m{i}") for i in range(20)])
        self.assertEqual(rows, sorted(rows))
        found = yield self.db.read(lambda db: [r[0] for r in db.execute("SELECT what FROM log ORDER BY n")])
        self.assertEqual(found, [f"m{i}" for i in range(20)])

    @defer.inlineCallbacks
    def test_afterRunsBeforeTheDeferredFires(self):
        seen = []
        result = yield self.insert("x", after=lambda r: seen.append(("after", r)))
        self.assertEqual(seen, [("after", result)])

    @defer.inlineCallbacks
    def test_resultsFireInCommitOrderAcrossSlowAfterSteps(self):
        gate = threading.Event()
        order = []
        first = self.insert("first", after=lambda r: gate.wait(10))
        first.addCallback(lambda r: order.append("first"))
        yield deferLater(reactor, 0.05, lambda: None)  # committed, its after() held
        second = self.insert("second")
        second.addCallback(lambda r: order.append("second"))
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(order, [], "nothing fires ahead of an earlier commit")
        gate.set()
        yield defer.gatherResults([first, second])
        self.assertEqual(order, ["first", "second"])

    @defer.inlineCallbacks
    def test_failingOperationFailsAloneAndIsRolledBack(self):
        def bad(db):
            db.execute("INSERT INTO log (what) VALUES ('doomed')")
            raise ValueError("no")

        ok1 = self.insert("a")
        failed = self.db.submit(WriteOp(bad))
        ok2 = self.insert("b")
        yield ok1
        yield self.assertFailure(failed, ValueError)
        yield ok2
        found = yield self.db.read(lambda db: [r[0] for r in db.execute("SELECT what FROM log ORDER BY n")])
        self.assertEqual(found, ["a", "b"])

    @defer.inlineCallbacks
    def test_failedPreparationIsATemporaryFailure(self):
        undone = []

        def prepare():
            raise OSError(28, "No space left on device")

        from twisted.logger import formatEvent, globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        d = self.db.submit(WriteOp(lambda db: None, prepare=prepare, onFailure=lambda: undone.append(True)))
        yield self.assertFailure(d, TemporaryStoreFailure)
        self.assertEqual(undone, [True])
        # A full disk is one error line, not a traceback per write.
        self.assertEqual(self.flushLoggedErrors(OSError), [])
        self.assertIn("store write preparation failed: the disk is full ([Errno 28] No space left on device)",
                      [formatEvent(e) for e in events])

    @defer.inlineCallbacks
    def test_otherPreparationFailuresKeepTheirTraceback(self):
        def prepare():
            raise OSError(13, "Permission denied")

        yield self.assertFailure(self.db.submit(WriteOp(lambda db: None, prepare=prepare)), TemporaryStoreFailure)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    @defer.inlineCallbacks
    def test_stopFinishesEverythingQueued(self):
        ds = [self.fileOp(f"f{i}") for i in range(5)] + [self.insert(f"q{i}") for i in range(5)]
        yield self.db.stop()
        results = yield defer.gatherResults(ds)
        self.assertEqual(len(set(results)), 10)
        # Stopped twice (here and in the cleanup) is harmless.
        yield deferLater(reactor, 0, lambda: None)


class ReadTests(unittest.TestCase):
    setUp = WriterTests.setUp

    def test_inlineReadAnswersAtOnceInTheCallingThread(self):
        seen = []

        def f(db):
            seen.append((threading.get_ident(), self.db.inline))
            return db.execute("SELECT COUNT(*) FROM log").fetchone()[0]

        d = self.db.read(f, inline=True)
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(seen, [(threading.get_ident(), True)])
        self.assertFalse(self.db.inline)

    def test_inlineReadFailureIsAFailedDeferred(self):
        def f(db):
            db.execute("SELECT nonsense FROM log")

        self.failureResultOf(self.db.read(f, inline=True))

    @defer.inlineCallbacks
    def test_notSmallRunsAgainInAThread(self):
        from mailplat.store.writer import NotSmall

        seen = []

        def f(db):
            seen.append((threading.get_ident(), self.db.inline))
            if self.db.inline:
                raise NotSmall()
            return "done"

        result = yield self.db.read(f, inline=True)
        self.assertEqual(result, "done")
        self.assertEqual(seen[0], (threading.get_ident(), True))
        self.assertNotEqual(seen[1][0], threading.get_ident())
        self.assertFalse(seen[1][1])

    def test_inlineReadSharesTheInlineCommitsConnection(self):
        """Its page cache is not emptied by the small changes committed on the same connection."""
        seen = []
        self.successResultOf(self.db.read(lambda db: seen.append(db), inline=True))
        self.assertIs(seen[0], self.db.writer.inlineConnection())

    @defer.inlineCallbacks
    def test_inlineReadThatMeetsALockRunsInAThread(self):
        import sqlite3

        class Locked:
            def execute(self, *a):
                raise sqlite3.OperationalError("database is locked")

        self.patch(self.db.writer, "inlineConnection", Locked)
        result = yield self.db.read(lambda db: db.execute("SELECT 7").fetchone()[0], inline=True)
        self.assertEqual(result, 7)

    @defer.inlineCallbacks
    def test_plainReadRunsInAThread(self):
        ident = yield self.db.read(lambda db: threading.get_ident())
        self.assertNotEqual(ident, threading.get_ident())


class StoppedWriterTests(unittest.TestCase):
    def test_aWriteAfterStopFailsAtOnce(self):
        # A session still open while the server shuts down is answered with
        # a temporary failure instead of waiting for a commit that never comes.
        dir = os.path.abspath(self.mktemp())
        os.makedirs(dir)
        db = Database(os.path.join(dir, "t.sqlite"), SCHEMA, reactor, "test-stopped")
        db.start()
        stopped = db.stop()
        cleaned = []
        d = db.submit(WriteOp(lambda c: None, onFailure=lambda: cleaned.append(True)))
        self.failureResultOf(d, TemporaryStoreFailure)
        self.assertEqual(cleaned, [True])
        return stopped


class InlineCommitTests(unittest.TestCase):
    """Small, non-durable changes committed in the reactor's thread when nothing else is under way."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "t.sqlite")
        self.db = Database(self.path, SCHEMA, reactor, "test-writer")
        self.db.start()
        self.addCleanup(self.db.stop)

    def small(self, what, fail=False):
        def apply(db):
            n = db.execute("INSERT INTO log (what) VALUES (?)", (what,)).lastrowid
            if fail:
                raise ValueError("refused")
            return n

        return self.db.submit(WriteOp(apply, durable=False, small=True))

    def rows(self):
        return self.db.read(lambda db: [r[0] for r in db.execute("SELECT what FROM log ORDER BY n")])

    @defer.inlineCallbacks
    def test_committedAtOnce(self):
        d = self.small("a")
        self.assertEqual(self.successResultOf(d), 1)  # fired before submit returned
        self.assertEqual((yield self.rows()), ["a"])

    def test_firedWithTheLockReleased(self):
        """What a caller does when its small change is committed may commit inline too."""
        d = self.small("first").addCallback(lambda _: self.small("next"))
        self.assertEqual(self.successResultOf(d), 2)

    def test_failureRollsBack(self):
        self.failureResultOf(self.small("bad", fail=True), ValueError)
        self.assertEqual(self.successResultOf(self.small("good")), 1)

    @defer.inlineCallbacks
    def test_notBehindAnotherCallersWork(self):
        """
        Another caller's operation going through the threads does not hold a
        small change up; while the commit thread is in a transaction, the
        small change takes the threads' way, after it.
        """
        op, entered, gate = heldInsert("slow")
        first = self.db.submit(op)
        self.assertTrue(entered.wait(10))
        second = self.small("queued")  # the commit thread holds the transaction
        self.assertNoResult(second)
        gate.set()
        self.assertEqual((yield first), 1)
        self.assertEqual((yield second), 2)
        # A file operation being prepared (no transaction yet) does not hold it up.
        hold = threading.Event()
        path = os.path.join(self.dir, "f")

        def prepare():
            hold.wait(10)
            with open(path, "wb") as f:
                f.write(b"x")
            return [path], [self.dir]

        filed = self.db.submit(WriteOp(lambda db: db.execute("INSERT INTO log (what) VALUES ('file')").lastrowid,
                                       prepare=prepare))
        # (The commit thread leaves its last transaction's lock just after
        # the results are handed to the reactor.)
        for _ in range(100):
            if not self.db.writer._txLock.locked():
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.successResultOf(self.small("now")), 3)
        hold.set()
        self.assertEqual((yield filed), 4)
        self.assertEqual((yield self.rows()), ["slow", "queued", "now", "file"])

    @defer.inlineCallbacks
    def test_lockedByAnotherProcess(self):
        """A database another connection is writing goes through the writer's threads, which wait for it."""
        import sqlite3

        other = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO log (what) VALUES ('other')")
        d = self.small("mine")
        self.assertNoResult(d)
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertNoResult(d)
        other.execute("COMMIT")
        self.assertEqual((yield d), 2)
        self.assertEqual((yield self.rows()), ["other", "mine"])

    @defer.inlineCallbacks
    def test_checkpointsInAThread(self):
        """The reactor-thread connection never checkpoints; every so many commits a thread does."""
        import sqlite3

        self.db.writer.CHECKPOINT_EVERY = 5
        for i in range(5):
            self.successResultOf(self.small(f"r{i}"))
        self.assertTrue(self.db.writer._checkpointing)
        yield self.db.writer._checkpointDone
        self.assertFalse(self.db.writer._checkpointing)
        probe = sqlite3.connect(self.path, isolation_level=None)
        try:
            busy, frames, done = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            probe.close()
        self.assertEqual(frames, done)
        self.assertEqual((yield self.rows()), [f"r{i}" for i in range(5)])

    @defer.inlineCallbacks
    def test_durableCommittedAtOnceWaitsForTheSync(self):
        """A small durable change commits in this thread; its Deferred fires once the sync stage synced the WAL."""
        gate = threading.Event()
        synced = []
        real = writer._syncWal

        def syncWal(path):
            gate.wait(10)
            real(path)
            synced.append(path)

        self.patch(writer, "_syncWal", syncWal)
        d = self.db.submit(
            WriteOp(lambda db: db.execute("INSERT INTO log (what) VALUES ('durable')").lastrowid, small=True)
        )
        self.assertNoResult(d)
        self.assertEqual((yield self.rows()), ["durable"], "committed already")
        gate.set()
        self.assertEqual((yield d), 1)
        self.assertEqual(synced, [self.path])

    def test_notForFileChanges(self):
        self.assertTrue(WriteOp(lambda db: None, small=True).small)
        self.assertFalse(WriteOp(lambda db: None, durable=False, small=True, prepare=lambda: ([], [])).small)
        self.assertFalse(WriteOp(lambda db: None, durable=False, small=True, after=lambda r: None).small)
        self.assertFalse(WriteOp(lambda db: None, durable=False, small=True, onFailure=lambda: None).small)
        self.assertTrue(WriteOp(lambda db: None, durable=False, small=True).small)


class SyncStageTests(unittest.TestCase):
    """Durable commits are made durable by an fsync of the WAL after the write lock is released."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "t.sqlite")
        self.syncs = []
        self.gate = None
        self.entered = threading.Event()
        self.failWith = None
        real = writer._syncWal

        def syncWal(path):
            self.entered.set()
            if self.gate is not None:
                self.gate.wait(10)
            if self.failWith is not None:
                raise self.failWith
            real(path)
            self.syncs.append(path)

        self.patch(writer, "_syncWal", syncWal)
        self.db = Database(self.path, SCHEMA, reactor, "test-writer")
        self.db.start()
        self.addCleanup(self.db.stop)

    def insert(self, what, **kw):
        return self.db.submit(WriteOp(lambda db: db.execute("INSERT INTO log (what) VALUES (?)", (what,)).lastrowid, **kw))

    @defer.inlineCallbacks
    def test_onlyDurableCommitsSyncTheWal(self):
        yield self.insert("lazy", durable=False)
        self.assertEqual(self.syncs, [])
        yield self.insert("durable")
        self.assertEqual(self.syncs, [self.path])

    @defer.inlineCallbacks
    def test_theWriteLockIsFreeWhileTheWalSyncs(self):
        """Neither a small change here nor another process's commit waits for a durable commit's fsync."""
        import sqlite3

        self.gate = threading.Event()
        durable = self.insert("durable")
        self.assertTrue(self.entered.wait(10))
        for _ in range(100):
            if not self.db.writer._txLock.locked():
                break
            yield deferLater(reactor, 0.01, lambda: None)
        small = self.db.submit(
            WriteOp(lambda db: db.execute("INSERT INTO log (what) VALUES ('small')").lastrowid, durable=False, small=True)
        )
        self.assertEqual(self.successResultOf(small), 2)
        other = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO log (what) VALUES ('other')")
        other.execute("COMMIT")
        self.assertNoResult(durable)
        self.gate.set()
        self.assertEqual((yield durable), 1)

    @defer.inlineCallbacks
    def test_batchesFireInCommitOrderBehindASync(self):
        """Batches committed while an earlier one waits for its fsync fire after it, in order."""
        self.gate = threading.Event()
        order = []
        op, applying, release = heldInsert("first")
        d1 = self.db.submit(op)
        self.assertTrue(applying.wait(10))
        # Queued while the first is being applied: it goes to the sync
        # thread, and these commit while it waits there.
        d2 = self.insert("second")
        d3 = self.insert("third", durable=False)
        for d, name in ((d1, "first"), (d2, "second"), (d3, "third")):
            d.addCallback(lambda r, name=name: order.append(name) or r)
        release.set()
        self.assertTrue(self.entered.wait(10))
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(order, [])
        self.gate.set()
        self.assertEqual((yield defer.gatherResults([d1, d2, d3])), [1, 2, 3])
        self.assertEqual(order, ["first", "second", "third"])

    @defer.inlineCallbacks
    def test_aDurableChangeCommittedInlineFiresAfterEarlierBatches(self):
        self.gate = threading.Event()
        order = []
        first = self.insert("thread")
        self.assertTrue(self.entered.wait(10))  # committed, waiting for its fsync
        for _ in range(100):
            if not self.db.writer._txLock.locked():
                break
            yield deferLater(reactor, 0.01, lambda: None)
        second = self.db.submit(
            WriteOp(lambda db: db.execute("INSERT INTO log (what) VALUES ('inline')").lastrowid, small=True)
        )
        first.addCallback(lambda r: order.append(("thread", r)))
        second.addCallback(lambda r: order.append(("inline", r)))
        self.assertEqual(order, [])
        self.gate.set()
        yield defer.gatherResults([first, second])
        self.assertEqual(order, [("thread", 1), ("inline", 2)])

    @defer.inlineCallbacks
    def test_failedSyncIsATemporaryFailureAndKeepsFiles(self):
        """
        A commit whose fsync failed is not reported done; neither its
        post-commit step (removing files it dropped) nor its failure step
        (removing files it added) runs: the rows may well be on disk.
        """
        self.failWith = OSError(5, "Input/output error")
        steps = []
        d = self.insert("x", after=lambda r: steps.append("after"), onFailure=lambda: steps.append("undo"))
        yield self.assertFailure(d, TemporaryStoreFailure)
        self.assertEqual(steps, [])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.failWith = None
        self.assertEqual((yield self.insert("y")), 2)


class InlineNotSmallTests(unittest.TestCase):
    setUp = WriterTests.setUp

    @defer.inlineCallbacks
    def test_aSmallChangeThatFindsMoreGoesToTheCommitThread(self):
        seen = []

        def apply(db):
            seen.append((threading.current_thread() is threading.main_thread(), self.db.inline))
            db.execute("INSERT INTO log (what) VALUES ('big')")
            if self.db.inline:
                raise NotSmall()
            return db.execute("SELECT count(*) FROM log").fetchone()[0]

        d = self.db.submit(WriteOp(apply, durable=False, small=True))
        self.assertEqual((yield d), 1, "the inline attempt was rolled back")
        self.assertEqual(seen, [(True, True), (False, False)])


class ConnectionTests(unittest.TestCase):
    def test_temporaryStorageInMemory(self):
        """Statement journals and sorts never become files in /var/tmp (created and unlinked per change)."""
        from mailplat.store.writer import connect

        db = connect(os.path.join(os.path.abspath(self.mktemp()) + ".sqlite"))
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA temp_store").fetchone()[0], 2)
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
