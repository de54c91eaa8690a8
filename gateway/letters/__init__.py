"""Registered letters: block sets, the letter mail, the desk that records views, consent and
release, evidence.
"""
