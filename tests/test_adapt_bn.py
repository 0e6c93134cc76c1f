"""BN statistics adapted to the images being predicted (adapt_bn.py): crops like training's,
the same on every run, a shifted test set brought back, and the option through the commands."""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kaggle_seg.adapt_bn import (
    MIN_IMAGES,
    adapt_batchnorm,
    adapt_members,
    crop_batches,
    pooled_statistics,
    recalibrate_blended,
)
from kaggle_seg.batchnorm import recalibrate_batchnorm
from kaggle_seg.competitions import get_competition
from kaggle_seg.predict import load_member, member_autocast, predict_probabilities


def test_crops_take_the_models_size_capped_by_the_batchs_smallest_image_and_repeat_by_seed():
    sizes = [(300, 280), (40, 500), (256, 256), (512, 700)]
    # Each pixel's value says where it came from: image k, row y, column x.
    images = [
        (k * 10**6 + torch.arange(h)[:, None] * 1000 + torch.arange(w)).double().expand(3, h, w)
        for k, (h, w) in enumerate(sizes)
    ]

    def draw(seed: int) -> list[torch.Tensor]:
        return list(crop_batches(images.__getitem__, 4, (256, 256), batches=6,
                                      batch_size=3, views=[lambda x: x], seed=seed))  # fmt: skip

    batches = draw(0)
    assert len(batches) == 6
    for batch in batches:
        assert batch.shape[:2] == (3, 3)
        # Never padded: a batch holding the 40-pixel strip is cut to 40 rows, else 256.
        assert batch.shape[-2] in (40, 256) and batch.shape[-1] == 256
        # Every crop is a window of one of the images.
        for crop in batch:
            k, y, x = (int(crop[0, 0, 0]) // 10**6, int(crop[0, 0, 0]) % 10**6 // 1000,
                       int(crop[0, 0, 0]) % 1000)  # fmt: skip
            h, w = crop.shape[-2:]
            assert torch.equal(crop, images[k][:, y : y + h, x : x + w])
    assert {b.shape[-2] for b in batches} == {40, 256}
    again = draw(0)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(batches, draw(1), strict=True))


def test_pooled_statistics_are_those_of_the_two_populations_put_together():
    rng = np.random.default_rng(0)
    test = torch.from_numpy(rng.normal(3.0, 2.0, (300, 4)))
    source = torch.from_numpy(rng.normal(-1.0, 0.5, (900, 4)))
    both = torch.cat([test, source])
    trained = (source.mean(0), source.var(0, unbiased=False))
    mean, var = pooled_statistics(test.mean(0), test.var(0, unbiased=False), trained, 0.25)
    torch.testing.assert_close(mean, both.mean(0))
    torch.testing.assert_close(var, both.var(0, unbiased=False))


def test_blended_statistics_at_weight_one_are_adabn_and_below_it_lie_toward_the_trained():
    torch.manual_seed(0)

    def model() -> torch.nn.Module:
        torch.manual_seed(1)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8),
        ).eval()  # fmt: skip

    shifted = [torch.randn(4, 3, 16, 16) * 3 + 2 for _ in range(5)]  # the "test set"
    adabn, blended, half = model(), model(), model()
    trained = [(m.running_mean.clone(), m.running_var.clone()) for m in half.modules()
               if isinstance(m, torch.nn.BatchNorm2d)]  # fmt: skip
    assert recalibrate_batchnorm(adabn, iter(shifted), lambda x: x, 5) == 5
    assert recalibrate_blended(blended, iter(shifted), lambda x: x, 5, 1.0, nullcontext) == 5
    for (name, a), b in zip(adabn.state_dict().items(), blended.state_dict().values(), strict=True):
        if "running" in name:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert recalibrate_blended(half, iter(shifted), lambda x: x, 5, 0.5, nullcontext) == 5
    assert not half.training
    # The first layer's input does not depend on any BN: its statistics pool exactly.
    first = half[1]
    adapted = adabn[1]
    torch.testing.assert_close(first.running_mean, (adapted.running_mean + trained[0][0]) / 2)
    assert bool((first.running_var > (adapted.running_var + trained[0][1]) / 2 - 1e-6).all())
    # Every layer moved off the trained statistics, and no hook is left behind.
    for m, (mean, _) in zip([half[1], half[4]], trained, strict=True):
        assert not torch.allclose(m.running_mean, mean)
        assert not m._forward_pre_hooks
    # Interrupted before its first batch: the trained statistics stay.
    untouched = model()
    assert recalibrate_blended(untouched, iter([]), lambda x: x, 5, 0.5, nullcontext) == 0
    torch.testing.assert_close(untouched[1].running_mean, trained[0][0])


@pytest.fixture(scope="module")
def dark_and_plain(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """16 real stage-1 images in Kaggle's layout, and the same at half their brightness (a
    dimmer microscope: the shift BN adaptation is for)."""
    source = shared_data / "dsb2018" / "stage1_test"
    ids = sorted(p.name for p in source.iterdir() if p.is_dir())[:MIN_IMAGES]
    root = tmp_path_factory.mktemp("adapt")
    for image_id in ids:
        png = source / image_id / "images" / f"{image_id}.png"
        for name, scale in (("plain", 1.0), ("dark", 0.5)):
            target = root / name / image_id / "images" / png.name
            target.parent.mkdir(parents=True)
            pixels = np.asarray(Image.open(png).convert("RGB"), np.float32)
            Image.fromarray(np.round(pixels * scale).astype(np.uint8)).save(target)
    competition = get_competition("dsb2018")
    return (
        competition,
        competition.read_test_table(root / "plain"),
        competition.read_test_table(root / "dark"),
    )


def test_adapting_to_a_dimmer_test_set_undoes_the_shift(dark_and_plain, tmp_path: Path):
    from test_predict import write_checkpoint

    competition, plain, dark = dark_and_plain
    member = load_member(write_checkpoint(tmp_path / "best.pt", size=64), 1.0, "cpu")

    def adapt(table) -> int:
        return adapt_batchnorm(member.model, member.spec, competition, table, batches=8,
                               batch_size=4, tta="flip", autocast=lambda: member_autocast(member),
                               channels_last=False)  # fmt: skip

    def predict(table) -> np.ndarray:
        return np.concatenate([p.ravel() for _, _, p in predict_probabilities(
            [member], competition, table, num_workers=0)])  # fmt: skip

    assert adapt(plain) == 8  # the "trained" statistics: those of the plain images
    reference = predict(plain)
    unadapted = predict(dark)
    assert adapt(dark) == 8
    adapted = predict(dark)
    # The dark images through statistics of bright ones drift; adapted, they come back.
    drift = np.abs(unadapted - reference).mean()
    assert drift > 0.01
    assert np.abs(adapted - reference).mean() < 0.1 * drift
    # Back in eval mode, and the statistics are a plain average, not a momentum's.
    assert not member.model.training
    norms = [m for m in member.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.1 for m in norms)


def test_too_few_images_keep_the_trained_statistics_and_say_so(dark_and_plain, tmp_path: Path):
    from test_predict import write_checkpoint

    competition, plain, _ = dark_and_plain
    member = load_member(write_checkpoint(tmp_path / "best.pt", size=64), 1.0, "cpu")
    before = {k: v.clone() for k, v in member.model.state_dict().items()}
    note = adapt_members([member], competition, plain.head(MIN_IMAGES - 1), "flip", 4)
    assert note is not None and f"the trained ones ({MIN_IMAGES - 1} images" in note
    assert all(torch.equal(before[k], v) for k, v in member.model.state_dict().items())
    # Not asked (the checkpoint's train.adapt_bn_batches is 0, no --adapt-bn): nothing said.
    assert adapt_members([member], competition, plain, "flip", None) is None
    note = adapt_members([member], competition, plain, "flip", 2)
    assert note is not None and f"adapted to the {MIN_IMAGES} images" in note
    changed = [k for k, v in member.model.state_dict().items() if "running" in k
               and not torch.equal(before[k], v)]  # fmt: skip
    assert changed


def test_members_adapt_with_the_share_their_config_gives(dark_and_plain, tmp_path: Path):
    from test_predict import write_checkpoint

    competition, _, dark = dark_and_plain
    checkpoint = write_checkpoint(tmp_path / "best.pt", size=64)
    trained, alone, half = (load_member(checkpoint, 1.0, "cpu") for _ in range(3))
    half.config.train.adapt_bn_weight = 0.5
    for member in (alone, half):
        assert adapt_members([member], competition, dark, "flip", 4) is not None

    def stem(member) -> torch.nn.BatchNorm2d:  # the first BN: its input depends on no BN
        return next(m for m in member.model.modules() if isinstance(m, torch.nn.BatchNorm2d))

    midway = (stem(alone).running_mean + stem(trained).running_mean) / 2
    torch.testing.assert_close(stem(half).running_mean, midway)
    assert not torch.allclose(stem(alone).running_mean, stem(trained).running_mean)


def test_submit_adapts_as_the_checkpoint_says_and_warns_when_told_otherwise(
    dark_and_plain, tmp_path: Path
):
    from test_cli import kseg
    from test_predict import write_checkpoint

    _, plain, _ = dark_and_plain
    data_dir = tmp_path / "dsb"
    shutil.copytree(Path(plain["image_path"].iloc[0]).parents[2], data_dir / "stage1_test")
    experiment = tmp_path / "exp"
    checkpoint = write_checkpoint(experiment / "fold_0" / "best.pt", size=64)
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["train"]["adapt_bn_batches"] = 4  # as a recipe with it trains
    torch.save(state, checkpoint)
    runs = {}
    for name, extra in (("default", []), ("off", ["--adapt-bn", "0"])):
        out = tmp_path / f"{name}.csv"
        result = kseg("submit", "--checkpoints", str(experiment), "--data-dir", str(data_dir),
                      "--out", str(out), "--num-workers", "0", *extra)  # fmt: skip
        runs[name] = (result.stdout + result.stderr, out.read_text())
    assert f"BN statistics: adapted to the {MIN_IMAGES} images" in runs["default"][0]
    assert "BN statistics" not in runs["off"][0]
    assert (
        "--adapt-bn 0: the post-processing was tuned on OOF predicted with BN adapted"
        in (runs["off"][0])
    )
    assert runs["default"][1] != runs["off"][1]
    # kseg predict adapts as submit does, on the test folder it is given.
    predicted = kseg("predict", "--checkpoints", str(experiment), "--test-dir",
                     str(data_dir / "stage1_test"), "--num-workers", "0")  # fmt: skip
    assert f"BN statistics: adapted to the {MIN_IMAGES} images" in predicted.stdout
    refused = kseg("submit", "--checkpoints", str(experiment), "--data-dir", str(data_dir),
                   "--adapt-bn", "-1", check=False)  # fmt: skip
    assert refused.returncode != 0 and "--adapt-bn" in refused.stderr


def test_training_predicts_its_oof_with_bn_adapted_to_the_fold(write_dsb_subset, tmp_path: Path):
    from test_train import write_config

    from kaggle_seg.checkpoints import load_checkpoint
    from kaggle_seg.config import load_experiment
    from kaggle_seg.runtime import start_runtime
    from kaggle_seg.train import Trainer, load_oof

    root = write_dsb_subset(tmp_path, 48, MIN_IMAGES)
    config = load_experiment(write_config(root, "adapted", epochs=1),
                             ["train.adapt_bn_batches=4", "train.oof_dtype=float16"])  # fmt: skip
    trainer = Trainer(config, 0, tmp_path, start_runtime("cpu"))
    lines: list[str] = []
    log = trainer._log
    trainer._log = lambda line: lines.append(line) or log(line)
    trainer.fit()
    assert any("BN adapted on 4 batches" in line for line in lines)
    oof = load_oof(tmp_path / "adapted" / "fold_0" / "oof.npz")
    assert len(oof) == MIN_IMAGES
    # best.pt as saved (training's statistics) predicts otherwise; adapted again, as the OOF.
    model = trainer.eval_model()
    model.load_state_dict(load_checkpoint(tmp_path / "adapted" / "fold_0" / "best.pt")["model"])
    _, trained, _ = trainer.predict_valid(keep=True)
    assert max(np.abs(oof[i] - trained[i]).max() for i in oof) > 0.01
    adapt_batchnorm(model, trainer.spec, trainer.competition, trainer.valid_table, batches=4,
                    batch_size=8, tta="none", autocast=trainer._autocast,
                    channels_last=trainer.channels_last, seed=config.train.seed)  # fmt: skip
    _, again, _ = trainer.predict_valid(keep=True)
    for image_id, probabilities in again.items():
        np.testing.assert_allclose(oof[image_id], probabilities, atol=2e-3)
