"""
Hostile messages against a real mailplat: thousands of parts, deep nesting,
a 1 MB header line, thousands of header fields, broken encodings and
boundaries.  Each is stored (IMAP APPEND: SMTP would rightly refuse a 1 MB
line), then FETCHed (BODYSTRUCTURE, ENVELOPE, a deep section, BODY[]) and
searched; every command is answered OK within a time bound, BODY[] comes
back byte-exact (a NUL as 0x80), and the server's memory stays bounded.
"""

import imaplib
import re
import time

import pytest

from helpers import DEFAULT_PORTS, MailplatProcess, freePorts, prepareData

pytestmark = pytest.mark.integration

USER = "hostile@example.org"
PASSWORD = "hostile-password"
SECONDS_PER_COMMAND = 15
MAX_RSS_GROWTH_MB = 400


def manyParts(n=5000):
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i for i in range(n))
    return b"Subject: many parts\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + parts + b"--b--\r\n"


def deepNesting(depth=300):
    body = b"Subject: innermost\r\n\r\nbottom\r\n"
    for i in range(depth):
        if i % 2:
            body = b"Subject: level %d\r\nContent-Type: message/rfc822\r\n\r\n" % i + body
        else:
            body = (b"Content-Type: multipart/mixed; boundary=n%d\r\n\r\n--n%d\r\n" % (i, i) + body
                    + b"\r\n--n%d--\r\n" % i)
    return b"Subject: deep nesting\r\n" + body


def hugeHeaderLine():
    return b"Subject: huge header\r\nX-Huge: " + b"a" * (1 << 20) + b"\r\n\r\nbody\r\n"


def manyHeaderFields(n=5000):
    return b"Subject: many fields\r\n" + b"".join(b"X-Field-%d: value %d\r\n" % (i, i) for i in range(n)) + b"\r\nb\r\n"


def brokenEncodings():
    return (b"Subject: =?utf-8?B?not*base64?= =?x-unknown?Q?=ZZ?= broken encodings\r\n"
            b"From: =?utf-8?q?=E2=82?= <a@b>\r\n"
            b"Content-Type: multipart/alternative; boundary=\"unterminated\r\n\r\n"
            b"--unterminated\r\nContent-Type: text/plain; charset=\"no\x00such\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n!!!! not base64 ====\r\n"
            b"--unterminated\r\nContent-Type: text/html; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=E2=8=\r\n=ZZ\xff\xfe\r\n")


def boundaryChaos():
    return (b"Subject: boundary chaos\r\nContent-Type: multipart/mixed; boundary=a\r\n\r\n"
            + b"--a\r\nContent-Type: multipart/mixed; boundary=a\r\n\r\n" * 200 + b"--a--\r\n" * 3)


HOSTILE = {
    "many parts": manyParts,
    "deep nesting": deepNesting,
    "huge header": hugeHeaderLine,
    "many fields": manyHeaderFields,
    "broken encodings": brokenEncodings,
    "boundary chaos": boundaryChaos,
}


def rssMB(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def timed(what, f, *args):
    start = time.monotonic()
    typ, data = f(*args)
    elapsed = time.monotonic() - start
    assert typ == "OK", f"{what}: {typ} {data!r:.300}"
    assert elapsed < SECONDS_PER_COMMAND, f"{what} took {elapsed:.1f} s"
    return data


def test_hostileMessagesStayWithinBounds(tmp_path):
    ports = dict(zip(DEFAULT_PORTS, freePorts(len(DEFAULT_PORTS))))
    prepareData(tmp_path, ports, USER, PASSWORD)
    proc = MailplatProcess(str(tmp_path), ["--config", "mailplat.toml"], ports=ports).start(waitFor=["imap"])
    try:
        before = rssMB(proc.proc.pid)
        imap = imaplib.IMAP4("127.0.0.1", ports["imap"])
        imaplib._MAXLINE = 1 << 24
        imap.login(USER, PASSWORD)
        imap.select("INBOX")
        for name, make in HOSTILE.items():
            msg = make()
            data = timed(f"APPEND {name}", imap.append, "INBOX", None, None, msg)
            uid = re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1).decode()
            timed(f"FETCH BODYSTRUCTURE {name}", imap.uid, "FETCH", uid, "(BODYSTRUCTURE ENVELOPE RFC822.SIZE)")
            timed(f"FETCH deep section {name}", imap.uid, "FETCH", uid, "(BODY.PEEK[1.1.1.1] BODY.PEEK[HEADER])")
            data = timed(f"FETCH BODY[] {name}", imap.uid, "FETCH", uid, "(BODY.PEEK[])")
            # Byte-exact, but for NUL: a literal carries CHAR8 only (RFC 3501 §9), NUL goes out as 0x80
            assert data[0][1] == msg.replace(b"\x00", b"\x80"), f"{name}: BODY[] is not byte-exact"
            timed(f"SEARCH {name}", imap.uid, "SEARCH", "BODY", "part 4999")
            timed(f"SEARCH {name}", imap.uid, "SEARCH", "HEADER", "X-Field-4999", "value")
            timed(f"SEARCH {name}", imap.uid, "SEARCH", "SUBJECT", "broken")
        imap.logout()
        growth = rssMB(proc.proc.pid) - before
        assert growth < MAX_RSS_GROWTH_MB, f"RSS grew by {growth:.0f} MB"
        assert proc.proc.poll() is None
    finally:
        proc.stop()
    assert "Traceback" not in proc.output()
