"""The plug-in point: one entry per competition in `COMPETITIONS`."""

from __future__ import annotations

from kaggle_seg.competitions.base import Competition
from kaggle_seg.competitions.dsb2018 import DSB2018
from kaggle_seg.competitions.lgg import LGG
from kaggle_seg.competitions.uwmgi import UWMGI

COMPETITIONS: dict[str, Competition] = {
    "uwmgi": UWMGI(),
    "dsb2018": DSB2018(),
    "lgg": LGG(),
}


def get_competition(name: str) -> Competition:
    """The competition called `name`; a KeyError lists the valid names."""
    try:
        return COMPETITIONS[name]
    except KeyError:
        raise KeyError(
            f"unknown competition {name!r}; choose one of {', '.join(COMPETITIONS)}"
        ) from None
