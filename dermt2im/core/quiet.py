"""Known harmless messages from the libraries underneath, kept out of the factory's output.

Each is dropped by a filter on the one logger that emits it, matched on its text, so any other
warning of the same library still shows. ``quiet_libraries`` runs in the CLI and whenever the
Prefect flows are imported (a worker running any flow), before the libraries load.

- transformers: "`CLIPImageProcessor` requires torchvision (not installed); falling back to ...":
  the fallback is the image processor this project uses; torchvision is not a dependency.
- diffusers: "No LoRA keys associated to CLIPTextModel found ...": the factory's LoRA adapts the
  UNet only (Table II: frozen text encoder), so a text encoder without LoRA keys is expected.
- bitsandbytes: "Failed to load CPU gemm_4bit_forward from kernels-community: No module named
  'kernels'": an optional CPU kernel for 4-bit inference, which the factory never uses.
- tqdm bars of model loading and artifact downloads (Hugging Face, MLflow): they are redrawn
  thousands of times in a log file; the factory reports its own progress instead. Set
  HF_HUB_DISABLE_PROGRESS_BARS=0 to see download bars again.
- MLflow and alembic announcing database migrations at INFO level.
"""

from __future__ import annotations

import logging
import os

KNOWN_MESSAGES: dict[str, tuple[str, ...]] = {
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    "diffusers.loaders.peft": ("No LoRA keys associated to CLIPTextModel",),
    "diffusers.loaders.lora_base": ("No LoRA keys associated to CLIPTextModel",),
    "diffusers.loaders.lora_pipeline": ("No LoRA keys associated to CLIPTextModel",),
    "bitsandbytes.backends.cpu.ops": ("kernels-community",),
}
QUIET_BELOW_WARNING = ("mlflow.store.db.utils", "alembic.runtime.migration", "httpx", "httpcore", "docket", "urllib3")
ENVIRONMENT = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
               "TOKENIZERS_PARALLELISM": "false"}


class DropKnown(logging.Filter):
    """Drops records whose message contains one of ``fragments``."""

    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(f in text for f in self.fragments)


def quiet_libraries() -> None:
    """Install the filters and settings above (idempotent)."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name, fragments in KNOWN_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropKnown) for f in logger.filters):
            logger.addFilter(DropKnown(fragments))
    for name in QUIET_BELOW_WARNING:
        logging.getLogger(name).setLevel(logging.WARNING)
