"""
Connection limits in front of every listener: at most C{perPeer}
connections from one client address and C{total} in all.  A client over
the limit is told so in its own protocol (SMTP C{421 4.7.0}, IMAP
C{* BYE}, POP3 C{-ERR [SYS/TEMP]}) and disconnected; the connections
already open are untouched.  Configured by C{[limits]}.
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from mailplat.log import Logger

_log = Logger()

REFUSALS = {
    "smtp": b"421 4.7.0 Too many connections, try again later\r\n",
    "imap": b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
    "pop3": b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",
    "http": b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
}


class _Refuse(Protocol):
    def __init__(self, message):
        self.message = message

    def connectionMade(self):
        self.transport.write(self.message)
        self.transport.loseConnection()


class _Counted(ProtocolWrapper):
    def connectionLost(self, reason):
        self.factory.released(self)
        ProtocolWrapper.connectionLost(self, reason)


class ConnectionCounter:
    """Open connections, from each client address and in all, against the two limits."""

    def __init__(self, kind, perPeer, total, metrics=None):
        self.kind = kind
        self.perPeer = perPeer
        self.total = total
        self.metrics = metrics
        self.byPeer: dict[str, int] = {}
        self.count = 0

    def admit(self, host: str) -> bool:
        """Count a new connection from C{host}, or (over a limit: logged and counted) refuse it."""
        if self.count >= self.total or self.byPeer.get(host, 0) >= self.perPeer:
            _log.info("{kind}: refused a connection from {host}: too many connections ({n} from it, {total} in all)",
                      kind=self.kind, host=host, n=self.byPeer.get(host, 0), total=self.count)
            if self.metrics is not None:
                self.metrics.inc("mailplat_connections_refused_total", protocol=self.kind)
            return False
        self.count += 1
        self.byPeer[host] = self.byPeer.get(host, 0) + 1
        return True

    def release(self, host: str) -> None:
        """A connection admitted from C{host} has closed."""
        self.count -= 1
        n = self.byPeer.get(host, 0) - 1
        if n > 0:
            self.byPeer[host] = n
        else:
            self.byPeer.pop(host, None)


class LimitedFactory(WrappingFactory):
    protocol = _Counted

    def __init__(self, wrappedFactory, kind, perPeer, total, metrics=None):
        WrappingFactory.__init__(self, wrappedFactory)
        self.kind = kind
        self.counter = ConnectionCounter(kind, perPeer, total, metrics)

    @property
    def count(self):
        return self.counter.count

    @property
    def byPeer(self):
        return self.counter.byPeer

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "")
        if not self.counter.admit(host):
            return _Refuse(REFUSALS.get(self.kind, b""))
        protocol = WrappingFactory.buildProtocol(self, addr)
        if protocol is None:
            self.counter.release(host)
        else:
            protocol._peer = host
        return protocol

    def released(self, protocol):
        host = getattr(protocol, "_peer", None)
        if host is None:
            return
        protocol._peer = None
        self.counter.release(host)
