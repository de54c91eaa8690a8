"""Every text the relay shows or writes: one catalog loader, one language list, templates and
block sets.
"""
