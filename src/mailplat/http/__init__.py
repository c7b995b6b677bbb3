"""mailplat.http"""
