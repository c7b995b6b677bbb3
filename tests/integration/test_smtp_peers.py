"""
The SMTP server against real peers: smtplib, swaks, curl, msmtp, openssl
s_client and a real Postfix relaying to mailplat; and every attack of the
SMTP issue sent over a real socket (each of these fails on a server that
is vulnerable to it).
"""

import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from helpers import DEFAULT_PORTS, MailplatProcess, PrivatePostfix, freePorts, prepareData, requirePeer

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
USER = "alice@example.org"
PASSWORD = "correct horse battery staple"
PORTS = {}


def tlsContext():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smtp")
    PORTS.update(zip(DEFAULT_PORTS, freePorts(len(DEFAULT_PORTS))))
    extra = '\n[auth]\nplaintext_auth = "tls"\n'
    prepareData(workdir, PORTS, USER, PASSWORD, extra=extra)
    proc = MailplatProcess(str(workdir), ["--config", "mailplat.toml"], ports=PORTS).start(["smtp", "submission"])
    proc.workdir = workdir
    yield proc
    proc.stop()


def queuedLines(server, marker):
    """The 'queued' log lines of messages whose log line contains C{marker}, waiting a little for them."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [l for l in server.output().splitlines() if " queued " in l and marker in l]
        if lines:
            return lines
        time.sleep(0.1)
    return []


class Raw:
    """A raw SMTP connection: send exact bytes, read whole replies."""

    def __init__(self, port=None, sock=None):
        self.sock = sock or socket.create_connection((HOST, port or PORTS["smtp"]), timeout=10)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode())

    def reply(self):
        """One reply: (code, [lines])."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(f"connection closed after {lines!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), [l[4:] for l in lines]

    def replies(self, n):
        return [self.reply() for _ in range(n)]

    def close(self):
        self.sock.close()


def connect(port=None):
    r = Raw(port)
    assert r.reply()[0] == 220
    r.send("EHLO client.example.net\r\n")
    code, lines = r.reply()
    assert code == 250
    return r, lines


# -- extensions, with smtplib and raw sockets ----------------------------------------------------


def test_ehlo_advertises_every_extension(server):
    with smtplib.SMTP(HOST, PORTS["smtp"]) as s:
        s.ehlo("client.example.net")
        for ext in ("pipelining", "size", "8bitmime", "binarymime", "chunking", "dsn", "smtputf8",
                    "enhancedstatuscodes", "starttls"):
            assert s.has_extn(ext), ext
        assert not s.has_extn("auth")  # the MX listener: no AUTH


def test_bdat_pipelined_binarymime_byte_exact(server):
    r, _ = connect()
    binary = b"Subject: bdat-binary\r\nContent-Type: application/octet-stream\r\n\r\n" + bytes(range(256)) * 4
    first, second = binary[:100], binary[100:]
    r.send(
        b"MAIL FROM:<bob@example.net> BODY=BINARYMIME\r\nRCPT TO:<alice@example.org>\r\n"
        + b"BDAT %d\r\n" % len(first) + first + b"BDAT %d LAST\r\n" % len(second) + second + b"QUIT\r\n"
    )
    replies = r.replies(5)
    assert [c for c, _ in replies] == [250, 250, 250, 250, 221]
    assert replies[2][1] == ["2.0.0 100 octets received"]
    assert replies[3][1][0].startswith("2.0.0 Ok: queued as ")
    assert queuedLines(server, "BODY=BINARYMIME") and "BDAT" in queuedLines(server, "BODY=BINARYMIME")[0]


def test_dsn_and_smtputf8_with_smtplib(server):
    with smtplib.SMTP(HOST, PORTS["smtp"]) as s:
        s.ehlo("client.example.net")
        refused = s.sendmail(
            "bob@example.net", [USER], b"Subject: dsn\r\n\r\nx\r\n",
            mail_options=["RET=HDRS", "ENVID=smtplib+2Bdsn"],
            rcpt_options=["NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;{USER}"],
        )
        assert refused == {}
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            s.sendmail("bob@example.net", [USER], b"x\r\n", mail_options=["RET=SOMETIMES"])
        assert e.value.smtp_code == 501
        s.rset()
        # Without SMTPUTF8 a UTF-8 address is refused with 553 5.6.7 ...
        s.command_encoding = "utf-8"
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            s.sendmail("bob@example.net", ["andré@example.org"], b"x\r\n")
        assert e.value.recipients["andré@example.org"][0] == 553
        # ... and with it the message goes through routing (no such user here).
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            s.sendmail("pelé@example.net", ["andré@example.org"], "Subject: ç\r\n\r\nx\r\n".encode(),
                       mail_options=["SMTPUTF8"])
        assert e.value.recipients["andré@example.org"][:2] == (550, b"5.1.1 No such user here")
        assert s.sendmail("pelé@example.net", [USER], "Subject: ça\r\n\r\nx\r\n".encode(),
                          mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}
    assert queuedLines(server, "ENVID=smtplib+2Bdsn NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;alice@example.org")
    assert queuedLines(server, "UTF8SMTP")


def test_size_limit(server):
    with smtplib.SMTP(HOST, PORTS["smtp"]) as s:
        s.ehlo("client.example.net")
        limit = int(s.esmtp_features["size"])
        code, msg = s.mail("bob@example.net", [f"SIZE={limit + 1}"])
        assert (code, msg[:5]) == (552, b"5.3.4")


# -- real clients --------------------------------------------------------------------------------------


def test_swaks_starttls_auth_pipelining_on_submission(server):
    swaks = requirePeer("swaks")
    r = subprocess.run(
        [swaks, "--server", HOST, "--port", str(PORTS["submission"]), "--tls", "--auth", "PLAIN",
         "--auth-user", USER, "--auth-password", PASSWORD, "--pipeline", "--from", USER,
         "--to", "someone@example.net", "--header", "Subject: swaks-submission", "--ehlo", "client.example.net"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "235 2.7.0 Authentication successful" in r.stdout
    assert "250 2.0.0 Ok: queued as" in r.stdout
    assert queuedLines(server, "ESMTPSA")


def test_swaks_plaintext_auth_refused_before_tls(server):
    swaks = requirePeer("swaks")
    r = subprocess.run(
        [swaks, "--server", HOST, "--port", str(PORTS["submission"]), "--auth", "PLAIN", "--auth-user", USER,
         "--auth-password", PASSWORD, "--from", USER, "--to", USER, "--quit-after", "AUTH"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0
    # Before TLS only SCRAM-SHA-256 is offered: it never sends the password.
    authLines = [l for l in r.stdout.splitlines() if "AUTH " in l and l.lstrip().startswith("<-")]
    assert authLines and all("PLAIN" not in l and "LOGIN" not in l for l in authLines), r.stdout
    assert "SCRAM-SHA-256" in authLines[0]
    assert "235 " not in r.stdout


def test_curl_smtp_and_starttls(server, tmp_path):
    curl = requirePeer("curl")
    message = tmp_path / "m.eml"
    message.write_bytes(b"Subject: curl-mx\r\nFrom: bob@example.net\r\n\r\nhello from curl\r\n")
    r = subprocess.run(
        [curl, "-sS", f"smtp://{HOST}:{PORTS['smtp']}/client.example.net", "--mail-from", "bob@example.net",
         "--mail-rcpt", USER, "-T", str(message)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [curl, "-sS", "--ssl-reqd", "-k", f"smtp://{HOST}:{PORTS['submission']}/client.example.net",
         "--user", f"{USER}:{PASSWORD}", "--mail-from", USER, "--mail-rcpt", "friend@example.net",
         "-T", str(message)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    # A relay attempt is refused: curl reports the 550.
    r = subprocess.run(
        [curl, "-sS", f"smtp://{HOST}:{PORTS['smtp']}/client.example.net", "--mail-from", "bob@example.net",
         "--mail-rcpt", "victim@example.net", "-T", str(message)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0 and "550" in r.stderr


@pytest.mark.parametrize("mechanism", ["scram-sha-256", "plain", "login"])
def test_msmtp_submission(server, tmp_path, mechanism):
    msmtp = requirePeer("msmtp")
    r = subprocess.run(
        [msmtp, "--host", HOST, "--port", str(PORTS["submission"]), "--tls=on", "--tls-starttls=on",
         "--tls-certcheck=off", f"--auth={mechanism}", f"--user={USER}", "--passwordeval", f"echo '{PASSWORD}'",
         f"--from={USER}", "--domain=client.example.net", "someone@example.net"],
        input=f"Subject: msmtp-{mechanism}\n\nhello\n", capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_msmtp_wrong_password_refused(server):
    msmtp = requirePeer("msmtp")
    r = subprocess.run(
        [msmtp, "--host", HOST, "--port", str(PORTS["submission"]), "--tls=on", "--tls-starttls=on",
         "--tls-certcheck=off", "--auth=scram-sha-256", f"--user={USER}", "--passwordeval", "echo wrong",
         f"--from={USER}", "someone@example.net"],
        input="Subject: x\n\nx\n", capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0
    assert "535" in r.stderr


def test_openssl_starttls_then_bdat_inside_tls(server):
    openssl = requirePeer("openssl")
    body = b"Subject: openssl-bdat\r\n\r\nover TLS\r\n"
    script = (
        b"EHLO client.example.net\r\nMAIL FROM:<bob@example.net>\r\nRCPT TO:<alice@example.org>\r\n"
        + b"BDAT %d LAST\r\n" % len(body) + body + b"QUIT\r\n"
    )
    r = subprocess.run(
        [openssl, "s_client", "-quiet", "-ign_eof", "-starttls", "smtp", "-connect", f"{HOST}:{PORTS['smtp']}"],
        input=script, capture_output=True, timeout=60,
    )
    out = r.stdout.decode()
    assert "250 2.0.0 Ok: queued as" in out, out + r.stderr.decode()
    assert "221 2.0.0 Bye" in out
    assert queuedLines(server, "ESMTPS BDAT")


# -- attacks ------------------------------------------------------------------------------------------------


def test_attack_starttls_command_injection(server):
    # Sent in one packet with STARTTLS; a vulnerable server answers the
    # injected command inside TLS (CVE-2011-0411 and its many relatives).
    r, _ = connect()
    r.send("STARTTLS\r\nMAIL FROM:<injected@example.net>\r\n")
    assert r.reply()[0] == 220
    tls = tlsContext().wrap_socket(r.sock, server_hostname="mail.example.org")
    t = Raw(sock=tls)
    t.send("EHLO client.example.net\r\n")
    code, lines = t.reply()
    assert code == 250 and lines[0].startswith("mail.example.org Hello")
    t.send("MAIL FROM:<bob@example.net>\r\n")
    assert t.reply() == (250, ["2.1.0 Ok"])  # not "503 Nested MAIL": the injected MAIL never ran
    t.close()


def test_attack_smtp_smuggling(server):
    # <LF>.<LF>, <CR>.<CR> and <LF>.<CRLF> must never end the message:
    # a vulnerable server would accept a second, smuggled message.
    for fake_end in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n"):
        r, _ = connect()
        smuggled = (
            b"MAIL FROM:<bob@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nSubject: smuggle\r\n\r\nhi"
            + fake_end
            + b"MAIL FROM:<admin@example.org>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nSubject: smuggled\r\n\r\nx"
            + b"\r\n.\r\nQUIT\r\n"
        )
        r.send(smuggled)
        replies = r.replies(5)
        assert [c for c, _ in replies] == [250, 250, 354, 550, 221], (fake_end, replies)
        assert replies[3][1] == ["5.6.0 Message contains bare CR or LF: lines must end with CRLF"]
        r.close()
    assert not queuedLines(server, "<admin@example.org>")


def test_attack_bare_lf_commands(server):
    r, _ = connect()
    r.send(b"MAIL FROM:<bob@example.net>\nRCPT TO:<alice@example.org>\r\n")
    assert r.reply()[0] == 500
    assert r.reply() == (503, ["5.5.1 Need MAIL command"])
    r.close()


@pytest.mark.parametrize(
    "address",
    [
        "user%evil.example.net@example.org",
        '"user@evil.example.net"@example.org',
        "@example.org:user@evil.example.net",
        "user@evil.example.net@example.org",
        "evil.example.net!user@example.org",
        "user@evil.example.net.",
        "user@[192.0.2.66]",
        "user@[IPv6:2001:db8::66]",
    ],
)
def test_attack_relay_tricks(server, address):
    r, _ = connect()
    r.send(f"MAIL FROM:<spammer@evil.example.net>\r\nRCPT TO:<{address}>\r\n")
    assert r.reply()[0] == 250
    assert r.reply() == (550, ["5.7.1 Relay access denied"])
    r.close()


def test_attack_long_lines_and_errors(server):
    r, _ = connect()
    r.send(b"NOOP " + b"x" * 600 + b"\r\n")
    assert r.reply() == (500, ["5.5.2 Line too long"])
    r.send(b"MAIL FROM:<bob@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    r.replies(3)
    r.send(b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n.\r\n")
    assert r.reply()[0] == 550
    for _ in range(25):
        r.send("BOGUS\r\n")
    codes = []
    try:
        while True:
            codes.append(r.reply()[0])
    except (EOFError, OSError):
        pass
    assert codes[-1] == 421 and set(codes[:-1]) == {500}
    r.close()


def test_attack_garbage_never_kills_the_session(server):
    r, _ = connect()
    for junk in (b"\x00\x01\x02\r\n", b"\xff\xfe\xfd\r\n", b"MAIL FROM:<\xff@x>\r\n", b"RCPT TO:<<<>>>\r\n",
                 b"BDAT x\r\n", b"AUTH PLAIN !!!\r\n", b"MAIL FROM:<a@b> " + b"P=1 " * 30 + b"\r\n"):
        r.send(junk)
        code, _ = r.reply()
        assert 400 <= code < 600, junk
    r.send("NOOP\r\n")
    assert r.reply() == (250, ["2.0.0 Ok"])
    r.close()
    assert "Traceback" not in server.output()


# -- Postfix relaying to mailplat -----------------------------------------------------------------------

@pytest.fixture
def postfix(server):
    """A Postfix of its own (config and queue in a temporary directory) on a free port, relaying example.org to mailplat."""
    postfix = PrivatePostfix(f"""
myhostname = postfix.test
mydomain = postfix.test
myorigin = postfix.test
mynetworks = 127.0.0.0/8
relay_domains = example.org
transport_maps = inline:{{example.org=smtp:[127.0.0.1]:{PORTS['smtp']}}}
smtp_tls_security_level = encrypt
smtp_tls_loglevel = 1
smtp_dns_support_level = disabled
smtputf8_enable = yes
""").start()
    try:
        yield postfix.port, postfix.maillog
    finally:
        postfix.stop()


def test_postfix_relays_with_starttls_dsn_and_pipelining(server, postfix):
    port, maillog = postfix
    with smtplib.SMTP(HOST, port) as s:
        s.ehlo("client.example.net")
        for i in range(3):
            assert s.sendmail(
                "bob@example.net", [USER], f"Subject: via-postfix-{i}\r\nMessage-ID: <pf{i}@x>\r\n\r\nhello\r\n".encode(),
                mail_options=["RET=HDRS", f"ENVID=postfix+2B{i}"],
                rcpt_options=["NOTIFY=SUCCESS,DELAY", f"ORCPT=rfc822;{USER}"],
            ) == {}
    for i in range(3):
        lines = queuedLines(server, f"ENVID=postfix+2B{i}")
        assert lines, maillog.read_text() if maillog.exists() else "no maillog"
        assert "from <bob@example.net>" in lines[0]
        assert "ESMTPS" in lines[0]  # Postfix used STARTTLS
        assert f"RET=HDRS ENVID=postfix+2B{i} NOTIFY=SUCCESS,DELAY ORCPT=rfc822;{USER}" in lines[0]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and maillog.read_text().count("status=sent") < 3:
        time.sleep(0.2)
    log = maillog.read_text()
    assert log.count("status=sent (250 2.0.0 Ok: queued as") == 3, log
    assert "Trusted TLS connection established" in log or "TLS connection established" in log
