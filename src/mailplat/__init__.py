"""
mailplat: a pluggable mail platform on Twisted.

SMTP in and out with a durable queue, IMAP4, POP3 and HTTP, with every policy
decision behind a zope.interface extension point (see L{mailplat.interfaces}).
"""

__version__ = "0.1.0"
