"""`kseg explain`: what a trained model responds to, one PNG grid per image, headless.

Per image, over the image at its own size:

- the mean activation (over channels) of each encoder stage and each decoder stage, captured
  with forward hooks, so the model is not changed;
- per class, a Grad-CAM map of the class's logits inside its predicted mask (the whole image
  when the mask is empty) with respect to one stage (`stage`, by default the last decoder
  stage), computed by pytorch-grad-cam (`GradCAM` + `SemanticSegmentationTarget`).

The model input is made exactly as prediction makes it (`predict.PredictionDataset`: the
checkpoint's preprocessing, sizing and normalisation), and every map is brought back to the
image's own size with the prediction's inverse (`spec.restore_size`).

Stages: encoder stage k is the k-th feature map the encoder returns (smp's first, the input
itself, is skipped); its module, which Grad-CAM hooks, is the outermost encoder submodule that
produced that very tensor. Decoder stages are `decoder.blocks` (smp U-Net family) or the seed
models' `decoder` levels, else the decoder as a whole.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from kaggle_seg.errors import KsegError
from kaggle_seg.runs import run_file

HEAT_ALPHA = 0.5
HEAT_COLOURMAP = "jet"
PANEL_INCHES = 2.4


@dataclass
class Stage:
    name: str  # "encoder.3", "decoder.0", ...
    module: nn.Module | None  # the module whose output is the stage's map; None if none found


@dataclass
class Explanation:
    """Maps of one image, each float32 [H, W] at the image's own size."""

    probabilities: np.ndarray  # [K, H, W]
    activations: dict[str, np.ndarray]  # stage name -> mean activation, min-max scaled to [0, 1]
    grad_cam: dict[str, np.ndarray]  # class name -> Grad-CAM map in [0, 1]
    grad_cam_stage: str


class LogitsOnly(nn.Module):
    """A model returning only its mask logits `[B, K, H, W]` (a classification head's are
    dropped): what Grad-CAM's segmentation target reads."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from kaggle_seg.models import split_outputs

        return split_outputs(self.inner(x))[0]


def _decoder_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    decoder = getattr(model, "decoder", None)
    if not isinstance(decoder, nn.Module):
        return []
    blocks = getattr(decoder, "blocks", decoder)
    if isinstance(blocks, nn.ModuleDict):
        return [(f"decoder.{name}", module) for name, module in blocks.items()]
    if isinstance(blocks, nn.ModuleList):
        return [(f"decoder.{k}", module) for k, module in enumerate(blocks)]
    return [("decoder", decoder)]


def run_with_stages(
    model: nn.Module, inputs: torch.Tensor
) -> tuple[torch.Tensor, list[Stage], dict[str, torch.Tensor]]:
    """(output, stages, stage name -> its output `[1, c, h, w]`) of one forward pass of `model`
    on `inputs` `[1, C, H, W]` (the model or its LogitsOnly), through forward hooks that are
    removed afterwards."""
    from kaggle_seg.models import encoder_of

    bare = model.inner if isinstance(model, LogitsOnly) else model
    encoder = encoder_of(bare)
    produced: dict[int, nn.Module] = {}  # id(tensor) -> the last (outermost) module returning it
    features: list[torch.Tensor] = []
    outputs: dict[str, torch.Tensor] = {}

    def remember(module: nn.Module, _: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            produced[id(output)] = module

    def keep(name: str) -> Any:
        return lambda module, args, output: outputs.__setitem__(name, output)

    handles = [m.register_forward_hook(remember) for m in encoder.modules() if m is not encoder]
    handles.append(encoder.register_forward_hook(lambda m, i, o: features.extend(o)))
    decoder = _decoder_modules(bare)
    handles += [module.register_forward_hook(keep(name)) for name, module in decoder]
    try:
        with torch.no_grad():
            result = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    stages = []
    for k, feature in enumerate(f for f in features if f is not inputs):
        stages.append(Stage(f"encoder.{k}", produced.get(id(feature))))
        outputs[f"encoder.{k}"] = feature
    stages += [Stage(name, module) for name, module in decoder]
    return result, stages, outputs


def choose_stage(stages: list[Stage], stage: str | None) -> Stage:
    """The stage named `stage`, or by default the last one with a module: the last decoder stage,
    which the head reads (Grad-CAM's "last convolutional layer"). On a trained U-Net it gives a
    map as sharp as the mask; deep encoder stages, whose detail reaches the output through the
    skips, give coarse maps that often mark the context rather than the object."""
    if stage is None:
        with_module = [s for s in stages if s.module is not None]
        if not with_module:
            raise KsegError("no stage of this model returns its feature map from a module")
        return with_module[-1]
    chosen = next((s for s in stages if s.name == stage), None)
    if chosen is None:
        names = ", ".join(s.name for s in stages)
        raise KsegError(f"--stage {stage!r}: not a stage of this model; choose one of {names}")
    if chosen.module is None:
        raise KsegError(f"--stage {stage!r}: no module returns it; choose another stage")
    return chosen


def _scaled(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def explain_input(
    model: nn.Module,
    inputs: torch.Tensor,
    classes: list[str],
    *,
    stage: str | None = None,
    threshold: float = 0.5,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray], str]:
    """(probabilities [K, h, w], stage -> mean activation [h, w] scaled to [0, 1], class ->
    Grad-CAM [h, w], the Grad-CAM stage's name) for one model input `[1, C, h, w]` (as
    PredictionDataset makes it); maps at the input's size. The forward pass that gives the
    probabilities and activations runs under `autocast` (the prediction's precision, so the
    probabilities are the prediction's); Grad-CAM's gradients are taken in float32."""
    import torch.nn.functional as F
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    from kaggle_seg.spec import pad_to_divisor

    padded, height, width = pad_to_divisor(inputs)
    logits_model = LogitsOnly(model).eval()
    with autocast():
        logits, stages, outputs = run_with_stages(logits_model, padded)
    chosen = choose_stage(stages, stage)
    activations = {}
    for item in stages:
        feature = outputs.get(item.name)
        if not isinstance(feature, torch.Tensor) or feature.ndim != 4:
            continue
        mean = feature.float().mean(dim=1, keepdim=True)
        mean = F.interpolate(mean, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        activations[item.name] = _scaled(mean[0, 0, :height, :width].cpu().numpy())

    probabilities = torch.sigmoid(logits.float())[0].cpu().numpy()
    grad_cam = {}
    with GradCAM(model=logits_model, target_layers=[chosen.module]) as cam:
        for k, name in enumerate(classes):
            mask = probabilities[k] > threshold
            if not mask.any():  # nothing predicted: what raises the class anywhere
                mask = np.ones_like(mask)
            target = SemanticSegmentationTarget(k, mask.astype(np.float32))
            grad_cam[name] = cam(input_tensor=padded, targets=[target])[0][:height, :width]
    return probabilities[:, :height, :width], activations, grad_cam, chosen.name


def explain_image(
    member: Any, inputs: torch.Tensor, row: dict[str, Any], **options: Any
) -> Explanation:
    """`explain_input` for a predict.Member, with every map at the image's own size."""
    from kaggle_seg.predict import member_autocast
    from kaggle_seg.spec import restore_size

    probabilities, activations, grad_cam, stage = explain_input(
        member.model,
        inputs,
        list(member.classes),
        autocast=lambda: member_autocast(member),
        **options,
    )
    height, width = int(row["height"]), int(row["width"])

    def back(maps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not maps:
            return {}
        stacked = restore_size(
            np.stack(list(maps.values())).astype(np.float32),
            height,
            width,
            member.spec.resize_mode,
        )
        return dict(zip(maps, stacked, strict=True))

    return Explanation(
        probabilities=restore_size(probabilities, height, width, member.spec.resize_mode),
        activations=back(activations),
        grad_cam=back(grad_cam),
        grad_cam_stage=stage,
    )


def write_grid(
    competition: Any, row: dict[str, Any], explanation: Explanation, classes: list[str], path: Path
) -> Path:
    """One PNG: image | truth | prediction | Grad-CAM per class (top row), encoder stages
    (middle), decoder stages (bottom), maps as heat over the grey image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from kaggle_seg.io import atomic_path
    from kaggle_seg.panels import _display_image, _masks_rgb
    from kaggle_seg.show_scores import has_truth, read_truth_masks

    raw = competition.read_image(row)
    image = _display_image(competition, raw)
    # Heat maps sit on the mean of all input channels: each stage sees every channel (LGG's
    # three sequences), not only the one `kseg show` draws.
    grey = _display_image(competition, np.repeat(raw.mean(axis=-1, keepdims=True), 3, -1))[..., 0]
    from kaggle_seg.spec import channel_indices

    masks = explanation.probabilities[channel_indices(classes, competition.classes)] > 0.5
    top: list[tuple[str, np.ndarray, np.ndarray | None]] = [("image", image, None)]
    if competition.scoring != "instances" and has_truth(competition, pd.Series(row)):
        top.append(("truth", _masks_rgb(read_truth_masks(competition, pd.Series(row))), None))
    top.append(("prediction", _masks_rgb(masks), None))
    top += [(f"Grad-CAM {name}\n({explanation.grad_cam_stage})", grey, heat)
            for name, heat in explanation.grad_cam.items()]  # fmt: skip
    encoder = [(n, grey, m) for n, m in explanation.activations.items() if n.startswith("encoder")]
    decoder = [(n, grey, m) for n, m in explanation.activations.items() if n.startswith("decoder")]
    rows = [r for r in (top, encoder, decoder) if r]
    columns = max(len(r) for r in rows)
    height, width = grey.shape
    figure = Figure(
        figsize=(columns * PANEL_INCHES, len(rows) * (PANEL_INCHES * height / width + 0.35) + 0.4),
        dpi=100,
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for r, panels in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_axis_off()
            if c >= len(panels):
                continue
            title, picture, heat = panels[c]
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
            if heat is not None:
                ax.imshow(heat, cmap=HEAT_COLOURMAP, alpha=HEAT_ALPHA, vmin=0, vmax=1)
            label = title if heat is None or title.startswith("Grad") else f"{title} mean"
            ax.set_title(label, fontsize=7)
    figure.suptitle(f"{row['id']}  ({', '.join(classes)})", fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return path


def table_of(config: Any, run_dir: Path) -> pd.DataFrame:
    """The table a run was trained on (its config's data.table, see `run_file`)."""
    from kaggle_seg.prepare import read_table

    if config.data.table is None:
        raise KsegError(f"{run_dir}: the run's config sets no data.table; pass --table")
    table = run_file(config.data.table, run_dir)
    if not table.is_file():
        raise KsegError(f"{table}: table not found (named by {run_dir}'s data.table); pass --table")
    return read_table(table)


def _validation_ids(config: Any, run_dir: Path, fold: int | None) -> set[str] | None:
    """The ids of the run's validation fold, when its folds file is found."""
    if fold is None or config.data.folds is None:
        return None
    path = run_file(config.data.folds, run_dir)
    if not path.is_file():
        return None
    folds = pd.read_csv(path)
    return set(folds.loc[folds["fold"] == fold, "id"].astype(str))


def explain_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    *,
    ids: list[str] | None = None,
    random: int | None = None,
    seed: int = 0,
    table: Path | None = None,
    stage: str | None = None,
    device: str = "cpu",
) -> list[Path]:
    """`<out_dir>/<id>_explain.png` for each chosen image of the checkpoint's table: `ids`, or
    `random` images of its validation fold (the whole table without a folds file)."""
    from kaggle_seg.competitions import competition_for
    from kaggle_seg.panels import _file_stem
    from kaggle_seg.predict import PredictionDataset, load_member
    from kaggle_seg.prepare import read_table
    from kaggle_seg.runs import find_checkpoints, fold_number
    from kaggle_seg.runtime import parse_device
    from kaggle_seg.show_scores import select_ids

    found = find_checkpoints(checkpoint)
    if len(found) != 1:
        raise KsegError(
            f"{checkpoint}: {len(found)} checkpoints; explain one (a fold folder or a .pt file)"
        )
    torch_device = parse_device(device)
    member = load_member(found[0], 1.0, torch_device)
    config = member.config
    competition = competition_for(config.data)
    frame = read_table(table) if table is not None else table_of(config, found[0].parent)
    every = frame["id"].astype(str).tolist()
    unknown = [i for i in ids or [] if i not in set(every)]
    if unknown:
        source = table or config.data.table
        raise KsegError(f"not in the table {source}: {', '.join(unknown[:5])}")
    valid = _validation_ids(config, found[0].parent, fold_number(found[0].parent))
    pool = [i for i in every if i in valid] if valid and random is not None else every
    chosen = select_ids(None, pool, ids=ids, random=random, seed=seed)
    if member.spec.stack_depth > 1:
        # 2.5D stacks need each chosen slice's volume (case-day), whole and in order.
        volume_key = competition.volume_key
        days = set(frame.loc[frame["id"].astype(str).isin(chosen), volume_key])
        rows = frame[frame[volume_key].isin(days)].reset_index(drop=True)
    else:
        rows = frame[frame["id"].astype(str).isin(chosen)].reset_index(drop=True)
    dataset = PredictionDataset(competition, rows, [member.spec])
    positions = {str(i): p for p, i in enumerate(rows["id"])}
    out_dir = Path(out_dir)
    written = []
    for image_id in chosen:
        position = positions[image_id]
        row = rows.iloc[position].to_dict()
        inputs = dataset[position]["inputs"][0][None].to(torch_device)
        explanation = explain_image(member, inputs, row, stage=stage)
        path = out_dir / f"{_file_stem(image_id)}_explain.png"
        written.append(write_grid(competition, row, explanation, list(member.classes), path))
    return written
