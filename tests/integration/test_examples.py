"""Every program in examples/ runs, and does what its docstring says."""

import imaplib
import os
import smtplib
import subprocess
import sys
import time

import pytest

from helpers import freePorts, waitForPort

pytestmark = pytest.mark.integration

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_embeddingExample(tmp_path):
    smtpPort, imapPort = freePorts(2)
    log = open(tmp_path / "embed.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "examples", "embed.py"), "--data", str(tmp_path / "data"),
         "--smtp", str(smtpPort), "--imap", str(imapPort)],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        waitForPort(smtpPort, proc=proc)
        waitForPort(imapPort, proc=proc)
        msg = b"From: x@example.net\r\nSubject: embedded\r\n\r\nhello from an embedding application\r\n"
        deadline = time.monotonic() + 20
        # The user is created once the store is open; retry until it exists.
        while True:
            try:
                with smtplib.SMTP("127.0.0.1", smtpPort) as s:
                    s.sendmail("x@example.net", ["demo@embedded.example"], msg)
                break
            except smtplib.SMTPRecipientsRefused:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        while True:
            with imaplib.IMAP4("127.0.0.1", imapPort) as imap:
                imap.login("demo@embedded.example", "demo-password")
                imap.select("INBOX")
                typ, data = imap.fetch("1", "(BODY.PEEK[TEXT])")
                if typ == "OK" and data and isinstance(data[0], tuple):
                    assert data[0][1] == b"hello from an embedding application\r\n"
                    break
            assert time.monotonic() < deadline, "the message never arrived"
            time.sleep(0.1)
    finally:
        proc.terminate()
        assert proc.wait(30) is not None
        log.close()
    assert b"Traceback" not in (tmp_path / "embed.log").read_bytes()


def test_subjectTagFunction():
    sys.path.insert(0, os.path.join(ROOT, "examples", "subject-tag", "src"))
    try:
        from mailplat_subject_tag import tagSubject
    finally:
        sys.path.pop(0)
    assert tagSubject(b"Subject: hi\r\nX: y\r\n\r\nSubject: body\r\n", b"[t]") == \
        b"Subject: [t] hi\r\nX: y\r\n\r\nSubject: body\r\n"
    assert tagSubject(b"X: y\r\n\r\nbody\r\n", b"[t]") == b"X: y\r\nSubject: [t]\r\n\r\nbody\r\n"
    assert tagSubject(b"Subject: [t] hi\r\n\r\n", b"[t]") == b"Subject: [t] hi\r\n\r\n"
