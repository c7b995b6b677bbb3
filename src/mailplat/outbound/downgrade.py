"""
8-bit to 7-bit downgrade for a next hop without 8BITMIME (RFC 6152 section 3,
RFC 1652 section 3: a relay must convert or bounce).

Every leaf part whose body has 8-bit octets is re-encoded: text parts as
quoted-printable, others as base64; header fields with raw 8-bit octets are
re-encoded as RFC 2047 encoded words (UTF-8, or Latin-1 when not UTF-8).
Parts that are already 7-bit pass through untouched.
"""

from __future__ import annotations

import email
import email.encoders
import email.header
from email import policy as emailpolicy
from email.generator import BytesGenerator
from io import BytesIO


def _is8bit(data: bytes) -> bool:
    return any(b > 127 for b in data)


def _reencodeHeaders(part):
    # compat32 keeps each raw header value as a str with the 8-bit octets as
    # surrogate escapes; rewrite those values in place, keeping their order.
    for i, (key, value) in enumerate(part._headers):
        raw = value.encode("ascii", "surrogateescape") if isinstance(value, str) else None
        if raw is None or not _is8bit(raw):
            continue
        try:
            text, charset = raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, charset = raw.decode("latin-1"), "iso-8859-1"
        part._headers[i] = (key, email.header.Header(text.strip(), charset, header_name=key).encode())


def downgrade(message: bytes) -> bytes:
    msg = email.message_from_bytes(message, policy=emailpolicy.compat32)
    for part in msg.walk():
        _reencodeHeaders(part)
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if payload is None or not _is8bit(payload):
            continue
        cte = (part.get("Content-Transfer-Encoding") or "7bit").lower()
        if cte in ("base64", "quoted-printable"):
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
