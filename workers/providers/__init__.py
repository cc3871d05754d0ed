"""Wire formats and rate-limit header styles, each registered under its name.

`ADAPTERS`: ``openai``, ``anthropic``, ``gemini``. `SIGNAL_PARSERS`: ``openai``, ``groq``,
``anthropic``, ``gemini``, ``none``. `complete()` makes one call through the right adapter.
"""

from workers.providers import anthropic, gemini, openai  # noqa: F401  (they register)
from workers.providers.base import ADAPTERS, Adapter
from workers.providers.signals import SIGNAL_PARSERS, RateLimitSignal, Window

__all__ = ["ADAPTERS", "SIGNAL_PARSERS", "Adapter", "RateLimitSignal", "Window"]
