"""
The embedded queue: every accepted message, until each recipient is settled.

Layout under the queue directory::

    queue.sqlite      entries (envelope, arrival, attempts, next attempt)
                      and recipients (state, last error)
    messages/ID       the message as received, Received: header included

A transaction buffers the message in memory (spilling to a temporary file
past C{spillSize}); C{commit} hands it to the group-commit writer.  A message
of at most C{inlineSize} octets is kept inline in its entry row, so the
whole commit is one SQLite transaction and one WAL fsync shared with the
other messages of its batch; a larger one is written to its file, synced
with the other files of the batch, and then its rows are inserted.  Only
then does the SMTP server say 250.  Settling an entry needs no fsync of its
own: after a crash the entry is simply delivered again, and delivery IDs
make that harmless.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import tempfile

from twisted.internet import defer
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailplat.interfaces.queue import Envelope, IQueue, IQueueFactory, IQueueTransaction, QueueEntry
from mailplat.interfaces.routing import LocalDestination, RemoteDestination, Route
from mailplat.store.writer import Database, WriteOp, connect, tableColumns, writeFile

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    envelope TEXT NOT NULL,
    size INTEGER NOT NULL,
    arrival REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    held INTEGER NOT NULL DEFAULT 0,
    content BLOB
);
CREATE INDEX IF NOT EXISTS entries_due ON entries (held, next_attempt);
CREATE TABLE IF NOT EXISTS recipients (
    entry TEXT NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT,
    warned INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (entry, address)
);
CREATE TABLE IF NOT EXISTS done (
    entry TEXT NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
    destination TEXT NOT NULL,
    PRIMARY KEY (entry, destination)
);
"""

PENDING_STATES = ("pending", "deferred")


def newQueueId() -> str:
    return secrets.token_hex(8).upper()


def _destinationToJson(d):
    if isinstance(d, LocalDestination):
        return {"local": d.user, "mailbox": d.mailbox}
    if isinstance(d, RemoteDestination):
        return {"remote": d.address}
    raise TypeError(f"unknown destination {d!r}")


def _destinationFromJson(d):
    if "local" in d:
        return LocalDestination(d["local"], d.get("mailbox", "INBOX"))
    return RemoteDestination(d["remote"])


def envelopeToJson(envelope: Envelope) -> str:
    return json.dumps(
        {
            "sender": envelope.sender,
            "recipients": list(envelope.recipients),
            "mailParams": envelope.mailParams,
            "rcptParams": [dict(p) for p in envelope.rcptParams],
            "clientAddress": envelope.clientAddress,
            "clientName": envelope.clientName,
            "authenticatedUser": envelope.authenticatedUser,
            "protocol": envelope.protocol,
            "routes": [[_destinationToJson(d) for d in r.destinations] for r in envelope.routes],
        },
        separators=(",", ":"),
    )


def envelopeFromJson(text: str) -> Envelope:
    d = json.loads(text)
    return Envelope(
        sender=d["sender"],
        recipients=tuple(d["recipients"]),
        mailParams=d.get("mailParams", {}),
        rcptParams=tuple(d.get("rcptParams", ())),
        clientAddress=d.get("clientAddress", ""),
        clientName=d.get("clientName", ""),
        authenticatedUser=d.get("authenticatedUser", ""),
        protocol=d.get("protocol", "ESMTP"),
        routes=tuple(Route.deliver(*[_destinationFromJson(x) for x in r]) for r in d.get("routes", ())),
    )


def _removeUnlocked(path):
    """Remove the file C{path} unless a process holds a lock on it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # in use
    finally:
        os.close(fd)
    try:
        os.unlink(path)
    except OSError:
        pass


@implementer(IQueueTransaction)
class _Transaction:
    def __init__(self, queue, envelope):
        self._queue = queue
        self._envelope = envelope
        self._chunks = []
        self._size = 0
        self._spill = None
        self._done = False

    def write(self, data):
        if self._done:
            raise RuntimeError("transaction already finished")
        self._size += len(data)
        if self._spill is not None:
            self._spill.write(data)
            return
        self._chunks.append(bytes(data))
        if self._size > self._queue.spillSize:
            fd, path = tempfile.mkstemp(dir=self._queue.tmpDir, prefix="in-")
            # Locked while this process owns it: another process opening the
            # queue (a worker, the admin command) leaves it alone.
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._spill = os.fdopen(fd, "wb")
            self._spillPath = path
            for c in self._chunks:
                self._spill.write(c)
            self._chunks = []

    def commit(self):
        if self._done:
            return defer.fail(RuntimeError("transaction already finished"))
        self._done = True
        if self._spill is not None:
            # Kept open (and locked) until the commit has moved it into place.
            spill = self._spill
            spill.flush()
            d = self._queue._commit(self._envelope, None, self._spillPath, self._size)

            def close(result):
                spill.close()
                return result

            return d.addBoth(close)
        content = b"".join(self._chunks)
        self._chunks = []
        return self._queue._commit(self._envelope, content, None, self._size)

    def abort(self):
        self._done = True
        self._chunks = []
        if self._spill is not None:
            self._spill.close()
            try:
                os.unlink(self._spillPath)
            except OSError:
                pass


@implementer(IQueue)
class SQLiteQueue:
    def __init__(self, directory: str, reactor=None, spillSize: int = 4 * 1024 * 1024,
                 inlineSize: int = 256 * 1024):
        self.inlineSize = inlineSize
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.directory = os.path.abspath(directory)
        self.messagesDir = os.path.join(self.directory, "messages")
        self.tmpDir = os.path.join(self.directory, "tmp")
        self._dbPath = os.path.join(self.directory, "queue.sqlite")
        self._db = Database(self._dbPath, SCHEMA, reactor, "mailplat-queue-writer")
        self.spillSize = spillSize
        self._committedListeners = []
        #: Seconds a new entry for local mailboxes only stays out of L{due}
        #: (0: none): an SMTP worker process delivers it itself meanwhile.
        self.leaseLocal = 0

    def leased(self, envelope) -> bool:
        """Whether a new entry with C{envelope} is leased (see L{leaseLocal})."""
        return bool(self.leaseLocal) and all(
            isinstance(d, LocalDestination) for route in envelope.routes for d in route.destinations)

    def open(self):
        os.makedirs(self.messagesDir, exist_ok=True)
        os.makedirs(self.tmpDir, exist_ok=True)
        for leftover in os.listdir(self.tmpDir):
            # Uncommitted spills of a previous run: never acknowledged.  One
            # still locked belongs to a live process sharing the queue.
            _removeUnlocked(os.path.join(self.tmpDir, leftover))
        self._db.start()
        db = connect(self._dbPath)
        try:
            columns = tableColumns(db, "entries")
            if "content" not in columns:
                db.execute("ALTER TABLE entries ADD COLUMN content BLOB")
            if "warned" not in tableColumns(db, "recipients"):
                db.execute("ALTER TABLE recipients ADD COLUMN warned INTEGER NOT NULL DEFAULT 0")
        finally:
            db.close()
        return defer.succeed(None)

    def close(self):
        return self._db.stop()

    def onCommitted(self, callback):
        """
        Call C{callback(entry)} on the reactor after each commit with the new
        L{QueueEntry}, so the runner can start on it without reading it back.
        """
        self._committedListeners.append(callback)

    def begin(self, envelope):
        return _Transaction(self, envelope)

    def path(self, queueId: str) -> str:
        return os.path.join(self.messagesDir, queueId)

    def _commit(self, envelope, content, spillPath, size):
        qid = newQueueId()
        path = self.path(qid)
        now = self._reactor.seconds()
        envJson = envelopeToJson(envelope)

        inline = content is not None and len(content) <= self.inlineSize

        def prepare():
            if content is not None:
                writeFile(path, content)
            else:
                os.rename(spillPath, path)
            return [path], [self.messagesDir]

        due = now + self.leaseLocal if self.leased(envelope) else now

        def apply(db):
            db.execute(
                "INSERT INTO entries (id, envelope, size, arrival, next_attempt, content) VALUES (?, ?, ?, ?, ?, ?)",
                (qid, envJson, size, now, due, content if inline else None),
            )
            db.executemany(
                "INSERT OR IGNORE INTO recipients (entry, address) VALUES (?, ?)",
                [(qid, r) for r in envelope.recipients],
            )
            return qid

        def onFailure():
            for p in (path, spillPath):
                if p:
                    try:
                        os.unlink(p)
                    except OSError:
                        pass

        d = self._db.submit(WriteOp(apply, None if inline else prepare, None, onFailure))

        def notify(q):
            entry = QueueEntry(q, envelope, "" if inline else path, size, now, 0,
                               tuple(dict.fromkeys(envelope.recipients)), content if inline else None)
            for cb in self._committedListeners:
                cb(entry)
            return q

        return d.addCallback(notify)

    def _read(self, f):
        return self._db.read(f)

    def _entries(self, db, where, args, limit=None):
        sql = "SELECT id, envelope, size, arrival, attempts, next_attempt, held, content FROM entries " + where
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        out = []
        for qid, env, size, arrival, attempts, nxt, held, content in db.execute(sql, args).fetchall():
            pending = tuple(
                r[0]
                for r in db.execute(
                    "SELECT address FROM recipients WHERE entry=? AND state IN ('pending', 'deferred')", (qid,)
                )
            )
            done = tuple(r[0] for r in db.execute("SELECT destination FROM done WHERE entry=?", (qid,)))
            warned = tuple(r[0] for r in db.execute("SELECT address FROM recipients WHERE entry=? AND warned=1", (qid,)))
            out.append(QueueEntry(qid, envelopeFromJson(env), "" if content is not None else self.path(qid), size,
                                  arrival, attempts, pending, content, done, warned))
        return out

    def due(self, now, limit=100):
        return self._read(
            lambda db: self._entries(db, "WHERE held=0 AND next_attempt<=? ORDER BY next_attempt", (now,), limit)
        )

    def listEntries(self):
        return self._read(lambda db: self._entries(db, "ORDER BY arrival", ()))

    def details(self, queueId):
        """Fires with C{(entry, [(address, state, last_error)], held, nextAttempt)} or C{None}."""

        def run(db):
            entries = self._entries(db, "WHERE id=?", (queueId,))
            if not entries:
                return None
            rcpts = db.execute(
                "SELECT address, state, last_error FROM recipients WHERE entry=? ORDER BY address", (queueId,)
            ).fetchall()
            held, nxt = db.execute("SELECT held, next_attempt FROM entries WHERE id=?", (queueId,)).fetchone()
            return entries[0], rcpts, bool(held), nxt

        return self._read(run)

    def settle(self, queueId, delivered, failed, deferred, retryAt=None, done=(), warned=()):
        state = {}

        def apply(db):
            db.executemany("INSERT OR IGNORE INTO done VALUES (?, ?)", [(queueId, d) for d in done])
            db.executemany("UPDATE recipients SET warned=1 WHERE entry=? AND address=?", [(queueId, a) for a in warned])
            for a in delivered:
                db.execute("UPDATE recipients SET state='delivered', last_error=NULL WHERE entry=? AND address=?", (queueId, a))
            for a, reason in failed:
                db.execute("UPDATE recipients SET state='failed', last_error=? WHERE entry=? AND address=?", (reason, queueId, a))
            for a, reason in deferred:
                db.execute("UPDATE recipients SET state='deferred', last_error=? WHERE entry=? AND address=?", (reason, queueId, a))
            left = db.execute(
                "SELECT COUNT(*) FROM recipients WHERE entry=? AND state IN ('pending', 'deferred')", (queueId,)
            ).fetchone()[0]
            if left == 0:
                db.execute("DELETE FROM entries WHERE id=?", (queueId,))
                state["done"] = True
            else:
                db.execute(
                    "UPDATE entries SET attempts=attempts+1, next_attempt=? WHERE id=?",
                    (retryAt if retryAt is not None else self._reactor.seconds(), queueId),
                )
            return left

        def after(left):
            if state.get("done"):
                try:
                    os.unlink(self.path(queueId))
                except FileNotFoundError:
                    pass

        return self._db.submit(WriteOp(apply, None, after, durable=False))

    def _setHeld(self, queueId, held, now=None):
        def apply(db):
            sql = "UPDATE entries SET held=?" + (", next_attempt=?" if now is not None else "") + " WHERE id=?"
            args = (held, now, queueId) if now is not None else (held, queueId)
            if not db.execute(sql, args).rowcount:
                raise KeyError(queueId)

        return self._db.submit(WriteOp(apply))

    def releaseLeases(self):
        """
        Make every leased entry (L{leaseLocal}) that arrived before now due
        at once: called by the scanning runner as the server starts, when
        no worker process of an earlier run is left to deliver them (a
        crash would otherwise hold that mail back for the whole lease).
        Fires with how many there were.
        """
        now = self._reactor.seconds()

        def apply(db):
            # Leased: never attempted and due after its arrival (others are due on arrival).
            return db.execute(
                "UPDATE entries SET next_attempt=arrival WHERE attempts=0 AND held=0 AND next_attempt > arrival"
                " AND arrival < ?", (now,)).rowcount

        return self._db.submit(WriteOp(apply, durable=False))

    def hold(self, queueId):
        return self._setHeld(queueId, 1)

    def release(self, queueId):
        return self._setHeld(queueId, 0, self._reactor.seconds())

    def retryNow(self, queueId=None):
        """Make one entry (or every entry) due now."""

        def apply(db):
            if queueId is None:
                return db.execute("UPDATE entries SET next_attempt=? WHERE held=0", (0,)).rowcount
            n = db.execute("UPDATE entries SET next_attempt=? WHERE id=?", (0, queueId)).rowcount
            if not n:
                raise KeyError(queueId)
            return n

        return self._db.submit(WriteOp(apply))

    def delete(self, queueId):
        def apply(db):
            if not db.execute("DELETE FROM entries WHERE id=?", (queueId,)).rowcount:
                raise KeyError(queueId)

        def after(_):
            try:
                os.unlink(self.path(queueId))
            except FileNotFoundError:
                pass

        return self._db.submit(WriteOp(apply, None, after))


@implementer(IPlugin, IQueueFactory)
class SQLiteQueueFactory:
    name = "sqlite"
    description = "SQLite index (WAL) and one file per queued message, under the data directory (the embedded default)."

    def build(self, args, context):
        from mailplat.plugins import dataPathArgument

        return SQLiteQueue(dataPathArgument(args, context, "queue"), context.reactor)
