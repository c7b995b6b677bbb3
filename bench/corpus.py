"""
The messages every server is seeded with: deterministic, so each server
gets byte-for-byte the same mailbox, with varied subjects, senders and
body words for SEARCH to find (and to miss).
"""

from __future__ import annotations

import os
import random
import time

WORDS = ("invoice meeting report budget travel lunch project release schedule contract review "
         "draft update quarter holiday server backup network coffee garden weekend").split()
SENDERS = [f"{n}@{d}" for n in ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
           for d in ("example.com", "example.net")]

#: A word that occurs in the subject, sender and body of exactly one message in 1,000.
RARE = "zanzibar"


def message(i: int, size: int = 4096, to: str = "bench@bench.test") -> bytes:
    """Message number C{i} (0-based), about C{size} bytes, CRLF line endings."""
    rnd = random.Random(i)
    rare = i % 1000 == 999
    subject = " ".join(rnd.choice(WORDS) for _ in range(4)) + (f" {RARE}" if rare else "") + f" #{i}"
    sender = f"{RARE}@example.org" if rare else SENDERS[i % len(SENDERS)]
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(1_700_000_000 + 60 * i))
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {date}\r\n"
            f"Message-ID: <bench-{i}@bench.test>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
    lines = []
    total = len(head)
    if rare:
        lines.append(f"The secret word is {RARE}.")
    while total < size:
        line = " ".join(rnd.choice(WORDS) for _ in range(11))
        lines.append(line)
        total += len(line) + 2
    body = ("\r\n".join(lines) + "\r\n").encode()
    return (head + body)[:max(size, len(head) + 2)].rstrip(b"\r\n") + b"\r\n"


def writeMaildir(maildir: str, messages, uid=None, gid=None) -> None:
    """
    Write messages into a Maildir's cur/ (flagged \\Seen, as the IMAP seeding
    does), fsync'd, the way Dovecot's own delivery writes them: LF line
    endings on disk, the physical size in C{S=} and the size with CRLF (what
    IMAP reports as RFC822.SIZE) in C{W=}.
    """
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    base = int(time.time()) - 86400
    for n, data in enumerate(messages):
        disk = data.replace(b"\r\n", b"\n")
        name = f"{base + n}.M{n}P{os.getpid()}.bench,S={len(disk)},W={len(data)}:2,S"
        path = os.path.join(maildir, "cur", name)
        with open(path, "wb") as f:
            f.write(disk)
        os.utime(path, (base + n, base + n))
    fd = os.open(os.path.join(maildir, "cur"), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if uid is not None:
        chownTree(maildir, uid, gid)


def chownTree(top: str, uid: int, gid: int) -> None:
    os.chown(top, uid, gid)
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)
