"""`kseg tune` on tiny experiments: a uwmgi phantom and real DSB 2018 / LGG images, with OOF
probabilities made from the truth (blurred, noised, plus small spurious blobs) or from a tiny
training run; the fast search against the exhaustive one (every candidate scored by the public
post-processing and metric functions)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
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
from kaggle_seg.probabilities import open_probabilities
from kaggle_seg.search import (
    ClassPart,
    ClassRule,
    FastMaskSearch,
    SearchReport,
    collect_mask_stats,
    median_image_area,
    score_parts,
    search_mask_settings,
    settings_parts,
)
from kaggle_seg.tune import tune_experiment
from kaggle_seg.tune_masks import (
    read_mask_source,
    score_image_dice_settings,
    score_uwmgi_settings,
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


def open_oof(root: Path) -> dict:
    """id -> the OOF file holding it, over the experiment's folds."""
    files = {}
    for path in sorted((root / "runs" / "exp").glob("fold_*/oof.npz")):
        file = open_probabilities(path)
        files.update(dict.fromkeys(file, file))
    return files


def mask_source(root: Path, volumes: bool, heads: dict | None = None, table=None):
    table = read_table(root / "table.csv") if table is None else table
    if volumes:
        table = table.sort_values(["case_day", "slice_index"], kind="stable")
    competition = get_competition(table_competition(table))
    classes = list(competition.classes)
    column = "case_day" if volumes else None
    return read_mask_source(competition, table, open_oof(root), classes, column, heads)


def table_competition(table) -> str:
    return "uwmgi" if "case_day" in table.columns else "lgg"


class PublicPathSearch:
    """The exhaustive search's scorer: every candidate scored by `postprocess_masks`,
    `apply_z_continuity` and the metric's own per-slice Dice and `hausdorff_3d`, volume by
    volume, as `uwmgi_score_volumes` does (lgg: the per-image pixel Dice)."""

    def __init__(self, source, volumetric: bool):
        from kaggle_seg.probabilities import decode_probabilities

        self.source, self.volumetric = source, volumetric
        self.classes = source.classes
        self.slices = []  # per volume: float32 [D, K, H, W]
        for v in range(source.n_volumes):
            buffer, offsets, dtype = source.read_slices(v)
            height, width = source.shapes[v]
            n = len(self.classes) * height * width * dtype.itemsize
            self.slices.append(
                np.stack(
                    [
                        decode_probabilities(
                            buffer[o : o + n].view(dtype).reshape(-1, height, width)
                        )
                        for o in offsets
                    ]
                )
            )
        self.parts: dict = {}

    def part(self, k: int, rule: ClassRule, largest: bool, z_rule: bool) -> ClassPart:
        from kaggle_seg.metrics import gi_dice_per_slice, hausdorff_3d

        key = (k, rule, largest, z_rule)
        if key in self.parts:
            return self.parts[key]
        n = len(self.classes)
        settings = PostprocessConfig(
            classes=self.classes,
            thresholds=[rule.threshold] * n,
            min_area=[rule.min_area] * n,
            gate_pixels=[rule.gate_pixels] * n,
            gate_probability=[rule.gate_probability] * n if rule.gate_probability else None,
            largest_component=largest,
            z_continuity=z_rule,
        )
        heads = self.source.class_probabilities
        part = ClassPart()
        intersections, totals = [], []
        for v, volume in enumerate(self.slices):
            first = int(self.source.volume_starts[v])
            masks = np.stack(
                [
                    postprocess_masks(
                        p, settings, class_probabilities=None if heads is None else heads[first + z]
                    )
                    for z, p in enumerate(volume)
                ]
            )
            if z_rule:
                masks = apply_z_continuity(masks)
            prediction = masks[:, k].astype(bool)
            truth = self.source.read_truth(v)[k].astype(bool)
            if not self.volumetric:
                intersections.append(np.count_nonzero(truth & prediction))
                totals.append(np.count_nonzero(truth) + np.count_nonzero(prediction))
                continue
            dice = gi_dice_per_slice(truth, prediction)
            dice = dice[~np.isnan(dice)]
            part.dice_sum += float(dice.sum())
            part.dice_count += dice.size
            distance = hausdorff_3d(truth, prediction)
            if not np.isnan(distance):
                part.hausdorff_sum += distance
                part.hausdorff_count += 1
        if not self.volumetric:
            part.intersections = np.array(intersections)
            part.totals = np.array(totals)
        self.parts[key] = part
        return part

    bound = part

    def score(self, parts) -> float:
        return score_parts(parts, self.volumetric)


def search_both(source, volumetric: bool, tune_z: bool):
    """(settings and score) of the fast search and of the exhaustive one, and the report."""
    report = SearchReport()
    options = dict(
        median_area=median_image_area(source),
        with_heads=source.class_probabilities is not None,
        tune_z=tune_z,
    )
    fast = FastMaskSearch(source, collect_mask_stats(source, volumetric=volumetric), volumetric)
    found = search_mask_settings(fast, source.classes, report=report, **options)
    reference = PublicPathSearch(source, volumetric)
    exhaustive = search_mask_settings(reference, source.classes, **options)
    return found, exhaustive, report


def test_fast_search_equals_the_exhaustive_search(uwmgi_root: Path) -> None:
    source, _ = mask_source(uwmgi_root, volumes=True)
    (fast, fast_score), (settings, score), report = search_both(source, True, tune_z=True)
    assert fast == settings
    assert fast_score == pytest.approx(score, abs=1e-12)
    # The bounds did their job: most candidates were passed over without a mask being built.
    assert report.passed_over > report.scored > 0
    # With a head's gate (random probabilities: gates that help and that hurt).
    rng = np.random.default_rng(3)
    table = read_table(uwmgi_root / "table.csv")
    heads = {i: rng.uniform(0.0, 1.0, 3).astype(np.float32) for i in table["id"]}
    source, _ = mask_source(uwmgi_root, volumes=True, heads=heads)
    (fast, fast_score), (settings, score), _ = search_both(source, True, tune_z=True)
    assert fast == settings
    assert fast_score == pytest.approx(score, abs=1e-12)


@pytest.mark.slow
def test_fast_search_equals_the_exhaustive_search_on_hard_cases(
    uwmgi_root: Path, tmp_path: Path
) -> None:
    # Heavy noise: fragments of organs that min_area removes, specks that tie for the largest
    # component, slices that z-continuity empties, in uint8 (256 levels) this time.
    table = read_table(uwmgi_root / "table.csv")
    competition = get_competition("uwmgi")
    rng = np.random.default_rng(7)
    oof = {}
    for row in table.to_dict("records"):
        truth = np.moveaxis(competition.read_mask(row), -1, 0).astype(np.float32)
        speckle = (rng.random(truth.shape) < 0.004) * 0.6
        oof[row["id"]] = np.clip(0.6 * truth + rng.normal(0, 0.2, truth.shape) + speckle, 0, 1)
    config = ExperimentConfig(data=DataConfig(competition="uwmgi", table=uwmgi_root / "table.csv"))
    write_experiment(tmp_path, config, [oof], dtype="uint8")
    shutil.copy(uwmgi_root / "table.csv", tmp_path / "table.csv")
    source, _ = mask_source(tmp_path, volumes=True, table=table)
    (fast, fast_score), (settings, score), report = search_both(source, True, tune_z=True)
    assert fast == settings
    assert fast_score == pytest.approx(score, abs=1e-12)
    assert report.hausdorff_volumes > 0  # some masks had to be built and measured in full


def test_search_bookkeeping_matches_the_metric(uwmgi_root: Path) -> None:
    table = read_table(uwmgi_root / "table.csv")
    classes = list(get_competition("uwmgi").classes)
    rng = np.random.default_rng(1)
    heads = {image_id: rng.uniform(0.0, 1.0, 3).astype(np.float32) for image_id in table["id"]}
    for with_heads in (False, True):
        volumes, names = mask_source(uwmgi_root, True, heads if with_heads else None)
        images, image_names = mask_source(uwmgi_root, False, heads if with_heads else None, table)
        fast_volumes = FastMaskSearch(volumes, collect_mask_stats(volumes, volumetric=True), True)
        fast_images = FastMaskSearch(images, collect_mask_stats(images, volumetric=False), False)
        for trial in range(5):
            settings = PostprocessConfig(
                classes=classes,
                thresholds=rng.choice([0.3, 0.45, 0.5, 0.65], 3).tolist(),
                min_area=rng.choice([0, 8, 40, 400], 3).tolist(),
                gate_pixels=rng.choice([0, 50, 900], 3).tolist(),
                gate_probability=rng.choice([0.0, 0.25, 0.9], 3).tolist() if with_heads else None,
                largest_component=bool(trial % 2),
                z_continuity=trial >= 2,
            )
            # The bound is exact in its Dice and never above the exact Hausdorff sum.
            gates = settings.gate_probability or [0.0] * 3
            for k in range(3):
                rule = ClassRule(
                    settings.thresholds[k], settings.min_area[k], settings.gate_pixels[k], gates[k]
                )
                flags = (settings.largest_component, settings.z_continuity)
                bound = fast_volumes.bound(k, rule, *flags)
                exact = fast_volumes.part(k, rule, *flags)
                assert bound.dice_sum == exact.dice_sum
                assert bound.hausdorff_sum <= exact.hausdorff_sum + 1e-12
            expected = score_uwmgi_settings(volumes, names, settings)["score"]
            assert fast_volumes.score_settings(settings) == pytest.approx(expected, abs=1e-12)
            settings.z_continuity = False
            expected = score_image_dice_settings(images, image_names, settings)["score"]
            assert fast_images.score(settings_parts(fast_images, settings)) == pytest.approx(
                expected, abs=1e-12
            )


def test_tune_reads_compressed_oof_of_earlier_versions(tmp_path: Path, uwmgi_root: Path) -> None:
    # oof.npz used to be written compressed: no memory map, one array decompressed at a time.
    experiment = tmp_path / "runs" / "exp"
    shutil.copytree(uwmgi_root / "runs" / "exp", experiment)
    for path in experiment.glob("fold_*/oof.npz"):
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in stored.files}
        path.unlink()
        np.savez_compressed(path, **arrays)
        assert not open_probabilities(path).is_mapped(next(iter(arrays)))
    compressed = tune_experiment(experiment)
    mapped = tune_experiment(uwmgi_root / "runs" / "exp", out=tmp_path / "mapped.json")
    assert compressed.settings == mapped.settings
    assert compressed.after == mapped.after and compressed.before == mapped.before


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


def test_tune_refuses_an_out_folder_before_searching(
    tmp_path: Path, uwmgi_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--out runs/exp` (the folder, not the file) is refused before the search, naming the
    file meant, not after minutes of searching with an OS error."""
    import kaggle_seg.tune as tune

    def no_search(*args, **kwargs):
        raise AssertionError("searched before checking --out")

    monkeypatch.setitem(tune.TUNERS, "volumes", no_search)
    experiment = uwmgi_root / "runs" / "exp"
    with pytest.raises(KsegError, match=rf"^--out {tmp_path}: is a folder; .*postprocess\.json$"):
        tune_experiment(experiment, out=tmp_path)


def test_tune_refuses_folds_that_validate_the_same_image(tmp_path: Path, uwmgi_root: Path) -> None:
    """fold_1 trained on another folds.csv holds images fold_0 validated too: each would count
    twice (or the last file's silently) in the CV the settings are chosen on."""
    experiment = tmp_path / "runs" / "exp"
    shutil.copytree(uwmgi_root / "runs" / "exp", experiment)
    shutil.copy(experiment / "fold_0" / "oof.npz", experiment / "fold_1" / "oof.npz")
    first = sorted(open_probabilities(experiment / "fold_0" / "oof.npz"))[0]
    with pytest.raises(
        KsegError,
        match=rf"^{experiment / 'fold_1' / 'oof.npz'}: {first} is also in "
        rf"{experiment / 'fold_0' / 'oof.npz'}: ",
    ):
        tune_experiment(experiment, out=tmp_path / "settings.json")
    assert not (tmp_path / "settings.json").exists()


def test_tune_warns_of_trained_folds_without_oof(
    tmp_path: Path, uwmgi_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """fold_1 has best.pt (kseg submit predicts with it) but no oof.npz (still training, or
    stopped before the OOF pass): tuned on fold 0, and the log says which fold was left out."""
    import logging

    experiment = tmp_path / "runs" / "exp"
    shutil.copytree(uwmgi_root / "runs" / "exp", experiment)
    (experiment / "fold_1" / "oof.npz").unlink()
    (experiment / "fold_1" / "best.pt").write_bytes(b"weights")
    (experiment / "fold_2.old-20260101-000000").mkdir()  # moved aside: no fold
    (experiment / "fold_2.old-20260101-000000" / "best.pt").write_bytes(b"weights")
    with caplog.at_level(logging.WARNING, logger="kaggle_seg.tune"):
        assert tune_experiment(experiment).folds == [0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{experiment}: fold(s) 1 have best.pt but no oof.npz (still training, or stopped "
        "before the OOF pass: kseg train --resume): tuned without them"
    ]


def test_tune_warns_when_folds_predicted_their_oof_with_different_tta(
    tmp_path: Path, uwmgi_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """fold_1 retrained with train.oof_tta flip beside a plain fold_0: tuned, with a warning
    naming each fold's TTA (thresholds chosen on the mix fit neither --tta exactly)."""
    import logging

    from kaggle_seg.runs import read_run_config

    experiment = tmp_path / "runs" / "exp"
    shutil.copytree(uwmgi_root / "runs" / "exp", experiment)
    config = read_run_config(experiment / "fold_1")
    config.train.oof_tta = "flip"
    save_config(config, experiment / "fold_1" / "config.yaml")
    with caplog.at_level(logging.WARNING, logger="kaggle_seg.tune"):
        assert tune_experiment(experiment).folds == [0, 1]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"{experiment}: OOF predicted with different train.oof_tta (fold 0 none, fold 1 flip): "
        "the settings are tuned on the mix"
    ]


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


TINY_DSB = """
name: tiny
data:
  competition: dsb2018
  table: {root}/table.csv
  folds: {root}/folds.csv
  targets: mask_border
augment: {{preset: light, height: 64, width: 64}}
model: {{architecture: seed_unet, params: {{base_channels: 8, depth: 3}}}}
train:
  epochs: 3
  batch_size: 8
  num_workers: 0
  optimizer: {{name: adam, lr: 0.01}}
  loss: [{{name: bce, weight: 0.6}}, {{name: dice, weight: 0.4}}]
  cache: memory
"""


@pytest.mark.slow  # trains a tiny model for a few seconds first
def test_dsb_search_equals_the_exhaustive_search_on_trained_oof(
    write_dsb_subset, tmp_path: Path
) -> None:
    from kaggle_seg.config import load_experiment
    from kaggle_seg.probabilities import load_oof
    from kaggle_seg.search import IMPROVEMENT, THRESHOLD_GRID
    from kaggle_seg.train import train_fold
    from kaggle_seg.tune_instances import MIN_NUCLEUS_GRID

    root = write_dsb_subset(tmp_path, 24, 8)
    (root / "tiny.yaml").write_text(TINY_DSB.format(root=root))
    train_fold(load_experiment(root / "tiny.yaml"), 0, run_root=root / "runs", device="cpu")
    experiment = root / "runs" / "tiny"
    result = tune_experiment(experiment)

    # The exhaustive search: the same coordinate descent, every candidate scored by
    # postprocess_instances and the competition metric.
    competition = get_competition("dsb2018")
    table = read_table(root / "table.csv").set_index("id", drop=False)
    oof = load_oof(experiment / "fold_0" / "oof.npz")
    truths = {i: competition.read_instances(table.loc[i]) for i in oof}
    classes = ["nuclei", "border"]

    def score(threshold: float, border: float, min_nucleus: int) -> float:
        settings = default_postprocess(classes).model_copy(
            update={"thresholds": [threshold, border], "min_nucleus": min_nucleus}
        )
        return float(
            np.mean(
                [
                    dsb_image_score(truths[i], postprocess_instances(p, settings))
                    for i, p in oof.items()
                ]
            )
        )

    default_min = default_postprocess(classes).min_nucleus
    current = {"threshold": 0.5, "border_threshold": 0.5, "min_nucleus": default_min}
    best = score(0.5, 0.5, default_min)
    for _ in range(2):
        improved = False
        for name in ("threshold", "border_threshold"):
            for value in THRESHOLD_GRID:
                candidate = {**current, name: value}
                for min_nucleus in sorted({*MIN_NUCLEUS_GRID, default_min}):
                    found = score(
                        candidate["threshold"], candidate["border_threshold"], min_nucleus
                    )
                    if found > best + IMPROVEMENT:
                        best, improved = found, True
                        current = {**candidate, "min_nucleus": min_nucleus}
        if not improved:
            break
    assert result.settings.thresholds == [current["threshold"], current["border_threshold"]]
    assert result.settings.min_nucleus == current["min_nucleus"]
    assert result.after["score"] == pytest.approx(best, abs=1e-12)


# ----------------------------------------------------------------------------- lgg


def test_tune_lgg_improves_the_per_patient_dice(shared_data: Path, tmp_path: Path) -> None:
    from kaggle_seg.metrics import pixel_counts, pixel_metrics, volume_dice
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
    assert result.after["score"] > result.before["score"] + 0.005
    stored = load_oof(experiment / "fold_0" / "oof.npz")
    patient = dict(zip(table["id"], table["group"], strict=True))
    rows = []
    for i, p in stored.items():
        truth, mask = truths[i][..., 0], postprocess_masks(p, result.settings)[0]
        rows.append({"patient": patient[i], "dice": pixel_metrics(truth, mask)["dice"],
                     **pixel_counts(truth, mask)})  # fmt: skip
    by_hand = pd.DataFrame(rows)
    # scored as training scores LGG folds: per patient volume, the image mean beside it
    assert result.after["score"] == pytest.approx(volume_dice(by_hand, "patient").mean(), abs=1e-12)
    assert result.after["patient_dice"] == result.after["score"]
    assert result.after["dice"] == pytest.approx(by_hand["dice"].mean(), abs=1e-12)
    assert result.before["patient_dice"] == result.before["score"]


@pytest.mark.slow
def test_bench_tune_runs_and_the_previous_implementation_agrees(tmp_path: Path) -> None:
    """benchmarks/bench_tune.py end to end on 2 case-days; with git history, against the
    previous implementation (its whole package at that commit) on one case-day."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    script = repo / "benchmarks" / "bench_tune.py"
    previous = subprocess.run(
        ["git", "-C", str(repo), "cat-file", "-e", "d9294f8^{commit}"], capture_output=True
    )
    old_slices = "144" if previous.returncode == 0 else "0"  # a shallow clone lacks it
    result = subprocess.run(
        [sys.executable, str(script), "--slices", "288", "--old-slices", old_slices,
         "--workdir", str(tmp_path), "--cpus", "0"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| new, all slices | 288 |" in result.stdout
    if old_slices != "0":
        assert "same postprocess.json as the previous implementation on its slices: True" in (
            result.stdout
        )


def test_empty_prediction_score_is_the_share_of_empty_images_or_groups() -> None:
    from kaggle_seg.tune import empty_prediction_score

    rows = pd.DataFrame(
        {"group": ["p1", "p1", "p2", "p2", "p3"], "empty": [True, True, True, False, "False"]}
    )
    assert empty_prediction_score(rows, "images", "group") == pytest.approx(3 / 5)
    assert empty_prediction_score(rows, "groups", "group") == pytest.approx(1 / 3)
    assert empty_prediction_score(rows, "instances", "group") is None
    assert empty_prediction_score(rows.drop(columns="empty"), "images", "group") is None
