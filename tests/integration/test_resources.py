"""
Resource exhaustion against a real mailplat process: slow clients, many idle
connections, a connection flood from one address, huge command lines and
literals, many parallel AUTH failures.

In every case each listener (SMTP, IMAP, POP3) must keep serving another
client promptly (a greeting and one command answered within
C{PROMPT} seconds, a generous bound for a loaded 2-core CI machine: the
point is "not starved", not a speed target) and the server's resident
memory (VmRSS from /proc) must stay within C{RSS_GROWTH} of what it was
before.  Everything is bounded in count and time (the whole module takes
well under a minute).
"""

import resource
import socket
import threading
import time

import pytest

from helpers import DEFAULT_PORTS, MailplatProcess, freePorts, prepareData

pytestmark = pytest.mark.integration

USER = "res@example.org"
PASSWORD = "res-password"
PROMPT = 5.0
RSS_GROWTH = 150 * 1024 * 1024
IDLE_CONNECTIONS = 1000

PROBES = {
    # listener: (command, what a good answer starts with)
    "smtp": (b"EHLO probe.example.net\r\n", b"250"),
    "imap": (b"p1 CAPABILITY\r\n", b"* CAPABILITY"),
    "pop3": (b"CAPA\r\n", b"+OK"),
}


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def readUntil(sock, predicate, timeout):
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while not predicate(data):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out; got {data[-300:]!r}")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def lineEnded(data):
    return data.endswith(b"\r\n")


def probe(ports, names=PROBES):
    """Each listener in C{names} greets and answers one command within PROMPT seconds."""
    for name in names:
        command, good = PROBES[name]
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", ports[name]), timeout=PROMPT) as s:
            greeting = readUntil(s, lineEnded, PROMPT)
            assert greeting[:1] in (b"2", b"*", b"+"), f"{name} greeting {greeting!r}"
            s.sendall(command)
            if name == "smtp":
                answer = readUntil(s, lambda d: b"\r\n250 " in b"\r\n" + d, PROMPT)
            elif name == "imap":
                answer = readUntil(s, lambda d: b"p1 OK" in d, PROMPT)
            else:
                answer = readUntil(s, lambda d: d.endswith(b"\r\n.\r\n"), PROMPT)
            assert answer.startswith(good), f"{name} answered {answer[:200]!r}"
        elapsed = time.monotonic() - start
        assert elapsed < PROMPT, f"{name} took {elapsed:.1f}s"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 4 * IDLE_CONNECTIONS + 1000) if hard != resource.RLIM_INFINITY else 4 * IDLE_CONNECTIONS + 1000
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    tmp = tmp_path_factory.mktemp("resources")
    ports = dict(zip(DEFAULT_PORTS, freePorts(len(DEFAULT_PORTS))))
    prepareData(tmp, ports, USER, PASSWORD)
    proc = MailplatProcess(str(tmp), ["--config", "mailplat.toml"], ports=ports)
    proc.start(waitFor=["smtp", "imap", "pop3"])
    probe(ports)
    proc.baseline = rss(proc.proc.pid)
    proc.fdLimit = wanted
    try:
        yield proc
    finally:
        proc.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def assertMemoryBounded(server):
    grown = rss(server.proc.pid) - server.baseline
    assert grown < RSS_GROWTH, f"RSS grew by {grown // 1024} KiB"


def assertAlive(server):
    assert server.proc.poll() is None, "mailplat died:\n" + server.output()[-3000:]


def test_slowClients(server):
    """Clients sending a byte a second hold their connection, not the listener."""
    ports = server.ports
    stop = threading.Event()
    errors = []

    def slow(name, text):
        try:
            with socket.create_connection(("127.0.0.1", ports[name]), timeout=10) as s:
                readUntil(s, lineEnded, 10)
                for b in text:
                    if stop.is_set():
                        return
                    s.sendall(bytes([b]))
                    stop.wait(1.0)
        except OSError as e:
            errors.append((name, e))

    threads = [threading.Thread(target=slow, args=(name, PROBES[name][0])) for name in PROBES for _ in range(5)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            time.sleep(0.5)
            probe(ports)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert not errors, errors
    assertAlive(server)
    assertMemoryBounded(server)


def test_manyIdleConnections(server):
    """A thousand idle connections do not starve a new client or grow memory without bound."""
    ports = server.ports
    count = min(IDLE_CONNECTIONS, (server.fdLimit - 200) // 2)
    names = list(PROBES)
    socks = []
    try:
        for i in range(count):
            s = socket.socket()
            s.settimeout(10)
            # Spread over 40 loopback source addresses, within [limits] connections_per_ip.
            s.bind((f"127.0.1.{(i // 3) % 40 + 2}", 0))
            s.connect(("127.0.0.1", ports[names[i % 3]]))
            socks.append(s)
        probe(ports)
        # Every idle connection was greeted (sample a spread of them).
        for s in socks[:: max(1, count // 30)]:
            assert readUntil(s, lineEnded, 10)[:1] in (b"2", b"*", b"+")
        assertAlive(server)
        assertMemoryBounded(server)
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    probe(ports)


def test_connectionFloodFromOneAddress(server):
    """Connections opened and dropped as fast as possible from one address, in parallel threads: other clients are served."""
    ports = server.ports
    stop = threading.Event()
    made = [0]

    def flood(port):
        # The flood comes from one address (127.0.0.2); the probe from another (127.0.0.1).
        while not stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()
                made[0] += 1
            except OSError:
                time.sleep(0.01)

    threads = [threading.Thread(target=flood, args=(ports[n],)) for n in PROBES for _ in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            probe(ports)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert made[0] > 100, f"only {made[0]} connections made"
    probe(ports)
    assertAlive(server)
    assertMemoryBounded(server)


def _sendHuge(port, head, size, chunk=1 << 16):
    """Open a connection, read the greeting, send C{head}, C{size} octets of 'a', then CRLF."""
    s = socket.create_connection(("127.0.0.1", port), timeout=PROMPT)
    readUntil(s, lineEnded, PROMPT)
    s.sendall(head)
    sent = 0
    block = b"a" * chunk
    try:
        while sent < size:
            s.sendall(block)
            sent += chunk
        s.sendall(b"\r\n")
    except OSError:
        pass  # the server closed after its error reply: also fine
    return s


def _replyAfter(s):
    try:
        return readUntil(s, lambda d: b"\r\n" in d, PROMPT)
    except (ConnectionResetError, BrokenPipeError):
        return b""


def test_hugeCommandLines(server):
    """
    A 4 MB line: an error reply (SMTP and POP3 as soon as the limit is
    passed, IMAP at the line's end, its tag known), memory bounded (the
    excess is discarded as it comes), the others served meanwhile.
    """
    ports = server.ports
    for name, head, bad in (("smtp", b"HELO ", b"500"), ("imap", b"a1 NOOP ", b"a1 BAD"), ("pop3", b"USER ", b"-ERR")):
        s = _sendHuge(ports[name], head, 4 << 20)
        try:
            probe(ports, [name])
            reply = _replyAfter(s)
            assert reply == b"" or reply.startswith(bad) or bad in reply, f"{name}: {reply[:200]!r}"
        finally:
            s.close()
    assertAlive(server)
    assertMemoryBounded(server)


def test_hugeImapLiterals(server):
    """A literal over the APPEND limit is refused before it is read; a big one in progress starves nobody."""
    ports = server.ports
    with socket.create_connection(("127.0.0.1", ports["imap"]), timeout=PROMPT) as s:
        readUntil(s, lineEnded, PROMPT)
        s.sendall(f"a1 LOGIN {USER} {PASSWORD}\r\n".encode())
        readUntil(s, lambda d: b"a1 " in d, PROMPT)
        s.sendall(b"a2 APPEND INBOX {99999999999}\r\n")
        reply = readUntil(s, lambda d: b"a2 " in d, PROMPT)
        assert b"a2 NO" in reply or b"a2 BAD" in reply, reply
        s.sendall(b"a3 NOOP\r\n")
        assert b"a3 OK" in readUntil(s, lambda d: b"a3 " in d, PROMPT)
        # A synchronising literal accepted, then fed slowly: others go on.
        s.sendall(b"a4 APPEND INBOX {10000000}\r\n")
        assert readUntil(s, lineEnded, PROMPT).startswith(b"+")
        s.sendall(b"x" * (1 << 20))
        probe(ports)
    assertAlive(server)
    assertMemoryBounded(server)


def test_parallelAuthFailures(server):
    """Many clients failing AUTH at once: each is cut off after its limit; the right password still works promptly."""
    ports = server.ports
    outcomes = []

    def imapFailures():
        with socket.create_connection(("127.0.0.1", ports["imap"]), timeout=20) as s:
            readUntil(s, lineEnded, 20)
            for i in range(10):
                try:
                    s.sendall(f"f{i} LOGIN {USER} wrong{i}\r\n".encode())
                    reply = readUntil(s, lambda d: f"f{i} ".encode() in d or b"* BYE" in d or not d, 20)
                except OSError:
                    reply = b""
                if b"* BYE" in reply or not reply:
                    outcomes.append(("imap", i))
                    return
                assert f"f{i} NO".encode() in reply, reply
            outcomes.append(("imap", None))

    def smtpFailures():
        import base64

        with socket.create_connection(("127.0.0.1", ports["submission"]), timeout=20) as s:
            readUntil(s, lineEnded, 20)
            s.sendall(b"EHLO x.example.net\r\n")
            readUntil(s, lambda d: b"\r\n250 " in b"\r\n" + d, 20)
            for i in range(10):
                token = base64.b64encode(f"\0{USER}\0wrong{i}".encode()).decode()
                try:
                    s.sendall(f"AUTH PLAIN {token}\r\n".encode())
                    reply = readUntil(s, lambda d: d.endswith(b"\r\n") or not d, 20)
                except OSError:
                    reply = b""
                if not reply or reply.startswith(b"421"):
                    outcomes.append(("smtp", i))
                    return
                assert reply[:1] in (b"5", b"4"), reply
            outcomes.append(("smtp", None))

    threads = [threading.Thread(target=f) for f in (imapFailures, smtpFailures) for _ in range(20)]
    for t in threads:
        t.start()
    probe(ports)
    with socket.create_connection(("127.0.0.1", ports["imap"]), timeout=PROMPT) as s:
        start = time.monotonic()
        readUntil(s, lineEnded, PROMPT)
        s.sendall(f"ok LOGIN {USER} {PASSWORD}\r\n".encode())
        reply = readUntil(s, lambda d: b"ok " in d, 3 * PROMPT)
        assert b"ok OK" in reply, reply
        assert time.monotonic() - start < 3 * PROMPT
    for t in threads:
        t.join(60)
    assert len(outcomes) == 40
    assert all(i is not None for _, i in outcomes), f"a client was never cut off: {outcomes}"
    assertAlive(server)
    assertMemoryBounded(server)


def test_perAddressLimitAnswersInTheProtocol(server):
    """Past [limits] connections_per_ip, one address is refused politely while another is served."""
    ports = server.ports
    held = []
    try:
        refusal = None
        for _ in range(80):
            s = socket.create_connection(("127.0.0.1", ports["smtp"]), timeout=10, source_address=("127.0.0.3", 0))
            held.append(s)
            line = readUntil(s, lineEnded, 10)
            if not line.startswith(b"220"):
                refusal = line
                break
        assert refusal is not None and refusal.startswith(b"421 4.7.0"), refusal
        probe(ports)
    finally:
        for s in held:
            s.close()
