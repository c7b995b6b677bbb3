"""mailplat.imap"""
