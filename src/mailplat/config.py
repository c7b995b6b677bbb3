"""
Configuration: a TOML file turned into validated, typed objects.

The whole file is checked before anything starts.  Unknown keys are refused
(a misspelt key must never be silently ignored), and every problem is
reported at once, each with its key path (C{smtp.max_message_size: must be
a positive integer}).  C{mailplat checkconfig} runs the same check.

With no file at all, L{defaultConfig} gives the embedded default: data
under C{./mailplat-data}, SQLite, and loopback listeners on high ports.
See C{examples/mailplat.toml} for every key with its meaning.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import endpoints


class ConfigError(Exception):
    """One or more problems in a configuration; C{errors} lists them all."""

    def __init__(self, errors):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True)
class PluginChoice:
    plugin: str
    args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SMTPConfig:
    enabled: bool = True
    listen: tuple = ("tcp:2525:interface=127.0.0.1",)
    submission: tuple = ("tcp:2587:interface=127.0.0.1",)
    submissions: tuple = ("tcp:2465:interface=127.0.0.1",)
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 1000
    idle_timeout: int = 300
    auth_on_mx: bool = False
    max_line_length: int = 512
    max_text_line_length: int = 1000
    max_messages_per_connection: int = 1000
    max_errors: int = 20
    max_auth_failures: int = 5
    bare_line_endings: str = "refuse"
    accept_8bit_headers: bool = False
    #: Worker processes receiving mail (1: the main process does).
    processes: int = 1
    #: A message for one local mailbox is stored at the end of DATA, without a queue entry.
    direct_delivery: bool = True


@dataclass(frozen=True)
class AccessConfig:
    """IMAP or POP3 listeners (plain/STARTTLS and implicit TLS)."""

    enabled: bool = True
    listen: tuple = ()
    listen_tls: tuple = ()
    idle_timeout: int = 1800
    #: Worker processes serving the sessions (1: the main process serves them).
    processes: int = 1


@dataclass(frozen=True)
class IMAPConfig(AccessConfig):
    """IMAP listeners, and the shared namespace (L{mailplat.imap.shared}): C{[[imap.shared]]} grants under C{shared_prefix}."""

    shared_prefix: str = "Shared"
    #: L{mailplat.imap.shared.SharedMailbox} grants, in configuration order.
    shared: tuple = ()


@dataclass(frozen=True)
class OutboundConfig:
    """Delivery to other mail servers (see examples/mailplat.toml)."""

    enabled: bool = True
    port: int = 25
    dns_servers: tuple = ()
    smarthost: str = ""
    smarthost_user: str = ""
    smarthost_password_file: str = ""
    tls: str = "opportunistic"
    max_lifetime: int = 5 * 86400
    delay_warning: int = 4 * 3600
    per_destination: int = 20
    connect_timeout: int = 30
    domains: dict = field(default_factory=dict)


#: The most worker processes one role may have.
MAX_PROCESSES = 64
#: Built-in SMTP hooks that keep state in their process (not shared by SMTP worker processes).
STATEFUL_HOOKS = frozenset({"greylist", "limits"})

TLS_POLICIES = ("never", "opportunistic", "require", "verify")


@dataclass(frozen=True)
class LimitsConfig:
    """Connections each listener accepts: from one client address, and in all."""

    connections_per_ip: int = 50
    connections: int = 10000


@dataclass(frozen=True)
class HTTPConfig:
    enabled: bool = True
    listen: tuple = ("tcp:8080:interface=127.0.0.1",)


@dataclass(frozen=True)
class Config:
    hostname: str = "localhost"
    data: str = "./mailplat-data"
    log_level: str = "info"
    certificate: str = ""
    key: str = ""
    plaintext_auth: str = "loopback"
    store: PluginChoice = PluginChoice("sqlite")
    queue: PluginChoice = PluginChoice("sqlite")
    retry_schedule: tuple = (60, 300, 900, 1800, 3600)
    checkers: tuple = (PluginChoice("directory"),)
    router: PluginChoice = PluginChoice("directory")
    hooks: tuple = ()
    processors: tuple = ()
    converters: tuple = ()
    smtp: SMTPConfig = SMTPConfig()
    imap: IMAPConfig = IMAPConfig(
        listen=("tcp:2143:interface=127.0.0.1",), listen_tls=("tcp:2993:interface=127.0.0.1",)
    )
    pop3: AccessConfig = AccessConfig(
        listen=("tcp:2110:interface=127.0.0.1",), listen_tls=("tcp:2995:interface=127.0.0.1",), idle_timeout=600
    )
    http: HTTPConfig = HTTPConfig()
    outbound: OutboundConfig = OutboundConfig()
    limits: LimitsConfig = LimitsConfig()
    source: str = "<embedded default>"

    @property
    def dataDir(self) -> str:
        return os.path.abspath(self.data)


def defaultConfig(data: str | None = None) -> Config:
    """The embedded default (optionally with another data directory)."""
    if data is None:
        return Config()
    return Config(data=data)


class _Checker:
    def __init__(self):
        self.errors: list[str] = []

    def error(self, path, message):
        self.errors.append(f"{path}: {message}")

    def table(self, value, path, known):
        if not isinstance(value, dict):
            self.error(path, "must be a table")
            return {}
        for key in value:
            if key not in known:
                self.error(f"{path}.{key}" if path else key,
                           f"unknown key (known: {', '.join(sorted(known))})")
        return value

    def string(self, table, key, path, default, nonEmpty=True):
        if key not in table:
            return default
        v = table[key]
        if not isinstance(v, str) or (nonEmpty and not v):
            self.error(f"{path}.{key}", "must be a non-empty string" if nonEmpty else "must be a string")
            return default
        return v

    def boolean(self, table, key, path, default):
        if key not in table:
            return default
        v = table[key]
        if not isinstance(v, bool):
            self.error(f"{path}.{key}", "must be true or false")
            return default
        return v

    def positiveInt(self, table, key, path, default):
        if key not in table:
            return default
        v = table[key]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            self.error(f"{path}.{key}", "must be a positive integer")
            return default
        return v

    def nonNegativeInt(self, table, key, path, default):
        if key not in table:
            return default
        v = table[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            self.error(f"{path}.{key}", "must be an integer, 0 or more")
            return default
        return v

    def endpoints(self, table, key, path, default):
        if key not in table:
            return default
        v = table[key]
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            self.error(f"{path}.{key}", "must be a list of endpoint strings such as \"tcp:2525:interface=127.0.0.1\"")
            return default
        for i, desc in enumerate(v):
            try:
                endpoints._parseServer(desc, None)
            except Exception as e:
                self.error(f"{path}.{key}[{i}]", f"not a valid server endpoint string ({e})")
        return tuple(v)

    def workerListeners(self, name, section):
        """With C{processes} > 1 the listening sockets are shared with worker processes: TCP only."""
        if section.processes > MAX_PROCESSES:
            self.error(f"{name}.processes", f"must be at most {MAX_PROCESSES}")
        if section.processes < 2 or not section.enabled:
            return
        from mailplat.workers import socketAddress

        keys = ("listen", "submission", "submissions") if name == "smtp" else ("listen", "listen_tls")
        for key in keys:
            for i, desc in enumerate(getattr(section, key)):
                try:
                    socketAddress(desc)
                except ValueError as e:
                    self.error(f"{name}.{key}[{i}]", f"with processes > 1, {e}")

    def plugin(self, value, path, default=None):
        if isinstance(value, str):
            return PluginChoice(value)
        t = self.table(value, path, {"plugin", "args"})
        name = self.string(t, "plugin", path, None)
        if name is None:
            if "plugin" not in t:
                self.error(f"{path}.plugin", "is required")
            return default
        args = t.get("args", {})
        if not isinstance(args, dict):
            self.error(f"{path}.args", "must be a table")
            args = {}
        return PluginChoice(name, dict(args))

    def pluginList(self, table, key, path):
        if key not in table:
            return ()
        v = table[key]
        if not isinstance(v, list):
            self.error(f"{path}{key}", "must be an array of tables ([[...]]) or of plugin names")
            return ()
        out = []
        for i, item in enumerate(v):
            choice = self.plugin(item, f"{path}{key}[{i}]")
            if choice is not None:
                out.append(choice)
        return tuple(out)


def _sharedPrefix(c, t, default):
    prefix = c.string(t, "shared_prefix", "imap", default)
    from mailplat.interfaces.storage import InvalidMailboxName, validateMailboxName

    try:
        ok = validateMailboxName(prefix) == prefix and "/" not in prefix and prefix.upper() != "INBOX"
    except InvalidMailboxName:
        ok = False
    if not ok:
        c.error("imap.shared_prefix", "must be a valid mailbox name of one level (no \"/\"), not INBOX")
        return default
    return prefix


def _sharedMailboxes(c, t, default):
    """C{[[imap.shared]]}: name, owner, mailbox (INBOX), users (accounts, "@domain" or "*"), read_only."""
    from mailplat.imap.shared import SharedMailbox
    from mailplat.interfaces.storage import InvalidMailboxName, validateMailboxName

    if "shared" not in t:
        return default
    v = t["shared"]
    if not isinstance(v, list):
        c.error("imap.shared", "must be an array of tables ([[imap.shared]])")
        return default
    out, names = [], set()
    for i, item in enumerate(v):
        path = f"imap.shared[{i}]"
        item = c.table(item, path, {"name", "owner", "mailbox", "users", "read_only"})
        name = c.string(item, "name", path, None)
        owner = c.string(item, "owner", path, None)
        for key, value in (("name", name), ("owner", owner)):
            if value is None and key not in item:
                c.error(f"{path}.{key}", "is required")
        mailbox = c.string(item, "mailbox", path, "INBOX")
        try:
            mailbox = validateMailboxName(mailbox)
        except InvalidMailboxName as e:
            c.error(f"{path}.mailbox", f"not a valid mailbox name ({e})")
        if name is not None:
            try:
                valid = validateMailboxName(name) == name and "/" not in name
            except InvalidMailboxName:
                valid = False
            if not valid:
                c.error(f"{path}.name", "must be a valid mailbox name of one level (no \"/\")")
            elif name in names:
                c.error(f"{path}.name", f"{name!r} is already the name of another shared mailbox")
            names.add(name)
        if owner is not None:
            from mailplat.directory import DirectoryError, normaliseAddress

            try:
                owner = normaliseAddress(owner)
            except DirectoryError as e:
                c.error(f"{path}.owner", f"must be an account (user@domain): {e}")
                owner = None
        users = item.get("users")
        if not isinstance(users, list) or not users or not all(isinstance(u, str) and u for u in users):
            c.error(f"{path}.users", 'is required: a list of accounts, "@domain" for a whole domain, or "*"')
            users = []
        readOnly = c.boolean(item, "read_only", path, False)
        if name is not None and owner is not None:
            out.append(SharedMailbox(name, owner, mailbox, tuple(users), readOnly))
    return tuple(out)


def parseConfig(text: str, source: str = "<string>") -> Config:
    """Parse and validate TOML text; raise L{ConfigError} listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{source}: not valid TOML: {e}"])
    return _build(raw, source)


def loadConfig(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the configuration file: {e.strerror}"])
    return parseConfig(text, path)


def _build(raw: dict[str, Any], source: str) -> Config:
    c = _Checker()
    base = Config()
    top = c.table(raw, "", {"server", "tls", "store", "queue", "auth", "routing", "hooks", "processors",
                            "converters", "smtp", "imap", "pop3", "http", "outbound", "limits"})

    server = c.table(top.get("server", {}), "server", {"hostname", "data", "log_level"})
    hostname = c.string(server, "hostname", "server", base.hostname)
    data = c.string(server, "data", "server", base.data)
    from mailplat.log import LEVELS

    logLevel = c.string(server, "log_level", "server", base.log_level)
    if logLevel not in LEVELS:
        c.error("server.log_level", f"must be one of {', '.join(LEVELS)}")

    tls = c.table(top.get("tls", {}), "tls", {"certificate", "key"})
    certificate = c.string(tls, "certificate", "tls", "", nonEmpty=False)
    key = c.string(tls, "key", "tls", "", nonEmpty=False)
    if bool(certificate) != bool(key):
        c.error("tls", "certificate and key must be given together (or neither, for a generated self-signed pair)")
    for k, p in (("certificate", certificate), ("key", key)):
        if p and not os.path.isfile(p):
            c.error(f"tls.{k}", f"no such file: {p}")

    store = c.plugin(top.get("store", {"plugin": "sqlite"}), "store", base.store)

    queueTable = top.get("queue", {})
    if isinstance(queueTable, dict) and "retry_schedule" in queueTable:
        rs = queueTable["retry_schedule"]
        queueTable = {k: v for k, v in queueTable.items() if k != "retry_schedule"}
        if not isinstance(rs, list) or not rs or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in rs):
            c.error("queue.retry_schedule", "must be a non-empty list of positive integers (seconds)")
            rs = base.retry_schedule
        retry = tuple(rs)
    else:
        retry = base.retry_schedule
    if isinstance(queueTable, dict) and "plugin" not in queueTable:
        queueTable = dict(queueTable, plugin="sqlite")
    queue = c.plugin(queueTable, "queue", base.queue)

    auth = c.table(top.get("auth", {}), "auth", {"checkers", "plaintext_auth"})
    checkers = c.pluginList(auth, "checkers", "auth.") if "checkers" in auth else base.checkers
    if "checkers" in auth and not checkers:
        c.error("auth.checkers", "must name at least one checker")
    plaintext = c.string(auth, "plaintext_auth", "auth", base.plaintext_auth)
    if plaintext not in ("loopback", "always", "tls"):
        c.error("auth.plaintext_auth", 'must be "tls" (only after TLS), "loopback" (also on loopback connections) or "always"')

    router = c.plugin(top.get("routing", {"plugin": "directory"}), "routing", base.router)

    hooks = c.pluginList(top, "hooks", "")
    processors = c.pluginList(top, "processors", "")
    converters = c.pluginList(top, "converters", "")

    smtpT = c.table(top.get("smtp", {}), "smtp", set(SMTPConfig.__dataclass_fields__))
    s0 = SMTPConfig()
    smtp = SMTPConfig(
        enabled=c.boolean(smtpT, "enabled", "smtp", s0.enabled),
        listen=c.endpoints(smtpT, "listen", "smtp", s0.listen),
        submission=c.endpoints(smtpT, "submission", "smtp", s0.submission),
        submissions=c.endpoints(smtpT, "submissions", "smtp", s0.submissions),
        max_message_size=c.positiveInt(smtpT, "max_message_size", "smtp", s0.max_message_size),
        max_recipients=c.positiveInt(smtpT, "max_recipients", "smtp", s0.max_recipients),
        idle_timeout=c.positiveInt(smtpT, "idle_timeout", "smtp", s0.idle_timeout),
        auth_on_mx=c.boolean(smtpT, "auth_on_mx", "smtp", s0.auth_on_mx),
        max_line_length=c.positiveInt(smtpT, "max_line_length", "smtp", s0.max_line_length),
        max_text_line_length=c.nonNegativeInt(smtpT, "max_text_line_length", "smtp", s0.max_text_line_length),
        max_messages_per_connection=c.nonNegativeInt(
            smtpT, "max_messages_per_connection", "smtp", s0.max_messages_per_connection
        ),
        max_errors=c.positiveInt(smtpT, "max_errors", "smtp", s0.max_errors),
        max_auth_failures=c.positiveInt(smtpT, "max_auth_failures", "smtp", s0.max_auth_failures),
        bare_line_endings=c.string(smtpT, "bare_line_endings", "smtp", s0.bare_line_endings),
        accept_8bit_headers=c.boolean(smtpT, "accept_8bit_headers", "smtp", s0.accept_8bit_headers),
        processes=c.positiveInt(smtpT, "processes", "smtp", s0.processes),
        direct_delivery=c.boolean(smtpT, "direct_delivery", "smtp", s0.direct_delivery),
    )
    if smtp.bare_line_endings not in ("refuse", "normalise"):
        c.error("smtp.bare_line_endings", 'must be "refuse" or "normalise"')
    if smtp.max_line_length < 512:
        c.error("smtp.max_line_length", "must be at least 512 (RFC 5321 4.5.3.1.4)")
    if 0 < smtp.max_text_line_length < 1000:
        c.error("smtp.max_text_line_length", "must be 0 (no limit) or at least 1000 (RFC 5321 4.5.3.1.6)")

    def access(name, default, kind=AccessConfig, **extra):
        t = c.table(top.get(name, {}), name, set(kind.__dataclass_fields__))
        return kind(
            enabled=c.boolean(t, "enabled", name, default.enabled),
            listen=c.endpoints(t, "listen", name, default.listen),
            listen_tls=c.endpoints(t, "listen_tls", name, default.listen_tls),
            idle_timeout=c.positiveInt(t, "idle_timeout", name, default.idle_timeout),
            processes=c.positiveInt(t, "processes", name, default.processes),
            **{k: f(t) for k, f in extra.items()},
        )

    imapT = top.get("imap", {}) if isinstance(top.get("imap", {}), dict) else {}
    prefix = _sharedPrefix(c, imapT, base.imap.shared_prefix)
    imap = access("imap", base.imap, IMAPConfig, shared_prefix=lambda t: prefix,
                  shared=lambda t: _sharedMailboxes(c, t, base.imap.shared))
    pop3 = access("pop3", base.pop3)
    for name, section in (("smtp", smtp), ("imap", imap), ("pop3", pop3)):
        c.workerListeners(name, section)
    stateful = sorted({h.plugin for h in hooks} & STATEFUL_HOOKS)
    if smtp.processes > 1 and stateful:
        what = "hooks keep their" if len(stateful) > 1 else "hook keeps its"
        c.error("smtp.processes", f"the {' and '.join(stateful)} {what} state in one process:"
                " use processes = 1 with them")
    httpT = c.table(top.get("http", {}), "http", set(HTTPConfig.__dataclass_fields__))
    http = HTTPConfig(
        enabled=c.boolean(httpT, "enabled", "http", HTTPConfig().enabled),
        listen=c.endpoints(httpT, "listen", "http", HTTPConfig().listen),
    )

    outbound = _outbound(c, top.get("outbound", {}))
    limitsT = c.table(top.get("limits", {}), "limits", set(LimitsConfig.__dataclass_fields__))
    limits = LimitsConfig(
        connections_per_ip=c.positiveInt(limitsT, "connections_per_ip", "limits", LimitsConfig().connections_per_ip),
        connections=c.positiveInt(limitsT, "connections", "limits", LimitsConfig().connections),
    )

    if c.errors:
        raise ConfigError([f"{source}: {e}" for e in c.errors])
    return Config(
        hostname=hostname, data=data, log_level=logLevel, certificate=certificate, key=key, plaintext_auth=plaintext,
        store=store, queue=queue, retry_schedule=retry, checkers=tuple(checkers), router=router,
        hooks=hooks, processors=processors, converters=converters,
        smtp=smtp, imap=imap, pop3=pop3, http=http, outbound=outbound, limits=limits, source=source,
    )


def _hostPort(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, "25"
    host = host.strip("[]")
    return bool(host) and port.isascii() and port.isdigit() and 0 < int(port) < 65536


def _outbound(c: _Checker, raw) -> OutboundConfig:
    o0 = OutboundConfig()
    known = set(OutboundConfig.__dataclass_fields__)
    t = c.table(raw, "outbound", known)
    port = c.positiveInt(t, "port", "outbound", o0.port)
    if port > 65535:
        c.error("outbound.port", "must be a TCP port number")
    servers = t.get("dns_servers", [])
    if not isinstance(servers, list) or not all(isinstance(x, str) and _hostPort(x) for x in servers):
        c.error("outbound.dns_servers", 'must be a list of "address:port" strings such as "127.0.0.1:53"')
        servers = []
    smarthost = c.string(t, "smarthost", "outbound", "", nonEmpty=False)
    if smarthost and not _hostPort(smarthost):
        c.error("outbound.smarthost", 'must be "host" or "host:port"')
    passwordFile = c.string(t, "smarthost_password_file", "outbound", "", nonEmpty=False)
    if passwordFile and not os.path.isfile(passwordFile):
        c.error("outbound.smarthost_password_file", f"no such file: {passwordFile}")
    tls = c.string(t, "tls", "outbound", o0.tls)
    if tls not in TLS_POLICIES:
        c.error("outbound.tls", f"must be one of {', '.join(TLS_POLICIES)}")
    domains = {}
    rawDomains = t.get("domains", {})
    if not isinstance(rawDomains, dict):
        c.error("outbound.domains", 'must be a table of [outbound.domains."example.com"] tables')
        rawDomains = {}
    for name, value in rawDomains.items():
        path = f'outbound.domains."{name}"'
        d = c.table(value, path, {"tls", "route"})
        dtls = c.string(d, "tls", path, tls)
        if dtls not in TLS_POLICIES:
            c.error(f"{path}.tls", f"must be one of {', '.join(TLS_POLICIES)}")
        route = c.string(d, "route", path, "", nonEmpty=False)
        if route and not _hostPort(route):
            c.error(f"{path}.route", 'must be "host" or "host:port"')
        domains[name.lower().rstrip(".")] = {"tls": dtls, "route": route}
    return OutboundConfig(
        enabled=c.boolean(t, "enabled", "outbound", o0.enabled),
        port=port,
        dns_servers=tuple(servers),
        smarthost=smarthost,
        smarthost_user=c.string(t, "smarthost_user", "outbound", "", nonEmpty=False),
        smarthost_password_file=passwordFile,
        tls=tls,
        max_lifetime=c.positiveInt(t, "max_lifetime", "outbound", o0.max_lifetime),
        delay_warning=c.positiveInt(t, "delay_warning", "outbound", o0.delay_warning),
        per_destination=c.positiveInt(t, "per_destination", "outbound", o0.per_destination),
        connect_timeout=c.positiveInt(t, "connect_timeout", "outbound", o0.connect_timeout),
        domains=domains,
    )
