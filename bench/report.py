"""
The report: C{docs/benchmarks.md} with a table per benchmark (median and
min–max of the runs for each server, and mailplat's ratio to each peer
paired run by run), the machine and its load, the failures found, and PNG
plots (matplotlib, Agg) in a C{benchmarks/} directory beside it.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict

from bench.common import Results, ratios, summary

ORDER = ("limits", "smtp", "outbound", "imap", "imapmix", "idle", "pop3")
COLORS = {"mailplat": "#1f77b4", "postfix": "#d62728", "dovecot": "#2ca02c", "aiosmtpd": "#ff7f0e",
          "smtp-sink": "#7f7f7f", "machine": "#9467bd"}


def fmt(v) -> str:
    if v is None:
        return "–"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def cell(values) -> str:
    s = summary(values)
    if s is None:
        return "–"
    if s["n"] == 1 or s["min"] == s["max"]:
        return fmt(s["median"])
    return f"{fmt(s['median'])} ({fmt(s['min'])}–{fmt(s['max'])})"


def ratioCell(a, b) -> str:
    s = ratios(a, b)
    if s is None:
        return "–"
    if s["n"] == 1 or s["min"] == s["max"]:
        return f"{s['median']:.2f}×"
    return f"{s['median']:.2f}× ({s['min']:.2f}–{s['max']:.2f})"


def epytext(text) -> str:
    """The module docstrings' C{code} and I{emphasis} as Markdown."""
    text = re.sub(r"C\{([^}]*)\}", r"`\1`", text)
    return re.sub(r"I\{([^}]*)\}", r"*\1*", text)


def _esc(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(results: Results, bench: str) -> list[str]:
    ms = [m for m in results.measurements if m.bench == bench]
    if not ms:
        return []
    servers = list(OrderedDict.fromkeys(m.server for m in ms))
    peers = [s for s in servers if s != "mailplat"] if "mailplat" in servers else []
    rows = OrderedDict()
    for m in ms:
        rows.setdefault((m.case, m.metric), {})[m.server] = m
    head = ["case", "metric", *servers, *[f"mailplat ÷ {p}" for p in peers]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for (case, metric), by in rows.items():
        cells = [_esc(case), _esc(metric)]
        for s in servers:
            m = by.get(s)
            if m is None:
                cells.append("")
            elif m.error and not m.values:
                notes.append(f"{s}, {case}, {metric}: {m.error}")
                cells.append(f"error [{len(notes)}]")
            else:
                c = cell(m.values)
                if m.error:
                    notes.append(f"{s}, {case}, {metric}: {m.error}")
                    c += f" [{len(notes)}]"
                cells.append(c)
        mp = by.get("mailplat")
        for p in peers:
            pm = by.get(p)
            if p == "smtp-sink" and metric != "accepted msg/s":
                cells.append("–")  # a discard server's CPU and memory are no yardstick
            elif mp is None or pm is None or not mp.values or not pm.values:
                cells.append("–")
            else:
                cells.append(ratioCell(mp.values, pm.values))
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines.extend(f"[{i}] {_esc(n)}  " for i, n in enumerate(notes, 1))
    return lines


# --- plots ------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _errbar(ax, xs, series, label, color, style="-o"):
    pts = [(x, summary(v)) for x, v in zip(xs, series)]
    pts = [(x, s) for x, s in pts if s]
    if not pts:
        return
    x = [p[0] for p in pts]
    med = [p[1]["median"] for p in pts]
    lo = [p[1]["median"] - p[1]["min"] for p in pts]
    hi = [p[1]["max"] - p[1]["median"] for p in pts]
    ax.errorbar(x, med, yerr=[lo, hi], fmt=style, label=label, color=color, capsize=3)


def _find(results, bench, case, metric, server):
    for m in results.measurements:
        if m.bench == bench and m.case == case and m.metric == metric and m.server == server:
            return m.values
    return []


def plotSMTP(results, outdir):
    plt = _plt()
    servers = list(OrderedDict.fromkeys(m.server for m in results.measurements if m.bench == "smtp"))
    if not servers:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, size in zip(axes, ("4 KB", "100 KB")):
        xs = [1, 10, 50]
        for s in servers:
            acc = [_find(results, "smtp", f"{size}, -s {x}", "accepted msg/s", s) for x in xs]
            _errbar(ax, xs, acc, f"{s} accepted", COLORS.get(s))
            if s in ("mailplat", "postfix"):
                dl = [_find(results, "smtp", f"{size}, -s {x}", "delivered msg/s", s) for x in xs]
                _errbar(ax, xs, dl, f"{s} delivered", COLORS.get(s), style="--x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel("parallel SMTP sessions (smtp-source -s)")
        ax.set_ylabel("messages/s (log)")
        ax.set_title(f"SMTP intake, {size} messages")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, outdir, "smtp-throughput.png")


def plotIMAP(results, outdir):
    plt = _plt()
    ms = [m for m in results.measurements if m.bench == "imap"]
    if not ms:
        return None
    cases = list(OrderedDict.fromkeys(m.case for m in ms))
    servers = list(OrderedDict.fromkeys(m.server for m in ms))
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(cases) * len(servers) + 1.2))
    y = 0
    ticks, labels = [], []
    for case in cases:
        for s in servers:
            v = summary(_find(results, "imap", case, "ms", s))
            if v:
                ax.barh(y, v["median"], color=COLORS.get(s), xerr=[[v["median"] - v["min"]], [v["max"] - v["median"]]],
                        capsize=2)
            ticks.append(y)
            labels.append(f"{case} — {s}")
            y += 1
        y += 0.5
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds on the wire (log; median, min–max)")
    ax.set_title("IMAP commands on large mailboxes")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, outdir, "imap-commands.png")


def plotMix(results, outdir):
    plt = _plt()
    extra = results.extra.get("imapmix", {})
    ms = [m for m in results.measurements if m.bench == "imapmix" and m.metric == "operations/s"]
    if not ms:
        return None
    servers = list(OrderedDict.fromkeys(m.server for m in ms))
    concs = sorted({int(m.case.split()[0]) for m in ms})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 2]})
    for s in servers:
        _errbar(axes[0], concs, [_find(results, "imapmix", f"{c} sessions", "operations/s", s) for c in concs],
                s, COLORS.get(s))
    axes[0].set_xlabel("concurrent IMAP sessions")
    axes[0].set_ylabel("operations/s")
    axes[0].set_xticks(concs)
    axes[0].set_title("IMAP mixed load: throughput")
    axes[0].grid(True, alpha=0.3)
    axes[0].legend()
    ax = axes[1]
    conc = str(max(concs))
    ops = sorted({op for s in servers for op in extra.get(s, {}).get(conc, {})})
    width = 0.8 / max(1, len(servers))
    for i, s in enumerate(servers):
        data = extra.get(s, {}).get(conc, {})
        for j, op in enumerate(ops):
            p = data.get(op, {})
            x = j + i * width
            for pct, alpha in (("p99", 0.3), ("p90", 0.6), ("p50", 1.0)):
                if p.get(pct):
                    ax.bar(x, p[pct], width, color=COLORS.get(s), alpha=alpha,
                           label=f"{s} {pct}" if j == 0 else None)
    ax.set_xticks([j + width * (len(servers) - 1) / 2 for j in range(len(ops))])
    ax.set_xticklabels(ops, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title(f"latency percentiles at {conc} sessions (p50 solid, p90, p99 paler)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, outdir, "imap-mixed.png")


def plotIdle(results, outdir):
    plt = _plt()
    ms = [m for m in results.measurements if m.bench == "idle"]
    if not ms:
        return None
    servers = list(OrderedDict.fromkeys(m.server for m in ms))
    ns = sorted({int(m.case.split()[0]) for m in ms})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in servers:
        _errbar(axes[0], ns, [_find(results, "idle", f"{n} sessions", "memory (PSS) MB", s) for n in ns],
                s, COLORS.get(s))
        _errbar(axes[1], ns, [_find(results, "idle", f"{n} sessions", "fan-out to all, ms", s) for n in ns],
                f"{s}: last session", COLORS.get(s))
        _errbar(axes[1], ns, [_find(results, "idle", f"{n} sessions", "fan-out to median, ms", s) for n in ns],
                f"{s}: median session", COLORS.get(s), style="--x")
    for ax, title, ylabel in ((axes[0], "memory with N idling sessions", "PSS MB (all processes)"),
                              (axes[1], "one delivery reaching N idling sessions", "ms")):
        ax.set_xscale("log")
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.set_xlabel("IDLE sessions")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, outdir, "imap-idle.png")


def plotPOP3(results, outdir):
    plt = _plt()
    extra = results.extra.get("pop3", {})
    if not extra:
        return None
    servers = list(extra)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    pcts = ("p50", "p90", "p99")
    width = 0.8 / len(servers)
    for i, s in enumerate(servers):
        ax.bar([j + i * width for j in range(len(pcts))], [extra[s].get(p) or 0 for p in pcts], width,
               color=COLORS.get(s), label=s)
    ax.set_xticks([j + width * (len(servers) - 1) / 2 for j in range(len(pcts))])
    ax.set_xticklabels(pcts)
    ax.set_ylabel("ms per whole session")
    ax.set_title("POP3: latency of a session, 100 concurrent")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, outdir, "pop3-sessions.png")


def _save(fig, outdir, name):
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, name)
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return name


PLOTS = {"smtp": [plotSMTP], "imap": [plotIMAP], "imapmix": [plotMix], "idle": [plotIdle], "pop3": [plotPOP3]}


def renderPlots(results, outdir) -> dict:
    out = {}
    for bench, fns in PLOTS.items():
        for fn in fns:
            try:
                name = fn(results, outdir)
            except Exception as e:  # a plot must not lose the report
                name = None
                results.meta.setdefault("plot_errors", []).append(f"{fn.__name__}: {e}")
            if name:
                out.setdefault(bench, []).append(name)
    return out


# --- the document -------------------------------------------------------------

def render(results: Results, plotDir: str, plotPrefix: str, others=()) -> str:
    meta = results.meta
    mach = meta.get("machine", {})
    plots = renderPlots(results, plotDir)
    L = ["# Benchmarks", "",
         "<!-- Generated by bench/run (bench/report.py); edit the harness, not this file. -->", "",
         "mailplat measured side by side with Postfix, Dovecot, aiosmtpd and smtp-sink, in one run, on one "
         "machine, all on 127.0.0.1. Each figure is the median of the runs with the minimum and maximum in "
         "brackets; each ratio divides mailplat's figure by the peer's, run by run (run *i* of one with run "
         "*i* of the other, which ran back to back), then takes the median. Ratios of throughput are better "
         "above 1, ratios of times and memory below 1. Absolute numbers drift between machines and with the "
         "machine's load: read the ratios, and the machine's limits.", "",
         "## How to run it", "",
         "```",
         "bench/run --quick            # every benchmark, smaller counts, 3 runs: under 10 minutes on 2 cores",
         "bench/run                    # the full run: 5 runs, 100,000-message mailbox, up to 5,000 IDLE sessions",
         "bench/run --only smtp,imap   # some of: " + ", ".join(ORDER),
         "bench/run --report-only --json bench/results/full.json   # rewrite this page from saved results",
         "```", "",
         "It needs root for the peers (a private Postfix instance and Dovecot run as root, drop privileges "
         "as they do in production) and installs what is missing: Debian `postfix` (with `smtp-source` and "
         "`smtp-sink`), `dovecot-imapd`, `dovecot-pop3d`; PyPI `aiosmtpd`, `matplotlib`. Every server gets "
         "free ports and a throw-away directory (configs from `bench/peers/`), and is stopped at the end. "
         "Results go to `bench/results/quick.json` or `full.json`, this page and its plots in "
         "`docs/benchmarks/`. Expect the full run to take 20–40 minutes, most of it seeding 100,000 "
         "messages into mailplat over IMAP APPEND (about 1,000 per second here) and opening 5,000 "
         "sessions on each server. The machine is shared: the load averages below say how busy it was; "
         "re-run on a quiet machine for figures to quote.", "",
         "## This run", "",
         f"- command: `{meta.get('command', '')}`",
         f"- from {meta.get('started', '?')} to {meta.get('finished', '?')} ({meta.get('seconds', 0) / 60:.1f} min)",
         f"- load average (1, 5, 15 min) before: {meta.get('load_before')}, after: {meta.get('load_after')}",
         f"- busiest processes before: {', '.join(meta.get('busy_before', [])) or '–'}",
         f"- busiest processes after: {', '.join(meta.get('busy_after', [])) or '–'}",
         *[f"- {note}" for note in meta.get("notes", [])],
         ""]
    if others:
        L += ["Other pages written by `bench/run --doc`, each from its own run:", ""]
        L += [f"- [{name}]({name})" for name in others]
        L.append("")
    if meta.get("note"):
        L += [meta["note"], ""]
    L += ["| machine | |", "|---|---|"]
    for k in ("cores", "cpu", "memory_gib", "os", "kernel", "filesystem", "python", "twisted", "mailplat",
              "postfix", "dovecot", "aiosmtpd", "matplotlib"):
        L.append(f"| {k.replace('_gib', ' (GiB)')} | {_esc(mach.get(k, ''))} |")
    L.append("")
    if results.failures:
        L += ["## What failed in mailplat (or a peer)", "",
              "Features a benchmark needed that were missing or broken, with the error as it came:", ""]
        for f in results.failures:
            L.append(f"- **{f['server']}**, {f['bench']}, {_esc(f['what'])}: {_esc(f['message'])}")
        L.append("")
    for key in ORDER:
        b = results.benchmarks.get(key)
        if b is None:
            continue
        L += [f"## {b['title']}", ""]
        if b.get("error"):
            L += [f"**The benchmark failed:** `{_esc(b['error'])}`", ""]
        how = b.get("how", "")
        if how:
            L += ["<details><summary>How it is measured</summary>", "", epytext(how), "", "</details>", ""]
        L += table(results, key)
        L.append("")
        for name in plots.get(key, []):
            L += [f"![{b['title']}]({plotPrefix}/{name})", ""]
        if b.get("seconds") is not None:
            L += [f"*({b['seconds']:.0f} s)*", ""]
    extra = results.extra
    if extra.get("imap_seed"):
        L += ["## Notes", ""]
        for n, v in extra["imap_seed"].items():
            L.append(f"- Seeding mailplat over IMAP APPEND (8 connections) ran at "
                     f"{v['mailplat_append_rate']:.0f} messages/s for the {int(n):,}-message mailbox.")
        L.append("")
    if extra.get("idle_env"):
        env = extra["idle_env"]
        if not extra.get("imap_seed"):
            L += ["## Notes", ""]
        L.append(f"- IDLE: open-file limit {env.get('fd_limit')}; fs.inotify.max_user_instances "
                 f"{env.get('inotify_max_user_instances')} (past that many idling Dovecot processes, Dovecot "
                 f"polls, here every second). Dovecot also waits 0.5 s after a mailbox change before it "
                 f"notifies (its notify delay), which sets the floor of its fan-out time.")
        L.append("")
    if meta.get("plot_errors"):
        L += ["Plot errors: " + "; ".join(meta["plot_errors"]), ""]
    return "\n".join(L).rstrip() + "\n"


def writeReport(results: Results, docPath: str) -> str:
    docPath = os.path.abspath(docPath)
    plotDir = os.path.join(os.path.dirname(docPath), os.path.splitext(os.path.basename(docPath))[0])
    here = os.path.dirname(docPath)
    others = sorted(n for n in os.listdir(here)
                    if n.startswith("benchmarks") and n.endswith(".md") and n != os.path.basename(docPath))
    text = render(results, plotDir, os.path.basename(plotDir), others)
    with open(docPath, "w") as f:
        f.write(text)
    return docPath
