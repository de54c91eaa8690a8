"""Ways in: the SMTP listeners, their DATA reader and their abuse guards; the next fronts go
here.
"""
