"""One-line error text for messages users read: the first line of an exception. Used by serving
and the pipeline alike; it must stay free of any other import from the project.
"""

from __future__ import annotations


def first_line(exc: BaseException, default: str = "") -> str:
    """The exception's first non-empty line; `default` (or the type's name) when it has none."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return default or type(exc).__name__
