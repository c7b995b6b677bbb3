"""
TLS for every listener: a server context factory with TLS 1.2 as the
minimum, and a self-signed certificate generated on first start when the
config names none.

The platform's context is a L{ReloadableServerContext}: C{reload()} (run on
SIGHUP by the platform) reads the certificate and key files again, and every
connection (implicit TLS or STARTTLS) that starts TLS afterwards uses them.
Connections already encrypted keep their session.  A pair that cannot be
loaded (missing file, key not matching the certificate) is refused and the
previous one stays in use.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl


def generateSelfSigned(certPath: str, keyPath: str, hostname: str = "localhost", days: int = 825) -> None:
    """Write a new ECDSA P-256 key and a self-signed certificate for C{hostname} (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt = [x509.DNSName(hostname)]
    if hostname != "localhost":
        alt.append(x509.DNSName("localhost"))
    alt += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(os.path.dirname(os.path.abspath(certPath)), exist_ok=True)
    keyBytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(keyPath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(keyBytes)
    with open(certPath, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def ensureCertificate(dataDir: str, hostname: str = "localhost") -> tuple[str, str]:
    """The generated pair under C{DATA/tls/}, created if missing."""
    certPath = os.path.join(dataDir, "tls", "cert.pem")
    keyPath = os.path.join(dataDir, "tls", "key.pem")
    if not (os.path.exists(certPath) and os.path.exists(keyPath)):
        generateSelfSigned(certPath, keyPath, hostname)
    return certPath, keyPath


def serverContextFactory(certPath: str, keyPath: str):
    """
    A context factory for C{transport.startTLS} and implicit-TLS listeners:
    TLS 1.2 and 1.3 only, Mozilla "intermediate" ciphers for TLS 1.2.
    """
    with open(certPath, "rb") as f:
        certData = f.read()
    with open(keyPath, "rb") as f:
        keyData = f.read()
    cert = ssl.PrivateCertificate.loadPEM(certData + b"\n" + keyData)
    chain = []
    # Certificates after the first in the file are the chain.
    pems = certData.split(b"-----END CERTIFICATE-----")
    for pem in pems[1:]:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            chain.append(ssl.Certificate.loadPEM(pem + b"-----END CERTIFICATE-----\n").original)
    return ssl.CertificateOptions(
        privateKey=cert.privateKey.original,
        certificate=cert.original,
        extraCertChain=chain or None,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(
            "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
            "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
            "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
        ),
    )


class ReloadableServerContext:
    """
    An old-style server context factory (C{getContext()}, which Twisted
    calls for each new TLS connection) whose certificate and key can be
    re-read from their files with L{reload}.
    """

    def __init__(self, certPath: str, keyPath: str):
        self.certPath = certPath
        self.keyPath = keyPath
        self._options = self._load()

    def _load(self):
        options = serverContextFactory(self.certPath, self.keyPath)
        options.getContext()  # builds the context: checks the key matches the certificate
        return options

    def reload(self) -> None:
        """Read the files again; on any error raise it and keep the current pair."""
        self._options = self._load()

    @property
    def options(self):
        """The current L{ssl.CertificateOptions}."""
        return self._options

    def getContext(self):
        return self._options.getContext()


def isTLS(transport) -> bool:
    """
    Whether a transport is already encrypted (implicit TLS or after STARTTLS).
    A wrapping transport (the connection limits' L{ProtocolWrapper}) copied
    its interfaces when the connection was made, before any STARTTLS: the
    transport it wraps is asked too.
    """
    from twisted.internet.interfaces import ISSLTransport
    from twisted.protocols.policies import ProtocolWrapper

    for _ in range(8):
        if ISSLTransport.providedBy(transport):
            return True
        if not isinstance(transport, ProtocolWrapper):
            return False
        transport = transport.transport
    return False


def isLoopback(transport) -> bool:
    """Whether the connection was made to a loopback address of ours."""
    host = getattr(transport.getHost(), "host", None)
    try:
        return host is not None and ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False
