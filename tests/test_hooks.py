"""The built-in pre-queue hooks (mailplat.hooks), each driven through a real SMTP session."""

import pytest
from twisted.internet import defer, task
from twisted.names import dns
from twisted.names.error import DNSNameError
from zope.interface.verify import verifyObject

from mailplat import plugins
from mailplat.config import PluginChoice
from mailplat.hooks.dnsbl import DNSBLHook, queryName
from mailplat.hooks.greylist import GreylistHook
from mailplat.hooks.limits import LimitsHook
from mailplat.hooks.verify import VerifyHook
from mailplat.interfaces import PluginContext
from mailplat.interfaces.hooks import ISMTPHook
from mailplat.testing import MemoryStore, StaticRouter

from test_smtp_server import Session, start

MAIL = "MAIL FROM:<a@example.net>"


def context(**extra):
    return PluginContext(dataDir="/nonexistent", reactor=task.Clock(), store=MemoryStore(), extra=extra)


@pytest.mark.parametrize("name", ["limits", "dnsbl", "greylist", "verify"])
def test_plugins_found_built_and_verified(name):
    args = {"zones": ["bl.example"], "nameservers": ["127.0.0.1:5353"]} if name == "dnsbl" else {}
    hook = plugins.build("hook", PluginChoice(name, args), context(router=StaticRouter()), ISMTPHook)
    assert verifyObject(ISMTPHook, hook)


@pytest.mark.parametrize(
    "name,args,message",
    [
        ("limits", {"bogus": 1}, "unknown argument(s) for hook 'limits': bogus"),
        ("limits", {"max_connections_per_ip": "ten"}, "max_connections_per_ip must be an integer"),
        ("limits", {"exempt": ["not-a-net"]}, "exempt"),
        ("dnsbl", {}, "needs args.zones"),
        ("dnsbl", {"zones": ["bl.example"], "nameservers": ["dns.example"]}, "IP:PORT"),
        ("dnsbl", {"zones": ["bl.example"], "answers": ["x"]}, "IPv4"),
        ("greylist", {"delay": 100, "retry_window": 50}, "retry_window must be longer"),
        ("greylist", {"delay": -1}, "delay must be"),
        ("verify", {"recipients": "yes"}, "recipients must be true or false"),
    ],
)
def test_bad_arguments_refused(name, args, message):
    with pytest.raises(plugins.PluginError) as e:
        plugins.build("hook", PluginChoice(name, args), context(), ISMTPHook)
    assert message in str(e.value)


# -- limits -----------------------------------------------------------------------------------


def test_connections_per_ip_limited_and_released_on_disconnect():
    clock = task.Clock()
    hook = LimitsHook(clock, maxConnectionsPerIP=2)
    a, b = start(hooks=[hook]), start(hooks=[hook])
    c = Session(hooks=[hook])
    assert c.replies() == [(421, ["4.7.0 mx.example.org Too many connections from your address, try again later"])]
    assert c.closed
    c.proto.connectionLost(None)  # a refused connection is not counted twice
    other = start(hooks=[hook], peer="192.0.2.8")  # another address is not affected
    assert hook.activeConnections("192.0.2.7") == 2
    a.proto.connectionLost(None)
    assert hook.activeConnections("192.0.2.7") == 1
    start(hooks=[hook])
    b.proto.connectionLost(None)
    other.proto.connectionLost(None)


def test_ipv6_counted_per_64_and_exempt_networks():
    from mailplat.hooks import networks

    hook = LimitsHook(task.Clock(), maxConnectionsPerIP=1, exempt=networks(["192.0.2.0/24"]))
    start(hooks=[hook], peer="2001:db8::1")
    s = Session(hooks=[hook], peer="2001:db8::2")
    assert s.replies()[0][0] == 421
    for _ in range(3):
        start(hooks=[hook])  # 192.0.2.7 is exempt


def test_connection_rate():
    clock = task.Clock()
    hook = LimitsHook(clock, maxConnectionsPerIP=0, connectionRate=2, window=60)
    start(hooks=[hook]), start(hooks=[hook])
    s = Session(hooks=[hook])
    assert s.replies()[0] == (421, ["4.7.0 mx.example.org Connection rate limit exceeded, try again later"])
    clock.advance(61)
    start(hooks=[hook])


def test_message_rate():
    s = start(hooks=[])
    hook = LimitsHook(s.clock, messageRate=2, window=60)
    s.factory.hooks = (hook,)
    s.ehlo()
    for _ in range(2):
        assert s.cmd(MAIL)[0] == 250
        s.cmd("RSET")
    assert s.cmd(MAIL) == (450, ["4.7.1 Message rate limit exceeded, try again later"])
    s.clock.advance(61)
    assert s.cmd(MAIL)[0] == 250


# -- dnsbl ----------------------------------------------------------------------------------------


class FakeResolver:
    """An IResolver answering A lookups from a dict (name -> list of addresses)."""

    def __init__(self, records, fail=()):
        self.records = records
        self.fail = set(fail)
        self.queries = []

    def lookupAddress(self, name, timeout=None):
        self.queries.append(name)
        if name in self.fail:
            return defer.fail(RuntimeError("timeout"))
        if name not in self.records:
            return defer.fail(DNSNameError(name))
        answers = [dns.RRHeader(name, dns.A, payload=dns.Record_A(a)) for a in self.records[name]]
        return defer.succeed((answers, [], []))


def test_query_names():
    assert queryName("192.0.2.99", "bl.example.") == "99.2.0.192.bl.example"
    assert queryName("::ffff:192.0.2.99", "bl.example") == "99.2.0.192.bl.example"
    assert queryName("2001:db8::1", "bl.example").startswith("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.")


def test_dnsbl_listed_client_refused_at_rcpt():
    resolver = FakeResolver({"7.2.0.192.bl.example": ["127.0.0.2"]})
    s = start(hooks=[])
    hook = DNSBLHook(resolver, ["clean.example", "bl.example"], s.clock)
    s.factory.hooks = (hook,)
    s.proto.connectionLost(None)
    s = start(hooks=[hook])
    s.ehlo()
    s.cmd(MAIL)
    assert s.cmd("RCPT TO:<alice@example.org>") == (
        554, ["5.7.1 Service unavailable; client [192.0.2.7] blocked using bl.example"]
    )
    assert s.cmd("RCPT TO:<bob@example.org>")[0] == 554
    # One lookup per zone, cached for the next connection.
    start(hooks=[hook]).proto.connectionLost(None)
    assert resolver.queries == ["7.2.0.192.clean.example", "7.2.0.192.bl.example"]


def test_dnsbl_authenticated_error_answers_and_failures_pass():
    resolver = FakeResolver(
        {"7.2.0.192.bl.example": ["127.0.0.2"], "8.2.0.192.bl.example": ["127.255.255.254"]},
        fail={"9.2.0.192.bl.example"},
    )
    clock = task.Clock()
    hook = DNSBLHook(resolver, ["bl.example"], clock)
    s = start(hooks=[hook], peer="127.0.0.1", host="127.0.0.1", authOnMX=True)
    s.ehlo()
    for peer in ("192.0.2.8", "192.0.2.9"):
        t = start(hooks=[hook], peer=peer)
        t.ehlo()
        t.cmd(MAIL)
        assert t.cmd("RCPT TO:<alice@example.org>")[0] == 250
    listed = start(hooks=[hook], authOnMX=True, allowInsecureAuth=True)
    listed.ehlo()
    listed.login()
    listed.cmd(MAIL)
    assert listed.cmd("RCPT TO:<alice@example.org>")[0] == 250


def test_dnsbl_answer_arriving_later_keeps_replies_in_order():
    d = defer.Deferred()

    class Slow(FakeResolver):
        def lookupAddress(self, name, timeout=None):
            return d

    hook = DNSBLHook(Slow({}), ["bl.example"], task.Clock())
    s = start(hooks=[hook])
    s.ehlo()
    s.send(MAIL + "\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nNOOP\r\n")
    assert s.replies() == [(250, ["2.1.0 Ok"])]
    d.callback(([dns.RRHeader("x", dns.A, payload=dns.Record_A("127.0.0.4"))], [], []))
    assert [c for c, _ in s.replies()] == [554, 554, 250]


# -- verify -----------------------------------------------------------------------------------------


def test_verify_recipient_without_a_mailbox_refused():
    store = MemoryStore()
    router = StaticRouter(domains=["example.org"], users=["alice@example.org", "ghost@example.org"])
    store.createAccount("alice@example.org")
    hook = VerifyHook(router, store)
    s = start(hooks=[hook], router=router)
    s.ehlo()
    s.cmd(MAIL)
    assert s.cmd("RCPT TO:<alice@example.org>")[0] == 250
    assert s.cmd("RCPT TO:<ghost@example.org>") == (550, ["5.1.1 Recipient address rejected: mailbox unavailable"])


def test_verify_unknown_local_sender_refused():
    router = StaticRouter(domains=["example.org"], users=["alice@example.org"])
    hook = VerifyHook(router, MemoryStore())
    s = start(hooks=[hook], router=router)
    s.ehlo()
    assert s.cmd("MAIL FROM:<forged@example.org>") == (553, ["5.7.1 Sender address rejected: not a known address here"])
    assert s.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    s.cmd("RSET")
    assert s.cmd("MAIL FROM:<>")[0] == 250
    s.cmd("RSET")
    assert s.cmd("MAIL FROM:<anyone@example.net>")[0] == 250


# -- greylist --------------------------------------------------------------------------------------


def test_greylisting():
    clock = task.Clock()
    hook = GreylistHook(clock, delay=300, retryWindow=3600, lifetime=86400)

    def attempt(peer="192.0.2.7", rcpt="alice@example.org"):
        s = start(hooks=[hook], peer=peer)
        s.clock = clock
        s.ehlo()
        s.cmd(MAIL)
        return s.cmd(f"RCPT TO:<{rcpt}>")

    assert attempt() == (451, ["4.7.1 Greylisted, try again in 300 seconds"])
    clock.advance(100)
    assert attempt()[0] == 451
    clock.advance(250)
    assert attempt("192.0.2.200")[0] == 250  # same /24, retried after the delay
    clock.advance(80000)
    assert attempt()[0] == 250  # known triplet
    assert attempt(rcpt="bob@example.org")[0] == 451  # another recipient is a new triplet
    clock.advance(86401)
    assert attempt()[0] == 451  # expired


def test_greylisting_retry_too_late_starts_again():
    clock = task.Clock()
    hook = GreylistHook(clock, delay=10, retryWindow=100)
    ctx = type("C", (), dict(authenticatedUser="", clientAddress="192.0.2.7", sender="a@b.example"))()
    assert hook.rcpt(ctx, "x@example.org", {}, None).code == 451
    clock.advance(200)
    assert hook.rcpt(ctx, "x@example.org", {}, None).code == 451
    clock.advance(11)
    assert hook.rcpt(ctx, "x@example.org", {}, None).action == "continue"


def test_greylistingSurvivesARestart(tmp_path):
    clock = task.Clock()
    path = str(tmp_path / "greylist.json")
    ctx = type("C", (), dict(authenticatedUser="", clientAddress="192.0.2.7", sender="a@b.example"))()
    hook = GreylistHook(clock, delay=10, retryWindow=100, path=path, saveInterval=60)
    assert hook.rcpt(ctx, "x@example.org", {}, None).code == 451
    clock.advance(11)
    assert hook.rcpt(ctx, "x@example.org", {}, None).action == "continue"
    clock.advance(60)  # the periodic save
    again = GreylistHook(clock, delay=10, retryWindow=100, path=path)
    assert again.rcpt(ctx, "x@example.org", {}, None).action == "continue", "a passed triplet is remembered"
    assert again.rcpt(ctx, "y@example.org", {}, None).code == 451


def test_greylistUnreadableFileStartsEmpty(tmp_path):
    path = tmp_path / "greylist.json"
    path.write_text("{not json")
    hook = GreylistHook(task.Clock(), path=str(path))
    assert len(hook._entries) == 0


def test_dnsbl_servfail_and_refused_pass_but_are_logged():
    """Fail open: only NXDOMAIN is a plain "not listed"; SERVFAIL and REFUSED (a list refusing the resolver) are logged."""
    from twisted.logger import globalLogPublisher
    from twisted.names.error import DNSQueryRefusedError, DNSServerError

    class Failing(FakeResolver):
        def lookupAddress(self, name, timeout=None):
            self.queries.append(name)
            error = {"7": DNSServerError, "8": DNSQueryRefusedError, "9": DNSNameError}[name.split(".")[0]]
            return defer.fail(error(name))

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        hook = DNSBLHook(Failing({}), ["bl.example"], task.Clock())
        for peer in ("192.0.2.7", "192.0.2.8", "192.0.2.9"):
            t = start(hooks=[hook], peer=peer)
            t.ehlo()
            t.cmd(MAIL)
            assert t.cmd("RCPT TO:<alice@example.org>")[0] == 250
    finally:
        globalLogPublisher.removeObserver(seen.append)
    warned = [e for e in seen if "dnsbl: lookup of" in str(e.get("log_format", ""))]
    assert [e["name"].split(".")[0] for e in warned] == ["7", "8"]
