"""Generation renders with the LoRA the current config names, not the newest one on disk.

Train with A, then with B, then go back to A: the third ``train`` is served from cache, and
``generate`` must render with A's LoRA (the newest folder on disk is B's). Run as a user runs it,
command after command on one workdir."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dermt2im.cli import app
from dermt2im.core.manifest import SYNTHETIC, read_manifest

pytestmark = pytest.mark.slow
runner = CliRunner()

SMALL = ["preprocess.size=32", "train.resolution=32", "train.max_steps=2", "train.lr_warmup_steps=0",
         "train.validation_images_per_class=0", "generate.per_class=2", "generate.shard_size=2", "generate.width=32",
         "generate.height=32", "generate.steps_min=2", "generate.steps_max=2", "generate.samplers=[euler]"]


def _cli(*args: str) -> str:
    r = runner.invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


def _lora_of_rows(work) -> set[str]:
    return set(read_manifest(work / "manifests" / "synthetic.parquet", SYNTHETIC)["lora_sha256"])


def test_train_a_then_b_then_a_generates_with_a(tmp_path):
    data, work = tmp_path / "phantoms", tmp_path / "w"
    _cli("phantoms", str(data), "--n", "16", "--size", "48")
    sets = [f"--set={s}" for s in SMALL]
    _cli("ingest", str(data), "--workdir", str(work), "--config", "tiny", *sets)
    _cli("preprocess", "--workdir", str(work))

    def train(seed: int) -> dict:
        out = _cli("train", "--workdir", str(work), "--set", f"train.seed={seed}", "--save")
        runs = json.loads((work / "lora" / "runs.json").read_text())
        run_id = next(line.split()[2] for line in out.splitlines() if line.startswith("LoRA run "))
        meta = json.loads((work / "lora" / run_id / "lora.json").read_text())
        assert runs[meta["cache_key"]] == run_id  # training recorded which folder holds this key's LoRA
        return {"out": out, "run": run_id, "sha": meta["sha256"]["all"]}

    a = train(0)
    b = train(1)
    assert b["run"] != a["run"] and b["sha"] != a["sha"]
    out = _cli("generate", "--workdir", str(work))
    assert _lora_of_rows(work) == {b["sha"]} and "trained for the current config" in out

    back = train(0)
    assert "up to date, not trained again" in back["out"] and back["run"] == a["run"]
    # the newest LoRA on disk is B's; the config names A's
    newest = max((work / "lora").glob("*/lora.json"), key=lambda p: p.stat().st_mtime_ns).parent.name
    assert newest == b["run"]
    out = _cli("generate", "--workdir", str(work))
    assert _lora_of_rows(work) == {a["sha"]}, "generate rendered with another LoRA than the config's"
    assert f"lora/{a['run']}" in out and "trained for the current config" in out

    # --lora names one explicitly, and the output says so
    out = _cli("generate", "--workdir", str(work), "--lora", str(work / "lora" / b["run"]))
    assert _lora_of_rows(work) == {b["sha"]} and "given with --lora" in out
