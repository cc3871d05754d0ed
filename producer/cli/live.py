"""Rich's live displays (tables refreshed in place, progress bars), closed on a line of their own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console


@contextmanager
def closed_line(console: Console) -> Iterator[None]:
    """Wrap a `Live` or `Progress` (outside it: this must exit after it). Rich ends a live
    display with a newline only on a terminal, so piped output would glue the next line onto
    the display's last one."""
    try:
        yield
    finally:
        if not console.is_terminal:
            console.line()
