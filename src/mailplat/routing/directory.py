"""
The built-in router: domains, users and aliases from the embedded
L{mailplat.directory.Directory}.

For an address in a served domain: a user gets its INBOX; C{user+detail}
(sub-addressing, RFC 5233) goes to C{user}; an alias expands to its targets
(recursively, at most 10 levels; remote targets are forwarded through the
outbound queue); anything else is C{550 5.1.1}.

Postmaster (RFC 5321 §4.5.1): C{postmaster@<served domain>} (any case) that
is neither a user nor an alias goes to the router's C{postmaster} address
when one is configured, and C{RCPT TO:<Postmaster>} (no domain) goes to
that address, or else to C{postmaster@} the first served domain (by name)
that has such a user or alias.  For any other domain the
address is relayed only for an authenticated or trusted client, otherwise
C{550 5.7.1}: mailplat is never an open relay.  Tricks such as
C{user%other@ours} or C{"user@other"@ours} name a local part that is not a
user here, so they get C{550 5.1.1}, never relaying.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.threads import deferToThreadPool
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailplat.directory import DirectoryError, normaliseAddress, normaliseDomain
from mailplat.interfaces.routing import IRouter, IRouterFactory, LocalDestination, RemoteDestination, Route
from mailplat.log import Logger

_log = Logger()

MAX_ALIAS_DEPTH = 10


@implementer(IRouter)
class DirectoryRouter:
    """
    Answers from an in-memory snapshot of the directory, refreshed at most
    every C{refreshInterval} seconds (in a thread, and only when the
    directory changed).  An answer that would reject the address is checked
    again against the directory itself first, so a user or domain added a
    moment ago is never refused; only an address removed in the last
    C{refreshInterval} seconds may still be accepted from the snapshot.
    """

    def __init__(self, directory, reactor, trustedNetworks=(), refreshInterval=1.0, postmaster=None):
        self._directory = directory
        self.postmaster = normaliseAddress(postmaster) if postmaster else None
        self._reactor = reactor
        self.trustedNetworks = [ipaddress.ip_network(n, strict=False) for n in trustedNetworks]
        self.refreshInterval = refreshInterval
        self._snapshot = None
        self._checked = float("-inf")
        self._refreshing = None

    def isTrusted(self, clientAddress: str) -> bool:
        try:
            ip = ipaddress.ip_address(clientAddress.split("%")[0])
        except ValueError:
            return False
        return any(ip in net for net in self.trustedNetworks)

    def _inThread(self, f, *args):
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def _freshSnapshot(self):
        """The snapshot if it is recent enough, else None (and a refresh starts)."""
        now = self._reactor.seconds()
        if self._snapshot is not None and now - self._checked < self.refreshInterval:
            return self._snapshot
        if self._refreshing is None:
            self._refreshing = self._inThread(self._reload)
            self._refreshing.addCallback(self._reloaded, now)
        return None

    def _reload(self):
        current = self._snapshot
        if current is not None and self._directory.dataVersion() == current.version:
            return current
        return self._directory.snapshot()

    def _reloaded(self, snapshot, when):
        self._snapshot = snapshot
        self._checked = when
        self._refreshing = None
        return snapshot

    def isLocalDomain(self, domain):
        return self._inThread(self._directory.hasDomain, domain)

    def route(self, request):
        trusted = request.trusted or self.isTrusted(request.clientAddress)
        args = (request.address, request.authenticated, trusted)
        snapshot = self._freshSnapshot()
        if snapshot is not None:
            route = self._route(*args, source=snapshot)
            if route.accepted:
                return route
        # No snapshot yet, or a rejection: ask the directory itself.
        return self._inThread(self._route, *args)

    def _route(self, address, authenticated, trusted, source=None):
        source = source if source is not None else self._directory
        if address.count("@") != 1:
            if address.lower() == "postmaster":
                return self._routePostmaster(source)
            if "@" not in address:
                return Route.reject(550, "5.1.3", "Recipient address must be user@domain")
            # "user@other"@ours after unquoting, or user@other@ours: never relayed.
            local, _, domain = address.rpartition("@")
            if self._isLocal(domain, source):
                return Route.reject(550, "5.1.1", "No such user here")
            return Route.reject(550, "5.7.1", "Relay access denied")
        local, _, domain = address.partition("@")
        if domain.startswith("["):
            # An address literal: ours only if it is one of our addresses, which we
            # do not claim; relaying rules apply.
            if authenticated or trusted:
                return Route.deliver(RemoteDestination(address))
            return Route.reject(550, "5.7.1", "Relay access denied")
        if self._isLocal(domain, source):
            dests = self._expand(address, 0, source)
            if dests is None and local.lower() == "postmaster" and self.postmaster:
                dests = self._expand(self.postmaster, 0, source)
            if dests is None:
                return Route.reject(550, "5.1.1", "No such user here")
            return Route.deliver(*dests)
        if authenticated or trusted:
            return Route.deliver(RemoteDestination(address))
        return Route.reject(550, "5.7.1", "Relay access denied")

    def _routePostmaster(self, source):
        """C{RCPT TO:<Postmaster>}: the server's postmaster (RFC 5321 §4.5.1)."""
        if self.postmaster:
            dests = self._expand(self.postmaster, 0, source)
        else:
            dests = None
            for domain in sorted(self._domains(source)):
                dests = self._expand(f"postmaster@{domain}", 0, source)
                if dests:
                    break
        if dests:
            return Route.deliver(*dests)
        return Route.reject(550, "5.1.1", "No postmaster mailbox here")

    @staticmethod
    def _domains(source):
        domains = getattr(source, "domains", None)
        return domains if domains is not None else source.listDomains()

    def _isLocal(self, domain, source):
        try:
            return source.hasDomain(normaliseDomain(domain))
        except DirectoryError:
            return False

    def _expand(self, address, depth, source):
        try:
            canon = normaliseAddress(address)
        except DirectoryError:
            return None
        local, domain = canon.split("@")
        if not self._isLocal(domain, source):
            return [RemoteDestination(address)]
        candidates = [canon]
        if "+" in local:
            candidates.append(f"{local.split('+', 1)[0]}@{domain}")
        for candidate in candidates:
            if source.hasUser(candidate):
                return [LocalDestination(candidate)]
            targets = source.aliasTargets(candidate)
            if targets:
                if depth >= MAX_ALIAS_DEPTH:
                    return None
                out = []
                for t in targets:
                    expanded = self._expand(t, depth + 1, source)
                    if expanded:
                        for d in expanded:
                            if d not in out:
                                out.append(d)
                return out or None
        return None


@implementer(IPlugin, IRouterFactory)
class DirectoryRouterFactory:
    name = "directory"
    description = "Domains, users and aliases from the embedded directory; relaying only when authenticated or trusted."

    def build(self, args, context):
        unknown = set(args) - {"trusted_networks", "postmaster"}
        if unknown:
            raise ValueError(
                f"unknown argument(s) for router 'directory': {', '.join(sorted(unknown))}; known: postmaster, trusted_networks"
            )
        nets = args.get("trusted_networks", [])
        postmaster = args.get("postmaster") or None
        if postmaster is not None:
            try:
                postmaster = normaliseAddress(str(postmaster))
            except DirectoryError as e:
                raise ValueError(f"router 'directory': bad postmaster address: {e}")
        try:
            router = DirectoryRouter(context.directory, context.reactor, nets, postmaster=postmaster)
        except ValueError as e:
            raise ValueError(f"router 'directory': bad trusted_networks entry: {e}")
        if postmaster is None:
            try:
                missing = [d for d in context.directory.listDomains()
                           if not router._expand(f"postmaster@{d}", 0, context.directory)]
            except Exception:
                missing = []
            if missing:
                _log.warn(
                    "no postmaster for {domains}: mail to postmaster@ those domains is refused; RFC 5321 §4.5.1 wants"
                    " it accepted (add a user or alias postmaster@..., or set the router's postmaster argument)",
                    domains=", ".join(missing),
                )
        return router
