"""
IMAP4rev1 wire format (RFC 3501 section 9), sans-IO.

L{CommandParser} turns the bytes a client sends into events, one at a time
and only when the session asks for the next one (L{CommandParser.nextEvent}),
so that pipelined commands are executed strictly in order and nothing sent
after C{STARTTLS} or C{AUTHENTICATE} is interpreted before the session is
ready for it:

  - L{Command}: a complete, syntactically valid command with typed arguments
    (sequence sets, fetch attributes, search keys, store items, flags,
    dates, mailbox names already decoded from modified UTF-7);
  - L{NeedContinuation}: the client sent a synchronising literal C{{n}} and
    waits for C{+ Ready} before sending its octets;
  - L{BadCommand}: the command is malformed or over a limit; the session
    answers C{tag BAD text} (or C{NO} for an over-sized literal);
  - L{RawLine}: a line read in raw mode (SASL responses to AUTHENTICATE).

Literals: synchronising C{{n}} and non-synchronising C{{n+}} (LITERAL+,
RFC 7888).  A synchronising literal larger than the limit is refused without
reading it; a non-synchronising one is read and thrown away (never
buffered) and then refused.

Limits: line length (literals excluded), literal size, number of literals in
one command, parenthesis nesting depth.

The encoding half: L{quoted}, L{literal}, L{astring}, L{nstring},
L{formatFlags}, L{fetchResponse} and modified UTF-7 (RFC 3501 5.1.3,
L{encodeMailbox}/L{decodeMailbox}).

Deviations: a bare LF is accepted as a line end (clients do send it); an
8-bit mailbox name that is valid UTF-8 is accepted as UTF-8 (RFC 6855
style) instead of being refused.
"""

from __future__ import annotations

import base64
import bisect
import datetime
import re
from dataclasses import dataclass, field
from typing import Optional

MAX_LINE = 64 * 1024
MAX_LITERAL = 50 * 1024 * 1024
MAX_LITERALS_PER_COMMAND = 1000
MAX_DEPTH = 32

# --------------------------------------------------------------------------
# events


@dataclass(frozen=True)
class Command:
    """A parsed command.  C{name} is upper case; C{uid} is true for C{UID x}."""

    tag: str
    name: str
    args: dict = field(default_factory=dict)
    uid: bool = False


@dataclass(frozen=True)
class BadCommand:
    """
    A command that cannot be executed.  C{tag} is C{None} when not even the
    tag could be read (answer with an untagged C{* BAD}).  C{no} asks for a
    C{NO} answer instead of C{BAD} (an over-sized literal).
    """

    tag: Optional[str]
    text: str
    no: bool = False
    code: Optional[str] = None


@dataclass(frozen=True)
class NeedContinuation:
    """Send C{+ Ready for literal data}: the client waits for it."""


@dataclass(frozen=True)
class RawLine:
    line: bytes


class ParseError(Exception):
    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


# --------------------------------------------------------------------------
# typed arguments


@dataclass(frozen=True)
class SequenceSet:
    """
    A sequence set: C{ranges} is a tuple of C{(low, high)} where either may
    be C{None} for C{*}; a single number is C{(n, n)}.  C{*:4} and C{4:*}
    are both kept as written and normalised by L{resolve}.
    """

    ranges: tuple
    #: C{$}: the result saved by an earlier C{SEARCH RETURN (SAVE)} (RFC 5182).
    saved: bool = False

    def resolve(self, largest: int) -> list:
        """
        The numbers in the set among C{1..largest}, ascending, for a mailbox
        whose largest number in use is C{largest} (C{*} stands for it).
        """
        return sorted(self.iterate(largest))

    def iterate(self, largest: int) -> set:
        out = set()
        for lo, hi in self.ranges:
            lo = largest if lo is None else lo
            hi = largest if hi is None else hi
            if lo > hi:
                lo, hi = hi, lo
            hi = min(hi, largest)
            if lo <= hi:
                out.update(range(max(lo, 1), hi + 1))
        return out

    def contains(self, n: int, largest: int) -> bool:
        for lo, hi in self.ranges:
            lo = largest if lo is None else lo
            hi = largest if hi is None else hi
            if lo > hi:
                lo, hi = hi, lo
            if lo <= n <= hi:
                return True
        return False

    def select(self, values, largest: int) -> list:
        """
        The members of C{values} (a sorted sequence of ints: message UIDs, or
        a C{range} of sequence numbers) that are in the set, ascending.
        """
        out = set()
        for lo, hi in self.ranges:
            lo = largest if lo is None else lo
            hi = largest if hi is None else hi
            if lo > hi:
                lo, hi = hi, lo
            i = bisect.bisect_left(values, lo)
            j = bisect.bisect_right(values, hi)
            if len(self.ranges) == 1:
                return list(values[i:j])  # already ascending and distinct
            out.update(values[i:j])
        return sorted(out)

    def maximum(self, largest: int) -> int:
        """The largest explicit number (C{*} counts as C{largest})."""
        m = 0
        for lo, hi in self.ranges:
            for v in (lo, hi):
                m = max(m, largest if v is None else v)
        return m

    def __str__(self):
        if self.saved:
            return "$"

        def one(v):
            return "*" if v is None else str(v)

        return ",".join(one(lo) if lo == hi else f"{one(lo)}:{one(hi)}" for lo, hi in self.ranges)


def formatSequenceSet(numbers) -> str:
    """Compact C{1:3,7} form of an iterable of ints (for COPYUID)."""
    nums = sorted(set(numbers))
    out = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}:{nums[j]}")
        i = j + 1
    return ",".join(out)


@dataclass(frozen=True)
class Section:
    """
    A BODY[section]: C{part} is a tuple of part numbers (may be empty);
    C{text} is C{None}, C{"HEADER"}, C{"HEADER.FIELDS"},
    C{"HEADER.FIELDS.NOT"}, C{"TEXT"} or C{"MIME"}; C{fields} the upper-cased
    header names for the C{HEADER.FIELDS} kinds.
    """

    part: tuple = ()
    text: Optional[str] = None
    fields: tuple = ()

    def spec(self) -> str:
        out = ".".join(str(p) for p in self.part)
        if self.text:
            out = f"{out}.{self.text}" if out else self.text
            if self.fields:
                out += " (" + " ".join(self.fields) + ")"
        return out


@dataclass(frozen=True)
class FetchAtt:
    """
    One fetch attribute.  C{name} is C{FLAGS}, C{UID}, C{INTERNALDATE},
    C{RFC822.SIZE}, C{ENVELOPE}, C{BODYSTRUCTURE}, C{BODY} (no section: the
    non-extensible structure), C{BODY[]} (with C{section}, C{peek},
    C{partial}), C{RFC822}, C{RFC822.HEADER}, C{RFC822.TEXT}.
    """

    name: str
    section: Optional[Section] = None
    peek: bool = False
    partial: Optional[tuple] = None

    def responseName(self) -> str:
        if self.name == "BINARY.SIZE":
            return f"BINARY.SIZE[{self.section.spec()}]"
        if self.name not in ("BODY[]", "BINARY[]"):
            return self.name
        out = f"{self.name[:-2]}[{self.section.spec()}]"
        if self.partial is not None:
            out += f"<{self.partial[0]}>"
        return out


MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}

_SIMPLE_ATTS = {
    "FLAGS",
    "UID",
    "INTERNALDATE",
    "RFC822.SIZE",
    "ENVELOPE",
    "BODYSTRUCTURE",
    "RFC822",
    "RFC822.HEADER",
    "RFC822.TEXT",
    "MODSEQ",
    "EMAILID",
    "THREADID",
}

SYSTEM_FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")
_SYSTEM_BY_LOWER = {f.lower(): f for f in SYSTEM_FLAGS + ("\\Recent",)}

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_BY_LOWER = {m.lower(): i + 1 for i, m in enumerate(MONTHS)}

# --------------------------------------------------------------------------
# character classes (RFC 3501 section 9)

_ATOM_SPECIALS = set(b'(){ %*"\\]') | set(range(0, 32)) | {127}
_ATOM_CHARS = bytes(c for c in range(33, 127) if c not in _ATOM_SPECIALS)
_ASTRING_CHARS = _ATOM_CHARS + b"]"
_LIST_CHARS = _ATOM_CHARS + b"%*]"
_TAG_CHARS = bytes(c for c in _ASTRING_CHARS if c != ord("+"))


def _charset(chars: bytes):
    table = [False] * 256
    for c in chars:
        table[c] = True
    return table


_IS_ATOM = _charset(_ATOM_CHARS)
_IS_ASTRING = _charset(_ASTRING_CHARS)
_IS_LIST = _charset(_LIST_CHARS)
_IS_TAG = _charset(_TAG_CHARS)

_LITERAL_AT_END = re.compile(rb"\{(\d{1,20})(\+?)\}\r?$")


# --------------------------------------------------------------------------
# the reader: a cursor over the lines and literals of one command


class _Literal(bytes):
    """Literal octets (kept apart from line text)."""


class _Reader:
    def __init__(self, segments):
        # segments: [line, literal, line, literal, ..., line]
        self.segments = segments
        self.index = 0
        self.line = segments[0]
        self.pos = 0
        self.depth = 0

    # basic

    def peek(self) -> int:
        if self.pos < len(self.line):
            return self.line[self.pos]
        return -1

    def atEnd(self) -> bool:
        return self.pos >= len(self.line) and self.index == len(self.segments) - 1

    def end(self):
        if not self.atEnd():
            raise ParseError("unexpected extra arguments")

    def sp(self):
        if self.peek() != 0x20:
            raise ParseError("expected a space")
        self.pos += 1

    def maybeSp(self) -> bool:
        if self.peek() == 0x20:
            self.pos += 1
            return True
        return False

    def expect(self, char: bytes):
        if self.peek() != char[0]:
            raise ParseError(f"expected {char.decode()!r}")
        self.pos += 1

    def _run(self, table) -> bytes:
        start = self.pos
        line = self.line
        n = len(line)
        p = start
        while p < n and table[line[p]]:
            p += 1
        self.pos = p
        return bytes(line[start:p])

    # tokens

    def atom(self) -> str:
        value = self._run(_IS_ATOM)
        if not value:
            raise ParseError("expected an atom")
        return value.decode("ascii")

    def number(self) -> int:
        start = self.pos
        while self.pos < len(self.line) and 0x30 <= self.line[self.pos] <= 0x39:
            self.pos += 1
        digits = self.line[start : self.pos]
        if not digits or len(digits) > 10:
            raise ParseError("expected a number")
        value = int(digits)
        if value > 0xFFFFFFFF:
            raise ParseError("number out of range")
        return value

    def nzNumber(self) -> int:
        value = self.number()
        if value == 0:
            raise ParseError("expected a non-zero number")
        return value

    def quoted(self) -> bytes:
        self.expect(b'"')
        out = bytearray()
        line = self.line
        while True:
            if self.pos >= len(line):
                raise ParseError("unterminated quoted string")
            c = line[self.pos]
            self.pos += 1
            if c == 0x22:
                return bytes(out)
            if c == 0x5C:
                if self.pos >= len(line) or line[self.pos] not in (0x22, 0x5C):
                    raise ParseError("bad escape in quoted string")
                out.append(line[self.pos])
                self.pos += 1
            elif c in (0x0D, 0x0A, 0x00):
                raise ParseError("bad character in quoted string")
            else:
                out.append(c)

    def literal(self, allow8=False) -> bytes:
        if allow8 and self.peek() == 0x7E:
            self.pos += 1
        m = _LITERAL_AT_END.match(self.line, self.pos)
        if m is None or self.index + 1 >= len(self.segments):
            raise ParseError("bad literal")
        data = self.segments[self.index + 1]
        self.index += 2
        self.line = self.segments[self.index]
        self.pos = 0
        return bytes(data)

    def string(self) -> bytes:
        c = self.peek()
        if c == 0x22:
            return self.quoted()
        if c == 0x7B:
            return self.literal()
        raise ParseError("expected a string")

    def astring(self) -> bytes:
        c = self.peek()
        if c in (0x22, 0x7B):
            return self.string()
        value = self._run(_IS_ASTRING)
        if not value:
            raise ParseError("expected a string")
        return value

    def listMailbox(self) -> bytes:
        c = self.peek()
        if c in (0x22, 0x7B):
            return self.string()
        value = self._run(_IS_LIST)
        if not value:
            raise ParseError("expected a mailbox pattern")
        return value

    def open(self):
        self.expect(b"(")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError("too deeply nested")

    def close(self):
        self.expect(b")")
        self.depth -= 1

    # composite

    def mailbox(self) -> str:
        return decodeMailboxName(self.astring())

    def sequenceSet(self, allowSaved=True) -> SequenceSet:
        if allowSaved and self.peek() == 0x24:
            self.pos += 1
            return SequenceSet((), saved=True)
        ranges = []
        while True:
            lo = self._seqNumber()
            hi = lo
            if self.peek() == 0x3A:
                self.pos += 1
                hi = self._seqNumber()
            ranges.append((lo, hi))
            if len(ranges) > 10000:
                raise ParseError("sequence set too long")
            if self.peek() != 0x2C:
                break
            self.pos += 1
        return SequenceSet(tuple(ranges))

    def _seqNumber(self):
        if self.peek() == 0x2A:
            self.pos += 1
            return None
        return self.nzNumber()

    def flag(self, allowRecent=True) -> str:
        if self.peek() == 0x5C:
            self.pos += 1
            if self.peek() == 0x2A:
                raise ParseError("\\* is not a flag")
            name = "\\" + self.atom()
            canon = _SYSTEM_BY_LOWER.get(name.lower())
            if canon is None:
                raise ParseError(f"unknown system flag {name}")
            if canon == "\\Recent" and not allowRecent:
                raise ParseError("\\Recent cannot be set")
            return canon
        return self.atom()

    def flagList(self) -> list:
        self.open()
        flags = []
        if self.peek() != 0x29:
            while True:
                flags.append(self.flag())
                if not self.maybeSp():
                    break
        self.close()
        return flags

    def date(self) -> datetime.date:
        quoted = self.peek() == 0x22
        if quoted:
            raw = self.quoted()
        else:
            raw = self._run(_IS_ATOM)
        m = re.fullmatch(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})", raw)
        if m is None or m.group(2).decode().lower() not in _MONTH_BY_LOWER:
            raise ParseError("bad date")
        try:
            return datetime.date(int(m.group(3)), _MONTH_BY_LOWER[m.group(2).decode().lower()], int(m.group(1)))
        except ValueError:
            raise ParseError("bad date")

    def dateTime(self) -> float:
        raw = self.quoted()
        return parseDateTime(raw)

    def nil(self) -> bool:
        if self.line[self.pos : self.pos + 3].upper() == b"NIL" and not (
            self.pos + 3 < len(self.line) and _IS_ATOM[self.line[self.pos + 3]]
        ):
            self.pos += 3
            return True
        return False

    def modseq(self) -> int:
        start = self.pos
        while self.pos < len(self.line) and 0x30 <= self.line[self.pos] <= 0x39:
            self.pos += 1
        digits = self.line[start : self.pos]
        if not digits or len(digits) > 20:
            raise ParseError("expected a mod-sequence value")
        value = int(digits)
        if value >= 1 << 63:
            raise ParseError("mod-sequence value out of range")
        return value

    def atomList(self) -> list:
        """C{(ATOM ATOM ...)} (possibly empty), upper-cased."""
        self.open()
        out = []
        while self.peek() != 0x29:
            out.append(self.atom().upper())
            if not self.maybeSp():
                break
        self.close()
        return out


_DATE_TIME = re.compile(rb"([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)")


def parseDateTime(raw: bytes) -> float:
    """RFC 3501 date-time (C{"17-Jul-1996 02:44:25 -0700"}) -> POSIX seconds."""
    m = _DATE_TIME.fullmatch(raw)
    if m is None or m.group(2).decode().lower() not in _MONTH_BY_LOWER:
        raise ParseError("bad date-time")
    try:
        offset = (int(m.group(8)) * 60 + int(m.group(9))) * 60
        if m.group(7) == b"-":
            offset = -offset
        tz = datetime.timezone(datetime.timedelta(seconds=offset))
        value = datetime.datetime(
            int(m.group(3)),
            _MONTH_BY_LOWER[m.group(2).decode().lower()],
            int(m.group(1)),
            int(m.group(4)),
            int(m.group(5)),
            int(m.group(6)),
            tzinfo=tz,
        )
    except ValueError:
        raise ParseError("bad date-time")
    return value.timestamp()


def formatDateTime(seconds: float) -> bytes:
    """POSIX seconds -> quoted RFC 3501 date-time in UTC."""
    d = datetime.datetime.fromtimestamp(int(seconds), datetime.timezone.utc)
    return b'"%02d-%s-%04d %02d:%02d:%02d +0000"' % (
        d.day,
        MONTHS[d.month - 1].encode(),
        d.year,
        d.hour,
        d.minute,
        d.second,
    )


# --------------------------------------------------------------------------
# command grammars


def _noArgs(r: _Reader, args: dict):
    pass


def _login(r, args):
    r.sp()
    args["user"] = r.astring()
    r.sp()
    args["password"] = r.astring()


def _authenticate(r, args):
    r.sp()
    args["mechanism"] = r.atom().upper()
    args["initial"] = None
    if r.maybeSp():
        value = r._run(_charset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="))
        if not value:
            raise ParseError("bad initial response")
        args["initial"] = value


def _mailboxOnly(r, args):
    r.sp()
    args["mailbox"] = r.mailbox()


def _rename(r, args):
    r.sp()
    args["old"] = r.mailbox()
    r.sp()
    args["new"] = r.mailbox()


def _list(r, args):
    r.sp()
    args["reference"] = decodeMailboxName(r.astring(), allowEmpty=True)
    r.sp()
    args["pattern"] = decodeMailboxName(r.listMailbox(), allowEmpty=True)


_STATUS_ITEMS = (
    "MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ", "SIZE", "APPENDLIMIT", "DELETED",
    "DELETED-STORAGE",
)


def _statusItems(r) -> list:
    r.open()
    items = []
    while True:
        item = r.atom().upper()
        if item not in _STATUS_ITEMS:
            raise ParseError(f"unknown status item {item}")
        items.append(item)
        if not r.maybeSp():
            break
    r.close()
    return items


def _status(r, args):
    r.sp()
    args["mailbox"] = r.mailbox()
    r.sp()
    r.open()
    items = []
    while True:
        item = r.atom().upper()
        if item not in _STATUS_ITEMS:
            raise ParseError(f"unknown status item {item}")
        items.append(item)
        if not r.maybeSp():
            break
    r.close()
    args["items"] = items


def _appendOne(r) -> dict:
    one = {"flags": [], "date": None, "binary": False, "utf8": False}
    if r.peek() == 0x28:
        one["flags"] = [f for f in r.flagList() if f != "\\Recent"]
        r.sp()
    if r.peek() == 0x22:
        one["date"] = r.dateTime()
        r.sp()
    if r.line[r.pos : r.pos + 4].upper() == b"UTF8":
        # UTF8 (~{n}) of RFC 6855
        r.pos += 4
        r.sp()
        r.open()
        if r.peek() != 0x7E:
            raise ParseError("expected a literal8")
        one["message"] = r.literal(allow8=True)
        one["utf8"] = True
        r.close()
        return one
    if r.peek() == 0x7E:
        one["binary"] = True
    elif r.peek() != 0x7B:
        raise ParseError("expected a message literal")
    one["message"] = r.literal(allow8=True)
    return one


def _append(r, args):
    r.sp()
    args["mailbox"] = r.mailbox()
    r.sp()
    messages = [_appendOne(r)]
    # MULTIAPPEND (RFC 3502): more messages follow, each with its own flags and date
    while r.maybeSp():
        messages.append(_appendOne(r))
    args["messages"] = messages
    first = messages[0]
    args["flags"], args["date"], args["message"] = first["flags"], first["date"], first["message"]


def _select(r, args):
    r.sp()
    args["mailbox"] = r.mailbox()
    args["params"] = []
    args["qresync"] = None
    if r.maybeSp():
        r.open()
        params = []
        while r.peek() != 0x29:
            name = r.atom().upper()
            params.append(name)
            if name == "QRESYNC":
                # QRESYNC (uidvalidity modseq [known-uids [(seq-set uid-set)]])
                r.sp()
                r.open()
                q = {"uidvalidity": r.nzNumber(), "known": None, "seqMatch": None}
                r.sp()
                q["modseq"] = r.modseq()
                if r.maybeSp():
                    if r.peek() != 0x28:
                        q["known"] = r.sequenceSet(allowSaved=False)
                        r.maybeSp()
                    if r.peek() == 0x28:
                        r.open()
                        seqs = r.sequenceSet(allowSaved=False)
                        r.sp()
                        uids = r.sequenceSet(allowSaved=False)
                        r.close()
                        q["seqMatch"] = (seqs, uids)
                r.close()
                args["qresync"] = q
            elif name not in ("CONDSTORE",):
                raise ParseError(f"unknown select parameter {name}")
            if not r.maybeSp():
                break
        r.close()
        args["params"] = params


def _fetch(r, args):
    r.sp()
    args["set"] = r.sequenceSet()
    r.sp()
    args["atts"] = parseFetchAtts(r)
    args["changedSince"] = None
    args["vanished"] = False
    if r.maybeSp():
        # fetch modifiers (RFC 7162): (CHANGEDSINCE n [VANISHED])
        r.open()
        while True:
            word = r.atom().upper()
            if word == "CHANGEDSINCE":
                r.sp()
                args["changedSince"] = r.modseq()
            elif word == "VANISHED":
                args["vanished"] = True
            else:
                raise ParseError(f"unknown fetch modifier {word}")
            if not r.maybeSp():
                break
        r.close()
        if args["vanished"] and args["changedSince"] is None:
            raise ParseError("VANISHED needs CHANGEDSINCE")


def _store(r, args):
    r.sp()
    args["set"] = r.sequenceSet()
    r.sp()
    args["unchangedSince"] = None
    if r.peek() == 0x28:
        r.open()
        word = r.atom().upper()
        if word != "UNCHANGEDSINCE":
            raise ParseError(f"unknown store modifier {word}")
        r.sp()
        args["unchangedSince"] = r.modseq()
        r.close()
        r.sp()
    item = r.atom().upper()
    m = re.fullmatch(r"([+-]?)FLAGS(\.SILENT)?", item)
    if m is None:
        raise ParseError(f"unknown store item {item}")
    args["mode"] = {"": "set", "+": "add", "-": "remove"}[m.group(1)]
    args["silent"] = bool(m.group(2))
    r.sp()
    if r.peek() == 0x28:
        flags = r.flagList()
    else:
        flags = []
        while True:
            flags.append(r.flag())
            if not r.maybeSp():
                break
    args["flags"] = [f for f in flags if f != "\\Recent"]


def _copy(r, args):
    r.sp()
    args["set"] = r.sequenceSet()
    r.sp()
    args["mailbox"] = r.mailbox()


def _uidExpunge(r, args):
    r.sp()
    args["set"] = r.sequenceSet()


_RETURN_OPTIONS = ("MIN", "MAX", "ALL", "COUNT", "SAVE")


def _searchReturn(r, args):
    """An optional C{RETURN (...)} (ESEARCH, RFC 4731; SAVE, RFC 5182)."""
    args["return"] = None
    if r.line[r.pos : r.pos + 7].upper() == b"RETURN ":
        r.pos += 7
        opts = r.atomList()
        for o in opts:
            if o not in _RETURN_OPTIONS:
                raise ParseError(f"unknown search return option {o}")
        args["return"] = opts or ["ALL"]
        r.sp()


def _search(r, args):
    r.sp()
    _searchReturn(r, args)
    charset = None
    save = (r.index, r.line, r.pos)
    word = r._run(_IS_ATOM)
    if word.upper() == b"CHARSET":
        r.sp()
        charset = r.astring().decode("ascii", "replace").upper()
        r.sp()
    else:
        r.index, r.line, r.pos = save
    args["charset"] = charset
    args["key"] = _searchKeys(r)


def _searchKeys(r):
    keys = [parseSearchKey(r)]
    while r.maybeSp():
        keys.append(parseSearchKey(r))
    return keys[0] if len(keys) == 1 else ("and", tuple(keys))


SORT_KEYS = ("ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO")
THREAD_ALGORITHMS = ("ORDEREDSUBJECT", "REFERENCES")


def _sort(r, args):
    r.sp()
    _searchReturn(r, args)
    r.open()
    criteria = []
    reverse = False
    while True:
        word = r.atom().upper()
        if word == "REVERSE":
            if reverse:
                raise ParseError("REVERSE REVERSE")
            reverse = True
        elif word in SORT_KEYS:
            criteria.append((word, reverse))
            reverse = False
        else:
            raise ParseError(f"unknown sort key {word}")
        if not r.maybeSp():
            break
    r.close()
    if reverse or not criteria:
        raise ParseError("bad sort criteria")
    args["criteria"] = criteria
    r.sp()
    args["charset"] = r.astring().decode("ascii", "replace").upper()
    r.sp()
    args["key"] = _searchKeys(r)


def _thread(r, args):
    r.sp()
    algorithm = r.atom().upper()
    if algorithm not in THREAD_ALGORITHMS:
        raise ParseError(f"unknown thread algorithm {algorithm}")
    args["algorithm"] = algorithm
    r.sp()
    args["charset"] = r.astring().decode("ascii", "replace").upper()
    r.sp()
    args["key"] = _searchKeys(r)


def _create(r, args):
    r.sp()
    args["mailbox"] = r.mailbox()
    args["use"] = []
    if r.maybeSp():
        # CREATE-SPECIAL-USE (RFC 6154): (USE (\Drafts ...))
        r.open()
        word = r.atom().upper()
        if word != "USE":
            raise ParseError(f"unknown create parameter {word}")
        r.sp()
        r.open()
        uses = []
        while r.peek() != 0x29:
            r.expect(b"\\")
            uses.append("\\" + r.atom())
            if not r.maybeSp():
                break
        r.close()
        r.close()
        args["use"] = uses


_LIST_SELECT = ("SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE")
_LIST_RETURN = ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE", "STATUS")


def _listExtended(r, args):
    """LIST [(selection)] reference (patterns | pattern) [RETURN (options)] (RFC 5258)."""
    r.sp()
    args["select"] = []
    args["returns"] = []
    args["status"] = None
    args["extended"] = False
    if r.peek() == 0x28:
        args["select"] = r.atomList()
        args["extended"] = True
        for o in args["select"]:
            if o not in _LIST_SELECT:
                raise ParseError(f"unknown list selection option {o}")
        if "RECURSIVEMATCH" in args["select"] and len(args["select"]) == 1:
            raise ParseError("RECURSIVEMATCH needs another selection option")
        r.sp()
    args["reference"] = decodeMailboxName(r.astring(), allowEmpty=True)
    r.sp()
    if r.peek() == 0x28:
        r.open()
        patterns = []
        while True:
            patterns.append(decodeMailboxName(r.listMailbox(), allowEmpty=True))
            if not r.maybeSp():
                break
        r.close()
        args["patterns"] = patterns
        args["extended"] = True
    else:
        args["patterns"] = [decodeMailboxName(r.listMailbox(), allowEmpty=True)]
    args["pattern"] = args["patterns"][0]
    if r.maybeSp():
        if r.atom().upper() != "RETURN":
            raise ParseError("expected RETURN")
        r.sp()
        r.open()
        while r.peek() != 0x29:
            o = r.atom().upper()
            if o not in _LIST_RETURN:
                raise ParseError(f"unknown list return option {o}")
            if o == "STATUS":
                r.sp()
                args["status"] = _statusItems(r)
            args["returns"].append(o)
            if not r.maybeSp():
                break
        r.close()
        args["extended"] = True


def _enable(r, args):
    caps = []
    while r.maybeSp():
        caps.append(r.atom().upper())
    if not caps:
        raise ParseError("ENABLE needs a capability")
    args["capabilities"] = caps


def _id(r, args):
    r.sp()
    args["params"] = None
    if r.nil():
        return
    r.open()
    params = {}
    while r.peek() != 0x29:
        key = r.string().decode("utf-8", "replace")
        r.sp()
        value = None if r.nil() else r.string().decode("utf-8", "replace")
        if len(params) < 30:
            params[key[:30]] = value
        if not r.maybeSp():
            break
    r.close()
    args["params"] = params


def _quotaRoot(r, args):
    r.sp()
    args["root"] = r.astring().decode("utf-8", "replace")


def _setQuota(r, args):
    _quotaRoot(r, args)
    r.sp()
    r.open()
    limits = {}
    while r.peek() != 0x29:
        name = r.atom().upper()
        r.sp()
        limits[name] = r.modseq()
        if not r.maybeSp():
            break
    r.close()
    args["limits"] = limits


def _compress(r, args):
    r.sp()
    args["mechanism"] = r.atom().upper()


_GRAMMARS = {
    "CAPABILITY": _noArgs,
    "NOOP": _noArgs,
    "LOGOUT": _noArgs,
    "STARTTLS": _noArgs,
    "CHECK": _noArgs,
    "CLOSE": _noArgs,
    "UNSELECT": _noArgs,
    "EXPUNGE": _noArgs,
    "LOGIN": _login,
    "AUTHENTICATE": _authenticate,
    "SELECT": _select,
    "EXAMINE": _select,
    "CREATE": _create,
    "DELETE": _mailboxOnly,
    "SUBSCRIBE": _mailboxOnly,
    "UNSUBSCRIBE": _mailboxOnly,
    "RENAME": _rename,
    "LIST": _listExtended,
    "LSUB": _list,
    "STATUS": _status,
    "APPEND": _append,
    "FETCH": _fetch,
    "STORE": _store,
    "COPY": _copy,
    "SEARCH": _search,
    "MOVE": _copy,
    "SORT": _sort,
    "THREAD": _thread,
    "IDLE": _noArgs,
    "NAMESPACE": _noArgs,
    "ENABLE": _enable,
    "ID": _id,
    "GETQUOTA": _quotaRoot,
    "GETQUOTAROOT": _mailboxOnly,
    "SETQUOTA": _setQuota,
    "COMPRESS": _compress,
}

_UID_GRAMMARS = {
    "FETCH": _fetch,
    "STORE": _store,
    "COPY": _copy,
    "MOVE": _copy,
    "SEARCH": _search,
    "SORT": _sort,
    "THREAD": _thread,
    "EXPUNGE": _uidExpunge,
}


def parseFetchAtts(r: _Reader) -> tuple:
    if r.peek() == 0x28:
        r.open()
        atts = []
        while True:
            atts.append(_fetchAtt(r))
            if not r.maybeSp():
                break
        r.close()
        if not atts:
            raise ParseError("empty fetch list")
        return tuple(atts)
    # a macro or a single attribute
    save = r.pos
    word = r._run(_IS_ATOM).decode("ascii").upper()
    if word in MACROS:
        return tuple(FetchAtt(n) for n in MACROS[word])
    r.pos = save
    return (_fetchAtt(r),)


def _fetchAtt(r: _Reader) -> FetchAtt:
    start = r.pos
    line = r.line
    p = start
    while p < len(line) and (_IS_ATOM[line[p]] and line[p] not in b"[]"):
        p += 1
    name = bytes(line[start:p]).decode("ascii").upper()
    r.pos = p
    if name in ("BODY", "BODY.PEEK") and r.peek() == 0x5B:
        r.pos += 1
        section = _section(r)
        r.expect(b"]")
        partial = None
        if r.peek() == 0x3C:
            r.pos += 1
            origin = r.number()
            r.expect(b".")
            length = r.nzNumber()
            r.expect(b">")
            partial = (origin, length)
        return FetchAtt("BODY[]", section, name == "BODY.PEEK", partial)
    if name in ("BINARY", "BINARY.PEEK", "BINARY.SIZE") and r.peek() == 0x5B:
        r.pos += 1
        parts = []
        while 0x30 <= r.peek() <= 0x39:
            parts.append(r.nzNumber())
            if len(parts) > 100:
                raise ParseError("section too deep")
            if r.peek() != 0x2E:
                break
            r.pos += 1
        r.expect(b"]")
        section = Section(tuple(parts))
        if name == "BINARY.SIZE":
            return FetchAtt("BINARY.SIZE", section)
        partial = None
        if r.peek() == 0x3C:
            r.pos += 1
            origin = r.number()
            r.expect(b".")
            length = r.nzNumber()
            r.expect(b">")
            partial = (origin, length)
        return FetchAtt("BINARY[]", section, name == "BINARY.PEEK", partial)
    if name == "BODY":
        return FetchAtt("BODY")
    if name in _SIMPLE_ATTS:
        return FetchAtt(name)
    if not name:
        raise ParseError("expected a fetch attribute")
    raise ParseError(f"unknown fetch attribute {name}")


def _section(r: _Reader) -> Section:
    parts = []
    text = None
    fields = ()
    while 0x30 <= r.peek() <= 0x39:
        parts.append(r.nzNumber())
        if len(parts) > 100:
            raise ParseError("section too deep")
        if r.peek() == 0x2E:
            r.pos += 1
            if not (0x30 <= r.peek() <= 0x39):
                break
        else:
            break
    if r.peek() != 0x5D:
        start = r.pos
        while r.pos < len(r.line) and r.line[r.pos] not in b"] ":
            r.pos += 1
        text = bytes(r.line[start : r.pos]).decode("ascii", "replace").upper()
        if parts and r.line[start - 1] != 0x2E:
            raise ParseError("bad section")
        if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            r.sp()
            r.open()
            names = []
            while True:
                names.append(r.astring().decode("ascii", "replace").upper())
                if not r.maybeSp():
                    break
            r.close()
            fields = tuple(names)
        elif text == "MIME":
            if not parts:
                raise ParseError("MIME needs a part number")
        elif text not in ("HEADER", "TEXT"):
            raise ParseError("bad section")
    elif parts and r.line[r.pos - 1] == 0x2E:
        raise ParseError("bad section")
    return Section(tuple(parts), text, fields)


_FLAG_KEYS = {
    "ANSWERED": ("flag", "\\Answered", True),
    "DELETED": ("flag", "\\Deleted", True),
    "FLAGGED": ("flag", "\\Flagged", True),
    "SEEN": ("flag", "\\Seen", True),
    "DRAFT": ("flag", "\\Draft", True),
    "UNANSWERED": ("flag", "\\Answered", False),
    "UNDELETED": ("flag", "\\Deleted", False),
    "UNFLAGGED": ("flag", "\\Flagged", False),
    "UNSEEN": ("flag", "\\Seen", False),
    "UNDRAFT": ("flag", "\\Draft", False),
    "ALL": ("all",),
    "NEW": ("new",),
    "OLD": ("old",),
    "RECENT": ("recent",),
}

_HEADER_KEYS = {"BCC": "bcc", "CC": "cc", "FROM": "from", "SUBJECT": "subject", "TO": "to"}
_DATE_KEYS = {
    "BEFORE": ("before", False),
    "ON": ("on", False),
    "SINCE": ("since", False),
    "SENTBEFORE": ("before", True),
    "SENTON": ("on", True),
    "SENTSINCE": ("since", True),
}


def parseSearchKey(r: _Reader):
    """
    One search key as a tuple tree: C{("and", keys)}, C{("or", a, b)},
    C{("not", k)}, C{("all",)}, C{("flag", name, present)},
    C{("keyword", name, present)}, C{("new",)}, C{("old",)},
    C{("recent",)}, C{("header", lowername, bytes)}, C{("body", bytes)},
    C{("text", bytes)}, C{("date", "before"|"on"|"since", date, sent)},
    C{("larger", n)}, C{("smaller", n)}, C{("uid", SequenceSet)},
    C{("seq", SequenceSet)}.
    """
    c = r.peek()
    if c == 0x28:
        r.open()
        keys = [parseSearchKey(r)]
        while r.maybeSp():
            keys.append(parseSearchKey(r))
        r.close()
        return keys[0] if len(keys) == 1 else ("and", tuple(keys))
    if c == 0x2A or c == 0x24 or 0x30 <= c <= 0x39:
        return ("seq", r.sequenceSet())
    word = r.atom().upper()
    if word == "MODSEQ":
        # MODSEQ [entry-name entry-type] mod-sequence-valzer (RFC 7162)
        r.sp()
        if r.peek() == 0x22:
            r.quoted()
            r.sp()
            kind = r.atom().lower()
            if kind not in ("priv", "shared", "all"):
                raise ParseError("bad MODSEQ entry type")
            r.sp()
        return ("modseq", r.modseq())
    if word in ("OLDER", "YOUNGER"):
        # WITHIN (RFC 5032)
        r.sp()
        return (word.lower(), r.nzNumber())
    if word in _FLAG_KEYS:
        return _FLAG_KEYS[word]
    if word in _HEADER_KEYS:
        r.sp()
        return ("header", _HEADER_KEYS[word], r.astring())
    if word in ("BODY", "TEXT"):
        r.sp()
        return (word.lower(), r.astring())
    if word in _DATE_KEYS:
        r.sp()
        kind, sent = _DATE_KEYS[word]
        return ("date", kind, r.date(), sent)
    if word == "HEADER":
        r.sp()
        name = r.astring().decode("ascii", "replace").lower()
        r.sp()
        return ("header", name, r.astring())
    if word in ("KEYWORD", "UNKEYWORD"):
        r.sp()
        return ("keyword", r.atom(), word == "KEYWORD")
    if word in ("LARGER", "SMALLER"):
        r.sp()
        return (word.lower(), r.number())
    if word == "NOT":
        r.sp()
        r.depth += 1
        if r.depth > MAX_DEPTH:
            raise ParseError("too deeply nested")
        key = parseSearchKey(r)
        r.depth -= 1
        return ("not", key)
    if word == "OR":
        r.depth += 1
        if r.depth > MAX_DEPTH:
            raise ParseError("too deeply nested")
        r.sp()
        a = parseSearchKey(r)
        r.sp()
        b = parseSearchKey(r)
        r.depth -= 1
        return ("or", a, b)
    if word == "UID":
        r.sp()
        return ("uid", r.sequenceSet())

    raise ParseError(f"unknown search key {word}")


def parseCommand(segments) -> Command:
    """
    Parse one complete command given as its segments (line, literal, line,
    ...).  Raises L{ParseError} (with C{.tag} set when the tag was read).
    """
    r = _Reader(segments)
    tag = r._run(_IS_TAG)
    if not tag:
        raise ParseError("missing tag")
    tag = tag.decode("ascii")
    try:
        r.sp()
        name = r._run(_IS_ATOM).decode("ascii").upper()
        if not name:
            raise ParseError("missing command")
        uid = False
        if name == "UID":
            r.sp()
            name = r.atom().upper()
            grammar = _UID_GRAMMARS.get(name)
            uid = True
        else:
            grammar = _GRAMMARS.get(name)
        if grammar is None:
            raise ParseError("unknown command")
        args: dict = {}
        grammar(r, args)
        r.end()
    except ParseError as e:
        e.tag = tag
        raise
    return Command(tag, name, args, uid)


# --------------------------------------------------------------------------
# the framing parser


class CommandParser:
    """
    Incremental parser: L{feed} bytes, then call L{nextEvent} until it
    returns C{None}.
    """

    def __init__(self, maxLine=MAX_LINE, maxLiteral=MAX_LITERAL):
        self.maxLine = maxLine
        self.maxLiteral = maxLiteral
        self._buf = bytearray()
        self._segments: list = []
        self._need = None  # literal octets still expected (None: not in a literal)
        self._discard = 0  # literal octets to throw away
        self._discarding = None  # the BadCommand to report once discarding ends
        self._skipLine = None  # BadCommand to report after skipping to LF
        self._rawLine = False
        self._lineBytes = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def inLiteral(self) -> bool:
        return self._need is not None or self._discard > 0

    def feed(self, data: bytes) -> None:
        if self._discard:
            take = min(self._discard, len(data))
            self._discard -= take
            data = data[take:]
        self._buf += data

    def discardBuffered(self) -> None:
        """Forget everything received and not yet parsed (STARTTLS)."""
        self._buf.clear()
        self._reset()

    def takeBuffered(self) -> bytes:
        """Remove and return what was received and not yet parsed (COMPRESS starts after it)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def expectRawLine(self) -> None:
        """Return the next line as a L{RawLine} (an AUTHENTICATE response)."""
        self._rawLine = True

    def _reset(self):
        self._segments = []
        self._need = None
        self._lineBytes = 0

    def _tagOf(self, line: bytes) -> Optional[str]:
        m = re.match(rb"[^\x00-\x20(){%*\"\\\]+\x7f-\xff]+", bytes(line[:200]))
        if m is None:
            return None
        return m.group(0).decode("ascii")

    def nextEvent(self):
        buf = self._buf
        while True:
            if self._discard:
                return None
            if self._discarding is not None:
                # after a refused non-synchronising literal: skip the rest of the command
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > self.maxLine:
                        del buf[: len(buf) - 1]
                    return None
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                m = _LITERAL_AT_END.search(line)
                if m is not None:
                    self._discard = int(m.group(1))
                    take = min(self._discard, len(buf))
                    del buf[:take]
                    self._discard -= take
                    continue
                event, self._discarding = self._discarding, None
                self._reset()
                return event
            if self._skipLine is not None:
                nl = buf.find(b"\n")
                if nl < 0:
                    buf.clear()
                    return None
                del buf[: nl + 1]
                event, self._skipLine = self._skipLine, None
                self._reset()
                return event
            if self._need is not None:
                if len(buf) < self._need:
                    return None
                self._segments.append(_Literal(buf[: self._need]))
                del buf[: self._need]
                self._need = None
                continue
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > self.maxLine:
                    tag = self._tagOf(self._segments[0] if self._segments else buf)
                    self._skipLine = BadCommand(tag, "Line too long")
                    self._rawLine = False
                    buf.clear()
                return None
            if nl > self.maxLine:
                tag = self._tagOf(self._segments[0] if self._segments else buf)
                del buf[: nl + 1]
                self._reset()
                self._rawLine = False
                return BadCommand(tag, "Line too long")
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._rawLine:
                self._rawLine = False
                return RawLine(line)
            self._lineBytes += len(line)
            if self._lineBytes > self.maxLine * 4:
                tag = self._tagOf(self._segments[0] if self._segments else line)
                self._reset()
                m = _LITERAL_AT_END.search(line)
                if m is not None:
                    return self._refuseLiteral(tag, m, "Command too long")
                return BadCommand(tag, "Command too long")
            self._segments.append(line)
            m = _LITERAL_AT_END.search(line)
            if m is None:
                segments, self._segments = self._segments, []
                self._lineBytes = 0
                return self._parse(segments)
            size = int(m.group(1))
            tag = self._tagOf(self._segments[0])
            if size > self.maxLiteral:
                self._reset()
                return self._refuseLiteral(tag, m, "Literal too big", code="TOOBIG")
            if len(self._segments) // 2 >= MAX_LITERALS_PER_COMMAND:
                self._reset()
                return self._refuseLiteral(tag, m, "Too many literals")
            self._need = size
            if not m.group(2):
                return NeedContinuation()

    def _refuseLiteral(self, tag, m, text, code=None):
        """Refuse a literal: unread if synchronising, discarded if not."""
        event = BadCommand(tag, text, no=code is not None, code=code)
        if not m.group(2):
            # The client waits for "+" before sending it: nothing to skip.
            return event
        self._discard = int(m.group(1))
        take = min(self._discard, len(self._buf))
        del self._buf[:take]
        self._discard -= take
        self._discarding = event
        return self.nextEvent()

    def _parse(self, segments):
        try:
            return parseCommand(segments)
        except ParseError as e:
            tag = getattr(e, "tag", None)
            if tag is None:
                tag = self._tagOf(segments[0])
            return BadCommand(tag, e.text)
        except (ValueError, IndexError, UnicodeError) as e:
            return BadCommand(self._tagOf(segments[0]), "Syntax error")


# --------------------------------------------------------------------------
# response encoding


def quoted(data: bytes) -> bytes:
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def literal(data: bytes) -> bytes:
    """
    A literal.  Its octets are C{CHAR8} (%x01-ff, RFC 3501 §9): a NUL in
    C{data} (a message stored from a BINARY APPEND or BINARYMIME mail) goes
    out as 0x80, which keeps every size and offset; C{BINARY[]} sends the
    octets as they are, in a literal8 (see L{mailplat.imap.fetch.literal8}).
    """
    if b"\x00" in data:
        data = data.replace(b"\x00", b"\x80")
    return b"{%d}\r\n" % len(data) + data


_NEEDS_LITERAL = re.compile(rb"[\x00\r\n\x80-\xff]")


def string(data) -> bytes:
    """A quoted string, or a literal when quoting cannot carry it."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if len(data) > 4096 or _NEEDS_LITERAL.search(data):
        return literal(data)
    return quoted(data)


def nstring(data) -> bytes:
    if data is None:
        return b"NIL"
    return string(data)


def astring(data) -> bytes:
    """An atom when possible, else a string."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if data and all(_IS_ASTRING[c] for c in data) and data.upper() != b"NIL":
        return data
    return string(data)


def formatFlags(flags) -> bytes:
    return b"(" + b" ".join(f.encode("utf-8") for f in flags) + b")"


_FLAG_ORDER = {f: i for i, f in enumerate(("\\Recent",) + SYSTEM_FLAGS)}


def _flagKey(f):
    return (_FLAG_ORDER.get(f, 99), f)


def sortFlags(flags) -> list:
    """System flags first in canonical order, then keywords sorted."""
    return sorted(flags, key=_flagKey)


_flagListCache: dict = {}


def flagList(flags) -> bytes:
    """C{formatFlags(sortFlags(flags))}, remembered for the few sets a server sees (C{flags} hashable)."""
    value = _flagListCache.get(flags)
    if value is None:
        value = formatFlags(sortFlags(flags))
        if len(_flagListCache) < 4096:
            _flagListCache[flags] = value
    return value


def fetchResponse(seq: int, items) -> bytes:
    """C{* seq FETCH (name value ...)} from C{(name, encodedValue)} pairs."""
    body = b" ".join(name + b" " + value for name, value in items)
    return b"* %d FETCH (%s)\r\n" % (seq, body)


def continuation(data: bytes = b"") -> bytes:
    return b"+ " + data + b"\r\n"


# --------------------------------------------------------------------------
# modified UTF-7 (RFC 3501 5.1.3)


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=").replace("/", ",")


def encodeMailbox(name: str) -> str:
    """Unicode mailbox name -> modified UTF-7 (ASCII)."""
    out = []
    run = []

    def flush():
        if run:
            out.append("&" + _b64encode("".join(run).encode("utf-16-be")) + "-")
            run.clear()

    for ch in name:
        o = ord(ch)
        if 0x20 <= o <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    flush()
    return "".join(out)


_MUTF7_B64 = re.compile(r"[A-Za-z0-9+,]*")


def decodeMailbox(name) -> str:
    """
    Modified UTF-7 -> Unicode.  Raises C{ValueError} for anything RFC 3501
    forbids: unterminated shifts, non-printable ASCII, bad base64, printable
    ASCII or an empty run inside a shift, non-zero padding bits, unpaired
    surrogates.
    """
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).decode("ascii")
    out = []
    i = 0
    n = len(name)
    while i < n:
        ch = name[i]
        if not 0x20 <= ord(ch) <= 0x7E:
            raise ValueError("non-printable character in mailbox name")
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = name.find("-", i + 1)
        if end < 0:
            raise ValueError("unterminated modified UTF-7 shift")
        run = name[i + 1 : end]
        i = end + 1
        if not run:
            out.append("&")
            continue
        if not _MUTF7_B64.fullmatch(run) or len(run) % 4 == 1:
            raise ValueError("bad modified base64")
        raw = base64.b64decode(run.replace(",", "/") + "=" * (-len(run) % 4))
        if len(raw) % 2:
            raise ValueError("odd number of octets in modified UTF-7")
        if _b64encode(raw) != run:
            raise ValueError("non-canonical modified base64")
        text = raw.decode("utf-16-be", "strict")
        if any(0x20 <= ord(c) <= 0x7E for c in text):
            raise ValueError("printable ASCII encoded in modified UTF-7")
        out.append(text)
        if i < n and name[i] == "&" and name[i : i + 2] != "&-":
            # two adjacent shifts must have been one
            raise ValueError("adjacent modified UTF-7 shifts")
    return "".join(out)


def decodeMailboxName(raw: bytes, allowEmpty=False) -> str:
    """A mailbox name from the wire: modified UTF-7, or UTF-8 if 8-bit."""
    if not raw:
        if allowEmpty:
            return ""
        raise ParseError("empty mailbox name")
    try:
        if any(c > 0x7F for c in raw):
            return raw.decode("utf-8")
        return decodeMailbox(raw)
    except (ValueError, UnicodeError):
        raise ParseError("mailbox name is not valid modified UTF-7")
