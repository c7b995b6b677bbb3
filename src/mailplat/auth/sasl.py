"""
SASL mechanisms (RFC 4422), shared by SMTP AUTH, IMAP AUTHENTICATE and POP3
AUTH.  A protocol asks L{Registry.create} for a fresh mechanism object per
exchange and feeds it the client's decoded responses; the mechanism answers
with a L{Challenge} or, at the end, L{Credentials} for the cred portal.

Built in: PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login).  Both send
the password in the clear, so protocols offer them only over TLS (or on a
loopback-only listener) — see L{Registry.available}.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.cred.credentials import UsernamePassword
from zope.interface import implementer

from mailplat.interfaces.auth import ISASLMechanism


class SASLError(Exception):
    """The client's response is malformed; the exchange fails (not an auth failure)."""


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

    def __init__(self):
        self._started = False

    def step(self, response: bytes):
        if not response and not self._started:
            self._started = True
            return Challenge(b"")
        parts = response.split(b"\x00")
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
            # would need a policy to allow it.
            raise SASLError("authorization identity differs from authentication identity")
        return Credentials(UsernamePassword(authcid.encode("utf-8"), passwd.encode("utf-8")), authzid)


@implementer(ISASLMechanism)
class Login:
    """The LOGIN mechanism: two challenges, C{Username:} and C{Password:}."""

    name = "LOGIN"
    plaintext = True

    def __init__(self):
        self._user = None
        self._asked = False

    def step(self, response: bytes):
        if self._user is None:
            if not response and not self._asked:
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
    """The mechanisms a platform offers, by name."""

    def __init__(self, mechanisms=(Plain, Login)):
        self._mechanisms = {m.name: m for m in mechanisms}

    def register(self, mechanismClass):
        self._mechanisms[mechanismClass.name.upper()] = mechanismClass

    def names(self):
        return list(self._mechanisms)

    def available(self, secure: bool):
        """Names to advertise: plaintext mechanisms only when C{secure}."""
        return [n for n, m in self._mechanisms.items() if secure or not getattr(m, "plaintext", False)]

    def create(self, name: str):
        """A fresh mechanism object, or C{None} for an unknown name."""
        cls = self._mechanisms.get(name.upper())
        return cls() if cls is not None else None
