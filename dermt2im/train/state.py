"""State of one training call: run-folder names, the error type, and the per-call and per-LoRA records."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermt2im.core.errors import DermT2imError
from dermt2im.core.runtime import TrainRuntime
from dermt2im.core.specs import TrainConfig

CHECKPOINTS = "checkpoints"
LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"
VALIDATION = "validation"
CLASS_IMAGES = "class_images"


class TrainingError(DermT2imError, RuntimeError):
    """Training cannot start or cannot go on; the message says why and what was (not) written."""


# ---------------------------------------------------------------------------------------------
# state shared by the sub-runs of one call


@dataclass(frozen=True)
class Preview:
    """How the sample images written after training are rendered (the ``generate`` section's negative
    prompt and guidance scale). Previews are for people to look at; they are not part of the key."""

    negative_prompt: str = ""
    guidance_scale: float = 7.0

    @classmethod
    def of(cls, generate: Any) -> "Preview":
        """The preview settings of a ``generate`` spec (``dermt2im.core.specs.GenerateConfig``)."""
        return cls(generate.negative_prompt, float(generate.guidance_scale))


@dataclass
class TrainContext:
    train: TrainConfig
    runtime: TrainRuntime
    preview: Preview
    run_id: str
    key: str
    lora_dir: Path
    device: Any
    accelerator: Any
    weight_dtype: Any
    mixed_precision: str
    optimizer_name: str
    pipe: Any
    noise_scheduler: Any
    warnings: list[str]
    header_meta: dict[str, Any]
    unet: Any = None  # what the loop calls: pipe.unet, or it compiled (train.loop._choose_unet)
    tracker: Any = None  # dermt2im.core.tracking.Tracker
    tracker_run: str | None = None
    metrics_buffer: list[tuple[str, float, int]] = field(default_factory=list)

    @property
    def denoiser(self) -> Any:
        """The UNet the loop calls. Never ``unet or pipe.unet``: a compiled module's truth value asks
        for its ``len()``, which the UNet refuses (TypeError at the first step of every CUDA run)."""
        return self.unet if self.unet is not None else self.pipe.unet


@dataclass
class TrainingData:
    """Cached inputs of one sub-run: latent posteriors and conditioning per example."""

    labels: list[str]  # example -> label
    lat_mean: Any  # [N, C, h, w] float32 on device
    lat_std: Any
    embeds: dict[str, Any]  # label -> [1, L, D] (cached encoder states) ...
    input_ids: dict[str, Any]  # ... or token ids when the text encoder trains
    class_mean: Any = None  # prior preservation: [M, C, h, w] and label per class image
    class_std: Any = None
    class_labels: list[str] = field(default_factory=list)
    class_by_label: dict[str, list[int]] = field(default_factory=dict)
    class_embeds: dict[str, Any] = field(default_factory=dict)
    class_ids: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepBatch:
    step: int
    idx: list[int]
    latents: Any
    noise: Any
    timesteps: Any
    labels: list[str]
    prior_latents: Any = None
    prior_noise: Any = None
    prior_timesteps: Any = None
    prior_labels: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.idx)


@dataclass
class LoraRun:
    """One LoRA being trained (the shared one, or one class's)."""

    name: str  # "all" or a label
    out_dir: Path
    data: TrainingData
    total: int
    params: list
    optimizer: Any
    lr_scheduler: Any
    generator: Any
    micro_batch: int
    step: int = 0
    losses: list[tuple[int, float, float]] = field(default_factory=list)  # (step, loss, lr)
    skipped: list[int] = field(default_factory=list)
    oom_events: list[int] = field(default_factory=list)
    start_step: int = 0
    loop_seconds: float = 0.0
    _perm: tuple[int, Any] | None = None

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / CHECKPOINTS

    def example(self, position: int, seed: int) -> int:
        """Example index at ``position`` of the endless stream of epoch permutations."""
        import torch

        n = len(self.data.labels)
        epoch, offset = divmod(position, n)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(n, generator=g).tolist())
        return self._perm[1][offset]
