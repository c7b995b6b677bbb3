"""
Content conversion: the registry of L{IConverter}s and the built-in ones.

L{Registry} keeps converters by (source type, target type); the first one
registered for a pair wins, so converters named in the config (registered
first by the platform) take precedence over the built-in ones.

Built in (plugin C{text}): C{text/plain} to C{text/html} (escaped, line
breaks kept) and C{text/html} to C{text/plain} (markup dropped, block
elements as line breaks, scripts and styles removed, entities decoded), both
in UTF-8 with any declared charset decoded first.
"""

from __future__ import annotations

import html
from html.parser import HTMLParser

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailplat.interfaces.conversion import IConverter, IConverterFactory


def _decode(data: bytes, parameters: dict) -> str:
    charset = (parameters or {}).get("charset", "utf-8") or "utf-8"
    try:
        return data.decode(charset, "replace")
    except LookupError:
        raise ValueError(f"unknown charset {charset!r}")


@implementer(IConverter)
class PlainToHTML:
    sourceType = "text/plain"
    targetType = "text/html"

    def convert(self, data, parameters):
        text = _decode(data, parameters)
        body = html.escape(text).replace("\r\n", "\n").replace("\n", "<br>\n")
        out = f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head><body><div style="white-space: pre-wrap">{body}</div></body></html>\n'
        return out.encode("utf-8"), {"charset": "utf-8"}


class _TextExtractor(HTMLParser):
    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table", "hr"}
    SKIP = {"script", "style", "head", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts = []
        self._skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skipping += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self._skipping:
            self.parts.append(data)


@implementer(IConverter)
class HTMLToPlain:
    sourceType = "text/html"
    targetType = "text/plain"

    def convert(self, data, parameters):
        parser = _TextExtractor()
        parser.feed(_decode(data, parameters))
        parser.close()
        lines = [" ".join(line.split()) for line in "".join(parser.parts).split("\n")]
        text, blank = [], False
        for line in lines:
            if not line:
                if text and not blank:
                    text.append("")
                blank = True
                continue
            text.append(line)
            blank = False
        return ("\r\n".join(text).strip() + "\r\n").encode("utf-8"), {"charset": "utf-8"}


class Registry:
    def __init__(self, converters=()):
        self._byPair: dict[tuple, IConverter] = {}
        for c in converters:
            self.register(c)

    def register(self, converter):
        key = (converter.sourceType.lower(), converter.targetType.lower())
        self._byPair.setdefault(key, converter)

    def pairs(self):
        return sorted(self._byPair)

    def find(self, sourceType, targetType):
        return self._byPair.get((sourceType.lower(), targetType.lower()))

    def convert(self, data, sourceType, targetType, parameters=None):
        converter = self.find(sourceType, targetType)
        if converter is None:
            raise LookupError(f"no converter from {sourceType} to {targetType}")
        return converter.convert(data, dict(parameters or {}))


@implementer(IPlugin, IConverterFactory)
class TextConvertersFactory:
    name = "text"
    description = "text/plain to text/html and text/html to text/plain."

    def build(self, args, context):
        if args:
            raise ValueError(f"converter 'text' takes no arguments (got: {', '.join(sorted(args))})")
        return [PlainToHTML(), HTMLToPlain()]
