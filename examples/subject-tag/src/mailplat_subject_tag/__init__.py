"""
A message processor that prefixes the Subject with a tag.

It implements L{mailplat.interfaces.processing.IMessageProcessor}: C{matches}
selects the local destinations it applies to, C{process} rewrites the
Subject header of the message (or adds one) and leaves the body alone.
"""

import re

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailplat.interfaces.processing import IMessageProcessor, IMessageProcessorFactory
from mailplat.interfaces.routing import LocalDestination

_SUBJECT = re.compile(rb"^Subject:[ \t]?", re.IGNORECASE | re.MULTILINE)


def tagSubject(message: bytes, tag: bytes) -> bytes:
    """Return C{message} with C{tag} in front of its Subject (only in the header)."""
    end = message.find(b"\r\n\r\n")
    header, body = (message, b"") if end < 0 else (message[: end + 2], message[end + 2:])
    m = _SUBJECT.search(header)
    if m is None:
        return header + b"Subject: " + tag + b"\r\n" + body
    rest = header[m.end():]
    if rest.startswith(tag):
        return message
    return header[: m.end()] + tag + b" " + rest + body


@implementer(IMessageProcessor)
class SubjectTagger:
    name = "subject-tag"
    errorPolicy = "skip"

    def __init__(self, tag, domains=()):
        self.tag = tag.encode("utf-8")
        self.domains = {d.lower() for d in domains}

    def matches(self, item):
        return tuple(
            d for d in item.destinations
            if isinstance(d, LocalDestination) and (not self.domains or d.user.rpartition("@")[2] in self.domains)
        )

    def process(self, item):
        item.content = tagSubject(item.content, self.tag)


@implementer(IPlugin, IMessageProcessorFactory)
class SubjectTaggerFactory:
    name = "subject-tag"
    description = "Put a tag in front of the Subject of local mail (args: tag, domains)."

    def build(self, args, context):
        unknown = set(args) - {"tag", "domains"}
        if unknown:
            raise ValueError(f"unknown argument(s): {', '.join(sorted(unknown))}; known: tag, domains")
        tag = args.get("tag")
        if not isinstance(tag, str) or not tag:
            raise ValueError("args.tag must be a non-empty string")
        domains = args.get("domains", [])
        if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
            raise ValueError("args.domains must be a list of domain names")
        return SubjectTagger(tag, domains)
