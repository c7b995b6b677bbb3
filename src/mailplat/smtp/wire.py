"""
The SMTP wire format, sans-IO: command lines in, parsed commands out; the
DATA body in, un-dot-stuffed content out; replies to bytes.  Nothing here
does I/O or keeps time, so every part can be driven by tests or a fuzzer.

Implemented:

  - RFC 5321 §2.3.8, §4.1.1: command lines end with CRLF only.  A bare LF or
    bare CR in a command line is an error (C{500 5.5.2}), never a line end
    that is silently accepted.  A bare LF does end the offending line so a
    client that sends LF-only lines gets an error per line instead of
    waiting forever; the line itself is never executed.
  - RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including the
    CRLF (configurable); a longer line answers C{500 5.5.2 Line too long}
    once and is skipped up to its end; the session stays usable.  RFC 4954
    §4 raises the limit to 12288 octets for AUTH lines.
  - RFC 5321 §4.1.2: the C{Path}, C{Mailbox}, C{Domain} and
    C{address-literal} grammar, C{Mail-parameters}/C{Rcpt-parameters}
    (keywords upper-cased), the null reverse-path C{<>}, quoted local parts,
    C{<Postmaster>}, and source routes (C{<@a,@b:user@d>}), which are
    checked and then dropped as §4.1.1.3 and appendix C allow.  The length
    limits of §4.5.3.1 (local part 64, domain 255, path 256 octets) apply.
  - RFC 5321 §4.5.2: DATA ends only at C{<CRLF>.<CRLF>}; a leading dot is
    removed from every other line that starts with one.  C{<LF>.<LF>},
    C{<CR>.<CR>} and C{<LF>.<CRLF>} are content, never the end (the SMTP
    smuggling defence).  Bare CR or LF in the content makes the message
    refused at the end (C{550 5.6.0}) unless the decoder is told to convert
    them to CRLF.
  - RFC 1870: a hard message size limit (C{552 5.3.4}).
  - RFC 2034 / RFC 3463: L{Reply} puts the enhanced status code on every
    line of a multi-line reply.  The session leaves it out where RFC 2034
    §3 says to (the greeting and the replies to HELO/EHLO); L{Reply.encode}
    leaves it out of 3xx replies (354, and RFC 4954's 334), because RFC 3463
    has no class 3 codes.

Deviations, all on the lenient side and all documented here:

  - Whitespace after the colon of C{MAIL FROM:} / C{RCPT TO:} (C{MAIL FROM:
    <a@b>}), more than one space between verb and arguments or between
    parameters, and trailing spaces are accepted; they are common in the
    wild and unambiguous.  A space before the colon and a path without
    angle brackets are still refused.
  - In the "normalise bare line endings" mode, the character after a bare
    LF is not treated as the start of a line, so dot-unstuffing does not
    apply to it; the end of data is still only C{<CRLF>.<CRLF>}.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from mailplat.auth.sasl import decodeResponse

__all__ = [
    "AUTH_LINE_LENGTH",
    "COMMAND_LINE_LENGTH",
    "EXTENDED_LINE_LENGTHS",
    "TEXT_LINE_LENGTH",
    "Command",
    "ContentChecker",
    "DataDecoder",
    "LineReader",
    "Path",
    "Reply",
    "SMTPError",
    "checkDSNMailParams",
    "checkDSNRcptParams",
    "decodeBase64",
    "decodeXtext",
    "encodeXtext",
    "isXtext",
    "parseBDAT",
    "parseCommand",
    "parseMail",
    "parseMailbox",
    "parseParameters",
    "parseRcpt",
]

COMMAND_LINE_LENGTH = 512
TEXT_LINE_LENGTH = 1000
AUTH_LINE_LENGTH = 12288
#: Command lines the advertised extensions make longer than 512 octets (RFC
#: 5321 4.5.3.1.4): MAIL by SIZE (26, RFC 1870), RET and ENVID (110, RFC
#: 3461), AUTH= (500, RFC 4954), BODY= (16, RFC 6152) and SMTPUTF8 (10, RFC
#: 6531); RCPT by NOTIFY and ORCPT (500, RFC 3461); AUTH's initial response.
EXTENDED_LINE_LENGTHS = {
    b"AUTH": AUTH_LINE_LENGTH,
    b"MAIL": COMMAND_LINE_LENGTH + 26 + 110 + 500 + 16 + 10,
    b"RCPT": COMMAND_LINE_LENGTH + 500,
}
MAX_PARAMETERS = 16

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


# -- replies -----------------------------------------------------------------


_UNPRINTABLE = re.compile(r"[^ -~]")


def _cleanText(line: str) -> str:
    # A reply line carries printable text only: a hook or a router must not
    # be able to add reply lines or control characters to the stream.
    return _UNPRINTABLE.sub("?", line)


@dataclass(frozen=True)
class Reply:
    """
    One SMTP reply: C{code} (3 digits), C{enhanced} (RFC 3463 C{"x.y.z"}, or
    C{""} for none) and C{text} (a C{str}, split at line breaks, or a sequence
    of lines).
    """

    code: int
    enhanced: str = ""
    text: object = ""

    def lines(self) -> list:
        if isinstance(self.text, str):
            lines = self.text.splitlines() or [""]
        else:
            lines = [str(t) for t in self.text] or [""]
        return [_cleanText(line) for line in lines]

    def encode(self, enhanced: bool = True) -> bytes:
        """
        The reply on the wire.  With C{enhanced} (the default) the enhanced
        status code starts the text of every line (RFC 2034 §3); it is never
        sent with a 3xx reply.
        """
        code = int(self.code)
        if not 200 <= code <= 599:
            raise ValueError(f"not an SMTP reply code: {code}")
        prefix = ""
        if enhanced and self.enhanced and code // 100 != 3:
            prefix = self.enhanced + " "
        lines = self.lines()
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{code}{sep}{prefix}{line}")
        return ("\r\n".join(out) + "\r\n").encode("ascii")

    @property
    def positive(self) -> bool:
        return self.code < 400


class SMTPError(Exception):
    """A protocol error with the reply to send for it."""

    def __init__(self, code: int, enhanced: str, text: str):
        super().__init__(f"{code} {enhanced} {text}")
        self.reply = Reply(code, enhanced, text)


LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BARE_LF = Reply(500, "5.5.2", "Bare LF in command line: lines must end with CRLF")
BARE_CR = Reply(500, "5.5.2", "Bare CR in command line: lines must end with CRLF")
NUL_IN_LINE = Reply(500, "5.5.2", "NUL character in command line")


# -- command lines -------------------------------------------------------------


class LineReader:
    """
    Splits the input stream into command lines.

    L{feed} appends bytes; L{next} returns the next line (C{bytes} without
    the CRLF), an error L{Reply} for a line that is refused, or C{None} when
    no complete line is buffered.  The caller pulls one line at a time, so it
    can switch to reading a DATA body (L{takeBuffer}) or throw away what was
    pipelined after STARTTLS (L{clear}) at exactly the right byte.
    """

    def __init__(self, maxLength: int = COMMAND_LINE_LENGTH, extended=None):
        self.maxLength = maxLength
        # Verbs whose lines may be longer, e.g. {b"AUTH": 12288} (RFC 4954 §4).
        self.extended = {k.upper(): v for k, v in (extended or {}).items()}
        self._buf = bytearray()
        self._skipping = False

    def _hardLimit(self) -> int:
        return max([self.maxLength, *self.extended.values()])

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def clear(self) -> int:
        """Throw away everything buffered; returns how many bytes that was."""
        n = len(self._buf)
        self._buf = bytearray()
        self._skipping = False
        return n

    def take(self, n: int) -> bytes:
        """Up to C{n} buffered bytes, removed from the reader (for a BDAT chunk)."""
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def takeBuffer(self) -> bytes:
        """Everything buffered, removed from the reader (for a DATA body)."""
        data = bytes(self._buf)
        self.clear()
        return data

    def _limitFor(self, line) -> int:
        for verb, limit in self.extended.items():
            n = len(verb)
            if line[:n].upper() == verb and (len(line) == n or line[n : n + 1] in (b" ", b"\r", b"\n")):
                return max(limit, self.maxLength)
        return self.maxLength

    def next(self):
        while True:
            buf = self._buf
            i = buf.find(b"\n")
            if self._skipping:
                if i < 0:
                    buf.clear()
                    return None
                del buf[: i + 1]
                self._skipping = False
                continue
            if i < 0:
                # No line end yet: a partial line longer than any allowed line
                # is refused now (not when it ends, which may be never) and the
                # rest of it is skipped.
                if len(buf) >= self._hardLimit():
                    buf.clear()
                    self._skipping = True
                    return LINE_TOO_LONG
                return None
            raw = bytes(buf[: i + 1])
            del buf[: i + 1]
            if len(raw) > self._limitFor(raw):
                return LINE_TOO_LONG
            if len(raw) < 2 or raw[-2] != 0x0D:
                return BARE_LF
            line = raw[:-2]
            if b"\r" in line:
                return BARE_CR
            if b"\x00" in line:
                return NUL_IN_LINE
            return line


@dataclass(frozen=True)
class Command:
    """A command line: C{verb} upper-cased, C{args} the rest (C{str})."""

    verb: str
    args: str = ""


_VERB = re.compile(r"[A-Za-z][A-Za-z0-9]{0,15}\Z")


def parseCommand(line: bytes) -> Command:
    """
    Split a command line into verb and arguments.  Raises L{SMTPError}
    C{500 5.5.1} for something that is not a command at all.  Arguments are
    decoded as UTF-8 (invalid bytes become U+FFFD, which no parser accepts).
    """
    text = line.decode("utf-8", "replace")
    verb, _, args = text.partition(" ")
    if not _VERB.match(verb):
        raise SMTPError(500, "5.5.1", "Command unrecognized")
    return Command(verb.upper(), args.strip(" \t"))


# -- addresses -----------------------------------------------------------------

_ATEXT = "A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_SUB_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*\Z")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?:[\x21-\x5a\x5e-\x7e]+\Z")


def _isASCII(s: str) -> bool:
    return s.isascii()


def isDomain(text: str) -> bool:
    """RFC 5321 C{Domain} (LDH labels), at most 255 octets."""
    return len(text) <= MAX_DOMAIN and bool(_DOMAIN.match(text))


def isUTF8Domain(text: str) -> bool:
    """
    RFC 6531 §3.3 C{Domain}: LDH labels or U-labels (checked by converting
    them to A-labels), at most 255 octets as A-labels.
    """
    if text.isascii():
        return isDomain(text)
    if "\ufffd" in text:
        return False
    try:
        ascii = text.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return isDomain(ascii)


def isAddressLiteral(text: str) -> bool:
    """RFC 5321 §4.1.3 C{address-literal}: C{[1.2.3.4]}, C{[IPv6:...]} or a general literal."""
    if len(text) < 3 or text[0] != "[" or text[-1] != "]":
        return False
    inner = text[1:-1]
    if inner[:5].upper() == "IPV6:":
        if "%" in inner:
            return False  # a zone ID (which ipaddress accepts) is not in the IPv6-addr grammar
        try:
            ipaddress.IPv6Address(inner[5:])
            return True
        except ValueError:
            return False
    if ":" in inner:
        return bool(_GENERAL_LITERAL.match(inner))
    # IPv4-address-literal = Snum 3("." Snum), Snum = 1*3DIGIT, 0 to 255:
    # leading zeros allowed ("[192.000.002.001]"), which ipaddress refuses.
    parts = inner.split(".")
    return len(parts) == 4 and all(
        1 <= len(p) <= 3 and p.isascii() and p.isdigit() and int(p) <= 255 for p in parts
    )


# RFC 6531 §3.3: atext and qtextSMTP are extended with UTF8-non-ascii.
_U_ATEXT = _ATEXT + "\u0080-\U0010ffff"
_U_DOT_STRING = re.compile(rf"[{_U_ATEXT}]+(?:\.[{_U_ATEXT}]+)*\Z")
_U_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"\Z')


class RelayTrick(ValueError):
    """An address with more than one unquoted C{@}: the classic relay test C{user@other@ours}."""


def parseMailbox(text: str, utf8: bool = False) -> str:
    """
    Check an RFC 5321 C{Mailbox} (C{Local-part "@" (Domain / address-literal)})
    and return it.  A quoted local part that is also a valid dot-string is
    returned unquoted (RFC 5321 §4.1.2 treats the two as the same mailbox).
    One trailing dot after the domain is dropped (C{user@example.org.}).

    With C{utf8} (the transaction asked for SMTPUTF8, RFC 6531) the local
    part and the domain may hold UTF-8; without it a non-ASCII address
    raises C{UnicodeError}.  Raises C{ValueError} with a reason otherwise.
    """
    if not utf8 and not text.isascii():
        raise UnicodeError("non-ASCII address")
    if "\ufffd" in text:
        raise ValueError("invalid UTF-8 in the address")
    dotString = _U_DOT_STRING if utf8 else _DOT_STRING
    quotedString = _U_QUOTED_STRING if utf8 else _QUOTED_STRING
    if text.startswith('"'):
        # The quoted string may itself contain "@".
        end = _quotedEnd(text, 0)
        if end is None:
            raise ValueError("unterminated quoted local part")
        local, rest = text[: end + 1], text[end + 1 :]
        if not rest.startswith("@"):
            raise ValueError("missing @ after the local part")
        domain = rest[1:]
        if not quotedString.match(local):
            raise ValueError("bad quoted local part")
        inner = re.sub(r"\\(.)", r"\1", local[1:-1])
        if dotString.match(inner):
            local = inner
    else:
        local, at, domain = text.rpartition("@")
        if not at:
            raise ValueError("missing @")
        if "@" in local:
            # Only a well-formed user@other@ours is a relay attempt; anything
            # else with a stray "@" (such as "0@@") is plain bad syntax.
            bare = domain[:-1] if domain.endswith(".") and not domain.endswith("..") else domain
            if all(local.split("@")) and ((isUTF8Domain(bare) if utf8 else isDomain(bare)) or isAddressLiteral(bare)):
                raise RelayTrick("more than one @ in the address")
            raise ValueError("bad local part")
        if not dotString.match(local):
            raise ValueError("bad local part")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise ValueError("local part too long")
    if domain.endswith(".") and not domain.endswith("..") and not domain.startswith("["):
        domain = domain[:-1]
    if not ((isUTF8Domain(domain) if utf8 else isDomain(domain)) or isAddressLiteral(domain)):
        raise ValueError("bad domain")
    return f"{local}@{domain}"


def _quotedEnd(text: str, start: int):
    """Index of the closing quote of the quoted string starting at C{start}."""
    i = start + 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i
        i += 1
    return None


def _pathEnd(text: str):
    """Index of the C{>} closing the path that starts at C{text[0] == "<"}."""
    i = 1
    while i < len(text):
        c = text[i]
        if c == '"':
            end = _quotedEnd(text, i)
            if end is None:
                return None
            i = end + 1
            continue
        if c == ">":
            return i
        i += 1
    return None


@dataclass(frozen=True)
class Path:
    """A parsed MAIL FROM or RCPT TO: the address (C{""} for C{<>}) and parameters."""

    address: str
    params: dict = field(default_factory=dict)


_PARAM_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_PARAM_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")
# RFC 6531 §3.3: with SMTPUTF8 a parameter value may hold UTF-8 (e.g. ORCPT=utf-8;...).
_U_PARAM_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+\Z")


def parseParameters(text: str, utf8: bool = False) -> dict:
    """
    RFC 5321 C{Mail-parameters}: C{KEYWORD[=VALUE]} separated by spaces.
    Returns a dict with upper-cased keywords (values are C{str}, or C{None}
    for a keyword without a value).  Raises L{SMTPError} C{501 5.5.4}.
    """
    params = {}
    valueRe = _U_PARAM_VALUE if utf8 else _PARAM_VALUE
    for word in text.split():
        key, eq, value = word.partition("=")
        if not _PARAM_KEY.match(key):
            raise SMTPError(501, "5.5.4", "Invalid parameter syntax")
        if eq and (not valueRe.match(value) or "\ufffd" in value):
            raise SMTPError(501, "5.5.4", f"Invalid value for parameter {key.upper()}")
        key = key.upper()
        if key in params:
            raise SMTPError(501, "5.5.4", f"Duplicate parameter {key}")
        params[key] = value if eq else None
        if len(params) > MAX_PARAMETERS:
            raise SMTPError(501, "5.5.4", "Too many parameters")
    return params


def _splitPath(args: str, keyword: str, enhanced: str, what: str):
    usage = f"Syntax: {'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}:<address>"
    if args[: len(keyword) + 1].upper() != keyword + ":":
        raise SMTPError(501, "5.5.4", usage)
    rest = args[len(keyword) + 1 :].lstrip(" ")
    if not rest.startswith("<"):
        raise SMTPError(501, enhanced, f"Bad {what} address syntax: {usage}")
    end = _pathEnd(rest)
    if end is None:
        raise SMTPError(501, enhanced, f"Bad {what} address syntax")
    path, tail = rest[1:end], rest[end + 1 :]
    if tail and not tail.startswith(" "):
        raise SMTPError(501, enhanced, f"Bad {what} address syntax")
    if len(path.encode("utf-8")) + 2 > MAX_PATH:
        raise SMTPError(501, enhanced, f"Bad {what} address syntax: path too long")
    return path, tail


def _checkPath(path: str, params: dict, enhanced: str, what: str, nullAllowed: bool, utf8: bool) -> Path:
    if path == "":
        if not nullAllowed:
            raise SMTPError(501, enhanced, f"Bad {what} address syntax")
        return Path("", params)
    if not nullAllowed and path.lower() == "postmaster":
        return Path("Postmaster", params)
    if path.startswith("@"):
        # A-d-l ":" Mailbox — the source route is checked, then dropped.
        route, colon, mailbox = path.partition(":")
        check = isUTF8Domain if utf8 else isDomain
        if not colon or not all(d.startswith("@") and check(d[1:]) for d in route.split(",")):
            raise SMTPError(501, enhanced, f"Bad {what} address syntax")
        path = mailbox
    try:
        address = parseMailbox(path, utf8)
    except UnicodeError:
        raise SMTPError(553, "5.6.7", f"Non-ASCII {what} address needs the SMTPUTF8 parameter on MAIL FROM")
    except RelayTrick:
        if not nullAllowed:
            raise SMTPError(550, "5.7.1", "Relay access denied")
        raise SMTPError(501, enhanced, f"Bad {what} address syntax")
    except ValueError:
        raise SMTPError(501, enhanced, f"Bad {what} address syntax")
    return Path(address, params)


def parseMail(args: str) -> Path:
    """
    The arguments of MAIL: C{FROM:<reverse-path> [params]}.  Raises
    L{SMTPError}: C{501 5.1.7} for a bad address, C{501 5.5.4} otherwise.
    The address may hold UTF-8 only when the parameters include C{SMTPUTF8}
    (RFC 6531 §3.4); otherwise a non-ASCII address is C{553 5.6.7}.
    """
    path, tail = _splitPath(args, "FROM", "5.1.7", "sender")
    # The SMTPUTF8 keyword itself is ASCII: look for it before parsing the
    # values, which may hold UTF-8 only when it is there.
    utf8 = any(w.upper() == "SMTPUTF8" for w in tail.split())
    params = parseParameters(tail, utf8)
    return _checkPath(path, params, "5.1.7", "sender", True, utf8)


def parseRcpt(args: str, utf8: bool = False) -> Path:
    """
    The arguments of RCPT: C{TO:<forward-path> [params]}.  Raises
    L{SMTPError}: C{501 5.1.3} for a bad address, C{501 5.5.4} otherwise,
    C{550 5.7.1} for C{user@other@ours}.  C{utf8}: the transaction's MAIL
    had C{SMTPUTF8}.
    """
    path, tail = _splitPath(args, "TO", "5.1.3", "recipient")
    params = parseParameters(tail, utf8)
    return _checkPath(path, params, "5.1.3", "recipient", False, utf8)


# -- parameter values: xtext and DSN (RFC 3461) ------------------------------------

_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
# RFC 6533 §3.3: utf-8-addr-xtext also allows UTF-8 and \\x{HEX} escapes.
_UTF8_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\x\{[0-9A-F]{1,6}\})*\Z")

_EMBEDDED = re.compile(r"\\x\{([0-9A-F]{1,6})\}")
#: The two-digit HEXPOINTs of RFC 6533 §3 (the rest: 80-FF).
_TWO_DIGIT = {f"{a}{b}" for a in "01" for b in "123456789"} | {"10", "20", "2B", "3D", "7F", "5C"}


def _hexpoint(h: str) -> bool:
    """RFC 6533 §3 C{HEXPOINT}: a code point in its shortest form, no surrogates."""
    if len(h) == 2:
        return h in _TWO_DIGIT or h[0] in "89ABCDEF"
    if len(h) < 2 or h[0] == "0":
        return False
    if len(h) == 4:
        return not 0xD800 <= int(h, 16) <= 0xDFFF
    return len(h) in (3, 5) or h.startswith("10")


def isUTF8Xtext(text: str) -> bool:
    """RFC 6533 §3 C{utf-8-addr-xtext} / C{utf-8-addr-unitext}: xtext with UTF-8 and C{\\x{HEXPOINT}} escapes."""
    return bool(_UTF8_XTEXT.match(text)) and all(_hexpoint(m.group(1)) for m in _EMBEDDED.finditer(text))


MAX_ENVID = 100
MAX_ORCPT = 500


def isXtext(text: str) -> bool:
    """RFC 3461 §4 C{xtext}: printable ASCII but C{+} and C{=}, and C{+XX} (upper-case hex)."""
    return bool(_XTEXT.match(text))


def decodeXtext(text: str) -> str:
    """Decode RFC 3461 C{xtext}; raises C{ValueError} when it is not xtext."""
    if not isXtext(text):
        raise ValueError("not xtext")
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def encodeXtext(text: str) -> str:
    """Encode a string of ASCII characters as RFC 3461 C{xtext}."""
    return "".join(c if ("!" <= c <= "~" and c not in "+=") else f"+{ord(c):02X}" for c in text)


def _dsnSyntax(key: str, text: str):
    return SMTPError(501, "5.5.4", f"Invalid {key} parameter: {text}")


def checkDSNMailParams(params: dict) -> dict:
    """
    Validate and normalise the RFC 3461 MAIL parameters in C{params} (in
    place, and returned): C{RET=FULL|HDRS} (upper-cased) and C{ENVID=xtext}
    (kept as xtext, at most 100 characters decoded).  Raises L{SMTPError}
    C{501 5.5.4}.
    """
    if "RET" in params:
        value = (params["RET"] or "").upper()
        if value not in ("FULL", "HDRS"):
            raise _dsnSyntax("RET", "expected FULL or HDRS")
        params["RET"] = value
    if "ENVID" in params:
        value = params["ENVID"]
        if not value or not isXtext(value):
            raise _dsnSyntax("ENVID", "not xtext")
        if len(decodeXtext(value)) > MAX_ENVID:
            raise _dsnSyntax("ENVID", "longer than 100 characters")
    return params


_NOTIFY = ("SUCCESS", "FAILURE", "DELAY")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")


def checkDSNRcptParams(params: dict, utf8: bool = False) -> dict:
    """
    Validate and normalise the RFC 3461 RCPT parameters in C{params} (in
    place, and returned): C{NOTIFY=NEVER} or a comma list of SUCCESS,
    FAILURE and DELAY (upper-cased, each once), and C{ORCPT=addr-type;xtext}
    (kept as given, the address type checked; C{utf-8} addresses as RFC
    6533 C{utf-8-addr-xtext} only with SMTPUTF8).  Raises L{SMTPError}
    C{501 5.5.4}.
    """
    if "NOTIFY" in params:
        words = (params["NOTIFY"] or "").upper().split(",")
        if words == ["NEVER"]:
            params["NOTIFY"] = "NEVER"
        elif not all(w in _NOTIFY for w in words) or len(set(words)) != len(words):
            raise _dsnSyntax("NOTIFY", "expected NEVER or a list of SUCCESS, FAILURE, DELAY")
        else:
            params["NOTIFY"] = ",".join(words)
    if "ORCPT" in params:
        value = params["ORCPT"] or ""
        addrType, semi, addr = value.partition(";")
        if not semi or not _ADDR_TYPE.match(addrType) or not addr:
            raise _dsnSyntax("ORCPT", "expected addr-type;xtext")
        if addrType.lower() == "utf-8" and utf8:
            if not isUTF8Xtext(addr):
                raise _dsnSyntax("ORCPT", "not utf-8-addr-xtext")
            length = len(addr)
        else:
            if not isXtext(addr):
                raise _dsnSyntax("ORCPT", "not xtext")
            length = len(decodeXtext(addr))
        if length + len(addrType) + 1 > MAX_ORCPT:
            raise _dsnSyntax("ORCPT", "longer than 500 characters")
    return params


# -- BDAT (RFC 3030) ------------------------------------------------------------------

_BDAT = re.compile(r"([0-9]{1,20})(?: +(LAST))? *\Z", re.IGNORECASE)


def parseBDAT(args: str):
    """
    The arguments of BDAT: C{chunk-size [LAST]}.  Returns C{(size, last)};
    raises L{SMTPError} C{501 5.5.4}.
    """
    m = _BDAT.match(args)
    if m is None:
        raise SMTPError(501, "5.5.4", "Syntax: BDAT size [LAST]")
    return int(m.group(1)), m.group(2) is not None


def decodeBase64(text) -> bytes:
    """Strict base64 as used by AUTH (RFC 4954 §4); raises C{ValueError}."""
    if isinstance(text, str):
        text = text.encode("ascii", "replace")
    return decodeResponse(text.strip())


# -- DATA and BDAT content --------------------------------------------------------

MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_LINE_ENDING = Reply(550, "5.6.0", "Message contains bare CR or LF: lines must end with CRLF")
TEXT_LINE_TOO_LONG = Reply(550, "5.6.0", "Message contains a line longer than the limit (RFC 5321 4.5.3.1.6)")
EIGHT_BIT_HEADERS = Reply(
    550, "5.6.7", "Message has non-ASCII header fields: send it with the SMTPUTF8 parameter (RFC 6531)"
)

_END = b".\r\n"
_NON_ASCII = re.compile(rb"[\x80-\xff]")


class ContentChecker:
    """
    Streaming checks of message content (after un-dot-stuffing), fed chunk
    by chunk in order:

      - C{maxLineLength}: a text line longer than this many octets with its
        CRLF (RFC 5321 §4.5.3.1.6: 1000) makes L{error} L{TEXT_LINE_TOO_LONG};
        C{0} or C{None} for no limit (BINARYMIME content has no lines).
      - C{checkBare}: a bare CR or LF makes L{error} L{BARE_LINE_ENDING}
        (BDAT content; DATA checks this while it decodes).
      - C{eightBitHeaders=False}: a non-ASCII octet in the header section
        makes L{error} L{EIGHT_BIT_HEADERS} (RFC 6532 headers need SMTPUTF8).
      - C{keepHeaders}: the header section (up to 1 MiB) is kept in
        L{headers} for the pre-queue C{headers} hooks.

    Every check runs at C speed (C{bytes} methods and regular
    expressions), so a large message costs little.
    """

    MAX_KEPT_HEADERS = 1024 * 1024

    def __init__(self, maxLineLength=TEXT_LINE_LENGTH, checkBare=False, eightBitHeaders=True, keepHeaders=False):
        self.maxLineLength = maxLineLength or 0
        self.checkBare = checkBare
        self.eightBitHeaders = eightBitHeaders
        self.keepHeaders = keepHeaders
        self.error = None
        self.bareLineEnding = False
        self.headersDone = False
        self.headers = b""
        self._lineLen = 0
        self._tail = b"\r\n"  # the last octets seen (end-of-headers detection)
        self._pendingCR = False
        if self.maxLineLength:
            # A line that starts after an LF and has at least C{limit}
            # octets before its own LF is longer than C{limit} with it.
            # Anchored at the LF, every attempt stops at the next line end:
            # linear in the size of the chunk.
            self._tooLong = re.compile(rb"\n[^\n]{%d}" % self.maxLineLength)

    def _fail(self, reply):
        if self.error is None:
            self.error = reply

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if self.checkBare:
            self._bare(data)
        if self.maxLineLength:
            first = data.find(b"\n")
            if first < 0:
                self._lineLen += len(data)
                if self._lineLen > self.maxLineLength:
                    self._fail(TEXT_LINE_TOO_LONG)
            else:
                if self._lineLen + first + 1 > self.maxLineLength:
                    self._fail(TEXT_LINE_TOO_LONG)
                elif self._tooLong.search(data, first):
                    self._fail(TEXT_LINE_TOO_LONG)
                self._lineLen = len(data) - data.rfind(b"\n") - 1
        if not self.headersDone:
            self._scanHeaders(data)

    def _bare(self, data):
        if self._pendingCR:
            self._pendingCR = False
            if data.startswith(b"\n"):
                data = data[1:]  # the LF of a CRLF split across chunks
            else:
                self.bareLineEnding = True
        if data.endswith(b"\r"):
            self._pendingCR = True
            data = data[:-1]
        crlf = data.count(b"\r\n")
        if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
            self.bareLineEnding = True
        if self.bareLineEnding:
            self._fail(BARE_LINE_ENDING)

    def finish(self) -> None:
        """The content ended: a CR left at the very end is a bare CR."""
        if self.checkBare and self._pendingCR:
            self.bareLineEnding = True
            self._fail(BARE_LINE_ENDING)

    def _scanHeaders(self, data):
        # _tail starts as CRLF, so content that starts with CRLF (no header
        # section at all) is found like any other end of headers.
        joined = self._tail + data
        end = joined.find(b"\r\n\r\n")
        if end >= 0:
            cut = end + 2 - len(self._tail)
            if cut < 0:
                # The end of the header section was in what came before.
                self.headers = self.headers[: len(self.headers) + cut]
                cut = 0
            part = data[:cut]
            self.headersDone = True
        else:
            part = data
        if not self.eightBitHeaders and _NON_ASCII.search(part):
            self._fail(EIGHT_BIT_HEADERS)
        if self.keepHeaders and len(self.headers) < self.MAX_KEPT_HEADERS:
            self.headers += part[: self.MAX_KEPT_HEADERS - len(self.headers)]
        self._tail = joined[-3:]


class DataDecoder:
    """
    Decodes a DATA body (RFC 5321 §4.5.2).

    L{feed} takes bytes as they arrive and returns a list of content chunks
    (un-dot-stuffed, byte-exact, CRLF line ends).  Once the
    C{<CRLF>.<CRLF>} end marker has been seen, C{done} is true and
    C{leftover} holds whatever followed it (pipelined commands).  When the
    content is refused — it grew past C{maxSize}, it holds a bare CR or LF
    and C{normaliseBareLineEndings} is false, or the C{checker} (a
    L{ContentChecker}: text line length, 8-bit headers) refuses it —
    C{error} is set to the reply for the end of data and no more content is
    returned, but the body is still consumed up to the real end marker so
    the session stays in step with the client.
    """

    def __init__(self, maxSize=None, normaliseBareLineEndings: bool = False, checker=None):
        self.maxSize = maxSize
        self.normalise = normaliseBareLineEndings
        self.checker = checker
        self.size = 0
        self.done = False
        self.leftover = b""
        self.error = None
        self.tooLarge = False
        self.bareLineEnding = False
        self._pending = b""
        self._lineStart = True

    def _emit(self, segment: bytes, out: list) -> None:
        if not segment:
            return
        bareCR = segment.count(b"\r") != segment.count(b"\r\n")
        bareLF = segment.count(b"\n") != segment.count(b"\r\n")
        if bareCR or bareLF:
            if self.normalise:
                segment = segment.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
            else:
                self.bareLineEnding = True
                if self.error is None:
                    self.error = BARE_LINE_ENDING
        if self.error is not None:
            return
        if self.maxSize is not None and self.size + len(segment) > self.maxSize:
            self.tooLarge = True
            self.error = MESSAGE_TOO_BIG
            return
        checker = self.checker
        if checker is not None:
            checker.feed(segment)
            if checker.error is not None:
                self.error = checker.error
                return
        self.size += len(segment)
        out.append(segment)

    def feed(self, data: bytes) -> list:
        if self.done:
            self.leftover += data
            return []
        if self._pending:
            data = self._pending + data
            self._pending = b""
        out = []
        n = len(data)
        i = 0
        while i < n:
            if self._lineStart:
                if data.startswith(_END, i):
                    self.done = True
                    self.leftover = data[i + 3 :]
                    return out
                if n - i < 3 and _END.startswith(data[i:]):
                    # "." or ".\r" at the start of a line: wait for more.
                    self._pending = data[i:]
                    return out
                if data[i] == 0x2E:
                    i += 1  # a stuffed dot
                self._lineStart = False
                continue
            j = data.find(b"\r\n.", i)
            if j < 0:
                if data.endswith(b"\r\n"):
                    self._emit(data[i:], out)
                    self._lineStart = True
                elif data.endswith(b"\r"):
                    self._emit(data[i : n - 1], out)
                    self._pending = b"\r"
                else:
                    self._emit(data[i:], out)
                return out
            self._emit(data[i : j + 2], out)
            i = j + 2
            self._lineStart = True
        return out


class LineEndingNormaliser:
    """
    Turns bare CR and bare LF into CRLF in a stream fed chunk by chunk (a
    CRLF split between two chunks stays one line end).  Used for BDAT
    content when the server is configured to normalise rather than refuse.
    """

    def __init__(self):
        self._pendingCR = False

    def feed(self, data: bytes) -> bytes:
        if self._pendingCR:
            self._pendingCR = False
            data = b"\r" + data
        if data.endswith(b"\r"):
            self._pendingCR = True
            data = data[:-1]
        if b"\r" in data or b"\n" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        return data

    def finish(self) -> bytes:
        if self._pendingCR:
            self._pendingCR = False
            return b"\r\n"
        return b""
