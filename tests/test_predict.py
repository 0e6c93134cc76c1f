"""Prediction: checkpoints carry their config, TTA + ensembles stream image by image at each
image's own size, and the arithmetic equals the plain per-image computation."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kaggle_seg.competitions import get_competition
from kaggle_seg.errors import InputError, KsegError
from kaggle_seg.predict import load_ensemble, predict_probabilities
from kaggle_seg.probabilities import ProbabilityWriter
from kaggle_seg.runs import find_checkpoints
from kaggle_seg.spec import restore_size, shape_batches
from kaggle_seg.train import load_oof


def write_checkpoint(
    path: Path,
    *,
    competition: str = "dsb2018",
    classes: tuple[str, ...] = ("nuclei",),
    stack_depth: int = 1,
    resize_mode: str = "resize",
    size: int = 64,
    seed: int = 0,
    name: str = "tiny",
    amp: str = "off",
) -> Path:
    """A random-init tiny seed U-Net saved the way `kseg train` saves best.pt (float32 unless
    `amp` says otherwise, so that outputs compare exactly)."""
    from kaggle_seg.config import ExperimentConfig
    from kaggle_seg.models import build_model

    config = ExperimentConfig.model_validate(
        {
            "name": name,
            "data": {"competition": competition, "stack_depth": stack_depth},
            "augment": {"height": size, "width": size, "resize_mode": resize_mode},
            "model": {"architecture": "seed_unet", "params": {"base_channels": 4, "depth": 2}},
            "train": {"amp": amp},
        }
    )
    channels = get_competition(competition).channels * stack_depth
    torch.manual_seed(seed)
    model = build_model(config.model, channels, len(classes))
    with torch.no_grad():  # a non-trivial output: the random head alone is nearly constant
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": model.state_dict(),
            "config": config.model_dump(mode="json"),
            "competition": competition,
            "classes": list(classes),
            "in_channels": channels,
            "fold": 0,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def dsb_test(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real stage-1 test images of different sizes, in Kaggle's layout."""
    source = shared_data / "dsb2018" / "stage1_test"
    table = get_competition("dsb2018").read_test_table(source)
    picked = table.drop_duplicates(["height", "width"]).head(4)
    picked = pd.concat([picked, table[~table["id"].isin(picked["id"])].head(2)])
    root = tmp_path_factory.mktemp("dsb_test") / "stage1_test"
    for image_id in picked["id"]:
        shutil.copytree(source / image_id / "images", root / image_id / "images")
    return root


def naive_probabilities(member, competition, row: dict, views: list[str]) -> np.ndarray:
    """The plain per-image computation kseg must reproduce."""
    from kaggle_seg.data.transforms import build_transforms

    image = build_transforms(member.config.augment, train=False)(image=competition.read_image(row))[
        "image"
    ]
    x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
    flips = {"identity": [], "hflip": [-1], "vflip": [-2]}
    total = 0
    with torch.no_grad():
        for view in views:
            dims = flips[view]
            out = member.model(x.flip(dims) if dims else x)
            total = total + torch.sigmoid(out.flip(dims) if dims else out)
    probs = (total / len(views))[0].numpy()
    return restore_size(probs, row["height"], row["width"], member.spec.resize_mode)


def test_find_checkpoints_experiment_fold_and_file(tmp_path: Path):
    experiment = tmp_path / "exp"
    for fold in (0, 1, 10):
        write_checkpoint(experiment / f"fold_{fold}" / "best.pt", seed=fold)
    found = find_checkpoints(experiment)
    assert [p.parent.name for p in found] == ["fold_0", "fold_1", "fold_10"]
    assert find_checkpoints(experiment / "fold_1") == [experiment / "fold_1" / "best.pt"]
    assert find_checkpoints(found[0]) == [found[0]]
    (tmp_path / "empty").mkdir()
    with pytest.raises(KsegError, match=r"no checkpoints.*kseg train"):
        find_checkpoints(tmp_path / "empty")
    with pytest.raises(KsegError, match="no such checkpoint"):
        find_checkpoints(tmp_path / "missing")


def test_unreadable_checkpoint_is_named(tmp_path: Path):
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(KsegError, match=r"best\.pt: not a readable checkpoint"):
        load_ensemble([bad])


def test_checkpoints_that_disagree_are_refused_naming_both(tmp_path: Path):
    one = write_checkpoint(tmp_path / "a" / "best.pt", classes=("nuclei",))
    two = write_checkpoint(tmp_path / "b" / "best.pt", classes=("nuclei", "border"))
    with pytest.raises(KsegError, match=r"disagree on classes.*a/best.pt.*b/best.pt"):
        load_ensemble([one, two])
    three = write_checkpoint(
        tmp_path / "c" / "best.pt", competition="uwmgi", classes=("a", "b", "c"), stack_depth=3
    )
    four = write_checkpoint(
        tmp_path / "d" / "best.pt", competition="uwmgi", classes=("a", "b", "c"), stack_depth=1
    )
    with pytest.raises(KsegError, match="disagree on in_channels"):
        load_ensemble([three, four])
    with pytest.raises(KsegError, match="--weights: 1 weight"):
        load_ensemble([one, one], weights=[1.0])


@pytest.mark.parametrize("resize_mode", ["resize", "pad"])
def test_predictions_match_the_plain_computation_at_each_images_size(
    dsb_test: Path, tmp_path: Path, resize_mode: str
):
    competition = get_competition("dsb2018")
    table = competition.read_test_table(dsb_test)
    assert table[["height", "width"]].drop_duplicates().shape[0] >= 3
    members = load_ensemble(
        [write_checkpoint(tmp_path / "best.pt", resize_mode=resize_mode, size=96)]
    )
    results = list(predict_probabilities(members, competition, table, tta="flip", batch_size=4,
                                         num_workers=0))  # fmt: skip
    assert [r[1] for r in results] == list(table["id"])
    rows = table.to_dict("records")
    for position, _, probs in results:
        row = rows[position]
        assert probs.shape == (1, row["height"], row["width"])
        assert probs.dtype == np.float32
        if resize_mode == "pad" and (row["height"] > 96 or row["width"] > 96):
            # kseg pads large images to a multiple of 32 where the naive loop can't run at all
            continue
        expected = naive_probabilities(members[0], competition, row, ["identity", "hflip", "vflip"])
        np.testing.assert_allclose(probs, expected, atol=2e-5)


def test_bf16_on_cpu_runs_the_model_in_bf16_and_agrees_with_float32(dsb_test: Path, tmp_path: Path):
    """A checkpoint trained with `train.amp: bf16` predicts in bf16 on CPU too (about 2.5x faster
    on a CPU with AVX512-BF16); its probabilities stay those of float32 to within bf16 rounding."""
    competition = get_competition("dsb2018")
    table = competition.read_test_table(dsb_test)
    probabilities, dtypes = {}, {}
    for amp in ("off", "bf16"):
        members = load_ensemble([write_checkpoint(tmp_path / amp / "best.pt", amp=amp, size=96)])
        seen: set[torch.dtype] = set()
        conv = next(m for m in members[0].model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda module, inputs, output, seen=seen: seen.add(output.dtype))
        results = predict_probabilities(members, competition, table, tta="flip", num_workers=0)
        first = next(results)
        # Between items the caller is back in its own modes, not the model pass's.
        assert not torch.is_inference_mode_enabled() and not torch.is_autocast_enabled("cpu")
        probabilities[amp] = {image_id: probs for _, image_id, probs in [first, *results]}
        dtypes[amp] = seen
    assert dtypes == {"off": {torch.float32}, "bf16": {torch.bfloat16}}
    for image_id, exact in probabilities["off"].items():
        rounded = probabilities["bf16"][image_id]
        assert rounded.dtype == np.float32
        assert np.abs(rounded - exact).mean() < 0.01, image_id
        assert ((rounded > 0.5) == (exact > 0.5)).mean() > 0.98, image_id


def test_ensemble_is_the_weighted_mean_and_logit_mode_averages_logits(
    dsb_test: Path, tmp_path: Path
):
    competition = get_competition("dsb2018")
    table = competition.read_test_table(dsb_test).head(3)
    # "pad" with a small size: no resampling, so probabilities are exact sigmoids of logits
    a = write_checkpoint(tmp_path / "a" / "best.pt", seed=1, resize_mode="pad")
    b = write_checkpoint(tmp_path / "b" / "best.pt", seed=2, resize_mode="pad")

    def run(sources, weights=None, ensemble="mean"):
        members = load_ensemble(sources, weights)
        return [p for _, _, p in predict_probabilities(
            members, competition, table, ensemble=ensemble, num_workers=0)]  # fmt: skip

    only_a, only_b = run([a]), run([b])
    mixed = run([a, b], weights=[3.0, 1.0])
    for pa, pb, pm in zip(only_a, only_b, mixed, strict=True):
        np.testing.assert_allclose(pm, 0.75 * pa + 0.25 * pb, atol=1e-6)
        assert not np.allclose(pa, pb)
    logit = run([a, b], ensemble="logit")
    for pa, pb, pl in zip(only_a, only_b, logit, strict=True):
        # float32 probabilities near 0 or 1 no longer carry their logit: compare elsewhere
        usable = (np.minimum(pa, pb) > 1e-3) & (np.maximum(pa, pb) < 1 - 1e-3)
        pa, pb = pa[usable].astype(np.float64), pb[usable].astype(np.float64)
        expected = 1 / (1 + np.exp(-(np.log(pa / (1 - pa)) + np.log(pb / (1 - pb))) / 2))
        assert usable.mean() > 0.2
        np.testing.assert_allclose(pl[usable], expected, atol=1e-4)


def test_experiment_weight_is_split_over_its_folds(tmp_path: Path):
    experiment = tmp_path / "exp"
    for fold in range(4):
        write_checkpoint(experiment / f"fold_{fold}" / "best.pt", seed=fold)
    other = write_checkpoint(tmp_path / "other.pt", seed=9)
    members = load_ensemble([experiment, other], weights=[1.0, 1.0])
    assert [m.weight for m in members] == [0.25] * 4 + [1.0]


def test_batches_keep_table_order_and_one_input_shape(tmp_path: Path):
    from kaggle_seg.spec import ModelSpec

    table = pd.DataFrame({"height": [10, 10, 20, 20, 20, 10], "width": [10] * 6})
    pad = ModelSpec(
        in_channels=3,
        outputs=("mask",),
        height=16,
        width=16,
        resize_mode="pad",
        normalize="none",
    )
    resize = dataclasses.replace(pad, resize_mode="resize")
    assert shape_batches(table, [resize], 4) == [[0, 1, 2, 3], [4, 5]]
    assert shape_batches(table, [pad], 4) == [[0, 1], [2, 3, 4], [5]]


def test_corrupt_image_fails_naming_it_or_is_skipped_as_empty(
    dsb_test: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    root = tmp_path / "test"
    shutil.copytree(dsb_test, root)
    competition = get_competition("dsb2018")
    table = competition.read_test_table(root)
    broken = Path(table["image_path"].iloc[1])
    broken.write_bytes(b"\x89PNG\r\n garbage")
    members = load_ensemble([write_checkpoint(tmp_path / "best.pt")])
    with pytest.raises(InputError, match=f"{broken.name}.*--on-error skip"):
        list(predict_probabilities(members, competition, table, num_workers=0))
    results = list(predict_probabilities(members, competition, table, num_workers=0,
                                         on_error="skip"))  # fmt: skip
    assert len(results) == len(table)
    assert results[1][2].max() == 0 and results[0][2].max() > 0
    assert any(table["id"].iloc[1] in r.getMessage() for r in caplog.records)


def test_uwmgi_stacks_use_the_neighbour_slices(phantom_dir: Path, tmp_path: Path):
    from kaggle_seg.data.stacks import stack_positions
    from kaggle_seg.predict import PredictionDataset
    from kaggle_seg.spec import ModelSpec

    competition = get_competition("uwmgi")
    table = competition.read_test_table(phantom_dir / "train")
    spec = ModelSpec(
        in_channels=3,
        outputs=("mask",),
        height=64,
        width=64,
        resize_mode="resize",
        normalize="none",
        stack_depth=3,
        stack_stride=2,
    )
    dataset = PredictionDataset(competition, table, [spec])
    item = dataset[5]
    positions = stack_positions(table, 3, 2, "case_day")[5]
    assert list(positions) == [3, 5, 7]
    import cv2

    for channel, position in enumerate(positions):
        slice_image = competition.read_image(table.iloc[position])[..., 0]
        expected = cv2.resize(slice_image, (64, 64), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(item["inputs"][0][channel].numpy(), expected, atol=1e-6)


def test_probability_writer_streams_a_loadable_npz_and_leaves_nothing_on_failure(tmp_path: Path):
    rng = np.random.default_rng(0)
    arrays = {f"img{k}": rng.random((2, 7 + k, 5)).astype(np.float32) for k in range(3)}
    for dtype, tolerance in (("float16", 1e-3), ("uint8", 1 / 255)):
        path = tmp_path / f"p_{dtype}.npz"
        with ProbabilityWriter(path, dtype) as writer:  # type: ignore[arg-type]
            for image_id, probs in arrays.items():
                writer.add(image_id, probs)
        loaded = load_oof(path)
        assert set(loaded) == set(arrays)
        for image_id, probs in arrays.items():
            np.testing.assert_allclose(loaded[image_id], probs, atol=tolerance)
    target = tmp_path / "interrupted.npz"
    with pytest.raises(RuntimeError), ProbabilityWriter(target) as writer:
        writer.add("a", arrays["img0"])
        raise RuntimeError("stop")
    assert not target.exists() and not list(tmp_path.glob(".interrupted*"))


def test_two_probability_writers_of_one_path_do_not_share_a_temporary_file(tmp_path: Path):
    # Two `kseg predict --save` runs aimed at one file: each streams into its own temporary
    # file, so the one that finishes last leaves a whole, loadable npz, never a mixed one.
    target = tmp_path / "probs.npz"
    first, second = ProbabilityWriter(target), ProbabilityWriter(target)
    with first:
        first.add("a", np.full((1, 4, 4), 0.25, np.float32))
        with second:
            second.add("b", np.full((1, 4, 4), 0.75, np.float32))
        assert set(load_oof(target)) == {"b"}
    assert set(load_oof(target)) == {"a"}
    assert [p.name for p in tmp_path.iterdir()] == ["probs.npz"]


@pytest.mark.slow
def test_cli_predict_writes_probabilities(dsb_test: Path, tmp_path: Path):
    from test_cli import kseg

    experiment = tmp_path / "exp"
    for fold in range(2):
        write_checkpoint(experiment / f"fold_{fold}" / "best.pt", seed=fold)
    save = tmp_path / "preds.npz"
    out = kseg("predict", "--checkpoints", str(experiment), "--test-dir", str(dsb_test),
               "--save", str(save), "--dtype", "uint8", "--num-workers", "1").stdout  # fmt: skip
    assert "predicted 6 images with 2 model(s)" in out
    loaded = load_oof(save)
    assert len(loaded) == 6
    bad = kseg("predict", "--checkpoints", str(tmp_path / "nothing"), "--test-dir",
               str(dsb_test), check=False)  # fmt: skip
    assert bad.returncode == 1 and "no such checkpoint" in bad.stderr
    # The competition folder as --data-dir: its stage1_test/, found as kseg submit finds it,
    # gives the same probabilities; as --test-dir it is refused, pointing at --data-dir.
    again = tmp_path / "again.npz"
    out = kseg("predict", "--checkpoints", str(experiment), "--data-dir", str(dsb_test.parent),
               "--save", str(again), "--dtype", "uint8", "--num-workers", "1").stdout  # fmt: skip
    assert "predicted 6 images with 2 model(s)" in out
    for image_id, probabilities in load_oof(again).items():
        np.testing.assert_array_equal(probabilities, loaded[image_id])
    root = kseg("predict", "--checkpoints", str(experiment), "--test-dir", str(dsb_test.parent),
                check=False)  # fmt: skip
    assert root.returncode == 1 and "competition folder goes to --data-dir" in root.stderr
    neither = kseg("predict", "--checkpoints", str(experiment), check=False)
    assert neither.returncode == 1 and "--test-dir" in neither.stderr


@pytest.mark.slow
def test_predict_under_torchrun_joins_the_shares_into_the_one_process_file(
    dsb_test: Path, tmp_path: Path
):
    import os
    import shutil
    import subprocess
    import sys

    from kaggle_seg.predict_folder import predict_folder

    experiment = tmp_path / "exp"
    for fold in range(2):
        write_checkpoint(experiment / f"fold_{fold}" / "best.pt", seed=fold)
    alone = tmp_path / "alone.npz"
    predict_folder([experiment], dsb_test, alone, tta="flip", num_workers=0, device="cpu")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    shared = tmp_path / "shared.npz"
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "kaggle_seg", "predict",
         "--checkpoints", str(experiment), "--test-dir", str(dsb_test), "--save", str(shared),
         "--tta", "flip", "--device", "cpu", "--num-workers", "0"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # One report (rank 0's) for the whole test set, and no part left beside the file.
    assert result.stdout.count("predicted 6 images with 2 model(s)") == 1
    assert "2 processes under torchrun" in result.stdout
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["alone.npz", "shared.npz"]
    one, two = load_oof(alone), load_oof(shared)
    assert list(two) == list(one)  # the order one process writes
    for image_id, probabilities in one.items():
        # Equal up to one float16 step: the batches (and thread counts) differ per process.
        np.testing.assert_allclose(two[image_id], probabilities, rtol=0, atol=1e-3)


def test_joined_probability_parts_follow_the_given_order(tmp_path: Path):
    from kaggle_seg.probabilities import join_probability_files

    parts = [tmp_path / "p.part0.npz", tmp_path / "p.part1.npz"]
    for part, ids in zip(parts, (["c", "a"], ["b", "z"]), strict=True):
        with ProbabilityWriter(part, "uint8") as writer:
            for image_id in ids:
                writer.add(image_id, np.full((1, 2, 3), ord(image_id) / 255, np.float32))
    out = tmp_path / "p.npz"
    assert join_probability_files(parts, out, ["a", "b", "c"]) == 4
    joined = load_oof(out)
    assert list(joined) == ["a", "b", "c", "z"]  # an id the order lacks comes last
    assert joined["z"][0, 0, 0] == pytest.approx(ord("z") / 255)
    assert not any(part.exists() for part in parts)
