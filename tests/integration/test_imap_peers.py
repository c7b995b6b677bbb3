"""
The IMAP server against real clients: imapclient (CONDSTORE, MOVE, IDLE,
UIDPLUS, SORT, THREAD, ESEARCH), mbsync and offlineimap3 syncing several
folders both ways, mutt in batch mode, curl and openssl s_client.
"""

import email.utils
import imaplib
import os
import subprocess
import threading
import time

import pytest

from helpers import DEFAULT_PORTS, MailplatProcess, freePorts, prepareData, requirePeer

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
USER = "carol@example.org"
PASSWORD = "imap peers secret"
PORTS = {}
FOLDERS = ("INBOX", "Lists/Python", "Work")
PER_FOLDER = 100


def message(i, folder, extra=""):
    # The Date depends only on i: UIDs differ from arrival numbers when appended concurrently.
    return (
        f"From: Sender {i} <s{i}@example.net>\r\nTo: {USER}\r\nSubject: {folder} message {i}{extra}\r\n"
        f"Message-ID: <{folder.replace('/', '.')}.{i}@example.net>\r\n"
        f"Date: {email.utils.formatdate(1700000000 + i * 60)}\r\n\r\nBody {i} of {folder}\r\n"
    ).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("imap-peers")
    PORTS.update(zip(DEFAULT_PORTS, freePorts(len(DEFAULT_PORTS))))
    prepareData(workdir, PORTS, USER, PASSWORD)
    proc = MailplatProcess(str(workdir), ["--config", "mailplat.toml"], ports=PORTS).start(waitFor=["imap", "imaps"])
    with imaplib.IMAP4(HOST, PORTS["imap"]) as imap:
        imap.login(USER, PASSWORD)
        for folder in FOLDERS[1:]:
            assert imap.create(folder)[0] == "OK"
    errors = []

    def fill(folder, part):
        # several connections at once: their appends share group commits
        try:
            with imaplib.IMAP4(HOST, PORTS["imap"]) as imap:
                imap.login(USER, PASSWORD)
                for i in range(part, PER_FOLDER, 5):
                    typ, _ = imap.append(folder, "(\\Seen)" if i % 3 == 0 else None, None, message(i, folder))
                    assert typ == "OK"
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=fill, args=(f, p)) for f in FOLDERS for p in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    proc.workdir_path = workdir
    yield proc
    proc.stop()


def connect():
    from imapclient import IMAPClient

    c = IMAPClient(HOST, port=PORTS["imap"], ssl=False, timeout=30)
    c.login(USER, PASSWORD)
    return c


def test_imapclient_condstore_move_uidplus_sort_thread(server):
    c = connect()
    try:
        caps = c.capabilities()
        for cap in (b"CONDSTORE", b"MOVE", b"IDLE", b"UIDPLUS", b"SORT", b"THREAD=REFERENCES", b"ESEARCH"):
            assert cap in caps
        c.create_folder("Scratch")
        c.enable("CONDSTORE")
        info = c.select_folder("Scratch")
        uidvalidity = info[b"UIDVALIDITY"]
        resp = c.append("Scratch", message(1, "Scratch", " apples"), flags=[b"$MDNSent"])
        assert f"[APPENDUID {uidvalidity} 1]".encode() in resp
        c.append("Scratch", message(2, "Scratch", " bananas"))
        c.append("Scratch", message(3, "Scratch", " Re: apples"))
        c.noop()
        highest = c.folder_status("Scratch", ["HIGHESTMODSEQ"])[b"HIGHESTMODSEQ"]
        c.add_flags([2], [b"\\Flagged"])
        changed = c.fetch([1, 2, 3], ["FLAGS"], modifiers=[f"CHANGEDSINCE {highest}"])
        assert list(changed) == [2] and b"MODSEQ" in changed[2]
        assert c.search(["KEYWORD", "$MDNSent"]) == [1]
        assert c.search(["BODY", "Scratch"]) == [1, 2, 3]
        assert c.sort(["REVERSE", "ARRIVAL"]) == [3, 2, 1]
        assert c.thread("ORDEREDSUBJECT") == ((1,), (2,), (3,)) or len(c.thread("REFERENCES")) >= 1
        c.move([1], "Archive")
        assert c.search(["ALL"]) == [2, 3]
        c.copy([2], "Archive")
        c.delete_messages([3])
        c.uid_expunge([3])
        assert c.search(["ALL"]) == [2]
        assert c.namespace().personal[0][0] == ""
        assert c.id_({"name": "pytest"})[0][:2] == (b"name", b"mailplat")
    finally:
        c.logout()


def test_imapclient_idle_sees_delivery(server):
    idler = connect()
    other = connect()
    try:
        idler.select_folder("INBOX")
        idler.idle()
        start = time.monotonic()
        other.append("INBOX", message(999, "INBOX", " idle"))
        responses = idler.idle_check(timeout=10)
        idler.idle_done()
        assert any(r[1] == b"EXISTS" for r in responses), responses
        assert time.monotonic() - start < 5
    finally:
        idler.logout()
        other.logout()


def mbsyncConfig(tmp, maildir):
    path = tmp / "mbsyncrc"
    path.write_text(f"""
IMAPAccount mailplat
Host {HOST}
Port {PORTS['imap']}
User {USER}
Pass "{PASSWORD}"
SSLType None
AuthMechs LOGIN

IMAPStore remote
Account mailplat

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel sync
Far :remote:
Near :local:
Patterns INBOX Lists/Python Work
Create Both
Expunge Both
SyncState *
""")
    return path


def maildirCount(path):
    return sum(len(os.listdir(os.path.join(path, d))) for d in ("cur", "new") if os.path.isdir(os.path.join(path, d)))


def test_mbsync_both_ways(server, tmp_path):
    mbsync = requirePeer("mbsync")
    maildir = tmp_path / "mail"
    maildir.mkdir()
    rc = mbsyncConfig(tmp_path, maildir)
    r = subprocess.run([mbsync, "-c", str(rc), "-a"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    with imaplib.IMAP4(HOST, PORTS["imap"]) as imap:
        imap.login(USER, PASSWORD)
        counts = {f: int(imap.status(f'"{f}"', "(MESSAGES)")[1][0].split()[-1].rstrip(b")")) for f in FOLDERS}
    for folder in FOLDERS:
        assert maildirCount(maildir / folder) == counts[folder], folder
    # local -> server: a new message and a flag change
    newdir = maildir / "Work" / "new"
    (newdir / "1700000000.local.mbsync").write_bytes(message(5000, "Work", " from mbsync"))
    curdir = maildir / "Lists/Python" / "cur"
    name = sorted(n for n in os.listdir(curdir) if ":2," in n and "F" not in n.split(":2,")[1])[0]
    os.rename(curdir / name, curdir / (name + "F" if name.endswith(",") else name.replace(":2,", ":2,F")))
    r = subprocess.run([mbsync, "-c", str(rc), "-a"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    with imaplib.IMAP4(HOST, PORTS["imap"]) as imap:
        imap.login(USER, PASSWORD)
        imap.select("Work")
        assert imap.search(None, "SUBJECT", '"from mbsync"')[1][0] != b""
        imap.select('"Lists/Python"')
        assert len(imap.search(None, "FLAGGED")[1][0].split()) >= 1


def test_offlineimap_both_ways(server, tmp_path):
    offlineimap = requirePeer("offlineimap")
    maildir = tmp_path / "oi"
    rc = tmp_path / "offlineimaprc"
    rc.write_text(f"""
[general]
accounts = mailplat
metadata = {tmp_path}/oi-meta
ui = basic

[Account mailplat]
localrepository = local
remoterepository = remote

[Repository local]
type = Maildir
localfolders = {maildir}

[Repository remote]
type = IMAP
remotehost = {HOST}
remoteport = {PORTS['imap']}
remoteuser = {USER}
remotepass = {PASSWORD}
ssl = no
starttls = no
folderfilter = lambda f: f in ("INBOX", "Lists/Python", "Work")
""")
    r = subprocess.run([offlineimap, "-c", str(rc), "-o", "-u", "basic"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ERROR" not in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    assert maildirCount(maildir / "INBOX") >= PER_FOLDER
    local = maildir / "Lists.Python" if (maildir / "Lists.Python").exists() else maildir / "Lists" / "Python"
    assert maildirCount(local) == PER_FOLDER
    (maildir / "Work" / "new" / "1700000001.oi.local").write_bytes(message(6000, "Work", " from offlineimap"))
    r = subprocess.run([offlineimap, "-c", str(rc), "-o", "-u", "basic"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with imaplib.IMAP4(HOST, PORTS["imap"]) as imap:
        imap.login(USER, PASSWORD)
        imap.select("Work")
        assert imap.search(None, "SUBJECT", '"from offlineimap"')[1][0] != b""


def test_multiappend_keeps_its_order_across_message_sizes(server):
    """MULTIAPPEND of a message kept in a file (over 128 KB) and then small ones: UIDs in the command's order."""
    import re
    import socket

    big = message(1, "Order", " big") + b"x" * 200_000 + b"\r\n"
    small = [message(i, "Order", f" small {i}") for i in (2, 3)]
    with socket.create_connection((HOST, PORTS["imap"]), timeout=30) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(f'a LOGIN "{USER}" "{PASSWORD}"\r\nb CREATE Order\r\n'.encode())
        tagged = {}
        while len(tagged) < 2:
            line = f.readline()
            if line[:1] in (b"a", b"b"):
                tagged[line[:1]] = line
        assert tagged[b"a"].startswith(b"a OK"), tagged
        command = b"c APPEND Order"
        for one in [big] + small:
            command += b" {%d+}\r\n" % len(one) + one
        s.sendall(command + b"\r\n")
        line = f.readline()
        while not line.startswith(b"c "):
            line = f.readline()
    assert line.startswith(b"c OK [APPENDUID "), line
    uids = re.match(rb"c OK \[APPENDUID \d+ (\d+):(\d+)\]", line)
    assert uids, line
    first, last = int(uids.group(1)), int(uids.group(2))
    assert last == first + 2
    with imaplib.IMAP4(HOST, PORTS["imap"]) as imap:
        imap.login(USER, PASSWORD)
        imap.select("Order", readonly=True)
        typ, data = imap.uid("FETCH", f"{first}:{last}", "(RFC822.SIZE)")
        sizes = [int(m) for m in re.findall(rb"RFC822.SIZE (\d+)", b" ".join(d if isinstance(d, bytes) else d[0] for d in data))]
        assert sizes == [len(big)] + [len(m) for m in small]


def test_curl_imap(server):
    curl = requirePeer("curl")
    url = f"imap://{HOST}:{PORTS['imap']}/Work"
    r = subprocess.run([curl, "-sS", "--ssl-reqd", "-k", "-u", f"{USER}:{PASSWORD}", url, "-X",
                        "UID SEARCH HEADER Message-ID <Work.7@example.net>"], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    uids = r.stdout.split(b"* SEARCH")[1].split()
    assert len(uids) == 1, r.stdout
    r = subprocess.run([curl, "-sS", "--ssl-reqd", "-k", "-u", f"{USER}:{PASSWORD}", url + "/;UID=" + uids[0].decode()],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == message(7, "Work")


def test_openssl_starttls(server):
    openssl = requirePeer("openssl")
    script = f'a LOGIN "{USER}" "{PASSWORD}"\nb SELECT INBOX\nc UID SEARCH RETURN (COUNT) ALL\nd LOGOUT\n'
    r = subprocess.run(
        [openssl, "s_client", "-quiet", "-starttls", "imap", "-connect", f"{HOST}:{PORTS['imap']}"],
        input=script.encode(), capture_output=True, timeout=60,
    )
    out = r.stdout.decode("utf-8", "replace")
    assert "a OK" in out and "b OK [READ-WRITE]" in out and "* ESEARCH (TAG \"c\") UID COUNT" in out, out
    assert "d OK" in out


def test_mutt_batch_reads_and_moves(server, tmp_path):
    mutt = requirePeer("mutt", "script")[0]
    rc = tmp_path / "muttrc"
    rc.write_text(f"""
set folder="imap://{USER.replace('@', '%40')}@{HOST}:{PORTS['imap']}/"
set imap_pass="{PASSWORD}"
set ssl_starttls=no
set ssl_force_tls=no
set spoolfile="+Work"
set confirmappend=no
set move=no
set header_cache=""
set delete=yes
""")
    keys = "<tag-pattern>~i<space>Work.42@<enter><tag-prefix><save-message>+Archive<enter><sync-mailbox><exit>"
    cmd = f"{mutt} -n -F {rc} -e 'push {keys}'"
    r = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, timeout=60,
                       env=dict(os.environ, TERM="xterm", HOME=str(tmp_path)), stdin=subprocess.DEVNULL)
    with imaplib.IMAP4(HOST, PORTS["imap"]) as imap:
        imap.login(USER, PASSWORD)
        imap.select("Archive")
        found = imap.search(None, "SUBJECT", '"Work message 42"')[1][0]
        assert found != b"", r.stdout[-2000:]
        imap.select("Work")
        assert imap.search(None, "SUBJECT", '"Work message 42"')[1][0] == b""
