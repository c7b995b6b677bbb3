"""
The outbound ESMTP client (RFC 5321), our own.

One L{SMTPClient} connection delivers one or more L{Transaction}s to one
server and reports a L{Result} per recipient.  It speaks:

  - EHLO, falling back to HELO when EHLO is refused (RFC 5321 3.2);
  - STARTTLS (RFC 3207) when offered, by policy: C{"opportunistic"} (use
    it when offered, without verifying the certificate), C{"require"}
    (refuse to send in clear: temporary failure), C{"verify"} (require it
    and verify the certificate against the host name);
  - AUTH PLAIN (RFC 4954) to a smarthost, only over TLS;
  - PIPELINING (RFC 2920): MAIL, every RCPT and DATA in one write;
  - SIZE (RFC 1870): a message larger than the server's limit fails at
    once with 5.3.4 without being sent;
  - 8BITMIME (RFC 6152): C{BODY=8BITMIME} when the message has 8-bit
    content; a server without 8BITMIME gets a 7-bit downgrade
    (L{mailplat.outbound.downgrade});
  - CHUNKING / BDAT (RFC 3030) when offered: the message is sent as one
    chunk without dot-stuffing;
  - SMTPUTF8 (RFC 6531): when the envelope needs it and the server lacks it,
    the recipients fail with 5.6.7 (no downgrade of addresses exists);
  - DSN (RFC 3461): RET, ENVID, NOTIFY and ORCPT passed on when the server
    offers DSN; when it does not, the recipients that asked for SUCCESS are
    marked C{relayed} (RFC 3461 6.2.2).

Timeouts follow RFC 5321 4.5.3.2: 5 minutes for the greeting, MAIL and
RCPT, 2 minutes for the DATA command, 3 minutes per data block, 10 minutes
for the final reply.  A connection that fails in the middle of a
transaction leaves its recipients deferred (4.4.2), never failed.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from twisted.internet import defer, protocol

from mailplat.log import Logger
from twisted.protocols.basic import LineOnlyReceiver

_log = Logger()

TIMEOUTS = {
    "greeting": 300,
    "helo": 300,
    "starttls": 300,
    "auth": 300,
    "mail": 300,
    "rcpt": 300,
    "data": 120,
    "block": 180,
    "final": 600,
    "quit": 30,
}


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def enhanced(self) -> str:
        first = self.lines[0].split(" ", 1)[0] if self.lines else ""
        parts = first.split(".")
        if len(parts) == 3 and all(p.isascii() and p.isdigit() for p in parts) and first[0] == str(self.code)[0]:
            return first
        return ""

    def describe(self) -> str:
        return f"{self.code} {self.text}".strip()


@dataclass
class Recipient:
    address: str
    notify: str | None = None
    orcpt: str | None = None


@dataclass
class Transaction:
    sender: str
    recipients: list
    content: bytes
    ret: str | None = None
    envid: str | None = None
    needsSMTPUTF8: bool = False
    #: The message came with BODY=BINARYMIME (RFC 3030): it goes only to a
    #: next hop that offers BINARYMIME and CHUNKING.
    binary: bool = False


@dataclass(frozen=True)
class Result:
    """The outcome for one recipient: C{state} is delivered, relayed, deferred or failed."""

    recipient: str
    state: str
    status: str
    diagnostic: str
    remoteMTA: str = ""


@dataclass
class ClientPolicy:
    heloName: str = "localhost"
    tls: str = "opportunistic"
    tlsHostname: str = ""
    username: str = ""
    password: str = ""
    timeouts: dict = field(default_factory=lambda: dict(TIMEOUTS))


class SMTPProtocolError(Exception):
    pass


def has8bit(data: bytes) -> bool:
    return not data.isascii()


def headers8bit(data: bytes) -> bool:
    """Whether the message's header section has non-ASCII octets (RFC 6532 headers)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    return has8bit(data if end < 0 else data[:end])


def dotStuff(content: bytes) -> bytes:
    """DATA payload: CRLF line endings, leading dots doubled, CRLF.CRLF at the end."""
    lines = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = [(b"." + line) if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(out) + b"\r\n.\r\n"


def _statusFrom(reply: Reply, default: str) -> str:
    return reply.enhanced or default


class SMTPClient(LineOnlyReceiver):
    """One connection.  Use L{SMTPClient.run} once connected."""

    delimiter = b"\r\n"
    MAX_LENGTH = 8192

    def __init__(self, policy: ClientPolicy, remoteName: str, reactor, tlsContextFactory=None):
        self.policy = policy
        self.remoteName = remoteName
        self._reactor = reactor
        self._tlsContextFactory = tlsContextFactory
        self._pending: list = []
        self._lines: list = []
        self._timer = None
        self._lost = None
        self.extensions: dict[str, str] = {}
        self.tls = False
        #: Replies that arrived before anyone asked for them (the greeting may).
        self._unclaimed: list = []
        #: False once the session is in a state another transaction cannot
        #: start from (a reset that failed): the connection is not reused.
        self.reusable = True

    # --- transport plumbing ------------------------------------------------

    def lineReceived(self, line: bytes):
        text = line.decode("utf-8", "replace")
        if len(text) < 3 or not (text[:3].isascii() and text[:3].isdigit()):
            self._fail(SMTPProtocolError(f"malformed reply line {text[:80]!r}"))
            return
        self._lines.append(text[4:] if len(text) > 3 else "")
        if len(text) > 3 and text[3] == "-":
            return
        reply = Reply(int(text[:3]), tuple(self._lines))
        self._lines = []
        if self._pending:
            d, _ = self._pending.pop(0)
            self._cancelTimer()
            if self._pending:
                self._startTimer(self._pending[0][1])
            d.callback(reply)
        else:
            self._unclaimed.append(reply)

    def lineLengthExceeded(self, line):
        self._fail(SMTPProtocolError("reply line too long"))

    def connectionLost(self, reason):
        self._cancelTimer()
        self._lost = reason
        pending, self._pending = self._pending, []
        for d, _ in pending:
            d.errback(SMTPProtocolError(f"connection lost: {reason.getErrorMessage()}"))

    def _fail(self, exc):
        pending, self._pending = self._pending, []
        self._cancelTimer()
        for d, _ in pending:
            d.errback(exc)
        if self.transport is not None:
            self.transport.abortConnection()

    def _startTimer(self, stage):
        timeout = self.policy.timeouts.get(stage, 300)
        self._timer = self._reactor.callLater(timeout, self._timedOut, stage)

    def _cancelTimer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timedOut(self, stage):
        self._timer = None
        self._fail(SMTPProtocolError(f"timeout waiting for the {stage} reply"))

    def expect(self, stage) -> defer.Deferred:
        """A Deferred for the next reply (queued in order: pipelining)."""
        if self._unclaimed:
            return defer.succeed(self._unclaimed.pop(0))
        if self._lost is not None:
            return defer.fail(SMTPProtocolError("connection lost"))
        d = defer.Deferred()
        self._pending.append((d, stage))
        if len(self._pending) == 1:
            self._startTimer(stage)
        return d

    def send(self, *lines: str | bytes):
        data = b"".join((l if isinstance(l, bytes) else l.encode("utf-8")) + b"\r\n" for l in lines)
        self.transport.write(data)

    # --- the session ---------------------------------------------------------

    @defer.inlineCallbacks
    def greet(self):
        """Greeting, EHLO/HELO, STARTTLS and AUTH.  Fires with None, or raises L{SessionFailure}."""
        reply = yield self.expect("greeting")
        if reply.code != 220:
            raise SessionFailure(reply, "greeting")
        yield self._hello()
        if "STARTTLS" in self.extensions and self.policy.tls != "never" and self._tlsContextFactory is not None:
            self.send("STARTTLS")
            reply = yield self.expect("starttls")
            if reply.code == 220:
                self.transport.startTLS(self._tlsContextFactory(self.policy.tlsHostname or self.remoteName,
                                                                self.policy.tls == "verify"))
                self.tls = True
                yield self._hello()
            elif self.policy.tls in ("require", "verify"):
                raise SessionFailure(reply, "starttls", temporary=True)
        if self.policy.tls in ("require", "verify") and not self.tls:
            raise SessionFailure(Reply(450, ("4.7.10 TLS is required for this destination and the server does not "
                                             "offer STARTTLS",)), "starttls", temporary=True)
        if self.policy.username:
            mechanisms = self.extensions.get("AUTH", "").upper().split()
            if "PLAIN" not in mechanisms:
                raise SessionFailure(Reply(450, ("4.7.11 the smarthost does not offer AUTH PLAIN",)), "auth",
                                     temporary=True)
            if not self.tls and self.policy.tls != "never":
                raise SessionFailure(Reply(450, ("4.7.11 refusing to send a password without TLS",)), "auth",
                                     temporary=True)
            token = base64.b64encode(b"\0" + self.policy.username.encode() + b"\0" + self.policy.password.encode())
            self.send(b"AUTH PLAIN " + token)
            reply = yield self.expect("auth")
            if reply.code != 235:
                raise SessionFailure(reply, "auth", temporary=True)

    @defer.inlineCallbacks
    def _hello(self):
        self.send(f"EHLO {self.policy.heloName}")
        reply = yield self.expect("helo")
        if reply.code == 250:
            self.extensions = {}
            for line in reply.lines[1:]:
                keyword, _, params = line.partition(" ")
                self.extensions[keyword.upper()] = params
            return
        if 500 <= reply.code < 600:
            self.send(f"HELO {self.policy.heloName}")
            reply = yield self.expect("helo")
            if reply.code == 250:
                self.extensions = {}
                return
        raise SessionFailure(reply, "helo")

    @defer.inlineCallbacks
    def deliver(self, txn: Transaction):
        """Run one transaction; fires with a list of L{Result}, one per recipient."""
        remote = self.remoteName
        content = txn.content
        eightBit = has8bit(content)
        if txn.needsSMTPUTF8 and "SMTPUTF8" not in self.extensions:
            return [Result(r.address, "failed", "5.6.7",
                           "the destination does not support SMTPUTF8, which this message needs", remote)
                    for r in txn.recipients]
        binary = txn.binary
        if binary and not ("BINARYMIME" in self.extensions and "CHUNKING" in self.extensions):
            # RFC 3030 §3: never to a server without BINARYMIME; converting
            # binary MIME to base64 is not done here, so the message returns.
            return [Result(r.address, "failed", "5.6.3",
                           "the destination does not support BINARYMIME, which this message needs", remote)
                    for r in txn.recipients]
        # UTF-8 header fields (RFC 6532) need SMTPUTF8; without it they are
        # downgraded to RFC 2047 encoded words along with the body.
        utf8Headers = headers8bit(content)
        useSMTPUTF8 = txn.needsSMTPUTF8 or (utf8Headers and "SMTPUTF8" in self.extensions)
        if not binary and ((eightBit and "8BITMIME" not in self.extensions) or (utf8Headers and not useSMTPUTF8)):
            from mailplat.outbound.downgrade import downgrade

            content = downgrade(content)
            eightBit = has8bit(content)
        limit = self.extensions.get("SIZE", "")
        if limit.isascii() and limit.isdigit() and int(limit) and len(content) > int(limit):
            return [Result(r.address, "failed", "5.3.4",
                           f"message size {len(content)} exceeds the destination's limit of {limit}", remote)
                    for r in txn.recipients]
        dsn = "DSN" in self.extensions
        params = []
        if "SIZE" in self.extensions:
            params.append(f"SIZE={len(content)}")
        if binary:
            params.append("BODY=BINARYMIME")
        elif eightBit and "8BITMIME" in self.extensions:
            params.append("BODY=8BITMIME")
        if useSMTPUTF8:
            params.append("SMTPUTF8")
        if dsn and txn.ret:
            params.append(f"RET={txn.ret}")
        if dsn and txn.envid:
            params.append(f"ENVID={txn.envid}")
        commands = ["MAIL FROM:<%s>%s" % (txn.sender, "".join(" " + p for p in params))]
        for r in txn.recipients:
            rp = []
            if dsn and r.notify:
                rp.append(f"NOTIFY={r.notify}")
            if dsn and r.orcpt:
                rp.append(f"ORCPT={r.orcpt}")
            commands.append("RCPT TO:<%s>%s" % (r.address, "".join(" " + p for p in rp)))
        chunking = "CHUNKING" in self.extensions
        pipelining = "PIPELINING" in self.extensions
        if not chunking:
            commands.append("DATA")
        replies = []
        if pipelining:
            waits = [self.expect("mail")] + [self.expect("rcpt") for _ in txn.recipients]
            if not chunking:
                waits.append(self.expect("data"))
            self.send(*commands)
            # Every reply is waited for, so that a connection lost half-way
            # fails them all without one left unhandled.
            for ok, value in (yield defer.DeferredList(waits, consumeErrors=True)):
                if not ok:
                    value.raiseException()
                replies.append(value)
        else:
            for i, command in enumerate(commands):
                if command == "DATA" and not any(200 <= r.code < 300 for r in replies[1:]):
                    break
                self.send(command)
                replies.append((yield self.expect("mail" if i == 0 else "rcpt" if command.startswith("RCPT") else "data")))
                if i == 0 and replies[0].code != 250:
                    break
        mailReply = replies[0]
        if mailReply.code != 250:
            if not chunking and len(replies) == len(commands) and replies[-1].code == 354:
                # The server accepted DATA although nothing else: end it empty.
                yield self._abortData()
            return [self._failure(r.address, mailReply) for r in txn.recipients]
        accepted, results = [], {}
        for r, reply in zip(txn.recipients, replies[1:1 + len(txn.recipients)]):
            if reply.code in (250, 251):
                accepted.append(r)
            else:
                results[r.address] = self._failure(r.address, reply)
        for r in txn.recipients[len(replies) - 1:]:
            results.setdefault(r.address, Result(r.address, "deferred", "4.4.2", "not attempted", remote))
        if not accepted:
            if not chunking and len(replies) == len(commands) and replies[-1].code == 354:
                yield self._abortData()
            else:
                yield self._resetQuietly()
            return [results[r.address] for r in txn.recipients]
        if chunking:
            self.transport.write(b"BDAT %d LAST\r\n" % len(content) + content)
            final = yield self.expect("final")
            if final.code != 250:
                # RFC 3030 §4.2: the transaction failed; start the next one clean.
                yield self._resetQuietly()
        else:
            dataReply = replies[-1]
            if dataReply.code != 354:
                for r in accepted:
                    results[r.address] = self._failure(r.address, dataReply)
                # MAIL and RCPT were accepted: without RSET the server keeps
                # that transaction open and the next MAIL on this connection
                # would be refused as nested (RFC 5321 §4.1.1.5).
                yield self._resetQuietly()
                return [results[r.address] for r in txn.recipients]
            self.transport.write(dotStuff(content))
            final = yield self.expect("final")
        for r in accepted:
            if final.code == 250:
                wantsSuccess = r.notify and "SUCCESS" in r.notify.upper()
                state = "relayed" if (wantsSuccess and not dsn) else "delivered"
                results[r.address] = Result(r.address, state, _statusFrom(final, "2.0.0"), final.describe(), remote)
            else:
                results[r.address] = self._failure(r.address, final)
        return [results[r.address] for r in txn.recipients]

    def _failure(self, address, reply: Reply) -> Result:
        permanent = 500 <= reply.code < 600
        default = "5.0.0" if permanent else "4.0.0"
        return Result(address, "failed" if permanent else "deferred", _statusFrom(reply, default), reply.describe(),
                      self.remoteName)

    @defer.inlineCallbacks
    def _abortData(self):
        # A lone "." ends the DATA the server opened; the reply is ignored.
        self.transport.write(b".\r\n")
        try:
            yield self.expect("final")
        except Exception:
            self.reusable = False
            return
        yield self._resetQuietly()

    @defer.inlineCallbacks
    def _resetQuietly(self):
        """RSET; if it fails, the connection is not used again (the results already known stand)."""
        try:
            self.send("RSET")
            reply = yield self.expect("mail")
        except Exception:
            self.reusable = False
            return
        if reply.code != 250:
            self.reusable = False

    @defer.inlineCallbacks
    def quit(self):
        try:
            self.send("QUIT")
            yield self.expect("quit")
        except Exception:
            pass
        if self.transport is not None:
            self.transport.loseConnection()


class SessionFailure(Exception):
    """The session failed before a transaction: every recipient gets the same result."""

    def __init__(self, reply: Reply, stage: str, temporary: bool = False):
        super().__init__(f"{stage}: {reply.describe()}")
        self.reply = reply
        self.stage = stage
        self.permanent = (500 <= reply.code < 600) and not temporary


class SMTPClientFactory(protocol.ClientFactory):
    def __init__(self, policy, remoteName, reactor, tlsContextFactory=None):
        self.policy = policy
        self.remoteName = remoteName
        self.reactor = reactor
        self.tlsContextFactory = tlsContextFactory

    def buildProtocol(self, addr):
        p = SMTPClient(self.policy, self.remoteName, self.reactor, self.tlsContextFactory)
        p.factory = self
        return p
