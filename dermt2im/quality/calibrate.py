"""Cuts calibrated on the real seeds, and how many real seeds each check would reject.

A check whose cut is a variance or an amplitude (sharpness, grey-level std, lesion contrast, the
noise ratio) takes its cut from the accepted seeds' own distribution when the config leaves it
empty: the seeds' 1st percentile (lower cuts) or 99th (the noise ratio), moved away from the bulk by
a margin. Generated images are systematically softer than photographs, and plausible ones a curator
keeps sit well below the sharpest real images, so the cut must separate broken images from soft
ones, not synthetic from real:

* x4 for a variance (the Laplacian's: x2 in amplitude), x2 for amplitudes and the noise ratio.
  Softened real seeds (down to 128-256 px and back, a mild blur, JPEG 60: what generated lesions
  look like) measured a median Laplacian variance of 44 against 149 for the originals, while their
  contrast stayed the same (grey std 35.2 vs 35.9).
* The 1st / 99th percentile ignores one stray seed but stays inside the seeds' own range.

With fewer than ``MIN_SEEDS`` seeds a cut keeps its fixed fallback (``checks.FALLBACK_CUTS``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dermt2im.core.specs import FLAGS, QualityConfig
from dermt2im.quality.checks import FALLBACK_CUTS, SCORE_COLUMNS, cut, measure_failures, reason_code, thresholds

MIN_SEEDS = 20


@dataclass(frozen=True)
class CutRule:
    """How a cut follows from the seeds: ``side`` "min" rejects below it, "max" above it; the seeds'
    1st (min) or 99th (max) percentile divided (min) or multiplied (max) by ``factor``."""

    metric: str
    side: str
    factor: float

    def cut(self, values: np.ndarray) -> float:
        if self.side == "min":
            return float(np.quantile(values, 0.01) / self.factor)
        return float(min(1.0, np.quantile(values, 0.99) * self.factor))


CUT_RULES: dict[str, CutRule] = {  # QualityConfig field -> rule
    "min_sharpness": CutRule("sharpness", "min", 4.0),
    "min_std": CutRule("grey_std", "min", 2.0),
    "min_lesion_contrast": CutRule("lesion_contrast", "min", 2.0),
    "max_high_frequency_ratio": CutRule("high_frequency_ratio", "max", 2.0),
}
CHECK_OF_FIELD = {"min_sharpness": "blur", "min_std": "blank", "min_lesion_contrast": "no-lesion",
                  "max_high_frequency_ratio": "noise"}


def calibrate(seed_metrics: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Cuts {QualityConfig field: value} from the seeds' measures ({metric: one value per seed});
    a metric with fewer than ``MIN_SEEDS`` finite values gives no cut."""
    cuts = {}
    for name, rule in CUT_RULES.items():
        values = np.asarray(seed_metrics.get(rule.metric, ()), np.float64)
        values = values[np.isfinite(values)]
        if len(values) >= MIN_SEEDS:
            cuts[name] = rule.cut(values)
    return cuts


@dataclass(frozen=True)
class ResolvedCuts:
    config: QualityConfig  # every calibrated field filled in
    origin: dict[str, str]  # field -> where its value came from, in words


def resolve_cuts(q: QualityConfig, seed_metrics: Mapping[str, Sequence[float]]) -> ResolvedCuts:
    """The config with its empty cuts filled: calibrated on the seeds, else the fallback."""
    calibrated = calibrate(seed_metrics)
    n = min((len(v) for v in seed_metrics.values()), default=0)
    values, origin = {}, {}
    for name in CUT_RULES:
        if getattr(q, name) is not None:
            values[name], origin[name] = getattr(q, name), "set in the config"
        elif name in calibrated:
            rule = CUT_RULES[name]
            stat = "1st percentile / " if rule.side == "min" else "99th percentile x "
            values[name], origin[name] = calibrated[name], f"calibrated on {n} seeds ({stat}{rule.factor:g})"
        else:
            values[name] = FALLBACK_CUTS[name]
            origin[name] = f"fixed fallback ({n} seeds, calibration needs {MIN_SEEDS})"
    return ResolvedCuts(q.model_copy(update=values), origin)


def seed_rejections(seed_rows: Sequence[Mapping[str, float]], q: QualityConfig) -> dict[str, dict[str, int]]:
    """For every check, how many seeds (measures plus scores, one mapping each) it would reject
    under ``q`` on its own, and for every flag how many it sets: {check: {"rejected": n, "flagged": n}}."""
    out: dict[str, dict[str, int]] = {}
    for check in ("blank", "saturated", "noise", "blur", "no-lesion"):
        out[check] = {"rejected": 0}
    for row in seed_rows:
        for reason in measure_failures(dict(row), q):
            out[str(reason_code(reason))]["rejected"] += 1
    limits = thresholds(q)
    for flag in FLAGS:
        flagged = sum(float(r.get(SCORE_COLUMNS[flag], 0.0) or 0.0) > limits[flag] for r in seed_rows)
        out[flag] = {"flagged": int(flagged), "rejected": int(flagged) if flag in q.reject_flags else 0}
    return out


def cut_table(resolved: ResolvedCuts) -> list[dict[str, object]]:
    """One row per calibrated check: its field, cut and where the cut came from."""
    return [{"check": CHECK_OF_FIELD[name], "field": name, "cut": cut(resolved.config, name),
             "origin": resolved.origin[name]} for name in CUT_RULES]
