"""
Create many mailplat users in one process, through the same calls that
C{mailplat user add} makes (directory entry with an argon2id hash, store
account with its default mailboxes), with one given hash shared by all of them.

    python bench/_mailplat_users.py CONFIG PASSWORD HASH ADDRESS...

HASH is the argon2id PHC string to store for every one of them (the
harness passes a cheap one: see bench/servers.py).

Exits non-zero on any problem; the harness then falls back to the CLI.
"""

import os
import sys


def main(configPath, password, hashed, addresses):
    from twisted.internet import defer, task

    from mailplat.config import loadConfig
    from mailplat.directory import Directory, normaliseAddress
    from mailplat.interfaces.storage import AccountExists
    from mailplat.platform import Platform

    config = loadConfig(configPath)
    os.makedirs(config.dataDir, exist_ok=True)
    directory = Directory(os.path.join(config.dataDir, "directory.sqlite"))
    addresses = [normaliseAddress(a) for a in addresses]
    for domain in sorted({a.split("@")[1] for a in addresses}):
        if not directory.hasDomain(domain):
            directory.addDomain(domain)
    from argon2 import PasswordHasher
    if not PasswordHasher().verify(hashed, password):
        raise SystemExit("the hash does not match the password")
    for a in addresses:
        if not directory.hasUser(a):
            directory.addUser(a, hashed)

    @defer.inlineCallbacks
    def create(reactor):
        platform = Platform(config, reactor=reactor)
        yield platform.open()
        try:
            for a in addresses:
                try:
                    yield platform.store.createAccount(a)
                except AccountExists:
                    pass
        finally:
            yield platform.close()

    task.react(create)  # exits the process: 0 when every account was created


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
