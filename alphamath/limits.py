"""What the trainer's store accepts, checked wherever ids and texts enter the system.

One set of limits for the search service's gRPC boundary (INVALID_ARGUMENT naming the field) and
the trainer's ingestion (a record beyond them goes to the dead-letter topic), so a value is refused
where it arrives instead of failing later on PostgreSQL only (SQLite does not enforce VARCHAR
lengths, PostgreSQL raises DataError and rejects NUL characters in text).
"""
from __future__ import annotations

import math
import unicodedata

ID_CHARS = 200          # question ids, checkpoint ids, record keys: VARCHAR(200) columns
EVENT_ID_CHARS = 64     # TreeEvent.event_id: VARCHAR(64)
QUESTION_CHARS = 4000   # a question longer than this is not a grade-school problem
GROUND_TRUTH_CHARS = 1000
MAX_TREE_NODES = 200_000  # far beyond any search setting; bounds the work of checking a tree


class LimitError(ValueError):
    """A field outside what the store accepts; the message names the field."""


def _bad_char(s: str, allow_whitespace: bool) -> str | None:
    for ch in s:
        cat = unicodedata.category(ch)
        if ch == "\x00" or cat == "Cs" or (cat == "Cc" and not (allow_whitespace and ch in "\t\n\r")):
            return ch
    return None


def check_id(field: str, value: str, max_chars: int = ID_CHARS, required: bool = True) -> str:
    """An identifier: 1..max_chars characters, printable (no control characters, no NUL)."""
    if not value:
        if required:
            raise LimitError(f"{field} is empty")
        return value
    if len(value) > max_chars:
        raise LimitError(f"{field} has {len(value)} characters; the limit is {max_chars}")
    bad = _bad_char(value, allow_whitespace=False)
    if bad is not None:
        raise LimitError(f"{field} contains the control character {bad!r}; ids must be printable")
    return value


def check_text(field: str, value: str | None, max_chars: int | None = None) -> str | None:
    """Free text: no NUL or control characters other than tab/newline, at most max_chars."""
    if value is None:
        return None
    if max_chars is not None and len(value) > max_chars:
        raise LimitError(f"{field} has {len(value)} characters; the limit is {max_chars}")
    bad = _bad_char(value, allow_whitespace=True)
    if bad is not None:
        raise LimitError(f"{field} contains the control character {bad!r}")
    return value


def check_finite(field: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise LimitError(f"{field} is {value}; it must be a finite number")
