"""
Crash consistency: SMTP load from several parallel senders against a real
mailplat process, SIGKILL at random moments, restart, several rounds.

Every message that got its 250 must be in the mailbox exactly once and
byte-for-byte intact (compared by hash); a message whose 250 never arrived
may be there at most once.  Bounded: a few rounds of at most a few seconds.
"""

import hashlib
import imaplib
import random
import smtplib
import threading
import time

import pytest

from helpers import DEFAULT_PORTS, MailplatProcess, freePorts, prepareData

pytestmark = pytest.mark.integration

USER = "crash@example.org"
PASSWORD = "crash-password"
ROUNDS = 4
SENDERS = 6


def message(tag: str) -> bytes:
    body = "".join(f"line {i} of {tag} {'x' * (i % 70)}\r\n" for i in range(40))
    return f"From: load@example.net\r\nSubject: {tag}\r\nMessage-ID: <{tag}@example.net>\r\n\r\n{body}".encode()


def sender(port, prefix, acked, attempted, stop):
    n = 0
    while not stop.is_set():
        try:
            s = smtplib.SMTP("127.0.0.1", port, timeout=10)
        except OSError:
            return
        try:
            while not stop.is_set():
                tag = f"{prefix}-{n}"
                n += 1
                msg = message(tag)
                attempted[tag] = hashlib.sha256(msg).hexdigest()
                s.sendmail("load@example.net", [USER], msg)
                acked[tag] = attempted[tag]
        except (smtplib.SMTPException, OSError):
            return
        finally:
            try:
                s.close()
            except OSError:
                pass


def mailboxContents(port):
    """Subject tag -> list of sha256 of the message as sent (our Return-Path: and Received: removed)."""
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
            # final delivery's Return-Path (RFC 5321 §4.4), then our Received:
            returnPath = b"Return-Path: <load@example.net>\r\n"
            assert raw.startswith(returnPath), raw[:80]
            raw = raw[len(returnPath):]
            end = raw.index(b"\r\n", 0)
            while raw[end + 2:end + 3] in (b" ", b"\t"):
                end = raw.index(b"\r\n", end + 2)
            sent = raw[end + 2:]
            tag = sent.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            out.setdefault(tag, []).append(hashlib.sha256(sent).hexdigest())
    return out


def test_sigkillUnderLoadLosesNothing(tmp_path):
    rng = random.Random(20261122)
    ports = dict(zip(DEFAULT_PORTS, freePorts(len(DEFAULT_PORTS))))
    prepareData(tmp_path, ports, USER, PASSWORD)
    proc = MailplatProcess(str(tmp_path), ["--config", "mailplat.toml"], ports=ports)
    acked, attempted = {}, {}
    try:
        for round in range(ROUNDS):
            proc.start(waitFor=["smtp", "imap"])
            stop = threading.Event()
            threads = [threading.Thread(target=sender, args=(ports["smtp"], f"r{round}s{i}", acked, attempted, stop))
                       for i in range(SENDERS)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.3, 1.5))
            proc.kill()
            stop.set()
            for t in threads:
                t.join(30)
        proc.start(waitFor=["smtp", "imap"])
        assert len(acked) >= ROUNDS, f"too little load got through to test anything ({len(acked)} messages)"
        deadline = time.monotonic() + 30
        while True:
            found = mailboxContents(ports["imap"])
            missing = [t for t in acked if t not in found]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:5]}"
        for tag, hashes in found.items():
            assert tag in attempted, f"a message nobody sent: {tag}"
            assert len(hashes) == 1, f"{tag} stored {len(hashes)} times"
            assert hashes[0] == attempted[tag], f"{tag} damaged"
    finally:
        proc.stop()
