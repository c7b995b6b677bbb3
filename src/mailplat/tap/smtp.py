"""twistd -n mailplat-smtp: the smtp role alone."""

from mailplat.tap import Options, makeServiceFor  # noqa: F401


def makeService(options):
    return makeServiceFor(options, ("smtp",))
