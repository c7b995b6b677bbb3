"""twistd -n mailplat-imap: the imap role alone."""

from mailplat.tap import Options, makeServiceFor  # noqa: F401


def makeService(options):
    return makeServiceFor(options, ("imap",))
