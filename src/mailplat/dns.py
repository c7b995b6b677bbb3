"""
DNS for mail routing, on twisted.names: MX, A/AAAA, TXT, with timeouts.

L{MailResolver.mailHosts} implements RFC 5321 section 5.1:

  - MX records sorted by preference; hosts of equal preference in random
    order (the random source is injectable for tests);
  - no MX record at all (the name exists): the domain itself is the one
    host, as if it had an MX of preference 0 ("implicit MX");
  - a null MX (RFC 7505: one MX, preference 0, exchange ".") means the
    domain accepts no mail: L{NullMX} is raised at once;
  - a name that does not exist (NXDOMAIN): L{NoSuchDomain} (permanent);
  - a lookup that times out or fails with SERVFAIL: L{TemporaryDNSError}.

L{MailResolver.addresses} returns the IPv6 and IPv4 addresses of one host,
IPv6 first (RFC 3974: a dual-stack sender tries both families).  CNAMEs are
followed by the resolver.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from dataclasses import dataclass

from twisted.internet import defer

from mailplat.log import Logger
from twisted.names import client, dns, error

_log = Logger()


class DNSError(Exception):
    permanent = False


class NullMX(DNSError):
    """The domain publishes a null MX (RFC 7505): it accepts no mail."""

    permanent = True


class NoSuchDomain(DNSError):
    permanent = True


class NoAddresses(DNSError):
    """A mail host has no A or AAAA record."""

    permanent = False


class TemporaryDNSError(DNSError):
    permanent = False


@dataclass(frozen=True)
class MailHost:
    preference: int
    name: str
    implicit: bool = False


def _isIP(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


class MailResolver:
    """
    @param resolver: a twisted.names resolver (L{client.Resolver}); by default
        one built from C{servers} (a list of C{(host, port)}) or, with neither,
        the system's resolv.conf.
    @param timeout: the twisted.names retry timeouts for each query.
    @param randomSource: a C{random.Random}-like object for shuffling
        equal preferences.
    """

    def __init__(self, resolver=None, servers=None, reactor=None, timeout=(1, 3, 11), randomSource=None):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._timeout = timeout
        if resolver is None:
            resolver = client.Resolver(servers=servers, resolv=None if servers else "/etc/resolv.conf",
                                       reactor=reactor, timeout=timeout)
        self._resolver = resolver
        self._random = randomSource or random.Random()

    def _translate(self, failure, name):
        if failure.check(error.DNSNameError):
            raise NoSuchDomain(f"{name}: no such domain")
        if failure.check(defer.TimeoutError, error.DNSServerError, error.DNSQueryRefusedError):
            raise TemporaryDNSError(f"{name}: DNS lookup failed ({failure.getErrorMessage() or failure.type.__name__})")
        if failure.check(error.DNSUnknownError, error.DNSFormatError, error.DNSNotImplementedError):
            raise TemporaryDNSError(f"{name}: DNS error ({failure.type.__name__})")
        return failure

    @defer.inlineCallbacks
    def mailHosts(self, domain: str):
        """Fires with the L{MailHost}s to try, in order."""
        domain = domain.rstrip(".").lower()
        if domain.startswith("[") and domain.endswith("]"):
            # An address literal: deliver to that address itself.
            return [MailHost(0, domain, implicit=True)]
        d = self._resolver.lookupMailExchange(domain, timeout=self._timeout)
        answers, _, _ = yield d.addErrback(self._translate, domain)
        mxs = [(r.payload.preference, str(r.payload.name).rstrip(".").lower())
               for r in answers if r.type == dns.MX]
        if not mxs:
            # RFC 5321 5.1: no MX, the name itself is the host (if it resolves).
            return [MailHost(0, domain, implicit=True)]
        if any(name == "" for _, name in mxs):
            if len(mxs) == 1 and mxs[0][0] == 0:
                raise NullMX(f"{domain} does not accept mail (null MX)")
            mxs = [m for m in mxs if m[1]]
        byPref: dict[int, list[str]] = {}
        for pref, name in mxs:
            byPref.setdefault(pref, [])
            if name not in byPref[pref]:
                byPref[pref].append(name)
        hosts = []
        seen = set()
        for pref in sorted(byPref):
            names = byPref[pref][:]
            self._random.shuffle(names)
            for name in names:
                if name not in seen:
                    seen.add(name)
                    hosts.append(MailHost(pref, name))
        return hosts

    @defer.inlineCallbacks
    def addresses(self, host: str):
        """Fires with a list of IP address strings for C{host}, IPv6 first."""
        literal = host.strip("[]")
        if literal.lower().startswith("ipv6:"):
            literal = literal[5:]
        if _isIP(literal):
            return [literal]
        results = yield defer.DeferredList(
            [self._resolver.lookupIPV6Address(host, timeout=self._timeout),
             self._resolver.lookupAddress(host, timeout=self._timeout)],
            consumeErrors=True,
        )
        out = []
        failures = []
        for ok, value in results:
            if not ok:
                failures.append(value)
                continue
            answers = value[0]
            for r in answers:
                if r.type == dns.AAAA:
                    out.append(socket.inet_ntop(socket.AF_INET6, r.payload.address))
                elif r.type == dns.A:
                    out.append(r.payload.dottedQuad())
        if out:
            return list(dict.fromkeys(out))
        if failures and all(f.check(error.DNSNameError) for f in failures):
            raise NoSuchDomain(f"{host}: no such host")
        if failures and not all(f.check(error.DNSNameError) for f in failures):
            raise TemporaryDNSError(f"{host}: address lookup failed")
        raise NoAddresses(f"{host}: no A or AAAA record")

    def txt(self, name: str):
        """Fires with the TXT strings of C{name} (each record's strings joined), for SPF, DMARC, MTA-STS."""
        d = self._resolver.lookupText(name, timeout=self._timeout)

        def got(result):
            return [b"".join(r.payload.data).decode("utf-8", "replace") for r in result[0] if r.type == dns.TXT]

        def failed(f):
            if f.check(error.DNSNameError):
                return []
            self._translate(f, name)
            return f

        return d.addCallbacks(got, failed)
