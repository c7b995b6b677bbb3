"""mailplat.log: the level filter, applied before an event is built, and the namespace of each logger."""

from string import Formatter

from twisted.logger import LogLevel, eventAsJSON, eventAsText, eventFromJSON, formatEvent, globalLogPublisher
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
        return [(e["log_level"], e.get("mailplat_format", e["log_format"]))
                for e in self.events if e.get("log_namespace") == __name__]

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

    def test_renderedWhenEmitted(self):
        """
        An event is rendered as it is emitted: its text needs no field
        looked up again, and its fields and format are kept.
        """
        self.log.info("{who} sent {n:,} bytes {{in braces}} {v!r}", who="alice", n=12345, v="x")
        event = self.events[-1]
        self.assertEqual(formatEvent(event), "alice sent 12,345 bytes {in braces} 'x'")
        self.assertEqual(event["mailplat_format"], "{who} sent {n:,} bytes {{in braces}} {v!r}")
        self.assertEqual((event["who"], event["n"], event["v"]), ("alice", 12345, "x"))
        self.assertEqual(list(Formatter().parse(event["log_format"]))[0][1], None)
        # Through a worker's JSON relay, the same text.
        self.assertEqual(formatEvent(eventFromJSON(eventAsJSON(event))), "alice sent 12,345 bytes {in braces} 'x'")

    def test_leftToTwisted(self):
        """A format that calls a field, or names one the event lacks, reaches Twisted's formatter unchanged."""

        class Source:
            def name(self):
                return "called"

        self.log.info("{s.name()} {missing}", s=Source(), missing="here")
        self.assertEqual(self.events[-1]["log_format"], "{s.name()} {missing}")
        self.log.info("{log_namespace} said so")
        event = self.events[-1]
        self.assertEqual(event["log_format"], "{log_namespace} said so")
        self.assertNotIn("mailplat_format", event)
        self.assertEqual(formatEvent(event), f"{__name__} said so")

    def test_failureKeepsItsTraceback(self):
        try:
            1 / 0
        except ZeroDivisionError:
            self.log.failure("dividing {what}", what="one")
        event = self.events[-1]
        self.assertEqual(formatEvent(event), "dividing one")
        self.assertIn("ZeroDivisionError", eventAsText(event))
        self.flushLoggedErrors(ZeroDivisionError)

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
