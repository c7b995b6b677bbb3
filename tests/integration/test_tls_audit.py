"""
A TLS audit of every listener with a real scanner (Debian's sslscan):
SMTP and submission STARTTLS, submissions (implicit TLS), IMAP STARTTLS,
IMAPS, POP3 STLS and POP3S offer TLS 1.2 and 1.3 only, with forward-secret
AEAD ciphers of at least 128 bits, no renegotiation, no compression.

A canary first: an OpenSSL server that deliberately allows TLS 1.0/1.1 and
weak ciphers must be reported as such, so the audit cannot pass just because
the scanner is unable to try the old protocols on this machine.
"""

import subprocess
import xml.etree.ElementTree as ET

import pytest

from helpers import DEFAULT_PORTS, MailplatProcess, configForPorts, freePorts, requirePeer, waitForPort

pytestmark = pytest.mark.integration

LISTENERS = {
    "smtp": ["--starttls-smtp"],
    "submission": ["--starttls-smtp"],
    "submissions": [],
    "imap": ["--starttls-imap"],
    "imaps": [],
    "pop3": ["--starttls-pop3"],
    "pop3s": [],
}


def scan(sslscan, port, extra, tmp_path):
    out = tmp_path / f"scan-{port}.xml"
    r = subprocess.run([sslscan, "--no-colour", "--no-heartbleed", *extra, f"--xml={out}", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=120)
    assert out.exists(), r.stdout + r.stderr
    root = ET.parse(out).getroot()
    test = root.find("ssltest")
    assert test is not None, r.stdout + r.stderr
    protocols = {f"{p.get('type')}{p.get('version')}": p.get("enabled") == "1" for p in test.iter("protocol")}
    ciphers = [(c.get("sslversion"), c.get("cipher"), int(c.get("bits"))) for c in test.iter("cipher")]
    compression = [c.get("supported") for c in test.iter("compression")]
    renegotiation = [r.get("supported") for r in test.iter("renegotiation")]
    return protocols, ciphers, compression, renegotiation


def test_scannerSeesWeakServers(tmp_path):
    """The canary: legacy protocols are detected when a server offers them."""
    sslscan, openssl = requirePeer("sslscan", "openssl")
    from mailplat.tls import generateSelfSigned

    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    generateSelfSigned(cert, key)
    [port] = freePorts(1)
    server = subprocess.Popen([openssl, "s_server", "-quiet", "-accept", str(port), "-cert", cert, "-key", key,
                               "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        waitForPort(port, proc=server)
        protocols, ciphers, _, _ = scan(sslscan, port, [], tmp_path)
    finally:
        server.kill()
        server.wait()
    assert protocols.get("tls1.1"), f"the scanner cannot detect TLS 1.1 here: {protocols}"


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tls")
    ports = dict(zip(DEFAULT_PORTS, freePorts(len(DEFAULT_PORTS))))
    (workdir / "mailplat.toml").write_text(configForPorts(ports, str(workdir / "data")))
    proc = MailplatProcess(str(workdir), ["--config", "mailplat.toml"], ports=ports).start()
    yield ports
    proc.stop()


@pytest.mark.parametrize("listener", sorted(LISTENERS))
def test_listenerOffersModernTLSOnly(platform, listener, tmp_path):
    sslscan = requirePeer("sslscan")
    protocols, ciphers, compression, renegotiation = scan(sslscan, platform[listener], LISTENERS[listener], tmp_path)
    enabled = {name for name, on in protocols.items() if on}
    assert enabled == {"tls1.2", "tls1.3"}, protocols
    assert ciphers, "no cipher accepted"
    for version, name, bits in ciphers:
        assert bits >= 128, (version, name, bits)
        assert any(aead in name for aead in ("GCM", "CHACHA20")), f"not an AEAD cipher: {name}"
        if version == "TLSv1.2":
            assert name.startswith("ECDHE-"), f"no forward secrecy: {name}"
        for weak in ("NULL", "RC4", "DES", "MD5", "EXPORT", "anon", "CBC"):
            assert weak not in name, name
    assert all(c != "1" for c in compression), "TLS compression (CRIME) must be off"
    assert all(r != "1" for r in renegotiation), "client-initiated renegotiation must be off"
