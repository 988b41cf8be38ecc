"""The learning-rate schedule of both DVT stages (docs/method.md): a linear warm-up, then a cosine
decay to a floor. Stage 1: 10% warm-up, 1e-2 -> 1e-3; stage 2: 15% warm-up, cosine to 1e-6."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, peak: float, minimum: float, warmup_steps: int) -> float:
    """The learning rate of step ``step`` (0-based) of a run of ``total`` steps.

    Steps 0 .. W-1 (W = ``warmup_steps``, at most total - 1) warm up linearly:
    peak * (step + 1) / W, so the last warm-up step runs at ``peak``. Steps W .. total-1 follow a
    cosine from ``peak`` at step W to ``minimum`` at the last step:
    minimum + (peak - minimum) * (1 + cos(pi * t)) / 2 with t = (step - W) / (total - 1 - W)
    (t = 0 when step W is the last step).
    """
    if not 0 <= step < total:
        raise ValueError(f"step {step} is outside a run of {total} steps")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    warmup_steps = min(warmup_steps, total - 1)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - 1 - warmup_steps)
    return minimum + (peak - minimum) * 0.5 * (1 + math.cos(math.pi * progress))
