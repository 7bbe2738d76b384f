"""Paired comparisons over prompts: a bootstrap interval, and how many prompts an interval needs.

Both systems of a comparison see the same prompts, so what varies is the per-prompt difference;
its spread decides how wide the interval is at n prompts and how small a change n prompts can
tell from zero. The normal approximation is fine here: a change is a sum over many prompts.
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np

Z95 = NormalDist().inv_cdf(0.975)


def paired_interval(acc, base, draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the change vs base (%), resampling prompts in pairs: how far the
    row's Δ could move with another set of prompts of the same kind."""
    acc, base = np.asarray(acc), np.asarray(base)
    pick = np.random.default_rng(seed).integers(0, len(acc), (draws, len(acc)))
    change = 100 * (acc[pick].sum(1) / np.maximum(base[pick].sum(1), 1e-12) - 1)
    return float(np.percentile(change, 2.5)), float(np.percentile(change, 97.5))


def interval_text(lo: float, hi: float) -> str:
    """How a table shows an interval of ``paired_interval``."""
    return f"{lo:+.1f} … {hi:+.1f}"


def spread(acc, base) -> float:
    """Standard deviation of the per-prompt differences, relative to the base's per-prompt mean:
    the one number the sizes below depend on."""
    acc, base = np.asarray(acc, dtype=float), np.asarray(base, dtype=float)
    return float(np.std(acc - base, ddof=1) / base.mean())


def halfwidth_pct(rel_sd: float, n: int) -> float:
    """Half-width (%) of the 95% interval of the change at ``n`` prompts."""
    return 100 * Z95 * rel_sd / np.sqrt(n)


def prompts_for(rel_sd: float, halfwidth: float) -> int:
    """Prompts needed for a 95% interval of ± ``halfwidth`` %."""
    return int(np.ceil((100 * Z95 * rel_sd / halfwidth) ** 2))


def detectable_pct(rel_sd: float, n: int, power: float = 0.8) -> float:
    """The smallest true change (%) that ``n`` prompts exclude zero for with probability ``power``."""
    return 100 * (Z95 + NormalDist().inv_cdf(power)) * rel_sd / np.sqrt(n)
