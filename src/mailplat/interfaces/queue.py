"""
The queue extension point: L{IQueue}.

Every accepted message goes through the queue: the SMTP server writes it
into a L{IQueueTransaction} and answers 250 only when C{commit} has fired,
which MUST mean the content and the envelope are on stable storage.  The
queue runner then takes entries (L{IQueue.due}), processes and delivers
them, and records per-recipient results (L{IQueue.settle}).  An entry whose
recipients are all settled is removed.  After a crash, every committed entry
that was not removed is due again: delivery is at-least-once, and stores
make it exactly-once with the C{deliveryId} (see L{IMessageStore.append}).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zope.interface import Attribute, Interface


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope of one message."""

    sender: str
    recipients: tuple
    mailParams: dict = field(default_factory=dict, compare=False)
    rcptParams: tuple = ()
    clientAddress: str = ""
    clientName: str = ""
    authenticatedUser: str = ""
    protocol: str = "ESMTP"
    routes: tuple = ()


@dataclass(frozen=True)
class QueueEntry:
    """
    One queued message as the runner sees it.  Its content is C{content} when
    the queue keeps it inline (small messages), otherwise the file at C{path}
    (then C{content} is C{None}).
    """

    queueId: str
    envelope: Envelope
    path: str
    size: int
    arrival: float
    attempts: int = 0
    pending: tuple = ()
    content: bytes | None = field(default=None, repr=False, compare=False)
    #: Destinations (L{mailplat.queue.runner.destinationKey}) already delivered in
    #: an earlier attempt: never delivered again.
    done: tuple = ()
    #: Recipients already sent a delay notice.
    warned: tuple = ()


class IQueueTransaction(Interface):
    def write(data):
        """Append C{bytes} to the message content (synchronous, buffered)."""

    def commit():
        """
        Make the message durable.  Fires with the queue ID once content and
        envelope are on stable storage; fails with
        L{mailplat.interfaces.storage.TemporaryStoreFailure} otherwise.
        """

    def abort():
        """Throw the message away (synchronous)."""


class IQueue(Interface):
    def open():
        """Prepare the queue; fires when ready."""

    def close():
        """Finish outstanding writes; fires when done."""

    def begin(envelope):
        """Start a new message; returns an L{IQueueTransaction}."""

    def due(now, limit=100):
        """Fires with up to C{limit} L{QueueEntry}s due at C{now} (seconds)."""

    def settle(queueId, delivered, failed, deferred, retryAt=None, done=(), warned=()):
        """
        Record the outcome for recipients (each a sequence of addresses; failed and
        deferred as C{(address, reason)} pairs).  When nothing is left pending
        the entry is removed.  Deferred recipients become due at C{retryAt}.
        C{done} lists destination keys delivered in this attempt (skipped in
        later attempts); C{warned} lists recipients just sent a delay notice.
        Settling need not be durable when it fires: repeating an attempt after
        a crash is harmless.
        """

    def listEntries():
        """Fires with every L{QueueEntry} (for the admin command)."""


class IQueueFactory(Interface):
    name = Attribute("The plugin name used in configuration.")
    description = Attribute("One line shown by C{mailplat plugins}.")

    def build(args, context):
        """Return an L{IQueue}."""
