"""
IMAP SEARCH (RFC 3501 6.4.4): evaluation of the key trees that
L{mailplat.imap.wire.parseSearchKey} builds, against one message at a time.

Header keys (FROM, TO, CC, BCC, SUBJECT, HEADER) use the header fields
cached in the message analysis; they match a case-insensitive substring of
the raw value or of its RFC 2047 decoding.  BODY and TEXT need the content:
here they match the raw octets and the text of each C{text/*} part after
content-transfer and charset decoding.  A store that searches its own index
(L{mailplat.interfaces.storage.ISearchIndex}, as the SQLite store does)
matches the decoded text of the C{text/*} parts only (and TEXT the header
too), not base64 or quoted-printable as sent.  Dates (BEFORE, ON, SINCE) use the
internal date's day in UTC; SENT* use the Date field's own day, ignoring its
time and zone; a message without a readable Date field matches no SENT* key.

Deviation: substring comparison is Unicode case folding (RFC 3501 only
requires ASCII case-insensitivity), which is a superset.
"""

from __future__ import annotations

import datetime
import email.header
import email.utils
import re
from dataclasses import dataclass
from typing import Optional

from mailplat.mime.structure import textParts

CHARSETS = ("UTF-8", "US-ASCII")


@dataclass
class Candidate:
    """What a search knows about one message."""

    seq: int
    uid: int
    flags: frozenset
    recent: bool
    size: int
    internalDate: float
    structure: Optional[dict] = None
    content: Optional[bytes] = None
    modseq: int = 0
    saved: tuple = ()
    now: float = 0.0


def walk(key):
    """Every node of a key tree."""
    return _walk(key)


def _walk(key):
    yield key
    kind = key[0]
    if kind == "and":
        for k in key[1]:
            yield from _walk(k)
    elif kind == "or":
        yield from _walk(key[1])
        yield from _walk(key[2])
    elif kind == "not":
        yield from _walk(key[1])


def needsStructure(key) -> bool:
    return any(k[0] == "header" or (k[0] == "date" and k[3]) for k in _walk(key))


def needsContent(key) -> bool:
    return any(k[0] in ("body", "text") for k in _walk(key))


def needsDates(key) -> bool:
    """WITHIN (OLDER/YOUNGER) keys compare internal dates with the current time."""
    return any(k[0] in ("older", "younger") for k in _walk(key))


def toIndexQuery(key, uids, recent, saved, now, metas, maxSeq, maxUid):
    """
    A prepared key tree -> an L{ISearchIndex} query: sequence numbers,
    C{$}, \\Recent (NEW, OLD, RECENT) and WITHIN are turned into UID sets
    from the session's view (C{uids}, ascending, index = sequence number -
    1; C{recent}; C{saved}; C{metas} by UID for WITHIN).
    """
    kind = key[0]
    if kind == "and":
        return ("and", tuple(toIndexQuery(k, uids, recent, saved, now, metas, maxSeq, maxUid) for k in key[1]))
    if kind == "or":
        return (
            "or",
            toIndexQuery(key[1], uids, recent, saved, now, metas, maxSeq, maxUid),
            toIndexQuery(key[2], uids, recent, saved, now, metas, maxSeq, maxUid),
        )
    if kind == "not":
        return ("not", toIndexQuery(key[1], uids, recent, saved, now, metas, maxSeq, maxUid))
    if kind == "seq":
        seqset = key[1]
        if seqset.saved:
            return ("uids", frozenset(saved))
        return ("uids", frozenset(uids[s - 1] for s in seqset.select(range(1, maxSeq + 1), maxSeq)))
    if kind == "uid":
        if key[1].saved:
            return ("uids", frozenset(saved))
        return ("uids", frozenset(key[1].select(uids, maxUid)))
    if kind == "recent":
        return ("uids", frozenset(recent))
    if kind == "old":
        return ("not", ("uids", frozenset(recent)))
    if kind == "new":
        return ("and", (("uids", frozenset(recent)), ("flag", "\\Seen", False)))
    if kind in ("older", "younger"):
        limit = now - key[1]
        if kind == "older":
            return ("uids", frozenset(u for u, m in metas.items() if m.internalDate <= limit))
        return ("uids", frozenset(u for u, m in metas.items() if m.internalDate > limit))
    if kind == "keyword":
        return ("flag", key[1], key[2])
    return key


def prepare(key, charset: Optional[str] = None):
    """
    Decode the byte strings of a key tree (parsed from the wire) into
    case-folded text, for L{matches}.
    """
    kind = key[0]
    if kind == "and":
        return ("and", tuple(prepare(k, charset) for k in key[1]))
    if kind == "or":
        return ("or", prepare(key[1], charset), prepare(key[2], charset))
    if kind == "not":
        return ("not", prepare(key[1], charset))
    if kind == "header":
        return ("header", key[1], _decode(key[2]))
    if kind in ("body", "text"):
        return (kind, _decode(key[1]))
    return key


def _decode(value) -> str:
    if isinstance(value, str):
        return value.casefold()
    return value.decode("utf-8", "replace").casefold()


def _rfc2047(value: str) -> str:
    if "=?" not in value:
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except Exception:
        return value


def _headerMatches(structure, name, needle) -> bool:
    if structure is None:
        return False
    for fieldName, value in structure.get("headers", ()):
        if fieldName.lower() != name:
            continue
        if not needle:
            return True
        if needle in value.casefold() or needle in _rfc2047(value).casefold():
            return True
    return False


def _sentDay(structure):
    if structure is None:
        return None
    raw = (structure.get("envelope") or {}).get("date")
    if not raw:
        return None
    try:
        parsed = email.utils.parsedate_tz(raw)
        if parsed is None:
            return None
        return datetime.date(parsed[0], parsed[1], parsed[2])
    except (ValueError, TypeError, OverflowError, IndexError):
        return None


def _compareDay(day, kind, date) -> bool:
    if day is None:
        return False
    if kind == "before":
        return day < date
    if kind == "on":
        return day == date
    return day >= date


def _contentMatches(msg: Candidate, needle: str, withHeader: bool) -> bool:
    content = msg.content
    if content is None:
        return False
    structure = msg.structure
    body = structure["body"] if structure else None
    if body is None:
        return needle in content.decode("utf-8", "replace").casefold()
    hs, bs, end = body["offsets"]
    if withHeader:
        header = content[hs:bs].decode("utf-8", "replace")
        # Header fields as they read, unfolded (RFC 5322 §2.2.3), as well as raw.
        if needle in header.casefold() or needle in re.sub(r"\r?\n(?=[ \t])", "", header).casefold():
            return True
        for _, value in structure.get("headers", ()):
            if "=?" in value and needle in _rfc2047(value).casefold():
                return True
    if needle in content[bs:end].decode("utf-8", "replace").casefold():
        return True
    for chunk in textParts(content, body):
        if needle in chunk.casefold():
            return True
    return False


def matches(key, msg: Candidate, maxSeq: int, maxUid: int) -> bool:
    """Whether C{msg} matches the prepared key C{key}."""
    kind = key[0]
    if kind == "and":
        return all(matches(k, msg, maxSeq, maxUid) for k in key[1])
    if kind == "or":
        return matches(key[1], msg, maxSeq, maxUid) or matches(key[2], msg, maxSeq, maxUid)
    if kind == "not":
        return not matches(key[1], msg, maxSeq, maxUid)
    if kind == "all":
        return True
    if kind == "flag":
        return (key[1] in msg.flags) == key[2]
    if kind == "keyword":
        lowered = key[1].lower()
        return any(f.lower() == lowered for f in msg.flags) == key[2]
    if kind == "new":
        return msg.recent and "\\Seen" not in msg.flags
    if kind == "old":
        return not msg.recent
    if kind == "recent":
        return msg.recent
    if kind == "seq":
        if key[1].saved:
            return msg.uid in msg.saved
        return key[1].contains(msg.seq, maxSeq)
    if kind == "uid":
        if key[1].saved:
            return msg.uid in msg.saved
        return key[1].contains(msg.uid, maxUid)
    if kind == "modseq":
        return msg.modseq >= key[1]
    if kind == "older":
        return msg.internalDate <= msg.now - key[1]
    if kind == "younger":
        return msg.internalDate > msg.now - key[1]
    if kind == "larger":
        return msg.size > key[1]
    if kind == "smaller":
        return msg.size < key[1]
    if kind == "date":
        _, which, date, sent = key
        if sent:
            day = _sentDay(msg.structure)
        else:
            day = datetime.datetime.fromtimestamp(int(msg.internalDate), datetime.timezone.utc).date()
        return _compareDay(day, which, date)
    if kind == "header":
        return _headerMatches(msg.structure, key[1], key[2])
    if kind == "body":
        return _contentMatches(msg, key[1], False)
    if kind == "text":
        return _contentMatches(msg, key[1], True)
    raise ValueError(f"unknown search key {kind!r}")


__all__ = ["CHARSETS", "Candidate", "matches", "needsContent", "needsStructure", "prepare"]
