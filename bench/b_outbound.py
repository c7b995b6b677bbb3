"""
2. Outbound: N queued messages (4 KB; 5,000, 1,000 with --quick) relayed to
smtp-sink on 127.0.0.1.  Postfix: a private instance whose smtpd puts every
message on hold (C{check_client_access static:HOLD}) while smtp-source
submits them, so all N are queued first; then C{postsuper -H ALL} and
C{postqueue -f} release them, and the clock runs until the queue is empty
and the log shows N C{status=sent} (its smtp(8) client, default
concurrency, relayhost C{[127.0.0.1]:sink}).  I{msg/s} = N / that time.

mailplat: the same N messages are queued while its outbound transport is
disabled (relaying allowed from 127.0.0.0/8); then the queue is flushed
(C{mailplat queue flush}) and mailplat restarted with the transport enabled
and smtp-sink as its smarthost.  The clock starts at the first delivery
(the queue drops below N, so start-up is not counted) and stops when the
queue is empty: I{msg/s} = (N - 1) / that time.  CPU is the process's
whole run, start-up included.
"""

from __future__ import annotations

import os
import subprocess
import time

from bench.common import cpuSeconds, findProgram, processTree, progress
from bench.servers import Mailplat, Postfix, SmtpSink

TITLE = "Outbound relay to smtp-sink"


def _mailplatConfig(enabled, sinkPort):
    return f"""
[routing]
plugin = "directory"
args = {{ trusted_networks = ["127.0.0.0/8"] }}

[outbound]
enabled = {"true" if enabled else "false"}
smarthost = "127.0.0.1:{sinkPort}"
tls = "never"
"""


def _runMailplat(ctx, n, sink, source):
    rates, cpus = [], []
    for i in range(ctx.runs):
        m = Mailplat(ctx.base, extraConfig=_mailplatConfig(False, sink.port))
        try:
            m.start()
            progress(f"  run {i + 1}/{ctx.runs}: mailplat: queueing {n} messages (outbound disabled)")
            q = subprocess.run([source, "-s", "10", "-m", str(n), "-l", "4096", "-f", "sender@bench.test",
                                "-t", "someone@remote.example", f"127.0.0.1:{m.smtpPort}"],
                               capture_output=True, text=True, timeout=600)
            if q.returncode != 0:
                raise RuntimeError(f"smtp-source: {q.stderr.strip()[-300:]}")
            deadline = time.monotonic() + 120
            while m.queued() < n and time.monotonic() < deadline:
                time.sleep(0.1)
            if m.queued() < n:
                raise RuntimeError(f"only {m.queued()} of {n} messages queued")
            m.stop()
            m.cli("queue", "flush")
            m.writeConfig(_mailplatConfig(True, sink.port))
            progress(f"  run {i + 1}/{ctx.runs}: mailplat: relaying {n} messages to smtp-sink")
            m.launch()
            deadline = time.monotonic() + 60
            while m.queued() >= n and time.monotonic() < deadline:
                time.sleep(0.01)
            start = time.perf_counter()
            deadline = time.monotonic() + 600
            while m.queued() > 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            if m.queued() > 0:
                raise RuntimeError(f"{m.queued()} messages still queued after 600s: {m.logTail(600)}")
            elapsed = time.perf_counter() - start
            cpus.append(cpuSeconds(processTree(m.pids())) / n * 1000)
            rates.append((n - 1) / elapsed)
        finally:
            m.stop()
    return rates, cpus


def _sent(postfix):
    try:
        with open(os.path.join(postfix.workdir, "log", "postfix.log"), errors="replace") as f:
            return sum(1 for line in f if " status=sent " in line)
    except OSError:
        return 0


def run(ctx):
    r = ctx.results
    n = 1000 if ctx.quick else 5000
    sink = p = None
    rates, cpus = [], []
    error = None
    try:
        sink = SmtpSink(ctx.base).start()
        p = Postfix(ctx.base, users=["bench"], relayPort=sink.port, hold=True).start()
        source = findProgram("smtp-source")
        for i in range(ctx.runs):
            progress(f"  run {i + 1}/{ctx.runs}: Postfix: queueing {n} messages on hold")
            sentBefore = _sent(p)
            q = subprocess.run([source, "-s", "10", "-m", str(n), "-l", "4096", "-f", "sender@bench.test",
                                "-t", "someone@remote.example", f"127.0.0.1:{p.port}"],
                               capture_output=True, text=True, timeout=600)
            if q.returncode != 0:
                raise RuntimeError(f"smtp-source: {q.stderr.strip()[-300:]}")
            deadline = time.monotonic() + 120
            while p.held() < n and time.monotonic() < deadline:
                time.sleep(0.1)
            if p.held() < n:
                raise RuntimeError(f"only {p.held()} of {n} messages on hold")
            progress(f"  run {i + 1}/{ctx.runs}: Postfix: relaying {n} messages to smtp-sink")
            cpu0 = cpuSeconds(processTree(p.pids()))
            start = time.perf_counter()
            p.releaseHeld()
            p.flush()
            deadline = time.monotonic() + 600
            while p.queued() > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            if p.queued() > 0:
                raise RuntimeError(f"{p.queued()} messages still queued after 600s")
            elapsed = time.perf_counter() - start
            cpu = cpuSeconds(processTree(p.pids())) - cpu0
            deadline = time.monotonic() + 15
            while _sent(p) - sentBefore < n and time.monotonic() < deadline:
                time.sleep(0.2)
            if _sent(p) - sentBefore < n:
                raise RuntimeError(f"the queue emptied but the log shows {_sent(p) - sentBefore} of {n} sent")
            rates.append(n / elapsed)
            cpus.append(cpu / n * 1000)
    except Exception as e:
        error = str(e)
        r.fail("outbound", "postfix", "outbound relay", e)
    finally:
        for s in (p, sink):
            if s is not None:
                s.stop()
    mrates, mcpus, merror = [], [], None
    sink = None
    try:
        sink = SmtpSink(ctx.base).start()
        mrates, mcpus = _runMailplat(ctx, n, sink, findProgram("smtp-source"))
    except Exception as e:
        merror = str(e)
        r.fail("outbound", "mailplat", "outbound relay", e)
    finally:
        if sink is not None:
            sink.stop()
    case = f"{n:,} queued 4 KB messages to smtp-sink"
    r.add("outbound", case, "msg/s", "mailplat", mrates, unit="msg/s", error=merror)
    r.add("outbound", case, "msg/s", "postfix", rates, unit="msg/s", error=error)
    r.add("outbound", case, "CPU s per 1,000 msgs", "mailplat", mcpus, unit="s", better="lower", error=merror)
    r.add("outbound", case, "CPU s per 1,000 msgs", "postfix", cpus, unit="s", better="lower", error=error)
