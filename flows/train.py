"""The train stage as a Prefect flow: DreamBooth + LoRA fine-tuning on the processed seeds.

Deployable on its own to a CUDA work pool (``flows/train.py:train``, deployment ``train/train-cuda``;
the factory reaches it through run_deployment). With no ``config`` the workdir's saved W/config.yaml
is used (a fresh workdir falls back to the smoke preset).
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from dermt2im.train.stage import find_trained
from dermt2im.core.workdir import open_workdir
from tasks.train import train_lora_task


@flow(name="train", log_prints=True)
def train(workdir: str, config: str | None = None, overrides: list[str] | None = None,
          resume: str | None = "latest") -> dict:
    """Train the LoRA(s) of the config; returns run_id, lora_dir, weights, sha256 and training figures.

    ``resume``: "latest" (default) continues an interrupted run of the same inputs from its newest
    checkpoint; None starts over.
    """
    log = get_run_logger()
    w, cfg = open_workdir(workdir, config, overrides)
    done = find_trained(w, cfg)
    # a cached task result is only trusted while the LoRA it names is still on disk
    out = train_lora_task.with_options(refresh_cache=(done is None) or None)(workdir, cfg, resume)
    log.info("LoRA %s in %s (%s)", out["run_id"], out["lora_dir"], "cached" if out["cached"] else "trained")
    return out

