"""
The extension points of mailplat, and nothing else.

Each module holds the interfaces of one concept with their written contract:

  - L{storage}: L{IMessageStore} (accounts, mailboxes, messages)
  - L{auth}: L{IMailAccount}, checker factories, SASL mechanisms
  - L{routing}: L{IRouter}
  - L{hooks}: pre-queue L{ISMTPHook}s
  - L{processing}: post-queue L{IMessageProcessor}s
  - L{conversion}: L{IConverter}
  - L{queue}: L{IQueue}

Every C{I...Factory} is what a Twisted plugin provides (together with
L{twisted.plugin.IPlugin}) so that configuration can name it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PluginContext:
    """
    What a plugin factory's C{build(args, context)} is given besides its
    arguments: where data lives, the reactor, and the parts already built
    (the store is built first, then the checkers, router, hooks, processors).
    """

    dataDir: str
    reactor: Any
    hostname: str = "localhost"
    store: Any = None
    directory: Any = None
    extra: dict = field(default_factory=dict)
