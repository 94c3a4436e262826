"""One progress bar for every long operation (rich): annotation, MoLAM's model selection, student training,
the demo's training job. :func:`progress_bar` yields a :class:`Bar`; disabled, it draws nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class Bar:
    """Handle of a (possibly disabled) progress bar."""

    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self._p, self._t = progress, task

    def advance(self, k: float = 1) -> None:
        if self._p is not None:
            self._p.advance(self._t, k)

    def update(self, completed: float | None = None, description: str | None = None) -> None:
        if self._p is not None:
            kw: dict[str, Any] = {}
            if completed is not None:
                kw["completed"] = completed
            if description is not None:
                kw["description"] = description
            self._p.update(self._t, **kw)


@contextlib.contextmanager
def progress_bar(description: str, total: float, *, enabled: bool = True, transient: bool = True,
                 completed: float = 0, fraction: bool = False, console: Any = None) -> Iterator[Bar]:
    """A rich bar: ``description``, bar, done/total (or a percentage with ``fraction``), elapsed and (for
    counts) remaining time. ``transient`` bars disappear when done."""
    if not enabled:
        yield Bar()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    count = [TextColumn("{task.percentage:>3.0f}%")] if fraction else [MofNCompleteColumn(), TimeRemainingColumn()]
    columns = [TextColumn("{task.description}"), BarColumn(), *count, TimeElapsedColumn()]
    with Progress(*columns, transient=transient, console=console) as prog:
        yield Bar(prog, prog.add_task(description, total=total, completed=completed))


__all__ = ["Bar", "progress_bar"]
