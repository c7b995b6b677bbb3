"""
mailplat and a third-party extension, installed from wheels (not editable)
into a fresh virtual environment: twistd lists every mailplat plugin, every
built-in extension and the third-party one are found by name, and a server
started from that environment runs the extension named in its config.
"""

import imaplib
import os
import smtplib
import subprocess
import sys
import time

import pytest

from helpers import TWISTD, MailplatProcess, configForPorts, freePorts

pytestmark = pytest.mark.integration

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXAMPLE = os.path.join(ROOT, "examples", "subject-tag")


def run(*args, **kw):
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{args} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _haveBuildTools():
    try:
        import setuptools  # noqa: F401
        import wheel  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("venv")
    wheels = base / "wheels"
    isolation = ["--no-build-isolation"] if _haveBuildTools() else []
    for project in (ROOT, EXAMPLE):
        # Build from a copy so no build artefacts land in the checkout.
        src = base / ("src-" + os.path.basename(project))
        subprocess.run(["cp", "-r", project, str(src)], check=True)
        for junk in ("build", ".venv", "mailplat-data"):
            subprocess.run(["rm", "-rf", str(src / junk)], check=True)
        run(sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(wheels), str(src))
    env = base / "env"
    # The dependencies come from this interpreter; mailplat itself only from the wheel.
    run(sys.executable, "-m", "venv", "--system-site-packages", str(env))
    python = str(env / "bin" / "python")
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall",
        *[str(w) for w in sorted(wheels.iterdir())])
    return python


def test_installedNotEditable(venv):
    out = run(venv, "-c", "import mailplat, twisted.plugins.mailplat_plugins as p; print(mailplat.__file__); print(p.__file__)",
              cwd="/")
    for line in out.split():
        assert "site-packages" in line and "/src/" not in line, out


def test_twistdListsEveryPlugin(venv):
    out = run(venv, "-c", TWISTD, "--help", cwd="/")
    for name in ("mailplat", "mailplat-smtp", "mailplat-imap", "mailplat-pop3", "mailplat-http"):
        assert f"    {name} " in out, out


def test_extensionPluginsFoundByName(venv):
    script = (
        "from mailplat import plugins\n"
        "for kind, name in [('store','sqlite'),('queue','sqlite'),('checker','directory'),('checker','file'),"
        "('router','directory'),('converter','text'),('processor','subject-tag')]:\n"
        "    print(kind, name, type(plugins.find(kind, name)).__module__)\n"
        "try:\n"
        "    plugins.find('store', 'nonexistent')\n"
        "except plugins.PluginError as e:\n"
        "    print('ERR', e)\n"
    )
    out = run(venv, "-c", script, cwd="/")
    assert "processor subject-tag mailplat_subject_tag" in out
    assert "ERR unknown store plugin 'nonexistent' (known: sqlite)" in out


def test_unknownPluginStopsStartup(venv, tmp_path):
    (tmp_path / "bad.toml").write_text('[store]\nplugin = "nosuch"\n[[processors]]\nplugin = "alsomissing"\n')
    r = subprocess.run([venv, "-m", "mailplat.cli", "--config", "bad.toml", "checkconfig"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "unknown store plugin 'nosuch' (known: sqlite)" in r.stderr
    assert "unknown processor plugin 'alsomissing' (known: subject-tag)" in r.stderr
    r = subprocess.run([venv, "-c", TWISTD, "--pidfile=", "-n", "mailplat", "--config", "bad.toml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "unknown store plugin 'nosuch'" in r.stdout + r.stderr


def test_thirdPartyProcessorSelectedByName(venv, tmp_path):
    names = ["smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s", "http"]
    ports = dict(zip(names, freePorts(len(names))))
    data = str(tmp_path / "data")
    config = configForPorts(ports, data, '[[processors]]\nplugin = "subject-tag"\nargs = { tag = "[ext]" }\n')
    (tmp_path / "mailplat.toml").write_text(config)
    for args, inp in ((["domain", "add", "example.org"], None), (["user", "add", "carol@example.org"], "pw-carol\n")):
        r = subprocess.run([venv, "-m", "mailplat.cli", "--config", "mailplat.toml", *args], cwd=tmp_path,
                           input=inp, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    proc = MailplatProcess(str(tmp_path), ["--config", "mailplat.toml"], ports=ports, python=venv)
    proc.start(waitFor=["smtp", "imap"])
    try:
        with smtplib.SMTP("127.0.0.1", ports["smtp"]) as s:
            s.sendmail("x@example.net", ["carol@example.org"], b"Subject: hello\r\n\r\nhi\r\n")
        deadline = time.monotonic() + 15
        while True:
            with imaplib.IMAP4("127.0.0.1", ports["imap"]) as imap:
                imap.login("carol@example.org", "pw-carol")
                imap.select("INBOX")
                typ, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                if typ == "OK" and data and data[0] is not None and isinstance(data[0], tuple):
                    assert data[0][1].strip() == b"Subject: [ext] hello", data
                    break
            assert time.monotonic() < deadline, "the message never arrived"
            time.sleep(0.1)
    finally:
        proc.stop()
