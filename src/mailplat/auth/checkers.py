"""
Credential checkers: the built-in C{directory} checker verifies argon2id
hashes kept in the L{mailplat.directory.Directory}; C{file} reads a
C{user:hash} file (hashes made by C{mailplat user passwd} or any argon2id
tool).  Hash verification is slow on purpose, so it runs in a thread.
"""

from __future__ import annotations

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.threads import deferToThreadPool

from mailplat.log import Logger
from zope.interface import implementer

from mailplat.auth.passwords import verifyPassword

_log = Logger()


def _username(credentials) -> str:
    name = credentials.username
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return name.strip().lower()


def _password(credentials) -> str:
    pw = credentials.password
    return pw.decode("utf-8", "replace") if isinstance(pw, bytes) else pw


@implementer(ICredentialsChecker)
class DirectoryChecker:
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, directory, reactor):
        self._directory = directory
        self._reactor = reactor

    def requestAvatarId(self, credentials):
        username = _username(credentials)
        password = _password(credentials)

        def check():
            stored = self._directory.getPasswordHash(username)
            if stored is None or not verifyPassword(stored, password):
                raise UnauthorizedLogin("bad user name or password")
            return username

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), check)


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """Lines of C{user:argon2id-hash}; C{#} starts a comment.  Read at each check."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path, reactor):
        self._path = path
        self._reactor = reactor

    def _load(self):
        users = {}
        with open(self._path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#") or ":" not in line:
                    continue
                user, _, hashed = line.partition(":")
                users[user.strip().lower()] = hashed.strip()
        return users

    def requestAvatarId(self, credentials):
        username = _username(credentials)
        password = _password(credentials)

        def check():
            stored = self._load().get(username)
            if stored is None or not verifyPassword(stored, password):
                raise UnauthorizedLogin("bad user name or password")
            return username

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), check)


from twisted.plugin import IPlugin  # noqa: E402

from mailplat.interfaces.auth import ICheckerFactory  # noqa: E402


@implementer(IPlugin, ICheckerFactory)
class DirectoryCheckerFactory:
    name = "directory"
    description = "Users and argon2id password hashes from the embedded directory (mailplat user add)."

    def build(self, args, context):
        if args:
            raise ValueError(f"checker 'directory' takes no arguments (got: {', '.join(sorted(args))})")
        return DirectoryChecker(context.directory, context.reactor)


@implementer(IPlugin, ICheckerFactory)
class PasswordFileCheckerFactory:
    name = "file"
    description = "A file of user:argon2id-hash lines (args: path)."

    def build(self, args, context):
        import os

        unknown = set(args) - {"path"}
        if unknown:
            raise ValueError(f"unknown argument(s): {', '.join(sorted(unknown))}; known: path")
        path = args.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("checker 'file' needs args.path")
        path = os.path.join(context.dataDir, path)
        if not os.path.isfile(path):
            raise ValueError(f"checker 'file': no such file: {path}")
        return PasswordFileChecker(path, context.reactor)
