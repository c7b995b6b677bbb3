"""
The POP3 server: RFC 1939 with RFC 2449 (CAPA, RESP-CODES, AUTH-RESP-CODE,
PIPELINING, EXPIRE, LOGIN-DELAY, IMPLEMENTATION), RFC 2595 section 4 (STLS),
RFC 5034 (SASL AUTH with initial response) and RFC 6856 (UTF8, LANG), on an
L{IMessageStore}.

The maildrop is the account's INBOX.  At login the session reads the INBOX's
metadata once; messages already flagged C{\\Deleted} (by IMAP, say) are left
out.  The unique-id of a message (UIDL) is C{"<uidvalidity>-<uid>"}, stable
for as long as the store keeps the mailbox's UIDVALIDITY.  The maildrop is
locked per account while a session is in the TRANSACTION state; a second
login gets C{-ERR [IN-USE]}.  The lock registry is per store object (shared
by every L{POP3Factory} on that store); for a store with a C{directory}
(the SQLite store) each lock is also an C{flock} on a file under
C{DIRECTORY/locks/}, so processes sharing the store's files (one role per
process) see each other's locks; other nodes sharing a database do not.

UPDATE state: C{QUIT} sets C{\\Deleted} on the messages marked with C{DELE}
and expunges exactly those UIDs; when the store fails, the reply is
C{-ERR [SYS/TEMP]} and the flag is taken off again so the messages stay.
A connection that drops or times out (autologout, RFC 1939 section 3) never
enters UPDATE.  The two store calls (flag, then expunge those UIDs) are two
transactions: should the process die between them, the messages keep
C{\\Deleted}, which already hides them from every later POP3 session, and
an IMAP client sees them flagged for deletion.

C{RETR} sets C{\\Seen} once the message has been sent.  The flag changes
are batched: they are written at most C{seenDelay} (1 s) later, or at once
when C{seenBatch} (256) are waiting, so a client fetching a thousand
messages costs a few store transactions, not a thousand, and no command
waits for them.  Whatever is still pending is written before UPDATE, and
also when the connection drops.  Until then an IMAP session on the same
mailbox sees the message unseen.

Commands are processed strictly one at a time, in the order received, even
though the store answers asynchronously (PIPELINING); anything pipelined
after C{STLS} is discarded before the TLS handshake.  Plaintext passwords
(USER/PASS, SASL PLAIN and LOGIN) are refused before TLS unless the
connection is to a loopback address or C{allowInsecureAuth=True}.

APOP (RFC 1939 section 7) proves knowledge of the password with
C{MD5(timestamp + password)}, so the server must hold the password itself.
It is offered (timestamp in the greeting, command accepted) only when a
checker of the portal can verify C{IUsernameHashedPassword} credentials,
which means it keeps passwords in a recoverable form.  The built-in
checkers (C{directory}, C{file}) keep argon2id hashes, a one-way function,
so with them the greeting has no timestamp and C{APOP} answers
C{-ERR [AUTH] APOP unavailable: ...} saying why and what to use instead.

RFC 2449 capabilities: C{EXPIRE NEVER} (the server itself never deletes
mail; a user or an IMAP client may), C{LOGIN-DELAY n} only when
C{loginDelay} is set (a login sooner than C{n} seconds after the account's
previous one gets C{-ERR [LOGIN-DELAY]}, answered only after the
credentials were checked so it reveals nothing about accounts), and
C{IMPLEMENTATION}.

RFC 6856: C{UTF8 USER} is advertised: user names and passwords are UTF-8
whether or not the C{UTF8} command was given, and C{UTF8} (AUTHORIZATION
state only) switches on UTF-8 mode.  Message content is sent as stored in
both modes (deviation, deliberate: no RFC 6857/6858 downgrade of
internationalised headers; the store keeps the original and every download
client we test handles 8-bit headers, whereas a downgrade would change what
they receive).  All our response texts are ASCII.  C{LANG} lists and
accepts one language, C{en}; a range is matched by RFC 4647 lookup
(C{en-GB} selects C{en}), C{*} selects the default.

Deviations and choices:
- C{AUTH} with no argument lists the available mechanisms as a multi-line
  response (the RFC 1734 behaviour many clients still probe with).
- The sizes in C{STAT}, C{LIST} and the C{RETR} status line are the octets
  of the CRLF-normalised message (see L{mailplat.pop3.wire}); computing them
  reads each message once (eight at a time), the first time a size is
  asked for, and the result is cached per factory.
- After two C{RETR}s of consecutive messages the session reads the next
  C{readAhead} (8) messages of at most 256 KB before they are asked for,
  so the store's latency overlaps with sending.
- After C{maxAuthFailures} failed logins the session says so and closes.
- After C{maxBadCommands} invalid commands in a row (unknown, malformed,
  not valid in the state, over-long or with bad characters) the session
  answers C{-ERR Too many invalid commands} and closes without UPDATE.
  Any valid command resets the count.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import re
import secrets
import weakref
from collections import OrderedDict
from dataclasses import dataclass

from twisted.cred.credentials import IUsernameHashedPassword, UsernamePassword
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IPushProducer

from mailplat.log import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import mailplat
from mailplat import tls
from mailplat.net import IdleTimer, writeNow
from mailplat.auth.sasl import Challenge, Credentials, Registry, SASLError
from mailplat.interfaces.auth import IMailAccount
from mailplat.interfaces.storage import IBatchReadStore, StoreError, TemporaryStoreFailure
from mailplat.pop3 import wire

_log = Logger()

MAILDROP = "INBOX"

AUTHORIZATION = "AUTHORIZATION"
TRANSACTION = "TRANSACTION"
UPDATE = "UPDATE"

#: The reply to APOP when no checker can verify it.
APOP_UNAVAILABLE = (
    "APOP unavailable: passwords are stored as one-way (argon2id) hashes, so an APOP digest "
    "cannot be checked; use USER/PASS or AUTH over TLS"
)

#: RFC 6856 LANG: the languages of our response texts, tag -> description.
LANGUAGES = {"en": "English"}
DEFAULT_LANGUAGE = "en"

_LANGUAGE_RANGE = re.compile(r"\A(\*|[A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})*)\Z")


# --- maildrop locks ---------------------------------------------------------


class MaildropLocks:
    """
    The accounts whose maildrop a session holds, for one store, and when
    each account last logged in (for LOGIN-DELAY).
    """

    def __init__(self, directory: str | None = None):
        self._held: set[str] = set()
        self._lastLogin: dict[str, float] = {}
        #: Where the lock files go (None: this process only).
        self.directory = directory
        self._files: dict[str, int] = {}

    def lastLogin(self, user: str):
        """When C{user} last entered the TRANSACTION state, or C{None}."""
        return self._lastLogin.get(user)

    def recordLogin(self, user: str, when: float) -> None:
        self._lastLogin[user] = when

    def acquire(self, user: str) -> bool:
        if user in self._held:
            return False
        if self.directory is not None:
            # Named by a hash: an account name never becomes a path.
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, hashlib.sha256(user.encode("utf-8")).hexdigest() + ".pop3")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            self._files[user] = fd
        self._held.add(user)
        return True

    def release(self, user: str) -> None:
        self._held.discard(user)
        fd = self._files.pop(user, None)
        if fd is not None:
            os.close(fd)  # closing the file drops its lock

    def isLocked(self, user: str) -> bool:
        return user in self._held


_locksByStore: "weakref.WeakKeyDictionary[object, MaildropLocks]" = weakref.WeakKeyDictionary()


def locksFor(store) -> MaildropLocks:
    """The process-wide lock registry of C{store}."""
    try:
        locks = _locksByStore.get(store)
        if locks is None:
            locks = _locksByStore[store] = MaildropLocks(_lockDirectory(store))
        return locks
    except TypeError:
        # Not weak-referenceable: keep the registry on the store itself.
        locks = getattr(store, "_mailplatPOP3Locks", None)
        if locks is None:
            locks = MaildropLocks(_lockDirectory(store))
            store._mailplatPOP3Locks = locks
        return locks


def _lockDirectory(store):
    directory = getattr(store, "directory", None)
    return os.path.join(directory, "locks") if isinstance(directory, str) else None


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


@implementer(IUsernameHashedPassword)
class APOPCredentials:
    """
    The credentials of an C{APOP name digest} command: C{checkPassword}
    recomputes C{MD5(timestamp + password)} (RFC 1939 section 7).
    """

    def __init__(self, timestamp: bytes, username: bytes, digest: bytes):
        self.timestamp = timestamp
        self.username = username
        self.digest = digest.lower()

    def checkPassword(self, password) -> bool:
        if isinstance(password, str):
            password = password.encode("utf-8")
        expected = hashlib.md5(self.timestamp + password).hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.digest)


_HEX_DIGEST = re.compile(rb"\A[0-9A-Fa-f]{32}\Z")


class _Failed:
    """A failure kept as a value (of a read ahead nobody may ask for)."""

    def __init__(self, failure):
        self.failure = failure


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
        self._idle = IdleTimer(self._reactor, factory.idleTimeout, self._timedOut)
        self._delayCall = None
        self._streamer = None
        self._userName = None  # from USER, waiting for PASS
        self._sasl = None  # mechanism while an AUTH exchange runs
        self._authFailures = 0
        self._badCommands = 0
        self._apopTimestamp = None
        self._utf8 = False
        self.language = DEFAULT_LANGUAGE
        self._seenPending: list[int] = []
        self._seenWaiters: list = []
        self._seenBusy = False
        self._seenTimer = None
        self._prefetched: dict = {}  # message number -> (uid, Deferred of content or _Failed)
        self._aheadRange = range(0)  # RETRs of these numbers start no read ahead
        self._lastRetrieved = -1
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
        greeting = f"{self.factory.hostname} POP3 server ready"
        if self.factory.apopAvailable():
            # RFC 1939 section 7: a timestamp unique to this session.
            self._apopTimestamp = (
                f"<{os.getpid()}.{secrets.token_hex(8)}.{int(self._reactor.seconds())}@{self.factory.hostname}>"
            )
            greeting += " " + self._apopTimestamp
        self._write(wire.ok(greeting))

    def connectionLost(self, reason=protocol.connectionDone):
        if not self._connected:
            return
        self._connected = False
        self._closing = True
        self._idle.cancel()
        if self._delayCall is not None and self._delayCall.active():
            self._delayCall.cancel()
        self._delayCall = None
        if self._streamer is not None:
            self._streamer.stopProducing()
        self._prefetched.clear()
        self._aheadRange = range(0)
        # Messages sent before the connection dropped were seen all the same.
        self._flushSeen()
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
            writeNow(self.transport, data)

    def _close(self):
        """Close after what has been written (QUIT, too many failures)."""
        if self._closing:
            return
        self._closing = True
        self._buffer.clear()
        self.transport.loseConnection()

    # --- idle timeout -----------------------------------------------------

    def _resetTimeout(self):
        if not self._closing:
            self._idle.touch()

    def _timedOut(self):
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

    def _badCommand(self, text):
        """Answer an invalid command; close after too many in a row."""
        self._badCommands += 1
        limit = self.factory.maxBadCommands
        if limit and self._badCommands >= limit:
            _log.info("POP3 session of {user} closed after {count} invalid commands",
                      user=self.user, count=self._badCommands)
            self._write(wire.err("Too many invalid commands"))
            self._close()
            return
        self._write(wire.err(text))

    def _handleEvent(self, event):
        try:
            if isinstance(event, wire.LineTooLong):
                self._abortSASL()
                self._badCommand("Line too long")
                return
            if isinstance(event, wire.BadLine):
                self._abortSASL()
                self._badCommand("Invalid characters in command line")
                return
            if self._sasl is not None:
                result = self._saslResponse(event.data)
            else:
                try:
                    command = wire.parseCommand(event.data)
                except wire.CommandError as e:
                    self._badCommand(str(e))
                    return
                if not self._validInState(command.keyword):
                    self._badCommand("Command not valid in this state")
                    return
                self._badCommands = 0
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

    _authorizationCommands = {"USER", "PASS", "APOP", "AUTH", "STLS", "CAPA", "QUIT", "NOOP", "UTF8", "LANG"}
    _transactionCommands = {"STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET", "NOOP", "QUIT", "CAPA", "LANG"}

    def _validInState(self, name):
        if self.state == AUTHORIZATION:
            return name in self._authorizationCommands
        if self.state == TRANSACTION:
            return name in self._transactionCommands
        return False

    def _dispatch(self, command):
        handler = getattr(self, "do_" + command.keyword)
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
            if self._apopTimestamp is not None:
                caps.append(b"APOP")
        caps.append(b"EXPIRE NEVER")
        if self.factory.loginDelay:
            caps.append(b"LOGIN-DELAY %d" % self.factory.loginDelay)
        if self.state == AUTHORIZATION:
            caps.append(b"IMPLEMENTATION mailplat")
        else:
            caps.append(b"IMPLEMENTATION mailplat-" + mailplat.__version__.encode("ascii"))
        caps += [b"UTF8 USER", b"LANG"]
        return caps

    def do_CAPA(self):
        self._write(wire.ok("Capability list follows") + wire.multiline(self.capabilities()))

    def do_NOOP(self):
        self._write(wire.ok())

    # --- RFC 6856: UTF8 and LANG ---------------------------------------------

    def do_UTF8(self):
        self._utf8 = True
        self._write(wire.ok("UTF-8 mode enabled"))

    def do_LANG(self, arg=None):
        if arg is None:
            lines = [f"{tag} {name}".encode("utf-8") for tag, name in LANGUAGES.items()]
            self._write(wire.ok("Language listing follows") + wire.multiline(lines))
            return
        try:
            wanted = arg.decode("ascii")
        except UnicodeDecodeError:
            wanted = ""
        if not _LANGUAGE_RANGE.match(wanted):
            raise _ClientError("Invalid language range")
        tag = self._lookupLanguage(wanted.lower())
        if tag is None:
            raise _ClientError("Unsupported language")
        self.language = tag
        self._write(wire.ok(f"{tag} Language is {LANGUAGES[tag]}"))

    @staticmethod
    def _lookupLanguage(wanted):
        """RFC 4647 section 3.4 lookup of one language range."""
        if wanted == "*":
            return DEFAULT_LANGUAGE
        while wanted:
            if wanted in LANGUAGES:
                return wanted
            wanted = wanted.rpartition("-")[0]
            # A single-letter subtag left at the end is dropped with its neighbour.
            if len(wanted) > 2 and wanted[-2] == "-":
                wanted = wanted[:-2]
        return None

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

    def do_APOP(self, name, digest):
        if self._apopTimestamp is None:
            raise _ClientError(APOP_UNAVAILABLE, "AUTH")
        if not _HEX_DIGEST.match(digest):
            raise _ClientError("Invalid APOP digest")
        try:
            name.decode("utf-8")
        except UnicodeDecodeError:
            raise _ClientError("User name is not valid UTF-8")
        self._userName = None
        return self._login(APOPCredentials(self._apopTimestamp.encode("utf-8"), name, digest))

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
        response = wire.decodeBase64(initial) if initial is not None else None
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
        delay = self.factory.loginDelay
        last = self.factory.locks.lastLogin(user) if delay else None
        if last is not None and self._reactor.seconds() - last < delay:
            logout()
            _log.info("POP3 login of {user} within the login delay", user=user)
            raise _ClientError(f"Minimum time between logins is {delay} seconds", "LOGIN-DELAY")
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
        if self.factory.loginDelay:
            self.factory.locks.recordLogin(self.user, self._reactor.seconds())
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

    #: Message contents read at once to compute sizes.
    sizeReadAhead = 8

    def _ensureSizes(self, messages):
        """
        Fill in the normalised size of C{messages}, reading the content of
        those whose size is not known yet, a few at a time.
        """
        missing = [m for m in messages if m.size is None]
        if not missing:
            return defer.succeed(None)
        semaphore = defer.DeferredSemaphore(self.sizeReadAhead)
        if IBatchReadStore.providedBy(self.factory.store):
            return self._ensureSizesBatched(missing)

        def measure(m):
            if self._closing or m.size is not None:
                return None
            d = self.factory.store.getContent(self.user, MAILDROP, m.uid)

            def gone(failure):
                # Removed meanwhile (by an IMAP EXPUNGE); report what we had.
                failure.trap(KeyError)
                m.size = m.storedSize

            return d.addCallbacks(lambda content: self._setSize(m, content), gone)

        return defer.gatherResults(
            [semaphore.run(measure, m) for m in missing], consumeErrors=True
        ).addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError) else f)

    #: With L{IBatchReadStore}: the stored octets read per round trip while
    #: measuring sizes (a bigger message goes alone).
    sizeBatchBytes = 1024 * 1024

    def _ensureSizesBatched(self, missing):
        batches, batch, used = [], [], 0
        for m in missing:
            if batch and used + m.storedSize > self.sizeBatchBytes:
                batches.append(batch)
                batch, used = [], 0
            batch.append(m)
            used += m.storedSize
        if batch:
            batches.append(batch)
        semaphore = defer.DeferredSemaphore(2)

        def measure(batch):
            batch = [m for m in batch if m.size is None]
            if self._closing or not batch:
                return None

            def got(contents):
                for m in batch:
                    content = contents.get(m.uid)
                    if content is None:
                        # Removed meanwhile (by an IMAP EXPUNGE); report what we had.
                        m.size = m.storedSize
                    else:
                        self._setSize(m, content)

            return self.factory.store.getContents(self.user, MAILDROP, [m.uid for m in batch]).addCallback(got)

        return defer.gatherResults(
            [semaphore.run(measure, b) for b in batches], consumeErrors=True
        ).addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError) else f)

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

    #: After two RETRs of consecutive messages, the content of this many
    #: following messages is read before the client asks for it, so the
    #: store's latency overlaps with sending.  Only messages up to
    #: L{readAheadMaxSize} octets are read ahead (memory stays bounded).
    #: With a store that reads many messages at once (L{IBatchReadStore}),
    #: the window is refilled once half of it has been used: one store
    #: round trip per C{readAhead // 2} messages, not one per message.
    readAhead = 32
    readAheadMaxSize = 256 * 1024
    #: The window with a store that reads one message per round trip.
    singleReadAhead = 8

    def _content(self, m, number=None):
        """
        The content of C{m}: the bytes themselves when read ahead and
        arrived (the common case of a download, answered without a
        Deferred), else a Deferred firing with them.
        """
        ahead = self._prefetched.pop(number, None) if number is not None else None
        if ahead is not None and ahead[0] == m.uid and isinstance(ahead[1], bytes):
            return ahead[1]
        if ahead is not None and ahead[0] == m.uid and isinstance(ahead[1], _Failed):
            d = defer.fail(ahead[1].failure)
        elif ahead is not None and ahead[0] == m.uid:
            d = defer.Deferred()

            def deliver(result):
                if isinstance(result, _Failed):
                    d.errback(result.failure)
                else:
                    d.callback(result)

            ahead[1].addCallback(deliver)
        else:
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

    def _send(self, status, content, encode):
        """Write C{status} and the encoded C{content}: at once when small, else streamed."""
        if len(content) <= wire.CHUNK_SIZE:
            self._write(b"".join([status, *encode([content])]))
            return None
        self._write(status)
        return self._stream(encode(wire.iterChunks(content)))

    def _readAheadFrom(self, number):
        """Start reading the messages after C{number}; forget those before it."""
        store = self.factory.store
        batched = IBatchReadStore.providedBy(store)
        if batched and number in self._aheadRange:
            return  # more than half the window is still being read or held
        for k in [k for k in self._prefetched if k <= number]:
            del self._prefetched[k]
        window = self.readAhead if batched else min(self.readAhead, self.singleReadAhead)
        last = min(number + window, len(self._messages))
        todo = []
        for k in range(number + 1, last + 1):
            m = self._messages[k - 1]
            if k in self._prefetched or m.deleted or m.storedSize > self.readAheadMaxSize:
                continue
            todo.append((k, m))
        if not todo:
            return
        if not batched:
            for k, m in todo:
                d = store.getContent(self.user, MAILDROP, m.uid)
                # Kept as a value: nobody may ever ask for it.
                d.addErrback(_Failed)
                self._prefetched[k] = (m.uid, d)
            return
        if len(todo) < self.readAhead // 2 and last < len(self._messages):
            return  # wait until half the window is used: fewer, bigger reads
        parts = [(k, m.uid, defer.Deferred()) for k, m in todo]
        for k, uid, d in parts:
            self._prefetched[k] = (uid, d)
        # Until the client is past the middle of this window, no new read.
        self._aheadRange = range(number, max(number, last - self.readAhead // 2))

        def split(result):
            for k, uid, d in parts:
                if isinstance(result, _Failed):
                    value = result
                elif uid in result:
                    value = result[uid]
                else:
                    value = _Failed(Failure(KeyError(uid)))
                held = self._prefetched.get(k)
                if held is not None and held[1] is d:
                    # Not asked for yet: keep the value itself.
                    self._prefetched[k] = (uid, value)
                d.callback(value)

        store.getContents(self.user, MAILDROP, [uid for _, uid, _ in parts]).addErrback(_Failed).addCallback(split)

    def do_RETR(self, arg):
        number, m = self._number(arg)
        sequential = number == self._lastRetrieved + 1
        self._lastRetrieved = number
        content = self._content(m, number)
        if sequential and self.readAhead:
            self._readAheadFrom(number)

        def send(content):
            if self._closing:
                return None
            if m.size is None:
                self._setSize(m, content)
            d = self._send(wire.ok(f"{m.size} octets"), content, wire.encodeMessage)
            if d is None:
                self._seen(m.uid)
                return None
            return d.addCallback(lambda _: self._seen(m.uid))

        if isinstance(content, bytes):
            return send(content)
        return content.addCallback(send)

    # --- \Seen, batched ----------------------------------------------------------

    #: Retrieved messages get C{\\Seen} at most this many seconds later,
    #: or at once when L{seenBatch} of them are waiting.
    seenDelay = 1.0
    seenBatch = 256

    def _seen(self, uid):
        """Record that C{uid} was retrieved; the flag is written in the background."""
        self._seenPending.append(uid)
        if len(self._seenPending) >= self.seenBatch:
            self._pumpSeen()
        elif self._seenTimer is None:
            self._seenTimer = self._reactor.callLater(self.seenDelay, self._seenTimerFired)

    def _seenTimerFired(self):
        self._seenTimer = None
        self._pumpSeen()

    def _flushSeen(self):
        """
        Write every pending C{\\Seen} flag now; fires when done (or failed:
        the message was sent, so a lost flag is logged, not reported).
        """
        if self._seenTimer is not None:
            if self._seenTimer.active():
                self._seenTimer.cancel()
            self._seenTimer = None
        waiter = defer.Deferred()
        self._seenWaiters.append(waiter)
        self._pumpSeen()
        return waiter

    def _pumpSeen(self):
        if self._seenBusy:
            return
        if not self._seenPending or self.user is None:
            self._seenPending = []
            waiters, self._seenWaiters = self._seenWaiters, []
            for waiter in waiters:
                waiter.callback(None)
            return
        self._seenBusy = True
        uids, self._seenPending = self._seenPending, []
        user = self.user
        d = self.factory.store.storeFlags(user, MAILDROP, uids, "add", ["\\Seen"])
        d.addErrback(lambda f: _log.failure("POP3 could not set \\Seen for {user}", f, user=user))

        def done(_):
            self._seenBusy = False
            if self._seenWaiters or not self._seenPending or len(self._seenPending) >= self.seenBatch:
                self._pumpSeen()
            elif self._seenTimer is None and self._connected:
                self._seenTimer = self._reactor.callLater(self.seenDelay, self._seenTimerFired)

        d.addCallback(done)

    def do_TOP(self, arg, lines):
        number, m = self._number(arg)
        try:
            count = wire.parseNumber(lines, positive=False)
        except wire.CommandError:
            raise _ClientError("Invalid number of lines")

        def send(content):
            if self._closing:
                return None
            return self._send(wire.ok("Top of message follows"), wire.topOf(content, count), wire.encodeMessage)

        content = self._content(m)
        if isinstance(content, bytes):
            return send(content)
        return content.addCallback(send)

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
        self._prefetched.pop(number, None)
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
        d = self._flushSeen()
        d.addCallback(lambda _: self._update(uids))

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
    @param apop: C{None} (the default) offers APOP exactly when a checker of
        C{portal} accepts C{IUsernameHashedPassword}; C{False} never offers
        it.  C{True} is the same as C{None}: APOP cannot work without such a
        checker.
    @param loginDelay: RFC 2449 LOGIN-DELAY: the least number of seconds
        between two logins of one account (per process); 0 disables it.
    """

    protocol = POP3Server

    #: First delay (seconds) before answering a failed login; it doubles with
    #: each failure of the same session, up to L{maxAuthFailureDelay}.
    authFailureDelay = 1.0
    maxAuthFailureDelay = 16.0
    #: Failed logins after which the session is closed.
    maxAuthFailures = 10
    #: Invalid commands in a row after which the session is closed (0: never).
    maxBadCommands = 20

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
        apop=None,
        loginDelay=0,
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
        self.apop = apop
        self.loginDelay = int(loginDelay or 0)
        self.locks = locksFor(store)
        self.sizes = _SizeCache()

    def apopAvailable(self) -> bool:
        """Whether APOP can be checked: see the C{apop} parameter."""
        if self.apop is False:
            return False
        try:
            interfaces = self.portal.listCredentialsInterfaces()
        except AttributeError:
            return False
        return IUsernameHashedPassword in interfaces

    def buildProtocol(self, addr):
        return self.protocol(self)
