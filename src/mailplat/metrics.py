"""
Counters and gauges for C{GET /metrics} (Prometheus text format 0.0.4).

One L{Metrics} object per platform; protocols call L{Metrics.inc} and
L{Metrics.sessionOpened}/L{Metrics.sessionClosed}.  Everything runs on the
reactor thread, so no locking is needed.
"""

from __future__ import annotations

HELP = {
    "mailplat_messages_received_total": "Messages accepted (250) by the SMTP server.",
    "mailplat_messages_delivered_total": "Message copies stored into local mailboxes.",
    "mailplat_messages_rejected_total": "Recipients or messages refused with a 4xx/5xx reply.",
    "mailplat_sessions_total": "Sessions opened, by protocol.",
    "mailplat_sessions_active": "Sessions open now, by protocol.",
    "mailplat_auth_failures_total": "Failed authentication attempts, by protocol.",
    "mailplat_queue_deferred_total": "Delivery attempts deferred for a later retry.",
}

_GAUGES = {"mailplat_sessions_active"}


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    inner = ",".join(
        '{}="{}"'.format(k, str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
        for k, v in sorted(labels.items())
    )
    return "{" + inner + "}"


class Metrics:
    def __init__(self):
        self._values: dict[tuple, float] = {}
        self._sources: list = []

    def addSource(self, source) -> None:
        """
        Add C{source}, a callable returning more values (C{{(name, labels):
        value}}, as another process's L{Metrics} keeps them) that
        L{render} adds to these: a worker pool's workers.
        """
        self._sources.append(source)

    def removeSource(self, source) -> None:
        if source in self._sources:
            self._sources.remove(source)

    def inc(self, name: str, amount: float = 1, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        self._values[key] = self._values.get(key, 0) + amount

    def get(self, name: str, **labels) -> float:
        return self._values.get((name, tuple(sorted(labels.items()))), 0)

    def snapshot(self) -> dict:
        """This process's own values, C{{(name, labels): value}}."""
        return dict(self._values)

    def sessionOpened(self, protocol: str) -> None:
        self.inc("mailplat_sessions_total", protocol=protocol)
        self.inc("mailplat_sessions_active", protocol=protocol)

    def sessionClosed(self, protocol: str) -> None:
        self.inc("mailplat_sessions_active", -1, protocol=protocol)

    def render(self) -> bytes:
        lines = []
        values = dict(self._values)
        for source in self._sources:
            for key, v in source().items():
                values[key] = values.get(key, 0) + v
        names = sorted(set(HELP) | {k[0] for k in values})
        for name in names:
            lines.append(f"# HELP {name} {HELP.get(name, name)}")
            lines.append(f"# TYPE {name} {'gauge' if name in _GAUGES else 'counter'}")
            samples = [(dict(k[1]), v) for k, v in values.items() if k[0] == name]
            if not samples and name not in _GAUGES:
                lines.append(f"{name} 0")
            for labels, value in sorted(samples, key=lambda s: sorted(s[0].items())):
                lines.append(f"{name}{_labels(labels)} {value:g}")
        return ("\n".join(lines) + "\n").encode("utf-8")
