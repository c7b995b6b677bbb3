"""mailplat.store"""
