"""The generation plan: every synthetic sample, decided before anything is rendered.

A row is a pure function of (config, label, index), so the same config always gives the same
plan and asking for more samples only appends rows: the existing prefix is unchanged.

* prompt: ``cfg.prompt`` with the instance token, the label and a transformation (the paper's
  smart transformations: tiny / large / several moles, Fitzpatrick skin types I-VI).
* sampler cycles fastest, transformation next: every (sampler, transformation) pair occurs once
  in each block of ``len(samplers) * len(transformations)`` consecutive samples of a class.
* steps are spread over ``[steps_min, steps_max]`` one value per shard (shards rotate through the
  range, offset per class). Within a shard only the sampler varies, so a shard renders as
  ``len(samplers)`` groups of identical settings and batches stay full; a per-sample spread would
  split a 100-sample shard into ~21 groups of ~5 and leave batches of 8 half empty.
* seed: sha256 of (cfg.seed, label, index) folded into 63 bits.
* shard ids are global and interleave the classes: ``(index // shard_size) * n_labels + label_pos``,
  so a shard holds one class only (one LoRA for per-class LoRAs) and extending the plan never
  renumbers an existing shard.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from dermt2im.core import identity, storage
from dermt2im.core.manifest import PLAN, read_manifest, write_manifest
from dermt2im.core.specs import LABELS, GenerateConfig
from dermt2im.generate.samplers import check_sampler_names

log = logging.getLogger(__name__)



def sample_seed(base_seed: int, label: str, index: int) -> int:
    return identity.seed_for_sample(base_seed, label, index)


def sample_key(label: str, index: int) -> str:
    return f"{label}-{index:06d}"


def shard_of(label: str, index: int, shard_size: int) -> int:
    return (index // shard_size) * len(LABELS) + LABELS.index(label)


def plan_row(cfg: GenerateConfig, *, token: str, label: str, index: int) -> dict:
    n_s, n_t = len(cfg.samplers), len(cfg.transformations) or 1
    transformation = cfg.transformations[(index // n_s) % n_t] if cfg.transformations else ""
    n_steps = cfg.steps_max - cfg.steps_min + 1
    shard_in_class = index // cfg.shard_size
    steps = cfg.steps_min + (shard_in_class + LABELS.index(label)) % n_steps
    return {
        "sample_key": sample_key(label, index),
        "label": label,
        "index": index,
        "prompt": cfg.prompt.format(token=token, label=label, transformation=transformation),
        "negative_prompt": cfg.negative_prompt,
        "transformation": transformation,
        "sampler": cfg.samplers[index % n_s],
        "steps": steps,
        "guidance_scale": float(cfg.guidance_scale),
        "lora_scale": float(cfg.lora_scale),
        "seed": sample_seed(cfg.seed, label, index),
        "width": cfg.width,
        "height": cfg.height,
        "shard": shard_of(label, index, cfg.shard_size),
    }


def build_plan(cfg: GenerateConfig, *, token: str, per_class: int | None = None) -> pd.DataFrame:
    """The plan for ``per_class`` (default ``cfg.per_class``) samples of each class, in PLAN's schema.

    Rows are ordered by class then index, so the plan for N is a prefix (per class) of the plan for
    M > N."""
    check_sampler_names(cfg.samplers)
    n = cfg.per_class if per_class is None else int(per_class)
    if n < 1:
        raise ValueError(f"per_class must be at least 1, got {n}")
    try:
        cfg.prompt.format(token=token, label="benign", transformation="")
    except (KeyError, IndexError) as err:
        raise ValueError(
            f"generate.prompt {cfg.prompt!r} uses an unknown placeholder {err}; "
            "available: {token}, {label}, {transformation}"
        ) from None
    rows = [plan_row(cfg, token=token, label=label, index=i) for label in LABELS for i in range(n)]
    df = pd.DataFrame(rows, columns=PLAN.columns)
    return _typed(df)


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    from dermt2im.core.manifest import conform

    return conform(df, PLAN).to_pandas()


_COMPARED = [c for c in PLAN.columns if c not in ("sample_key",)]


def update_plan(plan_path: Path | str, cfg: GenerateConfig, *, token: str, per_class: int | None = None) -> pd.DataFrame:
    """Create, extend or re-plan the plan at ``plan_path`` and return the whole plan.

    The plan follows the config: asking for more samples appends the missing indices (existing rows
    stay byte-identical); asking for fewer keeps what is planned; and rows that the current config
    would plan differently (e.g. a new guidance scale or prompt template) are re-planned, with a
    warning, so that the generate stage re-renders exactly those. Unchanged rows are never touched,
    and an unchanged plan file is not rewritten.
    """
    plan_path = plan_path if storage.is_remote(plan_path) else storage.local_path(plan_path)
    existing = read_manifest(plan_path, PLAN)
    requested = cfg.per_class if per_class is None else int(per_class)
    planned = int(existing.groupby("label")["index"].max().max()) + 1 if not existing.empty else 0
    wanted = build_plan(cfg, token=token, per_class=max(requested, planned))
    if existing.empty:
        write_manifest(wanted, plan_path, PLAN)
        log.info("planned %d samples (%s) in %s", len(wanted), _counts(wanted), plan_path)
        return read_manifest(plan_path, PLAN)

    have = set(existing["sample_key"])
    changed = _drifted(existing, wanted[wanted["sample_key"].isin(have)])
    new = wanted[~wanted["sample_key"].isin(have)]
    if new.empty and not changed:
        return existing
    keep = existing[~existing["sample_key"].isin(set(wanted["sample_key"]))]  # rows the config no longer plans
    merged = pd.concat([keep, wanted], ignore_index=True)
    # class-major order, each class by index: the plan file reads the same however it grew
    merged = merged.sort_values(["label", "index"], key=_label_order, kind="stable").reset_index(drop=True)
    write_manifest(merged, plan_path, PLAN)
    if new.size:
        log.info("extended the plan by %d samples (%s) to %d", len(new), _counts(new), len(merged))
    return read_manifest(plan_path, PLAN)


def _label_order(col: pd.Series) -> pd.Series:
    if col.name == "label":
        order = {label: i for i, label in enumerate(LABELS)}
        return col.map(lambda v: order.get(v, len(order)))
    return col


def _drifted(existing: pd.DataFrame, wanted: pd.DataFrame) -> list[str]:
    """Columns in which already-planned rows differ from what the config plans now (logged)."""
    if wanted.empty:
        return []
    a = existing.set_index("sample_key").loc[wanted["sample_key"], _COMPARED].reset_index(drop=True)
    b = wanted[_COMPARED].reset_index(drop=True)
    differing = [c for c in _COMPARED if not a[c].astype("string").equals(b[c].astype("string"))]
    if differing:
        rows = int((a.astype("string") != b.astype("string")).any(axis=1).sum())
        log.warning(
            "the config changed column(s) %s of %d planned sample(s): they are re-planned and will be "
            "re-rendered", ", ".join(differing), rows,
        )
    return differing


def _counts(df: pd.DataFrame) -> str:
    return ", ".join(f"{k}: {v}" for k, v in df["label"].value_counts().sort_index().items())


def shards_of(plan: pd.DataFrame) -> list[int]:
    return sorted(int(s) for s in plan["shard"].unique())


def planned_per_class(plan_path: Path | str) -> int:
    """How many images per class the plan at ``plan_path`` holds (0 when there is none)."""
    plan = read_manifest(plan_path, PLAN)
    if plan.empty:
        return 0
    return int(plan.groupby("label")["index"].max().min()) + 1
