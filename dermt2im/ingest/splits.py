"""Splits by lesion: stratified by label, seeded, deterministic; a lesion never spans two splits."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping
from typing import Any

from dermt2im.core.specs import SplitConfig
from dermt2im.ingest.rows import ACCEPTED

SPLITS: tuple[str, ...] = ("train", "val", "test")


def split_counts(n: int, proportions: Mapping[str, float]) -> dict[str, int]:
    """Split ``n`` groups by largest remainder; every split with a positive share gets at least one
    group when there are enough groups for all of them."""
    names = list(proportions)
    exact = {k: n * proportions[k] for k in names}
    counts = {k: int(math.floor(exact[k] + 1e-9)) for k in names}
    for k in sorted(names, key=lambda k: (-(exact[k] - counts[k]), names.index(k)))[: n - sum(counts.values())]:
        counts[k] += 1
    positive = [k for k in names if proportions[k] > 0]
    if n >= len(positive):
        for k in positive:
            if counts[k] == 0:
                donor = max(names, key=lambda d: (counts[d], -names.index(d)))
                counts[donor] -= 1
                counts[k] += 1
    return counts


def assign_splits(groups: Mapping[str, str], cfg: SplitConfig) -> dict[str, str]:
    """group id -> split for groups (id -> label): stratified by label, seeded, deterministic."""
    proportions = {"train": cfg.train, "val": cfg.val, "test": cfg.test}
    out: dict[str, str] = {}
    for label in sorted(set(groups.values())):
        ids = sorted(g for g, lab in groups.items() if lab == label)
        random.Random(f"{cfg.seed}:{label}").shuffle(ids)  # str seeds are stable across processes
        start = 0
        for name, count in split_counts(len(ids), proportions).items():
            out.update({g: name for g in ids[start : start + count]})
            start += count
    return out


def _group_of(row: Mapping[str, Any]) -> str:
    return f"lesion:{row['lesion_id']}" if row.get("lesion_id") else f"file:{row['source_path']}"


def fill_splits(rows: list[dict[str, Any]], root: str, cfg: SplitConfig, forced: str | None) -> list[dict[str, Any]]:
    """Give every accepted row of ``root`` without a split one: ``forced`` if given, else the split
    its lesion already has (anywhere in the manifest), else a fresh stratified assignment."""
    mine = [i for i, r in enumerate(rows) if r["source_root"] == root and r["status"] == ACCEPTED]
    out = list(rows)
    if forced is not None:
        for i in mine:
            out[i] = {**out[i], "split": forced}
        return out
    votes: dict[str, Counter[str]] = {}
    for r in rows:
        if r["status"] == ACCEPTED and r["split"] and r.get("lesion_id"):
            votes.setdefault(_group_of(r), Counter())[r["split"]] += 1
    fixed = {g: min(c, key=lambda s: (-c[s], s)) for g, c in votes.items()}
    todo = [i for i in mine if not rows[i]["split"]]
    labels: dict[str, Counter[str]] = {}
    for i in todo:
        group = _group_of(rows[i])
        if group not in fixed:
            labels.setdefault(group, Counter())[rows[i]["label"]] += 1
    fresh = assign_splits({g: min(c, key=lambda lab: (-c[lab], lab)) for g, c in labels.items()}, cfg)
    for i in todo:
        group = _group_of(rows[i])
        out[i] = {**out[i], "split": fixed.get(group) or fresh[group]}
    return out
