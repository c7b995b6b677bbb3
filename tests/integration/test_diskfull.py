"""
Disk full: mailplat's data directory on a small tmpfs, filled up.

With the file system full, SMTP must answer a temporary 451/452 (never 5xx,
never a dropped connection) and IMAP APPEND a tagged NO; the connections
stay usable; everything stored before is intact afterwards, the server
takes mail again once there is room, and C{mailplat fsck} finds the store
and queue consistent.

Mounting needs root (CAP_SYS_ADMIN): without it the test is skipped.

A read-only remount under a running server is not testable this way: Linux
refuses C{mount -o remount,ro} with EBUSY while any file on it is open for
writing, and the SQLite databases always are.  The same write paths fail
with EROFS as with ENOSPC, and both go through the errbacks tested here.
"""

import errno
import hashlib
import imaplib
import os
import smtplib
import subprocess
import time

import pytest

from helpers import DEFAULT_PORTS, MailplatProcess, freePorts, mailplatCommand, prepareData, requirePeer

pytestmark = pytest.mark.integration

USER = "full@example.org"
PASSWORD = "full-password"


def message(tag: str, size: int = 2000) -> bytes:
    body = "".join(f"{tag} line {i} {'y' * 60}\r\n" for i in range(size // 70 + 1))
    return f"From: s@example.net\r\nTo: {USER}\r\nSubject: {tag}\r\n\r\n{body}".encode()


@pytest.fixture
def smallDisk(tmp_path):
    mount, umount = requirePeer("mount", "umount")
    data = tmp_path / "data"
    data.mkdir()
    r = subprocess.run([mount, "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(data)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield data
    finally:
        for _ in range(50):
            if subprocess.run([umount, str(data)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run([umount, "-l", str(data)], capture_output=True)


def fill(path):
    """Write a filler file under C{path} until the file system is full; return its path."""
    filler = os.path.join(path, "filler")
    chunk = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        try:
            while True:
                f.write(b"\0")
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


def storedHashes(port):
    """Subject -> sha256 of each message in INBOX (the Received: header mailplat adds removed)."""
    out = {}
    with imaplib.IMAP4("127.0.0.1", port) as imap:
        imap.login(USER, PASSWORD)
        imap.select("INBOX", readonly=True)
        typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
        assert typ == "OK"
        for item in data:
            if not isinstance(item, tuple):
                continue
            raw = item[1]
            start = raw.index(b"From: s@example.net") if b"From: s@example.net" in raw else 0
            sent = raw[start:]
            subject = sent.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            out.setdefault(subject, []).append(hashlib.sha256(sent).hexdigest())
    return out


def waitFor(predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def refusedTemporarily(port, tag):
    """Send C{tag} by SMTP on a full disk: it must be refused with 451/452 and the session stay usable."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.example.net")
        code, reply = s.mail("s@example.net")
        if code == 250:
            code, reply = s.rcpt(USER)
        if code == 250:
            code, reply = s.data(message(tag, 20000))
        assert code in (451, 452), f"SMTP answered {code} {reply!r} on a full disk"
        assert s.rset()[0] == 250, "the SMTP session is still usable"
        assert s.noop()[0] == 250
    return code


def appendRefused(port, tag):
    with imaplib.IMAP4("127.0.0.1", port) as imap:
        imap.login(USER, PASSWORD)
        typ, data = imap.append("INBOX", None, None, message(tag, 20000))
        assert typ == "NO", f"APPEND answered {typ} {data!r} on a full disk"
        assert imap.noop()[0] == "OK", "the IMAP session is still usable"
        assert imap.select("INBOX", readonly=True)[0] == "OK"
        return data[0]


def test_diskFull(tmp_path, smallDisk):
    ports = dict(zip(DEFAULT_PORTS, freePorts(len(DEFAULT_PORTS))))
    prepareData(tmp_path, ports, USER, PASSWORD, data=str(smallDisk))
    proc = MailplatProcess(str(tmp_path), ["--config", "mailplat.toml"], ports=ports)
    proc.start(waitFor=["smtp", "imap"])
    try:
        sent = {}
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as s:
            for n in range(5):
                m = message(f"before-{n}")
                s.sendmail("s@example.net", [USER], m)
                sent[f"before-{n}"] = hashlib.sha256(m).hexdigest()
        assert waitFor(lambda: len(storedHashes(ports["imap"])) == 5), "the first messages were not delivered"

        # --- full ---------------------------------------------------------
        filler = fill(str(smallDisk))
        for n in range(3):
            refusedTemporarily(ports["smtp"], f"full-smtp-{n}")
        appendRefused(ports["imap"], "full-imap")
        assert {k: v[0] for k, v in storedHashes(ports["imap"]).items()} == sent

        os.unlink(filler)
        m = message("after-full")
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as s:
            s.sendmail("s@example.net", [USER], m)
        sent["after-full"] = hashlib.sha256(m).hexdigest()
        assert waitFor(lambda: "after-full" in storedHashes(ports["imap"])), "no delivery once there is room again"

        found = storedHashes(ports["imap"])
        assert {k: v for k, v in found.items()} == {k: [v] for k, v in sent.items()}, "stored mail damaged or doubled"
    finally:
        proc.stop()
    r = mailplatCommand(tmp_path, "--config", "mailplat.toml", "fsck", "--check-only", "--grace", "0")
    assert r.returncode == 0, r.stdout + r.stderr
