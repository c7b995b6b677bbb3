"""
The IMAP4rev1 server (RFC 3501) on an L{IMessageStore}.

L{IMAPFactory} builds one L{IMAPServerProtocol} per connection: a thin
Twisted protocol around the session state (not authenticated,
authenticated, selected, logout).  Parsing is done by the sans-IO
L{mailplat.imap.wire} module; FETCH items by L{mailplat.imap.fetch};
SEARCH by L{mailplat.imap.search}.

Commands: CAPABILITY, NOOP, LOGOUT, STARTTLS, LOGIN, AUTHENTICATE (SASL
registry; SASL-IR, RFC 4959), SELECT, EXAMINE, CREATE, DELETE, RENAME,
SUBSCRIBE, UNSUBSCRIBE, LIST, LSUB (CHILDREN, RFC 3348; special-use
attributes, RFC 6154), STATUS, APPEND, CHECK, CLOSE, UNSELECT (RFC 3691),
EXPUNGE, SEARCH, FETCH, STORE, COPY and their UID forms, UID EXPUNGE and the
APPENDUID/COPYUID response codes (UIDPLUS, RFC 4315), LITERAL+ (RFC 7888).
Extensions: IDLE (RFC 2177), NAMESPACE (RFC 2342; the shared namespace of
L{mailplat.imap.shared} when configured),
ID (RFC 2971), ENABLE (RFC 5161), MOVE (RFC 6851), CONDSTORE and QRESYNC
(RFC 7162: MODSEQ, CHANGEDSINCE, UNCHANGEDSINCE/MODIFIED, SEARCH MODSEQ,
SELECT (QRESYNC ...), VANISHED), CREATE-SPECIAL-USE (RFC 6154),
LIST-EXTENDED (RFC 5258) and LIST-STATUS (RFC 5819), ESEARCH (RFC 4731),
SEARCHRES (RFC 5182), WITHIN (RFC 5032), SORT and SORT=DISPLAY (RFC 5256,
RFC 5957), THREAD=ORDEREDSUBJECT and THREAD=REFERENCES (RFC 5256),
MULTIAPPEND (RFC 3502, all or nothing), BINARY (RFC 3516: BINARY[],
BINARY.SIZE, literal8 in APPEND), UTF8=ACCEPT (RFC 6855), APPENDLIMIT
(RFC 7889), QUOTA (RFC 9208, when the store provides IQuotaStore; SETQUOTA
is refused: quotas are the administrator's), COMPRESS=DEFLATE (RFC 4978).
Response codes follow RFC 5530.

Behaviour worth knowing:
  - Commands are executed one at a time, in the order received; the parser
    is only asked for the next command when the previous one is answered,
    so the bytes after STARTTLS are still unparsed when TLS starts, and are
    thrown away.
  - Plaintext authentication (LOGIN, AUTHENTICATE PLAIN/LOGIN) before TLS is
    refused (LOGINDISABLED is advertised) unless the connection is to a
    loopback address or the factory says C{allowInsecureAuth=True}.
  - Changes made by other sessions (store listeners) are announced as
    untagged EXISTS/RECENT/EXPUNGE/FETCH FLAGS at the end of a command;
    EXPUNGE is held back after FETCH, STORE and SEARCH (RFC 3501 7.4.1) and
    sent after the next other command.
  - The first session to select a mailbox claims its \\Recent messages
    (store.claimRecent); EXAMINE claims nothing and reports the count only.
  - Internal dates are shown in UTC; a sequence number beyond the mailbox
    is a BAD command; a FETCH of messages expunged meanwhile answers the
    others and ends with C{NO [EXPUNGEISSUED]}.
  - After too many failed logins or consecutive bad commands the server says
    BYE and closes the connection.
  - Reading is paused while a command runs and more than L{MAX_BUFFERED}
    octets wait unparsed.

Also:
  - SEARCH, SORT and THREAD are answered from the store's index
    (L{ISearchIndex}) when it has one; otherwise messages are read.
  - FETCH of metadata only is built from one store read and written in one
    go; other FETCHes are written in chunks that wait for the transport
    (a push producer), and a whole message above L{STREAM_THRESHOLD} is
    streamed from its file (L{IContentStore}).
  - IDLE sessions get other sessions' and deliveries' changes at once, from
    the detail carried by store events (no store read per session);
    \\Recent goes to the first session told (L{IMAPFactory.claimRecent}).
  - A selected mailbox renamed by another session is followed under its
    new name; one deleted ends the session with BYE.
"""

from __future__ import annotations

import base64
import bisect
import collections
import dataclasses
import functools
import itertools
import re
import zlib
from dataclasses import dataclass, field

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, ServerFactory

from mailplat.log import Logger
from twisted.python.failure import Failure

from zope.interface import implementer

from mailplat import tls
from mailplat.net import IdleTimer, WriteGate, writeNow
from mailplat.auth.sasl import Challenge, Credentials, Registry, SASLError, decodeResponse
from mailplat.imap import fetch as fetchmod
from mailplat.imap import search as searchmod
from mailplat.imap import thread as threadmod
from mailplat.imap import wire
from mailplat.imap.shared import NotInNamespace, SharedNamespace
from mailplat.interfaces.auth import IMailAccount
from mailplat.interfaces.storage import (
    SPECIAL_USES,
    SYSTEM_FLAGS,
    IBatchReadStore,
    IMultiAppendStore,
    IContentStore,
    IEnvelopeStore,
    IQuotaStore,
    ISearchIndex,
    IVanishedStore,
    InvalidMailboxName,
    MailboxExists,
    MailboxNotEmpty,
    NoSuchAccount,
    NoSuchMailbox,
    QuotaExceeded,
    StoreError,
    TemporaryStoreFailure,
    validateMailboxName,
)

_log = Logger()

DELIMITER = "/"
BASE_CAPABILITIES = (
    "IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE", "UNSELECT", "UIDPLUS", "CHILDREN",
    "SPECIAL-USE", "CREATE-SPECIAL-USE", "LIST-EXTENDED", "LIST-STATUS", "MOVE", "CONDSTORE", "QRESYNC",
    "ESEARCH", "SEARCHRES", "WITHIN", "SORT", "SORT=DISPLAY", "THREAD=ORDEREDSUBJECT", "THREAD=REFERENCES",
    "MULTIAPPEND", "BINARY", "UTF8=ACCEPT",
)
#: Capabilities ENABLE knows (RFC 5161).
ENABLEABLE = ("CONDSTORE", "QRESYNC", "UTF8=ACCEPT")
#: Messages larger than this are streamed from their file with back-pressure.
STREAM_THRESHOLD = 256 * 1024
#: FETCH output is written in chunks of about this size.
WRITE_CHUNK = 64 * 1024
#: A FETCH of metadata and ENVELOPE for at most this many messages is
#: answered in one piece from a template (a bigger one item by item, with
#: back-pressure).
ENVELOPES_AT_ONCE = 200
#: Seconds a claim of new messages' \Recent waits to be written to the store,
#: with the others of the same mailbox (see L{IMAPFactory.claimRecentInStore}).
STORE_CLAIM_DELAY = 0.5
_RECENT = frozenset(("\\Recent",))

#: \Recent claims remembered per factory (see L{IMAPFactory.claimRecent}).
MAX_RECENT_CLAIMS = 100000
MAX_AUTH_FAILURES = 5
MAX_BAD_COMMANDS = 20
#: Unparsed input held while a command runs before reading is paused.
MAX_BUFFERED = 1024 * 1024

_ANY = ("CAPABILITY", "NOOP", "LOGOUT")
_NOT_AUTH = ("STARTTLS", "LOGIN", "AUTHENTICATE")
_ANY = _ANY + ("ID",)
_AUTH = (
    "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB", "STATUS", "APPEND",
    "NAMESPACE", "ENABLE", "IDLE", "GETQUOTA", "GETQUOTAROOT", "SETQUOTA",
    "COMPRESS",  # RFC 4978 §5: command-auth
)
_SELECTED = ("CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE", "SORT", "THREAD")
#: Commands after which EXPUNGE may not be sent (RFC 3501 7.4.1); their UID forms may.
_NO_EXPUNGE_AFTER = ("FETCH", "STORE", "SEARCH", "SORT", "THREAD")


class _Reply(Exception):
    """Raised by a command handler to end the command with this status."""

    def __init__(self, status: str, text: str):
        super().__init__(text)
        self.status = status
        self.text = text


class _Known:
    """
    UID -> C{(flags, modseq)} last shown to the client: the arrays read at
    SELECT (shared, never copied into per-message objects: a SELECT of a
    big mailbox stays cheap) under the changes recorded since.
    """

    __slots__ = ("_uids", "_flags", "_modseqs", "_over", "_gone")

    def __init__(self, uids=(), flags=(), modseqs=()):
        self._uids, self._flags, self._modseqs = uids, flags, modseqs
        self._over: dict = {}
        self._gone: set = set()

    def get(self, uid, default=None):
        value = self._over.get(uid)
        if value is not None:
            return value
        uids = self._uids
        i = bisect.bisect_left(uids, uid)
        if i < len(uids) and uids[i] == uid and uid not in self._gone:
            return (self._flags[i], self._modseqs[i])
        return default

    def __contains__(self, uid):
        return self.get(uid) is not None

    def __getitem__(self, uid):
        value = self.get(uid)
        if value is None:
            raise KeyError(uid)
        return value

    def __setitem__(self, uid, value):
        self._over[uid] = value
        self._gone.discard(uid)

    def pop(self, uid, default=None):
        value = self.get(uid)
        self._over.pop(uid, None)
        self._gone.add(uid)
        return default if value is None else value


@dataclass
class _Selected:
    """A selected mailbox as this session's client knows it."""

    name: str  # the owner's name for it
    readOnly: bool
    uidvalidity: int = 0
    owner: str = ""  # the account whose mailbox it is (another's, in the shared namespace)
    uids: list = field(default_factory=list)  # seq - 1 -> uid, ascending
    known: _Known = field(default_factory=_Known)  # uid -> (flags, modseq) last shown
    recent: set = field(default_factory=set)
    pendingAppend: set = field(default_factory=set)
    pendingFlags: set = field(default_factory=set)
    pendingExpunge: set = field(default_factory=set)
    appendMetas: dict = field(default_factory=dict)  # uid -> MessageMeta from events
    flagChanges: dict = field(default_factory=dict)  # uid -> FlagChange from events
    recentWon: set = field(default_factory=set)  # \Recent claimed for this session, not yet announced
    gone: bool = False  # deleted by another session
    highest: int = 0  # the highest MODSEQ this session has taken in
    resync: bool = False  # another process changed the mailbox: read back what
    saved: list = field(default_factory=list)  # SEARCHRES: the UIDs of $

    def seqOf(self, uid: int):
        i = bisect.bisect_left(self.uids, uid)
        if i < len(self.uids) and self.uids[i] == uid:
            return i + 1
        return None

    def flagsOf(self, uid: int, flags) -> list:
        out = list(flags)
        if uid in self.recent:
            out.append("\\Recent")
        return out


@implementer(IPushProducer)
class _WriteProducer:
    """Tells a session when the transport's write buffer is full (FETCH back-pressure)."""

    def __init__(self, session):
        self._session = session

    def pauseProducing(self):
        self._session._pauseWrites()

    def resumeProducing(self):
        self._session._resumeWrites()

    def stopProducing(self):
        self._session._resumeWrites()


class IMAPServerProtocol(Protocol):
    """One IMAP session."""

    def __init__(self, factory: "IMAPFactory"):
        self.factory = factory
        self._reactor = factory.reactor
        self._parser = wire.CommandParser(maxLiteral=factory.maxLiteralSize)
        self._state = "notauth"
        self._busy = False
        self._pumping = False
        self._closed = False
        self._paused = False
        self._tls = False
        self._idle = IdleTimer(self._reactor, factory.idleTimeout, self._timedOut)
        self._gate = WriteGate(self._reactor, self._writesDrained, lambda: self._closed)
        self._user = None
        self._avatarLogout = None
        self._removeListener = None
        self._sharedListener = None
        self._selected: _Selected | None = None
        self._lineWaiter = None
        self._authFailures = 0
        self._badCommands = 0
        self._closeAfterReply = None
        self._enabled: set = set()
        self._condstore = False
        self._idling = False
        self._flushLock = defer.DeferredLock()
        self._flushQueued = False
        self._deflate = None
        self._inflate = None
        self._writePaused = False
        self._writeWaiters: list = []
        self._producing = False
        #: While a command runs, what it writes waits here and goes out in
        #: one write with its tagged answer (one system call, and one
        #: wake-up of the client, instead of one per piece); None when
        #: writes go out at once.
        self._cork: list | None = None
        self._corked = 0

    # --- write back-pressure (an IPushProducer for the transport) --------

    def _pauseWrites(self):
        self._writePaused = True

    def _resumeWrites(self):
        self._writePaused = False
        waiters, self._writeWaiters = self._writeWaiters, []
        for d in waiters:
            d.callback(None)


    def _startProducing(self):
        if not self._producing and not self._closed and hasattr(self.transport, "registerProducer"):
            try:
                self.transport.registerProducer(_WriteProducer(self), True)
                self._producing = True
            except RuntimeError:
                pass

    def _stopProducing(self):
        if self._producing:
            self._producing = False
            if not self._closed:
                self.transport.unregisterProducer()
            self._resumeWrites()

    def _drain(self):
        """A Deferred that fires once the transport wants more data (at once if it does)."""
        self._flushCork()
        if not self._writePaused or self._closed:
            return defer.succeed(None)
        d = defer.Deferred()
        self._writeWaiters.append(d)
        return d

    # --- connection -----------------------------------------------------

    def connectionMade(self):
        if self.factory.metrics is not None:
            self.factory.metrics.sessionOpened("imap")
        peer = self.transport.getPeer()
        _log.debug("IMAP connection from {peer}", peer=peer)
        self._resetTimer()
        self._send(
            b"* OK [CAPABILITY "
            + self._capabilities()
            + b"] "
            + self.factory.hostname.encode("ascii", "replace")
            + b" IMAP4rev1 mailplat ready\r\n"
        )

    def dataReceived(self, data):
        if self._closed or self._state == "logout":
            return
        self._resetTimer()
        if self._inflate is not None:
            try:
                data = self._inflate.decompress(data)
            except zlib.error:
                _log.info("IMAP COMPRESS stream corrupt; closing")
                self._inflate = None
                self._deflate = None
                self.transport.loseConnection()
                return
        self._parser.feed(data)
        self._pump()

    def connectionLost(self, reason=None):
        if self._closed:
            return
        self._closed = True
        self._idle.cancel()
        self._gate.stop()
        self._endLogin()
        self._resumeWrites()
        if self._lineWaiter is not None:
            waiter, self._lineWaiter = self._lineWaiter, None
            waiter.callback(None)
        if self.factory.metrics is not None:
            self.factory.metrics.sessionClosed("imap")

    def _endLogin(self):
        if self._sharedListener is not None:
            remove, self._sharedListener = self._sharedListener, None
            remove()
        if self._removeListener is not None:
            self._removeListener()
            self._removeListener = None
        if self._avatarLogout is not None:
            logout, self._avatarLogout = self._avatarLogout, None
            try:
                logout()
            except Exception:
                _log.failure("avatar logout failed")

    def _send(self, data: bytes):
        if not self._closed and self.transport is not None and data:
            if self._deflate is not None:
                data = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
            if self._cork is not None:
                self._cork.append(data)
                self._corked += len(data)
                if self._corked >= WRITE_CHUNK:
                    self._flushCork()
                return
            writeNow(self.transport, data)

    def _flushCork(self):
        """Write what the running command has written so far (it stays corked)."""
        if self._cork:
            data = b"".join(self._cork)
            self._cork = []
            self._corked = 0
            if not self._closed and self.transport is not None:
                writeNow(self.transport, data)

    def _uncork(self):
        """Write what waits, and write at once from now on."""
        self._flushCork()
        self._cork = None

    def _close(self):
        self._state = "logout"
        if not self._closed:
            self._uncork()
            self.transport.loseConnection()

    def _resetTimer(self):
        if not self._closed:
            self._idle.touch()

    def _timedOut(self):
        if self._closed:
            return
        if self._busy and self._lineWaiter is None and not self._idling:
            # A slow command is not idleness: wait for it to finish.
            self._resetTimer()
            return
        _log.info("IMAP session idle too long; closing")
        self._send(b"* BYE Autologout; idle for too long\r\n")
        self._close()

    def _secure(self) -> bool:
        return self._tls or tls.isTLS(self.transport)

    def _plaintextAllowed(self) -> bool:
        if self._secure():
            return True
        allow = self.factory.allowInsecureAuth
        if allow is None:
            return tls.isLoopback(self.transport)
        return bool(allow)

    def _capabilities(self) -> bytes:
        caps = list(BASE_CAPABILITIES)
        caps.append(f"APPENDLIMIT={self.factory.maxLiteralSize}")
        if self._deflate is None:
            caps.append("COMPRESS=DEFLATE")
        if IQuotaStore.providedBy(self.factory.store):
            caps += ["QUOTA", "QUOTA=RES-STORAGE", "QUOTA=RES-MESSAGE"]
        if self._state == "notauth":
            if self.factory.tlsContextFactory is not None and not self._secure():
                caps.append("STARTTLS")
            allowed = self._plaintextAllowed()
            if not allowed:
                caps.append("LOGINDISABLED")
            caps += ["AUTH=" + n for n in self.factory.sasl.available(allowed)]
        return " ".join(caps).encode("ascii")

    # --- the command loop -----------------------------------------------

    def _pump(self):
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._closed and self._state != "logout":
                waiting = self._lineWaiter is not None
                if self._busy and not waiting:
                    break
                if not waiting and self._gate.blocked(self.transport):
                    break  # replies wait unsent: no more commands until the client reads them
                event = self._parser.nextEvent()
                if event is None:
                    break
                if waiting:
                    waiter, self._lineWaiter = self._lineWaiter, None
                    waiter.callback(event)
                    continue
                if isinstance(event, wire.NeedContinuation):
                    self._send(b"+ Ready for literal data\r\n")
                elif isinstance(event, wire.BadCommand):
                    self._badCommand(event)
                elif isinstance(event, wire.RawLine):
                    # Only read while an exchange waits for it; never a command.
                    self._badCommand(wire.BadCommand(None, "Unexpected line"))
                elif isinstance(event, wire.Command):
                    self._busy = True
                    d = defer.Deferred.fromCoroutine(self._run(event))
                    d.addBoth(self._commandDone)
            if self._busy and not self._paused and self._parser.buffered > MAX_BUFFERED and not self._closed:
                self._paused = True
                self.transport.pauseProducing()
            elif self._paused and (not self._busy or self._parser.buffered <= MAX_BUFFERED):
                self._paused = False
                if not self._closed and not self._gate.waiting:
                    self.transport.resumeProducing()
        finally:
            self._pumping = False

    def _writesDrained(self):
        if self._closed:
            return
        if not self._paused:
            self.transport.resumeProducing()
        self._pump()

    def _commandDone(self, result):
        if isinstance(result, Failure):
            _log.failure("IMAP command failed unexpectedly", result)
        self._busy = False
        self._resetTimer()
        self._pump()

    def _badCommand(self, event: wire.BadCommand):
        self._badCommands += 1
        tag = event.tag.encode("ascii") if event.tag else b"*"
        status = b"NO" if event.no else b"BAD"
        code = b"[" + event.code.encode("ascii") + b"] " if event.code else b""
        self._send(tag + b" " + status + b" " + code + event.text.encode("ascii", "replace") + b"\r\n")
        if self._badCommands >= MAX_BAD_COMMANDS:
            self._send(b"* BYE Too many invalid commands\r\n")
            self._close()

    async def _run(self, cmd: wire.Command):
        tag = cmd.tag.encode("ascii")
        name = cmd.name
        state = self._state
        if name in _ANY:
            allowed = True
        elif name in _NOT_AUTH:
            allowed = state == "notauth"
        elif name in _AUTH:
            allowed = state in ("auth", "selected")
        else:
            allowed = state == "selected"
        if not allowed:
            self._badCommand(wire.BadCommand(cmd.tag, f"{name} not allowed now"))
            return
        self._badCommands = 0
        handler = getattr(self, "cmd_" + name)
        self._cork = []
        try:
            await self._runCorked(cmd, tag, name, handler)
        finally:
            self._uncork()

    async def _runCorked(self, cmd, tag, name, handler):
        try:
            result = await handler(cmd)
        except _Reply as r:
            result = (r.status, r.text)
        except StoreError as e:
            result = self._storeError(e, cmd)
        except Exception:
            _log.failure("IMAP command {name} failed", name=name)
            result = ("NO", "[SERVERBUG] Internal server error")
        if result is None or self._closed:
            return
        status, text = result
        try:
            allowExpunge = cmd.uid or name not in _NO_EXPUNGE_AFTER
            await self._flushUpdates(allowExpunge)
        except Exception:
            _log.failure("IMAP mailbox update failed")
        self._send(tag + b" " + status.encode("ascii") + b" " + text.encode("utf-8") + b"\r\n")
        # The whole answer goes out before a STARTTLS or COMPRESS takes over.
        self._uncork()
        if self._closeAfterReply is not None:
            self._send(self._closeAfterReply)
            self._close()
        after = getattr(self, "_afterReply", None)
        if after is not None:
            self._afterReply = None
            after()

    def _storeError(self, e: StoreError, cmd):
        _log.info("IMAP {name} refused by the store: {error}", name=cmd.name, error=str(e))
        safe = str(e).replace("\r", " ").replace("\n", " ")[:200] or "Operation failed"
        if isinstance(e, NoSuchMailbox):
            code = "TRYCREATE" if cmd.name in ("APPEND", "COPY", "MOVE") else "NONEXISTENT"
        elif isinstance(e, MailboxExists):
            code = "ALREADYEXISTS"
        elif isinstance(e, MailboxNotEmpty):
            # RFC 9051 §7.1: a DELETE refused because of inferior names.
            code = "HASCHILDREN"
        elif isinstance(e, InvalidMailboxName):
            code = "CANNOT"
        elif isinstance(e, QuotaExceeded):
            code = "OVERQUOTA"
        elif isinstance(e, (TemporaryStoreFailure, NoSuchAccount)):
            code = "UNAVAILABLE"
        else:
            return ("NO", safe)
        return ("NO", f"[{code}] {safe}")

    def _readLine(self):
        """A Deferred firing with the next raw line event (AUTHENTICATE)."""
        # The client answers what it has been sent (a challenge, "+ idling"),
        # and what IDLE announces must go out as it happens.
        self._uncork()
        self._parser.expectRawLine()
        waiter = self._lineWaiter = defer.Deferred()
        self._pump()
        return waiter

    # --- any state ------------------------------------------------------

    async def cmd_CAPABILITY(self, cmd):
        self._send(b"* CAPABILITY " + self._capabilities() + b"\r\n")
        return ("OK", "CAPABILITY completed")

    async def cmd_NOOP(self, cmd):
        return ("OK", "NOOP completed")

    async def cmd_LOGOUT(self, cmd):
        self._send(b"* BYE IMAP4rev1 Server logging out\r\n")
        self._send(cmd.tag.encode("ascii") + b" OK LOGOUT completed\r\n")
        self._close()
        return None

    # --- not authenticated ----------------------------------------------

    async def cmd_STARTTLS(self, cmd):
        if self.factory.tlsContextFactory is None or self._secure():
            return ("BAD", "STARTTLS not available")
        self._send(cmd.tag.encode("ascii") + b" OK Begin TLS negotiation now\r\n")
        self._uncork()  # in the clear, before TLS starts
        # Anything the client sent after STARTTLS in the clear is discarded.
        self._parser.discardBuffered()
        self.transport.startTLS(self.factory.tlsContextFactory)
        self._tls = True
        return None

    async def cmd_LOGIN(self, cmd):
        if not self._plaintextAllowed():
            return ("NO", "[PRIVACYREQUIRED] Plaintext authentication is disabled on unencrypted connections")
        try:
            cmd.args["user"].decode("utf-8")
            cmd.args["password"].decode("utf-8")
        except UnicodeDecodeError:
            return self._authFailed()
        creds = UsernamePassword(cmd.args["user"], cmd.args["password"])
        return await self._login(creds)

    async def cmd_AUTHENTICATE(self, cmd):
        mech = self.factory.sasl.create(cmd.args["mechanism"])
        if mech is None:
            return ("NO", "Unsupported authentication mechanism")
        if getattr(mech, "plaintext", False) and not self._plaintextAllowed():
            return ("NO", "[PRIVACYREQUIRED] Plaintext authentication is disabled on unencrypted connections")
        initial = cmd.args["initial"]
        if initial is None:
            response = None
        elif initial == b"=":
            response = b""
        else:
            try:
                response = decodeResponse(initial)
            except ValueError:
                return ("BAD", "Invalid base64 in initial response")
        for _ in range(20):
            try:
                result = mech.step(response)
            except SASLError as e:
                _log.info("SASL exchange failed: {error}", error=str(e))
                return self._authFailed()
            if isinstance(result, Credentials):
                return await self._login(result.credentials)
            if not isinstance(result, Challenge):
                return ("NO", "Authentication failed")
            self._send(b"+ " + base64.b64encode(result.data) + b"\r\n")
            event = await self._readLine()
            if event is None or self._closed:
                return None
            if not isinstance(event, wire.RawLine):
                return ("BAD", "Invalid authentication response")
            line = event.line.strip()
            if line == b"*":
                return ("BAD", "Authentication cancelled")
            try:
                response = decodeResponse(line)
            except ValueError:
                return ("BAD", "Invalid base64 in authentication response")
        return ("NO", "Authentication exchange too long")

    def _authFailed(self):
        self._authFailures += 1
        if self.factory.metrics is not None:
            self.factory.metrics.inc("mailplat_auth_failures_total", protocol="imap")
        if self._authFailures >= MAX_AUTH_FAILURES:
            self._closeAfterReply = b"* BYE Too many authentication failures\r\n"
        return ("NO", "[AUTHENTICATIONFAILED] Authentication failed")

    async def _login(self, creds):
        try:
            iface, avatar, logout = await self.factory.portal.login(creds, None, IMailAccount)
        except (UnauthorizedLogin, UnhandledCredentials):
            return self._authFailed()
        except Exception:
            _log.failure("IMAP login failed unexpectedly")
            return ("NO", "[UNAVAILABLE] Authentication is temporarily unavailable")
        if self._closed:
            logout()
            return None
        self._user = avatar.username
        self._avatarLogout = logout
        self._state = "auth"
        self._removeListener = self.factory.store.addListener(self._user, self._onEvent)
        _log.info("IMAP login {user}", user=self._user)
        return ("OK", "[CAPABILITY " + self._capabilities().decode("ascii") + "] Logged in")

    # --- authenticated --------------------------------------------------

    # --- extensions in any state ------------------------------------------

    async def cmd_ID(self, cmd):
        params = cmd.args["params"]
        if params:
            _log.info("IMAP client ID {params}", params=params)
        info = (("name", "mailplat"), ("vendor", "mailplat"), ("support-url", "https://mailplat.example/"))
        self._send(b"* ID (" + b" ".join(wire.string(k) + b" " + wire.string(v) for k, v in info[:2]) + b")\r\n")
        return ("OK", "ID completed")

    async def cmd_COMPRESS(self, cmd):
        if cmd.args["mechanism"] != "DEFLATE":
            return ("BAD", "Unknown compression mechanism")
        if self._deflate is not None:
            return ("NO", "[COMPRESSIONACTIVE] Compression is already active")
        self._send(cmd.tag.encode("ascii") + b" OK DEFLATE active\r\n")
        self._uncork()  # uncompressed, before compression starts
        self._deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        self._inflate = zlib.decompressobj(-15)
        # What the client pipelined after COMPRESS is already compressed.
        pending = self._parser.takeBuffered() if hasattr(self._parser, "takeBuffered") else b""
        if pending:
            try:
                self._parser.feed(self._inflate.decompress(pending))
            except zlib.error:
                self.transport.loseConnection()
        return None

    # --- authenticated --------------------------------------------------

    async def cmd_NAMESPACE(self, cmd):
        self._send(b'* NAMESPACE (("" "/")) NIL ' + self.factory.shared.namespaceResponse() + b"\r\n")
        return ("OK", "NAMESPACE completed")

    def _locate(self, name):
        """Where a mailbox name leads: L{mailplat.imap.shared.Location} (the account and its name for it)."""
        try:
            return self.factory.shared.locate(self._user, name)
        except NotInNamespace:
            raise _Reply("NO", "[NONEXISTENT] No such mailbox")

    def _refuseShared(self, *names):
        """NO [NOPERM] for a name in the shared namespace: its mailboxes are managed by their owners."""
        for name in names:
            if self.factory.shared.isReserved(name.rstrip(DELIMITER)):
                raise _Reply("NO", "[NOPERM] Mailboxes in the shared namespace are managed by their owners")

    def _select(self, sel):
        """Make C{sel} (or None) the selected mailbox, listening to its owner's events when it is another's."""
        if self._sharedListener is not None:
            remove, self._sharedListener = self._sharedListener, None
            remove()
        self._selected = sel
        if sel is not None and sel.owner != self._user:
            self._sharedListener = self.factory.store.addListener(sel.owner, self._onEvent)

    async def cmd_ENABLE(self, cmd):
        newly = []
        for cap in cmd.args["capabilities"]:
            if cap in ENABLEABLE and cap not in self._enabled:
                self._enabled.add(cap)
                newly.append(cap)
            if cap == "QRESYNC" and "CONDSTORE" not in self._enabled:
                self._enabled.add("CONDSTORE")
        if "CONDSTORE" in self._enabled:
            self._enableCondstore()
        self._send(b"* ENABLED" + b"".join(b" " + c.encode("ascii") for c in newly) + b"\r\n")
        return ("OK", "ENABLE completed")

    def _enableCondstore(self):
        self._condstore = True

    @property
    def _qresync(self) -> bool:
        return "QRESYNC" in self._enabled

    @property
    def _utf8(self) -> bool:
        return "UTF8=ACCEPT" in self._enabled

    def _mbox(self, name: str) -> bytes:
        """A mailbox name for a response: modified UTF-7, or UTF-8 once UTF8=ACCEPT is enabled."""
        if self._utf8:
            return wire.quoted(name.encode("utf-8")) if "\r" not in name and "\n" not in name else wire.string(name)
        return _mailboxName(name)

    async def cmd_IDLE(self, cmd):
        self._send(b"+ idling\r\n")
        self._idling = True
        try:
            self._scheduleFlush()
            while True:
                event = await self._readLine()
                if event is None or self._closed:
                    return None
                if isinstance(event, wire.RawLine) and event.line.strip().upper() == b"DONE":
                    break
                return ("BAD", "Expected DONE")
        finally:
            self._idling = False
        return ("OK", "IDLE terminated")

    def _scheduleFlush(self):
        """Announce pending changes now (while idling), one flush at a time."""
        if self._flushQueued or self._closed:
            return
        self._flushQueued = True

        def run(_=None):
            self._flushQueued = False
            if not self._idling or self._closed:
                return None
            return defer.ensureDeferred(self._flushUpdates(True))

        d = self._flushLock.acquire()
        d.addCallback(lambda lock: lock.release())
        d.addCallback(run)
        d.addErrback(lambda f: _log.failure("IMAP IDLE update failed", f))

    async def cmd_GETQUOTAROOT(self, cmd):
        store = self.factory.store
        where = self._locate(cmd.args["mailbox"])
        info = await store.getMailbox(where.owner, where.name)
        if where.shared:
            # Counted against its owner's quota, not one of this user's roots.
            self._send(b"* QUOTAROOT " + self._mbox(cmd.args["mailbox"]) + b"\r\n")
            return ("OK", "GETQUOTAROOT completed")
        if not IQuotaStore.providedBy(store):
            self._send(b"* QUOTAROOT " + self._mbox(info.name) + b"\r\n")
            return ("OK", "GETQUOTAROOT completed")
        quota = await store.getQuota(self._user)
        if not self._hasLimits(quota):
            # No limit, no quota root (a QUOTA response names at least one
            # resource, RFC 9208 §9).
            self._send(b"* QUOTAROOT " + self._mbox(info.name) + b"\r\n")
        else:
            self._send(b"* QUOTAROOT " + self._mbox(info.name) + b' ""\r\n' + self._quotaLine(quota))
        return ("OK", "GETQUOTAROOT completed")

    async def cmd_GETQUOTA(self, cmd):
        store = self.factory.store
        if cmd.args["root"] != "" or not IQuotaStore.providedBy(store):
            return ("NO", "[NONEXISTENT] No such quota root")
        quota = await store.getQuota(self._user)
        if not self._hasLimits(quota):
            return ("NO", "[NONEXISTENT] No such quota root")
        self._send(self._quotaLine(quota))
        return ("OK", "GETQUOTA completed")

    async def cmd_SETQUOTA(self, cmd):
        if cmd.args["root"] != "" or not IQuotaStore.providedBy(self.factory.store):
            return ("NO", "[NONEXISTENT] No such quota root")
        return ("NO", "[NOPERM] Quotas are set by the administrator")

    @staticmethod
    def _hasLimits(quota) -> bool:
        return quota.storageLimit is not None or quota.messagesLimit is not None

    @staticmethod
    def _quotaLine(quota) -> bytes:
        items = []
        if quota.storageLimit is not None:
            items.append(b"STORAGE %d %d" % ((quota.storageUsed + 1023) // 1024, quota.storageLimit // 1024))
        if quota.messagesLimit is not None:
            items.append(b"MESSAGE %d %d" % (quota.messagesUsed, quota.messagesLimit))
        return b'* QUOTA "" (' + b" ".join(items) + b")\r\n"

    async def cmd_SELECT(self, cmd, readOnly=False):
        hadSelected = self._selected is not None
        self._select(None)
        self._state = "auth"
        if hadSelected and (self._condstore or self._qresync):
            self._send(b"* OK [CLOSED] Previous mailbox closed\r\n")
        store = self.factory.store
        qresync = cmd.args.get("qresync")
        if qresync is not None and not self._qresync:
            return ("BAD", "QRESYNC is not enabled")
        if "CONDSTORE" in cmd.args.get("params", ()):
            self._enableCondstore()
        where = self._locate(cmd.args["mailbox"])
        readOnly = readOnly or where.readOnly
        if IBatchReadStore.providedBy(store):
            # One read for the mailbox and its index, no per-message objects;
            # the writer is asked to claim \\Recent only when some is left.
            data = await store.selectData(where.owner, where.name)
            info = data.info
            uids, flagSets, modseqs = data.uids, data.flags, data.modseqs
            recentUids = data.recent
        else:
            info = await store.getMailbox(where.owner, where.name)
            metas = await store.fetchMeta(where.owner, info.name)
            uids = [m.uid for m in metas]
            flagSets = [m.flags for m in metas]
            modseqs = [m.modseq for m in metas]
            recentUids = None
        sel = _Selected(info.name, readOnly, info.uidvalidity, owner=where.owner)
        sel.highest = info.highestModseq
        self._select(sel)
        claimed = self.factory.claimedRecent
        if readOnly:
            # Shown, not claimed (RFC 3501 6.3.2); those another session here claimed are not.
            if recentUids is None:
                recentCount = info.recent
            else:
                sel.recent = {u for u in recentUids if not claimed(where.owner, info.name, u)}
        elif recentUids is None or recentUids:
            # Less those a session of this process was told of first (its
            # claim reaches the store a little later: STORE_CLAIM_DELAY).
            sel.recent = {
                u for u in await store.claimRecent(where.owner, info.name) if not claimed(where.owner, info.name, u)
            }
        sel.uids = list(uids)
        sel.known = _Known(tuple(uids), tuple(flagSets), tuple(modseqs))
        if not readOnly or recentUids is not None:
            if sel.recent:
                sel.recent &= set(uids)
            recentCount = len(sel.recent)
        sel.pendingAppend = {u for u in sel.pendingAppend if u not in sel.known}
        keywords = set()
        unseen = None
        for flagSet in set(flagSets):
            for f in flagSet:
                if f[0] != "\\":
                    keywords.add(f)
        for i, flagSet in enumerate(flagSets):
            if "\\Seen" not in flagSet:
                unseen = i + 1
                break
        highest = max(info.highestModseq, max(modseqs, default=0))
        flags = " ".join(list(SYSTEM_FLAGS) + sorted(keywords))
        uidnext = max(info.uidnext, (sel.uids[-1] + 1) if sel.uids else 1)
        out = [
            f"* FLAGS ({flags})",
            f"* OK [PERMANENTFLAGS ({'' if readOnly else flags + ' ' + chr(92) + '*'})] Flags permitted",
            f"* {len(sel.uids)} EXISTS",
            f"* {recentCount} RECENT",
        ]
        if unseen is not None:
            out.append(f"* OK [UNSEEN {unseen}] First unseen")
        out += [
            f"* OK [UIDVALIDITY {info.uidvalidity}] UIDs valid",
            f"* OK [UIDNEXT {uidnext}] Predicted next UID",
            f"* OK [HIGHESTMODSEQ {highest}] Highest",
        ]
        self._send("".join(line + "\r\n" for line in out).encode("utf-8"))
        self._state = "selected"
        if qresync is not None and qresync["uidvalidity"] == info.uidvalidity:
            await self._qresyncSelect(sel, qresync)
        mode = "READ-ONLY" if readOnly else "READ-WRITE"
        return ("OK", f"[{mode}] {cmd.name} completed")

    async def _qresyncSelect(self, sel, q):
        """The VANISHED (EARLIER) and FETCH responses of SELECT ... (QRESYNC ...) (RFC 7162 3.2.5)."""
        store = self.factory.store
        modseq = q["modseq"]
        largest = sel.uids[-1] if sel.uids else 0
        known = q["known"]
        if IVanishedStore.providedBy(store):
            vanished = await store.vanishedSince(sel.owner, sel.name, modseq)
            if known is not None:
                vanished = [u for u in vanished if known.contains(u, max(largest, vanished[-1] if vanished else 0))]
        elif known is not None:
            present = set(sel.uids)
            vanished = [u for u in known.iterate(max(largest, known.maximum(largest))) if u not in present]
        else:
            vanished = []
        if vanished:
            self._send(b"* VANISHED (EARLIER) " + wire.formatSequenceSet(vanished).encode() + b"\r\n")
        changed = await store.fetchMeta(sel.owner, sel.name, None, changedSince=modseq)
        out = []
        for m in changed:
            seq = sel.seqOf(m.uid)
            if seq is None or (known is not None and not known.contains(m.uid, largest)):
                continue
            out.append(wire.fetchResponse(seq, [
                (b"UID", b"%d" % m.uid),
                (b"FLAGS", self._flagBytes(sel, m.uid, m.flags)),
                (b"MODSEQ", b"(%d)" % m.modseq),
            ]))
        self._send(b"".join(out))

    async def cmd_EXAMINE(self, cmd):
        return await self.cmd_SELECT(cmd, readOnly=True)

    async def _createWithParents(self, name, specialUse=None):
        store = self.factory.store
        validateMailboxName(name)  # the whole name first: a refused CREATE makes no parents
        levels = name.split(DELIMITER)
        for i in range(1, len(levels)):
            parent = DELIMITER.join(levels[:i])
            try:
                await store.createMailbox(self._user, parent)
            except MailboxExists:
                pass
        await store.createMailbox(self._user, name, specialUse=specialUse)

    async def cmd_CREATE(self, cmd):
        name = cmd.args["mailbox"].rstrip(DELIMITER)
        if not name:
            return ("NO", "[CANNOT] Invalid mailbox name")
        if name.upper() == "INBOX":
            return ("NO", "[ALREADYEXISTS] INBOX always exists")
        self._refuseShared(name)
        uses = cmd.args.get("use") or []
        canon = {u.lower(): u for u in SPECIAL_USES}
        if len(uses) > 1:
            return ("NO", "[USEATTR] Only one special use per mailbox")
        use = None
        if uses:
            use = canon.get(uses[0].lower())
            if use is None:
                return ("NO", "[USEATTR] Unknown special use")
        await self._createWithParents(name, use)
        return ("OK", "CREATE completed")

    async def cmd_DELETE(self, cmd):
        self._refuseShared(cmd.args["mailbox"])
        await self.factory.store.deleteMailbox(self._user, cmd.args["mailbox"])
        return ("OK", "DELETE completed")

    async def cmd_RENAME(self, cmd):
        store = self.factory.store
        new = cmd.args["new"].rstrip(DELIMITER)
        self._refuseShared(cmd.args["old"], new)
        levels = new.split(DELIMITER)
        info = await store.getMailbox(self._user, cmd.args["old"])
        if info.name != "INBOX" and (new == info.name or new.startswith(info.name + DELIMITER)):
            # Its inferiors would be renamed under themselves.
            return ("NO", "[CANNOT] A mailbox cannot be renamed under itself")
        # Renamed first: a refused RENAME creates nothing; then the new
        # name's missing superiors (RFC 3501 6.3.5).
        await store.renameMailbox(self._user, cmd.args["old"], new)
        for i in range(1, len(levels)):
            parent = DELIMITER.join(levels[:i])
            try:
                await store.createMailbox(self._user, parent)
            except MailboxExists:
                pass
        return ("OK", "RENAME completed")

    async def cmd_SUBSCRIBE(self, cmd):
        await self.factory.store.setSubscribed(self._user, cmd.args["mailbox"], True)
        return ("OK", "SUBSCRIBE completed")

    async def cmd_UNSUBSCRIBE(self, cmd):
        await self.factory.store.setSubscribed(self._user, cmd.args["mailbox"], False)
        return ("OK", "UNSUBSCRIBE completed")

    async def cmd_LIST(self, cmd):
        args = cmd.args
        ref, patterns = args["reference"], args["patterns"]
        if not args["extended"] and not patterns[0]:
            self._send(b'* LIST (\\Noselect) "/" ""\r\n')
            return ("OK", "LIST completed")
        store = self.factory.store
        select, returns = set(args["select"]), set(args["returns"])
        wantSubscribed = "SUBSCRIBED" in select or "SUBSCRIBED" in returns
        infos = await store.listMailboxes(self._user)
        shared = self.factory.shared
        existing = {i.name: i for i in infos if not shared.isReserved(i.name)}
        owners = await self._sharedListing(existing)
        subs = set(await store.listSubscriptions(self._user)) if wantSubscribed else set()
        names = set(existing)
        for n in existing:
            levels = n.split(DELIMITER)
            for i in range(1, len(levels)):
                names.add(DELIMITER.join(levels[:i]))
        if "SUBSCRIBED" in select:
            names |= subs
        matchers = [listMatcher(ref + p) for p in patterns if p]
        parents = set()  # every name with an inferior (listed by "%" as a mailbox or a placeholder)
        for n in existing:
            levels = n.split(DELIMITER)
            for i in range(1, len(levels)):
                parents.add(DELIMITER.join(levels[:i]))
        out = []
        statusOf = []
        for n in sorted(names):
            matched = any(m(n) for m in matchers)
            childInfo = False
            if "SUBSCRIBED" in select:
                if n not in subs:
                    # RECURSIVEMATCH: a parent whose children are subscribed
                    if not ("RECURSIVEMATCH" in select and matched and any(s.startswith(n + DELIMITER) for s in subs)):
                        continue
                    childInfo = True
            if not matched:
                continue
            info = existing.get(n)
            if "SPECIAL-USE" in select and (info is None or not info.specialUse):
                continue
            attrs = []
            if info is None:
                anyChild = any(e.startswith(n + DELIMITER) for e in existing)
                attrs.append("\\Noselect" if anyChild else "\\NonExistent")
            if info is not None or anyChild:
                attrs.append("\\HasChildren" if n in parents else "\\HasNoChildren")
            if wantSubscribed and n in subs:
                attrs.append("\\Subscribed")
            if info is not None and info.specialUse:
                attrs.append(info.specialUse)
            line = b"* LIST (" + " ".join(attrs).encode() + b') "/" ' + self._mbox(n)
            if childInfo:
                line += b' ("CHILDINFO" ("SUBSCRIBED"))'
            out.append(line + b"\r\n")
            if args["status"] and info is not None:
                owner = owners.get(n)
                out.append(await self._statusLine(info, args["status"], owner, n if owner else None))
        self._send(b"".join(out))
        return ("OK", "LIST completed")

    async def _sharedListing(self, existing) -> dict:
        """
        Add the shared mailboxes this user sees to C{existing} (name shown
        -> L{MailboxInfo}); returns their owners by the name shown.
        """
        shared = self.factory.shared
        owners = {}
        byOwner = {}
        for grant in shared.forUser(self._user):
            if grant.owner not in byOwner:
                try:
                    byOwner[grant.owner] = await self.factory.store.listMailboxes(grant.owner)
                except StoreError:
                    _log.warn("shared mailbox {name}: its owner {owner} has no account", name=grant.name,
                              owner=grant.owner)
                    byOwner[grant.owner] = []
            for info in byOwner[grant.owner]:
                shown = shared.displayName(grant, info.name)
                if shown is not None and shown not in owners:
                    existing[shown] = dataclasses.replace(info, specialUse=None)
                    owners[shown] = grant.owner
        return owners

    async def cmd_LSUB(self, cmd):
        ref, pattern = cmd.args["reference"], cmd.args["pattern"]
        if not pattern:
            self._send(b'* LSUB (\\Noselect) "/" ""\r\n')
            return ("OK", "LSUB completed")
        store = self.factory.store
        subs = set(await store.listSubscriptions(self._user))
        matcher = listMatcher(ref + pattern)
        out = []
        candidates = set(subs)
        for n in subs:
            levels = n.split(DELIMITER)
            for i in range(1, len(levels)):
                candidates.add(DELIMITER.join(levels[:i]))
        for n in sorted(candidates):
            if not matcher(n):
                continue
            if n in subs:
                attrs = ""
            elif "%" in pattern and any(s.startswith(n + DELIMITER) and not matcher(s) for s in subs):
                attrs = "\\Noselect"
            else:
                continue
            out.append(b"* LSUB (" + attrs.encode() + b') "/" ' + self._mbox(n) + b"\r\n")
        self._send(b"".join(out))
        return ("OK", "LSUB completed")

    async def _statusLine(self, info, items, owner=None, shown=None) -> bytes:
        """The STATUS response for C{owner}'s mailbox C{info} (this user's by default), named C{shown} if given."""
        owner = owner or self._user
        values = {
            "MESSAGES": info.messages,
            "RECENT": info.recent,
            "UIDNEXT": info.uidnext,
            "UIDVALIDITY": info.uidvalidity,
            "UNSEEN": info.unseen,
            "HIGHESTMODSEQ": info.highestModseq,
            "SIZE": info.size,
            "APPENDLIMIT": self.factory.maxLiteralSize,
        }
        if "HIGHESTMODSEQ" in items:
            self._enableCondstore()
        if "DELETED" in items or "DELETED-STORAGE" in items:
            metas = await self.factory.store.fetchMeta(owner, info.name)
            deleted = [m for m in metas if "\\Deleted" in m.flags]
            values["DELETED"] = len(deleted)
            values["DELETED-STORAGE"] = sum(m.size for m in deleted)
        sel = self._selected
        if sel is not None and sel.name == info.name and sel.owner == owner:
            values["RECENT"] = max(info.recent, len(sel.recent))
        text = " ".join(f"{item} {values[item]}" for item in items)
        return b"* STATUS " + self._mbox(shown or info.name) + b" (" + text.encode() + b")\r\n"

    async def cmd_STATUS(self, cmd):
        where = self._locate(cmd.args["mailbox"])
        info = await self.factory.store.getMailbox(where.owner, where.name)
        shown = cmd.args["mailbox"] if where.shared else None
        self._send(await self._statusLine(info, cmd.args["items"], where.owner, shown))
        return ("OK", "STATUS completed")

    async def cmd_APPEND(self, cmd):
        store = self.factory.store
        messages = cmd.args["messages"]
        for one in messages:
            if not one["message"]:
                return ("NO", "[CANNOT] Empty message")
            if one["utf8"] and not self._utf8:
                return ("BAD", "UTF8 data needs ENABLE UTF8=ACCEPT")
        where = self._locate(cmd.args["mailbox"])
        if where.readOnly:
            return ("NO", "[NOPERM] The shared mailbox is read-only")
        if len(messages) > 1 and IMultiAppendStore.providedBy(store):
            # One transaction: all or none, a crash included (RFC 3502).
            uidvalidity, done = await store.appendAll(
                where.owner, where.name, [(one["message"], one["flags"], one["date"]) for one in messages]
            )
            return ("OK", f"[APPENDUID {uidvalidity} {wire.formatSequenceSet(done)}] APPEND completed")
        done = []
        uidvalidity = None
        # All at once: the store commits them in order and in one group.
        results = await defer.DeferredList(
            [
                store.append(where.owner, where.name, one["message"], flags=one["flags"], internalDate=one["date"])
                for one in messages
            ],
            consumeErrors=True,
        )
        failure = None
        for ok, value in results:
            if ok:
                uidvalidity = value[0]
                done.append(value[1])
            elif failure is None:
                failure = value
        try:
            if failure is not None:
                failure.raiseException()
        except StoreError:
            # MULTIAPPEND is all or nothing (RFC 3502): take back what went in.
            await self._takeBack(where, done, "MULTIAPPEND")
            raise
        return ("OK", f"[APPENDUID {uidvalidity} {wire.formatSequenceSet(done)}] APPEND completed")

    async def _takeBack(self, where, uids, what):
        """Expunge C{uids}, the part of a failed all-or-nothing command (C{what}) that went into C{where}."""
        if not uids:
            return
        store = self.factory.store
        try:
            await store.storeFlags(where.owner, where.name, uids, "add", ["\\Deleted"])
            await store.expunge(where.owner, where.name, uids)
        except StoreError:
            _log.failure("could not undo a partial {what}", what=what)

    # --- selected -------------------------------------------------------

    async def cmd_CHECK(self, cmd):
        return ("OK", "CHECK completed")

    async def cmd_CLOSE(self, cmd):
        sel = self._selected
        self._select(None)
        self._state = "auth"
        if not sel.readOnly and sel.uids and not sel.gone:
            try:
                await self.factory.store.expunge(sel.owner, sel.name, list(sel.uids))
            except StoreError as e:
                _log.info("expunge on CLOSE failed: {error}", error=str(e))
        return ("OK", "CLOSE completed")

    async def cmd_UNSELECT(self, cmd):
        self._select(None)
        self._state = "auth"
        return ("OK", "UNSELECT completed")

    async def cmd_EXPUNGE(self, cmd):
        sel = self._selected
        if sel.readOnly:
            return ("NO", "[READ-ONLY] Mailbox is read-only")
        if cmd.uid:
            uids = [u for _, u in self._resolve(sel, cmd.args["set"], True)]
        else:
            uids = list(sel.uids)
        if uids:
            gone = await self.factory.store.expunge(sel.owner, sel.name, uids)
            if sel is self._selected:
                self._sendExpunges(gone)
        if self._condstore:
            info = await self.factory.store.getMailbox(sel.owner, sel.name)
            return ("OK", f"[HIGHESTMODSEQ {info.highestModseq}] EXPUNGE completed")
        return ("OK", "EXPUNGE completed")

    def _resolve(self, sel: _Selected, seqset: wire.SequenceSet, uid: bool):
        """C{[(seq, uid)]} for a set of sequence numbers or UIDs (or C{$})."""
        if seqset.saved:
            out = []
            for u in sel.saved:
                seq = sel.seqOf(u)
                if seq is not None:
                    out.append((seq, u))
            return out
        if uid:
            uids = seqset.select(sel.uids, sel.uids[-1] if sel.uids else 0)
            if uids:
                # A run of consecutive messages (1:*, the common case) needs
                # no search per UID: its sequence numbers are consecutive too.
                first = sel.seqOf(uids[0])
                if sel.uids[first - 1:first - 1 + len(uids)] == uids:
                    return list(zip(range(first, first + len(uids)), uids))
            return [(sel.seqOf(u), u) for u in uids]
        count = len(sel.uids)
        for lo, hi in seqset.ranges:
            for v in (lo, hi):
                if (v is None and count == 0) or (v is not None and v > count):
                    raise _Reply("BAD", "Invalid message sequence number")
        seqs = seqset.select(range(1, count + 1), count)
        return [(s, sel.uids[s - 1]) for s in seqs]

    def _flagBytes(self, sel, uid, flags) -> bytes:
        """The FLAGS list of a message whose stored flags are C{flags} (hashable), with C{\\Recent} when it is."""
        if uid in sel.recent:
            flags = frozenset(flags) | _RECENT
        return wire.flagList(flags)

    async def cmd_FETCH(self, cmd):
        sel = self._selected
        store = self.factory.store
        args = cmd.args
        plan = fetchmod.FetchPlan(args["atts"], cmd.uid, sel.readOnly)
        changedSince = args.get("changedSince")
        if plan.wantsModseq or changedSince is not None:
            self._enableCondstore()
        if self._condstore and (changedSince is not None or plan.wantsModseq):
            plan.addModseq()
        if args.get("vanished") and not (cmd.uid and self._qresync):
            return ("BAD", "VANISHED needs UID FETCH and QRESYNC")
        targets = self._resolve(sel, args["set"], cmd.uid)
        if args.get("vanished"):
            largest = sel.uids[-1] if sel.uids else 0
            if IVanishedStore.providedBy(store):
                gone = await store.vanishedSince(sel.owner, sel.name, changedSince)
                top = max(largest, gone[-1] if gone else 0)
                gone = [u for u in gone if args["set"].contains(u, top)]
                if gone:
                    self._send(b"* VANISHED (EARLIER) " + wire.formatSequenceSet(gone).encode() + b"\r\n")
        if not targets:
            return ("OK", "FETCH completed")
        uids = [u for _, u in targets]
        if len(uids) == len(sel.uids):
            uids = None  # the whole mailbox: no need to send the list down
        if plan.envelopeOnly and IEnvelopeStore.providedBy(store):
            metas = await store.fetchMeta(sel.owner, sel.name, uids, changedSince=changedSince, withEnvelope=True)
            envelopes = True
        else:
            metas = await store.fetchMeta(
                sel.owner, sel.name, uids, withStructure=plan.needsStructure, changedSince=changedSince
            )
            envelopes = False
        if sel is not self._selected:
            return ("NO", "Mailbox closed meanwhile")
        byUid = {m.uid: m for m in metas}
        seen = set()
        if plan.setsSeen:
            unseen = [m.uid for m in metas if "\\Seen" not in m.flags]
            if unseen:
                changes, _ = await store.storeFlags(sel.owner, sel.name, unseen, "add", ["\\Seen"])
                for c in changes:
                    if c.uid in byUid:
                        byUid[c.uid] = dataclasses.replace(byUid[c.uid], flags=c.flags, modseq=c.modseq)
                        seen.add(c.uid)
        # (With envelopes, only a few hundred messages at a time: the whole
        # answer is built before it is written.)
        if not seen and (plan.metaOnly or (
                envelopes and plan.metaAndEnvelope and len(metas) <= ENVELOPES_AT_ONCE
                and all(m.envelope is not None for m in metas))):
            return self._fetchMetaOnly(sel, plan, targets, byUid, changedSince is not None)
        missing = False
        buf = []
        size = 0
        contentStore = IContentStore.providedBy(store)
        needsContent = plan.needsContent
        try:
            for seq, uid in targets:
                meta = byUid.get(uid)
                if meta is None:
                    if changedSince is None:
                        missing = True
                    continue
                # With envelopes from the store, a message it has none for
                # is analysed here (found stale: no structure was read).
                needsStructure = plan.needsStructure and not (envelopes and meta.envelope is not None)
                structure = meta.structure if needsStructure else None
                content = None
                stale = needsStructure and not (
                    isinstance(structure, dict) and structure.get("version") == fetchmod.STRUCTURE_VERSION
                )
                streamAtt = None
                if contentStore and needsContent:
                    streamAtt = plan.streamable(meta.size, STREAM_THRESHOLD)
                if streamAtt is not None and len(plan.atts) > 0 and not stale:
                    content = None
                elif needsContent or stale:
                    try:
                        content = await store.getContent(sel.owner, sel.name, uid)
                    except KeyError:
                        missing = True
                        continue
                    streamAtt = None
                if needsStructure:
                    structure = fetchmod.ensureStructure(structure, content)
                flags = sel.flagsOf(uid, meta.flags)
                extras = []
                if plan.wantsFlags or uid in seen:
                    if not plan.wantsFlags:
                        extras.append((b"FLAGS", wire.formatFlags(wire.sortFlags(flags))))
                    if uid in seen and self._condstore:
                        # RFC 7162 §3.1: the FETCH response of a message whose
                        # \Seen this FETCH set carries its UID and MODSEQ.
                        if not plan.wantsModseq:
                            extras.append((b"MODSEQ", b"(%d)" % meta.modseq))
                        if not plan.wantsUid:
                            extras.append((b"UID", b"%d" % uid))
                    k = sel.known.get(uid)
                    if k is not None and meta.modseq > k[1]:
                        sel.known[uid] = (meta.flags, meta.modseq)
                if streamAtt is None and content is not None and len(plan.atts) > 1 and (
                        meta.size * len(plan.atts) > WRITE_CHUNK):
                    # Several items of a big message (BODY[TEXT], BINARY[],
                    # the same section twice...): written one at a time.
                    try:
                        plan.checkBinary(content, structure)
                    except fetchmod.UnknownCTE:
                        self._send(b"".join(buf))
                        return ("NO", "[UNKNOWN-CTE] Unknown content-transfer-encoding")
                    self._startProducing()
                    self._send(b"".join(buf))
                    buf, size = [], 0
                    await self._writeFetchInParts(seq, plan.iterItems(seq, meta, flags, content, structure), extras)
                    if self._closed:
                        return None
                    continue
                try:
                    items = plan.items(seq, meta, flags, content, structure, streamAtt=streamAtt)
                except fetchmod.UnknownCTE:
                    self._send(b"".join(buf))
                    return ("NO", "[UNKNOWN-CTE] Unknown content-transfer-encoding")
                items += extras
                if self._closed:
                    return None
                if streamAtt is not None:
                    self._startProducing()
                    self._send(b"".join(buf))
                    buf, size = [], 0
                    if not await self._streamFetch(sel, seq, uid, meta, items):
                        missing = True
                    continue
                data = wire.fetchResponse(seq, items)
                buf.append(data)
                size += len(data)
                if size >= WRITE_CHUNK:
                    # A big answer: from here on, wait for the client to
                    # take it (a small one is written at once).
                    self._startProducing()
                    self._send(b"".join(buf))
                    buf, size = [], 0
                    await self._drain()
            self._send(b"".join(buf))
        finally:
            self._stopProducing()
        if missing:
            return ("NO", "[EXPUNGEISSUED] Some messages were expunged meanwhile")
        return ("OK", "FETCH completed")

    async def _writeFetchInParts(self, seq, items, extras):
        """One message's FETCH response, item by item, waiting for the client every L{WRITE_CHUNK}."""
        self._send(b"* %d FETCH (" % seq)
        pending, separator = 0, b""
        for name, value in itertools.chain(items, extras):
            self._send(separator + name + b" ")
            self._send(value)
            separator = b" "
            pending += len(value)
            if pending >= WRITE_CHUNK:
                await self._drain()
                pending = 0
                if self._closed:
                    return
        self._send(b")\r\n")

    def _fetchMetaOnly(self, sel, plan, targets, byUid, changedOnly):
        """
        FETCH of FLAGS/UID/INTERNALDATE/RFC822.SIZE/MODSEQ, and ENVELOPE when
        every message's comes formatted from the store: no content, no
        analysis, one template filled per message, one write.
        """
        parts = []
        for att in plan.atts:
            parts.append(att.name)
        # One template per command (e.g. b"* %d FETCH (FLAGS %s UID %d)"),
        # filled per message.
        formats = {"FLAGS": b"FLAGS %s", "UID": b"UID %d", "RFC822.SIZE": b"RFC822.SIZE %d",
                   "INTERNALDATE": b"INTERNALDATE %s", "MODSEQ": b"MODSEQ (%d)", "ENVELOPE": b"ENVELOPE %s"}
        parts = [name for name in parts if name in formats]
        template = b"* %d FETCH (" + b" ".join(formats[name] for name in parts) + b")\r\n"
        out = []
        missing = False
        known = sel.known
        flagBytes = self._flagBytes
        for seq, uid in targets:
            meta = byUid.get(uid)
            if meta is None:
                if not changedOnly:
                    missing = True
                continue
            values = [seq]
            for name in parts:
                if name == "FLAGS":
                    values.append(flagBytes(sel, uid, meta.flags))
                elif name == "UID":
                    values.append(uid)
                elif name == "RFC822.SIZE":
                    values.append(meta.size)
                elif name == "INTERNALDATE":
                    values.append(wire.formatDateTime(meta.internalDate))
                elif name == "ENVELOPE":
                    values.append(meta.envelope)
                else:
                    values.append(meta.modseq)
            out.append(template % tuple(values))
            if plan.wantsFlags:
                k = known.get(uid)
                # An equal MODSEQ is the same state: nothing to record.
                if k is not None and meta.modseq > k[1]:
                    known[uid] = (meta.flags, meta.modseq)
        self._send(b"".join(out))
        if missing:
            return ("NO", "[EXPUNGEISSUED] Some messages were expunged meanwhile")
        return ("OK", "FETCH completed")

    async def _streamFetch(self, sel, seq, uid, meta, items) -> bool:
        """Write one FETCH response whose (one) C{None} item is the message, read from its file."""
        store = self.factory.store
        try:
            f = await store.openContent(sel.owner, sel.name, uid)
        except KeyError:
            return False
        try:
            head = []
            tail = []
            target = head
            streamName = None
            for name, value in items:
                if value is None:
                    streamName = name
                    target = tail
                    continue
                target.append(name + b" " + value)
            prefix = b"* %d FETCH (" % seq + b" ".join(head) + (b" " if head else b"")
            f.seek(0, 2)
            length = f.tell()
            f.seek(0)
            self._send(prefix + streamName + b" {%d}\r\n" % length)
            remaining = length
            while remaining > 0:
                chunk = await self._readChunk(f, min(remaining, WRITE_CHUNK))
                if not chunk:
                    break
                remaining -= len(chunk)
                self._send(chunk)
                await self._drain()
                if self._closed:
                    return True
            if remaining:
                self._send(b"\x00" * remaining)  # the file shrank: keep the literal's promise
            self._send((b" " + b" ".join(tail) if tail else b"") + b")\r\n")
            return True
        finally:
            f.close()

    def _readChunk(self, f, n):
        from twisted.internet.threads import deferToThreadPool

        if not hasattr(f, "fileno"):
            return defer.succeed(f.read(n))
        try:
            f.fileno()
        except (OSError, ValueError, AttributeError):
            return defer.succeed(f.read(n))
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f.read, n)

    async def cmd_STORE(self, cmd):
        sel = self._selected
        if sel.readOnly:
            return ("NO", "[READ-ONLY] Mailbox is read-only")
        unchangedSince = cmd.args.get("unchangedSince")
        if unchangedSince is not None:
            self._enableCondstore()
        targets = self._resolve(sel, cmd.args["set"], cmd.uid)
        if not targets:
            return ("OK", "STORE completed")
        changes, failed = await self.factory.store.storeFlags(
            sel.owner, sel.name, [u for _, u in targets], cmd.args["mode"], cmd.args["flags"],
            unchangedSince=unchangedSince,
        )
        out = []
        for c in changes:
            seq = sel.seqOf(c.uid)
            if seq is None:
                continue
            old = sel.known.get(c.uid)
            sel.known[c.uid] = (c.flags, c.modseq)
            changed = old is None or old[1] != c.modseq
            if not cmd.args["silent"] or (self._condstore and unchangedSince is not None and changed):
                items = [(b"FLAGS", self._flagBytes(sel, c.uid, c.flags))]
                if cmd.uid or self._condstore:
                    # RFC 7162 §3.1: with CONDSTORE on, every untagged FETCH a STORE causes has UID and MODSEQ.
                    items.append((b"UID", b"%d" % c.uid))
                if self._condstore:
                    items.append((b"MODSEQ", b"(%d)" % c.modseq))
                out.append(wire.fetchResponse(seq, items))
        self._send(b"".join(out))
        if failed:
            numbers = failed if cmd.uid else [sel.seqOf(u) for u in failed if sel.seqOf(u) is not None]
            return ("OK", f"[MODIFIED {wire.formatSequenceSet(numbers)}] Conditional STORE failed for some")
        return ("OK", "STORE completed")

    async def cmd_COPY(self, cmd, move=False):
        sel = self._selected
        store = self.factory.store
        if move and sel.readOnly:
            return ("NO", "[READ-ONLY] Mailbox is read-only")
        targets = self._resolve(sel, cmd.args["set"], cmd.uid)
        where = self._locate(cmd.args["mailbox"])
        if where.readOnly:
            return ("NO", "[NOPERM] The shared mailbox is read-only")
        await store.getMailbox(where.owner, where.name)
        if not targets:
            return ("OK", f"{cmd.name} completed")
        uids = [u for _, u in targets]
        if where.owner == sel.owner:
            uidvalidity, mapping = await store.copy(sel.owner, sel.name, uids, where.name, move=move)
        else:
            uidvalidity, mapping = await self._copyAcross(sel, uids, where, move)
        if not mapping:
            return ("OK", f"{cmd.name} completed")
        src = wire.formatSequenceSet([s for s, _ in mapping])
        dst = wire.formatSequenceSet([d for _, d in mapping])
        if not move:
            return ("OK", f"[COPYUID {uidvalidity} {src} {dst}] COPY completed")
        self._send(f"* OK [COPYUID {uidvalidity} {src} {dst}] Moved\r\n".encode())
        if sel is self._selected:
            self._sendExpunges([s for s, _ in mapping])
        return ("OK", "MOVE completed")

    async def cmd_MOVE(self, cmd):
        return await self.cmd_COPY(cmd, move=True)

    async def _copyAcross(self, sel, uids, where, move):
        """
        COPY or MOVE between two accounts' mailboxes (one of them in the
        shared namespace): each message is read and appended with its flags
        and internal date, in ascending UID order.  All or nothing (RFC 3501
        6.4.7): if one fails, those already copied are removed again.  A
        MOVE then expunges the originals.
        """
        store = self.factory.store
        metas = {m.uid: m for m in await store.fetchMeta(sel.owner, sel.name, uids)}
        uidvalidity, mapping = None, []
        try:
            for uid in sorted(metas):
                meta = metas[uid]
                content = await store.getContent(sel.owner, sel.name, uid)
                uidvalidity, new = await store.append(
                    where.owner, where.name, content, flags=meta.flags - {"\\Recent"}, internalDate=meta.internalDate
                )
                mapping.append((uid, new))
        except StoreError:
            await self._takeBack(where, [d for _, d in mapping], "COPY")
            raise
        if move and mapping:
            moved = [s for s, _ in mapping]
            await store.storeFlags(sel.owner, sel.name, moved, "add", ["\\Deleted"])
            await store.expunge(sel.owner, sel.name, moved)
        return uidvalidity, mapping

    # --- SEARCH, SORT, THREAD -------------------------------------------

    async def _searchUids(self, sel, key, charset):
        """The UIDs (ascending) matching a parsed search key, from the store's index when it has one."""
        store = self.factory.store
        if charset is not None and charset not in searchmod.CHARSETS:
            raise _Reply("NO", "[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
        if any(k[0] == "modseq" for k in searchmod.walk(key)):
            self._enableCondstore()
        maxSeq = len(sel.uids)
        maxUid = sel.uids[-1] if sel.uids else 0
        prepared = searchmod.prepare(key, charset)
        if ISearchIndex.providedBy(store):
            metasFor = None
            if searchmod.needsDates(prepared):
                metasFor = {m.uid: m for m in await store.fetchMeta(sel.owner, sel.name)}
            query = searchmod.toIndexQuery(
                prepared, sel.uids, sel.recent, sel.saved, self._reactor.seconds(), metasFor, maxSeq, maxUid
            )
            found = await store.search(sel.owner, sel.name, query)
            present = set(sel.uids) if len(found) < len(sel.uids) else None
            return [u for u in found if (u in present if present is not None else sel.seqOf(u) is not None)]
        withStructure = searchmod.needsStructure(prepared)
        withContent = searchmod.needsContent(prepared)
        metas = await store.fetchMeta(sel.owner, sel.name, list(sel.uids), withStructure=withStructure or withContent)
        found = []
        now = self._reactor.seconds()
        for meta in metas:
            seq = sel.seqOf(meta.uid)
            if seq is None:
                continue
            cand = searchmod.Candidate(
                seq, meta.uid, meta.flags, meta.uid in sel.recent, meta.size, meta.internalDate, meta.structure,
                modseq=meta.modseq, saved=sel.saved, now=now,
            )
            stale = (withStructure or withContent) and not (
                isinstance(meta.structure, dict) and meta.structure.get("version") == fetchmod.STRUCTURE_VERSION
            )
            if withContent or stale:
                try:
                    cand.content = await store.getContent(sel.owner, sel.name, meta.uid)
                except KeyError:
                    continue
                cand.structure = fetchmod.ensureStructure(meta.structure, cand.content)
            if searchmod.matches(prepared, cand, maxSeq, maxUid):
                found.append(meta.uid)
            if self._closed:
                return []
        return found

    async def cmd_SEARCH(self, cmd):
        sel = self._selected
        args = cmd.args
        if self._utf8 and args["charset"] not in (None, "UTF-8"):
            # RFC 6855 3 (erratum 4029) would refuse any CHARSET here; UTF-8
            # does not conflict and some clients always send it.
            return ("BAD", "Only UTF-8 searches once UTF8=ACCEPT is enabled")
        returns = args.get("return")
        try:
            found = await self._searchUids(sel, args["key"], args["charset"])
        except _Reply:
            if returns and "SAVE" in returns:
                sel.saved = []
            raise
        if sel is not self._selected:
            return ("NO", "Mailbox closed meanwhile")
        usesModseq = any(k[0] == "modseq" for k in searchmod.walk(args["key"]))
        highest = 0
        if usesModseq and found:
            highest = max(sel.known.get(u, (None, 0))[1] for u in found)
            metas = await self.factory.store.fetchMeta(sel.owner, sel.name, found)
            highest = max([highest] + [m.modseq for m in metas])
        numbers = found if cmd.uid else [sel.seqOf(u) for u in found]
        if returns is None:
            line = b"* SEARCH" + b"".join(b" %d" % n for n in numbers)
            if usesModseq and found:
                line += b" (MODSEQ %d)" % highest
            self._send(line + b"\r\n")
            return ("OK", "SEARCH completed")
        opts = set(returns)
        if "SAVE" in opts:
            if opts & {"MIN", "MAX"} and not opts & {"ALL", "COUNT"}:
                keep = set()
                if "MIN" in opts and found:
                    keep.add(found[0])
                if "MAX" in opts and found:
                    keep.add(found[-1])
                sel.saved = sorted(keep)
            else:
                sel.saved = list(found)
            opts.discard("SAVE")
            if not opts:
                return ("OK", "SEARCH completed")
        parts = [b'* ESEARCH (TAG "' + cmd.tag.encode("ascii") + b'")']
        if cmd.uid:
            parts.append(b"UID")
        if numbers:
            if "MIN" in opts:
                parts.append(b"MIN %d" % numbers[0])
            if "MAX" in opts:
                parts.append(b"MAX %d" % numbers[-1])
            if "ALL" in opts:
                parts.append(b"ALL " + wire.formatSequenceSet(numbers).encode())
        if "COUNT" in opts:
            parts.append(b"COUNT %d" % len(numbers))
        if usesModseq and found:
            parts.append(b"MODSEQ %d" % highest)
        self._send(b" ".join(parts) + b"\r\n")
        return ("OK", "SEARCH completed")

    async def _indexFor(self, sel, uids):
        store = self.factory.store
        if ISearchIndex.providedBy(store):
            return await store.indexData(sel.owner, sel.name, uids)
        from mailplat.mime.structure import indexFields

        out = {}
        for m in await store.fetchMeta(sel.owner, sel.name, uids, withStructure=True):
            structure = m.structure
            if not (isinstance(structure, dict) and structure.get("version") == fetchmod.STRUCTURE_VERSION):
                structure = fetchmod.ensureStructure(None, await store.getContent(sel.owner, sel.name, m.uid))
            entry = indexFields(structure)
            entry["size"] = m.size
            entry["internalDate"] = m.internalDate
            out[m.uid] = entry
        return out

    async def cmd_SORT(self, cmd):
        sel = self._selected
        args = cmd.args
        if args.get("return") is not None:
            return ("BAD", "SORT RETURN is not supported")
        if self._utf8 and args["charset"] != "UTF-8":
            return ("BAD", "Only UTF-8 once UTF8=ACCEPT is enabled")  # RFC 6855 3, erratum 4029
        found = await self._searchUids(sel, args["key"], args["charset"])
        index = await self._indexFor(sel, found)
        found = [u for u in found if u in index]

        def keyFor(name, uid):
            e = index[uid]
            if name == "ARRIVAL":
                return (e["internalDate"],)
            if name == "DATE":
                return (e["sentDate"] if e.get("sentDate") is not None else e["internalDate"],)
            if name == "SIZE":
                return (e["size"],)
            if name == "SUBJECT":
                return (e["sortSubject"],)
            if name == "FROM":
                return (e["sortFrom"],)
            if name == "TO":
                return (e["sortTo"],)
            if name == "CC":
                return (e["sortCc"],)
            if name == "DISPLAYFROM":
                return (e["displayFrom"],)
            return (e["displayTo"],)

        ordered = sorted(found)  # ties: by sequence number, which follows UID order
        for name, reverse in reversed(args["criteria"]):
            ordered.sort(key=lambda u: keyFor(name, u), reverse=reverse)
        numbers = ordered if cmd.uid else [sel.seqOf(u) for u in ordered]
        self._send(b"* SORT" + b"".join(b" %d" % n for n in numbers) + b"\r\n")
        return ("OK", "SORT completed")

    async def cmd_THREAD(self, cmd):
        sel = self._selected
        args = cmd.args
        if self._utf8 and args["charset"] != "UTF-8":
            return ("BAD", "Only UTF-8 once UTF8=ACCEPT is enabled")  # RFC 6855 3, erratum 4029
        found = await self._searchUids(sel, args["key"], args["charset"])
        index = await self._indexFor(sel, found)
        messages = [((u if cmd.uid else sel.seqOf(u)), index[u]) for u in found if u in index]
        if args["algorithm"] == "ORDEREDSUBJECT":
            data = threadmod.orderedSubject(messages)
        else:
            data = threadmod.references(messages)
        self._send(b"* THREAD " + data + b"\r\n" if data else b"* THREAD\r\n")
        return ("OK", "THREAD completed")

    # --- mailbox updates ------------------------------------------------

    def _onEvent(self, event):
        sel = self._selected
        if sel is None:
            return
        if event.mailbox != sel.name or event.user != sel.owner:
            return
        kind = event.kind
        if kind == "append":
            sel.pendingAppend.update(event.uids)
            for m in event.metas:
                sel.appendMetas[m.uid] = m
            self._sawModseqs(sel, [m.modseq for m in event.metas])
            if not sel.readOnly:
                sel.recentWon.update(self.factory.claimRecent(event.user, event.mailbox, event.uids))
        elif kind == "flags":
            sel.pendingFlags.update(event.uids)
            for c in event.changes:
                sel.flagChanges[c.uid] = c
            self._sawModseqs(sel, [c.modseq for c in event.changes])
        elif kind == "changed":
            if event.modseq <= sel.highest:
                return
            sel.resync = True
        elif kind == "expunge":
            sel.pendingExpunge.update(event.uids)
            self._sawModseqs(sel, [event.modseq] if event.modseq else [])
        elif kind in ("delete", "rename") and event.uidvalidity and event.uidvalidity != sel.uidvalidity:
            return  # another mailbox that had the name
        elif kind == "delete":
            sel.gone = True
        elif kind == "rename" and event.newName:
            # The mailbox keeps its UIDVALIDITY under its new name: follow it.
            sel.name = event.newName
            return
        else:
            return
        if self._idling:
            self._scheduleFlush()

    @staticmethod
    def _sawModseqs(sel, modseqs):
        """
        Take in the MODSEQs an event reports: C{sel.highest} moves only
        over an unbroken run, and a gap (a change made where this process
        did not see it) calls for reading the mailbox back.
        """
        for modseq in sorted(modseqs):
            if modseq == sel.highest + 1:
                sel.highest = modseq
            elif modseq > sel.highest + 1:
                sel.resync = True

    async def _resync(self, sel):
        """
        Read back what another process changed in the selected mailbox
        since MODSEQ C{sel.highest} (a C{"changed"} event): new messages,
        flag changes and expunges become pending as if their events had
        come.
        """
        sel.resync = False
        store = self.factory.store
        since = sel.highest
        info = await store.getMailbox(sel.owner, sel.name)
        metas = await store.fetchMeta(sel.owner, sel.name, None, changedSince=since)
        gone = await store.vanishedSince(sel.owner, sel.name, since) if IVanishedStore.providedBy(store) else []
        if sel is not self._selected:
            return
        top = sel.uids[-1] if sel.uids else 0
        new = []
        sel.highest = max(sel.highest, info.highestModseq)
        for m in metas:
            sel.highest = max(sel.highest, m.modseq)
            if m.uid > top:
                new.append(m.uid)
                sel.appendMetas[m.uid] = m
            elif m.uid in sel.known:
                sel.pendingFlags.add(m.uid)
        if new:
            sel.pendingAppend.update(new)
            if not sel.readOnly:
                sel.recentWon.update(self.factory.claimRecent(sel.owner, sel.name, new))
        for u in gone:
            if u in sel.known:
                sel.pendingExpunge.add(u)
            else:
                # Appended and expunged before this session was told of it
                # (the append's event from this process still waiting): it
                # is never announced.
                sel.pendingAppend.discard(u)
                sel.appendMetas.pop(u, None)
                sel.recentWon.discard(u)

    def _sendExpunges(self, uids):
        sel = self._selected
        out = []
        gone = []
        for uid in sorted(uids, reverse=True):
            sel.pendingExpunge.discard(uid)
            seq = sel.seqOf(uid)
            if seq is None:
                continue
            del sel.uids[seq - 1]
            sel.known.pop(uid, None)
            sel.recent.discard(uid)
            gone.append(uid)
            out.append(b"* %d EXPUNGE\r\n" % seq)
        if self._qresync:
            if gone:
                self._send(b"* VANISHED " + wire.formatSequenceSet(gone).encode() + b"\r\n")
        else:
            self._send(b"".join(out))

    async def _flushUpdates(self, allowExpunge: bool):
        sel = self._selected
        if sel is None or not (
            sel.gone or sel.resync or sel.pendingExpunge or sel.pendingAppend or sel.pendingFlags
        ):
            if not self._flushLock.locked:
                return  # nothing to tell, and no flush under way to wait for
        await self._flushLock.acquire()
        try:
            await self._flushUpdatesLocked(allowExpunge)
        finally:
            self._flushLock.release()

    async def _flushUpdatesLocked(self, allowExpunge: bool):
        sel = self._selected
        if sel is None or self._state != "selected" or self._closed:
            return
        if sel.gone:
            self._send(b"* BYE Selected mailbox was deleted, have to disconnect\r\n")
            self._close()
            return
        store = self.factory.store
        if sel.resync:
            await self._resync(sel)
            if sel is not self._selected:
                return
        dead = set(sel.pendingExpunge)
        if allowExpunge and sel.pendingExpunge:
            self._sendExpunges(list(sel.pendingExpunge))
        if sel.pendingAppend:
            top = sel.uids[-1] if sel.uids else 0
            new = sorted(u for u in sel.pendingAppend if u > top)
            sel.pendingAppend.clear()
            given = sel.appendMetas
            sel.appendMetas = {}
            if new:
                if all(u in given for u in new):
                    metas = [given[u] for u in new]
                else:
                    metas = await store.fetchMeta(sel.owner, sel.name, new)
                    if sel is not self._selected:
                        return
                added = []
                for m in metas:
                    if (not sel.uids or m.uid > sel.uids[-1]) and m.uid not in dead and m.uid not in sel.pendingExpunge:
                        sel.uids.append(m.uid)
                        sel.known[m.uid] = (m.flags, m.modseq)
                        added.append(m.uid)
                if added:
                    won = sel.recentWon
                    sel.recentWon = set()
                    if won:
                        sel.recent.update(u for u in won if sel.seqOf(u) is not None)
                        # Clear the store's record too (for sessions of other
                        # processes and later SELECTs), without waiting: the
                        # claim was decided above, and \Recent is advisory.
                        self.factory.claimRecentInStore(store, sel.owner, sel.name)
                    self._send(b"* %d EXISTS\r\n* %d RECENT\r\n" % (len(sel.uids), len(sel.recent)))
        if sel.pendingFlags:
            uids = sorted(u for u in sel.pendingFlags if u in sel.known and u not in dead and u not in sel.pendingExpunge)
            sel.pendingFlags.clear()
            given = sel.flagChanges
            sel.flagChanges = {}
            if uids:
                if all(u in given for u in uids):
                    changes = [given[u] for u in uids]
                else:
                    changes = await store.fetchMeta(sel.owner, sel.name, uids)
                    if sel is not self._selected:
                        return
                out = []
                for m in changes:
                    seq = sel.seqOf(m.uid)
                    if seq is None or m.uid not in sel.known or m.modseq <= sel.known[m.uid][1]:
                        continue
                    sel.known[m.uid] = (m.flags, m.modseq)
                    items = [(b"FLAGS", self._flagBytes(sel, m.uid, m.flags)), (b"UID", b"%d" % m.uid)]
                    if self._condstore:
                        items.append((b"MODSEQ", b"(%d)" % m.modseq))
                    out.append(wire.fetchResponse(seq, items))
                self._send(b"".join(out))


@functools.lru_cache(maxsize=8192)
def _mailboxName(name: str) -> bytes:
    """A mailbox name in modified UTF-7, as an IMAP string (LIST answers the same names again and again)."""
    return wire.string(wire.encodeMailbox(name).encode("ascii"))


@functools.lru_cache(maxsize=256)
def listMatcher(pattern: str):
    """
    A predicate for LIST/LSUB patterns: C{*} matches anything, C{%} anything
    but the hierarchy delimiter; INBOX is matched case-insensitively.  Time
    linear in the name times the pattern whatever the pattern (a regular
    expression with many wildcards backtracks exponentially on a name it
    does not match).
    """
    if pattern[:5].upper() == "INBOX" and (len(pattern) == 5 or pattern[5] == DELIMITER):
        pattern = "INBOX" + pattern[5:]
    # A run of wildcards is "*" if it holds one, else "%".
    tokens = []
    for ch in pattern:
        if ch in "*%" and tokens and tokens[-1] in ("*", "%"):
            if ch == "*":
                tokens[-1] = "*"
        else:
            tokens.append(ch)
    wildcards = sum(1 for t in tokens if t in ("*", "%"))
    if wildcards <= 2:
        out = [".*" if t == "*" else "[^" + re.escape(DELIMITER) + "]*" if t == "%" else re.escape(t) for t in tokens]
        regex = re.compile("".join(out), re.DOTALL)
        return lambda name: regex.fullmatch(name) is not None
    n = len(tokens)

    def closure(states):
        out = set()
        for i in states:
            while True:
                out.add(i)
                if i < n and tokens[i] in ("*", "%"):
                    i += 1
                else:
                    break
        return out

    start = closure({0})

    def match(name):
        states = start
        for ch in name:
            moved = set()
            for i in states:
                if i == n:
                    continue
                t = tokens[i]
                if t == "*" or (t == "%" and ch != DELIMITER):
                    moved.add(i)
                elif t == ch:
                    moved.add(i + 1)
            if not moved:
                return False
            states = closure(moved)
        return n in states

    return match


class IMAPFactory(ServerFactory):
    """
    Builds IMAP sessions.

    @param hostname: the name in the greeting.
    @param portal: a C{twisted.cred} portal giving L{IMailAccount} avatars.
    @param store: an L{IMessageStore}.
    @param sasl: a L{mailplat.auth.sasl.Registry} (PLAIN and LOGIN by default).
    @param tlsContextFactory: enables STARTTLS when given.
    @param allowInsecureAuth: C{True} allows plaintext authentication without
        TLS everywhere, C{False} nowhere, C{None} only on loopback.
    @param metrics: a L{mailplat.metrics.Metrics} or C{None}.
    @param reactor: for timers; the global reactor by default.
    @param idleTimeout: seconds of silence before autologout.
    @param maxLiteralSize: the largest literal (APPEND message) accepted.
    @param shared: a L{SharedNamespace}: other accounts' mailboxes shown
        under its prefix (none by default).
    """

    protocol = IMAPServerProtocol

    def __init__(
        self,
        *,
        hostname,
        portal,
        store,
        sasl=None,
        tlsContextFactory=None,
        allowInsecureAuth=None,
        metrics=None,
        reactor=None,
        idleTimeout=1800,
        maxLiteralSize=50 * 1024 * 1024,
        shared=None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self.hostname = hostname
        self.portal = portal
        self.store = store
        self.sasl = sasl if sasl is not None else Registry()
        self.tlsContextFactory = tlsContextFactory
        self.allowInsecureAuth = allowInsecureAuth
        self.metrics = metrics
        self.reactor = reactor
        self.idleTimeout = idleTimeout
        self.maxLiteralSize = maxLiteralSize
        self.shared = shared if shared is not None else SharedNamespace()
        self._recentClaims: collections.OrderedDict = collections.OrderedDict()
        self._storeClaims: dict = {}

    def claimRecent(self, user, mailbox, uids):
        """
        The UIDs among C{uids} that no session of this factory has claimed as
        C{\\Recent} yet, now claimed: the first session told about a new
        message shows it as recent (RFC 3501 2.3.2) without a store write
        per session.
        """
        won = []
        claims = self._recentClaims
        for uid in uids:
            key = (user, mailbox, uid)
            if key not in claims:
                claims[key] = True
                won.append(uid)
        while len(claims) > MAX_RECENT_CLAIMS:
            claims.popitem(last=False)
        return won

    def claimedRecent(self, user, mailbox, uid) -> bool:
        """Whether a session of this factory has claimed C{uid} as C{\\Recent}."""
        return (user, mailbox, uid) in self._recentClaims

    def claimRecentInStore(self, store, user, mailbox):
        """
        Clear the store's C{\\Recent} of C{mailbox} soon: one store write
        for the claims of L{STORE_CLAIM_DELAY} seconds, not one per new
        message (the factory's own record above answers meanwhile).
        """
        key = (user, mailbox)
        if key in self._storeClaims:
            return

        def run():
            del self._storeClaims[key]
            store.claimRecent(user, mailbox).addErrback(lambda f: f.trap(StoreError) and None)

        self._storeClaims[key] = self.reactor.callLater(STORE_CLAIM_DELAY, run)

    def stopFactory(self):
        for call in self._storeClaims.values():
            if call.active():
                call.cancel()
        self._storeClaims.clear()

    def buildProtocol(self, addr):
        p = self.protocol(self)
        return p
