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
import socket
import subprocess
import sys
import tempfile
import time
from email import policy

import pytest

from helpers import DEFAULT_PORTS, MailplatProcess, configForPorts, freePorts, mailplatCommand, requirePeer, waitForPort

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
USER = "alice@example.org"
PASSWORD = "alice-password"

MASTER = """\
{port}  inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@pytest.fixture(scope="module")
def postfix():
    """A private Postfix accepting mail for remote.test over STARTTLS into a Maildir."""
    postfixCmd = requirePeer("postfix")
    if os.geteuid() != 0:
        pytest.skip("running a private Postfix instance needs root")
    (port,) = freePorts(1)
    top = pathlib.Path(tempfile.mkdtemp(prefix="mailplat-postfix-out-"))
    top.chmod(0o755)
    base = top / "postfix"
    conf = base / "etc"
    mail = top / "mail"
    for d in (conf, base / "spool", base / "data", mail):
        d.mkdir(parents=True)
    shutil.chown(base / "data", "postfix", "postfix")
    shutil.chown(mail, "nobody", "nogroup")
    from mailplat.tls import generateSelfSigned

    generateSelfSigned(str(conf / "cert.pem"), str(conf / "key.pem"), "mx.remote.test")
    nobody = int(subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True).stdout)
    nogroup = int(subprocess.run(["id", "-g", "nobody"], capture_output=True, text=True).stdout)
    (conf / "main.cf").write_text(f"""
compatibility_level = 3.6
queue_directory = {base}/spool
data_directory = {base}/data
mail_owner = postfix
myhostname = mx.remote.test
mydomain = remote.test
myorigin = remote.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
mynetworks = 127.0.0.2/32
relay_domains =
virtual_mailbox_domains = remote.test
virtual_mailbox_base = {mail}
virtual_mailbox_maps = inline:{{rcpt@remote.test=rcpt/}}
virtual_uid_maps = static:{nobody}
virtual_gid_maps = static:{nogroup}
virtual_minimum_uid = 1
smtpd_tls_security_level = may
smtpd_tls_cert_file = {conf}/cert.pem
smtpd_tls_key_file = {conf}/key.pem
smtpd_tls_loglevel = 1
smtputf8_enable = yes
smtp_dns_support_level = disabled
default_transport = error:outbound mail disabled in this test
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
biff = no
""")
    (conf / "master.cf").write_text(MASTER.format(port=port))
    r = subprocess.run([postfixCmd, "-c", str(conf), "start"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        waitForPort(port, timeout=20)
        yield port, mail / "rcpt", base / "maillog"
    finally:
        subprocess.run([postfixCmd, "-c", str(conf), "stop"], capture_output=True, timeout=60)
        shutil.rmtree(top, ignore_errors=True)


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
    (workdir / "mailplat.toml").write_text(configForPorts(ports, str(workdir / "data"), extra))
    for args, inp in ((["domain", "add", "example.org"], None), (["user", "add", USER], PASSWORD + "\n")):
        r = mailplatCommand(workdir, "--config", "mailplat.toml", *args, input=inp)
        assert r.returncode == 0, r.stderr
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
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


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
