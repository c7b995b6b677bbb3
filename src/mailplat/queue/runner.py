"""
The queue runner: takes due entries from the queue, passes each message
through the configured message processors in order, delivers it to its
local destinations and settles each recipient.

Runs on an injected reactor/clock.  It is kicked right after each commit (so
local mail is delivered in milliseconds) and also polls every
C{pollInterval} seconds for entries whose retry time has come.

Delivery to a local mailbox uses the deliveryId C{QUEUEID:user:mailbox}, so
running an entry again after a crash never stores a second copy.

Remote destinations are settled by the outbound transport when one is
configured (C{outbound}); without one they stay deferred with the reason
"no outbound transport configured", visible in C{mailplat queue list}.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from mailplat.log import observer as logObserver

from mailplat.interfaces.processing import ProcessingItem
from mailplat.interfaces.routing import LocalDestination, RemoteDestination
from mailplat.interfaces.storage import NoSuchAccount, NoSuchMailbox, TemporaryStoreFailure

_log = Logger(observer=logObserver)

#: Seconds before a deferred entry is tried again, by attempt number (the last repeats).
DEFAULT_RETRY_SCHEDULE = (60, 300, 900, 1800, 3600)


def _readFile(path):
    with open(path, "rb") as f:
        return f.read()


class QueueRunner(Service):
    name = "queue-runner"

    def __init__(self, queue, store, processors=(), reactor=None, metrics=None, pollInterval=30.0,
                 concurrency=64, retrySchedule=DEFAULT_RETRY_SCHEDULE, outbound=None):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.queue = queue
        self.store = store
        self.processors = list(processors)
        self.metrics = metrics
        self.pollInterval = pollInterval
        self.concurrency = concurrency
        self.retrySchedule = tuple(retrySchedule)
        self.outbound = outbound
        self._inFlight: set[str] = set()
        # Entries finished while a scan was running: that scan may have read
        # them before their settlement committed, so it must not start them again.
        self._finishedDuringScan: set[str] = set()
        self._loop = None
        self._scanning = None
        self._rescan = False
        self._backlog = False
        self._idle = []

    def startService(self):
        Service.startService(self)
        if hasattr(self.queue, "onCommitted"):
            self.queue.onCommitted(self._committed)
        self._loop = task.LoopingCall(self.kick)
        self._loop.clock = self._reactor
        self._loop.start(self.pollInterval, now=True)

    def stopService(self):
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self.whenIdle()

    def whenIdle(self):
        """Fires when no entry is being processed (used at shutdown and by tests)."""
        if not self._inFlight and self._scanning is None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle.append(d)
        return d

    def _checkIdle(self):
        if not self._inFlight and self._scanning is None:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def kick(self):
        """Look for due entries now (coalesced: one scan at a time)."""
        if not self.running:
            return
        if self._scanning is not None:
            self._rescan = True
            return
        self._scanning = self.queue.due(self._reactor.seconds(), limit=self.concurrency * 2)
        self._scanning.addCallbacks(self._gotDue, lambda f: _log.failure("queue scan failed", f))
        self._scanning.addBoth(self._scanDone)

    def _scanDone(self, _):
        self._scanning = None
        self._finishedDuringScan.clear()
        if self._rescan and self.running:
            self._rescan = False
            self.kick()
        else:
            self._checkIdle()

    def _committed(self, entry):
        """
        A message was just queued: process it from memory right away when
        there is room, without a scan; otherwise a later scan finds it.
        """
        if not self.running or entry.queueId in self._inFlight:
            return
        if len(self._inFlight) >= self.concurrency:
            self._backlog = True
            return
        self._start(entry)

    def _start(self, entry):
        self._inFlight.add(entry.queueId)
        d = defer.maybeDeferred(self.process, entry)
        d.addErrback(lambda f, e=entry: _log.failure("processing {queueId} failed", f, queueId=e.queueId))
        d.addBoth(self._finished, entry.queueId)

    def _gotDue(self, entries):
        if len(entries) >= self.concurrency * 2:
            self._backlog = True
        for entry in entries:
            if entry.queueId in self._inFlight or entry.queueId in self._finishedDuringScan:
                continue
            if len(self._inFlight) >= self.concurrency:
                self._backlog = True
                break
            self._start(entry)

    def _finished(self, _, queueId):
        self._inFlight.discard(queueId)
        if self._scanning is not None:
            self._finishedDuringScan.add(queueId)
        self._checkIdle()
        # Scan again only when entries may be waiting that nobody started.
        if self._backlog and self._scanning is None and self.running and len(self._inFlight) < self.concurrency // 2:
            self._backlog = False
            self.kick()

    def _retryAt(self, attempts):
        delay = self.retrySchedule[min(attempts, len(self.retrySchedule) - 1)]
        return self._reactor.seconds() + delay

    @defer.inlineCallbacks
    def process(self, entry):
        env = entry.envelope
        pending = set(entry.pending)
        byRecipient = {}
        for rcpt, route in zip(env.recipients, env.routes):
            if rcpt in pending:
                byRecipient[rcpt] = tuple(route.destinations)
        if not byRecipient:
            yield self.queue.settle(entry.queueId, [], [], [])
            return

        from twisted.internet.threads import deferToThreadPool

        if entry.content is not None:
            original = entry.content
        else:
            original = yield deferToThreadPool(self._reactor, self._reactor.getThreadPool(), _readFile, entry.path)
        # What the store is given for an unchanged message: the queue's file
        # (it can be linked, not copied), or the inline content.
        unchanged = entry.path if entry.content is None else original
        destinations = tuple(d for ds in byRecipient.values() for d in ds)
        # Groups of destinations that share one content: a processor applied to
        # a subset splits a group in two.
        groups = [ProcessingItem(entry.queueId, env.sender, original, destinations, env.clientAddress,
                                 env.authenticatedUser)]
        for processor in self.processors:
            newGroups = []
            for item in groups:
                try:
                    selected = tuple(processor.matches(item))
                    if not selected:
                        newGroups.append(item)
                        continue
                    rest = tuple(d for d in item.destinations if d not in selected)
                    sub = ProcessingItem(item.queueId, item.sender, item.content, selected, item.clientAddress,
                                         item.authenticatedUser, list(item.headersAdded))
                    yield defer.maybeDeferred(processor.process, sub)
                except Exception:
                    policy = getattr(processor, "errorPolicy", "retry")
                    _log.failure("processor {name} failed on {queueId} (policy {policy})",
                                 name=getattr(processor, "name", processor), queueId=entry.queueId, policy=policy)
                    if policy == "skip":
                        newGroups.append(item)
                        continue
                    if policy == "bounce":
                        yield self.queue.settle(entry.queueId, [],
                                                [(r, "5.3.0 message processing failed") for r in byRecipient], [])
                        return
                    yield self.queue.settle(entry.queueId, [], [],
                                            [(r, "4.3.0 message processing failed") for r in byRecipient],
                                            retryAt=self._retryAt(entry.attempts))
                    return
                if rest:
                    newGroups.append(ProcessingItem(item.queueId, item.sender, item.content, rest, item.clientAddress,
                                                    item.authenticatedUser, list(item.headersAdded)))
                if sub.destinations:
                    newGroups.append(sub)
            groups = newGroups

        def sourceFor(dest):
            for g in groups:
                if dest in g.destinations:
                    return unchanged if g.content is original else g.content
            return None

        delivered, failed, deferred = [], [], []
        for rcpt, dests in byRecipient.items():
            mine = [(d, sourceFor(d)) for d in dests]
            status = yield self._deliverAll(entry, [(d, src) for d, src in mine if src is not None])
            if status is None:
                delivered.append(rcpt)
            elif status[0] == "failed":
                failed.append((rcpt, status[1]))
            else:
                deferred.append((rcpt, status[1]))
        original_dests = {d for ds in byRecipient.values() for d in ds}
        added = [(d, unchanged if g.content is original else g.content)
                 for g in groups for d in g.destinations if d not in original_dests]
        if added:
            # Destinations a processor added (redirects) belong to every recipient.
            status = yield self._deliverAll(entry, added)
            if status is not None and status[0] == "deferred":
                deferred += [(r, status[1]) for r in delivered]
                delivered = []
        yield self.queue.settle(entry.queueId, delivered, failed, deferred,
                                retryAt=self._retryAt(entry.attempts) if deferred else None)

    @defer.inlineCallbacks
    def _deliverAll(self, entry, destinations):
        """
        Deliver to C{(destination, source)} pairs.  None when every one succeeded;
        else C{("failed"|"deferred", reason)}.
        """
        worst = None
        for dest, source in destinations:
            if isinstance(dest, LocalDestination):
                try:
                    yield self.store.append(dest.user, dest.mailbox, source,
                                            deliveryId=f"{entry.queueId}:{dest.user}:{dest.mailbox}")
                    if self.metrics is not None:
                        self.metrics.inc("mailplat_messages_delivered_total")
                except (NoSuchAccount, NoSuchMailbox) as e:
                    if dest.mailbox != "INBOX" and isinstance(e, NoSuchMailbox):
                        try:
                            yield self.store.append(dest.user, "INBOX", source,
                                                    deliveryId=f"{entry.queueId}:{dest.user}:INBOX")
                            continue
                        except Exception as e2:
                            e = e2
                    _log.warn("delivery of {queueId} to {user} failed: {error}", queueId=entry.queueId,
                              user=dest.user, error=str(e))
                    worst = ("failed", f"5.1.1 {e}")
                except TemporaryStoreFailure as e:
                    worst = worst or ("deferred", f"4.3.0 {e}")
                except Exception:
                    _log.failure("delivery of {queueId} to {user} failed", queueId=entry.queueId, user=dest.user)
                    worst = worst or ("deferred", "4.3.0 temporary local delivery failure")
            elif isinstance(dest, RemoteDestination):
                if self.outbound is None:
                    worst = worst or ("deferred", "4.4.0 no outbound transport configured")
                else:
                    result = yield self.outbound.send(entry, dest, source)
                    if result is not None:
                        worst = worst or result
        if worst is not None and worst[0] == "deferred" and self.metrics is not None:
            self.metrics.inc("mailplat_queue_deferred_total")
        return worst
