"""
Seeding identical mail into every server: the same generated messages
(L{bench.corpus}) go into Dovecot's Maildirs as files (what its LDA would
write) and into mailplat over IMAP APPEND, several connections at a time
(the store group-commits concurrent appends).
"""

from __future__ import annotations

import asyncio
import time

from bench.clients import IMAPClient
from bench.common import progress
from bench.corpus import message, writeMaildir
from bench.servers import DOMAIN, PASSWORD


async def _appendAll(port, user, mailbox, items, connections, label):
    done = [0]
    start = time.monotonic()
    last = [start]
    queue = list(reversed(items))

    async def worker():
        c = await IMAPClient.connect(port)
        try:
            await c.login(f"{user}@{DOMAIN}", PASSWORD)
            while queue:
                data = queue.pop()
                await c.command(f'APPEND "{mailbox}" (\\Seen)', literal=data, timeout=120)
                done[0] += 1
                now = time.monotonic()
                if now - last[0] > 10:
                    last[0] = now
                    rate = done[0] / (now - start)
                    progress(f"    {label}: {done[0]}/{len(items)} appended ({rate:.0f}/s)")
        finally:
            await c.close()

    await asyncio.gather(*(worker() for _ in range(min(connections, len(items)))))
    return done[0] / max(1e-9, time.monotonic() - start)


def appendMailplat(server, user, messages, mailbox="INBOX", connections=8, label="mailplat"):
    """APPEND the messages to mailplat; returns the append rate (msg/s)."""
    return asyncio.run(_appendAll(server.imapPort, user, mailbox, list(messages), connections, label))


def corpus(n, size=4096, offset=0):
    return [message(offset + i, size) for i in range(n)]


def seedDovecot(server, user, messages, mailbox="INBOX"):
    writeMaildir(server.maildir(user, mailbox), messages)
    server.fixOwnership()
