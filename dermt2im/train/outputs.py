"""Training outputs and tracking: weight digests, the loss curve, the final loss and step metrics."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from dermt2im.core.fileio import atomic_write_bytes, atomic_write_text
from dermt2im.core.specs import TrainConfig
from dermt2im.train.state import LOSS_CSV, LOSS_PNG, LoraRun, TrainContext

# ---------------------------------------------------------------------------------------------
# outputs


def _tensor_digest(sd: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().float().contiguous().cpu()
        h.update(k.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()



def _write_loss_curve(runs: list[LoraRun], out_dir: Path) -> tuple[Path, Path]:
    lines = ["step,lora,loss,lr"]
    for run in runs:
        lines += [f"{s},{run.name},{loss!r},{lr!r}" for s, loss, lr in run.losses]
    csv = atomic_write_text(out_dir / LOSS_CSV, "\n".join(lines) + "\n")

    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for run in runs:
        xs = [s for s, loss, _ in run.losses if math.isfinite(loss)]
        ys = [loss for _, loss, _ in run.losses if math.isfinite(loss)]
        ax.plot(xs, ys, lw=0.8, alpha=0.5, label=f"{run.name}")
        k = max(1, len(ys) // 20)
        if len(ys) >= 2 * k and k > 1:
            smooth = [sum(ys[i : i + k]) / k for i in range(len(ys) - k + 1)]
            ax.plot(xs[k - 1 :], smooth, lw=1.6, label=f"{run.name} (mean of {k})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("DreamBooth-LoRA training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    png = atomic_write_bytes(out_dir / LOSS_PNG, buf.getvalue())
    return csv, png



def _final_loss(run: LoraRun) -> float:
    finite = [loss for _, loss, _ in run.losses if math.isfinite(loss)]
    tail = finite[-10:]
    return float(sum(tail) / len(tail)) if tail else float("nan")



# ---------------------------------------------------------------------------------------------
# tracking


def _log_step(ctx: TrainContext, name: str, step: int, loss: float, lr: float) -> None:
    """Buffer one step's loss and learning rate for the tracker (sent 200 points at a time)."""
    if ctx.tracker_run is None:
        return
    suffix = "" if name == "all" else f"_{name}"
    ctx.metrics_buffer += [(f"loss{suffix}", loss, step), (f"lr{suffix}", lr, step)]
    if len(ctx.metrics_buffer) >= 200:
        _flush_metrics(ctx)


def _flush_metrics(ctx: TrainContext) -> None:
    if ctx.tracker_run is None or not ctx.metrics_buffer:
        return
    ctx.tracker.log_points(ctx.tracker_run, ctx.metrics_buffer)
    ctx.metrics_buffer.clear()


def _flat_params(train: TrainConfig) -> dict[str, str]:
    return {f"train.{k}": json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v) for k, v in train.model_dump(mode="json").items()}
