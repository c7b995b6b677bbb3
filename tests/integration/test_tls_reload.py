"""
TLS certificate reload on SIGHUP: the certificate and key files named in the
config are replaced, mailplat gets SIGHUP, and C{openssl s_client} sees the
new certificate on implicit TLS (IMAPS, POP3S, SMTPS) and after STARTTLS
(SMTP, IMAP, POP3).  A replacement that cannot be loaded (key not matching
the certificate) is refused with a log line and the previous pair served.
"""

import os
import signal
import subprocess
import time

import pytest

from helpers import DEFAULT_PORTS, MailplatProcess, configForPorts, freePorts, requirePeer

from mailplat.tls import ReloadableServerContext, generateSelfSigned

pytestmark = pytest.mark.integration

#: listener -> s_client arguments beyond -connect
CHECKS = {
    "imaps": [],
    "pop3s": [],
    "submissions": [],
    "smtp": ["-starttls", "smtp"],
    "imap": ["-starttls", "imap"],
    "pop3": ["-starttls", "pop3"],
}


def servedSubject(openssl, port, extra):
    """The subject CN of the certificate served at C{port}."""
    r = subprocess.run(
        [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", *extra],
        input=b"", capture_output=True, timeout=30,
    )
    pem = r.stdout.split(b"-----BEGIN CERTIFICATE-----", 1)
    assert len(pem) == 2, f"no certificate from port {port}: {r.stdout[-500:]!r} {r.stderr[-500:]!r}"
    cert = b"-----BEGIN CERTIFICATE-----" + pem[1].split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
    x = subprocess.run([openssl, "x509", "-noout", "-subject", "-nameopt", "RFC2253"], input=cert,
                       capture_output=True, timeout=30)
    return x.stdout.decode().strip().split("CN=", 1)[1]


def install(directory, name, hostname):
    """Write a new pair for C{hostname} and move it into place under C{name} (atomic replace)."""
    cert, key = os.path.join(directory, f"{name}.pem"), os.path.join(directory, f"{name}.key")
    generateSelfSigned(cert + ".new", key + ".new", hostname)
    os.replace(key + ".new", key)
    os.replace(cert + ".new", cert)
    return cert, key


def waitForSubject(openssl, port, extra, wanted, timeout=15):
    deadline = time.monotonic() + timeout
    while True:
        got = servedSubject(openssl, port, extra)
        if got == wanted or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_reloadOnSighup(tmp_path):
    openssl = requirePeer("openssl")
    tlsDir = str(tmp_path / "tls")
    os.makedirs(tlsDir)
    cert, key = install(tlsDir, "server", "first.example.org")
    ports = dict(zip(DEFAULT_PORTS, freePorts(len(DEFAULT_PORTS))))
    config = configForPorts(ports, str(tmp_path / "data"), f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n')
    (tmp_path / "mailplat.toml").write_text(config)
    proc = MailplatProcess(str(tmp_path), ["--config", "mailplat.toml"], ports=ports).start()
    try:
        for name, extra in CHECKS.items():
            assert servedSubject(openssl, ports[name], extra) == "first.example.org", name

        install(tlsDir, "server", "second.example.org")
        proc.proc.send_signal(signal.SIGHUP)
        assert waitForSubject(openssl, ports["imaps"], [], "second.example.org") == "second.example.org"
        for name, extra in CHECKS.items():
            assert servedSubject(openssl, ports[name], extra) == "second.example.org", name

        # A key that does not match the certificate: refused, the second pair stays.
        other = install(tlsDir, "other", "third.example.org")
        os.replace(other[0], cert)
        proc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "TLS reload failed" not in proc.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "TLS reload failed" in proc.output()
        for name, extra in CHECKS.items():
            assert servedSubject(openssl, ports[name], extra) == "second.example.org", name
        assert proc.proc.poll() is None, "SIGHUP must not stop the server"
    finally:
        proc.stop()


def test_reloadableContextKeepsPairOnError(tmp_path):
    """The context object itself: reload swaps the pair; a broken pair raises and changes nothing."""
    cert, key = install(str(tmp_path), "a", "one.example.org")
    ctx = ReloadableServerContext(cert, key)
    first = ctx.getContext()
    assert ctx.getContext() is first, "one SSL context per pair, not one per connection"
    install(str(tmp_path), "a", "two.example.org")
    ctx.reload()
    second = ctx.getContext()
    assert second is not first
    with open(key, "w") as f:
        f.write("not a key")
    with pytest.raises(Exception):
        ctx.reload()
    assert ctx.getContext() is second
