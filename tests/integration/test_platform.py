"""
The platform end to end: C{twistd -n mailplat} on its embedded default,
driven by Python's smtplib, imaplib and poplib over plain, STARTTLS and
implicit-TLS connections, then killed with SIGKILL right after a 250.
"""

import imaplib
import json
import poplib
import re
import smtplib
import ssl
import time
import urllib.request

import pytest

from helpers import DEFAULT_PORTS, MailplatProcess, freePorts, mailplatCommand, prepareData, waitForPort

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
USER = "alice@example.org"
#: This module's listeners, on free ports (filled in by the server fixture).
PORTS = {}
PASSWORD = "correct horse battery staple"


def tlsContext():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def makeMessage(subject, body="Hello.\r\n.leading dot line\r\n..two dots\r\n"):
    return (
        f"From: Bob <bob@example.net>\r\nTo: Alice <{USER}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@example.net>\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    ).encode("utf-8")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("platform")
    PORTS.update(zip(DEFAULT_PORTS, freePorts(len(DEFAULT_PORTS))))
    prepareData(workdir, PORTS, USER, PASSWORD)
    proc = MailplatProcess(str(workdir), ["--config", "mailplat.toml"], ports=PORTS).start()
    yield proc
    proc.stop()


def imapFetchAll(imap):
    imap.select("INBOX")
    typ, data = imap.uid("SEARCH", None, "ALL")
    assert typ == "OK"
    out = {}
    for uid in data[0].split():
        typ, resp = imap.uid("FETCH", uid, "(BODY.PEEK[])")
        assert typ == "OK"
        out[int(uid)] = resp[0][1]
    return out


def waitForMessage(subject, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with imaplib.IMAP4(HOST, PORTS["imap"]) as imap:
            imap.login(USER, PASSWORD)
            for uid, raw in imapFetchAll(imap).items():
                if f"Subject: {subject}\r\n".encode() in raw:
                    return raw
        time.sleep(0.1)
    raise AssertionError(f"message {subject!r} never arrived")


def stripReceived(raw: bytes) -> bytes:
    # Final delivery's Return-Path: (RFC 5321 §4.4), the envelope sender.
    assert re.match(rb"Return-Path: <[^<>\r\n]*>\r\n", raw), raw[:200]
    raw = raw[raw.index(b"\r\n") + 2:]
    assert raw.startswith(b"Received: "), raw[:200]
    # The one Received: header we add, folded over several lines.
    end = raw.index(b"\r\n", 0)
    while raw[end + 2:end + 3] in (b" ", b"\t"):
        end = raw.index(b"\r\n", end + 2)
    return raw[end + 2:]


def test_smtpToImapAndPop3ByteIdentical(server):
    msg = makeMessage("plain-path")
    with smtplib.SMTP(HOST, PORTS["smtp"]) as s:
        s.ehlo("client.example.net")
        refused = s.sendmail("bob@example.net", [USER], msg)
        assert refused == {}
    raw = waitForMessage("plain-path")
    assert stripReceived(raw) == msg
    assert b"by mail.example.org" in raw or b"by localhost" in raw

    pop = poplib.POP3(HOST, PORTS["pop3"])
    try:
        pop.user(USER)
        pop.pass_(PASSWORD)
        count, _ = pop.stat()
        found = False
        for i in range(1, count + 1):
            resp, lines, octets = pop.retr(i)
            body = b"\r\n".join(lines) + b"\r\n"
            if b"Subject: plain-path" in body:
                assert stripReceived(body) == msg
                size = int(pop.list(i).split()[2])
                assert size == len(body), "LIST size must equal the octets RETR sends"
                found = True
        assert found
    finally:
        pop.quit()


def test_startTLSEverywhere(server):
    msg = makeMessage("starttls-path")
    with smtplib.SMTP(HOST, PORTS["smtp"]) as s:
        s.starttls(context=tlsContext())
        s.ehlo()
        s.sendmail("bob@example.net", [USER], msg)
    assert stripReceived(waitForMessage("starttls-path")) == msg

    imap = imaplib.IMAP4(HOST, PORTS["imap"])
    imap.starttls(ssl_context=tlsContext())
    imap.login(USER, PASSWORD)
    bodies = imapFetchAll(imap)
    imap.logout()
    assert any(stripReceived(b) == msg for b in bodies.values())

    pop = poplib.POP3(HOST, PORTS["pop3"])
    pop.stls(context=tlsContext())
    pop.user(USER)
    pop.pass_(PASSWORD)
    assert pop.stat()[0] >= 1
    pop.quit()


def test_implicitTLSAndSubmission(server):
    msg = makeMessage("submissions-path")
    with smtplib.SMTP_SSL(HOST, PORTS["submissions"], context=tlsContext()) as s:
        s.login(USER, PASSWORD)
        s.sendmail(USER, [USER], msg)
    assert stripReceived(waitForMessage("submissions-path")) == msg

    with smtplib.SMTP(HOST, PORTS["submission"]) as s:
        s.ehlo()
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            s.sendmail(USER, [USER], msg)
        assert e.value.smtp_code == 530
        s.starttls(context=tlsContext())
        s.login(USER, PASSWORD)
        s.sendmail(USER, [USER], makeMessage("submission-path"))
    waitForMessage("submission-path")

    imap = imaplib.IMAP4_SSL(HOST, PORTS["imaps"], ssl_context=tlsContext())
    imap.login(USER, PASSWORD)
    assert any(stripReceived(b) == msg for b in imapFetchAll(imap).values())
    imap.logout()

    pop = poplib.POP3_SSL(HOST, PORTS["pop3s"], context=tlsContext())
    pop.user(USER)
    pop.pass_(PASSWORD)
    assert pop.stat()[0] >= 1
    pop.quit()


def test_noOpenRelay(server):
    with smtplib.SMTP(HOST, PORTS["smtp"]) as s:
        s.ehlo()
        s.mail("bob@example.net")
        code, text = s.rcpt("someone@elsewhere.example")
        assert code == 550 and text.startswith(b"5.7.1"), (code, text)
        code, text = s.rcpt("nobody@example.org")
        assert code == 550 and text.startswith(b"5.1.1"), (code, text)
        for trick in ("someone%elsewhere.example@example.org", '"someone@elsewhere.example"@example.org',
                      "@example.org:someone@elsewhere.example"):
            code, text = s.rcpt(trick)
            assert code >= 500, (trick, code, text)


def test_healthAndMetrics(server):
    with urllib.request.urlopen(f"http://{HOST}:{PORTS['http']}/healthz", timeout=10) as r:
        assert r.status == 200
        assert json.loads(r.read())["status"] == "ok"
    with urllib.request.urlopen(f"http://{HOST}:{PORTS['http']}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "mailplat_messages_received_total" in text
    received = [l for l in text.splitlines() if l.startswith("mailplat_messages_received_total")]
    assert received and float(received[0].split()[-1]) >= 1


def test_sigkillAfter250LosesNothing(server, tmp_path):
    """Each message acknowledged with 250 survives an immediate SIGKILL."""
    subjects = [f"crash-{i}" for i in range(5)]
    s = smtplib.SMTP(HOST, PORTS["smtp"])
    for subject in subjects:
        assert s.sendmail("bob@example.net", [USER], makeMessage(subject)) == {}
    server.kill()
    s.close()
    server.start()
    for subject in subjects:
        raw = waitForMessage(subject)
        assert stripReceived(raw) == makeMessage(subject)
    # Exactly once each.
    with imaplib.IMAP4(HOST, PORTS["imap"]) as imap:
        imap.login(USER, PASSWORD)
        bodies = imapFetchAll(imap).values()
        for subject in subjects:
            assert sum(1 for b in bodies if f"Subject: {subject}\r\n".encode() in b) == 1


def test_embeddedDefaultWithoutConfig(tmp_path):
    """No config at all: data under ./mailplat-data and every documented loopback port."""
    for args, inp in ((["domain", "add", "example.org"], None), (["user", "add", USER], PASSWORD + "\n")):
        r = mailplatCommand(tmp_path, *args, input=inp)
        assert r.returncode == 0, r.stderr
    proc = MailplatProcess(str(tmp_path)).start()
    try:
        greetings = {"smtp": b"220 ", "submission": b"220 ", "imap": b"* OK", "pop3": b"+OK"}
        import socket

        for name, port in DEFAULT_PORTS.items():
            waitForPort(port, proc=proc.proc)
            if name in greetings:
                with socket.create_connection((HOST, port), timeout=10) as s:
                    assert s.recv(100).startswith(greetings[name]), name
        with imaplib.IMAP4_SSL(HOST, DEFAULT_PORTS["imaps"], ssl_context=tlsContext()) as imap:
            imap.login(USER, PASSWORD)
        assert (tmp_path / "mailplat-data" / "store" / "index.sqlite").exists()
        assert (tmp_path / "mailplat-data" / "tls" / "cert.pem").exists()
    finally:
        proc.stop()
