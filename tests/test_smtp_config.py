"""The [smtp] configuration keys and how the Platform hands them (and SCRAM) to the SMTP server."""

import pytest
from twisted.internet import task

from mailplat.auth.sasl import scramCredentials
from mailplat.config import ConfigError, parseConfig


def test_new_smtp_keys_parsed():
    c = parseConfig(
        "[smtp]\nmax_line_length = 1024\nmax_text_line_length = 0\nmax_messages_per_connection = 5\n"
        'max_errors = 3\nmax_auth_failures = 2\nbare_line_endings = "normalise"\naccept_8bit_headers = true\n'
    ).smtp
    assert (c.max_line_length, c.max_text_line_length, c.max_messages_per_connection) == (1024, 0, 5)
    assert (c.max_errors, c.max_auth_failures, c.bare_line_endings, c.accept_8bit_headers) == (3, 2, "normalise", True)


def test_bad_smtp_keys_all_reported():
    with pytest.raises(ConfigError) as e:
        parseConfig(
            '[smtp]\nmax_line_length = 100\nmax_text_line_length = 10\nbare_line_endings = "fix"\nmax_errors = 0\n'
        )
    text = str(e.value)
    for key in ("max_line_length", "max_text_line_length", "bare_line_endings", "max_errors"):
        assert f"smtp.{key}" in text


def test_platform_passes_options_and_offers_scram_with_the_directory(tmp_path):
    from mailplat.platform import Platform

    config = parseConfig(
        f'[server]\ndata = "{tmp_path}"\n[smtp]\nmax_text_line_length = 2000\nmax_messages_per_connection = 7\n'
        'bare_line_endings = "normalise"\n'
    )
    platform = Platform(config, reactor=task.Clock())
    f = platform.smtpFactory("submission")
    assert (f.maxTextLineLength, f.maxMessagesPerConnection, f.normaliseBareLineEndings) == (2000, 7, True)
    names = f.sasl.names()
    assert "SCRAM-SHA-256" in names and "CRAM-MD5" in names
    assert "SCRAM-SHA-256" not in platform.sasl.names()  # IMAP and POP3 keep theirs
    # The directory keeps a SCRAM verifier, never the password, and forgets it with a new password.
    platform.directory.addDomain("example.org")
    platform.directory.addUser("alice@example.org", "hash")
    secret = scramCredentials("pencil")
    platform.directory.setScramSecret("alice@example.org", secret.toText())
    assert "pencil" not in platform.directory.getScramSecret("alice@example.org")
    platform.directory.setPasswordHash("alice@example.org", "hash2")
    assert platform.directory.getScramSecret("alice@example.org") is None
