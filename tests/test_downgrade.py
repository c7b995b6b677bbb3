"""The 7-bit downgrade for next hops without 8BITMIME (mailplat.outbound.downgrade)."""

import email
from email import policy

from mailplat.outbound.downgrade import downgrade

LONG_URL = b"<https://lists.example.org/unsubscribe/a/long/path/that/goes/on/and/on/and/on?id=12345678901234567890>"


def test_only_what_is_8bit_changes():
    header = (b"From: a@example.net\r\nList-Unsubscribe: " + LONG_URL + b"\r\n"
              b"DKIM-Signature: v=1; a=rsa-sha256; d=example.net; s=sel;\r\n\tb=" + b"A" * 90 + b"\r\n")
    message = header + b"Subject: caf\xc3\xa9\r\n\r\ncaf\xc3\xa9 = 1\r\n"
    out = downgrade(message)
    assert all(b < 128 for b in out)
    # ASCII fields byte for byte (folding included): a DKIM signature over them still holds
    assert header[len(b"From: a@example.net\r\n"):] in out
    parsed = email.message_from_bytes(out, policy=policy.default)
    assert parsed["Subject"] == "café"
    # RFC 2045 §4: no Content-Transfer-Encoding without MIME-Version; the charset the octets are in
    assert parsed["MIME-Version"] == "1.0"
    assert parsed.get_content_type() == "text/plain" and parsed.get_content_charset() == "utf-8"
    assert parsed.get_content() == "café = 1\r\n"


def test_parts_embedded_messages_and_seven_bit_parts():
    message = (b"From: a@example.net\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
               b"--B\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nplain ascii\r\n"
               b"--B\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\ncaf\xc3\xa9\r\n"
               b"--B\r\nContent-Type: application/octet-stream\r\n\r\n\xff\xfe\x01\r\n"
               b"--B\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
               b"Subject: inner\r\n\r\nb\xc3\xa9\r\n--B--\r\n")
    out = downgrade(message)
    assert all(b < 128 for b in out)
    assert b"--B\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nplain ascii\r\n" in out
    parsed = email.message_from_bytes(out, policy=policy.default)
    leaves = [(p.get_content_type(), p.get_payload(decode=True)) for p in parsed.walk() if not p.is_multipart()]
    assert leaves == [("text/plain", b"plain ascii"), ("text/plain", b"caf\xc3\xa9"),
                      ("application/octet-stream", b"\xff\xfe\x01"), ("text/plain", b"b\xc3\xa9")]
    rfc822 = [p for p in parsed.walk() if p.get_content_type() == "message/rfc822"][0]
    assert rfc822["Content-Transfer-Encoding"] == "7bit", "RFC 2046 §5.2.1: never base64 or quoted-printable"


def test_seven_bit_message_unchanged():
    message = b"Subject: x\r\n\r\nbody\r\n"
    assert downgrade(message) is message
