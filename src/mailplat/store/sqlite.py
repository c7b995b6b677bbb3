"""
The embedded store: SQLite (WAL) for the index and for small messages, a
file for each larger one.

Layout under the store directory::

    index.sqlite            accounts, mailboxes, messages (flags, MODSEQ,
                            internal date, size, cached structure), the
                            search index, and the content of messages up
                            to C{inlineMax} octets (table C{blobs})
    messages/AB/ABCDEF...   the content of each larger message, named by a
                            random ID, never by a mailbox name; copies are
                            hard links

Writes go through the write pipeline with group commit (see
L{mailplat.store.writer}); reads run in the reactor's thread pool with one
connection per thread.  Nothing here blocks the reactor.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import sqlite3
import threading
import time
from typing import Optional

from twisted.internet import defer
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailplat.interfaces.storage import (
    DEFAULT_MAILBOXES,
    AccountExists,
    IBatchReadStore,
    SelectData,
    FlagChange,
    IContentStore,
    IEnvelopeStore,
    IMessageStore,
    IMultiAppendStore,
    IQuotaStore,
    ISearchIndex,
    IVanishedStore,
    Quota,
    QuotaExceeded,
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
from mailplat.imap.fetch import formatEnvelope
from mailplat.log import Logger
from mailplat.mime.structure import STRUCTURE_VERSION, analyze, bodyText, headerText, indexFields
from mailplat.store.events import Listeners
from mailplat.store.writer import Database, NotSmall, WriteOp, connect, linkOrCopy, tableColumns, writeFile
from mailplat.plugins import dataPathArgument
from mailplat.testing import applyFlags, normaliseFlags

_log = Logger()

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
    -- Kept by the messages_count_* triggers (added by _migrate): STATUS
    -- and LIST read them instead of counting a mailbox's messages.
    nmessages INTEGER NOT NULL DEFAULT 0,
    nunseen INTEGER NOT NULL DEFAULT 0,
    nsize INTEGER NOT NULL DEFAULT 0,
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
    envelope BLOB,
    PRIMARY KEY (mailbox, uid)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS messages_delivery ON messages (mailbox, deliveryid)
    WHERE deliveryid IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_modseq ON messages (mailbox, modseq);
-- Covers metadata reads (FETCH FLAGS/UID/RFC822.SIZE, SELECT) without
-- touching the wide rows that hold the cached structure.
CREATE INDEX IF NOT EXISTS messages_meta ON messages (mailbox, uid, flags, size, internaldate, modseq);
-- The few messages that are still recent: SELECT finds them (and
-- claimRecent clears them) without reading every row; with the column
-- itself in it, counting and listing them read only the index.
CREATE INDEX IF NOT EXISTS messages_recent ON messages (mailbox, uid, recent) WHERE recent=1;
-- The messages marked \\Deleted: EXPUNGE finds them without reading every row.
CREATE INDEX IF NOT EXISTS messages_deleted ON messages (mailbox, uid)
    WHERE ' ' || flags || ' ' LIKE '% \\Deleted %';
CREATE TABLE IF NOT EXISTS msgindex (
    mailbox INTEGER NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    uid INTEGER NOT NULL,
    subject TEXT, fromaddr TEXT, toaddr TEXT, cc TEXT, bcc TEXT, headers TEXT,
    sentdate REAL, sentday INTEGER,
    sortsubject TEXT, isreply INTEGER, sortfrom TEXT, sortto TEXT, sortcc TEXT,
    displayfrom TEXT, displayto TEXT, messageid TEXT, inreplyto TEXT, refs TEXT,
    PRIMARY KEY (mailbox, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS msgtext (
    id INTEGER PRIMARY KEY,
    mailbox INTEGER NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    uid INTEGER NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (mailbox, uid)
);
CREATE TABLE IF NOT EXISTS expunged (
    mailbox INTEGER NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    uid INTEGER NOT NULL,
    modseq INTEGER NOT NULL,
    PRIMARY KEY (mailbox, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quotas (
    user TEXT PRIMARY KEY REFERENCES accounts(user) ON DELETE CASCADE,
    storage INTEGER,
    messages INTEGER
);
-- The content of messages up to the store's inline size, in the index
-- itself: a message row names it as ':<id>' in place of a file.  Each
-- row has its own (COPY duplicates it), so it goes with its row.
CREATE TABLE IF NOT EXISTS blobs (id INTEGER PRIMARY KEY, data BLOB NOT NULL);
-- The delivery IDs an account was given (append with deliveryId), kept
-- whatever became of the message (moved, expunged) for DELIVERY_ID_DAYS:
-- a queue entry run again after a crash never stores a message twice.
CREATE TABLE IF NOT EXISTS deliveries (
    user TEXT NOT NULL REFERENCES accounts(user) ON DELETE CASCADE,
    id TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (user, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_at ON deliveries (at);
CREATE TRIGGER IF NOT EXISTS messages_index_delete AFTER DELETE ON messages BEGIN
    DELETE FROM msgindex WHERE mailbox=old.mailbox AND uid=old.uid;
    DELETE FROM msgtext WHERE mailbox=old.mailbox AND uid=old.uid;
END;
CREATE TRIGGER IF NOT EXISTS messages_blob_delete AFTER DELETE ON messages
    WHEN substr(old.file, 1, 1) = ':' BEGIN
    DELETE FROM blobs WHERE id=CAST(substr(old.file, 2) AS INTEGER);
END;
CREATE TRIGGER IF NOT EXISTS messages_index_move AFTER UPDATE OF mailbox, uid ON messages BEGIN
    UPDATE msgindex SET mailbox=new.mailbox, uid=new.uid WHERE mailbox=old.mailbox AND uid=old.uid;
    UPDATE msgtext SET mailbox=new.mailbox, uid=new.uid WHERE mailbox=old.mailbox AND uid=old.uid;
END;
"""

#: Full-text (trigram) index over msgtext, kept in step by triggers; made
#: only when the store is configured with C{fulltext = true} and SQLite has
#: FTS5.
FTS_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS msgfts USING fts5(body, content='msgtext', content_rowid='id', tokenize='trigram');
CREATE TRIGGER IF NOT EXISTS msgtext_ai AFTER INSERT ON msgtext BEGIN
    INSERT INTO msgfts(rowid, body) VALUES (new.id, new.body);
END;
CREATE TRIGGER IF NOT EXISTS msgtext_ad AFTER DELETE ON msgtext BEGIN
    INSERT INTO msgfts(msgfts, rowid, body) VALUES ('delete', old.id, old.body);
END;
"""

#: Without the full-text index: drop it (and its triggers) if an earlier
#: configuration made it.
NO_FTS_SCHEMA = """
DROP TRIGGER IF EXISTS msgtext_ai;
DROP TRIGGER IF EXISTS msgtext_ad;
DROP TABLE IF EXISTS msgfts;
"""

_INDEX_COLUMNS = (
    "subject", "fromaddr", "toaddr", "cc", "bcc", "headers", "sentdate", "sentday", "sortsubject", "isreply",
    "sortfrom", "sortto", "sortcc", "displayfrom", "displayto", "messageid", "inreplyto", "refs",
)
_INDEX_KEYS = (
    "subject", "from", "to", "cc", "bcc", "_headers", "sentDate", "sentDay", "sortSubject", "isReply",
    "sortFrom", "sortTo", "sortCc", "displayFrom", "displayTo", "messageId", "inReplyTo", "references",
)
_HEADER_COLUMNS = {"subject": "subject", "from": "fromaddr", "to": "toaddr", "cc": "cc", "bcc": "bcc"}


def _indexRow(content: bytes, structure: dict):
    """(index column values, body text) of one message, for msgindex and msgtext."""
    fields = indexFields(structure)
    fields["_headers"] = headerText(structure)
    fields["references"] = " ".join(fields["references"])
    fields["isReply"] = int(fields["isReply"])
    return tuple(fields[k] for k in _INDEX_KEYS), bodyText(content, structure)


def _uniqueUidvalidity(db, proposed: int) -> int:
    """
    A UIDVALIDITY never given before in this store (RFC 3501 2.3.1.1): the
    time-based C{proposed} value, or one more than the last one given.  In
    the write transaction, so processes sharing the store never give the
    same value twice (a mailbox deleted and created again in the same
    second by two processes would otherwise get its old UIDVALIDITY back).
    """
    row = db.execute("SELECT value FROM meta WHERE key='uidvalidity'").fetchone()
    if row is not None:
        last = int(row[0])
    else:
        last = db.execute("SELECT COALESCE(MAX(uidvalidity), 0) FROM mailboxes").fetchone()[0]
    v = proposed if proposed > last else last + 1
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('uidvalidity', ?)", (str(v),))
    return v


def _insertIndex(db, mid, uid, row, body, fresh=False):
    """The index rows of one message; C{fresh}: its UID was never used in the mailbox (no old text row)."""
    db.execute(
        f"INSERT OR REPLACE INTO msgindex (mailbox, uid, {', '.join(_INDEX_COLUMNS)})"
        f" VALUES (?, ?, {', '.join('?' * len(_INDEX_COLUMNS))})",
        (mid, uid, *row),
    )
    if not fresh:
        db.execute("DELETE FROM msgtext WHERE mailbox=? AND uid=?", (mid, uid))
    db.execute("INSERT INTO msgtext (mailbox, uid, body) VALUES (?, ?, ?)", (mid, uid, body))


def _headerMatch(headers, name, needle):
    """SQL function: a field C{name} exists in C{headers} and contains C{needle}."""
    if headers is None:
        return 0
    prefix = name + ": "
    for line in headers.split("\n"):
        if line.startswith(prefix) and (not needle or needle in line[len(prefix):]):
            return 1
    return 0


def _flagMatch(flags, name):
    """SQL function: C{flags} (space-separated) holds C{name}, case-insensitively."""
    if not flags:
        return 0
    name = name.lower()
    return int(any(f.lower() == name for f in flags.split()))


def _joined(parts, op: str) -> str:
    """
    C{parts} joined by C{op}, grouped in a balanced tree: SQLite refuses an
    expression more than 1,000 deep, and C{a AND b AND c ...} is one level
    per term (a SEARCH of 999 keys would fail).
    """
    if len(parts) <= 8:
        return "(" + op.join(parts) + ")"
    step = -(-len(parts) // 8)
    return "(" + op.join(_joined(parts[i:i + step], op) for i in range(0, len(parts), step)) + ")"


class _QueryCompiler:
    """An L{ISearchIndex} query tree -> an SQL condition over messages m, msgindex i."""

    def __init__(self, fts: bool):
        self.fts = fts
        self.args: list = []
        self.uidTables: list = []

    def compile(self, q) -> str:
        kind = q[0]
        a = self.args
        if kind == "all":
            return "1"
        if kind == "and":
            parts = [self.compile(x) for x in q[1]]
            return _joined(parts or ["1"], " AND ")
        if kind == "or":
            return "(" + self.compile(q[1]) + " OR " + self.compile(q[2]) + ")"
        if kind == "not":
            return "(NOT " + self.compile(q[1]) + ")"
        if kind == "uids":
            uids = sorted(q[1])
            if not uids:
                return "0"
            # Ranges keep the statement small for big contiguous sets.
            ranges = []
            lo = prev = uids[0]
            for u in uids[1:]:
                if u != prev + 1:
                    ranges.append((lo, prev))
                    lo = u
                prev = u
            ranges.append((lo, prev))
            if len(ranges) > 200:
                self.uidTables.append(uids)
                a.append(len(self.uidTables) - 1)
                return "mp_uidin(?, m.uid)"
            conds = []
            for lo, hi in ranges:
                if lo == hi:
                    conds.append("m.uid=?")
                    a.append(lo)
                else:
                    conds.append("m.uid BETWEEN ? AND ?")
                    a.extend((lo, hi))
            return _joined(conds, " OR ")
        if kind == "flag":
            system = {"\\seen": "\\Seen", "\\answered": "\\Answered", "\\flagged": "\\Flagged",
                      "\\deleted": "\\Deleted", "\\draft": "\\Draft"}.get(q[1].lower())
            if system is not None:
                a.append("% " + system + " %")
                cond = "(' ' || m.flags || ' ' LIKE ?)"
            else:
                a.append(q[1])
                cond = "mp_flag(m.flags, ?)"
            return cond if q[2] else "(NOT " + cond + ")"
        if kind == "larger":
            a.append(q[1])
            return "m.size > ?"
        if kind == "smaller":
            a.append(q[1])
            return "m.size < ?"
        if kind == "modseq":
            a.append(q[1])
            return "m.modseq >= ?"
        if kind == "header":
            name, needle = q[1], q[2]
            column = _HEADER_COLUMNS.get(name)
            if column is not None and needle:
                a.append(needle)
                return f"instr(i.{column}, ?) > 0"
            a.extend((name, needle))
            return "mp_header(i.headers, ?, ?)"
        if kind == "body":
            return self._body(q[1])
        if kind == "text":
            a.append(q[1])
            return f"(instr(i.headers, ?) > 0 OR {self._body(q[1])})"
        if kind == "date":
            _, which, date, sent = q
            if sent:
                day = date.toordinal()
                op = {"before": "<", "on": "=", "since": ">="}[which]
                a.append(day)
                return f"(i.sentday IS NOT NULL AND i.sentday {op} ?)"
            import calendar
            import datetime

            start = calendar.timegm(date.timetuple())
            end = start + 86400
            if which == "before":
                a.append(start)
                return "m.internaldate < ?"
            if which == "since":
                a.append(start)
                return "m.internaldate >= ?"
            a.extend((start, end))
            return "(m.internaldate >= ? AND m.internaldate < ?)"
        raise ValueError(f"unknown query {kind!r}")

    def _body(self, needle):
        a = self.args
        if self.fts and len(needle) >= 3:
            a.append('"' + needle.replace('"', '""') + '"')
            a.append(needle)
            return (
                "EXISTS (SELECT 1 FROM msgtext t WHERE t.mailbox=m.mailbox AND t.uid=m.uid AND t.id IN"
                " (SELECT rowid FROM msgfts WHERE msgfts MATCH ?) AND instr(t.body, ?) > 0)"
            )
        a.append(needle)
        return "EXISTS (SELECT 1 FROM msgtext t WHERE t.mailbox=m.mailbox AND t.uid=m.uid AND instr(t.body, ?) > 0)"


def _flagsText(flags) -> str:
    return " ".join(sorted(flags))


_EMPTY = frozenset()
_flagSets: dict = {}


def _flagsSet(text: str) -> frozenset:
    if not text:
        return _EMPTY
    value = _flagSets.get(text)
    if value is None:
        value = frozenset(text.split())
        if len(_flagSets) < 10000:
            _flagSets[text] = value
    return value


_newMeta = MessageMeta.__new__


def _canonicalName(name: str) -> str:
    """A mailbox name as stored; L{NoSuchMailbox} for one that cannot exist."""
    try:
        return validateMailboxName(name)
    except InvalidMailboxName:
        raise NoSuchMailbox(f"no such mailbox: {name}")


#: A message's file (or C{:<blob id>}) and its blob, by account, mailbox and UID.
_CONTENT_SQL = (
    "SELECT m.file, b.data FROM mailboxes x JOIN messages m ON m.mailbox = x.id"
    " LEFT JOIN blobs b ON substr(m.file, 1, 1) = ':' AND b.id = CAST(substr(m.file, 2) AS INTEGER)"
    " WHERE x.user=? AND x.name=? AND m.uid=?"
)


def _meta(uid, flags, date, size, modseq, structure=None, envelope=None) -> MessageMeta:
    """A L{MessageMeta} built without the frozen dataclass's per-field setattr (FETCH of 100,000 messages)."""
    m = _newMeta(MessageMeta)
    m.__dict__.update(
        uid=uid, flags=flags, internalDate=date, size=size, modseq=modseq, structure=structure, envelope=envelope
    )
    return m


#: Each mailbox's message count, unseen count and total size, kept in its
#: row by every insert, delete and move of a message and every change of
#: its \Seen flag, in the same transaction.  (LIKE is what every reader of
#: the flags text uses; flags are stored in canonical case.)
COUNT_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS messages_count_insert AFTER INSERT ON messages BEGIN
    UPDATE mailboxes SET nmessages=nmessages+1, nunseen=nunseen+(new.flags NOT LIKE '%\\Seen%'),
        nsize=nsize+new.size WHERE id=new.mailbox;
END;
CREATE TRIGGER IF NOT EXISTS messages_count_delete AFTER DELETE ON messages BEGIN
    UPDATE mailboxes SET nmessages=nmessages-1, nunseen=nunseen-(old.flags NOT LIKE '%\\Seen%'),
        nsize=nsize-old.size WHERE id=old.mailbox;
END;
CREATE TRIGGER IF NOT EXISTS messages_count_update AFTER UPDATE OF mailbox, flags, size ON messages
    WHEN old.mailbox != new.mailbox OR old.size != new.size
        OR (old.flags NOT LIKE '%\\Seen%') != (new.flags NOT LIKE '%\\Seen%') BEGIN
    UPDATE mailboxes SET nmessages=nmessages-1, nunseen=nunseen-(old.flags NOT LIKE '%\\Seen%'),
        nsize=nsize-old.size WHERE id=old.mailbox;
    UPDATE mailboxes SET nmessages=nmessages+1, nunseen=nunseen+(new.flags NOT LIKE '%\\Seen%'),
        nsize=nsize+new.size WHERE id=new.mailbox;
END;
"""

#: Recount every mailbox (an index from before the counters, or fsck).
RECOUNT = """
UPDATE mailboxes SET
    nmessages=(SELECT COUNT(*) FROM messages INDEXED BY messages_meta WHERE mailbox=mailboxes.id),
    nunseen=(SELECT COALESCE(SUM(flags NOT LIKE '%\\Seen%'), 0) FROM messages INDEXED BY messages_meta
             WHERE mailbox=mailboxes.id),
    nsize=(SELECT COALESCE(SUM(size), 0) FROM messages INDEXED BY messages_meta WHERE mailbox=mailboxes.id)
"""


def _migrate(db) -> None:
    """Bring an index made by an older version up to date (in place, at open)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        columns = tableColumns(db, "messages")
        if "envelope" not in columns:
            # Rows from before have none: fetchMeta formats theirs from the
            # structure when asked.
            db.execute("ALTER TABLE messages ADD COLUMN envelope BLOB")
        if "recent" not in {row[2] for row in db.execute("PRAGMA index_info(messages_recent)")}:
            # Made before it covered its queries.
            db.execute("DROP INDEX messages_recent")
            db.execute("CREATE INDEX messages_recent ON messages (mailbox, uid, recent) WHERE recent=1")
        columns = tableColumns(db, "mailboxes")
        if "nmessages" not in columns:
            for name in ("nmessages", "nunseen", "nsize"):
                db.execute(f"ALTER TABLE mailboxes ADD COLUMN {name} INTEGER NOT NULL DEFAULT 0")
            db.execute(RECOUNT)
        if db.execute("SELECT 1 FROM meta WHERE key='isreply'").fetchone() is None:
            # Index rows made when a [list tag] removed from a subject counted
            # as a reply mark (RFC 5256 §2.1 says it is not): the rows marked
            # as replies are made again from their messages (_backfillIndex).
            db.execute("DELETE FROM msgindex WHERE isreply=1")
            db.execute("INSERT INTO meta (key, value) VALUES ('isreply', '2')")
        # (executescript would commit first: one statement at a time.)
        for trigger in COUNT_TRIGGERS.split("END;")[:-1]:
            db.execute(trigger + "END;")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _envelopeOf(structure) -> Optional[bytes]:
    """The formatted IMAP ENVELOPE of an analysis, or None if it is not a current one."""
    if not isinstance(structure, dict) or structure.get("version") != STRUCTURE_VERSION:
        return None
    return formatEnvelope(structure["envelope"])


def _analyze(content: bytes):
    return analyze(content)


def _hasFTS5() -> bool:
    try:
        db = sqlite3.connect(":memory:")
        try:
            db.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize='trigram')")
        finally:
            db.close()
        return True
    except sqlite3.Error:
        return False


@implementer(
    IMessageStore, ISearchIndex, IQuotaStore, IVanishedStore, IContentStore, IBatchReadStore, IEnvelopeStore,
    IMultiAppendStore,
)
class SQLiteStore:
    """
    An L{IMessageStore} in C{directory} (created if missing).

    Besides the index of flags, sizes and dates, every message gets a row of
    search and sort keys (C{msgindex}: decoded header fields, sent date, RFC
    5256 sort keys, message IDs) and its decoded body text (C{msgtext}) at
    delivery: SEARCH, SORT and THREAD never read message files.  Messages
    stored before the index existed are indexed in the background after
    L{open}.

    C{fulltext} adds an FTS5 trigram index over the body text (where SQLite
    has FTS5), so that SEARCH BODY/TEXT looks up candidates instead of
    scanning C{msgtext}.  Either way the answers are the same: the index
    only narrows the candidates, C{instr} on the stored text decides.
    Switching it on for an existing store builds the index at L{open};
    switching it off drops it.

    It is off by default.  Measured here (2 cores, shared, warm cache;
    this store alone, appends 10 at a time): with the index, appends of
    100 KB messages ran at 51 msg/s instead of 344, and the index took
    317 KB per message instead of 124; of 4 KB messages, 428 msg/s instead
    of 828 and 15 KB instead of 7 (the SMTP benchmark saw ~450 MB per
    10,000 24 KB messages).  Without it, SEARCH BODY scans the decoded text in SQLite's
    C code: 40 ms for 2,000 4 KB messages, 65 ms for 200 100 KB ones, about
    160 ms for a 10,000-message mailbox, where the index answers in 1-5 ms
    and Dovecot without its fts plugin takes about a second.  Every
    delivery pays for the index, only body searches of very big mailboxes
    gain from it: turn it on (C{[store] args = { fulltext = true }}) where
    those are common.

    Message content up to C{inlineMax} octets (128 KB by default) is kept
    in the index database, committed in the same transaction as the row
    that names it: a delivery costs one WAL fsync shared by its batch,
    where a file of its own costs creating, syncing and linking it (an
    fsync of the file and of its directory, each a journal commit of the
    file system, before the WAL's).  Bigger messages get a file each, as
    do all with C{inlineMax=0}.  Measured on this store alone (2 cores,
    shared; 10 concurrent loops of appends, flag changes and expunges of
    4 KB messages for 5 s, same write pipeline): appends took 6.1-6.2 ms
    at the median instead of 10.2-11.6 with a file each, 1,623-1,639
    operations/s instead of 1,148-1,337; over IMAP,
    seeding a mailbox by APPEND from 8 connections went from 100-200 to
    950-1,075 messages/s (bench/run's seeding figures).
    """

    #: Messages up to this many octets are kept in the index database by
    #: default (see L{SQLiteStore}).
    INLINE_MAX = 128 * 1024

    def __init__(self, directory: str, reactor=None, fulltext: bool = False, inlineMax: int | None = None):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.directory = os.path.abspath(directory)
        self._dbPath = os.path.join(self.directory, "index.sqlite")
        self._messagesDir = os.path.join(self.directory, "messages")
        self._fts = bool(fulltext) and _hasFTS5()
        self.inlineMax = self.INLINE_MAX if inlineMax is None else int(inlineMax)
        self._db = Database(
            self._dbPath, SCHEMA + (FTS_SCHEMA if self._fts else NO_FTS_SCHEMA), reactor, "mailplat-store-writer",
            migrate=_migrate,
        )
        self._listeners = Listeners()
        self._pollCall = None
        self._forgetCall = None
        self._opened = False
        self._pollDb = None
        self._dataVersion = None
        self._polledUsers: frozenset = frozenset()
        self._mailboxStates: dict = {}  # (user, mailbox) -> (uidnext, highestmodseq) last reported
        self._mailboxIds: dict = {}  # (user, mailbox id) -> (name, uidvalidity) at the last look
        self._selectCache: dict = {}  # mailbox id -> ((uidvalidity, uidnext, highestmodseq), data)
        self._uidvalidityLock = threading.Lock()
        #: The writer's stage the last append of this turn of the reactor was
        #: queued for, if any ("commit" or "files"); see append().
        self._appendBarrier = None
        self._lastUidvalidity = 0

    # --- plumbing ---------------------------------------------------------

    def open(self):
        os.makedirs(self._messagesDir, exist_ok=True)
        self._db.start()
        self._opened = True
        d = self._write(self._syncFulltext)
        self._backfillIndex()
        self._schedulePoll()
        self._forgetDeliveries()
        return d.addCallback(lambda _: None)

    #: Days an account remembers a delivery ID: longer than any queue entry
    #: lives (its lifetime, 5 days by default, and a lease), so a repeated
    #: delivery always finds it.
    DELIVERY_ID_DAYS = 30

    def _forgetDeliveries(self):
        """Drop delivery IDs older than L{DELIVERY_ID_DAYS}; again every hour while open."""
        self._forgetCall = None
        if not self._opened:
            return
        before = self._reactor.seconds() - self.DELIVERY_ID_DAYS * 86400
        self._write(lambda db: db.execute("DELETE FROM deliveries WHERE at < ?", (before,)), durable=False).addErrback(
            lambda f: _log.failure("forgetting old delivery IDs failed", f))
        self._forgetCall = self._reactor.callLater(3600, self._forgetDeliveries)

    def _syncFulltext(self, db):
        """Record whether the full-text index is kept; build it over existing text when newly switched on."""
        row = db.execute("SELECT value FROM meta WHERE key='fulltext'").fetchone()
        state = "on" if self._fts else "off"
        if row is not None and row[0] == state:
            return
        if self._fts and db.execute("SELECT 1 FROM msgtext LIMIT 1").fetchone() is not None:
            db.execute("INSERT INTO msgfts(msgfts) VALUES ('rebuild')")
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('fulltext', ?)", (state,))

    def _backfillIndex(self):
        """Index (in the writer, a batch at a time) messages that have no msgindex row."""

        def apply(db):
            rows = db.execute(
                "SELECT m.mailbox, m.uid, m.file, m.structure FROM messages m LEFT JOIN msgindex i"
                " ON i.mailbox=m.mailbox AND i.uid=m.uid WHERE i.uid IS NULL LIMIT 200"
            ).fetchall()
            for mid, uid, rel, structure in rows:
                try:
                    content = self._load(db, rel)
                except (OSError, KeyError):
                    continue
                try:
                    st = json.loads(structure) if structure else None
                except ValueError:
                    st = None
                if not isinstance(st, dict) or st.get("version") != STRUCTURE_VERSION:
                    st = _analyze(content)
                row, body = _indexRow(content, st)
                _insertIndex(db, mid, uid, row, body)
            return len(rows)

        def again(n):
            if n == 200:
                self._backfillIndex()

        self._write(apply).addCallbacks(again, lambda f: None)

    def close(self):
        self._opened = False
        if self._pollCall is not None and self._pollCall.active():
            self._pollCall.cancel()
        self._pollCall = None
        if self._forgetCall is not None and self._forgetCall.active():
            self._forgetCall.cancel()
        self._forgetCall = None
        return self._db.stop()

    # --- changes made by other processes ------------------------------------

    #: Seconds between looks for changes that other processes made to this
    #: store's files (0: never look).  Each look is one C{PRAGMA
    #: data_version}; only when it moved are the mailboxes of the accounts
    #: with listeners read.
    changePollInterval = 1.0

    def _schedulePoll(self):
        if self.changePollInterval and self._pollCall is None and self._opened:
            self._pollCall = self._reactor.callLater(self.changePollInterval, self._pollChanges)

    def _pollChanges(self):
        self._pollCall = None
        users = self._listeners.users()
        if not users:
            self._mailboxStates.clear()
            self._mailboxIds.clear()
            self._polledUsers = frozenset()
            self._schedulePoll()
            return None
        from twisted.internet.threads import deferToThreadPool

        d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._mailboxRows, users)
        d.addCallbacks(self._reportChanges, lambda f: _log.failure("looking for other processes' changes failed", f))
        d.addBoth(lambda _: self._schedulePoll())
        return d

    def _mailboxRows(self, users):
        """(In a pool thread, one look at a time.)  The mailbox rows of C{users}, or None if nothing moved."""
        if self._pollDb is None:
            self._pollDb = connect(self._dbPath)
        db = self._pollDb
        version = db.execute("PRAGMA data_version").fetchone()[0]
        wanted = frozenset(users)
        if version == self._dataVersion and wanted <= self._polledUsers:
            return None
        self._dataVersion = version
        self._polledUsers = wanted
        users = sorted(wanted)
        rows = []
        db.execute("BEGIN")
        try:
            for i in range(0, len(users), 500):
                chunk = users[i:i + 500]
                rows += db.execute(
                    "SELECT user, name, uidnext, highestmodseq, id, uidvalidity FROM mailboxes"
                    f" WHERE user IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
        finally:
            db.execute("COMMIT")
        return wanted, rows

    def _reportChanges(self, polled):
        """
        Since the last look: a C{"delete"} or C{"rename"} event for every
        mailbox (by its id and UIDVALIDITY) that is gone or has another name, then a
        C{"changed"} event for every mailbox whose UIDNEXT or HIGHESTMODSEQ
        moved.  (This process's own changes were told already; a session
        tells a repeat by the name or the UIDVALIDITY.)
        """
        if polled is None:
            return
        users, rows = polled
        before, now = self._mailboxStates, {}
        beforeIds, ids = self._mailboxIds, {}
        for user, name, uidnext, highest, mid, uidvalidity in rows:
            ids[(user, mid)] = (name, uidvalidity)
        for (user, mid), (name, uidvalidity) in beforeIds.items():
            if user not in users:
                continue
            current = ids.get((user, mid))
            # (An id can be given again to a new mailbox: its UIDVALIDITY tells.)
            if current is None or current[1] != uidvalidity:
                self._listeners.emit(MailboxEvent(user, name, "delete", uidvalidity=uidvalidity))
            elif current[0] != name:
                self._listeners.emit(MailboxEvent(user, name, "rename", newName=current[0], uidvalidity=uidvalidity))
        for user, name, uidnext, highest, mid, uidvalidity in rows:
            now[(user, name)] = (uidnext, highest)
            if before.get((user, name)) != (uidnext, highest):
                self._listeners.emit(MailboxEvent(user, name, "changed", modseq=highest))
        self._mailboxStates = now
        self._mailboxIds = ids

    def _readDb(self) -> sqlite3.Connection:
        return self._db.connection()

    def _read(self, f, *a, inline=False, transaction=True):
        return self._db.read(f, *a, inline=inline, transaction=transaction)

    def _write(self, apply, prepare=None, after=None, onFailure=None, events=None, durable=True, small=False):
        op = WriteOp(apply, prepare, after, onFailure, durable=durable, small=small)
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
        name = _canonicalName(name)
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
        # The counts the triggers keep; the recent ones from their index.
        count, unseen, size = db.execute("SELECT nmessages, nunseen, nsize FROM mailboxes WHERE id=?", (mid,)).fetchone()
        recent = db.execute("SELECT COUNT(*) FROM messages INDEXED BY messages_recent WHERE mailbox=? AND recent=1", (mid,)).fetchone()[0]
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
                    "INSERT INTO mailboxes (user, name, uidvalidity, specialuse) VALUES (?, ?, ?, ?)",
                    (user, name, _uniqueUidvalidity(db, v), use),
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
        return self._read(lambda db: db.execute("SELECT 1 FROM accounts WHERE user=?", (user,)).fetchone() is not None,
                          inline=True)

    # --- mailboxes ----------------------------------------------------------

    def listMailboxes(self, user):
        def run(db):
            if not db.execute("SELECT 1 FROM accounts WHERE user=?", (user,)).fetchone():
                raise NoSuchAccount(f"no such account: {user}")
            if self._db.inline:
                count = db.execute("SELECT COUNT(*) FROM mailboxes WHERE user=?", (user,)).fetchone()[0]
                if count > self._inlineMailboxes:
                    raise NotSmall()
            subs = {r[0] for r in db.execute("SELECT name FROM subscriptions WHERE user=?", (user,))}
            rows = db.execute(
                "SELECT id, name, uidvalidity, uidnext, highestmodseq, specialuse, nmessages, nunseen, nsize"
                " FROM mailboxes WHERE user=? ORDER BY name",
                (user,),
            ).fetchall()
            # The counts are kept in the rows; the recent ones, for every
            # mailbox at once, from their index.
            recent = dict(
                db.execute(
                    "SELECT mailbox, COUNT(*) FROM messages INDEXED BY messages_recent WHERE recent=1"
                    " AND mailbox IN (SELECT id FROM mailboxes WHERE user=?) GROUP BY mailbox",
                    (user,),
                ).fetchall()
            )
            out = []
            for mid, name, uidvalidity, uidnext, highest, special, count, unseen, size in rows:
                out.append(
                    MailboxInfo(
                        name, uidvalidity, uidnext, highest, count, unseen, recent.get(mid, 0), special,
                        name in subs, size,
                    )
                )
            return out

        return self._read(run, inline=True)

    def getMailbox(self, user, name):
        def run(db):
            try:
                canon = validateMailboxName(name)
            except InvalidMailboxName:
                raise NoSuchMailbox(f"no such mailbox: {name}")
            # One statement: its own consistent snapshot.
            row = db.execute(
                "SELECT b.name, b.uidvalidity, b.uidnext, b.highestmodseq, b.nmessages, b.nunseen, b.specialuse,"
                " EXISTS (SELECT 1 FROM subscriptions s WHERE s.user=b.user AND s.name=b.name), b.nsize,"
                " (SELECT COUNT(*) FROM messages INDEXED BY messages_recent WHERE mailbox=b.id AND recent=1)"
                " FROM mailboxes b WHERE b.user=? AND b.name=?",
                (user, canon),
            ).fetchone()
            if row is None:
                self._mailboxRow(db, user, canon)  # raises the right error
            name_, validity, uidnext, highest, count, unseen, special, subscribed, size, recent = row
            return MailboxInfo(name_, validity, uidnext, highest, count, unseen, recent, special, bool(subscribed), size)

        return self._read(run, inline=True, transaction=False)

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
            v = _uniqueUidvalidity(db, validity)
            db.execute(
                "INSERT INTO mailboxes (user, name, uidvalidity, specialuse) VALUES (?, ?, ?, ?)",
                (user, canon, v, specialUse),
            )
            return MailboxInfo(canon, v, 1, 1, specialUse=specialUse)

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
            mid, old, _, _, highest, special = self._mailboxRow(db, user, oldName)
            if db.execute("SELECT 1 FROM mailboxes WHERE user=? AND name=?", (user, new)).fetchone():
                raise MailboxExists(f"mailbox exists: {new}")
            if old == "INBOX":
                cur = db.execute(
                    "INSERT INTO mailboxes (user, name, uidvalidity) VALUES (?, ?, ?)",
                    (user, new, _uniqueUidvalidity(db, validity)),
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
                db.executemany(
                    "INSERT OR REPLACE INTO expunged VALUES (?, ?, ?)", [(mid, uid, highest + 1) for (uid,) in rows]
                )
                events = []
                if rows:
                    events.append(MailboxEvent(user, "INBOX", "expunge", tuple(uid for (uid,) in rows)))
                events.append(MailboxEvent(user, new, "create"))
                return events
            events = []
            rows = db.execute("SELECT id, name FROM mailboxes WHERE user=?", (user,)).fetchall()
            for rid, rname in rows:
                if rname == old or rname.startswith(old + "/"):
                    db.execute("UPDATE mailboxes SET name=? WHERE id=?", (new + rname[len(old):], rid))
                    events.append(MailboxEvent(user, rname, "rename", newName=new + rname[len(old):]))
            return events

        return self._write(apply, events=lambda events: events).addCallback(lambda _: None)

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

    def _prepareContent(self, source, state):
        """
        Make one message's content ready to commit: inline (kept in the
        index) or written to its file, and analysed.  Fills C{state};
        returns the (files, directories) to sync before the commit.
        """
        inline = (
            isinstance(source, (bytes, bytearray, memoryview)) and len(source) <= self.inlineMax
            or isinstance(source, str) and os.path.getsize(source) <= self.inlineMax
        )
        if inline:
            if isinstance(source, str):
                with open(source, "rb") as f:
                    content = f.read()
            else:
                content = bytes(source)
            state["inline"] = content
            synced, dirs = [], []
        elif isinstance(source, (bytes, bytearray, memoryview)):
            path = self._newFilePath()
            content = bytes(source)
            writeFile(path, content)
            synced = [path]
        else:
            path = self._newFilePath()
            linkOrCopy(source, path)
            with open(path, "rb") as f:
                content = f.read()
            # A hard link to an already-durable file needs only its
            # directory entry synced; a copy needs its data synced too.
            synced = [path] if os.stat(path).st_nlink == 1 else []
        if not inline:
            state["path"] = path
            dirs = [os.path.dirname(path)]
        state["size"] = len(content)
        structure = _analyze(content)
        state["structure"] = json.dumps(structure, separators=(",", ":"))
        state["envelope"] = _envelopeOf(structure)
        state["index"] = _indexRow(content, structure)
        return synced, dirs

    def _insertMessage(self, db, mid, uid, modseq, state, flagsText, date, deliveryId=None):
        """The rows of one prepared message (L{_prepareContent}) at C{uid} (new to the mailbox)."""
        if "inline" in state:
            rel = ":%d" % db.execute("INSERT INTO blobs (data) VALUES (?)", (state["inline"],)).lastrowid
        else:
            rel = os.path.relpath(state["path"], self._messagesDir)
        db.execute(
            "INSERT INTO messages (mailbox, uid, file, size, internaldate, modseq, flags, deliveryid, structure,"
            " envelope) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (mid, uid, rel, state["size"], date, modseq, flagsText, deliveryId, state["structure"],
             state["envelope"]),
        )
        # (UIDNEXT is new to the mailbox; an expunge removes a message's text row.)
        _insertIndex(db, mid, uid, *state["index"], fresh=True)

    def append(self, user, mailbox, source, flags=(), internalDate=None, deliveryId=None):
        flagsText = _flagsText(normaliseFlags(flags))
        date = float(internalDate if internalDate is not None else self._reactor.seconds())
        state = {}

        def prepare():
            return self._prepareContent(source, state)

        def apply(db):
            mid, canon, uidvalidity, uidnext, highest, _ = self._mailboxRow(db, user, mailbox)
            state["canon"] = canon
            if deliveryId is not None:
                row = db.execute(
                    "SELECT uidvalidity, uid FROM deliveries WHERE user=? AND id=?", (user, deliveryId)
                ).fetchone()
                if row is None:  # (delivered before the account's record was kept)
                    row = db.execute(
                        "SELECT ?, uid FROM messages WHERE mailbox=? AND deliveryid=?", (uidvalidity, mid, deliveryId)
                    ).fetchone()
                if row is not None:
                    state["duplicate"] = True
                    return tuple(row)
                db.execute("INSERT INTO deliveries VALUES (?, ?, ?, ?, ?)",
                           (user, deliveryId, uidvalidity, uidnext, self._reactor.seconds()))
            self._checkQuota(db, user, state["size"], 1)
            modseq = highest + 1
            self._insertMessage(db, mid, uidnext, modseq, state, flagsText, date, deliveryId)
            db.execute("UPDATE mailboxes SET uidnext=?, highestmodseq=? WHERE id=?", (uidnext + 1, modseq, mid))
            state["meta"] = MessageMeta(uidnext, normaliseFlags(flags), date, state["size"], modseq)
            return (uidvalidity, uidnext)

        def after(result):
            if state.get("duplicate") and "path" in state:
                self._unlinkAll([state["path"]], relative=False)

        def onFailure():
            if "path" in state:
                self._unlinkAll([state["path"]], relative=False)

        def events(result):
            if state.get("duplicate"):
                return []
            return [MailboxEvent(user, state["canon"], "append", (result[1],), metas=(state["meta"],))]

        if isinstance(source, (bytes, bytearray, memoryview)) and len(source) <= self.inlineMax:
            # Content kept in the index: nothing to write or sync before the
            # commit, and no file to remove after it.  Analysing it here
            # costs what it would in the files thread (it holds the GIL
            # either way) and saves the operation a trip through that
            # thread; as a small change it commits here too when nothing
            # else is writing, and waits only for the sync stage's fsync
            # (measured under the IMAP mixed load: 3.5-3.9 ms from submission
            # to result at the median through the commit thread, 2.2-2.5
            # committed here, for 0.25 ms more of this thread's time).
            # An append that went to the writer's threads must not be
            # overtaken by one submitted after it in the same turn of the
            # reactor (the next messages of a MULTIAPPEND): those follow it
            # through the same stages.
            try:
                prepare()
            except Exception:
                return defer.fail()
            barrier = self._appendBarrier
            if barrier == "files":
                # Behind a message being written to its file: through the files stage too.
                return self._write(apply, lambda: ([], []), events=events)
            d = self._write(apply, events=events, small=barrier is None)
            if not self._db.writer.lastInline:
                self._raiseAppendBarrier("commit")
            return d
        self._raiseAppendBarrier("files")
        return self._write(apply, prepare, after, onFailure, events)

    def appendAll(self, user, mailbox, messages):
        """
        L{IMultiAppendStore}: C{messages} (C{(source, flags, internalDate)}
        each) in one transaction, with consecutive UIDs: all of them or
        none, a crash included (RFC 3502 MULTIAPPEND).
        """
        now = self._reactor.seconds()
        items = []
        for source, flags, internalDate in messages:
            flags = normaliseFlags(flags)
            items.append((source, flags, _flagsText(flags), float(internalDate if internalDate is not None else now), {}))
        found = {}

        def prepare():
            synced, dirs = [], set()
            for source, _, _, _, state in items:
                s, d = self._prepareContent(source, state)
                synced += s
                dirs.update(d)
            return synced, sorted(dirs)

        def apply(db):
            mid, canon, uidvalidity, uidnext, highest, _ = self._mailboxRow(db, user, mailbox)
            found["canon"] = canon
            self._checkQuota(db, user, sum(state["size"] for *_, state in items), len(items))
            for i, (_, flags, flagsText, date, state) in enumerate(items):
                uid, modseq = uidnext + i, highest + 1 + i
                self._insertMessage(db, mid, uid, modseq, state, flagsText, date)
                state["meta"] = MessageMeta(uid, flags, date, state["size"], modseq)
            db.execute("UPDATE mailboxes SET uidnext=?, highestmodseq=? WHERE id=?",
                       (uidnext + len(items), highest + len(items), mid))
            return (uidvalidity, list(range(uidnext, uidnext + len(items))))

        def onFailure():
            self._unlinkAll([state["path"] for *_, state in items if "path" in state], relative=False)

        def events(result):
            metas = tuple(state["meta"] for *_, state in items)
            return [MailboxEvent(user, found["canon"], "append", tuple(result[1]), metas=metas)]

        self._raiseAppendBarrier("files")
        return self._write(apply, prepare, None, onFailure, events)

    def _raiseAppendBarrier(self, stage):
        if self._appendBarrier is None:
            self._reactor.callLater(0, self._lowerAppendBarrier)
        if self._appendBarrier != "files":
            self._appendBarrier = stage

    def _lowerAppendBarrier(self):
        self._appendBarrier = None

    def fetchMeta(self, user, mailbox, uids=None, withStructure=False, changedSince=None, withEnvelope=False):
        wanted = None if uids is None else sorted(set(uids))

        def run(db):
            cols = "uid, flags, internaldate, size, modseq"
            if withStructure:
                cols += ", structure"
            elif withEnvelope:
                # The structure only of rows stored before envelopes were kept.
                cols += ", CASE WHEN envelope IS NULL THEN structure END"
            if withEnvelope:
                cols += ", envelope"
            # The mailbox found by name in the same statement (no rows:
            # see whether it exists).
            sql = f"SELECT {cols} FROM messages WHERE mailbox=(SELECT id FROM mailboxes WHERE user=? AND name=?)"
            args = [user, _canonicalName(mailbox)]
            if changedSince is not None:
                sql += " AND modseq > ?"
                args.append(changedSince)
            if wanted is not None and len(wanted) <= 500:
                sql += f" AND uid IN ({','.join('?' * len(wanted))})"
                args.extend(wanted)
            rows = db.execute(sql + " ORDER BY uid", args).fetchall()
            if not rows:
                self._mailboxRow(db, user, mailbox)
            if wanted is not None and len(wanted) > 500:
                keep = set(wanted)
                rows = [r for r in rows if r[0] in keep]
            if withEnvelope:
                out = []
                for uid, flags, date, size, modseq, structure, envelope in rows:
                    structure = json.loads(structure) if structure else None
                    if envelope is None:
                        envelope = _envelopeOf(structure)
                    out.append(_meta(uid, _flagsSet(flags), date, size, modseq,
                                     structure if withStructure else None, envelope))
                return out
            if not withStructure:
                return [_meta(r[0], _flagsSet(r[1]), r[2], r[3], r[4]) for r in rows]
            return [_meta(r[0], _flagsSet(r[1]), r[2], r[3], r[4], json.loads(r[5]) if r[5] else None) for r in rows]

        # The mailbox's id, then its rows: no transaction needed around them.
        return self._read(run, inline=wanted is not None and len(wanted) <= self._inlineRows, transaction=False)

    #: Mailboxes with at least this many messages keep their last
    #: L{selectData} in memory (at most L{_selectCacheSize} of them).
    _selectCacheMin = 1000
    _selectCacheSize = 64

    def selectData(self, user, mailbox):
        def run(db):
            row = self._mailboxRow(db, user, mailbox)
            mid, name, uidvalidity, uidnext, highest, special = row
            # Every change to a mailbox's messages (append, flags, expunge,
            # copy, move) raises its HIGHESTMODSEQ in the same transaction,
            # and a recreated mailbox has a new UIDVALIDITY: the same key in
            # this read's snapshot means the same UIDs, flags and MODSEQs
            # (\\Recent is read apart).  Tuples, so sharing them is safe.
            key = (uidvalidity, uidnext, highest)
            cached = self._selectCache.get(mid)
            if cached is not None and cached[0] == key:
                uids, flags, modseqs, unseen, size = cached[1]
            else:
                if self._db.inline:
                    count = db.execute("SELECT nmessages FROM mailboxes WHERE id=?", (mid,)).fetchone()[0]
                    if count > self._inlineSelect:
                        raise NotSmall()
                rows = db.execute(
                    "SELECT uid, flags, modseq, size FROM messages INDEXED BY messages_meta"
                    " WHERE mailbox=? ORDER BY uid",
                    (mid,),
                ).fetchall()
                if rows:
                    uids, texts, modseqs, sizes = zip(*rows)
                else:
                    uids = texts = modseqs = sizes = ()
                flags = tuple(map(_flagsSet, texts))
                unseen = sum(1 for t in texts if "\\Seen" not in t)
                size = sum(sizes)
                if len(uids) >= self._selectCacheMin:
                    if len(self._selectCache) >= self._selectCacheSize:
                        self._selectCache.clear()
                    self._selectCache[mid] = (key, (uids, flags, modseqs, unseen, size))
            recent = tuple(
                r[0]
                for r in db.execute(
                    "SELECT uid FROM messages INDEXED BY messages_recent WHERE mailbox=? AND recent=1 ORDER BY uid",
                    (mid,),
                )
            )
            subscribed = db.execute("SELECT 1 FROM subscriptions WHERE user=? AND name=?", (user, name)).fetchone()
            info = MailboxInfo(
                name, uidvalidity, uidnext, highest, len(uids), unseen, len(recent), special, subscribed is not None,
                size,
            )
            return SelectData(info, uids, flags, modseqs, recent)

        return self._read(run, inline=True)

    def getContents(self, user, mailbox, uids):
        wanted = sorted(set(uids))

        def run(db):
            mid = self._mailboxRow(db, user, mailbox)[0]
            out = {}
            if not wanted:
                return out
            rows = self._rowsFor(db, mid, wanted, "uid, file")
            self._smallContent(rows)
            for uid, rel in rows:
                try:
                    out[uid] = self._load(db, rel)
                except (FileNotFoundError, KeyError):
                    # Expunged after the row was read: as if it never existed.
                    continue
            return out

        return self._read(run, inline=len(wanted) <= self._inlineContents)

    def getContent(self, user, mailbox, uid):
        def run(db):
            # The row and its blob in one statement (one snapshot: a blob's
            # id may be reused once it is deleted).
            row = db.execute(_CONTENT_SQL, (user, _canonicalName(mailbox), uid)).fetchone()
            if row is None:
                self._mailboxRow(db, user, mailbox)  # no such account or mailbox?
                raise KeyError(uid)
            rel, data = row
            if rel.startswith(":"):
                if data is None:
                    raise KeyError(rel)
                return bytes(data)
            self._smallContent([(uid, rel)])
            return self._load(db, rel)

        return self._read(run, inline=True, transaction=False)

    #: Reads run at once in the reactor's thread when they are this small:
    #: metadata of up to this many UIDs named by the caller...
    _inlineRows = 64
    #: ...and the content of up to this many messages kept in the index;
    #: SELECT of a mailbox of up to this many messages (and not in the
    #: SELECT cache); LIST of an account with up to this many mailboxes.
    _inlineContents = 4
    _inlineSelect = 200
    _inlineMailboxes = 200

    def _smallContent(self, rows):
        """In a read started inline: content in files (large messages) is read in a thread instead."""
        if self._db.inline and any(not rel.startswith(":") for _, rel in rows):
            raise NotSmall()

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

        def events(result):
            if not state["changed"]:
                return []
            changed = set(state["changed"])
            return [
                MailboxEvent(
                    user, state["canon"], "flags", tuple(state["changed"]),
                    changes=tuple(c for c in result[0] if c.uid in changed),
                )
            ]

        # Flags are committed without waiting for an fsync of their own
        # (what Dovecot's default mail_fsync=optimized does for its index):
        # the change is in the WAL in commit order and becomes durable with
        # the next durable commit (any delivery, APPEND, EXPUNGE, COPY) or
        # checkpoint.  A crash can only forget the latest flag changes; no
        # message is lost and the index stays consistent.
        small = len(wanted) <= self._inlineRows
        if not small:
            return self._write(apply, events=events, durable=False)

        def unchanged(db):
            # A change of a few messages is looked at first: one that
            # changes nothing (a flag added that is there already) answers
            # from this read without taking the write lock.
            mid = self._mailboxRow(db, user, mailbox)[0]
            changes, failed = [], []
            for uid, text, modseq in self._rowsFor(db, mid, wanted, "uid, flags, modseq"):
                if unchangedSince is not None and modseq > unchangedSince:
                    failed.append(uid)
                    continue
                current = _flagsSet(text)
                if applyFlags(current, mode, flags) != current:
                    return None
                changes.append(FlagChange(uid, current, modseq))
            return changes, failed

        def write(outcome):
            if outcome is not None:
                return outcome
            return self._write(apply, events=events, durable=False, small=True)

        return self._read(unchanged, inline=True, transaction=False).addCallback(write)

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
                "SELECT uid, file FROM messages INDEXED BY messages_deleted"
                " WHERE mailbox=? AND ' ' || flags || ' ' LIKE '% \\Deleted %' ORDER BY uid",
                (mid,),
            ).fetchall()
            if wanted is not None:
                keep = set(wanted)
                rows = [r for r in rows if r[0] in keep]
            if len(rows) > self._inlineRows and self._db.inline:
                raise NotSmall()
            for uid, _ in rows:
                db.execute("DELETE FROM messages WHERE mailbox=? AND uid=?", (mid, uid))
                db.execute("INSERT OR REPLACE INTO expunged VALUES (?, ?, ?)", (mid, uid, highest + 1))
            if rows:
                db.execute("UPDATE mailboxes SET highestmodseq=? WHERE id=?", (highest + 1, mid))
            state["files"] = [r[1] for r in rows if not r[1].startswith(":")]
            state["modseq"] = highest + 1
            return [r[0] for r in rows]

        def removeFiles(gone):
            # The rows that named them must be durable before the files go
            # (a crash that forgot the expunge would leave rows without
            # content): a durable commit follows, then they are removed.
            if not state["files"]:
                return gone
            files = state["files"]

            def failed(f):
                _log.failure("removing expunged messages' files failed; fsck finds them", f)
                return gone

            return self._write(lambda db: None, after=lambda r: self._unlinkAll(files)).addCallbacks(
                lambda _: gone, failed
            )

        # An expunge is committed without waiting for an fsync of its own,
        # as flags are (and as Dovecot's mail_fsync=optimized leaves its
        # index): content kept in the index goes in the same transaction,
        # so a crash can only bring back messages expunged just before it,
        # whole; an expunge of messages kept in files waits for a durable
        # commit after it, then removes them.
        d = self._write(
            apply,
            events=lambda gone: (
                [MailboxEvent(user, state["canon"], "expunge", tuple(gone), modseq=state["modseq"])] if gone else []
            ),
            durable=False,
            small=True,
        )
        return d.addCallback(removeFiles)

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
                if rel.startswith(":"):
                    continue  # in the index: copied by the transaction
                target = self._newFilePath()
                linkOrCopy(os.path.join(self._messagesDir, rel), target)
                state["links"].append((uid, target))
            return [], sorted({os.path.dirname(t) for _, t in state["links"]})

        def apply(db):
            src = self._mailboxRow(db, user, mailbox)
            dst = self._mailboxRow(db, user, destination)
            state["src"], state["dst"] = src[1], dst[1]
            linked = dict(state["links"])
            rows = self._rowsFor(db, src[0], wanted, "uid, file, size, internaldate, flags, structure, envelope")
            if not move:
                self._checkQuota(db, user, sum(r[2] for r in rows), len(rows))
            uidnext, highest = dst[3], dst[4]
            srcModseq = src[4] + 1
            mapping, removed, metas = [], [], []
            for uid, rel, size, date, flags, structure, envelope in rows:
                if rel.startswith(":"):
                    cur = db.execute("INSERT INTO blobs (data) SELECT data FROM blobs WHERE id=?", (int(rel[1:]),))
                    if not cur.rowcount:
                        continue
                    newRel = ":%d" % cur.lastrowid
                else:
                    target = linked.pop(uid, None)
                    if target is None:
                        continue
                    newRel = os.path.relpath(target, self._messagesDir)
                highest += 1
                db.execute(
                    "INSERT INTO messages (mailbox, uid, file, size, internaldate, modseq, flags, structure, envelope)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (dst[0], uidnext, newRel, size, date, highest, flags, structure, envelope),
                )
                cols = ", ".join(_INDEX_COLUMNS)
                db.execute(
                    f"INSERT OR REPLACE INTO msgindex (mailbox, uid, {cols}) SELECT ?, ?, {cols} FROM msgindex"
                    " WHERE mailbox=? AND uid=?",
                    (dst[0], uidnext, src[0], uid),
                )
                db.execute(
                    "INSERT OR REPLACE INTO msgtext (mailbox, uid, body) SELECT ?, ?, body FROM msgtext"
                    " WHERE mailbox=? AND uid=?",
                    (dst[0], uidnext, src[0], uid),
                )
                mapping.append((uid, uidnext))
                metas.append(MessageMeta(uidnext, _flagsSet(flags), date, size, highest))
                uidnext += 1
                if move:
                    db.execute("DELETE FROM messages WHERE mailbox=? AND uid=?", (src[0], uid))
                    db.execute("INSERT OR REPLACE INTO expunged VALUES (?, ?, ?)", (src[0], uid, srcModseq))
                    removed.append(rel)
            db.execute("UPDATE mailboxes SET uidnext=?, highestmodseq=? WHERE id=?", (uidnext, highest, dst[0]))
            if move and mapping:
                db.execute("UPDATE mailboxes SET highestmodseq=highestmodseq+1 WHERE id=?", (src[0],))
            state["srcModseq"] = srcModseq
            state["unused"] = list(linked.values())
            state["removed"] = removed
            state["metas"] = tuple(metas)
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
            out = [MailboxEvent(user, state["dst"], "append", tuple(n for _, n in mapping), metas=state["metas"])]
            if move:
                out.append(MailboxEvent(user, state["src"], "expunge", tuple(u for u, _ in mapping),
                                        modseq=state["srcModseq"]))
            return out

        return self._write(apply, prepare, after, onFailure, events)

    def claimRecent(self, user, mailbox):
        def apply(db):
            mid = self._mailboxRow(db, user, mailbox)[0]
            uids = [r[0] for r in db.execute("SELECT uid FROM messages INDEXED BY messages_recent WHERE mailbox=? AND recent=1 ORDER BY uid", (mid,))]
            if len(uids) > self._inlineRows and self._db.inline:
                raise NotSmall()
            if uids:
                db.execute("UPDATE messages INDEXED BY messages_recent SET recent=0 WHERE mailbox=? AND recent=1", (mid,))
            return uids

        # \Recent is advisory (RFC 3501 2.3.2): losing a claim in a crash is
        # harmless, so it is not worth an fsync on every SELECT; a claim of
        # a few messages commits at once in this thread when it can (every
        # SELECT waits for it); with none to claim, a read answers.
        def anyRecent(db):
            mid = self._mailboxRow(db, user, mailbox)[0]
            return db.execute(
                "SELECT 1 FROM messages INDEXED BY messages_recent WHERE mailbox=? AND recent=1 LIMIT 1", (mid,)
            ).fetchone() is not None

        return self._read(anyRecent, inline=True, transaction=False).addCallback(
            lambda some: self._write(apply, durable=False, small=True) if some else []
        )

    def addListener(self, user, listener):
        return self._listeners.add(user, listener)

    # --- optional interfaces ------------------------------------------------

    def _checkQuota(self, db, user, addBytes, addMessages):
        row = db.execute("SELECT storage, messages FROM quotas WHERE user=?", (user,)).fetchone()
        if row is None or (row[0] is None and row[1] is None):
            return
        usedBytes, usedMessages = self._usage(db, user)
        if row[0] is not None and usedBytes + addBytes > row[0]:
            raise QuotaExceeded("storage quota exceeded")
        if row[1] is not None and usedMessages + addMessages > row[1]:
            raise QuotaExceeded("message count quota exceeded")

    @staticmethod
    def _usage(db, user):
        # The mailboxes' kept counts: a sum over an account's mailboxes,
        # not over its messages (this runs inside every delivery's write
        # transaction when the account has a quota).
        return db.execute(
            "SELECT COALESCE(SUM(nsize), 0), COALESCE(SUM(nmessages), 0) FROM mailboxes WHERE user=?", (user,)
        ).fetchone()

    def getQuota(self, user):
        def run(db):
            if not db.execute("SELECT 1 FROM accounts WHERE user=?", (user,)).fetchone():
                raise NoSuchAccount(f"no such account: {user}")
            row = db.execute("SELECT storage, messages FROM quotas WHERE user=?", (user,)).fetchone() or (None, None)
            usedBytes, usedMessages = self._usage(db, user)
            return Quota(usedBytes, row[0], usedMessages, row[1])

        return self._read(run)

    def setQuota(self, user, storage=None, messages=None):
        def apply(db):
            if not db.execute("SELECT 1 FROM accounts WHERE user=?", (user,)).fetchone():
                raise NoSuchAccount(f"no such account: {user}")
            db.execute("INSERT OR REPLACE INTO quotas VALUES (?, ?, ?)", (user, storage, messages))

        return self._write(apply).addCallback(lambda _: self.getQuota(user))

    def vanishedSince(self, user, mailbox, modseq):
        def run(db):
            mid = self._mailboxRow(db, user, mailbox)[0]
            return [
                r[0] for r in db.execute(
                    "SELECT uid FROM expunged WHERE mailbox=? AND modseq > ? ORDER BY uid", (mid, modseq)
                )
            ]

        return self._read(run)

    def openContent(self, user, mailbox, uid):
        def run(db):
            mid = self._mailboxRow(db, user, mailbox)[0]
            row = db.execute("SELECT file FROM messages WHERE mailbox=? AND uid=?", (mid, uid)).fetchone()
            if row is None:
                raise KeyError(uid)
            if row[0].startswith(":"):
                return io.BytesIO(self._load(db, row[0]))
            return open(os.path.join(self._messagesDir, row[0]), "rb")

        return self._read(run)

    def search(self, user, mailbox, query):
        compiler = _QueryCompiler(self._fts)
        try:
            cond = compiler.compile(query)
        except Exception as e:
            return defer.fail(e)

        def run(db):
            mid = self._mailboxRow(db, user, mailbox)[0]
            sets = [frozenset(t) for t in compiler.uidTables]
            db.create_function("mp_header", 3, _headerMatch, deterministic=True)
            db.create_function("mp_flag", 2, _flagMatch, deterministic=True)
            db.create_function("mp_uidin", 2, lambda i, u: int(u in sets[i]))
            sql = (
                "SELECT m.uid FROM messages m LEFT JOIN msgindex i ON i.mailbox=m.mailbox AND i.uid=m.uid"
                f" WHERE m.mailbox=? AND {cond} ORDER BY m.uid"
            )
            return [r[0] for r in db.execute(sql, [mid, *compiler.args])]

        return self._read(run)

    def indexData(self, user, mailbox, uids=None):
        wanted = None if uids is None else set(uids)

        def run(db):
            mid = self._mailboxRow(db, user, mailbox)[0]
            out = {}
            cols = ", ".join("i." + c for c in _INDEX_COLUMNS)
            for row in db.execute(
                f"SELECT m.uid, m.size, m.internaldate, {cols} FROM messages m LEFT JOIN msgindex i"
                " ON i.mailbox=m.mailbox AND i.uid=m.uid WHERE m.mailbox=?",
                (mid,),
            ):
                if wanted is not None and row[0] not in wanted:
                    continue
                entry = {k: v for k, v in zip(_INDEX_KEYS, row[3:]) if not k.startswith("_")}
                entry["references"] = (entry["references"] or "").split()
                entry["isReply"] = bool(entry["isReply"])
                for k in ("sortSubject", "sortFrom", "sortTo", "sortCc", "displayFrom", "displayTo"):
                    entry[k] = entry[k] or ""
                entry["size"] = row[1]
                entry["internalDate"] = row[2]
                out[row[0]] = entry
            return out

        return self._read(run)

    # --- helpers --------------------------------------------------------------

    def _load(self, db, rel: str) -> bytes:
        """The content a message row names: its blob (C{':<id>'}) or its file; L{KeyError} if gone."""
        if rel.startswith(":"):
            row = db.execute("SELECT data FROM blobs WHERE id=?", (int(rel[1:]),)).fetchone()
            if row is None:
                raise KeyError(rel)
            return bytes(row[0])
        with open(os.path.join(self._messagesDir, rel), "rb") as f:
            return f.read()

    def _unlinkAll(self, files, relative=True):
        for f in files or ():
            if f.startswith(":"):
                continue  # in the index: its row's deletion removed it
            path = os.path.join(self._messagesDir, f) if relative else f
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


@implementer(IPlugin, IStoreFactory)
class SQLiteStoreFactory:
    name = "sqlite"
    description = "SQLite index (WAL) holding messages up to 128 KB, a file for each larger one, under the data directory (the embedded default)."

    def build(self, args, context):
        """
        Args: C{path} (see L{dataPathArgument}), C{fulltext} (a boolean,
        default false) and C{inline_max} (octets, default 131072: messages
        up to this size are kept in the index database; 0 puts every
        message in a file of its own).  See L{SQLiteStore} for both.
        """
        args = dict(args or {})
        fulltext = args.pop("fulltext", False)
        if not isinstance(fulltext, bool):
            raise ValueError(f"fulltext must be true or false, not {fulltext!r}")
        inlineMax = args.pop("inline_max", SQLiteStore.INLINE_MAX)
        if isinstance(inlineMax, bool) or not isinstance(inlineMax, int) or not 0 <= inlineMax <= 16 * 1024 * 1024:
            raise ValueError(f"inline_max must be a number of octets from 0 to 16777216, not {inlineMax!r}")
        try:
            path = dataPathArgument(args, context, "store")
        except ValueError as e:
            if "unknown argument" in str(e):
                raise ValueError(str(e) + ", fulltext, inline_max") from None
            raise
        return SQLiteStore(path, context.reactor, fulltext=fulltext, inlineMax=inlineMax)
