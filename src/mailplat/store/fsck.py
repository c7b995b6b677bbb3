"""
C{mailplat fsck}: check that the SQLite store's and queue's indexes agree
with their files, and repair what can be repaired without losing mail.

Checks, in order, for the store (L{checkStore}) and the queue
(L{checkQueue}):

  - C{PRAGMA integrity_check} and C{PRAGMA foreign_key_check} of the
    database.  A damaged database is reported and nothing else is repaired
    (repairs built on a damaged index could make things worse): restore it
    from a backup or rebuild it with C{sqlite3 index.sqlite .recover}.
  - Index rows whose file, or whose content in the index (messages up to
    the store's inline size), is missing ("missing-file"): the row is removed,
    recorded as expunged with a new MODSEQ (so CONDSTORE/QRESYNC clients
    learn of it), and reported with its account, mailbox and UID.  A queue
    entry whose file is missing ("queue-missing-file") is removed and
    reported with its sender and recipients, so they can be told.
  - Files that no row names ("orphan-file", "queue-orphan-file"): never
    deleted, moved to C{lost+found/} under the store (or queue) directory.
  - Content in the index that no row names ("orphan-blob"): never
    deleted without a copy; written to C{lost+found/} as a file, then
    removed from the index.
  - Files (or content in the index) whose size differs from the size in
    the index ("size-mismatch"): reported only; it is the only copy.
  - A mailbox whose kept message count, unseen count or total size (what
    STATUS and LIST show) differs from its messages ("mailbox-counts"):
    recounted.

With C{repair=False} everything is reported and nothing changed.

It can run beside a live server (SQLite in WAL mode): every repair is made
in an immediate transaction after checking again that the problem is still
there, and files younger than C{grace} seconds are not taken for orphans
(a delivery writes its file before the row that names it).

This module reads the SQLite files directly, by the schema of
L{mailplat.store.sqlite} and L{mailplat.queue.sqlite}.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field

from mailplat.store.writer import tableColumns

LOST_AND_FOUND = "lost+found"


class FsckError(Exception):
    """fsck could not run at all (no store there, unreadable database)."""


@dataclass(frozen=True)
class Finding:
    #: One of integrity, foreign-key, missing-file, orphan-file, orphan-blob,
    #: size-mismatch, queue-missing-file, queue-orphan-file.
    kind: str
    #: What is wrong, for a person.
    detail: str
    #: What was done about it ("kept (check only)" when nothing).
    action: str

    def __str__(self):
        return f"{self.kind}: {self.detail} -> {self.action}"


@dataclass
class FsckReport:
    """What one fsck run found and did."""

    directory: str
    findings: list = field(default_factory=list)
    #: Counts of what was examined: rows, files.
    checked: dict = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.findings

    def add(self, kind, detail, action):
        self.findings.append(Finding(kind, detail, action))

    def lines(self):
        examined = ", ".join(f"{n} {what}" for what, n in self.checked.items())
        out = [f"{self.directory}: " + (examined or "database not sound; files not examined")]
        out += [f"  {f}" for f in self.findings]
        out.append(f"{self.directory}: " + ("clean" if self.clean else f"{len(self.findings)} problem(s)"))
        return out


def _connect(path):
    if not os.path.isfile(path):
        raise FsckError(f"no database at {path}")
    try:
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=60, isolation_level=None)
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=60000")
    except sqlite3.Error as e:
        raise FsckError(f"cannot open {path}: {e}") from e
    return db


def _checkDatabase(db, report, label) -> bool:
    """Integrity and foreign keys of C{db}; C{True} when sound."""
    try:
        problems = [r[0] for r in db.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as e:
        problems = [str(e)]
    if problems != ["ok"]:
        for p in problems[:20]:
            report.add("integrity", f"{label}: {p}", "not repaired: restore a backup or use sqlite3 .recover")
        if len(problems) > 20:
            report.add("integrity", f"{label}: {len(problems) - 20} more", "not repaired")
        return False
    for table, rowid, parent, _ in db.execute("PRAGMA foreign_key_check"):
        report.add("foreign-key", f"{label}: {table} row {rowid} refers to a missing {parent} row", "reported")
    return True


def _walkFiles(top):
    """Paths (relative to C{top}) of every regular file under C{top}."""
    found = []
    if not os.path.isdir(top):
        return found
    for root, dirs, files in os.walk(top):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            if os.path.isfile(full) and not os.path.islink(full):
                found.append(os.path.relpath(full, top))
    return found


def _exists(path):
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _hasBlobs(db):
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='blobs'").fetchone() is not None


def _contentSize(db, messagesDir, rel):
    """The size of what a message row names (a file, or C{':<id>'} in the index); None if missing."""
    if rel.startswith(":"):
        try:
            blob = int(rel[1:])
        except ValueError:
            return None
        if not _hasBlobs(db):
            return None
        row = db.execute("SELECT length(data) FROM blobs WHERE id=?", (blob,)).fetchone()
        return None if row is None else row[0]
    return _exists(os.path.join(messagesDir, rel))


def _young(path, now, grace):
    try:
        return now - os.stat(path).st_mtime < grace
    except FileNotFoundError:
        return True


def _lostAndFoundPath(directory, base):
    """A path in C{directory}/lost+found (created) named C{base}, or C{base.N} when taken."""
    lost = os.path.join(directory, LOST_AND_FOUND)
    os.makedirs(lost, exist_ok=True)
    target = os.path.join(lost, base)
    n = 1
    while os.path.exists(target):
        target = os.path.join(lost, f"{base}.{n}")
        n += 1
    return target


def _moveToLostAndFound(directory, source, rel):
    """Move C{source} into C{directory}/lost+found, keeping its name unique; the new path."""
    target = _lostAndFoundPath(directory, rel.replace(os.sep, "_"))
    lost = os.path.dirname(target)
    os.rename(source, target)
    _syncDir(lost)
    _syncDir(os.path.dirname(source))
    return target


def _syncDir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkStore(directory: str, repair: bool = True, grace: float = 0.0, now: float | None = None) -> FsckReport:
    """Check (and with C{repair}, repair) the SQLite store under C{directory}."""
    now = time.time() if now is None else now
    report = FsckReport(directory)
    db = _connect(os.path.join(directory, "index.sqlite"))
    messagesDir = os.path.join(directory, "messages")
    try:
        if not _checkDatabase(db, report, "index.sqlite"):
            return report
        rows = db.execute(
            "SELECT m.mailbox, m.uid, m.file, m.size, b.user, b.name FROM messages m"
            " LEFT JOIN mailboxes b ON b.id = m.mailbox ORDER BY m.mailbox, m.uid"
        ).fetchall()
        named = {r[2] for r in rows}
        files = _walkFiles(messagesDir)
        blobs = [r[0] for r in db.execute("SELECT id FROM blobs ORDER BY id")] if _hasBlobs(db) else []
        report.checked = {"messages": len(rows), "files": len(files), "in the index": len(blobs)}

        missing = []
        for mid, uid, rel, size, user, name in rows:
            actual = _contentSize(db, messagesDir, rel)
            where = f"{user}/{name} UID {uid} ({rel})"
            what = "its content in the index" if rel.startswith(":") else "file"
            if actual is None:
                missing.append((mid, uid, rel, where))
            elif actual != size:
                report.add("size-mismatch", f"{where}: {what} has {actual} octets, the index says {size}",
                           "reported (it is the only copy)")
        for mid, uid, rel, where in missing:
            _repairMissing(db, report, messagesDir, repair, mid, uid, rel, where)

        _orphanFiles(db, report, directory, messagesDir, files, named, repair, now, grace,
                     "SELECT 1 FROM messages WHERE file=? LIMIT 1", "orphan-file", "message")

        for blob in blobs:
            if f":{blob}" not in named:
                _orphanBlob(db, report, directory, repair, blob)
        _checkCounts(db, report, repair)
    finally:
        db.close()
    return report


def _checkCounts(db, report, repair):
    """The counts each mailbox row keeps for STATUS and LIST, against its messages (one snapshot)."""
    if "nmessages" not in tableColumns(db, "mailboxes"):
        return  # an index from before the counts: the store counts when it opens it
    db.execute("BEGIN IMMEDIATE" if repair else "BEGIN")
    try:
        rows = db.execute(
            "SELECT b.id, b.user, b.name, b.nmessages, b.nunseen, b.nsize, COUNT(m.uid),"
            " COALESCE(SUM(m.flags NOT LIKE '%\\Seen%'), 0), COALESCE(SUM(m.size), 0)"
            " FROM mailboxes b LEFT JOIN messages m ON m.mailbox = b.id GROUP BY b.id ORDER BY b.id"
        ).fetchall()
        for mid, user, name, n, unseen, size, realN, realUnseen, realSize in rows:
            if (n, unseen, size) == (realN, realUnseen, realSize):
                continue
            report.add(
                "mailbox-counts",
                f"{user}/{name}: the index keeps {n} messages, {unseen} unseen, {size} octets;"
                f" there are {realN}, {realUnseen}, {realSize}",
                "recounted" if repair else "kept (check only)",
            )
            if repair:
                db.execute("UPDATE mailboxes SET nmessages=?, nunseen=?, nsize=? WHERE id=?",
                           (realN, realUnseen, realSize, mid))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _orphanFiles(db, report, directory, messagesDir, files, named, repair, now, grace, namedSQL, kind, what):
    """Files no row names (checked again with C{namedSQL}), old enough: moved to lost+found."""
    for rel in files:
        if rel in named:
            continue
        path = os.path.join(messagesDir, rel)
        if _young(path, now, grace):
            continue
        # Named since the first look (a delivery committed meanwhile)?
        if db.execute(namedSQL, (rel,)).fetchone():
            continue
        if repair:
            target = _moveToLostAndFound(directory, path, rel)
            action = f"moved to {os.path.relpath(target, directory)}"
        else:
            action = "kept (check only)"
        report.add(kind, f"messages/{rel} is named by no {what}", action)


def _orphanBlob(db, report, directory, repair, blob):
    """Content in the index that no row names: saved to lost+found, then removed."""
    rel = f":{blob}"
    detail = f"index content {rel} is named by no message"
    if not repair:
        if not db.execute("SELECT 1 FROM messages WHERE file=? LIMIT 1", (rel,)).fetchone():
            report.add("orphan-blob", detail, "kept (check only)")
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute("SELECT data FROM blobs WHERE id=?", (blob,)).fetchone()
        if row is None or db.execute("SELECT 1 FROM messages WHERE file=? LIMIT 1", (rel,)).fetchone():
            db.execute("ROLLBACK")
            return
        target = _lostAndFoundPath(directory, f"blob-{blob}")
        with open(target, "xb") as f:
            f.write(row[0])
            f.flush()
            os.fsync(f.fileno())
        _syncDir(os.path.dirname(target))
        db.execute("DELETE FROM blobs WHERE id=?", (blob,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    report.add("orphan-blob", detail, f"written to {os.path.relpath(target, directory)} and removed from the index")


def _repairMissing(db, report, messagesDir, repair, mid, uid, rel, where):
    what = "its content in the index is" if rel.startswith(":") else "the message file is"
    detail = f"{where}: {what} missing"
    if not repair:
        # Still so in a fresh read (not expunged meanwhile)?
        if db.execute("SELECT 1 FROM messages WHERE mailbox=? AND uid=? AND file=?", (mid, uid, rel)).fetchone():
            report.add("missing-file", detail, "kept (check only)")
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute("SELECT 1 FROM messages WHERE mailbox=? AND uid=? AND file=?", (mid, uid, rel)).fetchone()
        if row is None or _contentSize(db, messagesDir, rel) is not None:
            db.execute("ROLLBACK")
            return
        box = db.execute("SELECT highestmodseq FROM mailboxes WHERE id=?", (mid,)).fetchone()
        db.execute("DELETE FROM messages WHERE mailbox=? AND uid=?", (mid, uid))
        if box is not None:
            modseq = box[0] + 1
            db.execute("INSERT OR REPLACE INTO expunged VALUES (?, ?, ?)", (mid, uid, modseq))
            db.execute("UPDATE mailboxes SET highestmodseq=? WHERE id=?", (modseq, mid))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    report.add("missing-file", detail, "removed the index row (expunged)")


def _envelopeText(text):
    try:
        env = json.loads(text)
    except (TypeError, ValueError):
        return "unreadable envelope"
    sender = env.get("sender", "") if isinstance(env, dict) else ""
    rcpts = env.get("recipients", []) if isinstance(env, dict) else []
    return f"from <{sender}> to {', '.join(f'<{r}>' for r in rcpts) or '(none)'}"


def checkQueue(directory: str, repair: bool = True, grace: float = 0.0, now: float | None = None) -> FsckReport:
    """Check (and with C{repair}, repair) the SQLite queue under C{directory}."""
    now = time.time() if now is None else now
    report = FsckReport(directory)
    db = _connect(os.path.join(directory, "queue.sqlite"))
    messagesDir = os.path.join(directory, "messages")
    try:
        if not _checkDatabase(db, report, "queue.sqlite"):
            return report
        entries = db.execute("SELECT id, envelope, content IS NULL FROM entries ORDER BY id").fetchall()
        files = _walkFiles(messagesDir)
        report.checked = {"queue entries": len(entries), "files": len(files)}
        ids = {e[0] for e in entries}

        for qid, envelope, external in entries:
            if not external or _exists(os.path.join(messagesDir, qid)) is not None:
                continue
            detail = f"queue entry {qid} {_envelopeText(envelope)}: the message file is missing"
            if not repair:
                if db.execute("SELECT 1 FROM entries WHERE id=?", (qid,)).fetchone():
                    report.add("queue-missing-file", detail, "kept (check only)")
                continue
            db.execute("BEGIN IMMEDIATE")
            try:
                gone = db.execute("SELECT 1 FROM entries WHERE id=?", (qid,)).fetchone() is None
                if not gone and _exists(os.path.join(messagesDir, qid)) is None:
                    db.execute("DELETE FROM entries WHERE id=?", (qid,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            if not gone:
                report.add("queue-missing-file", detail, "removed the entry (tell its sender)")

        _orphanFiles(db, report, directory, messagesDir, files, ids, repair, now, grace,
                     "SELECT 1 FROM entries WHERE id=?", "queue-orphan-file", "queue entry")
    finally:
        db.close()
    return report
