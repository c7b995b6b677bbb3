"""
The Python SMTP peer: aiosmtpd accepting every recipient and writing each
message durably into one Maildir (tmp/ write, fsync, rename to new/, fsync
the directory) before answering 250 — the straightforward way to write a
durable SMTP server in asyncio, one fsync per message.

    python aiosmtpd_maildir.py PORT MAILDIR
"""

import asyncio
import os
import signal
import socket
import sys
import time

from aiosmtpd.controller import Controller


class MaildirHandler:
    def __init__(self, maildir):
        self.maildir = maildir
        self.n = 0
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(maildir, sub), exist_ok=True)
        self.newFd = os.open(os.path.join(maildir, "new"), os.O_RDONLY)
        self.host = socket.gethostname()

    async def handle_DATA(self, server, session, envelope):
        self.n += 1
        name = f"{time.time():.6f}.P{os.getpid()}Q{self.n}.{self.host}"
        tmp = os.path.join(self.maildir, "tmp", name)
        data = envelope.original_content or envelope.content
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, f"Return-Path: <{envelope.mail_from}>\r\n".encode() + data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.maildir, "new", name))
        os.fsync(self.newFd)
        return "250 2.0.0 Ok: queued"


def main():
    port, maildir = int(sys.argv[1]), sys.argv[2]
    controller = Controller(MaildirHandler(maildir), hostname="127.0.0.1", port=port,
                            data_size_limit=50 * 1024 * 1024)
    controller.start()
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"aiosmtpd listening on 127.0.0.1:{port}", flush=True)
    loop.run_until_complete(stop.wait())
    controller.stop()


if __name__ == "__main__":
    main()
