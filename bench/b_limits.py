"""
7. The machine's physical limits, so every other figure can be read
against them: fsync'd 4 KB file writes per second (write, fsync, close, as
a durable mail server must per message without group commit), the same
Maildir-style (write + fsync to tmp/, rename into new/, fsync the
directory), and loopback TCP round trips per second (one byte each way on
one connection, Nagle off: the floor of any request/response protocol).
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time

from bench.common import progress

TITLE = "Machine limits"


def fsyncWrites(directory, seconds):
    data = os.urandom(4096)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        path = os.path.join(directory, f"f{n}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        n += 1
    elapsed = time.perf_counter() - start
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    return n / elapsed


def maildirWrites(directory, seconds):
    data = os.urandom(4096)
    for sub in ("tmp", "new"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    dirfd = os.open(os.path.join(directory, "new"), os.O_RDONLY)
    n, start = 0, time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            tmp = os.path.join(directory, "tmp", f"m{n}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            os.rename(tmp, os.path.join(directory, "new", f"m{n}"))
            os.fsync(dirfd)
            n += 1
    finally:
        os.close(dirfd)
    elapsed = time.perf_counter() - start
    for sub in ("tmp", "new"):
        for name in os.listdir(os.path.join(directory, sub)):
            os.unlink(os.path.join(directory, sub, name))
    return n / elapsed


def tcpRoundTrips(seconds):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def echo():
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            b = conn.recv(1)
            if not b:
                break
            conn.sendall(b)
        conn.close()

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        c.sendall(b"x")
        c.recv(1)
        n += 1
    elapsed = time.perf_counter() - start
    c.close()
    t.join(5)
    server.close()
    return n / elapsed


def run(ctx):
    seconds = 1.0 if ctx.quick else 3.0
    fs, md, rt = [], [], []
    with tempfile.TemporaryDirectory(dir=ctx.base) as d:
        for i in range(ctx.runs):
            progress(f"  run {i + 1}/{ctx.runs}: fsync'd writes, Maildir writes, TCP round trips ({seconds:.0f}s each)")
            os.makedirs(os.path.join(d, "plain"), exist_ok=True)
            fs.append(fsyncWrites(os.path.join(d, "plain"), seconds))
            md.append(maildirWrites(os.path.join(d, "maildir"), seconds))
            rt.append(tcpRoundTrips(seconds))
    r = ctx.results
    r.add("limits", "4 KB file: write + fsync", "writes/s", "machine", fs, unit="/s")
    r.add("limits", "4 KB Maildir: write + fsync + rename + fsync dir", "writes/s", "machine", md, unit="/s")
    r.add("limits", "loopback TCP, 1 byte each way", "round trips/s", "machine", rt, unit="/s")
