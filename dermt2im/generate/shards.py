"""Rendering one shard of the plan, idempotently.

A shard renders in batches of ``runtime.generate.batch_size`` rows sharing (sampler, steps, size,
CFG, LoRA scale, class). PNG encoding and writing run in ``writer_threads`` threads while the next
batch renders; every file is written atomically with its generation parameters in tEXt chunks; rows
are recorded after every batch (``manifest.record_rows``: an upsert under a file lock locally, an
appended part on an object store).

``render_shard`` may be run any number of times, and killed at any point: rows whose PNG exists with
the recorded sha256 and render key are skipped; a PNG written before a crash but never recorded is
adopted when its embedded render key matches; everything else is rendered again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dermt2im.core import identity, progress, storage
from dermt2im.core.fileio import atomic_write_bytes, sha256_bytes
from dermt2im.core.imaging import encode_png
from dermt2im.core.manifest import PLAN, SYNTHETIC, read_manifest
from dermt2im.core.runtime import GenerateRuntime
from dermt2im.core.workdir import Workdir
from dermt2im.core.writers import record_rows
from dermt2im.generate.model import GenerationError, LoraChoice, RenderModel
from dermt2im.generate.pipeline import (
    GROUP_COLUMNS,
    dtype_name,
    empty_cuda_cache,
    is_oom,
    prepared_pipeline,
    render_batch,
    resolve_dtype,
)
from dermt2im.generate.plan import shards_of
from dermt2im.generate.pngmeta import RENDER_COLUMNS, embedded_render_key, png_text

log = logging.getLogger(__name__)


def shard_rows(workdir: Workdir, shard: int, plan: pd.DataFrame | None = None) -> pd.DataFrame:
    plan = read_manifest(workdir.plan_manifest, PLAN) if plan is None else plan
    if plan.empty:
        raise GenerationError(f"no plan at {workdir.plan_manifest}: plan first (dermt2im generate)")
    rows = plan[plan["shard"] == shard]
    if rows.empty:
        raise GenerationError(f"shard {shard} is not in the plan (shards: {shards_of(plan)[:20]}...)")
    return rows.reset_index(drop=True)


def expected_rows(workdir: Workdir, model: RenderModel, rows: pd.DataFrame) -> list[dict]:
    """The manifest rows the shard's plan rows will have once rendered (without sha256)."""
    versions = identity.library_versions_json()
    code = identity.code_digest(__name__)
    choices: dict[str, LoraChoice] = {}
    out = []
    for rec in rows.to_dict("records"):
        label = rec["label"]
        choice = choices.get(label) or choices.setdefault(label, model.for_label(label))
        rec = {k: identity.plain(v) for k, v in rec.items()}
        rec.update(path=str(workdir.png_path(label, rec["sample_key"])), base_model=model.identity,
                   base_revision=model.revision, lora_path=str(choice.weights) if choice.weights else None,
                   lora_sha256=choice.sha256, library_versions=versions, status="rendered", reason=None,
                   base_model_only=model.lora is None)
        rec["render_key"] = identity.render_key({c: rec[c] for c in RENDER_COLUMNS}, model.identity, choice.sha256,
                                                code)
        out.append(rec)
    return out


@dataclass(frozen=True)
class ShardState:
    todo: list[dict]  # rows to render (manifest rows without sha256)
    adopt: list[dict]  # rows whose PNG exists from an interrupted run: record without rendering
    done: int


def shard_state(workdir: Workdir, model: RenderModel, shard: int, *, verify: bool = True) -> ShardState:
    expected = expected_rows(workdir, model, shard_rows(workdir, shard))
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
        if storage.is_file(path) and embedded_render_key(path) == rec["render_key"]:
            adopt.append({**rec, "sha256": storage.sha256(path)})
            continue
        todo.append(rec)
    return ShardState(todo, adopt, done)


def _shard_key(workdir: Workdir, render_keys: list[str]) -> str:
    return identity.content_key("render-shard", render_keys, str(workdir.images), str(workdir.manifests))


def expected_key(workdir: Workdir, model: RenderModel, shard: int, plan: pd.DataFrame | None = None) -> str:
    """The key a shard's output must have: the render key of every image it plans, and where the
    images and rows go."""
    return _shard_key(workdir, [r["render_key"] for r in expected_rows(workdir, model, shard_rows(workdir, shard, plan))])


def recorded_key(workdir: Workdir, shard: int, plan: pd.DataFrame | None = None,
                 recorded: pd.DataFrame | None = None) -> str | None:
    """The key of what is recorded for a shard: the render keys of its rows, when every image it plans
    is recorded with a sha256 and its file exists where the workdir puts it; None otherwise (an
    unrecorded PNG still needs adopting: not complete).

    ``plan`` / ``recorded`` are snapshots of the two manifests, so that one poll over many shards
    reads each once. Records are checked before files: an unfinished shard costs no file lookups,
    which matters when the images sit in an object store."""
    rows = shard_rows(workdir, shard, plan)
    recorded = read_manifest(workdir.synthetic_manifest, SYNTHETIC) if recorded is None else recorded
    have = recorded.drop_duplicates("sample_key", keep="last").set_index("sample_key")
    keys = []
    for key in rows["sample_key"]:
        if key not in have.index or not isinstance(have.at[key, "sha256"], str):
            return None
        keys.append(have.at[key, "render_key"])
    if not all(storage.is_file(workdir.png_path(label, key)) for label, key in zip(rows["label"], rows["sample_key"])):
        return None
    return _shard_key(workdir, keys)


def shard_complete(workdir: Workdir, model: RenderModel, shard: int, *,
                   plan: pd.DataFrame | None = None, recorded: pd.DataFrame | None = None) -> bool:
    """Every image of the shard is recorded with its current render key *and* its file exists."""
    return recorded_key(workdir, shard, plan, recorded) == expected_key(workdir, model, shard, plan)


def shard_missing(workdir: Workdir, model: RenderModel, shard: int) -> int:
    """How many of the shard's images are not on disk and recorded (cheap: no hashing of files)."""
    return len(shard_state(workdir, model, shard, verify=False).todo)


def write_png(target: Path | str, data: bytes) -> Path | str:
    if storage.is_remote(target):
        return storage.atomic_put_bytes(target, data)  # one put of the whole object
    return atomic_write_bytes(target, data)


def _encode_and_write(row: dict, rgb: np.ndarray) -> dict:
    data = encode_png(rgb, png_text(row))
    path = row["path"]
    write_png(path if storage.is_remote(path) else Path(path), data)
    return {**row, "sha256": sha256_bytes(data)}


def remove_own_temporaries(workdir: Workdir, rows: pd.DataFrame) -> int:
    root = workdir.images
    if storage.is_remote(root):
        return 0  # remote writes are single puts: they leave no temporaries
    n = 0
    for label, key in zip(rows["label"], rows["sample_key"]):
        for tmp in (Path(root) / label).glob(f".{key}.png.*.tmp"):
            tmp.unlink(missing_ok=True)
            n += 1
    return n


def batches(rows: list[dict], batch_size: int) -> list[list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["label"], r["index"])):
        groups.setdefault(tuple(r[c] for c in GROUP_COLUMNS), []).append(r)
    out = []
    for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        g = groups[key]
        out += [g[i : i + batch_size] for i in range(0, len(g), batch_size)]
    return out


class _Recorder:
    """Rows whose PNG the writers have written, recorded in the manifest once per shard (one
    read-merge-write for the shard, not one per batch: each rewrites the whole manifest). On an error,
    what did succeed is recorded before the error is raised; a run killed before recording leaves PNGs
    that carry their render key, and the next run adopts them without rendering (``shard_state``)."""

    def __init__(self, manifest: Path | str, on_written: Callable[[list[dict]], None] | None = None) -> None:
        self.manifest, self.on_written = manifest, on_written
        self.pending: list[list[Future]] = []
        self.written: list[dict] = []
        self.recorded: list[dict] = []
        self.error: BaseException | None = None

    def harvest(self, max_pending: int) -> None:
        """Collect finished batches in order; wait while more than ``max_pending`` are in flight."""
        while self.pending and (len(self.pending) > max_pending or all(f.done() for f in self.pending[0])):
            batch = []
            for f in self.pending.pop(0):
                try:
                    batch.append(f.result())
                except BaseException as exc:  # noqa: BLE001 - re-raised after recording the rest
                    self.error = self.error or exc
            self.written += batch
            if batch and self.on_written is not None:
                self.on_written(batch)

    def record(self) -> None:
        if self.written:
            record_rows(self.manifest, pd.DataFrame(self.written), SYNTHETIC)
            self.recorded, self.written = self.recorded + self.written, []


def _where(runtime: GenerateRuntime, model: RenderModel, pipe) -> tuple[str, str]:
    """(dtype, device) the images are rendered in, as recorded in their rows."""
    import torch

    from dermt2im.diffusion.models import resolve_device, unet_width

    if pipe is not None:
        dtype, device = dtype_name(pipe.dtype), str(pipe.device)
    else:
        device = resolve_device(runtime.device)
        dtype = dtype_name(resolve_dtype(runtime.dtype, device, unet_width(model.base_model, model.base_config)))
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name()})"
    return dtype, device


def _render_all(workdir: Workdir, model: RenderModel, runtime: GenerateRuntime, todo: list[dict], pipe,
                bar: progress.Task, on_written: Callable[[list[dict]], None] | None = None) -> _Recorder:
    """Render ``todo`` batch by batch (halving a batch on CUDA out-of-memory), writing PNGs meanwhile;
    the pipeline is looked up once per LoRA and scale, not per batch."""
    from dermt2im.diffusion import accel
    from dermt2im.diffusion.models import resolve_device

    recorder = _Recorder(workdir.synthetic_manifest, on_written)
    # (rows, the size the batch is rendered at): compiled, every batch at runtime.batch_size (one shape,
    # one graph; the padding costs at most a batch per sampler and shard), eager at its own size; the
    # halves of a batch split after an out-of-memory error at theirs
    device = str(pipe.device) if pipe is not None else resolve_device(runtime.device)
    padded = accel.wanted(runtime.compile, device)
    queue = [(batch, runtime.batch_size if padded else len(batch)) for batch in batches(todo, runtime.batch_size)]
    prep, prep_for = None, None
    with ThreadPoolExecutor(max_workers=runtime.writer_threads, thread_name_prefix="png-writer") as writers:
        try:
            while queue and recorder.error is None:
                batch, size = queue.pop(0)
                lora = (batch[0]["lora_path"], batch[0]["lora_sha256"], batch[0]["lora_scale"])
                if lora != prep_for:
                    choice = LoraChoice(Path(lora[0]) if lora[0] else None, lora[1])
                    prep, prep_for = prepared_pipeline(model, runtime, choice, lora[2], pipe=pipe), lora
                try:
                    with prep.lock:
                        images = render_batch(prep.pipe, prep.switch, batch, prep.prompts, pad_to=size)
                except BaseException as exc:
                    if is_oom(exc) and size > 1:
                        half = max(1, len(batch) // 2)
                        log.warning("CUDA out of memory with %d images: retrying as %d + %d", size, half,
                                    len(batch) - half)
                        empty_cuda_cache()
                        queue[:0] = [(part, len(part)) for part in (batch[:half], batch[half:]) if part]
                        continue
                    raise
                placed = [{**r, "batch_size": size, "batch_position": i} for i, r in enumerate(batch)]
                recorder.pending.append([writers.submit(_encode_and_write, r, img) for r, img in zip(placed, images)])
                bar.advance(len(batch))
                recorder.harvest(max_pending=2)  # bounded memory: at most two batches waiting on the writers
        except BaseException as exc:
            recorder.error = recorder.error or exc
        finally:
            recorder.harvest(max_pending=0)
            recorder.record()
    return recorder


def render_shard(workdir: Workdir, runtime: GenerateRuntime, model: RenderModel, shard: int, *,
                 pipe=None, on_written: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Render the shard's missing images with ``model``; returns the manifest rows recorded by this
    call. ``pipe`` optionally supplies the base pipeline (tests, benchmarks); ``on_written(rows)`` is
    told of each batch as soon as its PNGs are written (and of PNGs adopted from an interrupted run)."""
    rows = shard_rows(workdir, shard)
    removed = remove_own_temporaries(workdir, rows)
    if removed:
        log.info("shard %d: removed %d temporary file(s) left by an interrupted run", shard, removed)
    state = shard_state(workdir, model, shard)
    adopted: list[dict] = []
    if state.adopt:
        record_rows(workdir.synthetic_manifest, pd.DataFrame(state.adopt), SYNTHETIC)
        adopted = list(state.adopt)
        log.info("shard %d: recorded %d image(s) written before an interruption", shard, len(state.adopt))
        if on_written is not None:
            on_written(adopted)
    if not state.todo:
        log.info("shard %d: nothing to render (%d done)", shard, state.done + len(state.adopt))
        return adopted
    dtype, device = _where(runtime, model, pipe)
    for r in state.todo:
        r.update(dtype=dtype, device=device)
    t0 = time.perf_counter()
    with progress.task(f"render shard {shard}", total=len(state.todo), unit="images") as bar:
        recorder = _render_all(workdir, model, runtime, state.todo, pipe, bar, on_written)
    if recorder.error is not None:
        log.error("shard %d interrupted after %d image(s): %s", shard, len(recorder.recorded), recorder.error)
        raise recorder.error
    seconds = time.perf_counter() - t0
    n = len(recorder.recorded)
    log.info("shard %d: rendered %d image(s) in %.1f s (%.2f images/s)", shard, n, seconds, n / max(seconds, 1e-9))
    return adopted + recorder.recorded
