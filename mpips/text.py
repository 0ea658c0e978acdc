"""Words in the messages people read: a count with the right form of its noun."""

from __future__ import annotations

__all__ = ["plural"]


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``"1 parameter server"``, ``"2 parameter servers"``; ``nouns`` where adding "s" is wrong.

    The count is printed with thousands separators: ``plural(26122, "parameter")`` is
    ``"26,122 parameters"``.
    """
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"
