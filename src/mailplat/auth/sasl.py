"""
SASL mechanisms (RFC 4422), shared by SMTP AUTH, IMAP AUTHENTICATE and POP3
AUTH.  A protocol asks L{Registry.create} for a fresh mechanism object per
exchange and feeds it the client's decoded responses; the mechanism answers
with a L{Challenge} or, at the end, L{Credentials} for the cred portal.

Built in: PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login).  Both send
the password in the clear, so protocols offer them only over TLS (or on a
loopback-only listener) — see L{Registry.available}.

Also here, registered by the platform where they can work:

  - CRAM-MD5 (RFC 2195): the server must know the plaintext password (or
    an HMAC-MD5 precomputed secret, which is just as good as the password
    to an attacker).  mailplat stores argon2id hashes, so the directory
    cannot verify CRAM-MD5 and it is not offered with it; it works with a
    checker that accepts C{IUsernameHashedPassword} (twisted.cred's
    in-memory and file checkers with plaintext passwords).  A protocol
    offers a mechanism only when its portal has a checker for the
    mechanism's C{credentialInterfaces}.
  - SCRAM-SHA-256 (RFC 5802, RFC 7677): verified against the salted
    C{StoredKey}/C{ServerKey} pair that the directory keeps beside the
    argon2id hash (L{scramCredentials}; written whenever a password is
    set), so no plaintext is stored.  It looks the pair up during the
    exchange, so its L{ScramSHA256.step} may return a Deferred; it proves
    the client itself and ends with L{VerifiedUser} credentials, accepted
    by L{VerifiedUserChecker}.  Channel binding (C{-PLUS}) is not offered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import CramMD5Credentials, ICredentials, IUsernameHashedPassword, IUsernamePassword
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer
from zope.interface import implementer

from mailplat.interfaces.auth import ISASLMechanism


def decodeResponse(data) -> bytes:
    """
    A client's base64 SASL response, strictly (RFC 4648 §3.2: padding only
    to complete a short final group; no other characters); C{ValueError}
    if it is not valid base64.  (An empty response C{"="} is the
    protocols' business.)
    """
    if isinstance(data, str):
        data = data.encode("ascii", "replace")
    body = data.rstrip(b"=")
    if len(data) % 4 or len(data) - len(body) > 2 or b"=" in body:
        raise ValueError("invalid base64")
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):
        raise ValueError("invalid base64")


class SASLError(Exception):
    """The client's response is malformed; the exchange fails (not an auth failure)."""


class SASLAuthenticationFailed(SASLError):
    """The mechanism itself found the credentials wrong (SCRAM): an authentication failure."""

    def __init__(self, username: str, why: str = "authentication failed"):
        super().__init__(why)
        self.username = username


@dataclass(frozen=True)
class Challenge:
    data: bytes


@dataclass(frozen=True)
class Credentials:
    credentials: object
    authzid: str = ""


@implementer(ISASLMechanism)
class Plain:
    """RFC 4616: C{[authzid] NUL authcid NUL passwd} in one response."""

    name = "PLAIN"
    plaintext = True
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self):
        self._started = False

    def step(self, response: bytes):
        if response is None and not self._started:
            self._started = True
            return Challenge(b"")
        parts = (response or b"").split(b"\x00")
        if len(parts) != 3:
            raise SASLError("malformed PLAIN response")
        try:
            authzid, authcid, passwd = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            raise SASLError("PLAIN response is not UTF-8")
        if not authcid or not passwd:
            raise SASLError("empty user name or password")
        if authzid and authzid != authcid:
            # Proxy authorization is not supported: acting as another user
            # would need a policy to allow it.  Well-formed, so an
            # authentication failure (RFC 4954 §6: 535 5.7.8), not a syntax error.
            raise SASLAuthenticationFailed(authcid, "authorization identity differs from authentication identity")
        return Credentials(UsernamePassword(authcid.encode("utf-8"), passwd.encode("utf-8")), authzid)


@implementer(ISASLMechanism)
class Login:
    """The LOGIN mechanism: two challenges, C{Username:} and C{Password:}."""

    name = "LOGIN"
    plaintext = True
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self):
        self._user = None
        self._asked = False

    def step(self, response: bytes):
        if self._user is None:
            if response is None and not self._asked:
                self._asked = True
                return Challenge(b"Username:")
            if not response:
                raise SASLError("empty user name")
            self._user = response
            return Challenge(b"Password:")
        if not response:
            raise SASLError("empty password")
        try:
            self._user.decode("utf-8")
            response.decode("utf-8")
        except UnicodeDecodeError:
            raise SASLError("LOGIN response is not UTF-8")
        return Credentials(UsernamePassword(self._user, response))


class Registry:
    """
    The mechanisms a platform offers, by name.  An entry is a mechanism
    class or any callable with C{name} (and optionally C{plaintext} and
    C{credentialInterfaces}) that makes a fresh mechanism object.
    """

    def __init__(self, mechanisms=(Plain, Login)):
        self._mechanisms = {m.name: m for m in mechanisms}

    def register(self, mechanismClass):
        self._mechanisms[mechanismClass.name.upper()] = mechanismClass

    def copy(self) -> "Registry":
        return Registry(tuple(self._mechanisms.values()))

    def names(self):
        return list(self._mechanisms)

    def mechanism(self, name: str):
        """The registered class (or factory) for C{name}, or C{None}."""
        return self._mechanisms.get(name.upper())

    def available(self, secure: bool):
        """Names to advertise: plaintext mechanisms only when C{secure}."""
        return [n for n, m in self._mechanisms.items() if secure or not getattr(m, "plaintext", False)]

    def create(self, name: str):
        """A fresh mechanism object, or C{None} for an unknown name."""
        cls = self._mechanisms.get(name.upper())
        return cls() if cls is not None else None


# -- CRAM-MD5 (RFC 2195) ------------------------------------------------------------


@implementer(ISASLMechanism)
class CramMD5:
    """
    RFC 2195: the server sends a unique challenge, the client answers
    C{user SP hex(HMAC-MD5(password, challenge))}.  The credentials are
    twisted.cred's L{CramMD5Credentials} (C{IUsernameHashedPassword}): only
    a checker that knows the plaintext can verify them.
    """

    name = "CRAM-MD5"
    plaintext = False
    credentialInterfaces = (IUsernameHashedPassword,)

    def __init__(self, hostname: str = "localhost"):
        self._hostname = hostname
        self._credentials = None

    def step(self, response: bytes):
        if self._credentials is None:
            if response is not None:
                raise SASLError("CRAM-MD5 takes no initial response")
            self._credentials = CramMD5Credentials(self._hostname)
            return Challenge(self._credentials.getChallenge())
        user, sp, digest = response.rpartition(b" ")
        if not sp or not user or len(digest) != 32:
            raise SASLError("malformed CRAM-MD5 response")
        try:
            int(digest, 16)
            user.decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise SASLError("malformed CRAM-MD5 response")
        self._credentials.setResponse(response)
        return Credentials(self._credentials)


# -- SCRAM-SHA-256 (RFC 5802, RFC 7677) ------------------------------------------------

SCRAM_ITERATIONS = 10000


def saslprep(text: str) -> str:
    """
    RFC 4013 SASLprep (stringprep profile for user names and passwords):
    non-ASCII spaces become spaces, "commonly mapped to nothing" characters
    go, NFKC, then prohibited and bidi checks.  Raises C{ValueError}.
    """
    if text.isascii() and all(" " <= c <= "~" for c in text):
        return text
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    mapped = unicodedata.normalize("NFKC", mapped)
    for c in mapped:
        if (
            stringprep.in_table_c12(c) or stringprep.in_table_c21_c22(c) or stringprep.in_table_c3(c)
            or stringprep.in_table_c4(c) or stringprep.in_table_c5(c) or stringprep.in_table_c6(c)
            or stringprep.in_table_c7(c) or stringprep.in_table_c8(c) or stringprep.in_table_c9(c)
            or stringprep.in_table_a1(c)
        ):
            raise ValueError("prohibited character")
    if any(stringprep.in_table_d1(c) for c in mapped):
        if any(stringprep.in_table_d2(c) for c in mapped):
            raise ValueError("mixed bidirectional text")
        if not (stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1])):
            raise ValueError("bidirectional text must start and end with RandALCat characters")
    return mapped


@dataclass(frozen=True)
class ScramSecret:
    """What a server keeps to verify SCRAM-SHA-256 (RFC 5802 §3), never the password."""

    salt: bytes
    iterations: int
    storedKey: bytes
    serverKey: bytes

    def toText(self) -> str:
        """C{SCRAM-SHA-256$iterations:salt$StoredKey:ServerKey}, base64 (the RFC 5803 form)."""
        b = lambda x: base64.b64encode(x).decode("ascii")  # noqa: E731
        return f"SCRAM-SHA-256${self.iterations}:{b(self.salt)}${b(self.storedKey)}:{b(self.serverKey)}"

    @classmethod
    def fromText(cls, text: str) -> "ScramSecret":
        scheme, params, keys = text.split("$")
        if scheme != "SCRAM-SHA-256":
            raise ValueError("not a SCRAM-SHA-256 secret")
        iterations, salt = params.split(":")
        stored, server = keys.split(":")
        d = base64.b64decode
        return cls(d(salt), int(iterations), d(stored), d(server))


def scramCredentials(password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> ScramSecret:
    """The L{ScramSecret} for C{password} (SASLprep'd), with a new random salt unless given."""
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt, iterations)
    clientKey = hmac.digest(salted, b"Client Key", "sha256")
    return ScramSecret(
        salt, iterations, hashlib.sha256(clientKey).digest(), hmac.digest(salted, b"Server Key", "sha256")
    )


class IVerifiedUser(ICredentials):
    """Credentials of a user whose proof a SASL mechanism has already checked (SCRAM)."""


@implementer(IVerifiedUser)
class VerifiedUser:
    def __init__(self, username: str, mechanism: str):
        self.username = username
        self.mechanism = mechanism


@implementer(ICredentialsChecker)
class VerifiedUserChecker:
    """Accepts L{VerifiedUser} credentials: the mechanism proved them already."""

    credentialInterfaces = (IVerifiedUser,)

    def requestAvatarId(self, credentials):
        return defer.succeed(credentials.username)


def _saslname(text: str) -> str:
    # RFC 5802 §5.1: "," and "=" are sent as "=2C" and "=3D"; any other "=" is an error.
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "=":
            code = text[i + 1 : i + 3]
            if code == "2C":
                out.append(",")
            elif code == "3D":
                out.append("=")
            else:
                raise SASLError("bad saslname escape")
            i += 3
            continue
        if c == ",":
            raise SASLError("bad saslname")
        out.append(c)
        i += 1
    return "".join(out)


def _attributes(message: str) -> list:
    out = []
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isalpha():
            raise SASLError("malformed SCRAM attribute")
        out.append((part[0], part[2:]))
    return out


@implementer(ISASLMechanism)
class ScramSHA256:
    """
    The server side of SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel
    binding.  C{lookup(username)} fires with the user's L{ScramSecret} or
    C{None}; for an unknown user the exchange goes on with a made-up salt
    and fails at the proof, so the reply does not tell whether the user
    exists.  The authorization identity, when sent, must equal the user.
    """

    name = "SCRAM-SHA-256"
    plaintext = False
    credentialInterfaces = (IVerifiedUser,)

    def __init__(self, lookup, fakeSaltKey: bytes = b""):
        self._lookup = lookup
        self._fakeSaltKey = fakeSaltKey or _PROCESS_KEY
        self._state = "start"

    @classmethod
    def factory(cls, lookup):
        """A zero-argument factory for a L{Registry}."""

        def make():
            return cls(lookup)

        make.name = cls.name
        make.plaintext = cls.plaintext
        make.credentialInterfaces = cls.credentialInterfaces
        return make

    def step(self, response: bytes):
        if self._state == "start":
            if response is None:
                self._state = "first"
                return Challenge(b"")
            return self._clientFirst(response)
        if self._state == "first":
            return self._clientFirst(response)
        if self._state == "final":
            return self._clientFinal(response)
        if self._state == "verified":
            if response:
                raise SASLError("unexpected data after the server's final message")
            self._state = "done"
            return Credentials(VerifiedUser(self._username, self.name), self._authzid)
        raise SASLError("exchange already finished")

    def _clientFirst(self, response):
        try:
            text = response.decode("utf-8")
        except UnicodeDecodeError:
            raise SASLError("SCRAM message is not UTF-8")
        cbflag, comma, rest = text.partition(",")
        if not comma:
            raise SASLError("malformed gs2 header")
        if cbflag.startswith("p="):
            raise SASLError("channel binding is not supported")
        if cbflag not in ("n", "y"):
            raise SASLError("malformed gs2 header")
        authzid, comma, bare = rest.partition(",")
        if not comma:
            raise SASLError("malformed gs2 header")
        if authzid:
            if not authzid.startswith("a="):
                raise SASLError("malformed authzid")
            authzid = _saslname(authzid[2:])
        attrs = _attributes(bare)
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r":
            raise SASLError("malformed client-first-message")
        if any(k == "m" for k, _ in attrs):
            raise SASLError("mandatory extensions are not supported")
        username = _saslname(attrs[0][1])
        try:
            username = saslprep(username)
        except ValueError as e:
            raise SASLError(f"bad user name: {e}")
        nonce = attrs[1][1]
        if not username or not nonce or not all("!" <= c <= "~" and c != "," for c in nonce):
            raise SASLError("malformed client-first-message")
        if authzid and authzid != username:
            # Well formed, but not allowed: an authentication failure (as PLAIN's).
            raise SASLAuthenticationFailed(username, "authorization identity differs from authentication identity")
        self._gs2 = text[: len(text) - len(bare)]
        self._clientFirstBare = bare
        self._username = username
        self._authzid = authzid
        self._clientNonce = nonce
        d = defer.maybeDeferred(self._lookup, username)
        d.addCallback(self._serverFirst)
        return d

    def _serverFirst(self, secret):
        if secret is None:
            # An unknown user: the same exchange, with a stable fake salt.
            salt = hmac.digest(self._fakeSaltKey, self._username.encode("utf-8"), "sha256")[:16]
            self._secret = None
            iterations = SCRAM_ITERATIONS
        else:
            self._secret = secret
            salt, iterations = secret.salt, secret.iterations
        self._nonce = self._clientNonce + base64.b64encode(secrets.token_bytes(18)).decode("ascii")
        self._serverFirstMessage = f"r={self._nonce},s={base64.b64encode(salt).decode('ascii')},i={iterations}"
        self._state = "final"
        return Challenge(self._serverFirstMessage.encode("ascii"))

    def _clientFinal(self, response):
        try:
            text = response.decode("ascii")
        except UnicodeDecodeError:
            raise SASLError("SCRAM message is not ASCII")
        attrs = _attributes(text)
        if len(attrs) < 3 or attrs[0][0] != "c" or attrs[1][0] != "r" or attrs[-1][0] != "p":
            raise SASLError("malformed client-final-message")
        try:
            binding = base64.b64decode(attrs[0][1], validate=True)
            proof = base64.b64decode(attrs[-1][1], validate=True)
        except ValueError:
            raise SASLError("invalid base64 in client-final-message")
        if binding != self._gs2.encode("utf-8"):
            raise SASLError("channel binding data does not match")
        if attrs[1][1] != self._nonce:
            raise SASLError("nonce does not match")
        withoutProof = text[: text.rindex(",p=")]
        authMessage = ",".join([self._clientFirstBare, self._serverFirstMessage, withoutProof]).encode("utf-8")
        secret = self._secret
        if secret is None or len(proof) != 32:
            raise SASLAuthenticationFailed(self._username, "invalid proof")
        signature = hmac.digest(secret.storedKey, authMessage, "sha256")
        clientKey = bytes(a ^ b for a, b in zip(proof, signature))
        if not hmac.compare_digest(hashlib.sha256(clientKey).digest(), secret.storedKey):
            raise SASLAuthenticationFailed(self._username, "invalid proof")
        serverSignature = hmac.digest(secret.serverKey, authMessage, "sha256")
        self._state = "verified"
        return Challenge(b"v=" + base64.b64encode(serverSignature))


#: Makes the fake salts of unknown users stable within a process.
_PROCESS_KEY = secrets.token_bytes(32)
