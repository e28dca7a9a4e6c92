"""Generation as the tests drive it: a factory config in, the generate stage's pieces out."""

from __future__ import annotations

from dermt2im.generate import shards
from dermt2im.generate.model import RenderModel
from dermt2im.generate.plan import update_plan
from dermt2im.generate.stage import GenerateReport, GenerateStage


def base_model(cfg) -> RenderModel:
    """The config's base model alone (as ``--base-model-only`` renders)."""
    return RenderModel.base_only(cfg.train.base_model, cfg.train.revision, cfg.train.instance_token)


def plan(workdir, cfg):
    return update_plan(workdir.plan_manifest, cfg.generate, token=cfg.train.instance_token)


def render(workdir, cfg, shard: int, *, model: RenderModel | None = None, pipe=None) -> list[dict]:
    return shards.render_shard(workdir.using(cfg), cfg.runtime.generate, model or base_model(cfg), shard, pipe=pipe)


def complete(workdir, cfg, shard: int, **kw) -> bool:
    return shards.shard_complete(workdir.using(cfg), base_model(cfg), shard, **kw)


def missing(workdir, cfg, shard: int) -> int:
    return shards.shard_missing(workdir.using(cfg), base_model(cfg), shard)


def state(workdir, cfg, shard: int) -> shards.ShardState:
    return shards.shard_state(workdir.using(cfg), base_model(cfg), shard)


def stage(workdir, cfg, model: RenderModel | None = None, **kw) -> GenerateStage:
    return GenerateStage(workdir.using(cfg), cfg.generate, cfg.runtime.generate, model or base_model(cfg), **kw)


def generate(workdir, cfg, *, lora=None, base_model_only: bool = False, **kw) -> GenerateReport:
    """Plan, then render every shard (or the given ones) that is not complete, in this process."""
    import time

    from dermt2im.runners.sequential import run_stage

    w = workdir.using(cfg)
    t0 = time.perf_counter()
    render = GenerateStage(w, cfg.generate, cfg.runtime.generate, train=cfg.train, lora=lora,
                           base_model_only=base_model_only, **kw)
    done = run_stage(render).closing
    return GenerateReport(w.plan_manifest, w.synthetic_manifest, done["planned"], done["rendered"],
                          done["planned"] - done["rendered"], time.perf_counter() - t0, done["lora"],
                          tuple(done["shards"]), render.model.describe())
