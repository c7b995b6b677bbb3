"""
The C{greylist} hook (RFC 6647): the first attempt of an unknown
(client network, sender, recipient) triplet is answered C{451 4.7.1} at
RCPT; a retry after C{delay} seconds and within C{retry_window} seconds of
the first attempt passes, and the triplet then passes at once for
C{lifetime} seconds after its last use.  Real MTAs retry; most spam
engines do not.

Off unless configured.  Arguments: C{delay} (default 300), C{retry_window}
(default 172800, two days), C{lifetime} (default 3110400, 36 days),
C{ipv4_prefix} (default 24: a sender's pool of outgoing servers usually
shares a /24), C{ipv6_prefix} (default 64), C{exempt} (networks never
greylisted), C{max_entries} (default 200000; the oldest are forgotten
first).  Authenticated clients are never greylisted.

The triplets live in memory and are saved to C{DATA/greylist.json}
(written to a temporary file and renamed, in a thread) at most every
C{save_interval} seconds (default 60) when they changed, and loaded at
start: a restart forgets at most the last interval's triplets, which costs
those senders one more delay, never a message.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import os


from mailplat.log import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailplat.hooks import Args, PassThroughHook, inNetworks, parseAddress
from mailplat.interfaces.hooks import Decision, ISMTPHook, ISMTPHookFactory

_log = Logger()


@implementer(ISMTPHook)
class GreylistHook(PassThroughHook):
    name = "greylist"

    def __init__(self, reactor, delay=300.0, retryWindow=172800.0, lifetime=3110400.0, ipv4Prefix=24,
                 ipv6Prefix=64, exempt=(), maxEntries=200000, path=None, saveInterval=60.0):
        self._reactor = reactor
        self.path = path
        self._dirty = False
        self._saving = None
        self.delay = delay
        self.retryWindow = retryWindow
        self.lifetime = lifetime
        self.ipv4Prefix = ipv4Prefix
        self.ipv6Prefix = ipv6Prefix
        self.exempt = tuple(exempt)
        self.maxEntries = maxEntries
        # triplet -> [first seen, passed (bool), last seen]; oldest first.
        self._entries = collections.OrderedDict()
        if path is not None:
            self._load()
            from twisted.internet import task

            self._saver = task.LoopingCall(self.save)
            self._saver.clock = reactor
            self._saver.start(saveInterval, now=False)

    def _load(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            for network, sender, recipient, first, passed, last in data.get("triplets", []):
                self._entries[(network, sender, recipient)] = [float(first), bool(passed), float(last)]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError) as e:
            _log.warn("greylist: could not read {path}, starting empty: {error}", path=self.path, error=str(e))

    def save(self):
        """Write the triplets (if they changed) in a thread; fires when written."""
        from twisted.internet import defer
        from twisted.internet.threads import deferToThreadPool

        if self.path is None or not self._dirty or self._saving is not None:
            return defer.succeed(None)
        self._dirty = False
        snapshot = [[*key, *entry] for key, entry in self._entries.items()]

        def write():
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "triplets": snapshot}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

        def done(result):
            self._saving = None
            return result

        def failed(f):
            self._dirty = True
            _log.warn("greylist: could not save {path}: {error}", path=self.path, error=f.getErrorMessage())

        if not hasattr(self._reactor, "getThreadPool"):
            # A clock without threads (tests): write right away.
            self._saving = defer.maybeDeferred(write)
        else:
            self._saving = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), write)
        return self._saving.addErrback(failed).addBoth(done)

    def _network(self, address):
        ip = parseAddress(address)
        if ip is None:
            return address
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        prefix = self.ipv4Prefix if ip.version == 4 else self.ipv6Prefix
        return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))

    def triplet(self, context, recipient):
        return (self._network(context.clientAddress), (context.sender or "").lower(), recipient.lower())

    def rcpt(self, context, recipient, params, route):
        if context.authenticatedUser or inNetworks(context.clientAddress, self.exempt):
            return Decision.proceed()
        now = self._reactor.seconds()
        key = self.triplet(context, recipient)
        entry = self._entries.get(key)
        if entry is not None:
            first, passed, last = entry
            if passed and now - last <= self.lifetime:
                entry[2] = now
                self._entries.move_to_end(key)
                self._dirty = True
                return Decision.proceed()
            if not passed and self.delay <= now - first <= self.retryWindow:
                entry[1], entry[2] = True, now
                self._dirty = True
                self._entries.move_to_end(key)
                _log.info("greylist: {triplet} passed after {s:.0f} s", triplet=key, s=now - first)
                return Decision.proceed()
            if not passed and now - first < self.delay:
                wait = int(self.delay - (now - first)) + 1
                return Decision.tempfail(f"Greylisted, try again in {wait} seconds", 451, "4.7.1")
        # New, expired, or retried too late: start again.
        self._dirty = True
        self._entries[key] = [now, False, now]
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxEntries:
            self._entries.popitem(last=False)
        _log.info("greylist: new triplet {triplet}", triplet=key)
        return Decision.tempfail(f"Greylisted, try again in {int(self.delay)} seconds", 451, "4.7.1")


@implementer(IPlugin, ISMTPHookFactory)
class GreylistHookFactory:
    name = "greylist"
    description = "RFC 6647 greylisting of unknown (network, sender, recipient) triplets (args: delay, ...)."

    def build(self, args, context):
        a = Args("greylist", args, {"delay", "retry_window", "lifetime", "ipv4_prefix", "ipv6_prefix", "exempt",
                                    "max_entries", "save_interval"})
        delay = a.number("delay", 300.0, 0.0)
        window = a.number("retry_window", 172800.0, 1.0)
        if window <= delay:
            raise ValueError("hook 'greylist': retry_window must be longer than delay")
        v4 = a.integer("ipv4_prefix", 24, 8)
        v6 = a.integer("ipv6_prefix", 64, 16)
        if v4 > 32 or v6 > 128:
            raise ValueError("hook 'greylist': ipv4_prefix is at most 32 and ipv6_prefix at most 128")
        return GreylistHook(
            context.reactor,
            delay=delay,
            retryWindow=window,
            lifetime=a.number("lifetime", 3110400.0, 1.0),
            ipv4Prefix=v4,
            ipv6Prefix=v6,
            exempt=a.networks("exempt"),
            maxEntries=a.integer("max_entries", 200000, 1),
            path=os.path.join(context.dataDir, "greylist.json"),
            saveInterval=a.number("save_interval", 60.0, 1.0),
        )
