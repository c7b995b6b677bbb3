"""
The embedded directory: the domains mailplat serves, its users (with their
argon2id password hashes) and aliases, in one SQLite file
(C{DATA/directory.sqlite}).

It is what the built-in C{directory} checker and router read and what the
C{mailplat domain|user|alias} commands write.  The methods here are
synchronous and thread-safe; the server calls them from its thread pool, the
admin command calls them directly, and both may run at the same time (SQLite
in WAL mode).  An LDAP directory replaces it through the checker and router
extension points.
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
import threading

_SCHEMA = """
CREATE TABLE IF NOT EXISTS domains (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS users (
    address TEXT PRIMARY KEY,
    password TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS scram (
    address TEXT PRIMARY KEY,
    secret TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS aliases (
    address TEXT NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (address, target)
);
"""

_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")


class DirectoryError(ValueError):
    """A request the directory refuses; the message is for the operator."""


@functools.lru_cache(maxsize=4096)
def normaliseDomain(domain: str) -> str:
    d = domain.strip().rstrip(".").lower()
    try:
        d = d.encode("idna").decode("ascii")
    except UnicodeError:
        raise DirectoryError(f"not a valid domain name: {domain!r}")
    if not _DOMAIN.match(d):
        raise DirectoryError(f"not a valid domain name: {domain!r}")
    return d


def splitAddress(address: str) -> tuple[str, str]:
    """Split C{local@domain}; the domain is normalised, the local part kept."""
    if address.count("@") != 1:
        raise DirectoryError(f"not an address of the form user@domain: {address!r}")
    local, domain = address.strip().split("@")
    if not _LOCAL.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        raise DirectoryError(f"not a valid local part: {local!r}")
    return local, normaliseDomain(domain)


def normaliseAddress(address: str) -> str:
    local, domain = splitAddress(address)
    return f"{local.lower()}@{domain}"


class Directory:
    def __init__(self, path: str):
        self.path = path
        self._local = threading.local()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._db()._db.executescript(_SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    def _db(self) -> "_Tx":
        """A write transaction (BEGIN IMMEDIATE)."""
        return _Tx(self._connection())

    def _read(self) -> "_Tx":
        """A read transaction: takes no lock, never waits for writers (WAL)."""
        return _Tx(self._connection(), "BEGIN")

    def dataVersion(self) -> int:
        """Changes whenever another connection commits a change (for caches)."""
        return self._connection().execute("PRAGMA data_version").fetchone()[0]

    def snapshot(self) -> "DirectorySnapshot":
        """Everything routing needs, read in one transaction."""
        with self._read() as db:
            version = db.execute("PRAGMA data_version").fetchone()[0]
            domains = {r[0] for r in db.execute("SELECT name FROM domains")}
            users = {r[0] for r in db.execute("SELECT address FROM users")}
            aliases: dict[str, list[str]] = {}
            for a, t in db.execute("SELECT address, target FROM aliases ORDER BY address, target"):
                aliases.setdefault(a, []).append(t)
        return DirectorySnapshot(version, frozenset(domains), frozenset(users), aliases)

    # domains

    def addDomain(self, domain: str) -> str:
        d = normaliseDomain(domain)
        with self._db() as db:
            if db.execute("SELECT 1 FROM domains WHERE name=?", (d,)).fetchone():
                raise DirectoryError(f"domain {d} already exists")
            db.execute("INSERT INTO domains VALUES (?)", (d,))
        return d

    def removeDomain(self, domain: str) -> None:
        d = normaliseDomain(domain)
        with self._db() as db:
            users = db.execute("SELECT COUNT(*) FROM users WHERE address LIKE ?", ("%@" + d,)).fetchone()[0]
            if users:
                raise DirectoryError(f"domain {d} still has {users} user(s); remove them first")
            if not db.execute("DELETE FROM domains WHERE name=?", (d,)).rowcount:
                raise DirectoryError(f"no such domain: {d}")
            db.execute("DELETE FROM aliases WHERE address LIKE ?", ("%@" + d,))

    def listDomains(self) -> list[str]:
        with self._read() as db:
            return [r[0] for r in db.execute("SELECT name FROM domains ORDER BY name")]

    def hasDomain(self, domain: str) -> bool:
        try:
            d = normaliseDomain(domain)
        except DirectoryError:
            return False
        with self._read() as db:
            return db.execute("SELECT 1 FROM domains WHERE name=?", (d,)).fetchone() is not None

    # users

    def addUser(self, address: str, passwordHash: str) -> str:
        a = normaliseAddress(address)
        domain = a.split("@")[1]
        with self._db() as db:
            if not db.execute("SELECT 1 FROM domains WHERE name=?", (domain,)).fetchone():
                raise DirectoryError(f"domain {domain} is not served here; add it first with: mailplat domain add {domain}")
            if db.execute("SELECT 1 FROM users WHERE address=?", (a,)).fetchone():
                raise DirectoryError(f"user {a} already exists")
            if db.execute("SELECT 1 FROM aliases WHERE address=?", (a,)).fetchone():
                raise DirectoryError(f"{a} is an alias; remove the alias first")
            db.execute("INSERT INTO users VALUES (?, ?)", (a, passwordHash))
        return a

    def removeUser(self, address: str) -> str:
        a = normaliseAddress(address)
        with self._db() as db:
            if not db.execute("DELETE FROM users WHERE address=?", (a,)).rowcount:
                raise DirectoryError(f"no such user: {a}")
            db.execute("DELETE FROM scram WHERE address=?", (a,))
        return a

    def setScramSecret(self, address: str, secret: str) -> str:
        """
        Keep the SCRAM-SHA-256 verifier of a user (the text form of
        L{mailplat.auth.sasl.ScramSecret}: salt, iterations, StoredKey,
        ServerKey — never the password), written with every password.
        """
        a = normaliseAddress(address)
        with self._db() as db:
            if not db.execute("SELECT 1 FROM users WHERE address=?", (a,)).fetchone():
                raise DirectoryError(f"no such user: {a}")
            db.execute("INSERT OR REPLACE INTO scram VALUES (?, ?)", (a, secret))
        return a

    def getScramSecret(self, address: str):
        """The SCRAM-SHA-256 verifier text of a user, or C{None}."""
        try:
            a = normaliseAddress(address)
        except DirectoryError:
            return None
        with self._read() as db:
            row = db.execute("SELECT secret FROM scram WHERE address=?", (a,)).fetchone()
        return row[0] if row else None

    def setPasswordHash(self, address: str, passwordHash: str) -> str:
        a = normaliseAddress(address)
        with self._db() as db:
            if not db.execute("UPDATE users SET password=? WHERE address=?", (passwordHash, a)).rowcount:
                raise DirectoryError(f"no such user: {a}")
            # A SCRAM verifier of the old password must not outlive it.
            db.execute("DELETE FROM scram WHERE address=?", (a,))
        return a

    def getPasswordHash(self, address: str):
        try:
            a = normaliseAddress(address)
        except DirectoryError:
            return None
        with self._read() as db:
            row = db.execute("SELECT password FROM users WHERE address=?", (a,)).fetchone()
        return row[0] if row else None

    def hasUser(self, address: str) -> bool:
        try:
            a = normaliseAddress(address)
        except DirectoryError:
            return False
        with self._read() as db:
            return db.execute("SELECT 1 FROM users WHERE address=?", (a,)).fetchone() is not None

    def listUsers(self) -> list[str]:
        with self._read() as db:
            return [r[0] for r in db.execute("SELECT address FROM users ORDER BY address")]

    # aliases

    def addAlias(self, address: str, targets) -> str:
        a = normaliseAddress(address)
        domain = a.split("@")[1]
        targets = [normaliseAddress(t) for t in targets]
        if not targets:
            raise DirectoryError("an alias needs at least one target")
        with self._db() as db:
            if not db.execute("SELECT 1 FROM domains WHERE name=?", (domain,)).fetchone():
                raise DirectoryError(f"domain {domain} is not served here; add it first with: mailplat domain add {domain}")
            if db.execute("SELECT 1 FROM users WHERE address=?", (a,)).fetchone():
                raise DirectoryError(f"{a} is a user; an alias cannot shadow it")
            for t in targets:
                db.execute("INSERT OR IGNORE INTO aliases VALUES (?, ?)", (a, t))
        return a

    def removeAlias(self, address: str) -> str:
        a = normaliseAddress(address)
        with self._db() as db:
            if not db.execute("DELETE FROM aliases WHERE address=?", (a,)).rowcount:
                raise DirectoryError(f"no such alias: {a}")
        return a

    def listAliases(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        with self._read() as db:
            for a, t in db.execute("SELECT address, target FROM aliases ORDER BY address, target"):
                out.setdefault(a, []).append(t)
        return out

    def aliasTargets(self, address: str) -> list[str]:
        with self._read() as db:
            return [r[0] for r in db.execute("SELECT target FROM aliases WHERE address=? ORDER BY target", (address,))]


class DirectorySnapshot:
    """
    The routing data at one moment, in memory: answers the same questions as
    L{Directory} (C{hasDomain}, C{hasUser}, C{aliasTargets}) without touching
    the disk.
    """

    def __init__(self, version, domains, users, aliases):
        self.version = version
        self.domains = domains
        self.users = users
        self.aliases = aliases

    def hasDomain(self, domain):
        try:
            return normaliseDomain(domain) in self.domains
        except DirectoryError:
            return False

    def hasUser(self, address):
        try:
            return normaliseAddress(address) in self.users
        except DirectoryError:
            return False

    def aliasTargets(self, address):
        return list(self.aliases.get(address, ()))


class _Tx:
    """A connection used as one transaction (BEGIN IMMEDIATE, or the given BEGIN, .. COMMIT/ROLLBACK)."""

    def __init__(self, db, begin="BEGIN IMMEDIATE"):
        self._db = db
        self._begin = begin

    def __enter__(self):
        self._db.execute(self._begin)
        return self._db

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")
        return False
