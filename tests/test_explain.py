"""`kseg explain`: stage activations through hooks that leave the model as it was, Grad-CAM
through pytorch-grad-cam, one grid per image, on a seed U-Net and an smp model over real LGG
slices."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kaggle_seg.competitions import get_competition
from kaggle_seg.config import ExperimentConfig, build_data_config
from kaggle_seg.errors import KsegError

pytest.importorskip("pytorch_grad_cam")

MODELS = {
    "seed": {"architecture": "seed_unet", "params": {"base_channels": 4, "depth": 3}},
    "smp": {
        "architecture": "Unet",
        "encoder": "resnet18",
        "params": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]},
    },
}


def save_checkpoint(path: Path, model_config: dict, table: Path, folds: Path) -> Path:
    """A random-init LGG model saved the way `kseg train` saves best.pt (fold 0)."""
    from kaggle_seg.models import build_model

    config = ExperimentConfig.model_validate(
        {
            "name": "explain",
            "data": {"competition": "lgg", "table": str(table), "folds": str(folds)},
            "augment": {"height": 64, "width": 64},
            "model": model_config,
        }
    )
    torch.manual_seed(0)
    model = build_model(config.model, 3, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": model.state_dict(),
            "config": config.model_dump(mode="json"),
            "competition": "lgg",
            "classes": ["abnormality"],
            "in_channels": 3,
            "fold": 0,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def lgg_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Six slices of one LGG patient (three with a lesion), folds 0 / 1, and a checkpoint of
    each model kind in runs/<kind>/fold_0."""
    root = tmp_path_factory.mktemp("explain")
    table = get_competition("lgg").read_table(shared_data / "lgg", build_data_config("lgg"))
    patient = table[table["group"] == table["group"].iloc[0]]
    rows = pd.concat([patient[~patient["empty"]].head(3), patient[patient["empty"]].head(3)])
    rows.to_csv(root / "table.csv", index=False)
    folds = pd.DataFrame({"id": rows["id"], "fold": [0, 1, 0, 1, 0, 1], "group": rows["group"]})
    folds.to_csv(root / "folds.csv", index=False)
    runs = {
        kind: save_checkpoint(
            root / "runs" / kind / "fold_0" / "best.pt",
            config,
            root / "table.csv",
            root / "folds.csv",
        )
        for kind, config in MODELS.items()
    }
    return {"root": root, "rows": rows, "folds": folds, "runs": runs}


@pytest.mark.parametrize("kind", MODELS)
def test_hooks_find_stages_and_leave_the_model_unchanged(lgg_run: dict, kind: str):
    from kaggle_seg.explain import LogitsOnly, run_with_stages
    from kaggle_seg.predict import load_member

    member = load_member(lgg_run["runs"][kind], 1.0, torch.device("cpu"))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = member.model(x)
    logits, stages, outputs = run_with_stages(LogitsOnly(member.model), x)
    # The seed U-Net's stages at full resolution and 3 poolings; smp's skip the input itself.
    depth = 4 if kind == "seed" else 3
    encoder = [f"encoder.{k}" for k in range(depth)]
    assert [s.name for s in stages] == [*encoder, "decoder.0", "decoder.1", "decoder.2"]
    assert all(s.module is not None for s in stages)
    for stage in stages:  # each stage's module really returns the captured map
        assert outputs[stage.name].ndim == 4
    assert outputs["decoder.2"].shape[-2:] == (64, 64)
    torch.testing.assert_close(logits, before)
    assert not any(m._forward_hooks for m in member.model.modules())
    with torch.no_grad():
        torch.testing.assert_close(member.model(x), before)


@pytest.mark.parametrize("kind", MODELS)
def test_explanation_follows_the_prediction_path(lgg_run: dict, kind: str):
    from kaggle_seg.explain import explain_image
    from kaggle_seg.predict import PredictionDataset, load_member, predict_probabilities

    member = load_member(lgg_run["runs"][kind], 1.0, torch.device("cpu"))
    competition = get_competition("lgg")
    rows = lgg_run["rows"].head(2).reset_index(drop=True)
    dataset = PredictionDataset(competition, rows, [member.spec])
    predicted = list(predict_probabilities([member], competition, rows, num_workers=0))
    for position, row in rows.iterrows():
        inputs = dataset[position]["inputs"][0][None]
        explanation = explain_image(member, inputs, row.to_dict(), stage="decoder.1")
        assert explanation.grad_cam_stage == "decoder.1"
        # The maps come back at the image's own size (256x256; the model saw 64x64).
        np.testing.assert_allclose(explanation.probabilities, predicted[position][2], atol=1e-5)
        for heat in [*explanation.activations.values(), *explanation.grad_cam.values()]:
            assert heat.shape == (256, 256) and np.isfinite(heat).all()
            assert heat.min() >= 0 and heat.max() <= 1 + 1e-6
        assert set(explanation.grad_cam) == {"abnormality"}
        activations = explanation.activations
        assert any(a.std() > 0 for a in activations.values())


def test_explain_command_writes_one_grid_per_image(lgg_run: dict, tmp_path: Path):
    from PIL import Image
    from typer.testing import CliRunner

    from kaggle_seg.cli import app

    runner = CliRunner()
    ids = lgg_run["rows"]["id"].tolist()
    for kind, checkpoint in lgg_run["runs"].items():
        out = tmp_path / kind
        result = runner.invoke(
            app, ["explain", str(checkpoint.parent), "--ids", ids[0], "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        written = sorted(out.glob("*_explain.png"))
        assert [p.name for p in written] == [f"{ids[0]}_explain.png"]
        with Image.open(written[0]) as image:
            assert image.width > 800 and image.height > 500
    # --random draws from the fold's validation images (fold 0 of folds.csv).
    out = tmp_path / "random"
    result = runner.invoke(
        app, ["explain", str(lgg_run["runs"]["seed"]), "--random", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    fold0 = set(lgg_run["folds"].loc[lgg_run["folds"]["fold"] == 0, "id"])
    drawn = {p.name.removesuffix("_explain.png") for p in out.glob("*.png")}
    assert len(drawn) == 2 and drawn <= fold0


def test_explain_errors_name_the_problem(lgg_run: dict, tmp_path: Path):
    from kaggle_seg.explain import explain_checkpoint

    checkpoint = lgg_run["runs"]["seed"]
    first = lgg_run["rows"]["id"].iloc[0]
    with pytest.raises(KsegError, match=r"not a stage of this model; choose one of encoder\.0"):
        explain_checkpoint(checkpoint, tmp_path, ids=[first], stage="encoder.9")
    with pytest.raises(KsegError, match=r"not in the table .*table\.csv: nope"):
        explain_checkpoint(checkpoint, tmp_path, ids=["nope"])
    experiment = tmp_path / "two"
    for fold in (0, 1):
        (experiment / f"fold_{fold}").mkdir(parents=True)
        shutil.copy(checkpoint, experiment / f"fold_{fold}" / "best.pt")
    with pytest.raises(KsegError, match="2 checkpoints; explain one"):
        explain_checkpoint(experiment, tmp_path, ids=[first])
    assert not list(tmp_path.glob("*.png"))
