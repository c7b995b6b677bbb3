"""SMTP: wire format (sans-IO) and the server session."""
