"""
Pre-queue SMTP hooks: L{ISMTPHook}.

Hooks are consulted by the SMTP server while the client waits, in the order
the config lists them.  Each stage method returns a L{Decision} (or a
Deferred firing with one).  The first hook that answers anything but
L{CONTINUE} decides: L{ACCEPT} stops consulting later hooks for this stage
and proceeds, L{REJECT_TEMP}/L{REJECT_PERM} answer the client with the
decision's code, enhanced status and text, L{DISCONNECT} answers and closes
the connection (421).  A hook that raises is logged and counts as
C{REJECT_TEMP 451 4.3.0}: a broken hook never lets mail through unchecked and
never loses it either.

Stages, in order: C{connect}, C{helo}, C{auth} (after the result is known),
C{mail}, C{rcpt} (once per recipient, after routing), C{data} (end of data,
with the message).  A hook implements only what it needs: a missing method
is the same as answering C{CONTINUE}.

Two more stages are optional methods outside L{ISMTPHook} (so hooks written
before them still verify): C{headers(context, headers)}, at the end of data
just before C{data}, with the header section only (C{bytes}, up to 1 MiB),
for hooks that need no body; and C{disconnect(context)}, called once when
the connection ends (its result is ignored), for hooks that keep
per-connection state.  L{mailplat.hooks.PassThroughHook} is a base class
whose stages all answer C{CONTINUE} and are skipped by the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zope.interface import Attribute, Interface

CONTINUE = "continue"
ACCEPT = "accept"
REJECT_TEMP = "reject-temp"
REJECT_PERM = "reject-perm"
DISCONNECT = "disconnect"


@dataclass(frozen=True)
class Decision:
    action: str = CONTINUE
    code: int = 0
    enhanced: str = ""
    text: str = ""

    @classmethod
    def proceed(cls) -> "Decision":
        return cls(CONTINUE)

    @classmethod
    def accept(cls) -> "Decision":
        return cls(ACCEPT)

    @classmethod
    def tempfail(cls, text="Try again later", code=451, enhanced="4.7.1") -> "Decision":
        return cls(REJECT_TEMP, code, enhanced, text)

    @classmethod
    def reject(cls, text="Rejected", code=550, enhanced="5.7.1") -> "Decision":
        return cls(REJECT_PERM, code, enhanced, text)

    @classmethod
    def disconnect(cls, text="Closing connection", code=421, enhanced="4.7.0") -> "Decision":
        return cls(DISCONNECT, code, enhanced, text)


@dataclass(frozen=True)
class SMTPContext:
    """
    What a pre-queue hook sees of a session: a read-only snapshot taken when
    the hook is called.
    """

    sessionId: str
    hostname: str
    role: str
    clientAddress: str
    clientPort: int = 0
    clientName: str = ""
    tls: bool = False
    authenticatedUser: str = ""
    sender: str | None = None
    mailParams: dict = field(default_factory=dict)
    recipients: tuple = ()
    rcptParams: tuple = ()
    routes: tuple = ()


class ISMTPHook(Interface):
    """
    A pre-queue policy check.  Every method receives the L{SMTPContext} of
    the session (read-only: client address, HELO name, authenticated user,
    envelope so far).  Methods may be left out.
    """

    name = Attribute("A short name used in logs.")

    def connect(context):
        """A client connected."""

    def helo(context, name):
        """HELO or EHLO with C{name}."""

    def auth(context, username, success):
        """An AUTH exchange ended."""

    def mail(context, sender, params):
        """MAIL FROM with C{sender} (C{str}, C{""} for the null sender) and its parameters (dict)."""

    def rcpt(context, recipient, params, route):
        """RCPT TO, with the L{Route} the router answered."""

    def data(context, message):
        """The whole message arrived (C{bytes}); the envelope is in C{context}."""


class ISMTPHookFactory(Interface):
    name = Attribute("The plugin name used in configuration.")
    description = Attribute("One line shown by C{mailplat plugins}.")

    def build(args, context):
        """Return an L{ISMTPHook}."""
