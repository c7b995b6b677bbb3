"""
Group commit for SQLite + files: one write pipeline per database.

Write operations are queued from the reactor thread and executed in batches
by four threads in a row (L{Writer}): the files thread writes the batch's
files and makes them (and the directories they were linked into) durable
together; the commit thread applies every ready operation in one
transaction and commits it once; the sync thread makes committed batches
durable with one fsync of the WAL for all that are waiting (what
C{synchronous=FULL} does inside the commit, but after the write lock is
released: no other commit, of this process or another, waits for it, and
the next batch commits while this one syncs); the completion thread runs
the post-commit steps (a batch without any goes straight on) and the
operations' Deferreds fire on the reactor thread, in commit order, one
wake-up of the reactor per batch.  Under load many sessions' messages
share one round of fsyncs; alone, a message costs what it must.

Each operation is isolated by a SAVEPOINT: one that raises is rolled back and
fails alone, the rest of its batch commits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import queue
import sqlite3
import threading
import time

from twisted.internet import defer

from mailplat.log import Logger
from twisted.python.failure import Failure

from mailplat.interfaces.storage import TemporaryStoreFailure

_log = Logger()

_libc = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _libc.syncfs
except (OSError, AttributeError):
    _libc = None

#: When a batch has at least this many files, one syncfs(2) of the file system
#: replaces one fsync per file.  syncfs flushes every process's dirty data on
#: the file system, so on a busy shared disk it costs many times an fsync
#: (measured: 28 ms against 4 ms); below this size the batch's files are
#: fsync'd in parallel instead, which the file system's journal commits
#: together (ext4/xfs group concurrent fsyncs into one journal commit).
SYNCFS_THRESHOLD = 256

#: Threads that fsync one batch's files concurrently.
_FSYNC_THREADS = 16
_fsyncPool = None


def _parallelFsync(paths) -> None:
    global _fsyncPool
    if len(paths) == 1:
        fsyncPath(paths[0])
        return
    if _fsyncPool is None:
        from concurrent.futures import ThreadPoolExecutor

        _fsyncPool = ThreadPoolExecutor(_FSYNC_THREADS, thread_name_prefix="mailplat-fsync")
    # list() waits for all and re-raises the first failure.
    list(_fsyncPool.map(fsyncPath, paths))


def diskFull(failure) -> bool:
    """Whether C{failure} is a full disk (or quota): worth a line in the log, not a traceback per write."""
    e = failure.value
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, sqlite3.OperationalError) and "full" in str(e)


def logWriteFailure(what: str, failure) -> None:
    """Log a failed write: a full disk as an error line, anything else with its traceback."""
    if diskFull(failure):
        _log.error("{what}: the disk is full ({error})", what=what, error=failure.getErrorMessage())
    else:
        _log.failure(what, failure)


def fsyncPath(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncFiles(paths, directories) -> None:
    """Make the content of C{paths} and the entries of C{directories} durable."""
    paths = list(paths)
    directories = list(directories)
    if _libc is not None and len(paths) >= SYNCFS_THRESHOLD:
        fd = os.open(directories[0] if directories else os.path.dirname(paths[0]), os.O_RDONLY)
        try:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)
        return
    # The files' contents and their directory entries are independent: all
    # of them are synced in one concurrent round, and all are durable
    # before the caller commits the database transaction that names them.
    if paths or directories:
        _parallelFsync(paths + directories)


def writeFile(path: str, data: bytes) -> None:
    """Write C{data} to a new file at C{path} (not yet synced); on failure (e.g. a full disk) remove it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    os.close(fd)


def linkOrCopy(source: str, target: str) -> None:
    """Hard-link C{source} to C{target}, or copy it when they are on different file systems."""
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        with open(source, "rb") as src:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            with os.fdopen(fd, "wb") as dst:
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    dst.write(chunk)


class WriteOp:
    """
    One queued write: C{prepare()} runs first, on the files thread (file
    work; returns the paths to sync and the directories to sync), then
    C{apply(db)} inside the batch transaction, on the commit thread, then
    C{after(result)} once committed, on the completion thread (e.g.
    unlinking removed files; it must not touch the database), before the
    Deferred fires.  C{apply}'s return value is the result.

    C{durable=False} marks a change that need not be on stable storage when
    its Deferred fires (e.g. settling a delivered queue entry: losing it in a
    crash only means an idempotent redelivery).  A batch of only such
    changes commits without an fsync; it becomes durable with the next
    durable commit (SQLite WAL keeps commits in order).

    C{small=True} (only without C{prepare}, C{after} or C{onFailure})
    marks a change of a few rows (a flag change of a few messages, a
    message kept in the index): when the commit thread is not in a
    transaction and no other process holds the database's write lock, it
    is committed at once in the calling (reactor) thread instead of making
    the round of the threads -- without an fsync; a durable one's Deferred
    fires once the sync stage has synced the WAL, after every batch the
    commit thread committed before it.  Its C{apply} may raise L{NotSmall} when it finds more to do
    than it expected (L{Writer.inline} says whether it runs inline): that
    is rolled back and the change goes to the commit thread.  It may so commit before operations
    submitted earlier and still under way: use it only for a change whose
    caller has none of its own under way (a session waits for each
    change), as other callers' changes are concurrent with it anyway.
    """

    def __init__(self, apply, prepare=None, after=None, onFailure=None, durable=True, small=False):
        self.small = small and prepare is None and after is None and onFailure is None
        self.durable = durable
        self.apply = apply
        self.prepare = prepare
        self.after = after
        self.onFailure = onFailure
        self.deferred = defer.Deferred()


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    # Statement journals (a DELETE that fires triggers, an INSERT OR
    # REPLACE) and sorts in memory: as files, each is created, unlinked
    # and written in /var/tmp, several system calls per change.
    db.execute("PRAGMA temp_store=MEMORY")
    return db


def tableColumns(db, table: str) -> set:
    """The names of C{table}'s columns (a migration's test for what an older version lacks)."""
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


#: Waits between tries for a write lock another process holds, in seconds:
#: short ones first (a commit holds it for about an fsync), growing to
#: 5 ms (SQLite's own busy handler sleeps at least 1 ms, then 2, 5, 10...).
_LOCK_WAITS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005)
#: How long to wait for it in all, as C{connect}'s timeout.
_LOCK_TIMEOUT = 60.0


def _beginImmediate(db) -> None:
    """C{BEGIN IMMEDIATE} on a connection without a busy timeout, waiting for the lock here."""
    waited = 0.0
    n = 0
    while True:
        try:
            db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or waited >= _LOCK_TIMEOUT:
                raise
        pause = _LOCK_WAITS[min(n, len(_LOCK_WAITS) - 1)]
        time.sleep(pause)
        waited += pause
        n += 1


class NotSmall(Exception):
    """
    Raised by a read started inline, or by the C{apply} of a small change
    being committed inline, that found it has more to do: it runs again in
    a thread (the change: in the commit thread, as a change not small).
    """


class Database:
    """
    One SQLite database used from Twisted: a L{Writer} thread for changes
    (group commit) and the reactor's thread pool for reads, one connection
    per thread, each read in its own transaction.  C{schema} (a script of
    C{CREATE ... IF NOT EXISTS}) runs at start, then C{migrate(connection)}
    if given, which brings a database made by an older version up to date.
    """

    def __init__(self, path: str, schema: str, reactor, name: str, migrate=None):
        self.path = path
        self._schema = schema
        self._migrate = migrate
        self._reactor = reactor
        self.writer = Writer(path, reactor, name=name)
        self._local = threading.local()

    def start(self):
        db = connect(self.path)
        try:
            db.executescript(self._schema)
            if self._migrate is not None:
                self._migrate(db)
        finally:
            db.close()
        self.writer.start()

    def stop(self):
        return self.writer.stop()

    def submit(self, op: "WriteOp"):
        return self.writer.submit(op)

    def connection(self) -> sqlite3.Connection:
        """This thread's read connection."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = connect(self.path)
        return db

    def read(self, f, *args, inline=False, transaction=True):
        """
        Run C{f(connection, *args)} in a read transaction; a Deferred that
        fires with its result.  In a thread of the reactor's pool; or, with
        C{inline}, at once in the calling (reactor) thread, on the
        connection small changes are committed on there, for a read known to be
        small (a few rows found by index: cheaper than the two thread
        switches) -- unless C{f} raises L{NotSmall}, which sends it to the
        pool after all.  Without C{transaction}, each statement of C{f}
        sees the database as of its own start (for a read of one statement,
        or whose statements need not agree).
        """
        from twisted.internet.threads import deferToThreadPool

        def run(db=None):
            if db is None:
                db = self.connection()
            if not transaction:
                return f(db, *args)
            db.execute("BEGIN")
            try:
                return f(db, *args)
            finally:
                db.execute("COMMIT")

        if inline:
            self._local.inline = True
            try:
                # The connection this thread's small changes are committed
                # on: its page cache stays valid across its own commits.
                return defer.succeed(run(self.writer.inlineConnection()))
            except NotSmall:
                pass
            except sqlite3.OperationalError as e:
                # (No busy handler on that connection: a read that meets a
                # lock -- a WAL being recovered -- waits in a thread.)
                if "locked" not in str(e) and "busy" not in str(e):
                    return defer.fail()
            except BaseException:
                return defer.fail()
            finally:
                self._local.inline = False
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), run)

    @property
    def inline(self) -> bool:
        """Whether the read or change running in this thread was started inline (it may raise L{NotSmall})."""
        return getattr(self._local, "inline", False) or self.writer.inline


class _Prepared:
    """Operations whose files are durable, in their order, ready to commit."""

    __slots__ = ("ops",)

    def __init__(self, ops):
        self.ops = ops


#: Sentinels on the stages' queues.
_STOP = object()
_FILES_DONE = object()


def _syncWal(dbPath: str) -> None:
    """
    Make every transaction committed to C{dbPath}'s WAL so far durable.

    A commit with C{synchronous=NORMAL} has written its frames (and, after a
    checkpoint, a synced new WAL header); an fdatasync of the WAL file then
    does what C{synchronous=FULL} would have done at the commit.  Without a
    WAL file (the last connection closed it after a checkpoint, which
    synced the database) there is nothing left to sync.
    """
    try:
        fd = os.open(dbPath + "-wal", os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


class Writer:
    """
    The write pipeline of one database, four threads in a row:

      1. I{files}: operations that write files (C{prepare}) are prepared
         in batches and their files synced together;
      2. I{commit}: every operation that is ready (its files durable, or
         none to write) is applied in one transaction per batch and
         committed without an fsync (C{synchronous=NORMAL});
      3. I{sync}: one fdatasync of the WAL makes every batch committed
         before it durable (batches with a durable operation wait for it;
         the others pass through, to keep commit order, or skip this
         thread when nothing is waiting in it);
      4. I{completion}: each committed operation's C{after} step runs
         (unlinking files the transaction removed) and its Deferred fires,
         in commit order; a batch without C{after} steps skips this thread
         when it has nothing queued.

    So a change with no files to write (flags, a queue settlement) never
    waits for another operation's file fsyncs, the commit stage never waits
    for an unlink, and one batch's files are synced while the previous
    batch commits.  Operations that write files keep their submission order
    among themselves, as do those that do not; an operation of one kind may
    commit before one of the other kind that was submitted earlier and has
    not completed yet (the two are concurrent: neither caller has seen the
    other's result).
    """

    def __init__(self, path: str, reactor, name: str = "mailplat-writer", maxBatch: int = 512):
        self._path = path
        self._reactor = reactor
        # SimpleQueue: a put and a get are one C call each, the hand-off
        # between stages is most of what a small write costs.
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # to the commit stage
        self._fileQueue: queue.SimpleQueue = queue.SimpleQueue()
        self._syncQueue: queue.SimpleQueue = queue.SimpleQueue()
        self._doneQueue: queue.SimpleQueue = queue.SimpleQueue()
        #: Committed batches given to the sync stage and not yet passed on.
        self._syncBacklog = 0
        self._syncLock = threading.Lock()
        #: Items given to the completion stage and not yet passed on to
        #: the reactor; while there are none, a batch with no post-commit
        #: steps is passed on by the commit stage itself (order is kept:
        #: the reactor runs what threads give it in the order given).
        self._doneBacklog = 0
        self._doneLock = threading.Lock()
        self._maxBatch = maxBatch
        self._threads = [
            threading.Thread(target=self._runFiles, name=name + "-files", daemon=True),
            threading.Thread(target=self._run, name=name, daemon=True),
            threading.Thread(target=self._runSync, name=name + "-sync", daemon=True),
            threading.Thread(target=self._runCompletion, name=name + "-done", daemon=True),
        ]
        self._started = False
        self._stopped = False
        self._inlineDb = None
        self._txLock = threading.Lock()
        self._local = threading.local()
        self._inlineCommits = 0
        self._checkpointing = False
        self._checkpointDone = None  # the Deferred of the checkpoint under way
        #: Whether the last operation submitted was committed at once in the
        #: calling thread (not queued for the commit stage).
        self.lastInline = False

    #: After this many commits made in the reactor's thread, a passive WAL
    #: checkpoint runs in a thread (their connection never checkpoints: that
    #: would fsync in the reactor's thread).
    CHECKPOINT_EVERY = 256

    @property
    def inline(self) -> bool:
        """Whether a small change is being committed inline in this thread (its C{apply} may raise L{NotSmall})."""
        return getattr(self._local, "inline", False)

    def start(self):
        for t in self._threads:
            t.start()
        self._started = True

    def stop(self):
        """Finish queued work; fires (on the reactor) when the threads have ended."""
        self._stopped = True
        if self._inlineDb is not None:
            self._inlineDb.close()
            self._inlineDb = None
        if not self._started:
            return defer.succeed(None)
        d = defer.Deferred()
        self._fileQueue.put(_STOP)

        def wait():
            for t in self._threads:
                t.join()
            self._reactor.callFromThread(d.callback, None)

        threading.Thread(target=wait, daemon=True).start()
        return d

    def submit(self, op: WriteOp):
        self.lastInline = False
        if self._stopped:
            # Nothing would ever commit it: a session still open while the
            # server shuts down gets its temporary failure at once.
            if op.onFailure is not None:
                op.onFailure()
            return defer.fail(TemporaryStoreFailure("the store is closed"))
        if op.small and self._started and self._commitInline(op):
            self.lastInline = True
            return op.deferred
        (self._fileQueue if op.prepare is not None else self._queue).put(op)
        return op.deferred

    def inlineConnection(self) -> sqlite3.Connection:
        """The reactor thread's connection: small changes committed inline, and inline reads."""
        db = self._inlineDb
        if db is None:
            db = self._inlineDb = connect(self._path)
            db.execute("PRAGMA busy_timeout=0")  # locked: the writer's threads take it
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")
        return db

    def _commitInline(self, op) -> bool:
        """Commit C{op} now, in this thread; False (nothing done) when the database is locked."""
        db = self.inlineConnection()
        # The commit thread's transactions and these exclude each other here,
        # so neither meets the other's lock in SQLite (whose busy handler
        # sleeps a millisecond or more).
        if not self._txLock.acquire(blocking=False):
            return False
        try:
            outcome = self._commitInlineLocked(db, op)
        finally:
            self._txLock.release()
        if outcome is None:
            return False
        # Fired with the lock released: what the caller does next may
        # commit inline too.
        ok, value = outcome
        if ok is None:
            pass  # durable: the sync stage fires it
        elif ok:
            op.deferred.callback(value)
        else:
            op.deferred.errback(value)
        return True

    def _commitInlineLocked(self, db, op):
        """(True, result), (False, failure), (None, None) when the sync stage takes it on; None if not done."""
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return None
        self._local.inline = True
        try:
            result = op.apply(db)
            db.execute("COMMIT")
        except NotSmall:
            db.execute("ROLLBACK")
            return None
        except Exception:
            f = Failure()
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(f.value, sqlite3.OperationalError):
                logWriteFailure("store commit failed", f)
                f = Failure(TemporaryStoreFailure("the store cannot write now; try again later"))
            return (False, f)
        finally:
            self._local.inline = False
        self._inlineCommits += 1
        if self._inlineCommits >= self.CHECKPOINT_EVERY and not self._checkpointing:
            self._checkpoint()
        if op.durable:
            # Committed without an fsync: the sync stage makes it durable.
            with self._syncLock:
                self._syncBacklog += 1
            self._syncQueue.put((True, [op], [(True, result)]))
            return (None, None)
        return (True, result)

    def _checkpoint(self):
        from twisted.internet.threads import deferToThreadPool

        self._inlineCommits = 0
        self._checkpointing = True

        def run():
            db = connect(self._path)
            try:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                db.close()

        def done(result):
            self._checkpointing = False
            return None

        d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), run)
        d.addErrback(lambda f: _log.failure("WAL checkpoint failed", f))
        d.addBoth(done)
        self._checkpointDone = d

    @staticmethod
    def _drain(q, first, limit):
        """C{first} and what else is waiting on C{q}, up to C{limit}; and whether a sentinel came."""
        batch = [first]
        while len(batch) < limit:
            try:
                nxt = q.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP or nxt is _FILES_DONE:
                return batch, nxt
            batch.append(nxt)
        return batch, None

    # --- stage 1: files ---------------------------------------------------------

    def _runFiles(self):
        while True:
            op = self._fileQueue.get()
            if op is _STOP:
                self._queue.put(_FILES_DONE)
                return
            batch, sentinel = self._drain(self._fileQueue, op, self._maxBatch)
            self._prepare(batch)
            if sentinel is not None:
                self._queue.put(_FILES_DONE)
                return

    def _prepare(self, batch):
        live = []
        paths, dirs = [], set()
        for op in batch:
            try:
                p, d = op.prepare()
                paths.extend(p)
                dirs.update(d)
                live.append(op)
            except Exception:
                f = Failure()
                logWriteFailure("store write preparation failed", f)
                self._toDone((op, f))
        if live and (paths or dirs):
            try:
                syncFiles(paths, sorted(dirs))
            except Exception:
                f = Failure()
                logWriteFailure("fsync failed", f)
                for op in live:
                    self._toDone((op, f))
                return
        if live:
            self._queue.put(_Prepared(live))

    # --- stage 2: commit --------------------------------------------------------

    def _run(self):
        db = connect(self._path)
        # Waiting for another process's write lock is _beginImmediate's.
        db.execute("PRAGMA busy_timeout=0")
        # The sync stage makes durable commits durable, outside the lock.
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            while True:
                item = self._queue.get()
                if item is _FILES_DONE:
                    break
                items, sentinel = self._drain(self._queue, item, self._maxBatch)
                ops = []
                for it in items:
                    if isinstance(it, _Prepared):
                        ops.extend(it.ops)
                    else:
                        ops.append(it)
                self._commit(db, ops)
                if sentinel is _FILES_DONE:
                    break
        finally:
            db.close()
            self._syncQueue.put(_STOP)

    def _commit(self, db, live):
        with self._txLock:
            results = self._commitLocked(db, live)
            # Queued for the sync stage before the lock is released: a change
            # committed inline after this batch is queued after it, and the
            # Deferreds fire in commit order.
            direct = results is not None and not self._toSync(live, results)
        if direct:
            # (After the lock: the callers' next changes may commit inline.)
            self._passOn(live, results)

    def _commitLocked(self, db, live):
        """Apply and commit C{live}: the results, or None when the batch failed as a whole."""
        results = []
        try:
            _beginImmediate(db)
            if len(live) == 1:
                # One operation: no savepoint; if it fails, nothing commits.
                try:
                    results.append((True, live[0].apply(db)))
                except Exception:
                    results.append((False, Failure()))
                    db.execute("ROLLBACK")
                else:
                    db.execute("COMMIT")
                return results
            for i, op in enumerate(live):
                db.execute(f"SAVEPOINT op{i}")
                try:
                    results.append((True, op.apply(db)))
                    db.execute(f"RELEASE op{i}")
                except Exception:
                    db.execute(f"ROLLBACK TO op{i}")
                    db.execute(f"RELEASE op{i}")
                    results.append((False, Failure()))
            db.execute("COMMIT")
        except Exception:
            f = Failure()
            logWriteFailure("store commit failed", f)
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            for op in live:
                self._toDone((op, f))
            return None
        return results

    # --- stage 3: sync ----------------------------------------------------------

    def _toSync(self, live, results) -> bool:
        """(Commit thread, holding the commit lock.)  Queue a committed batch for the sync stage if it must be made durable or others wait there."""
        durable = any(ok and op.durable for op, (ok, _) in zip(live, results))
        with self._syncLock:
            through = durable or self._syncBacklog > 0
            if through:
                self._syncBacklog += 1
        if through:
            self._syncQueue.put((durable, live, results))
        return through

    def _runSync(self):
        while True:
            item = self._syncQueue.get()
            if item is _STOP:
                self._doneQueue.put(_STOP)
                return
            batches, sentinel = self._drain(self._syncQueue, item, self._maxBatch)
            failure = None
            if any(durable for durable, _, _ in batches):
                try:
                    _syncWal(self._path)
                except Exception:
                    _log.failure("fsync of the WAL failed", Failure())
                    failure = Failure(TemporaryStoreFailure("the store cannot write now; try again later"))
            for durable, live, results in batches:
                try:
                    if durable and failure is not None:
                        # Committed, but not known to be on disk: the caller
                        # must not take it as done (a retry may duplicate
                        # it, which loses nothing), and neither its
                        # post-commit step (unlinking what it removed) nor
                        # its failure step (unlinking what it added) may
                        # run: None marks that.
                        results = [(None, failure) if ok else (ok, v) for ok, v in results]
                    self._passOn(live, results)
                finally:
                    with self._syncLock:
                        self._syncBacklog -= 1
            if sentinel is not None:
                self._doneQueue.put(_STOP)
                return

    # --- stage 4: completion ----------------------------------------------------

    def _toDone(self, item):
        with self._doneLock:
            self._doneBacklog += 1
        self._doneQueue.put(item)

    def _passOn(self, live, results):
        """(Commit or sync thread.)  Pass a durable batch on: straight to the reactor when nothing is left to do."""
        if all(ok and op.after is None for op, (ok, _) in zip(live, results)):
            with self._doneLock:
                direct = self._doneBacklog == 0
            if direct:
                self._reactor.callFromThread(self._fireAll, [(op, v, ok) for op, (ok, v) in zip(live, results)])
                return
        self._toDone((live, results))

    def _runCompletion(self):
        while True:
            item = self._doneQueue.get()
            if item is _STOP:
                return
            target, outcome = item
            try:
                self._complete(target, outcome)
            finally:
                with self._doneLock:
                    self._doneBacklog -= 1

    def _complete(self, target, outcome):
        if isinstance(target, WriteOp):
            self._failOp(target, outcome)
            return
        fired = []
        for op, (ok, value) in zip(target, outcome):
            if ok is None:  # committed but not known durable: leave its files be
                fired.append((op, value, False))
                continue
            if ok and op.after is not None:
                try:
                    op.after(value)
                except Exception:
                    _log.failure("post-commit step failed", Failure())
            if not ok and op.onFailure is not None:
                try:
                    op.onFailure()
                except Exception:
                    pass
            fired.append((op, value, ok))
        # One wake-up of the reactor for the whole batch.
        self._reactor.callFromThread(self._fireAll, fired)

    @staticmethod
    def _fireAll(fired):
        for op, result, ok in fired:
            if ok:
                op.deferred.callback(result)
            else:
                op.deferred.errback(result)

    def _fire(self, op, result, ok):
        self._reactor.callFromThread(self._fireAll, [(op, result, ok)])

    def _failOp(self, op, failure):
        if op.onFailure is not None:
            try:
                op.onFailure()
            except Exception:
                pass
        exc = failure.value
        if isinstance(exc, (OSError, sqlite3.OperationalError)):
            failure = Failure(TemporaryStoreFailure("the store cannot write now; try again later"))
        self._fire(op, failure, False)
