"""
The L{Platform}: every part of a mail server built from one L{Config}, and
the service tree that runs them.

Embedders use it directly::

    platform = Platform(parseConfig(text), reactor=reactor)
    platform.makeService(roles=("smtp", "imap")).setServiceParent(application)

or take single factories (C{platform.smtpFactory("mx")},
C{platform.imapFactory()}, ...) and listen on them however they like.

Construction order: directory, store, queue, checkers and portal, router,
hooks, processors, converters — each plugin built with a
L{PluginContext} holding what was built before it.  Every plugin name is
looked up (and every unknown name reported) before anything listens.
"""

from __future__ import annotations

import os

from twisted.application import service, strports
from twisted.cred.portal import Portal
from twisted.internet import defer

from mailplat.log import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailplat import plugins
from mailplat.auth.realm import MailRealm
from mailplat.auth.sasl import Registry
from mailplat.config import Config, PluginChoice, defaultConfig
from mailplat.directory import Directory
from mailplat.interfaces import PluginContext
from mailplat.interfaces.conversion import IConverter
from mailplat.interfaces.hooks import ISMTPHook
from mailplat.interfaces.processing import IMessageProcessor
from mailplat.interfaces.queue import IQueue
from mailplat.interfaces.routing import IRouter
from mailplat.interfaces.storage import IMessageStore
from mailplat.metrics import Metrics

_log = Logger()

PluginChoiceText = PluginChoice("text")

ROLES = ("smtp", "imap", "pop3", "http")


class Platform:
    def __init__(self, config: Config | None = None, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config if config is not None else defaultConfig()
        from mailplat import log

        log.setLevel(self.config.log_level)
        self.dataDir = self.config.dataDir
        os.makedirs(self.dataDir, exist_ok=True)
        self.metrics = Metrics()
        self.sasl = Registry()
        self.directory = Directory(os.path.join(self.dataDir, "directory.sqlite"))
        context = self.context = PluginContext(
            dataDir=self.dataDir, reactor=reactor, hostname=self.config.hostname, directory=self.directory
        )
        errors = []

        def attempt(f, default=None):
            try:
                return f()
            except plugins.PluginError as e:
                errors.append(str(e))
                return default

        self.store = attempt(lambda: plugins.build("store", self.config.store, context, IMessageStore))
        context.store = self.store
        self.queue = attempt(lambda: plugins.build("queue", self.config.queue, context, IQueue))
        context.extra["queue"] = self.queue
        checkers = [attempt(lambda c=c: plugins.build("checker", c, context)) for c in self.config.checkers]
        self.portal = Portal(MailRealm(), [c for c in checkers if c is not None])
        self.router = attempt(lambda: plugins.build("router", self.config.router, context, IRouter))
        context.extra["router"] = self.router
        self.hooks = [attempt(lambda c=c: plugins.build("hook", c, context, ISMTPHook)) for c in self.config.hooks]
        self.processors = [
            attempt(lambda c=c: plugins.build("processor", c, context, IMessageProcessor)) for c in self.config.processors
        ]
        from mailplat.mime.convert import Registry as ConverterRegistry

        # Converters named in the config first, then the built-in ones: the
        # first registered for a (source, target) pair wins.
        self.converters = ConverterRegistry()
        for c in tuple(self.config.converters) + (PluginChoiceText,):
            built = attempt(lambda c=c: plugins.build("converter", c, context, IConverter), [])
            for converter in built if isinstance(built, (list, tuple)) else [built]:
                self.converters.register(converter)
        if errors:
            raise plugins.PluginError("\n".join(errors))
        self._tls = None
        self._opened = None
        self._withQueue = True  # whether open() opened the queue (close() closes what it opened)
        #: The queue runner of L{makeService} (SMTP role), when there is one.
        self.runner = None
        #: The running L{mailplat.workers.WorkerPool}s (they add themselves).
        self.workerPools = []

    # --- parts --------------------------------------------------------------

    @property
    def allowInsecureAuth(self):
        return {"always": True, "tls": False, "loopback": None}[self.config.plaintext_auth]

    def tlsContextFactory(self):
        """The server TLS context: configured files, or a generated self-signed pair."""
        if self._tls is None:
            from mailplat.tls import ReloadableServerContext, ensureCertificate

            if self.config.certificate:
                cert, key = self.config.certificate, self.config.key
            else:
                cert, key = ensureCertificate(self.dataDir, self.config.hostname)
            self._tls = ReloadableServerContext(cert, key)
        return self._tls

    def reloadTLS(self) -> bool:
        """
        Re-read the TLS certificate and key (SIGHUP): new connections use
        them.  A pair that cannot be loaded is logged and the current one
        kept; returns whether the new pair is in use.
        """
        if self._tls is None:
            self.tlsContextFactory()
            return True
        try:
            self._tls.reload()
        except Exception:
            _log.failure("TLS reload failed; keeping the current certificate ({cert})", cert=self._tls.certPath)
            return False
        _log.info("TLS certificate reloaded from {cert}", cert=self._tls.certPath)
        return True

    def hangup(self):
        """What SIGHUP does: reload the TLS pair here and in every worker process."""
        self.reloadTLS()
        for pool in self.workerPools:
            pool.signalWorkers("HUP")

    def open(self, queue=True):
        """
        Open the store and (unless C{queue} is false: a process without the
        SMTP role, which never queues mail) the queue, once; fires when
        both are ready.
        """
        if self._opened is None:
            self._withQueue = queue
            parts = [self.store.open()] + ([self.queue.open()] if queue else [])
            self._opened = defer.gatherResults(parts, consumeErrors=True)
        return self._opened

    @defer.inlineCallbacks
    def close(self):
        parts = [self.store.close()] + ([self.queue.close()] if self._withQueue else [])
        yield defer.gatherResults(parts, consumeErrors=True)

    def smtpFactory(self, role="mx"):
        from mailplat.smtp.server import SMTPFactory

        c = self.config.smtp
        return SMTPFactory(
            hostname=self.config.hostname, portal=self.portal, router=self.router, queue=self.smtpQueue(),
            sasl=self.smtpSASL(), tlsContextFactory=self.tlsContextFactory(), role=role, hooks=self.hooks,
            maxMessageSize=c.max_message_size, maxRecipients=c.max_recipients,
            allowInsecureAuth=self.allowInsecureAuth, metrics=self.metrics, reactor=self.reactor,
            idleTimeout=c.idle_timeout, **({"authOnMX": True} if (role == "mx" and c.auth_on_mx) else {}),
            maxLineLength=c.max_line_length, maxTextLineLength=c.max_text_line_length,
            maxMessagesPerConnection=c.max_messages_per_connection, maxErrors=c.max_errors,
            maxAuthFailures=c.max_auth_failures, normaliseBareLineEndings=c.bare_line_endings == "normalise",
            eightBitHeaders=c.accept_8bit_headers,
        )

    def smtpQueue(self):
        """
        What SMTP sessions queue mail into: the queue, behind direct
        delivery (L{mailplat.queue.direct}) unless C{[smtp] direct_delivery}
        is off or message processors are configured (they run in the queue
        runner).
        """
        if not self.config.smtp.direct_delivery or self.processors:
            return self.queue
        from mailplat.queue.direct import DirectDelivery

        return DirectDelivery(self.queue, self.store, self.metrics)

    def smtpSASL(self):
        """
        The SMTP AUTH mechanisms: the shared ones, CRAM-MD5 (offered only
        when a checker can verify it) and, with the directory checker,
        SCRAM-SHA-256 against the verifiers the directory keeps.
        """
        if getattr(self, "_smtpSASL", None) is None:
            from twisted.internet.threads import deferToThreadPool

            from mailplat.auth.sasl import CramMD5, ScramSecret, ScramSHA256, VerifiedUserChecker

            registry = self.sasl.copy()
            registry.register(CramMD5)
            if any(c.plugin == "directory" for c in self.config.checkers):
                directory, reactor = self.directory, self.reactor

                def lookup(username):
                    def get():
                        text = directory.getScramSecret(username)
                        return ScramSecret.fromText(text) if text else None

                    return deferToThreadPool(reactor, reactor.getThreadPool(), get)

                registry.register(ScramSHA256.factory(lookup))
                self.portal.registerChecker(VerifiedUserChecker())
            self._smtpSASL = registry
        return self._smtpSASL

    def imapFactory(self):
        from mailplat.imap.server import IMAPFactory
        from mailplat.imap.shared import SharedNamespace

        return IMAPFactory(
            hostname=self.config.hostname, portal=self.portal, store=self.store, sasl=self.sasl,
            tlsContextFactory=self.tlsContextFactory(), allowInsecureAuth=self.allowInsecureAuth,
            metrics=self.metrics, reactor=self.reactor, idleTimeout=self.config.imap.idle_timeout,
            shared=SharedNamespace(self.config.imap.shared_prefix, self.config.imap.shared),
        )

    def pop3Factory(self):
        from mailplat.pop3.server import POP3Factory

        return POP3Factory(
            hostname=self.config.hostname, portal=self.portal, store=self.store, sasl=self.sasl,
            tlsContextFactory=self.tlsContextFactory(), allowInsecureAuth=self.allowInsecureAuth,
            metrics=self.metrics, reactor=self.reactor, idleTimeout=self.config.pop3.idle_timeout,
        )

    def httpSite(self):
        from mailplat.http.site import makeSite

        return makeSite(metrics=self.metrics, health=self.health)

    def health(self):
        return {"store": self._opened is not None and self._opened.called}

    def implicitTLS(self, factory):
        """Wrap a protocol factory so its connections start with TLS (ports 465, 993, 995)."""
        return TLSMemoryBIOFactory(self.tlsContextFactory(), False, factory)

    def queueRunner(self, scan=True):
        """
        The queue runner; with C{scan} false (an SMTP worker process), one
        that only delivers the local mail handed to it (L{QueueRunner.take})
        and never scans the queue or sends mail out.
        """
        from mailplat.queue.notify import Notifier
        from mailplat.queue.runner import QueueRunner

        o = self.config.outbound
        return QueueRunner(self.queue, self.store, self.processors, reactor=self.reactor, metrics=self.metrics,
                           retrySchedule=self.config.retry_schedule,
                           outbound=self.outboundTransport() if (o.enabled and scan) else None,
                           notifier=Notifier(self.queue, self.router, self.config.hostname, self.reactor),
                           maxLifetime=o.max_lifetime, delayWarning=o.delay_warning, scan=scan)

    def outboundTransport(self):
        """The SMTP transport to other servers, built from C{[outbound]}."""
        if getattr(self, "_outbound", None) is None:
            from mailplat.dns import MailResolver
            from mailplat.outbound.transport import DomainPolicy, OutboundSettings, OutboundTransport

            o = self.config.outbound
            servers = []
            for entry in o.dns_servers:
                host, sep, port = entry.rpartition(":")
                servers.append((host.strip("[]"), int(port)) if sep else (entry, 53))
            password = ""
            if o.smarthost_password_file:
                with open(o.smarthost_password_file, encoding="utf-8") as f:
                    password = f.read().strip()
            settings = OutboundSettings(
                heloName=self.config.hostname, port=o.port, smarthost=o.smarthost, smarthostUser=o.smarthost_user,
                smarthostPassword=password, tls=o.tls,
                domains={d: DomainPolicy(tls=v["tls"], route=v["route"]) for d, v in o.domains.items()},
                connectTimeout=o.connect_timeout, perDestination=o.per_destination,
                ownAddresses=frozenset(self._ownSMTPAddresses()), ownNames=frozenset({self.config.hostname.lower()}),
            )
            resolver = MailResolver(servers=servers or None, reactor=self.reactor)
            self._outbound = OutboundTransport(resolver, settings, self.reactor)
        return self._outbound

    def _ownSMTPAddresses(self):
        """(address, port) pairs our SMTP listeners answer on: mail sent there would loop."""
        out = set()
        c = self.config.smtp
        for desc in tuple(c.listen) + tuple(c.submission) + tuple(c.submissions):
            parts = desc.split(":")
            if len(parts) < 2 or parts[0] not in ("tcp", "tcp6", "ssl") or not (parts[1].isascii() and parts[1].isdigit()):
                continue
            port = int(parts[1])
            interface = next((p.split("=", 1)[1] for p in parts[2:] if p.startswith("interface=")), "")
            if interface in ("", "0.0.0.0", "::"):
                out.update({("127.0.0.1", port), ("::1", port)})
            else:
                out.add((interface.strip("[]"), port))
        return out

    # --- the service tree -----------------------------------------------------

    def limited(self, kind, factory):
        """C{factory} behind the C{[limits]} connection limits (see L{mailplat.limits})."""
        from mailplat.limits import LimitedFactory

        limits = self.config.limits
        return LimitedFactory(factory, kind, limits.connections_per_ip, limits.connections, self.metrics)

    def listenerSpecs(self, roles=ROLES):
        """C{(kind, endpoint description)} for every enabled listener of C{roles}, in a fixed order."""
        c = self.config
        out = []
        if "smtp" in roles and c.smtp.enabled:
            out += [("smtp", d) for d in c.smtp.listen]
            out += [("submission", d) for d in c.smtp.submission]
            out += [("submissions", d) for d in c.smtp.submissions]
        for role in ("imap", "pop3"):
            section = getattr(c, role)
            if role in roles and section.enabled:
                out += [(role, d) for d in section.listen]
                out += [(role + "s", d) for d in section.listen_tls]
        if "http" in roles and c.http.enabled:
            out += [("http", d) for d in c.http.listen]
        return out

    def factoryFor(self, kind, limited=True):
        """
        A new protocol factory for a listener of C{kind} (see
        L{listenerSpecs}): behind the C{[limits]} connection limits unless
        C{limited} is false (worker processes: their master counts).
        """
        role = {"submission": "smtp", "submissions": "smtp", "imaps": "imap", "pop3s": "pop3"}.get(kind, kind)
        build = {
            "smtp": lambda: self.smtpFactory("mx"),
            "submission": lambda: self.smtpFactory("submission"),
            "submissions": lambda: self.smtpFactory("submissions"),
            "imap": self.imapFactory, "imaps": self.imapFactory,
            "pop3": self.pop3Factory, "pop3s": self.pop3Factory,
            "http": self.httpSite,
        }[kind]
        factory = build()
        if limited:
            factory = self.limited(role, factory)
        if kind in ("submissions", "imaps", "pop3s"):
            factory = self.implicitTLS(factory)
        return factory

    def listeners(self, roles=ROLES):
        """C{(name, endpoint description, factory)} for every enabled listener of C{roles}."""
        return [(kind, desc, self.factoryFor(kind)) for kind, desc in self.listenerSpecs(roles)]

    def workerRoles(self, roles=ROLES):
        """The roles among C{roles} configured to run in worker processes (C{processes} > 1)."""
        return [r for r in ("smtp", "imap", "pop3") if r in roles and getattr(self.config, r).enabled
                and getattr(self.config, r).processes > 1]

    def makeService(self, roles=ROLES) -> service.MultiService:
        """
        The service tree: C{store} (opens and closes store and queue), then
        C{queue-runner} when SMTP is among C{roles}, then one named endpoint
        service per listener.  A listener that cannot bind stops start-up.
        A role with C{processes} > 1 gets a L{mailplat.workers.WorkerPool}
        instead of its endpoint services: it listens here and hands each
        connection to one of its worker processes.
        """
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown role(s): {', '.join(sorted(unknown))}")
        root = service.MultiService()
        root.setName("mailplat")
        # Only SMTP queues mail: a process without it leaves the queue closed.
        _StoreService(self, queue="smtp" in roles).setServiceParent(root)
        _ReloadOnHangup(self).setServiceParent(root)
        if "smtp" in roles and self.config.smtp.enabled:
            self.runner = self.queueRunner()
            self.runner.setServiceParent(root)
        pooled = self.workerRoles(roles)
        for role in pooled:
            from mailplat.workers import WorkerPool

            WorkerPool(self, role, getattr(self.config, role).processes).setServiceParent(root)
        for kind, desc, factory in self.listeners([r for r in roles if r not in pooled]):
            svc = strports.service(desc, factory, reactor=self.reactor)
            svc.setName(f"{kind} {desc}")
            svc.setServiceParent(root)
        return root


class _ReloadOnHangup(service.Service):
    """On SIGHUP, reload what can be reloaded without a restart: the TLS certificate and key."""

    name = "reload-on-sighup"

    def __init__(self, platform):
        self.platform = platform
        self._previous = None

    def startService(self):
        import signal

        service.Service.startService(self)
        if not hasattr(signal, "SIGHUP"):
            return
        try:
            self._previous = signal.signal(signal.SIGHUP, self._hangup)
        except ValueError:  # not in the main thread (embedded): the embedder calls reloadTLS
            self._previous = None

    def _hangup(self, signum, frame):
        # A signal handler runs between bytecodes of the reactor's thread:
        # hand the work to the reactor rather than doing it here.
        self.platform.reactor.callFromThread(self.platform.hangup)

    def stopService(self):
        import signal

        service.Service.stopService(self)
        if self._previous is not None:
            try:
                signal.signal(signal.SIGHUP, self._previous)
            except ValueError:
                pass
            self._previous = None


class _StoreService(service.Service):
    name = "store"

    def __init__(self, platform, queue=True):
        self.platform = platform
        self.queue = queue

    def startService(self):
        service.Service.startService(self)
        d = self.platform.open(queue=self.queue)
        d.addErrback(lambda f: _log.failure("the store could not be opened", f))

    def stopService(self):
        service.Service.stopService(self)
        return self.platform.close()
