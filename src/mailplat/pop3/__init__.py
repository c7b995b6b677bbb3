"""mailplat.pop3"""
