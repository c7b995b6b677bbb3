"""
twistd plugins: C{twistd -n mailplat} (every role) and one per role
(C{mailplat-smtp}, C{mailplat-imap}, C{mailplat-pop3}, C{mailplat-http}).

Options are data; construction happens in L{makeService}, after the whole
configuration has been validated and every plugin name resolved.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from mailplat.config import ConfigError, defaultConfig, loadConfig
from mailplat.plugins import PluginError


class Options(usage.Options):
    synopsis = "[--config FILE | --data DIR]"
    longdesc = (
        "Run mailplat. With no --config, the embedded default: SQLite and files under "
        "--data (default ./mailplat-data) and loopback listeners: SMTP 2525, submission 2587, "
        "submissions 2465, IMAP 2143, IMAPS 2993, POP3 2110, POP3S 2995, HTTP 8080."
    )
    optParameters = [
        ["config", "c", None, "A TOML configuration file (see examples/mailplat.toml)."],
        ["data", "d", None, "The data directory (overrides [server] data)."],
    ]

    def postOptions(self):
        try:
            if self["config"]:
                config = loadConfig(self["config"])
                if self["data"]:
                    from dataclasses import replace

                    config = replace(config, data=self["data"])
            else:
                config = defaultConfig(self["data"])
        except ConfigError as e:
            raise usage.UsageError("invalid configuration:\n  " + "\n  ".join(e.errors))
        self.config = config


def makeServiceFor(options, roles):
    from mailplat.platform import Platform

    try:
        platform = Platform(options.config)
    except PluginError as e:
        # twistd prints this and exits non-zero; nothing has started.
        sys.stderr.write(f"mailplat: {e}\n")
        raise SystemExit(1)
    return platform.makeService(roles)


def makeService(options):
    return makeServiceFor(options, ("smtp", "imap", "pop3", "http"))
