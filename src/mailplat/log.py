"""
mailplat's logging: every module logs with C{Logger(observer=observer)}, a
level filter in front of Twisted's global log publisher.  C{[server]
log_level} (default C{info}) sets the lowest level written; per-command and
per-connection details are C{debug}, one line per accepted message is
C{info}.
"""

from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogPublisher

LEVELS = ("debug", "info", "warn", "error", "critical")

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def setLevel(name: str) -> None:
    """Set the lowest level mailplat writes (one of L{LEVELS})."""
    level = LogLevel.levelWithName(name)
    _predicate.defaultLogLevel = level
    _predicate.setLogLevelForNamespace("mailplat", level)
