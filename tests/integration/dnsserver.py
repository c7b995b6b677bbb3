"""
An authoritative DNS server on 127.0.0.1 for tests, on twisted.names.

    server = DNSTestServer({"example.test": [("MX", 10, "mx1.example.test"), ...],
                            "mx1.example.test": [("A", "127.0.0.1")]})
    port = server.start(reactor)      # UDP and TCP on the same free port
    ...
    server.stop()

Names not listed answer NXDOMAIN; listed names without the asked type
answer NOERROR with no records (so "no MX" is distinguishable from "no
such domain").  A name mapped to the string "SERVFAIL" answers SERVFAIL.
"""

from twisted.internet import defer
from twisted.names import authority, dns, server


class MemoryAuthority(authority.FileAuthority):
    def __init__(self, zone: dict):
        self._zone = zone
        super().__init__(None)

    def loadFile(self, filename):
        self.records = {}
        self.servfail = set()
        origin = None
        for name, rrs in self._zone.items():
            key = dns.domainString(name).lower()
            if origin is None:
                origin = key
            if rrs == "SERVFAIL":
                self.servfail.add(key)
                continue
            out = []
            for rr in rrs:
                kind, *args = rr
                if kind == "MX":
                    out.append(dns.Record_MX(args[0], dns.domainString(args[1]), ttl=60))
                elif kind == "A":
                    out.append(dns.Record_A(args[0], ttl=60))
                elif kind == "AAAA":
                    out.append(dns.Record_AAAA(args[0], ttl=60))
                elif kind == "CNAME":
                    out.append(dns.Record_CNAME(dns.domainString(args[0]), ttl=60))
                elif kind == "TXT":
                    out.append(dns.Record_TXT(*[a.encode() for a in args], ttl=60))
                else:
                    raise ValueError(f"unsupported record type {kind}")
            self.records[key] = out
        # One SOA covering the test names: the common suffix is not needed
        # because _lookup only checks membership in records for NXDOMAIN.
        self.soa = (b"test", dns.Record_SOA(mname=b"ns.test", rname=b"hostmaster.test", serial=1,
                                            refresh=60, retry=60, expire=60, minimum=60, ttl=60))

    def _lookup(self, name, cls, type, timeout=None):
        if dns.domainString(name).lower() in self.servfail:
            # Any error that is not a DomainError is answered SERVFAIL.
            return defer.fail(RuntimeError("simulated server failure"))
        return super()._lookup(name, cls, type, timeout)


class DNSTestServer:
    def __init__(self, zone: dict):
        self.authority = MemoryAuthority(zone)
        self._ports = []

    def start(self, reactor):
        from twisted.internet.error import CannotListenError

        factory = server.DNSServerFactory(authorities=[self.authority])
        for _ in range(20):
            # A free UDP port whose number may be taken on TCP: try another.
            udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
            port = udp.getHost().port
            try:
                tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")
            except CannotListenError:
                udp.stopListening()
                continue
            self._ports = [udp, tcp]
            self.port = port
            return port
        raise RuntimeError("no port free on both UDP and TCP")

    def stop(self):
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self._ports])


def main(argv=None):
    """
    Run as a process: C{python dnsserver.py PORTFILE ZONE_JSON} serves the
    zone on a free port of 127.0.0.1 (UDP and TCP), writes the port to
    PORTFILE, and runs until killed.
    """
    import json
    import sys

    from twisted.internet import reactor

    portFile, zoneJson = (argv or sys.argv[1:])[:2]
    zone = {name: (rrs if rrs == "SERVFAIL" else [tuple(rr) for rr in rrs]) for name, rrs in json.loads(zoneJson).items()}
    server = DNSTestServer(zone)
    port = server.start(reactor)
    with open(portFile + ".tmp", "w") as f:
        f.write(str(port))
    import os

    os.rename(portFile + ".tmp", portFile)
    reactor.run()


if __name__ == "__main__":
    main()
