"""
The conversion extension point: L{IConverter}.

A converter turns content of one media type into another (text/enriched to
text/html, BinHex to its file, a charset to UTF-8, ...).  Converters are
registered by (source type, target type) in L{mailplat.mime.convert.Registry};
the first registered converter for a pair wins, so a third-party plugin can
be placed before a built-in one by listing it in the config.
"""

from zope.interface import Attribute, Interface


class IConverter(Interface):
    sourceType = Attribute("The media type read, lower case, e.g. C{'text/enriched'}.")
    targetType = Attribute("The media type produced, e.g. C{'text/html'}.")

    def convert(data, parameters):
        """
        Convert C{data} (C{bytes}) with the source type's C{parameters} (a dict,
        e.g. C{{'charset': 'iso-8859-1'}}).  Returns C{(bytes, parameters)} for the
        target type.  Raises C{ValueError} for content that cannot be converted.
        Pure and synchronous: callers run it in a thread when it is large.
        """


class IConverterFactory(Interface):
    name = Attribute("The plugin name used in configuration.")
    description = Attribute("One line shown by C{mailplat plugins}.")

    def build(args, context):
        """Return a list of L{IConverter}s."""
