"""
The storage extension point: L{IMessageStore}.

One store holds every account's mailboxes and messages.  IMAP semantics are
the contract, because IMAP is the most demanding consumer; POP3, JMAP and
local delivery are all expressed in the same terms.

Terms
=====
- A I{mailbox name} is a Unicode string; the hierarchy delimiter is C{"/"}.
  C{"INBOX"} is case-insensitive and always exists.  Protocol layers convert
  wire encodings (modified UTF-7 in IMAP) before calling the store.  Names
  are validated by the store (L{validateMailboxName}) and never become file
  paths directly.
- Each mailbox has a I{UIDVALIDITY} (a positive 32-bit integer fixed for the
  life of the mailbox, different for a re-created mailbox of the same name),
  a I{UIDNEXT}, and a I{HIGHESTMODSEQ}.
- Each message has a I{UID}: strictly ascending within a mailbox, never
  reused while UIDVALIDITY is unchanged.  It has flags (system flags such as
  C{"\\Seen"} and keywords such as C{"$MDNSent"}, case preserved, compared
  case-insensitively), an internal date (seconds since the epoch, float), a
  size in octets (the exact length of its content) and a MODSEQ: a positive
  integer that is the mailbox's HIGHESTMODSEQ after the last change to the
  message's flags (or its arrival).

Lifecycle and concurrency
=========================
The platform calls L{IMessageStore.open} once before anything else and
L{IMessageStore.close} once at shutdown.  Between them every other method may
be called from the reactor thread at any time, concurrently with itself and
with every other method: the store serialises what must be serialised.
Every method returns a L{Deferred}; none may block the reactor (do database
and file work in threads).  Errors are reported as failures carrying the
exceptions below, never as other exceptions for expected conditions.

Durability
==========
When the Deferred of L{IMessageStore.append} fires with a UID, the message
content and its index entry MUST be on stable storage (fsync'd): a crash of
the process or the machine after that point loses nothing.  Several appends
may share one fsync (group commit).  An append that carries a
C{deliveryId} already given to the same account MUST NOT store the
message a second time, even when the message has since been moved or
expunged, and fires with the earlier C{(uidvalidity, uid)}: this is what
makes redelivery after a crash exactly-once.  (A store may forget a
delivery ID after some days, longer than a queue entry lives.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from zope.interface import Attribute, Interface

SPECIAL_USES = ("\\Sent", "\\Drafts", "\\Trash", "\\Junk", "\\Archive", "\\All", "\\Flagged")

#: Mailboxes created for every new account, with their special use.
DEFAULT_MAILBOXES = (
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
)

SYSTEM_FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")


class StoreError(Exception):
    """
    Base class of the errors a store reports.  C{str()} of one is safe to show
    to a client.
    """


class NoSuchAccount(StoreError):
    pass


class AccountExists(StoreError):
    pass


class NoSuchMailbox(StoreError):
    pass


class MailboxExists(StoreError):
    pass


class InvalidMailboxName(StoreError):
    pass


class MailboxNotEmpty(StoreError):
    """Raised when deleting a mailbox that still has children."""


class QuotaExceeded(StoreError):
    pass


class TemporaryStoreFailure(StoreError):
    """
    The store cannot do this now (disk full, database busy); the caller should
    answer with a temporary failure and may try again later.
    """


_BAD_NAME = re.compile(r"[\x00-\x1f\x7f]")


def validateMailboxName(name: str) -> str:
    """
    Check a mailbox name and return its canonical form (C{INBOX} upper-cased
    whatever the case it was given in).

    @raise InvalidMailboxName: for an empty name, control characters, empty
        hierarchy levels, C{"."} or C{".."} levels, a leading or trailing
        delimiter, or a name longer than 1,000 characters.
    """
    if not isinstance(name, str) or not name:
        raise InvalidMailboxName("mailbox name is empty")
    if len(name) > 1000:
        raise InvalidMailboxName("mailbox name is too long")
    if _BAD_NAME.search(name):
        raise InvalidMailboxName("mailbox name contains control characters")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidMailboxName("mailbox name has an empty or relative level")
    if parts[0].upper() == "INBOX":
        parts[0] = "INBOX"
    return "/".join(parts)


@dataclass(frozen=True)
class MailboxInfo:
    """The state of one mailbox, as of the moment it was read."""

    name: str
    uidvalidity: int
    uidnext: int
    highestModseq: int
    messages: int = 0
    unseen: int = 0
    recent: int = 0
    specialUse: Optional[str] = None
    subscribed: bool = False
    size: int = 0


@dataclass(frozen=True)
class MessageMeta:
    """
    Metadata of one message.  C{structure} is the parsed-once analysis of the
    message (see L{mailplat.mime.structure.analyze}); it is only filled in
    when asked for, since it is larger than everything else together.
    """

    uid: int
    flags: frozenset
    internalDate: float
    size: int
    modseq: int
    structure: Optional[dict] = field(default=None, compare=False)
    #: The message's ENVELOPE in IMAP syntax (RFC 3501 §7.4.2), from
    #: L{IEnvelopeStore.fetchMeta} with C{withEnvelope=True}; else C{None}.
    envelope: Optional[bytes] = field(default=None, compare=False)


@dataclass(frozen=True)
class FlagChange:
    """One message's flags after a L{IMessageStore.storeFlags} call."""

    uid: int
    flags: frozenset
    modseq: int


class IMessageStore(Interface):
    """
    Accounts, mailboxes and messages, with IMAP semantics.  See the module
    docstring for the contract every method follows.
    """

    def open():
        """
        Prepare the store (create or migrate its schema, start its worker
        threads).  Fires when the store is ready.
        """

    def close():
        """
        Finish outstanding writes and release every resource.  Fires when done;
        nothing may be called afterwards.
        """

    # --- accounts -------------------------------------------------------

    def createAccount(user):
        """
        Create the account C{user} with C{INBOX} and the
        L{DEFAULT_MAILBOXES}.  Fails with L{AccountExists} if it exists.
        """

    def deleteAccount(user):
        """
        Delete an account and every mailbox and message it has.  Fails with
        L{NoSuchAccount}.
        """

    def listAccounts():
        """Fires with a sorted list of account names."""

    def hasAccount(user):
        """Fires with C{True} if the account exists."""

    # --- mailboxes ------------------------------------------------------

    def listMailboxes(user):
        """
        Fires with a list of L{MailboxInfo}, sorted by name, for every mailbox
        of C{user} (INBOX included).
        """

    def getMailbox(user, name):
        """Fires with the L{MailboxInfo} of one mailbox or fails with L{NoSuchMailbox}."""

    def createMailbox(user, name, specialUse=None):
        """
        Create a mailbox (validated with L{validateMailboxName}); parents that do
        not exist are not created implicitly.  Fires with its L{MailboxInfo};
        fails with L{MailboxExists} or L{InvalidMailboxName}.
        """

    def deleteMailbox(user, name):
        """
        Delete a mailbox and its messages.  INBOX cannot be deleted
        (L{InvalidMailboxName}); a mailbox with children fails with
        L{MailboxNotEmpty}.
        """

    def renameMailbox(user, oldName, newName):
        """
        Rename a mailbox and its children.  Renaming INBOX moves its messages
        to a new mailbox and leaves INBOX empty (RFC 3501 6.3.5).  The renamed
        mailbox gets a new UIDVALIDITY only if the store cannot keep its UIDs.
        """

    def setSubscribed(user, name, subscribed):
        """Record whether C{name} is subscribed; the mailbox need not exist."""

    def listSubscriptions(user):
        """Fires with the sorted list of subscribed names."""

    # --- messages -------------------------------------------------------

    def append(user, mailbox, source, flags=(), internalDate=None, deliveryId=None):
        """
        Store a message.  C{source} is C{bytes} or the path (C{str}) of a file
        that holds the message; the store copies or links it and never
        modifies or deletes that file.  Fires with C{(uidvalidity, uid)} once
        the message is durable (see the module docstring), or fails with
        L{NoSuchMailbox}, L{QuotaExceeded} or L{TemporaryStoreFailure}.
        """

    def fetchMeta(user, mailbox, uids=None, withStructure=False, changedSince=None):
        """
        Fires with a list of L{MessageMeta}, ascending by UID, for the messages
        whose UIDs are in C{uids} (any iterable of ints, or C{None} for all).
        UIDs that do not exist are left out.  With C{changedSince}, only
        messages whose MODSEQ is greater are returned.
        """

    def getContent(user, mailbox, uid):
        """
        Fires with the whole content (C{bytes}) of one message; fails with
        L{KeyError} if the UID does not exist.
        """

    def storeFlags(user, mailbox, uids, mode, flags, unchangedSince=None):
        """
        Change the flags of the messages C{uids}.  C{mode} is C{"set"},
        C{"add"} or C{"remove"}.  Each message whose flags really change gets a
        new MODSEQ.  With C{unchangedSince}, messages whose MODSEQ is greater
        are left alone (RFC 7162 UNCHANGEDSINCE).  Fires with a list of
        L{FlagChange} for every existing message among C{uids} (changed or
        not), and the UIDs left alone because of C{unchangedSince} as a second
        element: C{(changes, failedUids)}.  Unlike an append, a flag change
        need not be on stable storage when this fires (a store may let it
        ride on its next durable commit): a crash may forget the latest flag
        changes, never a message.
        """

    def expunge(user, mailbox, uids=None):
        """
        Remove the messages that have the C{\\Deleted} flag (only those among
        C{uids} when given).  Fires with the sorted list of removed UIDs.
        """

    def copy(user, mailbox, uids, destination, move=False):
        """
        Copy the messages C{uids} to C{destination} with their flags and
        internal dates; with C{move=True} they are removed from the source in
        the same transaction.  Fires with C{(destinationUidvalidity,
        [(sourceUid, destinationUid), ...])} in ascending source-UID order.
        """

    def claimRecent(user, mailbox):
        """
        Fires with the UIDs that were recent (arrived since the last claim) and
        clears that state: the first session to select a mailbox sees them as
        C{\\Recent} (RFC 3501 2.3.2), later ones do not.
        """

    def addListener(user, listener):
        """
        Register C{listener}, a callable taking one L{MailboxEvent}, to be called
        on the reactor thread after every committed change to any mailbox of
        C{user}.  Returns a callable that removes the listener.  (Synchronous:
        returns immediately.)  A store that other processes write too SHOULD
        report their changes within a few seconds, as C{"changed"} events.
        """


@dataclass(frozen=True)
class MailboxEvent:
    """
    A change committed to a mailbox: C{kind} is C{"append"}, C{"flags"},
    C{"expunge"}, C{"create"}, C{"delete"} or C{"rename"}; C{uids} are the
    messages concerned.

    Optional detail a store SHOULD fill in so that listeners (thousands of
    IDLE sessions) need not read the store back: C{metas}, the
    L{MessageMeta} (without structure) of appended messages; C{changes},
    the L{FlagChange}s of a C{"flags"} event; C{newName}, the new name of a
    renamed mailbox.  Listeners MUST cope with them being empty.

    C{uidvalidity}, when not 0, is the UIDVALIDITY of the mailbox a
    C{"delete"} or C{"rename"} is about (a store reporting another process's
    change says which mailbox of that name it was).

    C{kind} C{"changed"} says only that the mailbox now has HIGHESTMODSEQ
    C{modseq}: a store whose files another process also writes sends it
    when it notices that process's changes (it cannot say which they
    were).  A listener that knows the mailbox up to a lower MODSEQ reads
    the changes back (C{fetchMeta(changedSince=...)}, C{vanishedSince});
    one that is up to date ignores it.
    """

    user: str
    mailbox: str
    kind: str
    uids: tuple = ()
    metas: tuple = field(default=(), compare=False)
    changes: tuple = field(default=(), compare=False)
    newName: Optional[str] = None
    modseq: int = 0
    uidvalidity: int = 0


@dataclass(frozen=True)
class Quota:
    """
    An account's quota (RFC 9208 resources): C{storage} in octets and
    C{messages} in count; a limit of C{None} means unlimited.
    """

    storageUsed: int
    storageLimit: Optional[int]
    messagesUsed: int
    messagesLimit: Optional[int]


class ISearchIndex(Interface):
    """
    Optional: a store that answers searches and sort keys from an index
    built at delivery, never by reading message content.  Checked with
    C{ISearchIndex.providedBy(store)}; protocol layers fall back to reading
    messages when a store does not provide it.

    Query trees (tuples)::

        ("all",)                      every message
        ("and", (q, ...)) ("or", q1, q2) ("not", q)
        ("uids", frozenset)           UID in the set
        ("flag", name, present)       flag or keyword, case-insensitive
        ("header", lowername, text)   the field exists and (when text is not
                                      empty) contains text: a case-folded
                                      substring of its raw or RFC 2047
                                      decoded value
        ("body", text)                substring of the body (raw or decoded
                                      text parts), case-folded
        ("text", text)                of the header or the body
        ("date", "before"|"on"|"since", datetime.date, sent)
                                      internal date's UTC day, or with
                                      sent=True the Date field's own day
                                      (no readable Date field: no match)
        ("larger", n) ("smaller", n)  size in octets
        ("modseq", n)                 MODSEQ >= n

    Texts are given case-folded (C{str.casefold}).
    """

    def search(user, mailbox, query):
        """Fires with the ascending list of UIDs of C{mailbox} matching C{query}."""

    def indexData(user, mailbox, uids=None):
        """
        Fires with C{{uid: dict}} for the messages C{uids} (all when
        C{None}): the keys of L{mailplat.mime.structure.indexFields} plus
        C{size} and C{internalDate}.
        """


class IQuotaStore(Interface):
    """
    Optional: per-account limits on storage and message count.  A store
    providing it MUST make L{IMessageStore.append} and
    L{IMessageStore.copy} fail with L{QuotaExceeded} when the result would
    exceed a limit (expunging and moving within the account are always
    allowed).
    """

    def getQuota(user):
        """Fires with the account's L{Quota}; fails with L{NoSuchAccount}."""

    def setQuota(user, storage=None, messages=None):
        """Set the limits (C{None}: unlimited).  Fires with the new L{Quota}."""


class IVanishedStore(Interface):
    """
    Optional: remembers expunged UIDs with the MODSEQ of their expunge so a
    client can resynchronise quickly (RFC 7162 QRESYNC, VANISHED).
    """

    def vanishedSince(user, mailbox, modseq):
        """
        Fires with the ascending UIDs expunged from C{mailbox} whose expunge
        MODSEQ is greater than C{modseq} (for a store that forgot some,
        possibly more UIDs than that: never fewer).
        """


class IEnvelopeStore(Interface):
    """
    Optional: keeps each message's IMAP ENVELOPE formatted (as Dovecot's
    index cache keeps C{imap.envelope}), so FETCH ENVELOPE reads a few
    bytes per message instead of decoding its whole structure.
    """

    def fetchMeta(user, mailbox, uids=None, withStructure=False, changedSince=None, withEnvelope=False):
        """
        L{IMessageStore.fetchMeta}; with C{withEnvelope}, each
        L{MessageMeta} carries C{envelope}: the bytes
        L{mailplat.imap.fetch.formatEnvelope} makes of the message's
        analysis, or C{None} for a message the store has none for (the
        caller then analyses the message itself).
        """


class IContentStore(Interface):
    """Optional: message content as a stream instead of one C{bytes}."""

    def openContent(user, mailbox, uid):
        """
        Fires with a binary file object (readable, seekable, the caller
        closes it) holding one message; fails with L{KeyError} if the UID
        does not exist.  The content stays readable through that object
        even if the message is expunged meanwhile.
        """


@dataclass(frozen=True)
class SelectData:
    """
    What SELECT needs of a mailbox, read at once (L{IBatchReadStore.selectData}):
    C{uids} ascending, with the flags (frozensets) and MODSEQs at the same
    positions, and the UIDs that still carry C{\\Recent} in the store (not
    claimed: the caller claims them with C{claimRecent} when there are any).
    """

    info: MailboxInfo
    uids: tuple
    flags: tuple
    modseqs: tuple
    recent: tuple


class IMultiAppendStore(Interface):
    """
    Optional: several messages appended to one mailbox in one transaction
    (IMAP MULTIAPPEND, RFC 3502, is all or nothing, a crash included).
    """

    def appendAll(user, mailbox, messages):
        """
        Store C{messages}, a sequence of C{(source, flags, internalDate)}
        (as L{IMessageStore.append} takes them), with consecutive UIDs in
        their order.  Fires with C{(uidvalidity, [uid, ...])} once all are
        durable; on failure (the same as C{append}'s) none was stored, and
        after a crash either all are there or none.
        """


class IBatchReadStore(Interface):
    """
    Optional: reads of many messages in one store round trip (POP3 RETR of a
    whole maildrop, SELECT of a big mailbox) instead of one per message.
    """

    def getContents(user, mailbox, uids):
        """
        Fires with a dict UID -> content (C{bytes}) for those of C{uids}
        that exist; UIDs that do not are left out.
        """

    def selectData(user, mailbox):
        """
        Fires with a L{SelectData} for C{mailbox}, read in one transaction;
        fails like L{IMessageStore.getMailbox}.  Claims nothing.
        """


class IStoreFactory(Interface):
    """
    A named way to build an L{IMessageStore}: a Twisted plugin.  The config
    says C{[store] plugin = "NAME"} and C{args = {...}}.
    """

    name = Attribute("The plugin name used in configuration, e.g. C{'sqlite'}.")
    description = Attribute("One line shown by C{mailplat plugins}.")

    def build(args, context):
        """
        Return an L{IMessageStore}.  C{args} is the dict from the config (already
        a plain dict of TOML values); C{context} is a
        L{mailplat.interfaces.PluginContext}.  Raise C{ValueError} with a clear
        message for bad arguments.
        """


def describeMeta(meta: MessageMeta) -> dict[str, Any]:
    """A JSON-friendly view of a L{MessageMeta} (for the admin API and logs)."""
    return {
        "uid": meta.uid,
        "flags": sorted(meta.flags),
        "internalDate": meta.internalDate,
        "size": meta.size,
        "modseq": meta.modseq,
    }
