"""Learning-rate schedules: linear warm-up, then cosine, WSD (warm-up/stable/decay) or constant.

The schedule is a pure function of the step, so resuming needs only the step counter. Re-warming a trained model
(continued pretraining, 2308.04014) is the same warm-up starting from `warmup_start * lr` instead of zero.
"""

from __future__ import annotations

import math

from mlc.commands.train.config import ScheduleSection


def lr_factor(step: int, total_steps: int, s: ScheduleSection) -> float:
    """The multiplier of the peak lr for optimizer step `step` (0-based) of `total_steps`."""
    if step < s.warmup_steps:
        # Step 0 already moves the weights, so it gets a non-zero rate: (step + 1) / warmup.
        return s.warmup_start + (1.0 - s.warmup_start) * (step + 1) / s.warmup_steps
    if s.kind == "constant":
        return 1.0
    if s.kind == "cosine":
        span = max(1, total_steps - s.warmup_steps)
        progress = min(1.0, (step - s.warmup_steps) / span)
        return s.min_lr_ratio + (1.0 - s.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # WSD: hold the peak, then decay linearly over the last decay_fraction of all steps.
    decay_steps = max(1, round(total_steps * s.decay_fraction))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - s.min_lr_ratio) * progress
