"""mailplat's Twisted plugins: twistd service makers and the built-in extensions."""

from twisted.application.service import ServiceMaker

from mailplat.mime.convert import TextConvertersFactory
from mailplat.auth.checkers import DirectoryCheckerFactory, PasswordFileCheckerFactory
from mailplat.queue.sqlite import SQLiteQueueFactory
from mailplat.routing.directory import DirectoryRouterFactory
from mailplat.store.sqlite import SQLiteStoreFactory

mailplat = ServiceMaker("mailplat", "mailplat.tap", "A mail platform: SMTP, IMAP, POP3 and HTTP", "mailplat")
mailplatSMTP = ServiceMaker("mailplat-smtp", "mailplat.tap.smtp", "mailplat SMTP (MX, submission) and the queue", "mailplat-smtp")
mailplatIMAP = ServiceMaker("mailplat-imap", "mailplat.tap.imap", "mailplat IMAP4 server", "mailplat-imap")
mailplatPOP3 = ServiceMaker("mailplat-pop3", "mailplat.tap.pop3", "mailplat POP3 server", "mailplat-pop3")
mailplatHTTP = ServiceMaker("mailplat-http", "mailplat.tap.http", "mailplat HTTP (health, metrics)", "mailplat-http")

sqliteStore = SQLiteStoreFactory()
sqliteQueue = SQLiteQueueFactory()
directoryChecker = DirectoryCheckerFactory()
passwordFileChecker = PasswordFileCheckerFactory()
directoryRouter = DirectoryRouterFactory()
textConverters = TextConvertersFactory()
