"""
Embedding mailplat in your own Twisted application.

This program builds a mailplat L{Platform} in code (no config file), puts
its SMTP and IMAP listeners into its *own* service tree next to a service of
its own (a timer that logs how many messages arrived), and runs it::

    python examples/embed.py --data ./embedded-data --smtp 10025 --imap 10143

It also creates the domain and user it needs on first start, so that this
works from a clean directory::

    swaks --server 127.0.0.1:10025 --to demo@embedded.example
    curl -u demo@embedded.example:demo-password imap://127.0.0.1:10143/INBOX
"""

import argparse
import sys

from twisted.application import service, strports
from twisted.application.internet import TimerService
from twisted.internet import defer, reactor
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

from mailplat.auth.passwords import hashPassword
from mailplat.config import Config
from mailplat.platform import Platform

log = Logger()


def buildApplication(data, smtpPort, imapPort, user, password):
    platform = Platform(Config(data=data, hostname="embedded.example"), reactor=reactor)

    # Domains, users and aliases live in the platform's directory.
    domain = user.split("@")[1]
    if not platform.directory.hasDomain(domain):
        platform.directory.addDomain(domain)

    root = service.MultiService()

    # The store and queue are opened by this service; the queue runner
    # delivers what SMTP accepted.
    class Storage(service.Service):
        @defer.inlineCallbacks
        def startService(self):
            service.Service.startService(self)
            yield platform.open()
            if not platform.directory.hasUser(user):
                yield platform.store.createAccount(user)
                platform.directory.addUser(user, hashPassword(password))
                log.info("created {user}", user=user)

        def stopService(self):
            service.Service.stopService(self)
            return platform.close()

    Storage().setServiceParent(root)
    platform.queueRunner().setServiceParent(root)
    strports.service(f"tcp:{smtpPort}:interface=127.0.0.1", platform.smtpFactory("mx")).setServiceParent(root)
    strports.service(f"tcp:{imapPort}:interface=127.0.0.1", platform.imapFactory()).setServiceParent(root)

    # Something of the application's own, beside mailplat's parts.
    def report():
        log.info("messages received so far: {n}", n=int(platform.metrics.get("mailplat_messages_received_total")))

    TimerService(60, report).setServiceParent(root)
    return root


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="./embedded-data")
    p.add_argument("--smtp", type=int, default=10025)
    p.add_argument("--imap", type=int, default=10143)
    p.add_argument("--user", default="demo@embedded.example")
    p.add_argument("--password", default="demo-password")
    args = p.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    root = buildApplication(args.data, args.smtp, args.imap, args.user, args.password)
    root.startService()
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
