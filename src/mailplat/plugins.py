"""
Finding extensions by name.

Every extension — built-in or third-party — is a Twisted plugin: an object
in a module of some package's C{twisted/plugins/} directory that provides
L{twisted.plugin.IPlugin} and one of the C{I...Factory} interfaces of
L{mailplat.interfaces}, with a C{name}.  The config names it; L{find} looks
it up with L{twisted.plugin.getPlugins}, checks it with C{verifyObject}, and
when the name is unknown says which names exist.
"""

from __future__ import annotations

from twisted.plugin import getPlugins
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from mailplat.interfaces.auth import ICheckerFactory
from mailplat.interfaces.conversion import IConverterFactory
from mailplat.interfaces.hooks import ISMTPHookFactory
from mailplat.interfaces.processing import IMessageProcessorFactory
from mailplat.interfaces.queue import IQueueFactory
from mailplat.interfaces.routing import IRouterFactory
from mailplat.interfaces.storage import IStoreFactory

#: The kinds of extension, as named in messages and in C{mailplat plugins}.
KINDS = {
    "store": IStoreFactory,
    "queue": IQueueFactory,
    "checker": ICheckerFactory,
    "router": IRouterFactory,
    "hook": ISMTPHookFactory,
    "processor": IMessageProcessorFactory,
    "converter": IConverterFactory,
}


class PluginError(Exception):
    pass


def available(kind: str) -> dict:
    """Every plugin of one kind, by name."""
    interface = KINDS[kind]
    found = {}
    for plugin in getPlugins(interface):
        name = getattr(plugin, "name", None)
        if isinstance(name, str) and name not in found:
            found[name] = plugin
    return found


def find(kind: str, name: str):
    """The factory of one plugin, verified; L{PluginError} names the known ones."""
    plugins = available(kind)
    try:
        plugin = plugins[name]
    except KeyError:
        known = ", ".join(sorted(plugins)) or "none"
        raise PluginError(f"unknown {kind} plugin {name!r} (known: {known})")
    try:
        verifyObject(KINDS[kind], plugin)
    except Invalid as e:
        raise PluginError(f"{kind} plugin {name!r} does not provide {KINDS[kind].__name__} correctly: {e}")
    return plugin


def build(kind: str, choice, context, provides=None):
    """Find, build and verify one extension from a L{mailplat.config.PluginChoice}."""
    factory = find(kind, choice.plugin)
    try:
        obj = factory.build(dict(choice.args), context)
    except ValueError as e:
        raise PluginError(f"{kind} plugin {choice.plugin!r}: {e}")
    if provides is not None:
        items = obj if isinstance(obj, (list, tuple)) else [obj]
        for item in items:
            try:
                verifyObject(provides, item)
            except Invalid as e:
                raise PluginError(f"{kind} plugin {choice.plugin!r} built an object that does not provide "
                                  f"{provides.__name__}: {e}")
    return obj


def dataPathArgument(args, context, default):
    """
    The one argument of the file-based built-in plugins: C{path}, a directory
    relative to the data directory (or absolute).  Any other argument is refused.
    """
    import os

    unknown = set(args) - {"path"}
    if unknown:
        raise ValueError(f"unknown argument(s): {', '.join(sorted(unknown))}; known: path")
    path = args.get("path", default)
    if not isinstance(path, str) or not path:
        raise ValueError("path must be a non-empty string")
    return os.path.join(context.dataDir, path)
