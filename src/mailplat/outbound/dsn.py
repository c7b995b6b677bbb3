"""
Delivery status notifications: RFC 3464 reports in RFC 6522
C{multipart/report} messages, and the RFC 3461 rules for when to send one.

L{buildReport} makes the whole message: a human-readable text part, a
C{message/delivery-status} part (per-message fields, then one block per
recipient), and the original message (C{RET=FULL}, the default for failures)
or only its header (C{RET=HDRS}, and always for delay and success notices).
Notices are sent from the null sender C{<>}; nothing is ever sent about a
message that itself came from C{<>}.
"""

from __future__ import annotations

import email.utils
import re
import secrets
from dataclasses import dataclass

FAILED = "failed"
DELAYED = "delayed"
DELIVERED = "delivered"
RELAYED = "relayed"
EXPANDED = "expanded"

_NOTIFY_FOR = {FAILED: "FAILURE", DELAYED: "DELAY", DELIVERED: "SUCCESS", RELAYED: "SUCCESS", EXPANDED: "SUCCESS"}


@dataclass(frozen=True)
class RecipientReport:
    """What happened to one recipient."""

    recipient: str
    action: str
    status: str
    diagnostic: str = ""
    remoteMTA: str = ""
    originalRecipient: str = ""
    lastAttempt: float | None = None
    willRetryUntil: float | None = None


def xtextDecode(value: str) -> str:
    """RFC 3461 section 4: C{+XX} hexadecimal escapes."""
    out, i = [], 0
    while i < len(value):
        c = value[i]
        if c == "+" and i + 2 < len(value) + 1:
            try:
                out.append(chr(int(value[i + 1:i + 3], 16)))
                i += 3
                continue
            except ValueError:
                pass
        out.append(c)
        i += 1
    return "".join(out)


def notifyWants(notify: str | None, action: str) -> bool:
    """
    Whether a recipient's C{NOTIFY} parameter asks for a notice of C{action}.
    Without NOTIFY, failures and delays are reported, successes are not
    (RFC 3461 section 4.1).
    """
    if notify is None or notify == "":
        return action in (FAILED, DELAYED)
    keywords = {k.strip().upper() for k in notify.split(",")}
    if "NEVER" in keywords:
        return False
    return _NOTIFY_FOR[action] in keywords


def _date(t: float) -> str:
    return email.utils.formatdate(t, localtime=False)


def _headerOnly(message: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = message.find(sep)
        if i >= 0:
            return message[: i + len(sep)]
    return message


def _crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


_SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
    DELIVERED: "Successful Mail Delivery Report",
    RELAYED: "Mail Relayed to a System Without Delivery Reports",
    EXPANDED: "Mail Delivered to an Alias",
}

_EXPLANATIONS = {
    FAILED: "Your message could not be delivered to the recipients below. This is a permanent error;\n"
            "the message will not be tried again.",
    DELAYED: "Your message has not been delivered yet to the recipients below. Delivery is being retried;\n"
             "you do not need to resend it. You will be told if it finally fails.",
    DELIVERED: "Your message was delivered to the recipients below, as you asked to be told.",
    RELAYED: "Your message was passed on to a system that does not send delivery reports;\n"
             "no further notice will come for the recipients below.",
    EXPANDED: "Your message was delivered to the alias below and passed on to its members.",
}


def buildReport(*, reportingMTA: str, sender: str, queueId: str, arrival: float, now: float,
                reports: list[RecipientReport], original: bytes, ret: str | None = None,
                envid: str | None = None) -> bytes:
    """
    The complete notice message (CRLF line endings), addressed to C{sender}.
    All C{reports} should share one action (one notice per kind of event).
    """
    if not reports:
        raise ValueError("a delivery status notification needs at least one recipient")
    action = reports[0].action
    boundary = f"=_mailplat_{secrets.token_hex(12)}"
    # RFC 6533: UTF-8 addresses, or a returned message with UTF-8 header
    # fields, call for the "global" types (message/delivery-status,
    # message/rfc822 and text/rfc822-headers are ASCII only).
    utf8Headers = not _headerOnly(original).isascii()
    international = utf8Headers or not sender.isascii() or any(
        not r.recipient.isascii() or not (r.originalRecipient or "").isascii() for r in reports
    )
    reportType = "global-delivery-status" if international else "delivery-status"
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reportingMTA}>",
        f"To: <{sender}>",
        f"Subject: {_SUBJECTS[action]}",
        f"Date: {_date(now)}",
        f"Message-ID: <{queueId}.{secrets.token_hex(6)}.dsn@{reportingMTA}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type={reportType};\r\n\tboundary="{boundary}"',
    ]
    lines = [
        f"This is the mail system at {reportingMTA}.",
        "",
        _EXPLANATIONS[action],
        "",
    ]
    for r in reports:
        lines.append(f"<{r.recipient}>: {r.diagnostic or r.status}")
    text = "\n".join(lines) + "\n"

    fields = [f"Reporting-MTA: dns; {reportingMTA}"]
    if envid:
        fields.append(f"Original-Envelope-Id: {xtextDecode(envid)}")
    fields.append(f"X-Mailplat-Queue-ID: {queueId}")
    fields.append(f"Arrival-Date: {_date(arrival)}")
    blocks = ["\n".join(fields)]
    for r in reports:
        block = []
        if r.originalRecipient:
            kind, _, addr = r.originalRecipient.partition(";")
            block.append(f"Original-Recipient: {kind.strip() or 'rfc822'}; {xtextDecode(addr.strip())}")
        block.append(f"Final-Recipient: {'rfc822' if r.recipient.isascii() else 'utf-8'}; {r.recipient}")
        block.append(f"Action: {r.action}")
        block.append(f"Status: {r.status}")
        if r.remoteMTA:
            block.append(f"Remote-MTA: dns; {r.remoteMTA}")
        if r.diagnostic:
            # RFC 3464 §2.3.6: "smtp" names an SMTP reply; our own words get a type of their own.
            kind = "smtp" if re.match(r"[245]\d\d(?:[ -]|$)", r.diagnostic) else "x-mailplat"
            block.append(f"Diagnostic-Code: {kind}; {r.diagnostic}")
        if r.lastAttempt is not None:
            block.append(f"Last-Attempt-Date: {_date(r.lastAttempt)}")
        if r.willRetryUntil is not None:
            block.append(f"Will-Retry-Until: {_date(r.willRetryUntil)}")
        blocks.append("\n".join(block))
    status = "\n\n".join(blocks) + "\n"

    full = action == FAILED and (ret or "FULL").upper() != "HDRS"
    if full:
        kind = b"message/global" if utf8Headers else b"message/rfc822"
        attached = b"Content-Type: " + kind + b"\r\nContent-Description: Undelivered Message\r\n\r\n" + original
    else:
        kind = b"message/global-headers" if utf8Headers else b"text/rfc822-headers"
        attached = b"Content-Type: " + kind + b"\r\nContent-Description: Message Headers\r\n\r\n" + _headerOnly(original)
    if not attached.endswith(b"\r\n"):
        attached += b"\r\n"
    b = boundary.encode()
    return (
        _crlf("\n".join(headers) + "\n\nThis is a MIME-encapsulated message.\n\n")
        + b"--" + b + b"\r\n"
        + b"Content-Type: text/plain; charset=utf-8\r\nContent-Description: Notification\r\n\r\n"
        + _crlf(text) + b"\r\n"
        + b"--" + b + b"\r\n"
        + b"Content-Type: message/" + reportType.encode() + b"\r\nContent-Description: Delivery report\r\n\r\n"
        + _crlf(status) + b"\r\n"
        + b"--" + b + b"\r\n"
        + attached
        + b"--" + b + b"--\r\n"
    )
