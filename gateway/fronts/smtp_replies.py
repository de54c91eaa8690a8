"""Every reply the submission front gives of its own, in one table, and their count."""

from __future__ import annotations

from gateway.fronts import trusted
from gateway.store.metrics import SMTP_REPLIES


class Reply:
    """Every reply the handler gives, in one place."""

    OK = "250 2.1.0 Ok"
    RCPT_OK = "250 2.1.5 Ok"
    AUTH_OK = "235 2.7.0 Authentication successful"
    AUTH_FAILED = "535 5.7.8 Authentication failed: wrong login or password"
    AUTH_THROTTLED = "454 4.7.0 Too many failed logins from your address; try again later"
    AUTH_ACCOUNT_THROTTLED = "454 4.7.0 Too many failed logins for this account; try again later"
    AUTH_TEMPORARY = "454 4.7.0 Temporary authentication failure; try again later"
    AUTH_TOO_MANY = "421 4.7.0 Too many failed logins; closing the connection"
    AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode the base64 answer"
    AUTH_BAD_PLAIN = "501 5.5.2 AUTH PLAIN needs authzid NUL login NUL password"
    NON_ASCII_ADDRESS = "553 5.6.7 A non-ASCII address needs the SMTPUTF8 parameter at MAIL FROM"
    NOT_UTF8_ADDRESS = "501 5.5.2 Error: an address must be ASCII or UTF-8"
    TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients; at most {limit} per message"
    TOO_BIG = "552 5.3.4 The message is too big; at most {limit} bytes are accepted"
    LINE_TOO_LONG = "500 5.5.6 Line too long; at most 1000 octets per line (RFC 5321 4.5.3.1.6)"
    TEMPORARY = "451 4.3.0 The message was not accepted because of a local problem; try again"
    LOCAL_ERROR = "451 4.3.0 A local problem; try again later"
    STORE_UNAVAILABLE = "451 4.3.0 The message store is unavailable for the moment; try again"
    QUEUED = "250 2.0.0 Ok: queued as {message_id}"
    TIMEOUT = "421 4.4.2 {hostname} Timeout: the client was silent too long; closing"
    STOPPING = "421 4.3.2 {hostname} The relay is stopping; try again in a moment"

    @staticmethod
    def bad_sender(address: str, why: str) -> str:
        return f"553 5.1.7 The sender address <{address}> is not valid: {why}"

    @staticmethod
    def not_your_address(address: str) -> str:
        return f"553 5.7.1 You may not send as <{address}>: it is not one of your addresses"

    @staticmethod
    def not_our_domain(address: str, where: str) -> str:
        return trusted.not_our_domain(address, where)

    @staticmethod
    def bad_recipient(address: str, why: str) -> str:
        return f"553 5.1.3 The recipient address <{address}> is not valid: {why}"


def count(reply: str) -> str:
    """`reply`, counted by its code for the metrics."""
    SMTP_REPLIES.labels(code=reply[:3]).inc()
    return reply
