"""Fine-tuning a classifier for benign vs malignant, and predicting with it.

- AdamW, class-weighted cross-entropy (inverse class frequency of the training mixture), mixed
  precision on CUDA only, early stopping on the validation split (real images): the best epoch by
  validation balanced accuracy, ties broken by validation loss; training stops after ``patience``
  epochs without improvement and the best weights are restored.
- Deterministic for a seed: weights of new heads / tiny models, shuffling and augmentation all draw
  from generators seeded by it.

Models are in ``models``, image loading and augmentation in ``images``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from dermt2im.core.specs import Recipe, ValidateConfig
from dermt2im.validate.images import augment, normalise
from dermt2im.validate.metrics import binary_metrics
from dermt2im.validate.models import ModelUnavailable

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``runtime.validate.device`` as a torch device: auto, cuda or cpu."""
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ModelUnavailable("runtime.validate.device is 'cuda' but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0  # 1-based; 0 when no epoch ran
    stopped_early: bool = False
    batch_size: int = 0

    @property
    def epochs_run(self) -> int:
        return len(self.history)


def _logits(model, x: torch.Tensor, amp_dtype) -> torch.Tensor:
    if amp_dtype is not None:
        with torch.autocast("cuda", dtype=amp_dtype):
            return model(pixel_values=x).logits.float()
    return model(pixel_values=x).logits.float()


@torch.no_grad()
def predict_proba(model, images: torch.Tensor, processor, *, batch_size: int = 64, device=None,
                  amp_dtype=None) -> np.ndarray:
    """P(malignant) for every image (uint8 tensor from ``load_images``)."""
    device = device or next(model.parameters()).device
    model.eval()
    probs = []
    for start in range(0, len(images), batch_size):
        x = normalise(images[start : start + batch_size].to(device), processor)
        probs.append(torch.softmax(_logits(model, x, amp_dtype), dim=-1)[:, 1].cpu())
    return torch.cat(probs).numpy().astype(np.float64) if probs else np.zeros(0)


def _amp_dtype(cfg: ValidateConfig, device: torch.device):
    if device.type != "cuda" or cfg.mixed_precision == "no":
        return None
    return torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16


@dataclass
class _Trainer:
    """One fine-tuning: model, loss (class-weighted), optimiser and the seeded generator."""

    model: torch.nn.Module
    processor: object
    device: torch.device
    amp: object
    generator: torch.Generator
    loss_fn: torch.nn.Module
    optimiser: torch.optim.Optimizer
    scaler: object
    schedule: object  # torch.optim.lr_scheduler.LambdaLR, stepped once per optimiser step
    augmentation: object  # dermt2im.core.specs.Augmentation

    def epoch(self, train_x: torch.Tensor, train_y: torch.Tensor, batch_size: int, epoch: int) -> float:
        """One pass over the shuffled, augmented training images; the mean training loss."""
        self.model.train()
        n = len(train_x)
        order = torch.randperm(n, generator=self.generator)
        total, seen = 0.0, 0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2 and n >= 2:  # BatchNorm cannot train on a single image
                continue
            a = self.augmentation
            x = normalise(augment(train_x[idx], self.generator, a.colour_jitter, flips=a.flips,
                                  quarter_turns=a.quarter_turns, crop_scale=a.crop_scale), self.processor).to(self.device)
            y = train_y[idx].to(self.device)
            self.optimiser.zero_grad(set_to_none=True)
            loss = self.loss_fn(_logits(self.model, x, self.amp), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch}")
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimiser)
                self.scaler.update()
            else:
                loss.backward()
                self.optimiser.step()
            self.schedule.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        return total / max(seen, 1)

    def evaluate(self, val_x: torch.Tensor, val_y: torch.Tensor, batch_size: int) -> dict[str, float]:
        prob = predict_proba(self.model, val_x, self.processor, batch_size=max(batch_size, 32), device=self.device,
                             amp_dtype=self.amp)
        p = np.clip(prob, 1e-7, 1 - 1e-7)
        yv = val_y.numpy()
        m = binary_metrics(yv, prob)
        return {"val_loss": float(-np.mean(yv * np.log(p) + (1 - yv) * np.log(1 - p))),
                "val_balanced_accuracy": m["balanced_accuracy"], "val_accuracy": m["accuracy"]}


def learning_rate_factor(recipe: Recipe, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of the recipe's learning rate at optimiser step ``s`` (0-based): a linear warm-up
    over ``warmup_epochs``, then constant, or a linear or cosine decay to zero at the last step."""
    warmup = int(round(recipe.warmup_epochs * steps_per_epoch))
    total = max(recipe.epochs * steps_per_epoch, warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if recipe.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if recipe.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps in one epoch of ``n`` images (a last batch of one image is skipped: BatchNorm)."""
    full, rest = divmod(n, batch_size)
    return max(1, full + (1 if rest >= 2 or (rest == 1 and n < 2) else 0))


def _trainer(model, processor, train_y: torch.Tensor, cfg: ValidateConfig, seed: int, device: torch.device,
             recipe: Recipe, batch_size: int) -> _Trainer:
    amp = _amp_dtype(cfg, device)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(seed)  # dropout
    model.to(device)
    counts = torch.bincount(train_y, minlength=2).float()
    weights = torch.where(counts > 0, counts.sum() / (2 * counts.clamp(min=1)), torch.zeros_like(counts))
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, learning_rate_factor(recipe, steps_per_epoch(len(train_y), batch_size)))
    return _Trainer(model, processor, device, amp, torch.Generator().manual_seed(seed),
                    torch.nn.CrossEntropyLoss(weight=weights.to(device)), optimiser,
                    torch.amp.GradScaler("cuda") if amp == torch.float16 else None, schedule, recipe.augmentation)


def fit(
    model,
    processor,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    cfg: ValidateConfig,
    seed: int,
    *,
    device: torch.device | None = None,
    batch_size: int | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    recipe: Recipe | None = None,
) -> FitResult:
    """Fine-tune ``model`` in place with ``recipe`` (default: the first configured model's); on
    return it holds the best epoch's weights."""
    recipe = recipe or cfg.recipe(cfg.models[0])
    batch_size = batch_size or cfg.batch_size
    trainer = _trainer(model, processor, train_y, cfg, seed, device or resolve_device("auto"), recipe, batch_size)
    result = FitResult(batch_size=batch_size)
    best_key: tuple[float, float] | None = None
    best_state = None
    since_best = 0
    has_val = len(val_x) > 0
    if not has_val:
        log.warning("no validation images: training all %d epochs without early stopping", recipe.epochs)
    for epoch in range(1, recipe.epochs + 1):
        row = {"train_loss": trainer.epoch(train_x, train_y, batch_size, epoch)}
        if has_val:
            row.update(trainer.evaluate(val_x, val_y, batch_size))
            bacc = row["val_balanced_accuracy"]
            key = (bacc if not math.isnan(bacc) else row["val_accuracy"], -row["val_loss"])
        else:
            key = (float(epoch), 0.0)  # last epoch wins
        result.history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, row)
        if best_key is None or key > best_key:
            best_key, since_best = key, 0
            result.best_epoch = epoch
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            since_best += 1
            if has_val and since_best >= cfg.early_stopping_patience:
                result.stopped_early = epoch < recipe.epochs
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result
