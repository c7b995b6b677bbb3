import email
from email import policy

from mailplat.outbound.dsn import (
    DELAYED, DELIVERED, FAILED, RecipientReport, buildReport, notifyWants, xtextDecode,
)

ORIGINAL = b"From: a@example.org\r\nTo: x@remote.test\r\nSubject: hi\r\n\r\nbody\r\n"


def parse(raw):
    return email.message_from_bytes(raw, policy=policy.default)


def test_failureReportFields():
    raw = buildReport(
        reportingMTA="mx.example.org", sender="a@example.org", queueId="Q1", arrival=1_700_000_000, now=1_700_000_100,
        reports=[RecipientReport("x@remote.test", FAILED, "5.1.1", "550 5.1.1 no such user", "mx.remote.test",
                                 originalRecipient="rfc822;X+2Bext@remote.test", lastAttempt=1_700_000_090)],
        original=ORIGINAL, envid="ENV+2B1",
    )
    assert b"\n" not in raw.replace(b"\r\n", b"")
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"].addresses[0].addr_spec == "a@example.org"
    assert msg["Auto-Submitted"] == "auto-replied"
    text, status, returned = msg.get_payload()
    assert text.get_content_type() == "text/plain"
    assert "550 5.1.1 no such user" in text.get_content()
    assert status.get_content_type() == "message/delivery-status"
    perMessage, perRecipient = status.get_payload()
    assert perMessage["Reporting-MTA"] == "dns; mx.example.org"
    assert perMessage["Original-Envelope-Id"] == "ENV+1"
    assert perMessage["Arrival-Date"].startswith("Tue, 14 Nov 2023")
    assert perRecipient["Final-Recipient"] == "rfc822; x@remote.test"
    assert perRecipient["Original-Recipient"] == "rfc822; X+ext@remote.test"
    assert perRecipient["Action"] == "failed"
    assert perRecipient["Status"] == "5.1.1"
    assert perRecipient["Remote-MTA"] == "dns; mx.remote.test"
    assert perRecipient["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert returned.get_content_type() == "message/rfc822"
    assert returned.get_payload()[0]["Subject"] == "hi"


def test_headersOnlyForRetHdrsAndDelays():
    for action, ret in ((FAILED, "HDRS"), (DELAYED, None), (DELIVERED, None)):
        raw = buildReport(reportingMTA="m", sender="a@b", queueId="Q", arrival=0, now=0, ret=ret,
                          reports=[RecipientReport("x@y", action, "4.4.1" if action == DELAYED else "2.0.0")],
                          original=ORIGINAL)
        returned = parse(raw).get_payload()[2]
        assert returned.get_content_type() == "text/rfc822-headers"
        assert b"body" not in raw.split(b"text/rfc822-headers")[1]


def test_notify():
    assert notifyWants(None, FAILED) and notifyWants(None, DELAYED) and not notifyWants(None, DELIVERED)
    assert notifyWants("SUCCESS,FAILURE", DELIVERED)
    assert not notifyWants("SUCCESS", FAILED)
    assert not notifyWants("NEVER", FAILED)
    assert notifyWants("delay", DELAYED)
    assert xtextDecode("a+2Bb+3Dc") == "a+b=c"


def test_internationalReportUsesTheGlobalTypes():
    """RFC 6533: a UTF-8 address or returned header fields call for the global types and the utf-8 address type."""
    original = "From: josé@example.org\r\nTo: jösé@remote.test\r\nSubject: olá\r\n\r\nbody\r\n".encode()
    for ret, returnedType in ((None, "message/global"), ("HDRS", "message/global-headers")):
        raw = buildReport(reportingMTA="mx.example.org", sender="josé@example.org", queueId="Q2", arrival=0, now=0,
                          reports=[RecipientReport("jösé@remote.test", FAILED, "5.6.7", "no SMTPUTF8 there")],
                          original=original, ret=ret)
        msg = parse(raw)
        assert msg.get_param("report-type") == "global-delivery-status"
        text, status, returned = msg.get_payload()
        assert status.get_content_type() == "message/global-delivery-status"
        assert "Final-Recipient: utf-8; jösé@remote.test".encode() in raw
        assert returned.get_content_type() == returnedType
    raw = buildReport(reportingMTA="m", sender="a@b", queueId="Q", arrival=0, now=0,
                      reports=[RecipientReport("x@y", FAILED, "5.1.1")], original=ORIGINAL)
    assert b"global" not in raw, "ASCII stays with RFC 3464's types"


def test_diagnosticTypeNamesWhatTheTextIs():
    """RFC 3464 §2.3.6: "smtp" only for an SMTP reply."""
    raw = buildReport(reportingMTA="m", sender="a@b", queueId="Q", arrival=0, now=0,
                      reports=[RecipientReport("x@y", FAILED, "4.4.7", "delivery time expired")], original=ORIGINAL)
    assert b"Diagnostic-Code: x-mailplat; delivery time expired" in raw
