"""
POP3 against real download clients: poplib, fetchmail, getmail6, mpop,
C{curl pop3://} and C{openssl s_client -starttls pop3}, each on its own
account of a real mailplat (C{twistd -n mailplat}) on free ports.

Every account holds the same awkward mailbox: messages put in with IMAP
APPEND so their bytes are exactly ours (lines starting with ".", a lone "."
line, a last line without line end, bare LF line ends, a 200,000-octet
line, every octet value but NUL/CR/LF in an 8-bit part, raw UTF-8 in a
header), and two delivered by SMTP (an 8BITMIME body and a 10 MB message
full of dot lines).  Each client downloads them byte-exact -- up to what the
client itself is documented to change, stated next to each test -- over
TLS checked against the platform's own certificate (DATA/tls/cert.pem given
as the trusted CA), then deletes them when told and the mailbox is empty.

The last tests check what POP3 does to other clients of the same mailbox:
an IMAP session sees the deletions and keeps working, and an IMAP expunge
during a POP3 session is survived.
"""

from __future__ import annotations

import functools
import glob
import imaplib
import os
import poplib
import re
import smtplib
import ssl
import subprocess
import sys
import time

import pytest

from helpers import DEFAULT_PORTS, MailplatProcess, configForPorts, freePorts, mailplatCommand, requirePeer

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
HOSTNAME = "mail.example.org"
PASSWORD = "pop3 peers pass"
#: One account per client; "imap" is the mailbox shared with an IMAP session.
DOWNLOADERS = ("poplib", "fetchmail", "getmail", "mpop", "curl", "openssl")
PEERS = DOWNLOADERS + ("imap",)
PORTS: dict = {}

#: fetchmail reads message lines through an 8 KB buffer (MSGBUFSIZE) and
#: splits longer ones; its mailbox has a long line that fits.
FETCHMAIL_LONG_LINE = 8000


def user(peer):
    return f"{peer}@example.org"


def awkwardMessages(longLine=200_000):
    """The messages put in by IMAP APPEND, exactly as stored."""
    octets = bytes(b for b in range(1, 256) if b not in (10, 13))
    return [
        # Dots: first body line, a lone dot, two dots, dot-space, and a last
        # line that is a lone dot without a line end.
        b"From: Bob <bob@example.net>\r\nSubject: dots\r\n\r\n.first line starts with a dot\r\n.\r\n"
        b"..\r\n. space\r\nmiddle\r\n.",
        # Bare LF line ends (what an mbox import stores), with dot lines.
        b"From: Bob <bob@example.net>\nSubject: bare LF\n\n.\nbody\n..two\n.\n",
        # One line longer than any buffer on either side.
        b"From: Bob <bob@example.net>\r\nSubject: long line\r\n\r\n" + b"L" * longLine + b"\r\n.after\r\n",
        # Raw UTF-8 in a header; binary-looking 8-bit part.
        "From: Jürgen <j@example.net>\r\nSubject: Grüße ✓\r\nMIME-Version: 1.0\r\n".encode()
        + b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
        b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"caf\xe9 na\xefve\r\n.\r\n--b1\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + octets + b"\r\n." + octets[::-1] + b"\r\n--b1--\r\n",
    ]


@functools.lru_cache(maxsize=None)
def smtpMessages():
    """The messages delivered by SMTP (the store adds a Received: field)."""
    lines = []
    for i in range(10 * 1024 * 1024 // 76):
        lines.append(b"." if i % 1000 == 0 else b".%075d" % i if i % 7 == 0 else b"%076d" % i)
    big = b"From: Bob <bob@example.net>\r\nSubject: ten megabytes\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    assert len(big) > 10 * 1024 * 1024
    eight = (
        b"From: Bob <bob@example.net>\r\nSubject: 8bit body\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + "Ünïcödé body, ✓\r\n.\r\n".encode()
    )
    return (eight, big)


def crlf(raw: bytes) -> bytes:
    """What POP3 must send for C{raw}: every line end CRLF, a last one added."""
    out = re.sub(rb"\r\n|\r|\n", b"\r\n", raw)
    return out if out.endswith(b"\r\n") else out + b"\r\n"


def imapSession(peer):
    imap = imaplib.IMAP4(HOST, PORTS["imap"])
    imap.login(user(peer), PASSWORD)
    return imap


def storedMessages(peer):
    """The messages of C{peer}'s INBOX as IMAP reads them, in UID order."""
    imap = imapSession(peer)
    try:
        imap.select("INBOX", readonly=True)
        typ, data = imap.uid("SEARCH", None, "ALL")
        out = []
        for uid in data[0].split():
            typ, resp = imap.uid("FETCH", uid, "(BODY.PEEK[])")
            assert typ == "OK"
            out.append(resp[0][1])
        return out
    finally:
        imap.logout()


def messageCount(peer):
    imap = imapSession(peer)
    try:
        typ, data = imap.status("INBOX", "(MESSAGES)")
        return int(re.search(rb"MESSAGES (\d+)", data[0]).group(1))
    finally:
        imap.logout()


def addUsers(workdir, addresses):
    """C{mailplat user add} for every address, a few at a time (each costs a second)."""
    pending = list(addresses)
    while pending:
        batch, pending = pending[:4], pending[4:]
        procs = [
            subprocess.Popen([sys.executable, "-m", "mailplat.cli", "--config", "mailplat.toml", "user", "add", a],
                             cwd=workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for a in batch
        ]
        for proc in procs:
            out, err = proc.communicate(PASSWORD.encode() + b"\n", timeout=120)
            assert proc.returncode == 0, err


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pop3peers")
    PORTS.update(zip(DEFAULT_PORTS, freePorts(len(DEFAULT_PORTS))))
    (workdir / "mailplat.toml").write_text(configForPorts(PORTS, str(workdir / "data")))
    r = mailplatCommand(workdir, "--config", "mailplat.toml", "domain", "add", "example.org")
    assert r.returncode == 0, r.stderr
    addUsers(workdir, map(user, PEERS))
    proc = MailplatProcess(str(workdir), ["--config", "mailplat.toml"], ports=PORTS).start()
    # imaplib's append() turns every line end into CRLF; the bare-LF message
    # must reach the store as it is.
    mapCRLF, imaplib.MapCRLF = imaplib.MapCRLF, re.compile(rb"(?!)")
    try:
        for peer in PEERS:
            imap = imapSession(peer)
            longLine = FETCHMAIL_LONG_LINE if peer == "fetchmail" else 200_000
            for message in awkwardMessages(longLine):
                typ, _ = imap.append("INBOX", None, None, message)
                assert typ == "OK"
            imap.logout()
        imaplib.MapCRLF = mapCRLF
        with smtplib.SMTP(HOST, PORTS["smtp"]) as s:
            eight, big = smtpMessages()
            for message, peers in ((eight, PEERS), (big, DOWNLOADERS)):
                refused = s.sendmail("bob@example.net", [user(p) for p in peers], message,
                                     mail_options=["BODY=8BITMIME"])
                assert refused == {}
        deadline = time.monotonic() + 90
        for peer in PEERS:
            while messageCount(peer) < (6 if peer in DOWNLOADERS else 5):
                assert time.monotonic() < deadline, "SMTP messages never arrived"
                time.sleep(0.2)
        yield proc
    finally:
        imaplib.MapCRLF = mapCRLF
        proc.stop()


@pytest.fixture(scope="module")
def cert(server):
    return os.path.join(server.workdir, "data", "tls", "cert.pem")


def expected(peer):
    """What a byte-exact download of C{peer}'s mailbox gives, CRLF line ends."""
    stored = storedMessages(peer)
    longLine = FETCHMAIL_LONG_LINE if peer == "fetchmail" else 200_000
    # The APPENDed ones are compared with our own bytes, not only with what the
    # store gives back; the SMTP ones carry the Return-Path: and Received:
    # fields the platform adds.
    for appended, raw in zip(awkwardMessages(longLine), stored):
        assert raw == appended
    for sent, raw in zip(smtpMessages(), stored[4:]):
        assert raw.startswith(b"Return-Path: <") and b"\r\nReceived: " in raw[:300] and raw.endswith(sent)
    assert len(stored) == 6
    return [crlf(raw) for raw in stored]


def popStat(peer, cert=None):
    p = poplib.POP3(HOST, PORTS["pop3"], timeout=30)
    try:
        p.user(user(peer))
        p.pass_(PASSWORD)
        return p.stat()
    finally:
        p.quit()


def assertEmpty(peer):
    assert popStat(peer) == (0, 0)
    assert storedMessages(peer) == []


def assertSeen(peer):
    imap = imapSession(peer)
    try:
        imap.select("INBOX", readonly=True)
        typ, data = imap.uid("SEARCH", None, "UNSEEN")
        assert typ == "OK" and data[0] == b""
    finally:
        imap.logout()


def run(args, **kwargs):
    kwargs.setdefault("timeout", 120)
    result = subprocess.run(args, capture_output=True, **kwargs)
    assert result.returncode == 0, (args, result.returncode, result.stdout[-3000:], result.stderr[-3000:])
    return result


def files(pattern):
    """The contents of the files matching C{pattern}, oldest first."""
    paths = sorted(glob.glob(pattern), key=lambda p: (os.stat(p).st_mtime_ns, p))
    out = []
    for path in paths:
        with open(path, "rb") as f:
            out.append(f.read())
    return out


# --- the clients ---------------------------------------------------------------


def test_poplib(server, cert, monkeypatch):
    # poplib refuses lines over its _MAXLINE (2048) unless told otherwise.
    monkeypatch.setattr(poplib, "_MAXLINE", 1_000_000)
    want = expected("poplib")
    context = ssl.create_default_context(cafile=cert)
    p = poplib.POP3(HOST, PORTS["pop3"], timeout=30)
    p.stls(context)
    p.user(user("poplib"))
    p.pass_(PASSWORD)
    count, total = p.stat()
    assert count == len(want) and total == sum(map(len, want))
    sizes = [int(line.split()[1]) for line in p.list()[1]]
    got = []
    for i in range(1, count + 1):
        resp, lines, octets = p.retr(i)
        body = b"".join(line + b"\r\n" for line in lines)
        assert resp == b"+OK %d octets" % len(body)
        got.append(body)
    assert sizes == [len(m) for m in got]
    assert got == want
    uidl = p.uidl()[1]
    for i in range(1, count + 1):
        p.dele(i)
    p.quit()
    assertEmpty("poplib")
    # Unique-ids are "UIDVALIDITY-UID": unique, and gone with their messages.
    assert len(set(line.split()[1] for line in uidl)) == count


def fetchmailrc(tmp_path, cert, keep):
    mda = f"/bin/sh -c 'cat > {tmp_path}/msg.$$'"
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        "set no syslog\nset invisible\n"
        f"poll {HOSTNAME} via {HOST} port {PORTS['pop3']} protocol pop3 uidl no envelope\n"
        f'  user "{user("fetchmail")}" there with password "{PASSWORD}" is "me" here\n'
        f"  options {'keep' if keep else 'no keep'} fetchall no rewrite no stripcr\n"
        f'  sslproto "TLS1.2+" sslcertck sslcertfile "{cert}" sslcommonname "{HOSTNAME}"\n'
        f'  mda "{mda}"\n'
    )
    rc.chmod(0o600)
    return rc


def test_fetchmail(server, cert, tmp_path):
    """
    fetchmail with C{no stripcr} (keep CRLF), C{invisible} (no Received:
    field of its own) and C{no rewrite} hands the MDA the message as sent.
    It uses STLS (C{sslproto}), checking the certificate against the
    platform's (C{sslcertfile}) for the name C{sslcommonname}.
    """
    fetchmail = requirePeer("fetchmail")
    want = expected("fetchmail")
    env = dict(os.environ, HOME=str(tmp_path), FETCHMAILHOME=str(tmp_path))
    out = run([fetchmail, "-f", str(fetchmailrc(tmp_path, cert, keep=True)), "-v", "--nodetach"], env=env)
    assert b"upgrade to TLS succeeded" in out.stdout + out.stderr
    assert files(f"{tmp_path}/msg.*") == want
    assertSeen("fetchmail")
    assert popStat("fetchmail")[0] == len(want)
    for path in glob.glob(f"{tmp_path}/msg.*"):
        os.unlink(path)
    run([fetchmail, "-f", str(fetchmailrc(tmp_path, cert, keep=False)), "--nodetach"], env=env)
    assert files(f"{tmp_path}/msg.*") == want
    assertEmpty("fetchmail")


def getmailrc(tmp_path, cert, delete):
    rc = tmp_path / "getmailrc"
    rc.write_text(
        "[retriever]\ntype = SimplePOP3SSLRetriever\n"
        f"server = {HOST}\nport = {PORTS['pop3s']}\nusername = {user('getmail')}\npassword = {PASSWORD}\n"
        f"ca_certs = {cert}\nssl_cert_hostname = {HOSTNAME}\n\n"
        "[destination]\ntype = MDA_external\npath = /bin/sh\n"
        f'arguments = ("-c", "cat > {tmp_path}/msg.$$$$")\nallow_root_commands = true\n\n'
        f"[options]\nread_all = true\ndelete = {'true' if delete else 'false'}\n"
        "delivered_to = false\nreceived = false\nmessage_log_syslog = false\n"
    )
    return rc


def test_getmail(server, cert, tmp_path):
    """
    getmail6 speaks POP3 over implicit TLS (the pop3s listener), checking the
    certificate against C{ca_certs} for C{ssl_cert_hostname}; its POP3
    retrievers have no STLS.  With C{delivered_to} and C{received} off its
    external-MDA delivery still writes line ends as LF and puts a
    C{Return-Path:} field first where the message has none (C{<unknown>}:
    POP3 has no envelope; the ones delivered by SMTP have ours).
    """
    getmail = requirePeer("getmail")
    want = [(b"" if m.startswith(b"Return-Path: ") else b"Return-Path: <unknown>\n") + m.replace(b"\r\n", b"\n")
            for m in expected("getmail")]
    run([getmail, "--getmaildir", str(tmp_path), "--rcfile", str(getmailrc(tmp_path, cert, delete=False))])
    assert files(f"{tmp_path}/msg.*") == want
    assertSeen("getmail")
    assert popStat("getmail")[0] == len(want)
    for path in glob.glob(f"{tmp_path}/msg.*"):
        os.unlink(path)
    run([getmail, "--getmaildir", str(tmp_path), "--rcfile", str(getmailrc(tmp_path, cert, delete=True))])
    assert files(f"{tmp_path}/msg.*") == want
    assertEmpty("getmail")


def test_mpop(server, cert, tmp_path):
    """
    mpop with STLS (C{tls_starttls}), the platform's certificate as trust
    file and C{received_header off}; it pipelines its RETRs, and its MDA
    delivery writes line ends as LF.
    """
    mpop = requirePeer("mpop")
    want = [m.replace(b"\r\n", b"\n") for m in expected("mpop")]
    rc = tmp_path / "mpoprc"
    rc.write_text(
        f"account test\nhost {HOST}\nport {PORTS['pop3']}\nuser {user('mpop')}\npassword {PASSWORD}\n"
        f"auth user\ntls on\ntls_starttls on\ntls_trust_file {cert}\ntls_host_override {HOSTNAME}\n"
        f"received_header off\nonly_new off\nuidls_file {tmp_path}/uidls\n"
        f"delivery mda \"/bin/sh -c 'cat > {tmp_path}/msg.$$'\"\n"
    )
    rc.chmod(0o600)
    run([mpop, "-C", str(rc), "--keep=on", "test"])
    assert files(f"{tmp_path}/msg.*") == want
    assertSeen("mpop")
    assert popStat("mpop")[0] == len(want)
    for path in glob.glob(f"{tmp_path}/msg.*"):
        os.unlink(path)
    run([mpop, "-C", str(rc), "--keep=off", "test"])
    assert files(f"{tmp_path}/msg.*") == want
    assertEmpty("mpop")


def test_curl(server, cert, tmp_path):
    """C{curl pop3://} with C{--ssl-reqd} (STLS) and C{--cacert}: the raw message, CRLF and all."""
    curl = requirePeer("curl")
    want = expected("curl")
    port = PORTS["pop3"]
    base = [curl, "-sS", "--ssl-reqd", "--cacert", cert, "--resolve", f"{HOSTNAME}:{port}:{HOST}",
            "-u", f"{user('curl')}:{PASSWORD}"]
    listing = run(base + [f"pop3://{HOSTNAME}:{port}/"]).stdout
    assert listing == b"".join(b"%d %d\r\n" % (i, len(m)) for i, m in enumerate(want, 1))
    for i, message in enumerate(want, 1):
        out = tmp_path / f"msg.{i}"
        run(base + ["-o", str(out), f"pop3://{HOSTNAME}:{port}/{i}"])
        assert out.read_bytes() == message
    # Each curl run is one session: DELE 1 then QUIT, until nothing is left.
    for _ in want:
        run(base + ["-X", "DELE", "-I", f"pop3://{HOSTNAME}:{port}/1"])
    assertEmpty("curl")


def openssl(args, script, cert):
    return run(
        ["openssl", "s_client", "-quiet", "-starttls", "pop3", "-connect", f"{HOST}:{PORTS['pop3']}",
         "-CAfile", cert, "-verify_return_error", "-verify_hostname", HOSTNAME, "-servername", HOSTNAME, *args],
        input=script,
    )


def splitResponses(transcript, multiline):
    """Cut a transcript into (status line, multi-line body without stuffing) pairs."""
    out, pos = [], 0
    for isMulti in multiline:
        end = transcript.index(b"\r\n", pos) + 2
        status, pos = transcript[pos:end], end
        body = None
        if isMulti and status.startswith(b"+OK"):
            # From the status line's CRLF, so that an empty body is found too.
            end = transcript.index(b"\r\n.\r\n", pos - 2) + 5
            raw = transcript[pos:end]
            pos = end
            lines = raw.split(b"\r\n")[:-2]
            body = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)
        out.append((status, body))
    assert pos == len(transcript), transcript[pos:pos + 200]
    return out


def test_openssl_s_client(server, cert):
    """
    A raw, pipelined session through C{openssl s_client -starttls pop3},
    verifying the certificate and host name: the octets on the wire are
    checked, stuffing included.
    """
    requirePeer("openssl")
    want = expected("openssl")
    n = len(want)
    script = (b"USER %s\r\nPASS %s\r\nSTAT\r\n" % (user("openssl").encode(), PASSWORD.encode())
              + b"".join(b"LIST %d\r\nRETR %d\r\nDELE %d\r\n" % (i, i, i) for i in range(1, n + 1)) + b"QUIT\r\n")
    result = openssl([], script, cert)
    assert b"verify return:1" in result.stderr
    replies = splitResponses(result.stdout, [False] * 3 + [False, True, False] * n + [False])
    assert replies[0][0] == b"+OK Send your password\r\n"
    assert replies[2][0] == b"+OK %d %d\r\n" % (n, sum(map(len, want)))
    for i, message in enumerate(want):
        listed, retr, dele = replies[3 + 3 * i: 6 + 3 * i]
        assert listed[0] == b"+OK %d %d\r\n" % (i + 1, len(message))
        assert retr == (b"+OK %d octets\r\n" % len(message), message)
        assert dele[0] == b"+OK Message %d deleted\r\n" % (i + 1)
    assert replies[-1][0].startswith(b"+OK mail.example.org POP3 server signing off (6 messages deleted)")
    # Every dot at a line start went out doubled: the first body line of the
    # first message and its last line, which is a lone dot.
    assert b"\r\n\r\n..first line starts with a dot\r\n..\r\n...\r\n.. space\r\nmiddle\r\n..\r\n.\r\n" in result.stdout
    assertEmpty("openssl")


# --- sharing the mailbox with IMAP -------------------------------------------------


def test_imap_session_sees_pop3_deletions_and_keeps_working(server):
    imap = imapSession("imap")
    try:
        typ, data = imap.select("INBOX")
        assert typ == "OK" and int(data[0]) == 5
        typ, data = imap.uid("SEARCH", None, "ALL")
        uids = data[0].split()

        p = poplib.POP3(HOST, PORTS["pop3"], timeout=30)
        p.user(user("imap"))
        p.pass_(PASSWORD)
        # A second POP3 login waits for the first: [IN-USE].
        q = poplib.POP3(HOST, PORTS["pop3"], timeout=30)
        q.user(user("imap"))
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            q.pass_(PASSWORD)
        q.quit()
        p.retr(1)
        p.dele(1)
        p.dele(3)
        # IMAP keeps working while POP3 holds the maildrop ...
        typ, data = imap.uid("FETCH", uids[1], "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK" and b"Subject: bare LF" in data[0][1]
        assert b"\\Deleted" not in data[0][0]
        # ... and nothing is removed before QUIT.
        imap.noop()
        assert imap.uid("SEARCH", None, "ALL")[1][0].split() == uids
        assert p.quit().startswith(b"+OK mail.example.org POP3 server signing off (2 messages deleted)")

        deadline = time.monotonic() + 10
        expunged = []
        while len(expunged) < 2 and time.monotonic() < deadline:
            typ, data = imap.noop()
            expunged += [d for d in imap.untagged_responses.pop("EXPUNGE", [])]
            time.sleep(0.05)
        # The EXPUNGE responses, applied in order, remove messages 1 and 3.
        view = list(uids)
        for number in expunged:
            del view[int(number) - 1]
        remaining = [uids[1], *uids[3:]]
        assert view == remaining
        assert imap.uid("SEARCH", None, "ALL")[1][0].split() == remaining
        typ, data = imap.uid("STORE", remaining[0], "+FLAGS", r"(\Flagged)")
        assert typ == "OK"
        typ, data = imap.uid("SEARCH", None, "SEEN")
        assert data[0] == b""  # the retrieved message is gone; the others were not retrieved

        # An IMAP expunge during a POP3 session: that message is gone, the
        # others download and delete normally.
        p = poplib.POP3(HOST, PORTS["pop3"], timeout=30)
        p.user(user("imap"))
        p.pass_(PASSWORD)
        assert p.stat()[0] == 3
        imap.uid("STORE", remaining[0], "+FLAGS", r"(\Deleted)")
        imap.expunge()
        with pytest.raises(poplib.error_proto, match="removed"):
            p.retr(1)
        body = b"\r\n".join(p.retr(2)[1]) + b"\r\n"
        assert body == crlf(awkwardMessages()[3])
        p.dele(2)
        p.dele(1)
        assert p.quit().startswith(b"+OK")
        typ, data = imap.noop()
        assert imap.uid("SEARCH", None, "ALL")[1][0].split() == remaining[2:]
    finally:
        imap.logout()
