"""
Group commit for SQLite + files: one writer thread per database.

Write operations are queued from the reactor thread and executed by a single
thread in batches: every operation in a batch first writes its files, then
all those files (and the directories they were linked into) are made durable
together, then the batch's database changes are made in one transaction and
committed once (one WAL fsync with C{synchronous=FULL}).  Only then do the
operations' Deferreds fire, on the reactor thread.  Under load many sessions'
messages share one round of fsyncs; alone, a message costs what it must.

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

from twisted.internet import defer
from twisted.logger import Logger

from mailplat.log import observer as logObserver
from twisted.python.failure import Failure

from mailplat.interfaces.storage import TemporaryStoreFailure

_log = Logger(observer=logObserver)

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
    One queued write: C{prepare()} runs first (file work; returns the paths to
    sync and the directories to sync), then C{apply(db)} inside the batch
    transaction, then C{after()} once committed (e.g. unlinking removed
    files).  C{apply}'s return value is the result.

    C{durable=False} marks a change that need not be on stable storage when
    its Deferred fires (e.g. settling a delivered queue entry: losing it in a
    crash only means an idempotent redelivery).  A batch of only such
    changes commits without an fsync; it becomes durable with the next
    durable commit (SQLite WAL keeps commits in order).
    """

    def __init__(self, apply, prepare=None, after=None, onFailure=None, durable=True):
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
    return db


class Database:
    """
    One SQLite database used from Twisted: a L{Writer} thread for changes
    (group commit) and the reactor's thread pool for reads, one connection
    per thread, each read in its own transaction.
    """

    def __init__(self, path: str, schema: str, reactor, name: str):
        self.path = path
        self._schema = schema
        self._reactor = reactor
        self.writer = Writer(path, reactor, name=name)
        self._local = threading.local()

    def start(self):
        db = connect(self.path)
        try:
            db.executescript(self._schema)
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

    def read(self, f, *args):
        """Run C{f(connection, *args)} in a thread, in a read transaction; fires with its result."""
        from twisted.internet.threads import deferToThreadPool

        def run():
            db = self.connection()
            db.execute("BEGIN")
            try:
                return f(db, *args)
            finally:
                db.execute("COMMIT")

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), run)


class Writer:
    """The writer thread of one database."""

    def __init__(self, path: str, reactor, name: str = "mailplat-writer", maxBatch: int = 512):
        self._path = path
        self._reactor = reactor
        self._queue: queue.Queue = queue.Queue()
        self._maxBatch = maxBatch
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    def start(self):
        self._thread.start()
        self._started = True

    def stop(self):
        """Finish queued work; fires (on the reactor) when the thread has ended."""
        if not self._started:
            return defer.succeed(None)
        d = defer.Deferred()
        self._queue.put(None)

        def wait():
            self._thread.join()
            self._reactor.callFromThread(d.callback, None)

        threading.Thread(target=wait, daemon=True).start()
        return d

    def submit(self, op: WriteOp):
        self._queue.put(op)
        return op.deferred

    def _run(self):
        db = connect(self._path)
        try:
            while True:
                op = self._queue.get()
                if op is None:
                    return
                batch = [op]
                stop = False
                while len(batch) < self._maxBatch:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    batch.append(nxt)
                self._runBatch(db, batch)
                if stop:
                    return
        finally:
            db.close()

    def _fire(self, op, result, ok):
        if ok:
            self._reactor.callFromThread(op.deferred.callback, result)
        else:
            self._reactor.callFromThread(op.deferred.errback, result)

    def _runBatch(self, db, batch):
        results = {}
        live = []
        paths, dirs = [], set()
        for op in batch:
            if op.prepare is None:
                live.append(op)
                continue
            try:
                p, d = op.prepare()
                paths.extend(p)
                dirs.update(d)
                live.append(op)
            except Exception:
                f = Failure()
                _log.failure("store write preparation failed", f)
                self._failOp(op, f)
        if paths or dirs:
            try:
                syncFiles(paths, sorted(dirs))
            except Exception:
                f = Failure()
                _log.failure("fsync failed", f)
                for op in live:
                    self._failOp(op, f)
                return
        lazy = not any(op.durable for op in live)
        try:
            if lazy:
                db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            for i, op in enumerate(live):
                db.execute(f"SAVEPOINT op{i}")
                try:
                    results[id(op)] = (True, op.apply(db))
                    db.execute(f"RELEASE op{i}")
                except Exception:
                    db.execute(f"ROLLBACK TO op{i}")
                    db.execute(f"RELEASE op{i}")
                    results[id(op)] = (False, Failure())
            db.execute("COMMIT")
        except Exception:
            f = Failure()
            _log.failure("store commit failed", f)
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            for op in live:
                self._failOp(op, f)
            return
        finally:
            if lazy:
                db.execute("PRAGMA synchronous=FULL")
        for op in live:
            ok, value = results[id(op)]
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
            self._fire(op, value, ok)

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
