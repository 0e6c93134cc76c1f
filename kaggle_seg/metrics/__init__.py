"""Competition metrics: pixel metrics, the UW-Madison GI score (Dice + 3D Hausdorff), DSB 2018 mAP.

Pure functions: masks / label maps in, numbers or DataFrames out, no file I/O. Masks are binary
(nonzero = foreground); thresholding probabilities or logits is the caller's job. One module per
kind: `pixel` (Dice, IoU... per image and per volume), `volumes` (the GI score and the exact 3D
Hausdorff distance), `instances` (the DSB mAP). Reading a competition's submission frames into
these is the competition's (competitions/<name>_kaggle.py).
"""

from kaggle_seg.metrics.instances import (
    DSB_IOU_THRESHOLDS,
    dsb_image_precisions,
    dsb_image_score,
    dsb_precisions_and_counts,
    dsb_thresholds,
    instance_ious,
)
from kaggle_seg.metrics.pixel import (
    PIXEL_METRICS,
    pixel_counts,
    pixel_metrics,
    pixel_metrics_table,
    volume_dice,
)
from kaggle_seg.metrics.volumes import (
    UWMGI_DICE_WEIGHT,
    UWMGI_HAUSDORFF_WEIGHT,
    UWMGI_MODES,
    directed_hausdorff_3d,
    distances_to_mask_3d,
    gi_dice_per_slice,
    hausdorff_3d,
    uwmgi_modes,
    uwmgi_score_volumes,
)

__all__ = [
    "DSB_IOU_THRESHOLDS",
    "PIXEL_METRICS",
    "UWMGI_DICE_WEIGHT",
    "UWMGI_HAUSDORFF_WEIGHT",
    "UWMGI_MODES",
    "directed_hausdorff_3d",
    "distances_to_mask_3d",
    "dsb_image_precisions",
    "dsb_image_score",
    "dsb_precisions_and_counts",
    "dsb_thresholds",
    "gi_dice_per_slice",
    "hausdorff_3d",
    "instance_ious",
    "pixel_counts",
    "pixel_metrics",
    "pixel_metrics_table",
    "uwmgi_modes",
    "uwmgi_score_volumes",
    "volume_dice",
]
