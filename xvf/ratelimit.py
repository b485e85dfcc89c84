"""Rate-limited logging for what a guest or a backend can cause at will.

A guest that repeats a bad access a million times must not write a million log
lines (nor hold its service loop formatting them): the first few are said in
full, then one at each doubling of the count, each saying how many there were.
"""

from __future__ import annotations

import logging


class RateLimitedLog:
    """One kind of message, said at occurrences 1..first, then 2^k, with its count."""

    def __init__(self, logger: logging.Logger, first: int = 3) -> None:
        self.logger = logger
        self.first = first
        self.count = 0

    def __call__(self, level: int, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log (or only count) one occurrence; True if it was written."""
        self.count += 1
        n = self.count
        if n > self.first and n & (n - 1):
            return False
        if n > self.first:
            msg += f" ({n} times so far; the next ones are counted, not all logged)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def skip(self, n: int) -> None:
        """Count n occurrences that were not logged (their details were not kept)."""
        self.count += n
