"""Authentication: password hashes, the directory checker, the realm and SASL."""
