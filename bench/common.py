"""
What every benchmark shares: progress output, free ports, process
accounting from /proc (CPU seconds, RSS, PSS of a whole process tree),
statistics (median with min and max, percentiles, pairwise ratios) and the
L{Results} collector that the report is written from.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(REPO, "bench", "peers")

_t0 = time.monotonic()
_quiet = False


def setQuiet(flag: bool) -> None:
    global _quiet
    _quiet = flag


def progress(message: str) -> None:
    """One line of progress on stderr, with the elapsed time of the run."""
    if not _quiet:
        elapsed = time.monotonic() - _t0
        sys.stderr.write(f"[{int(elapsed // 60):2d}:{int(elapsed % 60):02d}] {message}\n")
        sys.stderr.flush()


def freePorts(n: int) -> list[int]:
    """C{n} distinct free TCP ports on 127.0.0.1 (above 10000, as the OS hands them out)."""
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        socks.append(s)
        if port > 10000:
            ports.append(port)
    for s in socks:
        s.close()
    return ports


def waitForPort(port: int, timeout: float = 60.0, proc=None, what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what}: nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def findProgram(name: str) -> Optional[str]:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}", f"/usr/lib/postfix/sbin/{name}")
         if os.access(p, os.X_OK)), None)


def raiseFileLimit(wanted: int) -> int:
    """Raise this process's open-file limit towards C{wanted}; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:  # root may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, wanted))
            hard = wanted
        except (ValueError, OSError):
            pass
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- process accounting ---------------------------------------------------

_CLK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(b")") + 2:].split()
        kids.setdefault(int(rest[1]), []).append(int(name))
    return kids


def processTree(pids) -> list[int]:
    """The given processes and all their descendants that are alive now."""
    kids = _children()
    out, todo = [], [p for p in pids if p]
    while todo:
        p = todo.pop()
        if p in out or not os.path.exists(f"/proc/{p}"):
            continue
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def cpuSeconds(pids) -> float:
    """User+system CPU seconds of the processes, including their reaped children."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(b")") + 2:].split()
        total += sum(int(x) for x in rest[11:15])  # utime stime cutime cstime
    return total / _CLK


def memory(pids) -> dict:
    """RSS, peak RSS (VmHWM) and PSS, in bytes, summed over the processes."""
    rss = hwm = pss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1]) * 1024
        except OSError:
            continue
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return {"rss": rss, "hwm": hwm, "pss": pss, "processes": len(pids)}


class Sampler:
    """Samples the RSS and PSS of a process tree in a thread; keeps the peaks."""

    def __init__(self, rootPids, interval=0.25):
        self.rootPids = rootPids
        self.interval = interval
        self.peakRss = 0
        self.peakPss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        m = memory(processTree(self.rootPids()))
        self.peakRss = max(self.peakRss, m["rss"])
        self.peakPss = max(self.peakPss, m["pss"])

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


# --- statistics -----------------------------------------------------------

def summary(values) -> Optional[dict]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def percentiles(samples, ps=(50, 90, 99)) -> dict:
    """Nearest-rank percentiles of a list of samples ({"p50": ...})."""
    s = sorted(samples)
    out = {}
    for p in ps:
        if not s:
            out[f"p{p}"] = None
            continue
        k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
        out[f"p{p}"] = s[k]
    return out


def ratios(a, b) -> Optional[dict]:
    """Median, min and max of a[i] / b[i], pairing run i with run i."""
    pairs = [x / y for x, y in zip(a, b) if x is not None and y not in (None, 0)]
    return summary(pairs)


# --- results ----------------------------------------------------------------

@dataclass
class Measurement:
    bench: str          # benchmark key, e.g. "smtp"
    case: str           # e.g. "4 KB, -s 10"
    metric: str         # e.g. "accepted msg/s"
    server: str         # e.g. "mailplat"
    values: list = field(default_factory=list)   # one per run, in run order
    unit: str = ""
    better: str = "higher"  # or "lower"
    error: Optional[str] = None
    note: Optional[str] = None


class Results:
    """Everything a run measured, written to JSON as it goes."""

    def __init__(self, path: Optional[str] = None):
        self.path = path
        self.meta: dict = {}
        self.measurements: list[Measurement] = []
        self.extra: dict = {}       # per-benchmark data for the plots
        self.failures: list[dict] = []  # mailplat features found missing or broken
        self.benchmarks: dict = {}  # key -> {"title", "how", "seconds", "error"}

    def add(self, bench, case, metric, server, values, unit="", better="higher", error=None, note=None):
        m = Measurement(bench, case, metric, server, list(values), unit, better, error, note)
        self.measurements.append(m)
        return m

    def fail(self, bench, server, what, message):
        """Record a feature of a server that a benchmark needed and that failed."""
        entry = {"bench": bench, "server": server, "what": what, "message": str(message)[:500]}
        if entry not in self.failures:
            self.failures.append(entry)
            progress(f"  ! {server}: {what}: {entry['message']}")

    def toJSON(self) -> dict:
        return {
            "meta": self.meta,
            "benchmarks": self.benchmarks,
            "measurements": [asdict(m) for m in self.measurements],
            "extra": self.extra,
            "failures": self.failures,
        }

    def save(self) -> None:
        if self.path:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.toJSON(), f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: str) -> "Results":
        with open(path) as f:
            data = json.load(f)
        r = cls(None)
        r.meta = data.get("meta", {})
        r.benchmarks = data.get("benchmarks", {})
        r.measurements = [Measurement(**m) for m in data.get("measurements", [])]
        r.extra = data.get("extra", {})
        r.failures = data.get("failures", [])
        return r


# --- machine facts ----------------------------------------------------------

def _cmdOutput(args) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def debVersion(package: str) -> str:
    return _cmdOutput(["dpkg-query", "-W", "-f=${Version}", package]) or "not installed"


def pyVersion(module: str) -> str:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        return "not installed"


def machineFacts() -> dict:
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    osName = ""
    try:
        with open("/etc/os-release") as f:
            m = re.search(r'^PRETTY_NAME="?([^"\n]*)', f.read(), re.M)
            osName = m.group(1) if m else ""
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem / 2**30, 1),
        "os": osName,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": pyVersion("twisted"),
        "mailplat": pyVersion("mailplat"),
        "postfix": debVersion("postfix"),
        "dovecot": debVersion("dovecot-core"),
        "aiosmtpd": pyVersion("aiosmtpd"),
        "matplotlib": pyVersion("matplotlib"),
        "filesystem": _cmdOutput(["stat", "-f", "-c", "%T", os.environ.get("TMPDIR", "/tmp")]),
    }


def loadAverage() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def busyProcesses(limit=5) -> list[str]:
    """The busiest other processes right now (what shares the machine)."""
    out = _cmdOutput(["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"])
    return [" ".join(line.split()) for line in out.splitlines()[:limit]]
