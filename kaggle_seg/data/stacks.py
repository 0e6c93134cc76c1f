"""2.5D input: each slice with its neighbours in the same volume, stacked on channels.

A competition whose images are slices of volumes names the volume column and the slice-order
column (`Competition.volume_key`, `slice_key`; uwmgi: case_day, slice_index); training and
prediction stack the neighbours of each row the same way.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kaggle_seg.errors import InputError


def stack_positions(table: pd.DataFrame, depth: int, stride: int, volume_key: str) -> np.ndarray:
    """Row positions of each slice's 2.5D neighbours: int64 [N, depth].

    Neighbour k of slice i is `stride * (k - depth // 2)` slices away, clamped to the first / last
    slice of the same volume (`volume_key` column) so a stack never mixes two scans. `table` must
    hold each volume's slices together and in order (as the competition's `read_table` returns
    it; `check_slice_order`).
    """
    if depth < 1 or stride < 1:
        raise InputError(f"2.5D stack needs depth >= 1 and stride >= 1, got {depth}, {stride}")
    volume = table[volume_key].to_numpy()
    starts = np.r_[0, np.flatnonzero(volume[1:] != volume[:-1]) + 1]
    ends = np.r_[starts[1:], len(table)] - 1
    run = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(table)]))
    offsets = stride * (np.arange(depth) - depth // 2)
    positions = np.arange(len(table))[:, None] + offsets[None, :]
    return np.clip(positions, starts[run][:, None], ends[run][:, None])


def check_slice_order(table: pd.DataFrame, volume_key: str, slice_key: str) -> None:
    """Each volume's rows together, its slices in increasing `slice_key` order: InputError
    otherwise (stacks would mix scans or skip slices)."""
    volume = table[volume_key].to_numpy()
    slice_index = table[slice_key].to_numpy()
    same = volume[1:] == volume[:-1]
    starts = np.r_[0, np.flatnonzero(~same) + 1]
    if (
        len(np.unique(volume[starts])) != len(starts)
        or ((slice_index[1:] <= slice_index[:-1]) & same).any()
    ):
        raise InputError(
            f"2.5D stacks need the table sorted by {volume_key} then {slice_key}, each "
            f"volume's slices together (as the competition's read_table returns it)"
        )


def sort_slices(table: pd.DataFrame, volume_key: str, slice_key: str) -> pd.DataFrame:
    """Volume, then slice number: the order volumes and 2.5D stacks rely on."""
    return table.sort_values([volume_key, slice_key], kind="stable").reset_index(drop=True)
