"""twistd -n mailplat-pop3: the pop3 role alone."""

from mailplat.tap import Options, makeServiceFor  # noqa: F401


def makeService(options):
    return makeServiceFor(options, ("pop3",))
