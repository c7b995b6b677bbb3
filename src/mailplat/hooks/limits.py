"""
The C{limits} hook: per-client connection and rate limits.

Counted per client address (IPv6 per C{/64}):

  - C{max_connections_per_ip} (default 20): concurrent connections; one
    more is answered C{421 4.7.0} at connect and closed.
  - C{connection_rate} (default 0, off): connections per C{window}
    seconds; more are answered C{421 4.7.0}.
  - C{message_rate} (default 0, off): MAIL commands per C{window}
    seconds; more are answered C{450 4.7.1} (the client may retry later).
    Authenticated clients are not counted unless
    C{count_authenticated = true}.
  - C{window} (default 60 seconds), C{exempt} (networks never limited,
    e.g. C{["127.0.0.0/8", "::1"]}; none by default), C{ipv6_prefix}
    (default 64).

State lives in memory (one process); time comes from the injected
reactor, so tests drive it with a C{task.Clock}.
"""

from __future__ import annotations

import collections


from mailplat.log import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailplat.hooks import Args, PassThroughHook, clientKey, inNetworks
from mailplat.interfaces.hooks import Decision, ISMTPHook, ISMTPHookFactory

_log = Logger()


class _Window:
    """Timestamps of events in a sliding window, per key."""

    def __init__(self, size):
        self.size = size
        self._events = {}

    def count(self, key, now):
        q = self._events.get(key)
        if q is None:
            return 0
        while q and q[0] <= now - self.size:
            q.popleft()
        if not q:
            del self._events[key]
            return 0
        return len(q)

    def add(self, key, now):
        self._events.setdefault(key, collections.deque()).append(now)

    def __len__(self):
        return len(self._events)


@implementer(ISMTPHook)
class LimitsHook(PassThroughHook):
    name = "limits"

    def __init__(self, reactor, maxConnectionsPerIP=20, connectionRate=0, messageRate=0, window=60.0,
                 exempt=(), ipv6Prefix=64, countAuthenticated=False):
        self._reactor = reactor
        self.maxConnectionsPerIP = maxConnectionsPerIP
        self.connectionRate = connectionRate
        self.messageRate = messageRate
        self.exempt = tuple(exempt)
        self.ipv6Prefix = ipv6Prefix
        self.countAuthenticated = countAuthenticated
        self._active = collections.Counter()
        self._sessions = {}  # sessionId -> key, for the connections counted
        self._connections = _Window(window)
        self._messages = _Window(window)

    def _key(self, context):
        if inNetworks(context.clientAddress, self.exempt):
            return None
        return clientKey(context.clientAddress, self.ipv6Prefix)

    def activeConnections(self, address) -> int:
        return self._active[clientKey(address, self.ipv6Prefix)]

    def connect(self, context):
        key = self._key(context)
        if key is None:
            return Decision.proceed()
        now = self._reactor.seconds()
        if self.maxConnectionsPerIP and self._active[key] >= self.maxConnectionsPerIP:
            _log.info("limits: {client} has {n} connections already", client=key, n=self._active[key])
            return Decision.disconnect("Too many connections from your address, try again later", 421, "4.7.0")
        if self.connectionRate:
            if self._connections.count(key, now) >= self.connectionRate:
                _log.info("limits: connection rate exceeded by {client}", client=key)
                return Decision.disconnect("Connection rate limit exceeded, try again later", 421, "4.7.0")
            self._connections.add(key, now)
        self._active[key] += 1
        self._sessions[context.sessionId] = key
        return Decision.proceed()

    def disconnect(self, context):
        key = self._sessions.pop(context.sessionId, None)
        if key is not None:
            self._active[key] -= 1
            if self._active[key] <= 0:
                del self._active[key]

    def mail(self, context, sender, params):
        if not self.messageRate or (context.authenticatedUser and not self.countAuthenticated):
            return Decision.proceed()
        key = self._key(context)
        if key is None:
            return Decision.proceed()
        now = self._reactor.seconds()
        if self._messages.count(key, now) >= self.messageRate:
            _log.info("limits: message rate exceeded by {client}", client=key)
            return Decision.tempfail("Message rate limit exceeded, try again later", 450, "4.7.1")
        self._messages.add(key, now)
        return Decision.proceed()


@implementer(IPlugin, ISMTPHookFactory)
class LimitsHookFactory:
    name = "limits"
    description = "Per-client concurrent connection, connection-rate and message-rate limits."

    def build(self, args, context):
        a = Args("limits", args, {"max_connections_per_ip", "connection_rate", "message_rate", "window",
                                  "exempt", "ipv6_prefix", "count_authenticated"})
        prefix = a.integer("ipv6_prefix", 64, 1)
        if prefix > 128:
            raise ValueError("hook 'limits': ipv6_prefix must be at most 128")
        return LimitsHook(
            context.reactor,
            maxConnectionsPerIP=a.integer("max_connections_per_ip", 20),
            connectionRate=a.integer("connection_rate", 0),
            messageRate=a.integer("message_rate", 0),
            window=a.number("window", 60.0, 1.0),
            exempt=a.networks("exempt"),
            ipv6Prefix=prefix,
            countAuthenticated=a.boolean("count_authenticated", False),
        )
