"""
Writing replies without a round through the reactor.

C{transport.write} only queues: the bytes go out on the reactor's next
turn, after it has asked the kernel to watch the socket for writability
and before it asks it to stop (two C{epoll_ctl} calls and a poll per
reply).  A request/response protocol writes one reply and then waits,
so on a plain TCP connection with nothing queued L{writeNow} sends the
reply at once and queues only what the kernel did not take.  Anything
else (TLS, a non-TCP transport, bytes still queued, a closing
connection) goes through C{transport.write} as usual, so the order of
the bytes never changes.

Replies sent at once may leave in several small segments (an untagged
IMAP response, then the tagged one).  With Nagle's algorithm on, the
second would wait for the client's delayed ACK (40 ms on Linux), so
L{writeNow} turns it off (C{TCP_NODELAY}) on a connection it sends on.
"""

from __future__ import annotations

from twisted.internet import tcp
from twisted.protocols.policies import ProtocolWrapper


def _socketTransport(transport):
    # Through wrappers that pass writes on unchanged (the connection
    # limits' wrapper), never through one that changes them (TLS).
    while isinstance(transport, ProtocolWrapper) and type(transport).write is ProtocolWrapper.write:
        transport = transport.transport
    return transport if isinstance(transport, tcp.Connection) else None


def writeNow(transport, data: bytes) -> None:
    """Write C{data} to C{transport}, sending it now when that keeps the order."""
    t = _socketTransport(transport)
    if (t is None or t.TLS or not t.connected or t.disconnecting or t._writeDisconnected
            or t.dataBuffer or t._tempDataBuffer):
        transport.write(data)
        return
    if not t.__dict__.get("_mailplatNoDelay"):
        t._mailplatNoDelay = True
        try:
            t.setTcpNoDelay(True)
        except OSError:
            pass
    sent = t.writeSomeData(data)
    if not isinstance(sent, int) or sent < 0:
        transport.write(data)  # the reactor sees the error on its own turn
    elif sent < len(data):
        t.write(data[sent:])


def unsent(transport) -> int:
    """Bytes written to C{transport} (through any wrappers, TLS included) that the kernel has not taken yet."""
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    if isinstance(transport, tcp.Connection):
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    return 0


#: Replies a session may have waiting unsent before it stops taking commands.
WRITE_BACKLOG = 1024 * 1024


class WriteGate:
    """
    Back-pressure for replies: a client that pipelines commands and never
    reads the replies would have them pile up in memory without bound.
    While more than C{high} bytes wait unsent, L{blocked} says so and the
    connection's reading is paused; once fewer than C{low} wait (looked at
    every C{interval} seconds on C{clock}) C{resume()} is called: the
    session resumes reading (unless it paused it for its own reasons) and
    goes on with its commands.
    """

    def __init__(self, clock, resume, closed, high=None, interval=0.05):
        self._clock, self._resume, self._closed = clock, resume, closed
        self.high = WRITE_BACKLOG if high is None else high
        self.low, self.interval = self.high // 4, interval
        self.waiting = False
        self._call = None

    def blocked(self, transport) -> bool:
        if self.waiting:
            return True
        if unsent(transport) <= self.high:
            return False
        self.waiting = True
        transport.pauseProducing()
        self._call = self._clock.callLater(self.interval, self._check, transport)
        return True

    def _check(self, transport):
        self._call = None
        if self._closed():
            self.waiting = False
            return
        if unsent(transport) > self.low:
            self._call = self._clock.callLater(self.interval, self._check, transport)
            return
        self.waiting = False
        self._resume()

    def stop(self):
        """The connection is gone: look no more."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.waiting = False


class IdleTimer:
    """
    The idle timeout of one session: C{expired()} is called once C{timeout}
    seconds pass on C{clock} (the injected reactor) without a L{touch}.  A
    timeout of 0 or None never expires.  What expiry means (a reply, an
    exception for a command still running) is the session's business.
    """

    __slots__ = ("_clock", "_timeout", "_expired", "_call")

    def __init__(self, clock, timeout, expired):
        self._clock = clock
        self._timeout = timeout
        self._expired = expired
        self._call = None

    def touch(self) -> None:
        """Start, or start again, the countdown."""
        if not self._timeout:
            return
        call = self._call
        if call is not None and call.active():
            call.reset(self._timeout)
        else:
            self._call = self._clock.callLater(self._timeout, self._fire)

    def cancel(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _fire(self):
        self._call = None
        self._expired()
