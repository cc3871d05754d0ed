"""`Wait`: how long until something could happen, and why — the one spelling of "never".

The limiter answers with one (`Denied.wait`), the router estimates one per candidate
(`Option.wait`), and the next-hop decision compares them. This module imports nothing of
Spillway's, so every layer can share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Wait:
    """`seconds` until it could happen (``math.inf``: never), and `why` (for people and logs)."""

    seconds: float
    why: str = ""

    @classmethod
    def never(cls, why: str) -> Wait:
        """Waiting cannot help: no key, a disabled key, a job bigger than the limit."""
        return cls(math.inf, why)

    @property
    def is_never(self) -> bool:
        return math.isinf(self.seconds)
