"""
One role per process on one data directory: C{twistd mailplat-smtp} takes
and delivers mail, C{twistd mailplat-imap} serves it; an IMAP session
selected before the delivery is told of the new message, of a flag change
and of an expunge made through the other process.
"""

import imaplib
import re
import smtplib
import time

import pytest

from helpers import DEFAULT_PORTS, MailplatProcess, freePorts, prepareData

pytestmark = pytest.mark.integration

USER = "alice@example.org"
PASSWORD = "correct horse battery staple"


@pytest.fixture
def roles(tmp_path):
    ports = dict(zip(DEFAULT_PORTS, freePorts(len(DEFAULT_PORTS))))
    prepareData(tmp_path, ports, USER, PASSWORD)
    smtp = MailplatProcess(str(tmp_path), ["--config", "mailplat.toml"], ports=ports, plugin="mailplat-smtp")
    imap = MailplatProcess(str(tmp_path), ["--config", "mailplat.toml"], ports=ports, plugin="mailplat-imap")
    smtp.logPath = str(tmp_path / "smtp.log")
    imap.logPath = str(tmp_path / "imap.log")
    smtp.start(waitFor=["smtp"])
    imap.start(waitFor=["imap"])
    yield ports
    smtp.stop()
    imap.stop()


def message(n):
    return (f"From: bob@example.net\r\nTo: {USER}\r\nSubject: message {n}\r\n"
            f"Message-ID: <roles{n}@example.net>\r\n\r\nbody {n}\r\n").encode()


def untilNoop(imap, pattern, seconds=10.0):
    """NOOP until an untagged response matches C{pattern}; all the untagged responses seen."""
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        typ, _ = imap.noop()
        assert typ == "OK"
        for kind in ("EXISTS", "EXPUNGE", "FETCH"):
            seen += [(kind, v) for v in imap.untagged_responses.pop(kind, [])]
        if any(re.search(pattern, f"{kind} {v!r}") for kind, v in seen):
            return seen
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} within {seconds}s; saw {seen}")


def test_imapProcessSeesTheSmtpProcessesDeliveries(roles):
    with smtplib.SMTP("127.0.0.1", roles["smtp"], timeout=30) as s:
        s.sendmail("bob@example.net", [USER], message(1))
    imap = imaplib.IMAP4("127.0.0.1", roles["imap"], timeout=30)
    try:
        imap.login(USER, PASSWORD)
        # The first message may still be on its way through the queue.
        deadline = time.monotonic() + 10
        while int(imap.select("INBOX")[1][0]) < 1:
            assert time.monotonic() < deadline, "the first message never arrived"
            time.sleep(0.1)
        with smtplib.SMTP("127.0.0.1", roles["smtp"], timeout=30) as s:
            s.sendmail("bob@example.net", [USER], message(2))
        untilNoop(imap, r"EXISTS b'2'")
        typ, data = imap.fetch("2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK" and b"message 2" in data[0][1]

        # A change made by this process is seen by the other one's IMAP too:
        # a second session in the IMAP process is told of the first's flag.
        other = imaplib.IMAP4("127.0.0.1", roles["imap"], timeout=30)
        try:
            other.login(USER, PASSWORD)
            other.select("INBOX")
            imap.store("1", "+FLAGS", r"(\Flagged)")
            untilNoop(other, r"FETCH .*Flagged")
            imap.store("1", "+FLAGS", r"(\Deleted)")
            imap.expunge()
            untilNoop(other, r"EXPUNGE b'1'")
        finally:
            other.logout()
    finally:
        imap.logout()
