"""Progress lines off a terminal: their format and their cadence (one per tenth of the work)."""

from __future__ import annotations

import io
import re

import pytest

from kaggle_seg.errors import KsegError
from kaggle_seg.progress import (
    PLAIN_LINE,
    BarProgress,
    NoProgress,
    PlainProgress,
    every_interval,
    format_duration,
    make_progress,
    progress,
)


class FakeClock:
    """Seconds that advance only when told, so rates and ETAs are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(total: int | None, n_items: int, seconds_per_item: float, **kwargs) -> list[str]:
    stream, clock = io.StringIO(), FakeClock()
    items = iter(range(n_items))  # no len(): the total is what the caller says
    for _ in progress(items, total, "predict", stream=stream, clock=clock, **kwargs):
        clock.now += seconds_per_item
    return stream.getvalue().splitlines()


@pytest.fixture(autouse=True)
def plain_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KSEG_PROGRESS", raising=False)


def test_one_line_per_tenth_with_rate_and_eta() -> None:
    lines = run(1200, 1200, 0.25)
    assert len(lines) == 10
    assert lines[0] == "predict: 120/1200 images (10%), 4.0 images/s, ETA 4:30"
    assert lines[4] == "predict: 600/1200 images (50%), 4.0 images/s, ETA 2:30"
    assert lines[-1] == "predict: 1200/1200 images (100%), 4.0 images/s, done in 5:00"
    done = [int(re.match(r"predict: (\d+)/", line).group(1)) for line in lines]
    assert done == [120 * k for k in range(1, 11)]


def test_plain_lines_can_be_picked_out_of_a_log() -> None:
    lines = [*run(1200, 1200, 0.25), *run(None, 300, 0.5, unit="slices"), *run(20, 20, 900.0)]
    assert lines and all(PLAIN_LINE.match(line) for line in lines)
    for other in ("epoch 3/10: loss 0.31", "wrote submission.csv: 30 rows", "error: 4/5 failed"):
        assert not PLAIN_LINE.match(other)


def test_hours_and_slow_rates() -> None:
    lines = run(20, 20, 900.0)  # 15 minutes an image: 5 hours in all
    assert lines[0] == "predict: 2/20 images (10%), 0.0011 images/s, ETA 4:30:00"
    assert lines[-1].endswith("done in 5:00:00")


def test_fewer_items_than_tenths() -> None:
    # 4 items: tenths 1..10 fall on items 1, 1, 2, 2, 2, 3, 3, 4, 4, 4: one line per item.
    lines = run(4, 4, 1.0)
    assert [line.split(" images")[0] for line in lines] == [
        "predict: 1/4",
        "predict: 2/4",
        "predict: 3/4",
        "predict: 4/4",
    ]


def test_big_steps_make_one_line_each() -> None:
    stream, clock = io.StringIO(), FakeClock()
    display = PlainProgress(100, "tune", "candidates", stream, clock)
    clock.now += 10
    display.advance(35)  # three tenths at once
    clock.now += 10
    display.advance(65)
    display.close()
    assert stream.getvalue().splitlines() == [
        "tune: 35/100 candidates (35%), 3.5 candidates/s, ETA 0:19",
        "tune: 100/100 candidates (100%), 5.0 candidates/s, done in 0:20",
    ]


def test_unknown_total_prints_by_time() -> None:
    # 0.5 s an item with no total: a line each minute (120 items) and one at the end.
    lines = run(None, 300, 0.5, unit="slices")
    assert lines == [
        "predict: 120 slices, 2.0 slices/s",
        "predict: 240 slices, 2.0 slices/s",
        "predict: 300 slices, 2.0 slices/s",
    ]


def test_quick_work_prints_nothing() -> None:
    # 100 items in 0.5 s: not worth ten lines of log.
    assert run(100, 100, 0.005) == []
    # A slow start: the tenths passed in the first second are not printed later.
    assert [line.split(" images")[0] for line in run(10, 10, 0.3)] == [
        "predict: 4/10",
        "predict: 5/10",
        "predict: 6/10",
        "predict: 7/10",
        "predict: 8/10",
        "predict: 9/10",
        "predict: 10/10",
    ]


def test_total_from_len_and_stopping_early() -> None:
    stream, clock = io.StringIO(), FakeClock()
    for i in progress(list(range(50)), description="x", stream=stream, clock=clock):
        clock.now += 1
        if i == 24:
            break
    # Item 25 was taken but not finished: the last line is the 40 % one, and none follows.
    assert stream.getvalue().splitlines()[-1] == "x: 20/50 images (40%), 1.0 images/s, ETA 0:30"


def test_work_that_ends_below_its_upper_bound_finishes_at_its_count() -> None:
    """A search's total is the most it could take; ending sooner says done, not 30 %."""
    stream, clock = io.StringIO(), FakeClock()
    display = make_progress(81, "tune: search", "thresholds", stream=stream, clock=clock)
    for _ in range(25):
        clock.now += 0.5
        display.advance()
    display.finish()
    display.close()
    lines = stream.getvalue().splitlines()
    assert lines[-2] == "tune: search: 25/81 thresholds (30%), 2.0 thresholds/s, ETA 0:28"
    assert lines[-1] == "tune: search: 25/25 thresholds (100%), 2.0 thresholds/s, done in 0:12"
    for display in (NoProgress(), make_progress(81, stream=io.StringIO())):
        display.finish()  # nothing done yet: no error, no line
        display.close()


def test_interval_lines_tell_a_log_a_long_loop_is_moving(monkeypatch: pytest.MonkeyPatch):
    def lines(n_items: int, seconds_per_item: float) -> list[str]:
        stream, clock = io.StringIO(), FakeClock()
        for _ in every_interval(range(n_items), n_items, "epoch 3/64", interval_s=60,
                                stream=stream, clock=clock):  # fmt: skip
            clock.now += seconds_per_item
        return stream.getvalue().splitlines()

    assert lines(50, 1.0) == []  # a short epoch: its own summary line is enough
    long = lines(200, 1.0)
    assert long[0] == "epoch 3/64: 60/200 batches (30%), 1.0 batches/s, ETA 2:20"
    assert len(long) == 3 and all(PLAIN_LINE.match(line) for line in long)  # no "done" line
    monkeypatch.setenv("KSEG_PROGRESS", "off")
    assert lines(200, 1.0) == []


def test_mode_from_the_stream_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(make_progress(3, stream=io.StringIO()), PlainProgress)
    bar = make_progress(3, stream=Terminal())
    assert isinstance(bar, BarProgress)
    bar.close()
    monkeypatch.setenv("KSEG_PROGRESS", "off")
    assert isinstance(make_progress(3, stream=Terminal()), NoProgress)
    assert run(10, 10, 1.0) == []
    monkeypatch.setenv("KSEG_PROGRESS", "plain")
    assert isinstance(make_progress(3, stream=Terminal()), PlainProgress)
    monkeypatch.setenv("KSEG_PROGRESS", "fancy")
    with pytest.raises(KsegError, match="KSEG_PROGRESS='fancy': choose one of auto, bar"):
        make_progress(3)


def test_bar_on_a_terminal_counts_every_item(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KSEG_PROGRESS", "bar")
    stream = io.StringIO()
    assert list(progress(range(7), description="submit", stream=stream)) == list(range(7))


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0:00"), (59.6, "1:00"), (61, "1:01"), (3600, "1:00:00"), (float("inf"), "?")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
