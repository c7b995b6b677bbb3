"""mailplat.log: the level filter, applied before an event is built, and the namespace of each logger."""

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from mailplat import log


class LoggerTests(unittest.TestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.addCleanup(log.setLevel, "info")
        self.log = log.Logger()

    def mine(self):
        return [(e["log_level"], e["log_format"]) for e in self.events if e.get("log_namespace") == __name__]

    def test_levels(self):
        log.setLevel("info")
        self.log.debug("hidden {x}", x=1)
        self.log.info("shown {x}", x=2)
        self.log.warn("warned")
        self.assertEqual(self.mine(), [(LogLevel.info, "shown {x}"), (LogLevel.warn, "warned")])
        log.setLevel("debug")
        self.log.debug("now shown")
        self.assertEqual(self.mine()[-1], (LogLevel.debug, "now shown"))
        log.setLevel("error")
        self.log.warn("dropped")
        self.assertNotIn((LogLevel.warn, "dropped"), self.mine())

    def test_namespaceAndObserver(self):
        """A module's logger is named after the module and publishes through the level filter."""
        self.assertEqual(self.log.namespace, __name__)
        self.assertIs(self.log.observer, log.observer)
        from mailplat.smtp import server

        self.assertEqual(server._log.namespace, "mailplat.smtp.server")

        class Thing:
            logger = log.Logger()

        bound = Thing().logger
        self.assertIsInstance(bound, log.Logger)
        self.assertEqual(bound.namespace, f"{__name__}.Thing")
        self.assertIs(bound.observer, log.observer)
