"""SMTP AUTH with CRAM-MD5 and SCRAM-SHA-256 (mailplat.auth.sasl) through the SMTP session."""

import base64
import hashlib
import hmac

import pytest
from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from zope.interface import implementer
from twisted.cred.portal import Portal
from twisted.internet import defer

from mailplat.auth.realm import MailRealm
from mailplat.auth.sasl import (
    CramMD5, Registry, ScramSecret, ScramSHA256, VerifiedUserChecker, saslprep, scramCredentials,
)
from test_smtp_server import b64, start

LOOPBACK = dict(peer="127.0.0.1", host="127.0.0.1", authOnMX=True)


def cramSession():
    checker = InMemoryUsernamePasswordDatabaseDontUse(**{"alice@example.org": b"secret"})
    portal = Portal(MailRealm(), [checker])
    s = start(sasl=Registry((CramMD5,)), **LOOPBACK)
    s.factory.portal = portal
    return s


@implementer(ICredentialsChecker)
class HashOnlyChecker:
    """Like the directory checker: it can check a password, not an HMAC of one."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials):
        return defer.fail(UnauthorizedLogin())


def test_cram_md5_offered_only_when_a_checker_can_verify_it():
    s = start(sasl=Registry((CramMD5,)), **LOOPBACK)
    s.factory.portal = Portal(MailRealm(), [HashOnlyChecker()])
    assert not any(l.startswith("AUTH") for l in s.ehlo())
    assert s.cmd("AUTH CRAM-MD5") == (504, ["5.5.4 Unrecognized authentication type"])
    s = cramSession()
    assert "AUTH CRAM-MD5" in s.ehlo()


@pytest.mark.parametrize("password,expected", [("secret", 235), ("wrong", 535)])
def test_cram_md5_exchange(password, expected):
    s = cramSession()
    s.ehlo()
    code, (challenge,) = s.cmd("AUTH CRAM-MD5")
    assert code == 334
    digest = hmac.new(password.encode(), base64.b64decode(challenge), hashlib.md5).hexdigest()
    s.send(b64(f"alice@example.org {digest}".encode()) + "\r\n")
    if expected == 535:
        s.clock.advance(1)
    ((code, _),) = s.replies()
    assert code == expected


def test_cram_md5_malformed():
    s = cramSession()
    s.ehlo()
    s.cmd("AUTH CRAM-MD5")
    assert s.cmd(b64(b"alice nothex")) == (501, ["5.5.2 Malformed authentication response"])


# -- SCRAM-SHA-256 ---------------------------------------------------------------------------


class ScramClient:
    """A minimal RFC 5802 client (what Dovecot, Cyrus, gsasl do)."""

    def __init__(self, user, password, nonce="rOprNGfwEbeRWgbNEkqO", authzid=""):
        self.user, self.password, self.nonce = user, password, nonce
        self.gs2 = f"n,{'a=' + authzid if authzid else ''},"

    def first(self):
        self.bare = f"n={self.user},r={self.nonce}"
        return (self.gs2 + self.bare).encode()

    def final(self, serverFirst: bytes):
        self.serverFirst = serverFirst.decode()
        attrs = dict(kv.split("=", 1) for kv in self.serverFirst.split(","))
        salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
        clientKey = hmac.digest(salted, b"Client Key", "sha256")
        stored = hashlib.sha256(clientKey).digest()
        withoutProof = f"c={base64.b64encode(self.gs2.encode()).decode()},r={attrs['r']}"
        self.auth = f"{self.bare},{self.serverFirst},{withoutProof}".encode()
        proof = bytes(a ^ b for a, b in zip(clientKey, hmac.digest(stored, self.auth, "sha256")))
        self.serverKey = hmac.digest(salted, b"Server Key", "sha256")
        return f"{withoutProof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, serverFinal: bytes):
        return serverFinal == b"v=" + base64.b64encode(hmac.digest(self.serverKey, self.auth, "sha256"))


SECRETS = {"alice@example.org": scramCredentials("pencil", iterations=4096)}


def scramSession(lookupLater=False):
    lookups = []

    def lookup(name):
        if lookupLater:
            d = defer.Deferred()
            lookups.append((d, SECRETS.get(name)))
            return d
        return SECRETS.get(name)

    s = start(sasl=Registry((ScramSHA256.factory(lookup),)), **LOOPBACK)
    s.factory.portal.registerChecker(VerifiedUserChecker())
    return s, lookups


@pytest.mark.parametrize("initial", [True, False])
def test_scram_sha_256_success(initial):
    s, _ = scramSession()
    assert "AUTH SCRAM-SHA-256" in s.ehlo()
    c = ScramClient("alice@example.org", "pencil")
    if initial:
        code, (challenge,) = s.cmd("AUTH SCRAM-SHA-256 " + b64(c.first()))
    else:
        assert s.cmd("AUTH SCRAM-SHA-256") == (334, [""])
        code, (challenge,) = s.cmd(b64(c.first()))
    assert code == 334
    code, (final,) = s.cmd(b64(c.final(base64.b64decode(challenge))))
    assert code == 334 and c.verify(base64.b64decode(final))
    assert s.cmd("") == (235, ["2.7.0 Authentication successful"])
    assert s.proto._user == "alice@example.org"


def test_scram_lookup_answering_later_keeps_replies_in_order():
    s, lookups = scramSession(lookupLater=True)
    s.ehlo()
    c = ScramClient("alice@example.org", "pencil")
    s.send("AUTH SCRAM-SHA-256 " + b64(c.first()) + "\r\n")
    assert s.replies() == []
    d, secret = lookups.pop()
    d.callback(secret)
    ((code, (challenge,)),) = s.replies()
    assert code == 334


@pytest.mark.parametrize("user,password", [("alice@example.org", "wrong"), ("nobody@example.org", "pencil")])
def test_scram_wrong_password_or_unknown_user_fails_alike(user, password):
    s, _ = scramSession()
    s.ehlo()
    c = ScramClient(user, password)
    code, (challenge,) = s.cmd("AUTH SCRAM-SHA-256 " + b64(c.first()))
    assert code == 334
    assert b",s=" in base64.b64decode(challenge)
    s.send(b64(c.final(base64.b64decode(challenge))) + "\r\n")
    s.clock.advance(1)
    assert s.replies() == [(535, ["5.7.8 Authentication credentials invalid"])]
    assert s.proto._user == ""


def test_scram_refuses_channel_binding_other_authzid_and_tampering():
    s, _ = scramSession()
    s.ehlo()
    assert s.cmd("AUTH SCRAM-SHA-256 " + b64(b"p=tls-unique,,n=alice@example.org,r=abc"))[0] == 501
    # Another authorization identity is well formed but not allowed: an
    # authentication failure, as with PLAIN (RFC 4954 §4: 535, not 501).
    c = ScramClient("alice@example.org", "pencil", authzid="bob@example.org")
    s.send("AUTH SCRAM-SHA-256 " + b64(c.first()) + "\r\n")
    s.clock.advance(1)
    assert s.replies() == [(535, ["5.7.8 Authentication credentials invalid"])]
    c = ScramClient("alice@example.org", "pencil")
    code, (challenge,) = s.cmd("AUTH SCRAM-SHA-256 " + b64(c.first()))
    final = c.final(base64.b64decode(challenge)).replace(b"r=rOpr", b"r=XXXX")
    assert s.cmd(b64(final))[0] == 501


def test_scram_secret_round_trip_and_rfc7677_vector():
    # RFC 7677 §3: user "user", password "pencil", salt and iterations as given.
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    secret = scramCredentials("pencil", salt=salt, iterations=4096)
    assert ScramSecret.fromText(secret.toText()) == secret
    m = ScramSHA256(lambda name: secret)
    m.step(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
    m._nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    m._serverFirstMessage = "r=" + m._nonce + ",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    result = m.step(
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    assert result.data == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_saslprep():
    assert saslprep("I\u00adX") == "IX"
    assert saslprep("\u00aa") == "a"
    assert saslprep("user\u00a0name") == "user name"
    with pytest.raises(ValueError):
        saslprep("\u0007")


def test_plain_still_works_with_the_extended_registry():
    s = start(sasl=Registry().copy(), **LOOPBACK)
    s.ehlo()
    s.login()


def test_empty_initial_response_differs_from_none():
    """RFC 4422 §5: "=" (an empty initial response) is not the absence of one."""
    s, _ = scramSession()
    s.ehlo()
    assert s.cmd("AUTH SCRAM-SHA-256 =") == (501, ["5.5.2 Malformed authentication response"])
    assert s.cmd("AUTH SCRAM-SHA-256") == (334, [""])
    s = cramSession()
    s.ehlo()
    assert s.cmd("AUTH CRAM-MD5 =") == (501, ["5.5.2 Malformed authentication response"])
    assert s.cmd("AUTH CRAM-MD5")[0] == 334
