"""
Message analysis done once at delivery and cached by the store.

L{analyze} takes the raw bytes of a message and returns a JSON-serialisable
dict describing it; stores keep it (C{MessageMeta.structure}) so that IMAP
ENVELOPE, BODYSTRUCTURE, BODY[section] offsets and header searches never
re-parse the message.

What it implements: RFC 5322 header fields (unfolding, address lists with
group syntax and obsolete routes), RFC 2045/2046 MIME entities (Content-*
fields, multipart boundaries with transport padding, preamble and epilogue,
default types including C{message/rfc822} inside C{multipart/digest}),
C{message/rfc822} (and C{message/global}) encapsulation, and the data that
RFC 3501 7.4.2 ENVELOPE and BODYSTRUCTURE need.

The result::

    {"version": STRUCTURE_VERSION,
     "size": octets,
     "headers": [[name, value], ...],     # top-level, unfolded, in order
     "envelope": ENVELOPE,
     "body": PART}

    ENVELOPE = {"date", "subject", "in-reply-to", "message-id": str or None,
                "from", "sender", "reply-to", "to", "cc", "bcc":
                    None or [[name, adl, mailbox, host], ...]}
        (a group is [None, None, groupname, None] ... [None, None, None, None];
         values are raw: RFC 2047 encoded-words are kept as they are)

    PART = {"type", "subtype": lower-case str,
            "params": [[name, value], ...] (names lower-case, values unquoted),
            "id", "description", "md5", "location": str or None,
            "encoding": upper-case str ("7BIT" by default),
            "size": octets of the body, "lines": for text/* and message/rfc822,
            "disposition": None or [value, [[name, value], ...]],
            "language": None or [str, ...],
            "offsets": [headerStart, bodyStart, end] into the raw message,
            "parts": [PART, ...]               # multipart/* only
            "envelope": ENVELOPE, "body": PART # message/rfc822 only}

For the top-level body (and the body of an encapsulated message) the
"MIME header" at C{offsets[0]:offsets[1]} is the message header itself.  A
part's body is C{raw[offsets[1]:offsets[2]]}; the line break before a
boundary delimiter belongs to the delimiter (RFC 2046 5.1.1).

Robustness (deviations, chosen over raising): bytes are scanned directly
(CRLF or bare LF); header values that are not UTF-8 are read as Latin-1; an
entity whose first line is not a header field has no header; a multipart
without a boundary parameter is treated as text/plain; a multipart whose
boundary never occurs gets one header-less text/plain part holding its
body; a missing close delimiter ends the last part at the end of the
enclosing entity; nesting beyond L{MAX_DEPTH} levels or more than
L{MAX_PARTS} parts turns the remaining multiparts and messages into
C{application/octet-stream} leaves; C{message/rfc822} with a base64 or
quoted-printable encoding is a leaf.  C{md5} is always C{None}.
"""

from __future__ import annotations

import re

STRUCTURE_VERSION = 1

#: Deepest nesting of multiparts and encapsulated messages analysed.
MAX_DEPTH = 50
#: Most body parts analysed in one message.
MAX_PARTS = 5000

_FIELD_START = re.compile(rb"[!-9;-~]+[ \t]*:")

ADDRESS_FIELDS = ("from", "sender", "reply-to", "to", "cc", "bcc")


def text(value: bytes) -> str:
    """Header bytes as text: UTF-8 if valid, else Latin-1 (lossless)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def countLines(raw: bytes, start: int, end: int) -> int:
    """Lines in C{raw[start:end]}; a last line without a line break counts."""
    if end <= start:
        return 0
    n = raw.count(b"\n", start, end)
    if raw[end - 1] != 0x0A:
        n += 1
    return n


# --------------------------------------------------------------------------
# header fields


def splitHeader(raw: bytes, start: int, end: int, top: bool = False):
    """
    Scan the header of the entity at C{raw[start:end]}.  Returns
    C{(fields, bodyStart)} where C{fields} is a list of C{(name, value)} with
    C{name} as written (str) and C{value} unfolded (bytes, not stripped).

    A body part that does not start with a header field has no header (RFC
    2046 5.1.1 wants an empty line there), nor does a message with no field
    before its first empty line.  A message (C{top}) whose first line is not
    a field (an mbox C{From } line, a stray folded line) but which has fields
    after it has its header up to the first empty line (RFC 5322 2.1): the
    lines that are not fields are skipped, as anywhere else in a header.
    """
    if start >= end:
        return [], start
    first = raw[start]
    if first == 0x0A:
        return [], start + 1
    if first == 0x0D and start + 1 < end and raw[start + 1] == 0x0A:
        return [], start + 2
    if not _FIELD_START.match(raw, start, end) and not (top and _fieldBeforeBlank(raw, start, end)):
        return [], start
    fields = []  # (name, [value chunks])
    pos = start
    bodyStart = end
    while pos < end:
        nl = raw.find(b"\n", pos, end)
        lineEnd = end if nl < 0 else nl + 1
        content = raw[pos : nl if nl >= 0 else end]
        if content.endswith(b"\r"):
            content = content[:-1]
        if not content:
            bodyStart = lineEnd
            break
        if content[0] in (0x20, 0x09):
            if fields:
                fields[-1][1].append(content)
        elif _FIELD_START.match(content):
            colon = content.find(b":")
            fields.append((text(content[:colon].rstrip(b" \t")), [content[colon + 1 :]]))
        pos = lineEnd
    return [(name, b"".join(chunks)) for name, chunks in fields], bodyStart


def _fieldBeforeBlank(raw: bytes, start: int, end: int, limit: int = 65536) -> bool:
    """Whether a line of C{raw[start:end]} before the first empty one (within C{limit} octets) starts a field."""
    pos, stop = start, min(end, start + limit)
    while pos < stop:
        nl = raw.find(b"\n", pos, stop)
        lineEnd = stop if nl < 0 else nl + 1
        if raw[pos:lineEnd] in (b"\n", b"\r\n"):
            return False
        if _FIELD_START.match(raw, pos, lineEnd):
            return True
        pos = lineEnd
    return False


def _fieldDict(fields):
    """First occurrence of each field, by lower-cased name."""
    out = {}
    for name, value in fields:
        out.setdefault(name.lower(), value.strip(b" \t\r\n"))
    return out


# --------------------------------------------------------------------------
# structured field values: tokens, parameters, addresses


def _tokenize(s: str, specials: str):
    """
    Tokens of an RFC 5322/2045 structured value: C{("q", text)} quoted
    strings (unescaped), C{("c", text)} comments, C{("s", char)} specials,
    C{("a", text)} atoms (domain literals included).
    """
    toks = []
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c in " \t\r\n":
            i += 1
        elif c == '"':
            i += 1
            buf = []
            while i < n and s[i] != '"':
                if s[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(s[i])
                i += 1
            i += 1
            toks.append(("q", "".join(buf)))
        elif c == "(":
            depth = 0
            buf = []
            while i < n:
                ch = s[i]
                if ch == "\\" and i + 1 < n:
                    buf.append(s[i + 1])
                    i += 2
                    continue
                if ch == "(":
                    depth += 1
                    if depth > 1:
                        buf.append(ch)
                elif ch == ")":
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                    buf.append(ch)
                else:
                    buf.append(ch)
                i += 1
            toks.append(("c", "".join(buf)))
        elif c == "[":
            j = s.find("]", i)
            j = n if j < 0 else j + 1
            toks.append(("a", s[i:j]))
            i = j
        elif c in specials:
            toks.append(("s", c))
            i += 1
        else:
            j = i
            while j < n and s[j] not in specials and s[j] not in ' \t\r\n"(':
                j += 1
            toks.append(("a", s[i:j]))
            i = j
    return toks


_TSPECIALS = "()<>@,;:\\/[]?="


def parseContentValue(value: str):
    """
    C{'type/subtype; a=b'} or C{'inline; filename=x'} -> (first token(s),
    params).  Returns C{(main, [[name, value], ...])} where C{main} is the
    text before the first C{;} with comments removed.
    """
    toks = _tokenize(value, ";=")
    main = []
    i = 0
    while i < len(toks) and toks[i] != ("s", ";"):
        if toks[i][0] != "c":
            main.append(toks[i][1])
        i += 1
    params = []
    while i < len(toks):
        # at a ";"
        i += 1
        name = []
        while i < len(toks) and toks[i] not in (("s", "="), ("s", ";")):
            if toks[i][0] != "c":
                name.append(toks[i][1])
            i += 1
        if i < len(toks) and toks[i] == ("s", "="):
            i += 1
            val = []
            while i < len(toks) and toks[i] != ("s", ";"):
                if toks[i][0] != "c":
                    val.append(toks[i][1])
                i += 1
            pname = "".join(name).strip().lower()
            if pname and len(params) < 100:
                params.append([pname, "".join(val)])
    return "".join(main).strip(), params


def _param(params, name):
    for n, v in params:
        if n == name:
            return v
    return None


def _phrase(toks) -> str | None:
    words = []
    for kind, value in toks:
        if kind == "c":
            continue
        if kind == "s" and value == "." and words:
            words[-1] += "."
            continue
        words.append(value)
    return " ".join(words) if words else None


def _addrSpec(toks):
    """Tokens of C{local@domain} -> (mailbox, host)."""
    toks = [t for t in toks if t[0] != "c"]
    at = None
    for i in range(len(toks) - 1, -1, -1):
        if toks[i] == ("s", "@"):
            at = i
            break
    if at is None:
        local = "".join(v for _, v in toks)
        return local, ""
    local = "".join(v for _, v in toks[:at])
    host = "".join(v for _, v in toks[at + 1 :])
    return local, host


def _mailbox(toks):
    """One mailbox (name-addr or addr-spec) -> [name, adl, mailbox, host]."""
    if ("s", "<") in toks:
        lt = toks.index(("s", "<"))
        name = _phrase(toks[:lt])
        inner = []
        for t in toks[lt + 1 :]:
            if t == ("s", ">"):
                break
            inner.append(t)
        adl = None
        if ("s", ":") in inner:
            colon = inner.index(("s", ":"))
            route = [v for k, v in inner[:colon] if k != "c"]
            adl = "".join(route) or None
            inner = inner[colon + 1 :]
        local, host = _addrSpec(inner)
        if name is None:
            comments = [v for k, v in toks[lt:] if k == "c"]
            name = comments[-1] if comments else None
        return [name, adl, local, host]
    local, host = _addrSpec(toks)
    comments = [v for k, v in toks if k == "c"]
    return [comments[-1] if comments else None, None, local, host]


def parseAddressList(value: str):
    """
    An RFC 5322 address list -> IMAP address structures (see the module
    docstring), or C{None} when there is no address at all.
    """
    toks = _tokenize(value, "<>,:;@.")
    out = []
    inGroup = False
    i = 0
    n = len(toks)
    while i < n and len(out) < 10000:
        j = i
        angle = False
        while j < n:
            t = toks[j]
            if t == ("s", "<"):
                angle = True
            elif t == ("s", ">"):
                angle = False
            elif not angle and t in (("s", ","), ("s", ";"), ("s", ":")):
                break
            j += 1
        stop = toks[j] if j < n else None
        segment = toks[i:j]
        if stop == ("s", ":") and not inGroup:
            out.append([None, None, _phrase(segment) or "", None])
            inGroup = True
        elif stop == ("s", ":"):
            # a stray colon inside a group: keep what is there as a mailbox
            if any(k != "c" for k, _ in segment):
                out.append(_mailbox(segment))
        else:
            if any(k != "c" for k, _ in segment):
                out.append(_mailbox(segment))
            if stop == ("s", ";") and inGroup:
                out.append([None, None, None, None])
                inGroup = False
        i = j + 1
    if inGroup:
        out.append([None, None, None, None])
    return out or None


def envelope(fields) -> dict:
    """The RFC 3501 ENVELOPE data from a header's fields."""
    first = _fieldDict(fields)
    env = {}
    for name in ("date", "subject", "in-reply-to", "message-id"):
        value = first.get(name)
        env[name] = text(value) if value is not None else None
    for name in ADDRESS_FIELDS:
        value = first.get(name)
        env[name] = parseAddressList(text(value)) if value is not None else None
    return env


# --------------------------------------------------------------------------
# entities


class _Analyzer:
    def __init__(self, raw: bytes):
        self.raw = raw
        self.parts = 0

    def entity(self, start, end, depth, defaultType=("text", "plain"), message=False):
        """Analyse the entity (header + body) at C{raw[start:end]}, a whole C{message} or a body part; returns (part, fields)."""
        fields, bodyStart = splitHeader(self.raw, start, end, top=message)
        return self.part(fields, start, bodyStart, end, depth, defaultType), fields

    def part(self, fields, headerStart, bodyStart, end, depth, defaultType):
        raw = self.raw
        self.parts += 1
        first = _fieldDict(fields)
        ctype = first.get("content-type")
        params = []
        mtype, subtype = defaultType
        if ctype is not None:
            main, params = parseContentValue(text(ctype))
            if "/" in main:
                t, _, s = main.partition("/")
                t, s = t.strip().lower(), s.strip().lower()
                if t and s:
                    mtype, subtype = t, s
                else:
                    mtype, subtype, params = "text", "plain", []
            else:
                mtype, subtype, params = "text", "plain", []
        elif (mtype, subtype) == ("text", "plain"):
            params = [["charset", "us-ascii"]]
        encoding = first.get("content-transfer-encoding")
        encoding = text(encoding).strip().upper() if encoding else "7BIT"
        if not encoding:
            encoding = "7BIT"
        disposition = first.get("content-disposition")
        if disposition is not None:
            dmain, dparams = parseContentValue(text(disposition))
            disposition = [dmain.lower(), dparams] if dmain else None
        language = first.get("content-language")
        if language is not None:
            language = [x.strip() for x in text(language).split(",") if x.strip()] or None

        def opt(name):
            value = first.get(name)
            return text(value) if value is not None else None

        part = {
            "type": mtype,
            "subtype": subtype,
            "params": params,
            "id": opt("content-id"),
            "description": opt("content-description"),
            "encoding": encoding,
            "size": end - bodyStart,
            "md5": None,
            "disposition": disposition,
            "language": language,
            "location": opt("content-location"),
            "offsets": [headerStart, bodyStart, end],
        }
        tooDeep = depth >= MAX_DEPTH or self.parts >= MAX_PARTS
        if mtype == "multipart":
            boundary = _param(params, "boundary")
            if not boundary:
                part.update(type="text", subtype="plain", params=[])
                part["lines"] = countLines(raw, bodyStart, end)
            elif tooDeep:
                part.update(type="application", subtype="octet-stream")
            else:
                inner = ("message", "rfc822") if subtype == "digest" else ("text", "plain")
                part["parts"] = self.multipart(boundary, bodyStart, end, depth + 1, inner)
        elif mtype == "message" and subtype in ("rfc822", "global") and encoding in ("7BIT", "8BIT", "BINARY"):
            if tooDeep:
                part.update(type="application", subtype="octet-stream")
            else:
                body, nestedFields = self.entity(bodyStart, end, depth + 1, message=True)
                part["envelope"] = envelope(nestedFields)
                part["body"] = body
                part["lines"] = countLines(raw, bodyStart, end)
        elif mtype == "message" and subtype == "rfc822":
            # Encoded (base64, quoted-printable): RFC 2046 5.2.1 forbids it
            # and the message inside is not parsed, but IMAP's grammar still
            # wants an envelope, a body and a line count (RFC 3501 7.4.2):
            # an empty envelope and an empty text/plain body stand in.
            part["envelope"] = envelope([])
            part["body"] = {
                "type": "text", "subtype": "plain", "params": [["charset", "us-ascii"]], "id": None,
                "description": None, "encoding": "7BIT", "size": 0, "md5": None, "disposition": None,
                "language": None, "location": None, "offsets": [end, end, end], "lines": 0,
            }
            part["lines"] = countLines(raw, bodyStart, end)
        elif mtype == "text":
            part["lines"] = countLines(raw, bodyStart, end)
        return part

    def multipart(self, boundary, start, end, depth, defaultType):
        raw = self.raw
        delim = b"--" + boundary.encode("utf-8", "replace")
        bounds = []  # (partStart, partEnd)
        current = None
        pos = start
        closed = False
        while pos < end:
            idx = raw.find(delim, pos, end)
            if idx < 0:
                break
            pos = idx + len(delim)
            if idx != start and raw[idx - 1] != 0x0A:
                continue
            nl = raw.find(b"\n", pos, end)
            lineEnd = end if nl < 0 else nl + 1
            rest = raw[pos:lineEnd]
            close = rest.startswith(b"--")
            if close:
                rest = rest[2:]
            if rest.strip(b" \t\r\n"):
                continue  # a longer boundary sharing this prefix
            if current is not None:
                partEnd = idx
                if partEnd > current and raw[partEnd - 1] == 0x0A:
                    partEnd -= 1
                    if partEnd > current and raw[partEnd - 1] == 0x0D:
                        partEnd -= 1
                bounds.append((current, max(partEnd, current)))
                current = None
            if close:
                closed = True
                break
            if self.parts + len(bounds) >= MAX_PARTS:
                current = lineEnd
                break
            current = lineEnd
            pos = lineEnd
        if current is not None and not closed:
            bounds.append((current, end))
        if not bounds:
            # The boundary never occurs: the whole body is one text part.
            self.parts += 1
            return [
                {
                    "type": "text",
                    "subtype": "plain",
                    "params": [],
                    "id": None,
                    "description": None,
                    "encoding": "7BIT",
                    "size": end - start,
                    "lines": countLines(raw, start, end),
                    "md5": None,
                    "disposition": None,
                    "language": None,
                    "location": None,
                    "offsets": [start, start, end],
                }
            ]
        return [self.entity(s, e, depth, defaultType)[0] for s, e in bounds]


def analyze(raw: bytes) -> dict:
    """Analyse a whole message (see the module docstring for the result)."""
    raw = bytes(raw)
    a = _Analyzer(raw)
    body, fields = a.entity(0, len(raw), 0, message=True)
    return {
        "version": STRUCTURE_VERSION,
        "size": len(raw),
        "headers": [[name, text(value.strip(b" \t\r\n"))] for name, value in fields],
        "envelope": envelope(fields),
        "body": body,
    }


def children(node: dict) -> list:
    """
    The parts IMAP numbers below C{node} (RFC 3501 6.4.5): the parts of a
    multipart, or for an encapsulated message the parts of its body (the
    body itself when it is not a multipart).  C{node} may also be a whole
    analysis (the top-level message).
    """
    if "version" in node or "envelope" in node and "body" in node:
        body = node["body"]
        return body.get("parts") or [body]
    return node.get("parts") or []


def findPart(structure: dict, path) -> dict | None:
    """The part at IMAP part number C{path} (a tuple of ints), or C{None}."""
    node = structure
    for number in path:
        kids = children(node)
        if not 1 <= number <= len(kids):
            return None
        node = kids[number - 1]
    return node


# --------------------------------------------------------------------------
# index data: what stores keep per message so that SEARCH, SORT and THREAD
# never read message files


def decodeWords(value: str) -> str:
    """RFC 2047 encoded-words decoded (best effort; the value unchanged on error)."""
    if "=?" not in value:
        return value
    import email.header

    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except Exception:
        return value


_SUBJ_TRAILER = re.compile(r"(?:\s|\(fwd\))+$", re.IGNORECASE)
_SUBJ_BLOB = r"\[[^\[\]]*\]\s*"
_SUBJ_LEADER = re.compile(r"^(?:" + _SUBJ_BLOB + r")*(?:re|fwd?)\s*(?:" + _SUBJ_BLOB + r")?:\s*", re.IGNORECASE)
_SUBJ_BLOBONLY = re.compile(r"^" + _SUBJ_BLOB)
_SUBJ_FWD = re.compile(r"^\[fwd:(.*)\]$", re.IGNORECASE | re.DOTALL)


def baseSubject(subject) -> str:
    """
    The base subject of RFC 5256 section 2.1: RFC 2047 decoded, white space
    collapsed, C{Re:}/C{Fwd:} leaders, C{[blob]}s, C{(fwd)} trailers and
    C{[Fwd: ...]} wrappers removed, upper-cased for comparison.
    """
    return _baseSubject(subject)[0]


def subjectIsReply(subject) -> bool:
    """
    Whether extracting the base subject removed a reply or forward mark
    (C{Re:}/C{Fwd:} leader, C{(fwd)} trailer, C{[Fwd: ...]} wrapper): RFC
    5256 section 2.1's test of a reply.  A C{[blob]} alone (a list tag) is not one.
    """
    return _baseSubject(subject)[1]


def _baseSubject(subject):
    if not subject:
        return "", False
    s = re.sub(r"\s+", " ", decodeWords(subject)).strip()
    reply = False
    while True:
        while True:
            m = _SUBJ_TRAILER.search(s)
            if m is None or not m.group(0):
                break
            if "(fwd)" in m.group(0).lower():
                reply = True
            s = s[:m.start()]
        while True:
            t = _SUBJ_LEADER.sub("", s, count=1)
            if t != s:
                reply = True
            else:
                m = _SUBJ_BLOBONLY.match(s)
                if m is not None and s[m.end():]:
                    t = s[m.end():]
            if t == s:
                break
            s = t
        m = _SUBJ_FWD.match(s)
        if m is None:
            break
        reply = True
        s = m.group(1).strip()
    return s.upper(), reply


def _firstMailbox(addrs):
    for a in addrs or ():
        if a[2] is not None and a[3] is not None:
            return a
    return None


def sortAddress(addrs) -> str:
    """RFC 5256 sort key of an address list: the first mailbox's local part, upper-cased."""
    a = _firstMailbox(addrs)
    return (a[2] or "").upper() if a else ""


def displayAddress(addrs) -> str:
    """RFC 5957 display key: the first mailbox's decoded name, else its address."""
    a = _firstMailbox(addrs)
    if a is None:
        return ""
    if a[0]:
        return decodeWords(a[0]).strip().upper()
    return f"{a[2]}@{a[3]}".upper()


def parseDateHeader(value):
    """A Date field -> (POSIX seconds, day ordinal of its own date) or (None, None)."""
    if not value:
        return None, None
    import datetime
    import email.utils

    try:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None, None
        day = datetime.date(parsed[0], parsed[1], parsed[2]).toordinal()
        return float(email.utils.mktime_tz(parsed)), day
    except (ValueError, TypeError, OverflowError, IndexError):
        return None, None


_MSGID = re.compile(r"<[^<>\s]+>")


def messageIds(value) -> list:
    """The C{<id>}s in a Message-ID, In-Reply-To or References value."""
    return _MSGID.findall(value or "")


def headerText(structure) -> str:
    """Every top-level header field as C{name: value} lines, 2047-decoded and case-folded."""
    lines = []
    for name, value in structure.get("headers", ()):
        decoded = decodeWords(value)
        lines.append(f"{name.lower()}: {value}" + (f" {decoded}" if decoded != value else ""))
    return "\n".join(lines).casefold() + "\n"


def _transferDecode(data: bytes, encoding: str) -> bytes:
    import binascii
    import quopri

    try:
        if encoding == "BASE64":
            return binascii.a2b_base64(b"".join(data.split()))
        if encoding == "QUOTED-PRINTABLE":
            return quopri.decodestring(data)
    except (binascii.Error, ValueError):
        return data
    return data


def decodedBody(raw: bytes, part: dict) -> bytes:
    """A leaf part's body with its content-transfer-encoding undone (BINARY, RFC 3516)."""
    hs, bs, end = part["offsets"]
    return _transferDecode(raw[bs:end], part.get("encoding", "7BIT"))


def textParts(raw: bytes, part: dict, depth=0):
    """
    The decoded text of the C{text/*} leaves under C{part} and of nested
    message headers, one string each (transfer encoding and charset undone).
    """
    if depth > MAX_DEPTH:
        return
    if "parts" in part:
        for p in part["parts"]:
            yield from textParts(raw, p, depth + 1)
        return
    if "body" in part and "envelope" in part:
        hs, bs, _ = part["body"]["offsets"]
        yield text(raw[hs:bs])
        yield from textParts(raw, part["body"], depth + 1)
        return
    if part["type"] != "text":
        return
    data = decodedBody(raw, part)
    charset = _param(part["params"], "charset") or "utf-8"
    if charset.lower() in _ASCII_NAMES and not data.isascii():
        # Labelled US-ASCII (or not labelled: the default) yet 8-bit, as
        # 8BITMIME mail without MIME fields is: the octets' own charset,
        # UTF-8 when they are UTF-8, else ISO-8859-1, not U+FFFD for each.
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError:
            yield data.decode("latin-1")
        return
    try:
        yield data.decode(charset, "replace")
    except (LookupError, ValueError):  # unknown, or e.g. a NUL in the name
        yield data.decode("utf-8", "replace")


_ASCII_NAMES = frozenset({"us-ascii", "ascii", "ansi_x3.4-1968", "iso646-us", "us"})


def bodyText(raw: bytes, structure: dict) -> str:
    """
    What BODY search looks in, case-folded: the decoded text of every
    C{text/*} part and nested message header (content-transfer-encoding and
    charset undone); a body with no text part at all is taken as it is.
    """
    body = structure["body"]
    chunks = list(textParts(raw, body))
    if not chunks:
        hs, bs, end = body["offsets"]
        chunks = [raw[bs:end].decode("utf-8", "replace")]
    return "\n".join(chunks).casefold()


def indexFields(structure: dict) -> dict:
    """
    The per-message index a store keeps for SEARCH, SORT and THREAD (all
    text case-folded or upper-cased as noted)::

        subject, from, to, cc, bcc   header text, decoded and case-folded
        sentDate                      POSIX seconds of the Date field or None
        sentDay                       date ordinal of the Date field's own day or None
        sortSubject                   RFC 5256 base subject (upper case)
        sortFrom, sortTo, sortCc      RFC 5256 address keys
        displayFrom, displayTo        RFC 5957 display keys
        messageId, inReplyTo, references   for THREAD=REFERENCES
        isReply                       the subject had a reply/forward leader
    """
    env = structure.get("envelope") or {}
    fields = {}
    for name, value in structure.get("headers", ()):
        fields.setdefault(name.lower(), []).append(value)

    def joined(name):
        vals = fields.get(name)
        if not vals:
            return ""
        return "\n".join(v + (" " + decodeWords(v) if "=?" in v else "") for v in vals).casefold()

    sentDate, sentDay = parseDateHeader(env.get("date"))
    subject = env.get("subject") or ""
    base, isReply = _baseSubject(subject)
    ids = messageIds(env.get("message-id"))
    refs = messageIds(" ".join(fields.get("references", ())))
    return {
        "subject": joined("subject"),
        "from": joined("from"),
        "to": joined("to"),
        "cc": joined("cc"),
        "bcc": joined("bcc"),
        "sentDate": sentDate,
        "sentDay": sentDay,
        "sortSubject": base,
        "isReply": isReply,
        "sortFrom": sortAddress(env.get("from")),
        "sortTo": sortAddress(env.get("to")),
        "sortCc": sortAddress(env.get("cc")),
        "displayFrom": displayAddress(env.get("from")),
        "displayTo": displayAddress(env.get("to")),
        "messageId": ids[0] if ids else None,
        "inReplyTo": (messageIds(env.get("in-reply-to")) or [None])[0],
        "references": refs,
    }
