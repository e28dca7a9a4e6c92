"""The train stage as a Prefect flow: DreamBooth + LoRA fine-tuning on the processed seeds
(``dermt2im.pipelines.train``).

Deployable on its own to a CUDA work pool (``dermt2im.flows.train.train``, deployment ``train/train-cuda``;
the factory reaches it through run_deployment). With no ``config`` the workdir's saved W/config.yaml
is used.
"""

from __future__ import annotations

from prefect import flow

from dermt2im import pipelines
from dermt2im.core.workdir import open_workdir
from dermt2im.flows.names import in_workdir
from dermt2im.flows.settings import orchestration
from dermt2im.tasks.stage import run_pipeline


@flow(name="train", log_prints=True, flow_run_name=in_workdir("train LoRA"))
def train(workdir: str, config: str | None = None, overrides: list[str] | None = None,
          resume: str | None = "latest") -> dict:
    """Train the LoRA(s) of the config; returns run_id, lora_dir, weights, sha256 and training figures.

    ``resume``: "latest" (default) continues an interrupted run of the same inputs from its newest
    checkpoint; None starts over.
    """
    w, cfg = open_workdir(workdir, config, overrides, check=orchestration)
    done, _ = run_pipeline(pipelines.train(w, cfg, resume=resume))
    return done["train"]
