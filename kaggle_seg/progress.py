"""Progress of long work: a bar with rate and ETA on a terminal; elsewhere (a Kaggle kernel's
log, CI) one plain line every ~10 % with the items done, items/s and ETA, so a log tells
whether the run will fit in its time limit.

    for item in progress(items, total=len(items), description="predict", unit="images"):
        ...

`KSEG_PROGRESS` chooses the display: `auto` (default: a bar when the stream is a terminal,
plain lines otherwise), `bar`, `plain` or `off`. Output goes to stderr, so stdout keeps only
results (`kseg score --json`).
"""

from __future__ import annotations

import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

from kaggle_seg.errors import KsegError

T = TypeVar("T")
MODES = ("auto", "bar", "plain", "off")
ENV_VAR = "KSEG_PROGRESS"
# Off a terminal: one line each time another tenth of the work is done.
PLAIN_STEPS = 10
# With no known total, a plain line this often instead.
PLAIN_INTERVAL_S = 60.0
# A plain line, as `kernel rehearse` can pick it out of a kernel's log to show it live.
PLAIN_LINE = re.compile(r"^(?:[^:\n]+: )?\d+(?:/\d+)? \S+(?: \(\d+%\))?, [\d.e+-]+ \S+/s(?:, .*)?$")
# Work this short prints no plain line at all: a quick scan is not worth ten lines of log.
PLAIN_QUIET_S = 1.0


def format_duration(seconds: float) -> str:
    """Seconds as m:ss, or h:mm:ss from an hour up; "?" when not known (no rate yet)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _rate_text(rate: float) -> str:
    return f"{rate:.1f}" if rate >= 1 or rate == 0 else f"{rate:.2g}"


class PlainProgress:
    """One line per tenth of `total` (or every PLAIN_INTERVAL_S seconds when `total` is None):
    `predict: 120/1200 images (10%), 4.2 images/s, ETA 4:17`, and a last one when all is done:
    `predict: 1200/1200 images (100%), 4.1 images/s, done in 4:53`. Nothing in the first
    PLAIN_QUIET_S seconds."""

    def __init__(
        self,
        total: int | None,
        description: str,
        unit: str,
        stream: TextIO,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.description, self.unit = total, description, unit
        self.stream, self.clock = stream, clock
        self.done = 0
        self.started = clock()
        self._steps_shown = 0
        self._last_line = self.started
        self._lock = threading.Lock()

    def _next_mark(self) -> int:
        """Items done at which the next line is due (the next tenth of the total)."""
        return math.ceil((self._steps_shown + 1) * self.total / PLAIN_STEPS)

    def advance(self, n: int = 1) -> None:
        with self._lock:  # worker threads report too
            self._advance(n)

    def _advance(self, n: int) -> None:
        self.done += n
        if self.total is None:
            now = self.clock()
            if now - self._last_line >= PLAIN_INTERVAL_S:
                self._last_line = now
                self._write(now)
            return
        if self._steps_shown >= PLAIN_STEPS or self.done < self._next_mark():
            return
        while self._steps_shown < PLAIN_STEPS and self.done >= self._next_mark():
            self._steps_shown += 1  # several tenths at once (a big step) make one line
        self._write(self.clock())

    def _write(self, now: float) -> None:
        if now - self.started < PLAIN_QUIET_S:
            return
        elapsed = now - self.started
        rate = self.done / elapsed
        head = f"{self.description}: " if self.description else ""
        if self.total is None:
            line = f"{head}{self.done} {self.unit}, {_rate_text(rate)} {self.unit}/s"
        else:
            percent = 100 * self.done // self.total if self.total else 100
            if self.done >= self.total:
                tail = f"done in {format_duration(elapsed)}"
            else:
                eta = (self.total - self.done) / rate if rate > 0 else math.inf
                tail = f"ETA {format_duration(eta)}"
            line = (
                f"{head}{self.done}/{self.total} {self.unit} ({percent}%), "
                f"{_rate_text(rate)} {self.unit}/s, {tail}"
            )
        print(line, file=self.stream, flush=True)

    def finish(self) -> None:
        """The work ended before `total` (an upper bound, as a search that stops when nothing
        improves): the last line says done at the count reached, not a stalled percentage."""
        with self._lock:
            if self.total is not None and self.done < self.total:
                self.total = self.done
                self._steps_shown = PLAIN_STEPS
                self._write(self.clock())

    def close(self) -> None:
        if self.total is None and self.done:
            self._write(self.clock())


class IntervalProgress(PlainProgress):
    """A plain line every `interval_s` seconds, with the total and ETA, and none at the end:
    for a loop that prints its own summary when done (a training epoch), so a short one prints
    nothing and a long one tells a log (a Kaggle notebook's) that it is moving."""

    interval_s: float = PLAIN_INTERVAL_S  # set per display by every_interval

    def _advance(self, n: int) -> None:
        self.done += n
        now = self.clock()
        unfinished = self.total is None or self.done < self.total
        if unfinished and now - self._last_line >= self.interval_s:
            self._last_line = now
            self._write(now)

    def close(self) -> None:
        pass


def every_interval(
    iterable: Iterable[T],
    total: int | None,
    description: str,
    unit: str = "batches",
    *,
    interval_s: float = PLAIN_INTERVAL_S,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[T]:
    """The items of `iterable`, with an `IntervalProgress` line every `interval_s` seconds
    (none with KSEG_PROGRESS=off)."""
    stream = sys.stderr if stream is None else stream
    if progress_mode(stream) == "off":
        yield from iterable
        return
    display = IntervalProgress(total, description, unit, stream, clock)
    display.interval_s = interval_s
    for item in iterable:
        yield item
        display.advance()


class BarProgress:
    """rich's bar: description, bar, done/total, rate, elapsed and ETA; removed when closed."""

    def __init__(self, total: int | None, description: str, unit: str, stream: TextIO):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                return Text("" if speed is None else f"{_rate_text(speed)} {unit}/s")

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=stream),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)

    def finish(self) -> None:
        self._progress.update(self._task, total=self._progress.tasks[0].completed)

    def close(self) -> None:
        self._progress.stop()


class NoProgress:
    def advance(self, n: int = 1) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


def progress_mode(stream: TextIO) -> str:
    """bar, plain or off: KSEG_PROGRESS, or by whether `stream` is a terminal."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise KsegError(f"{ENV_VAR}={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "auto":
        isatty = getattr(stream, "isatty", None)
        return "bar" if isatty is not None and isatty() else "plain"
    return mode


def make_progress(
    total: int | None,
    description: str = "",
    unit: str = "images",
    *,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> PlainProgress | BarProgress | NoProgress:
    """A progress display with `advance(n)` and `close()` for work that is not one loop."""
    stream = sys.stderr if stream is None else stream
    mode = progress_mode(stream)
    if mode == "bar":
        return BarProgress(total, description, unit, stream)
    if mode == "plain":
        return PlainProgress(total, description, unit, stream, clock)
    return NoProgress()


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    description: str = "",
    unit: str = "images",
    *,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[T]:
    """The items of `iterable`, showing progress as they are taken. `total` defaults to
    len(iterable) when it has one."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    display = make_progress(total, description, unit, stream=stream, clock=clock)
    try:
        for item in iterable:
            yield item
            display.advance()
    finally:
        display.close()


def epoch_progress(iterable: Iterable[T], description: str, is_main: bool = True) -> Iterable[T]:
    """A training epoch's batches, shown as KSEG_PROGRESS says (`progress_mode`): a bar on a
    terminal, a plain line a minute in a log (a Kaggle notebook, CI); nothing on the other
    ranks of a DDP run."""
    if not is_main:
        return iterable
    total = len(iterable)  # type: ignore[arg-type]
    if progress_mode(sys.stderr) == "bar":
        return progress(iterable, total, description, "batches")
    return every_interval(iterable, total, description)  # off: every_interval shows nothing
