"""One progress display for every long operation: annotation, MoLAM's model selection, student training, the
demo's training job. :func:`progress_bar` yields a :class:`Bar`; disabled, it shows nothing.

Where it shows:

* in a terminal, a rich bar (description, bar, done/total or a percentage, remaining and elapsed time);
* anywhere else (stdout going to a file, CI, ``nohup``, a log collector, a job worker), plain lines (on the
  console's stream when one is given, else on stderr, so stdout keeps only what the command prints), one at the
  start, then at least every :data:`PLAIN_INTERVAL_S` seconds (``MOLAL_PROGRESS_INTERVAL_S``) whether or not
  anything moved, and one at the end: ``annotate: 120/400 (30%), 2.1/s, ETA 2m13s, 57s elapsed``;
* inside :func:`progress_lines` (a training job), the same plain lines go to the function given (the job's
  progress messages, which its log and ``GET /jobs`` show), terminal or not.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TextIO

#: seconds between two plain progress lines (at most; a line is also printed at the start and the end)
PLAIN_INTERVAL_S = 5.0

_SINK: ContextVar[Callable[[str], None] | None] = ContextVar("molal_progress_sink", default=None)


def _interval() -> float:
    try:
        v = float(os.environ.get("MOLAL_PROGRESS_INTERVAL_S", PLAIN_INTERVAL_S))
    except ValueError:
        return PLAIN_INTERVAL_S
    return min(max(v, 0.05), 3600.0)


def duration(seconds: float) -> str:
    """``"1h02m"``, ``"2m13s"``, ``"57s"``, ``"4.2s"``."""
    s = max(0.0, float(seconds))
    if s < 10:
        return f"{s:.1f}s"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Bar:
    """Handle of a (possibly disabled) progress display."""

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


class PlainProgress:
    """Plain progress lines for a display that is not a terminal (see the module docstring). Thread-safe; a
    daemon thread prints a line every ``interval`` seconds until :meth:`close`."""

    def __init__(self, description: str, total: float, write: Callable[[str], None], *, completed: float = 0,
                 fraction: bool = False, interval: float | None = None) -> None:
        self.description = _plain(description)
        self.total = float(total)
        self.completed = float(completed)
        self.start_completed = float(completed)
        self.fraction = fraction
        self.write = write
        self.interval = _interval() if interval is None else float(interval)
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._emit()
        self._thread = threading.Thread(target=self._tick, name="molal-progress", daemon=True)
        self._thread.start()

    # the rich Progress calls Bar makes
    def advance(self, _task: Any, k: float = 1) -> None:
        with self.lock:
            self.completed += k

    def update(self, _task: Any, completed: float | None = None, description: str | None = None) -> None:
        with self.lock:
            if completed is not None:
                self.completed = float(completed)
            if description is not None:
                self.description = _plain(description)

    def line(self, final: bool = False) -> str:
        with self.lock:
            done, total, desc = self.completed, self.total, self.description
        elapsed = time.monotonic() - self.t0
        if self.fraction:
            frac = min(1.0, done / total) if total else 1.0
            parts = [f"{frac:.0%}"]
            if 0 < frac < 1 and not final:
                parts.append(f"ETA {duration(elapsed / frac * (1 - frac))}")
        else:
            pct = f" ({done / total:.0%})" if total else ""
            parts = [f"{_num(done)}/{_num(total)}{pct}"]
            moved = done - self.start_completed
            if elapsed > 0 and moved > 0:
                rate = moved / elapsed
                parts.append(f"{rate:.3g}/s")
                if not final and done < total:
                    parts.append(f"ETA {duration((total - done) / rate)}")
        parts.append(f"{duration(elapsed)} elapsed" if not final else f"done in {duration(elapsed)}")
        return f"{desc}: {', '.join(parts)}"

    def _emit(self, final: bool = False) -> None:
        try:
            self.write(self.line(final))
        except Exception:  # noqa: BLE001 - progress never breaks the work it reports on
            pass

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self._emit()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._emit(final=True)


def _plain(description: str) -> str:
    """A description without rich markup."""
    try:
        from rich.text import Text

        return Text.from_markup(str(description)).plain
    except Exception:  # noqa: BLE001 - markup that does not parse: as it is
        return str(description)


def _num(v: float) -> str:
    return f"{int(v)}" if float(v).is_integer() else f"{v:.2f}"


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def progress_lines(write: Callable[[str], None]) -> Iterator[None]:
    """Inside this block every enabled :func:`progress_bar` sends plain lines to ``write`` (a training job's
    progress messages), in a terminal or not."""
    token = _SINK.set(write)
    try:
        yield
    finally:
        _SINK.reset(token)


@contextlib.contextmanager
def progress_bar(description: str, total: float, *, enabled: bool = True, transient: bool = True,
                 completed: float = 0, fraction: bool = False, console: Any = None,
                 interval: float | None = None) -> Iterator[Bar]:
    """A progress display: ``description``, done/total (or a percentage with ``fraction``), rate, remaining
    and elapsed time; a rich bar in a terminal, plain lines elsewhere (module docstring). ``transient`` rich
    bars disappear when done. ``console``: the rich console to draw on (default: stdout's)."""
    if not enabled:
        yield Bar()
        return
    sink = _SINK.get()
    terminal = bool(getattr(console, "is_terminal", False)) if console is not None else _is_terminal(sys.stdout)
    if sink is not None or not terminal:
        if sink is None:
            # the console's own stream, else stderr: stdout stays what the command prints (tables, JSON)
            out = getattr(console, "file", None) if console is not None else sys.stderr

            def sink(line: str) -> None:
                print(line, file=out, flush=True)

        plain = PlainProgress(description, total, sink, completed=completed, fraction=fraction, interval=interval)
        try:
            yield Bar(plain, None)
        finally:
            plain.close()
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


__all__ = ["PLAIN_INTERVAL_S", "Bar", "PlainProgress", "duration", "progress_bar", "progress_lines"]
