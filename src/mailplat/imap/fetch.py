"""
IMAP FETCH data items (RFC 3501 6.4.5 and 7.4.2), built from the cached
analysis of L{mailplat.mime.structure} and the raw message bytes.

  - L{formatEnvelope}, L{formatBodyStructure}: ENVELOPE, BODY and
    BODYSTRUCTURE (with extension data: md5, disposition, language,
    location; multipart parameters);
  - L{sectionBytes}: the octets of C{BODY[section]} sliced from the raw
    message with the cached offsets -- C{HEADER}, C{HEADER.FIELDS},
    C{HEADER.FIELDS.NOT}, C{TEXT}, C{MIME} and nested part numbers;
  - L{FetchPlan}: what a list of attributes needs (structure, content,
    setting C{\\Seen}) and L{FetchPlan.items} to build one message's items.

Deviations: a part number that does not exist, or C{HEADER}/C{TEXT} asked
of a part that is not C{message/rfc822}, gives an empty string (RFC 3501
leaves it to the server; several servers answer NIL, which some clients do
not expect for a literal).  Sender and Reply-To default to From in the
ENVELOPE, as RFC 3501 requires.
"""

from __future__ import annotations

from mailplat.imap import wire
from mailplat.mime.structure import STRUCTURE_VERSION, analyze, decodedBody, findPart

#: Content-transfer-encodings BINARY (RFC 3516) can undo.
KNOWN_ENCODINGS = ("7BIT", "8BIT", "BINARY", "BASE64", "QUOTED-PRINTABLE")


class UnknownCTE(Exception):
    """BINARY asked of a part whose content-transfer-encoding is unknown."""


def binaryBytes(raw: bytes, structure: dict, part: tuple):
    """
    The octets of C{BINARY[part]}: the part's body with its
    content-transfer-encoding undone (RFC 3516); the whole message for an
    empty part; C{None} if the part does not exist.
    """
    if not part:
        return raw
    node = findPart(structure, part)
    if node is None:
        return None
    if "parts" in node or ("body" in node and "envelope" in node):
        hs, bs, end = node["offsets"]
        return raw[bs:end]
    if node.get("encoding", "7BIT") not in KNOWN_ENCODINGS:
        raise UnknownCTE(node.get("encoding"))
    return decodedBody(raw, node)


def literal8(data: bytes) -> bytes:
    """A literal, or a literal8 (C{~{n}}) when the octets hold NUL (RFC 3516)."""
    if b"\x00" in data:
        return b"~{%d}\r\n" % len(data) + data
    return wire.literal(data)

_NIL = b"NIL"


#: Encoded ENVELOPE fields by value: addresses, names and dates repeat
#: across a mailbox, and a FETCH ENVELOPE of many messages encodes each one.
_nCache: dict = {}
_N_CACHE_SIZE = 20000


def _n(value) -> bytes:
    if value is None:
        return _NIL
    try:
        return _nCache[value]
    except KeyError:
        pass
    except TypeError:
        return wire.nstring(value)
    out = wire.nstring(value)
    if len(_nCache) >= _N_CACHE_SIZE:
        _nCache.clear()
    _nCache[value] = out
    return out


def _addresses(addrs) -> bytes:
    if not addrs:
        return _NIL
    return b"(" + b"".join(b"(" + b" ".join(_n(x) for x in a) + b")" for a in addrs) + b")"


def formatEnvelope(env: dict) -> bytes:
    fromAddr = env.get("from")
    sender = env.get("sender") or fromAddr
    replyTo = env.get("reply-to") or fromAddr
    return b"(" + b" ".join(
        [
            _n(env.get("date")),
            _n(env.get("subject")),
            _addresses(fromAddr),
            _addresses(sender),
            _addresses(replyTo),
            _addresses(env.get("to")),
            _addresses(env.get("cc")),
            _addresses(env.get("bcc")),
            _n(env.get("in-reply-to")),
            _n(env.get("message-id")),
        ]
    ) + b")"


def _params(params) -> bytes:
    if not params:
        return _NIL
    return b"(" + b" ".join(wire.string(n) + b" " + wire.string(v) for n, v in params) + b")"


def _disposition(disp) -> bytes:
    if not disp:
        return _NIL
    return b"(" + wire.string(disp[0].upper()) + b" " + _params(disp[1]) + b")"


def _language(lang) -> bytes:
    if not lang:
        return _NIL
    if len(lang) == 1:
        return wire.string(lang[0])
    return b"(" + b" ".join(wire.string(x) for x in lang) + b")"


def formatBodyStructure(part: dict, extensible: bool = True) -> bytes:
    """BODYSTRUCTURE (C{extensible}) or BODY of one part and its children."""
    if "parts" in part:
        out = b"".join(formatBodyStructure(p, extensible) for p in part["parts"])
        out += b" " + wire.string(part["subtype"].upper())
        if extensible:
            out += b" " + b" ".join(
                [
                    _params(part["params"]),
                    _disposition(part["disposition"]),
                    _language(part["language"]),
                    _n(part["location"]),
                ]
            )
        return b"(" + out + b")"
    items = [
        wire.string(part["type"].upper()),
        wire.string(part["subtype"].upper()),
        _params(part["params"]),
        _n(part["id"]),
        _n(part["description"]),
        wire.string(part["encoding"]),
        b"%d" % part["size"],
    ]
    if "body" in part and "envelope" in part and part["subtype"] != "global":
        # (message/global is a basic body in IMAP4rev1's grammar, RFC 3501 9;
        # only IMAP4rev2's has its envelope and body.)
        items += [
            formatEnvelope(part["envelope"]),
            formatBodyStructure(part["body"], extensible),
            b"%d" % part.get("lines", 0),
        ]
    elif part["type"] == "text":
        items.append(b"%d" % part.get("lines", 0))
    if extensible:
        items += [
            _n(part["md5"]),
            _disposition(part["disposition"]),
            _language(part["language"]),
            _n(part["location"]),
        ]
    return b"(" + b" ".join(items) + b")"


# --------------------------------------------------------------------------
# sections


def _headerLines(raw: bytes, start: int, end: int):
    """The header at C{raw[start:end]} as a list of (lower name or None, raw octets)."""
    out = []  # (name, [lines])
    pos = start
    while pos < end:
        nl = raw.find(b"\n", pos, end)
        lineEnd = end if nl < 0 else nl + 1
        line = raw[pos:lineEnd]
        stripped = line.rstrip(b"\r\n")
        if not stripped:
            break
        if stripped[:1] in (b" ", b"\t") and out:
            out[-1][1].append(line)
        else:
            colon = stripped.find(b":")
            name = stripped[:colon].strip().decode("latin-1").lower() if colon > 0 else None
            out.append((name, [line]))
        pos = lineEnd
    return [(name, b"".join(lines)) for name, lines in out]


def filterHeader(raw: bytes, start: int, end: int, fields, exclude: bool) -> bytes:
    wanted = {f.lower() for f in fields}
    kept = [
        data
        for name, data in _headerLines(raw, start, end)
        if name is not None and ((name in wanted) != exclude)
    ]
    out = b"".join(d if d.endswith(b"\n") else d + b"\r\n" for d in kept)
    # The empty line ends every header fetch, except that of a message
    # with no body and no empty line (RFC 3501 6.4.5).
    region = raw[max(start, end - 3):end]
    blank = region.endswith(b"\n\n") or region.endswith(b"\n\r\n") or raw[start:end] in (b"\n", b"\r\n")
    return out + b"\r\n" if blank else out


def _messageNode(node: dict):
    """The body part of a message node (top level or message/rfc822), or None."""
    if "version" in node or ("envelope" in node and "body" in node):
        return node["body"]
    return None


def sectionBytes(raw: bytes, structure: dict, section: wire.Section):
    """The octets of C{BODY[section]}, or C{None} if the part does not exist."""
    if not section.part and section.text is None:
        return raw
    node = findPart(structure, section.part) if section.part else structure
    if node is None:
        return None
    kind = section.text
    if kind is None:
        hs, bs, end = node["offsets"]
        return raw[bs:end]
    if kind == "MIME":
        hs, bs, end = node["offsets"]
        return raw[hs:bs]
    body = _messageNode(node)
    if body is None:
        return None
    hs, bs, end = body["offsets"]
    if kind == "HEADER":
        return raw[hs:bs]
    if kind == "TEXT":
        return raw[bs:end]
    return filterHeader(raw, hs, bs, section.fields, kind == "HEADER.FIELDS.NOT")


def partial(data: bytes, spec):
    if spec is None:
        return data
    origin, length = spec
    return data[origin : origin + length]


# --------------------------------------------------------------------------
# planning a FETCH


class FetchPlan:
    """What a FETCH with attributes C{atts} needs, and how to answer it."""

    def __init__(self, atts, uid: bool, readOnly: bool):
        atts = list(atts)
        if uid and not any(a.name == "UID" for a in atts):
            atts.insert(0, wire.FetchAtt("UID"))
        self.atts = atts
        names = {a.name for a in atts}
        self.needsContent = bool(
            names & {"BODY[]", "RFC822", "RFC822.HEADER", "RFC822.TEXT", "BINARY[]", "BINARY.SIZE"}
        )
        otherStructure = bool(names & {"BODYSTRUCTURE", "BODY", "RFC822.HEADER", "RFC822.TEXT"}) or any(
            a.name in ("BODY[]", "BINARY[]", "BINARY.SIZE") and (a.section.part or a.section.text) for a in atts
        )
        self.needsStructure = otherStructure or "ENVELOPE" in names
        #: The analysis is needed for ENVELOPE alone: a store that keeps
        #: envelopes formatted (L{IEnvelopeStore}) can answer without it.
        self.envelopeOnly = "ENVELOPE" in names and not otherStructure and not self.needsContent
        self.setsSeen = not readOnly and any(
            (a.name in ("BODY[]", "BINARY[]") and not a.peek) or a.name in ("RFC822", "RFC822.TEXT") for a in atts
        )
        self.wantsFlags = "FLAGS" in names
        self.wantsModseq = "MODSEQ" in names
        self.wantsUid = "UID" in names
        #: Only FLAGS, UID, INTERNALDATE, RFC822.SIZE, MODSEQ: answerable from metadata alone.
        self.metaOnly = not (self.needsContent or self.needsStructure) and not (
            names - {"FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "MODSEQ"}
        )
        #: Those and ENVELOPE: answerable from metadata when the store keeps envelopes.
        self.metaAndEnvelope = not (names - {"FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "MODSEQ", "ENVELOPE"})

    def addModseq(self):
        """CONDSTORE: every FETCH response of this command carries MODSEQ (RFC 7162 3.1.4.1)."""
        if not self.wantsModseq:
            self.atts.append(wire.FetchAtt("MODSEQ"))
            self.wantsModseq = True

    def streamable(self, size: int, threshold: int):
        """
        The one attribute whose octets may be streamed from the message file
        (a whole-message C{BODY[]}/C{RFC822} bigger than C{threshold},
        without partial), or C{None}.
        """
        if size <= threshold:
            return None
        content = [a for a in self.atts if a.name in _CONTENT_ATTS]
        if len(content) != 1:
            return None
        att = content[0]
        if att.name == "RFC822" or (
            att.name == "BODY[]" and not att.section.part and att.section.text is None and att.partial is None
        ):
            return att
        return None

    def checkBinary(self, content, structure):
        """Raise L{UnknownCTE} now if a BINARY item of this plan would (before a response is begun)."""
        for att in self.atts:
            if att.name in ("BINARY[]", "BINARY.SIZE"):
                binaryBytes(content, structure, att.section.part)

    def items(self, seq, meta, flags, content, structure, streamAtt=None):
        """The C{(name, value)} pairs of one message, as a list (see L{iterItems})."""
        return list(self.iterItems(seq, meta, flags, content, structure, streamAtt))

    def iterItems(self, seq, meta, flags, content, structure, streamAtt=None):
        """
        The C{(name, value)} pairs of one message.  C{flags} is the flag list
        to show (with C{\\Recent} when it applies); C{content} the raw bytes
        (when L{needsContent}); C{structure} the analysis (when needed).
        The value of C{streamAtt} is left C{None}: the caller streams it.
        One at a time: a FETCH of many sections of a big message need not
        hold them all.
        """
        for att in self.atts:
            name = att.name
            if att is streamAtt:
                # the session writes this one's literal from the file
                yield (att.responseName().encode("ascii"), None)
            elif name == "FLAGS":
                yield (b"FLAGS", wire.flagList(frozenset(flags)))
            elif name == "UID":
                yield (b"UID", b"%d" % meta.uid)
            elif name == "INTERNALDATE":
                yield (b"INTERNALDATE", wire.formatDateTime(meta.internalDate))
            elif name == "RFC822.SIZE":
                yield (b"RFC822.SIZE", b"%d" % meta.size)
            elif name == "MODSEQ":
                yield (b"MODSEQ", b"(%d)" % meta.modseq)
            elif name == "BINARY[]":
                data = binaryBytes(content, structure, att.section.part)
                data = partial(data if data is not None else b"", att.partial)
                yield (att.responseName().encode("ascii"), literal8(data))
            elif name == "BINARY.SIZE":
                data = binaryBytes(content, structure, att.section.part)
                yield (att.responseName().encode("ascii"), b"%d" % len(data or b""))

            elif name == "ENVELOPE":
                envelope = meta.envelope
                yield (b"ENVELOPE", envelope if envelope is not None else formatEnvelope(structure["envelope"]))
            elif name == "BODYSTRUCTURE":
                yield (b"BODYSTRUCTURE", formatBodyStructure(structure["body"], True))
            elif name == "BODY":
                yield (b"BODY", formatBodyStructure(structure["body"], False))
            elif name == "RFC822":
                yield (b"RFC822", wire.literal(content))
            elif name == "RFC822.HEADER":
                hs, bs, _ = structure["body"]["offsets"]
                yield (b"RFC822.HEADER", wire.literal(content[hs:bs]))
            elif name == "RFC822.TEXT":
                _, bs, end = structure["body"]["offsets"]
                yield (b"RFC822.TEXT", wire.literal(content[bs:end]))
            elif name == "BODY[]":
                data = sectionBytes(content, structure, att.section)
                if data is None:
                    data = b""
                data = partial(data, att.partial)
                yield (att.responseName().encode("ascii"), wire.literal(data))


#: Attributes that need the message octets.
_CONTENT_ATTS = ("BODY[]", "RFC822", "RFC822.HEADER", "RFC822.TEXT", "BINARY[]", "BINARY.SIZE")


def ensureStructure(structure, content):
    """A usable analysis: the cached one if current, else one made from C{content}."""
    if isinstance(structure, dict) and structure.get("version") == STRUCTURE_VERSION:
        return structure
    if content is None:
        return None
    return analyze(content)


__all__ = [
    "FetchPlan",
    "ensureStructure",
    "filterHeader",
    "formatBodyStructure",
    "formatEnvelope",
    "sectionBytes",
]

