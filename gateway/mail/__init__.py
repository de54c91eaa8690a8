"""Bytes of mail: headers, MIME surgery, DKIM, and the one builder of the relay's own mail."""
