"""Token-length distributions for generated prompts and outputs: fixed, uniform range, or normal."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LengthDist:
    """`mean` tokens; with `range_ratio` r, uniform over the integers in [mean*(1-r), mean*(1+r)] (vLLM's random
    dataset range); with `std`, normal(mean, std) rounded. Every sample is at least 1."""

    mean: int
    range_ratio: float = 0.0
    std: float = 0.0

    def __post_init__(self) -> None:
        if self.mean < 1:
            raise ValueError(f"a length must be >= 1 token, got {self.mean}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"a length range ratio must be in [0, 1), got {self.range_ratio}")
        if self.std < 0.0:
            raise ValueError(f"a length std must be >= 0, got {self.std}")
        if self.range_ratio > 0.0 and self.std > 0.0:
            raise ValueError("give a length either a range (uniform) or a std (normal), not both")

    @property
    def kind(self) -> str:
        if self.range_ratio > 0.0:
            return "uniform"
        return "normal" if self.std > 0.0 else "fixed"

    @property
    def low(self) -> int:
        return max(1, round(self.mean * (1.0 - self.range_ratio))) if self.kind == "uniform" else 1

    @property
    def high(self) -> int | None:
        """The largest possible sample, or None when unbounded (normal)."""
        if self.kind == "uniform":
            return max(self.low, round(self.mean * (1.0 + self.range_ratio)))
        return self.mean if self.kind == "fixed" else None

    def sample(self, rng: np.random.Generator) -> int:
        if self.kind == "fixed":
            return self.mean
        if self.kind == "uniform":
            high = self.high
            assert high is not None
            return int(rng.integers(self.low, high + 1))
        return max(1, round(float(rng.normal(self.mean, self.std))))

    def describe(self) -> str:
        if self.kind == "uniform":
            return f"uniform[{self.low}, {self.high}]"
        return f"normal({self.mean}, {self.std:g})" if self.kind == "normal" else str(self.mean)
