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

import collections
from dataclasses import dataclass

from twisted.application.service import Service
from twisted.internet import defer, task

from mailplat.log import Logger

from mailplat.interfaces.processing import ProcessingItem
from mailplat.interfaces.routing import LocalDestination, RemoteDestination
from mailplat.interfaces.storage import NoSuchAccount, NoSuchMailbox, QuotaExceeded, TemporaryStoreFailure
from mailplat.outbound import dsn
from mailplat.outbound.client import Recipient, Result

_log = Logger()

#: Entries a runner without scans keeps waiting for room (see L{QueueRunner.take}).
MAX_WAITING = 1024

#: Seconds before a deferred entry is tried again, by attempt number (the last repeats).
DEFAULT_RETRY_SCHEDULE = (60, 300, 900, 1800, 3600)


def _readFile(path):
    with open(path, "rb") as f:
        return f.read()


class QueueRunner(Service):
    name = "queue-runner"

    def __init__(self, queue, store, processors=(), reactor=None, metrics=None, pollInterval=30.0,
                 concurrency=64, retrySchedule=DEFAULT_RETRY_SCHEDULE, outbound=None, notifier=None,
                 maxLifetime=5 * 86400, delayWarning=4 * 3600, maxHops=50, scan=True):
        #: False in an SMTP worker process: no scans (the main process's
        #: runner scans); entries come only through L{take}.
        self.scan = scan
        self._waiting = collections.deque()
        self.notifier = notifier
        self.maxLifetime = maxLifetime
        self.delayWarning = delayWarning
        self.maxHops = maxHops
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
        self._wakeCall = None
        self._idle = []

    def startService(self):
        Service.startService(self)
        if not self.scan:
            return
        if hasattr(self.queue, "onCommitted"):
            self.queue.onCommitted(self._committed)
        self._loop = task.LoopingCall(self.kick)
        self._loop.clock = self._reactor
        if not hasattr(self.queue, "releaseLeases"):
            self._loop.start(self.pollInterval, now=True)
            return
        # Leases of worker processes of an earlier run: nobody delivers those
        # now.  Released before the first scan (which waits, as a scan would).
        self._scanning = d = self.queue.releaseLeases()

        def released(n):
            if n:
                _log.info("{n} queue entries leased before the start are due now", n=n)

        def scan(_):
            self._scanning = None
            self._rescan = False
            if self.running:
                self._loop.start(self.pollInterval, now=True)
            self._checkIdle()

        d.addCallbacks(released, lambda f: _log.failure("releasing queue leases failed", f))
        d.addBoth(scan)

    def stopService(self):
        Service.stopService(self)
        self._waiting.clear()  # leased: the scanning runner takes them when the lease runs out
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._wakeCall is not None and self._wakeCall.active():
            self._wakeCall.cancel()
        self._wakeCall = None
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
        if not self.running or not self.scan:
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

    def take(self, entry):
        """
        (A runner without scans.)  Process C{entry}, just committed, now or
        when there is room; past L{MAX_WAITING} waiting it is left to the
        runner that scans, when the entry's lease runs out.
        """
        if not self.running:
            return
        if len(self._inFlight) < self.concurrency:
            self._start(entry)
        elif len(self._waiting) < MAX_WAITING:
            self._waiting.append(entry)

    #: Seconds before an entry whose settlement could not be written (a full
    #: disk, a locked store) is looked at again.
    STORE_RETRY = 60

    def _start(self, entry):
        self._inFlight.add(entry.queueId)
        d = defer.maybeDeferred(self.process, entry)
        d.addErrback(self._failed, entry)
        d.addBoth(self._finished, entry.queueId)

    def _failed(self, failure, entry):
        if failure.check(TemporaryStoreFailure):
            # The queue or the store cannot write now: nothing was settled,
            # the entry is tried again (a delivery already made is not
            # repeated: delivery IDs).
            _log.warn("queue entry {queueId} not settled, tried again in {seconds}s: {error}",
                      queueId=entry.queueId, seconds=self.STORE_RETRY, error=failure.getErrorMessage())
            self._wakeAt(self._reactor.seconds() + self.STORE_RETRY)
            return None
        _log.failure("processing {queueId} failed", failure, queueId=entry.queueId)
        return None

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
        if self._waiting and self.running and len(self._inFlight) < self.concurrency:
            self._start(self._waiting.popleft())
        if self._scanning is not None:
            self._finishedDuringScan.add(queueId)
        self._checkIdle()
        # Scan again only when entries may be waiting that nobody started.
        if self._backlog and self._scanning is None and self.running and len(self._inFlight) < self.concurrency // 2:
            self._backlog = False
            self.kick()

    def _wakeAt(self, when):
        """Scan again at C{when} (the earliest of the retry times waiting), not only on the next poll."""
        if not self.running or not self.scan:
            return
        call = self._wakeCall
        if call is not None and call.active():
            if call.getTime() <= when:
                return
            call.cancel()
        self._wakeCall = self._reactor.callLater(max(0, when - self._reactor.seconds()) + 0.01, self._wake)

    def _wake(self):
        self._wakeCall = None
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

        yield self._deliverAndSettle(entry, byRecipient, groups, sourceFor, original, unchanged)

    @defer.inlineCallbacks
    def _deliverAndSettle(self, entry, byRecipient, groups, sourceFor, original, unchanged):
        env = entry.envelope
        params = {rcpt: (env.rcptParams[i] if i < len(env.rcptParams) else {})
                  for i, rcpt in enumerate(env.recipients)}
        done = set(entry.done)
        if hops(original) > self.maxHops:
            outcome = {destinationKey(d): Outcome("failed", "5.4.6", f"mail loop: more than {self.maxHops} Received: "
                                                                  "headers")
                       for ds in byRecipient.values() for d in ds}
        else:
            work = []
            for rcpt, dests in byRecipient.items():
                for d in dests:
                    src = sourceFor(d)
                    if src is not None:
                        work.append((rcpt, d, src))
            originals = {d for ds in byRecipient.values() for d in ds}
            for g in groups:
                for d in g.destinations:
                    if d not in originals:
                        work.append((None, d, unchanged if g.content is original else g.content))
            outcome = yield self._deliverWork(entry, [w for w in work if destinationKey(w[1]) not in done], params)
        extra = [o for k, o in outcome.items() if k.startswith("+")]

        now = self._reactor.seconds()
        age = now - entry.arrival
        delivered, failed, deferred, newlyDone, warned = [], [], [], [], []
        reports = {dsn.FAILED: [], dsn.DELAYED: [], dsn.DELIVERED: [], dsn.RELAYED: []}
        for rcpt, dests in byRecipient.items():
            results = [outcome[destinationKey(d)] for d in dests if destinationKey(d) in outcome]
            results += extra
            newlyDone += [destinationKey(d) for d in dests
                          if outcome.get(destinationKey(d)) is not None
                          and outcome[destinationKey(d)].state in ("delivered", "relayed")]
            worst = max(results, key=lambda o: _RANK[o.state]) if results else Outcome("delivered", "2.0.0", "")
            p = params.get(rcpt, {})
            notify, orcpt = p.get("NOTIFY"), p.get("ORCPT", "")
            if worst.state == "deferred" and age >= self.maxLifetime:
                worst = Outcome("failed", "4.4.7", f"delivery time expired after {age / 86400:.1f} days; "
                                                   f"last problem: {worst.diagnostic}", worst.remoteMTA)
            report = dsn.RecipientReport(rcpt, worst.state, worst.status, worst.diagnostic, worst.remoteMTA, orcpt,
                                         lastAttempt=now)
            if worst.state == "failed":
                failed.append((rcpt, f"{worst.status} {worst.diagnostic}"))
                if dsn.notifyWants(notify, dsn.FAILED):
                    reports[dsn.FAILED].append(report)
            elif worst.state == "deferred":
                deferred.append((rcpt, f"{worst.status} {worst.diagnostic}"))
                if age >= self.delayWarning and rcpt not in entry.warned and dsn.notifyWants(notify, dsn.DELAYED):
                    reports[dsn.DELAYED].append(dsn.RecipientReport(
                        rcpt, dsn.DELAYED, worst.status, worst.diagnostic, worst.remoteMTA, orcpt, lastAttempt=now,
                        willRetryUntil=entry.arrival + self.maxLifetime))
                    warned.append(rcpt)
            else:
                delivered.append(rcpt)
                if worst.state == "relayed" and dsn.notifyWants(notify, dsn.RELAYED):
                    reports[dsn.RELAYED].append(report)
                elif (worst.state == "delivered" and results and all(o.final for o in results)
                      and notify and dsn.notifyWants(notify, dsn.DELIVERED)):
                    reports[dsn.DELIVERED].append(report)
        if self.notifier is not None:
            for kind, rs in reports.items():
                if rs:
                    # Committed before the entry is settled: a crash in between
                    # repeats the notice rather than losing it.
                    yield self.notifier.send(entry, rs, original)
        if deferred and self.metrics is not None:
            self.metrics.inc("mailplat_queue_deferred_total")
        retryAt = self._retryAt(entry.attempts) if deferred else None
        yield self.queue.settle(entry.queueId, delivered, failed, deferred, retryAt=retryAt,
                                done=newlyDone, warned=warned)
        if retryAt is not None:
            self._wakeAt(retryAt)

    @defer.inlineCallbacks
    def _deliverWork(self, entry, work, params):
        """
        Deliver C{(recipient, destination, source)} triples; fires with a dict
        destination key -> L{Outcome}.  Destinations a processor added (no
        recipient) are keyed with a leading C{+} so every recipient shares them.
        """
        outcome = {}
        remote = []
        local = {}  # id(source) -> the content with its Return-Path, made once for every local destination
        for rcpt, dest, source in work:
            key = destinationKey(dest) if rcpt is not None else "+" + destinationKey(dest)
            if isinstance(dest, LocalDestination):
                if id(source) not in local:
                    local[id(source)] = yield self._finalContent(entry, source)
                content = local[id(source)]
                if isinstance(content, Outcome):
                    outcome[key] = content
                else:
                    outcome[key] = yield self._deliverLocal(entry, dest, content)
            elif isinstance(dest, RemoteDestination):
                remote.append((key, rcpt, dest, source))
        if remote and self.outbound is None:
            for key, _, _, _ in remote:
                outcome[key] = Outcome("deferred", "4.4.0", "no outbound transport configured")
        elif remote:
            bySource = {}
            for item in remote:
                bySource.setdefault(id(item[3]), []).append(item)
            env = entry.envelope
            for items in bySource.values():
                source = items[0][3]
                content = source
                if isinstance(source, str):
                    from twisted.internet.threads import deferToThreadPool

                    content = yield deferToThreadPool(self._reactor, self._reactor.getThreadPool(), _readFile, source)
                recipients = []
                for key, rcpt, dest, _ in items:
                    p = params.get(rcpt, {}) if rcpt is not None else {}
                    recipients.append(Recipient(dest.address, p.get("NOTIFY"), p.get("ORCPT")))
                extra = {}
                if env.mailParams.get("BODY") == "BINARYMIME":
                    # (Asked for only then: an outbound transport without the
                    # argument still gets every other message.)
                    extra["binary"] = True
                try:
                    results = yield self.outbound.deliver(
                        env.sender, recipients, content, ret=env.mailParams.get("RET"),
                        envid=env.mailParams.get("ENVID"), needsSMTPUTF8="SMTPUTF8" in env.mailParams, **extra)
                except Exception:
                    _log.failure("outbound delivery of {queueId} failed", queueId=entry.queueId)
                    results = [Result(r.address, "deferred", "4.3.0", "temporary outbound failure") for r in recipients]
                for (key, _, _, _), r in zip(items, results):
                    outcome[key] = Outcome(r.state, r.status, r.diagnostic, r.remoteMTA)
                    if r.state in ("delivered", "relayed") and self.metrics is not None:
                        self.metrics.inc("mailplat_messages_relayed_total")
        return outcome

    @defer.inlineCallbacks
    def _finalContent(self, entry, source):
        """What final delivery stores: C{Return-Path} first (RFC 5321 §4.4); an L{Outcome} if the file cannot be read."""
        if isinstance(source, str):
            from twisted.internet.threads import deferToThreadPool

            try:
                source = yield deferToThreadPool(self._reactor, self._reactor.getThreadPool(), _readFile, source)
            except OSError as e:
                _log.failure("delivery of {queueId}: cannot read its content", queueId=entry.queueId)
                return Outcome("deferred", "4.3.0", f"temporary local delivery failure: {e.strerror}")
        return returnPath(entry.envelope.sender) + source

    @defer.inlineCallbacks
    def _deliverLocal(self, entry, dest, source):
        try:
            yield self.store.append(dest.user, dest.mailbox, source,
                                    deliveryId=f"{entry.queueId}:{dest.user}:{dest.mailbox}")
        except NoSuchMailbox:
            if dest.mailbox == "INBOX":
                return Outcome("failed", "5.1.1", f"mailbox unavailable: {dest.user}")
            return (yield self._deliverLocal(entry, LocalDestination(dest.user, "INBOX"), source))
        except NoSuchAccount:
            _log.warn("delivery of {queueId} to {user} failed: no such account", queueId=entry.queueId,
                      user=dest.user)
            return Outcome("failed", "5.1.1", f"no such user: {dest.user}")
        except QuotaExceeded as e:
            return Outcome("deferred", "4.2.2", f"mailbox full: {e}")
        except TemporaryStoreFailure as e:
            return Outcome("deferred", "4.3.0", str(e))
        except Exception:
            _log.failure("delivery of {queueId} to {user} failed", queueId=entry.queueId, user=dest.user)
            return Outcome("deferred", "4.3.0", "temporary local delivery failure")
        if self.metrics is not None:
            self.metrics.inc("mailplat_messages_delivered_total")
        return Outcome("delivered", "2.0.0", "delivered to a local mailbox", final=True)


@dataclass(frozen=True)
class Outcome:
    state: str
    status: str
    diagnostic: str
    remoteMTA: str = ""
    #: Final delivery here (a local mailbox), as opposed to relaying: only
    #: final delivery earns a "delivered" notice (RFC 3461 6.2: a DSN-capable
    #: next hop reports success itself).
    final: bool = False


_RANK = {"delivered": 0, "relayed": 1, "deferred": 2, "failed": 3}


def destinationKey(dest) -> str:
    if isinstance(dest, LocalDestination):
        return f"local:{dest.user}:{dest.mailbox}"
    return f"remote:{dest.address}"


def returnPath(sender: str) -> bytes:
    """
    The header field final delivery puts first (RFC 5321 §4.4): the envelope
    sender, C{<>} for the null reverse-path.  Return-Path fields the message
    already has are left as they are.
    """
    clean = sender.replace("\r", "").replace("\n", "")
    return b"Return-Path: <" + clean.encode("utf-8") + b">\r\n"


def hops(message: bytes) -> int:
    """The number of Received: header fields in the message's header."""
    end = message.find(b"\r\n\r\n")
    header = message if end < 0 else message[:end]
    return sum(1 for line in header.split(b"\n") if line[:9].lower() == b"received:")
