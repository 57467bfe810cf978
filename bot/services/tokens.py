"""A cheap, offline token estimate for history budgets.

Exact tokenizers (tiktoken) fetch their vocabularies from the internet at run time, and local
models use other tokenizers anyway; a conservative estimate is what a budget needs.
"""

from __future__ import annotations

# Per message overhead the chat formats add (role markers, separators).
MESSAGE_OVERHEAD = 4


def estimate_tokens(text: str) -> int:
    """Roughly tokens in `text`: ~4 characters per token for ASCII, ~1 per other character.

    Non-Latin scripts tokenize far worse than English, so they are counted pessimistically.
    """
    ascii_chars = sum(1 for ch in text if ch < "\x80")
    return MESSAGE_OVERHEAD + (ascii_chars + 3) // 4 + (len(text) - ascii_chars)
