"""
The shared namespace against real clients, with two IMAP worker processes:
imapclient (NAMESPACE, LIST, SELECT, IDLE told of SMTP delivery to the
owner, a read-only grant), curl reading a shared message.
"""

import smtplib
import subprocess
import time

import pytest

from helpers import DEFAULT_PORTS, MailplatProcess, freePorts, mailplatCommand, prepareData, requirePeer

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
USER, OWNER = "alice@example.org", "sales@example.org"
PASSWORD = "shared namespace secret"
PORTS = {}
GRANTS = f"""
[[imap.shared]]
name = "Sales"
owner = "{OWNER}"
users = ["@example.org"]

[[imap.shared]]
name = "Announcements"
owner = "{OWNER}"
mailbox = "Announcements"
users = ["*"]
read_only = true
"""


def deliver(subject, to=OWNER):
    with smtplib.SMTP(HOST, PORTS["smtp"], timeout=30) as smtp:
        smtp.sendmail("orders@example.net", [to], (
            f"From: orders@example.net\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@example.net>\r\n\r\n{subject}\r\n"
        ).encode())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("imap-shared")
    PORTS.update(zip(DEFAULT_PORTS, freePorts(len(DEFAULT_PORTS))))
    prepareData(workdir, PORTS, USER, PASSWORD, extra=GRANTS, sections={"imap": "processes = 2"})
    r = mailplatCommand(str(workdir), "--config", "mailplat.toml", "user", "add", OWNER, input=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    proc = MailplatProcess(str(workdir), ["--config", "mailplat.toml"], ports=PORTS).start(waitFor=["imap", "smtp"])
    from imapclient import IMAPClient

    with IMAPClient(HOST, port=PORTS["imap"], ssl=False, timeout=30) as owner:
        owner.login(OWNER, PASSWORD)
        owner.create_folder("Announcements")
        owner.append("Announcements", b"From: boss@example.org\r\nSubject: welcome\r\n\r\nHello all\r\n")
    deliver("order one")
    yield proc
    proc.stop()


def connect(user=USER):
    from imapclient import IMAPClient

    c = IMAPClient(HOST, port=PORTS["imap"], ssl=False, timeout=30)
    c.login(user, PASSWORD)
    return c


def test_imapclient_sees_and_works_in_the_shared_namespace(server):
    c = connect()
    try:
        ns = c.namespace()
        assert ns.personal[0][0] == "" and ns.shared == (("Shared/", "/"),)
        names = [name for _, _, name in c.list_folders()]
        assert {"INBOX", "Shared", "Shared/Sales", "Shared/Announcements"} <= set(names)
        info = c.select_folder("Shared/Sales")
        assert info[b"EXISTS"] == 1
        assert c.fetch([1], ["BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])[1][b"BODY[HEADER.FIELDS (SUBJECT)]"].strip() \
            == b"Subject: order one"
        c.add_flags([1], [b"\\Flagged"])
        c.idle()
        start = time.monotonic()
        deliver("order two")
        responses = c.idle_check(timeout=10)
        c.idle_done()
        assert any(r[1] == b"EXISTS" for r in responses), responses
        assert time.monotonic() - start < 5
    finally:
        c.logout()
    owner = connect(OWNER)
    try:
        owner.select_folder("INBOX")
        assert owner.get_flags([1])[1] == (b"\\Flagged",)
        assert len(owner.search(["ALL"])) == 2
    finally:
        owner.logout()


def test_read_only_grant_refuses_changes(server):
    from imapclient.exceptions import IMAPClientError

    c = connect()
    try:
        # (imaplib gives up on a session whose SELECT answered READ-ONLY:
        # EXAMINE here; SELECT's [READ-ONLY] is in tests/test_imap_shared.py.)
        info = c.select_folder("Shared/Announcements", readonly=True)
        assert info[b"READ-ONLY"] == [b""] and info[b"EXISTS"] == 1
        with pytest.raises(IMAPClientError, match="NOPERM"):
            c.append("Shared/Announcements", b"Subject: nope\r\n\r\nx\r\n")
        with pytest.raises(IMAPClientError, match="NOPERM"):
            c.create_folder("Shared/Mine")
    finally:
        c.logout()


def test_curl_reads_a_shared_message(server):
    requirePeer("curl")
    r = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-u", f"{USER}:{PASSWORD}",
         f"imap://{HOST}:{PORTS['imap']}/Shared%2FSales;UID=1"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "Subject: order one" in r.stdout
