"""The pooled training loader: same batches as the plain DataLoader, slots, errors, fallback."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from kaggle_seg.competitions import get_competition
from kaggle_seg.config import AugmentConfig, build_data_config, load_experiment
from kaggle_seg.data import loader as loader_module
from kaggle_seg.data.dataset import SegmentationDataset, build_stores, weighted_sampler
from kaggle_seg.data.loader import PooledLoader, make_train_loader, slot_count
from kaggle_seg.data.transforms import build_transforms
from kaggle_seg.errors import InputError


@pytest.fixture(scope="module")
def uw_dataset(phantom_dir: Path) -> SegmentationDataset:
    """Phantom uwmgi 2.5D stacks padded to 320x384 with the heavy preset, from a memory store."""
    competition = get_competition("uwmgi")
    table = competition.read_table(phantom_dir, build_data_config("uwmgi"))
    images, masks = build_stores(competition, table, "memory")
    config = AugmentConfig(preset="heavy", height=320, width=384, resize_mode="pad")
    return SegmentationDataset(competition, table, build_transforms(config, train=True),
                               stack_depth=3, stack_stride=2, image_store=images,
                               mask_store=masks, compact=True)  # fmt: skip


def epochs_of(loader, epochs: int) -> list[dict]:
    """Every batch of `epochs` passes, copied (pooled batches are views of reused slots)."""
    return [
        {
            "image": b["image"].clone(),
            "mask": b["mask"].clone(),
            "id": list(b["id"]),
            "index": b["index"].clone(),
        }
        for _ in range(epochs)
        for b in loader
    ]


def test_pooled_batches_equal_the_plain_dataloader_with_heavy_augmentation(uw_dataset):
    runs = {}
    for pooled in (True, False):
        torch.manual_seed(7)  # the shuffle and the workers' seeds come from torch's RNG
        loader = make_train_loader(uw_dataset, batch_size=8, sampler=None, num_workers=2,
                                   pooled=pooled)  # fmt: skip
        assert isinstance(loader, PooledLoader) == pooled
        runs[pooled] = epochs_of(loader, epochs=2)
        del loader
    pooled, plain = runs[True], runs[False]
    assert len(pooled) == len(plain) == 2 * (len(uw_dataset) // 8)
    for a, b in zip(pooled, plain, strict=True):
        assert a["id"] == b["id"]
        assert a["image"].dtype == b["image"].dtype == torch.float16
        assert a["mask"].dtype == b["mask"].dtype == torch.uint8
        assert a["image"].shape == (8, 3, 320, 384) and a["mask"].shape == (8, 3, 320, 384)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["index"], b["index"])
    # Augmentation differs between epochs (persistent workers keep drawing) and was applied.
    assert pooled[0]["image"].abs().sum() > 0
    n = len(pooled) // 2
    assert not all(torch.equal(pooled[k]["image"], pooled[n + k]["image"]) for k in range(n))


def test_a_batch_stays_intact_while_the_next_one_is_used(uw_dataset):
    loader = make_train_loader(uw_dataset, batch_size=4, sampler=None, num_workers=2)
    previous = None
    for batch in loader:
        if previous is not None:
            view, copy = previous
            assert torch.equal(view, copy)
        previous = (batch["image"], batch["image"].clone())
    assert loader.slots == slot_count(2, 2) == 6


def test_sampler_is_used_and_exposed_for_set_epoch(uw_dataset):
    table = uw_dataset.table
    sampler = weighted_sampler(table, "empty", num_samples=40, seed=0)
    loader = make_train_loader(uw_dataset, batch_size=8, sampler=sampler, num_workers=2)
    assert loader.sampler is sampler and len(loader) == 5
    drawn = [i for b in loader for i in b["index"].tolist()]
    assert len(drawn) == 40 and len(set(drawn)) < 40  # drawn with replacement
    assert set(drawn) <= set(range(len(table)))


class Sizes:
    """A stand-in competition whose images take the table's sizes (row 3 is larger)."""

    name = "sizes"
    classes = ("thing",)
    rle_order = None

    def read_image(self, row):
        import numpy as np

        return np.full((row["height"], row["width"], 1), 0.5, dtype=np.float32)

    def read_mask(self, row):
        import numpy as np

        return np.zeros((row["height"], row["width"], 1), dtype=np.uint8)


def test_a_sample_of_another_size_is_named():
    heights = [32, 32, 32, 48, 32, 32]
    table = pd.DataFrame({"id": [f"img{i}" for i in range(6)], "group": range(6),
                          "image_path": [f"/d/img{i}.png" for i in range(6)],
                          "height": heights, "width": 40, "empty": True})  # fmt: skip
    dataset = SegmentationDataset(Sizes(), table, None, compact=True)
    loader = make_train_loader(dataset, batch_size=6, sampler=None, num_workers=1)
    with pytest.raises(InputError, match=r"img3: training image is 1x48x40"):
        list(loader)


@pytest.mark.slow
def test_falls_back_to_the_plain_dataloader_when_shared_memory_is_short(
    uw_dataset, monkeypatch, capsys
):
    monkeypatch.setattr(loader_module, "shared_memory_free", lambda: 2**20)
    loader = make_train_loader(uw_dataset, batch_size=8, sampler=None, num_workers=2)
    assert isinstance(loader, DataLoader) and loader.persistent_workers
    assert "/dev/shm has 1 MiB free" in capsys.readouterr().out
    no_workers = make_train_loader(uw_dataset, batch_size=8, sampler=None, num_workers=0)
    assert isinstance(no_workers, DataLoader)


TRAIN = """
name: {name}
data: {{competition: dsb2018, table: {root}/table.csv, folds: {root}/folds.csv}}
augment: {{preset: heavy, height: 64, width: 64}}
model: {{architecture: seed_unet, params: {{base_channels: 8, depth: 3}}}}
train: {{epochs: 1, batch_size: 8, num_workers: 2, pooled_loader: {pooled},
         optimizer: {{name: adam, lr: 0.01}}, cache: memory}}
"""


@pytest.mark.slow
def test_training_with_the_pool_matches_the_plain_loader(write_dsb_subset, tmp_path: Path):
    from kaggle_seg.train import train_fold

    write_dsb_subset(tmp_path, 32, 8)
    losses = {}
    for pooled in ("true", "false"):
        path = tmp_path / f"{pooled}.yaml"
        path.write_text(TRAIN.format(name=f"pooled_{pooled}", root=tmp_path, pooled=pooled))
        train_fold(load_experiment(path), 0, run_root=tmp_path / "runs", device="cpu")
        history = pd.read_csv(tmp_path / "runs" / f"pooled_{pooled}" / "fold_0" / "history.csv")
        losses[pooled] = history["train_loss"].tolist()
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-6)
