"""
Post-queue message processors: L{IMessageProcessor}.

After a message is safely queued (the client has its 250), the queue runner
passes it through the processors the config lists, in order, and then
delivers it to the destinations left.  A processor sees a L{ProcessingItem}
and may:
  - leave it alone (return C{None});
  - change its content (assign C{item.content});
  - change its destinations (assign C{item.destinations}: split it, redirect
    it, or drop recipients);
  - drop it entirely (assign an empty tuple to C{item.destinations}).

A processor's C{matches} decides which destinations it applies to (a subset);
the item a processor sees holds only those, and what it returns for them
replaces them.  C{errorPolicy} says what happens when C{process} fails:
C{"retry"} (the default: the message stays queued and is tried again later),
C{"skip"} (log and go on as if the processor had not been there) or
C{"bounce"} (the affected recipients fail permanently).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zope.interface import Attribute, Interface


@dataclass
class ProcessingItem:
    """A message on its way from the queue to its destinations."""

    queueId: str
    sender: str
    content: bytes
    destinations: tuple
    clientAddress: str = ""
    authenticatedUser: str = ""
    headersAdded: list = field(default_factory=list)


class IMessageProcessor(Interface):
    name = Attribute("A short name used in logs.")
    errorPolicy = Attribute('"retry", "skip" or "bounce".')

    def matches(item):
        """Return the subset of C{item.destinations} this processor applies to."""

    def process(item):
        """Process C{item} (see the module docstring); may return a Deferred."""


class IMessageProcessorFactory(Interface):
    name = Attribute("The plugin name used in configuration.")
    description = Attribute("One line shown by C{mailplat plugins}.")

    def build(args, context):
        """Return an L{IMessageProcessor}."""
