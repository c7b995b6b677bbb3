"""
The IMAP shared namespace (RFC 2342 section 5, "Shared Namespace").

A shared mailbox is one account's mailbox (and the mailboxes under it)
that other accounts see under a common prefix: with the prefix C{Shared}
and a grant named C{Sales} for C{sales@example.com}'s INBOX, a user the
grant names sees C{Shared/Sales} (that INBOX) and C{Shared/Sales/2024}
(C{INBOX/2024} of the owner).  Grants come from the configuration
(C{[[imap.shared]]}); they say who sees the mailbox (accounts, whole
domains as C{@example.com}, or everyone as C{*}) and whether it is
read-only for them.

Everything a session does in a shared mailbox acts on the owner's: the
messages, their flags (shared by everyone who sees the mailbox, as in a
public folder), \\Recent, quota.  The names under the prefix are managed by
the owners: CREATE, DELETE and RENAME there are refused with C{[NOPERM]}.

This module is the model only: which names a user sees and where a name
leads.  L{mailplat.imap.server} asks it.
"""

from __future__ import annotations

from dataclasses import dataclass

DELIMITER = "/"


@dataclass(frozen=True)
class SharedMailbox:
    """One grant: C{owner}'s C{mailbox} seen as C{<prefix>/<name>} by C{users}."""

    name: str
    owner: str
    mailbox: str = "INBOX"
    users: tuple = ("*",)
    readOnly: bool = False

    def visibleTo(self, user: str) -> bool:
        who = user.casefold()
        domain = who.rpartition("@")[2] if "@" in who else None
        for entry in self.users:
            e = entry.casefold()
            if e == "*" or e == who or (e.startswith("@") and domain is not None and e[1:] == domain):
                return True
        return False


@dataclass(frozen=True)
class Location:
    """Where a mailbox name leads for one user: the account and its own name for the mailbox."""

    owner: str
    name: str
    readOnly: bool = False
    grant: SharedMailbox | None = None

    @property
    def shared(self) -> bool:
        return self.grant is not None


class NotInNamespace(Exception):
    """The name is under the shared prefix but leads nowhere this user may go."""


class ReservedName(Exception):
    """The name is the shared prefix itself or under it: no personal mailbox may have it."""


class SharedNamespace:
    """The configured shared namespace: a prefix and its grants."""

    def __init__(self, prefix: str = "Shared", mailboxes=()):
        self.prefix = prefix.rstrip(DELIMITER)
        self.mailboxes = tuple(mailboxes)

    def __bool__(self):
        return bool(self.mailboxes)

    def namespaceResponse(self) -> bytes:
        """The third part of the NAMESPACE response (RFC 2342 section 5)."""
        if not self:
            return b"NIL"
        return b'(("' + self.prefix.encode("utf-8") + b'/" "/"))'

    def isReserved(self, name: str) -> bool:
        """Whether C{name} is in the shared namespace (the prefix or under it)."""
        if not self:
            return False
        return name == self.prefix or name.startswith(self.prefix + DELIMITER)

    def forUser(self, user: str) -> list:
        """The grants C{user} sees, in configuration order."""
        return [m for m in self.mailboxes if m.visibleTo(user)]

    def locate(self, user: str, name: str) -> Location:
        """
        Where C{name} leads for C{user}: a personal mailbox, or the owner's
        mailbox behind a grant.  Raises L{NotInNamespace} for a name under
        the prefix that no grant of this user's covers (and for the prefix
        itself, which is not a mailbox).
        """
        if not self.isReserved(name):
            return Location(user, name)
        rest = name[len(self.prefix) + 1:]
        head, _, tail = rest.partition(DELIMITER)
        for grant in self.mailboxes:
            if grant.name == head and grant.visibleTo(user):
                target = grant.mailbox + DELIMITER + tail if tail else grant.mailbox
                return Location(grant.owner, target, grant.readOnly, grant)
        raise NotInNamespace(name)

    def displayName(self, grant: SharedMailbox, ownerName: str):
        """The name under the prefix of the owner's C{ownerName}, or None when the grant does not cover it."""
        base = grant.mailbox
        if _same(ownerName, base):
            return self.prefix + DELIMITER + grant.name
        if _under(ownerName, base):
            return self.prefix + DELIMITER + grant.name + ownerName[len(base):]
        return None


def _same(name: str, base: str) -> bool:
    if base.upper() == "INBOX":
        return name.upper() == "INBOX"
    return name == base


def _under(name: str, base: str) -> bool:
    if base.upper() == "INBOX":
        return name[:6].upper() == "INBOX" + DELIMITER
    return name.startswith(base + DELIMITER)
