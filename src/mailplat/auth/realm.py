"""The one realm: every protocol gets an L{IMailAccount} avatar."""

from twisted.cred.portal import IRealm
from zope.interface import implementer

from mailplat.interfaces.auth import IMailAccount


@implementer(IMailAccount)
class MailAccount:
    def __init__(self, username: str):
        self.username = username

    def logout(self):
        pass

    def __repr__(self):
        return f"<MailAccount {self.username!r}>"


@implementer(IRealm)
class MailRealm:
    def requestAvatar(self, avatarId, mind, *interfaces):
        if IMailAccount not in interfaces:
            raise NotImplementedError("mailplat avatars provide IMailAccount only")
        if isinstance(avatarId, bytes):
            avatarId = avatarId.decode("utf-8")
        account = MailAccount(avatarId)
        return IMailAccount, account, account.logout
