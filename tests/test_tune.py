"""`kseg tune` on tiny fake experiments: a uwmgi phantom and real DSB 2018 images, with OOF
probabilities made from the truth (blurred, noised, plus small spurious blobs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from kaggle_seg.competitions import get_competition
from kaggle_seg.config import DataConfig, ExperimentConfig, save_config
from kaggle_seg.errors import KsegError
from kaggle_seg.metrics import dsb_image_score, uwmgi_score_volumes
from kaggle_seg.postprocess import (
    PostprocessConfig,
    apply_z_continuity,
    default_postprocess,
    load_postprocess,
    postprocess_instances,
    postprocess_masks,
)
from kaggle_seg.prepare import prepare_table, read_table
from kaggle_seg.tune import (
    MaskSearch,
    read_mask_data,
    score_image_dice_settings,
    score_uwmgi_settings,
    tune_experiment,
)

UWMGI_CASE_DAYS = ("case1_day0", "case1_day1", "case2_day0")
N_SLICES = 10
# Small 256x256 / 320x256 training images with few nuclei: quick to read and split.
DSB_IMAGES = ("00071198d059", "0280fa8f60f6", "03398329ced0", "0acd2c223d30", "0ddd8deaf169")


def noisy(targets: np.ndarray, rng: np.random.Generator, n_blobs: int, sigma: float) -> np.ndarray:
    """float32 [K, H, W] probabilities from uint8 0/1 [K, H, W] targets: blurred, noised, and
    `n_blobs` confident 3x4 blobs on channel 0 where there is nothing."""
    import cv2

    blurred = np.stack([cv2.GaussianBlur(t.astype(np.float32), (0, 0), sigma) for t in targets])
    probabilities = 0.05 + 0.9 * blurred + rng.normal(0.0, 0.05, blurred.shape)
    for _ in range(n_blobs):
        k = int(rng.integers(len(targets)))
        y = int(rng.integers(0, targets.shape[1] - 3))
        x = int(rng.integers(0, targets.shape[2] - 4))
        probabilities[k, y : y + 3, x : x + 4] = 0.95
    return np.clip(probabilities, 0.0, 1.0).astype(np.float32)


def write_experiment(
    root: Path,
    config: ExperimentConfig,
    oof_parts: list[dict[str, np.ndarray]],
    dtype: str = "float16",
) -> Path:
    from kaggle_seg.train import save_oof

    experiment = root / "runs" / "exp"
    for fold, part in enumerate(oof_parts):
        save_config(config, experiment / f"fold_{fold}" / "config.yaml")
        save_oof(part, experiment / f"fold_{fold}" / "oof.npz", dtype)
    return experiment


@pytest.fixture(scope="module")
def uwmgi_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantom uwmgi table (3 case-days of 10 slices) and a two-fold experiment on it."""
    from kaggle_seg.competitions.uwmgi_phantom import make_uwmgi_phantom

    root = tmp_path_factory.mktemp("tune_uwmgi")
    make_uwmgi_phantom(root / "data", case_days=UWMGI_CASE_DAYS, n_slices=N_SLICES, seed=1)
    prepare_table("uwmgi", root / "data", root / "table.csv")
    table = read_table(root / "table.csv")
    competition = get_competition("uwmgi")
    rng = np.random.default_rng(0)
    oof = {
        row["id"]: noisy(np.moveaxis(competition.read_mask(row), -1, 0), rng, 2, 2.0)
        for row in table.to_dict("records")
    }
    config = ExperimentConfig(data=DataConfig(competition="uwmgi", table=root / "table.csv"))
    by_case = [
        {k: v for k, v in oof.items() if k.startswith("case1_")},
        {k: v for k, v in oof.items() if k.startswith("case2_")},
    ]
    write_experiment(root, config, by_case)
    return root


def uwmgi_score_by_hand(root: Path, settings: PostprocessConfig) -> float:
    """The GI score of the experiment's OOF under `settings`, straight from the public parts."""
    from kaggle_seg.train import load_oof

    table = read_table(root / "table.csv")
    competition = get_competition("uwmgi")
    oof = {}
    for fold in (0, 1):
        oof.update(load_oof(root / "runs" / "exp" / f"fold_{fold}" / "oof.npz"))
    volumes = []
    for case_day, rows in table.groupby("case_day"):
        rows = rows.sort_values("slice_index").to_dict("records")
        truth = np.stack([competition.read_mask(r) for r in rows])
        masks = np.stack([postprocess_masks(oof[r["id"]], settings) for r in rows])
        if settings.z_continuity:
            masks = apply_z_continuity(masks)
        volumes.append((case_day, truth, np.moveaxis(masks, 1, -1)))
    return uwmgi_score_volumes(volumes, competition.classes)["score"]


def test_tune_uwmgi_improves_the_gi_score(uwmgi_root: Path) -> None:
    experiment = uwmgi_root / "runs" / "exp"
    result = tune_experiment(experiment)
    assert result.folds == [0, 1]
    assert result.n_images == len(UWMGI_CASE_DAYS) * N_SLICES
    assert result.after["score"] > result.before["score"] + 0.05
    assert set(result.after) >= {"score", "dice", "hausdorff", "dice_stomach"}
    # The spurious blobs are 12 pixels: the min-area rule has to remove them.
    assert all(area > 12 for area in result.settings.min_area)
    assert result.path == experiment / "postprocess.json"
    assert load_postprocess(result.path) == result.settings
    assert result.before["score"] == pytest.approx(
        uwmgi_score_by_hand(uwmgi_root, default_postprocess(result.settings.classes)), abs=1e-12
    )
    assert result.after["score"] == pytest.approx(
        uwmgi_score_by_hand(uwmgi_root, result.settings), abs=1e-12
    )


def test_search_bookkeeping_matches_the_metric(uwmgi_root: Path) -> None:
    table = read_table(uwmgi_root / "table.csv")
    from kaggle_seg.train import load_oof

    oof = {}
    for fold in (0, 1):
        oof.update(load_oof(uwmgi_root / "runs" / "exp" / f"fold_{fold}" / "oof.npz"))
    classes = list(get_competition("uwmgi").classes)
    competition = get_competition("uwmgi")
    volumes = read_mask_data(competition, table, oof, classes, "case_day")
    images = read_mask_data(competition, table, oof, classes, None)
    rng = np.random.default_rng(1)
    for trial in range(4):
        settings = PostprocessConfig(
            classes=classes,
            thresholds=rng.choice([0.3, 0.42, 0.5, 0.65], 3).tolist(),
            min_area=rng.choice([0, 8, 40, 400], 3).tolist(),
            gate_pixels=rng.choice([0, 50, 900], 3).tolist(),
            largest_component=bool(trial % 2),
            z_continuity=trial >= 2,
        )
        fast = MaskSearch(volumes, volumetric=True).score_settings(settings)
        assert fast == pytest.approx(score_uwmgi_settings(volumes, settings)["score"], abs=1e-12)
        settings.z_continuity = False
        fast = MaskSearch(images, volumetric=False).score_settings(settings)
        assert fast == pytest.approx(
            score_image_dice_settings(images, settings)["score"], abs=1e-12
        )

    # A classification head's empty-slice gate: random class probabilities, so gates that help
    # and gates that hurt are both scored.
    heads = {image_id: rng.uniform(0.0, 1.0, 3).astype(np.float32) for image_id in oof}
    gated_volumes = read_mask_data(competition, table, oof, classes, "case_day", heads)
    gated_images = read_mask_data(competition, table, oof, classes, None, heads)
    for trial in range(3):
        settings = PostprocessConfig(
            classes=classes,
            thresholds=rng.choice([0.3, 0.5], 3).tolist(),
            min_area=rng.choice([0, 40], 3).tolist(),
            gate_pixels=rng.choice([0, 50], 3).tolist(),
            gate_probability=rng.choice([0.0, 0.25, 0.5, 0.9], 3).tolist(),
            z_continuity=trial == 1,
        )
        fast = MaskSearch(gated_volumes, volumetric=True).score_settings(settings)
        expected = score_uwmgi_settings(gated_volumes, settings)["score"]
        assert fast == pytest.approx(expected, abs=1e-12)
        settings.z_continuity = False
        fast = MaskSearch(gated_images, volumetric=False).score_settings(settings)
        expected = score_image_dice_settings(gated_images, settings)["score"]
        assert fast == pytest.approx(expected, abs=1e-12)


def test_tune_keeps_the_defaults_on_ties(tmp_path: Path, uwmgi_root: Path) -> None:
    # Probabilities that are the truth itself: nothing can beat the defaults.
    table = read_table(uwmgi_root / "table.csv")
    competition = get_competition("uwmgi")
    perfect = {
        row["id"]: np.moveaxis(competition.read_mask(row), -1, 0).astype(np.float32)
        for row in table.to_dict("records")
    }
    config = ExperimentConfig(data=DataConfig(competition="uwmgi", table=uwmgi_root / "table.csv"))
    experiment = write_experiment(tmp_path, config, [perfect])
    result = tune_experiment(experiment)
    assert result.before["score"] == result.after["score"] == 1.0
    assert result.settings == default_postprocess(competition.classes)


def test_tune_subsamples_whole_case_days(tmp_path: Path, uwmgi_root: Path) -> None:
    experiment = uwmgi_root / "runs" / "exp"
    out = tmp_path / "elsewhere.json"
    result = tune_experiment(experiment, max_images=15, out=out, seed=2)
    assert result.n_images == N_SLICES
    assert result.after["score"] >= result.before["score"]
    assert load_postprocess(out) == result.settings


def test_tune_finds_a_relative_table(
    tmp_path: Path, uwmgi_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(uwmgi_root / "table.csv", tmp_path / "table.csv")
    config = ExperimentConfig(data=DataConfig(competition="uwmgi", table=Path("table.csv")))
    oof_path = uwmgi_root / "runs" / "exp" / "fold_1" / "oof.npz"
    experiment = tmp_path / "runs" / "exp"
    save_config(config, experiment / "fold_1" / "config.yaml")
    shutil.copy(oof_path, experiment / "fold_1" / "oof.npz")
    monkeypatch.chdir(tmp_path)  # relative to the current directory
    assert tune_experiment(Path("runs/exp")).folds == [1]
    monkeypatch.chdir(uwmgi_root)  # relative to the root above runs/<exp>/
    assert tune_experiment(experiment).n_images == N_SLICES


def test_tune_errors_name_the_problem(tmp_path: Path, uwmgi_root: Path) -> None:
    with pytest.raises(KsegError, match="experiment folder not found"):
        tune_experiment(tmp_path / "nothing")
    (tmp_path / "exp" / "fold_0").mkdir(parents=True)
    with pytest.raises(KsegError, match=f"no out-of-fold predictions in {tmp_path / 'exp'}: "):
        tune_experiment(tmp_path / "exp")
    shutil.copy(uwmgi_root / "runs" / "exp" / "fold_0" / "oof.npz", tmp_path / "exp" / "fold_0")
    with pytest.raises(KsegError, match=r"config\.yaml: resolved config not found"):
        tune_experiment(tmp_path / "exp")
    # A table without case1_day0: the OOF names slices it lacks.
    table = read_table(uwmgi_root / "table.csv")
    table[table["case_day"] != "case1_day0"].to_csv(tmp_path / "t.csv", index=False)
    config = ExperimentConfig(data=DataConfig(competition="uwmgi", table=tmp_path / "t.csv"))
    save_config(config, tmp_path / "exp" / "fold_0" / "config.yaml")
    with pytest.raises(KsegError, match=r"oof\.npz: 10 id\(s\) not in the table"):
        tune_experiment(tmp_path / "exp")
    # Three channels where a dsb2018 mask_border model has two.
    config = ExperimentConfig(
        data=DataConfig(
            competition="dsb2018", table=uwmgi_root / "table.csv", targets="mask_border"
        )
    )
    save_config(config, tmp_path / "exp" / "fold_0" / "config.yaml")
    with pytest.raises(KsegError, match=r"case1_day0_slice_0001 has probabilities \(3, 266, 266\)"):
        tune_experiment(tmp_path / "exp")
    # Folds trained for different competitions are not one experiment.
    save_config(
        ExperimentConfig(data=DataConfig(competition="lgg", table=uwmgi_root / "table.csv")),
        tmp_path / "exp" / "fold_1" / "config.yaml",
    )
    shutil.copy(uwmgi_root / "runs" / "exp" / "fold_1" / "oof.npz", tmp_path / "exp" / "fold_1")
    with pytest.raises(KsegError, match=r"data\.competition 'lgg' differs from fold_0's 'dsb2018'"):
        tune_experiment(tmp_path / "exp")


# ----------------------------------------------------------------------------- dsb2018


@pytest.fixture(scope="module")
def dsb_root(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DSB table of a few real training images (linked, not copied)."""
    source = shared_data / "dsb2018" / "stage1_train"
    root = tmp_path_factory.mktemp("tune_dsb")
    (root / "data" / "stage1_train").mkdir(parents=True)
    for prefix in DSB_IMAGES:
        folder = next(source.glob(f"{prefix}*"), None)
        if folder is None:
            pytest.skip(f"DSB image {prefix}* not in {source}")
        (root / "data" / "stage1_train" / folder.name).symlink_to(folder)
    prepare_table("dsb2018", root / "data", root / "table.csv")
    return root


@pytest.mark.parametrize("targets", ["mask_border", "mask"])
def test_tune_dsb2018_improves_the_map(dsb_root: Path, tmp_path: Path, targets: str) -> None:
    from kaggle_seg.data.dataset import instance_targets

    table = read_table(dsb_root / "table.csv")
    competition = get_competition("dsb2018")
    rng = np.random.default_rng(0)
    truths, oof = {}, {}
    for row in table.to_dict("records"):
        truths[row["id"]] = competition.read_instances(row)
        channels = np.moveaxis(instance_targets(truths[row["id"]]), -1, 0)
        if targets == "mask":
            channels = channels[:1]
        oof[row["id"]] = noisy(channels, rng, 6, 1.0)
    config = ExperimentConfig(
        data=DataConfig(competition="dsb2018", table=dsb_root / "table.csv", targets=targets)
    )
    experiment = write_experiment(tmp_path, config, [oof])
    result = tune_experiment(experiment)
    classes = ["nuclei", "border"] if targets == "mask_border" else ["nuclei"]
    assert result.settings.classes == classes
    assert result.n_images == len(DSB_IMAGES)
    # The spurious blobs are 12 pixels, above the default min_nucleus of 8.
    assert result.settings.min_nucleus > 12
    assert result.after["score"] > result.before["score"] + 0.02
    assert load_postprocess(experiment / "postprocess.json") == result.settings
    from kaggle_seg.train import load_oof

    stored = load_oof(experiment / "fold_0" / "oof.npz")
    by_hand = np.mean(
        [
            dsb_image_score(truths[i], postprocess_instances(p, result.settings))
            for i, p in stored.items()
        ]
    )
    assert result.after["score"] == pytest.approx(by_hand, abs=1e-12)


# ----------------------------------------------------------------------------- lgg


def test_tune_lgg_improves_the_mean_dice(shared_data: Path, tmp_path: Path) -> None:
    from kaggle_seg.metrics import pixel_metrics
    from kaggle_seg.train import load_oof

    source = shared_data / "lgg" / "kaggle_3m"
    patients = sorted(source.glob("TCGA_*"))[:2]
    if len(patients) < 2:
        pytest.skip(f"LGG patients not found in {source}")
    (tmp_path / "data").mkdir()
    for folder in patients:
        (tmp_path / "data" / folder.name).symlink_to(folder)
    prepare_table("lgg", tmp_path / "data", tmp_path / "table.csv")
    table = read_table(tmp_path / "table.csv")
    competition = get_competition("lgg")
    rng = np.random.default_rng(0)
    truths = {row["id"]: competition.read_mask(row) for row in table.to_dict("records")}
    oof = {i: noisy(np.moveaxis(t, -1, 0), rng, 1, 2.0) for i, t in truths.items()}
    config = ExperimentConfig(data=DataConfig(competition="lgg", table=tmp_path / "table.csv"))
    # uint8 OOF: probabilities that float16 does not hold exactly.
    experiment = write_experiment(tmp_path, config, [oof], dtype="uint8")
    result = tune_experiment(experiment)
    assert result.settings.classes == ["abnormality"]
    assert result.n_images == len(table)
    assert result.after["score"] > result.before["score"] + 0.02
    stored = load_oof(experiment / "fold_0" / "oof.npz")
    by_hand = np.mean(
        [
            pixel_metrics(truths[i][..., 0], postprocess_masks(p, result.settings)[0])["dice"]
            for i, p in stored.items()
        ]
    )
    assert result.after["score"] == pytest.approx(by_hand, abs=1e-12)
