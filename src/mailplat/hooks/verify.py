"""
The C{verify} hook: verify recipients and senders before accepting
anything, so that mail is refused during the SMTP dialogue instead of being
accepted and bounced later (bounces to forged senders are backscatter).

  - C{recipients} (default true): every local mailbox a recipient routes to
    (after aliases) must exist in the store; otherwise C{550 5.1.1
    Recipient address rejected: mailbox unavailable}.  A router that knows
    a user whose store account was never created (an LDAP directory, a
    hand-edited alias) is caught here.  A store that cannot answer gives
    C{451 4.3.0}.
  - C{senders} (default true): a sender address in one of our own domains
    must be one the router accepts (Postfix's C{reject_unlisted_sender});
    otherwise C{553 5.7.1 Sender address rejected: not a known address
    here}.  The null sender and authenticated clients are not checked.
"""

from __future__ import annotations

from twisted.internet import defer

from mailplat.log import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailplat.hooks import Args, PassThroughHook
from mailplat.interfaces.hooks import Decision, ISMTPHook, ISMTPHookFactory
from mailplat.interfaces.routing import LocalDestination, RoutingRequest

_log = Logger()


@implementer(ISMTPHook)
class VerifyHook(PassThroughHook):
    name = "verify"

    def __init__(self, router, store, recipients=True, senders=True):
        self._router = router
        self._store = store
        self.checkRecipients = recipients
        self.checkSenders = senders
        if not senders:
            self.mail = PassThroughHook.mail.__get__(self)
        if not recipients:
            self.rcpt = PassThroughHook.rcpt.__get__(self)

    @defer.inlineCallbacks
    def mail(self, context, sender, params):
        if not sender or context.authenticatedUser or self._router is None or "@" not in sender:
            return Decision.proceed()
        domain = sender.rpartition("@")[2]
        if domain.startswith("["):
            return Decision.proceed()
        local = yield defer.maybeDeferred(self._router.isLocalDomain, domain)
        if not local:
            return Decision.proceed()
        route = yield defer.maybeDeferred(
            self._router.route,
            RoutingRequest(address=sender, authenticated=False, sender=sender, clientAddress=context.clientAddress),
        )
        if route.accepted:
            return Decision.proceed()
        _log.info("verify: unknown local sender <{sender}> from {client}", sender=sender,
                  client=context.clientAddress)
        return Decision.reject("Sender address rejected: not a known address here", 553, "5.7.1")

    @defer.inlineCallbacks
    def rcpt(self, context, recipient, params, route):
        if self._store is None:
            return Decision.proceed()
        users = {d.user for d in route.destinations if isinstance(d, LocalDestination)}
        for user in sorted(users):
            try:
                exists = yield defer.maybeDeferred(self._store.hasAccount, user)
            except Exception:
                _log.failure("verify: the store could not say whether {user} exists", user=user)
                return Decision.tempfail("Recipient verification failed, try again later", 451, "4.3.0")
            if not exists:
                _log.info("verify: <{rcpt}> routes to {user}, who has no mailbox", rcpt=recipient, user=user)
                return Decision.reject("Recipient address rejected: mailbox unavailable", 550, "5.1.1")
        return Decision.proceed()


@implementer(IPlugin, ISMTPHookFactory)
class VerifyHookFactory:
    name = "verify"
    description = "Verify recipients against the store and local senders through the router (args: recipients, senders)."

    def build(self, args, context):
        a = Args("verify", args, {"recipients", "senders"})
        extra = context.extra or {}
        return VerifyHook(
            extra.get("router"),
            context.store,
            recipients=a.boolean("recipients", True),
            senders=a.boolean("senders", True),
        )
