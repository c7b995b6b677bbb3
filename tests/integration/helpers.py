"""
Starting a real mailplat process for integration tests.

L{MailplatProcess} runs C{twistd -n mailplat} (through C{python -m twisted},
so it is the installed package that runs) in a temporary directory, waits
until every listener accepts connections, and kills it at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

#: Runs twistd with whichever interpreter is given it (python -c TWISTD ...).
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"

DEFAULT_PORTS = {
    "smtp": 2525,
    "submission": 2587,
    "submissions": 2465,
    "imap": 2143,
    "imaps": 2993,
    "pop3": 2110,
    "pop3s": 2995,
    "http": 8080,
}


def freePorts(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def configForPorts(ports: dict, data: str, extra: str = "") -> str:
    """A config text with every listener on 127.0.0.1 at the given ports."""

    def ep(name):
        return f'["tcp:{ports[name]}:interface=127.0.0.1"]'

    return f"""
[server]
hostname = "mail.example.org"
data = "{data}"

[smtp]
listen = {ep("smtp")}
submission = {ep("submission")}
submissions = {ep("submissions")}

[imap]
listen = {ep("imap")}
listen_tls = {ep("imaps")}

[pop3]
listen = {ep("pop3")}
listen_tls = {ep("pop3s")}

[http]
listen = {ep("http")}
{extra}
"""


def waitForPort(port, timeout=30.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mailplat exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class MailplatProcess:
    def __init__(self, workdir, args=(), ports=None, env=None, plugin="mailplat", python=sys.executable):
        self.python = python
        self.workdir = workdir
        self.args = list(args)
        self.ports = ports or DEFAULT_PORTS
        self.env = env
        self.plugin = plugin
        self.proc = None
        self.logPath = os.path.join(workdir, "twistd.log")

    def start(self, waitFor=None):
        env = dict(os.environ, **(self.env or {}))
        self.log = open(self.logPath, "ab")
        self.proc = subprocess.Popen(
            [self.python, "-c", TWISTD, "--pidfile=", "-n", "--logfile=-", self.plugin, *self.args],
            cwd=self.workdir, stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        for name in waitFor or self.ports:
            waitForPort(self.ports[name], proc=self.proc)
        return self

    def kill(self, sig=signal.SIGKILL):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        if getattr(self, "log", None):
            self.log.close()

    def stop(self):
        self.kill(signal.SIGTERM)

    def output(self):
        with open(self.logPath, "rb") as f:
            return f.read().decode("utf-8", "replace")


def mailplatCommand(workdir, *args, input=None, env=None):
    """Run the C{mailplat} admin command; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "mailplat.cli", *args],
        cwd=workdir, input=input, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, **(env or {})),
    )


def requirePeer(*programs):
    """
    The paths of external programs a test needs.  A missing one fails the
    test in CI (C{CI=true}: C{.ci/run} installs every peer) and skips it on a
    developer machine, with the reason.
    """
    import pytest

    paths = []
    for program in programs:
        path = shutil.which(program) or next(
            (p for p in (f"/usr/sbin/{program}", f"/usr/bin/{program}") if os.access(p, os.X_OK)), None
        )
        if path is None:
            reason = f"the peer {program!r} is not installed (scripts/test installs tests/peers/*.txt)"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)
        paths.append(path)
    return paths[0] if len(paths) == 1 else paths
