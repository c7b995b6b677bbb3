"""
The servers under test, each started as a real process on free loopback
ports in a throw-away directory, and stopped (with everything it started)
at the end: mailplat (twistd), a private Postfix instance, a private
Dovecot, aiosmtpd writing to a Maildir, and Postfix's smtp-sink.

Each class has C{start()}, C{stop()}, C{pids()} (the roots of its process
tree, for CPU and memory accounting) and, where it delivers locally,
C{delivered(user)}: how many messages that user's mailbox holds now.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from bench.common import PEERS, REPO, findProgram, freePorts, progress, waitForPort

DOMAIN = "bench.test"
PASSWORD = "bench-secret"
#: The user whose password has each server's default (costly) hash; the login
#: benchmark uses it.  Every other benchmark user has a cheap argon2id hash
#: (CHEAP_ARGON2), the same on both servers, so that opening thousands of
#: sessions measures the servers and not the password hash.
LOGIN_USER = "login"
CHEAP_ARGON2 = dict(time_cost=1, memory_cost=1024, parallelism=1)


def cheapHash(password=PASSWORD):
    from argon2 import PasswordHasher
    return PasswordHasher(**CHEAP_ARGON2).hash(password)
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def _nobody():
    try:
        p = pwd.getpwnam("nobody")
        return p.pw_uid, p.pw_gid
    except KeyError:
        return 65534, 65534


def _template(path, **values):
    with open(path) as f:
        text = f.read()
    for k, v in values.items():
        text = text.replace(f"@{k}@", str(v))
    return text


def _killTree(proc, timeout=30):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Server:
    name = "server"
    workdir = None

    def __init__(self, base):
        self.workdir = tempfile.mkdtemp(prefix=f"{self.name}-", dir=base)
        os.chmod(self.workdir, 0o755)

    proc = None
    log = None

    def pids(self):
        """The server's process, while it runs."""
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def stop(self):
        """Kill the process tree and close its log."""
        _killTree(self.proc)
        if self.log is not None:
            self.log.close()
            self.log = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class Mailplat(Server):
    """mailplat under twistd, SMTP/IMAP/POP3 on free ports, SQLite store in the work directory."""

    name = "mailplat"

    def __init__(self, base, python=sys.executable, extraConfig="", processes=1, smtpProcesses=1):
        super().__init__(base)
        self.python = python
        self.extraConfig = extraConfig
        self.processes = processes
        self.smtpProcesses = smtpProcesses
        self.proc = None
        names = ("smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s", "http")
        self.ports = dict(zip(names, freePorts(len(names))))
        self.smtpPort, self.imapPort, self.pop3Port = self.ports["smtp"], self.ports["imap"], self.ports["pop3"]
        self.config = os.path.join(self.workdir, "mailplat.toml")
        self.writeConfig(extraConfig)

    def writeConfig(self, extraConfig=""):
        """(Re)write the config: listeners on this server's ports, plus C{extraConfig}."""
        ep = lambda n: f'["tcp:{self.ports[n]}:interface=127.0.0.1"]'  # noqa: E731
        with open(self.config, "w") as f:
            f.write(f"""[server]
hostname = "mailplat.{DOMAIN}"
data = "{self.workdir}/data"

[smtp]
listen = {ep("smtp")}
submission = {ep("submission")}
submissions = {ep("submissions")}
processes = {self.smtpProcesses}

[imap]
listen = {ep("imap")}
listen_tls = {ep("imaps")}
processes = {self.processes}

[pop3]
listen = {ep("pop3")}
listen_tls = {ep("pop3s")}
processes = {self.processes}

[http]
listen = {ep("http")}

# The load comes from one address (127.0.0.1): up to 5,000 IDLE sessions.
[limits]
connections_per_ip = 100000
connections = 100000
{extraConfig}
""")

    def cli(self, *args, input=None):
        r = subprocess.run([self.python, "-m", "mailplat.cli", "--config", self.config, *args],
                           cwd=self.workdir, input=input, capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"mailplat {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def addUsers(self, users):
        """
        Create the domain, L{LOGIN_USER} with the CLI (the default password
        hash) and the users (all with L{PASSWORD}, cheaply hashed).
        """
        self.cli("domain", "add", DOMAIN)
        self.cli("user", "add", f"{LOGIN_USER}@{DOMAIN}", input=PASSWORD + "\n")
        rest = [u for u in users if u != LOGIN_USER]
        if not rest:
            return
        # Many users: one process creating them all through the same calls the
        # CLI makes (one interpreter start instead of one per user); the CLI
        # itself is the fallback should those internals change.
        try:
            r = subprocess.run([self.python, os.path.join(REPO, "bench", "_mailplat_users.py"), self.config,
                                PASSWORD, cheapHash(), *[f"{u}@{DOMAIN}" for u in rest]],
                               cwd=self.workdir, capture_output=True, text=True, timeout=180)
            failure = r.stderr.strip()[-300:] if r.returncode != 0 else None
        except subprocess.TimeoutExpired:
            failure = "timed out after 180s"
        if failure:
            progress(f"  (bulk user creation failed, using the CLI per user: {failure})")
            for u in rest:
                try:
                    self.cli("user", "add", f"{u}@{DOMAIN}", input=PASSWORD + "\n")
                except RuntimeError as e:
                    if "already exists" not in str(e):
                        raise

    def start(self, users=("bench",)):
        self.addUsers(list(users))
        return self.launch()

    def launch(self):
        """Start the process (users already exist) and wait for its listeners."""
        self.log = open(os.path.join(self.workdir, "twistd.log"), "ab")
        self.proc = subprocess.Popen(
            [self.python, "-c", TWISTD, "--pidfile=", "-n", "--logfile=-", "mailplat", "--config", self.config],
            cwd=self.workdir, stdout=self.log, stderr=subprocess.STDOUT)
        for name in ("smtp", "imap", "pop3"):
            waitForPort(self.ports[name], proc=self.proc, what="mailplat")
        return self

    def queued(self):
        """How many messages are in the queue (read from its database, read-only)."""
        import sqlite3

        path = os.path.join(self.workdir, "data", "queue", "queue.sqlite")
        if not os.path.exists(path):
            return 0
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            return db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        finally:
            db.close()

    def logTail(self, n=2000):
        try:
            with open(os.path.join(self.workdir, "twistd.log"), "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""


class Postfix(Server):
    """
    A private Postfix instance (own config, queue and data directories) with
    smtpd on a free port, delivering C{*@bench.test} to Maildirs through
    virtual(8), and relaying anything else to C{relayhost}.
    """

    name = "postfix"

    def __init__(self, base, users=("bench",), relayPort=None, hold=False):
        super().__init__(base)
        self.port = self.smtpPort = freePorts(1)[0]
        self.uid, self.gid = _nobody()
        d = self.workdir
        for sub in ("etc", "spool", "data", "log", "mail"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
            os.chmod(os.path.join(d, sub), 0o755)
        shutil.chown(os.path.join(d, "data"), "postfix")
        shutil.chown(os.path.join(d, "mail"), self.uid, self.gid)
        values = dict(DIR=d, UID=self.uid, GID=self.gid, PORT=self.port,
                      RELAYHOST=f"[127.0.0.1]:{relayPort}" if relayPort else "",
                      RESTRICTIONS="check_client_access static:HOLD," if hold else "")
        with open(os.path.join(d, "etc", "main.cf"), "w") as f:
            f.write(_template(os.path.join(PEERS, "postfix", "main.cf"), **values))
        with open(os.path.join(d, "etc", "master.cf"), "w") as f:
            f.write(_template(os.path.join(PEERS, "postfix", "master.cf"), **values))
        with open(os.path.join(d, "etc", "vmailbox"), "w") as f:
            for u in users:
                f.write(f"{u}@{DOMAIN} {DOMAIN}/{u}/\n")
        self.conf = os.path.join(d, "etc")

    def _postfix(self, *args, check=True):
        r = subprocess.run([findProgram("postfix"), "-c", self.conf, *args], capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)}: {(r.stderr or r.stdout).strip()[-500:]}")
        return r

    def start(self):
        self._postfix("start")
        waitForPort(self.port, what="postfix")
        return self

    def masterPid(self):
        try:
            with open(os.path.join(self.workdir, "spool", "pid", "master.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def pids(self):
        p = self.masterPid()
        return [p] if p else []

    def stop(self):
        if self.masterPid():
            self._postfix("stop", check=False)
            deadline = time.monotonic() + 30
            while self.masterPid() and os.path.exists(f"/proc/{self.masterPid()}") and time.monotonic() < deadline:
                time.sleep(0.1)

    def delivered(self, user="bench"):
        new = os.path.join(self.workdir, "mail", DOMAIN, user, "new")
        try:
            return len(os.listdir(new))
        except OSError:
            return 0

    def queued(self):
        """Messages in Postfix's queues (incoming, active, deferred, hold, maildrop)."""
        n = 0
        for q in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _root, _dirs, files in os.walk(os.path.join(self.workdir, "spool", q)):
                n += len(files)
        return n

    def held(self):
        n = 0
        for _root, _dirs, files in os.walk(os.path.join(self.workdir, "spool", "hold")):
            n += len(files)
        return n

    def releaseHeld(self):
        r = subprocess.run([findProgram("postsuper"), "-c", self.conf, "-H", "ALL"],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"postsuper -H ALL: {r.stderr.strip()}")

    def flush(self):
        subprocess.run([findProgram("postqueue"), "-c", self.conf, "-f"], capture_output=True, timeout=120)


class Dovecot(Server):
    """A private Dovecot (imapd and pop3d) in the foreground, passwd-file users, Maildir homes."""

    name = "dovecot"

    def __init__(self, base):
        super().__init__(base)
        self.imapPort, self.pop3Port = freePorts(2)
        self.uid, self.gid = _nobody()
        d = self.workdir
        for sub in ("run", "state", "home"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
            os.chmod(os.path.join(d, sub), 0o755)
        self.conf = os.path.join(d, "dovecot.conf")
        with open(self.conf, "w") as f:
            f.write(_template(os.path.join(PEERS, "dovecot", "dovecot.conf"), DIR=d, UID=self.uid, GID=self.gid,
                              PORT_IMAP=self.imapPort, PORT_POP3=self.pop3Port))
        self.users = []
        self.proc = None

    def home(self, user):
        return os.path.join(self.workdir, "home", user)

    def maildir(self, user, folder=None):
        base = os.path.join(self.home(user), "Maildir")
        return base if not folder or folder.upper() == "INBOX" else os.path.join(base, "." + folder)

    def addUsers(self, users):
        """Users with the same cheap argon2id hash as mailplat's; L{LOGIN_USER} with Dovecot's default ARGON2ID."""
        path = os.path.join(self.workdir, "users")
        new = not os.path.exists(path)
        cheap = cheapHash()
        with open(path, "a") as f:
            if new:
                r = subprocess.run([findProgram("doveadm"), "-c", self.conf, "pw", "-s", "ARGON2ID", "-p", PASSWORD],
                                   capture_output=True, text=True, timeout=60)
                if r.returncode != 0:
                    raise RuntimeError(f"doveadm pw: {r.stderr.strip()}")
                f.write(f"{LOGIN_USER}@{DOMAIN}:{r.stdout.strip()}::::::\n")
            for u in users:
                f.write(f"{u}@{DOMAIN}:{{ARGON2ID}}{cheap}::::::\n")
                os.makedirs(self.maildir(u), exist_ok=True)
                for sub in ("cur", "new", "tmp"):
                    os.makedirs(os.path.join(self.maildir(u), sub), exist_ok=True)
        self.users.extend(users)

    def fixOwnership(self):
        from bench.corpus import chownTree
        chownTree(os.path.join(self.workdir, "home"), self.uid, self.gid)

    def start(self, users=("bench",)):
        self.addUsers([u for u in users if u not in self.users])
        self.fixOwnership()
        self.log = open(os.path.join(self.workdir, "stdout.log"), "ab")
        self.proc = subprocess.Popen([findProgram("dovecot"), "-F", "-c", self.conf],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=self.workdir)
        waitForPort(self.imapPort, proc=self.proc, what="dovecot")
        waitForPort(self.pop3Port, proc=self.proc, what="dovecot")
        return self

    def deliver(self, user, data: bytes):
        """Deliver like an LDA: write to tmp/, fsync, rename into new/."""
        md = self.maildir(user)
        name = f"{time.time():.6f}.P{os.getpid()}.bench"
        tmp = os.path.join(md, "tmp", name)
        with open(tmp, "wb") as f:
            f.write(data.replace(b"\r\n", b"\n"))
            f.flush()
            os.fsync(f.fileno())
        os.chown(tmp, self.uid, self.gid)
        os.rename(tmp, os.path.join(md, "new", name))


class Aiosmtpd(Server):
    """aiosmtpd writing every message to one Maildir with fsync (bench/peers/aiosmtpd_maildir.py)."""

    name = "aiosmtpd"

    def __init__(self, base, python=sys.executable, extraConfig=""):
        super().__init__(base)
        self.python = python
        self.extraConfig = extraConfig
        self.port = self.smtpPort = freePorts(1)[0]
        self.maildirPath = os.path.join(self.workdir, "Maildir")
        self.proc = None

    def start(self):
        self.log = open(os.path.join(self.workdir, "aiosmtpd.log"), "ab")
        self.proc = subprocess.Popen([self.python, os.path.join(PEERS, "aiosmtpd_maildir.py"), str(self.port),
                                      self.maildirPath], stdout=self.log, stderr=subprocess.STDOUT)
        waitForPort(self.port, proc=self.proc, what="aiosmtpd")
        return self

    def delivered(self, user="bench"):
        try:
            return len(os.listdir(os.path.join(self.maildirPath, "new")))
        except OSError:
            return 0


class SmtpSink(Server):
    """Postfix's smtp-sink: accepts and discards; the ceiling of the load generator."""

    name = "smtp-sink"

    def __init__(self, base):
        super().__init__(base)
        self.port = self.smtpPort = freePorts(1)[0]
        self.proc = None

    def start(self):
        self.log = open(os.path.join(self.workdir, "smtp-sink.log"), "ab")
        args = [findProgram("smtp-sink")]
        if os.getuid() == 0:
            args += ["-u", "nobody"]
        self.proc = subprocess.Popen(args + ["-m", "1000", f"127.0.0.1:{self.port}", "1024"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        waitForPort(self.port, proc=self.proc, what="smtp-sink")
        return self

    def stop(self):
        _killTree(self.proc, timeout=10)
        if getattr(self, "log", None):
            self.log.close()
            self.log = None
