"""
3. IMAP on large mailboxes: one user's INBOX holds N identical generated
messages (4 KB each; 10,000, and 100,000 in the full run) on mailplat
(appended over IMAP) and on Dovecot (written to its Maildir).  After one
untimed warm-up (SELECT and a FLAGS fetch, so Dovecot has built its index
and both have a warm page cache), each command's time on the wire is
measured from the first byte sent to the last byte of the tagged OK, on one
connection, interleaving the servers run by run:

- C{SELECT INBOX};
- C{UID FETCH 1:* (FLAGS UID RFC822.SIZE)} (the answer is checked: N lines);
- C{FETCH a:b BODY.PEEK[]}: 100 full bodies from the middle of the mailbox;
- C{SEARCH SUBJECT / FROM / BODY "zanzibar"}: one message in 1,000 matches
  (the number of hits is checked against the corpus).

While the commands run, the server's memory is sampled every 250 ms (PSS
of its whole process tree): I{peak memory} is the highest sample.

No full-text index on either side: Dovecot's default (no fts plugin).
"""

from __future__ import annotations

import asyncio
import re

from bench.clients import IMAPClient, ProtocolError
from bench.common import Sampler, progress
from bench.corpus import RARE
from bench.seed import appendMailplat, corpus, seedDovecot
from bench.servers import DOMAIN, PASSWORD, Dovecot, Mailplat

TITLE = "IMAP on large mailboxes"


def commands(n):
    mid = n // 2
    return [
        ("SELECT", "SELECT INBOX", None),
        ("UID FETCH 1:* (FLAGS UID RFC822.SIZE)", "UID FETCH 1:* (FLAGS UID RFC822.SIZE)", n),
        ("FETCH 100 full bodies", f"FETCH {mid + 1}:{mid + 100} BODY.PEEK[]", 100),
        ("SEARCH SUBJECT", f'SEARCH SUBJECT "{RARE}"', n // 1000),
        ("SEARCH FROM", f'SEARCH FROM "{RARE}"', n // 1000),
        ("SEARCH BODY", f'SEARCH BODY "{RARE}"', n // 1000),
    ]


def _count(name, untagged):
    if name.startswith("SEARCH"):
        for line in untagged:
            if line.startswith(b"* SEARCH"):
                return len(line.split()) - 2
        return 0
    return sum(1 for line in untagged if re.match(rb"\* \d+ FETCH", line))


async def _measure(port, cmds, runs, label):
    c = await IMAPClient.connect(port)
    out = {name: [] for name, _, _ in cmds}
    errors = {}
    try:
        await c.login(f"bench@{DOMAIN}", PASSWORD)
        await c.command("SELECT INBOX", timeout=600)
        await c.command("UID FETCH 1:* (FLAGS)", timeout=600)
        for i in range(runs):
            for name, text, expect in cmds:
                if name in errors:
                    continue
                try:
                    untagged, _, secs = await c.command(text, timeout=600)
                except (ProtocolError, asyncio.TimeoutError) as e:
                    errors[name] = str(e) or "timed out"
                    continue
                if expect is not None and _count(name, untagged) != expect:
                    errors[name] = f"{text!r} answered {_count(name, untagged)} items, expected {expect}"
                    continue
                out[name].append(secs * 1000)
    finally:
        await c.close()
    return out, errors


def run(ctx):
    sizes = [10_000] if ctx.quick else [10_000, 100_000]
    r = ctx.results
    for n in sizes:
        label = f"{n:,} messages"
        m = d = None
        try:
            progress(f"  {label}: starting mailplat and Dovecot, seeding")
            m = Mailplat(ctx.base).start(users=["bench"])
            d = Dovecot(ctx.base)
            d.addUsers(["bench"])
            messages = corpus(n)
            seedDovecot(d, "bench", messages)
            d.start(users=[])
            rate = appendMailplat(m, "bench", messages, label=f"mailplat {label}")
            progress(f"    seeded: mailplat appended {n} at {rate:.0f} msg/s")
            r.extra.setdefault("imap_seed", {})[str(n)] = {"mailplat_append_rate": rate}
            del messages
            cmds = commands(n)
            results = {"mailplat": ({}, {}), "dovecot": ({}, {})}
            peaks = {"mailplat": [], "dovecot": []}
            for i in range(ctx.runs):
                for s in ((m, d) if i % 2 == 0 else (d, m)):
                    progress(f"  {label}: run {i + 1}/{ctx.runs}: {s.name}")
                    with Sampler(s.pids) as sampler:
                        out, errs = asyncio.run(_measure(s.imapPort, cmds, 1, label))
                    peaks[s.name].append(sampler.peakPss / 2**20)
                    vals, allErrs = results[s.name]
                    for k, v in out.items():
                        vals.setdefault(k, []).extend(v)
                    for k, e in errs.items():
                        allErrs.setdefault(k, e)
            for name, _, _ in cmds:
                for s in (m, d):
                    vals, errs = results[s.name]
                    if name in errs:
                        r.fail("imap", s.name, f"{name} ({label})", errs[name])
                    r.add("imap", f"{label}: {name}", "ms", s.name, vals.get(name, []), unit="ms", better="lower",
                          error=errs.get(name))
            for s in (m, d):
                r.add("imap", f"{label}: all of the above", "peak memory (PSS) MB", s.name, peaks[s.name], unit="MB",
                      better="lower")
            r.save()
        finally:
            for s in (m, d):
                if s is not None:
                    s.stop()
