"""
1. SMTP intake: Postfix's C{smtp-source} sends N messages with S parallel
sessions to each server in turn (same run, interleaved), for 4 KB and
100 KB messages and S = 1, 10, 50.

- I{accepted msg/s}: N / the wall time of smtp-source (every message got
  its 250, so it is durable on the server's disk);
- I{delivered msg/s}: N / the time until all N are in the recipient's
  mailbox (mailplat: IMAP STATUS of INBOX, polled every 50 ms; Postfix:
  files in the Maildir's new/; aiosmtpd writes the Maildir before its 250);
- I{CPU s per 1,000 msgs}: the server's user+system CPU (its whole process
  tree, reaped children included) from the first connection until all N
  were delivered;
- I{peak memory}: the highest PSS of the server's process tree, sampled
  every 250 ms (PSS shares shared pages out between processes, so a
  multi-process server is not counted several times over).

N is 5,000 for 4 KB messages and 500 for 100 KB ones (200 and 50 with
--quick).  smtp-sink accepts and discards: it is the ceiling of the load
generator.
"""

from __future__ import annotations

import imaplib
import re
import subprocess
import time

from bench.common import Sampler, cpuSeconds, findProgram, processTree, progress
from bench.servers import DOMAIN, PASSWORD, Aiosmtpd, Mailplat, Postfix, SmtpSink

TITLE = "SMTP intake"
SIZES = ((4096, "4 KB"), (102400, "100 KB"))
SESSIONS = (1, 10, 50)


class _MailplatCounter:
    def __init__(self, server):
        self.server = server
        self.conn = None

    def __call__(self):
        try:
            if self.conn is None:
                self.conn = imaplib.IMAP4("127.0.0.1", self.server.imapPort)
                self.conn.login(f"bench@{DOMAIN}", PASSWORD)
            typ, data = self.conn.status("INBOX", "(MESSAGES)")
            return int(re.search(rb"MESSAGES (\d+)", data[0]).group(1))
        except Exception:
            self.conn = None
            raise


def counts(ctx):
    if ctx.quick:
        return {4096: 200, 102400: 50}
    return {4096: 5000, 102400: 500}


def run(ctx):
    r = ctx.results
    servers = []
    try:
        progress("  starting mailplat, Postfix, aiosmtpd, smtp-sink")
        m = Mailplat(ctx.base).start(users=["bench"])
        servers.append(m)
        servers.append(Postfix(ctx.base, users=["bench"]).start())
        servers.append(Aiosmtpd(ctx.base).start())
        servers.append(SmtpSink(ctx.base).start())
        counters = {"mailplat": _MailplatCounter(m)}
        for s in servers[1:3]:
            counters[s.name] = s.delivered
        source = findProgram("smtp-source")
        results = {}  # (case, server) -> {metric: [values]}
        errors = {}
        ncount = counts(ctx)
        for size, sizeName in SIZES:
            n = ncount[size]
            for sessions in SESSIONS:
                case = f"{sizeName}, -s {sessions}"
                for run_ in range(ctx.runs):
                    order = servers[run_ % len(servers):] + servers[:run_ % len(servers)]
                    for s in order:
                        key = (case, s.name)
                        if key in errors:
                            continue
                        progress(f"  {case}: run {run_ + 1}/{ctx.runs}: {s.name}, {n} messages")
                        try:
                            out = _one(s, source, n, size, sessions, counters.get(s.name), ctx)
                        except Exception as e:
                            errors[key] = str(e)
                            r.fail("smtp", s.name, f"SMTP intake {case}", e)
                            continue
                        for metric, v in out.items():
                            results.setdefault(key, {}).setdefault(metric, []).append(v)
                for s in servers:
                    key = (case, s.name)
                    got = results.get(key, {})
                    err = errors.get(key)
                    r.add("smtp", case, "accepted msg/s", s.name, got.get("accepted", []), unit="msg/s", error=err)
                    if s.name != "smtp-sink":
                        r.add("smtp", case, "delivered msg/s", s.name, got.get("delivered", []), unit="msg/s",
                              error=err)
                    r.add("smtp", case, "CPU s per 1,000 msgs", s.name, got.get("cpu", []), unit="s",
                          better="lower", error=err)
                    r.add("smtp", case, "peak memory (PSS) MB", s.name, got.get("pss", []), unit="MB",
                          better="lower", error=err)
                r.save()
    finally:
        for s in servers:
            s.stop()


def _one(server, source, n, size, sessions, counter, ctx):
    before = counter() if counter else 0
    tree = lambda: processTree(server.pids())  # noqa: E731
    cpu0 = cpuSeconds(tree())
    timeout = max(120.0, n / 5.0)
    with Sampler(server.pids) as sampler:
        start = time.perf_counter()
        p = subprocess.run([source, "-s", str(sessions), "-m", str(n), "-l", str(size),
                            "-f", "sender@example.com", "-t", f"bench@{DOMAIN}",
                            f"127.0.0.1:{server.smtpPort}"],
                           capture_output=True, text=True, timeout=timeout)
        accepted = time.perf_counter() - start
        if p.returncode != 0 or "fatal" in p.stderr or "error" in p.stderr.lower():
            raise RuntimeError(f"smtp-source: {(p.stderr or p.stdout).strip()[-300:]} (exit {p.returncode})")
        delivered = accepted
        if counter is not None:
            deadline = start + timeout
            got = counter() - before
            while got < n:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"only {got} of {n} messages delivered after {timeout:.0f}s")
                time.sleep(0.05)
                got = counter() - before
            delivered = time.perf_counter() - start
    cpu = cpuSeconds(tree()) - cpu0
    return {"accepted": n / accepted, "delivered": n / delivered, "cpu": cpu / n * 1000,
            "pss": sampler.peakPss / 2**20}
