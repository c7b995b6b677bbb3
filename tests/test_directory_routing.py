import pytest
from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailplat.directory import Directory, DirectoryError
from mailplat.interfaces.routing import LocalDestination, RemoteDestination, Route, RoutingRequest
from mailplat.routing.directory import DirectoryRouter


def makeDirectory(path):
    d = Directory(str(path))
    d.addDomain("Example.ORG")
    d.addUser("Alice@example.org", "hash-a")
    d.addUser("bob@example.org", "hash-b")
    d.addAlias("team@example.org", ["alice@example.org", "bob@example.org"])
    d.addAlias("outside@example.org", ["friend@elsewhere.example"])
    d.addAlias("loop1@example.org", ["loop2@example.org"])
    d.addAlias("loop2@example.org", ["loop1@example.org"])
    return d


def test_directoryRules(tmp_path):
    d = makeDirectory(tmp_path / "dir.sqlite")
    assert d.listDomains() == ["example.org"]
    assert d.listUsers() == ["alice@example.org", "bob@example.org"]
    assert d.getPasswordHash("ALICE@Example.org") == "hash-a"
    with pytest.raises(DirectoryError, match="already exists"):
        d.addUser("alice@example.org", "x")
    with pytest.raises(DirectoryError, match="not served here"):
        d.addUser("carol@other.example", "x")
    with pytest.raises(DirectoryError, match="is a user"):
        d.addAlias("alice@example.org", ["bob@example.org"])
    with pytest.raises(DirectoryError, match="still has"):
        d.removeDomain("example.org")
    with pytest.raises(DirectoryError):
        d.addDomain("bad domain!")
    with pytest.raises(DirectoryError):
        d.addUser("no-at-sign", "x")
    d.removeAlias("team@example.org")
    assert "team@example.org" not in d.listAliases()


class RouterTests(unittest.TestCase):
    def setUp(self):
        self.router = DirectoryRouter(makeDirectory(self.mktemp()), reactor, trustedNetworks=["10.0.0.0/8"])

    def route(self, address, **kw):
        return defer.maybeDeferred(self.router.route, RoutingRequest(address, **kw))

    @defer.inlineCallbacks
    def test_snapshotAnswersWithoutTheDisk(self):
        yield self.route("alice@example.org")
        while self.router._refreshing is not None:
            yield self.router._refreshing
        r = self.router.route(RoutingRequest("bob@example.org"))
        self.assertIsInstance(r, Route, "a known user is answered from memory, synchronously")
        self.assertEqual(r.destinations, (LocalDestination("bob@example.org"),))

    @defer.inlineCallbacks
    def test_newUserIsNeverRefusedFromAStaleSnapshot(self):
        yield self.route("alice@example.org")
        while self.router._refreshing is not None:
            yield self.router._refreshing
        self.router._directory.addUser("carol@example.org", "hash-c")
        r = yield self.route("carol@example.org")
        self.assertEqual(r.destinations, (LocalDestination("carol@example.org"),))

    @defer.inlineCallbacks
    def test_localUsersAliasesSubaddresses(self):
        r = yield self.route("ALICE@Example.Org")
        self.assertEqual(r.destinations, (LocalDestination("alice@example.org"),))
        r = yield self.route("alice+lists@example.org")
        self.assertEqual(r.destinations, (LocalDestination("alice@example.org"),))
        r = yield self.route("team@example.org")
        self.assertEqual(set(r.destinations), {LocalDestination("alice@example.org"), LocalDestination("bob@example.org")})
        r = yield self.route("outside@example.org")
        self.assertEqual(r.destinations, (RemoteDestination("friend@elsewhere.example"),))

    @defer.inlineCallbacks
    def test_unknownAndLoops(self):
        for address in ("nobody@example.org", "loop1@example.org"):
            r = yield self.route(address)
            self.assertEqual((r.code, r.enhanced), (550, "5.1.1"), address)

    @defer.inlineCallbacks
    def test_noOpenRelay(self):
        for address in ("x@elsewhere.example", "x@[192.0.2.1]", "user@other@example.org",
                        "user%other.example@example.org", "x@example.org.evil.example"):
            r = yield self.route(address)
            self.assertFalse(r.accepted, address)
            self.assertEqual(r.code, 550, address)
        r = yield self.route("x@elsewhere.example", authenticated=True)
        self.assertEqual(r.destinations, (RemoteDestination("x@elsewhere.example"),))
        r = yield self.route("x@elsewhere.example", clientAddress="10.1.2.3")
        self.assertTrue(r.accepted)
        r = yield self.route("x@elsewhere.example", clientAddress="11.1.2.3")
        self.assertFalse(r.accepted)

    @defer.inlineCallbacks
    def test_postmasterOfEveryDomainAndWithoutOne(self):
        """RFC 5321 §4.5.1: postmaster@<served domain> (any case) and RCPT TO:<Postmaster> are accepted."""
        r = yield self.route("Postmaster")
        self.assertEqual((r.code, r.enhanced), (550, "5.1.1"), "nobody to give it to yet")
        self.router.postmaster = "alice@example.org"
        for address in ("Postmaster", "POSTMASTER", "postmaster@example.org", "PostMaster@EXAMPLE.org"):
            r = yield self.route(address)
            self.assertEqual(r.destinations, (LocalDestination("alice@example.org"),), address)
        # A postmaster user or alias of the domain comes first.
        self.router._directory.addAlias("postmaster@example.org", ["bob@example.org"])
        self.router.postmaster = None
        for address in ("Postmaster", "POSTMASTER@example.org"):
            r = yield self.route(address)
            self.assertEqual(r.destinations, (LocalDestination("bob@example.org"),), address)
        r = yield self.route("postmaster")
        self.assertTrue(r.accepted)
        r = yield self.route("postmaster@elsewhere.example")
        self.assertEqual((r.code, r.enhanced), (550, "5.7.1"), "another domain's postmaster is not relayed")


def test_factoryTakesAPostmasterAndWarnsWithoutOne(tmp_path):
    from twisted.logger import globalLogPublisher

    from mailplat.routing.directory import DirectoryRouterFactory

    class Context:
        directory = makeDirectory(tmp_path / "dir.sqlite")

    Context.reactor = reactor
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        router = DirectoryRouterFactory().build({}, Context)
        assert router.postmaster is None
        assert any("no postmaster for example.org" in e.get("log_format", "") for e in seen), seen
        seen.clear()
        router = DirectoryRouterFactory().build({"postmaster": "Alice@Example.org"}, Context)
        assert router.postmaster == "alice@example.org"
        assert not any("no postmaster" in e.get("log_format", "") for e in seen)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    with pytest.raises(ValueError, match="bad postmaster"):
        DirectoryRouterFactory().build({"postmaster": "not an address"}, Context)
