"""mailplat.routing"""
