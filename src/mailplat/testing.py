"""
Public, checked fakes for tests — mailplat's own and third parties'.

L{MemoryStore} is a complete L{IMessageStore} held in memory; it passes the
same contract suite as the real backends (C{tests/test_store_contract.py}),
so a test that passes against it means something.  L{MemoryQueue},
L{StaticRouter} and L{memoryPortal} fill in the rest of what a protocol
factory needs.
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer
from zope.interface import implementer

from mailplat.auth.realm import MailRealm
from mailplat.store.events import Listeners
from mailplat.interfaces.queue import IQueue, IQueueTransaction, QueueEntry
from mailplat.interfaces.routing import IRouter, LocalDestination, RemoteDestination, Route
from mailplat.interfaces.storage import (
    DEFAULT_MAILBOXES,
    SYSTEM_FLAGS,
    AccountExists,
    FlagChange,
    IBatchReadStore,
    IMultiAppendStore,
    IContentStore,
    IMessageStore,
    IQuotaStore,
    ISearchIndex,
    IVanishedStore,
    Quota,
    QuotaExceeded,
    InvalidMailboxName,
    MailboxEvent,
    MailboxExists,
    MailboxInfo,
    MailboxNotEmpty,
    MessageMeta,
    NoSuchAccount,
    NoSuchMailbox,
    SelectData,
    validateMailboxName,
)

_uidvalidities = itertools.count(int(time.time()) & 0x7FFFFFFF)
_CANONICAL_FLAGS = {f.lower(): f for f in SYSTEM_FLAGS}


def normaliseFlags(flags) -> frozenset:
    """Flags with system flags in canonical case, keywords as given, de-duplicated case-insensitively."""
    canon = _CANONICAL_FLAGS
    seen = {}
    for f in flags:
        key = f.lower()
        seen.setdefault(key, canon.get(key, f))
    return frozenset(seen.values())


def applyFlags(current: frozenset, mode: str, flags) -> frozenset:
    flags = normaliseFlags(flags)
    if mode == "set":
        return flags
    lowered = {f.lower() for f in flags}
    if mode == "add":
        return normaliseFlags(list(current) + list(flags))
    if mode == "remove":
        return frozenset(f for f in current if f.lower() not in lowered)
    raise ValueError(f"unknown flag mode {mode!r}")


@dataclass
class _Message:
    uid: int
    content: bytes
    flags: frozenset
    internalDate: float
    modseq: int
    structure: dict | None
    deliveryId: str | None = None
    index: dict | None = None


@dataclass
class _Mailbox:
    name: str
    uidvalidity: int
    specialUse: str | None = None
    uidnext: int = 1
    highestModseq: int = 1
    messages: dict = field(default_factory=dict)
    recent: set = field(default_factory=set)
    vanished: dict = field(default_factory=dict)  # uid -> modseq of its expunge

    def info(self, subscribed):
        msgs = self.messages.values()
        return MailboxInfo(
            name=self.name,
            uidvalidity=self.uidvalidity,
            uidnext=self.uidnext,
            highestModseq=self.highestModseq,
            messages=len(self.messages),
            unseen=sum(1 for m in msgs if "\\Seen" not in m.flags),
            recent=len(self.recent),
            specialUse=self.specialUse,
            subscribed=subscribed,
            size=sum(len(m.content) for m in msgs),
        )


def _analyze(content: bytes):
    from mailplat.mime.structure import analyze

    return analyze(content)


def _index(content: bytes, structure: dict) -> dict:
    from mailplat.mime.structure import bodyText, headerText, indexFields

    index = indexFields(structure)
    index["_headers"] = headerText(structure)
    index["_body"] = bodyText(content, structure)
    return index


def _day(seconds: float):
    import datetime

    return datetime.datetime.fromtimestamp(int(seconds), datetime.timezone.utc).date()


def matchesIndex(query, m: "_Message") -> bool:
    """Evaluate an L{ISearchIndex} query tree against one message (the reference semantics)."""
    import datetime

    kind = query[0]
    if kind == "all":
        return True
    if kind == "and":
        return all(matchesIndex(q, m) for q in query[1])
    if kind == "or":
        return matchesIndex(query[1], m) or matchesIndex(query[2], m)
    if kind == "not":
        return not matchesIndex(query[1], m)
    if kind == "uids":
        return m.uid in query[1]
    if kind == "flag":
        lowered = query[1].lower()
        return any(f.lower() == lowered for f in m.flags) == query[2]
    if kind == "larger":
        return len(m.content) > query[1]
    if kind == "smaller":
        return len(m.content) < query[1]
    if kind == "modseq":
        return m.modseq >= query[1]
    index = m.index
    if kind == "header":
        name, needle = query[1], query[2]
        prefix = name + ": "
        for line in index["_headers"].split("\n"):
            if line.startswith(prefix) and (not needle or needle in line[len(prefix):]):
                return True
        return False
    if kind == "body":
        return query[1] in index["_body"]
    if kind == "text":
        return query[1] in index["_headers"] or query[1] in index["_body"]
    if kind == "date":
        _, which, date, sent = query
        if sent:
            if index["sentDay"] is None:
                return False
            day = datetime.date.fromordinal(index["sentDay"])
        else:
            day = _day(m.internalDate)
        if which == "before":
            return day < date
        if which == "on":
            return day == date
        return day >= date
    raise ValueError(f"unknown query {kind!r}")


@implementer(IMessageStore, ISearchIndex, IQuotaStore, IVanishedStore, IContentStore, IBatchReadStore,
             IMultiAppendStore)
class MemoryStore:
    """An L{IMessageStore} in memory.  Listeners are called synchronously."""

    def __init__(self, clock=None):
        self._accounts: dict[str, dict[str, _Mailbox]] = {}
        self._subscriptions: dict[str, set] = {}
        self._quotas: dict[str, tuple] = {}
        self._deliveries: dict[tuple, tuple] = {}  # (user, delivery ID) -> (uidvalidity, uid)
        self._listeners = Listeners()
        self._clock = clock

    def _now(self):
        return self._clock.seconds() if self._clock is not None else time.time()

    def _account(self, user):
        try:
            return self._accounts[user]
        except KeyError:
            raise NoSuchAccount(f"no such account: {user}")

    def _mailbox(self, user, name):
        boxes = self._account(user)
        try:
            name = validateMailboxName(name)
        except InvalidMailboxName:
            raise NoSuchMailbox(f"no such mailbox: {name}")
        try:
            return boxes[name]
        except KeyError:
            raise NoSuchMailbox(f"no such mailbox: {name}")

    def _emit(self, user, mailbox, kind, uids=(), **kw):
        self._listeners.emit(MailboxEvent(user, mailbox, kind, tuple(uids), **kw))

    def _usage(self, user):
        boxes = self._account(user).values()
        return sum(len(m.content) for b in boxes for m in b.messages.values()), sum(len(b.messages) for b in boxes)

    def _checkQuota(self, user, addBytes, addMessages):
        storage, messages = self._quotas.get(user, (None, None))
        if storage is None and messages is None:
            return
        usedBytes, usedMessages = self._usage(user)
        if storage is not None and usedBytes + addBytes > storage:
            raise QuotaExceeded("storage quota exceeded")
        if messages is not None and usedMessages + addMessages > messages:
            raise QuotaExceeded("message count quota exceeded")

    def _call(self, f, *a, **kw):
        try:
            return defer.succeed(f(*a, **kw))
        except Exception as e:
            return defer.fail(e)

    def open(self):
        return defer.succeed(None)

    def close(self):
        return defer.succeed(None)

    def createAccount(self, user):
        def go():
            if user in self._accounts:
                raise AccountExists(f"account exists: {user}")
            boxes = {"INBOX": _Mailbox("INBOX", next(_uidvalidities))}
            for name, use in DEFAULT_MAILBOXES:
                boxes[name] = _Mailbox(name, next(_uidvalidities), use)
            self._accounts[user] = boxes
            self._subscriptions[user] = {"INBOX"} | {n for n, _ in DEFAULT_MAILBOXES}

        return self._call(go)

    def deleteAccount(self, user):
        def go():
            self._account(user)
            del self._accounts[user]
            self._subscriptions.pop(user, None)
            for key in [k for k in self._deliveries if k[0] == user]:
                del self._deliveries[key]

        return self._call(go)

    def listAccounts(self):
        return defer.succeed(sorted(self._accounts))

    def hasAccount(self, user):
        return defer.succeed(user in self._accounts)

    def listMailboxes(self, user):
        def go():
            subs = self._subscriptions.get(user, set())
            return [b.info(b.name in subs) for _, b in sorted(self._account(user).items())]

        return self._call(go)

    def getMailbox(self, user, name):
        def go():
            box = self._mailbox(user, name)
            return box.info(box.name in self._subscriptions.get(user, set()))

        return self._call(go)

    def createMailbox(self, user, name, specialUse=None):
        def go():
            boxes = self._account(user)
            canon = validateMailboxName(name)
            if canon in boxes:
                raise MailboxExists(f"mailbox exists: {canon}")
            box = boxes[canon] = _Mailbox(canon, next(_uidvalidities), specialUse)
            self._emit(user, canon, "create")
            return box.info(False)

        return self._call(go)

    def deleteMailbox(self, user, name):
        def go():
            box = self._mailbox(user, name)
            if box.name == "INBOX":
                raise InvalidMailboxName("INBOX cannot be deleted")
            boxes = self._account(user)
            if any(n.startswith(box.name + "/") for n in boxes):
                raise MailboxNotEmpty(f"mailbox {box.name} has children")
            del boxes[box.name]
            self._emit(user, box.name, "delete")

        return self._call(go)

    def renameMailbox(self, user, oldName, newName):
        def go():
            box = self._mailbox(user, oldName)
            boxes = self._account(user)
            new = validateMailboxName(newName)
            if new in boxes:
                raise MailboxExists(f"mailbox exists: {new}")
            if box.name == "INBOX":
                moved = _Mailbox(new, next(_uidvalidities))
                for uid, m in sorted(box.messages.items()):
                    moved.highestModseq += 1
                    moved.messages[moved.uidnext] = _Message(
                        moved.uidnext, m.content, m.flags, m.internalDate, moved.highestModseq, m.structure
                    )
                    moved.uidnext += 1
                boxes[new] = moved
                gone = sorted(box.messages)
                if gone:
                    box.highestModseq += 1
                for u in gone:
                    box.vanished[u] = box.highestModseq
                box.messages.clear()
                box.recent.clear()
                if gone:
                    self._emit(user, "INBOX", "expunge", gone)
                self._emit(user, new, "create")
                return
            old = box.name
            if old != "INBOX":
                for name in sorted(boxes):
                    if name == old or name.startswith(old + "/"):
                        child = boxes.pop(name)
                        child.name = new + name[len(old):]
                        boxes[child.name] = child
                        self._emit(user, name, "rename", newName=child.name)

        return self._call(go)

    def setSubscribed(self, user, name, subscribed):
        def go():
            self._account(user)
            canon = validateMailboxName(name)
            subs = self._subscriptions.setdefault(user, set())
            (subs.add if subscribed else subs.discard)(canon)

        return self._call(go)

    def listSubscriptions(self, user):
        return self._call(lambda: sorted(self._subscriptions.get(user, ())) if self._account(user) is not None else [])

    def appendAll(self, user, mailbox, messages):
        def go():
            box = self._mailbox(user, mailbox)
            contents = []
            for source, _, _ in messages:
                if isinstance(source, (bytes, bytearray, memoryview)):
                    contents.append(bytes(source))
                else:
                    with open(source, "rb") as f:
                        contents.append(f.read())
            self._checkQuota(user, sum(map(len, contents)), len(contents))  # all or none
            uids = []
            for content, (_, flags, internalDate) in zip(contents, messages):
                self.append(user, mailbox, content, flags, internalDate).addCallback(lambda r: uids.append(r[1]))
            return (box.uidvalidity, uids)

        return self._call(go)

    def append(self, user, mailbox, source, flags=(), internalDate=None, deliveryId=None):
        def go():
            box = self._mailbox(user, mailbox)
            if deliveryId is not None and (user, deliveryId) in self._deliveries:
                return self._deliveries[(user, deliveryId)]
            if isinstance(source, (bytes, bytearray, memoryview)):
                content = bytes(source)
            else:
                with open(source, "rb") as f:
                    content = f.read()
            self._checkQuota(user, len(content), 1)
            uid = box.uidnext
            box.uidnext += 1
            box.highestModseq += 1
            structure = _analyze(content)
            m = box.messages[uid] = _Message(
                uid,
                content,
                normaliseFlags(flags),
                float(internalDate if internalDate is not None else self._now()),
                box.highestModseq,
                structure,
                deliveryId,
                _index(content, structure),
            )
            box.recent.add(uid)
            if deliveryId is not None:
                self._deliveries[(user, deliveryId)] = (box.uidvalidity, uid)
            meta = MessageMeta(uid, m.flags, m.internalDate, len(content), m.modseq)
            self._emit(user, box.name, "append", [uid], metas=(meta,))
            return (box.uidvalidity, uid)

        return self._call(go)

    def fetchMeta(self, user, mailbox, uids=None, withStructure=False, changedSince=None):
        def go():
            box = self._mailbox(user, mailbox)
            wanted = sorted(box.messages) if uids is None else sorted(set(uids) & set(box.messages))
            out = []
            for uid in wanted:
                m = box.messages[uid]
                if changedSince is not None and m.modseq <= changedSince:
                    continue
                out.append(
                    MessageMeta(
                        uid, m.flags, m.internalDate, len(m.content), m.modseq, m.structure if withStructure else None
                    )
                )
            return out

        return self._call(go)

    def getContent(self, user, mailbox, uid):
        def go():
            box = self._mailbox(user, mailbox)
            return box.messages[uid].content

        return self._call(go)

    def getContents(self, user, mailbox, uids):
        def go():
            box = self._mailbox(user, mailbox)
            return {u: box.messages[u].content for u in sorted(set(uids)) if u in box.messages}

        return self._call(go)

    def selectData(self, user, mailbox):
        def go():
            box = self._mailbox(user, mailbox)
            uids = tuple(sorted(box.messages))
            return SelectData(
                box.info(box.name in self._subscriptions.get(user, set())),
                uids,
                tuple(box.messages[u].flags for u in uids),
                tuple(box.messages[u].modseq for u in uids),
                tuple(sorted(box.recent)),
            )

        return self._call(go)

    def storeFlags(self, user, mailbox, uids, mode, flags, unchangedSince=None):
        def go():
            box = self._mailbox(user, mailbox)
            changes, failed, changed = [], [], []
            for uid in sorted(set(uids) & set(box.messages)):
                m = box.messages[uid]
                if unchangedSince is not None and m.modseq > unchangedSince:
                    failed.append(uid)
                    continue
                new = applyFlags(m.flags, mode, flags)
                if new != m.flags:
                    box.highestModseq += 1
                    m.flags = new
                    m.modseq = box.highestModseq
                    changed.append(uid)
                changes.append(FlagChange(uid, m.flags, m.modseq))
            if changed:
                self._emit(
                    user, box.name, "flags", changed, changes=tuple(c for c in changes if c.uid in set(changed))
                )
            return changes, failed

        return self._call(go)

    def expunge(self, user, mailbox, uids=None):
        def go():
            box = self._mailbox(user, mailbox)
            candidates = box.messages if uids is None else set(uids) & set(box.messages)
            gone = sorted(u for u in candidates if "\\Deleted" in box.messages[u].flags)
            if gone:
                box.highestModseq += 1
            for u in gone:
                del box.messages[u]
                box.recent.discard(u)
                box.vanished[u] = box.highestModseq
            if gone:
                self._emit(user, box.name, "expunge", gone)
            return gone

        return self._call(go)

    def copy(self, user, mailbox, uids, destination, move=False):
        def go():
            src = self._mailbox(user, mailbox)
            dst = self._mailbox(user, destination)
            mapping = []
            metas = []
            chosen = sorted(set(uids) & set(src.messages))
            if not move:
                self._checkQuota(user, sum(len(src.messages[u].content) for u in chosen), len(chosen))
            for uid in chosen:
                m = src.messages[uid]
                dst.highestModseq += 1
                new = dst.uidnext
                dst.uidnext += 1
                dst.messages[new] = _Message(
                    new, m.content, m.flags, m.internalDate, dst.highestModseq, m.structure, None, m.index
                )
                dst.recent.add(new)
                mapping.append((uid, new))
                metas.append(MessageMeta(new, m.flags, m.internalDate, len(m.content), dst.highestModseq))
            if mapping:
                self._emit(user, dst.name, "append", [n for _, n in mapping], metas=tuple(metas))
            if move and mapping:
                src.highestModseq += 1
                for uid, _ in mapping:
                    del src.messages[uid]
                    src.recent.discard(uid)
                    src.vanished[uid] = src.highestModseq
                self._emit(user, src.name, "expunge", [u for u, _ in mapping])
            return dst.uidvalidity, mapping

        return self._call(go)

    def claimRecent(self, user, mailbox):
        def go():
            box = self._mailbox(user, mailbox)
            recent = sorted(box.recent)
            box.recent.clear()
            return recent

        return self._call(go)

    def addListener(self, user, listener):
        return self._listeners.add(user, listener)

    # --- optional interfaces -------------------------------------------

    def search(self, user, mailbox, query):
        def go():
            box = self._mailbox(user, mailbox)
            return [uid for uid, m in sorted(box.messages.items()) if matchesIndex(query, m)]

        return self._call(go)

    def indexData(self, user, mailbox, uids=None):
        def go():
            box = self._mailbox(user, mailbox)
            wanted = sorted(box.messages) if uids is None else sorted(set(uids) & set(box.messages))
            out = {}
            for uid in wanted:
                m = box.messages[uid]
                entry = {k: v for k, v in m.index.items() if not k.startswith("_")}
                entry["size"] = len(m.content)
                entry["internalDate"] = m.internalDate
                out[uid] = entry
            return out

        return self._call(go)

    def getQuota(self, user):
        def go():
            storage, messages = self._quotas.get(user, (None, None))
            usedBytes, usedMessages = self._usage(user)
            return Quota(usedBytes, storage, usedMessages, messages)

        return self._call(go)

    def setQuota(self, user, storage=None, messages=None):
        def go():
            self._account(user)
            self._quotas[user] = (storage, messages)

        return self._call(go).addCallback(lambda _: self.getQuota(user))

    def vanishedSince(self, user, mailbox, modseq):
        def go():
            box = self._mailbox(user, mailbox)
            return sorted(u for u, m in box.vanished.items() if m > modseq)

        return self._call(go)

    def openContent(self, user, mailbox, uid):
        import io

        def go():
            return io.BytesIO(self._mailbox(user, mailbox).messages[uid].content)

        return self._call(go)


@implementer(IQueueTransaction)
class _MemoryTransaction:
    def __init__(self, queue, envelope):
        self._queue = queue
        self._envelope = envelope
        self._chunks = []
        self._done = False

    def write(self, data):
        if self._done:
            raise RuntimeError("transaction already finished")
        self._chunks.append(bytes(data))

    def commit(self):
        if self._done:
            return defer.fail(RuntimeError("transaction already finished"))
        self._done = True
        if self._queue.failNext is not None:
            exc, self._queue.failNext = self._queue.failNext, None
            return defer.fail(exc)
        qid = uuid.uuid4().hex[:16].upper()
        content = b"".join(self._chunks)
        self._queue.committed.append((qid, self._envelope, content))
        return defer.succeed(qid)

    def abort(self):
        self._done = True
        self._chunks = []


@implementer(IQueue)
class MemoryQueue:
    """
    An L{IQueue} that keeps committed messages in C{committed} as
    C{(queueId, envelope, content)} tuples.  Set C{failNext} to an exception
    to make the next commit fail with it.
    """

    def __init__(self):
        self.committed = []
        self.failNext = None

    def open(self):
        return defer.succeed(None)

    def close(self):
        return defer.succeed(None)

    def begin(self, envelope):
        return _MemoryTransaction(self, envelope)

    def due(self, now, limit=100):
        return defer.succeed(
            [QueueEntry(q, e, "", len(c), now, 0, tuple(e.recipients)) for q, e, c in self.committed[:limit]]
        )

    def settle(self, queueId, delivered, failed, deferred, retryAt=None, done=(), warned=()):
        if not deferred:
            self.committed = [t for t in self.committed if t[0] != queueId]
        return defer.succeed(None)

    def listEntries(self):
        return self.due(0, limit=len(self.committed))


@implementer(IRouter)
class StaticRouter:
    """
    Routes C{user@domain} for the given local domains to the account of that
    name if it is in C{users}; unknown local users get 550 5.1.1; other
    domains are relayed only when authenticated, else 550 5.7.1.
    """

    def __init__(self, domains=("example.org",), users=(), aliases=None):
        self.domains = {d.lower() for d in domains}
        self.users = {u.lower() for u in users}
        self.aliases = {k.lower(): v for k, v in (aliases or {}).items()}

    def isLocalDomain(self, domain):
        return domain.lower().rstrip(".") in self.domains

    def route(self, request):
        address = request.address
        if "@" not in address:
            return Route.reject(550, "5.1.3", "Bad recipient address syntax")
        local, _, domain = address.rpartition("@")
        key = f"{local.lower()}@{domain.lower()}"
        if self.isLocalDomain(domain):
            if key in self.users:
                return Route.deliver(LocalDestination(key))
            if key in self.aliases:
                return Route.deliver(*[LocalDestination(t) for t in self.aliases[key]])
            return Route.reject(550, "5.1.1", "No such user here")
        if request.authenticated or request.trusted:
            return Route.deliver(RemoteDestination(address))
        return Route.reject(550, "5.7.1", "Relaying denied")


def memoryPortal(users: dict) -> Portal:
    """A portal whose checker knows C{users} (name -> password, both str)."""
    checker = InMemoryUsernamePasswordDatabaseDontUse(
        **{k: v.encode("utf-8") for k, v in users.items()}
    )
    checker.requestAvatarId = _decodingChecker(checker.requestAvatarId)
    return Portal(MailRealm(), [checker])


def _decodingChecker(inner):
    def requestAvatarId(credentials):
        # The in-memory checker keeps its user names as bytes (it encodes the
        # str keywords it was given), so both forms of name are accepted here.
        from twisted.cred.credentials import UsernamePassword

        name = credentials.username
        name = name if isinstance(name, bytes) else name.encode("utf-8")
        password = credentials.password
        password = password if isinstance(password, bytes) else password.encode("utf-8")
        d = inner(UsernamePassword(name, password))
        return d.addCallback(lambda a: a.decode("utf-8") if isinstance(a, bytes) else a)

    return requestAvatarId
