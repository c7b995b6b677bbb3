"""
8-bit to 7-bit downgrade for a next hop without 8BITMIME (RFC 6152 section 3,
RFC 1652 section 3: a relay must convert or bounce).

The message is changed where it has 8-bit octets and nowhere else, byte for
byte (header fields keep their folding, so signatures over them survive):

- a leaf part whose body has 8-bit octets and no base64 or quoted-printable
  encoding is re-encoded, text as quoted-printable, anything else as base64,
  and its Content-Transfer-Encoding field replaced (or added); a message
  that had no MIME header fields gains C{MIME-Version: 1.0} and, when it had
  no Content-Type, C{text/plain} with the charset its octets decode as
  (UTF-8, else ISO-8859-1), as RFC 2045 §4 needs for the new encoding to
  mean anything;
- an embedded C{message/rfc822} is downgraded in place (it may not be
  base64-encoded, RFC 2046 §5.2.1) and its part labelled 7bit;
- a header field with raw 8-bit octets is written as RFC 2047 encoded words
  (UTF-8, or ISO-8859-1 when the octets are not UTF-8).

The parts are found by L{mailplat.mime.structure.analyze}.  What that leaves
8-bit (a multipart's preamble or epilogue) goes through the email package's
generator as a whole, the fallback for what has no exact conversion.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.encoders
import email.header
import re
from email import policy as emailpolicy
from email.generator import BytesGenerator
from io import BytesIO

from mailplat.mime.structure import analyze
from mailplat.outbound.client import has8bit

def _decoded(raw: bytes):
    """(text, charset) of 8-bit header octets: UTF-8 when they are, else ISO-8859-1."""
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "iso-8859-1"


def _fields(block: bytes) -> list:
    """A header block's fields, each with its continuation lines and line ends, and the blank line after them."""
    fields = []
    for line in block.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower() if b":" in field else b""


def _encodedField(field: bytes) -> bytes:
    name, _, value = field.partition(b":")
    raw = re.sub(rb"\r?\n[ \t]", b" ", value).strip()
    text, charset = _decoded(raw)
    encoded = email.header.Header(text, charset, header_name=name.decode("ascii", "replace")).encode(linesep="\r\n")
    return name + b": " + encoded.encode("ascii") + b"\r\n"


def _base64(body: bytes) -> bytes:
    data = base64.b64encode(body)
    return b"".join(data[i:i + 76] + b"\r\n" for i in range(0, len(data), 76))


def _quotedPrintable(body: bytes) -> bytes:
    encoded = binascii.b2a_qp(body.replace(b"\r\n", b"\n"), quotetabs=False, istext=True, header=False)
    return encoded.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class _Downgrade:
    def __init__(self, message: bytes):
        self.message = message
        self.edits = []  # (start, end, replacement), not overlapping

    def entity(self, node, top=False):
        hs, bs, end = node["offsets"]
        block = self.message[hs:bs]
        fields = _fields(block)
        changed = False
        for i, f in enumerate(fields):
            if f.strip() and has8bit(f):
                fields[i] = _encodedField(f)
                changed = True
        if "parts" in node:
            for part in node["parts"]:
                self.entity(part)
        elif "body" in node:
            # message/rfc822 (or global): the embedded message itself, then
            # this part says 7bit (it may not be base64 or quoted-printable).
            self.entity(node["body"], top=True)
            if has8bit(self.message[bs:end]) or node.get("encoding", "7BIT") != "7BIT":
                fields = self._setEncoding(fields, b"7bit")
                changed = True
        else:
            body = self.message[bs:end]
            encoding = node.get("encoding", "7BIT").upper()
            if has8bit(body) and encoding not in ("BASE64", "QUOTED-PRINTABLE"):
                if node.get("type") == "text":
                    new, cte = _quotedPrintable(body), b"quoted-printable"
                else:
                    new, cte = _base64(body), b"base64"
                self.edits.append((bs, end, new))
                fields = self._setEncoding(fields, cte)
                if top:
                    names = {_name(f) for f in fields}
                    if b"mime-version" not in names:
                        fields.insert(0, b"MIME-Version: 1.0\r\n")
                    if b"content-type" not in names:
                        try:
                            body.decode("utf-8")
                            charset = b"utf-8"
                        except UnicodeDecodeError:
                            charset = b"iso-8859-1"
                        fields.insert(1, b"Content-Type: text/plain; charset=" + charset + b"\r\n")
                changed = True
        if changed:
            self.edits.append((hs, bs, b"".join(fields)))

    @staticmethod
    def _setEncoding(fields, cte: bytes) -> list:
        out = [f for f in fields if _name(f) != b"content-transfer-encoding"]
        # Before the blank line that ends the block (when there is one).
        at = len(out) - 1 if out and not out[-1].strip() else len(out)
        out.insert(at, b"Content-Transfer-Encoding: " + cte + b"\r\n")
        return out

    def result(self) -> bytes:
        out = self.message
        for start, end, new in sorted(self.edits, key=lambda e: e[0], reverse=True):
            out = out[:start] + new + out[end:]
        return out


def _viaEmailPackage(message: bytes) -> bytes:
    msg = email.message_from_bytes(message, policy=emailpolicy.compat32)
    for part in msg.walk():
        for i, (key, value) in enumerate(part._headers):
            raw = value.encode("ascii", "surrogateescape") if isinstance(value, str) else None
            if raw is None or not has8bit(raw):
                continue
            text, charset = _decoded(raw)
            part._headers[i] = (key, email.header.Header(text.strip(), charset, header_name=key).encode())
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if payload is None or not has8bit(payload):
            continue
        if (part.get("Content-Transfer-Encoding") or "7bit").lower() in ("base64", "quoted-printable"):
            continue
        del part["Content-Transfer-Encoding"]
        part.set_payload(payload)
        if part.get_content_maintype() == "text":
            email.encoders.encode_quopri(part)
        else:
            email.encoders.encode_base64(part)
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=emailpolicy.SMTP.clone(cte_type="7bit")).flatten(msg)
    return out.getvalue()


def downgrade(message: bytes) -> bytes:
    """C{message} with no 8-bit octets left (see the module docstring)."""
    if not has8bit(message):
        return message
    try:
        structure = analyze(message)
        d = _Downgrade(message)
        d.entity(structure["body"], top=True)
        out = d.result()
    except Exception:
        out = message
    if has8bit(out):
        out = _viaEmailPackage(out)
    return out
