"""The write pipeline (mailplat.store.writer.Writer) on a real SQLite database."""

import os
import threading

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from mailplat.interfaces.storage import TemporaryStoreFailure
from mailplat.store.writer import Database, WriteOp

SCHEMA = "CREATE TABLE IF NOT EXISTS log (n INTEGER PRIMARY KEY AUTOINCREMENT, what TEXT NOT NULL);"


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

        d = self.db.submit(WriteOp(lambda db: None, prepare=prepare, onFailure=lambda: undone.append(True)))
        yield self.assertFailure(d, TemporaryStoreFailure)
        self.assertEqual(undone, [True])
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
