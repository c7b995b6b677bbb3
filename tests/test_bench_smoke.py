"""
Keeps the benchmark harness (bench/) working without running benchmarks:
argument parsing, the statistics, the generated corpus, the report and its
plots from made-up results, the asyncio protocol clients against scripted
loopback servers, and the cheapest real benchmark (the machine's limits).
"""

import asyncio
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import b_limits, cli, common, corpus, report  # noqa: E402
from bench.clients import IMAPClient, POP3Client, ProtocolError  # noqa: E402


def test_parseArgsDefaults():
    args = cli.parseArgs(["--quick"])
    assert args.quick and args.runs == 3
    assert args.selected == list(cli.BENCHMARKS)
    assert args.json.endswith(os.path.join("bench", "results", "quick.json"))
    full = cli.parseArgs([])
    assert full.runs == 5 and full.json.endswith("full.json")


def test_parseArgsOnlyAndErrors(capsys):
    assert cli.parseArgs(["--only", "smtp, pop3"]).selected == ["smtp", "pop3"]
    with pytest.raises(SystemExit):
        cli.parseArgs(["--only", "smtp,nonesuch"])
    assert "nonesuch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parseArgs(["--runs", "0"])


def test_everyBenchmarkModuleImportsWithTitleAndDoc():
    import importlib

    for key, name in cli.BENCHMARKS.items():
        mod = importlib.import_module(name)
        assert mod.TITLE and mod.__doc__ and callable(mod.run), key


def test_statistics():
    assert common.summary([3, 1, 2]) == {"median": 2, "min": 1, "max": 3, "n": 3}
    assert common.summary([None]) is None
    p = common.percentiles(list(range(1, 101)))
    assert (p["p50"], p["p90"], p["p99"]) == (50, 90, 99)
    assert common.percentiles([]) == {"p50": None, "p90": None, "p99": None}
    r = common.ratios([10, 20, 30], [5, 10, 0])
    assert r == {"median": 2.0, "min": 2.0, "max": 2.0, "n": 2}


def test_corpusIsDeterministicAndSearchable():
    a, b = corpus.message(999), corpus.message(999)
    assert a == b and a.endswith(b"\r\n") and b"\n" not in a.replace(b"\r\n", b"")
    assert abs(len(a) - 4096) < 200
    assert corpus.RARE.encode() in a and corpus.RARE.encode() not in corpus.message(998)
    assert len(corpus.message(5, 102400)) > 100000
    hits = sum(corpus.RARE.encode() in corpus.message(i) for i in range(3000))
    assert hits == 3


def test_processAccountingOfThisProcess():
    tree = common.processTree([os.getpid()])
    assert os.getpid() in tree
    assert common.cpuSeconds(tree) > 0
    mem = common.memory([os.getpid()])
    assert mem["rss"] > 0 and mem["processes"] == 1


def _fakeResults(path):
    r = common.Results(str(path))
    r.meta = {"command": "bench/run --quick", "started": "x", "finished": "y", "seconds": 60,
              "load_before": [1, 1, 1], "load_after": [2, 2, 2], "machine": common.machineFacts()}
    r.benchmarks = {k: {"title": f"T {k}", "how": "how", "seconds": 1, "error": None}
                    for k in ("limits", "smtp", "imap", "imapmix", "idle", "pop3", "outbound")}
    r.add("limits", "fsync", "writes/s", "machine", [1000, 1100, 900])
    for size in ("4 KB", "100 KB"):
        for s in (1, 10, 50):
            for srv, base in (("mailplat", 100), ("postfix", 300), ("aiosmtpd", 200), ("smtp-sink", 3000)):
                r.add("smtp", f"{size}, -s {s}", "accepted msg/s", srv, [base * s ** 0.3, base, base * 1.1])
                if srv in ("mailplat", "postfix"):
                    r.add("smtp", f"{size}, -s {s}", "delivered msg/s", srv, [base * 0.9] * 3)
    r.add("outbound", "1,000 msgs", "msg/s", "mailplat", [], error="not available yet")
    r.add("outbound", "1,000 msgs", "msg/s", "postfix", [700, 650, 720])
    for srv in ("mailplat", "dovecot"):
        r.add("imap", "10,000 messages: SELECT", "ms", srv, [3, 4, 5], better="lower")
        for c in (10, 50):
            r.add("imapmix", f"{c} sessions", "operations/s", srv, [400, 420, 380])
        for n in (100, 500):
            r.add("idle", f"{n} sessions", "memory (PSS) MB", srv, [50 + n / 10])
            r.add("idle", f"{n} sessions", "fan-out to all, ms", srv, [30, 40])
            r.add("idle", f"{n} sessions", "fan-out to median, ms", srv, [20, 30])
    r.extra["imapmix"] = {srv: {"50": {"SELECT": {"p50": 1, "p90": 2, "p99": 3, "count": 9},
                                       "all": {"p50": 1, "p90": 2, "p99": 3, "count": 9}}}
                          for srv in ("mailplat", "dovecot")}
    r.extra["pop3"] = {srv: {"p50": 10, "p90": 20, "p99": 30, "count": 100} for srv in ("mailplat", "dovecot")}
    r.fail("imap", "mailplat", "SEARCH BODY (10,000 messages)", "b6 BAD unknown search key")
    return r


def test_reportAndPlotsFromFakeResults(tmp_path):
    pytest.importorskip("matplotlib")
    common.setQuiet(True)
    r = _fakeResults(tmp_path / "r.json")
    r.save()
    loaded = common.Results.load(str(tmp_path / "r.json"))
    assert len(loaded.measurements) == len(r.measurements)
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    report.writeReport(loaded, str(doc))
    text = doc.read_text()
    assert "| case | metric | mailplat | postfix | aiosmtpd | smtp-sink |" in text
    assert "mailplat ÷ postfix" in text
    assert "error [1]" in text and "not available yet" in text
    assert "SEARCH BODY" in text and "b6 BAD unknown search key" in text
    pngs = sorted(os.listdir(tmp_path / "docs" / "benchmarks"))
    assert pngs == ["imap-commands.png", "imap-idle.png", "imap-mixed.png", "pop3-sessions.png",
                    "smtp-throughput.png"]
    for name in pngs:
        assert f"(benchmarks/{name})" in text
        with open(tmp_path / "docs" / "benchmarks" / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "plot_errors" not in loaded.meta


def test_reportOnlyFromTheCommandLine(tmp_path):
    common.setQuiet(True)
    r = common.Results(str(tmp_path / "r.json"))
    r.benchmarks = {"limits": {"title": "Machine limits", "how": "", "seconds": 1, "error": None}}
    r.add("limits", "fsync", "writes/s", "machine", [1000, 1100, 900])
    r.save()
    doc = tmp_path / "b.md"
    assert cli.main(["--report-only", "--json", str(tmp_path / "r.json"), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Benchmarks")
    assert "| fsync | writes/s | 1,000 (900–1,100) |" in text


def test_ratioCellsPairRunByRun():
    assert report.ratioCell([2, 4, 6], [1, 1, 3]) == "2.00× (2.00–4.00)"
    assert report.cell([1.5]) == "1.50"
    assert report.cell([]) == "–"


async def _scripted(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_imapClientLiteralsAndErrors():
    async def handler(reader, writer):
        writer.write(b"* OK ready\r\n")
        while True:
            line = await reader.readline()
            if not line:
                break
            tag, rest = line.split(b" ", 1)
            if rest.startswith(b"FETCH"):
                writer.write(b"* 1 FETCH (BODY[] {5}\r\nhello)\r\n" + tag + b" OK done\r\n")
            elif rest.startswith(b"APPEND"):
                writer.write(b"+ go\r\n")
                await writer.drain()
                await reader.readexactly(int(rest.split(b"{")[1].split(b"}")[0]) + 2)
                writer.write(tag + b" OK [APPENDUID 1 7] done\r\n")
            elif rest.startswith(b"LOGOUT"):
                writer.write(b"* BYE\r\n" + tag + b" OK bye\r\n")
            else:
                writer.write(tag + b" BAD what\r\n")
            await writer.drain()
        writer.close()

    async def main():
        server, port = await _scripted(handler)
        c = await IMAPClient.connect(port)
        untagged, tagged, secs = await c.command("FETCH 1 BODY[]")
        assert untagged == [b"* 1 FETCH (BODY[] {5}\r\nhello)\r\n"] and secs >= 0
        _, tagged, _ = await c.command("APPEND INBOX ()", literal=b"x" * 10)
        assert b"APPENDUID" in tagged
        with pytest.raises(ProtocolError, match="BAD what"):
            await c.command("NOPE")
        await c.close()
        server.close()

    asyncio.run(main())


def test_pop3ClientMultiline():
    async def handler(reader, writer):
        writer.write(b"+OK hi\r\n")
        while True:
            line = await reader.readline()
            if not line or line.startswith(b"QUIT"):
                writer.write(b"+OK bye\r\n")
                break
            if line.startswith(b"RETR"):
                writer.write(b"+OK\r\nline one.\r\n..dot\r\n.\r\n")
            elif line.startswith(b"UIDL"):
                writer.write(b"+OK\r\n.\r\n")
            else:
                writer.write(b"-ERR no\r\n")
        await writer.drain()
        writer.close()

    async def main():
        server, port = await _scripted(handler)
        c = await POP3Client.connect(port)
        _, body = await c.command("RETR 1", multiline=True)
        assert body == b"line one.\r\n..dot\r\n.\r\n"
        assert (await c.command("UIDL", multiline=True))[1] == b""
        with pytest.raises(ProtocolError):
            await c.command("STAT")
        await c.quit()
        server.close()

    asyncio.run(main())


def test_limitsBenchmarkRunsBriefly(tmp_path):
    """The cheapest real benchmark, shortened to a fraction of a second per figure."""
    assert b_limits.fsyncWrites(str(tmp_path), 0.1) > 0
    assert b_limits.maildirWrites(str(tmp_path), 0.1) > 0
    assert b_limits.tcpRoundTrips(0.1) > 0
    assert os.listdir(tmp_path) in ([], ["tmp", "new"]) or set(os.listdir(tmp_path)) == {"tmp", "new"}


def test_resultsJSONIsPlain(tmp_path):
    r = _fakeResults(tmp_path / "r.json")
    r.save()
    data = json.loads((tmp_path / "r.json").read_text())
    assert {"meta", "benchmarks", "measurements", "extra", "failures"} <= set(data)
    assert data["failures"][0]["server"] == "mailplat"
