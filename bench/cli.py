"""
The benchmark harness's entry point: C{bench/run} or C{python -m bench}.

    bench/run [--quick] [--only NAME,...] [--runs N] [--json PATH] [--doc PATH]
    bench/run --report-only [--json PATH] [--doc PATH]

It installs the peers (Debian: postfix, dovecot-imapd, dovecot-pop3d;
PyPI: aiosmtpd, matplotlib) unless C{--no-install}, runs the benchmarks in
order, saves the results JSON after each one, and writes
C{docs/benchmarks.md} with the plots beside it in C{docs/benchmarks/}.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from bench import common
from bench.common import REPO, Results, progress

#: Benchmark keys in running order, with their modules.
BENCHMARKS = {
    "limits": "bench.b_limits",
    "smtp": "bench.b_smtp",
    "outbound": "bench.b_outbound",
    "imap": "bench.b_imap",
    "imapmix": "bench.b_imapmix",
    "idle": "bench.b_idle",
    "pop3": "bench.b_pop3",
}

DEBIAN = ("postfix", "dovecot-imapd", "dovecot-pop3d")
PYPI = ("aiosmtpd", "matplotlib")


@dataclass
class Context:
    results: Results
    quick: bool
    runs: int
    base: str
    args: argparse.Namespace


def parseArgs(argv=None):
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smaller counts and sizes, 3 runs: finishes in under 10 minutes on 2 cores")
    p.add_argument("--only", default="",
                   help=f"comma-separated benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    p.add_argument("--runs", type=int, default=None, help="runs per figure (default 3 with --quick, 5 without)")
    p.add_argument("--json", default=None, help="results file (default bench/results/latest.json)")
    p.add_argument("--doc", default=os.path.join(REPO, "docs", "benchmarks.md"),
                   help="the report to write (plots go to a benchmarks/ directory beside it)")
    p.add_argument("--no-doc", action="store_true", help="do not write the report")
    p.add_argument("--report-only", action="store_true", help="write the report from an existing results file")
    p.add_argument("--no-install", action="store_true", help="do not install missing peers")
    p.add_argument("--idle-sessions", default=None,
                   help="comma-separated IDLE fan-out session counts (default 100,500 quick; 500,1000,2000,5000 full)")
    p.add_argument("--keep", action="store_true", help="keep the servers' temporary directories")
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 3 if args.quick else 5
    if args.runs < 1:
        p.error("--runs must be at least 1")
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in only if x not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    args.selected = only or list(BENCHMARKS)
    if args.json is None:
        args.json = os.path.join(REPO, "bench", "results", "quick.json" if args.quick else "full.json")
    return args


def installPeers():
    """Install the Debian and PyPI peers that are missing (as root, with apt-get; pip)."""
    missing = []
    for pkg in DEBIAN:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if "install ok installed" not in r.stdout:
            missing.append(pkg)
    if missing:
        if os.getuid() != 0 or not shutil.which("apt-get"):
            progress(f"missing Debian packages {' '.join(missing)} (install them as root); going on without")
        else:
            progress(f"installing {' '.join(missing)} from Debian")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            lock = ["-o", "DPkg::Lock::Timeout=600"]
            subprocess.run(["apt-get", *lock, "update", "-qq"], env=env, check=False)
            subprocess.run(["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *missing],
                           env=env, check=False, stdout=subprocess.DEVNULL)
    mods = {"aiosmtpd": "aiosmtpd", "matplotlib": "matplotlib"}
    wanted = [pkg for pkg in PYPI if importlib.util.find_spec(mods[pkg]) is None]
    if wanted:
        progress(f"installing {' '.join(wanted)} from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *wanted],
                       check=False)
        importlib.invalidate_caches()


def main(argv=None):
    args = parseArgs(argv)
    if args.report_only:
        results = Results.load(args.json)
        from bench.report import writeReport
        writeReport(results, args.doc)
        progress(f"wrote {args.doc}")
        return 0
    if not args.no_install:
        installPeers()

    def terminated(signum, frame):
        raise SystemExit(128 + signum)  # run every finally: stop the servers, save the results

    signal.signal(signal.SIGTERM, terminated)
    common.raiseFileLimit(65536)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    results = Results(args.json)
    results.meta = {
        "command": "bench/run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "quick": args.quick,
        "runs": args.runs,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_before": common.loadAverage(),
        "busy_before": common.busyProcesses(),
        "machine": common.machineFacts(),
    }
    base = tempfile.mkdtemp(prefix="mailplat-bench-")
    os.chmod(base, 0o755)
    ctx = Context(results, args.quick, args.runs, base, args)
    started = time.monotonic()
    try:
        for key in args.selected:
            mod = importlib.import_module(BENCHMARKS[key])
            progress(f"== {key}: {mod.TITLE}")
            t0 = time.monotonic()
            entry = {"title": mod.TITLE, "how": (mod.__doc__ or "").strip(), "error": None}
            try:
                mod.run(ctx)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # a broken benchmark must not lose the others
                import traceback
                entry["error"] = f"{type(e).__name__}: {e}"
                progress(f"  benchmark {key} failed: {entry['error']}")
                traceback.print_exc()
            entry["seconds"] = round(time.monotonic() - t0, 1)
            results.benchmarks[key] = entry
            results.save()
            progress(f"   {key} took {entry['seconds']:.0f}s")
    finally:
        results.meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        results.meta["seconds"] = round(time.monotonic() - started, 1)
        results.meta["load_after"] = common.loadAverage()
        results.meta["busy_after"] = common.busyProcesses()
        results.save()
        if not args.keep:
            progress(f"removing {base}")
            shutil.rmtree(base, ignore_errors=True)
        else:
            progress(f"kept {base}")
    progress(f"results in {args.json}")
    if not args.no_doc:
        from bench.report import writeReport
        writeReport(results, args.doc)
        progress(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
