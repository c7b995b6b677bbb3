"""
Direct delivery: a message for one local mailbox goes straight into the
store at the end of DATA, without a queue entry.

The SMTP server sees an L{IQueue} whose transactions also feed a real queue
transaction.  At commit, a message that needs nothing the queue runner does
beyond storing it -- one recipient with one local destination, no message
processors configured, no success notice asked for (DSN C{NOTIFY=SUCCESS}),
not looping, small enough to be kept inside the store's index -- is
appended to its mailbox (a durable write, as a queue entry would be), and
the queue transaction is dropped.  Anything else, and any failure of that
append (no such mailbox, over quota, the store unavailable), commits the
queue transaction instead, and the queue runner takes it from there as for
any message: retries, bounces, notices.

Either way the client's 250 comes only once the message is on disk, and it
is stored once: the queue runner never sees a message delivered here.
Saved per message: the queue entry's insert and its settlement (two
transactions) and the runner's work.
"""

from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from mailplat.interfaces.queue import IQueueTransaction
from mailplat.interfaces.routing import LocalDestination
from mailplat.outbound import dsn
from mailplat.queue.runner import hops, returnPath
from mailplat.queue.sqlite import newQueueId


@implementer(IQueueTransaction)
class _Transaction:
    def __init__(self, front, envelope, txn):
        self._front = front
        self._envelope = envelope
        self._txn = txn
        self._chunks = []
        self._size = 0

    def write(self, data):
        self._txn.write(data)
        if self._chunks is not None:
            self._size += len(data)
            if self._size > self._front.maxSize:
                self._chunks = None
            else:
                self._chunks.append(bytes(data))

    def abort(self):
        self._chunks = None
        return self._txn.abort()

    def commit(self):
        destination = self._front.destination(self._envelope)
        if destination is None or self._chunks is None:
            return defer.maybeDeferred(self._txn.commit)
        # Final delivery: the Return-Path field first (RFC 5321 §4.4).
        content = b"".join([returnPath(self._envelope.sender)] + self._chunks)
        self._chunks = None
        if hops(content) > self._front.maxHops:
            return defer.maybeDeferred(self._txn.commit)
        queueId = newQueueId()
        # No delivery ID: this queue ID is new and is never delivered again
        # (if this append fails, the queue transaction commits under its own).
        d = defer.maybeDeferred(self._front.store.append, destination.user, destination.mailbox, content)

        def stored(_):
            self._txn.abort()
            if self._front.metrics is not None:
                self._front.metrics.inc("mailplat_messages_delivered_total")
            return queueId

        def queueInstead(_):
            # The queue runner handles every case (another mailbox, bounces, retries).
            return self._txn.commit()

        return d.addCallbacks(stored, queueInstead)


class DirectDelivery:
    """
    The queue as the SMTP server sees it, with direct delivery in front:
    C{begin} is the only method it offers (all the SMTP server uses).
    """

    def __init__(self, queue, store, metrics=None, maxSize=128 * 1024, maxHops=50):
        self.queue = queue
        self.store = store
        self.metrics = metrics
        self.maxSize = maxSize
        self.maxHops = maxHops

    def begin(self, envelope):
        return _Transaction(self, envelope, self.queue.begin(envelope))

    @staticmethod
    def destination(envelope):
        """The one local destination of C{envelope} if it can be delivered directly, else None."""
        if len(envelope.recipients) != 1 or len(envelope.routes) != 1:
            return None
        destinations = envelope.routes[0].destinations
        if len(destinations) != 1 or not isinstance(destinations[0], LocalDestination):
            return None
        params = envelope.rcptParams[0] if envelope.rcptParams else {}
        if dsn.notifyWants(params.get("NOTIFY"), dsn.DELIVERED):
            return None
        return destinations[0]
