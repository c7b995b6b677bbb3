"""
The authentication extension point.

Authentication is C{twisted.cred}: a L{Portal} with one L{MailRealm} and
one or more checkers.  Checkers are built by named plugin factories
(L{ICheckerFactory}): the config says C{[auth] checkers = ["directory"]} and
the portal tries each in order.  Every protocol asks the portal for an
L{IMailAccount} avatar; the avatar is the protocol-neutral view of "the
logged-in user" (the name to pass to L{IMessageStore} methods).

SASL mechanisms (L{ISASLMechanism}) turn a protocol's AUTH/AUTHENTICATE
exchange into cred credentials; the registry in L{mailplat.auth.sasl} is
shared by SMTP, IMAP and POP3.
"""

from zope.interface import Attribute, Interface


class IMailAccount(Interface):
    """The avatar every mail protocol receives after a successful login."""

    username = Attribute("The account name (C{str}), as the store knows it.")

    def logout():
        """Called once when the session that owns the avatar ends."""


class ICheckerFactory(Interface):
    """A named way to build a L{twisted.cred.checkers.ICredentialsChecker}."""

    name = Attribute("The plugin name used in configuration, e.g. C{'directory'}.")
    description = Attribute("One line shown by C{mailplat plugins}.")

    def build(args, context):
        """
        Return an C{ICredentialsChecker} that checks at least
        C{IUsernamePassword}.  The avatar ID it returns is the account name
        (C{str}).  C{context} is a L{mailplat.interfaces.PluginContext}.
        """


class ISASLMechanism(Interface):
    """
    The server side of one SASL exchange (RFC 4422).  A new object is made for
    every exchange.
    """

    name = Attribute("The mechanism name, upper case, e.g. C{'PLAIN'}.")

    def step(response):
        """
        Feed the client's next response (C{bytes}, already base64-decoded).
        The first call gets the initial response: C{None} when the client
        sent none, C{b""} when it sent an empty one (C{"="}, RFC 4954 §4,
        RFC 4959, RFC 5034); the two differ (RFC 4422 §5).
        Returns a L{mailplat.auth.sasl.Challenge} to send to the client, or a
        L{mailplat.auth.sasl.Credentials} holding C{twisted.cred} credentials to
        check.  Raises L{mailplat.auth.sasl.SASLError} for a malformed response.
        """
