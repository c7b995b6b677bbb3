"""
Sending delivery status notifications (RFC 3464 reports, built by
L{mailplat.outbound.dsn}) back to the sender of a queued message.

A notice is a new queued message from the null sender C{<>} to the original
sender, routed like any other mail (the sender may be local or remote).
Nothing is ever sent about a message from C{<>}, so a notice that cannot
be delivered is dropped rather than answered with another notice.
"""

from __future__ import annotations

from twisted.internet import defer

from mailplat.interfaces.queue import Envelope
from mailplat.interfaces.routing import RoutingRequest
from mailplat.log import Logger
from mailplat.outbound.dsn import buildReport

_log = Logger()


class Notifier:
    def __init__(self, queue, router, hostname, reactor):
        self.queue = queue
        self.router = router
        self.hostname = hostname
        self._reactor = reactor

    @defer.inlineCallbacks
    def send(self, entry, reports, original):
        """Queue one notice about C{reports} (all of one action) for C{entry}'s sender."""
        env = entry.envelope
        if not env.sender:
            return None
        report = buildReport(
            reportingMTA=self.hostname, sender=env.sender, queueId=entry.queueId, arrival=entry.arrival,
            now=self._reactor.seconds(), reports=reports, original=original,
            ret=env.mailParams.get("RET"), envid=env.mailParams.get("ENVID"),
        )
        route = yield defer.maybeDeferred(
            self.router.route, RoutingRequest(env.sender, authenticated=False, trusted=True, sender="")
        )
        if not route.accepted:
            _log.warn("cannot return a {action} notice for {queueId} to <{sender}>: {code} {text}",
                      action=reports[0].action, queueId=entry.queueId, sender=env.sender, code=route.code,
                      text=route.text)
            return None
        # A notice with UTF-8 in it (RFC 6533) travels as SMTPUTF8 mail.
        params = {"SMTPUTF8": None, "BODY": "8BITMIME"} if not report.isascii() else {}
        txn = self.queue.begin(Envelope(sender="", recipients=(env.sender,), mailParams=params, routes=(route,),
                                        rcptParams=({},), protocol="local"))
        txn.write(report)
        qid = yield txn.commit()
        _log.info("{queueId}: {action} notice {notice} queued for <{sender}>", queueId=entry.queueId,
                  action=reports[0].action, notice=qid, sender=env.sender)
        return qid
