"""
The POP3 server: RFC 1939 with RFC 2449 (CAPA, RESP-CODES, AUTH-RESP-CODE,
PIPELINING, EXPIRE, LOGIN-DELAY, IMPLEMENTATION), RFC 2595 section 4 (STLS)
and RFC 5034 (SASL AUTH with initial response), on an L{IMessageStore}.

The maildrop is the account's INBOX.  At login the session reads the INBOX's
metadata once; messages already flagged C{\\Deleted} (by IMAP, say) are left
out.  The unique-id of a message (UIDL) is C{"<uidvalidity>-<uid>"}, stable
for as long as the store keeps the mailbox's UIDVALIDITY.  The maildrop is
locked per account while a session is in the TRANSACTION state; a second
login gets C{-ERR [IN-USE]}.  The lock registry is per process and per store
object (shared by every L{POP3Factory} on that store): nodes that share one
database do not see each other's POP3 locks.

UPDATE state: C{QUIT} sets C{\\Deleted} on the messages marked with C{DELE}
and expunges exactly those UIDs; when the store fails, the reply is
C{-ERR [SYS/TEMP]} and the flag is taken off again so the messages stay.
A connection that drops or times out (autologout, RFC 1939 section 3) never
enters UPDATE.  C{RETR} sets C{\\Seen} once the message has been sent.

Commands are processed strictly one at a time, in the order received, even
though the store answers asynchronously (PIPELINING); anything pipelined
after C{STLS} is discarded before the TLS handshake.  Plaintext passwords
(USER/PASS, SASL PLAIN and LOGIN) are refused before TLS unless the
connection is to a loopback address or C{allowInsecureAuth=True}.

Deviations and choices:
- APOP is not offered: passwords are stored hashed, so the shared secret it
  needs does not exist.  The command answers C{-ERR}.
- C{AUTH} with no argument lists the available mechanisms as a multi-line
  response (the RFC 1734 behaviour many clients still probe with).
- The sizes in C{STAT}, C{LIST} and the C{RETR} status line are the octets
  of the CRLF-normalised message (see L{mailplat.pop3.wire}); computing them
  reads each message once, the first time a size is asked for, and the
  result is cached per factory.
- After C{maxAuthFailures} failed logins the session says so and closes.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailplat import tls
from mailplat.auth.sasl import Challenge, Credentials, Registry, SASLError
from mailplat.interfaces.auth import IMailAccount
from mailplat.interfaces.storage import StoreError, TemporaryStoreFailure
from mailplat.pop3 import wire

_log = Logger()

MAILDROP = "INBOX"

AUTHORIZATION = "AUTHORIZATION"
TRANSACTION = "TRANSACTION"
UPDATE = "UPDATE"


# --- maildrop locks ---------------------------------------------------------


class MaildropLocks:
    """The accounts whose maildrop a session holds, for one store."""

    def __init__(self):
        self._held: set[str] = set()

    def acquire(self, user: str) -> bool:
        if user in self._held:
            return False
        self._held.add(user)
        return True

    def release(self, user: str) -> None:
        self._held.discard(user)

    def isLocked(self, user: str) -> bool:
        return user in self._held


_locksByStore: "weakref.WeakKeyDictionary[object, MaildropLocks]" = weakref.WeakKeyDictionary()


def locksFor(store) -> MaildropLocks:
    """The process-wide lock registry of C{store}."""
    try:
        locks = _locksByStore.get(store)
        if locks is None:
            locks = _locksByStore[store] = MaildropLocks()
        return locks
    except TypeError:
        # Not weak-referenceable: keep the registry on the store itself.
        locks = getattr(store, "_mailplatPOP3Locks", None)
        if locks is None:
            locks = MaildropLocks()
            store._mailplatPOP3Locks = locks
        return locks


# --- maildrop state ----------------------------------------------------------


@dataclass
class _Message:
    uid: int
    uniqueId: str
    storedSize: int
    size: int | None = None
    deleted: bool = False


class _SizeCache:
    """A bounded LRU of normalised sizes, keyed by (user, uidvalidity, uid)."""

    def __init__(self, limit=200_000):
        self._limit = limit
        self._items: OrderedDict = OrderedDict()

    def get(self, key):
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key, value):
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._limit:
            self._items.popitem(last=False)


class _ClientError(Exception):
    """A reply to send as C{-ERR}; C{code} is an RFC 2449 response code."""

    def __init__(self, text, code=None):
        super().__init__(text)
        self.text = text
        self.code = code


# --- streaming ----------------------------------------------------------------


@implementer(IPushProducer)
class _Streamer:
    """
    Write the chunks of an iterator to a transport as a streaming producer,
    pausing when the transport's buffer is full.  L{start} returns a
    Deferred that fires when everything has been written.
    """

    def __init__(self, transport, chunks, onProgress=None):
        self._transport = transport
        self._chunks = iter(chunks)
        self._onProgress = onProgress
        self._paused = False
        self._running = False
        self._finished = False
        self._done = defer.Deferred()

    def start(self):
        self._transport.registerProducer(self, True)
        self.resumeProducing()
        return self._done

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        if self._running or self._finished:
            return
        if self._onProgress is not None:
            self._onProgress()
        self._running = True
        try:
            while not self._paused and not self._finished:
                try:
                    chunk = next(self._chunks)
                except StopIteration:
                    self._finish(None)
                    return
                self._transport.write(chunk)
        except Exception:
            self._finish(Failure())
        finally:
            self._running = False

    def stopProducing(self):
        if not self._finished:
            self._finish(Failure(error.ConnectionLost("stream stopped")))

    def _finish(self, result):
        self._finished = True
        try:
            self._transport.unregisterProducer()
        except Exception:
            pass
        if isinstance(result, Failure):
            self._done.errback(result)
        else:
            self._done.callback(result)


# --- the session -------------------------------------------------------------


class POP3Server(protocol.Protocol):
    """One POP3 session."""

    #: Buffered input beyond which the transport stops reading until the
    #: session catches up.
    maxBuffered = 65536

    def __init__(self, factory):
        self.factory = factory
        self._reactor = factory.reactor
        self._buffer = wire.LineBuffer()
        self.state = AUTHORIZATION
        self._busy = False
        self._draining = False
        self._readPaused = False
        self._closing = False
        self._connected = False
        self._timeoutCall = None
        self._delayCall = None
        self._streamer = None
        self._userName = None  # from USER, waiting for PASS
        self._sasl = None  # mechanism while an AUTH exchange runs
        self._authFailures = 0
        self._avatar = None
        self._logout = None
        self.user = None  # the account name once logged in
        self._lockHeld = False
        self._uidvalidity = None
        self._messages: list[_Message] = []

    # --- connection -------------------------------------------------------

    def connectionMade(self):
        self._connected = True
        if self.factory.metrics is not None:
            self.factory.metrics.sessionOpened("pop3")
        peer = self.transport.getPeer()
        _log.debug("POP3 connection from {peer}", peer=peer)
        self._resetTimeout()
        self._write(wire.ok(f"{self.factory.hostname} POP3 server ready"))

    def connectionLost(self, reason=protocol.connectionDone):
        if not self._connected:
            return
        self._connected = False
        self._closing = True
        if self._timeoutCall is not None and self._timeoutCall.active():
            self._timeoutCall.cancel()
        self._timeoutCall = None
        if self._delayCall is not None and self._delayCall.active():
            self._delayCall.cancel()
        self._delayCall = None
        if self._streamer is not None:
            self._streamer.stopProducing()
        self._endLogin()
        self._buffer.clear()
        if self.factory.metrics is not None:
            self.factory.metrics.sessionClosed("pop3")

    def _endLogin(self):
        """Release the maildrop lock and log the avatar out (no UPDATE)."""
        if self._lockHeld and self.user is not None:
            self.factory.locks.release(self.user)
        self._lockHeld = False
        logout, self._logout = self._logout, None
        if logout is not None:
            try:
                logout()
            except Exception:
                _log.failure("POP3 avatar logout failed for {user}", user=self.user)
        self._avatar = None

    def _write(self, data: bytes):
        if self._connected and not self._closing:
            self.transport.write(data)

    def _close(self):
        """Close after what has been written (QUIT, too many failures)."""
        if self._closing:
            return
        self._closing = True
        self._buffer.clear()
        self.transport.loseConnection()

    # --- idle timeout -----------------------------------------------------

    def _resetTimeout(self):
        timeout = self.factory.idleTimeout
        if not timeout or self._closing:
            return
        if self._timeoutCall is not None and self._timeoutCall.active():
            self._timeoutCall.reset(timeout)
        else:
            self._timeoutCall = self._reactor.callLater(timeout, self._timedOut)

    def _timedOut(self):
        self._timeoutCall = None
        # RFC 1939 section 3: autologout closes without a response and
        # without entering the UPDATE state.
        _log.info("POP3 session of {user} timed out", user=self.user)
        self._closing = True
        self._buffer.clear()
        if self._streamer is not None:
            self._streamer.stopProducing()
        self.transport.loseConnection()

    # --- input and pipelining ---------------------------------------------

    def dataReceived(self, data):
        if self._closing:
            return
        self._resetTimeout()
        self._buffer.feed(data)
        self._drain()

    def _drain(self):
        if self._draining:
            return
        self._draining = True
        try:
            while not self._busy and not self._closing:
                event = self._buffer.nextLine()
                if event is None:
                    break
                self._handleEvent(event)
        finally:
            self._draining = False
        self._flowControl()

    def _flowControl(self):
        if self._closing:
            return
        if not self._readPaused and self._buffer.pending() > self.maxBuffered:
            self._readPaused = True
            self.transport.pauseProducing()
        elif self._readPaused and self._buffer.pending() <= self.maxBuffered // 2:
            self._readPaused = False
            self.transport.resumeProducing()

    def _handleEvent(self, event):
        try:
            if isinstance(event, wire.LineTooLong):
                self._abortSASL()
                self._write(wire.err("Line too long"))
                return
            if isinstance(event, wire.BadLine):
                self._abortSASL()
                self._write(wire.err("Invalid characters in command line"))
                return
            if self._sasl is not None:
                result = self._saslResponse(event.data)
            else:
                try:
                    command = wire.parseCommand(event.data)
                except wire.CommandError as e:
                    self._write(wire.err(str(e)))
                    return
                result = self._dispatch(command)
        except _ClientError as e:
            self._write(wire.err(e.text, e.code))
            return
        except wire.CommandError as e:
            self._write(wire.err(str(e)))
            return
        except Exception:
            _log.failure("POP3 command failed for {user}", user=self.user)
            self._write(wire.err("Internal server error", "SYS/TEMP"))
            return
        if isinstance(result, defer.Deferred):
            self._busy = True
            result.addErrback(self._commandFailed)
            result.addBoth(self._commandDone)

    def _commandFailed(self, failure):
        if failure.check(_ClientError):
            self._write(wire.err(failure.value.text, failure.value.code))
        elif failure.check(defer.CancelledError, error.ConnectionLost) and self._closing:
            pass
        else:
            _log.failure("POP3 command failed for {user}", failure, user=self.user)
            self._write(wire.err("Internal server error", "SYS/TEMP"))

    def _commandDone(self, _):
        self._busy = False
        if not self._closing:
            self._drain()

    # --- dispatch -----------------------------------------------------------

    _authorizationCommands = {"USER", "PASS", "APOP", "AUTH", "STLS", "CAPA", "QUIT", "NOOP"}
    _transactionCommands = {"STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET", "NOOP", "QUIT", "CAPA"}

    def _dispatch(self, command):
        name = command.keyword
        allowed = self._authorizationCommands if self.state == AUTHORIZATION else self._transactionCommands
        if name not in allowed:
            raise _ClientError("Command not valid in this state")
        handler = getattr(self, "do_" + name)
        return handler(*command.args)

    # --- capabilities -----------------------------------------------------

    def _secure(self) -> bool:
        return tls.isTLS(self.transport)

    def _plaintextAllowed(self) -> bool:
        if self._secure():
            return True
        allow = self.factory.allowInsecureAuth
        if allow is None:
            return tls.isLoopback(self.transport)
        return bool(allow)

    def _stlsAvailable(self) -> bool:
        return self.factory.tlsContextFactory is not None and not self._secure()

    def _mechanisms(self):
        return self.factory.sasl.available(self._plaintextAllowed())

    def capabilities(self) -> list[bytes]:
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self.state == AUTHORIZATION:
            if self._plaintextAllowed():
                caps.append(b"USER")
            mechs = self._mechanisms()
            if mechs:
                caps.append(b"SASL " + " ".join(mechs).encode("ascii"))
            if self._stlsAvailable():
                caps.append(b"STLS")
        caps += [b"EXPIRE NEVER", b"LOGIN-DELAY 0", b"IMPLEMENTATION mailplat"]
        return caps

    def do_CAPA(self):
        self._write(wire.ok("Capability list follows") + wire.multiline(self.capabilities()))

    def do_NOOP(self):
        self._write(wire.ok())

    # --- STLS -------------------------------------------------------------------

    def do_STLS(self):
        if self._secure():
            raise _ClientError("Command not permitted when TLS active")
        if self.factory.tlsContextFactory is None:
            raise _ClientError("TLS not available")
        self._write(wire.ok("Begin TLS negotiation"))
        # Whatever the client sent after STLS arrived in plaintext: drop it so
        # it cannot be taken as a command of the TLS session.
        self._buffer.clear()
        self._userName = None
        self.transport.startTLS(self.factory.tlsContextFactory)

    # --- USER / PASS / APOP -------------------------------------------------

    def _refusePlaintext(self):
        if not self._plaintextAllowed():
            raise _ClientError(
                "Plaintext authentication disallowed on non-secure connections; use STLS first", "AUTH"
            )

    def do_USER(self, name):
        self._refusePlaintext()
        try:
            self._userName = name.decode("utf-8")
        except UnicodeDecodeError:
            raise _ClientError("User name is not valid UTF-8")
        self._write(wire.ok("Send your password"))

    def do_PASS(self, password):
        self._refusePlaintext()
        name, self._userName = self._userName, None
        if name is None:
            raise _ClientError("USER first")
        return self._login(UsernamePassword(name.encode("utf-8"), password))

    def do_APOP(self, *args):
        raise _ClientError("APOP not supported")

    # --- AUTH (RFC 5034) --------------------------------------------------------

    def do_AUTH(self, mechanism=None, initial=None):
        if mechanism is None:
            names = [n.encode("ascii") for n in self._mechanisms()]
            self._write(wire.ok("Supported mechanisms follow") + wire.multiline(names))
            return None
        name = mechanism.decode("ascii", "replace").upper()
        sasl = self.factory.sasl
        if name not in sasl.names():
            raise _ClientError("Unrecognized authentication type")
        if name not in self._mechanisms():
            self._refusePlaintext()
            raise _ClientError("Mechanism not available")
        mech = sasl.create(name)
        response = wire.decodeBase64(initial) if initial is not None else b""
        self._sasl = mech
        return self._saslStep(response)

    def _saslResponse(self, line):
        if line == b"*":
            self._abortSASL()
            raise _ClientError("Authentication cancelled")
        try:
            response = wire.decodeBase64(line)
        except wire.CommandError:
            self._abortSASL()
            raise _ClientError("Invalid base64 data")
        return self._saslStep(response)

    def _saslStep(self, response):
        try:
            result = self._sasl.step(response)
        except SASLError as e:
            self._abortSASL()
            _log.info("POP3 SASL exchange failed: {reason}", reason=str(e))
            return self._authFailed("Invalid authentication data", None)
        if isinstance(result, Challenge):
            self._buffer.maxLength = wire.MAX_SASL_LINE
            self._write(wire.continuation(result.data))
            return None
        self._abortSASL()
        if isinstance(result, Credentials):
            return self._login(result.credentials)
        raise TypeError(f"unexpected SASL step result {result!r}")

    def _abortSASL(self):
        self._sasl = None
        self._buffer.maxLength = wire.MAX_COMMAND_LINE

    # --- login ------------------------------------------------------------------

    def _login(self, credentials):
        d = self.factory.portal.login(credentials, None, IMailAccount)
        d.addCallbacks(self._loggedIn, self._loginFailed)
        return d

    def _loginFailed(self, failure):
        if failure.check(UnauthorizedLogin, LoginFailed):
            return self._authFailed("Authentication failed", "AUTH")
        _log.failure("POP3 authentication error", failure)
        raise _ClientError("Authentication temporarily unavailable", "SYS/TEMP")

    def _authFailed(self, text, code):
        """Count a failure and answer after a delay that grows with each one."""
        self._authFailures += 1
        if self.factory.metrics is not None:
            self.factory.metrics.inc("mailplat_auth_failures_total", protocol="pop3")
        delay = min(self.factory.authFailureDelay * 2 ** (self._authFailures - 1), self.factory.maxAuthFailureDelay)
        d = defer.Deferred()
        self._delayCall = self._reactor.callLater(delay, d.callback, None)

        def answer(_):
            self._delayCall = None
            if self._authFailures >= self.factory.maxAuthFailures:
                self._write(wire.err("Too many authentication failures", "AUTH"))
                self._close()
                return
            raise _ClientError(text, code)

        return d.addCallback(answer)

    def _loggedIn(self, result):
        _, avatar, logout = result
        user = avatar.username
        if self._closing:
            logout()
            return None
        if not self.factory.locks.acquire(user):
            logout()
            _log.info("POP3 maildrop of {user} is locked", user=user)
            raise _ClientError("Maildrop already locked by another session", "IN-USE")
        self._avatar, self._logout, self.user, self._lockHeld = avatar, logout, user, True
        d = self._openMaildrop()
        d.addCallbacks(self._opened, self._openFailed)
        return d

    @defer.inlineCallbacks
    def _openMaildrop(self):
        store = self.factory.store
        info = yield store.getMailbox(self.user, MAILDROP)
        metas = yield store.fetchMeta(self.user, MAILDROP)
        self._uidvalidity = info.uidvalidity
        self._messages = [
            _Message(m.uid, f"{info.uidvalidity}-{m.uid}", m.size)
            for m in metas
            if not any(f.lower() == "\\deleted" for f in m.flags)
        ]
        cache = self.factory.sizes
        for m in self._messages:
            m.size = cache.get((self.user, self._uidvalidity, m.uid))

    def _opened(self, _):
        if self._closing:
            return
        self.state = TRANSACTION
        _log.info("POP3 login {user}: {count} messages", user=self.user, count=len(self._messages))
        self._write(wire.ok(f"Logged in, {len(self._messages)} messages"))

    def _openFailed(self, failure):
        _log.failure("POP3 could not open the maildrop of {user}", failure, user=self.user)
        self._endLogin()
        self.user = None
        self._messages = []
        code = "SYS/TEMP" if failure.check(TemporaryStoreFailure) or not failure.check(StoreError) else "SYS/PERM"
        raise _ClientError("Unable to open maildrop", code)

    # --- TRANSACTION helpers -------------------------------------------------

    def _number(self, arg) -> tuple[int, _Message]:
        """The message a number names; deleted ones do not exist."""
        try:
            number = wire.parseNumber(arg)
        except wire.CommandError:
            raise _ClientError("Invalid message number")
        if number > len(self._messages) or self._messages[number - 1].deleted:
            raise _ClientError("No such message")
        return number, self._messages[number - 1]

    @defer.inlineCallbacks
    def _ensureSizes(self, messages):
        """Fill in the normalised size of C{messages}, reading their content."""
        cache = self.factory.sizes
        for m in messages:
            if m.size is not None:
                continue
            try:
                content = yield self.factory.store.getContent(self.user, MAILDROP, m.uid)
            except KeyError:
                # Removed meanwhile (by an IMAP EXPUNGE); report what we had.
                m.size = m.storedSize
                continue
            self._setSize(m, content)
            if self._closing:
                return

    def _setSize(self, m, content):
        m.size = wire.normalisedSize(content)
        self.factory.sizes.put((self.user, self._uidvalidity, m.uid), m.size)

    def _live(self):
        return [(i, m) for i, m in enumerate(self._messages, 1) if not m.deleted]

    # --- STAT / LIST / UIDL --------------------------------------------------

    def do_STAT(self):
        live = self._live()

        def answer(_):
            self._write(wire.ok(f"{len(live)} {sum(m.size for _, m in live)}"))

        return self._ensureSizes([m for _, m in live]).addCallback(answer)

    def do_LIST(self, arg=None):
        if arg is not None:
            number, m = self._number(arg)

            def one(_):
                self._write(wire.ok(f"{number} {m.size}"))

            return self._ensureSizes([m]).addCallback(one)
        live = self._live()

        def listing(_):
            total = sum(m.size for _, m in live)
            lines = [f"{i} {m.size}".encode("ascii") for i, m in live]
            self._write(wire.ok(f"{len(live)} messages ({total} octets)") + wire.multiline(lines))

        return self._ensureSizes([m for _, m in live]).addCallback(listing)

    def do_UIDL(self, arg=None):
        if arg is not None:
            number, m = self._number(arg)
            self._write(wire.ok(f"{number} {m.uniqueId}"))
            return None
        lines = [f"{i} {m.uniqueId}".encode("ascii") for i, m in self._live()]
        self._write(wire.ok("Unique-ID listing follows") + wire.multiline(lines))
        return None

    # --- RETR / TOP -------------------------------------------------------------

    def _content(self, m):
        d = self.factory.store.getContent(self.user, MAILDROP, m.uid)

        def gone(failure):
            failure.trap(KeyError)
            raise _ClientError("Message has been removed from the maildrop")

        return d.addErrback(gone)

    def _stream(self, chunks):
        self._streamer = _Streamer(self.transport, chunks, self._resetTimeout)

        def done(result):
            self._streamer = None
            return result

        return self._streamer.start().addBoth(done)

    def do_RETR(self, arg):
        number, m = self._number(arg)

        def send(content):
            if self._closing:
                return None
            self._setSize(m, content)
            self._write(wire.ok(f"{m.size} octets"))
            return self._stream(wire.encodeMessage(wire.iterChunks(content))).addCallback(lambda _: seen())

        def seen():
            d = self.factory.store.storeFlags(self.user, MAILDROP, [m.uid], "add", ["\\Seen"])
            # The message was sent; failing to record \Seen is not the client's problem.
            d.addErrback(lambda f: _log.failure("POP3 could not set \\Seen for {user}", f, user=self.user))
            return d

        return self._content(m).addCallback(send)

    def do_TOP(self, arg, lines):
        number, m = self._number(arg)
        try:
            count = wire.parseNumber(lines, positive=False)
        except wire.CommandError:
            raise _ClientError("Invalid number of lines")

        def send(content):
            if self._closing:
                return None
            self._write(wire.ok("Top of message follows"))
            return self._stream(wire.encodeTop(content, count))

        return self._content(m).addCallback(send)

    # --- DELE / RSET -------------------------------------------------------------

    def do_DELE(self, arg):
        try:
            number = wire.parseNumber(arg)
        except wire.CommandError:
            raise _ClientError("Invalid message number")
        if number > len(self._messages):
            raise _ClientError("No such message")
        m = self._messages[number - 1]
        if m.deleted:
            raise _ClientError(f"Message {number} already deleted")
        m.deleted = True
        self._write(wire.ok(f"Message {number} deleted"))

    def do_RSET(self):
        for m in self._messages:
            m.deleted = False
        self._write(wire.ok(f"Maildrop has {len(self._messages)} messages"))

    # --- QUIT and UPDATE -----------------------------------------------------------

    def do_QUIT(self):
        if self.state != TRANSACTION:
            self._write(wire.ok(f"{self.factory.hostname} POP3 server signing off"))
            self._close()
            return None
        self.state = UPDATE
        uids = [m.uid for m in self._messages if m.deleted]
        d = self._update(uids)

        def finished(reply):
            self._write(reply)
            self._endLogin()
            self._close()

        return d.addCallback(finished)

    @defer.inlineCallbacks
    def _update(self, uids):
        if not uids:
            return wire.ok(f"{self.factory.hostname} POP3 server signing off (maildrop empty or unchanged)")
        store = self.factory.store
        flagged = False
        try:
            yield store.storeFlags(self.user, MAILDROP, uids, "add", ["\\Deleted"])
            flagged = True
            removed = yield store.expunge(self.user, MAILDROP, uids)
        except Exception:
            _log.failure("POP3 UPDATE failed for {user}", user=self.user)
            if flagged:
                try:
                    yield store.storeFlags(self.user, MAILDROP, uids, "remove", ["\\Deleted"])
                except Exception:
                    _log.failure("POP3 could not restore flags of {user}", user=self.user)
            return wire.err("Some deleted messages not removed", "SYS/TEMP")
        _log.info("POP3 {user} expunged {count} messages", user=self.user, count=len(removed))
        return wire.ok(f"{self.factory.hostname} POP3 server signing off ({len(removed)} messages deleted)")


class POP3Factory(protocol.Factory):
    """
    Builds L{POP3Server} sessions.

    @param hostname: the name in the greeting.
    @param portal: a C{twisted.cred} portal that gives L{IMailAccount} avatars.
    @param store: the L{IMessageStore}; the maildrop is each account's INBOX.
    @param sasl: a L{mailplat.auth.sasl.Registry} (default: PLAIN and LOGIN).
    @param tlsContextFactory: enables STLS when given.
    @param allowInsecureAuth: C{True} allows plaintext passwords without TLS
        everywhere, C{False} nowhere, C{None} only on loopback connections.
    @param metrics: a L{mailplat.metrics.Metrics} or C{None}.
    @param reactor: the reactor (for the clock); the global one by default.
    @param idleTimeout: seconds of inactivity before autologout (RFC 1939
        asks for at least 10 minutes); 0 or C{None} disables it.
    """

    protocol = POP3Server

    #: First delay (seconds) before answering a failed login; it doubles with
    #: each failure of the same session, up to L{maxAuthFailureDelay}.
    authFailureDelay = 1.0
    maxAuthFailureDelay = 16.0
    #: Failed logins after which the session is closed.
    maxAuthFailures = 10

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
        idleTimeout=600,
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
        self.locks = locksFor(store)
        self.sizes = _SizeCache()

    def buildProtocol(self, addr):
        return self.protocol(self)
