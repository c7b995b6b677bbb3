"""
4. IMAP mixed load: C sessions (10 and 50) of one user, each working in its
own mailbox (created and seeded with 20 messages by APPEND before the
clock starts), all logged in and selected before a common start; then for
a fixed time each session loops over a weighted random mix (seeded, so both
servers get the same sequence):

  FETCH flags+envelope of the last 10 (25%), FETCH one full body (10%),
  STORE +/-FLAGS \\Flagged (15%), APPEND 4 KB (15%), STORE \\Deleted +
  EXPUNGE (10%), STATUS INBOX (10%), LIST "" "*" (5%), SELECT again (10%).

Before that, I{logins/s}: 12 LOGINs (4 at a time) of the one user whose
password has each server's default hash (mailplat: argon2id as C{mailplat
user add} stores it; Dovecot: C{doveadm pw -s ARGON2ID}).  Every other
benchmark user has the same cheap argon2id hash on both servers, so that
opening many sessions does not measure the password hash.

mailplat runs with C{[imap] processes = 2} (L{PROCESSES}: one per core of
the machine the figures come from): the main process hands the sessions to
two worker processes (Dovecot runs a process per session).  On two cores,
four workers measured 10-20 % fewer operations per second than two: each
process has its own SQLite page cache, emptied by the others' commits.

Operations/s counts the operations completed inside the window; every NO,
BAD, timeout or dropped connection is an error (and the session goes on,
reconnecting if it must).  Latency is per operation, on the wire.
"""

from __future__ import annotations

import asyncio
import random
import re
import time

from bench.clients import IMAPClient, ProtocolError
from bench.common import percentiles, progress
from bench.corpus import message
from bench.servers import DOMAIN, LOGIN_USER, PASSWORD, Dovecot, Mailplat

TITLE = "IMAP mixed load"
CONCURRENCY = (10, 50)
#: mailplat's [imap] processes in this benchmark.
PROCESSES = 2
SEED_PER_MAILBOX = 20
OPS = (("FETCH envelope", 25), ("FETCH body", 10), ("STORE", 15), ("APPEND", 15), ("EXPUNGE", 10),
       ("STATUS", 10), ("LIST", 5), ("SELECT", 10))


def _track(state, untagged):
    for line in untagged:
        m = re.match(rb"\* (\d+) (EXISTS|EXPUNGE)", line)
        if m:
            if m.group(2) == b"EXISTS":
                state["n"] = int(m.group(1))
            else:
                state["n"] -= 1


class Session:
    def __init__(self, port, k, rng):
        self.port = port
        self.k = k
        self.box = f"mix{k}"
        self.rng = rng
        self.c = None
        self.state = {"n": 0}

    async def open(self):
        self.c = await IMAPClient.connect(self.port)
        await self.c.login(f"bench@{DOMAIN}", PASSWORD)
        untagged, _, _ = await self.c.command(f"SELECT {self.box}")
        _track(self.state, untagged)

    async def op(self, name):
        c, st = self.c, self.state
        n = max(1, st["n"])
        if name == "FETCH envelope":
            cmd = [f"FETCH {max(1, n - 9)}:{n} (FLAGS RFC822.SIZE ENVELOPE)"]
        elif name == "FETCH body":
            cmd = [f"FETCH {self.rng.randint(1, n)} BODY.PEEK[]"]
        elif name == "STORE":
            cmd = [f"STORE {self.rng.randint(1, n)} {self.rng.choice('+-')}FLAGS (\\Flagged)"]
        elif name == "APPEND":
            cmd = None
        elif name == "EXPUNGE":
            if n <= 10:
                name, cmd = "APPEND", None
            else:
                cmd = [f"STORE {self.rng.randint(1, n)} +FLAGS.SILENT (\\Deleted)", "EXPUNGE"]
        elif name == "STATUS":
            cmd = ["STATUS INBOX (MESSAGES UIDNEXT UNSEEN)"]
        elif name == "LIST":
            cmd = ['LIST "" "*"']
        else:
            cmd = [f"SELECT {self.box}"]
        start = time.perf_counter()
        if cmd is None:
            untagged, _, _ = await c.command(f"APPEND {self.box} ()",
                                             literal=message(self.rng.randint(0, 10**6)), timeout=60)
            _track(st, untagged)
            untagged, _, _ = await c.command("NOOP", timeout=60)
            _track(st, untagged)
        else:
            for text in cmd:
                if text.startswith("SELECT"):
                    st["n"] = 0
                untagged, _, _ = await c.command(text, timeout=60)
                _track(st, untagged)
        return name, time.perf_counter() - start


async def _prepare(port, sessions):
    """Create and seed the mailboxes mix0..mix{sessions-1} (untimed)."""
    c = await IMAPClient.connect(port)
    try:
        await c.login(f"bench@{DOMAIN}", PASSWORD)
        for k in range(sessions):
            try:
                await c.command(f"CREATE mix{k}")
            except ProtocolError:
                pass  # exists already
    finally:
        await c.close()

    async def seed(k):
        c = await IMAPClient.connect(port)
        try:
            await c.login(f"bench@{DOMAIN}", PASSWORD)
            untagged, _, _ = await c.command(f"STATUS mix{k} (MESSAGES)")
            have = int(re.search(rb"MESSAGES (\d+)", b"".join(untagged)).group(1))
            for i in range(have, SEED_PER_MAILBOX):
                await c.command(f"APPEND mix{k} ()", literal=message(k * 1000 + i))
        finally:
            await c.close()

    sem = asyncio.Semaphore(10)

    async def guarded(k):
        async with sem:
            await seed(k)

    await asyncio.gather(*(guarded(k) for k in range(sessions)))


async def _load(port, sessions, seconds, runSeed):
    rng = random.Random(runSeed)
    weights = [w for _, w in OPS]
    names = [n for n, _ in OPS]
    ss = [Session(port, k, random.Random(rng.random())) for k in range(sessions)]
    sem = asyncio.Semaphore(20)

    async def opener(s):
        async with sem:
            await s.open()

    await asyncio.gather(*(opener(s) for s in ss))
    lat = {n: [] for n in names}
    errors = []
    end = time.perf_counter() + seconds

    async def loop(s):
        while time.perf_counter() < end:
            name = s.rng.choices(names, weights)[0]
            try:
                done, secs = await s.op(name)
                if time.perf_counter() <= end:
                    lat[done].append(secs * 1000)
            except (ProtocolError, asyncio.TimeoutError, ConnectionError, OSError) as e:
                errors.append(f"{name}: {e or type(e).__name__}")
                if isinstance(e, ProtocolError) and "closed" not in str(e):
                    continue
                try:
                    await s.c.close()
                    await s.open()
                except Exception as e2:
                    errors.append(f"reconnect: {e2}")
                    await asyncio.sleep(0.5)

    start = time.perf_counter()
    await asyncio.gather(*(loop(s) for s in ss))
    window = min(seconds, time.perf_counter() - start)
    await asyncio.gather(*(s.c.close() for s in ss), return_exceptions=True)
    total = sum(len(v) for v in lat.values())
    return {"ops": total / window, "errors": len(errors), "errorSamples": sorted(set(errors))[:5], "lat": lat}


async def _logins(port, n=12, conc=4):
    sem = asyncio.Semaphore(conc)

    async def one():
        async with sem:
            c = await IMAPClient.connect(port)
            try:
                await c.login(f"{LOGIN_USER}@{DOMAIN}", PASSWORD)
            finally:
                await c.close()

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - start)


def run(ctx):
    r = ctx.results
    seconds = 5 if ctx.quick else 30
    m = d = None
    try:
        progress("  starting mailplat and Dovecot; creating and seeding the session mailboxes")
        m = Mailplat(ctx.base, processes=PROCESSES).start(users=["bench"])
        d = Dovecot(ctx.base).start(users=["bench"])
        for s in (m, d):
            asyncio.run(_prepare(s.imapPort, max(CONCURRENCY)))
        extra = r.extra.setdefault("imapmix", {})
        logins = {"mailplat": [], "dovecot": []}
        loginErr = {}
        for i in range(ctx.runs):
            for s in ((m, d) if i % 2 == 0 else (d, m)):
                if s.name in loginErr:
                    continue
                progress(f"  logins: run {i + 1}/{ctx.runs}: {s.name}")
                try:
                    logins[s.name].append(asyncio.run(_logins(s.imapPort)))
                except (ProtocolError, OSError, asyncio.TimeoutError) as e:
                    loginErr[s.name] = str(e)
                    r.fail("imapmix", s.name, "LOGIN", e)
        for s in (m, d):
            r.add("imapmix", "LOGIN, default password hash, 4 at a time", "logins/s", s.name, logins[s.name],
                  unit="/s", error=loginErr.get(s.name))
        for conc in CONCURRENCY:
            vals = {"mailplat": [], "dovecot": []}
            errs = {"mailplat": [], "dovecot": []}
            lat = {"mailplat": {}, "dovecot": {}}
            samples = {"mailplat": [], "dovecot": []}
            for i in range(ctx.runs):
                for s in ((m, d) if i % 2 == 0 else (d, m)):
                    progress(f"  {conc} sessions: run {i + 1}/{ctx.runs}: {s.name} for {seconds}s")
                    out = asyncio.run(_load(s.imapPort, conc, seconds, runSeed=1000 * conc + i))
                    vals[s.name].append(out["ops"])
                    errs[s.name].append(out["errors"])
                    samples[s.name].extend(out["errorSamples"])
                    for op, v in out["lat"].items():
                        lat[s.name].setdefault(op, []).extend(v)
            for s in (m, d):
                r.add("imapmix", f"{conc} sessions", "operations/s", s.name, vals[s.name], unit="ops/s",
                      note=f"mailplat: [imap] processes = {PROCESSES}")
                r.add("imapmix", f"{conc} sessions", "errors", s.name, errs[s.name], better="lower")
                if samples[s.name]:
                    r.fail("imapmix", s.name, f"mixed load, {conc} sessions", "; ".join(sorted(set(samples[s.name]))[:5]))
                allLat = [x for v in lat[s.name].values() for x in v]
                pct = percentiles(allLat, (50, 90, 99))
                for p, v in pct.items():
                    r.add("imapmix", f"{conc} sessions", f"{p} latency ms", s.name, [v] if v is not None else [],
                          unit="ms", better="lower", note="over all runs' operations")
                extra.setdefault(s.name, {})[str(conc)] = {
                    op: percentiles(v, (50, 90, 99)) | {"count": len(v)} for op, v in lat[s.name].items()}
                extra[s.name][str(conc)]["all"] = pct | {"count": len(allLat)}
            r.save()
    finally:
        for s in (m, d):
            if s is not None:
                s.stop()
