"""twistd -n mailplat-http: the http role alone."""

from mailplat.tap import Options, makeServiceFor  # noqa: F401


def makeService(options):
    return makeServiceFor(options, ("http",))
