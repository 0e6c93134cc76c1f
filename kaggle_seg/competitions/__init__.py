"""The plug-in point: one entry per competition in `COMPETITIONS` (see base.py for the contract)."""

from __future__ import annotations

from typing import Any

from kaggle_seg.competitions.base import Competition
from kaggle_seg.competitions.dsb2018 import DSB2018
from kaggle_seg.competitions.folder import Folder
from kaggle_seg.competitions.lgg import LGG
from kaggle_seg.competitions.uwmgi import UWMGI

COMPETITIONS: dict[str, Competition] = {
    "uwmgi": UWMGI(),
    "dsb2018": DSB2018(),
    "lgg": LGG(),
    "folder": Folder(),  # set up by data.options (its classes...): `competition_for`
}


def get_competition(name: str) -> Competition:
    """The competition called `name`; a KeyError lists the valid names."""
    try:
        return COMPETITIONS[name]
    except KeyError:
        raise KeyError(
            f"unknown competition {name!r}; choose one of {', '.join(COMPETITIONS)}"
        ) from None


def competition_for(data: Any) -> Competition:
    """The competition a config's `data` section names, set up by its `data.options`."""
    return get_competition(data.competition).configure(getattr(data, "options", None) or {})
