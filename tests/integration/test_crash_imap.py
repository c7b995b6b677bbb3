"""
Crash consistency for IMAP changes: APPEND, STORE, EXPUNGE and MOVE from a
client while mailplat is killed with SIGKILL at a random moment, several
rounds.  After each restart every acknowledged change must be there:

  - an APPEND answered OK [APPENDUID v u] is stored exactly once, intact;
  - a STORE answered OK left its flags;
  - an EXPUNGE answered OK removed its messages for good;
  - a MOVE answered OK [COPYUID ...] left the message in the target only.
"""

import hashlib
import imaplib
import random
import re
import threading
import time

import pytest

from helpers import DEFAULT_PORTS, MailplatProcess, freePorts, prepareData

pytestmark = pytest.mark.integration

USER = "imapcrash@example.org"
PASSWORD = "imapcrash-password"
ROUNDS = 3


def message(tag):
    body = "".join(f"{tag} line {i}\r\n" for i in range(30))
    return f"Subject: {tag}\r\nMessage-ID: <{tag}@example.net>\r\n\r\n{body}".encode()


class Worker:
    """Runs IMAP changes until the connection dies, recording what the server acknowledged."""

    def __init__(self, port, prefix):
        self.port = port
        self.prefix = prefix
        self.appended = {}      # tag -> sha256, acknowledged APPENDs
        self.flagged = set()    # tags whose \\Flagged STORE was acknowledged
        self.expunged = set()   # tags whose EXPUNGE was acknowledged
        self.moved = set()      # tags whose MOVE to Archive was acknowledged
        self.removing = set()   # tags whose expunge was started (acknowledged or not)
        self.n = 0

    def run(self):
        try:
            imap = imaplib.IMAP4("127.0.0.1", self.port)
            imap.login(USER, PASSWORD)
            imap.select("INBOX")
            while True:
                tag = f"{self.prefix}-{self.n}"
                self.n += 1
                msg = message(tag)
                typ, data = imap.append("INBOX", None, None, msg)
                if typ != "OK":
                    return
                uid = int(re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1))
                self.appended[tag] = hashlib.sha256(msg).hexdigest()
                action = self.n % 3
                if action == 0:
                    if imap.uid("STORE", str(uid), "+FLAGS", r"(\Flagged)")[0] == "OK":
                        self.flagged.add(tag)
                elif action == 1:
                    self.removing.add(tag)
                    imap.uid("STORE", str(uid), "+FLAGS", r"(\Deleted)")
                    if imap.uid("EXPUNGE", str(uid))[0] == "OK":
                        self.expunged.add(tag)
                else:
                    if imap.uid("MOVE", str(uid), "Archive")[0] == "OK":
                        self.moved.add(tag)
        except (imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError):
            return


def contents(port, mailbox):
    """tag -> list of (sha256, flags) in a mailbox."""
    out = {}
    with imaplib.IMAP4("127.0.0.1", port) as imap:
        imap.login(USER, PASSWORD)
        imap.select(mailbox, readonly=True)
        typ, data = imap.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[])")
        assert typ == "OK"
        for item in data:
            if not isinstance(item, tuple):
                continue
            flags = item[0]
            raw = item[1]
            tag = raw.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            out.setdefault(tag, []).append((hashlib.sha256(raw).hexdigest(), flags))
    return out


def test_sigkillDuringImapChanges(tmp_path):
    rng = random.Random(112233)
    ports = dict(zip(DEFAULT_PORTS, freePorts(len(DEFAULT_PORTS))))
    prepareData(tmp_path, ports, USER, PASSWORD)
    proc = MailplatProcess(str(tmp_path), ["--config", "mailplat.toml"], ports=ports)
    workers = []
    try:
        for round in range(ROUNDS):
            proc.start(waitFor=["imap"])
            batch = [Worker(ports["imap"], f"r{round}w{i}") for i in range(3)]
            threads = [threading.Thread(target=w.run) for w in batch]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.5, 1.5))
            proc.kill()
            for t in threads:
                t.join(30)
            workers += batch
        proc.start(waitFor=["imap"])
        inbox = contents(ports["imap"], "INBOX")
        archive = contents(ports["imap"], "Archive")
        acknowledged = sum(len(w.appended) for w in workers)
        assert acknowledged >= ROUNDS * 3, f"too little work got through ({acknowledged} appends)"
        for w in workers:
            for tag, digest in w.appended.items():
                places = inbox.get(tag, []) + archive.get(tag, [])
                if tag in w.expunged:
                    assert not places, f"{tag} was expunged (acknowledged) but is back"
                    continue
                if tag in w.moved:
                    assert tag not in inbox, f"{tag} was moved (acknowledged) but is still in INBOX"
                    assert len(archive.get(tag, [])) == 1, f"{tag} moved but {len(archive.get(tag, []))} in Archive"
                if tag in w.removing:
                    # An expunge that was not acknowledged may or may not have happened.
                    assert len(places) <= 1, f"{tag} stored {len(places)} times"
                else:
                    assert len(places) == 1, f"{tag} (acknowledged) stored {len(places)} times"
                for digest2, flags in places:
                    assert digest2 == digest, f"{tag} damaged"
                    if tag in w.flagged:
                        assert b"\\Flagged" in flags, f"{tag} lost its acknowledged \\Flagged"
    finally:
        proc.stop()
