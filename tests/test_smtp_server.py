"""Tests for mailplat.smtp.server: the SMTP session, through StringTransport and real sockets."""

import base64
import smtplib
import ssl

import pytest
from twisted.internet import defer, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from mailplat.interfaces.hooks import ISMTPHook, Decision
from mailplat.interfaces.routing import IRouter
from mailplat.interfaces.storage import TemporaryStoreFailure
from mailplat.metrics import Metrics
from mailplat.smtp.server import SMTPContext, SMTPFactory
from mailplat.testing import MemoryQueue, StaticRouter, memoryPortal

HOST = "mx.example.org"


class Transport(StringTransport):
    """A StringTransport that records startTLS calls (and what had been written before)."""

    def __init__(self, peer="192.0.2.7", host="192.0.2.1"):
        super().__init__(
            hostAddress=IPv4Address("TCP", host, 25),
            peerAddress=IPv4Address("TCP", peer, 40000),
        )
        self.tlsStarted = []

    def startTLS(self, ctx):
        self.tlsStarted.append(ctx)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Session:
    """One server session on a StringTransport with a task.Clock."""

    def __init__(self, peer="192.0.2.7", host="192.0.2.1", router=None, hooks=(), now=0, **kw):
        self.clock = task.Clock()
        self.clock.advance(now)
        self.queue = MemoryQueue()
        self.metrics = Metrics()
        self.router = router or StaticRouter(
            domains=["example.org"], users=["alice@example.org", "bob@example.org", "carol@example.org"]
        )
        self.portal = memoryPortal({"alice@example.org": "secret"})
        kw.setdefault("metrics", self.metrics)
        self.factory = SMTPFactory(
            hostname=HOST,
            portal=self.portal,
            router=self.router,
            queue=self.queue,
            reactor=self.clock,
            hooks=hooks,
            **kw,
        )
        self.proto = self.factory.buildProtocol(None)
        self.transport = Transport(peer, host)
        self.proto.makeConnection(self.transport)

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.proto.dataReceived(data)

    def replies(self):
        """Complete replies written since the last call, as (code, [texts]) pairs."""
        raw = self.transport.value()
        self.transport.clear()
        out, current = [], []
        for line in raw.decode("ascii").split("\r\n")[:-1]:
            current.append(line[4:])
            if line[3:4] != "-":
                out.append((int(line[:3]), current))
                current = []
        assert not current, raw
        return out

    def cmd(self, line):
        self.send(line + "\r\n")
        replies = self.replies()
        assert len(replies) == 1, replies
        return replies[0]

    def ehlo(self, name="client.example.net"):
        code, lines = self.cmd(f"EHLO {name}")
        assert code == 250
        return lines

    def login(self, user="alice@example.org", password="secret"):
        assert self.cmd("AUTH PLAIN " + b64(f"\0{user}\0{password}".encode())) == (
            235,
            ["2.7.0 Authentication successful"],
        )

    @property
    def closed(self):
        return self.transport.disconnecting


def start(**kw):
    s = Session(**kw)
    assert s.replies() == [(220, [f"{HOST} ESMTP mailplat"])]
    return s


# -- greeting and EHLO ------------------------------------------------------------


def test_greeting_and_quit():
    s = start()
    assert s.cmd("QUIT") == (221, ["2.0.0 Bye"])
    assert s.closed
    assert s.metrics.get("mailplat_sessions_total", protocol="smtp") == 1
    s.proto.connectionLost(None)
    assert s.metrics.get("mailplat_sessions_active", protocol="smtp") == 0


def test_ehlo_keywords_mx():
    s = start(tlsContextFactory=object(), maxMessageSize=1000)
    lines = s.ehlo()
    assert lines[0] == f"{HOST} Hello client.example.net [192.0.2.7]"
    assert lines[1:] == [
        "PIPELINING", "SIZE 1000", "8BITMIME", "BINARYMIME", "CHUNKING", "DSN", "SMTPUTF8",
        "ENHANCEDSTATUSCODES", "STARTTLS",
    ]
    assert not any(l.startswith("AUTH") for l in lines)


def test_ehlo_auth_advertised_by_role_and_tls():
    # mx with authOnMX on loopback: AUTH offered (plaintext allowed on loopback)
    s = start(peer="127.0.0.1", host="127.0.0.1", authOnMX=True)
    assert "AUTH PLAIN LOGIN" in s.ehlo()
    # submission on a public address without TLS: no plaintext mechanism, so no AUTH
    s = start(role="submission", tlsContextFactory=object())
    lines = s.ehlo()
    assert "STARTTLS" in lines and not any(l.startswith("AUTH") for l in lines)
    # ... but after STARTTLS it is
    assert s.cmd("STARTTLS") == (220, ["2.0.0 Ready to start TLS"])
    lines = s.ehlo()
    assert "AUTH PLAIN LOGIN" in lines and "STARTTLS" not in lines
    # submissions: already TLS, AUTH offered, STARTTLS never
    s = start(role="submissions", tlsContextFactory=object())
    lines = s.ehlo()
    assert "AUTH PLAIN LOGIN" in lines and "STARTTLS" not in lines
    # allowInsecureAuth=False refuses even loopback
    s = start(peer="127.0.0.1", host="127.0.0.1", role="submission", allowInsecureAuth=False)
    assert not any(l.startswith("AUTH") for l in s.ehlo())
    # allowInsecureAuth=True allows everywhere
    s = start(role="submission", allowInsecureAuth=True)
    assert "AUTH PLAIN LOGIN" in s.ehlo()


def test_helo_and_ehlo_syntax_have_no_enhanced_code():
    s = start()
    assert s.cmd("EHLO") == (501, ["Syntax: EHLO hostname"])
    assert s.cmd("HELO client.example.net") == (250, [f"{HOST} Hello client.example.net [192.0.2.7]"])
    # every other reply carries one
    assert s.cmd("NOOP") == (250, ["2.0.0 Ok"])


def test_unknown_role_refused():
    with pytest.raises(ValueError):
        SMTPFactory(hostname=HOST, portal=None, router=None, queue=None, role="relay", reactor=task.Clock())


# -- simple commands and sequence errors ----------------------------------------------


def test_simple_commands():
    s = start()
    assert s.cmd("VRFY alice") == (252, ["2.5.0 Cannot VRFY user, but will accept message and attempt delivery"])
    assert s.cmd("EXPN staff")[0:1] == (252,)
    assert s.cmd("expn staff")[1][0].startswith("2.5.0")
    code, lines = s.cmd("HELP")
    assert code == 214 and all(l.startswith("2.0.0 ") for l in lines)
    assert s.cmd("FOO bar") == (500, ["5.5.1 Command unrecognized"])
    # BDAT without a transaction: the chunk is read, then refused.
    s.send("BDAT 10 LAST\r\n")
    assert s.replies() == []
    s.send("0123456789")
    assert s.replies() == [(503, ["5.5.1 Need MAIL command"])]
    assert s.cmd("NOOP") == (250, ["2.0.0 Ok"])
    assert s.cmd("RSET") == (250, ["2.0.0 Ok"])
    assert s.cmd("RSET now") == (501, ["5.5.4 Syntax: RSET"])


def test_wrong_order():
    s = start()
    assert s.cmd("MAIL FROM:<a@example.net>") == (503, ["5.5.1 Send HELO/EHLO first"])
    s.ehlo()
    assert s.cmd("RCPT TO:<alice@example.org>") == (503, ["5.5.1 Need MAIL command"])
    assert s.cmd("DATA") == (503, ["5.5.1 Need MAIL command"])
    assert s.cmd("MAIL FROM:<a@example.net>") == (250, ["2.1.0 Ok"])
    assert s.cmd("MAIL FROM:<a@example.net>") == (503, ["5.5.1 Nested MAIL command"])
    assert s.cmd("DATA") == (554, ["5.5.1 No valid recipients"])


def test_bad_syntax_replies():
    s = start()
    s.ehlo()
    assert s.cmd("MAIL FROM:<bad address>") == (501, ["5.1.7 Bad sender address syntax"])
    assert s.cmd("MAIL TO:<a@example.net>")[0] == 501
    s.cmd("MAIL FROM:<>")
    assert s.cmd("RCPT TO:<@@>") == (501, ["5.1.3 Bad recipient address syntax"])
    assert s.cmd("RCPT TO:<jörg@example.org>")[1][0].startswith("5.6.7")


def test_bare_lf_command_refused():
    s = start()
    s.send(b"EHLO client.example.net\nNOOP\r\n")
    assert s.replies() == [
        (500, ["5.5.2 Bare LF in command line: lines must end with CRLF"]),
        (250, ["2.0.0 Ok"]),
    ]


def test_line_too_long_keeps_session():
    s = start()
    s.send(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
    assert s.replies() == [(500, ["5.5.2 Line too long"]), (250, ["2.0.0 Ok"])]
    assert not s.closed


# -- MAIL / RCPT parameters -------------------------------------------------------------


def test_mail_parameters():
    s = start(maxMessageSize=1000)
    s.ehlo()
    assert s.cmd("MAIL FROM:<a@example.net> SIZE=1001") == (
        552,
        ["5.3.4 Message size exceeds fixed maximum message size"],
    )
    assert s.cmd("MAIL FROM:<a@example.net> BODY=BINARY") == (555, ["5.5.4 Unsupported BODY type"])
    assert s.cmd("MAIL FROM:<a@example.net> SMTPUTF8=yes") == (501, ["5.5.4 SMTPUTF8 takes no value"])
    assert s.cmd("MAIL FROM:<a@example.net> FOO=bar") == (555, ["5.5.4 Unsupported parameter FOO"])
    assert s.cmd("MAIL FROM:<a@example.net> SIZE=abc")[0] == 501
    assert s.cmd("MAIL FROM:<a@example.net> size=999 body=8bitmime AUTH=<>") == (250, ["2.1.0 Ok"])
    assert s.proto._mailParams == {"SIZE": "999", "BODY": "8BITMIME", "AUTH": "<>"}
    assert s.cmd("RCPT TO:<alice@example.org> FOO=1") == (555, ["5.5.4 Unsupported parameter FOO"])


def test_mail_parameters_need_ehlo():
    s = start()
    s.cmd("HELO client.example.net")
    assert s.cmd("MAIL FROM:<a@example.net> BODY=8BITMIME")[0] == 555
    assert s.cmd("MAIL FROM:<a@example.net>")[0] == 250


def test_unknown_local_user_and_relay():
    s = start()
    s.ehlo()
    s.cmd("MAIL FROM:<a@example.net>")
    assert s.cmd("RCPT TO:<nobody@example.org>") == (550, ["5.1.1 No such user here"])
    assert s.cmd("RCPT TO:<someone@elsewhere.example>") == (550, ["5.7.1 Relaying denied"])
    assert s.cmd("RCPT TO:<alice@example.org>") == (250, ["2.1.5 OK"])
    assert s.metrics.get("mailplat_messages_rejected_total") == 2


def test_relay_allowed_after_auth_plain():
    s = start(peer="127.0.0.1", host="127.0.0.1", authOnMX=True)
    s.ehlo()
    s.cmd("MAIL FROM:<alice@example.org>")
    assert s.cmd("RCPT TO:<friend@elsewhere.example>") == (550, ["5.7.1 Relaying denied"])
    s.cmd("RSET")
    s.login()
    s.cmd("MAIL FROM:<alice@example.org> AUTH=alice@example.org")
    assert s.proto._mailParams == {"AUTH": "alice@example.org"}
    assert s.cmd("RCPT TO:<friend@elsewhere.example>") == (250, ["2.1.5 OK"])
    s.send("DATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\n")
    assert s.replies()[1][0] == 250
    (qid, env, content) = s.queue.committed[0]
    assert env.authenticatedUser == "alice@example.org"
    assert env.protocol == "ESMTPA"
    assert b" with ESMTPA id " in content


def test_router_failure_is_temporary():
    class Broken(StaticRouter):
        def route(self, request):
            raise RuntimeError("ldap down")

    s = start(router=Broken())
    s.ehlo()
    s.cmd("MAIL FROM:<a@example.net>")
    assert s.cmd("RCPT TO:<alice@example.org>") == (451, ["4.3.0 Temporary routing failure, try again later"])
    assert s.cmd("NOOP")[0] == 250


def test_too_many_recipients():
    s = start(maxRecipients=2)
    s.ehlo()
    s.cmd("MAIL FROM:<a@example.net>")
    assert s.cmd("RCPT TO:<alice@example.org>")[0] == 250
    assert s.cmd("RCPT TO:<bob@example.org>")[0] == 250
    assert s.cmd("RCPT TO:<carol@example.org>") == (452, ["4.5.3 Too many recipients"])


# -- the whole transaction --------------------------------------------------------------

MESSAGE = (
    b"From: a@example.net\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: test\r\n"
    b"\r\n"
    b"line one\r\n"
    b"..dotted\r\n"
    b"\x80\xff 8bit\r\n"
    b"last"  # no final CRLF before the end marker's CRLF
)


def test_full_transaction_stored_byte_exact():
    s = start(now=1700000000)
    s.ehlo("client.example.net")
    assert s.cmd("MAIL FROM:<a@example.net> BODY=8BITMIME") == (250, ["2.1.0 Ok"])
    assert s.cmd("RCPT TO:<alice@example.org>") == (250, ["2.1.5 OK"])
    assert s.cmd("DATA") == (354, ["End data with <CR><LF>.<CR><LF>"])
    s.send(MESSAGE + b"\r\n.\r\n")
    ((code, (text,)),) = s.replies()
    assert code == 250
    qid = text.rsplit(" ", 1)[1]
    assert text == f"2.0.0 Ok: queued as {qid}"
    ((storedId, env, content),) = s.queue.committed
    assert storedId == qid
    split = content.index(b"From: a@example.net")
    header, body = content[:split], content[split:]
    assert body == MESSAGE.replace(b"..dotted", b".dotted") + b"\r\n"
    assert header.startswith(
        b"Received: from client.example.net ([192.0.2.7])\r\n\tby mx.example.org (mailplat) with ESMTP id "
    )
    assert header.endswith(b"\r\n\tfor <alice@example.org>; Tue, 14 Nov 2023 22:13:20 +0000\r\n")
    assert env.sender == "a@example.net"
    assert env.recipients == ("alice@example.org",)
    assert env.mailParams == {"BODY": "8BITMIME"}
    assert env.rcptParams == ({},)
    assert env.clientAddress == "192.0.2.7"
    assert env.clientName == "client.example.net"
    assert env.protocol == "ESMTP"
    assert env.authenticatedUser == ""
    assert len(env.routes) == 1 and env.routes[0].destinations[0].user == "alice@example.org"
    assert s.metrics.get("mailplat_messages_received_total") == 1
    # the transaction is reset: a new one can start at once
    assert s.cmd("RCPT TO:<alice@example.org>")[0] == 503
    assert s.cmd("MAIL FROM:<>")[0] == 250


def test_several_recipients_and_null_sender():
    s = start()
    s.ehlo()
    s.send(
        "MAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<nobody@example.org>\r\n"
        "RCPT TO:<bob@example.org>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n"
    )
    codes = [c for c, _ in s.replies()]
    assert codes == [250, 250, 550, 250, 354, 250, 221]
    ((_, env, content),) = s.queue.committed
    assert env.sender == ""
    assert env.recipients == ("alice@example.org", "bob@example.org")
    assert [r.destinations[0].user for r in env.routes] == list(env.recipients)
    assert b"\tfor <" not in content  # no "for" clause for more than one recipient
    assert content.endswith(b"\r\nx\r\n")


def test_data_with_bare_lf_refused_and_session_in_sync():
    s = start()
    s.ehlo()
    s.send("MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    s.replies()
    s.send(b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<bob@example.org>\r\n")
    assert s.replies() == []  # still inside DATA: nothing was executed
    s.send(b".\r\nNOOP\r\n")
    assert s.replies() == [
        (550, ["5.6.0 Message contains bare CR or LF: lines must end with CRLF"]),
        (250, ["2.0.0 Ok"]),
    ]
    assert s.queue.committed == []
    assert s.metrics.get("mailplat_messages_rejected_total") == 1


def test_data_bare_lf_normalised_when_configured():
    s = start(normaliseBareLineEndings=True)
    s.ehlo()
    s.send("MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\na\nb\r\n.\r\n")
    assert [c for c, _ in s.replies()] == [250, 250, 354, 250]
    assert s.queue.committed[0][2].endswith(b"\r\na\r\nb\r\n")


def test_size_limit_during_data():
    s = start(maxMessageSize=100)
    s.ehlo()
    s.send("MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    s.replies()
    for _ in range(10):
        s.send(b"y" * 50 + b"\r\n")
    s.send(b".\r\n")
    assert s.replies() == [(552, ["5.3.4 Message size exceeds fixed maximum message size"])]
    assert s.queue.committed == []
    assert s.cmd("NOOP")[0] == 250


def test_queue_commit_failure_is_temporary():
    s = start()
    s.ehlo()
    s.queue.failNext = TemporaryStoreFailure("disk on fire")
    s.send("MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nhello\r\n.\r\n")
    replies = s.replies()
    assert replies[-1] == (451, ["4.3.0 Temporary storage failure, try again later"])
    assert "fire" not in repr(replies)  # internals are not shown
    assert s.queue.committed == []
    assert s.metrics.get("mailplat_messages_received_total") == 0
    # and the session goes on
    s.send("MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nhello\r\n.\r\n")
    assert s.replies()[-1][0] == 250
    assert len(s.queue.committed) == 1


def test_queue_begin_failure():
    s = start()
    s.ehlo()

    def broken(envelope):
        raise OSError("no space")

    s.queue.begin = broken
    s.send("MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert s.replies()[-1] == (451, ["4.3.0 Temporary storage failure, try again later"])
    assert not s.proto._dataMode


def test_connection_lost_during_data_aborts():
    s = start()
    s.ehlo()
    s.send("MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\npartial\r\n")
    txn = s.proto._txn
    assert txn is not None
    s.proto.connectionLost(None)
    assert txn._done and s.queue.committed == []
    assert s.metrics.get("mailplat_sessions_active", protocol="smtp") == 0


# -- pipelining ----------------------------------------------------------------------------


@implementer(IRouter)
class SlowRouter:
    """Answers route() later through the clock: later calls answer sooner."""

    def __init__(self, clock, inner):
        self.clock = clock
        self.inner = inner
        self.calls = []

    def isLocalDomain(self, domain):
        return self.inner.isLocalDomain(domain)

    def route(self, request):
        self.calls.append(request.address)
        d = defer.Deferred()
        delay = 10 - len(self.calls)
        self.clock.callLater(delay, d.callback, self.inner.route(request))
        return d


def test_pipelined_group_answered_in_order_with_async_router():
    clock = task.Clock()
    router = SlowRouter(clock, StaticRouter(domains=["example.org"], users=["alice@example.org", "bob@example.org"]))
    s = Session(router=router)
    s.clock = clock  # share one clock for the idle timer and the router
    s.factory.reactor = clock
    s.replies()
    s.ehlo()
    s.send(
        "MAIL FROM:<a@example.net>\r\n"
        "RCPT TO:<alice@example.org>\r\n"
        "RCPT TO:<nobody@example.org>\r\n"
        "RCPT TO:<bob@example.org>\r\n"
        "NOOP\r\n"
        "DATA\r\n"
    )
    assert s.replies() == [(250, ["2.1.0 Ok"])]
    # one router question at a time: nothing after the first RCPT has run
    assert router.calls == ["alice@example.org"]
    for _ in range(3):
        clock.advance(10)
    assert router.calls == ["alice@example.org", "nobody@example.org", "bob@example.org"]
    assert s.replies() == [
        (250, ["2.1.5 OK"]),
        (550, ["5.1.1 No such user here"]),
        (250, ["2.1.5 OK"]),
        (250, ["2.0.0 Ok"]),
        (354, ["End data with <CR><LF>.<CR><LF>"]),
    ]
    s.send(".\r\n")
    assert s.replies()[0][0] == 250
    assert s.queue.committed[0][1].recipients == ("alice@example.org", "bob@example.org")


def test_body_pipelined_before_354_is_body():
    clock = task.Clock()
    router = SlowRouter(clock, StaticRouter(domains=["example.org"], users=["alice@example.org"]))
    s = Session(router=router)
    s.factory.reactor = clock
    s.replies()
    s.ehlo()
    s.send(
        "MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        "Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    )
    assert [c for c, _ in s.replies()] == [250]
    clock.advance(10)
    assert [c for c, _ in s.replies()] == [250, 354, 250, 221]
    assert s.queue.committed[0][2].endswith(b"\r\nSubject: x\r\n\r\nbody\r\n")


def test_backpressure_pauses_reading():
    clock = task.Clock()
    router = SlowRouter(clock, StaticRouter(domains=["example.org"], users=["alice@example.org"]))
    s = Session(router=router)
    s.factory.reactor = clock
    s.replies()
    s.ehlo()
    s.send("MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\n")
    assert s.transport.producerState == "producing"
    s.send(b"NOOP\r\n" * 20000)
    assert s.transport.producerState == "paused"
    clock.advance(100)
    assert s.transport.producerState == "producing"
    replies = s.replies()
    assert len(replies) == 2 + 20000
    assert replies[-1] == (250, ["2.0.0 Ok"])


# -- STARTTLS -------------------------------------------------------------------------------


def test_starttls_discards_pipelined_commands():
    ctx = object()
    s = start(tlsContextFactory=ctx)
    s.ehlo()
    s.send("STARTTLS\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<alice@example.org>\r\n")
    assert s.replies() == [(220, ["2.0.0 Ready to start TLS"])]
    assert s.transport.tlsStarted == [ctx]
    # session state was reset: the injected MAIL did not run, EHLO is needed again
    assert s.proto._sender is None
    assert s.cmd("MAIL FROM:<a@example.net>") == (503, ["5.5.1 Send HELO/EHLO first"])
    lines = s.ehlo()
    assert "STARTTLS" not in lines
    assert s.cmd("STARTTLS") == (503, ["5.5.1 TLS already active"])
    s.send("MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nx\r\n.\r\n")
    assert s.replies()[-1][0] == 250
    assert s.queue.committed[0][1].protocol == "ESMTPS"


def test_starttls_not_offered():
    s = start()
    s.ehlo()
    assert s.cmd("STARTTLS") == (502, ["5.5.1 STARTTLS not available"])
    s = start(role="submissions", tlsContextFactory=object())
    assert s.cmd("STARTTLS") == (503, ["5.5.1 TLS already active"])


def test_starttls_forgets_authentication():
    s = start(peer="127.0.0.1", host="127.0.0.1", role="submission", tlsContextFactory=object())
    s.ehlo()
    s.login()
    s.cmd("STARTTLS")
    s.ehlo()
    assert s.cmd("MAIL FROM:<alice@example.org>") == (530, ["5.7.0 Authentication required"])


# -- AUTH ------------------------------------------------------------------------------------


def test_submission_requires_auth():
    s = start(role="submission", allowInsecureAuth=True)
    s.ehlo()
    assert s.cmd("MAIL FROM:<alice@example.org>") == (530, ["5.7.0 Authentication required"])
    s.login()
    assert s.cmd("MAIL FROM:<alice@example.org>") == (250, ["2.1.0 Ok"])
    assert s.cmd("RCPT TO:<x@elsewhere.example>") == (250, ["2.1.5 OK"])


def test_auth_plain_with_challenge():
    s = start(role="submission", allowInsecureAuth=True)
    s.ehlo()
    assert s.cmd("AUTH PLAIN") == (334, [""])
    assert s.cmd(b64(b"\0alice@example.org\0secret")) == (235, ["2.7.0 Authentication successful"])
    assert s.cmd("AUTH PLAIN") == (503, ["5.5.1 Already authenticated"])


def test_auth_login():
    s = start(role="submission", allowInsecureAuth=True)
    s.ehlo()
    assert s.cmd("AUTH LOGIN") == (334, [b64(b"Username:")])
    assert s.cmd(b64(b"alice@example.org")) == (334, [b64(b"Password:")])
    assert s.cmd(b64(b"secret")) == (235, ["2.7.0 Authentication successful"])
    assert s.proto._user == "alice@example.org"


def test_auth_login_with_initial_response():
    s = start(role="submission", allowInsecureAuth=True)
    s.ehlo()
    assert s.cmd("AUTH LOGIN " + b64(b"alice@example.org")) == (334, [b64(b"Password:")])
    assert s.cmd(b64(b"secret"))[0] == 235


def test_auth_cancel_and_bad_input():
    s = start(role="submission", allowInsecureAuth=True)
    s.ehlo()
    s.cmd("AUTH LOGIN")
    assert s.cmd("*") == (501, ["5.0.0 Authentication cancelled"])
    assert s.cmd("AUTH LOGIN")[0] == 334
    assert s.cmd("!!notbase64") == (501, ["5.5.2 Invalid base64 data"])
    assert s.cmd("AUTH CRAM-MD5") == (504, ["5.5.4 Unrecognized authentication type"])
    assert s.cmd("AUTH PLAIN !!") == (501, ["5.5.2 Invalid base64 data"])
    assert s.cmd("AUTH PLAIN " + b64(b"\0alice@example.org\0secret") + "=") == (501, ["5.5.2 Invalid base64 data"])
    assert s.cmd("AUTH PLAIN " + b64(b"only-one-part")) == (501, ["5.5.2 Malformed authentication response"])
    # the session still works
    s.login()


def test_auth_refused_without_tls_on_public_address():
    s = start(role="submission", tlsContextFactory=object())
    s.ehlo()
    assert s.cmd("AUTH PLAIN " + b64(b"\0alice@example.org\0secret")) == (
        538,
        ["5.7.11 Encryption required for requested authentication mechanism"],
    )
    s = start()  # mx without authOnMX
    s.ehlo()
    assert s.cmd("AUTH PLAIN")[0] == 502


def test_auth_needs_ehlo_and_no_transaction():
    s = start(role="mx", authOnMX=True, allowInsecureAuth=True)
    assert s.cmd("AUTH PLAIN")[0] == 503
    s.cmd("HELO client.example.net")
    assert s.cmd("AUTH PLAIN") == (503, ["5.5.1 Send EHLO first"])
    s.ehlo()
    s.cmd("MAIL FROM:<a@example.net>")
    assert s.cmd("AUTH PLAIN") == (503, ["5.5.1 AUTH not permitted during a mail transaction"])


def test_auth_failures_back_off_then_disconnect():
    s = start(role="submission", allowInsecureAuth=True)
    s.ehlo()
    bad = "AUTH PLAIN " + b64(b"\0alice@example.org\0wrong") + "\r\n"
    for n, delay in enumerate([1, 2, 4, 8], start=1):
        s.send(bad + "NOOP\r\n")
        assert s.replies() == []  # the answer is held back ...
        s.clock.advance(delay - 0.01)
        assert s.replies() == []
        s.clock.advance(0.01)  # ... for 1, 2, 4, 8 seconds; pipelined NOOP waits its turn
        assert s.replies() == [(535, ["5.7.8 Authentication credentials invalid"]), (250, ["2.0.0 Ok"])]
        assert s.metrics.get("mailplat_auth_failures_total", protocol="smtp") == n
    s.send(bad)
    assert s.replies() == [
        (535, ["5.7.8 Authentication credentials invalid"]),
        (421, [f"4.7.0 {HOST} Too many authentication failures"]),
    ]
    assert s.closed


def test_logout_on_connection_lost():
    s = start(role="submission", allowInsecureAuth=True)
    s.ehlo()
    s.login()
    calls = []
    s.proto._logout = lambda: calls.append(1)
    s.proto.connectionLost(None)
    assert calls == [1]


# -- hooks -----------------------------------------------------------------------------------


@implementer(ISMTPHook)
class RecordingHook:
    name = "recording"

    def __init__(self, **answers):
        self.answers = answers
        self.seen = []

    def _answer(self, stage, *args):
        self.seen.append((stage,) + args)
        answer = self.answers.get(stage)
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(*args)
        return answer if answer is not None else Decision.proceed()

    def connect(self, context):
        assert isinstance(context, SMTPContext)
        return self._answer("connect")

    def helo(self, context, name):
        return self._answer("helo", name)

    def mail(self, context, sender, params):
        return self._answer("mail", sender, params)

    def rcpt(self, context, recipient, params, route):
        return self._answer("rcpt", recipient)

    def data(self, context, message):
        self.context = context
        return self._answer("data", message)


@implementer(ISMTPHook)
class EmptyHook:
    name = "empty"


def test_hook_rejects_at_rcpt():
    hook = RecordingHook(
        rcpt=lambda r: Decision.reject("Not for you", 550, "5.7.1") if r.startswith("bob") else Decision.proceed()
    )
    s = start(hooks=[EmptyHook(), hook])
    s.ehlo()
    s.cmd("MAIL FROM:<a@example.net>")
    assert s.cmd("RCPT TO:<alice@example.org>") == (250, ["2.1.5 OK"])
    assert s.cmd("RCPT TO:<bob@example.org>") == (550, ["5.7.1 Not for you"])
    assert s.cmd("RCPT TO:<nobody@example.org>") == (550, ["5.1.1 No such user here"])
    s.send("DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    assert s.replies()[-1][0] == 250
    assert s.queue.committed[0][1].recipients == ("alice@example.org",)
    stages = [x[0] for x in hook.seen]
    assert stages == ["connect", "helo", "mail", "rcpt", "rcpt", "data"]
    assert hook.seen[-1][1] == b"Subject: x\r\n\r\nhi\r\n"
    assert hook.context.recipients == ("alice@example.org",)


def test_hook_exception_is_451():
    s = start(hooks=[RecordingHook(mail=RuntimeError("boom"))])
    s.ehlo()
    assert s.cmd("MAIL FROM:<a@example.net>") == (451, ["4.3.0 Temporary policy failure, try again later"])


def test_first_non_continue_decision_wins():
    first = RecordingHook(mail=Decision.accept())
    second = RecordingHook(mail=Decision.reject())
    s = start(hooks=[first, second])
    s.ehlo()
    assert s.cmd("MAIL FROM:<a@example.net>")[0] == 250
    assert [x[0] for x in second.seen] == ["connect", "helo"]


def test_hook_rejects_data_and_disconnects():
    s = start(hooks=[RecordingHook(data=Decision.reject("Spam", 554, "5.7.1"))])
    s.ehlo()
    s.send("MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nbuy now\r\n.\r\n")
    assert s.replies()[-1] == (554, ["5.7.1 Spam"])
    assert s.queue.committed == []
    s = start(hooks=[RecordingHook(helo=Decision.disconnect("Go away"))])
    assert s.cmd("EHLO x.example") == (421, ["Go away"])
    assert s.closed


def test_hook_rejects_at_connect():
    # A refusal at connect carries the hook's enhanced code (only the 220 greeting goes without).
    s = Session(hooks=[RecordingHook(connect=Decision.reject("No service"))])
    assert s.replies() == [(554, [f"5.7.1 {HOST} No service"])]
    assert s.cmd("EHLO x.example")[0] == 503
    assert s.cmd("QUIT")[0] == 221
    s = Session(hooks=[RecordingHook(connect=Decision.tempfail("Busy"))])
    assert s.replies() == [(421, [f"4.7.1 {HOST} Busy"])]
    assert s.closed


def test_async_hook_and_wrong_code_class():
    d = defer.Deferred()
    s = start(hooks=[RecordingHook(mail=lambda *a: d)])
    s.ehlo()
    s.send("MAIL FROM:<a@example.net>\r\nNOOP\r\n")
    assert s.replies() == []
    d.callback(Decision("reject-perm", 250, "2.0.0", "broken hook"))
    assert s.replies() == [(550, ["5.7.1 broken hook"]), (250, ["2.0.0 Ok"])]


# -- limits -----------------------------------------------------------------------------------


def test_idle_timeout():
    s = start(idleTimeout=300)
    s.clock.advance(299)
    s.cmd("NOOP")
    s.clock.advance(299)
    assert not s.closed
    s.clock.advance(1)
    assert s.replies() == [(421, [f"4.4.2 {HOST} Error: timeout exceeded"])]
    assert s.closed
    s.proto.connectionLost(None)
    assert s.clock.getDelayedCalls() == []


def test_error_limit():
    s = start(maxErrors=20)
    for _ in range(19):
        assert s.cmd("BOGUS")[0] == 500
    s.send("BOGUS\r\n")
    assert s.replies() == [
        (500, ["5.5.1 Command unrecognized"]),
        (421, [f"4.7.0 {HOST} Too many errors, closing connection"]),
    ]
    assert s.closed
    s.send("NOOP\r\n")
    assert s.replies() == []


# -- real sockets -------------------------------------------------------------------------------


class RealSocketTests(unittest.TestCase):
    """The factory on 127.0.0.1 with the real reactor, driven by smtplib in a thread."""

    timeout = 20

    def listen(self, **kw):
        from twisted.internet import reactor

        from mailplat.tls import ensureCertificate, serverContextFactory

        cert, key = ensureCertificate(self.mktemp())
        self.queue = MemoryQueue()
        factory = SMTPFactory(
            hostname="localhost",
            portal=memoryPortal({"alice@example.org": "secret"}),
            router=StaticRouter(domains=["example.org"], users=["alice@example.org"]),
            queue=self.queue,
            tlsContextFactory=serverContextFactory(cert, key),
            reactor=reactor,
            **kw,
        )
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.listening = port
        return port.getHost().port

    @defer.inlineCallbacks
    def test_commands_wait_while_replies_wait(self):
        """A client that pipelines commands and never reads: the server stops taking them, loses none."""
        import socket

        from unread import pushUnread

        from mailplat import net

        self.patch(net, "WRITE_BACKLOG", 64 * 1024)
        port = self.listen()
        # Small kernel buffers: what the client can push past a server that
        # stopped reading is theirs, and the test stays short.
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            self.listening.socket.setsockopt(socket.SOL_SOCKET, option, 4096)

        def flood():
            s, sent = pushUnread(port, b"NOOP\r\n")
            try:
                assert sent < 2 * 1024 * 1024, sent  # the server stopped reading
                # Every command gets its answer once the client reads; then the
                # line cut short is finished, and QUIT.
                received = b""
                while received.count(b"\n") < sent // 6:
                    data = s.recv(1 << 20)
                    assert data, received[-200:]
                    received += data
                s.sendall(b"NOOP\r\n"[sent % 6:] + b"QUIT\r\n" if sent % 6 else b"QUIT\r\n")
                while not received.endswith(b"221 2.0.0 Bye\r\n"):
                    data = s.recv(1 << 20)
                    assert data, received[-200:]
                    received += data
                assert received.count(b"250 2.0.0 Ok\r\n") == -(-sent // 6)
                assert received.count(b"\n") == -(-sent // 6) + 1
            finally:
                s.close()

        yield threads.deferToThread(flood)

    @defer.inlineCallbacks
    def test_send_starttls_login(self):
        port = self.listen(role="submission", allowInsecureAuth=False)

        def client():
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                code, caps = c.ehlo("client.example")
                assert b"STARTTLS" in caps and b"AUTH" not in caps, caps
                c.starttls(context=ctx)
                c.ehlo("client.example")
                assert "auth" in c.esmtp_features
                c.login("alice@example.org", "secret")
                refused = c.sendmail(
                    "alice@example.org",
                    ["friend@elsewhere.example", "alice@example.org"],
                    b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n",
                )
                return refused

        refused = yield threads.deferToThread(client)
        self.assertEqual(refused, {})
        ((qid, env, content),) = self.queue.committed
        self.assertEqual(env.protocol, "ESMTPSA")
        self.assertEqual(env.recipients, ("friend@elsewhere.example", "alice@example.org"))
        self.assertTrue(content.startswith(b"Received: from client.example ([127.0.0.1])"))
        self.assertTrue(content.endswith(b"\r\nSubject: hi\r\n\r\n.leading dot\r\nbody\r\n"))

    @defer.inlineCallbacks
    def test_auth_login_and_rejections(self):
        port = self.listen(role="mx", authOnMX=True)

        def client():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                c.ehlo("client.example")
                assert c.has_extn("pipelining") and c.has_extn("enhancedstatuscodes")
                code, _ = c.docmd("MAIL", "FROM:<a@example.net>")
                assert code == 250
                rejected = c.rcpt("nobody@example.org")
                c.rset()
                # plaintext LOGIN is allowed on loopback by default
                c.user, c.password = "alice@example.org", "secret"
                ok = c.auth("LOGIN", c.auth_login)
                c.sendmail("alice@example.org", ["remote@elsewhere.example"], b"Subject: x\r\n\r\nx\r\n")
                return rejected, ok

        rejected, ok = yield threads.deferToThread(client)
        self.assertEqual(rejected, (550, b"5.1.1 No such user here"))
        self.assertEqual(ok[0], 235)
        self.assertEqual(self.queue.committed[0][1].recipients, ("remote@elsewhere.example",))

    @defer.inlineCallbacks
    def test_starttls_injection_over_real_socket(self):
        """Plaintext pipelined after STARTTLS is not executed inside TLS."""
        port = self.listen()

        def client():
            import socket

            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                f = raw.makefile("rb")
                assert f.readline().startswith(b"220 ")
                raw.sendall(b"EHLO client.example\r\nSTARTTLS\r\nMAIL FROM:<evil@example.net>\r\n")
                while not f.readline().startswith(b"250 "):
                    pass
                assert f.readline() == b"220 2.0.0 Ready to start TLS\r\n"
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    tf = tls.makefile("rb")
                    tls.sendall(b"MAIL FROM:<a@example.net>\r\n")
                    first = tf.readline()
                    tls.sendall(b"QUIT\r\n")
                    return first, tf.readline()

        first, second = yield threads.deferToThread(client)
        # the injected MAIL never ran: EHLO is needed again, nothing was accepted before
        self.assertEqual(first, b"503 5.5.1 Send HELO/EHLO first\r\n")
        self.assertEqual(second, b"221 2.0.0 Bye\r\n")


def test_received_names_a_client_whose_helo_is_not_a_domain_by_its_address():
    """RFC 5321 §4.4 From-domain is a Domain or an address literal: another HELO name goes into a comment."""
    s = start(now=1700000000)
    s.ehlo("bad_name;(x)")
    s.cmd("MAIL FROM:<a@example.net>")
    s.cmd("RCPT TO:<alice@example.org>")
    s.cmd("DATA")
    s.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert s.replies()[0][0] == 250
    ((_, _, content),) = s.queue.committed
    assert content.startswith(
        b"Received: from [192.0.2.7] ([192.0.2.7])\r\n\t(HELO name not a domain: bad_name??x?)\r\n\tby mx.example.org "
    )
    s = start(now=1700000000)
    s.ehlo("[192.0.2.7]")
    s.cmd("MAIL FROM:<a@example.net>")
    s.cmd("RCPT TO:<alice@example.org>")
    s.cmd("DATA")
    s.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    ((_, _, content),) = s.queue.committed
    assert content.startswith(b"Received: from [192.0.2.7] ([192.0.2.7])\r\n\tby mx.example.org ")


def test_size_parameter_takes_ascii_digits_only():
    s = start()
    s.ehlo()
    # "²" is a digit to str.isdigit() but not to int(), nor to RFC 1870's DIGIT.
    assert s.cmd("MAIL FROM:<a@example.net> SIZE=\u00b2 SMTPUTF8") == (501, ["5.5.4 Syntax: SIZE=number"])
    assert s.cmd("MAIL FROM:<a@example.net> SIZE=12") == (250, ["2.1.0 Ok"])


def test_auth_empty_initial_response_is_a_response():
    """RFC 4954 §4: "=" is an empty initial response, which PLAIN and LOGIN cannot take; no initial response gets a challenge."""
    s = start(role="submission", allowInsecureAuth=True)
    s.ehlo()
    assert s.cmd("AUTH PLAIN =") == (501, ["5.5.2 Malformed authentication response"])
    assert s.cmd("AUTH LOGIN =") == (501, ["5.5.2 Malformed authentication response"])
    assert s.cmd("AUTH PLAIN") == (334, [""])
    assert s.cmd(b64(b"\0alice@example.org\0secret"))[0] == 235


def test_auth_plain_for_another_identity_is_an_authentication_failure():
    """A well-formed PLAIN response whose authorization identity is another user: 535 5.7.8 (RFC 4954 §6)."""
    s = start(role="submission", allowInsecureAuth=True)
    s.ehlo()
    s.send("AUTH PLAIN " + b64(b"bob@example.org\0alice@example.org\0secret") + "\r\n")
    s.clock.advance(1)
    assert s.replies() == [(535, ["5.7.8 Authentication credentials invalid"])]
