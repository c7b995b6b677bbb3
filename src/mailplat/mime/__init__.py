"""MIME: message analysis (for IMAP FETCH and search) and conversion."""
