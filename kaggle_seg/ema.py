"""The EMA of the weights, right for runs of any length.

timm's ModelEmaV3 at a fixed decay (0.998) keeps 0.998^n of the random initialisation after n
optimizer steps: 56 % after 290 steps, which is all of a CPU run, a quick experiment or a
fine-tune on a small dataset (a DSB run validated at mAP 0.02 for that reason). Here the decay
grows with the step count, min(decay, (1 + n) / (10 + n)) (the TensorFlow ExponentialMovingAverage
`num_updates` rule): the EMA then averages over roughly the last n / 9 steps, ~10 % of the run so
far, until the configured decay takes over (0.998 from step ~4,500). timm's own warm-up,
1 - (1 + n)^-3/4, averages over ~n^3/4 steps: half of a 24-step run, which lags the raw weights.
"""

from __future__ import annotations

from timm.utils import ModelEmaV3


class WarmupEma(ModelEmaV3):
    """ModelEmaV3 (parameters and buffers averaged, counters copied) with the warm-up above;
    `update(model, step=n)` with the optimizer step count."""

    def __init__(self, model, decay: float, *, warmup: bool = True):
        super().__init__(model, decay=decay)
        self.warmup = warmup

    def get_decay(self, step: int | None = None) -> float:
        if step is None or not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))
