"""Adaptive intra-distillation weight (the paper's Eq. 11-12)."""

from __future__ import annotations

import math
import numbers


class AdaptiveAlpha:
    """alpha'(x) = alpha * (p * x / N) ** gamma for x < N / p, and alpha afterwards, with
    gamma = log(1 / alpha) / log(p / q). It grows from 0, passes 1 at x = N / q and reaches
    alpha at x = N / p, so a large alpha does not pull the K passes together before they have
    learned anything. With alpha <= 1 the weight is the constant alpha.

    Call it with the current step x (0-based) to get the weight for that step.
    """

    def __init__(self, alpha: float, p: float, q: float, total_steps: int):
        for name, value in (("alpha", alpha), ("p", p), ("q", q)):
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite real number, got {value!r}")
        if not isinstance(total_steps, numbers.Integral) or isinstance(total_steps, bool):
            raise TypeError(f"total_steps must be an int, got {total_steps!r}")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if p <= 0:
            raise ValueError(f"p must be > 0, got {p}")
        if q <= p:
            raise ValueError(f"q must be > p (alpha reaches 1 at step N/q, before alpha at N/p), got p={p}, q={q}")
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        self.alpha, self.p, self.q, self.total_steps = float(alpha), float(p), float(q), int(total_steps)
        self.gamma = math.log(1.0 / self.alpha) / math.log(self.p / self.q) if self.alpha > 1 else 0.0

    def __call__(self, step: int) -> float:
        if not isinstance(step, numbers.Real) or isinstance(step, bool):
            raise TypeError(f"step must be a number (the 0-based training step), got {step!r}")
        # NaN compares False with everything, so without this it would flow into the power below
        if not math.isfinite(step) or step < 0:
            raise ValueError(f"step must be a finite number >= 0, got {step}")
        if self.alpha <= 1:
            return self.alpha
        if step < self.total_steps / self.p:
            return self.alpha * (self.p * step / self.total_steps) ** self.gamma
        return self.alpha

    def __repr__(self) -> str:
        return f"AdaptiveAlpha(alpha={self.alpha}, p={self.p}, q={self.q}, total_steps={self.total_steps})"
