"""
Outbound delivery end to end: mail submitted to mailplat (submission port,
AUTH) for remote domains, routed by MX records from a test DNS server, to a
real Postfix on 127.0.0.1 that delivers into a Maildir; a failing recipient
comes back as an RFC 3464 bounce, an unreachable one as a delay notice; and
a SIGKILL in the middle of relaying loses nothing.
"""

import email
import imaplib
import json
import os
import pathlib
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from email import policy

import pytest

from helpers import DEFAULT_PORTS, MailplatProcess, PrivatePostfix, eventually, freePorts, prepareData

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
USER = "alice@example.org"
PASSWORD = "alice-password"

@pytest.fixture(scope="module")
def postfix():
    """A private Postfix accepting mail for remote.test over STARTTLS into a Maildir."""
    from mailplat.tls import generateSelfSigned

    mail = pathlib.Path(tempfile.mkdtemp(prefix="mailplat-postfix-mail-"))
    mail.chmod(0o755)
    shutil.chown(mail, "nobody", "nogroup")
    nobody = int(subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True).stdout)
    nogroup = int(subprocess.run(["id", "-g", "nobody"], capture_output=True, text=True).stdout)
    certs = pathlib.Path(tempfile.mkdtemp(prefix="mailplat-postfix-tls-"))
    certs.chmod(0o755)
    generateSelfSigned(str(certs / "cert.pem"), str(certs / "key.pem"), "mx.remote.test")
    postfix = PrivatePostfix(f"""
myhostname = mx.remote.test
mydomain = remote.test
myorigin = remote.test
mynetworks = 127.0.0.2/32
relay_domains =
virtual_mailbox_domains = remote.test
virtual_mailbox_base = {mail}
virtual_mailbox_maps = inline:{{rcpt@remote.test=rcpt/}}
virtual_uid_maps = static:{nobody}
virtual_gid_maps = static:{nogroup}
virtual_minimum_uid = 1
smtpd_tls_security_level = may
smtpd_tls_cert_file = {certs}/cert.pem
smtpd_tls_key_file = {certs}/key.pem
smtpd_tls_loglevel = 1
smtputf8_enable = yes
smtp_dns_support_level = disabled
default_transport = error:outbound mail disabled in this test
""").start()
    try:
        yield postfix.port, mail / "rcpt", postfix.maillog
    finally:
        postfix.stop()
        shutil.rmtree(mail, ignore_errors=True)
        shutil.rmtree(certs, ignore_errors=True)


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    zone = {
        "remote.test": [["MX", 10, "mx.remote.test"]],
        "mx.remote.test": [["A", "127.0.0.1"]],
        # Nothing listens on 127.0.0.2 at that port: connection refused, retried later.
        "slow.test": [["MX", 10, "mx.slow.test"]],
        "mx.slow.test": [["A", "127.0.0.2"]],
        "null.test": [["MX", 0, ""]],
    }
    portFile = tmp_path_factory.mktemp("dns") / "port"
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "dnsserver.py"), str(portFile),
                             json.dumps(zone)])
    deadline = time.monotonic() + 20
    while not portFile.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the test DNS server did not start"
        time.sleep(0.05)
    yield int(portFile.read_text())
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def platform(tmp_path_factory, postfix, dns):
    port, _, _ = postfix
    workdir = tmp_path_factory.mktemp("outbound")
    ports = dict(zip(DEFAULT_PORTS, freePorts(len(DEFAULT_PORTS))))
    extra = f"""
[queue]
retry_schedule = [1]

[outbound]
port = {port}
dns_servers = ["127.0.0.1:{dns}"]
tls = "opportunistic"
delay_warning = 2
connect_timeout = 5
"""
    prepareData(workdir, ports, USER, PASSWORD, extra=extra)
    proc = MailplatProcess(str(workdir), ["--config", "mailplat.toml"], ports=ports).start()
    yield proc
    proc.stop()


def submit(platform, recipients, subject, rcpt_options=(), mail_options=()):
    with smtplib.SMTP(HOST, platform.ports["submission"]) as s:
        s.login(USER, PASSWORD)
        refused = s.sendmail(USER, recipients, f"From: {USER}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@example.org>"
                                               f"\r\n\r\nbody of {subject}\r\n".encode(),
                             mail_options=list(mail_options), rcpt_options=list(rcpt_options))
        assert refused == {}


def maildirMessages(maildir):
    """The messages Postfix delivered, with CRLF line ends (Postfix writes LF)."""
    out = []
    for sub in ("new", "cur"):
        d = maildir / sub
        if d.exists():
            out += [p.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for p in sorted(d.iterdir())]
    return out


def waitFor(predicate, timeout=30, what="condition"):
    return eventually(predicate, timeout, what, interval=0.2)


def inbox(platform):
    with imaplib.IMAP4(HOST, platform.ports["imap"]) as imap:
        imap.login(USER, PASSWORD)
        imap.select("INBOX", readonly=True)
        typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
        return [email.message_from_bytes(item[1], policy=policy.default) for item in data if isinstance(item, tuple)]


def test_deliveredToPostfixThroughMXWithTLS(platform, postfix):
    _, maildir, maillog = postfix
    submit(platform, ["rcpt@remote.test"], "relayed-1", rcpt_options=["NOTIFY=FAILURE"],
           mail_options=["RET=HDRS", "ENVID=env1"])
    msgs = waitFor(lambda: [m for m in maildirMessages(maildir) if b"Subject: relayed-1" in m], what="the relayed message")
    assert len(msgs) == 1
    assert b"body of relayed-1" in msgs[0]
    log = maillog.read_text()
    assert "TLS connection established from localhost[127.0.0.1]" in log, log[-2000:]
    assert "to=<rcpt@remote.test>" in log and "status=sent" in log


def test_failureComesBackAsABounce(platform):
    submit(platform, ["nobody@remote.test"], "bounce-me", mail_options=["ENVID=envbounce"])

    def bounce():
        return [m for m in inbox(platform) if m["Subject"] == "Undelivered Mail Returned to Sender"
                and "nobody@remote.test" in m.get_payload()[1].get_payload()[1]["Final-Recipient"]]

    [notice] = waitFor(bounce, what="the bounce")
    assert notice.get_content_type() == "multipart/report"
    text, status, returned = notice.get_payload()
    perMessage, perRecipient = status.get_payload()
    assert perMessage["Reporting-MTA"] == "dns; mail.example.org"
    assert perMessage["Original-Envelope-Id"] == "envbounce"
    assert perRecipient["Action"] == "failed"
    assert perRecipient["Status"] == "5.1.1"
    assert perRecipient["Remote-MTA"] == "dns; mx.remote.test"
    assert perRecipient["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    assert returned.get_payload()[0]["Subject"] == "bounce-me"
    assert "nobody@remote.test" in text.get_content()


def test_nullMXBouncesAtOnce(platform):
    submit(platform, ["x@null.test"], "null-mx")
    [notice] = waitFor(lambda: [m for m in inbox(platform) if m["Subject"] == "Undelivered Mail Returned to Sender"
                                and "x@null.test" in str(m.get_payload()[1].get_payload()[1]["Final-Recipient"])],
                       what="the null MX bounce")
    assert notice.get_payload()[1].get_payload()[1]["Status"] == "5.1.10"


def test_unreachableDestinationGetsADelayNotice(platform):
    submit(platform, ["someone@slow.test"], "slow-one")

    def delayed():
        return [m for m in inbox(platform) if m["Subject"] == "Delayed Mail (still being retried)"]

    [notice] = waitFor(delayed, timeout=60, what="the delay notice")
    block = notice.get_payload()[1].get_payload()[1]
    assert block["Action"] == "delayed"
    assert block["Status"].startswith("4.")
    assert "Will-Retry-Until" in block
    # Only one delay notice, however many retries.
    time.sleep(3)
    assert len(delayed()) == 1


def test_sigkillWhileRelayingLosesNothing(platform, postfix):
    _, maildir, _ = postfix
    subjects = [f"burst-{i}" for i in range(40)]
    with smtplib.SMTP(HOST, platform.ports["submission"]) as s:
        s.login(USER, PASSWORD)
        for subject in subjects:
            s.sendmail(USER, ["rcpt@remote.test"], f"Subject: {subject}\r\n\r\nx\r\n".encode())
    platform.kill()
    platform.start()
    waitFor(lambda: all(any(f"Subject: {s}\r\n".encode() in m for m in maildirMessages(maildir)) for s in subjects),
            timeout=60, what="every message of the burst at Postfix")
    counts = {s: sum(1 for m in maildirMessages(maildir) if f"Subject: {s}\r\n".encode() in m) for s in subjects}
    # At least once; a message being relayed at the moment of the kill may arrive twice.
    assert all(1 <= c <= 2 for c in counts.values()), counts
    assert sum(c - 1 for c in counts.values()) <= 10, counts
