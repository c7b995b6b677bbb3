"""
The SMTP server session: RFC 5321 with the extensions mailplat offers.

L{SMTPFactory} builds one L{SMTPServer} per connection.  The wire format
(command lines, addresses, DATA, replies) lives in L{mailplat.smtp.wire};
this module holds the session state and talks to the router, the queue, the
cred portal and the pre-queue hooks.

Implemented:

  - RFC 5321: HELO, EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT, VRFY and EXPN
    (both C{252 2.5.0}: no address harvesting), HELP.  A C{Received:} header
    (§4.4) is prepended to every message; the transaction is reset after
    DATA, RSET, HELO/EHLO and STARTTLS.  A C{554} connect-time rejection by
    a hook answers C{503} to everything but QUIT (§3.1).
  - RFC 1870 SIZE, RFC 1652 8BITMIME (C{BODY=7BIT|8BITMIME}), RFC 2920
    PIPELINING: commands are handled one at a time and answered strictly in
    order, even when the router, the hooks or the portal answer later; input
    is paused while too much is buffered.
  - RFC 2034 / RFC 3463 ENHANCEDSTATUSCODES on every reply except the
    greeting and the replies to HELO/EHLO (RFC 2034 §3), and 3xx replies.
  - RFC 3207 STARTTLS: whatever the client sent after the STARTTLS line
    before the handshake is thrown away, and the session forgets the
    HELO/EHLO name and any authentication (§4.2).
  - RFC 4954 AUTH with the mechanisms of L{mailplat.auth.sasl.Registry}:
    initial responses, C{=} for an empty one, C{*} to cancel, AUTH lines up
    to 12288 octets.  Plaintext mechanisms are only offered over TLS, on a
    loopback connection (by default), or when C{allowInsecureAuth=True}.
    Failed attempts are answered later each time (1 s, 2 s, 4 s, ...) and
    the connection is closed after too many.
  - RFC 3848 protocol names in C{Received:} and in the envelope (SMTP,
    ESMTP, ESMTPA, ESMTPS, ESMTPSA).
  - RFC 6409 / RFC 8314: the C{submission} role requires AUTH before MAIL;
    C{submissions} is the same on an implicit-TLS listener, where STARTTLS
    is not offered.

  - RFC 3030 CHUNKING and BINARYMIME: C{BDAT n [LAST]} reads exactly n
    octets (also when the command is refused, so the session stays in
    step), mixes with PIPELINING, keeps BINARYMIME content byte-exact;
    DATA after BDAT or with C{BODY=BINARYMIME} is C{503 5.5.1}; a refused
    chunk (size, bare line ends, long lines) ends the transaction.
  - RFC 3461 DSN: C{RET}, C{ENVID} (MAIL), C{NOTIFY}, C{ORCPT} (RCPT) are
    validated (xtext, lengths, values) and kept, normalised, in the
    envelope's C{mailParams}/C{rcptParams} for the outbound transport.
  - RFC 6531 SMTPUTF8: with the C{SMTPUTF8} MAIL parameter, addresses and
    header fields may hold UTF-8 (protocol C{UTF8SMTP*} in Received:);
    without it a UTF-8 address is C{553 5.6.7} and a UTF-8 header field
    C{550 5.6.7} (configurable for legacy senders).
  - Limits: command lines (512), text lines in content (1000, RFC 5321
    §4.5.3.1.6: C{550 5.6.0}), recipients per message, messages per
    connection (C{421 4.7.0}), errors per connection, AUTH failures.
  - No open relay: the router decides, and a refused recipient whose local
    part names another host (C{user%other@ours}, C{"user@other"@ours},
    C{other!user@ours}) or that has two C{@} is answered C{550 5.7.1}.
  - Hooks also get the optional C{headers} stage (end of data, header
    section only) and C{disconnect}; pass-through stages are skipped.
  - SASL mechanisms are offered only when the portal has a checker for
    their credentials (CRAM-MD5 needs a plaintext-capable checker); a
    mechanism's step may answer with a Deferred (SCRAM-SHA-256).

Deviations and choices:

  - One trailing dot after a domain is accepted and dropped
    (C{user@example.org.}); RFC 5321 does not allow it but it is common.
  - Non-plaintext mechanisms (SCRAM-SHA-256) are offered before TLS: they
    never expose the password.
  - The C{Received:} header names the client by its HELO name and address
    literal (C{from helo ([192.0.2.1])}); no reverse DNS lookup is made in
    the session.  The C{for} clause is written only for a single recipient
    (so a message to many does not list them all), and the C{id} is made by
    the session because the queue ID is known only at commit.
  - The pre-queue C{rcpt} hooks are consulted only for recipients the
    router accepted (a hook cannot turn a router rejection into an accept),
    and the C{data} hooks get the message as the client sent it (without
    the C{Received:} header the server adds).
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import functools
import ipaddress
import secrets

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.internet.protocol import Protocol, ServerFactory

from mailplat.log import Logger
from mailplat.net import IdleTimer, WriteGate, writeNow
from twisted.python.failure import Failure

from mailplat.auth.sasl import Challenge, Credentials, Registry, SASLAuthenticationFailed, SASLError
from mailplat.interfaces.auth import IMailAccount
from mailplat.interfaces.hooks import ACCEPT, CONTINUE, DISCONNECT, REJECT_PERM, REJECT_TEMP, Decision, SMTPContext
from mailplat.interfaces.queue import Envelope
from mailplat.interfaces.routing import RoutingRequest
from mailplat.smtp import wire
from mailplat.smtp.wire import Reply, SMTPError
from mailplat.tls import isLoopback, isTLS

__all__ = ["SMTPContext", "SMTPFactory", "SMTPServer"]

_log = Logger()

ROLES = ("mx", "submission", "submissions")

#: Pause reading from the client while this much unprocessed input is buffered.
PAUSE_THRESHOLD = 64 * 1024


_PROCEED = Decision.proceed()


class SMTPFactory(ServerFactory):
    """
    Builds L{SMTPServer} sessions.

    @param hostname: the name the server uses for itself (greeting, Received).
    @param portal: a C{twisted.cred} portal handing out L{IMailAccount} avatars.
    @param router: an L{mailplat.interfaces.routing.IRouter}.
    @param queue: an L{mailplat.interfaces.queue.IQueue}.
    @param sasl: a L{mailplat.auth.sasl.Registry} (default: PLAIN and LOGIN).
    @param tlsContextFactory: offered with STARTTLS when given.
    @param role: C{"mx"} (AUTH only with C{authOnMX=True}), C{"submission"}
        (AUTH required before MAIL) or C{"submissions"} (the same, on an
        implicit-TLS listener).
    @param hooks: L{mailplat.interfaces.hooks.ISMTPHook}s, consulted in order.
    @param allowInsecureAuth: C{True}: plaintext mechanisms without TLS
        everywhere; C{False}: never; C{None}: only on loopback connections.
    @param normaliseBareLineEndings: convert bare CR/LF in DATA (and in
        non-BINARYMIME BDAT content) to CRLF instead of refusing the message.
    @param maxLineLength: longest command line, with its CRLF (RFC 5321: 512).
    @param maxTextLineLength: longest text line in DATA or non-BINARYMIME
        BDAT content, with its CRLF (RFC 5321: 1000); C{0}: no limit.
    @param maxRecipients: recipients per message (more: C{452 4.5.3}).
    @param maxMessagesPerConnection: messages per connection (then MAIL
        answers C{421 4.7.0} and the connection is closed).
    @param maxErrors: error replies before C{421} and disconnection.
    @param maxAuthFailures: failed AUTH exchanges before C{421}.
    @param eightBitHeaders: accept non-ASCII header fields without
        SMTPUTF8 (legacy senders); by default they are refused with
        C{550 5.6.7} as RFC 6532/6531 say.
    """

    protocol = None  # set below

    def __init__(
        self,
        *,
        hostname,
        portal,
        router,
        queue,
        sasl=None,
        tlsContextFactory=None,
        role="mx",
        hooks=(),
        maxMessageSize=50 * 1024 * 1024,
        maxRecipients=1000,
        allowInsecureAuth=None,
        metrics=None,
        reactor=None,
        idleTimeout=300,
        authOnMX=False,
        maxLineLength=wire.COMMAND_LINE_LENGTH,
        maxErrors=20,
        maxAuthFailures=5,
        normaliseBareLineEndings=False,
        maxTextLineLength=wire.TEXT_LINE_LENGTH,
        maxMessagesPerConnection=1000,
        eightBitHeaders=False,
    ):
        if role not in ROLES:
            raise ValueError(f"unknown SMTP role {role!r}; expected one of {', '.join(ROLES)}")
        if reactor is None:
            from twisted.internet import reactor
        self.hostname = hostname
        self.portal = portal
        self.router = router
        self.queue = queue
        self.sasl = sasl if sasl is not None else Registry()
        self.tlsContextFactory = tlsContextFactory
        self.role = role
        self.hooks = tuple(hooks)
        self.maxMessageSize = maxMessageSize
        self.maxRecipients = maxRecipients
        self.allowInsecureAuth = allowInsecureAuth
        self.metrics = metrics
        self.reactor = reactor
        self.idleTimeout = idleTimeout
        self.authOnMX = authOnMX
        self.maxLineLength = maxLineLength
        self.maxErrors = maxErrors
        self.maxAuthFailures = maxAuthFailures
        self.normaliseBareLineEndings = normaliseBareLineEndings
        self.maxTextLineLength = maxTextLineLength
        self.maxMessagesPerConnection = maxMessagesPerConnection
        self.eightBitHeaders = eightBitHeaders

    @property
    def authEnabled(self) -> bool:
        return self.role != "mx" or self.authOnMX

    @property
    def authRequired(self) -> bool:
        return self.role != "mx"

    def buildProtocol(self, addr):
        p = SMTPServer()
        p.factory = self
        return p


def _sanitiseName(name: str, limit: int = 255) -> str:
    """A client-supplied name made safe for a header comment or a log line."""
    cleaned = "".join(c if ("!" <= c <= "~" and c not in "()\\;") else "?" for c in name)
    return cleaned[:limit] or "?"


@functools.lru_cache(maxsize=4096)
def _addressLiteral(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return f"[{_sanitiseName(host)}]"
    if ip.version == 6:
        return f"[IPv6:{ip.compressed}]"
    return f"[{ip}]"


@functools.lru_cache(maxsize=4)
def _receivedDate(second: int) -> str:
    """The date of a Received header (RFC 5322 §3.3), made once per second."""
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(second, datetime.timezone.utc))


class SMTPServer(Protocol):
    """One SMTP session.  See the module docstring for what it implements."""

    factory: SMTPFactory

    def __init__(self):
        self._closed = False
        self._busy = False
        self._dataMode = False
        self._paused = False
        self._gate = None
        self._rejectedAtConnect = False
        self._helo = None
        self._heloIsDomain = False
        self._esmtp = False
        self._tls = False
        self._user = ""
        self._logout = None
        self._errors = 0
        self._authFailures = 0
        self._sasl = None
        self._idle = None
        self._delayedCall = None
        self._txn = None
        self._decoder = None
        self._hookChunks = None
        self._writeFailed = False
        self._messageId = ""
        self._messages = 0
        self._chunkRemaining = 0  # octets of the current BDAT chunk still to read
        self._chunk = None  # the BDAT command being read: (size, last, error)
        self._checker = None
        self._normaliser = None
        self._envelope = None
        self.sessionId = secrets.token_hex(6).upper()
        self._resetTransaction()

    # -- helpers --------------------------------------------------------------

    @property
    def _reactor(self):
        return self.factory.reactor

    def _inc(self, name, **labels):
        if self.factory.metrics is not None:
            self.factory.metrics.inc(name, **labels)

    def _resetTransaction(self):
        if self._txn is not None:
            # RSET, EHLO or an error during a BDAT transaction: the partial
            # message is thrown away.
            self._abortData()
        self._bdatStarted = False
        self._bdatSize = 0
        self._utf8 = False
        self._sender = None
        self._mailParams = {}
        self._recipients = []
        self._rcptParams = []
        self._routes = []

    def _context(self) -> SMTPContext:
        peer = self.transport.getPeer()
        return SMTPContext(
            sessionId=self.sessionId,
            hostname=self.factory.hostname,
            role=self.factory.role,
            clientAddress=getattr(peer, "host", "") or "",
            clientPort=getattr(peer, "port", 0) or 0,
            clientName=self._helo or "",
            tls=self._tls,
            authenticatedUser=self._user,
            sender=self._sender,
            mailParams=dict(self._mailParams),
            recipients=tuple(self._recipients),
            rcptParams=tuple(self._rcptParams),
            routes=tuple(self._routes),
        )

    def _clientAddress(self) -> str:
        return getattr(self.transport.getPeer(), "host", "") or ""

    #: Replies made while the command loop runs, sent together when it
    #: stops (one write for a pipelined group, RFC 2920 section 3.2).
    _corked = None

    def _send(self, data: bytes):
        if self._closed:
            return
        if self._corked is not None:
            self._corked.append(data)
        else:
            writeNow(self.transport, data)
        self._touch()

    def _uncork(self):
        corked, self._corked = self._corked, None
        if corked and not self._closed:
            writeNow(self.transport, b"".join(corked))

    def reply(self, code, enhanced="", text="", *, plain=False):
        """Send a reply; C{plain} leaves out the enhanced status code (RFC 2034 §3)."""
        r = code if isinstance(code, Reply) else Reply(code, enhanced, text)
        self._send(r.encode(enhanced=not plain))
        if r.code in (500, 501, 502, 503, 504, 555):
            self._errors += 1
            if self._errors >= self.factory.maxErrors and not self._closed:
                _log.info(
                    "SMTP {session}: too many errors from {client}",
                    session=self.sessionId,
                    client=self._clientAddress(),
                )
                text = f"{self.factory.hostname} Too many errors, closing connection"
                self._send(Reply(421, "4.7.0", text).encode())
                self._close()

    def _close(self):
        if self._closed:
            return
        self._uncork()
        self._closed = True
        self.transport.loseConnection()

    def _touch(self):
        if self._closed:
            return
        if self._idle is None:
            self._idle = IdleTimer(self._reactor, self.factory.idleTimeout, self._idleTimedOut)
        self._idle.touch()

    def _idleTimedOut(self):
        if self._closed:
            return
        _log.info("SMTP {session}: idle timeout for {client}", session=self.sessionId, client=self._clientAddress())
        self._send(Reply(421, "4.4.2", f"{self.factory.hostname} Error: timeout exceeded").encode())
        self._close()

    def _secureForAuth(self) -> bool:
        if self._tls:
            return True
        allow = self.factory.allowInsecureAuth
        if allow is None:
            return isLoopback(self.transport)
        return bool(allow)

    def _verifiable(self, name) -> bool:
        """Whether the portal has a checker for what mechanism C{name} produces."""
        portal = self.factory.portal
        mechanism = self.factory.sasl.mechanism(name) if hasattr(self.factory.sasl, "mechanism") else None
        wanted = getattr(mechanism, "credentialInterfaces", None)
        if not wanted or portal is None:
            return True
        known = portal.listCredentialsInterfaces()
        return any(i in known for i in wanted)

    def _authMechanisms(self) -> list:
        if not self.factory.authEnabled:
            return []
        return [n for n in self.factory.sasl.available(secure=self._secureForAuth()) if self._verifiable(n)]

    def _protocolName(self) -> str:
        if not self._esmtp:
            return "SMTP"
        # RFC 3848; RFC 6531 §3.7.3 for messages sent with SMTPUTF8.
        base = "UTF8SMTP" if self._utf8 else "ESMTP"
        return base + ("S" if self._tls else "") + ("A" if self._user else "")

    # -- connection -------------------------------------------------------------

    def connectionMade(self):
        f = self.factory
        self._tls = isTLS(self.transport) or f.role == "submissions"
        self._reader = wire.LineReader(f.maxLineLength, wire.EXTENDED_LINE_LENGTHS)
        if f.metrics is not None:
            f.metrics.sessionOpened("smtp")
        _log.debug("SMTP {session}: connection from {client}", session=self.sessionId, client=self._clientAddress())
        self._touch()
        self._busy = True
        d = self._runHooks("connect")
        d.addCallback(self._greet)
        d.addErrback(self._internalError)
        d.addBoth(self._finished)

    def _greet(self, decision):
        host = self.factory.hostname
        # A refusal at connect carries the hook's enhanced code, as the
        # connection limits' 421 4.7.0 does (RFC 2034 leaves only the 220
        # greeting without one).
        if decision.action in (REJECT_TEMP, DISCONNECT):
            self.reply(421, decision.enhanced or "4.7.0", f"{host} {decision.text or 'Service not available'}")
            self._close()
        elif decision.action == REJECT_PERM:
            self._rejectedAtConnect = True
            self.reply(554, decision.enhanced or "5.7.1", f"{host} {decision.text or 'No SMTP service here'}")
        else:
            self.reply(220, "", f"{host} ESMTP mailplat", plain=True)

    def connectionLost(self, reason=None):
        wasClosed = self._closed
        self._closed = True
        if self._idle is not None:
            self._idle.cancel()
        if self._gate is not None:
            self._gate.stop()
        if self._delayedCall is not None and self._delayedCall.active():
            self._delayedCall.cancel()
        self._delayedCall = None
        self._abortData()
        self._dropAuth()
        self._disconnectHooks()
        if self.factory.metrics is not None:
            self.factory.metrics.sessionClosed("smtp")
        _log.debug(
            "SMTP {session}: connection closed ({how})",
            session=self.sessionId,
            how="by server" if wasClosed else "by client",
        )

    def _disconnectHooks(self):
        """Tell the hooks that keep per-connection state (connection limits) that it ended."""
        hooks = [h for h in self.factory.hooks if _wants(h, "disconnect")]
        if not hooks or self.transport is None:
            return
        try:
            context = self._context()
        except Exception:
            _log.failure("SMTP {session}: no context for the disconnect hooks", session=self.sessionId)
            return
        for hook in hooks:
            d = defer.maybeDeferred(hook.disconnect, context)
            d.addErrback(
                lambda f, h=hook: _log.failure(
                    "SMTP {session}: hook {hook} failed at disconnect",
                    f,
                    session=self.sessionId,
                    hook=getattr(h, "name", repr(h)),
                )
            )

    def _dropAuth(self):
        logout, self._logout = self._logout, None
        self._user = ""
        if logout is not None:
            try:
                logout()
            except Exception:
                _log.failure("SMTP {session}: avatar logout failed", session=self.sessionId)

    def dataReceived(self, data):
        if self._closed:
            return
        self._touch()
        if not self._busy and not self._inLoop and not len(self._reader):
            # The common cases while a body streams in: straight to the decoder.
            if self._dataMode:
                self._feedData(data)
                data = b""
            elif self._chunkRemaining:
                n = self._chunkRemaining
                self._feedChunk(data[:n])
                data = data[n:]
        if data:
            self._reader.feed(data)
        self._pump()

    # -- the command loop ---------------------------------------------------------

    def _finished(self, result=None):
        """A command that answered asynchronously is done: go on with the next."""
        self._busy = False
        if not self._inLoop:
            self._pump()

    _inLoop = False

    def _pump(self):
        if self._inLoop:
            return
        self._inLoop = True
        self._corked = []
        if self._gate is None:
            self._gate = WriteGate(self._reactor, self._writesDrained, lambda: self._closed)
        try:
            while not self._closed and not self._busy:
                if self._gate.blocked(self.transport):
                    break  # replies wait unsent: no more commands until the client reads them
                if self._chunkRemaining:
                    # A BDAT chunk: exactly that many octets, whatever they are.
                    pending = self._reader.take(self._chunkRemaining)
                    if not pending:
                        break
                    self._feedChunk(pending)
                    continue
                if self._dataMode:
                    # DATA was accepted: what follows in the buffer is body.
                    pending = self._reader.takeBuffer()
                    if not pending:
                        break
                    self._feedData(pending)
                    continue
                line = self._reader.next()
                if line is None:
                    break
                self._busy = True
                d = self._handleLine(line)
                if isinstance(d, defer.Deferred):
                    d.addErrback(self._internalError)
                    d.addBoth(self._finished)
                else:
                    self._busy = False
        finally:
            self._inLoop = False
            self._uncork()
        self._flowControl()

    def _flowControl(self):
        if self._closed:
            return
        backlog = len(self._reader)
        if not self._paused and backlog > PAUSE_THRESHOLD:
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and backlog <= PAUSE_THRESHOLD // 2:
            self._paused = False
            if not self._gate.waiting:
                self.transport.resumeProducing()

    def _writesDrained(self):
        if self._closed:
            return
        if not self._paused:
            self.transport.resumeProducing()
        self._pump()

    def _internalError(self, failure):
        _log.failure("SMTP {session}: internal error", failure, session=self.sessionId)
        self.reply(451, "4.3.0", "Internal error, try again later")

    def _handleLine(self, line):
        if isinstance(line, Reply):
            if self._sasl is not None:
                # The AUTH command ends with this reply (RFC 4954 4): the
                # next line is a command again, not a SASL response.
                self._endSASL()
                if line is wire.LINE_TOO_LONG:
                    line = Reply(500, "5.5.6", "Authentication exchange line is too long")
            self.reply(line)
            return None
        if self._sasl is not None:
            return self._authResponse(line)
        try:
            command = wire.parseCommand(line)
        except SMTPError as e:
            self.reply(e.reply)
            return None
        if self._rejectedAtConnect and command.verb not in ("QUIT", "NOOP"):
            self.reply(503, "5.5.1", "Bad sequence of commands: connection was rejected, send QUIT")
            return None
        handler = getattr(self, "do_" + command.verb, None)
        if handler is None:
            if command.verb in ("TURN", "ETRN", "ATRN", "SEND", "SOML", "SAML", "XCLIENT"):
                self.reply(502, "5.5.1", "Command not implemented")
            else:
                self.reply(500, "5.5.1", "Command unrecognized")
            return None
        try:
            return handler(command.args)
        except SMTPError as e:
            self.reply(e.reply)
            return None
        except Exception:
            self._internalError(Failure())
            return None

    # -- hooks ------------------------------------------------------------------

    def _runHooks(self, stage, *args):
        """A Deferred of the first decision other than CONTINUE, or CONTINUE."""
        hooks = []
        for h in self.factory.hooks:
            method = getattr(h, stage, None)
            # A missing stage, or one inherited unchanged from PassThroughHook, is CONTINUE.
            if method is not None and not getattr(method, "passThrough", False):
                hooks.append(h)
        if not hooks:
            # The common case: nothing to consult, no generator to run.
            return defer.succeed(_PROCEED)
        return self._consultHooks(hooks, stage, *args)

    @defer.inlineCallbacks
    def _consultHooks(self, hooks, stage, *args):
        context = self._context()
        for hook in hooks:
            method = getattr(hook, stage, None)
            if method is None or getattr(method, "passThrough", False):
                continue
            try:
                decision = yield defer.maybeDeferred(method, context, *args)
            except Exception:
                _log.failure(
                    "SMTP {session}: hook {hook} failed at {stage}",
                    session=self.sessionId,
                    hook=getattr(hook, "name", repr(hook)),
                    stage=stage,
                )
                return Decision.tempfail("Temporary policy failure, try again later", 451, "4.3.0")
            if decision is None or decision.action == CONTINUE:
                continue
            if decision.action == ACCEPT:
                return decision
            return _checkedDecision(decision)
        return Decision.proceed()

    def _applyDecision(self, decision, *, plain=False) -> bool:
        """Answer a rejecting decision; True when it rejected."""
        if decision.action in (CONTINUE, ACCEPT):
            return False
        self.reply(decision.code, decision.enhanced, decision.text, plain=plain)
        if decision.action == DISCONNECT:
            self._close()
        return True

    # -- HELO / EHLO ---------------------------------------------------------------

    def do_HELO(self, args):
        return self._hello(args, esmtp=False)

    def do_EHLO(self, args):
        return self._hello(args, esmtp=True)

    def _hello(self, args, esmtp):
        verb = "EHLO" if esmtp else "HELO"
        # Only the first word counts; some clients add more (RFC 5321 wants one).
        name = args.split()[0] if args.split() else ""
        if not name:
            self.reply(501, "", f"Syntax: {verb} hostname", plain=True)
            return None
        d = self._runHooks("helo", name)

        def decided(decision):
            if self._applyDecision(decision, plain=True):
                return
            self._resetTransaction()
            self._helo = _sanitiseName(name)
            # (RFC 5321 §4.4 From-domain: decided once per HELO, not per message.)
            self._heloIsDomain = wire.isDomain(name) or wire.isAddressLiteral(name)
            self._esmtp = esmtp
            greeting = f"{self.factory.hostname} Hello {self._helo} {_addressLiteral(self._clientAddress())}"
            if not esmtp:
                self.reply(250, "", greeting, plain=True)
                return
            lines = [greeting, "PIPELINING"]
            if self.factory.maxMessageSize:
                lines.append(f"SIZE {self.factory.maxMessageSize}")
            lines += ["8BITMIME", "BINARYMIME", "CHUNKING", "DSN", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
            if self.factory.tlsContextFactory is not None and not self._tls:
                lines.append("STARTTLS")
            mechanisms = self._authMechanisms()
            if mechanisms and not self._user:
                lines.append("AUTH " + " ".join(mechanisms))
            self.reply(250, "", lines, plain=True)

        return d.addCallback(decided)

    # -- simple commands ---------------------------------------------------------

    def do_NOOP(self, args):
        self.reply(250, "2.0.0", "Ok")

    def do_RSET(self, args):
        if args:
            self.reply(501, "5.5.4", "Syntax: RSET")
            return
        self._resetTransaction()
        self.reply(250, "2.0.0", "Ok")

    def do_QUIT(self, args):
        self.reply(221, "2.0.0", "Bye")
        self._close()

    def do_VRFY(self, args):
        if not args:
            self.reply(501, "5.5.4", "Syntax: VRFY address")
            return
        self.reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def do_EXPN(self, args):
        if not args:
            self.reply(501, "5.5.4", "Syntax: EXPN list")
            return
        self.reply(252, "2.5.0", "Cannot EXPN list, but will accept message and attempt delivery")

    def do_HELP(self, args):
        self.reply(
            214,
            "2.0.0",
            [
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN HELP STARTTLS AUTH",
                "See RFC 5321",
            ],
        )

    # -- STARTTLS -------------------------------------------------------------------

    def do_STARTTLS(self, args):
        if self._tls:
            self.reply(503, "5.5.1", "TLS already active")
            return
        ctx = self.factory.tlsContextFactory
        if ctx is None:
            self.reply(502, "5.5.1", "STARTTLS not available")
            return
        if args:
            self.reply(501, "5.5.4", "Syntax: STARTTLS")
            return
        self.reply(220, "2.0.0", "Ready to start TLS")
        # RFC 3207 §4.2 / smuggling: nothing the client sent before the
        # handshake may be executed inside TLS.
        discarded = self._reader.clear()
        if discarded:
            _log.info(
                "SMTP {session}: discarded {n} bytes pipelined after STARTTLS from {client}",
                session=self.sessionId,
                n=discarded,
                client=self._clientAddress(),
            )
        self._uncork()  # the 220 goes out in the clear, before the handshake
        self.transport.startTLS(ctx)
        self._tls = True
        self._helo = None
        self._esmtp = False
        self._resetTransaction()
        self._dropAuth()

    # -- AUTH ---------------------------------------------------------------------------

    def do_AUTH(self, args):
        if not self.factory.authEnabled:
            self.reply(502, "5.5.1", "AUTH not available")
            return None
        if not self._esmtp:
            self.reply(503, "5.5.1", "Send EHLO first")
            return None
        if self._user:
            self.reply(503, "5.5.1", "Already authenticated")
            return None
        if self._sender is not None:
            self.reply(503, "5.5.1", "AUTH not permitted during a mail transaction")
            return None
        parts = args.split()
        if not parts or len(parts) > 2:
            self.reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
            return None
        name = parts[0].upper()
        if name not in [n.upper() for n in self.factory.sasl.names()] or not self._verifiable(name):
            self.reply(504, "5.5.4", "Unrecognized authentication type")
            return None
        if name not in [n.upper() for n in self._authMechanisms()]:
            self.reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
            return None
        mechanism = self.factory.sasl.create(name)
        if len(parts) == 2:
            if parts[1] == "=":
                initial = b""
            else:
                try:
                    initial = wire.decodeBase64(parts[1])
                except ValueError:
                    self.reply(501, "5.5.2", "Invalid base64 data")
                    return None
        else:
            initial = None
        self._sasl = mechanism
        return self._authStep(initial)

    def _authResponse(self, line):
        if line.strip() == b"*":
            self._endSASL()
            self.reply(501, "5.0.0", "Authentication cancelled")
            return None
        try:
            response = wire.decodeBase64(line)
        except ValueError:
            self._endSASL()
            self.reply(501, "5.5.2", "Invalid base64 data")
            return None
        return self._authStep(response)

    def _endSASL(self):
        self._sasl = None
        self._reader.maxLength = self.factory.maxLineLength

    def _authStep(self, response):
        mechanism = self._sasl
        try:
            result = mechanism.step(response)
        except Exception:
            return self._authStepFailed(Failure(), mechanism)
        if isinstance(result, defer.Deferred):
            # A mechanism that looks up stored secrets (SCRAM) answers later.
            return result.addCallbacks(self._authStepResult, self._authStepFailed, errbackArgs=(mechanism,))
        return self._authStepResult(result)

    def _authStepFailed(self, failure, mechanism):
        self._endSASL()
        if failure.check(SASLAuthenticationFailed):
            return self._authFailed(Failure(UnauthorizedLogin(str(failure.value))), failure.value.username)
        if failure.check(SASLError):
            _log.info(
                "SMTP {session}: malformed SASL response: {why}", session=self.sessionId, why=str(failure.value)
            )
            self.reply(501, "5.5.2", "Malformed authentication response")
            return None
        _log.failure("SMTP {session}: SASL mechanism failed", failure, session=self.sessionId)
        self.reply(454, "4.7.0", "Temporary authentication failure")
        return None

    def _authStepResult(self, result):
        if self._closed:
            return None
        if isinstance(result, Challenge):
            # RFC 4954 §4: responses may be as long as an AUTH line.
            self._reader.maxLength = wire.AUTH_LINE_LENGTH
            self._send(b"334 " + base64.b64encode(result.data) + b"\r\n")
            return None
        self._endSASL()
        if not isinstance(result, Credentials):
            self.reply(454, "4.7.0", "Temporary authentication failure")
            return None
        username = getattr(result.credentials, "username", b"")
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        d = defer.maybeDeferred(self.factory.portal.login, result.credentials, None, IMailAccount)
        d.addCallbacks(self._authSucceeded, self._authFailed, errbackArgs=(username,))
        return d

    def _authSucceeded(self, result):
        _iface, avatar, logout = result
        if self._closed:
            logout()
            return None
        d = self._runHooks("auth", avatar.username, True)

        def decided(decision):
            if self._closed:
                logout()
                return
            if decision.action in (REJECT_TEMP, REJECT_PERM, DISCONNECT):
                logout()
                self._applyDecision(decision)
                return
            self._user = avatar.username
            self._logout = logout
            _log.info(
                "SMTP {session}: {user} authenticated from {client}",
                session=self.sessionId,
                user=self._user,
                client=self._clientAddress(),
            )
            self.reply(235, "2.7.0", "Authentication successful")

        return d.addCallback(decided)

    def _authFailed(self, failure, username):
        if not failure.check(UnauthorizedLogin, UnhandledCredentials):
            _log.failure("SMTP {session}: authentication backend failed", failure, session=self.sessionId)
            self.reply(454, "4.7.0", "Temporary authentication failure")
            return None
        self._authFailures += 1
        self._inc("mailplat_auth_failures_total", protocol="smtp")
        _log.info(
            "SMTP {session}: authentication failed for {user} from {client} ({n})",
            session=self.sessionId,
            user=username,
            client=self._clientAddress(),
            n=self._authFailures,
        )
        d = self._runHooks("auth", username, False)

        def decided(decision):
            if self._closed:
                return None
            if decision.action == DISCONNECT:
                self._applyDecision(decision)
                return None
            if self._authFailures >= self.factory.maxAuthFailures:
                self.reply(535, "5.7.8", "Authentication credentials invalid")
                self.reply(421, "4.7.0", f"{self.factory.hostname} Too many authentication failures")
                self._close()
                return None
            # Answer later each time: 1 s, 2 s, 4 s, ...
            delay = 2 ** (self._authFailures - 1)
            later = defer.Deferred()

            def answer():
                self._delayedCall = None
                self.reply(535, "5.7.8", "Authentication credentials invalid")
                later.callback(None)

            self._delayedCall = self._reactor.callLater(delay, answer)
            return later

        return d.addCallback(decided)

    # -- MAIL / RCPT -----------------------------------------------------------------

    def do_MAIL(self, args):
        f = self.factory
        if self._helo is None:
            self.reply(503, "5.5.1", "Send HELO/EHLO first")
            return None
        if f.authRequired and not self._user:
            self.reply(530, "5.7.0", "Authentication required")
            return None
        if self._sender is not None:
            self.reply(503, "5.5.1", "Nested MAIL command")
            return None
        if f.maxMessagesPerConnection and self._messages >= f.maxMessagesPerConnection:
            _log.info(
                "SMTP {session}: {client} reached {n} messages in one connection",
                session=self.sessionId,
                client=self._clientAddress(),
                n=self._messages,
            )
            self.reply(421, "4.7.0", f"{f.hostname} Too many messages in this connection, reconnect")
            self._close()
            return None
        path = wire.parseMail(args)
        params = dict(path.params)
        if params and not self._esmtp:
            raise SMTPError(555, "5.5.4", "MAIL parameters need EHLO")
        for key, value in list(params.items()):
            if key == "SIZE":
                if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
                    raise SMTPError(501, "5.5.4", "Syntax: SIZE=number")
                if f.maxMessageSize and int(value) > f.maxMessageSize:
                    raise SMTPError(552, "5.3.4", "Message size exceeds fixed maximum message size")
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME", "BINARYMIME"):
                    raise SMTPError(555, "5.5.4", "Unsupported BODY type")
                params[key] = value.upper()
            elif key == "AUTH":
                # RFC 4954 §5: AUTH=<> or AUTH=xtext mailbox.  Only an
                # authenticated client is trusted with it, and only for its
                # own identity; otherwise the message is treated as AUTH=<>.
                if value is None or (value != "<>" and not wire.isXtext(value)):
                    raise SMTPError(501, "5.5.4", "Syntax: AUTH=xtext or AUTH=<>")
                if value != "<>":
                    claimed = wire.decodeXtext(value)
                    if not self._user or claimed.lower() != self._user.lower():
                        value = "<>"
                params[key] = value
            elif key == "SMTPUTF8":
                if value is not None:
                    raise SMTPError(501, "5.5.4", "SMTPUTF8 takes no value")
            elif key in ("RET", "ENVID"):
                pass
            else:
                raise SMTPError(555, "5.5.4", f"Unsupported parameter {key}")
        wire.checkDSNMailParams(params)
        d = self._runHooks("mail", path.address, dict(params))

        def decided(decision):
            if self._applyDecision(decision):
                return
            self._sender = path.address
            self._mailParams = params
            self._utf8 = "SMTPUTF8" in params
            self.reply(250, "2.1.0", "Ok")

        return d.addCallback(decided)

    def do_RCPT(self, args):
        f = self.factory
        if self._sender is None:
            self.reply(503, "5.5.1", "Need MAIL command")
            return None
        if self._bdatStarted:
            self.reply(503, "5.5.1", "RCPT not allowed after BDAT")
            return None
        path = wire.parseRcpt(args, utf8=self._utf8)
        for key in path.params:
            if key not in ("NOTIFY", "ORCPT"):
                raise SMTPError(555, "5.5.4", f"Unsupported parameter {key}")
        rcptParams = wire.checkDSNRcptParams(dict(path.params), self._utf8)
        if len(self._recipients) >= f.maxRecipients:
            self._inc("mailplat_messages_rejected_total")
            self.reply(452, "4.5.3", "Too many recipients")
            return None
        request = RoutingRequest(
            address=path.address,
            authenticated=bool(self._user),
            sender=self._sender,
            clientAddress=self._clientAddress(),
        )
        d = defer.maybeDeferred(f.router.route, request)

        def routed(route):
            if not route.accepted:
                return route, Decision.proceed()
            return self._runHooks("rcpt", path.address, dict(rcptParams), route).addCallback(
                lambda decision: (route, decision)
            )

        def routingFailed(failure):
            _log.failure(
                "SMTP {session}: routing {address} failed", failure, session=self.sessionId, address=path.address
            )
            return None, Decision.tempfail("Temporary routing failure, try again later", 451, "4.3.0")

        def decided(result):
            route, decision = result
            if self._closed:
                return
            if decision.action not in (CONTINUE, ACCEPT):
                self._inc("mailplat_messages_rejected_total")
                self._applyDecision(decision)
                return
            if not route.accepted:
                self._inc("mailplat_messages_rejected_total")
                if route.code >= 500 and _looksLikeRelayTrick(path.address):
                    # user%other@ours, "user@other"@ours, user!other@ours:
                    # an attempt to relay through a local part, whatever the
                    # router thought of the local part itself.
                    _log.info(
                        "SMTP {session}: relay attempt to {address} from {client} refused",
                        session=self.sessionId,
                        address=path.address,
                        client=self._clientAddress(),
                    )
                    self.reply(550, "5.7.1", "Relay access denied")
                    return
                self.reply(route.code, route.enhanced, route.text)
                return
            self._recipients.append(path.address)
            self._rcptParams.append(rcptParams)
            self._routes.append(route)
            self.reply(route.code, route.enhanced, route.text)

        d.addCallbacks(routed, routingFailed)
        return d.addCallback(decided)

    # -- DATA and BDAT --------------------------------------------------------------------

    def _startMessage(self):
        """
        Begin the queue transaction for the current envelope.  Returns
        C{None} when it started, or the error L{Reply} to send.
        """
        f = self.factory
        envelope = Envelope(
            sender=self._sender,
            recipients=tuple(self._recipients),
            mailParams=dict(self._mailParams),
            rcptParams=tuple(self._rcptParams),
            clientAddress=self._clientAddress(),
            clientName=self._helo or "",
            authenticatedUser=self._user,
            protocol=self._protocolName(),
            routes=tuple(self._routes),
        )
        self._messageId = secrets.token_hex(8).upper()
        try:
            self._txn = f.queue.begin(envelope)
            self._txn.write(self._receivedHeader())
        except Exception:
            _log.failure("SMTP {session}: could not start a queue transaction", session=self.sessionId)
            self._abortData()
            return Reply(451, "4.3.0", "Temporary storage failure, try again later")
        self._envelope = envelope
        self._writeFailed = False
        self._size = 0
        binary = self._mailParams.get("BODY") == "BINARYMIME"
        wantHeaders = any(_wants(h, "headers") for h in f.hooks)
        self._checker = wire.ContentChecker(
            maxLineLength=0 if binary else f.maxTextLineLength,
            eightBitHeaders=f.eightBitHeaders or self._utf8,
            keepHeaders=wantHeaders,
        )
        self._hookChunks = [] if any(_wants(h, "data") for h in f.hooks) else None
        return None

    def _writeContent(self, chunk):
        if self._hookChunks is not None:
            self._hookChunks.append(chunk)
        if self._txn is not None and not self._writeFailed:
            try:
                self._txn.write(chunk)
            except Exception:
                _log.failure("SMTP {session}: queue write failed", session=self.sessionId)
                self._writeFailed = True

    def do_DATA(self, args):
        f = self.factory
        if args:
            self.reply(501, "5.5.4", "Syntax: DATA")
            return None
        if self._sender is None:
            self.reply(503, "5.5.1", "Need MAIL command")
            return None
        if self._bdatStarted:
            self.reply(503, "5.5.1", "DATA not allowed after BDAT in one transaction")
            return None
        if self._mailParams.get("BODY") == "BINARYMIME":
            # RFC 3030 §3: BINARYMIME content can only be sent with BDAT.
            self.reply(503, "5.5.1", "BODY=BINARYMIME requires BDAT, not DATA")
            return None
        if not self._recipients:
            self.reply(554, "5.5.1", "No valid recipients")
            return None
        error = self._startMessage()
        if error is not None:
            self.reply(error)
            return None
        self._decoder = wire.DataDecoder(f.maxMessageSize or None, f.normaliseBareLineEndings, self._checker)
        self.reply(354, "", "End data with <CR><LF>.<CR><LF>")
        # From here on the input is body (the command loop hands over what
        # was pipelined after DATA).
        self._dataMode = True
        return None

    def _receivedHeader(self) -> bytes:
        f = self.factory
        literal = _addressLiteral(self._clientAddress())
        date = _receivedDate(int(self._reactor.seconds()))
        helo = self._helo or ""
        if helo and self._heloIsDomain:
            parts = [f"Received: from {helo} ({literal})"]
        else:
            # RFC 5321 §4.4 From-domain: a Domain or an address literal.  A
            # name that is neither goes into a comment (By-domain starts
            # with CFWS), the client named by its address.
            parts = [f"Received: from {literal} ({literal})", f"\t(HELO name not a domain: {_sanitiseName(helo)})"]
        parts.append(f"\tby {f.hostname} (mailplat) with {self._protocolName()} id {self._messageId}")
        if len(self._recipients) == 1:
            parts.append(f"\tfor <{self._recipients[0]}>; {date}")
        else:
            parts[-1] += ";"
            parts.append(f"\t{date}")
        text = "\r\n".join(parts) + "\r\n"
        # A UTF-8 recipient may appear only in an SMTPUTF8 message (RFC 6532).
        return text.encode("utf-8") if self._utf8 else text.encode("ascii", "replace")

    def _feedData(self, data):
        decoder = self._decoder
        for chunk in decoder.feed(data):
            self._writeContent(chunk)
        if decoder.error is not None and self._txn is not None:
            # Refused anyway: free the spool now, keep reading to the end.
            self._txn.abort()
            self._txn = None
            self._hookChunks = None
        if decoder.done:
            self._dataMode = False
            self._size = decoder.size
            leftover = decoder.leftover
            self._busy = True
            if leftover:
                self._reader.feed(leftover)
            d = defer.maybeDeferred(self._endOfMessage, decoder.error)
            d.addErrback(self._internalError)
            d.addBoth(self._dataFinished)

    def do_BDAT(self, args):
        """
        RFC 3030: C{BDAT size [LAST]} and exactly C{size} octets of content.
        The octets are always read, even when the command is refused, so the
        session stays in step with the client; the reply comes after them.
        """
        f = self.factory
        size, last = wire.parseBDAT(args)
        error = None
        if self._sender is None:
            error = Reply(503, "5.5.1", "Need MAIL command")
        elif not self._recipients:
            error = Reply(554, "5.5.1", "No valid recipients")
        elif f.maxMessageSize and self._bdatSize + size > f.maxMessageSize:
            error = wire.MESSAGE_TOO_BIG
        elif not self._bdatStarted:
            error = self._startMessage()
            if error is None:
                self._bdatStarted = True
                binary = self._mailParams.get("BODY") == "BINARYMIME"
                if binary:
                    self._normaliser = None
                elif f.normaliseBareLineEndings:
                    self._normaliser = wire.LineEndingNormaliser()
                else:
                    self._normaliser = None
                    self._checker.checkBare = True
        if error is not None and self._txn is not None:
            # RFC 3030 §2: a refused chunk ends the transaction.
            self._abortData()
        if error is None:
            self._bdatSize += size  # (a refused chunk is part of no message)
        self._chunk = (size, last, error)
        self._chunkRemaining = size
        if size == 0:
            return self._chunkComplete()
        return None

    def _feedChunk(self, data):
        self._chunkRemaining -= len(data)
        size, last, error = self._chunk
        if error is None and self._txn is not None:
            if self._normaliser is not None:
                data = self._normaliser.feed(data)
            checker = self._checker
            checker.feed(data)
            self._size += len(data)
            if checker.error is None:
                self._writeContent(data)
        if self._chunkRemaining == 0:
            self._busy = True
            d = defer.maybeDeferred(self._chunkComplete)
            d.addErrback(self._internalError)
            d.addBoth(self._finished)

    def _chunkComplete(self):
        size, last, error = self._chunk
        self._chunk = None
        if error is not None:
            self._inc("mailplat_messages_rejected_total")
            self.reply(error)
            if self._sender is not None:
                self._resetTransaction()
            return None
        if last:
            if self._normaliser is not None:
                tail = self._normaliser.finish()
                self._checker.feed(tail)
                if self._checker.error is None:
                    self._writeContent(tail)
                self._normaliser = None
            self._checker.finish()
            d = defer.maybeDeferred(self._endOfMessage, self._checker.error)
            d.addBoth(self._bdatFinished)
            return d
        if self._checker.error is not None:
            # Refused: the rest of the transaction is refused with it.
            self._inc("mailplat_messages_rejected_total")
            self.reply(self._checker.error)
            self._resetTransaction()
            return None
        self.reply(250, "2.0.0", f"{size} octets received")
        return None

    def _bdatFinished(self, result):
        self._checker = None
        self._txn = None
        self._hookChunks = None
        self._resetTransaction()
        return result

    def _dataFinished(self, result):
        self._decoder = None
        self._checker = None
        self._txn = None
        self._hookChunks = None
        self._resetTransaction()
        self._finished()

    def _abortData(self):
        txn, self._txn = self._txn, None
        self._decoder = None
        self._hookChunks = None
        self._normaliser = None
        self._dataMode = False
        if txn is not None:
            try:
                txn.abort()
            except Exception:
                _log.failure("SMTP {session}: queue abort failed", session=self.sessionId)

    def _endOfMessage(self, error):
        """The whole message arrived (DATA or BDAT LAST): refuse it, or run the hooks and commit."""
        if error is not None:
            self._abortData()
            self._inc("mailplat_messages_rejected_total")
            _log.info(
                "SMTP {session}: message refused: {reason}",
                session=self.sessionId,
                reason=error.text,
            )
            self.reply(error)
            return None
        if self._writeFailed:
            self._abortData()
            self.reply(451, "4.3.0", "Temporary storage failure, try again later")
            return None
        checker = self._checker
        if checker is not None and checker.keepHeaders:
            d = self._runHooks("headers", checker.headers)
        else:
            d = defer.succeed(Decision.proceed())

        def dataHooks(decision):
            if decision.action not in (CONTINUE, ACCEPT) or self._hookChunks is None:
                return decision
            message = b"".join(self._hookChunks)
            self._hookChunks = None
            return self._runHooks("data", message)

        d.addCallback(dataHooks)
        d.addCallback(self._commitIfAccepted)
        return d

    def _commitIfAccepted(self, decision):
        if self._closed:
            self._abortData()
            return None
        if decision.action not in (CONTINUE, ACCEPT):
            self._abortData()
            self._inc("mailplat_messages_rejected_total")
            self._applyDecision(decision)
            return None
        # The transaction now belongs to the queue: a connection lost while
        # it commits must not abort it (the client may get a duplicate, but
        # nothing is lost).
        txn, self._txn = self._txn, None
        envelope = self._envelope
        size = self._size
        via = "BDAT" if self._bdatStarted else "DATA"
        self._messages += 1
        d = defer.maybeDeferred(txn.commit)

        def committed(queueId):
            self._inc("mailplat_messages_received_total")
            _log.info(
                "SMTP {session}: queued {queueId} from <{sender}> for {count} recipient(s), {size} bytes, "
                "{protocol} {via}{dsn}",
                session=self.sessionId,
                queueId=queueId,
                sender=envelope.sender,
                count=len(envelope.recipients),
                size=size,
                protocol=envelope.protocol,
                via=via,
                dsn=_dsnSummary(envelope),
            )
            self.reply(250, "2.0.0", f"Ok: queued as {queueId}")

        def failed(failure):
            from mailplat.store.writer import logWriteFailure

            logWriteFailure(f"SMTP {self.sessionId}: queue commit failed", failure)
            self.reply(451, "4.3.0", "Temporary storage failure, try again later")

        return d.addCallbacks(committed, failed)


def _wants(hook, stage) -> bool:
    """Whether C{hook} has a real method for C{stage} (not a pass-through one)."""
    method = getattr(hook, stage, None)
    return method is not None and not getattr(method, "passThrough", False)


def _looksLikeRelayTrick(address: str) -> bool:
    """A local part that names another host: C{user%other}, C{user!other}, C{"user@other"}."""
    local = address.rpartition("@")[0]
    return any(c in local for c in "%!@")


def _dsnSummary(envelope) -> str:
    """The DSN parameters of an envelope for the log line (empty when there are none)."""
    parts = [f"{k}={envelope.mailParams[k]}" for k in ("RET", "ENVID", "BODY") if k in envelope.mailParams]
    for rcpt, params in zip(envelope.recipients, envelope.rcptParams):
        for k in ("NOTIFY", "ORCPT"):
            if k in params:
                parts.append(f"{k}={params[k]}")
    return (", " + " ".join(parts)) if parts else ""


def _checkedDecision(decision: Decision) -> Decision:
    """A rejecting decision with a code of the right class (a broken hook never gives 2xx)."""
    code, enhanced, text = decision.code, decision.enhanced, decision.text
    if decision.action == REJECT_TEMP and not 400 <= code < 500:
        code, enhanced = 451, "4.7.1"
    elif decision.action == REJECT_PERM and not 500 <= code < 600:
        code, enhanced = 550, "5.7.1"
    elif decision.action == DISCONNECT and code != 421:
        code, enhanced = 421, enhanced if enhanced.startswith("4.") else "4.7.0"
    elif decision.action not in (REJECT_TEMP, REJECT_PERM, DISCONNECT):
        _log.warn("unknown hook decision {action!r}: treated as a temporary failure", action=decision.action)
        return Decision.tempfail("Temporary policy failure, try again later", 451, "4.3.0")
    if enhanced and enhanced[0] != str(code)[0]:
        enhanced = f"{str(code)[0]}{enhanced[1:]}"
    return Decision(decision.action, code, enhanced, text or "Rejected")


SMTPFactory.protocol = SMTPServer
