"""The relay's log: one line per event, as `time [pid] LEVEL logger: message`.

The relay writes two lines per message (accepted, delivered), Postfix's mail log in
spirit. Per line the standard library looks up the caller's file and line (walking the
stack), the thread and the process, and formats the time afresh; the format shows none of
them but the time, which changes once a second. The logging HOWTO's "Optimization" section
names the switches used here.
"""

from __future__ import annotations

import logging
import time


class SecondStampFormatter(logging.Formatter):
    """The standard formatter's time, `2026-12-05 12:53:51,123`, with the part before the
    milliseconds formatted once per second. Formatting runs under the handler's lock."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


def configure(processes: int) -> None:
    """Lines to stderr at INFO; with several processes each line names its process."""
    pid = " [%(process)d]" if processes > 1 else ""
    handler = logging.StreamHandler()
    handler.setFormatter(
        SecondStampFormatter(f"%(asctime)s{pid} %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging._srcfile = None  # no caller's file and line: the format shows neither
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = processes > 1
    # aiosmtpd logs every command line at INFO, inline AUTH PLAIN credentials included.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
