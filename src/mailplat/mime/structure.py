"""
Message analysis done once at delivery and cached by the store.

L{analyze} takes the raw bytes of a message and returns a JSON-serialisable
dict describing it; stores keep it (C{MessageMeta.structure}) so that IMAP
ENVELOPE, BODYSTRUCTURE, BODY[section] offsets and header searches never
re-parse the message.
"""

from __future__ import annotations

STRUCTURE_VERSION = 1


def analyze(raw: bytes) -> dict:
    raise NotImplementedError
