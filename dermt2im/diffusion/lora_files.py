"""Save, load and convert LoRA weights.

A training run writes ``W/lora/<run_id>/`` holding ``lora.json`` and either one shared LoRA
(``layout: shared``, weights ``{"all": ...}``) or one per class in ``benign/`` and ``malignant/``
(``layout: per_class``). Each LoRA is written twice:

* ``pytorch_lora_weights.safetensors``: diffusers / PEFT keys (``unet.<module>.lora_A.weight``),
  loadable by vanilla ``StableDiffusionPipeline.load_lora_weights``; diffusers' own
  ``lora_adapter_metadata`` header entry carries rank and alpha so the loader scales correctly;
* ``dermt2im_lora_kohya.safetensors``: kohya / AUTOMATIC1111 / ComfyUI keys
  (``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``).

Both carry the run's metadata in the safetensors header (``dermt2im`` entry, JSON) and in
``lora.json``, with the sha256 of every weights file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dermt2im.core.errors import DermT2imError
from dermt2im.core.fileio import atomic_write_bytes, atomic_write_text

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "dermt2im_lora_kohya.safetensors"
RUN_META = "lora.json"
HEADER_KEY = "dermt2im"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
DEFAULT_ADAPTER = "dermt2im"

_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


class LoraError(DermT2imError, ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# locating weights


def read_run_meta(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_META
    if not path.is_file():
        raise LoraError(f"{run_dir} has no {RUN_META}: not a finished LoRA run folder")
    return json.loads(path.read_text())


def lora_weights_for(lora: str | Path, label: str) -> Path:
    """The diffusers-format weights file to use for ``label``: a .safetensors file is used as is; a
    run folder is resolved through its lora.json (per-class entry first, then the shared ``all``)."""
    lora = Path(lora)
    if lora.is_file():
        if lora.suffix != ".safetensors":
            raise LoraError(f"LoRA file {lora} is not .safetensors")
        return lora
    if not lora.is_dir():
        raise LoraError(f"LoRA {lora} not found")
    if not (lora / RUN_META).is_file():
        if (lora / DIFFUSERS_WEIGHTS).is_file():
            return lora / DIFFUSERS_WEIGHTS
        if (lora / label / DIFFUSERS_WEIGHTS).is_file():
            return lora / label / DIFFUSERS_WEIGHTS
        raise LoraError(f"{lora} holds neither {RUN_META} nor {DIFFUSERS_WEIGHTS}")
    weights = read_run_meta(lora).get("weights", {})
    rel = weights.get(label, weights.get("all"))
    if rel is None:
        raise LoraError(f"LoRA run {lora} has no weights for class {label!r} (has {sorted(weights)})")
    path = lora / rel
    if not path.is_file():
        raise LoraError(f"LoRA run {lora}: {path} is listed in {RUN_META} but missing")
    return path


def read_header(weights: str | Path) -> dict[str, str]:
    """The safetensors ``__metadata__`` of a weights file (strings), read without importing torch."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="numpy") as f:
        return dict(f.metadata() or {})


def read_dermt2im_metadata(weights: str | Path) -> dict[str, Any]:
    raw = read_header(weights).get(HEADER_KEY)
    return json.loads(raw) if raw else {}


# ---------------------------------------------------------------------------------------------
# loading into a pipeline


def load_lora(pipe, weights: str | Path, scale: float, *, fuse: bool = True, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Load a LoRA (diffusers or kohya keys) into ``pipe.unet`` and, when the file has text-encoder
    weights, ``pipe.text_encoder``.

    ``fuse=True`` merges it at ``scale`` (W = W0 + scale * dW, dW including alpha / rank), so
    inference costs nothing extra; ``fuse=False`` keeps it as an adapter weighted by ``scale``. Any
    adapter already loaded under ``adapter_name`` is removed (and unfused) first; see ``unload_lora``.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise LoraError(f"LoRA weights {weights} not found")
    if weights.suffix != ".safetensors":
        raise LoraError(f"LoRA weights {weights} are not .safetensors")
    if adapter_name in _adapters(pipe):
        unload_lora(pipe, adapter_name)
    pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name=adapter_name)
    if fuse:
        pipe.fuse_lora(lora_scale=float(scale), adapter_names=[adapter_name])
    else:
        pipe.set_adapters([adapter_name], adapter_weights=[float(scale)])


def _adapters(pipe) -> set[str]:
    try:
        listed = pipe.get_list_adapters()
    except Exception:  # no PEFT layers at all
        return set()
    return {name for names in listed.values() for name in names}


def unload_lora(pipe, adapter_name: str | None = None) -> None:
    """Unfuse and remove one adapter (or all), restoring the base weights."""
    if not _adapters(pipe):
        return
    pipe.unfuse_lora()
    if adapter_name is None:
        pipe.unload_lora_weights()
    else:
        pipe.delete_adapters([adapter_name])


# ---------------------------------------------------------------------------------------------
# formats


def to_diffusers(state_dicts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{"unet": peft_state_dict, "text_encoder": ...}`` (keys from ``get_peft_model_state_dict``)
    -> one flat dict with ``unet.`` / ``text_encoder.`` prefixes, as diffusers saves it."""
    out: dict[str, Any] = {}
    for component, sd in state_dicts.items():
        if not sd:
            continue
        if component not in _PREFIXES:
            raise LoraError(f"unknown LoRA component {component!r}")
        for k, v in sd.items():
            if ".lora_A." not in k and ".lora_B." not in k:
                raise LoraError(f"{component} key {k!r} is not a PEFT LoRA key (lora_A / lora_B)")
            out[f"{component}.{k}"] = v.detach().contiguous()
    return out


def _alpha_for(alpha: float | Mapping[str, float], component: str, module: str) -> float:
    if isinstance(alpha, Mapping):
        for key in (f"{component}.{module}", module, component):
            if key in alpha:
                return float(alpha[key])
        raise LoraError(f"no alpha for {component}.{module}")
    return float(alpha)


def to_kohya(diffusers_state_dict: Mapping[str, Any], alpha: float | Mapping[str, float]) -> dict[str, Any]:
    """Diffusers/PEFT LoRA keys -> kohya keys with a ``.alpha`` per module.

    ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`` becomes
    ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`` (and
    ``lora_B`` -> ``lora_up``); text-encoder modules get ``lora_te_``. ``alpha`` is the LoRA alpha
    (a number, or a mapping per module / component), so kohya's scale alpha / rank equals PEFT's.
    """
    import torch

    out: dict[str, Any] = {}
    for key, tensor in diffusers_state_dict.items():
        component, _, rest = key.partition(".")
        if component not in _PREFIXES:
            raise LoraError(f"key {key!r} has no unet. / text_encoder. prefix")
        for peft_part, kohya_part in ((".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight")):
            if rest.endswith(peft_part):
                module = rest[: -len(peft_part)]
                break
        else:
            raise LoraError(f"key {key!r} is not a LoRA weight (lora_A / lora_B)")
        name = _PREFIXES[component] + module.replace(".", "_")
        out[f"{name}.{kohya_part}"] = tensor.detach().contiguous()
        if kohya_part == "lora_down.weight":
            out[f"{name}.alpha"] = torch.tensor(_alpha_for(alpha, component, module), dtype=torch.float32)
    return out


def adapter_metadata(diffusers_state_dict: Mapping[str, Any], rank: int, alpha: float) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata`` (LoraConfig kwargs per component, prefixed), so its loader
    uses our alpha rather than assuming alpha == rank."""
    meta: dict[str, Any] = {}
    for component in _PREFIXES:
        modules = sorted(
            {k[len(component) + 1 :].split(".lora_")[0] for k in diffusers_state_dict if k.startswith(component + ".")}
        )
        if not modules:
            continue
        cfg = {
            "r": int(rank),
            "lora_alpha": float(alpha),
            "target_modules": modules,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": False,
            "lora_bias": False,
        }
        meta.update({f"{component}.{k}": v for k, v in cfg.items()})
    return meta


def _header(extra: Mapping[str, str], metadata: Mapping[str, Any] | None) -> dict[str, str]:
    header = {"format": "pt", **{k: str(v) for k, v in extra.items()}}
    if metadata is not None:
        header[HEADER_KEY] = json.dumps(metadata, sort_keys=True, default=str)
    return header


def canonical_safetensors(data: bytes) -> bytes:
    """Re-serialise a safetensors header with sorted keys and no whitespace.

    safetensors writes ``__metadata__`` from a hash map whose order changes from call to call, so
    the same tensors and metadata can give different bytes (and sha256); this makes them stable.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    raw = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def save_safetensors(state_dict: Mapping[str, Any], path: str | Path, header: Mapping[str, str]) -> Path:
    """Write tensors with string metadata, atomically and byte-for-byte reproducibly."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, metadata=dict(header))
    return atomic_write_bytes(path, canonical_safetensors(data))


def save_lora_files(
    out_dir: str | Path,
    state_dicts: Mapping[str, Mapping[str, Any]],
    *,
    rank: int,
    alpha: float,
    metadata: Mapping[str, Any] | None = None,
    kohya: bool = True,
) -> dict[str, Path]:
    """Write ``pytorch_lora_weights.safetensors`` (and the kohya copy) into ``out_dir`` atomically.

    ``state_dicts`` maps component ("unet", "text_encoder") to a PEFT state dict
    (``get_peft_model_state_dict(model)``). Weights are stored in fp32. Returns
    ``{"diffusers": path, "kohya": path}``.
    """
    import torch

    out_dir = Path(out_dir)
    sd = {k: v.to(torch.float32) for k, v in to_diffusers(state_dicts).items()}
    if not sd:
        raise LoraError("nothing to save: the LoRA state dicts are empty")
    for k, v in sd.items():
        if not torch.isfinite(v).all():
            raise LoraError(f"refusing to save a LoRA with non-finite values in {k}")
    paths = {
        "diffusers": save_safetensors(
            sd,
            out_dir / DIFFUSERS_WEIGHTS,
            _header({ADAPTER_METADATA_KEY: json.dumps(adapter_metadata(sd, rank, alpha), indent=2, sort_keys=True)}, metadata),
        )
    }
    if kohya:
        has_te = any(k.startswith("text_encoder.") for k in sd)
        kohya_header = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha),
            "ss_base_model_version": "sd_v1",
            "ss_network_train_unet_only": str(not has_te),
            "modelspec.architecture": "stable-diffusion-v1/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": "dermt2im",
        }
        paths["kohya"] = save_safetensors(to_kohya(sd, alpha), out_dir / KOHYA_WEIGHTS, _header(kohya_header, metadata))
    return paths


def write_run_meta(run_dir: str | Path, meta: Mapping[str, Any]) -> Path:
    return atomic_write_text(Path(run_dir) / RUN_META, json.dumps(meta, indent=2, sort_keys=True, default=str))
