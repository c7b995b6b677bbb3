"""mailplat.processing"""
