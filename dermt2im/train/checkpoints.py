"""Training checkpoints: save, list and restore LoRA weights, optimizer, scheduler and RNG state."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from dermt2im.train.state import LoraRun, TrainContext, TrainingError

LOG = logging.getLogger(__name__)


def _trainable(ctx: TrainContext) -> dict[str, Any]:
    out = {}
    for prefix, model in (("unet", ctx.pipe.unet), ("text_encoder", ctx.pipe.text_encoder)):
        for n, p in model.named_parameters():
            if p.requires_grad:
                out[f"{prefix}::{n}"] = p
    return out



# ---------------------------------------------------------------------------------------------
# checkpoints


def _flatten_optimizer(state: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """An optimizer's state dict as (tensors for safetensors, everything else for JSON).

    Tensors are found at any depth: bitsandbytes' 8-bit AdamW nests its per-parameter state
    (``state1``, ``state2``, ``absmax1``, ``qmap1``, ...) in a dict of its own. A tensor's key is its
    path, ``<param id>/<key>[/<key>...]``; the JSON keeps the same nesting without the tensors."""
    import torch

    tensors: dict[str, Any] = {}

    def split(value: dict, path: str) -> dict:
        kept = {}
        for k, v in value.items():
            if "/" in str(k):
                raise TrainingError(f"optimizer state key {k!r} contains '/': cannot be checkpointed")
            if isinstance(v, torch.Tensor):
                # a copy of its own: bitsandbytes shares one quantisation map (qmap) between parameters,
                # and safetensors refuses tensors that share memory
                tensors[f"{path}/{k}"] = v.detach().cpu().clone().contiguous()
            elif isinstance(v, dict):
                kept[str(k)] = split(v, f"{path}/{k}")
            else:
                kept[str(k)] = v
        return kept

    small = {"param_groups": state["param_groups"],
             "state": {str(pid): split(entries, str(pid)) for pid, entries in state["state"].items()}}
    return tensors, small


def _unflatten_optimizer(tensors: dict[str, Any], small: dict[str, Any]) -> dict:
    """The state dict ``_flatten_optimizer`` split, whole again (nested tensors back in place)."""
    import copy

    state: dict[int, dict] = {int(pid): copy.deepcopy(v) for pid, v in small["state"].items()}
    for key, t in tensors.items():
        pid, *parents, leaf = key.split("/")
        node = state.setdefault(int(pid), {})
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = t
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in small["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_state(run: LoraRun) -> dict[str, Any]:
    import torch

    out = {"generator": run.generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def _save_checkpoint(ctx: TrainContext, run: LoraRun) -> Path:
    import torch
    from safetensors.torch import save_file

    final = run.ckpt_root / f"step-{run.step:06d}"
    tmp = run.ckpt_root / f".step-{run.step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: p.detach().float().contiguous().cpu() for k, p in _trainable(ctx).items()}, str(tmp / "lora.safetensors"))
    opt_tensors, opt_small = _flatten_optimizer(run.optimizer.state_dict())
    save_file(opt_tensors or {"_empty": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
    save_file(_rng_state(run), str(tmp / "rng.safetensors"))
    scaler = getattr(ctx.accelerator, "scaler", None)
    state = {
        "cache_key": ctx.key,
        "run": run.name,
        "step": run.step,
        "total": run.total,
        "micro_batch": run.micro_batch,
        "losses": run.losses,
        "skipped": run.skipped,
        "oom_events": run.oom_events,
        "optimizer": opt_small,
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "data_order": "epoch e uses torch.randperm(n, Generator().manual_seed(seed * 1000003 + e))",
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in _checkpoints(run.ckpt_root)[: -ctx.runtime.checkpoints_keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _json_default(o):
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.item() if o.numel() == 1 else o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot store {type(o).__name__} in a checkpoint's JSON")


def _checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file())


CHECKPOINT_FILES = ("lora.safetensors", "optimizer.safetensors", "rng.safetensors")


def damage(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from (a file missing or cut short), else None."""
    from safetensors import safe_open

    try:
        state = json.loads((path / "state.json").read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"state.json unreadable ({type(err).__name__}: {err})"
    for name in CHECKPOINT_FILES:
        try:
            with safe_open(str(path / name), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)  # the header names every tensor; reading its slice checks the bytes are there
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            return f"{name} unreadable ({str(err).strip()[:120]})"
    return None


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint that can be resumed from; damaged newer ones are named in the log."""
    for ckpt in reversed(_checkpoints(root)):
        why = damage(ckpt)
        if why is None:
            return ckpt
        LOG.warning("checkpoint %s is damaged (%s): trying the one before it", ckpt, why)
    return None


def _load_checkpoint(ctx: TrainContext, run: LoraRun, path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    if state.get("cache_key") != ctx.key:
        raise TrainingError(
            f"checkpoint {path} belongs to a different training (other inputs or config); "
            "start fresh (no resume) or use a new run_id"
        )
    params = _trainable(ctx)
    saved = load_file(str(path / "lora.safetensors"))
    if set(saved) != set(params):
        raise TrainingError(f"checkpoint {path} does not match this model's LoRA parameters")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k].to(p.device, p.dtype))
    opt_tensors = {k: v for k, v in load_file(str(path / "optimizer.safetensors")).items() if k != "_empty"}
    run.optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state["optimizer"]))
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    scaler = getattr(ctx.accelerator, "scaler", None)
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    rng = load_file(str(path / "rng.safetensors"))
    run.generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    run.step = int(state["step"])
    run.micro_batch = int(state["micro_batch"])
    run.losses = [tuple(x) for x in state["losses"]]
    run.skipped = list(state["skipped"])
    run.oom_events = list(state["oom_events"])
    LOG.info("resumed %s from %s (step %d of %d)", run.name, path, run.step, run.total)


def resume_point(root: Path, resume: str) -> tuple[Path | None, str | None]:
    """The checkpoint to resume from (``"latest"`` or a folder) and, when the newest one was damaged
    and an older one is used, a sentence saying so. A damaged folder named explicitly is an error."""
    if resume != "latest":
        ckpt = Path(resume)
        if not (ckpt / "state.json").is_file():
            raise TrainingError(f"resume checkpoint {ckpt} not found (or incomplete)")
        why = damage(ckpt)
        if why is not None:
            raise TrainingError(f"resume checkpoint {ckpt} is damaged: {why}; resume from 'latest' or another checkpoint")
        return ckpt, None
    found = _checkpoints(root)
    ckpt = latest_checkpoint(root)
    if ckpt is not None and ckpt != found[-1]:
        return ckpt, f"the newest checkpoint {found[-1].name} is damaged: resumed from {ckpt.name} instead"
    return ckpt, None
