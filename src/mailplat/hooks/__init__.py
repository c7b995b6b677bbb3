"""
The built-in pre-queue SMTP hooks (L{mailplat.interfaces.hooks.ISMTPHook}),
each a named plugin, none active unless the config lists it::

    [[hooks]]
    plugin = "limits"
    args = { max_connections_per_ip = 10 }

  - C{limits} (L{mailplat.hooks.limits}): concurrent connections and
    connection and message rates per client address.
  - C{dnsbl} (L{mailplat.hooks.dnsbl}): DNS block lists through
    C{twisted.names}.
  - C{verify} (L{mailplat.hooks.verify}): recipient verification against
    the store (no accept-then-bounce) and sender verification through the
    router.
  - C{greylist} (L{mailplat.hooks.greylist}): RFC 6647 greylisting.

Every factory refuses unknown or badly typed arguments with a
C{ValueError} naming the argument, which stops start-up.
"""

from __future__ import annotations

import ipaddress

__all__ = ["Args", "clientKey", "networks"]


class Args:
    """Checked access to a hook's C{args} table; every problem is a C{ValueError}."""

    def __init__(self, plugin: str, args: dict, known):
        self.plugin = plugin
        self.args = dict(args)
        unknown = set(self.args) - set(known)
        if unknown:
            raise ValueError(
                f"unknown argument(s) for hook {plugin!r}: {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )

    def _bad(self, key, what):
        return ValueError(f"hook {self.plugin!r}: {key} must be {what} (got {self.args[key]!r})")

    def integer(self, key, default, minimum=0):
        if key not in self.args:
            return default
        v = self.args[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise self._bad(key, f"an integer of at least {minimum}")
        return v

    def number(self, key, default, minimum=0.0):
        if key not in self.args:
            return default
        v = self.args[key]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < minimum:
            raise self._bad(key, f"a number of at least {minimum}")
        return float(v)

    def boolean(self, key, default):
        if key not in self.args:
            return default
        v = self.args[key]
        if not isinstance(v, bool):
            raise self._bad(key, "true or false")
        return v

    def string(self, key, default):
        if key not in self.args:
            return default
        v = self.args[key]
        if not isinstance(v, str) or not v:
            raise self._bad(key, "a non-empty string")
        return v

    def strings(self, key, default=()):
        if key not in self.args:
            return tuple(default)
        v = self.args[key]
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise self._bad(key, "a list of strings")
        return tuple(v)

    def networks(self, key):
        try:
            return networks(self.strings(key))
        except ValueError as e:
            raise ValueError(f"hook {self.plugin!r}: {key}: {e}")


def networks(texts):
    """C{ip_network}s from strings such as C{"192.0.2.0/24"} or C{"::1"}."""
    return tuple(ipaddress.ip_network(t, strict=False) for t in texts)


def parseAddress(text: str):
    try:
        return ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None


def inNetworks(address: str, nets) -> bool:
    ip = parseAddress(address)
    if ip is None:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in nets)


def clientKey(address: str, ipv6Prefix: int = 64) -> str:
    """
    The unit a per-client limit counts: the IPv4 address, or the IPv6
    C{/64} (one host usually has a whole /64 to hop around in).
    """
    ip = parseAddress(address)
    if ip is None:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{ipv6Prefix}", strict=False))
    return str(ip)


def passThrough(f):
    """Mark a stage method that always answers CONTINUE (the server skips it)."""
    f.passThrough = True
    return f


class PassThroughHook:
    """
    A base for hooks: every L{ISMTPHook} stage answers C{CONTINUE}, so
    C{verifyObject} is satisfied and a hook overrides only its stages.  The
    SMTP server does not call (nor buffer the message for) a stage left as
    it is here.
    """

    name = "pass-through"

    @passThrough
    def connect(self, context):
        return None

    @passThrough
    def helo(self, context, name):
        return None

    @passThrough
    def auth(self, context, username, success):
        return None

    @passThrough
    def mail(self, context, sender, params):
        return None

    @passThrough
    def rcpt(self, context, recipient, params, route):
        return None

    @passThrough
    def data(self, context, message):
        return None
