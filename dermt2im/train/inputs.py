"""What training reads and whether it can start: the training images, the prompts, the checks made
before any model loads, and the run's key."""

from __future__ import annotations

import math
import string
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dermt2im.core import identity
from dermt2im.core.fileio import sha256_file
from dermt2im.core.views import seeds_view
from dermt2im.core.runtime import TrainRuntime
from dermt2im.core.specs import LABELS, TrainConfig
from dermt2im.core.workdir import Workdir
from dermt2im.train.state import TrainingError

@dataclass(frozen=True)
class TrainingImage:
    sample_id: str
    label: str
    path: Path
    preprocess_key: str = ""


def training_images(workdir: Workdir) -> dict[str, list[TrainingImage]]:
    """Accepted, train-split rows with a processed image, by label, in sample_id order."""
    df = seeds_view(workdir.seeds_manifest)
    df = df[(df["status"] == "accepted") & (df["split"] == "train") & df["processed_path"].notna()]
    out: dict[str, list[TrainingImage]] = {label: [] for label in LABELS}
    for row in df.sort_values(["label", "sample_id", "processed_path"]).itertuples(index=False):
        if row.label in out:
            key = row.preprocess_key if isinstance(row.preprocess_key, str) else ""
            out[row.label].append(TrainingImage(str(row.sample_id), str(row.label), Path(row.processed_path), key))
    return out


def check_inputs(workdir: Workdir) -> dict[str, list[TrainingImage]]:
    """Every class has at least one training image and every file exists (before any model loads)."""
    images = training_images(workdir)
    empty = [label for label, items in images.items() if not items]
    if empty:
        counts = ", ".join(f"{k}: {len(v)}" for k, v in images.items())
        raise TrainingError(
            f"no training images for class {' and '.join(repr(e) for e in empty)} "
            f"(accepted, split=train and preprocessed, in {workdir.seeds_manifest}; found {counts}). "
            "Run ingest and preprocess first, or add seed images of that class."
        )
    missing = [str(i.path) for items in images.values() for i in items if not i.path.is_file()]
    if missing:
        raise TrainingError(f"{len(missing)} processed training image(s) are missing, e.g. {missing[:3]}; re-run preprocess")
    return images


def seeds_digest(images: dict[str, list[TrainingImage]]) -> str:
    """Content digest of what training reads: each training image's sample_id, label, preprocess key
    and the sha256 of its processed file. Paths do not enter it, so moving the workdir keeps keys."""
    rows = [
        f"{img.sample_id}\t{label}\ttrain\taccepted\t{img.preprocess_key}\t"
        f"{sha256_file(img.path) if img.path.is_file() else 'missing'}"
        for label in sorted(images) for img in images[label]
    ]
    return identity.content_key("train-seeds", rows)


def trainer_code() -> str:
    """The trainer's code identity: ``dermt2im/train/`` and every project module it imports."""
    return identity.code_digest(__name__)


def train_key(seeds: str, spec: TrainConfig, base_identity: str) -> str:
    """The LoRA run's key: the training images, the ``train`` spec, the base model and the trainer's code."""
    # base_config enters through base_identity (the checkpoint with its config folder)
    return identity.content_key("train", trainer_code(), seeds, identity.spec_digest(spec, exclude={"base_config"}),
                                base_identity)


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_config(train: TrainConfig, runtime: TrainRuntime) -> list[str]:
    """Raise TrainingError for settings that cannot work; return warnings for dubious ones."""
    warnings: list[str] = []
    for name in ("instance_prompt", "class_prompt"):
        unknown = _placeholders(getattr(train, name)) - {"token", "label"}
        if unknown:
            raise TrainingError(f"train.{name} uses unknown placeholder(s) {sorted(unknown)}; allowed: {{token}}, {{label}}")
    if not train.lora_per_class and "label" not in _placeholders(train.instance_prompt):
        raise TrainingError(
            "train.instance_prompt has no {label} placeholder, but one LoRA is trained for both classes "
            "(lora_per_class: false): the classes would share one prompt. Add {label} or set lora_per_class: true."
        )
    if train.prior_preservation and "label" not in _placeholders(train.class_prompt) and not train.lora_per_class:
        raise TrainingError("train.class_prompt needs a {label} placeholder for prior preservation with a shared LoRA")
    if "token" not in _placeholders(train.instance_prompt):
        warnings.append("train.instance_prompt has no {token}: the LoRA is not tied to a rare identifier")
    if train.resolution % 8:
        raise TrainingError(f"train.resolution must be a multiple of 8 (got {train.resolution})")
    if train.prior_preservation and train.prior_loss_weight == 0:
        warnings.append("prior_preservation is on with prior_loss_weight 0: class images have no effect")
    try:
        from dermt2im.diffusion.models import resolve_device

        resolve_device(runtime.device)
    except ValueError as err:
        raise TrainingError(str(err)) from None
    return warnings


def instance_prompt(train: TrainConfig, label: str) -> str:
    return train.instance_prompt.format(token=train.instance_token, label=label)


def class_prompt(train: TrainConfig, label: str) -> str:
    return train.class_prompt.format(token=train.instance_token, label=label)


def planned_steps(train: TrainConfig, n_examples: int) -> int:
    per_step = train.train_batch_size * train.gradient_accumulation_steps
    return train.max_steps or max(1, math.ceil(train.epochs * n_examples / per_step))


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
