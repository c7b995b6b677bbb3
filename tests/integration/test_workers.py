"""
IMAP and POP3 served by worker processes (C{processes = 2}): the main
process accepts, counts the connection limits for all of them, and hands
each connection to the worker with the fewest; changes made in one worker
reach sessions in the other; a worker that dies is replaced; SIGHUP and
SIGTERM reach every worker; /metrics adds up the workers' counters.
"""

import imaplib
import os
import poplib
import re
import signal
import smtplib
import socket
import urllib.request

import pytest

from helpers import DEFAULT_PORTS, MailplatProcess, eventually, freePorts, mailplatCommand, prepareData

pytestmark = pytest.mark.integration

USER = "alice@example.org"
PASSWORD = "correct horse battery staple"
PER_IP = 6


def children(pid):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def workers(pid, role):
    """The pids of C{pid}'s worker processes of C{role} (told apart by the listeners they were given)."""
    found = []
    for child in children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"mailplat.workers" not in f.read():
                    continue
        except OSError:
            continue
        found.append(child)
    # Which role a worker serves is in its log lines: "<role>-worker-<pid>"
    # and "<role> worker started: pid <pid>".
    return [p for p in found if p in _started(role)]


_LOGS = {}


def _started(role):
    text = _LOGS["server"].output()
    return {int(m) for m in re.findall(rf"{role} worker started: pid (\d+)", text)}


def established(pid, port):
    """How many established TCP connections to local C{port} process C{pid} holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.match(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(m.group(1))
    n = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "01" and int(local.split(":")[1], 16) == port and inode in inodes:
                n += 1
    return n


def login():
    c = imaplib.IMAP4("127.0.0.1", _LOGS["ports"]["imap"], timeout=30)
    c.login(USER, PASSWORD)
    return c


def startWithWorkers(tmp_path, sections, extra=""):
    """A mailplat process with C{sections} (worker counts), once every worker pool is ready."""
    ports = dict(zip(DEFAULT_PORTS, freePorts(len(DEFAULT_PORTS))))
    prepareData(tmp_path, ports, USER, PASSWORD, sections=sections, extra=extra)
    proc = MailplatProcess(str(tmp_path), ["--config", "mailplat.toml"], ports=ports)
    proc.start(waitFor=["smtp", "imap", "pop3", "http"])
    _LOGS["server"], _LOGS["ports"] = proc, ports
    try:
        # The listeners accept once a worker is ready; wait for all of them.
        for role in sections:
            n = int(re.search(r"processes = (\d+)", sections[role]).group(1))
            eventually(lambda: len(re.findall(rf"{role} worker \d+ ready", proc.output())) == n, 30,
                       f"{n} {role} workers")
    except BaseException:
        proc.stop()
        raise
    return proc


@pytest.fixture
def server(tmp_path):
    proc = startWithWorkers(tmp_path, {"imap": "processes = 2", "pop3": "processes = 2"},
                            f"[limits]\nconnections_per_ip = {PER_IP}\n")
    yield proc
    proc.stop()


def test_sessionsAreSpreadOverTheWorkers(server):
    pids = workers(server.proc.pid, "imap")
    assert len(pids) == 2
    sessions = [login() for _ in range(4)]
    try:
        for s in sessions:
            assert s.select("INBOX")[0] == "OK"
        port = _LOGS["ports"]["imap"]
        assert sorted(established(p, port) for p in pids) == [2, 2]
        # The main process holds none of them.
        assert established(server.proc.pid, port) == 0
    finally:
        for s in sessions:
            s.logout()


def test_aChangeInOneWorkerReachesASessionInTheOther(server):
    a, b = login(), login()
    try:
        pids = workers(server.proc.pid, "imap")
        port = _LOGS["ports"]["imap"]
        assert sorted(established(p, port) for p in pids) == [1, 1]
        assert a.select("INBOX")[1] == [b"0"]
        msg = b"From: b@example.net\r\nSubject: across\r\n\r\nhello\r\n"
        assert b.append("INBOX", None, None, msg)[0] == "OK"

        def saw(pattern):
            a.noop()
            text = repr(a.untagged_responses)
            a.untagged_responses.clear()
            return re.search(pattern, text)

        # imaplib keeps EXISTS as [b'1'].
        eventually(lambda: saw(r"'EXISTS': \[b'1'\]"), 10, "EXISTS in the other worker")
        b.select("INBOX")
        b.store("1", "+FLAGS", r"(\Flagged)")
        eventually(lambda: saw(r"Flagged"), 10, "the flag in the other worker")
        b.store("1", "+FLAGS", r"(\Deleted)")
        b.expunge()
        eventually(lambda: saw(r"'EXPUNGE': \[b'1'\]"), 10, "EXPUNGE in the other worker")
    finally:
        a.logout()
        b.logout()


def test_theConnectionLimitCountsEveryWorker(server):
    sessions = [login() for _ in range(PER_IP)]
    try:
        port = _LOGS["ports"]["imap"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert s.recv(200).startswith(b"* BYE [UNAVAILABLE] Too many connections")
        sessions.pop().logout()
        # The worker tells the main process the connection has closed.
        eventually(lambda: _greeted(port), 10, "a connection after one closed")
    finally:
        for s in sessions:
            s.logout()


def _greeted(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        ok = s.recv(200).startswith(b"* OK")
        s.sendall(b"a LOGOUT\r\n")
        return ok


def test_aWorkerThatDiesIsReplaced(server):
    pids = workers(server.proc.pid, "imap")
    held = [login() for _ in range(4)]
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    eventually(lambda: len(workers(server.proc.pid, "imap")) == 2 and victim not in workers(server.proc.pid, "imap"),
               15, "a new IMAP worker")
    assert re.search(rf"imap worker {victim} exited \(code None, signal 9\)", server.output())
    # The sessions it served are gone; the others still work.
    alive = 0
    for s in held:
        try:
            s.noop()
            alive += 1
            s.logout()
        except (imaplib.IMAP4.abort, OSError):
            pass
    assert alive == 2
    # The dead worker's connections were released: the full limit again.
    eventually(lambda: len(re.findall(r"imap worker \d+ ready", server.output())) == 3, 30, "the new worker ready")
    sessions = [login() for _ in range(PER_IP)]
    try:
        assert all(s.select("INBOX")[0] == "OK" for s in sessions)
    finally:
        for s in sessions:
            s.logout()


def test_pop3WorkersShareTheMaildropLock(server):
    ports = _LOGS["ports"]
    with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as s:
        s.sendmail("b@example.net", [USER], b"From: b@example.net\r\nSubject: pop\r\n\r\nbody\r\n")

    def delivered():
        p = poplib.POP3("127.0.0.1", ports["pop3"], timeout=30)
        p.user(USER)
        p.pass_(PASSWORD)
        n = p.stat()[0]
        p.quit()
        return n == 1

    eventually(delivered, 15, "the message in the maildrop")
    first = poplib.POP3("127.0.0.1", ports["pop3"], timeout=30)
    first.user(USER)
    first.pass_(PASSWORD)
    try:
        # The next connection goes to the other worker (fewest connections).
        second = poplib.POP3("127.0.0.1", ports["pop3"], timeout=30)
        second.user(USER)
        with pytest.raises(poplib.error_proto, match=r"IN-USE"):
            second.pass_(PASSWORD)
        second.close()
        assert b"Subject: pop" in b"\r\n".join(first.retr(1)[1])
    finally:
        first.quit()


def test_metricsAddUpTheWorkers(server):
    for _ in range(3):
        login().logout()
    url = f"http://127.0.0.1:{_LOGS['ports']['http']}/metrics"

    def total():
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        m = re.search(r'^mailplat_sessions_total\{protocol="imap"\} (\d+)', text, re.M)
        return m and int(m.group(1)) >= 3

    eventually(total, 10, "three IMAP sessions in /metrics")


def test_hangupAndStopReachEveryWorker(server):
    pids = workers(server.proc.pid, "imap") + workers(server.proc.pid, "pop3")
    assert len(pids) == 4
    server.proc.send_signal(signal.SIGHUP)
    for pid in pids:
        eventually(lambda pid=pid: re.search(rf"-worker-{pid} [^\]]*\] TLS certificate reloaded", server.output()), 10,
                   f"worker {pid} reloading its certificate")
    server.proc.send_signal(signal.SIGTERM)
    # twistd ends by re-raising the signal that stopped it, after a clean shutdown.
    assert server.proc.wait(30) in (0, -signal.SIGTERM)
    assert "Server Shut Down." in server.output()
    for pid in pids:
        assert re.search(rf"-worker-{pid} [^\]]*\] Main loop terminated", server.output())
    for pid in pids:
        eventually(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or _zombie(pid), 15, f"worker {pid} gone")


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def smtpServer(tmp_path):
    # Outbound mail goes to a port where nothing listens: it stays queued, tried.
    proc = startWithWorkers(tmp_path, {"smtp": "processes = 2"},
                            f'[outbound]\nsmarthost = "127.0.0.1:{freePorts(1)[0]}"\n')
    yield proc
    proc.stop()


def test_smtpWorkersReceiveAndDeliverLocalMail(smtpServer):
    ports = _LOGS["ports"]
    pids = workers(smtpServer.proc.pid, "smtp")
    assert len(pids) == 2
    a = smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30)
    b = smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30)
    try:
        a.ehlo("a.example.net")
        b.ehlo("b.example.net")
        assert sorted(established(p, ports["smtp"]) for p in pids) == [1, 1]
        big = b"".join(b"line %07d of a message bigger than the queue's spill size\r\n" % i for i in range(80000))
        for i in range(5):
            a.sendmail("a@example.net", [USER], b"From: a@example.net\r\nSubject: from a %d\r\n\r\nbody\r\n" % i)
            b.sendmail("b@example.net", [USER], b"From: b@example.net\r\nSubject: from b %d\r\n\r\nbody\r\n" % i)
        # Over 4 MB: spilled to a file in queue/tmp by the worker while received.
        a.sendmail("a@example.net", [USER], b"From: a@example.net\r\nSubject: big\r\n\r\n" + big)
    finally:
        a.quit()
        b.quit()
    imap = login()
    try:
        # The queue runner runs in the main process and hears of each message.
        eventually(lambda: imap.select("INBOX")[1] == [b"11"], 15, "11 messages delivered")
        typ, data = imap.search(None, "SUBJECT", "big")
        [num] = data[0].split()
        typ, data = imap.fetch(num, "(BODY.PEEK[TEXT])")
        assert data[0][1] == big
    finally:
        imap.logout()
    assert not os.listdir(os.path.join(smtpServer.workdir, "data", "queue", "tmp"))
    # Each worker received mail (its log lines, relayed by the main process).
    for pid in pids:
        assert re.search(rf"\[smtp-worker-{pid} mailplat\.smtp\.server#info\] SMTP \S+: queued ", smtpServer.output())


def test_smtpWorkersLeaveOutgoingMailToTheMainProcess(smtpServer):
    ports = _LOGS["ports"]
    with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=30) as s:
        s.login(USER, PASSWORD)
        s.sendmail(USER, ["someone@example.net"], b"From: alice@example.org\r\nSubject: out\r\n\r\nbody\r\n")
    cwd = smtpServer.workdir

    def tried():
        listing = mailplatCommand(cwd, "--config", "mailplat.toml", "queue", "list").stdout
        m = re.match(r"(\S+) ", listing)
        if not m:
            return None
        shown = mailplatCommand(cwd, "--config", "mailplat.toml", "queue", "show", m.group(1)).stdout
        return "attempts:  1" in shown and shown

    # The worker tells the main process, whose runner (the only one that
    # sends mail out) tries at once, not at its next 30 s scan.
    shown = eventually(tried, 15, "a delivery attempt by the main process")
    assert "someone@example.net: deferred" in shown
