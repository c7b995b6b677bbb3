"""
Outbound transport: takes the remote recipients of one queued message and
delivers them over SMTP to the right hosts.

For each destination domain (or the smarthost, or a per-domain route from
the config): the MX hosts in order (L{mailplat.dns.MailResolver}), each
host's addresses (IPv6 and IPv4), a connection to each in turn until one
answers.  Connection-level problems (refused, timeout, a 4xx or 5xx
greeting, TLS required but not offered) move on to the next address or
host; the answers of a host that took the transaction are final for this
attempt.  Recipients that no host could be reached for are deferred.

A host that is this server itself (one of its own listener addresses and
ports, or its own host name as the MX) is a mail loop: the recipients fail
with 5.4.6.  Connections are kept for reuse for a short while after a
delivery, and each destination has a limit on parallel connections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet import defer, endpoints, ssl
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError

from mailplat.log import Logger

from mailplat.dns import DNSError, MailHost
from mailplat.outbound.client import (
    ClientPolicy,
    Recipient,
    Result,
    SessionFailure,
    SMTPClientFactory,
    SMTPProtocolError,
    Transaction,
)

_log = Logger()


@dataclass
class DomainPolicy:
    """Per-destination settings: TLS policy and an optional route (C{host:port})."""

    tls: str = "opportunistic"
    route: str = ""


@dataclass
class OutboundSettings:
    heloName: str = "localhost"
    port: int = 25
    smarthost: str = ""
    smarthostUser: str = ""
    smarthostPassword: str = ""
    tls: str = "opportunistic"
    domains: dict = field(default_factory=dict)
    connectTimeout: float = 30.0
    perDestination: int = 10
    reuseSeconds: float = 10.0
    ownAddresses: frozenset = frozenset()
    ownNames: frozenset = frozenset()


def clientTLSContext(hostname: str, verify: bool):
    """A client TLS context: verified against C{hostname}, or opportunistic (no verification)."""
    if verify:
        return ssl.optionsForClientTLS(hostname)
    return ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)


def _splitHostPort(value: str, defaultPort: int):
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    return host, int(port) if port else defaultPort


def _domainOf(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


class _Semaphores:
    def __init__(self, limit):
        self.limit = limit
        self._sems = {}

    def get(self, key):
        if key not in self._sems:
            self._sems[key] = defer.DeferredSemaphore(self.limit)
        return self._sems[key]


class OutboundTransport:
    def __init__(self, resolver, settings: OutboundSettings, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.resolver = resolver
        self.settings = settings
        self._idle: dict[tuple, list] = {}
        self._semaphores = _Semaphores(settings.perDestination)

    def _policyFor(self, domain: str) -> DomainPolicy:
        p = self.settings.domains.get(domain)
        if p is not None:
            return p
        return DomainPolicy(tls=self.settings.tls)

    def deliver(self, sender: str, items: list, content: bytes, ret=None, envid=None, needsSMTPUTF8=False,
                binary=False):
        """
        Deliver C{content} to C{items}: a list of L{Recipient}s.  Fires with a
        list of L{Result}s in the same order.  C{binary}: the message came
        with C{BODY=BINARYMIME}.
        """
        byDomain: dict[str, list] = {}
        for r in items:
            byDomain.setdefault(_domainOf(r.address), []).append(r)
        ds = [self._deliverDomain(domain, sender, rcpts, content, ret, envid, needsSMTPUTF8, binary)
              for domain, rcpts in byDomain.items()]

        def collect(lists):
            byAddr = {res.recipient: res for lst in lists for res in lst}
            return [byAddr[r.address] for r in items]

        return defer.gatherResults(ds, consumeErrors=True).addCallback(collect)

    @defer.inlineCallbacks
    def _deliverDomain(self, domain, sender, rcpts, content, ret, envid, needsSMTPUTF8, binary=False):
        policy = self._policyFor(domain)
        txn = Transaction(sender, rcpts, content, ret, envid, needsSMTPUTF8, binary)
        sem = self._semaphores.get(domain)
        yield sem.acquire()
        try:
            return (yield self._attempt(domain, policy, txn))
        finally:
            sem.release()

    @defer.inlineCallbacks
    def _hosts(self, domain, policy):
        route = policy.route or self.settings.smarthost
        if route:
            host, port = _splitHostPort(route, self.settings.port)
            return [(MailHost(0, host), port)]
        hosts = yield self.resolver.mailHosts(domain)
        return [(h, self.settings.port) for h in hosts]

    def _deferAll(self, txn, status, text, remote=""):
        return [Result(r.address, "deferred", status, text, remote) for r in txn.recipients]

    def _failAll(self, txn, status, text, remote=""):
        return [Result(r.address, "failed", status, text, remote) for r in txn.recipients]

    @defer.inlineCallbacks
    def _attempt(self, domain, policy, txn):
        try:
            hosts = yield self._hosts(domain, policy)
        except DNSError as e:
            if e.permanent:
                status = "5.1.10" if "null MX" in str(e) else "5.1.2"
                return self._failAll(txn, status, str(e))
            return self._deferAll(txn, "4.4.3", str(e))
        lastError = ("4.4.1", f"no mail host of {domain} could be reached")
        lastPermanent = None
        for host, port in hosts:
            if host.name in self.settings.ownNames:
                return self._failAll(txn, "5.4.6", f"mail for {domain} loops back to myself (MX {host.name})")
            try:
                addresses = yield self.resolver.addresses(host.name)
            except DNSError as e:
                lastError = ("4.4.3", str(e))
                continue
            for address in addresses:
                if (address, port) in self.settings.ownAddresses:
                    return self._failAll(txn, "5.4.6", f"mail for {domain} loops back to myself ({address}:{port})")
                try:
                    results = yield self._viaHost(address, port, host.name, policy, txn)
                except SessionFailure as e:
                    lastError = (e.reply.enhanced or ("5.0.0" if e.permanent else "4.0.0"),
                                 f"{host.name}[{address}] said: {e.reply.describe()} (in reply to {e.stage})")
                    lastPermanent = lastError if e.permanent else None
                    continue
                except (ConnectError, DNSLookupError, TimeoutError, SMTPProtocolError, OSError) as e:
                    lastError = ("4.4.1", f"connection to {host.name}[{address}]:{port} failed: {e}")
                    lastPermanent = None
                    continue
                return results
        if lastPermanent is not None:
            return self._failAll(txn, *lastPermanent)
        return self._deferAll(txn, *lastError)

    @defer.inlineCallbacks
    def _viaHost(self, address, port, hostName, policy, txn):
        key = (address, port, policy.tls)
        client = self._takeIdle(key)
        if client is None:
            client = yield self._connect(address, port, hostName, policy)
        try:
            results = yield client.deliver(txn)
        except Exception:
            if client.transport is not None:
                client.transport.abortConnection()
            raise
        self._keepIdle(key, client)
        return results

    @defer.inlineCallbacks
    def _connect(self, address, port, hostName, policy):
        cpolicy = ClientPolicy(heloName=self.settings.heloName, tls=policy.tls, tlsHostname=hostName,
                               username=self.settings.smarthostUser if not policy.route else "",
                               password=self.settings.smarthostPassword if not policy.route else "")
        if ":" in address:
            endpoint = endpoints.TCP6ClientEndpoint(self._reactor, address, port, timeout=self.settings.connectTimeout)
        else:
            endpoint = endpoints.TCP4ClientEndpoint(self._reactor, address, port, timeout=self.settings.connectTimeout)
        factory = SMTPClientFactory(cpolicy, hostName, self._reactor, clientTLSContext)
        client = yield endpoint.connect(factory)
        try:
            yield client.greet()
        except Exception:
            if client.transport is not None:
                client.transport.abortConnection()
            raise
        return client

    def _takeIdle(self, key):
        pool = self._idle.get(key, [])
        while pool:
            client, call = pool.pop()
            if call.active():
                call.cancel()
            if client._lost is None and client.transport is not None:
                return client
        return None

    def _keepIdle(self, key, client):
        if client._lost is not None:
            return
        if not client.reusable:
            client.quit()
            return
        call = self._reactor.callLater(self.settings.reuseSeconds, self._expire, key, client)
        self._idle.setdefault(key, []).append((client, call))

    def _expire(self, key, client):
        pool = self._idle.get(key, [])
        self._idle[key] = [(c, call) for c, call in pool if c is not client]
        client.quit()

    def close(self):
        """Say QUIT on every idle connection."""
        ds = []
        for key, pool in list(self._idle.items()):
            for client, call in pool:
                if call.active():
                    call.cancel()
                ds.append(client.quit())
        self._idle.clear()
        return defer.gatherResults(ds, consumeErrors=True)
