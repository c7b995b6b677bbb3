"""
6. POP3, mailplat vs Dovecot, with the same messages in each (4 KB):

- I{RETR of 1,000 messages}: one session, USER/PASS, then RETR 1 .. 1000
  one after the other (each waits for its reply): seconds for the 1,000
  RETRs, and messages/s;
- I{100 concurrent sessions}: 100 users (a POP3 maildrop is locked by its
  session, so one user each) with 10 messages each (20 in the full run);
  all connect at once and each does USER, PASS, STAT, UIDL, RETR of every
  message, QUIT (no DELE: the mailboxes stay as they are): wall time for all
  100, sessions/s, and the latency percentiles of a whole session.
"""

from __future__ import annotations

import asyncio
import time

from bench.clients import POP3Client, ProtocolError
from bench.common import percentiles, progress
from bench.seed import appendMailplat, corpus, seedDovecot
from bench.servers import DOMAIN, PASSWORD, Dovecot, Mailplat

TITLE = "POP3"
CONCURRENT = 100


async def _retrAll(port, user, n):
    c = await POP3Client.connect(port)
    await c.login(f"{user}@{DOMAIN}", PASSWORD)
    status, _ = await c.command("STAT")
    have = int(status.split()[1])
    if have != n:
        raise ProtocolError(f"STAT says {have} messages, {n} were seeded")
    start = time.perf_counter()
    for i in range(1, n + 1):
        await c.command(f"RETR {i}", multiline=True)
    secs = time.perf_counter() - start
    await c.quit()
    return secs


async def _concurrent(port, users, perUser):
    lat, errors = [], []

    async def session(u):
        t0 = time.perf_counter()
        try:
            c = await POP3Client.connect(port)
            await c.login(f"{u}@{DOMAIN}", PASSWORD)
            status, _ = await c.command("STAT")
            await c.command("UIDL", multiline=True)
            for i in range(1, int(status.split()[1]) + 1):
                await c.command(f"RETR {i}", multiline=True)
            await c.quit()
            lat.append((time.perf_counter() - t0) * 1000)
        except (ProtocolError, OSError, asyncio.TimeoutError) as e:
            errors.append(str(e) or type(e).__name__)

    start = time.perf_counter()
    await asyncio.gather(*(session(u) for u in users))
    return time.perf_counter() - start, lat, errors


def run(ctx):
    r = ctx.results
    nRetr = 1000
    perUser = 10 if ctx.quick else 20
    users = [f"pop{k}" for k in range(CONCURRENT)]
    m = d = None
    try:
        progress("  starting mailplat and Dovecot; seeding")
        m = Mailplat(ctx.base).start(users=["popbig", *users])
        d = Dovecot(ctx.base)
        d.addUsers(["popbig", *users])
        big = corpus(nRetr)
        seedDovecot(d, "popbig", big)
        small = corpus(perUser, offset=50_000)
        for u in users:
            seedDovecot(d, u, small)
        d.start(users=[])
        appendMailplat(m, "popbig", big, label="mailplat popbig")

        async def seedAll():
            sem = asyncio.Semaphore(8)
            from bench.seed import _appendAll

            async def one(u):
                async with sem:
                    await _appendAll(m.imapPort, u, "INBOX", small, 1, u)

            await asyncio.gather(*(one(u) for u in users))

        asyncio.run(seedAll())
        retr = {"mailplat": [], "dovecot": []}
        conc = {"mailplat": [], "dovecot": []}
        lat = {"mailplat": [], "dovecot": []}
        errs = {"mailplat": [], "dovecot": []}
        failed = {}
        for i in range(ctx.runs):
            for s in ((m, d) if i % 2 == 0 else (d, m)):
                progress(f"  run {i + 1}/{ctx.runs}: {s.name}: RETR x{nRetr}, then {CONCURRENT} sessions")
                if "retr" not in failed.get(s.name, {}):
                    try:
                        retr[s.name].append(asyncio.run(_retrAll(s.pop3Port, "popbig", nRetr)))
                    except (ProtocolError, OSError, asyncio.TimeoutError) as e:
                        failed.setdefault(s.name, {})["retr"] = str(e)
                        r.fail("pop3", s.name, f"RETR of {nRetr} messages", e)
                wall, l, e = asyncio.run(_concurrent(s.pop3Port, users, perUser))
                conc[s.name].append(len(l) / wall)
                lat[s.name].extend(l)
                errs[s.name].append(len(e))
                if e:
                    r.fail("pop3", s.name, f"{CONCURRENT} concurrent sessions", "; ".join(sorted(set(e))[:3]))
        extra = r.extra.setdefault("pop3", {})
        for s in (m, d):
            err = failed.get(s.name, {}).get("retr")
            r.add("pop3", f"RETR of {nRetr:,} messages, one session", "seconds", s.name, retr[s.name], unit="s",
                  better="lower", error=err)
            r.add("pop3", f"RETR of {nRetr:,} messages, one session", "messages/s", s.name,
                  [nRetr / x for x in retr[s.name]], unit="msg/s", error=err)
            case = f"{CONCURRENT} concurrent sessions, {perUser} messages each"
            r.add("pop3", case, "sessions/s", s.name, conc[s.name], unit="/s")
            r.add("pop3", case, "errors", s.name, errs[s.name], better="lower")
            pct = percentiles(lat[s.name], (50, 90, 99))
            for p, v in pct.items():
                r.add("pop3", case, f"{p} session ms", s.name, [v] if v is not None else [], unit="ms",
                      better="lower", note="over all runs' sessions")
            extra[s.name] = pct | {"count": len(lat[s.name])}
        r.save()
    finally:
        for s in (m, d):
            if s is not None:
                s.stop()
