"""
5. IMAP IDLE fan-out: N sessions of one user (100 and 500 with --quick;
500, 1,000, 2,000 and 5,000 in the full run) log in, SELECT INBOX and
IDLE.  Then:

- I{memory}: the server's PSS and RSS with the N sessions open (mailplat:
  its one process; Dovecot: the sum over all its processes, the master,
  login and one imap process per session), and per session: (with N minus
  the freshly started server's) / N;
- I{fan-out}: one message is delivered (to mailplat by SMTP, through its
  queue and store; to Dovecot as its LDA does it, a Maildir file written,
  fsync'd and renamed into new/), and the clock runs from the start of the
  delivery until every one of the N sessions has received its
  C{* n EXISTS}: the time for the first, the median and the last session.
  Repeated once per run on the same sessions.

A session count is skipped when the memory it would need (extrapolated
from the smaller count) passes half of the machine's available memory.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
import statistics
import time

from bench.clients import IMAPClient, ProtocolError
from bench.common import memory, processTree, progress, raiseFileLimit
from bench.corpus import message
from bench.servers import DOMAIN, PASSWORD, Dovecot, Mailplat

TITLE = "IMAP IDLE fan-out"
USER = "idle"


def _available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _inotifyLimit():
    try:
        with open("/proc/sys/fs/inotify/max_user_instances") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _deliver(server, i):
    data = message(900_000 + i, 2048, to=f"{USER}@{DOMAIN}")
    if isinstance(server, Mailplat):
        with smtplib.SMTP("127.0.0.1", server.smtpPort, timeout=60) as s:
            s.sendmail("sender@example.com", [f"{USER}@{DOMAIN}"], data)
    else:
        server.deliver(USER, data)


async def _fanout(server, n, runs, ctx, label, base):
    """Open n idling sessions; return memory, open rate and fan-out timings (or errors)."""
    out = {"errors": {}}
    tree = lambda: processTree(server.pids())  # noqa: E731
    sessions = []
    sem = asyncio.Semaphore(50)
    start = time.perf_counter()

    async def opener(k):
        async with sem:
            c = await IMAPClient.connect(server.imapPort, timeout=120)
            await c.login(f"{USER}@{DOMAIN}", PASSWORD)
            await c.command("SELECT INBOX", timeout=120)
            sessions.append(c)

    results = await asyncio.gather(*(opener(k) for k in range(n)), return_exceptions=True)
    bad = [r for r in results if isinstance(r, BaseException)]
    openSecs = time.perf_counter() - start
    if bad:
        out["errors"]["open"] = f"{len(bad)} of {n} sessions failed to open: {bad[0]!r}"
    out["open_rate"] = len(sessions) / openSecs
    progress(f"    {label}: {len(sessions)} sessions open in {openSecs:.1f}s")
    idling = []

    async def idler(c):
        await c.idle(timeout=60)
        idling.append(c)

    results = await asyncio.gather(*(idler(c) for c in sessions), return_exceptions=True)
    bad = [r for r in results if isinstance(r, BaseException)]
    if bad:
        out["errors"]["idle"] = f"{len(bad)} of {len(sessions)} sessions could not IDLE: {bad[0]}"
    await asyncio.sleep(1.0)
    mems = [memory(tree()) for _ in range(3) if not time.sleep(0.2)]
    m = {k: statistics.median(x[k] for x in mems) for k in ("rss", "pss", "processes")}
    out["pss"] = m["pss"] / 2**20
    out["rss"] = m["rss"] / 2**20
    out["processes"] = m["processes"]
    out["pss_per_session"] = (m["pss"] - base["pss"]) / max(1, len(sessions)) / 1024
    out["fanout"] = []
    if idling and len(idling) == len(sessions):
        for i in range(runs):
            t0 = time.perf_counter()
            arrivals = []

            async def waiter(c):
                await c.waitFor(rb"^\* \d+ EXISTS", timeout=120)
                arrivals.append(time.perf_counter() - t0)

            tasks = [asyncio.ensure_future(waiter(c)) for c in idling]
            await asyncio.get_running_loop().run_in_executor(None, _deliver, server, i)
            done, pending = await asyncio.wait(tasks, timeout=120)
            for t in pending:
                t.cancel()
            if pending or any(t.exception() for t in done):
                out["errors"]["fanout"] = (f"{len(arrivals)} of {len(idling)} sessions saw the new message "
                                           f"within 120s")
                break
            arrivals.sort()
            out["fanout"].append({"first": arrivals[0] * 1000, "median": arrivals[len(arrivals) // 2] * 1000,
                                  "last": arrivals[-1] * 1000})
            progress(f"    {label}: delivery {i + 1}/{runs} reached all {len(idling)} sessions "
                     f"in {arrivals[-1] * 1000:.0f} ms")
            await asyncio.sleep(0.5)
    elif not idling:
        out["errors"].setdefault("fanout", "no session is idling")
    await asyncio.gather(*(c.close() for c in sessions), return_exceptions=True)
    return out


def run(ctx):
    r = ctx.results
    if ctx.args is not None and getattr(ctx.args, "idle_sessions", None):
        counts = [int(x) for x in ctx.args.idle_sessions.split(",")]
    else:
        counts = [100, 500] if ctx.quick else [500, 1000, 2000, 5000]
    limit = raiseFileLimit(2 * max(counts) + 1000)
    r.extra["idle_env"] = {"fd_limit": limit, "inotify_max_user_instances": _inotifyLimit()}
    m = d = None
    try:
        progress(f"  starting mailplat and Dovecot (open-file limit {limit})")
        m = Mailplat(ctx.base).start(users=[USER])
        d = Dovecot(ctx.base).start(users=[USER])
        perSession = {}
        time.sleep(1.0)
        baseline = {s.name: memory(processTree(s.pids())) for s in (m, d)}
        for n in counts:
            if n * 2 + 100 > limit:
                for s in (m, d):
                    r.add("idle", f"{n} sessions", "fan-out to all, ms", s.name, [], unit="ms", better="lower",
                          error=f"skipped: needs {2 * n} open files, the limit is {limit}")
                continue
            for s in (m, d):
                case = f"{n} sessions"
                need = perSession.get(s.name, 0) * 1024 * n
                if need and need > _available() / 2:
                    msg = (f"skipped: would need about {need / 2**30:.1f} GiB "
                           f"(available {_available() / 2**30:.1f} GiB)")
                    r.add("idle", case, "memory (PSS) MB", s.name, [], unit="MB", better="lower", error=msg)
                    continue
                progress(f"  {n} sessions: {s.name}")
                try:
                    out = asyncio.run(_fanout(s, n, ctx.runs, ctx, f"{s.name} {n}", baseline[s.name]))
                except (ProtocolError, OSError, asyncio.TimeoutError) as e:
                    r.fail("idle", s.name, f"{n} IDLE sessions", e)
                    r.add("idle", case, "fan-out to all, ms", s.name, [], unit="ms", better="lower", error=str(e))
                    continue
                for what, msg in out["errors"].items():
                    r.fail("idle", s.name, f"{n} sessions: {what}", msg)
                perSession[s.name] = max(perSession.get(s.name, 0), out["pss_per_session"])
                r.add("idle", case, "memory (PSS) MB", s.name, [out["pss"]], unit="MB", better="lower",
                      note=f"{out['processes']} processes")
                r.add("idle", case, "memory (RSS, summed) MB", s.name, [out["rss"]], unit="MB", better="lower")
                r.add("idle", case, "PSS KB per session", s.name, [out["pss_per_session"]], unit="KB",
                      better="lower")
                r.add("idle", case, "sessions opened/s", s.name, [out["open_rate"]], unit="/s",
                      error=out["errors"].get("open"))
                fan = out["fanout"]
                err = out["errors"].get("fanout") or out["errors"].get("idle")
                r.add("idle", case, "fan-out to first, ms", s.name, [f["first"] for f in fan], unit="ms",
                      better="lower", error=err)
                r.add("idle", case, "fan-out to median, ms", s.name, [f["median"] for f in fan], unit="ms",
                      better="lower", error=err)
                r.add("idle", case, "fan-out to all, ms", s.name, [f["last"] for f in fan], unit="ms",
                      better="lower", error=err)
                r.save()
    finally:
        for s in (m, d):
            if s is not None:
                s.stop()
