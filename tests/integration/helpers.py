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


def configForPorts(ports: dict, data: str, extra: str = "", sections: dict | None = None) -> str:
    """
    A config text with every listener on 127.0.0.1 at the given ports;
    C{sections} adds lines to a section (C{{"imap": "processes = 2"}}),
    C{extra} adds sections at the end.
    """
    more = sections or {}

    def ep(name):
        # The listener line, and what the test adds to its section after it.
        line = f'["tcp:{ports[name]}:interface=127.0.0.1"]'
        section = {"submissions": "smtp", "imaps": "imap", "pop3s": "pop3", "http": "http"}.get(name)
        return line + ("\n" + more[section] if section in more else "")

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


def prepareData(workdir, ports, user, password, data=None, extra="", sections=None):
    """
    C{workdir}/mailplat.toml with every listener on C{ports} (data under
    C{data}, default C{workdir}/data, plus C{extra} and C{sections}: see
    L{configForPorts}), the domain example.org and C{user} with
    C{password}, added with the C{mailplat} command.
    """
    workdir = str(workdir)
    data = str(data) if data is not None else os.path.join(workdir, "data")
    with open(os.path.join(workdir, "mailplat.toml"), "w") as f:
        f.write(configForPorts(ports, data, extra, sections))
    for args, inp in ((["domain", "add", "example.org"], None), (["user", "add", user], password + "\n")):
        r = mailplatCommand(workdir, "--config", "mailplat.toml", *args, input=inp)
        assert r.returncode == 0, r.stderr


def eventually(check, seconds=10.0, what="condition", interval=0.1):
    """C{check()}'s first true value, called every C{interval} s; fails after C{seconds}."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds}s")
        time.sleep(interval)


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


POSTFIX_MASTER = """\
{port}  inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PrivatePostfix:
    """
    A Postfix instance of its own for a test: config, queue and data under a
    temporary directory (outside pytest's tmp_path, which Postfix's
    unprivileged user cannot reach), smtpd on a free port of 127.0.0.1, its log
    in C{self.maillog}.  C{mainCf} is added to the common settings; it may use
    C{{base}} for the instance's directory.  Needs root (skips otherwise).
    """

    def __init__(self, mainCf: str, prefix="mailplat-postfix-"):
        import pathlib
        import tempfile

        import pytest

        self.command = requirePeer("postfix")
        if os.geteuid() != 0:
            pytest.skip("running a private Postfix instance needs root")
        (self.port,) = freePorts(1)
        self.top = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
        self.top.chmod(0o755)
        self.base = self.top / "postfix"
        self.conf = self.base / "etc"
        for d in (self.conf, self.base / "spool", self.base / "data"):
            d.mkdir(parents=True)
        shutil.chown(self.base / "data", "postfix", "postfix")
        self.maillog = self.base / "maillog"
        (self.conf / "main.cf").write_text(f"""
compatibility_level = 3.6
queue_directory = {self.base}/spool
data_directory = {self.base}/data
mail_owner = postfix
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
maillog_file = {self.maillog}
maillog_file_prefixes = {self.base}
biff = no
""" + mainCf.replace("{base}", str(self.base)))
        (self.conf / "master.cf").write_text(POSTFIX_MASTER.format(port=self.port))

    def start(self):
        r = subprocess.run([self.command, "-c", str(self.conf), "start"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        waitForPort(self.port, timeout=20)
        return self

    def stop(self):
        subprocess.run([self.command, "-c", str(self.conf), "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.top, ignore_errors=True)
