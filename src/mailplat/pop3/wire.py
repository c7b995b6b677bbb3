"""
The POP3 wire format, sans-IO: command lines in, responses out.

Implements the syntax parts of RFC 1939 (POP3), RFC 2449 (CAPA, RESP-CODES,
command line length), RFC 2595 section 4 (STLS), RFC 5034 (AUTH with
initial response and base64 continuation lines) and RFC 6856 (UTF8, LANG).  Nothing here does I/O or
keeps session state; L{mailplat.pop3.server} drives it.

Command lines (L{LineBuffer}, L{parseCommand})
==============================================
- A command line ends with CRLF; a bare LF from a client is accepted as the
  end of a line (many clients and scripts send it), but a CR anywhere else in
  the line, or a NUL, makes the line invalid (L{BadLine}).
- A command line may be at most 255 octets including its CRLF
  (RFC 2449 section 4).  A longer line is reported once as L{LineTooLong}
  and the rest of it is discarded up to the next LF, so the session resyncs
  on the following line.  SASL continuation lines may be longer (RFC 5034
  section 4); the session raises L{LineBuffer.maxLength} while it waits for
  one.
- The buffer is pulled one line at a time (L{LineBuffer.nextLine}), so a
  session processes a pipelined command completely before it looks at the
  next, and can throw away whatever follows an STLS (L{LineBuffer.clear}).
- Keywords are case-insensitive; the argument count of every command is
  checked.  C{PASS} takes the rest of the line as its one argument, spaces
  included (RFC 1939 section 7 allows this).

Responses
=========
L{ok} and L{err} build status lines with optional RFC 2449 response codes
(C{[IN-USE]}, C{[AUTH]}, C{[SYS/TEMP]}, ...); the text is cleaned of CR/LF and
the line is kept within 512 octets.  L{multiline} encodes short multi-line
responses (CAPA, LIST, UIDL).

Messages (L{encodeMessage}, L{encodeTop}, L{normalisedSize})
============================================================
Message content is sent as it is stored except for line endings: every bare
LF I{and every bare CR} becomes CRLF (deviation, deliberate: a lone CR is not
legal in RFC 5322 content, and turning it into a line end keeps dot-stuffing
unambiguous for clients that split lines on CR), and a last line without a
line end gets CRLF.  Every line starting with C{"."} then gets another
C{"."} (RFC 1939 section 3), including the first line, wherever the chunk
boundaries fall, and C{".\\r\\n"} ends the response.

RFC 1939 section 11 says the size in C{LIST}/C{STAT} is of the message as
sent without the byte-stuffing.  L{normalisedSize} is exactly that: the
octet count of the CRLF-normalised content, so it equals the octets of a
C{RETR} response between the status line and the terminating C{".\\r\\n"},
minus the stuffed dots.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from mailplat.auth.sasl import decodeResponse

#: RFC 2449 section 4: a command line is at most 255 octets with its CRLF.
MAX_COMMAND_LINE = 255

#: Longest SASL continuation line accepted (RFC 5034 section 4 sets no
#: limit; this is ours).
MAX_SASL_LINE = 16384

#: RFC 2449 section 4: a status line is at most 512 octets with its CRLF.
MAX_STATUS_LINE = 512

#: Size of the pieces L{iterChunks} cuts a message into.
CHUNK_SIZE = 65536

CRLF = b"\r\n"
TERMINATOR = b".\r\n"


# --- command lines ---------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """A complete command line, without its line end."""

    data: bytes


@dataclass(frozen=True)
class LineTooLong:
    """A line longer than the limit; the rest of it is being discarded."""

    limit: int


@dataclass(frozen=True)
class BadLine:
    """A line with a CR that does not end it, or a NUL."""

    reason: str


class LineBuffer:
    """
    Bytes from the client in, lines out, one at a time.

    @ivar maxLength: the longest accepted line, counted with a two-octet line
        end (so a bare-LF line may have as many octets before its LF as a CRLF
        line).  May be changed between calls to L{nextLine}.
    """

    def __init__(self, maxLength: int = MAX_COMMAND_LINE):
        self.maxLength = maxLength
        self._buf = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> None:
        """Add bytes received from the client."""
        if self._discarding:
            # Drop the rest of an over-long line at once, keeping memory bounded.
            nl = data.find(b"\n")
            if nl < 0:
                return
            data = data[nl + 1 :]
            self._discarding = False
        self._buf += data

    def pending(self) -> int:
        """Octets buffered and not yet returned as lines."""
        return len(self._buf)

    def clear(self) -> None:
        """Forget everything buffered (used after STLS)."""
        self._buf.clear()
        self._discarding = False

    def nextLine(self):
        """
        The next event: a L{Line}, L{LineTooLong} or L{BadLine}, or C{None}
        when no complete line is buffered.
        """
        buf = self._buf
        limit = self.maxLength - 2
        nl = buf.find(b"\n")
        if nl < 0:
            partial = len(buf) - (1 if buf.endswith(b"\r") else 0)
            if partial > limit:
                self._buf = bytearray()
                self._discarding = True
                return LineTooLong(self.maxLength)
            return None
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > limit:
            return LineTooLong(self.maxLength)
        if b"\r" in line:
            return BadLine("bare CR in command line")
        if b"\x00" in line:
            return BadLine("NUL in command line")
        return Line(line)


# --- commands --------------------------------------------------------------


class CommandError(Exception):
    """A command line that cannot be parsed; C{str()} is safe to show a client."""


@dataclass(frozen=True)
class Command:
    """A parsed command: upper-case C{keyword} and its raw C{args}."""

    keyword: str
    args: tuple = ()


#: keyword -> (least, most) number of arguments; C{None} means "the rest of
#: the line is one argument".
COMMANDS = {
    "USER": (1, 1),
    "PASS": None,
    "APOP": (2, 2),
    "AUTH": (0, 2),
    "STAT": (0, 0),
    "LIST": (0, 1),
    "UIDL": (0, 1),
    "RETR": (1, 1),
    "TOP": (2, 2),
    "DELE": (1, 1),
    "RSET": (0, 0),
    "NOOP": (0, 0),
    "QUIT": (0, 0),
    "CAPA": (0, 0),
    "STLS": (0, 0),
    "UTF8": (0, 0),
    "LANG": (0, 1),
}


def parseCommand(line: bytes) -> Command:
    """
    Parse one command line (without its line end).

    @raise CommandError: empty line, unknown keyword or wrong argument count.
    """
    keyword, sep, rest = line.partition(b" ")
    if not keyword:
        raise CommandError("Empty command" if not line else "Command must not start with a space")
    if not (keyword.isalnum() and keyword[:1].isalpha()) or len(keyword) > 8:
        raise CommandError("Unknown command")
    name = keyword.decode("ascii").upper()
    spec = COMMANDS.get(name, False)
    if spec is False:
        raise CommandError("Unknown command")
    if spec is None:
        if not rest:
            raise CommandError(f"{name} requires an argument")
        return Command(name, (bytes(rest),))
    args = tuple(a for a in rest.split(b" ") if a)
    least, most = spec
    if len(args) < least:
        raise CommandError(f"{name} requires {'an argument' if least == 1 else f'{least} arguments'}")
    if len(args) > most:
        raise CommandError(f"Too many arguments for {name}" if most else f"{name} takes no arguments")
    return Command(name, args)


_DIGITS = re.compile(rb"[0-9]{1,10}\Z")


def parseNumber(arg: bytes, *, positive: bool = True) -> int:
    """
    A message number (or, with C{positive=False}, a line count for TOP).

    @raise CommandError: not a plain decimal number in range.
    """
    if not _DIGITS.match(arg):
        raise CommandError("Invalid number")
    value = int(arg)
    if positive and value < 1:
        raise CommandError("Invalid message number")
    return value


def decodeBase64(data: bytes) -> bytes:
    """
    Decode a SASL response (RFC 5034): strict base64, C{"="} alone meaning
    an empty response.

    @raise CommandError: not valid base64.
    """
    if data == b"=":
        return b""
    try:
        return decodeResponse(data)
    except ValueError:
        raise CommandError("Invalid base64 data")


# --- responses -------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def _status(indicator: bytes, text: str, code: Optional[str]) -> bytes:
    text = _CONTROL.sub(" ", text or "")
    parts = [indicator]
    if code:
        parts.append(b"[" + _CONTROL.sub("", code).encode("ascii", "replace") + b"]")
    if text:
        parts.append(text.encode("utf-8", "replace"))
    line = b" ".join(parts)
    if len(line) > MAX_STATUS_LINE - 2:
        line = line[: MAX_STATUS_LINE - 2]
        # Do not leave half a UTF-8 sequence at the cut.
        line = line.decode("utf-8", "ignore").encode("utf-8")
    return line + CRLF


def ok(text: str = "", code: Optional[str] = None) -> bytes:
    """C{+OK [CODE] text} with its CRLF."""
    return _status(b"+OK", text, code)


def err(text: str, code: Optional[str] = None) -> bytes:
    """C{-ERR [CODE] text} with its CRLF."""
    return _status(b"-ERR", text, code)


def continuation(challenge: bytes) -> bytes:
    """An RFC 5034 server challenge: C{"+ "} and the base64 of C{challenge}."""
    return b"+ " + base64.b64encode(challenge) + CRLF


def multiline(lines: Iterable[bytes]) -> bytes:
    """
    The body of a multi-line response (after its status line): each line
    dot-stuffed, with CRLF, then the terminating C{".\\r\\n"}.
    """
    out = []
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise ValueError("a response line must not contain CR or LF")
        out.append((b"." + line if line.startswith(b".") else line) + CRLF)
    out.append(TERMINATOR)
    return b"".join(out)


# --- message content -------------------------------------------------------

_EOL = re.compile(rb"\r\n|\r|\n")


def iterChunks(content: bytes, size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Cut C{content} into pieces of at most C{size} octets."""
    view = memoryview(content)
    for start in range(0, len(content), size):
        yield view[start : start + size].tobytes()


def _normalise(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """
    CRLF-normalise a stream of chunks: bare LF and bare CR become CRLF, and a
    missing final line end is added.  A CR at the end of a chunk is held back
    until the next chunk shows whether an LF follows.
    """
    pendingCR = False
    atLineStart = True
    for chunk in chunks:
        if not chunk:
            continue
        if pendingCR:
            chunk = b"\r" + chunk
            pendingCR = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            pendingCR = True
            if not chunk:
                continue
        if b"\r" in chunk:
            # Already CRLF throughout (the usual case) needs no rewriting.
            n = chunk.count(CRLF)
            if n != chunk.count(b"\r") or n != chunk.count(b"\n"):
                chunk = _EOL.sub(CRLF, chunk)
        elif b"\n" in chunk:
            chunk = chunk.replace(b"\n", CRLF)
        atLineStart = chunk.endswith(b"\n")
        yield chunk
    if pendingCR:
        yield CRLF
    elif not atLineStart:
        yield CRLF


def normalisedSize(content: bytes) -> int:
    """
    The octets of C{content} as POP3 sends it, without the byte-stuffing:
    what C{LIST} and C{STAT} report (RFC 1939 section 11).
    """
    if not content:
        return 0
    crlf = content.count(b"\r\n")
    bareLF = content.count(b"\n") - crlf
    bareCR = content.count(b"\r") - crlf
    size = len(content) + bareLF + bareCR
    if not content.endswith((b"\n", b"\r")):
        size += 2
    return size


def _stuff(normalised: Iterable[bytes]) -> Iterator[bytes]:
    """Dot-stuff CRLF-normalised chunks and add the terminator."""
    atLineStart = True
    for chunk in normalised:
        stuffed = chunk.replace(b"\r\n.", b"\r\n..")
        if atLineStart and stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        atLineStart = stuffed.endswith(b"\n")
        yield stuffed
    # _normalise always ends with a line end, so the terminator starts a line.
    yield TERMINATOR


def encodeMessage(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """
    Stream a message as the body of a C{RETR} response: CRLF-normalised,
    dot-stuffed, terminated by C{".\\r\\n"}.  Each input chunk is copied a
    bounded number of times; nothing is joined.
    """
    return _stuff(_normalise(chunks))


def topOf(content: bytes, lines: int) -> bytes:
    """
    The part of C{content} that C{TOP msg lines} sends (RFC 1939 section 7),
    CRLF-normalised: the header, the empty line after it and at most
    C{lines} lines of the body.  A message with no empty line is all header.
    """
    normalised = b"".join(_normalise([content]))
    if normalised.startswith(CRLF):
        headerEnd = 2
    else:
        found = normalised.find(b"\r\n\r\n")
        if found < 0:
            return normalised
        headerEnd = found + 4
    end = headerEnd
    for _ in range(lines):
        nl = normalised.find(b"\n", end)
        if nl < 0:
            end = len(normalised)
            break
        end = nl + 1
    return normalised[:end]


def encodeTop(content: bytes, lines: int) -> Iterator[bytes]:
    """The body of a C{TOP} response, like L{encodeMessage}."""
    return encodeMessage(iterChunks(topOf(content, lines)))


def decodeMultiline(data: bytes) -> bytes:
    """
    The inverse of L{encodeMessage} for tests and tools: remove the
    byte-stuffing and the terminator from a complete multi-line body.

    @raise ValueError: C{data} does not end with the terminator.
    """
    if data == TERMINATOR:
        return b""
    if not data.endswith(b"\r\n.\r\n"):
        raise ValueError("no terminating line")
    body = data[: -len(TERMINATOR)]
    out = []
    for line in body.split(CRLF)[:-1]:
        out.append(line[1:] if line.startswith(b".") else line)
    return CRLF.join(out) + CRLF
