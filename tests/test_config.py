import os

import pytest

from mailplat.config import Config, ConfigError, defaultConfig, loadConfig, parseConfig

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "mailplat.toml")


def test_exampleConfigLoadsAndMatchesDefaults():
    config = loadConfig(EXAMPLE)
    default = Config()
    assert config.smtp == default.smtp
    assert config.imap == default.imap
    assert config.pop3 == default.pop3
    assert config.http == default.http
    assert config.store.plugin == "sqlite" and config.store.args == {"path": "store", "fulltext": False, "inline_max": 131072}
    assert config.checkers[0].plugin == "directory"
    assert config.hostname == "mail.example.org"


def test_emptyConfigIsTheEmbeddedDefault():
    c = parseConfig("")
    assert c.smtp.listen == ("tcp:2525:interface=127.0.0.1",)
    assert c.imap.listen_tls == ("tcp:2993:interface=127.0.0.1",)
    assert c.pop3.listen == ("tcp:2110:interface=127.0.0.1",)
    assert c.http.listen == ("tcp:8080:interface=127.0.0.1",)
    assert defaultConfig("/x").data == "/x"


def test_everyErrorReportedWithItsPath():
    with pytest.raises(ConfigError) as e:
        parseConfig(
            """
[server]
hostnme = "x"
[smtp]
max_message_size = -1
listen = ["nonsense:1"]
[auth]
plaintext_auth = "sometimes"
[[processors]]
args = {}
[tls]
certificate = "/nonexistent.pem"
""",
            "test.toml",
        )
    errors = e.value.errors
    joined = "\n".join(errors)
    assert "test.toml: server.hostnme: unknown key" in joined
    assert "smtp.max_message_size: must be a positive integer" in joined
    assert "smtp.listen[0]: not a valid server endpoint string" in joined
    assert "auth.plaintext_auth" in joined
    assert "processors[0].plugin: is required" in joined
    assert "tls: certificate and key must be given together" in joined
    assert len(errors) >= 6


def test_badToml():
    with pytest.raises(ConfigError) as e:
        parseConfig("[smtp\n", "x.toml")
    assert "not valid TOML" in str(e.value)


def test_pluginShorthandAndArgs():
    c = parseConfig('[[processors]]\nplugin = "subject-tag"\nargs = { tag = "[x]" }\n[routing]\nplugin = "directory"\n')
    assert c.processors[0].plugin == "subject-tag"
    assert c.processors[0].args == {"tag": "[x]"}
    c = parseConfig('processors = ["a", "b"]')
    assert [p.plugin for p in c.processors] == ["a", "b"]


def test_missingFile(tmp_path):
    with pytest.raises(ConfigError) as e:
        loadConfig(str(tmp_path / "nope.toml"))
    assert "cannot read" in str(e.value)


def test_workerProcesses():
    c = parseConfig('[imap]\nprocesses = 4\n[pop3]\nprocesses = 2\nlisten = ["tcp6:port=2110:interface=\\\\:\\\\:1"]\n')
    assert (c.imap.processes, c.pop3.processes) == (4, 2)
    assert Config().imap.processes == 1 and Config().pop3.processes == 1
    with pytest.raises(ConfigError) as e:
        parseConfig('[imap]\nprocesses = 0\n[pop3]\nprocesses = 65\n', "w.toml")
    joined = "\n".join(e.value.errors)
    assert "imap.processes: must be a positive integer" in joined
    assert "pop3.processes: must be at most 64" in joined
    # Worker processes share plain TCP sockets only.
    with pytest.raises(ConfigError) as e:
        parseConfig('[imap]\nprocesses = 2\nlisten_tls = ["unix:/tmp/imap.sock"]\n', "w.toml")
    assert "imap.listen_tls[0]: with processes > 1, only tcp: and tcp6: listeners" in "\n".join(e.value.errors)
    # One process: any endpoint, as before.
    assert parseConfig('[imap]\nlisten_tls = ["unix:/tmp/imap.sock"]\n').imap.listen_tls == ("unix:/tmp/imap.sock",)


def test_smtpWorkerProcesses():
    assert parseConfig("[smtp]\nprocesses = 3\n").smtp.processes == 3
    with pytest.raises(ConfigError) as e:
        parseConfig('[smtp]\nprocesses = 2\nsubmission = ["unix:/tmp/sub.sock"]\n[[hooks]]\nplugin = "greylist"\n',
                    "w.toml")
    joined = "\n".join(e.value.errors)
    assert "smtp.submission[0]: with processes > 1, only tcp: and tcp6: listeners" in joined
    assert "smtp.processes: the greylist hook keeps its state in one process" in joined
    # The stateless hooks are fine with several processes.
    c = parseConfig('[smtp]\nprocesses = 2\n[[hooks]]\nplugin = "dnsbl"\nargs = { zones = ["zen.example"] }\n')
    assert c.smtp.processes == 2


def test_sharedMailboxes():
    from mailplat.imap.shared import SharedMailbox

    c = parseConfig("""
[imap]
shared_prefix = "Public"

[[imap.shared]]
name = "Sales"
owner = "Sales@Example.COM"
users = ["@example.com", "bob@other.org"]

[[imap.shared]]
name = "News"
owner = "news@example.com"
mailbox = "inbox/feeds"
users = ["*"]
read_only = true
""")
    assert c.imap.shared_prefix == "Public"
    assert c.imap.shared == (
        SharedMailbox("Sales", "sales@example.com", "INBOX", ("@example.com", "bob@other.org"), False),
        SharedMailbox("News", "news@example.com", "INBOX/feeds", ("*",), True),
    )
    assert Config().imap.shared == () and Config().imap.shared_prefix == "Shared"
    with pytest.raises(ConfigError) as e:
        parseConfig("""
[imap]
shared_prefix = "a/b"

[[imap.shared]]
name = "Sa/les"
owner = "sales"
users = []
colour = "red"

[[imap.shared]]
owner = "x@example.com"
users = ["*"]

[[imap.shared]]
name = "Dup"
owner = "x@example.com"
users = ["*"]

[[imap.shared]]
name = "Dup"
owner = "y@example.com"
users = ["*"]
""")
    text = str(e.value)
    for expected in (
        "imap.shared_prefix: must be a valid mailbox name of one level",
        "imap.shared[0].colour: unknown key",
        "imap.shared[0].name: must be a valid mailbox name of one level",
        "imap.shared[0].owner: must be an account",
        "imap.shared[0].users: is required",
        "imap.shared[1].name: is required",
        "imap.shared[3].name: 'Dup' is already the name of another shared mailbox",
    ):
        assert expected in text, text
