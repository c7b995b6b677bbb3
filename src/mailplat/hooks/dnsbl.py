"""
The C{dnsbl} hook: refuse mail from clients listed in DNS block lists
(RFC 5782), looked up with C{twisted.names}.

The lookup starts when the client connects (the greeting does not wait for
it); its result is consulted at each RCPT, so a listed client gets
C{554 5.7.1 Service unavailable; client [IP] blocked using ZONE} for each
recipient, and the rejection is logged with the whole envelope so far.
Authenticated clients are never refused (a customer on a dynamic address
list still submits).  A listing is any A record in C{127.0.0.0/8} except
the C{127.255.255.0/24} error answers some lists give to abusive resolvers;
C{answers = ["127.0.0.2", ...]} restricts it to those values.  A lookup
that fails or times out counts as not listed (fail open) and is logged.

Arguments: C{zones} (required, a list), C{nameservers} (C{["HOST:PORT"]};
default the system resolver), C{timeout} (seconds, default 5),
C{answers}, C{exempt} (networks never looked up), C{cache_ttl} (seconds a
result is kept, default 300).  An embedder may pass its own
C{IResolver} as C{context.extra["resolver"]}.
"""

from __future__ import annotations

import ipaddress

from twisted.internet import defer

from mailplat.log import Logger
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailplat.hooks import Args, PassThroughHook, inNetworks, parseAddress
from mailplat.interfaces.hooks import Decision, ISMTPHook, ISMTPHookFactory

_log = Logger()

_ERROR_ANSWERS = ipaddress.ip_network("127.255.255.0/24")
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def queryName(address: str, zone: str):
    """The name to look up for C{address} in C{zone} (reversed octets or nibbles), or C{None}."""
    ip = parseAddress(address)
    if ip is None:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        labels = str(ip).split(".")[::-1]
    else:
        labels = list(ip.exploded.replace(":", ""))[::-1]
    return ".".join(labels) + "." + zone.strip(".")


@implementer(ISMTPHook)
class DNSBLHook(PassThroughHook):
    name = "dnsbl"

    def __init__(self, resolver, zones, reactor, timeout=5.0, answers=(), exempt=(), cacheTTL=300.0):
        self._resolver = resolver
        self.zones = tuple(zones)
        self._reactor = reactor
        self.timeout = timeout
        self.answers = {ipaddress.ip_address(a) for a in answers}
        self.exempt = tuple(exempt)
        self.cacheTTL = cacheTTL
        self._cache = {}  # address -> (expires, zone or None)
        self._pending = {}  # sessionId -> Deferred(zone or None)

    def _listed(self, records) -> bool:
        for rr in records:
            if rr.type != dns.A:
                continue
            ip = ipaddress.ip_address(rr.payload.dottedQuad())
            if self.answers:
                if ip in self.answers:
                    return True
            elif ip in _LOOPBACK and ip not in _ERROR_ANSWERS:
                return True
        return False

    def _lookupZone(self, address, zone):
        name = queryName(address, zone)
        if name is None:
            return defer.succeed(False)
        d = self._resolver.lookupAddress(name, timeout=(self.timeout,))
        d.addCallback(lambda result: self._listed(result[0]))

        def failed(f):
            if f.check(DNSNameError):
                return False  # NXDOMAIN: not listed
            # SERVFAIL, REFUSED (a list that refuses the resolver) and
            # timeouts: not listed either (fail open), but the operator hears of it.
            _log.warn("dnsbl: lookup of {name} failed: {error}", name=name, error=f.getErrorMessage())
            return False

        return d.addErrback(failed)

    def check(self, address):
        """Fires with the first zone that lists C{address}, or C{None}."""
        now = self._reactor.seconds()
        cached = self._cache.get(address)
        if cached is not None and cached[0] > now:
            return defer.succeed(cached[1])
        lookups = [self._lookupZone(address, zone) for zone in self.zones]
        d = defer.gatherResults(lookups, consumeErrors=True)

        def decide(results):
            zone = next((z for z, listed in zip(self.zones, results) if listed), None)
            if len(self._cache) > 100000:
                self._cache.clear()
            self._cache[address] = (self._reactor.seconds() + self.cacheTTL, zone)
            return zone

        return d.addCallback(decide)

    def connect(self, context):
        if not inNetworks(context.clientAddress, self.exempt):
            self._pending[context.sessionId] = self.check(context.clientAddress)
        return Decision.proceed()

    def disconnect(self, context):
        self._pending.pop(context.sessionId, None)

    def rcpt(self, context, recipient, params, route):
        if context.authenticatedUser:
            return Decision.proceed()
        pending = self._pending.get(context.sessionId)
        if pending is None:
            if inNetworks(context.clientAddress, self.exempt):
                return Decision.proceed()
            pending = self._pending[context.sessionId] = self.check(context.clientAddress)
        result = defer.Deferred()

        def decide(zone):
            if zone is None:
                return Decision.proceed()
            _log.info(
                "dnsbl: {client} listed in {zone}: refusing <{sender}> -> <{rcpt}>",
                client=context.clientAddress,
                zone=zone,
                sender=context.sender,
                rcpt=recipient,
            )
            return Decision.reject(
                f"Service unavailable; client [{context.clientAddress}] blocked using {zone}", 554, "5.7.1"
            )

        # Chain without consuming the shared result (every RCPT reads it).
        def share(zone):
            result.callback(zone)
            return zone

        def shareFailure(failure):
            result.errback(failure)
            return None

        pending.addCallbacks(share, shareFailure)
        return result.addCallback(decide)


def _nameserver(text):
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, "53"
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        port = int(port)
    except ValueError:
        raise ValueError(f"hook 'dnsbl': nameservers entries are IP:PORT (got {text!r})")
    return host, port


@implementer(IPlugin, ISMTPHookFactory)
class DNSBLHookFactory:
    name = "dnsbl"
    description = "Refuse clients listed in DNS block lists (args: zones, nameservers, timeout, answers, exempt)."

    def build(self, args, context):
        a = Args("dnsbl", args, {"zones", "nameservers", "timeout", "answers", "exempt", "cache_ttl"})
        zones = a.strings("zones")
        if not zones:
            raise ValueError("hook 'dnsbl' needs args.zones, e.g. [\"zen.spamhaus.org\"]")
        for z in zones:
            if not all(label and len(label) < 64 for label in z.strip(".").split(".")):
                raise ValueError(f"hook 'dnsbl': not a zone name: {z!r}")
        answers = a.strings("answers")
        for x in answers:
            try:
                ipaddress.IPv4Address(x)
            except ValueError:
                raise ValueError(f"hook 'dnsbl': answers entries are IPv4 addresses (got {x!r})")
        servers = [_nameserver(s) for s in a.strings("nameservers")]
        resolver = (context.extra or {}).get("resolver")
        if resolver is None:
            from twisted.names import client

            if servers:
                resolver = client.Resolver(servers=servers, reactor=context.reactor)
            else:
                resolver = client.createResolver(reactor=context.reactor)
        return DNSBLHook(
            resolver,
            zones,
            context.reactor,
            timeout=a.number("timeout", 5.0, 0.1),
            answers=answers,
            exempt=a.networks("exempt"),
            cacheTTL=a.number("cache_ttl", 300.0, 0.0),
        )
