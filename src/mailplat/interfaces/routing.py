"""
The routing extension point: L{IRouter}.

The SMTP server asks the router about every RCPT TO address, and the queue
runner asks again only if the routing data may have changed.  A router
answers with a L{Route}: the address is delivered to local mailboxes and/or
relayed to remote addresses, or it is rejected with a code and an enhanced
status (RFC 3463).  The router decides about relaying: an address in a
domain that is not ours is relayed only when C{authenticated} is true or the
client is in a trusted network; otherwise the router answers with
L{Route.reject} C{550 5.7.1}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zope.interface import Attribute, Interface


@dataclass(frozen=True)
class LocalDestination:
    """Deliver to C{mailbox} of account C{user}."""

    user: str
    mailbox: str = "INBOX"


@dataclass(frozen=True)
class RemoteDestination:
    """Relay to C{address} through the outbound queue."""

    address: str


@dataclass(frozen=True)
class Route:
    """The answer of a router for one address."""

    destinations: tuple = ()
    code: int = 250
    enhanced: str = "2.1.5"
    text: str = "OK"

    @property
    def accepted(self) -> bool:
        return self.code < 400

    @classmethod
    def deliver(cls, *destinations) -> "Route":
        return cls(destinations=tuple(destinations))

    @classmethod
    def reject(cls, code: int, enhanced: str, text: str) -> "Route":
        if code < 400:
            raise ValueError("a rejection needs a 4xx or 5xx code")
        return cls(destinations=(), code=code, enhanced=enhanced, text=text)


@dataclass(frozen=True)
class RoutingRequest:
    """What a router is told about one recipient."""

    address: str
    authenticated: bool = False
    trusted: bool = False
    sender: str = ""
    clientAddress: str = ""
    extra: dict = field(default_factory=dict, compare=False)


class IRouter(Interface):
    """
    Decides where mail for an address goes.  C{route} may be called
    concurrently for many addresses; it must not block the reactor.
    """

    def route(request):
        """
        Given a L{RoutingRequest}, return a L{Route} or a Deferred firing with one.
        Addresses are compared case-insensitively in the domain part; the local
        part is the router's business (the built-in router folds case and
        understands C{user+detail} sub-addressing).
        """

    def isLocalDomain(domain):
        """Return (or fire with) whether C{domain} is one this router serves."""


class IRouterFactory(Interface):
    name = Attribute("The plugin name used in configuration, e.g. C{'directory'}.")
    description = Attribute("One line shown by C{mailplat plugins}.")

    def build(args, context):
        """Return an L{IRouter}."""
