"""`--weights` is parsed and checked the same way by submit / predict, tune and kernel build."""

from __future__ import annotations

from pathlib import Path

import pytest

from kaggle_seg.ensemble_weights import check_weights, parse_weights
from kaggle_seg.errors import KsegError
from kaggle_seg.kernel import SubmitOptions, build_kernel


def test_weights_are_parsed_and_checked():
    assert parse_weights(None) is None
    assert parse_weights("1,0.5") == [1.0, 0.5]
    with pytest.raises(KsegError, match="--weights '1,a'"):
        parse_weights("1,a")
    assert check_weights(None, 3, "experiment") == [1.0, 1.0, 1.0]
    assert check_weights([0, 2], 2, "experiment") == [0.0, 2.0]
    with pytest.raises(KsegError, match=r"1 weight\(s\) for 2 experiment\(s\); give one per"):
        check_weights([1.0], 2, "experiment")


@pytest.mark.parametrize(
    "weights", [[1.0, -0.5], [float("nan"), 1.0], [0.0, 0.0], [float("inf"), 1.0]]
)
def test_weights_that_cannot_be_averaged_are_refused(weights: list[float]):
    with pytest.raises(KsegError, match="non-negative weights with a positive sum"):
        check_weights(weights, 2, "experiment")


def test_kernel_build_refuses_weights_its_submit_would_refuse(tmp_path: Path):
    """Before: `kseg kernel build --weights 1,-1` built a kernel that failed on Kaggle."""
    out = tmp_path / "kernels"
    for text in ("1,-1", "nan,1", "1,2,3"):
        with pytest.raises(KsegError, match="--weights"):
            build_kernel(
                "dsb2018",
                ["a", "b"],
                runs_root=tmp_path / "runs",
                out_root=out,
                username="someone",
                submit=SubmitOptions(ensemble_weights=text),
            )
    assert not out.exists()
