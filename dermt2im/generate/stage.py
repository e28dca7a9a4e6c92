"""Synthetic dermoscopy generation: plan -> shards rendered in batches -> PNGs + synthetic.parquet.

* The plan (``dermt2im.generate.plan``) fixes every sample before anything is rendered.
* One pipeline per worker process, cached here, with the LoRA fused at its scale; switching
  sampler swaps ``pipe.scheduler`` for a cached instance (``dermt2im.generate.samplers``), never reloads.
* A shard renders in batches of ``generate.batch_size`` rows sharing (sampler, steps, size, CFG,
  LoRA scale), one CPU ``torch.Generator`` per image, so an image does not depend on its batch.
* PNG encoding and writing run in ``generate.writer_threads`` threads while the next batch renders;
  every file is written atomically with its generation parameters in tEXt chunks; the rows are
  recorded after every batch (``manifest.record_rows``: an upsert under a file lock locally, an
  appended part on an object store, folded in by ``generate`` / the generate flow at the end).
* ``render_shard`` is idempotent: rows whose PNG exists with the recorded sha256 and render key are
  skipped; a PNG written before a crash but never recorded is adopted when its embedded render key
  matches; everything else is rendered again.
* ``generate.image_store`` (optional) puts the PNGs on any fsspec filesystem (``s3://bucket/prefix``,
  ...) as ``<store>/<label>/<sample_key>.png``, the URL in the manifest's ``path``; ``storage.manifests``
  moves the manifests likewise. The workdir (config, leases, LoRA weights) stays on a POSIX filesystem.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import platform
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermt2im import __version__

from dermt2im.core import storage
from dermt2im.core.config import LABELS, FactoryConfig
from dermt2im.core.fileio import atomic_write_bytes, sha256_bytes, sha256_file
from dermt2im.core.imaging import encode_png
from dermt2im.core.manifest import PLAN, SYNTHETIC, compact, read_manifest, record_rows, writer_lock
from dermt2im.generate.plan import build_plan, shards_of, update_plan  # noqa: F401  (re-exported)
from dermt2im.generate.samplers import SAMPLERS, SamplerSwitch, UnknownSamplerError  # noqa: F401  (re-exported)
from dermt2im.core.workdir import Workdir

log = logging.getLogger(__name__)

__all__ = [
    "SAMPLERS",
    "GenerateReport",
    "GenerationError",
    "build_plan",
    "update_plan",
    "generate",
    "render_shard",
    "resolve_lora",
    "shard_cache_key_parts",
    "shard_missing",
]

# What a rendered image's pixels depend on (besides the base model, the LoRA and the software stack).
RENDER_COLUMNS = (
    "label",
    "prompt",
    "negative_prompt",
    "sampler",
    "steps",
    "guidance_scale",
    "lora_scale",
    "seed",
    "width",
    "height",
)
GROUP_COLUMNS = ("sampler", "steps", "width", "height", "guidance_scale", "lora_scale", "label")
PNG_KEY = "dermt2im"
A1111_SAMPLER_NAMES = {"euler": "Euler", "euler_a": "Euler a", "plms": "PLMS", "ddim": "DDIM", "dpmpp_2m": "DPM++ 2M"}


class GenerationError(RuntimeError):
    """Generation cannot proceed (no plan rows, unusable LoRA, ...), worded for the user."""


@dataclass(frozen=True)
class GenerateReport:
    plan_path: Path
    manifest_path: Path
    planned: int
    rendered: int
    skipped: int
    seconds: float
    lora: str | None = None
    shards: tuple[int, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        rate = f", {self.rendered / self.seconds:.2f} images/s" if self.rendered and self.seconds > 0 else ""
        return (
            f"generate: {self.planned} planned in {len(self.shards)} shard(s), {self.rendered} rendered, "
            f"{self.skipped} already done ({self.seconds:.1f} s{rate})\n"
            f"  LoRA: {self.lora or 'none (base model)'}\n"
            f"  plan: {self.plan_path}\n  manifest: {self.manifest_path}"
        )


# ---------------------------------------------------------------------------------------------
# small helpers


def image_root(workdir: Workdir, cfg: FactoryConfig | None = None) -> Path | str:
    """Where rendered PNGs go: ``generate.image_store`` (a URL, or a local folder relative to the
    workdir) when set, else W/synthetic."""
    store = cfg.generate.image_store if cfg is not None else None
    if not store:
        return workdir.synthetic
    return storage.resolve(store, workdir.root) if not storage.is_remote(store) else store


def png_path(workdir: Workdir, label: str, key: str, cfg: FactoryConfig | None = None) -> Path | str:
    """A PNG's location: a ``Path`` on the local filesystem, a ``str`` URL on an fsspec image store."""
    if cfg is None or not cfg.generate.image_store:
        return workdir.synthetic / label / f"{key}.png"
    return storage.join(image_root(workdir, cfg), label, f"{key}.png")


@functools.lru_cache(maxsize=1)
def library_versions() -> str:
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "dermt2im": __version__, "torch": torch.__version__}
    for pkg in ("diffusers", "transformers", "peft", "numpy", "pillow", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    return json.dumps(out, sort_keys=True)


def _base_identity(cfg: FactoryConfig) -> str:
    from dermt2im.diffusion.models import base_model_identity

    return base_model_identity(cfg.train.base_model, cfg.train.revision)


def render_key(row: dict | pd.Series, base_identity: str, lora_sha256: str | None) -> str:
    payload = {c: _plain(row[c]) for c in RENDER_COLUMNS}
    payload["base_model"] = base_identity
    payload["lora_sha256"] = lora_sha256 or ""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _resolve_dtype(pref: str, device: str):
    import torch

    if pref == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[pref]


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# LoRA resolution


def find_latest_lora(workdir: Workdir) -> Path | None:
    """The newest finished LoRA run in W/lora (a folder with lora.json or diffusers weights)."""
    from dermt2im.diffusion.lora_files import DIFFUSERS_WEIGHTS, RUN_META

    root = workdir.root / "lora"
    if not root.is_dir():
        return None
    runs = []
    for d in root.iterdir():
        if not d.is_dir() or d.name.startswith("."):
            continue
        marker = d / RUN_META if (d / RUN_META).is_file() else d / DIFFUSERS_WEIGHTS
        if marker.is_file():
            runs.append((marker.stat().st_mtime_ns, d.name, d))
    return max(runs)[2] if runs else None


def resolve_lora(workdir: Workdir, lora: Path | str | None) -> Path | None:
    if lora is not None:
        p = Path(lora).expanduser()
        if not p.exists():
            raise GenerationError(f"LoRA {p} not found")
        return p.resolve()
    latest = find_latest_lora(workdir)
    if latest is None:
        log.warning("no LoRA given and none found in %s: rendering with the base model alone", workdir.root / "lora")
    else:
        log.info("using the newest LoRA run %s", latest)
    return latest


@dataclass(frozen=True)
class LoraChoice:
    weights: Path | None
    sha256: str | None


@functools.lru_cache(maxsize=64)
def _sha_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def lora_for_label(lora: Path | None, label: str) -> LoraChoice:
    if lora is None:
        return LoraChoice(None, None)
    from dermt2im.diffusion.lora_files import LoraError, lora_weights_for

    try:
        weights = lora_weights_for(lora, label).resolve()
    except LoraError as err:
        raise GenerationError(str(err)) from None
    st = weights.stat()
    return LoraChoice(weights, _sha_cached(str(weights), st.st_size, st.st_mtime_ns))


# ---------------------------------------------------------------------------------------------
# pipelines: one per worker process


@dataclass
class Prepared:
    pipe: Any
    switch: SamplerSwitch
    lora_sha256: str | None
    lora_scale: float | None
    lock: threading.Lock = field(default_factory=threading.Lock)


_CACHE: dict[tuple, Prepared] = {}
_CACHE_LOCK = threading.Lock()
_PASSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipelines passed in -> their state


def _fuse(pipe, lora: LoraChoice, scale: float) -> None:
    from dermt2im.diffusion.lora_files import load_lora

    load_lora(pipe, lora.weights, scale, fuse=True)
    log.info("fused LoRA %s (sha256 %s) at scale %g", lora.weights, (lora.sha256 or "")[:12], scale)


def _lora_state(sha256: str | None, scale: float | None) -> tuple:
    return (sha256, scale) if sha256 else (None, None)


def prepared_pipeline(cfg: FactoryConfig, lora: LoraChoice, scale: float, *, pipe=None) -> Prepared:
    """The pipeline to render with, LoRA fused at ``scale``.

    Without ``pipe``, a per-process cache holds one pipeline: asking for another LoRA (per-class
    LoRAs) or scale loads a fresh base model rather than unfusing, because unfusing in fp16 does not
    restore the base weights bit for bit. A ``pipe`` passed in (tests, benchmarks) is treated as the
    base model named in the config; the LoRA is fused into it once.
    """
    scale = float(scale)
    if pipe is not None:
        with _CACHE_LOCK:
            prep = _PASSED.get(pipe)
            if prep is None:
                prep = Prepared(pipe, SamplerSwitch(pipe), None, None)
                _PASSED[pipe] = prep
        if _lora_state(prep.lora_sha256, prep.lora_scale) != _lora_state(lora.sha256, scale):
            if prep.lora_sha256 is not None:
                log.warning("replacing the LoRA fused into the given pipeline (unfuse is not bit-exact)")
                from dermt2im.diffusion.lora_files import unload_lora

                unload_lora(pipe)
            if lora.weights is not None:
                _fuse(pipe, lora, scale)
            prep.lora_sha256, prep.lora_scale = lora.sha256, scale
        return prep

    from dermt2im.diffusion.models import load_pipeline, resolve_device

    device = resolve_device(cfg.generate.device)
    dtype = _resolve_dtype(cfg.generate.dtype, device)
    key = (_base_identity(cfg), cfg.train.revision, device, str(dtype), *_lora_state(lora.sha256, scale))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        if _CACHE:
            log.info("releasing the cached pipeline to load %s", key)
            _CACHE.clear()
            gc.collect()
            _empty_cuda_cache()
        t0 = time.perf_counter()
        import torch

        # fp32 is every loader's default: passing it would only make diffusers warn about casting
        torch_dtype = None if dtype == torch.float32 else dtype
        base = load_pipeline(cfg.train.base_model, cfg.train.revision, torch_dtype=torch_dtype, device=device)
        base.set_progress_bar_config(disable=True)
        if lora.weights is not None:
            _fuse(base, lora, scale)
        log.info("loaded %s on %s (%s) in %.1f s", cfg.train.base_model, device, _dtype_name(dtype),
                 time.perf_counter() - t0)
        prep = Prepared(base, SamplerSwitch(base), lora.sha256, scale)
        _CACHE[key] = prep
        return prep


def clear_pipeline_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
    gc.collect()
    _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


# ---------------------------------------------------------------------------------------------
# rendering


def render_batch(pipe, switch: SamplerSwitch, rows: list[dict]) -> list[np.ndarray]:
    """Render rows that share GROUP_COLUMNS in one pipeline call, one generator per image."""
    import torch

    first = rows[0]
    for r in rows[1:]:
        for c in GROUP_COLUMNS:
            if r[c] != first[c]:
                raise ValueError(f"rows in one batch must share {c}: {r[c]!r} != {first[c]!r}")
    switch.use(first["sampler"])
    generators = [torch.Generator("cpu").manual_seed(int(r["seed"])) for r in rows]
    out = pipe(
        prompt=[r["prompt"] for r in rows],
        negative_prompt=[r["negative_prompt"] or "" for r in rows],
        num_inference_steps=int(first["steps"]),
        guidance_scale=float(first["guidance_scale"]),
        height=int(first["height"]),
        width=int(first["width"]),
        generator=generators,
        output_type="np",
    )
    images = np.asarray(out.images)
    return list((images * 255.0).round().clip(0, 255).astype(np.uint8))


def png_text(row: dict) -> dict[str, str]:
    """tEXt chunks: the generation parameters (A1111-style ``parameters`` and full JSON), nothing else."""
    params = (
        f"{row['prompt']}\nNegative prompt: {row['negative_prompt'] or ''}\n"
        f"Steps: {row['steps']}, Sampler: {A1111_SAMPLER_NAMES.get(row['sampler'], row['sampler'])}, "
        f"CFG scale: {row['guidance_scale']:g}, Seed: {row['seed']}, Size: {row['width']}x{row['height']}, "
        f"Model: {row['base_model']}"
    )
    if row.get("lora_sha256"):
        params += f", Lora hashes: \"dermt2im: {row['lora_sha256'][:12]}\", Lora weight: {row['lora_scale']:g}"
    params += f", Version: dermt2im {__version__}"
    meta = {c: _plain(row[c]) for c in RENDER_COLUMNS}
    meta.update(
        sample_key=row["sample_key"],
        base_model=row["base_model"],
        base_revision=row.get("base_revision"),
        lora_sha256=row.get("lora_sha256"),
        render_key=row["render_key"],
        dtype=row.get("dtype"),
        library_versions=json.loads(row["library_versions"]),
    )
    return {"parameters": params, PNG_KEY: json.dumps(meta, sort_keys=True), "Software": f"dermt2im {__version__}"}


def _write_png(target: Path | str, data: bytes) -> Path | str:
    if storage.is_remote(target):
        return storage.atomic_put_bytes(target, data)  # one put of the whole object
    return atomic_write_bytes(target, data)


def _encode_and_write(row: dict, rgb: np.ndarray) -> dict:
    data = encode_png(rgb, png_text(row))
    path = row["path"]
    _write_png(path if storage.is_remote(path) else Path(path), data)
    return {**row, "sha256": sha256_bytes(data)}


def _embedded_render_key(path: Path | str) -> str | None:
    try:
        import io

        from PIL import Image

        src = io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path
        with Image.open(src) as im:
            return json.loads(im.text.get(PNG_KEY, "{}")).get("render_key")
    except Exception:  # noqa: BLE001 - unreadable: not adoptable
        return None


def _remove_own_temporaries(rows: pd.DataFrame, workdir: Workdir, cfg: FactoryConfig | None = None) -> int:
    root = image_root(workdir, cfg)
    if storage.is_remote(root):
        return 0  # remote writes are single puts: they leave no temporaries
    n = 0
    for label, key in zip(rows["label"], rows["sample_key"]):
        for tmp in (Path(root) / label).glob(f".{key}.png.*.tmp"):
            tmp.unlink(missing_ok=True)
            n += 1
    return n


def _shard_rows(workdir: Workdir, shard: int, plan: pd.DataFrame | None = None) -> pd.DataFrame:
    plan = read_manifest(workdir.plan_manifest, PLAN) if plan is None else plan
    if plan.empty:
        raise GenerationError(f"no plan at {workdir.plan_manifest}: plan first (dermt2im generate)")
    rows = plan[plan["shard"] == shard]
    if rows.empty:
        raise GenerationError(f"shard {shard} is not in the plan (shards: {shards_of(plan)[:20]}...)")
    return rows.reset_index(drop=True)


@dataclass(frozen=True)
class ShardState:
    todo: list[dict]  # rows to render (manifest rows without sha256)
    adopt: list[dict]  # rows whose PNG exists from an interrupted run: record without rendering
    done: int


def _expected_rows(workdir: Workdir, cfg: FactoryConfig, rows: pd.DataFrame, lora: Path | None) -> list[dict]:
    base = _base_identity(cfg)
    versions = library_versions()
    out = []
    choices: dict[str, LoraChoice] = {}
    for rec in rows.to_dict("records"):
        label = rec["label"]
        if label not in choices:
            choices[label] = lora_for_label(lora, label)
        choice = choices[label]
        rec = {k: _plain(v) for k, v in rec.items()}
        rec.update(
            path=str(png_path(workdir, label, rec["sample_key"], cfg)),
            base_model=base,
            base_revision=cfg.train.revision,
            lora_path=str(choice.weights) if choice.weights else None,
            lora_sha256=choice.sha256,
            library_versions=versions,
            status="rendered",
            reason=None,
        )
        rec["render_key"] = render_key(rec, base, choice.sha256)
        out.append(rec)
    return out


def shard_state(workdir: Workdir, cfg: FactoryConfig, shard: int, lora: Path | None, *, verify: bool = True) -> ShardState:
    rows = _shard_rows(workdir, shard)
    expected = _expected_rows(workdir, cfg, rows, lora)
    manifest = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
    recorded = manifest.set_index("sample_key") if not manifest.empty else None
    todo, adopt, done = [], [], 0
    for rec in expected:
        path = rec["path"] if storage.is_remote(rec["path"]) else Path(rec["path"])
        have = None
        if recorded is not None and rec["sample_key"] in recorded.index:
            have = recorded.loc[rec["sample_key"]]
        if have is not None and have["render_key"] == rec["render_key"] and isinstance(have["sha256"], str):
            if storage.is_file(path) and (not verify or storage.sha256(path) == have["sha256"]):
                done += 1
                continue
        if storage.is_file(path) and _embedded_render_key(path) == rec["render_key"]:
            adopt.append({**rec, "sha256": storage.sha256(path)})
            continue
        todo.append(rec)
    return ShardState(todo, adopt, done)


def shard_complete(workdir: Workdir, cfg: FactoryConfig, shard: int, lora: Path | None, *,
                   plan: pd.DataFrame | None = None, recorded: pd.DataFrame | None = None) -> bool:
    """Every image of the shard is recorded with its current render key *and* its file exists (an
    unrecorded PNG still needs adopting: not complete).

    ``plan`` / ``recorded`` are snapshots of the two manifests, so that one poll over many shards
    reads each once. Records are checked before files: an unfinished shard costs no file lookups,
    which matters when the images sit in an object store.
    """
    expected = _expected_rows(workdir, cfg, _shard_rows(workdir, shard, plan), lora)
    recorded = read_manifest(workdir.synthetic_manifest, SYNTHETIC) if recorded is None else recorded
    have = recorded.drop_duplicates("sample_key", keep="last").set_index("sample_key")
    for rec in expected:
        key = rec["sample_key"]
        if key not in have.index or have.at[key, "render_key"] != rec["render_key"]:
            return False
        if not isinstance(have.at[key, "sha256"], str):
            return False
    return all(storage.is_file(rec["path"]) for rec in expected)


def shard_missing(workdir: Workdir, cfg: FactoryConfig, shard: int, lora: Path | None) -> int:
    """How many of the shard's images are not on disk and recorded (cheap: no hashing of files)."""
    return len(shard_state(workdir, cfg, shard, lora, verify=False).todo)


def shard_cache_key_parts(workdir: Workdir, cfg: FactoryConfig, shard: int, lora: Path | None) -> dict:
    """Content that determines a shard's output: its plan rows' render keys, base model and LoRA."""
    rows = _shard_rows(workdir, shard)
    expected = _expected_rows(workdir, cfg, rows, lora)
    parts = {
        "workdir": str(workdir.root),
        "shard": int(shard),
        "render_keys": [r["render_key"] for r in expected],
        "base_model": expected[0]["base_model"],
        "lora_sha256": sorted({r["lora_sha256"] or "" for r in expected}),
        "dtype": cfg.generate.dtype,
    }
    if cfg.generate.image_store:  # only when set: the default keeps its earlier cache keys
        parts["image_store"] = str(image_root(workdir, cfg))
    if workdir.manifest_store:  # likewise for storage.manifests
        parts["manifests"] = str(workdir.manifests)
    return parts


def _batches(rows: list[dict], batch_size: int) -> list[list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["label"], r["index"])):
        groups.setdefault(tuple(r[c] for c in GROUP_COLUMNS), []).append(r)
    out = []
    for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        g = groups[key]
        out += [g[i : i + batch_size] for i in range(0, len(g), batch_size)]
    return out


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        return isinstance(exc, torch.cuda.OutOfMemoryError)
    except AttributeError:  # pragma: no cover
        return False


def render_shard(workdir: Workdir, cfg: FactoryConfig, shard: int, *, lora: Path | None, pipe=None) -> list[dict]:
    """Render the shard's missing images; returns the manifest rows recorded by this call.

    ``lora`` is a run folder or weights file (``None``: base model only; resolve the newest run with
    ``resolve_lora`` first). ``pipe`` optionally supplies the base pipeline (tests, benchmarks).
    """
    rows = _shard_rows(workdir, shard)
    removed = _remove_own_temporaries(rows, workdir, cfg)
    if removed:
        log.info("shard %d: removed %d temporary file(s) left by an interrupted run", shard, removed)
    state = shard_state(workdir, cfg, shard, lora)
    recorded: list[dict] = []
    if state.adopt:
        record_rows(workdir.synthetic_manifest, pd.DataFrame(state.adopt), SYNTHETIC)
        recorded += state.adopt
        log.info("shard %d: recorded %d image(s) written before an interruption", shard, len(state.adopt))
    if not state.todo:
        log.info("shard %d: nothing to render (%d done)", shard, state.done + len(state.adopt))
        return recorded

    import torch

    from dermt2im.diffusion.models import resolve_device

    if pipe is not None:
        dtype_name, device_name = _dtype_name(pipe.dtype), str(pipe.device)
    else:
        device_name = resolve_device(cfg.generate.device)
        dtype_name = _dtype_name(_resolve_dtype(cfg.generate.dtype, device_name))
    if device_name.startswith("cuda") and torch.cuda.is_available():
        device_name = f"{device_name} ({torch.cuda.get_device_name()})"
    for r in state.todo:
        r.update(dtype=dtype_name, device=device_name)

    t0 = time.perf_counter()
    batch_size = cfg.generate.batch_size
    queue = _batches(state.todo, batch_size)
    pending: list[list[Future]] = []
    error: BaseException | None = None

    def harvest(max_pending: int) -> None:
        """Record finished batches in order; wait while more than ``max_pending`` are in flight."""
        nonlocal error
        while pending and (len(pending) > max_pending or all(f.done() for f in pending[0])):
            futures = pending.pop(0)
            ok = []
            for f in futures:
                try:
                    ok.append(f.result())
                except BaseException as exc:  # noqa: BLE001 - re-raised after recording the rest
                    error = error or exc
            if ok:
                record_rows(workdir.synthetic_manifest, pd.DataFrame(ok), SYNTHETIC)
                recorded.extend(ok)

    with ThreadPoolExecutor(max_workers=cfg.generate.writer_threads, thread_name_prefix="png-writer") as writers:
        try:
            while queue and error is None:
                batch = queue.pop(0)
                choice = LoraChoice(Path(batch[0]["lora_path"]) if batch[0]["lora_path"] else None, batch[0]["lora_sha256"])
                prep = prepared_pipeline(cfg, choice, batch[0]["lora_scale"], pipe=pipe)
                try:
                    with prep.lock:
                        images = render_batch(prep.pipe, prep.switch, batch)
                except BaseException as exc:
                    if _is_oom(exc) and len(batch) > 1:
                        half = len(batch) // 2
                        log.warning("CUDA out of memory with %d images: retrying as %d + %d", len(batch), half,
                                    len(batch) - half)
                        _empty_cuda_cache()
                        queue[:0] = [batch[:half], batch[half:]]
                        continue
                    raise
                pending.append([writers.submit(_encode_and_write, r, img) for r, img in zip(batch, images)])
                harvest(max_pending=2)  # bounded memory: at most two batches waiting on the writers
        except BaseException as exc:
            error = error or exc
        finally:
            harvest(max_pending=0)
    if error is not None:
        log.error("shard %d interrupted after %d image(s): %s", shard, len(recorded), error)
        raise error
    seconds = time.perf_counter() - t0
    n = len(recorded) - len(state.adopt)
    log.info("shard %d: rendered %d image(s) in %.1f s (%.2f images/s)", shard, n, seconds, n / max(seconds, 1e-9))
    return recorded


# ---------------------------------------------------------------------------------------------
# the whole stage


def generate(
    workdir: Workdir,
    cfg: FactoryConfig,
    *,
    lora: Path | None = None,
    per_class: int | None = None,
    shards: list[int] | None = None,
) -> GenerateReport:
    """Plan (create or extend), then render every shard (or the given ones) that is not complete."""
    t0 = time.perf_counter()
    with writer_lock(workdir.plan_manifest, workdir.locks):
        plan = update_plan(workdir.plan_manifest, cfg.generate, token=cfg.train.instance_token, per_class=per_class)
    all_shards = shards_of(plan)
    chosen = all_shards if not shards else sorted({int(s) for s in shards})
    unknown = sorted(set(chosen) - set(all_shards))
    if unknown:
        raise GenerationError(f"shard(s) {unknown} not in the plan (0..{max(all_shards)})")
    lora_root = resolve_lora(workdir, lora)
    planned = int(plan["shard"].isin(chosen).sum())
    rendered = 0
    # shards of one class together: with per-class LoRAs the fused pipeline changes once per run
    for shard in sorted(chosen, key=lambda s: (s % len(LABELS), s)):
        recorded = render_shard(workdir, cfg, shard, lora=lora_root)
        rendered += len(recorded)
    compact(workdir.synthetic_manifest, SYNTHETIC, workdir.locks)  # parts appended on an object store, folded in
    return GenerateReport(
        plan_path=workdir.plan_manifest,
        manifest_path=workdir.synthetic_manifest,
        planned=planned,
        rendered=rendered,
        skipped=planned - rendered,
        seconds=time.perf_counter() - t0,
        lora=str(lora_root) if lora_root else None,
        shards=tuple(chosen),
    )
