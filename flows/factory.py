"""The factory: the paper's Fig. 1 as one Prefect flow.

seeds -> ingest -> preprocess -> train_lora (cuda) -> plan / generate shards (cuda) -> quality gate +
memorisation audit -> validate {ViT, MobileNetV2} x regimes x seeds (MLflow) -> Table IV.
"""

from __future__ import annotations

from prefect import flow

from dermt2im.core.workdir import DEFAULTS, Workdir, open_workdir, workdir_lock
from dermt2im.flows.dispatch import check_devices_here, placement, run_gpu_stage
from dermt2im.flows.generate import generate
from dermt2im.flows.names import in_workdir
from dermt2im.flows.seeds import prepare_seeds
from dermt2im.flows.settings import orchestration
from dermt2im.flows.train import train
from dermt2im.flows.validate import validate
from dermt2im.tasks.artifacts import publish_factory


@flow(name="derm-t2im-factory", log_prints=True, flow_run_name=in_workdir("factory"))
def factory(
    workdir: str,
    source: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    layout: str | None = None,
) -> dict:
    with workdir_lock(Workdir.at(workdir), "derm-t2im-factory flow"):  # one run at a time per workdir
        # Saved as W/config.yaml; every stage below reads it. A fresh workdir: the paper's defaults for a
        # real source, the smoke preset for the phantom demo.
        w, cfg = open_workdir(workdir, config, overrides, fallback="smoke" if source is None else DEFAULTS,
                              check=orchestration)
        gpu = orchestration(cfg)
        where = placement(cfg, gpu)
        check_devices_here(cfg, [stage for stage, deployment in where.items() if deployment is None])
        # Each stage waits for the one before, given its result: Prefect's run graph draws an edge from
        # a subflow whose result another one waits for, so it shows seeds -> train -> generate -> validate.
        seeds = prepare_seeds(workdir, source, layout=layout)
        lora = run_gpu_stage(train, where["train"], {"workdir": workdir}, gpu, wait_for=[seeds])
        # generate renders with the LoRA trained for this config (dermt2im.train.runs), whichever ran last
        synthetic = run_gpu_stage(generate, where["generate"], {"workdir": workdir}, gpu, wait_for=[lora])
        validation = run_gpu_stage(validate, where["validate"], {"workdir": workdir}, gpu, wait_for=[synthetic])
        publish_factory(w, validation, cfg.tracking)
    return {"seeds": seeds, "lora": lora, "synthetic": synthetic, "validation": validation}
