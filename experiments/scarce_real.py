"""Scarce real data, the paper's setting, on phantoms: baseline vs hybrid balanced accuracy for a few
numbers of real training images per class.

For each N, the whole factory runs on the smoke preset (the miniature SD, every quality check on)
in a workdir of its own, with enough phantom seeds that the train split holds about N images per
class, and larger phantom test sets than the smoke preset's: DreamBooth + LoRA on those N, generation,
gate and audit, then the classifiers real-only (baseline), hybrid (75 % synthetic, constant size)
and hybrid-additive (the paper's: all real images plus synthetic ones). Each workdir's Table IV
(bootstrap intervals over the test images, seeds pooled) is gathered into one table and one figure.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/scarce_real.py --out runs/scarce --per-class 8 16 32 \
        --set generate.per_class=100

writes OUT/scarce.csv, OUT/scarce.md and OUT/scarce.png (and OUT/n<N>/, each a factory workdir).
Whatever it shows is the result: the Markdown says which differences are established.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

TRAIN_SHARE = 0.7  # the smoke preset's train split
REGIMES = "[baseline,hybrid,hybrid-additive]"


def seeds_for(per_class: int) -> int:
    return math.ceil(2 * per_class / TRAIN_SHARE)


def run_factory(workdir: Path, per_class: int, n_test: int, seeds: str, extra: list[str]) -> float:
    sets = [f"phantoms.n_seed={seeds_for(per_class)}", f"phantoms.n_test={n_test}", f"validate.regimes={REGIMES}",
            f"validate.seeds={seeds}", *extra]
    cmd = [str(Path(sys.executable).with_name("dermt2im")), "run", "--config", "smoke", "--workdir", str(workdir)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def gather(out: Path, sizes: list[int]) -> pd.DataFrame:
    frames = []
    for n in sizes:
        table = pd.read_csv(out / f"n{n}" / "reports" / "table_iv.csv")
        frames.append(table.assign(per_class=n))
    return pd.concat(frames, ignore_index=True)


def figure(table: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted(table["model"].unique())
    sets = sorted(table["test_set"].unique())
    fig, axes = plt.subplots(len(models), len(sets), figsize=(4 * len(sets), 3.2 * len(models)), squeeze=False,
                             sharey=True)
    for i, model in enumerate(models):
        for j, test_set in enumerate(sets):
            ax = axes[i][j]
            for k, (regime, g) in enumerate(table[(table["model"] == model) & (table["test_set"] == test_set)]
                                            .groupby("regime", sort=False)):
                g = g.sort_values("per_class")
                x = g["per_class"] * (1 + 0.04 * (k - 1))  # side by side, not on top of each other
                err = [g["balanced_accuracy_mean"] - g["balanced_accuracy_ci_low"],
                       g["balanced_accuracy_ci_high"] - g["balanced_accuracy_mean"]]
                ax.errorbar(x, g["balanced_accuracy_mean"], yerr=err, marker="o", capsize=3, label=regime)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(table["per_class"].unique()), [str(v) for v in sorted(table["per_class"].unique())])
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
            ax.set_title(f"{model} on {test_set}", fontsize=9)
            ax.set_xlabel("real training images per class (nominal)")
            if j == 0:
                ax.set_ylabel("balanced accuracy (95% CI)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(table: pd.DataFrame, seconds: dict[int, float]) -> str:
    lines = ["# Scarce real data on phantoms: baseline vs hybrid", "",
             "Each row: one factory run (smoke preset) whose train split held the real images shown; balanced "
             "accuracy is the mean over seeds with a 95% bootstrap interval over the test images; the difference to "
             "the baseline has a paired bootstrap interval; McNemar p per seed.", "",
             "| Real / class (nominal) | Model | Test set | Regime | Training images (real + synthetic) | "
             "Balanced acc. (95% CI) | Difference vs baseline (95% CI) | McNemar p | Established? |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, r in table.sort_values(["per_class", "model", "test_set"]).iterrows():
        diff = verdict = "–"
        p_values = str(r.get("mcnemar_p_values") or "")
        p_values = p_values.replace(";", ", ") if p_values and p_values != "nan" else "–"
        if r["regime"] != "baseline":
            diff = f"{r['balanced_accuracy_diff']:+.3f} [{r['balanced_accuracy_diff_ci_low']:+.3f}, " \
                   f"{r['balanced_accuracy_diff_ci_high']:+.3f}]"
            if r["balanced_accuracy_diff_ci_low"] > 0 and r["mcnemar_significant_seeds"] == r["mcnemar_seeds"] > 0:
                verdict = "better"
            elif r["balanced_accuracy_diff_ci_high"] < 0:
                verdict = "worse"
            else:
                verdict = "no difference established"
        lines.append(
            f"| {r['per_class']} | {r['model']} | {r['test_set']} | {r['regime']} | "
            f"{r['n_real_min']}-{r['n_real_max']} + {r['n_synthetic_min']}-{r['n_synthetic_max']} | "
            f"{r['balanced_accuracy_mean']:.3f} [{r['balanced_accuracy_ci_low']:.3f}, "
            f"{r['balanced_accuracy_ci_high']:.3f}] | {diff} | {p_values} | {verdict} |")
    if seconds:
        lines += ["", "Wall time per factory run: " + ", ".join(f"N={n}: {s / 60:.1f} min" for n, s in seconds.items())]
    lines += ["", "Established = the paired interval of the difference above 0 and McNemar p < 0.05 in every seed "
              "(Table IV's verdict); worse = the interval below 0.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/scarce"))
    ap.add_argument("--per-class", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--n-test", type=int, default=100, help="images in each phantom test set")
    ap.add_argument("--seeds", default="[0,1,2]", help="classifier seeds (validate.seeds)")
    ap.add_argument("--set", action="append", default=[], help="further --set for every run")
    ap.add_argument("--report-only", action="store_true", help="gather the workdirs already there, run nothing")
    args = ap.parse_args()
    seconds = {}
    for n in [] if args.report_only else args.per_class:
        seconds[n] = run_factory(args.out / f"n{n}", n, args.n_test, args.seeds, args.set)
    table = gather(args.out, args.per_class)
    table.to_csv(args.out / "scarce.csv", index=False)
    figure(table, args.out / "scarce.png")
    (args.out / "scarce.md").write_text(markdown(table, seconds))
    print(f"wrote {args.out / 'scarce.md'}, {args.out / 'scarce.png'}, {args.out / 'scarce.csv'}")


if __name__ == "__main__":
    main()
