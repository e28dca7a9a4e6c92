"""The shortcut audit: how often each flag (ruler, ink, frame, hair, text) occurs per class.

An artefact that is much more frequent in one class than in the other is something a classifier can
learn instead of the lesion (rulers beside melanomas are the textbook case). For every synthetic
source the rates among its accepted images are compared between benign and malignant, next to the
real seeds' rates; a flag whose rates differ by at least ``quality.shortcut_min_difference`` with a
Fisher exact p below ``P_VALUE`` is called out by name. With ``quality.balance_flags`` the flagged
images of the class with the higher rate are rejected, latest first, until its rate is no higher
than the other class's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from dermt2im.core.specs import LABELS, QualityConfig

AUDITED_FLAGS = ("ruler", "ink", "frame", "hair", "text")
P_VALUE = 0.05
REAL = "real seeds"


def has_flag(flags: object, flag: str) -> bool:
    return isinstance(flags, str) and flag in flags.split(",")


def rate_table(groups: dict[str, pd.DataFrame]) -> list[dict[str, object]]:
    """Per group (a source, or the real seeds) and class: images and each flag's rate.
    Each frame has ``label`` and ``flags`` (comma-separated) columns."""
    rows = []
    for group, df in groups.items():
        for label in LABELS:
            sel = df[df["label"] == label]
            row: dict[str, object] = {"images": group, "label": label, "n": len(sel)}
            for flag in AUDITED_FLAGS:
                hits = int(sel["flags"].map(lambda f, fl=flag: has_flag(f, fl)).sum())
                row[flag] = hits / len(sel) if len(sel) else float("nan")
                row[f"{flag}_n"] = hits
            rows.append(row)
    return rows


@dataclass(frozen=True)
class Shortcut:
    source: str
    flag: str
    rates: dict[str, float]  # label -> rate among the source's accepted images
    counts: dict[str, tuple[int, int]]  # label -> (flagged, images)
    p_value: float

    @property
    def higher(self) -> str:
        return max(LABELS, key=lambda lab: self.rates[lab])

    def sentence(self) -> str:
        lo = next(lab for lab in LABELS if lab != self.higher)
        return (f"{self.source}: the {self.flag} flag is on {self.rates[self.higher]:.0%} of accepted {self.higher} "
                f"images but {self.rates[lo]:.0%} of {lo} ones (Fisher p = {self.p_value:.2g}): a classifier can "
                f"learn the {self.flag} instead of the lesion")


def find_shortcuts(rows: Sequence[dict[str, object]], min_difference: float) -> list[Shortcut]:
    """The flags whose benign and malignant rates differ strongly, per synthetic source."""
    by_group: dict[str, dict[str, dict[str, object]]] = {}
    for r in rows:
        by_group.setdefault(str(r["images"]), {})[str(r["label"])] = r
    out = []
    for group, per_label in by_group.items():
        if group == REAL or set(per_label) != set(LABELS) or any(per_label[lab]["n"] == 0 for lab in LABELS):
            continue
        for flag in AUDITED_FLAGS:
            counts = {lab: (int(per_label[lab][f"{flag}_n"]), int(per_label[lab]["n"])) for lab in LABELS}
            rates = {lab: k / n for lab, (k, n) in counts.items()}
            if abs(rates[LABELS[0]] - rates[LABELS[1]]) < min_difference:
                continue
            from scipy.stats import fisher_exact  # only when a flag's rates differ: SciPy's stats take 0.7 s to import

            table = [[k, n - k] for k, n in counts.values()]
            p = float(fisher_exact(table)[1])
            if p < P_VALUE:
                out.append(Shortcut(group, flag, rates, counts, p))
    return out


def balance(df: pd.DataFrame, shortcut: Shortcut) -> list[int]:
    """Positions (index labels of ``df``: one source's accepted images, with ``label``, ``flags``,
    ``index``) to reject so that the flag's rate in the higher class is no more than the other's."""
    hi = shortcut.higher
    lo = next(lab for lab in LABELS if lab != hi)
    k_hi, n_hi = shortcut.counts[hi]
    k_lo, n_lo = shortcut.counts[lo]
    target = k_lo / n_lo
    # (k_hi - x) / (n_hi - x) <= target  <=>  x >= (k_hi - target * n_hi) / (1 - target)
    need = k_hi if target >= 1 else math.ceil((k_hi - target * n_hi) / (1 - target) - 1e-9)
    flagged = df[(df["label"] == hi) & df["flags"].map(lambda f: has_flag(f, shortcut.flag))]
    return list(flagged.sort_values("index", ascending=False).index[: max(0, need)])


def balance_reason(shortcut: Shortcut) -> str:
    hi = shortcut.higher
    lo = next(lab for lab in LABELS if lab != hi)
    return (f"shortcut: {shortcut.flag} flag on {shortcut.rates[hi]:.0%} of accepted {hi} vs "
            f"{shortcut.rates[lo]:.0%} of {lo} images (quality.balance_flags)")


def audit_shortcuts(accepted: pd.DataFrame, seeds: pd.DataFrame, q: QualityConfig
                    ) -> tuple[list[dict[str, object]], list[Shortcut], dict[int, str]]:
    """(rate table, shortcuts called out before balancing, rejections by balancing: position -> reason).

    ``accepted``: the accepted synthetic rows (``source``, ``label``, ``flags``, ``index``);
    ``seeds``: the real seeds (``label``, ``flags``).
    """
    groups = {str(s): g for s, g in accepted.groupby("source", sort=True)}
    shortcuts = find_shortcuts(rate_table(groups), q.shortcut_min_difference)
    rejected: dict[int, str] = {}
    if q.balance_flags:
        for source, g in groups.items():
            for _ in AUDITED_FLAGS:  # each pass fixes one flag; rejections change the other rates
                remaining = g.drop(index=[i for i in rejected if i in g.index])
                found = find_shortcuts(rate_table({source: remaining}), q.shortcut_min_difference)
                if not found:
                    break
                worst = max(found, key=lambda s: abs(s.rates[LABELS[0]] - s.rates[LABELS[1]]))
                rejected.update({i: balance_reason(worst) for i in balance(remaining, worst)})
    final = accepted.drop(index=list(rejected))
    rows = rate_table({**{str(s): g for s, g in final.groupby("source", sort=True)}, REAL: seeds})
    return rows, shortcuts, rejected
