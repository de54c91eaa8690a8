"""Ways out: the queue, the delivery worker, the upstream writer, bounces, and the door for the
relay's own mail.
"""
