"""
The embedded store: SQLite (WAL) for the index, one file per message.

Layout under the store directory::

    index.sqlite            accounts, mailboxes, messages (flags, MODSEQ,
                            internal date, size, cached structure)
    messages/AB/ABCDEF...   message content, named by a random ID, never by
                            a mailbox name; copies are hard links

Writes go through a L{Writer} thread with group commit (see
L{mailplat.store.writer}); reads run in the reactor's thread pool with one
connection per thread.  Nothing here blocks the reactor.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time

from twisted.internet import defer
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailplat.interfaces.storage import (
    DEFAULT_MAILBOXES,
    AccountExists,
    FlagChange,
    IMessageStore,
    IStoreFactory,
    InvalidMailboxName,
    MailboxEvent,
    MailboxExists,
    MailboxInfo,
    MailboxNotEmpty,
    MessageMeta,
    NoSuchAccount,
    NoSuchMailbox,
    validateMailboxName,
)
from mailplat.store.events import Listeners
from mailplat.store.writer import Database, WriteOp, linkOrCopy, writeFile
from mailplat.plugins import dataPathArgument
from mailplat.testing import applyFlags, normaliseFlags

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS accounts (user TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS mailboxes (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL REFERENCES accounts(user) ON DELETE CASCADE,
    name TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL DEFAULT 1,
    highestmodseq INTEGER NOT NULL DEFAULT 1,
    specialuse TEXT,
    UNIQUE (user, name)
);
CREATE TABLE IF NOT EXISTS subscriptions (
    user TEXT NOT NULL REFERENCES accounts(user) ON DELETE CASCADE,
    name TEXT NOT NULL,
    PRIMARY KEY (user, name)
);
CREATE TABLE IF NOT EXISTS messages (
    mailbox INTEGER NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    uid INTEGER NOT NULL,
    file TEXT NOT NULL,
    size INTEGER NOT NULL,
    internaldate REAL NOT NULL,
    modseq INTEGER NOT NULL,
    flags TEXT NOT NULL DEFAULT '',
    recent INTEGER NOT NULL DEFAULT 1,
    deliveryid TEXT,
    structure TEXT,
    PRIMARY KEY (mailbox, uid)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS messages_delivery ON messages (mailbox, deliveryid)
    WHERE deliveryid IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_modseq ON messages (mailbox, modseq);
"""


def _flagsText(flags) -> str:
    return " ".join(sorted(flags))


def _flagsSet(text: str) -> frozenset:
    return frozenset(text.split()) if text else frozenset()


def _analyze(content: bytes):
    from mailplat.mime.structure import analyze

    return analyze(content)


@implementer(IMessageStore)
class SQLiteStore:
    """An L{IMessageStore} in C{directory} (created if missing)."""

    def __init__(self, directory: str, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.directory = os.path.abspath(directory)
        self._dbPath = os.path.join(self.directory, "index.sqlite")
        self._messagesDir = os.path.join(self.directory, "messages")
        self._db = Database(self._dbPath, SCHEMA, reactor, "mailplat-store-writer")
        self._listeners = Listeners()
        self._uidvalidityLock = threading.Lock()
        self._lastUidvalidity = 0

    # --- plumbing ---------------------------------------------------------

    def open(self):
        os.makedirs(self._messagesDir, exist_ok=True)
        self._db.start()
        return defer.succeed(None)

    def close(self):
        return self._db.stop()

    def _readDb(self) -> sqlite3.Connection:
        return self._db.connection()

    def _read(self, f, *a):
        return self._db.read(f, *a)

    def _write(self, apply, prepare=None, after=None, onFailure=None, events=None):
        op = WriteOp(apply, prepare, after, onFailure)
        d = self._db.submit(op)
        if events is not None:
            d.addCallback(self._emitEvents, events)
        return d

    def _emitEvents(self, result, events):
        for event in events(result):
            self._listeners.emit(event)
        return result

    def _newUidvalidity(self) -> int:
        with self._uidvalidityLock:
            v = int(time.time()) & 0x7FFFFFFF
            if v <= self._lastUidvalidity:
                v = self._lastUidvalidity + 1
            self._lastUidvalidity = v
            return v

    def _newFilePath(self) -> str:
        name = secrets.token_hex(16)
        shard = os.path.join(self._messagesDir, name[:2])
        os.makedirs(shard, exist_ok=True)
        return os.path.join(shard, name)

    @staticmethod
    def _mailboxRow(db, user, name):
        try:
            name = validateMailboxName(name)
        except InvalidMailboxName:
            raise NoSuchMailbox(f"no such mailbox: {name}")
        row = db.execute(
            "SELECT id, name, uidvalidity, uidnext, highestmodseq, specialuse FROM mailboxes WHERE user=? AND name=?",
            (user, name),
        ).fetchone()
        if row is None:
            if not db.execute("SELECT 1 FROM accounts WHERE user=?", (user,)).fetchone():
                raise NoSuchAccount(f"no such account: {user}")
            raise NoSuchMailbox(f"no such mailbox: {name}")
        return row

    @staticmethod
    def _info(db, user, row, subscribed=None) -> MailboxInfo:
        mid, name, uidvalidity, uidnext, highest, special = row
        count, unseen, recent, size = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(flags NOT LIKE '%\\Seen%'), 0), COALESCE(SUM(recent), 0),"
            " COALESCE(SUM(size), 0) FROM messages WHERE mailbox=?",
            (mid,),
        ).fetchone()
        if subscribed is None:
            subscribed = (
                db.execute("SELECT 1 FROM subscriptions WHERE user=? AND name=?", (user, name)).fetchone() is not None
            )
        return MailboxInfo(name, uidvalidity, uidnext, highest, count, unseen, recent, special, subscribed, size)

    # --- accounts -----------------------------------------------------------

    def createAccount(self, user):
        boxes = [("INBOX", None)] + list(DEFAULT_MAILBOXES)
        validities = [self._newUidvalidity() for _ in boxes]

        def apply(db):
            if db.execute("SELECT 1 FROM accounts WHERE user=?", (user,)).fetchone():
                raise AccountExists(f"account exists: {user}")
            db.execute("INSERT INTO accounts VALUES (?)", (user,))
            for (name, use), v in zip(boxes, validities):
                db.execute(
                    "INSERT INTO mailboxes (user, name, uidvalidity, specialuse) VALUES (?, ?, ?, ?)", (user, name, v, use)
                )
                db.execute("INSERT INTO subscriptions VALUES (?, ?)", (user, name))

        return self._write(apply)

    def deleteAccount(self, user):
        def apply(db):
            if not db.execute("SELECT 1 FROM accounts WHERE user=?", (user,)).fetchone():
                raise NoSuchAccount(f"no such account: {user}")
            files = [
                r[0]
                for r in db.execute(
                    "SELECT file FROM messages WHERE mailbox IN (SELECT id FROM mailboxes WHERE user=?)", (user,)
                )
            ]
            db.execute("DELETE FROM accounts WHERE user=?", (user,))
            return files

        return self._write(apply, after=self._unlinkAll).addCallback(lambda _: None)

    def listAccounts(self):
        return self._read(lambda db: [r[0] for r in db.execute("SELECT user FROM accounts ORDER BY user")])

    def hasAccount(self, user):
        return self._read(lambda db: db.execute("SELECT 1 FROM accounts WHERE user=?", (user,)).fetchone() is not None)

    # --- mailboxes ----------------------------------------------------------

    def listMailboxes(self, user):
        def run(db):
            if not db.execute("SELECT 1 FROM accounts WHERE user=?", (user,)).fetchone():
                raise NoSuchAccount(f"no such account: {user}")
            subs = {r[0] for r in db.execute("SELECT name FROM subscriptions WHERE user=?", (user,))}
            rows = db.execute(
                "SELECT id, name, uidvalidity, uidnext, highestmodseq, specialuse FROM mailboxes WHERE user=? ORDER BY name",
                (user,),
            ).fetchall()
            return [self._info(db, user, r, r[1] in subs) for r in rows]

        return self._read(run)

    def getMailbox(self, user, name):
        return self._read(lambda db: self._info(db, user, self._mailboxRow(db, user, name)))

    def createMailbox(self, user, name, specialUse=None):
        try:
            canon = validateMailboxName(name)
        except InvalidMailboxName as e:
            return defer.fail(e)
        validity = self._newUidvalidity()

        def apply(db):
            if not db.execute("SELECT 1 FROM accounts WHERE user=?", (user,)).fetchone():
                raise NoSuchAccount(f"no such account: {user}")
            if db.execute("SELECT 1 FROM mailboxes WHERE user=? AND name=?", (user, canon)).fetchone():
                raise MailboxExists(f"mailbox exists: {canon}")
            db.execute(
                "INSERT INTO mailboxes (user, name, uidvalidity, specialuse) VALUES (?, ?, ?, ?)",
                (user, canon, validity, specialUse),
            )
            return MailboxInfo(canon, validity, 1, 1, specialUse=specialUse)

        return self._write(apply, events=lambda info: [MailboxEvent(user, canon, "create")])

    def deleteMailbox(self, user, name):
        def apply(db):
            mid, canon = self._mailboxRow(db, user, name)[:2]
            if canon == "INBOX":
                raise InvalidMailboxName("INBOX cannot be deleted")
            like = canon.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%"
            if db.execute("SELECT 1 FROM mailboxes WHERE user=? AND name LIKE ? ESCAPE '\\'", (user, like)).fetchone():
                raise MailboxNotEmpty(f"mailbox {canon} has children")
            files = [r[0] for r in db.execute("SELECT file FROM messages WHERE mailbox=?", (mid,))]
            db.execute("DELETE FROM mailboxes WHERE id=?", (mid,))
            return canon, files

        return self._write(
            apply,
            after=lambda r: self._unlinkAll(r[1]),
            events=lambda r: [MailboxEvent(user, r[0], "delete")],
        ).addCallback(lambda _: None)

    def renameMailbox(self, user, oldName, newName):
        try:
            new = validateMailboxName(newName)
        except InvalidMailboxName as e:
            return defer.fail(e)
        validity = self._newUidvalidity()

        def apply(db):
            mid, old, _, _, _, special = self._mailboxRow(db, user, oldName)
            if db.execute("SELECT 1 FROM mailboxes WHERE user=? AND name=?", (user, new)).fetchone():
                raise MailboxExists(f"mailbox exists: {new}")
            if old == "INBOX":
                cur = db.execute(
                    "INSERT INTO mailboxes (user, name, uidvalidity) VALUES (?, ?, ?)", (user, new, validity)
                )
                newId = cur.lastrowid
                rows = db.execute(
                    "SELECT uid FROM messages WHERE mailbox=? ORDER BY uid", (mid,)
                ).fetchall()
                for i, (uid,) in enumerate(rows, start=1):
                    db.execute(
                        "UPDATE messages SET mailbox=?, uid=?, modseq=? WHERE mailbox=? AND uid=?",
                        (newId, i, i + 1, mid, uid),
                    )
                db.execute(
                    "UPDATE mailboxes SET uidnext=?, highestmodseq=? WHERE id=?", (len(rows) + 1, len(rows) + 1, newId)
                )
                db.execute("UPDATE mailboxes SET highestmodseq=highestmodseq+1 WHERE id=?", (mid,))
            else:
                rows = db.execute("SELECT id, name FROM mailboxes WHERE user=?", (user,)).fetchall()
                for rid, rname in rows:
                    if rname == old or rname.startswith(old + "/"):
                        db.execute("UPDATE mailboxes SET name=? WHERE id=?", (new + rname[len(old):], rid))
            return old

        return self._write(apply, events=lambda old: [MailboxEvent(user, old, "rename")]).addCallback(lambda _: None)

    def setSubscribed(self, user, name, subscribed):
        try:
            canon = validateMailboxName(name)
        except InvalidMailboxName as e:
            return defer.fail(e)

        def apply(db):
            if not db.execute("SELECT 1 FROM accounts WHERE user=?", (user,)).fetchone():
                raise NoSuchAccount(f"no such account: {user}")
            if subscribed:
                db.execute("INSERT OR IGNORE INTO subscriptions VALUES (?, ?)", (user, canon))
            else:
                db.execute("DELETE FROM subscriptions WHERE user=? AND name=?", (user, canon))

        return self._write(apply)

    def listSubscriptions(self, user):
        def run(db):
            if not db.execute("SELECT 1 FROM accounts WHERE user=?", (user,)).fetchone():
                raise NoSuchAccount(f"no such account: {user}")
            return [r[0] for r in db.execute("SELECT name FROM subscriptions WHERE user=? ORDER BY name", (user,))]

        return self._read(run)

    # --- messages -------------------------------------------------------------

    def append(self, user, mailbox, source, flags=(), internalDate=None, deliveryId=None):
        flagsText = _flagsText(normaliseFlags(flags))
        date = float(internalDate if internalDate is not None else self._reactor.seconds())
        state = {}

        def prepare():
            path = self._newFilePath()
            if isinstance(source, (bytes, bytearray, memoryview)):
                content = bytes(source)
                writeFile(path, content)
                synced = [path]
            else:
                linkOrCopy(source, path)
                with open(path, "rb") as f:
                    content = f.read()
                # A hard link to an already-durable file needs only its
                # directory entry synced; a copy needs its data synced too.
                synced = [path] if os.stat(path).st_nlink == 1 else []
            state["path"] = path
            state["size"] = len(content)
            state["structure"] = json.dumps(_analyze(content), separators=(",", ":"))
            return synced, [os.path.dirname(path)]

        def apply(db):
            mid, canon, uidvalidity, uidnext, highest, _ = self._mailboxRow(db, user, mailbox)
            state["canon"] = canon
            if deliveryId is not None:
                row = db.execute(
                    "SELECT uid FROM messages WHERE mailbox=? AND deliveryid=?", (mid, deliveryId)
                ).fetchone()
                if row is not None:
                    state["duplicate"] = True
                    return (uidvalidity, row[0])
            modseq = highest + 1
            db.execute(
                "INSERT INTO messages (mailbox, uid, file, size, internaldate, modseq, flags, deliveryid, structure)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (mid, uidnext, os.path.relpath(state["path"], self._messagesDir), state["size"], date, modseq,
                 flagsText, deliveryId, state["structure"]),
            )
            db.execute("UPDATE mailboxes SET uidnext=?, highestmodseq=? WHERE id=?", (uidnext + 1, modseq, mid))
            return (uidvalidity, uidnext)

        def after(result):
            if state.get("duplicate"):
                self._unlinkAll([state["path"]], relative=False)

        def onFailure():
            if "path" in state:
                self._unlinkAll([state["path"]], relative=False)

        def events(result):
            if state.get("duplicate"):
                return []
            return [MailboxEvent(user, state["canon"], "append", (result[1],))]

        return self._write(apply, prepare, after, onFailure, events)

    def fetchMeta(self, user, mailbox, uids=None, withStructure=False, changedSince=None):
        wanted = None if uids is None else sorted(set(uids))

        def run(db):
            mid = self._mailboxRow(db, user, mailbox)[0]
            cols = "uid, flags, internaldate, size, modseq" + (", structure" if withStructure else "")
            sql = f"SELECT {cols} FROM messages WHERE mailbox=?"
            args = [mid]
            if changedSince is not None:
                sql += " AND modseq > ?"
                args.append(changedSince)
            if wanted is not None and len(wanted) <= 500:
                sql += f" AND uid IN ({','.join('?' * len(wanted))})"
                args.extend(wanted)
            rows = db.execute(sql + " ORDER BY uid", args).fetchall()
            if wanted is not None and len(wanted) > 500:
                keep = set(wanted)
                rows = [r for r in rows if r[0] in keep]
            return [
                MessageMeta(
                    r[0], _flagsSet(r[1]), r[2], r[3], r[4], json.loads(r[5]) if withStructure and r[5] else None
                )
                for r in rows
            ]

        return self._read(run)

    def messagePath(self, user, mailbox, uid):
        """Fires with the path of a message's file (for streaming and linking)."""

        def run(db):
            mid = self._mailboxRow(db, user, mailbox)[0]
            row = db.execute("SELECT file FROM messages WHERE mailbox=? AND uid=?", (mid, uid)).fetchone()
            if row is None:
                raise KeyError(uid)
            return os.path.join(self._messagesDir, row[0])

        return self._read(run)

    def getContent(self, user, mailbox, uid):
        def run(db):
            mid = self._mailboxRow(db, user, mailbox)[0]
            row = db.execute("SELECT file FROM messages WHERE mailbox=? AND uid=?", (mid, uid)).fetchone()
            if row is None:
                raise KeyError(uid)
            with open(os.path.join(self._messagesDir, row[0]), "rb") as f:
                return f.read()

        return self._read(run)

    def storeFlags(self, user, mailbox, uids, mode, flags, unchangedSince=None):
        if mode not in ("set", "add", "remove"):
            return defer.fail(ValueError(f"unknown flag mode {mode!r}"))
        wanted = sorted(set(uids))
        state = {}

        def apply(db):
            mid, canon, _, _, highest, _ = self._mailboxRow(db, user, mailbox)
            state["canon"] = canon
            changes, failed, changed = [], [], []
            rows = self._rowsFor(db, mid, wanted, "uid, flags, modseq")
            for uid, text, modseq in rows:
                if unchangedSince is not None and modseq > unchangedSince:
                    failed.append(uid)
                    continue
                current = _flagsSet(text)
                new = applyFlags(current, mode, flags)
                if new != current:
                    highest += 1
                    modseq = highest
                    db.execute(
                        "UPDATE messages SET flags=?, modseq=? WHERE mailbox=? AND uid=?",
                        (_flagsText(new), modseq, mid, uid),
                    )
                    changed.append(uid)
                    current = new
                changes.append(FlagChange(uid, current, modseq))
            if changed:
                db.execute("UPDATE mailboxes SET highestmodseq=? WHERE id=?", (highest, mid))
            state["changed"] = changed
            return changes, failed

        return self._write(
            apply,
            events=lambda r: [MailboxEvent(user, state["canon"], "flags", tuple(state["changed"]))]
            if state["changed"]
            else [],
        )

    @staticmethod
    def _rowsFor(db, mid, wanted, cols):
        if len(wanted) <= 500:
            return db.execute(
                f"SELECT {cols} FROM messages WHERE mailbox=? AND uid IN ({','.join('?' * len(wanted))}) ORDER BY uid",
                [mid, *wanted],
            ).fetchall()
        keep = set(wanted)
        return [r for r in db.execute(f"SELECT {cols} FROM messages WHERE mailbox=? ORDER BY uid", (mid,)) if r[0] in keep]

    def expunge(self, user, mailbox, uids=None):
        wanted = None if uids is None else sorted(set(uids))
        state = {}

        def apply(db):
            mid, canon, _, _, highest, _ = self._mailboxRow(db, user, mailbox)
            state["canon"] = canon
            rows = db.execute(
                "SELECT uid, file FROM messages WHERE mailbox=? AND ' ' || flags || ' ' LIKE '% \\Deleted %' ORDER BY uid",
                (mid,),
            ).fetchall()
            if wanted is not None:
                keep = set(wanted)
                rows = [r for r in rows if r[0] in keep]
            for uid, _ in rows:
                db.execute("DELETE FROM messages WHERE mailbox=? AND uid=?", (mid, uid))
            if rows:
                db.execute("UPDATE mailboxes SET highestmodseq=? WHERE id=?", (highest + 1, mid))
            state["files"] = [r[1] for r in rows]
            return [r[0] for r in rows]

        return self._write(
            apply,
            after=lambda r: self._unlinkAll(state["files"]),
            events=lambda gone: [MailboxEvent(user, state["canon"], "expunge", tuple(gone))] if gone else [],
        )

    def copy(self, user, mailbox, uids, destination, move=False):
        wanted = sorted(set(uids))
        state = {"links": []}

        def prepare():
            # Link every source file to a new name now; rows decide later which
            # links are kept.  Reads happen on this (writer) thread's own view.
            db = self._readDb()
            mid = self._mailboxRow(db, user, mailbox)[0]
            rows = self._rowsFor(db, mid, wanted, "uid, file")
            for uid, rel in rows:
                target = self._newFilePath()
                linkOrCopy(os.path.join(self._messagesDir, rel), target)
                state["links"].append((uid, target))
            return [], sorted({os.path.dirname(t) for _, t in state["links"]})

        def apply(db):
            src = self._mailboxRow(db, user, mailbox)
            dst = self._mailboxRow(db, user, destination)
            state["src"], state["dst"] = src[1], dst[1]
            linked = dict(state["links"])
            rows = self._rowsFor(db, src[0], wanted, "uid, file, size, internaldate, flags, structure")
            uidnext, highest = dst[3], dst[4]
            mapping, removed = [], []
            for uid, rel, size, date, flags, structure in rows:
                target = linked.pop(uid, None)
                if target is None:
                    continue
                highest += 1
                db.execute(
                    "INSERT INTO messages (mailbox, uid, file, size, internaldate, modseq, flags, structure)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (dst[0], uidnext, os.path.relpath(target, self._messagesDir), size, date, highest, flags, structure),
                )
                mapping.append((uid, uidnext))
                uidnext += 1
                if move:
                    db.execute("DELETE FROM messages WHERE mailbox=? AND uid=?", (src[0], uid))
                    removed.append(rel)
            db.execute("UPDATE mailboxes SET uidnext=?, highestmodseq=? WHERE id=?", (uidnext, highest, dst[0]))
            if move and mapping:
                db.execute("UPDATE mailboxes SET highestmodseq=highestmodseq+1 WHERE id=?", (src[0],))
            state["unused"] = list(linked.values())
            state["removed"] = removed
            return dst[2], mapping

        def after(result):
            self._unlinkAll(state["unused"], relative=False)
            self._unlinkAll(state["removed"])

        def onFailure():
            self._unlinkAll([t for _, t in state["links"]], relative=False)

        def events(result):
            mapping = result[1]
            if not mapping:
                return []
            out = [MailboxEvent(user, state["dst"], "append", tuple(n for _, n in mapping))]
            if move:
                out.append(MailboxEvent(user, state["src"], "expunge", tuple(u for u, _ in mapping)))
            return out

        return self._write(apply, prepare, after, onFailure, events)

    def claimRecent(self, user, mailbox):
        def apply(db):
            mid = self._mailboxRow(db, user, mailbox)[0]
            uids = [r[0] for r in db.execute("SELECT uid FROM messages WHERE mailbox=? AND recent=1 ORDER BY uid", (mid,))]
            if uids:
                db.execute("UPDATE messages SET recent=0 WHERE mailbox=? AND recent=1", (mid,))
            return uids

        return self._write(apply)

    def addListener(self, user, listener):
        return self._listeners.add(user, listener)

    # --- helpers --------------------------------------------------------------

    def _unlinkAll(self, files, relative=True):
        for f in files or ():
            path = os.path.join(self._messagesDir, f) if relative else f
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


@implementer(IPlugin, IStoreFactory)
class SQLiteStoreFactory:
    name = "sqlite"
    description = "SQLite index (WAL) and one file per message, under the data directory (the embedded default)."

    def build(self, args, context):
        return SQLiteStore(dataPathArgument(args, context, "store"), context.reactor)
