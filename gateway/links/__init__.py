"""Personal download links: tokens, the link block in the mail, and the desk that records views
and downloads.
"""
