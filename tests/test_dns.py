import random

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailplat.dns import MailHost, MailResolver, NoSuchDomain, NullMX, TemporaryDNSError

from dnsserver import DNSTestServer

ZONE = {
    "multi.test": [("MX", 20, "backup.multi.test"), ("MX", 10, "a.multi.test"), ("MX", 10, "b.multi.test"),
                   ("MX", 10, "c.multi.test")],
    "a.multi.test": [("A", "127.0.0.2")],
    "b.multi.test": [("AAAA", "::1"), ("A", "127.0.0.3")],
    "implicit.test": [("A", "127.0.0.4")],
    "null.test": [("MX", 0, "")],
    "broken.test": "SERVFAIL",
    "alias.test": [("CNAME", "implicit.test")],
    "spf.test": [("TXT", "v=spf1 ", "-all")],
}


class MailResolverTests(unittest.TestCase):
    def setUp(self):
        self.server = DNSTestServer(ZONE)
        port = self.server.start(reactor)
        self.addCleanup(self.server.stop)
        self.resolver = MailResolver(servers=[("127.0.0.1", port)], reactor=reactor, timeout=(3, 6),
                                     randomSource=random.Random(4))

    @defer.inlineCallbacks
    def test_preferenceOrderAndShuffle(self):
        orders = set()
        for seed in range(12):
            self.resolver._random = random.Random(seed)
            hosts = yield self.resolver.mailHosts("Multi.TEST.")
            self.assertEqual([h.preference for h in hosts], [10, 10, 10, 20])
            self.assertEqual(hosts[-1].name, "backup.multi.test")
            orders.add(tuple(h.name for h in hosts[:3]))
        self.assertGreater(len(orders), 1, "equal preferences must be tried in random order")

    @defer.inlineCallbacks
    def test_implicitMX(self):
        self.assertEqual((yield self.resolver.mailHosts("implicit.test")), [MailHost(0, "implicit.test", True)])

    @defer.inlineCallbacks
    def test_nullMX(self):
        yield self.assertFailure(self.resolver.mailHosts("null.test"), NullMX)

    @defer.inlineCallbacks
    def test_nxdomainAndServfail(self):
        yield self.assertFailure(self.resolver.mailHosts("nowhere.test"), NoSuchDomain)
        yield self.assertFailure(self.resolver.mailHosts("broken.test"), TemporaryDNSError)
        self.flushLoggedErrors(RuntimeError)  # the test server logs the failure it simulates

    @defer.inlineCallbacks
    def test_addressesBothFamiliesIPv6First(self):
        self.assertEqual((yield self.resolver.addresses("b.multi.test")), ["::1", "127.0.0.3"])
        self.assertEqual((yield self.resolver.addresses("a.multi.test")), ["127.0.0.2"])
        self.assertEqual((yield self.resolver.addresses("[127.0.0.9]")), ["127.0.0.9"])
        self.assertEqual((yield self.resolver.addresses("alias.test")), ["127.0.0.4"])
        yield self.assertFailure(self.resolver.addresses("nothing.test"), NoSuchDomain)

    @defer.inlineCallbacks
    def test_txt(self):
        self.assertEqual((yield self.resolver.txt("spf.test")), ["v=spf1 -all"])
        self.assertEqual((yield self.resolver.txt("nowhere.test")), [])
