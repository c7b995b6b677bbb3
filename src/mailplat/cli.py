"""
C{mailplat}: the admin command.

    mailplat [--data DIR | --config FILE] COMMAND ...

    domain add|list|remove DOMAIN
    user   add|list|remove|passwd ADDRESS     (password from stdin when it is not a terminal)
    alias  add ADDRESS TARGET [TARGET...] | list | remove ADDRESS
    queue  list | show ID | flush | retry ID | delete ID | hold ID | release ID
    fsck   [--check-only] [--grace SECONDS]   check the store and queue against their files; repair
    checkconfig                               validate the configuration and every plugin name
    plugins                                   list every extension plugin by kind

It works on the same data as a running server (SQLite in WAL mode allows
both at once).  Every error is one clear line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sqlite3
import sys
import time

EXIT_USAGE = 2
EXIT_ERROR = 1


class CommandError(Exception):
    pass


def _parser():
    p = argparse.ArgumentParser(prog="mailplat", description="Administer a mailplat installation.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", "-c", help="the TOML configuration file")
    p.add_argument("--data", "-d", help="the data directory (default ./mailplat-data, or [server] data of the config)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("domain", help="domains served here").add_subparsers(dest="action", metavar="ACTION")
    d.required = True
    d.add_parser("add", help="serve a domain").add_argument("domain")
    d.add_parser("list", help="list domains")
    d.add_parser("remove", help="stop serving a domain (it must have no users)").add_argument("domain")

    u = sub.add_parser("user", help="user accounts").add_subparsers(dest="action", metavar="ACTION")
    u.required = True
    ua = u.add_parser("add", help="create a user and its mailboxes")
    ua.add_argument("address")
    u.add_parser("list", help="list users")
    u.add_parser("remove", help="remove a user and all its mail").add_argument("address")
    u.add_parser("passwd", help="set a user's password").add_argument("address")

    a = sub.add_parser("alias", help="aliases").add_subparsers(dest="action", metavar="ACTION")
    a.required = True
    aa = a.add_parser("add", help="deliver mail for ADDRESS to the TARGETs")
    aa.add_argument("address")
    aa.add_argument("targets", nargs="+")
    a.add_parser("list", help="list aliases")
    a.add_parser("remove", help="remove an alias").add_argument("address")

    q = sub.add_parser("queue", help="the mail queue").add_subparsers(dest="action", metavar="ACTION")
    q.required = True
    q.add_parser("list", help="list queued messages")
    for name, helptext in (("show", "show one message's envelope and recipients"), ("retry", "try one message now"),
                           ("delete", "delete one message"), ("hold", "hold one message"),
                           ("release", "release a held message")):
        q.add_parser(name, help=helptext).add_argument("id")
    q.add_parser("flush", help="make every queued message due now")

    f = sub.add_parser(
        "fsck",
        help="check that the store's and queue's indexes agree with their files and repair them"
        " (exit 0 when clean, 1 when problems were found)",
    )
    f.add_argument("--check-only", "-n", action="store_true", help="report only; change nothing")
    f.add_argument(
        "--grace", type=float, default=60.0, metavar="SECONDS",
        help="files younger than this are not taken for orphans (a running server may be writing them;"
        " default 60)",
    )

    sub.add_parser("checkconfig", help="validate the configuration and the plugin names")
    sub.add_parser("plugins", help="list the extension plugins")
    return p


def _config(args):
    from dataclasses import replace

    from mailplat.config import defaultConfig, loadConfig

    if args.config:
        config = loadConfig(args.config)
        return replace(config, data=args.data) if args.data else config
    return defaultConfig(args.data)


def _readPassword(prompt="Password: "):
    if sys.stdin.isatty():
        first = getpass.getpass(prompt)
        second = getpass.getpass("Again: ")
        if first != second:
            raise CommandError("the passwords do not match")
        password = first
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CommandError("the password is empty")
    return password


def _run(platformWork, config):
    """Run C{platformWork(platform)} (returning a Deferred) inside a reactor; return its result."""
    from twisted.internet import defer, task

    from mailplat.platform import Platform

    box = {}

    @defer.inlineCallbacks
    def main(reactor):
        try:
            platform = Platform(config, reactor=reactor)
            yield platform.open()
        except Exception as e:
            box["error"] = e
            return
        try:
            box["result"] = yield platformWork(platform)
        except Exception as e:
            box["error"] = e
        finally:
            yield platform.close()

    try:
        task.react(main)
    except SystemExit as e:
        if e.code not in (0, None):
            raise CommandError("the command failed")
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _directory(config):
    from mailplat.directory import Directory

    os.makedirs(config.dataDir, exist_ok=True)
    return Directory(os.path.join(config.dataDir, "directory.sqlite"))


def cmdDomain(args, config, out):
    directory = _directory(config)
    if args.action == "add":
        out(f"added domain {directory.addDomain(args.domain)}")
    elif args.action == "list":
        for d in directory.listDomains():
            out(d)
    elif args.action == "remove":
        directory.removeDomain(args.domain)
        out(f"removed domain {args.domain.lower()}")


def _setScram(directory, address, password, out):
    """Keep the SCRAM-SHA-256 verifier beside the hash (SMTP AUTH SCRAM-SHA-256 needs it)."""
    from mailplat.auth.sasl import scramCredentials

    try:
        secret = scramCredentials(password).toText()
    except ValueError as e:
        out(f"note: SCRAM-SHA-256 is not available for this password ({e}); PLAIN and LOGIN work")
        return
    directory.setScramSecret(address, secret)


def cmdUser(args, config, out):
    from mailplat.auth.passwords import hashPassword
    from mailplat.directory import normaliseAddress
    from mailplat.interfaces.storage import AccountExists, NoSuchAccount

    directory = _directory(config)
    if args.action == "list":
        for u in directory.listUsers():
            out(u)
        return
    address = normaliseAddress(args.address)
    if args.action == "add":
        if directory.hasUser(address):
            raise CommandError(f"user {address} already exists")
        domain = address.split("@")[1]
        if not directory.hasDomain(domain):
            raise CommandError(f"domain {domain} is not served here; add it first with: mailplat domain add {domain}")
        password = _readPassword()
        hashed = hashPassword(password)

        def create(platform):
            d = platform.store.createAccount(address)
            d.addErrback(lambda f: f.trap(AccountExists))
            return d

        _run(create, config)
        directory.addUser(address, hashed)
        _setScram(directory, address, password, out)
        out(f"added user {address}")
    elif args.action == "passwd":
        if not directory.hasUser(address):
            raise CommandError(f"no such user: {address}")
        password = _readPassword("New password: ")
        directory.setPasswordHash(address, hashPassword(password))
        _setScram(directory, address, password, out)
        out(f"changed the password of {address}")
    elif args.action == "remove":
        directory.removeUser(address)

        def delete(platform):
            d = platform.store.deleteAccount(address)
            d.addErrback(lambda f: f.trap(NoSuchAccount))
            return d

        _run(delete, config)
        out(f"removed user {address} and its mail")


def cmdAlias(args, config, out):
    directory = _directory(config)
    if args.action == "add":
        address = directory.addAlias(args.address, args.targets)
        out(f"added alias {address} -> {', '.join(directory.aliasTargets(address))}")
    elif args.action == "list":
        for address, targets in directory.listAliases().items():
            out(f"{address} -> {', '.join(targets)}")
    elif args.action == "remove":
        out(f"removed alias {directory.removeAlias(args.address)}")


def cmdQueue(args, config, out):
    queueActions = {"retry": "retryNow", "delete": "delete", "hold": "hold", "release": "release"}

    def work(platform):
        q = platform.queue
        if args.action == "list":
            return q.listEntries()
        if args.action == "show":
            if not hasattr(q, "details"):
                raise CommandError("this queue plugin cannot show details")
            return q.details(args.id.upper())
        if args.action == "flush":
            return q.retryNow()
        method = getattr(q, queueActions[args.action], None)
        if method is None:
            raise CommandError(f"this queue plugin cannot {args.action}")
        if args.action == "retry" and hasattr(q, "details"):
            # A held message is not tried until it is released: say so.
            def unlessHeld(details):
                if details is None:
                    raise KeyError(args.id)
                return "held" if details[2] else method(args.id.upper())

            from twisted.internet import defer

            d = defer.maybeDeferred(q.details, args.id.upper()).addCallback(unlessHeld)
        else:
            d = method(args.id.upper())

        def missing(f):
            f.trap(KeyError)
            raise CommandError(f"no such queued message: {args.id}")

        return d.addErrback(missing)

    result = _run(work, config)
    if args.action == "list":
        if not result:
            out("the queue is empty")
        for e in result:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.arrival))
            out(f"{e.queueId}  {when}  {e.size:>9}  <{e.envelope.sender}>  pending: {', '.join(e.pending) or '-'}")
    elif args.action == "show":
        if result is None:
            raise CommandError(f"no such queued message: {args.id}")
        entry, rcpts, held, nxt = result
        out(f"id:        {entry.queueId}")
        out(f"arrival:   {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(entry.arrival))}")
        out(f"size:      {entry.size}")
        out(f"sender:    <{entry.envelope.sender}>")
        out(f"client:    {entry.envelope.clientName} [{entry.envelope.clientAddress}]")
        out(f"attempts:  {entry.attempts}")
        out(f"held:      {'yes' if held else 'no'}")
        out(f"next try:  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(nxt))}")
        for address, state, error in rcpts:
            out(f"  {address}: {state}" + (f" ({error})" if error else ""))
    elif args.action == "flush":
        out(f"{result} message(s) due now; a running server picks them up within its poll interval")
    elif args.action == "retry" and result == "held":
        out(f"retry: {args.id.upper()} is held; it is tried once released (mailplat queue release {args.id.upper()})")
    else:
        out(f"{args.action}: {args.id.upper()} done")


def _sqliteDir(choice, config, default):
    if choice.plugin != "sqlite":
        return None
    path = choice.args.get("path", default)
    return os.path.join(config.dataDir, path)


def cmdFsck(args, config, out):
    """Exit status: 0 when everything agrees, 1 when problems were found (and, unless --check-only, repaired)."""
    from mailplat.store.fsck import FsckError, checkQueue, checkStore

    repair = not args.check_only
    reports = []
    targets = [
        ("store", _sqliteDir(config.store, config, "store"), checkStore, "index.sqlite"),
        ("queue", _sqliteDir(config.queue, config, "queue"), checkQueue, "queue.sqlite"),
    ]
    for kind, directory, check, dbName in targets:
        if directory is None:
            out(f"{kind}: plugin {getattr(config, kind).plugin!r} is not the sqlite one; skipped")
            continue
        if kind == "queue" and not os.path.exists(os.path.join(directory, dbName)):
            out(f"{kind}: no queue at {directory}; skipped")
            continue
        try:
            report = check(directory, repair=repair, grace=args.grace)
        except FsckError as e:
            raise CommandError(str(e))
        reports.append(report)
        for line in report.lines():
            out(line)
    problems = sum(len(r.findings) for r in reports)
    if not problems:
        out("fsck: clean")
        return 0
    out(f"fsck: {problems} problem(s) " + ("found (check only: nothing changed)" if not repair else "found and handled"))
    return EXIT_ERROR


def cmdCheckconfig(args, config, out):
    from mailplat.platform import Platform

    platform = Platform(config)
    platform.listeners()
    out(f"{config.source}: OK")


def cmdPlugins(args, config, out):
    from mailplat import plugins

    for kind in plugins.KINDS:
        found = plugins.available(kind)
        out(f"{kind}:")
        if not found:
            out("  (none)")
        for name, p in sorted(found.items()):
            out(f"  {name:<16} {getattr(p, 'description', '')}")


COMMANDS = {
    "domain": cmdDomain,
    "user": cmdUser,
    "alias": cmdAlias,
    "queue": cmdQueue,
    "fsck": cmdFsck,
    "checkconfig": cmdCheckconfig,
    "plugins": cmdPlugins,
}


def main(argv=None, out=None, err=None):
    from mailplat.config import ConfigError
    from mailplat.directory import DirectoryError
    from mailplat.plugins import PluginError

    out = out or (lambda s: print(s))
    err = err or (lambda s: print(s, file=sys.stderr))
    args = _parser().parse_args(argv)
    try:
        config = _config(args)
        status = COMMANDS[args.command](args, config, out)
    except ConfigError as e:
        for line in e.errors:
            err(f"mailplat: {line}")
        return EXIT_ERROR
    except (CommandError, DirectoryError, PluginError) as e:
        err(f"mailplat: {e}")
        return EXIT_ERROR
    except (OSError, sqlite3.Error) as e:
        err(f"mailplat: {e}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        err("mailplat: interrupted")
        return EXIT_ERROR
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
