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

Not implemented yet: IDLE, CONDSTORE/QRESYNC (HIGHESTMODSEQ is reported in
SELECT only), MOVE, NAMESPACE, ID, ENABLE, MULTIAPPEND, BINARY; a mailbox
deleted or renamed by another session while selected is not announced (later
commands answer NO); FETCH responses are written whole rather than through
a producer.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import dataclasses
import re
from dataclasses import dataclass, field

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailplat import tls
from mailplat.auth.sasl import Challenge, Credentials, Registry, SASLError
from mailplat.imap import fetch as fetchmod
from mailplat.imap import search as searchmod
from mailplat.imap import wire
from mailplat.interfaces.auth import IMailAccount
from mailplat.interfaces.storage import (
    SYSTEM_FLAGS,
    InvalidMailboxName,
    MailboxExists,
    MailboxNotEmpty,
    NoSuchAccount,
    NoSuchMailbox,
    QuotaExceeded,
    StoreError,
    TemporaryStoreFailure,
)

_log = Logger()

DELIMITER = "/"
BASE_CAPABILITIES = ("IMAP4rev1", "LITERAL+", "SASL-IR", "UNSELECT", "UIDPLUS", "CHILDREN", "SPECIAL-USE")
MAX_AUTH_FAILURES = 5
MAX_BAD_COMMANDS = 20
#: Unparsed input held while a command runs before reading is paused.
MAX_BUFFERED = 1024 * 1024

_ANY = ("CAPABILITY", "NOOP", "LOGOUT")
_NOT_AUTH = ("STARTTLS", "LOGIN", "AUTHENTICATE")
_AUTH = ("SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB", "STATUS", "APPEND")
_SELECTED = ("CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY")


class _Reply(Exception):
    """Raised by a command handler to end the command with this status."""

    def __init__(self, status: str, text: str):
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass
class _Selected:
    """A selected mailbox as this session's client knows it."""

    name: str
    readOnly: bool
    uidvalidity: int = 0
    uids: list = field(default_factory=list)  # seq - 1 -> uid, ascending
    known: dict = field(default_factory=dict)  # uid -> (flags, modseq) last shown
    recent: set = field(default_factory=set)
    pendingAppend: set = field(default_factory=set)
    pendingFlags: set = field(default_factory=set)
    pendingExpunge: set = field(default_factory=set)

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
        self._timer = None
        self._user = None
        self._avatarLogout = None
        self._removeListener = None
        self._selected: _Selected | None = None
        self._lineWaiter = None
        self._authFailures = 0
        self._badCommands = 0
        self._closeAfterReply = None

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
        self._parser.feed(data)
        self._pump()

    def connectionLost(self, reason=None):
        if self._closed:
            return
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._endLogin()
        if self._lineWaiter is not None:
            waiter, self._lineWaiter = self._lineWaiter, None
            waiter.callback(None)
        if self.factory.metrics is not None:
            self.factory.metrics.sessionClosed("imap")

    def _endLogin(self):
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
        if not self._closed and self.transport is not None:
            self.transport.write(data)

    def _close(self):
        self._state = "logout"
        if not self._closed:
            self.transport.loseConnection()

    def _resetTimer(self):
        timeout = self.factory.idleTimeout
        if not timeout or self._closed:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self._reactor.callLater(timeout, self._timedOut)

    def _timedOut(self):
        self._timer = None
        if self._closed:
            return
        if self._busy and self._lineWaiter is None:
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
                if not self._closed:
                    self.transport.resumeProducing()
        finally:
            self._pumping = False

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
            allowExpunge = cmd.uid or name not in ("FETCH", "STORE", "SEARCH")
            await self._flushUpdates(allowExpunge)
        except Exception:
            _log.failure("IMAP mailbox update failed")
        self._send(tag + b" " + status.encode("ascii") + b" " + text.encode("utf-8") + b"\r\n")
        if self._closeAfterReply is not None:
            self._send(self._closeAfterReply)
            self._close()

    def _storeError(self, e: StoreError, cmd):
        _log.info("IMAP {name} refused by the store: {error}", name=cmd.name, error=str(e))
        safe = str(e).replace("\r", " ").replace("\n", " ")[:200] or "Operation failed"
        if isinstance(e, NoSuchMailbox):
            code = "TRYCREATE" if cmd.name in ("APPEND", "COPY") else "NONEXISTENT"
        elif isinstance(e, MailboxExists):
            code = "ALREADYEXISTS"
        elif isinstance(e, (InvalidMailboxName, MailboxNotEmpty)):
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
        if initial is None or initial == b"=":
            response = b""
        else:
            try:
                response = base64.b64decode(initial, validate=True)
            except (binascii.Error, ValueError):
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
                response = base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError):
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

    async def cmd_SELECT(self, cmd, readOnly=False):
        self._selected = None
        self._state = "auth"
        store = self.factory.store
        info = await store.getMailbox(self._user, cmd.args["mailbox"])
        sel = _Selected(info.name, readOnly, info.uidvalidity)
        self._selected = sel
        metas = await store.fetchMeta(self._user, info.name)
        if readOnly:
            recentCount = info.recent
        else:
            sel.recent = set(await store.claimRecent(self._user, info.name))
        sel.uids = [m.uid for m in metas]
        sel.known = {m.uid: (m.flags, m.modseq) for m in metas}
        if not readOnly:
            sel.recent &= set(sel.uids)
            recentCount = len(sel.recent)
        sel.pendingAppend = {u for u in sel.pendingAppend if u not in sel.known}
        keywords = set()
        unseen = None
        highest = info.highestModseq
        for i, m in enumerate(metas):
            keywords.update(f for f in m.flags if not f.startswith("\\"))
            if unseen is None and "\\Seen" not in m.flags:
                unseen = i + 1
            highest = max(highest, m.modseq)
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
        mode = "READ-ONLY" if readOnly else "READ-WRITE"
        return ("OK", f"[{mode}] {cmd.name} completed")

    async def cmd_EXAMINE(self, cmd):
        return await self.cmd_SELECT(cmd, readOnly=True)

    async def _createWithParents(self, name):
        store = self.factory.store
        levels = name.split(DELIMITER)
        for i in range(1, len(levels)):
            parent = DELIMITER.join(levels[:i])
            try:
                await store.createMailbox(self._user, parent)
            except MailboxExists:
                pass
        await store.createMailbox(self._user, name)

    async def cmd_CREATE(self, cmd):
        name = cmd.args["mailbox"].rstrip(DELIMITER)
        if not name:
            return ("NO", "[CANNOT] Invalid mailbox name")
        if name.upper() == "INBOX":
            return ("NO", "[ALREADYEXISTS] INBOX always exists")
        await self._createWithParents(name)
        return ("OK", "CREATE completed")

    async def cmd_DELETE(self, cmd):
        await self.factory.store.deleteMailbox(self._user, cmd.args["mailbox"])
        return ("OK", "DELETE completed")

    async def cmd_RENAME(self, cmd):
        store = self.factory.store
        new = cmd.args["new"].rstrip(DELIMITER)
        levels = new.split(DELIMITER)
        await store.getMailbox(self._user, cmd.args["old"])
        for i in range(1, len(levels)):
            parent = DELIMITER.join(levels[:i])
            try:
                await store.createMailbox(self._user, parent)
            except MailboxExists:
                pass
        await store.renameMailbox(self._user, cmd.args["old"], new)
        return ("OK", "RENAME completed")

    async def cmd_SUBSCRIBE(self, cmd):
        await self.factory.store.setSubscribed(self._user, cmd.args["mailbox"], True)
        return ("OK", "SUBSCRIBE completed")

    async def cmd_UNSUBSCRIBE(self, cmd):
        await self.factory.store.setSubscribed(self._user, cmd.args["mailbox"], False)
        return ("OK", "UNSUBSCRIBE completed")

    async def cmd_LIST(self, cmd):
        ref, pattern = cmd.args["reference"], cmd.args["pattern"]
        if not pattern:
            self._send(b'* LIST (\\Noselect) "/" ""\r\n')
            return ("OK", "LIST completed")
        infos = await self.factory.store.listMailboxes(self._user)
        existing = {i.name: i for i in infos}
        names = set(existing)
        for n in existing:
            levels = n.split(DELIMITER)
            for i in range(1, len(levels)):
                names.add(DELIMITER.join(levels[:i]))
        matcher = listMatcher(ref + pattern)
        parents = set()
        for n in names:
            if DELIMITER in n:
                parents.add(n.rsplit(DELIMITER, 1)[0])
        out = []
        for n in sorted(names):
            if not matcher(n):
                continue
            attrs = []
            if n not in existing:
                attrs.append("\\Noselect")
            attrs.append("\\HasChildren" if n in parents else "\\HasNoChildren")
            info = existing.get(n)
            if info is not None and info.specialUse:
                attrs.append(info.specialUse)
            out.append(b"* LIST (" + " ".join(attrs).encode() + b') "/" ' + _mailboxName(n) + b"\r\n")
        self._send(b"".join(out))
        return ("OK", "LIST completed")

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
            out.append(b"* LSUB (" + attrs.encode() + b') "/" ' + _mailboxName(n) + b"\r\n")
        self._send(b"".join(out))
        return ("OK", "LSUB completed")

    async def cmd_STATUS(self, cmd):
        info = await self.factory.store.getMailbox(self._user, cmd.args["mailbox"])
        values = {
            "MESSAGES": info.messages,
            "RECENT": info.recent,
            "UIDNEXT": info.uidnext,
            "UIDVALIDITY": info.uidvalidity,
            "UNSEEN": info.unseen,
            "HIGHESTMODSEQ": info.highestModseq,
            "SIZE": info.size,
        }
        sel = self._selected
        if sel is not None and sel.name == info.name:
            values["RECENT"] = max(info.recent, len(sel.recent))
        items = " ".join(f"{item} {values[item]}" for item in cmd.args["items"])
        self._send(b"* STATUS " + _mailboxName(info.name) + b" (" + items.encode() + b")\r\n")
        return ("OK", "STATUS completed")

    async def cmd_APPEND(self, cmd):
        message = cmd.args["message"]
        if not message:
            return ("NO", "[CANNOT] Empty message")
        uidvalidity, uid = await self.factory.store.append(
            self._user, cmd.args["mailbox"], message, flags=cmd.args["flags"], internalDate=cmd.args["date"]
        )
        return ("OK", f"[APPENDUID {uidvalidity} {uid}] APPEND completed")

    # --- selected -------------------------------------------------------

    async def cmd_CHECK(self, cmd):
        return ("OK", "CHECK completed")

    async def cmd_CLOSE(self, cmd):
        sel = self._selected
        self._selected = None
        self._state = "auth"
        if not sel.readOnly and sel.uids:
            try:
                await self.factory.store.expunge(self._user, sel.name, list(sel.uids))
            except StoreError as e:
                _log.info("expunge on CLOSE failed: {error}", error=str(e))
        return ("OK", "CLOSE completed")

    async def cmd_UNSELECT(self, cmd):
        self._selected = None
        self._state = "auth"
        return ("OK", "UNSELECT completed")

    async def cmd_EXPUNGE(self, cmd):
        sel = self._selected
        if sel.readOnly:
            return ("NO", "[READ-ONLY] Mailbox is read-only")
        if cmd.uid:
            uids = cmd.args["set"].select(sel.uids, sel.uids[-1] if sel.uids else 0)
        else:
            uids = list(sel.uids)
        if uids:
            gone = await self.factory.store.expunge(self._user, sel.name, uids)
            if sel is self._selected:
                self._sendExpunges(gone)
        return ("OK", "EXPUNGE completed")

    def _resolve(self, sel: _Selected, seqset: wire.SequenceSet, uid: bool):
        """C{[(seq, uid)]} for a set of sequence numbers or UIDs."""
        if uid:
            uids = seqset.select(sel.uids, sel.uids[-1] if sel.uids else 0)
            return [(sel.seqOf(u), u) for u in uids]
        count = len(sel.uids)
        for lo, hi in seqset.ranges:
            for v in (lo, hi):
                if (v is None and count == 0) or (v is not None and v > count):
                    raise _Reply("BAD", "Invalid message sequence number")
        seqs = seqset.select(range(1, count + 1), count)
        return [(s, sel.uids[s - 1]) for s in seqs]

    async def cmd_FETCH(self, cmd):
        sel = self._selected
        store = self.factory.store
        plan = fetchmod.FetchPlan(cmd.args["atts"], cmd.uid, sel.readOnly)
        targets = self._resolve(sel, cmd.args["set"], cmd.uid)
        if not targets:
            return ("OK", "FETCH completed")
        metas = await store.fetchMeta(self._user, sel.name, [u for _, u in targets], withStructure=plan.needsStructure)
        byUid = {m.uid: m for m in metas}
        seen = set()
        if plan.setsSeen:
            unseen = [m.uid for m in metas if "\\Seen" not in m.flags]
            if unseen:
                changes, _ = await store.storeFlags(self._user, sel.name, unseen, "add", ["\\Seen"])
                for c in changes:
                    if c.uid in byUid:
                        byUid[c.uid] = dataclasses.replace(byUid[c.uid], flags=c.flags, modseq=c.modseq)
                        seen.add(c.uid)
        missing = False
        for seq, uid in targets:
            meta = byUid.get(uid)
            if meta is None:
                missing = True
                continue
            structure = meta.structure if plan.needsStructure else None
            content = None
            stale = plan.needsStructure and not (
                isinstance(structure, dict) and structure.get("version") == fetchmod.STRUCTURE_VERSION
            )
            if plan.needsContent or stale:
                try:
                    content = await store.getContent(self._user, sel.name, uid)
                except KeyError:
                    missing = True
                    continue
            if plan.needsStructure:
                structure = fetchmod.ensureStructure(structure, content)
            flags = sel.flagsOf(uid, meta.flags)
            items = plan.items(seq, meta, flags, content, structure)
            if plan.wantsFlags or uid in seen:
                if not plan.wantsFlags:
                    items.append((b"FLAGS", wire.formatFlags(wire.sortFlags(flags))))
                if uid in sel.known and meta.modseq >= sel.known[uid][1]:
                    sel.known[uid] = (meta.flags, meta.modseq)
            if self._closed:
                return None
            self._send(wire.fetchResponse(seq, items))
        if missing:
            return ("NO", "[EXPUNGEISSUED] Some messages were expunged meanwhile")
        return ("OK", "FETCH completed")

    async def cmd_STORE(self, cmd):
        sel = self._selected
        if sel.readOnly:
            return ("NO", "[READ-ONLY] Mailbox is read-only")
        targets = self._resolve(sel, cmd.args["set"], cmd.uid)
        if not targets:
            return ("OK", "STORE completed")
        changes, _ = await self.factory.store.storeFlags(
            self._user, sel.name, [u for _, u in targets], cmd.args["mode"], cmd.args["flags"]
        )
        out = []
        for c in changes:
            seq = sel.seqOf(c.uid)
            if seq is None:
                continue
            sel.known[c.uid] = (c.flags, c.modseq)
            if not cmd.args["silent"]:
                items = [(b"FLAGS", wire.formatFlags(wire.sortFlags(sel.flagsOf(c.uid, c.flags))))]
                if cmd.uid:
                    items.append((b"UID", b"%d" % c.uid))
                out.append(wire.fetchResponse(seq, items))
        self._send(b"".join(out))
        return ("OK", "STORE completed")

    async def cmd_COPY(self, cmd):
        sel = self._selected
        store = self.factory.store
        targets = self._resolve(sel, cmd.args["set"], cmd.uid)
        await store.getMailbox(self._user, cmd.args["mailbox"])
        if not targets:
            return ("OK", "COPY completed")
        uidvalidity, mapping = await store.copy(self._user, sel.name, [u for _, u in targets], cmd.args["mailbox"])
        if not mapping:
            return ("OK", "COPY completed")
        src = wire.formatSequenceSet([s for s, _ in mapping])
        dst = wire.formatSequenceSet([d for _, d in mapping])
        return ("OK", f"[COPYUID {uidvalidity} {src} {dst}] COPY completed")

    async def cmd_SEARCH(self, cmd):
        sel = self._selected
        store = self.factory.store
        charset = cmd.args["charset"]
        if charset is not None and charset not in searchmod.CHARSETS:
            return ("NO", "[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
        key = searchmod.prepare(cmd.args["key"], charset)
        withStructure = searchmod.needsStructure(key)
        withContent = searchmod.needsContent(key)
        uids = list(sel.uids)
        maxSeq = len(uids)
        maxUid = uids[-1] if uids else 0
        metas = await store.fetchMeta(self._user, sel.name, uids, withStructure=withStructure or withContent)
        found = []
        for meta in metas:
            seq = sel.seqOf(meta.uid)
            if seq is None:
                continue
            cand = searchmod.Candidate(
                seq,
                meta.uid,
                meta.flags,
                meta.uid in sel.recent,
                meta.size,
                meta.internalDate,
                meta.structure,
            )
            stale = (withStructure or withContent) and not (
                isinstance(meta.structure, dict) and meta.structure.get("version") == fetchmod.STRUCTURE_VERSION
            )
            if withContent or stale:
                try:
                    cand.content = await store.getContent(self._user, sel.name, meta.uid)
                except KeyError:
                    continue
                cand.structure = fetchmod.ensureStructure(meta.structure, cand.content)
            if searchmod.matches(key, cand, maxSeq, maxUid):
                found.append(meta.uid if cmd.uid else seq)
            if self._closed:
                return None
        self._send(b"* SEARCH" + b"".join(b" %d" % n for n in found) + b"\r\n")
        return ("OK", "SEARCH completed")

    # --- mailbox updates ------------------------------------------------

    def _onEvent(self, event):
        sel = self._selected
        if sel is None or event.mailbox != sel.name:
            return
        if event.kind == "append":
            sel.pendingAppend.update(event.uids)
        elif event.kind == "flags":
            sel.pendingFlags.update(event.uids)
        elif event.kind == "expunge":
            sel.pendingExpunge.update(event.uids)

    def _sendExpunges(self, uids):
        sel = self._selected
        out = []
        for uid in sorted(uids, reverse=True):
            sel.pendingExpunge.discard(uid)
            seq = sel.seqOf(uid)
            if seq is None:
                continue
            del sel.uids[seq - 1]
            sel.known.pop(uid, None)
            sel.recent.discard(uid)
            out.append(b"* %d EXPUNGE\r\n" % seq)
        self._send(b"".join(out))

    async def _flushUpdates(self, allowExpunge: bool):
        sel = self._selected
        if sel is None or self._state != "selected":
            return
        store = self.factory.store
        if allowExpunge and sel.pendingExpunge:
            self._sendExpunges(list(sel.pendingExpunge))
        if sel.pendingAppend:
            top = sel.uids[-1] if sel.uids else 0
            new = sorted(u for u in sel.pendingAppend if u > top)
            sel.pendingAppend.clear()
            if new:
                metas = await store.fetchMeta(self._user, sel.name, new)
                if sel is not self._selected:
                    return
                added = []
                for m in metas:
                    if not sel.uids or m.uid > sel.uids[-1]:
                        sel.uids.append(m.uid)
                        sel.known[m.uid] = (m.flags, m.modseq)
                        added.append(m.uid)
                if added:
                    if not sel.readOnly:
                        claimed = await store.claimRecent(self._user, sel.name)
                        if sel is not self._selected:
                            return
                        sel.recent.update(u for u in claimed if sel.seqOf(u) is not None)
                    self._send(b"* %d EXISTS\r\n* %d RECENT\r\n" % (len(sel.uids), len(sel.recent)))
        if sel.pendingFlags:
            uids = sorted(u for u in sel.pendingFlags if u in sel.known)
            sel.pendingFlags.clear()
            if uids:
                metas = await store.fetchMeta(self._user, sel.name, uids)
                if sel is not self._selected:
                    return
                out = []
                for m in metas:
                    seq = sel.seqOf(m.uid)
                    if seq is None or m.modseq <= sel.known[m.uid][1]:
                        continue
                    sel.known[m.uid] = (m.flags, m.modseq)
                    flags = wire.formatFlags(wire.sortFlags(sel.flagsOf(m.uid, m.flags)))
                    out.append(wire.fetchResponse(seq, [(b"FLAGS", flags), (b"UID", b"%d" % m.uid)]))
                self._send(b"".join(out))


def _mailboxName(name: str) -> bytes:
    return wire.string(wire.encodeMailbox(name).encode("ascii"))


def listMatcher(pattern: str):
    """
    A predicate for LIST/LSUB patterns: C{*} matches anything, C{%} anything
    but the hierarchy delimiter; INBOX is matched case-insensitively.
    """
    if pattern[:5].upper() == "INBOX" and (len(pattern) == 5 or pattern[5] == DELIMITER):
        pattern = "INBOX" + pattern[5:]
    out = []
    for ch in pattern:
        if ch == "*":
            out.append(".*")
        elif ch == "%":
            out.append("[^" + re.escape(DELIMITER) + "]*")
        else:
            out.append(re.escape(ch))
    regex = re.compile("".join(out), re.DOTALL)
    return lambda name: regex.fullmatch(name) is not None


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

    def buildProtocol(self, addr):
        p = self.protocol(self)
        return p
